"""The queue process's Prometheus metrics (the names are the contract in the README's
"Metrics and health").

Three kinds of numbers, each read where it is cheap:

- counters of the event log (both processes' events): the events table is tailed from a cursor
  on a read-only connection, in a thread, at scrape time; the cursor starts at max(id), so
  they begin at 0 with the process as Prometheus expects;
- the scheduler's (connections, attempts, throttle waits, attempt durations) and the sources'
  state (blacklist watch, adaptive shaping's holds, warm-up), read from memory at scrape time
  (relayd.metrics.tally holds what the hot path adds to);
- gauges of the spool (queue by state and age, backlogs, spool size, free disk), read in a
  thread at most once per ``monitoring.refresh`` however often /metrics is scraped.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from relayd.events.records import Type
from relayd.metrics.tally import ATTEMPT_BUCKETS, DEFAULT_SOURCE, OTHER
from relayd.model.message import STREAMS, State
from relayd.shaping.adaptive import SUSPEND, SYSTEM
from relayd.spool import admin, schema

if TYPE_CHECKING:
    from relayd.process.daemon import QueueProcess

VERSION = importlib.metadata.version("relayd")
Samples = dict[str, list[tuple[dict[str, str], float]]]  # sample name -> (labels, value)
QUEUE_STATES = {
    "pending": State.PENDING,
    "deferred": State.DEFERRED,
    "held": State.HELD,
    "active": State.ACTIVE,
}
# accept to delivery (seconds): tens of milliseconds to a nearby MX, hours for mail that waited
# on retries
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
LATENCY_BUCKETS += (4 * 3600, 86400)
COUNTERS = (  # the contract's counters of one event type (besides relayd_events_total)
    ("relayd_recipients_delivered", Type.DELIVERY, "Recipients delivered"),
    ("relayd_recipients_deferred", Type.TRANSIENT_FAILURE, "Recipients deferred, per attempt"),
    ("relayd_recipients_expired", Type.EXPIRATION, "Recipients expired in the queue"),
    ("relayd_recipients_suppressed", Type.SUPPRESSION, "Recipients not mailed: suppressed"),
    ("relayd_complaints", Type.COMPLAINT, "Complaints (feedback-loop reports)"),
)
# each delivered event's bucket of LATENCY_BUCKETS (le: at most the bound), in SQL
_LATENCY_BUCKET = " ".join(
    f"WHEN json_extract(data, '$.delay_s') <= {b} THEN {i}" for i, b in enumerate(LATENCY_BUCKETS)
)


@dataclass
class SpoolGauges:
    """What the last spool read found."""

    read_at: float = float("-inf")  # monotonic
    queue: dict[str, tuple[int, float]] = field(default_factory=dict)  # state -> (count, oldest)
    ages: Counter[str] = field(default_factory=Counter)  # bucket label -> recipients
    events: int = 0
    webhooks: list[tuple[int, int, bool]] = field(default_factory=list)  # id, backlog, failing
    spool_bytes: int = 0
    free_bytes: int = 0


class Metrics:
    """The registry of the queue process; ``render()`` for /metrics, ``samples()`` for the
    built-in alerting (the same numbers)."""

    def __init__(
        self,
        relay: QueueProcess,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.relay, self.clock, self.monotonic = relay, clock, monotonic
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # the event log's counts since start: (type, label) -> events; the label is an
        # accepted message's stream or a bounce's class
        self.counts: Counter[tuple[str, str]] = Counter()
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)  # delivered per bucket, +Inf last
        self.latency_sum = 0.0
        ProcessCollector(namespace="relayd_queue", registry=r)
        ProcessCollector(namespace="relayd_ingress", pid=lambda: relay.ingress_pid, registry=r)
        self.gauges = SpoolGauges()
        self.loop_lag: dict[str, float] = {"queue": 0.0, "ingress": 0.0}
        self._conn: sqlite3.Connection | None = None
        self._cursor: int | None = None
        self._lock = asyncio.Lock()  # one refresh at a time: the connection is not shared
        r.register(_Live(self))

    @property
    def settings(self):  # the config in force: a SIGHUP may change it
        return self.relay.config.monitoring

    async def start(self) -> None:
        """Set the event log's cursor at its end (and read the gauges once): at start-up,
        before the first scrape, so that no event of this process is missed."""
        await self.refresh()

    async def refresh(self) -> None:
        """Catch up with the event log and, when older than ``refresh``, the spool's gauges."""
        async with self._lock:
            stale = self.monotonic() - self.gauges.read_at >= self.settings.refresh
            await asyncio.to_thread(self._read, stale)

    async def render(self) -> bytes:
        """The text exposition for GET /metrics."""
        await self.refresh()
        return generate_latest(self.registry)

    async def samples(self) -> Samples:
        """Every sample as the scrape has it: sample name (``..._total``, ``..._bucket``) ->
        [(labels, value)]; what relayd.alerts evaluates."""
        await self.refresh()
        out: Samples = {}
        for family in self.registry.collect():
            for s in family.samples:
                out.setdefault(s.name, []).append((dict(s.labels), s.value))
        return out

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- in the thread ------------------------------------------------------------------------

    def _read(self, stale: bool) -> None:
        if self._conn is None:
            self._conn = schema.reader(self.relay.config.server.spool_path)
        conn = self._conn
        if self._cursor is None:
            self._cursor = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
        self._tail(conn)
        if stale:
            self._read_gauges(conn)

    def _tail(self, conn: sqlite3.Connection) -> None:
        """Count the events after the cursor, summed up by SQLite (a few rows come back however
        many events there were: 100,000 events take ~0.1 s, mostly outside the GIL)."""
        last = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
        if last <= (self._cursor or 0):
            return
        for kind, label, bucket, n, delay in conn.execute(
            "SELECT type, CASE type"
            " WHEN 'accepted' THEN coalesce(json_extract(data, '$.stream'), 'transactional')"
            " WHEN 'bounced' THEN coalesce(json_extract(data, '$.class'), '') ELSE '' END,"
            f" CASE WHEN type != 'delivered' THEN NULL {_LATENCY_BUCKET}"
            f" ELSE {len(LATENCY_BUCKETS)} END AS bucket,"
            " count(*), sum(json_extract(data, '$.delay_s'))"
            " FROM events WHERE id > ? AND id <= ? GROUP BY 1, 2, 3",
            (self._cursor, last),
        ):
            self.counts[(kind, label)] += n
            if bucket is not None:
                self.latency[bucket] += n
                self.latency_sum += delay or 0.0
        self._cursor = last

    def _read_gauges(self, conn: sqlite3.Connection) -> None:
        g = SpoolGauges(read_at=self.monotonic())
        now = self.clock()
        names = {int(s): name for name, s in QUEUE_STATES.items()}
        with admin.transaction(conn, write=False):  # one snapshot for all of them
            for state, count, first in conn.execute(
                "SELECT r.state, count(*), min(m.received_at) FROM recipients r"
                " JOIN messages m ON m.id = r.msg_id WHERE r.state IN"
                f" ({','.join(map(str, names))}) GROUP BY r.state"
            ):
                g.queue[names[state]] = (count, max(now - first, 0.0))
            for _, bucket, count in admin.shape_counts(
                conn, list(QUEUE_STATES.values()), admin.AGE_EDGES, now
            ):
                g.ages[admin.BUCKETS[bucket]] += count
            g.events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
            g.webhooks = [
                (ep, backlog, bool(failing))
                for ep, backlog, failing in conn.execute(
                    "SELECT w.id, (SELECT count(*) FROM events e WHERE e.id > w.cursor),"
                    " w.failing_since IS NOT NULL OR w.disabled != '' FROM webhooks w"
                )
            ]
        space = self.relay.intake.space
        g.spool_bytes, g.free_bytes = space.spool_bytes(), space.free_bytes()
        self.gauges = g


class _Live(Collector):
    """The numbers read from memory at scrape time (on the event loop, like the scheduler)."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._events()
        yield from self._sites()
        yield from self._sources()
        yield from self._spool()
        info = GaugeMetricFamily("relayd_build_info", "relayd's version", labels=["version"])
        info.add_metric([VERSION], 1)
        yield info
        lag = GaugeMetricFamily(
            "relayd_loop_lag_seconds",
            "How late each process's event loop answered its last tick",
            labels=["loop"],
        )
        for loop, seconds in self.m.loop_lag.items():
            lag.add_metric([loop], seconds)
        yield lag

    def _events(self) -> Iterator[Metric]:
        counts = self.m.counts
        received = CounterMetricFamily(
            "relayd_messages_received", "Messages accepted, per stream", labels=["stream"]
        )
        bounced = CounterMetricFamily(
            "relayd_recipients_bounced", "Recipients bounced, per bounce class", labels=["class"]
        )
        events = CounterMetricFamily("relayd_events", "Events logged, per type", labels=["type"])
        per_type: Counter[str] = Counter()
        streams = {(Type.RECEPTION.value, stream): 0 for stream in STREAMS}  # 0 before the first
        for (kind, label), n in sorted((streams | counts).items()):
            per_type[kind] += n
            if kind == Type.RECEPTION:
                received.add_metric([label], n)
            elif kind == Type.BOUNCE:
                bounced.add_metric([label], n)
        for kind, n in sorted(per_type.items()):
            events.add_metric([kind], n)
        yield from (received, bounced, events)
        for name, kind, doc in COUNTERS:
            yield CounterMetricFamily(name, doc, value=per_type[kind])
        yield _histogram(
            "relayd_delivery_latency_seconds",
            "Accept to delivery, per delivered recipient",
            LATENCY_BUCKETS,
            self.m.latency,
            self.m.latency_sum,
        )

    def _sites(self) -> Iterator[Metric]:
        scheduler = self.m.relay.scheduler
        tally = scheduler.tally
        tally.max_sites = self.m.settings.max_sites
        open_now: Counter[tuple[str, str]] = Counter()
        for site in list(scheduler.sites.values()):
            label = tally.site(site.name)
            for source, n in site.per_source.items():
                open_now[(label, source)] += n
            default = site.connections - sum(site.per_source.values())
            if default:
                open_now[(label, DEFAULT_SOURCE)] += default
        yield _gauge(
            "relayd_site_connections",
            "Delivery connections open (or opening) per site and source",
            ["site", "source"],
            open_now,
        )
        yield _counter(
            "relayd_site_attempts",
            "Delivery attempts per site and result (one per recipient)",
            ["site", "result"],
            tally.attempts,
        )
        yield _counter(
            "relayd_throttle_waits",
            "Deliveries that waited for a rate limit, per site and source",
            ["site", "source"],
            tally.waits,
        )
        yield _histogram(
            "relayd_attempt_duration_seconds",
            "One SMTP transaction's duration",
            ATTEMPT_BUCKETS,
            tally.durations,
            tally.duration_sum,
        )

    def _sources(self) -> Iterator[Metric]:
        relay = self.m.relay
        listed = {ip for ip, _ in relay.reputation.listed or ()}
        suspended: Counter[str] = Counter(
            DEFAULT_SOURCE if h.source_ip == SYSTEM else h.source_ip
            for h in relay.scheduler.held
            if h.action == SUSPEND
        )
        sources = sorted({s.address for pool in relay.config.pools.values() for s in pool})
        black = GaugeMetricFamily(
            "relayd_source_blacklisted",
            "1 while a DNS blacklist lists the source",
            labels=["source"],
        )
        held = GaugeMetricFamily(
            "relayd_source_suspended", "Sites holding the source suspended", labels=["source"]
        )
        for ip in sources:
            black.add_metric([ip], float(ip in listed))
        for ip in sorted(set(sources) | set(suspended)):
            held.add_metric([ip], suspended[ip])
        warmup = relay.scheduler.warmup
        limit = GaugeMetricFamily(
            "relayd_source_warmup_limit",
            "Today's warm-up volume per provider (providers without a list of their own)",
            labels=["source"],
        )
        sent = GaugeMetricFamily(
            "relayd_source_warmup_sent",
            "Today's most sent to one provider in warm-up",
            labels=["source"],
        )
        for ip in sorted(warmup.plans):
            allowed = warmup.allowed(ip, "")
            if allowed is None:  # past its schedule: warm
                continue
            limit.add_metric([ip], allowed)
            most = max((n for (a, _), n in warmup.sent.items() if a == ip), default=0)
            sent.add_metric([ip], most)
        yield from (black, held, limit, sent)

    def _spool(self) -> Iterator[Metric]:
        g = self.m.gauges
        queue = GaugeMetricFamily(
            "relayd_queue_recipients", "Recipients in the queue by state", labels=["state"]
        )
        oldest = GaugeMetricFamily(
            "relayd_queue_oldest_seconds", "Age of the oldest message by state", labels=["state"]
        )
        for state in QUEUE_STATES:
            count, age = g.queue.get(state, (0, 0.0))
            queue.add_metric([state], count)
            oldest.add_metric([state], age)
        ages = GaugeMetricFamily(
            "relayd_queue_recipients_by_age",
            "Unfinished recipients by their message's age (relayctl queue's buckets)",
            labels=["age"],
        )
        for bucket in admin.BUCKETS:
            ages.add_metric([bucket], g.ages[bucket])
        yield from (queue, oldest, ages)
        yield GaugeMetricFamily("relayd_spool_bytes", "Spool file and WAL", value=g.spool_bytes)
        yield GaugeMetricFamily(
            "relayd_disk_free_bytes", "Free bytes under the spool's folder", value=g.free_bytes
        )
        yield GaugeMetricFamily(
            "relayd_disk_min_free_bytes",
            "server.min_free_space: below it new mail is refused",
            value=self.m.relay.config.server.min_free_space,
        )
        yield GaugeMetricFamily("relayd_event_log_events", "Rows in the event log", value=g.events)
        backlog = GaugeMetricFamily(
            "relayd_webhook_backlog_events",
            "Events after the endpoint's cursor",
            labels=["endpoint"],
        )
        failing = GaugeMetricFamily(
            "relayd_webhook_failing",
            "1 while the endpoint fails or is disabled",
            labels=["endpoint"],
        )
        for ep, n, bad in g.webhooks:
            backlog.add_metric([str(ep)], n)
            failing.add_metric([str(ep)], float(bad))
        yield from (backlog, failing)


def _histogram(
    name: str, doc: str, bounds: tuple[float, ...], counts: list[int], total: float
) -> HistogramMetricFamily:
    """A histogram from counts per bucket (the last one +Inf), as Prometheus wants them:
    cumulative."""
    buckets, running = [], 0
    for bound, n in zip((*bounds, float("inf")), counts, strict=True):
        running += n
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
    family = HistogramMetricFamily(name, doc)
    family.add_metric([], buckets, total)
    return family


def _gauge(name: str, doc: str, labels: list[str], values: Counter) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, n in sorted(values.items()):
        family.add_metric(list(key), n)
    return family


def _counter(name: str, doc: str, labels: list[str], values: Counter) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, n in sorted(values.items()):
        family.add_metric(list(key), n)
    return family


__all__ = ["OTHER", "Metrics", "Samples"]
