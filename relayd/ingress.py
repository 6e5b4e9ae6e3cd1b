"""SMTP ingress: decides accept or reject, never delivers.

aiosmtpd speaks the protocol; this module adds the policy (who may relay, address syntax,
limits), the headers a relay owes (Received, and Message-ID and Date when missing), RFC 3463
enhanced codes on every reply, and the rule that 250 after DATA comes only once the spool has
the message on disk.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from relayd.config import Config
from relayd.events import log
from relayd.spool import new_queue_id

# (queue_id, sender, recipients, body, client_ip, helo, smtputf8); returns once durable
Accept = Callable[[str, str, list[str], bytes, str, str, bool], Awaitable[None]]

_DOMAIN = re.compile(
    r"^(?:(?:[^\W_]|[^\x00-\x7f])(?:[\w-]|[^\x00-\x7f]){0,62}\.)*"
    r"(?:[^\W_]|[^\x00-\x7f])(?:[\w-]|[^\x00-\x7f]){0,62}$"
)
_LITERAL = re.compile(r"^\[(?:IPv6:[0-9A-Fa-f:.]+|\d{1,3}(?:\.\d{1,3}){3})\]$")
_LOCAL_ASCII = re.compile(r"^[\x21-\x7e]{1,64}$")

# aiosmtpd's own replies that lack an enhanced status code, and what we say instead.
_REWRITE = {
    "553 5.1.3 Error: malformed address": "501 5.1.3 Bad address syntax",
    "552 Error: Too much mail data": "552 5.3.4 Message size exceeds fixed limit",
    "552 Error: message size exceeds fixed maximum message size": (
        "552 5.3.4 Message size exceeds fixed limit"
    ),
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Line too long",
    "500 Command line too long": "500 5.5.2 Command line too long",
}
_ENHANCED_FOR = {
    "250": "2.0.0",
    "221": "2.0.0",
    "421": "4.7.0",
    "450": "4.0.0",
    "451": "4.3.0",
    "452": "4.5.3",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "550": "5.0.0",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.0.0",
    "555": "5.5.4",
}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")


def valid_address(address: str, smtputf8: bool) -> bool:
    """RFC 5321 mailbox syntax, loosely: local@domain or local@[literal]."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or len(address) > 254:
        return False
    if not smtputf8 and not address.isascii():
        return False
    if local.isascii() and not _LOCAL_ASCII.match(local):
        return False
    return bool(_DOMAIN.match(domain) or _LITERAL.match(domain))


class RelaySMTP(SMTP):
    """aiosmtpd's protocol with our reply vocabulary and a hard error limit."""

    def __init__(self, handler: IngressHandler, config: Config) -> None:
        super().__init__(
            handler,
            data_size_limit=config.max_message_size,
            enable_SMTPUTF8=True,
            hostname=config.hostname,
            ident="ESMTP relayd",
            timeout=config.session_timeout,
        )
        self.max_errors = config.max_errors
        self.errors = 0
        self.sessions = handler.sessions

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.sessions.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.sessions.discard(self)
        super().connection_lost(error)

    @property
    def in_transaction(self) -> bool:
        """Between MAIL and the reply to DATA: what a graceful stop waits for."""
        return bool(self.envelope is not None and self.envelope.mail_from)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def push(self, status: Any) -> None:
        if isinstance(status, bytes):
            status = status.decode("utf-8", "surrogateescape")
        status = _REWRITE.get(status, status)
        code = status[:3]
        if not _HAS_ENHANCED.match(status) and _ENHANCED_FOR.get(code):
            sep = status[3:4] or " "
            status = f"{code}{sep}{_ENHANCED_FOR[code]} {status[4:]}".rstrip()
        await super().push(status)
        if code[:1] in ("4", "5") and code != "421":
            self.errors += 1
            if self.errors >= self.max_errors and self.transport is not None:
                await super().push("421 4.7.0 Too many errors, closing connection")
                self.transport.close()


class IngressHandler:
    """aiosmtpd hooks: the relay policy and the hand-off to the spool."""

    def __init__(self, config: Config, accept: Accept) -> None:
        self.config = config
        self.accept = accept
        self.sessions: set[RelaySMTP] = set()

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", "250 ENHANCEDSTATUSCODES"]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        if address != "<>" and not valid_address(address, envelope.smtp_utf8):
            return "501 5.1.3 Bad sender address syntax"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        if not valid_address(address, envelope.smtp_utf8):
            return "501 5.1.3 Bad recipient address syntax"
        client = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        if not self.config.is_trusted(client):
            log.info("relay_denied", client=client, rcpt=address, sender=envelope.mail_from)
            return f"554 5.7.1 <{address}>: Relay access denied"
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        client = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        sender = "" if envelope.mail_from == "<>" else envelope.mail_from or ""
        helo = session.host_name or ""
        queue_id = new_queue_id()
        body = add_headers(
            envelope.original_content or b"",
            self.config.hostname,
            client,
            helo,
            envelope.smtp_utf8,
            queue_id,
        )
        try:
            await self.accept(
                queue_id, sender, list(envelope.rcpt_tos), body, client, helo, envelope.smtp_utf8
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("accept_failed", client=client, sender=sender, error=repr(exc))
            return "451 4.3.0 Local error in processing, try again later"
        return f"250 2.0.0 Ok: queued as {queue_id}"


def add_headers(
    content: bytes, hostname: str, client: str, helo: str, utf8: bool, queue_id: str
) -> bytes:
    """Prepend Received; add Message-ID and Date when the client left them out."""
    end = content.find(b"\r\n\r\n")
    head = (b"\r\n" + (content if end < 0 else content[: end + 2])).lower()
    now = datetime.now(UTC)
    extra = [
        f"Received: from {helo or 'unknown'} ([{client}])\r\n\tby {hostname} (relayd) with "
        f"{'UTF8SMTP' if utf8 else 'ESMTP'} id {queue_id};\r\n\t{format_datetime(now)}\r\n"
    ]
    if b"\r\nmessage-id:" not in head:
        extra.append(f"Message-ID: {make_msgid(domain=hostname)}\r\n")
    if b"\r\ndate:" not in head:
        extra.append(f"Date: {format_datetime(now)}\r\n")
    return "".join(extra).encode() + content


async def start_listeners(
    config: Config, accept: Accept
) -> tuple[list[asyncio.Server], IngressHandler]:
    loop = asyncio.get_running_loop()
    handler = IngressHandler(config, accept)
    servers = []
    for listener in config.listeners:
        servers.append(
            await loop.create_server(
                lambda: RelaySMTP(handler, handler.config),
                listener.address.host,
                listener.address.port,
                reuse_address=True,
                backlog=1024,
            )
        )
    return servers, handler
