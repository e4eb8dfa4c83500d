"""A session's errors and the records it keeps (statistics, the documents' base state), shared by
the session and its files."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


_RECENT_MAX = 4096  # tokens remembered for the repetition penalty
_SLACK = 8  # cells kept free after an answer, so the next turn always has room to be scored


class ContextFullError(RuntimeError):
    """A turn does not fit into the session's context and the policy does not prune."""


class SessionFileError(ValueError):
    """A session file is unreadable, or was saved with another model."""


@dataclass
class _Base:
    """The prefilled documents' pruned cache, restored by :meth:`Session.reset`."""
    state: bytes
    n_past: int
    text: str
    struct: list
    layer_cells: Optional[list] = None  # per-layer budgets in force (zigzag, pyramid)
    pos_shift: int = 0                  # positions given back by then (tokens seen - n_past)


@dataclass
class _Stats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    prefill_kept: int = 0
    selected_layers: list = field(default_factory=list)  # one entry per pruning (prefill, then re-prunes)
    reprunes: int = 0
    questions_selected: int = 0  # per-question mode: selections made for a question
    answers_from: dict = field(default_factory=dict)  # reprefill="choose": answers kept from each decode context
    last_candidates: list = field(default_factory=list)  # reprefill="choose": the latest answer's candidates
    notes: list = field(default_factory=list)
    renumbers: int = 0       # times the positions were renumbered (see Session._bound_positions)
    turns: int = 0
    decode_tokens: int = 0
    decode_s: float = 0.0
    last_decode_tokens: int = 0
    last_decode_s: float = 0.0

    def note(self, text: str) -> None:
        """Add a note unless the session has said it already."""
        if text not in self.notes:
            self.notes.append(text)
