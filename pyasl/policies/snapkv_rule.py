"""The SnapKV rule (Li et al. 2024) on captured window scores (pure numpy): every layer and KV head
keeps its own top-k, through the span stage."""

from __future__ import annotations

import numpy as np

from .scoring import _as_int, _check_kernel, _check_pool, _check_scores, _check_window_budget, _pool_then_sum
from .spans import Spans


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
            (:class:`pyasl.policies.spans.Spans`; None: token).

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
