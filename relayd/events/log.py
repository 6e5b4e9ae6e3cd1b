"""Structured events: one JSON line per reception and per delivery attempt, on stdout.

Keys are stable (queue_id, sender, rcpt, domain, mx, source_ip, code, response, attempt,
delay_s) so that an operator can grep the journal for a queue id or a recipient and see why.

Lines are written in batches: the lines of one turn of the event loop together, at the end of
that turn (or when 64 KiB have gathered, and at exit). A system call per line cost as much as
relaying the message did; waiting longer than one turn would lose lines to a SIGKILL. Both
relayd processes write to the same stdout, in whole lines of at most PIPE_BUF bytes per write.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import sys
from datetime import UTC, datetime
from typing import TextIO

import msgspec
import structlog

from relayd.events.records import Event

# JSON lines through msgspec (a third of json.dumps's time); a value it does not know (an
# exception, a path) is written as its repr
_encode = msgspec.json.Encoder(enc_hook=repr).encode


def _render(event: dict, **_: object) -> str:
    return _encode(event).decode()


LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
LEVELS["error"] = logging.ERROR
_BUFFER_LIMIT = 64 * 1024


class BatchedLogger:
    """structlog logger that buffers rendered lines and writes them together."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.lines: list[str] = []
        self.size = 0
        self.pending: asyncio.Handle | None = None

    def msg(self, message: str) -> None:
        self.lines.append(message)
        self.size += len(message)
        if self.size >= _BUFFER_LIMIT:
            self.flush()
        elif self.pending is None:
            try:
                self.pending = asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no event loop (start-up, shutdown): write at once
                self.flush()

    log = debug = info = warning = error = critical = exception = msg

    def flush(self) -> None:
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
        if not self.lines:
            return
        self.out.flush()
        fd = self.out.fileno()
        for chunk in _chunks(self.lines):
            while chunk:
                chunk = chunk[os.write(fd, chunk) :]
        self.lines.clear()
        self.size = 0


def _chunks(lines: list[str]) -> list[bytes]:
    """Lines joined into writes of at most PIPE_BUF bytes (one line may exceed it alone): the
    two relayd processes share stdout, and only writes that small are atomic on a pipe."""
    chunks: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for line in lines:
        data = line.encode("utf-8", "surrogateescape") + b"\n"
        if current and size + len(data) > select.PIPE_BUF:
            chunks.append(b"".join(current))
            current, size = [], 0
        current.append(data)
        size += len(data)
    if current:
        chunks.append(b"".join(current))
    return chunks


_logger = BatchedLogger(sys.stdout)


class _LibraryRecords(logging.Handler):
    """Records of the libraries (aiosmtpd, asyncio) as JSON lines too: their text can hold
    client bytes, CR included, that would break a plain line."""

    def emit(self, record: logging.LogRecord) -> None:
        log.log(
            record.levelno,
            "library",
            logger=record.name,
            message=record.getMessage(),
            exc_info=record.exc_info or False,
        )


_level = logging.INFO


def configure(level: str = "info") -> None:
    global _level
    _level = LEVELS[level]
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_render),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=lambda *args: _logger,
        cache_logger_on_first_use=False,  # SIGHUP may change the level
    )
    root = logging.getLogger()
    root.handlers = [_LibraryRecords()]
    root.setLevel(logging.WARNING)
    # aiosmtpd narrates every command at INFO and warns about each bogus one; relayd's own
    # events say what matters, so only its errors pass.
    logging.getLogger("mail.log").setLevel(logging.ERROR)


def flush() -> None:
    _logger.flush()


log = structlog.get_logger("relayd")


def emit(events: list[Event]) -> None:
    """The log lines of records that are now durable: the lines structlog's chain would make
    (the same keys in the same order), rendered here at once. Two lines a message went through
    that chain at ~40 µs each, a tenth of the queue process's time per message."""
    if _level > logging.INFO:
        return
    stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    for e in events:
        line = {"queue_id": e.queue_id, **e.data, "event": e.type, "level": "info"}
        line["timestamp"] = stamp
        _logger.msg(_encode(line).decode())
