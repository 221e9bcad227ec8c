"""Tests of kommander.runtime.partition: two-phase tickets, their resolution rule, and the per-partition applier.

Clusters run on one task.Clock and a MemoryNetwork (see runtime_harness); nothing sleeps.
"""

from __future__ import annotations

from twisted.internet import task
from twisted.logger import capturedLogs

from kommander.core.types import EntryKind
from kommander.results import RaftOperationStatus as Status

from runtime_harness import Cluster, Node, RecordingStateMachine


def propose(cluster: Cluster, partition: int, data: list[bytes]):
    """Replicate ``data`` as an undecided two-phase ticket through the current leader."""
    result = cluster.write(partition, data, auto_commit=False)
    assert result.success, result
    return result


def never_applied(cluster: Cluster, partition: int, payloads: list[bytes]) -> None:
    for node in cluster.nodes.values():
        seen = [e.data for e in node.applied[partition] + node.restored[partition]]
        assert not set(payloads) & set(seen), (node.node_id, seen)
        if node.state_machine is not None:
            assert not set(payloads) & {e.data for e in node.state_machine.applied.get(partition, [])}


def transfer(cluster: Cluster, partition: int, target: str) -> Node:
    """Hand ``partition`` to ``target`` and wait until everyone follows it."""
    leader = cluster.leader(partition)
    if leader.node_id != target:
        leader.m.transfer_leadership(partition, target)
    cluster.run_until(lambda: cluster.settled(partition) and cluster.leader(partition).node_id == target, 5)
    return cluster.nodes[target]


def test_proposal_is_replicated_but_not_applied_until_committed() -> None:
    """auto_commit=False answers with a ticket once replicated; nothing is applied until commit_logs, then every
    node applies the ticket's entries in order."""
    cluster = Cluster(3, 2, seed=30, state_machine=RecordingStateMachine).start_all()
    leader = cluster.wait_for_leaders()[1]
    proposed = propose(cluster, 1, [b"a", b"b"])
    assert proposed.status is Status.SUCCESS
    assert proposed.ticket_id == proposed.log_index - 1 and proposed.results == ()
    cluster.advance(1.0)
    for node in cluster.running():
        assert node.data(1) == []
        assert node.m.runtimes[1].applied >= proposed.log_index  # committed and held, not lost
    committed = cluster.wait(leader.m.commit_logs(1, proposed.ticket_id))
    assert committed.success and committed.status is Status.SUCCESS
    assert committed.ticket_id == proposed.ticket_id
    assert committed.log_index > proposed.log_index
    assert committed.results == (b"ok:a", b"ok:b")
    cluster.wait_caught_up()
    for node in cluster.running():
        assert node.data(1) == [b"a", b"b"]
        entries = node.state_machine.applied[1]
        assert [e.index for e in entries] == [proposed.ticket_id, proposed.ticket_id + 1]
        assert all(e.kind is EntryKind.PROPOSED and e.ticket == proposed.ticket_id for e in entries)
    cluster.close()


def test_rollback_never_applies_and_the_log_moves_on() -> None:
    """rollback_logs succeeds and the ticket's entries are never applied on any node; later writes are."""
    cluster = Cluster(3, 1, seed=31, state_machine=RecordingStateMachine).start_all()
    leader = cluster.wait_for_leaders()[0]
    proposed = propose(cluster, 0, [b"gone-1", b"gone-2"])
    rolled = cluster.wait(leader.m.rollback_logs(0, proposed.ticket_id))
    assert rolled.success and rolled.status is Status.SUCCESS and rolled.results == ()
    assert cluster.write(0, b"kept").success
    cluster.wait_caught_up()
    never_applied(cluster, 0, [b"gone-1", b"gone-2"])
    for node in cluster.running():
        assert node.data(0) == [b"kept"]
        assert node.m.runtimes[0].tickets == {}
    cluster.close()


def test_decisions_are_refused_for_unknown_or_decided_tickets() -> None:
    """commit/rollback of an unknown ticket, a normal entry's index, or a ticket already decided is REFUSED and
    changes nothing; rollback after commit in particular."""
    cluster = Cluster(3, 1, seed=32).start_all()
    leader = cluster.wait_for_leaders()[0]
    m = leader.m
    normal = cluster.write(0, b"plain")
    for ticket in (9999, normal.log_index, 0):
        for decide in (m.commit_logs, m.rollback_logs):
            result = cluster.wait(decide(0, ticket))
            assert result.status is Status.REFUSED and not result.success and "unknown ticket" in result.error
    committed_ticket = propose(cluster, 0, [b"c"]).ticket_id
    assert cluster.wait(m.commit_logs(0, committed_ticket)).success
    last = m.runtimes[0].core.log.last_index()
    for decide in (m.rollback_logs, m.commit_logs):
        result = cluster.wait(decide(0, committed_ticket))
        assert result.status is Status.REFUSED
    rolled_ticket = propose(cluster, 0, [b"r"]).ticket_id
    assert cluster.wait(m.rollback_logs(0, rolled_ticket)).success
    for decide in (m.commit_logs, m.rollback_logs):
        assert cluster.wait(decide(0, rolled_ticket)).status is Status.REFUSED
    assert m.runtimes[0].core.log.last_index() == last + 2  # the proposal and its rollback only
    cluster.wait_caught_up()
    for node in cluster.running():
        assert node.data(0) == [b"plain", b"c"]
    cluster.close()


def test_a_second_decision_while_the_first_is_written_is_refused() -> None:
    """While a commit for a ticket is being written, another commit or a rollback of it is REFUSED."""
    cluster = Cluster(3, 1, seed=33).start_all()
    m = cluster.wait_for_leaders()[0].m
    ticket = propose(cluster, 0, [b"t"]).ticket_id
    first = m.commit_logs(0, ticket)
    second = m.rollback_logs(0, ticket)
    assert second.called and cluster.result(second).status is Status.REFUSED
    assert "already being written" in cluster.result(second).error
    assert cluster.wait(first).success
    cluster.close()


def test_concurrent_tickets_and_plain_writes_are_decided_independently() -> None:
    """Two tickets proposed in one turn between plain writes get distinct tickets; committing one and rolling back
    the other applies exactly the committed one, at its commit marker's place in the log."""
    cluster = Cluster(3, 1, seed=34).start_all()
    m = cluster.wait_for_leaders()[0].m
    calls = [
        m.replicate_logs(0, "t", b"p1"),
        m.replicate_logs(0, "t", [b"x1", b"x2"], auto_commit=False),
        m.replicate_logs(0, "t", b"p2"),
        m.replicate_logs(0, "t", [b"y1", b"y2", b"y3"], auto_commit=False),
        m.replicate_logs(0, "t", b"p3"),
    ]
    cluster.run_until(lambda: all(d.called for d in calls), 5)
    p1, x, p2, y, p3 = (cluster.result(d) for d in calls)
    assert all(r.success for r in (p1, x, p2, y, p3))
    assert x.ticket_id != y.ticket_id
    assert (x.log_index - x.ticket_id, y.log_index - y.ticket_id) == (1, 2)
    assert p1.log_index < x.ticket_id and x.log_index < p2.log_index < y.ticket_id and y.log_index < p3.log_index
    assert cluster.wait(m.rollback_logs(0, x.ticket_id)).success
    assert cluster.wait(m.commit_logs(0, y.ticket_id)).success
    cluster.wait_caught_up()
    for node in cluster.running():
        assert node.data(0) == [b"p1", b"p2", b"p3", b"y1", b"y2", b"y3"]
    cluster.close()


def test_leader_change_between_propose_and_decision_rolls_the_ticket_back() -> None:
    """A ticket whose leader is cut off before deciding is rolled back on every node by the new leader's no-op
    (never applied), and a later commit_logs on the old leader answers NOT_LEADER."""
    cluster = Cluster(3, 1, seed=35, state_machine=RecordingStateMachine).start_all()
    old = cluster.wait_for_leaders()[0]
    proposed = propose(cluster, 0, [b"undecided-1", b"undecided-2"])
    cluster.wait_caught_up()
    for node in cluster.running():
        assert proposed.ticket_id in node.m.runtimes[0].tickets  # held everywhere
    with capturedLogs() as events:
        cluster.isolate(old.node_id)
        rest = [i for i in cluster.ids if i != old.node_id]
        new = cluster.wait_for_leaders(rest)[0]
        cluster.wait_caught_up(rest)
    for node in cluster.running(rest):
        assert node.m.runtimes[0].tickets == {}
    assert any(proposed.ticket_id in e.get("tickets", ()) for e in events), "the roll-back was not logged"
    # The new leader never knew the ticket.
    refused = cluster.wait(new.m.commit_logs(0, proposed.ticket_id))
    assert refused.status is Status.REFUSED
    cluster.heal()
    cluster.wait_for_leaders()
    assert not old.m.am_i_leader(0)
    late = cluster.wait(old.m.commit_logs(0, proposed.ticket_id))
    assert late.status is Status.NOT_LEADER and late.leader == new.node_id
    assert cluster.write(0, b"after").success
    cluster.wait_caught_up()
    never_applied(cluster, 0, [b"undecided-1", b"undecided-2"])
    for node in cluster.running():
        assert node.data(0) == [b"after"]
        assert node.m.runtimes[0].tickets == {}
    cluster.close()


def test_a_ticket_does_not_survive_its_leader_term_even_on_the_same_node() -> None:
    """After leadership moves away and back, the original leader refuses to commit its old ticket: a ticket
    lives within one leader term."""
    cluster = Cluster(3, 1, seed=36).start_all()
    first = cluster.wait_for_leaders()[0]
    proposed = propose(cluster, 0, [b"old-term"])
    other = next(i for i in cluster.ids if i != first.node_id)
    transfer(cluster, 0, other)
    transfer(cluster, 0, first.node_id)
    result = cluster.wait(first.m.commit_logs(0, proposed.ticket_id))
    assert result.status is Status.REFUSED
    cluster.wait_caught_up()
    never_applied(cluster, 0, [b"old-term"])
    cluster.close()


def test_restart_replays_committed_tickets_and_never_rolled_back_or_undecided_ones() -> None:
    """After a full restart every node replays a committed ticket's entries through on_log_restored, exactly
    once, and never a rolled-back or undecided ticket's."""
    cluster = Cluster(3, 1, seed=37).start_all()
    m = cluster.wait_for_leaders()[0].m
    kept = propose(cluster, 0, [b"k1", b"k2"])
    dropped = propose(cluster, 0, [b"d1"])
    undecided = propose(cluster, 0, [b"u1"])
    assert cluster.wait(m.commit_logs(0, kept.ticket_id)).success
    assert cluster.wait(m.rollback_logs(0, dropped.ticket_id)).success
    assert cluster.write(0, b"plain").success
    assert undecided.success
    cluster.wait_caught_up()
    for node_id in cluster.ids:
        cluster.stop(node_id)
    cluster.start_all()
    cluster.wait_for_leaders()
    cluster.wait_caught_up()
    for node in cluster.running():
        assert node.data(0) == [b"k1", b"k2", b"plain"], node.node_id
        assert node.m.runtimes[0].tickets == {}
    never_applied(cluster, 0, [b"d1", b"u1"])
    cluster.close()


def test_a_follower_down_during_the_decision_applies_the_ticket_on_catch_up() -> None:
    """A follower stopped between propose and commit applies the ticket after restarting and catching up."""
    cluster = Cluster(3, 1, seed=38).start_all()
    leader = cluster.wait_for_leaders()[0]
    follower = next(n for n in cluster.running() if n is not leader)
    proposed = propose(cluster, 0, [b"t1", b"t2"])
    cluster.wait_caught_up()
    cluster.stop(follower.node_id)
    assert cluster.wait(leader.m.commit_logs(0, proposed.ticket_id)).success
    cluster.start(follower.node_id)
    cluster.wait_caught_up()
    assert follower.data(0) == [b"t1", b"t2"]
    cluster.close()


def test_committed_ticket_on_a_deposed_leader_cannot_be_committed_after_a_rollback() -> None:
    """If leadership moves while a ticket's entries are committed but not yet applied on the leader (its applier
    is busy), the ticket is rolled back; when that node leads again, commit_logs must not report SUCCESS."""

    class Slow(RecordingStateMachine):
        def apply(self, partition, entry):
            super().apply(partition, entry)
            if entry.data == b"slow":
                return task.deferLater(cluster.clock, 2.0, lambda: True)
            return True

    cluster = Cluster(3, 1, seed=39, state_machine=Slow).start_all()
    first = cluster.wait_for_leaders()[0]
    other = next(i for i in cluster.ids if i != first.node_id)
    slow = first.m.replicate_logs(0, "t", b"slow")
    ticket_d = first.m.replicate_logs(0, "t", [b"late-1"], auto_commit=False)
    # Both commit quickly; the leader's applier is stuck on "slow" for 2 s.
    cluster.run_until(lambda: first.m.runtimes[0].core.log.committed >= first.m.runtimes[0].core.log.last_index(), 1)
    assert not ticket_d.called
    transfer(cluster, 0, other)
    proposal = cluster.wait(ticket_d)
    ticket_id = cluster.wait(slow).log_index + 1  # the ticket is its first entry's index
    assert proposal.ticket_id in (0, ticket_id)  # whether or not the proposal reports SUCCESS
    transfer(cluster, 0, first.node_id)
    cluster.wait_caught_up()
    never_applied(cluster, 0, [b"late-1"])  # the new leaders' no-ops rolled it back
    result = cluster.wait(first.m.commit_logs(0, ticket_id))
    cluster.wait_caught_up()
    never_applied(cluster, 0, [b"late-1"])
    assert result.status is Status.REFUSED, (
        f"commit_logs reported {result.status} for a ticket that was rolled back and never applied"
    )
    cluster.close()
