"""Tests of kommander.kv.machine: the command encoding and the KV state machine."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import task
from zope.interface.verify import verifyObject

from kommander.config import RaftConfiguration
from kommander.core.types import Entry
from kommander.hookspecs import PluginContext
from kommander.interfaces import ISnapshotStateMachine, IStateMachine
from kommander.kv.machine import (
    LOG_TYPE,
    MAX_KEY_BYTES,
    OP_CAS,
    OP_DELETE,
    OP_PUT,
    Command,
    KVResult,
    KVStateMachine,
    MalformedCommand,
    decode_command,
    encode_cas,
    encode_delete,
    encode_put,
)
from kommander.registry import PluginRegistry


def machine(partitions: int = 2) -> KVStateMachine:
    ctx = PluginContext(task.Clock(), RaftConfiguration(node_id="n1", max_partitions=partitions))
    return KVStateMachine(ctx)


def entry(data: bytes, index: int = 1, log_type: str = LOG_TYPE) -> Entry:
    return Entry(index=index, term=1, log_type=log_type, data=data)


def snapshot_bytes(m: KVStateMachine, partition: int = 0) -> bytes:
    return b"".join(m.snapshot(partition))


def test_provides_isnapshotstatemachine() -> None:
    """KVStateMachine provides IStateMachine and ISnapshotStateMachine."""
    assert verifyObject(IStateMachine, machine())
    assert verifyObject(ISnapshotStateMachine, machine())


def test_registered_as_kv_plugin() -> None:
    """The built-in plugin `kv` builds a KVStateMachine sized by the context's partitions."""
    ctx = PluginContext(task.Clock(), RaftConfiguration(node_id="n1", max_partitions=3))
    built = PluginRegistry(autoload=False).create_state_machine("kv", ctx)
    assert isinstance(built, KVStateMachine)
    assert built.partitions == 3


@pytest.mark.parametrize(
    "data, command",
    [
        (encode_put("k", b"v"), Command(OP_PUT, "k", b"v")),
        (encode_put("k", b""), Command(OP_PUT, "k", b"")),
        (encode_delete("ключ"), Command(OP_DELETE, "ключ")),
        (encode_cas("k", None, b"new"), Command(OP_CAS, "k", b"new", None)),
        (encode_cas("k", b"", b"new"), Command(OP_CAS, "k", b"new", b"")),
        (encode_cas("a/b", b"old", b""), Command(OP_CAS, "a/b", b"", b"old")),
    ],
)
def test_round_trip(data: bytes, command: Command) -> None:
    """Every encoder's output decodes back to the command it describes."""
    assert decode_command(data) == command


def test_encoding_layout_is_documented_one() -> None:
    """A PUT is op, big-endian key length, key, value: the layout the module documents."""
    assert encode_put("ab", b"xyz") == b"\x01\x00\x02abxyz"
    assert encode_delete("ab") == b"\x02\x00\x02ab"
    assert encode_cas("ab", b"o", b"n") == b"\x03\x00\x02ab\x01\x00\x00\x00\x01on"


@pytest.mark.parametrize("key", ["", "x" * (MAX_KEY_BYTES + 1), "\ud800", 7])
def test_encoders_refuse_bad_keys(key: object) -> None:
    """Empty, overlong, unencodable and non-str keys are refused when encoding."""
    with pytest.raises(MalformedCommand):
        encode_put(key, b"v")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data, why",
    [
        (b"", "shorter than its header"),
        (b"\x01\x00", "shorter than its header"),
        (b"\x09\x00\x01k", "unknown op"),
        (b"\x01\x00\x00", "key length 0"),
        (b"\x01\x00\x05ab", "past the end"),
        (b"\x01" + struct.pack(">H", MAX_KEY_BYTES + 1) + b"k" * (MAX_KEY_BYTES + 1), "key length"),
        (b"\x01\x00\x01\xff", "UTF-8"),
        (b"\x01\x00\x03\xed\xa0\x80", "UTF-8"),  # an encoded surrogate
        (b"\x02\x00\x01kx", "trailing"),
        (b"\x03\x00\x01k", "has_expected"),
        (b"\x03\x00\x01k\x02", "has_expected"),
        (b"\x03\x00\x01k\x01\x00\x00", "truncated"),
        (b"\x03\x00\x01k\x01\x00\x00\x00\x09ab", "past the end"),
    ],
)
def test_decode_refuses_malformed(data: bytes, why: str) -> None:
    """Malformed commands raise MalformedCommand saying what is wrong."""
    with pytest.raises(MalformedCommand, match=why):
        decode_command(data)


def test_put_get_delete() -> None:
    """PUT stores, GET reads, DELETE removes and reports whether the key existed."""
    m = machine()
    assert m.apply(0, entry(encode_put("k", b"1"), 1)) == KVResult("put", True, False)
    assert m.get(0, "k") == b"1"
    assert m.apply(0, entry(encode_put("k", b"2"), 2)) == KVResult("put", True, True)
    assert m.get(0, "k") == b"2"
    assert m.apply(0, entry(encode_delete("k"), 3)) == KVResult("delete", True, True)
    assert m.get(0, "k") is None
    assert m.apply(0, entry(encode_delete("k"), 4)) == KVResult("delete", False, False)
    assert m.applied_index[0] == 4


def test_partitions_are_separate() -> None:
    """A key written in one partition is absent from another."""
    m = machine()
    m.apply(0, entry(encode_put("k", b"v")))
    assert m.get(1, "k") is None
    assert len(m) == 1


def test_cas() -> None:
    """CAS swaps only when the current value equals expected; None expects absence."""
    m = machine()
    assert m.apply(0, entry(encode_cas("k", b"x", b"1"))) == KVResult("cas", False, False)
    assert m.get(0, "k") is None
    assert m.apply(0, entry(encode_cas("k", None, b"1"))) == KVResult("cas", True, False)
    assert m.apply(0, entry(encode_cas("k", None, b"2"))) == KVResult("cas", False, True)
    assert m.apply(0, entry(encode_cas("k", b"2", b"3"))) == KVResult("cas", False, True)
    assert m.apply(0, entry(encode_cas("k", b"1", b"3"))) == KVResult("cas", True, True)
    assert m.get(0, "k") == b"3"


def test_malformed_command_is_an_error_outcome_and_changes_nothing() -> None:
    """A malformed entry returns an error KVResult and leaves the state as it was."""
    m = machine()
    m.apply(0, entry(encode_put("k", b"v"), 1))
    before = snapshot_bytes(m)
    result = m.apply(0, entry(b"\x02\x00\x01kjunk", 2))
    assert isinstance(result, KVResult)
    assert result.op == "invalid" and not result.changed and "trailing" in (result.error or "")
    assert snapshot_bytes(m) == before


def test_other_log_types_are_ignored() -> None:
    """Entries of another log type return None and do not touch the store."""
    m = machine()
    assert m.apply(0, entry(encode_put("k", b"v"), log_type="other")) is None
    assert m.get(0, "k") is None


def test_partition_out_of_range() -> None:
    """A partition outside 0..partitions-1 is a ValueError, not an IndexError."""
    m = machine(2)
    with pytest.raises(ValueError):
        m.apply(2, entry(encode_put("k", b"v")))
    with pytest.raises(ValueError):
        m.get(-1, "k")


def test_checkpoint_is_a_no_op() -> None:
    """checkpoint() returns None and keeps the state."""
    m = machine()
    m.apply(0, entry(encode_put("k", b"v")))
    assert m.checkpoint(0, 1) is None
    assert m.get(0, "k") == b"v"


def test_snapshot_restore_with_chunks_cut_anywhere() -> None:
    """restore() rebuilds a partition from snapshot() chunks even when they are re-split byte by byte."""
    a = machine()
    for i in range(40):
        a.apply(0, entry(encode_put(f"k{i}", bytes([i]) * 5000), i + 1))
    chunks = list(a.snapshot(0))
    assert len(chunks) > 1 and all(isinstance(c, bytes) for c in chunks)
    stream = b"".join(chunks)
    c = machine()
    c.apply(0, entry(encode_put("stale", b"gone")))
    c.restore(0, iter([stream[i : i + 1] for i in range(len(stream))]))
    assert c.keys(0) == sorted(f"k{i}" for i in range(40))
    assert c.get(0, "k7") == bytes([7]) * 5000 and c.get(0, "stale") is None


def test_equal_states_give_equal_snapshots() -> None:
    """Two replicas that reached the same state by different orders produce the same bytes."""
    a, b = machine(), machine()
    a.apply(0, entry(encode_put("x", b"1")))
    a.apply(0, entry(encode_put("y", b"2")))
    b.apply(0, entry(encode_put("y", b"2")))
    b.apply(0, entry(encode_put("x", b"1")))
    assert snapshot_bytes(a) == snapshot_bytes(b)


def test_snapshot_is_taken_at_the_call() -> None:
    """Entries applied while the chunks are consumed do not leak into the snapshot."""
    m = machine()
    m.apply(0, entry(encode_put("x", b"1"), 1))
    chunks = m.snapshot(0)
    m.apply(0, entry(encode_put("x", b"2"), 2))
    m.apply(0, entry(encode_put("y", b"3"), 3))
    other = machine()
    other.restore(0, chunks)
    assert (other.get(0, "x"), other.get(0, "y")) == (b"1", None)


def test_empty_snapshot_round_trips() -> None:
    """An empty partition snapshots to just the magic and restores to empty."""
    m = machine()
    assert snapshot_bytes(m) == b"KVS1"
    m.apply(0, entry(encode_put("x", b"1")))
    m.restore(0, [b"KVS1"])
    assert m.keys(0) == []


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"XXXX",
        b"KVS1\x00",
        b"KVS1\x00\x00\x00\x00\x00\x00",
        b"KVS1\x00\x01k\x00\x00\x00\x05ab",
        b"KVS1\x00\x01\xff\x00\x00\x00\x00",
        b"KVS1\x00\x01k\x00\x00\x00\x00\x00\x01k\x00\x00\x00\x00",
    ],
)
def test_restore_refuses_bad_snapshots(data: bytes) -> None:
    """A stream that is not a valid snapshot is refused and the state kept."""
    m = machine()
    m.apply(0, entry(encode_put("k", b"v")))
    with pytest.raises(MalformedCommand):
        m.restore(0, [data])
    assert m.get(0, "k") == b"v"


@given(st.binary(max_size=64))
def test_apply_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    """Whatever the bytes, apply returns a KVResult and never raises."""
    m = machine()
    result = m.apply(0, entry(data))
    assert isinstance(result, KVResult)
    if result.error is not None:
        assert len(m) == 0


@given(st.text(min_size=1, max_size=20), st.binary(max_size=20), st.none() | st.binary(max_size=20))
def test_cas_round_trip_property(key: str, value: bytes, expected: bytes | None) -> None:
    """decode(encode_cas(...)) gives back the key, expected and value for any input."""
    try:
        data = encode_cas(key, expected, value)
    except MalformedCommand:
        return  # keys with lone surrogates cannot be encoded
    assert decode_command(data) == Command(OP_CAS, key, value, expected)
