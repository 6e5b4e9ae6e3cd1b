"""Built-in alerts: each rule fires, holds and resolves with hysteresis on synthetic samples and
a fake clock (relayd.alerts.evaluator); the config refuses bad [alerts] keys by name."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from relayd import config as configuration
from relayd.alerts.evaluator import Change, Evaluator
from relayd.alerts.rules import RULES

STEP = 30.0  # the default interval


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def evaluator(name: str, clock: Clock, **changes: object) -> Evaluator:
    rule = replace(next(r for r in RULES if r.name == name), **changes)
    return Evaluator([rule], resolve_for=300, resolve_ratio=0.8, clock=clock)


class Counters:
    """Counters that grow by a rate per step, and gauges, as a scrape would give them."""

    def __init__(self) -> None:
        self.values: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}

    def add(self, name: str, amount: float, **labels: str) -> None:
        series = self.values.setdefault(name, {})
        key = tuple(sorted(labels.items()))
        series[key] = series.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        self.values.setdefault(name, {})[tuple(sorted(labels.items()))] = value

    def samples(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        return {n: [(dict(k), v) for k, v in s.items()] for n, s in self.values.items()}


def run(ev: Evaluator, clock: Clock, c: Counters, steps: int, each) -> list[Change]:
    changes = []
    for _ in range(steps):
        each(c)
        clock.now += STEP
        changes += ev.observe(c.samples())
    return changes


def traffic(delivered: float, deferred: float = 0, bounced: float = 0, complaints: float = 0):
    def each(c: Counters) -> None:
        c.add("relayd_recipients_delivered_total", delivered)
        c.add("relayd_recipients_deferred_total", deferred)
        c.add("relayd_recipients_bounced_total", bounced, **{"class": "user"})
        c.add("relayd_complaints_total", complaints)

    return each


def states(changes: list[Change]) -> list[str]:
    return [ch.state for ch in changes]


def test_deferral_rate_fires_after_for_holds_and_resolves_after_resolve_for() -> None:
    clock, c = Clock(), Counters()
    ev = evaluator("DeferralRate", clock)
    # 40 % from the second sample on (the first has no window yet), but ``for`` is 5m
    assert run(ev, clock, c, 11, traffic(60, 40)) == []
    changes = run(ev, clock, c, 1, traffic(60, 40))
    assert states(changes) == ["firing"]
    fired = changes[0]
    assert fired.alert == "DeferralRate" and fired.threshold == 0.2
    assert fired.value == pytest.approx(0.4) and "40.0%" in fired.summary
    assert run(ev, clock, c, 40, traffic(60, 40)) == []  # holds: one event, no storm
    # the MX answers 250: the 10m window empties of deferrals; resolve_for later, resolved
    changes = run(ev, clock, c, 40, traffic(100))
    assert states(changes) == ["resolved"]
    assert changes[0].value == pytest.approx(0.0)


def test_no_flapping_around_the_threshold() -> None:
    clock, c = Clock(), Counters()
    ev = evaluator("DeferralRate", clock, window=STEP, for_=0)
    changes = run(ev, clock, c, 2, traffic(70, 30))  # 30 % > 20 %: at once (for 0) once a window
    assert states(changes) == ["firing"]
    # 19 % and 21 % in turn: under the threshold but above threshold * 0.8 = 16 %: still firing
    for _ in range(20):
        assert run(ev, clock, c, 1, traffic(81, 19)) == []
        assert run(ev, clock, c, 1, traffic(79, 21)) == []
    # 15 % (under 16 %), but interrupted before resolve_for (5m = 10 steps): no change
    assert run(ev, clock, c, 8, traffic(85, 15)) == []
    assert run(ev, clock, c, 1, traffic(79, 21)) == []
    assert states(run(ev, clock, c, 11, traffic(85, 15))) == ["resolved"]
    # and once resolved, a dip back over the threshold needs ``for`` again (0 here): fires
    assert states(run(ev, clock, c, 1, traffic(70, 30))) == ["firing"]


def test_too_few_attempts_do_not_fire() -> None:
    clock, c = Clock(), Counters()
    ev = evaluator("DeferralRate", clock, for_=0)
    assert run(ev, clock, c, 30, traffic(0, 0.1)) == []  # all deferred, but 3 per 10m


def test_bounce_and_complaint_rates() -> None:
    clock, c = Clock(), Counters()
    ev = evaluator("BounceRate", clock)
    assert run(ev, clock, c, 20, traffic(95, bounced=5)) == []  # 5 %: not over 5 %
    assert states(run(ev, clock, c, 200, traffic(90, bounced=10))) == ["firing"]
    assert states(run(ev, clock, c, 200, traffic(100))) == ["resolved"]

    clock, c = Clock(), Counters()
    ev = evaluator("ComplaintRate", clock)
    changes = run(ev, clock, c, 40, traffic(1000, complaints=2))  # 0.2 % of 1,000 or more
    assert states(changes) == ["firing"] and changes[0].value == pytest.approx(0.002)


def test_queue_growing() -> None:
    clock, c = Clock(), Counters()
    ev = evaluator("QueueGrowing", clock)

    def grow(by: float):
        def each(c: Counters) -> None:
            c.add("relayd_queue_recipients", by * 0.9, state="deferred")
            c.add("relayd_queue_recipients", by * 0.1, state="pending")

        return each

    assert run(ev, clock, c, 60, grow(100)) == []  # 3,000 per 15 min: under 10,000
    changes = run(ev, clock, c, 60, grow(1000))  # 30,000 per 15 min
    assert states(changes) == ["firing"] and changes[0].value > 10_000
    # flat again: after 15 min the growth is 0, resolve_for later resolved
    assert states(run(ev, clock, c, 60, grow(0))) == ["resolved"]


def test_source_blacklisted_one_alert_per_source() -> None:
    clock, c = Clock(), Counters()
    ev = evaluator("SourceBlacklisted", clock)
    c.set("relayd_source_blacklisted", 0, source="192.0.2.1")
    c.set("relayd_source_blacklisted", 1, source="192.0.2.2")
    changes = run(ev, clock, c, 3, lambda c: None)
    assert [(ch.state, ch.labels) for ch in changes] == [("firing", {"source": "192.0.2.2"})]
    assert "192.0.2.2 is on a DNS blacklist" in changes[0].summary
    c.set("relayd_source_blacklisted", 1, source="192.0.2.1")
    c.set("relayd_source_blacklisted", 0, source="192.0.2.2")
    changes = run(ev, clock, c, 12, lambda c: None)
    assert [(ch.state, ch.labels["source"]) for ch in changes] == [
        ("firing", "192.0.2.1"),
        ("resolved", "192.0.2.2"),
    ]


def test_webhook_backlog_resolves_when_the_endpoint_goes() -> None:
    clock, c = Clock(), Counters()
    ev = evaluator("WebhookBacklog", clock)
    c.set("relayd_webhook_backlog_events", 20_000, endpoint="3")
    assert states(run(ev, clock, c, 21, lambda c: None)) == ["firing"]  # 10m of 20,000
    c.values.pop("relayd_webhook_backlog_events")  # relayctl webhook remove 3
    changes = run(ev, clock, c, 11, lambda c: None)
    assert states(changes) == ["resolved"] and changes[0].labels == {"endpoint": "3"}


def test_disk_nearly_full() -> None:
    clock, c = Clock(), Counters()
    ev = evaluator("DiskNearlyFull", clock)
    c.set("relayd_disk_min_free_bytes", 1000)
    c.set("relayd_disk_free_bytes", 1500)  # under 2 * 1000
    changes = run(ev, clock, c, 11, lambda c: None)
    assert states(changes) == ["firing"] and changes[0].threshold == 2000
    c.set("relayd_disk_free_bytes", 2200)  # over 2,000 but under 2,000 / 0.8: still firing
    assert run(ev, clock, c, 20, lambda c: None) == []
    c.set("relayd_disk_free_bytes", 3000)
    assert states(run(ev, clock, c, 11, lambda c: None)) == ["resolved"]
    c.set("relayd_disk_min_free_bytes", 0)  # no minimum: relayd never refuses, no alert
    c.set("relayd_disk_free_bytes", 1)
    assert run(ev, clock, c, 20, lambda c: None) == []


def test_delivery_latency_p99() -> None:
    clock, c = Clock(), Counters()
    ev = evaluator("DeliveryLatencyP99", clock)
    bounds = ["1", "60", "300", "600", "+Inf"]

    def latencies(slow: float):
        def each(c: Counters) -> None:  # 100 deliveries per step, ``slow`` of them ~8 minutes
            for le in bounds:
                fast = 100 - slow
                count = fast if float(le) < 300 else fast if le == "300" else 100
                c.add("relayd_delivery_latency_seconds_bucket", count, le=le)

        return each

    assert run(ev, clock, c, 40, latencies(0.5)) == []  # p99 in the 1-60 s bucket
    changes = run(ev, clock, c, 40, latencies(5))
    assert states(changes) == ["firing"] and 300 < changes[0].value <= 600
    assert states(run(ev, clock, c, 60, latencies(0))) == ["resolved"]


def test_restored_firing_alert_does_not_fire_again() -> None:
    clock, c = Clock(), Counters()
    ev = evaluator("SourceBlacklisted", clock)
    ev.restore([("SourceBlacklisted", {"source": "192.0.2.2"})])
    c.set("relayd_source_blacklisted", 1, source="192.0.2.2")
    assert run(ev, clock, c, 5, lambda c: None) == []  # firing already: no second event
    c.set("relayd_source_blacklisted", 0, source="192.0.2.2")
    changes = run(ev, clock, c, 11, lambda c: None)
    assert [(ch.state, ch.labels) for ch in changes] == [("resolved", {"source": "192.0.2.2"})]


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('[alerts]\ninterval = "0s"', "alerts.interval", "must be a duration more than 0"),
        ("[alerts]\nresolve_ratio = 0", "alerts.resolve_ratio", "must be in [0.01, 1]"),
        ('[alerts]\nmail_to = "nobody"', "alerts.mail_to", "not an address"),
        (
            "[alerts.rules.DeferralRate]\nthreshold = 2.0",
            "alerts.rules.DeferralRate.threshold",
            "[0, 1]",
        ),
        ('[alerts.rules.Nope]\nfor = "1m"', "alerts.rules.Nope", "no such rule"),
        ('[alerts.rules.BounceRate]\nwindow = "60d"', "alerts.rules.BounceRate.window", "to 30d"),
        (
            "[alerts.rules.DiskNearlyFull]\ncolour = 1",
            "alerts.rules.DiskNearlyFull.colour",
            "unknown key",
        ),
    ],
)
def test_config_refuses_bad_alerts_keys(tmp_path: Path, text: str, key: str, problem: str) -> None:
    conf = tmp_path / "relayd.toml"
    conf.write_text(f'[[listeners]]\naddress = "127.0.0.1:2525"\n{text}\n')
    with pytest.raises(configuration.ConfigError) as info:
        configuration.load(conf)
    assert key in str(info.value) and problem in str(info.value)


def test_config_overrides_a_rule(tmp_path: Path) -> None:
    conf = tmp_path / "relayd.toml"
    conf.write_text(
        '[[listeners]]\naddress = "127.0.0.1:2525"\n[alerts]\nmail_to = "ops@example.com"\n'
        '[alerts.rules.DeferralRate]\nthreshold = 0.5\nwindow = "1m"\nfor = "0s"\nminimum = 5\n'
        "[alerts.rules.BounceRate]\nenabled = false\n"
    )
    alerts = configuration.load(conf).alerts
    rules = {r.name: r for r in alerts.rules}
    assert (rules["DeferralRate"].threshold, rules["DeferralRate"].window) == (0.5, 60)
    assert (rules["DeferralRate"].for_, rules["DeferralRate"].minimum) == (0, 5)
    assert not rules["BounceRate"].enabled and rules["QueueGrowing"].threshold == 10_000
    assert alerts.mail_to == "ops@example.com" and alerts.mail_from == "relayd@localhost"


def test_deferral_alert_reaches_the_webhook_and_the_mailbox_then_resolves(
    relay, dns_server, fake_mx
):
    """A real relayd, a fake MX deferring most mail: the DeferralRate alert arrives at a
    webhook subscribed to "alert" (signed) and as a mail at the MX; relayd restarts and does not
    fire it again; after the MX answers 250 its resolution arrives too, each once."""
    from support.receiver import Receiver
    from support.util import mx_zone, send

    mx_zone(dns_server, "example.test", (10, "mx.example.test", "127.0.0.10"))
    mx_zone(dns_server, "ops.test", (10, "mx.ops.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10", rcpt_reply="451 4.7.1 try later")
    mx.rcpt_replies["ops@ops.test"] = "250 2.1.5 ok"
    rules = {r.name: {"enabled": False} for r in RULES}
    rules["DeferralRate"] = {"window": "3s", "for": "0s", "minimum": 5}
    receiver = Receiver().start()
    try:
        r = relay(
            {
                "webhooks": {"poll_interval": "50ms", "retry_first": "200ms"},
                "alerts": {
                    "interval": "200ms",
                    "resolve_for": "1s",
                    "mail_to": "ops@ops.test",
                    "rules": rules,
                },
            }
        )
        hook = json.loads(
            r.ctl("--json", "webhook", "add", receiver.url, "--events", "alert").stdout
        )
        receiver.secrets.append(hook["secret"])
        for i in range(8):
            send(r.port, [f"u{i}@example.test"])

        def alerts(state: str) -> list[dict]:
            return [e for e in receiver.events() if e["data"]["state"] == state]

        (fired,) = receiver.wait(lambda: alerts("firing"), 20, "the firing alert's webhook")
        assert fired["type"] == "relayd.alert" and receiver.bad == []
        data = fired["data"]
        assert (data["alert"], data["threshold"], data["labels"]) == ("DeferralRate", 0.2, {})
        assert data["value"] > 0.2 and "attempts deferred" in data["summary"]

        def mails(state: str) -> list:
            return [
                m
                for m in mx.messages
                if "ops@ops.test" in m.rcpts and f"[relayd {state}] DeferralRate".encode() in m.data
            ]

        mx.wait_for(lambda: mails("FIRING"), 20, "the firing alert's mail")
        (mail,) = mails("FIRING")
        assert (
            mail.mail_from == "relayd@relay.test" and b"Auto-Submitted: auto-generated" in mail.data
        )

        # a restart while it fires: every message deferred again, no second firing
        r.stop()
        deferred = len(r.events("deferred"))
        r.start()
        r.wait_event("deferred", n=deferred + 8, timeout=20)
        mx.rcpt_reply = "250 2.1.5 ok"  # the site recovers: the retries go through
        (resolved,) = receiver.wait(lambda: alerts("resolved"), 30, "the resolution's webhook")
        assert resolved["data"]["alert"] == "DeferralRate"
        mx.wait_for(lambda: mails("RESOLVED"), 20, "the resolution's mail")
        assert len(alerts("firing")) == 1 and len(mails("FIRING")) == 1  # once each
        assert [e["state"] for e in r.events("alert")] == ["firing", "resolved"]
    finally:
        receiver.stop()


def test_the_example_config_documents_the_rules_at_their_defaults() -> None:
    example = configuration.load(Path(__file__).parent.parent / "conf" / "relayd.toml").alerts
    assert example.rules == RULES
    assert (example.interval, example.resolve_for, example.resolve_ratio) == (30, 300, 0.8)
    assert example.enabled and example.mail_to == ""
