"""Span-aware top-k: keep whole values, not the tokens where they start.

The observation window attends to where an answer *starts* (the first digits of a code, the key of
a key-value pair); the tokens that continue it get little attention of their own. Token-level
top-k then keeps the head of a value and drops its tail, and the model, which found the right
entry, invents the rest ("8b9b03b6-ba5f-..." comes back as "8b9b9b9b..."). A span stage turns
per-position scores into kept positions in contiguous pieces instead. It composes with every
policy: each one computes its (pooled) scores as before and asks :meth:`Spans.top_k` for the
``k`` positions to keep, per layer and KV head or shared by all of them.

Modes (``Spans.parse`` reads ``token``, ``forward:S``, ``around:B+S``, ``chunk:C``):

* ``token`` -- plain top-k (ties to the lower position): the selection SnapKV, ASL, FastKV and
  GemFilter publish.
* ``forward:S`` -- every position's score is raised to the best score of itself and the ``S - 1``
  positions before it, then plain top-k. What follows an attended token inherits its score, so a
  kept token brings the ``S - 1`` tokens after it (ties go to the lower position, so a span that
  does not fit whole keeps its head).
* ``around:B+S`` -- ``forward:S`` that also reaches back: a position inherits the best score of the
  ``S - 1`` positions before it and of the ``B`` after it, so a kept token brings the ``B`` tokens
  before it as well (the words that name a value: ``The secret code of the Accra project is`` comes
  with ``beacon-471`` when the attention peaks on the code). ``around:0+S`` is ``forward:S``.
* ``chunk:C`` -- ChunkKV (arXiv 2502.00299): the positions are cut into chunks of ``C`` (the last
  one may be shorter), a chunk scores the mean of its positions, and whole chunks are kept in score
  order; the last one that does not fit keeps its first positions.

Every policy object and rule function uses :data:`DEFAULT_SPAN` unless given one; ``token`` is
the rules as published.

Size 1 is plain top-k in every mode. The budget stays a hard cap: ``top_k`` returns exactly ``k``
positions. The callers keep the observation window outside the scored prefix, and the attention
sinks (the first positions, attended by every query) come first in any mode.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["DEFAULT_SPAN", "SPAN_MODES", "Spans", "TOKEN", "runs"]

SPAN_MODES = ("token", "forward", "around", "chunk")
DEFAULT_SPAN = "forward:32"  # what every policy uses unless told otherwise (measured: docs/BENCHMARKS.md, "Spans")


@dataclass(frozen=True)
class Spans:
    """How scores become kept positions: ``mode`` (``SPAN_MODES``), ``size`` (tokens) and, for
    ``around``, ``before`` (the tokens a kept token brings before it)."""

    mode: str = "token"
    size: int = 1
    before: int = 0

    def __post_init__(self):
        if self.mode not in SPAN_MODES:
            raise ValueError(f"span mode must be one of {', '.join(SPAN_MODES)}, got {self.mode!r}")
        size, before = _integer(self.size, "size"), _integer(self.before, "reach before")
        if self.mode == "token" and size != 1:
            raise ValueError(f"span mode token has size 1, got {size}")
        if not 1 <= size <= 4096:
            raise ValueError(f"span size must be in 1..4096, got {size}")
        object.__setattr__(self, "size", size)
        if self.mode != "around" and before:
            raise ValueError(f"only span mode around reaches before a kept token, got {self.mode} with {before}")
        if not 0 <= before <= 4096:
            raise ValueError(f"span reach before must be in 0..4096, got {before}")
        object.__setattr__(self, "before", before)

    @classmethod
    def parse(cls, spec) -> "Spans":
        """A Spans from ``None`` (:data:`DEFAULT_SPAN`), a Spans, or text: ``token``, ``forward:S``,
        ``around:B+S``, ``chunk:C``."""
        if spec is None:
            spec = DEFAULT_SPAN
        if isinstance(spec, Spans):
            return spec
        if not isinstance(spec, str):
            raise ValueError(f"a span is written token, forward:S, around:B+S or chunk:C, got {spec!r}")
        text = spec.strip().lower()
        mode, sep, size = text.partition(":")
        if mode == "token" and not sep:
            return TOKEN
        before = "0"
        if mode == "around":
            before, plus, size = size.partition("+")
            if not plus or not before.strip().isdigit():
                size = ""  # malformed: refused below
        if mode not in SPAN_MODES or not sep or not size.strip().isdigit():
            raise ValueError("a span is written token, forward:S, around:B+S or chunk:C (B, S, C: tokens), "
                             f"got {spec!r}")
        return cls(mode, int(size), int(before))

    def __str__(self) -> str:
        if self.mode == "around":
            return f"around:{self.before}+{self.size}"
        return "token" if self.mode == "token" else f"{self.mode}:{self.size}"

    @property
    def is_token(self) -> bool:
        """Whether this is plain token-level top-k (size 1 in any mode, nothing reached before)."""
        return self.size == 1 and self.before == 0

    def spread(self, scores) -> np.ndarray:
        """``forward`` and ``around`` scores: each position gets the max of itself, the ``size - 1``
        before it and the ``before`` after it (float64, same shape). ``chunk`` and ``token`` return
        the scores as float64."""
        arr = np.asarray(scores, dtype=np.float64)
        width = self.size + self.before
        if self.mode not in ("forward", "around") or width == 1 or arr.shape[-1] == 0:
            return arr.copy()
        widths = [(0, 0)] * (arr.ndim - 1) + [(self.size - 1, self.before)]
        padded = np.pad(arr, widths, constant_values=-np.inf)
        return sliding_window_view(padded, width, axis=-1).max(axis=-1)

    def top_k(self, scores, k: int) -> np.ndarray:
        """The ``k`` positions to keep along the last axis of ``scores`` (``(n,)`` or ``(rows, n)``):
        sorted int64, shape ``(..., k)``. ``k`` must be in ``0..n``."""
        arr = np.asarray(scores, dtype=np.float64)
        if arr.ndim not in (1, 2):
            raise ValueError(f"scores must be (n,) or (rows, n), got shape {arr.shape}")
        n = arr.shape[-1]
        k = operator.index(k)
        if not 0 <= k <= n:
            raise ValueError(f"k must be in 0..{n}, got {k}")
        if self.mode == "chunk" and self.size > 1:
            order = _chunk_order(arr, self.size)
        else:
            order = np.argsort(-self.spread(arr), axis=-1, kind="stable")
        return np.sort(order[..., :k], axis=-1).astype(np.int64)


def _integer(value, what: str) -> int:
    """`value` as an int (numpy integers too; not bools or floats), else a ValueError naming `what`."""
    if isinstance(value, bool):
        raise ValueError(f"span {what} must be an integer, got {value!r}")
    try:
        return int(operator.index(value))
    except TypeError:
        raise ValueError(f"span {what} must be an integer, got {value!r}") from None


TOKEN = Spans()


def _chunk_order(arr: np.ndarray, c: int) -> np.ndarray:
    """Positions ordered by their chunk's mean score (best first, ties to the earlier chunk), in
    position order inside a chunk."""
    n = arr.shape[-1]
    n_chunks = -(-n // c)
    pad = n_chunks * c - n
    rows = arr.reshape(-1, n)
    padded = np.pad(rows, [(0, 0), (0, pad)])
    sums = padded.reshape(rows.shape[0], n_chunks, c).sum(axis=-1)
    lengths = np.full(n_chunks, c, dtype=np.float64)
    lengths[-1] = c - pad
    chunk_rank = np.argsort(-(sums / lengths), axis=-1, kind="stable")      # (rows, n_chunks)
    pos = chunk_rank[:, :, None] * c + np.arange(c)                         # (rows, n_chunks, c)
    pos = pos.reshape(rows.shape[0], -1)
    if pad:  # every row holds the same `pad` positions >= n (the last chunk's padding)
        pos = pos[pos < n].reshape(rows.shape[0], n)
    return pos.reshape(arr.shape[:-1] + (n,))


def runs(positions) -> list[list[int]]:
    """Sorted positions as ``[first, last]`` runs of consecutive positions (what a span kept)."""
    p = np.unique(np.asarray(positions, dtype=np.int64).ravel())
    if p.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(p) != 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [p.size - 1]])
    return [[int(p[a]), int(p[b])] for a, b in zip(starts, ends)]
