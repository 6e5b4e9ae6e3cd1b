"""The webhook endpoints' statements: the changes relayctl and the HTTP API make (add, remove,
rotate, enable, disable), the health they show, and the dispatcher's reads and updates.

Plain functions on a ``sqlite3.Connection``: relayctl and the API call the changing ones in
their own short write transaction, the daemon's dispatcher reads on its read-only connection and
writes through the spool writer. The dispatcher looks at this table every poll interval, so a
change needs no signal to the daemon.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any

ALL = "*"  # an endpoint's events: every type
_COLUMNS = (
    "id, url, events, secrets, batch, concurrency, timeout, created, cursor, sent, failures,"
    " failing_since, next_try, last_status, last_try, last_success, disabled, dropped"
)
# An event matches an endpoint: its events are '*' or a comma list holding the event's type.
_MATCH = "(w.events = '*' OR instr(',' || w.events || ',', ',' || e.type || ','))"


class Exists(Exception):
    """An endpoint with that URL is already there."""


@dataclass
class Endpoint:
    id: int
    url: str
    events: str
    secrets: list[tuple[str, float | None]]  # (whsec_..., until), newest first
    batch: int
    concurrency: int
    timeout: float
    created: float
    cursor: int
    sent: int
    failures: int
    failing_since: float | None
    next_try: float
    last_status: str
    last_try: float | None
    last_success: float | None
    disabled: str
    dropped: int
    types: frozenset[str] | None = field(init=False)  # None: every type

    def __post_init__(self) -> None:
        self.types = None if self.events == ALL else frozenset(self.events.split(","))

    def signing(self, now: float) -> list[str]:
        """The secrets that sign now: the newest, and rotated-out ones still in their overlap."""
        return [s for s, until in self.secrets if until is None or until > now]


@dataclass
class Pending:
    """Events after an endpoint's cursor, read in one snapshot."""

    rows: list[tuple[int, float, str, str, dict[str, Any]]]  # id, at, type, queue_id, data
    horizon: int  # every event up to here was looked at: the cursor once these are sent


def _endpoint(row: tuple[Any, ...]) -> Endpoint:
    values = list(row)
    values[3] = [(s, until) for s, until in json.loads(values[3])]
    return Endpoint(*values)


def add(
    conn: sqlite3.Connection,
    url: str,
    events: str,
    secret: str,
    batch: int,
    concurrency: int,
    timeout: float,
    now: float,
) -> Endpoint:
    """A new endpoint receives the events from now on (not the retained history): its cursor
    starts at the newest event."""
    try:
        cur = conn.execute(
            "INSERT INTO webhooks (url, events, secrets, batch, concurrency, timeout, created,"
            " cursor) VALUES (?,?,?,?,?,?,?, (SELECT coalesce(max(id), 0) FROM events))",
            (url, events, json.dumps([[secret, None]]), batch, concurrency, timeout, now),
        )
    except sqlite3.IntegrityError:
        raise Exists(url) from None
    found = get(conn, cur.lastrowid or 0)
    assert found is not None
    return found


def get(conn: sqlite3.Connection, endpoint_id: int) -> Endpoint | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM webhooks WHERE id = ?", (endpoint_id,)).fetchone()
    return None if row is None else _endpoint(row)


def find(conn: sqlite3.Connection, ref: str) -> Endpoint | None:
    """By id (digits) or by URL."""
    if ref.isdigit():
        return get(conn, int(ref))
    row = conn.execute(f"SELECT {_COLUMNS} FROM webhooks WHERE url = ?", (ref,)).fetchone()
    return None if row is None else _endpoint(row)


def endpoints(conn: sqlite3.Connection) -> list[Endpoint]:
    return [_endpoint(r) for r in conn.execute(f"SELECT {_COLUMNS} FROM webhooks ORDER BY id")]


def backlog(conn: sqlite3.Connection, endpoint_id: int) -> int:
    """Retained events after the endpoint's cursor that it subscribes to: what it is owed."""
    return conn.execute(
        f"SELECT count(*) FROM webhooks w JOIN events e ON e.id > w.cursor"
        f" WHERE w.id = ? AND {_MATCH}",
        (endpoint_id,),
    ).fetchone()[0]


def remove(conn: sqlite3.Connection, endpoint_id: int) -> bool:
    return conn.execute("DELETE FROM webhooks WHERE id = ?", (endpoint_id,)).rowcount > 0


def set_secrets(
    conn: sqlite3.Connection, endpoint_id: int, secrets: list[tuple[str, float | None]]
) -> None:
    conn.execute(
        "UPDATE webhooks SET secrets = ? WHERE id = ?",
        (json.dumps([list(s) for s in secrets]), endpoint_id),
    )


def enable(conn: sqlite3.Connection, endpoint_id: int, from_now: bool) -> None:
    """Back on, with a clean failure record; from its cursor (what is still retained), or from
    the newest event when ``from_now``."""
    skip = ", cursor = max(cursor, (SELECT coalesce(max(id), 0) FROM events))" if from_now else ""
    conn.execute(
        f"UPDATE webhooks SET disabled = '', failures = 0, failing_since = NULL, next_try = 0"
        f"{skip} WHERE id = ?",
        (endpoint_id,),
    )


def disable(conn: sqlite3.Connection, endpoint_id: int, reason: str) -> None:
    conn.execute("UPDATE webhooks SET disabled = ? WHERE id = ?", (reason, endpoint_id))


# -- the dispatcher ---------------------------------------------------------------------


def pending(
    conn: sqlite3.Connection, cursor: int, types: frozenset[str] | None, limit: int
) -> Pending:
    """Up to ``limit`` events after ``cursor`` of the given types, oldest first, and how far the
    read looked. Ids are given in commit order (one writer at a time, each new row the largest
    id), so no event can later appear below the horizon of a consistent snapshot."""
    conn.execute("BEGIN")
    try:
        newest = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
        if types is None:
            found = conn.execute(
                "SELECT id, at, type, queue_id, data FROM events WHERE id > ? ORDER BY id LIMIT ?",
                (cursor, limit),
            ).fetchall()
        else:
            found = conn.execute(
                "SELECT id, at, type, queue_id, data FROM events WHERE id > ?"
                " AND type IN (SELECT value FROM json_each(?)) ORDER BY id LIMIT ?",
                (cursor, json.dumps(sorted(types)), limit),
            ).fetchall()
    finally:
        conn.execute("COMMIT")
    rows = [(i, at, t, q, json.loads(d)) for i, at, t, q, d in found]
    horizon = rows[-1][0] if len(rows) == limit else max(newest, cursor)
    return Pending(rows, horizon)


@dataclass
class Progress:
    """What one round of POSTs to an endpoint changed."""

    endpoint_id: int
    cursor: int
    sent: int  # events acknowledged in the round
    failures: int
    failing_since: float | None
    next_try: float
    last_status: str
    last_try: float | None
    success: float | None  # when the round had a 2xx reply
    disabled: str


def record(conn: sqlite3.Connection, p: Progress) -> None:
    """The cursor only moves forward (an operator's ``enable --from-now`` may have moved it
    further meanwhile); a disable by the operator meanwhile is kept."""
    conn.execute(
        "UPDATE webhooks SET cursor = max(cursor, ?), sent = sent + ?, failures = ?,"
        " failing_since = ?, next_try = ?, last_status = ?, last_try = coalesce(?, last_try),"
        " last_success = coalesce(?, last_success),"
        " disabled = CASE WHEN disabled = '' THEN ? ELSE disabled END WHERE id = ?",
        (
            p.cursor,
            p.sent,
            p.failures,
            p.failing_since,
            p.next_try,
            p.last_status,
            p.last_try,
            p.success,
            p.disabled,
            p.endpoint_id,
        ),
    )


def count_dropped(conn: sqlite3.Connection, doomed: str, params: tuple[Any, ...]) -> None:
    """Before the retention deletes the events ``doomed`` selects (a condition on ``e``): each
    enabled endpoint counts those it subscribes to and has not yet received. In the
    transaction of the delete."""
    conn.execute(
        f"UPDATE webhooks AS w SET dropped = dropped + (SELECT count(*) FROM events e"
        f" WHERE {doomed} AND e.id > w.cursor AND {_MATCH}) WHERE w.disabled = ''",
        params,
    )
