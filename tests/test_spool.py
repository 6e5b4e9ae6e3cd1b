"""The spool writer's group commit, on a real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from relayd.spool import schema
from relayd.spool.writer import Writer

# the schema as each version created it: version N is the first N scripts
_SCRIPTS = (schema._TABLES, schema._V2, schema._V3, schema._V4, schema._V5)


def old_spool(path: Path, version: int, rows: str) -> None:
    """A spool as the relayd of schema ``version`` left it, holding ``rows`` (SQL)."""
    with sqlite3.connect(path) as db:
        db.executescript("".join(_SCRIPTS[:version]) + rows + f"PRAGMA user_version = {version};")


def test_failing_operation_does_not_undo_its_neighbours_in_the_same_commit(tmp_path: Path):
    path = tmp_path / "spool.sqlite"
    schema.prepare(path)
    gate = threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        assert gate.wait(10)

    def insert(action: str):
        def op(conn: sqlite3.Connection) -> str:
            conn.execute(
                "INSERT INTO events (at, type, queue_id, data) VALUES (0, ?, '', '{}')", (action,)
            )
            if action == "bad":
                raise ValueError("this one fails after writing")
            return action

        return op

    async def run() -> list:
        writer = Writer(path, asyncio.get_running_loop())
        try:
            first = writer.submit(hold)  # keeps the writer busy while the batch gathers
            ops = [writer.submit(insert(a)) for a in ("one", "bad", "two")]
            gate.set()
            await first
            return await asyncio.gather(*ops, return_exceptions=True)
        finally:
            writer.close()

    one, bad, two = asyncio.run(run())
    assert (one, two) == ("one", "two")
    assert isinstance(bad, ValueError)
    with sqlite3.connect(path) as db:
        actions = [r[0] for r in db.execute("SELECT type FROM events ORDER BY id")]
    assert actions == ["one", "two"]


def test_prepare_refuses_a_spool_from_a_newer_relayd(tmp_path: Path):
    path = tmp_path / "spool.sqlite"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION + 1}")
    with pytest.raises(schema.SpoolDamaged, match="newer relayd"):
        schema.prepare(path)


def test_a_version_1_spool_is_upgraded_in_place_keeping_its_mail(tmp_path: Path):
    """relayd before the outbox: a control table, no events. The mail stays; control goes."""
    path = tmp_path / "spool.sqlite"
    old_spool(
        path,
        1,
        "CREATE TABLE control (id INTEGER PRIMARY KEY, action TEXT, msg_ids TEXT, at REAL);"
        "INSERT INTO messages VALUES (1, 'Q1', 's@x.test', 0, 1, '', '', 't', 0, x'00');"
        "INSERT INTO recipients (msg_id, rcpt, domain, state, next_attempt)"
        " VALUES (1, 'r@y.test', 'y.test', 1, 0);",
    )
    schema.prepare(path)
    with sqlite3.connect(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert db.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
        assert db.execute("SELECT rcpt, state FROM recipients").fetchall() == [("r@y.test", 1)]
    assert "events" in tables and "control" not in tables


def test_a_version_2_spool_gains_the_receipt_columns_keeping_its_mail(tmp_path: Path):
    """relayd before receipts: mail in flight keeps its state and gets the RFC 3461 defaults."""
    path = tmp_path / "spool.sqlite"
    old_spool(
        path,
        2,
        "INSERT INTO messages VALUES (1, 'Q1', 's@x.test', 0, 1, '', '', 't', 0, x'00');"
        "INSERT INTO recipients (msg_id, rcpt, domain, state, next_attempt)"
        " VALUES (1, 'r@y.test', 'y.test', 1, 0);",
    )
    schema.prepare(path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
        assert db.execute("SELECT envid, ret, meta FROM messages").fetchall() == [(None, "", "")]
        assert db.execute("SELECT rcpt, state, notify, orcpt FROM recipients").fetchall() == [
            ("r@y.test", 1, 0, None)
        ]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"idempotency", "webhooks"} <= tables


def test_a_version_3_spool_gains_streams_and_the_suppression_list_keeping_its_mail(
    tmp_path: Path,
):
    """relayd before deliverability: mail in flight is transactional, nothing is suppressed."""
    path = tmp_path / "spool.sqlite"
    old_spool(
        path,
        3,
        "INSERT INTO messages (id, queue_id, sender, received_at, size, client, helo,"
        " origin, body) VALUES (1, 'Q1', 's@x.test', 0, 1, '', '', 't', x'00');",
    )
    schema.prepare(path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
        assert db.execute("SELECT queue_id, stream FROM messages").fetchall() == [
            ("Q1", "transactional")
        ]
        assert db.execute("SELECT count(*) FROM suppressions").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM listings").fetchone() == (0,)
        assert len(schema.secret(db, "tokens")) == 32


def test_a_version_4_spool_gains_the_campaign_tables_keeping_its_mail(tmp_path: Path):
    """relayd before campaigns: mail in flight and the suppression list stay as they were."""
    path = tmp_path / "spool.sqlite"
    old_spool(
        path,
        4,
        "INSERT INTO messages (id, queue_id, sender, received_at, size, client, helo,"
        " origin, body) VALUES (1, 'Q1', 's@x.test', 0, 1, '', '', 't', x'00');"
        "INSERT INTO suppressions (address, scope, reason, created)"
        " VALUES ('a@y.test', '*', 'manual', 0);",
    )
    schema.prepare(path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
        assert db.execute("SELECT queue_id FROM messages").fetchall() == [("Q1",)]
        assert db.execute("SELECT address FROM suppressions").fetchall() == [("a@y.test",)]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"contacts", "lists", "templates", "campaigns", "campaign_sends"} <= tables


def test_a_spool_too_large_to_check_before_start_is_checked_whole_afterwards(tmp_path: Path):
    path = tmp_path / "spool.sqlite"
    schema.prepare(path)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("CREATE TABLE filler (x BLOB)")
        db.executemany("INSERT INTO filler VALUES (randomblob(3000))", [()] * 200)
    assert schema.verify(path) == ""
    with path.open("r+b") as f:  # a torn page in the middle of the file
        f.seek(60 * 4096)
        f.write(b"\xff" * 4096)
    schema.prepare(path, full_check_max=0)  # starts: only what opening needs is checked
    assert schema.needs_background_check(path, full_check_max=0)
    assert f"spool {path} is damaged" in schema.verify(path)  # found by the whole check
    with pytest.raises(schema.SpoolDamaged, match="is damaged"):
        schema.prepare(path)  # small enough to check whole: refused


def test_a_version_5_spool_gets_the_text_last_keeping_messages_and_recipients(tmp_path: Path):
    """The rebuild of messages (text last, see _V6) must not cascade to the recipients."""
    path = tmp_path / "spool.sqlite"
    old_spool(
        path,
        5,
        "INSERT INTO messages (id, queue_id, sender, received_at, size, client, helo,"
        " origin, body, envid, meta, stream) VALUES (7, 'Q7', 's@x.test', 1, 3, 'c',"
        " 'h', 't', x'616263', 'E7', '{}', 'bulk');"
        "INSERT INTO recipients (msg_id, rcpt, domain, state, next_attempt)"
        " VALUES (7, 'r@y.test', 'y.test', 1, 5);",
    )
    schema.prepare(path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
        columns = [r[1] for r in db.execute("PRAGMA table_info(messages)")]
        assert columns[-1] == "body"
        assert db.execute("SELECT id, queue_id, envid, stream, body FROM messages").fetchall() == [
            (7, "Q7", "E7", "bulk", b"abc")
        ]
        assert db.execute("SELECT msg_id, rcpt, state FROM recipients").fetchall() == [
            (7, "r@y.test", 1)
        ]
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("DELETE FROM messages WHERE id = 7")  # the cascade still holds
        assert db.execute("SELECT count(*) FROM recipients").fetchone() == (0,)


def test_inserting_a_text_in_pieces_does_not_hold_it_in_memory(tmp_path: Path):
    """SQLite materialises a zeroblob that is not its row's last column: 32 MB for 16 MB."""
    path = tmp_path / "spool.sqlite"
    schema.prepare(path)
    conn = schema.connect(path)
    size = 16 << 20
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here on
    before = _status("VmRSS")
    conn.execute(
        "INSERT INTO messages (queue_id, sender, received_at, size, client, helo, origin, body)"
        " VALUES (?,?,?,?,?,?,?,zeroblob(?))",
        ("ZB", "a@x.test", 0.0, size, "127.0.0.1", "c.test", "", size),
    )
    assert _status("VmHWM") - before < size // 4
    conn.close()


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith(field + ":"))


def test_deleting_a_delivered_text_does_not_write_it_again(tmp_path: Path):
    """Debian's SQLite overwrites deleted content by default (secure_delete=ON): a delivered
    5 MB message cost 5 MB more of WAL and checkpoint, and stalled the writer for seconds."""
    path = tmp_path / "spool.sqlite"
    schema.prepare(path)
    conn = schema.connect(path)
    conn.execute(
        "INSERT INTO messages (queue_id, sender, received_at, size, client, helo, origin, body)"
        " VALUES (?,?,?,?,?,?,?,?)",
        ("AB", "a@x.test", 0.0, 4 << 20, "127.0.0.1", "c.test", "", b"x" * (4 << 20)),
    )
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    wal = Path(f"{path}-wal")
    assert wal.stat().st_size == 0
    conn.execute("DELETE FROM messages WHERE queue_id = 'AB'")
    assert wal.stat().st_size < 256 << 10  # the freed pages are listed, not zeroed
    conn.close()
