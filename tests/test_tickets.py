"""Tests of the two-phase ticket lifecycle (kommander.runtime.tickets and its use by the partition and
the manager): a ticket is kept until it is decided, a timed-out proposal hands back its ticket, an
undecided ticket expires through the log, and no undecided ticket is applied after a leader failover.

Clusters run on one task.Clock and a MemoryNetwork (see runtime_harness); nothing sleeps.
"""

from __future__ import annotations

from twisted.logger import capturedLogs

from kommander.core.types import EntryKind
from kommander.results import RaftOperationStatus as Status
from kommander.runtime.tickets import HeldTickets, TicketBook

from runtime_harness import Cluster, Node, RecordingStateMachine


def propose(cluster: Cluster, partition: int, data: list[bytes]):
    """Replicate ``data`` as an undecided two-phase ticket through the current leader."""
    result = cluster.write(partition, data, auto_commit=False)
    assert result.success, result
    return result


def seen(node: Node, partition: int) -> list[bytes]:
    """Every payload the node applied or replayed on ``partition``, every lifetime."""
    return [e.data for e in node.applied[partition] + node.restored[partition]]


def never_applied(cluster: Cluster, partition: int, payloads: list[bytes]) -> None:
    for node in cluster.nodes.values():
        assert not set(payloads) & set(seen(node, partition)), (node.node_id, seen(node, partition))


def cut_off(cluster: Cluster, leader: Node) -> None:
    """Block every link between ``leader`` and the others, both ways."""
    for other in cluster.ids:
        if other != leader.node_id:
            cluster.network.block(leader.node_id, other, both_ways=True)


def log_kinds(node: Node, partition: int, kind: EntryKind) -> list[int]:
    """Tickets of the entries of ``kind`` in the node's WAL."""
    return [e.ticket for e in node.wal._logs[partition].entries if e.kind is kind]


# ---------------------------------------------------------------------- keeping the ticket until decided


def test_commit_logs_is_not_refused_by_a_full_queue_and_the_ticket_survives() -> None:
    """With the proposal queue full, commit_logs still commits the ticket (a decision frees what the ticket
    holds); it never answers QUEUE_FULL and then forgets the ticket so that the retry is REFUSED."""
    cluster = Cluster(3, 1, seed=20, max_queued_proposals=8).start_all()
    leader = cluster.wait_for_leaders()[0]
    m = leader.m
    ticket = propose(cluster, 0, [b"t1", b"t2"]).ticket_id
    fillers = [m.replicate_logs(0, "t", b"f%d" % i) for i in range(10)]
    assert any(d.called and cluster.result(d).status is Status.QUEUE_FULL for d in fillers), "queue not full"
    result = cluster.wait(m.commit_logs(0, ticket))
    if result.status is Status.QUEUE_FULL:  # what the old code answered: a retry must still work
        cluster.wait_caught_up()
        result = cluster.wait(m.commit_logs(0, ticket))
    assert result.success, result
    cluster.wait_caught_up()
    for node in cluster.running():
        assert b"t1" in node.data(0) and b"t2" in node.data(0)
        assert node.m.runtimes[0].tickets == {}
    cluster.close()


def test_a_decision_that_never_entered_the_log_leaves_the_ticket_decidable() -> None:
    """A commit_logs queued while a leadership transfer refuses proposals times out with nothing written; the
    ticket stays undecided, and once the transfer is abandoned the same commit_logs succeeds."""
    cluster = Cluster(3, 1, seed=21, operation_timeout=0.2).start_all()
    leader = cluster.wait_for_leaders()[0]
    m = leader.m
    ticket = propose(cluster, 0, [b"x"]).ticket_id
    target = next(i for i in cluster.ids if i != leader.node_id)
    cluster.network.block(leader.node_id, target, both_ways=True)
    m.transfer_leadership(0, target)
    last = m.runtimes[0].core.log.last_index()
    first = cluster.wait(m.commit_logs(0, ticket), max_seconds=1)
    assert first.status is Status.TIMEOUT and first.log_index == 0, first
    assert m.runtimes[0].core.log.last_index() == last, "the decision was written after all"
    # The transfer is abandoned after an election timeout; the leader takes proposals again.
    cluster.run_until(lambda: m.runtimes[0].core.lead_transferee is None, 5)
    assert m.am_i_leader(0)
    second = cluster.wait(m.commit_logs(0, ticket))
    assert second.success, second
    cluster.network.heal()
    cluster.wait_caught_up()
    for node in cluster.running():
        assert b"x" in node.data(0)
    cluster.close()


def test_a_timed_out_proposal_hands_back_its_ticket_which_can_still_be_committed() -> None:
    """A two-phase proposal whose quorum is late ends with TIMEOUT carrying its ticket and last index; its
    entries commit once the quorum is back, and commit_logs with that ticket applies them everywhere."""
    cluster = Cluster(3, 1, seed=22, check_quorum=False, operation_timeout=0.2).start_all()
    leader = cluster.wait_for_leaders()[0]
    m = leader.m
    cut_off(cluster, leader)
    d = m.replicate_logs(0, "t", [b"late1", b"late2"], auto_commit=False)
    result = cluster.wait(d, max_seconds=1)  # shorter than an election timeout: the leader stays
    assert result.status is Status.TIMEOUT and not result.success
    assert result.ticket_id > 0 and result.log_index == result.ticket_id + 1, result
    cluster.heal()
    cluster.run_until(lambda: m.runtimes[0].applied >= result.log_index, 5)
    assert m.am_i_leader(0)
    committed = cluster.wait(m.commit_logs(0, result.ticket_id))
    assert committed.success and committed.ticket_id == result.ticket_id, committed
    cluster.wait_caught_up()
    for node in cluster.running():
        assert node.data(0)[-2:] == [b"late1", b"late2"]
    cluster.close()


def test_a_ticket_whose_entries_are_not_yet_committed_is_refused_as_replicating() -> None:
    """commit_logs for a timed-out ticket whose entries are still uncommitted is REFUSED saying so, and the
    ticket is kept."""
    cluster = Cluster(3, 1, seed=23, check_quorum=False, operation_timeout=0.2).start_all()
    leader = cluster.wait_for_leaders()[0]
    cut_off(cluster, leader)
    result = cluster.wait(leader.m.replicate_logs(0, "t", [b"r"], auto_commit=False), max_seconds=1)
    early = cluster.result(leader.m.commit_logs(0, result.ticket_id))
    assert early.status is Status.REFUSED and "still being replicated" in early.error
    cluster.heal()
    cluster.run_until(lambda: leader.m.runtimes[0].applied >= result.log_index, 5)
    assert cluster.wait(leader.m.commit_logs(0, result.ticket_id)).success
    cluster.close()


# ---------------------------------------------------------------------- expiry


def test_an_undecided_ticket_expires_through_the_log_on_every_node() -> None:
    """A ticket left undecided past ticket_timeout is rolled back by a ROLLBACK entry the leader writes: every
    node forgets it (memory and later snapshots), none applies it, and commit_logs / rollback_logs then answer
    EXPIRED."""
    cluster = Cluster(
        3, 1, seed=24, state_machine=RecordingStateMachine, ticket_timeout=2.0, operation_timeout=1.0
    ).start_all()
    leader = cluster.wait_for_leaders()[0]
    m = leader.m
    with capturedLogs() as events:
        ticket = propose(cluster, 0, [b"e1", b"e2"]).ticket_id
        # Followers apply the proposal once they learn its commit index (the next heartbeat).
        cluster.run_until(lambda: all(ticket in n.m.runtimes[0].tickets for n in cluster.running()), 0.2, "applied")
        cluster.advance(1.5)
        assert ticket in m.runtimes[0].tickets  # not yet
        cluster.run_until(lambda: all(not n.m.runtimes[0].tickets for n in cluster.running()), 2)
    assert any("undecided after ticket_timeout" in e.get("log_format", "") for e in events)
    for node in cluster.running():
        assert log_kinds(node, 0, EntryKind.ROLLBACK) == [ticket]
        assert node.m.runtimes[0].tickets.entries == 0
    assert len(m.runtimes[0].book) == 0
    for decide in (m.commit_logs, m.rollback_logs):
        late = cluster.result(decide(0, ticket))
        assert late.status is Status.EXPIRED and not late.success, late
        assert "ticket_timeout" in late.error
    cluster.advance(3.0)
    for node in cluster.running():
        assert log_kinds(node, 0, EntryKind.ROLLBACK) == [ticket]  # rolled back once, not again
    never_applied(cluster, 0, [b"e1", b"e2"])
    cluster.close()


def test_a_ticket_decided_in_time_does_not_expire() -> None:
    """A ticket committed before its deadline is applied and no ROLLBACK is written for it later."""
    cluster = Cluster(3, 1, seed=25, ticket_timeout=1.0, operation_timeout=1.0).start_all()
    leader = cluster.wait_for_leaders()[0]
    ticket = propose(cluster, 0, [b"kept"]).ticket_id
    assert ticket in leader.m.runtimes[0].book
    assert cluster.wait(leader.m.commit_logs(0, ticket)).success
    assert len(leader.m.runtimes[0].book) == 0  # the applied marker took it out of the book
    cluster.advance(3.0)
    cluster.wait_caught_up()
    for node in cluster.running():
        assert node.data(0) == [b"kept"]
        assert log_kinds(node, 0, EntryKind.ROLLBACK) == []
    cluster.close()


def test_a_commit_being_written_at_the_deadline_is_not_rolled_back() -> None:
    """A ticket whose commit is in the log when the deadline passes is committed, never also rolled back."""
    cluster = Cluster(3, 1, seed=26, ticket_timeout=1.0, operation_timeout=1.0).start_all()
    leader = cluster.wait_for_leaders()[0]
    ticket = propose(cluster, 0, [b"edge"]).ticket_id
    cluster.advance(0.9)
    cut_off(cluster, leader)  # the commit cannot complete before the deadline
    d = leader.m.commit_logs(0, ticket)
    cluster.advance(0.3)
    cluster.heal()
    assert cluster.wait(d).success
    cluster.advance(2.0)
    cluster.wait_caught_up()
    for node in cluster.running():
        assert node.data(0) == [b"edge"] and log_kinds(node, 0, EntryKind.ROLLBACK) == []
    cluster.close()


def test_an_expiry_rollback_that_could_not_be_written_is_tried_again() -> None:
    """When the deadline passes while a leadership transfer holds proposals back, the expiry's rollback times
    out unwritten; the leader tries again and, once the transfer is abandoned, writes exactly one rollback."""
    cluster = Cluster(3, 1, seed=29, ticket_timeout=1.0, operation_timeout=0.2).start_all()
    leader = cluster.wait_for_leaders()[0]
    m = leader.m
    ticket = propose(cluster, 0, [b"w"]).ticket_id
    target = next(i for i in cluster.ids if i != leader.node_id)
    cluster.network.block(leader.node_id, target, both_ways=True)
    cluster.advance(0.9)
    m.transfer_leadership(0, target)
    cluster.advance(0.35)  # past the deadline and the rollback's operation_timeout; the transfer goes on
    assert m.runtimes[0].core.lead_transferee == target
    assert log_kinds(leader, 0, EntryKind.ROLLBACK) == [] and ticket in m.runtimes[0].tickets
    assert m.runtimes[0].book.state(ticket, m.runtimes[0].applied) in ("expired", "pending")
    cluster.run_until(lambda: log_kinds(leader, 0, EntryKind.ROLLBACK) == [ticket], 5)
    cluster.network.heal()
    cluster.run_until(lambda: all(not n.m.runtimes[0].tickets for n in cluster.running()), 5)
    cluster.advance(1.0)
    for node in cluster.running():
        assert log_kinds(node, 0, EntryKind.ROLLBACK) == [ticket]
    never_applied(cluster, 0, [b"w"])
    cluster.close()


def test_ticket_timeout_must_cover_the_operation_timeout() -> None:
    """A ticket_timeout shorter than operation_timeout is a configuration error naming both."""
    from kommander.core.errors import ConfigurationError
    from runtime_harness import make_config

    try:
        make_config(ticket_timeout=1.0, operation_timeout=5.0).validate()
    except ConfigurationError as e:
        assert "ticket_timeout" in str(e) and "operation_timeout" in str(e)
    else:  # pragma: no cover
        raise AssertionError("accepted")


# ---------------------------------------------------------------------- failover


def test_an_undecided_ticket_is_never_applied_after_a_leader_failover() -> None:
    """A ticket held on every node, whose leader writes a commit only it ever holds and is then cut off, is
    rolled back by the new leader's no-op: no node applies it, not after the old leader rejoins, not after a
    full restart; the new leader and the old one both refuse to commit it."""
    cluster = Cluster(3, 1, seed=27, state_machine=RecordingStateMachine).start_all()
    old = cluster.wait_for_leaders()[0]
    ticket = propose(cluster, 0, [b"u1", b"u2"]).ticket_id
    cluster.isolate(old.node_id)
    lost = old.m.commit_logs(0, ticket)  # reaches the isolated leader's log only
    others = [i for i in cluster.ids if i != old.node_id]
    new = cluster.wait_for_leaders(among=others)[0]
    assert new is not old
    assert cluster.wait(lost, max_seconds=15).status in (Status.LEADERSHIP_LOST, Status.TIMEOUT)
    refused = cluster.result(new.m.commit_logs(0, ticket))
    assert refused.status is Status.REFUSED
    assert cluster.write(0, b"after").success
    cluster.heal()
    cluster.wait_for_leaders()
    cluster.wait_caught_up()
    for node in cluster.running():
        assert node.m.runtimes[0].tickets == {}
        assert b"after" in node.data(0)
    leader = cluster.leader(0)
    assert cluster.result(leader.m.commit_logs(0, ticket)).status is Status.REFUSED
    for node_id in cluster.ids:
        cluster.restart(node_id)
    cluster.wait_for_leaders()
    cluster.wait_caught_up()
    never_applied(cluster, 0, [b"u1", b"u2"])
    for node in cluster.running():
        assert not {b"u1", b"u2"} & {e.data for e in node.state_machine.applied.get(0, [])}
    cluster.close()


def test_an_expiry_rollback_cut_short_by_a_failover_still_leaves_the_ticket_unapplied() -> None:
    """A leader that expires a ticket and loses leadership before its rollback commits: the new leader's no-op
    rolls the ticket back anyway, and no node ever applies it."""
    cluster = Cluster(3, 1, seed=28, ticket_timeout=1.0, operation_timeout=1.0).start_all()
    old = cluster.wait_for_leaders()[0]
    ticket = propose(cluster, 0, [b"v"]).ticket_id
    # Cut off just before the deadline: the expiry then happens while the old leader still leads
    # (CheckQuorum needs an election timeout of silence to unseat it), whatever the core's timings.
    cluster.advance(0.9)
    cluster.isolate(old.node_id)
    cluster.run_until(lambda: log_kinds(old, 0, EntryKind.ROLLBACK) == [ticket], 2)
    others = [i for i in cluster.ids if i != old.node_id]
    cluster.wait_for_leaders(among=others)
    cluster.heal()
    cluster.wait_for_leaders()
    cluster.wait_caught_up()
    for node in cluster.running():
        assert node.m.runtimes[0].tickets == {}
    never_applied(cluster, 0, [b"v"])
    cluster.close()


# ---------------------------------------------------------------------- the pieces


def test_held_tickets_count_their_entries_exactly() -> None:
    """HeldTickets keeps its entry count through hold, release, release_all and rebuilding from a dict."""
    from kommander.core.types import Entry

    held = HeldTickets()
    for index in (5, 6, 7):
        held.hold(Entry(index, 1, EntryKind.PROPOSED, "t", b"", 0, 5))
    held.hold(Entry(9, 1, EntryKind.PROPOSED, "t", b"", 0, 9))
    assert held.entries == 4 and sorted(held) == [5, 9]
    assert len(held.release(5) or []) == 3 and held.entries == 1
    assert held.release(5) is None and held.entries == 1
    assert HeldTickets(dict(held)).entries == 1
    assert held.release_all() == [9] and held.entries == 0 and held == {}
    held.hold(Entry(11, 1, EntryKind.PROPOSED, "t", b"", 0, 11))
    assert held.pop(11) and held.entries == 0 and held.pop(11, None) is None
    held.hold(Entry(12, 1, EntryKind.PROPOSED, "t", b"", 0, 12))
    held.clear()
    assert held.entries == 0


def test_ticket_book_states_follow_the_applied_index_and_decisions() -> None:
    """TicketBook: replicating until applied reaches the last entry, then pending; deciding while a decision is
    under way, pending again if it was never written; expired once an expiry rollback is applied; cleared
    on a leadership change."""
    book = TicketBook()
    book.proposed(10, 12, term=3, deadline=5.0)
    assert book.state(10, applied=11) == "replicating"
    assert book.state(10, applied=12) == "pending"
    book.begin(10)
    assert book.state(10, 12) == "deciding" and book.due(6.0) == []
    book.not_written(10)
    assert book.state(10, 12) == "pending" and book.due(4.0) == [] and book.due(5.0) == [10]
    book.begin(10, expiring=True)
    assert book.state(10, 12) == "expired"
    book.decided(10)
    assert book.state(10, 12) == "expired" and 10 not in book
    book.proposed(20, 20, term=3, deadline=9.0)
    book.decided(20)
    assert book.state(20, 20) is None
    book.clear()
    assert book.state(10, 12) is None
