"""Full copies of earlier long prompts parked on disk, so that a server or a drop-in Llama serving
several documents in turn does not prefill a document again when a question about it comes back.

Per-question selection keeps one live :class:`FullCopy`: the latest prompt's unpruned KV. A prompt
that shares its prefix decodes only the rest; a prompt about another document discards it, and a
later question about the first document prefilled it again (minutes for a long one on a laptop).
The shelf writes the live copy's state to a file before a long prefix of it is discarded, and loads
a parked copy back when it shares more of a new prompt than the live one: a fraction of a second
for the KV of a few thousand tokens, against a prefill.
"""
from __future__ import annotations

import itertools
import shutil
import tempfile
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .full_copy import FullCopy, shared_prefix


@dataclass
class _Parked:
    tokens: list[int]
    path: Path


class CopyShelf:
    """Up to `capacity` parked full copies, as state files in `directory` (default: a temporary one,
    removed on :meth:`close`), the least recently used dropped first. A copy is parked only when a
    prompt would discard at least `min_tokens` of it (what is cheap to prefill again is not kept)."""

    def __init__(self, capacity: int, directory: Optional[Path] = None, min_tokens: int = 512):
        if capacity < 1:
            raise ValueError(f"a shelf of full copies needs a capacity of at least 1, not {capacity}")
        if min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, not {min_tokens}")
        self.capacity, self.min_tokens = int(capacity), int(min_tokens)
        self._own = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="pyasl-copies-")) if directory is None else Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._parked: list[_Parked] = []  # least recently used first
        self._names = itertools.count()
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.directory, True) if self._own else None
        self.loads = 0  # copies taken back from the shelf (a prefill saved each time)

    def __len__(self) -> int:
        return len(self._parked)

    def prepare(self, live: FullCopy, tokens) -> None:
        """Before `live` takes `tokens`: park it if they would discard at least min_tokens of it, and load
        the parked copy sharing the most of them when it shares more than `live` does."""
        keep = live.common_prefix(tokens)
        shares = [shared_prefix(p.tokens, tokens) for p in self._parked]
        best = None
        if shares and max(shares) > keep:
            best = self._parked.pop(shares.index(max(shares)))  # off the shelf before `live` takes its place
        if live.n - keep >= self.min_tokens and not live.pending:
            self._park(live)
        if best is not None:
            try:
                live.load_file(best.path, best.tokens)
                self.loads += 1
            except (OSError, RuntimeError) as e:  # the copy is left empty: the prompt is prefilled whole
                warnings.warn(f"pyasl: could not load a parked full copy ({e}); prefilling the prompt again",
                              stacklevel=3)
            finally:
                best.path.unlink(missing_ok=True)

    def _park(self, live: FullCopy) -> None:
        toks = list(live.tokens)
        # a parked copy that differs from this one only in a short tail (the same document, another
        # question) is superseded by it
        for p in [p for p in self._parked if shared_prefix(p.tokens, toks) >= min(len(p.tokens), len(toks)) - self.min_tokens]:
            self._drop(p)
        while len(self._parked) >= self.capacity:
            self._drop(self._parked[0])
        path = self.directory / f"copy-{next(self._names)}.state"
        try:
            live.save_file(path)
        except (OSError, RuntimeError) as e:  # a full or unwritable disk costs a later prefill, not this answer
            path.unlink(missing_ok=True)
            warnings.warn(f"pyasl: could not park the full copy in {self.directory} ({e}); it will be prefilled again "
                          "if asked about", stacklevel=3)
            return
        self._parked.append(_Parked(toks, path))

    def _drop(self, p: _Parked) -> None:
        self._parked.remove(p)
        p.path.unlink(missing_ok=True)

    def close(self) -> None:
        for p in list(self._parked):
            self._drop(p)
        if self._cleanup is not None:
            self._cleanup()
