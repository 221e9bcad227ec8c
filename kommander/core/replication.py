"""Log replication: the leader's AppendEntries flow control and the follower's consistency check.

Builds on :class:`kommander.core.state.NodeState` (the fields and the other parts' operations);
:class:`kommander.core.raft.RaftNode` combines the parts.
"""

from __future__ import annotations

from kommander.core.errors import CompactedError
from kommander.core.progress import Progress, ProgressState, quorum_index
from kommander.core.state import NodeState
from kommander.core.types import (
    AppendEntries,
    AppendEntriesResponse,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
)



class Replication(NodeState):
    """Replication behaviour of a :class:`RaftNode`."""

    # ------------------------------------------------------------------ leader: sending

    def _send_append(self, peer: str, pr: Progress, send_empty: bool = False) -> bool:
        """Send ``peer`` the entries from ``pr.next`` if flow control allows. Returns whether a
        message went out (so callers can loop to fill the pipelining window)."""
        if not send_empty and pr.next == self.log.last_index() + 1:
            return False  # caught up: the common end of every send loop, so decide it cheaply
        config = self.config
        if pr.is_paused(config.max_inflight_msgs, config.max_inflight_bytes):
            return False
        return self._send_append_unpaused(peer, pr, send_empty)

    def _send_append_unpaused(self, peer: str, pr: Progress, send_empty: bool) -> bool:
        config = self.config
        log = self.log
        prev_index = pr.next - 1
        try:
            prev_term = log.term(prev_index)
            batch = log.slice(pr.next, pr.next + config.max_msg_entries)
        except CompactedError:
            return self._send_snapshot(peer, pr)
        if prev_term is None:
            raise AssertionError(f"progress of {peer} points past our log: {pr!r}, last {log.last_index()}")
        if not batch and not send_empty:
            return False
        size = 0
        limit = config.max_msg_bytes
        for i, entry in enumerate(batch):
            entry_size = len(entry.data) + 24
            if size + entry_size > limit and i > 0:
                del batch[i:]
                break
            size += entry_size
        count = len(batch)
        last = batch[-1].index if count else prev_index
        committed = log.committed
        self._msgs.append(
            AppendEntries(self.term, self.id, peer, prev_index, prev_term, tuple(batch), committed)
        )
        pr.sent(last, size, count)
        pr.sent_round = self._read_seq
        # The follower can use the commit index up to what this message vouches for.
        usable = committed if committed < last else last
        if usable > pr.sent_commit:
            pr.sent_commit = usable
        return True

    def _send_snapshot(self, peer: str, pr: Progress) -> bool:
        if pr.state is ProgressState.SNAPSHOT:
            return False
        meta = self.log.snapshot
        pr.become_snapshot(meta.index)
        self._msgs.append(InstallSnapshot(self.term, self.id, peer, meta))
        return True

    def _bcast_append(self) -> None:
        for peer, pr in self.progress.items():
            while self._send_append(peer, pr):
                pass

    def _bcast_heartbeat(self, context: int) -> None:
        committed = self.log.committed
        for peer, pr in self.progress.items():
            # Never claim a commit index the follower may not hold yet.
            commit = min(pr.match, committed)
            self._msgs.append(Heartbeat(self.term, self.id, peer, commit, context))
            if commit > pr.sent_commit:
                pr.sent_commit = commit

    def _heartbeat_redundant(self) -> bool:
        """Whether this tick's heartbeat round would tell the followers nothing: each of them
        acknowledged an AppendEntries since the last tick (so it hears from us, and what we sent
        is not stuck), each was sent all of the commit index it can use, and no read or lease
        waits for a round. Under load that is every tick, and with many partitions the
        heartbeats and their replies were about half of all messages. A follower that goes
        quiet, a lost AppendEntries and a commit index the followers lack all bring the round
        back at the next tick. Clears the acknowledgements for the next tick either way."""
        redundant = not (self._read_round_needed or self._pending_reads or self._lease_used)
        committed = self.log.committed
        for pr in self.progress.values():
            if redundant and (not pr.acked or pr.sent_commit < min(pr.match, committed)):
                redundant = False
            pr.acked = False
        return redundant

    def _bcast_commit(self) -> None:
        """The commit index moved: a follower with entries waiting is sent them now, and they
        carry it. The others learn it with their next AppendEntries or the next periodic
        heartbeat, at most a ``heartbeat_interval`` later, and not from a heartbeat of its own:
        at one write in flight those heartbeats and their replies were half of every node's
        messages, and they competed for the CPU with the next write. Nothing waits for a
        follower's commit index but reads on that follower, and the leader tells it at once when
        it answers one (:meth:`_answer_remote`)."""
        for peer, pr in self.progress.items():
            self._send_append(peer, pr)

    def _send_commit(self, peer: str, pr: Progress, context: int) -> None:
        """Heartbeat ``peer`` if it can learn a commit index it was not sent yet: the part of our
        commit index that it is known to hold."""
        commit = min(pr.match, self.log.committed)
        if commit > pr.sent_commit:
            pr.sent_commit = commit
            self._msgs.append(Heartbeat(self.term, self.id, peer, commit, context))

    # ------------------------------------------------------------------ leader: acknowledgements

    def _handle_append_response(self, m: AppendEntriesResponse) -> None:
        pr = self.progress.get(m.src)
        if pr is None:
            return
        pr.recent_active = True
        if m.storage_id != pr.storage_id or pr.catching_up:
            self._note_storage(m.src, pr, m.storage_id, m.catching_up)
        if not m.success:
            hint = m.hint_index
            if m.hint_term > 0:
                # Skip every entry of ours that cannot match the follower's term at hint_index.
                hint = self.log.find_conflict_by_term(m.hint_index, m.hint_term)
            if pr.maybe_decrease(m.index, hint):
                if pr.state is ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_append(m.src, pr, send_empty=True)
            return
        pr.acked = True
        if not pr.maybe_update(m.index):
            if pr.state is not ProgressState.PROBE or m.index != pr.match:
                return
            # The follower confirms it holds our log up to match: that is all a probe asks, so
            # stream from there instead of waiting (paused) for a heartbeat reply.
        if pr.state is ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state is ProgressState.SNAPSHOT:
            if pr.match >= pr.pending_snapshot:
                pr.become_probe()
        else:
            pr.free_to(m.index)
        if self._maybe_commit():
            self._commit_dirty = True
        self._maybe_finish_transfer(m.src)
        while self._send_append(m.src, pr):
            pass

    def _handle_heartbeat_response(self, m: HeartbeatResponse) -> None:
        pr = self.progress.get(m.src)
        if pr is None:
            return
        # A catching-up follower still counts as active for CheckQuorum: it can only catch up
        # from a leader, and a leader that stepped down for want of it would strand it.
        pr.recent_active = True
        if m.storage_id != pr.storage_id or pr.catching_up:
            self._note_storage(m.src, pr, m.storage_id, m.catching_up)
        if m.context > pr.read_ack:
            pr.read_ack = m.context
            self._confirm_reads()
            if self._lease_rounds:
                self._renew_lease()
        if pr.match >= self.log.last_index():
            return
        if pr.state is ProgressState.PROBE:
            # The probe may have been lost: the reply proves the follower is there, try again.
            pr.probe_sent = False
            self._send_append(m.src, pr, send_empty=True)
        elif pr.state is ProgressState.REPLICATE:
            if self._send_append(m.src, pr):
                return  # entries not sent yet, and room in the window
            if m.context > pr.sent_round:
                # Everything is in flight, and the follower answered a heartbeat sent after our
                # last AppendEntries without acknowledging it yet: the network may have lost
                # what is in flight, and nothing else would resend it. Send one empty
                # AppendEntries past the window; the follower acknowledges it (freeing the
                # window) or rejects it (back to probing). Not for replies to older rounds:
                # under load that would be one per reply, and one sent just after the entries
                # it follows can overtake them, be rejected, and knock the follower back to
                # probing. Each probe counts as sent, so a slow disk draws at most one a round.
                self._send_window_probe(m.src, pr)

    def _send_window_probe(self, peer: str, pr: Progress) -> None:
        prev_index = pr.next - 1
        try:
            prev_term = self.log.term(prev_index)
        except CompactedError:
            self._send_snapshot(peer, pr)
            return
        self._msgs.append(
            AppendEntries(self.term, self.id, peer, prev_index, prev_term, (), self.log.committed)
        )
        pr.sent_round = self._read_seq

    def report_snapshot(self, peer: str, success: bool) -> None:
        """The runtime finished (or gave up) streaming a snapshot to ``peer``. On failure the
        leader probes again, which starts a new transfer if one is still needed."""
        pr = self.progress.get(peer)
        if pr is None or pr.state is not ProgressState.SNAPSHOT:
            return
        if not success:
            pr.pending_snapshot = 0
        pr.become_probe()

    def _maybe_commit(self) -> bool:
        log = self.log
        if self._simple:
            matches = [log.stable]
            # A follower catching up on new storage does not count: its lost acknowledgements may
            # have helped commit entries under another leader.
            matches.extend(0 if pr.catching_up else pr.match for pr in self.progress.values())
            index = quorum_index(matches)
        else:
            index = self._commit_index_general()  # learners, joint, or this leader being removed
        # Figure 8 of the Raft paper: only entries of the current term commit by counting
        # replicas; earlier ones commit with them.
        if index > log.committed and log.term(index) == self.term:
            log.commit_to(index)
            self._on_commit()
            return True
        return False

    # ------------------------------------------------------------------ follower

    def _handle_append(self, m: AppendEntries) -> None:
        log = self.log
        if m.prev_index < log.committed:
            # Everything up to our commit index already agrees with any leader's log.
            self._persisted_msgs.append(self._append_response(m.src, True, log.committed))
            return
        last_new = log.maybe_append(m.prev_index, m.prev_term, m.entries)
        if last_new is not None:
            if m.entries:
                self._configs_after_append(m.prev_index, m.entries)
            log.commit_to(min(m.commit, last_new))
            # "I hold these entries" must be true on disk before the leader counts it.
            self._persisted_msgs.append(self._append_response(m.src, True, last_new))
            return
        hint_index = log.find_conflict_by_term(min(m.prev_index, log.last_index()), m.prev_term)
        self._msgs.append(
            self._append_response(m.src, False, m.prev_index, hint_index, log.term_or_zero(hint_index))
        )

    def _handle_heartbeat(self, m: Heartbeat) -> None:
        self.log.commit_to(min(m.commit, self.log.last_index()))
        self._msgs.append(
            HeartbeatResponse(self.term, self.id, m.src, m.context, self.storage_id, self.catching_up)
        )

    def _handle_snapshot(self, m: InstallSnapshot) -> None:
        log = self.log
        meta = m.meta
        if meta.index <= log.committed:
            reply = log.committed
        elif log.matches(meta.index, meta.term):
            # Our log already holds the snapshot's last entry: it is committed, keep the rest.
            log.commit_to(meta.index)
            reply = meta.index
        else:
            log.restore(meta)
            self._restore_membership(meta)
            self._pending_snapshot = meta
            reply = meta.index
        self._persisted_msgs.append(self._append_response(m.src, True, reply))

    def _append_response(
        self, dst: str, success: bool, index: int, hint_index: int = 0, hint_term: int = 0
    ) -> AppendEntriesResponse:
        return AppendEntriesResponse(
            self.term, self.id, dst, success, index, hint_index, hint_term, self.storage_id, self.catching_up
        )
