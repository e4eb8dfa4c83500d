"""PNG plots from benchmark rows (matplotlib): NIAH heatmaps, accuracy against budget, selected
layers, speed and memory."""
from __future__ import annotations

import os
from pathlib import Path

from . import data as D
from .report import POLICY_ORDER, order_labels
from .runner import row_label


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
            labs = order_labels({row_label(r) for r in nr})
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
            pols = [p for p in POLICY_ORDER if any(r["policy"] == p for r in lr)]
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
            labs = order_labels({row_label(r) for r in lr})
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
