"""The hand-off between relayd's two processes: accepted mail from ingress to the spool.

relayd runs as two processes so that it uses two cores: the ingress process speaks SMTP to
clients (policy, headers) and the queue process signs (DKIM), owns the spool, the scheduler and
delivery. Ingress sends each message over a socketpair; the queue process stores it with group
commit and answers once the commit is durable; only then does ingress reply 250. The queue
process is the spool's only writer, as before.

Frames: a 4-byte big-endian length, then a marshalled tuple whose first item names the kind.
marshal is the fastest codec for tuples of str/bytes/int and both ends run the same relayd.
Frames written in one turn of the event loop go out in one system call. A message's text is not
marshalled: its frame ends with the text's length and the raw bytes follow the frame (the trace
headers, then the text as read), so neither end copies the text to frame it, and the queue
process gets the headers and text joined in the one copy it makes on receipt.
"""

from __future__ import annotations

import asyncio
import functools
import marshal
from collections.abc import Callable

from relayd.model.message import NewMessage
from relayd.spool.space import FULL_MARK, SpoolFull, is_full

_HEADER = 4
_MARSHAL_VERSION = 4

# ingress -> queue
MESSAGE = "m"  # (MESSAGE, request id, *fields of NewMessage, text length) + the raw text
RELOADED = "r"  # (RELOADED, error or ""): ingress applied (or refused) a reload
SERVING = "l"  # (SERVING,): the listeners are open
# queue -> ingress
SERVE = "L"  # (SERVE,): the queue process is ready, open the listeners
STORED = "s"  # (STORED, [(request id, error or ""), ...])
RELOAD = "R"  # (RELOAD,): reload the config file


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
                need = frame[-1] if frame[0] == MESSAGE else -1
                if need < 0:
                    frames.append(frame)
                elif size - pos >= need:
                    frames.append((*frame[:-1], bytes(inbox[pos : pos + need])))
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


def message_frame(request: int, msg: NewMessage) -> tuple:
    """The frame of a message without its text; it ends with the text's length."""
    return (
        MESSAGE,
        request,
        msg.queue_id,
        msg.sender,
        msg.recipients,
        msg.client,
        msg.helo,
        msg.origin,
        msg.smtputf8,
        msg.received_at,
        msg.envid,
        msg.ret,
        msg.notify,
        msg.orcpt,
        msg.meta,
        msg.send_at,
        len(msg.head) + len(msg.body),
    )


def message_of(frame: tuple) -> tuple[int, NewMessage]:
    """The message of a received frame (its text, joined to the frame, is the last item)."""
    (_, request, queue_id, sender, rcpts, client, helo, origin, utf8, received) = frame[:10]
    envid, ret, notify, orcpt, meta, send_at, body = frame[10:]
    msg = NewMessage(
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
    )
    return request, msg


class SpoolLink:
    """The ingress end: ``store(msg)`` resolves once the queue process has it on disk."""

    def __init__(self, on_serve: Callable[[], None], on_reload: Callable[[], str]) -> None:
        self.on_serve, self.on_reload = on_serve, on_reload
        self.channel = Channel(self._frame, self._lost)
        self.pending: dict[int, asyncio.Future[None]] = {}
        self.lost = asyncio.Event()
        self._next = 0

    def store(self, msg: NewMessage) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.lost.is_set():
            fut.set_exception(ConnectionError("the queue process is gone"))
            return fut
        self._next += 1
        self.pending[self._next] = fut
        self.channel.send(message_frame(self._next, msg), (msg.head, msg.body))
        return fut

    def _frame(self, frame: tuple) -> None:
        if frame[0] == STORED:
            for request, error in frame[1]:
                fut = self.pending.pop(request, None)
                if fut is None or fut.done():
                    continue
                if error.startswith(FULL_MARK):
                    fut.set_exception(SpoolFull(error.removeprefix(FULL_MARK)))
                elif error:
                    fut.set_exception(OSError(error))
                else:
                    fut.set_result(None)
        elif frame[0] == RELOAD:
            self.channel.send((RELOADED, self.on_reload()))
        elif frame[0] == SERVE:
            self.on_serve()

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
        store: Callable[[NewMessage], asyncio.Future[NewMessage]],
        on_serving: Callable[[], None],
        on_reloaded: Callable[[str], None],
        on_lost: Callable[[], None],
    ) -> None:
        self.store, self.on_serving, self.on_reloaded = store, on_serving, on_reloaded
        self.channel = Channel(self._frame, on_lost)
        self._done: list[tuple[int, str]] = []

    def serve(self) -> None:
        self.channel.send((SERVE,))

    def reload(self) -> None:
        self.channel.send((RELOAD,))

    def _frame(self, frame: tuple) -> None:
        if frame[0] == MESSAGE:
            request, msg = message_of(frame)
            self.store(msg).add_done_callback(functools.partial(self._stored, request))
        elif frame[0] == RELOADED:
            self.on_reloaded(frame[1])
        elif frame[0] == SERVING:
            self.on_serving()

    def _stored(self, request: int, fut: asyncio.Future[NewMessage]) -> None:
        if fut.cancelled():
            error = "cancelled"
        else:
            exc = fut.exception()
            error = "" if exc is None else f"{FULL_MARK if is_full(exc) else ''}{exc!r}"
        if not self._done:
            asyncio.get_running_loop().call_soon(self._report)
        self._done.append((request, error))

    def _report(self) -> None:
        """Every commit settled in the last turn, in one frame sent at once: each turn of delay
        here is a turn of delay for the client's 250."""
        done, self._done = self._done, []
        self.channel.send((STORED, done))
        self.channel.flush()
