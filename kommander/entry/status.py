"""Fetching and printing one node's ``GET /v1/status``, shared by the CLI and the demo."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

_COLUMNS = (
    ("partition", "partition"),
    ("role", "role"),
    ("term", "term"),
    ("leader", "leader"),
    ("commit", "commit_index"),
    ("applied", "applied_index"),
    ("last", "last_log_index"),
)
_RIGHT = frozenset({"partition", "term", "commit", "applied", "last"})


class StatusError(Exception):
    """The status could not be fetched or understood; the message says why."""


def status_url(url: str) -> str:
    """The ``/v1/status`` URL of a node given by its base URL (``http://`` may be omitted)."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    return url if url.endswith("/v1/status") else url + "/v1/status"


def read_token(path: str) -> str:
    """The token in ``path``: the first field of its first line that is not blank or a comment
    (so both a file holding just the token and a node's ``TOKEN ROLE`` file work).

    :raises StatusError: the file cannot be read or holds no token.
    """
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                fields = line.split("#", 1)[0].split()
                if fields:
                    return fields[0]
    except (OSError, UnicodeDecodeError) as e:
        raise StatusError(f"--token-file {path!r}: cannot read it: {getattr(e, 'strerror', None) or e}") from None
    raise StatusError(f"--token-file {path!r}: no token in it")


def fetch_status(url: str, timeout: float = 5.0, token: str | None = None) -> dict[str, Any]:
    """``GET /v1/status`` of the node at ``url``, decoded.

    :param token: sent as ``Authorization: Bearer TOKEN`` (nodes with ``--http-token-file``).
    :raises StatusError: unreachable, not a 200, or not a JSON object with ``partitions``.
    """
    target = status_url(url)
    request = urllib.request.Request(target, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        raise StatusError(f"{target} answered {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise StatusError(f"cannot reach {target}: {reason}") from None
    try:
        document = json.loads(body)
    except ValueError:
        raise StatusError(f"{target} did not answer JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("partitions"), list):
        raise StatusError(f"{target} did not answer a Kommander status document")
    return document


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def format_status(status: dict[str, Any]) -> str:
    """A readable table: a header line about the node, then one row per partition."""
    header = f"node {_cell(status.get('node_id'))}"
    if status.get("cluster_id"):
        header += f"  cluster {status['cluster_id']}"
    if status.get("http"):
        header += f"  {status['http']}"
    if status.get("voters"):
        header += f"  voters {','.join(map(str, status['voters']))}"
    if status.get("running") is False:
        header += "  (not running)"
    rows = [[title for title, _ in _COLUMNS]]
    for part in status.get("partitions", []):
        part = part if isinstance(part, dict) else {}
        rows.append([_cell(part.get(field)) for _, field in _COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [header]
    for row in rows:
        cells = [
            cell.rjust(width) if title in _RIGHT else cell.ljust(width)
            for cell, width, (title, _) in zip(row, widths, _COLUMNS)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


#: A partition whose applied index trails its commit index by more than this is reported.
APPLY_LAG = 1000


def degraded(status: dict[str, Any]) -> list[str]:
    """What is wrong in one node's status: not running, partitions without a leader, apply lag."""
    problems = []
    if status.get("running") is False:
        problems.append("the node is not running")
    parts = [p for p in status.get("partitions", []) if isinstance(p, dict)]
    leaderless = [str(p.get("partition")) for p in parts if p.get("leader") is None]
    if leaderless:
        problems.append("no leader for partition " + ", ".join(leaderless))
    for part in parts:
        commit, applied = part.get("commit_index"), part.get("applied_index")
        if isinstance(commit, int) and isinstance(applied, int) and commit - applied > APPLY_LAG:
            problems.append(f"partition {part.get('partition')}: applied {applied} trails commit {commit}")
    return problems
