"""The spool's single writer thread with group commit.

All writes of the daemon go through one thread that runs every operation queued since its last
commit inside one transaction and one fsync: concurrent arrivals share the cost of durability
instead of paying one fsync each. One failing operation cannot undo its neighbours: the batch
is then run again with a savepoint around each.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from relayd.spool.schema import connect

T = TypeVar("T")


class Writer:
    """The spool's single writer thread with group commit.

    ``submit(fn)`` runs ``fn(conn)`` on the writer thread and resolves to its return value once
    the transaction holding it is durable.
    """

    def __init__(self, path: Path, loop: asyncio.AbstractEventLoop, max_batch: int = 2000) -> None:
        self.path, self.loop, self.max_batch = path, loop, max_batch
        self.conn = connect(path)
        self._queue: queue.SimpleQueue[tuple[Callable[[sqlite3.Connection], Any], Any] | None]
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        fut: asyncio.Future[T] = self.loop.create_future()
        self._queue.put((fn, fut))
        return fut

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.conn.close()

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is None:
                stop = True
            ops = [op for op in batch if op is not None]
            if not ops:
                continue
            outcomes = self._run_batch(ops)
            self.loop.call_soon_threadsafe(_settle, outcomes)

    def _run_batch(self, ops: list[tuple[Callable[[sqlite3.Connection], Any], Any]]) -> list:
        """All operations in one transaction. They run side by side first; only when one of
        them fails is the batch run again with a savepoint around each, so that the failing one
        cannot undo its neighbours (two statements per operation saved on the common path).
        When the spool itself fails (locked past the busy timeout, full), nothing of the batch
        is durable and it is not run again: every caller learns at once and retries."""
        try:
            return self._transaction(ops, isolated=False)
        except _OperationFailed:
            pass
        except Exception as exc:
            return [(fut, False, exc) for _, fut in ops]
        try:
            return self._transaction(ops, isolated=True)
        except Exception as exc:
            return [(fut, False, exc) for _, fut in ops]

    def _transaction(
        self, ops: list[tuple[Callable[[sqlite3.Connection], Any], Any]], isolated: bool
    ) -> list:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            outcomes = []
            for fn, fut in ops:
                if not isolated:
                    try:
                        outcomes.append((fut, True, fn(conn)))
                    except Exception as exc:
                        raise _OperationFailed from exc
                    continue
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((fut, True, fn(conn)))
                    conn.execute("RELEASE op")
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((fut, False, exc))
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        return outcomes


class _OperationFailed(Exception):
    """One operation of a batch failed (not the transaction around it)."""


def _settle(outcomes: list[tuple[asyncio.Future, bool, Any]]) -> None:
    for fut, ok, value in outcomes:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
