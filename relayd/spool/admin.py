"""relayctl's spool operations: looking (on a read-only connection, so it never disturbs the
daemon) and changing (one short ``BEGIN IMMEDIATE`` transaction that also writes an
``operator`` event; the running daemon reads those events from the outbox and acts on them
within a second, without any socket between the two)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relayd.events.records import Event, Type
from relayd.model.message import UNFINISHED, State
from relayd.spool.schema import OWED, SCHEMA_VERSION
from relayd.spool.store import append_events

IDS_IN = "(SELECT value FROM json_each(?))"  # one parameter for any number of ids
Row = dict[str, Any]
EVENT_IDS = 100  # queue ids named in an operator event
AGE_EDGES = tuple(5 * 2**i for i in range(9))  # minutes, as qshape: 5 10 20 ... 1280
BUCKETS = (*(f"{m}m" for m in AGE_EDGES), f"{AGE_EDGES[-1]}m+")  # relayctl queue, /metrics


class Refused(Exception):
    """The spool cannot do what was asked (no spool, unknown queue id); nothing changed."""


def _in(*states: State) -> str:
    """A literal SQL list of states, e.g. ``(0,1,5)``."""
    return f"({','.join(str(int(s)) for s in states)})"


IN_UNFINISHED = _in(*UNFINISHED)


def open_spool(path: Path, write: bool) -> sqlite3.Connection:
    """Open an existing spool; never create one, so a wrong config cannot grow an empty spool
    that hides the real queue."""
    if not path.is_file():
        raise Refused(f"no spool at {path} (has relayd been started with this config?)")
    mode = "rw" if write else "ro"
    conn = sqlite3.connect(f"{path.as_uri()}?mode={mode}", uri=True, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=10000")  # the daemon's group commits are short
    conn.execute("PRAGMA foreign_keys=ON")  # deleting a message deletes its recipients
    conn.execute("PRAGMA secure_delete=FAST")  # as the daemon's (schema.connect)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version != SCHEMA_VERSION:
        conn.close()
        raise Refused(
            f"spool {path} has schema version {version}; this relayctl knows version"
            f" {SCHEMA_VERSION}"
        )
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, write: bool) -> Iterator[sqlite3.Connection]:
    """One snapshot for reading, or the write lock up front, so a change and its operator
    event commit together or not at all."""
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN DEFERRED")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


# -- looking ------------------------------------------------------------------------------


def shape_counts(
    conn: sqlite3.Connection, states: list[State], edges: tuple[int, ...], now: float
) -> list[tuple[str, int, int]]:
    """(domain, age bucket, recipients): bucket i holds ages under ``edges[i]`` minutes."""
    bucket = " ".join(f"WHEN age < {m * 60} THEN {i}" for i, m in enumerate(edges))
    return conn.execute(
        f"SELECT domain, CASE {bucket} ELSE {len(edges)} END AS bucket, count(*) FROM"
        f" (SELECT r.domain, ? - m.received_at AS age FROM recipients r JOIN messages m"
        f" ON m.id = r.msg_id WHERE r.state IN {IDS_IN}) GROUP BY domain, bucket",
        (now, json.dumps([int(s) for s in states])),
    ).fetchall()


def messages(
    conn: sqlite3.Connection,
    states: list[State],
    domain: str | None,
    sender: str | None,
    limit: int,
) -> list[tuple[Any, ...]]:
    """Messages with a recipient matching the filters, oldest first: queue id, arrival, size,
    sender, recipients, then the number of recipients in each State."""
    match = f"r.msg_id = m.id AND r.state IN {IDS_IN}"
    params: list[Any] = [json.dumps([int(s) for s in states])]
    if domain:
        match += " AND r.domain = ?"
        params.append(domain.lower())
    where = f"EXISTS (SELECT 1 FROM recipients r WHERE {match})"
    if sender:
        where += " AND instr(lower(m.sender), lower(?)) > 0"
        params.append(sender)
    sums = ", ".join(f"sum(r.state = {int(s)})" for s in State)
    return conn.execute(
        f"SELECT m.queue_id, m.received_at, m.size, m.sender, count(*), {sums}"
        f" FROM messages m JOIN recipients r ON r.msg_id = m.id WHERE m.id IN"
        f" (SELECT m.id FROM messages m WHERE {where} ORDER BY m.received_at, m.id LIMIT ?)"
        f" GROUP BY m.id ORDER BY m.received_at, m.id",
        (*params, limit),
    ).fetchall()


def message(conn: sqlite3.Connection, queue_id: str) -> tuple[Row, list[Row]]:
    """A message's envelope (with its body) and its recipients with their last attempt."""
    cur = conn.execute(
        "SELECT id, queue_id, sender, received_at, client, helo, origin, stream, size, smtputf8,"
        " envid, ret, body FROM messages WHERE queue_id = ?",
        (queue_id,),
    )
    msg = _row(cur, cur.fetchone())
    if msg is None:
        raise Refused(f"no message with queue id {queue_id}")
    cur = conn.execute(
        "SELECT rcpt, state, attempts, next_attempt, last_attempt, last_code, last_reply, last_mx,"
        " notify, orcpt FROM recipients WHERE msg_id = ? ORDER BY id",
        (msg["id"],),
    )
    return msg, [_row(cur, r) or {} for r in cur.fetchall()]


def _row(cur: sqlite3.Cursor, values: tuple[Any, ...] | None) -> Row | None:
    return (
        None if values is None else {d[0]: v for d, v in zip(cur.description, values, strict=True)}
    )


# -- changing -----------------------------------------------------------------------------


@dataclass
class Selection:
    """The recipients a change applies to: of the named messages, at a domain, or all."""

    where: str  # condition on recipients
    params: tuple[Any, ...]
    msg_ids: tuple[int, ...]  # the named messages; empty for a domain or all
    text: str  # what was selected, for the operator event


def select(conn: sqlite3.Connection, queue_ids: list[str], domain: str | None) -> Selection:
    """Resolve queue ids inside the transaction; one unknown id aborts it all. Neither ids nor
    a domain selects everything."""
    if domain:
        return Selection("domain = ?", (domain.lower(),), (), f"domain {domain.lower()}")
    if not queue_ids:
        return Selection("1", (), (), "all")
    found = dict(
        conn.execute(
            f"SELECT queue_id, id FROM messages WHERE queue_id IN {IDS_IN}",
            (json.dumps(queue_ids),),
        ).fetchall()
    )
    unknown = [q for q in queue_ids if q not in found]
    if unknown:
        raise Refused(f"no message with queue id {', '.join(unknown)}; nothing changed")
    ids = tuple(found.values())
    return Selection(f"msg_id IN {IDS_IN}", (json.dumps(ids),), ids, "messages")


@dataclass
class Changed:
    touched: list[int]  # the message of each changed recipient
    removed: dict[int, str]  # messages deleted: id -> queue id


def hold(conn: sqlite3.Connection, sel: Selection, now: float) -> Changed:
    """Unfinished recipients, also those in the daemon's memory, are set aside."""
    waiting = _in(State.PENDING, State.DEFERRED, State.ACTIVE)
    return _update(conn, f"state = {int(State.HELD)}", f"state IN {waiting}", sel, ())


def release(conn: sqlite3.Connection, sel: Selection, now: float) -> Changed:
    """Held recipients become due at once, as retries if they were ever tried."""
    state = f"CASE WHEN attempts = 0 THEN {int(State.PENDING)} ELSE {int(State.DEFERRED)} END"
    held = f"state = {int(State.HELD)}"
    return _update(conn, f"state = {state}, next_attempt = ?", held, sel, (now,))


def retry(conn: sqlite3.Connection, sel: Selection, now: float) -> Changed:
    """Waiting recipients become due at once; held ones stay held."""
    waiting = _in(State.PENDING, State.DEFERRED)
    return _update(conn, "next_attempt = ?", f"state IN {waiting}", sel, (now,))


def _update(
    conn: sqlite3.Connection, changes: str, cond: str, sel: Selection, values: tuple[Any, ...]
) -> Changed:
    rows = conn.execute(
        f"UPDATE recipients SET {changes} WHERE {cond} AND {sel.where} RETURNING msg_id",
        (*values, *sel.params),
    ).fetchall()
    return Changed([r[0] for r in rows], {})


def delete(conn: sqlite3.Connection, sel: Selection, now: float) -> Changed:
    """Drop unfinished recipients without a DSN, then the messages left with nothing to deliver
    and no DSN owed (one owed to a bounce at another domain is queued by the daemon, which then
    removes the message)."""
    touched = conn.execute(
        f"DELETE FROM recipients WHERE state IN {IN_UNFINISHED} AND {sel.where} RETURNING msg_id",
        sel.params,
    ).fetchall()
    candidates = sorted({r[0] for r in touched} | set(sel.msg_ids))
    removed = conn.execute(
        f"DELETE FROM messages WHERE id IN {IDS_IN} AND NOT EXISTS (SELECT 1 FROM recipients r"
        f" WHERE r.msg_id = messages.id AND (r.state IN {IN_UNFINISHED} OR ({OWED})))"
        f" RETURNING id, queue_id",
        (json.dumps(candidates),),
    ).fetchall()
    return Changed([r[0] for r in touched], dict(removed))


Action = Callable[[sqlite3.Connection, Selection, float], Changed]
ACTIONS: dict[str, Action] = {"hold": hold, "release": release, "retry": retry, "delete": delete}


def change(
    conn: sqlite3.Connection, action: str, queue_ids: list[str], domain: str | None, now: float
) -> Row:
    """Apply one action and record it as an operator event, in the caller's transaction."""
    return apply(conn, action, select(conn, queue_ids, domain), now)


def apply(conn: sqlite3.Connection, action: str, sel: Selection, now: float) -> Row:
    """An action on a selection (relayctl's, or a campaign's messages), with its event."""
    changed = ACTIONS[action](conn, sel, now)
    msg_ids = sorted({*changed.touched, *changed.removed})
    names = _queue_ids(conn, msg_ids) | changed.removed
    result: Row = {
        "action": action,
        "recipients": len(changed.touched),
        "messages": [names[m] for m in msg_ids],
    }
    if action == "delete":
        result["removed"] = sorted(changed.removed.values())
    if msg_ids:
        append_events(conn, [_event(result, sel.text, now)])
    return result


def _event(result: Row, selection: str, now: float) -> Event:
    """The outbox record of a change: counts, and the first queue ids (an action on the whole
    queue must not make a record the size of the queue)."""
    names = result["messages"]
    data = result | {"selection": selection, "messages": len(names)}
    data["queue_ids"] = names[:EVENT_IDS]
    if "removed" in result:
        data["removed"] = len(result["removed"])
    return Event(Type.OPERATOR, names[0] if len(names) == 1 else "", now, data)


def _queue_ids(conn: sqlite3.Connection, msg_ids: list[int]) -> dict[int, str]:
    return dict(
        conn.execute(
            f"SELECT id, queue_id FROM messages WHERE id IN {IDS_IN}", (json.dumps(msg_ids),)
        ).fetchall()
    )


# -- for benchmarks/suite.py: bulk spools, outside any running daemon ------------------------


def schema_fingerprint(path: Path) -> tuple[int, list[str]]:
    """The schema version and every CREATE statement of a spool: what a cached bench spool
    must match to be reused."""
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        sql = sorted(r[0] or "" for r in conn.execute("SELECT sql FROM sqlite_master"))
        return conn.execute("PRAGMA user_version").fetchone()[0], sql
    finally:
        conn.close()


def state_counts(path: Path) -> dict[int, int]:
    """Recipients per state, read-only."""
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT state, count(*) FROM recipients GROUP BY state"))
    finally:
        conn.close()


def make_due(path: Path, n: int) -> int:
    """Make the first ``n`` deferred recipients due now (a stopped daemon's spool)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        return conn.execute(
            "UPDATE recipients SET next_attempt = 0 WHERE id IN"
            " (SELECT id FROM recipients WHERE state = 1 ORDER BY id LIMIT ?)",
            (n,),
        ).rowcount
    finally:
        conn.close()


def bulk_fill(path: Path, batches: Iterator[tuple[list[tuple], list[tuple]]]) -> None:
    """Fill a spool that relayd created (and no daemon has open) as fast as SQLite allows:
    no fsync, recipient indexes dropped during the load and rebuilt from their own SQL. Each
    batch is (messages rows: id, queue_id, sender, received_at, size, client, helo, origin,
    smtputf8, body; recipient rows: id, msg_id, rcpt, domain, state, next_attempt, attempts,
    last_code, last_reply, last_mx, last_attempt), one transaction each."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-262144")
        indexes = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index'"
            " AND tbl_name = 'recipients' AND sql IS NOT NULL"
        ).fetchall()
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        for msgs, rcpts in batches:
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO messages (id, queue_id, sender, received_at, size, client, helo,"
                " origin, smtputf8, body) VALUES (?,?,?,?,?,?,?,?,?,?)",
                msgs,
            )
            conn.executemany(
                "INSERT INTO recipients (id, msg_id, rcpt, domain, state, next_attempt,"
                " attempts, last_code, last_reply, last_mx, last_attempt)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                rcpts,
            )
            conn.execute("COMMIT")
        for _name, sql in indexes:
            conn.execute(sql)
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()
