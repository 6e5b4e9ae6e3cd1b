"""The scheduler's numbers for /metrics: plain counters in memory that the hot path only adds
to (a dict update per attempt, no lock, no prometheus-client call); relayd.metrics reads them
at scrape time, on the same event loop."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable

from relayd.model.status import Reply

OTHER = "other"  # the label of every site beyond max_sites
DEFAULT_SOURCE = "default"  # connections made without a pool: the system's address
# attempt durations (seconds): one SMTP transaction, from a few ms on loopback to a slow MX
ATTEMPT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def result_of(code: int) -> str:
    """An attempt's result by its reply: 2xx delivered, 5xx bounced, anything else deferred."""
    if 200 <= code < 300:
        return "delivered"
    return "bounced" if 500 <= code < 600 else "deferred"


class Tally:
    """Attempts per site and result, throttle waits per site and source, attempt durations.

    At most ``max_sites`` sites are named: the first ones to see traffic keep their name for
    the life of the process (so that no counter ever goes down when another site gets busier);
    later ones count as site="other". Memory is bounded by that too."""

    def __init__(self, max_sites: int = 50) -> None:
        self.max_sites = max_sites
        self.named: set[str] = set()
        self.attempts: Counter[tuple[str, str]] = Counter()  # (site, result) -> recipients
        self.waits: Counter[tuple[str, str]] = Counter()  # (site, source) -> waits
        self.durations = [0] * (len(ATTEMPT_BUCKETS) + 1)  # per bucket, +Inf last
        self.duration_sum = 0.0

    def site(self, name: str) -> str:
        """The label of a site."""
        if name in self.named:
            return name
        if len(self.named) < self.max_sites:
            self.named.add(name)
            return name
        return OTHER

    def attempt(self, site: str, replies: Iterable[tuple[int, Reply]], seconds: float) -> None:
        """One transaction's replies (one per recipient) and how long it took."""
        label = self.site(site)
        for _, reply in replies:
            self.attempts[(label, result_of(reply.code))] += 1
        self.durations[bisect_left(ATTEMPT_BUCKETS, seconds)] += 1
        self.duration_sum += seconds

    def failed(self, site: str, replies: Iterable[tuple[int, Reply]]) -> None:
        """Recipients answered without a transaction (no host of the site took a connection)."""
        label = self.site(site)
        for _, reply in replies:
            self.attempts[(label, result_of(reply.code))] += 1

    def waited(self, site: str, source: str | None) -> None:
        """A delivery waited for a rate (the site's, its source's or a hold's)."""
        self.waits[(self.site(site), source or DEFAULT_SOURCE)] += 1
