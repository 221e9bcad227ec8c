"""Hostile frames against kommander.wire.codec: out-of-range terms and indexes, oversized lists,
huge declared lengths and huge values in the wrong place are clean ProtocolErrors, and a forged
max-term heartbeat changes no node's term (memory transport with the codec, runtime harness)."""

from __future__ import annotations

import tracemalloc

import cbor2
import pytest
from runtime_harness import Cluster

from kommander.config import MAX_BATCH_ENTRIES, RaftConfiguration
from kommander.core.errors import ConfigurationError, ProtocolError
from kommander.core.types import (
    MESSAGE_TYPES,
    AppendEntries,
    Entry,
    EntryKind,
    Heartbeat,
)
from kommander.wire import codec
from kommander.wire.codec import MAX_INDEX, decode_message, encode_message

PARTITIONS = 4


def refused(data: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_message(data, PARTITIONS)
    assert info.value.remote is True
    return info.value


def heartbeat_frame(term: int, commit: int = 0, src: str = "n2", dst: str = "n1") -> bytes:
    """A heartbeat built by hand, as a forger would (the encoder refuses such terms)."""
    return cbor2.dumps([codec.TypeCode.HEARTBEAT.value, 0, term, src, dst, commit, 0])


def index_fields() -> list[tuple[type, int, str]]:
    """``(message class, position in the frame, field name)`` of every term/index/counter field."""
    found = [(cls, 2, "term") for cls in MESSAGE_TYPES]
    for cls, (_code, fields) in codec._SCHEMA.items():
        for position, (name, kind) in enumerate(fields, start=5):
            if kind == codec._N:
                found.append((cls, position, name))
    return found


def valid_frame(cls: type) -> list:
    from test_codec import sample

    return cbor2.loads(encode_message(1, sample(cls)))


# ---------------------------------------------------------------------- terms and indexes


@pytest.mark.parametrize("term", [2**64 - 1, 2**63])
def test_forged_max_term_heartbeat_is_a_protocol_error(term: int) -> None:
    """A heartbeat with term 2**64-1 (or 2**63) is refused by the decoder, naming the term."""
    assert "term" in str(refused(heartbeat_frame(term)))


def test_largest_term_below_the_limit_decodes() -> None:
    """Term 2**63 - 1 (MAX_INDEX) is still a valid term."""
    assert decode_message(heartbeat_frame(MAX_INDEX), PARTITIONS)[1].term == MAX_INDEX


@pytest.mark.parametrize(
    "cls, position, name", index_fields(), ids=lambda v: v.__name__ if isinstance(v, type) else str(v)
)
def test_every_term_index_and_counter_field_stops_below_2_to_the_63(cls: type, position: int, name: str) -> None:
    """Every term, index, offset and counter of every message is refused at 2**63."""
    item = valid_frame(cls)
    item[position] = 2**63
    assert name in str(refused(cbor2.dumps(item)))
    item[position] = MAX_INDEX
    decode_message(cbor2.dumps(item), PARTITIONS)


@pytest.mark.parametrize("column, name", [(0, "index"), (1, "term"), (6, "ticket")])
def test_entry_index_term_and_ticket_stop_below_2_to_the_63(column: int, name: str) -> None:
    """An entry's index, term and ticket at 2**63 are refused; its timestamp may use 64 bits."""
    item = valid_frame(AppendEntries)
    item[7][0][column] = 2**63
    assert name in str(refused(cbor2.dumps(item)))
    item[7][0][column] = MAX_INDEX
    item[7][0][5] = 2**64 - 1
    decode_message(cbor2.dumps(item), PARTITIONS)


@pytest.mark.parametrize("column", [0, 1])
def test_snapshot_meta_stops_below_2_to_the_63(column: int) -> None:
    """A snapshot meta's index and term at 2**63 are refused."""
    from kommander.core.types import InstallSnapshot

    item = valid_frame(InstallSnapshot)
    item[5][column] = 2**63
    assert "meta" in str(refused(cbor2.dumps(item)))


def test_encoder_refuses_a_term_the_decoder_would_refuse() -> None:
    """Encoding a term of 2**63 fails at the sender (remote=False), not at every receiver."""
    with pytest.raises(ProtocolError) as info:
        encode_message(0, Heartbeat(2**63, "n1", "n2", 0, 0))
    assert info.value.remote is False


def test_forged_max_term_heartbeat_changes_no_term() -> None:
    """End to end: a heartbeat with term 2**64-1 delivered to a node is refused, logged and
    counted; the node keeps its term and its leader, and the cluster still commits."""
    cluster = Cluster(n=3, partitions=2, codec=True).start_all()
    cluster.run_until(lambda: cluster.leader(0) and cluster.leader(1), what="leaders")
    victim = next(n for n in cluster.ids if n != cluster.leader(0).node_id)
    sender = next(n for n in cluster.ids if n != victim)
    manager = cluster.nodes[victim].manager
    before = [(p["term"], p["leader"]) for p in manager.status()["partitions"]]
    refused_before = cluster.network.stats["dropped.refused"]
    channel = (sender, victim)
    # The network's own delivery path, with a frame no honest encoder produces.
    cluster.network._deliver(channel, cluster.network._epoch[channel], [heartbeat_frame(2**64 - 1, 2**64 - 1, sender, victim)])
    cluster.advance(0.5)
    after = [(p["term"], p["leader"]) for p in manager.status()["partitions"]]
    assert after == before
    assert cluster.network.stats["dropped.refused"] == refused_before + 1
    assert all(p["term"] < 2**63 for node in cluster.ids for p in cluster.nodes[node].manager.status()["partitions"])


# ---------------------------------------------------------------------- lists, lengths, sizes


def test_more_entries_than_a_batch_may_hold_are_refused() -> None:
    """An AppendEntries with MAX_BATCH_ENTRIES + 1 entries is refused before any Entry is built."""
    entry = [1, 1, 0, "", b"", 0, 0]
    item = [codec.TypeCode.APPEND_ENTRIES.value, 0, 1, "n2", "n1", 0, 0, [entry] * (MAX_BATCH_ENTRIES + 1), 0]
    assert "at most" in str(refused(cbor2.dumps(item)))
    item[7] = [entry] * MAX_BATCH_ENTRIES
    assert len(decode_message(cbor2.dumps(item), PARTITIONS)[1].entries) == MAX_BATCH_ENTRIES


def test_encoder_refuses_more_entries_than_the_wire_carries() -> None:
    """The sender refuses such a batch too, and the configuration cannot ask for one."""
    entries = tuple(Entry(i + 1, 1, EntryKind.NORMAL, "", b"") for i in range(MAX_BATCH_ENTRIES + 1))
    with pytest.raises(ProtocolError):
        encode_message(0, AppendEntries(1, "n1", "n2", 0, 0, entries, 0))
    with pytest.raises(ConfigurationError, match="max_batch_entries"):
        RaftConfiguration(node_id="n1", max_batch_entries=MAX_BATCH_ENTRIES + 1).validate()


@pytest.mark.parametrize(
    "head",
    [
        "9b0000000100000000",  # an array of 2**32 items
        "9bffffffffffffffff",  # an array of 2**64-1 items
        "5b0000010000000000",  # a byte string of 2**40 bytes
        "7a10000000",  # a text string of 2**28 bytes
        "bb0000000100000000",  # a map of 2**32 pairs
    ],
)
def test_declared_lengths_beyond_the_frame_cost_nothing(head: str) -> None:
    """A head declaring more than the frame holds is refused without allocating it."""
    tracemalloc.start()
    try:
        refused(bytes.fromhex(head) + b"\x00" * 16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024


def test_a_huge_value_in_the_wrong_place_is_refused_without_copying_it() -> None:
    """A 4 MB byte string where the term belongs is refused; the error message stays short and
    describing it allocates far less than a repr of it would (4 bytes per zero byte)."""
    payload = bytes(4 * 1024 * 1024)
    frame = cbor2.dumps([codec.TypeCode.HEARTBEAT.value, 0, payload, "n2", "n1", 0, 0])
    tracemalloc.start()
    try:
        error = refused(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(str(error)) < 200
    assert peak < 2 * len(payload)


def test_a_long_array_in_the_wrong_place_is_described_by_its_size() -> None:
    """An array of 100,000 items as the term is named by its length, not printed."""
    frame = cbor2.dumps([codec.TypeCode.HEARTBEAT.value, 0, [0] * 100_000, "n2", "n1", 0, 0])
    assert "100000 items" in str(refused(frame))
