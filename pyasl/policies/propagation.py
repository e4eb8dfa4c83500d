"""How many tokens go on past the selection layer of a layer-major policy (ASL, FastKV).

By default the selection layer's kept set is both what the deeper layers run over and what every
one of them keeps: ``budget`` tokens. FastKV's authors set the two apart (arXiv 2502.01068: the
TSP length, 2,048 tokens or a share of the prompt, beside the KV budget): with ``propagate`` larger
than the budget, the selection layer's top ``propagate`` tokens run through the deeper layers, and
each deeper layer keeps its own SnapKV sets of ``budget`` cells from them, ranked by that layer's
window attention. A token the selection layer ranks just below the budget can then still be kept
where a deeper layer attends to it; the cost is the deeper layers' work over ``propagate`` tokens.

``propagate="N:kept"`` runs the same N tokens through the deeper layers but has every deeper layer
keep the selection layer's set, as by default: the wider set only informs what the deeper layers
compute (the kept tokens' K/V and the last token's hidden state).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .asl_rule import asl_select_at_layer


DEEP_KEEPS = ("own", "kept")  # what a deeper layer keeps of the propagated tokens


def parse_propagate(value) -> tuple[Optional[int], str]:
    """``propagate`` as (tokens, what the deeper layers keep): None, an integer N (own sets) or "N:kept"."""
    if value is None:
        return None, "own"
    if isinstance(value, str):
        n, _, keep = value.partition(":")
        keep = keep or "own"
        if keep not in DEEP_KEEPS or not n.strip().isdigit():
            raise ValueError(f"propagate must be a token count N or N:kept, got {value!r}")
        return int(n), keep
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"propagate must be an integer, got {value!r}")
    return int(value), "own"


def format_propagate(n: Optional[int], keep: str = "own"):
    """The inverse of :func:`parse_propagate`: None, N, or "N:kept"."""
    return None if n is None else n if keep == "own" else f"{n}:{keep}"


def normalize_propagate(value):
    """``propagate`` in one spelling (ValueError on bad input): "4096" -> 4096, "4096:kept" stays."""
    return format_propagate(*parse_propagate(value))


class Propagates:
    """Mixin for the layer-major policies (ASL, FastKV): the ``propagate`` option (None: the budget;
    N; "N:kept")."""

    propagate: Optional[int] = None
    deep_keep: str = "own"

    def _init_propagate(self, value) -> None:
        propagate, self.deep_keep = parse_propagate(value)
        if propagate is None:
            self.propagate = None
            return
        if propagate < self.budget:
            raise ValueError(f"propagate {propagate} is smaller than the budget {self.budget}: the tokens that go "
                             "on past the selection layer include the kept ones")
        if getattr(self, "layer_budgets", None):
            raise ValueError(f"propagate does not combine with layer budgets ({self.layer_budgets}): the deeper "
                             "layers keep the budget each")
        self.propagate = None if propagate == self.budget else int(propagate)

    def _propagate_params(self) -> dict:
        return {} if self.propagate is None else {"propagate": format_propagate(self.propagate, self.deep_keep)}

    def propagation_for(self, model, n_tokens: int) -> tuple[Optional[int], str]:
        """(tokens propagated or None for the budget, what the deeper layers keep) on `model` for a
        prompt of `n_tokens`: the policy's own setting."""
        return self.propagate, self.deep_keep

    def deep_layer_set(self, scores: np.ndarray, kept: np.ndarray, model, keep: str = "own") -> np.ndarray:
        """What a layer past the selection layer keeps, as ``(n_head_kv, budget)`` indices into the
        propagated tokens: its own SnapKV sets from its ``(n_head, n_propagated)`` window scores, or
        (``keep="kept"``) ``kept``, the indices of the selection layer's set."""
        if keep == "kept":
            return np.tile(np.asarray(kept, dtype=np.int64), (model.n_head_kv, 1))
        return self.early_layer_set(scores, model)

    def _check_propagate_model(self, model) -> None:
        if self.propagate is None:
            return
        if model.n_swa > 0:
            raise ValueError(f"propagate is not supported on sliding-window models yet ({model.arch}); "
                             "leave it out (the kept set alone goes on)")
        if self.strategy(model) != "layer-major":
            raise ValueError(f"propagate applies to a layer-major prefill; policy {self.name} prefills "
                             f"{self.strategy(model)} here")

    def propagated(self, scores: np.ndarray, kept: np.ndarray, model=None) -> np.ndarray:
        """The positions that go on past the selection layer ``L = len(scores) - 1`` (``scores``: rows
        0..L): ``kept`` alone by default, else the best of layer L's ranking (through the span stage,
        window included; :meth:`propagation_for` says how many) joined with ``kept``; sorted."""
        kept = np.asarray(kept, dtype=np.int64)
        n_prop, _ = self.propagation_for(model, scores.shape[-1])
        if n_prop is None or n_prop <= len(kept):
            return kept
        wide = asl_select_at_layer(scores, window=self.window, budget=n_prop, layer=scores.shape[0] - 1,
                                   kernel=self.kernel, span=self.span)
        return np.union1d(kept, wide).astype(np.int64)


def propagating_policies() -> list[str]:
    """The registered policies that take ``propagate``."""
    from .base import _REGISTRY

    return [name for name, cls in _REGISTRY.items() if issubclass(cls, Propagates)]
