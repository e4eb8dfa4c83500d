"""Unit tests for pyasl.policies on hand-built score arrays (no model needed).

They check the rules as published (token-level top-k), so the default span stage is token here;
tests/test_spans.py checks the span stages."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pyasl.policies import (
    ASLSelection,
    asl_select,
    asl_select_at_layer,
    default_layer_params,
    descending_ranks,
    inspect_layers,
    latest_ranked_layer,
    pool_scores,
    ranked_layer_mask,
    snapkv_select,
    snapkv_select_all,
)


@pytest.fixture(autouse=True)
def _token_level(monkeypatch):
    monkeypatch.setattr("pyasl.policies.spans.DEFAULT_SPAN", "token")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def naive_pool(x: np.ndarray, kernel: int, mode: str) -> np.ndarray:
    """Reference pooling: explicit loop over each output position."""
    n = x.shape[-1]
    pad = kernel // 2
    out = np.empty(x.shape, dtype=np.float64)
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx]
        for i in range(n):
            vals = [row[j] for j in range(i - pad, i + pad + 1) if 0 <= j < n]
            out[idx + (i,)] = sum(vals) / kernel if mode == "avg" else max(vals)
    return out


def top_set(values: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest values (distinct values assumed), sorted."""
    return np.sort(np.argsort(-values, kind="stable")[:k])


def check_kept(kept: np.ndarray, budget: int, window: int, n_prompt: int) -> None:
    assert kept.dtype == np.int64
    assert len(kept) == budget
    assert np.all(np.diff(kept) > 0), "kept must be sorted and unique"
    assert kept[0] >= 0 and kept[-1] == n_prompt - 1
    assert set(range(n_prompt - window, n_prompt)) <= set(kept.tolist())


def stable_from(n_layer=12, n_head=2, n_prompt=256, stable_layer=6, seed=0):
    """Scores whose layers >= stable_layer share one ranking (scaled copies of
    one base vector split randomly across heads); earlier layers are random."""
    rng = np.random.default_rng(seed)
    base = rng.random(n_prompt)
    scores = np.empty((n_layer, n_head, n_prompt), dtype=np.float32)
    for layer in range(n_layer):
        vec = base * (1.0 + layer) if layer >= stable_layer else rng.random(n_prompt)
        split = rng.dirichlet(np.ones(n_head), size=n_prompt).T  # (n_head, n_prompt)
        scores[layer] = vec * split
    return scores, base


# ---------------------------------------------------------------------------
# pooling and ranks
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("kernel", [1, 3, 5, 7, 9, 15])
@pytest.mark.parametrize("n", [1, 2, 6, 13])
def test_pool_matches_naive(mode, kernel, n):
    x = np.random.default_rng(kernel * 100 + n).normal(size=(3, 2, n))
    got = pool_scores(x, kernel=kernel, mode=mode)
    assert got.shape == x.shape
    np.testing.assert_allclose(got, naive_pool(x, kernel, mode), rtol=1e-12, atol=1e-12)


def test_pool_edges_and_dtype():
    x = np.array([3.0, 0.0, 0.0, 0.0, 6.0], dtype=np.float32)
    avg = pool_scores(x, kernel=3, mode="avg")
    assert avg.dtype == np.float32
    # zero padding counts in the divisor (count_include_pad=True)
    np.testing.assert_allclose(avg, [1.0, 1.0, 0.0, 2.0, 2.0])
    mx = pool_scores(np.array([-5.0, -9.0, -9.0, -9.0, -2.0]), kernel=3, mode="max")
    # -inf padding never wins, even against negative values
    np.testing.assert_allclose(mx, [-5.0, -5.0, -9.0, -2.0, -2.0])
    np.testing.assert_array_equal(pool_scores(x, kernel=1), x)
    assert pool_scores(np.arange(4), kernel=3).dtype == np.float64


@pytest.mark.parametrize("kwargs, match", [
    ({"kernel": 4}, "odd"),
    ({"kernel": 0}, "odd"),
    ({"kernel": 2.0}, "integer"),
    ({"mode": "median"}, "pool mode"),
])
def test_pool_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pool_scores(np.ones(5), **kwargs)


def test_descending_ranks():
    r = descending_ranks(np.array([0.1, 0.5, 0.3, 0.5, 0.0]))
    assert r.dtype == np.int64
    np.testing.assert_array_equal(r, [3, 0, 2, 1, 4])  # tie: lower position first
    rows = descending_ranks(np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]]))
    np.testing.assert_array_equal(rows, [[2, 1, 0], [0, 1, 2]])


def test_descending_ranks_is_permutation():
    x = np.random.default_rng(1).integers(0, 5, size=(4, 50)).astype(float)
    r = descending_ranks(x)
    for row_x, row_r in zip(x, r):
        assert sorted(row_r.tolist()) == list(range(50))
        order = np.argsort(row_r)
        assert np.all(np.diff(row_x[order]) <= 0)


# ---------------------------------------------------------------------------
# default layer parameters
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n_layer, expected", [
    (40, (10, 8)), (32, (10, 8)), (30, (9, 8)), (24, (8, 6)), (18, (6, 5)),
    (16, (5, 4)), (4, (1, 2)), (1, (0, 2)),
])
def test_default_layer_params(n_layer, expected):
    assert default_layer_params(n_layer) == expected


def test_default_layer_params_bad():
    with pytest.raises(ValueError, match="n_layer"):
        default_layer_params(0)


# ---------------------------------------------------------------------------
# ASL
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", [1, 7])
def test_asl_selects_predictable_layer(kernel):
    # 256 prompt positions / k = 64 keep the ratios of the mixed spans far
    # above tau (checked over hundreds of seeds), so the layer is exact.
    window, budget, l_min, l_obs, stable = 8, 72, 2, 3, 6
    scores, base = stable_from(stable_layer=stable)
    n_prompt = scores.shape[-1]
    sel = asl_select(scores, window, budget, tau=0.3, l_min=l_min, l_obs=l_obs, kernel=kernel)

    expected_layer = stable + l_obs - 1  # first span made only of stable layers
    assert isinstance(sel, ASLSelection)
    assert sel.triggered and sel.selected_layer == expected_layer
    assert sel.ranking_layer == expected_layer
    assert sel.variance_ratio[expected_layer] == 0.0
    assert all(r >= 0.3 for r in sel.variance_ratio[l_min + 1:expected_layer])
    assert sel.variance[:l_min] == [None] * l_min
    assert sel.variance_ratio[:l_min] == [None] * l_min
    assert sel.variance_ratio[l_min] == 1.0
    assert len(sel.variance) == len(sel.variance_ratio) == scores.shape[0]

    n_prefix = n_prompt - window
    pooled = pool_scores(base[:n_prefix], kernel=kernel)
    expected = np.concatenate([top_set(pooled, budget - window),
                               np.arange(n_prefix, n_prompt)])
    np.testing.assert_array_equal(sel.kept, expected)
    check_kept(sel.kept, budget, window, n_prompt)
    assert "tau" in sel.note


def test_asl_two_dim_scores_equal_head_sum():
    scores, _ = stable_from(seed=3)
    a = asl_select(scores, 8, 72, l_min=2, l_obs=3, kernel=7)
    b = asl_select(scores.sum(axis=1), 8, 72, l_min=2, l_obs=3, kernel=7)
    assert a.selected_layer == b.selected_layer
    np.testing.assert_array_equal(a.kept, b.kept)


@pytest.mark.parametrize("budget", [9, 10, 30, 55, 63])
def test_asl_budget_honoured(budget):
    scores = np.random.default_rng(budget).random((6, 4, 64)).astype(np.float32)
    sel = asl_select(scores, 8, budget, l_min=1, l_obs=2)
    check_kept(sel.kept, budget, 8, 64)


def test_asl_never_triggered():
    rng = np.random.default_rng(7)
    scores = rng.random((10, 2, 200))
    window, budget = 16, 48
    sel = asl_select(scores, window, budget, tau=0.3, l_min=2, l_obs=4)
    assert sel.selected_layer is None and not sel.triggered
    assert sel.ranking_layer == 9
    assert "never reached" in sel.note and "last layer" in sel.note
    assert all(r >= 0.3 for r in sel.variance_ratio[3:])
    n_prefix = 200 - window
    expected = np.concatenate([top_set(pool_scores(scores[-1, :, :n_prefix]).sum(0),
                                       budget - window),
                               np.arange(n_prefix, 200)])
    np.testing.assert_array_equal(sel.kept, expected)
    np.testing.assert_array_equal(sel.kept, asl_select_at_layer(scores, window, budget, -1))


def test_asl_zero_reference_variance_selects_next_layer():
    base = np.random.default_rng(2).random(40)
    scores = np.stack([base] * 6)  # identical layers: ranks never change
    sel = asl_select(scores, 4, 12, l_min=1, l_obs=2, kernel=1)
    assert sel.variance[1] == 0.0
    assert sel.selected_layer == 2
    np.testing.assert_array_equal(sel.kept, np.concatenate([top_set(base[:36], 8),
                                                            np.arange(36, 40)]))


def test_asl_zero_reference_then_unstable_is_inf():
    rng = np.random.default_rng(4)
    base = rng.random(40)
    scores = np.stack([base, base, rng.random(40), rng.random(40)])
    sel = asl_select(scores, 4, 12, l_min=1, l_obs=2, kernel=1)
    assert sel.variance_ratio[2] == math.inf and sel.selected_layer is None


def test_asl_no_layer_after_l_min():
    scores = np.random.default_rng(5).random((3, 30))
    sel = asl_select(scores, 2, 10, l_min=2, l_obs=2)
    assert sel.selected_layer is None and sel.ranking_layer == 2
    assert "no layer after" in sel.note


@pytest.mark.parametrize("budget", [64, 100])
def test_asl_budget_covers_prompt(budget):
    scores = np.random.default_rng(0).random((4, 2, 64))
    sel = asl_select(scores, 8, budget, l_min=1, l_obs=2)
    np.testing.assert_array_equal(sel.kept, np.arange(64))
    assert sel.selected_layer is None and not sel.triggered
    assert "nothing to prune" in sel.note
    np.testing.assert_array_equal(asl_select_at_layer(scores, 8, budget, 0), np.arange(64))


def test_asl_default_layer_params_used():
    scores = np.random.default_rng(0).random((18, 50))
    sel = asl_select(scores, 5, 20)
    l_min, _ = default_layer_params(18)
    assert sel.variance[l_min - 1] is None and sel.variance[l_min] is not None


@pytest.mark.parametrize("kwargs, match", [
    ({"window": 0}, "window must be >= 1"),
    ({"window": 64}, "window=64, n_prompt=64"),
    ({"budget": 8}, "budget=8, window=8"),
    ({"tau": 0.0}, "tau"),
    ({"tau": 1.5}, "tau"),
    ({"l_obs": 0}, "l_obs"),
    ({"l_min": 5}, "l_min=5, n_layer=5"),
    ({"l_min": -1}, "l_min"),
    ({"kernel": 6}, "kernel"),
    ({"pool": "sum"}, "pool mode"),
])
def test_asl_validation(kwargs, match):
    args = {"window": 8, "budget": 24, "l_min": 1, "l_obs": 2}
    args.update(kwargs)
    scores = np.ones((5, 2, 64))
    with pytest.raises(ValueError, match=match):
        asl_select(scores, **args)


@pytest.mark.parametrize("scores, match", [
    (np.ones(10), "dimensions"),
    (np.ones((2, 2, 2, 10)), "dimensions"),
    (np.full((2, 10), np.nan), "NaN"),
])
def test_asl_bad_scores(scores, match):
    with pytest.raises(ValueError, match=match):
        asl_select(scores, 2, 5)


def test_asl_select_at_layer_matches_selection():
    scores, _ = stable_from(seed=11)
    sel = asl_select(scores, 8, 72, l_min=2, l_obs=3)
    assert sel.selected_layer is not None
    kept = asl_select_at_layer(scores, 8, 72, sel.selected_layer)
    np.testing.assert_array_equal(kept, sel.kept)
    with pytest.raises(ValueError, match="layer"):
        asl_select_at_layer(scores, 8, 72, scores.shape[0])


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_asl_select_at_layer_matches_naive(pool):
    scores = np.random.default_rng(12).random((3, 4, 60)).astype(np.float32)
    kept = asl_select_at_layer(scores, 6, 20, 1, kernel=5, pool=pool)
    agg = naive_pool(scores[1, :, :54].astype(np.float64), 5, pool).sum(axis=0)
    np.testing.assert_array_equal(kept, np.concatenate([top_set(agg, 14), np.arange(54, 60)]))


def test_to_dict_is_plain():
    sel = asl_select(np.random.default_rng(0).random((4, 30)), 2, 10, l_min=1, l_obs=2)
    d = sel.to_dict()
    assert d["kept"] == sel.kept.tolist() and all(type(p) is int for p in d["kept"])


# ---------------------------------------------------------------------------
# SnapKV
# ---------------------------------------------------------------------------

def test_snapkv_heads_differ_and_gqa_grouping():
    n_head, n_head_kv, n_prompt, window, budget = 4, 2, 40, 4, 8
    scores = np.full((n_head, n_prompt), 0.01)
    # query heads 0,1 -> kv head 0; query heads 2,3 -> kv head 1
    scores[1, [3, 5, 7, 9]] = 1.0
    scores[2, [20, 22, 24, 26]] = 1.0
    kept = snapkv_select(scores, window, budget, n_head_kv, kernel=1)
    assert kept.shape == (n_head_kv, budget) and kept.dtype == np.int64
    np.testing.assert_array_equal(kept[0], [3, 5, 7, 9, 36, 37, 38, 39])
    np.testing.assert_array_equal(kept[1], [20, 22, 24, 26, 36, 37, 38, 39])
    for row in kept:
        check_kept(row, budget, window, n_prompt)


def test_snapkv_group_sum():
    # kv head 0 = query heads 0,1: head 0 favours 2, head 1 favours 6 twice as much
    scores = np.zeros((2, 12))
    scores[0, 2] = 1.0
    scores[1, 6] = 2.0
    scores[0, 6] = 0.5
    kept = snapkv_select(scores, 2, 3, 1, kernel=1)
    np.testing.assert_array_equal(kept, [[6, 10, 11]])


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_snapkv_matches_naive(pool):
    rng = np.random.default_rng(9)
    scores = rng.random((8, 50))
    window, budget, n_kv = 5, 20, 2
    kept = snapkv_select(scores, window, budget, n_kv, kernel=5, pool=pool)
    pooled = naive_pool(scores[:, :45], 5, pool)  # per query head
    for kv in range(n_kv):
        agg = pooled[kv * 4:(kv + 1) * 4].sum(axis=0)
        expected = np.concatenate([top_set(agg, budget - window), np.arange(45, 50)])
        np.testing.assert_array_equal(kept[kv], expected)


def test_snapkv_budget_covers_prompt():
    kept = snapkv_select(np.ones((4, 10)), 2, 10, 2)
    np.testing.assert_array_equal(kept, np.tile(np.arange(10), (2, 1)))


@pytest.mark.parametrize("kwargs, match", [
    ({"n_head_kv": 3}, "divide"),
    ({"n_head_kv": 0}, "divide"),
    ({"budget": 4}, "budget=4, window=4"),
    ({"window": 40}, "window"),
    ({"kernel": 2}, "kernel"),
])
def test_snapkv_validation(kwargs, match):
    args = {"window": 4, "budget": 8, "n_head_kv": 2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        snapkv_select(np.ones((4, 40)), **args)


def test_snapkv_select_all():
    scores = np.random.default_rng(3).random((3, 4, 30))
    kept = snapkv_select_all(scores, 4, 10, 2)
    assert kept.shape == (3, 2, 10)
    for layer in range(3):
        np.testing.assert_array_equal(kept[layer], snapkv_select(scores[layer], 4, 10, 2))
    with pytest.raises(ValueError, match="dimensions"):
        snapkv_select_all(scores[0], 4, 10, 2)


# ---------------------------------------------------------------------------
# inspection
# ---------------------------------------------------------------------------

def test_inspect_layers():
    scores, _ = stable_from(seed=11)
    info = inspect_layers(scores, 8, l_min=2, l_obs=3, budget=72)
    sel = asl_select(scores, 8, 72, l_min=2, l_obs=3)
    assert info["selected_layer"] == sel.selected_layer
    assert len(info["layers"]) == scores.shape[0]
    layer0 = info["layers"][0]
    assert layer0["layer"] == 0 and layer0["variance_ratio"] is None
    np.testing.assert_allclose(layer0["scores"], scores[0, :, :-8].sum(axis=0), rtol=1e-6)
    assert [d["variance_ratio"] for d in info["layers"]] == sel.variance_ratio


def test_inspect_layers_default_budget_short_prompt():
    info = inspect_layers(np.random.default_rng(0).random((4, 2, 64)), 8, l_min=1, l_obs=2)
    assert info["budget"] == 64 and info["selected_layer"] is None
    assert all(d["variance_ratio"] is None for d in info["layers"])


# ---------------------------------------------------------------------------
# layer masks (sliding-window models)
# ---------------------------------------------------------------------------

GLOBAL = [2, 5, 8, 11]          # 12 layers, every third one global


def swa_scores(n_layer=12, n_head=2, n_prompt=256, n_swa=64, stable_global=8, seed=0):
    """Global layers (GLOBAL) rank a shared base vector from layer stable_global on
    (random before); the other layers are sliding-window ones: zero scores for
    positions the last window query cannot see, one fixed recent ranking otherwise
    (a span of them looks perfectly stable)."""
    rng = np.random.default_rng(seed)
    base = rng.random(n_prompt)
    recent = rng.random(n_prompt)
    scores = np.empty((n_layer, n_head, n_prompt))
    for layer in range(n_layer):
        if layer in GLOBAL:
            vec = base * (1.0 + layer) if layer >= stable_global else rng.random(n_prompt)
        else:
            vec = recent.copy()
            vec[: n_prompt - n_swa] = 0.0
        scores[layer] = vec * rng.dirichlet(np.ones(n_head), size=n_prompt).T
    mask = np.array([layer in GLOBAL for layer in range(n_layer)])
    return scores, base, mask


def test_all_true_mask_is_no_mask():
    for seed in range(4):
        scores, _ = stable_from(seed=seed)
        a = asl_select(scores, 8, 72, l_min=2, l_obs=3)
        b = asl_select(scores, 8, 72, l_min=2, l_obs=3, layer_mask=np.ones(scores.shape[0], dtype=bool))
        assert a.selected_layer == b.selected_layer and a.ranking_layer == b.ranking_layer
        np.testing.assert_array_equal(a.kept, b.kept)
        assert a.variance == b.variance and a.variance_ratio == b.variance_ratio and a.note == b.note
        np.testing.assert_array_equal(asl_select_at_layer(scores, 8, 72, 5),
                                      asl_select_at_layer(scores, 8, 72, 5, layer_mask=[True] * 12))


def test_swa_layers_fake_a_stable_ranking_without_mask():
    scores, _, _ = swa_scores()
    sel = asl_select(scores, 8, 40, l_min=3, l_obs=2)
    # two adjacent sliding-window layers (3, 4) share their ranking: the variance collapses there
    assert sel.selected_layer == 4 and sel.variance_ratio[4] < 0.3
    assert sel.kept.min() >= 256 - 64 - 3  # ... and every kept token comes from the recent window
    masked = asl_select(scores, 8, 40, l_min=3, l_obs=2, layer_mask=[layer in GLOBAL for layer in range(12)])
    assert masked.selected_layer == 11 and masked.kept.min() < 256 - 64


def test_mask_ranks_with_global_layers_only():
    scores, base, mask = swa_scores()
    window, budget, n = 8, 72, 256
    sel = asl_select(scores, window, budget, l_min=3, l_obs=2, layer_mask=mask)
    # reference: first global layer >= l_min (5), spans of the last 2 global layers: {5, 8} is
    # unstable, {8, 11} stable -> selects 11
    assert sel.selected_layer == 11 and sel.ranking_layer == 11 and sel.triggered
    assert sel.ranked == mask.tolist()
    assert [layer for layer, r in enumerate(sel.variance_ratio) if r is not None] == [5, 8, 11]
    assert sel.variance_ratio[5] == 1.0 and sel.variance_ratio[11] == 0.0
    assert "reference layer 5" in sel.note
    expected = np.concatenate([top_set(pool_scores(base[: n - window]), budget - window),
                               np.arange(n - window, n)])
    np.testing.assert_array_equal(sel.kept, expected)
    assert sel.kept.min() < n - 64  # old tokens are ranked again
    check_kept(sel.kept, budget, window, n)


def test_mask_equals_asl_on_the_ranked_subsequence():
    rng = np.random.default_rng(3)
    for _ in range(10):
        scores = rng.random((12, 2, 120))
        mask = rng.random(12) < 0.5
        mask[rng.integers(12)] = True
        ranked = np.flatnonzero(mask)
        l_min = int(rng.integers(0, 12))
        sel = asl_select(scores, 4, 30, tau=0.9, l_min=l_min, l_obs=2, layer_mask=mask)
        after = np.flatnonzero(ranked >= l_min)
        if not after.size:
            assert sel.selected_layer is None and sel.ranking_layer == ranked[-1]
            assert "no layer after" in sel.note
            continue
        sub = asl_select(scores[ranked], 4, 30, tau=0.9, l_min=int(after[0]), l_obs=2)
        assert sel.selected_layer == (None if sub.selected_layer is None else ranked[sub.selected_layer])
        assert sel.ranking_layer == ranked[sub.ranking_layer]
        np.testing.assert_array_equal(sel.kept, sub.kept)
        assert [sel.variance_ratio[layer] for layer in ranked] == sub.variance_ratio
        assert all(sel.variance_ratio[layer] is None for layer in np.flatnonzero(~mask))


def test_mask_never_triggered_uses_last_ranked_layer():
    scores, _, mask = swa_scores(stable_global=99)
    sel = asl_select(scores, 8, 72, l_min=3, l_obs=2, layer_mask=mask)
    assert sel.selected_layer is None and sel.ranking_layer == 11
    assert "never reached" in sel.note
    mask2 = mask.copy()
    mask2[11] = False
    sel = asl_select(scores, 8, 72, l_min=3, l_obs=2, layer_mask=mask2)
    assert sel.ranking_layer == 8
    np.testing.assert_array_equal(sel.kept, asl_select_at_layer(scores, 8, 72, 8))


def test_select_at_layer_with_mask_uses_latest_ranked_layer():
    scores, _, mask = swa_scores()
    for layer, ranking in [(2, 2), (3, 2), (7, 5), (11, 11), (-1, 11)]:
        np.testing.assert_array_equal(asl_select_at_layer(scores, 8, 72, layer, layer_mask=mask),
                                      asl_select_at_layer(scores, 8, 72, ranking))
    assert latest_ranked_layer(mask, 10) == 8 and latest_ranked_layer(None, 4) == 4
    with pytest.raises(ValueError, match="first full-attention layer is 2"):
        asl_select_at_layer(scores, 8, 72, 1, layer_mask=mask)
    # budget covering the prompt keeps everything, but the layer is still checked
    np.testing.assert_array_equal(asl_select_at_layer(scores, 8, 256, 4, layer_mask=mask), np.arange(256))


@pytest.mark.parametrize("mask, match", [
    ([True] * 11, "one entry per layer"),
    ([1] * 12, "bools"),
    ([False] * 12, "excludes every layer"),
])
def test_bad_layer_masks(mask, match):
    scores, _, _ = swa_scores()
    with pytest.raises(ValueError, match=match):
        asl_select(scores, 8, 72, layer_mask=mask)
    with pytest.raises(ValueError, match=match):
        asl_select_at_layer(scores, 8, 72, 5, layer_mask=mask)


def test_ranked_layer_mask():
    swa = [True, True, False, True, True, False]
    np.testing.assert_array_equal(ranked_layer_mask(swa, 64, 65), [False, False, True, False, False, True])
    assert ranked_layer_mask(swa, 64, 64) is None      # the whole prompt fits the window
    assert ranked_layer_mask(swa, 0, 500) is None       # no sliding window
    assert ranked_layer_mask([False] * 6, 64, 500) is None
    assert ranked_layer_mask([True] * 6, 64, 500) is None  # nothing better to rank with
    with pytest.raises(ValueError, match="swa_layers"):
        ranked_layer_mask([], 64, 500)


def test_inspect_layers_with_mask():
    scores, _, mask = swa_scores()
    info = inspect_layers(scores, 8, l_min=3, l_obs=2, budget=72, layer_mask=mask)
    assert info["selected_layer"] == 11
    assert [d["ranked"] for d in info["layers"]] == mask.tolist()
    assert all(d["variance_ratio"] is None for d in info["layers"] if not d["ranked"])
