"""The KV HTTP API's linearizable GET on a follower: served there, no redirect."""

from __future__ import annotations

from test_kv_http import Cluster


def test_follower_answers_linearizable_get_with_latest_write() -> None:
    """A follower answers GET /v1/kv/{key} with 200 and the latest acknowledged write, not 307."""
    cluster = Cluster()
    leader = cluster.leader_of("f")
    follower = cluster.follower_of("f")
    for value in (b"one", b"two"):
        assert cluster.request(leader, "PUT", "/v1/kv/f", value).code == 200
    # No clock advance: the follower may not even have the entry yet when the GET arrives.
    reply = cluster.request(follower, "GET", "/v1/kv/f")
    assert reply.code == 200 and reply.body == b"two"
    assert cluster.request(follower, "GET", "/v1/kv/absent").code == 404


def test_follower_still_redirects_writes() -> None:
    """Writes to a follower still get 307 to the leader."""
    cluster = Cluster()
    follower = cluster.follower_of("w")
    assert cluster.request(follower, "PUT", "/v1/kv/w", b"v").code == 307
