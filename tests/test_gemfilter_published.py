"""GemFilter as published (issue 22, faithful baselines): the last query's raw q.k products at the
filter layer (score mode 2 of native/pyasl_graph.cpp), summed over heads, averaged over 5
neighbours, top-k; the kept tokens prefilled again as a new prompt at positions 0..k-1."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tinymodels  # noqa: E402
from kvcheck import random_tokens as toks  # noqa: E402

import pyasl  # noqa: E402
from pyasl import policies as P  # noqa: E402
from pyasl.engine import Context, prefill, strategies  # noqa: E402
from pyasl.policies.scoring import pool_scores  # noqa: E402

pytestmark = pytest.mark.native

N_LAYER = tinymodels.DENSE_N_LAYER


def _scores(m, t, score, window=1):
    with Context(m, 512, capture=True, n_batch=128) as ctx:
        return prefill(ctx, t, window=window, score=score).scores


def test_qk_scores_are_the_logits_of_the_attention(tiny_dense):
    """For the last query every cell is visible, so per head softmax(q.k / sqrt(d)) is the attention
    pyasl's default scores capture: the raw products are the attention's logits."""
    m = tiny_dense
    t = toks(m, 200, seed=1)
    att, qk = _scores(m, t, "attention"), _scores(m, t, "qk")
    assert att.shape == qk.shape == (m.n_layer, m.n_head, len(t))
    assert (qk < 0).any()  # raw products, not probabilities
    z = qk / np.sqrt(m.n_embd // m.n_head)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    np.testing.assert_allclose(z / z.sum(axis=-1, keepdims=True), att, rtol=2e-3, atol=1e-6)


def test_published_selection_and_renumbered_positions(tiny_dense):
    m = tiny_dense
    t = toks(m, 300, seed=2)
    pol = P.GemFilterPublished(layer=2, budget=64)
    assert (pol.window, pol.kernel, str(pol.span), pol.strategy(m)) == (1, 5, "token", "two-pass")
    qk = _scores(m, t, "qk")[2]
    ranked = pool_scores(qk.sum(axis=0)[:-1].astype(np.float64), 5)
    want = np.sort(np.concatenate([np.argsort(-ranked, kind="stable")[:63], [len(t) - 1]]))
    pr = strategies.run(m, t, pol, max_tokens=4, n_batch=128)
    try:
        np.testing.assert_array_equal(pr.kept, want)
        assert pr.n_kept == 64 and pr.prefill_work < 1
        # the kept tokens went in as a new prompt: positions 0..63, decoding goes on at 64
        for il in range(m.n_layer):
            assert list(pr.ctx.cell_positions(il, 64)) == list(range(64))
        with Context(m, 256, n_batch=128) as fresh:
            ref = prefill(fresh, [t[i] for i in want])
            np.testing.assert_allclose(pr.logits, ref.logits, rtol=1e-4, atol=1e-4)
            pr.ctx.decode([7])
            fresh.decode([7])
            np.testing.assert_allclose(pr.ctx.logits(), fresh.logits(), rtol=1e-4, atol=1e-4)
    finally:
        pr.ctx.close()


def test_conversations_refuse_it(tiny_dense):
    pol = P.GemFilterPublished(budget=64)
    with pytest.raises(ValueError, match="new prompt"):
        pyasl.Session(tiny_dense, policy=pol, n_ctx=512)
    with pytest.raises(ValueError, match="new prompt"):
        strategies.prefill_state(tiny_dense, toks(tiny_dense, 300), pol)


def test_options_and_round_trip():
    pol = P.policy_from_options("gemfilter-published", budget=256, window=32, layer=5)
    assert pol.to_dict() == {"name": "gemfilter-published", "layer": 5, "budget": 256, "span": "token"}
    assert P.Policy.from_dict(pol.to_dict()) == pol
    with pytest.raises(ValueError, match="does not take window"):
        P.make_policy("gemfilter-published", budget=256, window=8)


def test_generate_on_smollm2(smollm2):
    text = (Path(__file__).resolve().parent.parent / "examples" / "long_prompt.txt").read_text()
    r = pyasl.generate(smollm2, smollm2.tokenize(text), policy="gemfilter-published", budget=256, max_tokens=8)
    assert r.n_kept == 256 and 0 < r.prefill_work < 1 and r.text


def test_cli_keeps_its_token_default():
    """--span not given: each policy's own default (gemfilter-published: token; others: forward:32)."""
    from pyasl.apps.cli.common import PolicyOptions, _parse_span

    assert _parse_span(None, None, None) is None
    for name, want in (("gemfilter-published", "token"), ("gemfilter", str(P.DEFAULT_SPAN))):
        opts = PolicyOptions(name, budget=256, window=32, tau=None, layer=None, span=_parse_span(None, None, None))
        assert str(opts.build().span) == want
