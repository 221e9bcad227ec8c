"""Concurrent HTTP clients for the KV service that record every operation for the checker.

:class:`KVClient` performs one operation against a node, follows ``307`` redirects to the
leader and turns the answer into a :class:`~kommander.testing.linearizability.Operation`:

=====================================================  ============================================
answer                                                 outcome
=====================================================  ============================================
200, 404, 409                                          known (``OK``), with its result
503 (no leader, queue full, node starting)             ``FAIL``: nothing was written
307 chain ending in a refused connection               ``FAIL``: no node took the request
connection refused (nothing listening)                 ``FAIL``: the request was never sent
504, 500, timeout, reset, a malformed answer           ``UNKNOWN``: the write may or may not happen
=====================================================  ============================================

``503`` counting as "not applied" follows ``kommander/kv/http.py``: it answers 503 for
``NOT_LEADER`` without a known leader, ``QUEUE_FULL`` and ``ERRORED`` results, all decided before
the entry reaches the log (requests already in the log when their node stops end ``ABORTED``, a
504; before commit 4860004 they got 503, which the soak caught). Pass ``unknown_on_503=True`` to
count 503 as unknown anyway, e.g. to check whether a failing run depends on that promise.

:class:`Workload` runs several clients in threads (loopback only), each issuing random
put/get/cas/delete operations on a small set of shared keys against random nodes, plus writes to
keys of their own that are never overwritten, so that every acknowledged write can be looked
up afterwards (:attr:`Workload.acknowledged`). Every loop is bounded by a deadline.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from kommander.testing.procs import ConnectRefused, http_call
from kommander.testing.linearizability import Operation, Outcome

#: Redirects followed before giving up (a 307 loop means nothing was written).
MAX_REDIRECTS = 4


@dataclass(frozen=True, slots=True)
class Answer:
    """The last HTTP answer of an operation: status (0 when none), body, node that gave it."""

    status: int
    body: bytes
    node: str
    error: str = ""


def _error_text(body: bytes) -> str:
    """The ``error`` of a JSON error body, shortened, for notes in reports."""
    try:
        message = json.loads(body).get("error", "")
    except (ValueError, AttributeError):
        return ""
    return str(message)[:80]


class KVClient:
    """Issues single operations and records them.

    :param process: the client's number in the history.
    :param timeout: seconds per HTTP exchange.
    :param record: called with every finished :class:`Operation` (e.g. ``list.append``).
    :param unknown_on_503: count 503 as an unknown outcome instead of "not applied".
    """

    def __init__(
        self,
        process: int,
        timeout: float = 3.0,
        record: Callable[[Operation], None] | None = None,
        unknown_on_503: bool = False,
    ) -> None:
        self.process = process
        self.timeout = timeout
        self.record = record
        self.unknown_on_503 = unknown_on_503
        self.statuses: Counter[str] = Counter()
        self.lock = threading.Lock()

    def request(
        self, method: str, base_url: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Answer:
        """Send one request, following 307s; never raises for network trouble."""
        url = base_url.rstrip("/") + path
        redirected = False
        for _ in range(MAX_REDIRECTS + 1):
            node = urlsplit(url).netloc
            try:
                result = http_call(method, url, body, self.timeout, headers)
            except ConnectRefused:
                # Nothing listened, so this request was certainly not received; earlier hops
                # answered 307, which is also "not written".
                return Answer(-1, b"", node, "connection refused" + (" after a redirect" if redirected else ""))
            except OSError as e:
                return Answer(0, b"", node, f"{type(e).__name__}: {e}")
            if result.status == 307 and "location" in result.headers:
                url = result.headers["location"]
                redirected = True
                continue
            return Answer(result.status, result.body, node)
        return Answer(-2, b"", urlsplit(url).netloc, f"more than {MAX_REDIRECTS} redirects")

    def _finish(self, op: Operation) -> Operation:
        if self.record is not None:
            self.record(op)
        return op

    def _outcome(self, answer: Answer, known: tuple[int, ...]) -> Outcome:
        if answer.status in known:
            return Outcome.OK
        if answer.status in (-1, -2) or (answer.status == 503 and not self.unknown_on_503):
            return Outcome.FAIL
        if 400 <= answer.status < 500:
            return Outcome.FAIL  # refused as malformed: never reached the log
        return Outcome.UNKNOWN

    def _run(
        self,
        kind: str,
        base_url: str,
        key: str,
        method: str,
        suffix: str = "",
        body: bytes | None = None,
        value: bytes | None = None,
        expected: bytes | None = None,
        query: str = "",
    ) -> tuple[Operation, Answer]:
        path = "/v1/kv/" + quote(key, safe="") + suffix + query
        known = {"put": (200,), "get": (200, 404), "delete": (200, 404), "cas": (200, 409)}[kind]
        invoked = time.monotonic()
        # A CAS body must be declared JSON; PUT bodies are raw bytes.
        headers = {"Content-Type": "application/json"} if kind == "cas" else None
        answer = self.request(method, base_url, path, body, headers)
        completed = time.monotonic()
        outcome = self._outcome(answer, known)
        with self.lock:
            self.statuses[f"{kind} {answer.status if answer.status > 0 else answer.error.split(':')[0]}"] += 1
        result: object = None
        if outcome is Outcome.OK:
            if kind == "get":
                result = answer.body if answer.status == 200 else None
            elif kind in ("delete", "cas"):
                result = answer.status == 200
        note = f"{answer.node} {answer.status}" + (f" {answer.error}" if answer.error else "")
        if answer.status >= 300:
            note += f" {_error_text(answer.body)}"
        op = Operation(
            self.process,
            key,
            kind,
            value,
            expected,
            invoked,
            completed if outcome is Outcome.OK else None,
            outcome,
            result,
            note,
        )
        return self._finish(op), answer

    def put(self, base_url: str, key: str, value: bytes) -> Operation:
        return self._run("put", base_url, key, "PUT", body=value, value=value)[0]

    def get(self, base_url: str, key: str, lease: bool = False) -> Operation:
        """A linearizable read: the default consistency, or with ``lease`` a leader's lease read
        (``?consistency=lease``), which is recorded the same way: it must be linearizable too as
        long as the clocks keep the documented bounds."""
        return self._run("get", base_url, key, "GET", query="?consistency=lease" if lease else "")[0]

    def delete(self, base_url: str, key: str) -> Operation:
        return self._run("delete", base_url, key, "DELETE")[0]

    def cas(self, base_url: str, key: str, expected: bytes | None, value: bytes) -> Operation:
        body = json.dumps(
            {"expected": None if expected is None else expected.decode("utf-8"), "value": value.decode("utf-8")}
        ).encode()
        return self._run("cas", base_url, key, "POST", "/cas", body, value, expected)[0]

    def stale_get(self, base_url: str, key: str) -> Answer:
        """``?consistency=stale`` read of the node's local copy; not recorded (not linearizable)."""
        return self.request("GET", base_url, "/v1/kv/" + quote(key, safe="") + "?consistency=stale")


class Workload:
    """Random concurrent operations against a cluster, recorded into :attr:`history`.

    :param urls: the nodes' base URLs, or a callable returning them (asked before each
        operation, so a test can change the set).
    :param clients: number of client threads.
    :param keys: number of shared keys (``k0``.. ``kN-1``) the clients contend on.
    :param seed: seeds every client's random choices.
    :param timeout: seconds per HTTP exchange.
    :param own_key_ratio: share of operations that are writes to a client's own fresh key.
    :param unknown_on_503: see :class:`KVClient`.
    :param pause: seconds a client waits after an operation that failed, so a cluster without
        a leader is not flooded.
    :param lease_reads: share of the reads sent as lease reads (``?consistency=lease``).
    """

    def __init__(
        self,
        urls: Sequence[str] | Callable[[], Sequence[str]],
        clients: int = 4,
        keys: int = 5,
        seed: int = 0,
        timeout: float = 3.0,
        own_key_ratio: float = 0.15,
        unknown_on_503: bool = False,
        pause: float = 0.05,
        lease_reads: float = 0.0,
    ) -> None:
        self._urls = urls if callable(urls) else (lambda: list(urls))
        self.keys = [f"k{i}" for i in range(keys)]
        self.seed = seed
        self.timeout = timeout
        self.own_key_ratio = own_key_ratio
        self.pause = pause
        self.lease_reads = lease_reads
        self.history: list[Operation] = []
        #: Own keys whose write was acknowledged (200): key -> value. Never overwritten.
        self.acknowledged: dict[str, bytes] = {}
        #: Own keys whose write has an unknown outcome: key -> value.
        self.maybe_written: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._clients = [KVClient(i, timeout, self._record, unknown_on_503) for i in range(clients)]
        self.started = 0.0
        self.errors: list[str] = []

    def _record(self, op: Operation) -> None:
        with self._lock:
            self.history.append(op)

    # ------------------------------------------------------------------ running

    def start(self, duration: float = 3600.0) -> None:
        """Start the client threads; they stop by themselves after ``duration`` seconds."""
        if self._threads:
            raise RuntimeError("the workload is already running")
        self._stop.clear()
        self.started = time.monotonic()
        deadline = self.started + duration
        for client in self._clients:
            thread = threading.Thread(
                target=self._loop, args=(client, deadline), name=f"kv-client-{client.process}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Ask the clients to stop and wait for them (bounded by their HTTP timeout)."""
        self._stop.set()
        limit = time.monotonic() + (MAX_REDIRECTS + 2) * self.timeout + 5.0
        for thread in self._threads:
            thread.join(max(0.0, limit - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        self._threads = []
        if alive:
            raise RuntimeError(f"client threads did not stop: {', '.join(alive)}")

    def run(self, seconds: float) -> None:
        """Run for ``seconds`` in the calling thread's time (start, sleep, stop)."""
        self.start(seconds + 1.0)
        self._stop.wait(seconds)
        self.stop()

    def __enter__(self) -> "Workload":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self, client: KVClient, deadline: float) -> None:
        rng = random.Random(f"{self.seed}-{client.process}")
        seen: dict[str, bytes | None] = {}
        serial = 0
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                urls = list(self._urls())
                if not urls:
                    self._stop.wait(self.pause)
                    continue
                serial += 1
                op = self._one(client, rng, rng.choice(urls), serial, seen)
                if op.outcome is not Outcome.OK:
                    self._stop.wait(self.pause * (0.5 + rng.random()))
        except Exception as e:  # noqa: BLE001 - reported by the test, never a silent thread death
            with self._lock:
                self.errors.append(f"client {client.process}: {type(e).__name__}: {e}")

    def _one(
        self, client: KVClient, rng: random.Random, url: str, serial: int, seen: dict[str, bytes | None]
    ) -> Operation:
        value = f"c{client.process}-{serial}".encode()
        if rng.random() < self.own_key_ratio:
            key = f"own-c{client.process}-{serial}"
            op = client.put(url, key, value)
            with self._lock:
                if op.outcome is Outcome.OK:
                    self.acknowledged[key] = value
                elif op.outcome is Outcome.UNKNOWN:
                    self.maybe_written[key] = value
            return op
        key = rng.choice(self.keys)
        roll = rng.random()
        if roll < 0.35:
            # The roll's own fraction picks lease reads, so the other choices' randomness (and
            # with it a seed's run without lease reads) stays the same.
            op = client.get(url, key, lease=roll < 0.35 * self.lease_reads)
            if op.outcome is Outcome.OK:
                seen[key] = op.result
        elif roll < 0.65:
            op = client.put(url, key, value)
            if op.outcome is Outcome.OK:
                seen[key] = value
        elif roll < 0.9:
            # Expect what this client last saw, so that some swaps succeed and some do not.
            expected = seen.get(key) if rng.random() < 0.8 else None
            op = client.cas(url, key, expected, value)
            if op.outcome is Outcome.OK and op.result:
                seen[key] = value
        else:
            op = client.delete(url, key)
            if op.outcome is Outcome.OK:
                seen[key] = None
        return op

    # ------------------------------------------------------------------ reporting

    def snapshot(self) -> list[Operation]:
        """A copy of the history so far (safe while clients run)."""
        with self._lock:
            return list(self.history)

    def count(
        self, outcome: Outcome = Outcome.OK, writes_only: bool = True, keys: Callable[[str], bool] | None = None
    ) -> int:
        """Operations so far with this outcome (writes only, by default; on ``keys`` if given)."""
        with self._lock:
            return sum(
                1
                for op in self.history
                if op.outcome is outcome and (op.kind != "get" or not writes_only) and (keys is None or keys(op.key))
            )

    def wait_for_writes(
        self, more: int, timeout: float, keys: Callable[[str], bool] | None = None, at_least: float = 0.0
    ) -> int:
        """Wait until ``more`` further writes (on ``keys``, if given) were acknowledged and at
        least ``at_least`` seconds passed; returns how many were.

        :raises TimeoutError: fewer were acknowledged within ``timeout`` seconds.
        """
        start = self.count(keys=keys)
        began = time.monotonic()
        limit = began + max(timeout, at_least)
        while time.monotonic() < limit:
            done = self.count(keys=keys) - start
            if done >= more and time.monotonic() - began >= at_least:
                return done
            time.sleep(0.05)
        raise TimeoutError(f"only {self.count(keys=keys) - start} of {more} writes acknowledged within {timeout}s")

    def statuses(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for client in self._clients:
            with client.lock:
                total.update(client.statuses)
        return total

    def summary(self) -> str:
        with self._lock:
            outcomes = Counter(op.outcome.value for op in self.history)
            kinds = Counter(op.kind for op in self.history)
        elapsed = time.monotonic() - self.started if self.started else 0.0
        return (
            f"{len(self.history)} operations in {elapsed:.1f}s ({dict(sorted(kinds.items()))}); outcomes "
            f"{dict(sorted(outcomes.items()))}; {len(self.acknowledged)} own-key writes acknowledged, "
            f"{len(self.maybe_written)} unknown; answers {dict(sorted(self.statuses().items()))}"
        )
