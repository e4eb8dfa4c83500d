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

A ranking without a question marks a fact's value (the code, the number) more than the words that
name it, and a later question asks by those words: so a policy with the default span selects here
with :data:`RANKING_SPAN` (a kept token also brings the 8 tokens before it). On the same notes, 10
documents x 4 questions: 35 of 40 against 26 of 40 with forward:32 (full KV 38). A span the caller
chose is used as it is.

Mode ``once`` ranks the documents by the attention of their own last tokens, which is what the end
of the document needs, not what a later question will. Asking the model to repeat the documents
touches every part that carries information, whatever the question turns out to be. It costs the
full KV while the documents are scored, and time: about 3x the documents' prefill on 2 cores
(Qwen2.5, a 4K JSON object: 94-101 s against 32-33 s; 8K: 295 s against 95 s; 4K prose notes about
2x), as the repetition's chunks attend to the whole document and the kept tokens are prefilled
again."""
from __future__ import annotations

import time
from typing import Callable, Optional

from ..engine.full_copy import KEPT_AS_COMPUTED
from ..engine.strategies import PrunedPrefill

Progress = Optional[Callable[[int, int], None]]

REPEAT_REQUEST = "Repeat the documents above exactly, word for word."
RANKING_SPAN = "around:8+32"  # the default span of a question-agnostic ranking (see the module doc)
_MIN_CHUNK = 32  # shorter repetitions score too little of the documents per pass


def ranking_policy(policy):
    """The policy a question-agnostic ranking selects with: `policy`, its default span widened to
    :data:`RANKING_SPAN` (a span the caller chose, or a policy that does not prune, as it is)."""
    if not policy.prunes or policy.span_given:
        return policy
    return policy.replace(span=RANKING_SPAN)


class Reconstruct:
    """Session's reconstruction-scored prefill (a mixin: the state lives in :class:`Session`)."""

    def _prefill_reconstruct(self, toks: list[int], pre: list[dict], text: str, progress: Progress) -> PrunedPrefill:
        """The documents `toks` (the rendering `text` of messages `pre`) pruned by the policy from
        reconstruction scores; the result as state bytes, like the strategies' prefill."""
        t0 = time.perf_counter()
        prompt_text = self._fmt.render(self._fmt.turn(pre, REPEAT_REQUEST), True)
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
            policy = self.policy
            if chunk >= _MIN_CHUNK:
                scores = full.reconstruction_scores(prompt, chunk)
                policy = ranking_policy(self.policy)
                if policy is not self.policy:
                    self.stats_.notes.append(f"the documents were ranked without a question: spans {policy.span} "
                                             "(the words before a kept token name it; --span sets another)")
            else:
                self.stats_.notes.append(
                    f"the documents ({len(toks)} tokens) leave no room to repeat them inside the model's training "
                    f"context ({self.model.n_ctx_train}): ranked by their own last tokens, as in mode once")
            self.last_selection = sel = full.select(policy, scores, window)
            # reprefill: the kept tokens prefilled again at 0..k-1 (the positions given back to a bounded
            # session), the copy freed first (only its tokens are needed then); otherwise gathered from it
            pp = full.pruned_state(sel, t0, self.reprefill, self.policy.name, from_zero=True, free_copy=True)
            if self.reprefill and sel is not None and not pp.reprefilled:
                self.stats_.note(KEPT_AS_COMPUTED.format(self.policy.name))
            return pp
        finally:
            full.close()
