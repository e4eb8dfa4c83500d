"""One prefill, many policies: derive every policy's decode context from a single full-depth
layer-major prefill of a prompt (for benchmarks that compare policies on the same samples).

A `SharedPrefill` runs every layer over the whole prompt once (layer-major, window scores of every
layer captured, the hidden state after every layer kept) and saves the full KV. `derive(policy)`
then finishes the policy's own strategy (pyasl.engine.strategies) from what was saved:

- ordinary (full, snapkv, zigzag, pyramid): the saved KV, pruned by the policy's selection;
- layer-major (asl, fastkv): the policy's decisions replayed over the saved scores, layers <= L
  from the saved KV, the kept tokens' hidden states after L sent through layers L+1..N-1;
- two-pass (asl-2pass, gemfilter): the kept tokens prefilled again at their positions.

Every derived context is what the policy itself produces, since layers <= L of a layer-major
prefill do not depend on where it stops (tests check this against the strategies). What is NOT
reproduced is each policy's own prefill time: `prefill_work` (the share of layer x token work the
policy does) is reported instead, and real prefill timings come from `pyasl.generate` runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ..arch import layer_major_supported, ranked_layer_mask
from ..engine import Context, Model
from ..engine.context import _pad
from ..engine.prefill import kv_bytes, layer_major_pass
from ..engine.strategies import finish_layer_major, finish_ordinary, finish_two_pass, replay, select
from ..policies import Policy
from ..policies.options import policy_from_options

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
        n = len(tokens)
        if not 1 <= window < n:
            raise ValueError(f"window {window} must be in 1..{n - 1} (prompt of {n} tokens)")
        if window > n_batch:
            raise ValueError(f"window {window} is longer than the batch size {n_batch}")
        self.model, self.tokens, self.n = model, list(tokens), n
        self.window, self.kernel = window, kernel
        self.kw = dict(n_batch=n_batch, n_threads=n_threads, flash_attn=flash_attn)
        t0 = time.perf_counter()
        A, scores, Hs, stop, _ = layer_major_pass(model, self.tokens, window, lambda l, s: (False, None),
                                                  progress=progress, keep_all_hidden=True, **self.kw)
        try:
            assert stop is None
            self.logits = A.logits()
            self.state = A.state_get()
            info = A.kv_info()  # the pass fills the cells an ordinary prefill fills (sliding-window ones too)
            self.kv_bytes_full = kv_bytes(info, n, info.used_swa)
        finally:
            A.close()
        self.scores = scores          # (n_layer, n_head, n)
        self.hidden = Hs              # hidden[l]: input of layer l + 1, (n, n_embd)
        self.prefill_s = time.perf_counter() - t0

    def _full(self, extra: int) -> Context:
        ctx = Context(self.model, _pad(self.n + extra), **self.kw)
        try:
            ctx.state_set(self.state, n_past=self.n)
        except BaseException:
            ctx.close()
            raise
        return ctx

    def derive(self, policy, max_tokens: int = 64, **options) -> Derived:
        """The decode context `policy` would produce for this prompt (see the module doc). `policy`: a
        Policy, or a name with pyasl.generate's options (budget, tau, layer, span, ...)."""
        if not isinstance(policy, Policy):
            if policy not in SHARED_POLICIES:
                raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(SHARED_POLICIES)}")
            policy = policy_from_options(policy, **{"budget": None, "window": self.window, **options})
        if policy.name not in SHARED_POLICIES:
            raise ValueError(f"unknown policy {policy.name!r}; choose one of {', '.join(SHARED_POLICIES)}")
        model, n, N = self.model, self.n, self.model.n_layer
        if policy.prunes and policy.window != self.window:
            raise ValueError(f"the policy's window {policy.window} is not the shared prefill's {self.window}")
        t0 = time.perf_counter()
        note, sel, lb, work, extra = "", None, None, 1.0, {}
        if policy.prunes:
            policy.check_model(model)
            if policy.budget >= n:
                note = f"budget {policy.budget} >= prompt length {n}; nothing to prune (full KV)"
        strategy = policy.strategy(model) if policy.prunes and policy.budget < n else "full"
        mask = ranked_layer_mask(model, n)
        if strategy == "full":
            ctx, logits, k = self._full(max_tokens), self.logits, n
        elif strategy == "ordinary":
            sel = select(policy, self.scores, self.window, model, mask)
            ctx, k, lb = finish_ordinary(self._full(1), sel, n, max_tokens, **self.kw)
            logits = self.logits
        else:
            stop, sel = replay(policy, self.scores, model, mask)
            if strategy == "layer-major":
                H = self.hidden[stop] if stop < N - 1 else None
                pr = finish_layer_major(model, self._full(1), H, policy, sel, self.scores, stop, n, max_tokens,
                                        last_logits=self.logits, **self.kw)
                work, lb = pr.prefill_work, pr.layer_budgets
                extra = {k: v for k, v in pr.extra.items() if k == "propagated"}
            else:
                pr = finish_two_pass(model, self.tokens, sel, max_tokens, stop + 1, **self.kw)
                work = pr.prefill_work
            ctx, logits, k = pr.ctx, pr.logits, pr.n_kept
        info = ctx.kv_info()
        # sliding-window models: the saved state holds the last n_swa positions of the window layers;
        # an ordinary prefill (what `full` is) leaves its whole sliding-window cache in use
        held = kv_bytes(info, k, min(n, info.size_swa) if strategy == "full" else info.used_swa)
        if lb is not None:
            held = lb.kv_bytes(ctx)
            k = int(round(float(np.mean(lb.counts))))
            extra.update(layer_budgets=[int(c) for c in lb.counts], prompt_cells=int(lb.prompt_cells))
        asl = None
        if sel is not None and sel.asl is not None:
            asl = {"ranking_layer": sel.asl.ranking_layer, "triggered": sel.asl.triggered,
                   "variance_ratio": sel.asl.variance_ratio, "prefill": "shared"}
        if sel is not None and sel.note:
            note = sel.note
        return Derived(ctx=ctx, logits=logits, policy=policy.name, budget=policy.budget if policy.prunes else None,
                       selected_layer=None if sel is None else sel.layer, n_kept=k, prefill_work=work,
                       kv_bytes=held, kv_bytes_allocated=kv_bytes(info, info.size_base, info.size_swa),
                       derive_s=time.perf_counter() - t0, note=note, asl=asl, extra=extra)
