"""The CLI contract: `pyasl generate/inspect/models` outputs and clear errors on bad input.

Commands run in a child process (`python -m pyasl.cli`), as a user runs them: a native crash would
show as a signal exit code, never take the test run down.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tinymodels import tiny_model_path

KEYS = {"text", "policy", "n_prompt", "n_generated", "selected_layer", "n_kept", "kv_bytes_full", "kv_bytes",
        "prefill_s", "decode_tokens_per_s"}


def run(*args, timeout=300):
    p = subprocess.run([sys.executable, "-m", "pyasl", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode >= 0, f"killed by signal {-p.returncode}: {p.stderr}"
    return p


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_path("llama", n_layer=6)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompt") / "p.txt"
    p.write_text("The quick brown fox jumps over the lazy dog. " * 60 + "What jumps?")
    return p


@pytest.mark.parametrize("policy", ["full", "snapkv", "asl"])
def test_generate_json_tiny(tiny, prompt_file, policy):
    p = run("generate", tiny, "--prompt-file", prompt_file, "--policy", policy, "--budget", 64, "--window", 8,
            "--max-tokens", 8, "--json", "--raw")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert KEYS <= set(d)
    assert d["policy"] == policy
    assert d["n_generated"] >= 1
    if policy == "full":
        assert d["n_kept"] == d["n_prompt"] and d["kv_bytes"] == d["kv_bytes_full"]
    else:
        assert d["n_kept"] == 64
        assert d["kv_bytes"] * d["n_prompt"] == d["kv_bytes_full"] * 64
    if policy == "asl":
        assert d["selected_layer"] is None or 0 <= d["selected_layer"] < 6


def test_inspect_json_tiny(tiny, prompt_file):
    p = run("inspect", tiny, "--prompt-file", prompt_file, "--window", 8, "--budget", 32, "--raw", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["n_layer"] == 6 and d["window"] == 8
    assert len(d["layers"]) == 6
    n_before = d["n_prompt"] - 8
    for i, layer in enumerate(d["layers"]):
        assert layer["layer"] == i
        assert len(layer["scores"]) == n_before
        assert all(s >= 0 for s in layer["scores"])
        # summed over heads (4) and window queries (8): each query row sums to 1 over all positions
        assert sum(layer["scores"]) <= 4 * 8 + 1e-3
    l_min = d["l_min"]
    assert all(layer["variance_ratio"] is None for layer in d["layers"][:l_min])
    assert d["layers"][l_min]["variance_ratio"] == pytest.approx(1.0)


@pytest.mark.real
def test_generate_real_smollm2_answers():
    prompt = ("Paris is the capital of France. " * 40 + "The magic number is 8812. " +
              "Berlin is in Germany. " * 40 + "What is the magic number?")
    # ordinary prefill keeps ASL's token set in every layer: it finds the number here
    p = run("generate", "smollm2", "--prompt", prompt, "--policy", "asl", "--budget", 128, "--window", 16,
            "--max-tokens", 16, "--json", "--prefill", "ordinary")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["n_kept"] == 128 and d["n_prompt"] > 400
    assert "8812" in d["text"]
    assert d["kv_bytes"] < d["kv_bytes_full"] / 3
    # layer-major (the default): same budget and memory, prefill work <= full
    p = run("generate", "smollm2", "--prompt", prompt, "--policy", "asl", "--budget", 128, "--window", 16,
            "--max-tokens", 16, "--json")
    assert p.returncode == 0, p.stderr
    d2 = json.loads(p.stdout)
    assert d2["n_kept"] == 128 and d2["kv_bytes"] == d["kv_bytes"] and d2["prefill_work"] <= 1.0
    assert d2["asl"]["prefill"] == "layer-major" and d2["text"]


def test_human_summary(tiny, prompt_file):
    p = run("generate", tiny, "--prompt-file", prompt_file, "--budget", 64, "--window", 8, "--max-tokens", 4, "--raw")
    assert p.returncode == 0, p.stderr
    assert "kept 64" in p.stderr and "KV memory" in p.stderr and "decode" in p.stderr


@pytest.mark.parametrize("args, message", [
    (["generate", "no-such-model", "--prompt", "hi"], "nor a known model name"),
    (["generate", "/nonexistent/model.gguf", "--prompt", "hi"], "nor a known model name"),
    (["generate", "{tiny}", "--prompt", "   "], "empty"),
    (["generate", "{tiny}"], "exactly one of"),
    (["generate", "{tiny}", "--prompt", "a", "--prompt-file", "{prompt}"], "exactly one of"),
    (["generate", "{tiny}", "--prompt-file", "{prompt}", "--budget", 8, "--window", 8, "--raw"], "larger than the window"),
    (["generate", "{tiny}", "--prompt-file", "{prompt}", "--tau", 0], "tau"),
    (["generate", "{tiny}", "--prompt-file", "{prompt}", "--tau", 1.5], "tau"),
    (["generate", "{tiny}", "--prompt-file", "{prompt}", "--ctx", 64, "--raw"], "context size"),
    (["generate", "{tiny}", "--prompt-file", "{prompt}", "--policy", "magic"], "policy"),
    (["generate", "{notgguf}", "--prompt", "hi"], "not a GGUF"),
    (["generate", "{truncated}", "--prompt", "hi"], ""),
    (["generate", "{tiny}", "--prompt-file", "{badutf8}"], "UTF-8"),
    (["inspect", "{tiny}", "--prompt", "short", "--window", 32, "--raw"], "window"),
    (["models", "fetch", "nope"], "unknown model"),
])
def test_bad_input_is_a_clear_error(tiny, prompt_file, tmp_path, args, message):
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"this is not a model at all")
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(tiny.read_bytes()[:5000])
    badutf8 = tmp_path / "bad.txt"
    badutf8.write_bytes(b"hello \xff\xfe world")
    subst = {"{tiny}": tiny, "{prompt}": prompt_file, "{notgguf}": notgguf, "{truncated}": truncated,
             "{badutf8}": badutf8}
    args = [subst.get(a, a) if isinstance(a, str) else a for a in args]
    p = run(*args)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    assert message.lower() in p.stderr.lower()


def test_models_path_known():
    p = run("models", "path", "smollm2")
    assert p.stdout.strip().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.parametrize("policy, extra", [("asl-2pass", []), ("gemfilter", ["--layer", 2])])
def test_two_pass_policies_tiny(tiny, prompt_file, policy, extra):
    p = run("generate", tiny, "--prompt-file", prompt_file, "--policy", policy, *extra, "--budget", 64,
            "--window", 8, "--max-tokens", 8, "--json", "--raw")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["n_kept"] == 64 and d["n_generated"] >= 1
    n, k, L = d["n_prompt"], 64, 6
    first = 3 if policy == "gemfilter" else L
    assert d["prefill_work"] == pytest.approx((first * n + L * k) / (L * n))
    if policy == "gemfilter":
        assert d["selected_layer"] == 2


def test_gemfilter_layer(tiny, prompt_file):
    # without --layer: GemFilter's layer 13 of 32, scaled by depth (6 layers: 2)
    p = run("generate", tiny, "--prompt-file", prompt_file, "--policy", "gemfilter", "--budget", 64, "--raw",
            "--max-tokens", 2, "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["selected_layer"] == 2
    p = run("generate", tiny, "--prompt-file", prompt_file, "--policy", "gemfilter", "--layer", 99, "--budget", 64,
            "--raw")
    assert p.returncode != 0 and "outside" in p.stderr


@pytest.mark.parametrize("policy, extra, want", [("fastkv", ["--layer", 3], 3), ("gemfilter", ["--layer", 1], 1),
                                                 ("snapkv", [], None)])
def test_inspect_reports_the_policy_layer(tiny, prompt_file, policy, extra, want):
    p = run("inspect", tiny, "--prompt-file", prompt_file, "--window", 8, "--budget", 32, "--raw", "--json",
            "--policy", policy, *extra)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["policy"] == policy and d["selected_layer"] == want


def test_gemma3_inspect_and_generate_use_global_layers(prompt_file):
    """Sliding-window model, prompt longer than the window: only global layers rank; fastkv works, and a
    layer before the first global one is a clear error; no llama.cpp warning noise on stderr."""
    g = tiny_model_path("gemma3", n_layer=6)  # layers 1, 3, 5 global; sliding window 64
    p = run("inspect", g, "--prompt-file", prompt_file, "--window", 8, "--budget", 32, "--raw", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert [x["ranked"] for x in d["layers"]] == [False, True] * 3
    assert all(x["variance_ratio"] is None for x in d["layers"] if not x["ranked"])
    p = run("generate", g, "--prompt-file", prompt_file, "--policy", "fastkv", "--layer", 2, "--budget", 64,
            "--window", 8, "--max-tokens", 4, "--json", "--raw")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["selected_layer"] == 2 and d["n_kept"] == 64 and "ranks from layer 1" in d["note"]
    assert "full-size SWA cache" not in p.stderr
    p = run("generate", g, "--prompt-file", prompt_file, "--policy", "fastkv", "--layer", 0, "--budget", 64,
            "--window", 8, "--max-tokens", 4, "--raw")
    assert p.returncode != 0 and "first full-attention layer is 1" in p.stderr


def test_inspect_reports_whole_spans(tiny, prompt_file):
    """inspect --json says which spans a policy keeps: with forward:8 every run of kept positions
    before the window is at least 8 long (but the one the budget cut); token-level keeps shorter runs."""
    def kept(*args):
        p = run("inspect", tiny, "--prompt-file", prompt_file, "--window", 8, "--budget", 96, "--raw", "--json", *args)
        assert p.returncode == 0, p.stderr
        d = json.loads(p.stdout)
        return d, [r for r in d["kept_spans"] or [] if r[1] < d["n_prompt"] - 8]

    d, runs = kept("--policy", "fastkv", "--layer", 3, "--span", "forward:8")
    assert d["span"] == "forward:8" and sum(b - a + 1 for a, b in d["kept_spans"]) == 96
    assert sum(1 for a, b in runs if b - a + 1 < 8) <= 1
    _, token_runs = kept("--policy", "fastkv", "--layer", 3, "--span", "token")
    assert sum(1 for a, b in token_runs if b - a + 1 < 8) > 1
    d, _ = kept("--policy", "snapkv", "--span", "chunk:4")
    assert d["kept_spans"] is None and all(len(layer["kept_spans"]) == 2 for layer in d["layers"])
