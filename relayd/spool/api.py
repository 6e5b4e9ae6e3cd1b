"""The HTTP API's statements: idempotency records, a message's status, the event log. The
reads run on a read-only connection in the ingress process (SQLite's WAL lets them run beside
the queue process's writer); the idempotency record is written in the transaction of the
messages it answers for."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from relayd.model.message import Answer, Guard

IDEMPOTENCY_TIME = 24 * 3600.0  # a key's first answer is given again for this long
STATES = {0: "queued", 1: "deferred", 2: "delivered", 3: "bounced", 4: "held", 5: "sending"}


def idempotent(conn: sqlite3.Connection, guard: Guard, now: float) -> Answer | None:
    """In the transaction of the request's messages: None when the key is new (now recorded,
    with the answer), or what to answer instead of storing them again."""
    credential, key, digest, answer = guard
    found = earlier(conn, credential, key, digest, now)
    if found is not None:
        return found
    conn.execute(
        "INSERT OR REPLACE INTO idempotency (credential, key, digest, response, at)"
        " VALUES (?,?,?,?,?)",
        (credential, key, digest, answer, now),
    )
    return None


def earlier(
    conn: sqlite3.Connection, credential: str, key: str, digest: str, now: float
) -> Answer | None:
    """The answer already given to this key within a day: ("replay", it) for the same request,
    ("conflict", "") for another one; None when the key is new."""
    row = conn.execute(
        "SELECT digest, response FROM idempotency WHERE credential = ? AND key = ? AND at > ?",
        (credential, key, now - IDEMPOTENCY_TIME),
    ).fetchone()
    if row is None:
        return None
    return ("replay", row[1]) if row[0] == digest else ("conflict", "")


def prune_idempotency(conn: sqlite3.Connection, now: float) -> int:
    cur = conn.execute("DELETE FROM idempotency WHERE at <= ?", (now - IDEMPOTENCY_TIME,))
    return cur.rowcount


def message_status(conn: sqlite3.Connection, queue_id: str) -> dict[str, Any] | None:
    """What is known of a message: its envelope and recipients while it is spooled, and its
    events (reception, every attempt, bounces, DSNs) as long as they are kept."""
    events = [
        _event(r)
        for r in conn.execute(
            "SELECT id, at, type, queue_id, data FROM events WHERE queue_id = ? ORDER BY id",
            (queue_id,),
        )
    ]
    msg = conn.execute(
        "SELECT id, sender, received_at, size, origin, meta FROM messages WHERE queue_id = ?",
        (queue_id,),
    ).fetchone()
    if msg is None and not events:
        return None
    spooled = {}
    if msg is not None:
        for rcpt, state, attempts, next_attempt, code, reply in conn.execute(
            "SELECT rcpt, state, attempts, next_attempt, last_code, last_reply FROM recipients"
            " WHERE msg_id = ? ORDER BY id",
            (msg[0],),
        ):
            spooled[rcpt] = {
                "state": STATES.get(state, str(state)),
                "attempts": attempts,
                "next_attempt": next_attempt if state in (0, 1) else None,  # epoch s
                "last_code": code,
                "last_response": reply,
            }
    return {"queue_id": queue_id, "message": msg, "spooled": spooled, "events": events}


def events_after(
    conn: sqlite3.Connection, after: int, types: list[str], rcpt: str | None, limit: int
) -> list[dict[str, Any]]:
    """The event log after ``after`` (an event id: a cursor that stays valid), oldest first."""
    where, args = ["id > ?"], [after]
    if types:
        where.append(f"type IN ({','.join('?' * len(types))})")
        args += types
    if rcpt is not None:
        where.append("rcpt = ?")
        args.append(rcpt)
    rows = conn.execute(
        f"SELECT id, at, type, queue_id, data FROM events WHERE {' AND '.join(where)}"
        " ORDER BY id LIMIT ?",
        (*args, limit),
    )
    return [_event(r) for r in rows]


def _event(row: tuple) -> dict[str, Any]:
    event_id, at, kind, queue_id, data = row
    return {"id": event_id, "at": at, "type": kind, "queue_id": queue_id, **json.loads(data)}
