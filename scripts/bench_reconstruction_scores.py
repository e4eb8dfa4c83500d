"""Reconstruction scoring's cost (issue 21's memory-bounded mode): a JSON object of UUID pairs
(`bench questions --context kv`, document 0) prefilled into a full copy, then
FullCopy.reconstruction_scores, timed, with the libllama that PYASL_BUILD_VARIANT selects. To compare
two versions of native/ and patches/, build one as a variant (`python scripts/build.py --variant
NAME`) and alternate the libraries run by run (A B A B), each run a process of its own:

    for r in 1 2; do for v in cpu NAME; do PYASL_BUILD_VARIANT=$v python scripts/bench_reconstruction_scores.py \\
        --length 4096 --out docs/bench/reconstruction_scores.jsonl; done; done

Rows: one JSON line per run (the library, the copy's prefill and the scoring in seconds); --scores
saves the scores (.npy) for checking that two libraries rank alike.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from pyasl.bench.questions import build_context
from pyasl.engine.full_copy import FullCopy
from pyasl.engine.model import load_model
from pyasl.session.reconstruct import REPEAT_REQUEST


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--out", required=True)
    ap.add_argument("--scores", help="save the scores to this .npy file")
    a = ap.parse_args()
    model = load_model(a.model)
    doc, _ = build_context(model, a.length, 0, 4, 0, "kv")
    toks = model.tokenize(doc, add_special=False)
    prompt = model.tokenize(f"\n{REPEAT_REQUEST}\n", add_special=False)
    copy = FullCopy(model, n_batch=512)
    try:
        t = time.perf_counter()
        copy.prefill(toks, 32)
        prefill_s = time.perf_counter() - t
        chunk = copy.repeat_room(len(prompt))
        t = time.perf_counter()
        scores = copy.reconstruction_scores(prompt, chunk)
        scoring_s = time.perf_counter() - t
    finally:
        copy.close()
    if a.scores:
        np.save(a.scores, scores)
    row = dict(model=a.model, length=a.length, n_tokens=len(toks), chunk=chunk,
               lib=os.environ.get("PYASL_BUILD_VARIANT", "cpu"), prefill_s=round(prefill_s, 2),
               scoring_s=round(scoring_s, 2), scoring_over_prefill=round(scoring_s / prefill_s, 3))
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
