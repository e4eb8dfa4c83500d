"""The engine: a GGUF model on our patched libllama, contexts with window-score capture, the
prefill passes and the three prefill strategies that run a policy, and greedy decoding.

* :mod:`.model` -- :class:`Model` (weights, vocabulary, chat template);
* :mod:`.context` -- :class:`Context` (decode, layer ranges, scores, KV operations, state);
* :mod:`.prefill` -- the passes (ordinary, layer-major, one-shot propagation, two-pass) and the
  cache operations that prune;
* :mod:`.strategies` -- a policy object run on a prompt (:func:`run`), what generate, Session,
  pyasl.Llama and the server call;
* :mod:`.full_copy` -- :class:`FullCopy`, the unpruned KV of a conversation or prompt prefix kept
  beside a decode context, so that each question selects again (per-question selection);
* :mod:`.decode` -- :func:`greedy_decode`.

One sequence (seq 0) per context; everything goes through llama.cpp's C API (llama-cpp-python's
ctypes layer) and the pyasl C API in native/.
"""
from __future__ import annotations

from ..arch import check_prunable, layer_major_supported, ranked_layer_mask
from .context import SEQ, Context
from .decode import Decoded, greedy_decode
from .model import ClosedError, Model, ModelLoadError, load_model
from .prefill import LayerBudgets, Prefill, prefill, prefill_kept, shrink_context
from .strategies import Pruned, PrunedPrefill, layer_major_prefill, run

POLICIES = ("full", "snapkv", "asl", "fastkv", "asl-2pass", "gemfilter", "zigzag", "pyramid")


__all__ = ["SEQ", "POLICIES", "ClosedError", "Context", "Decoded", "LayerBudgets", "Model", "ModelLoadError",
           "Prefill", "Pruned", "PrunedPrefill", "check_prunable", "greedy_decode", "layer_major_prefill", "load_model",
           "layer_major_supported", "prefill", "prefill_kept", "ranked_layer_mask", "run", "shrink_context"]
