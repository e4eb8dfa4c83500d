"""Bad input at the newer entry points: pyasl.load_model / Session (and Session.load), pyasl.Llama,
the OpenAI-style server app (pyasl.server.create_app, driven in-process by starlette's TestClient:
no port is bound) and the `pyasl chat` / `pyasl serve` commands (click's CliRunner; uvicorn.run is
replaced, so `serve` never listens). Every case must end in a clear exception, an HTTP 4xx with an
OpenAI-style error object, or a CLI message with a non-zero exit: never a crash, a hang, a bare
traceback or a silently wrong answer. Tiny random models only (docs/RELIABILITY.md lists the rows).
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner

import pyasl
from pyasl import session as S
from pyasl.engine import ModelLoadError
from pyasl.models import ModelError
from tinymodels import tiny_model_path

TINY = tiny_model_path("llama", n_layer=4)
DOC = "The cache holds the keys and the values of every token the model has seen so far. " * 12


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Model files that are not loadable, by what is wrong with them."""
    d = tmp_path_factory.mktemp("bad")
    data = TINY.read_bytes()
    out = {"missing": d / "missing.gguf", "directory": d, "unknown name": "no-such-model"}
    for name, content in (("empty", b""), ("text", b"hello, I am not a model\n" * 4),
                          ("truncated header", data[:20]), ("truncated tensors", data[: len(data) // 2])):
        out[name] = d / f"{name.replace(' ', '-')}.gguf"
        out[name].write_bytes(content)
    bc0 = d / "block-count-0.gguf"  # llama.cpp aborts the process on it (GGML_ASSERT)
    shutil.copy(TINY, bc0)
    r = gguf.GGUFReader(bc0, "r+")
    f = r.fields["llama.block_count"]
    f.parts[f.data[0]][0] = 0
    del r
    out["block_count 0"] = bc0
    return out


MESSAGES = {"missing": "not found|neither an existing", "directory": "is a directory", "empty": "is empty|not a GGUF",
            "text": "not a GGUF", "truncated header": "truncated", "truncated tensors": "truncated",
            "unknown name": "neither an existing GGUF file nor a known model name|not found",
            "block_count 0": "block_count"}


@pytest.fixture(scope="module")
def model():
    m = pyasl.load_model(TINY)
    yield m
    m.close()


# ---------------------------------------------------------------- model files


@pytest.mark.parametrize("what", list(MESSAGES))
def test_load_model_refuses_bad_files(files, what):
    with pytest.raises((ModelLoadError, ModelError), match=MESSAGES[what]):
        pyasl.load_model(files[what])


@pytest.mark.parametrize("what", [w for w in MESSAGES if w != "block_count 0"])
def test_llama_refuses_bad_files_before_llama_cpp(files, what):
    from pyasl.apps.llama import LlamaModelError

    with pytest.raises(LlamaModelError, match=MESSAGES[what]) as e:
        pyasl.Llama(str(files[what]), verbose=False)
    assert isinstance(e.value, ValueError) and isinstance(e.value, ModelLoadError)  # both callers' types


def test_llama_refuses_a_file_llama_cpp_aborts_on(files):
    # in a child: before the pre-check, llama.cpp's GGML_ASSERT killed the process (SIGABRT)
    code = ("import sys, pyasl\ntry:\n    pyasl.Llama(sys.argv[1], verbose=False)\nexcept ValueError as e:\n"
            "    print('refused:', e)\n")
    p = subprocess.run([sys.executable, "-c", code, str(files["block_count 0"])], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "refused:" in p.stdout and "block_count" in p.stdout


def test_create_app_refuses_bad_files(files):
    from pyasl.apps.server import create_app

    for what in ("missing", "text", "truncated tensors"):
        with pytest.raises(ValueError, match=MESSAGES[what]):
            create_app(str(files[what]), pyasl.ASL(budget=64, window=8), n_ctx=256)


# ---------------------------------------------------------------- Session


def test_session_arguments(model):
    for kw, msg in ((dict(policy="nope"), "unknown policy"), (dict(policy=3), "must be a pyasl Policy"),
                    (dict(policy=pyasl.FastKV(layer=9, budget=64)), "outside the model's layers"),
                    (dict(n_ctx=8), "n_ctx must be >= 16"), (dict(n_ctx=100.5), "n_ctx must be an integer"),
                    (dict(max_tokens="5"), "max_tokens must be an integer"),
                    (dict(policy=pyasl.ASL(budget=512), n_ctx=256), "raise n_ctx to at least"),
                    (dict(system="caf\udce9"), "system message is not valid UTF-8"),
                    (dict(system=b"hi"), "system message must be a str")):
        with pytest.raises(ValueError, match=msg):
            pyasl.Session(model, **kw)
    for kw, msg in ((dict(budget=16, window=32), "larger than the window"), (dict(tau=0), "0 < tau <= 1"),
                    (dict(tau=1.5), "0 < tau <= 1"), (dict(tau=float("nan")), "0 < tau <= 1"),
                    (dict(window=0), "window must be >= 1"), (dict(budget=99.5), "budget must be an integer")):
        with pytest.raises(ValueError, match=msg):
            pyasl.ASL(**kw)


def test_session_prompts_and_documents(model):
    s = pyasl.Session(model, policy=pyasl.ASL(budget=64, window=8), n_ctx=256, max_tokens=6)
    for prompt, msg in (("", "empty"), ("  \n", "empty"), (None, "empty"), (b"hi", "must be a str"),
                        ("caf\udce9", "not valid UTF-8")):
        with pytest.raises(ValueError, match=msg):
            s.ask(prompt)
    for kw, msg in ((dict(temperature=-1), "temperature"), (dict(temperature=float("nan")), "temperature"),
                    (dict(temperature=0.5, top_p=0), "top_p"), (dict(max_tokens=0), "max_tokens"),
                    (dict(stop=[""]), "non-empty strings")):
        with pytest.raises(ValueError, match=msg):
            s.ask("hello", **kw)
    for docs, msg in (([""], "is empty"), ([b"abc"], "must be a str"), ("abc", "not one str"),
                      ([("a.txt", "x \udcff y")], "a.txt is not valid UTF-8")):
        with pytest.raises(ValueError, match=msg):
            s.prefill(documents=docs)
    assert s.ask("hello")  # none of the refusals above changed the session
    assert [m["role"] for m in s.messages] == ["user", "assistant"]


def test_session_stop_string_is_one_string(model):
    def answer(**kw):
        with pyasl.Session(model, policy="full", n_ctx=128, max_tokens=10) as s:
            return s.ask("hello there", **kw)

    full = answer()
    c = next(ch for ch in full if ch.strip())
    assert answer(stop=c + "\x01") == full  # used to stop at c: a str was split into one-character stops


def test_session_long_input(model, tmp_path):
    long = "word and more " * 200
    with pyasl.Session(model, policy="full", n_ctx=128, max_tokens=8) as s:
        with pytest.raises(S.ContextFullError, match="policy full does not prune"):
            s.ask(long)
    with pyasl.Session(model, policy="full", n_ctx=128, max_tokens=8) as s:
        with pytest.raises(S.ContextFullError, match="must fit into the context"):
            s.prefill(documents=[long])
    with pyasl.Session(model, policy=pyasl.ASL(budget=64, window=8), n_ctx=256, max_tokens=8, mode="once") as s:
        s.ask(long)  # a turn longer than the context: pruned with the turn as the observation window
        assert s.n_cells() <= 256 and s.stats()["reprunes"] >= 1
    small = pyasl.load_model(tiny_model_path("llama", n_layer=2, n_ctx=128))
    with pyasl.Session(small, policy=pyasl.ASL(budget=32, window=8), n_ctx=128, max_tokens=8) as s:
        with pytest.raises(ValueError, match="more than the model's training context 128"):
            s.prefill(documents=[long])
    small.close()


def test_session_nothing_to_prune(model):
    # budget >= the documents, and a window longer than them: a plain prefill, every token kept
    for pol in (pyasl.ASL(budget=200, window=8), pyasl.SnapKV(budget=200, window=150)):
        with pyasl.Session(model, policy=pol, n_ctx=512, max_tokens=8) as s:
            st = s.prefill(documents=["a short document"])
            assert st["document_kept"] == st["document_tokens"] == st["kept_tokens"] and st["prunings"] == 0


def _damage(path: Path, out: Path, head=None, counts=None, state=None, raw_head: bytes = None) -> Path:
    raw = path.read_bytes()
    nh, ns = struct.unpack("<QQ", raw[8:24])
    h, st = raw[24: 24 + nh], raw[24 + nh:]
    if head is not None:
        d = json.loads(h)
        head(d)
        h = json.dumps(d).encode()
    if raw_head is not None:
        h = raw_head
    if state is not None:
        st = state(st)
    c = counts or (len(h), ns)
    out.write_bytes(raw[:8] + struct.pack("<QQ", *c) + h + st)
    return out


def test_session_load_refuses_damaged_files(model, tmp_path):
    with pyasl.Session(model, policy=pyasl.ASL(budget=64, window=8), n_ctx=256, max_tokens=6) as s:
        s.prefill(documents=[DOC])
        s.ask("what is held?")
        good = tmp_path / "good.pyasl"
        s.save(good)
    raw = good.read_bytes()

    def flip(b):
        b = bytearray(b)
        for i in range(16, 64):
            b[i] ^= 0xFF
        return bytes(b)

    (tmp_path / "half.pyasl").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "short.pyasl").write_bytes(raw[:12])
    cases = {
        tmp_path / "nope.pyasl": "not found",
        TINY: "not a pyasl session file",
        tmp_path / "half.pyasl": "truncated",
        tmp_path / "short.pyasl": "damaged",
        _damage(good, tmp_path / "huge.pyasl", counts=(1 << 62, 1 << 62)): "truncated",  # used to be MemoryError
        _damage(good, tmp_path / "utf.pyasl", raw_head=b"\xff{}"): "damaged",
        _damage(good, tmp_path / "list.pyasl", raw_head=b"[1, 2]"): "not a JSON object",  # AttributeError
        _damage(good, tmp_path / "nokey.pyasl", head=lambda d: d.pop("messages")): "damaged.*messages",  # KeyError
        _damage(good, tmp_path / "noctx.pyasl", head=lambda d: d.pop("n_ctx")): "damaged.*n_ctx",
        _damage(good, tmp_path / "negctx.pyasl", head=lambda d: d.update(n_ctx=-5)): "damaged.*n_ctx",
        _damage(good, tmp_path / "pol.pyasl", head=lambda d: d.update(policy={"name": "bogus"})): "unknown policy",
        _damage(good, tmp_path / "model.pyasl", head=lambda d: d.update(model="x")): "damaged",
        # n_past beyond the cache: the next turn used to fail in llama_decode ("batch ... rejected")
        _damage(good, tmp_path / "npast.pyasl", head=lambda d: d.update(n_past=10 ** 12)): "does not follow",
        _damage(good, tmp_path / "npast2.pyasl", head=lambda d: d.update(n_past=3)): "does not follow",
        _damage(good, tmp_path / "state.pyasl", state=flip): "does not load",
    }
    for path, msg in cases.items():
        with pytest.raises(S.SessionFileError, match=msg):
            S.Session.load(model, path)
    other = pyasl.load_model(tiny_model_path("llama", n_layer=4, seed=1))  # same shapes, other weights
    with pytest.raises(S.SessionFileError, match="saved with another model"):
        S.Session.load(other, good)
    other.close()
    with S.Session.load(model, good) as s2:  # the undamaged file still loads and answers
        assert s2.ask("and then?") is not None


# ---------------------------------------------------------------- pyasl.Llama


def test_llama_arguments():
    for kw, msg in ((dict(kv_policy="nope"), "unknown policy"), (dict(kv_policy=3), "must be a pyasl Policy"),
                    (dict(kv_policy=pyasl.FastKV(layer=9, budget=64)), "outside the model's layers")):
        with pytest.raises(ValueError, match=msg):
            pyasl.Llama(str(TINY), n_ctx=256, verbose=False, **kw)
    with pytest.raises(ValueError, match="sliding-window"):
        pyasl.Llama(str(tiny_model_path("gemma3", n_layer=4)), n_ctx=256, verbose=False,
                    kv_policy=pyasl.ASL(budget=64, window=8))
    with pytest.warns(UserWarning, match="none will be pruned"):  # prompts held to n_ctx
        pyasl.Llama(str(TINY), n_ctx=256, verbose=False, kv_policy=pyasl.ASL(budget=512), max_prompt_tokens=256).close()
    with pytest.raises(ValueError, match="does not leave room for an answer in the decode context"):
        pyasl.Llama(str(TINY), n_ctx=256, verbose=False, kv_policy=pyasl.ASL(budget=512))
    with pytest.raises(ValueError, match="max_prompt_tokens needs a pruning kv_policy"):
        pyasl.Llama(str(TINY), n_ctx=256, verbose=False, max_prompt_tokens=4096)
    with pytest.raises(ValueError, match="kv_mode must be one of"):
        pyasl.Llama(str(TINY), n_ctx=256, verbose=False, kv_policy="asl", kv_mode="sometimes")


def test_llama_requests():
    llm = pyasl.Llama(str(TINY), n_ctx=256, verbose=False, kv_policy=pyasl.ASL(budget=32, window=8))
    try:
        # prompts up to the model's training context (2048), whatever the decode context (256 cells)
        with pytest.raises(ValueError, match="exceed context window of 2048"):
            llm.create_completion("word " * 2100, max_tokens=4)
        with pytest.raises(ValueError, match="exceed context window of 2048"):
            llm.create_chat_completion(messages=[{"role": "user", "content": "word " * 2100}], max_tokens=4)
        r = llm.create_completion("word " * 400, max_tokens=300, temperature=0.9, seed=3)
        assert llm.last_prune["n_prompt"] == r["usage"]["prompt_tokens"] > 256 and llm.kv_cells() <= 256
        assert r["usage"]["completion_tokens"] < 300 or r["choices"][0]["finish_reason"] == "length"
        # used to say "batch at positions 0..50 rejected (it must follow the last cached position)"
        for toks in ([5, 99999, 3] * 20, [5, -3, 3] * 20):
            with pytest.raises(ValueError, match=r"token ids in 0\.\.\d+"):
                llm.create_completion(toks, max_tokens=4)
        r = llm.create_completion("word and more " * 30, max_tokens=4, temperature=0)  # still works, pruned
        assert llm.last_prune["n_kept"] == 32 and r["usage"]["prompt_tokens"] > 32
        # nothing to prune (prompt within the budget): exactly llama-cpp-python's answer, no last_prune
        llm.last_prune = None
        short = llm.create_completion("hello there", max_tokens=6, temperature=0)["choices"][0]["text"]
        assert llm.last_prune is None
    finally:
        llm.close()
    plain = pyasl.Llama(str(TINY), n_ctx=256, verbose=False)
    try:
        assert plain.create_completion("hello there", max_tokens=6, temperature=0)["choices"][0]["text"] == short
    finally:
        plain.close()


def test_llama_n_ctx_rounded_up_by_llama_cpp():
    # llama.cpp rounds n_ctx=8 up to 256 cells, llama-cpp-python keeps an 8-slot token array:
    # a 100-token prompt passed its check and failed with "could not broadcast input array"
    llm = pyasl.Llama(str(TINY), n_ctx=8, verbose=False, kv_policy=pyasl.ASL(budget=32, window=8), max_prompt_tokens=8)
    try:
        with pytest.raises(ValueError, match=r"Requested tokens \(\d+\) exceed context window of 8"):
            llm.create_completion("word and more " * 30, max_tokens=4)
    finally:
        llm.close()
    llm = pyasl.Llama(str(TINY), n_ctx=8, verbose=False, kv_policy=pyasl.ASL(budget=32, window=8))
    try:  # the decode context (256 cells) holds the budget and the answer; the prompt may be longer
        assert llm.create_completion("word and more " * 30, max_tokens=4)["usage"]["prompt_tokens"] > 32
    finally:
        llm.close()


# ---------------------------------------------------------------- the server app (no port bound)


@pytest.fixture(scope="module")
def client():
    pytest.importorskip("fastapi")
    pytest.importorskip("sse_starlette")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    from pyasl.apps.server import create_app

    app = create_app(str(TINY), pyasl.ASL(budget=32, window=8), n_ctx=256, alias="tiny")
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    app.state.llama.close()


def _error(r, status=400) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and "File \"" not in err["message"]
    return err


def test_server_bad_requests(client):
    for raw, msg in ((b"{not json", "not valid UTF-8 JSON"), (b'{"prompt": "caf\xe9"}', "not valid UTF-8 JSON"),
                     (b"", "not valid UTF-8 JSON")):
        r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert msg in _error(r)["message"]  # was a plain-text 500 "Internal Server Error"
    for path, body, param in (("/v1/completions", {"prompt": 5}, "prompt"),
                              ("/v1/completions", {"prompt": "hi", "max_tokens": -5}, "max_tokens"),
                              ("/v1/completions", {"prompt": "hi", "max_tokens": "x"}, "max_tokens"),
                              ("/v1/completions", {"prompt": "hi", "top_p": 5}, "top_p"),
                              ("/v1/completions", {"prompt": [1, 2]}, "prompt"),
                              ("/v1/chat/completions", {"messages": "hi"}, "messages"),
                              ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
                              ("/extras/tokenize", {"input": 5}, "input"),
                              ("/v1/completions", [1, 2], None)):
        err = _error(client.post(path, json=body))  # were 500s with a Python source location
        assert err["type"] == "invalid_request_error" and err["param"] == param
        assert err["message"].startswith("invalid request:")


def test_server_prompt_longer_than_the_context(client):
    """Prompts longer than the decode context (256 cells) are pruned into it; longer than the model's
    training context (2048) they are refused."""
    r = client.post("/v1/completions", json={"prompt": "word and more " * 100, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 256
    long = "word " * 2100
    err = _error(client.post("/v1/completions", json={"prompt": long, "max_tokens": 3}))
    assert err["code"] == "context_length_exceeded"
    err = _error(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": long}],
                                                             "max_tokens": 3}))
    assert err["code"] == "context_length_exceeded"
    for path, body in (("/v1/completions", {"prompt": long}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": long}]})):
        # streamed: the stream used to end with no data, no [DONE] and no error
        r = client.post(path, json={**body, "max_tokens": 3, "stream": True})
        assert r.status_code == 200
        events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert events and "[DONE]" not in events
        err = json.loads(events[-1])["error"]
        assert err["code"] == "context_length_exceeded" and "exceed context window of 2048" in err["message"]


def test_server_still_answers(client):
    r = client.post("/v1/completions", json={"prompt": "word and more " * 30, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 32
    assert client.app.state.llama.last_prune["n_kept"] == 32
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "word and more " * 30}],
                                                  "max_tokens": 3, "stream": True})
    events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]" and "error" not in r.text
    assert client.post("/extras/tokenize", json={"input": "hi"}).json()["tokens"]
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "model": "gpt-4"})
    assert r.status_code == 200 and r.json()["model"] == "gpt-4"  # llama-cpp-python: the one model answers


# ---------------------------------------------------------------- pyasl chat / pyasl serve


@pytest.fixture
def cli(monkeypatch):
    import uvicorn

    import pyasl.apps.chat

    def no_listen(app, **kw):
        print(f"(would listen on {kw.get('host')}:{kw.get('port')})", file=sys.stderr)

    monkeypatch.setattr(uvicorn, "run", no_listen)  # `serve` must never bind a port here
    monkeypatch.setattr(pyasl.apps.chat, "_setup_readline", lambda: None)  # no history file
    runner = CliRunner()

    def run(*args, input="/quit\n"):
        from pyasl.apps.cli import main

        r = runner.invoke(main, [str(a) for a in args], input=input)
        assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)  # no traceback
        return r
    return run


def test_cli_bad_models(cli, files):
    for cmd in ("chat", "serve"):
        for what in ("missing", "unknown name", "text", "truncated tensors", "block_count 0"):
            r = cli(cmd, files[what])
            assert r.exit_code == 1 and "Error:" in r.output, (cmd, what, r.output)
            assert __import__("re").search(MESSAGES[what], r.output), (cmd, what, r.output)


def test_cli_chat_refusals(cli, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 5)
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC * 3)
    damaged = _damage_file(tmp_path)
    gem = tiny_model_path("gemma3", n_layer=4)
    for args, msg in (
            (["--doc", bad], "is not valid UTF-8 (byte 3"),
            (["--doc", tmp_path / "nope.txt"], "document not found"),
            (["--doc", empty], "is empty"),
            (["--system", "caf\udce9"], "--system is not valid UTF-8"),
            (["--budget", "16", "--window", "32"], "larger than the window"),
            (["--tau", "0"], "0<x<=1"), (["--tau", "1.5"], "0<x<=1"),
            (["--policy", "snapkv", "--layer", "3"], "does not take --layer"),
            (["--policy", "fastkv", "--layer", "9", "--budget", "64", "--ctx", "512"], "outside the model's layers"),
            (["--policy", "bogus"], "'bogus' is not one of"),
            (["--ctx", "64"], "raise n_ctx to at least"), (["--ctx", "8"], "x>=16"),
            (["--policy", "full", "--ctx", "128", "--max-tokens", "8", "--doc", doc], "must fit into the context"),
            (["--load", damaged], "damaged pyasl session file"),
            (["--load", TINY], "not a pyasl session file"),
            (["--load", damaged, "--doc", doc], "cannot take --doc"),
            (["--mode", "once", "--full-copy", "disk"], "mode once keeps none"),
            (["--full-copy", "cloud"], "'cloud' is not one of")):
        r = cli("chat", TINY, *args)
        assert r.exit_code != 0 and msg in r.output, (args, r.output)
    r = cli("chat", gem)
    assert r.exit_code == 1 and "sliding-window" in r.output


def _damage_file(tmp_path: Path) -> Path:
    m = pyasl.load_model(TINY)
    with pyasl.Session(m, policy="full", n_ctx=128, max_tokens=4) as s:
        s.ask("hi")
        s.save(tmp_path / "s.pyasl")
    m.close()
    return _damage(tmp_path / "s.pyasl", tmp_path / "damaged.pyasl", head=lambda d: d.pop("n_ctx"))


def test_cli_chat_turns_with_bad_input_keep_the_session(cli):
    lines = ["/policy bogus", "/policy fastkv x", "/load /nonexistent/x.pyasl", "word " * 600, "hello",
             "/save /nonexistent/dir/x.pyasl", "/quit"]
    r = cli("chat", TINY, "--budget", "64", "--window", "8", "--ctx", "256", "--max-tokens", "4", "--mode", "once",
            input="\n".join(lines) + "\n")
    assert r.exit_code == 0, r.output  # an interactive session reports and goes on; /quit ends it
    for msg in ("error: unknown policy 'bogus'",
                "error: /policy fastkv: the layer must be a number", "error: session file not found",
                "error: [Errno 2] No such file or directory",
                "[context full: pruned to"):
        assert msg in r.output, (msg, r.output)


RANKED = "(ranked by a request to repeat them, the kept tokens prefilled again)"


@pytest.mark.parametrize("args, said", [
    (["--mode", "reconstruct"], [f"kept 64 cells with asl {RANKED}", f"mode reconstruct: the documents were pruned once {RANKED}"]),
    (["--full-copy", "disk"], ["kept whole on disk between questions",
                               "is kept on disk between questions, every question selects again"]),
    (["--reprefill"], ["every question selects again and prefills the kept tokens again"]),
    (["--no-reprefill"], ["every question selects again\n"]),
    ([], ["keeping the gathered answer where the full KV and its own context find it likelier (so far "]),
    (["--choose-answer"], ["keeping the gathered answer where the full KV and its own context find it likelier (so far "]),
    (["--choose-answer", "--no-reprefill"], ["Error: --choose-answer answers both with and without"]),
    (["--choose-answer", "--reprefill"], ["Error: --choose-answer answers both with and without the second prefill; "
                                          "it cannot take --reprefill"]),
])
def test_cli_chat_says_what_it_holds(cli, tmp_path, args, said):
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"Record {i}: courier {i} carried parcel {1000 + 7 * i}." for i in range(60)))
    r = cli("chat", TINY, "--doc", str(doc), "--budget", "64", "--window", "8", "--ctx", "256", "--max-tokens", "4",
            *args, input="which parcel?\n/stats\n/quit\n")
    assert r.exit_code == (1 if said[0].startswith("Error") else 0), r.output
    for phrase in said:
        assert phrase in r.output, (phrase, r.output)


def test_cli_chat_line_not_utf8(cli):
    # a strict UTF-8 stdin (a non-UTF-8 terminal): input() raised UnicodeDecodeError, which ended the chat
    r = cli("chat", TINY, "--budget", "64", "--window", "8", "--ctx", "256", "--max-tokens", "4",
            input=b"caf\xe9 au lait\n")
    assert r.exit_code == 0 and "error: the line is not valid UTF-8" in r.output, r.output
    # a lone surrogate (surrogateescape stdin, the C locale): the Session names it
    with pyasl.Session(pyasl.load_model(TINY), policy="full", n_ctx=128, max_tokens=4) as s:
        from pyasl.apps.chat import Chat

        lines = iter(["caf\udce9 au lait", "/quit"])
        err = __import__("io").StringIO()
        assert Chat(s, out=__import__("io").StringIO(), err=err, read_line=lambda _: next(lines)).loop() == 0
        assert "error: the prompt is not valid UTF-8 text (character 3" in err.getvalue()


def test_cli_chat_exit_code_in_a_child(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9\n")
    p = subprocess.run([sys.executable, "-m", "pyasl", "chat", str(TINY), "--doc", str(bad)],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 1 and "not valid UTF-8" in p.stderr and "Traceback" not in p.stderr


def test_cli_serve_refusals_and_note(cli):
    for args, msg in ((["--budget", "16", "--window", "32"], "larger than the window"),
                      (["--policy", "snapkv", "--layer", "3"], "does not take --layer"),
                      (["--policy", "fastkv", "--layer", "9", "--budget", "64"], "outside the model's layers"),
                      (["--tau", "0"], "0<x<=1"), (["--ctx", "8"], "x>=16"), (["--port", "70000"], "0<=x<=65535"),
                      (["--parked-copies", "-1"], "x>=0"),
                      (["--parked-copies", "2", "--kv-mode", "once"], "needs a pruning kv_policy and kv_mode"),
                      (["--parked-copies", "2", "--policy", "full"], "needs a pruning kv_policy"),
                      (["--choose-answer", "--no-reprefill"], "it cannot take --no-reprefill"),
                      (["--choose-answer", "--kv-mode", "once"], "kv_mode once keeps none")):
        r = cli("serve", TINY, *args)
        assert r.exit_code != 0 and msg in r.output, (args, r.output)
    r = cli("serve", tiny_model_path("gemma3", n_layer=4), "--ctx", "256", "--budget", "64")
    assert r.exit_code == 1 and "sliding-window" in r.output
    r = cli("serve", TINY, "--ctx", "256", "--budget", "512")  # no room for an answer after pruning
    assert r.exit_code == 1 and "does not leave room for an answer" in r.output
    r = cli("serve", TINY, "--ctx", "256", "--budget", "512", "--max-prompt-tokens", "256")  # no prompt can exceed it
    assert r.exit_code == 0 and "note: pyasl.Llama: budget 512 >= n_ctx 256" in r.output
    assert "(would listen on 127.0.0.1:8000)" in r.output
    r = cli("serve", TINY, "--ctx", "256", "--budget", "64", "--choose-answer")
    assert r.exit_code == 0 and "(would listen on 127.0.0.1:8000)" in r.output, r.output
