"""Fake receiving MX on raw asyncio streams, so tests can script every reply and misbehaviour."""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

_MAIL_RE = re.compile(r"MAIL FROM:\s*<([^>]*)>\s*(.*)", re.IGNORECASE)
_RCPT_RE = re.compile(r"RCPT TO:\s*<([^>]*)>\s*(.*)", re.IGNORECASE)


@dataclass
class Conn:
    """One accepted TCP connection, as seen by the server."""

    peer_ip: str
    peer_port: int
    started: float  # time.monotonic()
    ehlo: str = ""  # last EHLO/HELO argument
    tls: bool = False
    ended: float | None = None
    commands: list[str] = field(default_factory=list)  # every command line, in order
    pipelined: list[str] = field(default_factory=list)  # commands read with more behind them
    ahead: int = 0  # message texts whose end came with more behind it (the next MAIL)


@dataclass
class Received:
    """One message the server accepted with a 2xx reply to DATA."""

    mail_from: str
    mail_options: list[str]  # MAIL parameters, e.g. ["SIZE=123", "SMTPUTF8"]
    rcpts: list[str]  # accepted recipients only
    data: bytes  # dot-unstuffed, line endings as received, without the final "."
    peer_ip: str
    ehlo: str
    tls: bool


class _Close(Exception):
    """Raised inside a session to end it (QUIT, "drop", rejecting greeting)."""


def self_signed_tls_context(directory: Path, *names: str) -> tuple[ssl.SSLContext, Path]:
    """Server TLS context with a fresh self-signed cert; also returns the cert path for clients.

    names are DNS names or IP addresses put in the subjectAltName (default "mx.test"); the
    openssl CLI is used because the cryptography package is not a test dependency.
    """
    names = names or ("mx.test",)
    cert, key = directory / f"{names[0]}.crt", directory / f"{names[0]}.key"
    sans = ",".join(f"{'IP' if _is_ip(n) else 'DNS'}:{n}" for n in names)
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-nodes", "-days", "1", "-subj", f"/CN={names[0]}"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-addext", f"subjectAltName={sans}", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx, cert


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class FakeMX:
    """SMTP server in a background event loop, recording connections and messages.

    Reply attributes may be changed while running; each holds a reply line (multi-line replies
    separated by "\\n") or "drop" (close without replying) or "stall" (never reply).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls_context: ssl.SSLContext | None = None,
        hostname: str = "mx.test",
        on_connect: str | None = None,
        mail_reply: str = "250 2.1.0 ok",
        rcpt_reply: str = "250 2.1.5 ok",
        rcpt_replies: dict[str, str] | None = None,
        data_reply: str = "250 2.0.0 queued as {n}",
        accept_delay: float = 0.0,
        pipelining: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.tls_context = tls_context
        self.hostname = hostname
        self.on_connect = on_connect  # greeting; None means "220 <hostname> ESMTP"
        self.connect_replies: collections.deque[str] = collections.deque()  # used before on_connect
        self.mail_reply = mail_reply
        self.rcpt_reply = rcpt_reply
        self.rcpt_replies: dict[str, str] = rcpt_replies or {}  # lowercase address -> reply
        self.data_reply = data_reply  # "{n}" becomes the message number
        self.data_replies: collections.deque[str] = collections.deque()  # used before data_reply
        self.accept_delay = accept_delay  # seconds before the reply to DATA
        # when set to a clear Event: a message is recorded, then its reply waits for the event
        self.reply_gate: threading.Event | None = None
        self.pipelining = pipelining  # offer PIPELINING in EHLO
        self.connections: list[Conn] = []
        self.messages: list[Received] = []
        self.current_connections = 0
        self.max_concurrent_connections = 0
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- test-facing helpers ------------------------------------------------------------------

    def reset(self) -> None:
        """Forget recorded connections/messages; max_concurrent restarts from the current count."""
        with self._cond:
            self.connections.clear()
            self.messages.clear()
            self.max_concurrent_connections = self.current_connections

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Block until predicate() holds (re-checked on each server event), else TimeoutError."""
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise TimeoutError(
                    f"FakeMX {self.host}:{self.port}: no {what} after {timeout}s;"
                    f" connections={len(self.connections)} messages={len(self.messages)}"
                    f" current={self.current_connections}"
                )

    def wait_for_messages(self, n: int, timeout: float = 10.0) -> list[Received]:
        self.wait_for(lambda: len(self.messages) >= n, timeout, f"{n} message(s)")
        return list(self.messages)

    def wait_for_connections(self, n: int, timeout: float = 10.0) -> list[Conn]:
        self.wait_for(lambda: len(self.connections) >= n, timeout, f"{n} connection(s)")
        return list(self.connections)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no session is open (e.g. the client gave up on a stalled server)."""
        self.wait_for(lambda: self.current_connections == 0, timeout, "no open connections")

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> FakeMX:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET  # e.g. "::1"
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(sock, ready), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("FakeMX event loop did not start")
        return self

    def stop(self) -> None:
        """Close the listener and every open session (stalled ones too), then end the thread."""
        if self._loop is None or self._thread is None or self._stopping is None:
            return
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=10)
        self._loop, self._thread = None, None

    def __enter__(self) -> FakeMX:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, sock: socket.socket, ready: threading.Event) -> None:
        assert self._loop is not None
        try:
            self._loop.run_until_complete(self._serve(sock, ready))
        finally:
            self._loop.close()

    async def _serve(self, sock: socket.socket, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._session, sock=sock, limit=1 << 20)
        ready.set()
        await self._stopping.wait()
        server.close()
        # sessions of connections accepted just now may not have registered in _tasks yet
        others = self._tasks | (asyncio.all_tasks() - {asyncio.current_task()})
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await server.wait_closed()

    # -- SMTP session -------------------------------------------------------------------------

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        ip, port = writer.get_extra_info("peername")[:2]
        conn = Conn(peer_ip=ip, peer_port=port, started=time.monotonic())
        with self._cond:
            self.connections.append(conn)
            self.current_connections += 1
            self.max_concurrent_connections = max(
                self.max_concurrent_connections, self.current_connections
            )
            self._cond.notify_all()
        try:
            await self._dialogue(conn, reader, writer)
        except (_Close, OSError, EOFError, ValueError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()
            self._tasks.discard(task)
            with self._cond:
                conn.ended = time.monotonic()
                self.current_connections -= 1
                self._cond.notify_all()

    async def _reply(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: str
    ) -> None:
        """Send a reply, or act out "drop"/"stall"."""
        if line == "drop":
            raise _Close
        if line == "stall":
            while await reader.read(65536):  # swallow input until the client hangs up
                pass
            raise _Close
        writer.write(("\r\n".join(line.splitlines()) + "\r\n").encode())
        await writer.drain()

    async def _dialogue(
        self, conn: Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:

        async def reply(line: str) -> None:
            await self._reply(reader, writer, line)

        greeting = self._popleft(self.connect_replies) or self.on_connect
        await reply(greeting or f"220 {self.hostname} ESMTP fakemx")
        if greeting and not greeting.startswith("220"):
            raise _Close
        mail_from: str | None = None
        mail_options: list[str] = []
        rcpts: list[str] = []
        while raw := await reader.readline():
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            conn.commands.append(line)
            if reader._buffer:  # type: ignore[attr-defined]  # the client sent on without a reply
                conn.pipelined.append(line)
            verb = line.split(" ", 1)[0].upper()
            arg = line[len(verb) :].strip()
            if verb in ("EHLO", "HELO"):
                conn.ehlo, mail_from, rcpts = arg, None, []
                if verb == "HELO":
                    await reply(f"250 {self.hostname}")
                    continue
                starttls = [] if self.tls_context is None or conn.tls else ["STARTTLS"]
                pipelining = ["PIPELINING"] if self.pipelining else []
                lines = [self.hostname, *pipelining, "8BITMIME", "SMTPUTF8", "SIZE 52428800"]
                lines += ["ENHANCEDSTATUSCODES", *starttls]
                await reply("\n".join(f"250-{x}" for x in lines[:-1]) + f"\n250 {lines[-1]}")
            elif verb == "STARTTLS":
                if self.tls_context is None or conn.tls:
                    await reply("502 5.5.1 STARTTLS not available")
                    continue
                await reply("220 2.0.0 ready to start TLS")
                await writer.start_tls(self.tls_context)
                conn.tls, conn.ehlo, mail_from, rcpts = True, "", None, []
            elif verb == "MAIL":
                match = _MAIL_RE.fullmatch(line)
                if not conn.ehlo:
                    await reply("503 5.5.1 EHLO first")
                elif mail_from is not None:
                    await reply("503 5.5.1 nested MAIL")
                elif not match:
                    await reply("501 5.5.4 syntax: MAIL FROM:<address>")
                else:
                    answer = self.mail_reply
                    await reply(answer)
                    if answer.startswith("2"):
                        mail_from, mail_options, rcpts = match[1], match[2].split(), []
            elif verb == "RCPT":
                match = _RCPT_RE.fullmatch(line)
                if mail_from is None:
                    await reply("503 5.5.1 MAIL first")
                elif not match:
                    await reply("501 5.5.4 syntax: RCPT TO:<address>")
                else:
                    answer = self.rcpt_replies.get(match[1].lower(), self.rcpt_reply)
                    await reply(answer)
                    if answer.startswith("2"):
                        rcpts.append(match[1])
            elif verb == "DATA":
                if mail_from is None or not rcpts:
                    await reply(
                        "503 5.5.1 MAIL first"
                        if mail_from is None
                        else "554 5.5.1 no valid recipients"
                    )
                    continue
                await reply("354 end data with <CR><LF>.<CR><LF>")
                data = await self._read_data(reader)
                with self._cond:
                    number = len(self.messages) + 1
                answer = (self._popleft(self.data_replies) or self.data_reply).replace(
                    "{n}", str(number)
                )
                if self.accept_delay:
                    await asyncio.sleep(self.accept_delay)
                if reader._buffer:  # type: ignore[attr-defined]  # sent on before our reply
                    conn.ahead += 1
                if answer.startswith("2"):
                    with self._cond:
                        self.messages.append(
                            Received(
                                mail_from,
                                mail_options,
                                rcpts,
                                data,
                                conn.peer_ip,
                                conn.ehlo,
                                conn.tls,
                            )
                        )
                        self._cond.notify_all()
                if self.reply_gate is not None:
                    await asyncio.to_thread(self.reply_gate.wait, 30)
                await reply(answer)
                mail_from, rcpts = None, []
            elif verb == "RSET":
                mail_from, rcpts = None, []
                await reply("250 2.0.0 ok")
            elif verb == "NOOP":
                await reply("250 2.0.0 ok")
            elif verb == "QUIT":
                await reply("221 2.0.0 bye")
                raise _Close
            else:
                await reply("500 5.5.2 command not recognized")

    @staticmethod
    def _popleft(queue: collections.deque[str]) -> str | None:
        try:
            return queue.popleft()
        except IndexError:
            return None

    @staticmethod
    async def _read_data(reader: asyncio.StreamReader) -> bytes:
        """Read a DATA body up to the lone "." line, undoing dot-stuffing."""
        lines: list[bytes] = []
        while (line := await reader.readline()) != b".\r\n":
            if not line:
                raise EOFError("connection closed during DATA")
            lines.append(line[1:] if line.startswith(b".") else line)
        return b"".join(lines)
