"""Scenarios of the Raft paper (Ongaro and Ousterhout, "In Search of an Understandable Consensus
Algorithm", 2014), set up on a :class:`~tests.core.harness.Network`."""

from __future__ import annotations

import dataclasses

from kommander.core.types import AppendEntries, Message

from .harness import Network

#: Figure 7: the leader of term 8 and the logs (a)-(f) its followers might hold, as entry terms.
FIGURE_7_LEADER = (1, 1, 1, 4, 4, 5, 5, 6, 6, 6)
FIGURE_7_FOLLOWERS = {
    "a": (1, 1, 1, 4, 4, 5, 5, 6, 6),  # missing one entry
    "b": (1, 1, 1, 4),  # missing many
    "c": (1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6),  # an extra, uncommitted entry of term 6
    "d": (1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7),  # extra entries of a term the leader never saw
    "e": (1, 1, 1, 4, 4, 4, 4),  # missing entries and holding others of term 4
    "f": (1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3),  # led terms 2 and 3 alone
}


def strip_term(term: int):
    """A rewriter that removes entries of ``term`` from every AppendEntries (they are always the
    message's tail, so what remains is still a valid AppendEntries)."""

    def rewrite(m: Message) -> Message:
        if type(m) is AppendEntries and m.entries and m.entries[-1].term == term:
            kept = tuple(e for e in m.entries if e.term != term)
            return dataclasses.replace(m, entries=kept)
        return m

    return rewrite


def figure_8_c() -> Network:
    """Figure 8 up to (c), five servers S1..S5 as n1..n5.

    (a) S1 led term 2 and replicated index 2 to S2. (b) S5 was elected in term 3 by S3, S4 and
    itself, and appended a different entry at index 2. (c) S5 has crashed; S1 is elected in term 4
    and replicates its term-2 entry to S3 and S4, while its own term-4 no-op does not get out.

    The Raft of the paper: no PreVote, no CheckQuorum, and one entry per AppendEntries so the
    term-2 entry travels alone.
    """
    net = Network(
        5,
        logs={"n1": [1, 2], "n2": [1, 2], "n3": [1], "n4": [1], "n5": [1, 3]},
        terms={"n1": 3, "n2": 3, "n3": 3, "n4": 3, "n5": 3},
        votes={"n3": "n5", "n4": "n5", "n5": "n5"},
        pre_vote=False,
        check_quorum=False,
        max_msg_entries=1,
    )
    net.crash("n5")
    net.rewriters.append(strip_term(4))
    net.elect("n1")
    assert net["n1"].term == 4
    return net
