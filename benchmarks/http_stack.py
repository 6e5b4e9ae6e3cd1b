#!/usr/bin/env python3
"""Which HTTP stack to embed in relayd's ingress for the sending API (POST /v1/messages).

Compares, on loopback, each server in its own subprocess pinned to ONE core with uvloop,
serving on a socket bound by *this* (parent) process and handed in by file descriptor,
inside an already running loop, with the ingress's own SIGTERM handler installed first:

  aiohttp    web.AppRunner(handle_signals=False) + web.SockSite(runner, sock)
  starlette  Starlette app on uvicorn: uvicorn.Server(uvicorn.Config(app, loop="none",
             http="httptools", lifespan="off", ...)).serve(sockets=[sock]) with
             Server.capture_signals overridden (see EmbeddedUvicorn)
  raw        bare asyncio.Protocol + httptools parser: the ceiling, not a candidate

Each stack is run with the stdlib json and with orjson (POST only). The load generator is
Debian's wrk, pinned to the other core. Every load is bounded (REPS x scenarios x stacks
runs of DURATION seconds, each with a hard timeout); traffic only on 127.0.0.1.

    .venv/bin/python benchmarks/http_stack.py                 # 3 reps x 10 s (about 9 min)
    .venv/bin/python benchmarks/http_stack.py --quick         # 1 rep x 3 s
    .venv/bin/python benchmarks/http_stack.py --json /tmp/http_stack.json

Needs: `apt-get install -y wrk` and `pip install aiohttp starlette uvicorn httptools orjson`
in the venv running this script. Prints a Markdown report on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

SERVER_CORE = 0
LOAD_CORE = 1
MAX_BODY = 1024 * 1024  # the API's max request body in every stack (1 MiB)
TOKENS = {"k-" + "a" * 40: "tenant-a", "k-" + "b" * 40: "tenant-b"}
GOOD_TOKEN = "k-" + "a" * 40

# ----------------------------------------------------------------------------- the app


def _request_body() -> bytes:
    """A ~1.5 KB sending-API request, as a client would post it."""
    text = (
        "Hello Ada,\n\nyour invoice INV-2024-0042 for the period 2024-05-01 to 2024-05-31 "
        "is attached. The total of 1,234.56 EUR is due on 2024-06-15. If you have any "
        "questions, reply to this message or call us.\n\nKind regards,\nThe Billing Team\n"
    )
    msg = {
        "from": {"email": "billing@example.com", "name": "Example Billing"},
        "to": [{"email": "ada@example.org", "name": "Ada Lovelace"}],
        "cc": [{"email": "accounts@example.org"}],
        "reply_to": "support@example.com",
        "subject": "Your invoice INV-2024-0042",
        "text": text * 3,
        "html": "<p>" + text.replace("\n", "<br>") + "</p>",
        "headers": {"X-Campaign": "billing-2024-05", "X-Customer": "C-000042"},
        "tags": ["invoice", "monthly"],
        "metadata": {"invoice": "INV-2024-0042", "customer": "C-000042"},
    }
    return json.dumps(msg).encode()


BODY = _request_body()


def make_logic(json_lib: str):
    """The per-request work, identical in every stack: returns handle_post(auth, body)."""
    if json_lib == "orjson":
        import orjson

        loads, dumps = orjson.loads, orjson.dumps
    else:
        _enc = json.JSONEncoder(separators=(",", ":"))
        loads = json.loads

        def dumps(obj):
            return _enc.encode(obj).encode()

    def handle_post(auth: str | None, body: bytes) -> tuple[int, bytes]:
        if not auth or not auth.startswith("Bearer "):
            return 401, b'{"error":"unauthorized"}'
        tenant = TOKENS.get(auth[7:])
        if tenant is None:
            return 401, b'{"error":"unauthorized"}'
        try:
            msg = loads(body)
            sender = msg["from"]["email"]
            rcpts = [r["email"] for r in msg["to"]]
            if not rcpts or not isinstance(msg["subject"], str):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return 422, b'{"error":"invalid message"}'
        mid = uuid.uuid4().hex
        resp = {
            "id": mid,
            "status": "queued",
            "tenant": tenant,
            "from": sender,
            "accepted": rcpts,
            "rejected": [],
            "size": len(body),
            "queued_at": round(time.time(), 3),
            "links": {"self": "/v1/messages/" + mid, "events": "/v1/messages/" + mid + "/events"},
        }
        return 202, dumps(resp)

    return handle_post


HEALTH = b'{"status":"ok"}'

# ----------------------------------------------------------------------------- servers


async def serve_aiohttp(sock: socket.socket, handle_post, ready, stopped: asyncio.Event):
    from aiohttp import web

    async def post(request: web.Request) -> web.Response:
        body = await request.read()  # enforces client_max_size -> 413
        status, out = handle_post(request.headers.get("Authorization"), body)
        return web.Response(body=out, status=status, content_type="application/json")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(body=HEALTH, content_type="application/json")

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/v1/messages", post)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    await web.SockSite(runner, sock, shutdown_timeout=5.0).start()
    ready()
    await stopped.wait()
    await runner.cleanup()  # stop accepting, let in-flight requests finish, close


def _embedded_uvicorn_class():
    import uvicorn

    class EmbeddedUvicorn(uvicorn.Server):
        """uvicorn.Server that leaves the process's signal handlers alone.

        Server.serve() wraps _serve() in capture_signals(), which (uvicorn 0.55) calls
        signal.signal(SIGINT/SIGTERM, self.handle_exit) in the main thread, replacing the
        loop.add_signal_handler() handlers of the embedding process until serve() returns,
        then re-raises the captured signals. Stop it with server.should_exit = True instead.
        """

        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return EmbeddedUvicorn


async def serve_starlette(sock: socket.socket, handle_post, ready, stopped: asyncio.Event):
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def post(request: Request) -> Response:
        body = await request.body()  # max_body_size -> 413
        status, out = handle_post(request.headers.get("authorization"), body)
        return Response(out, status_code=status, media_type="application/json")

    async def healthz(request: Request) -> Response:
        return Response(HEALTH, media_type="application/json")

    app = Starlette(
        routes=[Route("/v1/messages", post, methods=["POST"]), Route("/healthz", healthz)],
        max_body_size=MAX_BODY,
    )
    config = uvicorn.Config(
        app,
        loop="none",
        http="httptools",
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = _embedded_uvicorn_class()(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task  # raise its error
        await asyncio.sleep(0.01)
    ready()
    await stopped.wait()
    server.should_exit = True  # polled every 0.1 s by Server.main_loop
    await task


async def serve_raw(sock: socket.socket, handle_post, ready, stopped: asyncio.Event):
    import httptools

    reasons = {
        200: b"OK",
        202: b"Accepted",
        400: b"Bad Request",
        401: b"Unauthorized",
        404: b"Not Found",
        413: b"Content Too Large",
        422: b"Unprocessable Content",
    }

    class TooLarge(Exception):
        pass

    class Proto(asyncio.Protocol):
        __slots__ = ("auth", "body", "clen", "dead", "parser", "size", "transport", "url")

        def connection_made(self, transport):
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)
            self.dead = False
            self.on_message_begin()

        def on_message_begin(self):
            self.url = b""
            self.auth = None
            self.clen = 0
            self.body = []
            self.size = 0

        def on_url(self, url):
            self.url += url

        def on_header(self, name, value):
            n = name.lower()
            if n == b"authorization":
                self.auth = value.decode("latin-1")
            elif n == b"content-length":
                self.clen = int(value)

        def on_headers_complete(self):
            if self.clen > MAX_BODY:
                raise TooLarge

        def on_body(self, body):
            self.size += len(body)
            if self.size > MAX_BODY:
                raise TooLarge
            self.body.append(body)

        def on_message_complete(self):
            method = self.parser.get_method()
            if self.url == b"/v1/messages" and method == b"POST":
                status, out = handle_post(self.auth, b"".join(self.body))
            elif self.url == b"/healthz" and method == b"GET":
                status, out = 200, HEALTH
            else:
                status, out = 404, b'{"error":"not found"}'
            keep = self.parser.should_keep_alive()
            self.respond(status, out, keep)
            if not keep:
                self.dead = True
                self.transport.close()

        def respond(self, status, out, keep):
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
                % (status, reasons[status], len(out), b"" if keep else b"connection: close\r\n")
                + out
            )

        def data_received(self, data):
            if self.dead:
                return
            try:
                self.parser.feed_data(data)
            except Exception as exc:  # httptools wraps callback errors
                cause = exc.__cause__ or exc.__context__
                too_large = isinstance(exc, TooLarge) or isinstance(cause, TooLarge)
                self.respond(413 if too_large else 400, b'{"error":"bad request"}', False)
                self.dead = True
                self.transport.close()

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Proto, sock=sock)
    ready()
    await stopped.wait()
    server.close()
    await server.wait_closed()


SERVERS = {"aiohttp": serve_aiohttp, "starlette": serve_starlette, "raw": serve_raw}


def child_main(stack: str, json_lib: str, fd: int) -> None:
    """Runs in the server subprocess: pinned, uvloop, pre-bound socket, own SIGTERM handler."""
    import uvloop

    os.sched_setaffinity(0, {SERVER_CORE})
    sock = socket.socket(fileno=fd)
    handle_post = make_logic(json_lib)

    async def main():
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        # The embedding process owns its signals, as relayd's ingress does.
        loop.add_signal_handler(signal.SIGTERM, stopped.set)
        before = signal.getsignal(signal.SIGTERM)

        def ready():
            untouched = signal.getsignal(signal.SIGTERM) is before
            print(f"READY pid={os.getpid()} signals_untouched={untouched}", flush=True)

        await SERVERS[stack](sock, handle_post, ready, stopped)

    uvloop.run(main())


def probe_uvicorn_signals() -> None:
    """Subprocess: does a *plain* uvicorn.Server.serve() replace the loop's SIGTERM handler?"""
    import uvicorn
    import uvloop

    async def app(scope, receive, send):  # pragma: no cover - never called
        pass

    async def main():
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: None)
        before = signal.getsignal(signal.SIGTERM)
        sock = socket.create_server(("127.0.0.1", 0))
        cfg = uvicorn.Config(
            app, loop="none", http="httptools", lifespan="off", log_level="warning"
        )
        for cls in (uvicorn.Server, _embedded_uvicorn_class()):
            server = cls(cfg)
            dup = socket.socket(fileno=os.dup(sock.fileno()))
            task = asyncio.create_task(server.serve(sockets=[dup]))
            while not server.started:
                await asyncio.sleep(0.01)
            during = signal.getsignal(signal.SIGTERM)
            server.should_exit = True
            await task
            after = signal.getsignal(signal.SIGTERM)
            print(
                json.dumps(
                    {
                        "class": cls.__name__,
                        "replaced_during_serve": during is not before,
                        "handler_during": getattr(during, "__qualname__", repr(during)),
                        "restored_after": after is before,
                    }
                )
            )

    uvloop.run(main())


# ----------------------------------------------------------------------------- driver

LUA_POST = """
wrk.method = "POST"
wrk.body = io.open("{body}", "rb"):read("*a")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"
{extra}
"""

LUA_GET = """
wrk.method = "GET"
{extra}
"""

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    return float(m.group(1)) * UNITS[m.group(2)]


def parse_wrk(out: str) -> dict:
    r = {
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
    }
    for q in ("50", "99"):
        m = re.search(rf"^\s+{q}(?:\.000)?%\s+(\S+)", out, re.M)
        r["p" + q] = ms(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["sock_errors"] = sum(map(int, m.groups())) if m else 0
    return r


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def pin_load():
    os.sched_setaffinity(0, {LOAD_CORE})


class Server:
    def __init__(self, stack: str, json_lib: str):
        self.stack, self.json_lib = stack, json_lib
        self.name = stack if json_lib == "json" else f"{stack}+orjson"
        # Bound here, in another process, and handed in: as relayd's supervisor does.
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port = self.sock.getsockname()[1]
        self.proc = subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--serve",
                stack,
                json_lib,
                str(self.sock.fileno()),
            ],
            pass_fds=[self.sock.fileno()],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.sock.close()  # the child owns it now
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"{self.name} did not start: {line!r}")
        self.ready_line = line.strip()

    def stop(self) -> str:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=15)
            took = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return "KILLED (no graceful stop within 15 s)"
        return f"exit {self.proc.returncode} {took:.2f} s after SIGTERM"


def functional_check(srv: Server) -> dict:
    """Correctness before load: 202 + JSON, 401, 200 healthz, and a 2 MiB body vs the 1 MiB cap."""
    import http.client

    res = {}
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    c.request(
        "POST",
        "/v1/messages",
        BODY,
        {"Authorization": "Bearer " + GOOD_TOKEN, "Content-Type": "application/json"},
    )
    r = c.getresponse()
    body = r.read()
    assert r.status == 202 and json.loads(body)["status"] == "queued", (r.status, body)
    res["resp_bytes"] = len(body)
    c.request("POST", "/v1/messages", BODY, {"Authorization": "Bearer nope"})
    r = c.getresponse()
    r.read()
    assert r.status == 401, r.status
    c.request("GET", "/healthz")
    r = c.getresponse()
    r.read()
    assert r.status == 200, r.status
    c.close()

    # Oversized body: headers + 2 MiB sent from a thread while we read the answer.
    big = 2 * MAX_BODY
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    head = (
        f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {GOOD_TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {big}\r\n\r\n"
    ).encode()

    def send():
        with contextlib.suppress(OSError):
            s.sendall(head + b" " * big)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    try:
        data = s.recv(200)
        res["oversize"] = data.split(b"\r\n", 1)[0].decode() or "closed"
    except OSError as exc:
        res["oversize"] = f"reset ({exc.__class__.__name__})"
    s.close()
    t.join(5)
    return res


def run_wrk(srv: Server, scenario: str, duration: int, conns: int, tmp: str) -> dict:
    lua = os.path.join(tmp, f"{scenario}.lua")
    url = f"http://127.0.0.1:{srv.port}"
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "--timeout", "5s", "-s", lua]
    if scenario == "get":
        url += "/healthz"
    else:
        url += "/v1/messages"
    if scenario == "paced":
        cmd[2] = "-c20"  # 20 connections, each waiting 10 ms between requests: <= ~2000 req/s
    cmd.append(url)
    la0 = os.getloadavg()[0]
    c0 = cpu_seconds(srv.proc.pid)
    p = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration + 30, preexec_fn=pin_load
    )
    c1 = cpu_seconds(srv.proc.pid)
    if p.returncode != 0:
        raise RuntimeError(f"wrk failed: {p.stderr}")
    r = parse_wrk(p.stdout)
    r["cpu_ms_per_1k"] = (c1 - c0) * 1000.0 / r["requests"] * 1000.0 if r["requests"] else None
    r["server_cpu_util"] = (c1 - c0) / duration
    r["load1"] = round(max(la0, os.getloadavg()[0]), 2)
    return r


def write_lua(tmp: str) -> None:
    body = os.path.join(tmp, "body.json")
    with open(body, "wb") as f:
        f.write(BODY)
    extras = {
        "post": "",
        "close": 'wrk.headers["Connection"] = "close"',
        "paced": "delay = function() return 10 end",  # ms between requests on a connection
    }
    scripts = {k: LUA_POST.format(body=body, token=GOOD_TOKEN, extra=e) for k, e in extras.items()}
    scripts["get"] = LUA_GET.format(extra="")
    for name, text in scripts.items():
        with open(os.path.join(tmp, f"{name}.lua"), "w") as f:
            f.write(text)


def versions() -> dict:
    from importlib.metadata import version

    pkgs = ("aiohttp", "starlette", "uvicorn", "httptools", "uvloop", "orjson")
    v = {p: version(p) for p in pkgs}
    v["wrk"] = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()[1]
    v["python"] = sys.version.split()[0]
    return v


def fmt_range(vals):
    return f"{statistics.median(vals):,.0f} ({min(vals):,.0f}–{max(vals):,.0f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="1 rep x 3 s")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--probe-signals", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        child_main(a.serve[0], a.serve[1], int(a.serve[2]))
        return 0
    if a.probe_signals:
        probe_uvicorn_signals()
        return 0
    if a.quick:
        a.reps, a.duration = 1, 3
    a.reps = max(1, min(a.reps, 10))
    a.duration = max(1, min(a.duration, 60))
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    if len(os.sched_getaffinity(0)) < 2:
        print("needs 2 cores", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {LOAD_CORE})

    ver = versions()
    probe = [
        json.loads(line)
        for line in subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--probe-signals"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.splitlines()
    ]

    configs = [(s, j) for j in ("json", "orjson") for s in ("aiohttp", "starlette", "raw")]
    # (scenario, which configs): POST keep-alive for every json lib, the rest stdlib json only.
    plan = [("post", configs), ("get", configs[:3]), ("close", configs[:3]), ("paced", configs[:3])]
    servers = {}
    results: dict = {}
    checks = {}
    load_start = os.getloadavg()
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        write_lua(tmp)
        try:
            for s, j in configs:
                srv = Server(s, j)
                servers[srv.name] = srv
                ready = srv.ready_line.split(" ", 2)[2]
                checks[srv.name] = functional_check(srv) | {"ready": ready}
                run_wrk(srv, "post", min(2, a.duration), a.connections, tmp)  # warm-up, discarded
            for rep in range(a.reps):
                for scenario, cfgs in plan:
                    order = cfgs[rep % len(cfgs) :] + cfgs[: rep % len(cfgs)]  # rotate per rep
                    for s, j in order:
                        name = s if j == "json" else f"{s}+orjson"
                        r = run_wrk(servers[name], scenario, a.duration, a.connections, tmp)
                        results.setdefault(scenario, {}).setdefault(name, []).append(r)
                        print(
                            f"rep {rep + 1} {scenario:5} {name:16} {r['rps']:9.0f} req/s "
                            f"p50 {r['p50']:.2f} ms p99 {r['p99']:.2f} ms "
                            f"cpu {r['cpu_ms_per_1k']:.1f} ms/1k non2xx {r['non2xx']} "
                            f"load {r['load1']}",
                            file=sys.stderr,
                            flush=True,
                        )
        finally:
            stops = {name: srv.stop() for name, srv in servers.items()}
    elapsed = time.time() - t_start
    load_end = os.getloadavg()

    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "versions": ver,
                    "results": results,
                    "checks": checks,
                    "stops": stops,
                    "probe": probe,
                    "args": vars(a),
                },
                f,
                indent=1,
            )

    # ---- report
    titles = {
        "post": f"POST /v1/messages, keep-alive, {a.connections} connections",
        "get": f"GET /healthz, keep-alive, {a.connections} connections",
        "close": f"POST /v1/messages, `Connection: close` (new TCP connection per request), "
        f"{a.connections} connections",
        "paced": "POST /v1/messages at a modest rate: 20 connections, "
        "wrk `delay()` 10 ms between requests",
    }
    vstack = {
        "aiohttp": f"aiohttp {ver['aiohttp']}",
        "starlette": f"Starlette {ver['starlette']} / uvicorn {ver['uvicorn']} "
        f"(httptools {ver['httptools']})",
        "raw": f"asyncio.Protocol + httptools {ver['httptools']}",
    }
    ls = "/".join(f"{x:.2f}" for x in load_start)
    le = "/".join(f"{x:.2f}" for x in load_end)
    print(
        f"Run {time.strftime('%Y-%m-%d %H:%M:%S')}: {a.reps} rep(s) x {a.duration} s per run, "
        f"{elapsed:.0f} s in all; Python {ver['python']}, uvloop {ver['uvloop']}, "
        f"orjson {ver['orjson']}, wrk {ver['wrk']}; load average (1/5/15 min) at start {ls}, "
        f"at end {le}.\n"
    )
    for scenario, _ in plan:
        print(f"#### {titles[scenario]}\n")
        print(
            "| stack | json | req/s median (min–max) | p50 ms | p99 ms "
            "| server CPU ms / 1000 req | req per server CPU-second | server core busy "
            "| non-2xx | socket errors | load1 (max) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, runs in results[scenario].items():
            stack, _, jl = name.partition("+")

            def med(k, runs=runs):
                return statistics.median(r[k] for r in runs)

            print(
                f"| {vstack[stack]} | {jl or 'json'} | {fmt_range([r['rps'] for r in runs])} | "
                f"{med('p50'):.2f} | {med('p99'):.2f} | {med('cpu_ms_per_1k'):.1f} | "
                f"{1e6 / med('cpu_ms_per_1k'):,.0f} | "
                f"{med('server_cpu_util'):.0%} | {sum(r['non2xx'] for r in runs)} | "
                f"{sum(r['sock_errors'] for r in runs)} | {max(r['load1'] for r in runs)} |"
            )
        print()
    print("#### Checks\n")
    print(
        "| server | 202 body bytes | 2 MiB body vs 1 MiB cap | signal handlers after start "
        "| graceful stop on SIGTERM |"
    )
    print("|---|---|---|---|---|")
    for name, c in checks.items():
        print(f"| {name} | {c['resp_bytes']} | {c['oversize']} | {c['ready']} | {stops[name]} |")
    print(
        "\nuvicorn signal probe (plain `uvicorn.Server` vs `EmbeddedUvicorn`, "
        "serve(sockets=[...]) in a running uvloop loop that had its own SIGTERM handler):\n"
    )
    for p in probe:
        print(
            f"- `{p['class']}`: replaced SIGTERM handler during serve: "
            f"{p['replaced_during_serve']} (handler: `{p['handler_during']}`); "
            f"restored after: {p['restored_after']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
