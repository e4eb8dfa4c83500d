"""`pyasl bench run`: accuracy of KV policies on the offline tasks of pyasl.bench.data.

Results are one JSON object per line (JSONL), appended as they are produced, so a run can be
stopped and resumed: rows already in the file are skipped. Two modes:

- shared (default): per sample, one full-depth layer-major prefill (pyasl.bench.shared.SharedPrefill) from
  which every policy x budget is derived and decoded. Answers are what each policy produces;
  prefill cost is reported as prefill_work (share of layer x token work), not seconds. A policy
  that ranks by scores of its own (gemfilter-published) runs pyasl.generate on its own.
- independent: every policy x budget runs pyasl.generate on its own, so prefill seconds and time
  to first token are real (slow: one prefill per policy).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Optional

from ..calibration import DEFAULT_TAU
from ..policies import make_policy
from ..policies.fixed_layer import FIXED_LAYER_POLICIES
from ..policies.propagation import format_propagate, parse_propagate, propagating_policies
from . import data as D

DEFAULT_POLICIES = ("full", "snapkv", "fastkv", "gemfilter", "asl", "asl-2pass")
TAU_POLICIES = ("asl", "asl-2pass")  # the policies a row's tau means something to
NIAH_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_FIXED_FRAC = 0.4  # fastkv's and gemfilter's layer: this fraction of the depth unless swept


def fixed_layer(n_layer: int, frac: float) -> int:
    """fastkv's / gemfilter's layer: `frac` of the depth (also used by scripts/bench_foundation.py)."""
    return int(round(frac * (n_layer - 1)))


def row_span(r: dict) -> Optional[str]:
    """A row's span stage (pyasl.policies.spans): None for full KV; rows written before spans existed are token."""
    return None if r["policy"] == "full" else (r.get("span") or "token")


def row_tau(r: dict) -> Optional[float]:
    """The tau of an ASL-rule row (rows written before tau sweeps: the run's tau), None for others."""
    return round(float(r.get("tau", DEFAULT_TAU)), 4) if r["policy"] in TAU_POLICIES else None


def _label(policy: str, budget, span: Optional[str] = None, tau: Optional[float] = None,
           layer: Optional[int] = None, kv_type: str = "f16", propagate=None) -> str:
    """policy[tau|layer][prop][+span]@budget[/kv]: snapkv@512 (token-level), snapkv+forward:16@512,
    asl[tau=0.6]@512, fastkv[layer=6]@512, asl[prop=2048]@512, asl@512/q8_0, full, full/q4_0 (tau shown when
    it is not the paper's 0.3, layer when it is not the policy's own default, prop when more tokens
    than the budget go on past the selection layer, the KV type when it is not f16)."""
    name = policy if tau is None or tau == DEFAULT_TAU else f"{policy}[tau={tau:g}]"
    name = name if layer is None else f"{name}[layer={layer}]"
    name = name if propagate is None else f"{name}[prop={propagate}]"
    name = name if span in (None, "token") else f"{name}+{span}"
    name = name if budget is None else f"{name}@{budget}"
    return name if kv_type == "f16" else f"{name}/{kv_type}"


def row_label(r: dict) -> str:
    layer = row_layer(r)
    # the layer is named unless it is the one the library picks (pyasl generate --policy fastkv): the
    # benchmark's default fraction of the depth may be another (Qwen2.5: 9 against fastkv's 11)
    if layer is not None and r.get("n_layer") and layer == make_policy(r["policy"]).library_layer(int(r["n_layer"])):
        layer = None
    return _label(r["policy"], r.get("budget"), row_span(r), row_tau(r), layer, row_kv_type(r), row_propagate(r))


def row_layer(r: dict) -> Optional[int]:
    """A fixed-layer policy's layer (fastkv, gemfilter: a layer sweep is a row each), None for others."""
    return r.get("layer") if r["policy"] in FIXED_LAYER_POLICIES else None


def row_propagate(r: dict):
    """What a layer-major row sent on past its selection layer when more than its budget
    (pyasl.policies.propagation: N, or "N:kept"), None for the default and for other policies."""
    n, keep = parse_propagate(r.get("propagate"))
    if r["policy"] not in propagating_policies() or n == r.get("budget"):
        return None
    return format_propagate(n, keep)


def row_kv_type(r: dict) -> str:
    """The KV cache type a row ran with (rows written before KV types were swept: f16)."""
    return r.get("kv_type") or "f16"


def row_key(r: dict) -> tuple:
    return (r["model"], r["task"], int(r["n_tokens"]), int(r["index"]), r.get("depth"), r["policy"], r.get("budget"),
            row_span(r), row_tau(r), row_layer(r), row_kv_type(r), row_propagate(r))


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
        samples: int, out: str | os.PathLike, seed: int = 0, window: int = 32, tau: float = DEFAULT_TAU,
        fixed_frac: float = DEFAULT_FIXED_FRAC, depths: Iterable[float] = NIAH_DEPTHS, mode: str = "shared",
        n_threads: Optional[int] = None, log: Callable[[str], None] = print,
        spans: Optional[Iterable] = None, taus: Optional[Iterable[float]] = None,
        fixed_fracs: Optional[Iterable[float]] = None, kv_types: Optional[Iterable[str]] = None,
        propagates: Optional[Iterable[Optional[int]]] = None) -> int:
    """Run (resuming) and append rows to `out`. Returns the number of new rows. `spans`: the span
    stages (pyasl.policies.spans) every pruning policy runs with, each a row of its own (default: the
    library default only). `taus`: the taus asl and asl-2pass run with, a row each (default: `tau`);
    `fixed_fracs`: the layers fastkv and gemfilter select at, as fractions of each model's depth, a
    row each (default: `fixed_frac`). From one shared prefill each costs a propagation tail, not a
    prefill. `kv_types`: the KV cache types every policy runs with, a row each (default f16); a
    quantized cache runs each policy on its own (generate, flash attention on: llama.cpp needs it for
    a quantized V), not from the shared prefill. `propagates`: the tokens asl and fastkv send on past
    the selection layer (None: the budget), a row each; from the shared prefill each costs a tail."""
    from ..engine import Model, greedy_decode
    from ..engine.context import kv_type_name
    from ..generation import generate
    from ..models import resolve_model
    from ..policies import policy_names
    from ..policies.options import policy_from_options
    from ..policies.spans import Spans
    from .shared import SHARED_POLICIES, SharedPrefill

    span_list = [str(Spans.parse(x)) for x in (spans or [None])]
    tau_list = list(dict.fromkeys(round(float(t), 4) for t in (taus or [tau])))
    for t in tau_list:
        if not 0 < t <= 1:
            raise ValueError(f"tau must satisfy 0 < tau <= 1, got {t}")
    kv_list = list(dict.fromkeys(kv_type_name(k) for k in (kv_types or ["f16"])))
    frac_list = list(dict.fromkeys(float(f) for f in (fixed_fracs or [fixed_frac])))
    for f in frac_list:
        if not 0 <= f <= 1:
            raise ValueError(f"a fixed layer is a fraction of the depth in [0, 1], got {f}")

    if mode not in ("shared", "independent"):
        raise ValueError("mode must be shared or independent")
    for t in tasks:
        if t not in D.TASKS:
            raise ValueError(f"unknown task {t!r}; choose from {', '.join(D.TASKS)}")
    for p in policies:
        if p not in policy_names():
            raise ValueError(f"unknown policy {p!r}; choose from {', '.join(policy_names())}")
    if samples < 1:
        raise ValueError("samples must be >= 1")
    for b in budgets:
        if b <= window:
            raise ValueError(f"budget {b} must be larger than the window {window}")
    prop_list = list(dict.fromkeys(propagates or [None]))
    for p in prop_list:
        n_p = parse_propagate(p)[0]
        if n_p is not None and n_p < max(budgets):
            raise ValueError(f"propagate {n_p} is smaller than the budget {max(budgets)}: the tokens that go on past "
                             "the selection layer include the kept ones")
    outp = Path(out)
    outp.parent.mkdir(parents=True, exist_ok=True)
    done = {row_key(r) for r in load_rows(outp)}
    # the plan: every sample (model, length, task, index, depth) that still lacks a row for some
    # policy x budget; round-robin over tasks (sample 0 of every task, then sample 1, ...), so a
    # partial run covers every task
    plan = []
    for name in models:
        n_layer = _n_layer(name)
        layers = list(dict.fromkeys(fixed_layer(n_layer, f) for f in frac_list))
        for n_tok in lengths:
            work = [(task, it) for task in tasks for it in _items(task, samples, depths)]
            work.sort(key=lambda x: (x[1][0], tasks.index(x[0])))
            for task, (index, depth) in work:
                base = {"model": name, "task": task, "n_tokens": n_tok, "index": index, "depth": depth}
                want = [_Setting(p, None, None, tau, None, kv) if p == "full" else
                        _Setting(p, b, sp, t, ly, kv, None if parse_propagate(pr)[0] == b else pr)
                        for kv in kv_list for p in policies
                        for b in ([None] if p == "full" else budgets) for sp in ([None] if p == "full" else span_list)
                        for t in (tau_list if p in TAU_POLICIES else [tau])
                        for ly in (layers if p in FIXED_LAYER_POLICIES else [None])
                        for pr in (prop_list if p in propagating_policies() else [None])]
                want = [w for w in dict.fromkeys(want) if row_key(dict(base, **w._asdict())) not in done]
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
            shared = [w for w in want if mode == "shared" and w.policy in SHARED_POLICIES and w.kv_type == "f16"]
            sp = SharedPrefill(m, s.tokens, window=window, n_threads=n_threads) if shared else None
            for w in want:
                pol = policy_from_options(w.policy, budget=w.budget, window=window, tau=w.tau, layer=w.layer,
                                          span=w.span, propagate=w.propagate)
                row = dict(base, **w._asdict())
                if w in shared:
                    d = sp.derive(pol, max_tokens=s.max_tokens)
                    try:
                        dec = greedy_decode(m, d.ctx, d.logits, s.max_tokens)
                    finally:
                        d.ctx.close()
                    row.update(selected_layer=d.selected_layer, n_kept=d.n_kept, prefill_work=d.prefill_work,
                               kv_bytes=d.kv_bytes, kv_bytes_full=sp.kv_bytes_full,
                               kv_bytes_allocated=d.kv_bytes_allocated, shared_prefill_s=sp.prefill_s,
                               derive_s=d.derive_s, decode_tokens_per_s=dec.tokens_per_s,
                               n_generated=len(dec.tokens), output=dec.text, note=d.note, asl=d.asl, **d.extra)
                else:  # independent mode, a quantized cache, or a policy the shared prefill cannot derive
                    quantized = w.kv_type != "f16"
                    g = generate(m, s.tokens, policy=pol, max_tokens=s.max_tokens, n_threads=n_threads,
                                 type_k=w.kv_type, type_v=w.kv_type, flash_attn=quantized)
                    row.update(mode="independent", window=pol.window if pol.prunes else window,
                               selected_layer=g.selected_layer, n_kept=g.n_kept, prefill_work=g.prefill_work,
                               kv_bytes=g.kv_bytes, kv_bytes_full=g.kv_bytes_full,
                               kv_bytes_allocated=g.kv_bytes_allocated, prefill_s=g.prefill_s,
                               time_to_first_token_s=g.time_to_first_token_s,
                               decode_tokens_per_s=g.decode_tokens_per_s, n_generated=g.n_generated,
                               output=g.text, note=g.note, asl=g.asl, flash_attn=quantized)
                if row["asl"] is not None:
                    row["asl"] = {k: row["asl"][k] for k in ("ranking_layer", "triggered")}
                rows.append(row)
            del sp
            with outp.open("a", encoding="utf-8") as f:
                for r in rows:
                    r.setdefault("mode", mode)
                    r.setdefault("window", window)
                    r.update(seed=seed, n_layer=m.n_layer,
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


class _Setting(NamedTuple):
    """One row's settings for a sample (the fields a row is keyed on besides the sample)."""

    policy: str
    budget: Optional[int]
    span: Optional[str]
    tau: Optional[float]
    layer: Optional[int]
    kv_type: str
    propagate: Optional[object] = None  # N or "N:kept" (pyasl.policies.propagation)


def _n_layer(model: str) -> int:
    """A model's depth from its GGUF header (the plan needs each fixed layer before any model loads)."""
    from ..gguf_check import read_header
    from ..models import resolve_model

    n = read_header(resolve_model(model)).get("block_count")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{model}: the GGUF header has no layer count (block_count)")
    return n


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
