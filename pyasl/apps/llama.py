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

Prompts longer than ``n_ctx`` are accepted up to ``max_prompt_tokens`` (default: the model's
training context): ``n_ctx`` is the decode context, which only needs the budget and the answers
(an answer stops, finish reason "length", when its cells run out). So a 16K-token prompt is answered
from a context of budget + max_tokens cells, and that is all the KV the Llama keeps.

``kv_mode="per-question"`` (the default) keeps the full KV of the latest long prompt beside the decode
context (:class:`pyasl.engine.full_copy.FullCopy`, as llama-cpp-python keeps its last prompt): a
prompt sharing a prefix with it (one document, many questions) decodes only what differs, and every
prompt is scored with its own last tokens and selected again; this selection runs on the ordinary
strategy whatever the policy. The kept tokens are then prefilled again as a prompt of their own (one
prefill of ``budget`` tokens per request; a selection per KV head, snapkv's, is gathered as the
whole prompt computed it), as a Session's questions are; ``reprefill=False`` gathers the kept cells
instead. ``reprefill="choose"`` decodes a greedy answer both ways before the first token (up to the
request's ``max_tokens`` and ``stop``), keeps one way by the Session's rule (:func:`pyasl.session.answer.keep`:
the prefilled one unless the full copy and the gathered context's own confidence both prefer the gathered
answer), and llama-cpp-python then samples the answer over that decode context; it costs two answers'
decoding before streaming starts, so it is an option here (a Session streams what both answers share,
and chooses by default). ``kv_mode="once"`` keeps nothing beyond the decode context and prunes
every long prompt from scratch with the policy's own strategy (layer-major asl and fastkv).
``parked_copies=N`` (per-question) also keeps the full KV of up to N earlier long prompts, parked
as files in a temporary directory (:class:`pyasl.engine.copy_shelf.CopyShelf`): a server answering
questions about several documents in turn loads a document's KV back (a fraction of a second)
instead of prefilling it again.

A pruned cache is never reused as if it held the whole prompt: the next call after a pruned one
starts from an empty decode cache (llama-cpp-python's longest-prefix reuse is skipped once), and
states saved for ``set_cache`` from a pruned cache are stored as empty so they never count as a hit.
"""
from __future__ import annotations

import ctypes
import inspect
import re
import sys
import time
import warnings
import weakref
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .. import _native
from ..engine.copy_shelf import CopyShelf
from ..engine.full_copy import FullCopy
from ..engine.model import Model, ModelLoadError, _check_gguf
from ..engine.prefill import kv_bytes
from ..engine.strategies import PrunedPrefill, prefill_state
from ..policies import Policy, make_policy
from ..session.answer import CHOOSE, Draft, report, settle

_llama_cpp, _lib, _ = _native.load()  # our libllama, before llama_cpp.Llama is touched

import llama_cpp  # noqa: E402


_COMPLETION_SIGNATURE = inspect.signature(llama_cpp.Llama._create_completion)


def _completion_limits(args, kwargs) -> dict:
    """max_tokens, stop and repeat_penalty of a call to llama-cpp-python's _create_completion."""
    a = _COMPLETION_SIGNATURE.bind(None, *args, **kwargs)
    a.apply_defaults()
    stop = a.arguments["stop"]
    return {"max_tokens": a.arguments["max_tokens"], "repeat_penalty": float(a.arguments["repeat_penalty"]),
            "stop": [] if not stop else [stop] if isinstance(stop, str) else list(stop)}


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


KV_MODES = ("per-question", "once")


class LlamaModelError(ModelLoadError, ValueError):
    """A model file pyasl refuses before llama.cpp sees it (missing, not GGUF, truncated, corrupt metadata
    llama.cpp would abort on, unsupported architecture); a ValueError like llama-cpp-python's load errors."""


class _Borrowed(Model):
    def close(self) -> None:
        self._m = None  # owned by llama_cpp.Llama


class Llama(llama_cpp.Llama):
    """``llama_cpp.Llama`` plus ``kv_policy``: a :class:`pyasl.Policy` object (``ASL(budget=512)``,
    ``SnapKV(...)``, ...) or a policy name; ``None`` behaves exactly like llama-cpp-python.

    ``max_prompt_tokens``: the longest prompt accepted with a pruning policy (default: the model's
    training context; ``n_ctx`` is then only the decode context). ``kv_mode``: ``per-question``
    (default) or ``once``, and ``parked_copies`` (per-question: earlier long prompts' full KV kept on
    disk), and ``reprefill`` (per-question: prefill the kept tokens again, or ``"choose"``), see the module doc. Every
    other argument is llama-cpp-python's.
    ``last_prune`` (a dict or None) and ``n_prunes`` report what was pruned."""

    def __init__(self, *args, kv_policy: Union[Policy, str, None] = None, max_prompt_tokens: Optional[int] = None,
                 kv_mode: str = "per-question", parked_copies: int = 0, reprefill: Union[bool, str] = True,
                 **kwargs):
        if kv_mode not in KV_MODES:
            raise ValueError(f"kv_mode must be one of {', '.join(KV_MODES)}, not {kv_mode!r}")
        if not isinstance(reprefill, bool) and reprefill != CHOOSE:
            raise ValueError(f"reprefill must be True, False or {CHOOSE!r}, got {reprefill!r}")
        if reprefill == CHOOSE and kv_mode != "per-question":
            raise ValueError(f"reprefill={CHOOSE!r} judges two answers with the full copy of kv_mode per-question; "
                             f"kv_mode {kv_mode} keeps none")
        if isinstance(kv_policy, str):
            kv_policy = make_policy(kv_policy)
        if kv_policy is not None and not isinstance(kv_policy, Policy):
            raise ValueError(f"kv_policy must be a pyasl Policy, a policy name or None, got {kv_policy!r}")
        if isinstance(parked_copies, bool) or not isinstance(parked_copies, int) or parked_copies < 0:
            raise ValueError(f"parked_copies must be an integer >= 0, not {parked_copies!r}")
        if parked_copies and (kv_mode != "per-question" or kv_policy is None or not kv_policy.prunes):
            raise ValueError("parked_copies keeps earlier prompts' full KV: it needs a pruning kv_policy and "
                             "kv_mode='per-question'")
        path = kwargs.get("model_path", args[0] if args else None)
        if path is not None:  # the GGUF pre-check first: llama.cpp aborts the process on some corrupt files
            try:
                _check_gguf(Path(path))
            except ModelLoadError as e:
                raise LlamaModelError(str(e)) from None
        super().__init__(*args, **kwargs)
        self._pyasl_model = _borrow_model(self)
        if kv_policy is not None:
            kv_policy.check_model(self._pyasl_model)
            if self._pyasl_model.n_swa > 0:
                raise ValueError("pyasl.Llama does not prune sliding-window models yet")
        self.kv_policy = kv_policy
        self._pyasl_pruned = False
        self.last_prune: Optional[dict] = None
        self.n_prunes = 0
        self.on_prune = None  # optional callable(last_prune), e.g. a server's request log
        self.kv_mode = kv_mode
        self._full_copy: Optional[FullCopy] = None
        self._shelf: Optional[CopyShelf] = None
        self.parked_copies = parked_copies
        self.reprefill = reprefill
        self._request: Optional[dict] = None  # reprefill="choose": the completion being answered (its limits)
        self._n_cells = self.n_ctx()  # the decode context's cells
        prunes = kv_policy is not None and kv_policy.prunes
        if max_prompt_tokens is not None and not prunes:
            raise ValueError("max_prompt_tokens needs a pruning kv_policy (without one every prompt must fit n_ctx)")
        if prunes and not self._logits_all:  # logits_all keeps a row of logits per prompt token: n_ctx stays the limit
            limit = self._pyasl_model.n_ctx_train if max_prompt_tokens is None else int(max_prompt_tokens)
            if limit < 1:
                raise ValueError("max_prompt_tokens must be >= 1")
            if limit > self._n_ctx:  # llama-cpp-python's prompt + answer limit, and its token array
                self._n_ctx = limit
                self.input_ids = np.zeros((limit,), dtype=np.intc)
        if prunes and kv_policy.budget >= self._n_cells - 1:
            if self._n_ctx > self._n_cells:
                self.close()
                raise ValueError(f"budget {kv_policy.budget} does not leave room for an answer in the decode context "
                                 f"(n_ctx {self._n_cells}): n_ctx must hold the budget and the answer "
                                 "(n_ctx >= budget + max_tokens)")
            warnings.warn(f"pyasl.Llama: budget {kv_policy.budget} >= n_ctx {self._n_cells} - 1: every prompt that "
                          "fits the context is within the budget, so none will be pruned", stacklevel=2)

    def close(self) -> None:
        if getattr(self, "_full_copy", None) is not None:  # a context on the weights: freed before them
            self._full_copy.close()
            self._full_copy = None
        if getattr(self, "_shelf", None) is not None:
            self._shelf.close()
            self._shelf = None
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

    def kv_bytes(self) -> int:
        """Bytes of the KV cells in use in this Llama's context (what a pruned prompt holds while decoding)."""
        info = self._kv_info()
        return kv_bytes(info, info.used_base, info.used_swa)

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
        reused, chose = 0, {}
        if self.kv_mode == "per-question":
            if self._full_copy is None:
                self._full_copy = FullCopy(self._pyasl_model, n_batch=self.n_batch, n_threads=cp.n_threads_batch,
                                           flash_attn=not info.v_trans, type_k=cp.type_k, type_v=cp.type_v)
            if self.parked_copies:
                if self._shelf is None:
                    self._shelf = CopyShelf(self.parked_copies, min_tokens=max(pol.budget, self.n_batch))
                self._shelf.prepare(self._full_copy, head)
            if self.reprefill == CHOOSE:
                pp, reused, chose = self._choose(tokens, pol)
            else:
                pp, reused = self._full_copy.select_state(head, pol, again=self.reprefill)
        else:
            pp = prefill_state(self._pyasl_model, head, pol, n_threads=cp.n_threads_batch,
                               flash_attn=not info.v_trans, n_batch=self.n_batch, type_k=cp.type_k, type_v=cp.type_v)
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
                           "selected_layer": pp.selected_layer, "prefill_s": pp.seconds, "note": pp.note,
                           "mode": self.kv_mode, "reprefilled": pp.reprefilled, "reused_tokens": reused,
                           "n_ctx": self._n_cells,
                           "full_copy_mib": (self._full_copy.kv_bytes() / 2**20 if self._full_copy else None),
                           "parked_copies": len(self._shelf) if self._shelf else 0, **chose}
        if self.on_prune is not None:
            self.on_prune(self.last_prune)
        if self.verbose:
            print(f"pyasl: pruned the prompt {len(tokens)} -> {pp.n_kept + 1} cells with {self.kv_policy.name}",
                  file=sys.stderr)
        return super().eval([last])

    def _choose(self, tokens: list[int], pol: Policy) -> tuple[PrunedPrefill, int, dict]:
        """reprefill="choose": the selection for `tokens` (all but the last, as the full copy's prompt),
        the answer decoded greedily over the kept tokens prefilled again and over their gathered cells,
        and the decode context of the one `settle` keeps, as state bytes. One way only (a completion's
        limits unknown: a bare eval or generate; nothing selected; a selection per KV head; an answer
        the full copy could not judge within the training context) is the prefilled one, as
        reprefill=True. Returns (state, tokens reused, what last_prune adds)."""
        fc, head, last = self._full_copy, tokens[:-1], tokens[-1]
        t0 = time.perf_counter()
        sel, reused = fc.select_tokens(head, pol)
        req = self._request
        k = 0 if sel is None or sel.shared is None else len(sel.shared)
        room = self._n_cells - k  # the decode context's cells after the kept ones: the prompt's last token, the answer
        max_tokens = room - 1 if req is None or req["max_tokens"] is None or req["max_tokens"] <= 0 \
            else min(req["max_tokens"], room - 1)
        if req is None or k == 0 or len(tokens) + max_tokens > self._pyasl_model.n_ctx_train:
            return fc.pruned_state(sel, t0, True, pol.name), reused, {}
        ctxs = []
        try:
            ctxs.append(fc.kept_context(sel, room, again=True, end=fc.n)[0])
            ctxs.append(fc.pruned(sel, room)[0])
            states = [c.state_get() for c in ctxs]  # the decode context before the prompt's last token
            _, copy_logits = fc.ask([last], 1)
            drafts = []
            for c, how in zip(ctxs, ("prefilled", "gathered")):
                c.decode([last])
                drafts.append(Draft(c, c.logits(), how))
            t1 = time.perf_counter()
            last_n = self.last_n_tokens_size
            chosen = settle(drafts, fc, copy_logits, max_tokens, self._pyasl_model, tokens[-last_n:],
                            np.random.default_rng(0), 0.0, 1.0, req["repeat_penalty"], last_n, req["stop"], k + room)
        finally:
            for c in ctxs:
                c.close()
        i = drafts.index(chosen)
        pp = PrunedPrefill(state=states[i], n_tokens=len(head), n_kept=k, selected_layer=sel.layer,
                           seconds=time.perf_counter() - t0, note=sel.note, reprefilled=i == 0)
        return pp, reused, {"answer_from": chosen.how, "candidates": report(drafts, chosen),
                            "choose_s": time.perf_counter() - t1}

    def _create_completion(self, *args, **kwargs):
        gen = super()._create_completion(*args, **kwargs)
        if self.reprefill == CHOOSE:
            gen = self._answering(gen, _completion_limits(args, kwargs))
        return gen if self._n_ctx <= self._n_cells else self._prompt_limit_named(gen)

    def _answering(self, gen, request: dict):
        """A completion's generator with its limits known to eval while it runs (reprefill="choose")."""
        self._request = request
        try:
            return (yield from gen)
        finally:
            self._request = None

    def _prompt_limit_named(self, gen):
        """llama-cpp-python names llama.cpp's context (the decode context here) in its too-long error;
        name the prompt limit instead (same wording: servers map it to context_length_exceeded)."""
        try:
            return (yield from gen)
        except ValueError as e:
            m = re.fullmatch(r"Requested tokens \((\d+)\) exceed context window of \d+", str(e))
            if m is None:
                raise
            raise ValueError(f"Requested tokens ({m[1]}) exceed context window of {self._n_ctx}") from None

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
        gen = super().generate(tokens, *args, **kwargs)
        if self._n_ctx <= self._n_cells:
            return gen
        return self._within_cells(gen)

    def _within_cells(self, gen):
        """llama-cpp-python's token generator, ended when the next token would not fit the decode
        context (its own length check counts the whole prompt against max_prompt_tokens instead)."""
        try:
            sent = None
            while True:
                tok = gen.send(sent)
                sent = yield tok
                if self.kv_cells() + 1 + (len(sent) if sent else 0) > self._n_cells:
                    return
        except StopIteration:
            return
        finally:
            gen.close()

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
