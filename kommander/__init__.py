"""Kommander: Raft consensus for Twisted applications.

Each node runs many Raft groups (partitions) at once, leading some and following others. See
:class:`kommander.manager.RaftManager` for the API and :mod:`kommander.interfaces` for the seams.
"""

__version__ = "0.1.0.dev0"
