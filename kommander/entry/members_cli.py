"""``kommander members``: list, add and remove cluster members through the admin API.

::

    kommander members URL                       # the record and every partition's configuration
    kommander members add URL ID PEER [HTTP]    # add ID (peer endpoint PEER) as a learner
        [--wait]                                # ... and wait until it is a voter, with progress
    kommander members remove URL ID [--force]   # remove ID from every partition

``URL`` is any member's HTTP base URL: a follower's 307 to the leader of partition 0 is followed
(for ``POST`` and ``DELETE`` too, which ``urllib`` does not do by itself), and a 503 (no leader
yet) is retried a few times. The same client serves ``twistd kommander --join``.

Exit statuses (:data:`EXIT_CODES`), for scripts:

== =====================================================================================
0  done (or nothing to do)
1  refused: a bad id or endpoint, an unknown node, the last voter; the message says why
2  bad command line (argparse)
3  unreachable, or no leader after the retries
4  another change is in progress: wait for it (``kommander members URL``) and retry
5  would lose quorum: bring the missing voters back, or ``--force`` if they are gone
6  timed out: the cluster keeps working on the change; run the same command again
== =====================================================================================
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
from typing import Any, TextIO
from urllib.parse import quote, urljoin, urlsplit

from kommander.entry.progressbar import ProgressBar
from kommander.entry.status import StatusError, read_token

OK, REFUSED, USAGE, UNREACHABLE, IN_PROGRESS, QUORUM, TIMED_OUT = 0, 1, 2, 3, 4, 5, 6
#: The admin API's ``status`` -> exit status.
EXIT_CODES = {
    "success": OK,
    "invalid": REFUSED,
    "unknown_node": REFUSED,
    "errored": UNREACHABLE,
    "not_leader": UNREACHABLE,
    "change_in_progress": IN_PROGRESS,
    "would_lose_quorum": QUORUM,
    "timeout": TIMED_OUT,
}
MAX_REDIRECTS = 5
MAX_RETRIES = 10


class MembersError(Exception):
    """The request failed; ``code`` is the exit status, the message what to do."""

    def __init__(self, message: str, code: int, document: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.document = document or {}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # followed by call(), for every method


_opener = urllib.request.build_opener(_NoRedirect)


def base(url: str) -> str:
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def call(
    method: str,
    url: str,
    body: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    timeout: float = 70.0,
    retries: int = MAX_RETRIES,
    sleep: Any = time.sleep,
) -> dict[str, Any]:
    """One admin API request, following 307s and retrying 503s (bounded).

    :returns: the JSON answer of a 200.
    :raises MembersError: anything else, with the exit status it maps to.
    """
    data = json.dumps(body).encode("utf-8") if body is not None else None
    hops = attempts = 0
    while True:
        request = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with _opener.open(request, timeout=timeout) as response:
                return _json(response.read())
        except urllib.error.HTTPError as e:
            document = _json(e.read() or b"{}")
            location = e.headers.get("Location")
            if e.code in (301, 302, 307, 308) and location and hops < MAX_REDIRECTS:
                hops += 1
                url = urljoin(url, location)
                continue
            if e.code == 503 and attempts < retries:
                attempts += 1
                sleep(float(e.headers.get("Retry-After") or 1))
                continue
            raise _error(e.code, document, url) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if attempts < retries and isinstance(reason, ConnectionRefusedError):
                attempts += 1
                sleep(1.0)
                continue
            raise MembersError(f"cannot reach {url}: {reason}", UNREACHABLE) from None


def _json(raw: bytes) -> dict[str, Any]:
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {"error": raw[:200].decode("utf-8", "replace")}
    return document if isinstance(document, dict) else {"value": document}


def _error(code: int, document: dict[str, Any], url: str) -> MembersError:
    status = document.get("status")
    message = document.get("error") or f"HTTP {code}"
    if status in EXIT_CODES:
        return MembersError(str(message), EXIT_CODES[status], document)
    if code in (401, 403):
        return MembersError(f"{message} (pass --token-file with an admin token)", REFUSED, document)
    if code in (400, 404, 405, 413, 415):
        return MembersError(str(message), REFUSED, document)
    if code == 504:
        return MembersError(str(message), TIMED_OUT, document)
    return MembersError(f"{url}: {message}", UNREACHABLE, document)


def list_members(url: str, **kwargs: Any) -> dict[str, Any]:
    return call("GET", base(url) + "/v1/members", **kwargs)


def add_member(url: str, node_id: str, peer: str, http: str = "", **kwargs: Any) -> dict[str, Any]:
    return call("POST", base(url) + "/v1/members", {"id": node_id, "peer": peer, "http": http}, **kwargs)


def remove_member(url: str, node_id: str, force: bool = False, **kwargs: Any) -> dict[str, Any]:
    path = "/v1/members/" + quote(node_id, safe="")
    return call("DELETE", base(url) + path + ("?force=1" if force else ""), **kwargs)


def format_members(document: dict[str, Any]) -> str:
    """A table of the members, then each partition's configuration and any warning."""
    rows = [("id", "role", "peer", "http")]
    rows += [(m["id"], m["role"], m["peer"], m["http"] or "-") for m in document.get("members", [])]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    for part in document.get("partitions", []):
        learners = ",".join(part.get("learners", [])) or "-"
        lines.append(
            f"partition {part['partition']}: voters {','.join(part.get('voters', []))}; learners {learners}"
            + ("; joint" if part.get("joint") else "")
            + f"; leader {part.get('leader') or '-'}"
        )
    if document.get("in_progress"):
        target = document["in_progress"]
        lines.append(f"in progress: {target['op']} {target['id']}")
    for warning in document.get("warnings", []):
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("words", nargs="+", metavar="URL | add URL ID PEER [HTTP] | remove URL ID")
    parser.add_argument("--force", action="store_true", help="remove even if the voters left lack a reachable majority")
    parser.add_argument("--timeout", type=float, default=70.0, help="seconds to wait for the change (default 70)")
    parser.add_argument("--token-file", help="file holding an admin bearer token")
    parser.add_argument(
        "--wait",
        action="store_true",
        help="after add: wait (up to --timeout) until the learner caught up and is a voter; a progress bar on a terminal",
    )


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``kommander members ...``; returns the exit status."""
    words = list(args.words)
    try:
        token = read_token(args.token_file) if args.token_file else None
    except StatusError as e:
        print(f"kommander members: {e}", file=err)
        return USAGE
    kwargs = {"token": token, "timeout": args.timeout}
    try:
        if words[0] == "add" and len(words) in (4, 5):
            _check_url(words[1])
            document = add_member(words[1], words[2], words[3], words[4] if len(words) == 5 else "", **kwargs)
            print(f"added {words[2]} as a learner; it becomes a voter once caught up", file=out)
            if getattr(args, "wait", False):
                document = wait_for_voter(words[1], words[2], words[4] if len(words) == 5 else "", out, **kwargs)
                print(f"{words[2]} caught up and is a voter", file=out)
        elif words[0] == "remove" and len(words) == 3:
            _check_url(words[1])
            document = remove_member(words[1], words[2], args.force, **kwargs)
            print(f"removed {words[2]}", file=out)
        elif len(words) == 1 and words[0] not in ("add", "remove"):
            _check_url(words[0])
            document = list_members(words[0], **kwargs)
        else:
            print("usage: kommander members URL | add URL ID PEER [HTTP] | remove URL ID [--force]", file=err)
            return USAGE
    except MembersError as e:
        print(f"kommander members: {e}", file=err)
        return e.code
    print(format_members(document), file=out)
    return OK


def catch_up(url: str, learner_http: str, token: str | None = None) -> tuple[float, float | None]:
    """How far a learner got: its applied indexes summed over the partitions, against the
    commit indexes the node at ``url`` reports; ``(0, None)`` when either cannot be read."""
    if not learner_http:
        return 0.0, None
    try:
        theirs = call("GET", base(url) + "/v1/status", token=token, timeout=2.0, retries=0)
        mine = call("GET", base(learner_http) + "/v1/status", token=token, timeout=2.0, retries=0)
    except MembersError:
        return 0.0, None
    target = {p["partition"]: p["commit_index"] for p in theirs.get("partitions", [])}
    done = sum(min(p["applied_index"], target.get(p["partition"], 0)) for p in mine.get("partitions", []))
    return float(done), float(sum(target.values())) or None


def wait_for_voter(
    url: str,
    node_id: str,
    learner_http: str,
    out: TextIO,
    *,
    token: str | None = None,
    timeout: float = 70.0,
    sleep: Any = time.sleep,
    clock: Any = time.monotonic,
) -> dict[str, Any]:
    """Poll ``GET /v1/members`` until ``node_id`` is a voter, at most ``timeout`` seconds; on a
    terminal, a progress bar shows the learner's applied index against the cluster's commit index
    (read from ``learner_http``'s ``/v1/status`` when given).

    :returns: the members document that shows it a voter.
    :raises MembersError: ``TIMED_OUT`` when it is not one in time (the cluster keeps trying).
    """
    deadline = clock() + timeout
    bar = ProgressBar(out, f"{node_id} catching up", clock=clock)
    try:
        for _ in range(int(timeout / 0.5) + 2):  # bounded in count as well as in time
            document = list_members(url, token=token, timeout=min(5.0, timeout))
            roles = {m["id"]: m["role"] for m in document.get("members", [])}
            if roles.get(node_id) == "voter":
                return document
            if clock() >= deadline:
                break
            if bar.enabled:
                done, total = catch_up(url, learner_http, token)
                bar.update(done, total, f"({roles.get(node_id, 'not a member')})")
            sleep(0.5)
    finally:
        bar.close()
    raise MembersError(f"{node_id} is not a voter after {timeout:.0f} s; the cluster keeps catching it up", TIMED_OUT)


def _check_url(url: str) -> None:
    parts = urlsplit(base(url))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise MembersError(f"{url!r} is not an HTTP URL such as http://127.0.0.1:8001", USAGE)
