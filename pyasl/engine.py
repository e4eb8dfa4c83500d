"""The engine: loads a GGUF model on our libllama, prefills with window-attention capture, applies
a KV policy (full, snapkv, asl), moves the kept cache into a context sized to the budget, decodes.

Everything goes through llama.cpp's C API (via llama-cpp-python's ctypes layer) plus the pyasl C
API in native/. One sequence (seq 0) per context.
"""
from __future__ import annotations

import codecs
import ctypes
import os
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import _native
from ._native import PyaslError, check

SEQ = 0
POLICIES = ("full", "snapkv", "asl", "fastkv", "asl-2pass", "gemfilter", "zigzag", "pyramid")
LAYER_BUDGET_POLICIES = ("zigzag", "pyramid")  # per-layer budgets (pyasl.budgets)
LAYER_RANGE_ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "phi3", "mistral3")
TWO_PASS = ("asl-2pass", "gemfilter")
SWA_LAYER_MAJOR_ARCHS = ("gemma3",)  # sliding-window (iSWA) caches in layer-major prefill: tested there
# architectures whose llama.cpp loader turns ALiBi on itself, without attention.max_alibi_bias in the GGUF
# (src/models/{bloom,refact,jina-bert-v2}.cpp; baichuan only for its 40-layer 13B: models/baichuan.cpp)
ALIBI_ARCHS = ("bloom", "refact", "jina-bert-v2")


class ModelLoadError(RuntimeError):
    pass


class ClosedError(RuntimeError):
    """A Model or Context was used after close() (its native handle is gone)."""


def _ll():
    llama_cpp, lib, cb = _native.load()
    return llama_cpp, lib, cb


def _pad(n: int, to: int = 256) -> int:
    return ((n + to - 1) // to) * to


def _check_int(name: str, v, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {v}")
    return int(v)


def _int32_array(values, what: str) -> np.ndarray:
    """values as a C-contiguous int32 array; refuses floats and values that int32 would wrap."""
    a = np.asarray(values)
    if a.size == 0:
        return np.ascontiguousarray(a, dtype=np.int32)
    if a.dtype.kind not in "iu":
        raise ValueError(f"{what} must be integers, got dtype {a.dtype}")
    if int(a.min()) < -(1 << 31) or int(a.max()) >= (1 << 31):
        raise ValueError(f"{what} out of the int32 range")
    return np.ascontiguousarray(a, dtype=np.int32)


def _check_positions(positions, n: int) -> None:
    p = _int32_array(positions, "positions")
    if p.ndim != 1 or len(p) != n:
        raise ValueError(f"positions must be a list of {n} integers")
    if n and (p[0] < 0 or np.any(np.diff(p) <= 0)):
        raise ValueError("positions must be >= 0 and strictly increasing")


def _check_gguf(path: Path):
    """Refuse a missing, non-GGUF, truncated, corrupt or unsupported file before llama.cpp sees it."""
    from .gguf_check import GGUFError, read_header, unsupported_reason

    try:
        info = read_header(path)
    except GGUFError as e:
        raise ModelLoadError(str(e)) from None
    why = unsupported_reason(info)
    if why:
        raise ModelLoadError(why)
    return info


class _Handle:
    """A native pointer attribute that raises ClosedError once its owner is closed, instead of handing
    a freed pointer (or NULL) to llama.cpp, which would crash the process."""

    def __set_name__(self, owner, name):
        self.key = "_handle_" + name

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        if obj.__dict__.get("_closed"):
            raise ClosedError(f"this {type(obj).__name__} is closed")
        return obj.__dict__.get(self.key)

    def __set__(self, obj, value):
        obj.__dict__[self.key] = value


class _Native:
    """Owns a native handle: freed by close(), on garbage collection, or at the end of a with block."""

    def close(self) -> None:  # pragma: no cover - overridden
        pass

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Model(_Native):
    """A loaded GGUF model (weights only; contexts are made per request)."""

    _m = _Handle()
    vocab = _Handle()

    def __init__(self, path: str | os.PathLike, n_gpu_layers: int = 0, verbose: bool = False):
        llama_cpp, _, _ = _ll()
        from llama_cpp import _logger

        _logger.set_verbose(verbose)
        self._contexts = weakref.WeakSet()  # closed before the model is freed
        self.path = Path(path)
        self.gguf = _check_gguf(self.path)
        if not isinstance(n_gpu_layers, int) or isinstance(n_gpu_layers, bool):
            raise ValueError(f"n_gpu_layers must be an integer, got {n_gpu_layers!r}")
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        self._m = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self._m:
            raise ModelLoadError(f"llama.cpp could not load {self.path} (architecture {self.gguf.arch!r}: one this "
                                 "llama.cpp does not know, or tensors/metadata it does not expect); "
                                 "run with verbose=True / --verbose for its log")
        self._read_sizes()
        if llama_cpp.llama_model_is_recurrent(self._m) or llama_cpp.llama_model_is_hybrid(self._m):
            raise ModelLoadError(f"{self.path.name}: recurrent/hybrid architecture {self.arch!r} has no "
                                 "attention KV cache to prune")
        if llama_cpp.llama_model_has_encoder(self._m) or not llama_cpp.llama_model_has_decoder(self._m):
            raise ModelLoadError(f"{self.path.name}: architecture {self.arch!r} is an encoder(-decoder) model; "
                                 "pyasl generates text with decoder-only models")
        tmpl = llama_cpp.llama_model_chat_template(self._m, None)
        self.chat_template = tmpl.decode("utf-8", errors="replace") if tmpl else None

    def pruning_unsupported(self, per_head: bool) -> Optional[str]:
        """None when the KV cache of this model can be pruned (per_head: a different token set per KV
        head), else why not. Full KV (policy full) works whenever the model loads."""
        g = self.gguf
        if (g.get("attention.kv_lora_rank") or 0) > 0:
            return (f"architecture {self.arch!r} uses multi-head latent attention (MLA), whose compressed KV "
                    "cache pyasl does not prune yet")
        if per_head and g.get("rope.dimension_sections") is not None:
            return (f"architecture {self.arch!r} uses multi-axis RoPE, which needs one token set for all KV "
                    "heads (per-head selection would mix positions)")
        if per_head and self.uses_alibi():
            return (f"architecture {self.arch!r} uses ALiBi, which biases by cell position: per-head "
                    "selection would bias with the wrong positions")
        return None

    def uses_alibi(self) -> bool:
        """Whether llama.cpp runs this model with ALiBi (hparams.use_alibi): the GGUF key
        attention.max_alibi_bias > 0, or an architecture whose loader sets the bias itself."""
        g = self.gguf
        if (g.get("attention.max_alibi_bias") or 0) > 0:
            return True
        return self.arch in ALIBI_ARCHS or (self.arch == "baichuan" and g.get("block_count") == 40)

    def _read_sizes(self) -> None:
        """Sizes and architecture of the loaded weights (self._m)."""
        llama_cpp, _, _ = _ll()
        self.vocab = llama_cpp.llama_model_get_vocab(self._m)
        self.n_layer = llama_cpp.llama_model_n_layer(self._m)
        self.n_head = llama_cpp.llama_model_n_head(self._m)
        self.n_head_kv = llama_cpp.llama_model_n_head_kv(self._m)
        self.n_embd = llama_cpp.llama_model_n_embd(self._m)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self._m)
        self.n_swa = llama_cpp.llama_model_n_swa(self._m)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.arch = self.meta("general.architecture") or "?"

    def meta(self, key: str) -> Optional[str]:
        llama_cpp, _, _ = _ll()
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_model_meta_val_str(self._m, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    @property
    def swa_layers(self) -> list[bool]:
        """Per layer, whether it uses sliding-window attention (llama.cpp's hparams.is_swa; all False
        for a model without a sliding window). Gemma 3: every layer but each sixth (5, 11, 17, ...)."""
        if getattr(self, "_swa_layers", None) is None:
            _, lib, _ = _ll()
            buf = (ctypes.c_bool * max(1, self.n_layer))()
            check(lib.pyasl_model_swa_layers(self._m, buf, self.n_layer), "sliding-window layers")
            self._swa_layers = [bool(buf[i]) for i in range(self.n_layer)]
        return list(self._swa_layers)

    @property
    def swa_type(self) -> int:
        """llama.cpp's llama_swa_type: 0 none, 1 standard (Gemma 3), 2 chunked, 3 symmetric."""
        _, lib, _ = _ll()
        return check(lib.pyasl_model_swa_type(self._m), "sliding-window type")

    def close(self) -> None:
        if self.__dict__.get("_closed"):
            return
        for c in list(getattr(self, "_contexts", ())):
            c.close()
        m = self.__dict__.get("_handle__m")
        self._closed = True
        if self.__dict__.get("_n_open", 0) > 0:
            # a context still lives on these weights: garbage collection can clear the weak set of
            # contexts before finalizing them, so the weights are freed when the last one closes
            return
        self._free_weights(m)

    def _free_weights(self, m) -> None:
        if m:
            llama_cpp, _, _ = _ll()
            llama_cpp.llama_model_free(m)
        self.__dict__["_handle__m"] = None


    # ---- text -------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        llama_cpp, _, _ = _ll()
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            raise ValueError("tokenization failed")
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        llama_cpp, _, _ = _ll()
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        llama_cpp, _, _ = _ll()
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def format_chat(self, messages: list[dict]) -> str:
        """Apply the GGUF's chat template (Jinja2, as llama-cpp-python does)."""
        if not self.chat_template:
            raise ValueError(f"{self.path.name} has no chat template; use raw mode")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        def piece(tok_key: str) -> str:
            llama_cpp, _, _ = _ll()
            t = getattr(llama_cpp, tok_key)(self.vocab)
            return self.token_bytes(t, special=True).decode("utf-8", errors="replace") if t >= 0 else ""

        fmt = Jinja2ChatFormatter(self.chat_template, eos_token=piece("llama_vocab_eos"),
                                  bos_token=piece("llama_vocab_bos"))
        return fmt(messages=messages).prompt

    def prompt_tokens(self, prompt: str, raw: bool = False, system: Optional[str] = None) -> list[int]:
        """Tokens for a user prompt: chat template applied unless raw (or the model has none)."""
        if raw or not self.chat_template:
            return self.tokenize(prompt, add_special=True, parse_special=False)
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = self.format_chat(msgs)
        # the template writes the BOS text itself when the model wants one
        return self.tokenize(text, add_special=False, parse_special=True)


class Context(_Native):
    """A llama_context for one sequence, optionally wired to a score capture."""

    _ctx = _Handle()
    _batch = _Handle()
    # defaults for instances built around a raw llama_context (tests)
    _layer_begin = 0
    _last_batch = 0
    _hidden_lid = None
    _ebatch = None

    def __init__(self, model: Model, n_ctx: int, n_batch: int = 512, n_threads: Optional[int] = None,
                 flash_attn: bool = False, capture: bool = False, type_k: Optional[int] = None,
                 type_v: Optional[int] = None, allow_pos_gaps: bool = False, swa_full: bool = False):
        llama_cpp, lib, eval_cb = _ll()
        _check_int("n_ctx", n_ctx, 1, 1 << 24)
        _check_int("n_batch", n_batch, 1, 1 << 20)
        if n_threads is not None:
            _check_int("n_threads", n_threads, 1, 4096)
        if model._m is None:
            raise ClosedError("the Model is closed")
        self.model = model
        self._cap = lib.pyasl_capture_new() if capture else None
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = n_batch
        p.n_seq_max = 1
        nt = n_threads or max(1, os.cpu_count() or 1)
        p.n_threads = nt
        p.n_threads_batch = nt
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.swa_full = swa_full  # sliding-window models: True sizes the SWA cache like the base one
        p.no_perf = True
        if type_k is not None:
            p.type_k = type_k
        if type_v is not None:
            p.type_v = type_v
        if capture:
            p.cb_eval = eval_cb
            p.cb_eval_user_data = self._cap
        self._params = p  # keep the callback object alive
        self._ctx = llama_cpp.llama_init_from_model(model._m, p)
        if not self._ctx:
            if self._cap:
                lib.pyasl_capture_free(self._cap)
                self._cap = None
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens (out of memory, or a KV cache "
                               "type the model's head size does not allow); run with --verbose for llama.cpp's reason")
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        if allow_pos_gaps:
            check(lib.pyasl_set_allow_pos_gaps(self._ctx, True), "allow position gaps")
        self.n_batch = n_batch
        self.n_threads = n_threads
        self.flash_attn = flash_attn
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._ebatch = None  # hidden-state batch, made on first use
        self._hidden_lid = None
        self._layer_begin = 0
        self._last_batch = 0  # tokens in the last decoded batch (rows of hidden())
        self.n_past = 0  # next position
        model._contexts.add(self)
        model.__dict__["_n_open"] = model.__dict__.get("_n_open", 0) + 1
        self._counted = True

    def close(self) -> None:
        if self.__dict__.get("_closed"):
            return
        llama_cpp, lib, _ = _ll()
        if getattr(self, "_ctx", None):
            llama_cpp.llama_batch_free(self._batch)
            if getattr(self, "_ebatch", None) is not None:
                llama_cpp.llama_batch_free(self._ebatch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_cap", None):
            lib.pyasl_capture_free(self._cap)
            self._cap = None
        self._closed = True
        if self.__dict__.pop("_counted", False):
            md = self.model.__dict__
            md["_n_open"] = md.get("_n_open", 1) - 1
            if md["_n_open"] == 0 and md.get("_closed") and md.get("_handle__m"):
                self.model._free_weights(md["_handle__m"])  # the model was closed while this context lived


    # ---- decoding ---------------------------------------------------------------------
    def decode(self, tokens: list[int], pos0: Optional[int] = None, logits_last: bool = True,
               positions: Optional[list[int]] = None) -> None:
        """Decode tokens at consecutive positions from pos0 (default: after the last one), or at
        explicit increasing `positions` (gaps need a context made with allow_pos_gaps)."""
        llama_cpp, _, _ = _ll()
        self._ctx  # ClosedError before the (freed) batch is touched
        if not len(tokens):
            raise ValueError("decode: no tokens")
        if self._layer_begin > 0:
            raise ValueError(f"decode: the layer range starts at layer {self._layer_begin}; it takes hidden states "
                             "(decode_hidden), not tokens")
        if positions is not None:
            _check_positions(positions, len(tokens))
        if pos0 is None:
            pos0 = self.n_past if positions is None else int(positions[0])
        if len(tokens) > self.n_batch:
            raise ValueError("decode: more tokens than n_batch")
        if pos0 + len(tokens) > self.n_ctx and not self._has_room(len(tokens)):
            raise ValueError(f"context full: {self.n_ctx} cells")
        b = self._batch
        n = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i] = t
        rc = self._submit(b, range(pos0, pos0 + n) if positions is None else positions, logits_last)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}): " +
                               ("no free KV cells (context full)" if rc == 1 else
                                f"batch at positions {pos0}..{pos0 + n - 1} rejected (it must follow the last cached "
                                "position); run with --verbose for llama.cpp's log"))
        self.n_past = (pos0 + n) if positions is None else int(positions[-1]) + 1

    def _submit(self, b, positions, logits_last: bool) -> int:
        """Fill positions, sequence and output flags of batch b (tokens or embd already set); decode."""
        llama_cpp, _, _ = _ll()
        n = len(positions)
        for i, p in enumerate(positions):
            b.pos[i] = int(p)
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = SEQ
            b.logits[i] = 1 if (logits_last and i == n - 1) else 0
        b.n_tokens = n
        rc = llama_cpp.llama_decode(self._ctx, b)
        self._last_batch = n if rc == 0 else 0
        return rc

    # ---- layer ranges (layer-major prefill) ---------------------------------------------
    def set_layer_range(self, begin: int, end: int) -> None:
        _, lib, _ = _ll()
        check(lib.pyasl_set_layer_range(self._ctx, begin, end), "layer range")
        self._layer_begin = 0 if (begin, end) == (0, self.model.n_layer) else begin

    def set_reuse_cells(self, reuse: bool) -> None:
        _, lib, _ = _ll()
        check(lib.pyasl_set_reuse_cells(self._ctx, reuse), "reuse cells")

    def set_hidden_output(self, lid: Optional[int]) -> None:
        """Expose the input of layer `lid` (= output of layer lid-1) for every batch token."""
        _, lib, _ = _ll()
        if self._hidden_lid is not None and self._hidden_lid != lid:
            check(lib.pyasl_set_hidden_output(self._ctx, self._hidden_lid, False), "hidden output")
        if lid is not None:
            check(lib.pyasl_set_hidden_output(self._ctx, lid, True), "hidden output")
        self._hidden_lid = lid

    def hidden(self, n: int) -> np.ndarray:
        """(n, n_embd) hidden states of the last batch's tokens at the exposed layer input."""
        _, lib, _ = _ll()
        if self._hidden_lid is None:
            raise RuntimeError("no hidden output armed")
        if not 0 < n <= self._last_batch:
            raise ValueError(f"hidden: asked for {n} rows, the last batch had {self._last_batch} tokens")
        ptr = lib.pyasl_get_hidden(self._ctx, self._hidden_lid)
        if not ptr:
            raise PyaslError(lib.pyasl_last_error().decode())
        return np.ctypeslib.as_array(ptr, shape=(n, self.model.n_embd)).copy()

    def decode_hidden(self, hidden: np.ndarray, positions: list[int], logits_last: bool = True) -> None:
        """Decode hidden states (n, n_embd) at the given positions (for a layer range starting > 0)."""
        llama_cpp, _, _ = _ll()
        self._ctx  # ClosedError before the (freed) batch is touched
        if getattr(hidden, "ndim", 0) != 2:
            raise ValueError("decode_hidden: hidden states must be (n, n_embd)")
        n, d = hidden.shape
        if d != self.model.n_embd or n > self.n_batch or n != len(positions) or n == 0:
            raise ValueError("decode_hidden: bad shape")
        _check_positions(positions, n)
        if self._ebatch is None:
            self._ebatch = llama_cpp.llama_batch_init(self.n_batch, self.model.n_embd, 1)
        b = self._ebatch
        h = np.ascontiguousarray(hidden, dtype=np.float32)
        ctypes.memmove(b.embd, h.ctypes.data, h.nbytes)
        rc = self._submit(b, positions, logits_last)
        if rc != 0:
            raise RuntimeError(f"llama_decode (hidden states) failed ({rc}); run with --verbose for llama.cpp's log")
        self.n_past = max(self.n_past, int(positions[-1]) + 1)

    def set_stop_layer(self, layer: Optional[int]) -> None:
        """Stop each decode's graph after `layer` (None: run every layer). See pyasl.h."""
        _, lib, _ = _ll()
        if self._cap is None:
            raise RuntimeError("this context was created without score capture")
        lib.pyasl_capture_set_stop_layer(self._cap, -1 if layer is None else int(layer))

    def _has_room(self, n: int) -> bool:
        info = self.kv_info()
        return info.used_base + n <= info.size_base

    def logits(self) -> np.ndarray:
        llama_cpp, _, _ = _ll()
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    # ---- scores -----------------------------------------------------------------------
    def arm_scores(self, window: int, mode: int = 0) -> None:
        _, lib, _ = _ll()
        if self._cap is None:
            raise RuntimeError("this context was created without score capture")
        lib.pyasl_capture_clear(self._cap)
        check(lib.pyasl_set_score_window(self._ctx, window, mode), "arm scores")

    def disarm_scores(self) -> None:
        _, lib, _ = _ll()
        check(lib.pyasl_set_score_window(self._ctx, 0, 0), "disarm scores")

    def add_capture_prefix(self, prefix: str) -> None:
        _, lib, _ = _ll()
        check(lib.pyasl_capture_add_prefix(self._cap, prefix.encode()), "capture prefix")

    def captured(self) -> dict[str, np.ndarray]:
        """Captured tensors by name, as numpy arrays in ggml order reversed (ne[3], ne[2], ne[1], ne[0])."""
        _, lib, _ = _ll()
        out = {}
        for i in range(lib.pyasl_capture_count(self._cap)):
            ne = (ctypes.c_int64 * 4)()
            check(lib.pyasl_capture_shape(self._cap, i, ne), "capture shape")
            arr = np.empty((ne[3], ne[2], ne[1], ne[0]), dtype=np.float32)
            check(lib.pyasl_capture_read(self._cap, i, arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), arr.size),
                  "capture read")
            out[lib.pyasl_capture_name(self._cap, i).decode()] = arr
        return out

    def cell_positions(self, layer: int, n: int) -> np.ndarray:
        _, lib, _ = _ll()
        out = np.empty(n, dtype=np.int32)
        got = check(lib.pyasl_kv_layer_cell_pos(self._ctx, layer, SEQ, out.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), n),
                    "cell positions")
        return out[:got]

    def _by_position(self, il: int, arr: np.ndarray, n_prompt: int) -> np.ndarray:
        """Captured [n_head, n_kv] scores of layer il re-indexed from cache cells to token positions."""
        a = arr.reshape(arr.shape[-2], arr.shape[-1])
        pos = self.cell_positions(il, a.shape[1])
        ok = (pos >= 0) & (pos < n_prompt)
        out = np.zeros((a.shape[0], n_prompt), dtype=np.float32)
        out[:, pos[ok]] = a[:, :len(pos)][:, ok]
        return out

    def layer_scores(self, il: int, n_prompt: int) -> np.ndarray:
        """(n_head, n_prompt) window scores of layer il from the last capture, by position."""
        arr = self.captured().get(f"pyasl_scores-{il}")
        if arr is None:
            raise RuntimeError(f"no window scores were captured for layer {il}")
        return self._by_position(il, arr, n_prompt)

    def kv_copy_cells_from(self, src: "Context", il_begin: int, il_end: int, n_cells: int) -> None:
        _, lib, _ = _ll()
        check(lib.pyasl_kv_copy_cells(self._ctx, src._ctx, il_begin, il_end, n_cells), "kv copy cells")

    def kv_copy_swa_cells_from(self, src: "Context", il_begin: int, il_end: int, n_cells: int) -> None:
        """kv_copy_cells_from for the sliding-window cache's layers."""
        _, lib, _ = _ll()
        check(lib.pyasl_kv_copy_cells_swa(self._ctx, src._ctx, il_begin, il_end, n_cells), "kv copy swa cells")

    def kv_keep_swa(self, positions) -> None:
        """Keep only these positions (increasing, ending with the last) in the sliding-window cache."""
        _, lib, _ = _ll()
        p = np.ascontiguousarray(positions, dtype=np.int32)
        check(lib.pyasl_kv_keep_swa(self._ctx, SEQ, p.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), len(p)),
              "kv keep swa")

    def window_scores(self, n_prompt: int, n_layers: Optional[int] = None) -> np.ndarray:
        """(n_layers, n_head, n_prompt) window attention summed over the window queries, by position
        (n_layers defaults to every layer; fewer after an early exit)."""
        caps = self.captured()
        L, H = n_layers or self.model.n_layer, self.model.n_head
        scores = np.zeros((L, H, n_prompt), dtype=np.float32)
        seen = 0
        for name, arr in caps.items():
            if not name.startswith("pyasl_scores-"):
                continue
            il = int(name.rsplit("-", 1)[1])
            if il >= L:
                continue
            scores[il] = self._by_position(il, arr, n_prompt)
            seen += 1
        if seen != L:
            raise RuntimeError(f"captured window scores for {seen} of {L} layers")
        return scores

    # ---- KV cache ---------------------------------------------------------------------
    def kv_info(self) -> _native.PyaslKvInfo:
        _, lib, _ = _ll()
        info = _native.PyaslKvInfo()
        check(lib.pyasl_kv_get_info(self._ctx, ctypes.byref(info)), "kv info")
        return info

    def kv_keep(self, positions: np.ndarray) -> None:
        _, lib, _ = _ll()
        p = _int32_array(positions, "kv_keep positions")
        if p.ndim != 1:
            raise ValueError("kv_keep positions must be 1-D")
        check(lib.pyasl_kv_keep(self._ctx, SEQ, p.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), len(p)), "kv keep")

    def kv_keep_per_head(self, positions: np.ndarray) -> None:
        """positions: (n_layer, n_head_kv, k) sorted per (layer, head)."""
        _, lib, _ = _ll()
        p = _int32_array(positions, "per-head positions")
        if p.ndim != 3:
            raise ValueError("per-head positions must be (n_layer, n_head_kv, k)")
        check(lib.pyasl_kv_keep_per_head(self._ctx, SEQ, p.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                                         p.shape[0], p.shape[1], p.shape[2]), "kv keep per head")

    # per-layer budgets (patches/0004): layer l attends to cells [0, counts[l]) of the prompt cells
    def kv_keep_per_layer(self, sets) -> None:
        """sets[l]: (n_head_kv, B_l) positions of layer l, sorted per KV head (see pyasl.budgets)."""
        _, lib, _ = _ll()
        if self.model.uses_alibi():
            # every layer packs its own rows into cells 0..B_l-1 under one set of cell positions, which
            # ALiBi turns into biases: layers (and heads) whose sets differ would use the wrong positions
            raise ValueError(f"kv_keep_per_layer: architecture {self.model.arch!r} uses ALiBi, which biases by cell "
                             "position; per-layer/per-head sets would use the wrong positions (use kv_keep)")
        if len(sets) == 0 or any(np.ndim(s) != 2 or np.shape(s)[0] != self.model.n_head_kv for s in sets):
            raise ValueError(f"per-layer sets must each be (n_head_kv={self.model.n_head_kv}, B_l)")
        counts = np.array([np.shape(s)[-1] for s in sets], dtype=np.int32)
        flat = np.concatenate([np.ascontiguousarray(s, dtype=np.int32).reshape(-1) for s in sets]).astype(np.int32)
        check(lib.pyasl_kv_keep_per_layer(self._ctx, SEQ, flat.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                                          counts.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), len(counts),
                                          self.model.n_head_kv), "kv keep per layer")

    def set_kv_layer_cells(self, counts, meta: Optional[np.ndarray] = None) -> None:
        """Set the per-layer cell counts again (None clears them); meta rewrites the cell positions first."""
        _, lib, _ = _ll()
        i32p = ctypes.POINTER(ctypes.c_int32)
        if counts is None:
            check(lib.pyasl_kv_set_layer_cells(self._ctx, SEQ, None, 0, None, 0), "set layer cells")
            return
        c = np.ascontiguousarray(counts, dtype=np.int32)
        m = None if meta is None else np.ascontiguousarray(meta, dtype=np.int32)
        check(lib.pyasl_kv_set_layer_cells(self._ctx, SEQ, c.ctypes.data_as(i32p), len(c),
                                           None if m is None else m.ctypes.data_as(i32p), 0 if m is None else len(m)),
              "set layer cells")

    def kv_layer_cells(self) -> tuple[int, np.ndarray]:
        """(P, counts): the per-layer counts in force (P = 0 and all -1 when none are set)."""
        _, lib, _ = _ll()
        out = np.empty(self.model.n_layer, dtype=np.int32)
        p = check(lib.pyasl_kv_get_layer_cells(self._ctx, out.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                                               len(out)), "get layer cells")
        return p, out

    def kv_layer_cell_bytes(self) -> np.ndarray:
        """K+V bytes of one cell, per model layer (0 for a layer without KV cache)."""
        _, lib, _ = _ll()
        out = np.zeros(self.model.n_layer, dtype=np.int64)
        check(lib.pyasl_kv_layer_cell_bytes(self._ctx, out.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)), len(out)),
              "layer cell bytes")
        return out

    def seq_rm(self, p0: int, p1: int) -> bool:
        llama_cpp, _, _ = _ll()
        return bool(llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx), SEQ, p0, p1))

    def renumber_positions(self) -> int:
        """Give the sequence's cells the contiguous positions 0..k-1 in their order (llama.cpp's
        K-shift re-rotates the keys now), so a long conversation never runs past the model's
        training context. Returns k, the next position. Raises RuntimeError for sliding-window
        caches and models whose cache cannot shift (multi-axis RoPE, ...)."""
        _, lib, _ = _ll()
        k = check(lib.pyasl_kv_renumber(self._ctx, SEQ), "renumber positions")
        self.n_past = int(k)
        return int(k)

    def state_get(self) -> bytes:
        llama_cpp, _, _ = _ll()
        n = llama_cpp.llama_state_seq_get_size(self._ctx, SEQ)
        buf = (ctypes.c_uint8 * n)()
        got = llama_cpp.llama_state_seq_get_data(self._ctx, buf, n, SEQ)
        if got == 0:
            raise RuntimeError("could not save the sequence state")
        return bytes(buf[:got])

    def state_set(self, data: bytes, n_past: int) -> None:
        llama_cpp, _, _ = _ll()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        got = llama_cpp.llama_state_seq_set_data(self._ctx, buf, len(data), SEQ)
        if got == 0:
            raise RuntimeError("could not load the sequence state into the decode context (too small?)")
        self.n_past = n_past


@dataclass
class Prefill:
    logits: np.ndarray
    scores: Optional[np.ndarray]  # (n_layer, n_head, n_prompt)
    seconds: float


def prefill(ctx: Context, tokens: list[int], window: int = 0,
            progress: Optional[Callable[[int, int], None]] = None, stop_layer: Optional[int] = None) -> Prefill:
    """Ordinary prefill. With window > 0 the last `window` tokens go in one ubatch with scores armed.

    stop_layer: compute only layers 0..stop_layer for every ubatch (first pass of a two-pass
    policy); the logits are then meaningless and scores cover stop_layer + 1 layers."""
    if stop_layer is not None:
        ctx.set_stop_layer(stop_layer)
    n = len(tokens)
    t0 = time.perf_counter()
    head = tokens[: n - window] if window else tokens
    done = 0
    for i in range(0, len(head), ctx.n_batch):
        chunk = head[i: i + ctx.n_batch]
        ctx.decode(chunk, logits_last=(not window and i + len(chunk) == n))
        done += len(chunk)
        if progress:
            progress(done, n)
    scores = None
    if window:
        ctx.arm_scores(window)
        try:
            ctx.decode(tokens[n - window:], logits_last=True)
        finally:
            ctx.disarm_scores()
        if progress:
            progress(n, n)
    logits = ctx.logits()
    secs = time.perf_counter() - t0
    if stop_layer is not None:
        ctx.set_stop_layer(None)
    if window:
        scores = ctx.window_scores(n, None if stop_layer is None else stop_layer + 1)
    return Prefill(logits=logits, scores=scores, seconds=secs)


def _asl_info(sel, prefill: str) -> dict:
    return {"ranking_layer": sel.ranking_layer, "triggered": sel.triggered,
            "variance_ratio": sel.variance_ratio, "prefill": prefill}


@dataclass
class GenerateResult:
    text: str
    policy: str
    n_prompt: int
    n_generated: int
    selected_layer: Optional[int]
    n_kept: int
    kv_bytes_full: int
    kv_bytes: int
    kv_bytes_allocated: int
    prefill_s: float
    prefill_work: float
    select_s: float
    compact_s: float
    time_to_first_token_s: float
    decode_s: float
    decode_tokens_per_s: float
    window: int
    budget: Optional[int]
    tokens: list[int] = field(default_factory=list)
    note: str = ""
    asl: Optional[dict] = None
    layer_budgets: Optional[dict] = None  # per-layer budgets (zigzag, pyramid, asl --layer-budgets)
    span: str = "token"                    # the span stage of every selection (pyasl.spans)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d.pop("tokens")
        return d


def _kv_bytes(info: _native.PyaslKvInfo, n_base: int, n_swa: int) -> int:
    return int(n_base * info.cell_bytes_base + n_swa * info.cell_bytes_swa)


def generate(model: Model, tokens: list[int], policy: str = "asl", budget: Optional[int] = 512, window: int = 32,
             tau: float = 0.3, l_min: Optional[int] = None, l_obs: Optional[int] = None, kernel: int = 7,
             max_tokens: int = 128, n_ctx: Optional[int] = None, n_threads: Optional[int] = None,
             flash_attn: bool = False, n_batch: int = 512, ignore_eos: bool = False, layer: Optional[int] = None,
             prefill_mode: str = "auto", progress: Optional[Callable[[int, int], None]] = None,
             on_text: Optional[Callable[[str], None]] = None, layer_budgets: Optional[str] = None,
             budget_opts: Optional[dict] = None, span=None) -> GenerateResult:
    """Prefill `tokens`, prune the KV cache with `policy`, then decode greedily.

    Policies: full; snapkv (per-layer, per-KV-head top-k); asl (selection layer by rank variance);
    fastkv (a fixed selection `layer`); asl-2pass and gemfilter (select at the ASL layer / at the
    fixed `layer`, then clear the cache and prefill only the kept tokens at their original
    positions; gemfilter's first pass stops after `layer`).

    asl and fastkv prefill layer-major with one-shot propagation (layer_major_prefill) where the
    architecture allows (prefill_mode "auto" or "layer-major"); prefill_mode "ordinary" runs every
    layer over every token and keeps asl's token set in every layer.

    zigzag and pyramid (ordinary prefill) give each layer its own budget (pyasl.budgets; average
    `budget`, same total); asl with layer_budgets ("zigzag", "pyramid", "uniform") gives layers up to
    the selection layer per-layer budgets and keeps asl's token set in the later ones. budget_opts:
    theta, b_min_frac (zigzag), beta (pyramid).

    span: how every selection turns scores into kept positions (pyasl.spans: token, forward:S,
    chunk:C; None: token).
    """
    if prefill_mode not in ("auto", "layer-major", "ordinary"):
        raise ValueError(f"prefill_mode must be auto, layer-major or ordinary, not {prefill_mode!r}")
    from . import policies as P

    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    from . import budgets as BG
    from .spans import Spans

    span = Spans.parse(span)

    bopts = BG.check_budget_options(model, policy, layer_budgets, budget_opts)
    n = len(tokens)
    if n == 0:
        raise ValueError("empty prompt")
    _check_int("max_tokens", max_tokens, 1, 1 << 24)
    _check_int("window", window, 1, 1 << 24)
    _check_int("n_batch", n_batch, 1, 1 << 20)
    if n_threads is not None:
        _check_int("n_threads", n_threads, 1, 4096)
    if budget is not None:
        _check_int("budget", budget, 1, 1 << 31)
    toks = _int32_array(tokens, "tokens")
    if toks.ndim != 1 or int(toks.min()) < 0 or int(toks.max()) >= model.n_vocab:
        raise ValueError(f"tokens must be a list of token ids in 0..{model.n_vocab - 1}")
    if policy in ("asl", "asl-2pass") and not (isinstance(tau, (int, float)) and 0 < tau <= 1):
        raise ValueError(f"tau must satisfy 0 < tau <= 1, got {tau!r}")
    need = n + max_tokens
    if n_ctx is not None and n > n_ctx:
        raise ValueError(f"the prompt has {n} tokens, more than the context size --ctx {n_ctx}")
    if n > model.n_ctx_train:
        raise ValueError(f"the prompt has {n} tokens, more than the model's training context {model.n_ctx_train}")
    note = ""
    prune = policy != "full"
    if policy in ("gemfilter", "fastkv"):
        if layer is None:
            raise ValueError(f"policy {policy} needs a selection layer (--layer N)")
        if not 0 <= layer < model.n_layer:
            raise ValueError(f"--layer {layer} is outside the model's layers 0..{model.n_layer - 1}")
    if prune:
        if budget is None:
            raise ValueError(f"policy {policy} needs a budget")
        if window < 1:
            raise ValueError("window must be >= 1")
        if window > n_batch:
            raise ValueError(f"window {window} is longer than the batch size {n_batch}")
        if budget <= window:
            raise ValueError(f"budget {budget} must be larger than the window {window}")
        if window >= n:
            note = f"the prompt ({n} tokens) is not longer than the window ({window}); nothing to prune"
            prune = False
        elif budget >= n:
            note = f"budget {budget} >= prompt length {n}; nothing to prune (full KV)"
            prune = False

    mask = ranked_layer_mask(model, n)
    if prune and policy in ("gemfilter", "fastkv"):
        rl = P.latest_ranked_layer(mask, layer)  # ValueError before the first global layer
        if rl != layer:
            note = f"ranks from layer {rl}, the latest full-attention layer <= {layer}"
    lm_reason = layer_major_supported(model)
    if prune:
        check_prunable(model, policy, selects_per_head(model, policy, prefill_mode, layer_budgets))
    if prune and policy == "fastkv" and lm_reason:
        raise ValueError(f"policy fastkv needs layer-major prefill: {lm_reason}")
    if prefill_mode == "layer-major" and lm_reason and prune:
        raise ValueError(lm_reason)
    use_lm = prune and policy in ("asl", "fastkv", "asl-2pass") and prefill_mode != "ordinary" and lm_reason is None
    if prune and policy in ("asl", "asl-2pass") and lm_reason and prefill_mode == "auto":
        note = f"ordinary prefill ({lm_reason})"
    selected = None
    asl_info = None
    t_sel = t_cmp = 0.0
    if use_lm:
        lm = layer_major_prefill(model, tokens, policy, budget, window, tau=tau, l_min=l_min, l_obs=l_obs,
                                 kernel=kernel, layer=layer, max_tokens=max_tokens, n_batch=n_batch,
                                 n_threads=n_threads, flash_attn=flash_attn, progress=progress,
                                 layer_budgets=layer_budgets if policy == "asl" else None, budget_opts=bopts,
                                 span=span)
        ctx, first_logits, n_kept, kv_full = lm.ctx, lm.logits, lm.n_kept, lm.kv_bytes_full
        lb = lm.layer_budgets
        prefill_s = lm.prefill_s
        prefill_work = lm.prefill_work
        pf = Prefill(logits=lm.logits, scores=None, seconds=lm.prefill_s)
        sel = lm.selection
        if policy == "fastkv":
            selected = lm.stop_layer
        else:
            selected = sel.selected_layer
            asl_info = _asl_info(sel, "layer-major")
            note = sel.note or note
    else:
        # prefill context: the whole prompt (+ generation when nothing will be pruned)
        pre_ctx = max(n_ctx or 0, _pad(need if not prune else n + 1))
        ctx = Context(model, pre_ctx, n_batch=n_batch, n_threads=n_threads, flash_attn=flash_attn, capture=prune)
        info = ctx.kv_info()
        if prune and policy not in TWO_PASS and info.n_layer_base == 0:
            note = "every layer uses the sliding window (no full-context KV cache): nothing to prune (full KV)"
            prune = False
            ctx.close()
            ctx = Context(model, max(n_ctx or 0, _pad(need)), n_batch=n_batch, n_threads=n_threads,
                          flash_attn=flash_attn)
        stop = layer if (prune and policy == "gemfilter") else None
        pf = prefill(ctx, tokens, window=window if prune else 0, progress=progress, stop_layer=stop)
        info = ctx.kv_info()
        kv_full = _kv_bytes(info, n, info.used_swa)
        n_kept = n
        lb = None
        first_logits = pf.logits
        prefill_s = pf.seconds
        prefill_work = 1.0
        N = model.n_layer
        if prune and policy in TWO_PASS:
            t0 = time.perf_counter()
            if policy == "gemfilter":
                kept = P.asl_select_at_layer(pf.scores, window=window, budget=budget, layer=layer, kernel=kernel,
                                             layer_mask=None if mask is None else mask[: layer + 1], span=span)
                selected = layer
                layers_pass1 = layer + 1
            else:
                sel = P.asl_select(pf.scores, window=window, budget=budget, tau=tau, l_min=l_min, l_obs=l_obs,
                                   kernel=kernel, layer_mask=mask, span=span)
                kept, selected = sel.kept, sel.selected_layer
                asl_info = _asl_info(sel, "ordinary")
                note = sel.note or note
                layers_pass1 = N
            t_sel = time.perf_counter() - t0
            ctx.close()
            # second pass: only the kept tokens, at their original positions, through every layer
            t0 = time.perf_counter()
            ctx = prefill_kept(model, tokens, kept, max_tokens, n_batch=n_batch, n_threads=n_threads,
                               flash_attn=flash_attn)
            first_logits = ctx.logits()
            t_cmp = time.perf_counter() - t0
            n_kept = len(kept)
            prefill_s = pf.seconds + t_sel + t_cmp
            prefill_work = (layers_pass1 * n + N * n_kept) / (N * n)
        elif prune:
            t0 = time.perf_counter()
            if policy == "asl":
                sel = P.asl_select(pf.scores, window=window, budget=budget, tau=tau, l_min=l_min, l_obs=l_obs,
                                   kernel=kernel, layer_mask=mask, span=span)
                selected = sel.selected_layer
                asl_info = _asl_info(sel, "ordinary")
                if sel.note:
                    note = (note + "; " if note else "") + sel.note
                t_sel = time.perf_counter() - t0
                t0 = time.perf_counter()
                if layer_budgets:
                    last = sel.selected_layer if sel.selected_layer is not None else N - 1
                    lb = BG.apply_layer_budgets(ctx, pf.scores[: last + 1], layer_budgets, budget, window,
                                                kernel=kernel, shared=sel.kept, span=span, **bopts)
                    t_sel += lb.select_s
                    t0 += lb.select_s
                    n_kept = lb.prompt_cells
                else:
                    ctx.kv_keep(sel.kept)
                    n_kept = len(sel.kept)
            elif policy in LAYER_BUDGET_POLICIES:
                lb = BG.apply_layer_budgets(ctx, pf.scores, policy, budget, window, kernel=kernel, span=span,
                                            **bopts)
                t_sel = lb.select_s
                t0 += lb.select_s
                n_kept = lb.prompt_cells
            else:  # snapkv
                sets = P.snapkv_select_all(pf.scores, window=window, budget=budget, n_head_kv=model.n_head_kv,
                                           kernel=kernel, span=span)
                t_sel = time.perf_counter() - t0
                t0 = time.perf_counter()
                ctx.kv_keep_per_head(sets)
                n_kept = sets.shape[-1]
            # move the pruned sequence into a context sized to what is kept + the generation
            if lb is not None:  # per-layer counts are set again on the new context
                ctx = BG.move_to_context(ctx, n, n_kept + max_tokens, n_batch=n_batch, n_threads=n_threads,
                                         flash_attn=flash_attn)
            else:
                ctx = shrink_context(ctx, n_kept, n, max_tokens)
            t_cmp = time.perf_counter() - t0
    info = ctx.kv_info()
    kv_kept = _kv_bytes(info, n_kept, info.used_swa)
    kv_alloc = _kv_bytes(info, info.size_base, info.size_swa)
    lb_json = None
    if lb is not None:
        # the K/V rows the layers keep (sum of the per-layer budgets); the decode context allocates
        # max_l B_l prompt cells (+ the generation) in every layer: kv_bytes_allocated
        kv_kept = BG.kv_bytes(ctx, lb.counts)
        lb_json = lb.to_json(ctx.kv_layer_cell_bytes())
        n_kept = int(round(float(np.mean(lb.counts))))

    # decode: the first token comes from the full-depth logits of the last prompt token
    ttft = pf.seconds + t_sel + t_cmp
    try:
        dec = greedy_decode(model, ctx, first_logits, max_tokens, ignore_eos=ignore_eos, on_text=on_text)
    finally:
        ctx.close()
    out, t_dec = dec.tokens, dec.seconds
    if dec.note:
        note = (note + "; " if note else "") + dec.note
    n_dec_steps = max(0, len(out) - 1)
    return GenerateResult(
        text=dec.text, policy=policy, n_prompt=n, n_generated=len(out), selected_layer=selected,
        n_kept=n_kept, kv_bytes_full=kv_full, kv_bytes=kv_kept, kv_bytes_allocated=kv_alloc,
        prefill_s=prefill_s, prefill_work=prefill_work, select_s=t_sel, compact_s=t_cmp, time_to_first_token_s=ttft, decode_s=t_dec,
        decode_tokens_per_s=(n_dec_steps / t_dec) if t_dec > 0 and n_dec_steps else 0.0,
        window=window, budget=budget if policy != "full" else None, tokens=out, note=note, asl=asl_info,
        layer_budgets=lb_json, span=str(span))


@dataclass
class Decoded:
    tokens: list[int]
    text: str
    seconds: float
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        steps = max(0, len(self.tokens) - 1)
        return steps / self.seconds if self.seconds > 0 and steps else 0.0


def greedy_decode(model: Model, ctx: Context, first_logits: np.ndarray, max_tokens: int, ignore_eos: bool = False,
                  on_text: Optional[Callable[[str], None]] = None) -> Decoded:
    """Greedy decode from `first_logits` (the last prompt token's), appending to ctx; stops at an
    end-of-generation token (unless ignore_eos), after max_tokens, or when the context is full."""
    out: list[int] = []
    note = ""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text_parts: list[str] = []
    logits = first_logits
    t0 = time.perf_counter()
    for i in range(max_tokens):
        if not np.all(np.isfinite(logits)):
            raise RuntimeError("the model produced NaN or infinite logits (corrupt weights or hyper-parameters "
                               f"in {model.path.name}?); no text generated from them")
        tok = int(np.argmax(logits))
        if model.is_eog(tok) and not ignore_eos:
            break
        out.append(tok)
        piece = dec.decode(model.token_bytes(tok))
        if piece:
            text_parts.append(piece)
            if on_text:
                on_text(piece)
        if i == max_tokens - 1:
            break
        if ctx.n_past >= ctx.n_ctx and not ctx._has_room(1):
            note = "context full, generation stopped"
            break
        ctx.decode([tok])
        logits = ctx.logits()
    tail = dec.decode(b"", final=True)
    if tail:
        text_parts.append(tail)
        if on_text:
            on_text(tail)
    return Decoded(tokens=out, text="".join(text_parts), seconds=time.perf_counter() - t0, note=note)


@dataclass
class LayerMajor:
    ctx: Context            # the decode context (kept cells only), positioned after the prompt
    logits: np.ndarray      # full-depth logits of the last prompt token
    stop_layer: int         # the selection layer (fastkv: the fixed one; asl: N-1 when tau never reached)
    selection: Optional[object]
    n_kept: int
    kept: np.ndarray        # positions whose hidden states went past the selection layer
    scores: np.ndarray      # (stop_layer + 1, n_head, n_prompt) window scores of the layers that ran
    kv_bytes_full: int
    prefill_s: float
    prefill_work: float
    layer_budgets: Optional[object] = None  # budgets.LayerBudgets when layer_budgets was given


def prefill_kept(model: Model, tokens: list[int], kept, max_tokens: int, n_batch: int = 512,
                 n_threads: Optional[int] = None, flash_attn: bool = False) -> Context:
    """Second pass of asl-2pass / gemfilter: a context of len(kept) + max_tokens cells holding only the
    kept tokens, prefilled through every layer at their original positions (logits: the last one)."""
    kept_l = [int(x) for x in kept]
    ctx = Context(model, _pad(len(kept_l) + max_tokens), n_batch=n_batch, n_threads=n_threads,
                  flash_attn=flash_attn, allow_pos_gaps=True)
    for i in range(0, len(kept_l), n_batch):
        pos = kept_l[i: i + n_batch]
        ctx.decode([tokens[p] for p in pos], positions=pos, logits_last=i + n_batch >= len(kept_l))
    return ctx


def selects_per_head(model: Model, policy: str, prefill_mode: str = "auto",
                     layer_budgets: Optional[str] = None) -> bool:
    """Whether `policy` keeps a different token set per KV head: snapkv, fastkv, layer-major asl, and
    the per-layer budgets (each layer's SnapKV sets per KV head: zigzag, pyramid, asl --layer-budgets)."""
    return (policy in (("snapkv", "fastkv") + LAYER_BUDGET_POLICIES) or layer_budgets is not None
            or (policy == "asl" and prefill_mode != "ordinary" and layer_major_supported(model) is None))


def check_prunable(model: Model, policy: str, per_head: bool) -> None:
    """Raise ValueError when this model's architecture forbids pruning with `policy` (MLA: no pruning;
    multi-axis RoPE and ALiBi: no per-head selection). Used by generate, pyasl.Session and pyasl.Llama."""
    why = model.pruning_unsupported(per_head)
    if why:
        alt = "; use policy full" if model.pruning_unsupported(False) else \
            ("; use policy asl with prefill_mode ordinary (--prefill ordinary) and no layer budgets, asl-2pass, "
             "gemfilter or full")
        raise ValueError(f"policy {policy} cannot run on this model: {why}{alt}")


def layer_major_supported(model: Model) -> Optional[str]:
    """None when layer-major prefill works for this model, else the reason."""
    if model.arch not in LAYER_RANGE_ARCHS:
        return f"layer-major prefill is not implemented for architecture {model.arch!r}"
    if model.n_swa > 0 and (model.arch not in SWA_LAYER_MAJOR_ARCHS or model.swa_type != 1):
        return (f"layer-major prefill handles the sliding-window caches of {', '.join(SWA_LAYER_MAJOR_ARCHS)} "
                f"only, not {model.arch!r}")
    if model.n_swa > 0 and all(model.swa_layers):
        return "every layer uses the sliding window (no full-context KV cache)"
    return None


def ranked_layer_mask(model: Model, n_prompt: int) -> Optional[np.ndarray]:
    """The layers whose window scores may rank a prompt of n_prompt tokens (policies.ranked_layer_mask):
    None (all) unless the model has sliding-window layers and the prompt is longer than the window."""
    from . import policies as P

    if model.n_swa <= 0:
        return None
    return P.ranked_layer_mask(model.swa_layers, model.n_swa, n_prompt)


def _swa_window(model: Model, n: int) -> Optional[np.ndarray]:
    """Prompt positions a sliding-window cache keeps after the prompt (the last n_swa, as llama.cpp's
    state save does); None for a model without one."""
    if model.n_swa <= 0:
        return None
    return np.arange(max(0, n - model.n_swa), n, dtype=np.int64)


def layer_major_prefill(model: Model, tokens: list[int], policy: str, budget: int, window: int, tau: float = 0.3,
                        l_min: Optional[int] = None, l_obs: Optional[int] = None, kernel: int = 7,
                        layer: Optional[int] = None, max_tokens: int = 128, n_batch: int = 512,
                        n_threads: Optional[int] = None, flash_attn: bool = False,
                        progress: Optional[Callable[[int, int], None]] = None, layer_budgets: Optional[str] = None,
                        budget_opts: Optional[dict] = None, span=None) -> LayerMajor:
    """Layer-major prefill with one-shot token-selective propagation (policies asl and fastkv), or
    with a second pass over the kept tokens (asl-2pass: the first pass stops at the ASL layer).

    Every layer runs over all ubatches before the next one; the window scores of each layer come
    from the last ubatch (the last `window` tokens). After layer L (asl: the first layer whose rank
    variance ratio is below tau; fastkv: `layer`) only the kept tokens' hidden states go through
    layers L+1..N-1, at their original positions, in a context sized to the budget. Layers <= L keep
    the SnapKV per-KV-head top-`budget` of their own full KV; layers > L hold the kept tokens.
    With layer_budgets (zigzag, pyramid, uniform; options in budget_opts) layers <= L keep
    per-layer budgets of average `budget` instead (pyasl.budgets).

    Sliding-window models (Gemma 3): ranks come from global layers only (ranked_layer_mask; fastkv
    ranks with the latest global layer <= `layer`). Each layer's pass starts on an empty
    sliding-window cache and fills it as an ordinary prefill does (set_reuse_cells: only the global
    cache reuses cells), so a sliding-window layer attends over ~n_swa + n_batch cells and sees
    exactly what it sees in an ordinary prefill. Past L, the propagated tokens are the kept ones plus
    the last n_swa prompt positions (the sliding window is always kept, like the observation window):
    the global caches then keep only the kept tokens (the budget), and every sliding-window layer
    holds the last n_swa positions, as after an ordinary prefill. prefill_work counts those extra
    tokens.
    """
    from . import policies as P

    why = layer_major_supported(model)
    if why:
        raise ValueError(why)
    if policy not in ("asl", "fastkv", "asl-2pass"):
        raise ValueError(f"layer-major prefill runs asl, fastkv or asl-2pass, not {policy!r}")
    N, n = model.n_layer, len(tokens)
    _check_int("window", window, 1, min(n - 1, n_batch) if n > 1 else 0)
    _check_int("budget", budget, window + 1, 1 << 31)
    if policy != "fastkv" and not (isinstance(tau, (int, float)) and 0 < tau <= 1):
        raise ValueError(f"tau must satisfy 0 < tau <= 1, got {tau!r}")
    d_min, d_obs = P.default_layer_params(N)
    l_min = d_min if l_min is None else l_min
    l_obs = d_obs if l_obs is None else l_obs
    if policy == "fastkv" and (layer is None or not 0 <= layer < N):
        raise ValueError(f"policy fastkv needs --layer in 0..{N - 1}")
    if not 0 <= l_min < N:
        raise ValueError(f"l_min {l_min} is outside the model's layers 0..{N - 1}")
    mask = ranked_layer_mask(model, n)
    if policy == "fastkv":
        P.latest_ranked_layer(mask, layer)  # refuses a layer before the first global one
    t0 = time.perf_counter()

    def decide(l: int, scores: np.ndarray):
        if policy == "fastkv":
            return l == layer, None
        if l > l_min and (mask is None or mask[l]):
            s = P.asl_select(scores[: l + 1], window=window, budget=budget, tau=tau, l_min=l_min, l_obs=l_obs,
                             kernel=kernel, layer_mask=None if mask is None else mask[: l + 1], span=span)
            if s.selected_layer is not None:
                return True, s
        return False, None

    A, scores, Hs, stop, sel = _layer_major_pass(model, tokens, window, decide, n_batch=n_batch, n_threads=n_threads,
                                                 flash_attn=flash_attn, progress=progress)
    H = Hs[-1] if Hs else None
    info = A.kv_info()
    kv_full = _kv_bytes(info, n, info.used_swa)  # as an ordinary prefill: it fills the same cells
    if stop is None:  # asl: tau never reached, every layer ran
        stop = N - 1
        sel = P.asl_select(scores, window=window, budget=budget, tau=tau, l_min=l_min, l_obs=l_obs, kernel=kernel,
                           layer_mask=mask, span=span)
    kept = sel.kept if sel is not None else P.asl_select_at_layer(
        scores[: stop + 1], window=window, budget=budget, layer=stop, kernel=kernel,
        layer_mask=None if mask is None else mask[: stop + 1], span=span)
    k = len(kept)
    kept_l = [int(x) for x in kept]
    if policy == "asl-2pass":
        # second pass: only the kept tokens, at their original positions, through every layer
        A.close()
        B = prefill_kept(model, tokens, kept_l, max_tokens, n_batch=n_batch, n_threads=n_threads,
                         flash_attn=flash_attn)
        work = ((stop + 1) * n + N * k) / (N * n)
        return LayerMajor(ctx=B, logits=B.logits(), stop_layer=stop, selection=sel, n_kept=k, kept=np.asarray(kept),
                          scores=scores[: stop + 1], kv_bytes_full=kv_full,
                          prefill_s=time.perf_counter() - t0, prefill_work=work)
    B, logits, lb, n_prop = _one_shot(model, A, H, kept_l, scores, stop, n, budget=budget, window=window,
                                      kernel=kernel, max_tokens=max_tokens, n_batch=n_batch, n_threads=n_threads,
                                      flash_attn=flash_attn, layer_budgets=layer_budgets, budget_opts=budget_opts,
                                      span=span)
    cells = k if lb is None else lb.prompt_cells  # prompt cells of the decode context
    work = ((stop + 1) * n + (N - stop - 1) * n_prop) / (N * n)
    return LayerMajor(ctx=B, logits=logits, stop_layer=stop, selection=sel, n_kept=cells, kept=np.asarray(kept),
                      scores=scores[: stop + 1], kv_bytes_full=kv_full,
                      prefill_s=time.perf_counter() - t0, prefill_work=work, layer_budgets=lb)


def shrink_context(ctx: Context, n_kept: int, n_past: int, max_tokens: int) -> Context:
    """Move a pruned sequence (n_kept cells, next position n_past) into a new context sized to the
    kept cells + max_tokens (+ the sliding-window cells in use), so the memory is really freed.
    Closes ctx; the new context has ctx's batch size, threads and attention settings."""
    state = ctx.state_get()
    swa_used = ctx.kv_info().used_swa
    model, nb, nt, fa = ctx.model, ctx.n_batch, ctx.n_threads, ctx.flash_attn
    ctx.close()
    new = Context(model, _pad(max(n_kept, swa_used) + max_tokens), n_batch=nb, n_threads=nt, flash_attn=fa)
    new.state_set(state, n_past=n_past)
    return new


def _layer_major_pass(model: Model, tokens: list[int], window: int, decide, n_batch: int = 512,
                      n_threads: Optional[int] = None, flash_attn: bool = False,
                      progress: Optional[Callable[[int, int], None]] = None, keep_all_hidden: bool = False):
    """Run layers 0, 1, ... each over every ubatch of `tokens` (window scores armed on the last
    ubatch, the last `window` tokens) until decide(l, scores) returns (True, selection).

    Returns (A, scores, Hs, stop, selection): A holds the full KV of layers 0..stop; scores is
    (n_layer, n_head, n) with rows 0..stop filled; Hs is a list of (n, n_embd) hidden states, the
    input of layer l + 1 for each layer l that ran (only the last one unless keep_all_hidden);
    stop is None when decide never said stop (every layer ran; A's logits are full depth).
    """
    N, n = model.n_layer, len(tokens)
    A = Context(model, _pad(n + 1), n_batch=n_batch, n_threads=n_threads, flash_attn=flash_attn, capture=True)
    head = n - window
    chunks = [(i, min(i + n_batch, head)) for i in range(0, head, n_batch)] + [(head, n)]
    scores = np.zeros((N, model.n_head, n), dtype=np.float32)
    Hs: list[np.ndarray] = []
    H = None
    stop, sel = None, None
    try:
        for l in range(N):
            last = l == N - 1
            A.set_layer_range(l, l + 1)
            A.set_reuse_cells(l > 0)
            A.set_hidden_output(None if last else l + 1)
            newH = None if last else np.empty((n, model.n_embd), dtype=np.float32)
            for a, b in chunks:
                win = a == head
                if win:
                    A.arm_scores(window)
                try:
                    if l == 0:
                        A.decode(tokens[a:b], pos0=a, logits_last=win)
                    else:
                        A.decode_hidden(H[a:b], list(range(a, b)), logits_last=win)
                finally:
                    if win:
                        A.disarm_scores()
                if newH is not None:
                    newH[a:b] = A.hidden(b - a)
            scores[l] = A.layer_scores(l, n)
            H = newH
            if H is not None:
                if keep_all_hidden:
                    Hs.append(H)
                else:
                    Hs[:] = [H]
            if progress:
                progress((l + 1) * n, N * n)
            done, s = decide(l, scores)
            if done:
                stop, sel = l, s
                break
        A.set_layer_range(0, N)
        A.set_reuse_cells(False)
        A.set_hidden_output(None)
    except BaseException:
        A.close()
        raise
    return A, scores, Hs, stop, sel


def _one_shot(model: Model, A: Context, H: Optional[np.ndarray], kept: list[int], scores: np.ndarray, stop: int,
              n: int, budget: int, window: int, kernel: int, max_tokens: int, n_batch: int = 512,
              n_threads: Optional[int] = None, flash_attn: bool = False,
              last_logits: Optional[np.ndarray] = None, layer_budgets: Optional[str] = None,
              budget_opts: Optional[dict] = None, span=None):
    """One-shot token-selective propagation after layer `stop` (A: the full KV of layers 0..stop;
    H: the input of layer stop + 1 for every prompt token). Layers <= stop keep the SnapKV
    per-KV-head top-`budget` of their own KV; the kept tokens go through layers stop+1..N-1 at
    their positions. With layer_budgets (zigzag, pyramid, uniform; options in budget_opts) layers
    <= stop keep per-layer budgets of average `budget` instead (pyasl.budgets).
    Sliding-window models: the last n_swa prompt positions are propagated too (every
    sliding-window layer holds them, as after an ordinary prefill); the global cache keeps the kept
    tokens. Returns (decode context of the kept cells + max_tokens, the last prompt token's
    full-depth logits (when stop is the last layer: last_logits, else A's), the LayerBudgets or
    None, the number of tokens propagated).
    Closes A."""
    from . import policies as P

    N, k = model.n_layer, len(kept)
    swa = model.swa_layers if model.n_swa > 0 else [False] * N
    win = _swa_window(model, n)  # None, or the positions the sliding-window cache keeps
    lb = None
    try:
        if layer_budgets:
            if win is not None:
                raise ValueError("per-layer budgets do not support sliding-window models yet")
            from . import budgets as BG

            lb = BG.apply_layer_budgets(A, scores[: stop + 1], layer_budgets, budget, window, kernel=kernel,
                                        shared=np.asarray(kept), span=span, **(budget_opts or {}))
        else:
            sets = np.empty((N, model.n_head_kv, k), dtype=np.int32)
            for l in range(N):
                # sliding-window layers live in the SWA cache, which keeps its window (kv_keep_per_head
                # ignores them)
                sets[l] = P.snapkv_select(scores[l], window=window, budget=budget, n_head_kv=model.n_head_kv,
                                          kernel=kernel, span=span) if l <= stop and not swa[l] else kept
            A.kv_keep_per_head(sets)
            if win is not None:
                A.kv_keep_swa(win)
        cells = k if lb is None else lb.prompt_cells  # prompt cells of the decode context
        if stop == N - 1:
            logits = A.logits() if last_logits is None else last_logits
            if lb is not None:  # per-layer counts are set again on the new context
                return BG.move_to_context(A, n, cells + max_tokens, n_batch=n_batch, n_threads=n_threads,
                                          flash_attn=flash_attn), logits, lb, k
            return shrink_context(A, k, n, max_tokens), logits, lb, k
        # sliding-window models: the window's tokens are propagated too, so every sliding-window
        # layer holds them; B's global cache is then pruned back to the kept tokens
        prop = kept if win is None else sorted(set(kept) | set(int(p) for p in win))
        B = Context(model, _pad(max(len(prop), cells + max_tokens)), n_batch=n_batch, n_threads=n_threads,
                    flash_attn=flash_attn, allow_pos_gaps=True)
        try:
            B.set_layer_range(stop + 1, N)
            for i in range(0, len(prop), n_batch):
                pos = prop[i: i + n_batch]
                B.decode_hidden(H[pos], pos, logits_last=i + n_batch >= len(prop))
            logits = B.logits()
            B.set_layer_range(0, N)
            if win is not None:
                if len(prop) != k:
                    B.kv_keep(np.asarray(kept))
                B.kv_keep_swa(win)
                B.kv_copy_swa_cells_from(A, 0, stop + 1, len(win))
            B.kv_copy_cells_from(A, 0, stop + 1, cells)
            if lb is not None:
                # cells k..P-1 (rows of layers <= stop only) join the metadata of A's compaction
                B.set_kv_layer_cells(lb.counts, meta=lb.meta)
        except BaseException:
            B.close()
            raise
        return B, logits, lb, len(prop)
    finally:
        A.close()
