"""Asynchronous bounces and complaints: the report parser on real formats (tests/samples, see
its README: Postfix, Gmail, Microsoft, Exim, qmail, RFC 5965's ARF example), what a report
records in a real spool, the Feedback-ID field, and end to end a real relayd delivering to a
fake MX with its return path, then taking the DSN or ARF report back on its bounce listener."""

from __future__ import annotations

import json
import re
import signal
import smtplib
import sqlite3
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim
import pytest
from support.util import free_port, listening, mx_zone, wait_until
from test_dkim import dnsfunc_for, signatures
from test_submission import client_tls, self_signed

from relayd.config import DEFAULT_PATH, Suppression, load
from relayd.events.records import Event, Type
from relayd.feedback import record, reports
from relayd.feedback.record import Policy
from relayd.feedback.tokens import ReturnPaths, Tokens
from relayd.mime.dkim import keygen
from relayd.model.message import NewMessage
from relayd.outcomes.classify import Classifier
from relayd.queue.intake import add_feedback_id
from relayd.spool import schema, store, suppression

SAMPLES = Path(__file__).parent / "samples"
SAMPLE_PATH = "bounces+aebqvm5mhrtxoqwgqvwz3kxkhq4ysam@bounce.test"  # the samples' return path
QID = "019BB6D1E2F3A4B5"
NOW = 1_800_000_000.0
VERP = re.compile(r"^bounces\+([a-z2-7]{29})@bounce\.test$")
CLASSIFIER = Classifier(load(DEFAULT_PATH).bounces)  # the shipped rules


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


# -- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "rcpt", "status", "mx", "text"),
    [
        ("postfix.eml", "nobody@example.net", "5.1.1", "mx1.example.net", "User unknown in"),
        ("gmail.eml", "gone.user@gmail.com", "5.1.1", "gmail-smtp-in.l.google.com", "typos or"),
        ("microsoft.eml", "gone@contoso.com", "5.1.10", "AM0PR01MB1234.eurprd01.prod", "lookup"),
    ],
)
def test_rfc3464_bounces_give_each_failed_recipient(name, rcpt, status, mx, text):
    report = reports.parse(sample(name))
    assert isinstance(report, reports.DeliveryReport) and report.format == "rfc3464"
    (r,) = report.recipients
    assert (r.rcpt, r.action, r.status, r.code) == (rcpt, "failed", status, 550)
    assert r.remote_mta.startswith(mx) and text in r.diagnostic
    # as relayd keeps a reply's text; Gmail's 550-5.1.1 lines made one reply
    assert r.diagnostic.startswith(f"{status} ") and "550" not in r.diagnostic
    assert ("return-path", f"<{SAMPLE_PATH}>") in report.returned
    assert CLASSIFIER.is_hard(CLASSIFIER.classify(r.code, r.diagnostic))


def test_a_delay_notice_is_a_delayed_recipient():
    (r,) = reports.parse(sample("postfix-delayed.eml")).recipients
    assert (r.rcpt, r.action, r.status, r.code) == ("slow@example.net", "delayed", "4.4.1", 450)
    assert r.diagnostic.startswith("4.4.1 connect to mx.example.net")  # the status put first
    assert CLASSIFIER.classify(r.code, r.diagnostic) == "connection"


@pytest.mark.parametrize(
    ("name", "rcpt", "line"),
    [
        ("exim.eml", "ghost@example.org", "5.1.1 <ghost@example.org>: Recipient address"),
        ("qmail.eml", "nobody@example.com", "5.1.1 Remote host said: 550 5.1.1 <nobody@"),
    ],
)
def test_non_standard_bounces_are_read_with_flufl_bounce(name, rcpt, line):
    report = reports.parse(sample(name))
    assert isinstance(report, reports.DeliveryReport) and report.format == "other"
    (r,) = report.recipients
    assert (r.rcpt, r.action, r.status, r.code) == (rcpt, "failed", "5.1.1", 550)
    assert r.diagnostic.startswith(line)


def test_the_rfc5965_example_is_a_complaint():
    report = reports.parse(sample("arf-rfc5965.eml"))
    assert report == reports.Complaint(
        feedback_type="abuse",
        user_agent="SomeGenerator/1.0",
        original_mail_from="somespammer@example.net",
        original_rcpt_to=("user@example.com",),
        arrival_date="Thu, 8 Mar 2005 14:00:00 EDT",
        source_ip="192.0.2.1",
        reporting_mta="mail.example.com",
        returned=report.returned,
    )
    assert reports.header(report.returned, "subject") == ["Earn money"]
    assert reports.header(report.returned, "message-id") == [
        "8787KJKJ3K4J3K4J3K4J3.mail@example.net"
    ]


def test_a_message_that_is_no_report_is_unrecognised():
    report = reports.parse(sample("autoreply.eml"))
    assert isinstance(report, reports.Unrecognised) and "neither" in report.why


# -- what a report records --------------------------------------------------------------------

TOKENS = Tokens(b"s" * 32)
PATHS = ReturnPaths(TOKENS, "bounces", "bounce.test")


def _policy(ttl: float = 30 * 86400, bounces: str = "global", complaints: str = "sender_domain"):
    return Policy(CLASSIFIER, Suppression("refuse", ttl, bounces, complaints), "relay.test")


POLICY = _policy()


def _accepted(conn: sqlite3.Connection, queue_id: str, rcpts: list[str], origin: str) -> None:
    data = {"sender": "app@shop.test", "rcpt": rcpts, "origin": origin, "envid": "e-1"}
    store.append_events(conn, [Event(Type.RECEPTION, queue_id, NOW - 60, data)])


def _failure(rcpt: str, status: str = "5.1.1", action: str = "failed") -> reports.DeliveryReport:
    r = reports.Recipient(rcpt, "", action, status, 550, f"{status} no", "mx.dest.test")
    return reports.DeliveryReport("rfc3464", (r,), ())


def _apply(conn: sqlite3.Connection, report: Any, queue_id: str | None, policy=POLICY):
    return record.apply(conn, report, queue_id, PATHS, policy, NOW)


def _rows(conn: sqlite3.Connection, kind: str) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT queue_id, data FROM events WHERE type = ?", (kind,)).fetchall()
    return [{"queue_id": q, **json.loads(d)} for q, d in rows]


@pytest.mark.parametrize(
    ("setting", "origin", "scope"),
    [
        ("global", "key:shop", "*"),
        ("sender_domain", "key:shop", "domain:shop.test"),
        ("key", "key:shop", "key:shop"),
        ("key", "trusted:127.0.0.1", "*"),  # no key sent it: every sender's (conf/relayd.toml)
    ],
)
def test_a_hard_bounce_records_its_event_and_suppresses_in_the_configured_scope(
    spool_conn, setting, origin, scope
):
    _accepted(spool_conn, QID, ["gone@dest.test"], origin)
    out = _apply(spool_conn, _failure("Gone@Dest.test"), QID, _policy(3600, setting))
    assert not out.unmatched
    (event,) = _rows(spool_conn, "bounced")
    assert event["queue_id"] == QID and event["rcpt"] == "gone@dest.test"
    assert event["async"] is True and event["status"] == "5.1.1" and event["code"] == 550
    assert event["class"] == "invalid_recipient" and event["suppressed"] == scope
    assert event["sender"] == "app@shop.test" and event["envid"] == "e-1"
    (entry,) = suppression.listing(spool_conn, NOW)
    assert (entry.address, entry.scope, entry.reason) == ("gone@dest.test", scope, "bounce")
    assert entry.expires == NOW + 3600 and entry.queue_id == QID
    assert entry.bounce_class == "invalid_recipient" and entry.detail == "550 5.1.1 no"


def test_soft_failures_delays_and_strangers_record_events_without_suppressing(spool_conn):
    _accepted(spool_conn, QID, ["a@dest.test", "b@dest.test"], "auth:shop")
    _apply(spool_conn, _failure("a@dest.test", "5.2.2"), QID)  # quota: not a hard class
    _apply(spool_conn, _failure("b@dest.test", "4.4.1", "delayed"), QID)
    out = _apply(spool_conn, _failure("c@elsewhere.test"), QID)  # not a recipient of it
    assert out.unmatched == [f"c@elsewhere.test: not a recipient of {QID}: not suppressed"]
    assert [e["rcpt"] for e in _rows(spool_conn, "bounced")] == ["a@dest.test", "c@elsewhere.test"]
    (deferred,) = _rows(spool_conn, "deferred")
    assert deferred["rcpt"] == "b@dest.test" and deferred["async"] is True
    assert deferred["status"] == "4.4.1" and deferred["class"] == "connection"
    assert suppression.listing(spool_conn, NOW) == []
    _apply(spool_conn, _failure("a@dest.test"), QID, _policy(ttl=0))  # bounce_ttl 0: none
    assert suppression.listing(spool_conn, NOW) == []


def test_a_forwarded_address_bounces_as_the_one_recipient_it_was(spool_conn):
    _accepted(spool_conn, QID, ["ann@dest.test"], "key:shop")
    _apply(spool_conn, _failure("ann@forward.test"), QID)
    (event,) = _rows(spool_conn, "bounced")
    assert event["rcpt"] == "ann@dest.test" and event["final_rcpt"] == "ann@forward.test"


def test_a_bounce_for_a_message_without_record_is_recorded_with_what_it_says(spool_conn):
    out = _apply(spool_conn, _failure("gone@dest.test"), QID)
    assert out.unmatched == [f"{QID}: no record of the message (past events.retention?)"]
    (event,) = _rows(spool_conn, "bounced")
    assert event["sender"] == "" and event["rcpt"] == "gone@dest.test"
    assert [e.scope for e in suppression.listing(spool_conn, NOW)] == ["*"]
    # no sender known: global, as for an attempt's bounce of mail without one
    _apply(spool_conn, _failure("other@dest.test"), QID, _policy(3600, "sender_domain"))
    assert [e.scope for e in suppression.listing(spool_conn, NOW)] == ["*", "*"]


def _complaint(**fields: Any) -> reports.Complaint:
    base: dict[str, Any] = {
        "feedback_type": "abuse",
        "user_agent": "Yahoo!-Mail-Feedback/2.0",
        "original_mail_from": "",
        "original_rcpt_to": (),
        "arrival_date": "",
        "source_ip": "192.0.2.1",
        "reporting_mta": "",
        "returned": (),
    }
    return reports.Complaint(**(base | fields))


def test_a_complaint_is_found_by_return_path_or_relayds_received_field(spool_conn):
    _accepted(spool_conn, QID, ["angry@dest.test"], "key:shop")
    verp = TOKENS.return_path(QID, "bounces", "bounce.test")
    _apply(spool_conn, _complaint(original_mail_from=verp), None)
    other = "019BB6D1E2F3A4B6"
    _accepted(spool_conn, other, ["calm@dest.test"], "key:shop")
    received = (
        ("received", f"from x ([192.0.2.9]) by relay.test (relayd) with ESMTP id {other};"),
    )
    _apply(spool_conn, _complaint(returned=received, feedback_type="not-spam"), None)
    events = _rows(spool_conn, "complained")
    assert [(e["queue_id"], e["rcpt"], e["found_by"]) for e in events] == [
        (QID, "angry@dest.test", "original_mail_from"),
        (other, "calm@dest.test", "received"),
    ]
    assert events[0]["feedback_type"] == "abuse" and events[0]["source_ip"] == "192.0.2.1"
    assert events[0]["suppressed"] == "domain:shop.test" and "suppressed" not in events[1]
    (entry,) = suppression.listing(spool_conn, NOW)  # not-spam suppresses nothing
    assert (entry.address, entry.scope, entry.reason, entry.expires) == (
        "angry@dest.test",
        "domain:shop.test",
        "complaint",
        None,
    )
    assert entry.detail == "abuse report by Yahoo!-Mail-Feedback/2.0"


def test_complaints_that_name_nothing_relayd_sent_change_nothing(spool_conn):
    unknown = "019BB6D1E2F3A4B7"
    forged = (("return-path", "<bounces+aaaaaaaaaaaaaaaaaaaaaaaaaaaaa@bounce.test>"),)
    received = (("received", f"by relay.test (relayd) with ESMTP id {unknown};"),)
    for returned in (forged, received, ()):
        out = _apply(spool_conn, _complaint(returned=returned), None)
        assert out.unmatched == [
            "names no message relayd sent (no return path, no relayd Received)"
        ]
    _accepted(spool_conn, QID, ["a@dest.test", "b@dest.test"], "key:shop")
    out = _apply(spool_conn, _complaint(), QID)  # no Original-Rcpt-To, two recipients
    assert out.unmatched == [f"{QID}: no Original-Rcpt-To, and no one recipient to blame"]
    out = _apply(spool_conn, _complaint(feedback_type="auth-failure"), QID)
    assert "not a complaint" in out.unmatched[0]
    assert _rows(spool_conn, "complained") == [] and suppression.listing(spool_conn, NOW) == []


# -- Feedback-ID --------------------------------------------------------------------------------

TEMPLATE = "{meta.campaign}:{account}:{stream}:{sender_domain}"


def _new(text: bytes, origin: str = "key:shop", meta: str = "") -> NewMessage:
    return NewMessage(QID, "app@Shop.test", ["x@dest.test"], text, "", "", origin, False, meta=meta)


def test_the_feedback_id_field_is_made_from_the_template():
    msg = _new(
        b"From: a@shop.test\r\nSubject: hi\r\n\r\nbody\r\n", meta='{"campaign": "Spring 26!"}'
    )
    msg.stream = "bulk"
    add_feedback_id(msg, TEMPLATE)
    assert msg.body == (
        b"From: a@shop.test\r\nSubject: hi\r\nFeedback-ID: Spring-26-:shop:bulk:shop.test\r\n"
        b"\r\nbody\r\n"
    )
    trusted = _new(b"From: a@shop.test\r\n\r\nbody\r\n", origin="trusted:127.0.0.1")
    add_feedback_id(trusted, TEMPLATE)  # no key, no metadata: empty fields
    assert b"\r\nFeedback-ID: ::transactional:shop.test\r\n\r\nbody" in trusted.body
    own = _new(b"From: a@shop.test\r\nFeedback-ID: c:1:2:mine\r\n\r\nbody\r\n")
    add_feedback_id(own, TEMPLATE)
    assert own.body.count(b"Feedback-ID") == 1


# -- end to end ----------------------------------------------------------------------------------


@pytest.fixture
def bouncing(relay, dns_server, fake_mx, tmp_path):
    """relayd with a return-path domain and a bounce listener, DKIM for shop.test, a fake MX for
    dest.test; yields (relayd, its bounce port, the fake MX, the verifier's DNS function)."""
    mx_zone(dns_server, "dest.test", (10, "mx.dest.test", "127.0.0.10"))
    mx = fake_mx()
    key, line = keygen("shop.test", "s1", "rsa", tmp_path)
    port = free_port()
    r = relay(
        {
            "listeners": [
                {"address": f"127.0.0.1:{free_port()}", "kind": "relay"},
                {"address": f"127.0.0.1:{port}", "kind": "bounce"},
            ],
            "return_path": {"domain": "bounce.test", "feedback_id": TEMPLATE},
            "dkim": {"keys": [{"domain": "shop.test", "selector": "s1", "key_file": str(key)}]},
            "suppression": {"bounce_ttl": "30d"},  # the default, which tests turn off
        }
    )
    wait_until(lambda: listening(port), 10, "the bounce listener")
    return r, port, mx, dnsfunc_for(line)


def _submit(
    port: int, rcpt: str, sender: str = "app@shop.test", stream: str = "transactional"
) -> tuple[int, str]:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, rcpt, "spring sale"
    msg["X-Relayd-Meta"] = '{"campaign": "spring"}'
    msg["X-Relayd-Stream"] = stream
    msg.set_content("hello\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail(sender)
        code, text = client.rcpt(rcpt)
        if code != 250:
            return code, text.decode()
        code, text = client.data(msg.as_bytes())
    return code, text.decode()


def _report(port: int, rcpt: str, text: bytes, sender: str = "") -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("mail.example.net")
        client.mail(sender)
        code, reply = client.rcpt(rcpt)
        if code != 250:
            return code, reply
        return client.data(text)


def test_a_dsn_to_the_return_path_bounces_and_suppresses_the_recipient(bouncing):
    r, port, mx, dnsfunc = bouncing
    code, reply = _submit(r.port, "gone@dest.test")
    assert code == 250, reply
    queue_id = reply.rsplit(" ", 1)[1]
    (got,) = mx.wait_for_messages(1)
    m = VERP.match(got.mail_from)
    assert m, got.mail_from  # relayd's own return path, naming the message
    spool = sqlite3.connect(r.spool)
    tokens = Tokens(schema.secret(spool, "tokens"))
    assert tokens.message_of(m.group(1)) == queue_id
    assert b"\r\nFeedback-ID: spring::transactional:shop.test\r\n" in got.data
    (signature,) = signatures(got.data)
    assert "feedback-id" in signature["h"].lower().split(":")  # signed, so not altered on the way
    assert dkim.verify(got.data, dnsfunc=dnsfunc)
    (accepted,) = r.wait_event("accepted", queue_id=queue_id)
    assert accepted["sender"] == "app@shop.test"  # the envelope sender stays the sender's
    r.wait_event("delivered", queue_id=queue_id)

    dsn = sample("postfix.eml").replace(SAMPLE_PATH.encode(), got.mail_from.encode())
    dsn = dsn.replace(b"nobody@example.net", b"gone@dest.test")
    code, reply = _report(port, got.mail_from, dsn)
    assert code == 250, reply
    (event,) = r.wait_event("bounced", queue_id=queue_id)
    assert event["rcpt"] == "gone@dest.test" and event["async"] is True
    assert (event["code"], event["status"], event["mx"]) == (550, "5.1.1", "mx1.example.net")
    assert event["response"].startswith("5.1.1 <gone@dest.test>: Recipient address rejected")
    assert event["class"] == "invalid_recipient"
    assert event["sender"] == "app@shop.test" and event["suppressed"] == "*"
    assert event["meta"] == {"campaign": "spring"}
    row = spool.execute("SELECT data FROM events WHERE type = 'bounced'").fetchone()
    assert json.loads(row[0])["async"] is True  # in the outbox webhooks read, not just the log
    spool.close()

    code, reply = _submit(r.port, "gone@dest.test")
    assert code == 550 and reply.startswith("5.7.1 <gone@dest.test>: suppressed (bounce")


def test_the_bounce_listener_takes_only_return_paths_and_feedback_addresses(bouncing):
    r, port, _, _ = bouncing
    real = Tokens(b"x" * 32).return_path(QID, "bounces", "bounce.test")  # another secret
    altered = "bounces+" + "a" * 29 + "@bounce.test"
    for rcpt in (real, altered):
        code, reply = _report(port, rcpt, b"Subject: x\r\n\r\nx\r\n")
        assert code == 550 and reply.startswith(b"5.1.1 <") and b"Bad return path" in reply
    code, reply = _report(port, "someone@bounce.test", b"x")
    assert code == 550 and reply.startswith(b"5.1.1 <someone@bounce.test>: No such mailbox")
    for rcpt in ("x@dest.test", "postmaster@relay.test"):  # no relaying, trusted client or not
        code, reply = _report(port, rcpt, b"x", sender="app@shop.test")
        assert code == 550 and reply.startswith(f"5.7.1 <{rcpt}>: Relay access denied".encode())
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        code, features = client.ehlo("mail.example.net")
        assert code == 250 and b"AUTH" not in features
        assert client.docmd("AUTH", "PLAIN AGFwcABzZWNyZXQ=")[0] // 100 == 5  # 538: no TLS
        client.mail("")
        assert client.rcpt("fbl@bounce.test")[0] == 250
        assert client.rcpt("FBL@Bounce.test")[0] == 250  # the same address
        spool = sqlite3.connect(r.spool)
        ours = Tokens(schema.secret(spool, "tokens")).return_path(QID, "bounces", "bounce.test")
        spool.close()
        assert client.rcpt(ours)[0] == 452  # one report recipient per transaction
    assert not r.events("bounced") and not r.events("complained")


def test_an_arf_report_is_a_complaint_suppressing_in_the_sender_domain(bouncing):
    r, port, mx, _ = bouncing
    code, reply = _submit(r.port, "angry@dest.test", stream="bulk")
    assert code == 250, reply
    queue_id = reply.rsplit(" ", 1)[1]
    (got,) = mx.wait_for_messages(1)
    assert b"\r\nFeedback-ID: spring::bulk:shop.test\r\n" in got.data
    arf = sample("arf-rfc5965.eml")
    arf = arf.replace(
        b"<somespammer@example.net>\nOriginal-Rcpt-To: <user@example.com>",
        (f"<{got.mail_from}>\nOriginal-Rcpt-To: <angry@dest.test>".encode()),
    )
    assert got.mail_from.encode() in arf
    code, reply = _report(port, "fbl@bounce.test", arf, sender="abusedesk@example.com")
    assert code == 250, reply
    (event,) = r.wait_event("complained", queue_id=queue_id)
    assert (event["rcpt"], event["feedback_type"], event["found_by"]) == (
        "angry@dest.test",
        "abuse",
        "original_mail_from",
    )
    assert event["user_agent"] == "SomeGenerator/1.0" and event["source_ip"] == "192.0.2.1"
    assert event["suppressed"] == "domain:shop.test" and event["sender"] == "app@shop.test"
    assert event["stream"] == "bulk" and event["meta"] == {"campaign": "spring"}
    (entry,) = json.loads(r.ctl("--json", "suppression", "list").stdout)["suppressions"]
    assert (entry["address"], entry["scope"], entry["reason"]) == (
        "angry@dest.test",
        "domain:shop.test",
        "complaint",
    )
    assert entry["expires"] is None
    assert _submit(r.port, "angry@dest.test")[0] == 550
    assert _submit(r.port, "angry@dest.test", sender="app@other.test")[0] == 250


def test_reports_that_name_nothing_are_accepted_and_logged(bouncing):
    r, port, _, _ = bouncing
    code, reply = _report(port, "fbl@bounce.test", sample("autoreply.eml"))
    assert code == 250, reply
    report_id = reply.decode().rsplit(" ", 1)[1]
    (line,) = r.wait_event("unrecognised_report", report_id=report_id)
    assert line["rcpt"] == "fbl@bounce.test" and "neither" in line["why"]
    code, reply = _report(port, "fbl@bounce.test", sample("arf-rfc5965.eml"))
    assert code == 250, reply
    (line,) = r.wait_event("report_unmatched", report_id=reply.decode().rsplit(" ", 1)[1])
    assert "names no message relayd sent" in line["why"]
    assert not r.events("complained") and not r.events("bounced")


def test_with_tls_the_bounce_listener_offers_starttls_but_never_auth(relay, tmp_path):
    crt, key = self_signed(tmp_path)
    port = free_port()
    relay(
        {
            "listeners": [
                {"address": f"127.0.0.1:{free_port()}", "kind": "relay"},
                {"address": f"127.0.0.1:{port}", "kind": "bounce"},
            ],
            "tls": {"cert_file": str(crt), "key_file": str(key)},
            "return_path": {"domain": "bounce.test"},
        }
    )
    wait_until(lambda: listening(port), 10, "the bounce listener")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("mail.example.net")
        assert client.has_extn("starttls")
        client.starttls(context=client_tls())
        code, features = client.ehlo("mail.example.net")
        assert code == 250 and b"AUTH" not in features
        code, reply = client.docmd("AUTH", "PLAIN AGFwcABzZWNyZXQ=")
        assert (code, reply) == (504, b"5.5.4 Unrecognized authentication type")


def test_relayds_own_dsns_still_go_to_the_sender_from_the_null_sender(
    bouncing, fake_mx, dns_server
):
    r, _, mx, _ = bouncing
    mx_zone(dns_server, "shop.test", (10, "mx.shop.test", "127.0.0.11"))
    shop = fake_mx("127.0.0.11")
    mx.rcpt_replies["bad@dest.test"] = "550 5.1.1 no such user"
    code, reply = _submit(r.port, "bad@dest.test")
    assert code == 250, reply
    (dsn,) = shop.wait_for_messages(1)
    assert dsn.mail_from == "" and dsn.rcpts == ["app@shop.test"]  # not the return path
    assert b"Final-Recipient: rfc822; bad@dest.test" in dsn.data
    assert b"Feedback-ID" not in dsn.data.partition(b"\r\n\r\n")[0]  # a DSN is no campaign


def test_a_reload_applies_the_new_feedback_addresses(bouncing):
    r, port, _, _ = bouncing
    assert _report(port, "abuse@bounce.test", b"x")[0] == 550
    text = r.config_path.read_text()
    text = text.replace('["return_path"]\n', '["return_path"]\ncomplaints = ["fbl", "abuse"]\n')
    r.config_path.write_text(text)
    r.signal(signal.SIGHUP)
    r.wait_event("reloaded")
    code, reply = _report(port, "abuse@bounce.test", sample("autoreply.eml"))
    assert code == 250, reply
    r.wait_event("unrecognised_report", rcpt="abuse@bounce.test")


def test_an_unsubscribe_mail_to_the_mailto_address_unsubscribes(relay, dns_server, fake_mx):
    mx_zone(dns_server, "dest.test", (10, "mx.dest.test", "127.0.0.10"))
    mx = fake_mx()
    port, http = free_port(), free_port()
    r = relay(
        {
            "listeners": [
                {"address": f"127.0.0.1:{free_port()}", "kind": "relay"},
                {"address": f"127.0.0.1:{port}", "kind": "bounce"},
                {"address": f"127.0.0.1:{http}", "kind": "http"},
            ],
            "return_path": {"domain": "bounce.test"},
            "unsubscribe": {
                "url": f"http://127.0.0.1:{http}/u/",
                "mailto": "unsubscribe@bounce.test",
            },
        }
    )
    wait_until(lambda: listening(port), 10, "the bounce listener")
    code, reply = _submit(r.port, "ann@dest.test", stream="bulk")
    assert code == 250, reply
    queue_id = reply.rsplit(" ", 1)[1]
    (got,) = mx.wait_for_messages(1)
    m = re.search(rb"<mailto:unsubscribe@bounce\.test\?subject=unsubscribe%20([\w-]+)>", got.data)
    assert m, got.data
    forged = f"Subject: unsubscribe {m.group(1).decode()[:-2]}xx\r\n\r\n".encode()
    code, reply = _report(port, "unsubscribe@bounce.test", forged, sender="ann@dest.test")
    assert code == 250, reply
    (line,) = r.wait_event("report_unmatched", rcpt="unsubscribe@bounce.test")
    assert line["why"].startswith("unsubscribe refused")
    text = f"From: ann@dest.test\r\nSubject: unsubscribe {m.group(1).decode()}\r\n\r\n".encode()
    code, reply = _report(port, "Unsubscribe@Bounce.test", text, sender="ann@dest.test")
    assert code == 250, reply
    (event,) = r.wait_event("unsubscribed", queue_id=queue_id)
    assert (event["rcpt"], event["method"], event["scope"]) == (
        "ann@dest.test",
        "mail",
        "domain:shop.test",
    )
    assert _submit(r.port, "ann@dest.test")[0] == 550  # suppressed for shop.test's mail
