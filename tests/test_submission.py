"""Authenticated submission: TLS first, then AUTH, then only the sender's own domains."""

from __future__ import annotations

import base64
import contextlib
import json
import select
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from support.raw import RawSMTP
from support.util import free_port, listening, mx_zone, wait_until

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery"


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


def self_signed(directory: Path, hostname: str = "relay.test") -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    result = ctl(Path("/nonexistent"), "tls", "self-signed", hostname, "--out-dir", str(directory))
    assert result.returncode == 0, result.stderr
    return directory / f"{hostname}.crt", directory / f"{hostname}.key"


def client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.fixture
def submission(relay, dns_server, fake_mx, tmp_path):
    """relayd with relay, submission and smtps listeners, and a login app1 for example.test."""
    mx_zone(dns_server, "dest.test", (10, "mx.dest.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10")
    crt, key = self_signed(tmp_path / "tls")
    ports = {kind: free_port() for kind in ("relay", "submission", "smtps")}

    def start(**extra):
        config = {
            "listeners": [
                {"address": f"127.0.0.1:{port}", "kind": kind} for kind, port in ports.items()
            ],
            "tls": {"cert_file": str(crt), "key_file": str(key)},
            "auth": {"users_file": "users.json", "failure_delay": "0.1s", "max_failures": 3},
            "ingress": {"trusted_networks": ["127.0.0.1/32"]},
        }
        for section, values in extra.items():
            config[section] = {**config.get(section, {}), **values}
        r = relay(config, start=False)
        add = ctl(
            r.config_path,
            "user",
            "add",
            "app1",
            "--sender",
            "example.test",
            "--sender",
            "ceo@corp.test",
            "--rate",
            "3/hour",
            "--max-recipients",
            "2",
            stdin=PASSWORD + "\n",
        )
        assert add.returncode == 0, add.stderr
        r.start()  # waits for the first listener; the others are bound just after it
        for port in ports.values():
            wait_until(lambda port=port: listening(port), 10, f"listener on {port}")
        r.ports, r.mx, r.crt, r.key = ports, mx, crt, key
        return r

    return start


def login(r, kind: str = "submission", user: str = "app1", password: str = PASSWORD):
    if kind == "smtps":
        client = smtplib.SMTP_SSL("127.0.0.1", r.ports["smtps"], context=client_tls(), timeout=10)
    else:
        client = smtplib.SMTP("127.0.0.1", r.ports[kind], timeout=10)
        client.starttls(context=client_tls())
    client.ehlo("app.test")
    client.login(user, password)
    return client


def message(sender: str = "news@example.test", to: str = "x@dest.test") -> bytes:
    return f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: hi\r\n\r\nbody\r\n".encode()


def test_submission_requires_starttls_then_auth(submission):
    r = submission()
    with smtplib.SMTP("127.0.0.1", r.ports["submission"], timeout=10) as client:
        code, features = client.ehlo("app.test")
        assert b"STARTTLS" in features and b"AUTH" not in features
        code, text = client.docmd("MAIL FROM:<news@example.test>")
        assert code == 530
        client.starttls(context=client_tls())
        code, features = client.ehlo("app.test")
        assert b"AUTH LOGIN PLAIN" in features and b"STARTTLS" not in features
        code, text = client.docmd("MAIL FROM:<news@example.test>")
        assert (code, text[:5]) == (530, b"5.7.0")
        client.login("app1", PASSWORD)
        client.sendmail("news@example.test", ["x@dest.test"], message())
    got = r.mx.wait_for_messages(1)[0]
    assert got.rcpts == ["x@dest.test"]
    accepted = r.wait_event("accepted")[0]
    assert accepted["origin"] == "auth:app1"
    shown = ctl(r.config_path, "--json", "list")
    assert shown.returncode == 0


def test_smtps_implicit_tls_with_auth_login(submission):
    r = submission()
    with login(r, "smtps") as client:
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.sendmail("ceo@corp.test", ["y@dest.test"], message("ceo@corp.test", "y@dest.test"))
    assert r.mx.wait_for_messages(1)[0].mail_from == "ceo@corp.test"


def test_swaks_submission_with_starttls_and_auth(submission):
    r = submission()
    result = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{r.ports['submission']}",
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            "app1",
            "--auth-password",
            PASSWORD,
            "--from",
            "news@example.test",
            "--to",
            "z@dest.test",
            "--header",
            "From: news@example.test",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert r.mx.wait_for_messages(1)[0].rcpts == ["z@dest.test"]


def test_foreign_envelope_sender_refused_553(submission):
    r = submission()
    with login(r) as client:
        code, text = client.docmd("MAIL FROM:<spoof@bank.test>")
        assert (code, text[:5]) == (553, b"5.7.1")


def test_foreign_from_header_refused_550(submission):
    r = submission()
    with login(r) as client:
        client.mail("news@example.test")
        client.rcpt("x@dest.test")
        code, text = client.data(message("ceo@bank.test"))
        assert (code, text[:5]) == (550, b"5.7.1")
    assert r.events("accepted") == []


def test_rate_limit_per_login_450_471(submission):
    r = submission()
    with login(r) as client:
        for _ in range(3):
            client.sendmail("news@example.test", ["x@dest.test"], message())
        code, text = client.docmd("MAIL FROM:<news@example.test>")
        assert (code, text[:5]) == (450, b"4.7.1")


def test_max_recipients_per_login(submission):
    r = submission()
    with login(r) as client:
        client.mail("news@example.test")
        assert client.rcpt("a@dest.test")[0] == 250
        assert client.rcpt("b@dest.test")[0] == 250
        code, text = client.rcpt("c@dest.test")
        assert (code, text[:5]) == (452, b"4.5.3")


def test_failed_logins_lock_the_client_ip_out(submission):
    r = submission()
    with smtplib.SMTP("127.0.0.1", r.ports["submission"], timeout=10) as client:
        client.starttls(context=client_tls())
        client.ehlo("app.test")
        client.user, client.password = "app1", "wrong password"
        for _ in range(3):
            with pytest.raises(smtplib.SMTPAuthenticationError) as err:
                client.auth("PLAIN", client.auth_plain)
            assert err.value.smtp_code == 535
    with socket.create_connection(("127.0.0.1", r.ports["submission"]), timeout=5) as sock:
        assert sock.makefile("rb").readline().startswith(b"421 4.7.0")
    failures = r.wait_event("auth_failed", n=3)
    assert len(failures) == 3 and all(f["user"] == "app1" for f in failures)
    assert "wrong password" not in r.log_text()
    r.wait_event("auth_lockout")


def test_parallel_logins_cannot_outrun_the_lockout(submission):
    """30 connections from one IP each send AUTH at once, the right password last: attempts in
    flight count against max_failures (5), so only 5 are checked and the rest refused unchecked
    (454 4.7.0); the right password is never checked, the IP ends up locked out."""
    r = submission(auth={"max_failures": 5, "failure_delay": "2s"})
    source = "127.0.0.9"
    clients = []
    try:
        for _ in range(30):
            client = RawSMTP(r.ports["smtps"], source=source, timeout=20)
            clients.append(client)
            client.starttls()  # smtps: TLS from the start
            assert client.reply().code == 220
            assert "AUTH" in str(client.cmd("EHLO parallel.test"))
        wrong = base64.b64encode(b"\0app1\0wrong password").decode()
        right = base64.b64encode(f"\0app1\0{PASSWORD}".encode()).decode()
        for client in clients[:-1]:
            client.send(f"AUTH PLAIN {wrong}\r\n".encode())
        # The right one last: after the first reply to a wrong one (a 454 once five are in
        # flight), or 0.1 s, well before the failures are counted (each check takes ~80 ms).
        select.select([c.sock for c in clients[:-1]], [], [], 0.1)
        clients[-1].send(f"AUTH PLAIN {right}\r\n".encode())
        replies = [client.reply() for client in clients]
    finally:
        for client in clients:
            client.close()
    assert replies[-1].code != 235, [x.code for x in replies]  # not even checked
    codes = [x.code for x in replies]
    assert codes.count(535) == 5 and codes.count(454) == 25, codes
    assert all(x.line.startswith(("535 5.7.8", "454 4.7.0")) for x in replies), replies
    assert len(r.events("auth_failed")) == 5 and not r.events("auth_ok")
    with RawSMTP(r.ports["smtps"], source=source) as late:
        late.starttls()
        assert late.reply().line.startswith("421 4.7.0")  # locked out now


def test_mail_auth_parameter_accepted_where_auth_is_offered(submission):
    """RFC 4954 section 5: MAIL FROM's AUTH=<> or AUTH=xtext-mailbox is accepted wherever the
    session offers AUTH (and not passed on: relayd's client never sends AUTH=)."""
    r = submission()
    assert ctl(r.config_path, "user", "set", "app1", "--rate", "").returncode == 0
    with login(r) as client:
        for param in ("AUTH=<>", "AUTH=news@example.test", "AUTH=n+2Bx+3Dy@example.test"):
            code, text = client.docmd(f"MAIL FROM:<news@example.test> {param}")
            assert (code, text[:5]) == (250, b"2.1.0"), (param, text)
            assert client.docmd("RSET")[0] == 250
        for param in ("AUTH=a+zz@example.test", "AUTH=a+2@example.test", "AUTH", "AUTH=a=b"):
            code, text = client.docmd(f"MAIL FROM:<news@example.test> {param}")
            assert (code, text[:5]) == (501, b"5.5.4"), (param, text)
        client.sendmail("news@example.test", ["x@dest.test"], message(), ["AUTH=<>"])
    got = r.mx.wait_for_messages(1)[0]
    assert got.mail_from == "news@example.test"
    assert not any(o.upper().startswith("AUTH") for o in got.mail_options), got.mail_options
    with smtplib.SMTP("127.0.0.1", r.ports["relay"], timeout=10) as client:  # trusted client
        client.ehlo("app.test")  # plaintext: AUTH not offered yet, nor its parameter
        code, text = client.docmd("MAIL FROM:<app@sender.test> AUTH=<>")
        assert (code, text[:5]) == (555, b"5.5.4"), text
        client.starttls(context=client_tls())
        assert b"AUTH" in client.ehlo("app.test")[1]
        code, text = client.docmd("MAIL FROM:<app@sender.test> AUTH=<>")
        assert (code, text[:5]) == (250, b"2.1.0"), text
        code, text = client.docmd("RCPT TO:<x@dest.test> AUTH=<>")  # a MAIL parameter only
        assert (code, text[:5]) == (555, b"5.5.4"), text


def test_every_listener_kind_offers_and_takes_the_dsn_extension(submission):
    """RFC 3461 on relay, submission and smtps alike: DSN in EHLO, parameters accepted (and
    their mistakes refused with 501 5.5.4) once the session may send."""
    r = submission()
    assert ctl(r.config_path, "user", "set", "app1", "--rate", "").returncode == 0
    with smtplib.SMTP("127.0.0.1", r.ports["relay"], timeout=10) as client:
        client.ehlo("app.test")
        assert client.has_extn("dsn")
    for kind in ("submission", "smtps"):
        with login(r, kind) as client:
            assert client.has_extn("dsn"), kind
            code, text = client.docmd("MAIL FROM:<news@example.test> RET=HDRS ENVID=a+2Bb")
            assert (code, text[:5]) == (250, b"2.1.0"), (kind, text)
            code, text = client.docmd("RCPT TO:<x@dest.test> NOTIFY=NEVER,FAILURE")
            assert (code, text[:5]) == (501, b"5.5.4"), (kind, text)
            code, text = client.docmd(
                "RCPT TO:<x@dest.test> NOTIFY=FAILURE ORCPT=rfc822;x@dest.test"
            )
            assert (code, text[:5]) == (250, b"2.1.5"), (kind, text)
            assert client.data(message())[0] == 250
    for event in r.wait_event("accepted", n=2):
        assert event["envid"] == "a+b" and event["orcpt"] == ["rfc822;x@dest.test"]


def test_user_added_while_running_can_log_in(submission):
    r = submission()
    added = ctl(
        r.config_path, "user", "add", "late", "--sender", "late.test", stdin="another password\n"
    )
    assert added.returncode == 0, added.stderr
    with login(r, user="late", password="another password") as client:
        client.sendmail("a@late.test", ["x@dest.test"], message("a@late.test"))
    r.mx.wait_for_messages(1)
    removed = ctl(r.config_path, "user", "del", "late")
    assert removed.returncode == 0
    with pytest.raises(smtplib.SMTPAuthenticationError):
        login(r, user="late", password="another password")


def test_untrusted_client_may_relay_only_after_auth(submission):
    r = submission()
    with smtplib.SMTP("127.0.0.1", r.ports["relay"], source_address=("127.0.0.8", 0)) as client:
        client.ehlo("outsider.test")
        client.mail("news@example.test")
        code, text = client.rcpt("x@dest.test")
        assert (code, text[:5]) == (554, b"5.7.1")
        client.rset()
        client.starttls(context=client_tls())
        client.ehlo("outsider.test")
        client.login("app1", PASSWORD)
        client.sendmail("news@example.test", ["x@dest.test"], message())
    r.mx.wait_for_messages(1)


def test_tls_minimum_version_enforced(submission):
    r = submission(tls={"min_version": "1.3"})
    ctx = client_tls()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        smtplib.SMTP_SSL("127.0.0.1", r.ports["smtps"], context=ctx, timeout=10)
    with login(r, "smtps") as client:
        assert client.sock.version() == "TLSv1.3"


def test_certificate_reloaded_on_sighup_without_dropping_sessions(submission, tmp_path):
    r = submission()
    before = ssl.DER_cert_to_PEM_cert(_peer_cert(r))
    open_session = login(r)
    new_crt, new_key = self_signed(tmp_path / "tls2", "relay2.test")
    r.crt.write_bytes(new_crt.read_bytes())
    r.key.write_bytes(new_key.read_bytes())
    r.signal(signal.SIGHUP)
    r.wait_event("reloaded")
    after = ssl.DER_cert_to_PEM_cert(_peer_cert(r))
    assert before != after and after == new_crt.read_text()
    open_session.sendmail("news@example.test", ["x@dest.test"], message())
    open_session.quit()
    wait_until(lambda: r.mx.messages, 10, "delivery through the session opened before reload")


def _peer_cert(r) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", r.ports["smtps"]), timeout=5) as raw,
        client_tls().wrap_socket(raw) as tls,
    ):
        return tls.getpeercert(binary_form=True)


def test_show_displays_the_login_that_submitted(submission):
    r = submission()
    r.mx.rcpt_reply = "451 4.3.0 later"
    with login(r) as client:
        client.sendmail("news@example.test", ["x@dest.test"], message())
    queue_id = r.wait_event("deferred")[0]["queue_id"]
    shown = ctl(r.config_path, "show", queue_id)
    assert "auth:app1" in shown.stdout


def test_open_relay_matrix(submission):
    """Every combination of client address, login and recipient: only a trusted client, or a
    login sending as its own domain, gets anything queued."""
    r = submission(auth={"max_failures": 100, "failure_delay": "0s"})
    assert ctl(r.config_path, "user", "set", "app1", "--rate", "").returncode == 0
    wrong = []
    queued = 0
    for listener in ("relay", "submission"):
        for client_ip in ("127.0.0.1", "127.0.0.9"):
            for auth in ("none", "failed", "own", "foreign"):
                for rcpt in ("colleague@example.test", "x@dest.test"):
                    allowed = auth == "own" or (
                        listener == "relay" and client_ip == "127.0.0.1" and auth != "foreign"
                    )
                    got = _attempt(r, listener, client_ip, auth, rcpt)
                    queued += got
                    if got != allowed:
                        wrong.append((listener, client_ip, auth, rcpt, got))
    assert wrong == [], wrong
    r.wait_event("accepted", n=12)
    # DSNs for what bounced come in through the same door, with an origin of their own
    clients = [e for e in r.events("accepted") if not e["origin"].startswith("dsn:")]
    assert queued == len(clients) == 12


def _attempt(r, listener: str, client_ip: str, auth: str, rcpt: str) -> bool:
    """One session; True when relayd answered 250 to DATA (the message was queued)."""
    sender = "ceo@bank.test" if auth == "foreign" else "news@example.test"
    with smtplib.SMTP("127.0.0.1", r.ports[listener], source_address=(client_ip, 0)) as c:
        c.starttls(context=client_tls())
        c.ehlo("matrix.test")
        if auth != "none":
            c.user, c.password = "app1", PASSWORD if auth != "failed" else "nope nope"
            with contextlib.suppress(smtplib.SMTPAuthenticationError):
                c.auth("PLAIN", c.auth_plain)
        if c.docmd(f"MAIL FROM:<{sender}>")[0] != 250:
            return False
        if c.docmd(f"RCPT TO:<{rcpt}>")[0] != 250:
            return False
        return c.data(message(sender, rcpt))[0] == 250


def test_passwd_replaces_the_password_without_restart(submission):
    r = submission()
    changed = ctl(r.config_path, "user", "passwd", "app1", stdin="a brand new secret\n")
    assert changed.returncode == 0, changed.stderr
    with pytest.raises(smtplib.SMTPAuthenticationError):
        login(r)
    with login(r, password="a brand new secret") as client:
        client.sendmail("news@example.test", ["x@dest.test"], message())
    r.mx.wait_for_messages(1)
    listed = json.loads(ctl(r.config_path, "--json", "user", "list").stdout)
    assert listed["users"] == [
        {
            "name": "app1",
            "senders": ["example.test", "ceo@corp.test"],
            "rate": "3/hour",
            "max_recipients": 2,
            "networks": [],
            "stream": "transactional",
        }
    ]
    assert "scrypt$" in (r.workdir / "users.json").read_text()
    assert (r.workdir / "users.json").stat().st_mode & 0o777 == 0o600
