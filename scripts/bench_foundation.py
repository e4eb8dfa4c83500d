#!/usr/bin/env python3
"""Foundation benchmark: full vs snapkv vs asl (and the two-pass policies) on a ~4K-token prompt.

    python scripts/bench_foundation.py [--models smollm2,qwen2.5-0.5b] [--budget 512] [--tokens 4096]

Writes docs/bench/foundation.json and prints a Markdown table (pasted into docs/BENCHMARKS.md).
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

from pyasl.engine import Model, generate  # noqa: E402
from pyasl.models import fetch_model  # noqa: E402

FILLER = [
    "The committee reviewed the quarterly figures for the northern warehouse and found them in order.",
    "A light rain fell over the harbour while the ferries kept to their usual timetable.",
    "Several volunteers repainted the library benches before the spring reading festival.",
    "The orchard on the hill produced more apples this year than in the previous three.",
    "Engineers replaced two pumps at the water plant without interrupting the supply.",
    "The museum extended its opening hours on Thursdays for the new textile exhibition.",
]
NEEDLE = "The access code for the archive room is 4817-QUARTZ."
QUESTION = "What is the access code for the archive room? Answer with the code only."


def build_prompt(model: Model, n_tokens: int, depth: float = 0.35) -> list[int]:
    sentences = []
    i = 0
    while True:
        sentences.append(FILLER[i % len(FILLER)] + f" (entry {i})")
        i += 1
        if i % 20 == 0:
            body = " ".join(sentences)
            if len(model.prompt_tokens(body + " " + NEEDLE + " " + QUESTION)) >= n_tokens:
                break
    k = int(len(sentences) * depth)
    body = " ".join(sentences[:k] + [NEEDLE] + sentences[k:])
    toks = model.prompt_tokens(body + "\n\n" + QUESTION)
    return toks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,qwen2.5-0.5b")
    ap.add_argument("--policies", default="full,snapkv,asl")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--gemfilter-layer", type=float, default=0.4,
                    help="gemfilter's fixed layer as a fraction of the depth (default 0.4)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "foundation.json"))
    args = ap.parse_args()

    runs = []
    for name in args.models.split(","):
        model = Model(fetch_model(name))
        toks = build_prompt(model, args.tokens)
        for pol in args.policies.split(","):
            t0 = time.perf_counter()
            layer = int(round(args.gemfilter_layer * (model.n_layer - 1))) if pol == "gemfilter" else None
            r = generate(model, toks, policy=pol, budget=args.budget, window=args.window, layer=layer,
                         max_tokens=args.max_tokens, ignore_eos=True, flash_attn=args.flash_attn)
            d = r.to_json()
            d.update(model=name, flash_attn=args.flash_attn, wall_s=time.perf_counter() - t0, answer_has_needle="4817" in r.text)
            runs.append(d)
            print(f"{name:14s} {pol:7s} prefill {d['prefill_s']:6.1f}s decode {d['decode_tokens_per_s']:6.1f} tok/s "
                  f"kv {d['kv_bytes'] / 2**20:6.1f}/{d['kv_bytes_full'] / 2**20:6.1f} MiB layer {d['selected_layer']} "
                  f"work {d['prefill_work']:.2f} needle {d['answer_has_needle']}", flush=True)
        model.close()
    meta = {"command": "python scripts/bench_foundation.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "args": vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))

    print("\n| model | policy | prompt | kept | selected layer | prefill s | TTFT s | decode tok/s | KV MiB | KV % of full | needle in answer |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    full = {r["model"]: r for r in runs if r["policy"] == "full"}
    for r in runs:
        f = full.get(r["model"])
        speed = f" ({r['decode_tokens_per_s'] / f['decode_tokens_per_s']:.2f}x)" if f and r is not f else ""
        print(f"| {r['model']} | {r['policy']} | {r['n_prompt']} | {r['n_kept']} | {r['selected_layer']} | "
              f"{r['prefill_s']:.1f} | {r['time_to_first_token_s']:.1f} | {r['decode_tokens_per_s']:.1f}{speed} | "
              f"{r['kv_bytes'] / 2**20:.1f} | {100 * r['kv_bytes'] / r['kv_bytes_full']:.1f} | {r['answer_has_needle']} |")


if __name__ == "__main__":
    main()
