"""`pyasl inspect`: per-layer window-attention scores, the ASL decision and what a policy keeps."""
from __future__ import annotations

import json

import click

from .common import check_text, fail, load_model, model_options, policy_options, prompt_tokens, read_prompt, \
    user_errors


@click.command()
@model_options
@policy_options(budget_default=None, asl_layers=True, layer_budgets=True,
                budget_help="KV cells kept; also select_k of the variance (default min(512, n))",
                policy_help="whose selection layer, kept spans and per-layer budgets to report")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def inspect(model, prompt, prompt_file, raw, system, threads, flash_attn, verbose, policy, as_json):
    """Per-layer window-attention scores and the ASL decision for a prompt (no generation)."""
    from ...arch import ranked_layer_mask
    from ...calibration import DEFAULT_TAU
    from ...engine import Context, prefill
    from ...policies import inspect_layers
    from ...policies.fixed_layer import FIXED_LAYER_POLICIES
    from ...policies.spans import runs

    text = read_prompt(prompt, prompt_file)
    check_text(system, "--system")
    window, method = policy.window, policy.budget_method
    try:
        probe = policy.build(budget=max(window + 1, policy.budget or 0))  # bad options fail before the prefill
        window = probe.window  # gemfilter-published: its own (1)
        m = load_model(model, verbose)
        toks = prompt_tokens(m, text, raw, system)
        n = len(toks)
        if window >= n:
            raise ValueError(f"window {window} must be shorter than the prompt ({n} tokens)")
        if n > m.n_ctx_train:
            raise ValueError(f"the prompt has {n} tokens, more than the model's training context {m.n_ctx_train}")
        if window > 512:
            raise ValueError("window must be <= 512 (the batch size)")
        with Context(m, ((n + 255) // 256) * 256, n_threads=threads, flash_attn=flash_attn, capture=True) as ctx:
            pf = prefill(ctx, toks, window=window, score=probe.score)
        if policy.budget is not None and policy.budget <= window:
            raise ValueError(f"budget {policy.budget} must be larger than the window {window}")
        mask = ranked_layer_mask(m, n)
        budget = policy.budget if policy.budget is not None else min(512, n)
        pol = policy.build(budget=budget)
        # asl's tau on this model (its own, or the model's calibration); the paper's for the others' rankings
        tau = pol.settings_for(m, n).tau if hasattr(pol, "settings_for") else policy.kw["tau"] or DEFAULT_TAU
        info = inspect_layers(pf.scores, window, l_min=policy.kw["l_min"], l_obs=policy.kw["l_obs"], budget=budget,
                              tau=tau, layer_mask=mask, span=pol.span)
        sel = kept = None  # what the policy keeps when it runs: its selection, the early layers' sets
        if pol.prunes and budget < n:
            pol.check_model(m)
            sel, kept = _what_it_keeps(pol, pf.scores, m, mask)
        if policy.name in FIXED_LAYER_POLICIES:
            layer = pol.layer_for(m)
            info["selected_layer"] = layer
            info["note"] = "; ".join(x for x in (f"fixed layer {layer}", sel.note if sel else "") if x)
        elif policy.name in ("snapkv", "full", "zigzag", "pyramid"):
            info["selected_layer"], info["note"] = None, f"{policy.name} has no selection layer"
        lbj = None
        if method:
            lbj = dict(kept.budgets) if kept is not None and kept.budgets else {
                "method": method, "b_avg": int(budget), "budgets": [int(n)] * m.n_layer,
                "note": f"budget {budget} >= prompt length {n}: nothing to prune"}
    except user_errors() as e:
        fail(str(e))
    out = {"model": str(m.path), "n_layer": m.n_layer, "n_prompt": n, "window": window, "policy": policy.name,
           "selected_layer": info["selected_layer"], "budget": info["budget"], "tau": info["tau"],
           "l_min": info["l_min"], "l_obs": info["l_obs"], "note": info["note"], "span": str(pol.span),
           "kept_spans": runs(sel.shared) if sel is not None and sel.shared is not None else None,
           "layers": [{"layer": d["layer"], "scores": d["scores"], "variance_ratio": d["variance_ratio"],
                       "ranked": d["ranked"]} for d in info["layers"]]}
    if hasattr(pol, "propagation_for") and pol.propagation_for(m, n)[0] and sel is not None \
            and sel.shared is not None and sel.layer is not None and sel.layer < m.n_layer - 1:
        # what runs past the selection layer (the deeper layers keep their choice of it when the policy runs)
        out["propagated_spans"] = runs(pol.propagated(pf.scores[: sel.layer + 1], sel.shared, m))
    if lbj is not None:
        out["layer_budgets"] = lbj
        for d, b in zip(out["layers"], lbj["budgets"]):
            d["budget"] = b
    per_layer = None if kept is None else (kept.per_layer if kept.per_layer is not None else kept.per_head)
    for d, heads in zip(out["layers"], per_layer if per_layer is not None else []):
        d["kept_spans"] = [runs(h) for h in heads]
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"{m.path.name}: {m.n_layer} layers, prompt {n} tokens, window {window}, budget {info['budget']}")
    for d in out["layers"]:
        r = d["variance_ratio"]
        s = d["scores"]
        top = int(max(range(len(s)), key=s.__getitem__)) if s else -1
        click.echo(f"  layer {d['layer']:3d}  ratio {'-' if r is None else f'{r:.3f}':>7}  top position {top}"
                   + (f"  budget {d['budget']}" if "budget" in d else ""))
    click.echo(f"selected layer: {info['selected_layer']}" + (f" ({info['note']})" if info["note"] else ""))
    if out["kept_spans"] is not None:
        rs = out["kept_spans"]
        click.echo(f"kept ({pol.span}): {sum(b - a + 1 for a, b in rs)} positions in {len(rs)} runs: "
                   + " ".join(f"{a}-{b}" if b > a else str(a) for a, b in rs[:40]) + (" ..." if len(rs) > 40 else ""))
    if lbj is not None:
        click.echo(f"layer budgets ({lbj['method']}): sum {sum(lbj['budgets'])} = {m.n_layer} x {lbj['b_avg']}")


def _what_it_keeps(pol, scores, model, mask):
    """(selection, per-layer sets) of `pol` on these scores as its strategy runs: the ordinary
    selection; or the selection layer's shared set (replayed as layer-major prefill would decide)
    and, for layer-major policies, what the layers up to it keep."""
    from ...engine.strategies import replay, select

    strategy = pol.strategy(model)
    if strategy == "ordinary":
        sel = select(pol, scores, pol.window, model, mask)
        return sel, sel
    stop, sel = replay(pol, scores, model, mask)
    if sel.shared is None:  # every layer's own per-head sets (SnapKV pruned layer by layer)
        return sel, sel
    return sel, (pol.early_layers(scores[: stop + 1], sel.shared, model) if strategy == "layer-major" else None)
