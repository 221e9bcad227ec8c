"""End-to-end test of kommander.entry.demo: the real 3-node twistd cluster `make demo` runs (loopback only)."""

from __future__ import annotations

import io
import os

from kommander.entry.demo import Demo, free_ports, twistd_command


def test_free_ports_are_distinct() -> None:
    """free_ports hands out distinct, non-zero ports."""
    ports = free_ports(6)
    assert len(set(ports)) == 6 and all(ports)


def test_twistd_command_uses_this_interpreter() -> None:
    """The twistd used is the one beside this interpreter (or this interpreter itself)."""
    command = twistd_command()
    assert os.path.basename(command[0]).startswith(("twistd", "python"))


def test_demo_runs_every_step_and_cleans_up() -> None:
    """The demo elects leaders, survives a SIGKILLed leader, catches the node up, and stops every process."""
    out = io.StringIO()
    demo = Demo(out=out, time_limit=50.0)
    code = demo.run()
    report = out.getvalue()
    assert code == 0, report
    assert "failover time" in report and "caught up" in report and "Result: all 8 steps worked" in report
    assert all(node.process is not None and node.process.poll() is not None for node in demo.nodes)
    assert not os.path.exists(demo.directory)
