"""IP warm-up: a new source address sends a rising volume per provider per day.

A source with ``warmup = NAME`` in its [pools.*] entry follows [warmup.schedules.NAME]: on day
N of its warm-up (day 1 is ``warmup_start``, or the day relayd first saw it; days are UTC dates)
it may send to each provider the Nth volume of the provider's list (``per_provider``) or of
``days``; past the end of that list it has no quota there, and past the end of every list of its
schedule it is warm. Before its first day it sends nothing.

What counts is recipients: a transaction to a provider counts its recipients there when it
starts, and starts while the day's count is below the volume (so the count may pass the volume
by one transaction's recipients less one). The counts live here, in memory, for the current
day; the scheduler saves them through the spool writer (``relayd.spool.warmup``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from relayd.config import Pools, WarmupSchedule, WarmupSchedules

Key = tuple[str, str]  # (source address, provider)


def utc_day(when: float) -> date:
    """The UTC date of a timestamp: warm-up days turn at UTC midnight."""
    return datetime.fromtimestamp(when, UTC).date()


def next_day(when: float) -> float:
    """The timestamp of the UTC midnight after ``when``."""
    midnight = datetime.combine(utc_day(when) + timedelta(days=1), datetime.min.time(), UTC)
    return midnight.timestamp()


def day_number(start: date, today: date) -> int:
    """Day 1 is ``start``; 0 or less: the warm-up has not begun."""
    return (today - start).days + 1


@dataclass(frozen=True)
class Plan:
    """One source address's warm-up, as configured (``start`` None: the day first seen)."""

    address: str
    schedule: str
    rule: WarmupSchedule
    start: date | None

    @property
    def length(self) -> int:
        """Days until the source is warm everywhere: its schedule's longest list."""
        return max(len(days) for days in (self.rule.days, *self.rule.per_provider.values()))

    def volume(self, provider: str | None, day: int) -> int | None:
        """What ``provider`` (None: one without a list of its own) may get on ``day``: 0
        before day 1, None (no quota) past its list."""
        if day < 1:
            return 0
        days = self.rule.per_provider.get(provider, self.rule.days) if provider else self.rule.days
        return days[day - 1] if day <= len(days) else None

    def warm_key(self, start: date) -> str:
        """Names the warm-up a ``warmed`` event reports: a new schedule or start is another."""
        return f"{self.schedule}@{start.isoformat()}"


def plans(pools: Pools, schedules: WarmupSchedules) -> dict[str, Plan]:
    """Each source address in warm-up -> its plan (config makes every entry of an address
    agree, and every schedule named exist)."""
    return {
        src.address: Plan(src.address, src.warmup, schedules[src.warmup], src.warmup_start)
        for sources in pools.values()
        for src in sources
        if src.warmup
    }


class Warmup:
    """The current day's counts of the sources in warm-up, per provider.

    Until ``load`` has given it what the spool holds (the day's counts, first-seen days,
    warm-ups reported finished), no source in warm-up may send: a restart must not begin the
    day again. Addresses not in warm-up are never held back.
    """

    def __init__(self, plans: dict[str, Plan], clock: Callable[[], float] = time.time) -> None:
        self.plans, self.clock = plans, clock
        self.loaded = False
        self.day = utc_day(clock())
        self.sent: Counter[Key] = Counter()
        self.dirty: set[Key] = set()  # counts changed since they were last saved
        self.first_seen: dict[str, date] = {}  # address -> the day relayd first saw it warming
        self.recorded: set[str] = set()  # ... of these, the addresses the spool has
        self.reported: dict[str, str] = {}  # address -> the warm-up its `warmed` event reported

    def reload(self, plans: dict[str, Plan]) -> None:
        self.plans = plans

    def today(self) -> date:
        self._roll()
        return self.day

    def load(
        self,
        day: date,
        counts: Iterable[tuple[str, str, int]],
        first_seen: dict[str, date],
        reported: dict[str, str],
    ) -> None:
        """What the spool holds: the counts of ``day`` (ip, provider, sent) and its sources."""
        if day == self.today():
            self.sent = Counter({(ip, provider): sent for ip, provider, sent in counts})
        self.saved(first_seen, reported)
        self.loaded = True

    # -- the scheduler's questions ----------------------------------------------------------

    def start_of(self, ip: str) -> date | None:
        """Day 1 of ``ip``'s warm-up; None for an address not in warm-up."""
        plan = self.plans.get(ip)
        if plan is None:
            return None
        return plan.start or self.first_seen.setdefault(ip, self.day)

    def allowed(self, ip: str, provider: str) -> int | None:
        """Today's volume of ``ip`` to ``provider``; None: no quota."""
        plan = self.plans.get(ip)
        if plan is None:
            return None
        self._roll()
        start = self.start_of(ip)
        assert start is not None
        return plan.volume(provider, day_number(start, self.day))

    def allows(self, ip: str, provider: str) -> bool:
        """May a transaction from ``ip`` to ``provider`` start now?"""
        if ip not in self.plans:
            return True
        if not self.loaded:
            return False
        allowed = self.allowed(ip, provider)
        return allowed is None or self.sent[(ip, provider)] < allowed

    def spent(self, ip: str, provider: str) -> bool:
        """Is today's volume of ``ip`` to ``provider`` used up (known, not merely unloaded)?"""
        return self.loaded and not self.allows(ip, provider)

    def take(self, ip: str, provider: str, count: int) -> bool:
        """Start a transaction of ``count`` recipients if it may start: counted then."""
        if not self.allows(ip, provider):
            return False
        if self.allowed(ip, provider) is not None:
            self.sent[(ip, provider)] += count
            self.dirty.add((ip, provider))
        return True

    # -- what is saved ------------------------------------------------------------------------

    def changes(self) -> list[tuple[str, str, int]]:
        """The counts of today changed since the last call (ip, provider, sent); given back
        with ``unsaved`` when they could not be written."""
        self._roll()
        rows = [(ip, provider, self.sent[(ip, provider)]) for ip, provider in sorted(self.dirty)]
        self.dirty.clear()
        return rows

    def unsaved(self, day: date, rows: Iterable[tuple[str, str, int]]) -> None:
        if day == self.today():
            self.dirty.update((ip, provider) for ip, provider, _ in rows)

    def unrecorded(self) -> dict[str, date]:
        """The addresses in warm-up the spool does not know yet, with their first day seen."""
        self._roll()
        return {
            ip: self.first_seen.setdefault(ip, self.day)
            for ip in sorted(self.plans)
            if ip not in self.recorded
        }

    def saved(self, first_seen: dict[str, date], reported: dict[str, str]) -> None:
        """What the spool holds now: its first-seen days win over those guessed here."""
        self.first_seen |= first_seen
        self.recorded = set(first_seen)
        self.reported = dict(reported)

    def finished(self) -> list[tuple[Plan, date]]:
        """The sources past their last day whose warm-up no ``warmed`` event has reported."""
        self._roll()
        done = []
        for ip, plan in sorted(self.plans.items()):
            start = self.start_of(ip)
            assert start is not None
            past = day_number(start, self.day) > plan.length
            if past and self.reported.get(ip) != plan.warm_key(start):
                done.append((plan, start))
        return done

    def _roll(self) -> None:
        """A new UTC day: the counts begin again."""
        today = utc_day(self.clock())
        if today != self.day:
            self.day = today
            self.sent.clear()
            self.dirty.clear()
