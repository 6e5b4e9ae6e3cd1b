"""The queue process's parts in one event loop, without the daemon: the real spool writer,
intake, scheduler and SMTP client against a fake MX, on a wall clock the test moves. What is due
is decided by the clock the scheduler is given, never by the machine's."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from support.fakemx import FakeMX

from relayd import config as configuration
from relayd.delivery.dns import Resolver
from relayd.mime.dkim import Signer
from relayd.model.ids import new_queue_id
from relayd.model.message import NewMessage
from relayd.outcomes.classify import Classifier
from relayd.queue.intake import Intake
from relayd.queue.scheduler import Scheduler, Settings
from relayd.spool import schema
from relayd.spool.space import FreeSpace
from relayd.spool.writer import Writer

START = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


async def until(predicate: Callable[[], Any], what: str, timeout: float = 10) -> None:
    """Poll with a deadline, yielding to the loop that does the work."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def run_queue(
    tmp_path: Path, mx: FakeMX, body: Callable[[Intake, Clock, Path], Awaitable[None]]
) -> None:
    path = tmp_path / "relayd.toml"
    path.write_text(
        "[server]\nspool_path = 'spool.sqlite'\nmin_free_space = '0'\n"
        f"[routes]\n'*' = '{mx.host}:{mx.port}'\n"
        "[retry]\nfirst = '1h'\nmax_interval = '1h'\njitter = 0.0\nmax_age = '5d'\n"
    )
    config = configuration.load(path)
    spool = config.server.spool_path
    schema.prepare(spool)
    clock = Clock()
    settings = Settings(
        "relay.test",
        config.delivery,
        config.routes,
        config.shaping,
        config.retry,
        {},
        Classifier(config.bounces),
        config.suppression,
    )

    async def main() -> None:
        writer = Writer(spool, asyncio.get_running_loop())
        resolver = Resolver(config.dns.nameservers, config.dns.timeout)
        scheduler = Scheduler(settings, writer, resolver, clock)
        space = FreeSpace(spool, 0)
        intake = Intake(writer, scheduler, Signer(config.dkim, path), "relay.test", space, clock)
        scheduler.start(intake.dsn)
        try:
            await body(intake, clock, spool)
        finally:
            await scheduler.stop(5)
            intake.close()
            writer.close()

    asyncio.run(main())


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

        async def body(intake: Intake, clock: Clock, spool: Path) -> None:
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

        async def body(intake: Intake, clock: Clock, spool: Path) -> None:
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
