"""SMTP ingress policy: every bad input gets its precise reply and leaves the spool untouched."""

from __future__ import annotations

import smtplib
import socket
import sqlite3

import pytest
from support.util import mx_zone, send


def spooled(relay_process) -> int:
    with sqlite3.connect(relay_process.spool) as db:
        return db.execute("SELECT count(*) FROM messages").fetchone()[0]


@pytest.fixture
def parked(relay, dns_server, fake_mx):
    """relayd whose MX defers everything, so accepted mail stays visible in the spool."""
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    fake_mx("127.0.0.10", rcpt_reply="451 4.3.0 later")
    return relay({"ingress": {"max_recipients": 3, "max_message_size": 2000, "max_errors": 4}})


def test_ehlo_advertises_extensions(parked):
    with smtplib.SMTP("127.0.0.1", parked.port) as client:
        code, _ = client.ehlo("client.test")
        assert code == 250
        for ext in ("pipelining", "8bitmime", "smtputf8", "enhancedstatuscodes"):
            assert client.has_extn(ext), ext
        assert client.esmtp_features["size"] == "2000"


def test_untrusted_client_cannot_relay(parked):
    with smtplib.SMTP("127.0.0.1", parked.port, source_address=("127.0.0.5", 0)) as client:
        client.ehlo("outsider.test")
        assert client.mail("a@sender.test")[0] == 250
        code, text = client.rcpt("x@example.test")
        assert (code, text[:5]) == (554, b"5.7.1")
        code, _ = client.docmd("DATA")
        assert code == 503
    assert spooled(parked) == 0


@pytest.mark.parametrize(
    ("command", "code", "enhanced"),
    [
        ("MAIL FROM:<no-at-sign>", 501, b"5.1.3"),
        ("MAIL FROM:<a@@b.test>", 501, b"5.1.3"),
        ("RCPT TO:<user@>", 501, b"5.1.3"),
        ("RCPT TO:<@example.test>", 501, b"5.1.3"),
        ("RCPT TO:<a@-bad-.test>", 501, b"5.1.3"),
        ("RCPT TO:<a@[999.0.0.1]>", 501, b"5.1.3"),  # literals that name no address
        ("RCPT TO:<a@[::1]>", 501, b"5.1.3"),
        ("RCPT TO:<a@[IPv6:1.2.3.4]>", 501, b"5.1.3"),
        # quoted local parts: RFC 5321 syntax only, never one the email package makes up
        ('RCPT TO:<"a b".c@example.test>', 501, b"5.1.3"),
        ("RCPT TO:<john doe@example.test>", 501, b"5.1.3"),
        ('RCPT TO:<"unterminated@example.test>', 501, b"5.1.3"),
        ('RCPT TO:<"a"b"@example.test>', 501, b"5.1.3"),
        ('RCPT TO:<"tab\there"@example.test>', 501, b"5.1.3"),
        ('RCPT TO:<"' + "x" * 63 + '"@example.test>', 501, b"5.1.3"),
    ],
)
def test_bad_addresses_get_501_513(parked, command, code, enhanced):
    with smtplib.SMTP("127.0.0.1", parked.port) as client:
        client.ehlo("client.test")
        if command.startswith("RCPT"):
            client.mail("a@sender.test")
        got, text = client.docmd(command)
    assert (got, text[:5]) == (code, enhanced)
    assert spooled(parked) == 0


def test_oversize_declared_in_mail_gets_552_534(parked):
    with smtplib.SMTP("127.0.0.1", parked.port) as client:
        client.ehlo("client.test")
        code, text = client.docmd("MAIL FROM:<a@sender.test> SIZE=5000")
    assert (code, text[:5]) == (552, b"5.3.4")


def test_oversize_data_gets_552_534_and_nothing_spooled(parked):
    with smtplib.SMTP("127.0.0.1", parked.port) as client:
        client.ehlo("client.test")
        client.mail("a@sender.test")
        client.rcpt("x@example.test")
        code, text = client.data(b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 50)
    assert (code, text[:5]) == (552, b"5.3.4")
    assert spooled(parked) == 0


def test_too_many_recipients_gets_452_453(parked):
    with smtplib.SMTP("127.0.0.1", parked.port) as client:
        client.ehlo("client.test")
        client.mail("a@sender.test")
        for i in range(3):
            assert client.rcpt(f"r{i}@example.test")[0] == 250
        code, text = client.rcpt("r3@example.test")
        assert (code, text[:5]) == (452, b"4.5.3")
        assert client.data(b"Subject: x\r\n\r\nbody\r\n")[0] == 250
    assert spooled(parked) == 1


def test_unknown_command_and_syntax_errors(parked):
    with smtplib.SMTP("127.0.0.1", parked.port) as client:
        client.ehlo("client.test")
        code, text = client.docmd("FROB")
        assert code == 500 and text.startswith(b"5.5.")
        code, text = client.docmd("MAIL", "TO:<x@y.test>")
        assert code == 501 and text.startswith(b"5.5.4")
        code, text = client.docmd("RCPT TO:<x@example.test>")
        assert code == 503 and text.startswith(b"5.5.1")


def test_repeated_errors_disconnect(parked):
    with socket.create_connection(("127.0.0.1", parked.port), timeout=5) as sock:
        stream = sock.makefile("rb")
        stream.readline()
        for _ in range(4):
            sock.sendall(b"FROB\r\n")
            assert stream.readline().startswith(b"500")
        assert stream.readline().startswith(b"421 4.7.0")
        assert stream.readline() == b""  # closed by relayd


def test_null_sender_accepted(parked):
    with smtplib.SMTP("127.0.0.1", parked.port) as client:
        client.ehlo("client.test")
        assert client.docmd("MAIL FROM:<>")[0] == 250
        assert client.rcpt("x@example.test")[0] == 250
        assert client.data(b"Subject: x\r\n\r\nbody\r\n")[0] == 250
    assert spooled(parked) == 1


def test_reply_to_data_carries_queue_id_of_spooled_message(parked):
    reply = send(parked.port, ["x@example.test"])
    queue_id = reply.rsplit(" ", 1)[1]
    assert reply.startswith("2.0.0")
    with sqlite3.connect(parked.spool) as db:
        assert db.execute("SELECT count(*) FROM messages WHERE queue_id=?", (queue_id,)).fetchone()
    accepted = parked.wait_event("accepted", queue_id=queue_id)[0]
    assert accepted["sender"] == "app@sender.test" and accepted["rcpt"] == ["x@example.test"]


def test_smtputf8_address_accepted_with_smtputf8(parked):
    with smtplib.SMTP("127.0.0.1", parked.port) as client:
        client.command_encoding = "utf-8"
        client.ehlo("client.test")
        code, _ = client.docmd("MAIL FROM:<ünï@sender.test> SMTPUTF8")
        assert code == 250
        assert client.docmd("RCPT TO:<jöhn@example.test>")[0] == 250
    with smtplib.SMTP("127.0.0.1", parked.port) as client:
        client.command_encoding = "utf-8"
        client.ehlo("client.test")
        code, text = client.docmd("MAIL FROM:<ünï@sender.test>")
        assert (code, text[:5]) == (501, b"5.1.3")


def test_large_dot_stuffed_message_arrives_byte_for_byte(relay, dns_server, fake_mx):
    """Text is read in blocks that end at ".CRLF" (and at 256 KiB without one): lines that end
    in a dot, start with one or are only dots, across several blocks, arrive unchanged."""
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10")
    r = relay()
    body = [b"Subject: big", b""] + [b"x" * 900] * 350  # over 256 KiB without a ".CRLF"
    for i in range(1200):
        body += [b"x" * 900, f"line {i} ends with a dot.".encode(), b".", b"..", b".leading"]
    text = b"".join(line + b"\r\n" for line in body)
    assert len(text) > 3 * 256 * 1024
    with smtplib.SMTP("127.0.0.1", r.port) as client:
        client.sendmail("a@sender.test", ["x@example.test"], text)  # smtplib dot-stuffs
    assert mx.wait_for_messages(1)[0].data.endswith(text)


def test_quoted_local_parts_accepted_and_delivered_as_sent(relay, dns_server, fake_mx):
    """RFC 5321 4.1.2 Quoted-string local parts (spaces, quoted pairs, an "@") are accepted at
    MAIL and RCPT and reach the MX exactly as the client wrote them, quotes and all."""
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10")
    r = relay()
    sender = '"john doe"@sender.test'
    rcpts = [
        '"jane q. public"@example.test',
        '"a\\"b\\\\c"@example.test',
        '"x@y"@example.test',
        '"plain"@example.test',
        '"' + "x" * 62 + '"@example.test',
    ]
    with smtplib.SMTP("127.0.0.1", r.port) as client:
        client.ehlo("client.test")
        code, text = client.docmd(f"MAIL FROM:<{sender}> SIZE=100")
        assert (code, text[:5]) == (250, b"2.1.0"), text
        for rcpt in rcpts:
            code, text = client.docmd(f"RCPT TO:<{rcpt}>")
            assert (code, text[:5]) == (250, b"2.1.5"), (rcpt, text)
        code, text = client.data(b"Subject: quoted\r\n\r\nbody\r\n")
        assert code == 250, text
    got = mx.wait_for_messages(1)[0]
    assert got.mail_from == sender
    assert sorted(got.rcpts) == sorted(rcpts)
