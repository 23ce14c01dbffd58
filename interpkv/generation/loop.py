"""The decode loop of :func:`interpkv.generate`, and what a failed step leaves behind.

:class:`Loop` keeps its state (the step, its input, the tokens chosen so far)
where the failure handler can read it. :func:`settle` puts a caller's cache at
a consistent point after an exception in a step (a hook raising,
KeyboardInterrupt): every completed step committed, and the token the failed
step was feeding held back (:mod:`interpkv.generation.resume`), so
``generate(model, cache=cache, max_new_tokens=n)`` continues as the
uninterrupted call would have. A failure in the first step leaves the cache as
it was before the call.
"""

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from interpkv.cache.kvcache import KVCache
from interpkv.core.forward import forward
from interpkv.generation import options as _options
from interpkv.generation import resume
from interpkv.generation.recording import StepRecords
from interpkv.generation.result import Generation
from interpkv.generation.sampling import sample_next

__all__ = ["Loop", "settle", "attach"]


class _Published(NamedTuple):
    """What a failure handler may read: the state after the last completed step."""

    count: int  # tokens chosen so far
    chosen: Optional[Tensor]  # the last step's choice per row
    running: Tensor  # rows that were still running in that step
    finished: Tensor  # rows that have stopped
    n_finished: int  # how many (on the host: decode steps read nothing back without stop tokens)
    step_input: Tensor  # what the next step feeds
    step_mask: Tensor
    step_all_real: bool  # the next step's mask is all ones (known on the host): not passed
    appended_before: int  # cache.appended / seq_len before the next step feeds step_input
    length_before: int


class Loop:
    """The decode loop's state, kept where a failure handler can read it.

    Each step's outcome is written into preallocated columns first (invisible
    until counted) and then *published* in one store of a :class:`_Published`:
    the count of chosen tokens, the next step's input and the cache length it
    starts from. An interrupt at any instant sees the previous step's state or
    the new one, never half of each: :func:`settle` and
    ``error.interpkv_generation`` read only published state. No per-token
    Python list is kept.
    """

    def __init__(self, model, cache, tokens, mask, fwd_hooks, opts, recorder, resumed, keep_logits, generator):
        self.model, self.cache, self.fwd_hooks, self.opts = model, cache, fwd_hooks, opts
        self.recorder, self.keep_logits, self.generator = recorder, keep_logits, generator
        device = tokens.device
        self.stop = torch.tensor(opts.stop_tokens, dtype=torch.long, device=device)
        pad = opts.pad_token if opts.pad_token is not None else (opts.stop_tokens[0] if opts.stop_tokens else 0)
        self.pad = int(pad)
        finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=device)
        n_finished = 0
        if resumed:  # rows with nothing held back had stopped; so had rows holding back a stop token
            finished = (mask[:, -1] == 0) | torch.isin(tokens[:, -1], self.stop)
            n_finished = int(finished.sum())  # one read per continued call
        self.history = (tokens, mask)  # the uncached loop reruns all of it
        # Written ahead of the count, grown by doubling (see _put).
        self._tokens = torch.empty(tokens.shape[0], 0, dtype=torch.long, device=device)
        self._mask = torch.empty(tokens.shape[0], 0, dtype=torch.long, device=device)
        self._logits: Optional[Tensor] = None
        self.published = _Published(
            0, None, ~finished, finished, n_finished, tokens, mask, False, cache.appended, cache.seq_len
        )

    count = property(lambda self: self.published.count, doc="Tokens chosen so far (published steps).")
    step = count  # the step running (or that failed) = the tokens chosen before it
    chosen = property(lambda self: self.published.chosen)
    running = property(lambda self: self.published.running)
    finished = property(lambda self: self.published.finished)
    n_finished = property(lambda self: self.published.n_finished)
    step_input = property(lambda self: self.published.step_input)
    step_mask = property(lambda self: self.published.step_mask)
    step_all_real = property(lambda self: self.published.step_all_real)
    appended_before = property(lambda self: self.published.appended_before)
    length_before = property(lambda self: self.published.length_before)

    def _last_logits(self) -> Tensor:
        """Logits of each row's last column after feeding the step's input: ``[batch, d_vocab]``."""
        if not self.opts.cached:
            seq, seq_mask = self.history
            if self.count:
                seq = torch.cat([seq, self.step_input], 1)
                seq_mask = torch.cat([seq_mask, self.step_mask], 1)
                self.history = (seq, seq_mask)
            return forward(self.model, seq, attention_mask=seq_mask, fwd_hooks=self.fwd_hooks, logits="last")[:, -1]
        if self.recorder is not None:
            logits = self.recorder.step(self.model, self.step_input, self.cache, self.step_mask, self.fwd_hooks)
            return logits[:, -1]
        return forward(
            self.model, self.step_input, cache=self.cache,
            attention_mask=None if self.step_all_real else self.step_mask,
            fwd_hooks=self.fwd_hooks, logits="last",
        )[:, -1]

    def run(self, max_new_tokens: int) -> None:
        batch = self.finished.shape[0]
        if self.n_finished == batch:  # resumed: an uninterrupted call would have ended already
            return
        opts = self.opts
        for step in _options.progress(max_new_tokens, opts.verbose):
            last = self._last_logits()  # (B, d_vocab), real for every running row (left-aligned)
            chosen = sample_next(
                last, temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p, generator=self.generator
            )
            running = ~self.finished
            chosen = torch.where(running, chosen, torch.full_like(chosen, self.pad))
            fed_all = self.n_finished == 0  # every row running in this step (host)
            finished, n_finished = self.finished, self.n_finished
            if self.stop.numel():
                finished = finished | (running & torch.isin(chosen, self.stop))
                n_finished = int(finished.sum())  # the step's one host read
            self._tokens = _put(self._tokens, step, chosen, max_new_tokens)
            self._mask = _put(self._mask, step, running.long(), max_new_tokens)
            if self.keep_logits:
                self._logits = _put(self._logits, step, last, max_new_tokens)
            # A row's stop token is still fed (it is real); after that, padding only.
            published = _Published(
                step + 1, chosen, running, finished, n_finished, chosen[:, None], running.long()[:, None], fed_all,
                self.cache.appended, self.cache.seq_len,
            )
            self.published = published  # the step counts from here on, all of it at once
            if n_finished == batch or step == max_new_tokens - 1:
                break

    def result(self, tokens, mask, tokenizer, single, record, recorder) -> Generation:
        count = self.count  # published steps only
        batch, device = tokens.shape[0], tokens.device
        if tokens.is_floating_point():
            prompt_tokens = torch.empty(batch, 0, dtype=torch.long, device=device)
            prompt_mask = prompt_tokens
        else:
            prompt_tokens, prompt_mask = tokens, mask
        out_tokens = torch.cat([prompt_tokens, self._tokens[:, :count]], 1)
        out_mask = torch.cat([prompt_mask, self._mask[:, :count]], 1)
        logits = self._logits[:, :count].clone() if self.keep_logits and count and self._logits is not None else None
        return Generation(
            tokens=out_tokens,
            attention_mask=out_mask,
            prompt_length=prompt_tokens.shape[1],
            finished=self.finished,
            logits=logits,
            records=StepRecords(record, recorder.step_of, recorder.n_steps) if record is not None else None,
            tokenizer=tokenizer,
            single=single,
            record=record,
        )


def _put(buffer: Optional[Tensor], step: int, column: Tensor, limit: int) -> Tensor:
    """``buffer`` (``[batch, steps, ...]``) with ``column`` at ``step``, grown by doubling up to ``limit``.

    Memory follows the steps actually taken, not ``max_new_tokens``.
    """
    if buffer is None:
        buffer = column.new_empty((column.shape[0], 0, *column.shape[1:]))
    if step >= buffer.shape[1]:
        capacity = min(limit, max(16, 2 * buffer.shape[1]))
        grown = column.new_empty((column.shape[0], capacity, *column.shape[1:]))
        grown[:, : buffer.shape[1]] = buffer
        buffer = grown
    buffer[:, step] = column
    return buffer


def settle(cache: KVCache, start, loop: Loop, error: BaseException) -> None:
    """After a failed step: every completed step committed, the failed step's input held back.

    A failure inside the step's forward leaves the cache's history as it was
    (nothing counts until ``KVCache.commit``); one after the forward returned
    (KeyboardInterrupt while sampling) is undone with ``crop``. A windowed cache
    that evicted in that step cannot be cropped back: it is left holding the
    step, with nothing held back, and the note says so.
    """
    committed = cache.appended != loop.appended_before
    if committed:
        try:
            if cache.seq_len != loop.length_before + loop.step_input.shape[1]:
                raise ValueError("evicted")  # slots moved: crop cannot find the step's start
            cache.crop(loop.length_before)
        except ValueError:
            resume.forget(cache)
            _note(error, "interpkv.generate: the windowed cache evicted keys during the failed step and "
                  "cannot be rolled back; it holds that step and nothing to continue from (fork() it "
                  "before generating to keep a restart point)")
            return
    if loop.step == 0:
        resume.restore(cache, start)  # the first step failed: the cache is as it was
        _note(error, "interpkv.generate: the first step failed; the cache is as it was before the call")
        return
    resume.hold_back(cache, loop.step_input[:, 0], loop.step_mask[:, 0] == 1)
    _note(error, f"interpkv.generate: the cache keeps the {loop.step} completed steps and holds back the next "
          "token; generate(model, cache=cache, max_new_tokens=n) continues as the uninterrupted call would "
          "(the tokens so far: error.interpkv_generation.tokens)")


def _note(error: BaseException, text: str) -> None:
    if hasattr(error, "add_note"):
        error.add_note(text)


def attach(error: BaseException, loop: Loop, tokens, mask, single) -> None:
    """``error.interpkv_generation``: what was generated before the failure (best effort)."""
    try:
        error.interpkv_generation = loop.result(tokens, mask, getattr(loop.model, "tokenizer", None), single, None, None)
    except Exception:  # an exception type without attributes, or nothing generated yet
        pass


