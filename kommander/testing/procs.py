"""HTTP and process helpers for driving real nodes: one HTTP exchange, free loopback ports, and
how to run ``twistd`` with this interpreter. Standard library only, like :mod:`kommander.testing.cluster`."""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


class ConnectRefused(OSError):
    """Nothing listened at the node's port: the request certainly did not reach the node."""


@dataclass(frozen=True, slots=True)
class HTTPResult:
    """One HTTP exchange: status, lower-cased headers, body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_call(
    method: str, url: str, body: bytes | None = None, timeout: float = 5.0, headers: dict[str, str] | None = None
) -> HTTPResult:
    """One request on a fresh connection (``Connection: close``), never following redirects.

    :raises ConnectRefused: the connection was refused, so the request was never sent.
    :raises OSError: any other failure (reset, timeout, malformed answer): the request may or may
        not have been received.
    """
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        try:
            connection.connect()
        except ConnectionRefusedError as e:
            raise ConnectRefused(e.errno, f"connection to {parts.netloc} refused") from None
        connection.request(method, path, body=body, headers={"Connection": "close", **(headers or {})})
        response = connection.getresponse()
        data = response.read()
        return HTTPResult(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    except http.client.HTTPException as e:
        raise OSError(f"bad HTTP exchange with {url}: {e!r}") from None
    finally:
        connection.close()


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now (bound together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def twistd_command() -> list[str]:
    """How to run ``twistd`` with this interpreter: the script installed beside it (the venv's),
    else the interpreter running Twisted's ``twistd`` entry point itself."""
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]
