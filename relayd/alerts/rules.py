"""The alert rules as data: the conditions and default thresholds of the shipped Prometheus
rules (conf/prometheus/alerts.yml), over the same metric names (the metrics contract).

Pure data, imported by the config loader: [alerts.rules.NAME] overrides a rule's threshold,
window, ``for`` and enabled."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    """How a rule's value is computed from the samples (relayd.alerts.evaluator)."""

    GROWTH = "growth"  # the sum of ``metrics`` now minus its sum ``window`` ago
    RATIO = "ratio"  # increase of ``metrics`` / increase of ``per``, over window
    GAUGE = "gauge"  # each series of ``metrics[0]``, one alert per value of label ``by``
    FLOOR = "floor"  # metrics[0] below threshold * metrics[1] (a limit the host configures)
    QUANTILE = "quantile"  # the 0.99 quantile of histogram metrics[0]'s increase over window


@dataclass(frozen=True)
class Rule:
    name: str
    kind: Kind
    threshold: float
    window: float  # seconds; 0 for gauges
    for_: float  # the condition holds this long before the alert fires
    metrics: tuple[str, ...]
    per: tuple[str, ...] = ()  # RATIO: the denominator's counters
    minimum: float = 0  # RATIO: the least denominator (attempts) for the rule to apply
    by: str = ""  # GAUGE: the label that makes one alert per series
    summary: str = ""  # str.format with value, threshold and the labels
    enabled: bool = True


_M = 60.0
_H = 3600.0
DELIVERED = "relayd_recipients_delivered_total"
DEFERRED = "relayd_recipients_deferred_total"
BOUNCED = "relayd_recipients_bounced_total"

RULES: tuple[Rule, ...] = (
    Rule(
        "QueueGrowing",
        Kind.GROWTH,
        10_000,
        15 * _M,
        5 * _M,
        ("relayd_queue_recipients",),
        summary="the queue grew by {value:.0f} recipients in {window}",
    ),
    Rule(
        "DeferralRate",
        Kind.RATIO,
        0.20,
        10 * _M,
        5 * _M,
        (DEFERRED,),
        (DELIVERED, DEFERRED, BOUNCED),
        minimum=100,
        summary="{value:.1%} of the attempts deferred ({window})",
    ),
    Rule(
        "BounceRate",
        Kind.RATIO,
        0.05,
        _H,
        10 * _M,
        (BOUNCED,),
        (DELIVERED, BOUNCED),
        minimum=100,
        summary="{value:.1%} of the recipients finished bounced ({window})",
    ),
    Rule(
        "ComplaintRate",
        Kind.RATIO,
        0.001,
        24 * _H,
        15 * _M,
        ("relayd_complaints_total",),
        (DELIVERED,),
        minimum=1000,
        summary="complaints are {value:.2%} of the mail delivered ({window})",
    ),
    Rule(
        "SourceBlacklisted",
        Kind.GAUGE,
        0,
        0,
        0,
        ("relayd_source_blacklisted",),
        by="source",
        summary="source address {source} is on a DNS blacklist",
    ),
    Rule(
        "WebhookBacklog",
        Kind.GAUGE,
        10_000,
        0,
        10 * _M,
        ("relayd_webhook_backlog_events",),
        by="endpoint",
        summary="webhook endpoint {endpoint} is {value:.0f} events behind",
    ),
    Rule(
        "DiskNearlyFull",
        Kind.FLOOR,
        2,
        0,
        5 * _M,
        ("relayd_disk_free_bytes", "relayd_disk_min_free_bytes"),
        summary="{value:.0f} bytes free on the spool's disk (alert under {threshold:.0f})",
    ),
    Rule(
        "DeliveryLatencyP99",
        Kind.QUANTILE,
        300,
        10 * _M,
        10 * _M,
        ("relayd_delivery_latency_seconds",),
        summary="the p99 accept-to-delivery latency is {value:.0f}s ({window})",
    ),
)
