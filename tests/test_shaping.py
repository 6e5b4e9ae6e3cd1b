"""Traffic shaping: limits hold under load (counted at the receiving side), sources rotate."""

from __future__ import annotations

import random
import smtplib
import threading
from collections import Counter
from datetime import datetime

from support.util import mx_zone, send

from relayd.config import Rate, Retry, Source
from relayd.outcomes.decide import retry_delay
from relayd.shaping import Gcra, Rotation


def blast(port: int, count: int, rcpt: str, threads: int = 8) -> None:
    """Submit ``count`` messages over ``threads`` parallel sessions."""

    def worker(n: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            for i in range(n):
                client.sendmail("app@sender.test", [rcpt], f"Subject: {i}\r\n\r\nbody\r\n")

    share = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]
    pool = [threading.Thread(target=worker, args=(n,)) for n in share]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)


def test_connection_limit_never_exceeded_under_load(relay, dns_server, fake_mx):
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10", accept_delay=0.02)
    r = relay(
        {
            "shaping": {
                "default": {"max_connections": 20},
                "domains": {"example.test": {"max_connections": 3}},
            }
        }
    )
    blast(r.port, 300, "x@example.test")
    mx.wait_for_messages(300, timeout=60)
    assert mx.max_concurrent_connections == 3  # reached, never exceeded


def test_domains_sharing_mx_hosts_share_the_limit(relay, dns_server, fake_mx):
    mx_zone(dns_server, "a.test", (10, "mx.shared.test", "127.0.0.10"))
    mx_zone(dns_server, "b.test", (10, "mx.shared.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10", accept_delay=0.02)
    r = relay({"shaping": {"default": {"max_connections": 2}}})
    threads = [
        threading.Thread(target=blast, args=(r.port, 100, rcpt))
        for rcpt in ("x@a.test", "y@b.test")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    mx.wait_for_messages(200, timeout=60)
    assert mx.max_concurrent_connections == 2


def test_a_domains_own_limits_hold_on_hosts_another_domain_reached_first(
    relay, dns_server, fake_mx
):
    """The example config's shape: b.test has a [shaping.domains] table, a.test has not, both
    use the same MX host. a.test's mail arrives first; b.test's limits still hold."""
    mx_zone(dns_server, "a.test", (10, "mx.shared.test", "127.0.0.10"))
    mx_zone(dns_server, "b.test", (10, "mx.shared.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10", accept_delay=0.02)
    limits = {"max_connections": 2, "max_rate": "10/s"}
    r = relay({"shaping": {"default": {"max_connections": 20}, "domains": {"b.test": limits}}})
    send(r.port, ["first@a.test"])
    mx.wait_for_messages(1)  # the shared host's site now exists, made for a.test
    blast(r.port, 20, "x@b.test")
    mx.wait_for_messages(21, timeout=30)
    mx.wait_idle()
    spans = [(c.started, c.ended) for c in mx.connections if any("b.test" in x for x in c.commands)]
    assert max(sum(s <= t < (e or t + 1) for s, e in spans) for t, _ in spans) <= 2
    times = sorted(
        datetime.fromisoformat(e["timestamp"]).timestamp()
        for e in r.wait_event("delivered", n=20, domain="b.test")
    )
    assert times[-1] - times[0] >= 19 / 10 - 0.05


def test_sources_rotate_by_weight_with_their_own_ehlo(relay, dns_server, fake_mx):
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10")
    sources = [
        {"address": "127.0.0.2", "ehlo": "out2.relay.test", "weight": 2},
        {"address": "127.0.0.3", "ehlo": "out3.relay.test", "weight": 1},
    ]
    r = relay(
        {
            "pools": {"warm": {"sources": sources}},
            "shaping": {"default": {"pool": "warm", "max_messages_per_connection": 1}},
        }
    )
    blast(r.port, 30, "x@example.test", threads=1)
    mx.wait_for_messages(30, timeout=30)
    by_ip = Counter((c.peer_ip, c.ehlo) for c in mx.connections)
    assert set(by_ip) == {("127.0.0.2", "out2.relay.test"), ("127.0.0.3", "out3.relay.test")}
    assert by_ip[("127.0.0.2", "out2.relay.test")] == 2 * by_ip[("127.0.0.3", "out3.relay.test")]
    delivered = r.wait_event("delivered", n=30)
    assert {e["source_ip"] for e in delivered} == {"127.0.0.2", "127.0.0.3"}


def test_per_source_connection_limit(relay, dns_server, fake_mx):
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10", accept_delay=0.05)
    sources = [{"address": "127.0.0.2"}, {"address": "127.0.0.3"}]
    r = relay(
        {
            "pools": {"p": {"sources": sources}},
            "shaping": {
                "default": {"pool": "p", "max_connections": 10, "max_connections_per_source": 1}
            },
        }
    )
    blast(r.port, 60, "x@example.test")
    mx.wait_for_messages(60, timeout=60)
    assert mx.max_concurrent_connections == 2


def test_message_rate_limit_holds(relay, dns_server, fake_mx):
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10")
    r = relay({"shaping": {"domains": {"example.test": {"max_rate": "20/s"}}}})
    blast(r.port, 40, "x@example.test")
    mx.wait_for_messages(40, timeout=30)
    # 40 messages at 20/s with no burst: the last goes at least 39 intervals after the first
    times = sorted(
        datetime.fromisoformat(e["timestamp"]).timestamp() for e in r.wait_event("delivered", n=40)
    )
    assert times[-1] - times[0] >= 39 / 20 - 0.05


def test_gcra_spaces_reservations_at_the_rate():
    now = [100.0]
    limiter = Gcra(Rate(10, 1), lambda: now[0])
    waits = [limiter.reserve() for _ in range(5)]
    assert all(abs(w - 0.1 * i) < 1e-9 for i, w in enumerate(waits))
    now[0] += 10  # idle for a long time: no credit is banked beyond one slot
    assert limiter.reserve() == 0.0
    assert abs(limiter.reserve() - 0.1) < 1e-9


def test_rotation_is_smooth_and_skips_unusable_sources():
    a, b = Source("127.0.0.2", "a.test", 3), Source("127.0.0.3", "b.test", 1)
    rot = Rotation((a, b))
    picks = [rot.pick(lambda s: True) for _ in range(8)]
    assert Counter(picks) == {a: 6, b: 2}
    assert picks[:4].count(b) == 1  # interleaved, not a run of a's then b's
    assert {rot.pick(lambda s: s is b) for _ in range(3)} == {b}
    assert rot.pick(lambda s: False) is None


def test_retry_delay_doubles_up_to_the_cap_with_jitter():
    retry = Retry(
        first=300, multiplier=2, max_interval=3600, jitter=0.0, max_age=5 * 86400, delay_warning=0
    )
    rng = random.Random(1)
    assert [retry_delay(n, retry, rng) for n in range(1, 7)] == [300, 600, 1200, 2400, 3600, 3600]
    jittered = Retry(**{**retry.__dict__, "jitter": 0.1})
    delays = [retry_delay(1, jittered, rng) for _ in range(200)]
    assert 270 <= min(delays) < 290 and 310 < max(delays) <= 330
