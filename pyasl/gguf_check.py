"""Checks a GGUF file before llama.cpp loads it: header, metadata, tensor table, file size, architecture.

llama.cpp refuses most damaged files by itself, but only after printing to its log, and its
messages do not say what is wrong in terms a user can act on. This walks the header with mmap
and struct (gguf.GGUFReader builds numpy views of every field and takes tens of seconds on a
150K-token vocabulary), using the gguf package's type tables, and raises GGUFError with a message
that names the problem: not a GGUF file, truncated, corrupt header, or an architecture pyasl
cannot prune.

    info = read_header(path)      # GGUFInfo, or GGUFError
    reason = unsupported_reason(info)  # None, or why pyasl refuses the model
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import gguf

__all__ = ["GGUFError", "GGUFInfo", "read_header", "unsupported_reason", "RECURRENT_ARCHS", "HYBRID_ARCHS"]

# llm_arch_is_recurrent / llm_arch_is_hybrid of the pinned llama.cpp (src/llama-arch.cpp)
RECURRENT_ARCHS = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})
HYBRID_ARCHS = frozenset({
    "jamba", "falcon-h1", "plamo2", "granitehybrid", "lfm2", "lfm2moe", "nemotron_h", "nemotron_h_moe",
    "qwen3next", "kimi-linear", "bailingmoe3", "kimi-k3", "glm5-next", "qwen35", "qwen35moe", "qwen4exp",
    "deepseek4", "minimax-01",
})

_VT = gguf.GGUFValueType
_SCALAR = {
    _VT.UINT8: "<B", _VT.INT8: "<b", _VT.UINT16: "<H", _VT.INT16: "<h", _VT.UINT32: "<I", _VT.INT32: "<i",
    _VT.FLOAT32: "<f", _VT.BOOL: "<?", _VT.UINT64: "<Q", _VT.INT64: "<q", _VT.FLOAT64: "<d",
}
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_STR = 1 << 30  # no sane key, name or value is a gigabyte


class GGUFError(ValueError):
    """The file is not a usable GGUF model (message says why)."""


@dataclass
class GGUFInfo:
    path: Path
    version: int
    n_tensors: int
    file_size: int
    data_end: int  # where the last tensor's data ends
    metadata: dict = field(default_factory=dict)  # scalar and string values; arrays as their length

    @property
    def arch(self) -> Optional[str]:
        a = self.metadata.get("general.architecture")
        return a if isinstance(a, str) else None

    def get(self, key: str, default=None):
        """An arch-scoped key: get("attention.causal") reads "<arch>.attention.causal"."""
        return self.metadata.get(f"{self.arch}.{key}", default)


class _Walker:
    def __init__(self, buf, path: Path):
        self.buf, self.off, self.path, self.size = buf, 0, path, len(buf)

    def fail(self, what: str):
        raise GGUFError(f"{self.path} is truncated or corrupt: {what} (at byte {self.off} of {self.size}); "
                        "download it again")

    def need(self, n: int, what: str) -> None:
        if self.off + n > self.size:
            raise GGUFError(f"{self.path} is truncated or corrupt: {what} needs {n} bytes at offset {self.off}, "
                            f"but the file has {self.size} bytes; download it again")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.off)[0]
        self.off += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what + " length")
        if n > _MAX_STR:
            self.fail(f"{what} claims {n} bytes")
        self.need(n, what)
        raw = bytes(self.buf[self.off: self.off + n])
        self.off += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")

    def skip_string(self, what: str) -> None:
        n = self.scalar("<Q", what + " length")
        self.need(n, what)
        self.off += n

    def value_type(self, what: str) -> "gguf.GGUFValueType":
        t = self.scalar("<I", what + " type")
        try:
            return _VT(t)
        except ValueError:
            self.fail(f"{what} has unknown value type {t}")

    def unique_strings(self, what: str) -> int:
        """The rest of a string array whose elements must differ (the vocabulary); returns the count."""
        count = self.scalar("<Q", what + " count")
        if count > self.size:
            self.fail(f"{what} claims {count} elements")
        seen = set()
        for i in range(count):
            n = self.scalar("<Q", what + " element length")
            self.need(n, what)
            b = bytes(self.buf[self.off: self.off + n])
            self.off += n
            if b in seen:
                self.fail(f"{what}: token {i} ({b[:40]!r}) appears twice")
            seen.add(b)
        return count

    def value(self, vt, what: str, depth: int = 0):
        if vt == _VT.STRING:
            return self.string(what)
        if vt == _VT.ARRAY:
            if depth > 2:
                self.fail(f"{what}: arrays nested too deep")
            et = self.value_type(what + " element")
            count = self.scalar("<Q", what + " count")
            if et == _VT.STRING or et == _VT.ARRAY:
                if count > self.size:  # every element takes at least a byte
                    self.fail(f"{what} claims {count} elements")
                for _ in range(count):
                    if et == _VT.STRING:
                        self.skip_string(what + " element")
                    else:
                        self.value(et, what, depth + 1)
            else:
                n = count * struct.calcsize(_SCALAR[et])
                self.need(n, what)
                self.off += n
            return count
        return self.scalar(_SCALAR[vt], what)


def read_header(path: str | os.PathLike) -> GGUFInfo:
    """Walk the GGUF header and tensor table; GGUFError names what is wrong."""
    path = Path(path)
    if not path.exists():
        raise GGUFError(f"model file not found: {path}")
    if path.is_dir():
        raise GGUFError(f"{path} is a directory, not a GGUF file")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise GGUFError(f"cannot read {path}: {e.strerror or e}") from e
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise GGUFError(f"{path} is empty (0 bytes), not a GGUF file")
        head = f.read(4)
        if head != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file (bad magic {head!r}; a GGUF file starts with b'GGUF')")
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise GGUFError(f"cannot map {path}: {e}") from e
    try:
        return _walk(_Walker(memoryview(buf), path), size)
    finally:
        try:
            buf.close()
        except BufferError:  # a memoryview still refers to it; the GC closes it
            pass


def _walk(w: _Walker, size: int) -> GGUFInfo:
    w.off = 4
    version = w.scalar("<I", "version")
    if version not in (2, 3):
        if version in (1 << 24, 2 << 24, 3 << 24):
            raise GGUFError(f"{w.path} is a big-endian GGUF file; llama.cpp on this machine needs little-endian")
        raise GGUFError(f"{w.path}: GGUF version {version} is not supported (llama.cpp reads versions 2 and 3)")
    n_tensors = w.scalar("<Q", "tensor count")
    n_kv = w.scalar("<Q", "metadata count")
    if n_tensors > size // 8 or n_kv > size // 8:
        w.fail(f"header claims {n_tensors} tensors and {n_kv} metadata entries")
    meta: dict = {}
    for i in range(n_kv):
        key = w.string(f"metadata key {i}")
        vt = w.value_type(f"metadata {key!r}")
        if key == "tokenizer.ggml.tokens" and vt == _VT.ARRAY:
            start = w.off
            if w.value_type(f"metadata {key!r} element") == _VT.STRING:
                val = w.unique_strings(f"metadata {key!r}")
            else:
                w.off = start
                val = w.value(vt, f"metadata {key!r}")
        else:
            val = w.value(vt, f"metadata {key!r}")
        if key in meta:
            w.fail(f"duplicate metadata key {key!r}")
        meta[key] = val
    align = meta.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
        w.fail(f"general.alignment {align!r} is not a power of two")
    tensors = []
    names = set()
    for i in range(n_tensors):
        name = w.string(f"tensor {i} name")
        if name in names:
            w.fail(f"duplicate tensor name {name!r}")
        names.add(name)
        nd = w.scalar("<I", f"tensor {name!r} dimension count")
        if nd < 1 or nd > _MAX_DIMS:
            w.fail(f"tensor {name!r} has {nd} dimensions")
        dims = [w.scalar("<Q", f"tensor {name!r} shape") for _ in range(nd)]
        t = w.scalar("<I", f"tensor {name!r} type")
        try:
            qt = gguf.GGMLQuantizationType(t)
            blk, tsz = gguf.GGML_QUANT_SIZES[qt]
        except (ValueError, KeyError):
            w.fail(f"tensor {name!r} has unknown type {t}")
        off = w.scalar("<Q", f"tensor {name!r} offset")
        ne = 1
        for d in dims:
            if d <= 0 or d > (1 << 40):
                w.fail(f"tensor {name!r} has shape {dims}")
            ne *= d
        if dims[0] % blk:
            w.fail(f"tensor {name!r}: row of {dims[0]} is not a multiple of the {qt.name} block size {blk}")
        nbytes = ne // blk * tsz
        if off % align:
            w.fail(f"tensor {name!r} data offset {off} is not aligned to {align}")
        tensors.append((name, off, nbytes))
    data_start = (w.off + align - 1) // align * align
    data_end = data_start
    for name, off, nbytes in tensors:
        end = data_start + off + nbytes
        if end > size:
            raise GGUFError(f"{w.path} is truncated: tensor {name!r} ends at byte {end}, but the file has {size} "
                            "bytes; download it again")
        data_end = max(data_end, end)
    info = GGUFInfo(path=w.path, version=version, n_tensors=n_tensors, file_size=size, data_end=data_end,
                    metadata=meta)
    _check_hparams(info)
    return info


_MAX_LAYERS = 512  # LLAMA_MAX_LAYERS
# architectures whose graph builder (src/models/<arch>.cpp) asserts n_rot == head size
_ROT_IS_HEAD_DIM = frozenset({
    "apertus", "arcee", "arctic", "baichuan", "chameleon", "codeshell", "cogvlm", "cohere2moe", "dbrx", "deci",
    "deepseek", "dots1", "dream", "exaone-moe", "exaone", "exaone4", "falcon", "granite", "grok", "grovemoe",
    "hunyuan-moe", "internlm2", "jais2", "llada-moe", "llada", "llama", "llama4", "maincoder", "mellum",
    "minimax-01", "minimax-m2", "mistral3", "nemotron", "olmo", "olmo2", "olmoe", "orion", "paddleocr", "plamo",
    "pockettts", "qwen2", "qwen2moe", "qwen2vl", "qwen3", "qwen3moe", "qwen3vl", "qwen3vlmoe", "rnd1",
    "smallthinker", "smollm3", "starcoder2", "talkie", "xverse",
})


def _check_hparams(info: GGUFInfo) -> None:
    """Values llama.cpp asserts on (abort) instead of refusing: refuse them here with the key named."""
    arch = info.arch

    def bad(key: str, why: str):
        raise GGUFError(f"{info.path} is corrupt: {key} = {info.metadata.get(key)!r} {why}")

    ftype = info.metadata.get("general.file_type")
    if isinstance(ftype, int) and not 0 <= ftype <= 1024:  # llama_ftype; llama.cpp loads it as the enum (UB)
        bad("general.file_type", "is not a llama_ftype value")
    if arch is None:
        return
    for key, val in info.metadata.items():
        if key.startswith(arch + ".") and isinstance(val, float) and not math.isfinite(val):
            bad(key, "is not a finite number")
    n_layer = info.get("block_count")
    if isinstance(n_layer, int) and not 0 < n_layer <= _MAX_LAYERS:
        bad(f"{arch}.block_count", f"is outside 1..{_MAX_LAYERS}")
    for k in ("embedding_length", "context_length"):
        v = info.get(k)
        if isinstance(v, int) and not 0 < v < (1 << 31):
            bad(f"{arch}.{k}", "must be positive")
    n_embd, n_head = info.get("embedding_length"), info.get("attention.head_count")
    head_dim = info.get("attention.key_length")
    if not isinstance(head_dim, int) and isinstance(n_embd, int) and isinstance(n_head, int) and n_head > 0:
        head_dim = n_embd // n_head
    n_rot = info.get("rope.dimension_count")
    if isinstance(n_rot, int) and isinstance(head_dim, int):
        if arch in _ROT_IS_HEAD_DIM and n_rot != head_dim:
            bad(f"{arch}.rope.dimension_count", f"must equal the head size {head_dim} for {arch}")
        if not 0 < n_rot <= head_dim or n_rot % 2:
            bad(f"{arch}.rope.dimension_count", f"must be even and in 1..{head_dim} (the head size)")
    if arch == "gemma3" and info.get("attention.sliding_window_pattern") == 1:
        bad("gemma3.attention.sliding_window_pattern", "leaves no sliding-window layer, which gemma3 requires")
    for k in ("rope.freq_base", "rope.freq_base_swa"):
        v = info.get(k)
        if isinstance(v, float) and v <= 0:
            bad(f"{arch}.{k}", "must be positive")
    v = info.get("rope.scaling.factor")
    if isinstance(v, float) and v < 0:
        bad(f"{arch}.rope.scaling.factor", "must be >= 0 (0: no scaling)")
    v = info.get("attention.sliding_window")
    if isinstance(v, int) and not 0 <= v < (1 << 30):
        bad(f"{arch}.attention.sliding_window", "is not a usable window size")
    for k in ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"):
        v = info.get(k)
        if isinstance(v, float) and v < 0:
            bad(f"{arch}.{k}", "must be >= 0")
    n_vocab = info.metadata.get("tokenizer.ggml.tokens")
    if isinstance(n_vocab, int):
        for k in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            v = info.metadata.get(k)
            if isinstance(v, int) and v < n_vocab:
                bad(k, f"has fewer entries than the {n_vocab} tokens")


def unsupported_reason(info: GGUFInfo) -> Optional[str]:
    """None when pyasl can load the model, else why not (checked before llama.cpp sees the file)."""
    arch = info.arch
    if arch is None:
        return f"{info.path.name} has no general.architecture string: not a llama.cpp model"
    if info.n_tensors == 0:
        return f"{info.path.name} holds no tensors (a vocabulary-only or adapter GGUF, not a model)"
    if arch in RECURRENT_ARCHS or arch in HYBRID_ARCHS:
        kind = "recurrent" if arch in RECURRENT_ARCHS else "hybrid (attention + recurrent)"
        return (f"{info.path.name}: architecture {arch!r} is {kind}; its state is not an attention KV cache, "
                "so pyasl cannot prune it (use llama.cpp directly)")
    if info.get("attention.causal") is False:
        return (f"{info.path.name}: architecture {arch!r} uses non-causal attention (an encoder, embedding or "
                "diffusion model); pyasl generates text with causal decoders only")
    return None
