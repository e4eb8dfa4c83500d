"""`pyasl chat`: an interactive terminal session over a pruned KV cache (see pyasl.session).

Line editing and history come from the readline module (history in $PYASL_HOME/chat_history).
Ctrl-C while an answer streams stops that answer and keeps the session: the partial answer stays
in the cache and the transcript (marked interrupted). Ctrl-C at the prompt clears the line; Ctrl-D
or /quit ends the session.
"""
from __future__ import annotations

import signal
import threading
import sys
from pathlib import Path
from typing import Callable, Optional

from .. import policies as P
from .. import session as S

HELP = """commands:
  /stats          kept and total tokens, KV memory, selection layer(s), prefill and decode speed
  /policy NAME [LAYER]  prune with NAME from now on (asl, snapkv, fastkv LAYER, asl-2pass, gemfilter LAYER, full)
  /reset          forget the conversation, keep the prefilled documents
  /save PATH      write the session (pruned cache + transcript) to PATH
  /load PATH      replace this session by the one saved in PATH (same model only)
  /help           this text
  /quit           leave (also Ctrl-D)
Ctrl-C during an answer stops it (the partial answer is kept); the conversation goes on."""

PROMPT = ">>> "


def format_stats(st: dict) -> str:
    pol = st["policy"]
    name = pol["name"]
    desc = name if name == "full" else f"{name} (budget {pol['budget']}, window {pol['window']}" + (
        f", layer {pol['layer']}" if pol.get("layer") is not None else "") + (
        f", span {pol['span']}" if pol.get("span", "token") != "token" else "") + ")"
    layers = ", ".join("none" if l is None else str(l) for l in st["selected_layers"]) or "-"

    def rate(x):
        return "-" if x is None else f"{x:.1f} tok/s"

    return "\n".join([
        f"policy {desc}; selected layer(s): {layers}",
        f"kept {st['kept_tokens']} of {st['total_tokens']} tokens; context {st['n_ctx']} cells; "
        f"KV {st['kv_mib']:.2f} MiB (unpruned {st['kv_mib_unpruned']:.2f} MiB)",
        f"documents {st['document_tokens']} tokens -> {st['document_kept']} kept; prefill {rate(st['prefill_tok_s'])}; "
        f"decode {rate(st['last_decode_tok_s'])} (last answer), {rate(st['decode_tok_s'])} (all)",
        f"turns {st['turns']}; prunings {st['prunings']} ({st['reprunes']} when the context was full, "
        f"{st['questions_selected']} for a question)",
        _mode_line(st),
    ] + [f"note: {n}" for n in st["notes"]])


def _mode_line(st: dict) -> str:
    """What the session's mode holds and does per question (/stats)."""
    if st["mode"] == "per-question":
        again = (" and answers both over the kept tokens prefilled again and over their cells as computed, keeping "
                 "the gathered answer where the full KV and its own context find it likelier "
                 f"({_answers_from(st)})" if st["reprefill"] == "choose" else
                 " and prefills the kept tokens again" if st["reprefill"] else "")
        return (f"mode per-question: the full KV ({st['full_copy_mib']:.1f} MiB) is kept {_where_copy(st)}, "
                f"every question selects again{again}")
    return f"mode {st['mode']}: the documents were pruned once{_how_ranked(st)}, the context re-prunes when full"


def _answers_from(st: dict) -> str:
    """How many answers a choosing session kept from each decode context."""
    got = st.get("answers_from") or {}
    return f"so far {got.get('prefilled', 0)} prefilled, {got.get('gathered', 0)} as computed"


def _where_copy(st: dict) -> str:
    """Where per-question mode keeps the documents' full KV (Session's full_copy)."""
    return "on disk between questions" if st.get("full_copy_on_disk") else "beside the decode context"


def _how_ranked(st: dict) -> str:
    """How a prune-once session ranked its documents, in one wording for the banner and /stats."""
    if st["mode"] != "reconstruct":
        return ""
    again = ", the kept tokens prefilled again" if st["reprefill"] else ""
    return f" (ranked by a request to repeat them{again})"


class Chat:
    def __init__(self, session: S.Session, out=None, err=None, temperature: float = 0.0, top_p: float = 1.0,
                 seed: Optional[int] = None, read_line: Optional[Callable[[str], str]] = None,
                 repeat_penalty: float = 1.0):
        self.s = session
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.repeat_penalty = repeat_penalty
        self.read_line = read_line or input

    def say(self, msg: str) -> None:
        print(msg, file=self.err, flush=True)

    # -- one answer ---------------------------------------------------------------------------
    def answer(self, prompt: str) -> None:
        s = self.s
        before = s.stats_.reprunes
        old = signal.signal(signal.SIGINT, lambda *_: s.interrupt())
        try:
            gen = s.stream(prompt, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                           repeat_penalty=self.repeat_penalty)
            if s.stats_.reprunes > before:
                st = s.stats()
                lay = st["selected_layers"][-1]
                self.say(f"[context full: pruned to {st['kept_tokens']} cells with {s.policy.name}, the newest turn "
                         f"as the observation window" + (f", selection layer {lay}" if lay is not None else "") + "]")
            for piece in gen:
                self.out.write(piece)
                self.out.flush()
        finally:
            signal.signal(signal.SIGINT, old)
        self.out.write("\n")
        self.out.flush()
        if s.messages and s.messages[-1].get("interrupted"):
            self.say("[interrupted: the partial answer is kept]")

    # -- commands -----------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        parts = line.split(maxsplit=1)
        cmd, arg = parts[0].lower(), (parts[1].strip() if len(parts) > 1 else "")
        s = self.s
        if cmd in ("/quit", "/exit", "/q"):
            return False
        if cmd == "/help":
            self.say(HELP)
        elif cmd == "/stats":
            self.say(format_stats(s.stats()))
        elif cmd == "/reset":
            s.reset()
            self.say(f"[conversation cleared; {s.n_cells()} document cells kept]")
        elif cmd == "/policy":
            if not arg:
                self.say(f"policy: {s.policy!r}; names: {', '.join(P.policy_names())}")
                return True
            name, *rest = arg.split()
            kw = {}
            if rest:
                if not rest[0].isdigit():
                    raise ValueError(f"/policy {name}: the layer must be a number, not {rest[0]!r}")
                kw["layer"] = int(rest[0])
            if name != "full":
                kw["budget"] = s.policy.budget if s.policy.prunes else 512
                kw["window"] = s.policy.window
            s.set_policy(P.make_policy(name, **kw))
            self.say(f"[policy {s.policy!r} from now on]")
        elif cmd == "/save":
            if not arg:
                raise ValueError("/save needs a file path")
            s.save(Path(arg).expanduser())
            self.say(f"[saved {s.n_cells()} cells and {len(s.messages)} messages to {arg}]")
        elif cmd == "/load":
            if not arg:
                raise ValueError("/load needs a file path")
            new = S.Session.load(s.model, Path(arg).expanduser(), n_threads=s.n_threads)
            s.close()
            self.s = new
            st = new.stats()
            self.say(f"[loaded {arg}: {len(new.messages)} messages, kept {st['kept_tokens']} of "
                     f"{st['total_tokens']} tokens, policy {new.policy.name}]")
        else:
            self.say(f"unknown command {cmd}; /help lists them")
        return True

    # -- the loop -----------------------------------------------------------------------------
    def loop(self) -> int:
        self.say("type a message, /help for commands, /quit to leave")
        while True:
            try:
                line = self.read_line(PROMPT)
            except EOFError:
                self.out.write("\n")
                return 0
            except KeyboardInterrupt:
                self.out.write("^C\n")
                continue
            except UnicodeDecodeError as e:  # a terminal or pipe that is not UTF-8: the session goes on
                self.say(f"error: the line is not valid UTF-8 ({e.reason}, byte {e.object[e.start:e.start + 1]!r}); "
                         "type it again")
                continue
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        return 0
                else:
                    self.answer(line)
            except (S.SessionFileError, S.ContextFullError, ValueError, OSError, RuntimeError) as e:
                self.say(f"error: {e}")
            except KeyboardInterrupt:  # Ctrl-C just before an answer's handler was installed
                self.say("[interrupted]")


def _setup_readline() -> None:
    try:
        import readline
    except ImportError:  # pragma: no cover - Windows without pyreadline
        return
    import atexit

    from .._paths import cache_home

    hist = cache_home() / "chat_history"
    try:
        hist.parent.mkdir(parents=True, exist_ok=True)
        if hist.exists():
            readline.read_history_file(str(hist))
        readline.set_history_length(1000)
        atexit.register(lambda: _write_history(readline, hist))
    except OSError:
        pass


def _write_history(readline, hist: Path) -> None:
    try:
        readline.write_history_file(str(hist))
    except OSError:
        pass


def run(session: S.Session, documents: list[tuple[str, str]], progress, temperature: float = 0.0,
        top_p: float = 1.0, seed: Optional[int] = None, repeat_penalty: float = 1.0) -> int:
    """Prefill the documents (with the progress callback), then talk until /quit or Ctrl-D."""
    # Ctrl-C must reach the chat even when it was started with SIGINT ignored (a parent that ignores
    # it passes that on, and Python then installs no KeyboardInterrupt handler): at the prompt it
    # clears the line, during an answer it stops the answer
    old = signal.signal(signal.SIGINT, signal.default_int_handler) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        return _talk(session, documents, progress, temperature, top_p, seed, repeat_penalty)
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


def _talk(session, documents, progress, temperature, top_p, seed, repeat_penalty) -> int:
    chat = Chat(session, temperature=temperature, top_p=top_p, seed=seed, repeat_penalty=repeat_penalty)
    if documents:
        st = session.prefill(documents=documents, progress=progress)
        if hasattr(progress, "close"):
            progress.close()
        lay = st["selected_layers"][0] if st["selected_layers"] else None
        speed = f", prefill {st['prefill_tok_s']:.0f} tok/s" if st["prefill_tok_s"] else ""
        if st["mode"] == "per-question":
            chat.say(f"[documents: {st['document_tokens']} tokens, kept whole {_where_copy(st)} "
                     f"({st['full_copy_mib']:.1f} MiB); every question selects {session.policy.budget} cells with "
                     f"{session.policy.name}{speed}]")
        else:
            chat.say(f"[documents: {st['document_tokens']} tokens, kept {st['kept_tokens']} cells with "
                     f"{session.policy.name}{_how_ranked(st)}" + (f", selection layer {lay}" if lay is not None else "")
                     + speed + "]")
    _setup_readline()
    return chat.loop()
