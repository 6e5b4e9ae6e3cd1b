"""The queue process's parts in one event loop, without the daemon: the real spool writer,
intake, scheduler and SMTP client against a fake MX, on a wall clock the test moves. What is due
is decided by the clock the scheduler is given, never by the machine's."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from support.fakemx import FakeMX
from support.queue import START, Clock, run_queue, until

from relayd.model.ids import new_queue_id
from relayd.model.message import NewMessage
from relayd.queue.intake import Intake
from relayd.queue.scheduler import Scheduler


def message(rcpt: str, received_at: float) -> NewMessage:
    body = b"Subject: alone\r\n\r\nbody\r\n"
    return NewMessage(
        new_queue_id(), "a@s.test", [rcpt], body, "127.0.0.1", "t", "t", False, received_at
    )


def recipient(spool: Path) -> tuple[int, int, float]:
    with sqlite3.connect(spool) as db:
        return db.execute("SELECT state, attempts, next_attempt FROM recipients").fetchone()


def test_a_deferred_recipient_is_retried_when_the_given_clock_says_so(tmp_path):
    mx = FakeMX("127.0.0.10", 0, rcpt_reply="451 4.3.0 later").start()
    try:

        async def body(intake: Intake, _: Scheduler, clock: Clock, spool: Path) -> None:
            await intake.submit([message("x@example.test", clock.now)])
            await until(lambda: recipient(spool)[1] == 1, "the first attempt")
            assert recipient(spool) == (1, 1, START + 3600)  # deferred for retry.first
            mx.rcpt_reply = "250 2.1.5 ok"
            clock.now += 3600  # an hour on the given clock, seconds on the machine's
            await until(lambda: len(mx.messages) == 1, "the retry, due by the given clock")
            await until(lambda: recipient(spool) is None, "the message to leave the spool")

        run_queue(tmp_path, mx, body)
    finally:
        mx.stop()


def test_a_message_expires_by_the_given_clock_and_its_dsn_goes_out(tmp_path):
    mx = FakeMX("127.0.0.10", 0, rcpt_replies={"x@example.test": "451 4.3.0 later"}).start()
    try:

        async def body(intake: Intake, _: Scheduler, clock: Clock, spool: Path) -> None:
            await intake.submit([message("x@example.test", clock.now)])
            await until(lambda: recipient(spool)[1] == 1, "the first attempt")
            clock.now += 5 * 86400  # retry.max_age later
            await until(lambda: len(mx.messages) == 1, "the DSN for the expired recipient")
            (dsn,) = mx.messages
            assert dsn.rcpts == ["a@s.test"] and dsn.mail_from == ""
            assert b"Status: 4.4.7" in dsn.data

        run_queue(tmp_path, mx, body)
    finally:
        mx.stop()
