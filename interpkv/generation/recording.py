"""``generate(..., capture=names)``: the whole generation recorded into one Record.

Every step of :func:`interpkv.generate` is one :func:`interpkv.diagnostics.capture.run`
call through the generation's cache, and all of them write into one
:class:`~interpkv.diagnostics.assemble.Assembler`: a buffer per hook allocated
once, at its first firing, for every position the generation can reach
(``[batch, history + prompt + max_new_tokens, ...]``, attention hooks
``[batch, head_index, P, P]``), each step writing its slice. No per-step copy
is kept.

The last chosen token is never fed by the generation loop (the cache holds it
back, see :mod:`interpkv.generation.resume`), so after the loop it is run once
more through the *frozen* cache (read, not appended): the Record then covers
every position of ``Generation.tokens``, and ``record.to_activation_cache(model)``
equals ``model.run_with_cache(Generation.tokens)``. That extra step is one more
call of ``fwd_hooks`` and leaves the cache and the tokens unchanged.

``Generation.records``, one Record per step as before, is a view built on
demand from the whole Record (:class:`StepRecords`), so it costs nothing
until a step is read.
"""

from typing import List, Sequence

import torch
from torch import Tensor

from interpkv.diagnostics.assemble import Assembler, fill_value
from interpkv.diagnostics.capture import NamesFilter, Sink
from interpkv.diagnostics.capture import run as capture_run
from interpkv.diagnostics.record import Record, is_attention_hook

__all__ = ["Recorder", "StepRecords"]


class _StepSink(Sink):
    def __init__(self, recorder: "Recorder", valid: Tensor):
        self.recorder = recorder
        self.step_valid = valid

    def activation(self, name, act, q_pos, k_pos):
        if k_pos is None:
            self.recorder.parts.put(name, act, q_pos)
        else:
            self.recorder.parts.put_attention(name, act, q_pos, k_pos)

    def logits(self, logits, q_pos):
        self.recorder.parts.put_logits(logits, q_pos)
        self.recorder.last_logits = logits

    def skip(self, name, reason):
        self.recorder.parts.drop(name)
        self.recorder.skipped[name] = reason


class Recorder:
    """Streams every step of one generation into preallocated buffers.

    Args:
        batch: rows.
        n_positions: every absolute position the generation can reach
            (the cache's history, the prompt and ``max_new_tokens``).
        names: which hooks (as ``capture=`` of :func:`interpkv.generate`).
        n_layers: the model's layers (for ``record["q", -1]``).
        logits: keep every position's logits (``capture_logits`` of generate).
    """

    def __init__(self, batch: int, n_positions: int, names: NamesFilter, n_layers: int, logits: bool = True):
        self.parts = Assembler(batch, n_positions, keep_logits=logits)
        self.names = names
        self.skipped: dict = {}
        self.valid = None  # (B, P) bool, made on the model's device at the first step
        self.step_valid: List[Tensor] = []
        self.n_layers = n_layers
        self.last_logits: Tensor = torch.empty(0)

    def step(self, model, tokens, cache, mask, fwd_hooks, *, final: bool = False) -> Tensor:
        """One forward of ``tokens`` through ``cache``, recorded; returns its logits ``[batch, pos, d_vocab]``."""
        sink = capture_run(
            model, tokens, lambda valid: _StepSink(self, valid), cache=cache, attention_mask=mask,
            names=self.names, fwd_hooks=fwd_hooks,
        )
        step_valid = sink.step_valid
        if self.valid is None:
            self.valid = step_valid.new_zeros((step_valid.shape[0], self.parts.n_positions))
        self.valid[:, : step_valid.shape[1]] |= step_valid
        if not final:
            self.step_valid.append(step_valid)
        return self.last_logits

    def record(self) -> Record:
        """The whole generation as one Record over the positions it reached (views of the buffers)."""
        used = self.valid.any(dim=0).nonzero()
        n = int(used.max()) + 1 if used.numel() else 0
        return _narrow(self.parts.record(self.valid, {"n_layers": self.n_layers}, self.skipped), n)


def _narrow(record: Record, n: int) -> Record:
    """``record`` over its first ``n`` positions (views, no copy)."""
    acts = {
        name: (t[:, :, :n, :n] if is_attention_hook(name) else t[:, :n])
        for name, t in record.activations.items()
    }
    masks = {name: m[:, :n] for name, m in record.computed_masks.items()}
    return Record(
        acts, record.logits[:, :n], record.valid[:, :n], dict(record.meta),
        skipped=dict(record.skipped), computed_masks=masks,
    )


class StepRecords(Sequence):
    """``Generation.records``: step ``s``'s Record, cut from the whole one when read.

    Step ``s``'s Record is in the absolute layout (``record.layout ==
    "absolute"``: index = absolute position) and covers positions ``[0, last
    position of the step]``; ``valid`` marks the step's tokens and every other
    entry holds the fill of a position that step did not compute (0; masked
    attention values).
    """

    def __init__(self, whole: Record, step_valid: List[Tensor]):
        self._whole = whole
        self.step_valid = step_valid

    @property
    def whole(self) -> Record:
        """The whole Record in the absolute layout (converted once, when a step is first read)."""
        if self._whole.layout != "absolute":
            self._whole = self._whole.absolute()
        return self._whole

    def __len__(self) -> int:
        return len(self.step_valid)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        valid = self.step_valid[index].to(self.whole.valid.device)  # (B, P_s)
        n = valid.shape[1]
        whole = self.whole
        acts = {}
        for name, full in whole.activations.items():
            if is_attention_hook(name):
                part = torch.full_like(full[:, :, :n, :n], fill_value(name))
                rows = valid[:, None, :, None].expand_as(part)
                part[rows] = full[:, :, :n, :n][rows]
            else:
                part = torch.zeros_like(full[:, :n])
                part[valid] = full[:, :n][valid]
            acts[name] = part
        logits = torch.zeros_like(whole.logits[:, :n])
        logits[valid] = whole.logits[:, :n][valid]
        masks = {name: m[:, :n] & valid for name, m in whole.computed_masks.items()}
        return Record(acts, logits, valid, dict(whole.meta), skipped=dict(whole.skipped), computed_masks=masks)

    def __repr__(self) -> str:
        return f"StepRecords({len(self)} steps, cut on demand from Generation.record)"
