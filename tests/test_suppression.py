"""The suppression list: entries in a real spool file, enforced by a real relayd over SMTP and
HTTP, managed with relayctl (a real process) and the API (real HTTP)."""

from __future__ import annotations

import json
import smtplib
import sqlite3
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from support.util import free_port, listening, mx_zone, send, wait_until
from test_api import Client

from relayd.config import ConfigError, load
from relayd.spool import suppression
from relayd.spool.suppression import Entry

NOW = 1_800_000_000.0


def test_an_entry_stops_only_mail_in_its_scope(spool_conn: sqlite3.Connection):
    suppression.add(
        spool_conn,
        [
            Entry("gone@x.test", "*", "bounce", NOW, NOW + 86400, "invalid_recipient"),
            Entry("left@x.test", "domain:shop.test", "unsubscribe", NOW),
            Entry("angry@x.test", "key:news", "complaint", NOW),
        ],
    )
    rcpts = ["Gone@X.test", "left@x.test", "angry@x.test", "fine@x.test"]
    shop = suppression.find(spool_conn, rcpts, suppression.scopes_of("a@shop.test", None), NOW)
    assert set(shop) == {"Gone@X.test", "left@x.test"}  # the address as asked for, any case
    assert shop["Gone@X.test"].bounce_class == "invalid_recipient"
    other = suppression.scopes_of("a@other.test", "key:news")
    assert set(suppression.find(spool_conn, rcpts, other, NOW)) == {"Gone@X.test", "angry@x.test"}


def test_a_bounce_entry_lapses_and_never_replaces_a_lasting_one(spool_conn: sqlite3.Connection):
    scopes = suppression.scopes_of("a@shop.test", None)
    suppression.add(spool_conn, [Entry("b@x.test", "*", "bounce", NOW, NOW + 60)])
    assert suppression.find(spool_conn, ["b@x.test"], scopes, NOW + 59)
    assert not suppression.find(spool_conn, ["b@x.test"], scopes, NOW + 60)
    suppression.add(spool_conn, [Entry("c@x.test", "*", "complaint", NOW)])
    suppression.add(spool_conn, [Entry("c@x.test", "*", "bounce", NOW + 5, NOW + 60)])
    (kept,) = suppression.find(spool_conn, ["c@x.test"], scopes, NOW + 100).values()
    assert kept.reason == "complaint" and kept.expires is None
    assert suppression.prune(spool_conn, NOW + 61) == 1  # b's lapsed entry; c's stays
    assert [e.address for e in suppression.every(spool_conn, NOW)] == ["c@x.test"]


def test_the_suppression_table_is_validated(tmp_path: Path):
    path = tmp_path / "relayd.toml"
    for text, key in (
        ('[suppression]\nsmtp = "bounce"\n', "suppression.smtp"),
        ('[suppression]\nbounce_ttl = "-1s"\n', "suppression.bounce_ttl"),
        ('[suppression]\nbounce_scope = "world"\n', "suppression.bounce_scope"),
        ("[suppression]\nttl = 1\n", "suppression.ttl"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError, match=key):
            load(path)


def _smtp(port: int, sender: str, rcpts: list[str]) -> tuple[dict[str, tuple[int, bytes]], Any]:
    """Each RCPT's reply, and the DATA reply when any recipient was taken."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, ", ".join(rcpts), "hello"
    msg.set_content("hi\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail(sender)
        replies = {r: client.rcpt(r) for r in rcpts}
        data = client.data(msg.as_bytes()) if any(c == 250 for c, _ in replies.values()) else None
    return replies, data


def test_smtp_refuses_a_suppressed_recipient_with_the_reason(relay, dns_server, fake_mx):
    mx_zone(dns_server, "dest.test", (10, "mx.dest.test", "127.0.0.10"))
    mx = fake_mx()
    r = relay()
    r.ctl("suppression", "add", "gone@dest.test", "--detail", "closed account")
    r.ctl("suppression", "add", "left@dest.test", "--scope", "domain:shop.test")
    replies, data = _smtp(
        r.port, "app@shop.test", ["gone@dest.test", "left@dest.test", "ok@dest.test"]
    )
    for rcpt, scope in (("gone@dest.test", "all senders"), ("left@dest.test", "domain:shop.test")):
        code, text = replies[rcpt]
        assert code == 550 and text.startswith(b"5.7.1 <" + rcpt.encode() + b">: suppressed")
        assert b"manual since" in text and scope.encode() in text
    assert replies["ok@dest.test"][0] == 250 and data[0] == 250
    (got,) = mx.wait_for_messages(1)
    assert got.rcpts == ["ok@dest.test"]
    replies, _ = _smtp(r.port, "app@other.test", ["left@dest.test"])  # another sender's mail
    assert replies["left@dest.test"][0] == 250
    assert mx.wait_for_messages(2)[1].rcpts == ["left@dest.test"]


def test_smtp_drop_mode_accepts_sends_nothing_and_records_the_suppressed_event(
    relay, dns_server, fake_mx
):
    mx_zone(dns_server, "dest.test", (10, "mx.dest.test", "127.0.0.10"))
    mx = fake_mx()
    r = relay({"suppression": {"smtp": "drop"}})
    r.ctl("suppression", "add", "gone@dest.test")
    replies, data = _smtp(r.port, "app@shop.test", ["ok@dest.test", "gone@dest.test"])
    assert [c for c, _ in replies.values()] == [250, 250] and data[0] == 250
    queue_id = data[1].decode().rsplit(" ", 1)[1]
    (got,) = mx.wait_for_messages(1)
    assert got.rcpts == ["ok@dest.test"]
    (event,) = r.wait_event("suppressed", queue_id=queue_id)
    assert event["rcpt"] == "gone@dest.test" and event["reason"] == "manual"
    assert event["scope"] == "*" and event["sender"] == "app@shop.test"
    (accepted,) = r.events("accepted")
    assert accepted["rcpt"] == ["ok@dest.test"]
    # every recipient suppressed: 250, nothing stored but the event
    only = send(r.port, ["gone@dest.test"], sender="app@shop.test").rsplit(" ", 1)[1]
    r.wait_event("suppressed", queue_id=only)
    assert r.ctl("list", "--json").stdout.count(only) == 0
    assert len(r.events("accepted")) == 1 and len(mx.messages) == 1


@pytest.fixture
def api(relay, dns_server, fake_mx):
    mx_zone(dns_server, "dest.test", (10, "mx.dest.test", "127.0.0.10"))
    port = free_port()
    r = relay(
        {
            "listeners": [
                {"address": f"127.0.0.1:{free_port()}", "kind": "relay"},
                {"address": f"127.0.0.1:{port}", "kind": "http"},
            ],
            "auth": {"users_file": "users.json"},
        }
    )
    wait_until(lambda: listening(port), 10, "the API listener")
    return Client(r, port)


def test_the_api_answers_suppressed_for_a_suppressed_recipient_and_sends_to_the_rest(api, fake_mx):
    mx = fake_mx()
    api.relay.ctl("suppression", "add", "gone@dest.test")
    body = {"from": "app@example.test", "subject": "s", "text": "t"}
    status, _, doc = api.send({**body, "to": ["ok@dest.test", "gone@dest.test"]})
    assert status == 202 and (doc["queued"], doc["suppressed"]) == (1, 1)
    ok, gone = doc["results"]
    assert ok["status"] == "queued" and gone["status"] == "suppressed"
    assert gone["error"].startswith("suppressed (manual since") and gone["message_id"]
    (got,) = mx.wait_for_messages(1)
    assert got.rcpts == ["ok@dest.test"] and b"gone@dest.test" in got.data  # still in To:
    status, _, doc = api.send({**body, "recipients": [{"email": "gone@dest.test"}]})
    assert status == 202 and doc["results"][0]["status"] == "suppressed"
    queue_id = doc["results"][0]["message_id"]
    status, _, found = api.call("GET", f"/v1/messages/{queue_id}")
    assert status == 200
    assert [(r["email"], r["state"]) for r in found["recipients"]] == [
        ("gone@dest.test", "suppressed")
    ]
    assert [e["type"] for e in found["events"]] == ["suppressed"]


def test_the_api_manages_the_list_within_a_keys_scopes(api):
    token = api.key("lists", "--sender", "example.test", "--scope", "suppressions")
    admin = api.key("root", "--sender", "example.test", "--scope", "admin")

    def call(method: str, path: str, body: Any = None, key: str = token) -> tuple[int, Any]:
        status, _, doc = api.call(method, path, body, token=key)
        return status, doc

    status, doc = call("POST", "/v1/suppressions", {"suppressions": [{"email": "a@dest.test"}]})
    assert (status, doc) == (201, {"added": 1})
    entry = {"email": "b@dest.test", "scope": "domain:example.test", "reason": "unsubscribe"}
    assert call("POST", "/v1/suppressions", {"suppressions": [entry]})[0] == 201
    status, doc = call("POST", "/v1/suppressions", {"suppressions": [{**entry, "scope": "global"}]})
    assert status == 403 and doc["field"] == "suppressions[0].scope"
    status, doc = call("POST", "/v1/suppressions", {"suppressions": [{"email": "nope"}]})
    assert status == 422 and doc["field"] == "suppressions[0].email"
    status, doc = call("POST", "/v1/suppressions", {"suppressions": [{**entry, "reason": "x"}]})
    assert status == 422 and doc["field"] == "suppressions[0].reason"
    assert (
        call(
            "POST",
            "/v1/suppressions",
            {"suppressions": [{"email": "g@dest.test", "scope": "global"}]},
            admin,
        )[0]
        == 201
    )
    status, doc = call("GET", "/v1/suppressions")
    assert status == 200 and doc["next"] is None
    assert [(e["address"], e["scope"]) for e in doc["suppressions"]] == [
        ("a@dest.test", "key:lists"),
        ("b@dest.test", "domain:example.test"),
        ("g@dest.test", "*"),
    ]
    status, doc = call("GET", "/v1/suppressions?limit=1")
    assert len(doc["suppressions"]) == 1 and doc["next"]
    status, doc = call("GET", f"/v1/suppressions?limit=1&after={doc['next']}")
    assert doc["suppressions"][0]["address"] == "b@dest.test"
    assert call("GET", "/v1/suppressions?scope=key:other")[0] == 403
    assert call("DELETE", "/v1/suppressions/g@dest.test?scope=global")[0] == 403
    assert call("DELETE", "/v1/suppressions/a@dest.test")[1]["removed"] == 1
    assert call("DELETE", "/v1/suppressions/a@dest.test")[0] == 404
    status, _, doc = api.call("GET", "/v1/suppressions")  # the sending key lacks the scope
    assert status == 403


def test_relayctl_exports_and_imports_the_list_and_names_a_bad_line(relay, tmp_path: Path):
    r = relay()
    r.ctl("suppression", "add", "a@x.test", "b@x.test", "--scope", "domain:shop.test")
    r.ctl("suppression", "add", "c@x.test", "--reason", "complaint", "--detail", "ARF")
    exported = r.ctl("suppression", "export").stdout
    assert exported.splitlines()[0] == "address,scope,reason,class,detail,queue_id,created,expires"
    assert len(exported.splitlines()) == 4
    r.ctl("suppression", "remove", "a@x.test", "b@x.test", "c@x.test")
    assert "no suppressed addresses" in r.ctl("suppression", "list").stdout
    (tmp_path / "in.csv").write_text(exported)
    assert "imported 3 entries" in r.ctl("suppression", "import", str(tmp_path / "in.csv")).stdout
    listed = r.ctl("suppression", "list", "--json").stdout
    assert '"detail": "ARF"' in listed and '"reason": "complaint"' in listed
    (tmp_path / "bad.csv").write_text("address,scope\nd@x.test,global\nnot-one,global\n")
    result = r.ctl("suppression", "import", str(tmp_path / "bad.csv"), check=False)
    assert result.returncode == 1
    assert "line 3: address: not an address: 'not-one'" in result.stderr
    assert "d@x.test" not in r.ctl("suppression", "list").stdout  # nothing of it was added
    result = r.ctl("suppression", "remove", "zz@x.test", check=False)
    assert result.returncode == 1 and "not listed" in result.stderr


def test_a_hard_bounce_suppresses_the_address_for_the_next_message(relay, dns_server, fake_mx):
    mx_zone(dns_server, "dest.test", (10, "mx.dest.test", "127.0.0.10"))
    gmail = (
        "550-5.1.1 The email account that you tried to reach does not exist. Please try\n"
        "550 5.1.1 double-checking the recipient's email address for typos. - gsmtp"
    )
    fake_mx(rcpt_replies={"gone@dest.test": gmail, "full@dest.test": "452 4.2.2 over quota"})
    r = relay({"suppression": {"bounce_ttl": "30d"}})  # the default, which tests turn off
    send(r.port, ["gone@dest.test", "full@dest.test"], sender="app@shop.test")
    r.wait_event("bounced", rcpt="gone@dest.test")
    r.wait_event("deferred", rcpt="full@dest.test")
    replies, _ = _smtp(r.port, "app@other.test", ["gone@dest.test", "full@dest.test"])
    code, text = replies["gone@dest.test"]
    assert code == 550 and b"suppressed (bounce invalid_recipient since" in text
    assert replies["full@dest.test"][0] == 250  # a deferral suppresses nothing
    (entry,) = [e for e in _listed(r) if e["address"] == "gone@dest.test"]
    assert entry["scope"] == "*" and entry["expires"] - entry["created"] == 30 * 86400


def _listed(r: Any) -> list[dict[str, Any]]:
    return json.loads(r.ctl("suppression", "list", "--json").stdout)["suppressions"]
