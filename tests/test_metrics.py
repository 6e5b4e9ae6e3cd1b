"""/metrics, /healthz, /readyz and the watchdog of a real relayd: a fake MX delivers some,
defers some (451) and bounces some (550); the scrape's counters, queue gauges and per-site
numbers follow, promtool accepts the output; a stopped ingress process stops the watchdog's
pings and makes /readyz 503."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.util import free_port, mx_zone, send, wait_until

from relayd import config

ROOT = Path(__file__).resolve().parent.parent

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str) -> tuple[int, bytes]:
    try:
        with NO_PROXY.open(url, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def scrape(base: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    status, body = get(f"{base}/metrics")
    assert status == 200
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples, name: str, **labels: str) -> float:
    return sum(
        v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    )


def test_metrics_of_deliveries_deferrals_and_bounces(relay, fake_mx, dns_server, tmp_path) -> None:
    for d in ("a.test", "b.test", "c.test"):
        mx_zone(dns_server, d, (10, f"mx.{d}", "127.0.0.10"))
    fake_mx(
        "127.0.0.10",
        accept_delay=0.2,  # each transaction holds its connection a while
        rcpt_replies={
            "later@a.test": "451 4.3.0 try later",
            "gone@a.test": "550 5.1.1 no such user",
        },
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    r = relay({"monitoring": {"address": f"127.0.0.1:{port}", "max_sites": 2, "refresh": "100ms"}})
    assert get(f"{base}/healthz") == (200, b"ok\n")
    for i in range(3):
        send(r.port, [f"ok{i}@a.test", f"ok{i}@b.test", f"ok{i}@c.test"])
    # connections stay open for delivery.idle_connection_time (0.5 s) after their last message
    open_now = wait_until(
        lambda: scrape(base).get("relayd_site_connections"), 5, "open connections in /metrics"
    )
    assert {lab["source"] for lab, _ in open_now} == {"default"}  # no pool: the system's address
    assert sum(v for _, v in open_now) >= 1
    send(r.port, ["later@a.test", "gone@a.test"])

    def settled():
        s = scrape(base)
        done = value(s, "relayd_recipients_delivered_total") >= 9
        done = done and value(s, "relayd_recipients_bounced_total") >= 2
        return s if done and value(s, "relayd_queue_recipients") == 1 else None  # the gauges too

    s = wait_until(settled, 20, "9 delivered, 2 bounced, 1 queued in /metrics")
    # 4 messages and the DSN of gone@a.test to app@sender.test (which bounces: no such domain)
    assert value(s, "relayd_messages_received_total", stream="transactional") == 5
    assert value(s, "relayd_recipients_delivered_total") == 9
    assert value(s, "relayd_recipients_deferred_total") >= 1
    assert value(s, "relayd_recipients_bounced_total") == 2
    assert value(s, "relayd_events_total", type="accepted") == 5
    assert value(s, "relayd_delivery_latency_seconds_count") == 9
    assert value(s, "relayd_attempt_duration_seconds_count") >= 4
    assert value(s, "relayd_queue_recipients", state="deferred") == 1  # later@a.test waits
    assert value(s, "relayd_queue_recipients_by_age", age="5m") == 1
    assert value(s, "relayd_queue_oldest_seconds", state="deferred") < 60
    # sites: the first two named, the third counted as "other"; results per site
    sites = {lab["site"] for lab, _ in s["relayd_site_attempts_total"]}
    assert len(sites - {"other"}) == 2 and "other" in sites, sites
    assert value(s, "relayd_site_attempts_total", result="delivered") == 9
    assert value(s, "relayd_site_attempts_total", result="deferred") >= 1
    assert value(s, "relayd_site_attempts_total", result="bounced") == 1
    assert value(s, "relayd_spool_bytes") > 0 and value(s, "relayd_disk_free_bytes") > 0
    assert value(s, "relayd_queue_process_resident_memory_bytes") > 10e6
    assert value(s, "relayd_ingress_process_resident_memory_bytes") > 10e6
    assert value(s, "relayd_build_info") == 1
    # no label names a recipient or a message
    labels = {v for rows in s.values() for lab, _ in rows for v in lab.values()}
    assert not [v for v in labels if "@" in v], labels
    text = get(f"{base}/metrics")[1]
    (tmp_path / "metrics.txt").write_bytes(text)
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # the shipped alert rules and dashboard read only series this relayd serves
    served = set(re.findall(r"^# TYPE (relayd_[a-z_]+) (\w+)", text.decode(), re.M))
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    names = {
        n.removesuffix("_total") + end for n, kind in served for end in suffixes.get(kind, ("",))
    }
    for shipped in ("conf/prometheus/alerts.yml", "conf/grafana/relayd.json"):
        used = set(re.findall(r"\brelayd_[a-z_]+", (ROOT / shipped).read_text()))
        assert used and used <= names, (shipped, used - names)
    status, body = get(f"{base}/readyz")
    assert (status, json.loads(body)) == (200, {"ready": True, "failing": {}})
    status, body = get(f"{base}/nothing")
    assert status == 404 and json.loads(body)["status"] == 404


def test_watchdog_stops_when_ingress_is_stuck(relay, tmp_path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    notify.bind(str(path))
    notify.settimeout(5)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        r = relay({"monitoring": {"address": f"127.0.0.1:{port}", "ready_timeout": "500ms"}})
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v

    def pings(seconds: float) -> int:
        """WATCHDOG=1 datagrams received in the next ``seconds``."""
        n, deadline = 0, time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            notify.settimeout(left)
            try:
                n += notify.recv(100) == b"WATCHDOG=1"
            except TimeoutError:
                break
        return n

    assert pings(1.0) >= 3  # every 200 ms (WATCHDOG_USEC / 2)
    assert get(f"{base}/readyz")[0] == 200
    ingress = int(r.events("started")[0]["ingress_pid"])
    os.kill(ingress, signal.SIGSTOP)
    try:
        wait_until(lambda: get(f"{base}/readyz")[0] == 503, 10, "/readyz 503")
        body = get(f"{base}/readyz")[1]
        assert "ingress" in json.loads(body)["failing"]
        pings(0.3)  # those sent before the check found it
        assert pings(1.5) == 0
    finally:
        os.kill(ingress, signal.SIGCONT)
    wait_until(lambda: get(f"{base}/readyz")[0] == 200, 10, "/readyz 200 again")
    assert pings(1.0) >= 2
    notify.close()
    assert Path(path).exists()


@pytest.mark.parametrize(
    ("table", "key", "problem"),
    [
        ({"address": "localhost"}, "monitoring.address", "expected host:port"),
        ({"max_sites": 0}, "monitoring.max_sites", "must be from 1 to 10000"),
        ({"refresh": "2h"}, "monitoring.refresh", "must be from 0.1s to 3600s"),
        ({"ready_timeout": "0s"}, "monitoring.ready_timeout", "more than 0"),
        ({"port": 9465}, "monitoring.port", "unknown key"),
    ],
)
def test_bad_monitoring_keys_are_named(tmp_path, table, key, problem) -> None:
    conf = tmp_path / "relayd.toml"
    body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())
    conf.write_text(f'[[listeners]]\naddress = "127.0.0.1:2525"\n[monitoring]\n{body}')
    with pytest.raises(config.ConfigError) as exc:
        config.load(conf)
    assert key in str(exc.value) and problem in str(exc.value), str(exc.value)
    blank = tmp_path / "off.toml"
    blank.write_text('[[listeners]]\naddress = "127.0.0.1:2525"\n[monitoring]\naddress = ""\n')
    assert config.load(blank).monitoring.address is None


def test_monitoring_port_in_use_is_named(relay) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        r = relay({"monitoring": {"address": address}}, start=False)
        done = subprocess.run(
            [sys.executable, "-m", "relayd", "--config", str(r.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).resolve().parent.parent,
        )
    assert done.returncode == 71, done.stderr
    assert f"cannot start: [Errno 98] monitoring.address {address}:" in done.stderr
