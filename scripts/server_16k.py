# issue 21: pyasl.Llama answers a prompt of ~18K tokens from a decode context of budget + max_tokens cells
# (Qwen2.5, asl 1024 cells, kv_mode per-question); prints one JSON line (docs/bench/server-16k*.json).
# --no-reprefill: the kept cells gathered as the whole prompt computed them (the runs before 2026-12-06);
# --full: full KV in a context of the whole prompt (the reference answer). --context needles: prose notes
# with a planted code (one question) instead of the JSON object of UUID pairs.
import argparse, json, time, resource, pyasl
from pyasl.models import fetch_model
from pyasl.bench.questions import CONTEXTS, build_context
ap = argparse.ArgumentParser()
ap.add_argument("--full", action="store_true")
ap.add_argument("--no-reprefill", dest="reprefill", action="store_false")
ap.add_argument("--context", choices=CONTEXTS, default="kv")
args = ap.parse_args()
path = str(fetch_model("qwen2.5-0.5b"))
m = pyasl.load_model("qwen2.5-0.5b")
doc, asked = build_context(m, 16000, index=0, questions=1, kind=args.context)
m.close()
question, value, _ = asked[0]
if args.full:
    llm = pyasl.Llama(path, n_ctx=20480, verbose=False)
else:
    llm = pyasl.Llama(path, n_ctx=1024 + 128, kv_policy=pyasl.ASL(budget=1024), reprefill=args.reprefill,
                      verbose=False)
t = time.perf_counter()
r = llm.create_chat_completion(messages=[{"role": "user", "content": doc + "\n\n" + question}],
                               max_tokens=96, temperature=0)
answer = r["choices"][0]["message"]["content"]
out = {"context": args.context, "prompt_tokens": r["usage"]["prompt_tokens"], "n_ctx": llm.n_ctx(),
       "kv_cells": llm.kv_cells(), "seconds": time.perf_counter() - t, "answer_has_value": value in answer,
       "reference": value, "answer": answer, "last_prune": llm.last_prune,
       "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
print(json.dumps(out))
