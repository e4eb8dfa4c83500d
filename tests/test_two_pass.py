"""Two-pass support (issue 3 slice): batches with position gaps (patches/0002) and the early exit
of the first pass (pyasl_capture_set_stop_layer)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tinymodels  # noqa: E402

from pyasl.engine import Context, Model, prefill  # noqa: E402

pytestmark = pytest.mark.native


@pytest.fixture(scope="module")
def tiny() -> Model:
    return Model(tinymodels.tiny_model_path("llama", n_layer=6))


def toks(model: Model, n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(4, model.n_vocab, n)]


def test_gap_context_without_gaps_is_ordinary(tiny):
    t = toks(tiny, 80)
    with Context(tiny, 256, n_batch=64) as a, Context(tiny, 256, n_batch=64, allow_pos_gaps=True) as b:
        a.decode(t[:64], logits_last=False); a.decode(t[64:])
        b.decode(t[:64], positions=list(range(64)), logits_last=False); b.decode(t[64:], positions=list(range(64, 80)))
        assert np.array_equal(a.logits(), b.logits())


def test_gap_positions_decode_and_continue(tiny):
    t = toks(tiny, 120, seed=1)
    kept = sorted(set(range(0, 100, 3)) | set(range(100, 120)))
    with Context(tiny, 256, n_batch=64, allow_pos_gaps=True) as c:
        for i in range(0, len(kept), 64):
            pos = kept[i:i + 64]
            c.decode([t[p] for p in pos], positions=pos, logits_last=i + 64 >= len(kept))
        assert c.n_past == 120
        assert np.isfinite(c.logits()).all()
        assert list(c.cell_positions(0, len(kept))) == kept
        c.decode([5])  # continues at position 120
        assert np.isfinite(c.logits()).all()
        # going backwards is still refused, with a message, not a crash
        with pytest.raises(RuntimeError, match="rejected"):
            c.decode([5], pos0=50)


def test_gaps_refused_without_the_flag(tiny):
    with Context(tiny, 256, n_batch=64) as c:
        c.decode(toks(tiny, 10))
        with pytest.raises(RuntimeError, match="rejected"):
            c.decode([7], pos0=20)


def test_early_exit_scores_equal_full_prefill_layers(tiny):
    t = toks(tiny, 150, seed=2)
    W, L = 16, 2
    with Context(tiny, 256, n_batch=64, capture=True) as full:
        ref = prefill(full, t, window=W)
    with Context(tiny, 256, n_batch=64, capture=True) as cut:
        got = prefill(cut, t, window=W, stop_layer=L)
        names = sorted(n for n in cut.captured() if n.startswith("pyasl_scores-"))
    assert names == [f"pyasl_scores-{i}" for i in range(L + 1)]
    assert got.scores.shape == (L + 1, tiny.n_head, 150)
    assert np.array_equal(got.scores, ref.scores[:L + 1])
