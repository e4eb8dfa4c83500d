"""`pyasl serve`: llama-cpp-python's OpenAI-compatible server over pyasl.Llama, driven by a real HTTP
client on a loopback port (completions, chat completions streamed and not, models); every request
with a long prompt is pruned by the policy (the server logs one line per pruned request)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")

from test_llama_dropin import PROMPT, _doc  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from pyasl.models import fetch_model

    fetch_model("smollm2")
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    with open(log, "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "pyasl", "serve", "smollm2", "--policy", "asl", "--budget", "96",
                              "--window", "16", "--ctx", "1024", "--port", str(port), "--alias", "smol"],
                             stdout=subprocess.DEVNULL, stderr=err)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            assert p.poll() is None, log.read_text()
            try:
                if httpx.get(base + "/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() - t0 < 180, "server did not come up: " + log.read_text()
            time.sleep(0.5)
        yield base, log
    finally:
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.mark.real
def test_openai_routes_over_http(server):
    base, log = server
    with httpx.Client(base_url=base, timeout=300) as c:
        models = c.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["smol"]

        r = c.post("/v1/completions", json={"model": "smol", "prompt": PROMPT, "max_tokens": 10, "temperature": 0})
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["object"] == "text_completion" and d["choices"][0]["text"].strip()
        assert d["usage"]["prompt_tokens"] > 96

        msgs = [{"role": "user", "content": _doc() + "\n\nWhat is the secret password of the archive?"}]
        body = {"model": "smol", "messages": msgs, "max_tokens": 10, "temperature": 0}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        content = r.json()["choices"][0]["message"]["content"]
        assert content.strip()

        parts, done = [], False
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            assert s.status_code == 200
            assert s.headers["content-type"].startswith("text/event-stream")
            for line in s.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                assert chunk["object"] == "chat.completion.chunk"
                parts.append(chunk["choices"][0]["delta"].get("content") or "")
        assert done and "".join(parts) == content

        bad = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": "many"})
        assert bad.status_code >= 400 and "max_tokens" in bad.text  # refused, server still up
        assert c.get("/v1/models").status_code == 200
    pruned = [l for l in log.read_text().splitlines() if l.startswith("pyasl: request prompt")]
    assert len(pruned) >= 3 and all("kept 96 cells (asl" in l for l in pruned), log.read_text()
