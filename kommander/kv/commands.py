"""The commands of the replicated key-value state machine and their encoding.

Commands travel in log entries of ``log_type`` :data:`LOG_TYPE` (``"kv"``). Their encoding is a
small fixed layout, chosen over CBOR because every byte of it can be checked with no library in
between, and because it is trivially the same on every node::

    op: u8 | key_length: u16 big-endian | key: UTF-8 (1-1024 bytes) | operands

    PUT    (op 1)  operands = value (every remaining byte, possibly none)
    DELETE (op 2)  operands = nothing
    CAS    (op 3)  operands = has_expected: u8 (0 or 1)
                              [expected_length: u32 big-endian | expected]  (only when has_expected=1)
                              value (every remaining byte)

A transaction (``POST /v1/txn``) is one entry of its own layout, applied as a whole or not at all::

    TXN    op 4 | compares: u16 | success ops: u16 | failure ops: u16 | compare* | op* | op*
           compare = key_length: u16 | key | has_value: u8 (0: "absent") | [value_length: u32 | value]
           op      = 1 (put) | key_length: u16 | key | value_length: u32 | value
                   | 2 (delete) | key_length: u16 | key

Every compare is checked against the state before the transaction; when all hold, the success
ops run in order, otherwise the failure ops. Lengths and counts are big-endian; nothing may follow
the last op.

Anything else (an unknown op, a key that is empty, too long or not UTF-8, a length running past the
end, trailing bytes after a DELETE, ``has_expected`` other than 0 or 1) is *malformed*:
:meth:`KVStateMachine.apply` returns a :class:`KVResult` with ``error`` set and changes nothing. Every
node reaches the same verdict on the same bytes, so a malformed entry never makes replicas diverge.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any, NamedTuple

#: The ``log_type`` of KV commands; entries of other types are ignored.
LOG_TYPE = "kv"
#: The longest key, in bytes of UTF-8.
MAX_KEY_BYTES = 1024

OP_PUT = 1
OP_DELETE = 2
OP_CAS = 3
OP_TXN = 4
_OP_NAMES = {OP_PUT: "put", OP_DELETE: "delete", OP_CAS: "cas"}
#: The most compares plus ops one transaction may hold (etcd's default ``--max-txn-ops``).
MAX_TXN_OPS = 128

_HEADER = struct.Struct(">BH")
_EXPECTED_LENGTH = struct.Struct(">I")
_TXN_HEADER = struct.Struct(">BHHH")
_KEY_LENGTH = struct.Struct(">H")


class MalformedCommand(ValueError):
    """Bytes that are not a valid KV command; the message says what is wrong."""


class Command(NamedTuple):
    """A decoded KV command.

    :ivar op: :data:`OP_PUT`, :data:`OP_DELETE` or :data:`OP_CAS`.
    :ivar key: the key.
    :ivar value: the new value (PUT, CAS); ``None`` for DELETE.
    :ivar expected: for CAS, the value the key must hold for the swap, or ``None`` for "absent".
    """

    op: int
    key: str
    value: bytes | None = None
    expected: bytes | None = None

    @property
    def name(self) -> str:
        return _OP_NAMES[self.op]


class KVResult(NamedTuple):
    """What applying one command did; the HTTP layer turns it into a status code.

    :ivar op: ``"put"``, ``"delete"``, ``"cas"``, ``"txn"``, or ``"invalid"`` for a malformed
        command.
    :ivar changed: the state changed: always for PUT; for DELETE, the key existed; for CAS, it
        swapped; for a transaction, its compares held and its success ops ran.
    :ivar existed: the key was present before the command.
    :ivar error: why the command was refused (malformed); ``None`` otherwise.
    """

    op: str
    changed: bool
    existed: bool = False
    error: str | None = None


def validate_key(key: str) -> bytes:
    """Check a key and return its UTF-8 bytes.

    :raises MalformedCommand: the key is not a non-empty ``str`` of at most
        :data:`MAX_KEY_BYTES` bytes of UTF-8 (lone surrogates cannot be encoded and are refused).
    """
    if not isinstance(key, str):
        raise MalformedCommand(f"key must be a str, not {type(key).__name__}")
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedCommand("key is not valid Unicode text") from None
    if not 1 <= len(raw) <= MAX_KEY_BYTES:
        raise MalformedCommand(f"key must be 1-{MAX_KEY_BYTES} bytes of UTF-8, not {len(raw)}")
    return raw


def _check_bytes(what: str, value: Any) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise MalformedCommand(f"{what} must be bytes, not {type(value).__name__}")
    return bytes(value)


def encode_put(key: str, value: bytes) -> bytes:
    """The command setting ``key`` to ``value``."""
    raw = validate_key(key)
    return _HEADER.pack(OP_PUT, len(raw)) + raw + _check_bytes("value", value)


def encode_delete(key: str) -> bytes:
    """The command removing ``key``."""
    raw = validate_key(key)
    return _HEADER.pack(OP_DELETE, len(raw)) + raw


def encode_cas(key: str, expected: bytes | None, value: bytes) -> bytes:
    """The command setting ``key`` to ``value`` only if it holds ``expected`` (``None``: absent)."""
    raw = validate_key(key)
    head = _HEADER.pack(OP_CAS, len(raw)) + raw
    if expected is None:
        operands = b"\x00"
    else:
        expected = _check_bytes("expected", expected)
        operands = b"\x01" + _EXPECTED_LENGTH.pack(len(expected)) + expected
    return head + operands + _check_bytes("value", value)


def decode_command(data: bytes) -> Command:
    """Decode and fully validate one command.

    :raises MalformedCommand: for anything that :func:`encode_put`, :func:`encode_delete` or
        :func:`encode_cas` would not have produced.
    """
    if type(data) is not bytes:
        data = _check_bytes("command", data)
    if len(data) < _HEADER.size:
        raise MalformedCommand(f"command of {len(data)} bytes is shorter than its header")
    op, key_length = _HEADER.unpack_from(data)
    if op not in _OP_NAMES:
        raise MalformedCommand(f"unknown op {op}")
    end = _HEADER.size + key_length
    if key_length == 0 or key_length > MAX_KEY_BYTES:
        raise MalformedCommand(f"key length {key_length} is not 1-{MAX_KEY_BYTES}")
    if end > len(data):
        raise MalformedCommand("key runs past the end of the command")
    try:
        key = data[_HEADER.size : end].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedCommand("key is not valid UTF-8") from None
    rest = data[end:]
    if op == OP_PUT:
        return Command(op, key, rest)
    if op == OP_DELETE:
        if rest:
            raise MalformedCommand(f"{len(rest)} trailing bytes after a delete")
        return Command(op, key)
    if not rest or rest[0] not in (0, 1):
        raise MalformedCommand("cas needs has_expected 0 or 1 after the key")
    if rest[0] == 0:
        return Command(op, key, rest[1:], None)
    if len(rest) < 1 + _EXPECTED_LENGTH.size:
        raise MalformedCommand("cas expected length is truncated")
    (expected_length,) = _EXPECTED_LENGTH.unpack_from(rest, 1)
    start = 1 + _EXPECTED_LENGTH.size
    if start + expected_length > len(rest):
        raise MalformedCommand("cas expected value runs past the end of the command")
    return Command(op, key, rest[start + expected_length :], rest[start : start + expected_length])


class Txn(NamedTuple):
    """A decoded transaction.

    :ivar compares: ``(key, value)`` pairs; ``value`` ``None`` means "the key is absent".
    :ivar success: ops run when every compare holds: ``(OP_PUT, key, value)`` or
        ``(OP_DELETE, key, None)``.
    :ivar failure: ops run otherwise, of the same form.
    """

    compares: tuple[tuple[str, bytes | None], ...]
    success: tuple[tuple[int, str, bytes | None], ...]
    failure: tuple[tuple[int, str, bytes | None], ...]


def encode_txn(
    compares: Iterable[tuple[str, bytes | None]],
    success: Iterable[tuple[int, str, bytes | None]],
    failure: Iterable[tuple[int, str, bytes | None]] = (),
) -> bytes:
    """The command of one transaction (see the module's layout).

    :raises MalformedCommand: a bad key or value, an unknown op, or more than
        :data:`MAX_TXN_OPS` compares and ops together.
    """
    compares, success, failure = tuple(compares), tuple(success), tuple(failure)
    if len(compares) + len(success) + len(failure) > MAX_TXN_OPS:
        raise MalformedCommand(f"a transaction holds at most {MAX_TXN_OPS} compares and ops")
    parts = [_TXN_HEADER.pack(OP_TXN, len(compares), len(success), len(failure))]
    for key, value in compares:
        raw = validate_key(key)
        parts += [_KEY_LENGTH.pack(len(raw)), raw]
        if value is None:
            parts.append(b"\x00")
        else:
            value = _check_bytes("value", value)
            parts += [b"\x01", _EXPECTED_LENGTH.pack(len(value)), value]
    for op, key, value in success + failure:
        raw = validate_key(key)
        if op == OP_PUT:
            value = _check_bytes("value", value)
            parts += [b"\x01", _KEY_LENGTH.pack(len(raw)), raw, _EXPECTED_LENGTH.pack(len(value)), value]
        elif op == OP_DELETE and value is None:
            parts += [b"\x02", _KEY_LENGTH.pack(len(raw)), raw]
        else:
            raise MalformedCommand(f"a transaction op is a put or a delete (without value), not {op!r}")
    return b"".join(parts)


def decode_txn(data: bytes) -> Txn:
    """Decode and fully validate one transaction command.

    :raises MalformedCommand: for anything :func:`encode_txn` would not have produced.
    """
    if type(data) is not bytes:
        data = _check_bytes("command", data)
    if len(data) < _TXN_HEADER.size:
        raise MalformedCommand("transaction shorter than its header")
    op, n_compares, n_success, n_failure = _TXN_HEADER.unpack_from(data)
    if op != OP_TXN:
        raise MalformedCommand(f"op {op} is not a transaction")
    if n_compares + n_success + n_failure > MAX_TXN_OPS:
        raise MalformedCommand(f"a transaction holds at most {MAX_TXN_OPS} compares and ops")
    at = _TXN_HEADER.size

    def take(size: int) -> bytes:
        nonlocal at
        if at + size > len(data):
            raise MalformedCommand("transaction runs past the end of the command")
        chunk = data[at : at + size]
        at += size
        return chunk

    def key() -> str:
        (length,) = _KEY_LENGTH.unpack(take(_KEY_LENGTH.size))
        if not 1 <= length <= MAX_KEY_BYTES:
            raise MalformedCommand(f"key length {length} is not 1-{MAX_KEY_BYTES}")
        try:
            return take(length).decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedCommand("key is not valid UTF-8") from None

    def value() -> bytes:
        (length,) = _EXPECTED_LENGTH.unpack(take(_EXPECTED_LENGTH.size))
        return take(length)

    compares = []
    for _ in range(n_compares):
        name = key()
        flag = take(1)[0]
        if flag not in (0, 1):
            raise MalformedCommand("a compare needs has_value 0 or 1")
        compares.append((name, value() if flag else None))
    ops = []
    for _ in range(n_success + n_failure):
        kind = take(1)[0]
        if kind == OP_PUT:
            name = key()
            ops.append((OP_PUT, name, value()))
        elif kind == OP_DELETE:
            ops.append((OP_DELETE, key(), None))
        else:
            raise MalformedCommand(f"unknown transaction op {kind}")
    if at != len(data):
        raise MalformedCommand(f"{len(data) - at} trailing bytes after a transaction")
    return Txn(tuple(compares), tuple(ops[:n_success]), tuple(ops[n_success:]))
