"""The one door into the spool. SMTP today, and DSNs, the HTTP API and campaigns later: every
message is signed, reserved a place in memory, inserted with its reception event in one group
commit, logged once durable, and admitted to the scheduler."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from relayd.config import FEEDBACK_FIELD
from relayd.events.log import emit, log
from relayd.events.records import Event, Type, receipt_keys
from relayd.feedback.unsubscribe import Links
from relayd.mime import dsn, headers
from relayd.mime.dkim import Signer
from relayd.model.address import domain_of
from relayd.model.ids import new_queue_id
from relayd.model.message import Answer, Guard, NewMessage, Report
from relayd.spool import api, store
from relayd.spool.space import FreeSpace
from relayd.spool.writer import Writer

SIGN_CHUNK = 32  # messages signed per call on a signing thread


class Admission(Protocol):
    """What intake needs of the scheduler: room in memory, and the hand-over."""

    def reserve(self, jobs: int, stream: str) -> bool: ...
    def unreserve(self, jobs: int, stream: str) -> None: ...
    def admit(self, msg: NewMessage) -> None: ...
    def poke(self) -> None: ...


class Intake:
    def __init__(
        self,
        writer: Writer,
        admission: Admission,
        signer: Signer,
        hostname: str,
        space: FreeSpace,
        clock: Callable[[], float],
        links: Links | None = None,
        feedback_id: str = "",
    ) -> None:
        self.writer, self.admission, self.signer = writer, admission, signer
        self.hostname, self.space, self.clock = hostname, space, clock
        self.links = links  # List-Unsubscribe of bulk mail ([unsubscribe]); None: off
        self.feedback_id = feedback_id  # return_path.feedback_id
        self.signing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dkim")

    def reload(
        self,
        signer: Signer,
        hostname: str,
        space: FreeSpace,
        links: Links | None = None,
        feedback_id: str = "",
    ) -> None:
        self.signer, self.hostname, self.space = signer, hostname, space
        self.links, self.feedback_id = links, feedback_id

    def close(self) -> None:
        self.signing.shutdown()

    def submit(
        self, msgs: list[NewMessage], guard: Guard | None = None
    ) -> asyncio.Future[Answer | None]:
        """Store a batch in one transaction (an SMTP message, an API call's messages); resolves
        once it is durable, to None (the caller answers 250 or 202 then), or to the earlier
        answer ``guard`` found instead (the same idempotent request again: nothing stored).
        Signing here, once, means every attempt delivers the same signed bytes. Refused while
        the disk is short of room (DSNs, owed, are not: they come through ``dsn``)."""
        if self.space.low():
            fut: asyncio.Future[Answer | None] = asyncio.get_running_loop().create_future()
            fut.set_exception(self.space.refusal())
            return fut
        if self.links is not None:  # before signing: the signature covers the fields
            now = self.clock()
            for msg in msgs:
                self.links.add(msg, now)
        if self.feedback_id:
            for msg in msgs:
                add_feedback_id(msg, self.feedback_id)
        if self.signer.enabled:
            return asyncio.ensure_future(self._sign_and_insert(msgs, guard))
        return self._insert(msgs, guard)

    async def _sign_and_insert(self, msgs: list[NewMessage], guard: Guard | None) -> Answer | None:
        loop = asyncio.get_running_loop()  # RSA in OpenSSL releases the GIL: sign beside the loop
        sent = [m for m in msgs if m.recipients]  # not the suppressed-only: nothing to send
        # SIGN_CHUNK messages per executor call: a future per message cost the queue process
        # a tenth of its time on a campaign's batches of 1,000
        chunks = [sent[i : i + SIGN_CHUNK] for i in range(0, len(sent), SIGN_CHUNK)]
        await asyncio.gather(*(loop.run_in_executor(self.signing, self._sign, c) for c in chunks))
        return await self._insert(msgs, guard)

    def _sign(self, msgs: list[NewMessage]) -> None:
        """On a signing thread: each message's text with its signature."""
        for msg in msgs:
            # a large text arrives as a bytearray; the signer wants bytes
            text = self.signer.sign(bytes(msg.body), msg.received_at)
            msg.signed = len(text) > len(msg.body)
            msg.body = text

    def _insert(self, msgs: list[NewMessage], guard: Guard | None) -> asyncio.Future[Answer | None]:
        """Into the spool's next group commit; into memory at once when there is room (and
        the mail is not for later: send_at waits in the spool, where the loader finds it)."""
        now = self.clock()
        jobs = [len({domain_of(r) for r in m.recipients}) for m in msgs]
        for msg, n in zip(msgs, jobs, strict=True):
            msg.active = bool(n) and msg.send_at <= now and self.admission.reserve(n, msg.stream)
        received: list[Event] = []

        def op(conn: sqlite3.Connection) -> Answer | None:
            if guard is not None and (answer := api.idempotent(conn, guard, now)) is not None:
                return answer
            for msg in msgs:
                received.extend(store_message(conn, msg))
            return None

        fut = self.writer.submit(op)
        fut.add_done_callback(functools.partial(self._stored, msgs, jobs, received))
        return fut

    def _stored(
        self, msgs: list[NewMessage], jobs: list[int], received: list[Event], fut: asyncio.Future
    ) -> None:
        """Logged here, at the commit, so that a message's lines come from one process in
        order (accepted before its attempts)."""
        failed = fut.cancelled() or fut.exception() is not None
        if failed or fut.result() is not None:  # not stored: failed, or answered before
            for msg, n in zip(msgs, jobs, strict=True):
                if msg.active:
                    self.admission.unreserve(n, msg.stream)
            if failed:
                error = "cancelled" if fut.cancelled() else repr(fut.exception())
                for msg in msgs:
                    log.error("store_failed", queue_id=msg.queue_id, error=error)
            return
        emit(received)
        for msg in msgs:
            if msg.active:
                self.admission.admit(msg)
        if not all(msg.active or not msg.recipients for msg in msgs):
            self.admission.poke()

    def dsn(self, conn: sqlite3.Connection, report: Report, now: float) -> list[Event]:
        """The door for a DSN owed by an attempt, inside that attempt's transaction (on the
        writer thread): built, signed like any message, stored with its reception event. The
        loader takes it from the spool once the transaction is durable."""
        msg = NewMessage(
            queue_id=new_queue_id(),
            sender="",
            recipients=[report.sender],
            body=dsn.build(report, self.hostname, now),
            client="",
            helo="",
            origin=f"dsn:{report.queue_id}",
            smtputf8=False,
            received_at=now,
        )
        return self.own(conn, msg)

    def own(self, conn: sqlite3.Connection, msg: NewMessage) -> list[Event]:
        """The door for relayd's own mail (a DSN, an alert) inside a transaction of the
        writer thread: signed like any message and stored with its reception event; the
        loader takes it from the spool once the transaction is durable."""
        if self.signer.enabled:
            signed = self.signer.sign(msg.body, msg.received_at)
            msg.signed, msg.body = len(signed) > len(msg.body), signed
        return store_message(conn, msg)


def add_feedback_id(msg: NewMessage, template: str) -> None:
    """Gmail's feedback loop reports complaints per Feedback-ID: the field is made from the
    template (config.FEEDBACK_FIELD: {sender_domain}, {account}, {stream}, {meta.KEY}) before
    signing,
    so that the signature covers it; a message that has one keeps its own. Each field's value
    keeps letters, digits, ".", "_" and "-" (others become "-"), at most 64 of them."""
    head, body = headers.split(bytes(msg.body))
    if not msg.recipients or headers.values(headers.fields(head), b"feedback-id"):
        return
    meta = json.loads(msg.meta) if msg.meta else {}
    kind, _, name = msg.origin.partition(":")
    known = {
        "sender_domain": domain_of(msg.sender) if msg.sender else "",
        "account": name if kind in ("key", "auth") else "",
        "stream": msg.stream,
    }

    def field(m: re.Match[str]) -> str:
        key = m.group(1)
        value = known[key] if key in known else meta.get(key.removeprefix("meta."), "")
        return _UNSAFE.sub("-", str(value))[:64]

    value = FEEDBACK_FIELD.sub(field, template)
    field_line = f"Feedback-ID: {value}\r\n\r\n".encode()
    msg.body = (head + b"\r\n" if head else b"") + field_line + body


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def store_message(conn: sqlite3.Connection, msg: NewMessage) -> list[Event]:
    """The insert every message goes through, with the event that reports its reception, and
    one for each recipient ingress found suppressed (only those when none is left)."""
    receipt = receipt_keys(msg.envid, msg.meta, msg.stream)
    events = [
        Event(
            Type.SUPPRESSION,
            msg.queue_id,
            msg.received_at,
            {
                "sender": msg.sender,
                "rcpt": rcpt,
                "domain": domain_of(rcpt),
                "scope": scope,
                "reason": reason,
                "class": bounce_class,
                "origin": msg.origin,
                **receipt,
            },
        )
        for rcpt, scope, reason, bounce_class in msg.suppressed
    ]
    if msg.recipients:
        events.insert(0, _reception(conn, msg, receipt))
    if msg.campaign is not None:
        store.campaign_send(conn, msg.campaign, msg.queue_id, bool(msg.recipients))
    store.append_events(conn, events)
    return events


def _reception(conn: sqlite3.Connection, msg: NewMessage, receipt: dict) -> Event:
    store.insert_message(conn, msg, msg.received_at)
    data = {
        "sender": msg.sender,
        "rcpt": msg.recipients,
        "size": len(msg.body),
        "dkim": msg.signed,
        "client": msg.client,
        "helo": msg.helo,
        "origin": msg.origin,
    }
    if msg.orcpt:
        data["orcpt"] = msg.orcpt  # in the order of "rcpt", null where none was given
    data.update(receipt)
    return Event(Type.RECEPTION, msg.queue_id, msg.received_at, data)
