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
else 0.3, and its selection note says which. This module is what the policies read; the
calibration run and its rule are a benchmark (:mod:`pyasl.bench.calibrate`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ._paths import cache_home

DEFAULT_TAU = 0.3
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
