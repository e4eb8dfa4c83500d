"""Per-question selection's prune step (issues 21, 23): the decode context made from the full copy
of a document, by gathering the kept cells out of the copy (FullCopy.pruned now) or by pruning a
duplicate of the copy (before). One process: the copy is prefilled once, then the two ways run in
turn (A B A B ...); per run the seconds and the rise of the process's peak RSS over its RSS before
the run (the peak is reset through /proc/self/clear_refs, Linux). Rows: one JSON line per run.

    python scripts/bench_copy_prune.py --model qwen2.5-0.5b --length 8192 --repeat 3 --out docs/bench/copy_prune.jsonl
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyasl
from pyasl import policies as P
from pyasl.bench.data import build_sample
from pyasl.engine import full_copy
from pyasl.engine.full_copy import FullCopy


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    m = pyasl.load_model(a.model)
    toks = build_sample(m, "niah_single_1", a.length).tokens
    fc = FullCopy(m, n_threads=a.threads)
    t0 = time.perf_counter()
    scores, _ = fc.prefill(toks, 32)
    print(f"copy of {len(toks)} tokens prefilled in {time.perf_counter() - t0:.1f} s", flush=True)
    gather = full_copy.gather_selection
    with open(a.out, "a", encoding="utf-8") as f:
        for policy in (P.SnapKV(budget=a.budget), P.ASL(budget=a.budget, tau=0.9)):
            sel = fc.select(policy, scores, 32)
            for run in range(a.repeat):
                for way in ("gather", "duplicate"):
                    full_copy.gather_selection = gather if way == "gather" else (lambda *x, **k: None)
                    base = _rss_kib("VmRSS")
                    _reset_peak()
                    t = time.perf_counter()
                    ctx, cells, _ = fc.pruned(sel, room=128)
                    secs = time.perf_counter() - t
                    rise = (_rss_kib("VmHWM") - base) / 1024
                    ctx.close()
                    row = {"model": a.model, "length": len(toks), "policy": policy.name, "budget": a.budget,
                           "way": way, "run": run, "seconds": round(secs, 3), "peak_rise_mib": round(rise, 1),
                           "cells": cells, "copy_kv_mib": round(fc.kv_bytes() / 2 ** 20, 1)}
                    print(json.dumps(row), flush=True)
                    f.write(json.dumps(row) + "\n")
    full_copy.gather_selection = gather
    fc.close()


if __name__ == "__main__":
    main()
