"""Nothing owed is lost: DSNs across SIGKILLs and operator deletes, loops that outlive a locked
spool, a damaged spool refused at start, and a spool private whatever the umask."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import smtplib
import sqlite3
import stat
import subprocess
import sys

import pytest
from conftest import ROOT
from support.util import mx_zone, send, steady_load, wait_until

from relayd.spool import schema
from relayd.spool.space import is_full

BOUNCE = "550 5.1.1 no such user"
DEFER = "451 4.3.0 try later"


def dsn_recipients(mx) -> set[str]:
    """The Final-Recipients reported in the DSNs that reached the sender's MX."""
    found = set()
    for m in mx.messages:
        found.update(re.findall(rb"Final-Recipient: rfc822; (\S+)", m.data))
    return {r.decode() for r in found}


def test_sigkill_during_steady_bounces_loses_no_dsn(relay, dns_server, fake_mx):
    """Every acknowledged message that bounces gets its DSN, however often relayd is killed."""
    mx_zone(dns_server, "example.test", (10, "mx.example.test", "127.0.0.10"))
    mx_zone(dns_server, "sender.test", (10, "mx.sender.test", "127.0.0.20"))
    fake_mx("127.0.0.10", rcpt_reply=BOUNCE)
    sender_mx = fake_mx("127.0.0.20")
    r = relay({"shaping": {"default": {"max_connections": 4}}})
    with steady_load(r.port, "example.test") as acked:
        for kill in range(3):  # killed while bounces and their DSNs commit
            done = len(sender_mx.messages) + 20
            wait_until(lambda n=done: len(sender_mx.messages) >= n, 30, "bounces under way")
            r.kill()
            if kill < 2:
                r.start()
    assert len(acked) >= 40
    r.start()
    wanted = set(acked)
    wait_until(
        lambda: wanted <= dsn_recipients(sender_mx),
        60,
        f"a DSN for each of the {len(wanted)} acknowledged bounced messages",
    )


def test_delete_by_domain_keeps_a_message_until_the_dsn_it_owes_is_sent(relay, dns_server, fake_mx):
    """A bounce at one domain while another domain's attempt is in flight: its DSN is owed once
    that attempt ends. Deleting the in-flight domain must not take the owed DSN with it."""
    mx_zone(dns_server, "bad.test", (10, "mx.bad.test", "127.0.0.10"))
    mx_zone(dns_server, "slow.test", (10, "mx.slow.test", "127.0.0.11"))
    mx_zone(dns_server, "sender.test", (10, "mx.sender.test", "127.0.0.20"))
    fake_mx("127.0.0.10", rcpt_reply=BOUNCE)
    slow = fake_mx("127.0.0.11", accept_delay=40)  # holds the DATA reply: the job stays in flight
    sender_mx = fake_mx("127.0.0.20")
    r = relay({"delivery": {"command_timeout": "60s"}})
    qid = send(r.port, ["gone@bad.test", "x@slow.test"], "a@sender.test").rsplit(" ", 1)[1]
    r.wait_event("bounced", rcpt="gone@bad.test")
    slow.wait_for_connections(1)
    assert sender_mx.messages == []  # owed, not yet sent: x@slow.test is still in flight

    deleted = json.loads(r.ctl("--json", "delete", "--domain", "slow.test").stdout)
    assert deleted["recipients"] == 1 and deleted["removed"] == []  # kept for its DSN
    (dsn,) = sender_mx.wait_for_messages(1, timeout=15)
    assert dsn_recipients(sender_mx) == {"gone@bad.test"}
    assert f"X-Relayd-Queue-ID: {qid}".encode() in dsn.data
    queued = r.wait_event("dsn_queued")[0]
    assert queued["original_queue_id"] == qid
    wait_until(lambda: qid not in r.ctl("list").stdout, 10, "the message to leave the spool")
    assert [e["action"] for e in r.events("operator")] == ["delete"]


def test_loops_survive_a_spool_locked_longer_than_the_busy_timeout(relay, dns_server, fake_mx):
    """Another process holds the write lock for 11 s (an operator's sqlite3 shell, a backup):
    every spool operation fails meanwhile. Afterwards the daemon loads, delivers and honours
    relayctl again, without a restart."""
    mx_zone(dns_server, "example.test", (10, "mx.example.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10", rcpt_reply=DEFER)
    r = relay()
    held = send(r.port, ["held@example.test"]).rsplit(" ", 1)[1]
    clock = send(r.port, ["clock@example.test"]).rsplit(" ", 1)[1]
    r.wait_event("deferred", queue_id=held)
    r.wait_event("deferred", queue_id=clock)

    locker = sqlite3.connect(r.spool, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        r.wait_event("spool_retry", timeout=30)  # the daemon met the lock and kept going
        with smtplib.SMTP("127.0.0.1", r.port, timeout=30) as c:  # no 250 without the spool
            c.ehlo("client.test")
            c.mail("a@sender.test")
            c.rcpt("new@example.test")
            code, reply = c.data(b"Subject: while locked\r\n\r\nx\r\n")
        assert code in (451, 452), reply
    finally:
        locker.execute("ROLLBACK")
        locker.close()

    hold = json.loads(r.ctl("--json", "hold", held).stdout)
    assert hold["recipients"] == 1
    r.wait_event("operator", action="hold")  # the daemon has dropped it from memory
    mx.rcpt_reply = "250 2.1.5 ok"
    mx.rcpt_replies["clock@example.test"] = DEFER
    after = send(r.port, ["after@example.test"]).rsplit(" ", 1)[1]
    r.wait_event("delivered", queue_id=after, timeout=30)
    seen = len([e for e in r.events("deferred") if e["queue_id"] == clock])
    r.wait_event("deferred", n=seen + 2, queue_id=clock, timeout=30)  # retries go on
    assert not any(rcpt == "held@example.test" for m in mx.messages for rcpt in m.rcpts)
    shown = json.loads(r.ctl("--json", "show", held).stdout)
    assert [x["state"] for x in shown["recipients"]] == ["held"]


def run_relayd(config: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relayd", "--config", config],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )


def test_a_damaged_spool_is_refused_at_start_with_what_to_do(relay, dns_server, fake_mx):
    mx_zone(dns_server, "example.test", (10, "mx.example.test", "127.0.0.10"))
    fake_mx("127.0.0.10", rcpt_reply=DEFER)
    r = relay()
    for i in range(40):
        send(r.port, [f"r{i}@example.test"], subject="x" * 2000)
    r.wait_event("deferred", n=40)
    assert r.stop() == 0
    with r.spool.open("r+b") as f:  # a torn page in the middle of the file
        f.seek(3 * 4096)
        f.write(os.urandom(4096))
    result = run_relayd(str(r.config_path))
    assert result.returncode == 65, result.stderr
    assert f"spool {r.spool} is damaged" in result.stderr
    assert ".recover" in result.stderr  # and what to do about it


def test_garbage_instead_of_a_spool_is_refused_at_start(relay):
    r = relay(start=False)
    r.spool.write_bytes(b"this is not a database" * 1000)
    result = run_relayd(str(r.config_path))
    assert result.returncode == 65, result.stderr
    assert "is damaged" in result.stderr


def test_spool_and_its_folder_are_private_whatever_the_umask(relay, tmp_path):
    r = relay(start=False)
    old = os.umask(0o022)  # what relayd inherits outside systemd
    try:
        r.start()
    finally:
        os.umask(old)
    send(r.port, ["x@nowhere.test"])  # something in the WAL
    for suffix in ("", "-wal", "-shm"):
        mode = stat.S_IMODE(os.stat(f"{r.spool}{suffix}").st_mode)
        assert mode == 0o600, (suffix, oct(mode))
    assert stat.S_IMODE(os.stat(r.spool.parent).st_mode) == 0o700


def test_below_min_free_space_new_mail_gets_452_431_while_deliveries_go_on(
    relay, dns_server, fake_mx
):
    mx_zone(dns_server, "example.test", (10, "mx.example.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10", rcpt_reply=DEFER)
    r = relay({"server": {"min_free_space": "0"}})
    waiting = send(r.port, ["waiting@example.test"]).rsplit(" ", 1)[1]
    r.wait_event("deferred", queue_id=waiting)

    free = shutil.disk_usage(r.spool.parent).free
    set_min_free_space(r, f"{free // 2**20 + 10_000}MB")  # more than the disk has free
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as c:
        c.ehlo("client.test")
        code, reply = c.mail("a@sender.test")
    assert (code, reply) == (452, b"4.3.1 Insufficient system storage, try again later")
    mx.rcpt_reply = "250 2.1.5 ok"  # what is queued is still delivered
    r.wait_event("delivered", queue_id=waiting, timeout=20)

    set_min_free_space(r, "0")
    send(r.port, ["later@example.test"])


def set_min_free_space(r, value: str) -> None:
    text = re.sub(
        r'"min_free_space" = "[^"]*"', f'"min_free_space" = "{value}"', r.config_path.read_text()
    )
    r.config_path.write_text(text)
    seen = len(r.events("reloaded"))
    r.signal(signal.SIGHUP)
    r.wait_event("reloaded", n=seen + 1)


def test_a_full_database_is_told_apart_from_other_spool_errors(tmp_path):
    path = tmp_path / "spool.sqlite"
    schema.prepare(path)
    conn = schema.connect(path)
    conn.execute("PRAGMA max_page_count = 20")  # SQLite's own "disk full", for this connection
    with pytest.raises(sqlite3.OperationalError) as full:
        conn.execute("CREATE TABLE filler (x BLOB)")
        conn.execute("INSERT INTO filler VALUES (zeroblob(1000000))")
    assert is_full(full.value)
    assert not is_full(sqlite3.OperationalError("database is locked"))
    assert is_full(OSError(errno.ENOSPC, "No space left on device"))
