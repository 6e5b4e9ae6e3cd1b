"""Loading due mail from a real SQLite spool (spool.store.load_due) and the hand-off framing
between the two processes (process.handoff), without a daemon."""

from __future__ import annotations

import asyncio
import marshal
import socket
import sqlite3

from relayd.events.records import Event, Type
from relayd.model.message import NewMessage, State
from relayd.process import handoff
from relayd.spool import api, holds, store

NOW = 1_800_000_000.0


def add(conn: sqlite3.Connection, qid: str, rcpts: list[str], state: State, due: float) -> None:
    msg = NewMessage(
        qid, "a@s.test", rcpts, f"Subject: {qid}\r\n\r\n".encode(), "", "", "t", False, NOW
    )
    store.insert_message(conn, msg, due)
    attempts = 0 if state is State.PENDING else 1
    conn.execute(
        "UPDATE recipients SET state = ?, attempts = ?, next_attempt = ? WHERE msg_id = ?",
        (int(state), attempts, due, msg.msg_id),
    )


def states(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT rcpt, state FROM recipients"))


def test_due_mail_is_loaded_as_one_job_per_message_and_domain_and_marked_active(spool_conn):
    add(spool_conn, "M1", ["a@x.test", "b@x.test", "c@y.test"], State.PENDING, NOW - 1)
    add(spool_conn, "M2", ["d@x.test"], State.DEFERRED, NOW + 60)  # not due yet
    jobs, more = store.load_due(spool_conn, NOW, limit=100, retry_limit=100)
    assert not more
    assert sorted((j.queue_id, j.domain, [r.rcpt for r in j.recipients]) for j in jobs) == [
        ("M1", "x.test", ["a@x.test", "b@x.test"]),
        ("M1", "y.test", ["c@y.test"]),
    ]
    assert all(j.body is None and j.size == len(b"Subject: M1\r\n\r\n") for j in jobs)
    assert (
        states(spool_conn)["a@x.test"] == State.ACTIVE
        and states(spool_conn)["d@x.test"] == State.DEFERRED
    )
    assert store.load_due(spool_conn, NOW, 100, 100) == (
        [],
        False,
    )  # what is active is not loaded twice


def test_fresh_mail_comes_before_a_due_backlog_of_retries(spool_conn):
    for i in range(5):
        add(spool_conn, f"R{i}", [f"r{i}@x.test"], State.DEFERRED, NOW - 100)
    add(spool_conn, "NEW", ["n@x.test"], State.PENDING, NOW)
    jobs, more = store.load_due(spool_conn, NOW, limit=3, retry_limit=2)
    assert jobs[0].queue_id == "NEW"
    assert len(jobs) == 3 and more
    assert sum(s == State.ACTIVE for s in states(spool_conn).values()) == 3


def test_retries_are_capped_by_their_own_limit(spool_conn):
    for i in range(5):
        add(spool_conn, f"R{i}", [f"r{i}@x.test"], State.DEFERRED, NOW - 100 + i)
    jobs, more = store.load_due(spool_conn, NOW, limit=10, retry_limit=2)
    assert [j.queue_id for j in jobs] == ["R0", "R1"]  # the longest due first
    assert more and all(j.is_retry for j in jobs)


def test_held_and_final_recipients_are_never_loaded(spool_conn):
    add(spool_conn, "H", ["h@x.test"], State.HELD, NOW - 100)
    add(spool_conn, "B", ["b@x.test"], State.BOUNCED, NOW - 100)
    assert store.load_due(spool_conn, NOW, 10, 10) == ([], False)


def test_start_up_gives_what_was_in_memory_back_to_waiting(spool_conn):
    add(spool_conn, "P", ["p@x.test"], State.ACTIVE, NOW)
    add(spool_conn, "D", ["d@x.test"], State.ACTIVE, NOW)
    spool_conn.execute("UPDATE recipients SET attempts = 0 WHERE rcpt = 'p@x.test'")
    assert store.reset_active(spool_conn) == 2
    assert states(spool_conn) == {"p@x.test": State.PENDING, "d@x.test": State.DEFERRED}


# -- hand-off framing ------------------------------------------------------------------------


def sample(n: int) -> NewMessage:
    """A message with a head added by ingress and a text large enough to arrive in pieces."""
    return NewMessage(
        f"0191A2B3C4D5E6F{n}",
        "app@sender.test",
        ["a@x.test", "ü@y.test"],
        b"Subject: hi\r\n\r\n" + bytes(range(256)) * 1200,
        "127.0.0.1",
        "client.test",
        "auth:app",
        True,
        NOW,
        head=b"Received: by relay.test\r\n",
    )


def test_frames_split_at_any_byte_are_reassembled_in_order():
    """Each message's text follows its frame raw; the receiver joins head and text whatever
    the pieces it reads, and the frames after it still arrive."""
    msgs = [sample(i) for i in range(3)]
    stored = ("s", [(0, "", None), (1, "disk full", None)])
    batches = [(0, [msgs[0]], None), (1, msgs[1:], ("key:app", "k1", "d", "{}"))]
    size = sum(4 + len(marshal.dumps(handoff.messages_frame(*b), 4)) for b in batches)
    size += sum(len(m.head) + len(m.body) for m in msgs) + 4 + len(marshal.dumps(stored, 4))

    async def over_a_socketpair() -> bytes:
        """The frames as one process writes them to the other, read at the far end."""
        loop = asyncio.get_running_loop()
        near, far = socket.socketpair()
        far.setblocking(False)
        channel = handoff.Channel(lambda frame: None, lambda: None)
        await loop.create_unix_connection(lambda: channel, sock=near)
        for b in batches:
            channel.send(
                handoff.messages_frame(*b), tuple(t for m in b[1] for t in (m.head, m.body))
            )
        channel.send(stored)
        stream = b""
        while len(stream) < size:
            stream += await loop.sock_recv(far, 65536)
        channel.close()
        far.close()
        return stream

    stream = asyncio.run(over_a_socketpair())
    for step in (13, 4096, 65536, len(stream)):
        frames: list[tuple] = []
        receiver = handoff.Channel(frames.append, lambda: None)
        for pos in range(0, len(stream), step):
            receiver.data_received(stream[pos : pos + step])
        assert [f[0] for f in frames] == [handoff.MESSAGES] * 2 + ["s"]
        received = []
        for i, (_, batch, guard) in enumerate(batches):
            request, got, got_guard = handoff.messages_of(frames[i])
            assert request == i and got_guard == guard and len(got) == len(batch)
            received += got
        for m, got in zip(msgs, received, strict=True):
            assert got.queue_id == m.queue_id and got.recipients == m.recipients
            assert bytes(got.body) == m.head + m.body
            assert (got.sender, got.smtputf8, got.origin) == (m.sender, True, "auth:app")
        assert frames[2] == stored


def test_events_older_than_the_retention_are_pruned_in_bounded_batches(spool_conn):
    events = [Event(Type.DELIVERY, f"Q{i}", NOW - 100 + i, {"rcpt": "a@x.test"}) for i in range(10)]
    store.append_events(spool_conn, events)
    assert store.prune_events(spool_conn, before=NOW - 95, limit=3) == 3  # a batch, oldest first
    assert store.prune_events(spool_conn, before=NOW - 95, limit=3) == 2
    assert store.prune_events(spool_conn, before=NOW - 95, limit=3) == 0
    left = [r[0] for r in spool_conn.execute("SELECT queue_id FROM events ORDER BY id")]
    assert left == ["Q5", "Q6", "Q7", "Q8", "Q9"]
    rcpt = spool_conn.execute("SELECT rcpt FROM events LIMIT 1").fetchone()[0]
    assert rcpt == "a@x.test"  # the indexed column receipts look recipients up by


def test_an_idempotency_key_answers_again_for_a_day_and_refuses_another_request(spool_conn):
    guard = ("key:app", "k1", "digest-1", '{"first": true}')
    assert api.idempotent(spool_conn, guard, NOW) is None  # new: recorded
    assert api.idempotent(spool_conn, guard, NOW + 60) == ("replay", '{"first": true}')
    other = ("key:app", "k1", "digest-2", "{}")
    assert api.idempotent(spool_conn, other, NOW + 60) == ("conflict", "")
    assert api.idempotent(spool_conn, ("key:other", "k1", "digest-2", "{}"), NOW + 3600) is None
    later = NOW + api.IDEMPOTENCY_TIME + 1
    assert api.prune_idempotency(spool_conn, later) == 1  # the first; the other key's stays
    assert api.idempotent(spool_conn, other, later) is None  # a day on, the key is free again


def test_adaptive_holds_that_ended_before_the_retention_are_pruned(spool_conn):
    def hold(ended_at: float | None) -> None:
        spool_conn.execute(
            "INSERT INTO holds (site, source_ip, action, rule, code, reply, since, until,"
            " ended_at) VALUES ('yahoo', '192.0.2.1', 'suspend', 'r', 421, 'x', ?, ?, ?)",
            (NOW - 200, NOW - 100, ended_at),
        )

    hold(NOW - 100)  # ended long ago
    hold(NOW - 5)  # ended within the retention
    hold(None)  # in force
    assert holds.prune(spool_conn, before=NOW - 50) == 1
    left = spool_conn.execute("SELECT ended_at FROM holds ORDER BY id").fetchall()
    assert left == [(NOW - 5,), (None,)]
