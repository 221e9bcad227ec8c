"""The ``kommander`` console script.

``kommander status URL [--watch]``
    Print a table of one node's view of the cluster (``GET URL/v1/status``), again every
    ``--interval`` seconds with ``--watch``. Exit status 0 healthy, 1 degraded (the node is not
    running, a partition has no leader, or applies trail commits), 2 unreachable.
``kommander certs --out DIR --cluster NAME ID [ID...]``
    Write a CA (``ca.pem``, ``ca.key``) and a certificate per node (``ID.pem``, ``ID.key``) for
    mutual TLS between nodes (:mod:`kommander.entry.certs`).
``kommander members URL``, ``kommander members add URL ID PEER [HTTP] [--wait]``, ``kommander members remove URL ID``
    List, add and remove cluster members (:mod:`kommander.entry.members_cli`, which documents the
    exit statuses).
``kommander demo [--tls]``
    Start a local 3-node cluster of ``twistd kommander`` processes and show writes, a leader
    killed with SIGKILL, failover and catch-up (:mod:`kommander.entry.demo`; ``make demo`` runs it).
    With ``--tls`` the nodes use mutual TLS, with a CA and certificates made for the run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from kommander.entry import members_cli
from kommander.entry.status import StatusError, degraded, fetch_status, format_status, read_token, status_url

__all__ = ["StatusError", "build_parser", "fetch_status", "format_status", "main", "status_url"]


#: Exit statuses of ``kommander status``.
HEALTHY, DEGRADED, UNREACHABLE = 0, 1, 2


def _status(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    rounds = args.count if args.watch else 1
    code = UNREACHABLE
    try:
        token = read_token(args.token_file) if args.token_file else None
    except StatusError as e:
        print(f"kommander status: {e}", file=err)
        return UNREACHABLE
    for round_number in range(rounds):
        if round_number:
            time.sleep(args.interval)
        try:
            status = fetch_status(args.url, args.timeout, token)
        except StatusError as e:
            print(f"kommander status: {e}", file=err)
            code = UNREACHABLE
            continue
        problems = degraded(status)
        if args.watch:
            print(f"--- {time.strftime('%H:%M:%S')}", file=out)
        print(format_status(status), file=out)
        for problem in problems:
            print(f"degraded: {problem}", file=out)
        code = DEGRADED if problems else HEALTHY
    return code


def _demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from kommander.entry.demo import Demo

    return Demo(partitions=args.partitions, keep=args.keep, out=out, time_limit=args.time_limit, tls=args.tls).run()


def _certs(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from kommander.entry.certs import CertificateError, write_certificates

    try:
        written = write_certificates(args.out, args.cluster, args.ids, days=args.days)
    except (CertificateError, OSError) as e:
        print(f"kommander certs: {e}", file=err)
        return 1
    for path in written:
        print(path, file=out)
    return 0


def _positive_int(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r}: use a whole number from 1 to 64")
    return int(text)


def _positive_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: use a whole number of at least 1")
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
    status.add_argument("--watch", action="store_true", help="print the table again every --interval seconds")
    status.add_argument("--interval", type=_positive_float, default=2.0, help="seconds between tables (default 2)")
    status.add_argument(
        "--count", type=_positive_count, default=1_000_000, help="with --watch, stop after this many tables"
    )
    status.add_argument(
        "--token-file", help="file holding the bearer token to send (a node's TOKEN ROLE file works too)"
    )
    status.set_defaults(run=_status)
    certs = commands.add_parser("certs", help="write a CA and one TLS certificate per node")
    certs.add_argument("--out", required=True, help="directory for ca.pem, ca.key and ID.pem/ID.key (reuses a CA there)")
    certs.add_argument("--cluster", required=True, help="the cluster's name, as in --cluster-id")
    certs.add_argument("--days", type=_positive_count, default=825, help="validity of node certificates (default 825)")
    certs.add_argument("ids", nargs="+", metavar="ID", help="node ids, one certificate each")
    certs.set_defaults(run=_certs)
    members = commands.add_parser("members", help="list, add or remove cluster members")
    members_cli.add_arguments(members)
    members.set_defaults(run=members_cli.run)
    demo = commands.add_parser("demo", help="run a local 3-node cluster and show failover")
    demo.add_argument("--partitions", type=_positive_int, default=3, help="partitions per node (default 3)")
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    demo.add_argument(
        "--time-limit", type=_positive_float, default=60.0, help="give up after this many seconds (default 60)"
    )
    demo.add_argument(
        "--tls", action="store_true", help="mutual TLS between the nodes, with a CA and certificates made for the run"
    )
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the command line; returns the exit status (argparse exits with 2 on bad arguments)."""
    args = build_parser().parse_args(argv)
    return int(args.run(args, out or sys.stdout, err or sys.stderr))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
