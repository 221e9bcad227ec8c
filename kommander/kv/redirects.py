"""Where a follower may send a client: the leader's advertised base URL, checked, and the
request's own path and query, rebuilt from their parsed form.

A peer advertises its HTTP URL in the transport handshake, which is not authenticated without
TLS or a shared secret; a URL with user info (``http://user@evil``), another scheme
(``javascript:``, ``file:``), a path, a query or control characters is never put in a
``Location`` header. The path is re-encoded from the parsed segments, so nothing the client sent
byte for byte reaches the header either.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode, urlsplit


def base_url(url: str) -> bytes | None:
    """``url`` without a trailing slash when it is exactly ``http(s)://host:port[/]``."""
    try:
        parts = urlsplit(url)
        port = parts.port
        encoded = url.rstrip("/").encode("ascii")
    except (ValueError, UnicodeEncodeError):
        return None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or port is None
        or "@" in parts.netloc
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or any(c <= 32 or c >= 127 for c in encoded)
    ):
        return None
    return encoded


def same_path(request: Any) -> bytes:
    """The request's path and query, re-encoded from their parsed form (never the raw bytes)."""
    path = b"/" + b"/".join(quote(segment, safe=b"").encode("ascii") for segment in request.postpath)
    query = urlencode([(k, v) for k, values in request.args.items() for v in values])
    return path + (b"?" + query.encode("ascii") if query else b"")
