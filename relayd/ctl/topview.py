"""What ``relayctl top`` shows, computed from successive scrapes of relayd's /metrics.

Pure functions over parsed scrapes (no sockets, no clock, no terminal), so that the rates and
the latency percentiles can be tested on two synthetic scrapes. Rates are increases between
scrapes divided by the time between them, with Prometheus's counter semantics (a counter lower
than before has restarted from zero: a restarted relayd); latency percentiles are
``histogram_quantile`` over the buckets' increase in the window (the last minute).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

WINDOW_S = 60.0  # latency percentiles and per-site figures: over the last minute
QUANTILES = (0.5, 0.9, 0.99)
QUEUE_STATES = ("pending", "active", "deferred", "held")
PROCESSES = ("queue", "ingress")

Labels = tuple[tuple[str, str], ...]
Series = dict[Labels, float]


@dataclass(frozen=True)
class Scrape:
    """One scrape: every sample by name and label set, and when it was taken (monotonic s)."""

    at: float
    samples: dict[str, Series]

    def series(self, name: str) -> Series:
        return self.samples.get(name, {})

    def value(self, name: str) -> float | None:
        """The sum over a metric's series; None when relayd does not export it."""
        series = self.samples.get(name)
        return None if series is None else sum(series.values())

    def by(self, name: str, label: str) -> dict[str, float]:
        """A metric summed per value of one label."""
        return _by(self.series(name), label)


def parse(text: str, at: float) -> Scrape:
    """Parse Prometheus text exposition (raises ValueError on text that is not)."""
    samples: dict[str, Series] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return Scrape(at, samples)


def increase(old: Scrape, new: Scrape, name: str) -> Series:
    """Each series' increase from ``old`` to ``new``: a series lower than before restarted at
    zero (its whole value is the increase), one absent before was zero then."""
    before = old.series(name)
    out = {}
    for labels, value in new.series(name).items():
        prior = before.get(labels, 0.0)
        out[labels] = value - prior if value >= prior else value
    return out


def rate(old: Scrape, new: Scrape, name: str) -> float:
    """Per-second increase of a counter, summed over its series."""
    return sum(increase(old, new, name).values()) / _elapsed(old, new)


def quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus's histogram_quantile: ``buckets`` are (upper bound, cumulative count) in
    ascending order ending with +Inf; linear interpolation inside the bucket holding the rank;
    a rank in the +Inf bucket gives the highest finite bound. None when nothing was counted."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for i, (bound, count) in enumerate(buckets):
        if count >= rank:
            if math.isinf(bound):
                return buckets[i - 1][0] if i > 0 else None
            if i == 0 and bound <= 0:
                return bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return None


def bucket_increase(old: Scrape, new: Scrape, name: str) -> list[tuple[float, float]]:
    """A histogram's cumulative buckets, summed over its other labels, as increases."""
    per_le = _by(increase(old, new, f"{name}_bucket"), "le")
    return sorted((float(le), count) for le, count in per_le.items())


def snapshot(history: Sequence[Scrape], window_s: float = WINDOW_S) -> dict[str, Any]:
    """The view's figures from the scrapes kept, oldest first: rates over the last interval,
    latency percentiles and per-site figures over the scrapes within ``window_s`` of the last.
    With one scrape there are no rates yet (None)."""
    last = history[-1]
    prev = history[-2] if len(history) > 1 else None
    first = next((s for s in history if s.at >= last.at - window_s), last)
    if first is last and prev is not None:
        first = prev
    return {
        "version": next(iter(last.by("relayd_build_info", "version")), None),
        "interval_s": None if prev is None else round(_elapsed(prev, last), 3),
        "rates": _rates(prev, last),
        "latency": _latency(first, last),
        "sites": _sites(first, last),
        "sources": _sources(last),
        "queue": {
            state: {
                "recipients": _int(last.by("relayd_queue_recipients", "state").get(state)),
                "oldest_s": last.by("relayd_queue_oldest_seconds", "state").get(state),
            }
            for state in QUEUE_STATES
        },
        "backlog": {
            "event_log": _int(last.value("relayd_event_log_events")),
            "webhooks": [
                {
                    "endpoint": endpoint,
                    "events": _int(events),
                    "failing": bool(last.by("relayd_webhook_failing", "endpoint").get(endpoint, 0)),
                }
                for endpoint, events in sorted(
                    last.by("relayd_webhook_backlog_events", "endpoint").items()
                )
            ],
        },
        "spool": {
            "bytes": _int(last.value("relayd_spool_bytes")),
            "disk_free_bytes": _int(last.value("relayd_disk_free_bytes")),
            "disk_min_free_bytes": _int(last.value("relayd_disk_min_free_bytes")),
        },
        "processes": {p: _process(prev, last, f"relayd_{p}_process") for p in PROCESSES},
        "loop_lag_s": last.by("relayd_loop_lag_seconds", "loop"),
    }


RATES = {
    "received": "relayd_messages_received_total",
    "delivered": "relayd_recipients_delivered_total",
    "deferred": "relayd_recipients_deferred_total",
    "bounced": "relayd_recipients_bounced_total",
    "expired": "relayd_recipients_expired_total",
    "suppressed": "relayd_recipients_suppressed_total",
    "complaints": "relayd_complaints_total",
}


def _rates(prev: Scrape | None, last: Scrape) -> dict[str, float | None]:
    """Per second over the last interval: messages received, recipients delivered, ..."""
    return {k: None if prev is None else rate(prev, last, m) for k, m in RATES.items()}


def _latency(first: Scrape, last: Scrape) -> dict[str, Any]:
    buckets = (
        bucket_increase(first, last, "relayd_delivery_latency_seconds") if first is not last else []
    )
    out: dict[str, Any] = {
        "window_s": round(last.at - first.at, 3),
        "count": _int(buckets[-1][1]) if buckets else 0,
    }
    for q in QUANTILES:
        out[f"p{round(q * 100)}"] = quantile(q, buckets)
    return out


def _sites(first: Scrape, last: Scrape) -> list[dict[str, Any]]:
    """Per destination site over the window, busiest (most attempts, then connections) first."""
    conns = last.by("relayd_site_connections", "site")
    waits: dict[str, float] = {}
    attempts: dict[str, dict[str, float]] = {}
    if first is not last:
        waits = _by(increase(first, last, "relayd_throttle_waits_total"), "site")
        for labels, n in increase(first, last, "relayd_site_attempts_total").items():
            key = dict(labels)
            per = attempts.setdefault(key.get("site", ""), {})
            per[key.get("result", "")] = per.get(key.get("result", ""), 0.0) + n
    seconds = max(last.at - first.at, 1e-9)
    rows = []
    for site in set(conns) | set(attempts) | set(waits):
        results = attempts.get(site, {})
        total = sum(results.values())
        rows.append(
            {
                "site": site,
                "connections": _int(conns.get(site, 0)),
                "attempts": _int(total),
                "attempts_per_s": total / seconds,
                "delivered_per_s": results.get("delivered", 0.0) / seconds,
                "deferred_pct": 100 * results.get("deferred", 0.0) / total if total else None,
                "bounced_pct": 100 * results.get("bounced", 0.0) / total if total else None,
                "throttle_waits_per_s": waits.get(site, 0.0) / seconds,
            }
        )
    rows.sort(key=lambda r: (-r["attempts"], -r["connections"], r["site"]))
    return rows


def _sources(last: Scrape) -> list[dict[str, Any]]:
    """Every source address relayd reports on, troubled ones (blacklisted, suspended) first."""
    blacklisted = last.by("relayd_source_blacklisted", "source")
    suspended = last.by("relayd_source_suspended", "source")
    limit = last.by("relayd_source_warmup_limit", "source")
    sent = last.by("relayd_source_warmup_sent", "source")
    conns = last.by("relayd_site_connections", "source")
    rows = [
        {
            "source": source,
            "blacklisted": bool(blacklisted.get(source, 0)),
            "suspended_sites": _int(suspended.get(source, 0)),
            "warmup_sent": _int(sent[source]) if source in sent else None,
            "warmup_limit": _int(limit[source]) if source in limit else None,
            "connections": _int(conns.get(source, 0)),
        }
        for source in set(blacklisted) | set(suspended) | set(limit) | set(sent) | set(conns)
    ]
    rows.sort(key=lambda r: (not r["blacklisted"], -r["suspended_sites"], r["source"]))
    return rows


def _process(prev: Scrape | None, last: Scrape, prefix: str) -> dict[str, Any]:
    cpu = None
    if prev is not None and last.value(f"{prefix}_cpu_seconds_total") is not None:
        cpu = 100 * rate(prev, last, f"{prefix}_cpu_seconds_total")
    return {
        "cpu_pct": cpu,
        "rss_bytes": _int(last.value(f"{prefix}_resident_memory_bytes")),
        "open_fds": _int(last.value(f"{prefix}_open_fds")),
    }


def _by(series: Series, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, value in series.items():
        key = dict(labels).get(label, "")
        out[key] = out.get(key, 0.0) + value
    return out


def _elapsed(old: Scrape, new: Scrape) -> float:
    return max(new.at - old.at, 1e-9)


def _int(value: float | None) -> int | None:
    return None if value is None else round(value)
