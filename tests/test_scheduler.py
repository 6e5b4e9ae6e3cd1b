"""The scheduler's bounds: memory holds a fixed number of deliveries however long the queue, and a
due backlog of retries cannot starve fresh mail."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from support.util import mx_zone, seed_deferred_backlog, send, wait_until


def active_rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT count(*) FROM recipients WHERE state = 5").fetchone()[0]


def test_memory_holds_at_most_max_active_deliveries(relay, dns_server, fake_mx):
    mx_zone(dns_server, "slow.test", (10, "mx.slow.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10", accept_delay=0.01)
    r = relay(
        {"delivery": {"max_active": 20}, "shaping": {"default": {"max_connections": 4}}},
        start=False,
    )
    seed_deferred_backlog(r.spool, 600, "slow.test")
    r.start()
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, active_rows(r.spool))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        mx.wait_for_messages(600, timeout=60)
    finally:
        stop.set()
        watcher.join()
    assert 0 < peak <= 20
    wait_until(lambda: not _messages_left(r.spool), 15, "spool emptied after delivery")


def _messages_left(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT count(*) FROM messages").fetchone()[0]


def test_due_backlog_does_not_starve_fresh_mail(relay, dns_server, fake_mx):
    mx_zone(dns_server, "slow.test", (10, "mx.slow.test", "127.0.0.10"))
    mx_zone(dns_server, "fresh.test", (10, "mx.fresh.test", "127.0.0.11"))
    slow = fake_mx("127.0.0.10", rcpt_reply="stall")  # every backlog attempt hangs
    fresh = fake_mx("127.0.0.11")
    r = relay(
        {
            "delivery": {"max_active": 20, "command_timeout": "5s"},
            "shaping": {"domains": {"slow.test": {"max_connections": 2}}},
        },
        start=False,
    )
    seed_deferred_backlog(r.spool, 500, "slow.test")
    r.start()
    slow.wait_for_connections(2)
    for i in range(5):
        send(r.port, [f"new{i}@fresh.test"])
    fresh.wait_for_messages(5, timeout=10)
    # delivered while every backlog attempt was still hanging: retries held only their share
    assert r.events("deferred") == []
    assert slow.messages == []
