"""The one door into the spool. SMTP today, and DSNs, the HTTP API and campaigns later: every
message is signed, reserved a place in memory, inserted with its reception event in one group
commit, logged once durable, and admitted to the scheduler."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from relayd.events.log import emit, log
from relayd.events.records import Event, Type
from relayd.mime import dsn
from relayd.mime.dkim import Signer
from relayd.model.address import domain_of
from relayd.model.ids import new_queue_id
from relayd.model.message import NewMessage, Report
from relayd.spool import store
from relayd.spool.space import FreeSpace
from relayd.spool.writer import Writer


class Admission(Protocol):
    """What intake needs of the scheduler: room in memory, and the hand-over."""

    def reserve(self, jobs: int) -> bool: ...
    def unreserve(self, jobs: int) -> None: ...
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
    ) -> None:
        self.writer, self.admission, self.signer = writer, admission, signer
        self.hostname, self.space, self.clock = hostname, space, clock
        self.signing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dkim")

    def reload(self, signer: Signer, hostname: str, space: FreeSpace) -> None:
        self.signer, self.hostname, self.space = signer, hostname, space

    def close(self) -> None:
        self.signing.shutdown()

    def submit(self, msg: NewMessage) -> asyncio.Future[NewMessage]:
        """Store a message; resolves once it is durable (the caller answers 250 or 202 then).
        Signing here, once, means every attempt delivers the same signed bytes. Refused while
        the disk is short of room (DSNs, owed, are not: they come through ``dsn``)."""
        if self.space.low():
            fut: asyncio.Future[NewMessage] = asyncio.get_running_loop().create_future()
            fut.set_exception(self.space.refusal())
            return fut
        if self.signer.enabled:
            return asyncio.ensure_future(self._sign_and_insert(msg))
        return self._insert(msg)

    async def _sign_and_insert(self, msg: NewMessage) -> NewMessage:
        loop = asyncio.get_running_loop()  # RSA in OpenSSL releases the GIL: sign beside the loop
        body = bytes(msg.body)  # a large text arrives as a bytearray; the signer wants bytes
        signed = await loop.run_in_executor(self.signing, self.signer.sign, body, msg.received_at)
        msg.signed = len(signed) > len(msg.body)
        msg.body = signed
        return await self._insert(msg)

    def _insert(self, msg: NewMessage) -> asyncio.Future[NewMessage]:
        """Into the spool's next group commit; into memory at once when there is room."""
        jobs = len({domain_of(r) for r in msg.recipients})
        # mail for later (send_at) waits in the spool, where the loader finds it when due
        msg.active = msg.send_at <= self.clock() and self.admission.reserve(jobs)
        received: list[Event] = []

        def op(conn: sqlite3.Connection) -> NewMessage:
            received[:] = store_message(conn, msg)
            return msg

        fut = self.writer.submit(op)
        fut.add_done_callback(functools.partial(self._stored, msg, jobs, received))
        return fut

    def _stored(
        self, msg: NewMessage, jobs: int, received: list[Event], fut: asyncio.Future
    ) -> None:
        """Logged here, at the commit, so that a message's lines come from one process in
        order (accepted before its attempts)."""
        if fut.cancelled() or fut.exception() is not None:
            if msg.active:
                self.admission.unreserve(jobs)
            log.error("store_failed", queue_id=msg.queue_id, error=repr(fut.exception()))
            return
        emit(received)
        if msg.active:
            self.admission.admit(msg)
        else:
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
        if self.signer.enabled:
            signed = self.signer.sign(msg.body, now)
            msg.signed, msg.body = len(signed) > len(msg.body), signed
        return store_message(conn, msg)


def store_message(conn: sqlite3.Connection, msg: NewMessage) -> list[Event]:
    """The insert every message goes through, with the event that reports its reception."""
    store.insert_message(conn, msg, msg.received_at)
    received = [
        Event(
            Type.RECEPTION,
            msg.queue_id,
            msg.received_at,
            {
                "sender": msg.sender,
                "rcpt": msg.recipients,
                "size": len(msg.body),
                "dkim": msg.signed,
                "client": msg.client,
                "helo": msg.helo,
                "origin": msg.origin,
            },
        )
    ]
    store.append_events(conn, received)
    return received
