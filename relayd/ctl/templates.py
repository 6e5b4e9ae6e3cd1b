"""relayctl template: add a version from a file, list, show, preview. A template error is
printed as FILE:LINE:COLUMN: problem (as a compiler would), and nothing is stored."""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from relayd.ctl.main import CtlError
from relayd.spool import templates as stored
from relayd.templates import SAMPLE, TemplateError, compile_template, contact


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("template", parents=[common], help="campaign templates (versioned)")
    acts = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    owner_help = "whose template: key:NAME (an API key's), default \"\" (the operator's)"
    t = acts.add_parser("add", parents=[common], help="add a template, or a new version of one")
    t.add_argument("name", metavar="NAME")
    t.add_argument("file", metavar="FILE", help="the HTML or MJML source")
    t.add_argument("--kind", choices=("html", "mjml"), help="default: mjml for *.mjml files")
    t.add_argument("--subject", required=True, help="the subject (a template too)")
    t.add_argument("--from-name", default="", help="the sender's display name (a template too)")
    t.add_argument("--text", metavar="FILE", help="the text part (default: made from the HTML)")
    t.add_argument(
        "--defaults",
        metavar="JSON",
        default="{}",
        help="what contact.X, data.X fall back to, as a JSON object",
    )
    t.set_defaults(run=add, render=_render_added, write=True)
    t = acts.add_parser("ls", parents=[common], help="templates, with their latest version")
    t.set_defaults(run=listing, render=_render_listing, write=False)
    t = acts.add_parser("show", parents=[common], help="a template's source (latest version)")
    t.add_argument("name", metavar="NAME")
    t.add_argument("--version", type=int, help="this version instead of the latest")
    t.set_defaults(run=show, render=_render_show, write=False)
    t = acts.add_parser("preview", parents=[common], help="render for a sample contact")
    t.add_argument("name", metavar="NAME")
    t.add_argument("--version", type=int, help="this version instead of the latest")
    t.add_argument(
        "--contact", metavar="JSON", default="{}", help='{"email": ..., "attributes": {...}}'
    )
    t.add_argument("--data", metavar="JSON", default="{}", help="the campaign's data")
    t.set_defaults(run=preview, render=_render_preview, write=False)
    for t in acts.choices.values():
        t.add_argument("--owner", default="", help=owner_help)


def add(conn: sqlite3.Connection, args: argparse.Namespace) -> dict[str, Any]:
    path = Path(args.file)
    kind = args.kind or ("mjml" if path.suffix == ".mjml" else "html")
    source = _read(path)
    text = _read(Path(args.text)) if args.text else ""
    defaults = _object(args.defaults, "--defaults")
    files = {"subject": "--subject", "from_name": "--from-name", "text": str(args.text)}
    try:
        compile_template(kind, args.subject, args.from_name, source, text, defaults)
    except TemplateError as exc:
        where = files.get(exc.field, str(path))
        raise CtlError(f"{where}:{exc.line}:{exc.column}: {exc.problem}") from None
    version = stored.add(
        conn,
        args.owner,
        args.name,
        kind,
        args.subject,
        args.from_name,
        source,
        text,
        defaults,
        time.time(),
    )
    return {"name": args.name, "version": version, "kind": kind}


def listing(conn: sqlite3.Connection, args: argparse.Namespace) -> list[dict[str, Any]]:
    return stored.listing(conn, args.owner)


def show(conn: sqlite3.Connection, args: argparse.Namespace) -> dict[str, Any]:
    return _get(conn, args).as_json()


def preview(conn: sqlite3.Connection, args: argparse.Namespace) -> dict[str, Any]:
    found = _get(conn, args)
    given = _object(args.contact, "--contact")
    unknown = set(given) - {"email", "attributes"}
    if unknown:
        raise CtlError(f"--contact: unknown field {sorted(unknown)[0]!r} (email, attributes)")
    email = given.get("email", SAMPLE["contact"]["email"])
    attributes = given.get("attributes", {})
    if not isinstance(email, str) or not isinstance(attributes, dict):
        raise CtlError("--contact: email is a string, attributes an object")
    try:
        compiled = compile_template(
            found.kind, found.subject, found.from_name, found.html, found.text, found.defaults
        )
        out = compiled.render(
            {
                "contact": contact(email, attributes),
                "data": _object(args.data, "--data"),
                "unsubscribe_url": SAMPLE["unsubscribe_url"],
            }
        )
    except TemplateError as exc:
        raise CtlError(f"{args.name}:{exc.field}:{exc.line}:{exc.column}: {exc.problem}") from None
    return {"subject": out.subject, "from": out.from_name, "text": out.text, "html": out.html}


def _get(conn: sqlite3.Connection, args: argparse.Namespace) -> stored.Template:
    found = stored.get(conn, args.owner, args.name, args.version)
    if found is None:
        which = f" version {args.version}" if args.version is not None else ""
        raise CtlError(f"no template {args.name}{which}")
    return found


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CtlError(f"{path}: {exc}") from None


def _object(text: str, option: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CtlError(f"{option}: not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CtlError(f'{option}: a JSON object, as {{"name": "value"}}')
    return value


def _render_added(result: dict[str, Any]) -> str:
    return f"{result['name']}: version {result['version']} ({result['kind']})"


def _render_listing(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no templates"
    lines = [f"{'NAME':<24} {'VERSION':>7} {'KIND':<5} {'VERSIONS':>8}  SUBJECT"]
    for r in rows:
        lines.append(
            f"{r['name']:<24} {r['version']:>7} {r['kind']:<5} {r['versions']:>8}  {r['subject']}"
        )
    return "\n".join(lines)


def _render_show(t: dict[str, Any]) -> str:
    head = [
        f"name: {t['name']}",
        f"version: {t['version']}",
        f"kind: {t['kind']}",
        f"subject: {t['subject']}",
        f"from_name: {t['from_name']}",
        f"defaults: {json.dumps(t['defaults'])}",
    ]
    text = ["", "-- text --", t["text"]] if t["text"] else []
    return "\n".join([*head, "", f"-- {t['kind']} --", t[t["kind"]], *text])


def _render_preview(out: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"Subject: {out['subject']}",
            f"From name: {out['from']}",
            "",
            "-- text --",
            out["text"],
            "-- html --",
            out["html"],
        ]
    )
