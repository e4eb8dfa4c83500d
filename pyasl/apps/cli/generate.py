"""`pyasl generate`: answer a long prompt with a pruned KV cache."""
from __future__ import annotations

import json

import click

from .common import Progress, cache_type_options, check_text, fail, load_model, model_options, policy_options, prompt_tokens, read_prompt, \
    user_errors


@click.command()
@model_options
@policy_options(asl_layers=True, prefill=True, layer_budgets=True,
                policy_help="asl/fastkv: layer-major prefill, kept tokens propagate; asl-2pass/gemfilter: re-prefill "
                            "kept tokens; zigzag/pyramid: per-layer budgets")
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--ctx", "n_ctx", type=click.IntRange(min=16), help="context size limit for the prompt")
@cache_type_options
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--progress/--no-progress", default=None, help="prefill progress bar (default: when stderr is a tty)")
def generate(model, prompt, prompt_file, raw, system, threads, flash_attn, verbose, policy, max_tokens, n_ctx,
             type_k, type_v, as_json, progress):
    """Answer a (long) prompt with the KV cache pruned by POLICY.

    MODEL is a GGUF path or a known name (smollm2, qwen2.5-0.5b, gemma3-270m).
    """
    from ...generation import generate as run

    text = read_prompt(prompt, prompt_file)
    check_text(system, "--system")
    bar = Progress(progress)
    try:
        pol = policy.build()
        m = load_model(model, verbose)
        toks = prompt_tokens(m, text, raw, system)
        stream = None if as_json else (lambda s: click.echo(s, nl=False))
        res = run(m, toks, policy=pol, max_tokens=max_tokens, n_ctx=n_ctx, n_threads=threads, flash_attn=flash_attn,
                  progress=bar, on_text=stream, type_k=type_k, type_v=type_v)
    except user_errors() as e:
        bar.close()
        fail(str(e))
    bar.close()
    if as_json:
        d = res.to_json()
        d["model"] = str(m.path)
        d["n_layer"] = m.n_layer
        click.echo(json.dumps(d))
        return
    click.echo("")
    mib = 1024 * 1024
    sel = "none" if res.selected_layer is None else f"{res.selected_layer} of {m.n_layer}"
    click.echo("-" * 60, err=True)
    click.echo(f"policy {res.policy}{'' if res.policy == 'full' else f' (span {res.span})'}: "
               f"prompt {res.n_prompt} tokens, kept {res.n_kept}"
               + (f", selected layer {sel}" if res.policy in ("asl", "fastkv", "asl-2pass", "gemfilter") else "")
               + (f", {res.propagated} tokens past it" if res.propagated else "")
               + (f", prefill work {res.prefill_work:.2f}x" if res.prefill_work != 1.0 else ""), err=True)
    click.echo(f"KV memory {res.kv_bytes_full / mib:.1f} MiB -> {res.kv_bytes / mib:.1f} MiB "
               f"({100.0 * res.kv_bytes / max(1, res.kv_bytes_full):.1f}%)", err=True)
    click.echo(f"prefill {res.prefill_s:.2f} s ({res.n_prompt / max(res.prefill_s, 1e-9):.0f} tok/s), "
               f"first token after {res.time_to_first_token_s:.2f} s, "
               f"decode {res.decode_tokens_per_s:.1f} tok/s ({res.n_generated} tokens)", err=True)
    if res.layer_budgets:
        lbj = res.layer_budgets
        click.echo(f"layer budgets ({lbj['method']}): {' '.join(map(str, lbj['budgets']))} "
                   f"(sum {sum(lbj['budgets'])}, {lbj['prompt_cells']} prompt cells allocated per layer)", err=True)
    if res.note:
        click.echo(f"note: {res.note}", err=True)
