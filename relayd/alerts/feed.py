"""The samples the rules need, read from the spool: the metrics contract's names and labels
(counters from the event log, which both processes write; the queue by state; disk; the
blacklisted sources; webhook backlogs; the latency histogram), so that the evaluator sees what
a Prometheus scrape of GET /metrics would show. It stands in until the `metrics` branch's
registry is merged: its samples function then feeds the evaluator instead, unchanged.

Counters start at 0 with relayd (as a process's counters do): they count the events after
the last one at start, read incrementally by id on each call."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from relayd.alerts.evaluator import Samples
from relayd.events.records import Type
from relayd.model.message import State
from relayd.spool import schema

# relayd_delivery_latency_seconds's buckets (accept to delivery)
LATENCY_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400, float("inf"))
_COUNTED = {
    Type.DELIVERY: "relayd_recipients_delivered_total",
    Type.TRANSIENT_FAILURE: "relayd_recipients_deferred_total",
    Type.COMPLAINT: "relayd_complaints_total",
}
_STATES = {State.PENDING: "pending", State.DEFERRED: "deferred", State.HELD: "held"}
_STATES[State.ACTIVE] = "active"


class SpoolSamples:
    def __init__(self, spool: Path, min_free_space: Callable[[], int]) -> None:
        self.spool, self.min_free_space = spool, min_free_space  # of the config in force
        self.cursor: int | None = None  # the last event counted
        self.counts: Counter[tuple[str, str]] = Counter()  # (name, label value) -> count
        self.latency = [0] * len(LATENCY_BUCKETS)

    async def __call__(self) -> Samples:
        return await asyncio.to_thread(self.read)

    def read(self) -> Samples:
        conn = schema.reader(self.spool)
        try:
            last = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
            if self.cursor is None:
                self.cursor = last
            self._count(conn, last)
            queue = dict(
                conn.execute(
                    "SELECT state, count(*) FROM recipients WHERE state IN (0, 1, 4, 5)"
                    " GROUP BY state"
                ).fetchall()
            )
            listed = conn.execute(
                "SELECT DISTINCT ip FROM listings WHERE delisted_at IS NULL"
            ).fetchall()
            hooks = conn.execute("SELECT id, cursor FROM webhooks WHERE disabled = ''").fetchall()
        finally:
            conn.close()
        st = os.statvfs(self.spool.parent)
        samples: dict[str, list[tuple[dict[str, str], float]]] = {
            name: [] for name in (*_COUNTED.values(), "relayd_recipients_bounced_total")
        }
        for (name, label), count in self.counts.items():
            samples[name].append(({"class": label} if label else {}, count))
        samples["relayd_queue_recipients"] = [
            ({"state": label}, queue.get(state, 0)) for state, label in _STATES.items()
        ]
        samples["relayd_source_blacklisted"] = [({"source": ip}, 1) for (ip,) in listed]
        samples["relayd_webhook_backlog_events"] = [
            ({"endpoint": str(hook)}, max(last - cursor, 0)) for hook, cursor in hooks
        ]
        samples["relayd_disk_free_bytes"] = [({}, st.f_bavail * st.f_frsize)]
        samples["relayd_disk_min_free_bytes"] = [({}, self.min_free_space())]
        samples["relayd_delivery_latency_seconds_bucket"] = [
            ({"le": "+Inf" if le == float("inf") else f"{le:g}"}, n)
            for le, n in zip(LATENCY_BUCKETS, self.latency, strict=True)
        ]
        return samples

    def _count(self, conn: sqlite3.Connection, last: int) -> None:
        """The events since the last call, aggregated by SQLite (in C, without the GIL: the
        queue process's loop goes on meanwhile)."""
        span = "FROM events WHERE id > ? AND id <= ?"
        rows = conn.execute(
            "SELECT type, json_extract(data, '$.class'), count(*)"
            f" {span} AND type IN (?, ?, ?, ?) GROUP BY 1, 2",
            (self.cursor, last, *_COUNTED, Type.BOUNCE),
        )
        for kind, bounce_class, n in rows:
            if kind == Type.BOUNCE:
                self.counts[("relayd_recipients_bounced_total", bounce_class or "")] += n
            else:
                self.counts[(_COUNTED[kind], "")] += n
        sums = ", ".join(f"coalesce(sum(d <= {le:g}), 0)" for le in LATENCY_BUCKETS[:-1])
        row = conn.execute(
            f"SELECT {sums}, count(d) FROM (SELECT json_extract(data, '$.delay_s') AS d"
            f" {span} AND type = ?)",
            (self.cursor, last, Type.DELIVERY),
        ).fetchone()
        self.latency = [have + new for have, new in zip(self.latency, row, strict=True)]
        self.cursor = last
