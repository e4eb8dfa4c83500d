"""Mode ``reconstruct`` of a Session: the documents are pruned once, before any question, by what
the model attends to while repeating them (a query-agnostic score: KVzip, arXiv 2505.23416), and
then only the decode context is held, as in mode ``once``.

Mode ``once`` ranks the documents by the attention of their own last tokens, which is what the end
of the document needs, not what a later question will. Asking the model to repeat the documents
touches every part that carries information, whatever the question turns out to be. It costs about
one more prefill, and the full KV only while the documents are scored."""
from __future__ import annotations

import time
from typing import Callable, Optional

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
            self.last_selection = full.select(self.policy, scores, window)
            return full.pruned_state(self.last_selection, t0)
        finally:
            full.close()
