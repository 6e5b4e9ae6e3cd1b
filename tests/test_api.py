"""The HTTP sending API against a real relayd: curl and Python's http.client on loopback, keys
made with relayctl, mail delivered to fake MX servers, problems checked field by field."""

from __future__ import annotations

import email
import email.policy
import http.client
import json
import smtplib
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from support.receiver import Receiver
from support.util import free_port, listening, mx_zone, wait_until

from relayd.ingress.api import openapi

ROOT = Path(__file__).resolve().parent.parent


class Client:
    """A relayd with an API listener, and an API key made with relayctl."""

    def __init__(self, relay: Any, port: int) -> None:
        self.relay, self.port = relay, port
        self.token = self.key("app", "--sender", "example.test", "--scope", "send,read")

    def key(self, name: str, *options: str) -> str:
        out = self.relay.ctl("key", "add", name, *options).stdout
        return next(line for line in out.splitlines() if line.startswith("rk_"))

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        sent = dict(headers or {})
        sent.setdefault("Authorization", f"Bearer {token or self.token}")
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        conn.request(method, path, data, sent)
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        got = {k.lower(): v for k, v in resp.getheaders()}
        return resp.status, got, json.loads(raw) if raw else None

    def send(self, body: Any, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
        return self.call("POST", "/v1/messages", body, **kwargs)


@pytest.fixture
def api(relay, dns_server, fake_mx):
    def make(extra: dict[str, Any] | None = None) -> Client:
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
        return Client(r, port)

    mx_zone(dns_server, "dest.test", (10, "mx.dest.test", "127.0.0.10"))
    return make


def _parse(data: bytes) -> Any:
    """A delivered message as Python's email package reads it (its line ends are LF)."""
    return email.message_from_bytes(data.replace(b"\r\n", b"\n"), policy=email.policy.default)


def _spooled(c: Client) -> int:
    with sqlite3.connect(c.relay.spool) as db:
        return db.execute("SELECT count(*) FROM messages").fetchone()[0]


def test_a_message_sent_with_curl_is_delivered_and_its_status_shows_the_attempt(api, fake_mx):
    mx = fake_mx()
    c = api()
    request = {
        "from": {"email": "news@example.test", "name": "Néws"},
        "to": ["Ann <ann@dest.test>"],
        "subject": "Héllo",
        "text": "Hello Ann\n",
        "html": "<p>Hello Ann</p>",
        "headers": {"X-Campaign": "c1"},
        "attachments": [{"content": "aGVsbG8=", "filename": "a.txt", "content_type": "text/plain"}],
    }
    out = subprocess.run(
        [
            "curl",
            "-s",
            "-w",
            "\n%{http_code}",
            "-X",
            "POST",
            f"http://127.0.0.1:{c.port}/v1/messages",
            "-H",
            f"Authorization: Bearer {c.token}",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(request),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    body, status = out.rsplit("\n", 1)
    assert status == "202", body
    result = json.loads(body)["results"]
    assert [r["status"] for r in result] == ["queued"]
    queue_id = result[0]["message_id"]
    got = mx.wait_for_messages(1)[0]
    assert got.rcpts == ["ann@dest.test"] and got.mail_from == "news@example.test"
    parsed = _parse(got.data)
    assert parsed["Subject"] == "Héllo" and parsed["X-Campaign"] == "c1"
    assert parsed["From"].addresses[0].display_name == "Néws"
    assert parsed.get_body(("plain",)).get_content() == "Hello Ann\n"
    assert parsed.get_body(("html",)).get_content().strip() == "<p>Hello Ann</p>"
    assert [p.get_filename() for p in parsed.iter_attachments()] == ["a.txt"]
    assert f"with HTTP id {queue_id}" in parsed["Received"]

    def delivered() -> Any:
        status, _, doc = c.call("GET", f"/v1/messages/{queue_id}")
        return doc if status == 200 and doc["recipients"][0]["state"] == "delivered" else None

    doc = wait_until(delivered, 10, "the message's status to say delivered")
    assert doc["sender"] == "news@example.test" and doc["origin"] == "key:app"
    (attempt,) = doc["attempts"]
    assert attempt["result"] == "delivered" and attempt["code"] == 250
    assert attempt["mx"].startswith("mx.dest.test") and attempt["rcpt"] == "ann@dest.test"
    assert [e["type"] for e in doc["events"]] == ["accepted", "delivered"]


def test_a_template_for_many_recipients_queues_each_personalised_in_request_order(api, fake_mx):
    mx = fake_mx()
    c = api()
    status, _, doc = c.send(
        {
            "from": "news@example.test",
            "recipients": [
                {"email": "ann@dest.test", "name": "Ann", "substitutions": {"code": "A1"}},
                {"email": "not an address"},
                {"email": "bob@dest.test", "metadata": {"user": 7}},
            ],
            "substitutions": {"code": "none"},
            "subject": "Hi {{ name or 'there' }}",
            "text": "Your code: {{ code }}\n",
            "html": "<p>{{ code }} <b>{{ '<script>' }}</b></p>",
            "metadata": {"campaign": "spring"},
        }
    )
    assert status == 202, doc
    assert [(r["email"], r["status"]) for r in doc["results"]] == [
        ("ann@dest.test", "queued"),
        ("not an address", "rejected"),
        ("bob@dest.test", "queued"),
    ]
    assert doc["results"][1]["error"] and doc["results"][1]["message_id"] is None
    got = {m.rcpts[0]: m for m in mx.wait_for_messages(2)}
    ann = _parse(got["ann@dest.test"].data)
    bob = _parse(got["bob@dest.test"].data)
    assert (ann["Subject"], bob["Subject"]) == ("Hi Ann", "Hi there")
    assert ann["To"] == "Ann <ann@dest.test>"
    assert ann.get_body(("plain",)).get_content() == "Your code: A1\n"
    assert bob.get_body(("plain",)).get_content() == "Your code: none\n"
    assert "&lt;script&gt;" in ann.get_body(("html",)).get_content()  # HTML autoescaped
    assert "spring" not in got["bob@dest.test"].data.decode()  # metadata is not delivered
    (bob_delivered,) = c.relay.wait_event("delivered", rcpt="bob@dest.test")
    assert bob_delivered["meta"] == {"campaign": "spring", "user": 7}  # into its events


def test_the_same_idempotency_key_answers_again_and_queues_nothing_more(api, fake_mx):
    mx = fake_mx()
    c = api()
    body = {"from": "news@example.test", "to": ["ann@dest.test"], "text": "once\n"}
    key = {"Idempotency-Key": "order-42"}
    first = c.send(body, headers=key)
    again = c.send(body, headers=key)
    assert first[0] == again[0] == 202
    assert again[2] == first[2] and again[1].get("idempotent-replayed") == "true"
    other = c.send({**body, "text": "twice\n"}, headers=key)
    assert other[0] == 422 and other[2]["field"] == "idempotency-key"
    mx.wait_for_messages(1)
    c.relay.wait_event("delivered")
    fresh = c.send(body, headers={"Idempotency-Key": "order-43"})
    assert fresh[0] == 202 and fresh[2] != first[2]
    mx.wait_for_messages(2)
    accepted = c.relay.events("accepted")
    assert len(accepted) == 2  # order-42 once, order-43 once


GOOD = {"from": "news@example.test", "to": ["ann@dest.test"], "text": "hi\n"}


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b'{"from": "news@example.test", ', 400, "body"),
        ({**GOOD, "to": [1]}, 422, "to[0]"),
        ({**GOOD, "bogus": True}, 422, "bogus"),
        ({**GOOD, "to": ["a@dest.test"] * 4}, 422, "recipients"),
        ({**GOOD, "to": ["a@dest.test\r\nRCPT TO:<x@y.test>"]}, 422, "recipients"),
        ({**GOOD, "subject": "hi\r\nBcc: x@evil.test"}, 422, "subject"),
        ({**GOOD, "headers": {"X-A\r\nBcc": "x"}}, 422, "headers.X-A\r\nBcc"),
        ({**GOOD, "headers": {"X-A": "v\nBcc: x@evil.test"}}, 422, "headers.X-A"),
        ({**GOOD, "headers": {"Subject": "twice"}}, 422, "headers.Subject"),
        ({**GOOD, "from": "ceo@elsewhere.test"}, 403, "from"),
        ({**GOOD, "from": {"email": "news@example.test", "name": "x\r\nBcc: y"}}, 422, "from.name"),
        ({**GOOD, "attachments": [{"content": "not base64!"}]}, 422, "attachments[0].content"),
        ({**GOOD, "send_at": "tomorrow"}, 422, "send_at"),
        ({**GOOD, "text": None}, 422, "raw"),
        ({**GOOD, "recipients": [{"email": "b@dest.test"}]}, 422, "recipients"),
        (
            {
                "from": "news@example.test",
                "recipients": [{"email": "b@dest.test"}],
                "text": "{{ unclosed",
            },
            422,
            "text",
        ),
        ({**GOOD, "tags": ["x" * 101]}, 422, "tags[0]"),
        (b"x" * 3000, 413, "body"),
    ],
)
def test_bad_input_is_a_problem_naming_the_field_and_queues_nothing(api, body, status, field):
    c = api({"api": {"max_recipients": 3, "max_body_size": "2KB"}})
    code, headers, doc = c.send(body)
    assert code == status, doc
    assert headers["content-type"].startswith("application/problem+json")
    assert doc["status"] == status and doc["detail"] and doc["field"] == field
    assert _spooled(c) == 0 and not c.relay.events("accepted")


def test_keys_are_checked_for_presence_scope_network_and_revocation_without_restart(api):
    c = api()
    code, headers, doc = c.send(GOOD, token="rk_nothing_here")
    assert code == 401 and headers["www-authenticate"].startswith("Bearer")
    conn = http.client.HTTPConnection("127.0.0.1", c.port, timeout=10)
    conn.request("POST", "/v1/messages", json.dumps(GOOD), {"Content-Type": "application/json"})
    assert conn.getresponse().status == 401
    reader = c.key("reader", "--sender", "example.test", "--scope", "read")
    code, _, doc = c.send(GOOD, token=reader)
    assert code == 403 and doc["field"] == "scope"
    assert c.call("GET", "/v1/events", token=reader)[0] == 200
    far = c.key("far", "--sender", "example.test", "--networks", "10.0.0.0/8")
    assert c.send(GOOD, token=far)[0] == 403
    assert c.send(GOOD)[0] == 202
    rotated = c.relay.ctl("key", "rotate", "app").stdout
    new = next(line for line in rotated.splitlines() if line.startswith("rk_"))
    assert c.send(GOOD)[0] == 401  # the old secret stopped working at once
    assert c.send(GOOD, token=new)[0] == 202
    c.relay.ctl("key", "revoke", "app")
    assert c.send(GOOD, token=new)[0] == 401
    listed = json.loads(c.relay.ctl("--json", "key", "list").stdout)["keys"]
    assert {k["name"] for k in listed} == {"reader", "far"}
    assert "rk_" not in (c.relay.workdir / "users.json").read_text()  # only digests kept


def test_a_key_over_its_rate_gets_429_with_retry_after(api):
    c = api()
    limited = c.key("slow", "--sender", "example.test", "--rate", "2/hour")
    first = c.send(GOOD, token=limited)
    assert first[0] == 202 and first[1]["ratelimit-limit"] == "2"
    assert first[1]["ratelimit-remaining"] == "1"
    assert c.send(GOOD, token=limited)[0] == 202
    code, headers, doc = c.send(GOOD, token=limited)
    assert code == 429 and int(headers["retry-after"]) > 0
    assert headers["ratelimit-remaining"] == "0" and "2/hour" in doc["detail"]


@pytest.mark.parametrize("limit", [{"min_free_space": "1000TB"}, {"max_spool_size": "1"}])
def test_a_spool_short_of_room_or_at_its_size_limit_answers_503_with_retry_after(api, limit):
    c = api({"server": limit})
    code, headers, doc = c.send(GOOD)
    assert code == 503 and headers["retry-after"] and doc["status"] == 503
    assert _spooled(c) == 0
    with smtplib.SMTP("127.0.0.1", c.relay.port, timeout=10) as smtp:  # the same over SMTP
        smtp.ehlo("client.test")
        assert smtp.mail("news@example.test")[0] == 452


def test_kumomta_inject_v1_bodies_are_accepted_as_they_are(api, fake_mx):
    mx = fake_mx()
    c = api()
    code, _, doc = c.call(
        "POST",
        "/api/inject/v1",
        {
            "envelope_sender": "news@example.test",
            "recipients": [{"email": "ann@dest.test", "substitutions": {"n": "Ann"}}],
            "content": {
                "from": {"email": "news@example.test", "name": "News"},
                "subject": "Hi {{ n }}",
                "text_body": "Hello {{ n }}",
            },
        },
    )
    assert code == 200 and doc == {
        "success_count": 1,
        "fail_count": 0,
        "failed_recipients": [],
        "errors": [],
    }
    parsed = _parse(mx.wait_for_messages(1)[0].data)
    assert parsed["Subject"] == "Hi Ann"


def test_the_event_log_pages_by_a_stable_cursor_and_filters(api, fake_mx):
    fake_mx()
    c = api()
    for rcpt in ("ann@dest.test", "bob@dest.test", "cy@dest.test"):
        assert c.send({**GOOD, "to": [rcpt]})[0] == 202
    c.relay.wait_event("delivered", 3)
    seen, cursor = [], "0"
    for _ in range(10):  # bounded: 6 events, 2 a page
        code, _, page = c.call("GET", f"/v1/events?after={cursor}&limit=2")
        assert code == 200
        if not page["events"]:
            break
        seen += page["events"]
        cursor = page["next"]
    assert [e["type"] for e in seen].count("delivered") == 3 and len(seen) == 6
    assert [e["id"] for e in seen] == sorted(e["id"] for e in seen)
    code, _, page = c.call("GET", "/v1/events?type=delivered&recipient=bob@dest.test")
    assert code == 200 and [e["rcpt"] for e in page["events"]] == ["bob@dest.test"]
    code, _, problem = c.call("GET", "/v1/events?type=nonsense")
    assert code == 422 and problem["field"] == "type"
    code, _, problem = c.call("GET", "/v1/events?limit=5000")
    assert code == 422 and problem["field"] == "limit"


def test_send_at_holds_the_message_until_its_time(api, fake_mx):
    mx = fake_mx()
    c = api()
    at = time.time() + 3
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z"
    code, _, doc = c.send({**GOOD, "send_at": stamp})
    assert code == 202, doc
    mx.wait_for_messages(1, timeout=15)
    assert time.time() >= at  # it arrived, and not before its time


def test_the_openapi_document_is_served_and_the_repo_copy_is_current(api):
    c = api()
    code, _, doc = c.call("GET", "/v1/openapi.json", token="none needed")
    assert code == 200 and doc["openapi"].startswith("3.1")
    assert "/v1/messages" in doc["paths"] and "Send" in doc["components"]["schemas"]
    assert json.loads((ROOT / "docs" / "openapi.json").read_text()) == openapi.document()


def test_webhooks_managed_over_the_api_receive_signed_events(api, fake_mx):
    fake_mx()
    c = api()
    hooks = c.key("hooks", "--sender", "example.test", "--scope", "webhooks")
    assert c.call("GET", "/v1/webhooks")[0] == 403  # the app key lacks the webhooks scope
    receiver = Receiver().start()
    try:
        code, _, bad = c.call("POST", "/v1/webhooks", {"url": "ftp://x", "events": "*"}, hooks)
        assert code == 422 and bad["field"] == "url"
        code, _, bad = c.call(
            "POST", "/v1/webhooks", {"url": receiver.url, "events": ["nope"]}, hooks
        )
        assert code == 422 and bad["field"] == "events"
        code, _, added = c.call(
            "POST", "/v1/webhooks", {"url": receiver.url, "events": ["delivered"]}, hooks
        )
        assert code == 201 and added["secret"].startswith("whsec_")
        receiver.secrets = [added["secret"]]
        assert c.send(GOOD)[0] == 202
        receiver.wait(lambda: receiver.events(), 15, "a delivered event")
        assert not receiver.bad and receiver.events()[0]["type"] == "message.delivered"
        code, _, listed = c.call("GET", "/v1/webhooks", token=hooks)
        assert code == 200 and [w["url"] for w in listed["webhooks"]] == [receiver.url]
        code, _, rotated = c.call("POST", f"/v1/webhooks/{added['id']}/rotate", {}, hooks)
        assert code == 200 and rotated["secret"] != added["secret"]
        assert c.call("DELETE", f"/v1/webhooks/{added['id']}", token=hooks)[0] == 200
        assert c.call("GET", f"/v1/webhooks/{added['id']}", token=hooks)[0] == 404
    finally:
        receiver.stop()
