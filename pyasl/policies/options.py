"""Policies from keyword options: the interface of ``pyasl.generate(policy="asl", budget=..., ...)``,
``SharedPrefill.derive`` and the command line."""
from __future__ import annotations

import inspect as _inspect
from typing import Optional

from .base import _REGISTRY, PREFILL_MODES, Policy, make_policy
from .layer_budgets import check_method


def policy_from_options(name: str, budget: Optional[int] = 512, window: int = 32, tau: Optional[float] = None,
                        l_min: Optional[int] = None, l_obs: Optional[int] = None, kernel: int = 7,
                        layer: Optional[int] = None, prefill_mode: str = "auto", layer_budgets: Optional[str] = None,
                        budget_opts: Optional[dict] = None, span=None, propagate=None) -> Policy:
    """A policy from engine.generate's keyword options: each policy takes the options it has and
    ignores the others (tau means nothing to snapkv); ``prefill_mode`` is ASL's and SnapKV's ``prefill``,
    ``budget_opts`` the per-layer budget options (theta, b_min_frac, beta)."""
    if prefill_mode not in PREFILL_MODES:
        raise ValueError(f"prefill_mode must be auto, layer-major or ordinary, not {prefill_mode!r}")
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(_REGISTRY)}")
    opts = dict(budget_opts or {})
    unknown = set(opts) - {"theta", "b_min_frac", "beta"}
    if unknown:
        raise ValueError(f"unknown layer-budget options {sorted(unknown)}; use theta, b_min_frac, beta")
    if layer_budgets is not None:
        check_method(layer_budgets)
        if name != "asl":
            raise ValueError(f"layer budgets ({layer_budgets}) apply to policy asl only, not {name!r} "
                             "(use --policy zigzag or --policy pyramid alone)")
    if cls.prunes and budget is None:
        raise ValueError(f"policy {name} needs a budget")
    given = dict(budget=budget, window=window, tau=tau, l_min=l_min, l_obs=l_obs, kernel=kernel, layer=layer,
                 prefill=prefill_mode, layer_budgets=layer_budgets, span=span, propagate=propagate, **opts)
    params = _inspect.signature(cls.__init__).parameters
    return make_policy(name, **{k: v for k, v in given.items() if k in params})
