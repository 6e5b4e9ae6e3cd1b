"""Room on the spool's disk. New mail is refused with 452 4.3.1 while free space is below the
configured minimum (Postfix's queue_minfree, KumoMTA's min_free_space), so that deliveries,
their results and the DSNs they owe always find room; a disk that fills anyway is answered
the same way."""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

REPLY = "452 4.3.1 Insufficient system storage, try again later"
FULL_MARK = "spool full: "  # how the queue process tells ingress (the hand-off carries text)


class SpoolFull(OSError):
    """The spool takes no more mail now."""


def is_full(error: BaseException | None) -> bool:
    """A refusal for space, or SQLite's or the OS's "disk full"."""
    if isinstance(error, SpoolFull):
        return True
    if isinstance(error, sqlite3.OperationalError):
        return getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


class FreeSpace:
    """Free bytes under the spool's folder, looked at most once a second."""

    def __init__(
        self, spool_path: Path, minimum: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.folder, self.minimum, self.clock = spool_path.parent, minimum, clock
        self._checked = float("-inf")
        self._low = False

    def low(self) -> bool:
        if not self.minimum:
            return False
        now = self.clock()
        if now - self._checked >= 1.0:
            self._checked = now
            try:
                st = os.statvfs(self.folder)
            except OSError:
                return self._low  # cannot look: the last answer stands
            self._low = st.f_bavail * st.f_frsize < self.minimum
        return self._low

    def refusal(self) -> SpoolFull:
        return SpoolFull(
            f"less than {self.minimum} bytes free under {self.folder} (server.min_free_space)"
        )
