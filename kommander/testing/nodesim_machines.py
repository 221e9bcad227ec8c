"""The state machines a node simulation runs: a small key-value map per partition, answering
synchronously, with already-fired Deferreds, with Deferreds that fire later, or slowly.

Commands (``entry.data``): ``put|KEY|VALUE``, ``cas|KEY|EXPECTED|VALUE`` (``EXPECTED`` is ``-`` for
"absent") and ``bulk|N`` (changes nothing but the digest: the filler of large tickets). Every value
is written once in a run, so the map can tell which writes it holds.

Each machine keeps a digest chained over every entry it applied; the simulation compares digests
at each index across nodes (fingerprints). Snapshots stream in small chunks and restore from them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from kommander.core.types import Entry
from kommander.interfaces import ISnapshotStateMachine

#: How a machine answers ``apply``.
KINDS = ("sync", "fired", "later", "slow")


class TransientFault(Exception):
    """The simulated state machine failed on one node, once (a transient bug or resource error)."""


class Partition:
    """One partition's state."""

    __slots__ = ("kv", "seen", "digest")

    def __init__(self) -> None:
        self.kv: dict[str, str] = {}
        self.seen: set[str] = set()
        self.digest = ""


@implementer(ISnapshotStateMachine)
class SimKV:
    """A key-value state machine for one node lifetime.

    :param kind: one of :data:`KINDS`.
    :param reactor: the node's reactor (for Deferreds that fire later).
    :param rng: delays of ``later``/``slow`` answers and the transient faults.
    :param observe: called ``(partition, entry, digest)`` after every applied entry.
    :param fail_rate: chance that one ``apply`` raises :class:`TransientFault` without changing
        anything.
    :param chunk: bytes per snapshot chunk.
    """

    def __init__(
        self,
        kind: str,
        reactor: Any,
        rng: Any,
        observe: Callable[[int, Entry, str], None],
        fail_rate: float = 0.0,
        chunk: int = 64,
    ) -> None:
        self.kind = kind
        self.reactor = reactor
        self.rng = rng
        self.observe = observe
        self.fail_rate = fail_rate
        self.chunk = chunk
        self.parts: dict[int, Partition] = {}
        self.faults = 0
        self.failed: set[tuple[int, int]] = set()

    def part(self, partition: int) -> Partition:
        state = self.parts.get(partition)
        if state is None:
            state = self.parts[partition] = Partition()
        return state

    def get(self, partition: int, key: str) -> str | None:
        return self.part(partition).kv.get(key)

    # ------------------------------------------------------------------ IStateMachine

    def apply(self, partition: int, entry: Entry) -> Any:
        if self.fail_rate and self.rng.random() < self.fail_rate:
            self.faults += 1
            self.failed.add((partition, entry.index))
            raise TransientFault(f"simulated state machine fault at {partition}/{entry.index}")
        result = self._apply(partition, entry)
        kind = self.kind
        if kind == "sync":
            return result
        if kind == "fired":
            return defer.succeed(result)
        d: defer.Deferred[bytes] = defer.Deferred()
        delay = self.rng.uniform(0.0, 0.004) if kind == "later" else self.rng.uniform(0.01, 0.08)
        self.reactor.callLater(delay, d.callback, result)
        return d

    def _apply(self, partition: int, entry: Entry) -> bytes:
        state = self.part(partition)
        fields = entry.data.decode().split("|")
        result = b"ok"
        if fields[0] == "put":
            state.kv[fields[1]] = fields[2]
            state.seen.add(fields[2])
        elif fields[0] == "cas":
            expected = None if fields[2] == "-" else fields[2]
            if state.kv.get(fields[1]) == expected:
                state.kv[fields[1]] = fields[3]
                state.seen.add(fields[3])
                result = b"1"
            else:
                result = b"0"
        state.digest = hashlib.blake2b(
            f"{state.digest}|{entry.index}|{entry.term}|".encode() + entry.data, digest_size=8
        ).hexdigest()
        self.observe(partition, entry, state.digest)
        return result

    def checkpoint(self, partition: int, index: int) -> None:
        pass

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, partition: int) -> Iterable[bytes]:
        state = self.part(partition)
        blob = json.dumps([state.kv, sorted(state.seen), state.digest], sort_keys=True).encode()
        step = self.chunk
        return [blob[i : i + step] for i in range(0, len(blob), step)] or [b""]

    def restore(self, partition: int, chunks: Iterable[bytes]) -> Any:
        blob = b"".join(bytes(c) for c in chunks)
        kv, seen, digest = json.loads(blob) if blob else ({}, [], "")
        state = self.part(partition)
        state.kv, state.seen, state.digest = dict(kv), set(seen), digest
        if self.kind in ("later", "slow"):
            d: defer.Deferred[None] = defer.Deferred()
            self.reactor.callLater(self.rng.uniform(0.0, 0.01), d.callback, None)
            return d
        return None
