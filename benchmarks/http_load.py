"""HTTP load generator for the cluster benchmark: PUTs over persistent HTTP/1.1 connections.

Usage::

    python benchmarks/http_load.py --host 127.0.0.1 --port 8001 --connections 64 --seconds 5
    python benchmarks/http_load.py --stub --port 0     # a null server, to measure this client

Each connection keeps exactly one request outstanding (send, read the whole response, send the
next), so ``--connections`` is the number of writes in flight. Every connection is opened before
the clock starts (in small groups, so a listen backlog never drops a SYN), and the run stops
issuing after ``--seconds`` or ``--ops`` requests. One JSON document goes to stdout: requests per
second (2xx answers divided by the time from the first request to the last 2xx answer), latency
p50/p99/p999, the count of each status code, and this process's own CPU seconds, so the client's
share of a small machine can be subtracted by the reader.

The client is a bare ``asyncio.Protocol`` with its own minimal response parser (status line,
``Content-Length``, body), written to cost as little CPU per request as Python allows. ``--stub``
serves ``200 {"index": 1}`` to every request, which gives the client's own ceiling.

Standard library only; loopback only; everything bounded by ``--seconds`` plus a grace period.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections import Counter
from latency import percentiles

#: Distinct keys cycled through, as in ``bench_node.py``.
KEY_SPACE = 4096
#: Connections opened at once while setting up (Twisted listens with a backlog of 50).
CONNECT_GROUP = 32


def content_length(head: bytes) -> int:
    """The ``Content-Length`` of a message head (0 when absent)."""
    lower = head.lower()
    at = lower.find(b"content-length:")
    if at < 0:
        return 0
    eol = lower.find(b"\r\n", at)
    return int(lower[at + 15 : eol if eol >= 0 else len(lower)])


class Run:
    """Shared state of one load run."""

    def __init__(self, requests: list[bytes], max_ops: int) -> None:
        self.requests = requests
        self.max_ops = max_ops
        self.submitted = 0
        self.latencies: list[float] = []
        self.codes: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.stop_at = math.inf
        self.start = 0.0
        self.last_ok = 0.0
        self.active = 0
        self.all_done: asyncio.Future | None = None

    def next_request(self) -> bytes | None:
        if self.submitted >= self.max_ops or time.perf_counter() >= self.stop_at:
            return None
        i = self.submitted
        self.submitted = i + 1
        return self.requests[i % len(self.requests)]

    def connection_idle(self) -> None:
        self.active -= 1
        if self.active == 0 and self.all_done is not None and not self.all_done.done():
            self.all_done.set_result(None)


class Client(asyncio.Protocol):
    """One persistent connection with one request outstanding at a time."""

    def __init__(self, run: Run, connected: asyncio.Future) -> None:
        self.run = run
        self.connected = connected
        self.buffer = b""
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        if not self.connected.done():
            self.connected.set_result(self)

    def start(self) -> None:
        self.run.active += 1
        self.busy = True
        self.send_next()

    def send_next(self) -> None:
        request = self.run.next_request()
        if request is None:
            self.busy = False
            self.run.connection_idle()
            return
        self.sent_at = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            total = end + 4 + content_length(head)
            if len(self.buffer) < total:
                return
            code = int(head[9:12])
            self.buffer = self.buffer[total:]
            now = time.perf_counter()
            run = self.run
            run.codes[code] += 1
            if 200 <= code < 300:
                run.latencies.append(now - self.sent_at)
                run.last_ok = now
            self.send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.run.errors["connection_lost"] += 1
        if self.busy:
            self.busy = False
            self.run.connection_idle()


def build_requests(host: str, port: int, size: int) -> list[bytes]:
    out = []
    tag = os.urandom(4).hex()
    for i in range(KEY_SPACE):
        value = (f"h{tag}{i}-" + os.urandom(size).hex())[:size].encode()
        out.append(
            b"PUT /v1/kv/bench-%d HTTP/1.1\r\nHost: %s:%d\r\nContent-Length: %d\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n%s" % (i, host.encode(), port, len(value), value)
        )
    return out


async def load(args: argparse.Namespace) -> dict:
    loop = asyncio.get_running_loop()
    run = Run(build_requests(args.host, args.port, args.size), args.ops)
    clients: list[Client] = []
    t_connect = time.perf_counter()
    for first in range(0, args.connections, CONNECT_GROUP):
        pending = []
        for _ in range(min(CONNECT_GROUP, args.connections - first)):
            fut = loop.create_future()
            pending.append(fut)
            await loop.create_connection(lambda fut=fut: Client(run, fut), args.host, args.port)
        clients.extend(await asyncio.wait_for(asyncio.gather(*pending), 10))
    connect_s = time.perf_counter() - t_connect
    cpu0 = sum(os.times()[:2])
    run.all_done = loop.create_future()
    run.start = time.perf_counter()
    run.stop_at = run.start + args.seconds
    for client in clients:
        client.start()
    try:
        await asyncio.wait_for(run.all_done, args.seconds + args.grace)
        abandoned = 0
    except asyncio.TimeoutError:
        abandoned = run.active
    cpu1 = sum(os.times()[:2])
    wall = time.perf_counter() - run.start
    for client in clients:
        client.transport.close()
    elapsed = (run.last_ok or time.perf_counter()) - run.start
    ok = len(run.latencies)
    return {
        "connections": args.connections,
        "submitted": run.submitted,
        "success": ok,
        "codes": {str(k): v for k, v in sorted(run.codes.items())},
        "errors": dict(run.errors),
        "abandoned": abandoned,
        "connect_s": connect_s,
        "elapsed_s": elapsed,
        "ops_per_s": ok / elapsed if elapsed > 0 else 0.0,
        "client_cpu_s": cpu1 - cpu0,
        "client_cpu_us_per_request": (cpu1 - cpu0) / max(1, run.submitted) * 1e6,
        "client_cpu_share": (cpu1 - cpu0) / wall if wall > 0 else 0.0,
        **percentiles(run.latencies),
    }


class Stub(asyncio.Protocol):
    """A null HTTP server: answers every complete request with 200 at once."""

    RESPONSE = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{"index": 1}\n'

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            total = end + 4 + content_length(self.buffer[:end])
            if len(self.buffer) < total:
                return
            self.buffer = self.buffer[total:]
            self.transport.write(self.RESPONSE)


async def stub(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Stub, "127.0.0.1", args.port, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)
    # Serve until stdin closes (the controller exits or lets go of us), at most --seconds.
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        await asyncio.wait_for(reader.read(), args.seconds)
    except asyncio.TimeoutError:
        pass
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--ops", type=int, default=10**9)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--grace", type=float, default=15.0, help="wait this long for answers after --seconds")
    parser.add_argument("--stub", action="store_true", help="serve 200 to everything instead (client calibration)")
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("loopback only")
    if args.stub:
        asyncio.run(stub(args))
        return
    print(json.dumps(asyncio.run(load(args))), flush=True)


if __name__ == "__main__":
    main()
