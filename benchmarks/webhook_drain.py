"""Issue 9, row 13c: webhook delivery keeps up with mail delivery.

    .venv/bin/python benchmarks/webhook_drain.py [--messages 20000] [--sessions 50] [--batch 100]

smtp-source sends N messages to relayd (a fresh spool in a temp dir), which relays them to
smtp-sink; a webhook endpoint subscribed to `delivered` events with batch B receives them on
127.0.0.1 (http.server in this process; every POST verified with the standardwebhooks package).
The figure is the drain: from the moment the spool holds the last `delivered` event to the
moment the receiver has all N of them (target: within 5 s). Also reported: the largest lag seen
during the run (delivered but not yet received), and with --compare the same load without an
endpoint, so that a slowdown of delivery would show.

Needs smtp-source and smtp-sink (Debian's postfix package). Only 127.0.0.1; every wait bounded
(--max-seconds); everything started here is stopped on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from standardwebhooks import Webhook

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv" / "bin" / "python")


class Counter:
    """The receiver: counts verified delivered events, and answers 200 at once."""

    def __init__(self) -> None:
        self.secret = ""
        self.ids: set[int] = set()
        self.posts = 0
        self.bad = 0
        self.lock = threading.Lock()
        counter = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                try:
                    data = Webhook(counter.secret).verify(body, dict(self.headers.items()))
                except Exception:
                    data = None
                with counter.lock:
                    counter.posts += 1
                    if data is None:
                        counter.bad += 1
                    else:
                        events = data["data"]["events"] if data["type"] == "batch" else [data]
                        counter.ids.update(int(e["id"][4:]) for e in events)
                self.send_response(200 if data is not None else 400)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def received(self) -> int:
        with self.lock:
            return len(self.ids)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, deadline: float, proc: subprocess.Popen[bytes]) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"relayd exited {proc.returncode}")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def delivered(spool: Path, state: dict[str, int]) -> int:
    """Delivered events in the spool so far (read incrementally, read-only)."""
    conn = sqlite3.connect(f"{spool.as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute(
            "SELECT id, type FROM events WHERE id > ? ORDER BY id", (state["after"],)
        ).fetchall()
    finally:
        conn.close()
    if rows:
        state["after"] = rows[-1][0]
        state["count"] += sum(1 for _, kind in rows if kind == "delivered")
    return state["count"]


def run(args: argparse.Namespace, webhook: bool) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="relayd-13c-"))
    port, sink_port = free_port(), free_port()
    config = f"""
[server]
hostname = "relay.bench"
spool_path = "spool.sqlite"
log_level = "warning"
[[listeners]]
address = "127.0.0.1:{port}"
kind = "relay"
[ingress]
trusted_networks = ["127.0.0.0/8"]
[routes]
"*" = "127.0.0.1:{sink_port}"
[shaping.default]
max_connections = 50
max_connections_per_source = 50
max_messages_per_connection = 1000
[webhooks]
poll_interval = "{args.poll}"
"""
    (work / "relayd.toml").write_text(config)
    sink_cmd = ["smtp-sink", "-c", "-m", "512", f"127.0.0.1:{sink_port}", "1000"]
    if os.geteuid() == 0:
        sink_cmd[1:1] = ["-u", "nobody"]
    started: list[subprocess.Popen[bytes]] = []
    log = (work / "relayd.log").open("wb")
    try:
        sink = subprocess.Popen(sink_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(sink)
        relayd = subprocess.Popen(
            [PY, "-m", "relayd", "--config", str(work / "relayd.toml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        started.append(relayd)
        wait_port(port, time.monotonic() + 30, relayd)
        counter = Counter()
        if webhook:
            ctl = [PY, "-m", "relayd.ctl", "--config", str(work / "relayd.toml"), "--json"]
            add = ["webhook", "add", counter.url, "--events", "delivered", "--batch"]
            out = subprocess.run(
                [*ctl, *add, str(args.batch), "--concurrency", str(args.concurrency)],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
            counter.secret = json.loads(out.stdout)["secret"]
        deadline = time.monotonic() + args.max_seconds
        t0 = time.monotonic()
        load = ["-s", str(args.sessions), "-l", str(args.size), "-m", str(args.messages)]
        envelope = ["-f", "a@x.test", "-t", "b@y.test", f"127.0.0.1:{port}"]
        source = subprocess.Popen(
            ["smtp-source", *args.source_flags.split(), *load, *envelope],
            stdout=subprocess.DEVNULL,
        )
        started.append(source)
        state = {"after": 0, "count": 0}
        lag = 0
        t_delivered = t_drained = None
        while time.monotonic() < deadline:
            done = delivered(work / "spool.sqlite", state)
            now = time.monotonic()
            if webhook:
                lag = max(lag, done - counter.received())
            if done >= args.messages and t_delivered is None:
                t_delivered = now
            if t_delivered is not None and (not webhook or counter.received() >= args.messages):
                t_drained = now
                break
            time.sleep(0.05)
        source.wait(10)
        if t_delivered is None or t_drained is None:
            raise SystemExit(f"not done within {args.max_seconds}s (kept {work})")
        result = {
            "webhook": webhook,
            "messages": args.messages,
            "delivered_s": round(t_delivered - t0, 2),
            "msgs_per_s": round(args.messages / (t_delivered - t0)),
        }
        if webhook:
            result |= {
                "drain_s": round(t_drained - t_delivered, 2),
                "max_lag_events": lag,
                "posts": counter.posts,
                "bad_signatures": counter.bad,
                "received": counter.received(),
            }
        return result
    finally:
        for proc in reversed(started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(40)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        log.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--poll", default="500ms", help="webhooks.poll_interval")
    p.add_argument("--source-flags", default="", help='extra smtp-source flags, e.g. "-d"')
    p.add_argument("--compare", action="store_true", help="also run without an endpoint first")
    p.add_argument("--max-seconds", type=float, default=300)
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = p.parse_args(argv)
    for tool in ("smtp-source", "smtp-sink"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (Debian: apt-get install postfix)")
    results = [run(args, False)] if args.compare else []
    results.append(run(args, True))
    for r in results:
        print(json.dumps(r))
    hooked = results[-1]
    print(
        f"13c: {args.messages} messages, webhook batch {args.batch}: backlog drained"
        f" {hooked['drain_s']} s after the last delivery (target <= 5 s)"
    )
    return 0 if hooked["drain_s"] <= 5 and not hooked["bad_signatures"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
