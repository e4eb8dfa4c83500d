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

try:
    _native.load()
except _native.NativeLibraryError as e:  # pragma: no cover
    pytest.skip(f"pyasl native library not available: {e}", allow_module_level=True)

from pyasl import policies as P  # noqa: E402
from pyasl.engine import Context, Model, generate, layer_major_prefill, layer_major_supported, prefill  # noqa: E402
from pyasl.models import fetch_model  # noqa: E402

N_LAYER = 6


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
    t = toks(model, n)
    with Context(model, 512, n_batch=n_batch) as ref:
        for i in range(0, n, n_batch):
            ref.decode(t[i:i + n_batch], logits_last=i + n_batch >= n)
        want = ref.logits()
        ref.decode([t[0]])
        want2 = ref.logits()
    with Context(model, 512, n_batch=n_batch) as c:
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
    want, got, want2, got2 = _split_equals_whole(tiny, 200, 2)
    assert np.array_equal(want, got)
    assert np.array_equal(want2, got2)


@pytest.mark.real
def test_layer_range_split_equals_whole_smollm2(smollm2):
    want, got, want2, got2 = _split_equals_whole(smollm2, 300, 11)
    assert np.array_equal(want, got)
    assert np.array_equal(want2, got2)


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
        generate(m, t, policy="fastkv", budget=64, window=16)


def test_sliding_window_models_fall_back():
    g = Model(tinymodels.tiny_model_path("gemma3", n_layer=N_LAYER))
    assert "sliding-window" in layer_major_supported(g)
    t = toks(g, 200, seed=6)
    r = generate(g, t, policy="asl", budget=64, window=16, max_tokens=4, n_batch=128)
    assert r.asl["prefill"] == "ordinary" and "sliding-window" in r.note
    with pytest.raises(ValueError, match="layer-major"):
        generate(g, t, policy="fastkv", layer=2, budget=64, window=16, max_tokens=4, n_batch=128)


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
