"""Quantized KV caches (q8_0, q4_0; flash attention on) under every pruning policy (issue 23): every
context a strategy makes uses the requested types, the kept rows move whole (block-aligned per head),
and a quantized V without flash attention is refused with a clear message."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tinymodels  # noqa: E402
from kvcheck import random_tokens as toks  # noqa: E402

from pyasl import generate  # noqa: E402
from pyasl import policies as P  # noqa: E402
from pyasl.engine import Context, Model  # noqa: E402
from pyasl.engine import strategies  # noqa: E402
from pyasl.engine.context import kv_type_name  # noqa: E402

pytestmark = pytest.mark.native

# bytes of 32 values: f16 64, q8_0 34, q4_0 and iq4_nl 18
BLOCK_BYTES = {"f16": 64, "q8_0": 34, "q4_0": 18, "iq4_nl": 18}
POLICIES = ["snapkv", "asl", "fastkv", "asl-2pass", "gemfilter", "pyramid", "zigzag"]


@pytest.fixture(scope="module")
def tiny() -> Model:
    # head size 32: one q8_0 / q4_0 block per head
    return Model(tinymodels.tiny_model_path("llama", n_layer=6, n_embd=128))


@pytest.mark.parametrize("kv", ["q8_0", "q4_0", "iq4_nl"])
@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_prunes_a_quantized_cache(tiny, policy, kv):
    t = toks(tiny, 300, seed=1)
    kw = dict(policy=policy, budget=64, window=16, max_tokens=4, n_batch=128, flash_attn=True, ignore_eos=True)
    q = generate(tiny, t, type_k=kv, type_v=kv, **kw)
    f = generate(tiny, t, **kw)
    assert q.n_kept == f.n_kept and q.n_generated == 4
    assert q.kv_bytes * BLOCK_BYTES["f16"] == f.kv_bytes * BLOCK_BYTES[kv]
    assert q.kv_bytes_full * BLOCK_BYTES["f16"] == f.kv_bytes_full * BLOCK_BYTES[kv]


def test_quantized_k_alone_works_without_flash_attention(tiny):
    r = generate(tiny, toks(tiny, 300), policy="asl", budget=64, window=16, max_tokens=2, n_batch=128, type_k="q8_0")
    assert r.n_kept == 64


def test_streamed_layer_major_equals_stored_with_q8_0(tiny):
    t = toks(tiny, 300, seed=2)
    pol = P.FastKV(layer=2, budget=64, window=16)
    stored = pol.replace()
    stored.streams_early_layers = lambda model: False
    out = []
    for p in (pol, stored):
        pr = strategies.run(tiny, t, p, max_tokens=4, n_batch=128, flash_attn=True, type_k="q8_0", type_v="q8_0")
        try:
            assert pr.ctx.type_k == "q8_0" and pr.ctx.type_v == "q8_0"
            pr.ctx.decode([5])
            out.append((pr.logits, pr.ctx.logits()))
        finally:
            pr.ctx.close()
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])


def test_bad_cache_types_are_refused(tiny):
    with pytest.raises(ValueError, match="needs flash attention"):
        generate(tiny, toks(tiny, 300), policy="asl", budget=64, window=16, type_v="q8_0")
    with pytest.raises(ValueError, match="unknown KV cache type"):
        generate(tiny, toks(tiny, 300), policy="asl", budget=64, window=16, type_k="q3_k")
    with pytest.raises(ValueError, match="needs flash attention"):
        Context(tiny, 256, type_v="q4_0")
    assert kv_type_name(8) == "q8_0" and kv_type_name("Q4_0") == "q4_0"
    for bad in (True, 99, None, 1.0):
        with pytest.raises(ValueError):
            kv_type_name(bad)


def test_cli_generate_cache_types(tiny, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 60 + "What jumps?")
    base = [sys.executable, "-m", "pyasl", "generate", str(tiny.path), "--prompt-file", str(prompt), "--raw",
            "--budget", "64", "--window", "8", "--max-tokens", "4", "--json"]
    p = subprocess.run(base + ["-ctk", "q8_0", "-ctv", "q8_0", "--flash-attn"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    q = json.loads(p.stdout)
    p = subprocess.run(base + ["--flash-attn"], capture_output=True, text=True, timeout=300)
    f = json.loads(p.stdout)
    assert q["kv_bytes"] * 64 == f["kv_bytes"] * 34
    p = subprocess.run(base + ["--cache-type-v", "q4_0"], capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "needs flash attention" in p.stderr


DOC = " ".join(f"Record {i}: the courier number {i} carried parcel {1000 + 7 * i} to the harbour." for i in range(40))


@pytest.mark.parametrize("mode", ["per-question", "once"])
def test_session_keeps_its_cache_types_through_save_and_load(tiny, mode, tmp_path):
    import pyasl

    s = pyasl.Session(tiny, policy=pyasl.SnapKV(budget=64, window=8), n_ctx=160, max_tokens=8, mode=mode,
                      flash_attn=True, type_k="q8_0", type_v="q8_0")
    s.prefill(documents=[DOC])
    s.ask("which parcel")
    assert s._ctx.type_k == s._ctx.type_v == "q8_0"
    if mode == "per-question":
        assert s._full.ctx.type_v == "q8_0"
    f = tmp_path / "s.pyasl"
    s.save(f)
    t = pyasl.Session.load(tiny, f)
    assert (t.type_k, t.type_v) == ("q8_0", "q8_0")
    assert t.ask("and then?") == s.ask("and then?")
    with pytest.raises(ValueError, match="needs flash attention"):
        pyasl.Session(tiny, policy=pyasl.SnapKV(budget=64, window=8), n_ctx=160, max_tokens=8, type_v="q4_0")


@pytest.mark.real
@pytest.mark.parametrize("kv_mode", ["per-question", "once"])
def test_llama_prunes_into_its_quantized_cache(kv_mode):
    """pyasl.Llama takes llama-cpp-python's type_k / type_v; the pruned state must load into its context."""
    import llama_cpp

    import pyasl
    from pyasl.models import fetch_model

    text = (Path(__file__).resolve().parent.parent / "examples" / "long_prompt.txt").read_text()
    q8 = llama_cpp.GGML_TYPE_Q8_0
    llm = pyasl.Llama(str(fetch_model("smollm2")), n_ctx=512, kv_policy=pyasl.ASL(budget=256, window=16),
                      kv_mode=kv_mode, flash_attn=True, type_k=q8, type_v=q8, verbose=False)
    try:
        r = llm.create_completion(text[:4000] + "\nQuestion: who replaces the generator?\nAnswer:", max_tokens=8,
                                  temperature=0)
        assert llm.n_prunes == 1 and llm.last_prune["n_kept"] == 256 and r["choices"][0]["text"].strip()
    finally:
        llm.close()
