"""Provenance: which interventions wrote each span of a cache's stored positions.

A cached key is the output of a computation: the model's weights *and*
everything that edited the forward pass when the key was written (a steering
hook, an SAE spliced in, a fault, a hook TransformerLens holds on the model).
Continuing a cache under other interventions attends to keys no run of the
new interventions would compute: the result equals neither the steered nor
the unsteered uncached run, silently. (vLLM keys its prefix cache on token
ids, an adapter name and a salt, and shipped wrong-KV bugs from it; nnsight
turns prefix caching off around interventions.) So every
:class:`~interpkv.KVCache` records, per span of slots, the
:class:`Intervention` s active when they were written, and a call that
continues it compares them with its own (:func:`check`, before anything
changes), emitting :class:`~interpkv.ProvenanceWarning` on a mismatch.

What counts, per span (a run of slots written by calls with equal interventions):

- each ``fwd_hooks`` entry of the call (and of an enclosing interpkv call,
  e.g. ``capture(fwd_hooks=...)``): hook point and a content digest of the
  hook (:mod:`interpkv.cache.identity`); interpkv's ``steering`` hooks and
  :func:`interpkv.intervention` wrappers carry an exact identity and the
  positions they act on;
- SAEs spliced into a SAELens ``HookedSAETransformer`` (hook point, config,
  weights digest); one with ``use_error_term=True`` outputs its input (up to
  rounding) and is listed but never a mismatch;
- faults injected with :func:`interpkv.faults.inject`;
- hooks held by the model itself (TransformerLens ``add_hook``,
  ``model.hooks(...)``, plain ``register_forward_hook`` on a hook point);
- the weights fingerprint (:mod:`interpkv.cache.fingerprint`), shown by
  :attr:`Provenance.weights`; a file from other weights is refused by
  :meth:`KVCache.load` already.

When is it a mismatch: for each stored span, the interventions of each side
that *act on it* are compared. An intervention acts on a span unless (a) it
declares positions (``steering.add(v, start=p)``, ``region="generated"``,
``interpkv.intervention(fn, start=p)``) none of which is in the span, or (b)
its hook point comes after the last layer's keys and values are computed
(``blocks.{last}.hook_resid_post``, ``ln_final``, ``unembed``, ...), so it
never reaches a stored key. A hook acting on position ``p`` changes keys at
``p`` and after; those are in ``p``'s span or later ones, which were written
under it, so comparing span by span is enough.

Cost: the interventions of a call are collected once per forward call (a
memo per hook object; hook points are scanned only when a hook was
registered since the last scan) and compared with the spans' by equality;
an unhooked decode step adds a few microseconds and no device sync (see
docs/performance.md). Only a differing set reads positions from the device,
once per span and set (memoized); a windowed cache continued under other
interventions also reads its slot ids each call, to forget evicted spans.

Modules: :mod:`.records` (:class:`Intervention`, :class:`Where`, :func:`declare`),
:mod:`.collect` (what a forward runs under), :mod:`.spans` (recording spans,
the comparison, the warning), :mod:`.view` (:class:`Provenance`, files).
"""

from interpkv.cache.provenance.collect import current, model_hook_points
from interpkv.cache.provenance.records import NONE, Intervention, Where, declare
from interpkv.cache.provenance.spans import check, check_loaded, crop, explain, history, mismatches, set_text, written
from interpkv.cache.provenance.view import HEADER_KEY, Provenance, Span, adopt, describe, from_header
from interpkv.errors import ProvenanceWarning

__all__ = ["Intervention", "Where", "Span", "Provenance", "ProvenanceWarning", "declare", "current", "check",
           "check_loaded", "crop", "explain", "history", "mismatches", "set_text", "written", "describe",
           "adopt", "from_header",
           "model_hook_points", "HEADER_KEY", "NONE"]
