"""Self-tests for the DNS and MX fakes, so relayd test failures can be trusted to be relayd's."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import dns.asyncresolver
import dns.name
import dns.resolver
import pytest
from support.dnsserver import TestDNSServer
from support.fakemx import FakeMX, self_signed_tls_context

CLIENT_IP = "127.0.0.5"


@pytest.fixture
def dns_server() -> Iterator[TestDNSServer]:
    with TestDNSServer() as server:
        yield server


@pytest.fixture
def mx() -> Iterator[FakeMX]:
    with FakeMX("127.0.0.3") as server:
        yield server


def resolve(
    server: TestDNSServer, name: str, rtype: str, lifetime: float = 3.0
) -> dns.resolver.Answer:
    """Resolve through the test server only, the way relayd's resolver will be configured."""

    async def run() -> dns.resolver.Answer:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.port = server.port
        resolver.nameservers = ["127.0.0.1"]
        resolver.lifetime = lifetime
        return await resolver.resolve(name, rtype)

    return asyncio.run(run())


def smtp_client(mx: FakeMX) -> smtplib.SMTP:
    return smtplib.SMTP(mx.host, mx.port, source_address=(CLIENT_IP, 0), timeout=10)


# -- TestDNSServer ----------------------------------------------------------------------------


def test_dns_mx_with_additional_a(dns_server: TestDNSServer) -> None:
    dns_server.add("Example.TEST.", "MX", "10 mx1.example.test")
    dns_server.add("mx1.example.test", "A", "127.0.0.10")
    dns_server.add("null.test", "MX", "0 .")
    answer = resolve(dns_server, "example.test", "MX")
    assert [(r.preference, r.exchange.to_text()) for r in answer] == [(10, "mx1.example.test.")]
    assert [r.to_text() for rrset in answer.response.additional for r in rrset] == ["127.0.0.10"]
    assert [r.exchange for r in resolve(dns_server, "null.test", "MX")] == [dns.name.root]
    assert ("example.test", "MX") in dns_server.queries


def test_dns_negative_answers(dns_server: TestDNSServer) -> None:
    dns_server.add("example.test", "MX", "10 mx1.example.test")
    dns_server.add("a.b.test", "A", "127.0.0.1")
    with pytest.raises(dns.resolver.NoAnswer):
        resolve(dns_server, "example.test", "A")
    with pytest.raises(dns.resolver.NoAnswer):  # empty non-terminal
        resolve(dns_server, "b.test", "A")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolve(dns_server, "missing.test", "MX")
    dns_server.remove("example.test", "MX")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolve(dns_server, "example.test", "MX")


def test_dns_servfail_timeout_and_clear(dns_server: TestDNSServer) -> None:
    dns_server.add("example.test", "A", "127.0.0.10")
    dns_server.set_servfail("example.test")
    with pytest.raises(dns.resolver.NoNameservers):
        resolve(dns_server, "example.test", "A")
    dns_server.set_timeout("slow.test")
    with pytest.raises(dns.resolver.LifetimeTimeout):
        resolve(dns_server, "slow.test", "A", lifetime=1)
    dns_server.clear("example.test")
    assert [r.to_text() for r in resolve(dns_server, "example.test", "A")] == ["127.0.0.10"]


def test_dns_long_txt_truncates_to_tcp_and_cname(dns_server: TestDNSServer) -> None:
    dns_server.add("txt.test", "TXT", "x" * 600)
    dns_server.add("alias.test", "CNAME", "txt.test")
    answer = resolve(dns_server, "alias.test", "TXT")
    assert [len(s) for s in answer[0].strings] == [255, 255, 90]
    assert dns_server.queries.count(("alias.test", "TXT")) == 2  # UDP (TC=1), then TCP


# -- FakeMX -----------------------------------------------------------------------------------


def test_fakemx_records_message_peer_and_ehlo(mx: FakeMX) -> None:
    with smtp_client(mx) as client:
        client.ehlo("client.test")
        assert client.has_extn("pipelining") and not client.has_extn("starttls")
        client.sendmail("a@src.test", ["b@dst.test"], b"Subject: x\r\n\r\n.dot\r\nend\r\n")
    (msg,) = mx.wait_for_messages(1)
    assert (msg.peer_ip, msg.ehlo, msg.mail_from, msg.rcpts) == (
        CLIENT_IP,
        "client.test",
        "a@src.test",
        ["b@dst.test"],
    )
    assert msg.data == b"Subject: x\r\n\r\n.dot\r\nend\r\n"
    (conn,) = mx.wait_for_connections(1)
    assert conn.peer_ip == CLIENT_IP and conn.ehlo == "client.test" and not conn.tls
    mx.wait_idle()
    assert conn.ended is not None and conn.commands[-1] == "QUIT"


def test_fakemx_rcpt_and_scripted_data_replies(mx: FakeMX) -> None:
    mx.rcpt_replies["bad@dst.test"] = "550 5.1.1 no such user"
    mx.data_replies.append("451 4.7.1 later")
    with smtp_client(mx) as client:
        with pytest.raises(smtplib.SMTPDataError) as excinfo:
            client.sendmail("a@src.test", ["b@dst.test"], b"one\r\n")
        assert excinfo.value.smtp_code == 451
        client.rset()
        refused = client.sendmail("a@src.test", ["Bad@dst.test", "b@dst.test"], b"two\r\n")
    assert refused == {"Bad@dst.test": (550, b"5.1.1 no such user")}
    (msg,) = mx.wait_for_messages(1)
    assert msg.rcpts == ["b@dst.test"] and msg.data == b"two\r\n"


def test_fakemx_pipelined_commands_answered_in_order(mx: FakeMX) -> None:
    with socket.create_connection((mx.host, mx.port), timeout=10) as sock:
        stream = sock.makefile("rb")
        assert stream.readline().startswith(b"220 ")
        sock.sendall(b"EHLO c.test\r\nMAIL FROM:<a@s.test>\r\nRCPT TO:<b@d.test>\r\nDATA\r\n")
        codes = []
        while len(codes) < 4:
            line = stream.readline()
            if line[3:4] == b" ":
                codes.append(line[:3])
        assert codes == [b"250", b"250", b"250", b"354"]
        sock.sendall(b"hi\r\n.\r\nQUIT\r\n")
        assert stream.readline().startswith(b"250 2.0.0 queued as 1")
    assert mx.wait_for_messages(1)[0].data == b"hi\r\n"


def test_fakemx_greeting_and_data_drop(mx: FakeMX) -> None:
    mx.on_connect = "drop"
    with pytest.raises(smtplib.SMTPServerDisconnected):
        smtp_client(mx)
    mx.on_connect = None
    mx.connect_replies.append("421 4.3.2 busy")
    with pytest.raises(smtplib.SMTPConnectError) as excinfo:
        smtp_client(mx)
    assert excinfo.value.smtp_code == 421
    mx.data_reply = "drop"
    client = smtp_client(mx)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.sendmail("a@src.test", ["b@dst.test"], b"x\r\n")
    client.close()
    assert len(mx.wait_for_connections(3)) == 3 and mx.messages == []


def test_fakemx_stop_closes_stalled_connection() -> None:
    server = FakeMX("127.0.0.3", on_connect="stall").start()
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        server.wait_for_connections(1)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 5
        assert sock.recv(100) == b""


def test_fakemx_starttls(tmp_path: Path) -> None:
    server_ctx, cert = self_signed_tls_context(tmp_path, "mx.test", "127.0.0.3")
    with FakeMX("127.0.0.3", tls_context=server_ctx) as mx, smtp_client(mx) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        client.starttls(context=ssl.create_default_context(cafile=str(cert)))
        client.ehlo("client.test")
        assert not client.has_extn("starttls")
        client.sendmail("a@src.test", ["b@dst.test"], b"secret\r\n")
        (msg,) = mx.wait_for_messages(1)
        assert msg.tls and mx.connections[0].tls


def test_fakemx_concurrency_and_shared_port(mx: FakeMX) -> None:
    with FakeMX("127.0.0.4", mx.port) as twin:
        clients = [smtp_client(mx) for _ in range(3)] + [smtp_client(twin)]
        mx.wait_for(lambda: mx.current_connections == 3, 10, "3 open connections")
        for client in clients:
            client.quit()
        mx.wait_idle()
        assert mx.max_concurrent_connections == 3 and mx.current_connections == 0
        assert twin.wait_for_connections(1)[0].peer_ip == CLIENT_IP
    mx.reset()
    assert mx.connections == [] and mx.max_concurrent_connections == 0
    with pytest.raises(TimeoutError, match="1 message"):
        mx.wait_for_messages(1, timeout=0.1)
