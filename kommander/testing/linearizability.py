"""A linearizability checker for histories of the KV service (single-key put/get/delete/cas).

A history is a list of :class:`Operation`: what a client asked, when it asked (``invoked``), when
it heard back (``completed``) and what it heard. The question is whether some total order of the
operations (a *linearization*) exists that respects real time (an operation that completed before
another was invoked comes first) and in which every operation's result is what a single
sequential key-value map would have answered.

Outcomes
    ``OK``: the client got a definite answer (HTTP 200, 404, 409). ``FAIL``: the operation
    certainly did not happen (the request never reached a node, or a 503); it is left out.
    ``UNKNOWN``: no answer (504, a timeout, a reset connection): a write may have taken effect at
    any moment after its invocation, or never. It is modelled as an operation that never
    completes and whose result is not checked, so it may be ordered anywhere after its
    invocation, including after everything else (which is the same as never). An unknown read
    constrains nothing and is left out.

Method
    Linearizability is local (Herlihy & Wing): a history is linearizable iff each key's
    sub-history is, so keys are checked independently. Each key is searched with the algorithm
    of Wing & Gong as refined by Lowe (and used by Porcupine): walk the time-ordered list of call
    and return events, tentatively linearize a pending call whose result the model accepts,
    backtrack at the first return event whose operation has not been linearized, and memoize
    every (set of linearized operations, model state) pair already explored so that no
    configuration is searched twice. Unknown operations get two dominance prunings (see
    :func:`check_key`), without which a few dozen of them make the search exponential. The
    search is bounded in steps and time; when a bound is hit the answer is
    :data:`Verdict.UNKNOWN` ("too hard"), never a hang.
"""

from __future__ import annotations

import enum
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The operations of the KV service the model knows.
KINDS = ("put", "get", "delete", "cas")


class Outcome(enum.Enum):
    """What the client learnt about an operation."""

    OK = "ok"
    FAIL = "fail"
    UNKNOWN = "unknown"


class Verdict(enum.Enum):
    """The checker's answer."""

    LINEARIZABLE = "linearizable"
    VIOLATION = "violation"
    #: The search hit its step or time bound: neither proven nor refuted.
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Operation:
    """One client operation on one key.

    :ivar process: the client that issued it (one operation at a time per client).
    :ivar key: the key.
    :ivar kind: ``put``, ``get``, ``delete`` or ``cas``.
    :ivar value: the value written (``put``, ``cas``).
    :ivar expected: for ``cas``, the value the key must hold; ``None`` means "absent".
    :ivar invoked: when the request was sent (any clock shared by all clients, in seconds).
    :ivar completed: when the answer arrived; ignored unless ``outcome`` is ``OK``.
    :ivar outcome: see :class:`Outcome`.
    :ivar result: for ``get`` the value read (``None``: 404); for ``delete`` whether the key
        existed (200) or not (404); for ``cas`` whether it swapped (200) or not (409); ``None``
        for ``put``.
    :ivar note: free text for reports (node, HTTP status, ...).
    """

    process: int
    key: str
    kind: str
    value: bytes | None = None
    expected: bytes | None = None
    invoked: float = 0.0
    completed: float | None = None
    outcome: Outcome = Outcome.OK
    result: Any = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown operation kind {self.kind!r}")
        if self.outcome is Outcome.OK and (self.completed is None or self.completed < self.invoked):
            raise ValueError(f"operation with a known outcome needs completed >= invoked: {self!r}")

    def describe(self) -> str:
        """A short human-readable form, e.g. ``p3 cas(k1, 'a'->'b') = True [1.20, 1.31]``."""
        if self.kind == "put":
            call = f"put({self.key}, {_show(self.value)})"
        elif self.kind == "cas":
            call = f"cas({self.key}, {_show(self.expected)}->{_show(self.value)})"
        else:
            call = f"{self.kind}({self.key})"
        if self.outcome is Outcome.OK:
            answer = f" = {_show(self.result) if self.kind == 'get' else self.result}"
            end = f"{self.completed:.3f}"
        else:
            answer, end = f" {self.outcome.value}", "?"
        note = f" ({self.note})" if self.note else ""
        return f"p{self.process} {call}{answer} [{self.invoked:.3f}, {end}]{note}"


def _show(value: Any) -> str:
    if value is None:
        return "absent"
    if isinstance(value, bytes):
        try:
            return repr(value.decode("utf-8"))
        except UnicodeDecodeError:
            return repr(value)
    return repr(value)


def step(state: bytes | None, op: Operation) -> tuple[bool, bytes | None]:
    """The sequential model: ``(whether op's result is possible in state, the next state)``.

    Results of operations with an unknown outcome are not checked.
    """
    known = op.outcome is Outcome.OK
    if op.kind == "put":
        return True, op.value
    if op.kind == "get":
        return op.result == state, state
    if op.kind == "delete":
        return (not known or op.result == (state is not None)), None
    swapped = state == op.expected
    return (not known or op.result == swapped), (op.value if swapped else state)


@dataclass
class KeyResult:
    """The verdict for one key, with a witness of how far the search got when it failed.

    :ivar operations: the operations that took part (failed ones and unknown reads excluded).
    :ivar depth: how many operations the longest linearization found holds.
    :ivar tail: the last operations of that linearization (indexes into ``operations``).
    :ivar state: the key's value after it.
    :ivar blocked: the operation that could not be placed after it, on a violation.
    """

    key: str
    verdict: Verdict
    operations: list[Operation]
    steps: int = 0
    depth: int = 0
    tail: list[int] = field(default_factory=list)
    state: bytes | None = None
    blocked: int | None = None
    reason: str = ""

    def explain(self, context: int = 8) -> str:
        """A readable account of the failure (or of success)."""
        ops = self.operations
        lines = [f"key {self.key!r}: {self.verdict.value} ({len(ops)} operations, {self.steps} search steps)"]
        if self.reason:
            lines.append(f"  {self.reason}")
        if self.verdict is Verdict.LINEARIZABLE:
            return "\n".join(lines)
        shown = self.tail[-context:]
        lines.append(f"  longest linearization found: {self.depth} operations; its last {len(shown)}:")
        lines.extend(f"    {ops[i].describe()}" for i in shown)
        lines.append(f"  state after it: {_show(self.state)}")
        if self.blocked is not None:
            blocked = ops[self.blocked]
            lines.append(f"  could not linearize next: {blocked.describe()}")
            horizon = blocked.completed if blocked.completed is not None else math.inf
            # Operations overlapping the blocked one: the candidates a human should look at.
            near = [
                o
                for i, o in enumerate(ops)
                if i != self.blocked
                and o.invoked <= horizon
                and (o.completed if o.outcome is Outcome.OK else math.inf) >= blocked.invoked
            ]
            if near:
                lines.append("  operations concurrent with it:")
                lines.extend(f"    {o.describe()}" for o in near[: 2 * context])
        return "\n".join(lines)


@dataclass
class CheckResult:
    """The verdict for a whole history: a violation on any key wins, then "unknown"."""

    verdict: Verdict
    keys: dict[str, KeyResult]
    seconds: float

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.LINEARIZABLE

    def failures(self) -> list[KeyResult]:
        return [r for r in self.keys.values() if r.verdict is not Verdict.LINEARIZABLE]

    def summary(self) -> str:
        counts = defaultdict(int)
        for r in self.keys.values():
            counts[r.verdict.value] += 1
        total = sum(len(r.operations) for r in self.keys.values())
        parts = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
        return f"{self.verdict.value}: {len(self.keys)} keys ({parts}), {total} operations, {self.seconds:.2f}s"

    def explain(self) -> str:
        return "\n".join([self.summary(), *(r.explain() for r in self.failures())])


class _Event:
    """A call or return in the search's doubly linked event list (Lowe's "lifting")."""

    __slots__ = ("op", "call", "match", "prev", "next")

    def __init__(self, op: int, call: bool) -> None:
        self.op = op
        self.call = call
        self.match: _Event | None = None
        self.prev: _Event | None = None
        self.next: _Event | None = None


def _lift(call: _Event) -> None:
    ret = call.match
    assert call.prev is not None and call.next is not None and ret is not None and ret.prev is not None
    call.prev.next = call.next
    call.next.prev = call.prev
    ret.prev.next = ret.next
    if ret.next is not None:
        ret.next.prev = ret.prev


def _unlift(call: _Event) -> None:
    # Undo _lift in the reverse order (dancing links): return first, then call.
    ret = call.match
    assert call.prev is not None and call.next is not None and ret is not None and ret.prev is not None
    ret.prev.next = ret
    if ret.next is not None:
        ret.next.prev = ret
    call.prev.next = call
    call.next.prev = call


def prepare(history: Iterable[Operation]) -> dict[str, list[Operation]]:
    """Group the operations that constrain the search by key: failed operations and reads of
    unknown outcome are dropped."""
    keys: dict[str, list[Operation]] = defaultdict(list)
    for op in history:
        if op.outcome is Outcome.FAIL or (op.outcome is Outcome.UNKNOWN and op.kind == "get"):
            continue
        keys[op.key].append(op)
    return dict(keys)


def check_key(
    key: str,
    ops: Sequence[Operation],
    initial: bytes | None = None,
    max_steps: int = 2_000_000,
    deadline: float | None = None,
) -> KeyResult:
    """Search one key's operations for a linearization.

    :param initial: the key's value before the history (``None``: absent).
    :param max_steps: give up with :data:`Verdict.UNKNOWN` after this many search steps.
    :param deadline: give up at this ``time.monotonic()`` instant.
    """
    ops = list(ops)
    n = len(ops)
    events: list[tuple[float, int, _Event]] = []
    for i, op in enumerate(ops):
        call, ret = _Event(i, True), _Event(i, False)
        call.match = ret
        done = op.completed if op.outcome is Outcome.OK else math.inf
        assert done is not None
        # Calls sort before returns at equal times: simultaneous events are taken as concurrent,
        # which never turns a linearizable history into a reported violation.
        events.append((op.invoked, 0, call))
        events.append((done, 1, ret))
    events.sort(key=lambda e: (e[0], e[1], e[2].op))
    head = _Event(-1, True)
    previous = head
    for _, _, event in events:
        previous.next, event.prev = event, previous
        previous = event

    known = [op.outcome is Outcome.OK for op in ops]
    # Writes whose effect does not depend on the state they are applied to.
    blind = [op.kind == "put" or (op.kind == "delete" and not k) for op, k in zip(ops, known)]
    # The set of linearized operations is two bit sets: known operations numbered by invocation,
    # and unknown ones. Known operations are linearized roughly in invocation order, so the
    # memo stores the known set as (number of leading ones, the bits after them): small integers
    # even for histories of tens of thousands of operations.
    bits = [0] * n
    known_order = sorted((i for i in range(n) if known[i]), key=lambda i: ops[i].invoked)
    for position, i in enumerate(known_order):
        bits[i] = 1 << position
    for position, i in enumerate(i for i in range(n) if not known[i]):
        bits[i] = 1 << position
    remaining = len(known_order)
    state = initial
    done_known = 0
    done_unknown = 0
    seen: set[tuple[int, int, int, bytes | None]] = set()
    stack: list[tuple[_Event, bytes | None]] = []
    best = (-1, [], initial, None)  # depth, tail, state, blocked
    steps = 0
    entry = head.next

    def memo_key(known_set: int, unknown_set: int, value: bytes | None) -> tuple[int, int, int, bytes | None]:
        low = (~known_set & (known_set + 1)).bit_length() - 1  # the first known op not linearized
        return low, known_set >> low, unknown_set, value

    def result(verdict: Verdict, reason: str = "") -> KeyResult:
        depth, tail, value, blocked = best
        return KeyResult(key, verdict, ops, steps, max(depth, 0), tail, value, blocked, reason)

    while remaining:
        steps += 1
        if steps > max_steps or (deadline is not None and steps % 1024 == 0 and time.monotonic() > deadline):
            why = f"gave up after {steps - 1} steps" if steps > max_steps else "gave up at the time limit"
            return result(Verdict.UNKNOWN, why + " (too hard)")
        assert entry is not None, "a known operation's return always precedes the end of the list"
        if entry.call:
            i = entry.op
            possible, after = step(state, ops[i])
            if possible and not known[i]:
                # An unknown operation is only worth placing where it changes the state: placed
                # where it does not, it is dominated by leaving it out (it could still go later).
                possible = after != state
            if possible and stack and blind[i] and not known[stack[-1][0].op]:
                # A blind write right after an unknown operation hides that operation's effect,
                # so that placement is dominated by the one without it, explored anyway. Without
                # this, n unknown writes alone would make the search visit 2**n subsets.
                possible = False
            if possible:
                if known[i]:
                    next_known, next_unknown = done_known | bits[i], done_unknown
                else:
                    next_known, next_unknown = done_known, done_unknown | bits[i]
                memo = memo_key(next_known, next_unknown, after)
                if memo not in seen:
                    seen.add(memo)
                    stack.append((entry, state))
                    state, done_known, done_unknown = after, next_known, next_unknown
                    _lift(entry)
                    remaining -= known[i]
                    entry = head.next
                    continue
            entry = entry.next
            continue
        # A return whose operation is still pending: nothing linearized so far can be extended.
        if len(stack) >= best[0]:
            best = (len(stack), [e.op for e, _ in stack[-32:]], state, entry.op)
        if not stack:
            return result(Verdict.VIOLATION, _reason(ops, best[3]))
        top, state = stack.pop()
        _unlift(top)
        if known[top.op]:
            done_known &= ~bits[top.op]
            remaining += 1
        else:
            done_unknown &= ~bits[top.op]
        entry = top.next
    best = (len(stack), [e.op for e, _ in stack[-32:]], state, None)
    return result(Verdict.LINEARIZABLE)


def _reason(ops: Sequence[Operation], blocked: int | None) -> str:
    if blocked is None:
        return "no linearization exists"
    return f"no linearization exists; the deepest search could not place {ops[blocked].describe()}"


def check(
    history: Iterable[Operation],
    max_steps_per_key: int = 2_000_000,
    time_limit: float | None = 60.0,
    initial: dict[str, bytes] | None = None,
) -> CheckResult:
    """Check a whole history, key by key.

    :param max_steps_per_key: search bound per key (see :func:`check_key`).
    :param time_limit: seconds for the whole check; keys left when it runs out are ``UNKNOWN``.
    :param initial: values the keys held before the history (absent otherwise).
    """
    started = time.monotonic()
    deadline = None if time_limit is None else started + time_limit
    results: dict[str, KeyResult] = {}
    for key, ops in sorted(prepare(history).items()):
        start_value = (initial or {}).get(key)
        results[key] = check_key(key, ops, start_value, max_steps_per_key, deadline)
    verdicts = {r.verdict for r in results.values()}
    if Verdict.VIOLATION in verdicts:
        verdict = Verdict.VIOLATION
    elif Verdict.UNKNOWN in verdicts:
        verdict = Verdict.UNKNOWN
    else:
        verdict = Verdict.LINEARIZABLE
    return CheckResult(verdict, results, time.monotonic() - started)
