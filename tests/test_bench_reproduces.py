"""The committed benchmark rows (docs/bench/accuracy.jsonl) reproduce token for token through
today's code: every policy at both budgets, on SmolLM2 and Qwen2.5 (45 rows). A refactor that
changes what any policy keeps or decodes fails here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyasl import bench as BR

ROWS = Path(__file__).resolve().parents[1] / "docs" / "bench" / "accuracy.jsonl"
# (model, task, n_tokens, depth, index): one shared prefill each, 15 rows (8 policies, 2 budgets)
SAMPLES = [("smollm2", "niah", 2048, 0.5, 0), ("smollm2", "vt", 4096, None, 0),
           ("qwen2.5-0.5b", "niah", 2048, 0.25, 0)]


def _committed(sample) -> dict:
    model, task, n_tok, depth, index = sample
    out = {}
    with ROWS.open(encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if (r["model"], r["task"], int(r["n_tokens"]), r.get("depth"), int(r["index"])) == sample:
                out[BR.row_key(r)] = r
    return out


@pytest.mark.real
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: f"{s[0]}-{s[1]}-{s[2]}")
def test_committed_rows_reproduce(sample, tmp_path):
    from pyasl.models import ModelError, fetch_model

    model, task, n_tok, depth, _ = sample
    try:
        fetch_model(model)
    except ModelError as e:  # pragma: no cover - a machine that cannot reach the registry
        pytest.skip(f"{model} not available: {e}")
    want = _committed(sample)
    assert len(want) == 15
    out = tmp_path / "rows.jsonl"
    BR.run([model], [task], [n_tok], [512, 1024], sorted({r["policy"] for r in want.values()}), 1, out,
           depths=[depth] if depth is not None else BR.NIAH_DEPTHS, log=lambda s: None, spans=["token"])
    got = {BR.row_key(r): r for r in BR.load_rows(out)}
    assert set(got) == set(want)
    for k, r in want.items():
        assert got[k]["output"] == r["output"], (k, got[k]["output"], r["output"])
        assert got[k]["n_kept"] == r["n_kept"] and got[k]["selected_layer"] == r["selected_layer"], k
