"""Deliberately broken components, to prove the node simulator catches what it claims to.

Each mutation is a context manager that monkeypatches one piece of the real code (the runtime,
the core, or the simulated transport) for the duration of a run, and restores it afterwards;
nothing in the shipped modules is edited. :data:`MUTATIONS` maps a name to the mutation;
:data:`MUTATION_PROFILES` names the fault profile that gives the broken piece a chance to show.
Select one with ``python -m kommander.testing.nodesim --mutation NAME``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from kommander.core.progress import ProgressState
from kommander.core.raft import RaftNode
from kommander.core.types import Heartbeat
from kommander.results import is_deferred
from kommander.runtime.apply import IDLE, Applier
from kommander.runtime.checkpoints import Checkpointer
from kommander.runtime.partition import PartitionRuntime
from kommander.testing import nodesim_env


@contextlib.contextmanager
def patched(owner: Any, name: str, make: Callable[[Any], Any]) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, make(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def deferred_recursion() -> Any:
    """The apply loop recurses through each entry's Deferred (``addBoth`` runs inline when the
    Deferred has fired), so a long run of entries exhausts the stack part way through."""

    def make(original: Any) -> Any:
        def drain(self: PartitionRuntime, outcome: Any = None) -> None:
            # The real steps (_start, _complete), chained by callbacks instead of a loop.
            self.applying = True
            if not self.host.running:
                self.applying = False
                return
            step = self._start()
            if step is IDLE:
                self.applying = False
                return
            d = step if is_deferred(step) else (defer.fail(step) if isinstance(step, Failure) else defer.succeed(step))

            def next_one(result: Any) -> None:
                if self._complete(result):
                    drain(self)

            d.addBoth(next_one)

        return drain

    return patched(PartitionRuntime, "_drain_apply", make)


@contextlib.contextmanager
def stale_progress_after_wipe() -> Iterator[None]:
    """The leader ignores every rejection at or below the match index it remembers, and takes a
    follower's new storage id for the old one (its progress is never restarted), so a follower
    that lost its storage is never repaired. (Without the second half, heartbeat replies carrying
    the new id restart the progress and repair the follower anyway.)"""

    def make(original: Any) -> Any:
        def handle(self: RaftNode, m: Any) -> None:
            pr = self.progress.get(m.src)
            if pr is not None and not m.success and m.index <= pr.match:
                pr.recent_active = True
                return
            original(self, m)

        return handle

    def make_note(original: Any) -> Any:
        def note(self: RaftNode, peer: str, pr: Any, storage_id: int, catching_up: bool) -> None:
            if storage_id and pr.storage_id and storage_id != pr.storage_id:
                pr.storage_id = storage_id  # the new disk, taken for the old one
                pr.catching_up = catching_up
                return
            original(self, peer, pr, storage_id, catching_up)

        return note

    with patched(RaftNode, "_handle_append_response", make), patched(RaftNode, "_note_storage", make_note):
        yield


def swallow_sm_errors() -> Any:
    """The applier treats an exception from the state machine as a result: the entry counts as
    applied and the client hears SUCCESS."""

    def make(original: Any) -> Any:
        def apply(self: Applier, runtime: Any, entry: Any, *_: Any) -> Any:
            machine = self.host.state_machine
            try:
                outcome = machine.apply(runtime.number, entry)
            except Exception as e:  # noqa: BLE001 - the mutation
                return e
            if isinstance(outcome, defer.Deferred):
                return outcome.addErrback(lambda f: f.value)
            return outcome

        return apply

    return patched(Applier, "apply", make)


@contextlib.contextmanager
def batch_drop_oversized() -> Iterator[None]:
    """The runtime of before the fix: the transport declares no frame limit (so an oversized entry
    is accepted at proposal time), refuses the whole batch to a peer for one message over its
    limit (heartbeats, votes and acks of every partition), and the runtime drops that batch
    instead of resending the rest one by one."""
    from kommander.runtime.drive import DriveLoop

    def make_init(original: Any) -> Any:
        def init(self: Any) -> None:
            original(self)
            self.batch_drop = True

        return init

    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(nodesim_env.NetFaults, "__init__", make_init))
        stack.enter_context(patched(nodesim_env.SimTransport, "max_frame_bytes", lambda _: property(lambda self: None)))
        stack.enter_context(patched(DriveLoop, "_send_each", lambda _: lambda self, peer, messages: None))
        yield


def compact_before_verify() -> Any:
    """At start-up the WAL is compacted to the newest snapshot before that snapshot is checked,
    and a corrupt one is then skipped: the entries that could rebuild the state are gone."""

    def make(original: Any) -> Any:
        @defer.inlineCallbacks
        def restore(self: Checkpointer, number: int, state: Any) -> Any:
            store = self.host.snapshot_store
            latest = store.latest(number)
            if latest is None:
                return None, state.entries, {}
            yield self.host.wal.compact(number, latest)
            try:
                result = yield original(self, number, state)
            except Exception:  # noqa: BLE001 - the mutation: carry on from the compacted log
                return None, (), {}
            return result

        return restore

    return patched(Checkpointer, "restore", make)


def figure8_commit_old_term() -> Any:
    """The leader commits whatever a quorum holds, entries of earlier terms included (the Raft
    paper's Figure 8)."""

    def make(original: Any) -> Any:
        def maybe_commit(self: RaftNode) -> bool:
            from kommander.core.progress import quorum_index

            log = self.log
            matches = [log.stable, *(pr.match for pr in self.progress.values())]
            index = quorum_index(matches)
            if index > log.committed:
                log.commit_to(index)
                self._on_commit()
                return True
            return False

        return maybe_commit

    return patched(RaftNode, "_maybe_commit", make)


def readindex_before_noop() -> Any:
    """A new leader serves ReadIndex at once, before an entry of its own term has committed, so
    its commit index may lag what the previous leader acknowledged."""

    def make(original: Any) -> Any:
        def read_index(self: RaftNode, context: int, lease: bool = False) -> None:
            from kommander.core.errors import NotLeader
            from kommander.core.types import Role

            if self.role is not Role.LEADER:
                raise NotLeader(self.leader)
            self._register_read(context)

        return read_index

    return patched(RaftNode, "read_index", make)


def heartbeat_commit_past_match() -> Any:
    """Heartbeats carry the leader's whole commit index, and a follower commits up to it over
    whatever its log holds, a stale suffix of an old term included."""

    def make_bcast(original: Any) -> Any:
        def bcast(self: RaftNode, context: int) -> None:
            for peer, pr in self.progress.items():
                self._msgs.append(Heartbeat(self.term, self.id, peer, self.log.committed, context))
                pr.sent_commit = max(pr.sent_commit, min(pr.match, self.log.committed))

        return bcast

    return patched(RaftNode, "_bcast_heartbeat", make_bcast)


def follower_read_before_apply() -> Any:
    """A follower serves a read as soon as its leader answers with the read index, without
    waiting to apply up to it: it may miss writes acknowledged before the read began."""

    def make(original: Any) -> Any:
        def read_confirmed(self: PartitionRuntime, context: int, index: int) -> None:
            from kommander.core.types import Role

            if self.core.role is not Role.LEADER and self.applied < index and context in self.reads:
                d = self.reads.pop(context)[0]
                d.callback(index)
                return
            original(self, context, index)

        return read_confirmed

    return patched(PartitionRuntime, "read_confirmed", make)


def config_at_commit() -> Any:
    """Commit counting (and ReadIndex) uses the configuration in force at the commit index
    instead of the latest one in the log: a joint configuration counts only the old voters until
    it commits, so the entry that adds or removes a voter commits without a majority of the new
    voters (the thesis requires the latest configuration, committed or not)."""
    from kommander.core.membership import Reconfig, majority_index

    def make(original: Any) -> Any:
        def acked(self: Any, values: dict[str, int]) -> int:
            m = self.membership_at(self.log.committed)
            index = majority_index(m.voters, values)
            if m.outgoing:
                index = min(index, majority_index(m.outgoing, values))
            return index

        return acked

    return patched(Reconfig, "_acked", make)


#: name -> mutation
MUTATIONS: dict[str, Callable[[], Any]] = {
    "deferred_recursion": deferred_recursion,
    "stale_progress_after_wipe": stale_progress_after_wipe,
    "swallow_sm_errors": swallow_sm_errors,
    "batch_drop_oversized": batch_drop_oversized,
    "compact_before_verify": compact_before_verify,
    "figure8_commit_old_term": figure8_commit_old_term,
    "readindex_before_noop": readindex_before_noop,
    "heartbeat_commit_past_match": heartbeat_commit_past_match,
    "follower_read_before_apply": follower_read_before_apply,
    "config_at_commit": config_at_commit,
}

#: name -> the profile that exercises it
MUTATION_PROFILES = {
    "deferred_recursion": "fired",
    "stale_progress_after_wipe": "wipe",
    "swallow_sm_errors": "smfault",
    "batch_drop_oversized": "oversize",
    "compact_before_verify": "corrupt",
    "figure8_commit_old_term": "base",
    "readindex_before_noop": "base",
    "heartbeat_commit_past_match": "base",
    "follower_read_before_apply": "base",
    "config_at_commit": "members",
}

__all__ = ["MUTATIONS", "MUTATION_PROFILES", "ProgressState"]
