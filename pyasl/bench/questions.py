"""Several questions about one document, asked one after another (issue 21's benchmark).

The accuracy suite puts the question inside the prompt, so a policy sees it before pruning. A chat
or a server sees the document first and the questions later. Here one context (a JSON object of
random UUID pairs, kv_retrieval's haystack, where every pair can be asked) is asked ``questions``
keys in turn, at depths spread over the document, in these modes:

* ``full``: a Session with full KV (the reference);
* ``once``: a Session that prunes the document once, before any question (``mode="once"``);
* ``reconstruct``: a Session that prunes the document once, ranked by a request to repeat it, and
  prefills the kept tokens again on their own (``mode="reconstruct"``: query-agnostic, holds only
  the decode context, like ``once``; a default span is widened to around:8+32, and the row's span
  is the one it selected with);
* ``reconstruct-in-place``: the same selection, its cells kept as the whole document computed them
  (``reprefill=False``; the rows of mode ``reconstruct`` before 2026-12-04);
* ``per-question``: a Session that keeps the full KV beside the decode context and selects again
  for every question, the kept tokens prefilled again on their own (``reprefill=True``; the
  default until 2026-12-07);
* ``per-question-in-place``: the same selection, its cells gathered as the whole conversation
  computed them (``reprefill=False``; the rows of mode ``per-question`` before 2026-12-06, read as
  this mode: they have no ``reprefill`` field);
* ``per-question-choose``: the answer decoded both ways, the kept tokens prefilled again and the
  cells gathered, and the prefilled one kept unless the full copy and the gathered context's own
  confidence both prefer the gathered one (``reprefill="choose"``; the row's
  ``answer_from`` says which, ``candidates`` holds both answers with the full copy's and their own
  mean log-probabilities, and ``kept`` from 2026-12-07 04:00; the kv and 8K needles rows of
  2026-12-07 run before 02:00 have no candidates; ``choose_rule``: how the answer was kept, rows
  without it kept the answer the full copy alone found likelier and read as mode
  ``per-question-judge``; the Session's default since 2026-12-07);
* ``one-shot``: each question inside the prompt, pruned by the same policy (``generate``): what
  the accuracy suite measures, the target of ``per-question``;
* ``drop-in``, ``drop-in-choose``: each question inside the prompt (one-shot's tokens), sent in turn
  to one ``pyasl.Llama`` (kv_mode per-question, as a server answers one document's questions:
  the first request prefills the document into the full copy, later ones reuse that prefix), with
  ``reprefill=True`` (the drop-in's default) or ``"choose"``; greedy, streamed, the decode context
  budget + max_tokens + 128 cells. ``seconds`` is the whole request (the first one's includes the
  document's prefill), ``first_token_s`` the time to its first streamed token;
* ``one-shot-ordinary``: the same with the ordinary prefill strategy, the one a per-question
  selection runs (every layer computed over the whole prompt, the kept cells cut out of it; a
  layer-major asl computes the layers after its selection layer over the kept tokens only).

Session modes ask in the session's layout (``layout``): since 2026-12-06 ``open``, the document in a
user message the first question completes (so the first question's tokens are one-shot's); rows
before it have no layout field and read as ``system``, the document in a system message and each
question a later user turn. One-shot rows read as ``prompt``.

One row per (context, mode, question): the answer, its score (the value is a substring of it),
seconds for the question (prefill excluded; in ``one-shot``: the whole prompt), seconds for the
document's prefill (``prefill_s``, the same on every row of a context and mode; in ``one-shot``:
none, each question prefills the whole prompt) and the KV held.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

from ..session.answer import CHOOSE, RULE as CHOOSE_RULE
from .data import _CITIES, WORDS, _number, _prose, _uuid
from .runner import row_tau

MODES = ("full", "once", "reconstruct", "reconstruct-in-place", "per-question", "per-question-in-place",
         "per-question-choose", "one-shot", "one-shot-ordinary", "drop-in", "drop-in-choose")
READ_MODES = MODES + ("per-question-judge",)  # modes of rows no longer run (see row_mode: earlier choosing rules)
CONTEXTS = ("kv", "needles")
SESSION_LAYOUT = "open"  # how a Session lays out document and questions now (see the module doc)
# the Session each mode but one-shot runs: (Session mode, reprefill)
_SESSIONS = {"full": ("once", False), "once": ("once", False), "reconstruct": ("reconstruct", True),
             "reconstruct-in-place": ("reconstruct", False), "per-question": ("per-question", True),
             "per-question-in-place": ("per-question", False), "per-question-choose": ("per-question", CHOOSE)}
_DROP_IN = {"drop-in": True, "drop-in-choose": CHOOSE}  # the pyasl.Llama each drop-in mode runs: its reprefill
INTRO = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{"


def build_context(model, n_tokens: int, index: int, questions: int = 4, seed: int = 0, kind: str = "kv"):
    """(document, [(question, value, depth)]): a document of about `n_tokens` tokens and `questions`
    questions about it, at depths (q + 0.5) / questions. Deterministic.

    ``kv``: a JSON object of random UUID pairs (kv_retrieval's haystack): every pair can be asked, so
    a cache that keeps a quarter of it holds about a quarter of the answers whatever ranks it.
    ``needles``: prose notes with one secret code per question planted in them (the needle grid,
    asked at several depths): little of the document matters, and a question-agnostic ranking can
    find it."""
    if kind == "kv":
        return _kv_context(model, n_tokens, index, questions, seed)
    if kind == "needles":
        return _needle_context(model, n_tokens, index, questions, seed)
    raise ValueError(f"unknown context {kind!r}; choose from {', '.join(CONTEXTS)}")


def _depths(questions: int) -> list[float]:
    return [(q + 0.5) / questions for q in range(questions)]


def _kv_context(model, n_tokens: int, index: int, questions: int, seed: int):
    rng = random.Random(f"questions/{n_tokens}/{seed}/{index}")
    pairs: list[tuple[str, str]] = []
    text = INTRO + "}"
    while (short := n_tokens - len(model.tokenize(text, add_special=False))) > 0:
        pairs += [(_uuid(rng), _uuid(rng)) for _ in range(max(1, short // 60))]
        text = INTRO + ", ".join(f'"{k}": "{v}"' for k, v in pairs) + "}"
    asked = []
    for d in _depths(questions):
        k, v = pairs[min(len(pairs) - 1, int(d * len(pairs)))]
        asked.append((question_text(k), v, d))
    return text, asked


def _needle_context(model, n_tokens: int, index: int, questions: int, seed: int):
    if questions > len(_CITIES):
        raise ValueError(f"the needles context holds at most {len(_CITIES)} questions")
    rng = random.Random(f"questions/needles/{n_tokens}/{seed}/{index}")
    cities = rng.sample(_CITIES, questions)
    codes = [f"{rng.choice(WORDS)}-{_number(rng, 3)}" for _ in cities]
    intro = "Read the following notes carefully. Questions about them follow.\n\n"
    notes: list[str] = []
    while (short := n_tokens - len(model.tokenize(intro + " ".join(notes), add_special=False))) > 0:
        notes += [_prose(rng) for _ in range(max(1, short // 14))]
    depths = _depths(questions)
    for city, code, d in reversed(list(zip(cities, codes, depths))):
        notes.insert(int(d * len(notes)), f"The secret code of the {city} project is {code}.")
    asked = [(f"What is the secret code of the {city} project, according to the notes?", code, d)
             for city, code, d in zip(cities, codes, depths)]
    return intro + " ".join(notes), asked


def question_text(key: str) -> str:
    return f'Key: "{key}"\nThe value associated with the specified key is:'


def row_layout(r: dict) -> str:
    """The prompt layout a row was asked in (rows before the field: a Session's old ``system``)."""
    return r.get("layout") or ("prompt" if r["mode"].startswith("one-shot") else "system")


def row_mode(r: dict) -> str:
    """The mode a row was asked in (per-question rows before the ``reprefill`` field: in place;
    choosing rows by their ``choose_rule``, ``judge`` before the field: another rule than today's
    reads as ``per-question-<rule>``)."""
    if r["mode"] == "per-question" and "reprefill" not in r:
        return "per-question-in-place"
    rule = r.get("choose_rule", "judge")
    if r["mode"] == "per-question-choose" and rule != CHOOSE_RULE:
        return f"per-question-{rule}"
    return r["mode"]


def _key(r: dict) -> tuple:
    return (r["model"], r.get("context", "kv"), r["n_tokens"], r["index"], row_mode(r), r["policy"], r["budget"],
            r["span"], row_tau(r), row_layout(r), r["question"])


def run(model_name: str, n_tokens: int, samples: int, policy, out, modes=MODES, questions: int = 4,
        max_tokens: int = 96, seed: int = 0, n_threads: Optional[int] = None,
        log: Callable[[str], None] = print, kind: str = "kv") -> int:
    """Run (resuming) and append rows to `out`; returns the number of new rows."""
    from ..engine import Model
    from ..generation import generate
    from ..models import resolve_model
    from ..policies import Full
    from ..session import Session
    from ..session.reconstruct import ranking_policy

    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    if kind not in CONTEXTS:
        raise ValueError(f"unknown context {kind!r}; choose from {', '.join(CONTEXTS)}")
    out = Path(out)
    done = set()
    if out.exists():
        with out.open(encoding="utf-8") as f:
            done = {_key(json.loads(line)) for line in f if line.strip()}
    model = model_name if isinstance(model_name, Model) else Model(resolve_model(model_name))
    name = model_name if isinstance(model_name, str) else model.path.stem
    need = n_tokens + _room(questions, max_tokens)
    if need > model.n_ctx_train:
        raise ValueError(f"{questions} questions of up to {max_tokens} tokens after a document of {n_tokens} tokens "
                         f"need about {need} positions, more than the model's training context ({model.n_ctx_train}): "
                         "ask fewer questions, or lower --max-tokens or --length")
    n_new = 0
    with out.open("a", encoding="utf-8") as f:
        for index in range(samples):
            doc, asked = build_context(model, n_tokens, index, questions, seed, kind)
            for mode in modes:
                pol = Full() if mode == "full" else policy
                ranked = ranking_policy(pol) if mode.startswith("reconstruct") else pol  # the span it selects with
                reprefill = _DROP_IN[mode] if mode in _DROP_IN else _SESSIONS.get(mode, (None, False))[1]
                base = {"model": name, "context": kind, "n_tokens": n_tokens, "index": index, "mode": mode, "policy": pol.name,
                        "budget": getattr(pol, "budget", None) if pol.prunes else None,
                        "span": str(ranked.span) if pol.prunes else None,
                        "tau": pol.settings_for(model, n_tokens).tau if hasattr(pol, "settings_for") else None,
                        "layout": "prompt" if mode.startswith("one-shot") or mode in _DROP_IN else SESSION_LAYOUT,
                        "reprefill": reprefill,
                        **({"choose_rule": CHOOSE_RULE} if reprefill == CHOOSE else {})}
                if all(_key({**base, "question": q}) in done for q in range(len(asked))):
                    continue
                rows = _ask_all(model, doc, asked, pol, mode, max_tokens, n_threads, Session, generate)
                for q, row in enumerate(rows):
                    row = {**base, "question": q, **row}
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                    n_new += 1
                log(f"[{name} {kind} {n_tokens} #{index} {mode}] " +
                    " ".join(f"q{q}={r['score']:.0f}" for q, r in enumerate(rows)))
    return n_new


def _ask_all(model, doc, asked, policy, mode, max_tokens, n_threads, Session, generate) -> list[dict]:
    rows = []
    if mode in _DROP_IN:
        return _ask_drop_in(model, doc, asked, policy, _DROP_IN[mode], max_tokens, n_threads)
    if mode.startswith("one-shot"):
        if mode == "one-shot-ordinary":
            if getattr(policy, "prefill_mode", None) is None:
                raise ValueError(f"mode one-shot-ordinary needs a policy with a layer-major prefill, not {policy.name}")
            policy = policy.replace(prefill="ordinary")
        for question, value, depth in asked:
            toks = model.prompt_tokens(doc + "\n\n" + question)
            t0 = time.perf_counter()
            res = generate(model, toks, policy=policy, max_tokens=max_tokens, n_threads=n_threads)
            rows.append(_row(res.text, value, depth, time.perf_counter() - t0, res.kv_bytes / 2**20, None, None))
        return rows
    n_doc = len(model.tokenize(doc, add_special=False))
    n_ctx = n_doc + _room(len(asked), max_tokens) if mode == "full" else policy.budget + max_tokens + 128
    s = Session(model, policy=policy, n_ctx=n_ctx, max_tokens=max_tokens, n_threads=n_threads,
                mode=_SESSIONS[mode][0], reprefill=_SESSIONS[mode][1])
    try:
        t0 = time.perf_counter()
        s.prefill(documents=[doc])
        prefill_s = time.perf_counter() - t0
        for question, value, depth in asked:
            t0 = time.perf_counter()
            text = s.ask(question)
            st = s.stats()
            rows.append(_row(text, value, depth, time.perf_counter() - t0, st["kv_mib"], st["full_copy_mib"],
                             prefill_s))
            _add_candidates(rows[-1], st["last_candidates"])
    finally:
        s.close()
    return rows


def _ask_drop_in(model, doc, asked, policy, reprefill, max_tokens, n_threads) -> list[dict]:
    """Each question inside the prompt, sent in turn to one pyasl.Llama, as a server's requests."""
    if not policy.prunes:
        raise ValueError(f"the drop-in modes need a pruning policy, not {policy.name}")
    from ..apps.llama import Llama
    from ..engine.context import default_threads

    threads = default_threads(n_threads)
    llm = Llama(str(model.path), n_ctx=policy.budget + max_tokens + 128, n_threads=threads, n_threads_batch=threads,
                kv_policy=policy, reprefill=reprefill, verbose=False)
    rows = []
    try:
        for question, value, depth in asked:
            toks = model.prompt_tokens(doc + "\n\n" + question)
            t0, first, parts, n_prunes = time.perf_counter(), None, [], llm.n_prunes
            for chunk in llm.create_completion(toks, max_tokens=max_tokens, temperature=0.0, stream=True):
                first = time.perf_counter() - t0 if first is None else first
                parts.append(chunk["choices"][0]["text"])
            seconds, pruned = time.perf_counter() - t0, llm.last_prune
            if llm.n_prunes != n_prunes + 1:  # a prompt within the budget: nothing of this mode was measured
                raise ValueError(f"the drop-in did not prune a prompt of {len(toks)} tokens at budget {policy.budget}")
            rows.append({**_row("".join(parts), value, depth, seconds, llm.kv_bytes() / 2**20,
                                pruned["full_copy_mib"], None), "first_token_s": first})
            _add_candidates(rows[-1], pruned.get("candidates"))
    finally:
        llm.close()
    return rows


def _add_candidates(row: dict, candidates: Optional[list]) -> None:
    """reprefill="choose": both answers (``answer.report``), and which decode context was kept."""
    if candidates:
        row["answer_from"] = next(c["how"] for c in candidates if c["kept"])
        row["candidates"] = candidates


def _room(questions: int, max_tokens: int) -> int:
    """Cells a full-KV session needs beyond the document: each question's turn and answer, and slack."""
    return questions * (max_tokens + 48) + 64 + 256


def _row(text: str, value: str, depth: float, seconds: float, kv_mib: float, full_copy_mib, prefill_s) -> dict:
    return {"depth": depth, "reference": value, "output": text, "score": 100.0 * (value in text),
            "seconds": seconds, "prefill_s": prefill_s, "kv_mib": kv_mib, "full_copy_mib": full_copy_mib}


def summary(rows: list[dict]) -> list[dict]:
    """Mean accuracy, seconds per question (median), the document's prefill seconds (median over the
    contexts that recorded it), time to the first token (median; drop-in modes) and KV held, per
    (model, context, n_tokens, mode, policy, budget, span)."""
    groups: dict = {}
    for r in rows:
        k = (r["model"], r.get("context", "kv"), r["n_tokens"], row_mode(r), r["policy"], r["budget"], r["span"],
             row_tau(r), row_layout(r))
        groups.setdefault(k, []).append(r)
    out = []
    for k, rs in sorted(groups.items(), key=lambda kv: (kv[0][:3], READ_MODES.index(kv[0][3]))):
        n = len(rs)
        prefills = {r["index"]: r["prefill_s"] for r in rs if r.get("prefill_s") is not None}  # once per document
        out.append({"model": k[0], "context": k[1], "n_tokens": k[2], "mode": k[3], "policy": k[4], "budget": k[5],
                    "span": k[6], "tau": k[7], "layout": k[8], "questions": n, "contexts": len({r["index"] for r in rs}),
                    "accuracy": sum(r["score"] for r in rs) / n,
                    "seconds_per_question": _median([r["seconds"] for r in rs]),
                    "prefill_s": _median(list(prefills.values())),
                    "first_token_s": _median([r["first_token_s"] for r in rs if r.get("first_token_s") is not None]),
                    "kv_mib": max(r["kv_mib"] for r in rs),
                    "full_copy_mib": max((r["full_copy_mib"] or 0) for r in rs) or None})
    return out


def _median(xs: list[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None
