"""The transports alone: TCP against HTTP between two nodes in one process, on 127.0.0.1.

Usage::

    .venv/bin/python benchmarks/transport_bench.py [--round-trips 2000] [--messages 200000]

For each transport it measures

* *round trip*: node a sends a Heartbeat, b answers with a HeartbeatResponse as soon as it is
  delivered, a sends the next one when the answer arrives (one message in flight, the sequential
  commit path's network share);
* *stream*: a sends AppendEntries of one 100-byte entry in calls of 64 messages, keeping at most
  2,000 messages unacknowledged (b answers every 64th), and b counts deliveries per second.

Both nodes share this process and its reactor, so the figures include both ends' CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from twisted.internet import defer, task
from zope.interface import implementer

from kommander.core.types import AppendEntries, Entry, Heartbeat, HeartbeatResponse
from kommander.interfaces import IMessageReceiver
from kommander.plugins.http_transport import HTTPTransport
from kommander.plugins.tcp import TCPTransport

TRANSPORTS = {"tcp": TCPTransport, "http": HTTPTransport}


@implementer(IMessageReceiver)
class Receiver:
    cluster_id = "bench"
    partitions = 1
    metadata: dict[str, str] = {}

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.on_message: Any = None

    def message_received(self, peer: str, partition: int, message: Any) -> None:
        self.on_message(message)

    def peer_status_changed(self, peer: str, connected: bool, metadata: Any) -> None:
        pass


async def pair(reactor: Any, kind: str) -> tuple[Any, Any, Receiver, Receiver]:
    cls = TRANSPORTS[kind]
    a, b = (cls(reactor, node, "bench", "tcp:0:interface=127.0.0.1") for node in ("a", "b"))
    ra, rb = Receiver("a"), Receiver("b")
    await a.start(ra)
    await b.start(rb)
    peers = {n: f"tcp:host=127.0.0.1:port={t.listening_port.getHost().port}" for n, t in (("a", a), ("b", b))}
    a.update_peers(peers)
    b.update_peers(peers)
    while not (a.is_connected("b") and b.is_connected("a")):
        await task.deferLater(reactor, 0.01, lambda: None)
    return a, b, ra, rb


async def round_trips(reactor: Any, kind: str, count: int) -> list[float]:
    a, b, ra, rb = await pair(reactor, kind)
    samples: list[float] = []
    done: defer.Deferred[None] = defer.Deferred()
    state = {"sent": 0.0, "n": 0}

    def ping() -> None:
        state["sent"] = time.perf_counter()
        a.send("b", [(0, Heartbeat(1, "a", "b", state["n"]))])

    def pong(message: Any) -> None:
        b.send("a", [(0, HeartbeatResponse(1, "b", "a", message.commit))])

    def answered(message: Any) -> None:
        samples.append(time.perf_counter() - state["sent"])
        state["n"] += 1
        if state["n"] == count:
            done.callback(None)
        else:
            ping()

    rb.on_message, ra.on_message = pong, answered
    ping()
    await done
    await a.stop()
    await b.stop()
    return samples


async def stream(reactor: Any, kind: str, total: int) -> float:
    a, b, ra, rb = await pair(reactor, kind)
    entry = (Entry(1, 1, data=b"x" * 100),)
    state = {"delivered": 0, "acked": 0, "sent": 0}
    done: defer.Deferred[None] = defer.Deferred()

    def delivered(message: Any) -> None:
        state["delivered"] += 1
        if state["delivered"] % 64 == 0 or state["delivered"] == total:
            b.send("a", [(0, HeartbeatResponse(1, "b", "a", state["delivered"]))])
        if state["delivered"] == total:
            done.callback(None)

    def acked(message: Any) -> None:
        state["acked"] = message.context
        pump()

    def pump() -> None:
        while state["sent"] < total and state["sent"] - state["acked"] < 2000:
            batch = [(0, AppendEntries(1, "a", "b", state["sent"] + i, 1, entry, 0)) for i in range(64)]
            a.send("b", batch)
            state["sent"] += len(batch)

    rb.on_message, ra.on_message = delivered, acked
    start = time.perf_counter()
    pump()
    await done
    elapsed = time.perf_counter() - start
    await a.stop()
    await b.stop()
    return total / elapsed


async def main(reactor: Any, args: argparse.Namespace) -> None:
    print(f"{'transport':10} {'rtt p50 ms':>11} {'rtt p99 ms':>11} {'stream msg/s':>13}")
    for kind in TRANSPORTS:
        samples = sorted(await round_trips(reactor, kind, args.round_trips))
        rate = await stream(reactor, kind, args.messages)
        p50 = statistics.median(samples) * 1000
        p99 = samples[int(len(samples) * 0.99)] * 1000
        print(f"{kind:10} {p50:11.3f} {p99:11.3f} {rate:13,.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=200_000)
    options = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, options)))
