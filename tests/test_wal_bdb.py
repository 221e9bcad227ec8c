"""BerkeleyDBWAL: the IWAL conformance suite, plus durability modes, the writer thread and log files."""

import pytest
from twisted.internet import reactor

from kommander.plugins.bdb import BerkeleyDBWAL
from kommander.testing.wal_conformance import WALConformanceTests


class TestBerkeleyDBWALConformance(WALConformanceTests):
    def make_wal(self, tmp_path):
        return BerkeleyDBWAL(str(tmp_path / "wal"), reactor)

    def reopen(self, wal, tmp_path):
        return BerkeleyDBWAL(str(tmp_path / "wal"), reactor)
