"""The queue process's alerting loop: every [alerts].interval, the samples of the metrics go
through the evaluator; each alert that fires or resolves becomes an ``alert`` event, written
through the spool's Writer (webhooks subscribed to "alert" or "*" get it, signed as any
event), and with [alerts].mail_to set a plain-text mail put through intake's door for
relayd's own mail, in the same transaction as its event: both or neither.

A restart does not fire again what was firing: the last ``alert`` event of each alert says
whether it was firing, and the evaluator starts from that (it resolves as usual once the
condition is gone)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Protocol

from relayd import config as configuration
from relayd.alerts.evaluator import Change, Evaluator, Samples
from relayd.events.log import emit, log
from relayd.events.records import Event, Type
from relayd.model.ids import new_queue_id
from relayd.model.message import NewMessage
from relayd.spool import schema, store
from relayd.spool.writer import Writer


class Door(Protocol):
    def own(self, conn: sqlite3.Connection, msg: NewMessage) -> list[Event]: ...


class Alerts:
    def __init__(
        self,
        settings: configuration.Alerts,
        hostname: str,
        writer: Writer,
        door: Door,
        poke: Callable[[], None],
        samples: Callable[[], Awaitable[Samples]],
        clock: Callable[[], float],
    ) -> None:
        self.settings, self.hostname = settings, hostname
        self.writer, self.door, self.poke, self.samples = writer, door, poke, samples
        self.evaluator = Evaluator(
            settings.rules, settings.resolve_for, settings.resolve_ratio, clock
        )
        self.clock = clock
        self.woken = asyncio.Event()

    def reload(self, settings: configuration.Alerts, hostname: str) -> None:
        self.settings, self.hostname = settings, hostname
        self.evaluator.configure(settings.rules, settings.resolve_for, settings.resolve_ratio)
        self.woken.set()  # a new interval counts from now

    async def restore(self, spool: Path) -> None:
        """The alerts whose last event says "firing" (relayd stopped while they fired)."""
        self.evaluator.restore(await asyncio.to_thread(_firing, spool))

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.woken.wait(), self.settings.interval)
            self.woken.clear()
            if not self.settings.enabled:
                continue
            try:
                changes = self.evaluator.observe(await self.samples())
                if changes:
                    await self.report(changes)
            except (OSError, sqlite3.Error) as exc:  # the next round tries again
                log.error("alerts_failed", error=repr(exc))

    async def report(self, changes: list[Change]) -> None:
        """The events (and mails) of ``changes``, in one transaction; logged once durable."""
        settings, hostname = self.settings, self.hostname
        written: list[Event] = []

        def op(conn: sqlite3.Connection) -> None:
            for change in changes:
                event = Event(Type.ALERT, "", change.at, _data(change))
                store.append_events(conn, [event])
                written.append(event)
                if settings.mail_to:
                    msg = _mail(change, settings.mail_from, settings.mail_to, hostname)
                    written.extend(self.door.own(conn, msg))

        await self.writer.submit(op)
        emit(written)
        if settings.mail_to:
            self.poke()


def _data(change: Change) -> dict[str, object]:
    return {
        "alert": change.alert,
        "state": change.state,
        "value": change.value,
        "threshold": change.threshold,
        "labels": change.labels,
        "summary": change.summary,
    }


def _mail(change: Change, sender: str, to: str, hostname: str) -> NewMessage:
    """A plain-text mail that says what the event says."""
    mail = EmailMessage(policy=SMTP)
    mail["From"] = f"relayd <{sender}>"
    mail["To"] = to
    mail["Subject"] = f"[relayd {change.state.upper()}] {change.summary}"
    mail["Date"] = format_datetime(datetime.fromtimestamp(change.at, UTC))
    mail["Message-ID"] = make_msgid(domain=hostname)
    mail["Auto-Submitted"] = "auto-generated"
    labels = ", ".join(f"{k}={v}" for k, v in change.labels.items()) or "none"
    mail.set_content(
        f"relayd on {hostname}: alert {change.alert} is {change.state}.\n\n"
        f"{change.summary}\n\n"
        f"value: {change.value}\nthreshold: {change.threshold}\nlabels: {labels}\n"
        f"at: {format_datetime(datetime.fromtimestamp(change.at, UTC))}\n"
    )
    return NewMessage(
        queue_id=new_queue_id(),
        sender=sender,
        recipients=[to],
        body=mail.as_bytes(),
        client="",
        helo="",
        origin=f"alert:{change.alert}",
        smtputf8=False,
        received_at=change.at,
    )


def _firing(spool: Path) -> list[tuple[str, dict[str, str]]]:
    """From the event log (its queue_id index: alert events have none)."""
    conn = schema.reader(spool)
    try:
        rows = conn.execute(
            "SELECT data FROM events WHERE queue_id = '' AND type = ? ORDER BY id", (Type.ALERT,)
        ).fetchall()
    finally:
        conn.close()
    last: dict[tuple[str, str], dict] = {}
    for (text,) in rows:
        data = json.loads(text)
        last[(data["alert"], json.dumps(data["labels"], sort_keys=True))] = data
    return [(d["alert"], d["labels"]) for d in last.values() if d["state"] == "firing"]
