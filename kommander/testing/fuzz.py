"""A mutational fuzzer for the two parsers a stranger reaches: the wire codec's decoders and the KV
HTTP API's request handling.

Inputs start from valid seeds (every message type and a handshake; every API request, with and
without a token) and are mutated: bits flipped, bytes inserted, deleted, duplicated or replaced
by interesting values (CBOR heads with huge lengths, integers at 2**63 and 2**64-1), inputs cut
and spliced. The only acceptable outcomes are:

* codec: a decoded message (which must then survive an encode/decode round trip unchanged) or a
  :class:`~kommander.core.errors.ProtocolError` with ``remote=True``; any other exception is a bug;
* HTTP: a response whose status is below 500, or 503/504 (no leader, outcome unknown), and no
  failure in the log; a 500 or a logged traceback is a bug;
* the HTTP fast lane (:mod:`kommander.kv.fastlane`), differentially: the same input sent to a
  bare twisted.web site and, on an identical node, through the fast lane must get the same status
  codes and bodies whenever its head is complete.

``python -m kommander.testing.fuzz --seconds 60`` (``make fuzz``) runs all three for a bounded time;
``tests/test_fuzz.py`` runs a fixed number of iterations with a fixed seed in the normal suite.
Everything is deterministic for a given seed and iteration count.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

#: Byte strings worth planting in an input: CBOR heads declaring huge lengths, large integers, a
#: tag, a break, an indefinite-length array, and HTTP separators.
_INTERESTING = (
    bytes.fromhex("1b7fffffffffffffff"),
    bytes.fromhex("1b8000000000000000"),
    bytes.fromhex("1bffffffffffffffff"),
    bytes.fromhex("9bffffffffffffffff"),
    bytes.fromhex("5b0000000100000000"),
    bytes.fromhex("7a7fffffff"),
    bytes.fromhex("c249010000000000000000"),
    b"\xff",
    b"\x9f",
    b"\x81" * 8,
    b"\r\n",
    b"\r\n\r\n",
    b"%",
    b"%00",
    b"%2F",
    b"\x00",
    b"Content-Length: 99999999999\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Authorization: Bearer ",
    b"Content-Type: application/json\r\n",
)


def mutate(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    """One to four random mutations of ``data`` (``seeds`` supply splices)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(8)
        pos = rng.randint(0, len(out))
        if choice == 0 and out:
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif choice == 1:
            out[pos:pos] = bytes([rng.randrange(256)])
        elif choice == 2 and out:
            del out[pos : pos + rng.randint(1, 8)]
        elif choice == 3:
            out[pos:pos] = rng.choice(_INTERESTING)
        elif choice == 4 and out:
            i = rng.randrange(len(out))
            out[i : i + 1] = rng.choice(_INTERESTING)
        elif choice == 5:
            del out[pos:]
        elif choice == 6:
            other = rng.choice(seeds)
            cut = rng.randint(0, len(other))
            out = out[:pos] + bytearray(other[cut:])
        else:
            chunk = out[pos : pos + rng.randint(1, 16)]
            out[pos:pos] = chunk * rng.randint(1, 4)
    return bytes(out)


@dataclass
class Report:
    """What a run did: inputs tried, how they ended, and the bugs found (input, description)."""

    name: str
    runs: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    bugs: list[tuple[bytes, str]] = field(default_factory=list)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        return f"{self.name}: {self.runs} inputs ({counts}); {len(self.bugs)} bugs"


def _inputs(seeds: list[bytes], seed: int, iterations: int | None, seconds: float | None) -> Iterator[bytes]:
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds if seconds is not None else None
    n = 0
    yield from seeds
    while (iterations is None or n < iterations) and (deadline is None or time.monotonic() < deadline):
        n += 1
        yield mutate(rng, rng.choice(seeds), seeds)


# ---------------------------------------------------------------------- the codec


def codec_seeds() -> list[bytes]:
    """A valid frame of every message type, and a handshake."""
    from kommander.core.types import (
        AppendEntries,
        AppendEntriesResponse,
        Entry,
        EntryKind,
        Heartbeat,
        HeartbeatResponse,
        InstallSnapshot,
        ReadIndexRequest,
        ReadIndexResponse,
        SnapshotChunk,
        SnapshotChunkAck,
        SnapshotMeta,
        TimeoutNow,
        VoteRequest,
        VoteResponse,
    )
    from kommander.wire.codec import PROTOCOL_VERSION, Handshake, encode_handshake, encode_message

    meta = SnapshotMeta(40, 3)
    entries = (Entry(7, 2, EntryKind.PROPOSED, "kv", b"value", 99 << 16, 7), Entry(8, 2, EntryKind.NOOP, "", b""))
    messages = [
        VoteRequest(3, "n1", "n2", 10, 2, True, False),
        VoteResponse(3, "n2", "n1", True, False),
        AppendEntries(3, "n1", "n2", 6, 2, entries, 5),
        AppendEntries(3, "n1", "n2", 6, 2, (), 5),
        AppendEntriesResponse(3, "n2", "n1", True, 8, 0, 0),
        Heartbeat(3, "n1", "n2", 5, 11),
        HeartbeatResponse(3, "n2", "n1", 11),
        TimeoutNow(3, "n1", "n2"),
        InstallSnapshot(3, "n1", "n2", meta),
        SnapshotChunk(3, "n1", "n2", meta, 0, b"chunk", False),
        SnapshotChunkAck(3, "n2", "n1", meta, 5, True),
        ReadIndexRequest(3, "n2", "n1", 1 << 40),
        ReadIndexResponse(3, "n1", "n2", 1 << 40, 17, True),
    ]
    frames = [encode_message(1, m) for m in messages]
    frames.append(encode_handshake(Handshake(PROTOCOL_VERSION, "kommander", "n1", 42, {"http": "http://127.0.0.1:8001"})))
    return frames


def fuzz_codec(iterations: int | None = 2000, seed: int = 0, seconds: float | None = None) -> Report:
    """Feed mutated frames to ``decode_message`` and ``decode_handshake``."""
    from kommander.core.errors import ProtocolError
    from kommander.wire.codec import decode_handshake, decode_message, encode_handshake, encode_message

    report = Report("codec")
    seeds = codec_seeds()
    for data in _inputs(seeds, seed, iterations, seconds):
        report.runs += 1
        for name, decode, encode in (
            ("message", lambda d: decode_message(d, 4), lambda v: encode_message(*v)),
            ("handshake", decode_handshake, encode_handshake),
        ):
            try:
                value = decode(data)
            except ProtocolError as e:
                if e.remote is not True:
                    report.bugs.append((data, f"{name}: ProtocolError with remote={e.remote!r}: {e}"))
                report.count(f"{name} refused")
                continue
            except Exception as e:  # anything else is exactly what the fuzzer looks for
                report.bugs.append((data, f"{name}: {type(e).__name__}: {e}"))
                continue
            report.count(f"{name} decoded")
            try:
                again = decode(encode(value))
            except Exception as e:
                report.bugs.append((data, f"{name}: decoded but does not re-encode: {type(e).__name__}: {e}"))
                continue
            if again != value:
                report.bugs.append((data, f"{name}: round trip changed {value!r} into {again!r}"))
    return report


# ---------------------------------------------------------------------- the HTTP API

_TOKEN = "fuzz-token-0123456789"


def http_seeds() -> list[bytes]:
    """One raw request of every kind the API serves, some with a token."""
    body = b'{"expected": null, "value": "v"}'
    requests = [
        b"GET /v1/kv/k HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /v1/kv/k?consistency=stale HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /v1/kv/k?consistency=linearizable HTTP/1.1\r\nHost: t\r\n\r\n",
        b"PUT /v1/kv/%C3%A9 HTTP/1.1\r\nHost: t\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nv"
        b"GET /v1/kv/%C3%A9 HTTP/1.1\r\nHost: t\r\n\r\n",
        b"PUT /v1/kv/k HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
        b"PUT /v1/kv/a%2Fb HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"DELETE /v1/kv/k HTTP/1.1\r\nHost: t\r\n\r\n",
        b"POST /v1/kv/k/cas HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body),
        b"GET /v1/status HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /v1/health?partition=0 HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n",
    ]
    with_token = [r.replace(b"Host: t\r\n", b"Host: t\r\nAuthorization: Bearer " + _TOKEN.encode() + b"\r\n") for r in requests]
    return requests + with_token


class _Node:
    """A one-node KV cluster on a fake clock with two sites: one open, one requiring tokens."""

    def __init__(self, token_file: str) -> None:
        from twisted.internet import task

        from kommander.config import RaftConfiguration
        from kommander.hookspecs import PluginContext
        from kommander.kv.auth import TokenTable
        from kommander.kv.fastlane import FastLane
        from kommander.kv.http import make_site
        from kommander.kv.machine import KVStateMachine
        from kommander.plugins.memory_transport import MemoryNetwork, MemoryTransport
        from kommander.plugins.memory_wal import MemoryWAL
        from kommander.plugins.static import StaticDiscovery
        from kommander.runtime.manager import RaftManager

        self.clock = task.Clock()
        config = RaftConfiguration(node_id="n1", max_partitions=2, operation_timeout=1.0)
        machine = KVStateMachine(PluginContext(self.clock, config))
        self.manager = RaftManager(
            config,
            discovery=StaticDiscovery({"n1": "memory"}),
            wal=MemoryWAL(),
            transport=MemoryTransport(MemoryNetwork(self.clock), "n1"),
            state_machine=machine,
            reactor=self.clock,
            rng=random.Random(0),
            metadata={"http": "http://127.0.0.1:8001"},
        )
        self.manager.join_cluster()
        for _ in range(100):
            if all(self.manager.get_leader(p) for p in range(2)):
                break
            self.clock.advance(0.05)
        sites = [
            make_site(self.manager, machine, max_body_bytes=4096, reactor=self.clock),
            make_site(self.manager, machine, max_body_bytes=4096, reactor=self.clock, tokens=TokenTable(token_file)),
        ]
        # Each also behind the fast lane, as twistd serves them.
        self.sites = sites + [FastLane(site, seconds=self.clock.seconds) for site in sites]

    def exchange(self, site_index: int, raw: bytes) -> bytes:
        """Feed ``raw`` to a fresh connection, let simulated time pass, return what was written."""
        from twisted.internet import address, error
        from twisted.internet.testing import StringTransport
        from twisted.python.failure import Failure

        protocol = self.sites[site_index].buildProtocol(address.IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(raw)
        for _ in range(15):
            self.clock.advance(0.1)
        written = transport.value()
        protocol.connectionLost(Failure(error.ConnectionDone()))
        return written


def _statuses(written: bytes) -> list[int]:
    out = []
    for line in written.split(b"\r\n"):
        if line.startswith(b"HTTP/1.") and len(line) >= 12 and line[9:12].isdigit():
            out.append(int(line[9:12]))
    return out


def _write_token_file(directory: str) -> str:
    """A token file in ``directory`` holding the fuzzer's write token; its path."""
    import os

    token_file = os.path.join(directory, "tokens")
    with open(token_file, "w") as f:
        f.write(f"{_TOKEN} write\n")
    os.chmod(token_file, 0o600)
    return token_file


def fuzz_http(iterations: int | None = 300, seed: int = 0, seconds: float | None = None) -> Report:
    """Feed mutated raw requests to the KV API of a one-node cluster, open and with tokens."""
    import tempfile

    from twisted.logger import capturedLogs

    report = Report("http")
    with tempfile.TemporaryDirectory() as directory:
        token_file = _write_token_file(directory)
        node = _Node(token_file)
        rng = random.Random(seed + 1)
        for data in _inputs(http_seeds(), seed, iterations, seconds):
            report.runs += 1
            with capturedLogs() as events:
                written = node.exchange(rng.randrange(len(node.sites)), data)
            failures = [e for e in events if "log_failure" in e]
            statuses = _statuses(written)
            for status in statuses:
                report.count(str(status))
            if not statuses:
                report.count("no answer")
            bad = [s for s in statuses if s >= 500 and s not in (503, 504)]
            if bad or failures:
                why = f"statuses {statuses}" + (f", logged {failures[0]['log_failure'].getErrorMessage()}" if failures else "")
                report.bugs.append((data, why))
    return report


def _answers(written: bytes) -> list[tuple[bytes, bytes]]:
    """(status line's code, body) of each response in ``written``, headers left out (the fast
    lane sends no ``Server`` header, and ``Date`` moves on)."""
    out = []
    rest = written
    for _ in range(1000):
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.split(b"\r\n")
        code = lines[0].split(b" ")[1] if b" " in lines[0] else lines[0]
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length" and value.strip().isdigit():
                length = int(value)
        if code == b"100":
            continue
        body = rest[:length]
        # Metrics hold timings and counts of the node's own work: their code only.
        out.append((code, b"<metrics>" if body.startswith(b"# HELP") else body))
        rest = rest[length:]
    return out


def fuzz_fastlane(iterations: int | None = 300, seed: int = 0, seconds: float | None = None) -> Report:
    """Differential: each mutated request goes to one node's bare twisted.web site and, on an
    identical second node, through :class:`~kommander.kv.fastlane.FastLane`; both must give the
    same answers (codes and bodies). A head that never ends may differ (twisted.web refuses a
    bad line as it arrives, the fast lane once the head is whole or too long, the deadline
    otherwise), so only inputs with a complete head are compared."""
    import tempfile

    from twisted.logger import capturedLogs

    report = Report("fastlane")
    with tempfile.TemporaryDirectory() as directory:
        token_file = _write_token_file(directory)
        web, fast = _Node(token_file), _Node(token_file)
        rng = random.Random(seed + 2)
        for data in _inputs(http_seeds(), seed, iterations, seconds):
            report.runs += 1
            site = rng.randrange(2)  # open, or with tokens
            with capturedLogs() as events:
                expected = _answers(web.exchange(site, data))
                got = _answers(fast.exchange(site + 2, data))
            failures = [e for e in events if "log_failure" in e]
            report.count("same" if got == expected else "differ")
            if failures:
                report.bugs.append((data, f"logged {failures[0]['log_failure'].getErrorMessage()}"))
            elif got != expected and b"\r\n\r\n" in data:
                report.bugs.append((data, f"twisted.web answered {expected!r:.300}, the fast lane {got!r:.300}"))
                break  # the two nodes' states may differ from here on
    return report


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> int:
    """``python -m kommander.testing.fuzz [--seconds S] [--seed N]``; exit 1 if a bug was found."""
    parser = argparse.ArgumentParser(prog="python -m kommander.testing.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="time for each target (default 30)")
    parser.add_argument("--seed", type=int, default=int(time.time()), help="random seed (default: the time)")
    args = parser.parse_args(argv)
    out(f"seed {args.seed}")
    bugs = 0
    for target in (fuzz_codec, fuzz_http, fuzz_fastlane):
        report = target(iterations=None, seed=args.seed, seconds=args.seconds)
        out(report.summary())
        for data, why in report.bugs[:10]:
            out(f"  BUG {why}\n      input {data[:200]!r}")
        bugs += len(report.bugs)
    return 1 if bugs else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
