"""Shared fixtures: a test DNS server, fake MX hosts on 127.0.0.x, and relayd as a real process.

relayd runs as a subprocess on a config written per test; it delivers to the fake MX hosts on a
per-session port and resolves through the test DNS server, so every test crosses real sockets.
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.dnsserver import TestDNSServer
from support.fakemx import FakeMX
from support.util import free_port, wait_until

from relayd.spool import schema

ROOT = Path(__file__).resolve().parent.parent


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Just enough TOML for test configs: scalars, lists, inline tables, nested tables."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(v)

    lines, tables = [], []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v) and k == "listeners":
            for item in v:
                lines.append(f"[[{k}]]\n" + to_toml(item))
        else:
            lines.append(f"{json.dumps(k)} = {value(v)}")
    out = "\n".join(lines) + "\n"
    for k, v in tables:
        name = f"{prefix}.{json.dumps(k)}" if prefix else json.dumps(k)
        out += f"\n[{name}]\n" + to_toml(v, name)
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        both = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = deep_merge(out[k], v) if both else v
    return out


class RelayProcess:
    """relayd running as a real process on a test config."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        self.port = config["listeners"][0]["address"].rsplit(":", 1)[1]
        self.port = int(self.port)
        self.config_path = workdir / "relayd.toml"
        self.config_path.write_text(to_toml(config))
        self.spool = workdir / "spool.sqlite"
        self.log_path = workdir / "relayd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RelayProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relayd", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        log.close()
        wait_until(self._listening, 15, f"relayd listening on {self.port}")
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"relayd exited {self.proc.returncode}:\n{self.log_text()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        out = []
        text = self.log_text()
        # complete lines only: relayd may be writing the last one as it is read (seen under load)
        for line in text[: text.rfind("\n") + 1].splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if event is None or record.get("event") == event:
                    out.append(record)
        return out

    def wait_event(self, event: str, n: int = 1, timeout: float = 15, **match: Any) -> list:
        def found() -> list:
            hits = [e for e in self.events(event) if all(e.get(k) == v for k, v in match.items())]
            return hits if len(hits) >= n else []

        return wait_until(found, timeout, f"{n} {event!r} log events matching {match}")

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "relayd.ctl", "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"relayctl {args} failed: {result.stdout}{result.stderr}")
        return result


@pytest.fixture
def spool_conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """A fresh spool file with the current schema, opened as the daemon opens it."""
    path = tmp_path / "spool.sqlite"
    schema.prepare(path)
    conn = schema.connect(path)
    yield conn
    conn.close()


@pytest.fixture
def dns_server() -> Iterator[TestDNSServer]:
    with TestDNSServer() as server:
        yield server


@pytest.fixture(scope="session")
def mx_port() -> int:
    """One delivery port for every fake MX; they differ by address (127.0.0.10, .11, ...)."""
    return free_port()


@pytest.fixture
def fake_mx(mx_port: int) -> Iterator[Callable[..., FakeMX]]:
    started: list[FakeMX] = []

    def make(host: str = "127.0.0.10", **kwargs: Any) -> FakeMX:
        mx = FakeMX(host, mx_port, **kwargs).start()
        started.append(mx)
        return mx

    yield make
    for mx in started:
        mx.stop()


@pytest.fixture
def relay(
    tmp_path: Path, dns_server: TestDNSServer, mx_port: int
) -> Iterator[Callable[..., RelayProcess]]:
    """Start relayd on a test config; keyword arguments are merged into the config."""
    started: list[RelayProcess] = []

    def make(extra: dict[str, Any] | None = None, start: bool = True) -> RelayProcess:
        config = {
            "server": {
                "hostname": "relay.test",
                "spool_path": "spool.sqlite",
                "log_level": "debug",
                "shutdown_timeout": "10s",
            },
            "listeners": [{"address": f"127.0.0.1:{free_port()}", "kind": "relay"}],
            "ingress": {"trusted_networks": ["127.0.0.1/32"]},
            "dns": {"nameservers": [dns_server.address], "timeout": "2s"},
            "delivery": {
                "port": mx_port,
                "connect_timeout": "3s",
                "command_timeout": "5s",
                "idle_connection_time": "0.5s",
            },
            "retry": {"first": "1s", "max_interval": "2s", "jitter": 0.0},
            # Tests mail the same unresolvable or refusing addresses again and again; the
            # suppression tests turn hard-bounce entries back on where they test them.
            "suppression": {"bounce_ttl": "0"},
            # the operations listener's default port would be shared by every test relayd
            "monitoring": {"address": ""},
        }
        process = RelayProcess(tmp_path, deep_merge(config, extra or {}))
        started.append(process)
        return process.start() if start else process

    yield make
    for process in started:
        if process.proc is not None and process.proc.poll() is None:
            process.kill()
