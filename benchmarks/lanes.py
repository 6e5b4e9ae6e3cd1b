"""Issue 10, point 13, first row: transactional mail does not wait behind a bulk backlog.

    .venv/bin/python benchmarks/lanes.py [--bulk 100000] [--rate 500] [--tx-rate 5] [--seconds 60]

relayd (a fresh spool in a temp dir) routes everything to one destination, benchmarks/sink.py,
limited to --rate messages per second ([shaping.default] max_rate). --bulk personalised
messages are queued through the HTTP API with a key whose stream is bulk (benchmarks/api_load.py
batch: calls of 1,000 recipients, 4 in flight), and drain at that rate. Once they are all
queued, transactional messages are sent at --tx-rate per second for --seconds, alternately over
the API (a key of the default stream) and over SMTP, each at most one in flight. The figure is
each transactional message's latency: its arrival at the sink (sink.py's time) minus its
acceptance (the moment the 202 or 250 came back), p50 / p99 / max; the target is p99 <= 1 s.
Also reported: the bulk backlog when the transactional mail started and when it ended (it must
not have drained: else there was nothing to wait behind) and the bulk rate at the sink meanwhile.

Only 127.0.0.1; every wait bounded (--max-seconds); everything started here is stopped on exit.
The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import re
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv" / "bin" / "python")
_QUEUED = re.compile(r"queued as ([0-9A-Za-z]+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, deadline: float, proc: subprocess.Popen[bytes]) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"exited {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def arrivals(path: Path) -> dict[str, float]:
    """sink.py's file: queue id -> arrival time (the first, should one arrive twice)."""
    seen: dict[str, float] = {}
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[1] != "-":
                seen.setdefault(parts[1], float(parts[0]))
    return seen


def api_send(port: int, token: str, i: int) -> str:
    body = {
        "from": "app@x.test",
        "to": [f"reset{i}@y.test"],
        "subject": "Your password reset code",
        "text": f"Your code is {i:06d}.\n",
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(
        "POST",
        "/v1/messages",
        json.dumps(body).encode(),
        {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    conn.close()
    if resp.status != 202:
        raise SystemExit(f"transactional API send refused: {resp.status} {answer}")
    return answer["results"][0]["message_id"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="relayd-lanes-"))
    smtp_port, api_port, sink_port = free_port(), free_port(), free_port()
    config = f"""
[server]
hostname = "relay.bench"
spool_path = "spool.sqlite"
log_level = "warning"
[[listeners]]
address = "127.0.0.1:{smtp_port}"
kind = "relay"
[[listeners]]
address = "127.0.0.1:{api_port}"
kind = "http"
[auth]
users_file = "users.json"
[ingress]
trusted_networks = ["127.0.0.0/8"]
[routes]
"*" = "127.0.0.1:{sink_port}"
[shaping.default]
max_connections = 20
max_connections_per_source = 20
max_messages_per_connection = 1000
max_rate = "{args.rate}/s"
transactional_connections = 2
"""
    conf = work / "relayd.toml"
    conf.write_text(config)
    ctl = [PY, "-m", "relayd.ctl", "--config", str(conf)]
    tokens = {}
    for name, extra in (("bulk", ["--stream", "bulk"]), ("app", [])):
        out = subprocess.run(
            [*ctl, "key", "add", name, "--sender", "x.test", *extra],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout
        tokens[name] = next(line for line in out.splitlines() if line.startswith("rk_"))
    started: list[subprocess.Popen[bytes]] = []
    log = (work / "relayd.log").open("wb")
    out_file = work / "arrivals.txt"
    try:
        sink = subprocess.Popen(
            [
                PY,
                str(ROOT / "benchmarks" / "sink.py"),
                "--port",
                str(sink_port),
                "--out",
                str(out_file),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(sink)
        wait_port(sink_port, time.monotonic() + 30, sink)
        relayd = subprocess.Popen(
            [PY, "-m", "relayd", "--config", str(conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        started.append(relayd)
        wait_port(api_port, time.monotonic() + 30, relayd)
        deadline = time.monotonic() + args.max_seconds
        t0 = time.monotonic()
        inject = subprocess.run(
            [
                PY,
                str(ROOT / "benchmarks" / "api_load.py"),
                "batch",
                f"http://127.0.0.1:{api_port}",
                tokens["bulk"],
                "--messages",
                str(args.bulk),
                "--batch",
                "1000",
                "--concurrency",
                "4",
                "--max-seconds",
                str(args.max_seconds),
            ],
            capture_output=True,
            text=True,
            timeout=args.max_seconds + 60,
            check=False,
            cwd=ROOT,
        )
        if inject.returncode != 0:
            raise SystemExit(f"api_load.py batch failed: {inject.stderr.strip()[-400:]}")
        injected = json.loads(inject.stdout.strip().splitlines()[-1])
        if injected["failures"]:
            raise SystemExit(f"bulk injection: {injected['failures']} failed calls")
        inject_s = time.monotonic() - t0
        bulk_at_start = len(arrivals(out_file))
        sent: list[tuple[str, float, str]] = []  # queue id, accepted at (wall clock), door
        t_start = time.monotonic()
        for i in range(int(args.seconds * args.tx_rate)):
            due = t_start + i / args.tx_rate
            if time.monotonic() > deadline:
                raise SystemExit("out of time sending the transactional mail")
            time.sleep(max(0.0, due - time.monotonic()))
            if i % 2:
                with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
                    client.ehlo("app.bench")
                    client.mail("app@x.test")
                    client.rcpt(f"login{i}@y.test")
                    code, reply = client.data(
                        f"From: app@x.test\r\nSubject: Your login code\r\n\r\n{i:06d}\r\n".encode()
                    )
                    at = time.time()
                if code != 250:
                    raise SystemExit(f"transactional SMTP send refused: {code} {reply!r}")
                match = _QUEUED.search(reply.decode())
                assert match is not None, reply
                sent.append((match.group(1), at, "smtp"))
            else:
                qid = api_send(api_port, tokens["app"], i)
                sent.append((qid, time.time(), "api"))
        t_end = time.monotonic()
        tx = {qid for qid, _, _ in sent}
        while time.monotonic() < min(deadline, t_end + 30):
            seen = arrivals(out_file)
            if tx <= seen.keys():
                break
            time.sleep(0.1)
        seen = arrivals(out_file)
        missing = sorted(tx - seen.keys())
        bulk_seen = len(seen.keys() - tx)
        window = t_end - t_start
        bulk_in_window = bulk_seen - bulk_at_start
        latencies = sorted(seen[qid] - at for qid, at, _ in sent if qid in seen)
        if len(latencies) < 2:
            raise SystemExit(f"too few transactional arrivals ({len(latencies)}; kept {work})")
        q = statistics.quantiles(latencies, n=100, method="inclusive")
        by_door = {
            door: round(
                statistics.median(
                    seen[qid] - at for qid, at, d in sent if d == door and qid in seen
                ),
                3,
            )
            for door in ("api", "smtp")
        }
        return {
            "bulk": args.bulk,
            "rate": args.rate,
            "inject_s": round(inject_s, 1),
            "inject_per_s": round(args.bulk / injected["seconds"]),
            "tx_sent": len(sent),
            "tx_missing": len(missing),
            "p50_s": round(q[49], 3),
            "p99_s": round(q[98], 3),
            "max_s": round(latencies[-1], 3),
            "p50_by_door_s": by_door,
            "backlog_at_start": args.bulk - bulk_at_start,
            "backlog_at_end": args.bulk - bulk_seen,
            "bulk_per_s_meanwhile": round(bulk_in_window / window),
            "seconds": round(window, 1),
        }
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
    p.add_argument("--bulk", type=int, default=100_000, help="bulk messages queued first")
    p.add_argument("--rate", type=int, default=500, help="the destination's max_rate, per second")
    p.add_argument("--tx-rate", type=float, default=5.0, help="transactional messages per second")
    p.add_argument(
        "--seconds", type=float, default=60.0, help="how long transactional mail is sent"
    )
    p.add_argument("--max-seconds", type=float, default=600)
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = p.parse_args(argv)
    r = run(args)
    print(
        f"lanes: {args.bulk:,} bulk messages at {args.rate}/s, transactional at {args.tx_rate}/s"
        f" for {args.seconds:.0f} s: latency p50 {r['p50_s']} s, p99 {r['p99_s']} s"
        f" (target p99 <= 1 s); backlog {r['backlog_at_start']:,} -> {r['backlog_at_end']:,}"
    )
    print(json.dumps(r))
    ok = r["p99_s"] <= 1 and not r["tx_missing"] and r["backlog_at_end"] > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
