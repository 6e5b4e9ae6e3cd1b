"""The one transaction after an attempt: the recipients' new states, the DSN each event owes
(inserted through intake's door) and the events that report all of it commit together. A crash
at any instant leaves either none of it or all of it: no bounce without its DSN."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from relayd.events.records import Event, Type, receipt_keys
from relayd.model.message import (
    REPORTED_DELAYED,
    REPORTED_DELIVERED,
    REPORTED_FAILED,
    Notify,
    Report,
    Result,
    State,
)
from relayd.outcomes.decide import owed
from relayd.spool import store, suppression
from relayd.spool.suppression import Entry

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
    suppress: Callable[[Callable[[], str]], list[Entry]],
) -> Callable[[sqlite3.Connection], Committed]:
    """The writer operation for one attempt of message ``msg_id``. Its events are kept even
    when an operator's delete or hold won over the results: the remote server did answer.
    ``suppress`` gives the suppression entries its hard bounces make (decide.hard_bounces),
    asking for the message's origin only when it needs it."""

    def op(conn: sqlite3.Connection) -> Committed:
        done = Committed(list(events))
        store.append_events(conn, events)
        entries = suppress(lambda: store.origin_of(conn, msg_id))
        if entries:
            suppression.add(conn, entries)
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
    if all(r.state is State.DELIVERED and not r.notify & Notify.SUCCESS for r in rows):
        store.delete_message(conn, msg_id)
        return
    orig = store.original(conn, msg_id)
    if orig is None:
        return
    states = [(r.state, r.reported, r.notify) for r in rows]
    due = owed(states, orig.received_at, now, delay_warning)
    receipt = receipt_keys(orig.envid, orig.meta)
    if due.unwanted:  # the sender's NOTIFY asked for no failure DSN for these
        chosen = [rows[i] for i in due.unwanted]
        data = _report_data("failed", orig.queue_id, chosen, receipt)
        reason = "NOTIFY=NEVER" if all(r.notify & Notify.NEVER for r in chosen) else "NOTIFY"
        suppressed = Event(Type.DSN_SUPPRESSED, orig.queue_id, now, {"reason": reason, **data})
        store.append_events(conn, [suppressed])
        done.events.append(suppressed)
        store.mark_reported(conn, [r.id for r in chosen], REPORTED_FAILED)
    for kind, flag, picked in (
        ("failed", REPORTED_FAILED, due.failed),
        ("delayed", REPORTED_DELAYED, due.delayed),
        ("delivered", REPORTED_DELIVERED, due.delivered),
    ):
        if not picked:
            continue
        chosen = [rows[i] for i in picked]
        data = _report_data(kind, orig.queue_id, chosen, receipt)
        received: list[Event] = []
        if not orig.sender:  # a DSN is never sent for a DSN (or any null-sender mail)
            stored = Event(
                Type.DSN_SUPPRESSED, orig.queue_id, now, {"reason": "null sender", **data}
            )
        else:
            lines = [(r.rcpt, r.code or 0, r.reply or "", r.mx or "") for r in chosen]
            report = Report(
                kind,
                orig.queue_id,
                orig.sender,
                orig.received_at,
                store.body_of(conn, msg_id),
                lines,
                envid=orig.envid,
                ret=orig.ret,
                orcpt=[r.orcpt for r in chosen],
            )
            received = dsn(conn, report, now)
            stored = Event(
                Type.DSN_QUEUED, received[0].queue_id, now, {"rcpt": orig.sender, **data}
            )
            done.dsns += 1
        store.append_events(conn, [stored])
        done.events += [*received, stored]
        store.mark_reported(conn, [r.id for r in chosen], flag)
    if due.finished:
        store.delete_message(conn, msg_id)


def _report_data(
    kind: str, queue_id: str, chosen: list[store.Row], receipt: dict
) -> dict[str, object]:
    """A DSN event's keys: the recipients it reports (``failed`` for failures and delays, as
    always; ``delivered`` for success), their ORCPTs when any was given, ENVID and metadata."""
    rcpts = [r.rcpt for r in chosen]
    data: dict[str, object] = {"kind": kind, "original_queue_id": queue_id}
    data["delivered" if kind == "delivered" else "failed"] = rcpts
    if any(r.orcpt is not None for r in chosen):
        data["orcpt"] = [r.orcpt for r in chosen]
    return {**data, **receipt}
