"""What the commands share: clear errors for bad input, reading prompts, the progress bar, and
the policy options, turned into one policy object per command (:func:`policy_options`)."""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import click

from ...policies.base import PREFILL_MODES
from ...policies.fixed_layer import FIXED_LAYER_POLICIES
from ...policies.propagation import propagating_policies
from ...policies.spans import DEFAULT_SPAN


def fail(msg: str) -> None:
    raise click.ClickException(msg)


def user_errors():
    """The exceptions that are the user's input or environment, shown without a traceback."""
    from ..._native import NativeLibraryError, PyaslError
    from ...engine import ModelLoadError
    from ...models import ModelError

    return (ModelError, ModelLoadError, NativeLibraryError, PyaslError, ValueError, OSError, RuntimeError)


def read_utf8(path: str, what: str) -> str:
    """The text of a UTF-8 file, or a clear error (missing file, invalid UTF-8)."""
    p = Path(path)
    if not p.is_file():
        fail(f"{what} not found: {p}")
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(f"{p} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r}); convert it to UTF-8 first")


# examples/ of an installed wheel (CMakeLists.txt installs it as pyasl/examples), then of a source clone
_PKG = Path(__file__).resolve().parents[2]
EXAMPLE_DIRS = (_PKG / "examples", _PKG.parent / "examples")


def example_file(path: str) -> Optional[Path]:
    """`examples/NAME` when no such file exists here: the example pyasl ships (so the README's
    `--prompt-file examples/long_prompt.txt` works from any directory), else None."""
    p = Path(path)
    if p.exists() or p.is_absolute() or len(p.parts) != 2 or p.parts[0] != "examples":
        return None
    for d in EXAMPLE_DIRS:
        if (d / p.name).is_file():
            return d / p.name
    return None


def read_prompt(prompt: Optional[str], prompt_file: Optional[str]) -> str:
    if (prompt is None) == (prompt_file is None):
        fail("give exactly one of --prompt TEXT or --prompt-file PATH")
    if prompt_file is not None:
        prompt = read_utf8(str(example_file(prompt_file) or prompt_file), "prompt file")
    if not prompt or not prompt.strip():
        fail("the prompt is empty")
    check_text(prompt, "--prompt")
    return prompt


def check_text(text: Optional[str], what: str) -> None:
    """Command-line text that is not valid UTF-8 reaches Python as lone surrogates."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        fail(f"{what} is not valid UTF-8 (character {e.start}); pass UTF-8 text or use --prompt-file")


def load_model(model: str, verbose: bool):
    from ...engine import Model
    from ...models import resolve_model

    return Model(resolve_model(model), verbose=verbose)


def prompt_tokens(m, prompt: str, raw: bool, system: Optional[str]) -> list[int]:
    if not raw and not m.chat_template:
        click.echo(f"note: {m.path.name} has no chat template; using the prompt as is (--raw)", err=True)
    return m.prompt_tokens(prompt, raw=raw, system=system)


class Progress:
    """A prefill progress bar on stderr (only when stderr is a terminal or forced)."""

    def __init__(self, enabled: Optional[bool], label: str = "prefill"):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
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


# ---- policy options -------------------------------------------------------------------------------
ALL_POLICIES = ["full", "snapkv", "asl", "fastkv", "asl-2pass", "gemfilter", "gemfilter-published", "zigzag", "pyramid"]


def _parse_span(ctx, param, value):
    """--span as a Spans; None when not given, so the policy's own default applies (forward:32; token
    for gemfilter-published)."""
    from ...policies.spans import Spans

    if value is None:
        return None
    try:
        return Spans.parse(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _parse_propagate(ctx, param, value):
    """--propagate as an int (N) or "N:kept"; None when not given."""
    from ...policies.propagation import normalize_propagate

    try:
        return normalize_propagate(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


class PolicyOptions:
    """The policy options of one command line; :meth:`build` makes the policy object (once the
    budget is known: ``pyasl inspect`` defaults it to the prompt)."""

    def __init__(self, name: str, budget: Optional[int], window: int, tau: Optional[float], layer: Optional[int],
                 l_min=None, l_obs=None, prefill_mode: str = "auto", layer_budgets: Optional[str] = None,
                 theta: float = 0.9, b_min_frac: float = 0.2, beta: float = 20.0, span=None, layer_only_fixed=False,
                 propagate=None):
        self.name, self.budget, self.window = name, budget, window
        self.kw = dict(tau=tau, l_min=l_min, l_obs=l_obs, layer=layer, prefill_mode=prefill_mode, span=span,
                       propagate=propagate,
                       layer_budgets=layer_budgets, budget_opts={"theta": theta, "b_min_frac": b_min_frac, "beta": beta})
        if layer_budgets and name != "asl":
            raise ValueError(f"--layer-budgets applies to --policy asl, not {name}"
                             + (" (its second pass keeps one set)" if name == "asl-2pass" else ""))
        if layer_only_fixed and layer is not None and name not in FIXED_LAYER_POLICIES:
            raise ValueError(f"policy {name} does not take --layer")
        if propagate is not None and name not in propagating_policies():
            raise ValueError(f"--propagate applies to {' and '.join(propagating_policies())} (the tokens sent on "
                             f"past the selection layer), not {name}")

    @property
    def budget_method(self) -> Optional[str]:
        """The per-layer budget method the policy uses (None: none)."""
        return self.name if self.name in ("zigzag", "pyramid") else self.kw["layer_budgets"]

    def build(self, budget: Optional[int] = None):
        from ...policies.options import policy_from_options

        return policy_from_options(self.name, budget=budget or self.budget, window=self.window, **self.kw)


def policy_options(policies=ALL_POLICIES, default: str = "asl", budget_default: Optional[int] = 512,
                   budget_help: str = "KV cells kept (hard cap)", asl_layers: bool = False, prefill: bool = False,
                   layer_budgets: bool = False, layer_only_fixed: bool = False, policy_help: str = ""):
    """Click options for a policy; the command receives ``policy`` (a :class:`PolicyOptions`)."""
    opts = [
        click.option("--policy", "policy_name", type=click.Choice(list(policies)), default=default,
                     show_default=True, help=policy_help or "the KV policy"),
        click.option("--budget", default=budget_default, show_default=budget_default is not None,
                     type=click.IntRange(min=2), help=budget_help),
        click.option("--window", default=32, show_default=True, type=click.IntRange(min=1),
                     help="observation window W (last prompt tokens)"),
        click.option("--tau", type=click.FloatRange(min=0, max=1, min_open=True),
                     help="ASL variance-ratio threshold (default: the model's calibration, `pyasl calibrate`, "
                          "else the paper's 0.3)"),
        click.option("--layer", type=click.IntRange(min=0),
                     help="selection layer of fastkv and gemfilter (default: 15 / 13 of 32 layers, scaled by depth)"),
        click.option("--propagate", callback=_parse_propagate, metavar="N|N:kept",
                     help="asl, fastkv: tokens sent on past the selection layer, each deeper layer keeping its own "
                          "--budget of them (FastKV's TSP length; N:kept: every deeper layer keeps the selection "
                          "layer's set; default: the budget)"),
        click.option("--span", callback=_parse_span, metavar="token|forward:S|around:B+S|chunk:C",
                     help="how scores become kept cells: token (top-k tokens), forward:S (a kept token brings the S-1 "
                          f"after it), around:B+S (and the B before it), chunk:C (whole chunks of C tokens); default: {DEFAULT_SPAN} (gemfilter-published: "
                          "token)"),
    ]
    if asl_layers:
        opts += [click.option("--l-min", type=click.IntRange(min=0),
                              help="ASL reference layer (default: depth-scaled 10/32)"),
                 click.option("--l-obs", type=click.IntRange(min=1),
                              help="ASL layers observed (default: depth-scaled 8/32)")]
    if prefill:
        opts.append(click.option("--prefill", "prefill_mode", type=click.Choice(list(PREFILL_MODES)),
                                 default="auto", show_default=True,
                                 help="how asl and snapkv prefill (auto: layer-major where the architecture "
                                      "allows; snapkv then prunes each layer as it runs, holding less memory)"))
    if layer_budgets:
        opts += [
            click.option("--layer-budgets", type=click.Choice(["zigzag", "pyramid", "uniform"]),
                         help="asl: per-layer budgets for the layers up to the selection layer (later ones keep "
                              "asl's set)"),
            click.option("--theta", default=0.9, show_default=True,
                         type=click.FloatRange(min=0, max=1, min_open=True),
                         help="zigzag: attention share a layer's LMBA must reach"),
            click.option("--b-min-frac", default=0.2, show_default=True, type=click.FloatRange(min=0, max=1),
                         help="zigzag: B_min = max(ceil(b_min_frac * budget), window + 1)"),
            click.option("--beta", default=20.0, show_default=True, type=click.FloatRange(min=1),
                         help="pyramid: top layer keeps (budget - window) / beta prefix tokens"),
        ]
    keys = ("policy_name", "budget", "window", "tau", "layer", "propagate", "span", "l_min", "l_obs", "prefill_mode",
            "layer_budgets", "theta", "b_min_frac", "beta")

    def deco(f):
        @functools.wraps(f)
        def wrapper(*args, **kw):
            got = {k: kw.pop(k) for k in keys if k in kw}
            try:
                kw["policy"] = PolicyOptions(got.pop("policy_name"), layer_only_fixed=layer_only_fixed, **got)
            except ValueError as e:
                fail(str(e))
            return f(*args, **kw)

        for opt in reversed(opts):
            wrapper = opt(wrapper)
        return wrapper

    return deco


def cache_type_options(f):
    """-ctk / -ctv: the KV cache types, as llama.cpp's options."""
    from ...engine.context import KV_TYPES

    f = click.option("-ctv", "--cache-type-v", "type_v", type=click.Choice(list(KV_TYPES)), default="f16",
                     show_default=True, help="V cache type, as llama.cpp's -ctv (quantized: needs --flash-attn)")(f)
    return click.option("-ctk", "--cache-type-k", "type_k", type=click.Choice(list(KV_TYPES)), default="f16",
                        show_default=True, help="K cache type, as llama.cpp's -ctk")(f)


def model_options(f):
    """The model and runtime options of generate and inspect."""
    for opt in reversed([
        click.argument("model"),
        click.option("--prompt", help="prompt text"),
        click.option("--prompt-file", type=click.Path(dir_okay=False),
                     help="read the prompt from a UTF-8 file (examples/long_prompt.txt: the example shipped with "
                          "pyasl when there is no such file here)"),
        click.option("--raw", is_flag=True, help="do not apply the chat template"),
        click.option("--system", help="system message (chat template only)"),
        click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: all cores)"),
        click.option("--flash-attn/--no-flash-attn", default=False, show_default=True),
        click.option("--verbose", is_flag=True, help="show llama.cpp's log"),
    ]):
        f = opt(f)
    return f
