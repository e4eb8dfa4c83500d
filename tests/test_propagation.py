"""Propagation wider than the budget (pyasl.policies.propagation, FastKV's TSP length): the selection
layer's top `propagate` tokens run through the deeper layers, each of which keeps its own SnapKV
sets of `budget` cells from them."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tinymodels  # noqa: E402
from kvcheck import random_tokens as toks  # noqa: E402

from pyasl import policies as P  # noqa: E402
from pyasl.bench.shared import SharedPrefill  # noqa: E402
from pyasl.engine import Model, strategies  # noqa: E402
from pyasl.policies.options import policy_from_options  # noqa: E402

pytestmark = pytest.mark.native

FOLLOW = (5, 9, 11)


def _run(model, t, policy, fa=False):
    """strategies.run's Pruned and the logits of decoding FOLLOW after it."""
    pr = strategies.run(model, t, policy, max_tokens=8, n_batch=128, flash_attn=fa)
    steps = []
    for tok in FOLLOW:
        pr.ctx.decode([tok])
        steps.append(pr.ctx.logits())
    return pr, steps


def _stored(policy):
    """The same policy on the path that keeps every layer's full K/V until the selection layer."""
    p = policy.replace()
    p.streams_early_layers = lambda model: False
    return p


def test_propagate_equal_to_the_budget_is_the_default(tiny_dense):
    t = toks(tiny_dense, 300, seed=1)
    for a, b in ((P.FastKV(layer=2, budget=64, window=16, propagate=64), P.FastKV(layer=2, budget=64, window=16)),
                 (P.ASL(budget=64, window=16, tau=0.9, propagate=64), P.ASL(budget=64, window=16, tau=0.9))):
        assert a == b and "propagate" not in a.params()
        (pa, sa), (pb, sb) = _run(tiny_dense, t, a), _run(tiny_dense, t, b)
        try:
            np.testing.assert_array_equal(pa.logits, pb.logits)
            for x, y in zip(sa, sb):
                np.testing.assert_array_equal(x, y)
            assert "propagated" not in pa.extra and pa.prefill_work == pb.prefill_work
        finally:
            pa.ctx.close()
            pb.ctx.close()


@pytest.mark.parametrize("fa", [False, True], ids=["fa-off", "fa-on"])
def test_wide_propagation_keeps_the_budget_and_streams_as_stored(tiny_dense, fa):
    m, n, k = tiny_dense, 300, 64
    t = toks(m, n, seed=2)
    pol = P.FastKV(layer=2, budget=k, window=16, propagate=160)
    (a, sa), (b, sb) = _run(m, t, pol, fa), _run(m, t, _stored(pol), fa)
    try:
        assert a.extra["propagated"] == b.extra["propagated"] >= 160
        assert a.extra.get("scratch_kv") == "one layer"
        assert a.n_kept == b.n_kept == k and a.ctx.kv_info().used_base == k + len(FOLLOW)
        want = (3 * n + (m.n_layer - 3) * a.extra["propagated"]) / (m.n_layer * n)
        assert a.prefill_work == pytest.approx(want) and b.prefill_work == pytest.approx(want)
        np.testing.assert_array_equal(a.logits, b.logits)
        for x, y in zip(sa, sb):
            np.testing.assert_array_equal(x, y)
        # the decode context continues after the prompt; each cell holds at most the prompt's positions
        pos = a.ctx.cell_positions(m.n_layer - 1, k + len(FOLLOW))
        assert list(pos[k:]) == [n, n + 1, n + 2] and pos[k - 1] == n - 1 and np.all(np.diff(pos) > 0)
    finally:
        a.ctx.close()
        b.ctx.close()


def test_wide_propagation_scratch_holds_one_layer(tiny_dense, monkeypatch):
    """The propagated tokens go through the deeper layers layer by layer in a scratch storing one
    layer of K/V, in the pass's ubatches: the wider set costs one layer of its K/V, not every layer's."""
    pf = importlib.import_module("pyasl.engine.prefill")
    scratches = []

    class Seen(pf.Context):
        def close(self):
            if self._cap and not self.__dict__.get("_closed"):
                scratches.append((self.kv_info(), self.n_batch))
            super().close()

    monkeypatch.setattr(pf, "Context", Seen)
    monkeypatch.setattr(pf, "PASS_ATTN_BYTES", 1)  # the smallest ubatch the pass takes: 32 queries
    m = tiny_dense
    pr = strategies.run(m, toks(m, 300, seed=6), P.FastKV(layer=2, budget=64, window=16, propagate=160),
                        max_tokens=8, n_batch=128)
    try:
        assert pr.extra["propagated"] >= 160
        # the pass before the selection layer and the propagation: one layer each, 32-query ubatches
        assert len(scratches) == 2 and [info.n_layer_base for info, _ in scratches] == [1, 1]
        assert [nb for _, nb in scratches] == [32, 32]
    finally:
        pr.ctx.close()


def test_propagating_every_token_is_snapkv(tiny_dense):
    """With every token propagated the deeper layers see the whole prompt, so each keeps its SnapKV
    sets: the cache is SnapKV's."""
    m, n = tiny_dense, 300
    t = toks(m, n, seed=3)
    (a, sa), (b, sb) = (_run(m, t, P.FastKV(layer=2, budget=64, window=16, propagate=n)),
                        _run(m, t, P.SnapKV(budget=64, window=16)))
    try:
        assert a.extra["propagated"] == n and a.prefill_work == pytest.approx(1.0)
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-4, atol=1e-4)
        for x, y in zip(sa, sb):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)
    finally:
        a.ctx.close()
        b.ctx.close()


def test_wider_sets_grow_from_the_kept_set():
    rng = np.random.default_rng(0)
    scores = rng.random((4, 4, 400)).astype(np.float32)
    for span in ("token", "forward:8"):
        pol = P.FastKV(layer=3, budget=64, window=16, propagate=200, span=span)
        kept = P.asl_select_at_layer(scores, 16, 64, 3, span=span)
        wide = pol.propagated(scores, kept)
        assert set(kept) <= set(wide) and 200 <= len(wide) <= 200 + len(kept)
        assert np.all(np.diff(wide) > 0) and set(range(384, 400)) <= set(wide)
        assert np.array_equal(P.FastKV(layer=3, budget=64, window=16, span=span).propagated(scores, kept), kept)


def test_shared_prefill_derives_wide_propagation(tiny_dense):
    m = tiny_dense
    t = toks(m, 300, seed=4)
    pol = P.FastKV(layer=2, budget=64, window=16, propagate=128)
    sp = SharedPrefill(m, t, window=16, n_batch=128)
    d = sp.derive(pol, max_tokens=8)
    pr = strategies.run(m, t, pol, max_tokens=8, n_batch=128)
    try:
        assert d.n_kept == pr.n_kept == 64 and d.prefill_work == pytest.approx(pr.prefill_work)
        np.testing.assert_allclose(d.logits, pr.logits, rtol=1e-4, atol=1e-4)
        for tok in FOLLOW:
            d.ctx.decode([tok])
            pr.ctx.decode([tok])
            np.testing.assert_allclose(d.ctx.logits(), pr.ctx.logits(), rtol=1e-4, atol=1e-4)
    finally:
        d.ctx.close()
        pr.ctx.close()


def test_bad_propagate_is_refused(tiny_dense):
    with pytest.raises(ValueError, match="smaller than the budget"):
        P.FastKV(budget=64, propagate=32)
    with pytest.raises(ValueError, match="must be an integer"):
        P.ASL(budget=64, propagate=100.5)
    with pytest.raises(ValueError, match="layer budgets"):
        P.ASL(budget=64, propagate=128, layer_budgets="zigzag")
    with pytest.raises(ValueError, match="layer-major"):
        P.ASL(budget=64, propagate=128, prefill="ordinary").check_model(tiny_dense)
    gemma = Model(tinymodels.tiny_model_path("gemma3", n_layer=tinymodels.DENSE_N_LAYER))
    with pytest.raises(ValueError, match="sliding-window"):
        P.ASL(budget=64, propagate=128).check_model(gemma)
    # the options interface passes it to the policies that take it
    assert policy_from_options("fastkv", budget=64, propagate=128).propagate == 128
    assert policy_from_options("asl", budget=64, propagate=128).to_dict()["propagate"] == 128


def test_kept_variant_keeps_the_selection_layers_set_in_the_deeper_layers(tiny_dense):
    """propagate="n:kept" with every token propagated: the deeper layers run over the whole prompt and
    keep the selection layer's set, which is what fastkv's in-place pruning of a full prefill keeps."""
    from pyasl.engine.strategies import finish_ordinary

    m, n = tiny_dense, 300
    t = toks(m, n, seed=5)
    pol = P.FastKV(layer=2, budget=64, window=16, propagate=f"{n}:kept")
    assert pol.to_dict()["propagate"] == f"{n}:kept" and P.Policy.from_dict(pol.to_dict()) == pol
    a, sa = _run(m, t, pol)
    sp = SharedPrefill(m, t, window=16, n_batch=128)
    sel = P.FastKV(layer=2, budget=64, window=16).select(sp.scores, 16, m)
    b, _, _ = finish_ordinary(sp._full(1), sel, n, 8, n_batch=128)
    try:
        assert a.extra["propagated"] == n
        np.testing.assert_allclose(a.logits, sp.logits, rtol=1e-4, atol=1e-4)
        for tok, x in zip(FOLLOW, sa):
            b.decode([tok])
            np.testing.assert_allclose(x, b.logits(), rtol=1e-4, atol=1e-4)
    finally:
        a.ctx.close()
        b.close()


def test_propagate_spec_is_parsed_once():
    from pyasl.policies.propagation import parse_propagate

    assert parse_propagate(None) == (None, "own") and parse_propagate(300) == (300, "own")
    assert parse_propagate("300") == (300, "own") and parse_propagate("300:kept") == (300, "kept")
    for bad in ("300:all", "x", "300.5", 2.5, True):
        with pytest.raises(ValueError, match="propagate must be"):
            parse_propagate(bad)
