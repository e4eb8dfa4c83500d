"""The prefill-accuracy trade of every policy setting (issue 22): accuracy against prefill work.

An adaptive rule is worth its complexity only if its points lie on or above the frontier that a fixed
selection layer draws (the best fixed layer within each prefill-work budget): ASL's τ sweep against FastKV's (and GemFilter's) layer sweep, with SnapKV
(whole prefill, pruned) and full KV as references. Every point of one chart is averaged over the
same samples (the samples every setting of the group has a row for), so a sweep run on fewer
samples than the references never compares unlike sets.

    groups = pareto_groups(rows)        # one per (model, tokens, budget, span)
    files = plot_pareto(groups, "docs/bench/plots")
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .report import policy_rank
from .runner import row_kv_type, row_label, row_layer, row_span, row_tau

__all__ = ["pareto_groups", "pareto_markdown", "plot_pareto", "on_or_above"]


def _sample(r: dict) -> tuple:
    return (r["task"], int(r["index"]), r.get("depth"), int(r["n_tokens"]))


def pareto_groups(rows: list[dict]) -> list[dict]:
    """Per (model, n_tokens, budget, span) with at least two settings: the settings' points
    {label, policy, tau, layer, accuracy (0-100), prefill_work, n} over the samples all of them share,
    full KV's point (budget None) included in every group of its model and length."""
    full: dict[tuple, dict] = {}
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        if r.get("prefill_work") is None or r.get("score") is None or row_kv_type(r) != "f16":
            continue  # a quantized cache is another trade (bytes, not prefill): its own table
        ml = (os.path.basename(str(r["model"])), round(int(r["n_tokens"]) / 1024) * 1024)  # the length asked for
        if r["policy"] == "full":
            full.setdefault(ml, {})[_sample(r)] = r
            continue
        key = ml + (int(r["budget"]), row_span(r))
        groups.setdefault(key, {}).setdefault(row_label(r), []).append(r)
    out = []
    for key in sorted(groups, key=str):
        settings = groups[key]
        if len(settings) < 2:
            continue
        shared = set.intersection(*({_sample(r) for r in rs} for rs in settings.values()))
        ref = full.get(key[:2], {})
        if ref:
            shared &= set(ref)
        if not shared:
            continue
        points = []
        for label, rs in settings.items():
            rs = [r for r in rs if _sample(r) in shared]
            points.append(_point(label, rs))
        if ref:
            points.append(_point("full", [ref[s] for s in shared]))
        points.sort(key=lambda p: (policy_rank(p["policy"]), p["prefill_work"]))
        out.append({"model": key[0], "n_tokens": key[1], "budget": key[2], "span": key[3],
                    "samples": len(shared), "points": points})
    return out


def _point(label: str, rs: list[dict]) -> dict:
    r0 = rs[0]
    return {"label": label, "policy": r0["policy"],
            "tau": row_tau(r0), "layer": row_layer(r0),
            "accuracy": 100.0 * sum(r["score"] for r in rs) / len(rs),
            "prefill_work": sum(float(r["prefill_work"]) for r in rs) / len(rs), "n": len(rs)}


def on_or_above(point: dict, curve: list[dict]) -> Optional[bool]:
    """Whether `point` is at least as accurate as the best of `curve`'s points that cost no more prefill
    work (the frontier a user gets by picking the best fixed layer within a work budget); None where
    every point of the curve costs more."""
    within = [c["accuracy"] for c in curve if c["prefill_work"] <= point["prefill_work"] + 1e-9]
    if not within:
        return None
    return point["accuracy"] >= max(within) - 1e-9


def pareto_markdown(groups: list[dict]) -> str:
    """One table per group: setting, prefill work, accuracy; for ASL's points whether they reach FastKV's
    frontier (the best FastKV layer at no more prefill work)."""
    lines = []
    for g in groups:
        fast = [p for p in g["points"] if p["policy"] == "fastkv"]
        lines += [f"#### {g['model']}, {g['n_tokens']} tokens, {g['budget']} cells, span {g['span']} "
                  f"({g['samples']} samples)", "",
                  "| setting | prefill work | accuracy | vs the best FastKV layer at no more work |",
                  "|---|---|---|---|"]
        for p in g["points"]:
            side = ""
            if p["policy"] in ("asl", "asl-2pass") and len(fast) > 1:
                v = on_or_above(p, fast)
                side = "cheaper than every FastKV layer" if v is None else ("on or above" if v else "below")
            lines.append(f"| {p['label']} | {p['prefill_work']:.2f} | {p['accuracy']:.1f} | {side} |")
        lines.append("")
    return "\n".join(lines)


def plot_pareto(groups: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """One PNG per group: accuracy against prefill work, a line per swept policy (ASL's τ, FastKV's
    and GemFilter's layer), SnapKV and full KV as reference points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outd = Path(out_dir)
    outd.mkdir(parents=True, exist_ok=True)
    files = []
    styles = {"snapkv": ("tab:gray", "s"), "fastkv": ("tab:orange", "o"),
              "gemfilter": ("tab:green", "^"), "asl": ("tab:blue", "D"), "asl-2pass": ("tab:purple", "v")}
    for g in groups:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        by_policy: dict[str, list[dict]] = {}
        for p in g["points"]:
            by_policy.setdefault(p["policy"], []).append(p)
        for pol, pts in by_policy.items():
            if pol == "full":  # a level to reach, drawn across (its point would hide under snapkv's)
                ax.axhline(pts[0]["accuracy"], color="k", ls="--", lw=0.8, label="full KV")
                continue
            color, marker = styles.get(pol, ("tab:red", "x"))
            pts = sorted(pts, key=lambda p: p["prefill_work"])
            xs, ys = [p["prefill_work"] for p in pts], [p["accuracy"] for p in pts]
            ax.plot(xs, ys, color=color, marker=marker, lw=1.2 if len(pts) > 1 else 0, ms=6, label=pol)
            for p in pts:
                tag = f"τ={p['tau']:g}" if p["tau"] is not None and pol in ("asl", "asl-2pass") else (
                    f"L{p['layer']}" if p["layer"] is not None else "")
                if tag:
                    ax.annotate(tag, (p["prefill_work"], p["accuracy"]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        ax.set_xlabel("prefill work (layer × token, share of full prefill)")
        ax.set_ylabel("accuracy (%)")
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        ax.set_title(f"{g['model']}, {g['n_tokens']} tokens, {g['budget']} cells, span {g['span']}, "
                     f"{g['samples']} samples", fontsize=9)
        name = f"pareto-{g['model'].removesuffix('.gguf')}-{g['n_tokens']}-{g['budget']}-{g['span'].replace(':', '')}.png"
        p = outd / name
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(p)
    return files
