"""The queue process's parts in one event loop, without the daemon: the real spool writer,
intake, scheduler and SMTP client against a fake MX, on a wall clock the test moves."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from relayd import config as configuration
from relayd.delivery.dns import Resolver
from relayd.mime.dkim import Signer
from relayd.outcomes.classify import Classifier
from relayd.queue.intake import Intake
from relayd.queue.scheduler import Scheduler, Settings
from relayd.spool import schema
from relayd.spool.space import FreeSpace
from relayd.spool.writer import Writer
from support.fakemx import FakeMX

START = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def until(predicate: Callable[[], Any], what: str, timeout: float = 15) -> None:
    """Poll with a deadline, yielding to the loop that does the work."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


Body = Callable[[Intake, Scheduler, Clock, Path], Awaitable[None]]


def run_queue(
    tmp_path: Path, mx: FakeMX, body: Body, toml: str = "", clock: Clock | None = None
) -> None:
    """Run ``body`` against the queue process's parts on a config routed to ``mx`` (retries
    after an hour, no jitter; ``toml`` added to it), on ``clock`` (default: one at START)."""
    path = tmp_path / "relayd.toml"
    path.write_text(
        "[server]\nspool_path = 'spool.sqlite'\nmin_free_space = '0'\n"
        f"[routes]\n'*' = '{mx.host}:{mx.port}'\n"
        "[retry]\nfirst = '1h'\nmax_interval = '1h'\njitter = 0.0\nmax_age = '5d'\n" + toml
    )
    config = configuration.load(path)
    spool = config.server.spool_path
    schema.prepare(spool)
    clock = clock or Clock()
    settings = Settings(
        "relay.test",
        config.delivery,
        config.routes,
        config.shaping,
        config.retry,
        config.pools,
        Classifier(config.bounces),
        config.suppression,
        config.warmup,
    )

    async def main() -> None:
        writer = Writer(spool, asyncio.get_running_loop())
        resolver = Resolver(config.dns.nameservers, config.dns.timeout)
        scheduler = Scheduler(settings, writer, resolver, clock)
        space = FreeSpace(spool, 0)
        intake = Intake(writer, scheduler, Signer(config.dkim, path), "relay.test", space, clock)
        scheduler.start(intake.dsn)
        try:
            await body(intake, scheduler, clock, spool)
        finally:
            await scheduler.stop(5)
            intake.close()
            writer.close()

    asyncio.run(main())
