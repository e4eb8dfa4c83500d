"""The passes every prefill strategy is built from, and the cache operations that prune.

* :func:`prefill` -- ordinary: every layer over every token, window scores on the last ubatch;
* :func:`layer_major_pass` -- each layer over the whole prompt before the next, until the
  policy's decision says stop;
* :func:`propagate` -- one-shot token-selective propagation: after the selection layer only the kept
  tokens' hidden states go through the deeper layers (:func:`propagate_ranked`: more tokens than
  the budget, each deeper layer keeping its own sets of them);
* :func:`prefill_kept` -- the second pass of a two-pass policy: only the kept tokens, at their
  original positions;
* :func:`apply_selection`, :func:`shrink_context`, :func:`move_to_context` -- prune a cache to a
  policy's selection and move it into a context sized to what is kept.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .. import _native
from ..arch import swa_window
from ..policies import Selection
from .context import Context, _pad
from .model import Model


@dataclass
class Prefill:
    logits: np.ndarray
    scores: Optional[np.ndarray]  # (n_layer, n_head, n_prompt)
    seconds: float


def prefill(ctx: Context, tokens: list[int], window: int = 0,
            progress: Optional[Callable[[int, int], None]] = None, stop_layer: Optional[int] = None,
            score: str = "attention") -> Prefill:
    """Ordinary prefill of `tokens` after what ctx holds (its next position). With window > 0 the
    last `window` tokens go with scores armed (`score`: context.SCORES), in one ubatch when they fit
    ctx's, else a ubatch at a time with each one's window scores summed (what one ubatch sums: each
    query's attention row is the same); the scores cover every position ctx holds.

    stop_layer: compute only layers 0..stop_layer for every ubatch (first pass of a two-pass
    policy); the logits are then meaningless and scores cover stop_layer + 1 layers."""
    n, n0, nb = len(tokens), ctx.n_past, ctx.n_batch
    if not 0 <= window <= n:
        raise ValueError(f"a scored window of {window} for {n} tokens")
    if stop_layer is not None:
        ctx.set_stop_layer(stop_layer)
    layers = None if stop_layer is None else stop_layer + 1
    t0 = time.perf_counter()
    head = n - window
    for i in range(0, head, nb):
        end = min(i + nb, head)
        ctx.decode(tokens[i:end], logits_last=(not window and end == n))
        if progress:
            progress(end, n)
    earlier = None  # the summed scores of the window's ubatches before its last
    for i in range(head, n, nb) if window else ():
        end = min(i + nb, n)
        ctx.arm_scores(end - i, score)
        try:
            ctx.decode(tokens[i:end], logits_last=end == n)
        finally:
            ctx.disarm_scores()
        if end < n:  # read now: the next ubatch's capture replaces it
            if earlier is None:
                earlier = np.zeros((layers or ctx.model.n_layer, ctx.model.n_head, n0 + n), dtype=np.float32)
            earlier[:, :, : n0 + end] += ctx.window_scores(n0 + end, layers)
        elif progress:
            progress(n, n)
    logits = ctx.logits()
    secs = time.perf_counter() - t0
    if stop_layer is not None:
        ctx.set_stop_layer(None)
    scores = None
    if window:
        scores = ctx.window_scores(n0 + n, layers)
        if earlier is not None:
            scores += earlier
    return Prefill(logits=logits, scores=scores, seconds=secs)


PASS_ATTN_BYTES = 128 << 20  # a layer-major pass's attention weights per ubatch, flash attention off
PASS_FA_UBATCH = 256  # a layer-major pass's queries per ubatch, flash attention on


def pass_ubatch(model: Model, n: int, n_batch: int, window: int, flash_attn: bool) -> int:
    """The ubatch of a layer-major pass over n tokens. A pass holds one layer's K/V, so what one
    ubatch's graph touches is its peak. With flash attention off a ubatch of u queries materialises
    u x n x n_head attention weights (F32, and an F16 copy for KQ.V): 672 MiB for 512 queries at 16K
    tokens on Qwen2.5-0.5B, 3.5 times its whole-prompt K/V; the pass takes as many queries per ubatch
    as fit in PASS_ATTN_BYTES. Flash attention never materialises them, but a ubatch's activations
    (feed-forward, mask) still are the pass's largest buffer: PASS_FA_UBATCH queries (Qwen2.5 at 4K,
    q8_0 K/V: asl peaked at 675 MiB with 512, 651 with 256, stock at 670; docs/BENCHMARKS.md). Either way
    a multiple of 32, at least 32 and the window, at most n_batch."""
    if flash_attn:
        u = PASS_FA_UBATCH
    else:
        per_query = max(1, n * model.n_head * 6)
        u = PASS_ATTN_BYTES // per_query // 32 * 32
    return min(n_batch, max(32, window, u))


def _pass_chunks(n: int, n_batch: int, window: int) -> list[tuple[int, int]]:
    """The ubatches of a layer-major pass over n tokens: n_batch at a time, the last `window` alone
    (their window scores are captured)."""
    head = n - window
    return [(i, min(i + n_batch, head)) for i in range(0, head, n_batch)] + [(head, n)]


def _run_layer(ctx: Context, l: int, chunks: list[tuple[int, int]],
               run: Callable[[int, int, bool], None], out: Optional[np.ndarray]) -> None:
    """Layer l of ctx over every ubatch of :func:`_pass_chunks` (``run(a, b, is_window)`` decodes tokens
    a..b-1), window scores armed on the last one, the window; ``out[a:b]`` gets each ubatch's output,
    the next layer's input (None: the last layer, whose ubatches give logits)."""
    ctx.set_layer_range(l, l + 1)
    ctx.set_hidden_output(None if out is None else l + 1)
    last_a = chunks[-1][0]
    for a, b in chunks:
        win = a == last_a
        if win:
            ctx.arm_scores(b - a)
        try:
            run(a, b, win)
        finally:
            if win:
                ctx.disarm_scores()
        if out is not None:
            out[a:b] = ctx.hidden(b - a)


def layer_major_pass(model: Model, tokens: list[int], window: int, decide,
                      progress: Optional[Callable[[int, int], None]] = None, keep_all_hidden: bool = False,
                      on_layer: Optional[Callable[[int, Context, np.ndarray], None]] = None, one_layer_kv: bool = False,
                      **ctx_kw):
    """Run layers 0, 1, ... each over every ubatch of `tokens` (window scores armed on the last
    ubatch, the last `window` tokens) until decide(l, scores) returns (True, selection).

    Returns (A, scores, Hs, stop, selection): A holds the full KV of layers 0..stop; scores is
    (n_layer, n_head, n) with rows 0..stop filled; Hs is a list of (n, n_embd) hidden states, the
    input of layer l + 1 for each layer l that ran (only the last one unless keep_all_hidden);
    stop is None when decide never said stop (every layer ran; A's logits are full depth).
    on_layer(l, A, scores): called after layer l ran, before decide.
    one_layer_kv: A stores one layer of K/V, every layer overwriting the last one's (patches/0005), for
    a caller that takes what it needs of each layer in on_layer or needs none of A's K/V.
    ctx_kw: Context settings (n_batch, n_threads, flash_attn, type_k, type_v); A's ubatch is
    :func:`pass_ubatch`'s.
    """
    N, n = model.n_layer, len(tokens)
    n_batch = pass_ubatch(model, n, ctx_kw.get("n_batch", 512), window, ctx_kw.get("flash_attn", False))
    A = Context(model, _pad(n + 1), capture=True, one_layer_kv=one_layer_kv, **{**ctx_kw, "n_batch": n_batch})
    chunks = _pass_chunks(n, n_batch, window)
    scores = np.zeros((N, model.n_head, n), dtype=np.float32)
    Hs: list[np.ndarray] = []
    H = None
    stop, sel = None, None
    try:
        for l in range(N):
            last = l == N - 1
            A.set_reuse_cells(l > 0)
            # the next layer's input; each ubatch's output replaces its own input (already consumed)
            # unless every layer's hidden states are kept
            newH = None if last else H if H is not None and not keep_all_hidden else \
                np.empty((n, model.n_embd), dtype=np.float32)

            def run(a: int, b: int, win: bool, l: int = l, H: Optional[np.ndarray] = H) -> None:
                if l == 0:
                    A.decode(tokens[a:b], pos0=a, logits_last=win)
                else:
                    A.decode_hidden(H[a:b], list(range(a, b)), logits_last=win)

            _run_layer(A, l, chunks, run, newH)
            scores[l] = A.layer_scores(l, n)
            H = newH
            if H is not None:
                if keep_all_hidden:
                    Hs.append(H)
                else:
                    Hs[:] = [H]
            if progress:
                progress((l + 1) * n, N * n)
            if on_layer is not None:
                on_layer(l, A, scores)
            done, s = decide(l, scores)
            if done:
                stop, sel = l, s
                break
        A.set_layer_range(0, N)
        A.set_reuse_cells(False)
        A.set_hidden_output(None)
    except BaseException:
        A.close()
        raise
    return A, scores, Hs, stop, sel


def prefill_kept(model: Model, tokens: list[int], kept, max_tokens: int, renumber: bool = False, first: int = 0,
                 **ctx_kw) -> Context:
    """Second pass of asl-2pass / gemfilter: a context of len(kept) + max_tokens cells holding only the
    kept tokens, prefilled through every layer at their original positions (renumber: as a new prompt,
    positions first..first+k-1; decoding then continues at first+k) (logits: the last one).
    ctx_kw: Context settings (n_batch, n_threads, flash_attn, type_k, type_v)."""
    kept_l = [int(x) for x in kept]
    n_batch = ctx_kw.setdefault("n_batch", 512)
    ctx = Context(model, _pad(len(kept_l) + max_tokens), allow_pos_gaps=True, **ctx_kw)
    for i in range(0, len(kept_l), n_batch):
        pos = kept_l[i: i + n_batch]
        at = list(range(first + i, first + i + len(pos))) if renumber else pos
        ctx.decode([tokens[p] for p in pos], positions=at, logits_last=i + n_batch >= len(kept_l))
    return ctx


def shrink_context(ctx: Context, n_kept: int, n_past: int, max_tokens: int, n_batch: Optional[int] = None) -> Context:
    """Move a pruned sequence (n_kept cells, next position n_past) into a new context sized to the
    kept cells + max_tokens (+ the sliding-window cells in use), so the memory is really freed.
    Closes ctx; the new context has ctx's settings (Context.settings), n_batch if given."""
    state = ctx.state_get()
    swa_used = ctx.kv_info().used_swa
    model, kw = ctx.model, ctx.settings()
    if n_batch is not None:
        kw["n_batch"] = n_batch
    ctx.close()
    new = Context(model, _pad(max(n_kept, swa_used) + max_tokens), **kw)
    new.state_set(state, n_past=n_past)
    return new


def kv_bytes(info: _native.PyaslKvInfo, n_base: int, n_swa: int) -> int:
    """Bytes of n_base cells of the base cache and n_swa of the sliding-window cache."""
    return int(n_base * info.cell_bytes_base + n_swa * info.cell_bytes_swa)


@dataclass
class LayerBudgets:
    """Per-layer budgets applied to a context (:func:`apply_selection` of a ``per_layer`` selection)."""

    counts: np.ndarray           # (n_layer,) tokens kept per layer (the layer's budget)
    prompt_cells: int            # P = max(counts): prompt cells every layer's cache holds
    meta: np.ndarray             # (P,) positions of the P cells' metadata (for set_kv_layer_cells)
    info: dict = field(default_factory=dict)  # method, parameters, budgets (Selection.budgets)

    def to_json(self, cell_bytes: Optional[np.ndarray] = None) -> dict:
        d = dict(self.info)
        d["budgets"] = [int(x) for x in self.counts]
        d["prompt_cells"] = int(self.prompt_cells)
        if cell_bytes is not None:
            d["kv_bytes_prompt_cells"] = int(self.prompt_cells * int(np.sum(cell_bytes)))
        return d

    def kv_bytes(self, ctx: Context) -> int:
        """Bytes of the K/V rows the layers keep: sum_l counts[l] * (bytes of one cell of layer l)."""
        return int(np.sum(np.asarray(self.counts, dtype=np.int64) * ctx.kv_layer_cell_bytes()))


def apply_selection(ctx: Context, sel: Selection) -> Optional[LayerBudgets]:
    """Prune ctx (one sequence whose positions the selection's indices are) to `sel`: one set for
    every layer and KV head (kv_keep), a set per layer and KV head (kv_keep_per_head) or per-layer
    budgets (kv_keep_per_layer; returns their LayerBudgets). Keeping everything is a no-op."""
    if sel.shared is not None:
        ctx.kv_keep(sel.shared)
    elif sel.per_head is not None:
        ctx.kv_keep_per_head(sel.per_head)
    elif sel.per_layer is not None:
        ctx.kv_keep_per_layer(sel.per_layer)
        p_cells, _ = ctx.kv_layer_cells()
        cache_layers = np.flatnonzero(ctx.kv_layer_cell_bytes())
        meta = ctx.cell_positions(int(cache_layers[0]) if cache_layers.size else 0, p_cells)
        return LayerBudgets(counts=sel.counts, prompt_cells=int(p_cells), meta=meta, info=dict(sel.budgets or {}))
    return None


def move_to_context(ctx: Context, n_prompt: int, n_cells: int, **context_kwargs) -> Context:
    """Move ctx's sequence into a new Context of ``n_cells`` cells (padded to 256) through
    llama_state_seq_get/set, closing ``ctx``; per-layer counts are set again on the new context.
    ``context_kwargs`` go to Context (n_batch, n_threads, flash_attn, ...)."""
    p_cells, counts = ctx.kv_layer_cells()
    state = ctx.state_get()
    model = ctx.model
    ctx.close()
    new = Context(model, _pad(n_cells), **context_kwargs)
    new.state_set(state, n_past=n_prompt)
    if p_cells:
        new.set_kv_layer_cells(counts)
    return new


def run_deeper_layers(ctx: Context, H: np.ndarray, positions, first_layer: int) -> np.ndarray:
    """Run the tokens at `positions` (their rows of H, the input of layer `first_layer`) through layers
    first_layer..N-1 of ctx, a ubatch at a time, into ctx's next cells; returns the last one's logits.
    ctx runs every layer again afterwards. The ubatch is :func:`pass_ubatch`'s: ctx is the decode
    context, whose ubatch of n_batch would touch a larger compute buffer than the pass before it."""
    pos_all = [int(p) for p in positions]
    N = ctx.model.n_layer
    nb = pass_ubatch(ctx.model, ctx.n_ctx, ctx.n_batch, 1, ctx.flash_attn)
    ctx.set_layer_range(first_layer, N)
    for a in range(0, len(pos_all), nb):
        pos = pos_all[a: a + nb]
        ctx.decode_hidden(H[pos], pos, logits_last=a + nb >= len(pos_all))
    logits = ctx.logits()
    ctx.set_layer_range(0, N)
    return logits


class Gathered:
    """A decode context filled layer by layer from other contexts' rows: k prompt cells and `room`
    free cells after them. Each :meth:`layer` gathers one layer's kept rows (per KV head) into cells
    0..k-1; :meth:`done` gives every cell the largest position any layer keeps there (decoding goes
    on after the last) and hands the context over. Closed when the block it is used in raises."""

    def __init__(self, model: Model, k: int, room: int, **ctx_kw):
        self.ctx = Context(model, _pad(k + room), allow_pos_gaps=True, **ctx_kw)
        self._meta = np.full(k, -1, dtype=np.int64)  # per cell, the largest position any layer's head keeps there

    def layer(self, src: Context, il: int, sets: np.ndarray) -> None:
        """Layer il's rows of src's positions ``sets`` ((n_head_kv, k), sorted per KV head)."""
        self.ctx.kv_gather_layer_from(src, il, sets)
        np.maximum(self._meta, sets.max(axis=0), out=self._meta)

    def done(self) -> Context:
        self.ctx.set_cell_positions(self._meta)
        return self.ctx

    def __enter__(self) -> "Gathered":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self.ctx.close()


def gather_selection(src: Context, sel: Selection, room: int, **ctx_kw) -> Optional[Context]:
    """A new context holding `sel`'s cells of src (one sequence, positions as the selection's indices)
    gathered layer by layer, and `room` free cells; src untouched. No duplicate of src's K/V and no
    state bytes (pruning a duplicate held the whole prompt's K/V three times: src, the duplicate and
    its state). None where a gather does not apply: keep everything, per-layer budgets, a
    sliding-window cache, or keys that depend on the cell (multi-axis RoPE, ALiBi: the gather moves
    rows per KV head). ctx_kw: Context settings."""
    model = src.model
    if model.n_swa > 0 or (sel.shared is None and sel.per_head is None) \
            or model.pruning_unsupported(per_head=True) is not None:
        return None
    with Gathered(model, sel.n_kept, room, **ctx_kw) as g:
        shared = None if sel.shared is None else np.tile(np.asarray(sel.shared, dtype=np.int64), (model.n_head_kv, 1))
        for l in range(model.n_layer):
            g.layer(src, l, shared if shared is not None else sel.per_head[l])
        return g.done()


def propagate_ranked(D: Gathered, H: np.ndarray, prop, stop: int, n: int, window: int,
                     layer_set: Callable[[np.ndarray], np.ndarray], **ctx_kw) -> np.ndarray:
    """Propagation wider than the budget (pyasl.policies.propagation): the `prop` positions (sorted,
    the window last) run through layers stop+1..N-1, layer by layer, in a scratch context that stores
    one layer of K/V (as the pass before the selection layer does) with window scores captured; after
    each layer ran it keeps ``prop[layer_set(its (n_head, len(prop)) scores)]`` ((n_head_kv, k) per KV
    head), gathered into D before the next layer overwrites the scratch. The ubatch
    is :func:`pass_ubatch`'s for len(prop) tokens. Returns the last prompt token's full-depth logits.
    ctx_kw: Context settings."""
    model = D.ctx.model
    N = model.n_layer
    prop = np.asarray(prop, dtype=np.int64)
    m, positions = len(prop), prop.tolist()
    n_batch = pass_ubatch(model, m, ctx_kw.get("n_batch", 512), window, ctx_kw.get("flash_attn", False))
    P = Context(model, _pad(m + 1), capture=True, allow_pos_gaps=True, one_layer_kv=True,
                **{**ctx_kw, "n_batch": n_batch})
    chunks = _pass_chunks(m, n_batch, window)
    X = H[prop]  # the propagated tokens' input of the next layer, replaced by its output layer by layer
    try:
        for l in range(stop + 1, N):
            last = l == N - 1
            P.set_reuse_cells(l > stop + 1)
            _run_layer(P, l, chunks, lambda a, b, win: P.decode_hidden(X[a:b], positions[a:b], logits_last=win),
                       None if last else X)
            D.layer(P, l, prop[layer_set(P.layer_scores(l, n)[:, prop])])
        return P.logits()
    finally:
        P.close()


def propagation_work(stop: int, n: int, n_prop: int, n_layer: int) -> float:
    """Share of a full prefill's layer x token work when every token runs layers 0..stop and n_prop
    tokens the rest."""
    return ((stop + 1) * n + (n_layer - stop - 1) * n_prop) / (n_layer * n)


def propagate(model: Model, A: Context, H: Optional[np.ndarray], kept: list[int], early: Selection, stop: int, n: int,
              max_tokens: int, last_logits: Optional[np.ndarray] = None, **ctx_kw):
    """One-shot token-selective propagation after layer `stop` (A: the full KV of layers 0..stop;
    H: the input of layer stop + 1 for every prompt token). Layers <= stop keep what `early` says
    of their own KV (per KV head, or per-layer budgets); the kept tokens go through layers
    stop+1..N-1 at their positions.
    Sliding-window models: the last n_swa prompt positions are propagated too (every
    sliding-window layer holds them, as after an ordinary prefill); the global cache keeps the kept
    tokens. Returns (decode context of the kept cells + max_tokens, the last prompt token's
    full-depth logits (when stop is the last layer: last_logits, else A's), the LayerBudgets or
    None, the number of tokens propagated).
    ctx_kw: Context settings (n_batch, n_threads, flash_attn, type_k, type_v). Closes A."""
    N, k = model.n_layer, len(kept)
    win = swa_window(model, n)  # None, or the positions the sliding-window cache keeps
    try:
        if early.per_layer is not None and win is not None:
            raise ValueError("per-layer budgets do not support sliding-window models yet")
        # sliding-window layers live in the SWA cache, which keeps its window (kv_keep_per_head ignores them)
        lb = apply_selection(A, early)
        if win is not None:
            A.kv_keep_swa(win)
        cells = k if lb is None else lb.prompt_cells  # prompt cells of the decode context
        if stop == N - 1:
            logits = A.logits() if last_logits is None else last_logits
            if lb is not None:  # per-layer counts are set again on the new context
                return move_to_context(A, n, cells + max_tokens, **ctx_kw), logits, lb, k
            return shrink_context(A, k, n, max_tokens, n_batch=ctx_kw.get("n_batch")), logits, lb, k
        # sliding-window models: the window's tokens are propagated too, so every sliding-window
        # layer holds them; B's global cache is then pruned back to the kept tokens
        prop = kept if win is None else sorted(set(kept) | set(int(p) for p in win))
        B = Context(model, _pad(max(len(prop), cells + max_tokens)), allow_pos_gaps=True, **ctx_kw)
        try:
            logits = run_deeper_layers(B, H, prop, stop + 1)
            if win is not None:
                if len(prop) != k:
                    B.kv_keep(np.asarray(kept))
                B.kv_keep_swa(win)
                B.kv_copy_swa_cells_from(A, 0, stop + 1, len(win))
            B.kv_copy_cells_from(A, 0, stop + 1, cells)
            if lb is not None:
                # cells k..P-1 (rows of layers <= stop only) join the metadata of A's compaction
                B.set_kv_layer_cells(lb.counts, meta=lb.meta)
        except BaseException:
            B.close()
            raise
        return B, logits, lb, len(prop)
    finally:
        A.close()
