"""Mode ``per-question`` of a Session: the documents and every turn stay unpruned in a
:class:`~pyasl.engine.full_copy.FullCopy`; each question is decoded there as the observation window
and the policy selects the decode context again from everything."""
from __future__ import annotations

import time
from typing import Callable, Optional

from ..engine.full_copy import FullCopyFull
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
        self._select_from_full(scores, window, logits, room=self.max_tokens + _SLACK)
        self._remember(toks[-_RECENT_MAX:])
        st = self.stats_
        st.prefill_tokens, st.prefill_s, st.prefill_kept = len(toks), time.perf_counter() - t0, self.n_cells()

    def _select_from_full(self, scores, window: int, logits, room: int) -> None:
        """The decode context: the policy's selection from everything in the full copy (window: the
        newest tokens, always kept), with `room` free cells."""
        sel = self._full.select(self.policy, scores, window)
        ctx, _, _ = self._full.pruned(sel, room)
        if self._ctx is not None:
            self._ctx.close()
        self._ctx, self._logits = ctx, logits  # ctx continues at the copy's next position
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

