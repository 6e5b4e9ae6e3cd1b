"""The scheduler owns time: what is tried next, where, and when it is tried again.

Jobs (a message to its recipients at one domain) enter memory two ways: straight from ingress
when there is room, or loaded from the spool by next-attempt time. The number in memory is
bounded (``delivery.max_active``), so memory does not grow with the queue; never-tried mail is
loaded before retries, and retries may fill at most half of memory, so a deferred backlog cannot
starve new mail.

Jobs are routed to sites (the set of MX hosts a domain resolves to; domains sharing MX hosts
share a site and its limits). A site opens connections up to its limits, each from a source
address picked by weighted rotation, and each carries jobs until its message cap or idleness.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from relayd import bounce, spool
from relayd.config import Config, Retry, Shaping, Source
from relayd.delivery import ConnectFailure, Connection, Outcome
from relayd.dns import LookupFailure, Resolver, Route
from relayd.events import log
from relayd.shaping import Gcra, Rotation
from relayd.spool import Job, NewMessage, Result, State

POLL_INTERVAL = 1.0  # seconds between spool scans when nothing pokes the loader


def retry_delay(attempts: int, retry: Retry, rng: random.Random) -> float:
    """Backoff after the ``attempts``-th failed attempt: first, doubling, capped, jittered."""
    base = min(retry.first * retry.multiplier ** max(attempts - 1, 0), retry.max_interval)
    return base * (1 + rng.uniform(-retry.jitter, retry.jitter))


@dataclass
class Site:
    key: str
    domain: str  # the first domain routed here: its shaping applies to the whole site
    route: Route
    queue: deque[Job] = field(default_factory=deque)
    waiters: deque[asyncio.Future[Job | None]] = field(default_factory=deque)
    connections: int = 0
    starting: int = 0  # connections spawned that have not taken their first job yet
    open: int = 0  # connections established
    cooldown_until: float = 0.0  # after a failed connect: no more connections than are open
    per_source: Counter[str] = field(default_factory=Counter)
    limiter: Gcra | None = None
    source_limiters: dict[str, Gcra] = field(default_factory=dict)


class Scheduler:
    def __init__(
        self,
        config: Config,
        writer: spool.Writer,
        resolver: Resolver,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.writer = writer
        self.resolver = resolver
        self.clock = clock
        self.rng = rng or random.Random()
        self.sites: dict[str, Site] = {}
        self.routing: dict[str, list[Job]] = {}  # domain -> jobs waiting for its route
        self.rotations = {name: Rotation(pool) for name, pool in config.pools.items()}
        self.active = 0  # jobs in memory
        self.active_retries = 0
        self.tasks: set[asyncio.Task] = set()
        self.stopping = False
        self._poke = asyncio.Event()
        self._spool_has_due = True  # until a load comes back short: then only new work sets it
        self._control_id = 0

    # -- entry points -------------------------------------------------------------------

    def reserve(self, jobs: int) -> bool:
        """Room in memory for a fresh message's jobs? Then ingress hands it over directly."""
        if self.stopping or self.active + jobs > self.config.max_active:
            return False
        self.active += jobs
        return True

    def unreserve(self, jobs: int) -> None:
        self.active -= jobs

    def admit(self, msg: NewMessage) -> None:
        """A fresh message, durable and marked ACTIVE: route its jobs."""
        by_domain: dict[str, Job] = {}
        for rid, rcpt in zip(msg.ids, msg.recipients, strict=True):
            domain = spool.domain_of(rcpt)
            job = by_domain.get(domain)
            if job is None:
                job = by_domain[domain] = Job(
                    msg.msg_id,
                    msg.queue_id,
                    msg.sender,
                    domain,
                    msg.received_at,
                    msg.smtputf8,
                    msg.body,
                    [],
                )
            job.recipients.append(spool.Recipient(rid, rcpt, 0))
        for job in by_domain.values():
            self._route(job)

    def poke(self) -> None:
        """Something due may be in the spool (new pending mail, a DSN, an operator's retry)."""
        self._spool_has_due = True
        self._poke.set()

    def start(self) -> None:
        self._spawn(self._loader())
        self._spawn(self._control())

    async def stop(self, timeout: float) -> None:
        """Finish transactions in flight (up to ``timeout``), give the rest back to the spool."""
        self.stopping = True
        self._poke.set()
        for site in self.sites.values():
            while site.waiters:
                waiter = site.waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
        queued = [job for site in self.sites.values() for job in site.queue]
        queued += [job for jobs in self.routing.values() for job in jobs]
        for site in self.sites.values():
            site.queue.clear()
        if queued:
            await self.writer.submit(spool.release_jobs(queued))
        if self.tasks:
            _, pending = await asyncio.wait(self.tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)

    def reload(self, config: Config) -> None:
        self.config = config
        self.rotations = {name: Rotation(pool) for name, pool in config.pools.items()}
        for site in self.sites.values():
            site.limiter, site.source_limiters = None, {}
            self._configure(site)

    # -- routing ------------------------------------------------------------------------

    def _route(self, job: Job) -> None:
        cfg = self.config
        route = self.resolver.cached_route(job.domain, cfg.delivery_port, cfg.route_for(job.domain))
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
        cfg = self.config
        try:
            route = await self.resolver.route(domain, cfg.delivery_port, cfg.route_for(domain))
        except LookupFailure as exc:
            for job in self.routing.pop(domain, []):
                outcomes = [(r.id, Outcome(exc.code, exc.reply)) for r in job.recipients]
                self._finish(job, outcomes, mx="", source_ip="")
            return
        site = self._site(route, domain)
        for job in self.routing.pop(domain, []):
            self._enqueue(site, job)

    def _site(self, route: Route, domain: str) -> Site:
        site = self.sites.get(route.site)
        if site is None:
            site = self.sites[route.site] = Site(route.site, domain, route)
            self._configure(site)
        site.route = route
        return site

    def _configure(self, site: Site) -> None:
        shaping = self.config.shaping_for(site.domain)
        if shaping.max_rate:
            site.limiter = Gcra(shaping.max_rate, time.monotonic)

    def _shaping(self, site: Site) -> Shaping:
        return self.config.shaping_for(site.domain)

    def _enqueue(self, site: Site, job: Job) -> None:
        while site.waiters:
            waiter = site.waiters.popleft()
            if not waiter.done():
                waiter.set_result(job)
                return
        site.queue.append(job)
        self._kick(site)

    def _kick(self, site: Site) -> None:
        """Open connections for queued jobs, within the site's and its sources' limits."""
        shaping = self._shaping(site)
        limit = shaping.max_connections
        if site.open and time.monotonic() < site.cooldown_until:
            limit = min(limit, site.open)
        while not self.stopping and len(site.queue) > site.starting and site.connections < limit:
            source = self._pick_source(site, shaping)
            if source is False:
                return
            site.connections += 1
            site.starting += 1
            if source is not None:
                site.per_source[source.address] += 1
            self._spawn(self._connection(site, source))

    def _pick_source(self, site: Site, shaping: Shaping) -> Source | bool | None:
        """A source below its connection limit; None for the system's default; False: none."""
        rotation = self.rotations.get(shaping.pool)
        if rotation is None:
            return None
        picked = rotation.pick(
            lambda s: site.per_source[s.address] < shaping.max_connections_per_source
        )
        return picked if picked is not None else False

    # -- connections --------------------------------------------------------------------

    async def _next_job(self, site: Site) -> Job | None:
        if site.queue:
            return site.queue.popleft()
        if self.stopping:
            return None
        waiter: asyncio.Future[Job | None] = asyncio.get_running_loop().create_future()
        site.waiters.append(waiter)
        try:
            return await asyncio.wait_for(waiter, self.config.idle_connection_time)
        except TimeoutError:
            return None

    async def _connection(self, site: Site, source: Source | None) -> None:
        shaping = self._shaping(site)
        cfg = self.config
        conn: Connection | None = None
        first = True
        try:
            for _ in range(shaping.max_messages_per_connection):
                job = await self._next_job(site)
                if first:
                    site.starting -= 1
                    first = False
                if job is None:
                    break
                if conn is None:
                    try:
                        conn = await Connection.open(
                            site.route.hosts(),
                            self.resolver,
                            source.address if source else None,
                            source.ehlo if source else cfg.hostname,
                            cfg.starttls == "may",
                            cfg.connect_timeout,
                            cfg.command_timeout,
                        )
                    except ConnectFailure as exc:
                        self._connect_failed(site, job, exc, source)
                        break
                    site.open += 1
                await self._throttle(site, shaping, source)
                pairs = await conn.send(job)
                self._finish(job, pairs, conn.mx, conn.source_ip)
                if conn.broken:
                    break
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

    def _forget_if_idle(self, site: Site) -> None:
        """Drop a site with no work and no rate debt, so memory follows the active sites only."""
        limiters = [site.limiter, *site.source_limiters.values()]
        if (
            site.connections == 0
            and not site.queue
            and all(lim is None or lim.idle() for lim in limiters)
            and self.sites.get(site.key) is site
        ):
            del self.sites[site.key]

    async def _throttle(self, site: Site, shaping: Shaping, source: Source | None) -> None:
        wait = site.limiter.reserve() if site.limiter else 0.0
        if source is not None and shaping.max_rate_per_source:
            limiter = site.source_limiters.get(source.address)
            if limiter is None:
                limiter = site.source_limiters[source.address] = Gcra(
                    shaping.max_rate_per_source, time.monotonic
                )
            wait = max(wait, limiter.reserve())
        if wait > 0:
            await asyncio.sleep(wait)

    def _connect_failed(
        self, site: Site, job: Job, exc: ConnectFailure, source: Source | None
    ) -> None:
        """No host of the site took a new connection. While other connections to it work, the
        site is only full: the job goes back to them, and no new connection is tried for a
        second. With none open the site is down: defer this job and those queued behind it, as
        Postfix does for a dead destination, rather than paying a connect timeout for each."""
        if site.open > 0:
            site.queue.appendleft(job)
            site.cooldown_until = time.monotonic() + 1.0
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
        jobs = [job, *site.queue]
        site.queue.clear()
        for j in jobs:
            self._finish(
                j,
                [(r.id, Outcome(exc.code, exc.reply)) for r in j.recipients],
                exc.mx,
                source.address if source else "",
            )

    # -- results ------------------------------------------------------------------------

    def _finish(self, job: Job, pairs: list[tuple[int, Outcome]], mx: str, source_ip: str) -> None:
        """Log each recipient's outcome and store it; the job leaves memory."""
        now = self.clock()
        retry = self.config.retry
        by_id = {r.id: r for r in job.recipients}
        results = []
        for rid, outcome in pairs:
            r = by_id[rid]
            state, reply, next_attempt = outcome.state, outcome.reply, 0.0
            if state is State.DEFERRED:
                expires = job.received_at + retry.max_age
                if now >= expires:
                    state = State.BOUNCED
                    reply = f"4.4.7 message expired after {retry.max_age:.0f}s; last reply: {reply}"
                else:
                    next_attempt = min(now + retry_delay(r.attempts + 1, retry, self.rng), expires)
            results.append(Result(rid, state, outcome.code, reply, mx, next_attempt))
            log.info(
                state.name.lower(),
                queue_id=job.queue_id,
                sender=job.sender,
                rcpt=r.rcpt,
                domain=job.domain,
                mx=mx,
                source_ip=source_ip,
                code=outcome.code,
                response=reply,
                attempt=r.attempts + 1,
                delay_s=round(now - job.received_at, 3),
                **({"next_attempt_in_s": round(next_attempt - now, 1)} if next_attempt else {}),
            )
        self.active -= 1
        self.active_retries -= job.is_retry
        if self._spool_has_due:
            self._poke.set()  # room freed: load more now rather than at the next poll
        record = spool.record_results(job.msg_id, results, now, retry.delay_warning)
        fut = self.writer.submit(record)
        fut.add_done_callback(self._reports_done)

    def _reports_done(self, fut: asyncio.Future[list[spool.Report]]) -> None:
        if fut.cancelled():
            return
        if fut.exception() is not None:
            log.error("record_failed", error=repr(fut.exception()))
            return
        for report in fut.result():
            self._spawn(self._send_report(report))

    async def _send_report(self, report: spool.Report) -> None:
        if not report.sender:
            log.info(
                "dsn_suppressed", queue_id=report.queue_id, reason="null sender", kind=report.kind
            )
            return
        now = self.clock()
        body = bounce.build(report, self.config.hostname, now)
        msg = NewMessage(
            queue_id=spool.new_queue_id(),
            sender="",
            recipients=[report.sender],
            body=body,
            client="",
            helo="",
            origin=f"dsn:{report.queue_id}",
            smtputf8=False,
            received_at=now,
        )
        await self.writer.submit(spool.insert_message(msg, now))
        log.info(
            "dsn_queued",
            queue_id=msg.queue_id,
            kind=report.kind,
            original_queue_id=report.queue_id,
            rcpt=report.sender,
            failed=[r[0] for r in report.recipients],
        )
        self.poke()

    # -- background loops ---------------------------------------------------------------

    async def _loader(self) -> None:
        """Bring due recipients from the spool into memory while there is room."""
        while not self.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), POLL_INTERVAL)
            self._poke.clear()
            self._spool_has_due = True  # each poll looks once for retries that came due
            while not self.stopping:
                room = self.config.max_active - self.active
                retry_room = min(room, self.config.max_active // 2 - self.active_retries)
                if room <= 0:
                    break
                load = spool.load_due(self.clock(), room, retry_room)
                jobs, self._spool_has_due = await self.writer.submit(load)
                for job in jobs:
                    self.active += 1
                    self.active_retries += job.is_retry
                    self._route(job)
                if not self._spool_has_due or not jobs:
                    break

    async def _control(self) -> None:
        """Apply relayctl's changes: forget held or deleted recipients, wake the loader."""
        self._control_id = await self.writer.submit(spool.last_control_id)
        while not self.stopping:
            await asyncio.sleep(0.5)
            events = await self.writer.submit(spool.control_events(self._control_id))
            touched: set[int] = set()
            for event_id, action, msg_ids in events:
                self._control_id = event_id
                if action in ("hold", "delete"):
                    touched |= {int(i) for i in msg_ids.split(",") if i}
            if touched:
                self._drop(touched, await self.writer.submit(spool.still_active(touched)))
            if events:
                self.poke()

    def _drop(self, msg_ids: set[int], active: set[int]) -> None:
        """Keep, of the queued jobs of ``msg_ids``, only the recipients still ACTIVE in the
        spool (relayctl moved the others out); a job left with none leaves memory."""
        for queue in [site.queue for site in self.sites.values()] + list(self.routing.values()):
            kept = []
            for job in queue:
                if job.msg_id in msg_ids:
                    retry = job.is_retry
                    job.recipients = [r for r in job.recipients if r.id in active]
                    if not job.recipients:
                        self.active -= 1
                        self.active_retries -= retry
                        continue
                kept.append(job)
            queue.clear()
            queue.extend(kept)

    def _spawn(self, coro) -> asyncio.Task:  # type: ignore[no-untyped-def]
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task_failed", error=repr(task.exception()))
