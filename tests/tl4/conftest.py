"""tests/tl4: what interpkv does without a HookedTransformer (runs under TransformerLens 3 and 4).

Every module here sets ``pytestmark = pytest.mark.tl4``: ``make test-tl4`` runs
them in ``.venv-tl4`` (transformer-lens 4.x), ``make test`` runs them on
transformer-lens 3 too. Tests that check what only one TransformerLens does
skip on the other, saying why (:mod:`._env`). Nothing here may build a
HookedTransformer (``zoo.load``, ``zoo.load_pair``).
"""
