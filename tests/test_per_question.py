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
from pyasl.engine.full_copy import FullCopy
from pyasl.engine.prefill import prefill, prefill_kept
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


@pytest.mark.parametrize("name", ["snapkv", "asl", "pyramid"])
def test_copy_is_pruned_by_gathering_its_kept_cells(tiny, name, monkeypatch):
    """FullCopy.pruned gathers the selection's cells out of the copy layer by layer (no duplicate of
    the copy's K/V): the same decode context as pruning a duplicate, and the copy untouched;
    per-layer budgets (pyramid) still prune a duplicate."""
    from pyasl.engine import full_copy as fc_mod
    from pyasl.engine.full_copy import FullCopy

    policy = P.make_policy(name, budget=96, window=8)
    fc = FullCopy(tiny, n_batch=128)
    try:
        toks = tiny.tokenize(DOC)
        scores, _ = fc.prefill(toks, 8)
        sel = fc.select(policy, scores, 8)
        before = fc.ctx.logits().copy()
        gathered = fc_mod.gather_selection(fc.ctx, sel, 8, n_batch=128)
        assert (gathered is None) == (name == "pyramid")
        if gathered is not None:
            gathered.close()
        runs = []
        for gather in (True, False):
            if not gather:
                monkeypatch.setattr(fc_mod, "gather_selection", lambda *a, **k: None)
            ctx, cells, lb = fc.pruned(sel, room=8)
            try:
                assert ctx.n_past == len(toks) and (cells == 96 or lb is not None)
                out = []
                for t in (5, 9, 11):
                    ctx.decode([t])
                    out.append(ctx.logits())
                runs.append((ctx.kv_info().used_base, out))
            finally:
                ctx.close()
        assert runs[0][0] == runs[1][0]
        for x, y in zip(runs[0][1], runs[1][1]):
            np.testing.assert_array_equal(x, y)
        assert fc.n == len(toks) and np.array_equal(fc.ctx.logits(), before)
    finally:
        fc.close()


def test_second_prefill_can_free_the_copy_first(tiny):
    """pruned_state(free_copy=True) closes the copy before the kept tokens are prefilled again (mode
    reconstruct: the whole document's K/V and the kept tokens' are never held together) and hands over
    the same state; from_zero: n_tokens is the kept count k (the session's next position)."""
    from pyasl.engine.full_copy import FullCopy

    policy = P.make_policy("asl", budget=96, window=8)
    toks = tiny.tokenize(DOC)
    states = []
    for free in (False, True):
        fc = FullCopy(tiny, n_batch=128)
        try:
            scores, _ = fc.prefill(toks, 8)
            sel = fc.select(policy, scores, 8)
            pp = fc.pruned_state(sel, 0.0, again=True, name="asl", from_zero=True, free_copy=free)
            assert pp.reprefilled and pp.n_tokens == pp.n_kept == len(sel.shared) < len(toks)
            assert (fc._ctx is None) == free
            states.append(bytes(pp.state))
        finally:
            fc.close()
    assert states[0] == states[1]


def test_a_long_copy_scores_a_window_longer_than_its_ubatch(tiny, monkeypatch):
    """A long copy decodes in bounded ubatches (prefill.pass_ubatch); a window longer than one is
    scored a ubatch at a time and summed: the scores and logits of one ubatch of the whole window."""
    import importlib

    from pyasl.engine.full_copy import FullCopy

    pf = importlib.import_module("pyasl.engine.prefill")
    doc, turn = tiny.tokenize(DOC)[:600], tiny.tokenize(" ".join(f"Courier {i}?" for i in range(20)))
    assert len(turn) > 100
    runs = []
    for bound in (None, 1):  # 1: the smallest ubatch a bounded copy takes, 32
        if bound is not None:
            monkeypatch.setattr(pf, "PASS_ATTN_BYTES", bound)
        fc = FullCopy(tiny, n_batch=128)
        try:
            runs.append((fc.prefill(doc, 8), fc.ask(turn, 100), fc.ctx.n_batch, fc.n, list(fc.tokens)))
        finally:
            fc.close()
    (a0, a1, nb_a, n_a, t_a), (b0, b1, nb_b, n_b, t_b) = runs
    assert (nb_a, nb_b) == (128, 32) and n_a == n_b == len(doc) + len(turn) and t_a == t_b
    for x, y in zip(a0 + a1, b0 + b1):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_mode_is_validated_and_full_never_copies(tiny):
    with pytest.raises(ValueError, match="mode must be one of"):
        pyasl.Session(tiny, policy=pyasl.SnapKV(budget=64, window=8), n_ctx=160, mode="sometimes")
    s = pyasl.Session(tiny, policy="full", n_ctx=1024, max_tokens=8)
    assert s.mode == "once"
    s.prefill(documents=[DOC[:800]])
    s.ask("hi")
    assert s.stats()["full_copy_mib"] is None


@pytest.mark.parametrize("mode", ["per-question", "once", "reconstruct"])
def test_save_load_in_every_mode(tiny, mode, tmp_path):
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


def test_full_copy_on_disk_answers_as_in_memory(tiny, tmp_path, monkeypatch):
    """full_copy="disk": between questions the documents' full KV is a file and its context freed;
    every question loads it back, so the answers are those of the copy kept in memory, through a
    save and load too."""
    kw = dict(policy=pyasl.SnapKV(budget=64, window=8), n_ctx=160, max_tokens=8)
    mem, disk = pyasl.Session(tiny, **kw), pyasl.Session(tiny, full_copy="disk", **kw)
    try:
        for s in (mem, disk):
            s.prefill(documents=[DOC])
        for q in ["which parcel", "where to", "who carried 1007"]:
            assert disk.ask(q) == mem.ask(q)
            assert disk._full.parked and disk._full._ctx is None and disk.stats()["full_copy_on_disk"]
            assert disk.stats()["full_copy_mib"] == mem.stats()["full_copy_mib"] > 0
        directory = disk._full._dir
        assert [p.name for p in directory.iterdir()] == ["copy.state"]
        disk.save(tmp_path / "d.pyasl")  # the copy read from its file, not loaded back
        assert disk._full.parked and disk._full._ctx is None
        parked = (directory / "copy.state").read_bytes()
        with monkeypatch.context() as m:  # loading goes straight to the copy's file: no context of the copy
            m.setattr(FullCopy, "_reserve", lambda *a: pytest.fail("the on-disk copy was loaded into a context"))
            t = pyasl.Session.load(tiny, tmp_path / "d.pyasl")
        try:
            assert t.full_copy == "disk" and t._full.parked and t._full._ctx is None
            assert (t._full._dir / "copy.state").read_bytes() == parked  # what llama.cpp itself wrote
            assert t.stats()["full_copy_mib"] == disk.stats()["full_copy_mib"]
            assert t.ask("and then?") == mem.ask("and then?")
        finally:
            t.close()
    finally:
        mem.close()
        disk.close()
    assert not directory.exists()


def test_a_damaged_full_copy_in_a_session_file_is_refused(tiny, tmp_path):
    """The full copy's state is the file's last part: a wrong head there is a clear SessionFileError in
    both places the copy can go (never a session without its documents)."""
    for place in ("memory", "disk"):
        s = pyasl.Session(tiny, policy=pyasl.SnapKV(budget=64, window=8), n_ctx=160, max_tokens=8, full_copy=place)
        try:
            s.prefill(documents=[DOC])
            s.save(tmp_path / "s.pyasl")
            size = s._full.state_size()
        finally:
            s.close()
        raw = bytearray((tmp_path / "s.pyasl").read_bytes())
        raw[len(raw) - size: len(raw) - size + 8] = b"\0" * 8
        (tmp_path / "s.pyasl").write_bytes(bytes(raw))
        with pytest.raises(pyasl.SessionFileError, match="the saved full copy does not load"):
            pyasl.Session.load(tiny, tmp_path / "s.pyasl")


def test_full_copy_place_is_validated(tiny):
    with pytest.raises(ValueError, match="full_copy must be one of memory, disk"):
        pyasl.Session(tiny, policy=pyasl.SnapKV(budget=64, window=8), n_ctx=160, full_copy="cloud")
    with pytest.raises(ValueError, match="mode once keeps none"):
        pyasl.Session(tiny, policy=pyasl.SnapKV(budget=64, window=8), n_ctx=160, mode="once", full_copy="disk")


def test_reconstruction_scores_are_the_max_over_repeated_chunks(tiny):
    """FullCopy.reconstruction_scores: chunk by chunk, the document's scores from a prefill of the
    document, the repeat request and the chunk (the chunk as the window), max over chunks; the copy
    is left as it was."""
    from pyasl.engine.full_copy import FullCopy

    toks = tiny.tokenize(DOC[:1200], add_special=True)
    prompt = tiny.tokenize(" Repeat the text above:", add_special=False)
    chunk = 96
    fc = FullCopy(tiny, n_batch=128)
    try:
        fc.prefill(toks, 1)
        got = fc.reconstruction_scores(prompt, chunk)
        assert fc.n == len(toks) and fc.tokens == toks and fc.ctx.kv_info().used_base == len(toks)
        assert fc.repeat_room(len(prompt)) == 128 - len(prompt)
        with pytest.raises(ValueError, match="must fit one batch"):
            fc.reconstruction_scores(prompt, 129 - len(prompt))
    finally:
        fc.close()
    n = len(toks)
    want = None
    for i in range(0, n, chunk):
        piece = toks[i: i + chunk]
        ctx = Context(tiny, _pad(n + len(prompt) + chunk + 1), n_batch=128, capture=True)
        try:
            pf = prefill(ctx, toks + prompt + piece, window=len(piece))
        finally:
            ctx.close()
        part = pf.scores[:, :, :n]
        want = part if want is None else np.maximum(want, part)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("policy", [P.make_policy("snapkv", budget=96, window=8),
                                    P.make_policy("asl", budget=96, window=8)], ids=["snapkv", "asl"])
def test_reconstruct_mode_prunes_once_by_reconstruction_scores(tiny, policy):
    """Mode reconstruct: the documents are pruned once by the policy's selection from the
    reconstruction scores (the documents' last window kept), nothing beyond the decode context is
    held afterwards, and later turns behave as in mode once."""
    from pyasl.engine.full_copy import FullCopy
    from pyasl.session import reconstruct as R

    s = pyasl.Session(tiny, policy=policy, n_ctx=256, max_tokens=8, raw=True, mode="reconstruct")
    s.prefill(documents=[DOC])
    st = s.stats()
    assert st["mode"] == "reconstruct" and st["full_copy_mib"] is None and s._full is None
    assert st["document_kept"] == s.n_cells() <= policy.budget < st["document_tokens"]
    # the same selection, computed by hand from the same tokens
    text = s._fmt.render(s._struct, False)
    toks = s._fmt.tokens(text, first=True)
    prompt = s._fmt.tokens(s._fmt.render(s._fmt.turn(s._struct, R.REPEAT_REQUEST), True)[len(text):],
                           first=False)
    ranking = R.ranking_policy(policy)  # the default span widened: the words before a kept token come too
    assert str(ranking.span) == R.RANKING_SPAN and str(policy.span) == "forward:32"
    fc = FullCopy(tiny, n_batch=s.n_batch)
    try:
        fc.prefill(toks, 1)
        scores = fc.reconstruction_scores(prompt, fc.repeat_room(len(prompt)))
        sel = fc.select(ranking, scores, policy.window)
        forward = fc.select(policy, scores, policy.window)
    finally:
        fc.close()
    assert kept_sets(s.last_selection) == kept_sets(sel) != kept_sets(forward)
    n_doc, shared = st["document_tokens"], s.last_selection.shared
    if shared is not None:  # one set: the kept tokens were prefilled again, at positions 0..k-1
        k = len(shared)
        assert st["reprefill"] and s.n_past == k and s.n_seen == n_doc and s._base_state.pos_shift == n_doc - k
        np.testing.assert_array_equal(np.sort(s._ctx.cell_positions(0, k)), np.arange(k))
        ctx = prefill_kept(tiny, toks, shared, 1, renumber=True, n_batch=s.n_batch)
        try:  # the held cache is exactly that second prefill
            assert ctx.state_get() == s._ctx.state_get()
        finally:
            ctx.close()
        notes = [n for n in s.stats()["notes"] if "ranked without a question: spans around:8+32" in n]
        assert len(notes) == 1
    else:  # a set per KV head: kept as the document computed them, and said so
        assert s.n_seen == n_doc and s.stats()["renumbers"] == (s.n_past < n_doc)  # near n_ctx_train: renumbered
        notes = [n for n in s.stats()["notes"] if "keeps a set per KV head" in n or "ranked without a question" in n]
        assert len(notes) == 2
    for q in ["Which parcel did courier 17 carry?", "And courier 3?"] * 4:
        assert isinstance(s.ask(q), str) and s.n_cells() <= s.n_ctx
    assert s.stats()["questions_selected"] == 0 and s.stats()["notes"] == notes
    s.reset()
    assert s.n_past + s._pos_shift == n_doc


def test_reconstruct_mode_keeps_a_span_the_caller_chose(tiny):
    """Only the default span is widened for the question-agnostic ranking: a policy given a span
    (forward:32 included) selects with it, and the session adds no note about it."""
    from pyasl.session import reconstruct as R

    chosen = P.make_policy("asl", budget=96, window=8, span="forward:32")
    assert chosen.span_given and R.ranking_policy(chosen) is chosen
    default = P.make_policy("asl", budget=96, window=8)
    assert not default.span_given and not default.replace(budget=128).span_given
    assert P.Policy.from_dict(default.to_dict()).span_given  # written down, the span is a choice
    full = P.Full()
    assert R.ranking_policy(full) is full
    runs = {}
    for pol in (chosen, default):
        s = pyasl.Session(tiny, policy=pol, n_ctx=256, max_tokens=8, raw=True, mode="reconstruct")
        s.prefill(documents=[DOC[:len(DOC) // 2]])
        runs[pol.span_given] = (kept_sets(s.last_selection), s.stats()["notes"], s.stats()["policy"]["span"])
        s.close()
    assert runs[True][0] != runs[False][0] and runs[True][1] == []
    assert runs[True][2] == runs[False][2] == "forward:32"  # the session's policy (re-prunes) is unchanged


def test_reconstruct_mode_save_load_keeps_the_second_prefill(tiny, tmp_path):
    """A session whose kept tokens were prefilled again (positions 0..k-1) saves and loads them with
    the positions given back, and reset restores them."""
    pol = P.make_policy("asl", budget=96, window=8)
    s = pyasl.Session(tiny, policy=pol, n_ctx=256, max_tokens=8, raw=True, mode="reconstruct")
    s.prefill(documents=[DOC[:len(DOC) // 2]])
    n_doc, k = s.stats()["document_tokens"], len(s.last_selection.shared)
    assert (s.n_past, s.n_seen) == (k, n_doc)
    s.ask("Which parcel did courier 17 carry?")
    f = tmp_path / "r.pyasl"
    s.save(f)
    t = pyasl.Session.load(tiny, f)
    assert (t.n_past, t.n_seen) == (s.n_past, s.n_seen) and t.ask("And courier 3?") == s.ask("And courier 3?")
    t.reset()
    assert (t.n_past, t.n_seen) == (k, n_doc)


def test_reconstruct_mode_in_place_keeps_the_documents_cells(tiny, tmp_path):
    """reprefill=False: the selected cells stay as the whole document computed them, at their
    original positions; a saved session keeps the setting."""
    pol = P.make_policy("asl", budget=96, window=8)
    s = pyasl.Session(tiny, policy=pol, n_ctx=256, max_tokens=8, raw=True, mode="reconstruct", reprefill=False)
    s.prefill(documents=[DOC[:len(DOC) // 2]])  # positions far from n_ctx_train: never renumbered
    st = s.stats()
    assert not st["reprefill"] and s.n_past == st["document_tokens"] and s._pos_shift == 0
    kept = s.last_selection.shared
    np.testing.assert_array_equal(np.sort(s._ctx.cell_positions(0, len(kept))), kept)
    s.save(tmp_path / "r.pyasl")
    assert not pyasl.Session.load(tiny, tmp_path / "r.pyasl").reprefill
    with pytest.raises(ValueError, match="reprefill must be True, False, 'choose' or None"):
        pyasl.Session(tiny, policy=pol, n_ctx=256, max_tokens=8, mode="reconstruct", reprefill="no")


def test_reconstruct_mode_without_room_to_repeat_ranks_like_once(tiny):
    """Documents too close to the training context to be repeated after them: mode reconstruct says
    so and ranks them by their own last tokens (the selection of mode once, from the same prefill)."""
    pol = P.make_policy("snapkv", budget=96, window=8)
    s = pyasl.Session(tiny, policy=pol, n_ctx=256, max_tokens=8, raw=True, mode="reconstruct")
    doc = DOC
    while len(s._fmt.tokens(s._fmt.render(s._fmt.preamble(None, [(None, doc)]), False), first=True)) < 2020:
        doc += " More."
    s.prefill(documents=[doc])
    assert "no room to repeat them" in s.stats()["notes"][0]
    toks = s._fmt.tokens(s._fmt.render(s._struct, False), first=True)
    assert 2020 <= len(toks) < tiny.n_ctx_train
    assert kept_sets(s.last_selection) == kept_sets(one_shot(tiny, toks, pol, pol.window))


def test_questions_benchmark_rows_and_resume(tiny, tmp_path):
    """`pyasl bench questions`: one row per (document, mode, question), resumable, summarised per mode."""
    from pyasl.bench import questions as Q

    doc, asked = Q.build_context(tiny, 600, index=0, questions=3)
    assert (doc, asked) == Q.build_context(tiny, 600, index=0, questions=3)
    assert len(tiny.tokenize(doc, add_special=False)) >= 600 and [round(d, 2) for _, _, d in asked] == [0.17, 0.5, 0.83]
    assert all(f'"{q.split(chr(34))[1]}": "{v}"' in doc for q, v, _ in asked)
    notes, planted = Q.build_context(tiny, 600, index=0, questions=3, kind="needles")
    assert len(tiny.tokenize(notes, add_special=False)) >= 600 and all(f"is {v}." in notes for _, v, _ in planted)
    assert [notes.index(v) for _, v, _ in planted] == sorted(notes.index(v) for _, v, _ in planted)
    out = tmp_path / "q.jsonl"
    pol = P.make_policy("snapkv", budget=128, window=8)
    n_rows = 3 * len(Q.MODES)
    assert Q.run(tiny, 600, 1, pol, out, questions=3, max_tokens=4, log=lambda s: None) == n_rows
    assert Q.run(tiny, 600, 1, pol, out, questions=3, max_tokens=4, log=lambda s: None) == 0
    assert Q.run(tiny, 600, 1, pol, out, questions=3, max_tokens=4, log=lambda s: None, kind="needles",
                 modes=["reconstruct"]) == 3
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    groups = {g["mode"]: g for g in Q.summary(rows)}
    assert list(groups) == list(Q.MODES) and all(g["questions"] == 3 for g in groups.values())
    assert groups["per-question"]["full_copy_mib"] > groups["per-question"]["kv_mib"]
    assert groups["once"]["full_copy_mib"] is None and groups["full"]["policy"] == "full"
    assert groups["reconstruct"]["full_copy_mib"] is None
    assert groups["one-shot"]["prefill_s"] is None  # each question prefills its whole prompt
    assert {r["layout"] for r in rows if r["mode"].startswith(("one-shot", "drop-in"))} == {"prompt"}
    drop_in = [r for r in rows if r["mode"] == "drop-in"]  # one pyasl.Llama, a request per question
    assert all(r["prefill_s"] is None and 0 < r["first_token_s"] <= r["seconds"] for r in drop_in)
    assert all(r["full_copy_mib"] > r["kv_mib"] > 0 and r["reprefill"] is True for r in drop_in)
    assert groups["drop-in"]["first_token_s"] > 0 and groups["one-shot"]["first_token_s"] is None
    kv_groups = {g["mode"]: g for g in Q.summary(rows[:n_rows])}
    for mode in {m for m in Q.MODES if not m.startswith(("one-shot", "drop-in"))}:
        prefills = {r["prefill_s"] for r in rows[:n_rows] if r["mode"] == mode}
        assert len(prefills) == 1 and kv_groups[mode]["prefill_s"] == prefills.pop() > 0, mode
    old_rows = [{k: v for k, v in r.items() if k != "prefill_s"} for r in rows]  # rows before prefill_s
    assert all(g["prefill_s"] is None for g in Q.summary(old_rows))
    assert {(g["context"], g["mode"]) for g in Q.summary(rows + [json.loads(x) for x in
            out.read_text().splitlines()[n_rows:]])} >= {("kv", "once"), ("needles", "reconstruct")}
    with pytest.raises(ValueError, match="unknown mode"):
        Q.run(tiny, 600, 1, pol, out, modes=["sometimes"])
    with pytest.raises(ValueError, match="more than the model's training context"):  # before any prefill
        Q.run(tiny, 600, 1, pol, tmp_path / "many.jsonl", questions=tiny.n_ctx_train // 100, max_tokens=96)
    assert not (tmp_path / "many.jsonl").exists()
    with pytest.raises(ValueError, match="one-shot-ordinary needs a policy with a layer-major prefill"):
        Q.run(tiny, 600, 1, P.make_policy("gemfilter", budget=128, window=8), tmp_path / "g.jsonl",
              modes=["one-shot-ordinary"])
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps(r) + "\n" for r in old_rows + rows))
    from click.testing import CliRunner

    from pyasl.apps.cli import main
    r = CliRunner().invoke(main, ["bench", "questions-summary", str(old)])
    assert r.exit_code == 0, r.output
    lines = {ln.split()[3]: ln for ln in r.output.splitlines()[1:]}
    assert set(lines) == set(Q.MODES) and "prefill s" in r.output.splitlines()[0]
    assert f"{kv_groups['once']['prefill_s']:.1f}" in lines["once"].split()
    chose = tmp_path / "c.jsonl"  # one set of kept tokens (asl): both answers, and which one was kept
    assert Q.run(tiny, 600, 1, P.make_policy("asl", budget=128, window=8), chose, questions=2, max_tokens=4,
                 log=lambda s: None, modes=["per-question-choose", "drop-in-choose"]) == 4
    rows = [json.loads(x) for x in chose.read_text().splitlines()]
    assert all(r["reprefill"] == "choose" and r["answer_from"] in ("prefilled", "gathered") for r in rows)
    assert [Q.row_mode(r) for r in rows] == ["per-question-choose"] * 2 + ["drop-in-choose"] * 2
    assert all(r["choose_rule"] == "both" for r in rows)
    assert Q.row_mode({k: v for k, v in rows[0].items() if k != "choose_rule"}) == "per-question-judge"
    assert all([c["how"] for c in r["candidates"]] == ["prefilled", "gathered"] for r in rows)
    assert all([c["how"] for c in r["candidates"] if c["kept"]] == [r["answer_from"]] for r in rows)


@pytest.mark.parametrize("system", [None, "Answer in one short sentence."])
def test_first_question_is_asked_in_the_tokens_of_one_prompt(smollm2, system, tmp_path):
    """The documents' user message stays open until the first question, which completes it: the
    session's tokens are then exactly those of one prompt holding document and question (what
    generate and the accuracy suite prune), on a real chat template, also after a save and load
    and after a reset; later questions are turns of their own."""
    s = pyasl.Session(smollm2, policy=P.make_policy("snapkv", budget=96), n_ctx=512, max_tokens=4, system=system)
    s.prefill(documents=[DOC])
    s.save(tmp_path / "s.pyasl")
    q = "Which parcel did courier 17 carry?"
    one_prompt = smollm2.prompt_tokens(DOC + "\n\n" + q, system=system)
    s.ask(q)
    assert s._full.tokens == one_prompt
    s.ask("And courier 3?")
    assert s.messages[0] == {"role": "user", "content": q} and len(s.messages) == 4
    s.reset()
    s.ask(q)
    assert s._full.tokens == one_prompt
    s.close()
    t = pyasl.Session.load(smollm2, tmp_path / "s.pyasl")
    t.ask(q)
    assert t._full.tokens == one_prompt
    t.close()


def test_named_or_several_documents_are_headed(smollm2):
    s = pyasl.Session(smollm2, policy="full", n_ctx=2048, max_tokens=4)
    s.prefill(documents=[("a.txt", "Alpha text."), "Beta text."])
    assert "Document 1 (a.txt):\nAlpha text.\n\nDocument 2:\nBeta text." in s._cached_text
    s.ask("Which documents are there?")
    assert s._cached_text.count("Beta text.") == 1
    s.close()


def test_per_question_prefills_the_kept_tokens_again(tiny):
    """A question's kept tokens (one set: asl) are prefilled again as a prompt of their own, positions
    0..k-1, the answer decoded over exactly that prefill; the session still counts every token seen.
    reprefill=False gathers the same selection's cells at their positions; a selection per KV head
    (snapkv) is gathered, and the session says so once."""
    pol = P.make_policy("asl", budget=96, window=8)
    s = pyasl.Session(tiny, policy=pol, n_ctx=256, max_tokens=8, raw=True, reprefill=True)
    s.prefill(documents=[DOC])
    assert s.stats()["reprefill"] is True and s.n_past == s._full.n  # the documents' own selection waits, gathered
    for q in ["Which parcel did courier 17 carry?", "And courier 3?"]:
        s.ask(q, max_tokens=1)
        sel, toks = s.last_selection, s._full.tokens
        k = len(sel.shared)
        assert s.n_past == k + 1 and s.n_seen == len(toks) + 1 == s._full.n + len(s._full.pending)
        np.testing.assert_array_equal(np.sort(s._ctx.cell_positions(0, k)), np.arange(k))
        ctx = prefill_kept(tiny, toks, sel.shared, 2, renumber=True, n_batch=s.n_batch)
        try:
            if s._full.pending:  # the answer's token was decoded over exactly that prefill
                assert s._full.pending == [int(np.argmax(ctx.logits()))]
                ctx.decode(s._full.pending)
            np.testing.assert_array_equal(ctx.logits(), s._logits)
        finally:
            ctx.close()
    s.close()
    t = pyasl.Session(tiny, policy=pol, n_ctx=256, max_tokens=8, raw=True, reprefill=False)
    t.prefill(documents=[DOC])
    t.ask("Which parcel did courier 17 carry?", max_tokens=1)
    assert not t.stats()["reprefill"] and t.n_seen == t.n_past == t._full.n + 1
    assert set(t._present_positions()[:-1].tolist()) == set(np.asarray(t.last_selection.shared).tolist())
    t.close()
    u = pyasl.Session(tiny, policy=P.make_policy("snapkv", budget=96, window=8), n_ctx=256, max_tokens=8, raw=True)
    u.prefill(documents=[DOC])
    for q in ["Which parcel?", "And then?"]:
        u.ask(q, max_tokens=2)
    assert [n for n in u.stats()["notes"] if "keeps a set per KV head" in n] and len(u.stats()["notes"]) == 1
    u.close()


def test_full_copy_scores_a_continuation_as_decoding_it_would(tiny):
    """log_likelihood: one batched pass gives each token the log-probability that decoding the tokens
    one by one gives it, and leaves the copy as it was (its next logits unchanged)."""
    toks = tiny.tokenize(DOC, add_special=False)
    answer = tiny.tokenize(" the courier number 17 carried parcel 1119", add_special=False)
    full = FullCopy(tiny, n_batch=4)  # a continuation longer than one batch
    try:
        _, logits = full.prefill(toks, 8)
        lp = full.log_likelihood(answer, logits)
        assert full.n == len(toks) and full.ctx.n_past == len(toks) and not full.pending
        ref = Context(tiny, _pad(len(toks) + len(answer) + 1))
        try:
            prefill(ref, toks)
            want = []
            for t in answer:
                z = ref.logits().astype(np.float64)
                want.append(z[t] - z.max() - np.log(np.exp(z - z.max()).sum()))
                ref.decode([t])
        finally:
            ref.close()
        np.testing.assert_allclose(lp, want, atol=2e-3)
        _, again = full.ask(answer[:1], 1)  # the copy goes on from the documents, not from the scored tokens
        z = again.astype(np.float64)
        assert abs(z[answer[1]] - z.max() - np.log(np.exp(z - z.max()).sum()) - want[1]) < 2e-3
        full.truncate(len(toks))
        assert full.n == len(toks)
    finally:
        full.close()


def test_agreed_text_is_what_every_draft_will_keep():
    from pyasl.session.answer import Draft, agreed
    a, b = Draft(None, None, text="The code is 12"), Draft(None, None, text="The code is 19")
    assert agreed([a, b], hold=0) == len("The code is 1")
    assert agreed([a, b], hold=4) == len("The code is 12") - 4  # a stop string may still start
    a.done = b.done = True
    assert agreed([a, b], hold=4) == len("The code is 1")
    assert agreed([Draft(None, None, text="ab")], hold=5) == 0


def test_keep_takes_the_gathered_answer_only_where_the_full_copy_and_its_own_context_prefer_it():
    from pyasl.session.answer import Draft, keep

    class Judge:
        def __init__(self):
            self.calls = 0

        def log_likelihood(self, tokens, logits):
            self.calls += 1
            return np.array([-1.0 if t == 7 else -3.0 for t in tokens])

    def drafts(own_prefilled, own_gathered):
        return (Draft(None, None, "prefilled", tokens=[5, 5, 5], own=own_prefilled),
                Draft(None, None, "gathered", tokens=[7, 7, 5], end=2, own=own_gathered))

    judge = Judge()
    a, b = drafts([-0.5] * 3, [-0.1] * 4)
    assert keep([a, b], judge, None) is b and judge.calls == 2  # the copy: -2.0 (with its end token) against -3.0
    assert (a.judged, b.judged) == (-3.0, -2.0)
    a, b = drafts([-0.01] * 3, [-0.1] * 4)  # the copy prefers the gathered answer, its own context does not
    assert keep([a, b], judge, None) is a
    a, b = drafts([-0.5] * 3, [-0.1] * 4)
    a.tokens, b.tokens = [7, 7, 7], [5, 5, 5]  # its own context prefers the gathered answer, the copy does not
    assert keep([a, b], judge, None) is a
    a, _ = drafts([-0.5] * 3, [])
    same = Draft(None, None, "gathered", tokens=[5, 5, 5], own=[-0.1] * 3)
    calls = judge.calls
    assert keep([a, same], judge, None) is a and judge.calls == calls  # the same answer: no judging


def test_keep_never_prefers_a_loop_to_an_answer():
    from pyasl.session.answer import LOOP_TOKENS, Draft, keep, loops

    class Judge:  # likelihood favours the loop's token, as a small model's does
        def log_likelihood(self, tokens, logits):
            return np.array([-0.1 if t == 9 else -2.0 for t in tokens])

    loop = [1, 2] + [9] * LOOP_TOKENS  # "... why why why": ran out of tokens, no end of turn
    answer = [5, 6, 7]
    gathered_loops = (Draft(None, None, "prefilled", tokens=answer, end=2, own=[-1.0] * 4),
                      Draft(None, None, "gathered", tokens=loop, own=[-0.05] * len(loop)))
    assert loops(gathered_loops[1]) and not loops(gathered_loops[0])
    assert keep(gathered_loops, Judge(), None) is gathered_loops[0]  # both judges prefer the loop: not kept
    prefilled_loops = (Draft(None, None, "prefilled", tokens=[3, 4] * (LOOP_TOKENS // 2), own=[-0.05] * LOOP_TOKENS),
                       Draft(None, None, "gathered", tokens=answer, end=2, own=[-1.0] * 4))
    assert keep(prefilled_loops, Judge(), None) is prefilled_loops[1]
    both = (gathered_loops[1], Draft(None, None, "prefilled", tokens=[8] + [9] * LOOP_TOKENS, own=[-0.5] * 25))
    assert keep(both, Judge(), None) is both[0]  # every draft loops: the two judges decide as before
    zeros = Draft(None, None, "gathered", tokens=[5] + [0] * LOOP_TOKENS, end=2)  # 1000...0 and the turn's end
    short = Draft(None, None, "gathered", tokens=[9] * (LOOP_TOKENS - 1))
    assert not loops(zeros) and not loops(short)


def test_choose_answers_in_both_contexts_and_keeps_one(tiny, tmp_path):
    """reprefill="choose": the answer is the one the kept tokens prefilled again give or the one the
    gathered cells give (the session says which), the other context is closed, and the session goes
    on from the chosen one: the tokens seen and the full copy agree, a copy on disk is parked again."""
    pol = P.make_policy("asl", budget=96, window=8)
    q = "Which parcel did courier 17 carry?"
    answers = {}
    for rp in (True, False):
        with pyasl.Session(tiny, policy=pol, n_ctx=256, max_tokens=8, raw=True, reprefill=rp) as s:
            s.prefill(documents=[DOC])
            answers["prefilled" if rp else "gathered"] = s.ask(q)
    s = pyasl.Session(tiny, policy=pol, n_ctx=256, max_tokens=8, raw=True, reprefill="choose", full_copy="disk")
    s.prefill(documents=[DOC])
    pieces = list(s.stream(q))
    (how, n), = s.stats()["answers_from"].items()
    assert n == 1 and "".join(pieces) == answers[how] == s.messages[-1]["content"]
    cands = s.stats()["last_candidates"]  # both answers, judged where they differ
    assert [c["how"] for c in cands] == ["prefilled", "gathered"] and [c["text"] for c in cands] == list(answers.values())
    assert [c["how"] for c in cands if c["kept"]] == [how]
    assert all(c["own"] <= 0 for c in cands) and (answers["prefilled"] == answers["gathered"]) == (cands[0]["judged"] is None)
    assert s._alt is None and s.stats()["full_copy_on_disk"] and s.stats()["reprefill"] == "choose"
    assert s.n_seen == s._full.n + len(s._full.pending)
    gen = s.stream("And courier 3?")
    s.interrupt()  # before the first token: the prefilled context is kept, nothing judged
    assert "".join(gen) == "" and s.messages[-1].get("interrupted")
    assert [(c["how"], c["text"], c["judged"]) for c in s.stats()["last_candidates"]] == [
        ("prefilled", "", None), ("gathered", "", None)]  # this answer's candidates, not the last question's
    assert [c["kept"] for c in s.stats()["last_candidates"]] == [True, False]
    assert s._alt is None and s.n_seen == s._full.n + len(s._full.pending) and s.n_past == len(s.last_selection.shared)
    s.ask("And courier 5?")
    assert sum(s.stats()["answers_from"].values()) == 3  # the interrupted answer kept the prefilled context
    s.save(tmp_path / "c.pyasl")
    assert pyasl.Session.load(tiny, tmp_path / "c.pyasl").reprefill == "choose"
    s.close()
    with pytest.raises(ValueError, match="keeps none"):
        pyasl.Session(tiny, policy=pol, n_ctx=256, max_tokens=8, mode="reconstruct", reprefill="choose")


def test_a_session_chooses_by_default_in_per_question_mode(tiny):
    """The default reprefill is the mode's: both answers in per-question mode, the second prefill in
    reconstruct; a policy that keeps a set per KV head (snapkv) answers once, gathered."""
    pol = P.make_policy("asl", budget=96, window=8)
    with pyasl.Session(tiny, policy=pol, n_ctx=256, max_tokens=8, raw=True) as s:
        assert s.reprefill == "choose" and s.stats()["reprefill"] == "choose"
        s.prefill(documents=[DOC])
        s.ask("Which parcel did courier 17 carry?")
        assert sum(s.stats()["answers_from"].values()) == 1 and len(s.stats()["last_candidates"]) == 2
    with pyasl.Session(tiny, policy=pol, n_ctx=256, max_tokens=8, raw=True, mode="reconstruct") as s:
        assert s.reprefill is True
    with pyasl.Session(tiny, policy=P.make_policy("snapkv", budget=96, window=8), n_ctx=256, max_tokens=8,
                       raw=True) as s:
        s.prefill(documents=[DOC])
        s.ask("Which parcel?", max_tokens=2)
        assert s.stats()["answers_from"] == {} and s.stats()["last_candidates"] == []
