"""The unpruned KV of a conversation or of a long prompt's prefix, kept outside the decode context so
that every question is scored against all of it (per-question selection: Session, pyasl.Llama).

A document pruned before the question is known keeps what the end of the document attends to, not
what the question needs. Here the documents and every turn stay in one context of their own; a
question is decoded there with its window-attention scores armed (the question is the observation
window), the policy selects from the whole conversation, and the selection is moved into a small
decode context (budget + the answer). The answer's tokens are appended to the copy before the next
question.
"""
from __future__ import annotations

import shutil
import tempfile
import time
import warnings
import weakref
from pathlib import Path
from typing import Optional

import numpy as np

from ..policies import Policy, Selection
from .context import Context, _pad, copy_state_from_file, state_file_size, write_state_file
from .model import Model
from .prefill import gather_selection, pass_ubatch, prefill, prefill_kept
from .strategies import PrunedPrefill, finish_ordinary, select

GROW = 1024  # cells added when the copy must grow
# the note of a second prefill that a selection per KV head or per layer cannot have
KEPT_AS_COMPUTED = ("{} keeps a set per KV head or layer: its cells are kept as the whole document computed them "
                    "(a second prefill needs one set of tokens)")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities from logits (float64)."""
    z = logits.astype(np.float64)
    z -= z.max()
    return z - np.log(np.exp(z).sum())


def shared_prefix(a, b) -> int:
    """How many leading tokens two token lists share."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if len(diff) else n


class FullCopyFull(RuntimeError):
    """The conversation would pass the model's training context."""


class FullCopy:
    """A live context holding every token of the session so far (positions 0..n-1), plus the answer
    tokens not decoded into it yet (``pending``).

    on_disk: :meth:`park` writes the copy to a file in a temporary directory of its own and frees its
    context (a long document's KV is not held between questions); the next use of :attr:`ctx` loads
    it back."""

    def __init__(self, model: Model, n_batch: int = 512, n_threads: Optional[int] = None, flash_attn: bool = False,
                 type_k="f16", type_v="f16", on_disk: bool = False):
        self.model = model
        self.kw = dict(n_batch=n_batch, n_threads=n_threads, flash_attn=flash_attn, type_k=type_k, type_v=type_v)
        self._ctx: Optional[Context] = None
        self.on_disk = bool(on_disk)
        self._parked: Optional[Path] = None  # the file holding the copy while its context is freed
        self._parked_cell_bytes = 0
        self._dir: Optional[Path] = None
        self._cleanup = None  # removes _dir
        self.n = 0
        self.tokens: list[int] = []  # the n tokens in the copy
        self.pending: list[int] = []
        self.window = 0  # the window of the latest question
        self.last_selection: Optional[Selection] = None  # select_state's latest

    @property
    def ctx(self) -> Optional[Context]:
        """The copy's context (loaded back from its file first when parked)."""
        if self._parked is not None:
            self._unpark()
        return self._ctx

    @ctx.setter
    def ctx(self, ctx: Optional[Context]) -> None:
        self._ctx = ctx

    @property
    def parked(self) -> bool:
        return self._parked is not None

    def park(self) -> bool:
        """on_disk copies: write the copy to its file and free its context (the pending answer tokens
        stay here); False when not parked (nothing to park, or the disk refused it: a warning)."""
        if not self.on_disk or self._ctx is None or self.n == 0:
            return False
        path = self._park_path()
        try:
            self.save_file(path)
        except (OSError, RuntimeError) as e:
            path.unlink(missing_ok=True)
            warnings.warn(f"pyasl: could not write the full copy to {path} ({e}); it stays in memory", stacklevel=2)
            return False
        self._parked_cell_bytes = self._ctx.kv_info().cell_bytes_base
        self._ctx.close()
        self._ctx, self._parked = None, path
        return True

    def _park_path(self) -> Path:
        """The file a parked copy lives in (its directory made on first use, removed with the copy)."""
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="pyasl-copy-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        return self._dir / "copy.state"

    def _cell_bytes(self) -> int:
        """Bytes of one cell of the copy's KV, from a small context with the copy's settings (for a copy
        parked without ever being loaded)."""
        probe = Context(self.model, 256, **{**self.kw, "n_batch": 32})
        try:
            return int(probe.kv_info().cell_bytes_base)
        finally:
            probe.close()

    def _unpark(self) -> None:
        """Load the parked copy back. A file that cannot be read leaves the copy parked and raises, at
        this use and every later one (never a copy silently without its documents)."""
        path, tokens, pending = self._parked, self.tokens, self.pending
        self._parked = None
        try:
            self.load_file(path, tokens, pending)
        except (OSError, RuntimeError) as e:
            if self._ctx is not None:
                self._ctx.close()
                self._ctx = None
            self._parked = path
            self.n, self.tokens, self.pending = len(tokens), tokens, pending
            raise RuntimeError(f"the full copy of the documents could not be read back from disk ({e}); "
                               "reset the session or load a saved one") from None
        path.unlink(missing_ok=True)

    def _reserve(self, need: int) -> None:
        """Make room for `need` cells in all (moving the copy into a larger context if needed)."""
        if need > self.model.n_ctx_train:
            raise FullCopyFull(f"the conversation would pass the model's training context ({self.model.n_ctx_train})")
        if self.ctx is not None and need <= self.ctx.n_ctx:
            return
        size = max(_pad(need), min(_pad(need + GROW), self.model.n_ctx_train))
        # a long copy decodes in ubatches whose attention weights stay bounded (as a layer-major pass):
        # 512 queries over 16K keys materialise 672 MiB with flash attention off
        n_batch = pass_ubatch(self.model, size, self.kw["n_batch"], 1, self.kw["flash_attn"])
        new = Context(self.model, size, capture=True, **{**self.kw, "n_batch": n_batch})
        if self.ctx is not None:
            try:
                new.state_set(self.ctx.state_get(), n_past=self.n)
            except BaseException:
                new.close()
                raise
            self.ctx.close()
        self.ctx = new

    def prefill(self, tokens: list[int], window: int, progress=None):
        """The documents, with the last `window` tokens' scores armed: (scores, logits)."""
        self._reserve(len(tokens) + 1)
        pf = prefill(self.ctx, tokens, window=window, progress=progress)
        self.n, self.tokens = len(tokens), list(tokens)
        return pf.scores, pf.logits

    def ask(self, tokens: list[int], window: int):
        """Append the pending answer tokens and a new turn, the last `window` tokens scored:
        (scores over every position, the last token's logits). A long copy's ubatch is bounded, so the
        window may take several (prefill sums their scores)."""
        toks = self.pending + list(tokens)
        self._reserve(self.n + len(toks) + 1)
        self.window = min(window, len(toks))
        if self.window < 1:
            raise ValueError(f"internal: a scored window of {window} for {len(toks)} tokens")
        pf = prefill(self.ctx, toks, window=self.window)
        self.n += len(toks)
        self.tokens += toks
        self.pending = []
        return pf.scores, pf.logits

    def select(self, policy: Policy, scores, window: int) -> Optional[Selection]:
        """The policy's selection from the copy's tokens (the last `window` are the observation window,
        always kept); None when they fit the budget (nothing to select)."""
        if self.n <= policy.budget or window < 1:
            return None
        return select(policy, scores, window, self.model, None)

    def pruned(self, sel: Optional[Selection], room: int):
        """A decode context holding `sel` of the copy (everything when None) and `room` free cells:
        (context, prompt cells, LayerBudgets or None). The copy is untouched: the kept cells are
        gathered from it layer by layer, or (per-layer budgets, sliding windows, keep everything) a
        duplicate of it is pruned."""
        if sel is not None:
            ctx = gather_selection(self.ctx, sel, room, **self.kw)
            if ctx is not None:
                return ctx, sel.n_kept, None
        tmp = Context(self.model, _pad(self.n + 1), **self.kw)
        try:
            tmp.state_set(self.ctx.state_get(), n_past=self.n)
        except BaseException:
            tmp.close()
            raise
        return finish_ordinary(tmp, Selection() if sel is None else sel, self.n, room, **self.kw)

    def common_prefix(self, tokens) -> int:
        """How many tokens at the start of `tokens` the copy already holds."""
        return shared_prefix(self.tokens, tokens)

    def select_tokens(self, tokens: list[int], policy: Policy) -> tuple[Optional[Selection], int]:
        """Make the copy hold exactly `tokens` (the prefix it shares with them reused, the rest decoded,
        the last window scored) and return the policy's selection from it and the number of tokens
        reused. What one prompt shares with the previous one (a document asked several questions) is
        never prefilled again, and each prompt still selects with its own window."""
        w = max(1, min(policy.window, len(tokens) - 1, self.kw["n_batch"]))
        reused = min(self.common_prefix(tokens), len(tokens) - w)
        self.truncate(reused)
        scores, _ = self.ask(tokens[reused:], w)
        self.last_selection = sel = self.select(policy, scores, w)
        return sel, reused

    def select_state(self, tokens: list[int], policy: Policy, again: bool = False) -> tuple[PrunedPrefill, int]:
        """:meth:`select_tokens`, the selection returned as state bytes with room for one more token.
        again: the kept tokens are prefilled again (:meth:`kept_context`)."""
        t0 = time.perf_counter()
        sel, reused = self.select_tokens(tokens, policy)
        return self.pruned_state(sel, t0, again, policy.name), reused

    def kept_context(self, sel: Optional[Selection], room: int, again: bool = False, end: Optional[int] = None,
                     free_copy: bool = False):
        """A decode context holding `sel` of the copy (everything when None) with `room` free cells:
        (context, prompt cells, LayerBudgets or None, prefilled again: True, False, or None where
        `again` was asked of a selection per KV head or layer, which is gathered: say KEPT_AS_COMPUTED).

        again: one set of kept tokens is prefilled again as a prompt of their own, at positions
        0..k-1 (end: end-k..end-1, so the next token follows at end); otherwise the kept cells are
        gathered as the whole copy computed them. Cells cut out of a whole document's KV bind a
        question to a neighbouring fact, the same tokens computed among themselves answer it
        (docs/BENCHMARKS.md, "the kept tokens are prefilled again"); RoPE sees only distances.
        free_copy: the copy is closed before the second prefill, which needs only its tokens, so the
        whole document's K/V and the kept tokens' are never held together (a copy used once)."""
        if not again or sel is None:
            return (*self.pruned(sel, room), False)
        if sel.shared is None:
            return (*self.pruned(sel, room), None)
        k = len(sel.shared)
        if free_copy:
            self.close()
        ctx = prefill_kept(self.model, self.tokens, sel.shared, room, renumber=True,
                           first=0 if end is None else end - k, **self.kw)
        return ctx, k, None, True

    def pruned_state(self, sel: Optional[Selection], t0: float, again: bool = False, name: str = "",
                     from_zero: bool = False, free_copy: bool = False) -> PrunedPrefill:
        """`sel` of the copy as state bytes with room for one more token (seconds counted from t0);
        again, free_copy: :meth:`kept_context`'s, the positions ending where the copy ends (from_zero:
        starting at 0, and n_tokens is then the kept count: the positions a bounded session is given
        back); `name`: the policy's, for the note when a selection per KV head is gathered instead."""
        ctx, n_kept, lb, reprefilled = self.kept_context(sel, 1, again, end=None if from_zero else self.n,
                                                         free_copy=free_copy)
        note = "" if sel is None else sel.note
        if reprefilled is None:
            note = "; ".join(x for x in (note, KEPT_AS_COMPUTED.format(name)) if x)
        return PrunedPrefill(state=ctx.take_state(), n_tokens=n_kept if reprefilled and from_zero else self.n,
                             n_kept=n_kept, selected_layer=None if sel is None else sel.layer,
                             seconds=time.perf_counter() - t0, note=note, layer_cells=None if lb is None else lb.counts,
                             reprefilled=bool(reprefilled))

    def repeat_room(self, n_prompt: int) -> int:
        """The longest chunk reconstruction_scores can repeat after a prompt of `n_prompt` tokens: prompt
        and chunk are one scored batch, at positions after the copy inside the training context."""
        return min(self.kw["n_batch"], self.model.n_ctx_train - 1 - self.n) - n_prompt

    def reconstruction_scores(self, prompt: list[int], chunk: int) -> np.ndarray:
        """Query-agnostic scores of the copy's tokens, (layers, heads, n): the model is asked to repeat
        the copy, `chunk` tokens at a time after `prompt` (a request to repeat the context), and a token
        scores the most attention any repetition gave it (the window-summed attention of each chunk,
        max over chunks). What rebuilding the context needs is what any later question may need
        (KVzip, arXiv 2505.23416). Costs about twice the copy's own prefill (each chunk attends to
        the whole copy; its scores are that attention's probabilities, summed in the graph: 54-62 s
        against 30-31 s for 4.5K tokens on 2 cores, docs/BENCHMARKS.md); the copy is left as it was."""
        if self.pending:
            raise RuntimeError("internal: reconstruction scoring with answer tokens pending")
        if chunk < 1 or chunk > self.repeat_room(len(prompt)):
            raise ValueError(f"the repeat prompt ({len(prompt)} tokens) and a chunk ({chunk}) must fit one batch "
                             f"({self.kw['n_batch']}) and the training context after the copy "
                             f"({self.model.n_ctx_train - 1 - self.n} positions)")
        n, toks = self.n, list(self.tokens)
        best: Optional[np.ndarray] = None
        try:
            for i in range(0, n, chunk):
                piece = toks[i: i + chunk]
                scores, _ = self.ask(list(prompt) + piece, len(piece))
                part = scores[:, :, :n]
                best = part.copy() if best is None else np.maximum(best, part, out=best)
                self.truncate(n)
        finally:
            self.truncate(n)
        return best

    def log_likelihood(self, tokens: list[int], logits: np.ndarray) -> np.ndarray:
        """The log-probability of each of `tokens` as the continuation of what the copy holds (`logits`:
        its last token's, as :meth:`ask` returned them): one batched pass over the whole copy, which
        is then as it was. How the unpruned conversation judges an answer decoded from a pruned one."""
        if self.pending:
            raise RuntimeError("internal: an answer scored with answer tokens pending")
        tokens = [int(t) for t in tokens]
        out = np.empty(len(tokens))
        if not tokens:
            return out
        out[0] = log_softmax(logits)[tokens[0]]
        n = self.n
        self._reserve(n + len(tokens))
        ctx = self.ctx
        step = ctx.n_batch
        try:
            for i in range(0, len(tokens) - 1, step):
                piece = tokens[i: min(i + step, len(tokens) - 1)]
                ctx.decode(piece, logits_all=True)
                for j in range(len(piece)):
                    out[i + j + 1] = log_softmax(ctx.logits(j))[tokens[i + j + 1]]
        finally:
            self._rewind(n)
        return out

    def truncate(self, n: int) -> None:
        """Forget everything after the first `n` tokens (the documents)."""
        if self.n > n:
            self._rewind(n)
        self.n, self.tokens, self.pending = n, self.tokens[:n], []

    def _rewind(self, n: int) -> None:
        """Drop the context's cells from position `n` on (the copy's own count is the caller's)."""
        self.ctx.seq_rm(n, -1)
        self.ctx.n_past = n

    def kv_bytes(self) -> int:
        """Bytes of the copy's KV (in its file while parked)."""
        if self._parked is not None:
            cell = self._parked_cell_bytes
        elif self._ctx is not None:
            cell = self._ctx.kv_info().cell_bytes_base
        else:
            return 0
        return int((self.n + len(self.pending)) * cell)

    def state_size(self) -> int:
        """Length of the copy's KV as state bytes (what :meth:`write_state` writes)."""
        if self._parked is not None:
            return state_file_size(self._parked, self.tokens)
        return 0 if self._ctx is None or self.n == 0 else self._ctx.state_size()

    def write_state(self, out) -> int:
        """The copy's KV as state bytes written to the binary stream `out`; a parked copy's are copied
        from its file a chunk at a time (not loaded back, never whole in memory). Returns the bytes."""
        if self._parked is not None:
            return copy_state_from_file(self._parked, self.tokens, out)
        data = b"" if self._ctx is None or self.n == 0 else self._ctx.state_get()
        out.write(data)
        return len(data)

    def load(self, src, size: int, tokens, pending) -> None:
        """A copy of `tokens` (and `pending` answer tokens) from `size` state bytes read from the binary
        stream `src`, in place of this one. An on-disk copy goes straight to its file, parked (no
        context, the state never whole in memory: a long document's session loads in bounded memory;
        a damaged state is found when the copy is first used); otherwise it is loaded into a context."""
        self.close()
        tokens, pending = [int(t) for t in tokens], [int(t) for t in pending]
        if tokens and self.on_disk:
            path = self._park_path()
            try:
                write_state_file(path, tokens, src, size)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
            self._parked, self._parked_cell_bytes = path, self._cell_bytes()
        elif tokens:
            self._reserve(len(tokens) + len(pending) + 1)
            self.ctx.state_set(src.read(size), n_past=len(tokens))
        self.n, self.tokens, self.pending = len(tokens), tokens, pending

    def save_file(self, path) -> None:
        """The copy's tokens and KV written to `path` by llama.cpp, a tensor at a time (the pending answer
        tokens are not in it)."""
        self.ctx.state_save_file(path, self.tokens)

    def load_file(self, path, tokens, pending=()) -> None:
        """The copy of `tokens` saved by :meth:`save_file` in place of this one, with `pending` answer
        tokens (RuntimeError, and the copy left empty, when the file holds anything else)."""
        if self._parked is not None:  # the parked copy is replaced, not loaded first
            self._parked.unlink(missing_ok=True)
            self._parked = None
        if self._ctx is not None:
            self.truncate(0)
        self.n, self.tokens, self.pending = 0, [], []
        self._reserve(len(tokens) + len(pending) + 1)
        try:
            self._ctx.state_load_file(path, tokens)
        except BaseException:
            self._ctx.seq_rm(0, -1)  # nothing half-loaded stays
            self._ctx.n_past = 0
            raise
        self.n, self.tokens, self.pending = len(tokens), list(tokens), list(pending)

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        self._parked = None
        if self._cleanup is not None:  # the directory and any file in it
            self._cleanup()
            self._cleanup, self._dir = None, None

