"""One-shot generation: prefill a prompt with a policy, prune, decode greedily (``pyasl generate``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import numpy as np

from .engine.decode import greedy_decode
from .engine.model import Model
from .engine.prefill import kv_bytes
from .engine.strategies import run
from .policies import Policy
from .policies.options import policy_from_options


@dataclass
class GenerateResult:
    text: str
    policy: str
    n_prompt: int
    n_generated: int
    selected_layer: Optional[int]
    n_kept: int
    kv_bytes_full: int
    kv_bytes: int
    kv_bytes_allocated: int
    prefill_s: float
    prefill_work: float
    select_s: float
    compact_s: float
    time_to_first_token_s: float
    decode_s: float
    decode_tokens_per_s: float
    window: int
    budget: Optional[int]
    tokens: list[int] = field(default_factory=list)
    note: str = ""
    asl: Optional[dict] = None
    layer_budgets: Optional[dict] = None  # per-layer budgets (zigzag, pyramid, asl --layer-budgets)
    span: str = "token"                    # the span stage of every selection (pyasl.policies.spans)
    propagated: Optional[int] = None       # tokens run past the selection layer, when more than kept (propagate)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d.pop("tokens")
        return d


def generate(model: Model, tokens: list[int], policy: Union[str, Policy] = "asl", budget: Optional[int] = 512,
             window: int = 32, tau: Optional[float] = None, l_min: Optional[int] = None, l_obs: Optional[int] = None,
             kernel: int = 7, max_tokens: int = 128, n_ctx: Optional[int] = None, n_threads: Optional[int] = None,
             flash_attn: bool = False, n_batch: int = 512, ignore_eos: bool = False, layer: Optional[int] = None,
             prefill_mode: str = "auto", progress: Optional[Callable[[int, int], None]] = None,
             on_text: Optional[Callable[[str], None]] = None, layer_budgets: Optional[str] = None,
             budget_opts: Optional[dict] = None, span=None, type_k="f16", type_v="f16",
             propagate=None) -> GenerateResult:
    """Prefill `tokens`, prune the KV cache with `policy`, then decode greedily.

    `policy` is a Policy object (pyasl.ASL(budget=512), ...) or a name whose options are the other
    keyword arguments: full; snapkv (per-layer, per-KV-head top-k); asl (selection layer by rank
    variance; prefill_mode auto|layer-major|ordinary, layer_budgets zigzag|pyramid|uniform);
    fastkv (a fixed selection `layer`, default: depth-scaled); asl-2pass and gemfilter (select at
    the ASL layer / at `layer`, then prefill only the kept tokens at their original positions);
    gemfilter-published (GemFilter's own scores, the kept tokens prefilled again as a new prompt);
    zigzag and pyramid (per-layer budgets; budget_opts: theta, b_min_frac, beta). span: how every
    selection turns scores into kept positions (token, forward:S, around:B+S, chunk:C). type_k, type_v: KV cache
    types (f16, q8_0, q4_0, ...; a quantized V needs flash_attn), as llama.cpp's -ctk / -ctv. propagate
    (asl, fastkv): tokens sent on past the selection layer, each deeper layer keeping `budget` of them.
    """
    pol = policy if isinstance(policy, Policy) else policy_from_options(
        policy, budget=budget, window=window, tau=tau, l_min=l_min, l_obs=l_obs, kernel=kernel, layer=layer,
        prefill_mode=prefill_mode, layer_budgets=layer_budgets, budget_opts=budget_opts, span=span,
        propagate=propagate)
    pr = run(model, tokens, pol, max_tokens=max_tokens, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
             flash_attn=flash_attn, progress=progress, type_k=type_k, type_v=type_v)
    ctx = pr.ctx
    try:
        info = ctx.kv_info()
        n_kept, kv_kept, lb_json = pr.n_kept, kv_bytes(info, pr.n_kept, info.used_swa), None
        if pr.layer_budgets is not None:
            # the K/V rows the layers keep (sum of the per-layer budgets); the decode context allocates
            # max_l B_l prompt cells (+ the generation) in every layer: kv_bytes_allocated
            kv_kept = pr.layer_budgets.kv_bytes(ctx)
            lb_json = pr.layer_budgets.to_json(ctx.kv_layer_cell_bytes())
            n_kept = int(round(float(np.mean(pr.layer_budgets.counts))))
        kv_alloc = kv_bytes(info, info.size_base, info.size_swa)
        dec = greedy_decode(model, ctx, pr.logits, max_tokens, ignore_eos=ignore_eos, on_text=on_text)
    finally:
        ctx.close()
    sel = pr.selection
    asl = None
    if sel is not None and sel.asl is not None:
        lm = pr.strategy == "layer-major" or (pr.strategy == "two-pass" and pol.first_pass(model) == "layer-major")
        asl = {"ranking_layer": sel.asl.ranking_layer, "triggered": sel.asl.triggered,
               "variance_ratio": sel.asl.variance_ratio, "prefill": "layer-major" if lm else "ordinary"}
    steps = max(0, len(dec.tokens) - 1)
    return GenerateResult(
        text=dec.text, policy=pol.name, n_prompt=len(tokens), n_generated=len(dec.tokens),
        selected_layer=pr.selected_layer, n_kept=n_kept, kv_bytes_full=pr.kv_bytes_full, kv_bytes=kv_kept,
        kv_bytes_allocated=kv_alloc, prefill_s=pr.prefill_s,
        prefill_work=pr.prefill_work, select_s=pr.select_s, compact_s=pr.compact_s,
        time_to_first_token_s=pr.time_to_first_token_s, decode_s=dec.seconds,
        decode_tokens_per_s=(steps / dec.seconds) if dec.seconds > 0 and steps else 0.0,
        window=pol.window if pol.prunes else window, budget=pol.budget if pol.prunes else None, tokens=dec.tokens,
        note="; ".join(x for x in (pr.note, dec.note) if x), asl=asl, layer_budgets=lb_json, span=str(pol.span),
        propagated=pr.extra.get("propagated"))
