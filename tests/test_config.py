"""Tests of kommander.config.RaftConfiguration: defaults, validation messages, election ticks."""

from __future__ import annotations

import pytest

from kommander.config import RaftConfiguration
from kommander.core.errors import ConfigurationError, KommanderError
from kommander.runtime.manager import RaftManager

from runtime_harness import make_config


def test_defaults_validate_and_validate_returns_self() -> None:
    """A configuration with only a node id is valid, and validate() returns it for chaining."""
    config = RaftConfiguration(node_id="node-1")
    assert config.validate() is config
    assert config.max_partitions == 1 and config.heartbeat_interval < config.election_timeout_min


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"node_id": ""}, "node_id"),
        ({"node_id": "has space"}, "node_id"),
        ({"node_id": "-leading-dash"}, "node_id"),
        ({"node_id": "x" * 65}, "node_id"),
        ({"cluster_id": ""}, "cluster_id"),
        ({"port": 70000}, "port"),
        ({"port": -1}, "port"),
        ({"max_partitions": 0}, "max_partitions"),
        ({"max_partitions": 5000}, "max_partitions"),
        ({"max_partitions": 2.5}, "max_partitions"),
        ({"heartbeat_interval": 0}, "heartbeat_interval"),
        ({"heartbeat_interval": float("nan")}, "heartbeat_interval"),
        ({"election_timeout_min": -1.0}, "election_timeout_min"),
        ({"election_timeout_max": float("inf")}, "election_timeout_max"),
        ({"operation_timeout": 0}, "operation_timeout"),
        ({"election_timeout_min": 0.05, "heartbeat_interval": 0.05}, "election_timeout_min"),
        ({"election_timeout_min": 1.0, "election_timeout_max": 1.0}, "election_timeout_max"),
        ({"election_timeout_min": 1.0, "election_timeout_max": 0.8}, "election_timeout_max"),
        ({"max_batch_entries": 0}, "max_batch_entries"),
        ({"max_batch_bytes": -5}, "max_batch_bytes"),
        ({"max_inflight_messages": True}, "max_inflight_messages"),
        ({"max_inflight_bytes": 1.5}, "max_inflight_bytes"),
        ({"max_queued_proposals": 0}, "max_queued_proposals"),
        ({"max_uncommitted_bytes": 0}, "max_uncommitted_bytes"),
        ({"checkpoint_every": -1}, "checkpoint_every"),
    ],
)
def test_validate_rejects_nonsense_naming_the_field(overrides: dict, field: str) -> None:
    """validate() raises ConfigurationError (a KommanderError and a ValueError) whose message names the field."""
    config = make_config(**overrides)
    with pytest.raises(ConfigurationError) as info:
        config.validate()
    message = str(info.value)
    assert field in message
    assert "use" in message or "make it" in message  # says what to change
    assert isinstance(info.value, KommanderError) and isinstance(info.value, ValueError)


def test_validate_reports_every_problem_at_once() -> None:
    """Several bad fields are all named in one error, so one edit fixes them all."""
    with pytest.raises(ConfigurationError) as info:
        make_config(port=-1, max_partitions=0, max_queued_proposals=0).validate()
    message = str(info.value)
    for field in ("port", "max_partitions", "max_queued_proposals"):
        assert field in message


def test_the_manager_validates_its_configuration() -> None:
    """RaftManager refuses an invalid configuration before touching any collaborator."""
    with pytest.raises(ConfigurationError, match="max_partitions"):
        RaftManager(make_config(max_partitions=0), discovery=None, wal=None, transport=None)


@pytest.mark.parametrize(
    "heartbeat, low, high, expected",
    [(0.05, 0.5, 1.0, (10, 20)), (0.1, 1.0, 1.05, (10, 11)), (0.05, 0.1, 0.12, (2, 3))],
)
def test_election_ticks_are_the_timeouts_in_heartbeats(heartbeat, low, high, expected) -> None:
    """election_ticks() converts the timeout range to heartbeat ticks and always leaves a range to randomize in."""
    config = make_config(heartbeat_interval=heartbeat, election_timeout_min=low, election_timeout_max=high)
    assert config.validate().election_ticks() == expected
    low_ticks, high_ticks = expected
    assert low_ticks >= 2 and high_ticks > low_ticks


def test_field_names_include_the_seed_fields() -> None:
    """The seed's RaftConfiguration fields are all present."""
    assert {"node_id", "host", "port", "max_partitions"} <= set(RaftConfiguration.field_names())
