"""Layer-major prefill (issue 3): layer ranges on hidden states (patches/0003), cell reuse,
one-shot token-selective propagation (asl, fastkv)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tinymodels  # noqa: E402
from pyasl import _native  # noqa: E402

from pyasl import policies as P  # noqa: E402
from pyasl import generate  # noqa: E402
from pyasl.engine import (Context, Model, layer_major_prefill, layer_major_supported, prefill,  # noqa: E402
                          ranked_layer_mask)
from pyasl.models import fetch_model  # noqa: E402

pytestmark = pytest.mark.native

N_LAYER = tinymodels.DENSE_N_LAYER


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3", "qwen3", "phi3", "mistral3"])
def tiny(request) -> Model:
    return Model(tinymodels.tiny_model_path(request.param, n_layer=N_LAYER))


@pytest.fixture(scope="module")
def tiny_llama() -> Model:
    return Model(tinymodels.tiny_model_path("llama", n_layer=N_LAYER))


@pytest.fixture(scope="module")
def smollm2() -> Model:
    return Model(fetch_model("smollm2"))


def toks(model: Model, n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    lo = 300 if model.n_vocab > 1000 else 4
    return [int(t) for t in rng.integers(lo, model.n_vocab, n)]


def _split_equals_whole(model: Model, n: int, a: int, n_batch: int = 128):
    """Layers [0, a) over every ubatch, then [a, N) over every ubatch (cell reuse) == the whole model.
    Sliding-window models: the second pass refills the (emptied) sliding-window cache."""
    t = toks(model, n)
    n_ctx = max(512, ((n + 1 + 255) // 256) * 256)
    with Context(model, n_ctx, n_batch=n_batch) as ref:
        for i in range(0, n, n_batch):
            ref.decode(t[i:i + n_batch], logits_last=i + n_batch >= n)
        want = ref.logits()
        ref.decode([t[0]])
        want2 = ref.logits()
    with Context(model, n_ctx, n_batch=n_batch) as c:
        c.set_layer_range(0, a)
        c.set_hidden_output(a)
        h = np.empty((n, model.n_embd), dtype=np.float32)
        for i in range(0, n, n_batch):
            c.decode(t[i:i + n_batch], logits_last=False)
            h[i:i + n_batch] = c.hidden(len(t[i:i + n_batch]))
        c.set_hidden_output(None)
        c.set_layer_range(a, model.n_layer)
        c.set_reuse_cells(True)
        for i in range(0, n, n_batch):
            c.decode_hidden(h[i:i + n_batch], list(range(i, min(i + n_batch, n))), logits_last=i + n_batch >= n)
        got = c.logits()
        c.set_reuse_cells(False)
        c.set_layer_range(0, model.n_layer)
        c.decode([t[0]])
        got2 = c.logits()
    return want, got, want2, got2


def test_layer_range_split_equals_whole_tiny(tiny):
    # gemma3: 400 tokens > its sliding window (64) and > the SWA cache an ordinary context gets (256)
    want, got, want2, got2 = _split_equals_whole(tiny, 400 if tiny.n_swa else 200, 2)
    assert np.array_equal(want, got)
    assert np.array_equal(want2, got2)


@pytest.mark.real
def test_layer_range_split_equals_whole_smollm2(smollm2):
    want, got, want2, got2 = _split_equals_whole(smollm2, 300, 11)
    assert np.array_equal(want, got)
    assert np.array_equal(want2, got2)


def test_arming_a_hidden_output_between_same_shaped_ubatches_rebuilds_the_graph(tiny_llama):
    # pyasl_set_hidden_output sets the flag without rebuilding the scheduler (a layer-major pass arms
    # one per layer): the graph of the previous ubatch (same shape, same outputs) is rebuilt with the
    # hidden output marked as a graph output (patches/0003 compares the flags), not reused without it
    m, nb = tiny_llama, 64
    t = toks(m, 3 * nb, seed=3)
    with Context(m, 256, n_batch=nb) as ref:
        ref.set_hidden_output(3)
        for i in range(3):
            ref.decode(t[i * nb:(i + 1) * nb], logits_last=False)
            if i == 1:
                want = ref.hidden(nb).copy()
    with Context(m, 256, n_batch=nb) as c:
        c.decode(t[:nb], logits_last=False)
        c.set_hidden_output(3)
        c.decode(t[nb:2 * nb], logits_last=False)
        assert np.array_equal(c.hidden(nb), want)
        c.set_hidden_output(None)
        c.decode(t[2 * nb:], logits_last=True)
        assert np.all(np.isfinite(c.logits()))


def test_bad_layer_ranges_are_refused(tiny_llama):
    with Context(tiny_llama, 256) as c:
        for a, b in [(-1, 2), (3, 3), (4, 2), (0, N_LAYER + 1)]:
            with pytest.raises(_native.PyaslError, match="layer range"):
                c.set_layer_range(a, b)
        with pytest.raises(_native.PyaslError, match="hidden output"):
            c.set_hidden_output(N_LAYER + 1)


def _ordinary(model, t, window, n_batch=128):
    with Context(model, 512, n_batch=n_batch, capture=True) as c:
        return prefill(c, t, window=window)


@pytest.mark.parametrize("fa", [False, True], ids=["fa-off", "fa-on"])
def test_layer_major_without_selection_equals_ordinary(tiny_llama, fa):
    m = tiny_llama
    t = toks(m, 300, seed=1)
    with Context(m, 512, n_batch=128, capture=True, flash_attn=fa) as c:
        ref = prefill(c, t, window=16)
    lm = layer_major_prefill(m, t, "fastkv", budget=64, window=16, layer=N_LAYER - 1, n_batch=128, max_tokens=4,
                             flash_attn=fa)
    assert lm.stop_layer == N_LAYER - 1 and lm.prefill_work == 1.0
    np.testing.assert_allclose(lm.logits, ref.logits, atol=1e-5 if not fa else 2e-3)
    np.testing.assert_allclose(lm.scores, ref.scores, atol=1e-6 if not fa else 2e-3)
    lm.ctx.close()


def test_one_shot_keeping_everything_equals_full(tiny_llama):
    m = tiny_llama
    n = 300
    t = toks(m, n, seed=2)
    ref = _ordinary(m, t, 16)
    lm = layer_major_prefill(m, t, "fastkv", budget=n, window=16, layer=2, n_batch=128, max_tokens=4)
    assert lm.n_kept == n
    np.testing.assert_allclose(lm.logits, ref.logits, atol=1e-5)
    with Context(m, 512, n_batch=128) as c:
        for i in range(0, n, 128):
            c.decode(t[i:i + 128], logits_last=False)
        c.decode([7])
        want = c.logits()
    lm.ctx.decode([7])
    np.testing.assert_allclose(lm.ctx.logits(), want, atol=1e-5)
    lm.ctx.close()


def test_fastkv_at_last_layer_keeps_the_asl_tokens_of_that_layer(tiny_llama):
    m = tiny_llama
    t = toks(m, 300, seed=3)
    ref = _ordinary(m, t, 16)
    lm = layer_major_prefill(m, t, "fastkv", budget=64, window=16, layer=N_LAYER - 1, n_batch=128, max_tokens=4)
    want = P.asl_select_at_layer(ref.scores, window=16, budget=64, layer=N_LAYER - 1)
    assert np.array_equal(lm.kept, want)
    lm.ctx.close()


def test_one_shot_propagation_budget_and_decoding(tiny_llama):
    m = tiny_llama
    n = 300
    t = toks(m, n, seed=4)
    lm = layer_major_prefill(m, t, "fastkv", budget=64, window=16, layer=2, n_batch=128, max_tokens=8)
    info = lm.ctx.kv_info()
    assert info.used_base == 64 and lm.n_kept == 64
    assert lm.prefill_work == pytest.approx((3 * n + 3 * 64) / (6 * n))
    # layers after the selection layer hold exactly the kept tokens: the cells' positions
    assert list(lm.ctx.cell_positions(N_LAYER - 1, 64)) == list(lm.kept)
    assert lm.kept[-1] == n - 1 and len(set(range(n - 16, n)) - set(lm.kept)) == 0
    for tok in (5, 9, 11):
        lm.ctx.decode([tok])
        assert np.isfinite(lm.ctx.logits()).all()
    lm.ctx.close()


def test_generate_fastkv_and_asl_layer_major(tiny_llama):
    m = tiny_llama
    t = toks(m, 300, seed=5)
    r = generate(m, t, policy="fastkv", layer=2, budget=64, window=16, max_tokens=6, n_batch=128)
    assert r.selected_layer == 2 and r.n_kept == 64 and r.prefill_work < 1
    assert r.kv_bytes * 300 == r.kv_bytes_full * 64
    r = generate(m, t, policy="asl", budget=64, window=16, max_tokens=6, n_batch=128)
    assert r.asl["prefill"] == "layer-major" and r.n_kept == 64
    with pytest.raises(ValueError, match="--layer"):
        generate(m, t, policy="fastkv", layer=m.n_layer, budget=64, window=16)
    # without --layer: 15 of 32 layers, scaled by depth
    r = generate(m, t, policy="fastkv", budget=64, window=16, max_tokens=2, n_batch=128)
    assert r.selected_layer == round(15 * m.n_layer / 32)


# ---- sliding-window (iSWA) models: Gemma 3 ------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gemma3() -> Model:
    """6 layers: 0, 2, 4 sliding-window (64 tokens), 1, 3, 5 global."""
    return Model(tinymodels.tiny_model_path("gemma3", n_layer=N_LAYER))


def c_bytes(ctx: Context, cache: str) -> int:
    info = ctx.kv_info()
    return info.cell_bytes_base if cache == "base" else info.cell_bytes_swa


def _cell_positions_by_layer(ctx: Context, model: Model, n: int) -> list[list[int]]:
    return [[int(p) for p in ctx.cell_positions(il, n) if p >= 0] for il in range(model.n_layer)]


@pytest.mark.parametrize("fa", [False, True], ids=["fa-off", "fa-on"])
def test_gemma3_layer_major_without_selection_equals_ordinary(tiny_gemma3, fa):
    m = tiny_gemma3
    assert layer_major_supported(m) is None and m.swa_layers == [True, False] * 3
    n = 300  # > n_swa = 64 and > the 256-cell SWA cache of an ordinary context
    t = toks(m, n, seed=1)
    lm = layer_major_prefill(m, t, "fastkv", budget=64, window=16, layer=N_LAYER - 1, n_batch=128, max_tokens=4,
                             flash_attn=fa)
    assert lm.stop_layer == N_LAYER - 1 and lm.prefill_work == 1.0
    # each layer's pass fills the sliding-window cache as the ordinary prefill does: identical
    with Context(m, 512, n_batch=128, capture=True, flash_attn=fa) as c:
        ref = prefill(c, t, window=16)
        used_swa = c.kv_info().used_swa
    np.testing.assert_array_equal(lm.logits, ref.logits)
    np.testing.assert_array_equal(lm.scores, ref.scores)
    assert lm.kv_bytes_full == 300 * c_bytes(lm.ctx, "base") + used_swa * c_bytes(lm.ctx, "swa")
    # sliding-window layers: the last n_swa positions, as llama.cpp's own state keeps them
    info = lm.ctx.kv_info()
    assert info.used_base == 64 and info.used_swa == m.n_swa
    assert lm.ctx.cell_positions(0, 64).tolist() == list(range(n - 64, n))
    lm.ctx.close()


@pytest.mark.parametrize("fa", [False, True], ids=["fa-off", "fa-on"])
def test_gemma3_one_shot_keeping_everything_equals_full(tiny_gemma3, fa):
    m = tiny_gemma3
    n = 300
    t = toks(m, n, seed=2)
    with Context(m, 512, n_batch=128, flash_attn=fa) as c:
        for i in range(0, n, 128):
            c.decode(t[i:i + 128], logits_last=i + 128 >= n)
        want0 = c.logits()
        c.decode([7])
        want = c.logits()
        c.decode([9])
        want2 = c.logits()
    for layer in (1, 2, 3):  # selection after a global and after a sliding-window layer
        lm = layer_major_prefill(m, t, "fastkv", budget=n, window=16, layer=layer, n_batch=128, max_tokens=4,
                                 flash_attn=fa)
        assert lm.n_kept == n and lm.prefill_work == 1.0
        tol = 1e-4 if not fa else 1e-2  # the decode context's cells are laid out differently (F16 flash attention)
        np.testing.assert_allclose(lm.logits, want0, atol=tol)
        lm.ctx.decode([7])
        np.testing.assert_allclose(lm.ctx.logits(), want, atol=tol)
        lm.ctx.decode([9])
        np.testing.assert_allclose(lm.ctx.logits(), want2, atol=tol)
        lm.ctx.close()


def test_gemma3_one_shot_propagation(tiny_gemma3):
    m = tiny_gemma3
    n, w, budget = 300, 16, 64
    t = toks(m, n, seed=4)
    lm = layer_major_prefill(m, t, "fastkv", budget=budget, window=w, layer=2, n_batch=128, max_tokens=8)
    # fastkv at a sliding-window layer ranks with the latest global layer before it (1)
    with Context(m, 512, n_batch=128, capture=True) as c:
        ref = prefill(c, t, window=w)
    np.testing.assert_array_equal(lm.kept, P.asl_select_at_layer(ref.scores, w, budget, 1))
    # past layer 2 the kept tokens plus the last n_swa positions went on
    win = list(range(n - m.n_swa, n))
    prop = sorted(set(lm.kept.tolist()) | set(win))
    assert lm.prefill_work == pytest.approx((3 * n + 3 * len(prop)) / (6 * n))
    info = lm.ctx.kv_info()
    assert info.used_base == budget and info.used_swa == m.n_swa and lm.n_kept == budget
    # global layers: the kept tokens; sliding-window layers: the window
    cells = _cell_positions_by_layer(lm.ctx, m, 512)
    for il in range(N_LAYER):
        assert cells[il] == (win if m.swa_layers[il] else lm.kept.tolist())
    # the decode context is sized for the propagated tokens and the generation
    for tok in (5, 9, 11):
        lm.ctx.decode([tok])
        assert np.isfinite(lm.ctx.logits()).all()
    assert lm.ctx.kv_info().used_base == budget + 3
    lm.ctx.close()


def test_gemma3_fastkv_before_the_first_global_layer_is_refused(tiny_gemma3):
    t = toks(tiny_gemma3, 300, seed=5)
    with pytest.raises(ValueError, match="first full-attention layer is 1"):
        layer_major_prefill(tiny_gemma3, t, "fastkv", budget=64, window=16, layer=0, n_batch=128)
    with pytest.raises(ValueError, match="first full-attention layer is 1"):
        generate(tiny_gemma3, t, policy="fastkv", layer=0, budget=64, window=16, max_tokens=2, n_batch=128)
    # a prompt inside the sliding window: every layer attends to everything and may rank
    r = generate(tiny_gemma3, t[:60], policy="fastkv", layer=0, budget=32, window=8, max_tokens=2, n_batch=128)
    assert r.selected_layer == 0 and r.n_kept == 32


def test_gemma3_generate_layer_major(tiny_gemma3):
    m = tiny_gemma3
    n = 300
    t = toks(m, n, seed=6)
    r = generate(m, t, policy="fastkv", layer=3, budget=64, window=16, max_tokens=6, n_batch=128)
    assert r.selected_layer == 3 and r.n_kept == 64 and r.prefill_work < 1 and r.n_generated == 6
    r = generate(m, t, policy="fastkv", layer=4, budget=64, window=16, max_tokens=2, n_batch=128)
    assert "ranks from layer 3" in r.note
    r = generate(m, t, policy="asl", budget=64, window=16, max_tokens=6, n_batch=128, l_min=1, l_obs=2, tau=1.0)
    assert r.asl["prefill"] == "layer-major" and r.n_kept == 64
    # ranks only from global layers; ratios only there
    assert [il for il, x in enumerate(r.asl["variance_ratio"]) if x is not None] == [1, 3, 5]
    assert r.selected_layer in (3, 5, None)
    full = generate(m, t, policy="full", max_tokens=2, n_batch=128)
    assert r.kv_bytes_full == full.kv_bytes_full
    o = generate(m, t, policy="asl", budget=64, window=16, max_tokens=6, n_batch=128, l_min=1, l_obs=2, tau=1.0,
                 prefill_mode="ordinary")
    assert o.asl["prefill"] == "ordinary" and o.selected_layer == r.selected_layer
    assert o.asl["variance_ratio"] == pytest.approx(r.asl["variance_ratio"][: len(o.asl["variance_ratio"])])


def test_gemma3_asl_2pass_layer_major(tiny_gemma3):
    m = tiny_gemma3
    n = 300
    t = toks(m, n, seed=8)
    lm = layer_major_prefill(m, t, "asl-2pass", budget=64, window=16, n_batch=128, max_tokens=4, l_min=1, l_obs=2,
                             tau=1.0)
    L = lm.stop_layer
    assert not m.swa_layers[L] and lm.scores.shape[0] == L + 1
    with Context(m, 512, n_batch=128, capture=True) as c:
        ref = prefill(c, t, window=16)
    np.testing.assert_array_equal(lm.scores, ref.scores[: L + 1])
    with Context(m, 512, n_batch=128, allow_pos_gaps=True) as c:
        kept = [int(x) for x in lm.kept]
        c.decode([t[p] for p in kept], positions=kept)
        np.testing.assert_array_equal(c.logits(), lm.logits)
    lm.ctx.close()


def test_gemma3_cell_reuse_starts_a_pass_on_an_empty_sliding_window_cache(tiny_gemma3):
    with Context(tiny_gemma3, 512, n_batch=256) as c:
        c.decode(toks(tiny_gemma3, 200, seed=9))
        info = c.kv_info()
        assert info.used_base == 200 and info.used_swa == 200
        c.set_reuse_cells(True)
        info = c.kv_info()
        assert info.used_base == 200 and info.used_swa == 0
        c.set_reuse_cells(False)
        assert c.kv_info().used_swa == 0


def test_asl_2pass_first_pass_stops_at_the_selection_layer(tiny_llama):
    m = tiny_llama
    n = 300
    t = toks(m, n, seed=7)
    lm = layer_major_prefill(m, t, "asl-2pass", budget=64, window=16, n_batch=128, max_tokens=4, l_min=1, l_obs=2,
                             tau=1.0)
    # tau = 1 selects the first layer after l_min whose ratio is below 1, if any
    L = lm.stop_layer
    assert lm.scores.shape[0] == L + 1
    assert lm.prefill_work == pytest.approx(((L + 1) * n + N_LAYER * 64) / (N_LAYER * n))
    assert lm.ctx.kv_info().used_base == 64
    assert list(lm.ctx.cell_positions(0, 64)) == list(lm.kept)
    # the second pass is an ordinary prefill of the kept tokens at their positions
    with Context(m, 512, n_batch=128, allow_pos_gaps=True) as c:
        kept = [int(x) for x in lm.kept]
        c.decode([t[p] for p in kept], positions=kept)
        np.testing.assert_array_equal(c.logits(), lm.logits)
    lm.ctx.close()


# ---- Gemma 3 270M (real; sliding window 512, global layers 5, 11, 17) ------------------------

G_N, G_W = 600, 32  # a prompt longer than the sliding window


@pytest.fixture(scope="module")
def gemma270():
    """The model, the first G_N tokens of examples/long_prompt.txt, an ordinary prefill's window scores
    and logits, and the logits after one more token (7)."""
    m = Model(fetch_model("gemma3-270m"))
    text = (Path(__file__).resolve().parent.parent / "examples" / "long_prompt.txt").read_text()
    t = m.tokenize(text)[:G_N]
    assert len(t) == G_N and m.n_swa == 512
    with Context(m, 1024, n_batch=128, capture=True) as c:
        pf = prefill(c, t, window=G_W)
        c.decode([7])
        nxt = c.logits()
    return m, t, pf, nxt


@pytest.mark.real
def test_gemma270_swa_layers_do_not_rank(gemma270):
    m, t, pf, _ = gemma270
    n = len(t)
    glob = [il for il, s in enumerate(m.swa_layers) if not s]
    assert glob == [5, 11, 17]
    # a sliding-window layer's window queries never see the oldest positions: zero scores, rank ties
    for il in range(m.n_layer):
        old = pf.scores[il][:, : n - G_W - m.n_swa + 1]
        assert (np.all(old == 0) if m.swa_layers[il] else np.all(old > 0)), il
    mask = ranked_layer_mask(m, n)
    assert mask.tolist() == [not s for s in m.swa_layers]
    sel = P.asl_select(pf.scores, G_W, 128, layer_mask=mask)
    assert sel.ranking_layer in glob and (sel.selected_layer is None or sel.selected_layer in glob)
    assert [il for il, r in enumerate(sel.variance_ratio) if r is not None] == [11, 17]
    # the kept tokens come from the whole prompt, not only from the last n_swa positions
    assert (sel.kept < n - m.n_swa).sum() > 10
    # layer-major asl makes the same choice, stopping at the same global layer
    lm = layer_major_prefill(m, t, "asl", budget=128, window=G_W, n_batch=128, max_tokens=2)
    assert lm.stop_layer == (17 if sel.selected_layer is None else sel.selected_layer)
    np.testing.assert_array_equal(lm.kept, sel.kept)
    lm.ctx.close()


@pytest.mark.real
def test_gemma270_layer_major_without_selection_equals_ordinary(gemma270):
    m, t, pf, _ = gemma270
    lm = layer_major_prefill(m, t, "fastkv", budget=128, window=G_W, layer=m.n_layer - 1, n_batch=128,
                             max_tokens=2)
    assert lm.stop_layer == m.n_layer - 1 and lm.prefill_work == 1.0
    np.testing.assert_array_equal(lm.scores, pf.scores)
    np.testing.assert_array_equal(lm.logits, pf.logits)
    assert lm.ctx.kv_info().used_swa == m.n_swa
    lm.ctx.close()


@pytest.mark.real
def test_gemma270_one_shot_keeping_everything_equals_full(gemma270):
    m, t, pf, nxt = gemma270
    lm = layer_major_prefill(m, t, "fastkv", budget=len(t), window=G_W, layer=7, n_batch=128, max_tokens=2)
    assert lm.n_kept == len(t) and lm.prefill_work == 1.0
    # the decode context lays the cells out differently: summation order, amplified by quantized weights
    assert np.argmax(lm.logits) == np.argmax(pf.logits)
    np.testing.assert_allclose(lm.logits, pf.logits, atol=0.5)
    lm.ctx.decode([7])
    np.testing.assert_allclose(lm.ctx.logits(), nxt, atol=0.5)
    assert np.argmax(lm.ctx.logits()) == np.argmax(nxt)
    lm.ctx.close()


@pytest.mark.real
def test_gemma270_layer_range_split_equals_whole(gemma270):
    m, t, _, _ = gemma270
    want, got, want2, got2 = _split_equals_whole(m, G_N, 8)
    assert np.array_equal(want, got)
    assert np.array_equal(want2, got2)
