"""Tiny random GGUF models that llama.cpp loads and runs, for fast tests.

``make_tiny_model(path, arch=...)`` writes a complete GGUF (hyper-parameters,
a byte-level BPE tokenizer, a ChatML chat template and random weights) with
the ``gguf`` package.  Supported architectures:

* ``llama``  - RMSNorm, SwiGLU, RoPE, GQA.
* ``qwen2``  - as llama plus q/k/v biases.
* ``gemma3`` - q/k norms, post-attention/post-FFN norms, scaled embeddings,
  interleaved sliding-window and global attention layers.
* ``qwen3``  - as llama plus per-head RMS norms on q and k (``attn_q_norm``,
  ``attn_k_norm`` of size head_dim), NeoX RoPE, no q/k/v biases.
* ``phi3``   - fused ``attn_qkv`` (q, k, v rows stacked) and fused ``ffn_up``
  (gate and up stacked, 2*n_ff rows), NeoX RoPE, no rope scaling factors.
* ``mistral3`` - the dense (non-MoE) Ministral 3 layout, i.e. llama's tensors
  under the ``mistral3`` architecture (no attention temperature, no YaRN).
* ``deepseek2`` - multi-head latent attention (MLA, ``attention.kv_lora_rank`` > 0)
  with low-rank q (``attn_q_a``, ``attn_q_a_norm``, ``attn_q_b``), the compressed
  KV projection ``attn_kv_a_mqa`` (latent + one shared RoPE key part),
  ``attn_kv_a_norm`` and the per-head up-projections ``attn_k_b`` / ``attn_v_b``
  (3-D).  Dense: ``leading_dense_block_count`` = n_layer, no experts.  The cache
  holds one "KV head" of kv_lora_rank + rope dims; ``n_head_kv`` is ignored.
  Query head size head_dim = nope + rope halves, value head size head_dim.
* ``mpt``    - ALiBi (``attention.max_alibi_bias`` 8), LayerNorm without biases,
  fused ``attn_qkv``, GELU FFN (``ffn_up``/``ffn_down``), no RoPE.
* ``bloom``  - ALiBi hard-coded by llama.cpp (no GGUF key), embedding LayerNorm
  (``token_embd_norm``), LayerNorms and linear layers with biases, fused
  ``attn_qkv``, GELU FFN, no RoPE.

Weights are drawn from a seeded numpy generator, so the same arguments give
byte-identical files.  Linear weights use std ``init_scale / sqrt(fan_in)``:
with RMS-normalised inputs that keeps q.k/sqrt(d) at about unit scale, so the
attention is neither uniform nor one-hot and logits vary between tokens.
(A flat std of 0.02 on such narrow layers gives q.k ~ 1e-3, i.e. uniform
attention, which would hide any KV-pruning effect.)

The tokenizer is GPT-2 style byte-level BPE (``tokenizer.ggml.model = "gpt2"``,
``pre = "default"``): ids 0..3 are the specials ``<s>`` (BOS), ``</s>`` (EOS),
``<|im_start|>``, ``<|im_end|>`` (end of turn), ids 4..259 the 256 bytes in the
GPT-2 byte-to-unicode alphabet, then merges learnt on a small built-in English
text until the vocabulary reaches ``vocab_size`` (any remainder is filled with
unused ``<|extra_N|>`` tokens).  Any byte string can be tokenized.

``tiny_model_path(arch, **kw)`` writes the model once per process into
``$TMPDIR/pyasl-tiny/`` and returns the path.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import gguf

__all__ = [
    "ARCHS",
    "LIMITED_ARCHS",
    "BOS_ID",
    "CHAT_TEMPLATE",
    "EOS_ID",
    "EOT_ID",
    "IM_START_ID",
    "build_vocab",
    "make_tiny_model",
    "tiny_model_path",
]

# the architectures pyasl runs layer ranges on (tests iterate over these), then the ones whose KV
# pruning pyasl limits (MLA: deepseek2; ALiBi: mpt, bloom; tests/test_arch_limits.py)
ARCHS = ("llama", "qwen2", "gemma3", "qwen3", "phi3", "mistral3")
LIMITED_ARCHS = ("deepseek2", "mpt", "bloom")
_ALIBI_ARCHS = ("mpt", "bloom")  # no RoPE; LayerNorm with epsilon, GELU FFN, fused attn_qkv

BOS_ID, EOS_ID, IM_START_ID, EOT_ID = 0, 1, 2, 3
_SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
_N_BYTES = 256
_BASE_VOCAB = len(_SPECIALS) + _N_BYTES

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Text the BPE merges are learnt from.  Plain English so that typical test
# prompts compress into a few multi-byte tokens.
_CORPUS = """
The cache holds the keys and the values of every token the model has seen so far.
When the context grows long, the memory that the cache needs grows with it, and the
time spent on attention grows as well. A pruning policy decides which entries to keep
and which ones to drop, so that the model can continue to generate text with a fixed
budget. Some tokens are more important than others: the first tokens of a prompt often
receive a large share of the attention, and recent tokens matter for the next word.
There is a small house at the end of the road, near the river. In the morning the
children walk to the school on the hill, and in the evening they come back for dinner.
The weather was cold and the wind was strong, but the sun was shining over the water.
She said that the answer would be found in the book on the table in the other room.
Numbers such as 1, 2, 3, 10, 42, 100 and 2048 appear in this text as well as words.
This is a test. This is only a test of the tokenizer, the model and the runtime.
What is the capital of France? The capital of France is Paris. What is two plus two?
def main(): return sum(range(10)) # a line of code with (brackets), [lists] and {sets}.
"""


# ---------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    table = {}
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


_BYTE_CHARS = _bytes_to_unicode()
# close to llama.cpp's "default" pre-tokenizer: words with their leading space
_PRETOKEN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+")


def _learn_merges(n_merges: int) -> list[tuple[str, str]]:
    """Greedy byte-level BPE on _CORPUS, ties broken by the pair itself (deterministic)."""
    words = Counter(
        tuple(_BYTE_CHARS[b] for b in piece.encode("utf-8"))
        for piece in _PRETOKEN.findall(_CORPUS)
    )
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter = Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        joined = best[0] + best[1]
        new_words: Counter = Counter()
        for word, count in words.items():
            out = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += count
        words = new_words
    return merges


def build_vocab(vocab_size: int | None = None) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token_types, merges) for a vocabulary of ``vocab_size`` tokens.

    ``None`` means the base vocabulary plus 128 merges.
    """
    if vocab_size is None:
        vocab_size = _BASE_VOCAB + 128
    if vocab_size < _BASE_VOCAB + 1:
        raise ValueError(f"vocab_size must be at least {_BASE_VOCAB + 1} (specials + 256 bytes + 1 merge)")
    merges = _learn_merges(vocab_size - _BASE_VOCAB)
    tokens = list(_SPECIALS) + list(_BYTE_CHARS)
    types = [int(gguf.TokenType.CONTROL)] * len(_SPECIALS) + [int(gguf.TokenType.NORMAL)] * _N_BYTES
    seen = set(tokens)
    for a, b in merges:
        t = a + b
        if t not in seen:  # a merge result can repeat only in odd corner cases
            seen.add(t)
            tokens.append(t)
            types.append(int(gguf.TokenType.NORMAL))
    i = 0
    while len(tokens) < vocab_size:
        tokens.append(f"<|extra_{i}|>")
        types.append(int(gguf.TokenType.UNUSED))
        i += 1
    return tokens, types, [f"{a} {b}" for a, b in merges]


# ---------------------------------------------------------------- weights


_FTYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, None),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}


class _Tensors:
    """Deterministic random tensors, added to the writer in creation order."""

    def __init__(self, writer: gguf.GGUFWriter, seed: int, ftype: str, init_scale: float):
        self.w = writer
        self.rng = np.random.default_rng(seed)
        self.qtype = _FTYPES[ftype][1]
        self.scale = init_scale

    def _add(self, name: str, data: np.ndarray, matrix: bool) -> None:
        data = np.ascontiguousarray(data, dtype=np.float32)
        if not matrix or self.qtype is None:
            self.w.add_tensor(name, data)
        elif self.qtype == gguf.GGMLQuantizationType.F16:
            self.w.add_tensor(name, data.astype(np.float16))
        else:
            q = gguf.quants.quantize(data, self.qtype)
            self.w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=self.qtype)

    def linear(self, name: str, n_in: int, n_out: int) -> None:
        # numpy shape (n_out, n_in) == ggml ne {n_in, n_out}
        std = self.scale / np.sqrt(n_in)
        self._add(name, self.rng.standard_normal((n_out, n_in)) * std, matrix=True)

    def embedding(self, name: str, n_embd: int, n_vocab: int, std: float) -> None:
        self._add(name, self.rng.standard_normal((n_vocab, n_embd)) * std, matrix=True)

    def norm(self, name: str, n: int, jitter: float = 0.05) -> None:
        self._add(name, 1.0 + self.rng.standard_normal(n) * jitter, matrix=False)

    def bias(self, name: str, n: int, std: float = 0.1) -> None:
        self._add(name, self.rng.standard_normal(n) * std, matrix=False)


# ---------------------------------------------------------------- writer


def make_tiny_model(
    path: str | os.PathLike,
    arch: str = "llama",
    n_layer: int = 4,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx: int = 2048,
    vocab_size: int | None = None,
    seed: int = 0,
    ftype: str = "f32",
    *,
    head_dim: int | None = None,
    rope_freq_base: float | None = None,
    sliding_window: int = 64,
    swa_pattern: int = 2,
    tie_embeddings: bool = False,
    init_scale: float = 1.0,
    name: str | None = None,
    arch_name: str | None = None,
    extra_kv: dict | None = None,
    kv_lora_rank: int = 32,
    q_lora_rank: int = 32,
    max_alibi_bias: float = 8.0,
) -> Path:
    """Write a random ``arch`` model to ``path`` (parents created) and return it as a Path.

    ``vocab_size`` None -> 388 tokens (4 specials + 256 bytes + 128 merges).
    ``ftype``: "f32", "f16" or "q8_0" (2-D weights only; norms and biases stay f32;
    q8_0 needs n_embd, n_ff and n_head*head_dim to be multiples of 32).
    gemma3 only: ``sliding_window`` tokens for the SWA layers, ``swa_pattern`` N
    makes every N-th layer global (N=2: layers 0,2,.. SWA, 1,3,.. global).
    ``arch_name`` writes the ``arch`` tensor layout under another architecture name (e.g. qwen2's
    layout as ``qwen2vl``); ``extra_kv`` adds metadata, keys without an arch prefix get
    ``<arch_name>.`` in front; values: int (uint32), float, bool, str or a list of ints.
    deepseek2 only: ``kv_lora_rank`` (the cached latent size) and ``q_lora_rank``; head_dim must be a
    multiple of 4 (its second half is the RoPE part). mpt only: ``max_alibi_bias`` (bloom's is fixed 8).
    """
    if arch not in ARCHS + LIMITED_ARCHS:
        raise ValueError(f"unsupported arch {arch!r}; supported: {', '.join(ARCHS + LIMITED_ARCHS)}")
    if ftype not in _FTYPES:
        raise ValueError(f"unsupported ftype {ftype!r}; supported: {', '.join(_FTYPES)}")
    if n_head % n_head_kv:
        raise ValueError("n_head must be a multiple of n_head_kv")
    if head_dim is None:
        if n_embd % n_head:
            raise ValueError("n_embd must be a multiple of n_head (or pass head_dim)")
        head_dim = n_embd // n_head
    if head_dim % 2:
        raise ValueError("head_dim must be even (RoPE)")
    if arch in ("qwen2", "phi3") + _ALIBI_ARCHS and head_dim * n_head != n_embd:
        # llama.cpp's qwen2, phi3, mpt and bloom loaders hard-code wq/wo as n_embd x n_embd
        raise ValueError(f"{arch} requires head_dim * n_head == n_embd")
    if arch == "deepseek2":
        if head_dim % 4:
            raise ValueError("deepseek2 needs head_dim % 4 == 0 (half of it is the even RoPE part)")
        if kv_lora_rank < 1 or q_lora_rank < 1:
            raise ValueError("deepseek2 needs kv_lora_rank >= 1 and q_lora_rank >= 1")
        n_head_kv = 1  # MLA caches one latent "head" shared by all query heads
    n_rope = head_dim // 2 if arch == "deepseek2" else head_dim
    tokens, token_types, merges = build_vocab(vocab_size)
    n_vocab = len(tokens)
    n_q = n_head * head_dim
    n_kv = n_head_kv * head_dim
    if rope_freq_base is None:
        rope_freq_base = 1_000_000.0 if arch in ("qwen2", "gemma3", "qwen3", "mistral3") else 10_000.0

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")

    w = gguf.GGUFWriter(str(tmp), arch_name or arch)
    try:
        for key, val in (extra_kv or {}).items():
            key = key if "." in key and key.split(".")[0] in ("general", "tokenizer") else \
                f"{arch_name or arch}.{key}"
            if isinstance(val, bool):
                w.add_bool(key, val)
            elif isinstance(val, int):
                w.add_uint32(key, val)
            elif isinstance(val, float):
                w.add_float32(key, val)
            elif isinstance(val, str):
                w.add_string(key, val)
            else:
                w.add_array(key, list(val))
        # ---- general
        w.add_type("model")
        # llama.cpp's vocab loader applies Phi-3 token attributes to any model whose general.name
        # contains "phi3"/"phi-3" and then needs "<unk>"/"<|endoftext|>" tokens, which this
        # vocabulary lacks: keep that substring out of the default name
        label = "phi 3" if arch == "phi3" else arch
        w.add_name(name or f"pyasl tiny {label} L{n_layer} E{n_embd} H{n_head}/{n_head_kv} seed{seed}")
        w.add_file_type(int(_FTYPES[ftype][0]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

        # ---- hyper-parameters (keys "<arch>.*")
        w.add_context_length(n_ctx)
        w.add_embedding_length(n_embd)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(n_ff)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
        if arch in _ALIBI_ARCHS:
            w.add_layer_norm_eps(1e-5)
        else:
            w.add_rope_freq_base(rope_freq_base)
            w.add_layer_norm_rms_eps(1e-6 if arch != "llama" else 1e-5)
        w.add_vocab_size(n_vocab)
        if arch == "mpt":
            w.add_max_alibi_bias(float(max_alibi_bias))
        if arch in _ALIBI_ARCHS:
            pass  # no RoPE; bloom's ALiBi is hard-coded in llama.cpp
        elif arch == "deepseek2":
            # MLA as current converters write it: the cache row is [latent (kv_lora_rank) | rope key]
            w.add_rope_dimension_count(n_rope)
            w.add_key_length(kv_lora_rank + n_rope)
            w.add_value_length(kv_lora_rank)
            w.add_key_length_mla(head_dim)
            w.add_value_length_mla(head_dim)
            w.add_q_lora_rank(q_lora_rank)
            w.add_kv_lora_rank(kv_lora_rank)
            w.add_leading_dense_block_count(n_layer)  # every layer dense: no experts
            w.add_expert_feed_forward_length(n_ff)    # required keys, unused without MoE layers
            w.add_expert_shared_count(0)
        elif arch == "gemma3":
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
            w.add_sliding_window(sliding_window)
            w.add_sliding_window_pattern(int(swa_pattern))
            w.add_rope_freq_base_swa(10_000.0)
        else:
            w.add_rope_dimension_count(head_dim)
            if head_dim * n_head != n_embd:
                w.add_key_length(head_dim)
                w.add_value_length(head_dim)

        # ---- tokenizer
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(token_types)
        w.add_token_merges(merges)
        w.add_bos_token_id(BOS_ID)
        w.add_eos_token_id(EOS_ID)
        w.add_eot_token_id(EOT_ID)
        w.add_pad_token_id(EOS_ID)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)

        # ---- tensors
        t = _Tensors(w, seed, ftype, init_scale)
        # gemma3 multiplies the embeddings by sqrt(n_embd) in the graph
        embd_std = 1.0 / np.sqrt(n_embd) if arch == "gemma3" else 1.0
        t.embedding("token_embd.weight", n_embd, n_vocab, std=embd_std)
        if arch == "bloom":
            t.norm("token_embd_norm.weight", n_embd)
            t.bias("token_embd_norm.bias", n_embd)
        t.norm("output_norm.weight", n_embd)
        if arch == "bloom":
            t.bias("output_norm.bias", n_embd)
        if not tie_embeddings:
            t.linear("output.weight", n_embd, n_vocab)
        for i in range(n_layer):
            p = f"blk.{i}."
            if arch in _ALIBI_ARCHS:
                _alibi_layer(t, p, arch == "bloom", n_embd, n_kv, n_ff)
                continue
            t.norm(p + "attn_norm.weight", n_embd)
            if arch == "deepseek2":
                _mla_attention(t, p, n_embd, n_head, head_dim, n_rope, q_lora_rank, kv_lora_rank)
                t.norm(p + "ffn_norm.weight", n_embd)
                t.linear(p + "ffn_gate.weight", n_embd, n_ff)
                t.linear(p + "ffn_up.weight", n_embd, n_ff)
                t.linear(p + "ffn_down.weight", n_ff, n_embd)
                continue
            if arch == "phi3":
                # one matrix whose output rows are q, then k, then v
                t.linear(p + "attn_qkv.weight", n_embd, n_q + 2 * n_kv)
            else:
                t.linear(p + "attn_q.weight", n_embd, n_q)
                t.linear(p + "attn_k.weight", n_embd, n_kv)
                t.linear(p + "attn_v.weight", n_embd, n_kv)
            if arch == "qwen2":
                t.bias(p + "attn_q.bias", n_q)
                t.bias(p + "attn_k.bias", n_kv)
                t.bias(p + "attn_v.bias", n_kv)
            if arch in ("gemma3", "qwen3"):
                t.norm(p + "attn_q_norm.weight", head_dim)
                t.norm(p + "attn_k_norm.weight", head_dim)
            t.linear(p + "attn_output.weight", n_q, n_embd)
            if arch == "gemma3":
                t.norm(p + "post_attention_norm.weight", n_embd)
            t.norm(p + "ffn_norm.weight", n_embd)
            if arch == "phi3":
                # SwiGLU on one matrix: the first n_ff rows are the gate, the next n_ff the up
                t.linear(p + "ffn_up.weight", n_embd, 2 * n_ff)
            else:
                t.linear(p + "ffn_gate.weight", n_embd, n_ff)
                t.linear(p + "ffn_up.weight", n_embd, n_ff)
            t.linear(p + "ffn_down.weight", n_ff, n_embd)
            if arch == "gemma3":
                t.norm(p + "post_ffw_norm.weight", n_embd)

        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    os.replace(tmp, path)
    return path


def _mla_attention(t: _Tensors, p: str, n_embd: int, n_head: int, head_dim: int, n_rope: int,
                   q_lora_rank: int, kv_lora_rank: int) -> None:
    """deepseek2 MLA attention tensors of one layer (llama.cpp's absorbed form, split k_b / v_b)."""
    n_nope = head_dim - n_rope
    t.linear(p + "attn_q_a.weight", n_embd, q_lora_rank)
    t.norm(p + "attn_q_a_norm.weight", q_lora_rank)
    t.linear(p + "attn_q_b.weight", q_lora_rank, n_head * head_dim)
    # [latent | rope key] from the hidden state
    t.linear(p + "attn_kv_a_mqa.weight", n_embd, kv_lora_rank + n_rope)
    t.norm(p + "attn_kv_a_norm.weight", kv_lora_rank)
    # per head: nope query -> latent (ggml ne {n_nope, kv_lora_rank, n_head}),
    # latent -> value (ggml ne {kv_lora_rank, head_dim, n_head})
    k_b = t.rng.standard_normal((n_head, kv_lora_rank, n_nope)) * (t.scale / np.sqrt(n_nope))
    t._add(p + "attn_k_b.weight", k_b, matrix=True)
    v_b = t.rng.standard_normal((n_head, head_dim, kv_lora_rank)) * (t.scale / np.sqrt(kv_lora_rank))
    t._add(p + "attn_v_b.weight", v_b, matrix=True)
    t.linear(p + "attn_output.weight", n_head * head_dim, n_embd)


def _alibi_layer(t: _Tensors, p: str, biases: bool, n_embd: int, n_kv: int, n_ff: int) -> None:
    """One mpt (biases=False) or bloom (biases=True) block: LayerNorm, fused qkv, output, LayerNorm, GELU FFN."""
    def norm(name: str) -> None:
        t.norm(p + name + ".weight", n_embd)
        if biases:
            t.bias(p + name + ".bias", n_embd)

    def linear(name: str, n_in: int, n_out: int) -> None:
        t.linear(p + name + ".weight", n_in, n_out)
        if biases:
            t.bias(p + name + ".bias", n_out)

    norm("attn_norm")
    linear("attn_qkv", n_embd, n_embd + 2 * n_kv)
    linear("attn_output", n_embd, n_embd)
    norm("ffn_norm")
    linear("ffn_up", n_embd, n_ff)
    linear("ffn_down", n_ff, n_embd)


# ---------------------------------------------------------------- per-process cache

_CACHE: dict[str, Path] = {}


def tiny_model_path(arch: str = "llama", **kw) -> Path:
    """Path of a tiny model with these arguments, written once per process.

    Files live in ``tempfile.gettempdir()/pyasl-tiny/<arch>-<hash>.gguf``; the
    write is atomic, so parallel test processes may share the directory.
    """
    key_args = {"arch": arch, **kw}
    key = hashlib.sha256(json.dumps(key_args, sort_keys=True, default=str).encode()).hexdigest()[:16]
    hit = _CACHE.get(key)
    if hit is not None and hit.is_file():
        return hit
    path = Path(tempfile.gettempdir()) / "pyasl-tiny" / f"{arch}-{key}.gguf"
    make_tiny_model(path, arch=arch, **kw)
    _CACHE[key] = path
    return path


DENSE_N_LAYER = 6  # the depth of conftest's tiny_dense models
