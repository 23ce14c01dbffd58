"""interpkv without a HookedTransformer: TransformerLens 4, or no TransformerLens at all.

What must work there: ``import interpkv``, ``compare(..., engine="hf")``,
``Record``, ``diff``, reports, plots and ``interpkv check --engine hf``. What
needs a HookedTransformer raises one error naming the version it needs.
The no-TransformerLens case runs in a subprocess that hides ``transformer_lens``
from the import system, so it is checked in both test environments.
"""

import configparser
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import interpkv
from interpkv import zoo
from interpkv.core import tl as _tl
from interpkv.diagnostics import engines
from interpkv.errors import TransformerLensVersionError

from ._env import needs_tl3, needs_tl4

pytestmark = pytest.mark.tl4

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = [6, 1, 1, 4]
# float32 HF model against itself cached vs uncached: eager attention's float32
# softmax over score rows of different lengths rounds differently, ~1e-6 (see
# tests/integration/test_engines.py); 1e-5 as there.
LOOSE = 1e-5


def _inputs():
    tokens = torch.randint(0, 97, (2, sum(STEPS)), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    return tokens, mask


def test_hf_engine_record_diff_report_and_plots():
    hf = zoo.load_hf("llama")
    tokens, mask = _inputs()
    report = interpkv.compare(hf, tokens, steps=STEPS, attention_mask=mask, engine="hf")
    assert report.ok(atol=LOOSE, rtol=LOOSE), report.first_divergence(atol=LOOSE, rtol=LOOSE)
    frame = report.to_frame()
    assert len(frame) > 0 and "blocks.0.hook_resid_post" in set(frame["hook"])
    cached = engines.capture(hf, tokens, attention_mask=mask, steps=STEPS, engine="hf")
    uncached = engines.capture(hf, tokens, attention_mask=mask, engine="hf")
    assert isinstance(cached, interpkv.Record)
    assert interpkv.diff(cached, uncached).ok(atol=LOOSE, rtol=LOOSE)
    assert torch.equal(cached["blocks.1.hook_resid_post"], cached.activations["blocks.1.hook_resid_post"])
    import interpkv.plot as plot

    assert len(plot.divergence_heatmap(report).data) > 0
    assert len(plot.first_divergence(report).data) > 0


def test_zoo_hf_twin_alone_is_load_pair_s():
    """zoo.load_hf gives exactly the weights load_pair's HF model has (checked where load_pair can run)."""
    hf = zoo.load_hf("gpt2", seed=3)
    if not _tl.AVAILABLE:
        pytest.skip("load_pair needs a HookedTransformer; load_hf alone runs here")
    twin = zoo.load_pair("gpt2", seed=3)[1]
    for (name, a), (_, b) in zip(hf.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("engine", ["hf", "transformer_bridge"])
def test_cli_check_engine(engine, capsys):
    if engine == "transformer_bridge" and _tl.transformer_bridge_class() is None:
        pytest.skip("needs a TransformerLens with TransformerBridge")
    from interpkv.cli import main

    status = main(["check", "bloom", "--engine", engine])
    out = capsys.readouterr().out
    assert f"bloom ({engine})" in out
    assert status in (0, 1) and ("PASS" in out or "FAIL" in out)
    if engine == "hf":
        assert status == 0 and "PASS" in out


def test_setup_cfg_installs_no_transformer_lens():
    """`pip install interpkv` must not replace a user's TransformerLens: TL lives in the extras only."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    requires = cfg["options"]["install_requires"].lower()
    extras = cfg["options.extras_require"]
    assert "transformer-lens" not in requires and "transformer_lens" not in requires
    assert "transformer-lens>=3,<4" in extras["tl3"] and "transformer-lens>=4,<5" in extras["tl4"]
    assert "transformer-lens>=3,<4" in extras["dev"]  # make test stays on TransformerLens 3


@needs_tl4
@pytest.mark.unchecked_shapes  # hands entry points non-HookedTransformer models: interpkv's error is the point
def test_tl4_hooked_transformer_features_name_the_version():
    import importlib.metadata

    version = importlib.metadata.version("transformer-lens")
    hf = zoo.load_hf("gpt2")
    tokens, _ = _inputs()
    calls = {
        "interpkv.zoo.load": lambda: zoo.load("gpt2"),
        "interpkv.zoo.load_pair": lambda: zoo.load_pair("gpt2"),
        "interpkv.forward": lambda: interpkv.forward(hf, tokens),
        "KVCache": lambda: interpkv.KVCache.for_model(hf),
        "interpkv.generate": lambda: interpkv.generate(hf, tokens, max_new_tokens=1),
        "engine='interpkv'": lambda: interpkv.compare(hf, tokens, steps=STEPS, engine="interpkv"),
        "engine='transformer_lens'": lambda: interpkv.compare(hf, tokens, steps=STEPS, engine="transformer_lens"),
    }
    for feature, call in calls.items():
        with pytest.raises(TransformerLensVersionError) as info:
            call()
        message = str(info.value)
        assert feature in message and "transformer-lens>=3,<4" in message and version in message, message
        assert "interpkv[tl3]" in message


@needs_tl3
def test_tl3_keeps_hooked_transformer():
    assert _tl.AVAILABLE and _tl.HookedTransformer.__module__.startswith("transformer_lens")


_NO_TRANSFORMER_LENS = textwrap.dedent(
    """
    import importlib.abc, sys

    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "transformer_lens" or name.startswith("transformer_lens."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Hide())
    import importlib.metadata as md
    real_version = md.version
    def version(name):
        if name == "transformer-lens":
            raise md.PackageNotFoundError(name)
        return real_version(name)
    md.version = version

    import torch
    import interpkv
    from interpkv import zoo
    from interpkv.core import tl
    from interpkv.errors import TransformerLensVersionError
    assert not tl.AVAILABLE and tl.transformer_bridge_class() is None

    hf = zoo.load_hf("gpt2")
    tokens = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    report = interpkv.compare(hf, tokens, steps=[6, 1, 1, 4], engine="hf")
    assert report.ok(atol=1e-5, rtol=1e-5)
    assert "blocks.0.hook_resid_post" in report.to_frame()["hook"].values
    record = interpkv.diagnostics.engines.capture(hf, tokens, engine="hf")
    assert "blocks.0.hook_resid_post" in record and ("resid_post", 0) not in record

    stand_in = tl.HookedTransformer
    assert not isinstance(hf, stand_in) and not hasattr(stand_in, "__origin__")
    for call in (lambda: zoo.load("gpt2"), lambda: interpkv.forward(hf, tokens),
                 lambda: stand_in.from_pretrained, lambda: zoo.load_bridge("gpt2")):
        try:
            call()
        except TransformerLensVersionError as error:
            assert "not installed" in str(error), str(error)
        else:
            raise AssertionError("no TransformerLensVersionError")
    print("NO-TL OK")
    """
)


def test_without_any_transformer_lens():
    """A plain `pip install interpkv` (no extra): the HF engine works, HookedTransformer features say what to install."""
    run = subprocess.run(
        [sys.executable, "-c", _NO_TRANSFORMER_LENS], capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert run.returncode == 0 and "NO-TL OK" in run.stdout, run.stderr[-3000:]
