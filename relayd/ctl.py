"""relayctl: look at relayd's spool and act on it, whether or not relayd runs.

The daemon is the spool's only long-lived writer. relayctl changes rows directly, in one short
``BEGIN IMMEDIATE`` transaction that also leaves a row in ``control``: the running daemon polls
that table, drops held or deleted mail from its memory queues and wakes its loader, so a change
takes effect within a second without any socket between the two. Looking is done on a read-only
connection, so it can never disturb the daemon.

Every command first builds plain data (dicts and lists), then prints it either as text or, with
``--json``, as one JSON document; the two outputs cannot drift apart.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from relayd import config as configuration
from relayd import dkim, spool
from relayd.config import parse_rate
from relayd.ingress import valid_address
from relayd.spool import State
from relayd.users import User, hash_password, load_users, save_users


def _in(*states: State) -> str:
    """A literal SQL list of states, e.g. ``(0,1,5)``."""
    return f"({','.join(str(int(s)) for s in states)})"


UNFINISHED = (State.PENDING, State.DEFERRED, State.HELD, State.ACTIVE)
IN_UNFINISHED = _in(*UNFINISHED)
STATE_CHOICES = {s.name.lower(): s for s in UNFINISHED}
AGE_EDGES = tuple(5 * 2**i for i in range(9))  # minutes, as qshape: 5 10 20 ... 1280
BUCKETS = (*(f"{m}m" for m in AGE_EDGES), f"{AGE_EDGES[-1]}m+")
IDS_IN = "(SELECT value FROM json_each(?))"  # one parameter for any number of ids

Row = dict[str, Any]


class CtlError(Exception):
    """A problem the operator can fix (unknown queue id, no spool): stderr, exit status 1."""


# -- spool access -------------------------------------------------------------------------


def open_spool(path: Path, write: bool) -> sqlite3.Connection:
    """Open an existing spool; never create one, so a wrong config cannot grow an empty spool
    that hides the real queue."""
    if not path.is_file():
        raise CtlError(f"no spool at {path} (has relayd been started with this config?)")
    mode = "rw" if write else "ro"
    conn = sqlite3.connect(f"{path.as_uri()}?mode={mode}", uri=True, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=10000")  # the daemon's group commits are short
    conn.execute("PRAGMA foreign_keys=ON")  # deleting a message deletes its recipients
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version != spool.SCHEMA_VERSION:
        conn.close()
        raise CtlError(
            f"spool {path} has schema version {version}; this relayctl knows version"
            f" {spool.SCHEMA_VERSION}"
        )
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, kind: str) -> Iterator[sqlite3.Connection]:
    """One snapshot for reading (DEFERRED) or the write lock up front (IMMEDIATE), so a change
    and its control row commit together or not at all."""
    conn.execute(f"BEGIN {kind}")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


# -- reading commands ---------------------------------------------------------------------


def queue_shape(conn: sqlite3.Connection, args: argparse.Namespace) -> list[Row]:
    """Unfinished recipients per domain and message age, like Postfix's qshape: a TOTAL row,
    then the ``--top`` domains by count."""
    bucket = " ".join(f"WHEN age < {m * 60} THEN {i}" for i, m in enumerate(AGE_EDGES))
    counts = conn.execute(
        f"SELECT domain, CASE {bucket} ELSE {len(AGE_EDGES)} END AS bucket, count(*) FROM"
        f" (SELECT r.domain, ? - m.received_at AS age FROM recipients r JOIN messages m"
        f" ON m.id = r.msg_id WHERE r.state IN {IDS_IN}) GROUP BY domain, bucket",
        (time.time(), _states(args)),
    ).fetchall()
    rows: dict[str, Row] = {}
    total = _shape_row("TOTAL")
    for domain, index, count in counts:
        row = rows.setdefault(domain, _shape_row(domain))
        for target in (row, total):
            target["total"] += count
            target[BUCKETS[index]] += count
    top = sorted(rows.values(), key=lambda r: (-r["total"], r["domain"]))[: args.top]
    return [total, *top]


def _states(args: argparse.Namespace) -> str:
    """The --state filter as a JSON list for IDS_IN: one state, or every unfinished one."""
    states = [STATE_CHOICES[args.state]] if args.state else UNFINISHED
    return json.dumps([int(s) for s in states])


def _shape_row(domain: str) -> Row:
    return {"domain": domain, "total": 0} | dict.fromkeys(BUCKETS, 0)


def list_messages(conn: sqlite3.Connection, args: argparse.Namespace) -> list[Row]:
    """One row per message with an unfinished recipient matching the filters, oldest first."""
    now = time.time()
    match = f"r.msg_id = m.id AND r.state IN {IDS_IN}"
    params: list[Any] = [_states(args)]
    if args.domain:
        match += " AND r.domain = ?"
        params.append(args.domain.lower())
    where = f"EXISTS (SELECT 1 FROM recipients r WHERE {match})"
    if args.sender:
        where += " AND instr(lower(m.sender), lower(?)) > 0"
        params.append(args.sender)
    sums = ", ".join(f"sum(r.state = {int(s)})" for s in State)
    rows = conn.execute(
        f"SELECT m.queue_id, m.received_at, m.size, m.sender, count(*), {sums}"
        f" FROM messages m JOIN recipients r ON r.msg_id = m.id WHERE m.id IN"
        f" (SELECT m.id FROM messages m WHERE {where} ORDER BY m.received_at, m.id LIMIT ?)"
        f" GROUP BY m.id ORDER BY m.received_at, m.id",
        (*params, args.limit + 1),
    ).fetchall()
    if len(rows) > args.limit:
        print(f"relayctl: showing the oldest {args.limit} messages (see --limit)", file=sys.stderr)
    return [
        {
            "queue_id": queue_id,
            "received_at": _iso(received_at),
            "age_s": round(now - received_at, 1),
            "size": size,
            "sender": sender,
            "recipients": count,
            "states": {s.name.lower(): n for s, n in zip(State, per_state, strict=True) if n},
        }
        for queue_id, received_at, size, sender, count, *per_state in rows[: args.limit]
    ]


def show_message(conn: sqlite3.Connection, args: argparse.Namespace) -> Row:
    """Envelope, recipients with their delivery history, and the headers (or whole body)."""
    msg = conn.execute(
        "SELECT id, queue_id, sender, received_at, client, helo, origin, size, smtputf8, body"
        " FROM messages WHERE queue_id = ?",
        (args.queue_id,),
    ).fetchone()
    if msg is None:
        raise CtlError(f"no message with queue id {args.queue_id}")
    msg_id, queue_id, sender, received_at, client, helo, origin, size, smtputf8, body = msg
    recipients = conn.execute(
        "SELECT rcpt, state, attempts, next_attempt, last_attempt, last_code, last_reply, last_mx"
        " FROM recipients WHERE msg_id = ? ORDER BY id",
        (msg_id,),
    ).fetchall()
    text = body.decode("utf-8", "replace").replace("\r\n", "\n")
    return {
        "queue_id": queue_id,
        "sender": sender,
        "received_at": _iso(received_at),
        "client": client,
        "helo": helo,
        "origin": origin,
        "size": size,
        "smtputf8": bool(smtputf8),
        "recipients": [
            {
                "rcpt": rcpt,
                "state": State(state).name.lower(),
                "attempts": attempts,
                "next_attempt": _iso(next_at) if state in (State.PENDING, State.DEFERRED) else None,
                "last_attempt": _iso(last_at) if last_at else None,
                "last_code": code,
                "last_reply": reply,
                "last_mx": mx,
            }
            for rcpt, state, attempts, next_at, last_at, code, reply, mx in recipients
        ],
        "headers": text.split("\n\n", 1)[0] + "\n",
    } | ({"body": text} if args.body else {})


# -- changing commands --------------------------------------------------------------------


@dataclass
class Selection:
    """The recipients a changing command applies to: of the named messages, or at a domain."""

    where: str  # condition on recipients
    params: tuple[Any, ...]
    msg_ids: tuple[int, ...]  # the named messages; empty for --domain


def select(conn: sqlite3.Connection, args: argparse.Namespace) -> Selection:
    """Resolve queue ids inside the transaction; one unknown id aborts it all."""
    if args.domain:
        return Selection("domain = ?", (args.domain.lower(),), ())
    found = dict(
        conn.execute(
            f"SELECT queue_id, id FROM messages WHERE queue_id IN {IDS_IN}",
            (json.dumps(args.queue_ids),),
        ).fetchall()
    )
    unknown = [q for q in args.queue_ids if q not in found]
    if unknown:
        raise CtlError(f"no message with queue id {', '.join(unknown)}; nothing changed")
    ids = tuple(found.values())
    return Selection(f"msg_id IN {IDS_IN}", (json.dumps(ids),), ids)


@dataclass
class Changed:
    """What an action did, for the control row and the report."""

    touched: list[int]  # the message of each changed recipient
    removed: dict[int, str] = field(default_factory=dict)  # messages deleted: id -> queue id


def hold(conn: sqlite3.Connection, sel: Selection, now: float) -> Changed:
    """Unfinished recipients, also those in the daemon's memory, are set aside."""
    waiting = _in(State.PENDING, State.DEFERRED, State.ACTIVE)
    return _update(conn, f"state = {int(State.HELD)}", f"state IN {waiting}", sel, ())


def release(conn: sqlite3.Connection, sel: Selection, now: float) -> Changed:
    """Held recipients become due at once, as retries if they were ever tried."""
    state = f"CASE WHEN attempts = 0 THEN {int(State.PENDING)} ELSE {int(State.DEFERRED)} END"
    held = f"state = {int(State.HELD)}"
    return _update(conn, f"state = {state}, next_attempt = ?", held, sel, (now,))


def retry(conn: sqlite3.Connection, sel: Selection, now: float) -> Changed:
    """Waiting recipients become due at once; held ones stay held."""
    waiting = _in(State.PENDING, State.DEFERRED)
    return _update(conn, "next_attempt = ?", f"state IN {waiting}", sel, (now,))


def _update(
    conn: sqlite3.Connection, changes: str, cond: str, sel: Selection, values: tuple[Any, ...]
) -> Changed:
    rows = conn.execute(
        f"UPDATE recipients SET {changes} WHERE {cond} AND {sel.where} RETURNING msg_id",
        (*values, *sel.params),
    ).fetchall()
    return Changed([r[0] for r in rows])


def delete(conn: sqlite3.Connection, sel: Selection, now: float) -> Changed:
    """Drop unfinished recipients without a DSN, then the messages left with nothing to deliver
    (a message holding only final recipients would otherwise stay in the spool for good)."""
    touched = conn.execute(
        f"DELETE FROM recipients WHERE state IN {IN_UNFINISHED} AND {sel.where} RETURNING msg_id",
        sel.params,
    ).fetchall()
    candidates = sorted({r[0] for r in touched} | set(sel.msg_ids))
    removed = conn.execute(
        f"DELETE FROM messages WHERE id IN {IDS_IN} AND NOT EXISTS (SELECT 1 FROM recipients r"
        f" WHERE r.msg_id = messages.id AND r.state IN {IN_UNFINISHED}) RETURNING id, queue_id",
        (json.dumps(candidates),),
    ).fetchall()
    return Changed([r[0] for r in touched], dict(removed))


ACTIONS: dict[str, tuple[Callable[[sqlite3.Connection, Selection, float], Changed], str]] = {
    "hold": (hold, "held"),
    "release": (release, "released"),
    "retry": (retry, "rescheduled"),
    "delete": (delete, "deleted"),
}


def change(conn: sqlite3.Connection, args: argparse.Namespace) -> Row:
    """Apply one action and tell the daemon which messages it touched, atomically."""
    action, _ = ACTIONS[args.command]
    now = time.time()
    changed = action(conn, select(conn, args), now)
    messages = sorted({*changed.touched, *changed.removed})
    queue_ids = _queue_ids(conn, messages) | changed.removed
    if messages:
        conn.execute(
            "INSERT INTO control (action, msg_ids, at) VALUES (?, ?, ?)",
            (args.command, ",".join(map(str, messages)), now),
        )
    result: Row = {
        "action": args.command,
        "recipients": len(changed.touched),
        "messages": [queue_ids[m] for m in messages],
    }
    if args.command == "delete":
        result["removed"] = sorted(changed.removed.values())
    return result


def _queue_ids(conn: sqlite3.Connection, msg_ids: list[int]) -> dict[int, str]:
    return dict(
        conn.execute(
            f"SELECT id, queue_id FROM messages WHERE id IN {IDS_IN}", (json.dumps(msg_ids),)
        ).fetchall()
    )


# -- text output --------------------------------------------------------------------------


def table(rows: list[list[Any]], header: list[str]) -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    cells = [header, *([("" if v is None else str(v)) for v in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(isinstance(row[i], int) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)
        ).rstrip()
        for r in cells
    ]
    return "\n".join(lines)


def render_queue(rows: list[Row]) -> str:
    return table(
        [[r["domain"], r["total"], *(r[b] for b in BUCKETS)] for r in rows], ["", "T", *BUCKETS]
    )


def render_list(rows: list[Row]) -> str:
    if not rows:
        return "queue is empty (or nothing matches)"
    return table(
        [
            [
                r["queue_id"],
                _age(r["age_s"]),
                r["size"],
                r["sender"] or "<>",
                r["recipients"],
                " ".join(f"{k}={v}" for k, v in r["states"].items()),
            ]
            for r in rows
        ],
        ["QUEUE ID", "AGE", "SIZE", "SENDER", "RCPTS", "STATES"],
    )


def render_show(msg: Row) -> str:
    envelope = [
        ["queue id:", msg["queue_id"]],
        ["sender:", msg["sender"] or "<>"],
        ["received:", msg["received_at"]],
        ["client:", f"{msg['client'] or '-'} (helo {msg['helo'] or '-'})"],
        ["origin:", msg["origin"]],
        ["size:", f"{msg['size']} bytes{', SMTPUTF8' if msg['smtputf8'] else ''}"],
    ]
    recipients = table(
        [
            [
                r["rcpt"],
                r["state"],
                r["attempts"],
                r["next_attempt"] or "-",
                r["last_mx"] or "-",
                f"{r['last_code']} {r['last_reply']}" if r["last_code"] else "-",
            ]
            for r in msg["recipients"]
        ],
        ["RECIPIENT", "STATE", "ATTEMPTS", "NEXT ATTEMPT", "LAST MX", "LAST REPLY"],
    )
    content = msg.get("body", msg["headers"])
    return f"{table(envelope, ['', ''])}\n\n{recipients}\n\n{content}".rstrip("\n")


def render_change(result: Row) -> str:
    _, verb = ACTIONS[result["action"]]
    text = f"{verb} {result['recipients']} recipient(s) of {len(result['messages'])} message(s)"
    if "removed" in result:
        text += f"; removed {len(result['removed'])} message(s) from the spool"
    return text


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


# -- command line -------------------------------------------------------------------------


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return int(text)


# -- administration: logins, certificates, DKIM keys ----------------------------------------


def read_password(prompt: str) -> str:
    """From a terminal: asked twice without echo. Otherwise: the first line of stdin, so that
    scripts can pipe it in and it never appears in a process list."""
    if sys.stdin.isatty():
        first = getpass.getpass(f"{prompt}: ")
        if first != getpass.getpass(f"{prompt} (again): "):
            raise CtlError("the two passwords differ")
        password = first
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        raise CtlError("a password needs at least 8 characters")
    return password


def _user_fields(args: argparse.Namespace, old: User | None) -> dict[str, Any]:
    senders = [s.lower() for s in args.sender] if args.sender else list(old.senders if old else [])
    for s in senders:
        if not valid_address(s if "@" in s else f"x@{s}", True):
            raise CtlError(f"--sender {s!r}: not a domain or an address")
    rate = old.rate if old and args.rate is None else args.rate or ""
    if rate:
        try:
            parse_rate(rate)
        except ValueError as exc:
            raise CtlError(f"--rate {exc}") from None
    limit = (
        args.max_recipients
        if args.max_recipients is not None
        else (old.max_recipients if old else 0)
    )
    return {"senders": tuple(senders), "rate": rate, "max_recipients": limit}


def user_command(cfg: configuration.Config, args: argparse.Namespace) -> Row:
    path = cfg.auth.users_file
    users = load_users(path)
    name = getattr(args, "name", "")
    if args.action == "list":
        return {"users": [_user_row(u) for u in users.values()]}
    if args.action == "add" and name in users:
        raise CtlError(f"user {name!r} exists (use: relayctl user passwd or user set)")
    if args.action != "add" and name not in users:
        raise CtlError(f"no user {name!r} in {path}")
    old = users.get(name)
    if args.action == "del":
        del users[name]
    elif args.action == "set":
        users[name] = replace(old, **_user_fields(args, old))
    elif args.action == "passwd":
        users[name] = replace(old, password=hash_password(read_password(f"password for {name}")))
    else:
        fields = _user_fields(args, None)
        if not fields["senders"]:
            raise CtlError("a user needs at least one --sender (a domain or an address)")
        users[name] = User(name, hash_password(read_password(f"password for {name}")), **fields)
    save_users(path, users)
    return {"action": args.action, "user": name, "file": str(path)}


def _user_row(user: User) -> Row:
    return {
        "name": user.name,
        "senders": list(user.senders),
        "rate": user.rate,
        "max_recipients": user.max_recipients,
    }


def render_users(result: Row) -> str:
    if "users" not in result:
        return f"{result['action']}: {result['user']} ({result['file']})"
    rows = [
        [u["name"], ",".join(u["senders"]), u["rate"] or "-", u["max_recipients"] or "-"]
        for u in result["users"]
    ]
    return table(rows, ["USER", "MAY SEND AS", "RATE", "MAX RCPT"])


def tls_self_signed(args: argparse.Namespace) -> Row:
    """A development certificate: self-signed, the host name in CN and subjectAltName."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = Path(args.out_dir)
    cert_path, key_path = out / f"{args.hostname}.crt", out / f"{args.hostname}.key"
    if cert_path.exists() or key_path.exists():
        raise CtlError(f"{cert_path} or {key_path} exists; not overwriting")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, args.hostname)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=args.days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(args.hostname)]), False)
        .sign(key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with os.fdopen(os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return {"cert_file": str(cert_path), "key_file": str(key_path), "days": args.days}


def dkim_keygen(args: argparse.Namespace) -> Row:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        path, record = dkim.keygen(args.domain, args.selector, args.algorithm, out)
    except FileExistsError as exc:
        raise CtlError(f"{exc.filename} exists; not overwriting") from None
    except ValueError as exc:
        raise CtlError(str(exc)) from None
    return {"key_file": str(path), "dns_record": record}


def render_files(result: Row) -> str:
    lines = [f"{k}: {v}" for k, v in result.items() if k != "dns_record"]
    if "dns_record" in result:
        lines += ["publish this DNS record:", result["dns_record"]]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    # --config and --json are accepted before or after the command: the copies on the
    # subcommands default to SUPPRESS so they do not overwrite a value given up front.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    top = argparse.ArgumentParser(prog="relayctl", description="inspect and manage relayd's queue")
    top.add_argument(
        "--config",
        default=os.environ.get("RELAYD_CONFIG", str(configuration.DEFAULT_PATH)),
        help="relayd's TOML config (default: $RELAYD_CONFIG or the bundled conf/relayd.toml)",
    )
    top.add_argument("--json", action="store_true", help="print one JSON document")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    states = list(STATE_CHOICES)

    p = sub.add_parser("queue", parents=[common], help="recipients per domain and age (qshape)")
    p.add_argument("--top", type=_count, default=20, metavar="N", help="domains shown (default 20)")
    p.add_argument("--state", choices=states, help="only recipients in this state")
    p.set_defaults(run=queue_shape, render=render_queue, write=False)

    p = sub.add_parser("list", parents=[common], help="one line per queued message")
    p.add_argument("--domain", help="messages with a recipient at this domain")
    p.add_argument("--state", choices=states, help="messages with a recipient in this state")
    p.add_argument("--sender", metavar="TEXT", help="sender contains TEXT (case-insensitive)")
    p.add_argument("--limit", type=_count, default=1000, metavar="N", help="default 1000")
    p.set_defaults(run=list_messages, render=render_list, write=False)

    p = sub.add_parser("show", parents=[common], help="envelope, recipients and headers")
    p.add_argument("queue_id", metavar="QUEUE_ID")
    p.add_argument("--body", action="store_true", help="print the whole message")
    p.set_defaults(run=show_message, render=render_show, write=False)

    helps = {
        "hold": "set unfinished recipients aside until released",
        "release": "make held recipients due now",
        "retry": "make pending and deferred recipients due now",
        "delete": "remove recipients (whole messages by id), without a DSN",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, parents=[common], help=text)
        target = p.add_mutually_exclusive_group(required=True)
        target.add_argument("queue_ids", nargs="*", default=[], metavar="QUEUE_ID")
        target.add_argument("--domain", help="all recipients at this domain")
        p.set_defaults(run=change, render=render_change, write=True)

    p = sub.add_parser("user", parents=[common], help="submission logins (auth.users_file)")
    users = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (
        ("add", "add a login; password from a prompt or stdin"),
        ("passwd", "set a new password"),
        ("set", "change what a login may do"),
        ("del", "remove a login"),
        ("list", "show the logins"),
    ):
        u = users.add_parser(action, parents=[common], help=text)
        if action != "list":
            u.add_argument("name", metavar="NAME")
        if action in ("add", "set"):
            u.add_argument(
                "--sender",
                action="append",
                metavar="DOMAIN_OR_ADDRESS",
                help="may send as this domain or address (repeatable)",
            )
            u.add_argument("--rate", help="messages per period, e.g. 1000/hour")
            u.add_argument("--max-recipients", type=_count, metavar="N")
        u.set_defaults(run=user_command, render=render_users, needs="config")

    p = sub.add_parser("tls", parents=[common], help="TLS certificates")
    tls = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = tls.add_parser("self-signed", parents=[common], help="write a development certificate")
    t.add_argument("hostname", metavar="HOSTNAME")
    t.add_argument("--out-dir", default=".", help="where to write HOSTNAME.crt and .key")
    t.add_argument("--days", type=_count, default=365)
    t.set_defaults(run=tls_self_signed, render=render_files, needs=None)

    p = sub.add_parser("dkim", parents=[common], help="DKIM keys")
    keys = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    k = keys.add_parser("keygen", parents=[common], help="write a key, print its DNS record")
    k.add_argument("domain", metavar="DOMAIN")
    k.add_argument("selector", metavar="SELECTOR")
    k.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa")
    k.add_argument("--out-dir", default=".", help="where to write DOMAIN.SELECTOR.key")
    k.set_defaults(run=dkim_keygen, render=render_files, needs=None)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    needs = getattr(args, "needs", "spool")
    try:
        cfg = configuration.load(args.config) if needs else None
    except configuration.ConfigError as exc:
        print(f"relayctl: config error: {exc}", file=sys.stderr)
        return configuration.EX_CONFIG
    try:
        if cfg is None:
            result = args.run(args)
        elif needs == "config":
            result = args.run(cfg, args)
        else:
            conn = open_spool(cfg.spool_path, args.write)
            kind = "IMMEDIATE" if args.write else "DEFERRED"
            with contextlib.closing(conn), transaction(conn, kind):
                result = args.run(conn, args)
    except CtlError as exc:
        print(f"relayctl: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        print(f"relayctl: spool: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else args.render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
