"""Tests for kommander.wire.codec: round trips, the wire layout, and strict refusal of bad input."""

from __future__ import annotations

import dataclasses

import cbor2
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kommander.wire import codec
from kommander.wire.codec import (
    PROTOCOL_VERSION,
    Handshake,
    TypeCode,
    decode_handshake,
    decode_message,
    encode_handshake,
    encode_message,
)
from kommander.core.errors import ProtocolError
from kommander.core.types import (
    MESSAGE_TYPES,
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    EntryKind,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    ReadIndexRequest,
    ReadIndexResponse,
    NodeHeartbeat,
    SnapshotChunk,
    SnapshotChunkAck,
    SnapshotMeta,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PARTITIONS = 16

# --------------------------------------------------------------------------- strategies
u64 = st.integers(min_value=0, max_value=2**64 - 1)
#: Terms, indexes, tickets, offsets and counters stay below 2**63 on the wire.
n63 = st.integers(min_value=0, max_value=2**63 - 1)
node_ids = st.text(min_size=1, max_size=64)
metas = st.builds(SnapshotMeta, n63, n63)
entries = st.builds(
    Entry,
    index=n63,
    term=n63,
    kind=st.sampled_from(EntryKind),
    log_type=st.text(max_size=256),
    data=st.binary(max_size=64),
    timestamp=u64,
    ticket=n63,
)
header = dict(term=n63, src=node_ids, dst=node_ids)
messages = st.one_of(
    st.builds(VoteRequest, **header, last_index=n63, last_term=n63, pre_vote=st.booleans(), transfer=st.booleans()),
    st.builds(VoteResponse, **header, granted=st.booleans(), pre_vote=st.booleans()),
    st.builds(
        AppendEntries,
        **header,
        prev_index=n63,
        prev_term=n63,
        entries=st.lists(entries, max_size=5).map(tuple),
        commit=n63,
    ),
    st.builds(
        AppendEntriesResponse,
        **header,
        success=st.booleans(),
        index=n63,
        hint_index=n63,
        hint_term=n63,
    ),
    st.builds(Heartbeat, **header, commit=n63, context=n63, quiesce=st.booleans()),
    st.builds(NodeHeartbeat, **header),
    st.builds(HeartbeatResponse, **header, context=n63),
    st.builds(TimeoutNow, **header),
    st.builds(InstallSnapshot, **header, meta=metas),
    st.builds(SnapshotChunk, **header, meta=metas, offset=n63, data=st.binary(max_size=64), done=st.booleans()),
    st.builds(SnapshotChunkAck, **header, meta=metas, offset=n63, success=st.booleans()),
    st.builds(ReadIndexRequest, **header, request_id=n63, lease=st.booleans()),
    st.builds(ReadIndexResponse, **header, request_id=n63, index=n63, success=st.booleans()),
)
short_text = st.text(max_size=1024)
handshakes = st.builds(
    Handshake,
    version=st.just(PROTOCOL_VERSION),
    cluster_id=st.text(min_size=1, max_size=128),
    node_id=node_ids,
    incarnation=u64,
    metadata=st.dictionaries(short_text, short_text, max_size=16),
)


def sample(cls: type) -> object:
    """One valid instance of every message type, for the hand-written tests."""
    entry = Entry(7, 2, EntryKind.PROPOSED, "kv.put", b"value", 99 << 16, 7)
    meta = SnapshotMeta(40, 3)
    return {
        VoteRequest: VoteRequest(3, "a", "b", 10, 2, True, False),
        VoteResponse: VoteResponse(3, "b", "a", True, False),
        AppendEntries: AppendEntries(3, "a", "b", 6, 2, (entry,), 5),
        AppendEntriesResponse: AppendEntriesResponse(3, "b", "a", False, 6, 4, 1),
        Heartbeat: Heartbeat(3, "a", "b", 5, 12),
        HeartbeatResponse: HeartbeatResponse(3, "b", "a", 12),
        TimeoutNow: TimeoutNow(3, "a", "b"),
        InstallSnapshot: InstallSnapshot(3, "a", "b", meta),
        SnapshotChunk: SnapshotChunk(3, "a", "b", meta, 0, b"chunk", True),
        SnapshotChunkAck: SnapshotChunkAck(3, "b", "a", meta, 5, True),
        ReadIndexRequest: ReadIndexRequest(3, "b", "a", 1 << 40),
        ReadIndexResponse: ReadIndexResponse(3, "a", "b", 1 << 40, 17, True),
        NodeHeartbeat: NodeHeartbeat(0, "a", "b"),
    }[cls]


def as_list(cls: type = AppendEntries, partition: int = 1) -> list:
    """The decoded CBOR array of a valid frame, to be broken by a test."""
    return cbor2.loads(encode_message(partition, sample(cls)))


def refused(data: bytes, partitions: int = PARTITIONS) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_message(data, partitions)
    assert info.value.remote is True
    return info.value


VALID_HANDSHAKE = Handshake(PROTOCOL_VERSION, "kommander", "node-1", 42, {"http": "http://127.0.0.1:9001"})


# --------------------------------------------------------------------------- round trips and layout
@FUZZ
@given(partition=st.integers(0, PARTITIONS - 1), message=messages)
def test_round_trip_every_message_type(partition, message):
    """Every generated message decodes back to an equal message and partition."""
    assert decode_message(encode_message(partition, message), PARTITIONS) == (partition, message)


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_round_trip_sample_of_each_type(cls):
    """A hand-built instance of each message type survives a round trip with the same class."""
    partition, message = decode_message(encode_message(2, sample(cls)), PARTITIONS)
    assert (partition, message) == (2, sample(cls)) and type(message) is cls


def test_decoded_entry_kind_is_entry_kind():
    """Decoded entries carry EntryKind members, not bare ints."""
    _, message = decode_message(encode_message(0, sample(AppendEntries)), PARTITIONS)
    assert type(message.entries[0].kind) is EntryKind and type(message.entries) is tuple


def test_schema_covers_every_message_field_in_order():
    """The wire schema lists every dataclass field after (term, src, dst), in declaration order."""
    assert set(codec._SCHEMA) == set(MESSAGE_TYPES)
    for cls, (_, fields) in codec._SCHEMA.items():
        names = [f.name for f in dataclasses.fields(cls)]
        assert names[:3] == ["term", "src", "dst"]
        assert [name for name, _ in fields] == names[3:], cls.__name__


def test_type_codes_are_stable():
    """The type codes are the wire format; this pins them."""
    expected = {
        VoteRequest: 1,
        VoteResponse: 2,
        AppendEntries: 3,
        AppendEntriesResponse: 4,
        Heartbeat: 5,
        HeartbeatResponse: 6,
        TimeoutNow: 7,
        InstallSnapshot: 8,
        SnapshotChunk: 9,
        SnapshotChunkAck: 10,
        ReadIndexRequest: 11,
        ReadIndexResponse: 12,
        NodeHeartbeat: 13,
    }
    assert {cls: int(code) for cls, (code, _) in codec._SCHEMA.items()} == expected
    assert TypeCode.HANDSHAKE == 0


def test_encoding_is_compact_array():
    """TimeoutNow for partition 0 is exactly [7, 0, 1, "a", "b", 5] in CBOR: nine bytes."""
    assert encode_message(0, TimeoutNow(1, "a", "b", 5)) == bytes.fromhex("860700016161 616205".replace(" ", ""))


def test_a_read_index_request_carries_lease_only_when_set():
    """A plain request keeps the original six elements (a node that predates ``lease`` decodes
    it); a lease request has a seventh and round-trips."""
    plain = encode_message(0, ReadIndexRequest(2, "b", "a", 9))
    assert plain[0] == 0x86
    assert decode_message(plain, 1) == (0, ReadIndexRequest(2, "b", "a", 9, False))
    leased = encode_message(0, ReadIndexRequest(2, "b", "a", 9, True))
    assert leased[0] == 0x87
    assert decode_message(leased, 1) == (0, ReadIndexRequest(2, "b", "a", 9, True))


def test_entry_layout():
    """An entry is [index, term, kind, log_type, data, timestamp, ticket] nested in the message."""
    item = as_list(AppendEntries, partition=4)
    assert item[:7] == [3, 4, 3, "a", "b", 6, 2] and item[8] == 5
    assert item[7] == [[7, 2, 2, "kv.put", b"value", 99 << 16, 7]]


@FUZZ
@given(handshake=handshakes)
def test_handshake_round_trip(handshake):
    """Every generated handshake decodes back to an equal handshake."""
    assert decode_handshake(encode_handshake(handshake)) == handshake


def test_handshake_layout():
    """A handshake is [0, version, cluster_id, node_id, incarnation, {metadata}]."""
    assert cbor2.loads(encode_handshake(VALID_HANDSHAKE)) == [
        0, 1, "kommander", "node-1", 42, {"http": "http://127.0.0.1:9001"}
    ]


def test_accepts_bytearray_and_memoryview():
    """Decoding takes any bytes-like buffer, as a network buffer may be one."""
    data = encode_message(1, sample(Heartbeat))
    assert decode_message(bytearray(data), PARTITIONS) == decode_message(memoryview(data), PARTITIONS)


# --------------------------------------------------------------------------- fuzzing
@FUZZ
@given(data=st.binary(max_size=200))
@example(data=b"")
@example(data=b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff")
@example(data=b"\x81" * 100 + b"\x00")
def test_random_bytes_raise_only_protocol_error(data):
    """Random bytes either decode or raise ProtocolError, never another exception."""
    for decode in (lambda d: decode_message(d, PARTITIONS), decode_handshake, codec._scan_heads):
        try:
            decode(data)
        except ProtocolError as exc:
            assert exc.remote is True


@FUZZ
@given(
    message=messages,
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), min_size=1, max_size=4),
    cut=st.integers(0, 10**6),
)
def test_mutated_frames_decode_or_raise_protocol_error(message, flips, cut):
    """Bit flips and truncations of a valid frame give a valid message or a ProtocolError."""
    frame = bytearray(encode_message(1, message))
    for position, bit in flips:
        frame[position % len(frame)] ^= 1 << bit
    for candidate in (bytes(frame), bytes(frame[: cut % len(frame)])):
        try:
            partition, decoded = decode_message(candidate, PARTITIONS)
        except ProtocolError:
            continue
        assert 0 <= partition < PARTITIONS and type(decoded) in MESSAGE_TYPES


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_every_truncation_is_refused(cls):
    """Every proper prefix of a valid frame is refused."""
    frame = encode_message(0, sample(cls))
    for end in range(len(frame)):
        refused(frame[:end])


# --------------------------------------------------------------------------- strictness rules
def test_refuses_message_array_too_short():
    """A message array missing its last field is refused."""
    assert "expected" in str(refused(cbor2.dumps(as_list(Heartbeat)[:-1])))


def test_refuses_message_array_too_long():
    """A message array with an extra field is refused."""
    refused(cbor2.dumps(as_list(Heartbeat) + [0]))


def test_refuses_entry_of_wrong_length():
    """An entry array with six elements instead of seven is refused."""
    item = as_list()
    item[7][0] = item[7][0][:6]
    assert "entries[0]" in str(refused(cbor2.dumps(item)))


def test_refuses_bool_where_int_expected():
    """True is not the integer 1 on the wire."""
    item = as_list(Heartbeat)
    item[5] = True
    assert "commit" in str(refused(cbor2.dumps(item)))


def test_refuses_bool_as_entry_index():
    """An entry index of True is refused."""
    item = as_list()
    item[7][0][0] = True
    refused(cbor2.dumps(item))


def test_refuses_int_where_bool_expected():
    """The integer 1 is not a boolean on the wire."""
    item = as_list(VoteResponse)
    item[5] = 1
    assert "granted" in str(refused(cbor2.dumps(item)))


def test_refuses_negative_int():
    """A negative term is refused."""
    item = as_list(Heartbeat)
    item[2] = -1
    assert "term" in str(refused(cbor2.dumps(item)))


def test_refuses_int_of_2_to_the_64():
    """An integer at 2**64 is out of range (CBOR major type 0 tops out just below it)."""
    item = as_list()
    item[7][0][5] = 2**64  # cbor2 writes this as a bignum tag, refused as a tag too
    refused(cbor2.dumps(item))


def test_accepts_largest_index_and_timestamp():
    """2**63 - 1 is the largest index accepted; a timestamp may use all 64 bits."""
    item = as_list(Heartbeat)
    item[5] = 2**63 - 1
    assert decode_message(cbor2.dumps(item), PARTITIONS)[1].commit == 2**63 - 1
    item = as_list()
    item[7][0][5] = 2**64 - 1
    assert decode_message(cbor2.dumps(item), PARTITIONS)[1].entries[0].timestamp == 2**64 - 1


def test_refuses_float():
    """A float, even an integral one, is refused where an int is expected."""
    item = as_list(Heartbeat)
    item[5] = 5.0
    refused(cbor2.dumps(item))


def test_refuses_map_where_array_expected():
    """A message encoded as a map is refused, as is a map inside an entry."""
    refused(cbor2.dumps({"type": 5}))
    item = as_list()
    item[7][0] = {0: 1}
    refused(cbor2.dumps(item))


@pytest.mark.parametrize("bad", ["", "x" * 65, b"a", 7, None], ids=["empty", "65-chars", "bytes", "int", "null"])
def test_refuses_bad_node_id(bad):
    """A node id must be a text string of 1-64 characters."""
    item = as_list(Heartbeat)
    item[3] = bad
    assert "src" in str(refused(cbor2.dumps(item)))


def test_accepts_node_id_of_64_chars():
    """A 64-character node id is accepted."""
    item = as_list(Heartbeat)
    item[4] = "n" * 64
    assert decode_message(cbor2.dumps(item), PARTITIONS)[1].dst == "n" * 64


def test_refuses_log_type_over_256_chars():
    """A log type of 257 characters is refused; 256 is accepted."""
    item = as_list()
    item[7][0][3] = "t" * 256
    decode_message(cbor2.dumps(item), PARTITIONS)
    item[7][0][3] = "t" * 257
    assert "log_type" in str(refused(cbor2.dumps(item)))


def test_refuses_text_where_bytes_expected():
    """Entry data must be a byte string, not text."""
    item = as_list()
    item[7][0][4] = "value"
    assert "data" in str(refused(cbor2.dumps(item)))


def test_refuses_invalid_utf8_text():
    """A text string holding invalid UTF-8 is refused."""
    frame = encode_message(0, TimeoutNow(1, "a", "b"))
    refused(frame.replace(b"\x61\x61", b"\x61\xff", 1))


@pytest.mark.parametrize("code", [14, 99, 0, -1, True, "3"])
def test_refuses_unknown_type_code(code):
    """Codes outside 1-13 (the handshake's 0 included) are not messages."""
    item = as_list(Heartbeat)
    item[0] = code
    assert "type code" in str(refused(cbor2.dumps(item)))


def test_refuses_unknown_entry_kind():
    """An entry kind past the last EntryKind is refused."""
    item = as_list()
    item[7][0][2] = len(EntryKind)
    assert "EntryKind" in str(refused(cbor2.dumps(item)))


def test_refuses_partition_out_of_range():
    """Partition == partitions is refused; partitions - 1 is accepted."""
    decode_message(encode_message(PARTITIONS - 1, sample(Heartbeat)), PARTITIONS)
    assert "partition" in str(refused(encode_message(PARTITIONS, sample(Heartbeat))))


def test_refuses_negative_partition():
    """A negative partition number is refused."""
    item = as_list(Heartbeat)
    item[1] = -1
    refused(cbor2.dumps(item))


def test_refuses_trailing_bytes():
    """Bytes after the one CBOR item are refused, even a valid second item."""
    frame = encode_message(0, sample(Heartbeat))
    assert "trailing" in str(refused(frame + b"\x00"))
    refused(frame + frame)


def test_refuses_indefinite_length_array():
    """An indefinite-length array is refused, although it holds a valid message."""
    frame = encode_message(0, TimeoutNow(1, "a", "b"))
    refused(b"\x9f" + frame[1:] + b"\xff")


def test_refuses_simple_values_and_null():
    """null, undefined and simple values are refused where a field is expected."""
    for value in (None, cbor2.undefined, cbor2.CBORSimpleValue(0)):
        item = as_list(VoteResponse)
        item[5] = value
        refused(cbor2.dumps(item))


def test_refuses_deep_nesting():
    """Containers nested deeper than the schema's three levels are refused."""
    refused(b"\x81" * 1000 + b"\x00")


def test_refuses_non_bytes_input():
    """Only bytes-like input is decoded; a str is a ProtocolError, not a TypeError."""
    with pytest.raises(ProtocolError):
        decode_message("frame", PARTITIONS)


def test_refuses_handshake_as_message():
    """A handshake frame is not a message."""
    refused(encode_handshake(VALID_HANDSHAKE))


# --------------------------------------------------------------------------- tags
# Tags that build objects in cbor2 (datetime, bignum, decimal, fraction, regexp, MIME, UUID, sets,
# IP addresses, shared and string references, self-describe) and some it does not know.
TAGS = [0, 1, 2, 3, 4, 5, 21, 24, 25, 28, 29, 30, 32, 35, 36, 37, 52, 54, 256, 258, 260, 261, 1000, 55799, 2**40]


def tagged(tag: int, value: object) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(tag, value))


@pytest.mark.parametrize("tag", TAGS)
def test_refuses_every_tag_on_a_field(tag):
    """Any tag on a field is refused, whatever its content."""
    item = as_list(Heartbeat)
    for content in (5, b"\x05", "5", [5]):
        body = cbor2.dumps(item[:5])[1:]  # the five header items without the array head
        frame = b"\x87" + body + tagged(tag, content) + cbor2.dumps(0)
        assert "tag" in str(refused(frame)).lower()


@pytest.mark.parametrize("tag", [2, 28, 55799])
def test_refuses_tag_around_whole_message(tag):
    """A tag wrapping an otherwise valid message (self-describe, shareable) is refused."""
    refused(tagged(tag, as_list(Heartbeat)))


def test_refuses_shared_reference_in_entries():
    """A shared reference (tags 28/29) standing for a repeated entry is refused."""
    item = as_list()
    frame = cbor2.dumps(item[:7] + [[cbor2.CBORTag(28, item[7][0]), cbor2.CBORTag(29, 0)], item[8]])
    refused(frame)


def test_refuses_bignum_without_building_it(monkeypatch):
    """A huge bignum is refused at its tag, before any int is built from its bytes."""
    import kommander.wire.strict_cbor as strict_cbor

    built = []
    real = strict_cbor._refuse_tag
    monkeypatch.setattr(strict_cbor, "_refuse_tag", lambda *a: built.append(a) or real(*a))
    frame = tagged(2, b"\xff" * 1_000_000)
    error = refused(frame)
    assert "tag" in str(error).lower()
    assert all(not isinstance(arg, int) or arg < 1 << 64 for args in built for arg in args)


def test_tags_refused_by_cbor2_itself():
    """The installed cbor2 consults our refusal for every tag, so no pre-scan is needed."""
    assert codec._PRESCAN is False


@pytest.mark.parametrize("tag", TAGS)
def test_prescan_fallback_refuses_tags(tag, monkeypatch):
    """With the pure-Python pre-scan forced on, tags are refused and valid frames still decode."""
    monkeypatch.setattr(codec, "_PRESCAN", True)
    with pytest.raises(ProtocolError, match="tag"):
        codec._scan_heads(tagged(tag, [1]))
    refused(tagged(tag, [1]))
    assert decode_message(encode_message(1, sample(AppendEntries)), PARTITIONS)[1] == sample(AppendEntries)


def test_prescan_skips_tag_bytes_inside_strings():
    """Tag-like bytes inside a byte string's content are data, not tags."""
    frame = encode_message(0, SnapshotChunk(1, "a", "b", SnapshotMeta(1, 1), 0, b"\xc0\xd8\xd9", False))
    codec._scan_heads(frame)


# --------------------------------------------------------------------------- handshake rules
def handshake_list() -> list:
    return cbor2.loads(encode_handshake(VALID_HANDSHAKE))


def refused_handshake(data: bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        decode_handshake(data)
    assert info.value.remote is True
    return str(info.value)


def test_handshake_refuses_other_version():
    """A version-2 handshake is refused by version, whatever its layout."""
    assert "version" in refused_handshake(cbor2.dumps([0, 2, "kommander", "node-1", 1, {}, "extra"]))


def test_handshake_refuses_message_frame():
    """A message is not a handshake."""
    assert "handshake" in refused_handshake(encode_message(0, sample(Heartbeat)))


def test_handshake_refuses_too_much_metadata():
    """Seventeen metadata items are refused."""
    item = handshake_list()
    item[5] = {str(i): "v" for i in range(17)}
    assert "metadata" in refused_handshake(cbor2.dumps(item))


@pytest.mark.parametrize("where", ["key", "value"])
def test_handshake_refuses_long_metadata(where):
    """A metadata key or value over 1,024 characters is refused."""
    item = handshake_list()
    long = "x" * 1025
    item[5] = {long: "v"} if where == "key" else {"k": long}
    refused_handshake(cbor2.dumps(item))


def test_handshake_refuses_non_text_metadata():
    """Metadata values must be text, not bytes or ints."""
    for value in (b"v", 1):
        item = handshake_list()
        item[5] = {"k": value}
        refused_handshake(cbor2.dumps(item))


def test_handshake_refuses_duplicate_metadata_keys():
    """A metadata map that repeats a key is refused."""
    item = handshake_list()
    item[5] = {}
    body = cbor2.dumps(item)[:-1] + b"\xa2\x61k\x61a\x61k\x61b"
    refused_handshake(body)


def test_handshake_refuses_bad_fields():
    """Empty cluster ids, 65-char node ids and bool incarnations are refused."""
    for index, value in ((2, ""), (3, "n" * 65), (4, True), (5, [])):
        item = handshake_list()
        item[index] = value
        refused_handshake(cbor2.dumps(item))


# --------------------------------------------------------------------------- encoding side
@pytest.mark.parametrize(
    "message",
    [
        Heartbeat(-1, "a", "b", 0),
        Heartbeat(1, "a" * 65, "b", 0),
        Heartbeat(1, "a", "", 0),
        VoteResponse(1, "a", "b", 1),
        AppendEntries(1, "a", "b", 0, 0, (Entry(1, 1, log_type="t" * 257),), 0),
        AppendEntries(1, "a", "b", 0, 0, [Entry(1, 1)], 0),
        AppendEntries(1, "a", "b", 0, 0, (Entry(1, 1, data="text"),), 0),
        AppendEntries(1, "a", "b", 0, 0, (Entry(1, 1, kind=9),), 0),
        SnapshotChunk(1, "a", "b", (1, 1), 0, b"", True),
        "not a message",
    ],
    ids=lambda m: type(m).__name__,
)
def test_encode_refuses_invalid_local_message(message):
    """Encoding a message that breaks a wire rule raises ProtocolError(remote=False)."""
    with pytest.raises(ProtocolError) as info:
        encode_message(0, message)
    assert info.value.remote is False


def test_encode_refuses_bad_partition_and_handshake():
    """A negative partition or an oversized handshake fails locally."""
    with pytest.raises(ProtocolError):
        encode_message(-1, sample(Heartbeat))
    with pytest.raises(ProtocolError) as info:
        encode_handshake(dataclasses.replace(VALID_HANDSHAKE, metadata={str(i): "" for i in range(17)}))
    assert info.value.remote is False


def test_encode_accepts_plain_int_entry_kind():
    """An entry built with a plain int kind encodes and decodes to the EntryKind member."""
    message = AppendEntries(1, "a", "b", 0, 0, (Entry(1, 1, kind=3),), 0)
    assert decode_message(encode_message(0, message), 1)[1].entries[0].kind is EntryKind.COMMIT


# --------------------------------------------------------------------------- cost
def test_a_batch_of_a_thousand_entries_round_trips():
    """1,000 entries of 100 bytes encode and decode to the same message (benchmarks/codec_bench.py
    prints what that costs per entry; a timed assertion here would only measure the machine)."""
    batch = tuple(Entry(i, 5, EntryKind.NORMAL, "kv.put", bytes(100), i << 16) for i in range(1, 1001))
    message = AppendEntries(5, "node-a", "node-b", 0, 0, batch, 1000)
    assert decode_message(encode_message(0, message), 1)[1] == message
