"""The ASL rule (Adaptive Selection Layer, Taniguchi et al. 2026) and the fixed-layer ranking of
FastKV and GemFilter, on captured window scores (pure numpy).

* :func:`asl_select` -- one layer-shared token set, chosen at the first layer whose token ranking
  has become stable across the last ``l_obs`` layers.
* :func:`asl_select_at_layer` -- the same ranking taken at a fixed layer.
* :func:`inspect_layers` -- the per-layer view behind the decision (``pyasl inspect``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .scoring import (DEFAULT_INSPECT_BUDGET, _as_int, _check_asl_scores, _check_kernel, _check_layer_mask, _check_pool,
                      _check_unit, _check_window_budget, _kept, _layer_prefix_scores, default_layer_params,
                      descending_ranks, latest_ranked_layer)
from .spans import Spans


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


def _checked_args(scores, window, budget, kernel, pool):
    """The checked arguments of a selection from per-layer scores: (scores array, window, budget,
    kernel, pool); ValueError on malformed ones."""
    arr = _check_asl_scores(scores)
    window, budget = _check_window_budget(window, budget, arr.shape[-1])
    return arr, window, budget, _check_kernel(kernel), _check_pool(pool)


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
            (:class:`pyasl.policies.spans.Spans` or its text; None: token).  The
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
    arr, window, budget, kernel, pool = _checked_args(scores, window, budget, kernel, pool)
    n_layer, n_prompt = arr.shape[0], arr.shape[-1]
    tau = _check_unit("tau", tau)
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
    ``span`` turns the ranking into kept positions (:class:`pyasl.policies.spans.Spans`).
    ``layer`` may be negative (Python indexing).  Keeps everything when
    ``budget >= n_prompt``.

    With a ``layer_mask`` the ranking comes from the latest ranked layer
    ``<= layer`` (:func:`latest_ranked_layer`); ValueError when there is none.
    """
    arr, window, budget, kernel, pool = _checked_args(scores, window, budget, kernel, pool)
    n_layer, n_prompt = arr.shape[0], arr.shape[-1]
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
