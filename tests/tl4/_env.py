"""Skip marks for tests that check what one TransformerLens does (see conftest.py)."""

import pytest

from interpkv.core import tl as _tl

needs_tl3 = pytest.mark.skipif(not _tl.AVAILABLE, reason="needs transformer-lens 3 (HookedTransformer): make test")
needs_tl4 = pytest.mark.skipif(
    _tl.AVAILABLE or _tl.transformer_bridge_class() is None,
    reason="needs transformer-lens 4 (no HookedTransformer): make test-tl4",
)
needs_bridge = pytest.mark.skipif(
    _tl.transformer_bridge_class() is None, reason="needs a TransformerLens with TransformerBridge (4.x or 3.9)"
)
