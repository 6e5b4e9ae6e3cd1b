"""relayctl report ID: a campaign's report as a table (--json: the API's document), or with
--url a login link to its page on relayd's HTTP listener, signed with the spool's secret."""

from __future__ import annotations

import argparse
import sqlite3
import time
from typing import Any

from relayd.campaigns import report
from relayd.feedback.tokens import Tokens
from relayd.spool import admin, schema

COLUMNS = ("sent", "delivered", "deferred", "bounced", "suppressed", "opened", "clicked")
COLUMNS += ("converted", "unsubscribed", "complained")
RATES = ("delivery_rate", "open_rate", "click_rate", "conversion_rate", "bounce_rate")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("report", parents=[common], help="a campaign's figures, A/B test, page")
    p.add_argument("campaign", type=int, metavar="ID")
    p.add_argument(
        "--url", action="store_true", help="print a login link to the report page (short-lived)"
    )
    p.set_defaults(run=run, render=render, write=False)


def run(conn: sqlite3.Connection, args: argparse.Namespace) -> dict[str, Any]:
    doc = report.report(conn, args.campaign)
    if doc is None:
        raise admin.Refused(f"no campaign {args.campaign}")
    if not args.url:
        return doc
    cfg = args.cfg
    base = cfg.reports.base_url(cfg.listeners)
    if not base:
        raise admin.Refused("the report page needs an http or https listener ([[listeners]])")
    token = Tokens(schema.secret(conn, "tokens")).login(args.campaign, time.time())
    minutes = int(cfg.reports.login_max_age // 60)
    return {"url": f"{base}/ui/login/{token}", "campaign": args.campaign, "minutes": minutes}


def render(doc: dict[str, Any]) -> str:
    if "url" in doc:
        return (
            f"{doc['url']}\n(works for {doc['minutes']} minutes: it opens the page of campaign"
            f" {doc['campaign']} and logs the browser in to it)"
        )
    c = doc["campaign"]
    lines = [f"campaign {c['id']} {c['name']!r}: {c['state']}, phase {c['phase']}"]
    if c["winner"]:
        lines[0] += f", winner {c['winner']}"
    rows = [*doc["variants"].items(), ("all", doc["total"])]
    lines.append("")
    lines += _table(
        ["variant", *COLUMNS], [[name, *(v["counts"][k] for k in COLUMNS)] for name, v in rows]
    )
    lines.append("")
    lines += _table(
        ["variant", *(r.removesuffix("_rate") for r in RATES)],
        [[name, *(f"{v['rates'][r] * 100:.1f}%" for r in RATES)] for name, v in rows],
    )
    classes = doc["total"]["bounced_by_class"]
    if classes:
        lines.append("")
        lines.append("bounced by class: " + ", ".join(f"{k} {n}" for k, n in classes.items()))
    cmp = doc["comparison"]
    if cmp:
        verdict = f"significant: {cmp['winner']} wins" if cmp["significant"] else "not significant"
        lines.append("")
        lines.append(
            f"A/B by {cmp['rate']}: {cmp['leader']} against {cmp['against']}:"
            f" z {cmp['z']:.3f}, p {cmp['p']:.4f}, {verdict}"
        )
    return "\n".join(lines)


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [head, *[[str(x) for x in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    out = []
    for row in cells:
        pairs = enumerate(zip(row, widths, strict=True))
        out.append("  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in pairs))
    return out
