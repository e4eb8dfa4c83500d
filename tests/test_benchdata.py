"""Offline benchmark tasks (pyasl.benchdata): exact token lengths, needles present once and at the
asked depth, determinism, scorers; the results summary and plots (pyasl.bench)."""
from __future__ import annotations

import json
import re

import pytest

from pyasl import bench as BR
from pyasl.bench import data as D

from pyasl.engine import Model
from pyasl.models import fetch_model

pytestmark = pytest.mark.native


@pytest.fixture(scope="module")
def smollm2() -> Model:
    return Model(fetch_model("smollm2"))


@pytest.mark.parametrize("task", D.TASKS)
@pytest.mark.parametrize("n", [1500, 3000])
def test_exact_length_and_references_present(smollm2, task, n):
    s = D.build_sample(smollm2, task, n, seed=1, index=2)
    assert len(s.tokens) == n
    text = smollm2.detokenize(s.tokens)
    assert s.references
    for ref in s.references:
        assert ref in text
    # the prompt ends with the answer prefix, after the question
    assert text.rstrip().endswith(("is", "are:", "is:")), text[-80:]


@pytest.mark.parametrize("task", ["niah_single_1", "niah_multikey_2", "niah_multikey_3", "passkey", "number_string",
                                  "kv_retrieval", "niah"])
def test_needle_once(smollm2, task):
    s = D.build_sample(smollm2, task, 2000, seed=0, index=0)
    text = smollm2.detokenize(s.tokens)
    ref = s.references[0]
    if task in ("passkey", "number_string"):
        assert text.count(ref) == 2  # "The pass key is N. Remember it. N is the pass key."
    else:
        assert text.count(ref) == 1


def test_vt_chain(smollm2):
    s = D.build_sample(smollm2, "vt", 2000, seed=0, index=0)
    text = smollm2.detokenize(s.tokens)
    assert len(s.references) == 5
    names = s.references
    v = s.meta["value"]
    assert f"VAR {names[0]} = {v}." in text
    for a, b in zip(names, names[1:]):
        assert f"VAR {b} = VAR {a}." in text
    # hops appear in order
    idx = [text.index(f"VAR {x} =") for x in names]
    assert idx == sorted(idx)


def test_cwe_common_words_are_most_common(smollm2):
    s = D.build_sample(smollm2, "cwe", 3000, seed=0, index=0)
    text = smollm2.detokenize(s.tokens)
    words = re.findall(r"^\d+\. (\S+)$", text, flags=re.M)
    from collections import Counter
    c = Counter(words)
    top = {w for w, _ in c.most_common(10)}
    assert top == set(s.references)
    assert min(c[w] for w in s.references) > max(v for w, v in c.items() if w not in top)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_niah_depth_placement(smollm2, depth):
    s = D.build_sample(smollm2, "niah", 3000, seed=0, index=0, depth=depth)
    text = smollm2.detokenize(s.tokens)
    start = text.index("A question about them follows.") + len("A question about them follows.")
    end = text.index("What is the secret code")
    at = text.index(s.references[0])
    frac = (at - start) / (end - start)
    assert abs(frac - depth) < 0.06, frac


def test_deterministic_and_seeded(smollm2):
    a = D.build_sample(smollm2, "kv_retrieval", 1200, seed=5, index=3)
    b = D.build_sample(smollm2, "kv_retrieval", 1200, seed=5, index=3)
    c = D.build_sample(smollm2, "kv_retrieval", 1200, seed=6, index=3)
    assert a.tokens == b.tokens and a.references == b.references
    assert c.references != a.references


def test_bad_input(smollm2):
    with pytest.raises(ValueError, match="unknown task"):
        D.build_sample(smollm2, "nope", 1000)
    with pytest.raises(ValueError, match="too short"):
        D.build_sample(smollm2, "passkey", 20)
    with pytest.raises(ValueError, match="depth"):
        D.build_sample(smollm2, "niah", 1000, depth=1.5)


def test_scorers():
    assert D.score("all_refs", "They are ABC, def and x", ["abc", "DEF", "ghi"]) == pytest.approx(2 / 3)
    assert D.score("first_int", "The pass key is 12345.", ["12345"]) == 1.0
    assert D.score("first_int", "It is 1234 or 12345", ["12345"]) == 0.0
    assert D.score("first_int", "no digits", ["1"]) == 0.0
    assert D.score("substring", " 8b9b-03b6 is it", ["8B9B-03b6"]) == 1.0
    assert D.score("substring", "nothing", ["x1"]) == 0.0
    with pytest.raises(ValueError):
        D.score("bleu", "a", ["a"])


def _rows():
    rows = []
    for pol, b in [("full", None), ("snapkv", 128), ("asl", 128), ("snapkv", 256), ("asl", 256)]:
        for task in ("passkey", "niah"):
            for i, depth in enumerate([0.0, 1.0] if task == "niah" else [None, None]):
                rows.append({"model": "m", "task": task, "n_tokens": 1000, "index": i, "depth": depth,
                             "policy": pol, "budget": b, "selected_layer": 5 if pol == "asl" else None,
                             "n_layer": 12, "score": float((i + (b or 0)) % 2 == 0), "decode_tokens_per_s": 10.0,
                             "kv_bytes": 1000.0 * (b or 1000), "kv_bytes_full": 1e6, "prefill_work": 0.8})
    return rows


def test_summary_and_plots(tmp_path):
    rows = _rows()
    p = tmp_path / "r.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"partial")  # a killed run's last line
    got = BR.load_rows(p)
    assert len(got) == len(rows)
    s = BR.summarize(got)
    g = s["m@1000"]
    assert g["accuracy"]["full"]["passkey"] == {"mean": 0.5, "n": 2}
    assert g["selected_layers"]["asl@128|passkey"] == {"5": 2}
    md = BR.markdown(s)
    assert "| asl@128 |" in md and "passkey" in md
    files = BR.plot(got, tmp_path / "plots")
    names = {f.name for f in files}
    assert {"niah-m.png", "accuracy-m-1000.png", "layers-m-1000.png", "perf-m-1000.png"} <= names
    for f in files:
        assert f.stat().st_size > 1000


def test_row_keys_resume():
    r = _rows()[0]
    assert BR.row_key(r) == ("m", "passkey", 1000, 0, None, "full", None, None, None, None, "f16", None)
    # rows written before spans existed are token-level; a span variant is a row of its own
    old = dict(r, policy="snapkv", budget=128)
    assert BR.row_key(old) == BR.row_key(dict(old, span="token"))
    assert BR.row_key(old) != BR.row_key(dict(old, span="forward:16"))
    # a fixed-layer policy's layer is part of its key (a layer sweep); other policies' is not
    fast = dict(r, policy="fastkv", budget=128, layer=4)
    assert BR.row_key(fast) != BR.row_key(dict(fast, layer=2))
    assert BR.row_key(old) == BR.row_key(dict(old, layer=3))
    # the label names a layer only where it is not the library's own (fastkv: 15 of 32, so 6 of 12), what
    # `pyasl generate --policy fastkv` runs; the benchmark's default fraction of the depth is named
    assert BR.row_label(dict(fast, n_layer=12, layer=6)) == "fastkv@128"
    assert BR.row_label(dict(fast, n_layer=12, layer=4)) == "fastkv[layer=4]@128"
    assert BR.row_label(dict(fast, n_layer=12, layer=2)) == "fastkv[layer=2]@128"
    # a propagation wider than the budget is a row of its own; propagate == budget (or none) is the default
    assert BR.row_key(dict(fast, propagate=512)) != BR.row_key(fast) == BR.row_key(dict(fast, propagate=128))
    assert BR.row_label(dict(fast, n_layer=12, layer=6, propagate=512)) == "fastkv[prop=512]@128"
    assert BR.row_key(dict(old, propagate=512)) == BR.row_key(old)  # snapkv has no propagation


def test_run_appends_and_resumes(tmp_path):
    """`pyasl bench run` on a real model: one row per policy x budget, scored; a rerun skips what is
    in the file; more samples or policies run only what is missing."""
    out = tmp_path / "r.jsonl"
    logs: list[str] = []
    args = (["smollm2"], ["passkey"], [600], [128])
    assert BR.run(*args, ["full", "snapkv", "asl"], 1, out, log=logs.append) == 3
    rows = BR.load_rows(out)
    assert {(r["policy"], r["budget"]) for r in rows} == {("full", None), ("snapkv", 128), ("asl", 128)}
    for r in rows:
        assert (r["model"], r["task"], r["n_tokens"], r["index"]) == ("smollm2", "passkey", 600, 0)
        assert r["score"] in (0.0, 1.0) and r["references"] and r["n_generated"] >= 1
    assert rows[0]["n_kept"] == 600 and rows[1]["n_kept"] == 128
    assert logs[0] == f"samples to run: 1 (0 results already in {out})"
    assert logs[1].startswith("[1/1 smollm2 600 passkey #0] ") and "| eta 0m00s" in logs[1]

    logs.clear()
    assert BR.run(*args, ["full", "snapkv", "asl"], 1, out, log=logs.append) == 0
    assert logs == [f"samples to run: 0 (3 results already in {out})"]

    logs.clear()
    # sample 0 lacks only fastkv; sample 1 lacks everything
    assert BR.run(*args, ["full", "snapkv", "asl", "fastkv"], 2, out, log=logs.append) == 1 + 4
    assert logs[0] == f"samples to run: 2 (3 results already in {out})"
    assert "fastkv[layer=12]+forward:32@128=" in logs[1] and "full=" not in logs[1]  # the default span, named
    rows = BR.load_rows(out)
    assert len(rows) == 8 and len({BR.row_key(r) for r in rows}) == 8

    logs.clear()
    # a tau sweep: the rows at tau 0.3 are there, tau 0.9 is a row of its own (from the same prefill)
    assert BR.run(*args, ["asl"], 1, out, log=logs.append, taus=[0.3, 0.9]) == 1
    assert "asl[tau=0.9]+forward:32@128=" in logs[1] and "asl+forward" not in logs[1]
    rows = BR.load_rows(out)
    assert [r["tau"] for r in rows if r["policy"] == "asl" and r["index"] == 0] == [0.3, 0.9]
    assert BR.run(*args, ["asl"], 1, out, log=lambda s: None, taus=[0.9]) == 0
    with pytest.raises(ValueError, match="tau must satisfy"):
        BR.run(*args, ["asl"], 1, out, log=lambda s: None, taus=[1.5])

    logs.clear()
    # a layer sweep: fastkv at 0.4 of the depth (layer 12 of 30) is there, 0.1 (layer 3) is new
    assert BR.run(*args, ["fastkv"], 1, out, log=logs.append, fixed_fracs=[0.4, 0.1]) == 1
    assert "fastkv[layer=3]+forward:32@128=" in logs[1]
    rows = [r for r in BR.load_rows(out) if r["policy"] == "fastkv" and r["index"] == 0]
    assert [r["layer"] for r in rows] == [12, 3] and rows[1]["prefill_work"] < rows[0]["prefill_work"]
    assert BR.run(*args, ["fastkv"], 1, out, log=lambda s: None, fixed_fracs=[0.1]) == 0
    with pytest.raises(ValueError, match="fraction of the depth"):
        BR.run(*args, ["fastkv"], 1, out, log=lambda s: None, fixed_fracs=[1.5])

    logs.clear()
    # a quantized cache: a row per KV type, each policy prefilled on its own with flash attention
    assert BR.run(*args, ["full", "asl"], 1, out, log=logs.append, kv_types=["f16", "q8_0"]) == 2
    assert "full/q8_0=" in logs[1] and "asl+forward:32@128/q8_0=" in logs[1]
    rows = {BR.row_label(r): r for r in BR.load_rows(out) if r["index"] == 0}
    q8, f16 = rows["asl+forward:32@128/q8_0"], rows["asl+forward:32@128"]
    assert q8["kv_type"] == "q8_0" and q8["flash_attn"] and q8["mode"] == "independent" and q8["n_kept"] == 128
    assert q8["kv_bytes"] == pytest.approx(f16["kv_bytes"] * 34 / 64)   # q8_0: 34 bytes per 32 values
    assert BR.run(*args, ["full", "asl"], 1, out, log=lambda s: None, kv_types=["q8_0"]) == 0
    with pytest.raises(ValueError, match="unknown KV cache type"):
        BR.run(*args, ["asl"], 1, out, log=lambda s: None, kv_types=["q3"])

    logs.clear()
    # wider propagation: fastkv (layer 12 of 30) sends 300 tokens on, a row of its own beside the default
    assert BR.run(*args, ["fastkv"], 1, out, log=logs.append, propagates=[None, 300]) == 1
    assert "fastkv[layer=12][prop=300]+forward:32@128=" in logs[1]
    rows = {BR.row_label(r): r for r in BR.load_rows(out) if r["index"] == 0}
    wide, kept = rows["fastkv[layer=12][prop=300]+forward:32@128"], rows["fastkv[layer=12]+forward:32@128"]
    assert wide["propagated"] >= 300 and wide["n_kept"] == 128 and wide["prefill_work"] > kept["prefill_work"]
    assert BR.run(*args, ["fastkv"], 1, out, log=lambda s: None, propagates=[300]) == 0
    with pytest.raises(ValueError, match="smaller than the budget"):
        BR.run(*args, ["fastkv"], 1, out, log=lambda s: None, propagates=[64])


def test_update_doc_rewrites_marked_tables(tmp_path):
    from click.testing import CliRunner

    from pyasl.apps.cli import main

    rows = _rows()
    s = BR.summarize(rows)
    doc = "intro\n\n<!-- accuracy:m:1000 -->\nold table\n<!-- /accuracy -->\n\nPlots: ...\n"
    new, done, missing = BR.update_doc(doc, s)
    assert (done, missing) == (["m@1000"], [])
    assert "old table" not in new and "| asl@128 |" in new
    assert "<details><summary>Selected layer (of 12)" in new and "- asl@128 / passkey: 5: 2" in new
    assert new.startswith("intro\n\n<!-- accuracy:m:1000 -->\n| policy |")
    assert new.endswith("</details>\n<!-- /accuracy -->\n\nPlots: ...\n")
    assert BR.update_doc(new, s)[0] == new  # idempotent
    with pytest.raises(ValueError, match="no rows for it"):
        BR.update_doc("<!-- accuracy:other:1000 -->\n<!-- /accuracy -->\n", s)
    # an unterminated block must not swallow the text up to the next block's end marker
    broken = "<!-- accuracy:m:1000 -->\nold\nprose to keep\n" + doc
    with pytest.raises(ValueError, match="1 of the document's .* blocks have no"):
        BR.update_doc(broken, s)

    res = tmp_path / "r.jsonl"
    res.write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = tmp_path / "doc.md"
    md.write_text(doc)
    r = CliRunner().invoke(main, ["bench", "summary", str(res), "--into", str(md)])
    assert r.exit_code == 0, r.output
    assert md.read_text() == new
    md.write_text("no blocks here\n")
    r = CliRunner().invoke(main, ["bench", "summary", str(res), "--into", str(md)])
    assert r.exit_code != 0 and "has no '<!-- accuracy:MODEL:N_TOKENS -->' blocks" in r.output
    # --samples: the first N samples of every task only
    r = CliRunner().invoke(main, ["bench", "summary", str(res), "--json", "--samples", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["m@1000"]["accuracy"]["full"]["passkey"]["n"] == 1
