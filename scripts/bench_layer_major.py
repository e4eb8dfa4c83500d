#!/usr/bin/env python3
"""Layer-major prefill against ordinary prefill at equal work (issue 22): both run every prompt token
through every layer of one long prompt, in one process, in turn (A B C A B C ...), so each ratio
compares neighbouring runs on a shared machine. Configs:

  ordinary               llama_decode ubatch by ubatch through all layers (what stock llama.cpp does)
  ordinary+scores        the same with the observation window's scores captured (snapkv's prefill)
  layer-major            layer 0 over every ubatch, then layer 1, ... (asl/fastkv's pass, window scores
                         and hidden states of every layer, never selecting: work 1.0), in the pass's
                         ubatches (prefill.pass_ubatch: fewer queries per ubatch on long prompts)
  layer-major:full-ubatch  the same in ubatches of n_batch (512), as the pass ran before pass_ubatch
  layer-major+reserve    the same in ubatches of 512, arming each layer's hidden output through
                         llama.cpp's own setter, which rebuilds the scheduler and its compute buffers
                         (the pass before this script's commit did that once per layer)

    python scripts/bench_layer_major.py --model qwen2.5-0.5b --lengths 4096,8192 --repeat 5 \\
        --out docs/bench/layer_major.jsonl

Resumable: (model, length, config, run) rows already in --out are skipped. A row: model, length,
config, run, threads, seconds. `--summary FILE` prints the median ratios of a results file.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = ("ordinary", "ordinary+scores", "layer-major", "layer-major:full-ubatch", "layer-major+reserve")
WINDOW = 32
_UPSTREAM_SETTER = "_Z30llama_set_embeddings_layer_inpP13llama_contextjb"  # llama_set_embeddings_layer_inp


def _rearm_through_llama(ctx, lid) -> None:
    """Context.set_hidden_output through llama.cpp's setter (a sched_reserve per call)."""
    import llama_cpp

    f = getattr(llama_cpp.llama_cpp._lib, _UPSTREAM_SETTER)
    f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_bool], None
    if ctx._hidden_lid is not None and ctx._hidden_lid != lid:
        f(ctx._ctx, ctx._hidden_lid, False)
    if lid is not None:
        f(ctx._ctx, lid, True)
    ctx._hidden_lid = lid


def time_config(model, tokens, config: str, n_threads) -> float:
    from pyasl.engine import Context

    PF = importlib.import_module("pyasl.engine.prefill")  # the module (pyasl.engine.prefill: the function)
    if config.startswith("ordinary"):
        scores = config == "ordinary+scores"
        t0 = time.perf_counter()
        with Context(model, PF._pad(len(tokens) + 1), capture=scores, n_threads=n_threads) as ctx:
            PF.prefill(ctx, tokens, window=WINDOW if scores else 0)
        return time.perf_counter() - t0
    own, cap = Context.set_hidden_output, PF.PASS_ATTN_BYTES
    if config == "layer-major+reserve":
        Context.set_hidden_output = _rearm_through_llama
    if config != "layer-major":
        PF.PASS_ATTN_BYTES = 1 << 62  # every ubatch n_batch queries
    try:
        t0 = time.perf_counter()
        A, *_ = PF.layer_major_pass(model, tokens, WINDOW, lambda l, s: (False, None), n_threads=n_threads)
        A.close()
        return time.perf_counter() - t0
    finally:
        Context.set_hidden_output, PF.PASS_ATTN_BYTES = own, cap


def summary(path: Path) -> str:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    out = []
    for key in sorted({(r["model"], r["length"]) for r in rows}):
        by = {(r["config"], r["run"]): r["seconds"] for r in rows if (r["model"], r["length"]) == key}
        runs = sorted({run for _, run in by})
        out.append(f"{key[0]}, {key[1]} tokens, {len(runs)} runs:")
        for c in CONFIGS:
            pairs = [(by[c, r], by["ordinary", r]) for r in runs if (c, r) in by and ("ordinary", r) in by]
            if pairs:
                ratio = statistics.median(a / b for a, b in pairs)
                out.append(f"  {c:24s} median {statistics.median(a for a, _ in pairs):7.2f} s   "
                           f"x{ratio:.3f} of ordinary (median of per-run ratios)")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--lengths", default="4096")
    ap.add_argument("--configs", default="ordinary,layer-major,layer-major+reserve")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--summary", type=Path, default=None, help="print the median ratios of this file and exit")
    a = ap.parse_args()
    if a.summary:
        print(summary(a.summary))
        return
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad or "ordinary" not in configs:
        raise SystemExit(f"--configs: choose from {', '.join(CONFIGS)}, ordinary included (got {a.configs})")
    if a.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    import pyasl
    from pyasl.bench.data import build_sample
    from pyasl.models import fetch_model

    done = set()
    if a.out and a.out.exists():
        for line in a.out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["model"], r["length"], r["config"], r["run"]))
    model = pyasl.Model(str(fetch_model(a.model)))
    for length in [int(x) for x in a.lengths.split(",")]:
        tokens = build_sample(model, "niah_single_1", length, seed=0, index=0).tokens
        for run in range(a.repeat):
            for c in configs:
                if (a.model, length, c, run) in done:
                    continue
                s = time_config(model, tokens, c, a.threads)
                row = dict(model=a.model, length=length, config=c, run=run, threads=a.threads, seconds=round(s, 3))
                print(json.dumps(row), flush=True)
                if a.out:
                    with a.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    if a.out:
        print(summary(a.out))


if __name__ == "__main__":
    main()
