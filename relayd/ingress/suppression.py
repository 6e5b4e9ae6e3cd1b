"""The suppression list as ingress asks it, for each recipient before anything is queued."""

from __future__ import annotations

import csv
import math
import re
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

from relayd.ingress.smtp import valid_address
from relayd.spool import schema, suppression
from relayd.spool.suppression import Entry


class Lookup:
    """A read-only connection of its own (in WAL mode the spool's writer never waits for it),
    used by one thread at a time: the event loop for SMTP, the compose thread for the API."""

    def __init__(self, spool: Path, clock: Callable[[], float] = time.time) -> None:
        self.spool, self.clock = spool, clock
        self.conn: sqlite3.Connection | None = None

    def find(self, sender: str, credential: str | None, rcpts: list[str]) -> dict[str, Entry]:
        """The entry stopping each recipient that is stopped, for this sender and key."""
        if self.conn is None:
            self.conn = schema.reader(self.spool)
        scopes = suppression.scopes_of(sender, credential)
        return suppression.find(self.conn, rcpts, scopes, self.clock())

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# -- managing the list (relayctl and the API) -----------------------------------------------

CSV_FIELDS = ("address", "scope", "reason", "class", "detail", "queue_id", "created", "expires")
_DOMAIN = re.compile(
    r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_ACCOUNT = re.compile(r"^(key|auth):[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class Invalid(ValueError):
    """An entry that cannot go on the list: ``field`` and what is wrong with it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


def parse_scope(text: str) -> str:
    """ "global" (or "*"), "domain:D", "key:NAME" or "auth:NAME", as stored."""
    text = text.strip()
    if text in ("global", suppression.GLOBAL):
        return suppression.GLOBAL
    if text.startswith("domain:"):
        domain = text.removeprefix("domain:").lower().rstrip(".")
        if _DOMAIN.match(domain):
            return f"domain:{domain}"
        raise Invalid("scope", f"not a domain: {domain!r}")
    if _ACCOUNT.match(text):
        return text
    raise Invalid("scope", f"{text!r}: give global, domain:DOMAIN, key:NAME or auth:NAME")


def entry(
    address: str,
    scope: str,
    reason: str,
    now: float,
    detail: str = "",
    expires: float | None = None,
    bounce_class: str = "",
) -> Entry:
    """A checked entry; raises Invalid naming the field."""
    if not valid_address(address, True) or any(c in address for c in "\r\n,"):
        raise Invalid("address", f"not an address: {address!r}")
    if reason not in suppression.REASONS:
        raise Invalid("reason", f"{reason!r}: one of {', '.join(suppression.REASONS)}")
    if len(detail) > 1000:
        raise Invalid("detail", "at most 1000 characters")
    if expires is not None and not (math.isfinite(expires) and expires > now):
        raise Invalid("expires", "must be in the future")
    return Entry(address.lower(), parse_scope(scope), reason, now, expires, bounce_class, detail)


def read_csv(lines: Iterable[str], now: float) -> list[Entry]:
    """Entries from CSV with a header row naming at least ``address`` (the other columns of
    CSV_FIELDS are optional: scope global, reason manual); raises Invalid naming the line."""
    rows = csv.DictReader(lines)
    if rows.fieldnames is None or "address" not in rows.fieldnames:
        raise Invalid("line 1", "a header row naming the columns, address among them")
    unknown = set(rows.fieldnames) - set(CSV_FIELDS)
    if unknown:
        raise Invalid("line 1", f"unknown columns {', '.join(sorted(unknown))}")
    out = []
    for row in rows:
        where = f"line {rows.line_num}"
        try:
            expires = float(row["expires"]) if row.get("expires") else None
            created = float(row["created"]) if row.get("created") else now
            found = entry(
                row["address"] or "",
                row.get("scope") or "global",
                row.get("reason") or "manual",
                now,
                row.get("detail") or "",
                expires,
                row.get("class") or "",
            )
        except Invalid as exc:
            raise Invalid(f"{where}: {exc.field}", exc.problem) from None
        except ValueError:
            raise Invalid(f"{where}", "created and expires are Unix times") from None
        found.created, found.queue_id = created, row.get("queue_id") or ""
        out.append(found)
    return out


def write_csv(entries: Iterable[Entry], out: TextIO) -> int:
    """Every entry as a CSV row (the format read_csv takes back); returns how many."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    n = 0
    for e in entries:
        writer.writerow(
            (e.address, e.scope, e.reason, e.bounce_class, e.detail, e.queue_id, e.created,
             "" if e.expires is None else e.expires)
        )  # fmt: skip
        n += 1
    return n
