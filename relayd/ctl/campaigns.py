"""relayctl campaign add|ls|show|pause|resume|cancel: the API's checks and changes, on the
spool directly (the running relayd's runner picks a new or resumed campaign up within
campaigns.poll_interval). A campaign made here belongs to the operator (owner ""), or to the
key or login --owner names, and goes to that owner's lists."""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from typing import Any

from relayd.campaigns import spec
from relayd.ctl.main import CtlError, Row, table
from relayd.spool import campaigns as sql

_OPTIONS = {"list_id": "--list", "segment_id": "--segment", "test_percent": "--test",
            "send_at": "--at", "from": "--from"}  # fmt: skip
FINAL = ("done", "cancelled", "failed")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("campaign", parents=[common], help="campaigns: lists mailed as bulk mail")
    acts = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = acts.add_parser("add", parents=[common], help="make a campaign (checked whole first)")
    a.add_argument("--name", required=True)
    a.add_argument("--from", dest="sender", required=True, help='"Name <address>" or address')
    a.add_argument("--list", dest="list_id", type=int, required=True, metavar="ID")
    a.add_argument("--segment", dest="segment_id", type=int, metavar="ID")
    a.add_argument("--template", metavar="NAME[:VERSION]", help="the template (default latest)")
    a.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:TEMPLATE:WEIGHT[:SUBJECT]",
        help="an A/B variant (repeatable); TEMPLATE as NAME[@VERSION], empty for --template's",
    )
    a.add_argument("--test", dest="test_percent", type=float, metavar="PERCENT")
    a.add_argument("--criterion", choices=spec.CRITERIA, default="click")
    a.add_argument("--wait", default="4h", help="the A/B test's wait, e.g. 4h")
    a.add_argument("--at", dest="send_at", metavar="TIME", help="RFC 3339 time (default now)")
    a.add_argument("--data", default="{}", metavar="JSON", help="the templates' data object")
    a.add_argument("--owner", default="", metavar="key:NAME", help="whose lists and templates")
    a.set_defaults(write=True)
    a = acts.add_parser("ls", parents=[common], help="every campaign with its state")
    a.set_defaults(write=False)
    a = acts.add_parser("show", parents=[common], help="a campaign and its live progress")
    a.add_argument("id", type=int, metavar="ID")
    a.add_argument("--watch", action="store_true", help="refresh every second until it ends")
    a.set_defaults(write=False)
    for action, text in (
        ("pause", "stop sending; its queued mail is held"),
        ("resume", "release its mail and go on"),
        ("cancel", "stop for good; its undelivered mail is removed, without DSNs"),
    ):
        a = acts.add_parser(action, parents=[common], help=text)
        a.add_argument("id", type=int, metavar="ID")
        a.set_defaults(write=True)
    for a in acts.choices.values():
        a.set_defaults(run=command, render=render)


def command(conn: sqlite3.Connection, args: argparse.Namespace) -> Row:
    now = time.time()
    if args.action == "add":
        try:
            found, _ = spec.add(conn, _given(args), args.owner, now, args.cfg.campaigns.min_wait)
        except spec.SpecError as exc:
            raise CtlError(f"campaign add: {_option(exc.field)}: {_problem(exc)}") from None
        return spec.describe(found)
    if args.action == "ls":
        return {"campaigns": [spec.describe(c) for c in sql.listing(conn, None)]}
    if args.action == "show":
        return _show(conn, args)
    try:
        found, _ = sql.control(conn, None, args.id, args.action, now)
    except sql.NotFound:
        raise CtlError(f"campaign {args.action}: no campaign {args.id}") from None
    except sql.Conflict as exc:
        raise CtlError(f"campaign {args.action}: {exc}") from None
    return spec.describe(found)


def _show(conn: sqlite3.Connection, args: argparse.Namespace) -> Row:
    while True:
        found = sql.get(conn, None, args.id)
        if found is None:
            raise CtlError(f"campaign show: no campaign {args.id}")
        doc = spec.describe(found, sql.progress(conn, args.id))
        if not args.watch or found["state"] in FINAL:
            return doc
        print(_progress_line(doc), file=sys.stderr, flush=True)
        conn.execute("COMMIT")  # a new snapshot for the next look
        time.sleep(1)  # the refresh interval of --watch, for a person watching
        conn.execute("BEGIN DEFERRED")


def _given(args: argparse.Namespace) -> spec.CampaignAdd:
    try:
        data = json.loads(args.data)
    except ValueError as exc:
        raise CtlError(f"campaign add: --data: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CtlError("campaign add: --data: a JSON object")
    default = _template(args.template) if args.template else None
    variants = []
    for i, text in enumerate(args.variant):
        name, _, rest = text.partition(":")
        template, _, rest = rest.partition(":")
        weight, _, subject = rest.partition(":")
        try:
            w = float(weight or 1)
        except ValueError:
            raise CtlError(f"campaign add: --variant {i + 1}: weight {weight!r}") from None
        name_version = _template(template.replace("@", ":")) if template else default
        if name_version is None:
            raise CtlError(f"campaign add: --variant {i + 1}: give a template (or --template)")
        variants.append(spec.Variant(name=name, weight=w, template=name_version[0],
                                     version=name_version[1], subject=subject or None))  # fmt: skip
    if not variants:
        if default is None:
            raise CtlError("campaign add: give --template or --variant")
        variants = [spec.Variant(name="A", template=default[0], version=default[1])]
    return spec.CampaignAdd(
        name=args.name, sender=args.sender, list_id=args.list_id, segment_id=args.segment_id,
        send_at=args.send_at, variants=variants, test_percent=args.test_percent,
        criterion=args.criterion, wait=args.wait, data=data,
    )  # fmt: skip


def _template(text: str) -> tuple[str, int | None]:
    name, _, version = text.partition(":")
    if version and not version.isdigit():
        raise CtlError(f"campaign add: template version {version!r}: a number")
    return name, int(version) if version else None


def _option(field: str) -> str:
    if field.startswith("variants["):
        n = int(field[9:].partition("]")[0]) + 1
        return f"--variant {n} ({field.partition('.')[2] or 'variants'})"
    return _OPTIONS.get(field, f"--{field.replace('_', '-')}")


def _problem(exc: spec.SpecError) -> str:
    if exc.line is None:
        return exc.problem
    return f"template error at line {exc.line}, column {exc.column}: {exc.problem}"


def _progress_line(doc: Row) -> str:
    p = doc["progress"]
    return (
        f"{doc['state']} ({doc['phase']}): {p['queued']}/{p['total']} queued, {p['suppressed']}"
        f" suppressed, {p['failed']} failed, {p['remaining']} remaining; sent"
        f" {p['delivery']['sent']}, deferred {p['delivery']['deferred']}, held"
        f" {p['delivery']['held']}"
    )


def render(result: Row) -> str:
    if "campaigns" in result:
        if not result["campaigns"]:
            return "no campaigns (make one: relayctl campaign add ...)"
        rows = [
            [c["id"], c["name"], c["state"], c["phase"], c["winner"] or "-", c["total"],
             c["send_at"], c["owner"] or "-"]
            for c in result["campaigns"]
        ]  # fmt: skip
        return table(rows, ["ID", "NAME", "STATE", "PHASE", "WINNER", "TOTAL", "SEND AT", "OWNER"])
    c = result
    test = "no A/B test" if c["test_percent"] is None else (
        f"A/B test on {c['test_percent']:g}% by {c['criterion']}, wait {c['wait']:g}s"
    )  # fmt: skip
    variants = ", ".join(
        f"{v['name']} ({v['template'] or 'inline'}"
        f"{'' if v['version'] is None else ' v' + str(v['version'])}, weight {v['weight']:g})"
        for v in c["variants"]
    )
    lines = [
        f"campaign {c['id']}: {c['name']} from {c['from']} to list {c['list_id']}"
        + (f" segment {c['segment_id']}" if c["segment_id"] else ""),
        f"state: {c['state']}, phase {c['phase']}, winner {c['winner'] or '-'}",
        f"{test}; variants {variants}",
        f"send at {c['send_at']}; started {c['started'] or '-'}; finished {c['finished'] or '-'}",
    ]
    if "progress" in c:
        lines.append(_progress_line(c))
    return "\n".join(lines)
