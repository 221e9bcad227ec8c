"""Run real multicast discovery on loopback and print what each node saw, as JSON.

Used by ``tests/test_discovery.py`` in a subprocess, inside a private network namespace when one
can be made. Everything is pinned to 127.0.0.1 with TTL 0, and the run stops itself after
``--timeout`` seconds at most.

Usage: ``python multicast_scenario.py --port PORT --nodes 3 [--timeout 10]``
"""

from __future__ import annotations

import argparse
import json
import socket
import sys

from twisted.internet import defer, task


def _send_garbage(group: str, port: int) -> int:
    """Send datagrams discovery must ignore; returns how many were sent."""
    from kommander.plugins.multicast import MAGIC, MAX_DATAGRAM_BYTES, VERSION, encode_announcement

    garbage = [
        b"",
        b"hello",
        MAGIC + bytes([VERSION]) + b"\xff\xff",
        MAGIC + bytes([VERSION + 1]) + b"\xa0",
        MAGIC + bytes([VERSION]) + b"\xa4" + b"\x00" * 10,
        b"x" * (MAX_DATAGRAM_BYTES + 1),
        encode_announcement("other-cluster", "intruder", "tcp:host=127.0.0.1:port=1", {}),
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        for datagram in garbage:
            sock.sendto(datagram, (group, port))
    return len(garbage)


@defer.inlineCallbacks
def scenario(reactor, args):
    from kommander.plugins.multicast import MulticastDiscovery

    group = "239.255.42.99"
    nodes = [
        MulticastDiscovery(
            reactor,
            f"n{i}",
            "test-cluster",
            f"tcp:host=127.0.0.1:port={9000 + i}",
            metadata={"http": f"http://127.0.0.1:{9100 + i}"},
            group=group,
            port=args.port,
            interface="127.0.0.1",
            ttl=0,
            interval=0.1,
        )
        for i in range(args.nodes)
    ]
    changes = {d.node_id: 0 for d in nodes}
    for d in nodes:
        d.subscribe(lambda view, who=d.node_id: changes.__setitem__(who, changes[who] + 1))
    # Garbage first, while the nodes listen, so that it is received before they converge.
    yield nodes[0].start()
    sent = _send_garbage(group, args.port)
    for d in nodes[1:]:
        yield d.start()
    deadline = reactor.seconds() + args.timeout
    want = {d.node_id for d in nodes}
    while reactor.seconds() < deadline and not all(set(d.nodes()) == want for d in nodes):
        yield task.deferLater(reactor, 0.05, lambda: None)
    # One more interval so the garbage is surely processed before counting.
    yield task.deferLater(reactor, 0.2, lambda: None)
    result = {
        "converged_after": round(args.timeout - (deadline - reactor.seconds()), 3),
        "garbage_sent": sent,
        "views": {d.node_id: dict(d.nodes()) for d in nodes},
        "metadata": {d.node_id: {n: dict(d.metadata(n)) for n in d.nodes()} for d in nodes},
        "ignored": {d.node_id: dict(d.ignored) for d in nodes},
        "changes": changes,
    }
    for d in nodes:
        yield d.stop()
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    task.react(scenario, (args,))


if __name__ == "__main__":
    sys.exit(main())
