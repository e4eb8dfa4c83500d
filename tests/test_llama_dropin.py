"""pyasl.Llama: llama-cpp-python's Llama with kv_policy, on SmolLM2 with a prompt long enough to prune.

create_completion, create_chat_completion and streaming go through llama-cpp-python unchanged; the
prompt's cache is pruned to the budget; a pruned cache is never reused as the whole prompt by the
longest-prefix reuse (a later call sharing a prefix gives what a fresh Llama gives).
"""
from __future__ import annotations

import numpy as np
import pytest

import pyasl
from pyasl._native import load as _load_native
from pyasl.engine.prefill import prefill_kept
from pyasl.models import fetch_model

llama_cpp = _load_native()[0]

BUDGET = 96


def _doc() -> str:
    lines = [f"In year {1900 + i}, traveller number {i} went to city number {i % 7} and wrote about the trains."
             for i in range(22)]
    lines.insert(11, "The secret password of the archive is BLUE-HERON-42.")
    return "\n".join(lines)


PROMPT = _doc() + "\n\nQuestion: What is the secret password of the archive?\nAnswer:"


@pytest.fixture(scope="module")
def path() -> str:
    return str(fetch_model("smollm2"))


@pytest.fixture(scope="module")
def llm(path):
    m = pyasl.Llama(path, n_ctx=1024, kv_policy=pyasl.ASL(budget=BUDGET, window=16), verbose=False)
    yield m
    m.close()


def _text(r) -> str:
    return r["choices"][0]["text"]


@pytest.mark.real
def test_completion_is_pruned_and_prefix_reuse_never_trusts_a_pruned_cache(llm, path):
    r = llm.create_completion(PROMPT, max_tokens=12, temperature=0)
    n_prompt = r["usage"]["prompt_tokens"]
    assert n_prompt > 3 * BUDGET
    assert llm.n_prunes == 1 and llm.last_prune["n_prompt"] == n_prompt and llm.last_prune["n_kept"] == BUDGET
    assert BUDGET <= llm.kv_cells() <= BUDGET + r["usage"]["completion_tokens"]
    assert llm.kv_bytes() == llm.kv_cells() * llm._kv_info().cell_bytes_base  # no sliding-window cells here
    assert llm.kv_bytes() < llm.last_prune["full_copy_mib"] * 2**20 / 3
    assert _text(r).strip()

    # the same prompt again: pruned again from scratch, same greedy answer
    r2 = llm.create_completion(PROMPT, max_tokens=12, temperature=0)
    assert llm.n_prunes == 2 and _text(r2) == _text(r)

    # a prompt sharing a long prefix: re-prefilled (not the pruned cache + a suffix), so it answers
    # exactly like a fresh Llama
    p2 = PROMPT + " The password is"
    r3 = llm.create_completion(p2, max_tokens=8, temperature=0)
    assert llm.n_prunes == 3
    fresh = pyasl.Llama(path, n_ctx=1024, kv_policy=pyasl.ASL(budget=BUDGET, window=16), verbose=False)
    try:
        assert _text(fresh.create_completion(p2, max_tokens=8, temperature=0)) == _text(r3)
    finally:
        fresh.close()

    # streaming gives the same text as the non-streamed call
    chunks = list(llm.create_completion(PROMPT, max_tokens=12, temperature=0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == _text(r)
    assert llm.n_prunes == 4


@pytest.mark.real
def test_chat_completion_stream_and_not(llm):
    msgs = [{"role": "user", "content": _doc() + "\n\nWhat is the secret password of the archive?"}]
    n0 = llm.n_prunes
    c = llm.create_chat_completion(messages=msgs, max_tokens=12, temperature=0)
    content = c["choices"][0]["message"]["content"]
    assert content.strip() and llm.n_prunes == n0 + 1 and llm.last_prune["n_kept"] == BUDGET
    parts = [ch["choices"][0]["delta"].get("content") or ""
             for ch in llm.create_chat_completion(messages=msgs, max_tokens=12, temperature=0, stream=True)]
    assert "".join(parts) == content and llm.n_prunes == n0 + 2


@pytest.mark.real
def test_short_prompts_and_no_policy_are_plain_llama_cpp(path):
    plain = pyasl.Llama(path, n_ctx=1024, verbose=False)
    try:
        r = plain.create_completion(PROMPT, max_tokens=6, temperature=0)
        assert plain.n_prunes == 0 and plain.last_prune is None
        assert plain.kv_cells() >= r["usage"]["prompt_tokens"]
        with pytest.raises(ValueError, match="kv_policy"):
            pyasl.Llama(path, n_ctx=256, kv_policy=42, verbose=False)
    finally:
        plain.close()


@pytest.mark.real
def test_a_long_prompt_after_a_short_one_is_pruned_whole(llm):
    """A short unpruned prompt that is a prefix of a long one must not turn the long one into an
    unpruned suffix evaluation."""
    n0 = llm.n_prunes
    llm.create_completion(PROMPT[:40], max_tokens=2, temperature=0)
    assert llm.n_prunes == n0
    r = llm.create_completion(PROMPT, max_tokens=4, temperature=0)
    assert llm.n_prunes == n0 + 1 and llm.last_prune["n_prompt"] == r["usage"]["prompt_tokens"]
    assert llm.kv_cells() <= BUDGET + 4


@pytest.mark.real
@pytest.mark.parametrize("name", ["zigzag", "pyramid", "fastkv"])
def test_every_policy_by_name_prunes_a_prompt(path, name):
    """zigzag and pyramid (per-layer budgets, set again after the state is loaded) and fastkv
    (default layer) built by name with a budget alone."""
    lm = pyasl.Llama(path, n_ctx=1024, kv_policy=pyasl.make_policy(name, budget=BUDGET, window=16), verbose=False)
    r = lm.create_completion(PROMPT, max_tokens=8, temperature=0)
    assert lm.n_prunes == 1 and _text(r).strip()
    if name != "fastkv":
        assert lm.last_prune["n_kept"] > BUDGET  # the largest layer's budget: prompt cells of every layer
    lm.close()


@pytest.mark.real
@pytest.mark.parametrize("mode", ["per-question", "once"])
def test_prompts_longer_than_the_decode_context(path, mode):
    """n_ctx is the decode context (budget + answers): a 600-token prompt is answered from 256 cells.
    per-question keeps the prompt's full KV: a later prompt sharing the document decodes only what
    differs, selects with its own last tokens, and answers as a fresh Llama does."""
    kw = dict(n_ctx=256, kv_policy=pyasl.ASL(budget=BUDGET, window=16), kv_mode=mode, verbose=False)
    lm = pyasl.Llama(path, **kw)
    try:
        r = lm.create_completion(PROMPT, max_tokens=12, temperature=0)
        assert r["usage"]["prompt_tokens"] > 2 * 256 and lm.kv_cells() <= 256
        assert lm.last_prune["mode"] == mode and lm.last_prune["n_kept"] == BUDGET
        assert "BLUE-HERON-42" in _text(r) or mode == "once"
        p2 = _doc() + "\n\nQuestion: Where did traveller number 5 go?\nAnswer:"
        r2 = lm.create_completion(p2, max_tokens=8, temperature=0)
        if mode == "per-question":
            assert lm.last_prune["reused_tokens"] > 500 and lm.last_prune["full_copy_mib"] > 0
        else:
            assert lm.last_prune["reused_tokens"] == 0 and lm.last_prune["full_copy_mib"] is None
        fresh = pyasl.Llama(path, **kw)
        try:
            assert _text(fresh.create_completion(p2, max_tokens=8, temperature=0)) == _text(r2)
        finally:
            fresh.close()
        # an answer stops when the decode context is full
        r3 = lm.create_completion(PROMPT, max_tokens=400, temperature=0.9, seed=1)
        assert lm.kv_cells() <= 256
        assert r3["usage"]["completion_tokens"] < 400 - 200
    finally:
        lm.close()


def _other_doc() -> str:
    lines = [f"On day {i}, the ship named Vessel {i} left port number {i % 5} carrying {10 * i} crates of tea."
             for i in range(22)]
    lines.insert(9, "The harbour master's code word is AMBER-FALCON-17.")
    return "\n".join(lines)


@pytest.mark.real
def test_parked_copies_bring_a_document_back_without_prefilling_it(path):
    """Questions about two documents in turn: with parked_copies the first document's full KV is
    parked on disk while the second is asked about, and loaded back (not prefilled again) for the
    next question about it; the answer is a fresh Llama's."""
    kw = dict(n_ctx=256, kv_policy=pyasl.ASL(budget=BUDGET, window=16), verbose=False)
    lm = pyasl.Llama(path, parked_copies=1, **kw)
    try:
        lm.create_completion(PROMPT, max_tokens=4, temperature=0)
        other = _other_doc() + "\n\nQuestion: What is the harbour master's code word?\nAnswer:"
        lm.create_completion(other, max_tokens=4, temperature=0)
        assert lm.last_prune["reused_tokens"] < 10 and lm.last_prune["parked_copies"] == 1
        again = _doc() + "\n\nQuestion: Where did traveller number 5 go?\nAnswer:"
        r = lm.create_completion(again, max_tokens=8, temperature=0)
        assert lm.last_prune["reused_tokens"] > 500 and lm._shelf.loads == 1
        assert lm.last_prune["parked_copies"] == 1  # the second document parked in its turn
        directory = lm._shelf.directory
        assert len(list(directory.iterdir())) == 1
        fresh = pyasl.Llama(path, **kw)
        try:
            assert _text(fresh.create_completion(again, max_tokens=8, temperature=0)) == _text(r)
        finally:
            fresh.close()
    finally:
        lm.close()
    assert not directory.exists()


@pytest.mark.parametrize("bad, match", [
    (dict(parked_copies=-1), "parked_copies must be an integer >= 0"),
    (dict(parked_copies=1.5), "parked_copies must be an integer >= 0"),
    (dict(parked_copies=2, kv_mode="once"), "needs a pruning kv_policy and kv_mode='per-question'"),
    (dict(parked_copies=2, kv_policy=None), "needs a pruning kv_policy"),
])
def test_parked_copies_bad_settings_are_refused_before_loading(bad, match, tmp_path):
    kw = {"kv_policy": pyasl.ASL(budget=BUDGET), **bad}
    with pytest.raises(ValueError, match=match):
        pyasl.Llama(str(tmp_path / "never-read.gguf"), **kw)


def _last_logits(lm) -> np.ndarray:
    ptr = llama_cpp.llama_get_logits_ith(lm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(lm._n_vocab,)).copy()


@pytest.mark.real
def test_per_question_prefills_the_kept_tokens_again(path):
    """kv_mode per-question: the kept tokens (asl: one set) are prefilled again as a prompt of their
    own, at positions ending where the prompt's end, and the prompt's last token is decoded over
    exactly that prefill. reprefill=False gathers the same selection's cells at their positions; a
    selection per KV head (snapkv) is gathered, with a note."""
    kw = dict(n_ctx=256, verbose=False)
    lm = pyasl.Llama(path, kv_policy=pyasl.ASL(budget=BUDGET, window=16), **kw)
    try:
        toks = lm.tokenize(PROMPT.encode())
        lm.eval(toks)
        head, n = toks[:-1], len(toks) - 1
        sel = lm._full_copy.last_selection
        k = len(sel.shared)
        assert lm.last_prune["reprefilled"] and lm.last_prune["n_kept"] == k + 1 == BUDGET
        assert lm.kv_cells() == k + 1
        ctx = prefill_kept(lm._pyasl_model, head, sel.shared, 1, renumber=True, first=n - k, n_batch=lm.n_batch)
        try:
            ctx.decode([toks[-1]], positions=[n])
            again = _last_logits(lm)
            np.testing.assert_array_equal(ctx.logits(), again)
        finally:
            ctx.close()
    finally:
        lm.close()
    gathered = pyasl.Llama(path, kv_policy=pyasl.ASL(budget=BUDGET, window=16), reprefill=False, **kw)
    try:
        gathered.eval(toks)
        assert not gathered.last_prune["reprefilled"] and gathered.kv_cells() == k + 1
        np.testing.assert_array_equal(gathered._full_copy.last_selection.shared, sel.shared)
        assert not np.array_equal(_last_logits(gathered), again)  # the cells as the whole prompt computed them
    finally:
        gathered.close()
    snap = pyasl.Llama(path, kv_policy=pyasl.SnapKV(budget=BUDGET, window=16), **kw)
    try:
        snap.eval(toks)
        assert not snap.last_prune["reprefilled"] and "keeps a set per KV head" in snap.last_prune["note"]
    finally:
        snap.close()
    with pytest.raises(ValueError, match="reprefill must be True, False or 'choose'"):
        pyasl.Llama(path, kv_policy="asl", reprefill="yes", **kw)
    with pytest.raises(ValueError, match="kv_mode once keeps none"):
        pyasl.Llama(path, kv_policy="asl", reprefill="choose", kv_mode="once", **kw)


@pytest.mark.real
def test_choose_answers_both_ways_and_keeps_one(path):
    """reprefill="choose": a completion decodes a greedy answer over the kept tokens prefilled again
    and over their gathered cells (what reprefill=True and False answer), keeps one by the Session's
    rule, and answers over that decode context (greedy: the kept answer's text; both end at the
    request's stop string). At 64 cells the prefilled tokens answer a number and the gathered cells
    the password, which both judges prefer.
    A bare eval has no completion's limits to answer within: it prefills again and chooses nothing."""
    kw = dict(n_ctx=256, verbose=False)
    policy = pyasl.ASL(budget=64, window=16)
    answers = {}
    for way in (True, False):
        lm = pyasl.Llama(path, kv_policy=policy, reprefill=way, **kw)
        try:
            answers[way] = _text(lm.create_completion(PROMPT, max_tokens=24, temperature=0, stop=["\n"]))
        finally:
            lm.close()
    assert "BLUE-HERON-42" not in answers[True] and "BLUE-HERON-42" in answers[False]
    lm = pyasl.Llama(path, kv_policy=policy, reprefill="choose", **kw)
    try:
        text = _text(lm.create_completion(PROMPT, max_tokens=24, temperature=0, stop=["\n"]))
        lp = lm.last_prune
        cands = {c["how"]: c for c in lp["candidates"]}
        assert cands["prefilled"]["text"] == answers[True] and cands["gathered"]["text"] == answers[False]
        assert cands["gathered"]["judged"] > cands["prefilled"]["judged"]
        assert lp["answer_from"] == "gathered" and cands["gathered"]["kept"] and not lp["reprefilled"]
        assert text == answers[False] and lp["choose_s"] > 0 and lm.kv_cells() <= 64 + 24
        again = _text(lm.create_completion(PROMPT, max_tokens=24, temperature=0, stop=["\n"]))  # the copy reused
        assert again == text and lm.last_prune["reused_tokens"] > 0
        lm.reset()
        lm.eval(lm.tokenize(PROMPT.encode()))
        assert lm.last_prune["reprefilled"] and "answer_from" not in lm.last_prune
    finally:
        lm.close()
