"""The linearizability checker on small histories whose answer is known by hand."""

from __future__ import annotations

import random

import pytest

from kommander.testing.linearizability import (
    Operation,
    Outcome,
    Verdict,
    check,
    check_key,
    prepare,
    step,
)


def _outcome(end, outcome):
    # Without a completion time an operation is unknown unless told otherwise (e.g. FAIL).
    return Outcome.UNKNOWN if end is None and outcome is Outcome.OK else outcome


def put(p, value, start, end=None, key="k", outcome=Outcome.OK):
    return Operation(p, key, "put", value.encode(), None, start, end, _outcome(end, outcome))


def get(p, result, start, end=None, key="k", outcome=Outcome.OK):
    value = None if result is None else result.encode()
    return Operation(p, key, "get", None, None, start, end, _outcome(end, outcome), value)


def delete(p, existed, start, end=None, key="k", outcome=Outcome.OK):
    return Operation(p, key, "delete", None, None, start, end, _outcome(end, outcome), existed)


def cas(p, expected, value, swapped, start, end=None, key="k", outcome=Outcome.OK):
    exp = None if expected is None else expected.encode()
    return Operation(p, key, "cas", value.encode(), exp, start, end, _outcome(end, outcome), swapped)


def unknown(op):
    return Operation(op.process, op.key, op.kind, op.value, op.expected, op.invoked, None, Outcome.UNKNOWN)


def verdict(history, **kwargs):
    return check(history, **kwargs).verdict


# ---------------------------------------------------------------------- the model


def test_model_answers_like_a_map():
    """The sequential model gives put/get/delete/cas the KV service's results."""
    assert step(None, put(0, "a", 0, 1)) == (True, b"a")
    assert step(b"a", get(0, "a", 0, 1)) == (True, b"a")
    assert step(b"a", get(0, None, 0, 1)) == (False, b"a")
    assert step(b"a", delete(0, True, 0, 1)) == (True, None)
    assert step(None, delete(0, True, 0, 1)) == (False, None)
    assert step(None, cas(0, None, "x", True, 0, 1)) == (True, b"x")
    assert step(b"y", cas(0, None, "x", True, 0, 1))[0] is False
    assert step(b"y", cas(0, "a", "x", False, 0, 1)) == (True, b"y")


def test_operation_rejects_impossible_times():
    """A known outcome completing before its invocation is a bug in the recorder, refused."""
    with pytest.raises(ValueError):
        put(0, "a", 2.0, 1.0)
    with pytest.raises(ValueError):
        Operation(0, "k", "increment")


def test_prepare_drops_failed_operations_and_unknown_reads():
    """Failed operations and reads with no answer constrain nothing and are left out."""
    history = [
        put(0, "a", 0, 1),
        put(1, "b", 0, outcome=Outcome.FAIL),
        get(2, None, 0, outcome=Outcome.UNKNOWN),
        unknown(put(3, "c", 0)),
    ]
    kept = prepare(history)["k"]
    assert [op.process for op in kept] == [0, 3]


# ---------------------------------------------------------------------- linearizable


def test_empty_and_sequential_histories_are_linearizable():
    """A history with no operations, and one run by a single client, are linearizable."""
    assert verdict([]) is Verdict.LINEARIZABLE
    history = [
        get(0, None, 0, 1),
        put(0, "a", 2, 3),
        get(0, "a", 4, 5),
        cas(0, "a", "b", True, 6, 7),
        cas(0, "a", "c", False, 8, 9),
        delete(0, True, 10, 11),
        delete(0, False, 12, 13),
        get(0, None, 14, 15),
    ]
    assert verdict(history) is Verdict.LINEARIZABLE


def test_concurrent_read_may_see_either_value():
    """A read overlapping a write may return the old or the new value."""
    for seen in ("a", "b"):
        history = [put(0, "a", 0, 1), put(1, "b", 2, 5), get(2, seen, 3, 4)]
        assert verdict(history) is Verdict.LINEARIZABLE, seen


def test_reads_may_order_concurrent_writes_either_way():
    """Two overlapping writes may take effect in either order, as later reads show."""
    for last in ("a", "b"):
        history = [put(0, "a", 0, 3), put(1, "b", 1, 2), get(2, last, 4, 5), get(2, last, 6, 7)]
        assert verdict(history) is Verdict.LINEARIZABLE, last


def test_concurrent_cas_one_winner():
    """Of two overlapping CAS from absent, one may win and the other lose."""
    history = [
        cas(0, None, "x", True, 0, 3),
        cas(1, None, "y", False, 1, 2),
        get(2, "x", 4, 5),
    ]
    assert verdict(history) is Verdict.LINEARIZABLE


def test_unknown_write_may_take_effect_late():
    """A write with no answer may take effect long after its invocation."""
    history = [
        put(0, "a", 0, 1),
        unknown(put(1, "b", 2)),
        get(2, "a", 3, 4),
        get(2, "a", 5, 6),
        get(2, "b", 7, 8),
    ]
    assert verdict(history) is Verdict.LINEARIZABLE


def test_unknown_write_may_never_happen():
    """A write with no answer may never take effect."""
    history = [put(0, "a", 0, 1), unknown(put(1, "b", 2)), get(2, "a", 3, 4), get(2, "a", 100, 101)]
    assert verdict(history) is Verdict.LINEARIZABLE


def test_unknown_cas_and_delete_results_are_not_checked():
    """Unknown CAS and DELETE may have swapped/deleted or not."""
    history = [put(0, "a", 0, 1), unknown(cas(1, "a", "b", False, 2)), get(2, "b", 3, 4)]
    assert verdict(history) is Verdict.LINEARIZABLE
    history = [put(0, "a", 0, 1), unknown(delete(1, False, 2)), get(2, None, 3, 4)]
    assert verdict(history) is Verdict.LINEARIZABLE


def test_many_keys_are_checked_independently():
    """Each key has its own register; a history on several keys is checked key by key."""
    history = [put(0, "a", 0, 1, key="x"), put(1, "b", 0, 1, key="y"), get(2, "a", 2, 3, key="x")]
    result = check(history)
    assert result.ok and set(result.keys) == {"x", "y"}


def test_initial_values():
    """A key may start with a value the history did not write."""
    history = [get(0, "seed", 0, 1)]
    assert verdict(history) is Verdict.VIOLATION
    assert check(history, initial={"k": b"seed"}).ok


# ---------------------------------------------------------------------- violations


def test_stale_read_is_a_violation():
    """A read that starts after a write completed must not return the older value."""
    history = [put(0, "a", 0, 1), put(0, "b", 2, 3), get(1, "a", 4, 5)]
    result = check(history)
    assert result.verdict is Verdict.VIOLATION
    explanation = result.explain()
    assert "get(k) = 'a'" in explanation and "violation" in explanation


def test_lost_write_is_a_violation():
    """An acknowledged write that no later read sees was lost."""
    history = [put(0, "a", 0, 1), get(1, None, 2, 3)]
    assert verdict(history) is Verdict.VIOLATION


def test_write_visible_then_invisible_is_a_violation():
    """Once a read saw a value, a later read cannot see the value before it."""
    history = [put(0, "a", 0, 1), put(1, "b", 2, 10), get(2, "b", 3, 4), get(3, "a", 5, 6)]
    assert verdict(history) is Verdict.VIOLATION


def test_two_cas_winners_from_the_same_state_are_a_violation():
    """Two CAS expecting the same value cannot both succeed."""
    history = [
        put(0, "a", 0, 1),
        cas(1, "a", "x", True, 2, 5),
        cas(2, "a", "y", True, 3, 6),
    ]
    assert verdict(history) is Verdict.VIOLATION


def test_failed_cas_needs_a_different_value():
    """A CAS may fail only if the key held another value at some point inside its interval."""
    history = [put(0, "a", 0, 1), cas(1, "a", "x", False, 2, 3)]
    assert verdict(history) is Verdict.VIOLATION


def test_delete_of_absent_key_reporting_found_is_a_violation():
    """DELETE answering 200 on a key that never existed is impossible."""
    assert verdict([delete(0, True, 0, 1)]) is Verdict.VIOLATION


def test_read_of_a_value_never_written_is_a_violation():
    """A read cannot return a value no operation wrote."""
    assert verdict([put(0, "a", 0, 1), get(1, "zzz", 2, 3)]) is Verdict.VIOLATION


def test_unknown_write_cannot_be_seen_before_its_invocation():
    """An unknown write may happen late, but not before it was issued."""
    history = [get(0, "b", 0, 1), unknown(put(1, "b", 2))]
    assert verdict(history) is Verdict.VIOLATION


def test_unknown_write_once_seen_cannot_vanish():
    """After a read saw an unknown write's value, it cannot be undone without another write."""
    history = [
        put(0, "a", 0, 1),
        unknown(put(1, "b", 2)),
        get(2, "b", 3, 4),
        get(2, "a", 5, 6),
    ]
    assert verdict(history) is Verdict.VIOLATION


def test_failed_write_must_not_be_visible():
    """A write that certainly failed (e.g. 503) must never be read."""
    history = [put(0, "a", 0, 1), put(1, "b", 2, 3, outcome=Outcome.FAIL), get(2, "b", 4, 5)]
    assert verdict(history) is Verdict.VIOLATION


def test_violation_on_one_key_fails_the_history():
    """One bad key makes the whole history a violation, and the report names it."""
    history = [put(0, "a", 0, 1, key="good"), put(0, "a", 0, 1, key="bad"), get(1, None, 2, 3, key="bad")]
    result = check(history)
    assert result.verdict is Verdict.VIOLATION
    assert [r.key for r in result.failures()] == ["bad"]


# ---------------------------------------------------------------------- bounds and scale


def test_search_bound_gives_unknown_not_a_hang():
    """When the step bound is hit the answer is UNKNOWN ("too hard")."""
    history = [put(p, f"v{p}", 0, 10) for p in range(8)] + [get(9, "v3", 11, 12)]
    result = check_key("k", history, max_steps=5)
    assert result.verdict is Verdict.UNKNOWN and "too hard" in result.reason


def test_time_limit_gives_unknown():
    """A check that runs out of time reports UNKNOWN for the keys it could not finish."""
    history = [put(p, f"v{p}", 0, 10) for p in range(8)] + [get(9, "v3", 11, 12)]
    assert check(history, time_limit=0.0, max_steps_per_key=10**9).verdict in (Verdict.UNKNOWN, Verdict.LINEARIZABLE)
    result = check_key("k", history, deadline=0.0, max_steps=10**9)
    assert result.verdict in (Verdict.UNKNOWN, Verdict.LINEARIZABLE)


def _register_run(rng, clients, ops_per_client, lose_write=False):
    """Simulate clients against an atomic register with random overlapping intervals."""
    state = None
    history = []
    now = 0.0
    pending = {}
    issued = {p: 0 for p in range(clients)}
    serial = 0
    while pending or any(n < ops_per_client for n in issued.values()):
        p = rng.randrange(clients)
        now += rng.random()
        if p in pending:
            kind, value, expected, invoked, (_, result) = pending.pop(p)
            history.append(Operation(p, "k", kind, value, expected, invoked, now, Outcome.OK, result))
            continue
        if issued[p] >= ops_per_client:
            continue
        issued[p] += 1
        serial += 1
        kind = rng.choice(("put", "get", "cas", "delete"))
        value = f"v{serial}".encode()
        expected = rng.choice((None, state))
        # The operation takes effect at its invocation (atomically), and completes later.
        if kind == "put":
            pending[p] = (kind, value, None, now, (value, None))
        elif kind == "get":
            pending[p] = (kind, None, None, now, (state, state))
        elif kind == "delete":
            pending[p] = (kind, None, None, now, (None, state is not None))
        else:
            swapped = state == expected
            pending[p] = (kind, value, expected, now, (value if swapped else state, swapped))
        # Apply now so later invocations see it.
        state = pending[p][4][0]
    if lose_write:
        # Forget the effect of the last acknowledged put: reads after it see an older value.
        puts = [i for i, op in enumerate(history) if op.kind == "put"]
        last = puts[-1]
        op = history[last]
        history.append(Operation(99, "k", "get", None, None, op.completed + 1, op.completed + 2, Outcome.OK, b"never"))
    return history


@pytest.mark.parametrize("seed", range(5))
def test_random_atomic_register_histories_are_linearizable(seed):
    """Histories produced by a truly atomic register with 5 clients are always linearizable."""
    history = _register_run(random.Random(seed), clients=5, ops_per_client=40)
    result = check(history)
    assert result.ok, result.explain()


def test_random_history_with_an_impossible_read_is_a_violation():
    """The same histories with one read of a value never written are refuted."""
    history = _register_run(random.Random(7), clients=5, ops_per_client=40, lose_write=True)
    assert verdict(history) is Verdict.VIOLATION


def test_many_unknown_writes_stay_tractable():
    """Dozens of unknown writes on one key are handled within the default bounds."""
    history = [put(0, "a", 0, 1)]
    for i in range(30):
        history.append(unknown(put(i + 1, f"u{i}", 2 + i)))
    history.append(get(50, "u7", 40, 41))
    history.append(get(50, "u7", 42, 43))
    result = check(history, time_limit=20)
    assert result.ok, result.explain()


# ---------------------------------------------------------------------- against brute force


def _brute_force(ops):
    """Linearizable by enumeration: some subset of the unknown operations, in some real-time
    respecting order, explains every known result."""
    import itertools

    known = [i for i, op in enumerate(ops) if op.outcome is Outcome.OK]
    unknowns = [i for i, op in enumerate(ops) if op.outcome is Outcome.UNKNOWN]

    def before(a, b):
        first = ops[a]
        return first.outcome is Outcome.OK and first.completed < ops[b].invoked

    for size in range(len(unknowns) + 1):
        for chosen in itertools.combinations(unknowns, size):
            members = known + list(chosen)
            for order in itertools.permutations(members):
                position = {op: n for n, op in enumerate(order)}
                if any(before(b, a) for a in members for b in members if position[a] < position[b]):
                    continue
                state, ok = None, True
                for i in order:
                    ok, state = step(state, ops[i])
                    if not ok:
                        break
                if ok:
                    return True
    return False


def _random_history(rng, size):
    ops = []
    for p in range(size):
        start = rng.randrange(6)
        end = start + rng.randrange(4)
        kind = rng.choice(("put", "get", "delete", "cas"))
        value = rng.choice((b"a", b"b"))
        expected = rng.choice((None, b"a", b"b"))
        outcome = Outcome.UNKNOWN if rng.random() < 0.3 and kind != "get" else Outcome.OK
        if kind == "get":
            result = rng.choice((None, b"a", b"b"))
        elif kind in ("delete", "cas"):
            result = rng.random() < 0.5
        else:
            result = None
        written = value if kind in ("put", "cas") else None
        done = float(end) if outcome is Outcome.OK else None
        ops.append(
            Operation(p, "k", kind, written, expected if kind == "cas" else None, float(start), done, outcome, result)
        )
    return ops


def test_agrees_with_brute_force_on_random_small_histories():
    """On 3,000 random histories of up to 6 operations (with unknown outcomes, ties, repeated
    values) the search gives the same verdict as enumerating every order."""
    rng = random.Random(2024)
    counts = {True: 0, False: 0}
    for _ in range(3000):
        ops = _random_history(rng, rng.randrange(1, 7))
        expected = _brute_force(ops)
        got = check_key("k", ops).verdict
        assert got is (Verdict.LINEARIZABLE if expected else Verdict.VIOLATION), [o.describe() for o in ops]
        counts[expected] += 1
    # Both verdicts are well represented, so the comparison means something.
    assert min(counts.values()) > 300, counts
