"""Per-model ASL defaults: `pyasl calibrate` chooses a tau from a tau sweep against SnapKV and stores
it; ASL without a tau uses the model's calibration (else the paper's 0.3) and says so."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

import pyasl
from pyasl import calibration as C
from pyasl.bench import calibrate as CR
from pyasl.apps.cli import main
from tinymodels import tiny_model_path

TINY = tiny_model_path("llama", n_layer=4)


def _rows(table: dict, snapkv: float, n: int = 4, copies: int = 2) -> list[dict]:
    """Benchmark rows: snapkv scoring `snapkv` of n samples, asl at each tau: (hits of n, work, layer);
    every sample `copies` times (SnapKV must answer CR.MIN_ANSWERED samples before tau may move)."""
    rows = [{"policy": "snapkv", "score": float(i < snapkv * n)} for i in range(n)]
    for tau, (hits, work, layer) in table.items():
        rows += [{"policy": "asl", "tau": tau, "score": float(i < hits), "prefill_work": work, "selected_layer": layer}
                 for i in range(n)]
    return rows * copies


def test_choose_least_work_within_tolerance():
    rows = _rows({0.3: (4, 0.95, None), 0.5: (4, 0.7, 17), 0.7: (3, 0.5, 12), 0.9: (1, 0.3, 6)}, snapkv=1.0)
    rec = CR.choose(rows, tolerance=2.0)
    assert rec["tau"] == 0.5 and rec["within_tolerance"] and rec["snapkv_accuracy"] == 100.0
    assert [t["tau"] for t in rec["taus"]] == [0.3, 0.5, 0.7, 0.9]
    assert rec["taus"][0]["selected"] == 0.0 and rec["taus"][0]["mean_layer"] is None
    assert rec["taus"][2]["mean_layer"] == 12 and rec["taus"][2]["accuracy"] == 75.0
    assert CR.choose(rows, tolerance=25.0)["tau"] == 0.7
    # no tau within the tolerance: the most accurate, and the record says so
    rec = CR.choose(_rows({0.3: (2, 0.9, 20), 0.5: (3, 0.6, 14)}, snapkv=1.0), tolerance=2.0)
    assert rec["tau"] == 0.5 and not rec["within_tolerance"]
    # a tau not run on every sample is not compared
    partial = _rows({0.3: (4, 0.9, 20)}, snapkv=1.0) + [
        {"policy": "asl", "tau": 0.9, "score": 1.0, "prefill_work": 0.1, "selected_layer": 2}]
    assert CR.choose(partial)["tau"] == 0.3
    with pytest.raises(ValueError, match="no snapkv rows"):
        CR.choose([r for r in rows if r["policy"] != "snapkv"])


def test_too_few_answered_samples_keep_the_papers_tau():
    """Accuracy lost can only be seen where the model answers: with SnapKV answering fewer than
    MIN_ANSWERED samples the paper's tau is kept, however little work another tau does."""
    rows = _rows({0.3: (1, 1.0, None), 0.9: (1, 0.6, 10)}, snapkv=0.25, n=4, copies=4)  # 4 answered of 16
    rec = CR.choose(rows, tolerance=2.0)
    assert rec["tau"] == C.DEFAULT_TAU and rec["too_few_answered"] and rec["snapkv_answered"] == 4.0
    assert [t["tau"] for t in rec["taus"]] == [0.3, 0.9] and rec["samples"] == 16
    rec = CR.choose(_rows({0.3: (1, 1.0, None), 0.9: (1, 0.6, 10)}, snapkv=0.25, n=4, copies=8))  # 8 of 32
    assert rec["tau"] == 0.9 and "too_few_answered" not in rec


def test_no_tau_that_selects_keeps_the_papers_and_says_why():
    """Gemma 3 at 4K: ASL may only select at its last layer, so no tau selects: no trade to choose,
    however many samples (the paper's tau, and the record says why)."""
    rows = _rows({0.3: (4, 1.0, None), 0.9: (4, 1.0, None)}, snapkv=1.0, copies=4)
    rec = CR.choose(rows, tolerance=2.0)
    assert rec["tau"] == C.DEFAULT_TAU and rec["never_selects"] and not rec["within_tolerance"]
    assert "too_few_answered" not in rec


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A model cache of its own for the calibrations (the library stays the one built)."""
    from pyasl import _native

    monkeypatch.setenv("PYASL_LIB_DIR", str(_native.lib_dir()))
    monkeypatch.setenv("PYASL_HOME", str(tmp_path))
    return tmp_path


def test_asl_uses_the_model_calibration_and_says_so(home):
    m = pyasl.load_model(TINY)
    try:
        assert C.lookup(m) is None and pyasl.ASL(budget=64).settings_for(m) == (0.3, None, None)
        f = C.user_file(m)
        f.parent.mkdir(parents=True)
        f.write_text(json.dumps({"identity": C.identity(m), "tau": 0.8, "date": "2026-12-03", "samples": 16,
                                 "n_tokens": 4096}))
        tau, _, source = pyasl.ASL(budget=64).settings_for(m)
        assert tau == 0.8 and "pyasl calibrate calibration of 2026-12-03, 16 samples" in source
        assert pyasl.ASL(budget=64, tau=0.3).settings_for(m) == (0.3, None, None)  # an explicit tau wins
        assert pyasl.ASL(budget=64).params()["tau"] is None
        # the selection note names it; the rule runs with that tau
        scores = np.random.default_rng(0).random((m.n_layer, m.n_head, 300), dtype=np.float32)
        sel = pyasl.ASL(budget=64, window=8).select(scores, 8, m)
        assert "(tau 0.8: the model's pyasl calibrate calibration" in sel.note
        assert sel.asl.note.count("tau=0.8") == 1
        # another model file (or another quantization: another size) does not match
        f.write_text(json.dumps({"identity": dict(C.identity(m), size=1), "tau": 0.8}))
        assert C.lookup(m) is None
        # the file is read once per change (ASL asks at every layer), and read again when it changes,
        # even to the same size
        rec = {"identity": C.identity(m), "tau": 0.8, "date": "2026-12-03", "samples": 16, "n_tokens": 4096}
        f.write_text(json.dumps(rec))
        assert C.lookup(m).tau == 0.8
        st = f.stat()
        f.write_text(json.dumps(dict(rec, tau=0.7)))
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert f.stat().st_size == st.st_size and C.lookup(m).tau == 0.7
    finally:
        m.close()


def test_cli_calibrate_stores_a_tau_that_generate_and_inspect_use(home):
    r = CliRunner().invoke(main, ["calibrate", str(TINY), "--length", "600", "--budget", "128", "--samples", "1",
                                  "--taus", "0.3,0.9", "--tasks", "passkey,niah_single_1"])
    assert r.exit_code == 0, r.output
    m = pyasl.load_model(TINY)
    try:
        [rec] = json.loads(C.user_file(m).read_text())  # one record per calibrated length
        assert rec["n_tokens"] == 600 and rec["identity"] == C.identity(m) and rec["samples"] == 2 and rec["budget"] == 128  # 2 tasks x 1
        assert [t["tau"] for t in rec["taus"]] == [0.3, 0.9]
        # the tiny model's ratio never falls to 0.9 (no tau selects): the paper's tau, and the command says why
        assert rec["tau"] == 0.3 and rec["never_selects"] and "no tau selected a layer" in r.output
        assert str(C.user_file(m)) in r.output
        assert C.lookup(m).tau == rec["tau"]
    finally:
        m.close()
    # resumable: a second run runs nothing
    r2 = CliRunner().invoke(main, ["calibrate", str(TINY), "--length", "600", "--budget", "128", "--samples", "1",
                                   "--taus", "0.3,0.9", "--tasks", "passkey,niah_single_1"])
    assert r2.exit_code == 0 and "samples to run: 0" in r2.output
    r3 = CliRunner().invoke(main, ["inspect", str(TINY), "--prompt", "word " * 300, "--json", "--budget", "64",
                                   "--window", "8"])
    assert r3.exit_code == 0, r3.output
    assert json.loads(r3.output)["tau"] == rec["tau"]
    bad = CliRunner().invoke(main, ["calibrate", str(TINY), "--taus", "0,2"])
    assert bad.exit_code != 0 and "--taus must be values in (0, 1]" in bad.output


def test_shipped_calibrations_are_well_formed_and_used_after_the_users(home, monkeypatch, tmp_path):
    recs = json.loads(C.SHIPPED.read_text())
    for rec in recs:
        assert set(rec["identity"]) == {"file", "size", "n_layer"} and 0 < rec["tau"] <= 1
        assert rec["within_tolerance"] and rec["samples"] >= 16, rec["identity"]
    m = pyasl.load_model(TINY)
    try:
        shipped = tmp_path / "shipped.json"
        shipped.write_text(json.dumps([{"identity": C.identity(m), "tau": 0.6, "date": "2026-12-03", "samples": 16,
                                        "n_tokens": 4096}]))
        monkeypatch.setattr(C, "SHIPPED", shipped)
        cal = C.lookup(m)
        assert cal.tau == 0.6 and cal.source.startswith("shipped calibration")
        f = C.user_file(m)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"identity": C.identity(m), "tau": 0.8}))
        assert C.lookup(m).tau == 0.8  # the user's own calibration first
    finally:
        m.close()


def test_one_calibration_per_prompt_length_the_nearest_is_used(home):
    """The ratio curve moves with the prompt's length: a model keeps one record per calibrated length,
    and ASL uses the one nearest its prompt (by ratio), the user's before the shipped one."""
    m = pyasl.load_model(TINY)
    try:
        f = C.user_file(m)
        f.parent.mkdir(parents=True)
        rec = {"identity": C.identity(m), "date": "2026-12-05", "samples": 16}
        C.store(f, dict(rec, n_tokens=256, tau=0.5))
        C.store(f, dict(rec, n_tokens=1024, tau=0.9))
        C.store(f, dict(rec, n_tokens=256, tau=0.6))  # the same length again replaces it
        assert sorted((r["n_tokens"], r["tau"]) for r in json.loads(f.read_text())) == [(256, 0.6), (1024, 0.9)]
        assert C.lookup(m, 200).tau == 0.6 and C.lookup(m, 4000).tau == 0.9
        assert C.lookup(m, 500).tau == 0.6 and C.lookup(m, 520).tau == 0.9  # 512 is as far from both
        assert "at 1024 tokens" in C.lookup(m, 900).source
        # the selection on a prompt takes the tau of its length, and its note names it
        scores = np.random.default_rng(0).random((m.n_layer, m.n_head, 300), dtype=np.float32)
        assert "(tau 0.6: the model's pyasl calibrate calibration of 2026-12-05, 16 samples at 256 tokens)" in \
            pyasl.ASL(budget=64, window=8).select(scores, 8, m).note
        scores = np.random.default_rng(0).random((m.n_layer, m.n_head, 900), dtype=np.float32)
        assert "(tau 0.9:" in pyasl.ASL(budget=64, window=8).select(scores, 8, m).note
    finally:
        m.close()


def test_a_propagation_is_calibrated_with_its_tau_and_used_by_default(home):
    """calibrate --propagate: a (tau, propagation) pair is one setting; ASL without a tau of its own
    runs the calibrated propagation, scaled to its prompt, and says so; an explicit tau leaves it out."""
    rows = _rows({0.3: (4, 0.95, None), 0.97: (3, 0.55, 9)}, snapkv=1.0)
    rows += [dict(r, propagate="3072:kept", prefill_work=0.62, budget=1024) for r in _rows({0.97: (4, 0, 9)}, 1.0)
             if r["policy"] == "asl"]
    rec = CR.choose(rows, tolerance=2.0)
    assert (rec["tau"], rec["propagate"]) == (0.97, "3072:kept")
    assert [(t["tau"], t.get("propagate")) for t in rec["taus"]] == [(0.3, None), (0.97, None), (0.97, "3072:kept")]
    assert "propagate" not in CR.choose(rows, tolerance=30.0)  # 0.97 alone is within 30 points, with less work
    m = pyasl.load_model(TINY)
    try:
        f = C.user_file(m)
        f.parent.mkdir(parents=True)
        f.write_text(json.dumps({"identity": C.identity(m), "tau": 0.97, "propagate": "300:kept", "n_tokens": 600,
                                 "date": "2026-12-05", "samples": 16}))
        assert C.lookup(m, 600).propagate_for(600) == "300:kept" and C.lookup(m, 600).propagate_for(1200) == "600:kept"
        asl = pyasl.ASL(budget=64, window=8)
        assert asl.propagation_for(m, 600) == (300, "kept") and asl.propagation_for(m, 240) == (120, "kept")
        assert asl.propagation_for(m, 100) == (None, "own")  # 50 would be fewer than the budget
        assert pyasl.ASL(budget=64, window=8, tau=0.97).propagation_for(m, 600) == (None, "own")
        assert pyasl.ASL(budget=64, window=8, propagate=100).propagation_for(m, 600) == (100, "own")
        assert pyasl.ASL(budget=64, window=8, prefill="ordinary").propagation_for(m, 600) == (None, "own")
        scores = np.random.default_rng(0).random((m.n_layer, m.n_head, 600), dtype=np.float32)
        assert "(tau 0.97, propagate 300:kept: the model's pyasl calibrate calibration" in asl.decide_last(scores, m).note
        # a selection from every layer's scores (ordinary prefill, per-question selection) propagates nothing
        assert "(tau 0.97: the model's pyasl calibrate calibration" in asl.select(scores, 8, m).note
        t = [int(x) for x in np.random.default_rng(1).integers(10, 380, 600)]
        pr = pyasl.engine.strategies.run(m, t, pyasl.ASL(budget=64, window=8), max_tokens=4, n_batch=128)
        try:
            assert pr.stop_layer < m.n_layer - 1 and pr.extra["propagated"] >= 300 and pr.n_kept == 64
        finally:
            pr.ctx.close()
    finally:
        m.close()
