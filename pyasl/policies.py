"""Token-selection policies for KV-cache pruning (pure numpy).

Everything in this module works on attention statistics captured during
prefill.  For every layer ``l`` the capture gives ``scores[l]``, an array of
shape ``(n_head, n_prompt)``: the attention probabilities of the last ``W``
prompt tokens (the *observation window*) over every prompt position, summed
over the ``W`` window queries, per query head.

The policies only rank the positions *before* the window
(``0 .. n_prompt - W - 1``, the "prefix"); the ``W`` window positions
``n_prompt - W .. n_prompt - 1`` are always kept.  A ``budget`` counts every
kept token, window included, so ``k = budget - W`` prefix tokens are chosen.

Policies
--------
* :func:`asl_select` -- ASL (Adaptive Selection Layer, Taniguchi et al. 2026):
  one layer-shared token set, chosen at the first layer whose token ranking
  has become stable across the last ``l_obs`` layers.
* :func:`asl_select_at_layer` -- the same ranking taken at a fixed layer
  (FastKV / GemFilter style baselines).
* :func:`snapkv_select` / :func:`snapkv_select_all` -- SnapKV: an independent
  token set per layer and per KV head.

Sliding-window layers
---------------------
A sliding-window (SWA) layer's window queries attend only to the last
``n_swa`` positions, so its scores of older positions are zero: ranking them
gives ties, and a span of SWA layers has an artificially stable ranking
(a rank-variance collapse).  :func:`ranked_layer_mask` says which layers'
scores rank every prefix position (global layers, and SWA layers only when
the whole prompt fits their window); :func:`asl_select` and
:func:`asl_select_at_layer` take that mask as ``layer_mask`` and rank with
those layers only (see there for the exact rule).

Helpers: :func:`pool_scores`, :func:`descending_ranks`,
:func:`default_layer_params`, :func:`ranked_layer_mask`,
:func:`inspect_layers`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .spans import Spans

__all__ = [
    "ASLSelection",
    "asl_select",
    "asl_select_at_layer",
    "default_layer_params",
    "descending_ranks",
    "inspect_layers",
    "pool_scores",
    "ranked_layer_mask",
    "snapkv_select",
    "snapkv_select_all",
]

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


# ---------------------------------------------------------------------------
# ASL
# ---------------------------------------------------------------------------

@dataclass
class ASLSelection:
    """Result of :func:`asl_select`.

    Attributes:
        selected_layer: layer at which the rank variance ratio first fell
            below ``tau``; ``None`` when it never did (or nothing to prune).
        kept: sorted int64 positions to keep (``budget`` of them, window
            included; all ``n_prompt`` when nothing had to be pruned).
        ranking_layer: layer whose ranking chose ``kept`` -- the selected
            layer, else the last layer.
        variance: per layer, mean rank variance over the observation span;
            ``None`` for layers before ``l_min``.
        variance_ratio: per layer, ``variance[l] / variance[l_min]``;
            ``None`` for layers before ``l_min``.
        triggered: whether the ``tau`` criterion fired.
        note: human-readable explanation of the outcome.
        ranked: per layer, whether its scores took part in the ranking
            (``layer_mask``; all True without one).
    """

    selected_layer: int | None
    kept: np.ndarray
    ranking_layer: int
    variance: list[float | None] = field(default_factory=list)
    variance_ratio: list[float | None] = field(default_factory=list)
    triggered: bool = False
    note: str = ""
    ranked: list[bool] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-friendly dict (``kept`` as a list of ints)."""
        out = asdict(self)
        out["kept"] = [int(p) for p in self.kept]
        return out


def _rank_variances(ranks: np.ndarray, k: int, l_min: int,
                    l_obs: int) -> tuple[list[float | None], list[float | None]]:
    """Per-layer mean rank variance and its ratio to the ``l_min`` value.

    For layer ``l >= l_min`` the span is ``S = max(0, l - l_obs + 1) .. l``;
    ``U`` is the union of the top-``k`` positions of the layers in ``S``; the
    variance is the population variance of each position's ranks across
    ``S``, averaged over ``U``.
    """
    n_layer = ranks.shape[0]
    variance: list[float | None] = [None] * n_layer
    ratio: list[float | None] = [None] * n_layer
    for layer in range(l_min, n_layer):
        span = ranks[max(0, layer - l_obs + 1): layer + 1]
        in_union = (span < k).any(axis=0)
        variance[layer] = float(span[:, in_union].var(axis=0).mean())

    ref = variance[l_min]
    for layer in range(l_min, n_layer):
        var = variance[layer]
        if layer == l_min:
            ratio[layer] = 1.0
        elif ref > 0.0:
            ratio[layer] = var / ref
        else:
            # Zero reference: the ranking was already perfectly stable at
            # l_min.  A layer that is still perfectly stable has ratio 0
            # (selects); any instability is infinitely worse than the
            # reference.
            ratio[layer] = 0.0 if var == 0.0 else math.inf
    return variance, ratio


def asl_select(scores, window: int, budget: int, tau: float = 0.3,
               l_min: int | None = None, l_obs: int | None = None,
               kernel: int = 7, pool: str = "avg", layer_mask=None, span=None) -> ASLSelection:
    """ASL (Adaptive Selection Layer) token selection.

    Args:
        scores: window attention, ``(n_layer, n_head, n_prompt)`` or
            ``(n_layer, n_prompt)`` (already summed over heads).
        window: observation-window size ``W`` (the last ``W`` positions,
            always kept).
        budget: total tokens to keep, window included.
        tau: variance-ratio threshold, ``0 < tau <= 1``.
        l_min: reference layer (first layer with a variance);
            default from :func:`default_layer_params`.
        l_obs: number of layers in the observation span;
            default from :func:`default_layer_params`.
        kernel, pool: pooling applied to the prefix scores per head
            (see :func:`pool_scores`).
        layer_mask: optional bools, one per layer: the layers whose scores
            may rank (:func:`ranked_layer_mask`; None: every layer).
        span: how the ranking layer's scores become kept positions
            (:class:`pyasl.spans.Spans` or its text; None: token).  The
            rule itself always ranks tokens.

    Rule: per layer the prefix scores are pooled per head and summed over
    heads, then ranked (:func:`descending_ranks`).  With ``k = budget - W``,
    each layer ``l >= l_min`` gets the mean variance of the ranks across
    layers ``max(0, l - l_obs + 1) .. l`` over the union of their top-``k``
    positions, and ``ratio_l = var_l / var_{l_min}`` (``ratio_{l_min} = 1``;
    a zero reference gives ratio 0 for a zero variance and ``inf``
    otherwise).  The selected layer is the first ``l > l_min`` with
    ``ratio_l < tau``; the kept tokens are its top-``k`` prefix positions
    plus the window.  If no layer qualifies, the last layer's ranking is
    used and ``selected_layer`` is ``None``.  If ``budget >= n_prompt``
    every position is kept and no variance is computed.

    With a ``layer_mask`` the same rule runs on the subsequence of ranked
    layers only: the reference is the first ranked layer ``>= l_min``, the
    span of a ranked layer ``l`` is the last ``l_obs`` ranked layers ``<= l``
    (``l_obs`` counts ranked layers), only ranked layers can be selected and
    the fallback ranking is the last ranked layer's.  Unranked layers get
    ``None`` variances.  So on a sliding-window model the selected layer (and
    the ranking layer) is always a global layer, and spans of sliding-window
    layers, whose scores of positions older than their window are zero ties,
    cannot fake a stable ranking.  Without a mask (or with an all-True one)
    this is exactly the rule above.

    Raises:
        ValueError: on malformed scores or out-of-range arguments.
    """
    arr = _check_asl_scores(scores)
    n_layer, n_prompt = arr.shape[0], arr.shape[-1]
    window, budget = _check_window_budget(window, budget, n_prompt)
    kernel = _check_kernel(kernel)
    pool = _check_pool(pool)
    try:
        tau = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"tau must be a number, got {tau!r}") from None
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must satisfy 0 < tau <= 1, got tau={tau}")
    d_min, d_obs = default_layer_params(n_layer)
    l_min = d_min if l_min is None else _as_int("l_min", l_min)
    l_obs = d_obs if l_obs is None else _as_int("l_obs", l_obs)
    if l_obs < 1:
        raise ValueError(f"l_obs must be >= 1, got l_obs={l_obs}")
    if not 0 <= l_min < n_layer:
        raise ValueError(
            f"l_min must satisfy 0 <= l_min < n_layer: l_min={l_min}, n_layer={n_layer}")
    mask = _check_layer_mask(layer_mask, n_layer)
    span = Spans.parse(span)
    ranked = np.flatnonzero(mask)          # model layer of each ranked index
    masked = not mask.all()

    if budget >= n_prompt:
        return ASLSelection(
            selected_layer=None,
            kept=np.arange(n_prompt, dtype=np.int64),
            ranking_layer=int(ranked[-1]),
            variance=[None] * n_layer,
            variance_ratio=[None] * n_layer,
            triggered=False,
            note=f"budget={budget} >= n_prompt={n_prompt}: nothing to prune, kept all tokens",
            ranked=mask.tolist(),
        )

    k = budget - window
    pooled = _layer_prefix_scores(arr[ranked], window, kernel, pool)
    ranks = descending_ranks(pooled)
    variance: list[float | None] = [None] * n_layer
    ratio: list[float | None] = [None] * n_layer
    after = np.flatnonzero(ranked >= l_min)
    selected, ref = None, None
    if after.size:
        r_min = int(after[0])              # ranked index of the reference layer
        var_r, ratio_r = _rank_variances(ranks, k, r_min, l_obs)
        for i, layer in enumerate(ranked):
            variance[layer], ratio[layer] = var_r[i], ratio_r[i]
        hit = next((i for i in range(r_min + 1, len(ranked)) if ratio_r[i] < tau), None)
        selected = None if hit is None else int(ranked[hit])
        ref = int(ranked[r_min])
    ref_txt = f"l_min={l_min}" if not masked else (
        f"l_min={l_min}, reference layer {ref}, ranked layers {ranked.tolist()}" if after.size
        else f"l_min={l_min}, ranked layers {ranked.tolist()}")
    if selected is not None:
        ranking_layer = selected
        note = (f"variance ratio {ratio[selected]:.4g} < tau={tau} at layer {selected} "
                f"(reference {ref_txt}, l_obs={l_obs})")
    else:
        ranking_layer = int(ranked[-1])
        later = [ratio[int(layer)] for layer in ranked if after.size and layer > ref]
        last = "the last layer's ranks" if not masked else f"the last ranked layer's ({ranking_layer}) ranks"
        if later:
            note = (f"tau={tau} never reached (lowest ratio {min(later):.4g} after "
                    f"{ref_txt}); used {last}")
        else:
            note = (f"no layer after l_min={l_min} (n_layer={n_layer}"
                    + (f", ranked layers {ranked.tolist()}" if masked else "") + f"); used {last}")

    return ASLSelection(
        selected_layer=selected,
        kept=_kept(pooled[int(np.flatnonzero(ranked == ranking_layer)[0])], k, n_prompt, span),
        ranking_layer=ranking_layer,
        variance=variance,
        variance_ratio=ratio,
        triggered=selected is not None,
        note=note,
        ranked=mask.tolist(),
    )


def asl_select_at_layer(scores, window: int, budget: int, layer: int,
                        kernel: int = 7, pool: str = "avg", layer_mask=None, span=None) -> np.ndarray:
    """Kept positions (sorted int64) using the ranking of a fixed ``layer``.

    Same scoring as :func:`asl_select` (pool per head, sum heads, rank the
    prefix, keep top ``budget - window`` plus the window) without the
    adaptive layer search -- the FastKV / GemFilter style baselines.
    ``span`` turns the ranking into kept positions (:class:`pyasl.spans.Spans`).
    ``layer`` may be negative (Python indexing).  Keeps everything when
    ``budget >= n_prompt``.

    With a ``layer_mask`` the ranking comes from the latest ranked layer
    ``<= layer`` (:func:`latest_ranked_layer`); ValueError when there is none.
    """
    arr = _check_asl_scores(scores)
    n_layer, n_prompt = arr.shape[0], arr.shape[-1]
    window, budget = _check_window_budget(window, budget, n_prompt)
    kernel = _check_kernel(kernel)
    pool = _check_pool(pool)
    layer = _as_int("layer", layer)
    if not -n_layer <= layer < n_layer:
        raise ValueError(f"layer must be a valid layer index: layer={layer}, n_layer={n_layer}")
    mask = _check_layer_mask(layer_mask, n_layer)
    layer = latest_ranked_layer(mask, layer % n_layer)
    span = Spans.parse(span)
    if budget >= n_prompt:
        return np.arange(n_prompt, dtype=np.int64)
    pooled = _layer_prefix_scores(arr[layer: layer + 1], window, kernel, pool)[0]
    return _kept(pooled, budget - window, n_prompt, span)


# ---------------------------------------------------------------------------
# SnapKV
# ---------------------------------------------------------------------------

def snapkv_select(layer_scores, window: int, budget: int, n_head_kv: int,
                  kernel: int = 7, pool: str = "avg", span=None) -> np.ndarray:
    """SnapKV selection for one layer, independently per KV head.

    Args:
        layer_scores: ``(n_head, n_prompt)`` window attention of one layer.
        window, budget: as in :func:`asl_select` (budget includes window).
        n_head_kv: number of KV heads; must divide ``n_head``.  Under GQA,
            query head ``h`` belongs to KV head ``h // (n_head // n_head_kv)``.
        kernel, pool: pooling of the prefix scores (see :func:`pool_scores`).
        span: how each KV head's scores become kept positions
            (:class:`pyasl.spans.Spans`; None: token).

    Each query head's prefix scores are pooled, then the query heads of a
    group are *summed* into their KV head's score.  Each KV head keeps its
    top ``budget - window`` prefix positions (ties to the lower position)
    plus the window.

    Returns:
        int64 array ``(n_head_kv, budget)`` of sorted positions per KV head,
        or ``(n_head_kv, n_prompt)`` (every position) when
        ``budget >= n_prompt``.
    """
    arr = _check_scores(layer_scores, (2,), "layer_scores (n_head, n_prompt)")
    n_head, n_prompt = arr.shape
    window, budget = _check_window_budget(window, budget, n_prompt)
    kernel = _check_kernel(kernel)
    pool = _check_pool(pool)
    n_head_kv = _as_int("n_head_kv", n_head_kv)
    if n_head_kv < 1 or n_head % n_head_kv != 0:
        raise ValueError(
            f"n_head_kv must be >= 1 and divide n_head: n_head={n_head}, "
            f"n_head_kv={n_head_kv}")
    span = Spans.parse(span)

    if budget >= n_prompt:
        return np.tile(np.arange(n_prompt, dtype=np.int64), (n_head_kv, 1))

    k = budget - window
    n_prefix = n_prompt - window
    grouped = arr[:, :n_prefix].reshape(n_head_kv, n_head // n_head_kv, n_prefix)
    per_kv = _pool_then_sum(grouped, 1, kernel, pool)
    top = span.top_k(per_kv, k)
    win = np.broadcast_to(np.arange(n_prefix, n_prompt, dtype=np.int64), (n_head_kv, window))
    return np.concatenate([top, win], axis=-1)


def snapkv_select_all(scores, window: int, budget: int, n_head_kv: int,
                      kernel: int = 7, pool: str = "avg", span=None) -> np.ndarray:
    """:func:`snapkv_select` for every layer.

    ``scores`` is ``(n_layer, n_head, n_prompt)``; returns int64
    ``(n_layer, n_head_kv, budget)`` (``n_prompt`` instead of ``budget`` when
    nothing has to be pruned).
    """
    arr = _check_scores(scores, (3,), "scores (n_layer, n_head, n_prompt)")
    return np.stack([
        snapkv_select(arr[layer], window, budget, n_head_kv, kernel=kernel, pool=pool, span=span)
        for layer in range(arr.shape[0])
    ])


# ---------------------------------------------------------------------------
# inspection
# ---------------------------------------------------------------------------

def inspect_layers(scores, window: int, l_min: int | None = None,
                   l_obs: int | None = None, budget: int | None = None,
                   tau: float = 0.3, kernel: int = 7, pool: str = "avg",
                   layer_mask=None, span=None) -> dict:
    """Per-layer view of the ASL decision (used by ``pyasl inspect``).

    ``budget=None`` means ``min(512, n_prompt)``.  When the (effective)
    budget covers the whole prompt nothing is pruned, so every variance
    ratio is ``None`` and no layer is selected; pass a smaller budget to see
    the ratios on short prompts.

    Returns a dict with ``selected_layer``, ``ranking_layer``, ``triggered``,
    ``note``, ``kept`` (the positions ASL keeps with ``span``), ``budget`` (effective), ``window``, ``tau``, ``l_min``,
    ``l_obs`` and ``layers``: one dict per layer with ``layer``, ``scores``
    (unpooled window attention summed over heads, prefix positions only, as
    a list of floats), ``variance``, ``variance_ratio`` and ``ranked``
    (whether ``layer_mask`` let the layer rank, see :func:`asl_select`).
    """
    arr = _check_asl_scores(scores)
    n_layer, n_prompt = arr.shape[0], arr.shape[-1]
    if budget is None:
        budget = min(DEFAULT_INSPECT_BUDGET, n_prompt)
    d_min, d_obs = default_layer_params(n_layer)
    l_min = d_min if l_min is None else l_min
    l_obs = d_obs if l_obs is None else l_obs
    sel = asl_select(arr, window, budget, tau=tau, l_min=l_min, l_obs=l_obs,
                     kernel=kernel, pool=pool, layer_mask=layer_mask, span=span)

    n_prefix = n_prompt - int(window)
    raw = np.asarray(arr[..., :n_prefix], dtype=np.float64)
    if raw.ndim == 3:
        raw = raw.sum(axis=1)
    layers = [
        {
            "layer": layer,
            "scores": raw[layer].tolist(),
            "variance": sel.variance[layer],
            "variance_ratio": sel.variance_ratio[layer],
            "ranked": sel.ranked[layer],
        }
        for layer in range(n_layer)
    ]
    return {
        "selected_layer": sel.selected_layer,
        "ranking_layer": sel.ranking_layer,
        "triggered": sel.triggered,
        "note": sel.note,
        "kept": [int(p) for p in sel.kept],
        "budget": int(budget),
        "window": int(window),
        "tau": float(tau),
        "l_min": int(l_min),
        "l_obs": int(l_obs),
        "layers": layers,
    }
