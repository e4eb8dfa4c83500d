#!/usr/bin/env bash
# The span-selection benchmark (docs/BENCHMARKS.md, "Spans"): the span variants beside token-level
# selection and full KV on the same samples (the samples and seed of scripts/bench_accuracy.sh, whose
# token-level rows were copied in rather than run again), resumable; re-running continues.
#   bash scripts/bench_spans.sh [ROUNDS...]     (default rounds: 5 20 samples per task)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/bench/spans.jsonl}
SPANS=${SPANS:-forward:32}
TASKS=niah_single_1,niah_multikey_2,niah_multikey_3,vt,cwe,passkey,number_string,kv_retrieval
PYASL=${PYASL:-.venv/bin/pyasl}
B="$PYASL bench run --out $OUT --policies full,snapkv,asl,fastkv,gemfilter --spans token,$SPANS"
rounds=("$@")
((${#rounds[@]})) || rounds=(5 20)
for s in "${rounds[@]}"; do
    $B --models qwen2.5-0.5b --lengths 4096 --tasks $TASKS --samples "$s" --budgets 512,1024
    $B --models smollm2 --lengths 4096 --tasks $TASKS --samples "$s" --budgets 512,1024
    $B --models qwen2.5-0.5b --lengths 8192 --tasks $TASKS --samples "$s" --budgets 512,1024
done
# budget sweep: the budget each selection needs to reach full KV's score (token-level rows too)
S=${rounds[-1]}
$PYASL bench run --out "$OUT" --policies full,snapkv,asl --spans "token,$SPANS" --models qwen2.5-0.5b --lengths 4096 \
    --tasks kv_retrieval,niah_multikey_3 --samples "$S" --budgets 256,512,1024,1536,2048
