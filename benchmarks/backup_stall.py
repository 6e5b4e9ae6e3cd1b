"""How long the spool writer stalls while a backup is taken (relayctl backup, [backup]).

Builds a spool of N deferred ~1 KB messages (suite.py's build_spool), then runs relayd's own
Writer (group commit, synchronous=FULL) with a few submitters that commit back to back (each
operation: an event appended and a recipient's attempt recorded, as a delivery result does)
and takes a backup with each method (VACUUM INTO, the online backup API) on a thread while they
run. Reports the longest gap between two commits, and the commit latencies, in the window of
the backup and in an equally long window after it.

    .venv/bin/python benchmarks/backup_stall.py --messages 100000
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import build_spool

from relayd.events.records import Event, Type
from relayd.spool import backup, schema, store
from relayd.spool.writer import Writer

SUBMITTERS = 4


def operation(i: int) -> Callable[[sqlite3.Connection], None]:
    def op(conn: sqlite3.Connection) -> None:
        store.append_events(conn, [Event(Type.TRANSIENT_FAILURE, "Q", time.time(), {"i": i})])
        conn.execute("UPDATE recipients SET attempts = attempts + 1 WHERE id = ?", (i,))

    return op


async def measure(spool: Path, dest: Path, method: str, n: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    writer = Writer(spool, loop)
    commits: list[tuple[float, float]] = []  # (submitted, durable), monotonic
    running = True

    async def submitter(k: int) -> None:
        i = k
        while running:
            submitted = time.monotonic()
            await writer.submit(operation(i % n + 1))
            commits.append((submitted, time.monotonic()))
            i += SUBMITTERS

    tasks = [loop.create_task(submitter(k)) for k in range(SUBMITTERS)]
    await asyncio.sleep(1.0)  # warm
    start = time.monotonic()
    made = await asyncio.to_thread(backup.take, spool, dest, True, method)
    end = time.monotonic()
    took = end - start
    await asyncio.sleep(took + 0.5)  # the baseline: as long a window after it, once settled
    running = False
    await asyncio.gather(*tasks)
    writer.close()
    after = (end + 0.3, end + 0.3 + took)

    def window(lo: float, hi: float) -> tuple[float, float, int, float]:
        done = sorted(d for _, d in commits if lo <= d <= hi + 0.5)
        inside = [d for d in done if d <= hi]
        after = [d for d in done if d > hi][:1]  # the first commit after the window closes it
        points = [lo, *inside, *after]
        gap, at = max((b - a, a - lo) for a, b in itertools.pairwise(points))
        lat = sorted(d - s for s, d in commits if lo <= d <= hi)
        p99 = lat[int(len(lat) * 0.99) - 1] if lat else 0.0
        return gap, p99, len(inside), at

    gap, p99, count, at = window(start, end)
    gap0, p990, count0, _ = window(*after)
    return {
        "seconds": took,
        "bytes": made.bytes,
        "max_gap_ms": gap * 1000,
        "max_gap_at_s": at,
        "p99_commit_ms": p99 * 1000,
        "commits_per_s": count / took,
        "baseline_max_gap_ms": gap0 * 1000,
        "baseline_p99_commit_ms": p990 * 1000,
        "baseline_commits_per_s": count0 / took,
        "median_commit_ms": statistics.median(d - s for s, d in commits) * 1000,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--dir", help="where to build the spool (default: a temp dir)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        spool = Path(tmp) / "spool.sqlite"
        schema.prepare(spool)
        t = time.monotonic()
        build_spool(spool, args.messages, 100)
        size = spool.stat().st_size
        took = time.monotonic() - t
        print(f"spool: {args.messages} messages, {size:,} bytes, built in {took:.1f} s")
        for method in backup.METHODS:
            r = asyncio.run(
                measure(spool, Path(tmp) / f"copy-{method}.sqlite", method, args.messages)
            )
            print(
                f"{method:>7}: {r['seconds']:.2f} s, copy {r['bytes']:,} bytes;"
                f" writer max gap {r['max_gap_ms']:.1f} ms at {r['max_gap_at_s']:.2f} s"
                f" (after: {r['baseline_max_gap_ms']:.1f}),"
                f" p99 commit {r['p99_commit_ms']:.1f} ms"
                f" (after: {r['baseline_p99_commit_ms']:.1f}),"
                f" {r['commits_per_s']:.0f} commits/s"
                f" (after: {r['baseline_commits_per_s']:.0f})"
            )


if __name__ == "__main__":
    main()
