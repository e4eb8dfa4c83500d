"""Helpers shared by the test modules: random prompts for tiny models, and the check that compacting
the KV cache (rows moved to the front, `Context.kv_keep`) equals removing the dropped cells in place
(`Context.seq_rm`)."""
from __future__ import annotations

import numpy as np

import tinymodels
from pyasl.engine import Context, Model

DROP = [(5, 31), (70, 96), (120, 133)]  # position ranges dropped by keep_vs_seq_rm


def random_tokens(model: Model, n: int, seed: int = 0) -> list[int]:
    """n random tokens of a tiny model (BOS first)."""
    rng = np.random.default_rng(seed)
    t = [int(x) for x in rng.integers(4, model.n_vocab, n)]
    t[0] = tinymodels.BOS_ID
    return t


def keep_set(n: int, drop=DROP) -> np.ndarray:
    """Positions 0..n-1 without the ranges in `drop`."""
    return np.setdiff1d(np.arange(n), np.concatenate([np.arange(a, b) for a, b in drop])).astype(np.int32)


def keep_vs_seq_rm(model: Model, toks: list[int], n: int, fa: bool, **ctx_kw):
    """Decode toks[:n], then (a) nothing, (b) seq_rm of DROP, (c) kv_keep of the rest; decode 3 more
    tokens. Returns (layer-0 attention keep vs seq_rm, keep vs unpruned, [(logits seq_rm, logits keep)])."""
    keep = keep_set(n)
    res, att0 = {}, {}
    for how in ("full", "seq_rm", "keep"):
        with Context(model, 256, flash_attn=fa, capture=True, **ctx_kw) as ctx:
            assert ctx.kv_info().v_trans == (0 if fa else 1)
            for i in range(0, n, ctx.n_batch):
                ctx.decode(toks[i: min(n, i + ctx.n_batch)], logits_last=False)
            if how == "seq_rm":
                for a, b in DROP:
                    assert ctx.seq_rm(a, b)
            elif how == "keep":
                ctx.kv_keep(keep)
                np.testing.assert_array_equal(ctx.cell_positions(0, len(keep)), keep)
            assert ctx.kv_info().used_base == (n if how == "full" else len(keep))
            ctx.add_capture_prefix("kqv_out")
            ctx.decode(toks[n:n + 1], pos0=n)
            first = ctx.logits()
            att0[how] = ctx.captured()["kqv_out-0"]
            ctx.decode(toks[n + 1:n + 3], pos0=n + 1)
            res[how] = [first, ctx.logits()]
    d_att = float(np.abs(att0["keep"] - att0["seq_rm"]).max())
    d_att_full = float(np.abs(att0["keep"] - att0["full"]).max())
    return d_att, d_att_full, list(zip(res["seq_rm"], res["keep"]))
