"""The policy after an attempt, without sockets or a clock: decisions as values (outcomes.decide),
reply classification (model.status), and the one transaction that commits them
(outcomes.commit) on a real SQLite spool."""

from __future__ import annotations

import json
import random
import sqlite3

import pytest

from relayd.config import Retry
from relayd.events.records import Event, Type
from relayd.model.message import Job, NewMessage, Recipient, Report, State
from relayd.model.status import Reply, status_of
from relayd.outcomes import commit, decide
from relayd.queue.intake import store_message

NOW = 1_800_000_000.0
RETRY = Retry(first=300, multiplier=2, max_interval=3600, jitter=0, max_age=86400, delay_warning=0)


def job(received_at: float = NOW - 60, attempts: int = 0, rcpts: int = 1) -> Job:
    recipients = [Recipient(i + 1, f"r{i}@example.test", attempts) for i in range(rcpts)]
    return Job(7, "QID", "app@sender.test", "example.test", received_at, False, b"", recipients)


@pytest.mark.parametrize(
    ("code", "state"),
    [
        *((c, State.DELIVERED) for c in (250, 251)),
        *((c, State.DEFERRED) for c in (421, 451, 0, 199)),
        *((c, State.BOUNCED) for c in (550, 554)),
    ],
)
def test_reply_codes_classify_as_delivered_deferred_or_bounced(code: int, state: State):
    assert Reply(code, "text").state is state


def test_status_is_the_replys_enhanced_code_else_derived_from_its_class():
    assert status_of(550, "5.1.1 no such user") == "5.1.1"
    assert status_of(451, "4.7.1 greylisted, come back later") == "4.7.1"
    assert status_of(550, "no such user") == "5.0.0"
    assert status_of(421, "busy") == "4.0.0"
    assert status_of(250, "5.1.1 looks enhanced but the code is 2xx") == "5.1.1"


def test_each_recipient_gets_its_own_decision_and_event():
    j = job(rcpts=3)
    replies = [
        (1, Reply(250, "2.0.0 ok")),
        (2, Reply(451, "4.3.0 later")),
        (3, Reply(550, "5.1.1 no")),
    ]
    results, events = decide.decide(
        j, replies, "mx[127.0.0.10]", "127.0.0.1", NOW, RETRY, random.Random(1)
    )
    assert [r.state for r in results] == [State.DELIVERED, State.DEFERRED, State.BOUNCED]
    assert [e.type for e in events] == [Type.DELIVERY, Type.TRANSIENT_FAILURE, Type.BOUNCE]
    assert results[1].next_attempt == NOW + 300
    assert results[0].next_attempt == results[2].next_attempt == 0
    deferred = events[1].data
    assert (deferred["rcpt"], deferred["code"], deferred["attempt"]) == ("r1@example.test", 451, 1)
    assert deferred["next_attempt_in_s"] == 300
    assert (deferred["mx"], deferred["source_ip"], deferred["delay_s"]) == (
        "mx[127.0.0.10]",
        "127.0.0.1",
        60,
    )
    assert all(e.at == NOW and e.queue_id == "QID" for e in events)


def test_a_deferral_past_the_lifetime_expires_as_a_447_bounce():
    old = job(received_at=NOW - RETRY.max_age, attempts=5)
    results, events = decide.decide(
        old, [(1, Reply(451, "4.3.0 later"))], "mx", "", NOW, RETRY, random.Random()
    )
    assert results[0].state is State.BOUNCED
    assert (
        results[0].reply.startswith("4.4.7 message expired") and "4.3.0 later" in results[0].reply
    )
    assert events[0].type == Type.EXPIRATION
    assert status_of(results[0].code, results[0].reply) == "4.4.7"


def test_the_next_attempt_is_never_after_the_expiry():
    young = job(received_at=NOW - RETRY.max_age + 10, attempts=3)
    results, _ = decide.decide(
        young, [(1, Reply(451, "later"))], "mx", "", NOW, RETRY, random.Random()
    )
    assert results[0].state is State.DEFERRED
    assert results[0].next_attempt == NOW + 10


def test_retry_delays_grow_and_never_exceed_max_interval_even_with_jitter():
    jittered = Retry(**{**RETRY.__dict__, "jitter": 0.5})
    rng = random.Random(3)
    delays = [decide.retry_delay(n, jittered, rng) for n in range(1, 2000)]
    assert max(delays) <= jittered.max_interval
    assert min(delays[:1]) >= 150
    assert decide.retry_delay(10**6, RETRY, rng) == RETRY.max_interval  # no overflow


def test_nothing_is_owed_while_a_recipient_is_in_memory_or_never_tried():
    for waiting in (State.ACTIVE, State.PENDING):
        assert decide.owed([(State.BOUNCED, 0), (waiting, 0)], NOW - 10, NOW, 0) == ([], [], False)


def test_one_failure_report_covers_every_unreported_bounce():
    states = [(State.BOUNCED, 0), (State.DELIVERED, 0), (State.BOUNCED, decide.REPORTED_FAILED)]
    states.append((State.BOUNCED, 0))
    assert decide.owed(states, NOW - 10, NOW, 0) == ([0, 3], [], True)


def test_a_delay_warning_is_owed_once_after_its_age():
    states = [(State.DEFERRED, 0), (State.DEFERRED, decide.REPORTED_DELAYED), (State.DELIVERED, 0)]
    assert decide.owed(states, NOW - 100, NOW, 3600) == ([], [], False)
    assert decide.owed(states, NOW - 4000, NOW, 3600) == ([], [0], False)
    assert decide.owed(states, NOW - 4000, NOW, 0) == ([], [], False)  # 0: never


# -- the one transaction -------------------------------------------------------------------


def stored(
    conn: sqlite3.Connection, rcpts: list[str], sender: str = "app@sender.test"
) -> NewMessage:
    msg = NewMessage(
        "ORIG", sender, rcpts, b"Subject: x\r\n\r\nbody\r\n", "127.0.0.1", "h", "t", False, NOW - 60
    )
    msg.active = True
    conn.execute("BEGIN")
    store_message(conn, msg)
    conn.execute("COMMIT")
    return msg


def dsn_door(conn: sqlite3.Connection, report: Report, now: float) -> list[Event]:
    """Intake's door in miniature: the DSN stored as a message of its own."""
    msg = NewMessage(
        "DSN1",
        "",
        [report.sender],
        b"Subject: dsn\r\n\r\n",
        "",
        "",
        f"dsn:{report.queue_id}",
        False,
        now,
    )
    return store_message(conn, msg)


def run_attempt(conn: sqlite3.Connection, msg: NewMessage, replies: list[Reply], door=dsn_door):
    j = Job(msg.msg_id, msg.queue_id, msg.sender, "example.test", msg.received_at, False, b"", [])
    j.recipients = [Recipient(i, r, 0) for i, r in zip(msg.ids, msg.recipients, strict=True)]
    results, events = decide.decide(
        j, list(zip(msg.ids, replies, strict=True)), "mx", "", NOW, RETRY, random.Random()
    )
    op = commit.attempt(msg.msg_id, results, events, NOW, 0, door)
    conn.execute("BEGIN IMMEDIATE")
    try:
        done = op(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return done


def rows(conn: sqlite3.Connection, sql: str) -> list[tuple]:
    return conn.execute(sql).fetchall()


def test_a_bounce_its_dsn_and_their_events_commit_together(spool_conn):
    msg = stored(spool_conn, ["gone@example.test", "ok@example.test"])
    done = run_attempt(spool_conn, msg, [Reply(550, "5.1.1 no such user"), Reply(250, "ok")])
    assert [e.type for e in done.events] == ["bounced", "delivered", "accepted", "dsn_queued"]
    assert done.dsns == 1
    # the original left the spool (every recipient final, its DSN queued); the DSN is in it
    assert rows(spool_conn, "SELECT queue_id, origin FROM messages") == [("DSN1", "dsn:ORIG")]
    types = [r[0] for r in rows(spool_conn, "SELECT type FROM events ORDER BY id")]
    assert types == ["accepted", "bounced", "delivered", "accepted", "dsn_queued"]
    queued = json.loads(rows(spool_conn, "SELECT data FROM events WHERE type = 'dsn_queued'")[0][0])
    assert queued["original_queue_id"] == "ORIG" and queued["failed"] == ["gone@example.test"]


def test_a_failing_dsn_insert_undoes_the_bounce_it_reports(spool_conn):
    msg = stored(spool_conn, ["gone@example.test"])

    def broken(conn: sqlite3.Connection, report: Report, now: float) -> list[Event]:
        raise sqlite3.OperationalError("database or disk is full")

    with pytest.raises(sqlite3.OperationalError):
        run_attempt(spool_conn, msg, [Reply(550, "5.1.1 no")], door=broken)
    # nothing of the attempt is stored: the recipient is still in memory's hands, to be retried
    assert rows(spool_conn, "SELECT state, attempts FROM recipients") == [(State.ACTIVE, 0)]
    assert [r[0] for r in rows(spool_conn, "SELECT type FROM events")] == ["accepted"]
    done = run_attempt(spool_conn, msg, [Reply(550, "5.1.1 no")])  # the retry of the commit
    assert done.dsns == 1


def test_a_null_sender_bounce_is_reported_as_suppressed_not_sent(spool_conn):
    msg = stored(spool_conn, ["gone@example.test"], sender="")
    done = run_attempt(spool_conn, msg, [Reply(550, "5.1.1 no")])
    assert [e.type for e in done.events] == ["bounced", "dsn_suppressed"]
    assert rows(spool_conn, "SELECT count(*) FROM messages") == [(0,)]


def test_a_deferral_keeps_the_message_and_owes_nothing(spool_conn):
    msg = stored(spool_conn, ["later@example.test"])
    done = run_attempt(spool_conn, msg, [Reply(451, "4.3.0 later")])
    assert done.dsns == 0
    assert rows(spool_conn, "SELECT state, attempts, next_attempt FROM recipients") == [
        (State.DEFERRED, 1, NOW + 300)
    ]
