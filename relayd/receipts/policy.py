"""When to try a failing webhook endpoint again, and when to give up on it: values from values
(no clock, no sockets), so the whole schedule is tested without waiting for it."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from relayd.config import Webhooks

GONE = 410  # the endpoint says it is gone for good: disabled at once


@dataclass(frozen=True)
class Retry:
    first: float
    max_interval: float
    jitter: float
    span: float  # failing for this long disables the endpoint

    @classmethod
    def of(cls, settings: Webhooks) -> Retry:
        return cls(
            settings.retry_first,
            settings.retry_max_interval,
            settings.retry_jitter,
            settings.retry_for,
        )


@dataclass(frozen=True)
class Failing:
    """An endpoint's state after a failed round."""

    failures: int
    since: float  # the first failure of this run
    next_try: float
    disabled: str  # '' or why


def delay(failures: int, retry: Retry, rng: Callable[[], float] = random.random) -> float:
    """The wait after the ``failures``-th failure in a row: ``first`` doubling up to
    ``max_interval``, spread by plus or minus ``jitter`` so that endpoints failing together
    (a receiver that was down) are not all tried again at the same instant."""
    base = min(retry.first * 2.0 ** min(failures - 1, 64), retry.max_interval)
    return base * (1 + retry.jitter * (2 * rng() - 1))


def after_failure(
    failures: int,
    since: float | None,
    now: float,
    status: int | None,
    retry_after: float | None,
    retry: Retry,
    rng: Callable[[], float] = random.random,
) -> Failing:
    """``failures`` and ``since`` describe the run of failures before this one (0 and None when
    the endpoint was healthy). The last try is placed at the end of the span, so an endpoint is
    tried for ``span`` and then disabled; the endpoint's Retry-After may lengthen a wait, up to
    ``max_interval``."""
    failures += 1
    since = now if since is None else since
    if status == GONE:
        return Failing(failures, since, now, f"{GONE} Gone: the endpoint asked to stop")
    if now - since >= retry.span:
        first = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return Failing(failures, since, now, f"failing since {first} ({failures} attempts)")
    wait = delay(failures, retry, rng)
    if retry_after:
        wait = max(wait, min(retry_after, retry.max_interval))
    return Failing(failures, since, min(now + wait, since + retry.span), "")
