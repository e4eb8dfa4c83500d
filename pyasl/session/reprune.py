"""Mode ``once`` of a Session: the decode context is the only KV held, so when a turn and its
answer would not fit, the context is pruned again with the newest turn as the observation window
(the sinks and, optionally, the latest exchange kept verbatim), and positions are renumbered before
they pass the model's training context."""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..engine.prefill import apply_selection, prefill
from .state import ContextFullError


class Repruning:
    """Session's appending and re-pruning (a mixin: the state lives in :class:`Session`)."""

    def _bound_positions(self) -> None:
        """Keep positions inside the model's training context: when the cells that may still be
        appended before the next pruning could pass it, the kept cells are renumbered 0..k-1 (as in
        llama.cpp's context shift: distances between kept tokens shrink, their order stays)."""
        if not self.policy.prunes or self.n_past + self.n_ctx <= self.model.n_ctx_train:
            return
        if self._layer_cells() is not None:
            raise ContextFullError(
                f"the conversation reached the model's training context ({self.model.n_ctx_train} positions) and "
                "a cache with per-layer budgets cannot renumber its positions: reset the session, or use a "
                "policy without per-layer budgets (snapkv, asl)")
        old = self.n_past
        self._pos_shift += old - self._ctx.renumber_positions()
        self.stats_.renumbers += 1


    def _turn_window(self, n: int) -> int:
        """The observation window of a new turn of `n` tokens: the turn, up to 3/4 of the budget (the
        older tokens keep the rest) and one ubatch."""
        return min(n, self.n_batch, max(self.policy.window, (3 * self.policy.budget) // 4), self.policy.budget - 1)

    def _decode(self, toks: list[int], scored: int = 0) -> Optional[np.ndarray]:
        """Decode toks at the next positions, the last `scored` with scores armed (engine.prefill);
        returns their window scores (None when nothing is scored)."""
        self._remember(toks)
        out = prefill(self._ctx, toks, window=scored)
        self._logits = out.logits
        return out.scores

    def _present_positions(self) -> np.ndarray:
        """Positions held by the cache's cells (sorted; per-head caches: the cells' metadata)."""
        return self._present_cells()[0]

    def _present_cells(self) -> tuple[np.ndarray, np.ndarray]:
        """Positions held by the cache's cells, sorted (per-head caches: the cells' metadata), and
        the cell of each."""
        ctx = self._ctx
        pos = ctx.cell_positions(0, ctx.kv_info().size_base)
        cells = np.flatnonzero(pos >= 0)
        order = np.argsort(pos[cells], kind="stable")
        return pos[cells][order].astype(np.int64), cells[order]

    def _protected(self, n: int, window: int) -> tuple[int, int]:
        """How many of the `n` cells before the observation window a re-prune keeps verbatim: the
        first cells (attention sinks: the start of the system prompt) and the newest ones (the latest
        exchange), as far as the budget allows: at least a quarter of it is left to the policy's
        own choice."""
        budget = self.policy.budget
        free = max(0, budget - window - max(1, budget // 4))
        n_sink = min(self.sink, n, free)
        n_recent = min(self.keep_recent, n - n_sink, free - n_sink)
        return n_sink, max(0, n_recent)

    def _reprune(self, scores: np.ndarray, window: int, n_new: int) -> None:
        """Prune the cache to the policy's budget; the last `n_new` positions were just decoded, the
        last `window` of them with scores armed (the observation window: `scores`). The first `sink` cells and
        the `keep_recent` cells before the new ones (the latest exchange) are kept as they are; the
        policy ranks the others."""
        ctx = self._ctx
        present, cells = self._present_cells()
        n = len(present)
        if n <= self.policy.budget:
            return
        older = n - n_new
        n_sink, n_recent = self._protected(older, window)
        idx = np.arange(n)
        # the policy keeps the last `window` columns it is given: put the protected cells there
        order = np.concatenate([idx[n_sink: older - n_recent], idx[older: n - window], idx[:n_sink],
                                idx[older - n_recent: older], idx[n - window:]])
        sc = np.ascontiguousarray(scores[:, :, present[order]])
        kw = {}
        counts = self._layer_cells()
        if counts is not None:
            # per-layer budgets: layer l sees its first counts[l] cells and every cell after the P prompt
            # cells; a re-prune keeps to those (the other cells hold other layers' rows)
            p_cells = max(counts)
            c = cells[order]
            kw["visible"] = np.stack([(c < k) | (c >= p_cells) for k in counts])
        sel = self.policy.select(sc, window + n_sink + n_recent, self.model, **kw).map(present[order])
        apply_selection(ctx, sel)
        self._bound_positions()
        self.stats_.reprunes += 1
        self.stats_.selected_layers.append(sel.layer)

    def _append(self, toks: list[int], reserve: int) -> None:
        """Append toks, keeping `reserve` cells free after them; prune with the policy whenever the
        context would overflow (the newest tokens are the observation window)."""
        i = 0
        while True:
            rest = toks[i:]
            used = self.n_cells()
            if used + len(rest) + reserve <= self.n_ctx:
                if rest:
                    self._decode(rest)
                return
            if not self.policy.prunes:
                raise ContextFullError(
                    f"the conversation fills the context ({self.n_ctx} cells, {used} in use) and policy full does not "
                    "prune: reset the session, or use a pruning policy or a larger context")
            room = self.n_ctx - used
            piece = rest[: max(0, min(len(rest), room))]
            if not piece:
                raise RuntimeError("internal: no room left to score the new turn")
            # the newest turn is the observation window, up to 3/4 of the budget (older tokens keep the rest)
            w = self._turn_window(len(piece))
            self._reprune(self._decode(piece, scored=w), w, len(piece))
            i += len(piece)
            if i >= len(toks) and self.n_cells() + reserve <= self.n_ctx:
                return
