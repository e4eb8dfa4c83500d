"""SnapKV (Li et al. 2024): every layer and KV head keeps its own top-k of the window scores.

Each layer's kept cells depend on that layer's scores alone, so where the architecture allows
(``prefill="auto"``) SnapKV prefills layer-major and prunes each layer as soon as it ran: the same
cells and logits as an ordinary prefill, with one layer of full-prompt K/V held at a time instead
of every layer's (:func:`pyasl.engine.strategies._run_layer_major_streamed`)."""
from __future__ import annotations

from typing import Optional

from .base import Policy, PrefillChoice, Selection, register_policy
from .snapkv_rule import snapkv_select_all


@register_policy
class SnapKV(PrefillChoice, Policy):
    """SnapKV: every layer and KV head keeps its own top-``budget`` cells. ``prefill``: auto,
    layer-major (pruned layer by layer) or ordinary."""

    name = "snapkv"

    def __init__(self, budget: int = 512, window: int = 32, kernel: int = 7, span=None, prefill: str = "auto"):
        super().__init__(budget=budget, window=window, kernel=kernel, span=span)
        self._init_prefill(prefill)

    def params(self) -> dict:
        return {**super().params(), "prefill": self.prefill_mode}

    def per_head(self, model) -> bool:
        return True

    def layer_major_unavailable(self, model) -> Optional[str]:
        if not self.streams_early_layers(model):
            return ("snapkv prefills layer-major only where each layer can be pruned as it runs, not on models "
                    "with sliding-window layers")
        return super().layer_major_unavailable(model)

    def check_model(self, model) -> None:
        self._check_prefill(model)
        super().check_model(model)

    def select(self, scores, window, model, layer_mask=None) -> Selection:
        return Selection(per_head=snapkv_select_all(scores, window, self.budget, model.n_head_kv, kernel=self.kernel,
                                                    span=self.span))

    # layer-major: no selection layer; every layer keeps its own sets (early_layer_set), all of them
    # chosen from the layer's own scores, as select() does
    def decide(self, layer, scores, model, layer_mask=None) -> Optional[Selection]:
        return None

    def decide_last(self, scores, model, layer_mask=None) -> Selection:
        return self.select(scores, self.window, model, layer_mask)
