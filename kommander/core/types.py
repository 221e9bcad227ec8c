"""Data the core consumes and produces: log entries, Raft messages, hard state and ``Ready``.

Everything here is an immutable, slotted dataclass holding tuples, never lists, so that a value
handed to the runtime (or shared between simulated nodes) can never change under anyone's feet.
Node ids are strings. Log indexes and terms are non-negative integers that fit in 64 bits; index 0
and term 0 stand for "before the first entry".
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import NamedTuple

NodeId = str
#: What a node id may be: 1-64 characters of letters, digits and ``_ . : -``, starting with a
#: letter or digit. Checked wherever one comes in: the configuration, the command line, the
#: membership record, multicast announcements and certificates.
NODE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


class EntryKind(enum.IntEnum):
    """What an entry means to the layer that applies it. The values are part of the wire format."""

    #: An application entry, applied as soon as it is committed.
    NORMAL = 0
    #: Appended by a new leader at the start of its term; carries nothing. Committing it commits
    #: everything before it (Raft paper, section 8) and resolves undecided two-phase tickets.
    NOOP = 1
    #: A two-phase application entry: applied only when a ``COMMIT`` marker for its ticket is.
    PROPOSED = 2
    #: Two-phase decision: apply the ``PROPOSED`` entries of ``ticket``.
    COMMIT = 3
    #: Two-phase decision: discard the ``PROPOSED`` entries of ``ticket``.
    ROLLBACK = 4
    #: A checkpoint marker written by ``replicate_checkpoint``.
    CHECKPOINT = 5
    #: A configuration change: ``data`` encodes the partition's new :class:`Membership`
    #: (:func:`kommander.core.membership.encode_membership`). It takes effect as soon as it is in
    #: the log, committed or not (Raft thesis, section 4.1).
    CONFIG = 6


class Entry(NamedTuple):
    """One log entry.

    Immutable like every other value here, but a named tuple rather than a frozen dataclass: the
    leader builds one per proposed entry and every follower one per received entry, and a loaded
    leader's profile put the dataclass constructor near 10% of its CPU (a named tuple costs a
    third of it). Compare entries with ``==`` only with other entries.

    :ivar index: position in the partition's log, from 1, without gaps.
    :ivar term: the leader's term when the entry was created.
    :ivar kind: see :class:`EntryKind`.
    :ivar log_type: the application's label for the entry (the seed's ``LogType``).
    :ivar data: the application's payload.
    :ivar timestamp: Hybrid Logical Clock reading taken by the runtime when it proposed the entry
        (packed as ``physical_ms << 16 | logical``), 0 when none was given.
    :ivar ticket: for ``PROPOSED`` entries, the ticket (index of the first entry of the proposal
        batch); for ``COMMIT`` and ``ROLLBACK``, the ticket decided; 0 otherwise.
    """

    index: int
    term: int
    kind: EntryKind = EntryKind.NORMAL
    log_type: str = ""
    data: bytes = b""
    timestamp: int = 0
    ticket: int = 0


class Proposal(NamedTuple):
    """What the runtime hands to :meth:`RaftNode.propose` for one entry; the core adds index and term.

    A named tuple rather than a frozen dataclass: one is built per proposed entry, and the
    profile of a loaded leader showed the dataclass constructor (see STYLE.md, section 3)."""

    log_type: str
    data: bytes
    timestamp: int = 0
    kind: EntryKind = EntryKind.NORMAL
    ticket: int = 0


@dataclass(frozen=True, slots=True)
class HardState:
    """State that must be durable before any message depending on it leaves the node.

    ``commit`` is persisted for faster recovery only; losing it is safe.
    """

    term: int = 0
    vote: NodeId | None = None
    commit: int = 0


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state the runtime reports to the application: who leads, and in which term."""

    role: Role
    leader: NodeId | None
    term: int


@dataclass(frozen=True, slots=True)
class ReadState:
    """A confirmed ReadIndex request: once ``index`` is applied locally, reading is linearizable."""

    context: int
    index: int


@dataclass(frozen=True, slots=True)
class Membership:
    """A partition's configuration: who votes and who only receives the log.

    While a change is under way the configuration is *joint* (Raft thesis, chapter 4):
    ``voters`` are the incoming voters, ``outgoing`` the voters before the change, and every
    decision needs a majority of each. Outside a change ``outgoing`` is empty.

    :ivar voters: the (incoming) voters.
    :ivar learners: receive the log and snapshots; never vote or count towards any quorum.
    :ivar outgoing: the old voters while joint, else empty.
    """

    voters: frozenset[str]
    learners: frozenset[str] = frozenset()
    outgoing: frozenset[str] = frozenset()

    @property
    def joint(self) -> bool:
        return bool(self.outgoing)

    @property
    def members(self) -> frozenset[str]:
        return self.voters | self.learners | self.outgoing

    def __repr__(self) -> str:
        text = f"voters={sorted(self.voters)}"
        if self.learners:
            text += f", learners={sorted(self.learners)}"
        if self.outgoing:
            text += f", outgoing={sorted(self.outgoing)}"
        return f"Membership({text})"


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """Describes a state-machine snapshot: it holds the effect of every entry up to ``index``.

    ``membership`` is the configuration at ``index`` (``None``: not recorded, as in snapshots
    taken before configurations were replicated); it does not take part in comparisons, so a
    snapshot is identified by ``(index, term)`` alone.
    """

    index: int
    term: int
    membership: Membership | None = field(default=None, compare=False)


# --------------------------------------------------------------------------- messages
# Every message carries the sender's term, its id and the recipient's id. Messages are per
# partition: the runtime adds the partition number when it hands them to a transport.


@dataclass(frozen=True, slots=True)
class VoteRequest:
    """RequestVote (and PreVote when ``pre_vote``). ``transfer`` marks a leadership transfer,
    which lets voters ignore their leader lease. ``pristine`` says the sender never had a history
    (an empty log and, before this request, term 0 or new storage): see
    :mod:`kommander.core.rejoin`."""

    term: int
    src: NodeId
    dst: NodeId
    last_index: int
    last_term: int
    pre_vote: bool = False
    transfer: bool = False
    pristine: bool = False


@dataclass(frozen=True, slots=True)
class VoteResponse:
    term: int
    src: NodeId
    dst: NodeId
    granted: bool
    pre_vote: bool = False
    #: A grant of a node on new storage (see kommander/core/rejoin.py): it counts only towards a
    #: unanimous election, never towards a majority.
    catching_up: bool = False


@dataclass(frozen=True, slots=True)
class AppendEntries:
    """AppendEntries carrying ``entries`` that follow ``(prev_index, prev_term)``."""

    term: int
    src: NodeId
    dst: NodeId
    prev_index: int
    prev_term: int
    entries: tuple[Entry, ...]
    commit: int


@dataclass(frozen=True, slots=True)
class AppendEntriesResponse:
    """Reply to :class:`AppendEntries`.

    On success ``index`` is the last index the follower now holds in agreement with the leader.
    On rejection ``index`` is the rejected ``prev_index`` and ``(hint_index, hint_term)`` tell the
    leader where the logs may agree: the follower's last index at or below ``prev_index`` whose
    term is at most the rejected ``prev_term``, and that entry's term.

    ``storage_id`` identifies the follower's disk (0: unknown); a new one tells the leader to
    probe it from scratch. ``catching_up``: the follower's acknowledgements do not count towards
    commit yet (see :mod:`kommander.core.rejoin`).
    """

    term: int
    src: NodeId
    dst: NodeId
    success: bool
    index: int
    hint_index: int = 0
    hint_term: int = 0
    storage_id: int = 0
    catching_up: bool = False


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Leader liveness and commit propagation. ``commit`` never exceeds what the follower is known
    to hold. ``context`` numbers the heartbeat round, which confirms ReadIndex requests.
    ``quiesce``: the leader's last heartbeat before it goes quiet; ``commit`` is then its last
    index (see :mod:`kommander.core.quiesce`)."""

    term: int
    src: NodeId
    dst: NodeId
    commit: int
    context: int = 0
    quiesce: bool = False


@dataclass(frozen=True, slots=True)
class HeartbeatResponse:
    """Reply to :class:`Heartbeat`; ``storage_id`` and ``catching_up`` as in
    :class:`AppendEntriesResponse` (a catching-up follower does not count towards ReadIndex)."""

    term: int
    src: NodeId
    dst: NodeId
    context: int = 0
    storage_id: int = 0
    catching_up: bool = False


@dataclass(frozen=True, slots=True)
class TimeoutNow:
    """Leadership transfer: the recipient starts an election at once, skipping PreVote.

    ``index`` is the leader's last log index when it sent this, which the target was known to
    hold. The leader takes no proposals while a transfer is under way, so a target that holds an
    entry after ``index`` knows the leader has since given the transfer up, and ignores it.
    """

    term: int
    src: NodeId
    dst: NodeId
    index: int = 0


@dataclass(frozen=True, slots=True)
class InstallSnapshot:
    """The leader's log no longer holds what the follower needs: install the snapshot ``meta``.

    The core only names the snapshot; the runtime streams its bytes and steps this message into
    the follower's core once the follower holds the whole snapshot.
    """

    term: int
    src: NodeId
    dst: NodeId
    meta: SnapshotMeta


@dataclass(frozen=True, slots=True)
class ReadIndexRequest:
    """Follower read (as etcd's forwarded ``MsgReadIndex``): the follower asks its leader for a
    read index for every read that waited on it since its last request. ``request_id`` is the
    follower's, unique per core instance (its first one is drawn at random, so a restarted
    follower cannot mistake an answer meant for its previous life for one of its own).
    ``lease``: every read it carries is a lease read, so a leader whose lease holds may answer
    at once with its commit index instead of waiting for a heartbeat round."""

    term: int
    src: NodeId
    dst: NodeId
    request_id: int
    lease: bool = False


@dataclass(frozen=True, slots=True)
class ReadIndexResponse:
    """The leader's answer to :class:`ReadIndexRequest`: with ``success``, ``index`` is its commit
    index when the request arrived, confirmed by a heartbeat round a quorum acknowledged after
    that; without, the sender cannot confirm (it does not lead, or lost leadership first)."""

    term: int
    src: NodeId
    dst: NodeId
    request_id: int
    index: int
    success: bool


# --------------------------------------------------------------------------- runtime messages
# Snapshot bytes are streamed by the runtime, not the core; these travel over the same transport.


@dataclass(frozen=True, slots=True)
class SnapshotChunk:
    """A piece of the snapshot ``meta`` from the leader: ``data`` belongs at byte ``offset``;
    ``done`` marks the last piece."""

    term: int
    src: NodeId
    dst: NodeId
    meta: SnapshotMeta
    offset: int
    data: bytes
    done: bool


@dataclass(frozen=True, slots=True)
class SnapshotChunkAck:
    """The follower's reply to a :class:`SnapshotChunk`: it holds ``offset`` bytes of snapshot
    ``meta`` (flow control). ``success`` is false when it wants the transfer restarted from 0."""

    term: int
    src: NodeId
    dst: NodeId
    meta: SnapshotMeta
    offset: int
    success: bool


@dataclass(frozen=True, slots=True)
class NodeHeartbeat:
    """Node liveness, one per pair of nodes per heartbeat interval whatever the partition count:
    it keeps partitions quiesced under the sender alive (see :mod:`kommander.core.quiesce`). Not a
    partition's message: the runtime sends it with partition 0 and term 0, and never steps it
    into a core."""

    term: int
    src: NodeId
    dst: NodeId


Message = (
    VoteRequest
    | VoteResponse
    | AppendEntries
    | AppendEntriesResponse
    | Heartbeat
    | HeartbeatResponse
    | TimeoutNow
    | InstallSnapshot
    | SnapshotChunk
    | SnapshotChunkAck
    | ReadIndexRequest
    | ReadIndexResponse
    | NodeHeartbeat
)

MESSAGE_TYPES: tuple[type, ...] = (
    VoteRequest,
    VoteResponse,
    AppendEntries,
    AppendEntriesResponse,
    Heartbeat,
    HeartbeatResponse,
    TimeoutNow,
    InstallSnapshot,
    SnapshotChunk,
    SnapshotChunkAck,
    ReadIndexRequest,
    ReadIndexResponse,
    NodeHeartbeat,
)


@dataclass(frozen=True, slots=True)
class Ready:
    """Everything the core wants done, handed out once by :meth:`RaftNode.ready`.

    The runtime's contract, which the simulator enforces:

    1. Persist ``hard_state`` (when not ``None``) and ``entries`` as one ordered write. When
       ``entries`` starts at or below the last stored index, the stored suffix from
       ``entries[0].index`` is replaced. Writes of successive ``Ready`` objects are applied in the
       order ``ready()`` returned them.
    2. ``messages`` may be sent at once, before that write completes: none of them promises
       anything about this node's disk. They are a leader's AppendEntries, heartbeats,
       InstallSnapshot and TimeoutNow (the Raft thesis, section 10.2.1, allows replication in
       parallel with the leader's own write because the leader counts itself towards a quorum
       only once ``advance`` says its entries are durable), and any node's replies that promise
       nothing durable: heartbeat replies, AppendEntries rejections, refused votes, PreVote
       answers, and the term-revealing answers to stale leaders and pre-candidates.
    3. ``persisted_messages`` must not leave the node before this ``Ready``'s write is durable:
       they promise what is on disk. They are granted votes, this candidate's vote requests (its
       own vote is in ``hard_state``) and successful AppendEntries / InstallSnapshot replies.
    4. ``snapshot``, when set, must be installed in the state machine (and recorded in the WAL)
       before ``committed_entries`` are applied.
    5. ``committed_entries`` are applied in order; they never run ahead of what is durable locally.
    6. Call :meth:`RaftNode.advance` with this object once its write is durable, in ``ready()`` order.

    ``soft_state`` is set when the role, leader or term changed. ``read_states`` are confirmed
    ReadIndex requests.
    """

    hard_state: HardState | None = None
    entries: tuple[Entry, ...] = ()
    messages: tuple[Message, ...] = ()
    persisted_messages: tuple[Message, ...] = ()
    committed_entries: tuple[Entry, ...] = ()
    read_states: tuple[ReadState, ...] = ()
    soft_state: SoftState | None = None
    snapshot: SnapshotMeta | None = None
    #: ReadIndex contexts that will never be confirmed (leadership lost or never held).
    dropped_reads: tuple[int, ...] = field(default=())

    def must_persist(self) -> bool:
        """Whether the runtime has anything to write for this ``Ready``."""
        return self.hard_state is not None or bool(self.entries) or self.snapshot is not None
