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

from typing import List, Optional

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


class Loop:
    """The decode loop's state, kept where a failure handler can read it."""

    def __init__(self, model, cache, tokens, mask, fwd_hooks, opts, recorder, resumed, keep_logits, generator):
        self.model, self.cache, self.fwd_hooks, self.opts = model, cache, fwd_hooks, opts
        self.recorder, self.keep_logits, self.generator = recorder, keep_logits, generator
        device = tokens.device
        self.stop = torch.tensor(opts.stop_tokens, dtype=torch.long, device=device)
        pad = opts.pad_token if opts.pad_token is not None else (opts.stop_tokens[0] if opts.stop_tokens else 0)
        self.pad = int(pad)
        self.finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=device)
        # Rows known finished, on the host: decode steps read nothing back without
        # stop tokens, and read this count once per step with them.
        self.n_finished = 0
        if resumed:  # rows with nothing held back had stopped; so had rows holding back a stop token
            self.finished = (mask[:, -1] == 0) | torch.isin(tokens[:, -1], self.stop)
            self.n_finished = int(self.finished.sum())  # one read per continued call
        self.step_input, self.step_mask = tokens, mask
        self.step_all_real = False  # the step's mask is all ones (known on the host): not passed
        self.history = (tokens, mask)  # the uncached loop reruns all of it
        self.step = 0
        self.appended_before, self.length_before = cache.appended, cache.seq_len
        self.chosen: Optional[Tensor] = None
        self.running = ~self.finished
        self.new_tokens: List[Tensor] = []
        self.new_mask: List[Tensor] = []
        self.kept_logits: List[Tensor] = []

    def _last_logits(self) -> Tensor:
        """Logits of each row's last column after feeding the step's input: ``[batch, d_vocab]``."""
        if not self.opts.cached:
            seq, seq_mask = self.history
            if self.step:
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
            self.step = step
            self.appended_before, self.length_before = self.cache.appended, self.cache.seq_len
            last = self._last_logits()  # (B, d_vocab), real for every running row (left-aligned)
            chosen = sample_next(
                last, temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p, generator=self.generator
            )
            running = ~self.finished
            chosen = torch.where(running, chosen, torch.full_like(chosen, self.pad))
            self.new_tokens.append(chosen)
            self.new_mask.append(running.long())
            self.chosen, self.running = chosen, running
            if self.keep_logits:
                self.kept_logits.append(last.clone())
            fed_all = self.n_finished == 0  # every row running in this step (host)
            if self.stop.numel():
                self.finished = self.finished | (running & torch.isin(chosen, self.stop))
                self.n_finished = int(self.finished.sum())  # the step's one host read
            if self.n_finished == batch or step == max_new_tokens - 1:
                break
            # A row's stop token is still fed (it is real); after that, padding only.
            self.step_input, self.step_mask = chosen[:, None], running.long()[:, None]
            self.step_all_real = fed_all

    def result(self, tokens, mask, tokenizer, single, record, recorder) -> Generation:
        batch, device = tokens.shape[0], tokens.device
        if tokens.is_floating_point():
            prompt_tokens = torch.empty(batch, 0, dtype=torch.long, device=device)
            prompt_mask = prompt_tokens
        else:
            prompt_tokens, prompt_mask = tokens, mask
        empty = torch.empty(batch, 0, dtype=torch.long, device=device)
        out_tokens = torch.cat([prompt_tokens, torch.stack(self.new_tokens, 1) if self.new_tokens else empty], 1)
        out_mask = torch.cat([prompt_mask, torch.stack(self.new_mask, 1) if self.new_mask else empty], 1)
        return Generation(
            tokens=out_tokens,
            attention_mask=out_mask,
            prompt_length=prompt_tokens.shape[1],
            finished=self.finished,
            logits=torch.stack(self.kept_logits, 1) if self.keep_logits and self.kept_logits else None,
            records=StepRecords(record, recorder.step_valid) if record is not None else None,
            tokenizer=tokenizer,
            single=single,
            record=record,
        )


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
            cache.next_tokens = cache.next_tokens_at = None
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


