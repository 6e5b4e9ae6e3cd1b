"""relayctl's contact commands: lists (``list add|ls``), contacts (``contacts import|show|
unsubscribe``) and segments (``segment add|ls``). The SQL is in relayd.spool.contacts; an
import writes straight to the spool in transactions of relayd.contacts.BATCH rows, so that the
running daemon's writer never waits long for the lock."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from relayd import config as configuration
from relayd.contacts import BATCH, Collector, Invalid, address, csvimport
from relayd.ctl.main import CtlError, Row, _count, _iso, table
from relayd.ingress import suppression as suppressions
from relayd.ingress.credentials import load_credentials
from relayd.spool import admin, suppression
from relayd.spool import contacts as store

SHOWN_REJECTED = 10  # bad lines printed after an import's summary


def owner_of(text: str) -> str:
    """``--owner``: "" (the operator's, the default) or an API key's or login's account."""
    if not text:
        return ""
    try:
        scope = suppressions.parse_scope(text)
    except suppressions.Invalid as exc:
        raise argparse.ArgumentTypeError(exc.problem) from None
    if not scope.startswith(("key:", "auth:")):
        raise argparse.ArgumentTypeError(f"{text!r}: give key:NAME or auth:NAME")
    return scope


def scopes_of(cfg: configuration.Config, owner: str) -> list[str]:
    """The suppression scopes of the owner's contacts (its senders from auth.users_file)."""
    kind, _, name = owner.partition(":")
    creds = load_credentials(cfg.auth.users_file) if owner else {}
    cred = creds.get(f"{'login' if kind == 'auth' else 'key'}:{name}")
    return store.scopes(owner, cred.senders if cred else ())


# -- lists and segments (one transaction, run by relayctl's main) ---------------------------


def _refusals(run: Callable[..., Row]) -> Callable[..., Row]:
    """The store's refusals (no such list, a name taken) as relayctl errors."""

    @functools.wraps(run)
    def checked(*args: Any) -> Row:
        try:
            return run(*args)
        except store.NotFound as exc:
            raise CtlError(str(exc)) from None
        except store.Conflict as exc:
            raise CtlError(exc.problem) from None

    return checked


@_refusals
def list_command(conn: sqlite3.Connection, args: argparse.Namespace) -> Row:
    if args.list_action == "add":
        return {"list": store.add_list(conn, args.owner, args.name, time.time())}
    return {"lists": store.lists(conn, None if args.all_owners else args.owner)}


def render_lists(result: Row) -> str:
    if "list" in result:
        found = result["list"]
        return f"list {found['id']} {found['name']!r} added"
    rows = [
        [li["id"], li["owner"] or "-", li["name"], li["contacts"], ",".join(li["attributes"])]
        for li in result["lists"]
    ]
    if not rows:
        return "no lists"
    return table(rows, ["ID", "OWNER", "NAME", "CONTACTS", "ATTRIBUTES"])


@_refusals
def segment_command(conn: sqlite3.Connection, args: argparse.Namespace) -> Row:
    if args.segment_action == "ls":
        return {"segments": store.segments_of(conn, None if args.all_owners else args.owner)}
    try:
        spec = json.loads(args.filter)
    except json.JSONDecodeError as exc:
        raise CtlError(f"segment add: --filter: not JSON: {exc}") from None
    found = store.find_list(conn, args.list, args.owner)
    try:
        segment = store.add_segment(conn, args.owner, args.name, found["id"], spec, time.time())
    except Invalid as exc:
        raise CtlError(f"segment add: --filter: {exc.field}: {exc.problem}") from None
    return {"segment": segment}


def render_segments(result: Row) -> str:
    if "segment" in result:
        s = result["segment"]
        return f"segment {s['id']} {s['name']!r} of list {s['list_id']}: {s['contacts']} contacts"
    rows = [
        [s["id"], s["owner"] or "-", s["name"], s["list_id"], s["contacts"],
         json.dumps(s["filter"])[:60]]
        for s in result["segments"]
    ]  # fmt: skip
    if not rows:
        return "no segments"
    return table(rows, ["ID", "OWNER", "NAME", "LIST", "CONTACTS", "FILTER"])


@_refusals
def contact_command(conn: sqlite3.Connection, args: argparse.Namespace) -> Row:
    try:
        addr = address(args.address)
    except Invalid as exc:
        raise CtlError(f"contacts {args.action}: {exc.problem}") from None
    now = time.time()
    if args.action == "unsubscribe":
        return {"unsubscribed": store.unsubscribe(conn, args.owner, addr, now)}
    return {"contact": store.contact(conn, args.owner, addr, scopes_of(args.cfg, args.owner), now)}


def render_contact(result: Row) -> str:
    if "unsubscribed" in result:
        u = result["unsubscribed"]
        scope = "all senders" if u["scope"] == suppression.GLOBAL else u["scope"]
        return f"{u['email']} unsubscribed (suppression list, for {scope})"
    c = result["contact"]
    lines = [
        f"email:      {c['email']}",
        f"status:     {c['status']}",
        f"lists:      {', '.join(map(str, c['lists'])) or '-'}",
        f"created:    {_iso(c['created'])}   updated: {_iso(c['updated'])}",
        "attributes:",
    ]
    lines += [f"  {k}: {json.dumps(v, ensure_ascii=False)}" for k, v in c["attributes"].items()]
    return "\n".join(lines)


# -- importing (transactions of its own) --------------------------------------------------


@contextlib.contextmanager
def _csv_in(name: str) -> Iterator[tuple[TextIO, Any, int]]:
    """The file as text (a BOM dropped; bytes that are not UTF-8 kept for the row check), the
    binary stream under it (for the progress bar), and its size (0: unknown)."""
    raw = sys.stdin.buffer if name == "-" else open(name, "rb")  # noqa: SIM115
    try:
        size = os.fstat(raw.fileno()).st_size if name != "-" else 0
        text = io.TextIOWrapper(raw, "utf-8-sig", "surrogateescape", newline="")
        yield text, raw, size
        text.detach()
    finally:
        if name != "-":
            raw.close()


@_refusals
def import_command(cfg: configuration.Config, args: argparse.Namespace) -> Row:
    """``contacts import LIST FILE``: the good rows are imported, the bad ones reported by
    line (nothing is imported when the header cannot be used)."""
    owner, name = args.owner, args.file
    conn = admin.open_spool(cfg.server.spool_path, write=True)
    conn.execute("PRAGMA cache_size=-65536")  # the contacts index: most of it stays in memory
    conn.execute("PRAGMA temp_store=MEMORY")
    collector, imported, updated = Collector("line", args.batch), 0, 0
    started, longest = time.monotonic(), 0.0  # the longest write transaction: the daemon's wait
    with contextlib.closing(conn):
        with admin.transaction(conn, False):
            target = store.find_list(conn, args.list, owner)
        try:
            with _csv_in(name) as (text, raw, size):
                bar = tqdm(
                    total=size or None,
                    unit="B" if size else " rows",
                    unit_scale=True,
                    desc=Path(name).name if name != "-" else "stdin",
                    file=sys.stderr,
                    disable=not sys.stderr.isatty(),
                    leave=False,
                )

                def shown(read: Collector) -> None:  # after each batch is written
                    bar.update((raw.tell() if size else read.read) - bar.n)
                    bar.set_postfix(rows=read.read, rejected=read.rejected_count)

                with bar:
                    for batch in csvimport.batches(text, collector, shown):
                        began = time.monotonic()
                        with admin.transaction(conn, True):
                            new, known = store.add_batch(
                                conn, owner, target["id"], batch.rows, batch.names, time.time()
                            )
                        longest = max(longest, time.monotonic() - began)
                        imported, updated = imported + new, updated + known
        except Invalid as exc:
            raise CtlError(f"contacts import: {name}: {exc.field}: {exc.problem}") from None
        except OSError as exc:
            raise CtlError(f"contacts import: {name}: {exc.strerror}") from None
    return {
        "file": name,
        "list": target["name"],
        "list_id": target["id"],
        "imported": imported,
        "updated": updated,
        "rejected": collector.rejected,
        "rejected_count": collector.rejected_count,
        "seconds": round(time.monotonic() - started, 3),
        "longest_transaction_s": round(longest, 3),
    }


def render_import(result: Row) -> str:
    lines = [
        f"{result['file']}: imported {result['imported']}, updated {result['updated']},"
        f" rejected {result['rejected_count']} into list {result['list']!r}"
        f" in {result['seconds']:.1f} s"
    ]
    for bad in result["rejected"][:SHOWN_REJECTED]:
        lines.append(f"{result['file']}: line {bad['line']}: {bad['field']}: {bad['problem']}")
    more = result["rejected_count"] - min(len(result["rejected"]), SHOWN_REJECTED)
    if more > 0:
        lines.append(f"... and {more} more rejected (--json lists the first 1000)")
    return "\n".join(lines)


def _import_status(result: Row) -> int:
    return 1 if result["rejected_count"] else 0


# -- the parser --------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the commands to relayctl's parser. ``list`` (the queue's messages) keeps its
    meaning without an action; ``list add|ls`` manage contact lists."""

    def owned(p: argparse.ArgumentParser, listing: bool = False) -> None:
        p.add_argument(
            "--owner",
            type=owner_of,
            default="",
            metavar="key:NAME",
            help="whose (an API key's or login's account; default: the operator's)",
        )
        if listing:
            p.add_argument("--all-owners", action="store_true", help="every owner's")

    queue_list = sub.choices["list"]
    queue_list.description = (
        "Without an action: one line per queued message. With one: contact lists."
    )
    acts = queue_list.add_subparsers(dest="list_action", metavar="ACTION")
    p = acts.add_parser("add", parents=[common], help="add a contact list")
    p.add_argument("name", metavar="NAME")
    owned(p)
    p.set_defaults(write=True)
    p = acts.add_parser("ls", parents=[common], help="contact lists with their sizes")
    owned(p, listing=True)
    p.set_defaults(write=False)
    for p in acts.choices.values():
        p.set_defaults(run=list_command, render=render_lists)

    p = sub.add_parser("contacts", parents=[common], help="campaign contacts: import, show")
    acts = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = acts.add_parser(
        "import",
        parents=[common],
        help="import contacts from CSV into a list",
        description="Import FILE (CSV: a header row naming the attributes, one column named"
        " email or address) into LIST. A known address gets its attributes merged (the file's"
        " values win; an empty cell leaves one as it was); a cell that reads as a number"
        " (without a leading zero) is stored as one, for filters like age ge 18. A bad file"
        " imports its good rows: rows with an invalid address, the wrong number of fields or an"
        " address seen earlier in the file are skipped and reported by line number (exit"
        " status 1); only a header that cannot be used stops the import before anything is"
        " written.",
    )
    c.add_argument("list", metavar="LIST", help="the list's name (or id)")
    c.add_argument("file", metavar="FILE", help="CSV file; - for stdin")
    c.add_argument(
        "--batch",
        type=_count,
        default=BATCH,
        metavar="N",
        help=f"rows per transaction (default {BATCH})",
    )
    owned(c)
    c.set_defaults(
        run=import_command, render=render_import, needs="config", exit_status=_import_status
    )
    for action, text in (
        ("show", "a contact's attributes, lists and status"),
        ("unsubscribe", "put an address on the suppression list (reason unsubscribe)"),
    ):
        c = acts.add_parser(action, parents=[common], help=text)
        c.add_argument("address", metavar="ADDRESS")
        owned(c)
        c.set_defaults(run=contact_command, render=render_contact, write=action != "show")

    p = sub.add_parser("segment", parents=[common], help="segments: lists narrowed by a filter")
    acts = p.add_subparsers(dest="segment_action", required=True, metavar="ACTION")
    s = acts.add_parser("add", parents=[common], help="add a segment of a list")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--list", required=True, metavar="LIST", help="the list's name (or id)")
    s.add_argument(
        "--filter",
        required=True,
        metavar="JSON",
        help='e.g. {"all": [{"attr": "country", "op": "eq", "value": "DE"}]}; all any not;'
        " ops eq ne lt le gt ge in contains exists",
    )
    owned(s)
    s.set_defaults(write=True)
    s = acts.add_parser("ls", parents=[common], help="segments with their sizes")
    owned(s, listing=True)
    s.set_defaults(write=False)
    for s in acts.choices.values():
        s.set_defaults(run=segment_command, render=render_segments)
