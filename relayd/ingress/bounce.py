"""The bounce listener (listener kind "bounce"): where asynchronous bounces and feedback
reports come back, from anywhere on the Internet (the MX of return_path.domain points at it).

It is the SMTP ingress's session machinery and limits (RelaySMTP, IngressHandler: syntax, size,
connections, time, errors, enhanced codes) with its own policy: no AUTH and no relaying, for
any client (trusted networks included); RCPT only for relayd's return paths
(``local+TOKEN@domain`` with a token relayd signed) and the feedback addresses
(return_path.complaints at that domain) and unsubscribe.mailto, one of them per transaction;
and each message read as a report and recorded (relayd.feedback.record; an unsubscribe mail
by relayd.feedback.unsubscribe, as the one-click POST is) in a short write transaction of its
own, beside the queue process's writer, before the 250. A message that is no report (an
auto-reply, a human's answer) is accepted too, and logged as ``unrecognised_report``: a
refusal would only bounce back to a null sender, or to the robot that sent it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import Envelope, Session

from relayd.config import Auth, Ingress, ReturnPath, Unsubscribe
from relayd.events.log import emit, log
from relayd.feedback import record, reports, unsubscribe
from relayd.feedback.record import Outcome, Policy
from relayd.feedback.tokens import BadToken, ReturnPaths
from relayd.ingress.smtp import IngressHandler, RelaySMTP, Suppressions, valid_address
from relayd.model.message import NewMessage
from relayd.spool import admin
from relayd.spool.space import FreeSpace


def _settings(ingress: Ingress, paths: ReturnPath) -> Ingress:
    """[ingress] as the bounce listener applies it: no trusted network, its own size limit."""
    return dataclasses.replace(ingress, trusted_networks=(), max_message_size=paths.max_report_size)


class BounceHandler(IngressHandler):
    def __init__(
        self,
        ingress: Ingress,
        auth: Auth,
        hostname: str,
        space: FreeSpace,
        suppressions: Suppressions,
        settings: ReturnPath,
        paths: ReturnPaths,
        policy: Policy,
        unsubscribing: Unsubscribe,
        spool: Path,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            _settings(ingress, settings), auth, hostname, space, self._report, suppressions, ""
        )
        self.settings, self.paths, self.policy = settings, paths, policy
        self.unsubscribing = unsubscribing
        self.spool, self.clock = spool, clock
        # parsing and the spool writes, on one thread (the connection is used by it only)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reports")
        self.conn: sqlite3.Connection | None = None

    def reload_reports(
        self,
        ingress: Ingress,
        auth: Auth,
        hostname: str,
        space: FreeSpace,
        settings: ReturnPath,
        paths: ReturnPaths,
        policy: Policy,
        unsubscribing: Unsubscribe,
    ) -> None:
        self.reload(_settings(ingress, settings), auth, hostname, space, "")
        self.settings, self.paths, self.policy = settings, paths, policy
        self.unsubscribing = unsubscribing

    def close(self) -> None:
        self.worker.submit(self._close)
        self.worker.shutdown()

    def _close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    # -- SMTP hooks ---------------------------------------------------------------------------

    async def handle_EHLO(
        self,
        server: RelaySMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list,
    ) -> list[str]:
        lines = await super().handle_EHLO(server, session, envelope, hostname, responses)
        return [line for line in lines if not line.startswith("250-AUTH")]  # none to offer

    async def handle_RCPT(
        self, server: RelaySMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        if not valid_address(address, envelope.smtp_utf8):
            return "501 5.1.3 Bad recipient address syntax"
        refusal = "" if self._mailto(address) else self._refusal(server, envelope, address)
        if refusal:
            return refusal
        if envelope.rcpt_tos and address.lower() != envelope.rcpt_tos[0].lower():
            return "452 4.5.3 One report recipient per transaction: send again for this one"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    def _refusal(self, server: RelaySMTP, envelope: Envelope, address: str) -> str:
        """Why an address is not one of the return-path domain's that take reports; "" if it
        is."""
        local, _, domain = address.rpartition("@")
        if domain.lower().rstrip(".") != self.paths.domain:
            log.info("relay_denied", client=server.client, rcpt=address, sender=envelope.mail_from)
            return (
                f"550 5.7.1 <{address}>: Relay access denied: this server takes reports for"
                f" {self.paths.domain} only"
            )
        try:
            ours = self.paths.queue_id_of(address) is not None
        except BadToken:
            log.info("report_refused", client=server.client, rcpt=address, why="bad token")
            return f"550 5.1.1 <{address}>: Bad return path: not one relayd gave a message"
        if not ours and local.lower() not in self.settings.complaints:
            return f"550 5.1.1 <{address}>: No such mailbox: only return paths and feedback"
        return ""

    # -- the report -------------------------------------------------------------------------

    async def _report(self, msg: NewMessage) -> None:
        """Read and record a report (the 250 follows): the accept of IngressHandler.handle_DATA,
        whose id in "queued as" is the report's in the log."""
        loop = asyncio.get_running_loop()
        rcpt = msg.recipients[0]
        why, out = await loop.run_in_executor(
            self.worker, self._record, bytes(msg.body), rcpt, self.clock()
        )
        keys = {"report_id": msg.queue_id, "client": msg.client, "sender": msg.sender}
        if why:
            log.info("unrecognised_report", **keys, rcpt=rcpt, why=why)
            return
        emit(out.events)
        for why in out.unmatched:
            log.info("report_unmatched", **keys, rcpt=rcpt, why=why)

    def _record(self, text: bytes, rcpt: str, now: float) -> tuple[str, Outcome]:
        """(why the message is no report, or ""; what it changed, committed)."""
        if self._mailto(rcpt):
            token = unsubscribe.token_of_mail(text)
            if token is None:
                return "an unsubscribe mail without an unsubscribe token", Outcome()
            return "", self._commit(self._unsubscribe, token, now)
        report = reports.parse(text)
        if isinstance(report, reports.Unrecognised):
            return report.why, Outcome()
        try:
            to_queue_id = self.paths.queue_id_of(rcpt)
        except BadToken:  # return_path changed by a reload since RCPT
            to_queue_id = None
        return "", self._commit(record.apply, report, to_queue_id, self.paths, self.policy, now)

    def _commit(self, change: Callable[..., Outcome], *args: Any) -> Outcome:
        if self.conn is None:
            self.conn = admin.open_spool(self.spool, write=True)
        with admin.transaction(self.conn, True):
            return change(self.conn, *args)

    def _unsubscribe(self, conn: sqlite3.Connection, token: str, now: float) -> Outcome:
        """An unsubscribe by mail: the one-click POST's record; a bad token changes nothing."""
        tokens, max_age = self.paths.tokens, self.unsubscribing.max_age
        try:
            event = unsubscribe.record(conn, tokens, token, now, max_age, "mail")
        except BadToken as exc:
            return Outcome(unmatched=[f"unsubscribe refused: {exc}"])
        if event is None:
            return Outcome(unmatched=["already unsubscribed in that scope"])
        return Outcome(events=[event])

    def _mailto(self, address: str) -> bool:
        mailto = self.unsubscribing.mailto
        return bool(mailto) and address.lower() == mailto.lower()
