"""The built-in alerts' cost on the queue process's loop: one evaluation of the eight rules
with a full 24 h ring (2,880 points at the default 30 s) and a scrape's worth of series (60
sites x 3 results, 20 sources, 5 webhook endpoints, 15 latency buckets).

    .venv/bin/python benchmarks/alerts_eval.py
"""

from __future__ import annotations

import time

from relayd.alerts.evaluator import Evaluator, Samples
from relayd.alerts.rules import RULES

INTERVAL = 30.0
RING = 2880
LE = ("0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30", "60", "300", "900", "3600", "14400")


def samples(i: int) -> Samples:
    """A relay sending 100 recipients per interval, 5 % deferred, a few bounces."""
    return {
        "relayd_recipients_delivered_total": [({}, 100.0 * i)],
        "relayd_recipients_deferred_total": [({}, 5.0 * i)],
        "relayd_recipients_bounced_total": [({"class": c}, 1.0 * i) for c in ("user", "spam")],
        "relayd_complaints_total": [({}, 0.01 * i)],
        "relayd_queue_recipients": [({"state": s}, 500.0) for s in ("pending", "deferred")],
        "relayd_source_blacklisted": [({"source": f"192.0.2.{n}"}, 0.0) for n in range(20)],
        "relayd_webhook_backlog_events": [({"endpoint": str(n)}, 10.0) for n in range(5)],
        "relayd_disk_free_bytes": [({}, 1e11)],
        "relayd_disk_min_free_bytes": [({}, 1e8)],
        "relayd_site_attempts_total": [
            ({"site": f"s{n}", "result": r}, 1.0 * i)
            for n in range(60)
            for r in ("delivered", "deferred", "bounced")
        ],
        "relayd_delivery_latency_seconds_bucket": [
            ({"le": le}, 100.0 * i) for le in (*LE, "86400", "+Inf")
        ],
    }


def main() -> None:
    now = [0.0]
    ev = Evaluator(RULES, 300, 0.8, lambda: now[0])
    for i in range(RING):
        now[0] += INTERVAL
        ev.observe(samples(i))
    rounds = 100
    started = time.perf_counter()
    for i in range(RING, RING + rounds):
        now[0] += INTERVAL
        ev.observe(samples(i))
    took = (time.perf_counter() - started) / rounds
    print(f"one evaluation: {took * 1000:.2f} ms, ring {len(ev.history)} points")


if __name__ == "__main__":
    main()
