"""Scheduled backups ([backup]), in the queue process: the same online copy as ``relayctl
backup``, taken on a thread of its own (a read-only connection: the writer never waits for
it), the oldest beyond ``keep`` removed. Each is logged (``backup_made``, ``backup_failed``);
it makes no event, as nothing happens to mail."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from relayd.config import Backup
from relayd.events.log import log
from relayd.spool import backup

RETRY_MAX = 300.0  # a failed backup is tried again after this, or after the interval if shorter


class Schedule:
    """Due one interval after the newest backup in ``dir`` (at once without one), so that a
    restarted relayd neither skips one nor takes one at every start."""

    def __init__(self, spool: Path, settings: Backup, clock: Callable[[], float]) -> None:
        self.spool, self.settings, self.clock = spool, settings, clock
        self.woken = asyncio.Event()
        self.retry_at = 0.0

    def reload(self, settings: Backup) -> None:
        self.settings = settings
        self.woken.set()

    async def run(self) -> None:
        while True:
            delay = await asyncio.to_thread(self._due_in)
            if delay is None or delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.woken.wait(), delay)
                self.woken.clear()
                continue
            await self._take()

    def _due_in(self) -> float | None:
        """Seconds until the next backup; None when there are none to take."""
        s = self.settings
        if s.dir is None:
            return None
        last = backup.last_taken(s.dir) if s.dir.is_dir() else None
        due = max(self.retry_at, 0.0 if last is None else last + s.interval)
        return due - self.clock()

    async def _take(self) -> None:
        s = self.settings
        assert s.dir is not None
        started = time.monotonic()
        try:
            made, removed = await asyncio.to_thread(
                backup.scheduled, self.spool, s.dir, s.keep, self.clock()
            )
        except (backup.Refused, OSError) as exc:
            self.retry_at = self.clock() + min(s.interval, RETRY_MAX)
            log.error("backup_failed", dir=str(s.dir), error=str(exc), retry_at=self.retry_at)
            return
        log.info(
            "backup_made",
            path=made.path,
            bytes=made.bytes,
            seconds=round(time.monotonic() - started, 3),
            newest_event=made.newest_event,
            messages=made.messages,
            removed=[p.name for p in removed],
        )
