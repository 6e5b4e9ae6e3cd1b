"""Adaptive shaping's statements: a hold opened with its ``shaping`` event, renewed, ended with
its ``shaping_ended`` event (lapsed, or cleared by relayctl), read back at start-up; mail a hold
postpones; and what relayctl shows and clears.

The daemon's scheduler calls these through the spool writer; relayctl reads on its read-only
connection and clears in its own short transaction, which also leaves the operator event that
tells the running daemon.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from relayd.config import Rate
from relayd.events.records import Event, Type
from relayd.model.message import State
from relayd.shaping.adaptive import Hold
from relayd.spool.store import append_events

CLEAR = "shaping_clear"  # the operator event's action: relayctl shaping clear
LAPSED, CLEARED = "lapsed", "cleared"  # how a hold ended

_COLUMNS = (
    "id, site, source_ip, action, rule, code, reply, factor, rate_count, rate_period,"
    " connections, since, until"
)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def open_hold(conn: sqlite3.Connection, hold: Hold) -> Event:
    """Store a new hold with the event that reports it (its ``hold`` key: the new id)."""
    rate = hold.rate
    hold_id = conn.execute(
        f"INSERT INTO holds ({_COLUMNS.removeprefix('id, ')}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
        " RETURNING id",
        (
            hold.site,
            hold.source_ip,
            hold.action,
            hold.rule,
            hold.code,
            hold.reply,
            hold.factor,
            rate.count if rate else None,
            rate.period if rate else None,
            hold.connections,
            hold.since,
            hold.until,
        ),
    ).fetchone()[0]
    data = _data(hold, hold_id) | {
        "until": iso(hold.until),
        "duration_s": round(hold.until - hold.since, 1),
        "code": hold.code,
        "response": hold.reply,
    }
    event = Event(Type.SHAPING, "", hold.since, data)
    append_events(conn, [event])
    return event


def renew(conn: sqlite3.Connection, hold_id: int, until: float) -> None:
    """A later end for a hold in force (never for one already ended, by relayctl say)."""
    conn.execute(
        "UPDATE holds SET until = max(until, ?) WHERE id = ? AND ended_at IS NULL",
        (until, hold_id),
    )


def end(conn: sqlite3.Connection, ids: Iterable[int], now: float, how: str) -> list[Event]:
    """End the holds ``ids`` still in force, each with its ``shaping_ended`` event."""
    wanted = json.dumps(sorted(set(ids)))
    found = _holds(conn, "ended_at IS NULL AND id IN (SELECT value FROM json_each(?))", (wanted,))
    conn.execute(
        "UPDATE holds SET ended_at = ?, ended = ? WHERE ended_at IS NULL"
        " AND id IN (SELECT value FROM json_each(?))",
        (now, how, wanted),
    )
    conn.execute(
        "DELETE FROM hold_domains WHERE hold_id IN (SELECT value FROM json_each(?))", (wanted,)
    )
    events = [
        Event(
            Type.SHAPING_ENDED,
            "",
            now,
            _data(h, h.id) | {"ended": how, "held_s": round(now - h.since, 1)},
        )
        for h in found
    ]
    append_events(conn, events)
    return events


def prune(conn: sqlite3.Connection, before: float, limit: int = 5000) -> int:
    """Remove a batch of holds that ended before ``before`` (their events tell the story for
    as long as the event retention keeps them; so do these rows, then)."""
    return conn.execute(
        "DELETE FROM holds WHERE id IN (SELECT id FROM holds WHERE ended_at < ? LIMIT ?)",
        (before, limit),
    ).rowcount


def active(conn: sqlite3.Connection) -> list[Hold]:
    """Every hold in force (or whose end came while relayd was stopped), oldest first."""
    return _holds(conn, "ended_at IS NULL", ())


def postpone(
    conn: sqlite3.Connection,
    rcpt_ids: list[int],
    until: float,
    hold_ids: list[int],
    domains: list[str],
) -> None:
    """Mail taken into memory that no source may send now: back to waiting, due at ``until``
    (no attempt is counted), remembered with the holds so that clearing them hurries it. When
    relayctl has just cleared one of the holds (the daemon has not read it yet), the mail is
    only given back, due as it was."""
    marks = json.dumps(hold_ids)
    still = conn.execute(
        "SELECT count(*) FROM holds WHERE ended_at IS NULL"
        " AND id IN (SELECT value FROM json_each(?))",
        (marks,),
    ).fetchone()[0]
    if still < len(hold_ids):
        until = 0.0
    conn.executemany(
        f"UPDATE recipients SET state = CASE WHEN attempts = 0 THEN {int(State.PENDING)}"
        f" ELSE {int(State.DEFERRED)} END, next_attempt = max(next_attempt, ?)"
        f" WHERE id = ? AND state = {int(State.ACTIVE)}",
        [(until, rid) for rid in rcpt_ids],
    )
    conn.executemany(
        "INSERT OR IGNORE INTO hold_domains (hold_id, domain)"
        " SELECT ?, ? WHERE EXISTS (SELECT 1 FROM holds WHERE id = ? AND ended_at IS NULL)",
        [(h, d, h) for h in hold_ids for d in domains],
    )


# -- relayctl ---------------------------------------------------------------------------------


def listing(conn: sqlite3.Connection, now: float) -> list[dict[str, Any]]:
    """The holds in force now, oldest first, as relayctl shows them."""
    rows = []
    for h in _holds(conn, "ended_at IS NULL AND until > ?", (now,)):
        row = _data(h, h.id) | {
            "since": iso(h.since),
            "until": iso(h.until),
            "remaining_s": round(h.until - now, 1),
            "code": h.code,
            "response": h.reply,
        }
        rows.append(row)
    return rows


def clear(
    conn: sqlite3.Connection, now: float, ids: list[int], site: str | None, everything: bool
) -> list[dict[str, Any]]:
    """relayctl shaping clear: end the holds in force named by id, by site, or all of them;
    the mail they postponed is due at once; an operator event tells the running daemon."""
    if everything:
        where, args = "ended_at IS NULL", ()
    elif site is not None:
        where, args = "ended_at IS NULL AND site = ?", (site,)
    else:
        where = "ended_at IS NULL AND id IN (SELECT value FROM json_each(?))"
        args = (json.dumps(ids),)
    found = _holds(conn, where, args)
    if not found:
        return []
    hold_ids = [h.id for h in found]
    latest = max(h.until for h in found)
    marks = json.dumps(hold_ids)
    waiting = f"({int(State.PENDING)}, {int(State.DEFERRED)})"
    conn.execute(
        f"UPDATE recipients SET next_attempt = ? WHERE state IN {waiting}"
        " AND next_attempt > ? AND next_attempt <= ? AND domain IN"
        " (SELECT domain FROM hold_domains WHERE hold_id IN (SELECT value FROM json_each(?)))",
        (now, now, latest, marks),
    )
    end(conn, hold_ids, now, CLEARED)
    request = {"action": CLEAR, "holds": hold_ids}
    append_events(conn, [Event(Type.OPERATOR, "", now, request)])
    return [_data(h, h.id) | {"until": iso(h.until)} for h in found]


# -- rows -------------------------------------------------------------------------------------


def _holds(conn: sqlite3.Connection, where: str, args: tuple) -> list[Hold]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM holds WHERE {where} ORDER BY id", args)
    found = []
    for r in rows:
        rate = Rate(r[8], r[9]) if r[8] is not None else None
        found.append(
            Hold(r[1], r[2], r[3], r[4], r[5], r[6], r[11], r[12], r[7], rate, r[10], r[0])
        )
    return found


def _data(hold: Hold, hold_id: int) -> dict[str, Any]:
    data = hold.data()
    data["hold"] = hold_id
    return data
