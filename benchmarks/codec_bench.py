"""Cost of the wire codec: encoding plus decoding an AppendEntries of N entries, per entry.

    .venv/bin/python benchmarks/codec_bench.py [--entries 1000] [--size 100] [--rounds 20]

Prints the best and median round over ``--rounds`` runs (the best is the figure with the least
noise from other processes); one line ``codec_us_per_entry=X`` comes last.
"""

from __future__ import annotations

import argparse
import statistics
import time

from kommander.core.types import AppendEntries, Entry, EntryKind
from kommander.wire.codec import decode_message, encode_message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--size", type=int, default=100, help="bytes of data per entry")
    parser.add_argument("--rounds", type=int, default=20)
    options = parser.parse_args()
    batch = tuple(
        Entry(i, 5, EntryKind.NORMAL, "kv.put", bytes(options.size), i << 16) for i in range(1, options.entries + 1)
    )
    message = AppendEntries(5, "node-a", "node-b", 0, 0, batch, options.entries)
    rounds = []
    for _ in range(options.rounds):
        start = time.perf_counter()
        frame = encode_message(0, message)
        decode_message(frame, 1)
        rounds.append((time.perf_counter() - start) / options.entries * 1e6)
    print(f"{options.entries} entries of {options.size} bytes, frame {len(frame)} bytes")
    print(f"encode+decode per entry: best {min(rounds):.2f} us, median {statistics.median(rounds):.2f} us")
    print(f"codec_us_per_entry={min(rounds):.2f}")


if __name__ == "__main__":
    main()
