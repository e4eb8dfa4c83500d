"""Conversations over a pruned KV cache: :class:`Session` (see :mod:`.session`), its chat
formatting (:mod:`.format`), sampling (:mod:`.sampling`) and files (:mod:`.files`)."""
from __future__ import annotations

from .session import ContextFullError, Session, SessionFileError

__all__ = ["ContextFullError", "Session", "SessionFileError"]
