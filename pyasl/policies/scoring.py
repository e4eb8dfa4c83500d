"""Window-attention scores and how the policies rank them (pure numpy).

Everything here works on attention statistics captured during prefill. For every layer ``l`` the
capture gives ``scores[l]``, an array of shape ``(n_head, n_prompt)``: the attention probabilities
of the last ``W`` prompt tokens (the *observation window*) over every prompt position, summed over
the ``W`` window queries, per query head.

The policies rank only the positions *before* the window (``0 .. n_prompt - W - 1``, the
"prefix"); the ``W`` window positions are always kept. A ``budget`` counts every kept token,
window included, so ``k = budget - W`` prefix tokens are chosen.

Sliding-window layers: a sliding-window (SWA) layer's window queries attend only to the last
``n_swa`` positions, so its scores of older positions are zero: ranking them gives ties, and a span
of SWA layers has an artificially stable ranking (a rank-variance collapse).
:func:`ranked_layer_mask` says which layers' scores rank every prefix position (global layers, and
SWA layers only when the whole prompt fits their window).
"""

from __future__ import annotations

import math
import operator

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .spans import Spans

POOL_MODES = ("avg", "max")
DEFAULT_INSPECT_BUDGET = 512


# ---------------------------------------------------------------------------
# argument checking
# ---------------------------------------------------------------------------

def _as_int(name: str, value) -> int:
    """Return ``value`` as a Python int; reject bools, floats and the like."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _check_unit(name: str, value) -> float:
    """``value`` as a float in (0, 1] (tau, theta), or a clear ValueError."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must satisfy 0 < {name} <= 1, got {value}")
    return value


def _check_kernel(kernel) -> int:
    kernel = _as_int("kernel", kernel)
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be an odd integer >= 1, got {kernel}")
    return kernel


def _check_pool(mode) -> str:
    if mode not in POOL_MODES:
        raise ValueError(f"pool mode must be one of {POOL_MODES}, got {mode!r}")
    return mode


def _check_window_budget(window, budget, n_prompt: int) -> tuple[int, int]:
    window = _as_int("window", window)
    budget = _as_int("budget", budget)
    if window < 1:
        raise ValueError(f"window must be >= 1, got window={window}")
    if window >= n_prompt:
        raise ValueError(
            f"window must be smaller than the prompt: window={window}, "
            f"n_prompt={n_prompt}")
    if budget <= window:
        raise ValueError(
            f"budget must exceed the window (the window is always kept): "
            f"budget={budget}, window={window}")
    return window, budget


def _check_scores(scores, expect_ndim: tuple[int, ...], what: str) -> np.ndarray:
    arr = np.asarray(scores)
    if arr.ndim not in expect_ndim:
        raise ValueError(
            f"{what} must have {' or '.join(map(str, expect_ndim))} dimensions, "
            f"got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what} is empty (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{what} must be a real numeric array, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or infinite values")
    return arr


# ---------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------

def pool_scores(x, kernel: int = 7, mode: str = "avg") -> np.ndarray:
    """1-D pooling along the last axis with stride 1 and "same" output length.

    ``mode="avg"`` matches ``torch.nn.functional.avg_pool1d(x, kernel,
    stride=1, padding=kernel // 2)`` with ``count_include_pad=True``: the
    input is zero-padded by ``kernel // 2`` on each side and every output is
    the window sum divided by ``kernel`` (so edge values are damped).
    ``mode="max"`` is the max over the same window, padded with ``-inf``
    (i.e. padding never wins).  ``kernel=1`` is the identity.

    Floating inputs keep their dtype; integer inputs give float64.  The
    average is accumulated in float64 (cumulative sums) regardless.
    """
    kernel = _check_kernel(kernel)
    mode = _check_pool(mode)
    arr = np.asarray(x)
    if arr.ndim < 1:
        raise ValueError("pool_scores needs an array with at least one axis")
    out_dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float64
    if kernel == 1 or arr.shape[-1] == 0:
        return arr.astype(out_dtype, copy=True)

    n = arr.shape[-1]
    pad = kernel // 2
    if mode == "avg":
        # csum[..., i] = sum of the first i inputs; zero padding contributes
        # nothing, so window sums are differences at clipped indices.
        csum = np.zeros(arr.shape[:-1] + (n + 1,), dtype=np.float64)
        np.cumsum(arr, axis=-1, dtype=np.float64, out=csum[..., 1:])
        pos = np.arange(n)
        hi = np.minimum(pos + pad + 1, n)
        lo = np.maximum(pos - pad, 0)
        out = (csum[..., hi] - csum[..., lo]) / kernel
    else:
        widths = [(0, 0)] * (arr.ndim - 1) + [(pad, pad)]
        padded = np.pad(arr.astype(out_dtype, copy=False), widths, constant_values=-np.inf)
        out = sliding_window_view(padded, kernel, axis=-1).max(axis=-1)
    return out.astype(out_dtype, copy=False)


def descending_ranks(x) -> np.ndarray:
    """Rank of every element along the last axis: 0 for the largest value.

    Ties are broken by position (the lower index gets the better rank), so
    each row of the result is a permutation of ``0 .. n - 1``.  Returns int64.
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim < 1:
        raise ValueError("descending_ranks needs an array with at least one axis")
    order = np.argsort(-arr, axis=-1, kind="stable")
    ranks = np.empty(order.shape, dtype=np.int64)
    positions = np.broadcast_to(np.arange(arr.shape[-1], dtype=np.int64), order.shape)
    np.put_along_axis(ranks, order, positions, axis=-1)
    return ranks


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def default_layer_params(n_layer: int) -> tuple[int, int]:
    """Default ``(l_min, l_obs)`` for a model with ``n_layer`` layers.

    The ASL paper uses ``L_min = 10`` (first layer allowed to act as the
    reference) and ``L_obs = 8`` (number of layers whose rankings are
    compared) for 32-layer models.

    * ``n_layer >= 32``: ``(10, 8)`` unchanged.
    * shallower models scale both by depth, rounding halves up:
      ``l_min = max(1, round(10 * n_layer / 32))`` and
      ``l_obs = max(2, round(8 * n_layer / 32))``.  ``l_min`` is finally
      capped at ``n_layer - 1`` so it is always a valid layer index.

    Examples: 30 layers -> (9, 8), 24 -> (8, 6), 18 -> (6, 5),
    16 -> (5, 4), 12 -> (4, 3).
    """
    n_layer = _as_int("n_layer", n_layer)
    if n_layer < 1:
        raise ValueError(f"n_layer must be >= 1, got {n_layer}")
    if n_layer >= 32:
        return 10, 8
    l_min = max(1, _round_half_up(10 * n_layer / 32))
    l_obs = max(2, _round_half_up(8 * n_layer / 32))
    return min(l_min, n_layer - 1), l_obs


def _pool_then_sum(prefix: np.ndarray, axis: int, kernel: int, pool: str) -> np.ndarray:
    """Pool each row of ``prefix`` along the last axis, then sum over ``axis``.

    Average pooling is linear, so for ``pool="avg"`` the rows are summed
    first and pooled once (same result, far less work); max pooling is
    applied per row before summing.  Returns float64.
    """
    if pool == "avg":
        return pool_scores(prefix.sum(axis=axis, dtype=np.float64), kernel=kernel, mode=pool)
    pooled = pool_scores(prefix.astype(np.float64, copy=False), kernel=kernel, mode=pool)
    return pooled.sum(axis=axis)


def _layer_prefix_scores(scores: np.ndarray, window: int, kernel: int,
                         pool: str) -> np.ndarray:
    """(n_layer, [n_head,] n_prompt) -> pooled prefix scores (n_layer, n_prefix).

    Pooling is per head, then the heads are summed (see :func:`_pool_then_sum`).
    """
    prefix = scores[..., : scores.shape[-1] - window]
    if prefix.ndim == 2:
        return pool_scores(prefix.astype(np.float64, copy=False), kernel=kernel, mode=pool)
    return _pool_then_sum(prefix, 1, kernel, pool)


def _kept(pooled: np.ndarray, k: int, n_prompt: int, span: Spans) -> np.ndarray:
    """The ``k`` prefix positions ``span`` keeps from one layer's pooled scores, plus the window,
    sorted (with ``span`` token: the top-``k`` of the ranking, ties to the lower position)."""
    top = span.top_k(pooled, k)
    window = np.arange(pooled.shape[-1], n_prompt, dtype=np.int64)
    return np.concatenate([top, window])


def _check_asl_scores(scores) -> np.ndarray:
    return _check_scores(scores, (2, 3),
                         "scores (n_layer, n_head, n_prompt) or (n_layer, n_prompt)")


# ---------------------------------------------------------------------------
# layers that may rank (sliding-window models)
# ---------------------------------------------------------------------------

def ranked_layer_mask(swa_layers, n_swa: int, n_prompt: int) -> np.ndarray | None:
    """Which layers' window scores may rank the prompt: the ``layer_mask`` of
    :func:`asl_select`, :func:`asl_select_at_layer` and :func:`inspect_layers`.

    Args:
        swa_layers: per layer, True for a sliding-window layer (``Model.swa_layers``).
        n_swa: the sliding-window size in tokens (``Model.n_swa``).
        n_prompt: prompt length.

    A global (full-attention) layer always ranks.  A sliding-window layer
    ranks only when ``n_prompt <= n_swa``: then every window query sees every
    prompt position and the layer attends exactly like a global one.  On a
    longer prompt its window queries cannot see the oldest positions, whose
    scores are zero (rank ties), so it does not rank.

    Returns a bool array, or ``None`` (every layer ranks) when no layer is
    excluded -- and also when *every* layer is sliding-window, where nothing
    better exists to rank with (the caller should say so).
    """
    swa = np.asarray(swa_layers, dtype=bool)
    if swa.ndim != 1 or swa.size == 0:
        raise ValueError(f"swa_layers must be a non-empty 1-D list of bools, got shape {swa.shape}")
    n_swa = _as_int("n_swa", n_swa)
    n_prompt = _as_int("n_prompt", n_prompt)
    if n_swa <= 0 or n_prompt <= n_swa or not swa.any() or swa.all():
        return None
    return ~swa


def _check_layer_mask(layer_mask, n_layer: int) -> np.ndarray:
    """``layer_mask`` as a bool array of n_layer entries (all True for None)."""
    if layer_mask is None:
        return np.ones(n_layer, dtype=bool)
    mask = np.asarray(layer_mask)
    if mask.dtype != bool:
        raise ValueError(f"layer_mask must hold bools (True: the layer ranks), got dtype {mask.dtype}")
    if mask.shape != (n_layer,):
        raise ValueError(f"layer_mask must have one entry per layer: shape {mask.shape}, n_layer={n_layer}")
    if not mask.any():
        raise ValueError("layer_mask excludes every layer; at least one layer must rank")
    return mask


def latest_ranked_layer(layer_mask, layer: int) -> int:
    """The ranking layer of selection layer ``layer``: the latest layer
    ``<= layer`` that ``layer_mask`` lets rank (``layer`` itself for None).

    Raises ValueError when no layer at or before ``layer`` ranks (e.g. a
    fixed selection layer before a sliding-window model's first global layer).
    """
    layer = _as_int("layer", layer)
    if layer < 0:
        raise ValueError(f"layer must be >= 0, got {layer}")
    if layer_mask is None:
        return layer
    mask = np.asarray(layer_mask, dtype=bool)
    if layer >= mask.shape[0]:
        raise ValueError(f"layer {layer} is outside the mask's {mask.shape[0]} layers")
    ranked = np.flatnonzero(mask[: layer + 1])
    if ranked.size == 0:
        first = np.flatnonzero(mask)
        raise ValueError(
            f"no layer at or before layer {layer} ranks every prompt position (sliding-window layers see only "
            f"the last tokens); the first full-attention layer is "
            f"{int(first[0]) if first.size else 'none'}: choose a selection layer >= it")
    return int(ranked[-1])
