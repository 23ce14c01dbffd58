"""TransformerLens 3.x cache bugs, audited with the engines and checked against HF.

Each function reproduces one real TransformerLens behaviour on the zoo,
localizes it with a :class:`~interpkv.DivergenceReport` and verifies it
against the HF twin under teacher forcing (the same tokens fed to both, no
greedy decoding: greedy agreement flips on near-ties in random models), in
float64 where the bug does not need low precision. A finding is reported as
real only when the HF check agrees (``Finding.verified``). A TransformerLens
release without the behaviour gives a finding that is ``present=False`` and
still ``explained`` (TL then agrees with HF and with itself): "not reproduced",
never a failure, so an upstream fix does not turn the demo red.

- :func:`alibi_slopes_not_power_of_two`: Bloom with 6 heads. TL gives head
  ``i`` the slope ``2^(-8(i+1)/n)``; Bloom interleaves slopes from the next
  power of two. TL's cached run matches its uncached run and both differ
  from HF from the first attention output that sees two keys.
- :func:`generate_learned_positions`: ``HookedTransformer.generate`` with a
  learned position table and no tokenizer embeds each new token at about
  twice its position (``get_residual`` numbers the whole sequence from the
  cache offset; ``forward`` keeps the last row).
- :func:`stale_alibi`: each attention layer memoizes its ALiBi matrix and
  slices shorter calls out of a longer earlier one. Scores shift by a
  per-row constant (softmax-invariant in exact arithmetic); in bfloat16 the
  large bias rounds and the outputs drift. In any dtype the raw scores a hook
  reads (``hook_attn_scores``) move: by up to ~125 in float64 on the zoo
  Bloom after a 512-token call, while patterns and logits stay put.
"""

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch

from interpkv import zoo
from interpkv.diagnostics import engines
from interpkv.diagnostics.capture import RecordBuilder
from interpkv.diagnostics.diff import diff
from interpkv.diagnostics.engines import transformer_lens as tle
from interpkv.diagnostics.hf_reference import hf_logits
from interpkv.diagnostics.report import DivergenceReport, Site
from interpkv.tolerances import HF_LOGITS, SITE

__all__ = ["INPUTS", "Finding", "alibi_slopes_not_power_of_two", "generate_learned_positions", "stale_alibi", "all_findings"]

INPUTS = (
    "one row of 14 random tokens (seed 0) fed 8, 1, 1, 4 in float64 (stale ALiBi: bfloat16, after a 512-token "
    "call); generate: an 8-token prompt and 6 new tokens; HF fed the same tokens (teacher forcing)"
)
"""What the findings' numbers come from (each evidence label adds which runs it compares)."""

_CROSS_SITES = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")

LoadPair = Callable[[str, torch.dtype], Tuple[object, object]]
"""``load_pair(name, dtype) -> (HookedTransformer, HF model)``: where a finding gets its zoo pair.

The default loads a fresh pair (:func:`interpkv.zoo.load_pair`); ``interpkv demo`` passes the
pairs its other sections already built (``interpkv.verify.models.Models.pair``). A finding only
reads the pair it is given: TransformerLens runs restore the memoized ALiBi state
(:func:`~interpkv.diagnostics.engines.transformer_lens.isolated_state`), and the one finding
that changes a model on purpose (:func:`stale_alibi`) loads its own TransformerLens model.
"""


def _fresh_pair(name: str, dtype: torch.dtype):

    return zoo.load_pair(name, dtype=dtype)


@dataclass
class Finding:
    """One TransformerLens behaviour, localized and checked against HF.

    Attributes:
        title: short name.
        model: zoo model.
        claim: what goes wrong, in one sentence.
        site: first divergent site of ``report`` at ``atol``/``rtol``.
        report: the localizing report (plotted in the demo).
        atol: tolerance ``site`` was found at (``rtol`` equal).
        evidence: numbers of the HF check, label -> value.
        verified: the behaviour is there and the HF check confirms TransformerLens is the side that is wrong.
        runs: names of ``report``'s run ``a`` and reference ``b`` (for plots and tables).
        present: the installed TransformerLens shows the behaviour (``site`` is not None).
        clean: with the behaviour absent, TransformerLens agrees with HF and with itself
            (``False`` whenever ``present``).
    """

    title: str
    model: str
    claim: str
    site: Optional[Site]
    report: DivergenceReport = field(repr=False)
    atol: float
    evidence: dict
    verified: bool
    runs: Tuple[str, str] = ("TransformerLens cached", "TransformerLens uncached")
    present: bool = True
    clean: bool = False

    @property
    def site_label(self) -> str:
        return "-" if self.site is None else f"{self.site.hook}@{self.site.pos}"

    @property
    def explained(self) -> bool:
        """Verified where present, or absent with TransformerLens agreeing with HF: nothing unexplained."""
        return self.verified or (not self.present and self.clean)

    @property
    def status(self) -> str:
        """``"verified"``, ``"not reproduced"`` (fixed in the installed TransformerLens) or ``"unexplained"``."""
        if self.verified:
            return "verified"
        return "not reproduced" if self.explained else "unexplained"


def _centered(record):
    """The record with the residual-stream sites centered over ``d_model``.

    interpkv's zoo folds layer norms and centers writing weights, so a
    HookedTransformer's residual stream is HF's minus its mean; centering
    both sides compares what the next layer norm sees.
    """
    acts = {k: v - v.nanmean(-1, keepdim=True) for k, v in record.activations.items()}
    return type(record)(acts, record.logits, record.valid, record.meta)


def _tl_vs_hf(tl, hf, tokens, steps=None):
    wanted = lambda name: name.endswith(_CROSS_SITES)  # noqa: E731
    a = engines.capture(tl, tokens, engine="transformer_lens", steps=steps, names=wanted)
    b = engines.capture(hf, tokens, engine="hf", names=wanted)
    return diff(_centered(a), _centered(b))


def alibi_slopes_not_power_of_two(
    name: str = "bloom6", control: str = "bloom", *, load_pair: LoadPair = _fresh_pair
) -> Finding:
    """TL's cached Bloom with 6 heads against HF (float64, teacher forcing); ``control`` has 4 heads."""
    tokens = torch.randint(0, 97, (1, 14), generator=torch.Generator().manual_seed(0))
    steps = [8, 1, 1, 4]
    tol = HF_LOGITS[torch.float64]  # another implementation: other kernels, HF's float32 softmax/ALiBi
    tl, hf = load_pair(name, torch.float64)
    report = _tl_vs_hf(tl, hf, tokens, steps)
    own = engines.compare(tl, tokens, steps=steps, engine="transformer_lens")
    control_report = _tl_vs_hf(*load_pair(control, torch.float64), tokens, steps)
    site = report.first_divergence(atol=tol, rtol=tol)
    evidence = {
        f"max |dlogit| TL cached vs HF ({name})": report.logits_max_abs,
        f"max |dlogit| TL cached vs HF ({control}, 4 heads)": control_report.logits_max_abs,
        "max |dlogit| TL cached vs TL uncached": own.logits_max_abs,
    }
    sound = control_report.ok(atol=tol, rtol=tol) and own.ok(**_tight())
    return Finding(
        "ALiBi slopes, 6 heads", name,
        "TransformerLens gives head i the slope 2^(-8(i+1)/n) for any n; BLOOM interleaves slopes of the next "
        "power of two, so every attention output that sees two keys differs from HF (cached and uncached alike).",
        site, report, tol, evidence, site is not None and sound, ("TransformerLens cached", "HF"),
        present=site is not None, clean=site is None and sound,
    )


def _tight():
    return dict(atol=SITE[torch.float64], rtol=SITE[torch.float64])


def generate_learned_positions(
    name: str = "gpt2", prompt: int = 8, new: int = 6, *, load_pair: LoadPair = _fresh_pair
) -> Finding:
    """``HookedTransformer.generate`` (cache on, no tokenizer) against an uncached run on its own tokens."""

    tl, hf = load_pair(name, torch.float64)
    tokens = torch.randint(0, 97, (1, prompt), generator=torch.Generator().manual_seed(0))
    sink, generated = tle.run_generate(tl, tokens, RecordBuilder, max_new_tokens=new)
    fed = generated[:, :-1]  # the last generated token is never fed back
    stepped = sink.record({"engine": "transformer_lens.generate"})
    reference = engines.capture(tl, fed, engine="transformer_lens")
    report = diff(stepped, reference)
    site = report.first_divergence(**_tight())
    teacher = hf_logits(hf, fed, torch.ones_like(fed))  # HF on the same tokens
    hf_vs_uncached = float((teacher - reference.logits).abs().max())
    hf_vs_generate = float((teacher - stepped.logits)[:, prompt:].abs().max())
    evidence = {
        "max |dlogit| HF vs TL uncached (teacher forcing)": hf_vs_uncached,
        "max |dlogit| HF vs TL generate steps": hf_vs_generate,
    }
    tol = HF_LOGITS[torch.float64]
    verified = site is not None and site.pos == prompt and hf_vs_uncached < tol < hf_vs_generate
    return Finding(
        "generate, learned positions", name,
        f"HookedTransformer.generate without a tokenizer embeds the token at position p >= {prompt} with position "
        "row 2(p-1) (the cache offset is added to the whole sequence's numbering), so every generated step is off.",
        site, report, SITE[torch.float64], evidence, verified, ("TransformerLens generate", "TransformerLens uncached"),
        present=site is not None, clean=site is None and max(hf_vs_uncached, hf_vs_generate) < tol,
    )


def stale_alibi(
    name: str = "bloom", long_call: int = 512, dtype: torch.dtype = torch.bfloat16, *, load_pair: LoadPair = _fresh_pair
) -> Finding:
    """A TL ALiBi model audited after an earlier ``long_call``-token call, in ``dtype``.

    Only the float64 HF reference comes from ``load_pair``: the TransformerLens model
    is loaded fresh, because the finding leaves a stale ALiBi matrix on it.
    """

    tokens = torch.randint(0, 97, (1, 14), generator=torch.Generator().manual_seed(0))
    steps = [8, 1, 1, 4]
    _, hf = load_pair(name, torch.float64)
    tl = zoo.load(name, dtype=dtype)  # its own: changed on purpose below
    teacher = hf_logits(hf, tokens, torch.ones_like(tokens))

    def vs_hf() -> float:
        record = engines.capture(tl, tokens, engine="transformer_lens", steps=steps, names=[])
        return float((record.logits.double() - teacher).abs().max())

    fresh_report = engines.compare(tl, tokens, steps=steps, engine="transformer_lens")
    fresh = vs_hf()
    with torch.no_grad():
        tl(torch.zeros(1, long_call, dtype=torch.long))  # leaves a long_call x long_call matrix behind
    report = engines.compare(tl, tokens, steps=steps, engine="transformer_lens")
    stale = vs_hf()
    tol = SITE.get(dtype, 1e-5) if dtype in SITE else 1e-2  # bfloat16: keep ~2-3 digits
    site = report.first_divergence(atol=tol, rtol=tol)
    evidence = {
        f"max |dlogit| TL cached vs HF float64, fresh model ({dtype})": fresh,
        f"max |dlogit| TL cached vs HF float64, after a {long_call}-token call": stale,
        "max |dlogit| TL cached vs TL uncached, after the call": report.logits_max_abs,
        "KL cached vs uncached, after the call": report.kl,
    }
    evidence["max |d hook_attn_scores| (layer 0, float64 TL), after the call vs fresh"] = _scores_shift(
        name, tokens, long_call)
    verified = site is not None and fresh_report.ok(atol=tol, rtol=tol) and stale > 2 * fresh
    clean = site is None and fresh_report.ok(atol=tol, rtol=tol) and stale <= 2 * fresh
    return Finding(
        "stale ALiBi matrix", name,
        f"after a {long_call}-token call, shorter calls slice their ALiBi bias out of the stored matrix: scores "
        f"shift by slope x (offset) per row, which {str(dtype).replace('torch.', '')} cannot hold, so outputs drift.",
        site, report, tol, evidence, verified, present=site is not None, clean=clean,
    )


def _scores_shift(name: str, tokens: torch.Tensor, long_call: int) -> float:
    """How far TransformerLens's own layer-0 ``hook_attn_scores`` move after a longer call, in float64."""

    tl, hook = zoo.load(name, dtype=torch.float64), "blocks.0.attn.hook_attn_scores"
    with torch.no_grad():
        before = tl.run_with_cache(tokens, names_filter=hook)[1][hook]
        tl(torch.zeros(1, long_call, dtype=torch.long))
        after = tl.run_with_cache(tokens, names_filter=hook)[1][hook]
    kept = torch.isfinite(before)  # the causal mask's -inf entries are the same in both
    return float((before[kept] - after[kept]).abs().max())


def all_findings(*, load_pair: LoadPair = _fresh_pair) -> List[Finding]:
    """Every finding above, with its defaults (what ``interpkv demo`` shows)."""
    return [
        alibi_slopes_not_power_of_two(load_pair=load_pair),
        generate_learned_positions(load_pair=load_pair),
        stale_alibi(load_pair=load_pair),
    ]
