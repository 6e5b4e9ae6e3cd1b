"""Priority lanes: a message's stream (transactional or bulk) and the scheduler's two queues per
site. The scheduler alone (real spool writer, intake, SMTP client and fake MX, on a wall clock
the test moves) for the order of the queues, the connection share, the shared rate and the
loader; a real relayd for where the stream comes from (API field, X-Relayd-Stream header, the
key's or login's default) and for transactional mail overtaking a bulk backlog end to end."""

from __future__ import annotations

import http.client
import json
import smtplib
import sqlite3
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.fakemx import Conn, FakeMX, Received
from support.queue import Clock, run_queue, until
from support.util import free_port, listening, mx_zone, wait_until

from relayd.ingress import metadata
from relayd.ingress.credentials import Credential, load_credentials, save_credentials
from relayd.model.ids import new_queue_id
from relayd.model.message import BULK, TRANSACTIONAL, NewMessage
from relayd.queue.intake import Intake
from relayd.queue.scheduler import BULK_AHEAD, Scheduler
from relayd.spool import store

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery"


def message(rcpt: str, stream: str, received_at: float) -> NewMessage:
    return NewMessage(
        new_queue_id(),
        "a@s.test",
        [rcpt],
        b"Subject: lanes\r\n\r\nbody\r\n",
        "127.0.0.1",
        "t",
        "t",
        False,
        received_at,
        stream=stream,
    )


def bulk(n: int, clock: Clock) -> list[NewMessage]:
    return [message(f"b{i}@dest.test", BULK, clock.now) for i in range(n)]


def order(mx: FakeMX) -> list[str]:
    """Who got each message the MX accepted, in the order they arrived: b0, b1, ..., t0, ..."""
    return [m.rcpts[0].split("@")[0] for m in mx.messages]


def bulk_before(mx: FakeMX, name: str) -> int:
    """How many bulk messages arrived before ``name``."""
    seen = order(mx)
    return sum(1 for who in seen[: seen.index(name)] if who.startswith("b"))


# -- the scheduler alone ---------------------------------------------------------------------


def test_a_connection_takes_queued_transactional_mail_before_bulk_mail_queued_earlier(tmp_path):
    """One connection to the site: five bulk messages queued, then two transactional ones; the
    connection takes both transactional messages first, then the bulk ones in their order."""
    mx = FakeMX("127.0.0.10", 0).start()
    try:

        async def body(intake: Intake, _: Scheduler, clock: Clock, spool: Path) -> None:
            msgs = bulk(5, clock) + [
                message(f"t{i}@dest.test", TRANSACTIONAL, clock.now) for i in range(2)
            ]
            await intake.submit(msgs)
            await until(lambda: len(mx.messages) == 7, "all seven messages")

        run_queue(tmp_path, mx, body, "[shaping.default]\nmax_connections = 1\n")
        assert order(mx) == ["t0", "t1", "b0", "b1", "b2", "b3", "b4"]
        assert mx.max_concurrent_connections == 1
    finally:
        mx.stop()


def test_bulk_mail_holds_its_share_of_connections_and_transactional_mail_takes_the_rest(tmp_path):
    """max_connections = 3, transactional_connections = 1: bulk mail alone uses two connections
    (and drains on them); a transactional message sent behind a bulk backlog opens the third
    at once and arrives before the backlog has drained."""
    mx = FakeMX("127.0.0.10", 0, accept_delay=0.2).start()
    toml = "[shaping.default]\nmax_connections = 3\ntransactional_connections = 1\n"
    first: list[Conn] = []  # the bulk mail's connections
    try:

        async def body(intake: Intake, _: Scheduler, clock: Clock, spool: Path) -> None:
            await intake.submit(bulk(6, clock))
            await until(lambda: len(mx.messages) == 6, "the bulk mail alone")
            assert mx.max_concurrent_connections == 2  # its share, all of it
            first.extend(mx.connections)  # still open, and forgotten by reset
            mx.reset()
            await intake.submit(bulk(8, clock))
            await until(lambda: mx.current_connections == 2, "bulk on its two connections")
            await intake.submit([message("t0@dest.test", TRANSACTIONAL, clock.now)])
            await until(lambda: "t0" in order(mx), "the transactional message")
            # only what was on the wire already: on each bulk connection the message being sent
            # and the next one, whose MAIL/RCPT/DATA was pipelined behind the end of its text;
            # the other four of the backlog come after t0
            assert bulk_before(mx, "t0") <= 4
            await until(lambda: len(mx.messages) == 9, "the rest of the bulk mail")

        run_queue(tmp_path, mx, body, toml)
        # the third connection, unless a bulk connection took t0 at its next message first
        # (seen on a busy machine: transactional mail goes first on any connection)
        rcpts = [
            [x for x in c.commands if x.upper().startswith("RCPT TO:<")]
            for c in first + mx.connections
        ]
        carried = next(r for r in rcpts if any(x.startswith("RCPT TO:<t0@") for x in r))
        shared = any(x.startswith("RCPT TO:<b") for x in carried)
        assert mx.max_concurrent_connections == 3 or shared
    finally:
        mx.stop()


def test_a_transactional_message_books_the_sites_rate_ahead_of_a_bulk_backlog(tmp_path):
    """The site's rate is shared: at 20/s, with 60 bulk messages (3 s of them) on 18
    connections, a transactional message waits for no more than the bulk slots already booked
    (BULK_AHEAD per rate, not one per bulk connection), never for the backlog."""
    mx = FakeMX("127.0.0.10", 0).start()
    toml = "[shaping.default]\nmax_connections = 20\nmax_rate = '20/s'\n"
    try:

        async def body(intake: Intake, _: Scheduler, clock: Clock, spool: Path) -> None:
            await intake.submit(bulk(60, clock))
            await until(lambda: len(mx.messages) >= 10, "the first bulk deliveries")
            await intake.submit([message("t0@dest.test", TRANSACTIONAL, clock.now)])
            delivered = len(mx.messages)  # t0 is in memory now (admitted at its commit)
            await until(lambda: "t0" in order(mx), "the transactional message")
            assert bulk_before(mx, "t0") <= delivered + BULK_AHEAD + 2  # 2: while it connects
            assert mx.max_concurrent_connections == 19  # 18 for bulk: more than BULK_AHEAD

        run_queue(tmp_path, mx, body, toml)
    finally:
        mx.stop()


def test_the_loader_takes_a_due_transactional_retry_before_a_bulk_backlog_in_the_spool(tmp_path):
    """max_active = 10: bulk may fill 5 of it, the rest of a 40-message bulk backlog waits in
    the spool. A transactional message deferred an hour earlier comes due when the test moves
    the clock: the loader takes it ahead of the bulk backlog, and it arrives at once."""
    mx = FakeMX("127.0.0.10", 0, rcpt_replies={"t0@dest.test": "451 4.3.0 later"}).start()
    toml = "[delivery]\nmax_active = 10\n[shaping.default]\nmax_connections = 1\n"
    try:

        async def body(intake: Intake, scheduler: Scheduler, clock: Clock, spool: Path) -> None:
            await intake.submit([message("t0@dest.test", TRANSACTIONAL, clock.now)])
            await until(lambda: _attempts(spool, "t0@dest.test") == 1, "the first attempt")
            mx.rcpt_replies = {}
            mx.accept_delay = 0.05
            await intake.submit(bulk(40, clock))
            assert scheduler.active_bulk <= 5  # the rest stayed in the spool
            await until(lambda: len(mx.messages) >= 2, "the bulk mail going out")
            delivered = len(mx.messages)
            clock.now += 3600  # the retry is due by the given clock
            await until(lambda: "t0" in order(mx), "the transactional retry")
            assert bulk_before(mx, "t0") <= delivered + 3

        run_queue(tmp_path, mx, body, toml)
    finally:
        mx.stop()


def _attempts(spool: Path, rcpt: str) -> int:
    with sqlite3.connect(spool) as db:
        row = db.execute("SELECT attempts FROM recipients WHERE rcpt = ?", (rcpt,)).fetchone()
    return row[0] if row else -1


def test_load_due_takes_transactional_mail_first_and_bulk_within_its_limit(spool_conn):
    """The spool's side of the loader: transactional pending, then transactional retries, then
    bulk (at most bulk_limit), each in next-attempt order; the stream comes back with the job."""
    for i in range(4):
        store.insert_message(spool_conn, message(f"b{i}@dest.test", BULK, 1.0), float(i))
    store.insert_message(spool_conn, message("t0@dest.test", TRANSACTIONAL, 1.0), 10.0)
    jobs, more = store.load_due(spool_conn, 100.0, limit=10, retry_limit=10, bulk_limit=2)
    assert [(j.recipients[0].rcpt, j.stream) for j in jobs] == [
        ("t0@dest.test", TRANSACTIONAL),
        ("b0@dest.test", BULK),
        ("b1@dest.test", BULK),
    ]
    assert more  # the bulk limit was reached: more may be due


# -- the X-Relayd-Stream header ----------------------------------------------------------------


def test_the_stream_header_is_taken_out_of_the_text_and_a_bad_one_is_refused():
    text = b"From: a@s.test\r\nX-Relayd-Stream:  Bulk \r\nSubject: s\r\n\r\nX-Relayd-Stream: no\r\n"
    assert metadata.extract_stream(text) == (
        "bulk",
        b"From: a@s.test\r\nSubject: s\r\n\r\nX-Relayd-Stream: no\r\n",
    )
    plain = b"Subject: s\r\n\r\nbody\r\n"
    assert metadata.extract_stream(plain) == (None, plain)
    with pytest.raises(metadata.MetadataError) as bad:
        metadata.extract_stream(b"X-Relayd-Stream: urgent\r\n\r\n")
    assert bad.value.reply == (
        "550 5.6.0 Bad X-Relayd-Stream header: 'urgent' is not one of transactional, bulk"
    )
    with pytest.raises(metadata.MetadataError) as twice:
        metadata.extract_stream(b"X-Relayd-Stream: bulk\r\nX-Relayd-Stream: bulk\r\n\r\n")
    assert twice.value.reply == "550 5.6.0 Bad X-Relayd-Stream header: given twice"


def test_a_credentials_stream_is_kept_in_the_file(tmp_path):
    path = tmp_path / "users.json"
    cred = Credential("news", "x", ("example.test",), kind="key", key_id="k1", stream=BULK)
    save_credentials(path, {"key:news": cred})
    assert load_credentials(path)["key:news"].stream == BULK
    raw = json.loads(path.read_text())
    del raw["keys"]["news"]["stream"]  # a file written before streams
    path.write_text(json.dumps(raw))
    assert load_credentials(path)["key:news"].stream == TRANSACTIONAL


# -- a real relayd ---------------------------------------------------------------------------


class Api:
    def __init__(self, relay: Any, port: int) -> None:
        self.relay, self.port = relay, port

    def key(self, name: str, *options: str) -> str:
        out = self.relay.ctl("key", "add", name, "--sender", "example.test", *options).stdout
        return next(line for line in out.splitlines() if line.startswith("rk_"))

    def send(self, token: str, body: dict[str, Any]) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        conn.request("POST", "/v1/messages", json.dumps(body).encode(), headers)
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        conn.close()
        return resp.status, answer


@pytest.fixture
def lanes(relay, dns_server, tmp_path):
    """relayd with a relay (SMTP) and an http listener, mail for dest.test to 127.0.0.10."""
    mx_zone(dns_server, "dest.test", (10, "mx.dest.test", "127.0.0.10"))

    def make(extra: dict[str, Any] | None = None) -> Api:
        port = free_port()
        config = {
            "listeners": [
                {"address": f"127.0.0.1:{free_port()}", "kind": "relay"},
                {"address": f"127.0.0.1:{port}", "kind": "http"},
            ],
            "auth": {"users_file": "users.json"},
            **(extra or {}),
        }
        r = relay(config)
        wait_until(lambda: listening(port), 10, "the API listener")
        return Api(r, port)

    return make


def text(subject: str, *more: str) -> str:
    fields = "".join(f"{m}\r\n" for m in more)
    return f"From: app@example.test\r\nSubject: {subject}\r\n{fields}\r\nhello\r\n"


def smtp_send(port: int, rcpt: str, data: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("app@example.test")
        client.rcpt(rcpt)
        return client.data(data.encode())


def accepted(relay: Any, rcpt: str) -> dict[str, Any]:
    (event,) = relay.wait_event("accepted", rcpt=[rcpt])
    return event


def delivered_text(mx: FakeMX, rcpt: str) -> bytes:
    def find() -> Received | None:
        return next((m for m in mx.messages if rcpt in m.rcpts), None)

    return wait_until(find, 15, f"{rcpt} at the MX").data


def test_the_stream_comes_from_the_api_field_then_the_header_then_the_keys_default(lanes, fake_mx):
    mx = fake_mx("127.0.0.10")
    api = lanes()
    news = api.key("news", "--stream", "bulk")
    app = api.key("app")
    cases = [  # key, request fields, the stream expected
        (news, {}, BULK),
        (news, {"stream": "transactional"}, TRANSACTIONAL),
        (app, {}, TRANSACTIONAL),
        (app, {"stream": "bulk"}, BULK),
        (app, {"raw": text("r", "X-Relayd-Stream: bulk")}, BULK),
        (news, {"raw": text("r", "X-Relayd-Stream: transactional")}, TRANSACTIONAL),
        (
            news,
            {"raw": text("r", "X-Relayd-Stream: bulk"), "stream": "transactional"},
            TRANSACTIONAL,
        ),
    ]
    for i, (token, fields, _) in enumerate(cases):
        body = {"from": "app@example.test", "to": [f"c{i}@dest.test"], "subject": "s", "text": "x"}
        if "raw" in fields:
            del body["subject"], body["text"]
        status, answer = api.send(token, {**body, **fields})
        assert status == 202, answer
    for i, (_, fields, stream) in enumerate(cases):
        event = accepted(api.relay, f"c{i}@dest.test")
        assert event.get("stream", TRANSACTIONAL) == stream, (i, fields)
        assert "stream" in event if stream == BULK else "stream" not in event  # small events
        assert b"x-relayd-stream" not in delivered_text(mx, f"c{i}@dest.test").lower()
    (delivered,) = api.relay.wait_event("delivered", rcpt="c0@dest.test")
    assert delivered["stream"] == BULK
    mx.rcpt_replies = {"c9@dest.test": "451 4.3.0 later"}  # stays in the spool to be shown
    status, answer = api.send(
        news, {"from": "app@example.test", "to": ["c9@dest.test"], "text": "x"}
    )
    assert status == 202, answer
    api.relay.wait_event("deferred", rcpt="c9@dest.test")
    shown = json.loads(api.relay.ctl("show", answer["results"][0]["message_id"], "--json").stdout)
    assert shown["stream"] == BULK


def test_the_smtp_header_names_the_stream_and_is_not_delivered(lanes, fake_mx):
    mx = fake_mx("127.0.0.10")
    api = lanes()
    port = api.relay.port
    assert smtp_send(port, "h1@dest.test", text("s", "X-Relayd-Stream: bulk"))[0] == 250
    assert smtp_send(port, "h2@dest.test", text("s"))[0] == 250
    assert accepted(api.relay, "h1@dest.test")["stream"] == BULK
    assert "stream" not in accepted(api.relay, "h2@dest.test")
    assert b"X-Relayd-Stream" not in delivered_text(mx, "h1@dest.test")


def test_a_bad_stream_is_refused_precisely_and_nothing_is_queued(lanes, fake_mx):
    fake_mx("127.0.0.10")
    api = lanes()
    app = api.key("app")
    base = {"from": "app@example.test", "to": ["x@dest.test"], "subject": "s", "text": "x"}
    status, problem = api.send(app, {**base, "stream": "urgent"})
    assert status == 422 and problem["field"] == "stream", problem
    status, problem = api.send(app, {**base, "headers": {"X-Relayd-Stream": "bulk"}})
    assert (status, problem["field"]) == (422, "headers.X-Relayd-Stream"), problem
    raw = {"from": "app@example.test", "to": ["x@dest.test"]}
    status, problem = api.send(app, {**raw, "raw": text("r", "X-Relayd-Stream: urgent")})
    assert (status, problem["field"]) == (422, "raw"), problem
    assert "'urgent' is not one of transactional, bulk" in problem["detail"]
    code, reply = smtp_send(api.relay.port, "x@dest.test", text("s", "X-Relayd-Stream: urgent"))
    assert (code, reply.decode()) == (
        550,
        "5.6.0 Bad X-Relayd-Stream header: 'urgent' is not one of transactional, bulk",
    )
    with sqlite3.connect(api.relay.spool) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    bad = api.relay.ctl("key", "add", "k", "--sender", "example.test", "--stream", "x", check=False)
    assert bad.returncode == 2 and "--stream: invalid choice: 'x'" in bad.stderr


def test_relayctl_sets_and_lists_a_credentials_stream(lanes, fake_mx):
    api = lanes()
    api.key("news")
    assert api.relay.ctl("key", "set", "news", "--stream", "bulk").returncode == 0
    (key,) = json.loads(api.relay.ctl("key", "list", "--json").stdout)["keys"]
    assert key["stream"] == BULK
    assert "bulk" in api.relay.ctl("key", "list").stdout
    api.relay.ctl("key", "set", "news", "--rate", "10/s")  # other changes keep the stream
    (key,) = json.loads(api.relay.ctl("key", "list", "--json").stdout)["keys"]
    assert key["stream"] == BULK and key["rate"] == "10/s"


def test_a_logins_default_stream_applies_to_its_smtp_mail(relay, dns_server, fake_mx, tmp_path):
    mx_zone(dns_server, "dest.test", (10, "mx.dest.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10")
    tls = tmp_path / "tls"
    tls.mkdir()
    port = free_port()
    r = relay(
        {
            "listeners": [{"address": f"127.0.0.1:{port}", "kind": "submission"}],
            "tls": {
                "cert_file": str(tls / "relay.test.crt"),
                "key_file": str(tls / "relay.test.key"),
            },
            "auth": {"users_file": "users.json"},
        },
        start=False,
    )
    made = ctl(Path("/nonexistent"), "tls", "self-signed", "relay.test", "--out-dir", str(tls))
    assert made.returncode == 0, made.stderr
    add = ctl(
        r.config_path,
        *("user", "add", "news", "--sender", "example.test", "--stream", "bulk"),
        stdin=f"{PASSWORD}\n",
    )
    assert add.returncode == 0, add.stderr
    r.start()
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=ctx)
        client.login("news", PASSWORD)
        client.sendmail("app@example.test", ["l1@dest.test"], text("s"))
        client.sendmail(
            "app@example.test", ["l2@dest.test"], text("s", "X-Relayd-Stream: transactional")
        )
    assert accepted(r, "l1@dest.test")["stream"] == BULK
    assert "stream" not in accepted(r, "l2@dest.test")  # the header wins over the login's
    delivered_text(mx, "l2@dest.test")


def ctl(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relayd.ctl", "--config", str(config), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def _shaping(rate: str, connections: int, reserved: int) -> dict[str, Any]:
    return {
        "shaping": {
            "default": {
                "max_rate": rate,
                "max_connections": connections,
                "transactional_connections": reserved,
                "max_messages_per_connection": 1000,  # no reconnects to blur the count
            }
        }
    }


def test_transactional_mail_over_smtp_and_the_api_overtakes_a_bulk_backlog(lanes, fake_mx):
    """2,000 bulk messages (10 s at the site's 200/s) queued through the API; transactional
    mail sent then over SMTP and over the API arrives while most of the backlog still waits."""
    mx = fake_mx("127.0.0.10")
    api = lanes(_shaping("200/s", 10, 2))
    news, app = api.key("news", "--stream", "bulk"), api.key("app")
    for batch in range(2):
        recipients = [{"email": f"b{batch * 1000 + i}@dest.test"} for i in range(1000)]
        status, answer = api.send(
            news,
            {"from": "news@example.test", "recipients": recipients, "subject": "n", "text": "x"},
        )
        assert status == 202 and answer["queued"] == 1000, answer
    wait_until(lambda: len(mx.messages) >= 100, 15, "the bulk backlog draining")
    for i in range(3):
        assert smtp_send(api.relay.port, f"t{i}@dest.test", text("t"))[0] == 250
        tx = {
            "from": "app@example.test",
            "to": [f"t{i + 3}@dest.test"],
            "subject": "t",
            "text": "x",
        }
        assert api.send(app, tx)[0] == 202
    wait_until(lambda: sum(who.startswith("t") for who in order(mx)) == 6, 15, "the six")
    for i in range(6):
        assert bulk_before(mx, f"t{i}") < 1000, order(mx)  # well before the backlog drains
    assert len([w for w in order(mx) if w.startswith("b")]) < 2000


def test_bulk_mail_alone_drains_at_the_sites_rate_on_its_share_of_connections(lanes, fake_mx):
    """No transactional mail: bulk is not starved. 300 messages at 100/s, max_connections 4 of
    which 2 are kept for transactional mail: all delivered, on two connections, at the rate."""
    mx = fake_mx("127.0.0.10")
    api = lanes(_shaping("100/s", 4, 2))
    news = api.key("news", "--stream", "bulk")
    recipients = [{"email": f"b{i}@dest.test"} for i in range(300)]
    started = time.monotonic()
    status, _ = api.send(
        news, {"from": "news@example.test", "recipients": recipients, "subject": "n", "text": "x"}
    )
    assert status == 202
    wait_until(lambda: len(mx.messages) == 300, 20, "the whole bulk run")
    assert time.monotonic() - started >= 2.5  # 300 at 100/s: the rate held
    assert mx.max_concurrent_connections == 2
