"""Start-up check of --max-body-bytes against the transport's frame limit, and the KV API's 413
for a proposal too large for the transport (issue 9, fault 3)."""

from __future__ import annotations

import functools

import pytest
from twisted.internet.testing import MemoryReactorClock

import test_kv_http
from kommander.entry import tap
from kommander.plugins.memory_transport import MemoryNetwork
from test_tap import parse, without, in_a_scratch_directory  # noqa: F401 (in_a_scratch_directory: an autouse fixture)

SMALL_FRAME = ["--wal", "memory", "--option", "max_frame_bytes=65536"]


def test_body_limit_over_the_frame_limit_is_a_configuration_error() -> None:
    """A --max-body-bytes whose requests could not be carried by the transport stops start-up
    with a message naming both limits and the largest body allowed."""
    options = parse(*without("--data"), *SMALL_FRAME)  # the default body limit is 1 MiB
    with pytest.raises(SystemExit) as info:
        tap.makeService(options, reactor=MemoryReactorClock())
    from kommander.kv.http import max_command_bytes

    message = str(info.value.code)
    assert "--max-body-bytes 1048576" in message and "65536" in message
    largest = int(message.split("use --max-body-bytes ")[1].split()[0])
    ok = parse(*without("--data"), *SMALL_FRAME, "--max-body-bytes", str(largest))
    assert tap.makeService(ok, reactor=MemoryReactorClock()).manager.max_entry_bytes("kv") >= max_command_bytes(
        largest
    )
    too_big = parse(*without("--data"), *SMALL_FRAME, "--max-body-bytes", str(largest + 1))
    with pytest.raises(SystemExit):
        tap.makeService(too_big, reactor=MemoryReactorClock())


def test_default_limits_start() -> None:
    """The default body limit fits the TCP transport's default frame limit."""
    from kommander.kv.http import max_command_bytes

    service = tap.makeService(parse(*without("--data"), "--wal", "memory"), reactor=MemoryReactorClock())
    assert service.manager.max_entry_bytes("kv") >= max_command_bytes(1024 * 1024)


def test_command_overhead_covers_the_largest_cas() -> None:
    """No KV command is longer than its body plus COMMAND_OVERHEAD_BYTES."""
    from kommander.kv.http import COMMAND_OVERHEAD_BYTES, max_command_bytes
    from kommander.kv.machine import MAX_KEY_BYTES, encode_cas, encode_put

    key = "k" * MAX_KEY_BYTES
    assert len(encode_put(key, b"v" * 100)) <= max_command_bytes(100)
    assert len(encode_cas(key, b"e" * 50, b"v" * 50)) <= max_command_bytes(100 + 26)  # {"expected":"","value":""}
    assert COMMAND_OVERHEAD_BYTES == len(encode_cas(key, b"", b""))


def test_proposal_too_large_for_the_transport_is_413(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PUT under the HTTP body limit but over what the transport carries answers 413 with a
    JSON error, and nothing is written."""
    monkeypatch.setattr(test_kv_http, "MemoryNetwork", functools.partial(MemoryNetwork, max_frame_bytes=65536))
    cluster = test_kv_http.Cluster(max_body_bytes=1024 * 1024)
    leader = cluster.leader_of("big")
    before = cluster.last_indexes()
    reply = cluster.request(leader, "PUT", "/v1/kv/big", bytes(100_000))
    assert reply.code == 413
    assert "frame limit of 65536 bytes" in reply.json()["error"] and "leader" in reply.json()
    assert cluster.last_indexes() == before
    assert cluster.request(leader, "PUT", "/v1/kv/big", b"small").code == 200
