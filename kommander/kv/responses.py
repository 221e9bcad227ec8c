"""What the KV HTTP API answers: complete responses, JSON errors, and the exception that carries
a refusal out of request parsing.

Every error is JSON ``{"error": ..., "leader": <node id or null>}`` (more keys where a route says
so); a 503 carries ``Retry-After``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, NamedTuple

#: Seconds a client is asked to wait before retrying a 503.
RETRY_AFTER_SECONDS = 1

JSON = b"application/json"
OCTETS = b"application/octet-stream"
_RETRY_AFTER = ((b"Retry-After", b"%d" % RETRY_AFTER_SECONDS),)
_dumps = json.JSONEncoder().encode


class Response(NamedTuple):
    """A complete answer: status code, body, content type and extra headers.

    A named tuple rather than a frozen dataclass: one is built per request, and this is the
    cheapest immutable record Python has.
    """

    code: int
    body: bytes
    content_type: bytes = JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()


def json_response(code: int, document: Any, headers: Iterable[tuple[bytes, bytes]] = ()) -> Response:
    """A JSON answer (with a trailing newline, for terminals)."""
    return Response(code, _dumps(document).encode("utf-8") + b"\n", JSON, tuple(headers))


def error_response(code: int, message: str, leader: str | None = None, **extra: Any) -> Response:
    """A JSON error ``{"error": message, "leader": leader, ...extra}``."""
    return json_response(code, {"error": message, "leader": leader, **extra}, _RETRY_AFTER if code == 503 else ())


def with_headers(response: Response, *headers: tuple[bytes, bytes]) -> Response:
    """``response`` with ``headers`` instead of its own extra headers."""
    return response._replace(headers=headers)


class BadRequest(Exception):
    """Raised while parsing or routing a request; carries the response to send."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.code)
        self.response = response


def bad(message: str, code: int = 400) -> BadRequest:
    """A :class:`BadRequest` with a JSON error (400 unless ``code`` says otherwise)."""
    return BadRequest(error_response(code, message))


def method_not_allowed(method: bytes, allowed: tuple[bytes, ...]) -> BadRequest:
    """A 405 naming the ``allowed`` methods in ``Allow``."""
    response = error_response(405, f"method {method.decode('latin-1')!r} not allowed here")
    return BadRequest(with_headers(response, (b"Allow", b", ".join(allowed))))
