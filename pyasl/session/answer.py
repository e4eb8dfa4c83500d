"""An answer decoded in one decode context, or in two side by side, one of them kept.

Per-question selection builds the decode context one of two ways: the kept tokens prefilled again
among themselves, or their cells gathered as the whole document computed them. Neither wins on every
document (docs/BENCHMARKS.md, "The key-value context on 20 documents": prose needles at 8K lose a
quarter of their answers gathered, a JSON object of UUID pairs loses 11 points prefilled again), and
which one answered right is not known until an answer exists. With ``reprefill="choose"`` a Session
decodes the answer in both, streams what they agree on, and keeps the prefilled answer unless two
judges both prefer the gathered one: the unpruned conversation (the full copy: the mean
log-probability of the answer's tokens, one batched pass over the copy per answer that differs) and
the drafts' own contexts (the mean log-probability each gave its own tokens). The full copy alone
is the unpruned model, and where it confuses neighbouring facts itself (needles at 8K) it prefers
the wrong gathered answer, of which the gathered context is then less sure than the prefilled one
of its own (docs/BENCHMARKS.md, "Both answers, one kept by two judges": kv 58.8, needles at 8K 100,
one-shot 56.2 and 81.2). Both judges score likelihood, and a loop is likely (a small model repeating
a word of a long question scores above a real answer): a draft that ran out of tokens repeating itself
(`loops`) is kept only when every draft does. pyasl.Llama(reprefill="choose") decodes both drafts
to their end before its first token (`settle`) and lets llama-cpp-python answer in the kept one's
decode context."""
from __future__ import annotations

import codecs
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..engine.full_copy import log_softmax
from .sampling import penalize, sample

CHOOSE = "choose"  # Session(reprefill=CHOOSE): answer in both decode contexts, keep one (`keep`)
RULE = "both"  # how `keep` chooses; "judge" (rows before 2026-12-07 05:00): the full copy alone
LOOP_TOKENS, LOOP_PERIOD = 24, 8  # a loop: the last 24 tokens repeat a period of at most 8 (3+ times)


@dataclass
class Draft:
    """One answer being decoded greedily or sampled in `ctx` (its logits for the next token: `logits`)."""
    ctx: object
    logits: np.ndarray
    how: str = ""                      # which decode context: "prefilled" or "gathered"
    tokens: list = field(default_factory=list)
    text: str = ""
    end: Optional[int] = None          # the end-of-generation token that ended it
    done: bool = False
    own: list = field(default_factory=list)  # each judged token's log-probability in its own context
    judged: Optional[float] = None     # the full copy's mean log-probability of it (where judged)

    def __post_init__(self):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, model, recent: Sequence[int], rng, temperature: float, top_p: float, penalty: float,
             last_n: int, stop: Sequence[str], n_ctx: int) -> None:
        """Decode one more token (or end: the model's end of turn, a full context, a stop string)."""
        logits = self.logits
        if penalty != 1.0 and last_n:
            logits = penalize(logits, (list(recent) + self.tokens)[-last_n:], penalty)
        tok = sample(logits, temperature, top_p, rng)
        if self.how:  # a draft that may be judged: how sure its own context was (reported beside the judge's)
            self.own.append(float(log_softmax(self.logits)[tok]))
        if model.is_eog(tok):
            self.end, self.done = tok, True
            return
        if int(self.ctx.kv_info().used_base) + 1 > n_ctx:  # cannot happen: the answer's cells were reserved
            self.done = True
            return
        self.ctx.decode([tok])
        self.tokens.append(tok)
        self.logits = self.ctx.logits()
        self.text += self._utf8.decode(model.token_bytes(tok))
        hit = next((s for s in stop if s in self.text), None)
        if hit:
            self.text, self.done = self.text[: self.text.index(hit)], True

    def finish(self) -> None:
        """Flush the UTF-8 decoder (the answer's last, possibly incomplete, character)."""
        self.text += self._utf8.decode(b"", final=True)

    def judged_tokens(self) -> list[int]:
        """The tokens the full copy judges: the answer and the end-of-turn token that ended it."""
        return self.tokens + ([] if self.end is None else [self.end])


def step_all(drafts: Sequence[Draft], *step_args) -> bool:
    """One more token in every draft still decoding (:meth:`Draft.step`'s arguments); False when
    none was."""
    live = [d for d in drafts if not d.done]
    for d in live:
        d.step(*step_args)
    return bool(live)


def settle(drafts: Sequence[Draft], full_copy, logits: np.ndarray, max_tokens: int, *step_args) -> Draft:
    """Decode every draft to its end (at most `max_tokens` tokens) and return the one `keep` keeps:
    the choice made before any of the answer is shown (pyasl.Llama, which then decodes it itself)."""
    for _ in range(max_tokens):
        if not step_all(drafts, *step_args):
            break
    for d in drafts:
        d.finish()
    return keep(drafts, full_copy, logits)


def agreed(drafts: Sequence[Draft], hold: int) -> int:
    """How much text every draft has in common and will not take back: a draft still decoding
    keeps its last `hold` characters back (the start of a stop string)."""
    common = len(os.path.commonprefix([d.text for d in drafts]))
    for d in drafts:
        if not d.done:
            common = min(common, len(d.text) - hold)
    return max(0, common)


def loops(draft: Draft) -> bool:
    """The draft ran out of tokens repeating itself: no end of turn, and its last LOOP_TOKENS tokens
    repeat a period of at most LOOP_PERIOD tokens (a number ending in many zeros is followed by the end of
    the turn, so it is not one)."""
    tail = draft.tokens[-LOOP_TOKENS:]
    if draft.end is not None or len(tail) < LOOP_TOKENS:
        return False
    return any(all(t == tail[i % p] for i, t in enumerate(tail)) for p in range(1, LOOP_PERIOD + 1))


def keep(drafts: Sequence[Draft], full_copy, logits: np.ndarray) -> Draft:
    """The first draft (the kept tokens prefilled again), unless another one is likelier both to the
    full copy (`logits`: its last token's) and in its own context than every other draft: the mean
    log-probability of its tokens with the end-of-turn token that ended it. The same tokens: no judging.
    Drafts that loop take part only when all do (a loop is likely, not an answer)."""
    if len({tuple(d.judged_tokens()) for d in drafts}) == 1:
        return drafts[0]
    drafts = [d for d in drafts if not loops(d)] or list(drafts)
    if len(drafts) == 1:
        return drafts[0]
    for d in drafts:
        d.judged = float(np.mean(full_copy.log_likelihood(d.judged_tokens(), logits))) if d.judged_tokens() else -np.inf
    by_copy = int(np.argmax([d.judged for d in drafts]))
    by_own = int(np.argmax([np.mean(d.own) if d.own else -np.inf for d in drafts]))
    return drafts[by_copy] if by_copy == by_own else drafts[0]


def report(drafts: Sequence[Draft], chosen: Draft) -> list[dict]:
    """The candidates of a judged answer: which context, the text, the full copy's mean log-probability
    (none where it was not asked), the drafts' own (for measuring other ways of choosing), whether it
    loops and which one was kept."""
    return [{"how": d.how, "text": d.text, "judged": d.judged if d.judged is not None and np.isfinite(d.judged) else None,
             "own": float(np.mean(d.own)) if d.own else None, "loops": loops(d), "kept": d is chosen} for d in drafts]
