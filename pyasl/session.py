"""The pyasl Python API: load a model once, open chat sessions over a pruned KV cache.

    import pyasl

    model = pyasl.load_model("smollm2")                     # a GGUF path or a known name
    s = pyasl.Session(model, policy=pyasl.ASL(budget=256), n_ctx=1024, max_tokens=128)
    s.prefill(documents=[open("report.txt").read()])        # prefilled once, pruned to 256 cells
    print(s.ask("What is the report about?"))               # greedy by default
    for piece in s.stream("And the conclusion?", temperature=0.7, seed=1):
        print(piece, end="", flush=True)
    s.save("report.pyasl")                                  # pruned cache + transcript
    s2 = pyasl.Session.load(model, "report.pyasl")         # refuses a different model

How a session works
-------------------
One llama.cpp context of ``n_ctx`` cells holds one sequence. Documents (and the system message)
are prefilled once with the session's policy -- the same prefill and selection as
``pyasl generate`` -- and the pruned cache is moved into that context at the tokens' original
positions. Every turn is appended after it (positions only ever increase) and the answer is
decoded from there. When a turn and its answer would not fit into ``n_ctx`` cells any more, the
policy prunes the cache again: the newest turn is decoded with the window-attention scores armed
and serves as the observation window (it is always kept, up to 3/4 of the budget); the first
``sink`` cells (attention sinks; optionally the latest ``keep_recent`` cells too) are kept as
they are, and the policy chooses the rest, ``budget`` cells in all (a hard cap) -- text is never cut
silently. Policy ``Full`` never prunes and refuses a turn that does not fit (:class:`ContextFullError`).

Policies are small objects (:class:`ASL`, :class:`SnapKV`, :class:`FastKV`, :class:`ASL2Pass`,
:class:`GemFilter`, :class:`Full`); a new one subclasses :class:`Policy`, implements
:meth:`Policy.select` (and optionally :meth:`Policy.prefill`) and calls :func:`register_policy`.
"""
from __future__ import annotations

import codecs
import json
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Optional, Sequence, Union

import numpy as np

from . import engine as E
from . import policies as P
from .spans import Spans

__all__ = [
    "ASL", "ASL2Pass", "ContextFullError", "FastKV", "Full", "GemFilter", "Policy", "PrunedPrefill",
    "Selection", "Session", "SessionFileError", "SnapKV", "load_model", "make_policy", "policy_names",
    "register_policy",
]

Progress = Optional[Callable[[int, int], None]]


class ContextFullError(RuntimeError):
    """A turn does not fit into the session's context and the policy does not prune."""


class SessionFileError(ValueError):
    """A session file is unreadable, or was saved with another model."""


def load_model(name_or_path: Union[str, os.PathLike], n_gpu_layers: int = 0, verbose: bool = False) -> E.Model:
    """Load a GGUF model (a path, or a known name such as ``smollm2`` that is fetched and cached)."""
    from .models import resolve_model

    return E.Model(resolve_model(name_or_path), n_gpu_layers=n_gpu_layers, verbose=verbose)


# ---- policies ---------------------------------------------------------------------------------
@dataclass
class Selection:
    """What a policy keeps, as token positions of the sequence.

    Exactly one of ``shared`` (``(k,)`` sorted positions kept in every layer and head) or
    ``per_head`` (``(n_layer, n_head_kv, k)``, each row sorted) is set; ``None`` for both means
    keep everything. ``layer`` is the selection layer where the policy has one."""
    shared: Optional[np.ndarray] = None
    per_head: Optional[np.ndarray] = None
    layer: Optional[int] = None
    note: str = ""

    @property
    def n_kept(self) -> Optional[int]:
        if self.shared is not None:
            return len(self.shared)
        if self.per_head is not None:
            return int(self.per_head.shape[-1])
        return None

    def map(self, positions: np.ndarray) -> "Selection":
        """The same selection with indices into `positions` replaced by those positions."""
        return Selection(shared=None if self.shared is None else positions[self.shared],
                         per_head=None if self.per_head is None else positions[self.per_head],
                         layer=self.layer, note=self.note)

    def apply(self, ctx: E.Context) -> None:
        if self.shared is not None:
            ctx.kv_keep(self.shared)
        elif self.per_head is not None:
            ctx.kv_keep_per_head(self.per_head)


@dataclass
class PrunedPrefill:
    """The outcome of a policy's prefill: the pruned sequence as llama.cpp state bytes."""
    state: bytes
    n_tokens: int            # tokens prefilled (the next position)
    n_kept: int              # cells kept
    selected_layer: Optional[int]
    seconds: float
    note: str = ""


_REGISTRY: dict[str, type] = {}


def register_policy(cls: type) -> type:
    """Class decorator: make a :class:`Policy` subclass available by its ``name`` (CLI, files)."""
    _REGISTRY[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    return list(_REGISTRY)


def make_policy(name: str, **kw) -> "Policy":
    """A policy object from its name (``asl``, ``snapkv``, ...) and keyword arguments; arguments a
    policy does not take are ignored when they are None."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(_REGISTRY)}")
    import inspect

    params = inspect.signature(cls.__init__).parameters
    extra = [k for k, v in kw.items() if k not in params and v is not None]
    if extra:
        raise ValueError(f"policy {name} does not take {', '.join(extra)}")
    try:
        return cls(**{k: v for k, v in kw.items() if k in params and v is not None})
    except TypeError as e:  # a required argument is missing (fastkv and gemfilter need a layer)
        raise ValueError(f"policy {name}: {e}".replace("__init__() ", "")) from None


class Policy:
    """A KV-cache pruning policy: how a long prefill is pruned (:meth:`prefill`) and which cells
    to keep given window-attention scores (:meth:`select`, also used to prune a full session).

    ``budget`` counts every kept cell, observation window included (a hard cap); ``window`` is the
    observation window of the document prefill (the last ``window`` tokens); ``kernel`` is the
    pooling kernel of the scores; ``span`` how scores become kept cells (:mod:`pyasl.spans`:
    ``token``, ``forward:S``, ``chunk:C``; None: the default)."""

    name: ClassVar[str] = "?"
    prunes: ClassVar[bool] = True

    def __init__(self, budget: int = 512, window: int = 32, kernel: int = 7, span=None):
        for k, v in (("budget", budget), ("window", window), ("kernel", kernel)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{k} must be an integer, got {v!r}")
        if window < 1:
            raise ValueError("window must be >= 1")
        if budget <= window:
            raise ValueError(f"budget {budget} must be larger than the window {window}")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError("kernel must be an odd integer >= 1")
        self.budget, self.window, self.kernel = int(budget), int(window), int(kernel)
        self.span = Spans.parse(span)

    # -- description -----------------------------------------------------------------------
    def params(self) -> dict:
        return {"budget": self.budget, "window": self.window, "kernel": self.kernel, "span": str(self.span)}

    def to_dict(self) -> dict:
        return {"name": self.name, **self.params()}

    @staticmethod
    def from_dict(d: dict) -> "Policy":
        d = dict(d)
        return make_policy(d.pop("name"), **d)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Policy) and self.to_dict() == other.to_dict()

    def check_model(self, model: E.Model) -> None:
        """Raise ValueError when the policy cannot run on `model`."""

    # -- selection ---------------------------------------------------------------------------
    def select(self, scores: np.ndarray, window: int, model: E.Model) -> Selection:
        """Cells to keep given ``scores`` ``(n_layer, n_head, n)`` (window attention by position
        index 0..n-1; the last ``window`` indices are the observation window and must be kept).
        Return at most ``budget`` per layer and head."""
        raise NotImplementedError

    # -- prefill -----------------------------------------------------------------------------
    def prefill(self, model: E.Model, tokens: list[int], n_threads: Optional[int] = None, flash_attn: bool = False,
                n_batch: int = 512, progress: Progress = None) -> PrunedPrefill:
        """Prefill `tokens` and prune them. Default: an ordinary prefill with the last ``window``
        tokens' scores armed, :meth:`select`, then the selection applied in place."""
        n = len(tokens)
        if not self._should_prune(n):
            return _plain_prefill(model, tokens, n_threads, flash_attn, n_batch, progress)
        t0 = time.perf_counter()
        with E.Context(model, E._pad(n + 1), n_batch=n_batch, n_threads=n_threads, flash_attn=flash_attn,
                       capture=True) as ctx:
            pf = E.prefill(ctx, tokens, window=self.window, progress=progress)
            sel = self.select(pf.scores, self.window, model)
            sel.apply(ctx)
            state = ctx.state_get()
        return PrunedPrefill(state=state, n_tokens=n, n_kept=sel.n_kept or n, selected_layer=sel.layer,
                             seconds=time.perf_counter() - t0, note=sel.note)

    def _should_prune(self, n: int) -> bool:
        return self.prunes and n > self.budget and n > self.window


def _plain_prefill(model, tokens, n_threads, flash_attn, n_batch, progress) -> PrunedPrefill:
    t0 = time.perf_counter()
    with E.Context(model, E._pad(len(tokens) + 1), n_batch=n_batch, n_threads=n_threads, flash_attn=flash_attn) as ctx:
        E.prefill(ctx, tokens, progress=progress)
        state = ctx.state_get()
    return PrunedPrefill(state=state, n_tokens=len(tokens), n_kept=len(tokens), selected_layer=None,
                         seconds=time.perf_counter() - t0)


def _from_ctx(ctx: E.Context, n: int, n_kept: int, layer: Optional[int], t0: float, note: str = "") -> PrunedPrefill:
    state = ctx.state_get()
    ctx.close()
    return PrunedPrefill(state=state, n_tokens=n, n_kept=n_kept, selected_layer=layer,
                         seconds=time.perf_counter() - t0, note=note)


@register_policy
class Full(Policy):
    """No pruning: the whole conversation must fit into the context."""

    name = "full"
    prunes = False

    def __init__(self):
        self.budget, self.window, self.kernel, self.span = None, 32, 7, Spans.parse("token")

    def params(self) -> dict:
        return {}

    def select(self, scores, window, model) -> Selection:
        return Selection()


@register_policy
class SnapKV(Policy):
    """SnapKV: every layer and KV head keeps its own top-``budget`` cells."""

    name = "snapkv"

    def select(self, scores, window, model) -> Selection:
        sets = P.snapkv_select_all(scores, window=window, budget=self.budget, n_head_kv=model.n_head_kv,
                                   kernel=self.kernel, span=self.span)
        return Selection(per_head=sets)


class _ASLParams(Policy):
    def __init__(self, budget: int = 512, window: int = 32, tau: float = 0.3, l_min: Optional[int] = None,
                 l_obs: Optional[int] = None, kernel: int = 7, span=None):
        super().__init__(budget=budget, window=window, kernel=kernel, span=span)
        if not 0.0 < float(tau) <= 1.0:
            raise ValueError(f"tau must satisfy 0 < tau <= 1, got {tau}")
        self.tau, self.l_min, self.l_obs = float(tau), l_min, l_obs

    def params(self) -> dict:
        return {**super().params(), "tau": self.tau, "l_min": self.l_min, "l_obs": self.l_obs}

    def _asl(self, scores, window):
        return P.asl_select(scores, window=window, budget=self.budget, tau=self.tau, l_min=self.l_min,
                            l_obs=self.l_obs, kernel=self.kernel, span=self.span)

    def select(self, scores, window, model) -> Selection:
        sel = self._asl(scores, window)
        return Selection(shared=sel.kept, layer=sel.selected_layer, note=sel.note)


@register_policy
class ASL(_ASLParams):
    """ASL: one token set shared by every layer, chosen at the first layer whose ranking is stable
    (rank-variance ratio below ``tau``). The document prefill is layer-major with one-shot
    propagation where the architecture allows (``prefill="auto"``), else ordinary."""

    name = "asl"

    def __init__(self, budget: int = 512, window: int = 32, tau: float = 0.3, l_min: Optional[int] = None,
                 l_obs: Optional[int] = None, kernel: int = 7, prefill: str = "auto", span=None):
        super().__init__(budget=budget, window=window, tau=tau, l_min=l_min, l_obs=l_obs, kernel=kernel, span=span)
        if prefill not in ("auto", "layer-major", "ordinary"):
            raise ValueError(f"prefill must be auto, layer-major or ordinary, not {prefill!r}")
        self.prefill_mode = prefill

    def params(self) -> dict:
        return {**super().params(), "prefill": self.prefill_mode}

    def prefill(self, model, tokens, n_threads=None, flash_attn=False, n_batch=512, progress=None) -> PrunedPrefill:
        why = E.layer_major_supported(model)
        if self.prefill_mode == "layer-major" and why:
            raise ValueError(why)
        if not self._should_prune(len(tokens)) or self.prefill_mode == "ordinary" or why:
            return super().prefill(model, tokens, n_threads, flash_attn, n_batch, progress)
        t0 = time.perf_counter()
        lm = E.layer_major_prefill(model, tokens, "asl", self.budget, self.window, tau=self.tau, l_min=self.l_min,
                                   l_obs=self.l_obs, kernel=self.kernel, span=self.span, max_tokens=1, n_batch=n_batch,
                                   n_threads=n_threads, flash_attn=flash_attn, progress=progress)
        return _from_ctx(lm.ctx, len(tokens), lm.n_kept, lm.selection.selected_layer, t0, lm.selection.note)


class _FixedLayer(Policy):
    def __init__(self, layer: int, budget: int = 512, window: int = 32, kernel: int = 7, span=None):
        super().__init__(budget=budget, window=window, kernel=kernel, span=span)
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
            raise ValueError(f"policy {self.name} needs a selection layer >= 0, got {layer!r}")
        self.layer = int(layer)

    def params(self) -> dict:
        return {"layer": self.layer, **super().params()}

    def check_model(self, model) -> None:
        if self.layer >= model.n_layer:
            raise ValueError(f"layer {self.layer} is outside the model's layers 0..{model.n_layer - 1}")


@register_policy
class FastKV(_FixedLayer):
    """FastKV: the ranking of a fixed ``layer`` chooses the tokens propagated past it (layer-major
    prefill); layers up to ``layer`` keep their own SnapKV sets."""

    name = "fastkv"

    def check_model(self, model) -> None:
        super().check_model(model)
        why = E.layer_major_supported(model)
        if why:
            raise ValueError(f"policy fastkv needs layer-major prefill: {why}")

    def select(self, scores, window, model) -> Selection:
        kept = P.asl_select_at_layer(scores, window=window, budget=self.budget, layer=self.layer, kernel=self.kernel,
                                     span=self.span)
        sets = np.empty((model.n_layer, model.n_head_kv, len(kept)), dtype=np.int64)
        for l in range(model.n_layer):
            sets[l] = P.snapkv_select(scores[l], window=window, budget=self.budget, n_head_kv=model.n_head_kv,
                                      kernel=self.kernel, span=self.span) if l <= self.layer else kept
        return Selection(per_head=sets, layer=self.layer)

    def prefill(self, model, tokens, n_threads=None, flash_attn=False, n_batch=512, progress=None) -> PrunedPrefill:
        self.check_model(model)
        if not self._should_prune(len(tokens)):
            return _plain_prefill(model, tokens, n_threads, flash_attn, n_batch, progress)
        t0 = time.perf_counter()
        lm = E.layer_major_prefill(model, tokens, "fastkv", self.budget, self.window, kernel=self.kernel,
                                   span=self.span,
                                   layer=self.layer, max_tokens=1, n_batch=n_batch, n_threads=n_threads,
                                   flash_attn=flash_attn, progress=progress)
        return _from_ctx(lm.ctx, len(tokens), lm.n_kept, self.layer, t0)


@register_policy
class ASL2Pass(_ASLParams):
    """ASL two-pass: select with ASL, then clear the cache and prefill only the kept tokens at
    their original positions. A full session is pruned in place with the ASL selection."""

    name = "asl-2pass"

    def prefill(self, model, tokens, n_threads=None, flash_attn=False, n_batch=512, progress=None) -> PrunedPrefill:
        n = len(tokens)
        if not self._should_prune(n):
            return _plain_prefill(model, tokens, n_threads, flash_attn, n_batch, progress)
        t0 = time.perf_counter()
        if E.layer_major_supported(model) is None:
            lm = E.layer_major_prefill(model, tokens, "asl-2pass", self.budget, self.window, tau=self.tau,
                                       l_min=self.l_min, l_obs=self.l_obs, kernel=self.kernel, span=self.span, max_tokens=1,
                                       n_batch=n_batch, n_threads=n_threads, flash_attn=flash_attn, progress=progress)
            return _from_ctx(lm.ctx, n, lm.n_kept, lm.selection.selected_layer, t0, lm.selection.note)
        with E.Context(model, E._pad(n + 1), n_batch=n_batch, n_threads=n_threads, flash_attn=flash_attn,
                       capture=True) as ctx:
            pf = E.prefill(ctx, tokens, window=self.window, progress=progress)
        sel = self._asl(pf.scores, self.window)
        B = E.prefill_kept(model, tokens, sel.kept, 1, n_batch=n_batch, n_threads=n_threads, flash_attn=flash_attn)
        return _from_ctx(B, n, len(sel.kept), sel.selected_layer, t0, sel.note)


@register_policy
class GemFilter(_FixedLayer):
    """GemFilter: a first pass that stops after ``layer`` ranks the tokens, a second pass prefills
    only the kept ones. A full session is pruned in place with the ranking of ``layer``."""

    name = "gemfilter"

    def select(self, scores, window, model) -> Selection:
        kept = P.asl_select_at_layer(scores, window=window, budget=self.budget, layer=self.layer, kernel=self.kernel,
                                     span=self.span)
        return Selection(shared=kept, layer=self.layer)

    def prefill(self, model, tokens, n_threads=None, flash_attn=False, n_batch=512, progress=None) -> PrunedPrefill:
        self.check_model(model)
        n = len(tokens)
        if not self._should_prune(n):
            return _plain_prefill(model, tokens, n_threads, flash_attn, n_batch, progress)
        t0 = time.perf_counter()
        with E.Context(model, E._pad(n + 1), n_batch=n_batch, n_threads=n_threads, flash_attn=flash_attn,
                       capture=True) as ctx:
            pf = E.prefill(ctx, tokens, window=self.window, progress=progress, stop_layer=self.layer)
        kept = self.select(pf.scores, self.window, model).shared
        B = E.prefill_kept(model, tokens, kept, 1, n_batch=n_batch, n_threads=n_threads, flash_attn=flash_attn)
        return _from_ctx(B, n, len(kept), self.layer, t0)


# ---- chat formatting ----------------------------------------------------------------------------
_ANSWER = "\u2063pyasl-answer\u2063"  # stands for an answer's text while rendering the template
_ACK = "I have read the documents. What would you like to know?"


class _Format:
    """Incremental chat formatting: the text to append for a new turn is the template rendering
    of the conversation with that turn minus the rendering of what is already cached (answers
    stand in as a placeholder, so a template that trims or rewrites them still renders a prefix)."""

    def __init__(self, model: E.Model, raw: bool = False):
        self.model = model
        self.raw = raw or not model.chat_template
        if not self.raw:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
            import llama_cpp

            def piece(fn) -> str:
                t = fn(model.vocab)
                return model.token_bytes(t, special=True).decode("utf-8", errors="replace") if t >= 0 else ""

            eos, bos = piece(llama_cpp.llama_vocab_eos), piece(llama_cpp.llama_vocab_bos)
            self._fmt = {g: Jinja2ChatFormatter(model.chat_template, eos_token=eos, bos_token=bos,
                                                add_generation_prompt=g) for g in (False, True)}

    def render(self, msgs: list[dict], gen: bool) -> str:
        if self.raw:
            parts = []
            for m in msgs:
                c = m["content"]
                parts.append(c + "\n\n" if m["role"] == "system" else
                             f"User: {c}\n" if m["role"] == "user" else f"Assistant:{c}\n")
            return "".join(parts) + ("Assistant:" if gen else "")
        return self._fmt[gen](messages=msgs).prompt

    def tokens(self, text: str, first: bool) -> list[int]:
        if self.raw:
            return self.model.tokenize(text, add_special=first, parse_special=False)
        return self.model.tokenize(text, add_special=False, parse_special=True)

    def preamble(self, system: Optional[str], documents: Sequence[tuple[str, str]]) -> list[dict]:
        """The messages that hold the system text and the documents, prefilled before any turn."""
        if not documents:
            return [{"role": "system", "content": system}] if system else []
        block = "\n\n".join(f"Document {i + 1}" + (f" ({name})" if name else "") + f":\n{text}"
                            for i, (name, text) in enumerate(documents))
        intro = "Answer questions about the following documents.\n\n"
        sys_msg = {"role": "system", "content": (system + "\n\n" if system else "") + intro + block}
        try:
            if block in self.render([sys_msg], False):
                return [sys_msg]
        except Exception:  # a template that refuses a lone system message
            pass
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": intro + block}, {"role": "assistant", "content": _ACK}]
        if block not in self.render(msgs, False):
            raise ValueError("this model's chat template does not render the documents; use raw mode")
        return msgs


# ---- the session ----------------------------------------------------------------------------------
_RECENT_MAX = 4096  # tokens remembered for the repetition penalty
_SLACK = 8      # cells kept free after an answer, so the next turn always has room to be scored
_MAGIC = b"PYASLSES"
_FILE_VERSION = 1


def _check_swa(model: E.Model, policy: Policy) -> None:
    if policy.prunes and model.n_swa > 0:
        # re-pruning must read the positions of the global-attention cache, and nothing tells Python
        # yet which layers use it (a native accessor is needed)
        raise ValueError(f"sessions cannot prune sliding-window models ({model.arch}) yet; use policy full, or "
                         "pyasl generate for one-shot pruning")


def _check_arch(model: E.Model, policy: Policy) -> None:
    """The architecture limits engine.generate enforces (engine.check_prunable); SnapKV, FastKV and
    layer-major ASL (and their subclasses) select per KV head."""
    if policy.prunes:
        per_head = isinstance(policy, (SnapKV, FastKV)) or (
            isinstance(policy, ASL) and E.selects_per_head(model, "asl", policy.prefill_mode))
        E.check_prunable(model, policy.name, per_head)


def _check_text(text, what: str) -> None:
    """A clear error for text that is not a str or not encodable as UTF-8 (lone surrogates, e.g. from
    bytes decoded with errors='surrogateescape'), instead of a UnicodeEncodeError from the tokenizer."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid UTF-8 text (character {e.start} is the lone surrogate "
                         f"{text[e.start]!r}); decode its bytes with errors='replace' first") from None


def _identity(model: E.Model) -> dict:
    return {"arch": model.arch, "name": model.meta("general.name"), "n_layer": model.n_layer,
            "n_embd": model.n_embd, "n_head_kv": model.n_head_kv, "n_vocab": model.n_vocab,
            "file_size": model.path.stat().st_size if model.path.exists() else None}


def _penalize(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """llama.cpp's repetition penalty: the logits of tokens seen in `recent` are divided by
    `penalty` where positive and multiplied where negative."""
    if penalty == 1.0 or not len(recent):
        return logits
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    out = np.array(logits, dtype=np.float32, copy=True)
    v = out[ids]
    out[ids] = np.where(v > 0, v / penalty, v * penalty)
    return out


def _sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        cut = int(np.searchsorted(cum, top_p)) + 1
        keep = order[:cut]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))


@dataclass
class _Stats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    prefill_kept: int = 0
    selected_layers: list = field(default_factory=list)  # one entry per pruning (prefill, then re-prunes)
    reprunes: int = 0
    renumbers: int = 0       # times the positions were renumbered (see Session._bound_positions)
    turns: int = 0
    decode_tokens: int = 0
    decode_s: float = 0.0
    last_decode_tokens: int = 0
    last_decode_s: float = 0.0


class Session:
    """A conversation over a KV cache pruned by a policy.

    Args:
        model: a loaded :class:`pyasl.Model` (shared by any number of sessions).
        policy: a :class:`Policy` object (default ``ASL(budget=512)``) or a policy name.
        n_ctx: cells of the session's context: the pruned documents, the turns and one answer
            must fit; when they would not, the policy prunes again (see the module docstring).
        system: system message.
        max_tokens: the longest answer (cells reserved for it before each answer).
        raw: do not use the model's chat template (plain "User:/Assistant:" text).
        n_threads, flash_attn, n_batch: llama.cpp context settings.
        sink: cells at the start of the conversation that every re-prune keeps (attention sinks:
            without them a small model's answers fall into repetition after a few re-prunes).
        keep_recent: cells just before the newest turn that every re-prune keeps verbatim (the
            latest exchange; default 0: on the soak of docs/RELIABILITY.md it cost the document's
            facts their room and bought no coherence).

    Raises ValueError when ``n_ctx`` cannot hold ``budget`` cells plus an answer."""

    def __init__(self, model: E.Model, policy: Union[Policy, str, None] = None, n_ctx: int = 4096,
                 system: Optional[str] = None, max_tokens: int = 256, raw: bool = False,
                 n_threads: Optional[int] = None, flash_attn: bool = False, n_batch: int = 512,
                 sink: int = 4, keep_recent: int = 0):
        if policy is None:
            policy = ASL(budget=512)
        elif isinstance(policy, str):
            policy = make_policy(policy)
        if not isinstance(policy, Policy):
            raise ValueError(f"policy must be a pyasl Policy or a name, got {policy!r}")
        policy.check_model(model)
        _check_swa(model, policy)
        _check_arch(model, policy)
        for k, v in (("n_ctx", n_ctx), ("max_tokens", max_tokens), ("n_batch", n_batch), ("sink", sink),
                     ("keep_recent", keep_recent)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{k} must be an integer, got {v!r}")
        if system is not None:
            _check_text(system, "the system message")
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if int(sink) < 0 or int(keep_recent) < 0:
            raise ValueError("sink and keep_recent must be >= 0")
        self.sink = int(sink)
        self.keep_recent = int(keep_recent)
        self.model = model
        self.n_ctx = int(n_ctx)
        self.max_tokens = int(max_tokens)
        self.system = system
        self.n_threads, self.flash_attn, self.n_batch = n_threads, bool(flash_attn), int(n_batch)
        self._check_sizes(policy, self.max_tokens)
        self.policy = policy
        self._fmt = _Format(model, raw=raw)
        self._stop = threading.Event()
        self._ctx: Optional[E.Context] = None
        self._reset_state()

    # -- bookkeeping -------------------------------------------------------------------------
    def _reset_state(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
        self._ctx = None
        self.documents: list[tuple[str, str]] = []
        self.messages: list[dict] = []          # the transcript: user and assistant turns
        self._struct: list[dict] = []           # messages as rendered (answers as placeholders)
        self._cached_text = ""                  # rendering of what the cache holds
        self._started = False
        self._n_past = 0                        # the next position
        self._pos_shift = 0                     # positions given back by renumbering (tokens seen - _n_past)
        self._logits: Optional[np.ndarray] = None
        self._recent: list[int] = []            # the newest tokens (repetition penalty)
        self._base_state: Optional[tuple[bytes, int, str, list]] = None
        self.stats_ = _Stats()

    def _check_sizes(self, policy: Policy, max_tokens: int) -> None:
        if self.n_ctx < 16:
            raise ValueError("n_ctx must be >= 16")
        if policy.prunes and policy.budget + max_tokens + _SLACK + 1 > self.n_ctx:
            raise ValueError(f"the context ({self.n_ctx} cells) must hold the budget ({policy.budget}), an answer "
                             f"(max_tokens {max_tokens}) and {_SLACK + 1} more cells: raise n_ctx to at least "
                             f"{policy.budget + max_tokens + _SLACK + 1} or lower the budget / max_tokens")
        if not policy.prunes and max_tokens + _SLACK + 1 > self.n_ctx:
            raise ValueError(f"the context ({self.n_ctx} cells) is too small for max_tokens {max_tokens}")

    def _new_ctx(self) -> E.Context:
        return E.Context(self.model, self.n_ctx, n_batch=self.n_batch, n_threads=self.n_threads,
                         flash_attn=self.flash_attn, capture=True)

    @property
    def n_past(self) -> int:
        """The next position (tokens seen so far, less what renumbering gave back)."""
        return self._n_past

    @property
    def n_seen(self) -> int:
        """Tokens seen by the session so far."""
        return self._n_past + self._pos_shift

    def _bound_positions(self) -> None:
        """Keep positions inside the model's training context: when the cells that may still be
        appended before the next pruning could pass it, the kept cells are renumbered 0..k-1 (as in
        llama.cpp's context shift: distances between kept tokens shrink, their order stays)."""
        if not self.policy.prunes or self._n_past + self.n_ctx <= self.model.n_ctx_train:
            return
        old = self._n_past
        self._n_past = self._ctx.renumber_positions()
        self._pos_shift += old - self._n_past
        self.stats_.renumbers += 1

    def n_cells(self) -> int:
        """KV cells in use (the kept tokens)."""
        return 0 if self._ctx is None else int(self._ctx.kv_info().used_base)

    def set_policy(self, policy: Union[Policy, str]) -> None:
        """Use another policy for the following prunings (the cache is not touched now)."""
        if isinstance(policy, str):
            policy = make_policy(policy, budget=self.policy.budget if self.policy.prunes else None)
        policy.check_model(self.model)
        _check_swa(self.model, policy)
        _check_arch(self.model, policy)
        self._check_sizes(policy, self.max_tokens)
        self.policy = policy

    def interrupt(self) -> None:
        """Stop the answer being generated (safe from a signal handler or another thread): the
        generator ends after the current token, and the partial answer is kept in the cache and the
        transcript (marked ``interrupted``)."""
        self._stop.set()

    def reset(self) -> None:
        """Forget the conversation; keep the prefilled documents (their pruned cache is restored)."""
        base = self._base_state
        stats = self.stats_
        self._reset_state()
        if base is not None:
            state, n_past, text, struct_ = base
            self._ctx = self._new_ctx()
            self._ctx.state_set(state, n_past=n_past)
            self._n_past, self._cached_text, self._struct = n_past, text, list(struct_)
            self._started = True
            self._base_state = base
            self.stats_ = _Stats(prefill_tokens=stats.prefill_tokens, prefill_s=stats.prefill_s,
                                 prefill_kept=stats.prefill_kept, selected_layers=stats.selected_layers[:1])

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- prefill -----------------------------------------------------------------------------
    def prefill(self, documents: Sequence[Union[str, tuple[str, str]]] = (), progress: Progress = None) -> dict:
        """Prefill the system message and `documents` (texts, or (name, text) pairs) and prune
        them with the policy. Call once, before the first turn (the first turn calls it without
        documents otherwise). Returns :meth:`stats`."""
        if self._started:
            raise RuntimeError("the session is already prefilled; documents go in before the first turn")
        if isinstance(documents, (str, bytes)):
            raise ValueError("documents must be a list of texts (or (name, text) pairs), not one "
                             f"{type(documents).__name__}")
        docs = [(None, d) if isinstance(d, str) else (d[0], d[1]) if isinstance(d, (tuple, list)) and len(d) == 2
                else (None, d) for d in documents]
        for name, text in docs:
            _check_text(text, f"document {name or ''}".rstrip())
            if not text or not text.strip():
                raise ValueError(f"document {name or ''} is empty".replace("  ", " "))
        pre = self._fmt.preamble(self.system, docs)
        text = self._fmt.render(pre, False) if pre else ""
        toks = self._fmt.tokens(text, first=True) if text else []
        n = len(toks)
        if n > self.model.n_ctx_train:
            raise ValueError(f"the documents have {n} tokens, more than the model's training context "
                             f"{self.model.n_ctx_train}")
        if not self.policy.prunes and n + self.max_tokens + _SLACK > self.n_ctx:
            raise ContextFullError(f"the documents have {n} tokens: with policy full they must fit into the context "
                                   f"({self.n_ctx} cells) with an answer; use a pruning policy or a larger n_ctx")
        self._ctx = self._new_ctx()
        if n:
            pp = self.policy.prefill(self.model, toks, n_threads=self.n_threads, flash_attn=self.flash_attn,
                                     n_batch=self.n_batch, progress=progress)
            self._ctx.state_set(pp.state, n_past=pp.n_tokens)
            self._n_past = pp.n_tokens
            self._remember(toks[-_RECENT_MAX:])
            self._bound_positions()
            self.stats_.prefill_tokens, self.stats_.prefill_s, self.stats_.prefill_kept = n, pp.seconds, pp.n_kept
            if self.policy.prunes and pp.n_kept < n:
                self.stats_.selected_layers.append(pp.selected_layer)
            if self.n_cells() + self.max_tokens + _SLACK > self.n_ctx:
                raise ContextFullError("the pruned documents leave no room for an answer; raise n_ctx")
        self.documents = docs
        self._struct = list(pre)
        self._cached_text = text
        self._started = True
        self._base_state = (self._ctx.state_get(), self._n_past, text, list(pre)) if n else None
        return self.stats()

    # -- appending with re-pruning ------------------------------------------------------------
    def _decode(self, toks: list[int], scored: int = 0) -> None:
        """Decode toks at the next positions; the last `scored` tokens in one ubatch with scores armed."""
        ctx = self._ctx
        self._remember(toks)
        head = toks[: len(toks) - scored]
        for i in range(0, len(head), self.n_batch):
            chunk = head[i: i + self.n_batch]
            ctx.decode(chunk, pos0=self._n_past, logits_last=True)
            self._n_past += len(chunk)
        if scored:
            ctx.arm_scores(scored)
            try:
                ctx.decode(toks[len(head):], pos0=self._n_past, logits_last=True)
            finally:
                ctx.disarm_scores()
            self._n_past += scored
        self._logits = ctx.logits()

    def _remember(self, toks: Sequence[int]) -> None:
        self._recent.extend(int(t) for t in toks)
        if len(self._recent) > 2 * _RECENT_MAX:
            del self._recent[:-_RECENT_MAX]

    def _present_positions(self) -> np.ndarray:
        """Positions held by the cache's cells (sorted; per-head caches: the cells' metadata)."""
        ctx = self._ctx
        pos = ctx.cell_positions(0, ctx.kv_info().size_base)
        return np.sort(pos[pos >= 0]).astype(np.int64)

    def _protected(self, n: int, window: int) -> tuple[int, int]:
        """How many of the `n` cells before the observation window a re-prune keeps verbatim: the
        first cells (attention sinks: the start of the system prompt) and the newest ones (the latest
        exchange), as far as the budget allows: at least a quarter of it is left to the policy's
        own choice."""
        budget = self.policy.budget
        free = max(0, budget - window - max(1, budget // 4))
        n_sink = min(self.sink, n, free)
        n_recent = min(self.keep_recent, n - n_sink, free - n_sink)
        return n_sink, max(0, n_recent)

    def _reprune(self, window: int, n_new: int) -> None:
        """Prune the cache to the policy's budget; the last `n_new` positions were just decoded, the
        last `window` of them with scores armed (the observation window). The first `sink` cells and
        the `keep_recent` cells before the new ones (the latest exchange) are kept as they are; the
        policy ranks the others."""
        ctx = self._ctx
        scores = ctx.window_scores(self._n_past)
        present = self._present_positions()
        n = len(present)
        if n <= self.policy.budget:
            return
        older = n - n_new
        n_sink, n_recent = self._protected(older, window)
        idx = np.arange(n)
        # the policy keeps the last `window` columns it is given: put the protected cells there
        order = np.concatenate([idx[n_sink: older - n_recent], idx[older: n - window], idx[:n_sink],
                                idx[older - n_recent: older], idx[n - window:]])
        sc = np.ascontiguousarray(scores[:, :, present[order]])
        sel = self.policy.select(sc, window + n_sink + n_recent, self.model).map(present[order])
        if sel.shared is not None:
            sel.shared = np.sort(sel.shared)
        if sel.per_head is not None:
            sel.per_head = np.sort(sel.per_head, axis=-1)
        sel.apply(ctx)
        self._bound_positions()
        self.stats_.reprunes += 1
        self.stats_.selected_layers.append(sel.layer)

    def _append(self, toks: list[int], reserve: int) -> None:
        """Append toks, keeping `reserve` cells free after them; prune with the policy whenever the
        context would overflow (the newest tokens are the observation window)."""
        i = 0
        while True:
            rest = toks[i:]
            used = self.n_cells()
            if used + len(rest) + reserve <= self.n_ctx:
                if rest:
                    self._decode(rest)
                return
            if not self.policy.prunes:
                raise ContextFullError(
                    f"the conversation fills the context ({self.n_ctx} cells, {used} in use) and policy full does not "
                    "prune: reset the session, or use a pruning policy or a larger context")
            room = self.n_ctx - used
            piece = rest[: max(0, min(len(rest), room))]
            if not piece:
                raise RuntimeError("internal: no room left to score the new turn")
            # the newest turn is the observation window, up to 3/4 of the budget (older tokens keep the rest)
            w = min(len(piece), self.n_batch, max(self.policy.window, (3 * self.policy.budget) // 4),
                    self.policy.budget - 1)
            self._decode(piece, scored=w)
            self._reprune(w, len(piece))
            i += len(piece)
            if i >= len(toks) and self.n_cells() + reserve <= self.n_ctx:
                return

    # -- turns ----------------------------------------------------------------------------------
    def stream(self, prompt: str, max_tokens: Optional[int] = None, temperature: float = 0.0, top_p: float = 1.0,
               seed: Optional[int] = None, stop: Sequence[str] = (), repeat_penalty: float = 1.0,
               repeat_last_n: int = 64) -> Iterator[str]:
        """Append a user turn and yield the answer's text as it is decoded.

        Greedy unless ``temperature > 0`` (then top-p sampling with ``seed``); ``repeat_penalty``
        (llama.cpp's, 1.0 = off) applies to the last ``repeat_last_n`` tokens of the conversation
        (at most 4096). The answer ends at
        the model's end-of-turn token, at ``max_tokens`` tokens, at one of the ``stop`` strings, or
        when :meth:`interrupt` is called; it is appended to :attr:`messages` in every case (an
        interrupted answer with ``"interrupted": True``)."""
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            raise ValueError("the prompt is empty")
        _check_text(prompt, "the prompt")
        if stop is None or isinstance(stop, str):  # one stop string, not its characters
            stop = [] if stop is None else [stop]
        if any(not isinstance(x, str) or not x for x in stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
        if not 0.0 <= float(temperature) < float("inf"):
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
        if not 0.0 < float(top_p) <= 1.0:
            raise ValueError(f"top_p must satisfy 0 < top_p <= 1, got {top_p}")
        mt = self.max_tokens if max_tokens is None else int(max_tokens)
        if mt < 1:
            raise ValueError("max_tokens must be >= 1")
        if not float(repeat_penalty) > 0:
            raise ValueError(f"repeat_penalty must be > 0, got {repeat_penalty}")
        if not 0 <= int(repeat_last_n) <= _RECENT_MAX:
            raise ValueError(f"repeat_last_n must be in [0, {_RECENT_MAX}], got {repeat_last_n}")
        if mt > self.max_tokens and self.policy.prunes and self.policy.budget + mt + _SLACK + 1 > self.n_ctx:
            raise ValueError(f"max_tokens {mt} does not fit next to the budget in {self.n_ctx} cells")
        if not self._started:
            self.prefill()
        self._stop.clear()
        user = {"role": "user", "content": prompt}
        new_struct = self._struct + [user]
        new_text = self._fmt.render(new_struct, True)
        if not new_text.startswith(self._cached_text):
            raise RuntimeError("the chat template does not render the conversation incrementally")
        delta = new_text[len(self._cached_text):]
        toks = self._fmt.tokens(delta, first=self._n_past == 0)
        self._append(toks, reserve=mt + _SLACK)
        self.messages.append(user)
        self._struct = new_struct + [{"role": "assistant", "content": _ANSWER}]
        self._cached_text = new_text + _ANSWER
        self.stats_.turns += 1
        return self._answer(mt, temperature, top_p, seed, list(stop) + (["\nUser:"] if self._fmt.raw else []),
                            float(repeat_penalty), int(repeat_last_n))

    def _answer(self, max_tokens, temperature, top_p, seed, stop, penalty=1.0, last_n=64) -> Iterator[str]:
        rng = np.random.default_rng(seed)
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = ""
        emitted = 0
        n_tok = 0
        finished = False
        t0 = time.perf_counter()
        try:
            logits = self._logits
            while n_tok < max_tokens:
                if self._stop.is_set():
                    break
                if penalty != 1.0 and last_n:
                    logits = _penalize(logits, self._recent[-last_n:], penalty)
                tok = _sample(logits, temperature, top_p, rng)
                if self.model.is_eog(tok):
                    break
                if self.n_cells() + 1 > self.n_ctx:  # cannot happen: the answer's cells were reserved
                    break
                self._ctx.decode([tok], pos0=self._n_past)
                self._remember([tok])
                self._n_past += 1
                n_tok += 1
                logits = self._ctx.logits()
                text += dec.decode(self.model.token_bytes(tok))
                hit = next((s for s in stop if s in text), None)
                if hit:
                    text = text[: text.index(hit)]
                    break
                # hold back a tail that could be the start of a stop string
                safe = len(text) - max((len(s) - 1 for s in stop), default=0)
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
            else:
                finished = True
            finished = finished or not self._stop.is_set()
            text += dec.decode(b"", final=True)
            if len(text) > emitted:
                yield text[emitted:]
                emitted = len(text)
        finally:
            dt = time.perf_counter() - t0
            msg = {"role": "assistant", "content": text}
            if not finished:
                msg["interrupted"] = True
            self.messages.append(msg)
            self._stop.clear()
            st = self.stats_
            st.decode_tokens += n_tok
            st.decode_s += dt
            st.last_decode_tokens, st.last_decode_s = n_tok, dt

    def ask(self, prompt: str, **kw) -> str:
        """Append a user turn and return the whole answer (see :meth:`stream` for the options)."""
        return "".join(self.stream(prompt, **kw))

    # -- statistics -----------------------------------------------------------------------------
    def stats(self) -> dict:
        """Where the session stands: kept and total tokens, KV memory, selection layers, speeds."""
        st = self.stats_
        kept = self.n_cells()
        cell = 0
        if self._ctx is not None:
            info = self._ctx.kv_info()
            cell = info.cell_bytes_base
        mib = 1024 * 1024
        return {
            "policy": self.policy.to_dict(), "n_ctx": self.n_ctx, "kept_tokens": kept, "total_tokens": self.n_seen,
            "kv_mib": kept * cell / mib, "kv_mib_unpruned": self.n_seen * cell / mib, "next_position": self._n_past,
            "renumbers": st.renumbers,
            "selected_layers": list(st.selected_layers), "prunings": len(st.selected_layers), "reprunes": st.reprunes,
            "turns": st.turns, "document_tokens": st.prefill_tokens, "document_kept": st.prefill_kept,
            "prefill_s": st.prefill_s,
            "prefill_tok_s": st.prefill_tokens / st.prefill_s if st.prefill_s > 0 else None,
            "decode_tok_s": st.decode_tokens / st.decode_s if st.decode_s > 0 and st.decode_tokens else None,
            "last_decode_tok_s": (st.last_decode_tokens / st.last_decode_s
                                  if st.last_decode_s > 0 and st.last_decode_tokens else None),
        }

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the pruned cache, the transcript, the policy and the statistics to one file."""
        if self._ctx is None:
            raise RuntimeError("nothing to save: the session has not been prefilled")
        state = self._ctx.state_get()
        base = self._base_state
        head = {
            "version": _FILE_VERSION, "model": _identity(self.model), "policy": self.policy.to_dict(),
            "n_ctx": self.n_ctx, "max_tokens": self.max_tokens, "system": self.system, "raw": self._fmt.raw,
            "flash_attn": self.flash_attn, "n_batch": self.n_batch, "n_past": self._n_past,
            "sink": self.sink, "keep_recent": self.keep_recent, "pos_shift": self._pos_shift,
            "documents": [[n, t] for n, t in self.documents], "messages": self.messages, "struct": self._struct,
            "cached_text": self._cached_text, "stats": self.stats_.__dict__,
            "base": None if base is None else {"n_past": base[1], "text": base[2], "struct": base[3],
                                                "size": len(base[0])},
        }
        hj = json.dumps(head).encode("utf-8")
        tmp = Path(str(path) + ".tmp")
        with open(tmp, "wb") as f:
            f.write(_MAGIC + struct.pack("<QQ", len(hj), len(state)))
            f.write(hj)
            f.write(state)
            if base is not None:
                f.write(base[0])
        os.replace(tmp, path)

    @classmethod
    def load(cls, model: E.Model, path: Union[str, os.PathLike], n_threads: Optional[int] = None) -> "Session":
        """Open a session saved by :meth:`save`. Raises :class:`SessionFileError` when the file is
        not a pyasl session or was saved with a different model."""
        p = Path(path)
        if not p.is_file():
            raise SessionFileError(f"session file not found: {p}")
        with open(p, "rb") as f:
            magic = f.read(len(_MAGIC))
            if magic != _MAGIC:
                raise SessionFileError(f"{p} is not a pyasl session file")
            size = p.stat().st_size
            try:
                nh, ns = struct.unpack("<QQ", f.read(16))
                if 24 + nh + ns > size:  # before reading: a damaged count must not allocate exabytes
                    raise SessionFileError(f"{p} is truncated (its header counts {24 + nh + ns} bytes, the file "
                                           f"has {size})")
                head = json.loads(f.read(nh).decode("utf-8"))
                if not isinstance(head, dict):
                    raise ValueError("the header is not a JSON object")
                state = f.read(ns)
                base = head.get("base")
                if base and not 0 <= int(base["size"]) <= size:
                    raise ValueError(f"base size {base['size']}")
                base_state = f.read(int(base["size"])) if base else None
            except (struct.error, ValueError, KeyError, TypeError) as e:
                if isinstance(e, SessionFileError):
                    raise
                raise SessionFileError(f"{p} is a damaged pyasl session file ({e})") from None
        if len(state) != ns or (base and len(base_state) != base["size"]):
            raise SessionFileError(f"{p} is truncated")
        if head.get("version") != _FILE_VERSION:
            raise SessionFileError(f"{p} has session format {head.get('version')}, this pyasl reads {_FILE_VERSION}")
        try:
            want, have = head["model"], _identity(model)
            diff = [k for k in want if want[k] != have.get(k)]
        except (KeyError, TypeError, AttributeError) as e:
            raise SessionFileError(f"{p} is a damaged pyasl session file (model identity: {e!r})") from None
        if diff:
            raise SessionFileError(
                f"{p} was saved with another model: {want.get('name') or want.get('arch')} "
                f"({', '.join(f'{k} {want[k]!r}' for k in diff)}), not {model.path.name} "
                f"({', '.join(f'{k} {have.get(k)!r}' for k in diff)}); load it with the model it was saved with")
        s = None
        try:  # every field a damaged (or hand-edited) header may lack or hold with the wrong type
            s = cls(model, policy=Policy.from_dict(head["policy"]), n_ctx=head["n_ctx"], system=head["system"],
                    max_tokens=head["max_tokens"], raw=head["raw"], n_threads=n_threads,
                    flash_attn=head["flash_attn"], n_batch=head["n_batch"], sink=head.get("sink", 4),
                    keep_recent=head.get("keep_recent", 0))
            n_past = head["n_past"]
            if isinstance(n_past, bool) or not isinstance(n_past, int) or n_past < 0:
                raise ValueError(f"n_past {n_past!r}")
            s._ctx = s._new_ctx()
            try:
                s._ctx.state_set(state, n_past=n_past)
            except RuntimeError as e:
                raise SessionFileError(f"{p}: the saved cache does not load into this context ({e})") from None
            pos = s._present_positions()
            if n_past != (int(pos[-1]) + 1 if len(pos) else 0):  # the next position follows the last cached one
                raise ValueError(f"n_past {n_past} does not follow the cached positions (last "
                                 f"{int(pos[-1]) if len(pos) else None})")
            s._n_past = n_past
            s._pos_shift = int(head.get("pos_shift", 0))
            s.documents = [(n, t) for n, t in head["documents"]]
            s.messages = list(head["messages"])
            s._struct = list(head["struct"])
            s._cached_text = str(head["cached_text"])
            s._started = True
            s.stats_ = _Stats(**head["stats"])
            if base:
                s._base_state = (base_state, int(base["n_past"]), str(base["text"]), list(base["struct"]))
        except SessionFileError:
            if s is not None:
                s.close()
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if s is not None:
                s.close()
            raise SessionFileError(f"{p} is a damaged pyasl session file ({type(e).__name__}: {e})") from None
        return s
