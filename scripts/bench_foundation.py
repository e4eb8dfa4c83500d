#!/usr/bin/env python3
"""Foundation benchmark: full vs snapkv vs asl (and the two-pass policies) on a ~4K-token prompt.

    python scripts/bench_foundation.py [--models smollm2,qwen2.5-0.5b] [--budget 512] [--tokens 4096]
                                       [--prompt needle|report] [--tau 0.3] [--fixed-layer 0.4]

Writes docs/bench/foundation.json and prints a Markdown table (pasted into docs/BENCHMARKS.md).
Run on a quiet machine: timings are wall-clock.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pyasl.bench import FIXED_LAYER_POLICIES, fixed_layer  # noqa: E402
from pyasl.engine import Model  # noqa: E402
from pyasl import generate  # noqa: E402
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


TOWNS = ["Aldermoor", "Brightwater", "Cinderford", "Dunmere", "Eastvale", "Fernhollow", "Glenrock",
         "Harrowgate", "Ivybridge"]
PROGRAMMES = ["bus timetable", "festival permits", "harbour repairs", "library hours", "market stalls",
              "park lighting", "recycling rounds", "road resurfacing", "school meals", "water supply"]
REPORT_NEEDLE = ("The board agreed that the emergency generator at the Dunmere pumping station will be replaced "
                 "by the contractor Halvorsen & Pike on 14 March, at a fixed price of 38,400 euros.")
REPORT_QUESTION = ("Which contractor will replace the emergency generator at the Dunmere pumping station, "
                   "on what date, and at what price?")


def build_report_prompt(model: Model, n_tokens: int, depth: float = 0.35, seed: int = 0) -> list[int]:
    """The examples/long_prompt.txt kind of prompt, at most n_tokens long (the most items that fit): numbered
    report items that differ in town, programme and figures, one decision item (the needle) at `depth`, and
    a question about it."""
    rng = random.Random(seed)
    items: list[str] = []

    def render(m: int) -> list[int]:
        k = int(m * depth)
        lines = [f"Item {i + 1}. {t}" for i, t in enumerate(items[:k])] + [f"Item {k}b. {REPORT_NEEDLE}"] + \
            [f"Item {i + 1}. {t}" for i, t in enumerate(items[k:m], start=k)]
        body = "Annual report of the Regional Services Board\n\n" + "\n".join(lines)
        return model.prompt_tokens(body + "\n\nQuestion: " + REPORT_QUESTION)

    while not items or len(render(len(items))) <= n_tokens:
        for _ in range(50):
            items.append(f"In {rng.choice(TOWNS)}, the {rng.choice(PROGRAMMES)} programme completed "
                         f"{rng.randint(3, 40)} work orders this quarter; costs came in {rng.randint(1, 30)}% "
                         f"{rng.choice(['under', 'over'])} the estimate, and the residents' panel asked for a "
                         f"follow-up review in the spring.")
    lo, hi = 1, len(items)          # the most items whose prompt fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(render(mid)) <= n_tokens else (lo, mid - 1)
    return render(lo)


# --prompt choice -> (prompt builder, the string a right answer contains)
PROMPTS = {"needle": (build_prompt, "4817"), "report": (build_report_prompt, "Halvorsen")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,qwen2.5-0.5b")
    ap.add_argument("--policies", default="full,snapkv,asl")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--tau", type=float, default=0.3, help="ASL variance-ratio threshold")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt", default="needle", choices=list(PROMPTS),
                    help="needle: repeated filler sentences + an access code (default); report: numbered report "
                         "items + a contractor decision (the examples/long_prompt.txt kind)")
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--fixed-layer", type=float, default=0.4,
                    help="fastkv's and gemfilter's fixed layer as a fraction of the depth (default 0.4)")
    ap.add_argument("--prefill", default="auto", choices=["auto", "layer-major", "ordinary"],
                    help="prefill mode for asl")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "foundation.json"))
    ap.add_argument("--table", metavar="JSON", help="print the Markdown table of a results file and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())["runs"]))
        return

    build, answer_key = PROMPTS[args.prompt]
    runs = []
    for name in args.models.split(","):
        model = Model(fetch_model(name))
        toks = build(model, args.tokens)
        for pol in args.policies.split(","):
            t0 = time.perf_counter()
            layer = fixed_layer(model.n_layer, args.fixed_layer) if pol in FIXED_LAYER_POLICIES else None
            r = generate(model, toks, policy=pol, budget=args.budget, window=args.window, layer=layer, tau=args.tau,
                         prefill_mode=args.prefill,
                         max_tokens=args.max_tokens, ignore_eos=True, flash_attn=args.flash_attn)
            d = r.to_json()
            d.update(model=name, tau=args.tau, flash_attn=args.flash_attn, n_tokens_target=args.tokens, wall_s=time.perf_counter() - t0, prompt=args.prompt,
                     answer_has_needle=answer_key in r.text)
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

    print()
    print(table(runs))


def table(runs: list[dict]) -> str:
    """Markdown table of benchmark runs (ratios against the same model's full run)."""
    out = ["| model | policy | prompt | kept | selected layer | prefill s (vs full) | prefill_work | TTFT s | "
           "decode tok/s (vs full) | KV MiB held | KV % of full | KV MiB allocated | needle in answer |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    full = {(r["model"], r["n_prompt"]): r for r in runs if r["policy"] == "full"}
    for r in runs:
        f = full.get((r["model"], r["n_prompt"]))
        rel = (lambda a, b: f" ({a / b:.2f}x)") if f else (lambda a, b: "")
        sel = "—" if r["policy"] in ("full", "snapkv") else (
            "not reached" if r["selected_layer"] is None else str(r["selected_layer"]))
        out.append(
            f"| {r['model']} | {r['policy']} | {r['n_prompt']} | {r['n_kept']} | {sel} | "
            f"{r['prefill_s']:.1f}{rel(r['prefill_s'], f['prefill_s']) if f else ''} | "
            f"{r.get('prefill_work', 1.0):.2f} | {r['time_to_first_token_s']:.1f} | "
            f"{r['decode_tokens_per_s']:.1f}{rel(r['decode_tokens_per_s'], f['decode_tokens_per_s']) if f else ''} | "
            f"{r['kv_bytes'] / 2**20:.1f} | {100 * r['kv_bytes'] / r['kv_bytes_full']:.1f} | "
            f"{r['kv_bytes_allocated'] / 2**20:.1f} | {'yes' if r['answer_has_needle'] else 'no'} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
