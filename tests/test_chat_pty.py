"""`pyasl chat` driven the way a person drives it: through a pseudo-terminal (pexpect), typing lines,
reading the screen, pressing Ctrl-C.

On SmolLM2 with a ~0.9K-token document, a 128-cell budget and a 256-cell context: the conversation
crosses the context size several times (each time the policy prunes again), /save then /load in a
fresh process continues the same conversation, Ctrl-C stops an answer without ending the session.
"""
from __future__ import annotations

import re
import signal
import sys

import pytest

pexpect = pytest.importorskip("pexpect")

from tinymodels import tiny_model_path

PROMPT = ">>> "
TIMEOUT = 240


def _doc(n_lines: int = 30) -> str:
    names = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi"]
    cities = ["Paris", "Lisbon", "Oslo", "Kyoto", "Lima", "Cairo", "Quito", "Perth"]
    lines = [f"In year {1900 + i}, {names[(i * 5) % 8]} travelled to {cities[(i * 3) % 8]} and wrote a short "
             f"report about the weather, the food and the trains there." for i in range(n_lines)]
    lines.insert(n_lines // 2, "The secret password of the archive is BLUE-HERON-42.")
    return "\n".join(lines)


def spawn(*args, sigint_ignored: bool = False) -> "pexpect.spawn":
    child = pexpect.spawn(sys.executable, ["-m", "pyasl", "chat", *map(str, args)], encoding="utf-8",
                          timeout=TIMEOUT, dimensions=(40, 200),
                          preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None)
    return child


def expect_prompt(child) -> str:
    child.expect_exact(PROMPT)
    return child.before


def say(child, line: str) -> str:
    """Type a line, wait for the next prompt, return what the screen showed in between."""
    child.sendline(line)
    return expect_prompt(child)


def stat_numbers(screen: str) -> tuple[int, int, int]:
    m = re.search(r"kept (\d+) of (\d+) tokens; context (\d+) cells", screen)
    assert m, screen
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


@pytest.fixture(scope="module")
def smollm2() -> str:
    from pyasl.models import fetch_model

    return str(fetch_model("smollm2"))


@pytest.fixture(scope="module")
def doc_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("chat") / "archive.txt"
    p.write_text(_doc())
    return p


@pytest.mark.real
def test_chat_long_conversation_save_load(smollm2, doc_file, tmp_path):
    sess_file = tmp_path / "talk.pyasl"
    child = spawn(smollm2, "--doc", doc_file, "--budget", 128, "--window", 16, "--ctx", 256, "--max-tokens", 24,
                  "--policy", "asl", "--mode", "once")
    try:
        first = expect_prompt(child)
        m = re.search(r"\[documents: (\d+) tokens, kept (\d+) cells", first)
        assert m, first
        assert int(m.group(1)) > 600 and int(m.group(2)) == 128
        questions = ["What is the secret password of the archive?", "Who travelled to Oslo?",
                     "Which city did Grace visit?", "What did the reports talk about?",
                     "Repeat the password, please.", "Name one person from the document.",
                     "What year is mentioned first?", "Who travelled to Rome?", "What did Grace write about?",
                     "Which traveller came last?", "Say the password once more."]
        screens = [say(child, q) for q in questions]
        reprunes = sum(s.count("[context full: pruned to") for s in screens)
        assert reprunes >= 2, screens
        for s in screens:  # every turn got an answer line and no error
            assert "error" not in s.lower(), s
        stats = say(child, "/stats")
        kept, total, n_ctx = stat_numbers(stats)
        assert n_ctx == 256 and kept <= n_ctx and total > n_ctx + 600
        assert "selected layer(s):" in stats and re.search(r"prunings (\d+) \((\d+) when", stats)
        assert int(re.search(r"\((\d+) when the context was full", stats).group(1)) >= 2
        assert re.search(r"prefill \d+(\.\d+)? tok/s", stats) and re.search(r"decode \d+(\.\d+)? tok/s", stats)
        out = say(child, f"/save {sess_file}")
        assert "[saved" in out and sess_file.exists()
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0

    # a fresh process, no documents: /load brings back the pruned cache and the transcript
    child = spawn(smollm2, "--budget", 128, "--ctx", 256, "--max-tokens", 24)
    try:
        expect_prompt(child)
        out = say(child, f"/load {sess_file}")
        assert f"[loaded {sess_file}" in out, out
        st = say(child, "/stats")
        assert stat_numbers(st) == (kept, total, n_ctx)
        out = say(child, "And who went to Paris?")
        assert out.strip().splitlines()[-1].strip() and "error" not in out.lower(), out
        st = say(child, "/stats")
        k2, t2, _ = stat_numbers(st)
        assert t2 > total and k2 <= 256
        assert re.search(rf"turns {len(questions) + 1};", st), st
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


@pytest.mark.real
def test_chat_asks_a_document_question_after_question(smollm2, doc_file, tmp_path):
    """The default mode: the document stays whole beside the decode context and every question
    selects its own 128 cells, so the password in the middle of the document is found each time it
    is asked, whatever was asked before; /save and /load keep the full copy."""
    sess_file = tmp_path / "pq.pyasl"
    child = spawn(smollm2, "--doc", doc_file, "--budget", 128, "--window", 16, "--ctx", 256, "--max-tokens", 24,
                  "--span", "forward:16")
    try:
        first = expect_prompt(child)
        assert re.search(r"\[documents: \d+ tokens, kept whole beside the decode context \([\d.]+ MiB\); every "
                         r"question selects 128 cells with asl", first), first
        screens = [say(child, q) for q in ["What is the secret password of the archive?", "Who travelled to Oslo?",
                                           "What is the secret password of the archive?"]]
        assert "BLUE-HERON-42" in screens[0] and "BLUE-HERON-42" in screens[2], screens
        stats = say(child, "/stats")
        assert "mode per-question" in stats and "3 for a question" in stats, stats
        kept, total, _ = stat_numbers(stats)
        assert kept <= 128 + 24 + 8 and total > 600
        assert "[saved" in say(child, f"/save {sess_file}")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    child = spawn(smollm2, "--budget", 128, "--ctx", 256, "--max-tokens", 24)
    try:
        expect_prompt(child)
        assert f"[loaded {sess_file}" in say(child, f"/load {sess_file}")
        out = say(child, "What is the secret password of the archive?")
        assert "BLUE-HERON-42" in out, out
        assert "4 for a question" in say(child, "/stats")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


@pytest.mark.real
def test_chat_ctrl_c_stops_the_answer_not_the_session(smollm2):
    child = spawn(smollm2, "--budget", 128, "--ctx", 512, "--max-tokens", 160, sigint_ignored=True)
    try:
        expect_prompt(child)
        child.sendline("Write a very long story about a dragon who lives in a castle by the sea.")
        child.expect_exact("by the sea.")  # the echo of the typed line
        child.expect(r"\w+ \w+ \w+ \w+ \w+")  # the answer is streaming
        child.sendintr()  # Ctrl-C, as the terminal sends it
        child.expect_exact("[interrupted: the partial answer is kept]")
        expect_prompt(child)
        assert child.isalive()
        out = say(child, "Say OK.")
        assert out.strip() and "error" not in out.lower()
        st = say(child, "/stats")
        assert re.search(r"turns 2;", st), st
        # Ctrl-C at the prompt does not quit either (the chat was started with SIGINT ignored, as a
        # parent that ignores it passes on: the chat installs its own handler)
        child.sendintr()
        child.expect_exact("^C")
        expect_prompt(child)
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_chat_commands_and_model_mismatch_tiny(tmp_path):
    """/help, /policy, /reset, /save; loading the file with another model is refused clearly."""
    a = tiny_model_path("llama", n_layer=6)
    b = tiny_model_path("qwen2", n_layer=4)
    doc = tmp_path / "d.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    f = tmp_path / "s.pyasl"
    child = spawn(a, "--doc", doc, "--budget", 48, "--window", 8, "--ctx", 128, "--max-tokens", 8)
    try:
        expect_prompt(child)
        assert "/stats" in say(child, "/help")
        assert "snapkv" in say(child, "/policy snapkv")
        assert "error" in say(child, "/policy fastkv x")
        for q in ("hello there", "what jumps over the dog", "and then what happened", "tell me more"):
            say(child, q)
        assert "document cells kept" in say(child, "/reset")
        assert "turns 0;" in say(child, "/stats")
        assert "[saved" in say(child, f"/save {f}")
        assert "unknown command" in say(child, "/frobnicate")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    child = spawn(b, "--ctx", 128, "--budget", 48, "--max-tokens", 8)
    try:
        expect_prompt(child)
        out = say(child, f"/load {f}")
        assert "error:" in out and "saved with another model" in out, out
        out = say(child, f"/load {tmp_path / 'missing.pyasl'}")
        assert "not found" in out
        assert child.isalive()
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
