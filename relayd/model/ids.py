"""Queue ids: unique, sortable by time, cheap."""

from __future__ import annotations

import itertools
import os
import secrets
import time

_ids = itertools.count(secrets.randbits(20))


def new_queue_id() -> str:
    """11 hex digits of microseconds, then a counter (5 digits) so that ids made in the same
    microsecond differ. No random bytes per id: the OS's randomness costs a system call, and
    nothing here needs to be unpredictable."""
    return f"{time.time_ns() // 1000 & 0xFFFFFFFFFFF:011X}{next(_ids) & 0xFFFFF:05X}"


def reseed() -> None:
    """A forked process draws its own counter: seeded before the fork, both processes would
    make the same suffixes, and ids of the same microsecond would collide."""
    global _ids
    _ids = itertools.count(secrets.randbits(20) ^ os.getpid())
