"""The warm-up's state in the spool (tables ``warmup`` and ``warmup_sources``, see schema._V4):
the day's count per source address and provider, the day each address was first seen in
warm-up, and the finished warm-ups a ``warmed`` event has reported.

The scheduler reads it at start (``load``) and writes what changed about every second and when
it stops (``save``), through the spool writer; relayctl reads it (``load`` on its read-only
connection writes nothing when given no addresses).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from relayd.events.records import Event, Type
from relayd.spool.store import append_events

Count = tuple[str, str, int]  # (source address, provider, sent that day)


@dataclass
class Stored:
    counts: list[Count]  # of the day asked about
    first_seen: dict[str, date]
    reported: dict[str, str]  # address -> the warm-up its `warmed` event reported
    events: list[Event] = field(default_factory=list)  # `warmed`, now durable


def load(conn: sqlite3.Connection, day: date, seen: Mapping[str, date]) -> Stored:
    """The day's counts and every address's first day; ``seen`` records the addresses in
    warm-up now (an address already recorded keeps its first day)."""
    _remember(conn, seen)
    counts = conn.execute(
        "SELECT ip, provider, sent FROM warmup WHERE day = ? ORDER BY ip, provider",
        (day.isoformat(),),
    ).fetchall()
    return Stored([(ip, p, n) for ip, p, n in counts], *_sources(conn))


def save(
    conn: sqlite3.Connection,
    day: date,
    seen: Mapping[str, date],
    counts: Iterable[Count],
    finished: Iterable[tuple[str, str, dict[str, Any]]],
    now: float,
) -> Stored:
    """The counts changed (a count only grows within its day), earlier days' counts removed,
    and a ``warmed`` event for each of ``finished`` (address, warm-up, event data)."""
    _remember(conn, seen)
    conn.executemany(
        "INSERT INTO warmup (ip, provider, day, sent) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (ip, provider, day) DO UPDATE SET sent = max(sent, excluded.sent)",
        [(ip, provider, day.isoformat(), sent) for ip, provider, sent in counts],
    )
    conn.execute("DELETE FROM warmup WHERE day < ?", (day.isoformat(),))
    events = []
    for ip, key, data in finished:
        done = conn.execute(
            "UPDATE warmup_sources SET warmed = ? WHERE ip = ? AND warmed != ?", (key, ip, key)
        )
        if done.rowcount:  # reported once, however many saves saw it finish
            events.append(Event(Type.WARMED, "", now, data))
    append_events(conn, events)
    return Stored([], *_sources(conn), events)


def _remember(conn: sqlite3.Connection, seen: Mapping[str, date]) -> None:
    if not seen:  # relayctl's read-only connection, too
        return
    conn.executemany(
        "INSERT INTO warmup_sources (ip, first_seen) VALUES (?, ?) ON CONFLICT (ip) DO NOTHING",
        [(ip, day.isoformat()) for ip, day in seen.items()],
    )


def _sources(conn: sqlite3.Connection) -> tuple[dict[str, date], dict[str, str]]:
    first_seen, reported = {}, {}
    for ip, day, warmed in conn.execute("SELECT ip, first_seen, warmed FROM warmup_sources"):
        first_seen[ip] = date.fromisoformat(day)
        if warmed:
            reported[ip] = warmed
    return first_seen, reported
