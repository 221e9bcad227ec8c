"""The sans-IO Raft core: one deterministic state machine per partition.

Standard library only. Time is a tick counter, randomness an injected :class:`random.Random`;
the runtime owns clocks, sockets and disks (see :class:`kommander.core.types.Ready`).
"""
