"""The scheduler owns time: what is tried next, where, and when it is tried again.

Jobs (a message to its recipients at one domain) enter memory two ways: straight from ingress
when there is room, or loaded from the spool by next-attempt time. The number in memory is
bounded (``delivery.max_active``), so memory does not grow with the queue; never-tried mail is
loaded before retries, and retries may fill at most half of memory, so a deferred backlog cannot
starve new mail.

A job waiting in memory holds no message text (the spool has it): the connection that takes a
job reads the text then, whole when it is small, in pieces as it is sent when it is large, and
the bytes of text in flight are bounded (``Budget``). Only a fresh small message admitted
straight from intake keeps its text for its first attempt, within ``KEEP_TOTAL`` bytes.

Jobs are routed to sites (the set of MX hosts a domain resolves to; domains sharing MX hosts
share a site and its limits; domains whose MX hosts match a provider's patterns share the
provider's site). A site opens connections up to its limits, each from a source address picked
by weighted rotation, and each carries jobs until its message cap or idleness.

Adaptive shaping: a site's failure replies are matched against the shaping rules; a match holds
the source that got it at the site (suspended: no connection from it there, its open ones stop;
or slowed: a rate and a connection cap of its own there) until the hold ends or relayctl clears
it. Each hold is stored with its event. Mail that no source may send now goes back to the spool,
due when the first hold that stops it ends, rather than fill memory meanwhile.

IP warm-up (relayd.shaping.warmup): a source in warm-up sends each site's provider no more than
its schedule's volume of the day; when it is spent the rotation leaves the source out there
until the next UTC midnight (which ends that wait as a hold's end does).

Streams: each job is transactional or bulk, and transactional mail never waits behind bulk mail.
A site queues the two apart; a connection taking its next job takes a transactional one first;
bulk jobs may be on at most ``bulk_connections`` of the site's connections at once (the rest are
kept for transactional mail, which so finds a connection, or room to open one, at once); a
transactional job books its slot of the site's rate at once, while bulk jobs book theirs at most
``BULK_AHEAD`` at a time, so a transactional job waits for no more than that many bulk slots.
In memory, bulk jobs fill at most half of ``max_active``, and the loader takes transactional
mail from the spool first, so a bulk backlog in the spool cannot hold transactional mail there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from relayd.config import (
    PROVIDER_LANE,
    Delivery,
    Pools,
    Retry,
    Routes,
    Shaping,
    ShapingRules,
    Source,
    Suppression,
    WarmupSchedules,
)
from relayd.delivery.client import ConnectFailure, Connection, Unsendable
from relayd.delivery.dns import LookupFailure, Resolver, Route
from relayd.events.log import emit, log
from relayd.events.records import Event
from relayd.metrics.tally import Tally
from relayd.model.address import domain_of
from relayd.model.message import BULK, TRANSACTIONAL, Job, NewMessage, Recipient, Result
from relayd.model.status import Reply
from relayd.outcomes import commit, decide
from relayd.outcomes.classify import Classifier
from relayd.shaping import Gcra, Rotation, Throttle, ThrottleFactory
from relayd.shaping.adaptive import RATE, SUSPEND, SYSTEM, Hold, Holds, Rules
from relayd.shaping.warmup import Warmup, next_day, plans
from relayd.spool import holds, schema, store, warmup
from relayd.spool.writer import Writer

POLL_INTERVAL = 1.0  # seconds between spool scans when nothing pokes the loader
KEEP_BODY = 128 * 1024  # a fresh message this small keeps its text in memory for its first try
KEEP_TOTAL = 16 << 20  # ... while the texts so kept add up to no more than this
IN_FLIGHT = 32 << 20  # bytes of text that connections may hold at once (read, being written)
STREAM = 256 * 1024  # a text larger than this is streamed from the spool, not read whole
RETRY_FIRST, RETRY_MAX = 0.5, 30.0  # a failed spool operation is tried again, backing off
BULK_AHEAD = 4  # slots of one rate that bulk jobs may hold booked at once
LAPSE_POLL = 1.0  # seconds between looks for holds of adaptive shaping whose end has come
PROVIDER_CACHE = 10_000  # MX host sets whose provider is remembered
WARMUP_SAVE = 1.0  # seconds between two saves of the warm-up counts (lost on a crash: these)

Connect = Callable[..., Awaitable[Connection]]
# Whether a pool's source address may take new connections now (the blacklist watch keeps a
# listed one out, see relayd.reputation): (pool, address) -> bool.
SourceFilter = Callable[[str, str], bool]


def every_source(pool: str, address: str) -> bool:
    """The filter when nothing keeps a source out of its pool."""
    return True


@dataclass(frozen=True)
class Settings:
    """The config tables the scheduler works from; ``hostname`` (server.hostname) is the EHLO
    name where no source of a pool names its own."""

    hostname: str
    delivery: Delivery
    routes: Routes
    shaping: ShapingRules
    retry: Retry
    pools: Pools
    classifier: Classifier  # [bounces]: the class of each failed attempt's reply
    suppression: Suppression  # what a hard bounce adds to the suppression list
    warmup: WarmupSchedules = field(default_factory=dict)  # [warmup.schedules]


async def backoff(task: str, attempt: int, error: BaseException, **keys: Any) -> None:
    """After a failed spool operation: log which task and why, then wait before the next try
    (0.5 s doubling to 30 s). A loop that meets a locked or full disk slows down, never dies."""
    delay = min(RETRY_FIRST * 2**attempt, RETRY_MAX)
    log.error("spool_retry", task=task, error=repr(error), retry_in_s=delay, **keys)
    await asyncio.sleep(delay)


async def keep_running(
    task: str, step: Callable[[], Awaitable[None]], running: Callable[[], bool]
) -> None:
    """Run ``step`` over and over; a failure is logged and backed off from, never fatal."""
    failures = 0
    while running():
        try:
            await step()
            failures = 0
        except Exception as exc:
            await backoff(task, failures, exc)
            failures += 1


class Budget:
    """A semaphore over bytes, first come first served: bounds the text held in delivery."""

    def __init__(self, total: int) -> None:
        self.total = self.free = total
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, size: int) -> int:
        """Wait for ``size`` bytes (at most the whole budget); returns what to release."""
        size = min(size, self.total)
        if not self._waiters and self.free >= size:
            self.free -= size
            return size
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, fut)
        self._waiters.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(size)  # granted just as it was cancelled
            else:
                self._waiters.remove(entry)
                self._grant()
            raise
        return size

    def release(self, size: int) -> None:
        self.free += size
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.free:
            size, fut = self._waiters.popleft()
            self.free -= size
            fut.set_result(None)


@dataclass
class Site:
    key: str
    lane: str  # the domain whose [shaping.domains] table applies, or "" for the default
    route: Route
    queue: deque[Job] = field(default_factory=deque)  # transactional jobs, taken first
    bulk: deque[Job] = field(default_factory=deque)  # bulk jobs
    bulk_busy: int = 0  # connections carrying a bulk job now (at most bulk_connections)
    # per rate (the site's: "", a source's: its address): bulk bookings held (BULK_AHEAD)
    bulk_gates: dict[str, asyncio.Semaphore] = field(default_factory=dict)
    waiters: deque[asyncio.Future[Job | None]] = field(default_factory=deque)
    connections: int = 0
    starting: int = 0  # connections spawned that have not taken their first job yet
    open: int = 0  # connections established
    cooldown_until: float = 0.0  # after a failed connect: no more connections than are open
    per_source: Counter[str] = field(default_factory=Counter)
    limiter: Throttle | None = None
    source_limiters: dict[str, Throttle] = field(default_factory=dict)
    name: str = ""  # what adaptive shaping holds sources at: its provider, or its MX hosts
    provider: str = ""  # the provider of [shaping.providers] its MX hosts match, or ""


def provider_of(site: Site) -> str:
    """The provider a site's warm-up volumes are counted for: its [shaping.providers] name, or
    its MX hosts (as adaptive shaping names the site)."""
    return site.name


class Scheduler:
    def __init__(
        self,
        config: Settings,
        writer: Writer,
        resolver: Resolver,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        connect: Connect = Connection.open,
        monotonic: Callable[[], float] = time.monotonic,
        throttle: ThrottleFactory = Gcra,
        usable_source: SourceFilter = every_source,
    ) -> None:
        self.config = config
        self.usable_source = usable_source
        self.writer = writer
        self.resolver = resolver
        self.clock = clock  # wall time: what is due, lifetimes, what the spool records
        self.monotonic = monotonic  # intervals: rates, cooldowns
        self.rng = rng or random.Random()
        self.connect = connect
        self.throttle = throttle
        self.dsn: commit.DsnDoor | None = None  # intake's door, handed in by start()
        # MAIL FROM for (queue id, sender): the daemon sets relayd's return paths (VERP)
        self.return_path: Callable[[str, str], str] = lambda queue_id, sender: sender
        self.sites: dict[str, Site] = {}
        self.routing: dict[str, list[Job]] = {}  # domain -> jobs waiting for its route
        self.rotations = {name: Rotation(pool) for name, pool in config.pools.items()}
        self.active = 0  # jobs in memory
        # their recipients (waiting or on a connection): never two jobs for one (see _load);
        # by queue id and recipient id: SQLite reuses the rowid of a deleted last row, so a
        # recipient deleted while in flight may lend its id to the next message's (a DSN's)
        self.inside: set[tuple[str, int]] = set()
        self.active_retries = 0
        self.active_bulk = 0  # ... of the bulk stream: at most half of max_active
        self.kept = 0  # bytes of text kept by fresh jobs (KEEP_TOTAL)
        self.budget = Budget(IN_FLIGHT)
        self._reader: sqlite3.Connection | None = None  # texts are read here, opened on need
        self.tasks: set[asyncio.Task] = set()
        self.stopping = False
        self._poke = asyncio.Event()
        self._spool_has_due = True  # until a load comes back short: then only new work sets it
        self.held = Holds()  # adaptive shaping's holds in force
        self.rules = Rules(config.shaping.rules)
        self._holds_loaded = False
        self._providers: dict[str, str] = {}  # a route's site -> its provider ("": none)
        # the day's counts of the sources in warm-up: a source whose volume to a site's
        # provider is spent takes no more of its mail that day
        self.warmup = Warmup(plans(config.pools, config.warmup), clock)
        self._warmup_wake = asyncio.Event()
        self.tally = Tally()  # /metrics: attempts, durations, throttle waits (relayd.metrics)

    # -- entry points -------------------------------------------------------------------

    def reserve(self, jobs: int, stream: str = TRANSACTIONAL) -> bool:
        """Room in memory for a fresh message's jobs? Then ingress hands it over directly.
        Bulk mail may fill only half of memory: transactional mail always finds room."""
        bulk = jobs if stream == BULK else 0
        max_active = self.config.delivery.max_active
        if (
            self.stopping
            or self.active + jobs > max_active
            or self.active_bulk + bulk > max_active // 2
        ):
            return False
        self.active += jobs
        self.active_bulk += bulk
        return True

    def unreserve(self, jobs: int, stream: str = TRANSACTIONAL) -> None:
        self.active -= jobs
        self.active_bulk -= jobs if stream == BULK else 0

    def admit(self, msg: NewMessage) -> None:
        """A fresh message, durable and marked ACTIVE: route its jobs. A small text stays with
        them (no read back from the spool for the common case), within KEEP_TOTAL."""
        by_domain: dict[str, Job] = {}
        size = len(msg.body)
        keep = isinstance(msg.body, bytes) and size <= KEEP_BODY
        notify = msg.notify or [0] * len(msg.recipients)
        orcpt = msg.orcpt or [None] * len(msg.recipients)
        for rid, rcpt, flags, original in zip(msg.ids, msg.recipients, notify, orcpt, strict=True):
            domain = domain_of(rcpt)
            job = by_domain.get(domain)
            if job is None:
                job = by_domain[domain] = Job(
                    msg.msg_id,
                    msg.queue_id,
                    msg.sender,
                    domain,
                    msg.received_at,
                    msg.smtputf8,
                    None,
                    [],
                    size,
                    msg.envid,
                    msg.meta,
                    msg.stream,
                )
                if keep and self.kept + size <= KEEP_TOTAL:
                    job.body = msg.body  # type: ignore[assignment]  # bytes: checked above
                    self.kept += size
            job.recipients.append(Recipient(rid, rcpt, 0, flags, original))
        self.inside.update((msg.queue_id, rid) for rid in msg.ids)
        for job in by_domain.values():
            self._route(job)

    def poke(self) -> None:
        """Something due may be in the spool (new pending mail, a DSN, an operator's retry)."""
        self._spool_has_due = True
        self._poke.set()

    def start(self, dsn: commit.DsnDoor) -> None:
        """Begin loading; ``dsn`` is intake's door, through which the DSNs owed go."""
        self.dsn = dsn
        self.loader = self._spawn(self._loader())  # /readyz: the loader must be running
        self._spawn(self._lapse_loop())
        self._spawn(self._warmup_loop())

    async def stop(self, timeout: float) -> None:
        """Finish transactions in flight (up to ``timeout``), give the rest back to the spool."""
        self.stopping = True
        self._poke.set()
        self._warmup_wake.set()
        for site in self.sites.values():
            while site.waiters:
                waiter = site.waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
        queued = [job for queue in self._queues() for job in queue]
        for site in self.sites.values():
            site.queue.clear()
            site.bulk.clear()
        if queued:
            with contextlib.suppress(Exception):  # not given back: reset at the next start
                await self.writer.submit(functools.partial(store.release_jobs, jobs=queued))
        if self.tasks:
            _, pending = await asyncio.wait(self.tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        with contextlib.suppress(Exception):  # not saved: at most WARMUP_SAVE of counts lost
            await self._save_warmup()
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def reload(self, config: Settings) -> None:
        self.config = config
        self.rotations = {name: Rotation(pool) for name, pool in config.pools.items()}
        self.rules = Rules(config.shaping.rules)
        self._providers.clear()
        self.warmup.reload(plans(config.pools, config.warmup))
        for site in self.sites.values():
            site.limiter, site.source_limiters = None, {}
            self._configure(site)

    # -- routing ------------------------------------------------------------------------

    def _route(self, job: Job) -> None:
        port, routes = self.config.delivery.port, self.config.routes
        route = self.resolver.cached_route(job.domain, port, routes.for_domain(job.domain))
        if route is not None:
            self._enqueue(self._site(route, job.domain), job)
            return
        waiting = self.routing.get(job.domain)
        if waiting is not None:
            waiting.append(job)
            return
        self.routing[job.domain] = [job]
        self._spawn(self._resolve(job.domain))

    async def _resolve(self, domain: str) -> None:
        port, routes = self.config.delivery.port, self.config.routes
        try:
            route = await self.resolver.route(domain, port, routes.for_domain(domain))
        except LookupFailure as exc:
            for job in self.routing.pop(domain, []):
                replies = [(r.id, Reply(exc.code, exc.reply)) for r in job.recipients]
                self._finish(job, replies, mx="", source_ip="")
            return
        site = self._site(route, domain)
        for job in self.routing.pop(domain, []):
            self._enqueue(site, job)

    def _site(self, route: Route, domain: str) -> Site:
        """The site of ``domain``'s jobs: its provider or its MX hosts, and its lane there.
        Domains sharing MX hosts share the default limits there; domains whose MX hosts match
        a provider's patterns ([shaping.providers]) share the provider's one site and its
        limits, whatever their MX hosts. A connection goes to the MX hosts of the domain that
        routed last and carries any of the site's mail: a provider's hosts take mail for each
        of its domains. A domain with a table of its own under [shaping.domains] has its own
        lane, so its limits hold whatever else goes to the same hosts and whichever domain got
        there first."""
        provider = self._provider(route)
        if domain in self.config.shaping.domains:
            lane = domain
        else:
            lane = f"{PROVIDER_LANE}{provider}" if provider else ""
        name = provider or route.site
        key = f"{name}|{lane}"
        site = self.sites.get(key)
        if site is None:
            site = self.sites[key] = Site(key, lane, route, name=name, provider=provider)
            self._configure(site)
        site.route = route
        return site

    def _provider(self, route: Route) -> str:
        found = self._providers.get(route.site)
        if found is None:
            if len(self._providers) >= PROVIDER_CACHE:
                self._providers.clear()
            hosts = (h.host for tier in route.tiers for h in tier)
            found = self._providers[route.site] = self.config.shaping.provider_of(hosts)
        return found

    def _configure(self, site: Site) -> None:
        shaping = self.config.shaping.for_lane(site.lane)
        if shaping.max_rate:
            site.limiter = self.throttle(shaping.max_rate, self.monotonic)

    def _enqueue(self, site: Site, job: Job) -> None:
        (site.bulk if job.bulk else site.queue).append(job)
        self._kick(site)

    def _take(self, site: Site, shaping: Shaping, holding_bulk: bool = False) -> Job | None:
        """The job a connection of ``site`` takes next: transactional first; bulk while bulk
        jobs are on fewer than ``bulk_connections`` connections (``holding_bulk``: this
        connection is one of them already)."""
        if site.queue:
            return site.queue.popleft()
        if site.bulk and site.bulk_busy - holding_bulk < shaping.bulk_connections:
            site.bulk_busy += 1
            return site.bulk.popleft()
        return None

    def _kick(self, site: Site) -> None:
        """Hand queued jobs to idle connections, then open connections for the jobs left,
        within the site's and its sources' limits."""
        shaping = self.config.shaping.for_lane(site.lane)
        while site.waiters and (site.queue or site.bulk):
            waiter = site.waiters.popleft()
            if not waiter.done():
                job = self._take(site, shaping)
                if job is None:  # only bulk queued, and bulk holds its share: stay idle
                    site.waiters.appendleft(waiter)
                    break
                waiter.set_result(job)
        limit = shaping.max_connections
        if site.open and self.monotonic() < site.cooldown_until:
            limit = min(limit, site.open)
        bulk_room = max(0, shaping.bulk_connections - site.bulk_busy)
        while (
            not self.stopping
            and len(site.queue) + min(len(site.bulk), bulk_room) > site.starting
            and site.connections < limit
        ):
            source = self._pick_source(site, shaping)
            if source is False:
                self._postpone_if_held(site, shaping)
                return
            site.connections += 1
            site.starting += 1
            if source is not None:
                site.per_source[source.address] += 1
            self._spawn(self._connection(site, source))

    def _pick_source(self, site: Site, shaping: Shaping) -> Source | bool | None:
        """A source below its connection limit; None for the system's default; False: none."""
        rotation = self.rotations.get(shaping.pool)
        held = self.held
        if rotation is None:
            return False if held.blocks(site.name, None, site.connections) else None
        usable, provider = self.usable_source, provider_of(site)
        picked = rotation.pick(
            lambda s: (
                site.per_source[s.address] < shaping.max_connections_per_source
                and usable(shaping.pool, s.address)
                and not held.blocks(site.name, s.address, site.per_source[s.address])
                and self.warmup.allows(s.address, provider)
            )
        )
        return picked if picked is not None else False

    # -- connections --------------------------------------------------------------------

    async def _next_job(self, site: Site, shaping: Shaping) -> Job | None:
        job = self._take(site, shaping)
        if job is not None:
            return job
        if self.stopping:
            return None
        waiter: asyncio.Future[Job | None] = asyncio.get_running_loop().create_future()
        site.waiters.append(waiter)
        try:
            return await asyncio.wait_for(waiter, self.config.delivery.idle_connection_time)
        except TimeoutError:
            return None

    async def _connection(self, site: Site, source: Source | None) -> None:
        shaping = self.config.shaping.for_lane(site.lane)
        hostname, cfg = self.config.hostname, self.config.delivery
        conn: Connection | None = None
        first = True
        # the job whose envelope went out with the last text (Connection.send's ``then``):
        # it is sent next, whatever else happened
        ahead: list[Job] = []
        try:
            for left in range(shaping.max_messages_per_connection - 1, -1, -1):
                went_ahead = bool(ahead)
                if went_ahead:
                    job = ahead.pop()
                else:
                    if self.held.find(site.name, source.address if source else None, SUSPEND):
                        break  # adaptive shaping suspended the source: it sends no more there
                    job = await self._next_job(site, shaping)
                if first:
                    site.starting -= 1
                    first = False
                if job is None:
                    break
                try:
                    if conn is None:
                        try:
                            conn = await self.connect(
                                site.route.hosts(),
                                self.resolver,
                                source.address if source else None,
                                source.ehlo if source else hostname,
                                cfg.starttls == "may",
                                cfg.connect_timeout,
                                cfg.command_timeout,
                            )
                        except ConnectFailure as exc:
                            self._connect_failed(site, job, exc, source)
                            break
                        site.open += 1
                    if not went_ahead:  # else counted and throttled as its envelope went out
                        if source is not None and not self._count_warmup(site, source, job):
                            (site.bulk if job.bulk else site.queue).appendleft(job)
                            break  # the source's volume is spent: another source takes the job
                        await self._throttle(site, shaping, source, job.bulk)
                    then = functools.partial(self._ahead, site, shaping, source, conn, job, ahead)
                    started = self.monotonic()
                    pairs = await self._send(conn, job, then if left else None)
                    self.tally.attempt(site.name, pairs, self.monotonic() - started)
                    self._finish(job, pairs, conn.mx, conn.source_ip)
                    self._adapt(site, source, conn.source_ip, pairs)
                    if conn.broken and not ahead:
                        break
                finally:
                    site.bulk_busy -= job.bulk
        finally:
            if first:
                site.starting -= 1
            if conn is not None:
                site.open -= 1
                await conn.close()
            site.connections -= 1
            if source is not None:
                site.per_source[source.address] -= 1
            self._kick(site)
            self._forget_if_idle(site)

    def _ahead(
        self,
        site: Site,
        shaping: Shaping,
        source: Source | None,
        conn: Connection,
        current: Job,
        ahead: list[Job],
    ) -> tuple[Job, list[bytes]] | None:
        """The next job for this connection and its envelope, to go out with the current
        job's text, when one can start at once: queued with its text in memory, under no rate
        (a throttle would have to wait), its source neither suspended nor out of warm-up
        volume. Taken from the site's queue and put in ``ahead``: the connection sends it next."""
        address = source.address if source is not None else None
        if (
            site.limiter is not None
            or (source is not None and shaping.max_rate_per_source)
            or self.held.find(site.name, address, SUSPEND)
            or self.held.find(site.name, address, RATE)
        ):
            return None
        job = self._take(site, shaping, holding_bulk=current.bulk)
        if job is None:
            return None
        if job.body is None and job.size <= STREAM:  # as _send would read it, a little earlier
            job.body = store.text_of(self._spool_reader(), job.msg_id)
            self.kept += len(job.body or b"")
        if job.body is not None:
            try:
                mail_from = self.return_path(job.queue_id, job.sender)
                commands = conn.envelope(job, job.body, mail_from)
            except Unsendable:
                commands = []  # sent the usual way, which answers it
            if commands and (source is None or self._count_warmup(site, source, job)):
                self.held.sent(site.name, address or SYSTEM, self.monotonic())
                ahead.append(job)
                return job, commands
        if job.bulk:
            site.bulk_busy -= 1
        (site.bulk if job.bulk else site.queue).appendleft(job)
        return None

    async def _send(
        self,
        conn: Connection,
        job: Job,
        then: Callable[[], tuple[Job, list[bytes]] | None] | None = None,
    ) -> list[tuple[int, Reply]]:
        """Send ``job`` with its text, held only for the transaction: the job's own (a fresh
        small message), read whole from the spool, or streamed from it in pieces. What the
        text costs in memory (it and its dot-stuffed copy, or two pieces) is taken from the
        budget first, so that many connections cannot hold many large texts at once."""
        text, job.body = job.body, None
        if text is not None:
            self.kept -= len(text)
        streamed = text is None and job.size > STREAM
        charge = await self.budget.acquire(2 * (STREAM if streamed else job.size))
        blob = None
        try:
            if text is None:
                reader = self._spool_reader()
                if streamed:
                    text = blob = store.open_body(reader, job.msg_id)
                else:
                    text = store.text_of(reader, job.msg_id)
            if text is None:  # the message left the spool (relayctl delete): nothing to send
                gone = Reply(421, "4.3.0 message no longer in the spool")
                return [(r.id, gone) for r in job.recipients]
            return await conn.send(job, text, self.return_path(job.queue_id, job.sender), then)
        finally:
            if blob is not None:
                blob.close()
            self.budget.release(charge)

    def _spool_reader(self) -> sqlite3.Connection:
        if self._reader is None:
            self._reader = schema.reader(self.writer.path)
        return self._reader

    def _forget_if_idle(self, site: Site) -> None:
        """Drop a site with no work and no rate debt, so memory follows the active sites only."""
        limiters = [site.limiter, *site.source_limiters.values()]
        if (
            site.connections == 0
            and not site.queue
            and not site.bulk
            and all(lim is None or lim.idle() for lim in limiters)
            and self.sites.get(site.key) is site
        ):
            del self.sites[site.key]

    async def _throttle(
        self, site: Site, shaping: Shaping, source: Source | None, bulk: bool
    ) -> None:
        """Wait for a slot of the site's rate and of the source's. A transactional job books
        its slots at once; a bulk job waits until fewer than BULK_AHEAD bulk bookings of that
        rate are outstanding, so transactional jobs overtake all but those few."""
        rates: list[tuple[str, Throttle]] = [("", site.limiter)] if site.limiter else []
        if source is not None and shaping.max_rate_per_source:
            limiter = site.source_limiters.get(source.address)
            if limiter is None:
                limiter = site.source_limiters[source.address] = self.throttle(
                    shaping.max_rate_per_source, self.monotonic
                )
            rates.append((source.address, limiter))
        address = source.address if source is not None else None
        rated = self.held.find(site.name, address, RATE)
        if rated is not None and rated.rate is not None:  # adaptive shaping slowed the source
            if rated.limiter is None:
                rated.limiter = self.throttle(rated.rate, self.monotonic)
            rates.append((f"hold:{rated.source_ip}", rated.limiter))
        self.held.sent(site.name, address or SYSTEM, self.monotonic())
        if not bulk:
            wait = max((limiter.reserve() for _, limiter in rates), default=0.0)
            if wait > 0:
                self.tally.waited(site.name, address)
                await asyncio.sleep(wait)
            return
        for name, limiter in rates:
            gate = site.bulk_gates.get(name)
            if gate is None:
                gate = site.bulk_gates[name] = asyncio.Semaphore(BULK_AHEAD)
            async with gate:
                wait = limiter.reserve()
                if wait > 0:
                    self.tally.waited(site.name, address)
                    await asyncio.sleep(wait)

    def _connect_failed(
        self, site: Site, job: Job, exc: ConnectFailure, source: Source | None
    ) -> None:
        """No host of the site took a new connection. While other connections to it work, the
        site is only full: the job goes back to them, and no new connection is tried for a
        second. With none open the site is down: defer this job and those queued behind it, as
        Postfix does for a dead destination, rather than paying a connect timeout for each.
        The refusal's reply (to the greeting, EHLO) is matched by adaptive shaping once."""
        self._adapt(site, source, "", [(0, Reply(exc.code, exc.reply))])
        if site.open > 0:
            (site.bulk if job.bulk else site.queue).appendleft(job)
            site.cooldown_until = self.monotonic() + 1.0
            log.info(
                "connect_failed",
                domain=job.domain,
                site=site.key,
                mx=exc.mx,
                code=exc.code,
                response=exc.reply,
                open_connections=site.open,
            )
            return
        jobs = [job, *site.queue, *site.bulk]
        site.queue.clear()
        site.bulk.clear()
        for j in jobs:
            replies = [(r.id, Reply(exc.code, exc.reply)) for r in j.recipients]
            self.tally.failed(site.name, replies)
            self._finish(
                j,
                replies,
                exc.mx,
                source.address if source else "",
            )

    # -- results ------------------------------------------------------------------------

    def _finish(self, job: Job, replies: list[tuple[int, Reply]], mx: str, source_ip: str) -> None:
        """The job leaves memory; its outcomes go to the spool in one transaction."""
        if job.body is not None:  # never sent (connect or lookup failure): the text goes too
            self.kept -= len(job.body)
            job.body = None
        now = self.clock()
        results, events = decide.decide(
            job, replies, mx, source_ip, now, self.config.retry, self.config.classifier, self.rng
        )
        self.active -= 1
        self.active_retries -= job.is_retry
        self.active_bulk -= job.bulk
        if self._spool_has_due:
            self._poke.set()  # room freed: load more now rather than at the next poll
        self._commit(job, results, events, now, 0)

    def _commit(
        self, job: Job, results: list[Result], events: list, now: float, tries: int
    ) -> None:
        assert self.dsn is not None
        config = self.config
        suppress = functools.partial(
            decide.hard_bounces, events, config.classifier, config.suppression, now=now
        )
        op = commit.attempt(
            job.msg_id, results, events, now, config.retry.delay_warning, self.dsn, suppress
        )
        fut = self.writer.submit(op)
        fut.add_done_callback(functools.partial(self._committed, job, results, events, now, tries))

    def _committed(
        self,
        job: Job,
        results: list[Result],
        events: list,
        now: float,
        tries: int,
        fut: asyncio.Future[commit.Committed],
    ) -> None:
        if fut.cancelled():
            return
        error = fut.exception()
        if error is not None:  # kept in memory and tried again: never left ACTIVE for good
            retry = functools.partial(self._commit, job, results, events, now, tries + 1)
            self._spawn(self._retry_later("record", tries, error, retry, job.queue_id))
            return
        # inside until now: a recipient held and released during the attempt is due in the
        # spool, and a look of the loader committed before this result must not send it again
        self.inside.difference_update((job.queue_id, r.id) for r in job.recipients)
        done = fut.result()
        emit(done.events)
        if done.dsns:
            self.poke()

    async def _retry_later(
        self, task: str, tries: int, error: BaseException, again: Callable[[], None], queue_id: str
    ) -> None:
        await backoff(task, tries, error, queue_id=queue_id)
        again()

    def settle(self, msg_ids: list[int]) -> asyncio.Future[commit.Committed]:
        """Queue the DSNs these messages owe (an attempt did not: see commit.settle_op)."""
        assert self.dsn is not None
        op = commit.settle_op(msg_ids, self.clock(), self.config.retry.delay_warning, self.dsn)
        return self.writer.submit(op)

    # -- adaptive shaping ---------------------------------------------------------------

    def _adapt(
        self, site: Site, source: Source | None, local_ip: str, replies: list[tuple[int, Reply]]
    ) -> None:
        """Match a site's failure replies against the rules of adaptive shaping; a match holds
        the source that got it (a new hold is stored with its event, a renewed one updated)."""
        shaping = self.config.shaping
        if not (self.rules and shaping.adaptive):
            return
        seen: set[Reply] = set()
        for _, reply in replies:
            if reply.code < 400 or reply in seen:
                continue
            seen.add(reply)
            rule = self.rules.match(site.provider, reply.code, reply.text)
            if rule is None:
                continue
            limits = shaping.for_lane(site.lane)
            metered = source.address if source is not None else SYSTEM
            base = (limits.max_rate_per_source if source is not None else None) or limits.max_rate
            base = base or self.held.sent_rate(site.name, metered, self.monotonic())
            held_as = source.address if source is not None else (local_ip or SYSTEM)
            now = self.clock()
            change = self.held.apply(rule, site.name, held_as, reply.code, reply.text, now, base)
            if change is None:
                continue
            hold, new = change
            if new:
                self._spawn(self._open_hold(hold))
            elif hold.id:
                renew = functools.partial(holds.renew, hold_id=hold.id, until=hold.until)
                self._spawn(self._store("shaping", renew))

    async def _open_hold(self, hold: Hold) -> None:
        event = await self._store("shaping", functools.partial(holds.open_hold, hold=hold))
        hold.id = event.data["hold"]
        emit([event])

    async def _store(self, task: str, op: Callable[[sqlite3.Connection], Any]) -> Any:
        """One spool operation of adaptive shaping, tried until it is stored."""
        failures = 0
        while True:
            try:
                return await self.writer.submit(op)
            except Exception as exc:
                await backoff(task, failures, exc)
                failures += 1

    async def load_holds(self) -> None:
        """The holds an earlier run stored: in force before the first connection."""
        if not self._holds_loaded:
            for hold in await self.writer.submit(holds.active):
                self.held.add(hold)
            self._holds_loaded = True

    async def _lapse_loop(self) -> None:
        await keep_running("shaping", self._lapse, lambda: not self.stopping)

    async def _lapse(self) -> None:
        """End the holds whose end has come (their events), and let their sites go on."""
        await self.load_holds()
        now = self.clock()
        ended = self.held.lapse(now, self.monotonic())
        stored = [h.id for h in ended if h.id]
        if stored:
            end = functools.partial(holds.end, ids=stored, now=now, how=holds.LAPSED)
            emit(await self._store("shaping", end))
        self._kick_sites({h.site for h in ended})
        await asyncio.sleep(LAPSE_POLL)

    def clear_holds(self, events: list[Event]) -> None:
        """Operator events (relayd.queue.control): relayctl shaping clear ended these holds
        in the spool (and made the mail they postponed due); they end here too."""
        for event in events:
            if event.data.get("action") == holds.CLEAR:
                gone = self.held.remove(event.data.get("holds") or ())
                self._kick_sites({h.site for h in gone})

    def _kick_sites(self, names: set[str]) -> None:
        if names:
            for site in [s for s in self.sites.values() if s.name in names]:
                self._kick(site)

    def _postpone_if_held(self, site: Site, shaping: Shaping) -> None:
        """No source may open a connection to the site, and none is open: when suspensions
        or spent warm-up volumes are why (every source the site may use is suspended there or
        has sent its provider the day's volume), its queued mail goes back to the spool, due
        when the first of them ends (a hold's end, the next UTC midnight), rather than
        filling memory meanwhile."""
        if site.connections or not (site.queue or site.bulk):
            return
        rotation = self.rotations.get(shaping.pool)
        spent, provider = next_day(self.clock()), provider_of(site)
        suspended: list[Hold] = []
        ends: list[float] = []
        warming: list[str] = []  # sources whose volume to the provider is spent today
        if rotation is None:
            found = self.held.find(site.name, None, SUSPEND)
            if found is None:
                return
            suspended, ends = [found], [found.until]
        for s in rotation.sources if rotation is not None else ():
            if not self.usable_source(shaping.pool, s.address):
                continue
            found = self.held.find(site.name, s.address, SUSPEND)
            if found is not None:
                suspended.append(found)
                ends.append(found.until)
            elif self.warmup.spent(s.address, provider):
                warming.append(s.address)
                ends.append(spent)
            else:
                return  # a source free to send: only connection limits keep it back
        if not ends:
            return
        until = min(ends)
        jobs = [*site.queue, *site.bulk]
        site.queue.clear()
        site.bulk.clear()
        for job in jobs:
            self.active -= 1
            self.active_retries -= job.is_retry
            self.active_bulk -= job.bulk
            self.inside.difference_update((job.queue_id, r.id) for r in job.recipients)
            if job.body is not None:
                self.kept -= len(job.body)
                job.body = None
        domains = sorted({job.domain for job in jobs})
        op = functools.partial(
            holds.postpone,
            rcpt_ids=[r.id for job in jobs for r in job.recipients],
            until=until,
            hold_ids=[h.id for h in suspended if h.id],
            domains=domains,
        )
        self._spawn(self._store("postpone", op))
        log.info(
            "shaping_postponed",
            site=site.name,
            domains=domains,
            messages=len(jobs),
            until=holds.iso(until),
            warmup_spent=warming,
        )

    # -- warm-up --------------------------------------------------------------------------

    def _count_warmup(self, site: Site, source: Source, job: Job) -> bool:
        """As ``job``'s transaction starts: its recipients count for ``source``'s day at the
        site's provider; False (nothing counted) when that day's volume is spent."""
        provider = provider_of(site)
        if not self.warmup.take(source.address, provider, len(job.recipients)):
            return False
        if self.warmup.spent(source.address, provider):
            log.info(
                "warmup_quota_reached",
                source_ip=source.address,
                provider=provider,
                domain=job.domain,
                sent=self.warmup.sent[(source.address, provider)],
                allowed=self.warmup.allowed(source.address, provider),
            )
        return True

    async def _warmup_loop(self) -> None:
        """Load the day's warm-up counts (until then no source in warm-up sends: a restart
        must not begin its day again), then save what changed every WARMUP_SAVE seconds."""
        await keep_running("warmup", self._warmup_step, lambda: not self.stopping)

    async def _warmup_step(self) -> None:
        if not self.warmup.loaded:
            day, seen = self.warmup.today(), self.warmup.unrecorded()
            load = functools.partial(warmup.load, day=day, seen=seen)
            stored = await self.writer.submit(load)
            self.warmup.load(day, stored.counts, stored.first_seen, stored.reported)
            for site in list(self.sites.values()):
                self._kick(site)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._warmup_wake.wait(), WARMUP_SAVE)
        if not self.stopping:
            await self._save_warmup()

    async def _save_warmup(self) -> None:
        """Write the counts changed, the addresses newly in warm-up and a ``warmed`` event for
        each source that came past its last day; nothing when there is none of these."""
        state = self.warmup
        if not state.loaded:
            return
        day, seen, counts = state.today(), state.unrecorded(), state.changes()
        finished = [
            (
                plan.address,
                plan.warm_key(start),
                {
                    "source_ip": plan.address,
                    "schedule": plan.schedule,
                    "warmup_start": start.isoformat(),
                    "days": plan.length,
                },
            )
            for plan, start in state.finished()
        ]
        if not (seen or counts or finished):
            return
        save = functools.partial(
            warmup.save, day=day, seen=seen, counts=counts, finished=finished, now=self.clock()
        )
        try:
            stored = await self.writer.submit(save)
        except BaseException:
            state.unsaved(day, counts)
            raise
        state.saved(stored.first_seen, stored.reported)
        emit(stored.events)

    # -- background loops ---------------------------------------------------------------

    async def _loader(self) -> None:
        """Bring due recipients from the spool into memory while there is room."""
        await keep_running("loader", self._poll, lambda: not self.stopping)

    async def _poll(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._poke.wait(), POLL_INTERVAL)
        self._poke.clear()
        self._spool_has_due = True  # each poll looks once for retries that came due
        try:
            await self._load()
        except Exception:
            self._poke.set()  # look again straight after the backoff
            raise

    async def _load(self) -> None:
        while not self.stopping:
            max_active = self.config.delivery.max_active
            room = max_active - self.active
            retry_room = min(room, max_active // 2 - self.active_retries)
            bulk_room = min(room, max_active // 2 - self.active_bulk)
            if room <= 0:
                break
            load = functools.partial(
                store.load_due,
                now=self.clock(),
                limit=room,
                retry_limit=retry_room,
                bulk_limit=bulk_room,
            )
            jobs, self._spool_has_due = await self.writer.submit(load)
            for job in jobs:
                # a recipient held while in memory and released before Control dropped it
                # is due in the spool again, and still in memory: it goes out once, from there
                job.recipients = [
                    r for r in job.recipients if (job.queue_id, r.id) not in self.inside
                ]
                if not job.recipients:
                    continue
                self.inside.update((job.queue_id, r.id) for r in job.recipients)
                self.active += 1
                self.active_retries += job.is_retry
                self.active_bulk += job.bulk
                self._route(job)
            if not self._spool_has_due or not jobs:
                break

    def _queues(self) -> list[deque[Job] | list[Job]]:
        """Where jobs wait in memory: each site's two queues, and the routing lists."""
        sites = [q for site in self.sites.values() for q in (site.queue, site.bulk)]
        return [*sites, *self.routing.values()]

    def waiting(self) -> list[Job]:
        """The jobs waiting in memory (not those on a connection now)."""
        return [job for queue in self._queues() for job in queue]

    def drop(self, looked: list[Job], active: set[int]) -> None:
        """Keep, of the jobs ``looked`` at that still wait in memory, only the recipients
        still ACTIVE in the spool (relayctl moved the others out); a job left with none
        leaves memory. Jobs that came into memory after the look (while the spool was asked,
        say a resumed campaign's next batch) are left alone: they came after the change, and
        their recipients, missing from ``active`` yet ACTIVE, would be stranded so."""
        seen = {id(job) for job in looked}  # ``looked`` keeps them alive: no id is reused
        for queue in self._queues():
            kept = []
            for job in queue:
                if id(job) not in seen:
                    kept.append(job)
                    continue
                retry = job.is_retry
                gone = (r.id for r in job.recipients if r.id not in active)
                self.inside.difference_update((job.queue_id, rid) for rid in gone)
                job.recipients = [r for r in job.recipients if r.id in active]
                if not job.recipients:
                    self.active -= 1
                    self.active_retries -= retry
                    self.active_bulk -= job.bulk
                    if job.body is not None:
                        self.kept -= len(job.body)
                    continue
                kept.append(job)
            queue.clear()
            queue.extend(kept)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task_failed", error=repr(task.exception()))
