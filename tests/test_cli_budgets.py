"""CLI contract of the per-layer budget policies: `generate --policy zigzag|pyramid`,
`--policy asl --layer-budgets ...`, `inspect` reporting per-layer budgets; clear errors."""
from __future__ import annotations

import json

import pytest

from test_cli import run
from tinymodels import tiny_model_path


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_path("llama", n_layer=6)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompt") / "p.txt"
    p.write_text("The quick brown fox jumps over the lazy dog. " * 20 + "What jumps?")  # ~620 tokens: fast
    return p


@pytest.mark.parametrize("args", [["--policy", "zigzag", "--theta", 0.8, "--b-min-frac", 0.3],
                                  ["--policy", "pyramid", "--beta", 10],
                                  ["--policy", "asl", "--layer-budgets", "zigzag"]],
                         ids=["zigzag", "pyramid", "asl-zigzag"])
def test_generate_json(tiny, prompt_file, args):
    p = run("generate", tiny, "--prompt-file", prompt_file, *args, "--budget", 64, "--window", 8, "--max-tokens", 4,
            "--json", "--raw")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    lb = d["layer_budgets"]
    assert len(lb["budgets"]) == 6 and sum(lb["budgets"]) == 6 * 64 and d["n_kept"] == 64
    assert lb["prompt_cells"] == max(lb["budgets"])
    cell = d["kv_bytes_full"] // d["n_prompt"]
    assert d["kv_bytes"] == cell * 64                     # the rows every layer keeps, summed
    assert lb["kv_bytes_prompt_cells"] == cell * lb["prompt_cells"] <= d["kv_bytes_allocated"]
    if args[1] == "zigzag":
        assert lb["theta"] == 0.8 and lb["b_min"] == 20 and min(lb["budgets"]) >= 20
    if args[1] == "pyramid":
        assert lb["beta"] == 10 and lb["budgets"] == sorted(lb["budgets"], reverse=True)


def test_generate_human_summary(tiny, prompt_file):
    p = run("generate", tiny, "--prompt-file", prompt_file, "--policy", "pyramid", "--budget", 64, "--window", 8,
            "--max-tokens", 2, "--raw")
    assert p.returncode == 0, p.stderr
    assert "layer budgets (pyramid):" in p.stderr and "sum 384" in p.stderr


@pytest.mark.parametrize("args", [["--policy", "zigzag"], ["--policy", "pyramid"],
                                  ["--policy", "asl", "--layer-budgets", "uniform"]])
def test_inspect_reports_budgets(tiny, prompt_file, args):
    p = run("inspect", tiny, "--prompt-file", prompt_file, *args, "--window", 8, "--budget", 32, "--raw", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    lb = d["layer_budgets"]
    assert sum(lb["budgets"]) == 6 * 32 and [x["budget"] for x in d["layers"]] == lb["budgets"]
    if args[1] == "asl":
        assert lb["budgets"] == [32] * 6
    p = run("inspect", tiny, "--prompt-file", prompt_file, *args, "--window", 8, "--budget", 32, "--raw")
    assert p.returncode == 0, p.stderr
    assert "budget" in p.stdout and "layer budgets" in p.stdout and "= 6 x 32" in p.stdout


@pytest.mark.parametrize("args, message", [
    (["generate", "--policy", "snapkv", "--layer-budgets", "zigzag"], "applies to --policy asl"),
    (["generate", "--policy", "asl-2pass", "--layer-budgets", "zigzag"], "not asl-2pass"),
    (["generate", "--policy", "asl", "--layer-budgets", "nope"], "layer-budgets"),
    (["generate", "--policy", "zigzag", "--theta", 0], "theta"),
    (["generate", "--policy", "pyramid", "--beta", 0.5], "beta"),
    (["inspect", "--policy", "fastkv", "--layer", 1, "--layer-budgets", "pyramid"], "applies to --policy asl"),
])
def test_bad_budget_arguments(tiny, prompt_file, args, message):
    p = run(args[0], tiny, "--prompt-file", prompt_file, *args[1:], "--budget", 64, "--window", 8, "--raw")
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    assert message.lower() in p.stderr.lower()


def test_sliding_window_model_refuses(prompt_file):
    p = run("generate", tiny_model_path("gemma3"), "--prompt-file", prompt_file, "--policy", "zigzag", "--budget", 64,
            "--window", 8, "--raw", "--max-tokens", 2)
    assert p.returncode != 0 and "sliding-window" in p.stderr and "Traceback" not in p.stderr
