"""KVCache lifecycle: crop, fork, select, repeat, freeze, for every positional scheme.

Every check compares the logits a cached run produces with TransformerLens's
uncached logits of the token sequence each row implies (what that row has seen,
minus what was cropped, plus what was appended).
"""

import functools
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import interpkv

from .lifecycle_helpers import D_VOCAB, SCHEMES, padded_batch, reference
from .lifecycle_helpers import tiny_model as build_model

# float64 tiny models agree with TransformerLens to ~1e-14; 1e-10 leaves room for
# summation-order differences while still catching any wrong position (>1e-3).
ATOL = 1e-10

# Hypothesis profiles (registered in tests/conftest.py): `make test` runs a few
# programs per scheme; the slow marker, or INTERPKV_HYPOTHESIS_PROFILE=full, >= 200.
PROFILE = "lifecycle-" + os.environ.get("INTERPKV_HYPOTHESIS_PROFILE", "fast")

# Models are never modified by a forward, so each is built once per session.
tiny_model = functools.lru_cache(maxsize=None)(build_model)


@pytest.fixture(scope="module", params=list(SCHEMES), ids=list(SCHEMES))
def model(request):
    return tiny_model(request.param)


def rand_rows(gen, lengths):
    return [torch.randint(0, D_VOCAB, (n,), generator=gen).tolist() for n in lengths]


class Rows:
    """A cache plus the token sequence each of its rows implies, checked on every append."""

    def __init__(self, model, cache, seqs, window=None, sinks=0):
        self.model, self.cache, self.seqs = model, cache, [list(s) for s in seqs]
        self.window, self.sinks = window, sinks

    def append(self, new_rows, pads=None):
        pads = pads or [0] * len(new_rows)
        tokens, mask = padded_batch(new_rows, pads)
        logits = interpkv.forward(self.model, tokens, cache=self.cache, attention_mask=mask)
        for b, row in enumerate(new_rows):
            self.seqs[b] += row
            if not row:
                continue
            want = reference(self.model, self.seqs[b], self.window, self.sinks)[-len(row):]
            got = logits[b, tokens.shape[1] - len(row):]
            err = (got - want).abs().max().item()
            assert err < ATOL, f"row {b}: max abs error {err} vs uncached"
        return logits

    def check_positions(self):
        """Stored positions hold each row's real tokens in order; next = tokens seen."""
        assert self.cache.next_positions.tolist() == [len(s) for s in self.seqs]
        for b, seq in enumerate(self.seqs):
            real = self.cache.positions[b][self.cache.positions[b] >= 0].tolist()
            m, w, s = len(seq), self.window, self.sinks
            assert real == [p for p in range(m) if w is None or p < s or p >= m - w]


def prefilled(model, gen, lengths=(7, 4)):
    """A 2-row cache prefilled with left padding (ragged rows)."""
    seqs = rand_rows(gen, lengths)
    rows = Rows(model, interpkv.KVCache.for_model(model, len(seqs)), [[] for _ in seqs])
    rows.append(seqs)
    return rows


# ------------------------------------------------------------------------ crop
def test_crop_continues_right_after_the_kept_slots(model):
    gen = torch.Generator().manual_seed(0)
    rows = prefilled(model, gen)  # row 1 has 3 padding slots at the front
    rows.cache.crop(rows.cache.seq_len - 2)
    rows.seqs = [rows.seqs[0][:-2], rows.seqs[1][:-2]]
    rows.check_positions()
    assert rows.cache.seq_len == 5
    rows.append(rand_rows(gen, (3, 3)))
    rows.check_positions()


def test_crop_into_the_padding_of_a_row_restarts_it_at_zero(model):
    gen = torch.Generator().manual_seed(1)
    rows = prefilled(model, gen)
    rows.cache.crop(2)  # row 0 keeps 2 tokens, row 1 only padding
    rows.seqs = [rows.seqs[0][:2], []]
    rows.check_positions()
    assert rows.cache.next_positions.tolist() == [2, 0]
    rows.append(rand_rows(gen, (2, 3)))


def test_crop_to_zero_and_to_full_length(model):
    gen = torch.Generator().manual_seed(2)
    rows = prefilled(model, gen)
    rows.cache.crop(rows.cache.seq_len)  # no-op
    rows.check_positions()
    rows.cache.crop(0)
    rows.seqs = [[], []]
    assert rows.cache.seq_len == 0 and rows.cache.nbytes == 0
    rows.append(rand_rows(gen, (3, 2)))


@pytest.mark.parametrize("n", [-1, 8, 1.5, True, "3"], ids=["negative", "too-long", "float", "bool", "str"])
@pytest.mark.unchecked_shapes  # checks interpkv's own error for a wrong argument
def test_crop_rejects_bad_lengths(n):
    model = tiny_model("neox")
    cache = interpkv.KVCache.for_model(model)
    interpkv.forward(model, torch.tensor([[1, 2, 3, 4, 5, 6, 7]]), cache=cache)
    with pytest.raises(ValueError, match=r"crop\(n\) keeps the first n of the 7 stored slots"):
        cache.crop(n)
    assert cache.seq_len == 7 and cache.next_positions.tolist() == [7]


# ------------------------------------------------------------------------ fork
def test_fork_is_independent(model):
    gen = torch.Generator().manual_seed(3)
    rows = prefilled(model, gen)
    before = (rows.cache.positions.clone(), rows.cache.layers[0].view(rows.cache.seq_len)[0].clone())
    branch = Rows(model, rows.cache.fork(), rows.seqs)
    branch.append(rand_rows(gen, (3, 1)))
    assert torch.equal(rows.cache.positions, before[0])
    assert torch.equal(rows.cache.layers[0].view(rows.cache.seq_len)[0], before[1])
    rows.append(rand_rows(gen, (2, 2)))  # the original continues its own history
    branch.append(rand_rows(gen, (1, 2)))  # and the branch its own
    branch.cache.crop(1)  # cropping the branch leaves the original alone
    rows.check_positions()


# ---------------------------------------------------------------------- select
def test_select_reorders_and_repeats_rows(model):
    gen = torch.Generator().manual_seed(4)
    rows = prefilled(model, gen)
    chosen = Rows(model, rows.cache.select([1, 0, 1]), [rows.seqs[1], rows.seqs[0], rows.seqs[1]])
    chosen.check_positions()
    chosen.append(rand_rows(gen, (2, 2, 3)))
    single = Rows(model, rows.cache.select(torch.tensor([1])), [rows.seqs[1]])
    single.append(rand_rows(gen, (4,)))
    assert rows.cache.batch_size == 2  # the original is unchanged


@pytest.mark.parametrize(
    "indices, error, message",
    [
        ([], ValueError, "needs at least one row index"),
        ([2], ValueError, r"batch_indices \[2\] are outside \[0, 2\)"),
        ([0, -1], ValueError, r"batch_indices \[-1\] are outside \[0, 2\)"),
        ([0.0], TypeError, "takes integer row indices"),
        (torch.tensor([True, False]), TypeError, "boolean row mask pass mask.nonzero"),
        (torch.tensor([[0, 1]]), ValueError, "1-D list of row indices"),
        (torch.tensor([0.0]), TypeError, "got a torch.float32 tensor"),
    ],
    ids=["empty", "too-large", "negative", "float", "bool-mask", "2d", "float-tensor"],
)
@pytest.mark.unchecked_shapes  # checks interpkv's own error for a wrong argument
def test_select_rejects_bad_indices(indices, error, message):
    model = tiny_model("gpt2")
    cache = interpkv.KVCache.for_model(model, 2)
    interpkv.forward(model, torch.tensor([[1, 2], [3, 4]]), cache=cache)
    with pytest.raises(error, match=message):
        cache.select(indices)


# ---------------------------------------------------------------------- repeat
def test_repeat_is_row_major_and_continues_each_copy(model):
    gen = torch.Generator().manual_seed(5)
    rows = prefilled(model, gen)
    many = rows.cache.repeat(3)
    assert many.batch_size == 6
    assert many.next_positions.tolist() == [7, 7, 7, 4, 4, 4]  # r0, r0, r0, r1, r1, r1
    copies = Rows(model, many, [rows.seqs[0]] * 3 + [rows.seqs[1]] * 3)
    copies.append(rand_rows(gen, (1, 2, 3, 1, 2, 3)))  # a different continuation per copy
    assert rows.cache.batch_size == 2


@pytest.mark.parametrize("n", [0, -2, 1.5, True], ids=["zero", "negative", "float", "bool"])
@pytest.mark.unchecked_shapes  # checks interpkv's own error for a wrong argument
def test_repeat_rejects_bad_counts(n):
    model = tiny_model("gpt2")
    cache = interpkv.KVCache.for_model(model)
    with pytest.raises(ValueError, match=r"repeat\(n\) needs an int n >= 1"):
        cache.repeat(n)


# ---------------------------------------------------------------------- freeze
def test_freeze_reads_but_does_not_append(model):
    gen = torch.Generator().manual_seed(6)
    rows = prefilled(model, gen)
    positions, nbytes = rows.cache.positions.clone(), rows.cache.nbytes
    probe = rand_rows(gen, (2, 2))
    with rows.cache.freeze() as frozen:
        assert frozen is rows.cache and frozen.frozen
        first = Rows(model, frozen, rows.seqs)
        a = first.append(probe)  # checked against the uncached reference
        b = interpkv.forward(model, torch.tensor(probe), cache=frozen)
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)  # no history added by `a`
        with pytest.raises(RuntimeError, match="cannot crop a frozen cache"):
            frozen.crop(1)
    assert not rows.cache.frozen
    assert torch.equal(rows.cache.positions, positions) and rows.cache.nbytes == nbytes
    rows.append(rand_rows(gen, (1, 1)))  # continues at the stored positions, not after the probe


# ------------------------------------------------------------- property tests
APPEND = st.tuples(
    st.just("append"), st.integers(1, 4), st.lists(st.integers(0, 3), min_size=4, max_size=4),
    st.integers(0, 2**31),
)
OPS = st.one_of(
    st.tuples(st.just("crop"), st.floats(0, 1)),
    st.tuples(st.just("fork"), st.integers(1, 3), st.booleans(), st.integers(0, 2**31)),
    st.tuples(st.just("select"), st.lists(st.floats(0, 0.999), min_size=1, max_size=3)),
    st.tuples(st.just("repeat"), st.integers(1, 2)),
    st.tuples(st.just("saveload")),
    APPEND,
)


@st.composite
def programs(draw, max_steps=6):
    """A prefill, then steps of (lifecycle op, append): every op is checked by the append after it."""
    steps = draw(st.lists(st.tuples(OPS, APPEND), min_size=1, max_size=max_steps))
    return [draw(APPEND)] + [op for step in steps for op in step]


def run_program(model, program, tmp_path, window=None, sinks=0):
    """Apply ops to a cache, checking every append against the uncached reference."""
    rows = Rows(model, interpkv.KVCache.for_model(model, 2, window=window, sinks=sinks),
                [[], []], window, sinks)
    limit = model.cfg.n_ctx if model.cfg.positional_embedding_type in ("standard", "shortformer") else None
    for op in program:
        kind, args = op[0], op[1:]
        batch = rows.cache.batch_size
        if kind == "append":
            n, pads, seed = args
            if limit is not None and max(map(len, rows.seqs)) + n > limit:
                continue
            gen = torch.Generator().manual_seed(seed)
            # Row 0 is never padded (so the chunk has a position); others may be
            # left-padded, even entirely (a row that sits this chunk out).
            lengths = [n] + [max(0, n - pads[b]) for b in range(1, batch)]
            rows.append(rand_rows(gen, lengths))
        elif kind == "crop":
            n = int(args[0] * rows.cache.seq_len)
            before = rows.cache.positions.clone()
            try:
                rows.cache.crop(n)
            except ValueError:
                assert window is not None, "only a windowed cache may refuse a crop in range"
                assert torch.equal(rows.cache.positions, before)
                continue
            rows.seqs = [s[:m] for s, m in zip(rows.seqs, rows.cache.next_positions.tolist())]
        elif kind == "fork":
            n, keep_fork, seed = args
            branch = Rows(model, rows.cache.fork(), rows.seqs, window, sinks)
            if limit is None or max(map(len, rows.seqs)) + n <= limit:
                branch.append(rand_rows(torch.Generator().manual_seed(seed), [n] * batch))
            if keep_fork:
                rows = branch
        elif kind == "select":
            picked = [int(u * batch) for u in args[0]]
            rows = Rows(model, rows.cache.select(picked), [rows.seqs[i] for i in picked], window, sinks)
        elif kind == "repeat":
            if batch * args[0] > 4:
                continue
            seqs = [s for s in rows.seqs for _ in range(args[0])]
            rows = Rows(model, rows.cache.repeat(args[0]), seqs, window, sinks)
        elif kind == "saveload":
            path = tmp_path / "cache.safetensors"
            rows.cache.save(path)
            rows = Rows(model, interpkv.KVCache.load(path, model), rows.seqs, window, sinks)
        rows.check_positions()


@pytest.mark.parametrize("scheme", list(SCHEMES))
@settings(settings.get_profile(PROFILE))
@given(program=programs())
def test_random_lifecycle_programs(scheme, program, tmp_path_factory):
    run_program(tiny_model(scheme), program, tmp_path_factory.mktemp("prop"))


@pytest.mark.parametrize("scheme", list(SCHEMES))
@settings(settings.get_profile(PROFILE))
@given(program=programs())
def test_random_lifecycle_programs_windowed(scheme, program, tmp_path_factory):
    run_program(tiny_model(scheme), program, tmp_path_factory.mktemp("prop"), window=3, sinks=1)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", list(SCHEMES))
@settings(settings.get_profile("lifecycle-full"))
@given(program=programs(max_steps=8))
def test_random_lifecycle_programs_full(scheme, program, tmp_path_factory):
    window = (3, 1) if len(program) % 2 else (None, 0)
    run_program(tiny_model(scheme), program, tmp_path_factory.mktemp("prop"), *window)
