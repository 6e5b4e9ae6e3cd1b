"""Delivery: one outbound SMTP connection carrying jobs to one site.

Opens to the site's hosts in order (falling back to the next MX or address when one cannot be
reached or greets with an error), with opportunistic STARTTLS, from the chosen source address
and with its EHLO name. Each recipient is judged by its own RCPT reply and the DATA reply:
2xx delivered, 4xx deferred, 5xx bounced; a lost connection or a timeout defers.

The client is relayd's own, not aiosmtplib: with PIPELINING (RFC 2920) a transaction costs two
round trips instead of four (MAIL, RCPT and DATA go out in one write), and aiosmtplib drops
replies that arrive before it waits for them. Per message that saved more CPU than anything
else left in the queue process (benchmarks/RESULTS.md). On a reused connection with mail
waiting, the next transaction's MAIL, RCPT and DATA go in the write that ends the text before
(RFC 2920 3.1), so that each message after the first costs one round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import ssl
from collections import deque
from collections.abc import Callable

from relayd.config import HostPort
from relayd.delivery.dns import LookupFailure, Resolver
from relayd.events.log import log
from relayd.mime import headers
from relayd.model.message import Job
from relayd.model.status import Reply

_MAX_LINE = 8192  # longest reply line accepted (RFC 5321 4.5.3.1.5 says 512)
_MAX_LINES = 100  # lines of one multi-line reply
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
PIECE = 256 * 1024  # a text streamed from the spool is read and written this much at a time
WRITE_BUFFER = 256 * 1024  # bytes queued in the transport before a stream waits to write more


class Unsendable(Exception):
    """A job that cannot go over this connection at all: its recipients' outcomes."""

    def __init__(self, outcomes: list[tuple[int, Reply]]) -> None:
        super().__init__(outcomes[0][1].text if outcomes else "")
        self.outcomes = outcomes


class ConnectFailure(Exception):
    def __init__(self, code: int, reply: str, mx: str) -> None:
        super().__init__(f"{code} {reply}")
        self.code, self.reply, self.mx = code, reply, mx


class SessionError(Exception):
    """The session cannot go on: connection lost, timeout, or a reply that is not SMTP."""


def _insecure_context() -> ssl.SSLContext:
    """Opportunistic TLS as Postfix's "may": encrypt, but do not verify (RFC 7435)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


_TLS = _insecure_context()


class _Client(asyncio.Protocol):
    """Reads replies as they arrive and hands them out in order, however many came at once."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._lines: list[str] = []
        self._replies: deque[tuple[int, str]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._socket: socket.socket | None = None
        self.pipelined = False  # replies to several commands are on their way
        self.error: SessionError | None = None
        self._writable: asyncio.Future[None] | None = None  # set while the transport is full

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        transport.set_write_buffer_limits(WRITE_BUFFER)  # type: ignore[attr-defined]
        if _QUICKACK is not None:
            self._socket = transport.get_extra_info("socket")

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(SessionError(f"connection lost{f': {exc}' if exc else ''}"))
        self.resume_writing()

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None:
            if not self._writable.done():
                self._writable.set_result(None)
            self._writable = None

    async def drain(self, timeout: float) -> None:
        """Wait until the transport takes more (a streamed text is not buffered whole)."""
        while self._writable is not None:
            if self.error is not None:
                raise self.error
            try:
                await asyncio.wait_for(asyncio.shield(self._writable), timeout)
            except TimeoutError:
                self._fail(SessionError(f"could not write for {timeout:g}s"))
        if self.error is not None:
            raise self.error

    def eof_received(self) -> bool:
        self._fail(SessionError("connection closed by the server"))
        return False

    def data_received(self, data: bytes) -> None:
        if self.pipelined:
            self._quickack()
        buffer = self._buffer
        buffer += data
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line, start = bytes(buffer[start : end + 1]), end + 1
            code = line[:3]
            if not code.isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
                self._fail(SessionError(f"not an SMTP reply: {line[:80]!r}"))
                return
            self._lines.append(line[4:].strip(b" \t\r\n").decode("utf-8", "replace"))
            if line[3:4] != b"-":
                self._replies.append((int(code), "\n".join(self._lines)))
                self._lines = []
            elif len(self._lines) > _MAX_LINES:
                self._fail(SessionError("reply with too many lines"))
                return
        del buffer[:start]
        if len(buffer) > _MAX_LINE:
            self._fail(SessionError("reply line too long"))
            return
        self._wake()

    def _fail(self, error: SessionError) -> None:
        if self.error is None:
            self.error = error
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def reply(self, timeout: float) -> tuple[int, str]:
        while not self._replies:
            if self.error is not None:
                raise self.error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, timeout)
            except TimeoutError:
                self._fail(SessionError(f"no reply within {timeout:g}s"))
                raise self.error from None  # type: ignore[misc]
            finally:
                self._waiter = None
        return self._replies.popleft()

    def discard_buffered(self) -> None:
        """After 220 to STARTTLS nothing may precede the handshake (RFC 3207 4.2): bytes already
        here are plaintext someone injected."""
        self._buffer.clear()
        self._replies.clear()

    def _quickack(self) -> None:
        """ACK at once while pipelined replies come in: a server that writes each reply with
        Nagle's algorithm on holds the second until the first is acknowledged, and a delayed
        ACK would stall every transaction by 40 ms (Linux clears TCP_QUICKACK by itself, so it
        is set again after each read)."""
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)

    def write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        assert self.transport is not None
        self.transport.write(data)

    def writelines(self, data: list[bytes]) -> None:
        """Several buffers in one call, none joined (a text is not copied to end it)."""
        if self.error is not None:
            raise self.error
        assert self.transport is not None
        self.transport.writelines(data)


class Connection:
    """An open SMTP session to one MX host."""

    def __init__(
        self, client: _Client, extensions: set[str], mx: str, source_ip: str, timeout: float
    ) -> None:
        self.client, self.extensions, self.mx = client, extensions, mx
        self.source_ip, self.timeout = source_ip, timeout
        self.broken = False
        self._ahead: tuple[Job, list[bytes]] | None = None  # a job whose envelope is written

    @classmethod
    async def open(
        cls,
        hosts: list[HostPort],
        resolver: Resolver,
        source_ip: str | None,
        ehlo: str,
        starttls: bool,
        connect_timeout: float,
        command_timeout: float,
    ) -> Connection:
        """Connect to the first host that answers with a usable greeting."""
        last = ConnectFailure(421, "4.4.1 no MX host could be reached", "")
        for host in hosts:
            try:
                addresses = await resolver.addresses(host.host)
            except LookupFailure as exc:
                last = ConnectFailure(exc.code, exc.reply, host.host)
                continue
            if not addresses:
                last = ConnectFailure(421, f"4.4.4 MX host {host.host} has no address", host.host)
            for ip in addresses:
                if source_ip and (":" in ip) != (":" in source_ip):
                    continue  # an IPv4 source cannot reach an IPv6 host
                mx = f"{host.host}[{ip}]:{host.port}"
                args = (ip, host.port, source_ip, ehlo, connect_timeout, command_timeout)
                try:
                    try:
                        client, extensions = await _session(*args, starttls)
                    except _TlsFailed:  # as Postfix "may": the same host again, in plain text
                        client, extensions = await _session(*args, False)
                except _Refused as exc:
                    last = ConnectFailure(exc.code, exc.reply, mx)
                    continue
                except (SessionError, OSError) as exc:
                    last = ConnectFailure(421, f"4.4.1 connect to {mx} failed: {exc}", mx)
                    continue
                assert client.transport is not None
                local = source_ip or client.transport.get_extra_info("sockname")[0]
                return cls(client, extensions, mx, local, command_timeout)
        raise last

    def envelope(
        self, job: Job, text: bytes | sqlite3.Blob, mail_from: str | None = None
    ) -> list[bytes]:
        """MAIL, RCPT and DATA for ``job``; raises Unsendable with its recipients' outcomes
        when it cannot go over this connection. ``mail_from`` is the return path to give
        (relayd's own, VERP), when not the job's sender."""
        options = ""
        if job.smtputf8:
            if "smtputf8" not in self.extensions:
                msg = "5.6.7 remote server does not support SMTPUTF8"
                raise Unsendable([(r.id, Reply(553, msg)) for r in job.recipients])
            options += " SMTPUTF8"
        if "8bitmime" in self.extensions and not _isascii(text):
            options += " BODY=8BITMIME"
        encoding = "utf-8" if job.smtputf8 else "ascii"
        sender = job.sender if mail_from is None else mail_from
        try:
            commands = [f"MAIL FROM:<{sender}>{options}\r\n".encode(encoding)]
            commands += [f"RCPT TO:<{r.rcpt}>\r\n".encode(encoding) for r in job.recipients]
        except UnicodeEncodeError as exc:  # ingress lets no such address through
            log.error("send_failed", queue_id=job.queue_id, mx=self.mx, error=repr(exc))
            reply = f"4.3.0 local error before MAIL FROM: {exc!r}"
            raise Unsendable([(r.id, Reply(421, reply)) for r in job.recipients]) from None
        commands.append(b"DATA\r\n")
        return commands

    async def send(
        self,
        job: Job,
        text: bytes | sqlite3.Blob,
        mail_from: str | None = None,
        then: Callable[[], tuple[Job, list[bytes]] | None] | None = None,
    ) -> list[tuple[int, Reply]]:
        """One transaction for ``job`` with its ``text`` (in memory, or a spool handle to stream
        it from in pieces): (recipient row id, outcome) for each recipient.

        ``then``, where the server pipelines, gives the next job's envelope (or None) as this
        text goes out: it goes in the same write, after the text (RFC 2920 3.1: message content
        may open a group), saving a round trip and a write per message. The caller must then
        send that job next on this connection: its DATA is already answered by then."""
        if self._ahead is not None and self._ahead[0] is job:
            commands, written = self._ahead[1], True
        else:
            try:
                commands, written = self.envelope(job, text, mail_from), False
            except Unsendable as exc:
                return exc.outcomes
        self._ahead = None
        replies = await self._exchange(commands, written)
        mail, data = replies[0], replies[-1]
        if mail[0] != 250:
            await self._abandon(data)
            return [(r.id, Reply(*mail)) for r in job.recipients]
        outcomes, accepted = [], []
        for r, (code, reply) in zip(job.recipients, replies[1:-1], strict=True):
            if code in (250, 251):
                accepted.append(r)
            else:
                outcomes.append((r.id, Reply(code, reply)))
        if not accepted:
            await self._abandon(data)
            return outcomes
        if data[0] == 354:
            try:
                if isinstance(text, bytes):
                    stuffed = _stuffed(text)
                    ahead = then() if then is not None and self.pipelining else None
                    self._ahead = ahead
                    self.client.pipelined = ahead is not None
                    self.client.writelines([stuffed, _end(stuffed), *(ahead[1] if ahead else ())])
                else:
                    await self._stream(text)
                data = await self.client.reply(self.timeout)
            except (SessionError, OSError) as exc:
                data = self._lost("the message text", exc)
            finally:
                self.client.pipelined = False
        return outcomes + [(r.id, Reply(*data)) for r in accepted]

    @property
    def pipelining(self) -> bool:
        return "pipelining" in self.extensions

    async def _stream(self, blob: sqlite3.Blob) -> None:
        """The text from the spool in pieces, each cut after a line end (so that dot-stuffing
        never straddles two), waiting for the transport to drain between them."""
        client = self.client
        blob.seek(0)
        carry, wrote = b"", False
        while piece := blob.read(PIECE):
            if carry:
                piece = carry + piece
            cut = piece.rfind(b"\n") + 1
            if cut == 0:  # no line end in a whole piece: keep reading
                carry = piece
                continue
            carry = piece[cut:]
            client.write(_stuffed(piece[:cut] if carry else piece))
            wrote = True
            await client.drain(self.timeout)
        last = _stuffed(carry) if carry else b""
        client.writelines([last, _end(last) if carry or not wrote else b".\r\n"])

    def _lost(self, phase: str, exc: BaseException) -> tuple[int, str]:
        self.broken = True
        return 421, f"4.4.2 lost connection with {self.mx} while sending {phase}: {exc}"

    async def _exchange(self, commands: list[bytes], written: bool) -> list[tuple[int, str]]:
        """Send the commands (all at once where the server pipelines; not again when
        ``written`` ahead) and read one reply each; when the connection fails, the commands
        left unanswered get a 421 saying so."""
        client = self.client
        pipelining = self.pipelining
        replies: list[tuple[int, str]] = []
        try:
            if pipelining:
                client.pipelined = True
                if not written:
                    client.write(b"".join(commands))
            for command in commands:
                if not pipelining:
                    client.write(command)
                replies.append(await client.reply(self.timeout))
        except (SessionError, OSError) as exc:
            verb = commands[len(replies)].split(b":")[0].strip().decode("ascii", "replace")
            replies += [self._lost(verb, exc)] * (len(commands) - len(replies))
        finally:
            client.pipelined = False
        return replies

    async def _abandon(self, data_reply: tuple[int, str]) -> None:
        """No transaction after all: a server that still said 354 to the pipelined DATA gets an
        empty message, ended at once (as Postfix does), then RSET."""
        if self.broken:
            return
        try:
            if data_reply[0] == 354:
                self.client.write(b".\r\n")
                await self.client.reply(self.timeout)
            self.client.write(b"RSET\r\n")
            await self.client.reply(self.timeout)
        except (SessionError, OSError):
            self.broken = True

    async def close(self) -> None:
        client = self.client
        try:
            if not self.broken and client.error is None:
                client.write(b"QUIT\r\n")
                await client.reply(min(self.timeout, 5))
        except (SessionError, OSError):
            pass
        finally:
            if client.transport is not None:
                client.transport.close()


def _end(stuffed: bytes) -> bytes:
    """What ends the data after this (last) text: the dot line, after a CRLF if it lacks one."""
    return b".\r\n" if stuffed.endswith(b"\r\n") else b"\r\n.\r\n"


def _stuffed(text: bytes) -> bytes:
    """Text that starts at the beginning of a line, dot-stuffed. Spooled text is CRLF throughout
    (``NewMessage.body``), so it is not checked again here (three passes over the bytes, a
    tenth of the CPU a 100 KB message costs); a text without a line-initial dot is returned as
    it is (no copy)."""
    text = headers.stuff_dots(text)
    if text.startswith(b"."):
        text = b"." + text
    return text


def _isascii(text: bytes | sqlite3.Blob) -> bool:
    if isinstance(text, bytes):
        return text.isascii()
    text.seek(0)
    while piece := text.read(PIECE):
        if not piece.isascii():
            return False
    return True


class _TlsFailed(Exception):
    """STARTTLS was offered but did not work out."""


class _Refused(Exception):
    """The server greeted with, or answered EHLO/HELO with, an error."""

    def __init__(self, code: int, reply: str) -> None:
        super().__init__(f"{code} {reply}")
        self.code, self.reply = code, reply


async def _session(
    ip: str,
    port: int,
    source_ip: str | None,
    ehlo: str,
    connect_timeout: float,
    command_timeout: float,
    starttls: bool,
) -> tuple[_Client, set[str]]:
    """Connected, greeted, EHLO done, and TLS if wanted and offered: the client and the
    server's extensions (lower case keywords)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + connect_timeout  # the connection and the 220 greeting, as documented
    _, client = await asyncio.wait_for(
        loop.create_connection(_Client, ip, port, local_addr=(source_ip, 0) if source_ip else None),
        connect_timeout,
    )
    try:
        try:  # a server that accepts but never greets must not hold us for command_timeout
            async with asyncio.timeout_at(deadline):
                code, text = await client.reply(connect_timeout)
        except TimeoutError:
            raise SessionError(f"no greeting within connect_timeout {connect_timeout:g}s") from None
        if code != 220:
            raise _Refused(code, text)
        extensions = await _hello(client, ehlo, command_timeout)
        if starttls and "starttls" in extensions:
            try:
                client.write(b"STARTTLS\r\n")
                code, text = await client.reply(command_timeout)
                if code != 220:
                    raise _TlsFailed(f"{code} {text}")
                client.discard_buffered()
                assert client.transport is not None
                tls_transport = await asyncio.wait_for(
                    loop.start_tls(client.transport, client, _TLS, server_hostname=None),
                    command_timeout,
                )
            except (SessionError, OSError, ssl.SSLError, TimeoutError) as exc:
                raise _TlsFailed(str(exc)) from exc
            client.transport = tls_transport  # type: ignore[assignment]
            extensions = await _hello(client, ehlo, command_timeout)  # RFC 3207 4.2
        return client, extensions
    except BaseException:
        if client.transport is not None:
            client.transport.close()
        raise


async def _hello(client: _Client, name: str, timeout: float) -> set[str]:
    """EHLO (HELO when the server does not know it): the extension keywords offered."""
    client.write(f"EHLO {name}\r\n".encode())
    code, text = await client.reply(timeout)
    if code == 250:
        return {line.split(" ", 1)[0].lower() for line in text.split("\n")[1:]}
    client.write(f"HELO {name}\r\n".encode())
    code, text = await client.reply(timeout)
    if code != 250:
        raise _Refused(code, text)
    return set()
