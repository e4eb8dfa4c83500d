"""Mode ``reconstruct`` of a Session: the documents are pruned once, before any question, by what
the model attends to while repeating them (a query-agnostic score: KVzip, arXiv 2505.23416), and
then only the decode context is held, as in mode ``once``.

The kept tokens are then prefilled again as their own prompt (positions 0..k-1, GemFilter's second
pass) unless ``reprefill=False``: cells cut out of the whole document's KV answer a later question
with the value of a *neighbouring* fact (4 notes with a code each, asked in turn, Qwen2.5 at 25%:
12 of 16, every miss another note's code, with the asked sentence kept whole), while the same
tokens prefilled among themselves answer 16 of 16 with spans around:8+32, 13 of 16 with forward:32
(docs/BENCHMARKS.md, "The kept tokens prefilled again"). The second pass costs a prefill of
``budget`` tokens.

Mode ``once`` ranks the documents by the attention of their own last tokens, which is what the end
of the document needs, not what a later question will. Asking the model to repeat the documents
touches every part that carries information, whatever the question turns out to be. It costs about
one more prefill, and the full KV only while the documents are scored."""
from __future__ import annotations

import time
from typing import Callable, Optional

from ..engine.prefill import prefill_kept
from ..engine.strategies import PrunedPrefill

Progress = Optional[Callable[[int, int], None]]

REPEAT_REQUEST = "Repeat the documents above exactly, word for word."
_MIN_CHUNK = 32  # shorter repetitions score too little of the documents per pass


class Reconstruct:
    """Session's reconstruction-scored prefill (a mixin: the state lives in :class:`Session`)."""

    def _prefill_reconstruct(self, toks: list[int], pre: list[dict], text: str, progress: Progress) -> PrunedPrefill:
        """The documents `toks` (the rendering `text` of messages `pre`) pruned by the policy from
        reconstruction scores; the result as state bytes, like the strategies' prefill."""
        t0 = time.perf_counter()
        prompt_text = self._fmt.render(pre + [{"role": "user", "content": REPEAT_REQUEST}], True)
        if not prompt_text.startswith(text):
            raise RuntimeError("the chat template does not render the conversation incrementally")
        prompt = self._fmt.tokens(prompt_text[len(text):], first=False)
        full = self._new_full_copy()
        window = max(1, min(self.policy.window, len(toks) - 1))
        try:
            scores, _ = full.prefill(toks, window, progress=progress)
            if len(toks) <= self.policy.budget:
                return full.pruned_state(None, t0)
            chunk = full.repeat_room(len(prompt))
            if chunk >= _MIN_CHUNK:
                scores = full.reconstruction_scores(prompt, chunk)
            else:
                self.stats_.notes.append(
                    f"the documents ({len(toks)} tokens) leave no room to repeat them inside the model's training "
                    f"context ({self.model.n_ctx_train}): ranked by their own last tokens, as in mode once")
            self.last_selection = sel = full.select(self.policy, scores, window)
            if not self.reprefill or sel is None:
                return full.pruned_state(sel, t0)
            if sel.shared is None:
                self.stats_.notes.append(
                    f"{self.policy.name} keeps a set per KV head or layer: its cells are kept as the whole document "
                    "computed them (a second prefill needs one set of tokens)")
                return full.pruned_state(sel, t0)
        finally:
            full.close()
        return self._reprefill(toks, sel, t0)

    def _reprefill(self, toks: list[int], sel, t0: float) -> PrunedPrefill:
        """The kept tokens of `toks` prefilled again as a prompt of their own, positions 0..k-1 (the
        next position is k: the session's positions given back are len(toks) - k)."""
        k = len(sel.shared)
        ctx = prefill_kept(self.model, toks, sel.shared, 1, renumber=True, **self._ctx_kw())
        return PrunedPrefill(state=ctx.take_state(), n_tokens=k, n_kept=k, selected_layer=sel.layer,
                             seconds=time.perf_counter() - t0, note=sel.note)
