"""Adaptive shaping: a provider's replies slow down or pause the source address that got them.

The rules (``[shaping]`` rules files, checked by the config, compiled here) say which replies of
which provider's sites hold a source, and how: ``suspend`` (no connection from it to the site)
or ``rate`` (its rate there times a factor, its connections capped). ``Holds`` keeps the holds
in force, per site and source, and decides what a matching reply changes: a new hold, a later
end for one in force (a rate is not lowered again: a factor applies once), or nothing. Pure and
without I/O: the scheduler stores each change with its event and enforces the holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import re2

from relayd.config import AdaptiveRule, Rate, re2_options
from relayd.shaping import Throttle

SUSPEND, RATE = "suspend", "rate"
WINDOW = 60.0  # seconds over which a source's sending rate to a site is measured
SYSTEM = ""  # the source of connections made without a pool: the system's own address

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?=\s|$)")


_CODES, _TEXTS = re2_options(True), re2_options(False)


def split(text: str) -> tuple[str, str]:
    """A reply text as relayd keeps it -> its enhanced code ("" without) and the rest, the
    lines of a multi-line reply (each repeating the enhanced code) joined by one space."""
    m = _ENHANCED.match(text)
    enhanced = m.group(0) if m else ""
    plain = text[m.end() :].lstrip() if m else text
    if "\n" in plain:
        prefix = f"{enhanced} " if enhanced else ""
        plain = " ".join(line.removeprefix(prefix).strip() for line in plain.split("\n"))
    return enhanced, plain


@dataclass(frozen=True)
class _Rule:
    rule: AdaptiveRule
    code: Any  # compiled re2 patterns, or None
    enhanced: Any
    text: Any


class Rules:
    """The compiled rules, in order: the first that matches a reply of the site's provider."""

    def __init__(self, rules: Iterable[AdaptiveRule]) -> None:
        def compiled(pattern: str | None, options: re2.Options) -> Any:
            return None if pattern is None else re2.compile(pattern, options)

        self._rules = [
            _Rule(
                r, compiled(r.code, _CODES), compiled(r.enhanced, _CODES), compiled(r.text, _TEXTS)
            )
            for r in rules
        ]

    def __bool__(self) -> bool:
        return bool(self._rules)

    def match(self, provider: str, code: int, text: str) -> AdaptiveRule | None:
        """The rule for a reply (``code`` and its text as relayd keeps it) from a site of
        ``provider`` ("" for a site of no provider: only "*" rules apply there)."""
        number = str(code)
        enhanced, plain = split(text)
        for r in self._rules:
            if r.rule.provider != "*" and r.rule.provider != provider:
                continue
            if r.code is not None and not r.code.fullmatch(number):
                continue
            if r.enhanced is not None and not (enhanced and r.enhanced.fullmatch(enhanced)):
                continue
            if r.text is not None and not r.text.search(plain):
                continue
            return r.rule
        return None


@dataclass
class Hold:
    """A source held at a site, from ``since`` to ``until`` (wall clock), by ``rule``."""

    site: str
    source_ip: str  # SYSTEM: the connections made without a pool
    action: str  # SUSPEND or RATE
    rule: str
    code: int
    reply: str
    since: float
    until: float
    factor: float = 1.0
    rate: Rate | None = None  # RATE: the source's rate at the site while held (None: as it is)
    connections: int | None = None  # RATE: its connections there at most
    id: int = 0  # its row in the spool, once stored
    limiter: Throttle | None = None  # the scheduler's throttle at ``rate``

    def data(self) -> dict[str, Any]:
        """The keys of its events."""
        data: dict[str, Any] = {
            "hold": self.id,
            "action": self.action,
            "site": self.site,
            "source_ip": self.source_ip,
            "rule": self.rule,
        }
        if self.action == RATE:
            data["factor"] = self.factor
            if self.rate is not None:
                data["rate_per_min"] = round(self.rate.count * 60 / self.rate.period, 3)
            if self.connections is not None:
                data["connections"] = self.connections
        return data


class Meter:
    """Messages a source sent to a site in about the last WINDOW seconds (the current window,
    and the one before it weighted by how much of it is still in the last WINDOW)."""

    __slots__ = ("count", "previous", "start")

    def __init__(self, now: float) -> None:
        self.start, self.count, self.previous = now, 0, 0

    def tick(self, now: float) -> None:
        self._roll(now)
        self.count += 1

    def rate(self, now: float) -> Rate:
        """The rate measured, at least one message per WINDOW."""
        self._roll(now)
        recent = self.previous * (1 - (now - self.start) / WINDOW) + self.count
        return Rate(max(recent, 1.0), WINDOW)

    def idle(self, now: float) -> bool:
        return now - self.start >= 2 * WINDOW

    def _roll(self, now: float) -> None:
        elapsed = now - self.start
        if elapsed >= 2 * WINDOW:
            self.start, self.count, self.previous = now, 0, 0
        elif elapsed >= WINDOW:
            self.start, self.count, self.previous = self.start + WINDOW, 0, self.count


class Holds:
    """The holds in force, by site and (source, action); and what each source sends where."""

    def __init__(self) -> None:
        self._sites: dict[str, dict[tuple[str, str], Hold]] = {}
        self._meters: dict[tuple[str, str], Meter] = {}
        self._pruned = 0.0  # when quiet meters were last forgotten (monotonic)

    def __iter__(self) -> Iterator[Hold]:
        return (h for held in self._sites.values() for h in held.values())

    def find(self, site: str, source: str | None, action: str) -> Hold | None:
        """The hold of ``source`` at ``site`` (None: the site's connections made without a pool,
        which any hold of the site holds: they have one source, the system's address)."""
        held = self._sites.get(site)
        if not held:
            return None
        if source is not None:
            return held.get((source, action))
        return next((h for (_, a), h in held.items() if a == action), None)

    def blocks(self, site: str, source: str | None, connections: int) -> bool:
        """Whether ``source``, with ``connections`` open to ``site``, may not open another."""
        if site not in self._sites:
            return False
        if self.find(site, source, SUSPEND) is not None:
            return True
        rated = self.find(site, source, RATE)
        return (
            rated is not None and rated.connections is not None and connections >= rated.connections
        )

    def apply(
        self,
        rule: AdaptiveRule,
        site: str,
        source: str,
        code: int,
        reply: str,
        now: float,
        base: Rate,
    ) -> tuple[Hold, bool] | None:
        """What a reply matching ``rule`` changes: (a new hold, True), (a hold in force with a
        later end, False), or None. ``now``: wall time, the hold's ends are in it; ``base``:
        the rate a rate rule's factor applies to (the configured one, else the measured)."""
        until = now + rule.duration
        held = self._sites.setdefault(site, {})
        hold = held.get((source, rule.action))
        if hold is not None:
            if until <= hold.until:
                return None
            hold.until = until
            return hold, False
        rate = None
        if rule.action == RATE and rule.factor < 1:
            rate = Rate(base.count * rule.factor, base.period)
        hold = Hold(
            site, source, rule.action, rule.name, code, reply, now, until, rule.factor, rate
        )
        hold.connections = rule.connections if rule.action == RATE else None
        held[(source, rule.action)] = hold
        return hold, True

    def add(self, hold: Hold) -> None:
        """A hold stored by an earlier run."""
        self._sites.setdefault(hold.site, {})[(hold.source_ip, hold.action)] = hold

    def lapse(self, now: float, monotonic: float) -> list[Hold]:
        """Take out the holds whose end has come; forget meters gone quiet."""
        ended = [h for h in self if h.until <= now]
        self._take(ended)
        if monotonic - self._pruned >= WINDOW:
            self._pruned = monotonic
            for key in [k for k, m in self._meters.items() if m.idle(monotonic)]:
                del self._meters[key]
        return ended

    def remove(self, ids: Iterable[int]) -> list[Hold]:
        """Take out the holds stored as ``ids`` (an operator cleared them)."""
        wanted = set(ids)
        gone = [h for h in self if h.id in wanted]
        self._take(gone)
        return gone

    def sent(self, site: str, source: str, monotonic: float) -> None:
        """``source`` sends a message to ``site`` now."""
        meter = self._meters.get((site, source))
        if meter is None:
            meter = self._meters[(site, source)] = Meter(monotonic)
        meter.tick(monotonic)

    def sent_rate(self, site: str, source: str, monotonic: float) -> Rate:
        meter = self._meters.get((site, source))
        return meter.rate(monotonic) if meter else Rate(1.0, WINDOW)

    def _take(self, holds: list[Hold]) -> None:
        for h in holds:
            held = self._sites.get(h.site, {})
            held.pop((h.source_ip, h.action), None)
            if not held:
                self._sites.pop(h.site, None)
