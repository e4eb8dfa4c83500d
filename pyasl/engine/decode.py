"""Greedy decoding from a pruned (or full) context."""
from __future__ import annotations

import codecs
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .context import Context
from .model import Model


@dataclass
class Decoded:
    tokens: list[int]
    text: str
    seconds: float
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        steps = max(0, len(self.tokens) - 1)
        return steps / self.seconds if self.seconds > 0 and steps else 0.0


def greedy_decode(model: Model, ctx: Context, first_logits: np.ndarray, max_tokens: int, ignore_eos: bool = False,
                  on_text: Optional[Callable[[str], None]] = None) -> Decoded:
    """Greedy decode from `first_logits` (the last prompt token's), appending to ctx; stops at an
    end-of-generation token (unless ignore_eos), after max_tokens, or when the context is full."""
    out: list[int] = []
    note = ""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text_parts: list[str] = []
    logits = first_logits
    t0 = time.perf_counter()
    for i in range(max_tokens):
        if not np.all(np.isfinite(logits)):
            raise RuntimeError("the model produced NaN or infinite logits (corrupt weights or hyper-parameters "
                               f"in {model.path.name}?); no text generated from them")
        tok = int(np.argmax(logits))
        if model.is_eog(tok) and not ignore_eos:
            break
        out.append(tok)
        piece = dec.decode(model.token_bytes(tok))
        if piece:
            text_parts.append(piece)
            if on_text:
                on_text(piece)
        if i == max_tokens - 1:
            break
        if ctx.n_past >= ctx.n_ctx and not ctx._has_room(1):
            note = "context full, generation stopped"
            break
        ctx.decode([tok])
        logits = ctx.logits()
    tail = dec.decode(b"", final=True)
    if tail:
        text_parts.append(tail)
        if on_text:
            on_text(tail)
    return Decoded(tokens=out, text="".join(text_parts), seconds=time.perf_counter() - t0, note=note)
