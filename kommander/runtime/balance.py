"""Spreading partition leadership over the voters.

Elections do not balance anything: after a cold start the node whose timers fire first often
leads most partitions (725 of 1,024 on one node of three was measured), so it does most of the
work, and its death leaves that many partitions to elect at once. Each node here looks, every
``leader_balance_interval`` seconds, at the leaders it knows. When every partition has one, the
picture has not changed over a whole interval (no election or hand-off under way), no membership
change is in progress, and this node leads more than its share (``ceil(partitions / voters)``,
counting the voters it can reach), it hands some partitions to the reachable voters leading
fewest, each of which leads less than its share (so two nodes never pass a partition back and
forth), at most a quarter of the partitions per round. A hand-off is the core's leadership
transfer (Raft thesis 3.10): the target is brought up to date and elected at once, so writes
pause for about one round trip (the HTTP API waits for the new leader rather than failing).

Only the node with too many acts, on what it leads; a node's view of the others' leaders can be
stale, which costs at most a hand-off that was not needed (the next round sees the truth).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet import task
from twisted.logger import Logger

from kommander.core.errors import NotLeader

_log = Logger()

#: At most this share of the partitions changes hands in one round.
MOVES_PER_ROUND_DIVISOR = 4


class LeaderBalancer:
    """Moves leadership away from this node while it leads more than its share.

    :param host: the :class:`~kommander.runtime.manager.RaftManager` (``node_id``, ``partitions``,
        ``runtimes``, ``get_leader``, ``is_reachable``, ``transfer_leadership``, ``record``).
    :param interval: seconds between rounds; 0 turns balancing off.
    """

    def __init__(self, host: Any, interval: float) -> None:
        self.host = host
        self.interval = interval
        self._loop: task.LoopingCall | None = None
        self._seen: list[str | None] | None = None
        #: Partitions handed over, for status and tests.
        self.moved = 0

    def start(self) -> None:
        if self.interval <= 0 or self.host.partitions < 2:
            return
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = self.host.reactor
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def tick(self) -> None:
        host = self.host
        if not host.running or len(host.runtimes) < host.partitions:
            return
        leaders = [host.get_leader(p) for p in range(host.partitions)]
        seen, self._seen = self._seen, leaders
        if leaders != seen or None in leaders:
            return  # wait for a whole interval without elections or hand-offs
        record = host.record.record
        if record.target is not None:
            return  # a membership change moves leadership itself
        me = host.node_id
        mine = [p for p, leader in enumerate(leaders) if leader == me]
        voters: set[str] = set()
        for runtime in host.runtimes:
            membership = runtime.core.membership
            if membership.joint or runtime.core.lead_transferee is not None:
                return
            voters |= membership.voters
        live = [v for v in voters if v == me or host.is_reachable(v)]
        share = -(-host.partitions // max(1, len(live)))
        if len(mine) <= share:
            return
        counts = Counter(leaders)
        moves = min(len(mine) - share, max(1, host.partitions // MOVES_PER_ROUND_DIVISOR))
        # Rotate the starting point so that the same partitions are not always the ones moved.
        start = self.moved % len(mine)
        for p in mine[start:] + mine[:start]:
            if moves == 0:
                break
            core = host.runtimes[p].core
            candidates = [
                v for v in sorted(core.membership.voters) if v != me and counts[v] < share and host.is_reachable(v)
            ]
            if not candidates:
                continue
            target = min(candidates, key=lambda v: (counts[v], v))
            try:
                host.transfer_leadership(p, target)
            except (NotLeader, ValueError):
                continue  # lost it meanwhile, or the target left: the next round looks again
            counts[target] += 1
            counts[me] -= 1
            moves -= 1
            self.moved += 1
        self._seen = None  # the hand-offs change the picture: wait a whole interval again
        _log.info(
            "node {node}: led {led} of {partitions} partitions (share {share}); handing some to other voters",
            node=me,
            led=len(mine),
            partitions=host.partitions,
            share=share,
        )
