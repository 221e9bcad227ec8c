"""The ``kommander`` console script.

``kommander status URL``
    Print a table of one node's view of the cluster (``GET URL/v1/status``).
``kommander demo``
    Start a local 3-node cluster of ``twistd kommander`` processes and show writes, a leader
    killed with SIGKILL, failover and catch-up (:mod:`kommander.entry.demo`; ``make demo`` runs it).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, TextIO

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


def fetch_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """``GET /v1/status`` of the node at ``url``, decoded.

    :raises StatusError: unreachable, not a 200, or not a JSON object with ``partitions``.
    """
    target = status_url(url)
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:
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


def _status(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        status = fetch_status(args.url, args.timeout)
    except StatusError as e:
        print(f"kommander status: {e}", file=err)
        return 1
    print(format_status(status), file=out)
    return 0


def _demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from kommander.entry.demo import Demo

    return Demo(partitions=args.partitions, keep=args.keep, out=out, time_limit=args.time_limit).run()


def _positive_int(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r}: use a whole number from 1 to 64")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: use a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kommander``."""
    parser = argparse.ArgumentParser(prog="kommander", description="Kommander, Raft consensus for Twisted.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    status = commands.add_parser("status", help="print a table of a node's view of the cluster")
    status.add_argument("url", help="the node's HTTP base URL, e.g. http://127.0.0.1:8001")
    status.add_argument("--timeout", type=_positive_float, default=5.0, help="seconds to wait (default 5)")
    status.set_defaults(run=_status)
    demo = commands.add_parser("demo", help="run a local 3-node cluster and show failover")
    demo.add_argument("--partitions", type=_positive_int, default=3, help="partitions per node (default 3)")
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    demo.add_argument(
        "--time-limit", type=_positive_float, default=60.0, help="give up after this many seconds (default 60)"
    )
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the command line; returns the exit status (argparse exits with 2 on bad arguments)."""
    args = build_parser().parse_args(argv)
    return int(args.run(args, out or sys.stdout, err or sys.stderr))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
