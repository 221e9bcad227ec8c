"""Strict CBOR decoding for everything a peer sends: exactly one item, no tags (refused before
they build anything), no indefinite lengths, no duplicate map keys, bounded nesting, no trailing
bytes. :mod:`kommander.wire.codec` builds its frame checks on :func:`load`.

Tags are refused through cbor2's ``semantic_decoders`` lookup; should a cbor2 release stop
consulting that mapping for some tag, an import-time self check notices and switches to a
pure-Python pre-scan of the item heads (:func:`scan_heads`) instead.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from typing import Any

import cbor2

from kommander.core.errors import ProtocolError

#: Deepest legal nesting: message -> entries -> entry (the handshake's metadata map is level 2).
MAX_DEPTH = 3


class _RefuseEveryTag(Mapping[int, Any]):
    """A ``semantic_decoders`` mapping that answers every tag number with a refusal.

    cbor2 6 looks each tag up here before its own decoders (the lookup happens once the tag's
    content, plain CBOR, is read and before any object is built from it).
    """

    def __getitem__(self, tag: int) -> Any:
        return _refuse_tag

    def __contains__(self, tag: object) -> bool:
        return True

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


class _TagRefused(Exception):
    pass


def _refuse_tag(*_args: Any) -> Any:
    raise _TagRefused("CBOR tags are not allowed")


def _refuse_tag_hook(_decoder: Any, tag: Any, *_args: Any) -> Any:
    # Unknown tags reach tag_hook if semantic_decoders is ever bypassed: refuse those too.
    raise _TagRefused(f"CBOR tag {getattr(tag, 'tag', '?')} is not allowed")


_REFUSE_EVERY_TAG = _RefuseEveryTag()


def _decode_item(data: bytes) -> Any:
    fp = io.BytesIO(data)
    try:
        item = cbor2.CBORDecoder(
            fp,
            semantic_decoders=_REFUSE_EVERY_TAG,
            tag_hook=_refuse_tag_hook,
            max_depth=MAX_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        ).decode()
    # Whatever cbor2 raises on hostile bytes (CBORDecodeError, ValueError, RecursionError, ...)
    # means the same thing to us: the peer sent garbage.
    except Exception as exc:
        raise ProtocolError(f"malformed CBOR: {exc}", remote=True) from None
    if fp.tell() != len(data):
        raise ProtocolError(f"{len(data) - fp.tell()} trailing bytes after the CBOR item", remote=True)
    return item


def scan_heads(data: bytes) -> None:
    """Walk the item heads of ``data`` and refuse any tag (major type 6) or indefinite length.

    The fallback for a cbor2 that cannot be made to refuse tags itself. Each step consumes at least
    one byte, so the walk is bounded by ``len(data)``; string contents are skipped, not read.
    """
    pos = 0
    end = len(data)
    remaining = 1
    while remaining and pos < end:
        head = data[pos]
        major, info = head >> 5, head & 31
        pos += 1
        if major == 6:
            raise ProtocolError(f"CBOR tag at byte {pos - 1} is not allowed", remote=True)
        if info < 24:
            arg = info
        elif info <= 27:
            size = 1 << (info - 24)
            arg = int.from_bytes(data[pos : pos + size], "big")
            pos += size
        elif major == 7 and info == 31:
            raise ProtocolError("unexpected CBOR break", remote=True)
        else:
            raise ProtocolError(f"indefinite length or reserved CBOR head 0x{head:02x}", remote=True)
        remaining -= 1
        if major in (2, 3):
            pos += arg
        elif major == 4:
            remaining += arg
        elif major == 5:
            remaining += 2 * arg


def _cbor2_refuses_tags() -> bool:
    """Whether cbor2 routes every tag we tried through our refusal (checked once at import)."""
    probes = ("c24101", "d81c01", "d81d00", "d9d9f701", "d8ff01", "c07818323031332d30332d32315432303a30343a30305a")
    for probe in probes:
        try:
            _decode_item(bytes.fromhex(probe))
        except ProtocolError:
            continue
        return False
    return True


#: Whether :func:`load` pre-scans item heads (only if cbor2 cannot be made to refuse tags).
PRESCAN = not _cbor2_refuses_tags()


def load(data: Any) -> Any:
    """The one CBOR item ``data`` holds, decoded strictly.

    :raises ProtocolError: with ``remote=True`` for anything but exactly one well-formed item
        without tags or indefinite lengths, nested at most :data:`MAX_DEPTH` deep.
    """
    if type(data) is not bytes:
        if not isinstance(data, (bytearray, memoryview)):
            raise ProtocolError(f"expected bytes, got {type(data).__name__}", remote=True)
        data = bytes(data)
    if PRESCAN:
        scan_heads(data)
    return _decode_item(data)
