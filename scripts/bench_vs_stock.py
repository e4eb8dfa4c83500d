#!/usr/bin/env python3
"""pyasl beside stock llama-cpp-python (the same sdist, unpatched) on one long prompt: peak memory
and time to first token, each run in its own process; the peak is that process's max RSS as the OS
counts it (wait4), next to the KV bytes. --repeat N runs the configs in turn N times (A B A B ...),
so that time ratios come from neighbouring runs. Resumable: rows already in --out are skipped.

    python scripts/build.py --stock          # once: the stock libllama (build/stock)
    python scripts/bench_vs_stock.py --model qwen2.5-0.5b --lengths 8192,16384 \\
        --configs stock,full,asl,fastkv,snapkv --out docs/bench/memory.jsonl

--tasks runs the prompt (sample 0) of each offline task named (default niah_single_1): ASL's
selection layer, and so its prefill time, depends on the prompt.

stock:ubatch=N runs stock with n_ubatch N (the ubatch pyasl's layer-major pass takes on a long
prompt, prefill.pass_ubatch: what stock would save with the same setting). POLICY:prefill=MODE runs
a pyasl policy with prefill_mode MODE (snapkv:prefill=ordinary: SnapKV without layer-by-layer pruning).
--kv-type q8_0 (with --flash-attn, which llama.cpp needs for a quantized V) runs every config, stock
included, with K and V of that type: stock's `-ctk q8_0 -ctv q8_0` beside pyasl's pruning of it.

A row: model, length, task, config, budget, flash_attn, kv_type, max_rss_mib, kv_bytes_full, kv_bytes (held for
decoding), n_kept, selected_layer, ttft_s (prompt in to first token out), text (the greedy answer),
run (0..repeat-1).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

POLICIES = ("full", "asl", "fastkv", "snapkv", "asl-2pass", "gemfilter")
KV_TYPES = ("f16", "q8_0", "q4_0")  # the cache types both stock llama-cpp-python and pyasl take here
TASK = "niah_single_1"  # the default prompt: one needle in a long haystack, the answer shows the run still works


def _pad(n: int) -> int:
    return (n + 255) // 256 * 256


def stock_ubatch(config: str) -> Optional[int]:
    """The n_ubatch of a stock config: "stock" 512 (llama-cpp-python's default), "stock:ubatch=N" N;
    None for a pyasl config."""
    if config == "stock":
        return 512
    if config.startswith("stock:ubatch="):
        try:
            u = int(config.split("=", 1)[1])
        except ValueError:
            u = 0
        if not 1 <= u <= 512:
            raise SystemExit(f"{config}: the ubatch must be an integer in 1..512")
        return u
    return None


def child_stock(a) -> dict:
    """Stock llama-cpp-python: Llama.eval of the prompt, then greedy tokens (LLAMA_CPP_LIB_PATH: the stock build)."""
    import llama_cpp

    tokens = json.loads(Path(a.tokens).read_text())
    kv = getattr(llama_cpp, f"GGML_TYPE_{a.kv_type.upper()}")
    llm = llama_cpp.Llama(a.model_path, n_ctx=_pad(len(tokens) + a.max_tokens), n_batch=512,
                          n_ubatch=stock_ubatch(a.child), type_k=kv, type_v=kv,
                          n_threads=a.threads, n_threads_batch=a.threads, flash_attn=a.flash_attn, verbose=False)
    t0 = time.perf_counter()
    llm.eval(tokens)
    out = [int(llm.sample(temp=0.0))]
    ttft = time.perf_counter() - t0
    while len(out) < a.max_tokens and out[-1] != llm.token_eos():
        llm.eval([out[-1]])
        out.append(int(llm.sample(temp=0.0)))
    return {"ttft_s": ttft, "text": llm.detokenize(out).decode("utf-8", "replace"), "n_kept": len(tokens)}


CONFIG_OPTIONS = {"prefill": ("prefill_mode", str), "tau": ("tau", float), "layer": ("layer", int),
                  "propagate": ("propagate", str)}


def pyasl_config(config: str) -> tuple[str, dict]:
    """(policy, generate options) of a pyasl config: "asl", "snapkv:prefill=ordinary" or several options
    joined by "+": "asl:tau=0.97+propagate=4096:kept" (prefill, tau, layer, propagate)."""
    name, _, opts = config.partition(":")
    out = {}
    for opt in filter(None, opts.split("+")):
        key, _, value = opt.partition("=")
        if key not in CONFIG_OPTIONS or not value:
            raise SystemExit(f"{config}: a pyasl config takes {', '.join(k + '=' for k in CONFIG_OPTIONS)} "
                             "options joined by +")
        arg, kind = CONFIG_OPTIONS[key]
        try:
            out[arg] = kind(value)
        except ValueError:
            raise SystemExit(f"{config}: {key}={value} is not a {kind.__name__}") from None
    return name, out


def child_pyasl(a) -> dict:
    import importlib

    import pyasl

    if a.pass_fa_ubatch:  # the layer-major pass's ubatch with flash attention (prefill.PASS_FA_UBATCH)
        importlib.import_module("pyasl.engine.prefill").PASS_FA_UBATCH = a.pass_fa_ubatch

    tokens = json.loads(Path(a.tokens).read_text())
    m = pyasl.Model(a.model_path)
    name, opts = pyasl_config(a.child)
    budget = None if name == "full" else a.budget
    r = pyasl.generate(m, tokens, policy=name, budget=budget, max_tokens=a.max_tokens, n_threads=a.threads,
                       flash_attn=a.flash_attn, type_k=a.kv_type, type_v=a.kv_type, **opts)
    return {"ttft_s": r.time_to_first_token_s, "text": r.text, "n_kept": r.n_kept, "kv_bytes_full": r.kv_bytes_full,
            "kv_bytes": r.kv_bytes, "selected_layer": r.selected_layer, "prefill_work": r.prefill_work,
            "note": r.note}


def budget_of(config: str, a) -> Optional[int]:
    return None if stock_ubatch(config) is not None or pyasl_config(config)[0] == "full" else a.budget


def run_child(config: str, model_path: str, tokens_file: str, a) -> dict:
    """One config in a fresh process; its peak RSS from the OS (ru_maxrss of the reaped child)."""
    env = dict(os.environ)
    cmd = [sys.executable, __file__, "--child", config, "--model-path", model_path, "--tokens", tokens_file,
           "--budget", str(a.budget), "--max-tokens", str(a.max_tokens), "--threads", str(a.threads),
           "--kv-type", a.kv_type]
    if a.pass_fa_ubatch:
        cmd += ["--pass-fa-ubatch", str(a.pass_fa_ubatch)]
    if a.flash_attn:
        cmd.append("--flash-attn")
    if stock_ubatch(config) is not None:
        from pyasl._paths import build_dir

        lib = build_dir("stock") / "bin"
        if not (lib / "libllama.so").exists() and not (lib / "libllama.dylib").exists():
            raise SystemExit(f"no stock libllama in {lib}: run `python scripts/build.py --stock` first")
        env["LLAMA_CPP_LIB_PATH"] = str(lib)
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.PIPE, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        wall = time.perf_counter() - t0
        out.seek(0)
        text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{config} failed (exit {proc.returncode}):\n{err[-3000:]}")
    row = json.loads(text.strip().splitlines()[-1])
    row["max_rss_mib"] = round(usage.ru_maxrss / 1024, 1)  # Linux: KiB
    row["wall_s"] = round(wall, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--lengths", default="8192,16384", help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--configs", default="stock,full,asl,fastkv,snapkv",
                    help=f"stock and pyasl policies ({', '.join(POLICIES)})")
    ap.add_argument("--tasks", default=TASK, help="offline tasks whose prompt (sample 0) is run, comma-separated")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--kv-type", default="f16", choices=KV_TYPES,
                    help="K and V cache type of every config (a quantized type needs --flash-attn)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each config, in turn")
    ap.add_argument("--pass-fa-ubatch", type=int, default=0,
                    help="pyasl configs: the layer-major pass's ubatch with flash attention (default: the library's)")
    ap.add_argument("--out", default="docs/bench/memory.jsonl")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child_stock(a) if stock_ubatch(a.child) else child_pyasl(a)), flush=True)
        return

    from pyasl.engine import Context

    try:  # pyasl's own check, so that stock and pyasl refuse the same settings
        Context.check_kv_types(a.kv_type, a.flash_attn)
    except ValueError as e:
        raise SystemExit(f"--kv-type {a.kv_type}: {e}") from None
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    for c in configs:
        if stock_ubatch(c) is None and pyasl_config(c)[0] not in POLICIES:
            raise SystemExit(f"unknown config {c!r}: stock, stock:ubatch=N or one of {', '.join(POLICIES)} "
                             "(POLICY:prefill=MODE)")
    lengths = [int(x) for x in a.lengths.split(",")]
    import pyasl
    from pyasl.bench.data import build_sample
    from pyasl.models import fetch_model

    model_path = str(fetch_model(a.model))
    out = ROOT / a.out if not os.path.isabs(a.out) else Path(a.out)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["model"], r["length"], r.get("task", TASK), r["config"], r.get("budget"), r["flash_attn"],
                      r.get("kv_type", "f16"), r.get("run", 0)))
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    plan = {(n, task): [(i, c) for i in range(a.repeat) for c in configs
                        if (a.model, n, task, c, budget_of(c, a), a.flash_attn, a.kv_type, i) not in done]
            for n in lengths for task in tasks}
    plan = {k: todo for k, todo in plan.items() if todo}
    if not plan:
        return
    # every prompt before any run: a bad task or length stops here, not after hours of earlier runs
    with pyasl.Model(model_path) as m:
        try:
            prompts = {(n, task): build_sample(m, task, n, seed=0, index=0) for n, task in plan}
        except ValueError as e:
            raise SystemExit(str(e)) from None
    for (n, task), todo in plan.items():
        s = prompts[(n, task)]
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(s.tokens, f)
        try:
            for i, c in todo:
                row = run_child(c, model_path, f.name, a)
                row = {"model": a.model, "length": n, "config": c,
                       "budget": budget_of(c, a), "flash_attn": a.flash_attn, "kv_type": a.kv_type,
                       "threads": a.threads, "task": task, "reference": s.references[0], "run": i, **row}
                out.parent.mkdir(parents=True, exist_ok=True)
                with open(out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"{a.model} {n} {task} {c}: peak {row['max_rss_mib']:.0f} MiB, ttft {row['ttft_s']:.1f} s, "
                      f"answer {row['text'][:40]!r}", flush=True)
        finally:
            os.unlink(f.name)


if __name__ == "__main__":
    main()
