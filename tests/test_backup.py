"""Backup, restore and one message's story, on relayd as a real process: a backup taken under
load survives the loss of the spool (every message acknowledged before it is delivered after
the restore), scheduled backups are kept to their number, and ``relayctl log`` tells an
attempt's MX, reply and the webhook that acknowledged it."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from support.receiver import Receiver
from support.util import mx_zone, send, steady_load, wait_until

from relayd.spool import backup, schema

DEFER = "451 4.3.0 busy, try later"


@pytest.fixture
def mx(dns_server, fake_mx):
    mx_zone(dns_server, "example.test", (10, "mx.example.test", "127.0.0.10"))
    return fake_mx("127.0.0.10", rcpt_reply=DEFER)


def test_backup_under_load_restored_on_a_lost_spool_delivers_all_acknowledged_before(
    relay, mx, tmp_path: Path
):
    r = relay({"backup": {"dir": "backups", "interval": "1s", "keep": 2}})
    file = tmp_path / "taken.sqlite"
    with steady_load(r.port, "example.test", clients=4, per_client=400) as acked:
        wait_until(lambda: len(acked) >= 100, 30, "100 messages acknowledged")
        before = list(acked)  # each answered 250 before the backup began
        doc = json.loads(r.ctl("--json", "backup", str(file)).stdout)
        wait_until(lambda: len(acked) >= len(before) + 100, 30, "100 more after the backup")
        again = r.ctl("backup", str(file), check=False)
        live = r.ctl("restore", str(file), "--force", check=False)
    assert doc["path"] == str(file) and doc["bytes"] == file.stat().st_size
    assert doc["schema_version"] == schema.SCHEMA_VERSION and doc["newest_event"] > 0
    assert doc["messages"] >= len(before) and str(r.config_path) in doc["not_included"]
    assert not Path(f"{file}.partial").exists()
    assert again.returncode == 1 and f"backup: {file} exists (use --force" in again.stderr
    assert live.returncode == 1 and f"is open by process {r.proc.pid}" in live.stderr
    print(f"\nbackup of {doc['messages']} messages, {doc['bytes']} bytes: {doc['seconds']} s")

    r.wait_event("backup_made", 3, timeout=20)  # scheduled, one a second, two kept
    assert len(list((tmp_path / "backups").glob("relayd-*.sqlite"))) <= 2
    assert mx.messages == []  # everything was deferred: all of it is in the spool

    r.kill()  # the host is lost: the spool with it
    for suffix in ("", "-wal", "-shm"):
        Path(f"{r.spool}{suffix}").unlink(missing_ok=True)
    mx.rcpt_reply = "250 2.1.5 ok"
    started = time.monotonic()
    restored = json.loads(r.ctl("--json", "restore", str(file)).stdout)
    assert restored["newest_event"] == doc["newest_event"] and restored["not_included"]
    r.start()
    wait_until(lambda: mx.messages, 30, "a first delivery after the restore")
    recovery = time.monotonic() - started

    def delivered() -> set[str]:
        got = {rcpt for m in list(mx.messages) for rcpt in m.rcpts}
        return got if set(before) <= got else set()

    wait_until(delivered, 60, f"the {len(before)} messages acknowledged before the backup")
    # the restored relayd's events do not reuse the ids of those lost with the old spool; the
    # MX has each message before relayd commits its result, so the events are waited for too

    def new_events() -> list[int]:
        conn = sqlite3.connect(f"{r.spool.as_uri()}?mode=ro", uri=True)
        try:
            query = "SELECT id FROM events WHERE id > ? ORDER BY id"
            found = [i for (i,) in conn.execute(query, (doc["newest_event"],))]
        finally:
            conn.close()
        return found if len(found) > len(before) else []

    ids = wait_until(new_events, 30, f"more than {len(before)} events after the restore")
    assert ids[0] == doc["newest_event"] + backup.EVENT_ID_JUMP
    print(f"recovery (restore start to first delivery): {recovery:.2f} s")


HOOKS: dict[str, Any] = {"webhooks": {"poll_interval": "50ms", "retry_jitter": 0.0}}


def test_log_tells_a_message_deferred_then_delivered_and_its_webhook(relay, mx):
    mx.rcpt_reply = "250 2.1.5 ok"
    mx.data_replies.append(DEFER)  # the first attempt is deferred, the next delivered
    receiver = Receiver().start()
    try:
        r = relay(HOOKS)
        hook = json.loads(r.ctl("--json", "webhook", "add", receiver.url, "--events", "*").stdout)
        receiver.secrets.append(hook["secret"])
        queue_id = send(r.port, ["ann@example.test"]).rsplit(" ", 1)[1]

        def story() -> dict[str, Any] | None:
            doc = json.loads(r.ctl("--json", "log", queue_id).stdout)
            last = doc["events"][-1]
            done = last["type"] == "delivered" and last["webhooks"][0]["acknowledged"]
            return doc if done else None

        doc = wait_until(story, 20, "delivered, and the webhook's acknowledgement")
        text = r.ctl("log", queue_id).stdout
    finally:
        receiver.stop()
    types = [e["type"] for e in doc["events"]]
    assert types == ["accepted", "deferred", "delivered"]
    deferred, delivered = doc["events"][1]["data"], doc["events"][2]["data"]
    assert deferred["code"] == 451 and delivered["code"] == 250
    lines = text.splitlines()
    assert len(lines) == 3 and "accepted" in lines[0] and "ann@example.test" in lines[0]
    assert "sender=app@sender.test" in lines[0] and "origin=" in lines[0]
    assert "mx=mx.example.test" in lines[1] and "code=451" in lines[1] and "busy" in lines[1]
    assert "source_ip=127.0.0.1" in lines[2] and "code=250" in lines[2] and "attempt=2" in lines[2]
    assert all(f"webhook {hook['id']} acknowledged" in line for line in lines)
    unknown = r.ctl("log", "NOSUCHID", check=False)
    assert (
        unknown.returncode == 1 and unknown.stderr == "relayctl: no events for queue id NOSUCHID\n"
    )
