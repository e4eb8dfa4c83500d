"""The Python API (pyasl.Session and the policy objects): prefill with a policy, turns appended over
the pruned cache, re-pruning whenever the context would overflow (budget as a hard cap, newest turn
kept), interrupting an answer, sampling, save/load with the model identity checked.

Mechanics run on tiny random models (fast); one test on SmolLM2 checks that a saved and loaded
session answers exactly like the one that was saved.
"""
from __future__ import annotations

import numpy as np
import pytest

import pyasl
from pyasl import policies as P
from pyasl import session as S
from pyasl.session.sampling import penalize
from tinymodels import tiny_model_path

DOC = " ".join(f"Sentence {i}: the quick brown fox number {i} jumps over the lazy dog near the river." for i in range(30))
QUESTIONS = ["what does the fox do", "where is the dog", "tell me about the river", "which number is the fox",
             "say something else", "and now?", "one more question", "the last one"]


@pytest.fixture(scope="module")
def tiny():
    return pyasl.Model(tiny_model_path("llama", n_layer=6))


@pytest.fixture(scope="module")
def tiny_qwen():
    return pyasl.Model(tiny_model_path("qwen2", n_layer=4))


@P.register_policy
class Recent(P.Policy):
    """A policy written outside pyasl: keep the most recent cells (StreamingLLM without sinks)."""

    name = "test-recent"

    def select(self, scores, window, model):
        n = scores.shape[-1]
        return P.Selection(shared=np.arange(max(0, n - self.budget), n))


def test_policy_objects():
    a = pyasl.ASL(budget=256, tau=0.2)
    assert a == P.Policy.from_dict(a.to_dict()) and "ASL(budget=256" in repr(a)
    assert P.make_policy("fastkv", layer=3, budget=64).to_dict() == {"name": "fastkv", "layer": 3, "budget": 64,
                                                                      "window": 32, "kernel": 7, "span": "forward:32"}
    f16 = P.make_policy("snapkv", budget=64, span="forward:16")
    assert f16.to_dict()["span"] == "forward:16" and P.Policy.from_dict(f16.to_dict()) == f16
    assert set(["asl", "snapkv", "fastkv", "asl-2pass", "gemfilter", "full", "test-recent"]) <= set(P.policy_names())
    with pytest.raises(ValueError, match="larger than the window"):
        pyasl.SnapKV(budget=16, window=32)
    with pytest.raises(ValueError, match="unknown policy"):
        P.make_policy("nope")
    with pytest.raises(ValueError, match="does not take tau"):
        P.make_policy("snapkv", tau=0.3)
    # built by name with a budget alone: fastkv and gemfilter take a depth-scaled default layer
    assert pyasl.FastKV(budget=64).layer is None and P.make_policy("fastkv", budget=64) == pyasl.FastKV(budget=64)
    with pytest.raises(ValueError, match="policy fastkv.*layer"):
        P.make_policy("fastkv", budget=64, layer=-1)
    with pytest.raises(ValueError, match="tau"):
        pyasl.ASL(tau=0)


def test_session_too_small_context_is_refused(tiny):
    gemma = pyasl.Model(tiny_model_path("gemma3", n_layer=6))
    with pytest.raises(ValueError, match="sliding-window"):
        S.Session(gemma, policy=pyasl.SnapKV(budget=64, window=8), n_ctx=256)
    assert S.Session(gemma, policy="full", n_ctx=256, max_tokens=4).ask("hello", max_tokens=2) is not None
    with pytest.raises(ValueError, match="raise n_ctx to at least"):
        S.Session(tiny, policy=pyasl.SnapKV(budget=100, window=8), n_ctx=128, max_tokens=32)
    with pytest.raises(ValueError, match="outside the model's layers"):
        S.Session(tiny, policy=pyasl.GemFilter(layer=9, budget=64, window=8), n_ctx=256)


@pytest.mark.parametrize("policy", [
    pyasl.ASL(budget=64, window=8), pyasl.SnapKV(budget=64, window=8), pyasl.FastKV(layer=2, budget=64, window=8),
    pyasl.ASL2Pass(budget=64, window=8), pyasl.GemFilter(layer=2, budget=64, window=8), Recent(budget=64, window=8),
], ids=lambda p: p.name)
def test_conversation_reprunes_within_the_context(tiny, policy):
    s = S.Session(tiny, policy=policy, n_ctx=160, max_tokens=8, mode="once")
    st = s.prefill(documents=[("doc.txt", DOC)])
    assert st["document_tokens"] > 300 and st["kept_tokens"] == 64
    cells = []
    for q in QUESTIONS:
        s.ask(q, max_tokens=8)
        cells.append(s.n_cells())
        assert s.n_cells() <= 160
        pos = s._present_positions()
        assert pos[-1] == s.n_past - 1 and len(pos) == s.n_cells()
    st = s.stats()
    assert st["reprunes"] >= 2 and st["total_tokens"] > 160 + 300
    assert st["turns"] == len(QUESTIONS) and len(s.messages) == 2 * len(QUESTIONS)
    assert st["prunings"] == st["reprunes"] + 1
    # right after a re-prune the cache holds at most the budget plus the rest of the turn and the answer
    assert min(cells) <= 64 + 8 + 40
    s.close()


def test_reprune_keeps_the_newest_turn(tiny):
    s = S.Session(tiny, policy=pyasl.ASL(budget=64, window=8), n_ctx=160, max_tokens=8, mode="once")
    s.prefill(documents=[DOC])
    while s.stats_.reprunes == 0:
        before = s.n_past
        s.ask("a question about the fox and the dog", max_tokens=8)
    turn_positions = np.arange(before, s.n_past)  # the turn that triggered the pruning and its answer
    assert np.isin(turn_positions, s._present_positions()).all()


@pytest.mark.parametrize("policy", [pyasl.ASL(budget=64, window=8), pyasl.SnapKV(budget=64, window=8)],
                         ids=lambda p: p.name)
def test_reprune_keeps_the_sinks_and_the_latest_exchange(tiny, policy):
    s = S.Session(tiny, policy=policy, n_ctx=160, max_tokens=8, keep_recent=12, mode="once")
    s.prefill(documents=[DOC])
    first = s._present_positions()[:4]
    while True:
        before = s._present_positions()
        start = s.n_past
        s.ask("a question about the fox and the dog", max_tokens=8)
        if s.stats_.reprunes:
            break
    present = s._present_positions()
    assert np.isin(first, present).all()                    # attention sinks
    assert np.isin(before[-6:], present).all()              # the latest exchange, verbatim (as room allows)
    assert np.isin(np.arange(start, s.n_past), present).all()  # the newest turn and its answer
    assert len(present) <= 64 + (s.n_past - start)              # the budget, then the turn's tail and answer
    with pytest.raises(ValueError, match="sink and keep_recent"):
        S.Session(tiny, policy=policy, n_ctx=160, max_tokens=8, sink=-1)


def test_repeat_penalty():
    logits = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    out = penalize(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5] and logits[0] == 2.0
    assert penalize(logits, [0], 1.0) is logits


def test_repeat_penalty_is_validated_and_changes_greedy_answers(tiny):
    s = S.Session(tiny, policy="full", n_ctx=512, max_tokens=24)
    with pytest.raises(ValueError, match="repeat_penalty"):
        s.ask("hello", repeat_penalty=0)
    with pytest.raises(ValueError, match="repeat_last_n"):
        s.ask("hello", repeat_last_n=-1)
    plain = s.ask("count the foxes", max_tokens=24)
    s.reset()
    pen = s.ask("count the foxes", max_tokens=24, repeat_penalty=50.0, repeat_last_n=4096)
    assert plain != pen
    s.close()


def test_full_policy_refuses_a_turn_that_does_not_fit(tiny):
    s = S.Session(tiny, policy="full", n_ctx=128, max_tokens=8)
    with pytest.raises(S.ContextFullError, match="policy full"):
        s.prefill(documents=[DOC])
    s = S.Session(tiny, policy=pyasl.Full(), n_ctx=128, max_tokens=8)
    with pytest.raises(S.ContextFullError, match="does not prune"):
        for q in QUESTIONS * 3:
            s.ask(q)
    n = s.n_past
    s.reset()
    assert s.n_past == 0 and s.messages == []
    s.ask("hello")
    assert s.n_past > 0 and n > 0


def test_interrupt_and_closed_stream_keep_the_partial_answer(tiny):
    s = S.Session(tiny, policy=pyasl.SnapKV(budget=64, window=8), n_ctx=256, max_tokens=64)
    s.prefill(documents=[DOC])
    gen = s.stream("tell me a long story", max_tokens=64)
    got = ""
    for piece in gen:
        got += piece
        if len(got) > 3:
            s.interrupt()
    assert s.messages[-1]["role"] == "assistant" and s.messages[-1].get("interrupted")
    assert s.messages[-1]["content"] == got
    g2 = s.stream("again", max_tokens=64)
    next(g2, None)
    g2.close()
    assert s.messages[-1].get("interrupted")
    assert isinstance(s.ask("and now a normal turn", max_tokens=4), str)
    assert not s.messages[-1].get("interrupted")


def test_seeded_sampling_is_reproducible(tiny):
    outs = []
    for _ in range(2):
        s = S.Session(tiny, policy=pyasl.ASL(budget=64, window=8), n_ctx=256, max_tokens=16)
        s.prefill(documents=[DOC])
        outs.append(s.ask("what does the fox do", temperature=0.9, top_p=0.9, seed=7))
        s.close()
    assert outs[0] == outs[1]


def test_a_closed_session_says_so(tiny, tmp_path):
    s = S.Session(tiny, policy=pyasl.SnapKV(budget=64, window=8), n_ctx=256, max_tokens=4)
    s.prefill(documents=[DOC])
    s.ask("what does the fox do")
    s.close()
    s.close()  # twice is harmless
    for call in (lambda: s.ask("and now?"), s.reset, lambda: s.save(tmp_path / "s.pyasl"),
                 lambda: s.prefill(documents=[DOC])):
        with pytest.raises(RuntimeError, match="the session is closed"):
            call()
    assert s.stats()["kept_tokens"] == 0  # what it holds: nothing


def test_save_load_and_model_mismatch(tiny, tiny_qwen, tmp_path):
    s = S.Session(tiny, policy=pyasl.ASL(budget=64, window=8), n_ctx=160, max_tokens=8, system="Be brief.")
    s.prefill(documents=[DOC])
    for q in QUESTIONS[:5]:
        s.ask(q)
    f = tmp_path / "s.pyasl"
    s.save(f)
    t = S.Session.load(tiny, f)
    assert t.messages == s.messages and t.policy == s.policy and t.n_past == s.n_past
    assert t.stats()["kept_tokens"] == s.stats()["kept_tokens"]
    assert t.ask("what now", max_tokens=8) == s.ask("what now", max_tokens=8)
    t.reset()  # back to the prefilled documents
    assert t.n_past == s.stats()["document_tokens"] and t.messages == []
    with pytest.raises(S.SessionFileError, match="saved with another model"):
        S.Session.load(tiny_qwen, f)
    bad = tmp_path / "bad.pyasl"
    bad.write_bytes(b"not a session")
    with pytest.raises(S.SessionFileError, match="not a pyasl session"):
        S.Session.load(tiny, bad)
    bad.write_bytes(f.read_bytes()[:200])
    with pytest.raises(S.SessionFileError):
        S.Session.load(tiny, bad)


@pytest.mark.real
def test_smollm2_saved_session_answers_like_the_original(tmp_path):
    m = pyasl.load_model("smollm2")
    doc = "\n".join(f"In year {1900 + i}, traveller number {i} went to city number {i % 7} and wrote about trains."
                    for i in range(20)) + "\nThe secret password of the archive is BLUE-HERON-42."
    s = pyasl.Session(m, policy=pyasl.ASL(budget=128, window=16), n_ctx=192, max_tokens=16, mode="once")
    st = s.prefill(documents=[doc])
    assert st["kept_tokens"] == 128 and st["document_tokens"] > 400
    for q in ["What is the password?", "Who went to city number 3?", "What did they write about?"]:
        assert s.ask(q).strip()
    assert s.stats()["reprunes"] >= 1
    f = tmp_path / "smol.pyasl"
    s.save(f)
    t = pyasl.Session.load(m, f)
    assert t.ask("Say the password again.") == s.ask("Say the password again.")


def test_renumbered_positions_answer_like_contiguous_ones(smollm2):
    """Cells at positions 500.. renumbered to 0.. (keys re-rotated) give the logits of a cache
    decoded at 0.. (up to the f16 cache's rounding)."""
    from pyasl import engine as E

    toks = smollm2.tokenize("The quick brown fox jumps over the lazy dog near the river bank. " * 12)
    n = len(toks)
    with E.Context(smollm2, 1024) as a, E.Context(smollm2, 1024) as b:
        a.decode(toks[:-1], pos0=0)
        a.decode(toks[-1:], pos0=n - 1)
        b.decode(toks[:-1], pos0=500)
        assert b.renumber_positions() == n - 1
        assert (np.sort(b.cell_positions(0, n - 1)) == np.arange(n - 1)).all()
        b.decode(toks[-1:], pos0=n - 1)
        la, lb = a.logits(), b.logits()
    assert np.argmax(la) == np.argmax(lb)
    assert np.abs(la - lb).max() < 0.05 * np.abs(la).max()


def test_long_conversation_stays_inside_the_training_context():
    """A session whose conversation outgrows the model's training context renumbers its kept
    cells instead of running past it: positions stay below n_ctx_train, the count of tokens seen
    keeps growing, the chat goes on."""
    m = pyasl.Model(tiny_model_path("llama", n_layer=4, n_ctx=1024))
    s = S.Session(m, policy=pyasl.ASL(budget=64, window=8), n_ctx=160, max_tokens=8, mode="once")
    s.prefill(documents=[DOC[:1200]])
    for q in QUESTIONS * 4:
        s.ask(q, max_tokens=8)
        pos = s._present_positions()
        assert pos[-1] == s.n_past - 1 < 1024
    st = s.stats()
    assert st["total_tokens"] > 1024 + 200 and st["renumbers"] >= 2 and st["next_position"] == s.n_past < 1024
    s.close()
    gemma = pyasl.Model(tiny_model_path("gemma3", n_layer=6))
    from pyasl import engine as E
    with E.Context(gemma, 256) as c:
        c.decode(list(range(5, 40)), pos0=0)
        with pytest.raises(RuntimeError, match="sliding-window"):
            c.renumber_positions()


@pytest.mark.parametrize("name", ["full", "snapkv", "asl", "asl-2pass", "fastkv", "gemfilter", "zigzag", "pyramid"])
def test_every_policy_by_name_with_a_budget_alone(tiny, name):
    """Every policy is built by name with a budget alone and prunes a conversation."""
    pol = P.make_policy(name, **({} if name == "full" else {"budget": 64, "window": 8}))
    s = S.Session(tiny, policy=pol, n_ctx=2048 if name == "full" else 256, max_tokens=8)
    st = s.prefill(documents=[DOC])
    assert (st["kept_tokens"] < st["document_tokens"]) == pol.prunes
    assert s.ask("what does the fox do", max_tokens=4) is not None
    s.close()


@pytest.mark.parametrize("policy", [pyasl.ZigZag(budget=64, window=8), pyasl.Pyramid(budget=64, window=8)],
                         ids=lambda p: p.name)
def test_per_layer_budgets_in_a_conversation(policy, tmp_path):
    """ZigZagKV and PyramidKV in a Session: the documents keep per-layer budgets (n_layer x budget
    rows in all), re-prunes keep to the cells each layer sees, and the budgets survive reset,
    save and load (the state bytes do not carry them)."""
    tiny = pyasl.Model(tiny_model_path("llama", n_layer=6, n_ctx=8192))  # no renumbering in this conversation
    s = S.Session(tiny, policy=policy, n_ctx=256, max_tokens=8, mode="once")
    s.prefill(documents=[DOC])
    first = s._layer_cells()
    assert first is not None and sum(first) == tiny.n_layer * 64 and len(set(first)) > 1
    for q in QUESTIONS:
        s.ask(q, max_tokens=8)
        assert s.n_cells() <= 256 and s._layer_cells() is not None
        pos = s._present_positions()
        assert pos[-1] == s.n_past - 1 and len(pos) == s.n_cells()
    assert s.stats()["reprunes"] >= 1 and sum(s._layer_cells()) <= tiny.n_layer * 64 + tiny.n_layer * 40
    s.save(tmp_path / "s.pyasl")
    t = S.Session.load(tiny, tmp_path / "s.pyasl")
    assert t._layer_cells() == s._layer_cells()
    assert t.ask("and the fox?", max_tokens=6) == s.ask("and the fox?", max_tokens=6)
    with pytest.raises(ValueError, match="per-layer budgets"):
        s.set_policy("snapkv")
    s.reset()
    assert s._layer_cells() == first
    s.close()
    t.close()


def test_per_layer_budgets_stop_clearly_at_the_training_context(tiny):
    s = S.Session(tiny, policy=pyasl.ZigZag(budget=64, window=8), n_ctx=256, max_tokens=8, mode="once")
    s.prefill(documents=[DOC])
    with pytest.raises(S.ContextFullError, match="training context"):
        for q in QUESTIONS * 4:
            s.ask(q, max_tokens=8)
    s.close()
