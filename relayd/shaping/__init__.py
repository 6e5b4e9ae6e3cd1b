"""Traffic shaping: message rates (GCRA) and weighted rotation of source addresses.

Connection limits are plain counters kept by the scheduler's sites; what lives here is the
arithmetic that decides *when* the next message may go and *from where*.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from relayd.config import Rate, Source


class Throttle(Protocol):
    """A rate the scheduler books sending slots from. Gcra keeps it in this process; a store
    shared by several relayd hosts sending to the same destinations can implement the same
    two calls."""

    def reserve(self) -> float:
        """Book the next slot; seconds to wait for it."""
        ...

    def idle(self) -> bool:
        """No slot booked ahead: forgetting the throttle would let nothing through early."""
        ...


# How the scheduler makes a throttle for a rate, on its monotonic clock.
ThrottleFactory = Callable[[Rate, Callable[[], float]], Throttle]


class Gcra:
    """Generic cell rate algorithm: smooth spacing at ``rate`` with no burst beyond one.

    ``reserve()`` books the next slot and says how long to wait for it, so concurrent senders
    never share a slot and the rate holds however many connections there are.
    """

    def __init__(self, rate: Rate, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self._clock, self._tat = rate, clock, 0.0

    def reserve(self) -> float:
        now = self._clock()
        tat = max(self._tat, now)
        self._tat = tat + self.rate.interval
        return tat - now

    def idle(self) -> bool:
        """No slot booked ahead: forgetting this limiter would not let anything through early."""
        return self._tat <= self._clock()


class TokenBucket:
    """A quota with bursts: up to ``rate.count`` at once, refilled over ``rate.period``. Fits a
    sender's allowance ("1000/hour") where GCRA's even spacing would refuse a normal burst."""

    def __init__(self, rate: Rate, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self._clock = rate, clock
        self._tokens, self._at = rate.count, clock()

    def take(self, count: int = 1) -> bool:
        """Take ``count`` tokens, all or none (an API call for 1,000 recipients is 1,000)."""
        self._refill()
        if self._tokens < count:
            return False
        self._tokens -= count
        return True

    def remaining(self) -> int:
        self._refill()
        return int(self._tokens)

    def wait(self, count: int = 1) -> float:
        """Seconds until ``count`` tokens are there (0 when they are; inf when never)."""
        self._refill()
        if count > self.rate.count:
            return float("inf")
        return max(count - self._tokens, 0) * self.rate.interval

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.rate.count, self._tokens + (now - self._at) / self.rate.interval)
        self._at = now


class Rotation:
    """Smooth weighted round robin (as nginx): sources in proportion to weight, interleaved."""

    def __init__(self, sources: tuple[Source, ...]) -> None:
        self.sources = sources
        self._current = [0] * len(sources)

    def pick(self, usable: Callable[[Source], bool]) -> Source | None:
        """The next source for which ``usable`` holds (e.g. below its connection limit)."""
        best, total = -1, 0
        for i, src in enumerate(self.sources):
            if not usable(src):
                continue
            total += src.weight
            self._current[i] += src.weight
            if best < 0 or self._current[i] > self._current[best]:
                best = i
        if best < 0:
            return None
        self._current[best] -= total
        return self.sources[best]
