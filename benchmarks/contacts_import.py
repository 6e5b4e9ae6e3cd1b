"""Issue 11, point 1: importing 1,000,000 contacts from CSV takes <= 60 s.

    .venv/bin/python benchmarks/contacts_import.py [--contacts 1000000] [--batch 20000]

Writes a CSV of N contacts (email and five attributes: first_name, country, age, plan, zip)
into a temp dir with a fresh spool (schema.prepare, as relayd makes it), adds a list with
``relayctl list add``, and times ``relayctl contacts import LIST FILE --json`` as a process, from
its start to its exit. Meanwhile a probe stands in for the running daemon's writer: every 10 ms
it takes the spool's write lock (BEGIN IMMEDIATE; COMMIT, as a group commit does) and records
how long it waited. Printed: the import's wall time and rate, relayctl's own figures
(imported, updated, rejected, its longest write transaction) and peak RSS, the probe's p50 /
p99 / max wait, and a check that the spool holds N contacts in the list. With --twice the
same file is imported again, every row an update (attributes merged). Exit 1 when an import
takes over 60 s or a contact is missing. Everything is in the temp dir, removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv" / "bin" / "python")
sys.path.insert(0, str(ROOT))

from relayd.spool import schema  # noqa: E402

COUNTRIES = ("DE", "FR", "NL", "US", "GB", "ES", "IT", "PL", "SE", "AT")
PLANS = ("free", "pro", "team")


def write_csv(path: Path, n: int, start: int = 0) -> None:
    rng = random.Random(11 + start)
    with path.open("w", encoding="utf-8") as out:
        out.write("email,first_name,country,age,plan,zip\n")
        for i in range(start, start + n):
            out.write(
                f"user{i}.{rng.randrange(10**6)}@d{i % 1000}.example,Name{i % 5000},"
                f"{COUNTRIES[i % 10]},{18 + i % 60},{PLANS[i % 3]},{rng.randrange(10**5):05d}\n"
            )


class Probe(threading.Thread):
    """The daemon's writer, as far as the lock goes: a short write transaction every 10 ms."""

    def __init__(self, spool: Path) -> None:
        super().__init__(daemon=True)
        self.spool, self.waits, self.done = spool, [], threading.Event()

    def run(self) -> None:
        conn = sqlite3.connect(self.spool, isolation_level=None, timeout=60)
        while not self.done.wait(0.01):
            began = time.monotonic()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("COMMIT")
            self.waits.append(time.monotonic() - began)
        conn.close()


def ctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "relayd.ctl", "--config", str(config), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contacts", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=0, help="rows per transaction (0: relayctl's)")
    ap.add_argument("--max-seconds", type=float, default=60.0)
    ap.add_argument("--twice", action="store_true", help="then import the file again (updates)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="contacts-bench-") as tmp:
        tmpdir = Path(tmp)
        config = tmpdir / "relayd.toml"
        config.write_text('[server]\nhostname = "bench.test"\nspool_path = "spool.sqlite"\n')
        spool = tmpdir / "spool.sqlite"
        schema.prepare(spool)
        csv_path = tmpdir / "contacts.csv"
        began = time.monotonic()
        write_csv(csv_path, args.contacts)
        made = time.monotonic() - began
        size = csv_path.stat().st_size
        print(f"CSV: {args.contacts:,} rows, {size / 1e6:.1f} MB, written in {made:.1f} s")
        assert ctl(config, "list", "add", "bench").returncode == 0
        extra = ["--batch", str(args.batch)] if args.batch else []
        print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        ok = True
        for run in ("first import", "again (all updates)")[: 2 if args.twice else 1]:
            probe = Probe(spool)
            probe.start()
            began = time.monotonic()
            done = ctl(config, "--json", "contacts", "import", "bench", str(csv_path), *extra)
            wall = time.monotonic() - began
            probe.done.set()
            probe.join()
            if done.returncode != 0:
                print(done.stdout, done.stderr, file=sys.stderr)
                return 1
            result = json.loads(done.stdout)
            waits = sorted(probe.waits) or [0.0]
            p99 = waits[min(len(waits) - 1, int(len(waits) * 0.99))]
            print(
                f"{run}: {wall:.1f} s wall ({args.contacts / wall:,.0f} contacts/s);"
                f" relayctl's own {result['seconds']:.1f} s; imported {result['imported']:,},"
                f" updated {result['updated']:,}, rejected {result['rejected_count']:,};"
                f" longest write transaction {result['longest_transaction_s'] * 1000:.0f} ms"
            )
            print(
                f"  daemon-writer probe: {len(probe.waits)} lock takes, wait p50"
                f" {statistics.median(waits) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms,"
                f" max {waits[-1] * 1000:.0f} ms"
            )
            ok = ok and wall <= args.max_seconds
        conn = sqlite3.connect(spool)
        (members,) = conn.execute("SELECT count(*) FROM list_members").fetchone()
        conn.close()
        print(f"list members in the spool: {members:,}")
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"relayctl's peak RSS: {peak:.0f} MB")
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        ok = ok and members == args.contacts
        print("PASS" if ok else "FAIL", f"(target <= {args.max_seconds:.0f} s)")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
