"""Per-model ASL defaults (`pyasl calibrate MODEL`): the tau that lets ASL select as early as the
model allows without losing accuracy.

The paper's tau = 0.3 was tuned on 8B models. On the small models that run on a laptop the
rank-variance ratio rarely falls that low before the last layers, so ASL selects late (or never)
and saves no prefill. Calibration runs the offline tasks once per sample (one shared prefill, a
propagation tail per tau), measures SnapKV at the same budget as the reference, and keeps the tau
with the least prefill work whose accuracy is within ``tolerance`` points of SnapKV's (when none
is, the most accurate tau, and the record says so).

The ratio curve moves with the prompt's length (on Qwen2.5 the same tau selects later at 8K than
at 4K), so a model may hold one calibration per prompt length. They are stored in
``cache_home()/calibration/<model file>.json``; the package ships calibrations for the known models
(``calibration.json`` beside this module). :class:`pyasl.ASL` built without a tau uses the
calibration of the length nearest the prompt's (the user's before the shipped one at one length),
else 0.3, and its selection note says which.
"""
from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from ._paths import cache_home

DEFAULT_TAU = 0.3
TAUS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt", "cwe", "passkey", "number_string",
         "kv_retrieval")
SHIPPED = Path(__file__).with_name("calibration.json")


@dataclass(frozen=True)
class Calibration:
    tau: float
    source: str   # where it comes from, for the notes: "calibrated 2026-12-03, 16 samples" etc.
    propagate: Optional[object] = None  # N or "N:kept" chosen with tau (pyasl.policies.propagation), or None
    n_tokens: Optional[int] = None      # the calibrated prompt length (propagate scales with the prompt)

    def propagate_for(self, n_tokens: int):
        """The calibrated propagation for a prompt of `n_tokens`: the same share of the prompt."""
        from .policies.propagation import format_propagate, parse_propagate

        n, keep = parse_propagate(self.propagate)
        if n is not None and self.n_tokens:
            n = max(1, int(round(n * n_tokens / self.n_tokens)))
        return format_propagate(n, keep)


def identity(model) -> dict:
    """What a calibration is valid for: the model file (name and size: another quantization is
    another model) and its depth."""
    size = model.path.stat().st_size if model.path.exists() else None
    return {"file": model.path.name, "size": size, "n_layer": int(model.n_layer)}


def user_file(model) -> Path:
    return cache_home() / "calibration" / f"{model.path.stem}.json"


_read: dict = {}  # path -> (mtime_ns, size, records): ASL asks at every layer of a pass


def _records(path: Path) -> list[dict]:
    """The records of a calibration file, read again only when the file changed."""
    try:
        st = path.stat()
        hit = _read.get(path)
        if hit is not None and hit[:2] == (st.st_mtime_ns, st.st_size):
            return hit[2]
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    records = data if isinstance(data, list) else [data]
    _read[path] = (st.st_mtime_ns, st.st_size, records)
    return records


def _length_distance(n_tokens: Optional[int], rec: dict) -> float:
    """How far a calibration's prompt length is from `n_tokens`, as a ratio (4K is as far from 8K as
    8K from 16K); 0 when either is unknown."""
    length = rec.get("n_tokens")
    if not n_tokens or not isinstance(length, int) or length <= 0:
        return 0.0
    return abs(math.log(n_tokens / length))


def lookup(model, n_tokens: Optional[int] = None) -> Optional[Calibration]:
    """The model's calibration for prompts of `n_tokens` (any length when None): the record of the
    nearest calibrated length, the user's (`pyasl calibrate`) before the shipped one; None if neither."""
    ident = identity(model)
    found = []
    for rank, (path, whose) in enumerate(((user_file(model), "pyasl calibrate"), (SHIPPED, "shipped"))):
        for rec in _records(path):
            if rec.get("identity") == ident and isinstance(rec.get("tau"), (int, float)):
                found.append((_length_distance(n_tokens, rec), rank, rec, whose))
    if not found:
        return None
    _, _, rec, whose = min(found, key=lambda f: f[:2])
    return Calibration(float(rec["tau"]), f"{whose} calibration of {rec.get('date', '?')}, "
                                          f"{rec.get('samples', '?')} samples at {rec.get('n_tokens')} tokens",
                       propagate=rec.get("propagate"), n_tokens=rec.get("n_tokens"))


def store(path: Path, rec: dict) -> None:
    """Add `rec` to the calibration file at `path`, replacing the record of the same model and length."""
    keep = [r for r in _records(path)
            if (r.get("identity"), r.get("n_tokens")) != (rec["identity"], rec["n_tokens"])]
    path.write_text(json.dumps(keep + [rec], indent=1) + "\n", encoding="utf-8")


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
    from .bench.runner import row_propagate
    from .policies.propagation import parse_propagate

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
    from .bench import load_rows
    from .bench import run as run_bench
    from .engine import Model
    from .models import resolve_model

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
