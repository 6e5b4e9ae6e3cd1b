"""The process: config validation, signals, systemd readiness, and crash safety."""

from __future__ import annotations

import signal
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support.util import free_port, listening, mx_zone, send, steady_load, wait_until

from relayd import config

ROOT = Path(__file__).resolve().parent.parent


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relayd", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('[server]\nhostname = "bad host"\n', "server.hostname", "not a valid host name"),
        ("[ingress]\ntrusted_networks = ['10.0.0.0/33']\n", "ingress.trusted_networks[0]", "CIDR"),
        ("[shaping.default]\nmax_rate = 'fast'\n", "shaping.default.max_rate", "rate like"),
        ("[shaping.default]\nmax_conections = 3\n", "shaping.default.max_conections", "unknown"),
        ("[retry]\nfirst = -1\n", "retry.first", "duration"),
        ("[shaping.default]\npool = 'nope'\n", "shaping.default.pool", "no pool named"),
        ("[[listeners]]\naddress = '127.0.0.1'\n", "listeners[0].address", "host:port"),
        ("[server\n", "", "invalid TOML"),
    ],
)
def test_invalid_config_stops_with_78_naming_file_key_problem(tmp_path, text, key, problem):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = run_check(path)
    assert result.returncode == config.EX_CONFIG
    assert str(path) in result.stderr and key in result.stderr and problem in result.stderr


def test_example_config_sets_every_key_the_loader_reads(monkeypatch):
    """The example is the documentation: each key read from any table must be written in it."""
    seen: list[tuple[str, set[str], set[str]]] = []
    finish = config._Section.finish

    def spy(section: config._Section) -> None:
        seen.append((section.prefix, set(section.used), set(section.data)))
        finish(section)

    monkeypatch.setattr(config._Section, "finish", spy)
    config.load(ROOT / "conf" / "relayd.toml")
    missing = [
        f"{prefix}.{key}"
        for prefix, used, present in seen
        if not prefix.startswith("shaping.domains.")  # overrides inherit the default's keys
        for key in used - present
    ]
    assert seen and not missing


def test_sighup_reloads_and_keeps_old_config_when_new_one_is_broken(relay, dns_server, fake_mx):
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10")
    r = relay()
    r.config_path.write_text(r.config_path.read_text().replace('"relay.test"', '"bad host"'))
    r.signal(signal.SIGHUP)
    r.wait_event("reload_refused")
    send(r.port, ["a@example.test"])
    assert mx.wait_for_messages(1)[0].ehlo == "relay.test"
    r.config_path.write_text(r.config_path.read_text().replace('"bad host"', '"new.relay.test"'))
    r.signal(signal.SIGHUP)
    r.wait_event("reloaded")
    mx.wait_idle()
    send(r.port, ["b@example.test"])
    assert mx.wait_for_messages(2)[1].ehlo == "new.relay.test"


def test_sigterm_finishes_transaction_in_flight_then_exits(relay, dns_server, fake_mx):
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    fake_mx("127.0.0.10", rcpt_reply="451 4.3.0 later")
    r = relay()
    client = smtplib.SMTP("127.0.0.1", r.port, timeout=10)
    client.ehlo("client.test")
    client.mail("a@sender.test")
    client.rcpt("x@example.test")
    r.signal(signal.SIGTERM)
    r.wait_event("stopping")
    code, reply = client.data(b"Subject: late\r\n\r\nbody\r\n")
    client.close()
    assert code == 250, reply
    assert r.proc.wait(20) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", r.port), timeout=1)
    r.start()  # and the message it acknowledged is still there to deliver
    r.wait_event("deferred", rcpt="x@example.test")


def test_sigterm_during_a_slow_delivery_logs_no_error(relay, dns_server, fake_mx):
    """A stop that waits for a transaction in flight is not a failure: the health look must
    not report the loops the stop itself is ending (seen: loops_stuck at every bench stop)."""
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10", accept_delay=3)
    r = relay()
    send(r.port, ["x@example.test"])
    wait_until(lambda: mx.connections, 15, "the delivery under way")
    r.signal(signal.SIGTERM)
    assert r.proc.wait(30) == 0
    r.wait_event("delivered", rcpt="x@example.test")
    assert [e for e in r.events() if e.get("level") == "error"] == []


def test_systemd_notify_ready(relay, tmp_path, monkeypatch):
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(15)
        monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
        r = relay()
        assert sock.recv(100) == b"READY=1"
        r.signal(signal.SIGTERM)
        assert sock.recv(100) == b"STOPPING=1"
    assert r.proc.wait(20) == 0


def test_sigkill_under_load_loses_no_acknowledged_message(relay, dns_server, fake_mx):
    """Kill -9 while clients submit and deliveries run; every 250'd message must arrive."""
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10", accept_delay=0.005)
    r = relay({"shaping": {"default": {"max_connections": 4}}})
    with steady_load(r.port, "example.test", clients=6, per_client=400) as acked:
        wait_until(lambda: len(mx.messages) >= 50, 30, "deliveries under way")
        r.kill()
    assert len(acked) >= 50
    r.start()
    wanted = set(acked)
    wait_until(
        lambda: wanted <= {rcpt for m in mx.messages for rcpt in m.rcpts},
        60,
        f"all {len(wanted)} acknowledged messages delivered after restart",
    )


def test_listener_port_in_use_is_a_clear_error(tmp_path):
    port = free_port()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        path = tmp_path / "relayd.toml"
        path.write_text(
            f'[server]\nspool_path = "spool.sqlite"\n[[listeners]]\naddress = "127.0.0.1:{port}"\n'
        )
        result = run_check(path)
    assert result.returncode == 71
    assert "cannot start" in result.stderr


def _gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a zombie awaiting its parent counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def test_ingress_process_dies_with_a_sigkilled_queue_process(relay):
    r = relay()
    ingress_pid = r.wait_event("started")[0]["ingress_pid"]
    assert ingress_pid != r.proc.pid and not _gone(ingress_pid)
    r.kill()
    wait_until(lambda: _gone(ingress_pid), 10, "the ingress process to exit")
    # its listeners close with its last thread (the campaign fold's, say), a moment later
    wait_until(lambda: not listening(r.port), 10, "the ingress process's listeners to close")


def test_ingress_process_crash_stops_relayd_for_a_restart_and_keeps_acknowledged_mail(
    relay, dns_server, fake_mx
):
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10", rcpt_reply="451 4.3.0 later")
    r = relay()
    send(r.port, ["kept@example.test"])
    r.wait_event("deferred", rcpt="kept@example.test")
    ingress_pid = r.wait_event("started")[0]["ingress_pid"]
    subprocess.run(["kill", "-KILL", str(ingress_pid)], check=True)
    assert r.proc.wait(30) == 70  # EX_SOFTWARE: systemd's Restart=on-failure starts it again
    assert r.events("ingress_exited")
    mx.rcpt_reply = "250 2.1.5 ok"
    r.start()
    r.ctl("retry", "--domain", "example.test")
    wait_until(lambda: any("kept@example.test" in m.rcpts for m in mx.messages), 20, "delivery")
