"""The daemon's spool operations. Each takes the writer's connection and runs inside its group
transaction; operations that belong together (an attempt's states, the DSN it owes, the events
that report them) are called from one function so that they commit together or not at all."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import msgspec

from relayd.events.records import Event
from relayd.model.address import domain_of
from relayd.model.message import BULK, Job, NewMessage, Recipient, Result, State
from relayd.spool import webhooks
from relayd.spool.schema import OWED

_encode = msgspec.json.Encoder().encode  # the events' data, as JSON text

T = TypeVar("T")

# Texts larger than this are written into a zeroblob in pieces: SQLite would otherwise build
# the whole row (one more copy of the text) in memory before writing it.
BLOB_PIECES = 1 << 20


@dataclass
class Row:
    """A recipient of a message being settled."""

    id: int
    rcpt: str
    state: State
    code: int | None
    reply: str | None
    mx: str | None
    reported: int
    notify: int = 0
    orcpt: str | None = None


class Original(NamedTuple):
    """What a DSN reports of the message it is about."""

    queue_id: str
    sender: str
    received_at: float
    envid: str | None
    ret: str
    meta: str


def insert_message(conn: sqlite3.Connection, msg: NewMessage, now: float) -> NewMessage:
    """The message, its recipient rows, PENDING (or ACTIVE when the scheduler took it)."""
    size = len(msg.body)
    pieces = size > BLOB_PIECES
    cur = conn.execute(
        "INSERT INTO messages (queue_id, sender, received_at, size, client, helo, origin,"
        " smtputf8, envid, ret, meta, stream, body)"
        f" VALUES (?,?,?,?,?,?,?,?,?,?,?,?,{'zeroblob(?)' if pieces else '?'})",
        (
            msg.queue_id,
            msg.sender,
            msg.received_at,
            size,
            msg.client,
            msg.helo,
            msg.origin,
            int(msg.smtputf8),
            msg.envid,
            msg.ret,
            msg.meta,
            msg.stream,
            size if pieces else msg.body,
        ),
    )
    msg.msg_id = cur.lastrowid or 0
    if pieces:
        with conn.blobopen("messages", "body", msg.msg_id) as blob, memoryview(msg.body) as text:
            for start in range(0, size, BLOB_PIECES):
                blob.write(text[start : start + BLOB_PIECES])
    state = State.ACTIVE if msg.active else State.PENDING
    due = max(now, msg.send_at)
    notify = msg.notify or [0] * len(msg.recipients)
    orcpt = msg.orcpt or [None] * len(msg.recipients)
    bulk = int(msg.stream == BULK)
    msg.ids = []
    for rcpt, flags, original in zip(msg.recipients, notify, orcpt, strict=True):
        cur = conn.execute(
            "INSERT INTO recipients (msg_id, rcpt, domain, state, next_attempt, notify, orcpt,"
            " bulk) VALUES (?,?,?,?,?,?,?,?)",
            (msg.msg_id, rcpt, domain_of(rcpt), int(state), due, flags, original, bulk),
        )
        msg.ids.append(cur.lastrowid or 0)
    return msg


def campaign_send(
    conn: sqlite3.Connection, campaign: tuple[int, int, str], queue_id: str, queued: bool
) -> None:
    """A campaign's contact, queued (or found suppressed) in this transaction: see _V5."""
    conn.execute(
        "INSERT INTO campaign_sends (campaign_id, contact_id, variant, queue_id, status)"
        " VALUES (?,?,?,?,?)",
        (*campaign, queue_id, "queued" if queued else "suppressed"),
    )


def append_events(conn: sqlite3.Connection, events: Iterable[Event]) -> None:
    """Into the outbox, in the transaction of the change they report."""
    conn.executemany(
        "INSERT INTO events (at, type, queue_id, rcpt, data) VALUES (?,?,?,?,?)",
        [(e.at, e.type, e.queue_id, e.rcpt, _encode(e.data).decode()) for e in events],
    )


def reset_active(conn: sqlite3.Connection) -> int:
    """At start-up: whatever was in the last process's memory goes back to waiting."""
    cur = conn.execute(
        "UPDATE recipients SET state = CASE WHEN attempts = 0 THEN 0 ELSE 1 END WHERE state = 5"
    )
    return cur.rowcount


# What the loader takes first: (bulk, state) in the order of the due indexes' keys.
_LOAD_ORDER = [(b, s) for b in (0, 1) for s in (State.PENDING, State.DEFERRED)]


def load_due(
    conn: sqlite3.Connection,
    now: float,
    limit: int,
    retry_limit: int,
    bulk_limit: int | None = None,
) -> tuple[list[Job], bool]:
    """Take due recipients into memory, marking them ACTIVE so the next load skips them:
    transactional mail before bulk mail (at most ``bulk_limit`` of it), so that a bulk backlog
    cannot keep transactional mail in the spool; in each stream never-tried mail first (retries:
    at most ``retry_limit``), so that a deferred backlog cannot starve new mail. Also says
    whether a limit was reached (more may be due). No ``bulk_limit``: as ``limit``."""
    bulk_limit = limit if bulk_limit is None else bulk_limit
    rows: list[tuple] = []
    more = False
    retries = bulk = 0
    for lane, state in _LOAD_ORDER:
        cap = limit - len(rows)
        if state is State.DEFERRED:
            cap = min(cap, retry_limit - retries)
        if lane:
            cap = min(cap, bulk_limit - bulk)
        if cap <= 0:
            more = True
            continue
        found = conn.execute(
            f"SELECT id, msg_id, rcpt, domain, attempts, notify, orcpt FROM recipients "
            f"WHERE state = {int(state)} AND bulk = {lane} AND next_attempt <= ? "
            f"ORDER BY next_attempt LIMIT ?",
            (now, cap),
        ).fetchall()
        more = more or len(found) == cap
        retries += len(found) if state is State.DEFERRED else 0
        bulk += len(found) * lane
        rows += found
    if not rows:
        return [], more
    conn.executemany("UPDATE recipients SET state = 5 WHERE id = ?", [(r[0],) for r in rows])
    return _jobs(conn, rows), more


def _jobs(conn: sqlite3.Connection, rows: list[tuple]) -> list[Job]:
    msg_ids = sorted({r[1] for r in rows})
    messages: dict[int, tuple] = {}
    for chunk in chunks(msg_ids, 500):
        marks = ",".join("?" * len(chunk))
        for m in conn.execute(
            f"SELECT id, queue_id, sender, received_at, smtputf8, size, envid, meta, stream"
            f" FROM messages "
            f"WHERE id IN ({marks})",
            chunk,
        ):
            messages[m[0]] = m
    jobs: dict[tuple[int, str], Job] = {}
    for rid, msg_id, rcpt, domain, attempts, notify, orcpt in rows:
        m = messages[msg_id]
        job = jobs.get((msg_id, domain))
        if job is None:
            job = jobs[(msg_id, domain)] = Job(
                msg_id, m[1], m[2], domain, m[3], bool(m[4]), None, [], m[5], m[6], m[7], m[8]
            )
        job.recipients.append(Recipient(rid, rcpt, attempts, notify, orcpt))
    return list(jobs.values())


def chunks(items: list[T], size: int) -> Iterable[list[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def apply_results(conn: sqlite3.Connection, msg_id: int, results: list[Result], now: float) -> str:
    """Store an attempt's outcomes: "gone" when the message left the spool with them (every
    recipient delivered: one DELETE, the common case), "applied", or "stale" when none
    applied. A result only applies to a recipient still ACTIVE (or HELD, for final outcomes),
    so an operator's delete or hold during the attempt wins over it. A recipient that asked
    for a success DSN (NOTIFY=SUCCESS, flag 1) keeps the message for settling."""
    if all(r.state is State.DELIVERED for r in results):
        ids = [r.rcpt_id for r in results]
        gone = conn.execute(
            f"DELETE FROM messages WHERE id = ? AND NOT EXISTS (SELECT 1 FROM recipients"
            f" WHERE msg_id = ? AND (id NOT IN ({','.join('?' * len(ids))}) OR notify & 1))",
            (msg_id, msg_id, *ids),
        )
        if gone.rowcount:
            return "gone"
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
    return "applied" if applied else "stale"


def recipients_of(conn: sqlite3.Connection, msg_id: int) -> list[Row]:
    return [
        Row(r[0], r[1], State(r[2]), r[3], r[4], r[5], r[6], r[7], r[8])
        for r in conn.execute(
            "SELECT id, rcpt, state, last_code, last_reply, last_mx, reported, notify, orcpt"
            " FROM recipients WHERE msg_id = ?",
            (msg_id,),
        )
    ]


def original(conn: sqlite3.Connection, msg_id: int) -> Original | None:
    """What a DSN reports of a message: queue id, sender, arrival, ENVID, RET, metadata."""
    row = conn.execute(
        "SELECT queue_id, sender, received_at, envid, ret, meta FROM messages WHERE id = ?",
        (msg_id,),
    ).fetchone()
    return None if row is None else Original(*row)


def origin_of(conn: sqlite3.Connection, msg_id: int) -> str:
    """Who vouched for a message (NewMessage.origin); "" once it has left the spool."""
    row = conn.execute("SELECT origin FROM messages WHERE id = ?", (msg_id,)).fetchone()
    return row[0] if row else ""


def body_of(conn: sqlite3.Connection, msg_id: int) -> bytes:
    return conn.execute("SELECT body FROM messages WHERE id = ?", (msg_id,)).fetchone()[0]


def text_of(conn: sqlite3.Connection, msg_id: int) -> bytes | None:
    """A message's text, whole; None when the message is gone."""
    row = conn.execute("SELECT body FROM messages WHERE id = ?", (msg_id,)).fetchone()
    return None if row is None else row[0]


def open_body(conn: sqlite3.Connection, msg_id: int) -> sqlite3.Blob | None:
    """A read-only handle on a message's text, for reading it in pieces (delivery streams
    large texts from here instead of holding them); None when the message is gone."""
    try:
        return conn.blobopen("messages", "body", msg_id, readonly=True)
    except sqlite3.OperationalError:  # no such row: an operator deleted it meanwhile
        return None


def mark_reported(conn: sqlite3.Connection, rcpt_ids: list[int], flag: int) -> None:
    conn.executemany(
        f"UPDATE recipients SET reported = reported | {flag} WHERE id = ?",
        [(i,) for i in rcpt_ids],
    )


def delete_message(conn: sqlite3.Connection, msg_id: int) -> None:
    conn.execute("DELETE FROM messages WHERE id = ?", (msg_id,))


def owing(conn: sqlite3.Connection) -> list[int]:
    """Messages with a bounce whose DSN is still owed (relayctl deleted the rest meanwhile, or
    a relayd stopped before settling them)."""
    return [r[0] for r in conn.execute(f"SELECT DISTINCT msg_id FROM recipients WHERE {OWED}")]


def release_jobs(conn: sqlite3.Connection, jobs: list[Job]) -> None:
    """Give jobs that were taken into memory but not attempted back to the spool."""
    conn.executemany(
        "UPDATE recipients SET state = CASE WHEN attempts = 0 THEN 0 ELSE 1 END"
        " WHERE id = ? AND state = 5",
        [(r.id,) for job in jobs for r in job.recipients],
    )


def operator_events(conn: sqlite3.Connection, after: int) -> list[Event]:
    """relayctl's actions since event ``after``, oldest first."""
    return [
        Event(r[1], r[2], r[3], json.loads(r[4]), r[0])
        for r in conn.execute(
            "SELECT id, type, queue_id, at, data FROM events WHERE type = 'operator' AND id > ?"
            " ORDER BY id",
            (after,),
        )
    ]


def last_event_id(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]


def still_active(conn: sqlite3.Connection, msg_ids: set[int]) -> set[int]:
    rows = conn.execute(
        "SELECT id FROM recipients WHERE state = 5 AND msg_id IN (SELECT value FROM json_each(?))",
        (json.dumps(sorted(msg_ids)),),
    )
    return {row[0] for row in rows}


def prune_events(conn: sqlite3.Connection, before: float, limit: int = 5000) -> int:
    """Drop up to ``limit`` of the oldest events older than ``before`` (the retention). Ids
    grow with time, so the oldest rows are found from the start of the table. The newest event
    always stays, so that ids never start again from 1 (a webhook cursor, the API's event
    cursor, would then skip new events). What enabled webhook endpoints had not yet received is
    counted in their ``dropped``, in this transaction."""
    doomed = (
        "e.id IN (SELECT id FROM events ORDER BY id LIMIT ?) AND e.at < ?"
        " AND e.id < (SELECT max(id) FROM events)"
    )
    webhooks.count_dropped(conn, doomed, (limit, before))
    cur = conn.execute(f"DELETE FROM events AS e WHERE {doomed}", (limit, before))
    return cur.rowcount
