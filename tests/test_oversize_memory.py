"""The memory transport's frame limit: one message too large is dropped alone (issue 9, fault 3)."""

from __future__ import annotations

import pytest
from twisted.internet import task
from twisted.logger import Logger, formatEvent

from kommander.core.types import AppendEntries, Entry
from kommander.plugins.memory_transport import MemoryNetwork
from kommander.runtime.framing import declared_frame_limit
from test_memory_transport import cluster, hb

LIMIT = 4096


def big(src: str, dst: str) -> AppendEntries:
    return AppendEntries(1, src, dst, 0, 0, (Entry(1, 1, data=bytes(2 * LIMIT)),), 0)


@pytest.mark.parametrize("codec", [False, True], ids=["objects", "codec"])
def test_batch_with_one_unsendable_message_still_delivers_the_others(codec: bool) -> None:
    """A batch whose middle message is over max_frame_bytes delivers the two others, in order."""
    clock = task.Clock()
    network, t, r = cluster(clock, max_frame_bytes=LIMIT, codec=codec)
    first, last = hb("a", "b", 1), hb("a", "b", 2)
    t["a"].send("b", [(0, first), (1, big("a", "b")), (2, last)])
    clock.advance(0)
    assert [(p, m) for _, p, m in r["b"].messages] == [(0, first), (2, last)]
    assert network.stats["dropped.too-large"] == 1 and network.stats["delivered"] == 2


def test_too_large_drops_are_logged_rate_limited() -> None:
    """The first drop is logged at once; the next ones within 10 s are counted into one later line."""
    clock = task.Clock()
    network, t, _ = cluster(clock, max_frame_bytes=LIMIT)
    events: list = []
    network._log = Logger(observer=events.append)
    for _ in range(3):
        t["a"].send("b", [(0, big("a", "b"))])
    clock.advance(10)
    t["a"].send("b", [(0, big("a", "b"))])
    lines = [formatEvent(e) for e in events if "max_frame_bytes" in formatEvent(e)]
    assert len(lines) == 2 and "(2 more dropped" in lines[1], lines


def test_transports_declare_the_network_limit() -> None:
    """A network's max_frame_bytes is what its transports declare; without one they declare none."""
    clock = task.Clock()
    _, limited, _ = cluster(clock, max_frame_bytes=LIMIT)
    _, unlimited, _ = cluster(task.Clock())
    assert declared_frame_limit(limited["a"]) == LIMIT
    assert declared_frame_limit(unlimited["a"]) is None


def test_rejects_a_nonsense_limit() -> None:
    """max_frame_bytes must be a positive integer."""
    with pytest.raises(ValueError):
        MemoryNetwork(task.Clock(), max_frame_bytes=0)
