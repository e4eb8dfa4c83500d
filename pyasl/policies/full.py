"""Full KV: nothing is pruned (the baseline)."""
from __future__ import annotations

from .base import Policy, Selection, register_policy
from .spans import TOKEN


@register_policy
class Full(Policy):
    """No pruning: the whole prompt (and conversation) must fit into the context."""

    name = "full"
    prunes = False

    def __init__(self):
        self.budget, self.window, self.kernel, self.span, self.span_given = None, 32, 7, TOKEN, True

    def params(self) -> dict:
        return {}

    def select(self, scores, window, model, layer_mask=None) -> Selection:
        return Selection()
