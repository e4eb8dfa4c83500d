"""Seeded fuzz tests of the KV rewrite, the generate pipeline and the GGUF checks.

* random keep-sets (kv_keep) on tiny models of several head layouts, flash attention off and on:
  the sequence state (cell positions + every K/V byte, as llama_state_seq_get_data writes it) equals
  the state after llama_memory_seq_rm of the complement (in-place removal), and the logits of the
  next decode agree to rounding;
* random per-(layer, KV head) sets (kv_keep_per_head): every head slice of every kept K and V row is
  the row of the position that list named, read back from the serialised state;
* random tiny-model shapes (every architecture) through engine.generate for every policy with random
  budgets, windows, tau and layers: no crash, documented refusals only, invariants on the result,
  and "nothing to prune" giving exactly the full-KV answer;
* random byte and metadata corruption of tiny GGUF files, loaded in a child process: every file is
  either refused with a message or runs; the child must never abort or hang.

Everything is seeded (PYASL_FUZZ_SEED shifts the seeds, PYASL_FUZZ_SCALE multiplies the trial counts);
tiny models on one thread each, so the default run takes well under a minute on two cores.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tinymodels  # noqa: E402

from pyasl.engine import POLICIES, Context, Model, layer_major_supported  # noqa: E402
from pyasl import generate  # noqa: E402

pytestmark = pytest.mark.native

SEED = int(os.environ.get("PYASL_FUZZ_SEED", "0"))
SCALE = float(os.environ.get("PYASL_FUZZ_SCALE", "1"))


def trials(n: int) -> int:
    return max(1, int(round(n * SCALE)))


# ---------------------------------------------------------------- sequence state reader


def parse_seq_state(data: bytes, n_cell_ext: int = 0) -> dict:
    """llama_state_seq_get_data of a plain (one-stream, non-iSWA) KV cache, see
    llama_context::state_seq_get_data (magic, seq id) and llama_kv_cache::state_write: {pos: (n,), k: [layer](n, row bytes), v: [layer](n, bytes per cell)}."""
    off = 0

    def rd(fmt):
        nonlocal off
        v = struct.unpack_from(fmt, data, off)
        off += struct.calcsize(fmt)
        return v if len(v) > 1 else v[0]

    def raw(n):
        nonlocal off
        b = np.frombuffer(data, dtype=np.uint8, count=n, offset=off)
        off += n
        return b

    assert rd("<I") == 0xAF143CD8, "io magic"
    assert rd("<i") == 0, "sequence 0"
    assert rd("<I") == 1, "one stream"
    n = rd("<I")
    pos = []
    for _ in range(n):
        pos.append(rd("<i"))
        n_seq = rd("<I")
        off += n_cell_ext
        off += 4 * n_seq
    v_trans, n_layer = rd("<I"), rd("<I")
    k = []
    for _ in range(n_layer):
        rd("<i")
        row = rd("<Q")
        k.append(raw(n * row).reshape(n, row))
    v = []
    for _ in range(n_layer):
        rd("<i")
        if not v_trans:
            row = rd("<Q")
            v.append(raw(n * row).reshape(n, row))
        else:
            el, n_embd = rd("<I"), rd("<I")
            a = raw(n_embd * n * el).reshape(n_embd, n, el)
            v.append(np.ascontiguousarray(a.transpose(1, 0, 2)).reshape(n, n_embd * el))
    assert off == len(data), (off, len(data))
    return {"pos": np.array(pos), "k": k, "v": v}


# ---------------------------------------------------------------- models


LAYOUTS = {
    # name: (arch, kwargs) - GQA, MQA, MHA and a multi-axis-RoPE architecture (global keep only)
    "llama-gqa": ("llama", {}),
    "qwen2-mqa": ("qwen2", dict(n_embd=64, n_head=4, n_head_kv=1, seed=3)),
    "qwen3-mha": ("qwen3", dict(n_embd=48, n_head=3, n_head_kv=3, head_dim=16, seed=4)),
    "qwen2vl": ("qwen2", dict(arch_name="qwen2vl", extra_kv={"rope.dimension_sections": [4, 2, 2, 0]}, seed=5)),
}


@pytest.fixture(scope="module")
def models():
    out = {name: Model(tinymodels.tiny_model_path(arch, **kw)) for name, (arch, kw) in LAYOUTS.items()}
    yield out
    for m in out.values():
        m.close()


def rand_tokens(model: Model, n: int, rng) -> list[int]:
    toks = [int(t) for t in rng.integers(4, model.n_vocab, n)]
    toks[0] = tinymodels.BOS_ID
    return toks


def prefill(model: Model, toks: list[int], fa: bool) -> Context:
    ctx = Context(model, 512, n_batch=128, flash_attn=fa, n_threads=1)
    for i in range(0, len(toks), 128):
        ctx.decode(toks[i: i + 128], logits_last=False)
    return ctx


def random_keep(rng, n: int) -> np.ndarray:
    """A random strictly increasing keep-set of 0..n-1 that holds n-1: scattered, runs, or tiny."""
    kind = rng.integers(0, 4)
    if kind == 0:  # just the last position
        keep = np.array([n - 1])
    elif kind == 1:  # scattered
        keep = rng.choice(n - 1, int(rng.integers(1, n)), replace=False)
    elif kind == 2:  # a few runs
        mask = np.zeros(n - 1, dtype=bool)
        for _ in range(int(rng.integers(1, 5))):
            a = int(rng.integers(0, n - 1))
            mask[a: a + int(rng.integers(1, n // 3 + 2))] = True
        keep = np.flatnonzero(mask)
    else:  # everything but a few
        keep = np.setdiff1d(np.arange(n - 1), rng.choice(n - 1, min(n - 1, int(rng.integers(1, 6))), replace=False))
    return np.union1d(keep, [n - 1]).astype(np.int32)


def ranges(mask_removed: np.ndarray):
    """[a, b) runs of True."""
    out, i, n = [], 0, len(mask_removed)
    while i < n:
        if mask_removed[i]:
            j = i
            while j < n and mask_removed[j]:
                j += 1
            out.append((i, j))
            i = j
        else:
            i += 1
    return out


# ---------------------------------------------------------------- keep-sets vs in-place removal


@pytest.mark.parametrize("fa", [False, True], ids=["fa-off", "fa-on"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_random_keep_sets_equal_seq_rm(models, layout, fa):
    model = models[layout]
    ext = 12 if layout == "qwen2vl" else 0  # llama_kv_cell_ext {x, y, tok} of multi-axis RoPE cells
    rng = np.random.default_rng([SEED, 1, list(LAYOUTS).index(layout), fa])
    tol = 1e-3 if not fa else 2e-2  # the states are bit-identical; only the summation order differs
    for t in range(trials(6)):
        n = int(rng.integers(2, 300))
        toks = rand_tokens(model, n + 2, rng)
        keep = random_keep(rng, n)
        removed = np.ones(n, dtype=bool)
        removed[keep] = False

        a = prefill(model, toks[:n], fa)
        a.kv_keep(keep)
        b = prefill(model, toks[:n], fa)
        for p0, p1 in ranges(removed):
            assert b.seq_rm(p0, p1)
        sa, sb = a.state_get(), b.state_get()
        assert sa == sb, f"trial {t}: state after kv_keep differs from seq_rm (n={n}, k={len(keep)})"
        st = parse_seq_state(sa, ext)
        np.testing.assert_array_equal(st["pos"], keep)
        assert a.kv_info().used_base == len(keep)

        for step in (toks[n:n + 1], toks[n + 1:n + 2]):
            a.decode(step)
            b.decode(step)
            la, lb = a.logits(), b.logits()
            d = float(np.abs(la - lb).max())
            assert d < tol, f"trial {t}: |dlogit| {d} (n={n}, k={len(keep)})"
            top2 = np.sort(lb)[-2:]
            if top2[1] - top2[0] > 2 * tol:
                assert int(np.argmax(la)) == int(np.argmax(lb))
        a.close()
        b.close()


# ---------------------------------------------------------------- per-head sets vs the rows they name


@pytest.mark.parametrize("fa", [False, True], ids=["fa-off-vtrans", "fa-on-vplain"])
@pytest.mark.parametrize("layout", ["llama-gqa", "qwen2-mqa", "qwen3-mha"])
def test_random_per_head_sets_move_the_named_rows(models, layout, fa):
    model = models[layout]
    L, H = model.n_layer, model.n_head_kv
    rng = np.random.default_rng([SEED, 2, list(LAYOUTS).index(layout), fa])
    for t in range(trials(5)):
        n = int(rng.integers(2, 260))
        k = int(rng.integers(1, n + 1))
        toks = rand_tokens(model, n + 1, rng)
        sets = np.empty((L, H, k), dtype=np.int32)
        for l in range(L):
            for h in range(H):
                sets[l, h] = np.sort(rng.choice(n, k, replace=False))
        # decoding continues after the last position: some list must end with it
        l, h = int(rng.integers(0, L)), int(rng.integers(0, H))
        if sets[l, h, -1] != n - 1:
            sets[l, h] = np.sort(np.r_[rng.choice(n - 1, k - 1, replace=False), n - 1])

        ctx = prefill(model, toks[:n], fa)
        full = parse_seq_state(ctx.state_get())
        np.testing.assert_array_equal(full["pos"], np.arange(n))
        ctx.kv_keep_per_head(sets)
        got = parse_seq_state(ctx.state_get())
        np.testing.assert_array_equal(got["pos"], sets.max(axis=(0, 1)))
        for l in range(L):
            for kv in ("k", "v"):
                src, dst = full[kv][l], got[kv][l]
                hb = src.shape[1] // H
                for h in range(H):
                    np.testing.assert_array_equal(dst[:, h * hb:(h + 1) * hb], src[sets[l, h], h * hb:(h + 1) * hb],
                                                  err_msg=f"trial {t} layer {l} head {h} {kv}")
        ctx.decode(toks[n:])
        assert np.all(np.isfinite(ctx.logits()))
        ctx.close()


# ---------------------------------------------------------------- random models through generate()


def _shape(rng, arch: str) -> dict:
    n_head_kv = int(rng.choice([1, 2]))
    n_head = n_head_kv * int(rng.choice([1, 2, 3]))
    head_dim = int(rng.choice([8, 16]))
    kw = dict(n_layer=int(rng.integers(2, 6)), n_head=n_head, n_head_kv=n_head_kv, n_embd=n_head * head_dim,
              n_ff=int(rng.choice([32, 64])), seed=int(rng.integers(0, 1 << 16)))
    if arch == "gemma3":
        kw.update(sliding_window=int(rng.choice([16, 32, 64])), swa_pattern=int(rng.choice([2, 3])))
    return kw


def test_random_models_through_generate(tmp_path):
    rng = np.random.default_rng([SEED, 3])
    n_runs = n_pruned = 0
    for t in range(trials(2 * len(tinymodels.ARCHS))):
        arch = tinymodels.ARCHS[t % len(tinymodels.ARCHS)]
        kw = _shape(rng, arch)
        path = tinymodels.make_tiny_model(tmp_path / f"m{t}.gguf", arch=arch, **kw)
        with Model(path) as model:
            n = int(rng.integers(1, 300))
            toks = rand_tokens(model, n, rng)
            max_tokens = int(rng.integers(1, 6))
            full = generate(model, toks, policy="full", max_tokens=max_tokens, ignore_eos=True, n_threads=1)
            assert full.n_kept == n and len(full.tokens) == max_tokens
            for policy in POLICIES[1:]:
                window = int(rng.integers(1, 33))
                kind = rng.uniform()  # mostly a real pruning budget, sometimes the edges
                budget = int(rng.integers(window + 1, max(window + 2, n))) if kind < 0.7 else \
                    int(rng.integers(n, 2 * n + 2)) if kind < 0.85 else int(rng.integers(1, window + 1))
                kw_g = dict(policy=policy, budget=budget, window=window, max_tokens=max_tokens, ignore_eos=True, n_threads=1,
                            tau=float(rng.uniform(0.01, 1.0)), flash_attn=bool(rng.integers(0, 2)),
                            layer=int(rng.integers(0, model.n_layer)), n_batch=int(rng.choice([64, 512])))
                what = f"trial {t} {arch} {kw} n={n} {kw_g}"
                if budget <= window or window > kw_g["n_batch"]:
                    with pytest.raises(ValueError, match="window"):
                        generate(model, toks, **kw_g)
                    continue
                if policy == "fastkv" and layer_major_supported(model) and window < n and budget < n:
                    with pytest.raises(ValueError, match="fastkv needs layer-major prefill"):
                        generate(model, toks, **kw_g)
                    continue
                try:
                    res = generate(model, toks, **kw_g)
                except ValueError as e:
                    # sliding-window models refuse per-layer budgets, and a fixed layer before the first
                    # global-attention layer, with the reason
                    if model.n_swa > 0 and ("sliding-window" in str(e) or "global" in str(e)):
                        continue
                    raise
                n_runs += 1
                assert len(res.tokens) == max_tokens, what
                assert all(0 <= x < model.n_vocab for x in res.tokens), what
                assert res.kv_bytes <= res.kv_bytes_full, what
                if window >= n or budget >= n or "nothing to prune" in res.note:
                    assert "nothing to prune" in res.note, what
                    assert res.n_kept == n and res.tokens == full.tokens, what
                else:
                    n_pruned += 1
                    assert 0 < res.n_kept <= budget, what
                    if policy in ("fastkv", "gemfilter"):
                        assert res.selected_layer == kw_g["layer"], what
                    again = generate(model, toks, **kw_g)
                    assert again.tokens == res.tokens, what + " (not deterministic)"
    print(f"{n_runs} generate runs, {n_pruned} of them pruned")
    assert n_pruned >= n_runs // 3


# ---------------------------------------------------------------- corrupt GGUF files, in a child process


_CHILD = textwrap.dedent(r'''
    import shutil, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    import gguf, tinymodels
    from pyasl import _native
    llama_cpp, _, _ = _native.load()
    keep = llama_cpp.llama_log_callback(lambda level, text, user: None)
    llama_cpp.llama_log_set(keep, None)
    from pyasl.engine import Context, Model, ModelLoadError

    def run(path):
        try:
            with Model(path) as m:
                toks = m.tokenize("the cache holds the keys\n and the values " * 4)
                m.detokenize(toks)
                with Context(m, 256, n_threads=1) as c:
                    c.decode(toks[:64])
                    c.logits()
            return "ran"
        except (ModelLoadError, ValueError, RuntimeError) as e:
            assert str(e), "empty message"
            return "refused"

    tmp, mode, seed, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    stats = {{}}
    for arch in ("llama", "qwen2", "gemma3", "phi3"):
        src = tinymodels.tiny_model_path(arch)
        data = open(src, "rb").read()
        hlen = gguf.GGUFReader(str(src)).data_offset
        if mode == "bytes":
            cases = [("bytes", i) for i in range(n)]
        else:
            r = gguf.GGUFReader(str(src))
            cases = []
            for key, f in r.fields.items():
                if len(f.types) != 1 or f.types[0] == gguf.GGUFValueType.STRING:
                    continue
                dt = f.parts[f.data[0]].dtype
                if dt.kind in "iu":
                    info = np.iinfo(dt)
                    vals = [0, 1, info.max] + ([-1] if dt.kind == "i" else [])
                elif dt.kind == "f":
                    vals = [0.0, -1.0, float("nan"), 1e30]
                else:
                    continue
                cases += [(key, v) for v in vals]
        for case in cases:
            q = tmp + "/" + arch + ".gguf"
            if case[0] == "bytes":
                rng = np.random.default_rng([seed, case[1]])
                d = bytearray(data)
                for _ in range(int(rng.integers(1, 4))):
                    d[int(rng.integers(0, hlen))] = int(rng.integers(0, 256))
                open(q, "wb").write(bytes(d))
            else:
                shutil.copy(src, q)
                w = gguf.GGUFReader(q, "r+")
                f = w.fields[case[0]]
                f.parts[f.data[0]][0] = case[1]
                del w
            print(arch, case, flush=True)
            res = run(q)
            stats[res] = stats.get(res, 0) + 1
    print("STATS", stats)
''')


@pytest.mark.parametrize("mode, n", [("bytes", 60), ("meta", 0)])
def test_corrupt_gguf_never_crashes(tmp_path, mode, n):
    """Random header bytes (mostly vocabulary strings) and edge values of every numeric metadata key:
    the child loads, tokenizes and decodes each file or refuses it; it must not abort or hang."""
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=str(Path(__file__).resolve().parent)))
    env = dict(os.environ, GGML_NO_BACKTRACE="1")
    p = subprocess.run([sys.executable, str(script), str(tmp_path), mode, str(SEED), str(trials(n))],
                       capture_output=True, text=True, timeout=600, env=env)
    last = p.stdout.strip().splitlines()[-1:] or ["(nothing)"]
    assert p.returncode == 0, f"child died ({p.returncode}) after case {last[0]}:\n{p.stderr[-3000:]}"
    assert last[0].startswith("STATS"), last
    print(last[0])
