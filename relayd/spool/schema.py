"""The spool's schema, its upgrades, and the checks before anything is served."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path

SCHEMA_VERSION = 2

# Every table and index, as the newest relayd creates them.
_TABLES = """
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    queue_id TEXT NOT NULL UNIQUE,
    sender TEXT NOT NULL,
    received_at REAL NOT NULL,
    size INTEGER NOT NULL,
    client TEXT NOT NULL,
    helo TEXT NOT NULL,
    origin TEXT NOT NULL,
    smtputf8 INTEGER NOT NULL DEFAULT 0,
    body BLOB NOT NULL
);
CREATE TABLE recipients (
    id INTEGER PRIMARY KEY,
    msg_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    rcpt TEXT NOT NULL,
    domain TEXT NOT NULL,
    state INTEGER NOT NULL,
    next_attempt REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_code INTEGER,
    last_reply TEXT,
    last_mx TEXT,
    last_attempt REAL,
    reported INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX recipients_msg ON recipients(msg_id);
CREATE INDEX recipients_domain ON recipients(domain);
CREATE INDEX recipients_fresh ON recipients(next_attempt) WHERE state = 0;
CREATE INDEX recipients_deferred ON recipients(next_attempt) WHERE state = 1;
CREATE INDEX recipients_active ON recipients(msg_id) WHERE state = 5;
"""

# Version 2: the event outbox (which also carries relayctl's actions to the daemon, replacing
# the control table), and an index on the bounces whose DSN is still owed.
_V2 = """
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    type TEXT NOT NULL,
    queue_id TEXT NOT NULL,
    rcpt TEXT,
    data TEXT NOT NULL
);
CREATE INDEX events_operator ON events(id) WHERE type = 'operator';
CREATE INDEX recipients_owed ON recipients(msg_id) WHERE state = 3 AND reported & 1 = 0;
"""
_V1_TO_V2 = "DROP TABLE IF EXISTS control;" + _V2


class SpoolDamaged(Exception):
    """The spool file cannot be trusted: relayd must not start on it."""


def connect(path: Path) -> sqlite3.Connection:
    """Open (or create) the spool for the daemon: WAL, fsync at every commit, private files."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    old = os.umask(0o077)  # the database, its WAL and its shm: owner only, whatever the umask
    try:
        conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        os.umask(old)
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def reader(path: Path) -> sqlite3.Connection:
    """A second connection, for reading message texts when delivery needs them (never writes:
    the writer thread's connection stays the only one that does)."""
    conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA query_only=1")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def protect(path: Path) -> None:
    """Queued mail is private: the folder 0700, the files 0600 (also when made earlier by a
    relayd running under another umask)."""
    os.chmod(path.parent, 0o700)
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", 0o600)


def prepare(path: Path, check_budget: float = 1.0) -> None:
    """Create, check and upgrade the spool before anything is served (and before the fork)."""
    try:
        conn = connect(path)
    except sqlite3.DatabaseError as exc:
        raise SpoolDamaged(_damaged(path, str(exc))) from None
    try:
        check(conn, path, check_budget)
        migrate(conn)
    except sqlite3.DatabaseError as exc:
        raise SpoolDamaged(_damaged(path, str(exc))) from None
    finally:
        conn.close()
    protect(path)


def check(conn: sqlite3.Connection, path: Path, budget: float) -> None:
    """SQLite's quick_check, given ``budget`` seconds (a spool of a million messages takes
    longer: then what was read is checked and the rest is left to SQLite's own checks)."""
    deadline = time.monotonic() + budget
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    try:
        rows = conn.execute("PRAGMA quick_check(20)").fetchall()
    except sqlite3.OperationalError as exc:
        if "interrupt" not in str(exc):
            raise
        rows = [("ok",)]
    finally:
        conn.set_progress_handler(None, 0)
    problems = [r[0] for r in rows if r[0] != "ok"]
    if problems:
        raise SpoolDamaged(_damaged(path, "; ".join(problems[:5])))


def _damaged(path: Path, detail: str) -> str:
    return (
        f"spool {path} is damaged ({detail}). relayd will not start on it. Keep a copy of the"
        f" file (and its -wal), then recover what SQLite can read into a new spool:"
        f" sqlite3 {path} .recover | sqlite3 {path}.recovered, check it, and move it in place"
    )


def migrate(conn: sqlite3.Connection) -> None:
    """Create or upgrade the schema; refuse a spool written by a newer relayd."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise SpoolDamaged(
            f"the spool has schema version {version}, written by a newer relayd; this one knows"
            f" version {SCHEMA_VERSION}: run the newer relayd, or restore a backup"
        )
    if version == 0:
        script = _TABLES + _V2
    elif version == 1:
        script = _V1_TO_V2
    else:
        return
    conn.executescript(f"BEGIN; {script} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
