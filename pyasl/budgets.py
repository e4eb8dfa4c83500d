"""Per-layer KV budgets: ZigZagKV (layer uncertainty), PyramidKV, uniform; alone or under ASL.

The budget schedules are pure numpy (:func:`zigzag_budgets`, :func:`pyramid_budgets`,
:func:`uniform_budgets`, :func:`layer_budgets`). :func:`apply_layer_budgets` applies a schedule to
a context that holds the full prompt KV: inside layer ``l`` every KV head keeps its SnapKV top
``B_l - window`` prefix positions plus the window (``policies.snapkv_select``), packed into cells
``0 .. B_l - 1``; the cache keeps ``P = max_l B_l`` prompt cells and layer ``l`` attends only to its
first ``B_l`` of them (per-layer masks, patches/0004) plus every token decoded afterwards.

Budgets count every kept token of a layer, the window included. A schedule keeps the total
``n_layer * b_avg`` exactly after rounding (largest remainder), each layer between its lower
bound and ``n_prompt``.

ZigZagKV (arXiv 2412.09036): for layer ``l`` let ``a_l`` be the window attention summed over the
window queries and averaged over heads, and ``LMBA_l`` the smallest number of top positions whose
``a_l`` mass reaches ``theta`` of the layer's total. With ``U_l = LMBA_l / sum_k LMBA_k``:
``B_l = B_min + (b_avg - B_min) * n_layer * U_l``, ``B_min = b_min_frac * b_avg``.

PyramidKV: an arithmetic schedule from the bottom layer (largest) to the top (smallest). With
``k = b_avg - window`` the top layer keeps ``k / beta`` prefix tokens, the bottom ``2k - k / beta``.
``beta = 1`` gives uniform budgets.

Lower bound: a layer keeps at least ``window + 1`` tokens (the window is always kept and at least one
prefix token is chosen); ZigZagKV's ``B_min`` is ``max(ceil(b_min_frac * b_avg), window + 1)``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import policies as P

__all__ = [
    "BUDGET_METHODS",
    "LayerBudgets",
    "allocate",
    "apply_layer_budgets",
    "check_budget_options",
    "inspect_budgets",
    "kv_bytes",
    "layer_budgets",
    "move_to_context",
    "per_layer_sets",
    "pyramid_budgets",
    "uniform_budgets",
    "zigzag_budgets",
    "zigzag_lmba",
    "zigzag_min_budget",
]

BUDGET_METHODS = ("zigzag", "pyramid", "uniform")
DEFAULT_THETA = 0.9
DEFAULT_B_MIN_FRAC = 0.2
DEFAULT_BETA = 20.0


# ---------------------------------------------------------------------------
# exact integer allocation
# ---------------------------------------------------------------------------

def allocate(target, total: int, lo: int, hi: int) -> np.ndarray:
    """Integers ``B`` with ``sum(B) == total`` and ``lo <= B_l <= hi``, following real ``target``.

    The amount above ``lo`` (``total - n * lo``) is shared in proportion to ``max(target_l - lo, 0)``
    (equally when every weight is 0); a layer that would pass ``hi`` is held at ``hi`` and the rest
    is shared again among the others. When every target lies in ``[lo, hi]`` and the targets sum
    to ``total`` this returns the targets themselves, rounded by largest remainder (ties to the
    lower layer index).
    """
    t = np.asarray(target, dtype=np.float64)
    if t.ndim != 1 or t.size == 0:
        raise ValueError(f"target must be a non-empty 1-D array, got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError("target contains NaN or infinite values")
    total, lo, hi = P._as_int("total", total), P._as_int("lo", lo), P._as_int("hi", hi)
    n = t.size
    if lo < 0 or hi < lo:
        raise ValueError(f"need 0 <= lo <= hi, got lo={lo}, hi={hi}")
    if not n * lo <= total <= n * hi:
        raise ValueError(f"cannot split {total} over {n} layers with each between {lo} and {hi}")
    w = np.maximum(t - lo, 0.0)
    cap = float(hi - lo)
    extra = np.zeros(n)
    free = np.ones(n, dtype=bool)
    remaining = float(total - n * lo)
    while free.any():
        wf = w[free]
        share = remaining * (wf / wf.sum() if wf.sum() > 0 else np.full(wf.size, 1.0 / wf.size))
        over = share > cap
        if not over.any():
            extra[free] = share
            break
        idx = np.flatnonzero(free)[over]
        extra[idx] = cap
        free[idx] = False
        remaining -= cap * idx.size
    real = lo + extra
    out = np.clip(np.floor(real + 1e-9), lo, hi).astype(np.int64)
    rem = real - out
    deficit = total - int(out.sum())
    if deficit > 0:
        for i in sorted(range(n), key=lambda j: (-rem[j], j)):
            if deficit == 0:
                break
            if out[i] < hi:
                out[i] += 1
                deficit -= 1
    elif deficit < 0:
        for i in sorted(range(n), key=lambda j: (rem[j], j)):
            if deficit == 0:
                break
            if out[i] > lo:
                out[i] -= 1
                deficit += 1
    if deficit != 0 or out.sum() != total:  # pragma: no cover - guarded by the bounds check
        raise ValueError("internal: budget rounding failed")
    return out


# ---------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------

def _check_b_avg(b_avg, window: int, n_prompt: Optional[int]) -> int:
    b_avg = P._as_int("b_avg", b_avg)
    if b_avg <= window:
        raise ValueError(f"the average budget must exceed the window (the window is always kept): "
                         f"b_avg={b_avg}, window={window}")
    if n_prompt is not None and b_avg > n_prompt:
        raise ValueError(f"the average budget {b_avg} is larger than the prompt ({n_prompt} tokens)")
    return b_avg


def zigzag_lmba(scores, theta: float = DEFAULT_THETA) -> np.ndarray:
    """LMBA per layer: the smallest number of top positions whose window attention (summed over the
    window queries, averaged over heads) reaches ``theta`` of the layer's total.

    ``scores``: ``(n_layer, n_head, n_prompt)`` or ``(n_layer, n_prompt)`` (already one row per layer).
    Returns int64 ``(n_layer,)``, each in ``1 .. n_prompt``.
    """
    arr = P._check_scores(scores, (2, 3), "scores (n_layer, n_head, n_prompt) or (n_layer, n_prompt)")
    theta = _check_theta(theta)
    if np.any(arr < 0):
        raise ValueError("scores must be non-negative attention weights")
    a = arr.astype(np.float64).mean(axis=1) if arr.ndim == 3 else arr.astype(np.float64)
    out = np.empty(a.shape[0], dtype=np.int64)
    for l in range(a.shape[0]):
        row = np.sort(a[l])[::-1]
        cs = np.cumsum(row)
        if cs[-1] <= 0:
            raise ValueError(f"layer {l} has no attention mass (all scores are 0)")
        # a relative tolerance so that theta = 1 reaches the total despite rounding
        out[l] = min(int(np.searchsorted(cs, theta * cs[-1] * (1 - 1e-12), side="left")) + 1, row.size)
    return out


def _check_theta(theta) -> float:
    try:
        theta = float(theta)
    except (TypeError, ValueError):
        raise ValueError(f"theta must be a number, got {theta!r}") from None
    if not 0.0 < theta <= 1.0:
        raise ValueError(f"theta must satisfy 0 < theta <= 1, got {theta}")
    return theta


def zigzag_min_budget(b_avg: int, window: int, b_min_frac: float = DEFAULT_B_MIN_FRAC) -> int:
    """ZigZagKV's B_min as used here: max(ceil(b_min_frac * b_avg), window + 1)."""
    try:
        b_min_frac = float(b_min_frac)
    except (TypeError, ValueError):
        raise ValueError(f"b_min_frac must be a number, got {b_min_frac!r}") from None
    if not 0.0 <= b_min_frac <= 1.0:
        raise ValueError(f"b_min_frac must satisfy 0 <= b_min_frac <= 1, got {b_min_frac}")
    return max(int(math.ceil(b_min_frac * b_avg - 1e-9)), window + 1)


def zigzag_budgets(scores, window: int, b_avg: int, theta: float = DEFAULT_THETA,
                   b_min_frac: float = DEFAULT_B_MIN_FRAC) -> np.ndarray:
    """ZigZagKV per-layer budgets from the window scores ``(n_layer, n_head, n_prompt)``.

    ``B_l = B_min + (b_avg - B_min) * n_layer * U_l`` with ``U_l = LMBA_l / sum_k LMBA_k``
    (:func:`zigzag_lmba`) and ``B_min = max(ceil(b_min_frac * b_avg), window + 1)``; rounded by
    largest remainder so that the budgets sum to ``n_layer * b_avg``; each ``<= n_prompt`` (the
    excess of a capped layer is shared by the others in proportion to their ``U_l``).
    Returns int64 ``(n_layer,)``.
    """
    arr = P._check_scores(scores, (2, 3), "scores (n_layer, n_head, n_prompt) or (n_layer, n_prompt)")
    n_layer, n_prompt = arr.shape[0], arr.shape[-1]
    window = P._as_int("window", window)
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    b_avg = _check_b_avg(b_avg, window, n_prompt)
    b_min = zigzag_min_budget(b_avg, window, b_min_frac)
    lmba = zigzag_lmba(arr, theta)
    u = lmba / lmba.sum()
    target = b_min + (b_avg - b_min) * n_layer * u
    return allocate(target, n_layer * b_avg, b_min, n_prompt)


def pyramid_budgets(n_layer: int, b_avg: int, beta: float = DEFAULT_BETA, window: int = 0,
                    n_prompt: Optional[int] = None) -> np.ndarray:
    """PyramidKV budgets: arithmetic from layer 0 (largest) to layer ``n_layer - 1`` (smallest).

    With ``k = b_avg - window``: the top layer keeps ``window + k / beta``, the bottom
    ``window + 2k - k / beta`` (``beta >= 1``; 1 = uniform); rounded by largest remainder to sum to
    ``n_layer * b_avg``, each between ``window + 1`` and ``n_prompt`` (when given).
    Returns int64 ``(n_layer,)``.
    """
    n_layer = P._as_int("n_layer", n_layer)
    if n_layer < 1:
        raise ValueError(f"n_layer must be >= 1, got {n_layer}")
    window = P._as_int("window", window)
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    b_avg = _check_b_avg(b_avg, window, n_prompt)
    try:
        beta = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f"beta must be a number, got {beta!r}") from None
    if not (math.isfinite(beta) and beta >= 1.0):
        raise ValueError(f"beta must be >= 1 (1 = uniform budgets), got {beta}")
    k = float(b_avg - window)
    k_min = k / beta
    k_max = 2.0 * k - k_min
    if n_layer == 1:
        target = np.array([float(b_avg)])
    else:
        target = window + k_max - np.arange(n_layer) * (k_max - k_min) / (n_layer - 1)
    hi = n_prompt if n_prompt is not None else n_layer * b_avg
    return allocate(target, n_layer * b_avg, window + 1, hi)


def uniform_budgets(n_layer: int, b_avg: int) -> np.ndarray:
    n_layer = P._as_int("n_layer", n_layer)
    if n_layer < 1:
        raise ValueError(f"n_layer must be >= 1, got {n_layer}")
    return np.full(n_layer, P._as_int("b_avg", b_avg), dtype=np.int64)


def layer_budgets(method: str, scores, window: int, b_avg: int, theta: float = DEFAULT_THETA,
                  b_min_frac: float = DEFAULT_B_MIN_FRAC, beta: float = DEFAULT_BETA) -> tuple[np.ndarray, dict]:
    """Budgets of every layer of ``scores`` by ``method`` (zigzag, pyramid, uniform), and a JSON
    description ``{"method", "b_avg", ...}`` of the parameters used."""
    arr = P._check_scores(scores, (2, 3), "scores (n_layer, n_head, n_prompt) or (n_layer, n_prompt)")
    n_layer, n_prompt = arr.shape[0], arr.shape[-1]
    info: dict = {"method": method, "b_avg": int(b_avg)}
    if method == "zigzag":
        b = zigzag_budgets(arr, window, b_avg, theta=theta, b_min_frac=b_min_frac)
        info.update(theta=float(theta), b_min_frac=float(b_min_frac),
                    b_min=zigzag_min_budget(int(b_avg), int(window), b_min_frac),
                    lmba=[int(x) for x in zigzag_lmba(arr, theta)])
    elif method == "pyramid":
        b = pyramid_budgets(n_layer, b_avg, beta=beta, window=window, n_prompt=n_prompt)
        info.update(beta=float(beta))
    elif method == "uniform":
        _check_b_avg(b_avg, P._as_int("window", window), n_prompt)
        b = uniform_budgets(n_layer, b_avg)
    else:
        raise ValueError(f"unknown layer-budget method {method!r}; choose one of {', '.join(BUDGET_METHODS)}")
    return b, info


# ---------------------------------------------------------------------------
# token sets and compaction
# ---------------------------------------------------------------------------

def per_layer_sets(scores, budgets, window: int, n_head_kv: int, kernel: int = 7,
                   shared=None, n_layer: Optional[int] = None, span=None) -> list[np.ndarray]:
    """Per-layer, per-KV-head token sets: ``(n_head_kv, budgets[l])`` SnapKV top-k plus the window for
    every layer of ``scores``; with ``shared`` (sorted positions), layers ``len(scores) .. n_layer - 1``
    all keep ``shared`` in every head. ``span``: the span stage of the top-k (pyasl.spans)."""
    arr = P._check_scores(scores, (3,), "scores (n_layer, n_head, n_prompt)")
    b = np.asarray(budgets)
    if b.shape != (arr.shape[0],):
        raise ValueError(f"need one budget per scored layer ({arr.shape[0]}), got shape {b.shape}")
    sets = [P.snapkv_select(arr[l], window, int(b[l]), n_head_kv, kernel=kernel, span=span)
            for l in range(arr.shape[0])]
    n_layer = arr.shape[0] if n_layer is None else int(n_layer)
    if n_layer > arr.shape[0]:
        if shared is None:
            raise ValueError(f"layers {arr.shape[0]}..{n_layer - 1} have no scores and no shared set")
        s = np.asarray(shared, dtype=np.int64)
        sets += [np.broadcast_to(s, (n_head_kv, s.size))] * (n_layer - arr.shape[0])
    return sets


@dataclass
class LayerBudgets:
    """Per-layer budgets applied to a context (see :func:`apply_layer_budgets`)."""

    counts: np.ndarray           # (n_layer,) tokens kept per layer (the layer's budget)
    prompt_cells: int            # P = max(counts): prompt cells every layer's cache holds
    meta: np.ndarray             # (P,) positions of the P cells' metadata (for set_kv_layer_cells)
    info: dict = field(default_factory=dict)  # method and parameters
    shared_from: Optional[int] = None         # first layer holding the shared (ASL) set, if any
    select_s: float = 0.0
    compact_s: float = 0.0

    def to_json(self, cell_bytes: Optional[np.ndarray] = None) -> dict:
        d = dict(self.info)
        d["budgets"] = [int(x) for x in self.counts]
        d["prompt_cells"] = int(self.prompt_cells)
        if self.shared_from is not None:
            d["shared_from_layer"] = int(self.shared_from)
        if cell_bytes is not None:
            d["kv_bytes_prompt_cells"] = int(self.prompt_cells * int(np.sum(cell_bytes)))
        return d


def apply_layer_budgets(ctx, scores, method: str, b_avg: int, window: int, kernel: int = 7,
                        shared=None, theta: float = DEFAULT_THETA, b_min_frac: float = DEFAULT_B_MIN_FRAC,
                        beta: float = DEFAULT_BETA, budgets=None, span=None) -> LayerBudgets:
    """Compact ``ctx`` (an engine.Context holding the full prompt KV of one sequence) to per-layer budgets.

    scores: ``(n_sel, n_head, n_prompt)`` window scores (engine.prefill(...).scores) of layers
        ``0 .. n_sel - 1``; those layers get budgets by ``method`` (zigzag, pyramid, uniform) with
        average ``b_avg`` (or the explicit ``budgets``, one per scored layer) and keep their SnapKV
        per-KV-head top-k plus the window.
    shared: sorted positions (the ASL kept set) kept by every layer ``n_sel .. n_layer - 1``; needed
        when ``n_sel < n_layer``.

    Afterwards layer ``l`` attends to ``counts[l]`` cells plus every later decoded token. The context
    keeps ``prompt_cells`` cells; to move them into a smaller context use :func:`move_to_context`.
    """
    arr = P._check_scores(scores, (3,), "scores (n_layer, n_head, n_prompt)")
    model = ctx.model
    n_sel = arr.shape[0]
    if n_sel > model.n_layer:
        raise ValueError(f"scores cover {n_sel} layers, the model has {model.n_layer}")
    t0 = time.perf_counter()
    if budgets is None:
        b, info = layer_budgets(method, arr, window, b_avg, theta=theta, b_min_frac=b_min_frac, beta=beta)
    else:
        b = np.asarray(budgets, dtype=np.int64)
        info = {"method": method, "b_avg": int(b_avg)}
    sets = per_layer_sets(arr, b, window, model.n_head_kv, kernel=kernel, shared=shared, n_layer=model.n_layer,
                          span=span)
    counts = np.array([s.shape[-1] for s in sets], dtype=np.int64)
    t1 = time.perf_counter()
    ctx.kv_keep_per_layer(sets)
    p_cells, _ = ctx.kv_layer_cells()
    meta = ctx.cell_positions(_first_cache_layer(ctx), p_cells)
    t2 = time.perf_counter()
    return LayerBudgets(counts=counts, prompt_cells=int(p_cells), meta=meta, info=info,
                        shared_from=n_sel if n_sel < model.n_layer else None, select_s=t1 - t0, compact_s=t2 - t1)


def _first_cache_layer(ctx) -> int:
    nz = np.flatnonzero(ctx.kv_layer_cell_bytes())
    return int(nz[0]) if nz.size else 0


def move_to_context(ctx, n_prompt: int, n_cells: int, **context_kwargs):
    """Move ctx's sequence into a new engine.Context of ``n_cells`` cells (padded to 256) through
    llama_state_seq_get/set, closing ``ctx``; per-layer counts are set again on the new context.
    ``context_kwargs`` go to engine.Context (n_batch, n_threads, flash_attn, ...)."""
    from .engine import Context, _pad

    p_cells, counts = ctx.kv_layer_cells()
    state = ctx.state_get()
    model = ctx.model
    ctx.close()
    new = Context(model, _pad(n_cells), **context_kwargs)
    new.state_set(state, n_past=n_prompt)
    if p_cells:
        new.set_kv_layer_cells(counts)
    return new


def kv_bytes(ctx, counts) -> int:
    """Bytes of the K/V rows the layers keep: sum_l counts[l] * (bytes of one cell of layer l)."""
    cb = ctx.kv_layer_cell_bytes()
    c = np.asarray(counts, dtype=np.int64)
    if c.shape != cb.shape:
        raise ValueError(f"need one count per layer ({cb.size}), got shape {c.shape}")
    return int(np.sum(c * cb))


def check_budget_options(model, policy: str, layer_budgets: Optional[str], budget_opts: Optional[dict]) -> dict:
    """Validate the per-layer budget arguments of engine.generate; returns the keyword options
    (theta, b_min_frac, beta) for :func:`apply_layer_budgets`."""
    opts = dict(budget_opts or {})
    unknown = set(opts) - {"theta", "b_min_frac", "beta"}
    if unknown:
        raise ValueError(f"unknown layer-budget options {sorted(unknown)}; use theta, b_min_frac, beta")
    if layer_budgets is not None:
        if layer_budgets not in BUDGET_METHODS:
            raise ValueError(f"unknown layer-budget method {layer_budgets!r}; choose one of {', '.join(BUDGET_METHODS)}")
        if policy != "asl":
            raise ValueError(f"layer budgets ({layer_budgets}) apply to policy asl only, not {policy!r} "
                             "(use --policy zigzag or --policy pyramid alone)")
    if "theta" in opts:
        opts["theta"] = _check_theta(opts["theta"])
    if "b_min_frac" in opts:
        zigzag_min_budget(1, 0, opts["b_min_frac"])
        opts["b_min_frac"] = float(opts["b_min_frac"])
    if "beta" in opts:
        pyramid_budgets(1, 2, beta=opts["beta"])
        opts["beta"] = float(opts["beta"])
    if (policy in ("zigzag", "pyramid") or layer_budgets) and getattr(model, "n_swa", 0) > 0:
        raise ValueError("per-layer budgets are not supported on sliding-window models (their caches use separate "
                         "masks); use snapkv or asl")
    return opts


def inspect_budgets(scores, method: str, b_avg: int, window: int, asl: bool = False,
                    selected_layer: Optional[int] = None, theta: float = DEFAULT_THETA,
                    b_min_frac: float = DEFAULT_B_MIN_FRAC, beta: float = DEFAULT_BETA) -> dict:
    """Per-layer budgets for ``pyasl inspect``: every layer by ``method`` (policies zigzag, pyramid);
    with ``asl``, layers ``0 .. L`` by ``method`` and ``b_avg`` for the later layers (they keep ASL's
    set), ``L`` = ``selected_layer``, else the last layer. Returns the JSON block
    ``{"method", "b_avg", "budgets", ...}``."""
    arr = P._check_scores(scores, (3,), "scores (n_layer, n_head, n_prompt)")
    n_layer, n_prompt = arr.shape[0], arr.shape[-1]
    if b_avg >= n_prompt:
        return {"method": method, "b_avg": int(b_avg), "budgets": [int(n_prompt)] * n_layer,
                "note": f"budget {b_avg} >= prompt length {n_prompt}: nothing to prune"}
    last = selected_layer if (asl and selected_layer is not None) else n_layer - 1
    b, info = layer_budgets(method, arr[: last + 1], window, b_avg, theta=theta, b_min_frac=b_min_frac, beta=beta)
    info["budgets"] = [int(x) for x in b] + [int(b_avg)] * (n_layer - last - 1)
    if last < n_layer - 1:
        info["shared_from_layer"] = last + 1
    return info
