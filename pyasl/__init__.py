"""pyasl: KV-cache pruning (ASL, SnapKV, FastKV, GemFilter, ZigZagKV, PyramidKV) for GGUF models in
llama.cpp.

The public API (imported lazily, so ``import pyasl`` stays cheap):

* :func:`load_model` -> :class:`Model`; :class:`Session` (chat over a pruned cache, save/load);
* policy objects :class:`ASL`, :class:`SnapKV`, :class:`FastKV`, :class:`ASL2Pass`,
  :class:`GemFilter`, :class:`ZigZag`, :class:`Pyramid`, :class:`Full` (base :class:`Policy`,
  :func:`make_policy`, :func:`register_policy`);
* :class:`Llama`: a drop-in ``llama_cpp.Llama`` with ``kv_policy=``;
* :func:`generate`: one-shot prefill, prune, decode (what ``pyasl generate`` runs).

Layout: ``pyasl.policies`` (one module per policy family over a small base class, numpy only),
``pyasl.engine`` (model, context, prefill passes and the three strategies that run a policy),
``pyasl.session``, ``pyasl.apps`` (command line, chat, server, the llama-cpp-python drop-in),
``pyasl.bench``. See README.md, section "Python API".
"""
from __future__ import annotations

__version__ = "0.1.0"

_WHERE = {
    "policies": ("ASL", "ASL2Pass", "FastKV", "Full", "GemFilter", "Policy", "Pyramid", "Selection", "SnapKV", "Spans",
                 "ZigZag", "make_policy", "policy_names", "register_policy"),
    "session": ("ContextFullError", "Session", "SessionFileError"),
    "engine": ("Model", "load_model"),
    "generation": ("GenerateResult", "generate"),
    "apps.llama": ("Llama",),
}

__all__ = sorted(name for names in _WHERE.values() for name in names)


def __getattr__(name):
    import importlib

    for module, names in _WHERE.items():
        if name in names:
            return getattr(importlib.import_module(f".{module}", __name__), name)
    raise AttributeError(f"module 'pyasl' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
