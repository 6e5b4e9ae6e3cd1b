"""The policy after an attempt, without sockets or a clock: decisions as values (outcomes.decide),
reply classification (model.status), and the one transaction that commits them
(outcomes.commit) on a real SQLite spool."""

from __future__ import annotations

import functools
import json
import random
import sqlite3
from pathlib import Path

import pytest

from relayd.config import HARD_CLASSES, BounceRule, Bounces, Retry, Suppression
from relayd.events.records import Event, Type
from relayd.model.message import Job, NewMessage, Notify, Recipient, Report, State
from relayd.model.status import Reply, status_of
from relayd.outcomes import commit, decide
from relayd.outcomes.classify import Classifier
from relayd.queue.intake import store_message
from relayd.spool import suppression

NOW = 1_800_000_000.0
RETRY = Retry(first=300, multiplier=2, max_interval=3600, jitter=0, max_age=86400, delay_warning=0)
# one rule of the operator's, and the fallback by enhanced code for the rest
CLASSES = Classifier(
    Bounces(
        Path(),
        None,
        (BounceRule("reputation", "421", None, r"\[TSS\d\d\]"),),
        frozenset(HARD_CLASSES),
    )
)


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
        j, replies, "mx[127.0.0.10]", "127.0.0.1", NOW, RETRY, CLASSES, random.Random(1)
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


def test_failed_attempts_events_carry_their_class_and_deliveries_none():
    j = job(rcpts=4)
    replies = [
        (1, Reply(250, "2.0.0 ok")),
        (2, Reply(421, "4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred")),
        (3, Reply(550, "5.1.1 The email account that you tried to reach does not exist.")),
        (4, Reply(554, "transaction failed")),
    ]
    clock = NOW + 12.5  # the injected time: the events' and the next attempt's
    results, events = decide.decide(j, replies, "mx", "", clock, RETRY, CLASSES, random.Random())
    assert [e.type for e in events] == [
        Type.DELIVERY,
        Type.TRANSIENT_FAILURE,
        Type.BOUNCE,
        Type.BOUNCE,
    ]
    assert [e.data.get("class") for e in events] == [
        None,
        "reputation",  # the rule
        "invalid_recipient",  # 5.1.1
        "uncategorized",  # no rule, no enhanced code
    ]
    assert all(e.at == clock for e in events) and results[1].next_attempt == clock + 300
    assert CLASSES.is_hard(events[2].data["class"]) and not CLASSES.is_hard("reputation")


def test_an_expiry_is_of_class_expired_whatever_the_last_reply():
    old = job(received_at=NOW - RETRY.max_age, attempts=5)
    reply = Reply(421, "4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred")
    _, events = decide.decide(old, [(1, reply)], "mx", "", NOW, RETRY, CLASSES, random.Random())
    assert (events[0].type, events[0].data["class"]) == (Type.EXPIRATION, "expired")
    young = job(received_at=NOW - RETRY.max_age + 1, attempts=5)
    _, events = decide.decide(young, [(1, reply)], "mx", "", NOW, RETRY, CLASSES, random.Random())
    assert (events[0].type, events[0].data["class"]) == (Type.TRANSIENT_FAILURE, "reputation")


def test_a_deferral_past_the_lifetime_expires_as_a_447_bounce():
    old = job(received_at=NOW - RETRY.max_age, attempts=5)
    results, events = decide.decide(
        old, [(1, Reply(451, "4.3.0 later"))], "mx", "", NOW, RETRY, CLASSES, random.Random()
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
        young, [(1, Reply(451, "later"))], "mx", "", NOW, RETRY, CLASSES, random.Random()
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


def owed(states: list[tuple], received_at: float = NOW - 10, delay_warning: float = 0) -> tuple:
    """decide.owed's answer as (failed, delayed, delivered, unwanted, finished); (state,
    reported) pairs get NOTIFY 0 (not given)."""
    full = [(*s, 0) if len(s) == 2 else s for s in states]
    o = decide.owed(full, received_at, NOW, delay_warning)
    return o.failed, o.delayed, o.delivered, o.unwanted, o.finished


def test_nothing_is_owed_while_a_recipient_is_in_memory_or_never_tried():
    for waiting in (State.ACTIVE, State.PENDING):
        assert owed([(State.BOUNCED, 0), (waiting, 0)]) == ([], [], [], [], False)


def test_one_failure_report_covers_every_unreported_bounce():
    states = [(State.BOUNCED, 0), (State.DELIVERED, 0), (State.BOUNCED, decide.REPORTED_FAILED)]
    states.append((State.BOUNCED, 0))
    assert owed(states) == ([0, 3], [], [], [], True)


def test_a_delay_warning_is_owed_once_after_its_age():
    states = [(State.DEFERRED, 0), (State.DEFERRED, decide.REPORTED_DELAYED), (State.DELIVERED, 0)]
    assert owed(states, NOW - 100, 3600) == ([], [], [], [], False)
    assert owed(states, NOW - 4000, 3600) == ([], [0], [], [], False)
    assert owed(states, NOW - 4000, 0) == ([], [], [], [], False)  # 0: never


SUCCESS, FAILURE, DELAY, NEVER = Notify.SUCCESS, Notify.FAILURE, Notify.DELAY, Notify.NEVER


def test_notify_decides_which_reports_are_owed():
    """NOTIFY not given: failures and delays; NEVER: none (its bounce is unwanted, to be
    recorded as suppressed); otherwise just what it lists, SUCCESS included."""
    b, d, ok = State.BOUNCED, State.DEFERRED, State.DELIVERED
    old = NOW - 4000
    assert owed([(b, 0, 0), (d, 0, 0), (ok, 0, 0)], old, 3600) == ([0], [1], [], [], False)
    never = [(b, 0, NEVER), (d, 0, NEVER), (ok, 0, NEVER)]
    assert owed(never, old, 3600) == ([], [], [], [0], False)
    only_success = [(b, 0, SUCCESS), (d, 0, SUCCESS), (ok, 0, SUCCESS)]
    assert owed(only_success, old, 3600) == ([], [], [2], [0], False)
    everything = [(b, 0, SUCCESS | FAILURE | DELAY), (d, 0, DELAY), (ok, 0, SUCCESS | FAILURE)]
    assert owed(everything, old, 3600) == ([0], [1], [2], [], False)
    delay_only = [(b, 0, DELAY), (d, 0, FAILURE)]
    assert owed(delay_only, old, 3600) == ([], [], [], [0], False)


def test_a_success_report_is_owed_once_and_waits_for_the_rest_of_the_message():
    ok = State.DELIVERED
    assert owed([(ok, 0, SUCCESS), (State.ACTIVE, 0, SUCCESS)]) == ([], [], [], [], False)
    assert owed([(ok, 0, SUCCESS), (ok, 0, 0)]) == ([], [], [0], [], True)
    reported = decide.REPORTED_DELIVERED
    assert owed([(ok, reported, SUCCESS), (ok, 0, SUCCESS)]) == ([], [], [1], [], True)


def test_wants_follows_rfc_3461_defaults():
    assert decide.wants(0, FAILURE) and decide.wants(0, DELAY) and not decide.wants(0, SUCCESS)
    assert not any(decide.wants(NEVER, f) for f in (SUCCESS, FAILURE, DELAY))
    assert decide.wants(SUCCESS, SUCCESS) and not decide.wants(SUCCESS, FAILURE)


def test_events_carry_envid_orcpt_and_metadata_only_when_given():
    j = job(rcpts=2)
    j.envid, j.meta = "QQ314159", '{"order": "123"}'
    j.recipients[0].orcpt = "rfc822;Bob@Example.test"
    replies = [(1, Reply(250, "2.0.0 ok")), (2, Reply(451, "4.3.0 later"))]
    _, events = decide.decide(j, replies, "mx", "", NOW, RETRY, CLASSES, random.Random(1))
    assert events[0].data["envid"] == "QQ314159" and events[1].data["envid"] == "QQ314159"
    assert events[0].data["orcpt"] == "rfc822;Bob@Example.test" and "orcpt" not in events[1].data
    assert events[0].data["meta"] == {"order": "123"}
    _, plain = decide.decide(
        job(), [(1, Reply(250, "ok"))], "mx", "", NOW, RETRY, CLASSES, random.Random()
    )
    assert not {"envid", "orcpt", "meta"} & set(plain[0].data)


# -- the one transaction -------------------------------------------------------------------


def stored(
    conn: sqlite3.Connection, rcpts: list[str], sender: str = "app@sender.test", **dsn
) -> NewMessage:
    msg = NewMessage(
        "ORIG",
        sender,
        rcpts,
        b"Subject: x\r\n\r\nbody\r\n",
        "127.0.0.1",
        "h",
        "t",
        False,
        NOW - 60,
        **dsn,
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


GLOBAL_30D = Suppression("refuse", 30 * 86400, "global")


def run_attempt(
    conn: sqlite3.Connection,
    msg: NewMessage,
    replies: list[Reply],
    door=dsn_door,
    policy: Suppression = GLOBAL_30D,
):
    j = Job(msg.msg_id, msg.queue_id, msg.sender, "example.test", msg.received_at, False, b"", [])
    j.envid, j.meta = msg.envid, msg.meta
    notify = msg.notify or [0] * len(msg.ids)
    orcpt = msg.orcpt or [None] * len(msg.ids)
    j.recipients = [
        Recipient(i, r, 0, n, o)
        for i, r, n, o in zip(msg.ids, msg.recipients, notify, orcpt, strict=True)
    ]
    results, events = decide.decide(
        j, list(zip(msg.ids, replies, strict=True)), "mx", "", NOW, RETRY, CLASSES, random.Random()
    )
    suppress = functools.partial(decide.hard_bounces, events, CLASSES, policy, now=NOW)
    op = commit.attempt(msg.msg_id, results, events, NOW, 0, door, suppress)
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


def recording_door(reports: list[Report]):
    def door(conn: sqlite3.Connection, report: Report, now: float) -> list[Event]:
        reports.append(report)
        return dsn_door(conn, report, now)

    return door


def test_notify_success_keeps_the_message_until_its_success_dsn_commits(spool_conn):
    """A delivery that asked for a receipt does not take the one-DELETE path: the success DSN
    is queued in the same transaction, with ENVID, RET and ORCPT, and reported once."""
    msg = stored(
        spool_conn,
        ["ok@example.test", "quiet@example.test"],
        envid="ENV-1",
        ret="HDRS",
        notify=[Notify.SUCCESS | Notify.FAILURE, 0],
        orcpt=["rfc822;OK@example.test", None],
        meta='{"order": 7}',
    )
    reports: list[Report] = []
    done = run_attempt(
        spool_conn, msg, [Reply(250, "2.0.0 ok"), Reply(250, "ok")], recording_door(reports)
    )
    assert [e.type for e in done.events] == ["delivered", "delivered", "accepted", "dsn_queued"]
    (report,) = reports
    assert (report.kind, report.envid, report.ret) == ("delivered", "ENV-1", "HDRS")
    assert [r[0] for r in report.recipients] == ["ok@example.test"]
    assert report.orcpt == ["rfc822;OK@example.test"]
    queued = done.events[-1].data
    assert queued["delivered"] == ["ok@example.test"] and queued["orcpt"] == [
        "rfc822;OK@example.test"
    ]
    assert queued["envid"] == "ENV-1" and queued["meta"] == {"order": 7}
    assert rows(spool_conn, "SELECT queue_id FROM messages") == [("DSN1",)]
    accepted = json.loads(rows(spool_conn, "SELECT data FROM events ORDER BY id LIMIT 1")[0][0])
    assert accepted["envid"] == "ENV-1" and accepted["orcpt"] == ["rfc822;OK@example.test", None]


def test_notify_never_records_the_bounce_as_suppressed_and_owes_nothing(spool_conn):
    msg = stored(spool_conn, ["gone@example.test"], envid="E2", notify=[Notify.NEVER])
    done = run_attempt(spool_conn, msg, [Reply(550, "5.1.1 no")])
    assert [e.type for e in done.events] == ["bounced", "dsn_suppressed"]
    suppressed = done.events[1].data
    assert suppressed["reason"] == "NOTIFY=NEVER" and suppressed["envid"] == "E2"
    assert done.dsns == 0
    assert rows(spool_conn, "SELECT count(*) FROM messages") == [(0,)]


def test_a_bounce_carries_ret_and_orcpt_into_its_report(spool_conn):
    msg = stored(spool_conn, ["gone@example.test"], ret="FULL", orcpt=["rfc822;g@x.test"])
    reports: list[Report] = []
    run_attempt(spool_conn, msg, [Reply(550, "5.1.1 no")], recording_door(reports))
    assert [(r.kind, r.ret, r.orcpt, r.envid) for r in reports] == [
        ("failed", "FULL", ["rfc822;g@x.test"], None)
    ]


def test_a_hard_bounce_suppresses_its_address_in_the_attempts_transaction(spool_conn):
    msg = stored(spool_conn, ["gone@example.test", "full@example.test"])
    run_attempt(
        spool_conn, msg, [Reply(550, "5.1.1 no such user"), Reply(552, "5.2.2 mailbox full")]
    )
    (entry,) = suppression.every(spool_conn, NOW)  # quota is not a hard class
    assert (entry.address, entry.scope, entry.reason) == ("gone@example.test", "*", "bounce")
    assert entry.bounce_class == "invalid_recipient" and entry.expires == NOW + 30 * 86400
    assert entry.detail == "550 5.1.1 no such user" and entry.queue_id == msg.queue_id


def test_a_hard_bounce_is_scoped_as_configured_and_a_zero_ttl_adds_nothing(spool_conn):
    for rcpt, policy in (
        ("a@example.test", Suppression("refuse", 60, "sender_domain")),
        ("b@example.test", Suppression("refuse", 60, "key")),
        ("c@example.test", Suppression("refuse", 0, "global")),
    ):
        msg = stored(spool_conn, [rcpt], sender="")  # no DSN: one message at a time
        msg.sender = "app@sender.test"  # as the events say it
        run_attempt(spool_conn, msg, [Reply(550, "5.1.1 no such user")], policy=policy)
    scopes = {e.address: e.scope for e in suppression.every(spool_conn, NOW)}
    # "key": the message came from a trusted network (no key), so the entry is global
    assert scopes == {"a@example.test": "domain:sender.test", "b@example.test": "*"}
