"""One shared layer-major prefill -> every policy's decode context (pyasl.shared), checked against
the policies' own paths (engine.layer_major_prefill, engine.generate)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tinymodels  # noqa: E402

from pyasl.engine import Model, greedy_decode, layer_major_prefill  # noqa: E402
from pyasl import generate  # noqa: E402
from pyasl.models import fetch_model  # noqa: E402
from pyasl.bench.shared import SharedPrefill  # noqa: E402

pytestmark = pytest.mark.native


@pytest.fixture(scope="module")
def smollm2() -> Model:
    return Model(fetch_model("smollm2"))


@pytest.fixture(scope="module")
def tiny() -> Model:
    return Model(tinymodels.tiny_model_path("qwen2", n_layer=6))


def _prompt(model: Model) -> list[int]:
    text = Path(__file__).resolve().parents[1].joinpath("examples", "long_prompt.txt").read_text()
    t = model.prompt_tokens(text[:2600] + "\n\nWhat is this report about? Answer in one sentence.")
    assert 500 < len(t) < 900
    return t


@pytest.fixture(scope="module")
def shared(smollm2):
    return SharedPrefill(smollm2, _prompt(smollm2), window=16, n_batch=128)


def _toks(d, model, n=6):
    try:
        return greedy_decode(model, d.ctx, d.logits, n, ignore_eos=True).tokens
    finally:
        d.ctx.close()


@pytest.mark.parametrize("policy,layer", [("asl", None), ("fastkv", 9), ("asl-2pass", None)])
def test_derive_equals_layer_major(smollm2, shared, policy, layer):
    t = shared.tokens
    lm = layer_major_prefill(smollm2, t, policy, budget=128, window=16, tau=0.7, layer=layer, max_tokens=8,
                             n_batch=128)
    d = shared.derive(policy, budget=128, tau=0.7, layer=layer, max_tokens=8)
    want_sel = lm.stop_layer if policy == "fastkv" else lm.selected_layer
    assert d.selected_layer == want_sel
    assert d.n_kept == lm.n_kept == 128
    assert abs(d.prefill_work - lm.prefill_work) < 1e-12
    np.testing.assert_allclose(d.logits, lm.logits, rtol=0, atol=2e-3)
    try:
        want = greedy_decode(smollm2, lm.ctx, lm.logits, 6, ignore_eos=True).tokens
    finally:
        lm.ctx.close()
    assert _toks(d, smollm2) == want


def test_asl_selects_somewhere_on_this_prompt(shared):
    """The equality test above is only meaningful when asl selects before the last layer."""
    d = shared.derive("asl", budget=128, tau=0.7, max_tokens=4)
    d.ctx.close()
    assert d.selected_layer is not None and d.selected_layer < shared.model.n_layer - 1
    assert d.prefill_work < 1.0


@pytest.mark.parametrize("policy,layer", [("full", None), ("snapkv", None), ("gemfilter", 9), ("zigzag", None),
                                          ("pyramid", None)])
def test_derive_equals_generate(smollm2, shared, policy, layer):
    g = generate(smollm2, shared.tokens, policy=policy, budget=128, window=16, layer=layer, max_tokens=6,
                 n_batch=128, ignore_eos=True)
    d = shared.derive(policy, budget=128, layer=layer, max_tokens=6)
    assert d.n_kept == g.n_kept and d.selected_layer == g.selected_layer
    assert d.kv_bytes == g.kv_bytes
    assert _toks(d, smollm2) == g.tokens


def test_derive_keeps_the_saved_state(shared, smollm2):
    """Deriving pruned policies must not touch the shared full KV: full after snapkv is still full."""
    a = shared.derive("full", max_tokens=4)
    first = _toks(a, smollm2, 4)
    shared.derive("snapkv", budget=64, max_tokens=4).ctx.close()
    b = shared.derive("full", max_tokens=4)
    assert _toks(b, smollm2, 4) == first


def test_derive_rejects_bad_input(shared):
    with pytest.raises(ValueError, match="unknown policy"):
        shared.derive("nope", budget=64)
    with pytest.raises(ValueError, match="larger than the window"):
        shared.derive("snapkv", budget=8)
    with pytest.raises(ValueError, match="selection layer"):
        shared.derive("fastkv", budget=64, layer=-1)
    d = shared.derive("snapkv", budget=10_000, max_tokens=2)
    d.ctx.close()
    assert d.n_kept == shared.n and "nothing to prune" in d.note


def test_shared_on_tiny_model_keep_all_is_full(tiny):
    rng = np.random.default_rng(3)
    t = [int(x) for x in rng.integers(4, tiny.n_vocab, 300)]
    sp = SharedPrefill(tiny, t, window=8, n_batch=64)
    full = sp.derive("full", max_tokens=4)
    want = _toks(full, tiny, 4)
    d = sp.derive("fastkv", budget=299, layer=2, max_tokens=4)
    assert d.n_kept == 299
    assert d.prefill_work < 1.0
    d.ctx.close()
    # a budget that keeps every token: the derived context decodes exactly as full
    for policy, layer in (("fastkv", 2), ("snapkv", None), ("asl", None)):
        d = sp.derive(policy, budget=300, layer=layer, max_tokens=4)
        assert d.n_kept == 300, policy
        assert _toks(d, tiny, 4) == want, policy


@pytest.fixture(scope="module")
def tiny_gemma3() -> Model:
    return Model(tinymodels.tiny_model_path("gemma3", n_layer=6))


def test_shared_on_a_sliding_window_model_equals_each_policy_path(tiny_gemma3):
    """Gemma 3 style (sliding-window layers beside global ones, a prompt longer than the window and than
    an ordinary context's sliding-window cache): each derived context decodes as the policy's own path
    and holds the KV bytes it reports."""
    m = tiny_gemma3
    assert m.n_swa == 64
    rng = np.random.default_rng(0)
    t = [int(x) for x in rng.integers(10, m.n_vocab - 1, 400)]
    sp = SharedPrefill(m, t, window=16, n_batch=128)
    for policy, opts in (("asl", {"tau": 0.9}), ("fastkv", {"layer": 2}), ("asl-2pass", {"tau": 0.9})):
        lm = layer_major_prefill(m, t, policy, budget=96, window=16, max_tokens=8, n_batch=128, **opts)
        d = sp.derive(policy, budget=96, max_tokens=8, **opts)
        assert d.n_kept == lm.n_kept and abs(d.prefill_work - lm.prefill_work) < 1e-12, policy
        np.testing.assert_allclose(d.logits, lm.logits, rtol=0, atol=2e-3)
        try:
            want = greedy_decode(m, lm.ctx, lm.logits, 6, ignore_eos=True).tokens
        finally:
            lm.ctx.close()
        assert _toks(d, m) == want, policy
    for policy, opts in (("full", {}), ("snapkv", {}), ("gemfilter", {"layer": 2})):
        g = generate(m, t, policy=policy, budget=96, window=16, max_tokens=6, n_batch=128, ignore_eos=True, **opts)
        d = sp.derive(policy, budget=96, max_tokens=6, **opts)
        assert (d.n_kept, d.selected_layer, d.kv_bytes) == (g.n_kept, g.selected_layer, g.kv_bytes), policy
        assert _toks(d, m) == g.tokens, policy
        assert sp.kv_bytes_full == g.kv_bytes_full, policy  # the whole prompt's KV, sliding-window cells too
