"""relayctl top: its figures from two synthetic scrapes, its frame in 80x24, and the live view
of a real relayd in tmux (send-keys, capture-pane)."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator

import pytest
from rich.console import Console
from support.util import free_port, mx_zone, steady_load, wait_until

from relayd.ctl import top, topview

BEFORE = """\
# TYPE relayd_build_info gauge
relayd_build_info{version="0.1.0"} 1
# TYPE relayd_messages_received_total counter
relayd_messages_received_total{stream="transactional"} 100
relayd_messages_received_total{stream="bulk"} 50
# TYPE relayd_recipients_delivered_total counter
relayd_recipients_delivered_total 500
# TYPE relayd_recipients_deferred_total counter
relayd_recipients_deferred_total 40
# TYPE relayd_recipients_bounced_total counter
relayd_recipients_bounced_total{class="bad-mailbox"} 7
# TYPE relayd_delivery_latency_seconds histogram
relayd_delivery_latency_seconds_bucket{le="0.1"} 100
relayd_delivery_latency_seconds_bucket{le="1.0"} 400
relayd_delivery_latency_seconds_bucket{le="10.0"} 500
relayd_delivery_latency_seconds_bucket{le="+Inf"} 500
relayd_delivery_latency_seconds_count 500
relayd_delivery_latency_seconds_sum 300
# TYPE relayd_site_attempts_total counter
relayd_site_attempts_total{site="gmail",result="delivered"} 300
relayd_site_attempts_total{site="gmail",result="deferred"} 10
# TYPE relayd_site_connections gauge
relayd_site_connections{site="gmail",source="192.0.2.1"} 2
# TYPE relayd_queue_process_cpu_seconds_total counter
relayd_queue_process_cpu_seconds_total 20
"""

AFTER = """\
# TYPE relayd_build_info gauge
relayd_build_info{version="0.1.0"} 1
# TYPE relayd_messages_received_total counter
relayd_messages_received_total{stream="transactional"} 130
relayd_messages_received_total{stream="bulk"} 70
# TYPE relayd_recipients_delivered_total counter
relayd_recipients_delivered_total 600
# TYPE relayd_recipients_deferred_total counter
relayd_recipients_deferred_total 5
# TYPE relayd_recipients_bounced_total counter
relayd_recipients_bounced_total{class="bad-mailbox"} 8
relayd_recipients_bounced_total{class="policy"} 1
# TYPE relayd_delivery_latency_seconds histogram
relayd_delivery_latency_seconds_bucket{le="0.1"} 110
relayd_delivery_latency_seconds_bucket{le="1.0"} 480
relayd_delivery_latency_seconds_bucket{le="10.0"} 600
relayd_delivery_latency_seconds_bucket{le="+Inf"} 600
relayd_delivery_latency_seconds_count 600
relayd_delivery_latency_seconds_sum 400
# TYPE relayd_site_attempts_total counter
relayd_site_attempts_total{site="gmail",result="delivered"} 390
relayd_site_attempts_total{site="gmail",result="deferred"} 20
relayd_site_attempts_total{site="mx.example.net",result="delivered"} 10
# TYPE relayd_site_connections gauge
relayd_site_connections{site="gmail",source="192.0.2.1"} 3
relayd_site_connections{site="gmail",source="192.0.2.2"} 1
# TYPE relayd_throttle_waits_total counter
relayd_throttle_waits_total{site="gmail",source="192.0.2.1"} 5
# TYPE relayd_source_blacklisted gauge
relayd_source_blacklisted{source="192.0.2.1"} 0
relayd_source_blacklisted{source="192.0.2.2"} 1
# TYPE relayd_source_suspended gauge
relayd_source_suspended{source="192.0.2.1"} 2
relayd_source_suspended{source="192.0.2.2"} 0
# TYPE relayd_source_warmup_limit gauge
relayd_source_warmup_limit{source="192.0.2.1"} 1000
# TYPE relayd_source_warmup_sent gauge
relayd_source_warmup_sent{source="192.0.2.1"} 250
# TYPE relayd_queue_recipients gauge
relayd_queue_recipients{state="pending"} 12
relayd_queue_recipients{state="deferred"} 40
relayd_queue_recipients{state="held"} 0
relayd_queue_recipients{state="active"} 4
# TYPE relayd_queue_oldest_seconds gauge
relayd_queue_oldest_seconds{state="deferred"} 7380
# TYPE relayd_webhook_backlog_events gauge
relayd_webhook_backlog_events{endpoint="1"} 30
relayd_webhook_backlog_events{endpoint="2"} 0
# TYPE relayd_webhook_failing gauge
relayd_webhook_failing{endpoint="1"} 1
# TYPE relayd_event_log_events gauge
relayd_event_log_events 12345
# TYPE relayd_spool_bytes gauge
relayd_spool_bytes 5e6
# TYPE relayd_queue_process_cpu_seconds_total counter
relayd_queue_process_cpu_seconds_total 25
# TYPE relayd_queue_process_resident_memory_bytes gauge
relayd_queue_process_resident_memory_bytes 1.2e8
"""


def test_rates_percentiles_sites_and_sources_from_two_scrapes() -> None:
    snap = topview.snapshot([topview.parse(BEFORE, 100.0), topview.parse(AFTER, 110.0)])
    assert snap["version"] == "0.1.0" and snap["interval_s"] == 10
    rates = snap["rates"]
    assert rates["received"] == pytest.approx(5.0)  # (30 + 20) / 10 s, both streams
    assert rates["delivered"] == pytest.approx(10.0)
    assert rates["deferred"] == pytest.approx(0.5)  # 40 -> 5: restarted, 5 since
    assert rates["bounced"] == pytest.approx(0.2)  # +1 bad-mailbox, +1 policy (new series)
    assert rates["expired"] == 0
    # the cumulative buckets' increases: 10 / 80 / 100 / 100 (+Inf); p50's rank 50 falls in
    # (0.1, 1] holding 70 of them: 0.1 + 0.9 * (50 - 10) / 70
    lat = snap["latency"]
    assert lat["window_s"] == 10 and lat["count"] == 100
    assert lat["p50"] == pytest.approx(0.1 + 0.9 * 40 / 70)
    assert lat["p90"] == pytest.approx(1 + 9 * 10 / 20)
    assert lat["p99"] == pytest.approx(1 + 9 * 19 / 20)
    gmail, other = snap["sites"]
    assert gmail["site"] == "gmail" and gmail["connections"] == 4 and gmail["attempts"] == 100
    assert gmail["deferred_pct"] == pytest.approx(10.0)  # 10 of 100 attempts
    assert gmail["delivered_per_s"] == pytest.approx(9.0)
    assert gmail["throttle_waits_per_s"] == pytest.approx(0.5)
    assert other == other | {"site": "mx.example.net", "attempts": 10, "deferred_pct": 0}
    bad, warming = snap["sources"]  # blacklisted first
    assert bad == {
        "source": "192.0.2.2",
        "blacklisted": True,
        "suspended_sites": 0,
        "warmup_sent": None,
        "warmup_limit": None,
        "connections": 1,
    }
    assert warming["suspended_sites"] == 2 and warming["warmup_sent"] == 250
    assert warming["warmup_limit"] == 1000 and warming["connections"] == 3
    assert snap["queue"]["deferred"] == {"recipients": 40, "oldest_s": 7380}
    assert snap["queue"]["pending"] == {"recipients": 12, "oldest_s": None}
    assert snap["backlog"] == {
        "event_log": 12345,
        "webhooks": [
            {"endpoint": "1", "events": 30, "failing": True},
            {"endpoint": "2", "events": 0, "failing": False},
        ],
    }
    assert snap["processes"]["queue"] == {"cpu_pct": 50, "rss_bytes": 120_000_000, "open_fds": None}
    assert snap["processes"]["ingress"]["cpu_pct"] is None  # not exported: shown as "-"
    first = topview.snapshot([topview.parse(BEFORE, 100.0)])  # one scrape: no rates yet
    assert first["rates"]["delivered"] is None and first["latency"]["p99"] is None


def test_quantile_follows_histogram_quantile() -> None:
    buckets = [(0.5, 0.0), (1.0, 10.0), (float("inf"), 20.0)]
    assert topview.quantile(0.25, buckets) == pytest.approx(0.75)
    assert topview.quantile(0.99, buckets) == 1.0  # in +Inf: the highest finite bound
    assert topview.quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None
    assert topview.quantile(0.5, []) is None


def test_frame_fits_80x24_with_many_sites() -> None:
    text = AFTER + "".join(
        f'relayd_site_connections{{site="mx{i}.very-long-destination-name.example.com",'
        f'source="192.0.2.9"}} {i}\n'
        for i in range(40)
    )
    snap = topview.snapshot([topview.parse(BEFORE, 100.0), topview.parse(text, 101.0)])
    out = io.StringIO()
    console = Console(file=out, width=80, color_system=None)
    console.print(top.frame(snap, "http://127.0.0.1:9465/metrics", None, 24))
    lines = out.getvalue().rstrip("\n").split("\n")
    assert len(lines) <= 24 and max(map(len, lines)) <= 80
    screen = out.getvalue()
    assert "p50 614ms" in screen and "BLACKLISTED" in screen and "(+" in screen
    assert "deferred 40 (oldest 2h03m)" in screen and "(1 failing)" in screen


@pytest.fixture
def tmux() -> Iterator[list[str]]:
    """A tmux server of the test's own (its own socket, named by the worker's pid: a path in
    tmp_path could pass the 108 bytes a socket's path may have): the prefix to talk to it."""
    prefix = ["tmux", "-L", f"relayd-test-top-{os.getpid()}"]
    yield prefix
    subprocess.run([*prefix, "kill-server"], capture_output=True)


def test_top_in_tmux_shows_deliveries_and_the_site_then_quits_on_q(
    relay, dns_server, fake_mx, mx_port, tmux
) -> None:
    mx_zone(dns_server, "top.test", (10, "mx.top.test", "127.0.0.10"))
    fake_mx("127.0.0.10")
    r = relay({"monitoring": {"address": f"127.0.0.1:{free_port()}"}})
    ctl = [sys.executable, "-m", "relayd.ctl", "--config", str(r.config_path)]
    command = shlex.join([*ctl, "top", "--interval", "0.5"])
    # the shell stays after top so that its exit status can be read off the pane
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", "top", "-x", "120", "-y", "40"],
        check=True,
    )
    subprocess.run([*tmux, "send-keys", "-t", "top", f"{command}; echo top-exit-$?", "Enter"])

    def pane() -> str:
        return subprocess.run(
            [*tmux, "capture-pane", "-p", "-t", "top"], capture_output=True, text=True
        ).stdout

    def delivering() -> str:
        screen = pane()
        rate = re.search(r"delivered (\d+\.\d)/s", screen)
        site = re.search(rf"^mx\.top\.test:{mx_port} +\d", screen, re.MULTILINE)
        return screen if rate and float(rate[1]) > 0 and site else ""

    with steady_load(r.port, "top.test", clients=2):  # until top shows it
        try:
            screen = wait_until(delivering, 30, "relayctl top showing deliveries to mx.top.test")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the pane:\n{pane()}") from None
    assert "relayd " in screen and "latency (last" in screen
    subprocess.run([*tmux, "send-keys", "-t", "top", "q"], check=True)
    wait_until(lambda: "top-exit-0" in pane(), 10, "relayctl top exiting on q")
    snap = json.loads(r.ctl("top", "--json", "--interval", "0.2").stdout)  # for scripts
    assert snap["version"] and snap["interval_s"] >= 0.2
    assert f"mx.top.test:{mx_port}" in {site["site"] for site in snap["sites"]}
    assert snap["processes"]["ingress"]["rss_bytes"] > 0


def test_top_without_a_relayd_says_so_in_one_line(tmp_path) -> None:
    address = f"127.0.0.1:{free_port()}"
    conf = tmp_path / "relayd.toml"
    conf.write_text(f'[monitoring]\naddress = "{address}"\n')
    done = subprocess.run(
        [sys.executable, "-m", "relayd.ctl", "--config", str(conf), "top", "--once"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (
        f"relayctl: no relayd answers at http://{address}/metrics: connection refused\n"
    )
