"""A replicated ledger: account balances, one map per partition, changed only through the Raft log."""

from __future__ import annotations

import json

from zope.interface import implementer

from kommander.interfaces import ISnapshotStateMachine


@implementer(ISnapshotStateMachine)
class Ledger:
    """Applies ``deposit`` and ``withdraw`` entries; a withdrawal beyond the balance is refused.

    Every node applies the same entries in the same order, so every decision here must depend
    only on the entry and the state: no clocks, no randomness, no I/O.
    """

    def __init__(self) -> None:
        self.balances: dict[int, dict[str, int]] = {}
        self.restores = 0

    def balance(self, partition: int, account: str) -> int:
        return self.balances.get(partition, {}).get(account, 0)

    def apply(self, partition, entry):
        op = json.loads(entry.data)
        accounts = self.balances.setdefault(partition, {})
        have = accounts.get(op["account"], 0)
        if entry.log_type == "deposit":
            accounts[op["account"]] = have + op["amount"]
        elif entry.log_type == "withdraw":
            if op["amount"] > have:
                return False  # a result, the same on every node: the entry is applied, nothing changes
            accounts[op["account"]] = have - op["amount"]
        else:
            raise ValueError(f"unknown entry type {entry.log_type!r}")  # a bug: fail-stop the node
        return accounts[op["account"]]

    def checkpoint(self, partition, index):
        return None  # nothing to flush: snapshot() below captures the state

    def snapshot(self, partition):
        # A copy now: the chunks may be consumed while later entries are applied.
        yield json.dumps(self.balances.get(partition, {}), sort_keys=True).encode()

    def restore(self, partition, chunks):
        self.balances[partition] = json.loads(b"".join(chunks) or b"{}")
        self.restores += 1
