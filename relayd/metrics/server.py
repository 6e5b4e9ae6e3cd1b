"""The operations listener of the queue process: GET /metrics, /healthz, /readyz.

A minimal HTTP/1.1 server on asyncio.start_server (one request per connection, then close):
aiohttp costs the queue process ~13 MB and it is imported in the ingress process only. It
never blocks the event loop: the spool is read in a thread (relayd.metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from http import HTTPStatus

from prometheus_client import CONTENT_TYPE_LATEST

from relayd.config import HostPort
from relayd.events.log import log
from relayd.metrics import Metrics
from relayd.metrics.health import Health

HEAD_LIMIT = 8192  # bytes of request line and headers
READ_TIMEOUT = 5.0
PROBLEM = "application/problem+json"


class MonitoringServer:
    def __init__(self, metrics: Metrics, health: Health) -> None:
        self.metrics, self.health = metrics, health
        self.server: asyncio.Server | None = None

    async def start(self, address: HostPort) -> None:
        try:
            self.server = await asyncio.start_server(
                self._serve, address.host, address.port, limit=HEAD_LIMIT
            )
        except OSError as exc:  # relayd stops: say which key names the address
            problem = exc.strerror or str(exc)
            raise OSError(exc.errno, f"monitoring.address {address}: {problem}") from None
        log.info("monitoring_listening", address=str(address))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            status, kind, body = await self._answer(head)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            writer.close()
            return
        except Exception as exc:  # a bug here must not end the listener's answers
            log.error("monitoring_failed", error=repr(exc), exc_info=exc)
            status, kind, body = _problem(500, "Internal error", repr(exc))
        method = head.split(b" ", 1)[0]
        allow = "Allow: GET, HEAD\r\n" if status == 405 else ""
        writer.write(
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{allow}\r\n".encode()
            + (b"" if method == b"HEAD" else body)
        )
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()

    async def _answer(self, head: bytes) -> tuple[int, str, bytes]:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _problem(400, "Bad request line", "expected: GET /path HTTP/1.1")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target not in (b"/metrics", b"/healthz", b"/readyz"):
            return _problem(404, "Not found", "this listener serves /metrics, /healthz, /readyz")
        if method not in (b"GET", b"HEAD"):
            return _problem(405, "Method not allowed", f"{target.decode()} takes GET or HEAD")
        if target == b"/metrics":
            return 200, CONTENT_TYPE_LATEST, await self.metrics.render()
        if target == b"/healthz":
            return 200, "text/plain; charset=utf-8", b"ok\n"
        problems = await self.health.problems()
        body = json.dumps({"ready": not problems, "failing": problems}).encode()
        return (503 if problems else 200), "application/json", body


def _problem(status: int, title: str, detail: str) -> tuple[int, str, bytes]:
    """An RFC 9457 problem document."""
    doc = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return status, PROBLEM, json.dumps(doc).encode()
