"""The relayd process tree: the queue process and, forked from it, the ingress process.

One Python process is bound to one core by the GIL; relayd splits its work in two so that it
uses two. The first process (systemd's main PID) binds the listening sockets and forks the
ingress process, which serves SMTP on them (policy, headers) and hands every message over
(``relayd.handoff``). The first process then becomes the queue process: DKIM signing, the
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
import functools
import os
import signal
import socket
import sqlite3
import ssl
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import uvloop

from relayd import config as configuration
from relayd import dkim, events, spool, tls
from relayd.dns import Resolver
from relayd.events import log
from relayd.handoff import IngressLink, SpoolLink
from relayd.ingress import IngressHandler, start_listeners
from relayd.scheduler import Scheduler

EX_SOFTWARE = 70  # the ingress process died: exit so that systemd restarts relayd
EX_OSERR = 71
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15

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
) -> tuple[configuration.Config, ssl.SSLContext | None, dkim.Signer]:
    """The config with everything it names loaded (certificate, DKIM keys): a file that parses
    but names an unreadable key is refused as a whole, at start-up and on SIGHUP alike."""
    config = configuration.load(path)
    context = tls.server_context(config.tls, str(config.path))
    return config, context, dkim.Signer(config.dkim, config.path)


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


class QueueProcess:
    """Spool writer, scheduler and delivery; stores what the ingress process hands over."""

    def __init__(
        self,
        config: configuration.Config,
        signer: dkim.Signer,
        link: socket.socket,
        ingress_pid: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.signer = signer
        self.signing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dkim")
        self.link_socket = link
        self.ingress_pid = ingress_pid
        self.clock = clock
        self.ingress_gone = asyncio.Event()
        self.stopped = asyncio.Event()
        self.stopping = False
        self.exit_code = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.writer = spool.Writer(self.config.spool_path, loop)
        reset = await self.writer.submit(spool.reset_active)
        resolver = Resolver(self.config.nameservers, self.config.dns_timeout)
        self.scheduler = Scheduler(self.config, self.writer, resolver, self.clock)
        self.scheduler.start()
        self.requeued = reset
        self.link = IngressLink(self.store, self._serving, self._reloaded, self._ingress_lost)
        await loop.create_unix_connection(lambda: self.link.channel, sock=self.link_socket)

    def _serving(self) -> None:
        log.info(
            "started",
            listeners=[str(listener.address) for listener in self.config.listeners],
            spool=str(self.config.spool_path),
            requeued=self.requeued,
            pid=os.getpid(),
            ingress_pid=self.ingress_pid,
        )
        sd_notify("READY=1")

    def store(self, msg: spool.NewMessage) -> asyncio.Future[spool.NewMessage]:
        """Sign and commit a message the ingress process accepted; it answers 250 when this
        resolves. Signing here, once, means every attempt delivers the same signed bytes."""
        if self.signer.enabled:
            return asyncio.ensure_future(self._sign_and_insert(msg))
        return self._insert(msg)

    async def _sign_and_insert(self, msg: spool.NewMessage) -> spool.NewMessage:
        loop = asyncio.get_running_loop()  # RSA in OpenSSL releases the GIL: sign beside the loop
        signed = await loop.run_in_executor(
            self.signing, self.signer.sign, msg.body, msg.received_at
        )
        msg.signed = len(signed) > len(msg.body)
        msg.body = signed
        return await self._insert(msg)

    def _insert(self, msg: spool.NewMessage) -> asyncio.Future[spool.NewMessage]:
        """Into the spool's next group commit; into memory at once when there is room."""
        jobs = len({spool.domain_of(r) for r in msg.recipients})
        msg.active = self.scheduler.reserve(jobs)
        fut = self.writer.submit(spool.insert_message(msg, msg.received_at))
        fut.add_done_callback(functools.partial(self._stored, msg, jobs))
        return fut

    def _stored(self, msg: spool.NewMessage, jobs: int, fut: asyncio.Future) -> None:
        """Logged here, at the commit, so that a message's lines come from one process in
        order (accepted before its attempts) and the ingress process's loop stays lighter."""
        if fut.cancelled() or fut.exception() is not None:
            if msg.active:
                self.scheduler.unreserve(jobs)
            log.error("store_failed", queue_id=msg.queue_id, error=repr(fut.exception()))
            return
        log.info(
            "accepted",
            queue_id=msg.queue_id,
            sender=msg.sender,
            rcpt=msg.recipients,
            size=len(msg.body),
            dkim=msg.signed,
            client=msg.client,
            helo=msg.helo,
            origin=msg.origin,
        )
        if msg.active:
            self.scheduler.admit(msg)
        else:
            self.scheduler.poke()

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
        if new.listeners != self.config.listeners or new.spool_path != self.config.spool_path:
            log.warning("reload_partial", reason="listeners and spool_path need a restart")
        events.configure(new.log_level)
        self.config, self.signer = new, signer
        self.scheduler.reload(new)
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
        timeout = self.config.shutdown_timeout
        log.info("stopping", timeout_s=timeout)
        deadline = time.monotonic() + timeout
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.ingress_pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):  # its sessions finish, with our commits
            await asyncio.wait_for(self.ingress_gone.wait(), timeout + 2)
        await self._reap()
        await self.scheduler.stop(max(deadline - time.monotonic(), 1.0))
        self.signing.shutdown()
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
    config: configuration.Config, signer: dkim.Signer, link: socket.socket, ingress_pid: int
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
        self.stopped = asyncio.Event()
        self.stopping = False

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
        self.servers, self.handler = await start_listeners(
            self.config, self.accept, self.tls, self.bound
        )
        self.link.serving()

    async def accept(self, msg: spool.NewMessage) -> None:
        """Store a message durably (the queue process signs it); the caller answers 250 only
        after this returns."""
        msg.received_at = time.time()
        await self.link.store(msg)

    def reload(self) -> str:
        """Apply the config file (the queue process has checked it); "" or why not."""
        try:
            new, _, _ = load_checked(self.config.path)
            if self.tls is not None and new.tls.cert_file:
                tls.load(self.tls, new.tls, str(new.path))
        except configuration.ConfigError as exc:
            return str(exc)
        events.configure(new.log_level)
        self.config = new
        if self.handler is not None:
            self.handler.reload(new)
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
        deadline = time.monotonic() + (self.config.shutdown_timeout if grace else 0)
        sessions = self.handler.sessions if self.handler else set()
        while any(s.in_transaction for s in sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(sessions):
            session.close()
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


def run(config: configuration.Config, context: ssl.SSLContext | None, signer: dkim.Signer) -> int:
    spool.prepare(config.spool_path)
    bound = bind(config)
    queue_end, ingress_end = socket.socketpair()
    events.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the ingress process
        code = 1
        try:
            queue_end.close()
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
    events.configure(config.log_level)
    try:
        return run(config, context, signer)
    except (OSError, sqlite3.Error) as exc:
        print(f"relayd: cannot start: {exc}", file=sys.stderr)
        return EX_OSERR
    finally:
        events.flush()


if __name__ == "__main__":
    sys.exit(main())
