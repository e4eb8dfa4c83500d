"""`pyasl.Llama`: llama-cpp-python's ``Llama`` with KV pruning -- change one import.

    from pyasl import Llama, ASL                 # instead of: from llama_cpp import Llama
    llm = Llama("model.gguf", n_ctx=4096, kv_policy=ASL(budget=512))
    llm.create_completion(long_prompt, max_tokens=128)
    llm.create_chat_completion(messages=[...], stream=True)

Every prompt longer than the budget is prefilled with the policy (the same prefill and selection
as ``pyasl generate``, in a temporary context of its own on the same weights) and the pruned
cache is moved into this Llama's context at the tokens' original positions; the prompt's last
token is then decoded by llama-cpp-python over the pruned cache, so sampling, logits processors,
grammars, stop strings and streaming work unchanged. ``last_prune`` describes the latest pruning.

A pruned cache is never reused as if it held the whole prompt: the next call after a pruned one
starts from an empty cache (llama-cpp-python's longest-prefix reuse is skipped once), and states
saved for ``set_cache`` from a pruned cache are stored as empty so they never count as a hit.
Prompts must still fit ``n_ctx`` (llama-cpp-python's own check); what pruning saves is decode time
and KV cells in use.
"""
from __future__ import annotations

import ctypes
import sys
import warnings
import weakref
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .. import _native
from ..engine.model import Model, ModelLoadError, _check_gguf
from ..engine.strategies import prefill_state
from ..policies import Policy, make_policy

_llama_cpp, _lib, _ = _native.load()  # our libllama, before llama_cpp.Llama is touched

import llama_cpp  # noqa: E402


def _borrow_model(llm: "llama_cpp.Llama") -> Model:
    """A pyasl Model view of the weights llama-cpp-python already loaded (not freed by pyasl)."""
    m = Model.__new__(_Borrowed)
    m._contexts = weakref.WeakSet()  # contexts made on these weights, closed before them
    m.path = Path(llm.model_path)
    m._m = llm._model.model
    m.gguf = _check_gguf(m.path)
    m._read_sizes()
    m.chat_template = None
    return m


class LlamaModelError(ModelLoadError, ValueError):
    """A model file pyasl refuses before llama.cpp sees it (missing, not GGUF, truncated, corrupt metadata
    llama.cpp would abort on, unsupported architecture); a ValueError like llama-cpp-python's load errors."""


class _Borrowed(Model):
    def close(self) -> None:
        self._m = None  # owned by llama_cpp.Llama


class Llama(llama_cpp.Llama):
    """``llama_cpp.Llama`` plus ``kv_policy``: a :class:`pyasl.Policy` object (``ASL(budget=512)``,
    ``SnapKV(...)``, ...) or a policy name; ``None`` behaves exactly like llama-cpp-python.

    Every other argument is llama-cpp-python's. ``last_prune`` (a dict or None) and ``n_prunes``
    report what was pruned."""

    def __init__(self, *args, kv_policy: Union[Policy, str, None] = None, **kwargs):
        path = kwargs.get("model_path", args[0] if args else None)
        if path is not None:  # the GGUF pre-check first: llama.cpp aborts the process on some corrupt files
            try:
                _check_gguf(Path(path))
            except ModelLoadError as e:
                raise LlamaModelError(str(e)) from None
        super().__init__(*args, **kwargs)
        if isinstance(kv_policy, str):
            kv_policy = make_policy(kv_policy)
        if kv_policy is not None and not isinstance(kv_policy, Policy):
            raise ValueError(f"kv_policy must be a pyasl Policy, a policy name or None, got {kv_policy!r}")
        self._pyasl_model = _borrow_model(self)
        if kv_policy is not None:
            kv_policy.check_model(self._pyasl_model)
            if self._pyasl_model.n_swa > 0:
                raise ValueError("pyasl.Llama does not prune sliding-window models yet")
        self.kv_policy = kv_policy
        if kv_policy is not None and kv_policy.prunes and kv_policy.budget >= self.n_ctx() - 1:
            warnings.warn(f"pyasl.Llama: budget {kv_policy.budget} >= n_ctx {self.n_ctx()} - 1: every prompt that fits "
                          "the context is within the budget, so none will be pruned", stacklevel=2)
        self._pyasl_pruned = False
        self.last_prune: Optional[dict] = None
        self.n_prunes = 0
        self.on_prune = None  # optional callable(last_prune), e.g. a server's request log

    def close(self) -> None:
        if "_stack" in self.__dict__:  # a Llama refused before llama-cpp-python's __init__ ran holds nothing
            super().close()

    # -- the pruned prefill ----------------------------------------------------------------------
    def _kv_info(self):
        info = _native.PyaslKvInfo()
        _native.check(_lib.pyasl_kv_get_info(self._ctx.ctx, ctypes.byref(info)), "kv info")
        return info

    def kv_cells(self) -> int:
        """KV cells in use in this Llama's context."""
        return int(self._kv_info().used_base)

    def _should_prune(self, tokens) -> bool:
        pol = self.kv_policy
        return (pol is not None and pol.prunes and self.n_tokens == 0
                and len(tokens) > max(pol.budget, pol.window + 1))

    def eval(self, tokens):
        tokens = list(tokens)
        if tokens and (min(tokens) < 0 or max(tokens) >= self._n_vocab):
            raise ValueError(f"tokens must be token ids in 0..{self._n_vocab - 1}")
        room = min(len(self.input_ids), self._n_ctx)  # llama.cpp may round n_ctx up past input_ids' size
        if self.n_tokens + len(tokens) > room:  # llama-cpp-python's wording: its server answers 400 to it
            raise ValueError(f"Requested tokens ({self.n_tokens + len(tokens)}) exceed context window of {room}")
        if self.n_tokens == 0:
            self._pyasl_pruned = False  # llama-cpp-python's eval clears the sequence from position 0
        if not self._should_prune(tokens):
            return super().eval(tokens)
        head, last = tokens[:-1], tokens[-1]
        info = self._kv_info()
        cp = self.context_params
        pol = self.kv_policy
        if pol.budget - 1 > pol.window:  # the last prompt token takes one more cell: budget stays a hard cap
            pol = pol.replace(budget=pol.budget - 1)
        pp = prefill_state(self._pyasl_model, head, pol, n_threads=cp.n_threads_batch, flash_attn=not info.v_trans,
                           n_batch=self.n_batch)
        mem = llama_cpp.llama_get_memory(self._ctx.ctx)
        llama_cpp.llama_memory_clear(mem, True)
        buf = (ctypes.c_uint8 * len(pp.state)).from_buffer_copy(pp.state)
        if llama_cpp.llama_state_seq_set_data(self._ctx.ctx, buf, len(pp.state), 0) == 0:
            raise RuntimeError(f"the pruned cache ({pp.n_kept} cells) does not fit this Llama's context "
                               f"(n_ctx {self.n_ctx()})")
        if pp.layer_cells is not None:  # per-layer budgets (zigzag, pyramid): the state bytes do not carry them
            c = np.ascontiguousarray(pp.layer_cells, dtype=np.int32)
            _native.check(_lib.pyasl_kv_set_layer_cells(self._ctx.ctx, 0, c.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                                                        len(c), None, 0), "per-layer cells")
        self.input_ids[: len(head)] = head
        self.n_tokens = len(head)
        self._pyasl_pruned = True
        self.n_prunes += 1
        self.last_prune = {"policy": self.kv_policy.to_dict(), "n_prompt": len(tokens), "n_kept": pp.n_kept + 1,
                           "selected_layer": pp.selected_layer, "prefill_s": pp.seconds, "note": pp.note}
        if self.on_prune is not None:
            self.on_prune(self.last_prune)
        if self.verbose:
            print(f"pyasl: pruned the prompt {len(tokens)} -> {pp.n_kept + 1} cells with {self.kv_policy.name}",
                  file=sys.stderr)
        return super().eval([last])

    def _forget_pruned(self, force: bool = False) -> None:
        if force or getattr(self, "_pyasl_pruned", False):
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx.ctx), True)
            self.n_tokens = 0
            self._requires_eval = True
            self._pyasl_pruned = False

    def generate(self, tokens, *args, **kwargs):
        # never let the longest-prefix reuse treat a pruned cache as the whole prompt, and prune every
        # long prompt from scratch (not a suffix after a reused prefix)
        self._forget_pruned(force=self.kv_policy is not None and self.kv_policy.prunes
                            and len(tokens) > max(self.kv_policy.budget, self.kv_policy.window + 1))
        return super().generate(tokens, *args, **kwargs)

    def reset(self):
        super().reset()
        self._forget_pruned()

    def save_state(self):
        state = super().save_state()
        if self._pyasl_pruned:
            state.n_tokens = 0  # a pruned cache must never count as a prompt-cache hit
            state.scores = state.scores[:0]
            state.input_ids[:] = -1
        return state
