"""The queue process's parts in one event loop, without the daemon: the real spool writer,
intake, scheduler and SMTP client against a fake MX, on a wall clock the test moves. What is due
is decided by the clock the scheduler is given, never by the machine's."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from support.fakemx import FakeMX
from support.queue import START, Clock, run_queue, until

from relayd.model.ids import new_queue_id
from relayd.model.message import NewMessage, State
from relayd.queue.control import Control
from relayd.queue.intake import Intake
from relayd.queue.scheduler import Scheduler
from relayd.spool import admin
from relayd.spool.writer import Writer


def message(rcpt: str, received_at: float) -> NewMessage:
    body = b"Subject: alone\r\n\r\nbody\r\n"
    return NewMessage(
        new_queue_id(), "a@s.test", [rcpt], body, "127.0.0.1", "t", "t", False, received_at
    )


def recipient(spool: Path) -> tuple[int, int, float]:
    with sqlite3.connect(spool) as db:
        return db.execute("SELECT state, attempts, next_attempt FROM recipients").fetchone()


def left(spool: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(spool) as db:
        return db.execute("SELECT rcpt, state FROM recipients ORDER BY id").fetchall()


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


def test_mail_arriving_while_a_hold_is_applied_stays_in_memory_and_goes_out(tmp_path):
    """A hold's operator event makes Control ask the spool which waiting recipients are still
    ACTIVE; mail admitted meanwhile (a resumed campaign's next batch) is not in that answer
    and must not be dropped for it: it would stay ACTIVE in the spool, in nobody's memory.
    The writer is gated so that the new mail commits in the group commit of Control's read."""
    # one connection, busy with the first message for a while: the others wait in memory
    mx = FakeMX("127.0.0.10", 0, accept_delay=1.0, pipelining=False).start()
    try:

        async def body(intake: Intake, scheduler: Scheduler, clock: Clock, spool: Path) -> None:
            control = Control(scheduler.writer, scheduler, 86400.0, clock)
            await control.step()  # start-up: its cursor at the last event
            first, held, fresh = (message(f"{n}@example.test", clock.now) for n in "abc")
            await intake.submit([first])
            await until(lambda: mx.connections, "the first message on the connection")
            await intake.submit([held])
            await until(scheduler.waiting, "the second message waiting in memory")
            ctl = contextlib.closing(admin.open_spool(spool, write=True))  # relayctl's way
            with ctl as conn, admin.transaction(conn, write=True):
                admin.change(conn, "hold", [held.queue_id], None, clock.now)
            entered, gate = threading.Event(), threading.Event()
            scheduler.writer.submit(lambda _: entered.set() or gate.wait(10))
            await until(entered.is_set, "the writer held at the gate")
            step = asyncio.ensure_future(control.step())
            await asyncio.sleep(0)  # the step asks for the operator events, behind the gate
            stored = intake.submit([fresh])  # commits with that read: admitted after the look
            gate.set()
            await step
            await stored
            await until(lambda: len(mx.messages) == 2, "the first and the fresh message")
            assert sorted(r for m in mx.messages for r in m.rcpts) == [
                "a@example.test",
                "c@example.test",
            ]
            await until(lambda: left(spool) == [("b@example.test", State.HELD)], "the held one")

        run_queue(tmp_path, mx, body, "[shaping.default]\nmax_connections = 1\n")
    finally:
        mx.stop()


def test_mail_held_and_released_before_control_looks_goes_out_once(tmp_path):
    """A hold and its release, both made while the job waits in memory and before Control
    applies the hold, make the recipient due in the spool again: the loader must not add a
    second job for it (two connections would each send one)."""
    # two connections, busy with the first two messages for a while: the third waits
    mx = FakeMX("127.0.0.10", 0, accept_delay=1.0, pipelining=False).start()
    try:

        async def body(intake: Intake, scheduler: Scheduler, clock: Clock, spool: Path) -> None:
            control = Control(scheduler.writer, scheduler, 86400.0, clock)
            await control.step()  # start-up: its cursor at the last event
            msgs = [message(f"{n}@example.test", clock.now) for n in "abc"]
            await intake.submit(msgs[:2])
            await until(lambda: len(mx.connections) == 2, "both connections busy")
            await intake.submit(msgs[2:])
            await until(scheduler.waiting, "the third message waiting in memory")
            ctl = contextlib.closing(admin.open_spool(spool, write=True))  # relayctl's way
            with ctl as conn:
                for action in ("hold", "release"):
                    with admin.transaction(conn, write=True):
                        admin.change(conn, action, [msgs[2].queue_id], None, clock.now)
            scheduler.poke()
            await until(lambda: ("c@example.test", State.ACTIVE) in left(spool), "loaded again")
            await control.step()
            await until(lambda: not left(spool) and not scheduler.active, "all sent")
            rcpts = sorted(r for m in mx.messages for r in m.rcpts)
            assert rcpts == ["a@example.test", "b@example.test", "c@example.test"]

        run_queue(tmp_path, mx, body, "[shaping.default]\nmax_connections = 2\n")
    finally:
        mx.stop()


def recording(writer: Writer) -> list[str]:
    """From now on, the name of each operation given to the writer, in the order it will run
    (the scheduler's other loops may put theirs between them)."""
    names: list[str] = []
    submit = writer.submit

    def recorded(fn: Callable[[sqlite3.Connection], Any]) -> asyncio.Future[Any]:
        names.append(getattr(fn, "func", fn).__qualname__)
        return submit(fn)

    writer.submit = recorded  # type: ignore[method-assign]
    return names


def test_mail_held_and_released_during_its_attempt_goes_out_once(tmp_path):
    """A hold and its release made while the recipient is on a connection make it due in the
    spool again; a look by the loader that runs after the remote 250 but before that result is
    committed must not add a second job (it did: one contact got a campaign's mail twice after
    a pause and a resume). The writer is gated so that the look commits before the result."""
    mx = FakeMX("127.0.0.10", 0, pipelining=False).start()
    mx.reply_gate = threading.Event()
    try:

        async def body(intake: Intake, scheduler: Scheduler, clock: Clock, spool: Path) -> None:
            msg = message("a@example.test", clock.now)
            await intake.submit([msg])
            await until(lambda: mx.messages, "the MX to have the text, its 250 not yet sent")
            ctl = contextlib.closing(admin.open_spool(spool, write=True))  # relayctl's way
            with ctl as conn:
                for action in ("hold", "release"):
                    with admin.transaction(conn, write=True):
                        admin.change(conn, action, [msg.queue_id], None, clock.now)
            writer = scheduler.writer
            entered, gate = threading.Event(), threading.Event()
            writer.submit(lambda _: entered.set() or gate.wait(10))
            await until(entered.is_set, "the writer held at the gate")
            ops = recording(writer)
            scheduler.poke()
            await until(lambda: "load_due" in ops, "the loader's look behind the gate")
            assert mx.reply_gate is not None
            mx.reply_gate.set()
            await until(lambda: "attempt.<locals>.op" in ops, "the attempt's result behind it")
            assert ops.index("load_due") < ops.index("attempt.<locals>.op")
            gate.set()
            await until(lambda: not left(spool), "the spool empty")
            await writer.submit(lambda _: None)  # the look's answer has been handled
            await until(lambda: not scheduler.active, "nothing left on a connection")

        run_queue(tmp_path, mx, body)
        assert len(mx.messages) == 1
        assert sum(c.commands.count("DATA") for c in mx.connections) == 1
        with sqlite3.connect(tmp_path / "spool.sqlite") as db:
            kinds = db.execute("SELECT type FROM events WHERE rcpt IS NOT NULL ORDER BY id")
            assert [k for (k,) in kinds] == ["delivered"]  # not also deferred, nor twice
    finally:
        mx.stop()
