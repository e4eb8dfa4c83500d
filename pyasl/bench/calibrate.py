"""The calibration run behind `pyasl calibrate MODEL`: the offline tasks once per sample (one shared
prefill, a propagation tail per tau), SnapKV at the same budget as the reference, and the rule that
keeps the tau with the least prefill work within a tolerance of SnapKV's accuracy. The result is
stored where :mod:`pyasl.calibration` (what the policies read) finds it."""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..calibration import DEFAULT_TAU, identity, store, user_file
from ..policies.propagation import parse_propagate
from .data import INFINITE_TASKS, RULER_TASKS
from .runner import load_rows, row_propagate, run as run_bench

TAUS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TASKS = RULER_TASKS + INFINITE_TASKS  # the 8 scored tasks, without the niah depth grid


MIN_ANSWERED = 8.0  # samples SnapKV must answer (summed scores) before a calibration may move tau


def choose(rows: list[dict], tolerance: float = 2.0) -> dict:
    """The calibration from benchmark rows of snapkv and asl at several taus (and propagations; same
    samples, one budget): per setting the accuracy, the mean prefill work and the selection layers;
    the chosen one (least work within `tolerance` points of snapkv, ties to the smaller tau and the
    narrower propagation).

    "No accuracy lost" can only be seen on samples the model answers: when SnapKV answers fewer than
    MIN_ANSWERED of them, the paper's tau is kept (``too_few_answered``). SmolLM2 at 4K answered 4
    of 16; the tau the rule picked from those 4 lost the answer on a held-out prompt that 0.3 keeps.
    When no setting selects a layer on any sample there is no trade to choose (``never_selects``):
    Gemma 3, whose only layer ASL may select at 4K is its last (sliding-window models rank with their
    global layers, and the first one after the reference is the last)."""
    snap = [r["score"] for r in rows if r["policy"] == "snapkv"]
    if not snap:
        raise ValueError("no snapkv rows to compare with")
    ref = 100.0 * sum(snap) / len(snap)
    by_setting: dict = {}
    for r in rows:
        if r["policy"] == "asl":
            by_setting.setdefault((round(float(r["tau"]), 4), row_propagate(r)), []).append(r)
    if not by_setting:
        raise ValueError("no asl rows")
    n = max(len(v) for v in by_setting.values())
    table = []
    for (tau, prop), rs in sorted(by_setting.items(), key=lambda kv: (kv[0][0], parse_propagate(kv[0][1])[0] or 0,
                                                                      str(kv[0][1]))):
        if len(rs) < n:
            continue  # a setting not run on every sample is not compared
        layers = [r["selected_layer"] for r in rs]
        table.append({"tau": tau, **({"propagate": prop} if prop is not None else {}),
                      "accuracy": 100.0 * sum(r["score"] for r in rs) / len(rs),
                      "prefill_work": sum(r["prefill_work"] for r in rs) / len(rs),
                      "selected": sum(x is not None for x in layers) / len(rs),
                      "mean_layer": (sum(x for x in layers if x is not None) / max(1, sum(x is not None for x in layers))
                                     if any(x is not None for x in layers) else None)})
    def width(t):
        return parse_propagate(t.get("propagate"))[0] or 0

    answered = float(sum(snap))
    common = {"tolerance": tolerance, "snapkv_accuracy": ref, "snapkv_answered": answered, "samples": n,
              "taus": table}
    if not any(t["selected"] for t in table):  # every setting ran every layer: work 1.0 whatever tau
        return {"tau": DEFAULT_TAU, "within_tolerance": False, "never_selects": True, **common}
    if answered < MIN_ANSWERED:
        return {"tau": DEFAULT_TAU, "within_tolerance": False, "too_few_answered": True, **common}
    ok = [t for t in table if t["accuracy"] >= ref - tolerance]
    if ok:
        best = min(ok, key=lambda t: (round(t["prefill_work"], 6), t["tau"], width(t)))
    else:
        best = max(table, key=lambda t: (t["accuracy"], -t["prefill_work"], -t["tau"], -width(t)))
    return {"tau": best["tau"], **({"propagate": best["propagate"]} if "propagate" in best else {}),
            "within_tolerance": bool(ok), **common}


def calibrate(model_name: str, n_tokens: int = 4096, budget: int = 1024, samples: int = 2,
              taus: Iterable[float] = TAUS, tolerance: float = 2.0, tasks: Iterable[str] = TASKS,
              n_threads: Optional[int] = None, log: Callable[[str], None] = print,
              propagates: Optional[Iterable] = None) -> tuple[dict, Path]:
    """Run (resuming) the calibration benchmark of `model_name` and store its result; returns
    (record, path of the stored file). `propagates`: ASL's propagations to try with every tau
    (pyasl.policies.propagation; None: the budget only)."""
    from ..engine import Model
    from ..models import resolve_model

    path = resolve_model(model_name)
    model = Model(path)
    try:
        ident, out = identity(model), user_file(model)
    finally:
        model.close()
    runs = out.with_suffix(".jsonl")
    runs.parent.mkdir(parents=True, exist_ok=True)
    taus = list(taus)
    run_bench([str(path)], list(tasks), [n_tokens], [budget], ["snapkv", "asl"], samples, runs, tau=taus[0],
              taus=taus, n_threads=n_threads, log=log, propagates=propagates)
    rows = [r for r in load_rows(runs) if r["n_tokens"] == n_tokens and r.get("budget") == budget
            and r["task"] in set(tasks) and r["index"] < samples]
    rec = {"identity": ident, "date": datetime.date.today().isoformat(), "n_tokens": n_tokens, "budget": budget,
           "tasks": list(tasks), **choose(rows, tolerance)}
    store(out, rec)
    return rec, out
