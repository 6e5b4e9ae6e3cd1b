"""The HTTP API's statements: idempotency records, a message's status, the event log."""

from __future__ import annotations

import sqlite3

from relayd.model.message import Answer, Guard

IDEMPOTENCY_TIME = 24 * 3600.0  # a key's first answer is given again for this long


def idempotent(conn: sqlite3.Connection, guard: Guard, now: float) -> Answer | None:
    """In the transaction of the request's messages: None when the key is new (now recorded,
    with the answer), or what to answer instead of storing them again."""
    credential, key, digest, answer = guard
    row = conn.execute(
        "SELECT digest, response FROM idempotency WHERE credential = ? AND key = ? AND at > ?",
        (credential, key, now - IDEMPOTENCY_TIME),
    ).fetchone()
    if row is not None:
        return ("replay", row[1]) if row[0] == digest else ("conflict", "")
    conn.execute(
        "INSERT OR REPLACE INTO idempotency (credential, key, digest, response, at)"
        " VALUES (?,?,?,?,?)",
        (credential, key, digest, answer, now),
    )
    return None


def prune_idempotency(conn: sqlite3.Connection, now: float) -> int:
    cur = conn.execute("DELETE FROM idempotency WHERE at <= ?", (now - IDEMPOTENCY_TIME,))
    return cur.rowcount
