"""Every statement on the campaigns and campaign_sends tables (see schema._V5), for the API,
relayctl and the runner. State changes write their `campaign` event in their own transaction
and return it, for the caller to log once committed."""

from __future__ import annotations

import json
import sqlite3
from typing import TYPE_CHECKING, Any

from relayd.events.records import Event, Type
from relayd.model.message import State
from relayd.spool import admin
from relayd.spool.store import append_events

if TYPE_CHECKING:
    from relayd.campaigns.spec import Checked

_COLUMNS = (
    "id, owner, name, sender, list_id, segment_id, spec, state, phase, winner, send_at, created,"
    " started, tested, finished, total, error"
)
# What each control may be given, and the state it leaves (resume: the state paused left).
ACTIONS = {
    "pause": ("scheduled", "sending", "testing"),
    "resume": ("paused",),
    "cancel": ("scheduled", "sending", "testing", "paused"),
}


class Conflict(Exception):
    """The campaign's state does not allow the action (the API's 409)."""

    def __init__(self, state: str, problem: str) -> None:
        super().__init__(problem)
        self.state = state


class NotFound(Exception):
    """No such campaign (of this owner)."""


def _row(cur: sqlite3.Cursor, values: tuple[Any, ...]) -> dict[str, Any]:
    row = {d[0]: v for d, v in zip(cur.description, values, strict=True)}
    row["spec"] = json.loads(row["spec"])
    return row


def _event(campaign_id: int, now: float, state: str, **data: Any) -> Event:
    return Event(Type.CAMPAIGN, "", now, {"campaign": campaign_id, "state": state, **data})


# -- campaigns -------------------------------------------------------------------------------


def create(conn: sqlite3.Connection, c: Checked, now: float) -> tuple[dict[str, Any], Event]:
    cur = conn.execute(
        "INSERT INTO campaigns (owner, name, sender, list_id, segment_id, spec, state, phase,"
        " winner, send_at, created) VALUES (?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
        (c.owner, c.name, c.sender, c.list_id, c.segment_id, json.dumps(c.spec), "scheduled",
         c.phase, c.winner, c.send_at, now),
    )  # fmt: skip
    campaign_id = cur.fetchone()[0]
    event = _event(campaign_id, now, "scheduled", name=c.name, owner=c.owner, send_at=c.send_at)
    append_events(conn, [event])
    found = get(conn, None, campaign_id)
    assert found is not None
    return found, event


def get(conn: sqlite3.Connection, owner: str | None, campaign_id: int) -> dict[str, Any] | None:
    """A campaign (of ``owner``; None: anyone's)."""
    cur = conn.execute(
        f"SELECT {_COLUMNS} FROM campaigns WHERE id = ? AND (? IS NULL OR owner = ?)",
        (campaign_id, owner, owner),
    )
    values = cur.fetchone()
    return None if values is None else _row(cur, values)


def listing(conn: sqlite3.Connection, owner: str | None) -> list[dict[str, Any]]:
    cur = conn.execute(
        f"SELECT {_COLUMNS} FROM campaigns WHERE ? IS NULL OR owner = ? ORDER BY id",
        (owner, owner),
    )
    return [_row(cur, values) for values in cur.fetchall()]


def due(conn: sqlite3.Connection, now: float) -> list[dict[str, Any]]:
    """Campaigns the runner has work for: scheduled and due, sending (also after a restart),
    testing with the wait over."""
    cur = conn.execute(
        f"SELECT {_COLUMNS} FROM campaigns WHERE (state = 'scheduled' AND send_at <= ?)"
        " OR state = 'sending'"
        " OR (state = 'testing' AND tested + json_extract(spec, '$.wait') <= ?) ORDER BY id",
        (now, now),
    )
    return [_row(cur, values) for values in cur.fetchall()]


def any_open(conn: sqlite3.Connection) -> bool:
    """Whether any campaign is not over (the ingress process starts its runner then)."""
    row = conn.execute(
        "SELECT 1 FROM campaigns WHERE state IN ('scheduled', 'sending', 'testing', 'paused')"
        " LIMIT 1"
    )
    return row.fetchone() is not None


def state_of(conn: sqlite3.Connection, campaign_id: int) -> str:
    row = conn.execute("SELECT state FROM campaigns WHERE id = ?", (campaign_id,)).fetchone()
    return row[0] if row else ""


def _move(
    conn: sqlite3.Connection, campaign_id: int, from_state: str, sets: str, values: tuple
) -> bool:
    cur = conn.execute(
        f"UPDATE campaigns SET {sets} WHERE id = ? AND state = ?",
        (*values, campaign_id, from_state),
    )
    return cur.rowcount == 1


def start(conn: sqlite3.Connection, campaign_id: int, total: int, now: float) -> Event | None:
    """scheduled -> sending, with the number of contacts it goes to."""
    if not _move(conn, campaign_id, "scheduled", "state = 'sending', started = ?, total = ?",
                 (now, total)):  # fmt: skip
        return None
    event = _event(campaign_id, now, "sending", total=total)
    append_events(conn, [event])
    return event


def tested(conn: sqlite3.Connection, campaign_id: int, now: float) -> Event | None:
    """The test group is queued: the wait runs from now."""
    if not _move(conn, campaign_id, "sending", "state = 'testing', tested = ?", (now,)):
        return None
    event = _event(campaign_id, now, "testing", phase="test")
    append_events(conn, [event])
    return event


def pick(
    conn: sqlite3.Connection, campaign_id: int, winner: str, detail: dict[str, Any], now: float
) -> Event | None:
    """The wait is over: the winner goes to the rest."""
    sets = "state = 'sending', phase = 'rest', winner = ?"
    if not _move(conn, campaign_id, "testing", sets, (winner,)):
        return None
    event = _event(campaign_id, now, "sending", phase="rest", winner=winner, **detail)
    append_events(conn, [event])
    return event


def finish(conn: sqlite3.Connection, campaign_id: int, now: float) -> Event | None:
    if not _move(conn, campaign_id, "sending", "state = 'done', finished = ?", (now,)):
        return None
    event = _event(campaign_id, now, "done", **progress(conn, campaign_id))
    append_events(conn, [event])
    return event


# -- sends -------------------------------------------------------------------------------------


def sent_among(conn: sqlite3.Connection, campaign_id: int, contact_ids: list[int]) -> set[int]:
    """The contacts of a batch that already have their row (queued, suppressed or failed)."""
    rows = conn.execute(
        f"SELECT contact_id FROM campaign_sends WHERE campaign_id = ? AND contact_id IN"
        f" {admin.IDS_IN}",
        (campaign_id, json.dumps(contact_ids)),
    )
    return {r[0] for r in rows}


def failed(
    conn: sqlite3.Connection,
    campaign_id: int,
    rows: list[tuple[int, str, str, str, str]],
    now: float,
) -> list[Event]:
    """Contacts whose message could not be made (a runtime error of the template): each a row
    with status "failed" and a `campaign` event saying why. rows: (contact id, address,
    variant, queue id, error)."""
    conn.executemany(
        "INSERT INTO campaign_sends (campaign_id, contact_id, variant, queue_id, status)"
        " VALUES (?,?,?,?,'failed')",
        [(campaign_id, contact, variant, queue_id) for contact, _, variant, queue_id, _ in rows],
    )
    events = [
        _event(campaign_id, now, "sending", contact=contact, rcpt=address, variant=variant,
               error=error)
        for contact, address, variant, _, error in rows
    ]  # fmt: skip
    append_events(conn, events)
    return events


def selection(conn: sqlite3.Connection, campaign_id: int) -> admin.Selection:
    """The recipients of the campaign's messages still in the spool, as relayctl's changes
    select them."""
    ids = tuple(
        r[0]
        for r in conn.execute(
            "SELECT m.id FROM campaign_sends s JOIN messages m ON m.queue_id = s.queue_id"
            " WHERE s.campaign_id = ? AND s.status = 'queued'",
            (campaign_id,),
        )
    )
    return admin.Selection(f"msg_id IN {admin.IDS_IN}", (json.dumps(ids),), ids, "campaign")


def control(
    conn: sqlite3.Connection, owner: str | None, campaign_id: int, action: str, now: float
) -> tuple[dict[str, Any], list[Event]]:
    """pause (its queued, undelivered mail held), resume (released) or cancel (removed, no
    DSN), in the caller's write transaction; raises NotFound or Conflict."""
    found = get(conn, owner, campaign_id)
    if found is None:
        raise NotFound(campaign_id)
    state = found["state"]
    if state not in ACTIONS[action]:
        raise Conflict(state, f"campaign {campaign_id} is {state}: it cannot be {action}d")
    if action == "pause":
        new, mail = "paused", "hold"
    elif action == "cancel":
        new, mail = "cancelled", "delete"
    else:
        mail = "release"
        new = (
            "scheduled" if found["started"] is None
            else "testing" if found["phase"] == "test" and found["tested"] is not None
            else "sending"
        )  # fmt: skip
    sets = "state = ?, finished = ?" if new == "cancelled" else "state = ?"
    conn.execute(
        f"UPDATE campaigns SET {sets} WHERE id = ?",
        (new, now, campaign_id) if new == "cancelled" else (new, campaign_id),
    )
    changed = hold_mail(conn, campaign_id, mail, now)
    event = _event(campaign_id, now, new, action=action, recipients=changed)
    append_events(conn, [event])
    found = get(conn, owner, campaign_id)
    assert found is not None
    return found, [event]


def after_batch(conn: sqlite3.Connection, campaign_id: int, now: float) -> str:
    """The runner's look at the state after storing a batch, in a write transaction so that
    no control comes between the look and what follows from it: a campaign paused (or
    cancelled) while the batch was on its way has that batch held (or removed) too."""
    state = state_of(conn, campaign_id)
    if state in _AFTER:
        hold_mail(conn, campaign_id, _AFTER[state], now)
    return state


# what a paused or cancelled campaign does to mail the runner queued while the change was made
_AFTER = {"paused": "hold", "cancelled": "delete"}


def hold_mail(conn: sqlite3.Connection, campaign_id: int, action: str, now: float) -> int:
    """relayctl's hold, release or delete on the campaign's mail (with its operator event, so
    that the daemon drops what it holds in memory): the recipients changed."""
    sel = selection(conn, campaign_id)
    if not sel.msg_ids:
        return 0
    return int(admin.apply(conn, action, sel, now)["recipients"])


def progress(conn: sqlite3.Connection, campaign_id: int) -> dict[str, Any]:
    """The live figures: contacts queued, suppressed and failed, those remaining, and where
    its queued mail is (its recipients in the spool by state; ``sent`` those gone from it:
    delivered, or bounced and reported)."""
    counts = dict(
        conn.execute(
            "SELECT status, count(*) FROM campaign_sends WHERE campaign_id = ? GROUP BY status",
            (campaign_id,),
        ).fetchall()
    )
    states = dict(
        conn.execute(
            "SELECT r.state, count(*) FROM campaign_sends s JOIN messages m ON m.queue_id ="
            " s.queue_id JOIN recipients r ON r.msg_id = m.id WHERE s.campaign_id = ?"
            " GROUP BY r.state",
            (campaign_id,),
        ).fetchall()
    )
    row = conn.execute("SELECT total FROM campaigns WHERE id = ?", (campaign_id,)).fetchone()
    total = row[0] if row else 0
    queued, suppressed, failed_ = (counts.get(k, 0) for k in ("queued", "suppressed", "failed"))
    in_spool = {s.name.lower(): states.get(int(s), 0) for s in State}
    unfinished = sum(in_spool[k] for k in ("pending", "deferred", "held", "active"))
    return {
        "total": total,
        "queued": queued,
        "suppressed": suppressed,
        "failed": failed_,
        "remaining": max(total - queued - suppressed - failed_, 0),
        "delivery": {**in_spool, "sent": queued - unfinished - in_spool["bounced"]},
    }


def variant_rates(conn: sqlite3.Connection, campaign_id: int) -> dict[str, dict[str, Any]]:
    """Per variant, from campaign_sends.flags (the reports' folding sets them): sent,
    delivered, opened, clicked, conversions, and their rates over those sent. Stands in for
    relayd.campaigns.stats.rates."""
    out = {}
    for variant, sent, delivered, opened, clicked, converted in conn.execute(
        "SELECT variant, count(*), sum(flags & 1 > 0), sum(flags & 4 > 0), sum(flags & 8 > 0),"
        " sum(flags & 16 > 0) FROM campaign_sends WHERE campaign_id = ? AND status = 'queued'"
        " GROUP BY variant",
        (campaign_id,),
    ):
        out[variant] = {
            "sent": sent,
            "delivered": delivered,
            "opened": opened,
            "clicked": clicked,
            "conversions": converted,
            "open_rate": opened / sent,
            "click_rate": clicked / sent,
            "conversion_rate": converted / sent,
        }
    return out
