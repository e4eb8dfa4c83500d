"""Per-layer KV budgets (pyasl.budgets, native pyasl_kv_keep_per_layer, patches/0004 masks).

* schedules (numpy): ZigZagKV and PyramidKV budgets are integers >= their lower bound, <= the
  prompt, and sum to n_layer * b_avg exactly; ZigZagKV follows its formula; PyramidKV decreases;
* masks: a layer with budget b attends to exactly its b cells plus the new tokens -- each layer's
  attention output after pruning equals a numpy computation from the captured Q/K/V (flash
  attention off and on); the softmax is exactly 0 on the masked cells;
* uniform budgets reduce exactly (bit for bit) to snapkv; the counts survive the move into the
  decode context; graph reuse follows the counts; refusals;
* ASL with per-layer budgets (layer-major and ordinary prefill); SmolLM2 end to end (``real``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tinymodels  # noqa: E402
from pyasl import _native  # noqa: E402
from pyasl.engine.prefill import apply_selection, move_to_context  # noqa: E402
from pyasl.policies import layer_budgets as BG  # noqa: E402
from pyasl import policies as P  # noqa: E402
from pyasl._native import PyaslError  # noqa: E402

from pyasl.engine import Context, Model, layer_major_prefill, prefill  # noqa: E402
from pyasl import generate  # noqa: E402

pytestmark = pytest.mark.native

REAL = pytest.mark.real
FA = pytest.mark.parametrize("fa", [False, True], ids=["fa-off", "fa-on"])


# ---------------------------------------------------------------- schedules (numpy only)


def _rand_scores(rng, n_layer=8, n_head=4, n=300, W=16):
    """Window-attention-like scores: each layer's heads concentrate on a few positions to a different degree."""
    out = np.empty((n_layer, n_head, n))
    for l in range(n_layer):
        sharp = rng.uniform(0.2, 6.0)
        logits = rng.standard_normal((n_head, n)) * sharp
        p = np.exp(logits - logits.max(-1, keepdims=True))
        out[l] = W * p / p.sum(-1, keepdims=True)
    return out


def test_zigzag_lmba_by_hand():
    # one layer, one head: masses 5, 3, 1, 1 (total 10): 0.5 -> 1 token, 0.8 -> 2, 0.9 -> 3, 1.0 -> 4
    s = np.array([[[1.0, 5.0, 1.0, 3.0]]])
    for theta, want in [(0.5, 1), (0.8, 2), (0.85, 3), (0.9, 3), (1.0, 4)]:
        assert BG.zigzag_lmba(s, theta).tolist() == [want], theta
    # heads are averaged before ranking
    s2 = np.array([[[4.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0]]])
    assert BG.zigzag_lmba(s2, 0.5).tolist() == [1]
    assert BG.zigzag_lmba(s2, 0.6).tolist() == [2]


def test_zigzag_budgets_follow_the_formula():
    rng = np.random.default_rng(1)
    s = _rand_scores(rng)
    L, n, W, b_avg = s.shape[0], s.shape[-1], 16, 80
    b = BG.zigzag_budgets(s, W, b_avg)
    lmba = BG.zigzag_lmba(s, 0.9)
    assert len(set(lmba.tolist())) > 2, lmba       # the layers really differ
    b_min = max(int(np.ceil(0.2 * b_avg)), W + 1)
    target = b_min + (b_avg - b_min) * L * lmba / lmba.sum()
    assert b.dtype == np.int64 and b.sum() == L * b_avg
    assert np.all(np.abs(b - target) < 1.0), (b, target)
    assert b.min() >= b_min and b.max() <= n
    # more uncertain layers (larger LMBA) get more
    order = np.argsort(lmba, kind="stable")
    assert np.all(np.diff(b[order]) >= -1)


@pytest.mark.parametrize("seed", range(20))
def test_budgets_bounds_and_total(seed):
    rng = np.random.default_rng(100 + seed)
    L = int(rng.integers(1, 40))
    n = int(rng.integers(40, 400))
    W = int(rng.integers(1, 32))
    s = _rand_scores(rng, n_layer=L, n_head=int(rng.integers(1, 5)), n=n, W=W)
    b_avg = int(rng.integers(W + 1, n + 1))
    frac = float(rng.uniform(0, 1))
    theta = float(rng.uniform(0.05, 1.0))
    z = BG.zigzag_budgets(s, W, b_avg, theta=theta, b_min_frac=frac)
    assert z.sum() == L * b_avg
    assert z.min() >= BG.zigzag_min_budget(b_avg, W, frac) >= 0 and z.max() <= n
    beta = float(rng.uniform(1, 40))
    p = BG.pyramid_budgets(L, b_avg, beta=beta, window=W, n_prompt=n)
    assert p.sum() == L * b_avg and p.min() >= W + 1 and p.max() <= n
    assert np.all(np.diff(p) <= 0)                  # bottom layer largest, top smallest


def test_zigzag_caps_at_the_prompt():
    """A layer that would pass n_prompt is held there; the others share the rest, total unchanged."""
    s = np.full((4, 1, 100), 0.01)
    s[0, 0] = np.linspace(0.0, 1.0, 100)            # flat-ish: large LMBA
    s[1:, 0, :3] = 10.0                             # peaked: LMBA 3
    b = BG.zigzag_budgets(s, 4, 90, b_min_frac=0.2)
    assert b[0] == 100 and b.sum() == 360 and b.min() >= 18


def test_pyramid_by_hand():
    # k = 64 - 4 = 60, beta 20: top keeps 4 + 3, bottom 4 + 117; arithmetic in between
    # (121, 92.5, 64, 35.5, 7: the tied halves go to the lower layer)
    b = BG.pyramid_budgets(5, 64, beta=20, window=4)
    np.testing.assert_array_equal(b, [121, 93, 64, 35, 7])
    assert b.sum() == 5 * 64
    np.testing.assert_array_equal(BG.pyramid_budgets(7, 50, beta=1, window=8), [50] * 7)
    np.testing.assert_array_equal(BG.pyramid_budgets(1, 50, beta=20, window=8), [50])
    # the bottom layer is capped by the prompt, the excess goes to the others
    b = BG.pyramid_budgets(4, 90, beta=20, window=8, n_prompt=120)
    assert b[0] == 120 and b.sum() == 360 and np.all(np.diff(b) <= 0)


def test_allocate_rounding_is_exact():
    b = BG.allocate([10.5, 10.5, 10.0], 31, 0, 100)
    assert b.tolist() == [11, 10, 10]               # ties to the lower index
    assert BG.allocate([1.0, 1.0, 1.0], 7, 2, 3).tolist() == [3, 2, 2]
    assert BG.allocate([0.0, 0.0], 10, 0, 10).tolist() == [5, 5]


@pytest.mark.parametrize("call,msg", [
    (lambda s: BG.zigzag_budgets(s, 16, 16), "exceed the window"),
    (lambda s: BG.zigzag_budgets(s, 16, 301), "larger than the prompt"),
    (lambda s: BG.zigzag_budgets(s, 16, 64, theta=0), "theta"),
    (lambda s: BG.zigzag_budgets(s, 16, 64, theta=1.5), "theta"),
    (lambda s: BG.zigzag_budgets(s, 16, 64, b_min_frac=-0.1), "b_min_frac"),
    (lambda s: BG.zigzag_budgets(s[..., :0], 16, 64), "empty"),
    (lambda s: BG.zigzag_budgets(-s, 16, 64), "non-negative"),
    (lambda s: BG.zigzag_budgets(np.zeros_like(s), 16, 64), "no attention mass"),
    (lambda s: BG.pyramid_budgets(8, 64, beta=0.5, window=16), "beta"),
    (lambda s: BG.pyramid_budgets(0, 64), "n_layer"),
    (lambda s: BG.pyramid_budgets(8, 64.5), "integer"),
    (lambda s: BG.allocate([1, 2], 10, 6, 9), "cannot split"),
    (lambda s: BG.layer_budgets("bogus", s, 16, 64), "unknown layer-budget method"),
])
def test_clear_errors(call, msg):
    s = _rand_scores(np.random.default_rng(0))
    with pytest.raises(ValueError, match=msg):
        call(s)


# ---------------------------------------------------------------- tiny models: masks and exactness


@pytest.fixture(scope="module")
def tiny() -> Model:
    """llama, 4 layers, n_head=4, n_head_kv=2 (GQA), f32 weights, head size 16."""
    m = Model(tinymodels.tiny_model_path("llama"))
    yield m
    m.close()


def apply_layer_budgets(ctx, scores, method, b_avg, window, **opts):
    """Per-layer budgets by `method` applied to ctx (the full prompt's KV): the policy's selection,
    then the engine's pruning."""
    sel = BG.budget_selection(scores, method, b_avg, window, ctx.model, opts=opts)
    return apply_selection(ctx, sel)


def rand_tokens(model: Model, n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    toks = [int(t) for t in rng.integers(4, model.n_vocab, n)]
    bos = _native.load()[0].llama_vocab_bos(model.vocab)
    if bos >= 0:
        toks[0] = int(bos)
    return toks


def _prefill_with_kv(model, toks, W, fa):
    """One ubatch over the whole prompt: window scores and the post-RoPE K and V of every token."""
    ctx = Context(model, 256, flash_attn=fa, capture=True)
    ctx.add_capture_prefix("Kcur")
    ctx.add_capture_prefix("Vcur")
    ctx.arm_scores(W)
    ctx.decode(toks, logits_last=False)
    ctx.disarm_scores()
    scores = ctx.window_scores(len(toks))
    caps = ctx.captured()
    K = [caps[f"Kcur-{il}"][0] for il in range(model.n_layer)]   # (n, n_head_kv, d)
    V = [caps[f"Vcur-{il}"][0] for il in range(model.n_layer)]
    ctx._cap and _native.load()[1].pyasl_capture_clear(ctx._cap)
    return ctx, scores, K, V


def _attn_oracle(q, Kp, Vp, Kn, Vn, g, scale):
    """Attention output (n_new, n_head, d): query t sees the prompt rows Kp/Vp (per KV head, already
    the layer's kept set) and the new tokens 0..t. Values rounded to F16 like the cache."""
    f16 = lambda a: a.astype(np.float16).astype(np.float64)  # noqa: E731
    n_new, n_head, d = q.shape
    out = np.zeros((n_new, n_head, d))
    for h in range(n_head):
        kv = h // g
        for t in range(n_new):
            K = np.concatenate([f16(Kp[kv]), f16(Kn[: t + 1, kv])])
            V = np.concatenate([f16(Vp[kv]), f16(Vn[: t + 1, kv])])
            x = f16(q[t, h]) @ K.T * scale
            p = np.exp(x - x.max())
            out[t, h] = (p / p.sum()) @ V
    return out


@FA
def test_layer_attends_to_exactly_its_budget(tiny, fa):
    """Every layer's attention output after per-layer pruning == numpy over its own b_l cells (per
    KV head) plus the new tokens; the cells [b_l, P) get exactly zero probability."""
    model = tiny
    n, W, n_new = 160, 8, 2
    toks = rand_tokens(model, n + n_new, seed=3)
    ctx, scores, K, V = _prefill_with_kv(model, toks[:n], W, fa)
    budgets = BG.pyramid_budgets(model.n_layer, 40, beta=20, window=W)
    assert len(set(budgets.tolist())) == model.n_layer           # every layer different: [70, 50, 30, 10]
    sets = BG.per_layer_sets(scores, budgets, W, model.n_head_kv)
    ctx.kv_keep_per_layer(sets)
    Pc, counts = ctx.kv_layer_cells()
    assert Pc == budgets.max() and counts.tolist() == budgets.tolist()
    assert ctx.kv_info().used_base == Pc

    for prefix in ("Qcur", "kqv_out"):
        ctx.add_capture_prefix(prefix)
    if not fa:
        ctx.add_capture_prefix("kq_soft_max")
    ctx.arm_scores(n_new, "attention-rows")  # the softmax rows of the new tokens, FA or not
    ctx.decode(toks[n:], pos0=n)
    ctx.disarm_scores()
    caps = ctx.captured()
    g = model.n_head // model.n_head_kv
    d = model.n_embd // model.n_head
    for il in range(model.n_layer):
        b = int(budgets[il])
        q = caps[f"Qcur-{il}"][0]                                # (n_new, n_head, d)
        Kn, Vn = caps[f"Kcur-{il}"][0], caps[f"Vcur-{il}"][0]     # the new tokens' K/V
        got = caps[f"kqv_out-{il}"].reshape(n_new, model.n_head, d)
        Kp = np.stack([K[il][sets[il][h], h] for h in range(model.n_head_kv)])  # (n_head_kv, b, d)
        Vp = np.stack([V[il][sets[il][h], h] for h in range(model.n_head_kv)])
        want = _attn_oracle(q, Kp, Vp, Kn, Vn, g, 1.0 / np.sqrt(d))
        tol = 3e-3 * np.abs(want).max()
        err = np.abs(got - want).max()
        assert err < tol, (il, err, tol)
        if b < Pc:
            # the same computation over all P cells (what an unmasked layer would see) is far off
            cell_pos = [np.r_[sets[il][h], np.setdiff1d(np.arange(n), sets[il][h])[: Pc - b]]
                        for h in range(model.n_head_kv)]
            wrong = _attn_oracle(q, np.stack([K[il][c, h] for h, c in enumerate(cell_pos)]),
                                 np.stack([V[il][c, h] for h, c in enumerate(cell_pos)]), Kn, Vn, g, 1.0 / np.sqrt(d))
            assert np.abs(wrong - want).max() > 10 * tol
        probs = caps[f"pyasl_scores-{il}"][0]                    # (n_head, n_new, n_kv)
        rows = [probs] + ([caps[f"kq_soft_max-{il}"][0]] if not fa else [])
        for pr in rows:
            assert np.all(pr[:, :, :b] > 0), il                  # its own cells
            assert np.all(pr[:, :, b:Pc] == 0), il               # the other layers' cells
            assert np.all(pr[:, :, Pc] > 0)                      # the new tokens, causally
            assert np.all(pr[:, 0, Pc + 1] == 0) and np.all(pr[:, 1, Pc + 1] > 0)
            np.testing.assert_allclose(pr.sum(-1), 1.0, atol=1e-4)
    ctx.close()


@FA
def test_uniform_budgets_equal_snapkv(tiny, fa):
    """Equal per-layer budgets give the snapkv cache and logits bit for bit (masks on, adding zeros)."""
    model = tiny
    n, W, b = 200, 8, 48
    toks = rand_tokens(model, n + 3, seed=4)
    out = {}
    for how in ("snapkv", "uniform", "pyramid-beta1"):
        ctx = Context(model, 256, flash_attn=fa, capture=True)
        pf = prefill(ctx, toks[:n], window=W)
        if how == "snapkv":
            ctx.kv_keep_per_head(P.snapkv_select_all(pf.scores, W, b, model.n_head_kv))
            assert ctx.kv_layer_cells()[0] == 0
        else:
            lb = apply_layer_budgets(ctx, pf.scores, "uniform" if how == "uniform" else "pyramid", b, W,
                                        beta=1.0)
            assert lb.counts.tolist() == [b] * model.n_layer and ctx.kv_layer_cells()[0] == b
        pos = [ctx.cell_positions(il, b) for il in range(model.n_layer)]
        lg = []
        for i in range(3):
            ctx.decode(toks[n + i: n + i + 1], pos0=n + i)
            lg.append(ctx.logits())
        out[how] = (pos, lg)
        ctx.close()
    for how in ("uniform", "pyramid-beta1"):
        for a, c in zip(out[how][0], out["snapkv"][0]):
            np.testing.assert_array_equal(a, c)
        for a, c in zip(out[how][1], out["snapkv"][1]):
            assert np.array_equal(a, c), how


def test_generate_uniform_equals_snapkv(tiny):
    toks = rand_tokens(tiny, 300, seed=5)
    s = generate(tiny, toks, policy="snapkv", budget=64, window=8, max_tokens=6, ignore_eos=True)
    p = generate(tiny, toks, policy="pyramid", budget=64, window=8, max_tokens=6, ignore_eos=True,
                 budget_opts={"beta": 1})
    assert p.tokens == s.tokens and p.kv_bytes == s.kv_bytes and p.n_kept == s.n_kept == 64
    assert p.layer_budgets["budgets"] == [64] * tiny.n_layer


@FA
def test_counts_survive_the_move_into_the_decode_context(tiny, fa):
    """engine.generate moves the pruned cells into a smaller context: the counts are set again there
    (equal logits to pruning in place); a plain state load drops them (and the logits change)."""
    model = tiny
    n, W = 300, 8
    toks = rand_tokens(model, n + 3, seed=6)
    ref = Context(model, 512, flash_attn=fa, capture=True)
    pf = prefill(ref, toks[:n], window=W)
    lb = apply_layer_budgets(ref, pf.scores, "pyramid", 40, W)
    state = ref.state_get()

    moved = Context(model, 512, flash_attn=fa, capture=True)
    prefill(moved, toks[:n], window=W)
    apply_layer_budgets(moved, pf.scores, "pyramid", 40, W)
    moved = move_to_context(moved, n, lb.prompt_cells + 8, flash_attn=fa)
    assert moved.kv_info().size_base == 256
    assert moved.kv_layer_cells()[0] == lb.prompt_cells
    np.testing.assert_array_equal(moved.kv_layer_cells()[1], lb.counts)

    plain = Context(model, 256, flash_attn=fa)
    plain.state_set(state, n_past=n)
    assert plain.kv_layer_cells()[0] == 0                        # state loading clears the counts
    for i in range(3):
        t = toks[n + i: n + i + 1]
        a, b, c = (x.decode(t, pos0=n + i) or x.logits() for x in (ref, moved, plain))
        assert np.array_equal(a, b) or np.abs(a - b).max() < 1e-4
        assert np.abs(a - c).max() > 1e-3
    for x in (ref, moved, plain):
        x.close()


def test_counts_reset_and_graph_reuse(tiny):
    """Graphs are rebuilt when counts appear or go; seq_rm of decoded tokens keeps them, of a prompt
    cell or llama_memory_clear drops them."""
    model = tiny
    n, W = 200, 8
    toks = rand_tokens(model, n + 2, seed=7)
    ctx = Context(model, 256, capture=True)
    pf = prefill(ctx, toks[:n], window=W)
    lb = apply_layer_budgets(ctx, pf.scores, "pyramid", 40, W)
    step = lambda: ctx.decode(toks[n: n + 1], pos0=n) or ctx.logits()  # noqa: E731
    a = step()
    assert ctx.seq_rm(n, -1) and ctx.kv_layer_cells()[0] == lb.prompt_cells
    assert np.array_equal(step(), a)                              # same graph, same counts
    ctx.seq_rm(n, -1)
    ctx.set_kv_layer_cells(None)
    b = step()                                                    # every layer sees all P cells
    assert np.abs(a - b).max() > 1e-3
    ctx.seq_rm(n, -1)
    ctx.set_kv_layer_cells(lb.counts)
    assert np.array_equal(step(), a)
    ctx.seq_rm(n, -1)
    meta = ctx.cell_positions(0, lb.prompt_cells)
    ctx.seq_rm(int(meta[5]), int(meta[5]) + 1)                    # frees one of the P cells
    assert ctx.kv_layer_cells()[0] == 0
    ctx.set_kv_layer_cells(np.full(model.n_layer, 5))             # cells 0..4 are all still there
    assert ctx.kv_layer_cells()[0] == 5
    with pytest.raises(PyaslError, match="cell 5 of the 10 budget cells is not in use"):
        ctx.set_kv_layer_cells(np.full(model.n_layer, 10))
    llama_cpp = _native.load()[0]
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx._ctx), True)
    assert ctx.kv_layer_cells()[0] == 0
    ctx.close()


def test_refusals(tiny):
    model = tiny
    n, L, H = 100, tiny.n_layer, tiny.n_head_kv
    toks = rand_tokens(model, n, seed=8)
    ctx = Context(model, 256)
    ctx.decode(toks, logits_last=False)
    full = lambda b: [np.broadcast_to(np.r_[np.arange(b - 1), n - 1], (H, b)) for _ in range(L)]  # noqa: E731
    sets = full(20)
    sets[2] = np.broadcast_to(np.r_[np.arange(9), n - 1], (H, 10))
    bad = [
        ("count 0 is outside", [s if i != 1 else np.zeros((H, 0), np.int64) for i, s in enumerate(sets)]),
        ("strictly increasing", [s if i != 1 else np.broadcast_to(np.r_[5, np.arange(18), n - 1], (H, 20))
                                 for i, s in enumerate(sets)]),
        ("not in the KV cache", [s if i != 3 else np.broadcast_to(np.r_[np.arange(19), n], (H, 20))
                                 for i, s in enumerate(sets)]),
        (f"last position {n - 1} must end a list", [np.broadcast_to(np.arange(20), (H, 20))] * L),
        ("does not cover", sets[:2]),
    ]
    for msg, s in bad:
        with pytest.raises(PyaslError, match=msg):
            ctx.kv_keep_per_layer(s)
    with pytest.raises(ValueError, match="n_head_kv"):
        ctx.kv_keep_per_layer([np.zeros((H + 1, 5), np.int64)] * L)
    assert ctx.kv_info().used_base == n and ctx.kv_layer_cells()[0] == 0   # untouched
    with pytest.raises(PyaslError, match="outside 1..256"):
        ctx.set_kv_layer_cells(np.full(L, 300))
    with pytest.raises(PyaslError, match="cells past 20 are in use"):
        ctx.set_kv_layer_cells(np.full(L, 20), meta=np.r_[np.arange(19), n - 1])
    ctx.kv_keep_per_layer(sets)
    assert ctx.kv_layer_cells()[1].tolist() == [20, 20, 10, 20]
    with pytest.raises(PyaslError, match="strictly increasing"):
        ctx.set_kv_layer_cells(np.full(L, 20), meta=np.r_[np.arange(18), 3, n - 1])
    with pytest.raises(PyaslError, match="last metadata position"):
        ctx.set_kv_layer_cells(np.full(L, 20), meta=np.arange(20))
    ctx.close()


def test_sliding_window_models_refuse():
    m = Model(tinymodels.tiny_model_path("gemma3"))
    toks = rand_tokens(m, 100, seed=9)
    ctx = Context(m, 256)
    ctx.decode(toks, logits_last=False)
    sets = [np.broadcast_to(np.r_[np.arange(19), 99], (m.n_head_kv, 20))] * m.n_layer
    with pytest.raises(PyaslError, match="sliding-window"):
        ctx.kv_keep_per_layer(sets)
    ctx.close()
    for kw in ({"policy": "zigzag"}, {"policy": "asl", "layer_budgets": "pyramid"}):
        with pytest.raises(ValueError, match="sliding-window"):
            generate(m, toks, budget=40, window=8, max_tokens=2, **kw)
    m.close()


@pytest.mark.parametrize("kw,msg", [
    ({"policy": "snapkv", "layer_budgets": "zigzag"}, "apply to policy asl only"),
    ({"policy": "asl", "layer_budgets": "bogus"}, "unknown layer-budget method"),
    ({"policy": "zigzag", "budget_opts": {"tau": 1}}, "unknown layer-budget options"),
    ({"policy": "zigzag", "budget_opts": {"theta": 2}}, "theta"),
    ({"policy": "pyramid", "budget_opts": {"beta": 0.1}}, "beta"),
])
def test_generate_rejects_bad_budget_arguments(tiny, kw, msg):
    with pytest.raises(ValueError, match=msg):
        generate(tiny, rand_tokens(tiny, 100), budget=40, window=8, max_tokens=2, **kw)


# ---------------------------------------------------------------- under ASL


@pytest.fixture(scope="module")
def tiny6() -> Model:
    m = Model(tinymodels.tiny_model_path("llama", n_layer=6))
    yield m
    m.close()


@pytest.mark.parametrize("stop", [2, 5], ids=["propagate", "last-layer"])
def test_layer_major_uniform_equals_plain(tiny6, stop):
    """Layer-major prefill: uniform per-layer budgets (layers <= L) + the kept set (layers > L) is the
    existing asl/fastkv cache, decoding bit for bit the same."""
    model = tiny6
    toks = rand_tokens(model, 400, seed=10)
    lg = {}
    for lbm in (None, "uniform"):
        lm = layer_major_prefill(model, toks, "fastkv", 64, 8, layer=stop, max_tokens=4, layer_budgets=lbm)
        out = [lm.logits]
        for i in range(2):
            lm.ctx.decode([int(np.argmax(out[-1]))])
            out.append(lm.ctx.logits())
        lg[lbm] = out
        if lbm:
            assert lm.layer_budgets.counts.tolist() == [64] * 6 and lm.ctx.kv_layer_cells()[0] == 64
        lm.ctx.close()
    for a, b in zip(lg[None], lg["uniform"]):
        assert np.array_equal(a, b)


@FA
def test_layer_major_zigzag_masks(tiny6, fa):
    """ASL-style layer-major prefill with pyramid budgets below the selection layer: layers <= L see
    their own B_l cells, layers > L the kept set's k cells (not the P - k extra ones)."""
    model = tiny6
    toks = rand_tokens(model, 400, seed=11)
    lm = layer_major_prefill(model, toks, "fastkv", 64, 8, layer=2, max_tokens=4, layer_budgets="pyramid",
                             flash_attn=fa)
    c = lm.layer_budgets.counts
    assert c[:3].sum() == 3 * 64 and np.all(c[3:] == 64) and c[0] > 64
    Pc = lm.layer_budgets.prompt_cells
    assert Pc == c.max() and lm.ctx.kv_layer_cells()[1].tolist() == c.tolist()
    assert lm.ctx.kv_info().used_base == Pc
    # the metadata of the decode context is the compaction's: increasing, ending at the last position
    pos = lm.ctx.cell_positions(0, Pc)
    assert np.all(np.diff(pos) > 0) and pos[-1] == len(toks) - 1
    lm.ctx.close()
    # the attention pattern, through generate (asl --layer-budgets on the layer-major path)
    r = generate(model, toks, policy="asl", layer_budgets="zigzag", budget=64, window=8, max_tokens=3,
                 flash_attn=fa, ignore_eos=True)
    lbj = r.layer_budgets
    last = r.selected_layer if r.selected_layer is not None else model.n_layer - 1
    assert sum(lbj["budgets"][: last + 1]) == (last + 1) * 64 and all(b == 64 for b in lbj["budgets"][last + 1:])
    assert r.asl["prefill"] == "layer-major" and r.n_generated == 3


def test_ordinary_asl_with_layer_budgets(tiny6):
    toks = rand_tokens(tiny6, 400, seed=12)
    r = generate(tiny6, toks, policy="asl", layer_budgets="pyramid", prefill_mode="ordinary", budget=64, window=8,
                 max_tokens=3, ignore_eos=True, tau=0.99)
    last = r.selected_layer if r.selected_layer is not None else tiny6.n_layer - 1
    b = r.layer_budgets["budgets"]
    assert len(b) == 6 and sum(b) == 6 * 64 and b[: last + 1] == sorted(b[: last + 1], reverse=True)
    assert r.kv_bytes == sum(b) * (r.kv_bytes_full // r.n_prompt) // 6


# ---------------------------------------------------------------- SmolLM2 end to end


@REAL
def test_generate_real(smollm2):
    from test_native import FACT_PROMPT_FILLER

    model = smollm2
    filler = FACT_PROMPT_FILLER * 9
    text = (filler[: len(filler) // 2] + " Remember this: the secret code is 7419. " + filler[len(filler) // 2:] +
            "\nQuestion: What is the secret code? Answer with the number only.")
    toks = model.prompt_tokens(text)
    n, L, b_avg = len(toks), model.n_layer, 128
    found = []
    for kw in ({"policy": "zigzag"}, {"policy": "pyramid", "flash_attn": True},
               {"policy": "asl", "layer_budgets": "zigzag"}):
        r = generate(model, toks, budget=b_avg, window=16, max_tokens=12, **kw)
        lbj = r.layer_budgets
        print(f"{kw}: {r.text!r} budgets {lbj['budgets']} kv {r.kv_bytes}/{r.kv_bytes_full} "
              f"allocated {r.kv_bytes_allocated}")
        b = np.array(lbj["budgets"])
        assert b.sum() == L * b_avg and b.max() <= n and r.n_kept == b_avg
        if kw["policy"] == "zigzag":
            assert b.min() >= lbj["b_min"] == 26 and len(set(b.tolist())) > 5   # real layers differ
        cell = r.kv_bytes_full // n                                            # all 30 layers alike
        assert r.kv_bytes == b.sum() * cell // L
        assert lbj["prompt_cells"] == b.max() and lbj["kv_bytes_prompt_cells"] == b.max() * cell
        # the rows kept are a fraction of the full cache; the decode context allocates max_l B_l cells per
        # layer (+ the generation): ZigZagKV gives SmolLM2's layer 0 the whole prompt, so that is not smaller
        assert r.kv_bytes < r.kv_bytes_full and lbj["kv_bytes_prompt_cells"] <= r.kv_bytes_allocated
        assert r.text.strip() and r.n_generated > 0
        found.append("7419" in r.text.replace("-", "").replace(" ", ""))
    assert any(found), found
