"""Small helpers shared by the tests: polling with a deadline, ports, mail submission."""

from __future__ import annotations

import contextlib
import smtplib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from relayd.model.ids import new_queue_id
from relayd.model.message import NewMessage
from relayd.spool import schema, store


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on the port now."""
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def send(port: int, rcpts: list[str], sender: str = "app@sender.test", subject: str = "hi") -> str:
    """Submit one message; returns relayd's 250 reply text (with the queue id)."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, ", ".join(rcpts), subject
    msg.set_content("hello\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail(sender)
        for rcpt in rcpts:
            client.rcpt(rcpt)
        code, reply = client.data(msg.as_bytes())
    assert code == 250, reply
    return reply.decode()


def mx_zone(dns, domain: str, *hosts: tuple[int, str, str]) -> None:
    """Publish MX records for ``domain``: (preference, host name, address)."""
    for pref, host, ip in hosts:
        dns.add(domain, "MX", f"{pref} {host}")
        dns.add(host, "A", ip)


@contextlib.contextmanager
def steady_load(
    port: int, domain: str, clients: int = 4, per_client: int = 2000
) -> Iterator[list[str]]:
    """Clients each sending one message per connection, a recipient of its own per message,
    until the block ends (or each has sent ``per_client``); yields the recipients relayd
    acknowledged, growing as it goes. A refused or dropped attempt is not acknowledged."""
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        for i in range(per_client):
            if stop.is_set():
                return
            rcpt = f"t{n}-{i}@{domain}"
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
                    c.sendmail("a@sender.test", [rcpt], f"Subject: {rcpt}\r\n\r\nx")
            except (OSError, smtplib.SMTPException):
                stop.wait(0.1)  # relayd is down: a real client backs off too
                continue
            with lock:
                acked.append(rcpt)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    try:
        yield acked
    finally:
        stop.set()
        for t in threads:
            t.join(30)


def seed_deferred_backlog(path: Path, count: int, domain: str) -> None:
    """Write ``count`` messages that were tried once and are due again now, as a crash or an
    outage would leave them."""
    schema.prepare(path)
    conn = schema.connect(path)
    now = time.time()
    conn.execute("BEGIN")
    for i in range(count):
        msg = NewMessage(
            new_queue_id(),
            "app@sender.test",
            [f"r{i}@{domain}"],
            b"Subject: backlog\r\n\r\nbody\r\n",
            "127.0.0.1",
            "seed",
            "smtp",
            False,
            now - 60,
            False,
        )
        store.insert_message(conn, msg, now)
    conn.execute("UPDATE recipients SET state = 1, attempts = 1, next_attempt = ?", (now - 1,))
    conn.execute("COMMIT")
    conn.close()
