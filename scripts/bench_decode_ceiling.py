#!/usr/bin/env python3
"""Decode speed of plain full-KV decode at short contexts: the ceiling for any pruned decode.

    python scripts/bench_decode_ceiling.py [--model qwen2.5-0.5b] [--lengths 1024,2048,4096]

A pruned cache of B cells cannot decode faster than llama.cpp decodes an ordinary B-token prompt,
because every token still reads all the weights. Writes docs/bench/decode-ceiling.json.
Run on a quiet machine: timings are wall-clock.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_foundation import build_report_prompt  # noqa: E402
from pyasl.engine import Model  # noqa: E402
from pyasl import generate  # noqa: E402
from pyasl.models import fetch_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "decode-ceiling.json"))
    args = ap.parse_args()
    model = Model(fetch_model(args.model))
    runs = []
    for n in map(int, args.lengths.split(",")):
        toks = build_report_prompt(model, n)
        r = generate(model, toks, policy="full", max_tokens=args.max_tokens, ignore_eos=True)
        runs.append({"model": args.model, "n_prompt": len(toks), "decode_tokens_per_s": r.decode_tokens_per_s,
                     "prefill_s": r.prefill_s, "n_generated": len(r.tokens)})
        print(f"{args.model} full decode at {len(toks):6d} cells: {r.decode_tokens_per_s:5.1f} tok/s", flush=True)
    model.close()
    meta = {"command": "python scripts/bench_decode_ceiling.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
            "args": vars(args)}
    Path(args.out).write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
