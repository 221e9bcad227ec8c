"""The wrappers: every call goes to the wrapped object unchanged, and is counted on the way."""

from __future__ import annotations

from collections import Counter

from zope.interface import implementer

from kommander.interfaces import ITransport, IWAL


@implementer(IWAL)
class CountingWAL:
    """An IWAL that delegates to ``inner`` and counts ``write`` batches and entries."""

    def __init__(self, inner):
        self.inner = inner
        self.counts = Counter()

    @property
    def durability(self):
        return self.inner.durability

    def open(self, partitions):
        return self.inner.open(partitions)

    def close(self):
        return self.inner.close()

    def load(self, partition):
        return self.inner.load(partition)

    def write(self, batch):
        self.counts["batches"] += 1
        self.counts["entries"] += sum(len(w.entries) for w in batch)
        return self.inner.write(batch)

    def read(self, partition, low, high):
        return self.inner.read(partition, low, high)

    def last_index_and_term(self, partition):
        return self.inner.last_index_and_term(partition)

    def truncate_suffix(self, partition, from_index):
        return self.inner.truncate_suffix(partition, from_index)

    def compact(self, partition, checkpoint):
        return self.inner.compact(partition, checkpoint)


@implementer(ITransport)
class CountingTransport:
    """An ITransport that delegates to ``inner`` and counts the messages sent per peer."""

    def __init__(self, inner):
        self.inner = inner
        self.sent = Counter()

    @property
    def max_frame_bytes(self):
        # Optional (not part of ITransport): the largest message the wrapped transport carries.
        return getattr(self.inner, "max_frame_bytes", None)

    def start(self, receiver):
        return self.inner.start(receiver)

    def stop(self):
        return self.inner.stop()

    def update_peers(self, peers):
        self.inner.update_peers(peers)

    def send(self, peer, messages):
        self.sent[peer] += len(messages)
        self.inner.send(peer, messages)

    def is_connected(self, peer):
        return self.inner.is_connected(peer)
