"""Tracking's statements: the engagement counts per message and recipient (schema _V5), and
what a hit needs to know of its message: when it was delivered, and its receipt keys."""

from __future__ import annotations

import sqlite3
from typing import Any

from relayd.events.records import Type, receipt_keys
from relayd.feedback import unsubscribe

# One statement per kind: the count after this hit (1: the first, a unique one).
_COUNT = {
    kind: f"INSERT INTO engagement (queue_id, rcpt, {n}, first_{f}) VALUES (?, ?, 1, ?)"
    f" ON CONFLICT (queue_id, rcpt) DO UPDATE SET {n} = {n} + 1,"
    f" first_{f} = coalesce(first_{f}, excluded.first_{f}) RETURNING {n}"
    for kind, n, f in ((Type.OPEN, "opens", "open"), (Type.CLICK, "clicks", "click"))
}


def count(conn: sqlite3.Connection, kind: Type, queue_id: str, rcpt: str, at: float) -> int:
    """Count an open or a click of the message's recipient; its count after this one."""
    return conn.execute(_COUNT[kind], (queue_id, rcpt, at)).fetchone()[0]


def counts(conn: sqlite3.Connection, queue_id: str, rcpt: str) -> tuple[int, int] | None:
    """(opens, clicks) counted for the message's recipient; None before any."""
    row = conn.execute(
        "SELECT opens, clicks FROM engagement WHERE queue_id = ? AND rcpt = ?", (queue_id, rcpt)
    ).fetchone()
    return None if row is None else (row[0], row[1])


def delivered_at(conn: sqlite3.Connection, queue_id: str, rcpt: str) -> float | None:
    """When the message was delivered to the recipient (to its first one when ``rcpt`` is
    "": a message tracked as a whole); None when not (or its events expired)."""
    sql = "SELECT min(at) FROM events WHERE queue_id = ? AND type = ?"
    args: tuple[str, ...] = (queue_id, Type.DELIVERY.value)
    if rcpt:
        sql, args = sql + " AND rcpt = ?", (*args, rcpt)
    return conn.execute(sql, args).fetchone()[0]


def receipt(conn: sqlite3.Connection, queue_id: str) -> dict[str, Any]:
    """The message's receipt keys (envid, meta, stream): from its row while it is spooled,
    else from its `accepted` event (a message leaves the spool once delivered)."""
    row = conn.execute(
        "SELECT envid, meta, stream FROM messages WHERE queue_id = ?", (queue_id,)
    ).fetchone()
    if row is not None:
        return receipt_keys(*row)
    return unsubscribe.original(conn, queue_id).receipt
