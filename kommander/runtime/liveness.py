"""Node liveness and the awake set, as a mixin of :class:`~kommander.runtime.drive.DriveLoop`.

Every other tick (a fifth of the liveness timeout or less) the node sends one
:class:`~kommander.core.types.NodeHeartbeat` to each peer, and a peer not heard from for the
minimum election timeout is *unreachable*; every partition is told
the set whenever it changes (:meth:`~kommander.core.quiesce.Quiesce.note_liveness`). Only awake
partitions are ticked: one leaves the awake set when its core has quiesced and the runtime holds
nothing with a deadline for it. The attributes it uses are set up by ``_init_drive_loop``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kommander.core.types import Message, NodeHeartbeat

if TYPE_CHECKING:  # pragma: no cover
    from kommander.runtime.partition import PartitionRuntime


class NodeLiveness:
    """Node heartbeats, silent peers and the awake set of the drive loop."""

    voters: Any
    node_id: str
    runtimes: list[Any]
    stats: dict[str, int]
    log: Any
    reactor: Any
    _awake: set[int]
    _heard: set[str]
    _last_heard: dict[str, float]
    _unreachable: set[str]
    _liveness_timeout: float
    _node_heartbeat_ticks: int
    _ticks: int
    _dirty: dict[int, Any]
    _send: Any
    mark_dirty: Any

    def _liveness_peers(self) -> list[str]:
        """The nodes this one sends node heartbeats to and watches for silence (the manager
        widens it to every member of the record)."""
        return [v for v in self.voters if v != self.node_id]

    @property
    def awake_partitions(self) -> int:
        """How many partitions are ticked (the rest are quiesced and idle)."""
        return len(self._awake)

    @property
    def unreachable_peers(self) -> frozenset[str]:
        """Peers not heard from for the minimum election timeout."""
        return frozenset(self._unreachable)

    def _update_awake(self, runtime: "PartitionRuntime") -> None:
        core = runtime.core
        number = runtime.number
        if not core.quiesced:
            self._awake.add(number)
        elif self._unreachable and core.silent != self._unreachable and core.note_liveness(
            frozenset(self._unreachable), number
        ):
            # Quiesced with a peer found silent that the core was not told of (_tell_liveness
            # keeps every core's set current, so this is a safety net, not the usual path).
            self._awake.add(number)
            self._dirty[number] = runtime
        elif (
            runtime.queue
            or runtime.inflight
            or runtime.reads
            or runtime.confirmed_reads
            or runtime.abandoned_reads
            or runtime.book
        ):
            self._awake.add(number)  # deadlines to watch: keep calling expire()
        else:
            self._awake.discard(number)

    def _liveness(self, now: float, stalled: bool) -> None:
        """Once a tick: note who was heard from, send node heartbeats when due, find silent peers."""
        last_heard = self._last_heard
        if self._heard:
            for peer in self._heard:
                last_heard[peer] = now
            self._heard.clear()
        peers = self._liveness_peers()
        if stalled:
            return
        self._ticks += 1
        if self._ticks % self._node_heartbeat_ticks == 0:
            outgoing: dict[str, list[tuple[int, Message]]] = {
                peer: [(0, NodeHeartbeat(0, self.node_id, peer))] for peer in peers
            }
            self.stats["node_heartbeats_sent"] += len(outgoing)
            self._send(outgoing)
        lost = [
            peer
            for peer in peers
            if peer not in self._unreachable and now - last_heard.setdefault(peer, now) >= self._liveness_timeout
        ]
        if not lost:
            return
        self._unreachable.update(lost)
        self.stats["peers_lost"] += len(lost)
        woken = self._tell_liveness()
        self.log.warn(
            "node {node}: nothing heard from {peers} for {timeout:.2f}s; woke {woken} quiesced partitions",
            node=self.node_id,
            peers=",".join(lost),
            timeout=self._liveness_timeout,
            woken=woken,
        )

    def _peer_back(self, peer: str) -> None:
        self._unreachable.discard(peer)
        self._last_heard[peer] = self.reactor.seconds()
        woken = self._tell_liveness()
        self.log.info(
            "node {node}: heard from {peer} again; woke {woken} quiesced partitions",
            node=self.node_id,
            peer=peer,
            woken=woken,
        )

    def _tell_liveness(self) -> int:
        """Give every partition the new set of silent peers (awake ones keep it for when they
        quiesce: a leader may then quiesce without a silent member). :returns: how many quiesced
        partitions woke."""
        silent = frozenset(self._unreachable)
        woken = 0
        for runtime in self.runtimes:
            if runtime.core.note_liveness(silent, runtime.number):
                woken += 1
                self.mark_dirty(runtime)
        return woken
