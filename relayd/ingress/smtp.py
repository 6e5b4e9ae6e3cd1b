"""SMTP ingress: decides accept or reject, never delivers.

aiosmtpd speaks the protocol; this module adds the policy (who may relay: trusted networks or
an authenticated login, as whom a login may send and how fast, address syntax, limits on
connections, time, lines and errors), the headers a relay owes (Received, and Message-ID and
Date when missing), RFC 3463 enhanced codes on every reply, defences against SMTP smuggling,
and the rule that 250 after DATA comes only once the spool has the message on disk. The DSN
extension (RFC 3461: RET, ENVID, NOTIFY, ORCPT; checked in ``params``) is offered everywhere,
and metadata header fields (``metadata``) are taken out of the text into the message's events,
as is ``X-Relayd-Stream``, the message's stream (transactional or bulk).

Listener kinds: ``relay`` (trusted networks; STARTTLS and AUTH offered when TLS is set up),
``submission`` (STARTTLS first, then AUTH before MAIL) and ``smtps`` (implicit TLS, then AUTH);
``bounce`` is served by relayd.ingress.bounce's handler, on these sessions, without AUTH.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import socket
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from types import MethodType
from typing import Any, Protocol

import aiosmtpd.smtp
from aiosmtpd.smtp import (
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
    _AuthMechAttr,
    syntax,
)

from relayd.config import Auth, Ingress, Listener
from relayd.delivery.dns import address_literal
from relayd.events.log import log
from relayd.ingress import metadata
from relayd.ingress import params as dsnparams
from relayd.ingress.credentials import Credential, Directory, LoginGuard
from relayd.mime import headers
from relayd.model.ids import new_queue_id
from relayd.model.message import TRANSACTIONAL, NewMessage
from relayd.spool import space
from relayd.spool.space import FreeSpace
from relayd.spool.suppression import Entry

# Stores a message durably (raising when it could not); the reply to DATA waits for it.
Accept = Callable[[NewMessage], Awaitable[None]]

_DOMAIN = re.compile(
    r"^(?:(?:[^\W_]|[^\x00-\x7f])(?:[\w-]|[^\x00-\x7f]){0,62}\.)*"
    r"(?:[^\W_]|[^\x00-\x7f])(?:[\w-]|[^\x00-\x7f]){0,62}$"
)
_LOCAL_ASCII = re.compile(r"^[\x21-\x7e]{1,64}$")
# RFC 5321 4.1.2 Quoted-string: qtextSMTP (RFC 6531: and UTF-8) or a quoted pair
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e]|[^\x00-\x7f])*"'
_LOCAL_QUOTED = re.compile(f"^{_QUOTED}$")
# RFC 4954 section 5: AUTH=<> or AUTH=xtext (RFC 3461: "+" and "=" only as "+HH"); seen upper
# cased, as aiosmtpd upper-cases MAIL parameters
_AUTH_PARAM = re.compile(r"^(?:<>|(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+)$")

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
    "252": "2.0.0",
    "454": "4.7.0",
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
_SURROGATE = re.compile("[\udc80-\udcff]")
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")
_COMMAND_READ_LIMIT = 1024  # longest command line read; aiosmtpd then applies 512 (+ extensions)
_DATA_BLOCK = 256 * 1024  # message text is read in blocks of up to this much
_AUTH_BUSY = "454 4.7.0 Too many login attempts from your address, try again later"
_GOODBYE_TIME = 1.0  # seconds a closing session's last replies get to drain before an abort


def valid_address(address: str, smtputf8: bool) -> bool:
    """RFC 5321 mailbox syntax, loosely: local@domain or local@[literal]; a quoted local part
    ("john doe"@domain) strictly, at most 64 octets with its quotes."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or len(address) > 254:
        return False
    if not smtputf8 and not address.isascii():
        return False
    if _SURROGATE.search(address):  # bytes that were not UTF-8 at all
        return False
    if local.startswith('"'):  # as sent: _getaddr takes no other quoting from the client
        if len(local.encode()) > 64 or not _LOCAL_QUOTED.match(local):
            return False
    elif local.isascii() and not _LOCAL_ASCII.match(local):
        return False
    return bool(_DOMAIN.match(domain) or address_literal(domain))  # one that can be delivered


@functools.lru_cache(maxsize=256)
def _reply(status: str | bytes, greeting: bool) -> tuple[str, bytes]:
    """A reply as sent: aiosmtpd's texts reworded, an enhanced status code added where it lacks
    one (not in EHLO/HELO lines: those are keywords), as a line of bytes. Most replies are the
    same few texts, hence the cache."""
    if isinstance(status, bytes):
        status = status.decode("utf-8", "surrogateescape")
    status = _REWRITE.get(status, status)
    code = status[:3]
    if not (greeting and code == "250") and not _HAS_ENHANCED.match(status):
        enhanced = _ENHANCED_FOR.get(code)
        if enhanced:
            status = f"{code}{status[3:4] or ' '}{enhanced} {status[4:]}".rstrip()
    # client text echoed in a reply may hold undecodable bytes (surrogateescape)
    return code, status.encode("utf-8", "surrogateescape") + b"\r\n"


class RelayEnvelope(Envelope):
    """aiosmtpd's envelope with the DSN parameters (RFC 3461) of its MAIL and RCPTs: reset
    with it by RSET and after DATA."""

    def __init__(self) -> None:
        super().__init__()
        self.ret = ""
        self.envid: str | None = None
        self.notify: list[int] = []  # per accepted recipient, in the order of rcpt_tos
        self.orcpt: list[str | None] = []
        # accepted recipients on the suppression list ([suppression] smtp = "drop"): their
        # places in rcpt_tos and what stops them; recorded, never sent
        self.suppressed: dict[int, Entry] = {}


class RelaySMTP(SMTP):
    """aiosmtpd's protocol with our replies, limits and login handling."""

    # aiosmtpd builds its reader with line_length_limit: that bounds command lines (which need
    # 512 octets and more, RFC 5321 4.5.3.1.4, whatever the text line limit). Text lines are
    # measured by handle_DATA, after bare newlines are normalised.
    line_length_limit = _COMMAND_READ_LIMIT

    def __init__(
        self, handler: IngressHandler, listener: Listener, tls: ssl.SSLContext | None
    ) -> None:
        config = handler.config
        implicit = listener.kind == "smtps"
        super().__init__(
            handler,
            data_size_limit=config.max_message_size,
            enable_SMTPUTF8=True,
            hostname=handler.hostname,
            ident="ESMTP relayd",
            timeout=config.session_timeout,
            tls_context=None if implicit else tls,
            require_starttls=listener.kind == "submission",
            auth_required=listener.kind not in ("relay", "bounce"),
            auth_require_tls=not implicit,
            authenticator=_never_called,
            loop=handler.loop,  # spares aiosmtpd's get_event_loop() under a warnings filter
        )
        self.handler, self.listener = handler, listener
        self._tables()
        self.errors = 0
        self.client = ""
        self.trusted = False  # client address in trusted_networks, decided once per connection
        self.refusal = ""  # set when the connection must be refused at greeting
        self._greeting = False
        self._in_mail = False  # parsing MAIL's parameters (not RCPT's)
        self._raw_params = ""  # the current MAIL or RCPT's parameters, as sent
        self.dsn_params: dict[str, list[str]] = {}  # its DSN parameters, as sent, for the hook
        self._deadline: asyncio.TimerHandle | None = None
        self._abort_handle: asyncio.TimerHandle | None = None
        self._last_input = 0.0

    def __dir__(self) -> list[str]:
        """aiosmtpd's __init__ builds its command, AUTH and hook tables with dir() and
        inspect.getmembers() on every connection, the largest cost of a short session; it
        finds nothing here, and _tables() installs the same tables built once."""
        return []

    def _tables(self) -> None:
        self._smtp_methods = _Commands(self)
        mechanisms = {} if self.listener.kind == "bounce" else _MECHANISMS  # no AUTH there
        self._auth_methods = {
            name: _AuthMechAttr(MethodType(f, self), True) for name, f in mechanisms.items()
        }
        self._handle_hooks = self.handler.hooks
        self._ehlo_hook_ver = "new"  # IngressHandler.handle_EHLO takes five arguments

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The common ``<local@domain> PARAMS`` form without the email package's full RFC 5322
        parser (slow), and ``<"quoted local"@domain>`` kept as sent; anything else still goes
        through that parser, but not an address it quoted itself: it quotes what the client
        did not (``<john doe@x>``) and merges ``"a b".c`` into ``"a b.c"``, another mailbox."""
        self.dsn_params = {}
        m = _PLAIN_PATH.match(arg) or _QUOTED_PATH.match(arg)
        if m:
            self._raw_params = m.group(2) or ""
            return m.group(1), self._raw_params
        address, rest = super()._getaddr(arg)
        if address and address.startswith('"'):
            return None, None
        self._raw_params = rest or ""
        return address, rest

    def _create_envelope(self) -> RelayEnvelope:
        return RelayEnvelope()

    # -- connection life ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self._original_transport is None and self.transport is None
        super().connection_made(transport)
        if not first:
            return  # the TLS layer after STARTTLS: same client, already counted
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if isinstance(peer, tuple) else str(peer)
        self.trusted = self.handler.trusted(self.client)
        self.refusal = self.handler.admit(self)
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.handler.config.max_session_time, self._expired)

    def connection_lost(self, error: Exception | None) -> None:
        self.handler.release(self)
        if self._deadline is not None:
            self._deadline.cancel()
        if self._abort_handle is not None:
            self._abort_handle.cancel()
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if self.refusal:
            await super().push(self.refusal)
            self.close()
            return
        await super()._handle_client()

    def data_received(self, data: bytes) -> None:
        self._last_input = self.loop.time()
        super().data_received(data)

    def eof_received(self) -> bool | None:
        """The client is gone: close now, so its connection slot is free at once."""
        super().eof_received()
        return False

    def _timeout_cb(self) -> None:
        """Idle means nothing received, not no command: a long DATA transfer is busy."""
        quiet = self.loop.time() - self._last_input
        if quiet < self._timeout_duration:
            self._reset_timeout(self._timeout_duration - quiet)
            return
        self._goodbye("421 4.4.2 Idle timeout, closing connection", "idle")

    def _expired(self) -> None:
        self._goodbye("421 4.4.2 Session time limit reached, closing connection", "session_time")

    def _goodbye(self, reply: str, reason: str) -> None:
        """Say why, then close within a bounded time (see close)."""
        if self.transport is not None:
            self.transport.write(reply.encode() + b"\r\n")
            self.close(reason)

    @property
    def in_transaction(self) -> bool:
        """Between MAIL and the reply to DATA: what a graceful stop waits for."""
        return bool(self.envelope is not None and self.envelope.mail_from)

    def close(self, reason: str = "closed") -> None:
        """Close once the replies written so far have drained, but never wait on a client that
        does not read (a shut receive window) for its slot: abort at once when the buffer is
        already over its high-water mark, else after _GOODBYE_TIME if it has not drained."""
        transport = self.transport
        if transport is None or self._abort_handle is not None:
            return
        high = transport.get_write_buffer_limits()[1]
        if self._paused or transport.get_write_buffer_size() > high:
            self._abort(transport, reason)
            return
        transport.close()
        self._abort_handle = self.loop.call_later(_GOODBYE_TIME, self._abort, transport, reason)

    def _abort(self, transport: asyncio.WriteTransport, reason: str) -> None:
        """Drop the connection with whatever is still unsent (connection_lost follows)."""
        if self.transport is not transport:
            return  # already gone
        unsent = transport.get_write_buffer_size()
        log.info("session_aborted", client=self.client, reason=reason, unsent=unsent)
        transport.abort()

    # -- replies --------------------------------------------------------------------------

    async def smtp_EHLO(self, hostname: str) -> None:
        self._greeting = True  # EHLO lines are keywords: no enhanced codes (RFC 2034)
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._greeting = False

    async def smtp_HELO(self, hostname: str) -> None:
        self._greeting = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._greeting = False

    async def push(self, status: Any) -> None:
        code, line = _reply(status, self._greeting)
        await self._send(line)
        if code[:1] in ("4", "5") and code != "421":
            self.errors += 1
            if self.errors >= self.handler.config.max_errors:
                self._goodbye("421 4.7.0 Too many errors, closing connection", "errors")

    async def _send(self, line: bytes) -> None:
        """aiosmtpd's push without its debug log call, waiting only when the socket's buffer is
        not empty (a reply is nearly always written at once)."""
        self._writer.write(line)
        transport = self.transport
        if transport is None or transport.get_write_buffer_size():
            await self._writer.drain()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """One idle timer per session, re-armed by _timeout_cb from the time of the last input,
        rather than a new timer for every command."""
        if self._timeout_handle is None or duration is not None:
            super()._reset_timeout(duration)

    # -- commands -------------------------------------------------------------------------

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, reading the text in blocks that end at each ".CRLF" instead of line by
        line (a 20 KB message took ~300 reads, checks and log calls): the same end of data (only
        CRLF.CRLF), dot-unstuffing and size limit, the reply after the client's dot. Text line
        length is checked by handle_DATA, after bare newlines are normalised."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        reader = self._reader
        reader._limit = _DATA_BLOCK  # type: ignore[attr-defined]
        try:
            content = await self._read_data(reader)
        except asyncio.IncompleteReadError:  # the client went away mid-message
            self.close()
            return
        finally:
            reader._limit = _COMMAND_READ_LIMIT  # type: ignore[attr-defined]
        if content is None:
            await self.push("552 Error: Too much mail data")
        else:
            self.envelope.content = self.envelope.original_content = content
            del content  # handle_DATA takes the text from the envelope (and lets go of it)
            status = await self._call_handler_hook("DATA")
            await self.push(status)
        self._set_post_data_state()

    async def _read_data(self, reader: asyncio.StreamReader) -> bytes | bytearray | None:
        """The text up to CRLF.CRLF, dot-unstuffed (RFC 5321 4.5.2); None when it is larger than
        the size limit (then the rest is read and dropped). Each block is unstuffed as it comes;
        a text of one block is returned as read, a longer one gathered in one buffer: the text
        is held once, not as blocks and their join."""
        limit = self.data_size_limit or 0
        content: bytes | bytearray = b""
        size = 0
        tail = b"\r\n"  # the text starts at the beginning of a line
        while True:
            try:
                block = await reader.readuntil(b".\r\n")
            except asyncio.LimitOverrunError as exc:  # no ".CRLF" in a whole block
                block = await reader.read(exc.consumed)
            end = block[-5:] if len(block) >= 5 else (tail + block)[-5:]
            last = end == b"\r\n.\r\n"
            raw = block[:-3] if last else block
            size += len(raw)
            if limit and size > limit:
                if last:
                    return None
                content = b""  # keep reading to the dot, but not the text
                tail = end[-2:]
                continue
            # a line may start at the block's start (or just after its first byte)
            if tail == b"\r\n" and raw[:1] == b".":
                raw = raw[1:]
            elif tail[-1:] == b"\r" and raw[:2] == b"\n.":
                raw = b"\n" + raw[2:]
            raw = headers.unstuff_dots(raw)
            if not content:
                content = raw
            elif isinstance(content, bytes):
                content = bytearray(content)
                content += raw
            else:
                content += raw
            if last:
                return content
            tail = end[-2:]

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")  # HELP still lists it
    async def smtp_MAIL(self, arg: str) -> None:
        """aiosmtpd's MAIL, knowing its parameters from RCPT's for _getparams."""
        self._in_mail = True
        try:
            await super().smtp_MAIL(arg)
        finally:
            self._in_mail = False

    def _getparams(self, params: Sequence[str]) -> dict[str, str | bool] | None:
        """aiosmtpd's parameter parse, with the DSN parameters (MAIL's RET and ENVID, RCPT's
        NOTIFY and ORCPT) taken out into ``dsn_params`` as sent, for the hooks to check and
        answer precisely; and with MAIL's AUTH= (RFC 4954 section 5) taken out where this
        session offers AUTH, as its EHLO does: accepted, and ignored (relayd's client never
        passes an AUTH= on, which the RFC allows a relay that does not vouch for it). None (a
        syntax error) when its value is not "<>" or xtext."""
        result = super()._getparams(params)
        if result is None:
            return None
        names = dsnparams.MAIL_KEYS if self._in_mail else dsnparams.RCPT_KEYS
        if any(n in result for n in names):
            self.dsn_params = dsnparams.given(self._raw_params, names)
            for name in names:
                result.pop(name, None)
        offered = not self._auth_require_tls or self._tls_protocol is not None
        if not self._in_mail or not offered or "AUTH" not in result:
            return result
        value = result.pop("AUTH")
        if not isinstance(value, str) or not _AUTH_PARAM.match(value):
            return None
        return result

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None or self.listener.kind == "smtps":
            await self.push("503 5.5.1 TLS already active")
            return
        if self.in_transaction:
            await self.push("503 5.5.1 STARTTLS not allowed during a mail transaction")
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_AUTH(self, arg: str) -> None:
        if self.handler.guard.locked(self.client):
            await self.push("421 4.7.0 Too many failed logins, try again later")
            self.close()
            return
        await super().smtp_AUTH(arg)

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        """aiosmtpd's parsers end here; the (slow) check happens in _verified."""
        return AuthResult(success=False, handled=False, auth_data=auth_data)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._verified(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._verified(await super().auth_LOGIN(_, args))

    async def _verified(self, parsed: AuthResult) -> AuthResult:
        if not isinstance(parsed.auth_data, LoginPassword):
            return parsed  # malformed exchange, already answered
        name = parsed.auth_data.login.decode("utf-8", "replace")
        guard = self.handler.guard
        if not guard.begin(self.client):  # as many checks in flight as failures allowed
            log.warning("auth_refused", client=self.client, user=name)
            return AuthResult(success=False, handled=False, message=_AUTH_BUSY)
        try:
            user = await self.handler.verify(name, parsed.auth_data.password)
            failures = 0 if user else guard.failed(self.client)  # before end(): no dip
        finally:
            guard.end(self.client)
        if user is not None and not user.may_use_from(self.client):
            log.warning("auth_network_refused", client=self.client, user=name)
            msg = f"535 5.7.8 Login {name} may not be used from {self.client}"
            return AuthResult(success=False, handled=False, message=msg)
        if user is not None:
            log.info("auth_ok", client=self.client, user=name)
            return AuthResult(success=True, auth_data=user)
        log.warning("auth_failed", client=self.client, user=name, failures=failures)
        await asyncio.sleep(self.handler.auth.failure_delay)
        if self.handler.guard.locked(self.client):
            log.warning("auth_lockout", client=self.client, user=name)
        return AuthResult(success=False, handled=False)


class _Commands(dict):
    """aiosmtpd's command table for one session, each method bound when it is looked up (a
    session uses five or six of them): aiosmtpd reads it with get() and items() only."""

    def __init__(self, session: RelaySMTP) -> None:
        super().__init__()
        self.session = session

    def get(self, name: str, default: Any = None) -> Any:
        f = _COMMANDS.get(name)
        return default if f is None else MethodType(f, self.session)

    def items(self) -> Any:
        return [(name, MethodType(f, self.session)) for name, f in _COMMANDS.items()]


def _never_called(*args: Any) -> AuthResult:
    raise AssertionError("RelaySMTP._authenticate replaces aiosmtpd's authenticator")


def _sanitized_log(func: Callable[..., None], msg: str, *args: Any, **kwargs: Any) -> None:
    """aiosmtpd logs every command line twice (debug and info) through sanitized_log, which
    masks AUTH data with a regex before the logger drops the line: relayd keeps mail.log at
    ERROR (events.configure), so skip the masking when the logger would drop the line anyway."""
    if _MAIL_LOG.isEnabledFor(logging.INFO if func == _MAIL_LOG.info else logging.DEBUG):
        _AIOSMTPD_SANITIZED_LOG(func, msg, *args, **kwargs)


_MAIL_LOG = logging.getLogger("mail.log")
_AIOSMTPD_SANITIZED_LOG = aiosmtpd.smtp.sanitized_log
aiosmtpd.smtp.sanitized_log = _sanitized_log  # looked up as a global in SMTP._handle_client

_COMMANDS = {n[5:]: getattr(RelaySMTP, n) for n in dir(RelaySMTP) if n.startswith("smtp_")}
_MECHANISMS = {
    getattr(f, "__auth_mechanism_name__", n[5:].replace("__", "-")): f
    for n in dir(RelaySMTP)
    if n.startswith("auth_") and callable(f := getattr(RelaySMTP, n))
}
_PLAIN_PATH = re.compile(
    r"<([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9.-]{1,253})>(?: +(.*))?$"
)
_QUOTED_PATH = re.compile(f'<({_QUOTED}@[^\\s<>"]{{1,253}})>(?: +(.*))?$')


class Suppressions(Protocol):
    """The suppression list as SMTP asks it (relayd.ingress.suppression.Lookup)."""

    def find(self, sender: str, account: str | None, rcpts: list[str]) -> dict[str, Entry]: ...


class IngressHandler:
    """aiosmtpd hooks: the relay policy and the hand-off to the spool."""

    def __dir__(self) -> list[str]:
        """Nothing for aiosmtpd's per-connection introspection (see RelaySMTP.__dir__)."""
        return []

    def __init__(
        self,
        config: Ingress,
        auth: Auth,
        hostname: str,
        space: FreeSpace,
        accept: Accept,
        suppressions: Suppressions,
        on_suppressed: str,
    ) -> None:
        self.config, self.auth, self.hostname, self.space = config, auth, hostname, space
        self.accept, self.suppressions, self.on_suppressed = accept, suppressions, on_suppressed
        self.loop = asyncio.get_running_loop()
        self.hooks = {n[7:]: getattr(self, n) for n in dir(type(self)) if n.startswith("handle_")}
        self._trusted: dict[str, bool] = {}
        self.sessions: set[RelaySMTP] = set()
        self.per_ip: Counter[str] = Counter()
        self.users = Directory(auth.users_file)
        self.guard = LoginGuard(auth.max_failures, auth.lockout, time.monotonic)

    def reload(
        self, config: Ingress, auth: Auth, hostname: str, space: FreeSpace, on_suppressed: str
    ) -> None:
        self.config, self.auth, self.hostname, self.space = config, auth, hostname, space
        self.on_suppressed = on_suppressed
        self._trusted.clear()
        self.users = Directory(auth.users_file)
        self.guard.max_failures, self.guard.lockout = auth.max_failures, auth.lockout

    # -- connections ------------------------------------------------------------------------

    def trusted(self, client: str) -> bool:
        """Cached per address: parsing it and matching the networks cost more than the rest of
        a connection's set-up."""
        known = self._trusted.get(client)
        if known is None:
            if len(self._trusted) >= 4096:
                self._trusted.clear()
            known = self._trusted[client] = self.config.is_trusted(client)
        return known

    def admit(self, session: RelaySMTP) -> str:
        """Count a new connection; the reply to refuse it with, or "" to serve it."""
        self.sessions.add(session)
        self.per_ip[session.client] += 1
        if len(self.sessions) > self.config.max_connections:
            return "421 4.7.0 Too many connections, try again later"
        if self.per_ip[session.client] > self.config.max_connections_per_ip:
            return "421 4.7.0 Too many connections from your address, try again later"
        if self.guard.locked(session.client):
            return "421 4.7.0 Too many failed logins, try again later"
        return ""

    def release(self, session: RelaySMTP) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.per_ip[session.client] -= 1
            if not self.per_ip[session.client]:
                del self.per_ip[session.client]

    async def verify(self, name: str, password: bytes) -> Credential | None:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.users.verify, name, password)

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd's last resort: one JSON event (not a bare traceback), a temporary reply."""
        if isinstance(error, TLSSetupException):
            log.info("tls_failed", error=repr(error.__cause__ or error))
        else:
            log.error("session_error", error=repr(error), exc_info=error)
        return "451 4.3.0 Internal error, try again later"

    # -- SMTP hooks ---------------------------------------------------------------------------

    async def handle_EHLO(
        self,
        server: RelaySMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list,
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-DSN", "250-PIPELINING", "250 ENHANCEDSTATUSCODES"]

    async def handle_MAIL(
        self, server: RelaySMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        if address != "<>" and not valid_address(address, envelope.smtp_utf8):
            return "501 5.1.3 Bad sender address syntax"
        try:
            ret, envid = dsnparams.mail(server.dsn_params)
        except dsnparams.ParamError as exc:
            return exc.reply
        if self.space.low():  # before the client sends the message, not after
            log.warning("spool_low", client=server.client, sender=address)
            return space.REPLY
        user = _user(session)
        if user is not None:
            if address == "<>" or not user.may_send_as(address):
                log.warning("sender_refused", user=user.name, sender=address)
                return f"553 5.7.1 <{address}>: sender not allowed for login {user.name}"
            if not self.users.take(user):
                log.warning("rate_limited", user=user.name, sender=address, rate=user.rate)
                return "450 4.7.1 Message rate limit exceeded for this login, try later"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        assert isinstance(envelope, RelayEnvelope)
        envelope.ret, envelope.envid = ret, envid
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: RelaySMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        # RFC 5321 4.5.1: <postmaster> without a domain must be accepted, from anyone: it is
        # relayd's own postmaster (server.hostname; route that domain to the mailbox), and
        # mail to it relays nothing for others. postmaster@ a domain is a recipient like any.
        postmaster = address.lower() == "postmaster"
        if postmaster:
            address = f"postmaster@{self.hostname}"
        if not valid_address(address, envelope.smtp_utf8):
            return "501 5.1.3 Bad recipient address syntax"
        try:
            notify, orcpt = dsnparams.rcpt(server.dsn_params)
        except dsnparams.ParamError as exc:
            return exc.reply
        user = _user(session)
        if user is None and not server.trusted and not postmaster:
            log.info("relay_denied", client=server.client, rcpt=address, sender=envelope.mail_from)
            return f"554 5.7.1 <{address}>: Relay access denied"
        limit = self.config.max_recipients
        if user is not None and user.max_recipients:
            limit = min(limit, user.max_recipients)
        if len(envelope.rcpt_tos) >= limit:
            return "452 4.5.3 Too many recipients"
        assert isinstance(envelope, RelayEnvelope)
        sender = "" if envelope.mail_from == "<>" else envelope.mail_from or ""
        found = self.suppressions.find(sender, user and user.account, [address]).get(address)
        if found is not None:
            reason = found.why()
            log.info(
                "rcpt_suppressed", client=server.client, sender=sender, rcpt=address, why=reason
            )
            if self.on_suppressed == "refuse":
                return f"550 5.7.1 <{address}>: {reason}"
            envelope.suppressed[len(envelope.rcpt_tos)] = found
        envelope.rcpt_tos.append(address)
        envelope.notify.append(notify)
        envelope.orcpt.append(orcpt)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        client = server.client
        sender = "" if envelope.mail_from == "<>" else envelope.mail_from or ""
        content = envelope.original_content or b""
        envelope.content = envelope.original_content = None  # held once, here, from now on
        if headers.has_bare_newlines(content):
            if self.config.bare_newlines == "reject":
                return "554 5.6.0 Message contains bare CR or LF characters"
            content = headers.to_crlf(content)
        if headers.longest_line_over(content, self.config.max_line_length):
            return f"500 5.5.2 Line too long (over {self.config.max_line_length} characters)"
        user = _user(session)
        if user is not None:
            senders = headers.from_addresses(content)
            if not senders or not all(user.may_send_as(a) for a in senders):
                log.warning("from_refused", user=user.name, sender=sender, header_from=senders)
                return f"550 5.7.1 From header not allowed for login {user.name}"
        try:
            meta, content = metadata.extract(
                content, self.config.metadata_headers, self.config.keep_metadata_headers
            )
            stream, content = metadata.extract_stream(content)
        except metadata.MetadataError as exc:
            log.info("metadata_refused", client=client, sender=sender, reply=exc.reply)
            return exc.reply
        helo = _UNPRINTABLE.sub("?", session.host_name or "")  # client text, kept printable
        queue_id = new_queue_id()
        head = headers.trace_headers(
            content, self.hostname, client, helo, envelope.smtp_utf8, queue_id
        )
        if user is not None:
            origin = user.account
        else:  # an untrusted client's only recipients are the postmaster (handle_RCPT)
            origin = f"{'trusted' if server.trusted else 'postmaster'}:{client}"
        try:
            await self.accept(
                _without_suppressed(
                    NewMessage(
                        queue_id,
                        sender,
                        list(envelope.rcpt_tos),
                        content,
                        client,
                        helo,
                        origin,
                        envelope.smtp_utf8,
                        head=head,
                        meta=meta,
                        stream=stream or (user.stream if user else TRANSACTIONAL),
                        **_dsn_fields(envelope),
                    ),
                    envelope,
                )
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("accept_failed", client=client, sender=sender, error=repr(exc))
            if space.is_full(exc):
                return space.REPLY
            return "451 4.3.0 Local error in processing, try again later"
        return f"250 2.0.0 Ok: queued as {queue_id}"


def _dsn_fields(envelope: Envelope) -> dict[str, Any]:
    """NewMessage's DSN fields from a transaction: per-recipient lists only when a recipient
    gave its parameter (the spool's defaults otherwise)."""
    assert isinstance(envelope, RelayEnvelope)
    return {
        "envid": envelope.envid,
        "ret": envelope.ret,
        "notify": list(envelope.notify) if any(envelope.notify) else [],
        "orcpt": list(envelope.orcpt) if any(o is not None for o in envelope.orcpt) else [],
    }


def _without_suppressed(msg: NewMessage, envelope: RelayEnvelope) -> NewMessage:
    """The message to the recipients not suppressed (DSN parameters kept in step), with the
    suppressed ones recorded; none left: only their events are stored."""
    stopped = envelope.suppressed
    if not stopped:
        return msg
    keep = [i for i in range(len(msg.recipients)) if i not in stopped]
    msg.suppressed = [
        (msg.recipients[i], e.scope, e.reason, e.bounce_class) for i, e in stopped.items()
    ]
    msg.recipients = [msg.recipients[i] for i in keep]
    msg.notify = [msg.notify[i] for i in keep] if msg.notify else []
    msg.orcpt = [msg.orcpt[i] for i in keep] if msg.orcpt else []
    if not msg.recipients:
        msg.body, msg.head = b"", b""
    return msg


def _user(session: Session) -> Credential | None:
    return session.auth_data if session.authenticated else None


async def start_listeners(
    handler: IngressHandler,
    tls: ssl.SSLContext | None,
    bound: list[tuple[Listener, list[socket.socket]]],
) -> list[asyncio.Server]:
    """Serve SMTP on sockets bound beforehand (by the queue process, before the fork)."""
    loop = asyncio.get_running_loop()
    servers = []
    for listener, socks in bound:
        for sock in socks:
            servers.append(
                await loop.create_server(
                    lambda listener=listener: RelaySMTP(handler, listener, tls),
                    sock=sock,
                    ssl=tls if listener.kind == "smtps" else None,
                    backlog=1024,
                )
            )
    return servers
