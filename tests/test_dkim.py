"""DKIM signing: every signature is checked by independent verifiers (dkimpy, and OpenDKIM when
installed), keys are published through a zone-file line parsed by dnspython and served over
real DNS, and key problems surface as ConfigError at load time."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shutil
import smtplib
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import dkim
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.zone
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from support.dnsserver import TestDNSServer

from relayd.config import DKIM_HEADERS, ConfigError, Dkim, DkimKey
from relayd.mime.dkim import Signer, keygen

CONFIG = Path("/etc/relayd/relayd.toml")  # only named in errors; never read
NOW = 1_767_225_600  # 2026-01-01T00:00:00Z
MESSAGE = (
    b"Received: from app1 ([10.0.0.5])\r\n\tby relay.example.com (relayd) with ESMTP id 1;\r\n"
    b"\tThu, 1 Jan 2026 00:00:00 +0000\r\n"
    b"From: Joe Sender <joe@example.com>\r\n"
    b"To: Ann <ann@example.org>, bob@example.net\r\n"
    b"Subject:  Quarterly   report,\r\n \tfolded  \r\n"
    b"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello  Ann,\t\r\n"
    b"  indented line with trailing space \r\n"
    b"\r\n"
    b"-- \r\n"
    b"Joe\r\n"
    b"\r\n"
    b"\r\n"
)

nacl_required = pytest.mark.skipif(
    importlib.util.find_spec("nacl") is None,
    reason="dkimpy verifies ed25519-sha256 only with PyNaCl installed",
)


def txt_value(zone_line: str) -> tuple[str, bytes]:
    """Owner name and TXT value of keygen's zone line, read by dnspython's zone-file parser."""
    text = f"$TTL 3600\n{zone_line}\n"  # a zone file's default TTL covers the TTL-less line
    zone = dns.zone.from_text(text, origin=".", relativize=False, check_origin=False)
    ((name, node),) = zone.nodes.items()
    rdataset = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.TXT)
    assert rdataset is not None and len(rdataset) == 1
    strings = rdataset[0].strings
    assert all(len(s) <= 255 for s in strings)
    return name.to_text(), b"".join(strings)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[DkimKey, str]]:
    """RSA and Ed25519 keys for example.com: the config entry and the TXT record to publish."""
    made = {}
    for i, (selector, algorithm) in enumerate([("rsa1", "rsa"), ("ed1", "ed25519")]):
        path, line = keygen("example.com", selector, algorithm, tmp_path)
        cfg = DkimKey("example.com", selector, f"{algorithm}-sha256", path, f"dkim.keys[{i}]")
        made[algorithm] = (cfg, line)
    return made


def signer(*keys: DkimKey, default: str = "", parent: bool = True) -> Signer:
    return Signer(Dkim(tuple(keys), default, parent, DKIM_HEADERS), CONFIG)


def dnsfunc_for(*lines: str) -> Callable[..., bytes | None]:
    """dkimpy dnsfunc answering from keygen zone lines."""
    records = {}
    for line in lines:
        name, value = txt_value(line)
        records[name.encode()] = value
    return lambda name, timeout=5: records.get(name)


def signatures(message: bytes) -> list[dict[str, str]]:
    """Tags of each DKIM-Signature field, whitespace removed, top one first."""
    fields = re.findall(rb"(?im)^DKIM-Signature:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", message)
    result = []
    for field in fields:
        value = re.sub(r"\s+", "", field.decode())
        result.append(dict(t.split("=", 1) for t in value.split(";") if t))
    return result


def sig_lines(signed: bytes, message: bytes) -> list[bytes]:
    """Lines of the signature fields sign() prepended to message."""
    assert signed.endswith(message)
    head = signed[: len(signed) - len(message)]
    assert head.endswith(b"\r\n") and b"\n" not in head.replace(b"\r\n", b"")
    return head.split(b"\r\n")[:-1]


def test_rsa_signature_verifies_with_dkimpy(keys: dict[str, tuple[DkimKey, str]]) -> None:
    key, line = keys["rsa"]
    signed = signer(key).sign(MESSAGE, now=NOW)
    assert signed.endswith(MESSAGE)
    assert dkim.verify(signed, dnsfunc=dnsfunc_for(line))
    (tags,) = signatures(signed)
    assert tags["a"] == "rsa-sha256" and tags["c"] == "relaxed/relaxed"
    assert (tags["d"], tags["s"], tags["t"]) == ("example.com", "rsa1", str(NOW))
    assert "l" not in tags and "x" not in tags
    assert all(len(line) <= 78 for line in sig_lines(signed, MESSAGE))


@nacl_required
def test_ed25519_signature_verifies_with_dkimpy(keys: dict[str, tuple[DkimKey, str]]) -> None:
    key, line = keys["ed25519"]
    signed = signer(key).sign(MESSAGE, now=NOW)
    assert dkim.verify(signed, dnsfunc=dnsfunc_for(line))
    (tags,) = signatures(signed)
    assert (tags["a"], tags["s"]) == ("ed25519-sha256", "ed1")
    assert len(base64.b64decode(tags["b"])) == 64
    assert all(len(line) <= 78 for line in sig_lines(signed, MESSAGE))


@nacl_required
def test_dual_signing_adds_one_verifiable_signature_per_key(
    keys: dict[str, tuple[DkimKey, str]],
) -> None:
    (rsa_key, rsa_line), (ed_key, ed_line) = keys["rsa"], keys["ed25519"]
    signed = signer(rsa_key, ed_key).sign(MESSAGE, now=NOW)
    assert [t["a"] for t in signatures(signed)] == ["rsa-sha256", "ed25519-sha256"]
    dnsfunc = dnsfunc_for(rsa_line, ed_line)
    verifier = dkim.DKIM(signed)
    assert verifier.verify(idx=0, dnsfunc=dnsfunc)
    assert verifier.verify(idx=1, dnsfunc=dnsfunc)


@nacl_required
def test_published_records_verify_over_real_dns(keys: dict[str, tuple[DkimKey, str]]) -> None:
    """The zone lines keygen prints, served by a DNS server, are what verifiers need."""
    (rsa_key, rsa_line), (ed_key, ed_line) = keys["rsa"], keys["ed25519"]
    signed = signer(rsa_key, ed_key).sign(MESSAGE, now=NOW)
    with TestDNSServer() as server:
        for line in (rsa_line, ed_line):
            name, value = txt_value(line)
            server.add(name, "TXT", value.decode())
        resolver = dns.resolver.Resolver(configure=False)
        resolver.port = server.port
        resolver.nameservers = [server.host]
        resolver.lifetime = 5

        def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
            answer = resolver.resolve(name.decode(), "TXT")
            return b"".join(s for rdata in answer for s in rdata.strings)

        verifier = dkim.DKIM(signed)
        assert verifier.verify(idx=0, dnsfunc=dnsfunc)
        assert verifier.verify(idx=1, dnsfunc=dnsfunc)
        queried = {name for name, _ in server.queries}
    assert queried == {"rsa1._domainkey.example.com", "ed1._domainkey.example.com"}


_OPENDKIM_RUNNER = """
import json, subprocess, sys
from support.dnsserver import TestDNSServer
resolv, records, messages = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["mount", "--bind", resolv, "/etc/resolv.conf"], check=True)
with TestDNSServer("127.0.0.1", 53) as server:
    for name, value in records.items():
        server.add(name, "TXT", value)
    results = []
    for path in messages:
        with open(path, "rb") as f:
            p = subprocess.run(["opendkim-testmsg"], stdin=f, capture_output=True, text=True)
        results.append([p.returncode, p.stderr.strip()])
    print(json.dumps({"results": results, "queries": server.queries}))
"""


def test_opendkim_verifies(keys: dict[str, tuple[DkimKey, str]], tmp_path: Path) -> None:
    """OpenDKIM's verifier, resolving through the test DNS server.

    opendkim-testmsg uses the system resolver (port 53 from /etc/resolv.conf), so it runs in
    private mount and network namespaces where resolv.conf names a test server on 127.0.0.1:53:
    the host's configuration is never touched.
    """
    if not shutil.which("opendkim-testmsg") or not shutil.which("unshare"):
        pytest.skip("opendkim-testmsg (Debian opendkim-tools) or unshare not installed")
    if not shutil.which("ip"):
        pytest.skip("ip (iproute2) needed to bring up loopback in the namespace")
    unshare = ["unshare", "--mount", "--net"] + (["--map-root-user"] if os.geteuid() else [])
    if subprocess.run([*unshare, "true"], capture_output=True).returncode:
        pytest.skip("cannot create mount+network namespaces here")
    (rsa_key, rsa_line), (ed_key, ed_line) = keys["rsa"], keys["ed25519"]
    messages = {
        "rsa": signer(rsa_key).sign(MESSAGE),
        "ed25519": signer(ed_key).sign(MESSAGE),
        "dual": signer(rsa_key, ed_key).sign(MESSAGE),
        "tampered": signer(rsa_key).sign(MESSAGE).replace(b"Joe Sender", b"Eve Sender"),
    }
    paths = []
    for name, message in messages.items():
        paths.append(tmp_path / f"{name}.eml")
        paths[-1].write_bytes(message)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:1\n")
    records = {name: value.decode() for name, value in map(txt_value, (rsa_line, ed_line))}
    tests_dir = str(Path(__file__).resolve().parent)
    proc = subprocess.run(
        [*unshare, sys.executable, "-c", _OPENDKIM_RUNNER, str(resolv), json.dumps(records)]
        + [str(p) for p in paths],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": tests_dir},
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    results = dict(zip(messages, report["results"], strict=True))
    assert results["rsa"] == [0, ""]
    assert results["ed25519"] == [0, ""]
    assert results["dual"] == [0, ""]
    assert results["tampered"][0] != 0 and "Bad signature" in results["tampered"][1]
    assert {name for name, _ in report["queries"]} == {
        "rsa1._domainkey.example.com",
        "ed1._domainkey.example.com",
    }


def test_signed_headers_are_the_present_ones_with_from_oversigned(
    keys: dict[str, tuple[DkimKey, str]],
) -> None:
    key, line = keys["rsa"]
    message = MESSAGE.replace(
        b"MIME-Version: 1.0\r\n", b"Reply-To: a@x.org\r\nReply-To: b@x.org\r\n"
    )
    signed = signer(key).sign(message, now=NOW)
    (tags,) = signatures(signed)
    assert tags["h"].split(":") == [
        "from",
        "from",
        "reply-to",
        "reply-to",
        "subject",
        "date",
        "to",
        "message-id",
        "content-type",
    ]
    assert dkim.verify(signed, dnsfunc=dnsfunc_for(line))


def test_every_configured_header_present_still_folds_within_78_columns(
    keys: dict[str, tuple[DkimKey, str]],
) -> None:
    key, line = keys["rsa"]
    head = b"".join(f"{h}: value of {h}\r\n".encode() for h in DKIM_HEADERS if h != "From")
    message = b"From: joe@example.com\r\n" + head + b"\r\nHello\r\n"
    signed = signer(key).sign(message, now=NOW)
    (tags,) = signatures(signed)
    assert tags["h"].split(":") == ["from"] + [h.lower() for h in DKIM_HEADERS]
    assert all(len(line) <= 78 for line in sig_lines(signed, message))
    assert dkim.verify(signed, dnsfunc=dnsfunc_for(line))


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(
            lambda m: m.replace(b"From: Joe Sender", b"From: Joe Sendr"), id="from-edited"
        ),
        pytest.param(
            lambda m: m.replace(b"Received:", b"From: eve@example.com\r\nReceived:", 1),
            id="from-added-above",
        ),
        pytest.param(
            lambda m: m.replace(b"\r\n\r\n", b"\r\nFrom: eve@example.com\r\n\r\n", 1),
            id="from-added-below",
        ),
        pytest.param(lambda m: m.replace(b"Ann,", b"Anne,"), id="body-edited"),
    ],
)
def test_tampering_breaks_the_signature(
    keys: dict[str, tuple[DkimKey, str]], tamper: Callable[[bytes], bytes]
) -> None:
    """dkimpy (like OpenDKIM) also rejects an extra From by itself, so From oversigning is
    pinned down by the h= assertions above; this checks the end result."""
    key, line = keys["rsa"]
    signed = signer(key).sign(MESSAGE, now=NOW)
    tampered = tamper(signed)
    assert tampered != signed
    assert not dkim.verify(tampered, dnsfunc=dnsfunc_for(line))


def test_unsigned_headers_added_later_do_not_break_it(keys: dict[str, tuple[DkimKey, str]]) -> None:
    key, line = keys["rsa"]
    signed = signer(key).sign(MESSAGE, now=NOW)
    relayed = b"Received: from relay.example.com by mx.example.org; now\r\n" + signed
    relayed = relayed.replace(b"\r\n\r\n", b"\r\nX-Spam-Score: 0\r\nCc: added@x.org\r\n\r\n", 1)
    assert dkim.verify(relayed, dnsfunc=dnsfunc_for(line))


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\r\n",
        b"\r\n\r\n\r\n",
        b" \t \r\n\t\r\n",
        b"x\r\n",
        b"\tlead  and trail \t\r\n\r\nmiddle\t \tgap\r\n \r\n",
        b"no final newline",
        b"runs" + b" " * 33 + b"of" + b" " * 16 + b"\t" * 5 + b"spaces " * 300 + b"  \r\n",
    ],
)
def test_body_canonicalization_edge_cases(
    keys: dict[str, tuple[DkimKey, str]], body: bytes
) -> None:
    key, line = keys["rsa"]
    head = MESSAGE[: MESSAGE.index(b"\r\n\r\n") + 4]
    signed = signer(key).sign(head + body, now=NOW)
    if not signed.endswith(b"\r\n"):
        signed += b"\r\n"  # SMTP DATA always ends the body with CRLF on the wire
    assert dkim.verify(signed, dnsfunc=dnsfunc_for(line))


def test_headers_only_message(keys: dict[str, tuple[DkimKey, str]]) -> None:
    key, line = keys["rsa"]
    signed = signer(key).sign(b"From: joe@example.com\r\nSubject: ping\r\n", now=NOW)
    assert dkim.verify(signed + b"\r\n", dnsfunc=dnsfunc_for(line))


def _key_for(domain: str, tmp_path: Path, index: int = 0) -> tuple[DkimKey, str]:
    path, line = keygen(domain, "s1", "rsa", tmp_path)
    return DkimKey(domain, "s1", "rsa-sha256", path, f"dkim.keys[{index}]"), line


def _from(address: bytes) -> bytes:
    return MESSAGE.replace(b"Joe Sender <joe@example.com>", address)


def test_parent_domain_keys_sign_subdomain_mail(tmp_path: Path) -> None:
    key, line = _key_for("example.com", tmp_path)
    message = _from(b"Joe <joe@mail.eu.Example.COM>")
    s = signer(key)
    assert s.domain_for(message) == "example.com"
    signed = s.sign(message, now=NOW)
    assert signatures(signed)[0]["d"] == "example.com"
    assert dkim.verify(signed, dnsfunc=dnsfunc_for(line))
    assert signer(key, parent=False).sign(message) == message


def test_own_keys_win_over_parent_and_default(tmp_path: Path) -> None:
    parent, _ = _key_for("example.com", tmp_path)
    own, line = _key_for("eu.example.com", tmp_path, 1)
    signed = signer(parent, own, default="example.com").sign(_from(b"<joe@eu.example.com>"))
    assert [t["d"] for t in signatures(signed)] == ["eu.example.com"]
    assert dkim.verify(signed, dnsfunc=dnsfunc_for(line))


def test_default_domain_signs_everything_else(tmp_path: Path) -> None:
    key, line = _key_for("relay.example.net", tmp_path)
    message = _from(b"shop@customer.org")
    assert signer(key).sign(message) == message
    s = signer(key, default="relay.example.net")
    assert s.domain_for(message) == "relay.example.net"
    signed = s.sign(message, now=NOW)
    assert signatures(signed)[0]["d"] == "relay.example.net"
    assert dkim.verify(signed, dnsfunc=dnsfunc_for(line))


@pytest.mark.parametrize(
    "from_value",
    [
        b"joe@example.org",
        b"Joe <joe@sub.example.org>",
        b"undisclosed-recipients:;",
        b"not an address",
        b"<@example.com>",
    ],
)
def test_no_applicable_key_leaves_message_unchanged(tmp_path: Path, from_value: bytes) -> None:
    key, _ = _key_for("example.com", tmp_path)
    message = _from(from_value)
    s = signer(key)
    assert s.domain_for(message) is None
    assert s.sign(message) == message


def test_no_from_field_leaves_message_unchanged(tmp_path: Path) -> None:
    key, _ = _key_for("example.com", tmp_path)
    message = MESSAGE.replace(b"From: Joe Sender <joe@example.com>\r\n", b"")
    assert signer(key, default="example.com").sign(message) == message


def test_first_mailbox_of_a_from_list_chooses_the_domain(tmp_path: Path) -> None:
    key, line = _key_for("example.com", tmp_path)
    message = _from(b'"Smith, <x@other.org>" <joe@example.com>, ann@other.org')
    signed = signer(key).sign(message, now=NOW)
    assert signatures(signed)[0]["d"] == "example.com"
    assert dkim.verify(signed, dnsfunc=dnsfunc_for(line))
    other_first = _from(b"ann@other.org, joe@example.com")
    assert signer(key).sign(other_first) == other_first


def test_internationalized_from_domain_matches_its_a_label(tmp_path: Path) -> None:
    key, _ = _key_for("xn--bcher-kva.example", tmp_path)
    message = _from("Jörg <jörg@bücher.example>".encode())
    assert signer(key).domain_for(message) == "xn--bcher-kva.example"


def _write_key(path: Path, private: PrivateKeyTypes) -> Path:
    """PEM as other tools write it: PKCS#1 for RSA (openssl genrsa), PKCS#8 for the rest."""
    rsa_key = isinstance(private, rsa.RSAPrivateKey)
    fmt = (
        serialization.PrivateFormat.TraditionalOpenSSL
        if rsa_key
        else serialization.PrivateFormat.PKCS8
    )
    path.write_bytes(
        private.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    )
    return path


@pytest.mark.parametrize(
    ("algorithm", "content", "problem"),
    [
        ("rsa-sha256", None, "cannot read"),
        ("rsa-sha256", b"-----BEGIN PRIVATE KEY-----\ngarbage\n", "not a PEM private key"),
        ("rsa-sha256", b"", "not a PEM private key"),
        ("rsa-sha256", "ed25519", "holds an Ed25519 key, but algorithm rsa-sha256 needs an RSA"),
        ("ed25519-sha256", "rsa2048", "holds an RSA key, but algorithm ed25519-sha256 needs an Ed"),
        ("rsa-sha256", "rsa1024", "is a 1024-bit RSA key; at least 2048 bits are required"),
        ("rsa-sha256", "encrypted", "is encrypted"),
        ("ed25519-sha256", "ec", "holds an unsupported (EC) key"),
    ],
)
def test_key_problems_are_config_errors(
    tmp_path: Path, algorithm: str, content: bytes | str | None, problem: str
) -> None:
    path = tmp_path / "dkim.key"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "ed25519":
        _write_key(path, ed25519.Ed25519PrivateKey.generate())
    elif content in ("rsa2048", "rsa1024"):
        _write_key(path, rsa.generate_private_key(65537, int(content[3:])))
    elif content == "ec":
        _write_key(path, ec.generate_private_key(ec.SECP256R1()))
    elif content == "encrypted":
        path.write_bytes(
            ed25519.Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
    good, _ = _key_for("example.org", tmp_path)
    bad = DkimKey("example.com", "s1", algorithm, path, "dkim.keys[1]")
    with pytest.raises(ConfigError) as exc:
        signer(good, bad)
    assert (exc.value.path, exc.value.key) == (str(CONFIG), "dkim.keys[1].key_file")
    assert problem in exc.value.problem and str(path) in exc.value.problem


def test_header_names_that_would_corrupt_h_are_config_errors(tmp_path: Path) -> None:
    key, _ = _key_for("example.com", tmp_path)
    with pytest.raises(ConfigError) as exc:
        Signer(Dkim((key,), "", True, ("From", "X-Bad:Name")), CONFIG)
    assert exc.value.key == "dkim.headers" and "X-Bad:Name" in exc.value.problem


def test_pkcs1_rsa_keys_load(tmp_path: Path) -> None:
    """Keys made by opendkim-genkey / `openssl genrsa` are PKCS#1, not PKCS#8."""
    path = _write_key(tmp_path / "k.pem", rsa.generate_private_key(65537, 2048))
    assert path.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    s = signer(DkimKey("example.com", "s1", "rsa-sha256", path, "dkim.keys[0]"))
    assert s.domain_for(MESSAGE) == "example.com"


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_keygen_writes_a_private_key_and_a_publishable_record(
    tmp_path: Path, algorithm: str
) -> None:
    path, line = keygen("Example.COM", "sel-2026", algorithm, tmp_path)
    assert path == tmp_path / "example.com.sel-2026.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert line.startswith("sel-2026._domainkey.example.com. IN TXT ( ")
    name, value = txt_value(line)
    assert name == "sel-2026._domainkey.example.com."
    tags = dict(t.strip().split("=", 1) for t in value.decode().split(";"))
    assert tags["v"] == "DKIM1" and tags["k"] == algorithm
    public = base64.b64decode(tags["p"])
    if algorithm == "rsa":
        assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 2048
        assert public == private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        assert isinstance(private, ed25519.Ed25519PrivateKey)
        assert public == private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    path, _ = keygen("example.com", "s1", "ed25519", tmp_path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        keygen("example.com", "s1", "rsa", tmp_path)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("domain", "selector", "algorithm"),
    [("../etc", "s1", "rsa"), ("example.com", "../s1", "rsa"), ("example.com", "s1", "dsa")],
)
def test_keygen_rejects_bad_arguments(
    tmp_path: Path, domain: str, selector: str, algorithm: str
) -> None:
    with pytest.raises(ValueError):
        keygen(domain, selector, algorithm, tmp_path)
    assert list(tmp_path.iterdir()) == []


@nacl_required
def test_relayd_signs_once_and_delivers_verifiable_mail(relay, dns_server, fake_mx, tmp_path):
    """Through the daemon: keys made by relayctl, records served by the test DNS, signed at
    acceptance (a deferred first attempt does not sign again), verified as delivered."""
    keydir = tmp_path / "dkim"
    lines = []
    for selector, algorithm in (("rsa1", "rsa"), ("ed1", "ed25519")):
        made = subprocess.run(
            [
                sys.executable,
                "-m",
                "relayd.ctl",
                "--json",
                "dkim",
                "keygen",
                "example.com",
                selector,
                "--algorithm",
                algorithm,
                "--out-dir",
                str(keydir),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        lines.append(json.loads(made.stdout)["dns_record"])
        name, value = txt_value(lines[-1])
        dns_server.add(name, "TXT", value.decode())
    dns_server.add("dest.test", "MX", "10 mx.dest.test")
    dns_server.add("mx.dest.test", "A", "127.0.0.10")
    mx = fake_mx("127.0.0.10")
    mx.data_replies.append("451 4.3.0 try again")
    keys_cfg = [
        {
            "domain": "example.com",
            "selector": sel,
            "algorithm": alg,
            "key_file": str(keydir / f"example.com.{sel}.key"),
        }
        for sel, alg in (("rsa1", "rsa-sha256"), ("ed1", "ed25519-sha256"))
    ]
    r = relay({"dkim": {"keys": keys_cfg}})
    with smtplib.SMTP("127.0.0.1", r.port) as client:
        client.sendmail("app@example.com", ["x@dest.test"], MESSAGE)
    r.wait_event("deferred")
    delivered = mx.wait_for_messages(1, timeout=15)[0].data
    assert len(signatures(delivered)) == 2
    resolver = dns.resolver.Resolver(configure=False)
    resolver.port = dns_server.port
    resolver.nameservers = [dns_server.host]

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        answer = resolver.resolve(name.decode(), "TXT")
        return b"".join(s for rdata in answer for s in rdata.strings)

    verifier = dkim.DKIM(delivered)
    assert verifier.verify(idx=0, dnsfunc=dnsfunc) and verifier.verify(idx=1, dnsfunc=dnsfunc)


def test_relayd_refuses_to_start_with_an_unreadable_key(tmp_path):
    key = tmp_path / "missing.key"
    config = tmp_path / "relayd.toml"
    config.write_text(
        '[server]\nspool_path = "spool.sqlite"\n'
        f'[[dkim.keys]]\ndomain = "example.com"\nselector = "s1"\nkey_file = "{key}"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "relayd", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 78
    assert "dkim.keys[0].key_file" in result.stderr and str(key) in result.stderr
    key.write_text("not a key\n")
    result = subprocess.run(
        [sys.executable, "-m", "relayd", "--check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 78 and "dkim.keys[0].key_file" in result.stderr
