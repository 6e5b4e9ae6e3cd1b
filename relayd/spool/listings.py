"""The blacklist watch's statements: its answers recorded (a listing opened or closed with the
event that reports it, in one transaction), what relayctl shows of them, and relayctl's request
for a check now.

The daemon's watch calls ``record`` and ``listed`` through the spool writer; relayctl reads on
its read-only connection and writes its request in its own short transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from relayd.events.records import Event, Type
from relayd.spool.store import append_events

LISTED, CLEAN, ERROR = "listed", "clean", "error"  # what one zone answered about one address
CHECK = "ip_check"  # the operator event's action: relayctl ip check

Row = dict[str, Any]


@dataclass(frozen=True)
class Check:
    """One zone's answer about one source address. ``answer``: the A records of a listing (or
    the unusable answer of an error); ``reason``: the zone's TXT for a listing, what went wrong
    for an error."""

    ip: str
    zone: str
    status: str  # LISTED, CLEAN or ERROR
    answer: str = ""
    reason: str = ""


@dataclass
class Recorded:
    events: list[Event] = field(default_factory=list)  # blacklisted / delisted, now durable
    listed: set[tuple[str, str]] = field(default_factory=set)  # (ip, zone) listed after this
    errors: dict[tuple[str, str], int] = field(default_factory=dict)  # errors in a row


def record(
    conn: sqlite3.Connection,
    checks: Iterable[Check],
    now: float,
    context: Mapping[str, Mapping[str, Any]],
) -> Recorded:
    """A round's answers. A listing not yet open opens (``blacklisted``), an open one is
    confirmed, a clean answer closes one (``delisted``); an error changes no listing, it only
    counts. ``context``: more keys for an address's events (its pools, the configured action)."""
    done = Recorded()
    for c in checks:
        if c.status == ERROR:
            done.errors[(c.ip, c.zone)] = conn.execute(
                "INSERT INTO listing_checks (ip, zone, checked_at, errors, error)"
                " VALUES (?,?,?,1,?) ON CONFLICT (ip, zone) DO UPDATE SET"
                " checked_at = excluded.checked_at, errors = errors + 1, error = excluded.error"
                " RETURNING errors",
                (c.ip, c.zone, now, c.reason),
            ).fetchone()[0]
            continue
        conn.execute(
            "INSERT INTO listing_checks (ip, zone, status, answered_at, checked_at)"
            " VALUES (?,?,?,?,?) ON CONFLICT (ip, zone) DO UPDATE SET status = excluded.status,"
            " answered_at = excluded.answered_at, checked_at = excluded.checked_at,"
            " errors = 0, error = ''",
            (c.ip, c.zone, c.status, now, now),
        )
        episode = conn.execute(
            "SELECT id, answer, reason, listed_at FROM listings"
            " WHERE ip = ? AND zone = ? AND delisted_at IS NULL",
            (c.ip, c.zone),
        ).fetchone()
        keys = {"source_ip": c.ip, "zone": c.zone}
        extra = dict(context.get(c.ip, {}))
        if c.status == LISTED and episode is None:
            conn.execute(
                "INSERT INTO listings (ip, zone, answer, reason, listed_at, checked_at)"
                " VALUES (?,?,?,?,?,?)",
                (c.ip, c.zone, c.answer, c.reason, now, now),
            )
            data = keys | {"answer": c.answer, "reason": c.reason} | extra
            done.events.append(Event(Type.LISTING, "", now, data))
        elif c.status == LISTED:
            conn.execute(
                "UPDATE listings SET answer = ?, reason = ?, checked_at = ? WHERE id = ?",
                (c.answer, c.reason, now, episode[0]),
            )
        elif episode is not None:
            listing_id, answer, reason, listed_at = episode
            conn.execute(
                "UPDATE listings SET delisted_at = ?, checked_at = ? WHERE id = ?",
                (now, now, listing_id),
            )
            data = keys | {"answer": answer, "reason": reason} | extra
            data["listed_s"] = round(now - listed_at, 1)
            done.events.append(Event(Type.DELISTING, "", now, data))
    append_events(conn, done.events)
    done.listed = listed(conn)
    return done


def listed(conn: sqlite3.Connection) -> set[tuple[str, str]]:
    """(ip, zone) of every listing still open."""
    return set(conn.execute("SELECT ip, zone FROM listings WHERE delisted_at IS NULL"))


def request_check(conn: sqlite3.Connection, ips: list[str], now: float) -> None:
    """relayctl ip check: the daemon checks these addresses (all when empty) at once."""
    append_events(conn, [Event(Type.OPERATOR, "", now, {"action": CHECK, "ips": ips})])


# -- what relayctl shows --------------------------------------------------------------------


def checks(conn: sqlite3.Connection) -> dict[tuple[str, str], Row]:
    """The last look at each (ip, zone), with its open listing's answer, reason and start."""
    cur = conn.execute(
        "SELECT c.ip, c.zone, c.status, c.answered_at, c.checked_at, c.errors, c.error,"
        " l.answer, l.reason, l.listed_at FROM listing_checks c LEFT JOIN listings l"
        " ON l.ip = c.ip AND l.zone = c.zone AND l.delisted_at IS NULL"
    )
    names = [d[0] for d in cur.description]
    return {(r[0], r[1]): dict(zip(names, r, strict=True)) for r in cur.fetchall()}


def history(conn: sqlite3.Connection, ip: str) -> list[Row]:
    """Every listing of ``ip``, oldest first."""
    cur = conn.execute(
        "SELECT zone, answer, reason, listed_at, checked_at, delisted_at FROM listings"
        " WHERE ip = ? ORDER BY listed_at, id",
        (ip,),
    )
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
