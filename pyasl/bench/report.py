"""Tables from benchmark rows: accuracy per task and policy, selected layers, speed and memory,
as markdown or rewritten into the marked blocks of a document (docs/BENCHMARKS.md)."""
from __future__ import annotations

import re
from collections import Counter, defaultdict

from . import data as D
from .runner import row_label


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


# the order policies are shown in, tables and plots alike: full KV, then from the whole prefill to the cheapest
POLICY_ORDER = ("full", "snapkv", "zigzag", "pyramid", "fastkv", "gemfilter", "gemfilter-published", "asl", "asl-2pass")


def policy_rank(policy: str) -> int:
    """A policy's place in POLICY_ORDER (policies not in it go last)."""
    return POLICY_ORDER.index(policy) if policy in POLICY_ORDER else len(POLICY_ORDER)


def order_labels(labels) -> list[str]:
    """Row labels (runner.row_label) by budget, then POLICY_ORDER, then span."""
    def key(lab: str):
        name, _, b = lab.partition("@")
        p, _, span = name.partition("+")
        return (int(b) if b else -1, policy_rank(p.partition("[")[0]), span, lab)
    return sorted(labels, key=key)


def _group_markdown(g: dict, fold: bool = False) -> list[str]:
    """One (model, length) group: the accuracy table, then the selected-layer distribution (folded
    into a <details> block when `fold`)."""
    tasks = sorted({t for d in g["accuracy"].values() for t in d}, key=lambda t: D.TASKS.index(t))
    labs = order_labels(g["accuracy"])
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
