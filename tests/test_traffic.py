"""TransportCounters (kommander.runtime.traffic): bounded labels, fixed refusal reasons."""

from __future__ import annotations

import pytest

from kommander.runtime import traffic
from kommander.runtime.traffic import UNKNOWN, TransportCounters


def test_unknown_peers_share_one_record() -> None:
    """Traffic not tied to a known peer goes under one ``unknown`` record."""
    counters = TransportCounters()
    counters.peer(None).bytes_in += 5
    counters.peer(None).bytes_in += 6
    assert counters.peers[UNKNOWN].bytes_in == 11 and counters.peer("n2") is counters.peer("n2")


def test_peer_records_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond MAX_PEERS node ids, traffic is filed under ``unknown``: memory stays bounded."""
    monkeypatch.setattr(traffic, "MAX_PEERS", 3)
    counters = TransportCounters()
    for n in range(10):
        counters.peer(f"n{n}").frames_out += 1
    assert len(counters.peers) == 4 and counters.peers[UNKNOWN].frames_out == 7  # three named, one unknown


def test_refusals_take_only_the_listed_reasons() -> None:
    """A listed reason is counted; any other is a programming error, raised."""
    counters = TransportCounters()
    counters.refusal("bad_handshake")
    assert counters.refused["bad_handshake"] == 1
    with pytest.raises(ValueError):
        counters.refusal("the peer said so")
