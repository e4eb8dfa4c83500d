"""ASL and ASL-2pass: the selection layer is the first layer whose token ranking has become stable
(rank-variance ratio below ``tau``, :func:`pyasl.policies.asl_rule.asl_select`).

* :class:`ASL` prefills layer-major where the architecture allows (``prefill="auto"``): the kept
  tokens alone go through the layers after the selection layer (one-shot propagation), and the
  layers up to it keep their own SnapKV sets (or per-layer budgets, ``layer_budgets``). With
  ``prefill="ordinary"`` every layer runs over every token and keeps ASL's set.
* :class:`ASL2Pass` stops the first pass at the selection layer and prefills the kept tokens again.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from .. import arch
from .asl_rule import asl_select
from .base import Policy, PrefillChoice, Selection, register_policy
from .layer_budgets import DEFAULT_B_MIN_FRAC, DEFAULT_BETA, DEFAULT_THETA, EarlyLayerBudgets
from .propagation import Propagates, parse_propagate
from .scoring import _check_unit, default_layer_params


class ASLSettings(NamedTuple):
    """What ASL runs with on a model for a prompt length: its tau, the propagation chosen with it by
    the model's calibration (None: the policy's own), and where they come from (None: not calibrated)."""

    tau: float
    propagate: Optional[str] = None
    source: Optional[str] = None


class _ASLRule(Policy):
    """The ASL rule's parameters and decisions, shared by ASL and ASL2Pass."""

    def __init__(self, budget: int = 512, window: int = 32, tau: Optional[float] = None, l_min: Optional[int] = None,
                 l_obs: Optional[int] = None, kernel: int = 7, span=None):
        super().__init__(budget=budget, window=window, kernel=kernel, span=span)
        self.tau = None if tau is None else _check_unit("tau", tau)
        self.l_min, self.l_obs = l_min, l_obs

    def params(self) -> dict:
        return {**super().params(), "tau": self.tau, "l_min": self.l_min, "l_obs": self.l_obs}

    def check_model(self, model) -> None:
        super().check_model(model)
        if self.l_min is not None and not 0 <= self.l_min < model.n_layer:
            raise ValueError(f"l_min {self.l_min} is outside the model's layers 0..{model.n_layer - 1}")

    def settings_for(self, model, n_tokens: Optional[int] = None) -> ASLSettings:
        """The tau and propagation used on `model` for a prompt of `n_tokens` (one calibration lookup):
        the policy's own tau; without one, the model's calibration nearest that length (then also where
        it comes from, for the selection note), else the paper's 0.3."""
        if self.tau is not None:
            return ASLSettings(self.tau)
        from ..calibration import DEFAULT_TAU, lookup

        cal = None if model is None or not hasattr(model, "path") else lookup(model, n_tokens)
        if cal is None:
            return ASLSettings(DEFAULT_TAU)
        return ASLSettings(cal.tau, self._calibrated_propagation(cal, model, n_tokens), cal.source)

    def _calibrated_propagation(self, cal, model, n_tokens: Optional[int]):
        """The calibration's propagation this policy takes (None: none; see ASL)."""
        return None

    def _asl(self, scores, window, layer_mask, model, n_layer: Optional[int] = None, passing: bool = False):
        """asl_select with this policy's parameters; L_min and L_obs default from the model's depth
        (``n_layer``; the scores may cover only the layers that ran so far). ``passing``: called by a
        layer-major pass (decide, decide_last), the only place a calibrated propagation applies, so the
        only one whose note names it (a selection from every layer's scores propagates nothing)."""
        d_min, d_obs = default_layer_params(n_layer or scores.shape[0])
        tau, prop, source = self.settings_for(model, scores.shape[-1])
        sel = asl_select(scores, window=window, budget=self.budget, tau=tau,
                         l_min=d_min if self.l_min is None else self.l_min,
                         l_obs=d_obs if self.l_obs is None else self.l_obs,
                         kernel=self.kernel, layer_mask=layer_mask, span=self.span)
        if source:
            with_prop = "" if prop is None or not passing else f", propagate {prop}"
            sel.note = f"{sel.note} (tau {tau:g}{with_prop}: the model's {source})"
        return sel

    def _shared(self, sel) -> Selection:
        return Selection(shared=sel.kept, layer=sel.selected_layer, note=sel.note, asl=sel)

    def select(self, scores, window, model, layer_mask=None) -> Selection:
        return self._shared(self._asl(scores, window, layer_mask, model))

    def decide(self, layer, scores, model, layer_mask=None) -> Optional[Selection]:
        l_min = self.l_min if self.l_min is not None else default_layer_params(model.n_layer)[0]
        if layer > l_min and (layer_mask is None or layer_mask[layer]):
            s = self._asl(scores[: layer + 1], self.window, None if layer_mask is None else layer_mask[: layer + 1],
                          model, n_layer=model.n_layer, passing=True)
            if s.selected_layer is not None:
                return self._shared(s)
        return None

    def decide_last(self, scores, model, layer_mask=None) -> Selection:
        return self._shared(self._asl(scores, self.window, layer_mask, model, n_layer=model.n_layer, passing=True))


@register_policy
class ASL(PrefillChoice, EarlyLayerBudgets, Propagates, _ASLRule):
    """ASL: one token set past the selection layer, chosen where the ranking is stable (see the
    module doc). ``prefill``: auto, layer-major or ordinary. ``layer_budgets`` (zigzag, pyramid,
    uniform; ``theta``, ``b_min_frac``, ``beta``): per-layer budgets for the layers up to the
    selection layer. ``propagate``: tokens sent past the selection layer (:mod:`.propagation`)."""

    name = "asl"

    def __init__(self, budget: int = 512, window: int = 32, tau: Optional[float] = None, l_min: Optional[int] = None,
                 l_obs: Optional[int] = None, kernel: int = 7, prefill: str = "auto", span=None,
                 layer_budgets: Optional[str] = None, theta: float = DEFAULT_THETA,
                 b_min_frac: float = DEFAULT_B_MIN_FRAC, beta: float = DEFAULT_BETA, propagate=None):
        super().__init__(budget=budget, window=window, tau=tau, l_min=l_min, l_obs=l_obs, kernel=kernel, span=span)
        self._init_prefill(prefill)
        self._init_budgets(layer_budgets, theta, b_min_frac, beta)
        self._init_propagate(propagate)

    def params(self) -> dict:
        return {**super().params(), "prefill": self.prefill_mode, **self._budget_params(), **self._propagate_params()}

    def per_head(self, model) -> bool:
        return self.layer_budgets is not None or self.strategy(model) == "layer-major"

    def check_model(self, model) -> None:
        self._check_prefill(model)
        self._check_budget_model(model)
        self._check_propagate_model(model)
        super().check_model(model)

    def _calibrated_propagation(self, cal, model, n_tokens: Optional[int]):
        """The propagation the calibration chose with its tau (N or "N:kept", scaled to the prompt),
        when this policy takes the calibrated defaults: no propagate and no layer budgets of its own, a
        layer-major prefill on a model without sliding windows; else None."""
        if self.propagate is not None or self.layer_budgets or not n_tokens or model.n_swa > 0 \
                or self.strategy(model) != "layer-major":
            return None
        spec = cal.propagate_for(n_tokens)
        return spec if spec is not None and parse_propagate(spec)[0] > self.budget else None

    def propagation_for(self, model, n_tokens: int):
        spec = self.settings_for(model, n_tokens).propagate
        return super().propagation_for(model, n_tokens) if spec is None else parse_propagate(spec)

    def select(self, scores, window, model, layer_mask=None) -> Selection:
        sel = self._asl(scores, window, layer_mask, model)
        if not self.layer_budgets:
            return self._shared(sel)
        # ordinary prefill: layers up to the selection layer get per-layer budgets, the later ones ASL's set
        last = sel.selected_layer if sel.selected_layer is not None else scores.shape[0] - 1
        out = self.early_layers(scores[: last + 1], sel.kept, model, window)
        out.layer, out.note, out.asl = sel.selected_layer, sel.note, sel
        return out


@register_policy
class ASL2Pass(_ASLRule):
    """ASL two-pass: select with ASL (a layer-major first pass that stops at the selection layer
    where the architecture allows, else an ordinary one), then prefill only the kept tokens at
    their original positions. A conversation is pruned in place with the ASL selection."""

    name = "asl-2pass"

    def strategy(self, model) -> str:
        return "two-pass"

    def first_pass(self, model) -> str:
        return "ordinary" if arch.layer_major_supported(model) else "layer-major"
