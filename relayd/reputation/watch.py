"""The rounds of blacklist lookups, in the queue process.

Every ``reputation.interval`` (and at start, after a reload that changes what is watched, and
when relayctl asks) each source address of the pools is looked up on each zone. A round's
answers go to the spool in one transaction with the ``blacklisted`` and ``delisted`` events they
cause (``relayd.spool.listings``). With ``on_listing = "remove"`` a listed address takes no new
connections until it is delisted (``usable``, the scheduler's source filter), except that a pool
is never emptied: when every source of a pool is listed, all of them stay in use, and the log
says so at each round.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Iterable

from relayd.config import Pools, Reputation
from relayd.delivery.dns import Resolver
from relayd.events.log import emit, log
from relayd.events.records import Event
from relayd.queue.scheduler import keep_running
from relayd.reputation.lookup import lookup
from relayd.reputation.pools import addresses, exclusions
from relayd.spool import listings
from relayd.spool.listings import ERROR, LISTED, Check, Recorded
from relayd.spool.writer import Writer

CONCURRENCY = 8  # lookups in flight at once


class Watch:
    def __init__(
        self,
        settings: Reputation,
        pools: Pools,
        writer: Writer,
        resolver: Callable[[], Resolver],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings, self.pools, self.writer, self.clock = settings, pools, writer, clock
        self.resolver = resolver  # a new one each round: a cached answer would hide a change
        self.listed: set[tuple[str, str]] | None = None  # (ip, zone) listed; None: not read
        self.excluded: dict[str, frozenset[str]] = {}  # pool -> its sources left out
        self.asked: set[str] = set()  # addresses relayctl asked to check now
        self.next_round = 0.0  # the first round at start
        self._wake = asyncio.Event()

    def usable(self, pool: str, address: str) -> bool:
        """The scheduler's source filter."""
        return address not in self.excluded.get(pool, ())

    # -- driving ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Rounds until cancelled; a failing spool is backed off from, never fatal."""
        await keep_running("reputation", self._tick, lambda: True)

    async def _tick(self) -> None:
        await self.step()
        delay = max(self.next_round - self.clock(), 0.0) if self.settings.active else None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)
        self._wake.clear()

    async def load(self) -> None:
        """The listings an earlier run found: they apply before the first round."""
        self.listed = await self.writer.submit(listings.listed)
        self._apply()

    async def step(self) -> Recorded | None:
        """The round that is due or asked for, if one is; what it recorded."""
        if self.listed is None:
            await self.load()
        if not self.settings.active:
            return None
        sources = addresses(self.pools)
        now = self.clock()
        due = now >= self.next_round
        targets = sorted(sources) if due else sorted(self.asked & set(sources))
        self.asked.clear()  # what was asked and is no longer a source is dropped too
        if due:
            self.next_round = now + self.settings.interval
        if not targets:
            return None
        try:
            return await self.check(targets, sources)
        except BaseException:
            self.asked.update(targets)  # a failed round is tried again after the backoff
            raise

    def request(self, events: Iterable[Event]) -> None:
        """Operator events (relayd.queue.control): ``relayctl ip check`` asks for a round of
        the addresses it names (all when none) now."""
        for event in events:
            if event.data.get("action") == listings.CHECK:
                self.asked.update(event.data.get("ips") or addresses(self.pools))
                self._wake.set()

    def reload(self, settings: Reputation, pools: Pools) -> None:
        watched = (set(addresses(self.pools)), self.settings.zones, self.settings.active)
        self.settings, self.pools = settings, pools
        if (set(addresses(self.pools)), settings.zones, settings.active) != watched:
            self.next_round = 0.0  # what is watched changed: look now
        self.next_round = min(self.next_round, self.clock() + settings.interval)
        self._apply()
        self._wake.set()

    # -- a round ----------------------------------------------------------------------------

    async def check(self, ips: list[str], sources: dict[str, list[str]]) -> Recorded:
        """Look up ``ips`` on every zone, record the answers, apply the listings."""
        resolver, limit = self.resolver(), asyncio.Semaphore(CONCURRENCY)

        async def ask(ip: str, zone: str) -> Check:
            async with limit:
                return await lookup(resolver, ip, zone)

        zones = self.settings.zones
        checks = await asyncio.gather(*(ask(ip, zone) for ip in ips for zone in zones))
        action = self.settings.on_listing
        context = {ip: {"pools": sources.get(ip, []), "on_listing": action} for ip in ips}
        record = functools.partial(
            listings.record, checks=checks, now=self.clock(), context=context
        )
        done = await self.writer.submit(record)
        emit(done.events)
        for c in checks:
            if c.status == ERROR:
                log.warning(
                    "blacklist_error",
                    source_ip=c.ip,
                    zone=c.zone,
                    error=c.reason,
                    errors=done.errors[(c.ip, c.zone)],
                )
        self.listed = done.listed
        self._apply()
        log.info(
            "blacklist_checked",
            sources=len(ips),
            zones=len(zones),
            listed=sum(c.status == LISTED for c in checks),
            errors=len(done.errors),
        )
        return done

    def _apply(self) -> None:
        """Which sources the scheduler leaves out, from the listings on the watched zones."""
        listed = {ip for ip, zone in self.listed or () if zone in self.settings.zones}
        remove = self.settings.active and self.settings.on_listing == "remove"
        excluded, full = exclusions(self.pools, listed) if remove else ({}, {})
        for pool in sorted(set(excluded) | set(self.excluded)):
            if excluded.get(pool, frozenset()) != self.excluded.get(pool, frozenset()):
                log.info("pool_sources", pool=pool, left_out=sorted(excluded.get(pool, ())))
        for pool, own in full.items():
            log.warning(
                "pool_all_listed",
                pool=pool,
                sources=own,
                detail="every source of the pool is listed: all stay in use",
            )
        self.excluded = excluded
