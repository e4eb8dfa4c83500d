"""The prefill-accuracy Pareto (issue 22): every point of a group over the same samples, full KV in
every group of its model and length, ASL's points judged against FastKV's curve."""
from __future__ import annotations

import json

from click.testing import CliRunner

from pyasl.apps.cli import main
from pyasl.bench.pareto import on_or_above, pareto_groups, pareto_markdown, plot_pareto


def _row(policy, index, score, work, budget=1024, tau=0.3, layer=None, span="forward:32", task="passkey"):
    return {"model": "m", "task": task, "n_tokens": 4090, "index": index, "depth": None, "policy": policy,
            "budget": None if policy == "full" else budget, "span": None if policy == "full" else span,
            "tau": tau, "layer": layer, "n_layer": 24, "score": score, "prefill_work": work}


def _rows():
    rows = []
    for i in range(4):
        rows += [_row("full", i, 1.0, 1.0), _row("snapkv", i, 1.0 if i else 0.0, 1.0),
                 _row("asl", i, 1.0, 0.7, tau=0.9), _row("asl", i, float(i % 2), 0.9, tau=0.5),
                 _row("fastkv", i, 0.0, 0.3, layer=2), _row("fastkv", i, 1.0 if i < 3 else 0.0, 0.56, layer=9),
                 _row("fastkv", i, 1.0, 0.8, layer=16)]
    rows.append(_row("snapkv", 9, 1.0, 1.0))        # a sample the others lack: left out of every point
    rows.append(_row("snapkv", 0, 0.0, 1.0, budget=512))   # a group of one setting: no chart
    return rows


def test_groups_share_samples_and_include_full():
    (g,) = pareto_groups(_rows())
    assert (g["model"], g["n_tokens"], g["budget"], g["span"], g["samples"]) == ("m", 4096, 1024, "forward:32", 4)
    pts = {p["label"]: p for p in g["points"]}
    assert pts["full"]["accuracy"] == 100.0 and pts["snapkv+forward:32@1024"]["accuracy"] == 75.0
    assert pts["asl[tau=0.9]+forward:32@1024"]["prefill_work"] == 0.7
    assert {p["layer"] for p in g["points"] if p["policy"] == "fastkv"} == {2, 9, 16}
    assert all(p["n"] == 4 for p in g["points"])


def test_on_or_above_the_frontier():
    """The frontier at a work level is the best FastKV layer that costs no more: a deeper layer that
    scores less does not lower it."""
    curve = [{"prefill_work": 0.3, "accuracy": 0.0}, {"prefill_work": 0.56, "accuracy": 75.0},
             {"prefill_work": 0.7, "accuracy": 50.0}, {"prefill_work": 0.8, "accuracy": 100.0}]
    assert on_or_above({"prefill_work": 0.72, "accuracy": 75.0}, curve) is True
    assert on_or_above({"prefill_work": 0.72, "accuracy": 70.0}, curve) is False   # layer 0.56 did better
    assert on_or_above({"prefill_work": 0.9, "accuracy": 90.0}, curve) is False
    assert on_or_above({"prefill_work": 0.2, "accuracy": 10.0}, curve) is None     # cheaper than every layer
    md = pareto_markdown(pareto_groups(_rows()))
    assert "| asl[tau=0.9]+forward:32@1024 | 0.70 | 100.0 | on or above |" in md
    assert "| asl[tau=0.5]+forward:32@1024 | 0.90 | 50.0 | below |" in md


def test_chart_and_cli(tmp_path):
    files = plot_pareto(pareto_groups(_rows()), tmp_path / "a")
    assert [f.name for f in files] == ["pareto-m-4096-1024-forward32.png"] and files[0].stat().st_size > 5000
    src = tmp_path / "r.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in _rows()) + "\n")
    res = CliRunner().invoke(main, ["bench", "pareto", str(src), "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert "#### m, 4096 tokens, 1024 cells, span forward:32 (4 samples)" in res.output
    assert (tmp_path / "b" / "pareto-m-4096-1024-forward32.png").is_file()
    empty = tmp_path / "e.jsonl"
    empty.write_text(json.dumps(_row("snapkv", 0, 1.0, 1.0)) + "\n")
    res = CliRunner().invoke(main, ["bench", "pareto", str(empty)])
    assert res.exit_code != 0 and "no group with two settings" in res.output
