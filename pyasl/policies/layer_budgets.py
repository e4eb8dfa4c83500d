"""Per-layer KV budgets: ZigZagKV (layer uncertainty), PyramidKV, uniform; alone or under ASL.

The budget schedules are pure numpy (:func:`zigzag_budgets`, :func:`pyramid_budgets`,
:func:`uniform_budgets`, :func:`layer_budgets`); :func:`budget_selection` turns a schedule into
per-layer token sets, which the engine applies to a context that holds the full prompt KV
(engine.prefill.apply_selection): inside layer ``l`` every KV head keeps its SnapKV top
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
from typing import Optional

import numpy as np

from . import scoring as P
from .base import Policy, Selection, register_policy
from .snapkv_rule import snapkv_select

__all__ = [
    "BUDGET_METHODS",
    "Pyramid",
    "ZigZag",
    "allocate",
    "budget_options",
    "budget_selection",
    "inspect_budgets",
    "layer_budgets",
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
    return P._check_unit("theta", theta)


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
# token sets
# ---------------------------------------------------------------------------

def per_layer_sets(scores, budgets, window: int, n_head_kv: int, kernel: int = 7,
                   shared=None, n_layer: Optional[int] = None, span=None) -> list[np.ndarray]:
    """Per-layer, per-KV-head token sets: ``(n_head_kv, budgets[l])`` SnapKV top-k plus the window for
    every layer of ``scores``; with ``shared`` (sorted positions), layers ``len(scores) .. n_layer - 1``
    all keep ``shared`` in every head. ``span``: the span stage of the top-k (pyasl.policies.spans)."""
    arr = P._check_scores(scores, (3,), "scores (n_layer, n_head, n_prompt)")
    b = np.asarray(budgets)
    if b.shape != (arr.shape[0],):
        raise ValueError(f"need one budget per scored layer ({arr.shape[0]}), got shape {b.shape}")
    sets = [snapkv_select(arr[l], window, int(b[l]), n_head_kv, kernel=kernel, span=span)
            for l in range(arr.shape[0])]
    n_layer = arr.shape[0] if n_layer is None else int(n_layer)
    if n_layer > arr.shape[0]:
        if shared is None:
            raise ValueError(f"layers {arr.shape[0]}..{n_layer - 1} have no scores and no shared set")
        s = np.asarray(shared, dtype=np.int64)
        sets += [np.broadcast_to(s, (n_head_kv, s.size))] * (n_layer - arr.shape[0])
    return sets


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


# ---------------------------------------------------------------------------
# options, selections and the policies
# ---------------------------------------------------------------------------

def budget_options(theta=DEFAULT_THETA, b_min_frac=DEFAULT_B_MIN_FRAC, beta=DEFAULT_BETA) -> dict:
    """The schedule options, checked: theta (zigzag), b_min_frac (zigzag), beta (pyramid)."""
    theta = _check_theta(theta)
    zigzag_min_budget(1, 0, b_min_frac)
    pyramid_budgets(1, 2, beta=beta)
    return {"theta": theta, "b_min_frac": float(b_min_frac), "beta": float(beta)}


def check_method(method) -> str:
    if method not in BUDGET_METHODS:
        raise ValueError(f"unknown layer-budget method {method!r}; choose one of {', '.join(BUDGET_METHODS)}")
    return method


def budget_selection(scores, method: str, b_avg: int, window: int, model, kernel: int = 7, span=None,
                     shared=None, opts: Optional[dict] = None, visible=None) -> Selection:
    """Per-layer budgets by ``method`` for the layers of ``scores`` (``(n_sel, n_head, n)``), each
    keeping its SnapKV top-k per KV head; with ``shared``, layers ``n_sel ..`` keep that set.

    ``visible`` (``(n_sel, n)`` bools, optional): the positions each layer can still see (a cache
    already pruned to per-layer budgets hides the other layers' rows from it): a layer chooses among
    those only, and its budget is capped at their number."""
    arr = P._check_scores(scores, (3,), "scores (n_layer, n_head, n_prompt)")
    o = opts or {}
    b, info = layer_budgets(method, arr, window, b_avg, **o)
    if visible is None:
        sets = per_layer_sets(arr, b, window, model.n_head_kv, kernel=kernel, shared=shared, n_layer=model.n_layer,
                              span=span)
    else:
        sets = []
        for l in range(arr.shape[0]):
            idx = np.flatnonzero(visible[l])
            k = int(min(b[l], idx.size))
            sets.append(idx[snapkv_select(arr[l][:, idx], window, k, model.n_head_kv, kernel=kernel, span=span)]
                        if k < idx.size else np.broadcast_to(idx, (model.n_head_kv, idx.size)))
    info["budgets"] = [int(x.shape[-1]) for x in sets]
    if arr.shape[0] < model.n_layer:
        info["shared_from_layer"] = int(arr.shape[0])
    return Selection(per_layer=sets, budgets=info)


class EarlyLayerBudgets:
    """Mixin for layer-major policies (ASL, FastKV): ``layer_budgets`` (zigzag, pyramid, uniform;
    ``theta``, ``b_min_frac``, ``beta``) gives the layers up to the selection layer per-layer
    budgets of average ``budget`` instead of SnapKV's uniform one; the later layers keep the
    policy's shared set."""

    layer_budgets: Optional[str] = None

    def _init_budgets(self, layer_budgets, theta, b_min_frac, beta) -> None:
        self.layer_budgets = None if layer_budgets is None else check_method(layer_budgets)
        self.budget_opts = budget_options(theta=theta, b_min_frac=b_min_frac, beta=beta)

    def _budget_params(self) -> dict:
        return {"layer_budgets": self.layer_budgets, **self.budget_opts} if self.layer_budgets else {}

    def _check_budget_model(self, model) -> None:
        if self.layer_budgets and model.n_swa > 0:
            raise ValueError("per-layer budgets are not supported on sliding-window models (their caches use "
                             "separate masks); use snapkv or asl")

    def streams_early_layers(self, model) -> bool:
        return not self.layer_budgets and super().streams_early_layers(model)  # budgets rank every layer at once

    def early_layers(self, scores, kept, model, window=None) -> Selection:
        if not self.layer_budgets:
            return super().early_layers(scores, kept, model, window)
        self._check_budget_model(model)
        return budget_selection(scores, self.layer_budgets, self.budget, self.window if window is None else window,
                                model, kernel=self.kernel, span=self.span, shared=np.asarray(kept),
                                opts=self.budget_opts)


class _LayerBudgetPolicy(Policy):
    """Every layer keeps its own budget (average ``budget``: the same total as SnapKV), SnapKV per KV
    head inside it; ordinary prefill. Not for sliding-window models."""

    method: str = "?"

    def per_head(self, model) -> bool:
        return True

    def check_model(self, model) -> None:
        super().check_model(model)
        if model.n_swa > 0:
            raise ValueError("per-layer budgets are not supported on sliding-window models (their caches use separate "
                             "masks); use snapkv or asl")

    def select(self, scores, window, model, layer_mask=None, visible=None) -> Selection:
        return budget_selection(scores, self.method, self.budget, window, model, kernel=self.kernel, span=self.span,
                                opts=self._opts(), visible=visible)

    def _opts(self) -> dict:
        raise NotImplementedError


@register_policy
class ZigZag(_LayerBudgetPolicy):
    """ZigZagKV (arXiv 2412.09036): layer budgets from layer uncertainty (``theta``, ``b_min_frac``)."""

    name = method = "zigzag"

    def __init__(self, budget: int = 512, window: int = 32, kernel: int = 7, span=None, theta: float = DEFAULT_THETA,
                 b_min_frac: float = DEFAULT_B_MIN_FRAC):
        super().__init__(budget=budget, window=window, kernel=kernel, span=span)
        o = budget_options(theta=theta, b_min_frac=b_min_frac)
        self.theta, self.b_min_frac = o["theta"], o["b_min_frac"]

    def params(self) -> dict:
        return {**super().params(), "theta": self.theta, "b_min_frac": self.b_min_frac}

    def _opts(self) -> dict:
        return {"theta": self.theta, "b_min_frac": self.b_min_frac}


@register_policy
class Pyramid(_LayerBudgetPolicy):
    """PyramidKV: budgets decreasing arithmetically from the bottom layer to the top (``beta``)."""

    name = method = "pyramid"

    def __init__(self, budget: int = 512, window: int = 32, kernel: int = 7, span=None, beta: float = DEFAULT_BETA):
        super().__init__(budget=budget, window=window, kernel=kernel, span=span)
        self.beta = budget_options(beta=beta)["beta"]

    def params(self) -> dict:
        return {**super().params(), "beta": self.beta}

    def _opts(self) -> dict:
        return {"beta": self.beta}
