"""Pruning limits by architecture, on loaded tiny models (tests/tinymodels.py) rather than fake headers.

* MLA (deepseek2: ``attention.kv_lora_rank`` > 0): the compressed KV cache is not pruned. Full KV runs;
  every pruning policy is refused before any work, by ``generate`` and by the CLI.
* ALiBi (mpt: ``attention.max_alibi_bias`` in the GGUF; bloom: set by llama.cpp's loader, no key):
  the bias comes from cell positions. A shared keep-set keeps each token's position, so it equals
  removing the dropped positions in place (``seq_rm``); per-head and per-layer sets (snapkv, fastkv,
  zigzag, pyramid, asl --layer-budgets) would bias with the wrong positions and are refused. asl
  (ordinary prefill, one shared set), asl-2pass and gemfilter run.
* The Session API applies the same limits when a session is made or its policy changed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tinymodels  # noqa: E402
from kvcheck import keep_vs_seq_rm, random_tokens  # noqa: E402

from click.testing import CliRunner  # noqa: E402

from pyasl import engine  # noqa: E402
from pyasl import policies as P  # noqa: E402
from pyasl._native import PyaslError  # noqa: E402
from pyasl.engine import Context, Model  # noqa: E402
from pyasl import generate  # noqa: E402

pytestmark = pytest.mark.native

PRUNING = ("snapkv", "asl", "fastkv", "asl-2pass", "gemfilter", "zigzag", "pyramid")
ALIBI = ("mpt", "bloom")
KW = dict(budget=40, window=8, layer=1, max_tokens=2, n_threads=1)  # prompts of 120 tokens: pruning is real

MLA_PATH = tinymodels.tiny_model_path("deepseek2", n_layer=2, seed=11)


def _alibi_path(arch: str) -> Path:
    # MHA like the real models (n_head_kv = n_head)
    return tinymodels.tiny_model_path(arch, n_layer=3, n_head=4, n_head_kv=4, seed=12)


@pytest.fixture(scope="module")
def mla() -> Model:
    m = Model(MLA_PATH)
    yield m
    m.close()


@pytest.fixture(scope="module", params=ALIBI)
def alibi(request) -> Model:
    m = Model(_alibi_path(request.param))
    yield m
    m.close()


@pytest.fixture
def no_context(monkeypatch):
    """Any attempt to build a llama.cpp context fails the test: refusals must come before any work."""
    def boom(*a, **k):
        raise AssertionError("a context was created before the policy was refused")

    monkeypatch.setattr(engine, "Context", boom)


# ---------------------------------------------------------------- MLA (deepseek2)


def test_mla_model_loads_and_runs_full(mla):
    assert mla.arch == "deepseek2"
    assert mla.gguf.get("attention.kv_lora_rank") == 32
    assert mla.n_head_kv == 1  # the latent cache is one shared "head"
    toks = random_tokens(mla, 120)
    r = generate(mla, toks, policy="full", max_tokens=5, ignore_eos=True, n_threads=1)
    assert r.n_generated == 5 and r.n_kept == 120 and r.note == ""
    assert all(0 <= t < mla.n_vocab for t in r.tokens)
    # the first token is the argmax of the prompt's last logits; greedy decoding is deterministic
    with Context(mla, 256, n_threads=1) as c:
        c.decode(toks)
        assert int(np.argmax(c.logits())) == r.tokens[0]
    assert generate(mla, toks, policy="full", max_tokens=5, ignore_eos=True, n_threads=1).tokens == r.tokens


def test_mla_pruning_unsupported(mla):
    for per_head in (False, True):
        why = mla.pruning_unsupported(per_head)
        assert why and "multi-head latent attention (MLA)" in why and "deepseek2" in why


@pytest.mark.parametrize("policy", PRUNING)
def test_mla_refuses_every_pruning_policy(mla, policy, no_context):
    with pytest.raises(ValueError, match=r"policy \S+ cannot run on this model: .*\(MLA\).*; use policy full$"):
        generate(mla, random_tokens(mla, 120), policy=policy, **KW)


def test_mla_refuses_layer_budgets(mla, no_context):
    with pytest.raises(ValueError, match=r"\(MLA\)"):
        generate(mla, random_tokens(mla, 120), policy="asl", layer_budgets="zigzag", prefill_mode="ordinary", **KW)


def test_mla_cli():
    from pyasl.apps.cli import main

    prompt = " ".join(["The cache holds the keys and the values of every token the model has seen so far."] * 12)
    base = ["generate", str(MLA_PATH), "--raw", "--prompt", prompt, "--budget", "40", "--window", "8",
            "--max-tokens", "2", "--threads", "1", "--no-progress"]
    r = CliRunner().invoke(main, base + ["--policy", "asl"])
    assert r.exit_code != 0, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)  # a message, not a traceback
    assert "multi-head latent attention (MLA)" in r.output and "use policy full" in r.output
    r = CliRunner().invoke(main, base + ["--policy", "full"])
    assert r.exit_code == 0, r.output
    assert "policy full" in r.output


_DOC = " ".join(["The cache holds the keys and the values of every token the model has seen so far."] * 20)


@pytest.mark.parametrize("policy", ["snapkv", "asl", "asl-2pass"])
def test_mla_session_refuses_pruning(mla, policy):
    """The Session API enforces the same limit as generate (it used to prune MLA caches silently)."""
    import pyasl

    with pytest.raises(ValueError, match=r"\(MLA\).*; use policy full$"):
        pyasl.Session(mla, policy=pyasl.make_policy(policy, budget=40, window=8), n_ctx=1024, max_tokens=2)
    s = pyasl.Session(mla, policy="full", n_ctx=1024, max_tokens=2)
    try:
        with pytest.raises(ValueError, match=r"\(MLA\)"):
            s.set_policy(pyasl.make_policy(policy, budget=40, window=8))
        s.prefill(documents=[_DOC])
        s.ask("What?")
        assert s.n_cells() > 40  # full: nothing pruned
    finally:
        s.close()


# ---------------------------------------------------------------- ALiBi (mpt, bloom)


def test_alibi_is_detected(alibi):
    assert alibi.uses_alibi()
    # mpt declares it in the GGUF; bloom does not (llama.cpp's loader sets max_alibi_bias = 8 itself)
    assert (alibi.gguf.get("attention.max_alibi_bias") is not None) == (alibi.arch == "mpt")
    assert alibi.pruning_unsupported(False) is None
    assert "ALiBi" in alibi.pruning_unsupported(True)
    with Model(tinymodels.tiny_model_path("llama")) as m:
        assert not m.uses_alibi()


def test_alibi_full_runs(alibi):
    toks = random_tokens(alibi, 120)
    r = generate(alibi, toks, policy="full", max_tokens=5, ignore_eos=True, n_threads=1)
    assert r.n_generated == 5 and r.n_kept == 120
    with Context(alibi, 256, n_threads=1) as c:
        c.decode(toks)
        assert int(np.argmax(c.logits())) == r.tokens[0]


@pytest.mark.parametrize("fa", [False, True], ids=["fa-off", "fa-on"])
def test_alibi_shared_keep_equals_seq_rm(alibi, fa):
    """A shared keep-set (rows moved to the front, positions kept) == removing the rest in place.

    ALiBi biases each key by its cell position, so this holds only because kv_keep keeps the
    positions: compare layer-0 attention (identical inputs) and the logits of two decode steps.
    """
    n = 180
    d_att, d_att_full, pairs = keep_vs_seq_rm(alibi, random_tokens(alibi, n + 3, seed=5), n, fa, n_threads=1)
    assert d_att < (1e-6 if not fa else 2e-3), d_att  # flash attention accumulates V in f16
    assert d_att_full > 10 * d_att                     # and the pruning is real
    for a, b in pairs:
        d = float(np.abs(a - b).max())
        assert int(np.argmax(a)) == int(np.argmax(b))
        assert d < (5e-5 if not fa else 5e-3), d


def test_alibi_per_head_keep_refused(alibi):
    n = 120
    with Context(alibi, 256, n_threads=1) as c:
        c.decode(random_tokens(alibi, n))
        with pytest.raises(PyaslError, match="ALiBi"):
            c.kv_keep_per_head(np.broadcast_to(np.arange(n - 20, n), (alibi.n_layer, alibi.n_head_kv, 20)))
        assert c.kv_info().used_base == n  # untouched
        sets = [np.broadcast_to(np.arange(n - 20, n), (alibi.n_head_kv, 20))] * alibi.n_layer
        with pytest.raises(ValueError, match="ALiBi"):
            c.kv_keep_per_layer(sets)
        assert c.kv_info().used_base == n


@pytest.mark.parametrize("policy", ["snapkv", "fastkv", "zigzag", "pyramid"])
def test_alibi_per_head_policies_refused(alibi, policy, no_context):
    with pytest.raises(ValueError, match=r"uses ALiBi, which biases by cell position.*asl-2pass, gemfilter or full"):
        generate(alibi, random_tokens(alibi, 120), policy=policy, **KW)


def test_alibi_asl_layer_budgets_refused(alibi, no_context):
    with pytest.raises(ValueError, match="ALiBi"):
        generate(alibi, random_tokens(alibi, 120), policy="asl", layer_budgets="pyramid", prefill_mode="ordinary", **KW)


def test_alibi_asl_end_to_end(alibi):
    """asl runs with an ordinary prefill and one shared set; its decode equals seq_rm of the dropped
    positions followed by greedy decoding."""
    n, budget, window, steps = 120, 40, 8, 6
    toks = random_tokens(alibi, n, seed=3)
    r = generate(alibi, toks, policy="asl", budget=budget, window=window, max_tokens=steps, ignore_eos=True,
                 n_threads=1)
    assert r.n_kept == budget and r.n_generated == steps
    assert "ordinary prefill" in r.note and r.asl["prefill"] == "ordinary"
    # the same selection by hand, applied with seq_rm
    with Context(alibi, 256, n_threads=1, capture=True) as c:
        pf = engine.prefill(c, toks, window=window)
        sel = P.asl_select(pf.scores, window=window, budget=budget, tau=0.3, kernel=7)
        assert sel.selected_layer == r.selected_layer and len(sel.kept) == budget
        dropped = np.setdiff1d(np.arange(n), sel.kept)
        for p in dropped:
            assert c.seq_rm(int(p), int(p) + 1)
        assert c.kv_info().used_base == budget
        ref = engine.greedy_decode(alibi, c, pf.logits, steps, ignore_eos=True)
    assert ref.tokens == r.tokens


@pytest.mark.parametrize("policy", ["asl-2pass", "gemfilter"])
def test_alibi_two_pass_policies_run(alibi, policy):
    r = generate(alibi, random_tokens(alibi, 120), policy=policy, **KW)
    assert r.n_kept == 40 and r.n_generated == 2


@pytest.mark.parametrize("arch", ["llama", "mpt"])
def test_per_layer_sets_use_shared_cell_positions(arch, monkeypatch):
    """Why per-layer sets are refused on ALiBi: every layer packs its own rows into cells 0..k-1 under
    one set of cell positions (the latest position at each index). Layer 0 keeping A while later layers
    keep B gives layer 0 exactly the attention of a shared keep of A on a RoPE model (positions live in
    K), but not under ALiBi, whose biases read the (here: B's) cell positions."""
    path = tinymodels.tiny_model_path("llama") if arch == "llama" else _alibi_path("mpt")
    with Model(path) as m:
        monkeypatch.setattr(Model, "uses_alibi", lambda self: False)  # reach the native call
        n = 120
        toks = random_tokens(m, n + 1, seed=1)
        win = np.arange(n - 8, n)
        A, B = np.concatenate([np.arange(0, 10), win]), np.concatenate([np.arange(50, 60), win])
        att0 = {}
        for how in ("shared", "per-layer"):
            with Context(m, 256, n_threads=1, capture=True) as c:
                c.decode(toks[:n], logits_last=False)
                if how == "shared":
                    c.kv_keep(A)
                else:
                    c.kv_keep_per_layer([np.broadcast_to(A, (m.n_head_kv, A.size))]
                                        + [np.broadcast_to(B, (m.n_head_kv, B.size))] * (m.n_layer - 1))
                    np.testing.assert_array_equal(c.cell_positions(0, A.size), B)
                c.add_capture_prefix("kqv_out")
                c.decode(toks[n:], pos0=n)
                att0[how] = c.captured()["kqv_out-0"]
        d = float(np.abs(att0["shared"] - att0["per-layer"]).max())
        if arch == "llama":
            assert d < 1e-6, d
        else:
            assert d > 1e-2, d  # wrong positions: the reason Context.kv_keep_per_layer refuses ALiBi


def test_alibi_session(alibi):
    """Session: snapkv (per head) refused up front; asl (one shared set, ordinary prefill here) prunes."""
    import pyasl

    with pytest.raises(ValueError, match="uses ALiBi.*use policy asl"):
        pyasl.Session(alibi, policy=pyasl.make_policy("snapkv", budget=40, window=8), n_ctx=1024, max_tokens=2)
    s = pyasl.Session(alibi, policy=pyasl.make_policy("asl", budget=40, window=8), n_ctx=1024, max_tokens=2)
    try:
        s.prefill(documents=[_DOC])
        assert s.n_cells() <= 40
        s.ask("What?")
    finally:
        s.close()


def test_llama_dropin_refuses_what_generate_refuses():
    """pyasl.Llama(kv_policy=...) applies the same architecture limits as generate and Session."""
    import pyasl

    with pytest.raises(ValueError, match="MLA"):
        pyasl.Llama(model_path=str(MLA_PATH), n_ctx=256, kv_policy=pyasl.ASL(budget=64, window=8), verbose=False)
    with pytest.raises(ValueError, match="ALiBi"):
        pyasl.Llama(model_path=str(_alibi_path("bloom")), n_ctx=256, kv_policy=pyasl.SnapKV(budget=64, window=8),
                    verbose=False)
    llm = pyasl.Llama(model_path=str(MLA_PATH), n_ctx=256, verbose=False)  # no policy: full KV
    assert llm.create_completion("hello", max_tokens=2)["choices"]
    llm.close()
