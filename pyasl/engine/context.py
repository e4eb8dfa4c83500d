"""A llama.cpp context for one sequence (seq 0): decoding tokens or hidden states, layer ranges,
window-score capture, and the KV-cache operations the policies need (keep, per head, per layer,
copy, renumber, state)."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Optional

import numpy as np

from .. import _native
from .._native import PyaslError, check
from .model import ClosedError, Model, _Handle, _Native, _ll

SEQ = 0


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


# the KV cache types llama.cpp accepts (its -ctk / -ctv names); the values are ggml_type
# window scores (native/pyasl.h): softmax attention summed over the window queries (every policy),
# the same per query (attention-rows: (n_kv, window, n_head) captures), or the raw q.k products
# summed over them (GemFilter as published)
SCORES = {"attention": 0, "attention-rows": 1, "qk": 2}
KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "iq4_nl": 20, "q5_0": 6, "q5_1": 7}
_KV_TYPE_NAMES = {v: k for k, v in KV_TYPES.items()}


def kv_type_name(t) -> str:
    """A KV cache type by name ("q8_0") or ggml_type id (8), as its name; ValueError for others."""
    if isinstance(t, str) and t.lower() in KV_TYPES:
        return t.lower()
    if isinstance(t, (int, np.integer)) and not isinstance(t, bool) and int(t) in _KV_TYPE_NAMES:
        return _KV_TYPE_NAMES[int(t)]
    raise ValueError(f"unknown KV cache type {t!r}; choose one of {', '.join(KV_TYPES)}")


def _check_positions(positions, n: int) -> None:
    p = _int32_array(positions, "positions")
    if p.ndim != 1 or len(p) != n:
        raise ValueError(f"positions must be a list of {n} integers")
    if n and (p[0] < 0 or np.any(np.diff(p) <= 0)):
        raise ValueError("positions must be >= 0 and strictly increasing")


def default_threads(n_threads: Optional[int] = None) -> int:
    """The threads a context decodes with: `n_threads`, else every CPU (llama-cpp-python's default is half)."""
    return n_threads or max(1, os.cpu_count() or 1)


class Context(_Native):
    """A llama_context for one sequence, optionally wired to a score capture."""

    _ctx = _Handle()
    _batch = _Handle()
    # defaults for instances built around a raw llama_context (tests)
    _layer_begin = 0
    _last_batch = 0
    _hidden_lid = None
    _ebatch = None
    type_k = type_v = "f16"

    def __init__(self, model: Model, n_ctx: int, n_batch: int = 512, n_threads: Optional[int] = None,
                 flash_attn: bool = False, capture: bool = False, type_k="f16", type_v="f16",
                 allow_pos_gaps: bool = False, swa_full: bool = False, one_layer_kv: bool = False):
        """type_k, type_v: KV cache types (KV_TYPES names or ggml_type ids; a quantized V needs
        flash attention, as in llama.cpp). one_layer_kv: every layer stores its K/V in the first
        layer's tensors (patches/0005), the scratch context of a layer-major prefill that prunes each
        layer before the next one runs."""
        llama_cpp, lib, eval_cb = _ll()
        type_k, type_v = kv_type_name("f16" if type_k is None else type_k), kv_type_name("f16" if type_v is None else type_v)
        self.check_kv_types(type_v, flash_attn)
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
        nt = default_threads(n_threads)
        p.n_threads = nt
        p.n_threads_batch = nt
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.swa_full = swa_full  # sliding-window models: True sizes the SWA cache like the base one
        p.no_perf = True
        p.type_k, p.type_v = KV_TYPES[type_k], KV_TYPES[type_v]
        if capture:
            p.cb_eval = eval_cb
            p.cb_eval_user_data = self._cap
        self._params = p  # keep the callback object alive
        if one_layer_kv:
            lib.pyasl_set_kv_one_layer(True)
        try:
            self._ctx = llama_cpp.llama_init_from_model(model._m, p)
        finally:
            if one_layer_kv:
                lib.pyasl_set_kv_one_layer(False)
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
        self.type_k, self.type_v = type_k, type_v
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


    @staticmethod
    def check_kv_types(type_v, flash_attn: bool) -> None:
        """ValueError for a V cache type llama.cpp cannot use with this attention setting."""
        if kv_type_name(type_v) not in ("f16", "f32", "bf16") and not flash_attn:
            raise ValueError(f"a {kv_type_name(type_v)} V cache needs flash attention (--flash-attn): llama.cpp stores "
                             "V transposed without it, and a transposed V cannot be block-quantized")

    def settings(self) -> dict:
        """The keyword arguments that make another Context like this one (batch, threads, attention, cache types)."""
        return dict(n_batch=self.n_batch, n_threads=self.n_threads, flash_attn=self.flash_attn, type_k=self.type_k,
                    type_v=self.type_v)

    # ---- decoding ---------------------------------------------------------------------
    def decode(self, tokens: list[int], pos0: Optional[int] = None, logits_last: bool = True,
               positions: Optional[list[int]] = None, logits_all: bool = False) -> None:
        """Decode tokens at consecutive positions from pos0 (default: after the last one), or at
        explicit increasing `positions` (gaps need a context made with allow_pos_gaps). logits_all:
        every token's logits are kept (:meth:`logits` with its index in the batch)."""
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
        rc = self._submit(b, range(pos0, pos0 + n) if positions is None else positions, logits_last, logits_all)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}): " +
                               ("no free KV cells (context full)" if rc == 1 else
                                f"batch at positions {pos0}..{pos0 + n - 1} rejected (it must follow the last cached "
                                "position); run with --verbose for llama.cpp's log"))
        self.n_past = (pos0 + n) if positions is None else int(positions[-1]) + 1

    def _submit(self, b, positions, logits_last: bool, logits_all: bool = False) -> int:
        """Fill positions, sequence and output flags of batch b (tokens or embd already set); decode."""
        llama_cpp, _, _ = _ll()
        n = len(positions)
        for i, p in enumerate(positions):
            b.pos[i] = int(p)
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = SEQ
            b.logits[i] = 1 if logits_all or (logits_last and i == n - 1) else 0
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

    def logits(self, i: int = -1) -> np.ndarray:
        """The logits of the last decoded batch's token `i` (default the last; others need logits_all)."""
        llama_cpp, _, _ = _ll()
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, int(i))
        if not ptr:
            raise ValueError(f"no logits for token {i} of the last batch (decode with logits_all for every token)")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    # ---- scores -----------------------------------------------------------------------
    def arm_scores(self, window: int, score: str = "attention") -> None:
        """Capture the window scores of the next decodes (SCORES: attention or qk)."""
        _, lib, _ = _ll()
        if score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, not {score!r}")
        if self._cap is None:
            raise RuntimeError("this context was created without score capture")
        lib.pyasl_capture_clear(self._cap)
        check(lib.pyasl_set_score_window(self._ctx, window, SCORES[score]), "arm scores")

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

    def kv_gather_layer_from(self, src: "Context", il: int, sets: np.ndarray) -> None:
        """Layer il's rows of src's positions sets[h] (n_head_kv, k), sorted per KV head, into this
        context's cells 0..k-1 (head h's slice); this context's cell metadata is not touched."""
        _, lib, _ = _ll()
        p = _int32_array(sets, "per-head positions")
        if p.ndim != 2 or p.shape[0] != self.model.n_head_kv:
            raise ValueError(f"per-head positions must be (n_head_kv={self.model.n_head_kv}, k)")
        check(lib.pyasl_kv_gather_layer(self._ctx, src._ctx, SEQ, il, p.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                                        p.shape[0], p.shape[1]), "kv gather layer")

    def set_cell_positions(self, positions) -> None:
        """Cells 0..k-1 hold these increasing positions (rows untouched, every other cell freed);
        decoding continues after the last one."""
        _, lib, _ = _ll()
        p = _int32_array(positions, "cell positions")
        if p.ndim != 1 or len(p) == 0:
            raise ValueError("cell positions must be a non-empty 1-D list")
        check(lib.pyasl_kv_set_cell_positions(self._ctx, SEQ, p.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), len(p)),
              "set cell positions")
        self.n_past = int(p[-1]) + 1

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
        """sets[l]: (n_head_kv, B_l) positions of layer l, sorted per KV head (see pyasl.policies.layer_budgets)."""
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

    def state_size(self) -> int:
        """Length of the sequence's state bytes (:meth:`state_get`), counted without copying them."""
        llama_cpp, _, _ = _ll()
        return int(llama_cpp.llama_state_seq_get_size(self._ctx, SEQ))

    def state_get(self) -> bytearray:
        """The sequence's state, written by llama.cpp straight into the returned buffer (no second copy:
        a long document's state is hundreds of MiB)."""
        llama_cpp, _, _ = _ll()
        n = self.state_size()
        out = bytearray(n)
        buf = (ctypes.c_uint8 * n).from_buffer(out)
        got = llama_cpp.llama_state_seq_get_data(self._ctx, buf, n, SEQ)
        del buf  # releases the export, so `out` may be trimmed
        if got == 0:
            raise RuntimeError("could not save the sequence state")
        del out[got:]
        return out

    def state_save_file(self, path, tokens) -> None:
        """The sequence's state and its `tokens` written to `path` by llama.cpp, a tensor at a time (no
        copy of the whole state in memory, as state_get makes)."""
        llama_cpp, _, _ = _ll()
        t = (llama_cpp.llama_token * len(tokens))(*tokens)
        if llama_cpp.llama_state_seq_save_file(self._ctx, str(path).encode(), SEQ, t, len(tokens)) == 0:
            raise RuntimeError(f"could not save the sequence state to {path}")

    def state_load_file(self, path, tokens) -> None:
        """Load a file of :meth:`state_save_file` into the (cleared) sequence; it must hold `tokens`
        (RuntimeError otherwise). Decoding continues after them."""
        llama_cpp, _, _ = _ll()
        n = len(tokens)
        t = (llama_cpp.llama_token * max(1, n))()
        got = ctypes.c_size_t(0)
        if llama_cpp.llama_state_seq_load_file(self._ctx, str(path).encode(), SEQ, t, max(1, n),
                                               ctypes.byref(got)) == 0 or got.value != n:
            raise RuntimeError(f"could not load the sequence state from {path} (a file of another context or model?)")
        if list(t[:n]) != list(tokens):
            raise RuntimeError(f"the file {path} holds other tokens than expected")
        self.n_past = n

    def take_state(self) -> bytearray:
        """The sequence's state bytes, then close the context (what a pruned prefill hands over)."""
        try:
            return self.state_get()
        finally:
            self.close()

    def state_set(self, data, n_past: int) -> None:
        """Load state bytes (bytes or bytearray, read in place: llama.cpp only reads them)."""
        llama_cpp, _, _ = _ll()
        if isinstance(data, bytes):
            buf = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))
        else:
            buf = (ctypes.c_uint8 * len(data)).from_buffer(data)
        got = llama_cpp.llama_state_seq_set_data(self._ctx, buf, len(data), SEQ)
        del buf
        if got == 0:
            raise RuntimeError("could not load the sequence state into the decode context (too small?)")
        self.n_past = n_past


# llama.cpp's sequence state file (llama_state_seq_save_file): magic, version, token count (u32 each), the
# tokens (i32), then the sequence's data. llama_state_seq_get_data (Context.state_get) gives the same data
# after its own head: io_magic (u32, static in llama-context.cpp) and the sequence id (i32).
_GET_DATA_HEAD = np.array([0xAF143CD8, SEQ], dtype="<u4").tobytes()


def _state_file_head(tokens) -> bytes:
    llama_cpp, _, _ = _ll()
    head = np.array([llama_cpp.LLAMA_STATE_SEQ_MAGIC, llama_cpp.LLAMA_STATE_SEQ_VERSION, len(tokens)], dtype="<u4")
    return head.tobytes() + np.asarray(tokens, dtype="<i4").tobytes()


_COPY_CHUNK = 8 << 20  # bytes moved at a time between state files (never a whole state in memory)


def _copy(src, dst, n: int) -> None:
    while n > 0:
        b = src.read(min(n, _COPY_CHUNK))
        if not b:
            raise RuntimeError("the state ends early")
        dst.write(b)
        n -= len(b)


def state_file_size(path, tokens) -> int:
    """The length of the state bytes (as :meth:`Context.state_get` gives them) that a file of
    :meth:`Context.state_save_file` holding `tokens` stores."""
    return Path(path).stat().st_size - len(_state_file_head(tokens)) + len(_GET_DATA_HEAD)


def copy_state_from_file(path, tokens, out) -> int:
    """Write to the binary stream `out` the state bytes of a file of :meth:`Context.state_save_file` that
    holds `tokens`, a chunk at a time and without a context (RuntimeError when it holds anything
    else). Returns the bytes written."""
    head = _state_file_head(tokens)
    with open(path, "rb") as f:
        if f.read(len(head)) != head:
            raise RuntimeError(f"the file {path} is not a state file of these tokens")
        n = state_file_size(path, tokens)
        out.write(_GET_DATA_HEAD)
        _copy(f, out, n - len(_GET_DATA_HEAD))
    return n


def write_state_file(path, tokens, src, size: int) -> None:
    """Write the `size` state bytes (as :meth:`Context.state_get` gives them) read from the binary stream
    `src` as a file of :meth:`Context.state_save_file` holding `tokens`, without a context (what loading
    it into a context and saving it would write). RuntimeError when they are not a sequence state."""
    if src.read(len(_GET_DATA_HEAD)) != _GET_DATA_HEAD or size < len(_GET_DATA_HEAD):
        raise RuntimeError("not a llama.cpp sequence state")
    with open(path, "wb") as f:
        f.write(_state_file_head(tokens))
        _copy(src, f, size - len(_GET_DATA_HEAD))
