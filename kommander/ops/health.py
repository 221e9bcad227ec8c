"""``GET /v1/health``: is this node serving? For liveness and readiness probes.

Serving means: the node runs (started, not stopped, not fail-stopped), its write-ahead log is
not stalled, and every partition asked about knows its leader. The answer is ``(healthy, document)``; the HTTP layer turns it into 200 or
503 with the reasons, so a probe needs no JSON parsing and a person sees why.
"""

from __future__ import annotations

from typing import Any


def check(manager: Any, partition: int | None = None) -> tuple[bool, dict[str, Any]]:
    """The health of the node run by ``manager``, or of one of its partitions.

    :raises ValueError: ``partition`` is not one of the node's partitions.
    """
    runtimes = list(manager.runtimes)
    if partition is not None:
        runtimes = [r for r in runtimes if r.number == partition]
        if not runtimes:
            raise ValueError(f"no partition {partition}: this node has {len(manager.runtimes)}")
    reasons: list[str] = []
    failed = getattr(manager, "failure_reason", None)
    if failed:
        reasons.append(f"node fail-stopped: {failed}")
    elif not manager.running:
        reasons.append("node not running")
    if getattr(manager, "disk_stalled", False):
        reasons.append("a write-ahead log write is stalled for longer than an election timeout")
    without = [r.number for r in runtimes if r.core.leader is None]
    if without:
        reasons.append("no known leader for partition" + ("s " if len(without) > 1 else " ") + ", ".join(map(str, without)))
    document: dict[str, Any] = {"node_id": manager.node_id, "healthy": not reasons, "reasons": reasons}
    if partition is not None:
        document["partition"] = partition
    return not reasons, document
