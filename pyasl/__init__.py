"""pyasl: KV-cache pruning (ASL, SnapKV, FastKV, GemFilter, ...) for GGUF models in llama.cpp.

The public API (imported lazily, so ``import pyasl`` stays cheap):

* :func:`load_model` -> :class:`Model`; :class:`Session` (chat over a pruned cache, save/load);
* policy objects :class:`ASL`, :class:`SnapKV`, :class:`FastKV`, :class:`ASL2Pass`,
  :class:`GemFilter`, :class:`Full` (base :class:`Policy`, :func:`make_policy`, :func:`register_policy`);
* :class:`Llama`: a drop-in ``llama_cpp.Llama`` with ``kv_policy=``;
* :func:`generate`: one-shot prefill, prune, decode (what ``pyasl generate`` runs).

See README.md, section "Python API".
"""
from __future__ import annotations

__version__ = "0.1.0"

_SESSION = ("ASL", "ASL2Pass", "ContextFullError", "FastKV", "Full", "GemFilter", "Policy", "Selection", "Session",
            "SessionFileError", "SnapKV", "load_model", "make_policy", "policy_names", "register_policy")
_ENGINE = ("Model", "generate")

__all__ = list(_SESSION + _ENGINE) + ["Llama"]


def __getattr__(name):
    if name in _SESSION:
        from . import session

        return getattr(session, name)
    if name in _ENGINE:
        from . import engine

        return getattr(engine, name)
    if name == "Llama":
        from .llama import Llama

        return Llama
    raise AttributeError(f"module 'pyasl' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
