"""The suppression list's SQL: addresses relayd does not mail, per scope. Written by outcomes
(hard bounces), the bounce listener (complaints, unsubscribes), relayctl and the API; read by
ingress for every recipient, so the one lookup is a primary-key probe."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from relayd.spool.store import chunks

GLOBAL = "*"
REASONS = ("bounce", "complaint", "unsubscribe", "manual")
_FIELDS = "address, scope, reason, class, detail, queue_id, created, expires"


@dataclass
class Entry:
    address: str  # lower case
    # GLOBAL, "domain:D" (mail whose envelope sender is at D), or a credential's account:
    # "key:NAME" (an API key's mail) or "auth:NAME" (an SMTP login's)
    scope: str
    reason: str  # one of REASONS
    created: float
    expires: float | None = None  # None: never lapses
    bounce_class: str = ""
    detail: str = ""  # the reply or report that caused it
    queue_id: str = ""  # the message it came from

    def why(self) -> str:
        """The reason as an SMTP reply or an API result gives it."""
        since = time.strftime("%Y-%m-%d", time.gmtime(self.created))
        cls = f" {self.bounce_class}" if self.bounce_class else ""
        scope = "all senders" if self.scope == GLOBAL else self.scope
        return f"suppressed ({self.reason}{cls} since {since}, for {scope})"

    def as_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["class"] = doc.pop("bounce_class")
        return doc


def scopes_of(sender: str, account: str | None) -> list[str]:
    """The scopes an entry may have to stop mail from ``sender`` sent by ``account``."""
    scopes = [GLOBAL]
    domain = sender.rpartition("@")[2].lower()
    if domain:
        scopes.append(f"domain:{domain}")
    if account:
        scopes.append(account)
    return scopes


def find(
    conn: sqlite3.Connection, addresses: list[str], scopes: list[str], now: float
) -> dict[str, Entry]:
    """The entry in force for each address that has one (the first scope's, as given)."""
    if not addresses:
        return {}
    found: dict[str, Entry] = {}
    keys = {a.lower(): a for a in addresses}
    rank = {s: i for i, s in enumerate(scopes)}
    for chunk in chunks(list(keys), 400):
        rows = conn.execute(
            f"SELECT {_FIELDS} FROM suppressions WHERE address IN"
            f" ({','.join('?' * len(chunk))}) AND scope IN ({','.join('?' * len(scopes))})"
            " AND (expires IS NULL OR expires > ?)",
            (*chunk, *scopes, now),
        ).fetchall()
        for row in sorted(rows, key=lambda r: rank[r[1]]):
            found.setdefault(keys[row[0]], _entry(row))
    return found


def add(conn: sqlite3.Connection, entries: Iterable[Entry]) -> int:
    """Insert or renew. An entry that never lapses is not replaced by one that does (a
    complaint outlives a later bounce); a lapsing one is renewed by a newer one."""
    cur = conn.executemany(
        f"INSERT INTO suppressions ({_FIELDS}) VALUES (?,?,?,?,?,?,?,?)"
        " ON CONFLICT (address, scope) DO UPDATE SET reason = excluded.reason,"
        " class = excluded.class, detail = excluded.detail, queue_id = excluded.queue_id,"
        " created = excluded.created, expires = excluded.expires"
        " WHERE suppressions.expires IS NOT NULL OR excluded.expires IS NULL",
        (
            (
                e.address.lower(),
                e.scope,
                e.reason,
                e.bounce_class,
                e.detail,
                e.queue_id,
                e.created,
                e.expires,
            )
            for e in entries
        ),
    )
    return cur.rowcount


def remove(conn: sqlite3.Connection, address: str, scope: str | None) -> int:
    """Delete an address's entry in ``scope``, or in every scope when None."""
    if scope is None:
        sql, args = "DELETE FROM suppressions WHERE address = ?", (address.lower(),)
    else:
        sql, args = (
            "DELETE FROM suppressions WHERE address = ? AND scope = ?",
            (
                address.lower(),
                scope,
            ),
        )
    return conn.execute(sql, args).rowcount


def listing(
    conn: sqlite3.Connection,
    now: float,
    scopes: list[str] | None = None,
    reason: str | None = None,
    address: str | None = None,
    after: tuple[str, str] | None = None,
    limit: int = 1000,
) -> list[Entry]:
    """Entries in force (in ``scopes`` when given), in (address, scope) order from just after
    ``after``: one page."""
    where, args = ["(expires IS NULL OR expires > ?)"], [now]
    if scopes is not None:
        where.append(f"scope IN ({','.join('?' * len(scopes))})")
        args.extend(scopes)
    for column, value in (("reason", reason), ("address", address)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value.lower() if column == "address" else value)
    if after is not None:
        where.append("(address, scope) > (?, ?)")
        args.extend(after)
    rows = conn.execute(
        f"SELECT {_FIELDS} FROM suppressions WHERE {' AND '.join(where)}"
        " ORDER BY address, scope LIMIT ?",
        (*args, limit),
    ).fetchall()
    return [_entry(r) for r in rows]


def every(conn: sqlite3.Connection, now: float) -> Iterator[Entry]:
    """All entries in force, a page at a time (an export of millions holds one page)."""
    after: tuple[str, str] | None = None
    while page := listing(conn, now, after=after, limit=5000):
        yield from page
        after = (page[-1].address, page[-1].scope)


def prune(conn: sqlite3.Connection, now: float, limit: int = 5000) -> int:
    """Remove a batch of lapsed entries (lookups already ignore them)."""
    return conn.execute(
        "DELETE FROM suppressions WHERE (address, scope) IN (SELECT address, scope"
        " FROM suppressions WHERE expires IS NOT NULL AND expires <= ? LIMIT ?)",
        (now, limit),
    ).rowcount


def _entry(row: tuple) -> Entry:
    address, scope, reason, cls, detail, queue_id, created, expires = row
    return Entry(address, scope, reason, created, expires, cls, detail, queue_id)
