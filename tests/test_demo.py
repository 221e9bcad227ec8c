"""End-to-end test of kommander.entry.demo: the real 3-node twistd cluster `make demo` runs (loopback only)."""

from __future__ import annotations

import io
import os
import shutil

from kommander.entry.demo import NODE_IDS, Demo, Node, free_ports, twistd_command


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


def test_tls_demo_runs_every_step_over_mutual_tls() -> None:
    """`kommander demo --tls`: certificates made for the run, every node authenticates peers with mutual TLS,
    and the whole story still works."""
    out = io.StringIO()
    demo = Demo(out=out, time_limit=50.0, tls=True, keep=True)
    try:
        code = demo.run()
        report = out.getvalue()
        assert code == 0, report
        assert "peers mutual TLS" in report and "Result: all 8 steps worked" in report
        certs = os.path.join(demo.directory, "certs")
        assert sorted(os.listdir(certs)) == sorted(["ca.key", "ca.pem"] + [f"{n}.{s}" for n in NODE_IDS for s in ("pem", "key")])
        for node in demo.nodes:
            with open(node.log_path, encoding="utf-8", errors="replace") as f:
                assert "peers authenticate with mutual TLS" in f.read(), node.node_id
    finally:
        shutil.rmtree(demo.directory, ignore_errors=True)


def test_plain_demo_says_its_peers_are_insecure_on_purpose() -> None:
    """Without --tls the demo passes --insecure, so nodes log that the unauthenticated traffic is intended."""
    demo = Demo()
    assert demo.security_options(Node("n1", 1, 2, "/nonexistent")) == ["--insecure"]
