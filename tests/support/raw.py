"""A raw-socket SMTP client: sends exactly the bytes given, reads replies line by line.

smtplib normalises line endings, dot-stuffs and refuses to pipeline; hostile-input tests need to
send what a broken or malicious client would, and to see every reply line as it arrives.
"""

from __future__ import annotations

import re
import socket
import ssl
from dataclasses import dataclass
from types import TracebackType

_LINE = re.compile(rb"^(\d{3})([ -])(.*)$", re.DOTALL)


@dataclass
class Reply:
    """One SMTP reply: its code and every line, without CRLF (multi-line replies have many)."""

    code: int
    lines: list[str]

    @property
    def line(self) -> str:
        """The last line, e.g. "250 2.0.0 Ok: queued as ABC"."""
        return self.lines[-1]

    def __str__(self) -> str:
        return " | ".join(self.lines)


class RawSMTP:
    """One client connection; every read is bounded by ``timeout`` seconds."""

    def __init__(
        self, port: int, host: str = "127.0.0.1", source: str | None = None, timeout: float = 5.0
    ) -> None:
        self.sock: socket.socket = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.buffer = b""

    def __enter__(self) -> RawSMTP:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Send ``data`` as it is, in one write (one TCP segment when it fits)."""
        self.sock.sendall(data)

    def _fill(self) -> bool:
        """Read more bytes into the buffer; False at EOF (a reset counts as EOF)."""
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            return False
        self.buffer += chunk
        return bool(chunk)

    def readline(self) -> bytes:
        """One line with its line ending; b"" when the server closed first."""
        while b"\n" not in self.buffer:
            if not self._fill():
                line, self.buffer = self.buffer, b""
                return line
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def reply(self) -> Reply:
        """The next complete reply; EOFError if the connection ends before one arrives."""
        lines: list[str] = []
        while True:
            raw = self.readline()
            if not raw.endswith(b"\r\n"):
                raise EOFError(f"connection closed; partial reply {lines!r} + {raw!r}")
            m = _LINE.match(raw[:-2])
            if not m:
                raise AssertionError(f"malformed reply line {raw!r} after {lines!r}")
            lines.append(raw[:-2].decode("utf-8", "replace"))
            if m[2] == b" ":
                return Reply(int(m[1]), lines)

    def cmd(self, line: str | bytes) -> Reply:
        """Send one command line (CRLF added) and read its reply."""
        data = line.encode() if isinstance(line, str) else line
        self.send(data + b"\r\n")
        return self.reply()

    def replies(self, n: int) -> list[Reply]:
        return [self.reply() for _ in range(n)]

    def quiet_for(self, seconds: float) -> bool:
        """True if the server sent nothing for ``seconds`` (a client pacing its input).

        Whatever did arrive stays in ``buffer`` for ``reply()``; at EOF, reply() raises.
        """
        if self.buffer:
            return False
        self.sock.settimeout(seconds)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return True
        except ConnectionResetError:
            return False
        finally:
            self.sock.settimeout(self.timeout)
        self.buffer += chunk
        return False

    def read_until_eof(self) -> bytes:
        """Everything the server still sends before closing (bounded by the timeout)."""
        while self._fill():
            pass
        data, self.buffer = self.buffer, b""
        return data

    def starttls(self) -> ssl.SSLSocket:
        """Handshake on the connection after the server said 220 to STARTTLS.

        Any plaintext the server sent after its 220 would sit in the buffer; the caller checks
        ``buffer`` is empty before calling (an injected reply would be a bug on its own).
        """
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.sock = ctx.wrap_socket(self.sock, server_hostname="relay.test")
        return self.sock
