"""The campaign runner, in the ingress process: it finds campaigns due, renders each contact's
message, and queues them through the same door as the API (SpoolLink.store), a batch per
transaction. Each message's campaign_sends row commits with it, so a restart (after a stop or
a crash) resumes after the last committed contact: nobody twice, nobody lost.

A campaign's life: scheduled -> sending (phase "test": the test group only, each contact's
variant by weight) -> testing (the wait) -> sending (phase "rest": the winner to everyone
else) -> done. Without a test, one pass (phase "rest" from the start). Pause, resume and
cancel come from the API or relayctl as state changes; the runner reads the state after every
batch it stores and stops at once, holding (or removing) what it queued meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from relayd import templates
from relayd.campaigns import abtest
from relayd.config import Config
from relayd.events.log import emit, log
from relayd.feedback.tokens import Tokens
from relayd.feedback.unsubscribe import Links
from relayd.ingress.api import compose
from relayd.ingress.api.schema import Address
from relayd.ingress.api.service import Reader
from relayd.ingress.suppression import Lookup
from relayd.model.ids import new_queue_id
from relayd.model.message import BULK, Guard, NewMessage
from relayd.queue.scheduler import keep_running
from relayd.spool import campaigns as sql
from relayd.spool import contacts
from relayd.tracking import Tracker

Store = Callable[[list[NewMessage], Guard | None], Awaitable[Any]]
CLIENT = "127.0.0.1"  # the Received field's client: relayd itself
IN_FLIGHT = 3  # batches on their way into the spool while the next is rendered
MAX_READ = 100_000  # members read for one batch at most


class Runner:
    def __init__(
        self, config: Config, store: Store, tokens: Tokens, clock: Callable[[], float] = time.time
    ) -> None:
        self.store, self.clock = store, clock
        self.db = Reader(config.server.spool_path)  # reads, and the runner's own state changes
        self.lookup = Lookup(config.server.spool_path, clock)  # used on the db thread only
        self.tokens = tokens
        self.reload(config)
        self.compiled: dict[int, dict[str, templates.Compiled]] = {}
        self.woken = asyncio.Event()
        self.running = True

    def reload(self, config: Config) -> None:
        self.settings = config.campaigns
        self.limits = compose.Limits(
            config.api.max_recipients, config.ingress.max_message_size, config.server.hostname
        )
        self.links = Links(config.unsubscribe, self.tokens) if config.unsubscribe.enabled else None
        self.tracker = Tracker(config.tracking, self.tokens) if config.tracking.enabled else None

    def wake(self) -> None:
        """A campaign was made or resumed: look now, not at the next poll."""
        self.woken.set()

    async def run(self) -> None:
        await keep_running("campaigns", self._tick, lambda: self.running)

    def close(self) -> None:
        self.running = False
        self.db.close()
        self.lookup.close()

    async def _tick(self) -> None:
        await self.step()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.woken.wait(), self.settings.poll_interval)
        self.woken.clear()

    async def step(self) -> None:
        """Every campaign with work to do, one after the other."""
        for campaign in await self.db.run(sql.due, self.clock()):
            await self._advance(campaign)

    async def _advance(self, c: dict[str, Any]) -> None:
        cid, spec = c["id"], c["spec"]
        if c["state"] == "scheduled":
            total = await self.db.run(contacts.count_members, c["list_id"], c["segment_id"])
            if not await self._write(sql.start, cid, total, self.clock()):
                return  # paused or cancelled meanwhile
            log.info("campaign_started", campaign=cid, total=total)
        elif c["state"] == "testing":
            rates = await self.db.run(sql.variant_rates, cid)
            names = [v["name"] for v in spec["variants"]]
            winner, detail = abtest.winner(rates, spec["criterion"], names)
            if not await self._write(sql.pick, cid, winner, detail, self.clock()):
                return
            c["phase"], c["winner"] = "rest", winner
            log.info("campaign_winner", campaign=cid, winner=winner, z=detail["z"], p=detail["p"])
        if not await self._send(c):
            self.compiled.pop(cid, None)  # compiled again if it resumes
            return
        if c["phase"] == "test":
            await self._write(sql.tested, cid, self.clock())
        elif await self._write(sql.finish, cid, self.clock()):
            self.compiled.pop(cid, None)
            log.info("campaign_done", campaign=cid)

    async def _write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A state change in its own transaction; its events logged once committed."""
        found = await self.db.write(fn, *args)
        if found:
            emit(found if isinstance(found, list) else [found])
        return found

    async def _send(self, c: dict[str, Any]) -> bool:
        """The phase's contacts not yet queued, batch by batch: True when all are, False
        when the campaign was paused or cancelled meanwhile. Batches are rendered on the db
        thread while up to IN_FLIGHT earlier ones are on their way into the spool (the queue
        process commits them in order), so that neither waits for the other."""
        cid, after, more = c["id"], 0, True
        stored: deque[asyncio.Future[Any]] = deque()
        try:
            while more:
                msgs, failures, after, more = await self.db.run(self._batch, c, after)
                if failures:
                    await self._write(sql.failed, cid, failures, self.clock())
                if msgs:
                    stored.append(asyncio.ensure_future(self.store(msgs, None)))
                while stored and (len(stored) >= IN_FLIGHT or not more):
                    await stored.popleft()
                # a read suffices while it is sending: a pause or cancel made after this look
                # holds (or removes) what is stored by then itself
                if await self.db.run(sql.state_of, cid) != "sending":
                    while stored:
                        await stored.popleft()
                    # what was stored while the change was made: held or removed too
                    state = await self.db.write(sql.after_batch, cid, self.clock())
                    log.info("campaign_stopped", campaign=cid, state=state)
                    return False
            return True
        finally:
            for fut in stored:  # an error stopped the loop: their outcome no longer matters
                fut.cancel()

    def _batch(
        self, conn: sqlite3.Connection, c: dict[str, Any], after: int
    ) -> tuple[list[NewMessage], list[tuple[int, str, str, str, str]], int, bool]:
        """On the db thread: the next members after ``after`` and, of those in this phase
        that have no row yet, their messages (or the suppressed ones' carriers) and the
        failures; the last member id seen; whether there may be more."""
        cid, spec = c["id"], c["spec"]
        percent = spec["test_percent"]
        testing = c["phase"] == "test"
        # members enough for about a batch of this phase's contacts (a test group of 20 %
        # takes one member in five)
        share = 1.0 if percent is None else (percent if testing else 100 - percent) / 100
        limit = min(MAX_READ, math.ceil(self.settings.batch / max(share, 0.01)))
        rows = contacts.members(conn, c["list_id"], c["segment_id"], after, limit)
        if not rows:
            return [], [], after, False
        if percent is not None:
            rows_in = [r for r in rows if abtest.in_test(cid, r[0], percent) == testing]
        else:
            rows_in = rows
        done = sql.sent_among(conn, cid, [r[0] for r in rows_in])
        todo = [r for r in rows_in if r[0] not in done]
        origin = c["owner"] or f"campaign:{cid}"
        sender = compose.address_of(c["sender"], "from")
        stopped = self.lookup.find(sender.email, c["owner"] or None, [r[1] for r in todo])
        templates = self._templates(c)
        now = self.clock()
        msgs: list[NewMessage] = []
        failures = []
        for contact, address, attrs in todo:
            variant = abtest.variant_of(cid, contact, spec["variants"]) if testing else c["winner"]
            meta = json.dumps({"campaign": cid, "variant": variant}, separators=(",", ":"))
            queue_id = new_queue_id()
            if address in stopped:
                entry = stopped[address]
                suppressed = [(address, entry.scope, entry.reason, entry.bounce_class)]
                msg = NewMessage(queue_id, sender.email, [], b"", CLIENT, "", origin, False,
                                 meta=meta, suppressed=suppressed, stream=BULK)  # fmt: skip
            else:
                try:
                    msg = self._message(c, templates[variant], sender, origin, queue_id,
                                        address, attrs, meta, now)  # fmt: skip
                except Exception as exc:  # any error of one contact's rendering: not fatal
                    failures.append((contact, address, variant, queue_id, _why(exc)))
                    continue
            msg.campaign, msg.received_at = (cid, contact, variant), now
            msgs.append(msg)
        return msgs, failures, rows[-1][0], len(rows) == limit

    def _templates(self, c: dict[str, Any]) -> dict[str, templates.Compiled]:
        """The campaign's variants compiled once (they compiled when it was made)."""
        cid = c["id"]
        if cid not in self.compiled:
            self.compiled[cid] = {
                v["name"]: templates.compile_template(
                    v["kind"], v["subject"], v["from_name"], v["html"], v["text"], v["defaults"]
                )
                for v in c["spec"]["variants"]
            }
        return self.compiled[cid]

    def _message(
        self,
        c: dict[str, Any],
        template: templates.Compiled,
        sender: Address,
        origin: str,
        queue_id: str,
        address: str,
        attrs: dict[str, Any],
        meta: str,
        now: float,
    ) -> NewMessage:
        url = ""
        if self.links is not None:
            url = self.links.link(
                queue_id, address, self.links.scope_for(sender.email, origin), now
            )
        context = {"contact": templates.contact(address, attrs), "data": c["spec"]["data"],
                   "unsubscribe_url": url}  # fmt: skip
        out = template.render(context)
        name = out.from_name or sender.name
        build = compose.Builder(Address(sender.email, name), None, [], [], self.limits, CLIENT,
                                origin, BULK)  # fmt: skip
        tracking = c["spec"]["tracking"]  # the campaign's (its key's, when that has none)
        if self.tracker is not None:
            build.tracking(self.tracker, tracking["opens"], tracking["clicks"])
        rendered = {"subject": out.subject, "text": out.text or None, "html": out.html or None}
        to = [Address(address, "")]
        msg = build.message(sender.email, to, to, [], rendered, meta, 0.0, queue_id)
        if len(msg.body) > self.limits.max_message_size:
            raise ValueError(f"message of {len(msg.body)} bytes, over the size limit")
        return msg


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"
