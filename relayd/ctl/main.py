"""relayctl: look at relayd's spool and act on it, whether or not relayd runs.

The SQL is in ``relayd.spool.admin``: looking uses a read-only connection; a change is one
short transaction that also leaves an operator event, which the running daemon reads to drop
held or deleted mail from its memory and wake its loader within a second.

Every command first builds plain data (dicts and lists), then prints it either as text or, with
``--json``, as one JSON document; the two outputs cannot drift apart.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import ipaddress
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from relayd import config as configuration
from relayd.config import parse_rate
from relayd.ctl import reports
from relayd.ctl import top as top_command
from relayd.ingress import suppression as suppressions
from relayd.ingress.credentials import (
    SCOPES,
    Credential,
    hash_password,
    load_credentials,
    new_key,
    save_credentials,
)
from relayd.ingress.smtp import valid_address
from relayd.mime import dkim
from relayd.model.message import STREAMS, TRANSACTIONAL, UNFINISHED, Notify, State
from relayd.receipts import endpoints
from relayd.reputation.pools import addresses, exclusions
from relayd.senderauth import report
from relayd.shaping.adaptive import split
from relayd.shaping.warmup import Plan, day_number, plans, utc_day
from relayd.spool import admin, holds, listings, suppression
from relayd.spool import warmup as warmups
from relayd.spool.suppression import REASONS

STATE_CHOICES = {s.name.lower(): s for s in UNFINISHED}
AGE_EDGES, BUCKETS = admin.AGE_EDGES, admin.BUCKETS  # qshape's buckets (/metrics has them too)
WAITING = (State.PENDING, State.DEFERRED)
VERBS = {"hold": "held", "release": "released", "retry": "rescheduled", "delete": "deleted"}

Row = dict[str, Any]


class CtlError(Exception):
    """A problem the operator can fix (unknown login, bad option): stderr, exit status 1."""


# -- reading commands ---------------------------------------------------------------------


def queue_shape(conn: sqlite3.Connection, args: argparse.Namespace) -> list[Row]:
    """Unfinished recipients per domain and message age, like Postfix's qshape: a TOTAL row,
    then the ``--top`` domains by count."""
    counts = admin.shape_counts(conn, _states(args), AGE_EDGES, time.time())
    rows: dict[str, Row] = {}
    total = _shape_row("TOTAL")
    for domain, index, count in counts:
        row = rows.setdefault(domain, _shape_row(domain))
        for target in (row, total):
            target["total"] += count
            target[BUCKETS[index]] += count
    top = sorted(rows.values(), key=lambda r: (-r["total"], r["domain"]))[: args.top]
    return [total, *top]


def _states(args: argparse.Namespace) -> list[State]:
    """The --state filter: one state, or every unfinished one."""
    return [STATE_CHOICES[args.state]] if args.state else list(UNFINISHED)


def _shape_row(domain: str) -> Row:
    return {"domain": domain, "total": 0} | dict.fromkeys(BUCKETS, 0)


def list_messages(conn: sqlite3.Connection, args: argparse.Namespace) -> list[Row]:
    """One row per message with an unfinished recipient matching the filters, oldest first."""
    now = time.time()
    rows = admin.messages(conn, _states(args), args.domain, args.sender, args.limit + 1)
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
    msg, recipients = admin.message(conn, args.queue_id)
    body = msg["body"]
    text = body.decode("utf-8", "replace").replace("\r\n", "\n")
    return {
        **{k: msg[k] for k in ("queue_id", "sender", "client", "helo", "origin", "stream", "size")},
        "received_at": _iso(msg["received_at"]),
        "smtputf8": bool(msg["smtputf8"]),
        "envid": msg["envid"] or None,  # the DSN extension's (RFC 3461): None when not given
        "ret": msg["ret"] or None,
        "recipients": [
            {
                "rcpt": r["rcpt"],
                "state": State(r["state"]).name.lower(),
                "attempts": r["attempts"],
                "next_attempt": _iso(r["next_attempt"]) if r["state"] in WAITING else None,
                "last_attempt": _iso(r["last_attempt"]) if r["last_attempt"] else None,
                "last_code": r["last_code"],
                "last_reply": r["last_reply"],
                "last_mx": r["last_mx"],
                "notify": Notify.words(r["notify"]) or None,
                "orcpt": r["orcpt"],
            }
            for r in recipients
        ],
        "headers": text.split("\n\n", 1)[0] + "\n",
    } | ({"body": text} if args.body else {})


# -- changing commands --------------------------------------------------------------------


def change(conn: sqlite3.Connection, args: argparse.Namespace) -> Row:
    """Apply one action; the daemon honours it through the operator event it leaves."""
    if not (args.queue_ids or args.domain or args.all):
        raise CtlError(f"{args.command}: name queue ids, --domain DOMAIN or --all")
    return admin.change(conn, args.command, args.queue_ids, args.domain, time.time())


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
        ["stream:", msg["stream"]],
        ["size:", f"{msg['size']} bytes{', SMTPUTF8' if msg['smtputf8'] else ''}"],
    ]
    envelope += [[f"{k}:", msg[k]] for k in ("envid", "ret") if msg[k]]
    # the DSN columns only where a recipient gave NOTIFY or ORCPT
    dsn = [k for k in ("notify", "orcpt") if any(r[k] for r in msg["recipients"])]
    recipients = table(
        [
            [
                r["rcpt"],
                r["state"],
                r["attempts"],
                r["next_attempt"] or "-",
                r["last_mx"] or "-",
                f"{r['last_code']} {r['last_reply']}" if r["last_code"] else "-",
                *(r[k] or "-" for k in dsn),
            ]
            for r in msg["recipients"]
        ],
        ["RECIPIENT", "STATE", "ATTEMPTS", "NEXT ATTEMPT", "LAST MX", "LAST REPLY"]
        + [k.upper() for k in dsn],
    )
    content = msg.get("body", msg["headers"])
    return f"{table(envelope, ['', ''])}\n\n{recipients}\n\n{content}".rstrip("\n")


def render_change(result: Row) -> str:
    verb, count = VERBS[result["action"]], len(result["messages"])
    text = f"{verb} {result['recipients']} recipient(s) of {count} message(s)"
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


def _policy(args: argparse.Namespace, old: Credential | None) -> dict[str, Any]:
    """What a login or key may do, from the options given (the rest kept from ``old``)."""
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
    networks = list(old.networks if old else [])
    if args.networks:
        networks = []
        for net in args.networks:
            try:
                networks.append(str(ipaddress.ip_network(net, strict=False)))
            except ValueError:
                raise CtlError(f"--networks {net!r}: not a CIDR") from None
    policy: dict[str, Any] = {
        "senders": tuple(senders),
        "rate": rate,
        "max_recipients": limit,
        "networks": tuple(networks),
        "stream": args.stream or (old.stream if old else TRANSACTIONAL),
    }
    if getattr(args, "scope", None):
        scopes = [s.strip() for arg in args.scope for s in arg.split(",") if s.strip()]
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown:
            raise CtlError(f"--scope {unknown[0]!r}: not one of {', '.join(SCOPES)}")
        policy["scopes"] = tuple(dict.fromkeys(scopes))
    if getattr(args, "tracking", None) is not None:
        policy["tracking"] = args.tracking
    return policy


def credential_command(cfg: configuration.Config, args: argparse.Namespace) -> Row:
    """``user`` (SMTP logins) and ``key`` (API keys): one file, one policy model."""
    path, kind = cfg.auth.users_file, args.kind
    found = load_credentials(path)
    name = getattr(args, "name", "")
    ref, old = f"{kind}:{name}", found.get(f"{kind}:{name}")
    noun = "user" if kind == "login" else "key"
    if args.action == "list":
        return {f"{noun}s": [_credential_row(c) for c in found.values() if c.kind == kind]}
    if args.action == "add" and old is not None:
        again = "user passwd or user set" if kind == "login" else "key rotate"
        raise CtlError(f"{noun} {name!r} exists (use: relayctl {again})")
    if args.action != "add" and old is None:
        raise CtlError(f"no {noun} {name!r} in {path}")
    result: Row = {"action": args.action, noun: name, "file": str(path)}
    if args.action in ("del", "revoke"):
        del found[ref]
    elif args.action == "set":
        found[ref] = replace(old, **_policy(args, old))  # type: ignore[arg-type]
    elif args.action == "passwd":
        secret = hash_password(read_password(f"password for {name}"))
        found[ref] = replace(old, secret=secret)  # type: ignore[arg-type]
    elif args.action == "rotate":
        found[ref], result["secret"] = new_key(old)  # type: ignore[arg-type]
    else:
        policy = _policy(args, None)
        if not policy["senders"]:
            raise CtlError(f"a {noun} needs at least one --sender (a domain or an address)")
        if kind == "login":
            secret = hash_password(read_password(f"password for {name}"))
            found[ref] = Credential(name, secret, **policy)
        else:
            policy.setdefault("scopes", ("send",))
            found[ref], result["secret"] = new_key(Credential(name, "", **policy))
    save_credentials(path, found)
    return result


def _credential_row(cred: Credential) -> Row:
    row: Row = {
        "name": cred.name,
        "senders": list(cred.senders),
        "rate": cred.rate,
        "max_recipients": cred.max_recipients,
        "networks": list(cred.networks),
        "stream": cred.stream,
    }
    if cred.kind == "key":
        row["scopes"] = list(cred.scopes)
        row["id"] = cred.key_id
        row["created"] = _iso(cred.created)
        row["tracking"] = cred.tracking
    return row


def render_credentials(result: Row) -> str:
    for noun in ("user", "key"):
        if f"{noun}s" in result:
            break
    else:
        noun = "user" if "user" in result else "key"
        line = f"{result['action']}: {result[noun]} ({result['file']})"
        if "secret" in result:  # shown once: only its digest is kept
            line += f"\n{result['secret']}\n(the key is shown only now; store it safely)"
        return line
    rows = []
    for c in result[f"{noun}s"]:
        row = [c["name"], ",".join(c["senders"]), c["rate"] or "-", c["max_recipients"] or "-"]
        row += [",".join(c["networks"]) or "any", c["stream"]]
        if noun == "key":
            row += [",".join(c["scopes"]), c["id"]]
        rows.append(row)
    head = [noun.upper(), "MAY SEND AS", "RATE", "MAX RCPT", "FROM", "STREAM"]
    return table(rows, head + (["SCOPES", "ID"] if noun == "key" else []))


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


# -- webhooks ------------------------------------------------------------------------------

# relayctl's option for each field endpoints.EndpointError names
_WEBHOOK_OPTIONS = {"url": "URL", "events": "--events", "batch": "--batch"}
_WEBHOOK_OPTIONS |= {"concurrency": "--concurrency", "timeout": "--timeout"}


def webhook_command(conn: sqlite3.Connection, args: argparse.Namespace) -> Row:
    """``webhook add|list|remove|rotate|enable|disable``: the same functions as the API's."""
    now, settings = time.time(), args.cfg.webhooks
    try:
        if args.action == "add":
            return endpoints.add(
                conn, settings, args.url, args.events, now, args.batch, args.concurrency,
                args.timeout,
            )  # fmt: skip
        if args.action == "list":
            return {"webhooks": endpoints.listing(conn, now)}
        if args.action == "remove":
            return endpoints.remove(conn, args.endpoint)
        if args.action == "rotate":
            overlap = settings.rotation_overlap if args.overlap is None else args.overlap
            return endpoints.rotate(conn, args.endpoint, overlap, now)
        if args.action == "enable":
            return endpoints.enable(conn, args.endpoint, now, args.from_now)
        return endpoints.disable(conn, args.endpoint, now)
    except endpoints.EndpointError as exc:
        option = _WEBHOOK_OPTIONS.get(exc.field, exc.field)
        raise CtlError(f"webhook {args.action}: {option}: {exc.problem}") from None
    except endpoints.NotFound as exc:
        raise CtlError(f"webhook {args.action}: {exc}") from None


def render_webhooks(result: Row) -> str:
    if "webhooks" in result:
        if not result["webhooks"]:
            return "no webhook endpoints (add one: relayctl webhook add URL --events ...)"
        rows = [
            [
                w["id"],
                w["url"],
                ",".join(w["events"]),
                w["state"] + (f" ({w['disabled_reason']})" if w["disabled_reason"] else ""),
                w["backlog"],
                w["sent"],
                w["failures"],
                w["last_status"] or "-",
                w["last_success"] or "-",
                w["dropped"],
            ]
            for w in result["webhooks"]
        ]
        head = ["ID", "URL", "EVENTS", "STATE", "BACKLOG", "SENT", "FAILURES", "LAST STATUS"]
        return table(rows, [*head, "LAST SUCCESS", "DROPPED"])
    if result.get("removed"):
        return f"removed webhook {result['id']} ({result['url']})"
    w = result
    lines = [
        f"webhook {w['id']}: {w['url']}",
        f"events: {','.join(w['events'])}; batch {w['batch']}, concurrency {w['concurrency']},"
        f" timeout {w['timeout_s']:g}s",
        f"state: {w['state']}" + (f" ({w['disabled_reason']})" if w["disabled_reason"] else ""),
        f"backlog: {w['backlog']}; sent {w['sent']}; dropped {w['dropped']}",
    ]
    if w["failures"]:
        lines.append(f"failures: {w['failures']} since {w['failing_since']}; next {w['next_try']}")
    if "secret" in w:  # shown once; the API and relayctl never show it again
        lines.append(f"signing secret (shown only now; store it with the receiver):\n{w['secret']}")
        if w.get("old_secrets_until"):
            lines.append(f"the previous secret also signs until {w['old_secrets_until']}")
    return "\n".join(lines)


# -- the suppression list -------------------------------------------------------------------


def suppression_command(conn: sqlite3.Connection, args: argparse.Namespace) -> Row:
    """``suppression add|remove|list|import|export``: the same checks as the API's."""
    now = time.time()
    try:
        if args.action == "add":
            added = [
                suppressions.entry(a, args.scope, args.reason, now, args.detail)
                for a in args.addresses
            ]
            return {"added": suppression.add(conn, added), "addresses": args.addresses}
        if args.action == "remove":
            scope = None if args.scope is None else suppressions.parse_scope(args.scope)
            removed = sum(suppression.remove(conn, a, scope) for a in args.addresses)
            if not removed:
                raise CtlError(f"suppression remove: {', '.join(args.addresses)}: not listed")
            return {"removed": removed}
        if args.action == "list":
            scopes = None if args.scope is None else [suppressions.parse_scope(args.scope)]
            found = suppression.listing(
                conn, now, scopes, args.reason, args.address, limit=args.limit
            )
            return {"suppressions": [e.as_json() for e in found]}
        if args.action == "import":
            with _text_in(args.file) as lines:
                entries = suppressions.read_csv(lines, now)
            return {"imported": suppression.add(conn, entries), "read": len(entries)}
        with _text_out(args.file) as out:
            return {"exported": suppressions.write_csv(suppression.every(conn, now), out)}
    except suppressions.Invalid as exc:
        raise CtlError(f"suppression {args.action}: {exc.field}: {exc.problem}") from None
    except OSError as exc:
        raise CtlError(f"suppression {args.action}: {args.file}: {exc.strerror}") from None


@contextlib.contextmanager
def _text_in(name: str) -> Iterator[TextIO]:
    if name == "-":
        yield sys.stdin
    else:
        with open(name, encoding="utf-8", newline="") as f:
            yield f


@contextlib.contextmanager
def _text_out(name: str) -> Iterator[TextIO]:
    if name == "-":
        yield sys.stdout
    else:
        with open(name, "w", encoding="utf-8", newline="") as f:
            yield f


def render_suppressions(result: Row) -> str:
    if "suppressions" in result:
        rows = [
            [
                e["address"],
                "global" if e["scope"] == suppression.GLOBAL else e["scope"],
                e["reason"] + (f" ({e['class']})" if e["class"] else ""),
                _iso(e["created"]),
                "never" if e["expires"] is None else _iso(e["expires"]),
                e["detail"][:60],
            ]
            for e in result["suppressions"]
        ]
        if not rows:
            return "no suppressed addresses"
        return table(rows, ["ADDRESS", "SCOPE", "REASON", "SINCE", "LAPSES", "DETAIL"])
    if "added" in result:
        return f"suppressed {len(result['addresses'])} address(es)"
    if "removed" in result:
        return f"removed {result['removed']} entr{'y' if result['removed'] == 1 else 'ies'}"
    if "imported" in result:
        return f"imported {result['read']} entries"
    return ""  # export: the CSV went out; nothing to add to it


# -- source addresses on DNS blacklists -----------------------------------------------------

WATCH_OFF = "reputation.enabled = false or reputation.zones = []"


def _zone_state(row: Row | None) -> Row:
    """One zone's last answer about an address: listed, clean or unknown (never answered)."""
    if row is None:
        return {"status": "unknown", "checked_at": None}
    state: Row = {"status": row["status"] or "unknown", "checked_at": _iso(row["checked_at"])}
    if row["listed_at"] is not None:
        state |= {"answer": row["answer"], "reason": row["reason"]}
        state["listed_since"] = _iso(row["listed_at"])
    if row["errors"]:  # query errors since the last answer: they change no status
        state |= {"errors": row["errors"], "error": row["error"]}
    return state


def _sources(conn: sqlite3.Connection, cfg: configuration.Config) -> tuple[Row, list[Row]]:
    """The watch as configured, and each source address of the pools: its pools, its state on
    each zone, and the pools that leave it out (decided as the daemon does, from the same
    spool and config)."""
    rep, seen = cfg.reputation, listings.checks(conn)
    listed = {
        ip for (ip, zone), r in seen.items() if r["listed_at"] is not None and zone in rep.zones
    }
    left_out, full = ({}, {})
    if rep.active and rep.on_listing == "remove":
        left_out, full = exclusions(cfg.pools, listed)
    rows = []
    for ip, pools in addresses(cfg.pools).items():
        zones = {zone: _zone_state(seen.get((ip, zone))) for zone in rep.zones}
        statuses = {z["status"] for z in zones.values()}
        status = "listed" if "listed" in statuses else "clean" if statuses == {"clean"} else ""
        checked = [seen[(ip, z)]["checked_at"] for z in rep.zones if (ip, z) in seen]
        rows.append(
            {
                "ip": ip,
                "pools": pools,
                "status": status or "unknown",
                "last_checked": _iso(max(checked)) if checked else None,
                "left_out_of": [p for p in pools if ip in left_out.get(p, ())],
                "kept_listed_in": [p for p in pools if p in full],
                "zones": zones,
            }
        )
    watch = {"enabled": rep.active, "zones": list(rep.zones), "interval_s": rep.interval}
    return watch | {"on_listing": rep.on_listing}, rows


def _ip(text: str, command: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise CtlError(f"ip {command}: {text!r} is not an IP address") from None


def ip_list(conn: sqlite3.Connection, args: argparse.Namespace) -> Row:
    watch, rows = _sources(conn, args.cfg)
    return {"watch": watch, "ips": rows}


def ip_show(conn: sqlite3.Connection, args: argparse.Namespace) -> Row:
    """An address's state now and every listing recorded for it."""
    ip = _ip(args.ip, "show")
    watch, rows = _sources(conn, args.cfg)
    row = next((r for r in rows if _ip(r["ip"], "show") == ip), None)
    history = listings.history(conn, row["ip"] if row else ip)
    if row is None and not history:
        raise CtlError(
            f"ip show: {ip} is no source address of a pool in {args.cfg.path} and no listing"
            " of it is recorded"
        )
    row = row or {"ip": ip, "pools": [], "status": "not watched", "zones": {}}
    episodes = [
        {
            "zone": h["zone"],
            "answer": h["answer"],
            "reason": h["reason"],
            "listed_at": _iso(h["listed_at"]),
            "last_confirmed": _iso(h["checked_at"]),
            "delisted_at": _iso(h["delisted_at"]) if h["delisted_at"] else None,
            "listed_s": round((h["delisted_at"] or h["checked_at"]) - h["listed_at"], 1),
        }
        for h in history
    ]
    return {"watch": watch, **row, "listings": episodes}


def ip_check(conn: sqlite3.Connection, args: argparse.Namespace) -> Row:
    """Ask the running daemon for a round of lookups now (it reads the request within a
    second; a stopped relayd checks every address when it starts)."""
    cfg = args.cfg
    if not cfg.reputation.active:
        raise CtlError(f"ip check: the blacklist watch is off in {cfg.path} ({WATCH_OFF})")
    known = {_ip(a, "check"): a for a in addresses(cfg.pools)}
    if not known:
        raise CtlError(f"ip check: the pools of {cfg.path} have no source addresses to check")
    wanted = [_ip(a, "check") for a in args.ips]
    unknown = [a for a in wanted if a not in known]
    if unknown:
        raise CtlError(f"ip check: {unknown[0]} is no source address of a pool in {cfg.path}")
    ips = list(dict.fromkeys(known[a] for a in wanted))
    listings.request_check(conn, ips, time.time())
    return {"action": listings.CHECK, "ips": ips or list(known.values())}


def _zone_detail(zone: Row) -> str:
    parts = []
    if zone["status"] == "listed":
        parts.append(zone["answer"] + (f" {zone['reason']!r}" if zone["reason"] else ""))
    if zone.get("errors"):
        parts.append(f"{zone['errors']} query error(s) since its last answer: {zone['error']}")
    return "; ".join(parts)


def _zone_rows(row: Row) -> list[list[Any]]:
    effect = [f"left out of {p}" for p in row.get("left_out_of", [])]
    effect += [f"kept in {p}: every source of it is listed" for p in row.get("kept_listed_in", [])]
    out = []
    for name, zone in row["zones"].items():
        detail = [_zone_detail(zone)] + (effect if zone["status"] == "listed" else [])
        out.append(
            [
                row["ip"],
                ",".join(row["pools"]) or "-",
                name,
                zone["status"],
                zone.get("listed_since") or "-",
                zone["checked_at"] or "-",
                "; ".join(d for d in detail if d),
            ]
        )
    return out


def _watch_line(watch: Row) -> str:
    if not watch["enabled"]:
        return f"blacklist watch: off ({WATCH_OFF})"
    every = _age(watch["interval_s"])
    zones = ", ".join(watch["zones"])
    return f"blacklist watch: {zones}; every {every}; on_listing = {watch['on_listing']}"


_IP_HEAD = ["IP", "POOLS", "ZONE", "STATUS", "LISTED SINCE", "LAST CHECKED", "DETAIL"]


def render_ip_list(result: Row) -> str:
    rows = [r for ip in result["ips"] for r in _zone_rows(ip)]
    if not result["ips"]:
        return f"{_watch_line(result['watch'])}\nno source addresses: no pool has one ([pools.*])"
    return f"{_watch_line(result['watch'])}\n{table(rows, _IP_HEAD)}"


def render_ip_show(result: Row) -> str:
    pools = ",".join(result["pools"]) or "none"
    lines = [f"{result['ip']}: {result['status']} (pools: {pools})", _watch_line(result["watch"])]
    if result["zones"]:
        lines += ["", table(_zone_rows(result), _IP_HEAD)]
    history = [
        [
            h["zone"],
            h["listed_at"],
            h["delisted_at"] or "still listed",
            _age(h["listed_s"]),
            h["answer"],
            h["reason"] or "-",
        ]
        for h in result["listings"]
    ]
    if history:
        head = ["ZONE", "LISTED", "DELISTED", "FOR", "ANSWER", "REASON"]
        lines += ["", "listings:", table(history, head)]
    else:
        lines += ["", "no listing recorded"]
    return "\n".join(lines)


def render_ip_check(result: Row) -> str:
    return (
        f"asked relayd to check {len(result['ips'])} address(es) now: {', '.join(result['ips'])}"
        "; see relayctl ip list"
    )


def shaping_list(conn: sqlite3.Connection, args: argparse.Namespace) -> Row:
    """Adaptive shaping as configured, and the holds in force."""
    cfg = args.cfg.shaping
    files = [str(p) for p in (cfg.local_rules_file, cfg.rules_file) if p is not None]
    return {
        "adaptive": cfg.adaptive,
        "rules": len(cfg.rules),
        "rules_files": files,
        "providers": {name: list(p.mx) for name, p in cfg.providers.items()},
        "holds": holds.listing(conn, time.time()),
    }


def shaping_clear(conn: sqlite3.Connection, args: argparse.Namespace) -> Row:
    """End holds at once; the running relayd learns it from the operator event (a stopped one
    reads the holds left in force when it starts)."""
    ids = []
    for raw in args.ids:
        if not raw.isdigit():
            raise CtlError(f"shaping clear: {raw!r} is not a hold id (see relayctl shaping list)")
        ids.append(int(raw))
    cleared = holds.clear(conn, time.time(), ids, args.site, args.all)
    if not cleared:
        what = "" if args.all else f" {args.site!r}" if args.site else f" {', '.join(args.ids)}"
        raise CtlError(f"shaping clear: no hold in force{' at' if args.site else ''}{what}")
    return {"action": holds.CLEAR, "cleared": cleared}


def _hold_action(h: Row) -> str:
    if h["action"] != "rate":
        return h["action"]
    parts = [f"rate x{h['factor']:g}"]
    if "rate_per_min" in h:
        parts.append(f"({h['rate_per_min']:g}/min)")
    if "connections" in h:
        parts.append(f"<= {h['connections']} conn")
    return " ".join(parts)


def render_shaping_list(result: Row) -> str:
    state = "on" if result["adaptive"] else "off (shaping.adaptive = false: no new holds)"
    providers = "; ".join(f"{n} {', '.join(mx)}" for n, mx in result["providers"].items())
    files = ", ".join(result["rules_files"])
    lines = [
        f"adaptive shaping: {state}; {result['rules']} rule(s) from {files}",
        f"providers: {providers or 'none'}",
    ]
    if not result["holds"]:
        return "\n".join([*lines, "no hold in force"])
    rows = [
        [
            h["hold"],
            h["site"],
            h["source_ip"] or "(system)",
            _hold_action(h),
            h["since"],
            h["until"],
            h["rule"],
            " ".join(filter(None, (str(h["code"]), *split(h["response"])))),
        ]
        for h in result["holds"]
    ]
    head = ["ID", "SITE", "SOURCE", "ACTION", "SINCE", "UNTIL", "RULE", "REPLY"]
    return "\n".join([*lines, "", table(rows, head)])


def render_shaping_clear(result: Row) -> str:
    done = [
        f"{h['hold']} ({h['action']} {h['source_ip'] or '(system)'} at {h['site']})"
        for h in result["cleared"]
    ]
    return f"cleared {len(done)} hold(s): {', '.join(done)}"


# -- sender authentication -----------------------------------------------------------------


def check_domain(cfg: configuration.Config, args: argparse.Namespace) -> Row:
    """SPF, DKIM, DMARC, PTR, MTA-STS, TLS-RPT for one domain, through the [dns] resolver."""
    from relayd.senderauth import check, lookup  # checkdmarc and pyspf: only for this command

    found = check.check_domain(
        cfg, args.domain, lookup.Dns.from_config(cfg.dns), args.return_path_domain or ""
    )
    return found.as_json()


def _domain(text: str) -> str:
    try:
        return report.domain_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _check_status(result: Row) -> int:
    """check-domain's exit status: 1 when an item fails or could not be checked."""
    return 1 if result["status"] in ("fail", "error") else 0


# -- warm-up ----------------------------------------------------------------------------------


def warmup_status(conn: sqlite3.Connection, args: argparse.Namespace) -> Row:
    """Each source in warm-up: its schedule, its day, today's volume and what it has sent to
    each provider today (as the daemon last saved it, about every second)."""
    cfg, today = args.cfg, utc_day(time.time())
    stored = warmups.load(conn, today, {})
    sent: dict[str, list[tuple[str, int]]] = {}
    for ip, provider, count in stored.counts:
        sent.setdefault(ip, []).append((provider, count))
    pools = addresses(cfg.pools)
    rows = [
        _warmup_row(plan, pools[ip], stored.first_seen.get(ip), sent.get(ip, []), today)
        for ip, plan in sorted(plans(cfg.pools, cfg.warmup).items())
    ]
    return {"today": today.isoformat(), "sources": rows}


def _warmup_row(
    plan: Plan, pools: list[str], first_seen: date | None, sent: list[tuple[str, int]], today: date
) -> Row:
    start = plan.start or first_seen
    row: Row = {
        "ip": plan.address,
        "pools": pools,
        "schedule": plan.schedule,
        "start": start.isoformat() if start else None,
        "start_from": "warmup_start" if plan.start else "first seen" if start else None,
        "days": plan.length,
    }
    day = day_number(start, today) if start else 0
    status = "not started" if day < 1 else "warmed" if day > plan.length else "warming"
    providers = []
    for provider, count in sorted(sent):
        allowed = plan.volume(provider, day)
        spent = allowed is not None and count >= allowed
        providers.append({"provider": provider, "sent": count, "allowed": allowed, "spent": spent})
    return row | {
        "status": status,
        "day": day if start else None,
        "allowed": plan.volume(None, day),
        "per_provider": {p: plan.volume(p, day) for p in sorted(plan.rule.per_provider)},
        "providers": providers,
    }


def _volume(allowed: int | None) -> str:
    return "no limit" if allowed is None else str(allowed)


def _warmup_state(row: Row) -> str:
    since = f"from {row['start']} ({row['start_from']})"
    if row["start"] is None:
        return "not started: day 1 is the day relayd first sees it"
    if row["status"] == "not started":
        return f"not started: day 1 is {row['start']}"
    if row["status"] == "warmed":
        return f"warmed: {row['days']} day(s) {since}"
    return f"day {row['day']} of {row['days']} {since}"


def render_warmup(result: Row) -> str:
    if not result["sources"]:
        return "no source in warm-up: no [pools.*] source names a warmup schedule"
    lines = []
    for row in result["sources"]:
        pools = ",".join(row["pools"])
        lines.append(f"{row['ip']}  {row['schedule']}  {_warmup_state(row)}  pools: {pools}")
        if row["status"] != "warming":
            continue
        volumes = [f"{_volume(row['allowed'])} per provider"]
        volumes += [f"{p} {_volume(n)}" for p, n in row["per_provider"].items()]
        lines.append(f"  today ({result['today']}): {'; '.join(volumes)}")
        sent = [
            [
                f"  {p['provider']}",
                f"{p['sent']} / {_volume(p['allowed'])}",
                "spent" if p["spent"] else "",
            ]
            for p in row["providers"]
        ]
        lines.append(table(sent, ["  PROVIDER", "SENT / ALLOWED", ""]) if sent else "  none sent")
    return "\n".join(lines)


def _seconds(text: str) -> float:
    try:
        value = float(text.removesuffix("s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0:  # nan too
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}")
    return value


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

    p = sub.add_parser(
        "list", parents=[common], help="one line per queued message (list add|ls: contact lists)"
    )
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
        target.add_argument("--all", action="store_true", help="every queued recipient")
        p.set_defaults(run=change, render=render_change, write=True)

    for noun, kind, text, actions in (
        (
            "user",
            "login",
            "SMTP logins (auth.users_file)",
            (
                ("add", "add a login; password from a prompt or stdin"),
                ("passwd", "set a new password"),
                ("set", "change what a login may do"),
                ("del", "remove a login"),
                ("list", "show the logins"),
            ),
        ),
        (
            "key",
            "key",
            "API keys (auth.users_file); the secret is printed once",
            (
                ("add", "add a key and print its secret"),
                ("set", "change what a key may do"),
                ("rotate", "a new secret for a key (the old one stops working)"),
                ("revoke", "remove a key"),
                ("list", "show the keys"),
            ),
        ),
    ):
        p = sub.add_parser(noun, parents=[common], help=text)
        acts = p.add_subparsers(dest="action", required=True, metavar="ACTION")
        for action, help_text in actions:
            u = acts.add_parser(action, parents=[common], help=help_text)
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
                u.add_argument(
                    "--networks", nargs="+", metavar="CIDR", help="usable only from these"
                )
                u.add_argument(
                    "--stream",
                    choices=STREAMS,
                    help="its mail's stream when a message names none (default: transactional)",
                )
                if kind == "key":
                    u.add_argument(
                        "--scope",
                        action="append",
                        metavar="SCOPES",
                        help=f"comma list of {','.join(SCOPES)} (default: send)",
                    )
                    u.add_argument(
                        "--tracking",
                        action=argparse.BooleanOptionalAction,
                        help="--no-tracking: its HTML mail gets no open pixel or tracked links"
                        " ([tracking]; default: it may)",
                    )
            u.set_defaults(run=credential_command, render=render_credentials, needs="config")
            u.set_defaults(kind=kind)

    p = sub.add_parser("webhook", parents=[common], help="webhook endpoints (signed events)")
    hooks = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    w = hooks.add_parser("add", parents=[common], help="add an endpoint; prints its secret once")
    w.add_argument("url", metavar="URL", help="http:// or https:// URL the events are posted to")
    w.add_argument(
        "--events",
        action="append",
        required=True,
        metavar="TYPES",
        help="comma list of event types (delivered, bounced, deferred, expired, accepted, ...)"
        " or '*' for all",
    )
    w.add_argument("--batch", type=_count, default=1, metavar="N", help="events per POST (1)")
    w.add_argument("--concurrency", type=_count, default=1, metavar="N", help="POSTs at once (1)")
    w.add_argument(
        "--timeout", type=_seconds, metavar="SECONDS", help="per POST (default webhooks.timeout)"
    )
    w.set_defaults(write=True)
    w = hooks.add_parser("list", parents=[common], help="endpoints with their health")
    w.set_defaults(write=False)
    for action, text in (
        ("remove", "remove an endpoint"),
        ("rotate", "a new secret; the old one also signs for webhooks.rotation_overlap"),
        ("enable", "turn a disabled endpoint back on (from its cursor, or --from-now)"),
        ("disable", "stop posting to an endpoint (its cursor stays)"),
    ):
        w = hooks.add_parser(action, parents=[common], help=text)
        w.add_argument("endpoint", metavar="ID_OR_URL")
        if action == "rotate":
            w.add_argument(
                "--overlap", type=_seconds, metavar="SECONDS", help="instead of the config's"
            )
        if action == "enable":
            w.add_argument(
                "--from-now", action="store_true", help="skip the events it has not received"
            )
        w.set_defaults(write=True)
    for w in hooks.choices.values():
        w.set_defaults(run=webhook_command, render=render_webhooks)

    p = sub.add_parser("suppression", parents=[common], help="addresses relayd does not mail")
    acts = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    scope_help = "global (default), domain:DOMAIN, key:NAME (an API key) or auth:NAME (a login)"
    s = acts.add_parser("add", parents=[common], help="suppress addresses (they never lapse)")
    s.add_argument("addresses", nargs="+", metavar="ADDRESS")
    s.add_argument("--scope", default="global", help=scope_help)
    s.add_argument("--reason", default="manual", choices=REASONS)
    s.add_argument("--detail", default="", help="a note kept with the entry")
    s = acts.add_parser("remove", parents=[common], help="mail addresses again")
    s.add_argument("addresses", nargs="+", metavar="ADDRESS")
    s.add_argument("--scope", help="only this scope's entry (default: every scope's)")
    s = acts.add_parser("list", parents=[common], help="entries in force")
    s.add_argument("--scope", help=scope_help)
    s.add_argument("--reason", choices=REASONS)
    s.add_argument("--address")
    s.add_argument("--limit", type=_count, default=1000, metavar="N")
    s = acts.add_parser("import", parents=[common], help="add entries from CSV (as exported)")
    s.add_argument("file", metavar="FILE", help="CSV with a header row; - for stdin")
    s = acts.add_parser("export", parents=[common], help="every entry in force, as CSV")
    s.add_argument("file", metavar="FILE", nargs="?", default="-", help="default: stdout")
    for action, s in acts.choices.items():
        s.set_defaults(run=suppression_command, render=render_suppressions)
        s.set_defaults(write=action in ("add", "remove", "import"))

    p = sub.add_parser("ip", parents=[common], help="source addresses on DNS blacklists")
    ips = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    i = ips.add_parser("list", parents=[common], help="each source address: pools, status per zone")
    i.set_defaults(run=ip_list, render=render_ip_list, write=False)
    i = ips.add_parser("show", parents=[common], help="an address's status and its listings")
    i.add_argument("ip", metavar="IP")
    i.set_defaults(run=ip_show, render=render_ip_show, write=False)
    i = ips.add_parser("check", parents=[common], help="ask the running relayd to look up now")
    i.add_argument("ips", nargs="*", metavar="IP", help="source addresses (default: all)")
    i.set_defaults(run=ip_check, render=render_ip_check, write=True)

    p = sub.add_parser("shaping", parents=[common], help="adaptive shaping's holds on sources")
    acts = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    h = acts.add_parser("list", parents=[common], help="holds in force: suspensions, slowed rates")
    h.set_defaults(run=shaping_list, render=render_shaping_list, write=False)
    h = acts.add_parser("clear", parents=[common], help="end holds now (the daemon follows)")
    target = h.add_mutually_exclusive_group(required=True)
    target.add_argument("ids", nargs="*", default=[], metavar="ID")
    target.add_argument("--site", help="every hold at this site (a provider, or MX hosts)")
    target.add_argument("--all", action="store_true", help="every hold in force")
    h.set_defaults(run=shaping_clear, render=render_shaping_clear, write=True)

    p = sub.add_parser("warmup", parents=[common], help="source addresses in warm-up, today")
    p.set_defaults(run=warmup_status, render=render_warmup, write=False)

    from relayd.ctl import campaigns  # it imports this module's helpers

    campaigns.register(sub, common)

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

    p = sub.add_parser(
        "check-domain",
        parents=[common],
        help="SPF, DKIM, DMARC, PTR, MTA-STS, TLS-RPT of a sending domain (exit 1: a failure)",
    )
    p.add_argument("domain", type=_domain, metavar="DOMAIN", help="the From domain")
    p.add_argument(
        "--return-path-domain",
        type=_domain,
        metavar="DOMAIN",
        help="domain of the envelope sender, when not DOMAIN (SPF is checked there)",
    )
    p.set_defaults(
        run=check_domain, render=report.render, needs="config", exit_status=_check_status
    )
    reports.register(sub, common)
    top_command.register(sub, common)
    from relayd.ctl import contacts  # its commands use this module's helpers

    contacts.register(sub, common)
    from relayd.ctl import templates  # it builds on this module (CtlError)

    templates.register(sub, common)
    from relayd.ctl import operations  # backup, restore, log: it uses CtlError

    operations.register(sub, common)
    return top


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `relayctl ... | head` ends quietly, as cat
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
            args.cfg = cfg
            conn = admin.open_spool(cfg.server.spool_path, args.write)
            with contextlib.closing(conn), admin.transaction(conn, args.write):
                result = args.run(conn, args)
    except (CtlError, admin.Refused) as exc:
        print(f"relayctl: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        print(f"relayctl: spool: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2) if args.json else args.render(result)
    exported = getattr(args, "action", "") == "export" and args.file == "-"
    if text:  # after a CSV export to stdout, its summary goes to stderr
        print(text, file=sys.stderr if exported else sys.stdout)
    return args.exit_status(result) if hasattr(args, "exit_status") else 0


if __name__ == "__main__":
    sys.exit(main())
