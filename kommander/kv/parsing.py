"""Request parsing and validation for the KV HTTP API: keys, bodies, content types, CAS documents.

Each function either returns the parsed value or raises :class:`~kommander.kv.responses.BadRequest`
with the answer to send; none of them changes any state.
"""

from __future__ import annotations

import json
from typing import Any

from kommander.kv.machine import MAX_KEY_BYTES
from kommander.kv.responses import JSON, bad

_loads = json.JSONDecoder().decode


def parse_key(segment: bytes) -> str:
    """A key from one percent-decoded path segment.

    :raises BadRequest: empty, longer than :data:`MAX_KEY_BYTES` bytes, or not UTF-8.
    """
    if not segment:
        raise bad("empty key")
    if len(segment) > MAX_KEY_BYTES:
        raise bad(f"key longer than {MAX_KEY_BYTES} bytes")
    try:
        return segment.decode("utf-8")
    except UnicodeDecodeError:
        raise bad("key is not valid UTF-8") from None


def read_body(request: Any, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes.

    :raises BadRequest: 413 when it is longer (:class:`~kommander.kv.bodylimit.KVRequest`
        normally refuses such bodies much earlier, before they are read).
    """
    content = request.content
    body = content.read(limit + 1) if content is not None else b""
    if len(body) > limit:
        raise bad(f"request body over {limit} bytes", 413)
    return body


def require_json(request: Any, message: str) -> None:
    """Refuse a body not declared ``application/json`` (parameters such as ``charset`` are fine).

    Browsers send form and ``text/plain`` POSTs cross-site without asking; JSON they do not.

    :raises BadRequest: 415 with ``message``.
    """
    content_type = (request.getHeader(b"content-type") or b"").split(b";", 1)[0].strip().lower()
    if content_type != JSON:
        raise bad(message, 415)


def parse_json(body: bytes, hint: str) -> Any:
    """The JSON document ``body`` holds.

    :raises BadRequest: not UTF-8 JSON (nested too deeply included); the message ends with ``hint``.
    """
    try:
        return _loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad(f"body is not JSON; {hint}") from None


def utf8(text: str) -> bytes:
    """``text`` as UTF-8.

    :raises BadRequest: it holds lone surrogates (from ``"\\ud800"``-style escapes).
    """
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad("strings must be valid Unicode") from None


def parse_cas_body(body: bytes) -> tuple[bytes | None, bytes]:
    """``(expected, value)`` from a CAS body ``{"expected": str|null, "value": str}``.

    Both keys are required (``"expected": null`` means "only if absent") and no other is allowed,
    so that a misspelt key is an error rather than a silent "expected absent".

    :raises BadRequest: not UTF-8 JSON of exactly that shape.
    """
    document = parse_json(body, 'send {"expected": str|null, "value": str}')
    if not isinstance(document, dict) or set(document) != {"expected", "value"}:
        raise bad('body must be an object with exactly the keys "expected" and "value"')
    expected, value = document["expected"], document["value"]
    if not isinstance(value, str) or not (expected is None or isinstance(expected, str)):
        raise bad('"value" must be a string and "expected" a string or null')
    return (None if expected is None else utf8(expected)), utf8(value)


def parse_consistency(args: dict[bytes, list[bytes]]) -> bytes:
    """``b"linearizable"`` (the default), ``b"lease"`` or ``b"stale"`` from a GET's query.

    :raises BadRequest: any other value, or the parameter given twice.
    """
    values = args.get(b"consistency")
    if values is None:
        return b"linearizable"
    if len(values) != 1 or values[0] not in _CONSISTENCIES:
        raise bad("consistency must be 'lease' or 'stale' (or 'linearizable', the default)")
    return values[0]


_CONSISTENCIES = (b"linearizable", b"lease", b"stale")
