"""Campaign statistics folded from the event log: a pass reads the events after the cursor
``campaigns``, keeps those of campaign messages (their meta names a campaign, and the queue id
is one of that campaign's campaign_sends rows: another sender's meta cannot count), and in one
short write transaction adds them to campaign_stats per (campaign, variant, metric, minute),
sets the contacts' campaign_sends flags and moves the cursor, so that every event is counted
exactly once, whatever stops relayd when. The events are pruned by their retention; the
figures stay. The read happens before the write lock is taken; the cursor is compared again
under the lock, and a pass that lost a race counts nothing."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relayd.events.log import log
from relayd.events.records import Event, Type
from relayd.spool import admin, store

CURSOR = "campaigns"  # its row in ``cursors``
BATCH = 5000  # events read per pass

# campaign_sends.flags: what has happened to a contact's message (each counted once)
DELIVERED, BOUNCED, OPENED, CLICKED = 1, 2, 4, 8
CONVERTED, UNSUBSCRIBED, COMPLAINED = 16, 32, 64

# the engagement metrics: the flag that makes a contact's first one "unique"
_ENGAGEMENT = {
    Type.OPEN: ("opened", OPENED),
    Type.CLICK: ("clicked", CLICKED),
}
# once per contact at most (a second report of the same is not counted again)
_ONCE = {
    Type.CONVERSION: ("converted", CONVERTED),
    Type.UNSUBSCRIBE: ("unsubscribed", UNSUBSCRIBED),
    Type.COMPLAINT: ("complained", COMPLAINED),
}


@dataclass(slots=True)
class _Send:
    """A contact's campaign_sends row, as a pass sees and changes it."""

    campaign: int
    contact: int
    variant: str
    flags: int
    new: int = 0  # flags this pass sets


@dataclass
class Pass:
    """What one pass adds: counts per (campaign, variant, metric, minute), and flags."""

    last: int  # the last event id read (the new cursor)
    counts: Counter[tuple[int, str, str, int]] = field(default_factory=Counter)
    sends: list[_Send] = field(default_factory=list)

    @property
    def events(self) -> int:
        return sum(self.counts.values())


def cursor(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT event_id FROM cursors WHERE name = ?", (CURSOR,)).fetchone()
    return row[0] if row else 0


# A pass's events: those of campaign messages, with the fields the fold reads, taken out by
# SQLite's JSON functions (a third of the time of decoding each event in Python). The meta's
# campaign must be the campaign_sends row's: meta alone, which any sender may write, counts
# nothing. Only events that mention a campaign are looked up (most mail is not a campaign's).
_EVENTS = """
SELECT e.at, e.type, s.campaign_id, s.contact_id, s.variant, s.flags,
    json_extract(e.data, '$.class'), json_extract(e.data, '$.human'),
    json_extract(e.data, '$.counted'), json_array_length(e.data, '$.rcpt')
FROM (SELECT id, at, type, queue_id, data FROM events WHERE id > ? ORDER BY id LIMIT ?) AS e
JOIN campaign_sends AS s ON s.queue_id = e.queue_id
    AND s.campaign_id = json_extract(e.data, '$.meta.campaign')
WHERE instr(e.data, '"campaign"') > 0
ORDER BY e.id
"""


def fold(conn: sqlite3.Connection, limit: int = BATCH) -> tuple[int, int]:
    """One pass on a connection of its own (autocommit, like relayctl's): (events read,
    counts added). Read fewer than ``limit``: caught up."""
    start = cursor(conn)
    conn.execute("BEGIN DEFERRED")  # one snapshot for the events and their last id
    try:
        read, last = conn.execute(
            "SELECT count(*), max(id) FROM"
            " (SELECT id FROM events WHERE id > ? ORDER BY id LIMIT ?)",
            (start, limit),
        ).fetchone()
        rows = conn.execute(_EVENTS, (start, limit)).fetchall() if read else []
    finally:
        conn.execute("COMMIT")
    if not read:
        return 0, 0
    found = collect(last, rows)
    conn.execute("BEGIN IMMEDIATE")
    try:
        if cursor(conn) != start:  # another folder took these events meanwhile
            conn.execute("ROLLBACK")
            return 0, 0
        write(conn, found)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return read, found.events


def collect(last: int, rows: list[tuple]) -> Pass:
    """The counts and flags of a pass's campaign events (_EVENTS), up to event ``last``."""
    found = Pass(last)
    sends: dict[tuple[int, int], _Send] = {}
    for at, kind, campaign, contact, variant, flags, cls, human, counted, rcpts in rows:
        send = sends.get((campaign, contact))
        if send is None:
            send = sends[(campaign, contact)] = _Send(campaign, contact, variant, flags)
        for metric in _metrics(kind, send, cls, human != 0 or counted == 1, rcpts):
            found.counts[(campaign, variant, metric, int(at // 60))] += 1
    found.sends = [s for s in sends.values() if s.new]
    return found


def _metrics(
    kind: str, send: _Send, cls: str | None, human: bool, rcpts: int | None
) -> Iterable[str]:
    """The metrics one event adds to (and the flags it sets on its contact's row). An open
    or click counts when a person made it; a bot's (Apple's privacy proxy, a security
    scanner: human false) only when the event says it counts ("counted": true)."""
    if kind == Type.RECEPTION:
        return ["sent"] * (rcpts or 1)
    if kind == Type.DELIVERY:
        _flag(send, DELIVERED)
        return ["delivered"]
    if kind == Type.TRANSIENT_FAILURE:
        return ["deferred"]
    if kind in (Type.BOUNCE, Type.EXPIRATION):
        _flag(send, BOUNCED)
        return ["bounced", f"bounced:{cls or 'expired'}"]
    if kind == Type.SUPPRESSION:
        return ["suppressed"]
    if kind in _ENGAGEMENT:
        metric, flag = _ENGAGEMENT[kind]
        if not human:
            return [f"{metric}_bot"]
        return [metric, f"{metric}_unique"] if _flag(send, flag) else [metric]
    if kind in _ONCE:
        metric, flag = _ONCE[kind]
        return [metric] if _flag(send, flag) else []
    return []


def _flag(send: _Send, flag: int) -> bool:
    """Set ``flag`` on the contact's row; whether it is new (the first such event)."""
    if (send.flags | send.new) & flag:
        return False
    send.new |= flag
    return True


def write(conn: sqlite3.Connection, found: Pass) -> None:
    """Inside the pass's transaction: the counts, the flags, the cursor."""
    conn.executemany(
        "INSERT INTO campaign_stats (campaign_id, variant, metric, minute, count)"
        " VALUES (?,?,?,?,?) ON CONFLICT (campaign_id, variant, metric, minute)"
        " DO UPDATE SET count = count + excluded.count",
        [(*key, n) for key, n in found.counts.items()],
    )
    conn.executemany(
        "UPDATE campaign_sends SET flags = flags | ? WHERE campaign_id = ? AND contact_id = ?",
        [(s.new, s.campaign, s.contact) for s in found.sends],
    )
    conn.execute(
        "INSERT INTO cursors (name, event_id) VALUES (?, ?)"
        " ON CONFLICT (name) DO UPDATE SET event_id = excluded.event_id",
        (CURSOR, found.last),
    )


class Folder:
    """The folding task of the ingress process: a pass every ``interval`` seconds (at once
    again while a pass finds a full batch), on a thread with a connection of its own."""

    def __init__(self, spool: Path, interval: float = 1.0) -> None:
        self.spool, self.interval = spool, interval
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="campaign-stats")
        self.conn: sqlite3.Connection | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                read, added = await loop.run_in_executor(self.pool, self._pass)
            except (sqlite3.Error, admin.Refused) as exc:  # busy, a disk error: next time
                log.warning("campaign_stats_failed", error=repr(exc))
                read = 0
            except Exception as exc:  # a bug: logged, and the figures wait for the fix
                log.error("campaign_stats_failed", error=repr(exc))
                read = 0
            else:
                if added:
                    log.debug("campaign_stats_folded", events=read, counts=added)
            if read < BATCH:
                await asyncio.sleep(self.interval)

    def _pass(self) -> tuple[int, int]:
        if self.conn is None:
            self.conn = admin.open_spool(self.spool, write=True)
        return fold(self.conn)

    def close(self) -> None:
        """After the task is cancelled: the pass in progress finishes (or rolls back)."""
        self.pool.submit(self._close)
        self.pool.shutdown()

    def _close(self) -> None:
        if self.conn is not None:
            self.conn.close()


# -- reading the figures --------------------------------------------------------------------

COUNTS = (
    "sent",
    "delivered",
    "deferred",
    "bounced",
    "suppressed",
    "opened",
    "opened_unique",
    "clicked",
    "clicked_unique",
    "converted",
    "unsubscribed",
    "complained",
)


def totals(conn: sqlite3.Connection, campaign_id: int) -> dict[str, Counter[str]]:
    """Every metric's total per variant (each variant the campaign queued or counted)."""
    out: dict[str, Counter[str]] = {}
    for (variant,) in conn.execute(
        "SELECT DISTINCT variant FROM campaign_sends WHERE campaign_id = ? ORDER BY variant",
        (campaign_id,),
    ):
        out[variant] = Counter()
    for variant, metric, n in conn.execute(
        "SELECT variant, metric, sum(count) FROM campaign_stats WHERE campaign_id = ?"
        " GROUP BY variant, metric",
        (campaign_id,),
    ):
        out.setdefault(variant, Counter())[metric] = n
    return dict(sorted(out.items()))


def rates(conn: sqlite3.Connection, campaign_id: int) -> dict[str, dict]:
    """Per variant: sent, delivered, bounced, opened, clicked, conversions (contacts: unique,
    human), unsubscribed, complained, and open_rate, click_rate, conversion_rate over
    delivered (0.0 before any delivery). The campaign runner picks its winner from these."""
    return {variant: _rates(c) for variant, c in totals(conn, campaign_id).items()}


def _rates(c: Counter[str]) -> dict[str, Any]:
    delivered = c["delivered"]
    out: dict[str, Any] = {
        "sent": c["sent"],
        "delivered": delivered,
        "bounced": c["bounced"],
        "opened": c["opened_unique"],
        "clicked": c["clicked_unique"],
        "conversions": c["converted"],
        "unsubscribed": c["unsubscribed"],
        "complained": c["complained"],
    }
    for name, key in (("open", "opened"), ("click", "clicked"), ("conversion", "conversions")):
        out[f"{name}_rate"] = out[key] / delivered if delivered else 0.0
    return out


def significant(p: float, alpha: float = 0.05) -> bool:
    return p < alpha


# -- conversions ----------------------------------------------------------------------------


def conversion(
    conn: sqlite3.Connection, campaign_id: int, now: float, email: str = "", message_id: str = ""
) -> Event | None:
    """A conversion an application reports for the campaign's message to ``email`` (or with
    queue id ``message_id``), in the caller's write transaction: a `converted` event with
    the message's meta, which the fold counts (once per contact). None, and nothing written,
    when the campaign sent no such message."""
    if message_id:
        where, arg = "s.queue_id = ?", message_id.upper()
    else:
        where, arg = "c.address = ?", email.lower()
    row = conn.execute(
        "SELECT s.queue_id, s.variant, c.address, m.meta FROM campaign_sends s"
        " LEFT JOIN contacts c ON c.id = s.contact_id"
        " LEFT JOIN messages m ON m.queue_id = s.queue_id"
        f" WHERE s.campaign_id = ? AND s.status = 'queued' AND {where}",
        (campaign_id, arg),
    ).fetchone()
    if row is None:
        return None
    queue_id, variant, address, meta = row
    data: dict[str, Any] = {"campaign": campaign_id, "variant": variant}
    if address:
        data["rcpt"] = address
    data["meta"] = json.loads(meta) if meta else {"campaign": campaign_id, "variant": variant}
    event = Event(Type.CONVERSION, queue_id, now, data)
    store.append_events(conn, [event])
    return event
