"""Seeded fuzz: a few thousand random and mutated SMTP sessions against one relayd process.

Sessions are generated up front from one seed (so a failure replays), then run 16 at a time over
loopback. Afterwards: relayd is alive and still serves a clean session, every fully valid message
arrived intact, every "queued as" reply is accounted for (spool or fake MX), the spool holds only
well-formed messages, every reply was well-formed, and the log holds no crash.
"""

from __future__ import annotations

import random
import re
import smtplib
import socket
import sqlite3
import struct
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import EmailMessage

from support.util import wait_until

SEED = 1234
SESSIONS = 2400  # random and mutated
VALID_EVERY = 50  # one fully valid session in every 50: 48 of them
WORKERS = 16
OP_TIMEOUT = 5.0  # each socket operation
SESSION_DEADLINE = 10.0  # relayd closes idle sessions after 2 s; a session open longer hangs

TERMINATOR = b"\r\n.\r\nQUIT\r\n"  # ends DATA if in it, then QUIT: relayd always closes
QUEUED = re.compile(rb"^250 2\.0\.0 Ok: queued as (\S+)\r$", re.M)
REPLY_LINE = re.compile(rb"^\d{3}[ -]")
ENHANCED = re.compile(rb"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
# Replies RFC 2034 exempts from enhanced codes (greeting, EHLO/HELO) and non-final ones.
EXEMPT = re.compile(
    rb"^(220 relay\.test |250-|250 relay\.test$|250 ENHANCEDSTATUSCODES$|354 |334 )"
)
RECEIVED_ID = re.compile(rb"\(relayd\) with \w+ id (\S+);")

VERBS = [b"EHLO", b"HELO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"QUIT", b"VRFY"]
VERBS += [b"EXPN", b"HELP", b"STARTTLS", b"AUTH", b"BDAT", b"ETRN", b"XCLIENT", b"LHLO"]
EXTRA = [
    b"STARTTLS",
    b"AUTH PLAIN AGEAYg==",
    b"AUTH LOGIN",
    b"BDAT 10 LAST",
    b"MAIL FROM:<>",
    b"MAIL FROM:<a@sender.test> SIZE=99999999999",
    b"MAIL FROM:<a@sender.test> BODY=8BITMIME SMTPUTF8",
    b"MAIL FROM:<@route.test:a@sender.test>",
    b"MAIL FROM:a@sender.test",
    b"RCPT TO:<postmaster>",
    b'RCPT TO:<"quoted local"@example.test>',
    b"RCPT TO:<x@[127.0.0.1]>",
    b"RCPT TO:<x@[IPv6:::1]>",
    b"RCPT TO:<j\xc3\xb6hn@example.test>",
    b"RCPT TO:<x@example.test> NOTIFY=SUCCESS ORCPT=rfc822;x@example.test",
    b"DATA",
    b".",
    b"..",
    b"",
    b" ",
    b"RSET",
    b"NOOP",
    b"EHLO",
    b"HELO",
    b"EHLO \xff\xfe",
    b"QUIT extra",
]
INSERTS = [b"\x00", b"\xff", b"\x80", b"\r", b"\n", b"\n.\n", b"\r.\r", b"\r\n.\r", b"\x1b", b"\t"]
INSERTS += [b"\xc3\xa9", b"\r\n", b"\n.\r\n", b"\r.\r\n", b"<", b">", b":", b"@"]


@dataclass
class Spec:
    """One generated session: bytes to send in chunks, and how to end it."""

    kind: str
    chunks: list[bytes]
    ending: str  # "read": read replies until relayd closes; "close"; "reset" (RST)
    # fully valid sessions: (token, recipients, content) per transaction
    expect: list[tuple[str, list[str], bytes]] = field(default_factory=list)


@dataclass
class Outcome:
    spec: Spec
    received: bytes = b""
    hung: bool = False
    reset: bool = False
    refused_connect: str = ""


# -- generation -------------------------------------------------------------------------------


def text_line(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.1:
        return b""
    if kind < 0.2:
        return b"." + rng.choice([b"", b".", b"leading dot", b"x"])
    if kind < 0.3:
        return "ünïcødé line €".encode()
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;-_=!?<>"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120))).encode()


def message(rng: random.Random, token: str, rcpts: list[str]) -> list[bytes]:
    """Message text lines (not dot-stuffed), headers and body."""
    lines = [
        b"From: app@sender.test",
        b"To: " + ", ".join(rcpts).encode(),
        f"Subject: fuzz {token}".encode(),
    ]
    if rng.random() < 0.5:
        lines.append(b"MIME-Version: 1.0")
        lines.append(b"Content-Type: text/plain; charset=utf-8")
    lines.append(b"")
    lines += [text_line(rng) for _ in range(rng.randint(0, 12))]
    return lines


def stuffed(lines: list[bytes]) -> list[bytes]:
    return [b"." + x if x.startswith(b".") else x for x in lines]


def template(rng: random.Random, token: str) -> tuple[list[bytes], list]:
    """A valid session as command/text lines, and what each transaction should deliver."""
    lines = [rng.choice([b"EHLO fuzz.test", b"ehlo fuzz.test", b"EhLo [127.0.0.1]"])]
    expect = []
    for t in range(rng.choice([1, 1, 1, 2])):
        rcpts = [f"r{i}.{token}@example.test" for i in range(rng.randint(1, 3))]
        lines.append(
            b"MAIL FROM:<app@sender.test>" + rng.choice([b"", b" BODY=8BITMIME", b" SIZE=5000"])
        )
        lines += [f"RCPT TO:<{r}>".encode() for r in rcpts]
        lines.append(b"DATA")
        text = message(rng, f"{token}-{t}", rcpts)
        lines += [*stuffed(text), b"."]
        expect.append((f"{token}-{t}", rcpts, b"".join(x + b"\r\n" for x in text)))
        if rng.random() < 0.3:
            lines.append(rng.choice([b"RSET", b"NOOP"]))
    lines.append(b"QUIT")
    return lines, expect


def mutate(rng: random.Random, lines: list[bytes]) -> bytes:
    lines = list(lines)
    joins = [b"\r\n"] * len(lines)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(lines))
        op = rng.randrange(10)
        if op == 0:  # truncate the session
            del lines[i + 1 :], joins[i + 1 :]
        elif op == 1:  # duplicate a line
            lines.insert(i, lines[i])
            joins.insert(i, b"\r\n")
        elif op == 2 and len(lines) > 1:  # drop a line
            del lines[i], joins[i]
        elif op == 3:  # swap two lines
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 4:  # an out-of-place or odd command
            lines.insert(i, rng.choice(EXTRA))
            joins.insert(i, b"\r\n")
        elif op == 5:  # random case
            lines[i] = bytes(
                c ^ 0x20 if 65 <= (c & ~0x20) <= 90 and rng.random() < 0.5 else c for c in lines[i]
            )
        elif op == 6:  # a very long argument
            verb = lines[i].split(b" ", 1)[0] or rng.choice(VERBS)
            lines[i] = verb + b" " + b"x" * rng.choice([100, 513, 1000, 2000, 70_000])
        elif op == 7:  # NUL, 8-bit, bare CR/LF, fake end of data...
            pos = rng.randint(0, len(lines[i]))
            lines[i] = lines[i][:pos] + rng.choice(INSERTS) + lines[i][pos:]
        elif op == 8:  # lose the CRLF, or half of it
            joins[i] = rng.choice([b"", b"\r", b"\n", b"\n\r"])
        else:  # flip a byte
            if lines[i]:
                pos = rng.randrange(len(lines[i]))
                flipped = lines[i][pos] ^ (1 << rng.randrange(8))
                lines[i] = lines[i][:pos] + bytes([flipped]) + lines[i][pos + 1 :]
    return b"".join(x + j for x, j in zip(lines, joins, strict=True))


def random_bytes(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    n = rng.randint(1, 3000)
    if kind == 0:
        data = rng.randbytes(n)
    elif kind == 1:  # printable noise with line breaks of every sort
        data = b"".join(
            rng.choice([bytes([rng.randint(32, 126)]), b"\r\n", b"\n", b"\r"]) for _ in range(n)
        )
    elif kind == 2:  # plausible commands with random arguments
        data = b"".join(
            rng.choice(VERBS)
            + b" "
            + rng.randbytes(rng.randint(0, 40)).replace(b"\n", b"")
            + b"\r\n"
            for _ in range(rng.randint(1, 30))
        )
    else:  # greeting first, then garbage
        data = b"EHLO fuzz.test\r\n" + rng.randbytes(n)
    return data


def split(rng: random.Random, data: bytes) -> list[bytes]:
    mode = rng.random()
    if mode < 0.5 or len(data) < 2:  # pipeline everything in one write
        return [data]
    if mode < 0.8:  # random chunks
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 30))))
        return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return [x for x in data.splitlines(keepends=True)]  # line by line


def generate(rng: random.Random) -> list[Spec]:
    specs = []
    for n in range(SESSIONS):
        token = f"s{n}"
        if n % VALID_EVERY == 0:
            lines, expect = template(rng, token)
            data = b"".join(x + b"\r\n" for x in lines)
            kind = "valid-smtplib" if n % (2 * VALID_EVERY) == 0 else "valid-raw"
            chunks = split(rng, data) if kind == "valid-raw" else []
            specs.append(Spec(kind, chunks, "read", expect))
            continue
        roll = rng.random()
        if roll < 0.25:
            kind, data = "random", random_bytes(rng)
        elif roll < 0.35:  # close in the middle of DATA
            lines, _ = template(rng, token)
            data = b"".join(x + b"\r\n" for x in lines)
            start = data.index(b"DATA\r\n") + 6
            kind, data = "mid-data", data[: rng.randint(start, len(data) - 8)]
        else:
            lines, _ = template(rng, token)
            kind, data = "mutated", mutate(rng, lines)
        if kind == "mid-data":
            ending = rng.choice(["close", "reset"])
        else:
            ending = rng.choices(["read", "close", "reset"], [8, 1, 1])[0]
        if ending == "read":
            data += TERMINATOR
        specs.append(Spec(kind, split(rng, data), ending))
    return specs


# -- running ----------------------------------------------------------------------------------


def run(port: int, spec: Spec) -> Outcome:
    if spec.kind == "valid-smtplib":
        return run_smtplib(port, spec)
    out = Outcome(spec)
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=OP_TIMEOUT)
    except OSError as exc:
        out.refused_connect = repr(exc)
        return out
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for chunk in spec.chunks:
                sock.sendall(chunk)
        except OSError:
            out.reset = True  # relayd closed first (too many errors, say): read what it said
        if spec.ending == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return out
        if spec.ending == "close":
            return out
        deadline = time.monotonic() + SESSION_DEADLINE
        chunks = []
        while True:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                out.hung = True
                break
            except ConnectionResetError:
                out.reset = True
                break
            if not chunk:
                break
            chunks.append(chunk)
        out.received = b"".join(chunks)
    return out


def run_smtplib(port: int, spec: Spec) -> Outcome:
    """A well-behaved client, one command at a time; the replies are rebuilt for the checks."""
    out = Outcome(spec)
    replies = []
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=OP_TIMEOUT) as client:
            client.ehlo("fuzz.test")
            for _, rcpts, content in spec.expect:
                client.mail("app@sender.test")
                for r in rcpts:
                    client.rcpt(r)
                code, text = client.data(content)
                replies.append(b"%d %s\r\n" % (code, text))
    except (smtplib.SMTPException, OSError) as exc:
        replies.append(repr(exc).encode() + b"\r\n")
    out.received = b"".join(replies)
    return out


# -- the test ---------------------------------------------------------------------------------


def test_fuzzed_sessions_leave_relayd_serving_and_spool_consistent(relay, fake_mx, mx_port):
    mx = fake_mx("127.0.0.10")
    r = relay(
        {
            "server": {"log_level": "info"},
            "ingress": {
                "session_timeout": "2s",
                "max_message_size": "256KB",
                "max_connections": 1000,
                "max_connections_per_ip": 1000,
            },
            "routes": {"*": f"127.0.0.10:{mx_port}"},
        }
    )
    specs = generate(random.Random(SEED))
    started = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        outcomes = list(pool.map(lambda spec: run(r.port, spec), specs))
    elapsed = time.monotonic() - started
    problems: list[str] = []

    def problem(title: str, items: list) -> None:
        if items:
            shown = "\n    ".join(repr(x)[:300] for x in items[:8])
            problems.append(f"{title} ({len(items)}):\n    {shown}")

    # relayd survived and still serves a clean session end to end
    assert r.proc.poll() is None, f"relayd died:\n{r.log_text()[-3000:]}"
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@sender.test", "clean@example.test", "clean"
    msg.set_content("after the fuzz\n")
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as client:
        client.ehlo("clean.test")
        client.send_message(msg)
    wait_until(
        lambda: any(b"Subject: clean\r\n" in m.data for m in list(mx.messages)),
        20,
        "the clean message at the fake MX",
    )

    # every session ended: relayd closed each one it was asked to (QUIT) or timed it out
    problem(
        "sessions relayd never closed",
        [(o.spec.kind, b"".join(o.spec.chunks)[:120]) for o in outcomes if o.hung],
    )
    problem("connections refused", [o.refused_connect for o in outcomes if o.refused_connect])

    # fully valid sessions: each transaction queued, and delivered intact to its recipients
    expected = {}
    for o in outcomes:
        if not o.spec.expect:
            continue
        ids = QUEUED.findall(o.received)
        if len(ids) != len(o.spec.expect):
            problem_text = (o.spec.kind, o.received[-400:])
            problems.append(f"valid session not queued as expected: {problem_text!r}")
        for token, rcpts, content in o.spec.expect:
            expected[token] = (rcpts, content)

    def arrived() -> bool:
        subjects = b"".join(m.data for m in list(mx.messages))
        return all(f"Subject: fuzz {t}\r\n".encode() in subjects for t in expected)

    try:
        wait_until(arrived, 30, f"{len(expected)} valid messages at the fake MX")
    except AssertionError as exc:
        problems.append(str(exc))
    by_subject = {}
    for m in list(mx.messages):
        found = re.search(rb"^Subject: fuzz (\S+)\r$", m.data, re.M)
        if found:
            by_subject.setdefault(found[1].decode("utf-8", "replace"), []).append(m)
    damaged = []
    for token, (rcpts, content) in expected.items():
        got = by_subject.get(token, [])
        ok = [
            m
            for m in got
            if m.mail_from == "app@sender.test" and m.data.endswith(content) and m.rcpts == rcpts
        ]
        if len(got) != 1 or len(ok) != 1:
            damaged.append((token, rcpts, [(m.mail_from, m.rcpts, m.data[-200:]) for m in got]))
    problem("valid messages missing, duplicated or altered", damaged)

    # every "queued as" seen is in the spool or was delivered (spool read first: a message
    # leaves the spool only after the fake MX has it)
    queued = {qid.decode() for o in outcomes for qid in QUEUED.findall(o.received)}
    with sqlite3.connect(r.spool) as db:
        rows = db.execute("SELECT id, queue_id, body FROM messages").fetchall()
        rcpt_counts = dict(db.execute("SELECT msg_id, count(*) FROM recipients GROUP BY msg_id"))
    spooled = {qid for _, qid, _ in rows}
    delivered = {qid.decode() for m in list(mx.messages) for qid in RECEIVED_ID.findall(m.data)}
    lost = sorted(queued - spooled - delivered)
    problem(
        "queued but neither spooled nor delivered",
        [(qid, [e for e in r.events() if e.get("queue_id") == qid]) for qid in lost],
    )

    # the spool holds only whole, normalised messages
    bad_rows = []
    for msg_id, qid, body in rows:
        reasons = []
        if not rcpt_counts.get(msg_id):
            reasons.append("no recipients")
        if not body.endswith(b"\r\n"):
            reasons.append("no final CRLF")
        if not body.startswith(b"Received: "):
            reasons.append("no header block")
        if not body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n"):
            reasons.append("bare CR or LF")
        if reasons:
            bad_rows.append((qid, reasons, body[:200]))
    problem("malformed spool rows", bad_rows)
    problem(
        "delivered messages with bare CR or LF",
        [
            (m.mail_from, m.data[:200])
            for m in list(mx.messages)
            if not m.data.count(b"\r") == m.data.count(b"\n") == m.data.count(b"\r\n")
        ],
    )

    # replies: well-formed lines, no leaked exceptions, enhanced status codes (RFC 2034)
    lines = [x for o in outcomes for x in o.received.split(b"\r\n")[:-1]]
    problem("malformed reply lines", sorted({x for x in lines if not REPLY_LINE.match(x)}))
    problem("replies leaking an internal error", sorted({x for x in lines if b"Error: (" in x}))
    missing = Counter(
        x[:60]
        for x in lines
        if REPLY_LINE.match(x) and not EXEMPT.match(x) and not ENHANCED.match(x)
    )
    problem("replies without an enhanced status code", missing.most_common())

    # the log: no failed task or accept, no traceback, nothing but JSON lines (events() parses
    # every line that starts with "{")
    log_lines = r.log_text().splitlines()
    problem(
        "log errors",
        [
            e
            for e in r.events()
            if e.get("event") in ("task_failed", "accept_failed", "record_failed")
        ],
    )
    problem(
        f"tracebacks in the log ({sum(x.startswith('Traceback') for x in log_lines)}), ending in",
        Counter(x for x in log_lines if re.match(r"^[\w.]+(Error|Exception)\b", x)).most_common(),
    )
    plain = Counter(
        re.sub(r"^\('[\d.]+', \d+\) ", "", x)[:50] for x in log_lines if not x.startswith("{")
    )
    problem(f"non-JSON log lines ({plain.total()}), by start", plain.most_common())

    kinds = Counter(o.spec.kind for o in outcomes)
    summary = f"{len(outcomes)} sessions in {elapsed:.1f}s {dict(kinds)}; {len(queued)} queued"
    assert not problems, summary + "\n" + "\n".join(problems)
