"""SMTP receipts: the DSN extension (RFC 3461) and metadata headers, from the parameters a client
gives to the DSN (or the silence) that comes back and the events that report it.

DSNs are read with independent parsers: Python's email package for the multipart/report and its
message/delivery-status part, and flufl.bounce for what a bounce processor would make of them.
"""

from __future__ import annotations

import email
import json
import smtplib
import sqlite3
from email.message import Message

import pytest
from flufl.bounce import all_failures, scan_message
from support.util import mx_zone

from relayd.ingress import metadata, params
from relayd.ingress.metadata import MetadataError
from relayd.ingress.params import ParamError
from relayd.mime import dsn
from relayd.model.message import META_MAX, Notify, Report

NOW = 1_800_000_000.0
ORIGINAL = b"From: <app@sender.test>\r\nSubject: order 123\r\n\r\nline one\r\n..dot\r\n"

# -- parameters, as parsed -----------------------------------------------------------------


def test_dsn_parameters_parse_with_xtext_decoded_and_case_kept():
    assert params.mail({}) == ("", None)
    assert params.mail({"RET": ["hdrs"], "ENVID": ["Ab+2Bc+3D1"]}) == ("HDRS", "Ab+c=1")
    assert params.rcpt({}) == (0, None)
    assert params.rcpt({"NOTIFY": ["never"]}) == (Notify.NEVER, None)
    flags, orcpt = params.rcpt({"NOTIFY": ["SUCCESS,delay"], "ORCPT": ["RFC822;Bob+40x@Y.test"]})
    assert flags == Notify.SUCCESS | Notify.DELAY and orcpt == "rfc822;Bob@x@Y.test"
    assert params.given("RET=FULL  envid=Q+2B size=10", params.MAIL_KEYS) == {
        "RET": ["FULL"],
        "ENVID": ["Q+2B"],
    }


@pytest.mark.parametrize(
    ("command", "given", "words"),
    [
        ("mail", {"RET": ["ALL"]}, "RET parameter: must be FULL or HDRS"),
        ("mail", {"RET": ["FULL", "HDRS"]}, "Duplicate RET"),
        ("mail", {"RET": [""]}, "RET parameter: a value is required"),
        ("mail", {"ENVID": ["x" * 101]}, "ENVID parameter too long"),
        ("mail", {"ENVID": ["a+zz"]}, "ENVID parameter: not xtext"),
        ("mail", {"ENVID": ["a+2"]}, "ENVID parameter: not xtext"),
        ("mail", {"ENVID": ["a=b"]}, "ENVID parameter: not xtext"),
        ("mail", {"ENVID": ["a+0D+0AX-Evil:+201"]}, "ENVID parameter: not printable"),
        ("mail", {"ENVID": ["one", "two"]}, "Duplicate ENVID"),
        ("rcpt", {"NOTIFY": ["NEVER,SUCCESS"]}, "NEVER cannot be combined"),
        ("rcpt", {"NOTIFY": ["SUCCESS,SUCCESS"]}, "SUCCESS twice"),
        ("rcpt", {"NOTIFY": ["SOMETIMES"]}, "NOTIFY parameter: NEVER, or a list"),
        ("rcpt", {"NOTIFY": ["SUCCESS,"]}, "NOTIFY parameter: NEVER, or a list"),
        ("rcpt", {"NOTIFY": ["NEVER", "NEVER"]}, "Duplicate NOTIFY"),
        ("rcpt", {"ORCPT": ["bob@x.test"]}, "ORCPT parameter: must be addr-type;xtext"),
        ("rcpt", {"ORCPT": ["rfc 822;bob@x.test"]}, "ORCPT parameter: must be addr-type;xtext"),
        ("rcpt", {"ORCPT": ["rfc822;"]}, "ORCPT parameter: not xtext"),
        ("rcpt", {"ORCPT": ["rfc822;" + "b" * 500]}, "ORCPT parameter too long"),
    ],
)
def test_bad_dsn_parameters_are_refused_naming_the_parameter(command, given, words):
    with pytest.raises(ParamError) as info:
        getattr(params, command)(given)
    assert info.value.reply.startswith("501 5.5.4 ") and words in info.value.reply


# -- metadata headers, as parsed ------------------------------------------------------------


def test_metadata_json_and_prefix_fields_are_taken_out_of_the_text():
    text = (
        b'X-Relayd-Meta: {"order": "123",\r\n  "tags": ["a"]}\r\nSubject: s\r\n'
        b"X-Shop-Id: 9\r\nx-shop-customer: Ann\r\n\r\nbody\r\n"
    )
    meta, out = metadata.extract(text, ("X-Relayd-Meta", "X-Shop-*"), keep=False)
    assert json.loads(meta) == {"order": "123", "tags": ["a"], "Id": "9", "customer": "Ann"}
    assert out == b"Subject: s\r\n\r\nbody\r\n"
    kept_meta, kept = metadata.extract(text, ("X-Relayd-Meta", "X-Shop-*"), keep=True)
    assert kept_meta == meta and kept == text
    plain = b"Subject: about X-Relayd-Meta\r\n\r\nbody\r\n"
    assert metadata.extract(plain, ("X-Relayd-Meta",), keep=False) == ("", plain)
    only = b'X-Relayd-Meta: {"a": 1}\r\n\r\nbody\r\n'
    assert metadata.extract(only, ("X-Relayd-Meta",), False) == ('{"a":1}', b"\r\nbody\r\n")
    assert metadata.extract(text, (), keep=False) == ("", text)


@pytest.mark.parametrize(
    ("field", "reply"),
    [
        (b"X-Relayd-Meta: order=123", "550 5.6.0 Bad X-Relayd-Meta header: not JSON"),
        (b"X-Relayd-Meta: [1, 2]", "550 5.6.0 Bad X-Relayd-Meta header: not a JSON object"),
        (b'X-Relayd-Meta: {"a": 1, "a": 2}', "550 5.6.0 Bad X-Relayd-Meta header: key 'a'"),
        (b'X-Relayd-Meta: {"a": 1}\r\nX-Relayd-Meta: {"a": 2}', "550 5.6.0 Bad X-Relayd-Meta"),
        (b'X-Relayd-Meta: {"a": "\xff"}', "550 5.6.0 Bad X-Relayd-Meta header: not UTF-8"),
        (b'X-Relayd-Meta: {"a": "' + b"x" * META_MAX + b'"}', "552 5.3.4 Metadata too large"),
        (b"X-M-: 1", "550 5.6.0 Bad X-M-* header: no key after the prefix"),
    ],
)
def test_bad_metadata_is_refused_precisely(field, reply):
    with pytest.raises(MetadataError) as info:
        metadata.extract(field + b"\r\n\r\nbody\r\n", ("X-Relayd-Meta", "X-M-*"), False)
    assert info.value.reply.startswith(reply), info.value.reply


# -- DSNs, as built ---------------------------------------------------------------------------


def report(kind: str = "failed", ret: str = "", **kw) -> Report:
    return Report(
        kind,
        "ORIGQID",
        "app@sender.test",
        NOW - 60,
        ORIGINAL,
        [("bob@x.test", 550 if kind == "failed" else 250, "5.1.1 no such user", "mx.x.test")],
        ret=ret,
        **kw,
    )


def parts(text: bytes) -> tuple[Message, list[Message], Message]:
    """The report, its delivery-status blocks (per-message first), and its third part."""
    msg = email.message_from_bytes(text)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    first, status, returned = msg.get_payload()
    assert first.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    return msg, status.get_payload(), returned


def test_ret_full_returns_the_whole_message_and_hdrs_only_its_header_section():
    text = dsn.build(report(ret="FULL", envid="ENV 1", orcpt=["rfc822;Bob@X.test"]), "r.test", NOW)
    msg, (per_message, per_rcpt), returned = parts(text)
    assert per_message["Original-Envelope-Id"] == "ENV 1"
    assert per_rcpt["Original-Recipient"] == "rfc822;Bob@X.test"
    assert (per_rcpt["Action"], per_rcpt["Status"]) == ("failed", "5.1.1")
    assert returned.get_content_type() == "message/rfc822"
    whole = returned.get_payload()[0]
    assert whole["Subject"] == "order 123" and whole.get_payload() == "line one\r\n..dot\r\n"
    assert "attached below, whole" in msg.get_payload()[0].get_payload()
    for ret in ("HDRS", ""):  # the default for failures is the header section too
        text = dsn.build(report(ret=ret), "r.test", NOW)
        msg, (per_message, per_rcpt), returned = parts(text)
        assert "Original-Envelope-Id" not in per_message and "Original-Recipient" not in per_rcpt
        assert returned.get_content_type() == "text/rfc822-headers"
        assert "Subject: order 123" in returned.get_payload() and "line one" not in text.decode()
        assert "header section is attached" in msg.get_payload()[0].get_payload()


def test_a_too_large_original_goes_back_as_its_header_section_and_says_so():
    big = report(ret="FULL")
    big.body = ORIGINAL + b"x" * dsn.FULL_RETURN_MAX
    msg, _, returned = parts(dsn.build(big, "r.test", NOW))
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "only its header section" in msg.get_payload()[0].get_payload()


def test_a_success_dsn_reports_delivered_2_0_0_with_the_headers_only():
    text = dsn.build(report("delivered", ret="FULL", envid="E"), "r.test", NOW)
    msg, (_, per_rcpt), returned = parts(text)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    assert (per_rcpt["Action"], per_rcpt["Status"]) == ("delivered", "2.0.0")
    assert returned.get_content_type() == "text/rfc822-headers"  # RET is for failures only
    assert scan_message(msg) == set()  # a bounce processor sees no failure in it


# -- end to end -------------------------------------------------------------------------------


def dsn_mail(rcpt: str, mail_params: str, rcpt_params: str, port: int, text: bytes) -> str:
    """Submit one message with DSN parameters; the 250 reply to DATA."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.has_extn("dsn")
        code, reply = client.docmd(f"MAIL FROM:<app@sender.test> {mail_params}".strip())
        assert code == 250, reply
        code, reply = client.docmd(f"RCPT TO:<{rcpt}> {rcpt_params}".strip())
        assert code == 250, reply
        code, reply = client.data(text)
        assert code == 250, reply
    return reply.decode()


@pytest.fixture
def world(dns_server, fake_mx):
    """A destination that bounces gone@ and takes everyone else, and the sender's MX."""
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx_zone(dns_server, "sender.test", (10, "mx.sender.test", "127.0.0.20"))
    dest = fake_mx("127.0.0.10", rcpt_replies={"gone@example.test": "550 5.1.1 no such user"})
    return dest, fake_mx("127.0.0.20")


def by_envid(messages) -> dict[str, Message]:
    out = {}
    for m in messages:
        parsed = email.message_from_bytes(m.data)
        _, blocks, _ = parts(m.data)
        out[blocks[0]["Original-Envelope-Id"]] = parsed
    return out


def test_failure_dsns_carry_envid_orcpt_and_ret_full_or_hdrs(relay, world):
    _, sender_mx = world
    r = relay()
    orcpt = "ORCPT=rfc822;Gone+2Bapp@Example.test"
    for envid, ret in (("full+2B1", "RET=FULL"), ("hdrs+201", "RET=HDRS"), ("none", "")):
        dsn_mail("gone@example.test", f"{ret} ENVID={envid}", orcpt, r.port, ORIGINAL)
    dsns = by_envid(sender_mx.wait_for_messages(3, timeout=20))
    assert set(dsns) == {"full+1", "hdrs 1", "none"}
    for envid, returned_type in (
        ("full+1", "message/rfc822"),
        ("hdrs 1", "text/rfc822-headers"),
        ("none", "text/rfc822-headers"),
    ):
        msg = dsns[envid]
        _, (_, per_rcpt), returned = parts(msg.as_bytes())
        assert per_rcpt["Original-Recipient"] == "rfc822;Gone+app@Example.test"
        assert per_rcpt["Final-Recipient"] == "rfc822; gone@example.test"
        assert (per_rcpt["Action"], per_rcpt["Status"]) == ("failed", "5.1.1")
        assert returned.get_content_type() == returned_type, envid
        _, permanent = all_failures(msg)
        assert permanent  # flufl.bounce finds the permanent failure
    whole = dsns["full+1"].get_payload()[2].get_payload()[0]
    assert whole["Subject"] == "order 123" and "line one" in whole.get_payload()
    for name in ("bounced", "dsn_queued"):
        events = r.wait_event(name, n=3)
        assert {e["envid"] for e in events} == {"full+1", "hdrs 1", "none"}
    bounced = r.events("bounced")[0]
    assert bounced["orcpt"] == "rfc822;Gone+app@Example.test"
    assert r.events("dsn_queued")[0]["orcpt"] == ["rfc822;Gone+app@Example.test"]


def test_notify_success_gets_a_success_dsn_and_never_gets_none(relay, world):
    _, sender_mx = world
    r = relay()
    dsn_mail(
        "ok@example.test",
        "ENVID=ok-1",
        "NOTIFY=SUCCESS ORCPT=rfc822;ok@example.test",
        r.port,
        ORIGINAL,
    )
    dsn_mail("gone@example.test", "ENVID=never-1", "NOTIFY=NEVER", r.port, ORIGINAL)
    dsn_mail("ok@example.test", "ENVID=quiet-1", "NOTIFY=FAILURE", r.port, ORIGINAL)
    suppressed = r.wait_event("dsn_suppressed", envid="never-1")[0]
    assert suppressed["reason"] == "NOTIFY=NEVER" and suppressed["failed"] == ["gone@example.test"]
    r.wait_event("delivered", n=2)
    # a bounce that wants its DSN, last: once its DSN is in, any DSN owed before it is too
    dsn_mail("gone@example.test", "ENVID=last", "", r.port, ORIGINAL)
    sender_mx.wait_for(lambda: len(sender_mx.messages) >= 2, 20, "two DSNs")
    r.wait_event("dsn_queued", envid="last")
    dsns = by_envid(sender_mx.messages)
    assert set(dsns) == {"ok-1", "last"}, "NOTIFY=NEVER and NOTIFY=FAILURE give no DSN here"
    success = dsns["ok-1"]
    assert success["Subject"] == "Successful Mail Delivery Report"
    _, (_, per_rcpt), returned = parts(success.as_bytes())
    assert (per_rcpt["Action"], per_rcpt["Status"]) == ("delivered", "2.0.0")
    assert per_rcpt["Original-Recipient"] == "rfc822;ok@example.test"
    assert returned.get_content_type() == "text/rfc822-headers"
    assert scan_message(success) == set()
    delivered = r.wait_event("delivered", envid="ok-1")[0]
    assert delivered["orcpt"] == "rfc822;ok@example.test"
    queued = r.wait_event("dsn_queued", envid="ok-1")[0]
    assert queued["kind"] == "delivered" and queued["delivered"] == ["ok@example.test"]
    assert "orcpt" not in r.wait_event("delivered", envid="quiet-1")[0]
    with sqlite3.connect(r.spool) as db:  # the originals left the spool, receipts reported
        assert db.execute("SELECT count(*) FROM recipients WHERE notify != 0").fetchone() == (0,)


def test_bad_dsn_parameters_over_smtp_get_their_codes_and_queue_nothing(relay, world):
    r = relay()
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.has_extn("dsn")
        for command, words in (
            ("MAIL FROM:<app@sender.test> RET=SOME", b"RET parameter"),
            ("MAIL FROM:<app@sender.test> ENVID=a+0Db", b"ENVID parameter: not printable"),
            ("MAIL FROM:<app@sender.test> ENVID=" + "e" * 101, b"ENVID parameter too long"),
            ("MAIL FROM:<app@sender.test> RET=FULL RET=HDRS", b"Duplicate RET"),
        ):
            code, text = client.docmd(command)
            assert (code, text[:6]) == (501, b"5.5.4 ") and words in text, (command, text)
        assert client.docmd("MAIL FROM:<app@sender.test> RET=FULL ENVID=ok")[0] == 250
        for command, words in (
            ("RCPT TO:<a@example.test> NOTIFY=NEVER,DELAY", b"NEVER cannot be combined"),
            ("RCPT TO:<a@example.test> NOTIFY=SOON", b"NOTIFY parameter"),
            ("RCPT TO:<a@example.test> ORCPT=a@example.test", b"ORCPT parameter"),
        ):
            code, text = client.docmd(command)
            assert (code, text[:6]) == (501, b"5.5.4 ") and words in text, (command, text)
        code, text = client.docmd("DATA")
        assert code == 503  # no recipient was accepted
        assert client.docmd("QUIT")[0] == 221
    with sqlite3.connect(r.spool) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (0,)


def test_metadata_header_goes_into_events_and_not_into_the_delivered_mail(relay, world):
    dest, _ = world
    r = relay()
    text = b'X-Relayd-Meta: {"order": "123"}\r\n' + ORIGINAL
    reply = dsn_mail("ok@example.test", "ENVID=m1", "", r.port, text)
    queue_id = reply.rsplit(" ", 1)[1]
    delivered = dest.wait_for_messages(1)[0]
    assert b"X-Relayd-Meta" not in delivered.data and b"Subject: order 123" in delivered.data
    for name in ("accepted", "delivered"):
        event = r.wait_event(name, queue_id=queue_id)[0]
        assert event["meta"] == {"order": "123"} and event["envid"] == "m1"
    with sqlite3.connect(r.spool) as db:
        row = db.execute("SELECT type, data FROM events WHERE type = 'delivered'").fetchone()
    assert json.loads(row[1])["meta"] == {"order": "123"}  # where the webhooks read it
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("app@sender.test")
        client.rcpt("ok@example.test")
        code, text = client.data(b"X-Relayd-Meta: order=123\r\n" + ORIGINAL)
    assert (code, text) == (550, b"5.6.0 Bad X-Relayd-Meta header: not JSON")
    assert len(r.events("accepted")) == 1  # nothing queued for it


def test_keep_metadata_headers_delivers_them(relay, world):
    dest, _ = world
    r = relay({"ingress": {"metadata_headers": ["X-App-*"], "keep_metadata_headers": True}})
    dsn_mail("ok@example.test", "", "", r.port, b"X-App-Order: 7\r\n" + ORIGINAL)
    assert b"X-App-Order: 7\r\n" in dest.wait_for_messages(1)[0].data
    assert r.wait_event("delivered")[0]["meta"] == {"Order": "7"}


def test_relayctl_show_gives_the_dsn_parameters_the_message_came_with(relay, world):
    dest, _ = world
    dest.rcpt_replies["later@example.test"] = "451 4.3.0 try later"
    r = relay()
    params = "NOTIFY=FAILURE,DELAY ORCPT=rfc822;Later+2Bapp@Example.test"
    qid = dsn_mail("later@example.test", "RET=HDRS ENVID=order+2B7", params, r.port, ORIGINAL)
    qid = qid.rsplit(" ", 1)[1]
    r.wait_event("deferred", queue_id=qid)
    shown = json.loads(r.ctl("--json", "show", qid).stdout)
    assert (shown["envid"], shown["ret"]) == ("order+7", "HDRS")
    (rcpt,) = shown["recipients"]
    assert (rcpt["notify"], rcpt["orcpt"]) == ("FAILURE,DELAY", "rfc822;Later+app@Example.test")
    text = r.ctl("show", qid).stdout.splitlines()
    assert next(x for x in text if x.startswith("envid:")).split() == ["envid:", "order+7"]
    assert next(x for x in text if x.startswith("ret:")).split() == ["ret:", "HDRS"]
    head = next(x for x in text if x.startswith("RECIPIENT"))
    assert head.split()[-2:] == ["NOTIFY", "ORCPT"]
    row = next(x for x in text if x.startswith("later@example.test"))
    assert row.split()[-2:] == ["FAILURE,DELAY", "rfc822;Later+app@Example.test"]
