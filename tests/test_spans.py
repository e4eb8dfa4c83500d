"""Span-aware selection (pyasl.spans): the stage that turns scores into kept positions for every
policy. Size 1 is today's token-level top-k exactly; larger spans keep unions of whole spans within
the budget, per KV head or shared."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tinymodels  # noqa: E402
from pyasl import policies as P
from pyasl.policies.layer_budgets import per_layer_sets
from pyasl.policies.spans import DEFAULT_SPAN, TOKEN, Spans, runs

RNG = np.random.default_rng(7)


def _scores(n_layer=6, n_head=4, n=300, seed=0):
    return np.random.default_rng(seed).random((n_layer, n_head, n)).astype(np.float32) ** 4


# ---- parsing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,want", [("token", TOKEN), ("forward:16", Spans("forward", 16)),
                                       (" Chunk:8 ", Spans("chunk", 8)), ("around:8+32", Spans("around", 32, 8)),
                                       (None, Spans.parse(DEFAULT_SPAN))])
def test_parse(text, want):
    assert Spans.parse(text) == want
    assert Spans.parse(str(want)) == want


@pytest.mark.parametrize("bad", ["", "forward", "forward:", "forward:x", "chunk:-2", "chunk:0", "token:4",
                                 "forward:1.5", "window:8", "forward:99999", 16, 1.0, "around:8", "around:+8",
                                 "around:8+", "around:x+8", "around:-1+8", "forward:4+8", "around:8+0"])
def test_parse_rejects(bad):
    with pytest.raises(ValueError, match="span"):
        Spans.parse(bad)


def test_constructor_rejects():
    with pytest.raises(ValueError, match="mode"):
        Spans("backward", 4)
    with pytest.raises(ValueError, match="integer"):
        Spans("forward", True)
    with pytest.raises(ValueError, match="only span mode around"):
        Spans("forward", 8, 4)
    with pytest.raises(ValueError, match="before"):
        Spans("around", 8, 5000)


# ---- top-k ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["token", "forward:1", "chunk:1", "around:0+1"])
def test_size_one_is_token_topk(spec):
    x = RNG.random((3, 200))
    x[:, 50:60] = 0.5  # ties go to the lower position
    for k in (0, 1, 37, 200):
        want = np.sort(np.argsort(-x, axis=-1, kind="stable")[:, :k], axis=-1)
        np.testing.assert_array_equal(Spans.parse(spec).top_k(x, k), want)
        np.testing.assert_array_equal(Spans.parse(spec).top_k(x[0], k), want[0])


def test_forward_keeps_what_follows_a_peak():
    x = np.full(100, 0.01)
    x[20], x[70] = 1.0, 0.9
    got = Spans("forward", 8).top_k(x, 16)
    np.testing.assert_array_equal(got, np.r_[20:28, 70:78])
    # a span that does not fit whole keeps its head
    np.testing.assert_array_equal(Spans("forward", 8).top_k(x, 11), np.r_[20:28, 70:73])
    assert TOKEN.top_k(x, 2).tolist() == [20, 70]


def test_around_keeps_what_precedes_and_follows_a_peak():
    x = np.full(100, 0.01)
    x[20], x[70] = 1.0, 0.9
    around = Spans.parse("around:4+8")
    assert str(around) == "around:4+8" and not around.is_token
    np.testing.assert_array_equal(around.top_k(x, 24), np.r_[16:28, 66:78])
    # a span that does not fit whole keeps its head: the tokens before the peak come first
    np.testing.assert_array_equal(around.top_k(x, 14), np.r_[16:28, 66:68])
    # a peak at the first position reaches back to nothing; no reach back is forward:S exactly
    y = RNG.random((3, 150)) ** 4
    for k in (0, 9, 60, 150):
        np.testing.assert_array_equal(Spans.parse("around:0+8").top_k(y, k), Spans.parse("forward:8").top_k(y, k))
    np.testing.assert_array_equal(Spans.parse("around:3+1").top_k(np.r_[1.0, np.zeros(9)], 1), [0])


def _short_runs(kept, size, n):
    """Runs shorter than `size` that do not end at the last position."""
    return [r for r in runs(kept) if r[1] - r[0] + 1 < size and r[1] != n - 1]


@pytest.mark.parametrize("size", [2, 5, 16])
def test_forward_kept_set_is_whole_spans(size):
    """Every kept run is at least `size` long except the one the budget cut (and one at the end)."""
    for seed in range(20):
        x = np.random.default_rng(seed).random(400) ** 6
        for k in (10, 60, 150):
            kept = Spans("forward", size).top_k(x, k)
            assert kept.size == k and np.all(np.diff(kept) > 0)
            assert len(_short_runs(kept, size, 400)) <= 1


@pytest.mark.parametrize("size,n", [(4, 100), (8, 203), (16, 50)])
def test_chunk_keeps_whole_chunks(size, n):
    for seed in range(10):
        x = np.random.default_rng(seed).random((2, n))
        for k in (0, 5, 33, n):
            kept = Spans("chunk", size).top_k(x, k)
            assert kept.shape == (2, k)
            for row, xs in zip(kept, x):
                chunks = {}
                for p in row:
                    chunks.setdefault(p // size, []).append(int(p))
                partial = [c for c, ps in chunks.items()
                           if len(ps) != min(size, n - c * size)]
                assert len(partial) <= 1
                for c in partial:  # the cut chunk keeps its first positions
                    assert chunks[c] == list(range(c * size, c * size + len(chunks[c])))
                # whole chunks come in order of their mean score
                means = [xs[c * size:(c + 1) * size].mean() for c in range(-(-n // size))]
                whole = [c for c in chunks if c not in partial]
                if whole:
                    assert min(means[c] for c in whole) >= max(
                        [means[c] for c in range(len(means)) if c not in chunks] or [-1])


def test_top_k_bad_args():
    with pytest.raises(ValueError, match="k must be"):
        TOKEN.top_k(np.ones(5), 6)
    with pytest.raises(ValueError, match="shape"):
        TOKEN.top_k(np.ones((2, 2, 2)), 1)


def test_runs():
    assert runs([]) == []
    assert runs([5, 1, 2, 3, 9, 10]) == [[1, 3], [5, 5], [9, 10]]


# ---- every policy's selection ---------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["forward:1", "chunk:1"])
def test_size_one_equals_token_for_every_selection(spec):
    s = _scores()
    for budget in (40, 120):
        a, b = (P.asl_select(s, 16, budget, tau=0.9, span=x) for x in ("token", spec))
        np.testing.assert_array_equal(a.kept, b.kept)
        np.testing.assert_array_equal(P.asl_select(s, 16, budget, tau=0.9).kept,  # the default stage
                                      P.asl_select(s, 16, budget, tau=0.9, span=P.DEFAULT_SPAN).kept)
        for layer in (0, 3, 5):
            np.testing.assert_array_equal(P.asl_select_at_layer(s, 16, budget, layer, span=spec),
                                          P.asl_select_at_layer(s, 16, budget, layer, span="token"))
        np.testing.assert_array_equal(P.snapkv_select_all(s, 16, budget, 2, span=spec),
                                      P.snapkv_select_all(s, 16, budget, 2, span="token"))
        for x, y in zip(per_layer_sets(s, [budget] * 6, 16, 2, span=spec),
                        per_layer_sets(s, [budget] * 6, 16, 2, span="token")):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("spec", ["forward:8", "around:4+8", "chunk:8"])
def test_spans_keep_the_budget_and_the_window(spec):
    s = _scores()
    n, W = s.shape[-1], 16
    for budget in (40, 120, 299):
        kept = P.asl_select_at_layer(s, W, budget, 2, span=spec)
        assert kept.size == budget and np.all(np.diff(kept) > 0)
        assert set(range(n - W, n)) <= set(kept.tolist())
        sel = P.asl_select(s, W, budget, tau=0.9, span=spec)
        assert sel.kept.size == budget and set(range(n - W, n)) <= set(sel.kept.tolist())
        sets = P.snapkv_select_all(s, W, budget, 2, span=spec)
        assert sets.shape == (6, 2, budget)
        assert all(set(range(n - W, n)) <= set(h.tolist()) for layer in sets for h in layer)


def test_asl_rule_does_not_depend_on_the_span():
    """The selection layer is the paper's rule on token ranks; the span only shapes what it keeps."""
    s = _scores(n_layer=12)
    a = P.asl_select(s, 16, 80, tau=0.95, l_min=2, l_obs=3)
    for spec in ("forward:8", "around:4+8", "chunk:16"):
        b = P.asl_select(s, 16, 80, tau=0.95, l_min=2, l_obs=3, span=spec)
        assert b.selected_layer == a.selected_layer and b.variance_ratio == a.variance_ratio
        assert not np.array_equal(b.kept, a.kept)


def test_per_head_spans_differ_per_head():
    s = _scores(n_head=4)
    sets = P.snapkv_select(s[0], 16, 100, 2, span="forward:8")
    assert not np.array_equal(sets[0], sets[1])
    for h in range(2):  # each KV head's own set is whole spans
        assert len(_short_runs(sets[h][:-16], 8, 300 - 16)) <= 1


def test_inspect_layers_reports_the_kept_positions():
    s = _scores()
    info = P.inspect_layers(s, 16, budget=60, span="forward:8")
    assert info["kept"] == P.asl_select(s, 16, 60, span="forward:8").kept.tolist()


# ---- through the engine: every policy, every entry point -------------------------------------------
SHARED = [("snapkv", None), ("asl", None), ("fastkv", 2), ("gemfilter", 2), ("asl-2pass", None), ("zigzag", None),
          ("pyramid", None)]


@pytest.fixture(scope="module")
def tiny():
    from pyasl.engine import Model

    m = Model(tinymodels.tiny_model_path("qwen2", n_layer=6))
    yield m
    m.close()


@pytest.fixture(scope="module")
def tiny_shared(tiny):
    from pyasl.bench.shared import SharedPrefill

    t = [int(x) for x in np.random.default_rng(5).integers(4, tiny.n_vocab, 400)]
    return SharedPrefill(tiny, t, window=8, n_batch=64)


def _decode(model, d, n=5):
    from pyasl.engine import greedy_decode

    try:
        return greedy_decode(model, d.ctx, d.logits, n, ignore_eos=True).tokens
    finally:
        d.ctx.close()


@pytest.mark.parametrize("policy,layer", SHARED)
def test_size_one_spans_give_todays_logits_and_tokens(tiny, tiny_shared, policy, layer):
    """forward:1 and chunk:1 are token-level selection exactly: same kept count, same first logits,
    same greedy tokens, for every policy."""
    want = tiny_shared.derive(policy, budget=100, layer=layer, tau=0.9, max_tokens=5, span="token")
    want_logits, want_kept = want.logits.copy(), want.n_kept
    want_toks = _decode(tiny, want)
    for spec in ("forward:1", "chunk:1"):
        d = tiny_shared.derive(policy, budget=100, layer=layer, tau=0.9, max_tokens=5, span=spec)
        assert d.n_kept == want_kept
        np.testing.assert_array_equal(d.logits, want_logits)
        assert _decode(tiny, d) == want_toks, (policy, spec)


@pytest.mark.parametrize("policy,layer", [("snapkv", None), ("fastkv", 2), ("gemfilter", 2), ("pyramid", None)])
def test_generate_with_spans_equals_the_shared_derivation(tiny, tiny_shared, policy, layer):
    """The span reaches every path: engine.generate and the benchmark's shared prefill agree, and a
    span changes what is kept (the answer or the logits differ from token-level)."""
    from pyasl import generate

    g = generate(tiny, tiny_shared.tokens, policy=policy, budget=100, window=8, layer=layer, max_tokens=5,
                 n_batch=64, ignore_eos=True, span="forward:8")
    assert g.span == "forward:8"
    d = tiny_shared.derive(policy, budget=100, layer=layer, max_tokens=5, span="forward:8")
    assert d.n_kept == g.n_kept
    state = d.ctx.state_get()
    assert _decode(tiny, d) == g.tokens
    t = tiny_shared.derive(policy, budget=100, layer=layer, max_tokens=5, span="token")
    try:
        assert t.ctx.state_get() != state
    finally:
        t.ctx.close()


def test_session_and_llama_policies_take_a_span(tiny):
    import pyasl

    for name, kw in (("snapkv", {}), ("asl", {}), ("fastkv", {"layer": 2}), ("gemfilter", {"layer": 2}),
                     ("asl-2pass", {})):
        pol = pyasl.make_policy(name, budget=64, window=8, span="chunk:4", **kw)
        assert pol.span == Spans("chunk", 4) and pol.to_dict()["span"] == "chunk:4"
    with pytest.raises(ValueError, match="span"):
        pyasl.make_policy("snapkv", budget=64, span="sideways:3")
    from pyasl.engine.strategies import prefill_state

    toks = [int(x) for x in np.random.default_rng(1).integers(4, tiny.n_vocab, 300)]
    a = prefill_state(tiny, toks, pyasl.make_policy("fastkv", layer=2, budget=64, window=8, span="forward:8"), n_batch=64)
    b = prefill_state(tiny, toks, pyasl.make_policy("fastkv", layer=2, budget=64, window=8), n_batch=64)
    assert a.n_kept == b.n_kept == 64 and a.state != b.state


# ---- a real model: the planted value is kept whole --------------------------------------------------
def _value_positions(model, toks, start: bytes, end: bytes) -> list[int]:
    pieces = [model.token_bytes(t) for t in toks]
    offs = np.cumsum([0] + [len(p) for p in pieces])
    text = b"".join(pieces)
    a = text.find(start)
    b = text.find(end, a) + len(end)
    assert a >= 0 and b > a
    return [k for k in range(len(toks)) if offs[k] < b and offs[k + 1] > a]


@pytest.fixture(scope="module")
def report(smollm2):
    """SmolLM2 over the README's report (~4,000 tokens): one shared prefill."""
    from pyasl.bench.shared import SharedPrefill

    text = Path(__file__).resolve().parents[1].joinpath("examples", "long_prompt.txt").read_text()
    return SharedPrefill(smollm2, smollm2.prompt_tokens(text), window=32)


@pytest.mark.real
def test_smollm2_keeps_the_contractor_whole(smollm2, report):
    """The window attends to where the contractor's name starts; token-level top-k at ASL's
    ranking layer keeps its first tokens and drops the rest, forward:16 keeps the whole name."""
    name = _value_positions(smollm2, report.tokens, b"Halvorsen", b"Pike")
    last = smollm2.n_layer - 1
    token = set(P.asl_select_at_layer(report.scores, 32, 512, last, span="token").tolist())
    spans = set(P.asl_select_at_layer(report.scores, 32, 512, last, span="forward:16").tolist())
    assert 0 < sum(p in token for p in name) < len(name)
    assert all(p in spans for p in name)


@pytest.mark.real
def test_smollm2_answers_the_price_with_spans(smollm2, report):
    """End to end at 256 cells: token-level SnapKV loses the price (full KV says 38,400 euros), the
    same SnapKV with forward:16 spans answers it."""
    from pyasl.engine import greedy_decode

    def answer(policy, span):
        d = report.derive(policy, budget=256, max_tokens=40, span=span)
        try:
            return greedy_decode(smollm2, d.ctx, d.logits, 40).text
        finally:
            d.ctx.close()

    assert "38,400" in answer("full", None)
    assert "38,400" not in answer("snapkv", "token")
    assert "38,400 euros" in answer("snapkv", "forward:16")
