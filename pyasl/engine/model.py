"""A loaded GGUF model on our libllama: weights, vocabulary, chat template, architecture facts.

Everything goes through llama.cpp's C API (via llama-cpp-python's ctypes layer) plus the pyasl C
API in native/.
"""
from __future__ import annotations

import ctypes
import os
import weakref
from pathlib import Path
from typing import Optional

from .. import _native
from .._native import check
from ..arch import ALIBI_ARCHS


class ModelLoadError(RuntimeError):
    pass


class ClosedError(RuntimeError):
    """A Model or Context was used after close() (its native handle is gone)."""


def _ll():
    llama_cpp, lib, cb = _native.load()
    return llama_cpp, lib, cb


def _check_gguf(path: Path):
    """Refuse a missing, non-GGUF, truncated, corrupt or unsupported file before llama.cpp sees it."""
    from ..gguf_check import GGUFError, read_header, unsupported_reason

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


def load_model(name_or_path, n_gpu_layers: int = 0, verbose: bool = False) -> Model:
    """Load a GGUF model (a path, or a known name such as ``smollm2`` that is fetched and cached)."""
    from ..models import resolve_model

    return Model(resolve_model(name_or_path), n_gpu_layers=n_gpu_layers, verbose=verbose)
