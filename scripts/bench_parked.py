"""Full copies kept on disk (issue 21), one JSON line per request.

``--what llama``: questions about two documents in turn through pyasl.Llama (per-question, asl),
each request's time with parked_copies=0 (a returning document is prefilled again) and
parked_copies=1 (its full KV loaded back from disk), in one process, the two settings in turn.
``--what session``: one document and three questions through a Session with full_copy memory and
disk in turn: each step's time and the process's resident memory after it (VmRSS: what is held
while the user reads the answer, not the peak).
``--what load``: the same document and first question in a Session with full_copy memory and disk,
saved; then each file is opened by a fresh process (memory, disk, memory, disk) that loads it and
asks the next question: the process's peak RSS (VmHWM: ru_maxrss would carry the parent's peak
across fork and exec) after the model, after the load and after the question.

    python scripts/bench_parked.py --what llama --model qwen2.5-0.5b --length 4096 --out docs/bench/parked.jsonl
    python scripts/bench_parked.py --what session --model qwen2.5-0.5b --length 8192 --out docs/bench/parked.jsonl
    python scripts/bench_parked.py --what load --model qwen2.5-0.5b --length 8192 --out docs/bench/parked.jsonl
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyasl
from pyasl.bench.questions import build_context
from pyasl.models import fetch_model


def _status_mib(key: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: resident now; VmHWM: the peak), MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def _rss_mib() -> float:
    return _status_mib("VmRSS")


def _peak_mib() -> float:
    return _status_mib("VmHWM")


def session_rows(a, docs, out) -> None:
    m = pyasl.load_model(a.model)
    doc, asked = docs[0]
    try:
        for rnd in range(a.rounds):
            for place in ("memory", "disk"):
                s = pyasl.Session(m, policy=pyasl.ASL(budget=a.budget), n_ctx=a.budget + 256, max_tokens=32,
                                  n_threads=a.threads, full_copy=place)
                try:
                    t = time.perf_counter()
                    s.prefill(documents=[doc])
                    rows = [{"step": "documents", "seconds": time.perf_counter() - t, "rss_mib": _rss_mib()}]
                    for q, (question, value, _) in enumerate(asked):
                        t = time.perf_counter()
                        answer = s.ask(question)
                        rows.append({"step": f"question {q}", "seconds": time.perf_counter() - t,
                                     "answered": value in answer, "rss_mib": _rss_mib()})
                    for r in rows:
                        r.update(what="session", model=a.model, length=a.length, round=rnd, full_copy=place,
                                 full_copy_mib=s.stats()["full_copy_mib"])
                    for r in rows:
                        out.write(json.dumps(r) + "\n")
                        print(json.dumps(r), flush=True)
                    out.flush()
                finally:
                    s.close()
    finally:
        m.close()


def load_one(a) -> None:
    """In a fresh process: load the session file a.load_file, ask a.question; one JSON line on stdout."""
    m = pyasl.load_model(a.model)
    base = _peak_mib()
    t = time.perf_counter()
    s = pyasl.Session.load(m, a.load_file, n_threads=a.threads)
    row = {"seconds_load": time.perf_counter() - t, "max_rss_mib_model": base, "max_rss_mib_load": _peak_mib()}
    t = time.perf_counter()
    answer = s.ask(a.question)
    row.update(seconds_question=time.perf_counter() - t, max_rss_mib_question=_peak_mib(),
               answered=a.value in answer, full_copy_on_disk=s.stats()["full_copy_on_disk"])
    s.close()
    m.close()
    print(json.dumps(row), flush=True)


def load_rows(a, docs, out) -> None:
    doc, asked = docs[0]
    files = {}
    with tempfile.TemporaryDirectory(prefix="pyasl-bench-load-") as tmp:
        root = Path(a.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        m = pyasl.load_model(a.model)
        try:
            for place in ("memory", "disk"):
                files[place] = root / f"{place}.pyasl"
                if files[place].exists():  # --keep: saved by an earlier run
                    continue
                with pyasl.Session(m, policy=pyasl.ASL(budget=a.budget), n_ctx=a.budget + 256, max_tokens=32,
                                   n_threads=a.threads, full_copy=place) as s:
                    s.prefill(documents=[doc])
                    s.ask(asked[0][0])
                    s.save(files[place])
        finally:
            m.close()
        question, value, _ = asked[2]
        for rnd in range(a.rounds):
            for place in ("memory", "disk"):
                cmd = [sys.executable, __file__, "--model", a.model, "--threads", str(a.threads), "--out", "-",
                       "--load-file", str(files[place]), "--question", question, "--value", value]
                row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                row.update(what="load", model=a.model, length=a.length, round=rnd, full_copy=place,
                           file_mib=files[place].stat().st_size / 2**20)
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", choices=["llama", "session", "load"], default="llama")
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--length", type=int, default=4096, help="document tokens")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2, help="times each setting runs its four requests")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--keep", help="--what load: keep the saved sessions in this directory and reuse them")
    ap.add_argument("--load-file", help=argparse.SUPPRESS)  # --what load's child process
    ap.add_argument("--question", help=argparse.SUPPRESS)
    ap.add_argument("--value", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.load_file:
        return load_one(a)
    path = str(fetch_model(a.model))
    m = pyasl.load_model(a.model)
    docs = [build_context(m, a.length, index=i, questions=2 if a.what == "llama" else 3, kind="needles")
            for i in (0, 1)]
    m.close()
    if a.what in ("session", "load"):
        with open(a.out, "a") as out:
            (session_rows if a.what == "session" else load_rows)(a, docs, out)
        return
    # A, B, A, B: the second question about each document comes after a question about the other
    turns = [(0, 0), (1, 0), (0, 1), (1, 1)]
    with open(a.out, "a") as out:
        for rnd in range(a.rounds):
            for parked in (0, 1):
                llm = pyasl.Llama(path, n_ctx=a.budget + 128, kv_policy=pyasl.ASL(budget=a.budget), parked_copies=parked,
                                  n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
                try:
                    for step, (d, q) in enumerate(turns):
                        doc, asked = docs[d]
                        question, value, _ = asked[q]
                        t = time.perf_counter()
                        r = llm.create_chat_completion(
                            messages=[{"role": "user", "content": doc + "\n\n" + question}],
                            max_tokens=32, temperature=0)
                        row = {"what": "llama", "model": a.model, "length": a.length, "round": rnd, "parked_copies": parked, "step": step,
                               "document": d, "question": q, "seconds": time.perf_counter() - t,
                               "prompt_tokens": r["usage"]["prompt_tokens"],
                               "reused_tokens": llm.last_prune["reused_tokens"],
                               "parked": llm.last_prune["parked_copies"],
                               "loads": llm._shelf.loads if llm._shelf else 0,
                               "answered": value in r["choices"][0]["message"]["content"],
                               "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
                        out.write(json.dumps(row) + "\n")
                        out.flush()
                        print(json.dumps(row), flush=True)
                finally:
                    llm.close()


if __name__ == "__main__":
    main()
