#!/usr/bin/env python
"""Soak test: a scripted many-turn chat over a document on a real model, crossing the context size
many times (every crossing re-prunes with the newest turn as the observation window).

Per turn it records resident memory (VmRSS), the cells held, the total tokens seen, the re-prune
count and the answer, and checks the invariants: cells never exceed the context, the transcript
holds every turn, positions only grow, every answer is non-empty. Writes JSON (+ a PNG of the
memory curve with matplotlib). Results: docs/RELIABILITY.md, "Soak".

    .venv/bin/python scripts/soak_chat.py --turns 200 --out docs/bench/soak.json --plot docs/soak-rss.png
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "Summarise the report in one sentence.",
    "What is the project code word?",
    "Name one risk the report mentions.",
    "What should happen next, according to the report?",
    "Give me a short title for this report.",
    "Which team is mentioned first?",
    "Is the report positive or negative overall? Answer briefly.",
    "List two numbers that appear in the report.",
]
FACT = "Note for the reader: the project code word is BLUEFIN."


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def coherent(text: str) -> bool:
    """At least three words, and at least half of them distinct (catches repetition loops such as
    "The Project of the Project of the Project ...")."""
    words = [w.lower() for w in re.findall(r"[A-Za-z]{2,}", text)]
    return len(words) >= 3 and len(set(words)) / len(words) >= 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--policy", default="asl")
    ap.add_argument("--turns", type=int, default=200)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--doc", default=str(ROOT / "examples" / "long_prompt.txt"))
    ap.add_argument("--sink", type=int, default=4, help="cells at the start every re-prune keeps")
    ap.add_argument("--keep-recent", type=int, default=0, help="cells before the newest turn every re-prune keeps")
    ap.add_argument("--repeat-penalty", type=float, default=1.0, help="llama.cpp's repetition penalty (1.0: off)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot")
    args = ap.parse_args()

    import pyasl

    model = pyasl.load_model(args.model)
    policy = pyasl.make_policy(args.policy, budget=args.budget)
    s = pyasl.Session(model, policy=policy, n_ctx=args.ctx, max_tokens=args.max_tokens, sink=args.sink,
                      keep_recent=args.keep_recent)
    doc = FACT + "\n\n" + Path(args.doc).read_text(encoding="utf-8")
    t0 = time.perf_counter()
    st = s.prefill(documents=[doc])
    rows = []
    failures = []
    rss0 = rss_mib()
    last_total = s.stats()["total_tokens"]
    for turn in range(1, args.turns + 1):
        q = QUESTIONS[(turn - 1) % len(QUESTIONS)]
        t1 = time.perf_counter()
        ans = s.ask(q, repeat_penalty=args.repeat_penalty)
        dt = time.perf_counter() - t1
        stt = s.stats()
        row = {"turn": turn, "rss_mib": rss_mib(), "kept": stt["kept_tokens"], "total": stt["total_tokens"],
               "reprunes": stt["reprunes"], "next_position": stt["next_position"], "seconds": dt, "question": q, "answer": ans,
               "coherent": coherent(ans), "fact": "bluefin" in ans.lower() if "code word" in q else None}
        rows.append(row)
        if stt["kept_tokens"] > args.ctx:
            failures.append(f"turn {turn}: {stt['kept_tokens']} cells > ctx {args.ctx}")
        if stt["total_tokens"] <= last_total:
            failures.append(f"turn {turn}: total tokens did not grow")
        if len(s.messages) != 2 * turn:
            failures.append(f"turn {turn}: transcript has {len(s.messages)} messages, expected {2 * turn}")
        if not ans.strip():
            failures.append(f"turn {turn}: empty answer")
        last_total = stt["total_tokens"]
        if turn % 10 == 0:
            print(f"turn {turn}: rss {row['rss_mib']:.1f} MiB, kept {row['kept']}, total {row['total']}, "
                  f"reprunes {row['reprunes']}, {dt:.1f}s: {ans[:60]!r}", flush=True)
    rss = [r["rss_mib"] for r in rows]
    facts = [r["fact"] for r in rows if r["fact"] is not None]
    result = {
        "meta": {"command": " ".join(sys.argv), "machine": f"{platform.machine()}", "model": args.model,
                 "policy": policy.to_dict(), "ctx": args.ctx, "repeat_penalty": args.repeat_penalty,
                 "sink": s.sink, "keep_recent": s.keep_recent, "turns": args.turns, "date": time.strftime("%Y-%m-%d"),
                 "document_tokens": st.get("document_tokens"), "document_kept": st.get("kept_tokens")},
        "summary": {"rss_after_prefill_mib": rss0, "rss_first_turn_mib": rss[0], "rss_max_mib": max(rss),
                    "rss_last_mib": rss[-1], "rss_growth_last_100_turns_mib": rss[-1] - rss[max(0, len(rss) - 101)],
                    "reprunes": rows[-1]["reprunes"], "total_tokens": rows[-1]["total"],
                    "renumbers": s.stats()["renumbers"], "max_position": max(r["next_position"] for r in rows) - 1,
                    "coherent_turns_101_200": sum(r["coherent"] for r in rows[100:]),
                    "coherent_share": sum(r["coherent"] for r in rows) / len(rows),
                    "fact_recalled": f"{sum(facts)}/{len(facts)}", "failures": failures,
                    "wall_s": time.perf_counter() - t0},
        "turns": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.plot([r["turn"] for r in rows], rss, label="resident memory (MiB)")
        rp = [r["turn"] for i, r in enumerate(rows) if i and r["reprunes"] > rows[i - 1]["reprunes"]]
        for t in rp:
            ax.axvline(t, color="tab:red", lw=0.4, alpha=0.5)
        ax.set_xlabel("turn (red: the context filled and the policy pruned again)")
        ax.set_ylabel("VmRSS MiB")
        ax.set_title(f"soak: {args.model}, {args.policy} budget {args.budget}, ctx {args.ctx}, {args.turns} turns")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
