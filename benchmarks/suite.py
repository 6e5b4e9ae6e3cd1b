"""benchmarks/suite.py - every benchmark row of issue 4 in one command, one table.

    sudo benchmarks/suite.sh [--quick] [--no-record] [--phases rates,spool,restart,fault]

(suite.sh runs this file with the repository's .venv/bin/python.) Rows:

  1  ingress msgs/s, 1 KB, 50 sessions, new connection per message   >= 2.5 x Postfix
  2  end-to-end msgs/s, same load, to smtp-sink                      >= 2.2 x Postfix
  3  end-to-end msgs/s, DKIM rsa-sha256 signing on                   >= 1.5 x Postfix unsigned
  4  end-to-end msgs/s, 20 KB messages                               >= 2.0 x Postfix (20 KB)
  5  relayd peak RSS (VmHWM) during the N-message 1 KB run           <= 150 MB
  6  relayd RSS with 1,000,000 deferred messages spooled             <= 256 MB (idle, after load)
  7  restart with 1,000,000 spooled: start -> 220 <= 2 s, start -> first delivery <= 5 s
  8  end-to-end msgs/s of fresh mail with 1,000,000 deferred over 100,000 domains spooled
                                                                     >= 0.8 x row 2 (relayd)
  9  CPU ms per relayed message (relay process tree)                 below Postfix's
 10  SIGKILL relayd mid-run, restart, finish: acknowledged messages lost = 0 (duplicates shown)
 13a end-to-end msgs/s, 100,000 personalised messages through the HTTP API in calls of 1,000
                                                                     >= 5 x Postfix (SMTP, -d)
 13b API latency, single-message calls at 200/s: p50 <= 10 ms, p99 <= 50 ms
 13c webhooks keep up with delivery: backlog drained within 5 s of the last delivery
 D13a priority lanes (issue 10): transactional latency (sink arrival - acceptance) while 100,000
     bulk messages drain to one destination at 500/s: p99 <= 1 s
 D13b end-to-end msgs/s, row 2's load, with 1,000,000 suppressed addresses >= 0.95 x without
 C9  campaign (issue 11): 100,000 contacts, A/B test of 20 %, 1,000 domains, 4 sinks, tracking
     and Ed25519 DKIM: msgs/s from "send" to the last delivery without the wait >= 5,000, peak
     RSS <= 300 MB; Postfix relays as many pre-rendered messages of the same size (SMTP, -d)

Phases: "rates" (rows 1-5, 9: per rep, interleaved: relayd 1 KB, Postfix 1 KB, relayd DKIM,
relayd 20 KB, Postfix 20 KB; the relayd/Postfix order alternates from rep to rep), "spool"
(rows 6 and 8), "restart" (row 7), "fault" (row 10). Every load goes through
../shared/bench/run_load.sh (smtp-source -> relay -> smtp-sink, one rep per call) except the
fault row, which uses benchmarks/smtp_load.py (records each 250) and benchmarks/sink.py
(records each arrival). The 1M-message spool is written directly with sqlite3 into a spool
whose schema relayd itself created, cached in --cache-dir, and copied per scenario.

Needs root (Postfix). Loopback only. Every wait is bounded; everything started is stopped on
exit (by PID; also on Ctrl-C / SIGTERM). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import smtplib
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this tree's relayd, not the one .venv was installed from
from relayd.spool import admin  # noqa: E402

# The relayd source tree the benchmarks run (PYTHONPATH of every relayd started): this tree
# by default; RELAYD_SRC=DIR runs another copy (e.g. `git archive` of an older commit) with
# this suite, for before/after figures from the same benchmark code.
SRC = Path(os.environ.get("RELAYD_SRC") or REPO)
BENCH = REPO / "benchmarks"
SHARED = REPO.parent / "shared" / "bench"
PEER = SHARED / "postfix_peer.sh"
LOAD = SHARED / "run_load.sh"
RELAYD = REPO / ".venv" / "bin" / "relayd"
VPY = REPO / ".venv" / "bin" / "python"
NCPU = os.cpu_count() or 1
MB = 1024.0  # kB per MB (figures from /proc are in kB)


class SuiteError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[suite {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def load1() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def listening(port: int) -> bool:
    """Is anything listening on TCP port `port` (any address)? From /proc/net/tcp{,6}."""
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def wait_until_listening(port: int, deadline: float) -> None:
    while not listening(port):
        if time.time() > deadline:
            raise SuiteError(f"nothing listens on port {port} in time")
        time.sleep(0.05)


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its live descendants so far."""
    tck = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tck


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for k in kids:
            out.append(int(k))
            out += descendants(int(k))
    return out


def proc_status(pid: int, key: str) -> int:
    """A kB figure (VmRSS, VmHWM) summed over relayd's process tree (the queue process and its
    ingress process; pages they share after the fork count twice); 0 when gone."""
    total = 0
    for p in [pid, *descendants(pid)] if not gone(pid) else []:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def wait_greeting(port: int, deadline: float, alive: Callable[[], bool]) -> float:
    """Poll: connect, read the greeting; the time at which a 220 arrived."""
    while time.time() < deadline:
        if not alive():
            raise SuiteError(f"process for port {port} exited before greeting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.settimeout(max(0.1, min(10.0, deadline - time.time())))
                line = s.makefile("rb").readline()
                t = time.time()
                if line.startswith(b"220"):
                    with contextlib.suppress(OSError):
                        s.sendall(b"QUIT\r\n")
                    return t
        except (ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.01)
    raise SuiteError(f"no 220 greeting on 127.0.0.1:{port} in time")


def fmt_rate(values: list[float]) -> str:
    if not values:
        return "–"
    m = statistics.median(values)
    if len(values) == 1:
        return f"{m:.0f}"
    return f"{m:.0f} ({min(values):.0f}–{max(values):.0f})"


def fmt_secs(values: list[float]) -> str:
    if not values:
        return "–"
    m = statistics.median(values)
    if len(values) == 1:
        return f"{m:.2f}"
    return f"{m:.2f} ({min(values):.2f}–{max(values):.2f})"


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def yes_no(ok: bool | None) -> str:
    return "–" if ok is None else ("yes" if ok else "**no**")


# ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    num: str
    metric: str
    relayd: str
    postfix: str = "–"
    ratio: str = "–"
    target: str = ""
    met: bool | None = None
    load: str = ""


@dataclass
class Suite:
    args: argparse.Namespace
    tmp: Path = field(init=False)
    run_dir: Path = field(init=False)
    procs: list[tuple[subprocess.Popen, str]] = field(default_factory=list)
    rows: dict[str, Row] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    spool_n: int = 0

    # -- process bookkeeping ---------------------------------------------------------------

    def spawn(
        self,
        argv: list[str],
        what: str,
        stdout: BinaryIO | int = subprocess.DEVNULL,
        stderr: BinaryIO | int = subprocess.DEVNULL,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen:
        p = subprocess.Popen(
            argv,
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        self.procs.append((p, what))
        self._save_pids()
        return p

    def _save_pids(self) -> None:
        live = [(p, w) for p, w in self.procs if p.returncode is None]
        (self.run_dir / "suite.pids").write_text(
            "".join(f"{p.pid}\t{w}\t{self.tmp}\n" for p, w in live)
        )

    def reap(self, p: subprocess.Popen) -> None:
        self.procs = [(q, w) for q, w in self.procs if q is not p]
        self._save_pids()

    def terminate(self, p: subprocess.Popen, timeout: float = 40.0) -> tuple[int, float]:
        """SIGTERM, wait up to timeout, then SIGKILL. Returns exit status and seconds taken."""
        t0 = time.monotonic()
        if p.poll() is None:
            with _suppress():
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"pid {p.pid} did not stop within {timeout:.0f} s: SIGKILL")
                with _suppress():
                    p.kill()
                p.wait(10)
        self.reap(p)
        return p.returncode, time.monotonic() - t0

    def stop_group(self, p: subprocess.Popen) -> None:
        """Stop run_load.sh and everything under it: freeze its process group, terminate the
        processes outside it (timeout puts smtp-source in a group of its own) first, then the
        group, then resume it; SIGKILL whatever is left after 10 s."""
        if p.poll() is None:
            pg = p.pid
            with _suppress():
                os.killpg(pg, signal.SIGSTOP)
            others = [c for c in descendants(pg) if _pgid(c) != pg]
            for c in others:
                with _suppress():
                    os.kill(c, signal.SIGTERM)
            time.sleep(0.3)
            with _suppress():
                os.killpg(pg, signal.SIGTERM)
            with _suppress():
                os.killpg(pg, signal.SIGCONT)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and (
                p.poll() is None or any(not gone(c) for c in others)
            ):
                time.sleep(0.1)
            for c in others:
                with _suppress():
                    os.kill(c, signal.SIGKILL)
            with _suppress():
                os.killpg(pg, signal.SIGKILL)
            with _suppress():
                p.wait(5)
        self.reap(p)

    def cleanup(self) -> None:
        for p, what in list(reversed(self.procs)):
            if p.poll() is not None:
                continue
            log(f"stopping {what} (pid {p.pid})")
            if what == "load":
                self.stop_group(p)
            else:
                self.terminate(p, 40 if what.startswith("relayd") else 5)
        self.procs.clear()
        self._save_pids()
        self.peer("down", check=False)

    def stale(self) -> None:
        """Processes left by an earlier suite run that was SIGKILLed: ours only (same pid,
        command line still naming that run's temp dir)."""
        f = self.run_dir / "suite.pids"
        if not f.exists():
            return
        for line in f.read_text().splitlines():
            pid_s, what, tmp = [*line.split("\t"), "", ""][:3]
            pid = int(pid_s) if pid_s.isdigit() else 0
            if not pid or gone(pid):
                continue
            cl = cmdline(pid)
            if (tmp and tmp in cl) or (what == "load" and "run_load.sh" in cl):
                log(f"stopping stale {what} pid {pid} of an aborted run")
                with _suppress():
                    if what == "load":
                        os.killpg(pid, signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGTERM)
                for _ in range(400):
                    if gone(pid):
                        break
                    time.sleep(0.1)
                with _suppress():
                    os.kill(pid, signal.SIGKILL)
        f.unlink()

    # -- shared helpers ----------------------------------------------------------------------

    def env(self, **extra: Any) -> dict[str, str]:
        a = self.args
        e = dict(os.environ)
        e["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin:" + e.get("PATH", "")
        e.update(
            RUN_DIR=str(self.run_dir),
            SINK_ADDR="127.0.0.1",
            SINK_PORT=str(a.sink_port),
            LISTEN_PORT=str(a.postfix_port),
            MAX_SECONDS=str(a.max_seconds),
            SOURCE_FLAGS="",
        )
        e.update({k: str(v) for k, v in extra.items()})
        return e

    def peer(self, cmd: str, check: bool = True) -> str:
        r = subprocess.run(
            [str(PEER), cmd],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and r.returncode != 0:
            raise SuiteError(f"postfix_peer.sh {cmd} failed: {r.stderr.strip()[-500:]}")
        return r.stdout.strip()

    def postfix_queue_hygiene(self) -> None:
        """Incomplete files (no owner-execute bit) that an aborted Postfix run leaves in
        incoming/ make `postfix start` fail; they were never acknowledged: remove them while
        Postfix is down (as run.sh does)."""
        q = Path("/var/spool/postfix/incoming")
        if (
            not q.is_dir()
            or subprocess.run(["postfix", "status"], capture_output=True).returncode == 0
        ):
            return
        bad = [f for f in q.iterdir() if f.is_file() and not os.stat(f).st_mode & 0o100]
        if bad:
            log(f"removing {len(bad)} incomplete files from {q} (aborted Postfix run)")
            for f in bad:
                f.unlink()

    def load_rep(
        self, label: str, kind: str, port: int, n: int, size: int, pid: int = 0, flags: str = ""
    ) -> dict:
        """One run_load.sh rep (REPS=1) against a relay on `port`; returns its figures.
        ``flags`` go to smtp-source ("-d": one connection per session, reused)."""
        a = self.args
        d = self.tmp / "loads"
        d.mkdir(exist_ok=True)
        if kind == "postfix":
            self.postfix_queue_hygiene()
            env = self.env(MANAGE_PEER=1, RELAY_KIND="postfix", TARGET_PORT=port)
        else:
            env = self.env(MANAGE_PEER=0, RELAY_KIND="other", RELAY_PID=pid, TARGET_PORT=port)
        env["SOURCE_FLAGS"] = flags
        la = load1()
        out, err = d / f"{label}.out", d / f"{label}.err"
        argv = [str(LOAD), str(n), str(a.sessions), str(size), "1"]
        with open(out, "wb") as fo, open(err, "wb") as fe:
            p = self.spawn(argv, "load", fo, fe, env)
            try:
                p.wait(2 * a.max_seconds + 120)
            except subprocess.TimeoutExpired:
                self.stop_group(p)
                raise SuiteError(f"{label}: run_load.sh did not finish in time") from None
        self.reap(p)
        if kind == "postfix":
            self.peer("down", check=False)
        text = err.read_text(errors="replace")
        m = re.search(r"^rep=1 .*$", text, re.M)
        if p.returncode != 0 or not m:
            tail = "\n".join(text.splitlines()[-8:])
            raise SuiteError(f"{label}: run_load.sh failed (rc {p.returncode}):\n{tail}")
        v = dict(kv.split("=", 1) for kv in m.group(0).split())
        r = {k: float(x) for k, x in v.items()}
        r["ingress"] = n / r["ingress_s"]
        r["e2e"] = n / r["e2e_s"]
        r["load1"] = float(la)
        busy = r["sys_cpu_busy_pct"] / 100 * NCPU * r["e2e_s"]
        other = busy - r["relay_cpu_s"] - r["smtp_source_cpu_s"]
        r["foreign_pct"] = 100 * other / (NCPU * r["e2e_s"])
        if r["source_rc"] != 0:
            self.anomalies.append(f"{label}: smtp-source exit status {r['source_rc']:.0f}")
        log(
            f"{label}: ingress {r['ingress']:.0f}/s, end-to-end {r['e2e']:.0f}/s, "
            f"relay CPU {1000 * r['relay_cpu_s'] / n:.2f} ms/msg, load {la}"
        )
        return r

    def detail(self, label: str, r: dict, extra: str = "") -> None:
        self.details.append(
            f"{label:<22} load1={r['load1']:.2f} ingress={r['ingress']:.0f}/s "
            f"e2e={r['e2e']:.0f}/s ingress_s={r['ingress_s']:.2f} e2e_s={r['e2e_s']:.2f} "
            f"relay_cpu_s={r['relay_cpu_s']:.2f} source_cpu_s={r['smtp_source_cpu_s']:.2f} "
            f"busy={r['sys_cpu_busy_pct']:.0f}% foreign={r['foreign_pct']:.0f}% "
            f"iowait={r['iowait_pct']:.0f}% steal={r['steal_pct']:.0f}%{extra}"
        )

    def relayd(
        self,
        name: str,
        port: int,
        route_port: int,
        spool: Path,
        dkim_key: Path | None = None,
        api_port: int = 0,
    ) -> Relayd:
        return Relayd(self, name, port, route_port, spool, dkim_key, api_port)

    # -- phase: rates (rows 1-5, 9) --------------------------------------------------------

    def phase_rates(self) -> None:
        a = self.args
        key = self.make_dkim_key()
        res: dict[str, list[dict]] = {k: [] for k in ("r1k", "p1k", "rdkim", "r20k", "p20k")}
        for rep in range(1, a.reps + 1):
            log(f"=== rates: rep {rep}/{a.reps}")
            pairs = [("r1k", "p1k"), ("rdkim", None), ("r20k", "p20k")]
            for rkey, pkey in pairs:
                order = [rkey, pkey] if rep % 2 else [pkey, rkey]
                for k in order:
                    if k is None:
                        continue
                    size = 20480 if k.endswith("20k") else 1024
                    try:
                        if k.startswith("p"):
                            r = self.load_rep(
                                f"postfix-{k[1:]}-{rep}", "postfix", a.postfix_port, a.n, size
                            )
                            self.detail(f"postfix {k[1:]} rep {rep}", r)
                        else:
                            dkim = key if k == "rdkim" else None
                            r = self.relayd_rep(f"{k[1:]}-{rep}", size, dkim)
                    except SuiteError as exc:  # one failed rep: note it, keep the others
                        log(f"ERROR: {exc}")
                        self.anomalies.append(f"rep {k} {rep} failed: {exc}")
                        self.cleanup()
                        continue
                    res[k].append(r)
        n = a.n
        lr = lambda k: "/".join(f"{r['load1']:.1f}" for r in res[k])  # noqa: E731
        loads = lambda *ks: " · ".join(lr(k) for k in ks)  # noqa: E731
        for num, metric, rk, pk, field_, factor in (
            (
                "1",
                "ingress msgs/s, 1 KB, 50 sessions, new connection per message",
                "r1k",
                "p1k",
                "ingress",
                2.5,
            ),
            ("2", "end-to-end msgs/s, same load, to smtp-sink", "r1k", "p1k", "e2e", 2.2),
            (
                "3",
                "end-to-end msgs/s, DKIM rsa-sha256 signing (Postfix: unsigned, row 2)",
                "rdkim",
                "p1k",
                "e2e",
                1.5,
            ),
            ("4", "end-to-end msgs/s, 20 KB messages", "r20k", "p20k", "e2e", 2.0),
        ):
            rv = [r[field_] for r in res[rk]]
            pv = [r[field_] for r in res[pk]]
            q = ratio(med(rv), med(pv))
            self.rows[num] = Row(
                num,
                metric,
                fmt_rate(rv),
                fmt_rate(pv),
                f"{q:.2f}" if q else "–",
                f"≥ {factor} × Postfix",
                q is not None and q >= factor,
                loads(rk) if rk == "rdkim" else loads(rk, pk),
            )
        self.facts["row2_relayd"] = med([r["e2e"] for r in res["r1k"]])
        hwm = [r["hwm_kb"] / MB for r in res["r1k"]] or [float("nan")]
        self.rows["5"] = Row(
            "5",
            f"relayd peak RSS (VmHWM) during the {n:,}-message 1 KB run, MB (max, min–max)",
            f"{max(hwm):.1f} ({min(hwm):.1f}–{max(hwm):.1f})" if len(hwm) > 1 else f"{hwm[0]:.1f}",
            target="≤ 150 MB",
            met=max(hwm) <= 150,
            load=lr("r1k"),
        )
        rc = [1000 * r["relay_cpu_s"] / n for r in res["r1k"]]
        pc = [1000 * r["relay_cpu_s"] / n for r in res["p1k"]]
        q = ratio(med(rc), med(pc))
        self.rows["9"] = Row(
            "9",
            "CPU ms per relayed message, 1 KB (relay process tree; median, min–max)",
            fmt_secs(rc),
            fmt_secs(pc),
            f"{q:.2f}" if q else "–",
            "below Postfix's (ratio < 1)",
            q is not None and q < 1,
            loads("r1k", "p1k"),
        )
        other = [f"{k}: {r['hwm_kb'] / MB:.1f}" for k in ("rdkim", "r20k") for r in res[k]]
        self.notes.append("relayd VmHWM (MB) in the other rate reps: " + ", ".join(other))

    def make_dkim_key(self) -> Path:
        d = self.tmp / "dkim"
        d.mkdir(exist_ok=True)
        r = subprocess.run(
            [
                str(VPY),
                "-m",
                "relayd.ctl",
                "dkim",
                "keygen",
                "x.test",
                "bench",
                "--out-dir",
                str(d),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=REPO,
        )
        key = d / "x.test.bench.key"
        if r.returncode != 0 or not key.exists():
            raise SuiteError(f"dkim keygen failed: {r.stderr.strip()}")
        return key

    def relayd_rep(
        self,
        label: str,
        size: int,
        dkim_key: Path | None,
        n: int | None = None,
        spool_from: Path | None = None,
    ) -> dict:
        """One rep of the SMTP load through relayd to smtp-sink; ``spool_from``: a spool to
        start on (copied), instead of an empty one."""
        a = self.args
        n = n or a.n
        self.peer("sink-up")
        spool = self.tmp / f"relayd-{label}" / "spool" / "relayd.sqlite"
        if spool_from is not None:
            spool.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(spool_from, spool)
        rd = self.relayd(f"relayd-{label}", a.relayd_port, a.sink_port, spool, dkim_key)
        try:
            rd.start()
            r = self.load_rep(f"relayd-{label}", "relayd", a.relayd_port, n, size, rd.pid)
            r["hwm_kb"] = proc_status(rd.pid, "VmHWM")
            sink = int(self.peer("sink-count") or 0)
        finally:
            rc, stop_s = rd.stop()
            self.peer("sink-down", check=False)
        ev = rd.events()
        problems = []
        if ev["accepted"] != n or ev["delivered"] != n:
            problems.append(f"accepted={ev['accepted']} delivered={ev['delivered']} (expected {n})")
        if dkim_key is not None and ev["dkim_true"] != n:
            problems.append(f'accepted with "dkim": true = {ev["dkim_true"]} (expected {n})')
        if dkim_key is None and ev["dkim_true"]:
            problems.append(f'"dkim": true on {ev["dkim_true"]} without keys')
        if ev["errors"] or ev["stderr_lines"] or rc != 0 or sink < n:
            problems.append(
                f"error events {ev['errors']}, stderr lines {ev['stderr_lines']}, exit {rc}, "
                f"sink {sink}"
            )
        if problems:
            self.anomalies.append(f"relayd {label}: " + "; ".join(problems))
        shutil.rmtree(spool.parent, ignore_errors=True)
        self.detail(
            f"relayd {label.rsplit('-', 1)[0]} rep {label.rsplit('-', 1)[1]}",
            r,
            f" hwm={r['hwm_kb'] / MB:.1f}MB accepted={ev['accepted']} delivered={ev['delivered']}"
            f" dkim_true={ev['dkim_true']} sink={sink} stop_s={stop_s:.1f}",
        )
        return r

    def interleaved(
        self, phase: str, relayd: Callable[[int], dict], postfix: Callable[[int], dict]
    ) -> dict[str, list[dict]]:
        """--reps of relayd and of Postfix, who goes first alternating from rep to rep; a
        failed rep is noted and the others kept."""
        res: dict[str, list[dict]] = {"r": [], "p": []}
        for rep in range(1, self.args.reps + 1):
            log(f"=== {phase}: rep {rep}/{self.args.reps}")
            for k in ["r", "p"] if rep % 2 else ["p", "r"]:
                try:
                    res[k].append(relayd(rep) if k == "r" else postfix(rep))
                except SuiteError as exc:
                    log(f"ERROR: {exc}")
                    self.anomalies.append(f"rep {phase} {k} {rep} failed: {exc}")
                    self.cleanup()
        return res

    def ratio_row(self, num: str, metric: str, res: dict[str, list[dict]], factor: float) -> Row:
        """An end-to-end rate row: the medians side by side, the target a multiple of Postfix."""
        rv, pv = [r["e2e"] for r in res["r"]], [r["e2e"] for r in res["p"]]
        q = ratio(med(rv), med(pv))
        loads = " · ".join("/".join(f"{r['load1']:.1f}" for r in res[k]) for k in "rp")
        return Row(
            num,
            metric,
            fmt_rate(rv),
            fmt_rate(pv),
            f"{q:.2f}" if q else "–",
            f"≥ {factor:g} × Postfix",
            q is not None and q >= factor,
            loads,
        )

    # -- phase: body (rows 4b, 9b) -----------------------------------------------------------

    def phase_body(self) -> None:
        """100 KB messages (a real newsletter's size), relayd and Postfix interleaved rep by rep
        as in the rates phase: the path of the bytes from DATA to the remote MX."""
        a = self.args
        n, size = a.body_n, 102400

        def postfix(rep: int) -> dict:
            r = self.load_rep(f"postfix-100k-{rep}", "postfix", a.postfix_port, n, size)
            self.detail(f"postfix 100k rep {rep}", r)
            return r

        res = self.interleaved(
            "body", lambda rep: self.relayd_rep(f"100k-{rep}", size, None, n), postfix
        )
        lr = lambda k: "/".join(f"{r['load1']:.1f}" for r in res[k])  # noqa: E731
        self.rows["4b"] = self.ratio_row(
            "4b",
            f"end-to-end msgs/s, 100 KB messages (N={n:,}), new connection per message",
            res,
            3,
        )
        rc = [1000 * r["relay_cpu_s"] / n for r in res["r"]]
        pc = [1000 * r["relay_cpu_s"] / n for r in res["p"]]
        q = ratio(med(rc), med(pc))
        self.rows["9b"] = Row(
            "9b",
            "CPU ms per relayed message, 100 KB (relay process tree; median, min–max)",
            fmt_secs(rc),
            fmt_secs(pc),
            f"{q:.2f}" if q else "–",
            "≤ 1 ms",
            bool(rc) and (med(rc) or 0) <= 1.0,
            f"{lr('r')} · {lr('p')}",
        )
        hwm = [f"{r['hwm_kb'] / MB:.1f}" for r in res["r"]]
        self.notes.append("relayd VmHWM (MB, both processes) in the 100 KB reps: " + ", ".join(hwm))

    # -- phase: suppression (row D13b) -------------------------------------------------------

    def phase_suppression(self) -> None:
        """Row 2's load (1 KB, to smtp-sink) through a relayd whose suppression list holds
        --suppressed addresses (the load's recipient not among them: each RCPT is a full
        lookup) and through one with an empty list, interleaved rep by rep."""
        a = self.args
        listed = self.suppressed_spool(a.suppressed)
        res = self.interleaved(
            "suppression",
            lambda rep: self.relayd_rep(f"listed-{rep}", 1024, None, spool_from=listed),
            lambda rep: self.relayd_rep(f"empty-{rep}", 1024, None),
        )
        rv, ev = [r["e2e"] for r in res["r"]], [r["e2e"] for r in res["p"]]
        q = ratio(med(rv), med(ev))
        loads = " · ".join("/".join(f"{r['load1']:.1f}" for r in res[k]) for k in "rp")
        self.rows["D13b"] = Row(
            "D13b",
            f"end-to-end msgs/s, 1 KB (row 2's load), {a.suppressed:,} suppressed addresses;"
            " Postfix column: the same relayd with none",
            fmt_rate(rv),
            fmt_rate(ev),
            f"{q:.2f}" if q else "–",
            "≥ 0.95 × without (cost ≤ 5 %)",
            q is not None and q >= 0.95,
            loads,
        )
        listed.unlink()

    def suppressed_spool(self, n: int) -> Path:
        """A spool relayd created, with ``n`` suppression entries: addresses at the load's
        recipient domain (y.test) and others, global and per sender domain."""
        base, _ = self.base_spool()
        path = self.tmp / "suppressed.sqlite"
        shutil.copyfile(base, path)
        now = time.time()
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.executemany(
                "INSERT INTO suppressions (address, scope, reason, class, created, expires)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    (
                        f"user{i}@{'y.test' if i % 2 else f'd{i % 1000}.test'}",
                        "*" if i % 3 else "domain:x.test",
                        "bounce" if i % 3 else "unsubscribe",
                        "invalid_recipient" if i % 3 else "",
                        now,
                        now + 30 * 86400 if i % 3 else None,
                    )
                    for i in range(n)
                ),
            )
        log(f"suppression list of {n:,} in {path} ({path.stat().st_size / 1e6:.0f} MB)")
        return path

    # -- phase: api (rows 13a, 13b) ----------------------------------------------------------

    def api_relayd(self, label: str) -> tuple[Relayd, str]:
        """A relayd with an API listener routed to smtp-sink, started, and a fresh API key."""
        a = self.args
        spool = self.tmp / f"relayd-{label}" / "spool" / "relayd.sqlite"
        rd = self.relayd(f"relayd-{label}", a.relayd_port, a.sink_port, spool, None, a.api_port)
        key = self.relayctl(rd.config, "key", "add", "bench", "--sender", "x.test")
        rd.start()
        wait_until_listening(a.api_port, time.time() + 30)
        return rd, next(line for line in key.splitlines() if line.startswith("rk_"))

    def api_load(self, *args: str) -> dict:
        r = subprocess.run(
            [str(VPY), str(REPO / "benchmarks" / "api_load.py"), *args],
            capture_output=True,
            text=True,
            timeout=2 * self.args.max_seconds + 60,
            check=False,
            env=dict(os.environ, PYTHONPATH=str(SRC)),
        )
        if r.returncode != 0:
            raise SuiteError(f"api_load.py {args[0]} failed: {r.stderr.strip()[-400:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def api_batch_rep(self, label: str, n: int) -> dict:
        """Row 13a, relayd: n personalised messages in API calls of 1,000 recipients each
        (4 in flight), from the first call until the last message is at the sink."""
        a = self.args
        self.peer("sink-up")
        rd, key = self.api_relayd(label)
        try:
            c0, la = int(self.peer("sink-count") or 0), float(load1())
            cpu0, t0 = tree_cpu(rd.pid), time.time()
            out = self.api_load(
                "batch",
                f"http://127.0.0.1:{a.api_port}",
                key,
                "--messages",
                str(n),
                "--batch",
                "1000",
                "--concurrency",
                "4",
                "--max-seconds",
                str(a.max_seconds),
            )
            deadline = time.time() + a.max_seconds
            while int(self.peer("sink-count") or 0) - c0 < n:
                if time.time() > deadline:
                    raise SuiteError(f"{label}: not all {n} messages reached the sink in time")
                time.sleep(0.05)
            e2e_s, cpu = time.time() - t0, tree_cpu(rd.pid) - cpu0
        finally:
            rc, _ = rd.stop()
            self.peer("sink-down", check=False)
        ev = rd.events()
        if out["failures"] or ev["accepted"] != n or ev["delivered"] != n or ev["errors"] or rc:
            self.anomalies.append(
                f"relayd {label}: failures {out['failures']} {out['first_failures']}, accepted "
                f"{ev['accepted']}, delivered {ev['delivered']}, errors {ev['errors']}, exit {rc}"
            )
        r = {"e2e": n / e2e_s, "ingress": n / out["seconds"], "relay_cpu_s": cpu, "load1": la}
        log(
            f"{label}: API ingress {r['ingress']:.0f}/s, end-to-end {r['e2e']:.0f}/s, "
            f"relay CPU {1000 * cpu / n:.2f} ms/msg, load {la}"
        )
        self.details.append(
            f"relayd {label:<15} load1={la:.2f} api_ingress={r['ingress']:.0f}/s "
            f"e2e={r['e2e']:.0f}/s e2e_s={e2e_s:.2f} relay_cpu_s={cpu:.2f} "
            f"request_p50_s={out['request_p50_s']} accepted={ev['accepted']} "
            f"delivered={ev['delivered']}"
        )
        shutil.rmtree(rd.dir / "spool", ignore_errors=True)
        return r

    def phase_api(self) -> None:
        """Rows 13a and 13b: the HTTP API. 13a against Postfix fed the same number of
        messages over SMTP with connection reuse (smtp-source -d, 1.5 KB: the size of the
        API's personalised messages), interleaved rep by rep; 13b: single-message calls at a
        fixed rate (an open loop), latency of each answer."""
        a = self.args
        n = a.api_n

        def postfix(rep: int) -> dict:
            r = self.load_rep(
                f"postfix-reuse-{rep}", "postfix", a.postfix_port, n, 1536, flags="-d"
            )
            self.detail(f"postfix reuse rep {rep}", r)
            return r

        res = self.interleaved("api", lambda rep: self.api_batch_rep(f"api-{rep}", n), postfix)
        self.rows["13a"] = self.ratio_row(
            "13a",
            f"end-to-end msgs/s, {n:,} personalised messages through the API in calls of 1,000"
            " (Postfix: the same number over SMTP, connections reused, smtp-source -d)",
            res,
            5,
        )
        self.peer("sink-up")
        rd, key = self.api_relayd("api-rate")
        try:
            la = float(load1())
            out = self.api_load(
                "rate",
                f"http://127.0.0.1:{a.api_port}",
                key,
                "--rate",
                str(a.api_rate),
                "--seconds",
                str(a.api_seconds),
            )
        finally:
            rd.stop()
            self.peer("sink-down", check=False)
        if out["failures"]:
            self.anomalies.append(f"api rate: {out['failures']} failed requests")
        p50, p99 = 1000 * (out["p50_s"] or 0), 1000 * (out["p99_s"] or 0)
        self.rows["13b"] = Row(
            "13b",
            f"API latency, single-message calls at {a.api_rate:.0f}/s for {a.api_seconds:.0f} s"
            " (open loop): p50 / p99, ms",
            f"{p50:.1f} / {p99:.1f}",
            "–",
            "–",
            "p50 ≤ 10, p99 ≤ 50",
            p50 <= 10 and p99 <= 50,
            f"{la:.2f}",
        )
        self.notes.append(
            f"row 13b: {out['requests']} requests in {out['seconds']} s, p90"
            f" {1000 * (out['p90_s'] or 0):.1f} ms, max {1000 * (out['max_s'] or 0):.1f} ms"
        )
        self.webhook_drain()

    def webhook_drain(self) -> None:
        """Row 13c: benchmarks/webhook_drain.py (its own relayd, sink and verifying receiver):
        a `delivered` subscription at batch 100 under SMTP load; the backlog left when the
        last message is delivered must be gone within 5 s."""
        a = self.args
        la = float(load1())
        r = subprocess.run(
            [
                str(VPY),
                str(REPO / "benchmarks" / "webhook_drain.py"),
                "--messages",
                str(a.drain_n),
                "--max-seconds",
                str(a.max_seconds),
            ],
            capture_output=True,
            text=True,
            timeout=2 * a.max_seconds + 60,
            check=False,
            env=dict(os.environ, PYTHONPATH=str(SRC)),
        )
        lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
        if not lines:
            self.anomalies.append(f"webhook_drain.py failed: {r.stderr.strip()[-300:]}")
            return
        out = json.loads(lines[-1])
        if out.get("bad_signatures") or out.get("received", 0) < a.drain_n:
            self.anomalies.append(f"webhook_drain.py: {out}")
        self.rows["13c"] = Row(
            "13c",
            f"webhooks keep up: {a.drain_n:,} messages over SMTP to smtp-sink, a `delivered`"
            " endpoint at batch 100: backlog drained after the last delivery, s",
            f"{out['drain_s']:.2f}",
            "–",
            "–",
            "≤ 5 s",
            out["drain_s"] <= 5,
            f"{la:.2f}",
        )
        self.notes.append(
            f"row 13c: {out['msgs_per_s']} msgs/s delivered with the endpoint, largest lag"
            f" {out['max_lag_events']} events, {out['posts']} POSTs, all verified"
        )

    # -- phase: lanes (issue 10, row D13a) ---------------------------------------------------

    def phase_lanes(self) -> None:
        """Row D13a: benchmarks/lanes.py (its own relayd and sink.py): a bulk backlog queued
        through the API drains to one destination at its max_rate while transactional mail
        arrives; the latency of the transactional mail. Postfix has no lanes: no comparison."""
        a = self.args
        la = float(load1())
        argv = [
            str(VPY),
            str(REPO / "benchmarks" / "lanes.py"),
            *("--bulk", str(a.lanes_bulk), "--rate", str(a.lanes_rate)),
            *("--tx-rate", str(a.lanes_tx_rate), "--seconds", str(a.lanes_seconds)),
            *("--max-seconds", str(a.max_seconds)),
        ]
        r = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=2 * a.max_seconds + 60,
            check=False,
            env=dict(os.environ, PYTHONPATH=str(SRC)),
        )
        lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
        if not lines:
            self.anomalies.append(f"lanes.py failed: {(r.stderr or r.stdout).strip()[-300:]}")
            return
        out = json.loads(lines[-1])
        if out["tx_missing"] or out["backlog_at_end"] <= 0:
            self.anomalies.append(f"lanes.py: {out}")
        p50, p99 = 1000 * out["p50_s"], 1000 * out["p99_s"]
        self.rows["D13a"] = Row(
            "D13a",
            f"priority lanes: transactional mail (API and SMTP, {a.lanes_tx_rate:g}/s for"
            f" {a.lanes_seconds:g} s) while {a.lanes_bulk:,} bulk messages drain to one"
            f" destination at its max_rate {a.lanes_rate}/s: sink arrival - acceptance,"
            " p50 / p99, ms (Postfix has no lanes: no comparison)",
            f"{p50:.0f} / {p99:.0f}",
            "–",
            "–",
            "p99 ≤ 1000",
            out["p99_s"] <= 1,
            f"{la:.2f}",
        )
        self.notes.append(
            f"row D13a: `benchmarks/lanes.py {' '.join(shlex.quote(x) for x in argv[2:])}`;"
            f" bulk queued in"
            f" {out['inject_s']} s ({out['inject_per_s']}/s); backlog {out['backlog_at_start']:,}"
            f" when the transactional mail started, {out['backlog_at_end']:,} when it ended; bulk"
            f" at the sink meanwhile {out['bulk_per_s_meanwhile']}/s; {out['tx_sent']}"
            f" transactional, max {1000 * out['max_s']:.0f} ms, p50 by door {out['p50_by_door_s']}"
        )

    # -- phase: campaign (issue 11, row C9) ---------------------------------------------------

    def campaign_rep(self, rep: int) -> dict:
        """benchmarks/campaign.py: its own relayd, sinks and contacts; one campaign."""
        a = self.args
        la = float(load1())
        argv = [
            str(VPY),
            str(REPO / "benchmarks" / "campaign.py"),
            *("--contacts", str(a.campaign_n), "--domains", "1000", "--test", "20"),
            *("--wait", str(a.campaign_wait), "--max-seconds", str(a.max_seconds)),
        ]
        r = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=2 * a.max_seconds + 120,
            check=False,
            env=dict(os.environ, PYTHONPATH=str(SRC)),
        )
        lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
        if not lines:
            raise SuiteError(f"campaign.py failed: {(r.stderr or r.stdout).strip()[-400:]}")
        out = json.loads(lines[-1])
        n = a.campaign_n
        if out["errors"] or out["delivered_events"] != n or out["at_sinks"] != n:
            self.anomalies.append(f"campaign rep {rep}: {out}")
        self.campaign_size = out["avg_size"]
        self.details.append(f"relayd campaign-{rep:<6} load1={la:.2f} {json.dumps(out)}")
        log(f"campaign-{rep}: {out['msgs_per_s']:.0f}/s, RSS {out['peak_rss_mb']} MB, load {la}")
        self.campaign_cmd = " ".join(shlex.quote(x) for x in argv[1:])
        return {"e2e": out["msgs_per_s"], "load1": la, "rss": out["peak_rss_mb"], **out}

    def phase_campaign(self) -> None:
        """Row C9: a campaign against Postfix relaying the same number of pre-rendered
        messages of the campaign's average size over SMTP with connection reuse (smtp-source
        -d), interleaved rep by rep."""
        a = self.args
        n = a.campaign_n
        self.campaign_size, self.campaign_cmd = 16384, "benchmarks/campaign.py"

        def postfix(rep: int) -> dict:
            size = self.campaign_size
            label = f"postfix-campaign-{rep}"
            r = self.load_rep(label, "postfix", a.postfix_port, n, size, flags="-d")
            self.detail(f"postfix campaign rep {rep}", r, f" size={size}")
            return r

        res = self.interleaved("campaign", self.campaign_rep, postfix)
        row = self.ratio_row(
            "C9",
            f"campaign: {n:,} contacts, A/B test of 20 % (wait excluded), 1,000 domains, 4 sinks,"
            " tracking links, Ed25519 DKIM: msgs/s from send to the last delivery (Postfix: as"
            " many pre-rendered messages of the same size over SMTP, connections reused)",
            res,
            0,
        )
        rss = max((r["rss"] for r in res["r"]), default=None)
        fast = med([r["e2e"] for r in res["r"]])
        row.target = "≥ 5,000 msgs/s, RSS ≤ 300 MB"
        row.met = fast is not None and rss is not None and fast >= 5000 and rss <= 300
        row.relayd += f" (RSS {rss} MB)" if rss is not None else ""
        self.rows["C9"] = row
        self.notes.append(f"row C9: `{self.campaign_cmd}`; message size {self.campaign_size} B")

    # -- phase: memory (rows 11, 12) ---------------------------------------------------------

    def relayctl(self, config: Path, *args: str) -> str:
        r = subprocess.run(
            [str(VPY), "-m", "relayd.ctl", "--config", str(config), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=dict(os.environ, PYTHONPATH=str(SRC)),
        )
        if r.returncode != 0:
            raise SuiteError(f"relayctl {' '.join(args)} failed: {r.stderr.strip()[-300:]}")
        return r.stdout

    def wait_events(self, rd: Relayd, name: str, n: int, what: str) -> None:
        deadline = time.time() + self.args.max_seconds
        while rd.events()[name] < n:
            if time.time() > deadline or (rd.proc is not None and rd.proc.poll() is not None):
                raise SuiteError(f"{what}: {rd.events()[name]} {name} events of {n}")
            time.sleep(0.5)

    def phase_memory(self) -> None:
        self.memory_deferred()
        self.memory_one_large()

    def memory_deferred(self) -> None:
        """Row 11: N 5 MB messages sent to relayd while their destination refuses connections
        (each deferred at its first attempt); then relayd restarted routed to smtp-sink and
        every one made due at once (relayctl retry --all), so that all N are due together."""
        a = self.args
        n, size = a.mem_n, 5 * 1024 * 1024
        d = self.tmp / "mem-deferred"
        spool = d / "spool" / "relayd.sqlite"
        rd = self.relayd("relayd-mem-deferred", a.relayd_port, a.pysink_port, spool)
        text = rd.config.read_text().replace(
            'max_message_size = "25MB"', 'max_message_size = "32MB"'
        )
        rd.config.write_text(text)
        la = load1()
        t0 = time.monotonic()
        try:
            rd.start()
            q = rd.pid
            rss0 = proc_status(q, "VmRSS")
            with open(d / "source.out", "wb") as so:
                src = self.spawn(
                    [
                        "smtp-source",
                        "-s",
                        str(a.mem_sessions),
                        "-l",
                        str(size),
                        "-m",
                        str(n),
                        "-f",
                        "a@x.test",
                        "-t",
                        "b@y.test",
                        f"127.0.0.1:{a.relayd_port}",
                    ],
                    "smtp-source",
                    so,
                    subprocess.STDOUT,
                    self.env(),
                )
                try:
                    src.wait(a.max_seconds)
                except subprocess.TimeoutExpired:
                    raise SuiteError("memory: smtp-source did not finish in time") from None
                self.reap(src)
            t_in = time.monotonic() - t0
            self.wait_events(rd, "deferred", n, "memory (deferral)")
            time.sleep(2)
            rss_def, hwm_def = proc_status(q, "VmRSS"), proc_status(q, "VmHWM")
            rc1, _ = rd.stop()
            rd.config.write_text(text.replace(f":{a.pysink_port}", f":{a.sink_port}"))
            self.peer("sink-up")
            c0 = int(self.peer("sink-count") or 0)
            rd.start()
            q = rd.pid
            time.sleep(2)
            rss_idle = proc_status(q, "VmRSS")
            t1 = time.monotonic()
            self.relayctl(rd.config, "retry", "--all")
            deadline = time.time() + a.max_seconds
            samples = []
            while int(self.peer("sink-count") or 0) - c0 < n:
                if time.time() > deadline:
                    raise SuiteError("memory: the due messages did not all reach the sink")
                samples.append(proc_status(q, "VmRSS"))
                time.sleep(0.5)
            t_out = time.monotonic() - t1
            hwm_out, rss_after = proc_status(q, "VmHWM"), proc_status(q, "VmRSS")
        finally:
            rc2, _ = rd.stop()
            self.peer("sink-down", check=False)
        ev = rd.events()
        if ev["errors"] or ev["stderr_lines"] or rc1 or rc2 or ev["delivered"] != n:
            self.anomalies.append(
                f"memory deferred: delivered {ev['delivered']} of {n}, error events "
                f"{ev['errors']}, stderr {ev['stderr_lines']}, exit {rc1}/{rc2}"
            )
        shutil.rmtree(d / "spool", ignore_errors=True)
        worst = max(rss_def, hwm_out)
        scale = "" if n == 2000 else " (scaled from the issue's 2,000)"
        self.rows["11"] = Row(
            "11",
            f"queue-process RSS, {n:,} deferred 5 MB messages{scale}, MB: VmRSS after all were "
            "deferred / peak (VmHWM) while all were due and delivered",
            f"{rss_def / MB:.1f} / {hwm_out / MB:.1f}",
            target="≤ 150 MB",
            met=worst / MB <= 150,
            load=la,
        )
        self.details.append(
            f"memory deferred: load1={la} n={n} size={size} sessions={a.mem_sessions}; queue "
            f"process VmRSS at start {rss0 / MB:.1f} MB, after intake and deferral "
            f"{rss_def / MB:.1f} MB (VmHWM {hwm_def / MB:.1f}; intake {t_in:.0f} s); restarted "
            f"routed to smtp-sink: idle {rss_idle / MB:.1f} MB, retry --all -> all at the sink in "
            f"{t_out:.0f} s, VmHWM {hwm_out / MB:.1f} MB, VmRSS sampled max "
            f"{max(samples or [0]) / MB:.1f} MB, after {rss_after / MB:.1f} MB"
        )

    def memory_one_large(self) -> None:
        """Row 12: one 25 MB message into an idle relayd routed to smtp-sink: the peak RSS of
        each process above its idle RSS (the peak is reset with clear_refs just before)."""
        a = self.args
        size = 25 * 1024 * 1024
        d = self.tmp / "mem-large"
        spool = d / "spool" / "relayd.sqlite"
        rd = self.relayd("relayd-mem-large", a.relayd_port, a.sink_port, spool)
        text = rd.config.read_text().replace(
            'max_message_size = "25MB"', 'max_message_size = "32MB"'
        )
        rd.config.write_text(text)
        line = "X" * 76 + "\r\n"
        head = (
            "From: <a@x.test>\r\nTo: <b@y.test>\r\nSubject: large\r\n"
            "Message-ID: <large@x.test>\r\n\r\n"
        )
        msg = head + line * ((size - len(head)) // len(line))
        la = load1()
        costs: dict[str, list[float]] = {"queue": [], "ingress": []}
        idle: dict[str, list[float]] = {"queue": [], "ingress": []}
        self.peer("sink-up")
        try:
            rd.start()
            pids = {"queue": rd.pid, "ingress": (descendants(rd.pid) or [0])[0]}
            for _ in range(a.reps):
                c0 = int(self.peer("sink-count") or 0)
                time.sleep(2)
                base = {k: proc_status(p, "VmRSS") for k, p in pids.items()}
                for p in pids.values():
                    Path(f"/proc/{p}/clear_refs").write_text("5")
                with smtplib.SMTP("127.0.0.1", a.relayd_port, timeout=120) as smtp:
                    smtp.sendmail("a@x.test", ["b@y.test"], msg)
                deadline = time.time() + 120
                while int(self.peer("sink-count") or 0) <= c0:
                    if time.time() > deadline:
                        raise SuiteError("memory: the 25 MB message did not reach the sink")
                    time.sleep(0.1)
                time.sleep(0.5)
                for k, p in pids.items():
                    idle[k].append(base[k] / MB)
                    costs[k].append((proc_status(p, "VmHWM") - base[k]) / MB)
        finally:
            rc, _ = rd.stop()
            self.peer("sink-down", check=False)
        ev = rd.events()
        if ev["errors"] or ev["stderr_lines"] or rc or ev["delivered"] != a.reps:
            self.anomalies.append(
                f"memory large: delivered {ev['delivered']} of {a.reps}, error events "
                f"{ev['errors']}, stderr {ev['stderr_lines']}, exit {rc}"
            )
        shutil.rmtree(d / "spool", ignore_errors=True)
        limit = 3 * size / (1024 * 1024)
        worst = max(max(v) for v in costs.values() if v) if all(costs.values()) else None
        self.rows["12"] = Row(
            "12",
            "one 25 MB message: peak RSS above idle, MB (median, min–max): queue process / "
            "ingress process",
            f"{fmt_secs(costs['queue'])} / {fmt_secs(costs['ingress'])}",
            target=f"≤ {limit:.0f} MB (3 × size) each",
            met=None if worst is None else worst <= limit,
            load=la,
        )
        self.details.append(
            f"memory large: load1={la} size={size}, reps {a.reps}; idle VmRSS queue "
            f"{idle['queue']} MB, ingress {idle['ingress']} MB; peak above idle queue "
            f"{[round(x, 1) for x in costs['queue']]}, ingress "
            f"{[round(x, 1) for x in costs['ingress']]}"
        )

    # -- the 1M spool ------------------------------------------------------------------------

    def base_spool(self) -> tuple[Path, str]:
        """An empty spool created by relayd itself, and a hash of its schema."""
        a = self.args
        spool = self.tmp / "schema" / "relayd.sqlite"
        rd = self.relayd("relayd-schema", a.relayd_port, a.sink_port, spool)
        rd.start()
        rd.stop()
        version, sql = admin.schema_fingerprint(spool)
        h = hashlib.sha256(json.dumps([version, sql]).encode()).hexdigest()[:12]
        return spool, h

    def spool_cache(self) -> Path:
        """The cached spool with spool_n deferred messages over `domains` domains (built once,
        valid 24 h: next_attempt is 2 days after the build)."""
        if "spool_cache" in self.facts:
            return self.facts["spool_cache"]
        a = self.args
        base, h = self.base_spool()
        cache = Path(a.cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        n, domains = a.spool_n, a.domains
        free = shutil.disk_usage(cache).free
        per = 1450  # bytes per 1 KB message with its recipient row and indexes (measured ~1.3 KB)
        need = lambda k: 2 * k * per + (1 << 30)  # noqa: E731  cache + one working copy + 1 GB
        if need(n) > free:
            scaled = max(10000, int((free - (1 << 30)) / (2 * per)) // 10000 * 10000)
            self.notes.append(
                f"**spool scaled down**: {n:,} messages need ~{need(n) / 1e9:.1f} GB free, "
                f"{free / 1e9:.1f} GB available: used {scaled:,}"
            )
            n, domains = scaled, max(1, domains * scaled // n)
        self.spool_n, self.facts["domains"] = n, domains
        path = cache / f"spool-{n}-{domains}-{h}.sqlite"
        meta = path.with_suffix(".json")
        if path.exists() and meta.exists():
            m = json.loads(meta.read_text())
            if time.time() - m.get("built_at", 0) < 86400:
                log(f"using cached spool {path} ({path.stat().st_size / 1e9:.2f} GB)")
                self.facts["spool_cache"] = path
                return path
        for old in cache.glob("spool-*"):
            old.unlink()
        log(f"building spool: {n:,} deferred messages over {domains:,} domains -> {path}")
        t0 = time.monotonic()
        work = path.with_suffix(".building")
        shutil.copyfile(base, work)
        built_at = build_spool(work, n, domains)
        work.rename(path)
        meta.write_text(json.dumps({"built_at": built_at, "n": n, "domains": domains}))
        took = time.monotonic() - t0
        log(f"spool built in {took:.0f} s, {path.stat().st_size / 1e9:.2f} GB")
        self.notes.append(
            f"spool of {n:,} deferred messages built in {took:.0f} s "
            f"({path.stat().st_size / 1e9:.2f} GB)"
        )
        self.facts["spool_cache"] = path
        return path

    def spool_copy(self, dest: Path, due_now: int = 0, cold: bool = False) -> Path:
        src = self.spool_cache()
        dest.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        shutil.copyfile(src, dest)
        if due_now:
            admin.make_due(dest, due_now)
        fd = os.open(dest, os.O_RDONLY)
        try:
            os.fsync(fd)  # no writeback of the copy competing with relayd's fsyncs afterwards
            if cold:  # this file's pages out of the page cache (its pages only, nothing else)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        log(f"copied spool to {dest} in {time.monotonic() - t0:.1f} s")
        return dest

    # -- phase: spool (rows 6, 8) ------------------------------------------------------------

    def phase_spool(self) -> None:
        a = self.args
        spool = self.spool_copy(self.tmp / "spool8" / "spool" / "relayd.sqlite")
        n = a.row8_n
        self.peer("sink-up")
        big = self.relayd("relayd-spool8", a.relayd_port, a.sink_port, spool)
        empty = self.relayd(
            "relayd-empty8",
            a.relayd2_port,
            a.sink_port,
            self.tmp / "empty8" / "spool" / "relayd.sqlite",
        )
        big_r: list[dict] = []
        empty_r: list[dict] = []
        try:
            t220 = big.start()
            empty.start()
            log(
                f"relayd on the {self.spool_n:,}-message spool: 220 after {t220:.2f} s; idle "
                f"{a.idle} s"
            )
            time.sleep(a.idle)
            rss_idle, hwm_idle = proc_status(big.pid, "VmRSS"), proc_status(big.pid, "VmHWM")
            la_idle = load1()
            for rep in range(1, a.reps + 1):
                order = [(big, big_r, "spool8"), (empty, empty_r, "empty8")]
                for rd, acc, label in order if rep % 2 else order[::-1]:
                    r = self.load_rep(f"relayd-{label}-{rep}", "relayd", rd.port, n, 1024, rd.pid)
                    acc.append(r)
                    self.detail(
                        f"relayd {label} rep {rep}",
                        r,
                        f" rss={proc_status(rd.pid, 'VmRSS') / MB:.1f}MB",
                    )
            time.sleep(2)
            rss_after, hwm_after = proc_status(big.pid, "VmRSS"), proc_status(big.pid, "VmHWM")
            rss_empty = proc_status(empty.pid, "VmRSS")
        finally:
            rc1, s1 = big.stop()
            rc2, _ = empty.stop()
            self.peer("sink-down", check=False)
        states = spool_states(spool)
        ev = big.events()
        expect = n * a.reps
        if ev["delivered"] != expect or ev["errors"] or ev["stderr_lines"] or rc1 or rc2:
            self.anomalies.append(
                f"relayd spool8: delivered {ev['delivered']} (expected {expect}), error events "
                f"{ev['errors']}, stderr lines {ev['stderr_lines']}, exit {rc1}/{rc2}"
            )
        if states.get("deferred", 0) != self.spool_n or set(states) - {"deferred"}:
            self.anomalies.append(
                f"relayd spool8: spool after the run: {states} (expected deferred={self.spool_n})"
            )
        shutil.rmtree(spool.parent, ignore_errors=True)
        scale = f"{self.spool_n:,} deferred over {self.facts['domains']:,} domains"
        self.rows["6"] = Row(
            "6",
            f"relayd RSS with {scale} spooled, MB: idle {a.idle} s after start / after the row-8 "
            "load (VmHWM)",
            f"{rss_idle / MB:.1f} / {rss_after / MB:.1f} ({hwm_after / MB:.1f})",
            target="≤ 256 MB",
            met=max(rss_idle, rss_after) / MB <= 256,
            load=f"{la_idle} · " + "/".join(f"{r['load1']:.1f}" for r in big_r),
        )
        self.details.append(
            f"spool8: 220 after {t220:.2f} s; VmRSS idle {rss_idle / MB:.1f} MB (VmHWM "
            f"{hwm_idle / MB:.1f}), "
            f"after load {rss_after / MB:.1f} MB (VmHWM {hwm_after / MB:.1f}); empty-spool relayd "
            f"VmRSS after load {rss_empty / MB:.1f} MB; SIGTERM -> exit {s1:.1f} s; spool after: "
            f"{states}"
        )
        bv, ev_ = [r["e2e"] for r in big_r], [r["e2e"] for r in empty_r]
        q2 = ratio(med(bv), self.facts.get("row2_relayd"))
        qe = ratio(med(bv), med(ev_))
        self.rows["8"] = Row(
            "8",
            f"end-to-end msgs/s, row-2 load (N={n:,}), {scale} spooled",
            fmt_rate(bv),
            "–",
            (f"{q2:.2f} vs row 2" if q2 else "–")
            + (f"; {qe:.2f} vs empty spool, interleaved ({fmt_rate(ev_)})" if qe else ""),
            "≥ 0.8 × row 2 (relayd)",
            None if q2 is None else q2 >= 0.8,
            "/".join(f"{r['load1']:.1f}" for r in big_r),
        )
        self.notes.append(
            f"row 8: interleaved with the same load into a second relayd on an empty spool, "
            f"running at the same time: {fmt_rate(ev_)} msgs/s; ratio spooled/empty "
            f"{qe:.2f}"
            if qe
            else "row 8: no empty-spool figure"
        )

    # -- phase: restart (row 7) --------------------------------------------------------------

    def phase_restart(self) -> None:
        a = self.args
        t220s, firsts, fresh, fresh_after_ack, alldue, starts = [], [], [], [], [], []
        loads = []
        for rep in range(1, a.reps + 1):
            log(f"=== restart: rep {rep}/{a.reps}")
            d = self.tmp / f"restart{rep}"
            spool = self.spool_copy(d / "spool" / "relayd.sqlite", a.due_now, cold=True)
            arrivals = d / "arrivals.txt"
            sink = self.start_pysink(arrivals)
            rd = self.relayd(f"relayd-restart{rep}", a.relayd_port, a.pysink_port, spool)
            loads.append(load1())
            try:
                t0 = time.time()
                t220 = t0 + rd.start()
                mid = f"<fresh-restart-{rep}-{int(t0)}@x.test>"
                send_one(a.relayd_port, mid)
                t_ack = time.time()
                deadline = time.time() + 120
                seen: dict[str, float] = {}
                spooled: list[float] = []
                reader = Arrivals(arrivals)
                while time.time() < deadline:
                    for t, _qid, m in reader.read():
                        if m.startswith("<spool-"):
                            spooled.append(t)
                        else:
                            seen.setdefault(m, t)
                    if mid in seen and len(spooled) >= a.due_now:
                        break
                    time.sleep(0.02)
            finally:
                rc, stop_s = rd.stop()
                self.terminate(sink, 5)
            if mid not in seen or not spooled:
                raise SuiteError(
                    f"restart rep {rep}: fresh message arrived: {mid in seen}, spooled arrivals: "
                    f"{len(spooled)}"
                )
            started = rd.event_time("started")
            t220s.append(t220 - t0)
            firsts.append(min(spooled) - t0)
            fresh.append(seen[mid] - t0)
            fresh_after_ack.append(seen[mid] - t_ack)
            alldue.append(max(spooled) - t0 if len(spooled) >= a.due_now else float("nan"))
            starts.append(started - t0 if started else float("nan"))
            ev = rd.events()
            if ev["errors"] or ev["stderr_lines"] or rc:
                self.anomalies.append(
                    f"restart rep {rep}: error events {ev['errors']}, stderr "
                    f"{ev['stderr_lines']}, exit {rc}"
                )
            if len(spooled) != a.due_now:
                self.anomalies.append(
                    f"restart rep {rep}: {len(spooled)} spooled arrivals (expected {a.due_now})"
                )
            self.details.append(
                f"restart rep {rep}: load1={loads[-1]} 'started' logged {starts[-1]:.2f} s, 220 "
                f"{t220s[-1]:.2f} s, "
                f"first spooled delivery {firsts[-1]:.2f} s, all {a.due_now} due delivered "
                f"{alldue[-1]:.2f} s, "
                f"fresh message at sink {fresh[-1]:.2f} s ({fresh_after_ack[-1]:.3f} s after its "
                "250); "
                f"requeued={rd.started_field('requeued')}; SIGTERM -> exit {stop_s:.1f} s"
            )
            shutil.rmtree(spool.parent, ignore_errors=True)
        scale = f"{self.spool_n:,} spooled"
        ld = "/".join(loads)
        self.rows["7a"] = Row(
            "7a",
            f"restart with {scale} (spool file out of the page cache): start → 220 greeting, s",
            fmt_secs(t220s),
            target="≤ 2 s",
            met=max(t220s) <= 2,
            load=ld,
        )
        self.rows["7b"] = Row(
            "7b",
            f"restart with {scale} ({a.due_now:,} due): start → first delivery of spooled mail, s",
            fmt_secs(firsts),
            target="≤ 5 s",
            met=max(firsts) <= 5,
            load=ld,
        )
        self.rows["7c"] = Row(
            "7c",
            f"restart with {scale}: start → fresh message (sent at 220) at the sink, s",
            fmt_secs(fresh),
            target="≤ 5 s",
            met=max(fresh) <= 5,
            load=ld,
        )

    def start_pysink(self, out: Path) -> subprocess.Popen:
        a = self.args
        if listening(a.pysink_port):
            raise SuiteError(f"port {a.pysink_port} (Python sink) is in use")
        with open(out.with_suffix(".err"), "wb") as err:
            p = self.spawn(
                [str(VPY), str(BENCH / "sink.py"), "--port", str(a.pysink_port), "--out", str(out)],
                "sink.py",
                subprocess.DEVNULL,
                err,
            )
        deadline = time.time() + 20
        while not listening(a.pysink_port):
            if p.poll() is not None or time.time() > deadline:
                raise SuiteError(
                    f"sink.py did not start: {out.with_suffix('.err').read_text()[-500:]}"
                )
            time.sleep(0.05)
        return p

    # -- phase: fault (row 10) ---------------------------------------------------------------

    def phase_fault(self) -> None:
        a = self.args
        n = a.fault_n
        d = self.tmp / "fault"
        d.mkdir(exist_ok=True)
        arrivals, acks = d / "arrivals.txt", d / "acks.txt"
        sink = self.start_pysink(arrivals)
        rd = self.relayd(
            "relayd-fault", a.relayd_port, a.pysink_port, d / "spool" / "relayd.sqlite"
        )
        la = load1()
        client = None
        try:
            rd.start()
            t0 = time.time()
            with open(d / "client.out", "wb") as co:
                client = self.spawn(
                    [
                        str(VPY),
                        str(BENCH / "smtp_load.py"),
                        "--port",
                        str(a.relayd_port),
                        "--n",
                        str(n),
                        "--concurrency",
                        str(a.sessions),
                        "--size",
                        "1024",
                        "--acks",
                        str(acks),
                        "--prefix",
                        f"fault{int(t0)}",
                        "--deadline",
                        str(a.max_seconds),
                    ],
                    "smtp_load.py",
                    co,
                    subprocess.STDOUT,
                )
            deadline = time.time() + a.max_seconds
            acked = 0
            while time.time() < deadline and client.poll() is None:
                acked = count_acks(acks)
                if acked >= n // 2:
                    break
                time.sleep(0.05)
            if client.poll() is not None:
                raise SuiteError(f"fault: client ended before the kill ({acked} acked)")
            arrived_before = sum(1 for _ in Arrivals(arrivals).read())
            t_kill = time.time()
            tree = descendants(rd.pid)  # relayd's ingress process dies with it (PDEATHSIG)
            os.kill(rd.pid, signal.SIGKILL)
            rd.proc.wait(10)
            rd.reap()
            limit = time.time() + 10
            while not all(gone(p) for p in tree) and time.time() < limit:
                time.sleep(0.01)
            log(f"fault: SIGKILL relayd at {acked} acknowledged, {arrived_before} delivered")
            t220 = rd.start()
            log(f"fault: restarted, 220 after {t220:.2f} s")
            try:
                client.wait(a.max_seconds + 60)
            except subprocess.TimeoutExpired:
                raise SuiteError("fault: client did not finish in time") from None
            self.reap(client)
            client_line = (d / "client.out").read_text().strip().splitlines()[-1:] or [""]
            acked_map, fails = read_acks(acks)
            # wait for every acknowledged message at the sink (bounded), then a little longer
            reader = Arrivals(arrivals)
            got: Counter[str] = Counter()
            pairs: Counter[tuple[str, str]] = Counter()
            deadline = time.time() + a.max_seconds
            while time.time() < deadline:
                for _t, qid, m in reader.read():
                    got[m] += 1
                    pairs[(m, qid)] += 1
                if all(m in got for m in acked_map):
                    break
                time.sleep(0.1)
            time.sleep(3)
            for _t, qid, m in reader.read():
                got[m] += 1
                pairs[(m, qid)] += 1
            t_done = time.time()
        finally:
            if client is not None and client.poll() is None:
                self.terminate(client, 5)
            rc, stop_s = rd.stop()
            self.terminate(sink, 5)
        states = spool_states(d / "spool" / "relayd.sqlite")
        lost = [m for m in acked_map if m not in got]
        dup_total = sum(c - 1 for c in got.values() if c > 1)
        redeliveries = sum(c - 1 for c in pairs.values() if c > 1)
        resends = dup_total - redeliveries
        unacked_arrived = [m for m in got if m not in acked_map]
        ev = rd.events()
        self.rows["10"] = Row(
            "10",
            f"SIGKILL mid-run ({n:,} messages, 50 sessions), restart, finish: acknowledged "
            "messages lost; duplicates",
            f"lost {len(lost)} of {len(acked_map):,}; duplicates {dup_total}",
            target="lost = 0",
            met=not lost,
            load=la,
        )
        self.details.append(
            f"fault: load1={la} killed at {acked} acked / {arrived_before} delivered, "
            f"{t_kill - t0:.1f} s into the run; restart -> 220 {t220:.2f} s; client: "
            f"{client_line[0]}; "
            f"failed tries {fails}; acknowledged {len(acked_map)}, lost {len(lost)}, duplicates "
            f"{dup_total} "
            f"(relayd re-deliveries, same queue id: {redeliveries}; client re-sends after a lost "
            "250, "
            f"another queue id: {resends}); delivered but never acknowledged: "
            f"{len(unacked_arrived)}; "
            f"all acknowledged at the sink {t_done - t0 - 3:.1f} s after the start; spool after: "
            f"{states}; "
            f"relayd logs (both runs): accepted {ev['accepted']}, delivered {ev['delivered']}, "
            f"error events {ev['errors']}, stderr lines {ev['stderr_lines']}; SIGTERM -> exit "
            f"{stop_s:.1f} s (status {rc})"
        )
        if lost:
            self.anomalies.append(
                f"fault: {len(lost)} acknowledged messages never arrived, e.g. {lost[:5]}"
            )
        if set(states) - {"delivered", "bounced"} and states:
            self.anomalies.append(f"fault: spool not drained: {states}")
        if rc:
            self.anomalies.append(f"fault: relayd exit status {rc} after SIGTERM")

    # -- report ------------------------------------------------------------------------------

    def table(self) -> str:
        out = [
            "| # | metric | relayd | Postfix | relayd / Postfix | target | met | load avg (1 "
            "min) per rep |",
            "|---|---|---:|---:|---:|---|---|---|",
        ]
        order = [
            "1",
            "2",
            "3",
            "4",
            "4b",
            "5",
            "6",
            "7a",
            "7b",
            "7c",
            "8",
            "9",
            "9b",
            "10",
            "11",
            "12",
            "13a",
            "13b",
            "13c",
            "D13a",
            "D13b",
            "C9",
        ]
        for k in [*order, *(k for k in self.rows if k not in order)]:  # then newer rows
            r = self.rows.get(k)
            if r:
                out.append(
                    f"| {r.num} | {r.metric} | {r.relayd} | {r.postfix} | {r.ratio} | {r.target} | "
                    f"{yes_no(r.met)} | {r.load} |"
                )
        return "\n".join(out)


def _suppress() -> contextlib.suppress:
    return contextlib.suppress(OSError, subprocess.TimeoutExpired)


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError:
        return -1


# ------------------------------------------------------------------------------------------------
TRUSTED = 'trusted_networks = ["127.0.0.0/8"]'
CONFIG = """\
# generated by benchmarks/suite.py
[server]
hostname = "relayd.bench"
spool_path = "{spool}"
log_level = "info"
shutdown_timeout = "30s"

[[listeners]]
address = "127.0.0.1:{port}"
kind = "relay"

[ingress]
trusted_networks = ["127.0.0.0/8"]

[routes]
"*" = "127.0.0.1:{route_port}"

[shaping.default]
max_connections = 50
max_messages_per_connection = 1000
"""

API = """
[[listeners]]
address = "127.0.0.1:{port}"
kind = "http"

[auth]
users_file = "{users}"
"""

DKIM = """
[dkim]

[[dkim.keys]]
domain = "x.test"
selector = "bench"
algorithm = "rsa-sha256"
key_file = "{key}"
"""


class Relayd:
    """One relayd process (possibly started several times on the same config and spool)."""

    def __init__(
        self,
        suite: Suite,
        name: str,
        port: int,
        route_port: int,
        spool: Path,
        dkim_key: Path | None,
        api_port: int = 0,
    ) -> None:
        self.suite, self.name, self.port = suite, name, port
        self.dir = suite.tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        spool.parent.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "relayd.toml"
        text = CONFIG.format(spool=spool, port=port, route_port=route_port)
        if dkim_key is not None:
            text += DKIM.format(key=dkim_key)
        if api_port:
            text += API.format(port=api_port, users=self.dir / "users.json")
        self.config.write_text(text)
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60) -> float:
        """Start; seconds from just before the exec until a 220 greeting was read."""
        if listening(self.port):
            raise SuiteError(f"port {self.port} is already in use (--relayd-port / --relayd2-port)")
        self.runs += 1
        name = self.dir / f"relayd.{self.runs}"
        with open(f"{name}.log", "wb") as out, open(f"{name}.err", "wb") as err:
            t0 = time.time()
            self.proc = self.suite.spawn(
                [str(RELAYD), "--config", str(self.config)],
                f"relayd {self.name}",
                out,
                err,
                dict(os.environ, PYTHONPATH=str(SRC)),
            )
        p = self.proc
        t = wait_greeting(self.port, t0 + timeout, lambda: p.poll() is None)
        return t - t0

    def reap(self) -> None:
        if self.proc is not None:
            self.suite.reap(self.proc)

    def stop(self) -> tuple[int, float]:
        if self.proc is None:
            return 0, 0.0
        return self.suite.terminate(self.proc, 40)

    def _lines(self):  # type: ignore[no-untyped-def]
        for f in sorted(self.dir.glob("relayd.*.log")):
            with open(f, "rb") as fh:
                for line in fh:
                    try:
                        yield json.loads(line)
                    except ValueError:
                        yield {"event": "<not json>", "level": "error"}

    def events(self) -> dict[str, int]:
        c: Counter[str] = Counter()
        for e in self._lines():
            c[e.get("event", "?")] += 1
            if e.get("event") == "accepted" and e.get("dkim") is True:
                c["dkim_true"] += 1
            if e.get("level") == "error":
                c["errors"] += 1
        c["stderr_lines"] = sum(
            len(f.read_text(errors="replace").splitlines()) for f in self.dir.glob("relayd.*.err")
        )
        return {
            k: c.get(k, 0)
            for k in (
                "accepted",
                "delivered",
                "deferred",
                "bounced",
                "errors",
                "dkim_true",
                "stderr_lines",
            )
        } | dict(c)

    def event_time(self, name: str) -> float | None:
        from datetime import datetime

        for e in self._lines():
            if e.get("event") == name and "timestamp" in e:
                try:
                    return datetime.fromisoformat(
                        str(e["timestamp"]).replace("Z", "+00:00")
                    ).timestamp()
                except ValueError:
                    return None
        return None

    def started_field(self, key: str) -> Any:
        for e in self._lines():
            if e.get("event") == "started":
                return e.get(key)
        return None


class Arrivals:
    """Incremental reader of sink.py's file."""

    def __init__(self, path: Path) -> None:
        self.path, self.pos, self.rest = path, 0, b""

    def read(self) -> list[tuple[float, str, str]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return []
        self.pos += len(data)
        data = self.rest + data
        lines = data.split(b"\n")
        self.rest = lines.pop()
        out = []
        for line in lines:
            p = line.decode(errors="replace").split()
            if len(p) == 3:
                out.append((float(p[0]), p[1], p[2]))
        return out


def count_acks(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.startswith(b"ack "))
    except FileNotFoundError:
        return 0


def read_acks(path: Path) -> tuple[dict[str, str], int]:
    acked, fails = {}, 0
    for line in path.read_text().splitlines():
        p = line.split()
        if p and p[0] == "ack":
            acked[p[2]] = p[3]
        elif p and p[0] == "fail":
            fails += 1
    return acked, fails


def send_one(port: int, mid: str) -> None:
    msg = (
        f"From: <a@x.test>\r\nTo: <b@y.test>\r\nSubject: fresh\r\nMessage-ID: {mid}\r\n"
        f"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\n" + "X" * 76 + "\r\n"
    )
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail("a@x.test", ["b@y.test"], msg)


STATE_NAMES = {0: "pending", 1: "deferred", 2: "delivered", 3: "bounced", 4: "held", 5: "active"}


def spool_states(path: Path) -> dict[str, int]:
    return {STATE_NAMES.get(s, str(s)): k for s, k in admin.state_counts(path).items()}


def build_spool(path: Path, n: int, domains: int) -> float:
    """Fill an empty relayd spool with n deferred messages (one recipient each, about 1 KB),
    recipients spread over `domains` domains, next attempt 2 days ahead (the SQL is
    relayd.spool.admin.bulk_fill's). Returns the build time (unix)."""
    now = time.time()
    received = now - 3600
    base = int(received * 1e6) & 0xFFFFFFFFFFF
    head = (
        "Received: from app.bench ([127.0.0.1])\r\n\tby relayd.bench (relayd) with ESMTP id {qid};"
        "\r\n\tThu, 1 Jan 2026 00:00:00 +0000\r\nFrom: <a@x.test>\r\nTo: <u{i}@d{d}.test>\r\n"
        "Subject: spooled {i}\r\nMessage-ID: <spool-{i}@x.test>\r\n"
        "Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\n"
    )
    line = "X" * 76 + "\r\n"
    text_len = 1024 - 300
    text = (line * (text_len // len(line) + 1))[: text_len - 2] + "\r\n"
    batch = 50000

    def batches() -> Iterator[tuple[list[tuple], list[tuple]]]:
        for start in range(0, n, batch):
            msgs, rcpts = [], []
            for i in range(start, min(n, start + batch)):
                qid = f"{base + (i >> 20):011X}{i & 0xFFFFF:05X}"
                d = i % domains
                body = (head.format(qid=qid, i=i, d=d) + text).encode()
                msgs.append(
                    (
                        i + 1,
                        qid,
                        "a@x.test",
                        received,
                        len(body),
                        "127.0.0.1",
                        "app.bench",
                        "trusted:127.0.0.1",
                        0,
                        body,
                    )
                )
                rcpts.append(
                    (
                        i + 1,
                        i + 1,
                        f"u{i}@d{d}.test",
                        f"d{d}.test",
                        1,
                        now + 2 * 86400,
                        1,
                        451,
                        "4.4.1 bench: deferred",
                        "127.0.0.1:25",
                        now - 60,
                    )
                )
            yield msgs, rcpts

    admin.bulk_fill(path, batches())
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return now


# ------------------------------------------------------------------------------------------------
def git_rev() -> str:
    def git(*args: str) -> str:
        r = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
        )
        return r.stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--", "relayd", "pyproject.toml"):
        rev += "+dirty"
    return rev


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/suite.sh",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick", action="store_true", help="development: small N, 1 rep, 100,000-message spool"
    )
    p.add_argument(
        "--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md"
    )
    p.add_argument(
        "--keep-tmp", action="store_true", help="keep the temp dir (always kept on failure)"
    )
    p.add_argument(
        "--phases",
        default="rates,body,spool,restart,fault,memory,api,lanes,suppression,campaign",
        help="comma list of rates (rows 1-5, 9), body (4b, 9b), spool (6, 8), restart (7), "
        "fault (10), memory (11, 12), api (13a-c), lanes (D13a), suppression (D13b), "
        "campaign (C9)",
    )
    p.add_argument("--n", type=int, help="messages per rate rep (full 20000, quick 2000)")
    p.add_argument("--reps", type=int, help="reps per rate row and of row 7 (full 3, quick 1)")
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument(
        "--spool-n",
        type=int,
        help="deferred messages in the big spool (full 1000000, quick 100000)",
    )
    p.add_argument(
        "--domains", type=int, help="their destination domains (full 100000, quick 10000)"
    )
    p.add_argument(
        "--due-now", type=int, default=1000, help="row 7: spooled messages made due at start"
    )
    p.add_argument("--row8-n", type=int, help="row 8: messages per rep (default: --n)")
    p.add_argument("--fault-n", type=int, help="row 10: messages (full 20000, quick 2000)")
    p.add_argument("--body-n", type=int, help="rows 4b/9b: 100 KB messages per rep (--n / 2)")
    p.add_argument(
        "--mem-n", type=int, help="row 11: deferred 5 MB messages (full 2000, quick 200)"
    )
    p.add_argument("--mem-sessions", type=int, default=10, help="row 11: smtp-source sessions")
    p.add_argument("--api-n", type=int, help="row 13a: messages per rep (full 100000, quick 10000)")
    p.add_argument("--api-rate", type=float, default=200.0, help="row 13b: API calls per second")
    p.add_argument("--api-seconds", type=float, help="row 13b: seconds (full 20, quick 5)")
    p.add_argument("--api-port", type=int, default=2570, help="rows 13a, 13b: the API listener")
    p.add_argument("--drain-n", type=int, help="row 13c: messages (full 20000, quick 2000)")
    p.add_argument(
        "--suppressed", type=int, help="row D13b: suppressed addresses (full 1000000, quick 100000)"
    )
    p.add_argument(
        "--lanes-bulk", type=int, help="row D13a: bulk messages (full 100000, quick 10000)"
    )
    p.add_argument("--lanes-rate", type=int, default=500, help="row D13a: the site's max_rate/s")
    p.add_argument(
        "--lanes-tx-rate", type=float, default=5.0, help="row D13a: transactional mail per second"
    )
    p.add_argument(
        "--lanes-seconds", type=float, help="row D13a: seconds of transactional mail (60, quick 10)"
    )
    p.add_argument("--campaign-n", type=int, help="row C9: contacts (full 100000, quick 10000)")
    p.add_argument("--campaign-wait", type=float, default=5.0, help="row C9: A/B wait, s")
    p.add_argument(
        "--idle", type=float, help="row 6: seconds idle before reading VmRSS (full 5, quick 3)"
    )
    p.add_argument(
        "--max-seconds", type=int, default=600, help="bound for each load's injection and drain"
    )
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "relayd-suite-cache"))
    p.add_argument("--postfix-port", type=int, default=2565)
    p.add_argument("--sink-port", type=int, default=2566, help="smtp-sink (rows 1-6, 8, 9)")
    p.add_argument("--relayd-port", type=int, default=2567)
    p.add_argument("--relayd2-port", type=int, default=2568, help="row 8's empty-spool relayd")
    p.add_argument("--pysink-port", type=int, default=2569, help="sink.py (rows 7, 10)")
    a = p.parse_args(argv)
    q = a.quick
    a.n = a.n or (2000 if q else 20000)
    a.reps = a.reps or (1 if q else 3)
    a.spool_n = a.spool_n or (100_000 if q else 1_000_000)
    a.domains = a.domains or max(1, a.spool_n // 10)
    a.row8_n = a.row8_n or a.n
    a.fault_n = a.fault_n or a.n
    a.body_n = a.body_n or a.n // 2
    a.mem_n = a.mem_n or (200 if q else 2000)
    a.api_n = a.api_n or (10_000 if q else 100_000)
    a.api_seconds = a.api_seconds or (5.0 if q else 20.0)
    a.drain_n = a.drain_n or (2000 if q else 20000)
    a.suppressed = a.suppressed or (100_000 if q else 1_000_000)
    a.lanes_bulk = a.lanes_bulk or (10_000 if q else 100_000)
    a.lanes_seconds = a.lanes_seconds or (10.0 if q else 60.0)
    a.campaign_n = a.campaign_n or (10_000 if q else 100_000)
    a.idle = a.idle if a.idle is not None else (3 if q else 5)
    a.phases = [x.strip() for x in a.phases.split(",") if x.strip()]
    known = {
        "rates",
        "body",
        "spool",
        "restart",
        "fault",
        "memory",
        "api",
        "lanes",
        "suppression",
        "campaign",
    }
    bad = set(a.phases) - known
    if bad:
        p.error(f"unknown phases {sorted(bad)}")
    return a


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    cmd = "benchmarks/suite.sh" + ("".join(" " + shlex.quote(x) for x in argv))
    if os.environ.get("RELAYD_SRC"):
        cmd = f"RELAYD_SRC={shlex.quote(str(SRC))} {cmd}"
    if os.geteuid() != 0:
        print("suite: must run as root (configures and starts Postfix)", file=sys.stderr)
        return 2
    for f in (PEER, LOAD, RELAYD):
        if not os.access(f, os.X_OK):
            print(f"suite: missing {f}", file=sys.stderr)
            return 2
    run_dir = Path(os.environ.get("RUN_DIR") or os.path.join(tempfile.gettempdir(), "relay-bench"))
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = open(run_dir / "suite.lock", "w")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("suite: another suite run holds " + str(run_dir / "suite.lock"), file=sys.stderr)
        return 2
    s = Suite(a)
    s.run_dir = run_dir
    s.tmp = Path(tempfile.mkdtemp(prefix="relayd-suite."))
    s.stale()

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    la_start = loadavg()
    rev = git_rev()
    log(f"command: {cmd}; temp dir {s.tmp}; relayd commit {rev}; loadavg {la_start}")
    t_start = time.monotonic()
    rc = 0
    try:
        s.peer("down", check=False)
        s.postfix_queue_hygiene()
        for port, what in (
            (a.postfix_port, "--postfix-port"),
            (a.sink_port, "--sink-port"),
            (a.relayd_port, "--relayd-port"),
            (a.relayd2_port, "--relayd2-port"),
            (a.pysink_port, "--pysink-port"),
            (a.api_port, "--api-port"),
        ):
            if listening(port):
                raise SuiteError(f"port {port} is in use ({what})")
        for phase in a.phases:
            t = time.monotonic()
            log(f"=== phase {phase}")
            try:
                getattr(s, f"phase_{phase}")()
            except SuiteError as exc:  # report it, stop what the phase left running, go on
                log(f"ERROR in phase {phase}: {exc}")
                s.anomalies.append(f"phase {phase} failed: {exc}")
                rc = 1
                s.cleanup()
            s.notes.append(f"phase {phase}: {time.monotonic() - t:.0f} s")
    except SuiteError as exc:
        log(f"ERROR: {exc}")
        s.anomalies.append(f"suite stopped: {exc}")
        rc = 1
    except SystemExit as exc:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        log("interrupted")
        rc = int(exc.code or 1)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        s.cleanup()
    if rc and rc >= 128:
        log(f"kept {s.tmp}")
        return rc
    total = time.monotonic() - t_start
    la_end = loadavg()
    mode = "quick" if a.quick else "full"
    params = (
        f"N={a.n:,} per rate rep, {a.reps} rep(s), {a.sessions} sessions; spool "
        f"{s.spool_n or a.spool_n:,} "
        f"deferred over {s.facts.get('domains', a.domains):,} domains, {a.due_now:,} due at "
        "restart; "
        f"row 8 N={a.row8_n:,}; row 10 N={a.fault_n:,}"
    )
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    table = s.table()
    text = [
        f"## {start} — suite ({mode}): {params}",
        "",
        f"Command: `{cmd}`; relayd commit {rev}; {NCPU} vCPU {cpu}; load average at start "
        f"{la_start}, at end {la_end}; {total / 60:.1f} min.",
        "",
        "fsync policy: relayd — SQLite WAL, `synchronous=FULL`, group commit, 250 only after the "
        "commit is durable (every relayd figure, the 1M spool rows included: the builder wrote "
        "that spool without fsyncs, relayd then ran on it with its own settings); Postfix — "
        "cleanup fsyncs each queue file before smtpd's 250 (defaults).",
        "",
        table,
        "",
    ]
    if s.notes:
        text += ["Notes:", ""] + [f"- {x}" for x in s.notes] + [""]
    text += [
        "Checks: "
        + (
            "all relayd accounts add up (accepted = delivered = N, no error event, nothing on "
            "stderr, exit 0 on SIGTERM)"
            if not s.anomalies
            else "**anomalies:** " + "; ".join(s.anomalies)
        ),
        "",
        "Per rep: load1 = 1-minute load average at its start; busy = all CPUs' busy share;"
        " foreign = the share busy outside the relay and smtp-source (sink, kernel, other work"
        " on the machine).",
        "",
        "```",
        *s.details,
        "```",
    ]
    report = "\n".join(text)
    print()
    print(report)
    if not a.no_record:
        res = BENCH / "RESULTS.md"
        with open(res, "a", encoding="utf-8") as f:
            f.write("\n" + report + "\n")
        log(f"appended to {res}")
    if a.keep_tmp or rc or s.anomalies:
        log(f"kept {s.tmp}")
    else:
        shutil.rmtree(s.tmp, ignore_errors=True)
    return rc or (7 if s.anomalies else 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
