"""Room on the spool's disk. New mail is refused with 452 4.3.1 while free space is below the
configured minimum (Postfix's queue_minfree, KumoMTA's min_free_space), so that deliveries,
their results and the DSNs they owe always find room; a disk that fills anyway is answered
the same way."""

from __future__ import annotations

import contextlib
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
    """Room for new mail: free bytes under the spool's folder (at least ``minimum``) and the
    spool's own size with its WAL (at most ``maximum``, 0 = no limit), looked at most once a
    second."""

    def __init__(
        self,
        spool_path: Path,
        minimum: int,
        maximum: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spool, self.folder, self.clock = spool_path, spool_path.parent, clock
        self.minimum, self.maximum = minimum, maximum
        self._checked = float("-inf")
        self._why = ""

    def low(self) -> bool:
        if not self.minimum and not self.maximum:
            return False
        now = self.clock()
        if now - self._checked >= 1.0:
            self._checked = now
            with contextlib.suppress(OSError):  # cannot look: the last answer stands
                self._why = self._look()
        return bool(self._why)

    def free_bytes(self) -> int:
        """Bytes free for relayd's user under the spool's folder."""
        st = os.statvfs(self.folder)
        return st.f_bavail * st.f_frsize

    def spool_bytes(self) -> int:
        """The spool's size: the file and its WAL."""
        return sum(
            os.stat(f"{self.spool}{suffix}").st_size
            for suffix in ("", "-wal")
            if os.path.exists(f"{self.spool}{suffix}")
        )

    def _look(self) -> str:
        if self.minimum and self.free_bytes() < self.minimum:
            free = f"less than {self.minimum} bytes free under {self.folder}"
            return f"{free} (server.min_free_space)"
        if self.maximum:
            size = self.spool_bytes()
            if size >= self.maximum:
                return f"the spool {self.spool} holds {size} bytes (server.max_spool_size)"
        return ""

    def refusal(self) -> SpoolFull:
        return SpoolFull(self._why or "no room for new mail")
