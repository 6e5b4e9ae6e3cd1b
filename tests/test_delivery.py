"""End-to-end delivery through relayd: DNS answers and MX behaviour decide each outcome."""

from __future__ import annotations

import email
import json
import smtplib
import ssl
import subprocess

import pytest
from support.fakemx import self_signed_tls_context
from support.util import mx_zone, seed_deferred_backlog, send, wait_until

from relayd.delivery.dns import address_literal


def test_delivers_with_received_message_id_and_date(relay, dns_server, fake_mx):
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10")
    r = relay()
    reply = send(r.port, ["bob@example.test"])
    queue_id = reply.rsplit(" ", 1)[1]
    got = mx.wait_for_messages(1)[0]
    assert got.rcpts == ["bob@example.test"] and got.mail_from == "app@sender.test"
    parsed = email.message_from_bytes(got.data)
    assert f"id {queue_id}" in parsed["Received"]
    assert parsed["Message-ID"] and parsed["Date"]
    event = r.wait_event("delivered", queue_id=queue_id)[0]
    for key in ("sender", "rcpt", "domain", "mx", "source_ip", "code", "response", "attempt"):
        assert key in event
    assert event["code"] == 250 and event["mx"].startswith("mx1.example.test[127.0.0.10]")


def test_primary_mx_down_goes_to_secondary(relay, dns_server, fake_mx):
    mx_zone(
        dns_server,
        "example.test",
        (10, "mx1.example.test", "127.0.0.11"),  # nothing listens there
        (20, "mx2.example.test", "127.0.0.12"),
    )
    secondary = fake_mx("127.0.0.12")
    r = relay()
    send(r.port, ["bob@example.test"])
    assert secondary.wait_for_messages(1)[0].rcpts == ["bob@example.test"]
    assert r.wait_event("delivered")[0]["mx"].startswith("mx2.example.test")


def test_primary_mx_greets_with_4xx_goes_to_secondary(relay, dns_server, fake_mx):
    mx_zone(
        dns_server,
        "example.test",
        (10, "mx1.example.test", "127.0.0.10"),
        (20, "mx2.example.test", "127.0.0.12"),
    )
    primary = fake_mx("127.0.0.10", on_connect="421 4.3.2 busy")
    secondary = fake_mx("127.0.0.12")
    r = relay()
    send(r.port, ["bob@example.test"])
    secondary.wait_for_messages(1)
    assert primary.messages == []


def test_4xx_then_success_on_retry(relay, dns_server, fake_mx):
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10")
    mx.data_replies.append("451 4.7.1 greylisted, try later")
    r = relay()
    send(r.port, ["bob@example.test"])
    deferred = r.wait_event("deferred")[0]
    assert deferred["code"] == 451 and "greylisted" in deferred["response"]
    mx.wait_for_messages(1, timeout=15)
    delivered = r.wait_event("delivered")[0]
    assert delivered["attempt"] == 2


def test_5xx_bounces_with_dsn_to_sender(relay, dns_server, fake_mx):
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx_zone(dns_server, "sender.test", (10, "mx.sender.test", "127.0.0.20"))
    mx = fake_mx("127.0.0.10", rcpt_replies={"gone@example.test": "550 5.1.1 no such user"})
    sender_mx = fake_mx("127.0.0.20")
    r = relay()
    reply = send(r.port, ["gone@example.test", "ok@example.test"])
    queue_id = reply.rsplit(" ", 1)[1]
    assert mx.wait_for_messages(1)[0].rcpts == ["ok@example.test"]
    dsn = sender_mx.wait_for_messages(1)[0]
    assert dsn.mail_from == "" and dsn.rcpts == ["app@sender.test"]
    report = email.message_from_bytes(dsn.data)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    fields = [dict(block.items()) for block in status.get_payload()]
    per_rcpt = [f for f in fields if "Final-Recipient" in f]
    assert len(per_rcpt) == 1
    assert per_rcpt[0]["Final-Recipient"] == "rfc822; gone@example.test"
    assert per_rcpt[0]["Action"] == "failed" and per_rcpt[0]["Status"] == "5.1.1"
    assert "no such user" in per_rcpt[0]["Diagnostic-Code"]
    headers = next(p for p in report.walk() if p.get_content_type() == "text/rfc822-headers")
    assert queue_id in headers.get_payload()


def test_no_bounce_for_a_bounce(relay, dns_server, fake_mx):
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    fake_mx("127.0.0.10", rcpt_reply="550 5.1.1 no such user")
    r = relay()
    with smtplib.SMTP("127.0.0.1", r.port) as client:
        client.sendmail("<>", ["gone@example.test"], b"Subject: dsn\r\n\r\nbody\r\n")
    r.wait_event("bounced")
    r.wait_event("dsn_suppressed")
    assert r.events("dsn_queued") == []


def test_null_mx_bounces_without_attempt(relay, dns_server, fake_mx):
    dns_server.add("nullmx.test", "MX", "0 .")
    r = relay()
    send(r.port, ["x@nullmx.test"])
    event = r.wait_event("bounced", rcpt="x@nullmx.test")[0]
    assert event["code"] == 556 and "5.1.10" in event["response"]
    assert event["attempt"] == 1


def test_nxdomain_bounces_without_retry(relay, dns_server):
    r = relay()
    send(r.port, ["x@nowhere.test"])
    event = r.wait_event("bounced", rcpt="x@nowhere.test")[0]
    assert event["code"] == 550 and "5.1.2" in event["response"]


def test_servfail_defers_not_bounces(relay, dns_server, fake_mx):
    dns_server.add("flaky.test", "MX", "10 mx.flaky.test")
    dns_server.add("mx.flaky.test", "A", "127.0.0.10")
    dns_server.set_servfail("flaky.test")
    mx = fake_mx("127.0.0.10")
    r = relay()
    send(r.port, ["x@flaky.test"])
    event = r.wait_event("deferred", rcpt="x@flaky.test")[0]
    assert event["code"] == 451 and "4.4.3" in event["response"]
    assert r.events("bounced") == []
    dns_server.clear("flaky.test")
    assert mx.wait_for_messages(1, timeout=20)[0].rcpts == ["x@flaky.test"]


def test_dns_timeout_defers(relay, dns_server):
    dns_server.add("slow.test", "MX", "10 mx.slow.test")
    dns_server.set_timeout("slow.test")
    r = relay({"dns": {"timeout": "1s"}})
    send(r.port, ["x@slow.test"])
    event = r.wait_event("deferred", rcpt="x@slow.test")[0]
    assert "4.4.3" in event["response"]


def test_no_mx_but_a_record_delivers_to_domain(relay, dns_server, fake_mx):
    dns_server.add("plain.test", "A", "127.0.0.10")
    mx = fake_mx("127.0.0.10")
    r = relay()
    send(r.port, ["x@plain.test"])
    assert mx.wait_for_messages(1)[0].rcpts == ["x@plain.test"]


def test_expired_message_bounces_with_447(relay, dns_server, fake_mx):
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx_zone(dns_server, "sender.test", (10, "mx.sender.test", "127.0.0.20"))
    fake_mx("127.0.0.10", rcpt_reply="451 4.3.0 try later")
    sender_mx = fake_mx("127.0.0.20")
    r = relay({"retry": {"max_age": "2s", "first": "0.5s"}})
    send(r.port, ["late@example.test"])
    event = r.wait_event("expired", rcpt="late@example.test", timeout=20)[0]
    assert "4.4.7" in event["response"] and "try later" in event["response"]
    dsn = email.message_from_bytes(sender_mx.wait_for_messages(1)[0].data)
    status = next(p for p in dsn.walk() if p.get_content_type() == "message/delivery-status")
    assert "Status: 4.4.7" in status.as_string()


def test_delay_warning_sent_once(relay, dns_server, fake_mx):
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx_zone(dns_server, "sender.test", (10, "mx.sender.test", "127.0.0.20"))
    fake_mx("127.0.0.10", rcpt_reply="451 4.3.0 try later")
    sender_mx = fake_mx("127.0.0.20")
    r = relay({"retry": {"delay_warning": "1s", "first": "0.5s", "max_interval": "0.5s"}})
    send(r.port, ["slow@example.test"])
    warning = email.message_from_bytes(sender_mx.wait_for_messages(1, timeout=20)[0].data)
    assert "Delayed" in warning["Subject"]
    r.wait_event("deferred", n=4, rcpt="slow@example.test", timeout=20)
    assert len(sender_mx.messages) == 1


def test_one_transaction_per_domain_carries_all_its_recipients(relay, dns_server, fake_mx):
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx_zone(dns_server, "other.test", (10, "mx.other.test", "127.0.0.11"))
    mx1, mx2 = fake_mx("127.0.0.10"), fake_mx("127.0.0.11")
    r = relay()
    send(r.port, ["a@example.test", "b@example.test", "c@other.test"])
    assert sorted(mx1.wait_for_messages(1)[0].rcpts) == ["a@example.test", "b@example.test"]
    assert mx2.wait_for_messages(1)[0].rcpts == ["c@other.test"]
    assert len(mx1.messages) == 1


@pytest.mark.parametrize("reply", ["drop", "stall"])
def test_connection_lost_or_stalled_defers(relay, dns_server, fake_mx, reply):
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10")
    mx.data_replies.append(reply)
    r = relay({"delivery": {"command_timeout": "1s"}})
    send(r.port, ["x@example.test"])
    event = r.wait_event("deferred", rcpt="x@example.test")[0]
    assert event["code"] == 421 and "4.4.2" in event["response"]
    wait_until(lambda: mx.messages, 20, "redelivery after the failed attempt")


@pytest.mark.parametrize(
    ("rcpt", "ip"),
    [("bob@[IPv6:::1]", "::1"), ("bob@[ipv6:0::1]", "::1"), ("bob@[127.0.0.13]", "127.0.0.13")],
)
def test_address_literal_delivered_to_its_address_whatever_the_tag_case(relay, fake_mx, rcpt, ip):
    """Domains are lower-cased before routing, so the IPv6 tag must match in any case. (Not
    127.0.0.1 for the IPv4 case: clients' ports there may take the fake MX's port.)"""
    mx = fake_mx(ip)
    r = relay()
    send(r.port, [rcpt])
    assert [a.lower() for a in mx.wait_for_messages(1)[0].rcpts] == [rcpt.lower()]
    assert r.wait_event("delivered")[0]["mx"].startswith(f"{ip}[{ip}]:")


@pytest.mark.parametrize(
    ("domain", "ip"),
    [
        ("[192.0.2.1]", "192.0.2.1"),
        ("[IPv6:2001:DB8::1]", "2001:db8::1"),
        ("[ipv6:2001:db8:0:0:0:0:0:1]", "2001:db8::1"),
        ("[IPV6:::ffff:192.0.2.1]", "::ffff:c000:201"),
        ("example.test", None),
        ("[999.0.0.1]", None),
        ("[192.0.2]", None),
        ("[::1]", None),
        ("[IPv6:192.0.2.1]", None),
        ("[IPv6:fe80::1%eth0]", None),
        ("[x-tag:abc]", None),
        ("[192.0.2.1", None),
    ],
)
def test_address_literal_parsing(domain, ip):
    assert address_literal(domain) == ip


def test_mx_that_never_greets_is_given_up_after_connect_timeout(relay, dns_server, fake_mx):
    """The greeting is waited for connect_timeout (1 s here), not command_timeout (300 s)."""
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10", on_connect="stall")
    r = relay({"delivery": {"connect_timeout": "1s", "command_timeout": "300s"}})
    send(r.port, ["x@example.test"])
    event = r.wait_event("deferred", rcpt="x@example.test", timeout=20)[0]
    assert event["code"] == 421 and "no greeting within connect_timeout 1s" in event["response"]
    assert mx.connections and mx.messages == []


def test_mx_that_never_greets_falls_back_to_the_next_mx(relay, dns_server, fake_mx):
    mx_zone(
        dns_server,
        "example.test",
        (10, "mx1.example.test", "127.0.0.10"),
        (20, "mx2.example.test", "127.0.0.12"),
    )
    primary = fake_mx("127.0.0.10", on_connect="stall")
    secondary = fake_mx("127.0.0.12")
    r = relay({"delivery": {"connect_timeout": "1s", "command_timeout": "300s"}})
    send(r.port, ["x@example.test"])
    assert secondary.wait_for_messages(1, timeout=20)[0].rcpts == ["x@example.test"]
    assert r.wait_event("delivered")[0]["mx"].startswith("mx2.example.test")
    assert len(primary.connections) == 1 and primary.messages == []


def test_swaks_submission_to_two_domains(relay, dns_server, fake_mx):
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx_zone(dns_server, "other.test", (10, "mx.other.test", "127.0.0.11"))
    mx1, mx2 = fake_mx("127.0.0.10"), fake_mx("127.0.0.11")
    r = relay()
    result = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{r.port}",
            "--from",
            "app@sender.test",
            "--to",
            "a@example.test,b@other.test",
            "--header",
            "Subject: via swaks",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Ok: queued as" in result.stdout
    assert b"Subject: via swaks" in mx1.wait_for_messages(1)[0].data
    assert mx2.wait_for_messages(1)[0].rcpts == ["b@other.test"]


def test_equal_preference_mx_hosts_share_the_mail(relay, dns_server, fake_mx):
    mx_zone(
        dns_server,
        "example.test",
        (10, "mx1.example.test", "127.0.0.10"),
        (10, "mx2.example.test", "127.0.0.11"),
    )
    mx1, mx2 = fake_mx("127.0.0.10"), fake_mx("127.0.0.11")
    r = relay({"shaping": {"default": {"max_messages_per_connection": 1}}})
    for i in range(20):
        send(r.port, [f"r{i}@example.test"])
    wait_until(lambda: len(mx1.messages) + len(mx2.messages) == 20, 30, "20 deliveries")
    assert mx1.messages and mx2.messages


def test_mx_answers_cached_for_their_ttl(relay, dns_server, fake_mx):
    dns_server.add("example.test", "MX", "10 mx1.example.test", ttl=300)
    dns_server.add("mx1.example.test", "A", "127.0.0.10", ttl=300)
    mx = fake_mx("127.0.0.10")
    r = relay()
    for i in range(5):
        send(r.port, [f"r{i}@example.test"])
        mx.wait_for_messages(i + 1)
    assert dns_server.queries.count(("example.test", "MX")) == 1


def test_opportunistic_starttls(relay, dns_server, fake_mx, tmp_path):
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    context, _ = self_signed_tls_context(tmp_path, "mx1.example.test")
    mx = fake_mx("127.0.0.10", tls_context=context)
    r = relay()
    send(r.port, ["x@example.test"])
    assert mx.wait_for_messages(1)[0].tls is True


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_failed_starttls_falls_back_to_plain_text(relay, dns_server, fake_mx, tmp_path):
    """Opportunistic TLS, as Postfix's "may": a handshake that fails is retried without TLS."""
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    context, _ = self_signed_tls_context(tmp_path, "mx1.example.test")
    context.maximum_version = ssl.TLSVersion.TLSv1_1  # no client of ours will agree to that
    mx = fake_mx("127.0.0.10", tls_context=context)
    r = relay()
    send(r.port, ["x@example.test"])
    got = mx.wait_for_messages(1)[0]
    assert got.tls is False
    assert r.wait_event("delivered")[0]["code"] == 250


def test_smtputf8_message_delivered_over_tls_with_smtputf8(relay, dns_server, fake_mx, tmp_path):
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    context, _ = self_signed_tls_context(tmp_path, "mx1.example.test")
    mx = fake_mx("127.0.0.10", tls_context=context)
    r = relay()
    with smtplib.SMTP("127.0.0.1", r.port) as client:
        client.ehlo("client.test")
        client.sendmail(
            "jöhn@sender.test",
            ["x@example.test"],
            "Subject: ü\r\n\r\nbody\r\n".encode(),
            mail_options=["SMTPUTF8"],
        )
    got = mx.wait_for_messages(1)[0]
    assert got.tls and got.mail_from == "jöhn@sender.test" and "SMTPUTF8" in got.mail_options


@pytest.mark.parametrize("pipelining", [True, False])
def test_each_recipient_judged_by_its_own_reply_with_and_without_pipelining(
    relay, dns_server, fake_mx, pipelining
):
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    refusals = {"bad@example.test": "550 5.1.1 no such user", "busy@example.test": "450 4.2.1 busy"}
    mx = fake_mx("127.0.0.10", rcpt_replies=refusals, pipelining=pipelining)
    r = relay()
    send(r.port, ["ok@example.test", "bad@example.test", "busy@example.test"])
    assert mx.wait_for_messages(1)[0].rcpts == ["ok@example.test"]
    assert r.wait_event("delivered", rcpt="ok@example.test")[0]["code"] == 250
    bounced = r.wait_event("bounced", rcpt="bad@example.test")[0]
    assert bounced["code"] == 550 and "no such user" in bounced["response"]
    deferred = r.wait_event("deferred", rcpt="busy@example.test")[0]
    assert deferred["code"] == 450 and "busy" in deferred["response"]
    sent_ahead = {c.split(":")[0] for c in mx.connections[0].pipelined}
    assert sent_ahead == ({"MAIL FROM", "RCPT TO"} if pipelining else set())


def test_transaction_with_every_recipient_refused_leaves_the_connection_usable(
    relay, dns_server, fake_mx
):
    """Pipelined DATA is then refused (554); RSET, and the next message goes on the same
    connection."""
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10", rcpt_replies={"gone@example.test": "550 5.1.1 gone"})
    r = relay({"delivery": {"idle_connection_time": "5s"}})
    send(r.port, ["gone@example.test"])
    r.wait_event("bounced", rcpt="gone@example.test")
    send(r.port, ["here@example.test"])
    assert mx.wait_for_messages(1)[0].rcpts == ["here@example.test"]
    assert len(mx.connections) == 1
    assert "RSET" in mx.connections[0].commands


def test_refused_sender_defers_every_recipient_with_the_servers_reply(relay, dns_server, fake_mx):
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    fake_mx("127.0.0.10", mail_reply="451 4.7.1 sender greylisted")
    r = relay()
    send(r.port, ["a@example.test", "b@example.test"])
    for rcpt in ("a@example.test", "b@example.test"):
        event = r.wait_event("deferred", rcpt=rcpt)[0]
        assert event["code"] == 451 and "greylisted" in event["response"]


def test_message_stays_spooled_while_a_recipient_at_another_domain_waits(
    relay, dns_server, fake_mx
):
    """Delivering every recipient of one domain removes the message only when it has no
    other recipients left."""
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx_zone(dns_server, "other.test", (10, "mx.other.test", "127.0.0.11"))
    fake_mx("127.0.0.10")
    fake_mx("127.0.0.11", rcpt_reply="451 4.3.0 later")
    r = relay({"retry": {"first": "1h"}})
    qid = send(r.port, ["a@example.test", "b@other.test"]).rsplit(" ", 1)[1]
    r.wait_event("delivered", rcpt="a@example.test")
    r.wait_event("deferred", rcpt="b@other.test")
    shown = json.loads(r.ctl("show", qid, "--json").stdout)
    states = {x["rcpt"]: x["state"] for x in shown["recipients"]}
    assert states == {"a@example.test": "delivered", "b@other.test": "deferred"}


def test_a_backlog_goes_out_with_one_round_trip_a_message(relay, dns_server, fake_mx):
    """With PIPELINING, the next message's MAIL, RCPT and DATA go in the write that ends the
    text before it (RFC 2920 3.1: message content may open a group): a reused connection pays
    one round trip a message instead of two. Each message still arrives once, whole."""
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10", accept_delay=0.05)  # a backlog builds behind the first
    r = relay({"shaping": {"default": {"max_connections": 1}}}, start=False)
    seed_deferred_backlog(r.spool, 12, "example.test")  # read from the spool, not in memory
    r.start()
    got = mx.wait_for_messages(12, timeout=30)
    assert sorted(m.rcpts[0] for m in got) == sorted(f"r{i}@example.test" for i in range(12))
    assert all(m.data.endswith(b"body\r\n") for m in got)
    assert len(mx.connections) == 1 and mx.connections[0].ahead >= 8
    wait_until(lambda: len(r.events("delivered")) == 12, 10, "12 delivered events")


def test_a_message_sent_ahead_on_a_connection_that_drops_is_deferred_not_lost(
    relay, dns_server, fake_mx
):
    """The envelope of the next message is on the wire when the server hangs up after the
    text before it: that next message is deferred (and delivered later), never forgotten."""
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10", accept_delay=0.05)
    mx.data_replies.append("drop")  # hangs up instead of answering the first text
    r = relay(
        {
            "shaping": {"default": {"max_connections": 1}},
            "retry": {"first": "0.5s", "max_interval": "0.5s"},
        },
        start=False,
    )
    seed_deferred_backlog(r.spool, 4, "example.test")
    r.start()
    got = mx.wait_for_messages(4, timeout=30)
    assert sorted(m.rcpts[0] for m in got) == sorted(f"r{i}@example.test" for i in range(4))
    assert mx.connections[0].ahead == 1  # the second message's envelope was on the wire
    deferred = r.wait_event("deferred", n=2)
    assert all(e["code"] == 421 and "lost connection" in e["response"] for e in deferred)
