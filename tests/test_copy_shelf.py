"""Full copies parked on disk (engine/copy_shelf.py): a parked copy comes back with the same tokens and
KV (the same scores and logits for the next question as if it had never left), the shelf keeps at
most its capacity (least recently used dropped, a copy of the same document with another question
superseded), and a disk that cannot take a copy costs a later prefill, not the answer."""
from __future__ import annotations

import io
import numpy as np
import pytest

import pyasl
from pyasl.engine.copy_shelf import CopyShelf
from pyasl.engine.full_copy import FullCopy
from tinymodels import tiny_model_path


@pytest.fixture(scope="module")
def tiny():
    return pyasl.Model(tiny_model_path("llama", n_layer=4))


def _doc(tiny, seed: int, n: int = 300) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(10, tiny.n_vocab - 10, size=n)]


def _ask(fc: FullCopy, shelf: CopyShelf, tokens):
    shelf.prepare(fc, tokens)
    reused = min(fc.common_prefix(tokens), len(tokens) - 4)
    fc.truncate(reused)
    scores, logits = fc.ask(tokens[reused:], 4)
    return reused, scores, logits


def test_a_parked_copy_comes_back_as_it_left(tiny, tmp_path):
    a, b = _doc(tiny, 1), _doc(tiny, 2)
    qa, qb = [5, 6, 7, 8, 9], [9, 8, 7, 6, 5]
    fc, ref = FullCopy(tiny, n_batch=128), FullCopy(tiny, n_batch=128)
    shelf = CopyShelf(2, directory=tmp_path, min_tokens=64)
    try:
        assert _ask(fc, shelf, a + qa)[0] == 0
        assert _ask(fc, shelf, b + qb)[0] == 0 and len(shelf) == 1  # a parked
        reused, scores, logits = _ask(fc, shelf, a + qb)
        assert reused == len(a) and shelf.loads == 1 and len(shelf) == 1  # a back, b parked
        # the same question on a copy that never left
        ref.prefill(a, 4)
        s2, l2 = ref.ask(qb, 4)
        np.testing.assert_array_equal(scores, s2)
        np.testing.assert_array_equal(logits, l2)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["copy-1.state"]
    finally:
        fc.close()
        ref.close()
        shelf.close()
    assert not list(tmp_path.iterdir())  # a directory the caller gave is emptied, not removed
    assert tmp_path.exists()


def test_capacity_and_superseded_copies(tiny):
    docs = [_doc(tiny, s) for s in range(4)]
    fc = FullCopy(tiny, n_batch=128)
    shelf = CopyShelf(2, min_tokens=64)
    try:
        for d in docs[:3]:
            _ask(fc, shelf, d + [5, 6, 7, 8, 9])
        assert [p.tokens[:300] for p in shelf._parked] == docs[:2]
        _ask(fc, shelf, docs[3] + [1, 2, 3, 4, 5])
        assert [p.tokens[:300] for p in shelf._parked] == docs[1:3]  # the oldest dropped
        _ask(fc, shelf, docs[1] + [1, 2, 3, 4, 5])  # docs[1] back from the shelf
        _ask(fc, shelf, docs[1] + [9] * 80)  # the same document, another question: short tail, not parked
        assert [p.tokens[:300] for p in shelf._parked] == [docs[2], docs[3]] and shelf.loads == 1
        d = shelf.directory
    finally:
        fc.close()
        shelf.close()
    assert not d.exists()  # its own temporary directory is removed


def test_a_disk_that_refuses_the_copy_costs_a_prefill_not_the_answer(tiny, tmp_path):
    fc = FullCopy(tiny, n_batch=128)
    shelf = CopyShelf(1, directory=tmp_path / "gone", min_tokens=64)
    (tmp_path / "gone").rmdir()
    try:
        _ask(fc, shelf, _doc(tiny, 1) + [5, 6, 7, 8])
        with pytest.warns(UserWarning, match="could not park the full copy"):
            reused, scores, _ = _ask(fc, shelf, _doc(tiny, 2) + [5, 6, 7, 8])
        assert len(shelf) == 0 and scores.shape[-1] == 304
    finally:
        fc.close()
        shelf.close()


def test_bad_shelves_are_refused():
    with pytest.raises(ValueError, match="capacity of at least 1"):
        CopyShelf(0)
    with pytest.raises(ValueError, match="min_tokens must be >= 1"):
        CopyShelf(1, min_tokens=0)


def test_an_on_disk_copy_that_cannot_be_written_stays_in_memory(tiny):
    import shutil

    fc = FullCopy(tiny, n_batch=128, on_disk=True)
    try:
        fc.prefill(_doc(tiny, 1), 4)
        assert fc.park() and fc._ctx is None and fc.kv_bytes() > 0
        scores, _ = fc.ask([5, 6, 7, 8], 4)  # loaded back
        assert fc._ctx is not None and scores.shape[-1] == 304
        shutil.rmtree(fc._dir)
        with pytest.warns(UserWarning, match="could not write the full copy"):
            assert not fc.park()
        assert fc._ctx is not None and fc.n == 304
    finally:
        fc.close()


def test_a_parked_copys_state_is_read_from_its_file_without_loading_it(tiny):
    """What a session file stores of an on-disk copy: the same state bytes as the live copy's, read from
    the parked file (its context stays freed), and a file of other tokens is refused."""
    from pyasl.engine.context import copy_state_from_file

    fc = FullCopy(tiny, n_batch=128, on_disk=True)
    try:
        fc.prefill(_doc(tiny, 1), 4)
        live, parked = io.BytesIO(), io.BytesIO()
        assert fc.write_state(live) == fc.state_size() > 0
        assert fc.park()
        assert fc.write_state(parked) == fc.state_size() and fc.parked and fc._ctx is None
        assert parked.getvalue() == live.getvalue()
        with pytest.raises(RuntimeError, match="not a state file of these tokens"):
            copy_state_from_file(fc._parked, fc.tokens[:-1], io.BytesIO())
        fc.pending = [5, 6]
        scores, _ = fc.ask([7, 8], 4)  # loaded back, the pending tokens kept
        assert fc.tokens[-4:] == [5, 6, 7, 8] and scores.shape[-1] == fc.n == 304
    finally:
        fc.close()


def test_a_parked_copy_that_cannot_be_read_is_prefilled_again(tiny, tmp_path):
    a, b = _doc(tiny, 1), _doc(tiny, 2)
    fc = FullCopy(tiny, n_batch=128)
    shelf = CopyShelf(1, directory=tmp_path, min_tokens=64)
    try:
        _ask(fc, shelf, a + [5, 6, 7, 8])
        _ask(fc, shelf, b + [5, 6, 7, 8])
        (tmp_path / "copy-0.state").write_bytes(b"not a state file")
        with pytest.warns(UserWarning, match="could not load a parked full copy"):
            reused, scores, _ = _ask(fc, shelf, a + [9, 9, 9, 9])
        assert reused == 0 and fc.tokens == a + [9, 9, 9, 9] and scores.shape[-1] == 304
    finally:
        fc.close()
        shelf.close()


def test_an_on_disk_copy_that_cannot_be_read_back_says_so_every_time(tiny):
    fc = FullCopy(tiny, n_batch=128, on_disk=True)
    try:
        fc.prefill(_doc(tiny, 1), 4)
        assert fc.park()
        fc._parked.write_bytes(b"damaged")
        for _ in range(2):
            with pytest.raises(RuntimeError, match="could not be read back from disk"):
                fc.ask([5, 6, 7, 8], 4)
            assert fc.parked and fc._ctx is None and fc.n == 300
    finally:
        fc.close()
