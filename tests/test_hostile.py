"""Hostile clients: SMTP smuggling, STARTTLS command injection, resource limits, open relay.

Each test speaks raw bytes over a real socket (support.raw.RawSMTP) so that what is sent is
exactly what a broken or malicious client would send, and checks the exact reply, what reached
the spool and what a downstream server received.
"""

from __future__ import annotations

import re
import select
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.raw import RawSMTP, Reply
from support.util import mx_zone, wait_until

ROOT = Path(__file__).resolve().parent.parent
CLIENT = "127.0.0.5"  # a client address apart from the relay fixture's start-up probe
ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")


def spooled(relay_process) -> int:
    with sqlite3.connect(relay_process.spool) as db:
        return db.execute("SELECT count(*) FROM messages").fetchone()[0]


def queue_id(reply: Reply) -> str:
    m = re.fullmatch(r"250 2\.0\.0 .*queued as (\S+)", reply.line)
    assert m, f"expected '250 2.0.0 ... queued as ID', got {reply}"
    return m[1]


def no_bare_newlines(data: bytes) -> bool:
    return data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")


def session(relay_process, source: str | None = None, timeout: float = 5.0) -> RawSMTP:
    client = RawSMTP(relay_process.port, source=source, timeout=timeout)
    greeting = client.reply()
    assert greeting.code == 220, greeting
    return client


def open_transaction(client: RawSMTP, rcpt: str = "rcpt@example.test") -> None:
    """EHLO, MAIL, RCPT and DATA, each answered as a trusted client expects."""
    assert client.cmd("EHLO client.test").code == 250
    assert client.cmd("MAIL FROM:<app@sender.test>").line.startswith("250 2.1.0")
    assert client.cmd(f"RCPT TO:<{rcpt}>").line.startswith("250 2.1.5")
    assert client.cmd("DATA").code == 354


def hold(port: int, *sources: str, timeout: float = 10) -> list[RawSMTP]:
    """One connection from each source address, all greeted with 220, held open.

    Retried (all together, so that none has been idle for long) while a slot is still taken by
    a connection that closed and has not been released yet.
    """

    def attempt() -> list[RawSMTP] | None:
        held: list[RawSMTP] = []
        for source in sources:
            client = RawSMTP(port, source=source)
            held.append(client)
            if client.reply().code != 220:
                for c in held:
                    c.close()
                return None
        return held

    return wait_until(attempt, timeout, f"connections from {sources} greeted with 220")


def refused(port: int, source: str = "127.0.0.1") -> None:
    with RawSMTP(port, source=source) as client:
        reply = client.reply()
        assert reply.line.startswith("421 4.7.0"), reply
        assert client.read_until_eof() == b""


def greeted(port: int, source: str = "127.0.0.1") -> bool:
    with RawSMTP(port, source=source) as client:
        return client.reply().code == 220


@pytest.fixture
def parked(relay, dns_server, fake_mx):
    """relayd (with extra config) whose MX defers everything, so accepted mail stays spooled."""

    def make(extra: dict | None = None):
        mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
        fake_mx("127.0.0.10", rcpt_reply="451 4.3.0 later")
        return relay(extra)

    return make


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [sys.executable, "-m", "relayd.ctl", "tls", "self-signed", "relay.test", "--out-dir", out],
        check=True,
        capture_output=True,
        cwd=ROOT,
        timeout=60,
    )
    return out / "relay.test.crt", out / "relay.test.key"


@pytest.fixture
def tls_relay(relay, certificate):
    def make(extra: dict | None = None):
        crt, key = certificate
        return relay({"tls": {"cert_file": str(crt), "key_file": str(key)}, **(extra or {})})

    return make


# -- SMTP smuggling -----------------------------------------------------------------------------

SMUGGLED = (
    b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
    b"From: evil@x.test\r\nTo: victim@example.test\r\nSubject: smuggled\r\n\r\nevil body\r\n"
)
# Fake end-of-data sequences; after normalisation all but "\r\n.\r" put a lone "." line in
# the content ("\r\n.\r" is a dot-stuffed line "." + "\rMAIL...": the dot is removed).
MARKERS = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\r", b"\r.\r\n"]
DOT_LINE = {b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r.\r\n"}


def smuggling_body(marker: bytes) -> bytes:
    return (
        b"From: app@sender.test\r\nTo: rcpt@example.test\r\nSubject: innocent\r\n\r\nhello"
        + marker
        + SMUGGLED
        + b".\r\n"
    )


@pytest.mark.parametrize("marker", MARKERS, ids=lambda m: repr(m)[2:-1])
def test_smuggled_end_of_data_is_one_normalised_message(relay, dns_server, fake_mx, marker):
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10")
    r = relay()
    with session(r) as client:
        open_transaction(client)
        client.send(smuggling_body(marker))
        queue_id(client.reply())  # exactly one reply for the whole DATA ...
        assert client.cmd("QUIT").code == 221  # ... and none for the smuggled commands
        assert client.read_until_eof() == b""
    wait_until(lambda: spooled(r) == 0, 15, "the message delivered and gone from the spool")
    assert len(mx.messages) == 1, [m.mail_from for m in mx.messages]
    got = mx.messages[0]
    assert (got.mail_from, got.rcpts) == ("app@sender.test", ["rcpt@example.test"])
    assert no_bare_newlines(got.data), got.data
    assert got.data.endswith(b"\r\n")
    assert b"\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n" in got.data
    if marker in DOT_LINE:  # the "." line reached the MX as content: it was dot-stuffed
        assert b"hello\r\n.\r\nMAIL FROM:<evil@x.test>\r\n" in got.data


@pytest.mark.parametrize("marker", MARKERS, ids=lambda m: repr(m)[2:-1])
def test_smuggling_attempt_rejected_when_bare_newlines_reject(relay, fake_mx, marker):
    mx = fake_mx("127.0.0.10")
    r = relay({"ingress": {"bare_newlines": "reject"}})
    with session(r) as client:
        open_transaction(client)
        client.send(smuggling_body(marker))
        reply = client.reply()
        assert reply.line.startswith("554 5.6.0"), reply
        assert spooled(r) == 0
        assert client.cmd("QUIT").code == 221
        assert client.read_until_eof() == b""
    assert spooled(r) == 0 and mx.connections == []


# -- STARTTLS ---------------------------------------------------------------------------------

INJECTIONS = [
    b"RSET\r\n",
    b"MAIL FROM:<x@y.test>\r\n",
    b"EHLO evil.test\r\nMAIL FROM:<x@y.test>\r\nRCPT TO:<victim@example.test>\r\n",
]


@pytest.mark.parametrize("injected", INJECTIONS, ids=["rset", "mail", "ehlo-mail-rcpt"])
def test_starttls_discards_commands_pipelined_in_plaintext(tls_relay, injected):
    r = tls_relay()
    with session(r) as client:
        assert "STARTTLS" in str(client.cmd("EHLO client.test"))
        client.send(b"STARTTLS\r\n" + injected)  # one segment: the injection rides along
        assert client.reply().code == 220
        assert client.buffer == b"", "plaintext reply after 220 to STARTTLS"
        client.starttls()
        # Executed injections would answer first (250s); fresh TLS session: no EHLO yet.
        reply = client.cmd("RCPT TO:<victim@example.test>")
        assert reply.line.startswith("503 5.5.1"), reply
        ehlo = client.cmd("EHLO client.test")
        assert ehlo.code == 250 and "STARTTLS" not in str(ehlo)
        reply = client.cmd("RCPT TO:<victim@example.test>")  # no MAIL survived either
        assert reply.line.startswith("503 5.5.1"), reply
        assert client.cmd("QUIT").code == 221
    assert spooled(r) == 0


def test_starttls_during_transaction_refused(tls_relay):
    r = tls_relay()
    with session(r) as client:
        assert client.cmd("EHLO client.test").code == 250
        assert client.cmd("MAIL FROM:<app@sender.test>").code == 250
        reply = client.cmd("STARTTLS")
        assert reply.line.startswith("503 5.5.1"), reply
        assert client.cmd("RCPT TO:<rcpt@example.test>").code == 250  # still in plaintext
        assert client.cmd("QUIT").code == 221


def test_session_after_starttls_starts_fresh(tls_relay):
    r = tls_relay()
    with session(r) as client:
        assert client.cmd("EHLO client.test").code == 250
        assert client.cmd("STARTTLS").code == 220
        client.starttls()
        reply = client.cmd("MAIL FROM:<app@sender.test>")
        assert reply.line.startswith("503 5.5.1"), reply
        assert client.cmd("EHLO client.test").code == 250
        assert client.cmd("MAIL FROM:<app@sender.test>").line.startswith("250 2.1.0")
        assert client.cmd("QUIT").code == 221


def test_second_starttls_inside_tls_refused(tls_relay):
    r = tls_relay()
    with session(r) as client:
        assert client.cmd("EHLO client.test").code == 250
        assert client.cmd("STARTTLS").code == 220
        client.starttls()
        assert client.cmd("EHLO client.test").code == 250
        reply = client.cmd("STARTTLS")
        assert reply.code in (503, 554) and reply.line[4:9] == "5.5.1", reply
        assert client.cmd("NOOP").code == 250  # still the same TLS session
        assert client.cmd("QUIT").code == 221


def test_failed_tls_handshakes_do_not_leak_connection_slots(tls_relay):
    r = tls_relay({"ingress": {"max_connections_per_ip": 2}})
    for garbage in (b"this is not a TLS ClientHello\r\n" * 4, b"\x16\x03\x01\x00\x05hello"):
        with session(r, source=CLIENT) as client:
            assert client.cmd("EHLO client.test").code == 250
            assert client.cmd("STARTTLS").code == 220
            client.send(garbage)
            client.read_until_eof()  # relayd gives up on the handshake and closes
    held = hold(r.port, CLIENT, CLIENT)  # both per-IP slots are free again
    for client in held:
        client.close()
    assert r.proc.poll() is None
    assert "Traceback" not in r.log_text()


# -- limits -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    ["NOOP " + "x" * 600, "NOOP " + "x" * 5000, "MAIL FROM:<" + "a" * 700 + "@sender.test>"],
    ids=["600", "5000", "mail-700"],
)
def test_command_line_over_512_octets_gets_500_552(relay, line):
    r = relay()
    with session(r) as client:
        assert client.cmd("EHLO client.test").code == 250
        reply = client.cmd(line)
        assert reply.line.startswith("500 5.5.2"), reply
        assert client.cmd("NOOP").line.startswith("250 2.0.0")  # the session goes on
        assert client.cmd("MAIL FROM:<app@sender.test>").code == 250
        assert client.cmd("QUIT").code == 221


def test_text_line_limit_does_not_shorten_command_lines(relay):
    """max_line_length is for message text; commands may still be 512 octets (RFC 5321)."""
    r = relay({"ingress": {"max_line_length": 200}})
    with session(r) as client:
        assert client.cmd("EHLO client.test").code == 250
        reply = client.cmd("NOOP " + "x" * 400)
        assert reply.line.startswith("250 2.0.0"), reply
        address = "a" * 60 + "@" + ".".join(["d" * 60] * 3) + ".test"  # 248: under RFC's 254
        reply = client.cmd(f"MAIL FROM:<{address}> SIZE=1000 BODY=8BITMIME")
        assert reply.line.startswith("250 2.1.0"), reply


@pytest.mark.parametrize("length", [201, 100_000])
def test_text_line_over_max_line_length_gets_500_552_after_dot(parked, length):
    r = parked({"ingress": {"max_line_length": 200}})
    with session(r) as client:
        open_transaction(client)
        client.send(b"Subject: long\r\n\r\n" + b"y" * length + b"\r\nshort\r\n.\r\n")
        reply = client.reply()
        assert reply.line.startswith("500 5.5.2"), reply
        assert spooled(r) == 0
        open_transaction(client)  # the session goes on; 200 octets is within the limit
        client.send(b"Subject: fits\r\n\r\n" + b"y" * 200 + b"\r\n.\r\n")
        queue_id(client.reply())
        assert client.cmd("QUIT").code == 221
    assert spooled(r) == 1


def test_connections_per_ip_limited(relay):
    r = relay({"ingress": {"max_connections_per_ip": 2}})
    held = hold(r.port, CLIENT, CLIENT)
    refused(r.port, source=CLIENT)
    with session(r, source="127.0.0.6") as other:  # another address still gets in
        assert other.cmd("NOOP").code == 250
    held.pop().close()
    wait_until(lambda: greeted(r.port, source=CLIENT), 10, f"a slot for {CLIENT} again")
    for client in held:
        client.close()


def test_total_connections_limited(relay):
    # session_timeout: the fixture's start-up probe (connect, close at once) may hold a slot until
    # the idle timeout (see test_connection_closed_before_greeting_releases_its_slot).
    r = relay(
        {"ingress": {"max_connections": 3, "max_connections_per_ip": 50, "session_timeout": "3s"}}
    )
    held = hold(r.port, CLIENT, CLIENT, "127.0.0.6")
    refused(r.port, source="127.0.0.8")
    refused(r.port, source=CLIENT)
    held.pop(0).close()
    wait_until(lambda: greeted(r.port, source="127.0.0.8"), 10, "a free connection slot")
    for client in held:
        client.close()


def test_connection_closed_before_greeting_releases_its_slot(relay):
    """Port scanners and TCP health checks connect and close at once: no slot may stay taken."""
    r = relay({"ingress": {"max_connections_per_ip": 2}})
    for _ in range(3):
        socket.create_connection(("127.0.0.1", r.port), source_address=(CLIENT, 0)).close()
    held = hold(r.port, CLIENT, CLIENT, timeout=5)  # well within session_timeout (300 s)
    for client in held:
        client.close()


def test_idle_session_closed_with_421_442(relay):
    r = relay({"ingress": {"session_timeout": "1s"}})
    with session(r) as client:
        reply = client.reply()  # sent nothing: relayd speaks first, within the 5 s timeout
        assert reply.line.startswith("421 4.4.2"), reply
        assert client.read_until_eof() == b""


def test_stalled_data_closed_with_421_442_and_nothing_spooled(relay):
    r = relay({"ingress": {"session_timeout": "1s"}})
    with session(r) as client:
        open_transaction(client)
        client.send(b"Subject: slow\r\n\r\nhalf a li")
        reply = client.reply()
        assert reply.line.startswith("421 4.4.2"), reply
        assert client.read_until_eof() == b""
    assert spooled(r) == 0


def test_active_data_transfer_is_not_idle(parked):
    """A client sending message text slowly but steadily is busy, not idle."""
    r = parked({"ingress": {"session_timeout": "1s"}})
    with session(r) as client:
        open_transaction(client)
        client.send(b"Subject: slow but steady\r\n\r\n")
        for i in range(8):  # about 2.4 s in all, never 1 s without a byte
            assert client.quiet_for(0.3), (
                f"relayd spoke during DATA after {i} lines: {client.buffer!r}"
            )
            client.send(b"line %d\r\n" % i)
        client.send(b".\r\n")
        queue_id(client.reply())
        assert client.cmd("QUIT").code == 221
    assert spooled(r) == 1


def test_session_time_limit_closes_busy_session_with_421_442(relay):
    r = relay({"ingress": {"max_session_time": "2s", "session_timeout": "30s"}})
    with session(r) as client:
        assert client.cmd("EHLO client.test").code == 250
        for _ in range(40):  # at most ~12 s of NOOPs every 0.3 s
            if not client.quiet_for(0.3):
                reply = client.reply()
                break
            reply = client.cmd("NOOP")
            if reply.code != 250:
                break
        else:
            pytest.fail("no 421 after 40 NOOPs (max_session_time = 2s)")
        assert reply.line.startswith("421 4.4.2"), reply
        assert client.read_until_eof() == b""


def stall(socks: list[socket.socket]) -> None:
    """Pipeline EHLOs on every connection, never reading a reply, until each one's sends stall
    (no room for 0.5 s: relayd has stopped reading, its replies piling up unread behind a
    receive window of 1 KiB) or relayd drops it. All at once, so that none sits idle."""
    chunk = b"EHLO jam.test\r\n" * 4096
    progress = dict.fromkeys(socks, time.monotonic())
    deadline = time.monotonic() + 20
    for sock in socks:
        sock.setblocking(False)
    while progress:
        assert time.monotonic() < deadline, "relayd kept reading EHLOs that nobody reads"
        for sock in select.select([], list(progress), [], 0.1)[1]:
            try:
                if sock.send(chunk):
                    progress[sock] = time.monotonic()
            except BlockingIOError:
                pass
            except OSError:  # reset by relayd: dropped already
                del progress[sock]
        for sock, last in list(progress.items()):
            if time.monotonic() - last > 0.5:
                del progress[sock]


def never_reading(port: int, source: str, n: int) -> list[socket.socket]:
    """``n`` connections greeted with 220 whose receive buffer is 1 KiB (set before connecting,
    so that the window they offer is that small); retried like hold()."""

    def attempt() -> list[socket.socket] | None:
        socks: list[socket.socket] = []
        for _ in range(n):
            sock = socket.socket()
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            sock.bind((source, 0))
            sock.settimeout(5)
            sock.connect(("127.0.0.1", port))
            if not sock.recv(512).startswith(b"220 "):
                for s in socks:
                    s.close()
                return None
        return socks

    return wait_until(attempt, 10, f"{n} connections from {source} greeted with 220")


@pytest.mark.parametrize(
    "limits",
    [
        {"max_session_time": "4s", "session_timeout": "60s"},
        {"max_session_time": "60s", "session_timeout": "2s"},
    ],
    ids=["session-time", "idle"],
)
def test_clients_that_never_read_lose_their_slot_at_the_time_limit(relay, limits):
    """The 421 goodbye cannot drain to a client whose window is shut: relayd must abort the
    connection soon after the limit instead of waiting for the buffer to drain forever."""
    r = relay({"ingress": {"max_connections": 3, "max_connections_per_ip": 50, **limits}})
    held = never_reading(r.port, CLIENT, 3)
    try:
        refused(r.port)  # the three hold every slot: a trusted client is turned away
        stall(held)
        for client in hold(r.port, "127.0.0.1", "127.0.0.1", "127.0.0.1"):  # all three slots
            client.close()
    finally:
        for sock in held:
            sock.close()
    aborted = r.events("session_aborted")
    assert len(aborted) == 3 and all(e["client"] == CLIENT for e in aborted), aborted
    assert r.proc.poll() is None


# -- open relay -------------------------------------------------------------------------------

UNTRUSTED = "127.0.0.7"


def test_untrusted_client_denied_relay(relay):
    r = relay()
    for rcpt in ["friend@sender.test", "victim@example.test", "x@relay.test", "x@[127.0.0.1]"]:
        with session(r, source=UNTRUSTED) as client:
            assert client.cmd("EHLO outsider.test").code == 250
            assert client.cmd("MAIL FROM:<someone@sender.test>").code == 250
            reply = client.cmd(f"RCPT TO:<{rcpt}>")
            assert reply.line.startswith("554 5.7.1"), (rcpt, reply)
            reply = client.cmd("DATA")
            assert reply.code in (503, 554), (rcpt, reply)
            assert client.cmd("QUIT").code == 221
    assert spooled(r) == 0


def test_untrusted_client_relay_tricks_refused(relay):
    r = relay()
    for rcpt in [
        "@relay.test:victim@example.test",  # source route
        "victim%example.test@relay.test",  # percent hack
        "example.test!victim@relay.test",  # bang path
        '"victim@example.test"@relay.test',  # quoted local part
        "victim@example.test.",  # trailing dot
    ]:
        with session(r, source=UNTRUSTED) as client:
            assert client.cmd("EHLO outsider.test").code == 250
            assert client.cmd("MAIL FROM:<someone@sender.test>").code == 250
            reply = client.cmd(f"RCPT TO:<{rcpt}>")
            assert reply.code in (501, 553, 554) and ENHANCED.match(reply.line), (rcpt, reply)
            assert client.cmd("DATA").code in (503, 554)
    assert spooled(r) == 0


def test_postmaster_without_domain_accepted_from_anyone(relay, dns_server, fake_mx):
    """RFC 5321 4.5.1: RCPT TO:<postmaster> (any case) must be accepted. relayd takes it as
    postmaster@ its server.hostname, from an untrusted client too (mail to relayd's own
    postmaster relays nothing for others) and refuses that client's other recipients."""
    mx_zone(dns_server, "relay.test", (10, "mx.relay.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10")
    r = relay()
    with session(r, source=UNTRUSTED) as client:
        assert client.cmd("EHLO outsider.test").code == 250
        assert client.cmd("MAIL FROM:<someone@sender.test>").code == 250
        reply = client.cmd("RCPT TO:<postmaster>")
        assert reply.line.startswith("250 2.1.5"), reply
        for rcpt in ("postmaster@relay.test", "postmaster@example.test", "victim@example.test"):
            reply = client.cmd(f"RCPT TO:<{rcpt}>")
            assert reply.line.startswith("554 5.7.1"), (rcpt, reply)
        assert client.cmd("DATA").code == 354
        client.send(b"Subject: for the postmaster\r\n\r\nhello\r\n.\r\n")
        queue_id(client.reply())
        assert client.cmd("QUIT").code == 221
    for source, rcpt in ((UNTRUSTED, "PostMaster"), (None, "POSTMASTER")):
        with session(r, source=source) as client:
            assert client.cmd("EHLO client.test").code == 250
            assert client.cmd("MAIL FROM:<someone@sender.test>").code == 250
            reply = client.cmd(f"RCPT TO:<{rcpt}>")
            assert reply.line.startswith("250 2.1.5"), (source, rcpt, reply)
    got = mx.wait_for_messages(1)[0]
    assert (got.mail_from, got.rcpts) == ("someone@sender.test", ["postmaster@relay.test"])
    accepted = r.wait_event("accepted")[0]
    assert accepted["rcpt"] == ["postmaster@relay.test"]
    assert accepted["origin"] == f"postmaster:{UNTRUSTED}", accepted


def test_untrusted_pipelined_transaction_spools_nothing(relay):
    r = relay()
    with session(r, source=UNTRUSTED) as client:
        client.send(
            b"EHLO outsider.test\r\nMAIL FROM:<someone@sender.test>\r\n"
            b"RCPT TO:<friend@sender.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
            b"Subject: pipelined\r\n\r\nMAIL FROM:<someone@sender.test>\r\n"
            b"RCPT TO:<victim@example.test>\r\nDATA\r\nbody\r\n.\r\nQUIT\r\n"
        )
        replies: list[Reply] = []
        while True:
            try:
                replies.append(client.reply())
            except EOFError:
                break
    codes = [x.code for x in replies]
    assert codes[:2] == [250, 250], replies
    assert replies[2].line.startswith("554 5.7.1") and replies[3].line.startswith("554 5.7.1")
    assert codes[4] in (503, 554), replies
    assert 354 not in codes and not any("queued" in str(x) for x in replies), replies
    assert spooled(r) == 0


# -- replies ----------------------------------------------------------------------------------


ODD_COMMANDS = [
    ["VRFY postmaster"],
    ["EXPN staff"],
    ["HELP"],
    ["ETRN example.test"],
    ["BDAT 10 LAST"],
    ["STARTTLS"],  # no certificate configured
    ["AUTH PLAIN AGEAYg=="],
    ["DATA"],
    ["RCPT TO:<x@example.test>"],
    ["MAIL FROM:<a@sender.test> BODY=BOGUS"],
    ["MAIL FROM:<a@sender.test> SIZE=abc"],
    ["MAIL FROM:<a@sender.test>", "MAIL FROM:<b@sender.test>"],
    ["MAIL FROM:<a@sender.test>", "RCPT TO:<x@example.test> NOTIFY=NEVER"],
    ["MAIL FROM:<a@sender.test>", "RCPT TO:<x@example.test>", "DATA extra"],
    ["\x00\x01\x02"],
    ["NOOP"],
    ["RSET"],
]


def test_every_reply_carries_an_enhanced_status_code(relay):
    """RFC 2034 (ENHANCEDSTATUSCODES is advertised): every 2xx/4xx/5xx reply but the greeting
    and the answer to EHLO/HELO starts with a status code like 5.5.1."""
    r = relay()
    missing = []
    for commands in ODD_COMMANDS:  # a session each: max_errors is not reached
        with session(r) as client:
            assert client.cmd("EHLO client.test").code == 250
            for command in commands:
                reply = client.cmd(command.encode())
                if not all(ENHANCED.match(line) for line in reply.lines):
                    missing.append(f"{command!r} -> {reply}")
    assert not missing, "\n".join(missing)


def test_8bit_helo_name_never_yields_an_internal_error(relay):
    """A HELO name that is not UTF-8 is refused (501) or the mail goes through; never a 500
    carrying a Python exception."""
    r = relay()
    for greeting in (b"EHLO fuzz.t\xe5st", b"HELO \xff\xfe"):
        with session(r) as client:
            reply = client.cmd(greeting)
            if reply.code == 501:
                assert reply.line.startswith("501 5.5."), (greeting, reply)
                continue
            assert reply.code == 250, (greeting, reply)
            open_data = [
                client.cmd("MAIL FROM:<app@sender.test>"),
                client.cmd("RCPT TO:<x@example.test>"),
            ]
            assert [x.code for x in open_data] == [250, 250], (greeting, open_data)
            assert client.cmd("DATA").code == 354
            client.send(b"Subject: 8bit helo\r\n\r\nbody\r\n.\r\n")
            queue_id(client.reply())
    assert "Traceback" not in r.log_text()


@pytest.mark.parametrize("source", [None, UNTRUSTED], ids=["trusted", "untrusted"])
def test_addresses_that_are_not_utf8_refused_permanently(relay, source):
    """Under SMTPUTF8 an address must still be UTF-8: 501 5.1.3 at MAIL/RCPT (for an untrusted
    client 554 5.7.1 will do), not 250 then a 451 "try again later" after DATA."""
    r = relay()
    cases = [("MAIL FROM:<\udcff\udcfe@sender.test> SMTPUTF8", "RCPT TO:<x@example.test>")]
    cases.append(("MAIL FROM:<app@sender.test> SMTPUTF8", "RCPT TO:<\udcff\udcfe@example.test>"))
    allowed = ("501 5.1.3",) if source is None else ("501 5.1.3", "554 5.7.1")
    for mail, rcpt in cases:
        with session(r, source=source) as client:
            assert client.cmd("EHLO client.test").code == 250
            replies = []
            for command in (mail, rcpt):
                replies.append(client.cmd(command.encode("utf-8", "surrogateescape")))
                if replies[-1].code != 250:
                    break
            assert replies[-1].line.startswith(allowed), (mail, rcpt, replies)
            reply = client.cmd("DATA")
            assert reply.code in (503, 554), (mail, rcpt, reply)
    assert spooled(r) == 0
    assert not r.events("accept_failed") and "Traceback" not in r.log_text()


def test_8bit_command_argument_never_yields_an_internal_error(relay):
    r = relay()
    for command in (b"VRFY @\xbc\xfa", b"VRFY \xff\xfe", b"EXPN \xff", b"HELP \xff"):
        with session(r) as client:
            reply = client.cmd(command)
            assert "Error: (" not in str(reply) and reply.code in (214, 250, 252, 501, 502), (
                command,
                reply,
            )
    assert "Traceback" not in r.log_text()
