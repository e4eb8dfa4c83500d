"""A conversation over a pruned KV cache: load a model once, open sessions on it.

    import pyasl

    model = pyasl.load_model("smollm2")                     # a GGUF path or a known name
    s = pyasl.Session(model, policy=pyasl.ASL(budget=256), n_ctx=1024, max_tokens=128)
    s.prefill(documents=[open("report.txt").read()])        # prefilled once, pruned to 256 cells
    print(s.ask("What is the report about?"))               # greedy by default
    for piece in s.stream("And the conclusion?", temperature=0.7, seed=1):
        print(piece, end="", flush=True)
    s.save("report.pyasl")                                  # pruned cache + transcript
    s2 = pyasl.Session.load(model, "report.pyasl")         # refuses a different model

How a session works
-------------------
One llama.cpp context of ``n_ctx`` cells holds one sequence. Documents (and the system message)
go into a user message left open for the first question, which completes it: the first question is
asked in exactly the tokens of one prompt holding document and question (:mod:`.format`). They
are prefilled once with the session's policy -- the same strategy and selection as
``pyasl generate`` (pyasl.engine.strategies) -- and the pruned cache is moved into that context at
the tokens' original positions. Every turn is appended after it (positions only ever increase)
and the answer is decoded from there. When a turn and its answer would not fit into ``n_ctx``
cells any more, the policy prunes the cache again (:meth:`Policy.select`): the newest turn is
decoded with the window-attention scores armed and serves as the observation window (it is always
kept, up to 3/4 of the budget); the first ``sink`` cells (attention sinks; optionally the latest
``keep_recent`` cells too) are kept as they are, and the policy chooses the rest, ``budget`` cells
in all (a hard cap) -- text is never cut silently. Policy ``Full`` never prunes and refuses a turn
that does not fit (:class:`ContextFullError`).

Modes (``mode=``):

* ``per-question`` (the default for a pruning policy): the documents and every turn also stay
  unpruned in a context of their own (:mod:`.full_copy`); each question is decoded there as the
  observation window, the policy selects ``budget`` tokens from everything, and the answer is
  decoded both over the kept tokens prefilled again as a prompt of their own and over their cells
  as the whole conversation computed them, one of the two answers kept (``reprefill``;
  :mod:`.per_question`, :mod:`.answer`). Later questions select again. Costs the full KV in memory,
  saves decode time.
* ``once``: the documents are pruned once, before any question is known (the strategy of
  ``pyasl generate``: layer-major for asl and fastkv); later turns re-prune only when the context is
  full. Holds at most ``n_ctx`` cells.
* ``reconstruct``: like ``once``, but the documents are ranked by the attention the model gives them
  while asked to repeat them (query-agnostic, KVzip-style; a default span is widened to
  ``around:8+32``; about 2-3x the documents' prefill time) instead of the attention of their own last
  tokens, and the kept tokens are prefilled again as a prompt of their own (``reprefill``;
  :mod:`.reconstruct`). Holds at most ``n_ctx`` cells after it.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

from ..engine import ClosedError, Context, Model
from ..engine.context import kv_type_name
from ..engine.full_copy import FullCopy
from ..engine.strategies import check_continuable, prefill_state
from ..policies import ASL, Policy, Selection, make_policy
from .files import load, save
from .format import ANSWER, ChatFormat
from .per_question import PerQuestion
from .reconstruct import Reconstruct
from .reprune import Repruning
from .answer import CHOOSE, Draft, agreed, keep, report, step_all
from .state import _RECENT_MAX, _SLACK, ContextFullError, SessionFileError, _Base, _Stats

__all__ = ["MODES", "ContextFullError", "Session", "SessionFileError"]

MODES = ("per-question", "once", "reconstruct")
FULL_COPY_PLACES = ("memory", "disk")

Progress = Optional[Callable[[int, int], None]]





def _check_policy(model: Model, policy: Policy) -> None:
    """What a session can prune with: the policy's own limits, no sliding-window models, per-layer
    budgets through zigzag and pyramid only (their re-prunes keep to the cells each layer sees)."""
    policy.check_model(model)
    check_continuable(policy)
    if getattr(policy, "layer_budgets", None):
        raise ValueError("sessions prune with per-layer budgets through policy zigzag or pyramid, not "
                         f"{policy.name} with layer_budgets")
    if policy.prunes and model.n_swa > 0:
        # re-pruning must read the positions of the global-attention cache, and nothing tells Python
        # yet which layers use it (a native accessor is needed)
        raise ValueError(f"sessions cannot prune sliding-window models ({model.arch}) yet; use policy full, or "
                         "pyasl generate for one-shot pruning")


def _check_text(text, what: str) -> None:
    """A clear error for text that is not a str or not encodable as UTF-8 (lone surrogates, e.g. from
    bytes decoded with errors='surrogateescape'), instead of a UnicodeEncodeError from the tokenizer."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid UTF-8 text (character {e.start} is the lone surrogate "
                         f"{text[e.start]!r}); decode its bytes with errors='replace' first") from None


class Session(Repruning, PerQuestion, Reconstruct):
    """A conversation over a KV cache pruned by a policy.

    Args:
        model: a loaded :class:`pyasl.Model` (shared by any number of sessions).
        policy: a :class:`Policy` object (default ``ASL(budget=512)``) or a policy name.
        n_ctx: cells of the session's context: the pruned documents, the turns and one answer
            must fit; when they would not, the policy prunes again (see the module docstring).
        system: system message.
        max_tokens: the longest answer (cells reserved for it before each answer).
        raw: do not use the model's chat template (plain "User:/Assistant:" text).
        n_threads, flash_attn, n_batch: llama.cpp context settings; type_k, type_v: KV cache types
            (f16, q8_0, q4_0, ...; a quantized V needs flash_attn), as llama.cpp's -ctk / -ctv.
        sink: cells at the start of the conversation that every re-prune keeps (attention sinks:
            without them a small model's answers fall into repetition after a few re-prunes).
        keep_recent: cells just before the newest turn that every re-prune keeps verbatim (the
            latest exchange; default 0: on the soak of docs/RELIABILITY.md it cost the document's
            facts their room and bought no coherence).
        mode: ``per-question`` (default for a pruning policy: every question selects from the full
            KV, kept beside the decode context), ``once`` (prune the documents once) or
            ``reconstruct`` (prune them once, ranked by a request to repeat them); see the module doc.
        full_copy: mode ``per-question``: where the full copy waits between questions: ``memory``
            (default) or ``disk`` (a file in a temporary directory, its context freed: the document's KV
            is not held while the user reads and types; each question writes and reads it once).
        reprefill: how a question's decode context is built from the kept tokens (modes ``per-question``
            and ``reconstruct``). True: prefilled again as a prompt of their own (positions 0..k-1), so
            their KV is computed among themselves (a selection per KV head is kept as computed); False:
            their cells gathered as the whole document computed them; ``"choose"`` (mode
            ``per-question``): both, the answer decoded in each, the prefilled one kept unless the full
            copy and the gathered context's own confidence both prefer the gathered one (:mod:`.answer`).
            Default (None): ``"choose"`` in mode ``per-question``, True in ``reconstruct`` (measured in
            docs/BENCHMARKS.md, "Questions after the document").

    Raises ValueError when ``n_ctx`` cannot hold ``budget`` cells plus an answer."""

    def __init__(self, model: Model, policy: Union[Policy, str, None] = None, n_ctx: int = 4096,
                 system: Optional[str] = None, max_tokens: int = 256, raw: bool = False,
                 n_threads: Optional[int] = None, flash_attn: bool = False, n_batch: int = 512,
                 sink: int = 4, keep_recent: int = 0, mode: Optional[str] = None, type_k="f16", type_v="f16",
                 reprefill: Union[bool, str, None] = None, full_copy: str = "memory"):
        if policy is None:
            policy = ASL(budget=512)
        elif isinstance(policy, str):
            policy = make_policy(policy)
        if not isinstance(policy, Policy):
            raise ValueError(f"policy must be a pyasl Policy or a name, got {policy!r}")
        _check_policy(model, policy)
        for k, v in (("n_ctx", n_ctx), ("max_tokens", max_tokens), ("n_batch", n_batch), ("sink", sink),
                     ("keep_recent", keep_recent)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{k} must be an integer, got {v!r}")
        if system is not None:
            _check_text(system, "the system message")
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if int(sink) < 0 or int(keep_recent) < 0:
            raise ValueError("sink and keep_recent must be >= 0")
        if mode is None:
            mode = "per-question" if policy.prunes else "once"
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        if full_copy not in FULL_COPY_PLACES:
            raise ValueError(f"full_copy must be one of {', '.join(FULL_COPY_PLACES)}, not {full_copy!r}")
        if full_copy == "disk" and mode != "per-question":
            raise ValueError(f"full_copy='disk' keeps the full copy of mode per-question on disk; mode {mode} keeps none")
        self.full_copy = full_copy
        if reprefill is None:
            reprefill = CHOOSE if mode == "per-question" else True
        if not isinstance(reprefill, bool) and reprefill != CHOOSE:
            raise ValueError(f"reprefill must be True, False, {CHOOSE!r} or None, got {reprefill!r}")
        if reprefill == CHOOSE and mode != "per-question":
            raise ValueError(f"reprefill={CHOOSE!r} judges two answers with the full copy of mode per-question; "
                             f"mode {mode} keeps none")
        self.reprefill = reprefill
        self.sink = int(sink)
        self.keep_recent = int(keep_recent)
        self.model = model
        self.n_ctx = int(n_ctx)
        self.max_tokens = int(max_tokens)
        self.system = system
        self.n_threads, self.flash_attn, self.n_batch = n_threads, bool(flash_attn), int(n_batch)
        self.type_k, self.type_v = kv_type_name(type_k), kv_type_name(type_v)
        Context.check_kv_types(self.type_v, self.flash_attn)
        self._check_sizes(policy, self.max_tokens)
        self.policy = policy
        self._fmt = ChatFormat(model, raw=raw)
        self._stop = threading.Event()
        self._ctx: Optional[Context] = None
        self._full: Optional[FullCopy] = None
        self._alt: Optional[Context] = None
        self._closed = False
        self._reset_state()

    # -- bookkeeping -------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self._free()
        self.last_selection: Optional[Selection] = None  # the latest selection from a full copy (None: kept all)
        self._n_docs = 0                        # tokens of the documents (the full copy keeps them on reset)
        self.documents: list[tuple[str, str]] = []
        self.messages: list[dict] = []          # the transcript: user and assistant turns
        self._struct: list[dict] = []           # messages as rendered (answers as placeholders)
        self._cached_text = ""                  # rendering of what the cache holds
        self._started = False
        self._pos_shift = 0                     # positions given back by renumbering (tokens seen - n_past)
        self._logits: Optional[np.ndarray] = None
        self._alt = None                        # reprefill="choose": the gathered decode context for the answer
        self._full_logits: Optional[np.ndarray] = None  # the full copy's logits after the question (the judge's)
        self._recent: list[int] = []            # the newest tokens (repetition penalty)
        self._base_state: Optional[_Base] = None
        self.stats_ = _Stats()

    def _check_sizes(self, policy: Policy, max_tokens: int) -> None:
        if self.n_ctx < 16:
            raise ValueError("n_ctx must be >= 16")
        if policy.prunes and policy.budget + max_tokens + _SLACK + 1 > self.n_ctx:
            raise ValueError(f"the context ({self.n_ctx} cells) must hold the budget ({policy.budget}), an answer "
                             f"(max_tokens {max_tokens}) and {_SLACK + 1} more cells: raise n_ctx to at least "
                             f"{policy.budget + max_tokens + _SLACK + 1} or lower the budget / max_tokens")
        if not policy.prunes and max_tokens + _SLACK + 1 > self.n_ctx:
            raise ValueError(f"the context ({self.n_ctx} cells) is too small for max_tokens {max_tokens}")

    def _new_ctx(self) -> Context:
        return Context(self.model, self.n_ctx, capture=True, **self._ctx_kw())

    def _new_full_copy(self) -> FullCopy:
        """An empty full copy with the session's context settings (modes per-question, reconstruct)."""
        return FullCopy(self.model, on_disk=self.full_copy == "disk", **self._ctx_kw())

    def _ctx_kw(self) -> dict:
        """The llama.cpp context settings every context of the session is made with."""
        return dict(n_batch=self.n_batch, n_threads=self.n_threads, flash_attn=self.flash_attn, type_k=self.type_k,
                    type_v=self.type_v)

    @property
    def n_past(self) -> int:
        """The next position (tokens seen so far, less what renumbering gave back): the decode
        context's own, the one place it is kept."""
        return 0 if self._ctx is None else self._ctx.n_past

    @property
    def n_seen(self) -> int:
        """Tokens seen by the session so far."""
        return self.n_past + self._pos_shift

    def n_cells(self) -> int:
        """KV cells in use (the kept tokens)."""
        return 0 if self._ctx is None else int(self._ctx.kv_info().used_base)

    def set_policy(self, policy: Union[Policy, str]) -> None:
        """Use another policy for the following prunings (the cache is not touched now)."""
        if isinstance(policy, str):
            policy = make_policy(policy, budget=self.policy.budget if self.policy.prunes else None)
        _check_policy(self.model, policy)
        if self._layer_cells() is not None and not hasattr(policy, "method"):
            raise ValueError(f"the cache holds per-layer budgets ({self.policy.name}); later prunings must keep "
                             "them: use policy zigzag or pyramid, or reset the session")
        self._check_sizes(policy, self.max_tokens)
        self.policy = policy

    def interrupt(self) -> None:
        """Stop the answer being generated (safe from a signal handler or another thread): the
        generator ends after the current token, and the partial answer is kept in the cache and the
        transcript (marked ``interrupted``)."""
        self._stop.set()

    def reset(self) -> None:
        """Forget the conversation; keep the prefilled documents (their pruned cache is restored)."""
        self._check_open()
        base = self._base_state
        stats = self.stats_
        full, n_docs = self._full, self._n_docs
        self._full = None
        self._reset_state()
        if full is not None:
            full.truncate(n_docs)
            self._full, self._n_docs = full, n_docs
        if base is not None:
            self._load_state(base.state, base.n_past, base.layer_cells)
            self._cached_text, self._struct = base.text, list(base.struct)
            self._pos_shift = base.pos_shift
            self._started = True
            self._base_state = base
            self.stats_ = _Stats(prefill_tokens=stats.prefill_tokens, prefill_s=stats.prefill_s,
                                 prefill_kept=stats.prefill_kept, selected_layers=stats.selected_layers[:1])

    def _check_open(self) -> None:
        if self._closed:  # the engine's error for a closed Model or Context
            raise ClosedError("the session is closed")

    def close(self) -> None:
        """Free the session's llama.cpp contexts; it answers nothing after this."""
        self._closed = True
        self._free()

    def _free(self) -> None:
        if self._alt is not None:
            self._alt.close()
            self._alt = None
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        if self._full is not None:
            self._full.close()
            self._full = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- prefill -----------------------------------------------------------------------------
    def prefill(self, documents: Sequence[Union[str, tuple[str, str]]] = (), progress: Progress = None) -> dict:
        """Prefill the system message and `documents` (texts, or (name, text) pairs) and prune
        them with the policy. Call once, before the first turn (the first turn calls it without
        documents otherwise). Returns :meth:`stats`."""
        self._check_open()
        if self._started:
            raise RuntimeError("the session is already prefilled; documents go in before the first turn")
        if isinstance(documents, (str, bytes)):
            raise ValueError("documents must be a list of texts (or (name, text) pairs), not one "
                             f"{type(documents).__name__}")
        docs = [(None, d) if isinstance(d, str) else (d[0], d[1]) if isinstance(d, (tuple, list)) and len(d) == 2
                else (None, d) for d in documents]
        for name, text in docs:
            _check_text(text, f"document {name or ''}".rstrip())
            if not text or not text.strip():
                raise ValueError(f"document {name or ''} is empty".replace("  ", " "))
        pre = self._fmt.preamble(self.system, docs)
        text = self._fmt.render(pre, False) if pre else ""
        toks = self._fmt.tokens(text, first=True) if text else []
        n = len(toks)
        if n > self.model.n_ctx_train:
            raise ValueError(f"the documents have {n} tokens, more than the model's training context "
                             f"{self.model.n_ctx_train}")
        if not self.policy.prunes and n + self.max_tokens + _SLACK > self.n_ctx:
            raise ContextFullError(f"the documents have {n} tokens: with policy full they must fit into the context "
                                   f"({self.n_ctx} cells) with an answer; use a pruning policy or a larger n_ctx")
        if n and self.mode == "per-question":
            self._prefill_full(toks, progress)
        elif n:
            if self.mode == "reconstruct" and self.policy.prunes:
                pp = self._prefill_reconstruct(toks, pre, text, progress)
            else:
                pp = prefill_state(self.model, toks, self.policy, progress=progress, **self._ctx_kw())
            self._load_state(pp.state, pp.n_tokens, pp.layer_cells)
            self._pos_shift = n - pp.n_tokens  # a second prefill gave the kept tokens positions 0..k-1
            self._remember(toks[-_RECENT_MAX:])
            self._bound_positions()
            self.stats_.prefill_tokens, self.stats_.prefill_s, self.stats_.prefill_kept = n, pp.seconds, pp.n_kept
            if self.policy.prunes and pp.n_kept < n:
                self.stats_.selected_layers.append(pp.selected_layer)
            if self.n_cells() + self.max_tokens + _SLACK > self.n_ctx:
                raise ContextFullError("the pruned documents leave no room for an answer; raise n_ctx")
        self.documents = docs
        self._struct = list(pre)
        self._cached_text = text
        self._started = True
        if not n:
            self._ctx = self._new_ctx()
            if self.mode == "per-question" and self.policy.prunes:  # the conversation alone goes into the copy
                self._full = self._new_full_copy()
        self._base_state = _Base(self._ctx.state_get(), self.n_past, text, list(pre), self._layer_cells(),
                                 self._pos_shift) if n else None
        return self.stats()

    def _load_state(self, state: bytes, n_past: int, layer_cells=None) -> None:
        """A new context holding a saved sequence (and its per-layer budgets, which the state bytes
        do not carry)."""
        if self._ctx is not None:
            self._ctx.close()
        self._ctx = self._new_ctx()
        self._ctx.state_set(state, n_past=n_past)
        if layer_cells is not None:
            self._ctx.set_kv_layer_cells(np.asarray(layer_cells))

    def _layer_cells(self) -> Optional[list]:
        """The per-layer budgets in force in the cache (None: every layer sees every cell)."""
        if self._ctx is None:
            return None
        p_cells, counts = self._ctx.kv_layer_cells()
        return [int(c) for c in counts] if p_cells else None

    # -- appending ------------------------------------------------------------------------------
    def _remember(self, toks: Sequence[int]) -> None:
        self._recent.extend(int(t) for t in toks)
        if len(self._recent) > 2 * _RECENT_MAX:
            del self._recent[:-_RECENT_MAX]

    # -- turns ----------------------------------------------------------------------------------
    def stream(self, prompt: str, max_tokens: Optional[int] = None, temperature: float = 0.0, top_p: float = 1.0,
               seed: Optional[int] = None, stop: Sequence[str] = (), repeat_penalty: float = 1.0,
               repeat_last_n: int = 64) -> Iterator[str]:
        """Append a user turn and yield the answer's text as it is decoded.

        Greedy unless ``temperature > 0`` (then top-p sampling with ``seed``); ``repeat_penalty``
        (llama.cpp's, 1.0 = off) applies to the last ``repeat_last_n`` tokens of the conversation
        (at most 4096). The answer ends at
        the model's end-of-turn token, at ``max_tokens`` tokens, at one of the ``stop`` strings, or
        when :meth:`interrupt` is called; it is appended to :attr:`messages` in every case (an
        interrupted answer with ``"interrupted": True``)."""
        self._check_open()
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            raise ValueError("the prompt is empty")
        _check_text(prompt, "the prompt")
        if stop is None or isinstance(stop, str):  # one stop string, not its characters
            stop = [] if stop is None else [stop]
        if any(not isinstance(x, str) or not x for x in stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
        if not 0.0 <= float(temperature) < float("inf"):
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
        if not 0.0 < float(top_p) <= 1.0:
            raise ValueError(f"top_p must satisfy 0 < top_p <= 1, got {top_p}")
        mt = self.max_tokens if max_tokens is None else int(max_tokens)
        if mt < 1:
            raise ValueError("max_tokens must be >= 1")
        if not float(repeat_penalty) > 0:
            raise ValueError(f"repeat_penalty must be > 0, got {repeat_penalty}")
        if not 0 <= int(repeat_last_n) <= _RECENT_MAX:
            raise ValueError(f"repeat_last_n must be in [0, {_RECENT_MAX}], got {repeat_last_n}")
        if mt > self.max_tokens and self.policy.prunes and self.policy.budget + mt + _SLACK + 1 > self.n_ctx:
            raise ValueError(f"max_tokens {mt} does not fit next to the budget in {self.n_ctx} cells")
        if not self._started:
            self.prefill()
        self._stop.clear()
        user = {"role": "user", "content": prompt}
        new_struct = self._fmt.turn(self._struct, prompt)
        new_text = self._fmt.render(new_struct, True)
        if not new_text.startswith(self._cached_text):
            raise RuntimeError("the chat template does not render the conversation incrementally")
        delta = new_text[len(self._cached_text):]
        toks = self._fmt.tokens(delta, first=self.n_past == 0)
        if self._full is not None:
            self._ask_full(toks, reserve=mt + _SLACK)
        else:
            self._append(toks, reserve=mt + _SLACK)
        self.messages.append(user)
        self._struct = new_struct + [{"role": "assistant", "content": ANSWER}]
        self._cached_text = new_text + ANSWER
        self.stats_.turns += 1
        return self._answer(mt, temperature, top_p, seed, list(stop) + (["\nUser:"] if self._fmt.raw else []),
                            float(repeat_penalty), int(repeat_last_n))

    def _answer(self, max_tokens, temperature, top_p, seed, stop, penalty=1.0, last_n=64) -> Iterator[str]:
        rng = np.random.default_rng(seed)
        drafts = [Draft(self._ctx, self._logits, "prefilled" if self._alt is not None else "")]
        if self._alt is not None:  # reprefill="choose": the gathered cells answer too, from the copy's logits
            drafts.append(Draft(self._alt, self._full_logits, "gathered"))
            self._alt = None
        hold = max((len(s) - 1 for s in stop), default=0)
        emitted = 0
        finished = False
        chosen: Optional[Draft] = None
        t0 = time.perf_counter()
        try:
            for _ in range(max_tokens):
                if self._stop.is_set():
                    break
                if not step_all(drafts, self.model, self._recent, rng, temperature, top_p, penalty, last_n, stop,
                                self.n_ctx):
                    break
                safe = agreed(drafts, hold)
                if safe > emitted:
                    yield drafts[0].text[emitted:safe]
                    emitted = safe
            finished = not self._stop.is_set()
            for d in drafts:
                d.finish()
            chosen = drafts[0] if not finished or len(drafts) == 1 else keep(drafts, self._full, self._full_logits)
            if len(chosen.text) > emitted:
                yield chosen.text[emitted:]
                emitted = len(chosen.text)
        finally:
            chosen = chosen or drafts[0]
            self._keep_answer(chosen, drafts)
            dt = time.perf_counter() - t0
            msg = {"role": "assistant", "content": chosen.text}
            if not finished:
                msg["interrupted"] = True
            self.messages.append(msg)
            self._stop.clear()
            st = self.stats_
            st.decode_tokens += len(chosen.tokens)
            st.decode_s += dt
            st.last_decode_tokens, st.last_decode_s = len(chosen.tokens), dt

    def _keep_answer(self, chosen: Draft, drafts: list[Draft]) -> None:
        """The chosen answer's context becomes the session's (the other one is closed); its tokens go
        into the repetition history and, per question, into the full copy before the next turn."""
        for d in drafts:
            if d is not chosen:
                d.ctx.close()
        self._ctx, self._logits = chosen.ctx, chosen.logits
        self._remember(chosen.tokens)
        self.stats_.last_candidates = report(drafts, chosen) if len(drafts) > 1 else []
        if self._full is not None:
            self._full.pending.extend(chosen.tokens)
            self._pos_shift = self._full.n + len(self._full.pending) - self._ctx.n_past  # the tokens seen
            if chosen.how:
                self.stats_.answers_from[chosen.how] = self.stats_.answers_from.get(chosen.how, 0) + 1
                self._full.park()  # full_copy="disk": kept loaded while it judged the answers

    def ask(self, prompt: str, **kw) -> str:
        """Append a user turn and return the whole answer (see :meth:`stream` for the options)."""
        return "".join(self.stream(prompt, **kw))

    # -- statistics -----------------------------------------------------------------------------
    def stats(self) -> dict:
        """Where the session stands: kept and total tokens, KV memory, selection layers, speeds."""
        st = self.stats_
        kept = self.n_cells()
        cell = 0
        if self._ctx is not None:
            info = self._ctx.kv_info()
            cell = info.cell_bytes_base
        mib = 1024 * 1024
        return {
            "policy": self.policy.to_dict(), "n_ctx": self.n_ctx, "kept_tokens": kept, "total_tokens": self.n_seen,
            "kv_mib": kept * cell / mib, "kv_mib_unpruned": self.n_seen * cell / mib, "next_position": self.n_past,
            "renumbers": st.renumbers,
            "selected_layers": list(st.selected_layers), "prunings": len(st.selected_layers), "reprunes": st.reprunes,
            "turns": st.turns, "document_tokens": st.prefill_tokens, "document_kept": st.prefill_kept,
            "prefill_s": st.prefill_s,
            "prefill_tok_s": st.prefill_tokens / st.prefill_s if st.prefill_s > 0 else None,
            "decode_tok_s": st.decode_tokens / st.decode_s if st.decode_s > 0 and st.decode_tokens else None,
            "last_decode_tok_s": (st.last_decode_tokens / st.last_decode_s
                                  if st.last_decode_s > 0 and st.last_decode_tokens else None),
            "mode": self.mode, "reprefill": self.mode in ("reconstruct", "per-question") and self.reprefill,
            "questions_selected": st.questions_selected, "answers_from": dict(st.answers_from),
            "last_candidates": list(st.last_candidates),
            "full_copy_mib": None if self._full is None else self._full.kv_bytes() / mib,
            "full_copy_on_disk": self._full is not None and self._full.parked, "notes": list(st.notes),
        }

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the pruned cache, the transcript, the policy and the statistics to one file."""
        self._check_open()
        save(self, path)

    @classmethod
    def load(cls, model: Model, path: Union[str, os.PathLike], n_threads: Optional[int] = None) -> "Session":
        """Open a session saved by :meth:`save`. Raises :class:`SessionFileError` when the file is
        not a pyasl session or was saved with a different model."""
        return load(cls, model, path, n_threads=n_threads)
