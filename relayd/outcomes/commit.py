"""The one transaction after an attempt: the recipients' new states, the DSN each event owes
(inserted through intake's door) and the events that report all of it commit together. A crash
at any instant leaves either none of it or all of it: no bounce without its DSN."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from relayd.events.records import Event, Type
from relayd.model.message import REPORTED_DELAYED, REPORTED_FAILED, Report, Result, State
from relayd.outcomes.decide import owed
from relayd.spool import store

# Intake's door for a DSN inside a transaction: stores the report's message, returns its
# events (the reception).
DsnDoor = Callable[[sqlite3.Connection, Report, float], list[Event]]


@dataclass
class Committed:
    """What the transaction stored: the events to log now it is durable, the DSNs queued."""

    events: list[Event]
    dsns: int = 0


def attempt(
    msg_id: int,
    results: list[Result],
    events: list[Event],
    now: float,
    delay_warning: float,
    dsn: DsnDoor,
) -> Callable[[sqlite3.Connection], Committed]:
    """The writer operation for one attempt of message ``msg_id``. Its events are kept even
    when an operator's delete or hold won over the results: the remote server did answer."""

    def op(conn: sqlite3.Connection) -> Committed:
        done = Committed(list(events))
        store.append_events(conn, events)
        if store.apply_results(conn, msg_id, results, now) != "gone":
            settle(conn, msg_id, now, delay_warning, dsn, done)
        return done

    return op


def settle_op(
    msg_ids: list[int], now: float, delay_warning: float, dsn: DsnDoor
) -> Callable[[sqlite3.Connection], Committed]:
    """Settle messages without an attempt (relayctl removed their last unfinished recipients
    while a DSN was owed, or a relayd stopped before settling them)."""

    def op(conn: sqlite3.Connection) -> Committed:
        done = Committed([])
        for msg_id in msg_ids:
            settle(conn, msg_id, now, delay_warning, dsn, done)
        return done

    return op


def settle(
    conn: sqlite3.Connection,
    msg_id: int,
    now: float,
    delay_warning: float,
    dsn: DsnDoor,
    done: Committed,
) -> None:
    """Queue the DSNs message ``msg_id`` owes, then remove it once every recipient is final."""
    rows = store.recipients_of(conn, msg_id)
    if not rows:
        return
    states = [(r.state, r.reported) for r in rows]
    if all(s is State.DELIVERED for s, _ in states):
        store.delete_message(conn, msg_id)
        return
    orig = store.original(conn, msg_id)
    if orig is None:
        return
    queue_id, sender, received_at = orig
    failed, delayed, finished = owed(states, received_at, now, delay_warning)
    for kind, flag, picked in (
        ("failed", REPORTED_FAILED, failed),
        ("delayed", REPORTED_DELAYED, delayed),
    ):
        if not picked:
            continue
        chosen = [rows[i] for i in picked]
        data = {"kind": kind, "original_queue_id": queue_id, "failed": [r.rcpt for r in chosen]}
        received: list[Event] = []
        if not sender:  # a DSN is never sent for a DSN (or any null-sender mail)
            stored = Event(Type.DSN_SUPPRESSED, queue_id, now, {"reason": "null sender", **data})
        else:
            lines = [(r.rcpt, r.code or 0, r.reply or "", r.mx or "") for r in chosen]
            body = store.body_of(conn, msg_id)
            received = dsn(conn, Report(kind, queue_id, sender, received_at, body, lines), now)
            stored = Event(Type.DSN_QUEUED, received[0].queue_id, now, {"rcpt": sender, **data})
            done.dsns += 1
        store.append_events(conn, [stored])
        done.events += [*received, stored]
        store.mark_reported(conn, [r.id for r in chosen], flag)
    if finished:
        store.delete_message(conn, msg_id)
