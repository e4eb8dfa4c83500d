"""Tests of the native pyasl code inside llama.cpp (native/, patches/) through pyasl.engine.

* window-attention scores (native/pyasl_graph.cpp) against llama.cpp's own "kq_soft_max" tensor,
  flash attention off and on, modes 0 and 1;
* KV-cache rewriting (native/pyasl_kv.cpp): kv_keep / kv_keep_per_head against llama.cpp's own
  cache operations (no compaction, llama_memory_seq_rm), state transfer into a smaller context,
  refusals, the sliding-window (iSWA) cache of gemma3;
* end to end: engine.generate on SmolLM2 (marked ``real``).

Tiny random models (tests/tinymodels.py) keep most cases fast; the ``real`` cases use the cached
SmolLM2-135M GGUF (30 layers, 9 heads, 3 KV heads, Q4_1).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tinymodels  # noqa: E402
from kvcheck import DROP, keep_set, keep_vs_seq_rm  # noqa: E402
from pyasl import _native  # noqa: E402
from pyasl._native import PyaslError  # noqa: E402

from pyasl.engine import Context, Model, prefill  # noqa: E402
from pyasl import generate  # noqa: E402

pytestmark = pytest.mark.native


# ---------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module")
def tiny() -> Model:
    """llama, 4 layers, n_head=4, n_head_kv=2 (GQA), f32 weights."""
    m = Model(tinymodels.tiny_model_path("llama"))
    yield m
    m.close()


@pytest.fixture(scope="module")
def tiny_gemma3() -> Model:
    """gemma3, 4 layers: 0 and 2 sliding-window (64 tokens), 1 and 3 global."""
    m = Model(tinymodels.tiny_model_path("gemma3"))
    yield m
    m.close()


def _model(request, name: str) -> Model:
    return request.getfixturevalue(name)


REAL = pytest.mark.real
MODELS = ["tiny", pytest.param("smollm2", marks=REAL)]


def rand_tokens(model: Model, n: int, seed: int = 0) -> list[int]:
    """n random ordinary tokens (BOS first)."""
    rng = np.random.default_rng(seed)
    bos = _native.load()[0].llama_vocab_bos(model.vocab)
    toks = [int(t) for t in rng.integers(300 if model.n_vocab > 1000 else 4, model.n_vocab, n)]
    if bos >= 0:
        toks[0] = int(bos)
    return toks


def decode_all(ctx: Context, tokens: list[int], logits_last: bool = True) -> None:
    for i in range(0, len(tokens), ctx.n_batch):
        chunk = tokens[i: i + ctx.n_batch]
        ctx.decode(chunk, logits_last=logits_last and i + len(chunk) == len(tokens))


def step_logits(ctx: Context, tokens: list[int], pos0: int) -> np.ndarray:
    """Decode `tokens` at pos0.. and return the logits of the last one."""
    ctx.decode(tokens, pos0=pos0)
    return ctx.logits()


def full_probs(ctx: Context, model: Model, il: int) -> np.ndarray:
    """Mode-1 scores of layer il from the last capture, as (n_head, W, n_kv)."""
    a = ctx.captured()[f"pyasl_scores-{il}"]
    assert a.shape[0] == 1 and a.shape[1] == model.n_head
    return a[0]


# ---------------------------------------------------------------- 1. scores, flash attention off


@pytest.mark.parametrize("which", MODELS)
def test_scores_equal_kq_soft_max(request, which):
    """Mode 1 == the window rows of llama.cpp's own softmax, bit for bit; mode 0 == sum of mode 1."""
    model = _model(request, which)
    n, n_last, W = 200, 64, 32  # the last ubatch is longer than the window: the row offset matters
    toks = rand_tokens(model, n)
    ctx = Context(model, 256, flash_attn=False, capture=True)
    assert ctx.kv_info().v_trans == 1
    ctx.decode(toks[: n - n_last], logits_last=False)
    ctx.add_capture_prefix("kq_soft_max")
    ctx.arm_scores(W, "attention-rows")
    ctx.decode(toks[n - n_last:])
    ctx.disarm_scores()
    caps = ctx.captured()
    assert sorted(caps) == sorted([f"pyasl_scores-{il}" for il in range(model.n_layer)] +
                                  [f"kq_soft_max-{il}" for il in range(model.n_layer)])

    full = {}
    for il in range(model.n_layer):
        ours = caps[f"pyasl_scores-{il}"]          # ggml [n_kv, W, n_head]      -> (1, n_head, W, n_kv)
        ref = caps[f"kq_soft_max-{il}"]            # ggml [n_kv, n_tokens, n_head] -> (1, n_head, n_tokens, n_kv)
        n_kv = ref.shape[-1]
        assert ref.shape == (1, model.n_head, n_last, n_kv)
        assert ours.shape == (1, model.n_head, W, n_kv)
        assert np.array_equal(ours[0], ref[0, :, n_last - W:, :]), f"layer {il}"
        # every window row is a distribution over the visible cells; masked cells get exactly 0
        np.testing.assert_allclose(ours.sum(-1), 1.0, atol=1e-4)
        pos = ctx.cell_positions(il, n_kv)
        assert len(pos) == n_kv
        qpos = np.arange(n - W, n)
        masked = (pos[None, :] < 0) | (pos[None, :] > qpos[:, None])  # (W, n_kv): empty or future
        assert masked.any() and (~masked).any()
        assert np.all(ours[0][:, masked] == 0.0)
        assert np.all(ours[0][:, ~masked] > 0.0)
        full[il] = ours[0]

    # mode 0 on the same cells: rewind the last ubatch and decode it again
    assert ctx.seq_rm(n - n_last, -1)
    ctx.arm_scores(W)
    ctx.decode(toks[n - n_last:], pos0=n - n_last)
    ctx.disarm_scores()
    caps0 = ctx.captured()
    assert sorted(caps0) == sorted([f"pyasl_scores-{il}" for il in range(model.n_layer)] +
                                   [f"kq_soft_max-{il}" for il in range(model.n_layer)])
    for il in range(model.n_layer):
        s = caps0[f"pyasl_scores-{il}"]            # ggml [n_kv, n_head] -> (1, 1, n_head, n_kv)
        assert s.shape == (1, 1, model.n_head, full[il].shape[-1])
        np.testing.assert_allclose(s[0, 0], full[il].sum(axis=1), atol=1e-5, rtol=0)

    # 3. window_scores: by position, each head's window mass is W (each query row sums to 1)
    ws = ctx.window_scores(n)
    assert ws.shape == (model.n_layer, model.n_head, n)
    np.testing.assert_allclose(ws.sum(-1), W, rtol=1e-4)
    for il in range(model.n_layer):
        np.testing.assert_array_equal(ws[il], caps0[f"pyasl_scores-{il}"][0, 0][:, :n])  # cells == positions here
    ctx.close()


# ---------------------------------------------------------------- 2. scores, flash attention on


def _oracle_probs(caps: dict, model: Model, n: int, W: int) -> np.ndarray:
    """(n_layer, n_head, W, n) causal softmax(q.k / sqrt(d)) of the last W queries, in float64 from the
    captured post-RoPE Qcur/Kcur of a single ubatch (k rounded to f16 as in the cache, q as mul_mat does)."""
    out = []
    for il in range(model.n_layer):
        q = caps[f"Qcur-{il}"][0].astype(np.float16).astype(np.float64)   # (n_tokens, n_head, d)
        k = caps[f"Kcur-{il}"][0].astype(np.float16).astype(np.float64)   # (n_tokens, n_head_kv, d)
        assert q.shape[:2] == (n, model.n_head) and k.shape[:2] == (n, model.n_head_kv)
        k = np.repeat(k, model.n_head // model.n_head_kv, axis=1)          # query head h uses KV head h // g
        s = np.einsum("whd,thd->hwt", q[n - W:], k) / np.sqrt(q.shape[-1])
        s[:, np.arange(n)[None, :] > np.arange(n - W, n)[:, None]] = -np.inf
        s = np.exp(s - s.max(-1, keepdims=True))
        out.append(s / s.sum(-1, keepdims=True))
    return np.stack(out)


@pytest.mark.parametrize("which", MODELS)
def test_scores_flash_attn_on_and_off(request, which):
    """With flash attention on there is no kq_soft_max to compare with: check both settings against a
    numpy softmax of the captured q and k, then against each other."""
    model = _model(request, which)
    n, W = 200, 32
    toks = rand_tokens(model, n, seed=1)
    probs = {}
    for fa in (False, True):
        ctx = Context(model, 256, flash_attn=fa, capture=True)
        assert ctx.kv_info().v_trans == (0 if fa else 1)
        ctx.add_capture_prefix("Qcur")
        ctx.add_capture_prefix("Kcur")
        ctx.add_capture_prefix("kq_soft_max")
        ctx.arm_scores(W, "attention-rows")
        ctx.decode(toks)                              # one ubatch: Q and K of every position are captured
        caps = ctx.captured()
        assert any(k.startswith("kq_soft_max") for k in caps) == (not fa)
        p = np.stack([full_probs(ctx, model, il) for il in range(model.n_layer)])  # (L, H, W, n_kv)
        assert p.shape[-1] >= n and np.all(p[..., n:] == 0)
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-4)
        oracle = _oracle_probs(caps, model, n, W)
        err = np.abs(p[..., :n] - oracle).max()
        print(f"{which} fa={fa}: max |scores - numpy oracle| = {err:.3g}")
        assert err < 1e-5, err
        probs[fa] = p
        ctx.close()
    diff = np.abs(probs[False] - probs[True]).reshape(model.n_layer, -1).max(1)
    print(f"{which}: FA on/off max |dp| per layer = {np.array2string(diff, precision=2)}")
    # layer 0 sees the same q and k whichever attention kernel runs ...
    assert diff[0] == 0.0
    # ... deeper layers inherit the (f16-accumulated) flash-attention outputs of the layers before
    assert diff.max() < (1e-3 if which == "tiny" else 0.15), diff.max()


@pytest.mark.parametrize("fa", [False, True])
@pytest.mark.parametrize("W", [1, 3, 45, 100])
def test_window_sum_any_length(tiny, W, fa):
    """Mode 0 (the window's probabilities summed by halving, odd steps' middle rows added at the end)
    equals the sum of mode 1's rows for windows of any length, read from the attention's own softmax
    (flash attention off) or built beside it (on). The raw q.k sum (mode 2) takes the same path: on
    cells every window query sees, scale * sum(q.k) - sum(log p) is one constant (the rows' log
    normalisers). A window as long as the ubatch is reconstruction scoring's case."""
    model = tiny
    n = 100
    toks = rand_tokens(model, n, seed=3)
    got = {}
    for score in ("attention", "attention-rows", "qk"):
        ctx = Context(model, 128, flash_attn=fa, capture=True)
        ctx.arm_scores(W, score)
        ctx.decode(toks)
        caps = ctx.captured()
        got[score] = [caps[f"pyasl_scores-{il}"] for il in range(model.n_layer)]
        ctx.close()
    for il in range(model.n_layer):
        rows = got["attention-rows"][il][0]                  # (n_head, W, n_kv)
        assert rows.shape[1] == W
        np.testing.assert_allclose(got["attention"][il][0, 0], rows.sum(axis=1), atol=1e-5, rtol=1e-6)
        qk = got["qk"][il][0, 0][:, : n - W + 1].astype(np.float64)  # (n_head, cells seen by all W)
        logp = np.log(rows[:, :, : n - W + 1].astype(np.float64)).sum(axis=1)
        d = qk / np.sqrt(model.n_embd // model.n_head) - logp
        np.testing.assert_allclose(d, d[:, :1].repeat(d.shape[1], axis=1), atol=1e-3 * W)


# ---------------------------------------------------------------- 3. window_scores after a compaction


def test_window_scores_map_cells_to_positions(tiny):
    """After kv_keep the kept rows sit in cells 0..k-1: window_scores must put them back at their positions."""
    model = tiny
    n, W = 160, 16
    toks = rand_tokens(model, n + W, seed=2)
    ctx = Context(model, 256, capture=True)
    ctx.decode(toks[:n], logits_last=False)
    keep = np.r_[0:10, 37:60, 100:131, 150:160].astype(np.int32)
    ctx.kv_keep(keep)
    assert ctx.kv_info().used_base == len(keep)
    for il in range(model.n_layer):
        pos = ctx.cell_positions(il, 256)
        np.testing.assert_array_equal(pos[: len(keep)], keep)
        assert np.all(pos[len(keep):] == -1)
    ctx.arm_scores(W)
    ctx.decode(toks[n:], pos0=n)
    ctx.disarm_scores()
    caps = ctx.captured()
    ws = ctx.window_scores(n + W)
    visible = np.zeros(n + W, dtype=bool)
    visible[keep] = True
    visible[n:] = True
    assert np.all(ws[:, :, ~visible] == 0.0)
    assert np.all(ws[:, :, visible] > 0.0)
    np.testing.assert_allclose(ws.sum(-1), W, rtol=1e-4)
    for il in range(model.n_layer):
        raw = caps[f"pyasl_scores-{il}"][0, 0]   # (n_head, n_kv) by cell
        np.testing.assert_array_equal(ws[il][:, keep], raw[:, : len(keep)])
        np.testing.assert_array_equal(ws[il][:, n:], raw[:, len(keep): len(keep) + W])
    ctx.close()


# ---------------------------------------------------------------- 4. GQA / MHA / biases


@pytest.mark.parametrize("arch,kw", [("llama", {}), ("llama", {"n_head_kv": 4}), ("llama", {"n_head_kv": 1}),
                                     ("qwen2", {})],
                         ids=["llama-gqa-4-2", "llama-mha-4-4", "llama-mqa-4-1", "qwen2-bias"])
def test_head_layouts(arch, kw):
    """Scores per query head, per-KV-head selection, for GQA, MHA, MQA and q/k/v biases."""
    model = Model(tinymodels.tiny_model_path(arch, **kw))
    assert (model.n_head, model.n_head_kv) == (4, kw.get("n_head_kv", 2))
    n, W, k = 120, 16, 48
    toks = rand_tokens(model, n + 1, seed=3)
    ctx = Context(model, 256, capture=True)
    pf = prefill(ctx, toks[:n], window=W)
    assert pf.scores.shape == (model.n_layer, model.n_head, n)
    np.testing.assert_allclose(pf.scores.sum(-1), W, rtol=1e-4)
    # per KV head: the first k - W prefix positions by the score of its query-head group, + the window
    g = model.n_head // model.n_head_kv
    grouped = pf.scores.reshape(model.n_layer, model.n_head_kv, g, n).sum(2)[..., : n - W]
    top = np.sort(np.argsort(-grouped, axis=-1, kind="stable")[..., : k - W], axis=-1)
    sets = np.concatenate([top, np.broadcast_to(np.arange(n - W, n), top.shape[:2] + (W,))], axis=-1)
    ctx.kv_keep_per_head(sets.astype(np.int32))
    assert ctx.kv_info().used_base == k
    lg = step_logits(ctx, toks[n:], n)
    assert np.all(np.isfinite(lg))
    with pytest.raises(PyaslError, match="KV heads"):
        ctx.kv_keep_per_head(np.broadcast_to(np.arange(8), (model.n_layer, model.n_head_kv + 1, 8)))
    ctx.close()
    model.close()


# ---------------------------------------------------------------- 5. keeping everything changes nothing


@pytest.mark.parametrize("fa", [False, True], ids=["fa-off", "fa-on"])
@pytest.mark.parametrize("which", MODELS)
def test_keep_all_is_bit_identical(request, which, fa):
    model = _model(request, which)
    n = 150
    toks = rand_tokens(model, n + 2, seed=4)
    out = []
    for compact in (False, True):
        ctx = Context(model, 256, flash_attn=fa)
        decode_all(ctx, toks[:n], logits_last=False)
        if compact:
            ctx.kv_keep(np.arange(n))
            assert ctx.kv_info().used_base == n
        out.append([step_logits(ctx, toks[n:n + 1], n), step_logits(ctx, toks[n + 1:n + 2], n + 1)])
        ctx.close()
    for a, b in zip(*out):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------- 6. keep a subset == seq_rm the rest


@pytest.mark.parametrize("fa", [False, True], ids=["fa-off-vtrans", "fa-on-vplain"])
@pytest.mark.parametrize("which", MODELS)
def test_keep_subset_equals_seq_rm(request, which, fa):
    """Compaction (rows moved to the front) gives the logits of removing the dropped cells in place.

    Only the order of the cells differs, hence the summation order inside attention. Layer 0's
    attention output (kqv_out-0) has identical inputs in both contexts, so it must agree to rounding;
    the logits agree to rounding on the f32 tiny model. On Q4_1 SmolLM2 a last-bit difference flips
    a Q8_1 rounding of some activation deep in the stack and then grows: loose bound + same argmax.
    """
    model = _model(request, which)
    n = 180
    d_att, d_att_full, pairs = keep_vs_seq_rm(model, rand_tokens(model, n + 3, seed=5), n, fa)
    print(f"{which} fa={fa}: layer-0 attention keep vs seq_rm {d_att:.3g}, vs unpruned {d_att_full:.3g}")
    assert d_att < (1e-6 if not fa else 2e-3), d_att   # flash attention accumulates V in f16
    assert d_att_full > 10 * d_att                      # and the pruning is real
    for a, b in pairs:
        d = float(np.abs(a - b).max())
        print(f"{which} fa={fa}: keep vs seq_rm max |dlogit| = {d:.3g}")
        assert int(np.argmax(a)) == int(np.argmax(b))
        if which == "tiny":
            assert d < (5e-5 if not fa else 5e-3), d  # 1.8e-5 seen on a GGML_NATIVE=OFF build (ASan)
        else:
            assert d < 1.5, d


@pytest.mark.parametrize("fa", [False, True], ids=["fa-off", "fa-on"])
def test_renumber_positions(tiny, fa):
    """pyasl_kv_renumber: a prompt decoded at 100.. and renumbered gives the logits of the prompt
    decoded at 0.. (RoPE keeps only distances); after a pruning (cells with gaps) it equals
    llama.cpp's own lazy shift (llama_memory_seq_add per cell, applied by the next decode), and the
    rotated keys are what a saved state holds."""
    llama_cpp = _native.load()[0]
    n = 120
    toks = rand_tokens(tiny, n + 1, seed=7)
    a = Context(tiny, 256, flash_attn=fa)
    a.decode(toks[:n], pos0=100, logits_last=False)
    assert a.renumber_positions() == n
    la = step_logits(a, toks[n:], n)
    a.close()
    b = Context(tiny, 256, flash_attn=fa)
    b.decode(toks[:n], pos0=0, logits_last=False)
    lb = step_logits(b, toks[n:], n)
    b.close()
    assert np.abs(la - lb).max() < 1e-3 * max(1.0, float(np.abs(lb).max()))  # f16 cache: keys rotated after rounding

    keep = keep_set(n)
    k = len(keep)
    res = {}
    for how in ("pyasl", "lazy"):
        c = Context(tiny, 256, flash_attn=fa)
        c.decode(toks[:n], pos0=100, logits_last=False)
        c.kv_keep(keep + 100)
        if how == "pyasl":
            assert c.renumber_positions() == k
            np.testing.assert_array_equal(c.cell_positions(0, k), np.arange(k))
            state = c.state_get()
        else:
            mem = llama_cpp.llama_get_memory(c._ctx)
            for j, p in enumerate((keep + 100).tolist()):
                llama_cpp.llama_memory_seq_add(mem, 0, p, p + 1, j - p)
        res[how] = step_logits(c, toks[n:], k)
        if how == "pyasl":
            assert c.renumber_positions() == k + 1  # contiguous already: nothing moves
        c.close()
    np.testing.assert_allclose(res["pyasl"], res["lazy"], rtol=0, atol=1e-5)
    d = Context(tiny, 256, flash_attn=fa)
    d.state_set(state, n_past=k)
    np.testing.assert_allclose(step_logits(d, toks[n:], k), res["pyasl"], rtol=0, atol=1e-5)
    d.close()


def test_renumber_refusals(tiny, tiny_gemma3):
    c = Context(tiny_gemma3, 256)
    c.decode(rand_tokens(tiny_gemma3, 20), pos0=0)
    with pytest.raises(PyaslError, match="sliding-window"):
        c.renumber_positions()
    c.close()
    c = Context(tiny, 256)
    with pytest.raises(PyaslError, match="no cells"):
        c.renumber_positions()
    c.close()


@pytest.mark.parametrize("fa", [False, True], ids=["fa-off-k-q8_0", "fa-on-kv-q8_0"])
def test_keep_quantized_cache(fa):
    """Block-quantized cache rows (q8_0 K; V too with flash attention) move whole, per cell and per head."""
    llama_cpp, _, _ = _native.load()
    q8 = llama_cpp.GGML_TYPE_Q8_0
    model = Model(tinymodels.tiny_model_path("llama", n_embd=128))   # head size 32 = one q8_0 block
    n = 180
    toks = rand_tokens(model, n + 1, seed=13)
    drop, keep = DROP, keep_set(n)
    lg = {}
    for how in ("full", "seq_rm", "keep", "per_head"):
        ctx = Context(model, 256, flash_attn=fa, type_k=q8, type_v=q8 if fa else None)
        decode_all(ctx, toks[:n], logits_last=False)
        if how == "seq_rm":
            for a, b in drop:
                assert ctx.seq_rm(a, b)
        elif how == "keep":
            ctx.kv_keep(keep)
        elif how == "per_head":
            ctx.kv_keep_per_head(np.broadcast_to(keep, (model.n_layer, model.n_head_kv, len(keep))))
        lg[how] = step_logits(ctx, toks[n:], n)
        ctx.close()
    d = float(np.abs(lg["keep"] - lg["seq_rm"]).max())
    print(f"q8_0 cache fa={fa}: keep vs seq_rm max |dlogit| = {d:.3g}")
    assert d < 1e-5, d
    assert np.array_equal(lg["keep"], lg["per_head"])
    assert np.abs(lg["keep"] - lg["full"]).max() > 1e-2
    model.close()


# ---------------------------------------------------------------- 7./8. per-head selection


@pytest.mark.parametrize("fa", [False, True], ids=["fa-off", "fa-on"])
@pytest.mark.parametrize("which", MODELS)
def test_per_head_identical_sets_equal_global(request, which, fa):
    model = _model(request, which)
    n = 160
    toks = rand_tokens(model, n + 1, seed=6)
    keep = keep_set(n)
    out = []
    for per_head in (False, True):
        ctx = Context(model, 256, flash_attn=fa)
        decode_all(ctx, toks[:n], logits_last=False)
        if per_head:
            ctx.kv_keep_per_head(np.broadcast_to(keep, (model.n_layer, model.n_head_kv, len(keep))))
        else:
            ctx.kv_keep(keep)
        np.testing.assert_array_equal(ctx.cell_positions(model.n_layer - 1, len(keep)), keep)
        out.append(step_logits(ctx, toks[n:], n))
        ctx.close()
    assert np.array_equal(out[0], out[1])


@pytest.mark.parametrize("fa", [False, True], ids=["fa-off-vtrans", "fa-on-vplain"])
def test_per_head_different_sets(tiny, fa):
    """Each KV head gets its own rows: layer-0 attention of the query heads of KV head h equals the
    attention with the global selection sets[h] (layer 0's q does not depend on the cache)."""
    model = tiny
    n, W = 160, 8
    toks = rand_tokens(model, n + W, seed=7)
    rng = np.random.default_rng(0)
    k = 70
    # the last position stays in every list: decoding continues at seq_pos_max + 1
    sets = np.sort(np.stack([[np.r_[rng.choice(n - 1, k - 1, replace=False), n - 1] for _ in range(model.n_head_kv)]
                             for _ in range(model.n_layer)]), axis=-1).astype(np.int32)
    g = model.n_head // model.n_head_kv

    ctx = Context(model, 256, flash_attn=fa, capture=True)
    decode_all(ctx, toks[:n], logits_last=False)
    ctx.kv_keep_per_head(sets)
    # the cell metadata is the element-wise max position over every (layer, head) list
    np.testing.assert_array_equal(ctx.cell_positions(0, k), sets.max(axis=(0, 1)))
    ctx.arm_scores(W, "attention-rows")
    ctx.decode(toks[n:], pos0=n)
    lg = ctx.logits()
    assert np.all(np.isfinite(lg))
    per_head0 = full_probs(ctx, model, 0)
    ctx.close()

    for h in range(model.n_head_kv):
        ref = Context(model, 256, flash_attn=fa, capture=True)
        decode_all(ref, toks[:n], logits_last=False)
        ref.kv_keep(sets[0, h])
        ref.arm_scores(W, "attention-rows")
        ref.decode(toks[n:], pos0=n)
        glob0 = full_probs(ref, model, 0)
        ref.close()
        heads = slice(h * g, (h + 1) * g)
        np.testing.assert_allclose(per_head0[heads, :, : k + W], glob0[heads, :, : k + W], atol=1e-6, rtol=0)


# ---------------------------------------------------------------- 9. state transfer into a smaller context


@pytest.mark.parametrize("fa", [False, True], ids=["fa-off", "fa-on"])
@pytest.mark.parametrize("which", MODELS)
def test_state_into_smaller_context(request, which, fa):
    model = _model(request, which)
    n, k = 400, 100
    toks = rand_tokens(model, n + 2, seed=8)
    keep = np.r_[0:4, np.linspace(4, n - 32, k - 36).astype(np.int32), n - 32:n].astype(np.int32)
    keep = np.unique(keep)
    big = Context(model, 512, flash_attn=fa)
    decode_all(big, toks[:n], logits_last=False)
    big.kv_keep(keep)
    state = big.state_get()
    small = Context(model, 256, flash_attn=fa)
    assert small.kv_info().size_base == 256
    small.state_set(state, n_past=n)
    assert small.kv_info().used_base == len(keep)
    np.testing.assert_array_equal(small.cell_positions(0, len(keep)), keep)
    for i in range(2):
        a = step_logits(big, toks[n + i:n + i + 1], n + i)
        b = step_logits(small, toks[n + i:n + i + 1], n + i)
        d = float(np.abs(a - b).max())
        print(f"{which} fa={fa}: state transfer max |dlogit| = {d:.3g}")
        assert np.array_equal(a, b) or d < 1e-4, d
    big.close()
    small.close()


# ---------------------------------------------------------------- 10. refusals


def test_scores_need_a_full_window(tiny):
    """A ubatch shorter than the window gives no scores (and window_scores says so) instead of garbage."""
    ctx = Context(tiny, 256, capture=True)
    toks = rand_tokens(tiny, 40, seed=14)
    ctx.decode(toks[:30], logits_last=False)
    ctx.arm_scores(16)
    ctx.decode(toks[30:40])                      # 10 tokens < 16
    assert not any(k.startswith("pyasl_scores") for k in ctx.captured())
    with pytest.raises(RuntimeError, match="0 of 4 layers"):
        ctx.window_scores(40)
    ctx.decode(toks[:16], pos0=40)               # a full window: scores for every layer again
    ws = ctx.window_scores(56)
    np.testing.assert_allclose(ws.sum(-1), 16, rtol=1e-4)
    ctx.disarm_scores()
    ctx.close()


def _raw_context(model: Model, n_ctx: int, n_seq_max: int, kv_unified: bool) -> Context:
    """A Context around a llama_context with several sequences (engine.Context always makes one)."""
    llama_cpp, _, _ = _native.load()
    ctx = Context.__new__(Context)
    ctx.model = model
    ctx._cap = None
    p = llama_cpp.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch = n_ctx, 256, 256
    p.n_seq_max = n_seq_max
    p.kv_unified = kv_unified
    p.n_threads = p.n_threads_batch = 2
    p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx._params = p
    ctx._ctx = llama_cpp.llama_init_from_model(model._m, p)
    assert ctx._ctx
    ctx.n_ctx = llama_cpp.llama_n_ctx(ctx._ctx)
    ctx.n_batch = 256
    ctx._batch = llama_cpp.llama_batch_init(256, 0, 1)
    ctx.n_past = 0
    return ctx


def test_refusals_leave_the_cache_untouched(tiny):
    model = tiny
    n = 100
    toks = rand_tokens(model, n + 1, seed=9)
    ctx = Context(model, 256, n_batch=128, capture=True)
    decode_all(ctx, toks[:n], logits_last=False)
    assert ctx.seq_rm(40, 50)
    before = [ctx.cell_positions(il, 256) for il in range(model.n_layer)]
    L, Hkv = model.n_layer, model.n_head_kv

    bad_keep = [
        ("strictly increasing", [1, 3, 3, 7]),
        ("strictly increasing", [10, 5, 20]),
        ("position 45 is not in the KV cache", [0, 45, 60]),     # removed by seq_rm
        (f"position {n} is not in the KV cache", [0, 1, n]),     # never decoded
        ("position -1 is not in the KV cache", [-1, 0, 1]),
    ]
    for msg, pos in bad_keep:
        with pytest.raises(PyaslError, match=msg):
            ctx.kv_keep(np.array(pos))
    with pytest.raises((PyaslError, ValueError), match="at least one position"):
        ctx.kv_keep(np.array([], dtype=np.int32))
    with pytest.raises(PyaslError, match=f"last position {n - 1} must be kept"):
        ctx.kv_keep(np.arange(0, 40))
    with pytest.raises(PyaslError, match=f"last position {n - 1} must be kept"):
        ctx.kv_keep_per_head(np.broadcast_to(np.arange(0, 40), (L, Hkv, 40)))

    ok = np.arange(0, 40, 2)
    with pytest.raises(PyaslError, match="KV heads"):
        ctx.kv_keep_per_head(np.broadcast_to(ok, (L, Hkv * 2, len(ok))))
    with pytest.raises(PyaslError, match="does not cover"):
        ctx.kv_keep_per_head(np.broadcast_to(ok, (L - 1, Hkv, len(ok))))
    bad = np.array(np.broadcast_to(ok, (L, Hkv, len(ok))))
    bad[L - 1, Hkv - 1, 3] = 45                      # one list of one head in the last layer
    with pytest.raises(PyaslError, match="not in the KV cache"):
        ctx.kv_keep_per_head(bad)
    bad = np.array(np.broadcast_to(ok, (L, Hkv, len(ok))))
    bad[1, 0, [2, 3]] = bad[1, 0, [3, 2]]
    with pytest.raises(PyaslError, match="strictly increasing"):
        ctx.kv_keep_per_head(bad)
    with pytest.raises(ValueError):
        ctx.kv_keep_per_head(ok)                       # not 3-D
    with pytest.raises(PyaslError, match="bad sizes"):
        ctx.kv_keep_per_head(np.zeros((L, Hkv, 0), dtype=np.int32))

    with pytest.raises(PyaslError, match="longer than n_ubatch"):
        ctx.arm_scores(129)
    with pytest.raises(ValueError, match="score must be one of attention, attention-rows, qk"):
        ctx.arm_scores(16, "softmax")
    with pytest.raises(PyaslError, match="mode 0, 1 or 2"):
        _native.check(_native.load()[1].pyasl_set_score_window(ctx._ctx, 16, 3), "arm scores")
    with pytest.raises(PyaslError):
        ctx.arm_scores(-1)
    with pytest.raises(PyaslError, match="has no KV cache"):
        ctx.cell_positions(model.n_layer, 16)

    for il in range(L):
        np.testing.assert_array_equal(ctx.cell_positions(il, 256), before[il])
    # nothing happened: the cache still gives the logits of a plain seq_rm
    lg = step_logits(ctx, toks[n:], n)
    ref = Context(model, 256, n_batch=128)
    decode_all(ref, toks[:n], logits_last=False)
    ref.seq_rm(40, 50)
    assert np.array_equal(lg, step_logits(ref, toks[n:], n))
    ref.close()

    # a pending position shift (llama_memory_seq_add) must be applied by a decode first
    llama_cpp, _, _ = _native.load()
    llama_cpp.llama_memory_seq_add(llama_cpp.llama_get_memory(ctx._ctx), 0, 50, -1, -10)
    with pytest.raises(PyaslError, match="pending position shift"):
        ctx.kv_keep(np.arange(10))
    ctx.close()

    with pytest.raises(PyaslError, match="no cells"):
        empty = Context(model, 256)
        try:
            empty.kv_keep(np.arange(3))
        finally:
            empty.close()


def test_refuses_shared_cells(tiny):
    """Cells shared by two sequences (llama_memory_seq_cp) cannot be moved for one of them."""
    llama_cpp, _, _ = _native.load()
    ctx = _raw_context(tiny, 256, n_seq_max=2, kv_unified=True)
    toks = rand_tokens(tiny, 50, seed=10)
    ctx.decode(toks, logits_last=False)
    assert ctx.kv_info().n_stream == 1
    llama_cpp.llama_memory_seq_cp(llama_cpp.llama_get_memory(ctx._ctx), 0, 1, -1, -1)
    with pytest.raises(PyaslError, match="shared between sequences"):
        ctx.kv_keep(np.arange(10))
    with pytest.raises(PyaslError, match="shared between sequences"):
        ctx.kv_keep_per_head(np.broadcast_to(np.arange(10), (tiny.n_layer, tiny.n_head_kv, 10)))
    np.testing.assert_array_equal(ctx.cell_positions(0, 50), np.arange(50))
    ctx.close()


def test_refuses_several_streams(tiny):
    ctx = _raw_context(tiny, 256, n_seq_max=2, kv_unified=False)
    ctx.decode(rand_tokens(tiny, 20, seed=11), logits_last=False)
    with pytest.raises(PyaslError, match="several streams"):
        ctx.kv_keep(np.arange(10))
    with pytest.raises(PyaslError, match="several streams"):
        ctx.kv_info()
    ctx.close()


# ---------------------------------------------------------------- 11. gemma3 (sliding-window + global)


@pytest.mark.parametrize("fa", [False, True], ids=["fa-off", "fa-on"])
def test_gemma3_iswa(tiny_gemma3, fa):
    """Sliding-window model: scores for every layer, pruning of the base (global) cache only, decode
    and state transfer into a smaller context."""
    model = tiny_gemma3
    assert model.n_swa == 64
    n, W = 200, 16
    toks = rand_tokens(model, n + 2, seed=12)
    keep = np.r_[0:8, 60:100, n - W:n].astype(np.int32)
    ctxs = {}
    for how in ("none", "keep", "per_head"):
        ctx = Context(model, 512, n_batch=128, flash_attn=fa, capture=True)   # swa cache: 64 + 128 -> 256 cells
        info = ctx.kv_info()
        assert info.n_caches == 2 and info.n_layer_base == 2 and info.n_layer_swa == 2
        assert info.size_swa < info.size_base
        pf = prefill(ctx, toks[:n], window=W)
        assert pf.scores.shape == (model.n_layer, model.n_head, n)
        np.testing.assert_allclose(pf.scores.sum(-1), W, rtol=1e-4)
        # sliding-window layers (0, 2) see at most the last n_swa positions of each window query
        for il in (0, 2):
            assert np.all(pf.scores[il][:, : n - W - model.n_swa + 1] == 0)
            assert np.all(pf.scores[il][:, n - model.n_swa:] > 0)
        for il in (1, 3):
            assert np.all(pf.scores[il] > 0)
        swa_before = ctx.cell_positions(0, info.size_swa)
        if how == "keep":
            ctx.kv_keep(keep)
        elif how == "per_head":   # per-head selection ignores the layers that are not in the base cache
            ctx.kv_keep_per_head(np.broadcast_to(keep, (model.n_layer, model.n_head_kv, len(keep))))
        if how != "none":
            info = ctx.kv_info()
            assert info.used_base == len(keep)
            for il in (1, 3):
                np.testing.assert_array_equal(ctx.cell_positions(il, len(keep)), keep)
        np.testing.assert_array_equal(ctx.cell_positions(0, info.size_swa), swa_before)   # swa cache untouched
        ctxs[how] = ctx
    small = Context(model, 256, n_batch=128, flash_attn=fa)
    assert small.kv_info().size_base == 256
    small.state_set(ctxs["keep"].state_get(), n_past=n)
    ctxs["small"] = small
    assert small.kv_info().used_base == len(keep)
    for i in range(2):
        lg = {how: step_logits(c, toks[n + i:n + i + 1], n + i) for how, c in ctxs.items()}
        assert np.all(np.isfinite(lg["keep"]))
        assert np.array_equal(lg["keep"], lg["per_head"])
        assert np.array_equal(lg["keep"], lg["small"])
        assert np.abs(lg["keep"] - lg["none"]).max() > 1e-3
    for c in ctxs.values():
        c.close()


# ---------------------------------------------------------------- 12. end to end on SmolLM2


FACT_PROMPT_FILLER = (
    "The village sat at the edge of a wide valley, where the river turned east and the road climbed "
    "toward the old stone bridge. Every market day the farmers brought apples, cheese and bread, and "
    "the children ran between the stalls while their parents talked about the weather and the harvest. "
)


@pytest.fixture(scope="module")
def fact_prompt(smollm2):
    model = smollm2
    filler = FACT_PROMPT_FILLER * 9
    text = (filler[: len(filler) // 2] + " Remember this: the secret code is 7419. " + filler[len(filler) // 2:] +
            "\nQuestion: What is the secret code? Answer with the number only.")
    toks = model.prompt_tokens(text)
    assert 450 <= len(toks) <= 700, len(toks)
    return toks


@REAL
def test_generate_real(smollm2, fact_prompt):
    model = smollm2
    n = len(fact_prompt)
    full = generate(model, fact_prompt, policy="full", max_tokens=16)
    print(f"full: {full.text!r}")
    assert "7419" in full.text.replace("-", "").replace(" ", ""), full.text
    assert full.n_kept == n and full.kv_bytes == full.kv_bytes_full
    answers = []
    for policy in ("asl", "snapkv"):
        r = generate(model, fact_prompt, policy=policy, budget=128, window=16, max_tokens=16)
        print(f"{policy}: {r.text!r} kept {r.n_kept} kv {r.kv_bytes}/{r.kv_bytes_full} "
              f"(allocated {r.kv_bytes_allocated}) layer {r.selected_layer} {r.note}")
        assert r.policy == policy and r.n_prompt == n
        assert r.text.strip() and r.n_generated > 0
        assert r.n_kept == 128
        assert r.kv_bytes == full.kv_bytes_full * 128 // n
        assert r.kv_bytes < r.kv_bytes_full == full.kv_bytes_full
        assert r.kv_bytes_allocated < r.kv_bytes_full      # the decode context is sized to the budget
        assert (r.selected_layer is not None) == (policy == "asl")
        answers.append(r.text.replace("-", "").replace(" ", ""))
    # 128 of ~600 tokens: at least one policy still finds the fact (today both do)
    assert any("7419" in a for a in answers), answers
