"""ReadIndex (Raft thesis 6.4): linearizable reads without writing to the log.

The leader records its commit index for the read, proves it still leads with a round of
heartbeats acknowledged by a quorum, and hands back the index; the runtime serves the read once
that index is applied. Reads arriving together share one heartbeat round: each read waits for the
first round numbered after it was registered.

Builds on :class:`kommander.core.state.NodeState` (the fields and the other parts' operations);
:class:`kommander.core.raft.RaftNode` combines the parts.
"""

from __future__ import annotations

from kommander.core.errors import NotLeader
from kommander.core.progress import quorum_index
from kommander.core.state import NodeState
from kommander.core.types import ReadState, Role


class ReadIndex(NodeState):
    """ReadIndex behaviour of a :class:`RaftNode`."""

    def read_index(self, context: int) -> None:
        """Ask for a linearizable read barrier; ``ready().read_states`` later carries
        ``ReadState(context, index)``, or ``ready().dropped_reads`` carries ``context`` if
        leadership is lost first.

        :raises NotLeader: when this node does not lead.
        """
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader)
        self.wake()  # confirmed by a heartbeat round, never from a quiesced state (quiesce.py)
        if self.log.term(self.log.committed) != self.term:
            # Until an entry of our term commits we do not know the latest commit index
            # (Raft thesis 6.4, step 1): wait for the no-op to commit.
            self._reads_waiting_commit.append(context)
            return
        self._register_read(context)

    def _register_read(self, context: int) -> None:
        if not self.progress:
            self._read_states.append(ReadState(context, self.log.committed))
            return
        self._pending_reads.append((self._read_seq + 1, context, self.log.committed))
        self._read_round_needed = True

    def _next_read_round(self) -> int:
        """The context for a heartbeat round about to be sent. Every round gets a fresh number so
        acknowledgements of it prove leadership after every read registered before it."""
        self._read_seq += 1
        self._read_round_needed = False
        return self._read_seq

    def _confirm_reads(self) -> None:
        pending = self._pending_reads
        if not pending:
            return
        acks = [self._read_seq]
        # A follower catching up on new storage may have voted for a newer leader before it
        # lost its disk: its acknowledgement proves nothing about our leadership.
        acks.extend(0 if pr.catching_up else pr.read_ack for pr in self.progress.values())
        confirmed = quorum_index(acks)
        while pending and pending[0][0] <= confirmed:
            _, context, index = pending.popleft()
            self._read_states.append(ReadState(context, index))

    def _release_reads_waiting_commit(self) -> None:
        waiting, self._reads_waiting_commit = self._reads_waiting_commit, []
        for context in waiting:
            self._register_read(context)

    def _drop_reads(self) -> None:
        dropped = [context for _, context, _ in self._pending_reads]
        dropped.extend(self._reads_waiting_commit)
        self._pending_reads.clear()
        self._reads_waiting_commit = []
        self._read_round_needed = False
        self._dropped_reads.extend(dropped)
