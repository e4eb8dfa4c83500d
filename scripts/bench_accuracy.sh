#!/usr/bin/env bash
# The committed accuracy benchmark (docs/BENCHMARKS.md, "Accuracy"): resumable, in rounds so that a
# partial run covers every model, length and task. Re-running continues where it stopped.
#   bash scripts/bench_accuracy.sh [ROUNDS...]     (default rounds: 1 2 5 10 20 samples per task)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/bench/accuracy.jsonl}
POLICIES=${POLICIES:-full,snapkv,zigzag,pyramid,fastkv,gemfilter,asl,asl-2pass}
TASKS=niah_single_1,niah_multikey_2,niah_multikey_3,vt,cwe,passkey,number_string,kv_retrieval
B=".venv/bin/pyasl bench run --out $OUT --budgets 512,1024 --policies $POLICIES --spans token"
rounds=("$@")
((${#rounds[@]})) || rounds=(1 2 5 10 20)
for s in "${rounds[@]}"; do
    $B --models qwen2.5-0.5b --lengths 4096 --tasks $TASKS --samples "$s"
    # NIAH grid: one sample per (length, depth)
    $B --models qwen2.5-0.5b --lengths 2048,4096,8192 --tasks niah --samples 1 --depths 0,0.5,1
    $B --models smollm2 --lengths 4096 --tasks $TASKS --samples "$s"
    $B --models qwen2.5-0.5b,smollm2 --lengths 2048,4096,8192 --tasks niah --samples 1
    $B --models qwen2.5-0.5b --lengths 8192 --tasks $TASKS --samples "$s"
done
