"""What llama.cpp architectures allow: layer-major prefill, per-head selection, sliding windows.

Facts about models (duck-typed: anything with ``arch``, ``n_layer``, ``n_swa``, ``swa_layers``,
``swa_type``, ``pruning_unsupported``), shared by the policies, which refuse what a model cannot
run, and the engine, which runs what they chose.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

# architectures whose graph builders honour the layer range of patches/0003 (layer-major prefill)
LAYER_RANGE_ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "phi3", "mistral3")
# sliding-window (iSWA) caches in layer-major prefill: tested there
SWA_LAYER_MAJOR_ARCHS = ("gemma3",)
# architectures whose llama.cpp loader turns ALiBi on itself, without attention.max_alibi_bias in the GGUF
# (src/models/{bloom,refact,jina-bert-v2}.cpp; baichuan only for its 40-layer 13B: models/baichuan.cpp)
ALIBI_ARCHS = ("bloom", "refact", "jina-bert-v2")


def layer_major_supported(model) -> Optional[str]:
    """None when layer-major prefill works for this model, else the reason."""
    if model.arch not in LAYER_RANGE_ARCHS:
        return f"layer-major prefill is not implemented for architecture {model.arch!r}"
    if model.n_swa > 0 and (model.arch not in SWA_LAYER_MAJOR_ARCHS or model.swa_type != 1):
        return (f"layer-major prefill handles the sliding-window caches of {', '.join(SWA_LAYER_MAJOR_ARCHS)} "
                f"only, not {model.arch!r}")
    if model.n_swa > 0 and all(model.swa_layers):
        return "every layer uses the sliding window (no full-context KV cache)"
    return None


def check_prunable(model, policy: str, per_head: bool) -> None:
    """Raise ValueError when this model's architecture forbids pruning with `policy` (MLA: no pruning;
    multi-axis RoPE and ALiBi: no per-head selection)."""
    why = model.pruning_unsupported(per_head)
    if why:
        alt = "; use policy full" if model.pruning_unsupported(False) else \
            ("; use policy asl with prefill_mode ordinary (--prefill ordinary) and no layer budgets, asl-2pass, "
             "gemfilter or full")
        raise ValueError(f"policy {policy} cannot run on this model: {why}{alt}")


def ranked_layer_mask(model, n_prompt: int) -> Optional[np.ndarray]:
    """The layers whose window scores may rank a prompt of n_prompt tokens
    (policies.scoring.ranked_layer_mask): None (all) unless the model has sliding-window layers and
    the prompt is longer than the window."""
    from .policies.scoring import ranked_layer_mask as mask_of

    if model.n_swa <= 0:
        return None
    return mask_of(model.swa_layers, model.n_swa, n_prompt)


def swa_window(model, n: int) -> Optional[np.ndarray]:
    """Prompt positions a sliding-window cache keeps after the prompt (the last n_swa, as llama.cpp's
    state save does); None for a model without one."""
    if model.n_swa <= 0:
        return None
    return np.arange(max(0, n - model.n_swa), n, dtype=np.int64)
