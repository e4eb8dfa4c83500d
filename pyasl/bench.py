"""`pyasl bench`: accuracy of KV policies on the offline tasks of pyasl.benchdata.

Results are one JSON object per line (JSONL), appended as they are produced, so a run can be
stopped and resumed: rows already in the file are skipped. Two modes:

- shared (default): per sample, one full-depth layer-major prefill (pyasl.shared.SharedPrefill) from
  which every policy x budget is derived and decoded. Answers are what each policy produces;
  prefill cost is reported as prefill_work (share of layer x token work), not seconds.
- independent: every policy x budget runs engine.generate on its own, so prefill seconds and time
  to first token are real (slow: one prefill per policy).
"""
from __future__ import annotations

import json
import os
import re
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Iterable, Optional

from . import benchdata as D

DEFAULT_POLICIES = ("full", "snapkv", "fastkv", "gemfilter", "asl", "asl-2pass")
FIXED_LAYER_POLICIES = ("fastkv", "gemfilter")
NIAH_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def fixed_layer(n_layer: int, frac: float) -> int:
    """fastkv's / gemfilter's layer: `frac` of the depth (also used by scripts/bench_foundation.py)."""
    return int(round(frac * (n_layer - 1)))


def row_span(r: dict) -> Optional[str]:
    """A row's span stage (pyasl.spans): None for full KV; rows written before spans existed are token."""
    return None if r["policy"] == "full" else (r.get("span") or "token")


def row_key(r: dict) -> tuple:
    return (r["model"], r["task"], int(r["n_tokens"]), int(r["index"]), r.get("depth"), r["policy"], r.get("budget"),
            row_span(r))


def load_rows(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                # a run killed mid-write leaves a partial last line: ignore it (it is redone)
                continue
    return rows


def _items(task: str, samples: int, depths: Iterable[float]) -> list[tuple[int, Optional[float]]]:
    if task == "niah":
        return [(i, float(d)) for d in depths for i in range(samples)]
    return [(i, None) for i in range(samples)]


def run(models: list[str], tasks: list[str], lengths: list[int], budgets: list[int], policies: list[str],
        samples: int, out: str | os.PathLike, seed: int = 0, window: int = 32, tau: float = 0.3,
        fixed_frac: float = 0.4, depths: Iterable[float] = NIAH_DEPTHS, mode: str = "shared",
        n_threads: Optional[int] = None, log: Callable[[str], None] = print,
        spans: Optional[Iterable] = None) -> int:
    """Run (resuming) and append rows to `out`. Returns the number of new rows. `spans`: the span
    stages (pyasl.spans) every pruning policy runs with, each a row of its own (default: the
    library default only)."""
    from .engine import Model, generate, greedy_decode
    from .models import resolve_model
    from .shared import SHARED_POLICIES, SharedPrefill
    from .spans import Spans

    span_list = [str(Spans.parse(x)) for x in (spans or [None])]

    if mode not in ("shared", "independent"):
        raise ValueError("mode must be shared or independent")
    for t in tasks:
        if t not in D.TASKS:
            raise ValueError(f"unknown task {t!r}; choose from {', '.join(D.TASKS)}")
    for p in policies:
        if p not in SHARED_POLICIES:
            raise ValueError(f"unknown policy {p!r}; choose from {', '.join(SHARED_POLICIES)}")
    if samples < 1:
        raise ValueError("samples must be >= 1")
    for b in budgets:
        if b <= window:
            raise ValueError(f"budget {b} must be larger than the window {window}")
    outp = Path(out)
    outp.parent.mkdir(parents=True, exist_ok=True)
    done = {row_key(r) for r in load_rows(outp)}
    # the plan: every sample (model, length, task, index, depth) that still lacks a row for some
    # policy x budget; round-robin over tasks (sample 0 of every task, then sample 1, ...), so a
    # partial run covers every task
    plan = []
    for name in models:
        for n_tok in lengths:
            work = [(task, it) for task in tasks for it in _items(task, samples, depths)]
            work.sort(key=lambda x: (x[1][0], tasks.index(x[0])))
            for task, (index, depth) in work:
                base = {"model": name, "task": task, "n_tokens": n_tok, "index": index, "depth": depth}
                want = [(p, None, None) if p == "full" else (p, b, sp) for p in policies
                        for b in ([None] if p == "full" else budgets) for sp in ([None] if p == "full" else span_list)]
                want = list(dict.fromkeys(want))
                want = [(p, b, sp) for p, b, sp in want
                        if row_key(dict(base, policy=p, budget=b, span=sp)) not in done]
                if want:
                    plan.append((base, want))
    log(f"samples to run: {len(plan)} ({len(done)} results already in {outp})")
    new = 0
    t_start = time.perf_counter()
    m, m_name = None, None
    try:
        for n_done, (base, want) in enumerate(plan, 1):
            name, task, n_tok, index, depth = (base[x] for x in ("model", "task", "n_tokens", "index", "depth"))
            if m_name != name:  # the plan is grouped by model: load each once
                if m is not None:
                    m.close()
                    m = None
                m = Model(resolve_model(name))
                m_name = name
            s = D.build_sample(m, task, n_tok, seed=seed, index=index, depth=depth)
            t0 = time.perf_counter()
            rows = []
            if mode == "shared":
                sp = SharedPrefill(m, s.tokens, window=window, n_threads=n_threads)
                for p, b, span in want:
                    layer = fixed_layer(m.n_layer, fixed_frac) if p in FIXED_LAYER_POLICIES else None
                    d = sp.derive(p, budget=b, max_tokens=s.max_tokens, tau=tau, layer=layer, span=span)
                    try:
                        dec = greedy_decode(m, d.ctx, d.logits, s.max_tokens)
                    finally:
                        d.ctx.close()
                    rows.append(dict(
                        base, policy=p, budget=b, span=span, layer=layer, selected_layer=d.selected_layer,
                        n_kept=d.n_kept, prefill_work=d.prefill_work, kv_bytes=d.kv_bytes,
                        kv_bytes_full=sp.kv_bytes_full, kv_bytes_allocated=d.kv_bytes_allocated,
                        shared_prefill_s=sp.prefill_s, derive_s=d.derive_s,
                        decode_tokens_per_s=dec.tokens_per_s, n_generated=len(dec.tokens),
                        output=dec.text, note=d.note,
                        asl=None if d.asl is None else {k: d.asl[k] for k in ("ranking_layer", "triggered")},
                        **d.extra))
                del sp
            else:
                for p, b, span in want:
                    layer = fixed_layer(m.n_layer, fixed_frac) if p in FIXED_LAYER_POLICIES else None
                    g = generate(m, s.tokens, policy=p, budget=b if b is not None else 512, window=window,
                                 tau=tau, layer=layer, max_tokens=s.max_tokens, n_threads=n_threads, span=span)
                    rows.append(dict(
                        base, policy=p, budget=b, span=span, layer=layer, selected_layer=g.selected_layer,
                        n_kept=g.n_kept, prefill_work=g.prefill_work, kv_bytes=g.kv_bytes,
                        kv_bytes_full=g.kv_bytes_full, kv_bytes_allocated=g.kv_bytes_allocated,
                        prefill_s=g.prefill_s, time_to_first_token_s=g.time_to_first_token_s,
                        decode_tokens_per_s=g.decode_tokens_per_s, n_generated=g.n_generated,
                        output=g.text, note=g.note,
                        asl=None if g.asl is None else {k: g.asl[k] for k in ("ranking_layer", "triggered")}))
            with outp.open("a", encoding="utf-8") as f:
                for r in rows:
                    r.update(mode=mode, seed=seed, window=window, tau=tau, n_layer=m.n_layer,
                             references=s.references, metric=s.metric,
                             score=D.score(s.metric, r["output"], s.references))
                    f.write(json.dumps(r) + "\n")
            new += len(rows)
            acc = " ".join(f"{row_label(r)}={r['score']:.2f}" for r in rows)
            elapsed = time.perf_counter() - t_start
            eta = elapsed / n_done * (len(plan) - n_done)
            log(f"[{n_done}/{len(plan)} {name} {n_tok} {task} #{index}{'' if depth is None else f' depth {depth:.2f}'}] "
                f"{time.perf_counter() - t0:.0f}s {acc} | eta {_duration(eta)}")
    finally:
        if m is not None:
            m.close()
    return new


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---- summary -------------------------------------------------------------------------------
def _label(policy: str, budget, span: Optional[str] = None) -> str:
    """policy[+span]@budget: snapkv@512 (token-level), snapkv+forward:16@512, full."""
    name = policy if span in (None, "token") else f"{policy}+{span}"
    return name if budget is None else f"{name}@{budget}"


def row_label(r: dict) -> str:
    return _label(r["policy"], r.get("budget"), row_span(r))


def summarize(rows: list[dict]) -> dict:
    """Aggregates: per (model, n_tokens) -> per policy label -> per task: mean score and count;
    selected-layer distribution per task (asl, asl-2pass); mean decode tok/s, KV bytes and
    prefill work per policy label."""
    acc = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    layers = defaultdict(lambda: defaultdict(Counter))
    perf = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    n_layer = {}
    for r in rows:
        g = (r["model"], int(r["n_tokens"]))
        lab = row_label(r)
        acc[g][lab][r["task"]].append(float(r["score"]))
        n_layer[r["model"]] = r.get("n_layer")
        if r["policy"] in ("asl", "asl-2pass"):
            layers[g][(lab, r["task"])][r["selected_layer"]] += 1
        for k in ("decode_tokens_per_s", "kv_bytes", "kv_bytes_full", "kv_bytes_allocated", "prefill_work",
                  "prefill_s"):
            if r.get(k) is not None:
                perf[g][lab][k].append(float(r[k]))
    out = {}
    for g in acc:
        out[f"{g[0]}@{g[1]}"] = {
            "model": g[0], "n_tokens": g[1], "n_layer": n_layer.get(g[0]),
            "accuracy": {lab: {t: {"mean": sum(v) / len(v), "n": len(v)} for t, v in tasks.items()}
                         for lab, tasks in acc[g].items()},
            "selected_layers": {f"{lab}|{t}": {str(k): c for k, c in sorted(cnt.items(), key=lambda x: (x[0] is None, x[0] or 0))}
                                for (lab, t), cnt in layers[g].items()},
            "perf": {lab: {k: sum(v) / len(v) for k, v in d.items()} for lab, d in perf[g].items()},
        }
    return out


def _order(labels) -> list[str]:
    pol = {p: i for i, p in enumerate(("full", "snapkv", "zigzag", "pyramid", "fastkv", "gemfilter", "asl",
                                       "asl-2pass"))}

    def key(lab: str):
        name, _, b = lab.partition("@")
        p, _, span = name.partition("+")
        return (int(b) if b else -1, pol.get(p, 99), span, lab)
    return sorted(labels, key=key)


def _group_markdown(g: dict, fold: bool = False) -> list[str]:
    """One (model, length) group: the accuracy table, then the selected-layer distribution (folded
    into a <details> block when `fold`)."""
    tasks = sorted({t for d in g["accuracy"].values() for t in d}, key=lambda t: D.TASKS.index(t))
    labs = _order(g["accuracy"])
    lines = ["| policy | " + " | ".join(tasks) + " | mean | KV MiB held | KV MiB allocated | prefill work | "
             "decode tok/s |", "|---" * (len(tasks) + 6) + "|"]
    for lab in labs:
        d = g["accuracy"][lab]
        cells = [f"{d[t]['mean'] * 100:.0f} ({d[t]['n']})" if t in d else "–" for t in tasks]
        means = [d[t]["mean"] for t in tasks if t in d]
        pf = g["perf"].get(lab, {})
        lines.append(f"| {lab} | " + " | ".join(cells) + f" | {100 * sum(means) / max(1, len(means)):.0f} | "
                     f"{pf.get('kv_bytes', 0) / 2**20:.1f} | "
                     f"{pf.get('kv_bytes_allocated', float('nan')) / 2**20:.1f} | "
                     f"{pf.get('prefill_work', float('nan')):.2f} | "
                     f"{pf.get('decode_tokens_per_s', float('nan')):.1f} |")
    lines.append("")
    if g["selected_layers"]:
        title = (f"Selected layer (of {g['n_layer']}) per task, count of samples (None: τ never reached, "
                 "every layer ran)")
        lines += [f"<details><summary>{title}</summary>", ""] if fold else [title + ":", ""]
        for k in sorted(g["selected_layers"]):
            lab, t = k.split("|")
            dist = ", ".join(f"{l}: {c}" for l, c in g["selected_layers"][k].items())
            lines.append(f"- {lab} / {t}: {dist}")
        lines.append("")
        if fold:
            lines += ["</details>", ""]
    return lines


def markdown(summary: dict) -> str:
    lines = []
    for g in summary.values():
        lines.append(f"### {g['model']}, {g['n_tokens']} tokens\n")
        lines += _group_markdown(g)
    return "\n".join(lines)


_START = r"<!-- accuracy:(?P<model>[^ :]+):(?P<n>\d+) -->"
# a block may not run into the next block's start: an unterminated block is an error, not a
# reason to swallow the text up to some later end marker
_MARK = re.compile(_START + r"\n(?:(?!<!-- accuracy:).)*?<!-- /accuracy -->", re.S)


def update_doc(text: str, summary: dict) -> tuple[str, list[str], list[str]]:
    """Rewrites every block `<!-- accuracy:MODEL:N_TOKENS -->` ... `<!-- /accuracy -->` of a
    markdown document with that group's table and folded selected-layer list. Returns the new text,
    the groups rewritten and the groups of the summary that the document has no block for."""
    groups = {(g["model"], int(g["n_tokens"])): g for g in summary.values()}
    done = []

    def repl(mt: re.Match) -> str:
        key = (mt["model"], int(mt["n"]))
        if key not in groups:
            raise ValueError(f"the document has a block for {key[0]} at {key[1]} tokens, but the results have no rows for it")
        done.append(f"{key[0]}@{key[1]}")
        body = "\n".join(_group_markdown(groups[key], fold=True)).rstrip("\n")
        return f"<!-- accuracy:{key[0]}:{key[1]} -->\n{body}\n<!-- /accuracy -->"

    new, n = _MARK.subn(repl, text)
    starts = len(re.findall(_START, text))
    if n != starts:
        raise ValueError(f"{starts - n} of the document's '<!-- accuracy:MODEL:N_TOKENS -->' blocks "
                         "have no '<!-- /accuracy -->' before the next block")
    missing = [f"{model}@{n_tok}" for model, n_tok in groups if f"{model}@{n_tok}" not in done]
    return new, done, missing


# ---- plots ---------------------------------------------------------------------------------
def plot(rows: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """PNG plots: NIAH heatmaps per policy (depth x length), accuracy vs budget per task,
    selected-layer histograms per task, speed and memory bars. Returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    outd = Path(out_dir)
    outd.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    models = sorted({r["model"] for r in rows})

    def save(fig, name: str):
        p = outd / name
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(p)

    for model in models:
        mr = [r for r in rows if r["model"] == model]
        # NIAH heatmaps
        nr = [r for r in mr if r["task"] == "niah"]
        if nr:
            labs = _order({row_label(r) for r in nr})
            lens = sorted({int(r["n_tokens"]) for r in nr})
            deps = sorted({float(r["depth"]) for r in nr})
            cols = min(4, len(labs))
            rws = (len(labs) + cols - 1) // cols
            fig, axes = plt.subplots(rws, cols, figsize=(3.2 * cols, 2.6 * rws), squeeze=False)
            for ax, lab in zip(axes.flat, labs):
                grid = np.full((len(deps), len(lens)), np.nan)
                for i, dp in enumerate(deps):
                    for j, ln in enumerate(lens):
                        v = [r["score"] for r in nr if row_label(r) == lab
                             and float(r["depth"]) == dp and int(r["n_tokens"]) == ln]
                        if v:
                            grid[i, j] = sum(v) / len(v)
                ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
                ax.set_title(lab, fontsize=9)
                ax.set_xticks(range(len(lens)), [str(x) for x in lens], fontsize=7)
                ax.set_yticks(range(len(deps)), [f"{d:.2f}" for d in deps], fontsize=7)
                ax.set_xlabel("tokens", fontsize=7)
                ax.set_ylabel("depth", fontsize=7)
            for ax in list(axes.flat)[len(labs):]:
                ax.axis("off")
            fig.suptitle(f"NIAH {model}", fontsize=10)
            save(fig, f"niah-{model}.png")
        for n_tok in sorted({int(r["n_tokens"]) for r in mr}):
            lr = [r for r in mr if int(r["n_tokens"]) == n_tok]
            tasks = sorted({r["task"] for r in lr}, key=D.TASKS.index)
            pols = [p for p in ("full", "snapkv", "zigzag", "pyramid", "fastkv", "gemfilter", "asl", "asl-2pass")
                    if any(r["policy"] == p for r in lr)]
            budgets = sorted({int(r["budget"]) for r in lr if r.get("budget") is not None})
            # accuracy vs budget per task
            cols = min(3, len(tasks))
            rws = (len(tasks) + cols - 1) // cols
            fig, axes = plt.subplots(rws, cols, figsize=(3.6 * cols, 2.8 * rws), squeeze=False)
            pruned = [p for p in pols if p != "full"]
            markers = "osD^vP*X"
            for ax, t in zip(axes.flat, tasks):
                for p in pols:
                    if p == "full":
                        v = [r["score"] for r in lr if r["task"] == t and r["policy"] == "full"]
                        if v:
                            ax.axhline(sum(v) / len(v), color="k", ls="--", lw=1, label="full")
                        continue
                    ys = []
                    for b in budgets:
                        v = [r["score"] for r in lr if r["task"] == t and r["policy"] == p and r.get("budget") == b]
                        ys.append(sum(v) / len(v) if v else np.nan)
                    # budgets at evenly spaced x positions, each policy dodged sideways a little, so
                    # policies with equal scores (asl that never selects is snapkv) stay visible
                    i = pruned.index(p)
                    xs = [j + 0.06 * (i - (len(pruned) - 1) / 2) for j in range(len(budgets))]
                    ax.plot(xs, ys, marker=markers[i % len(markers)], ms=4, lw=1, label=p)
                ax.set_title(t, fontsize=9)
                ax.set_ylim(-0.05, 1.05)
                ax.set_xlim(-0.5, len(budgets) - 0.5)
                ax.set_xticks(range(len(budgets)), [str(b) for b in budgets], fontsize=7)
                ax.set_xlabel("KV budget", fontsize=7)
            for ax in list(axes.flat)[len(tasks):]:
                ax.axis("off")
            axes.flat[0].legend(fontsize=6)
            fig.suptitle(f"accuracy vs budget: {model}, {n_tok} tokens", fontsize=10)
            save(fig, f"accuracy-{model}-{n_tok}.png")
            # selected layers
            ar = [r for r in lr if r["policy"] == "asl"]
            if ar:
                n_layer = int(ar[0].get("n_layer") or 0)
                fig, axes = plt.subplots(rws, cols, figsize=(3.6 * cols, 2.6 * rws), squeeze=False)
                for ax, t in zip(axes.flat, tasks):
                    for b in budgets:
                        sl = [n_layer if r["selected_layer"] is None else r["selected_layer"]
                              for r in ar if r["task"] == t and r.get("budget") == b]
                        if sl:
                            ax.hist(sl, bins=range(0, n_layer + 2), alpha=0.6, label=f"budget {b}")
                    ax.set_title(t, fontsize=9)
                    ax.set_xlabel(f"selected layer ({n_layer} = none)", fontsize=7)
                for ax in list(axes.flat)[len(tasks):]:
                    ax.axis("off")
                axes.flat[0].legend(fontsize=6)
                fig.suptitle(f"ASL selected layer: {model}, {n_tok} tokens", fontsize=10)
                save(fig, f"layers-{model}-{n_tok}.png")
            # speed and memory
            labs = _order({row_label(r) for r in lr})
            dec = [np.mean([r["decode_tokens_per_s"] for r in lr if row_label(r) == lab
                            and r["decode_tokens_per_s"]] or [np.nan]) for lab in labs]
            kv = [np.mean([r["kv_bytes"] for r in lr if row_label(r) == lab]) / 2**20
                  for lab in labs]
            work = [np.mean([r["prefill_work"] for r in lr if row_label(r) == lab])
                    for lab in labs]
            fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
            for ax, vals, title in zip(axes, (dec, kv, work), ("decode tokens/s", "KV MiB held",
                                                                "prefill work (x full)")):
                ax.bar(range(len(labs)), vals, color="tab:blue")
                ax.set_xticks(range(len(labs)), labs, rotation=60, ha="right", fontsize=7)
                ax.set_title(title, fontsize=9)
            fig.suptitle(f"speed and memory: {model}, {n_tok} tokens", fontsize=10)
            save(fig, f"perf-{model}-{n_tok}.png")
    return files
