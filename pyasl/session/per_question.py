"""Mode ``per-question`` of a Session: the documents and every turn stay unpruned in a
:class:`~pyasl.engine.full_copy.FullCopy`; each question is decoded there as the observation window
and the policy selects the decode context again from everything.

The kept tokens are then prefilled again as a prompt of their own (positions 0..k-1, as mode
``reconstruct`` does; ``reprefill=True``), or their cells are gathered as the whole conversation
computed them (``reprefill=False``), or both (``reprefill="choose"``, the default). Cells cut out
of a whole document's KV bind a question to a neighbouring fact: on needles at 8K (Qwen2.5, asl,
1,024 cells) gathered cells named the next note's code where the same tokens
prefilled among themselves answered (docs/BENCHMARKS.md, "The question completes the document's
message, and the kept tokens are prefilled again"). Dense records go the other way: spans cut out of
a JSON object of UUID pairs read, among themselves, as other pairs (4K, 20 documents: 47.5 prefilled
again, 58.8 gathered; "The key-value context on 20 documents"). A selection per KV
head has no one set of tokens to prefill: its cells are gathered. The second prefill costs a
prefill of ``budget`` tokens per question. ``reprefill="choose"`` builds both decode contexts, and
keeps the prefilled answer unless the full copy and the drafts' own confidence both prefer the
gathered one (:mod:`.answer`; "Both answers, one kept" in docs/BENCHMARKS.md)."""
from __future__ import annotations

import time
from typing import Callable, Optional

from ..engine.full_copy import KEPT_AS_COMPUTED, FullCopyFull
from .answer import CHOOSE
from .state import _RECENT_MAX, _SLACK

Progress = Optional[Callable[[int, int], None]]


class PerQuestion:
    """Session's per-question selection (a mixin: the state lives in :class:`Session`)."""

    def _prefill_full(self, toks: list[int], progress: Progress) -> None:
        """per-question mode: the documents go unpruned into the full copy; the decode context holds
        the policy's selection from the documents' own last window until a question selects again."""
        t0 = time.perf_counter()
        self._full = self._new_full_copy()
        window = min(self.policy.window, len(toks) - 1)
        scores, logits = self._full.prefill(toks, max(1, window), progress=progress)
        self._n_docs = len(toks)
        self._select_from_full(scores, window, logits, room=self.max_tokens + _SLACK, again=False)
        self._remember(toks[-_RECENT_MAX:])
        st = self.stats_
        st.prefill_tokens, st.prefill_s, st.prefill_kept = len(toks), time.perf_counter() - t0, self.n_cells()

    def _select_from_full(self, scores, window: int, logits, room: int, again: bool = True) -> None:
        """The decode context: the policy's selection from everything in the full copy (window: the
        newest tokens, always kept), with `room` free cells; `again`: the kept tokens prefilled again
        where the session says so (a question; not the documents' own selection, which only waits
        for the first question)."""
        sel = self._full.select(self.policy, scores, window)
        full_logits = logits
        ctx, _, _, reprefilled = self._full.kept_context(sel, room, again and bool(self.reprefill))
        if reprefilled:
            logits = ctx.logits()
        elif reprefilled is None:
            self.stats_.note(KEPT_AS_COMPUTED.format(self.policy.name))
        if self._ctx is not None:
            self._ctx.close()
        self._ctx, self._logits = ctx, logits
        self._pos_shift = self._full.n - ctx.n_past  # the copy's next position: the tokens seen
        if reprefilled and self.reprefill == CHOOSE:  # the gathered cells answer too; the copy judges (.answer)
            self._alt, self._full_logits = self._full.pruned(sel, room)[0], full_logits
        else:
            self._full.park()  # full_copy="disk": written out until the next question
        self.last_selection = sel
        if sel is not None:
            self.stats_.selected_layers.append(sel.layer)

    def _ask_full(self, toks: list[int], reserve: int) -> None:
        """per-question mode: the turn is decoded into the full copy as the observation window, and the
        policy selects the decode context from everything. A conversation that would pass the model's
        training context goes on in mode once (re-pruning the decode context)."""
        w = self._turn_window(max(self.policy.window, len(toks)))
        try:
            scores, logits = self._full.ask(toks, w)
        except FullCopyFull as e:
            self._full.close()
            self._full = None
            self.mode = "once"
            self.stats_.notes.append(f"per-question selection stopped ({e}); mode once from here")
            return self._append(toks, reserve)
        self._remember(toks)
        self._select_from_full(scores, w, logits, room=reserve)
        self.stats_.questions_selected += 1

