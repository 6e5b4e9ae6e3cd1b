"""One-click unsubscribe (RFC 8058): a real relayd adds the headers to bulk mail under its DKIM
signature (verified by dkimpy over the test DNS), a fake MX receives it, and curl (a real HTTP
client, as a mail client would be) follows the link it carries; the spool, the log and the API
say what happened. The header and the mail path are also tested on their own."""

from __future__ import annotations

import email
import email.policy
import json
import re
import signal
import sqlite3
import subprocess
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim
import dns.resolver
import pytest
from support.fakemx import FakeMX
from support.util import free_port, listening, wait_until
from test_api import Client
from test_dkim import signatures, txt_value

from relayd.config import Unsubscribe
from relayd.events.records import Event, Type
from relayd.feedback.tokens import BadToken, Tokens
from relayd.feedback.unsubscribe import Links, record, token_of_mail
from relayd.mime.dkim import keygen
from relayd.model.message import BULK, TRANSACTIONAL, NewMessage
from relayd.spool import schema, store, suppression

NOW = 1_800_000_000.0
YEAR = 365 * 86400.0


class Unsub(Client):
    """relayd with an http listener whose links lead to it, a DKIM key for example.test."""

    def __init__(self, relay: Any, port: int, dns_server: Any, path: str) -> None:
        super().__init__(relay, port)
        self.dns_server = dns_server
        self.base = f"http://127.0.0.1:{port}{path}"

    def bulk(self, **body: Any) -> dict[str, Any]:
        status, _, doc = self.send(
            {"from": "news@example.test", "subject": "News", "text": "hi", "stream": BULK, **body}
        )
        assert status == 202, doc
        return doc

    def curl(self, *args: str) -> tuple[int, str, str]:
        """curl's status, Content-Type and body (a real HTTP client, no API key)."""
        out = subprocess.run(
            ["curl", "-sS", "-o", "-", "-w", "\n%{http_code} %{content_type}", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        body, _, tail = out.rpartition("\n")
        code, _, ctype = tail.partition(" ")
        return int(code), ctype, body

    def secret(self) -> bytes:
        conn = sqlite3.connect(self.relay.spool)
        try:
            return schema.secret(conn, "tokens")
        finally:
            conn.close()

    def events(self, kind: str = "unsubscribed") -> list[dict[str, Any]]:
        status, _, doc = self.call("GET", f"/v1/events?type={kind}")
        assert status == 200
        return doc["events"]

    def entries(self) -> list[dict[str, Any]]:
        listed = self.relay.ctl("suppression", "list", "--json").stdout
        return json.loads(listed)["suppressions"]

    def verify(self, data: bytes) -> bool:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.port, resolver.nameservers = self.dns_server.port, [self.dns_server.host]

        def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
            answer = resolver.resolve(name.decode(), "TXT")
            return b"".join(s for rdata in answer for s in rdata.strings)

        return bool(dkim.DKIM(data).verify(dnsfunc=dnsfunc))


def _start(relay: Any, dns_server: Any, tmp_path: Path, path: str = "/unsubscribe/") -> Unsub:
    dns_server.add("dest.test", "MX", "10 mx.dest.test")
    dns_server.add("mx.dest.test", "A", "127.0.0.10")
    key_file, line = keygen("example.test", "s1", "rsa", tmp_path)
    name, value = txt_value(line)
    dns_server.add(name, "TXT", value.decode())
    port = free_port()
    r = relay(
        {
            "listeners": [
                {"address": f"127.0.0.1:{free_port()}", "kind": "relay"},
                {"address": f"127.0.0.1:{port}", "kind": "http"},
            ],
            "auth": {"users_file": "users.json"},
            "dkim": {
                "keys": [{"domain": "example.test", "selector": "s1", "key_file": str(key_file)}]
            },
            "unsubscribe": {
                "url": f"http://127.0.0.1:{port}{path}",
                "mailto": "unsubscribe@bounces.example.test",
            },
        }
    )
    wait_until(lambda: listening(port), 10, "the API listener")
    return Unsub(r, port, dns_server, path)


@pytest.fixture
def unsub(relay, dns_server, tmp_path: Path) -> Unsub:
    return _start(relay, dns_server, tmp_path)


def _parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(
        data.replace(b"\r\n", b"\n"), _class=EmailMessage, policy=email.policy.default
    )


def _link(data: bytes) -> str:
    """The https (here http, loopback) link of a delivered message's List-Unsubscribe."""
    (value,) = _parse(data).get_all("List-Unsubscribe")
    return re.findall(r"<(http[^>]+)>", str(value))[0]


def _delivered_to(mx: FakeMX, rcpt: str) -> bytes:
    mx.wait_for(lambda: any(rcpt in m.rcpts for m in mx.messages), 15, f"mail to {rcpt}")
    return next(m.data for m in mx.messages if rcpt in m.rcpts)


def test_bulk_mail_to_one_recipient_carries_both_headers_under_its_dkim_signature(
    unsub: Unsub, fake_mx
):
    mx = fake_mx()
    doc = unsub.bulk(recipients=[{"email": "ann@dest.test"}, {"email": "bob@dest.test"}])
    tokens = Tokens(unsub.secret())
    for result in doc["results"]:  # "recipients": a message each, each with its own link
        rcpt, queue_id = result["email"], result["message_id"]
        data = _delivered_to(mx, rcpt)
        msg = _parse(data)
        token = _link(data).removeprefix(unsub.base)
        assert str(msg["List-Unsubscribe"]) == (
            f"<{unsub.base}{token}>,"
            f" <mailto:unsubscribe@bounces.example.test?subject=unsubscribe%20{token}>"
        )
        assert msg.get_all("List-Unsubscribe-Post") == ["List-Unsubscribe=One-Click"]
        assert tokens.unsubscribed(token, time.time(), YEAR) == (
            queue_id,
            rcpt,
            "domain:example.test",
        )
        assert unsub.verify(data)
        (sig,) = signatures(data)
        signed = sig["h"].lower().split(":")
        assert "list-unsubscribe" in signed and "list-unsubscribe-post" in signed
        # after the trace fields, before the body
        head = data.split(b"\r\n\r\n", 1)[0]
        assert head.index(b"\r\nReceived:") < head.index(b"\r\nList-Unsubscribe:")


def test_transactional_and_multi_recipient_mail_get_no_headers_and_the_senders_own_stays(
    unsub: Unsub, fake_mx
):
    mx = fake_mx()
    status, _, _ = unsub.send(
        {"from": "news@example.test", "to": ["t@dest.test"], "subject": "s", "text": "t"}
    )
    assert status == 202
    unsub.bulk(to=["a@dest.test", "b@dest.test"])  # a link must name its one recipient
    own = "<https://app.example.test/unsub/42>"
    doc = unsub.bulk(to=["own@dest.test"], headers={"List-Unsubscribe": own})
    for rcpt in ("t@dest.test", "a@dest.test"):
        msg = _parse(_delivered_to(mx, rcpt))
        assert msg["List-Unsubscribe"] is None and msg["List-Unsubscribe-Post"] is None
    data = _delivered_to(mx, "own@dest.test")
    msg = _parse(data)
    assert msg.get_all("List-Unsubscribe") == [own] and msg["List-Unsubscribe-Post"] is None
    assert unsub.verify(data)
    queue_id = doc["results"][0]["message_id"]
    unsub.relay.wait_event("list_unsubscribe_kept", queue_id=queue_id, sender="news@example.test")


def test_a_one_click_post_unsubscribes_at_once_and_a_second_changes_nothing(unsub: Unsub, fake_mx):
    mx = fake_mx()
    doc = unsub.bulk(to=["ann@dest.test"], metadata={"campaign": "spring"})
    queue_id = doc["results"][0]["message_id"]
    link = _link(_delivered_to(mx, "ann@dest.test"))
    code, ctype, body = unsub.curl("-X", "POST", "-d", "List-Unsubscribe=One-Click", link)
    assert (code, ctype) == (200, "text/html") and "ann@dest.test" in body
    (line,) = unsub.relay.wait_event("unsubscribed", queue_id=queue_id)
    expected = {
        "rcpt": "ann@dest.test",
        "domain": "dest.test",
        "sender": "news@example.test",
        "origin": "key:app",
        "scope": "domain:example.test",
        "method": "one-click",
        "meta": {"campaign": "spring"},
        "stream": "bulk",
    }
    assert {k: line.get(k) for k in expected} == expected
    (event,) = unsub.events()
    assert event["queue_id"] == queue_id and {k: event.get(k) for k in expected} == expected
    (entry,) = unsub.entries()
    assert (entry["address"], entry["scope"], entry["reason"]) == (
        "ann@dest.test",
        "domain:example.test",
        "unsubscribe",
    )
    assert entry["expires"] is None and entry["queue_id"] == queue_id
    again = unsub.bulk(to=["ann@dest.test"])  # the next bulk message: not sent
    assert again["suppressed"] == 1 and again["results"][0]["status"] == "suppressed"
    assert "unsubscribe" in again["results"][0]["error"]
    code, _, _ = unsub.curl("-X", "POST", "-d", "List-Unsubscribe=One-Click", link)
    assert code == 200
    assert len(unsub.events()) == 1 and unsub.entries() == [entry]
    assert len(unsub.relay.events("unsubscribed")) == 1


def test_get_shows_a_page_with_the_address_and_a_form_and_records_nothing(unsub: Unsub, fake_mx):
    mx = fake_mx()
    rcpt = "o'neil&co@dest.test"  # autoescaped on the page
    unsub.bulk(to=[rcpt])
    link = _link(_delivered_to(mx, rcpt))
    for _ in range(2):  # a scanner following the link twice
        code, ctype, body = unsub.curl(link)
        assert (code, ctype) == (200, "text/html")
        assert "o&#39;neil&amp;co@dest.test" in body and rcpt not in body
        assert "will no longer receive mail from example.test" in body
        assert '<form method="post" action="">' in body
        assert '<input type="hidden" name="List-Unsubscribe" value="One-Click">' in body
    code, _, _ = unsub.curl("-I", link)  # HEAD: the same, no body
    assert code == 200
    assert unsub.events() == [] and unsub.entries() == []
    # the page's form posts the one-click body; then the page says it is done
    code, _, _ = unsub.curl("-F", "List-Unsubscribe=One-Click", link)  # multipart/form-data
    assert code == 200 and unsub.entries()[0]["address"] == rcpt
    code, _, body = unsub.curl(link)
    assert code == 200 and "already unsubscribed" in body and "<form" not in body


def test_forged_altered_and_expired_tokens_are_refused_and_record_nothing(unsub: Unsub, fake_mx):
    mx = fake_mx()
    doc = unsub.bulk(to=["ann@dest.test"])
    queue_id = doc["results"][0]["message_id"]
    good = _link(_delivered_to(mx, "ann@dest.test")).removeprefix(unsub.base)
    scope = "domain:example.test"
    forged = Tokens(b"x" * 32).unsubscribe(queue_id, "ann@dest.test", scope, time.time())
    altered = good[:20] + ("A" if good[20] != "A" else "B") + good[21:]
    old = time.time() - YEAR - 60  # issued over a year ago: beyond max_age
    expired = Tokens(unsub.secret()).unsubscribe(queue_id, "ann@dest.test", scope, old)
    for token, problem in (
        (forged, "not an unsubscribe token relayd made"),
        (altered, "not an unsubscribe token"),
        (expired, "this unsubscribe link has expired"),
        ("x" * 40, "not an unsubscribe token"),
    ):
        code, ctype, body = unsub.curl(
            "-X", "POST", "-d", "List-Unsubscribe=One-Click", unsub.base + token
        )
        assert (code, ctype) == (400, "application/problem+json")
        doc = json.loads(body)
        assert doc["field"] == "token" and doc["detail"].startswith(problem), doc
        code, ctype, body = unsub.curl(unsub.base + token)
        assert (code, ctype) == (400, "text/html") and "invalid or has expired" in body
    assert unsub.events() == [] and unsub.entries() == []
    assert unsub.curl(unsub.base + good)[0] == 200  # the real one still works


def test_a_wrong_method_or_body_gets_a_precise_problem_and_records_nothing(unsub: Unsub, fake_mx):
    mx = fake_mx()
    unsub.bulk(to=["ann@dest.test"])
    link = _link(_delivered_to(mx, "ann@dest.test"))
    code, _, body = unsub.curl("-X", "DELETE", link)
    assert code == 405 and json.loads(body)["detail"].startswith("POST List-Unsubscribe=One-Click")
    out = subprocess.run(
        ["curl", "-sS", "-D", "-", "-o", "/dev/null", "-X", "PUT", link],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert "Allow: GET, HEAD, POST" in out
    code, _, body = unsub.curl(
        "-X", "POST", "-H", "Content-Type: application/json", "-d", "{}", link
    )
    assert code == 415 and json.loads(body)["field"] == "content-type"
    for form in ("List-Unsubscribe=Yes", "unsubscribe=One-Click", ""):
        code, _, body = unsub.curl("-X", "POST", "-d", form, link)
        doc = json.loads(body)
        assert code == 400 and doc["field"] == "List-Unsubscribe", doc
        assert "must be List-Unsubscribe=One-Click" in doc["detail"]
    code, _, body = unsub.curl("-F", "List-Unsubscribe=Later", link)
    assert code == 400 and "'Later'" in json.loads(body)["detail"]
    assert unsub.curl(unsub.base)[0] == 404  # no token: no such resource
    assert unsub.events() == [] and unsub.entries() == []


def test_links_at_the_root_of_a_host_leave_the_api_alone(relay, dns_server, fake_mx, tmp_path):
    unsub = _start(relay, dns_server, tmp_path, "/")
    mx = fake_mx()
    unsub.bulk(to=["ann@dest.test"])
    link = _link(_delivered_to(mx, "ann@dest.test"))
    assert link.startswith(unsub.base) and "/" not in link.removeprefix(unsub.base)
    assert unsub.curl("-X", "POST", "-d", "List-Unsubscribe=One-Click", link)[0] == 200
    assert len(unsub.events()) == 1  # /v1/events: still the API's, with its key
    status, _, doc = unsub.call("GET", "/v1/events", token="rk_wrong")
    assert status == 401 and doc["field"] == "authorization"
    assert unsub.curl(unsub.base + "favicon.ico")[0] == 400  # a segment of its own: a bad token


def test_a_reload_turns_the_links_off_in_both_processes(unsub: Unsub, fake_mx):
    mx = fake_mx()
    unsub.bulk(to=["ann@dest.test"])
    link = _link(_delivered_to(mx, "ann@dest.test"))
    config = unsub.relay.config_path
    config.write_text(config.read_text().replace(f'"url" = "{unsub.base}"', '"url" = ""'))
    config.write_text(re.sub(r'"mailto" = "[^"]*"', '"mailto" = ""', config.read_text()))
    unsub.relay.signal(signal.SIGHUP)
    unsub.relay.wait_event("reloaded")
    unsub.bulk(to=["bob@dest.test"])
    assert _parse(_delivered_to(mx, "bob@dest.test"))["List-Unsubscribe"] is None
    code, _, body = unsub.curl("-X", "POST", "-d", "List-Unsubscribe=One-Click", link)
    assert code == 404 and json.loads(body)["title"] == "Not found"
    assert unsub.events() == []


# -- the headers on their own ---------------------------------------------------------------

TEXT = (
    b"Received: from app ([10.0.0.5])\r\n\tby relay.test (relayd) with ESMTP id 1;\r\n"
    b"\tThu, 1 Jan 2026 00:00:00 +0000\r\n"
    b"From: News <news@shop.test>\r\nTo: ann@dest.test\r\nSubject: hi\r\n\r\nbody\r\n\r\nmore\r\n"
)


def _links(**config: Any) -> tuple[Links, Tokens]:
    tokens = Tokens(b"k" * 32)
    settings = {
        "url": "https://mail.example.test/u/",
        "mailto": "",
        "scope": "sender_domain",
        "max_age": YEAR,
        "streams": (BULK,),
        **config,
    }
    return Links(Unsubscribe(**settings), tokens), tokens


def _msg(body: bytes = TEXT, rcpts: tuple[str, ...] = ("ann@dest.test",), **kw: Any) -> NewMessage:
    fields = {"stream": BULK, "origin": "key:news", "sender": "news@Shop.test", **kw}
    return NewMessage("0191A2B3C4D5E6F7", recipients=list(rcpts), body=body, client="",
                      helo="", smtputf8=False, **fields)  # fmt: skip


def test_the_fields_go_at_the_end_of_the_header_section_and_name_the_scope():
    links, tokens = _links()
    msg = _msg(bytearray(TEXT))  # a large text arrives as a bytearray
    links.add(msg, NOW)
    head, body = bytes(msg.body).split(b"\r\n\r\n", 1)
    assert body == b"body\r\n\r\nmore\r\n" and head.startswith(TEXT.split(b"\r\n\r\n")[0])
    token = re.search(rb"<https://mail.example.test/u/([\w-]+)>", head).group(1).decode()
    assert head.endswith(
        f"\r\nList-Unsubscribe: <https://mail.example.test/u/{token}>\r\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click".encode()
    )
    assert tokens.unsubscribed(token, NOW, YEAR) == (
        msg.queue_id,
        "ann@dest.test",
        "domain:shop.test",
    )
    for config, origin, scope in (
        ({"scope": "global"}, "key:news", "*"),
        ({"scope": "key"}, "key:news", "key:news"),
        ({"scope": "key"}, "auth:shop", "auth:shop"),
        ({"scope": "key"}, "trusted:127.0.0.1", "*"),  # no account: every sender's
    ):
        links, tokens = _links(**config)
        msg = _msg(origin=origin)
        links.add(msg, NOW)
        token = re.search(rb"/u/([\w-]+)>", msg.body).group(1).decode()
        assert tokens.unsubscribed(token, NOW, YEAR)[2] == scope


def test_only_the_listed_streams_and_one_recipient_mail_get_the_fields():
    links, _ = _links(mailto="u@bounces.example.test")
    for msg in (
        _msg(stream=TRANSACTIONAL),
        _msg(rcpts=("a@dest.test", "b@dest.test")),
        _msg(rcpts=()),  # all suppressed: nothing is sent
        _msg(TEXT.replace(b"Subject:", b"list-UNSUBSCRIBE: <mailto:x@shop.test>\r\nSubject:")),
    ):
        before = bytes(msg.body)
        links.add(msg, NOW)
        assert msg.body == before
    off, _ = _links(url="", streams=(BULK,))  # off: no stream gets them
    msg = _msg()
    off.add(msg, NOW)
    assert msg.body == TEXT
    links, _ = _links(mailto="u@bounces.example.test", streams=(TRANSACTIONAL,))
    msg = _msg(stream=TRANSACTIONAL)
    links.add(msg, NOW)
    (value,) = _parse(msg.body).get_all("List-Unsubscribe")
    assert re.fullmatch(
        r"<https://mail\.example\.test/u/([\w-]+)>, <mailto:u@bounces\.example\.test"
        r"\?subject=unsubscribe%20\1>",
        str(value),
    )
    assert b">,\r\n <mailto:" in msg.body  # folded between the two URIs, not inside one


def test_a_header_only_message_gets_the_fields_first():
    links, _ = _links()
    msg = _msg(b"From: news@shop.test\r\nSubject: hi\r\n")
    links.add(msg, NOW)
    assert msg.body.startswith(b"List-Unsubscribe: <https://") and msg.body.endswith(b"hi\r\n")


# -- the mail path --------------------------------------------------------------------------


def _mail(subject: str, body: str) -> bytes:
    """An unsubscribe mail as a mail client sends it when the reader follows the mailto link."""
    return (
        "Return-Path: <ann@dest.test>\r\n"
        "Received: from mail.dest.test (mail.dest.test [192.0.2.7])\r\n"
        "\tby bounces.example.test (relayd) with ESMTPS id 0191A2B3C4D5E6F8;\r\n"
        "\tThu, 03 Dec 2026 11:00:00 +0000\r\n"
        "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=dest.test; s=s1;\r\n"
        "\th=from:to:subject:date:message-id; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;\r\n"
        "\tb=dGVzdA==\r\n"
        "Message-ID: <5f2c1e9a-7b3d-4e61-9f0a-2d8c4b1e6a77@dest.test>\r\n"
        "Date: Thu, 3 Dec 2026 11:59:58 +0100\r\n"
        "MIME-Version: 1.0\r\n"
        "User-Agent: Mozilla Thunderbird\r\n"
        "From: Ann <ann@dest.test>\r\n"
        "To: unsubscribe@bounces.example.test\r\n"
        f"Subject: {subject}\r\n"
        "Content-Type: text/plain; charset=UTF-8; format=flowed\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
        f"{body}"
    ).encode()


def test_the_token_of_an_unsubscribe_mail_is_in_its_subject_or_first_line():
    token = Tokens(b"k" * 32).unsubscribe("0191A2B3C4D5E6F7", "ann@dest.test", "*", NOW)
    assert token_of_mail(_mail(f"unsubscribe {token}", "\r\n")) == token
    assert token_of_mail(_mail(f"Re: Unsubscribe {token}", "thanks\r\n")) == token
    assert (
        token_of_mail(_mail("please", f"\r\n  unsubscribe {token}\r\n\r\n-- \r\nAnn\r\n")) == token
    )
    assert token_of_mail(_mail("please", f"{token}\r\n")) == token
    folded = _mail(f"=?UTF-8?Q?unsubscribe?=\r\n {token}", "")  # an encoded word, folded
    assert token_of_mail(folded) == token
    assert token_of_mail(_mail("unsubscribe me", "I do not want this any more\r\n")) is None
    assert token_of_mail(b"Subject: hi\r\nContent-Type: image/png\r\n\r\nxx\r\n") is None


def test_record_suppresses_once_with_the_originals_sender(spool_conn: sqlite3.Connection):
    tokens = Tokens(schema.secret(spool_conn, "tokens"))
    queue_id, rcpt = "0191A2B3C4D5E6F7", "Ann@dest.test"
    store.append_events(
        spool_conn,
        [
            Event(
                Type.RECEPTION,
                queue_id,
                NOW - 60,
                {"sender": "news@shop.test", "rcpt": [rcpt], "origin": "auth:shop", "envid": "e1"},
            )
        ],
    )
    token = tokens.unsubscribe(queue_id, rcpt, "domain:shop.test", NOW - 60)
    mail = _mail(f"unsubscribe {token}", "")
    event = record(spool_conn, tokens, token_of_mail(mail), NOW, YEAR, "mail")
    assert event is not None and (event.type, event.queue_id, event.at) == (
        "unsubscribed",
        queue_id,
        NOW,
    )
    assert event.data == {
        "rcpt": rcpt,
        "domain": "dest.test",
        "sender": "news@shop.test",
        "origin": "auth:shop",
        "scope": "domain:shop.test",
        "method": "mail",
        "envid": "e1",
    }
    (entry,) = suppression.every(spool_conn, NOW)
    assert (entry.address, entry.scope, entry.reason, entry.expires) == (
        "ann@dest.test",
        "domain:shop.test",
        "unsubscribe",
        None,
    )
    assert record(spool_conn, tokens, token, NOW + 5, YEAR, "one-click") is None  # done before
    count = spool_conn.execute("SELECT count(*) FROM events WHERE type = 'unsubscribed'")
    assert count.fetchone()[0] == 1
    with pytest.raises(BadToken, match="expired"):
        record(spool_conn, tokens, token, NOW + YEAR, YEAR, "mail")
    # a lapsing bounce entry in the scope is made lasting by the unsubscribe
    other = tokens.unsubscribe(queue_id, "bob@dest.test", "*", NOW)
    suppression.add(spool_conn, [suppression.Entry("bob@dest.test", "*", "bounce", NOW, NOW + 60)])
    event = record(spool_conn, tokens, other, NOW, YEAR, "mail")
    assert event is not None and "sender" in event.data
    found = suppression.find(spool_conn, ["bob@dest.test"], ["*"], NOW + 120)
    assert found["bob@dest.test"].reason == "unsubscribe"
