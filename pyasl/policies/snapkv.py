"""SnapKV (Li et al. 2024): every layer and KV head keeps its own top-k of the window scores."""
from __future__ import annotations

from .base import Policy, Selection, register_policy
from .snapkv_rule import snapkv_select_all


@register_policy
class SnapKV(Policy):
    """SnapKV: every layer and KV head keeps its own top-``budget`` cells (ordinary prefill)."""

    name = "snapkv"

    def per_head(self, model) -> bool:
        return True

    def select(self, scores, window, model, layer_mask=None) -> Selection:
        return Selection(per_head=snapkv_select_all(scores, window, self.budget, model.n_head_kv, kernel=self.kernel,
                                                    span=self.span))
