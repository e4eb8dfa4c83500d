"""Streamed layer-major prefill (issue 23, peak memory): the scratch context stores one layer of K/V
(patches/0005) and each layer is pruned into the decode context before the next one runs. The
decode context must equal the one of the path that holds every layer's full K/V until the selection
layer; the native calls that do it refuse bad input."""
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
from pyasl.engine import Context, Model, prefill  # noqa: E402
from pyasl.engine import strategies  # noqa: E402
from pyasl.engine.prefill import layer_major_pass  # noqa: E402

pytestmark = pytest.mark.native

N_LAYER = tinymodels.DENSE_N_LAYER


def _stored(policy):
    """The same policy on the path that keeps every layer's full K/V until the selection layer."""
    p = policy.replace()
    p.streams_early_layers = lambda model: False
    return p


def _both(model, t, policy, fa, follow=(5, 9, 11)):
    """(streamed, stored) Pruned of run(), each followed by decoding `follow` (logits per step)."""
    out = []
    for pol in (policy, _stored(policy)):
        pr = strategies.run(model, t, pol, max_tokens=8, n_batch=128, flash_attn=fa)
        steps = []
        for tok in follow:
            pr.ctx.decode([tok])
            steps.append(pr.ctx.logits())
        out.append((pr, steps))
    return out


def _assert_same(streamed, stored, model):
    (a, sa), (b, sb) = streamed, stored
    try:
        assert a.extra.get("scratch_kv") == "one layer" and "scratch_kv" not in b.extra
        assert a.stop_layer == b.stop_layer and np.array_equal(a.kept, b.kept)
        assert a.n_kept == b.n_kept and a.prefill_work == b.prefill_work and a.kv_bytes_full == b.kv_bytes_full
        np.testing.assert_array_equal(a.logits, b.logits)
        np.testing.assert_array_equal(a.scores, b.scores)
        for x, y in zip(sa, sb):
            np.testing.assert_array_equal(x, y)
        n = a.n_kept + len(sa)
        for il in range(model.n_layer):
            assert list(a.ctx.cell_positions(il, n)) == list(b.ctx.cell_positions(il, n))
    finally:
        a.ctx.close()
        b.ctx.close()


@pytest.mark.parametrize("fa", [False, True], ids=["fa-off", "fa-on"])
@pytest.mark.parametrize("layer", [2, N_LAYER - 1], ids=["propagated", "last-layer"])
def test_streamed_equals_stored_fastkv(tiny_dense, fa, layer):
    t = toks(tiny_dense, 300, seed=layer)
    _assert_same(*_both(tiny_dense, t, P.FastKV(layer=layer, budget=64, window=16), fa), tiny_dense)


@pytest.mark.parametrize("span", [None, "forward:8"])
def test_streamed_equals_stored_asl(tiny_dense, span):
    t = toks(tiny_dense, 300, seed=7)
    _assert_same(*_both(tiny_dense, t, P.ASL(budget=64, window=16, tau=0.9, span=span), False), tiny_dense)


def test_streamed_equals_stored_smollm2(smollm2):
    text = (Path(__file__).resolve().parent.parent / "examples" / "long_prompt.txt").read_text()
    t = smollm2.tokenize(text)[:1000]
    for pol in (P.FastKV(budget=256), P.ASL(budget=256, tau=0.3)):
        _assert_same(*_both(smollm2, t, pol, False), smollm2)


def test_layer_budgets_keep_every_layer_until_the_selection_layer(tiny_dense):
    """Per-layer budgets rank all early layers at once: that policy cannot stream."""
    m = tiny_dense
    assert not P.ASL(budget=64, layer_budgets="zigzag").streams_early_layers(m)
    assert not P.FastKV(budget=64, layer_budgets="pyramid").streams_early_layers(m)
    assert P.ASL(budget=64).streams_early_layers(m) and P.FastKV(budget=64).streams_early_layers(m)
    pr = strategies.run(m, toks(m, 300), P.FastKV(layer=2, budget=64, window=16, layer_budgets="zigzag"),
                        max_tokens=4, n_batch=128)
    try:
        assert "scratch_kv" not in pr.extra and pr.layer_budgets is not None
    finally:
        pr.ctx.close()


def test_sliding_window_models_do_not_stream():
    gemma = Model(tinymodels.tiny_model_path("gemma3", n_layer=N_LAYER))
    assert not P.ASL(budget=64).streams_early_layers(gemma)


def test_scratch_context_stores_one_layer(tiny_dense):
    m = tiny_dense
    with Context(m, 512, one_layer_kv=True) as one, Context(m, 512) as every:
        a, b = one.kv_info(), every.kv_info()
        assert a.n_layer_base == 1 and b.n_layer_base == m.n_layer
        assert a.cell_bytes_base * m.n_layer == b.cell_bytes_base
    # the flag is cleared after creating the context: the next one stores every layer again
    with Context(m, 512) as again:
        assert again.kv_info().n_layer_base == m.n_layer


def test_one_layer_pass_scores_and_hidden_equal_every_layer(tiny_dense):
    """Each layer's pass reads only its own K/V, so sharing one layer's storage changes nothing."""
    m = tiny_dense
    t = toks(m, 300, seed=3)
    runs = []
    for one in (True, False):
        seen = []
        A, scores, Hs, stop, _ = layer_major_pass(m, t, 16, lambda l, s: (l == 3, None), n_batch=128,
                                                  keep_all_hidden=True, one_layer_kv=one,
                                                  on_layer=lambda l, A, s: seen.append(A.kv_info().n_layer_base))
        A.close()
        assert stop == 3 and seen == [1 if one else m.n_layer] * 4
        runs.append((scores, Hs))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    for x, y in zip(runs[0][1], runs[1][1]):
        np.testing.assert_array_equal(x, y)


def test_in_place_hidden_states_equal_copies(tiny_dense):
    """Without keep_all_hidden the pass overwrites each ubatch's input with its output."""
    m = tiny_dense
    t = toks(m, 300, seed=4)
    out = []
    for keep in (True, False):
        A, _, Hs, _, _ = layer_major_pass(m, t, 16, lambda l, s: (l == 2, None), n_batch=128, keep_all_hidden=keep)
        A.close()
        out.append(Hs[-1])
    np.testing.assert_array_equal(out[0], out[1])


def test_pass_ubatch_bounds_the_attention_weights():
    """FA off: as many queries per ubatch as fit the pass's attention budget, a multiple of 32 between
    max(32, window) and n_batch; FA on: PASS_FA_UBATCH (at most n_batch)."""
    from pyasl.engine.prefill import PASS_ATTN_BYTES, PASS_FA_UBATCH, pass_ubatch

    class M:
        n_head = 14
    for n in (300, 4096, 8192, 16384, 32768, 131072):
        u = pass_ubatch(M, n, 512, 32, False)
        assert 32 <= u <= 512 and u % 32 == 0
        assert u * n * M.n_head * 6 <= PASS_ATTN_BYTES or u == 32
        assert pass_ubatch(M, n, 512, 32, True) == PASS_FA_UBATCH  # flash attention: activations only
        assert pass_ubatch(M, n, 512, 64, False) >= 64
    assert pass_ubatch(M, 300, 128, 16, False) == 128  # a short prompt keeps the caller's ubatch
    assert pass_ubatch(M, 16384, 512, 32, False) == 96  # 128 MiB / (16K x 14 heads x 6 bytes)
    assert pass_ubatch(M, 4096, 128, 32, True) == 128


@pytest.mark.parametrize("flash_attn", [False, True])
def test_smaller_pass_ubatches_change_nothing(tiny_dense, monkeypatch, flash_attn):
    """A pass in ubatches of 32 (a long prompt's) keeps the same tokens and decodes the same: every
    query's attention and every row's matmuls do not depend on which ubatch holds it."""
    PF = importlib.import_module("pyasl.engine.prefill")  # the module (pyasl.engine.prefill is the function)

    t = toks(tiny_dense, 300, seed=9)
    out = []
    for cap in (None, 1):
        if cap is not None:  # the floor: 32 queries per ubatch
            monkeypatch.setattr(PF, "PASS_FA_UBATCH" if flash_attn else "PASS_ATTN_BYTES", cap)
        A, scores, Hs, stop, _ = layer_major_pass(tiny_dense, t, 16, lambda l, s: (l == 3, None), n_batch=128,
                                                  flash_attn=flash_attn)
        out.append((A.n_batch, scores, Hs[-1]))
        A.close()
        pr = strategies.run(tiny_dense, t, P.FastKV(layer=2, budget=64, window=16), max_tokens=4, n_batch=128,
                            flash_attn=flash_attn)
        try:
            out[-1] += (pr.kept, pr.logits, pr.ctx.n_batch)
        finally:
            pr.ctx.close()
    (nb0, s0, h0, k0, l0, d0), (nb1, s1, h1, k1, l1, d1) = out
    assert (nb0, nb1) == (128, 32) and d0 == d1 == 128  # the decode context keeps the caller's n_batch
    # flash attention on the CPU takes a tiled kernel for larger ubatches (F16 accumulation): close, not equal
    for a, b, atol in ((s1, s0, 1e-6), (h1, h0, 1e-5), (l1, l0, 1e-4)):
        np.testing.assert_allclose(a, b, atol=5e-3 * np.abs(b).max() if flash_attn else atol)
    assert np.array_equal(k0, k1)


def _filled(m, n=300, seed=5):
    c = Context(m, 512, n_batch=128, capture=True)
    prefill(c, toks(m, n, seed=seed))
    return c


def test_gather_and_set_positions_refuse_bad_input(tiny_dense):
    m = tiny_dense
    H = m.n_head_kv
    with _filled(m) as src, Context(m, 256) as dst:
        good = np.tile(np.arange(0, 100, 2, dtype=np.int32), (H, 1))
        dst.kv_gather_layer_from(src, 0, good)
        bad = good.copy()
        bad[0, [3, 4]] = bad[0, [4, 3]]
        with pytest.raises(RuntimeError, match="strictly increasing"):
            dst.kv_gather_layer_from(src, 0, bad)
        with pytest.raises(RuntimeError, match="not in the KV cache"):
            dst.kv_gather_layer_from(src, 0, good + 400)
        with pytest.raises(RuntimeError, match="bad layer"):
            dst.kv_gather_layer_from(src, m.n_layer, good)
        with pytest.raises(ValueError, match="n_head_kv"):
            dst.kv_gather_layer_from(src, 0, good[:1] if H > 1 else np.vstack([good, good]))
        with pytest.raises(ValueError, match="integers"):
            dst.kv_gather_layer_from(src, 0, good.astype(np.float32))
        with pytest.raises(RuntimeError, match="do not fit"):
            dst.kv_gather_layer_from(src, 0, np.tile(np.arange(300, dtype=np.int32), (H, 1)))
        with pytest.raises(RuntimeError, match="strictly increasing"):
            dst.set_cell_positions([3, 2])
        with pytest.raises(RuntimeError, match="bad sizes"):
            dst.set_cell_positions(np.arange(1000))
        with pytest.raises(ValueError, match="non-empty"):
            dst.set_cell_positions([])
        dst.set_cell_positions(np.arange(0, 100, 2))
        assert dst.n_past == 99 and dst.kv_info().used_base == 50
    with _filled(m) as src, Context(m, 256, flash_attn=True) as dst:
        with pytest.raises(RuntimeError, match="store V differently"):
            dst.kv_gather_layer_from(src, 0, np.tile(np.arange(10, dtype=np.int32), (H, 1)))


def test_gather_refuses_sliding_window_caches():
    gemma = Model(tinymodels.tiny_model_path("gemma3", n_layer=N_LAYER))
    with _filled(gemma, 100) as src, Context(gemma, 256) as dst:
        with pytest.raises(RuntimeError, match="sliding-window"):
            dst.kv_gather_layer_from(src, 1, np.tile(np.arange(10, dtype=np.int32), (gemma.n_head_kv, 1)))
        with pytest.raises(RuntimeError, match="sliding-window"):
            dst.set_cell_positions([0, 1, 2])
