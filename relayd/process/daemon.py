"""The relayd process tree: the queue process and, forked from it, the ingress process.

One Python process is bound to one core by the GIL; relayd splits its work in two so that it
uses two. The first process (systemd's main PID) binds the listening sockets and forks the
ingress process, which serves SMTP on them (policy, headers) and hands every message over
(``relayd.process.handoff``). The first process then becomes the queue process: DKIM signing, the
spool's only writer, the scheduler, delivery and relayctl's control. A message is acknowledged
only after the queue process has committed it. Signing sits in the queue process because its
event loop has more room than the ingress process's (measured: 1,400 -> 1,540 signed msgs/s).

Signals go to the queue process. SIGTERM stops accepting (the ingress process closes its
listeners and lets SMTP transactions in flight finish within ``server.shutdown_timeout``), then
deliveries finish and relayd exits; SIGHUP reloads the config in both processes (a broken file
is refused and the running config stays). Readiness is reported to systemd (Type=notify)
without extra dependencies. The ingress process dies with the queue process (PR_SET_PDEATHSIG);
when the ingress process dies, the queue process stops too and exits with 70 so that systemd
restarts both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import os
import signal
import socket
import sqlite3
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import uvloop

from relayd import config as configuration
from relayd.alerts.service import Alerts
from relayd.campaigns.stats import Folder
from relayd.config import HTTP_KINDS
from relayd.delivery.dns import Resolver
from relayd.events import log as events
from relayd.events.log import log
from relayd.events.records import Event
from relayd.feedback.tokens import ReturnPaths, Tokens
from relayd.feedback.unsubscribe import Links
from relayd.ingress import tls
from relayd.ingress.smtp import IngressHandler, start_listeners
from relayd.ingress.suppression import Lookup
from relayd.metrics import Metrics
from relayd.metrics.health import Health
from relayd.metrics.server import MonitoringServer
from relayd.mime.dkim import Signer
from relayd.model import ids
from relayd.model.message import NewMessage
from relayd.outcomes.classify import Classifier
from relayd.process.handoff import IngressLink, SpoolLink
from relayd.queue.backups import Schedule
from relayd.queue.control import Control
from relayd.queue.intake import Intake
from relayd.queue.scheduler import Scheduler, Settings, keep_running
from relayd.receipts.dispatcher import Dispatcher
from relayd.reputation.watch import Watch
from relayd.spool import campaigns, schema, store
from relayd.spool.space import FreeSpace
from relayd.spool.writer import Writer

if TYPE_CHECKING:  # imported where they run (the ingress process, with an API listener)
    from relayd.campaigns.runner import Runner
    from relayd.feedback.record import Policy
    from relayd.ingress.api.server import HttpServer
    from relayd.ingress.api.service import Api
    from relayd.ingress.api.service import Settings as ApiSettings
    from relayd.ingress.bounce import BounceHandler

EX_SOFTWARE = 70  # the ingress process died: exit so that systemd restarts relayd
EX_OSERR = 71
EX_DATAERR = 65  # the spool is damaged
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_M_MMAP_THRESHOLD = -3  # mallopt(3)
MMAP_THRESHOLD = 256 * 1024  # glibc's own starting value is 128 KiB

Bound = list[tuple[configuration.Listener, list[socket.socket]]]


def sd_notify(state: str) -> None:
    """Tell systemd our state through $NOTIFY_SOCKET (a datagram, sd_notify(3) protocol)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)


def load_checked(
    path: str | os.PathLike[str],
) -> tuple[configuration.Config, ssl.SSLContext | None, Signer]:
    """The config with everything it names loaded (certificate, DKIM keys): a file that parses
    but names an unreadable key is refused as a whole, at start-up and on SIGHUP alike."""
    config = configuration.load(path)
    context = tls.server_context(config.tls, str(config.path))
    return config, context, Signer(config.dkim, config.path)


def bind(config: configuration.Config, wait: float = 2.0) -> Bound:
    """The listening sockets, bound before the fork so that the queue process reports a port
    in use and the ingress process inherits them. They listen once both processes are ready.
    A port in use is tried again for ``wait`` seconds: the ingress process of a relayd that
    was just killed may still be on its way out."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return _bind(config)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _bind(config: configuration.Config) -> Bound:
    bound: Bound = []
    try:
        for listener in config.listeners:
            socks = []
            host, port = listener.address.host, listener.address.port
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.setblocking(False)
            bound.append((listener, socks))
    except OSError:
        for _, socks in bound:
            for sock in socks:
                sock.close()
        raise
    return bound


# -- the queue process ---------------------------------------------------------------------


def _queue_settings(config: configuration.Config) -> Settings:
    return Settings(
        config.server.hostname,
        config.delivery,
        config.routes,
        config.shaping,
        config.retry,
        config.pools,
        Classifier(config.bounces),
        config.suppression,
        config.warmup,
    )


def _api_settings(config: configuration.Config) -> ApiSettings:
    from relayd.ingress.api.service import Settings as ApiSettings

    return ApiSettings(
        config.server.hostname,
        config.api.max_recipients,
        config.ingress.max_message_size,
        config.api.max_body_size,
        config.webhooks,
        config,
    )


def _space(server: configuration.Server) -> FreeSpace:
    return FreeSpace(server.spool_path, server.min_free_space, server.max_spool_size)


def _tokens(spool: Path) -> Tokens:
    """Signed with the spool's own secret: a restored backup still knows the links and return
    paths it gave."""
    conn = schema.reader(spool)
    try:
        return Tokens(schema.secret(conn, "tokens"))
    finally:
        conn.close()


def _links(config: configuration.Unsubscribe, tokens: Tokens) -> Links | None:
    return Links(config, tokens) if config.enabled else None


def _return_paths(tokens: Tokens, config: configuration.Config) -> ReturnPaths:
    return ReturnPaths(tokens, config.return_path.local, config.return_path.domain)


def _report_policy(config: configuration.Config) -> Policy:
    from relayd.feedback.record import Policy

    return Policy(Classifier(config.bounces), config.suppression, config.server.hostname)


class QueueProcess:
    """Spool writer, scheduler and delivery; stores what the ingress process hands over."""

    def __init__(
        self,
        config: configuration.Config,
        signer: Signer,
        link: socket.socket,
        ingress_pid: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.signer = signer
        self.link_socket = link
        self.ingress_pid = ingress_pid
        self.clock = clock
        self.ingress_gone = asyncio.Event()
        self.stopped = asyncio.Event()
        self.stopping = False
        self.exit_code = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        config, server = self.config, self.config.server
        self.writer = Writer(server.spool_path, loop)
        self.requeued = await self.writer.submit(store.reset_active)
        resolver = Resolver(config.dns.nameservers, config.dns.timeout)
        # the blacklist watch: its rounds ask through the configured nameservers, and with
        # reputation.on_listing = "remove" the scheduler leaves a listed source out
        self.reputation = Watch(
            config.reputation, config.pools, self.writer, self._blacklist_resolver, self.clock
        )
        self.scheduler = Scheduler(
            _queue_settings(config),
            self.writer,
            resolver,
            self.clock,
            usable_source=self.reputation.usable,
        )
        self.tokens = _tokens(server.spool_path)
        self.intake = Intake(
            self.writer,
            self.scheduler,
            self.signer,
            server.hostname,
            _space(server),
            self.clock,
            _links(config.unsubscribe, self.tokens),
            config.return_path.feedback_id,
        )
        await self.reputation.load()  # before the first connection picks a source
        await self.scheduler.load_holds()  # adaptive shaping's holds of the last run, too
        self.scheduler.return_path = _return_paths(self.tokens, config).mail_from
        self.scheduler.start(self.intake.dsn)
        self.control = Control(
            self.writer,
            self.scheduler,
            config.events.retention,
            self.clock,
            requests=self._requests,
        )
        self.control_task = loop.create_task(self.control.run())
        self.reputation_task = loop.create_task(self.reputation.run())
        self.backups = Schedule(server.spool_path, config.backup, self.clock)
        self.backup_task = loop.create_task(self.backups.run())
        # webhooks read the outbox on a connection and a thread of their own: they never
        # hold the writer nor wait in delivery's way
        self.webhooks = Dispatcher(server.spool_path, self.writer.submit, config.webhooks)
        self.webhooks.start()
        if schema.needs_background_check(server.spool_path):
            self.check_task = loop.create_task(self._check_spool())
        # what the ingress process accepts goes through the one door into the spool; it
        # answers 250 or 202 when the batch is durable
        submit = self.intake.submit
        self.link = IngressLink(submit, self._serving, self._reloaded, self._ingress_lost)
        await loop.create_unix_connection(lambda: self.link.channel, sock=self.link_socket)
        # /metrics, /healthz, /readyz and the systemd watchdog (relayd.metrics)
        self.metrics = Metrics(self, self.clock)
        await self.metrics.start()
        self.health = Health(self, self.metrics, sd_notify)
        self.health.start()
        self.monitoring = MonitoringServer(self.metrics, self.health)
        if config.monitoring.address is not None:
            await self.monitoring.start(config.monitoring.address)
        # built-in alerts over the same samples: events through the writer, mail through
        # intake's door
        self.alerts = Alerts(
            config.alerts,
            server.hostname,
            self.writer,
            self.intake,
            self.scheduler.poke,
            self.metrics.samples,
            self.clock,
        )
        await self.alerts.restore(server.spool_path)
        self.alerts_task = loop.create_task(self.alerts.run())

    def _requests(self, events: list[Event]) -> None:
        """relayctl's requests, read from the operator events: ip check, shaping clear."""
        self.reputation.request(events)
        self.scheduler.clear_holds(events)

    def _blacklist_resolver(self) -> Resolver:
        """A resolver for one round of blacklist lookups, on the nameservers of the config in
        force (a SIGHUP may change them)."""
        return Resolver(self.config.dns.nameservers, self.config.dns.timeout)

    async def _check_spool(self) -> None:
        """The whole check of a spool too large to check before serving, beside the work."""
        loop = asyncio.get_running_loop()
        path = self.config.server.spool_path
        started = time.monotonic()
        done: asyncio.Future[str] = loop.create_future()

        def check() -> None:  # a daemon thread: a stop need not wait for the check to end
            problem = schema.verify(path)
            with contextlib.suppress(RuntimeError):  # the loop is closed: relayd has stopped
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(problem))

        threading.Thread(target=check, name="spool-check", daemon=True).start()
        problem = await done
        took = round(time.monotonic() - started, 1)
        if problem:
            log.error("spool_damaged", error=problem, check_s=took)
        else:
            log.info("spool_checked", spool=str(path), check_s=took)

    def _serving(self) -> None:
        log.info(
            "started",
            listeners=[str(listener.address) for listener in self.config.listeners],
            spool=str(self.config.server.spool_path),
            requeued=self.requeued,
            pid=os.getpid(),
            ingress_pid=self.ingress_pid,
        )
        sd_notify("READY=1")

    def reload(self) -> None:
        """Check the new file here, then let the ingress process apply it (it answers)."""
        sd_notify("RELOADING=1")
        try:
            new, _, signer = load_checked(self.config.path)
            if new.tls.cert_file and not self.config.tls.cert_file:
                raise configuration.ConfigError(new.path, "tls", "enabling TLS needs a restart")
        except configuration.ConfigError as exc:
            log.error("reload_refused", error=str(exc))
            sd_notify("READY=1")
            return
        old = self.config
        if new.listeners != old.listeners or new.server.spool_path != old.server.spool_path:
            log.warning("reload_partial", reason="listeners and spool_path need a restart")
        events.configure(new.server.log_level)
        self.config, self.signer = new, signer
        self.intake.reload(
            signer,
            new.server.hostname,
            _space(new.server),
            _links(new.unsubscribe, self.tokens),
            new.return_path.feedback_id,
        )
        self.scheduler.return_path = _return_paths(self.tokens, new).mail_from
        self.control.retention = new.events.retention
        self.webhooks.reload(new.webhooks)
        self.scheduler.reload(_queue_settings(new))
        self.reputation.reload(new.reputation, new.pools)
        self.backups.reload(new.backup)
        self.alerts.reload(new.alerts, new.server.hostname)
        self.link.reload()

    def _reloaded(self, error: str) -> None:
        if error:
            log.error("reload_refused", error=error, process="ingress")
        else:
            log.info("reloaded", config=str(self.config.path))
        sd_notify("READY=1")

    def _ingress_lost(self) -> None:
        self.ingress_gone.set()
        if not self.stopping:
            log.error("ingress_exited", pid=self.ingress_pid)
            self.exit_code = EX_SOFTWARE
            asyncio.get_running_loop().create_task(self.stop())

    async def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        sd_notify("STOPPING=1")
        if self.health.task is not None:  # the loops this stop ends are not stuck
            self.health.task.cancel()
        timeout = self.config.server.shutdown_timeout
        log.info("stopping", timeout_s=timeout)
        deadline = time.monotonic() + timeout
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.ingress_pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):  # its sessions finish, with our commits
            await asyncio.wait_for(self.ingress_gone.wait(), timeout + 2)
        await self._reap()
        await self.scheduler.stop(max(deadline - time.monotonic(), 1.0))
        self.control_task.cancel()
        self.reputation_task.cancel()
        self.backup_task.cancel()
        self.alerts_task.cancel()
        await self.monitoring.close()
        self.metrics.close()
        await self.webhooks.stop()
        self.intake.close()
        self.writer.close()
        log.info("stopped")
        self.stopped.set()

    async def _reap(self) -> None:
        """Wait for the ingress process to exit (SIGKILL if it lingers), so that its sockets
        are closed when we exit."""
        limit = time.monotonic() + 5
        while True:
            try:
                pid, _ = os.waitpid(self.ingress_pid, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                return
            if time.monotonic() > limit:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.ingress_pid, signal.SIGKILL)
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, os.waitpid, self.ingress_pid, 0)
                return
            await asyncio.sleep(0.02)


async def serve_queue(
    config: configuration.Config, signer: Signer, link: socket.socket, ingress_pid: int
) -> int:
    relay = QueueProcess(config, signer, link, ingress_pid)
    await relay.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: loop.create_task(relay.stop()))
    loop.add_signal_handler(signal.SIGHUP, relay.reload)
    relay.link.serve()  # signals are handled now: the listeners may open
    await relay.stopped.wait()
    return relay.exit_code


# -- the ingress process -------------------------------------------------------------------


class IngressProcess:
    """SMTP listeners; hands every accepted message to the queue process."""

    def __init__(
        self,
        config: configuration.Config,
        context: ssl.SSLContext | None,
        bound: Bound,
        link: socket.socket,
    ) -> None:
        self.config = config
        self.tls = context
        self.bound = bound
        self.link_socket = link
        self.servers: list[asyncio.Server] = []
        self.handler: IngressHandler | None = None
        self.bounces: BounceHandler | None = None  # with a bounce listener
        self.api: Api | None = None  # with an API listener
        self.runner: Runner | None = None  # the campaigns', once there is one
        self.campaigns_woken = asyncio.Event()
        self.http: HttpServer | None = None
        self.stopped = asyncio.Event()
        self.stopping = False
        self.folder: Folder | None = None  # campaign statistics, folded from the event log
        self.folding: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.link = SpoolLink(self._serve, self.reload)
        await loop.create_unix_connection(lambda: self.link.channel, sock=self.link_socket)
        self.watch = loop.create_task(self._watch_queue())

    def _serve(self) -> None:
        self.opening = asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        if self.stopping:
            return
        cfg = self.config
        lookup = Lookup(cfg.server.spool_path)
        self.handler = IngressHandler(
            cfg.ingress,
            cfg.auth,
            cfg.server.hostname,
            _space(cfg.server),
            self.accept,
            lookup,
            cfg.suppression.smtp,
        )
        own = (*HTTP_KINDS, "bounce")  # served by their own handlers
        smtp = [(lsn, socks) for lsn, socks in self.bound if lsn.kind not in own]
        self.servers = await start_listeners(self.handler, self.tls, smtp)
        if self.folding is None:
            self.folder = Folder(cfg.server.spool_path)
            self.folding = asyncio.get_running_loop().create_task(self.folder.run())
        bounce = [(lsn, socks) for lsn, socks in self.bound if lsn.kind == "bounce"]
        if bounce:  # its own handler: its own connection limits, apart from the applications'
            # imported here, with a bounce listener only (flufl.bounce: ~1 MB a process)
            from relayd.ingress.bounce import BounceHandler

            self.tokens = _tokens(cfg.server.spool_path)
            self.bounces = BounceHandler(
                cfg.ingress,
                cfg.auth,
                cfg.server.hostname,
                _space(cfg.server),
                lookup,
                cfg.return_path,
                _return_paths(self.tokens, cfg),
                _report_policy(cfg),
                cfg.unsubscribe,
                cfg.server.spool_path,
            )
            self.servers += await start_listeners(self.bounces, self.tls, bounce)
        http = [
            (sock, self.tls if lsn.kind == "https" else None)
            for lsn, socks in self.bound
            if lsn.kind in HTTP_KINDS
            for sock in socks
        ]
        if http:
            # Imported here, in the ingress process and only when an API listener is
            # configured: aiohttp and Jinja2 cost each process ~13 MB of memory otherwise.
            from relayd.ingress.api.server import HttpServer
            from relayd.ingress.api.service import Api

            # the API shares the SMTP handler's credentials (and so its rate buckets)
            self.api = Api(
                _api_settings(cfg),
                self.handler.users,
                self.link.store,
                _space(cfg.server),
                cfg.server.spool_path,
                _tokens(cfg.server.spool_path),  # the unsubscribe links
            )
            self.http = HttpServer(self.api, cfg.api.max_body_size, cfg.server.shutdown_timeout)
            await self.http.start(http)
        # campaigns go out from here, through the API's door, with or without an API listener
        self.campaigns_task = asyncio.get_running_loop().create_task(self._campaigns())
        if self.api is not None:
            self.api.campaigns_changed = self._campaigns_changed
        self.link.serving()

    async def _campaigns(self) -> None:
        """The campaign runner, started once the spool has a campaign that is not over: its
        imports (Jinja2, the API's composer) would cost an ingress process that sends no
        campaigns ~13 MB of memory."""
        conn = schema.reader(self.config.server.spool_path)
        try:
            await keep_running(
                "campaigns", lambda: self._no_campaign(conn), lambda: self.runner is None
            )
        finally:
            conn.close()
        assert self.runner is not None
        await self.runner.run()

    async def _no_campaign(self, conn: sqlite3.Connection) -> None:
        """Wait for a campaign with work ahead of it; then make the runner."""
        if not await asyncio.to_thread(campaigns.any_open, conn):
            with contextlib.suppress(TimeoutError):
                poll = self.config.campaigns.poll_interval
                await asyncio.wait_for(self.campaigns_woken.wait(), poll)
            self.campaigns_woken.clear()
            return
        from relayd.campaigns.runner import Runner

        self.runner = Runner(self.config, self.link.store, _tokens(self.config.server.spool_path))

    def _campaigns_changed(self) -> None:
        """The API made or resumed a campaign: look now."""
        if self.runner is not None:
            self.runner.wake()
        self.campaigns_woken.set()

    async def accept(self, msg: NewMessage) -> None:
        """Store a message durably (the queue process signs it); the caller answers 250 only
        after this returns."""
        msg.received_at = time.time()
        await self.link.store([msg])

    def reload(self) -> str:
        """Apply the config file (the queue process has checked it); "" or why not."""
        try:
            new, _, _ = load_checked(self.config.path)
            if self.tls is not None and new.tls.cert_file:
                tls.load(self.tls, new.tls, str(new.path))
        except configuration.ConfigError as exc:
            return str(exc)
        events.configure(new.server.log_level)
        self.config = new
        if self.handler is not None:
            self.handler.reload(
                new.ingress, new.auth, new.server.hostname, _space(new.server), new.suppression.smtp
            )
            if self.api is not None:
                self.api.reload(_api_settings(new), self.handler.users, _space(new.server))
        if self.runner is not None:
            self.runner.reload(new)
        if self.bounces is not None:
            self.bounces.reload_reports(
                new.ingress,
                new.auth,
                new.server.hostname,
                _space(new.server),
                new.return_path,
                _return_paths(self.tokens, new),
                _report_policy(new),
                new.unsubscribe,
            )
        return ""

    async def _watch_queue(self) -> None:
        """Without the queue process nothing can be stored: stop at once."""
        await self.link.lost.wait()
        if not self.stopping:
            log.error("queue_process_gone")
            await self.stop(grace=False)

    async def stop(self, grace: bool = True) -> None:
        if self.stopping:
            return
        self.stopping = True
        for server in self.servers:
            server.close()
        deadline = time.monotonic() + (self.config.server.shutdown_timeout if grace else 0)
        sessions = self.handler.sessions if self.handler else set()
        if self.bounces is not None:
            sessions = sessions | self.bounces.sessions
        while any(s.in_transaction for s in sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(sessions):
            session.close()
        if hasattr(self, "campaigns_task"):  # a batch in flight commits or not: it resumes
            self.campaigns_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.campaigns_task
        if self.runner is not None:
            self.runner.close()
        if self.http is not None:  # requests in flight finish (with their commits) first
            await self.http.close()
        if self.api is not None:
            self.api.close()
        if self.bounces is not None:
            self.bounces.close()
        if self.folding is not None and self.folder is not None:
            self.folding.cancel()
            self.folder.close()
        while self.link.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.link.channel.close()
        self.stopped.set()


async def serve_ingress(
    config: configuration.Config,
    context: ssl.SSLContext | None,
    bound: Bound,
    link: socket.socket,
) -> None:
    ingress = IngressProcess(config, context, bound, link)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # systemd signals the whole cgroup
        loop.add_signal_handler(sig, lambda: loop.create_task(ingress.stop()))
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # reloads come from the queue process
    await ingress.start()
    await ingress.stopped.wait()


def _become_ingress(parent: int) -> None:
    """SIGKILL for us when the queue process dies, however it dies; and a name of our own in
    ps and top (relayd-ingress)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        libc.prctl(_PR_SET_NAME, b"relayd-ingress", 0, 0, 0)
    if os.getppid() != parent:  # it died before the call
        os._exit(1)


def _fixed_mmap_threshold() -> None:
    """Large buffers (a message's text, copied a few times on its way) mapped on their own and
    given back to the kernel when freed. glibc raises its threshold to the size of the first
    such buffer freed and keeps every later one in its heaps, where the threads' arenas hold on
    to the memory: the queue process stayed 50-100 MB larger after 2,000 messages of 5 MB."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def run(config: configuration.Config, context: ssl.SSLContext | None, signer: Signer) -> int:
    _fixed_mmap_threshold()  # before the fork: both processes keep it
    schema.prepare(config.server.spool_path)
    bound = bind(config)
    queue_end, ingress_end = socket.socketpair()
    events.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the ingress process
        code = 1
        try:
            queue_end.close()
            ids.reseed()
            _become_ingress(parent)
            uvloop.run(serve_ingress(config, context, bound, ingress_end))
            code = 0
        except BaseException as exc:
            log.error("ingress_failed", error=repr(exc), exc_info=exc)
        finally:
            events.flush()
            sys.stdout.flush()
            os._exit(code)
    ingress_end.close()
    for _, socks in bound:
        for sock in socks:
            sock.close()
    return uvloop.run(serve_queue(config, signer, queue_end, pid))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relayd", description="outbound mail relay")
    parser.add_argument(
        "-c",
        "--config",
        default=os.environ.get("RELAYD_CONFIG", str(configuration.DEFAULT_PATH)),
        help="TOML config file (default: $RELAYD_CONFIG or the bundled conf/relayd.toml)",
    )
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    args = parser.parse_args(argv)
    try:
        config, context, signer = load_checked(args.config)
    except configuration.ConfigError as exc:
        print(f"relayd: config error: {exc}", file=sys.stderr)
        return configuration.EX_CONFIG
    if args.check:
        print(f"relayd: {args.config}: ok")
        return 0
    events.configure(config.server.log_level)
    try:
        return run(config, context, signer)
    except schema.SpoolDamaged as exc:
        print(f"relayd: cannot start: {exc}", file=sys.stderr)
        return EX_DATAERR
    except (OSError, sqlite3.Error) as exc:
        print(f"relayd: cannot start: {exc}", file=sys.stderr)
        return EX_OSERR
    finally:
        events.flush()


if __name__ == "__main__":
    sys.exit(main())
