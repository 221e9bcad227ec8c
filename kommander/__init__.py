"""Kommander: Raft consensus for Twisted applications.

Each node runs many Raft groups (partitions) at once, leading some and following others. See
:class:`kommander.runtime.manager.RaftManager` for the API and :mod:`kommander.interfaces` for the seams.

The names below are imported lazily, so ``import kommander.core`` never pulls in Twisted.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0.dev0"

_EXPORTS = {
    "RaftManager": "kommander.runtime.manager",
    "RaftConfiguration": "kommander.config",
    "ReplicationResult": "kommander.results",
    "RaftOperationStatus": "kommander.results",
    "Entry": "kommander.core.types",
    "EntryKind": "kommander.core.types",
    "KommanderError": "kommander.core.errors",
    "NotLeader": "kommander.core.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kommander' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
