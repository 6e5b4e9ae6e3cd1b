"""A recording SMTP sink for benchmarks/suite.py (restart and fault rows).

    .venv/bin/python benchmarks/sink.py --port 2569 --out arrivals.txt

Accepts every message (250) and appends one line per message to --out, flushed at once:

    <arrival unix time> <relayd queue id or -> <Message-ID or ->

With --defer-percent / --bounce-percent (benchmarks/soak.py) a share of recipients, chosen by a
hash of the address (`fate`, so that the benchmark knows which), gets 451 4.3.0 at RCPT the
first time and 250 on the retry, or 550 5.1.1 every time; each such answer is one line:

    rcpt <unix time> <address> <451|550>

The queue id is the one in relayd's Received header ("(relayd) with ESMTP id QID;"), so that a
message delivered twice by relayd (same queue id) can be told from one the client sent twice
(same Message-ID, two queue ids). smtp-sink only counts; this sink says which message arrived.
Loopback only. SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import time
import zlib
from typing import Any, TextIO

import uvloop
from aiosmtpd.smtp import SMTP

_QID = re.compile(rb"\(relayd\) with [A-Z0-9]+ id ([0-9A-Za-z]+);")
_MID = re.compile(rb"^message-id:[ \t]*(<[^>\r\n]*>)", re.I | re.M)


def fate(rcpt: str, defer_percent: float, bounce_percent: float) -> str:
    """What the sink does with ``rcpt``: "defer" (451 once), "bounce" (550) or "accept"; a
    stable hash, so the benchmark can count what to expect without asking the sink."""
    slot = zlib.crc32(rcpt.lower().encode()) % 10_000 / 100
    if slot < defer_percent:
        return "defer"
    return "bounce" if slot < defer_percent + bounce_percent else "accept"


class Recorder:
    def __init__(
        self, out: TextIO, defer_percent: float = 0.0, bounce_percent: float = 0.0
    ) -> None:
        self.out = out
        self.defer_percent, self.bounce_percent = defer_percent, bounce_percent
        self.deferred: set[str] = set()

    async def handle_RCPT(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        what = fate(address, self.defer_percent, self.bounce_percent)
        if what == "defer" and address not in self.deferred:
            self.deferred.add(address)
            self.out.write(f"rcpt {time.time():.6f} {address} 451\n")
            self.out.flush()
            return "451 4.3.0 Try again later"
        if what == "bounce":
            self.out.write(f"rcpt {time.time():.6f} {address} 550\n")
            self.out.flush()
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        data: bytes = envelope.original_content or envelope.content or b""
        end = data.find(b"\r\n\r\n")
        head = data if end < 0 else data[: end + 2]
        qid = _QID.search(head)
        mid = _MID.search(head)
        self.out.write(
            f"{time.time():.6f} {qid.group(1).decode() if qid else '-'} "
            f"{mid.group(1).decode('ascii', 'replace') if mid else '-'}\n"
        )
        self.out.flush()
        return "250 2.0.0 Ok"


async def serve(host: str, port: int, out: TextIO, defer: float, bounce: float) -> None:
    loop = asyncio.get_running_loop()
    recorder = Recorder(out, defer, bounce)
    server = await loop.create_server(
        lambda: SMTP(recorder, hostname="sink.bench", ident="bench sink"),
        host,
        port,
        reuse_address=True,
        backlog=1024,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--defer-percent", type=float, default=0.0, help="451 once, by hash")
    parser.add_argument("--bounce-percent", type=float, default=0.0, help="550 5.1.1, by hash")
    args = parser.parse_args()
    if not (args.host.startswith("127.") or args.host == "::1"):
        parser.error("loopback only")
    logging.getLogger("mail.log").setLevel(logging.CRITICAL)
    with open(args.out, "a", encoding="utf-8") as out:
        uvloop.run(serve(args.host, args.port, out, args.defer_percent, args.bounce_percent))


if __name__ == "__main__":
    main()
