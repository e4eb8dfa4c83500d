"""The policy model: one object per KV policy, used by every entry point (engine.generate, the
CLI, Session, pyasl.Llama, the server and the benchmark).

A policy is two things:

* a **selector** (numpy only): window scores in, kept positions out -- shared by every layer and
  KV head, per layer and KV head, or per layer with a budget of its own -- through the span stage
  (:mod:`pyasl.policies.spans`);
* a **prefill strategy** the engine runs (:mod:`pyasl.engine.strategies`, which every entry point
  calls: ``strategies.run`` for a prompt, ``strategies.prefill_state`` for a Session or pyasl.Llama),
  each written once:

  - ``ordinary``: every layer over every token, scores of the last ``window`` tokens, then
    :meth:`Policy.select` prunes the cache;
  - ``layer-major``: each layer over the whole prompt before the next; after layer ``l``,
    :meth:`Policy.decide` says whether ``l`` is the selection layer; then only the kept tokens go
    through the deeper layers (one-shot propagation) and :meth:`Policy.early_layers` says what the
    layers up to the selection layer keep;
  - ``two-pass``: a first pass finds the kept tokens (layer-major with :meth:`Policy.decide`, or
    an ordinary prefill that stops after :meth:`Policy.first_pass_stop`), then only the kept
    tokens are prefilled again at their positions.

:meth:`Policy.select` is also how a Session prunes a conversation that outgrew its context.
"""
from __future__ import annotations

import inspect as _inspect
from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np

from .. import arch
from .snapkv_rule import snapkv_select
from .spans import Spans

__all__ = ["Policy", "PrefillChoice", "Selection", "make_policy", "policy_names", "register_policy"]

STRATEGIES = ("ordinary", "layer-major", "two-pass")
PREFILL_MODES = ("auto", "layer-major", "ordinary")


@dataclass
class Selection:
    """What a policy keeps, as indices into the scores' last axis (token positions).

    At most one of ``shared`` (``(k,)`` sorted, kept in every layer and KV head), ``per_head``
    (``(n_layer, n_head_kv, k)``, each row sorted) or ``per_layer`` (one ``(n_head_kv, B_l)``
    array per layer: per-layer budgets) is set; none means keep everything. ``layer`` is the
    selection layer where the policy has one; ``asl`` the ASL decision behind it; ``budgets`` the
    per-layer budget description (method, parameters, ``budgets``)."""

    shared: Optional[np.ndarray] = None
    per_head: Optional[np.ndarray] = None
    per_layer: Optional[list] = None
    layer: Optional[int] = None
    note: str = ""
    asl: Optional[object] = None
    budgets: Optional[dict] = None

    @property
    def n_kept(self) -> Optional[int]:
        """Cells per layer (per-layer budgets: the largest layer's)."""
        if self.shared is not None:
            return len(self.shared)
        if self.per_head is not None:
            return int(self.per_head.shape[-1])
        if self.per_layer is not None:
            return int(max(s.shape[-1] for s in self.per_layer))
        return None

    @property
    def counts(self) -> Optional[np.ndarray]:
        """Per-layer budgets (per_layer only)."""
        return None if self.per_layer is None else np.array([s.shape[-1] for s in self.per_layer], dtype=np.int64)

    def map(self, positions: np.ndarray) -> "Selection":
        """The same selection with indices into `positions` replaced by those positions, each set sorted."""
        positions = np.asarray(positions)
        return Selection(shared=None if self.shared is None else np.sort(positions[self.shared]),
                         per_head=None if self.per_head is None else np.sort(positions[self.per_head], axis=-1),
                         per_layer=None if self.per_layer is None else [np.sort(positions[s], axis=-1)
                                                                      for s in self.per_layer],
                         layer=self.layer, note=self.note, asl=self.asl, budgets=self.budgets)


_REGISTRY: dict[str, type] = {}


def register_policy(cls: type) -> type:
    """Class decorator: make a :class:`Policy` subclass available by its ``name`` (CLI, files)."""
    _REGISTRY[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    return list(_REGISTRY)


def make_policy(name: str, **kw) -> "Policy":
    """A policy object from its name (``asl``, ``snapkv``, ...) and keyword arguments; arguments a
    policy does not take are refused unless they are None."""
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(_REGISTRY)}")
    params = _inspect.signature(cls.__init__).parameters
    extra = [k for k, v in kw.items() if k not in params and v is not None]
    if extra:
        raise ValueError(f"policy {name} does not take {', '.join(extra)}")
    try:
        return cls(**{k: v for k, v in kw.items() if k in params and v is not None})
    except TypeError as e:  # a missing or unexpected argument
        raise ValueError(f"policy {name}: {e}".replace("__init__() ", "")) from None


def _check_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    return int(v)


class Policy:
    """A KV-cache pruning policy (see the module doc).

    ``budget`` counts every kept cell, observation window included (a hard cap); ``window`` is the
    observation window (the last ``window`` prompt tokens, always kept); ``kernel`` is the pooling
    kernel of the scores; ``span`` how scores become kept cells (:mod:`pyasl.policies.spans`:
    ``token``, ``forward:S``, ``around:B+S``, ``chunk:C``; None: the default)."""

    name: ClassVar[str] = "?"
    prunes: ClassVar[bool] = True
    score: ClassVar[str] = "attention"  # the window scores it ranks by (engine.context.SCORES)
    renumbers_positions: ClassVar[bool] = False  # two-pass: the kept tokens are prefilled again at 0..k-1

    def __init__(self, budget: int = 512, window: int = 32, kernel: int = 7, span=None):
        budget, window, kernel = _check_int("budget", budget), _check_int("window", window), _check_int("kernel", kernel)
        if window < 1:
            raise ValueError("window must be >= 1")
        if budget <= window:
            raise ValueError(f"budget {budget} must be larger than the window {window}")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError("kernel must be an odd integer >= 1")
        self.budget, self.window, self.kernel = budget, window, kernel
        self.span = Spans.parse(span)
        self.span_given = span is not None  # False: the default, which a question-agnostic ranking widens

    # -- description ---------------------------------------------------------------------------
    def params(self) -> dict:
        return {"budget": self.budget, "window": self.window, "kernel": self.kernel, "span": str(self.span)}

    def to_dict(self) -> dict:
        return {"name": self.name, **self.params()}

    @staticmethod
    def from_dict(d: dict) -> "Policy":
        d = dict(d)
        return make_policy(d.pop("name"), **d)

    def replace(self, **changes) -> "Policy":
        """A copy with some parameters changed (``policy.replace(budget=256)``); a default span stays
        the default."""
        d = {**self.to_dict(), **changes}
        if not self.span_given and "span" not in changes:
            d["span"] = None
        return Policy.from_dict(d)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Policy) and self.to_dict() == other.to_dict()

    # -- what it runs on ---------------------------------------------------------------------------
    def per_head(self, model) -> bool:
        """Whether it keeps a different token set per KV head (or per layer) on `model`."""
        return False

    def strategy(self, model) -> str:
        """The prefill strategy on `model`: ordinary, layer-major or two-pass."""
        return "ordinary"

    def check_model(self, model) -> None:
        """Raise ValueError when the policy cannot run on `model` (architecture limits)."""
        if self.prunes:
            arch.check_prunable(model, self.name, self.per_head(model))

    def check_prompt(self, model, layer_mask=None) -> None:
        """Raise ValueError before any work when the policy cannot rank a prompt whose ranking layers
        are ``layer_mask`` (arch.ranked_layer_mask)."""

    # -- selection ---------------------------------------------------------------------------------
    def select(self, scores: np.ndarray, window: int, model, layer_mask=None) -> Selection:
        """Cells to keep given ``scores`` ``(n_layer, n_head, n)`` of every layer (window attention by
        index 0..n-1; the last ``window`` indices are the observation window, always kept). At most
        ``budget`` per layer and head. ``layer_mask``: the layers whose scores may rank
        (arch.ranked_layer_mask; None: every layer)."""
        raise NotImplementedError

    # layer-major and two-pass policies -------------------------------------------------------------
    def decide(self, layer: int, scores: np.ndarray, model, layer_mask=None) -> Optional[Selection]:
        """After ``layer`` ran (``scores`` rows 0..layer filled): the shared kept set if ``layer`` is
        the selection layer, else None."""
        raise NotImplementedError(f"policy {self.name} has no selection layer")

    def decide_last(self, scores: np.ndarray, model, layer_mask=None) -> Selection:
        """Every layer ran and :meth:`decide` never stopped: the kept set from all the scores."""
        raise NotImplementedError(f"policy {self.name} always selects at a layer")

    def early_layers(self, scores: np.ndarray, kept: np.ndarray, model, window: Optional[int] = None) -> Selection:
        """One-shot propagation from layer ``L = len(scores) - 1``: what layers 0..L keep of their
        own full KV (``per_head`` sets, or ``per_layer`` budgets), every later layer holding ``kept``.
        Default: SnapKV per KV head of ``budget`` (sliding-window layers keep their window).
        ``window``: the always-kept last indices (default: the policy's window)."""
        N, L = model.n_layer, scores.shape[0] - 1
        swa = model.swa_layers if model.n_swa > 0 else [False] * N
        sets = np.empty((N, model.n_head_kv, len(kept)), dtype=np.int32)
        for l in range(N):
            sets[l] = self.early_layer_set(scores[l], model, window) if l <= L and not swa[l] else kept
        return Selection(per_head=sets)

    def propagated(self, scores: np.ndarray, kept: np.ndarray, model=None) -> np.ndarray:
        """One-shot propagation from layer ``L = len(scores) - 1``: the positions that run through the
        deeper layers. Default: ``kept``, which every deeper layer then holds; a wider set
        (:mod:`pyasl.policies.propagation`) has each deeper layer keep :meth:`early_layer_set` of it."""
        return np.asarray(kept, dtype=np.int64)

    def early_layer_set(self, layer_scores: np.ndarray, model, window: Optional[int] = None) -> np.ndarray:
        """What one layer up to the selection layer keeps by default: SnapKV per KV head of ``budget``
        from that layer's own ``(n_head, n)`` scores, ``(n_head_kv, budget)`` positions."""
        window = self.window if window is None else window
        return snapkv_select(layer_scores, window, self.budget, model.n_head_kv, kernel=self.kernel, span=self.span)

    def streams_early_layers(self, model) -> bool:
        """Whether :meth:`early_layers` keeps :meth:`early_layer_set` of each layer's own scores, so a
        layer-major prefill can prune a layer as soon as it ran and hold one layer of full-prompt
        K/V at a time (sliding-window models keep their window cache whole: no)."""
        return model.n_swa == 0

    def first_pass_stop(self, model) -> Optional[int]:
        """two-pass with an ordinary first pass: the last layer it runs (None: every layer)."""
        return None

    def first_pass(self, model) -> str:
        """two-pass: how the first pass runs (layer-major or ordinary)."""
        return "ordinary"


class PrefillChoice:
    """Mixin for a policy that can prefill layer-major or ordinary (ASL, SnapKV): ``prefill`` auto
    (layer-major where :meth:`layer_major_unavailable` finds no reason against it), layer-major (a
    ValueError where it cannot) or ordinary."""

    prefill_mode: str = "auto"

    def _init_prefill(self, prefill: str) -> None:
        if prefill not in PREFILL_MODES:
            raise ValueError(f"prefill must be auto, layer-major or ordinary, not {prefill!r}")
        self.prefill_mode = prefill

    def layer_major_unavailable(self, model) -> Optional[str]:
        """Why this policy cannot prefill layer-major on `model` (None: it can)."""
        return arch.layer_major_supported(model)

    def strategy(self, model) -> str:
        if self.prefill_mode == "ordinary" or self.layer_major_unavailable(model):
            return "ordinary"
        return "layer-major"

    def _check_prefill(self, model) -> None:
        why = self.layer_major_unavailable(model)
        if self.prefill_mode == "layer-major" and why:
            raise ValueError(why)
