"""KV policies: one object per policy over a small base class (:mod:`.base`), and the numpy
selection rules they use.

Policies (by name, :func:`make_policy`): ``full`` (:class:`Full`), ``snapkv`` (:class:`SnapKV`),
``asl`` (:class:`ASL`), ``asl-2pass`` (:class:`ASL2Pass`), ``fastkv`` (:class:`FastKV`),
``gemfilter`` (:class:`GemFilter`), ``gemfilter-published``
(:class:`GemFilterPublished`), ``zigzag`` (:class:`ZigZag`), ``pyramid`` (:class:`Pyramid`).

Rules and building blocks (numpy only): :mod:`.scoring` (pooling, ranks, layer masks),
:mod:`.spans` (how scores become kept positions), :mod:`.asl_rule` (the ASL rule, fixed-layer
ranking, inspection), :mod:`.snapkv_rule`, :mod:`.layer_budgets` (ZigZagKV and PyramidKV schedules);
:mod:`.options` builds a policy from keyword options (pyasl.generate's interface).
"""
from __future__ import annotations

from .asl import ASL, ASL2Pass
from .asl_rule import ASLSelection, asl_select, asl_select_at_layer, inspect_layers
from .base import Policy, Selection, make_policy, policy_names, register_policy
from .fixed_layer import FastKV, GemFilter, GemFilterPublished, default_layer
from .full import Full
from .layer_budgets import Pyramid, ZigZag
from .options import policy_from_options
from .scoring import (POOL_MODES, default_layer_params, descending_ranks, latest_ranked_layer, pool_scores,
                      ranked_layer_mask)
from .snapkv import SnapKV
from .snapkv_rule import snapkv_select, snapkv_select_all
from .spans import DEFAULT_SPAN, Spans

__all__ = [
    "ASL", "ASL2Pass", "ASLSelection", "DEFAULT_SPAN", "FastKV", "Full", "GemFilter", "GemFilterPublished",
    "POOL_MODES", "Policy",
    "Pyramid", "Selection", "SnapKV", "Spans", "ZigZag", "asl_select", "asl_select_at_layer", "default_layer",
    "default_layer_params", "descending_ranks", "inspect_layers", "latest_ranked_layer", "make_policy",
    "policy_from_options", "policy_names", "pool_scores", "ranked_layer_mask", "register_policy", "snapkv_select", "snapkv_select_all",
]
