"""SnapKV pruned layer by layer (issue 23, peak memory): every layer keeps its own per-head top-k of
its own scores, so a layer-major prefill can prune each layer as soon as it ran and hold one layer
of full-prompt K/V instead of all of them. It must keep the same cells, give the same logits and
decode the same as SnapKV's ordinary prefill; where it cannot stream, auto falls back to ordinary."""
from __future__ import annotations

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

pytestmark = pytest.mark.native

N_LAYER = tinymodels.DENSE_N_LAYER


def _run(model, t, policy, fa=False, follow=(5, 9, 11), n_batch=128):
    """run() followed by decoding `follow`: (Pruned, logits per step)."""
    pr = strategies.run(model, t, policy, max_tokens=8, n_batch=n_batch, flash_attn=fa)
    steps = []
    for tok in follow:
        pr.ctx.decode([tok])
        steps.append(pr.ctx.logits())
    return pr, steps


def _assert_same(model, layered, ordinary, exact=True):
    (a, sa), (b, sb) = layered, ordinary
    close = np.testing.assert_array_equal if exact else \
        (lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-3))
    try:
        assert a.strategy == "layer-major" and a.extra.get("scratch_kv") == "one layer"
        assert b.strategy == "ordinary"
        np.testing.assert_array_equal(a.selection.per_head, b.selection.per_head)
        assert a.n_kept == b.n_kept and a.kv_bytes_full == b.kv_bytes_full and a.prefill_work == 1.0
        close(a.logits, b.logits)
        for x, y in zip(sa, sb):
            close(x, y)
        n = a.n_kept + len(sa)
        for il in range(model.n_layer):
            assert list(a.ctx.cell_positions(il, n)) == list(b.ctx.cell_positions(il, n))
        assert a.ctx.n_ctx == b.ctx.n_ctx
    finally:
        a.ctx.close()
        b.ctx.close()


@pytest.mark.parametrize("fa", [False, True], ids=["fa-off", "fa-on"])
@pytest.mark.parametrize("span", ["token", "forward:8"])
def test_layer_by_layer_equals_ordinary(tiny_dense, fa, span):
    t = toks(tiny_dense, 300, seed=3)
    pol = P.SnapKV(budget=64, window=16, span=span)
    assert pol.strategy(tiny_dense) == "layer-major"
    _assert_same(tiny_dense, _run(tiny_dense, t, pol, fa), _run(tiny_dense, t, pol.replace(prefill="ordinary"), fa))


def test_layer_by_layer_equals_ordinary_smollm2(smollm2):
    text = (Path(__file__).resolve().parent.parent / "examples" / "long_prompt.txt").read_text()
    t = smollm2.tokenize(text)[:1500]
    pol = P.SnapKV(budget=256)
    # the pass splits 1,500 queries into the same ubatches as the ordinary prefill (n_batch 512):
    # same arithmetic, so the same logits bit for bit
    _assert_same(smollm2, _run(smollm2, t, pol, n_batch=512), _run(smollm2, t, pol.replace(prefill="ordinary"),
                                                                    n_batch=512))


def test_shared_prefill_derives_the_same_cells(tiny_dense):
    """The benchmark's shared prefill finishes a layer-major SnapKV as the ordinary one."""
    t = toks(tiny_dense, 300, seed=5)
    pol = P.SnapKV(budget=64, window=16)
    d = SharedPrefill(tiny_dense, t, window=16, n_batch=128).derive(pol, max_tokens=8)
    pr = strategies.run(tiny_dense, t, pol.replace(prefill="ordinary"), max_tokens=8, n_batch=128)
    try:
        assert d.n_kept == pr.n_kept and d.prefill_work == 1.0
        for il in range(tiny_dense.n_layer):
            assert list(d.ctx.cell_positions(il, d.n_kept)) == list(pr.ctx.cell_positions(il, pr.n_kept))
        np.testing.assert_allclose(d.logits, pr.logits, rtol=1e-4, atol=1e-3)
    finally:
        d.ctx.close()
        pr.ctx.close()


def test_prefill_option():
    gemma = Model(tinymodels.tiny_model_path("gemma3", n_layer=N_LAYER))
    assert P.SnapKV(budget=64).strategy(gemma) == "ordinary"  # sliding-window layers: cannot stream
    with pytest.raises(ValueError, match="sliding-window"):
        P.SnapKV(budget=64, prefill="layer-major").check_model(gemma)
    with pytest.raises(ValueError, match="prefill must be auto, layer-major or ordinary"):
        P.SnapKV(budget=64, prefill="sideways")
    p = P.SnapKV(budget=64, prefill="ordinary")
    assert p.to_dict()["prefill"] == "ordinary" and P.Policy.from_dict(p.to_dict()) == p
    assert P.policy_from_options("snapkv", budget=64, prefill_mode="ordinary") == p
