"""A campaign's report: per variant what became of its mail (sent, delivered, deferred, bounced
by class, suppressed, opened, clicked, converted, unsubscribed, complained) with the rates,
the A/B comparison by the campaign's criterion (a two-proportion test), and the series per
minute. One document, read from the folded figures (relayd.campaigns.stats), that the API
serves as JSON, relayctl prints as a table and the report page draws."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from relayd.campaigns import abtest, stats

MAX_POINTS = 720  # a longer campaign's series is in steps of several minutes
SERIES = ("sent", "delivered", "bounced", "opened", "clicked")  # the time series' metrics
# criterion -> the unique count its rate is of (over delivered)
CRITERIA = {"click": "clicked", "open": "opened", "conversion": "converted"}


def report(conn: sqlite3.Connection, campaign_id: int) -> dict[str, Any] | None:
    """The whole report, or None when there is no such campaign."""
    row = conn.execute(
        "SELECT id, owner, name, state, phase, winner, spec, total, created, started, finished"
        " FROM campaigns WHERE id = ?",
        (campaign_id,),
    ).fetchone()
    if row is None:
        return None
    cid, owner, name, state, phase, winner, spec, total, created, started, finished = row
    try:
        criterion = str(json.loads(spec).get("criterion") or "click")
    except (ValueError, AttributeError):
        criterion = "click"
    criterion = criterion if criterion in CRITERIA else "click"
    totals = stats.totals(conn, cid)
    variants = {v: figures(c) for v, c in totals.items()}
    return {
        "campaign": {
            "id": cid,
            "name": name,
            "owner": owner,
            "state": state,
            "phase": phase,
            "winner": winner or None,
            "criterion": criterion,
            "contacts": total,
            "created": iso(created),
            "started": iso(started),
            "finished": iso(finished),
        },
        "variants": variants,
        "total": figures(sum(totals.values(), Counter())),
        "comparison": compare(variants, criterion),
        "series": series(conn, cid, list(totals)),
    }


def figures(c: Counter[str]) -> dict[str, Any]:
    """One variant's (or the campaign's) counts, bounces by class, and rates."""
    counts = {
        "sent": c["sent"],
        "delivered": c["delivered"],
        "deferred": c["deferred"],
        "bounced": c["bounced"],
        "suppressed": c["suppressed"],
        "opened": c["opened_unique"],
        "clicked": c["clicked_unique"],
        "converted": c["converted"],
        "unsubscribed": c["unsubscribed"],
        "complained": c["complained"],
        "opens_total": c["opened"],
        "clicks_total": c["clicked"],
        "opens_bot": c["opened_bot"],
        "clicks_bot": c["clicked_bot"],
    }
    classes = {m.partition(":")[2]: n for m, n in sorted(c.items()) if m.startswith("bounced:")}
    sent, delivered = counts["sent"], counts["delivered"]
    rates = {
        "delivery_rate": _ratio(delivered, sent),
        "bounce_rate": _ratio(counts["bounced"], sent),
        "open_rate": _ratio(counts["opened"], delivered),
        "click_rate": _ratio(counts["clicked"], delivered),
        "conversion_rate": _ratio(counts["converted"], delivered),
        "unsubscribe_rate": _ratio(counts["unsubscribed"], delivered),
        "complaint_rate": _ratio(counts["complained"], delivered),
    }
    return {"counts": counts, "bounced_by_class": classes, "rates": rates}


def _ratio(x: int, n: int) -> float:
    return round(x / n, 6) if n else 0.0


def compare(variants: dict[str, dict[str, Any]], criterion: str) -> dict[str, Any] | None:
    """The leading variant by the criterion's rate against the next: z, p, whether the
    difference is significant (p < 0.05), and the winner (None while it is not). None with
    fewer than two variants."""
    if len(variants) < 2:
        return None
    metric = CRITERIA[criterion]
    rate = f"{criterion}_rate"
    ranked = sorted(variants, key=lambda v: -variants[v]["rates"][rate])  # stable: ties by name
    best, next_ = ranked[0], ranked[1]
    a, b = variants[best]["counts"], variants[next_]["counts"]
    z, p = abtest.two_proportion(a[metric], a["delivered"], b[metric], b["delivered"])
    yes = stats.significant(p)
    return {
        "criterion": criterion,
        "rate": rate,
        "leader": best,
        "against": next_,
        "z": round(z, 4),
        "p": round(p, 6),
        "significant": yes,
        "winner": best if yes else None,
    }


def series(conn: sqlite3.Connection, campaign_id: int, variants: list[str]) -> dict[str, Any]:
    """SERIES per variant and in total, in steps of ``step_s`` seconds (60, or more for a
    long campaign) from the first minute with figures to the last, gaps as zeros."""
    rows = conn.execute(
        "SELECT variant, metric, minute, count FROM campaign_stats WHERE campaign_id = ?"
        f" AND metric IN ({','.join('?' * len(SERIES))})",
        (campaign_id, *SERIES),
    ).fetchall()
    if not rows:
        return {"step_s": 60, "start": None, "at": [], "variants": {}, "total": {}}
    first = min(r[2] for r in rows)
    span = max(r[2] for r in rows) - first + 1
    step = -(-span // MAX_POINTS)  # minutes per point
    points = -(-span // step)

    def zeros() -> dict[str, list[int]]:
        return {m: [0] * points for m in SERIES}

    per = {v: zeros() for v in variants}
    total = zeros()
    for variant, metric, minute, n in rows:
        i = (minute - first) // step
        per.setdefault(variant, zeros())[metric][i] += n
        total[metric][i] += n
    return {
        "step_s": step * 60,
        "start": iso(first * 60),
        "at": [(first + i * step) * 60 for i in range(points)],
        "variants": per,
        "total": total,
    }


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
