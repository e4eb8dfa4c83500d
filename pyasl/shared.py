"""One prefill, many policies: derive every policy's decode context from a single full-depth
layer-major prefill of a prompt (for benchmarks that compare policies on the same samples).

A `SharedPrefill` runs every layer over the whole prompt once (layer-major, window scores of every
layer captured, the hidden state after every layer kept) and saves the full KV. `derive(policy,
budget)` then builds the decode context that `engine.generate(policy=...)` would have built:

- full: the saved KV as it is;
- snapkv: the saved KV, pruned per layer and KV head;
- zigzag / pyramid: the saved KV, pruned per layer and KV head to per-layer budgets (pyasl.budgets);
- asl / fastkv: layers <= L from the saved KV (SnapKV per head), the kept tokens' hidden states
  after L sent through layers L+1..N-1 (one-shot propagation, the same code as layer-major prefill);
- asl-2pass / gemfilter: the kept tokens prefilled again at their positions.

Every derived context is what the policy itself produces, since layers <= L of a layer-major
prefill do not depend on where it stops (tests check this against engine.layer_major_prefill and
engine.generate). What is NOT reproduced is each policy's own prefill time: `prefill_work` (the
share of layer x token work the policy does) is reported instead, and real prefill timings come
from `engine.generate` runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from . import policies as P
from .engine import (Context, Model, _kv_bytes, _layer_major_pass, _one_shot, _pad, layer_major_supported,
                     prefill_kept, shrink_context)

SHARED_POLICIES = ("full", "snapkv", "zigzag", "pyramid", "asl", "fastkv", "asl-2pass", "gemfilter")


@dataclass
class Derived:
    ctx: Context              # decode context, positioned after the prompt
    logits: np.ndarray        # full-depth logits of the last prompt token
    policy: str
    budget: Optional[int]
    selected_layer: Optional[int]
    n_kept: int
    prefill_work: float
    kv_bytes: int
    kv_bytes_allocated: int
    derive_s: float
    note: str = ""
    asl: Optional[dict] = None
    extra: dict = field(default_factory=dict)


class SharedPrefill:
    """A full-depth layer-major prefill kept in memory (KV state, per-layer scores and hidden
    states: n_layer * n_prompt * n_embd floats) from which policies are derived."""

    def __init__(self, model: Model, tokens: list[int], window: int = 32, kernel: int = 7, n_batch: int = 512,
                 n_threads: Optional[int] = None, flash_attn: bool = False,
                 progress: Optional[Callable[[int, int], None]] = None):
        why = layer_major_supported(model)
        if why:
            raise ValueError(why)
        if model.n_swa > 0:
            raise ValueError("the shared prefill does not handle sliding-window models yet")
        n = len(tokens)
        if not 1 <= window < n:
            raise ValueError(f"window {window} must be in 1..{n - 1} (prompt of {n} tokens)")
        if window > n_batch:
            raise ValueError(f"window {window} is longer than the batch size {n_batch}")
        self.model, self.tokens, self.n = model, list(tokens), n
        self.window, self.kernel = window, kernel
        self.n_batch, self.n_threads, self.flash_attn = n_batch, n_threads, flash_attn
        t0 = time.perf_counter()
        A, scores, Hs, stop, _ = _layer_major_pass(model, self.tokens, window, lambda l, s: (False, None),
                                                   n_batch=n_batch, n_threads=n_threads, flash_attn=flash_attn,
                                                   progress=progress, keep_all_hidden=True)
        try:
            assert stop is None
            self.logits = A.logits()
            self.state = A.state_get()
            self.kv_bytes_full = _kv_bytes(A.kv_info(), n, 0)
        finally:
            A.close()
        self.scores = scores          # (n_layer, n_head, n)
        self.hidden = Hs              # hidden[l]: input of layer l + 1, (n, n_embd)
        self.prefill_s = time.perf_counter() - t0

    # ---- contexts -------------------------------------------------------------------------
    def _full(self, extra: int) -> Context:
        ctx = Context(self.model, _pad(self.n + extra), n_batch=self.n_batch, n_threads=self.n_threads,
                      flash_attn=self.flash_attn)
        try:
            ctx.state_set(self.state, n_past=self.n)
        except BaseException:
            ctx.close()
            raise
        return ctx

    def _kept_at(self, layer: int, budget: int, span) -> np.ndarray:
        return P.asl_select_at_layer(self.scores[: layer + 1], window=self.window, budget=budget, layer=layer,
                                     kernel=self.kernel, span=span)

    def derive(self, policy: str, budget: Optional[int] = None, max_tokens: int = 64, tau: float = 0.3,
               l_min: Optional[int] = None, l_obs: Optional[int] = None, layer: Optional[int] = None,
               budget_opts: Optional[dict] = None, span=None) -> Derived:
        """The decode context `policy` at `budget` with the span stage `span` (pyasl.spans) would
        produce for this prompt (see the module doc)."""
        if policy not in SHARED_POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(SHARED_POLICIES)}")
        model, n, N, W = self.model, self.n, self.model.n_layer, self.window
        t0 = time.perf_counter()
        note, asl, selected, kv_held, extra = "", None, None, None, {}
        if policy != "full":
            if budget is None:
                raise ValueError(f"policy {policy} needs a budget")
            if budget <= W:
                raise ValueError(f"budget {budget} must be larger than the window {W}")
            if policy in ("fastkv", "gemfilter") and (layer is None or not 0 <= layer < N):
                raise ValueError(f"policy {policy} needs a selection layer in 0..{N - 1}")
            if budget >= n:
                note = f"budget {budget} >= prompt length {n}; nothing to prune (full KV)"
        if policy == "full" or budget >= n:
            ctx, logits, k, work = self._full(max_tokens), self.logits, n, 1.0
        elif policy == "snapkv":
            sets = P.snapkv_select_all(self.scores, window=W, budget=budget, n_head_kv=model.n_head_kv,
                                       kernel=self.kernel, span=span)
            ctx = self._full(1)
            ctx.kv_keep_per_head(sets)
            ctx = shrink_context(ctx, budget, n, max_tokens)
            logits, k, work = self.logits, sets.shape[-1], 1.0
        elif policy in ("zigzag", "pyramid"):
            from . import budgets as BG

            ctx = self._full(1)
            try:
                lb = BG.apply_layer_budgets(ctx, self.scores, policy, budget, W, kernel=self.kernel, span=span,
                                            **(budget_opts or {}))
            except BaseException:
                ctx.close()
                raise
            ctx = BG.move_to_context(ctx, n, lb.prompt_cells + max_tokens, n_batch=self.n_batch,
                                     n_threads=self.n_threads, flash_attn=self.flash_attn)
            logits, work = self.logits, 1.0
            k = int(round(float(np.mean(lb.counts))))
            kv_held = BG.kv_bytes(ctx, lb.counts)
            extra = {"layer_budgets": [int(c) for c in lb.counts], "prompt_cells": int(lb.prompt_cells)}
        else:
            if policy in ("asl", "asl-2pass"):
                sel = P.asl_select(self.scores, window=W, budget=budget, tau=tau, l_min=l_min, l_obs=l_obs,
                                   kernel=self.kernel, span=span)
                stop = N - 1 if sel.selected_layer is None else sel.selected_layer
                kept, selected = sel.kept, sel.selected_layer
                note = sel.note
                asl = {"ranking_layer": sel.ranking_layer, "triggered": sel.triggered,
                       "variance_ratio": sel.variance_ratio, "prefill": "shared"}
            else:
                stop = selected = layer
                kept = self._kept_at(layer, budget, span)
            kept_l = [int(x) for x in kept]
            k = len(kept_l)
            if policy in ("asl", "fastkv"):
                H = self.hidden[stop] if stop < N - 1 else None
                ctx, logits, _, n_prop = _one_shot(model, self._full(1), H, kept_l, self.scores, stop, n, budget=budget,
                                        window=W, kernel=self.kernel, max_tokens=max_tokens, n_batch=self.n_batch,
                                        n_threads=self.n_threads, flash_attn=self.flash_attn,
                                        last_logits=self.logits, span=span)
                work = ((stop + 1) * n + (N - stop - 1) * n_prop) / (N * n)
            else:
                ctx = prefill_kept(model, self.tokens, kept_l, max_tokens, n_batch=self.n_batch,
                                   n_threads=self.n_threads, flash_attn=self.flash_attn)
                logits = ctx.logits()
                work = ((stop + 1) * n + N * k) / (N * n)
        info = ctx.kv_info()
        return Derived(ctx=ctx, logits=logits, policy=policy, budget=None if policy == "full" else budget,
                       selected_layer=selected, n_kept=k, prefill_work=work,
                       kv_bytes=_kv_bytes(info, k, info.used_swa) if kv_held is None else kv_held,
                       kv_bytes_allocated=_kv_bytes(info, info.size_base, info.size_swa),
                       derive_s=time.perf_counter() - t0, note=note, asl=asl, extra=extra)
