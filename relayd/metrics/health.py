"""Readiness and the systemd watchdog of the queue process.

A tick each second measures how late the queue loop runs (a blocked loop does not tick at all),
asks the ingress process to answer over the hand-off (PING/PONG: its loop turns) and puts a
tiny write through the spool Writer (its thread takes the write lock and commits). /readyz
reports these with the tasks of the queue process (scheduler loader, control, reputation watch,
webhooks dispatcher) and the free space; the watchdog pings systemd (WATCHDOG=1, every
WATCHDOG_USEC/2) only while the loops answer, so that systemd restarts a wedged relayd.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from relayd.events.log import log

if TYPE_CHECKING:
    from relayd.metrics import Metrics
    from relayd.process.daemon import QueueProcess

TICK = 1.0  # seconds between two looks (shorter when the watchdog wants pings more often)


def _probe(conn: sqlite3.Connection) -> None:
    """Nothing to change: the Writer's BEGIN IMMEDIATE ... COMMIT around it is the test."""


def watchdog_interval(environ: dict[str, str] | os._Environ = os.environ) -> float | None:
    """Half of systemd's WATCHDOG_USEC (sd_watchdog_enabled(3)), for this process only."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class Health:
    """The loops' liveness, looked at each TICK; ``problems()`` for /readyz."""

    def __init__(
        self,
        relay: QueueProcess,
        metrics: Metrics,
        notify: Callable[[str], None],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.relay, self.metrics, self.notify, self.monotonic = relay, metrics, notify, monotonic
        self.written = monotonic()  # when the Writer last answered a probe
        self.interval = watchdog_interval()
        self.tick = min(TICK, self.interval or TICK)  # a ping at least every interval
        self.pinged = float("-inf")
        self.probing = False  # a probe of the Writer is on its way
        self.stuck: dict[str, str] = {}  # what the last look found wrong
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        """Tick until cancelled."""
        while True:
            before = self.monotonic()
            self.relay.link.ping()
            if not self.probing:  # a hung writer gets one probe, not one per tick
                self.probing = True
                asyncio.get_running_loop().create_task(self._write())
            await asyncio.sleep(self.tick)
            self.metrics.loop_lag["queue"] = max(self.monotonic() - before - self.tick, 0.0)
            self.metrics.loop_lag["ingress"] = self.relay.link.lag
            problems = self.live()
            if problems != self.stuck:
                if problems:
                    log.error("loops_stuck", problems=problems)
                else:
                    log.info("loops_answering")
                self.stuck = problems
            now = self.monotonic()
            if (
                self.interval
                and not problems
                and now - self.pinged >= self.interval - self.tick / 2
            ):
                self.pinged = now
                self.notify("WATCHDOG=1")

    async def _write(self) -> None:
        try:
            await self.relay.writer.submit(_probe)
            self.written = self.monotonic()
        except Exception:  # the spool refuses writes: ``written`` ages, live() says so
            pass
        finally:
            self.probing = False

    def live(self) -> dict[str, str]:
        """The loops that do not answer (name -> why); the watchdog's condition."""
        relay, limit = self.relay, self.relay.config.monitoring.ready_timeout
        now = self.monotonic()
        problems = {}
        if now - self.written > limit + self.tick:
            problems["spool"] = f"the spool writer has not committed for {now - self.written:.1f}s"
        if relay.ingress_gone.is_set():
            problems["ingress"] = "the ingress process has exited"
        elif (silent := now - relay.link.ponged) > limit + self.tick:
            problems["ingress"] = f"the ingress process has not answered for {silent:.1f}s"
        tasks = {
            "scheduler": relay.scheduler.loader,
            "control": relay.control_task,
            "reputation": relay.reputation_task,
            "webhooks": relay.webhooks.task,
        }
        for name, task in tasks.items():
            if task.done():
                problems[name] = "its loop has ended"
        return problems

    async def problems(self) -> dict[str, str]:
        """Every failing check of /readyz: the loops, a write through the Writer now (within
        ``ready_timeout``), free space."""
        problems = self.live()
        try:
            await asyncio.wait_for(
                asyncio.shield(self.relay.writer.submit(_probe)),
                self.relay.config.monitoring.ready_timeout,
            )
        except TimeoutError:
            problems["spool"] = "the spool writer did not commit within monitoring.ready_timeout"
        except Exception as exc:
            problems["spool"] = f"the spool refused a write: {exc}"
        space = self.relay.intake.space
        if space.low():
            problems["disk"] = str(space.refusal())
        return problems
