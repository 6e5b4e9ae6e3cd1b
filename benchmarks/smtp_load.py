"""An SMTP load client that records which messages were acknowledged (benchmarks/suite.py, row 10).

    .venv/bin/python benchmarks/smtp_load.py --port 2567 --n 20000 --acks acks.txt

Sends --n messages of about --size bytes, --concurrency sessions at a time, one new connection
per message (as smtp-source does by default); --rate paces the starts (message I not before
I / RATE seconds in), and --rcpt names each recipient ("{i}": the message's number, "{d}": it
modulo --domains). Each message has its own Message-ID <PREFIX-I@x.test>. A message whose
transaction fails (connection refused or reset, timeout, any reply other than the expected one)
is sent again, same Message-ID, after a short pause, up to --max-tries times, as an MTA client
would. Every 250 after DATA appends, flushed at once:

    ack <unix time> <Message-ID> <queue id from "queued as ...">

and every failed try:

    fail <unix time> <Message-ID> <try> <reason>

to --acks. At the end one line on stdout: acked=... failed_tries=... given_up=... seconds=...
Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
import time
from typing import TextIO

import uvloop

_QUEUED = re.compile(r"queued as (\S+)")


class Failure(Exception):
    pass


async def reply(reader: asyncio.StreamReader, timeout: float) -> tuple[int, str]:
    """One (possibly multi-line) SMTP reply: its code and its last line."""
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise Failure("connection closed")
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        if len(text) < 3 or not text[:3].isdigit():
            raise Failure(f"bad reply {text!r}")
        if len(text) == 3 or text[3] != "-":
            return int(text[:3]), text


async def transaction(
    host: str, port: int, sender: str, rcpt: str, data: bytes, timeout: float
) -> str:
    """One session, one message; returns the 250 reply after DATA."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:

        async def command(line: bytes, expect: int) -> str:
            writer.write(line)
            code, text = await reply(reader, timeout)
            if code != expect:
                raise Failure(f"{line[:4].decode().strip()}: {text}")
            return text

        code, text = await reply(reader, timeout)
        if code != 220:
            raise Failure(f"greeting: {text}")
        await command(b"EHLO client.bench\r\n", 250)
        await command(f"MAIL FROM:<{sender}>\r\n".encode(), 250)
        await command(f"RCPT TO:<{rcpt}>\r\n".encode(), 250)
        await command(b"DATA\r\n", 354)
        final = await command(data + b".\r\n", 250)
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(TimeoutError, OSError):
            await asyncio.wait_for(reader.read(), 2)
        return final
    finally:
        writer.close()


def message(prefix: str, i: int, size: int) -> tuple[str, bytes]:
    mid = f"<{prefix}-{i}@x.test>"
    head = (
        f"From: <a@x.test>\r\nTo: <b@y.test>\r\nSubject: bench {prefix} {i}\r\n"
        f"Message-ID: {mid}\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\n"
    ).encode()
    line = b"X" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return mid, head + body


async def run(args: argparse.Namespace, out: TextIO) -> dict[str, float]:
    todo: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.n):
        todo.put_nowait(i)
    stats = {"acked": 0, "failed_tries": 0, "given_up": 0}
    deadline = time.monotonic() + args.deadline

    t_start = time.monotonic()

    async def worker() -> None:
        while not todo.empty() and time.monotonic() < deadline:
            i = todo.get_nowait()
            if args.rate > 0:
                await asyncio.sleep(max(0.0, t_start + i / args.rate - time.monotonic()))
            mid, data = message(args.prefix, i, args.size)
            rcpt = args.rcpt.format(i=i, d=i % args.domains)
            for attempt in range(1, args.max_tries + 1):
                try:
                    final = await transaction(
                        args.host, args.port, "a@x.test", rcpt, data, args.timeout
                    )
                except (Failure, OSError, TimeoutError) as exc:
                    reason = re.sub(r"\s+", "_", f"{type(exc).__name__}:{exc}")[:120]
                    out.write(f"fail {time.time():.6f} {mid} {attempt} {reason}\n")
                    out.flush()
                    stats["failed_tries"] += 1
                    if time.monotonic() >= deadline:
                        break
                    await asyncio.sleep(min(0.1 * attempt, 1.0))
                    continue
                m = _QUEUED.search(final)
                out.write(f"ack {time.time():.6f} {mid} {m.group(1) if m else '-'}\n")
                out.flush()
                stats["acked"] += 1
                break
            else:
                stats["given_up"] += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    stats["given_up"] += todo.qsize()
    stats["seconds"] = round(time.monotonic() - t0, 3)
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s; 0 = unpaced")
    parser.add_argument("--rcpt", default="b@y.test", help='recipient; "{i}" = message number')
    parser.add_argument("--domains", type=int, default=1, help='for "{d}" in --rcpt')
    parser.add_argument("--prefix", default=f"load{int(time.time())}")
    parser.add_argument("--acks", required=True, help="file to append ack/fail lines to")
    parser.add_argument("--max-tries", type=int, default=60)
    parser.add_argument("--timeout", type=float, default=30.0, help="per command, seconds")
    parser.add_argument("--deadline", type=float, default=600.0, help="whole run, seconds")
    args = parser.parse_args()
    if not (args.host.startswith("127.") or args.host == "::1"):
        parser.error("loopback only")
    with open(args.acks, "a", encoding="utf-8") as out:
        stats = uvloop.run(run(args, out))
    print(" ".join(f"{k}={v}" for k, v in stats.items()))
    return 0 if stats["given_up"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
