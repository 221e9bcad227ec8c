"""What a leader knows about each follower's log, and the quorum arithmetic built on it."""

from __future__ import annotations

import enum
from collections import deque


class ProgressState(enum.Enum):
    #: We do not know where the follower's log agrees with ours: send one AppendEntries at a time
    #: and wait for the answer (or a heartbeat reply) before the next.
    PROBE = "probe"
    #: The follower is known to match up to ``match``: stream AppendEntries optimistically,
    #: bounded by the inflight window.
    REPLICATE = "replicate"
    #: The entries the follower needs are compacted: a snapshot transfer is under way.
    SNAPSHOT = "snapshot"


class Progress:
    """One follower's replication state, as the leader sees it.

    Invariant: ``match < next``. ``match`` only grows while a leader's term lasts.
    """

    __slots__ = (
        "match",
        "next",
        "state",
        "probe_sent",
        "inflights",
        "inflight_bytes",
        "recent_active",
        "read_ack",
        "pending_snapshot",
        "sent_commit",
        "storage_id",
        "catching_up",
        "sent_round",
        "acked",
    )

    def __init__(self, next_index: int) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        #: In PROBE: an AppendEntries is outstanding; send nothing more until an answer arrives.
        self.probe_sent = False
        #: In REPLICATE: last index and size of each unacknowledged AppendEntries, oldest first.
        self.inflights: deque[tuple[int, int]] = deque()
        self.inflight_bytes = 0
        #: Heard from since the last CheckQuorum round.
        self.recent_active = False
        #: Highest heartbeat context the follower acknowledged (ReadIndex).
        self.read_ack = 0
        #: In SNAPSHOT: the index of the snapshot being sent.
        self.pending_snapshot = 0
        #: Highest commit index sent to the follower that it can use (it may not have arrived).
        self.sent_commit = 0
        #: The follower's storage identity as its last reply gave it (0: not known yet).
        self.storage_id = 0
        #: The follower said it is catching up after new storage: it counts towards no quorum.
        self.catching_up = False
        #: The leader's heartbeat round (ReadIndex context) when it last sent an AppendEntries.
        self.sent_round = 0
        #: Acknowledged an AppendEntries since the leader's last heartbeat tick (see
        #: ``Replication._heartbeat_redundant``).
        self.acked = False

    def __repr__(self) -> str:
        return (
            f"Progress(match={self.match}, next={self.next}, state={self.state.value}, "
            f"inflight={len(self.inflights)})"
        )

    # ------------------------------------------------------------------ state changes

    def become_probe(self) -> None:
        # Resume right after what is known to match; a pending snapshot counts as matched once
        # the follower has it.
        if self.state is ProgressState.SNAPSHOT:
            self.next = max(self.match + 1, self.pending_snapshot + 1)
        else:
            self.next = self.match + 1
        self._reset(ProgressState.PROBE)

    def become_replicate(self) -> None:
        self.next = self.match + 1
        self._reset(ProgressState.REPLICATE)

    def become_snapshot(self, snapshot_index: int) -> None:
        self._reset(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot_index

    def restart(self, next_index: int) -> None:
        """The follower's storage is new: forget what it matched and probe from ``next_index``.

        The one place ``match`` moves backwards within a term, and rightly: the acknowledgements
        it counted were made by a disk that no longer exists.
        """
        self.match = 0
        self.next = next_index  # invariant: match < next
        self.sent_commit = 0
        self._reset(ProgressState.PROBE)

    def _reset(self, state: ProgressState) -> None:
        self.state = state
        self.probe_sent = False
        self.inflights.clear()
        self.inflight_bytes = 0
        self.pending_snapshot = 0

    # ------------------------------------------------------------------ acknowledgements

    def maybe_update(self, index: int) -> bool:
        """The follower holds our log up to ``index``. Returns whether ``match`` moved."""
        updated = index > self.match
        if updated:
            self.match = index
            self.probe_sent = False
        self.next = max(self.next, index + 1)  # invariant: match < next
        return updated

    def maybe_decrease(self, rejected: int, probe_hint: int) -> bool:
        """The follower refused an AppendEntries whose ``prev_index`` was ``rejected``.

        ``probe_hint`` is the highest index at which the logs may agree. Returns whether ``next``
        moved; a stale rejection (of something already superseded) changes nothing.
        """
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match:
                return False  # stale: the follower has since matched beyond it
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False  # stale: not the probe we are waiting for
        self.next = max(min(rejected, probe_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    # ------------------------------------------------------------------ flow control

    def sent(self, last_index: int, size: int, count: int) -> None:
        """Record an AppendEntries carrying ``count`` entries up to ``last_index``."""
        if self.state is ProgressState.REPLICATE:
            if count:
                self.next = last_index + 1
                self.inflights.append((last_index, size))
                self.inflight_bytes += size
        elif self.state is ProgressState.PROBE:
            self.probe_sent = True

    def free_to(self, index: int) -> None:
        """Release inflight slots for every AppendEntries acknowledged up to ``index``."""
        inflights = self.inflights
        while inflights and inflights[0][0] <= index:
            self.inflight_bytes -= inflights.popleft()[1]

    def is_paused(self, max_msgs: int, max_bytes: int) -> bool:
        """Whether sending more AppendEntries must wait for acknowledgements."""
        state = self.state
        if state is ProgressState.PROBE:
            return self.probe_sent
        if state is ProgressState.REPLICATE:
            return len(self.inflights) >= max_msgs or self.inflight_bytes >= max_bytes
        return True


def quorum_index(values: list[int]) -> int:
    """The largest value that a majority of ``values`` is at or above."""
    ordered = sorted(values, reverse=True)
    return ordered[len(ordered) // 2]
