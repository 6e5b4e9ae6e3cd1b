"""The spool: one SQLite file in WAL mode, the single source of truth.

A body is stored once in ``messages``; each recipient has its own row in ``recipients`` with its
delivery state. All writes of the daemon go through one writer thread that runs every operation
queued since its last commit inside one transaction and one fsync (group commit): concurrent
arrivals share the cost of durability instead of paying one fsync each. One failing operation
cannot undo its neighbours: the batch is then run again with a savepoint around each.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

SCHEMA_VERSION = 1


class State(IntEnum):
    PENDING = 0  # accepted, never tried
    DEFERRED = 1  # tried, waiting for next_attempt
    DELIVERED = 2
    BOUNCED = 3
    HELD = 4  # set aside by the operator
    ACTIVE = 5  # loaded into the daemon's memory; reset to PENDING/DEFERRED at start-up


FINAL = (State.DELIVERED, State.BOUNCED)

_SCHEMA = """
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
CREATE TABLE control (
    id INTEGER PRIMARY KEY,
    action TEXT NOT NULL,
    msg_ids TEXT NOT NULL,
    at REAL NOT NULL
);
"""

_REPORTED_FAILED = 1
_REPORTED_DELAYED = 2


_ids = itertools.count(secrets.randbits(20))


def new_queue_id() -> str:
    """Unique and sortable by time: 11 hex digits of microseconds, then a counter (5 digits) so
    that ids made in the same microsecond differ. No random bytes per id: the OS's randomness
    costs a system call, and nothing here needs to be unpredictable."""
    return f"{time.time_ns() // 1000 & 0xFFFFFFFFFFF:011X}{next(_ids) & 0xFFFFF:05X}"


def connect(path: Path) -> sqlite3.Connection:
    """Open (or create) the spool for the daemon: WAL, and fsync at every commit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def prepare(path: Path) -> None:
    """Create or upgrade the spool before anything is served (and before relayd forks)."""
    conn = connect(path)
    try:
        migrate(conn)
    finally:
        conn.close()


def migrate(conn: sqlite3.Connection) -> None:
    """Create or upgrade the schema; refuse a spool written by a newer relayd."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RuntimeError(f"spool schema version {version} is newer than this relayd's")
    if version == 0:
        conn.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")


@dataclass
class Recipient:
    id: int
    rcpt: str
    attempts: int


@dataclass
class Job:
    """One message to the recipients it has at one domain: what one SMTP transaction carries."""

    msg_id: int
    queue_id: str
    sender: str
    domain: str
    received_at: float
    smtputf8: bool
    body: bytes
    recipients: list[Recipient]

    @property
    def is_retry(self) -> bool:
        return any(r.attempts for r in self.recipients)


@dataclass
class Result:
    """The outcome of one attempt for one recipient."""

    rcpt_id: int
    state: State  # DELIVERED, DEFERRED or BOUNCED
    code: int
    reply: str
    mx: str
    next_attempt: float = 0.0


@dataclass
class NewMessage:
    """A message on its way into the spool, from ingress or from the bounce generator."""

    queue_id: str
    sender: str
    recipients: list[str]
    body: bytes
    client: str
    helo: str
    origin: str  # "auth:NAME", "trusted:IP" or "dsn:QUEUEID": who vouched for it
    smtputf8: bool
    received_at: float = 0.0  # set when it is stored
    signed: bool = False  # a DKIM signature was added
    active: bool = False  # the scheduler took it straight into memory
    ids: list[int] = field(default_factory=list)  # recipient row ids, set on insert
    msg_id: int = 0


@dataclass
class Report:
    """A message that needs a DSN: the failed (or delayed) recipients and the original."""

    kind: str  # "failed" or "delayed"
    queue_id: str
    sender: str
    received_at: float
    body: bytes
    recipients: list[tuple[str, int, str, str]]  # rcpt, code, reply, mx


class Writer:
    """The spool's single writer thread with group commit.

    ``submit(fn)`` runs ``fn(conn)`` on the writer thread and resolves to its return value once
    the transaction holding it is durable.
    """

    def __init__(self, path: Path, loop: asyncio.AbstractEventLoop, max_batch: int = 2000) -> None:
        self.path, self.loop, self.max_batch = path, loop, max_batch
        self.conn = connect(path)
        self._queue: queue.SimpleQueue[tuple[Callable[[sqlite3.Connection], Any], Any] | None]
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        fut: asyncio.Future[T] = self.loop.create_future()
        self._queue.put((fn, fut))
        return fut

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.conn.close()

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is None:
                stop = True
            ops = [op for op in batch if op is not None]
            if not ops:
                continue
            outcomes = self._run_batch(ops)
            self.loop.call_soon_threadsafe(_settle, outcomes)

    def _run_batch(self, ops: list[tuple[Callable[[sqlite3.Connection], Any], Any]]) -> list:
        """All operations in one transaction. They run side by side first; only when one fails
        is the batch run again with a savepoint around each, so that the failing one cannot
        undo its neighbours (two statements per operation saved on the common path)."""
        with contextlib.suppress(Exception):
            return self._transaction(ops, isolated=False)
        try:
            return self._transaction(ops, isolated=True)
        except Exception as exc:  # the commit itself failed: nothing of the batch is durable
            return [(fut, False, exc) for _, fut in ops]

    def _transaction(
        self, ops: list[tuple[Callable[[sqlite3.Connection], Any], Any]], isolated: bool
    ) -> list:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            outcomes = []
            for fn, fut in ops:
                if not isolated:
                    outcomes.append((fut, True, fn(conn)))
                    continue
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((fut, True, fn(conn)))
                    conn.execute("RELEASE op")
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((fut, False, exc))
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        return outcomes


def _settle(outcomes: list[tuple[asyncio.Future, bool, Any]]) -> None:
    for fut, ok, value in outcomes:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


# Operations below run on the writer thread, inside the group transaction.


def insert_message(msg: NewMessage, now: float) -> Callable[[sqlite3.Connection], NewMessage]:
    def op(conn: sqlite3.Connection) -> NewMessage:
        cur = conn.execute(
            "INSERT INTO messages (queue_id, sender, received_at, size, client, helo, origin,"
            " smtputf8, body) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                msg.queue_id,
                msg.sender,
                msg.received_at,
                len(msg.body),
                msg.client,
                msg.helo,
                msg.origin,
                int(msg.smtputf8),
                msg.body,
            ),
        )
        msg.msg_id = cur.lastrowid or 0
        state = State.ACTIVE if msg.active else State.PENDING
        msg.ids = []
        for rcpt in msg.recipients:
            cur = conn.execute(
                "INSERT INTO recipients (msg_id, rcpt, domain, state, next_attempt)"
                " VALUES (?,?,?,?,?)",
                (msg.msg_id, rcpt, domain_of(rcpt), int(state), now),
            )
            msg.ids.append(cur.lastrowid or 0)
        return msg

    return op


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def reset_active(conn: sqlite3.Connection) -> int:
    """At start-up: whatever was in the last process's memory goes back to waiting."""
    cur = conn.execute(
        "UPDATE recipients SET state = CASE WHEN attempts = 0 THEN 0 ELSE 1 END WHERE state = 5"
    )
    return cur.rowcount


def load_due(
    now: float, limit: int, retry_limit: int
) -> Callable[[sqlite3.Connection], tuple[list[Job], bool]]:
    """Take due recipients into memory, marking them ACTIVE so the next load skips them;
    never-tried mail first, so a deferred backlog cannot starve new mail. Also says whether
    a limit was reached (more may be due)."""

    def op(conn: sqlite3.Connection) -> tuple[list[Job], bool]:
        rows: list[tuple] = []
        more = False
        for state, cap in ((State.PENDING, limit), (State.DEFERRED, retry_limit)):
            cap = min(cap, limit - len(rows))
            if cap <= 0:
                more = True
                continue
            found = conn.execute(
                f"SELECT id, msg_id, rcpt, domain, attempts FROM recipients "
                f"WHERE state = {int(state)} AND next_attempt <= ? "
                f"ORDER BY next_attempt LIMIT ?",
                (now, cap),
            ).fetchall()
            more = more or len(found) == cap
            rows += found
        if not rows:
            return [], more
        conn.executemany("UPDATE recipients SET state = 5 WHERE id = ?", [(r[0],) for r in rows])
        return _jobs(conn, rows), more

    return op


def _jobs(conn: sqlite3.Connection, rows: list[tuple]) -> list[Job]:
    msg_ids = sorted({r[1] for r in rows})
    messages: dict[int, tuple] = {}
    for chunk in _chunks(msg_ids, 500):
        marks = ",".join("?" * len(chunk))
        for m in conn.execute(
            f"SELECT id, queue_id, sender, received_at, smtputf8, body FROM messages "
            f"WHERE id IN ({marks})",
            chunk,
        ):
            messages[m[0]] = m
    jobs: dict[tuple[int, str], Job] = {}
    for rid, msg_id, rcpt, domain, attempts in rows:
        m = messages[msg_id]
        job = jobs.get((msg_id, domain))
        if job is None:
            job = jobs[(msg_id, domain)] = Job(
                msg_id, m[1], m[2], domain, m[3], bool(m[4]), m[5], []
            )
        job.recipients.append(Recipient(rid, rcpt, attempts))
    return list(jobs.values())


def _chunks(items: list[T], size: int) -> Iterable[list[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def record_results(
    msg_id: int, results: list[Result], now: float, delay_warning: float
) -> Callable[[sqlite3.Connection], list[Report]]:
    """Store the outcomes of one attempt of message ``msg_id``; settle it: DSN for newly failed
    recipients once none of its recipients is still in memory, removal once all are final.

    A result only applies to a recipient still ACTIVE (or HELD, for final outcomes), so an
    operator's delete or hold during the attempt wins over it. The common case, every
    recipient of the message delivered at once, is one DELETE.
    """

    def op(conn: sqlite3.Connection) -> list[Report]:
        if all(r.state is State.DELIVERED for r in results):
            ids = [r.rcpt_id for r in results]
            gone = conn.execute(
                f"DELETE FROM messages WHERE id = ? AND NOT EXISTS (SELECT 1 FROM recipients"
                f" WHERE msg_id = ? AND id NOT IN ({','.join('?' * len(ids))}))",
                (msg_id, msg_id, *ids),
            )
            if gone.rowcount:
                return []
        applied = False
        for r in results:
            if r.state is State.DEFERRED:
                cond, next_attempt = "state = 5", r.next_attempt
            else:
                cond, next_attempt = "state IN (4, 5)", 0.0
            cur = conn.execute(
                f"UPDATE recipients SET state = ?, attempts = attempts + 1, last_code = ?,"
                f" last_reply = ?, last_mx = ?, last_attempt = ?, next_attempt = ?"
                f" WHERE id = ? AND {cond}",
                (int(r.state), r.code, r.reply, r.mx, now, next_attempt, r.rcpt_id),
            )
            applied = applied or cur.rowcount > 0
        return _settle_message(conn, msg_id, now, delay_warning) if applied else []

    return op


def _settle_message(
    conn: sqlite3.Connection, msg_id: int, now: float, delay_warning: float
) -> list[Report]:
    rows = conn.execute(
        "SELECT id, rcpt, state, last_code, last_reply, last_mx, reported FROM recipients"
        " WHERE msg_id = ?",
        (msg_id,),
    ).fetchall()
    states = {r[2] for r in rows}
    if State.ACTIVE in states or State.PENDING in states:
        return []
    due = {
        ("failed", _REPORTED_FAILED): [
            r for r in rows if r[2] == State.BOUNCED and not r[6] & _REPORTED_FAILED
        ],
        ("delayed", _REPORTED_DELAYED): [
            r
            for r in rows
            if delay_warning and r[2] == State.DEFERRED and not r[6] & _REPORTED_DELAYED
        ],
    }
    reports = []
    if any(due.values()):  # the body is read only when a DSN may be needed
        msg = conn.execute(
            "SELECT queue_id, sender, received_at, body FROM messages WHERE id = ?", (msg_id,)
        ).fetchone()
        for (kind, flag), selected in due.items():
            if not selected or (kind == "delayed" and now - msg[2] < delay_warning):
                continue
            reports.append(Report(kind, *msg, [r[1:2] + r[3:6] for r in selected]))
            conn.executemany(
                f"UPDATE recipients SET reported = reported | {flag} WHERE id = ?",
                [(r[0],) for r in selected],
            )
    if states <= set(FINAL):
        conn.execute("DELETE FROM messages WHERE id = ?", (msg_id,))
    return reports


def release_jobs(jobs: list[Job]) -> Callable[[sqlite3.Connection], None]:
    """Give jobs that were taken into memory but not attempted back to the spool."""

    def op(conn: sqlite3.Connection) -> None:
        conn.executemany(
            "UPDATE recipients SET state = CASE WHEN attempts = 0 THEN 0 ELSE 1 END"
            " WHERE id = ? AND state = 5",
            [(r.id,) for job in jobs for r in job.recipients],
        )

    return op


def control_events(after: int) -> Callable[[sqlite3.Connection], list[tuple[int, str, str]]]:
    def op(conn: sqlite3.Connection) -> list[tuple[int, str, str]]:
        return conn.execute(
            "SELECT id, action, msg_ids FROM control WHERE id > ? ORDER BY id", (after,)
        ).fetchall()

    return op


def still_active(msg_ids: set[int]) -> Callable[[sqlite3.Connection], set[int]]:
    def op(conn: sqlite3.Connection) -> set[int]:
        rows = conn.execute(
            "SELECT id FROM recipients WHERE state = 5 AND msg_id IN"
            " (SELECT value FROM json_each(?))",
            (json.dumps(sorted(msg_ids)),),
        )
        return {row[0] for row in rows}

    return op


def last_control_id(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT coalesce(max(id), 0) FROM control").fetchone()[0]
