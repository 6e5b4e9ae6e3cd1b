"""relayctl's actions reach the running daemon through the spool's outbox: relayctl changes
rows and writes an ``operator`` event in one transaction; this loop reads those events, drops
from memory what relayctl moved out, settles what relayctl left owing a DSN, and wakes the
loader. It also keeps the outbox to its configured retention."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

from relayd.events.log import emit, log
from relayd.events.records import Event
from relayd.queue.scheduler import Scheduler, keep_running
from relayd.spool import api, holds, store, suppression
from relayd.spool.writer import Writer

POLL = 0.5  # seconds between looks at the outbox for relayctl's actions
PRUNE_EVERY = 60.0  # seconds between retention passes


class Control:
    def __init__(
        self,
        writer: Writer,
        scheduler: Scheduler,
        retention: float,
        clock: Callable[[], float],
        requests: Callable[[list[Event]], None] | None = None,
    ) -> None:
        self.writer, self.scheduler, self.retention, self.clock = (
            writer,
            scheduler,
            retention,
            clock,
        )
        self.requests = requests  # also given the operator events (relayctl ip check)
        self.cursor: int | None = None  # the last operator event applied
        self.next_prune = 0.0

    async def run(self) -> None:
        """Every step is retried after a failure (a locked or full spool), never given up."""
        await keep_running("control", self._tick, lambda: not self.scheduler.stopping)

    async def _tick(self) -> None:
        await self.step()
        await asyncio.sleep(POLL)

    async def step(self) -> None:
        submit = self.writer.submit
        if self.cursor is None:  # start-up: what a stopped relayd or relayctl left owing
            self.cursor = await submit(store.last_event_id)
            await self.settle()
        events = await submit(functools.partial(store.operator_events, after=self.cursor))
        if events:
            if any(e.data.get("action") in ("hold", "delete") for e in events):
                waiting = self.scheduler.waiting()
                if waiting:
                    msg_ids = {job.msg_id for job in waiting}
                    active = await submit(functools.partial(store.still_active, msg_ids=msg_ids))
                    self.scheduler.drop(waiting, active)
            if any(e.data.get("action") == "delete" for e in events):
                await self.settle()
            if self.requests is not None:
                self.requests(events)
            self.cursor = events[-1].id
            emit(events)
            self.scheduler.poke()
        if self.clock() >= self.next_prune:
            await self.prune()

    async def settle(self) -> None:
        owing = await self.writer.submit(store.owing)
        if owing:
            done = await self.scheduler.settle(owing)
            emit(done.events)
            if done.dsns:
                self.scheduler.poke()

    async def prune(self) -> None:
        """Events older than the retention go, a bounded batch per transaction; so do
        adaptive holds that ended before it, the API's idempotency records older than a day
        and lapsed suppression entries."""
        await self.writer.submit(functools.partial(api.prune_idempotency, now=self.clock()))
        await self.writer.submit(functools.partial(suppression.prune, now=self.clock()))
        before = self.clock() - self.retention
        await self.writer.submit(functools.partial(holds.prune, before=before))
        pruned = 0
        while True:
            n = await self.writer.submit(functools.partial(store.prune_events, before=before))
            pruned += n
            if n < 5000:
                break
        if pruned:
            log.info("events_pruned", count=pruned, retention_s=self.retention)
        self.next_prune = self.clock() + PRUNE_EVERY
