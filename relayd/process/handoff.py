"""The hand-off between relayd's two processes: accepted mail from ingress to the spool.

relayd runs as two processes so that it uses two cores: the ingress process speaks SMTP to
clients (policy, headers) and the queue process signs (DKIM), owns the spool, the scheduler and
delivery. Ingress sends each message over a socketpair; the queue process stores it with group
commit and answers once the commit is durable; only then does ingress reply 250. The queue
process is the spool's only writer, as before.

Frames: a 4-byte big-endian length, then a marshalled tuple whose first item names the kind.
marshal is the fastest codec for tuples of str/bytes/int and both ends run the same relayd.
Frames written in one turn of the event loop go out in one system call. Messages travel in
batches that are stored in one transaction (an SMTP message is a batch of one; an API call for
1,000 recipients one batch, with its idempotency record). Texts are not marshalled: the frame
ends with their total length and the raw bytes follow it (each message's trace headers, then
its text as read), so neither end copies a text to frame it, and the queue process gets each
message's headers and text joined in the one copy it makes on receipt.
"""

from __future__ import annotations

import asyncio
import functools
import marshal
import time
from collections.abc import Callable
from typing import Any

from relayd.model.message import Guard, NewMessage
from relayd.spool.space import FULL_MARK, SpoolFull, is_full

_HEADER = 4
_MARSHAL_VERSION = 4

# ingress -> queue
MESSAGES = "m"  # (MESSAGES, request id, [fields of each NewMessage], guard, texts' length) + texts
RELOADED = "r"  # (RELOADED, error or ""): ingress applied (or refused) a reload
SERVING = "l"  # (SERVING,): the listeners are open
PONG = "P"  # (PONG, stamp): the answer to PING, the ingress loop turns
# queue -> ingress
SERVE = "L"  # (SERVE,): the queue process is ready, open the listeners
STORED = "s"  # (STORED, [(request id, error or "", what the guard answered instead), ...])
RELOAD = "R"  # (RELOAD,): reload the config file
PING = "p"  # (PING, stamp): is the ingress loop turning? (/readyz, the watchdog)


class Channel(asyncio.Protocol):
    """One end of the socketpair: frames in, frames out, batched per loop turn."""

    def __init__(self, on_frame: Callable[[tuple], None], on_lost: Callable[[], None]) -> None:
        self.on_frame, self.on_lost = on_frame, on_lost
        self.transport: asyncio.Transport | None = None
        self._inbox = bytearray()
        self._raw: tuple[tuple, bytearray, int] | None = None  # frame, its text, bytes in it
        self._outbox: list[bytes | bytearray] = []
        self._flush_handle: asyncio.Handle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.on_lost()

    def send(self, frame: tuple, raw: tuple[bytes | bytearray, ...] = ()) -> None:
        """Queue a frame; ``raw``, whose total length the frame ends with, follows it as is."""
        data = marshal.dumps(frame, _MARSHAL_VERSION)
        self._outbox.append(len(data).to_bytes(_HEADER, "big"))
        self._outbox.append(data)
        self._outbox.extend(raw)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def flush(self) -> None:
        """Write what is queued now (frames are otherwise written at the end of the turn)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush()

    def _flush(self) -> None:
        self._flush_handle = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(self._outbox)
        self._outbox.clear()

    def data_received(self, data: bytes) -> None:
        frames: list[tuple] = []
        if self._raw is not None:
            data = self._more_raw(data, frames)
        if data:
            inbox = self._inbox
            inbox += data
            pos, size = 0, len(inbox)
            while size - pos >= _HEADER:
                end = pos + _HEADER + int.from_bytes(inbox[pos : pos + _HEADER], "big")
                if end > size:
                    break
                frame = marshal.loads(memoryview(inbox)[pos + _HEADER : end])
                pos = end
                need = frame[-1] if frame[0] == MESSAGES else -1
                if need < 0:
                    frames.append(frame)
                elif size - pos >= need:
                    frames.append((*frame[:-1], bytes(memoryview(inbox)[pos : pos + need])))
                    pos += need
                else:  # a large text: copied once, as it comes, into a buffer of its size
                    text = bytearray(need)
                    text[: size - pos] = memoryview(inbox)[pos:]
                    self._raw = (frame, text, size - pos)
                    pos = size
                    break
            if pos:
                del inbox[:pos]
        for frame in frames:
            self.on_frame(frame)

    def _more_raw(self, data: bytes, frames: list[tuple]) -> bytes:
        """Add to the text being gathered; the frame is complete once it is all here. Returns
        what follows the text."""
        assert self._raw is not None
        frame, text, filled = self._raw
        take = min(len(data), len(text) - filled)
        text[filled : filled + take] = memoryview(data)[:take]
        if filled + take < len(text):
            self._raw = (frame, text, filled + take)
            return b""
        self._raw = None
        frames.append((*frame[:-1], text))
        return data[take:]

    def close(self) -> None:
        if self.transport is not None:
            self.flush()
            self.transport.close()


def messages_frame(request: int, msgs: list[NewMessage], guard: Guard | None) -> tuple:
    """The frame of a batch without its texts; it ends with their total length, each message's
    fields with its own."""
    fields = [
        (
            m.queue_id,
            m.sender,
            m.recipients,
            m.client,
            m.helo,
            m.origin,
            m.smtputf8,
            m.received_at,
            m.envid,
            m.ret,
            m.notify,
            m.orcpt,
            m.meta,
            m.send_at,
            m.suppressed,
            m.stream,
            m.campaign,
            len(m.head) + len(m.body),
        )
        for m in msgs
    ]
    return (MESSAGES, request, fields, guard, sum(f[-1] for f in fields))


def messages_of(frame: tuple) -> tuple[int, list[NewMessage], Guard | None]:
    """The batch of a received frame (the texts, joined to the frame, are its last item)."""
    _, request, fields, guard, texts = frame
    msgs, pos = [], 0
    for queue_id, sender, rcpts, client, helo, origin, utf8, received, *rest in fields:
        envid, ret, notify, orcpt, meta, send_at, suppressed, stream, campaign, size = rest
        # one message: its text as received; more: each its own slice (copied once)
        body = texts if len(fields) == 1 else bytes(memoryview(texts)[pos : pos + size])
        pos += size
        msgs.append(
            NewMessage(
                queue_id,
                sender,
                rcpts,
                body,
                client,
                helo,
                origin,
                utf8,
                received,
                envid=envid,
                ret=ret,
                notify=notify,
                orcpt=orcpt,
                meta=meta,
                send_at=send_at,
                suppressed=suppressed,
                stream=stream,
                campaign=tuple(campaign) if campaign else None,
            )
        )
    return request, msgs, guard


class SpoolLink:
    """The ingress end: ``store(msgs)`` resolves once the queue process has them on disk."""

    def __init__(self, on_serve: Callable[[], None], on_reload: Callable[[], str]) -> None:
        self.on_serve, self.on_reload = on_serve, on_reload
        self.channel = Channel(self._frame, self._lost)
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.lost = asyncio.Event()
        self._next = 0

    def store(self, msgs: list[NewMessage], guard: Guard | None = None) -> asyncio.Future[Any]:
        """Resolves to None once the batch is durable, or to what ``guard`` found instead (an
        earlier answer to the same idempotent request: nothing stored)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.lost.is_set():
            fut.set_exception(ConnectionError("the queue process is gone"))
            return fut
        self._next += 1
        self.pending[self._next] = fut
        texts = [part for m in msgs for part in (m.head, m.body)]
        self.channel.send(messages_frame(self._next, msgs, guard), tuple(texts))
        return fut

    def _frame(self, frame: tuple) -> None:
        if frame[0] == STORED:
            for request, error, answer in frame[1]:
                fut = self.pending.pop(request, None)
                if fut is None or fut.done():
                    continue
                if error.startswith(FULL_MARK):
                    fut.set_exception(SpoolFull(error.removeprefix(FULL_MARK)))
                elif error:
                    fut.set_exception(OSError(error))
                else:
                    fut.set_result(answer)
        elif frame[0] == RELOAD:
            self.channel.send((RELOADED, self.on_reload()))
        elif frame[0] == SERVE:
            self.on_serve()
        elif frame[0] == PING:
            self.channel.send((PONG, frame[1]))

    def serving(self) -> None:
        self.channel.send((SERVING,))

    def _lost(self) -> None:
        self.lost.set()
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("the queue process is gone"))
        self.pending.clear()


class IngressLink:
    """The queue end: stores each message that arrives and reports when it is durable."""

    def __init__(
        self,
        store: Callable[[list[NewMessage], Guard | None], asyncio.Future[Any]],
        on_serving: Callable[[], None],
        on_reloaded: Callable[[str], None],
        on_lost: Callable[[], None],
    ) -> None:
        self.store, self.on_serving, self.on_reloaded = store, on_serving, on_reloaded
        self.channel = Channel(self._frame, on_lost)
        self._done: list[tuple[int, str, Any]] = []
        self.pinged = self.ponged = time.monotonic()  # the last PING's stamp, its answer's time
        self.lag = 0.0  # the last PING's round trip: how late the ingress loop answers

    def ping(self) -> None:
        """Ask the ingress process to answer (relayd.metrics.health looks at ``ponged``)."""
        self.pinged = time.monotonic()
        self.channel.send((PING, self.pinged))

    def serve(self) -> None:
        self.channel.send((SERVE,))

    def reload(self) -> None:
        self.channel.send((RELOAD,))

    def _frame(self, frame: tuple) -> None:
        if frame[0] == MESSAGES:
            request, msgs, guard = messages_of(frame)
            self.store(msgs, guard).add_done_callback(functools.partial(self._stored, request))
        elif frame[0] == RELOADED:
            self.on_reloaded(frame[1])
        elif frame[0] == SERVING:
            self.on_serving()
        elif frame[0] == PONG:
            self.ponged = time.monotonic()
            self.lag = self.ponged - frame[1]

    def _stored(self, request: int, fut: asyncio.Future[Any]) -> None:
        answer = None
        if fut.cancelled():
            error = "cancelled"
        else:
            exc = fut.exception()
            error = "" if exc is None else f"{FULL_MARK if is_full(exc) else ''}{exc!r}"
            answer = fut.result() if exc is None else None
        if not self._done:
            asyncio.get_running_loop().call_soon(self._report)
        self._done.append((request, error, answer))

    def _report(self) -> None:
        """Every commit settled in the last turn, in one frame sent at once: each turn of delay
        here is a turn of delay for the client's 250."""
        done, self._done = self._done, []
        self.channel.send((STORED, done))
        self.channel.flush()
