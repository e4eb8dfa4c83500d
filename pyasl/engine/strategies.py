"""The three prefill strategies, each written once, run for any policy object
(:mod:`pyasl.policies.base`): the prompt in, a decode context holding the pruned cache out.

* ordinary -- :func:`prefill` with window scores, :meth:`Policy.select`, the cache pruned and moved
  into a context sized to what is kept;
* layer-major -- :func:`layer_major_pass` until :meth:`Policy.decide` names the selection layer,
  then one-shot propagation of the kept tokens (:func:`propagate`) with :meth:`Policy.early_layers`
  for the layers up to it;
* two-pass -- a first pass (layer-major up to the selection layer, or ordinary up to
  :meth:`Policy.first_pass_stop`) finds the kept tokens, :func:`prefill_kept` prefills them again.

:func:`run` is what ``pyasl.generate``, Session, pyasl.Llama and the server use; the benchmark's
shared prefill (pyasl.bench.shared) replays the same decisions and finishes through the same
``finish_*`` functions.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ..arch import layer_major_supported, ranked_layer_mask
from ..policies import Policy, Selection
from ..policies.options import policy_from_options
from .context import Context, _check_int, _int32_array, _pad, kv_type_name
from .model import Model
from .prefill import (LayerBudgets, Gathered, apply_selection, kv_bytes, layer_major_pass, move_to_context,
                      prefill, prefill_kept, propagate, propagate_ranked, propagation_work, run_deeper_layers,
                      shrink_context)

Progress = Optional[Callable[[int, int], None]]


@dataclass
class Pruned:
    """A prompt prefilled and pruned by a policy: the decode context and what happened."""

    ctx: Context                      # decode context (kept cells + max_tokens), positioned after the prompt
    logits: np.ndarray                # full-depth logits of the last prompt token
    n_kept: int                       # prompt cells of the decode context
    kv_bytes_full: int                # KV bytes the whole prompt takes
    prefill_s: float                  # time to the decode context (ordinary: the prefill only)
    select_s: float = 0.0             # ordinary: selection; two-pass: the first pass's selection
    compact_s: float = 0.0            # ordinary: pruning and moving; two-pass: the second pass
    prefill_work: float = 1.0         # share of the layer x token work of a full prefill
    selection: Optional[Selection] = None
    stop_layer: Optional[int] = None  # layer-major / two-pass: the last layer the full prompt went through
    kept: Optional[np.ndarray] = None  # shared set propagated or prefilled again
    scores: Optional[np.ndarray] = None  # window scores of the layers that ran over the full prompt
    layer_budgets: Optional[LayerBudgets] = None
    strategy: str = "full"
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def selected_layer(self) -> Optional[int]:
        return None if self.selection is None else self.selection.layer

    @property
    def time_to_first_token_s(self) -> float:
        return self.prefill_s + (self.select_s + self.compact_s if self.strategy == "ordinary" else 0.0)


def select(policy: Policy, scores, window: int, model, mask) -> Selection:
    """policy.select, with the ranking layers only where some layers may not rank (a policy written
    before layer masks existed takes (scores, window, model))."""
    if mask is None:
        return policy.select(scores, window, model)
    return policy.select(scores, window, model, layer_mask=mask)


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def check_prompt(model: Model, tokens, policy: Policy, max_tokens: int, n_ctx: Optional[int], n_batch: int,
                 n_threads: Optional[int]) -> tuple[bool, str]:
    """Validate a request; returns (prune, note): whether the policy prunes this prompt at all, and why not."""
    n = len(tokens)
    if n == 0:
        raise ValueError("empty prompt")
    _check_int("max_tokens", max_tokens, 1, 1 << 24)
    _check_int("n_batch", n_batch, 1, 1 << 20)
    if n_threads is not None:
        _check_int("n_threads", n_threads, 1, 4096)
    toks = _int32_array(tokens, "tokens")
    if toks.ndim != 1 or int(toks.min()) < 0 or int(toks.max()) >= model.n_vocab:
        raise ValueError(f"tokens must be a list of token ids in 0..{model.n_vocab - 1}")
    if n_ctx is not None and n > n_ctx:
        raise ValueError(f"the prompt has {n} tokens, more than the context size --ctx {n_ctx}")
    if n > model.n_ctx_train:
        raise ValueError(f"the prompt has {n} tokens, more than the model's training context {model.n_ctx_train}")
    if not policy.prunes:
        return False, ""
    if policy.window > n_batch:
        raise ValueError(f"window {policy.window} is longer than the batch size {n_batch}")
    if policy.window >= n:
        return False, f"the prompt ({n} tokens) is not longer than the window ({policy.window}); nothing to prune"
    if policy.budget >= n:
        return False, f"budget {policy.budget} >= prompt length {n}; nothing to prune (full KV)"
    return True, ""


def run(model: Model, tokens: list[int], policy: Policy, max_tokens: int = 128, n_ctx: Optional[int] = None,
        n_batch: int = 512, n_threads: Optional[int] = None, flash_attn: bool = False,
        progress: Progress = None, type_k="f16", type_v="f16") -> Pruned:
    """Prefill `tokens` with `policy`'s strategy and prune: a decode context with room for
    `max_tokens`. type_k, type_v: KV cache types (context.KV_TYPES; a quantized V needs flash_attn).
    Raises ValueError for bad input or a policy the model cannot run."""
    prune, note = check_prompt(model, tokens, policy, max_tokens, n_ctx, n_batch, n_threads)
    kw = dict(n_batch=n_batch, n_threads=n_threads, flash_attn=flash_attn, type_k=kv_type_name(type_k),
              type_v=kv_type_name(type_v))
    n = len(tokens)
    mask = ranked_layer_mask(model, n)
    if prune:
        policy.check_model(model)
        policy.check_prompt(model, mask)
        strategy = policy.strategy(model)
        why = layer_major_supported(model)
        if strategy == "ordinary" and why and getattr(policy, "prefill_mode", None) == "auto":
            note = f"ordinary prefill ({why})"
    else:
        strategy = "full"
    if strategy == "full":
        return _run_full(model, tokens, max_tokens, n_ctx, note, progress, **kw)
    if strategy == "ordinary":
        return _run_ordinary(model, tokens, policy, max_tokens, n_ctx, mask, note, progress, **kw)
    if strategy == "layer-major":
        return _run_layer_major(model, tokens, policy, max_tokens, mask, note, progress, **kw)
    return _run_two_pass(model, tokens, policy, max_tokens, n_ctx, mask, note, progress, **kw)


def _run_full(model, tokens, max_tokens, n_ctx, note, progress, **kw) -> Pruned:
    n = len(tokens)
    ctx = Context(model, max(n_ctx or 0, _pad(n + max_tokens)), **kw)
    try:
        pf = prefill(ctx, tokens, progress=progress)
    except BaseException:
        ctx.close()
        raise
    info = ctx.kv_info()
    return Pruned(ctx=ctx, logits=pf.logits, n_kept=n, kv_bytes_full=kv_bytes(info, n, info.used_swa),
                  prefill_s=pf.seconds, note=note)


def _run_ordinary(model, tokens, policy: Policy, max_tokens, n_ctx, mask, note, progress, **kw) -> Pruned:
    n = len(tokens)
    ctx = Context(model, max(n_ctx or 0, _pad(n + 1)), capture=True, **kw)
    if ctx.kv_info().n_layer_base == 0:
        ctx.close()
        note = _join(note, "every layer uses the sliding window (no full-context KV cache): nothing to prune "
                           "(full KV)")
        return _run_full(model, tokens, max_tokens, n_ctx, note, progress, **kw)
    try:
        pf = prefill(ctx, tokens, window=policy.window, progress=progress, score=policy.score)
        info = ctx.kv_info()
        full = kv_bytes(info, n, info.used_swa)
        t0 = time.perf_counter()
        sel = select(policy, pf.scores, policy.window, model, mask)
        t_sel = time.perf_counter() - t0
    except BaseException:
        ctx.close()
        raise
    t0 = time.perf_counter()
    ctx, n_kept, lb = finish_ordinary(ctx, sel, n, max_tokens, **kw)
    out = Pruned(ctx=ctx, logits=pf.logits, n_kept=n_kept, kv_bytes_full=full, prefill_s=pf.seconds, select_s=t_sel,
                 compact_s=time.perf_counter() - t0, selection=sel, scores=pf.scores, layer_budgets=lb,
                 strategy="ordinary", note=_join(note, sel.note))
    return out


def finish_ordinary(ctx: Context, sel: Selection, n: int, max_tokens: int, **kw):
    """Prune ctx (the full prompt's KV) to `sel` and move it into a context of the kept cells +
    max_tokens. Returns (context, prompt cells, LayerBudgets or None). Closes ctx."""
    try:
        lb = apply_selection(ctx, sel)
    except BaseException:
        ctx.close()
        raise
    if lb is not None:  # per-layer counts are set again on the new context
        return move_to_context(ctx, n, lb.prompt_cells + max_tokens, **kw), lb.prompt_cells, lb
    n_kept = sel.n_kept or n
    return shrink_context(ctx, n_kept, n, max_tokens, n_batch=kw.get("n_batch")), n_kept, None


def replay(policy: Policy, scores: np.ndarray, model: Model, mask) -> tuple[int, Selection]:
    """The decision a layer-major pass over these scores would take: (stop layer, shared selection)."""
    for l in range(model.n_layer):
        sel = policy.decide(l, scores, model, mask)
        if sel is not None:
            return l, sel
    return model.n_layer - 1, policy.decide_last(scores, model, mask)


def _layer_major_first(model, tokens, policy: Policy, mask, progress, keep_all_hidden=False, on_layer=None,
                       one_layer_kv=False, **kw):
    """A layer-major pass that stops at the policy's selection layer: (A, scores, hidden states, stop,
    selection); on_layer, one_layer_kv: see :func:`layer_major_pass`."""
    _check_int("window", policy.window, 1, min(len(tokens) - 1, kw["n_batch"]) if len(tokens) > 1 else 0)
    if policy.score != "attention":
        raise ValueError(f"a layer-major pass captures attention scores, not the {policy.score} scores of "
                         f"policy {policy.name}")
    l_min = getattr(policy, "l_min", None)
    if l_min is not None and not 0 <= l_min < model.n_layer:
        raise ValueError(f"l_min {l_min} is outside the model's layers 0..{model.n_layer - 1}")
    A, scores, Hs, stop, sel = layer_major_pass(model, tokens, policy.window,
                                                lambda l, s: _decided(policy.decide(l, s, model, mask)),
                                                progress=progress, keep_all_hidden=keep_all_hidden, on_layer=on_layer,
                                                one_layer_kv=one_layer_kv, **kw)
    if stop is None:  # the policy never stopped: every layer ran
        stop = model.n_layer - 1
        try:
            sel = policy.decide_last(scores, model, mask)
        except BaseException:
            A.close()
            raise
    return A, scores, Hs, stop, sel


def _decided(sel: Optional[Selection]):
    return sel is not None, sel


def _run_layer_major(model, tokens, policy: Policy, max_tokens, mask, note, progress, **kw) -> Pruned:
    if policy.streams_early_layers(model):
        return _run_layer_major_streamed(model, tokens, policy, max_tokens, mask, note, progress, **kw)
    t0 = time.perf_counter()
    n = len(tokens)
    A, scores, Hs, stop, sel = _layer_major_first(model, tokens, policy, mask, progress, **kw)
    info = A.kv_info()
    full = kv_bytes(info, n, info.used_swa)  # as an ordinary prefill: it fills the same cells
    H = Hs[-1] if Hs else None
    out = finish_layer_major(model, A, H, policy, sel, scores, stop, n, max_tokens, **kw)
    out.kv_bytes_full, out.prefill_s, out.note = full, time.perf_counter() - t0, _join(note, sel.note)
    return out


def _run_layer_major_streamed(model, tokens, policy: Policy, max_tokens, mask, note, progress, **kw) -> Pruned:
    """The layer-major strategy pruning as it goes, for a policy whose layers up to the selection layer
    keep sets chosen from their own scores (Policy.streams_early_layers): the pass runs in a scratch
    context storing one layer of K/V; after layer l ran, its kept rows move into the decode context
    (budget + max_tokens cells) before layer l + 1 overwrites the scratch. Past the selection layer the
    scratch is freed and the kept tokens go through the deeper layers in the decode context. The KV
    held at the peak is one layer of the full prompt plus the kept cells of every layer; the
    decode context equals :func:`finish_layer_major`'s."""
    t0 = time.perf_counter()
    n, N = len(tokens), model.n_layer
    k = policy.budget
    g = Gathered(model, k, max_tokens, **kw)

    def prune_layer(l: int, A: Context, scores: np.ndarray) -> None:
        sets = policy.early_layer_set(scores[l], model)
        if sets.shape[1] != k:
            raise RuntimeError(f"layer {l} keeps {sets.shape[1]} tokens per head, not the budget {k}")
        g.layer(A, l, sets)

    with g:
        A, scores, Hs, stop, sel = _layer_major_first(model, tokens, policy, mask, progress, on_layer=prune_layer,
                                                        one_layer_kv=True, **kw)
        try:
            logits = A.logits() if stop == N - 1 else None
        finally:
            A.close()
        kept = None if sel.shared is None else np.asarray(sel.shared)  # None: per-head sets in every layer (SnapKV)
        if kept is not None and len(kept) != k:
            raise RuntimeError(f"the selection keeps {len(kept)} tokens, not the budget {k}")
        n_prop = 0
        if stop < N - 1:  # one-shot propagation: the kept tokens through layers stop+1..N-1 into cells 0..k-1
            prop = policy.propagated(scores[: stop + 1], kept, model)
            n_prop = len(prop)
            if n_prop > k:  # wider: each deeper layer keeps its own sets of the propagated tokens
                logits = propagate_ranked(g, Hs[-1], prop, stop, n, policy.window,
                                          _deep_sets(policy, prop, kept, model, n), **kw)
                g.done()
            else:  # the deeper layers' decode gives cells 0..k-1 the kept positions
                logits = run_deeper_layers(g.ctx, Hs[-1], kept, stop + 1)
        else:  # every layer ran over the whole prompt: the cells get the positions kv_keep_per_head gives
            g.done()
    D = g.ctx
    work = propagation_work(stop, n, n_prop, N)
    info = D.kv_info()
    return Pruned(ctx=D, logits=logits, n_kept=k, kv_bytes_full=kv_bytes(info, n, 0), prefill_s=time.perf_counter() - t0,
                  prefill_work=work, selection=sel, stop_layer=stop, kept=kept, scores=scores[: stop + 1],
                  strategy="layer-major", note=_join(note, sel.note),
                  extra={"scratch_kv": "one layer", **({"propagated": n_prop} if n_prop > k else {})})


def finish_layer_major(model, A: Context, H: Optional[np.ndarray], policy: Policy, sel: Selection, scores, stop: int,
                       n: int, max_tokens: int, last_logits: Optional[np.ndarray] = None, **kw) -> Pruned:
    """One-shot propagation of `sel`'s kept tokens after layer `stop` (A: the full KV of layers
    0..stop, H: the input of layer stop + 1). A selection without a shared set (SnapKV: every
    layer's own per-head sets, every layer ran) prunes A as an ordinary prefill would. Closes A."""
    N = model.n_layer
    if sel.shared is None:
        if stop != N - 1:
            A.close()
            raise RuntimeError(f"a per-head selection at layer {stop} leaves nothing to propagate past it")
        logits = A.logits() if last_logits is None else last_logits
        B, cells, lb = finish_ordinary(A, sel, n, max_tokens, **kw)
        return Pruned(ctx=B, logits=logits, n_kept=cells, kv_bytes_full=0, prefill_s=0.0, selection=sel, stop_layer=stop,
                      scores=scores, layer_budgets=lb, strategy="layer-major")
    kept = [int(x) for x in sel.shared]
    try:
        early = policy.early_layers(scores[: stop + 1], np.asarray(kept), model)
        prop = policy.propagated(scores[: stop + 1], kept, model) if stop < N - 1 else np.asarray(kept)
    except BaseException:
        A.close()
        raise
    if len(prop) > len(kept):
        return _finish_wide(model, A, H, policy, sel, early, prop, scores, stop, n, max_tokens, **kw)
    B, logits, lb, n_prop = propagate(model, A, H, kept, early, stop, n, max_tokens, last_logits=last_logits, **kw)
    cells = len(kept) if lb is None else lb.prompt_cells  # prompt cells of the decode context
    work = propagation_work(stop, n, n_prop, N)
    return Pruned(ctx=B, logits=logits, n_kept=cells, kv_bytes_full=0, prefill_s=0.0, prefill_work=work,
                  selection=sel, stop_layer=stop, kept=np.asarray(kept), scores=scores[: stop + 1], layer_budgets=lb,
                  strategy="layer-major")


def _deep_sets(policy: Policy, prop, kept, model, n: int):
    """The deeper layers' choice of the propagated tokens `prop` (indices into prop, per KV head)."""
    kept_idx = np.searchsorted(np.asarray(prop), np.asarray(kept))
    keep = policy.propagation_for(model, n)[1]
    return lambda scores: policy.deep_layer_set(scores, kept_idx, model, keep)


def _finish_wide(model, A: Context, H: np.ndarray, policy: Policy, sel: Selection, early: Selection, prop, scores,
                 stop: int, n: int, max_tokens: int, **kw) -> Pruned:
    """finish_layer_major with more tokens propagated than kept (pyasl.policies.propagation): layers
    0..stop keep `early`'s sets of A's full KV, the deeper ones their choice of `prop`. Closes A."""
    k = policy.budget
    with Gathered(model, k, max_tokens, **kw) as g:
        try:
            for l in range(stop + 1):
                g.layer(A, l, early.per_head[l])
        finally:
            A.close()
        logits = propagate_ranked(g, H, prop, stop, n, policy.window,
                                  _deep_sets(policy, prop, sel.shared, model, n), **kw)
        D = g.done()
    return Pruned(ctx=D, logits=logits, n_kept=k, kv_bytes_full=0, prefill_s=0.0,
                  prefill_work=propagation_work(stop, n, len(prop), model.n_layer), selection=sel, stop_layer=stop,
                  kept=np.asarray(sel.shared), scores=scores[: stop + 1], strategy="layer-major",
                  extra={"propagated": len(prop)})


def _run_two_pass(model, tokens, policy: Policy, max_tokens, n_ctx, mask, note, progress, **kw) -> Pruned:
    t0 = time.perf_counter()
    n, N = len(tokens), model.n_layer
    if policy.first_pass(model) == "layer-major":
        # the first pass's K/V is thrown away: its scratch stores one layer
        A, scores, _, stop, sel = _layer_major_first(model, tokens, policy, mask, progress, one_layer_kv=True, **kw)
        used_swa = A.kv_info().used_swa
        A.close()
        layers = stop + 1
        t_sel = 0.0
    else:
        stop_at = policy.first_pass_stop(model)
        with Context(model, max(n_ctx or 0, _pad(n + 1)), capture=True, **kw) as ctx:
            pf = prefill(ctx, tokens, window=policy.window, progress=progress, stop_layer=stop_at, score=policy.score)
            used_swa = ctx.kv_info().used_swa
        scores = pf.scores
        t1 = time.perf_counter()
        sel = select(policy, scores, policy.window, model, mask)
        t_sel = time.perf_counter() - t1
        stop = stop_at if stop_at is not None else N - 1
        layers = N if stop_at is None else stop_at + 1
    t1 = time.perf_counter()
    out = finish_two_pass(model, tokens, sel, max_tokens, layers, renumber=policy.renumbers_positions, **kw)
    out.compact_s, out.select_s = time.perf_counter() - t1, t_sel
    info = out.ctx.kv_info()  # the bytes of a cell of every layer (a one-layer scratch stores fewer)
    out.kv_bytes_full = kv_bytes(info, n, used_swa)
    out.prefill_s, out.stop_layer, out.scores = time.perf_counter() - t0, stop, scores[: stop + 1]
    out.note = _join(note, sel.note)
    return out


def finish_two_pass(model, tokens, sel: Selection, max_tokens: int, first_pass_layers: int, renumber: bool = False,
                    **kw) -> Pruned:
    """The second pass: only `sel`'s kept tokens, at their positions (renumber: at 0..k-1), through
    every layer; the work counts the first pass's layers over every token too."""
    ctx = prefill_kept(model, tokens, sel.shared, max_tokens, renumber=renumber, **kw)
    n, N, k = len(tokens), model.n_layer, len(sel.shared)
    return Pruned(ctx=ctx, logits=ctx.logits(), n_kept=k, kv_bytes_full=0, prefill_s=0.0,
                  prefill_work=(first_pass_layers * n + N * k) / (N * n), selection=sel,
                  kept=np.asarray(sel.shared), strategy="two-pass")


# ---- the pruned prefill of a conversation (Session, pyasl.Llama) -----------------------------------
@dataclass
class PrunedPrefill:
    """A policy's prefill as llama.cpp state bytes (loaded into a session's or a Llama's context)."""

    state: bytes
    n_tokens: int            # tokens prefilled (the next position)
    n_kept: int              # cells kept
    selected_layer: Optional[int]
    seconds: float
    note: str = ""
    layer_cells: Optional[np.ndarray] = None  # per-layer budgets: set them after loading the state
    reprefilled: bool = False  # the kept tokens were prefilled again as a prompt of their own


def check_continuable(policy: Policy) -> None:
    """Raise ValueError for a policy a conversation cannot continue after (Session, pyasl.Llama, the
    server): one that renumbers the kept tokens' positions."""
    if policy.renumbers_positions:
        raise ValueError(f"policy {policy.name} prefills the kept tokens again as a new prompt (positions "
                         "0..k-1), a benchmark baseline that a conversation cannot continue after; use gemfilter")


def prefill_state(model: Model, tokens: list[int], policy: Policy, n_threads: Optional[int] = None,
                  flash_attn: bool = False, n_batch: int = 512, progress: Progress = None, type_k="f16",
                  type_v="f16") -> PrunedPrefill:
    """Prefill and prune `tokens` with `policy`; the result as state bytes (see PrunedPrefill)."""
    check_continuable(policy)
    t0 = time.perf_counter()
    pr = run(model, tokens, policy, max_tokens=1, n_batch=n_batch, n_threads=n_threads, flash_attn=flash_attn,
             progress=progress, type_k=type_k, type_v=type_v)
    pruned = pr.selection is not None
    return PrunedPrefill(state=pr.ctx.take_state(), n_tokens=len(tokens), n_kept=pr.n_kept,
                         selected_layer=pr.selected_layer if pruned else None, seconds=time.perf_counter() - t0,
                         note=pr.note, layer_cells=None if pr.layer_budgets is None else pr.layer_budgets.counts)


def layer_major_prefill(model: Model, tokens: list[int], policy, budget: Optional[int] = None, window: int = 32,
                        tau: Optional[float] = None, l_min: Optional[int] = None, l_obs: Optional[int] = None, kernel: int = 7,
                        layer: Optional[int] = None, max_tokens: int = 128, n_batch: int = 512,
                        n_threads: Optional[int] = None, flash_attn: bool = False, progress: Progress = None,
                        layer_budgets: Optional[str] = None, budget_opts: Optional[dict] = None,
                        span=None, propagate=None) -> Pruned:
    """The layer-major strategy of asl or fastkv (or the layer-major first pass of asl-2pass and its
    second pass), whatever the budget (a budget >= the prompt propagates every token). `policy`: a
    Policy, or a name with generate's options."""
    why = layer_major_supported(model)
    if why:
        raise ValueError(why)
    name = policy.name if isinstance(policy, Policy) else policy
    if name not in ("asl", "fastkv", "asl-2pass"):
        raise ValueError(f"layer-major prefill runs asl, fastkv or asl-2pass, not {name!r}")
    if not isinstance(policy, Policy):
        # generate refuses layer budgets for fastkv; the layer-major strategy runs them (tests, experiments)
        policy = policy_from_options(name, budget=budget, window=window, tau=tau, l_min=l_min, l_obs=l_obs,
                                     kernel=kernel, layer=layer, span=span, propagate=propagate,
                                     layer_budgets=layer_budgets if name == "asl" else None, budget_opts=budget_opts)
        if layer_budgets and name == "fastkv":
            policy = policy.replace(layer_budgets=layer_budgets, **(budget_opts or {}))
    kw = dict(n_batch=n_batch, n_threads=n_threads, flash_attn=flash_attn)
    n = len(tokens)
    mask = ranked_layer_mask(model, n)
    policy.check_model(model)
    policy.check_prompt(model, mask)
    if policy.name == "asl-2pass":
        return _run_two_pass(model, tokens, policy, max_tokens, None, mask, "", progress, **kw)
    return _run_layer_major(model, tokens, policy, max_tokens, mask, "", progress, **kw)
