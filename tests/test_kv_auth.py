"""Tests of kommander.kv.auth and the HTTP API's security: bearer tokens and roles, the token
file, and the checks on 307 redirects (kommander.kv.redirects)."""

from __future__ import annotations

import hmac
import os

import pytest
from test_kv_http import JSON, Cluster, cas_body, lane  # noqa: F401 - lane: every test on both lanes
from twisted.logger import capturedLogs

from kommander.core.errors import ConfigurationError
from kommander.kv import auth
from kommander.kv.auth import Outcome, Role, TokenTable, bearer_token, parse_tokens
from kommander.kv.http import make_site

READ = "r" * 20
WRITE = "w" * 20
ADMIN = "a" * 20
TOKENS = f"# a comment\n\n{READ} read\n{WRITE} write   # trailing comment\n{ADMIN} ADMIN\n"


@pytest.fixture
def token_file(tmp_path) -> str:
    path = tmp_path / "tokens"
    path.write_text(TOKENS)
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def secured(token_file: str) -> Cluster:
    """The 3-node cluster of test_kv_http with every site requiring tokens."""
    cluster = Cluster(operation_timeout=2.0)
    table = TokenTable(token_file)
    for node in cluster.sites:
        cluster.sites[node] = make_site(
            cluster.managers[node], cluster.machines[node], reactor=cluster.clock, tokens=table
        )
    return cluster


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---------------------------------------------------------------------- the token file


def test_token_file_roles_comments_and_blank_lines() -> None:
    """Lines are TOKEN ROLE; comments and blank lines are skipped; roles are case-insensitive."""
    table = parse_tokens(TOKENS)
    assert sorted(table.values()) == [Role.READ, Role.WRITE, Role.ADMIN]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "no tokens"),
        ("# only a comment\n", "no tokens"),
        (f"{READ}\n", "line 1: expected 'TOKEN ROLE'"),
        (f"{READ} read extra\n", "expected 'TOKEN ROLE'"),
        (f"{READ} reader\n", "unknown role 'reader'"),
        ("short read\n", "line 1: a token is 16-512"),
        ("tok\u00e9n-with-accent-1234 read\n", "a token is"),
        (f"{READ} read\n{READ} write\n", "line 2: this token is already listed"),
    ],
)
def test_bad_token_files_are_configuration_errors(text: str, message: str) -> None:
    """A malformed file is refused as a whole, naming the line, never echoing a token."""
    with pytest.raises(ConfigurationError, match=message) as info:
        parse_tokens(text, "tokens.txt")
    assert READ not in str(info.value)


def test_unreadable_token_file(tmp_path) -> None:
    """A missing file is a configuration error naming the option and the path."""
    with pytest.raises(ConfigurationError, match="--http-token-file .*cannot read"):
        TokenTable(str(tmp_path / "absent"))


def test_world_readable_token_file_is_logged(tmp_path) -> None:
    """A token file other users can read still loads, with a warning to chmod it."""
    path = tmp_path / "tokens"
    path.write_text(TOKENS)
    path.chmod(0o644)
    with capturedLogs() as events:
        TokenTable(str(path))
    assert any("chmod 600" in e.get("log_format", "") for e in events)


def test_reload_takes_new_tokens_and_keeps_old_ones_on_error(token_file: str) -> None:
    """reload() swaps in a changed file; a broken one is logged and the old tokens stay."""
    table = TokenTable(token_file)
    new = "n" * 20
    with open(token_file, "w") as f:
        f.write(f"{new} write\n")
    assert table.reload() is True
    assert table.role_of(new.encode()) is Role.WRITE and table.role_of(READ.encode()) is None
    with open(token_file, "w") as f:
        f.write("garbage\n")
    with capturedLogs() as events:
        assert table.reload() is False
    assert table.role_of(new.encode()) is Role.WRITE
    assert any("not reloading" in e.get("log_format", "") for e in events)


def test_every_token_is_compared_in_constant_time(token_file: str, monkeypatch) -> None:
    """role_of compares the presented token's digest with every stored digest through
    hmac.compare_digest, whether or not an early one matched."""
    table = TokenTable(token_file)
    calls: list[int] = []
    original = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return original(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for token in (READ, ADMIN, "x" * 20):
        calls.clear()
        table.role_of(token.encode())
        assert len(calls) == len(table) == 3


@pytest.mark.parametrize(
    "header, token",
    [
        (b"Bearer abcdefghijklmnop", b"abcdefghijklmnop"),
        (b"bearer   abcdefghijklmnop ", b"abcdefghijklmnop"),
        (b"Basic dXNlcjpwYXNz", None),
        (b"Bearer", None),
        (b"Bearer a b", None),
        (b"Bearer \xff\xfe", None),
        (None, None),
    ],
)
def test_bearer_header_parsing(header: bytes | None, token: bytes | None) -> None:
    """Only 'Bearer TOKEN' (scheme in any case) yields a token."""
    assert bearer_token(header) == token


def test_check_outcomes(token_file: str) -> None:
    """Missing or unknown token, lower role, enough role."""
    table = TokenTable(token_file)
    assert table.check(None, Role.READ).outcome is Outcome.MISSING
    assert table.check(b"Bearer " + b"z" * 20, Role.READ).outcome is Outcome.UNKNOWN
    assert table.check(f"Bearer {READ}".encode(), Role.WRITE).outcome is Outcome.FORBIDDEN
    assert table.check(f"Bearer {ADMIN}".encode(), Role.WRITE).outcome is Outcome.ALLOWED


# ---------------------------------------------------------------------- the HTTP API with tokens


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", "/v1/kv/k", b""),
        ("PUT", "/v1/kv/k", b"v"),
        ("DELETE", "/v1/kv/k", b""),
        ("POST", "/v1/kv/k/cas", b'{"expected": null, "value": "v"}'),
        ("GET", "/v1/status", b""),
        ("GET", "/metrics", b""),
        ("GET", "/v1/unknown", b""),
    ],
)
def test_no_token_is_401_with_a_bearer_challenge(secured: Cluster, method: str, path: str, body: bytes) -> None:
    """Without a token, and with an unknown one, every path but health answers 401 and writes nothing."""
    node = secured.leader_of("k")
    before = secured.last_indexes()
    for headers in ({}, bearer("u" * 20), {"Authorization": "Basic dXNlcjpwYXNz"}):
        reply = secured.request(node, method, path, body, {**headers, **JSON})
        assert reply.code == 401
        assert reply.headers["www-authenticate"].startswith("Bearer")
        assert set(reply.json()) == {"error", "leader"}
    assert secured.last_indexes() == before


def test_read_token_cannot_write(secured: Cluster) -> None:
    """A read token reads (and sees status and metrics) but gets 403 for PUT, DELETE and CAS."""
    node = secured.leader_of("k")
    assert secured.request(node, "PUT", "/v1/kv/k", b"v", bearer(WRITE)).code == 200
    before = secured.last_indexes()
    assert secured.request(node, "GET", "/v1/kv/k", b"", bearer(READ)).body == b"v"
    assert secured.request(node, "GET", "/v1/status", b"", bearer(READ)).code == 200
    assert secured.request(node, "GET", "/metrics", b"", bearer(READ)).code == 200
    for method, path, body in (("PUT", "/v1/kv/k", b"x"), ("DELETE", "/v1/kv/k", b""), ("POST", "/v1/kv/k/cas", cas_body("v", "x"))):
        reply = secured.request(node, method, path, body, {**bearer(READ), **JSON})
        assert reply.code == 403 and "write is needed" in reply.json()["error"]
        assert "insufficient_scope" in reply.headers["www-authenticate"]
    assert secured.last_indexes() == before
    assert secured.request(node, "GET", "/v1/kv/k", b"", bearer(ADMIN)).body == b"v"


def test_write_and_admin_tokens_write(secured: Cluster) -> None:
    """write and admin tokens may PUT, CAS and DELETE."""
    node = secured.leader_of("w")
    assert secured.request(node, "PUT", "/v1/kv/w", b"1", bearer(WRITE)).code == 200
    assert secured.request(node, "POST", "/v1/kv/w/cas", cas_body("1", "2"), {**bearer(ADMIN), **JSON}).code == 200
    assert secured.request(node, "DELETE", "/v1/kv/w", b"", bearer(ADMIN)).code == 200


def test_health_needs_no_token(secured: Cluster) -> None:
    """/v1/health stays open for probes."""
    assert secured.request("n1", "GET", "/v1/health").code == 200


def test_refusals_are_logged_without_the_token(secured: Cluster) -> None:
    """A refused request is logged with its path and client, never with the token it carried."""
    with capturedLogs() as events:
        secured.request("n1", "GET", "/v1/status", b"", bearer("s" * 20))
    lines = [e for e in events if "HTTP {code}" in e.get("log_format", "")]
    assert lines and lines[0]["code"] == 401 and lines[0]["path"] == "/v1/status"
    assert all("s" * 20 not in repr(e) for e in events)


def test_open_api_without_tokens() -> None:
    """Without a token table every request is served as before (no 401)."""
    cluster = Cluster(operation_timeout=2.0)
    assert cluster.request("n1", "GET", "/v1/status").code == 200


# ---------------------------------------------------------------------- redirects


@pytest.mark.parametrize(
    "url",
    [
        "http://user:pw@evil.test:80",
        "http://user@evil.test:80",
        "javascript:alert(1)",
        "ftp://n.test:21",
        "http://n.test",
        "http://n.test:80/prefix",
        "http://n.test:80?x=1",
        "http://n.test:80#frag",
        "http://n.test:99999",
        "http://n.test:80\r\nSet-Cookie: x=1",
        "//n.test:80",
    ],
)
def test_redirect_only_to_plain_http_urls(cluster: Cluster, url: str) -> None:
    """A leader whose advertised URL has user info, another scheme, no port, a path, a query or
    control characters is not redirected to: 503, nothing written."""
    leader = cluster.leader_of("r")
    follower = cluster.follower_of("r")
    cluster.managers[follower].peer_metadata[leader] = {"http": url}
    before = cluster.last_indexes()
    reply = cluster.request(follower, "PUT", "/v1/kv/r", b"v")
    assert reply.code == 503 and "location" not in reply.headers
    assert cluster.last_indexes() == before


def test_redirect_only_to_voters(cluster: Cluster) -> None:
    """A leader hint naming a node that is not a voter gets 503, whatever URL it advertised."""
    leader = cluster.leader_of("v")
    follower = cluster.follower_of("v")
    manager = cluster.managers[follower]
    manager.startup_voters = tuple(v for v in manager.startup_voters if v != leader)
    reply = cluster.request(follower, "PUT", "/v1/kv/v", b"v")
    assert reply.code == 503 and "location" not in reply.headers


def test_redirect_location_is_rebuilt_from_the_parsed_request(cluster: Cluster) -> None:
    """Location carries the re-encoded path and query, not the raw request target."""
    leader = cluster.leader_of("a/b")
    follower = cluster.follower_of("a/b")
    reply = cluster.request(follower, "PUT", "/v1/kv/a%2fb?x=1&y=%41", b"v")
    assert reply.code == 307
    assert reply.headers["location"] == cluster.managers[leader].metadata["http"] + "/v1/kv/a%2Fb?x=1&y=A"


@pytest.fixture
def cluster() -> Cluster:
    return Cluster(operation_timeout=2.0)


def test_token_file_permissions_do_not_matter_to_the_check(token_file: str) -> None:
    """The fixture's file is private (0600) and loads without a warning."""
    with capturedLogs() as events:
        TokenTable(token_file)
    assert not any("chmod" in e.get("log_format", "") for e in events)
    assert os.stat(token_file).st_mode & 0o077 == 0
