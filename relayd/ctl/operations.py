"""relayctl backup, restore and log: a consistent copy of the running spool, that copy put back
on a fresh host, and the whole story of one message from the event log."""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from relayd import config as configuration
from relayd.ctl.main import CtlError, _iso
from relayd.spool import backup

Row = dict[str, Any]

# The facts of an event worth a column, in this order, when its data has them.
FACTS = ("mx", "source_ip", "code", "response", "class", "attempt", "delay_s")
FACTS += ("next_attempt_in_s", "kind", "original_queue_id", "failed", "delivered", "reason")
FACTS += ("scope", "url", "bot", "feedback_type", "action", "campaign", "variant")
RECEPTION = ("sender", "client", "helo", "origin", "size", "dkim", "stream")  # accepted's


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "backup", parents=[common], help="a consistent copy of the spool, while relayd runs"
    )
    p.add_argument("file", type=Path, metavar="FILE", help="the backup to write (one SQLite file)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.set_defaults(run=take, render=render_backup, needs="config")

    p = sub.add_parser(
        "restore", parents=[common], help="put a backup in server.spool_path (relayd stopped)"
    )
    p.add_argument("file", type=Path, metavar="FILE", help="a file written by relayctl backup")
    p.add_argument("--force", action="store_true", help="replace a spool that is there")
    p.set_defaults(run=restore, render=render_backup, needs="config")

    p = sub.add_parser("log", parents=[common], help="one message's whole story (event log)")
    p.add_argument("queue_id", metavar="QUEUE_ID")
    p.set_defaults(run=story, render=render_story, write=False)


def outside(cfg: configuration.Config) -> list[str]:
    """The files relayd needs that live outside the spool, so not in any backup of it."""
    files = [cfg.path, cfg.auth.users_file, cfg.tls.cert_file, cfg.tls.key_file]
    files += [k.key_file for k in cfg.dkim.keys]
    return [str(f) for f in dict.fromkeys(files) if f is not None and f.exists()]


def take(cfg: configuration.Config, args: argparse.Namespace) -> Row:
    started = time.monotonic()
    try:
        made = backup.take(cfg.server.spool_path, args.file.resolve(), args.force)
    except backup.Refused as exc:
        raise CtlError(f"backup: {exc}") from None
    took = round(time.monotonic() - started, 3)
    return {"action": "backup", **made.as_json(), "seconds": took, "not_included": outside(cfg)}


def restore(cfg: configuration.Config, args: argparse.Namespace) -> Row:
    started = time.monotonic()
    try:
        put = backup.restore(args.file.resolve(), cfg.server.spool_path, time.time(), args.force)
    except backup.Refused as exc:
        raise CtlError(f"restore: {exc}") from None
    took = round(time.monotonic() - started, 3)
    return {"action": "restore", **put.as_json(), "seconds": took, "not_included": outside(cfg)}


def render_backup(doc: Row) -> str:
    verb = "backup written" if doc["action"] == "backup" else "spool restored"
    lines = [
        f"{verb}: {doc['path']} ({doc['bytes']:,} bytes in {doc['seconds']:.3f} s)",
        f"schema version {doc['schema_version']}, newest event {doc['newest_event']},"
        f" {doc['messages']:,} messages, {doc['queued_recipients']:,} recipients queued",
    ]
    if doc["action"] == "restore":
        lines.append("recipients that were being delivered are made due again when relayd starts")
        jump = doc["newest_event"] + backup.EVENT_ID_JUMP
        lines.append(f"new event ids start above {jump} (those after the backup are not reused)")
    lines.append("NOT in the spool (copy them yourself): " + ", ".join(doc["not_included"]))
    return "\n".join(lines)


def story(conn: sqlite3.Connection, args: argparse.Namespace) -> Row:
    """The message's events in order (and the DSNs queued for it), each with the webhook
    endpoints it was for: acknowledged when at or before the endpoint's cursor."""
    rows = conn.execute(
        "SELECT id, at, type, queue_id, rcpt, data FROM events WHERE queue_id = ? ORDER BY id",
        (args.queue_id,),
    ).fetchall()
    if not rows:
        raise CtlError(f"no events for queue id {args.queue_id}")
    rows += conn.execute(  # a DSN's event carries the DSN's queue id, and names the original
        "SELECT id, at, type, queue_id, rcpt, data FROM events WHERE id > ?"
        " AND type = 'dsn_queued' AND json_extract(data, '$.original_queue_id') = ?",
        (rows[0][0], args.queue_id),
    ).fetchall()
    hooks = conn.execute(
        "SELECT id, url, events, created, cursor, disabled FROM webhooks ORDER BY id"
    ).fetchall()
    events = []
    for event_id, at, kind, queue_id, rcpt, data in sorted(rows):
        webhooks = [
            {"id": hid, "url": url, "acknowledged": event_id <= cursor}
            | ({"disabled": disabled} if disabled and event_id > cursor else {})
            for hid, url, types, created, cursor, disabled in hooks
            if at >= created and (types == "*" or kind in types.split(","))
        ]
        events.append(
            {
                "id": event_id,
                "at": _iso(at),
                "type": kind,
                "queue_id": queue_id,
                "rcpt": rcpt,
                "data": json.loads(data),
                "webhooks": webhooks,
            }
        )
    return {"queue_id": args.queue_id, "events": events}


def render_story(doc: Row) -> str:
    lines = []
    for e in doc["events"]:
        data = e["data"]
        rcpt = e["rcpt"] or (",".join(data["rcpt"]) if isinstance(data.get("rcpt"), list) else "")
        keys = RECEPTION if e["type"] == "accepted" else FACTS
        facts = [f"{k}={_fact(data[k])}" for k in keys if data.get(k) not in (None, "", [])]
        if e["queue_id"] != doc["queue_id"]:
            facts.append(f"dsn={e['queue_id']}")
        for hook in e["webhooks"]:
            said = "acknowledged" if hook["acknowledged"] else "not yet acknowledged"
            facts.append(
                f"webhook {hook['id']} {said}"
                + (f" ({hook['disabled']})" if "disabled" in hook else "")
            )
        lines.append(f"{e['at']}  #{e['id']}  {e['type']:<12} {rcpt or '-'}  " + "  ".join(facts))
    return "\n".join(lines)


def _fact(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    text = str(value)
    return json.dumps(text) if " " in text else text
