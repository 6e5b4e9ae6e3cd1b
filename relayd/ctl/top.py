"""relayctl top: a live terminal view of a running relayd, from its /metrics endpoint.

It scrapes the queue process's operations listener ([monitoring] address in the config relayctl
loads) every --interval seconds and shows what relayd does now (relayd.ctl.topview computes
it): rates in and out, delivery latency percentiles over the last minute, the busiest sites,
source addresses and their state, queue and backlogs, spool and disk, both processes' CPU and
memory. Drawn with rich's Live on the alternate screen; q quits. ``--once`` (and ``--json``)
scrape twice, an interval apart, and print one frame (one JSON snapshot) for scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import select
import sys
import termios
import time
import tty
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from rich.console import Console, Group
from rich.filesize import decimal
from rich.live import Live
from rich.table import Table
from rich.text import Text

from relayd.config import Config
from relayd.ctl import topview
from relayd.spool import admin

FIXED_LINES = 11  # the frame's lines besides the tables' rows: 7 summary, 2 titles, 2 headers


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "top", parents=[common], help="live view of a running relayd (its /metrics); q quits"
    )
    p.add_argument(
        "--interval",
        type=_interval,
        default=1.0,
        metavar="SECONDS",
        help="between refreshes (default 1)",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="print one frame (two scrapes an interval apart) and exit; --json: one snapshot",
    )
    p.set_defaults(run=run, render=str, needs="config")


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0.1 <= value <= 3600:  # nan too
        raise argparse.ArgumentTypeError(f"expected 0.1 to 3600 seconds, got {text!r}")
    return value


def run(cfg: Config, args: argparse.Namespace) -> Any:
    """Scrape; print one frame or snapshot (--once, --json), or run the live view until q."""
    if cfg.monitoring.address is None:
        raise admin.Refused(
            f'{args.config}: monitoring.address is off (""): top reads relayd\'s /metrics there'
        )
    url = f"http://{cfg.monitoring.address}/metrics"
    history: deque[topview.Scrape] = deque()
    scrape = Scraper(url, history)
    scrape()  # a relayd that does not answer: the one-line error, exit 1
    if args.once or args.json:
        _wait(args.interval)
        scrape()
        snap = topview.snapshot(history)
        if args.json:
            return snap
        out = io.StringIO()
        console = Console(file=out, width=Console().width, color_system=None)
        console.print(frame(snap, url, None, 10**6))
        return out.getvalue().rstrip("\n")
    _live(scrape, url, args.interval)
    return ""


class Scraper:
    """GET /metrics into ``history``, keeping the scrapes of the last window. Straight to
    relayd: an http_proxy in the environment is for the world, not for relayd's own port."""

    def __init__(self, url: str, history: deque[topview.Scrape]) -> None:
        self.url, self.history = url, history
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __call__(self) -> None:
        try:
            with self.opener.open(self.url, timeout=5) as response:
                text = response.read().decode("utf-8")
        except urllib.error.HTTPError as exc:
            raise admin.Refused(f"{self.url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            why = getattr(reason, "strerror", None) or str(reason)
            raise admin.Refused(f"no relayd answers at {self.url}: {why.lower()}") from None
        try:
            self.history.append(topview.parse(text, time.monotonic()))
        except ValueError as exc:
            raise admin.Refused(f"{self.url}: not Prometheus text: {exc}") from None
        now = self.history[-1].at
        while len(self.history) > 2 and self.history[1].at <= now - topview.WINDOW_S:
            self.history.popleft()


def _live(scrape: Scraper, url: str, interval: float) -> None:
    """Refresh every interval on the alternate screen until q (or ^C); a failed scrape shows
    its error above the last figures and the next one is tried an interval later."""
    console = Console()
    error: str | None = None
    with (
        contextlib.suppress(KeyboardInterrupt),
        _keys() as key,
        Live(console=console, screen=True, auto_refresh=False) as live,
    ):
        while True:
            due = time.monotonic() + interval
            snap = topview.snapshot(scrape.history)
            live.update(frame(snap, url, error, console.size.height), refresh=True)
            while (left := due - time.monotonic()) > 0:
                if key(left) in ("q", "Q"):
                    return
            try:
                scrape()
                error = None
            except admin.Refused as exc:
                error = f"{datetime.now():%H:%M:%S} {exc}"


@contextlib.contextmanager
def _keys() -> Iterator[Callable[[float], str]]:
    """A reader of single key presses (the terminal in cbreak mode while it lasts): it waits
    up to a timeout and returns the key, or "" when none came."""
    if not sys.stdin.isatty():

        def wait(timeout: float) -> str:
            _wait(timeout)
            return ""

        yield wait
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def read(timeout: float) -> str:
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 1).decode("latin-1") if ready else ""

    try:
        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait(seconds: float) -> None:
    """The refresh interval itself (not a wait for a condition): nothing to poll."""
    time.sleep(seconds)


# -- the frame ---------------------------------------------------------------------------


def frame(snap: dict[str, Any], url: str, error: str | None, height: int) -> Group:
    """One screen: summary lines, then the sites and sources tables cut to the height."""
    r, lat, q, b, s, p = (
        snap[k] for k in ("rates", "latency", "queue", "backlog", "spool", "processes")
    )
    head = Text.assemble(
        (f"relayd {snap['version'] or '?'}", "bold"),
        f"  {url}  {datetime.now():%H:%M:%S}  (q quits)",
    )
    lines = [head]
    if error:
        lines.append(Text(error, style="bold red"))
    lines.append(
        Text(
            f"in {_rate(r['received'])} msg/s  delivered {_rate(r['delivered'])}/s"
            f"  deferred {_rate(r['deferred'])}/s  bounced {_rate(r['bounced'])}/s"
            f"  expired {_rate(r['expired'])}/s"
        )
    )
    lines.append(
        Text(
            f"latency (last {lat['window_s']:.0f}s, {lat['count']} delivered)"
            f"  p50 {_dur(lat['p50'])}  p90 {_dur(lat['p90'])}  p99 {_dur(lat['p99'])}"
        )
    )
    lines.append(
        Text(
            "queue: "
            + "  ".join(
                f"{state} {_n(v['recipients'])}"
                + (f" (oldest {_dur(v['oldest_s'])})" if v["recipients"] else "")
                for state, v in q.items()
            )
        )
    )
    hooks = b["webhooks"]
    failing = sum(h["failing"] for h in hooks)
    lines.append(
        Text.assemble(
            f"backlog: event log {_n(b['event_log'])}  webhooks "
            f"{_n(sum(h['events'] or 0 for h in hooks))} events",
            (f" ({failing} failing)", "bold red") if failing else "",
        )
    )
    lines.append(
        Text(
            f"spool {_bytes(s['bytes'])}  disk free {_bytes(s['disk_free_bytes'])}"
            f" (relayd refuses mail below {_bytes(s['disk_min_free_bytes'])})"
        )
    )
    lines.append(
        Text(
            "processes: "
            + "  ".join(
                f"{name} cpu {_pct(v['cpu_pct'])} rss {_bytes(v['rss_bytes'])}"
                f" fds {_n(v['open_fds'])}"
                for name, v in p.items()
            )
        )
    )
    for line in lines:  # one line each, whatever the width: the tables get the rest
        line.no_wrap, line.overflow = True, "ellipsis"
    room = max(height - FIXED_LINES - (1 if error else 0), 2)
    sources = snap["sources"][: max(1, room // 3)]
    sites = snap["sites"][: room - len(sources)]
    return Group(*lines, _sites_table(snap, sites), _sources_table(snap, sources))


def _sites_table(snap: dict[str, Any], rows: list[dict[str, Any]]) -> Table:
    more = len(snap["sites"]) - len(rows)
    title = f"sites, last {snap['latency']['window_s']:.0f}s" + (f" (+{more} more)" if more else "")
    t = _table(title)
    t.add_column("site", ratio=1, min_width=16, no_wrap=True, overflow="ellipsis")
    for col in ("conns", "tries/s", "sent/s", "deferred", "bounced", "waits/s"):
        t.add_column(col, justify="right", no_wrap=True)
    for row in rows:
        deferred = row["deferred_pct"]
        t.add_row(
            row["site"],
            _n(row["connections"]),
            _rate(row["attempts_per_s"]),
            _rate(row["delivered_per_s"]),
            Text(_pct(deferred), style="bold red" if deferred and deferred >= 10 else ""),
            _pct(row["bounced_pct"]),
            _rate(row["throttle_waits_per_s"]),
        )
    return t


def _sources_table(snap: dict[str, Any], rows: list[dict[str, Any]]) -> Table:
    more = len(snap["sources"]) - len(rows)
    suspended = sum(1 for r in snap["sources"] if r["suspended_sites"])
    title = f"sources ({suspended} suspended somewhere)" + (f" (+{more} more)" if more else "")
    t = _table(title)
    t.add_column("source", ratio=1, min_width=16, no_wrap=True, overflow="ellipsis")
    for col in ("state", "conns", "warm-up today"):
        t.add_column(col, justify="right", no_wrap=True)
    for row in rows:
        if row["blacklisted"]:
            state = Text("BLACKLISTED", style="bold red")
        elif row["suspended_sites"]:
            state = Text(f"suspended at {row['suspended_sites']}", style="yellow")
        else:
            state = Text("ok")
        warmup = "-"
        if row["warmup_limit"] is not None:
            warmup = f"{_n(row['warmup_sent'])}/{_n(row['warmup_limit'])}"
        t.add_row(row["source"], state, _n(row["connections"]), warmup)
    return t


def _table(title: str) -> Table:
    """Borderless: a title line, a bold header line, then one line a row."""
    return Table(
        title=title, title_justify="left", title_style="bold", box=None, pad_edge=False, expand=True
    )


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _bytes(value: int | None) -> str:
    return "-" if value is None else decimal(value)


def _dur(seconds: float | None) -> str:
    """0.85 -> 850ms, 2.1 -> 2.1s, 185 -> 3m05s, 7380 -> 2h03m."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"
