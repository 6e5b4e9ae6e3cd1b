"""benchmarks/api_load.py - drive relayd's HTTP sending API (rows 13a, 13b).

    api_load.py batch URL KEY --messages 100000 --batch 1000 --concurrency 4
    api_load.py rate URL KEY --rate 200 --seconds 20

"batch": personalised sends of --batch recipients each (one message per recipient, a few
substitutions each), --concurrency requests in flight, until --messages are queued; prints
one JSON line: messages, seconds until the last 202, per-request latencies.
"rate": single-message sends opened at a fixed --rate (an open loop: a slow answer does not
slow the next request), for --seconds; prints the latency percentiles of the answers.

Every loop is bounded (--messages, --seconds, and --max-seconds overall); loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from urllib.parse import urlparse

import aiohttp

TEXT = (
    "Hello {{ first }},\n\nYour order {{ order }} has shipped and should arrive on {{ day }}.\n"
    "Track it at https://shop.example.test/track/{{ order }}\n\nThanks for shopping with us.\n"
)
HTML = (
    "<html><body><p>Hello <b>{{ first }}</b>,</p><p>Your order <a href='https://shop.example"
    ".test/track/{{ order }}'>{{ order }}</a> has shipped and should arrive on {{ day }}.</p>"
    "<p>Thanks for shopping with us.</p></body></html>"
)


def batch_body(start: int, size: int) -> bytes:
    return json.dumps(
        {
            "from": {"email": "news@x.test", "name": "Shop"},
            "recipients": [
                {
                    "email": f"user{start + i}@y.test",
                    "substitutions": {"first": f"User{start + i}", "order": f"A{start + i:07d}"},
                }
                for i in range(size)
            ],
            "substitutions": {"day": "Friday"},
            "subject": "Your order {{ order }} has shipped",
            "text": TEXT,
            "html": HTML,
            "tags": ["shipping"],
        }
    ).encode()


def single_body(i: int) -> bytes:
    return json.dumps(
        {
            "from": "news@x.test",
            "to": [f"user{i}@y.test"],
            "subject": f"Receipt {i}",
            "text": f"Thanks for your order {i}.\n",
        }
    ).encode()


def _check(url: str) -> None:
    host = urlparse(url).hostname or ""
    if not (host.startswith("127.") or host in ("::1", "localhost")):
        sys.exit("api_load.py: loopback only")


async def run_batch(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.key}", "Content-Type": "application/json"}
    bodies = [
        batch_body(start, min(args.batch, args.messages - start))
        for start in range(0, args.messages, args.batch)
    ]
    latencies: list[float] = []
    failures: list[str] = []
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    deadline = time.monotonic() + args.max_seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty() and time.monotonic() < deadline:
            body = queue.get_nowait()
            t = time.monotonic()
            async with session.post(f"{args.url}/v1/messages", data=body, headers=headers) as r:
                text = await r.read()
                if r.status != 202:
                    failures.append(f"{r.status} {text[:200]!r}")
            latencies.append(time.monotonic() - t)

    t0 = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=args.max_seconds)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(args.concurrency)))
    seconds = time.monotonic() - t0
    return {
        "mode": "batch",
        "messages": args.messages,
        "requests": len(latencies),
        "failures": len(failures),
        "first_failures": failures[:3],
        "seconds": round(seconds, 3),
        "msgs_per_s": round(args.messages / seconds, 1),
        "request_p50_s": round(statistics.median(latencies), 4) if latencies else None,
    }


async def run_rate(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.key}", "Content-Type": "application/json"}
    latencies: list[float] = []
    failures: list[str] = []
    total = int(args.rate * args.seconds)
    interval = 1.0 / args.rate

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        t = time.monotonic()
        try:
            async with session.post(
                f"{args.url}/v1/messages", data=single_body(i), headers=headers
            ) as r:
                await r.read()
                if r.status != 202:
                    failures.append(str(r.status))
        except (aiohttp.ClientError, TimeoutError) as exc:
            failures.append(repr(exc))
        latencies.append(time.monotonic() - t)

    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.monotonic()
        tasks = []
        for i in range(total):  # open loop: each request starts at its time
            delay = t0 + i * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, i)))
        await asyncio.wait(tasks, timeout=args.max_seconds)
        seconds = time.monotonic() - t0
    latencies.sort()

    def pct(p: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 4) or None

    return {
        "mode": "rate",
        "rate": args.rate,
        "requests": len(latencies),
        "failures": len(failures),
        "seconds": round(seconds, 2),
        "p50_s": pct(0.50),
        "p90_s": pct(0.90),
        "p99_s": pct(0.99),
        "max_s": round(latencies[-1], 4) if latencies else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", choices=["batch", "rate"])
    p.add_argument("url", help="e.g. http://127.0.0.1:8025")
    p.add_argument("key", help="an API key with the send scope")
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--max-seconds", type=float, default=600.0)
    args = p.parse_args()
    _check(args.url)
    if not (0 < args.messages <= 1_000_000 and 0 < args.batch <= 10_000):
        sys.exit("api_load.py: --messages 1..1000000, --batch 1..10000")
    if not (0 < args.rate <= 10_000 and 0 < args.seconds <= 600):
        sys.exit("api_load.py: --rate 1..10000, --seconds 1..600")
    result = asyncio.run(run_batch(args) if args.mode == "batch" else run_rate(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
