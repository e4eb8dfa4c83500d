"""FastKV and GemFilter: the ranking of a fixed selection layer chooses the kept tokens.

* :class:`FastKV` (arXiv 2502.01068) prefills layer-major: the kept tokens alone go through the
  layers after ``layer`` (one-shot propagation); the layers up to it keep their own SnapKV sets.
* :class:`GemFilter` (arXiv 2409.17422) runs a first pass that stops after ``layer``, then
  prefills only the kept tokens again at their positions.

Without a ``layer`` both take the reference scripts' layer scaled by depth: FastKV layer 15 and
GemFilter layer 13 of a 32-layer model (:func:`default_layer`).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .. import arch
from .asl_rule import asl_select_at_layer
from .base import Policy, Selection, register_policy
from .layer_budgets import DEFAULT_B_MIN_FRAC, DEFAULT_BETA, DEFAULT_THETA, EarlyLayerBudgets
from .propagation import Propagates
from .scoring import latest_ranked_layer


def default_layer(n_layer: int, layer_of_32: int) -> int:
    """Layer ``layer_of_32`` of a 32-layer model scaled to ``n_layer`` layers (rounded half up)."""
    return min(n_layer - 1, int(layer_of_32 * n_layer / 32 + 0.5))


class _FixedLayer(Policy):
    reference_layer = 0  # of 32 layers, when no layer is given

    def __init__(self, layer: Optional[int] = None, budget: int = 512, window: int = 32, kernel: int = 7, span=None):
        super().__init__(budget=budget, window=window, kernel=kernel, span=span)
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0):
            raise ValueError(f"policy {self.name} needs a selection layer >= 0, got {layer!r}")
        self.layer = None if layer is None else int(layer)

    def params(self) -> dict:
        return {"layer": self.layer, **super().params()}

    @classmethod
    def library_layer(cls, n_layer: int) -> int:
        """The selection layer on an `n_layer` model when no ``layer`` is given."""
        return default_layer(n_layer, cls.reference_layer)

    def layer_for(self, model) -> int:
        """The selection layer on `model` (``layer``, or the depth-scaled reference layer)."""
        return self.library_layer(model.n_layer) if self.layer is None else self.layer

    def check_model(self, model) -> None:
        if self.layer is not None and self.layer >= model.n_layer:
            raise ValueError(f"--layer {self.layer} is outside the model's layers 0..{model.n_layer - 1} "
                             f"(policy {self.name} needs --layer in 0..{model.n_layer - 1})")
        super().check_model(model)

    def check_prompt(self, model, layer_mask=None) -> None:
        latest_ranked_layer(layer_mask, self.layer_for(model))  # ValueError before the first global layer

    def _kept(self, scores, window, model, layer_mask) -> Selection:
        layer = self.layer_for(model)
        mask = None if layer_mask is None else layer_mask[: layer + 1]
        ranking = latest_ranked_layer(mask, layer)  # ValueError before the first global layer
        kept = asl_select_at_layer(scores[: layer + 1], window=window, budget=self.budget, layer=layer,
                                   kernel=self.kernel, layer_mask=mask, span=self.span)
        note = "" if ranking == layer else f"ranks from layer {ranking}, the latest full-attention layer <= {layer}"
        return Selection(shared=kept, layer=layer, note=note)


@register_policy
class FastKV(EarlyLayerBudgets, Propagates, _FixedLayer):
    """FastKV: the ranking of ``layer`` chooses the tokens propagated past it (layer-major prefill);
    layers up to ``layer`` keep their own SnapKV sets (or per-layer budgets, ``layer_budgets``).
    ``propagate``: how many go on (FastKV's TSP length; default the budget, :mod:`.propagation`)."""

    name = "fastkv"
    reference_layer = 15

    def __init__(self, layer: Optional[int] = None, budget: int = 512, window: int = 32, kernel: int = 7, span=None,
                 layer_budgets: Optional[str] = None, theta: float = DEFAULT_THETA,
                 b_min_frac: float = DEFAULT_B_MIN_FRAC, beta: float = DEFAULT_BETA, propagate=None):
        super().__init__(layer=layer, budget=budget, window=window, kernel=kernel, span=span)
        self._init_budgets(layer_budgets, theta, b_min_frac, beta)
        self._init_propagate(propagate)

    def params(self) -> dict:
        return {**super().params(), **self._budget_params(), **self._propagate_params()}

    def strategy(self, model) -> str:
        return "layer-major"

    def per_head(self, model) -> bool:
        return True

    def check_model(self, model) -> None:
        self._check_budget_model(model)
        self._check_propagate_model(model)
        super().check_model(model)
        why = arch.layer_major_supported(model)
        if why:
            raise ValueError(f"policy fastkv needs layer-major prefill: {why}")

    def decide(self, layer, scores, model, layer_mask=None) -> Optional[Selection]:
        return self._kept(scores, self.window, model, layer_mask) if layer == self.layer_for(model) else None

    def select(self, scores, window, model, layer_mask=None) -> Selection:
        """A conversation pruned in place: the layer-major cache (SnapKV sets up to ``layer``, the kept
        set after it)."""
        sel = self._kept(scores, window, model, layer_mask)
        out = self.early_layers(scores[: sel.layer + 1], sel.shared, model, window)
        out.layer, out.note = sel.layer, sel.note
        return out


@register_policy
class GemFilter(_FixedLayer):
    """GemFilter: a first pass that stops after ``layer`` ranks the tokens, a second pass prefills
    only the kept ones. A conversation is pruned in place with the ranking of ``layer``."""

    name = "gemfilter"
    reference_layer = 13

    def strategy(self, model) -> str:
        return "two-pass"

    def first_pass_stop(self, model) -> Optional[int]:
        return self.layer_for(model)

    def decide(self, layer, scores, model, layer_mask=None) -> Optional[Selection]:
        return self._kept(scores, self.window, model, layer_mask) if layer == self.layer_for(model) else None

    def select(self, scores, window, model, layer_mask=None) -> Selection:
        return self._kept(scores, window, model, layer_mask)


@register_policy
class GemFilterPublished(GemFilter):
    """GemFilter as its authors run it (arXiv 2409.17422, SalesforceAIResearch/GemFilter): at the
    filter layer the last query's raw q.k products (no scale, no softmax) summed over the query heads,
    averaged over 5 neighbours, rank the tokens; the top ``budget`` (the last token among them) are
    prefilled again as a new prompt, at positions 0..k-1. :class:`GemFilter` is pyasl's variant:
    softmax attention of the last ``window`` tokens and the original positions. A benchmark baseline:
    a conversation cannot continue after it (engine.strategies.check_continuable)."""

    name = "gemfilter-published"
    score = "qk"
    renumbers_positions = True

    def __init__(self, layer: Optional[int] = None, budget: int = 512, span="token"):
        super().__init__(layer=layer, budget=budget, window=1, kernel=5, span=span)

    def params(self) -> dict:
        p = super().params()
        return {k: p[k] for k in ("layer", "budget", "span")}


FIXED_LAYER_POLICIES = (FastKV.name, GemFilter.name, GemFilterPublished.name)  # the policies that take a layer
