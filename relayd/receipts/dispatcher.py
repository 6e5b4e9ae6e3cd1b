"""The webhook dispatcher: posts the event log to each enabled endpoint from its own cursor.

It runs in the queue process beside the control loop, on the same event loop as delivery,
and is built so that an endpoint can never slow delivery down:

- it reads on a connection of its own (read-only, in a thread of its own: WAL readers never
  wait for the writer, and the loop never waits for SQLite), and writes only one small
  UPDATE per round of POSTs, through the writer's group commit;
- a POST is a coroutine waiting on a socket: a hanging endpoint holds a connection and a
  timer, not the loop; what it has not acknowledged stays in the spool, not in memory (a
  window of at most a few batches per endpoint), so its backlog is bounded by the event
  retention, and the retention counts what it drops.

At least once, in order per message: an endpoint's cursor moves (durably) only past events
that a 2xx acknowledged, so after a crash what was in flight is sent again. With concurrency C
the events of a window go out in C lanes chosen by the queue id's hash, each lane one POST at a
time in id order, stopping at its first failure: a message's later events never overtake its
earlier ones. The cursor moves to the end of the acknowledged prefix; events acknowledged
beyond it are remembered for the retry (and sent again only after a crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import random
import time
import zlib
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from relayd.config import Webhooks
from relayd.events.log import log
from relayd.receipts import payload, policy
from relayd.receipts.payload import Row
from relayd.spool import schema, webhooks
from relayd.spool.webhooks import Endpoint, Progress

T = TypeVar("T")
Submit = Callable[[Callable[[Any], Any]], Awaitable[Any]]
WINDOW_MAX = 10_000  # events an endpoint holds in memory at once
SKIP_WRITE_EVERY = 5.0  # seconds: how often a cursor moved past non-matching events is stored
EXCERPT = 200  # characters of an error reply kept in last_status


@dataclass
class Reply:
    """What became of one POST: the HTTP status (None without a reply) and a line for
    ``last_status``."""

    status: int | None
    text: str
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class Sender(Protocol):
    async def post(self, url: str, body: bytes, headers: dict[str, str], timeout: float) -> Reply:
        """One POST; never raises for what the network or the endpoint does."""
        ...

    async def close(self) -> None: ...


class HttpSender:
    """aiohttp's client: one session (connections kept alive per endpoint), redirects not
    followed (a signed payload goes only where the operator said), at most EXCERPT characters
    of a reply read."""

    def __init__(self, load: Callable[[str], Awaitable[Any]]) -> None:
        self.load = load  # imports a module off the event loop (aiohttp takes ~0.4 s)
        self.session: Any = None
        self.aiohttp: Any = None

    async def post(self, url: str, body: bytes, headers: dict[str, str], timeout: float) -> Reply:
        if self.session is None:
            self.aiohttp = aiohttp = await self.load("aiohttp")
            if self.session is None:
                connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60)
                self.session = aiohttp.ClientSession(connector=connector, cookie_jar=None)
        aiohttp = self.aiohttp
        try:
            async with self.session.post(
                url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as resp:
                text = f"{resp.status} {resp.reason or ''}".rstrip()
                if not 200 <= resp.status < 300:
                    excerpt = (await resp.content.read(EXCERPT)).decode("utf-8", "replace")
                    excerpt = " ".join(excerpt.split())
                    if excerpt:
                        text += f": {excerpt}"
                return Reply(resp.status, text, _retry_after(resp.headers.get("Retry-After")))
        except TimeoutError:
            return Reply(None, f"timeout after {timeout:g}s")
        except aiohttp.ClientError as exc:
            return Reply(None, f"{type(exc).__name__}: {exc}"[:EXCERPT])
        except (OSError, ValueError) as exc:
            return Reply(None, f"{type(exc).__name__}: {exc}"[:EXCERPT])

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def _retry_after(value: str | None) -> float | None:
    """Seconds of a Retry-After header (the HTTP-date form is ignored)."""
    try:
        return max(float(value), 0.0) if value else None
    except ValueError:
        return None


class Dispatcher:
    """One runner per enabled endpoint; looks for added, re-enabled and removed endpoints every
    poll interval."""

    def __init__(
        self,
        spool_path: Path,
        submit: Submit,
        settings: Webhooks,
        clock: Callable[[], float] = time.time,
        sender: Sender | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.submit, self.settings, self.clock, self.rng = submit, settings, clock, rng
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="webhook-reader")
        self.conn = schema.reader(spool_path)
        self.sender: Sender = sender or HttpSender(self._import)
        self.runners: dict[int, asyncio.Task[None]] = {}
        self.stopping = False
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    def reload(self, settings: Webhooks) -> None:
        self.settings = settings

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """A read on the dispatcher's own connection and thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, self.conn, *args))

    async def _import(self, name: str) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, importlib.import_module, name)

    async def run(self) -> None:
        failures = 0
        while not self.stopping:
            try:
                await self.poll()
                failures = 0
            except Exception as exc:  # a locked or damaged spool: logged, tried again
                failures += 1
                log.error("webhook_dispatcher_error", error=repr(exc), failures=failures)
            await asyncio.sleep(self.settings.poll_interval * min(2**failures, 120))

    async def poll(self) -> None:
        """A runner for each enabled endpoint that has none (runners end themselves when their
        endpoint is removed or disabled)."""
        for ep in await self.read(webhooks.endpoints):
            task = self.runners.get(ep.id)
            if not ep.disabled and (task is None or task.done()) and not self.stopping:
                runner = Runner(self, ep)
                self.runners[ep.id] = asyncio.get_running_loop().create_task(runner.run())

    async def stop(self) -> None:
        """POSTs in flight are abandoned: their events were not acknowledged, so the next
        start sends them again."""
        self.stopping = True
        tasks = [t for t in (self.task, *self.runners.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.sender.close()
        self.pool.submit(self.conn.close)
        self.pool.shutdown(wait=True)


class Runner:
    """One endpoint: reads a window of its events, posts them in lanes, records the round."""

    def __init__(self, dispatcher: Dispatcher, ep: Endpoint) -> None:
        self.d = dispatcher
        self.id = ep.id
        self.events = ep.events
        self.cursor = ep.cursor  # what was acknowledged (or looked at and not matching)
        self.stored = ep.cursor  # the cursor as last written
        self.stored_at = 0.0
        self.window: list[Row] = []  # read, not all acknowledged yet
        self.horizon = ep.cursor  # the cursor once the whole window is acknowledged
        self.acked: set[int] = set()

    async def run(self) -> None:
        failures = 0
        while not self.d.stopping:
            try:
                if not await self.step():
                    return
                failures = 0
            except Exception as exc:  # the spool (locked, full): logged, tried again
                failures += 1
                log.error("webhook_error", endpoint=self.id, error=repr(exc), failures=failures)
                await asyncio.sleep(self.d.settings.poll_interval * min(2**failures, 120))

    async def step(self) -> bool:
        """One look, and a round of POSTs when something is due; False once the endpoint is
        removed or disabled. The endpoint's row is read afresh each time (after this runner's
        own writes are durable), so relayctl's changes apply at once."""
        d = self.d
        ep = await d.read(webhooks.get, self.id)
        if ep is None or ep.disabled:
            return False
        if ep.cursor > self.stored or ep.events != self.events:  # relayctl moved it
            self.cursor = self.stored = self.horizon = ep.cursor
            self.events, self.window, self.acked = ep.events, [], set()
        now = d.clock()
        if ep.next_try > now:
            await asyncio.sleep(min(ep.next_try - now, d.settings.poll_interval))
            return True
        if not self.window:
            limit = min(max(ep.batch * ep.concurrency * 2, 100), WINDOW_MAX)
            found = await d.read(webhooks.pending, self.cursor, ep.types, limit)
            if not found.rows:
                self.cursor = self.horizon = max(self.cursor, found.horizon)
                if self.cursor > self.stored and now - self.stored_at >= SKIP_WRITE_EVERY:
                    await self._store(ep, None, 0, now)
                await asyncio.sleep(d.settings.poll_interval)
                return True
            self.window, self.horizon, self.acked = found.rows, found.horizon, set()
        await self.round(ep)
        return True

    async def round(self, ep: Endpoint) -> None:
        lanes: dict[int, list[Row]] = {}
        for row in self.window:
            if row[0] not in self.acked:
                lane = zlib.crc32(row[3].encode()) % ep.concurrency
                lanes.setdefault(lane, []).append(row)
        results = await asyncio.gather(*(self._lane(ep, rows) for rows in lanes.values()))
        sent = sum(n for n, _ in results)
        replies = [r for _, r in results]
        failed = next((r for r in replies if not r.ok), None)
        done = 0
        for row in self.window:
            if row[0] not in self.acked:
                break
            self.cursor, done = row[0], done + 1
        if done == len(self.window):
            self.cursor, self.window, self.acked = self.horizon, [], set()
        else:
            self.acked.difference_update(r[0] for r in self.window[:done])
            self.window = self.window[done:]
        await self._store(ep, failed or replies[-1], sent, self.d.clock())

    async def _lane(self, ep: Endpoint, rows: list[Row]) -> tuple[int, Reply]:
        """One POST at a time, in id order, up to the first failure."""
        sent, reply = 0, Reply(None, "")
        for i in range(0, len(rows), ep.batch):
            chunk = rows[i : i + ep.batch]
            reply = await self._post(ep, chunk)
            if not reply.ok:
                break
            self.acked.update(r[0] for r in chunk)
            sent += len(chunk)
        return sent, reply

    async def _post(self, ep: Endpoint, rows: list[Row]) -> Reply:
        batched = ep.batch > 1
        content = payload.body(rows, batched)
        now = self.d.clock()
        msg_id = payload.message_id(ep.id, rows, batched)
        headers = payload.headers(ep.signing(now), msg_id, now, content)
        return await self.d.sender.post(ep.url, content, headers, ep.timeout)

    async def _store(self, ep: Endpoint, reply: Reply | None, sent: int, now: float) -> None:
        """The round's outcome, durable before the next round is decided: the cursor, and the
        endpoint's health (a failure schedules the next try, or disables the endpoint)."""
        if reply is None:  # only the cursor moved, past events it does not subscribe to
            health = (ep.failures, ep.failing_since, ep.next_try, ep.last_status, None, None, "")
        elif reply.ok:
            health = (0, None, 0.0, reply.text, now, now, "")
            if ep.failures:
                log.info("webhook_recovered", endpoint=ep.id, url=ep.url, failures=ep.failures)
        else:
            retry, rng = policy.Retry.of(self.d.settings), self.d.rng
            f = policy.after_failure(
                ep.failures, ep.failing_since, now, reply.status, reply.retry_after, retry, rng
            )
            success = now if sent else None
            health = (f.failures, f.since, f.next_try, reply.text, now, success, f.disabled)
            if f.disabled:
                log.warning(
                    "webhook_disabled", endpoint=ep.id, url=ep.url, reason=f.disabled,
                    status=reply.text,
                )  # fmt: skip
            else:
                log.warning(
                    "webhook_failed", endpoint=ep.id, url=ep.url, status=reply.text,
                    failures=f.failures, next_try_in_s=round(f.next_try - now, 1),
                    unsent=len(self.window) - len(self.acked),
                )  # fmt: skip
        progress = Progress(ep.id, self.cursor, sent, *health)
        await self.d.submit(functools.partial(webhooks.record, p=progress))
        self.stored, self.stored_at = self.cursor, now
