"""Session files: the pruned cache, the transcript, the policy and the statistics in one file
(a magic, two lengths, a JSON header, the llama.cpp sequence state, the documents' base state)."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Optional, Union

from ..engine import Model
from ..policies import Policy
from .state import SessionFileError, _Base, _Stats

_MAGIC = b"PYASLSES"
_FILE_VERSION = 1


def _identity(model: Model) -> dict:
    return {"arch": model.arch, "name": model.meta("general.name"), "n_layer": model.n_layer,
            "n_embd": model.n_embd, "n_head_kv": model.n_head_kv, "n_vocab": model.n_vocab,
            "file_size": model.path.stat().st_size if model.path.exists() else None}


def save(s, path: Union[str, os.PathLike]) -> None:
    """Write the pruned cache, the transcript, the policy and the statistics to one file."""
    if s._ctx is None:
        raise RuntimeError("nothing to save: the session has not been prefilled")
    state = s._ctx.state_get()
    base = s._base_state
    full = s._full
    full_size = None if full is None else full.state_size()  # an on-disk copy is copied from its file
    head = {
        "version": _FILE_VERSION, "model": _identity(s.model), "policy": s.policy.to_dict(),
        "n_ctx": s.n_ctx, "max_tokens": s.max_tokens, "system": s.system, "raw": s._fmt.raw,
        "flash_attn": s.flash_attn, "n_batch": s.n_batch, "type_k": s.type_k, "type_v": s.type_v, "n_past": s.n_past,
        "sink": s.sink, "keep_recent": s.keep_recent, "pos_shift": s._pos_shift,
        "documents": [[n, t] for n, t in s.documents], "messages": s.messages, "struct": s._struct,
        "cached_text": s._cached_text, "stats": s.stats_.__dict__,
        "layer_cells": s._layer_cells(),
        "base": None if base is None else {"n_past": base.n_past, "text": base.text, "struct": base.struct,
                                            "size": len(base.state), "layer_cells": base.layer_cells,
                                            "pos_shift": base.pos_shift},
        "mode": s.mode, "full_copy": s.full_copy, "reprefill": s.reprefill,
        "full": None if full is None else {"tokens": full.tokens, "pending": full.pending, "size": full_size,
                                           "n_docs": s._n_docs},
    }
    hj = json.dumps(head).encode("utf-8")
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_MAGIC + struct.pack("<QQ", len(hj), len(state)))
        f.write(hj)
        f.write(state)
        if base is not None:
            f.write(base.state)
        if full is not None and full.write_state(f) != full_size:
            raise RuntimeError("internal: the full copy's state changed size while it was saved")
    os.replace(tmp, path)


def load(cls, model: Model, path: Union[str, os.PathLike], n_threads: Optional[int] = None) -> object:
    """Open a session saved by :func:`save` as a `cls` (Session). Raises :class:`SessionFileError`
    when the file is not a pyasl session or was saved with a different model."""
    p = Path(path)
    if not p.is_file():
        raise SessionFileError(f"session file not found: {p}")
    with open(p, "rb") as f:  # left open: the full copy's state is streamed from it last
        head, state, base_state, full_at = _read(p, f)
        _check_model(p, head, model)
        return _session(cls, model, p, f, head, state, base_state, full_at, n_threads)


def _read(p: Path, f) -> tuple:
    """The header, the cache's state and the base state of the session file `f`, and where its full
    copy's state starts (checked against the file's length before anything is allocated)."""
    if f.read(len(_MAGIC)) != _MAGIC:
        raise SessionFileError(f"{p} is not a pyasl session file")
    size = p.stat().st_size
    try:
        nh, ns = struct.unpack("<QQ", f.read(16))
        if 24 + nh + ns > size:  # before reading: a damaged count must not allocate exabytes
            raise SessionFileError(f"{p} is truncated (its header counts {24 + nh + ns} bytes, the file "
                                   f"has {size})")
        head = json.loads(f.read(nh).decode("utf-8"))
        if not isinstance(head, dict):
            raise ValueError("the header is not a JSON object")
        state = f.read(ns)
        base = head.get("base")
        if base and not 0 <= int(base["size"]) <= size:
            raise ValueError(f"base size {base['size']}")
        base_state = f.read(int(base["size"])) if base else None
        full = head.get("full")
        if full and int(full["size"]) < 0:
            raise ValueError(f"full copy size {full['size']}")
        full_at = f.tell()
        if full and full_at + int(full["size"]) > size:
            raise SessionFileError(f"{p} is truncated (its full copy counts {full['size']} bytes)")
    except (struct.error, ValueError, KeyError, TypeError) as e:
        if isinstance(e, SessionFileError):
            raise
        raise SessionFileError(f"{p} is a damaged pyasl session file ({e})") from None
    if len(state) != ns or (base and len(base_state) != base["size"]):
        raise SessionFileError(f"{p} is truncated")
    if head.get("version") != _FILE_VERSION:
        raise SessionFileError(f"{p} has session format {head.get('version')}, this pyasl reads {_FILE_VERSION}")
    return head, state, base_state, full_at


def _check_model(p: Path, head: dict, model: Model) -> None:
    try:
        want, have = head["model"], _identity(model)
        diff = [k for k in want if want[k] != have.get(k)]
    except (KeyError, TypeError, AttributeError) as e:
        raise SessionFileError(f"{p} is a damaged pyasl session file (model identity: {e!r})") from None
    if diff:
        raise SessionFileError(
            f"{p} was saved with another model: {want.get('name') or want.get('arch')} "
            f"({', '.join(f'{k} {want[k]!r}' for k in diff)}), not {model.path.name} "
            f"({', '.join(f'{k} {have.get(k)!r}' for k in diff)}); load it with the model it was saved with")


def _session(cls, model: Model, p: Path, f, head: dict, state: bytes, base_state, full_at: int,
             n_threads: Optional[int]):
    """The session the checked header describes, its full copy streamed from `f` at `full_at`."""
    base, full = head.get("base"), head.get("full")
    s = None
    try:  # every field a damaged (or hand-edited) header may lack or hold with the wrong type
        s = cls(model, policy=Policy.from_dict(head["policy"]), n_ctx=head["n_ctx"], system=head["system"],
                max_tokens=head["max_tokens"], raw=head["raw"], n_threads=n_threads,
                flash_attn=head["flash_attn"], n_batch=head["n_batch"], type_k=head.get("type_k", "f16"),
                type_v=head.get("type_v", "f16"), sink=head.get("sink", 4),
                keep_recent=head.get("keep_recent", 0), mode=head.get("mode", "once"),
                full_copy=head.get("full_copy", "memory"), reprefill=head.get("reprefill", True))
        n_past = head["n_past"]
        if isinstance(n_past, bool) or not isinstance(n_past, int) or n_past < 0:
            raise ValueError(f"n_past {n_past!r}")
        try:
            s._load_state(state, n_past, head.get("layer_cells"))
        except RuntimeError as e:
            raise SessionFileError(f"{p}: the saved cache does not load into this context ({e})") from None
        pos = s._present_positions()
        if n_past != (int(pos[-1]) + 1 if len(pos) else 0):  # the next position follows the last cached one
            raise ValueError(f"n_past {n_past} does not follow the cached positions (last "
                             f"{int(pos[-1]) if len(pos) else None})")
        s._pos_shift = int(head.get("pos_shift", 0))
        s.documents = [(n, t) for n, t in head["documents"]]
        s.messages = list(head["messages"])
        s._struct = list(head["struct"])
        s._cached_text = str(head["cached_text"])
        s._started = True
        s.stats_ = _Stats(**head["stats"])
        if full:
            s._full = s._new_full_copy()
            f.seek(full_at)
            try:  # full_copy="disk": straight into its file, never loaded
                s._full.load(f, int(full["size"]), full["tokens"], full["pending"])
            except RuntimeError as e:
                raise SessionFileError(f"{p}: the saved full copy does not load ({e})") from None
            s._n_docs = int(full["n_docs"])
        elif s.mode == "per-question":
            s.mode = "once"  # saved without its full copy
        if base:
            s._base_state = _Base(base_state, int(base["n_past"]), str(base["text"]), list(base["struct"]),
                                  base.get("layer_cells"), int(base.get("pos_shift", 0)))
    except SessionFileError:
        if s is not None:
            s.close()
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if s is not None:
            s.close()
        raise SessionFileError(f"{p} is a damaged pyasl session file ({type(e).__name__}: {e})") from None
    return s
