"""Contacts, lists and segments: all their SQL. Every object has an owner (see schema._V5);
a function given ``owner`` None acts for an admin, who sees every owner's. A contact's
unsubscribe state is the suppression list's (relayd.spool.suppression), never a column."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any

from relayd.contacts import segments
from relayd.spool import suppression

Row = dict[str, Any]
# A suppression entry's reason as a contact's status (a manual entry: taken off by hand)
STATUS = {
    "unsubscribe": "unsubscribed",
    "manual": "unsubscribed",
    "bounce": "bounced",
    "complaint": "complained",
}
ACTIVE = "active"


class NotFound(Exception):
    """No such list, segment or contact for this owner (another owner's is not shown)."""


class Conflict(Exception):
    """A name already taken by the owner: ``field`` and what is wrong."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field, self.problem = field, problem


def _owned(owner: str | None) -> tuple[str, tuple[Any, ...]]:
    return ("1", ()) if owner is None else ("owner = ?", (owner,))


# -- lists ---------------------------------------------------------------------------------


def add_list(conn: sqlite3.Connection, owner: str, name: str, now: float) -> Row:
    try:
        (list_id,) = conn.execute(
            "INSERT INTO lists (owner, name, created) VALUES (?, ?, ?) RETURNING id",
            (owner, name, now),
        ).fetchone()
    except sqlite3.IntegrityError:
        raise Conflict("name", f"there is a list named {name!r} already") from None
    return get_list(conn, list_id, owner)


def lists(conn: sqlite3.Connection, owner: str | None) -> list[Row]:
    where, args = _owned(owner)
    cur = conn.execute(f"SELECT id FROM lists WHERE {where} ORDER BY owner, name", args).fetchall()
    return [get_list(conn, r[0], owner) for r in cur]


def get_list(conn: sqlite3.Connection, list_id: int, owner: str | None) -> Row:
    where, args = _owned(owner)
    found = conn.execute(
        f"SELECT id, owner, name, attrs, created FROM lists WHERE id = ? AND {where}",
        (list_id, *args),
    ).fetchone()
    if found is None:
        raise NotFound(f"no list {list_id}")
    (count,) = conn.execute(
        "SELECT count(*) FROM list_members WHERE list_id = ?", (list_id,)
    ).fetchone()
    return {
        "id": found[0],
        "owner": found[1],
        "name": found[2],
        "attributes": sorted(json.loads(found[3])),
        "created": found[4],
        "contacts": count,
    }


def find_list(conn: sqlite3.Connection, ref: str, owner: str) -> Row:
    """A list by name (or, when no list has that name, by id), as relayctl names one."""
    found = conn.execute(
        "SELECT id FROM lists WHERE owner = ? AND name = ?", (owner, ref)
    ).fetchone()
    if found is None and ref.isdigit():
        found = (int(ref),)
    if found is None:
        raise NotFound(f"no list {ref!r}" + (f" of {owner}" if owner else ""))
    return get_list(conn, found[0], owner)


def delete_list(conn: sqlite3.Connection, list_id: int, owner: str | None) -> Row:
    """The list, its memberships and segments; the contacts stay (other lists, the owner's
    suppression state)."""
    found = get_list(conn, list_id, owner)
    conn.execute("DELETE FROM lists WHERE id = ?", (list_id,))
    return found


def _record_names(conn: sqlite3.Connection, list_id: int, names: Iterable[str]) -> None:
    """Add attribute names to the list's (a set, as a JSON array)."""
    given = list(names)
    if given:
        conn.execute(
            "UPDATE lists SET attrs = (SELECT json_group_array(value) FROM (SELECT value FROM"
            " json_each(lists.attrs) UNION SELECT value FROM json_each(?))) WHERE id = ?",
            (json.dumps(given), list_id),
        )


# -- importing -------------------------------------------------------------------------------


def add_batch(
    conn: sqlite3.Connection,
    owner: str,
    list_id: int,
    rows: list[tuple[str, str]],
    names: Iterable[str],
    now: float,
) -> tuple[int, int]:
    """Upsert contacts (address, attributes JSON) of ``owner`` and add them to the list, in
    the caller's transaction: a known address gets its attributes merged (the new values
    win). Set-based through a temporary table, so SQLite does the joins. Returns (new,
    updated)."""
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS import_rows"
        " (seq INTEGER PRIMARY KEY, address TEXT NOT NULL, attrs TEXT NOT NULL)"
    )
    conn.executemany("INSERT INTO temp.import_rows (address, attrs) VALUES (?, ?)", rows)
    try:
        (known,) = conn.execute(
            "SELECT count(*) FROM temp.import_rows i JOIN contacts c"
            " ON c.owner = ? AND c.address = i.address",
            (owner,),
        ).fetchone()
        conn.execute(
            "INSERT INTO contacts (owner, address, attrs, created, updated)"
            " SELECT ?, address, attrs, ?, ? FROM temp.import_rows WHERE true ORDER BY seq"
            " ON CONFLICT (owner, address) DO UPDATE SET"
            " attrs = json_patch(contacts.attrs, excluded.attrs), updated = excluded.updated",
            (owner, now, now),
        )
        conn.execute(
            "INSERT OR IGNORE INTO list_members (list_id, contact_id, added)"
            " SELECT ?, c.id, ? FROM temp.import_rows i JOIN contacts c"
            " ON c.owner = ? AND c.address = i.address",
            (list_id, now, owner),
        )
        _record_names(conn, list_id, names)
    finally:
        conn.execute("DELETE FROM temp.import_rows")
    return len(rows) - known, known


# -- what a campaign sends to -----------------------------------------------------------------


def _segment_filter(
    conn: sqlite3.Connection, list_id: int, segment_id: int | None
) -> tuple[str, list[Any]]:
    if segment_id is None:
        return "1", []
    found = conn.execute(
        "SELECT list_id, filter FROM segments WHERE id = ?", (segment_id,)
    ).fetchone()
    if found is None:
        raise NotFound(f"no segment {segment_id}")
    if found[0] != list_id:
        raise NotFound(f"segment {segment_id} is not of list {list_id}")
    return segments.compile_filter(json.loads(found[1]), None)


def members(
    conn: sqlite3.Connection, list_id: int, segment_id: int | None, after: int, limit: int
) -> list[tuple[int, str, dict]]:
    """One page of a list's (or its segment's) contacts: (contact id, address, attributes),
    ascending contact id from just after ``after``; the segment's filter applied in SQL."""
    cond, params = _segment_filter(conn, list_id, segment_id)
    rows = conn.execute(
        "SELECT c.id, c.address, c.attrs FROM list_members m JOIN contacts c ON c.id ="
        f" m.contact_id WHERE m.list_id = ? AND m.contact_id > ? AND {cond}"
        " ORDER BY m.contact_id LIMIT ?",
        (list_id, after, *params, limit),
    ).fetchall()
    return [(i, a, json.loads(attrs)) for i, a, attrs in rows]


def count_members(conn: sqlite3.Connection, list_id: int, segment_id: int | None) -> int:
    """How many contacts ``members`` pages through."""
    cond, params = _segment_filter(conn, list_id, segment_id)
    (n,) = conn.execute(
        "SELECT count(*) FROM list_members m JOIN contacts c ON c.id = m.contact_id"
        f" WHERE m.list_id = ? AND {cond}",
        (list_id, *params),
    ).fetchone()
    return n


# -- contacts ----------------------------------------------------------------------------------


def scopes(owner: str, senders: Iterable[str] = ()) -> list[str]:
    """The suppression scopes that stop the owner's mail whatever its sender: the global one,
    its own, and its sender domains' (those of the key or login it is)."""
    if not owner:
        return [suppression.GLOBAL]
    return [suppression.GLOBAL, owner, *(f"domain:{d}" for d in senders if "@" not in d)]


def statuses(
    conn: sqlite3.Connection, addresses: list[str], scopes: list[str], now: float
) -> dict[str, str]:
    """Each address's status: active, or what the suppression list in force says."""
    found = suppression.find(conn, addresses, scopes, now)
    return {a: STATUS.get(found[a].reason, "unsubscribed") if a in found else ACTIVE
            for a in addresses}  # fmt: skip


def _contact(row: tuple, status: str) -> Row:
    cid, address, attrs, created, updated = row
    return {
        "id": cid,
        "email": address,
        "attributes": json.loads(attrs),
        "status": status,
        "created": created,
        "updated": updated,
    }


def page(
    conn: sqlite3.Connection,
    list_id: int,
    after: int,
    limit: int,
    scopes: list[str],
    now: float,
) -> list[Row]:
    """A page of a list's contacts with their status, in contact id order."""
    rows = conn.execute(
        "SELECT c.id, c.address, c.attrs, c.created, c.updated FROM list_members m JOIN"
        " contacts c ON c.id = m.contact_id WHERE m.list_id = ? AND m.contact_id > ?"
        " ORDER BY m.contact_id LIMIT ?",
        (list_id, after, limit),
    ).fetchall()
    status = statuses(conn, [r[1] for r in rows], scopes, now)
    return [_contact(r, status[r[1]]) for r in rows]


def contact(
    conn: sqlite3.Connection, owner: str, address: str, scopes: list[str], now: float
) -> Row:
    """One contact of ``owner``, with its status and the ids of its lists."""
    row = conn.execute(
        "SELECT id, address, attrs, created, updated FROM contacts WHERE owner = ? AND address = ?",
        (owner, address),
    ).fetchone()
    if row is None:
        raise NotFound(f"no contact {address}")
    found = _contact(row, statuses(conn, [address], scopes, now)[address])
    found["lists"] = [
        r[0]
        for r in conn.execute(
            "SELECT list_id FROM list_members WHERE contact_id = ? ORDER BY list_id", (row[0],)
        )
    ]
    return found


def patch(
    conn: sqlite3.Connection,
    owner: str,
    address: str,
    attrs: dict[str, Any],
    scopes: list[str],
    now: float,
) -> Row:
    """Merge attributes into a contact (RFC 7396: a null removes one); the names join those
    recorded on its lists."""
    cur = conn.execute(
        "UPDATE contacts SET attrs = json_patch(attrs, ?), updated = ? WHERE owner = ?"
        " AND address = ? RETURNING id",
        (json.dumps(attrs), now, owner, address),
    ).fetchone()
    if cur is None:
        raise NotFound(f"no contact {address}")
    names = [k for k, v in attrs.items() if v is not None]
    for (list_id,) in conn.execute(
        "SELECT list_id FROM list_members WHERE contact_id = ?", (cur[0],)
    ).fetchall():
        _record_names(conn, list_id, names)
    return contact(conn, owner, address, scopes, now)


def unsubscribe(
    conn: sqlite3.Connection, owner: str, address: str, now: float, known_only: bool = False
) -> Row:
    """Put the address on the suppression list in the owner's scope (the operator's: all
    senders), reason unsubscribe: the campaign runner and every other send honour it.
    ``known_only``: only an address that is one of the owner's contacts."""
    if (
        known_only
        and not conn.execute(
            "SELECT 1 FROM contacts WHERE owner = ? AND address = ?", (owner, address)
        ).fetchone()
    ):
        raise NotFound(f"no contact {address}")
    scope = owner or suppression.GLOBAL
    entry = suppression.Entry(address, scope, "unsubscribe", now, detail="contacts unsubscribe")
    suppression.add(conn, [entry])
    return {"email": address, "scope": scope, "status": STATUS["unsubscribe"]}


# -- segments ----------------------------------------------------------------------------------


def add_segment(
    conn: sqlite3.Connection, owner: str, name: str, list_id: int, spec: Any, now: float
) -> Row:
    """A segment of one of the owner's lists. The filter is checked against the attribute
    names the list's contacts have had (relayd.contacts.Invalid names the path at fault)."""
    known = get_list(conn, list_id, owner)["attributes"]
    segments.compile_filter(spec, known)
    try:
        (segment_id,) = conn.execute(
            "INSERT INTO segments (owner, name, list_id, filter, created) VALUES (?,?,?,?,?)"
            " RETURNING id",
            (owner, name, list_id, json.dumps(spec), now),
        ).fetchone()
    except sqlite3.IntegrityError:
        raise Conflict("name", f"there is a segment named {name!r} already") from None
    return get_segment(conn, segment_id, owner)


def get_segment(
    conn: sqlite3.Connection, segment_id: int, owner: str | None, count: bool = True
) -> Row:
    where, args = _owned(owner)
    row = conn.execute(
        f"SELECT id, owner, name, list_id, filter, created FROM segments WHERE id = ? AND {where}",
        (segment_id, *args),
    ).fetchone()
    if row is None:
        raise NotFound(f"no segment {segment_id}")
    found = {
        "id": row[0],
        "owner": row[1],
        "name": row[2],
        "list_id": row[3],
        "filter": json.loads(row[4]),
        "created": row[5],
    }
    if count:
        found["contacts"] = count_members(conn, row[3], row[0])
    return found


def segments_of(conn: sqlite3.Connection, owner: str | None, count: bool = True) -> list[Row]:
    where, args = _owned(owner)
    ids = conn.execute(f"SELECT id FROM segments WHERE {where} ORDER BY owner, name", args)
    return [get_segment(conn, r[0], owner, count) for r in ids.fetchall()]
