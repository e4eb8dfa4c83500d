"""Per-question selection (Session mode ``per-question``): the documents and the conversation stay
unpruned beside the decode context, and every question is the observation window of its own
selection. The kept cells must be those of the one-shot path (documents and question in one
prompt, the question's tokens as the window) on the same tokens."""
from __future__ import annotations

import json

import numpy as np
import pytest

import pyasl
from pyasl import policies as P
from pyasl.engine import Context
from pyasl.engine.context import _pad
from pyasl.engine.prefill import prefill
from pyasl.engine.strategies import select
from tinymodels import tiny_model_path

DOC = " ".join(f"Record {i}: the courier number {i} carried parcel {1000 + 7 * i} to the harbour." for i in range(40))


@pytest.fixture(scope="module")
def tiny():
    return pyasl.Model(tiny_model_path("llama", n_layer=6))


def one_shot(model, tokens, policy, window):
    """The kept cells of an ordinary prefill of `tokens` with the last `window` tokens as the window."""
    ctx = Context(model, _pad(len(tokens) + 1), capture=True)
    try:
        pf = prefill(ctx, tokens, window=window)
    finally:
        ctx.close()
    return select(policy, pf.scores, window, model, None)


def kept_sets(sel):
    return {k: None if getattr(sel, k) is None else [np.asarray(x).tolist() for x in getattr(sel, k)]
            for k in ("shared", "per_head", "per_layer")}


@pytest.mark.parametrize("policy", [
    P.make_policy("snapkv", budget=96, window=8), P.make_policy("asl", budget=96, window=8),
    P.make_policy("fastkv", budget=96, window=8), P.make_policy("pyramid", budget=96, window=8),
    P.make_policy("snapkv", budget=96, window=8, span="forward:8")], ids=["snapkv", "asl", "fastkv", "pyramid", "snapkv+forward:8"])
def test_per_question_selection_is_the_one_shot_selection(tiny, policy):
    s = pyasl.Session(tiny, policy=policy, n_ctx=256, max_tokens=8, raw=True)
    assert s.mode == "per-question"
    s.prefill(documents=[DOC])
    for q in ["Which parcel did courier 17 carry?", "And courier number 3, where did it go with its parcel?"]:
        s.ask(q)
        sel = s.last_selection
        cap = max(sel.budgets["budgets"]) if sel.budgets else policy.budget  # pyramid: per-layer budgets
        assert sel is not None and s.n_cells() <= cap + 8 + 8
        tokens = s._full.tokens
        # the window the session used: the whole turn (here longer than the policy's window)
        w = s._full.window
        assert w > policy.window
        assert kept_sets(sel) == kept_sets(one_shot(tiny, tokens, policy, w)), q
    assert s.stats()["questions_selected"] == 2 and s.stats()["mode"] == "per-question"


def test_mode_is_validated_and_full_never_copies(tiny):
    with pytest.raises(ValueError, match="mode must be one of"):
        pyasl.Session(tiny, policy=pyasl.SnapKV(budget=64, window=8), n_ctx=160, mode="sometimes")
    s = pyasl.Session(tiny, policy="full", n_ctx=1024, max_tokens=8)
    assert s.mode == "once"
    s.prefill(documents=[DOC[:800]])
    s.ask("hi")
    assert s.stats()["full_copy_mib"] is None


@pytest.mark.parametrize("mode", ["per-question", "once"])
def test_save_load_in_both_modes(tiny, mode, tmp_path):
    s = pyasl.Session(tiny, policy=pyasl.SnapKV(budget=64, window=8), n_ctx=160, max_tokens=8, mode=mode)
    s.prefill(documents=[DOC])
    for q in ["which parcel", "where to", "who carried 1007"]:
        s.ask(q)
    f = tmp_path / "s.pyasl"
    s.save(f)
    t = pyasl.Session.load(tiny, f)
    assert t.mode == mode and t.stats()["full_copy_mib"] == s.stats()["full_copy_mib"]
    assert t.ask("and then?") == s.ask("and then?")
    assert t.stats()["questions_selected"] == s.stats()["questions_selected"] == (4 if mode == "per-question" else 0)
    t.reset()
    assert t.messages == [] and t.n_past == t.stats()["document_tokens"]
    if mode == "per-question":
        assert t._full.n == t.stats()["document_tokens"]
    assert t.ask("which parcel").strip() is not None


def test_questions_benchmark_rows_and_resume(tiny, tmp_path):
    """`pyasl bench questions`: one row per (document, mode, question), resumable, summarised per mode."""
    from pyasl.bench import questions as Q

    doc, asked = Q.build_context(tiny, 600, index=0, questions=3)
    assert (doc, asked) == Q.build_context(tiny, 600, index=0, questions=3)
    assert len(tiny.tokenize(doc, add_special=False)) >= 600 and [round(d, 2) for _, _, d in asked] == [0.17, 0.5, 0.83]
    assert all(f'"{k}": "{v}"' in doc for k, v, _ in asked)
    out = tmp_path / "q.jsonl"
    pol = P.make_policy("snapkv", budget=128, window=8)
    assert Q.run(tiny, 600, 1, pol, out, questions=3, max_tokens=4, log=lambda s: None) == 12
    assert Q.run(tiny, 600, 1, pol, out, questions=3, max_tokens=4, log=lambda s: None) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    groups = {g["mode"]: g for g in Q.summary(rows)}
    assert list(groups) == list(Q.MODES) and all(g["questions"] == 3 for g in groups.values())
    assert groups["per-question"]["full_copy_mib"] > groups["per-question"]["kv_mib"]
    assert groups["once"]["full_copy_mib"] is None and groups["full"]["policy"] == "full"
    with pytest.raises(ValueError, match="unknown mode"):
        Q.run(tiny, 600, 1, pol, out, modes=["sometimes"])
