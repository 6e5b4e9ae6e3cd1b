"""A real webhook receiver: an HTTP server on 127.0.0.1 in a thread that checks every POST with
the standardwebhooks package (not relayd's code) against the secrets the test gives it, and
answers what the test scripts: a status per POST, or a hang."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError


@dataclass
class Post:
    at: float  # time.monotonic() of arrival
    headers: dict[str, str]
    body: bytes
    verified_by: list[str]  # the secrets whose signature it carries
    data: Any
    status: int = 0  # what the receiver answered
    events: list[dict[str, Any]] = field(default_factory=list)  # one, or a batch's


class Receiver:
    def __init__(self) -> None:
        self.secrets: list[str] = []  # a POST must verify with one of them
        self.answer: Callable[[Post], int] = lambda post: 200
        self.hang = False  # hold every request, unanswered, until stop()
        self.posts: list[Post] = []
        self.bad: list[str] = []  # POSTs that did not verify, and why
        self._cond = threading.Condition()
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real receivers do

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                status = receiver._take(dict(self.headers.items()), body)
                if receiver.hang:  # never answers; the connection closes at stop()
                    receiver._release.wait(120)
                    self.close_connection = True
                    return
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"no" if status >= 300 else b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def start(self) -> Receiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()

    def _take(self, headers: dict[str, str], body: bytes) -> int:
        verified, data = [], None
        for secret in list(self.secrets):
            try:
                data = Webhook(secret).verify(body, headers)
                verified.append(secret)
            except WebhookVerificationError:
                continue
        post = Post(time.monotonic(), headers, body, verified, data)
        if data is not None:
            post.events = data["data"]["events"] if data["type"] == "batch" else [data]
        with self._cond:
            if not verified:
                self.bad.append(f"{headers.get('webhook-id')}: no signature verified")
                post.status = 400
            else:
                post.status = self.answer(post)
            self.posts.append(post)
            self._cond.notify_all()
        return post.status

    # -- what the test reads ----------------------------------------------------------------

    def acked(self) -> list[Post]:
        with self._cond:
            return [p for p in self.posts if 200 <= p.status < 300]

    def events(self) -> list[dict[str, Any]]:
        """The events of the POSTs answered 2xx, in arrival order (repeats included)."""
        return [e for p in self.acked() for e in p.events]

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
                self._cond.wait(min(left, 0.1))
