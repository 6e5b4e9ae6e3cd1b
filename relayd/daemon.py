"""The relayd process: wires ingress, spool and scheduler together and handles signals.

SIGTERM stops accepting, lets SMTP sessions and deliveries in flight finish within
``server.shutdown_timeout`` and exits; SIGHUP reloads the config (a broken file is refused and
the running config stays). Readiness is reported to systemd (Type=notify) without extra
dependencies.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
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
from relayd.ingress import IngressHandler, start_listeners
from relayd.scheduler import Scheduler


def sd_notify(state: str) -> None:
    """Tell systemd our state through $NOTIFY_SOCKET (a datagram, sd_notify(3) protocol)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)


class Relay:
    """One relay: spool writer, scheduler and listeners, started and stopped together."""

    def __init__(
        self,
        config: configuration.Config,
        context: ssl.SSLContext | None,
        signer: dkim.Signer,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.tls = context
        self.signer = signer
        self.signing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dkim")
        self.clock = clock
        self.servers: list[asyncio.Server] = []
        self.handler: IngressHandler | None = None
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.writer = spool.Writer(self.config.spool_path, loop)
        reset = await self.writer.submit(spool.reset_active)
        resolver = Resolver(self.config.nameservers, self.config.dns_timeout)
        self.scheduler = Scheduler(self.config, self.writer, resolver, self.clock)
        self.scheduler.start()
        self.servers, self.handler = await start_listeners(self.config, self.accept, self.tls)
        log.info(
            "started",
            listeners=[str(listener.address) for listener in self.config.listeners],
            spool=str(self.config.spool_path),
            requeued=reset,
            pid=os.getpid(),
        )

    async def accept(self, msg: spool.NewMessage) -> None:
        """Sign and store a message durably; the caller answers 250 only after this returns.
        Signing here, once, means every attempt delivers the same signed bytes."""
        msg.received_at = now = self.clock()
        unsigned = len(msg.body)
        if self.signer.enabled:  # RSA in OpenSSL releases the GIL: sign beside the event loop
            loop = asyncio.get_running_loop()
            msg.body = await loop.run_in_executor(self.signing, self.signer.sign, msg.body, now)
        jobs = len({spool.domain_of(r) for r in msg.recipients})
        msg.active = self.scheduler.reserve(jobs)
        try:
            await self.writer.submit(spool.insert_message(msg, now))
        except BaseException:
            if msg.active:
                self.scheduler.unreserve(jobs)
            raise
        log.info(
            "accepted",
            queue_id=msg.queue_id,
            sender=msg.sender,
            rcpt=msg.recipients,
            size=len(msg.body),
            dkim=len(msg.body) > unsigned,
            client=msg.client,
            helo=msg.helo,
            origin=msg.origin,
        )
        if msg.active:
            self.scheduler.admit(msg)
        else:
            self.scheduler.poke()

    def reload(self) -> None:
        sd_notify("RELOADING=1")
        try:
            new = configuration.load(self.config.path)
            signer = dkim.Signer(new.dkim, new.path)
            if new.tls.cert_file and self.tls is None:
                raise configuration.ConfigError(new.path, "tls", "enabling TLS needs a restart")
            if self.tls is not None and new.tls.cert_file:
                tls.load(self.tls, new.tls, str(new.path))
        except configuration.ConfigError as exc:
            log.error("reload_refused", error=str(exc))
        else:
            changed = new.listeners != self.config.listeners or new.spool_path != (
                self.config.spool_path
            )
            if changed:
                log.warning("reload_partial", reason="listeners and spool_path need a restart")
            events.configure(new.log_level)
            self.config = new
            self.signer = signer
            if self.handler is not None:
                self.handler.reload(new)
            self.scheduler.reload(new)
            log.info("reloaded", config=str(new.path))
        sd_notify("READY=1")

    async def stop(self) -> None:
        sd_notify("STOPPING=1")
        timeout = self.config.shutdown_timeout
        log.info("stopping", timeout_s=timeout)
        for server in self.servers:
            server.close()
        deadline = time.monotonic() + timeout
        sessions = self.handler.sessions if self.handler else set()
        while any(s.in_transaction for s in sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(sessions):
            session.close()
        await self.scheduler.stop(max(deadline - time.monotonic(), 1.0))
        self.signing.shutdown()
        self.writer.close()
        log.info("stopped")
        self.stopped.set()


async def serve(
    config: configuration.Config, context: ssl.SSLContext | None, signer: dkim.Signer
) -> None:
    relay = Relay(config, context, signer)
    await relay.start()
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(
            sig, lambda: stopping or stopping.append(loop.create_task(relay.stop()))
        )
    loop.add_signal_handler(signal.SIGHUP, relay.reload)
    sd_notify("READY=1")
    await relay.stopped.wait()


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
        config = configuration.load(args.config)
    except configuration.ConfigError as exc:
        print(f"relayd: config error: {exc}", file=sys.stderr)
        return configuration.EX_CONFIG
    try:
        context = tls.server_context(config.tls, str(config.path))
        signer = dkim.Signer(config.dkim, config.path)
    except configuration.ConfigError as exc:
        print(f"relayd: config error: {exc}", file=sys.stderr)
        return configuration.EX_CONFIG
    if args.check:
        print(f"relayd: {args.config}: ok")
        return 0
    events.configure(config.log_level)
    try:
        uvloop.run(serve(config, context, signer))
    except OSError as exc:
        print(f"relayd: cannot start: {exc}", file=sys.stderr)
        return 71  # EX_OSERR
    finally:
        events.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
