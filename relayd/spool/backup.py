"""Online backups of the spool, their check, and their restore.

A backup is one SQLite file: a consistent snapshot taken on a read-only connection while
relayd runs. In WAL mode a reader never blocks the writer, so mail keeps flowing; the snapshot
holds only the WAL's checkpoint back until it ends. ``VACUUM INTO`` (the default) writes a
compact standalone file in rollback-journal mode; SQLite's online backup API copies the pages
as they are (benchmarks/backup_stall.py measures both). The copy is written to FILE.partial,
fsynced, checked (quick_check, schema version, the secrets) and only then renamed, so a file
with the final name is always a whole backup.

What is NOT in the spool, and so not in a backup: the config file, ``auth.users_file`` (SMTP
logins and API keys), the DKIM key files and the TLS certificate and key (see README, "Backup
and recovery").
"""

from __future__ import annotations

import calendar
import contextlib
import fcntl
import json
import os
import shutil
import sqlite3
import struct
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from relayd.events.records import Type
from relayd.spool.schema import SCHEMA_VERSION

PARTIAL = ".partial"
# Event ids skipped at a restore: more than relayd writes between a backup and its restore
# (10,000 events a second for 11 days); ids stay far below JSON's exact 2**53.
EVENT_ID_JUMP = 10_000_000_000
METHODS = ("vacuum", "backup")
SCHEDULED = "relayd-"  # scheduled backups: relayd-YYYYMMDDTHHMMSSZ.sqlite in backup.dir
_STAMP = "%Y%m%dT%H%M%SZ"
# SQLite's unix VFS: every connection to a WAL database holds a read lock on this byte of the
# -shm file (the "dead man switch") for as long as it is open.
_SHM_DMS = 128
_FLOCK = "hhqqi4x"  # struct flock on Linux: type, whence, start, len, pid


class Refused(Exception):
    """A backup or restore that cannot be done as asked, naming the path; nothing changed."""


@dataclass(frozen=True)
class Contents:
    """What a spool file holds: the figures a backup prints and a restore checks."""

    path: str
    bytes: int
    schema_version: int
    newest_event: int
    messages: int
    queued_recipients: int  # unfinished: pending, deferred, held, active

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def take(spool: Path, dest: Path, force: bool = False, method: str = "vacuum") -> Contents:
    """A consistent copy of the running spool at ``dest``, written beside it first."""
    if dest.is_dir():
        raise Refused(f"{dest} is a directory: name the backup file")
    if dest.exists() and not force:
        raise Refused(f"{dest} exists (use --force to replace it)")
    _writable(dest.parent)
    if not spool.is_file():
        raise Refused(f"no spool at {spool} (has relayd been started with this config?)")
    with _replacing(dest) as partial:
        _copy(spool, partial, method)
        contents = check(partial)
    return Contents(**(contents.as_json() | {"path": str(dest)}))


@contextlib.contextmanager
def _replacing(dest: Path) -> Iterator[Path]:
    """The file to write ``dest``'s new contents to: ``dest`` with a .partial suffix, readable
    by its owner only (it holds the queued mail and the spool's secrets), synced and renamed
    over ``dest`` when the block ends well, removed when it fails: ``dest`` is whole or as it
    was."""
    partial = dest.with_name(dest.name + PARTIAL)
    partial.unlink(missing_ok=True)  # left by a run that was interrupted
    old = os.umask(0o077)
    try:
        yield partial
        _fsync(partial)
        os.replace(partial, dest)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        os.umask(old)
    _fsync(dest.parent)


def _copy(spool: Path, partial: Path, method: str) -> None:
    src = sqlite3.connect(f"{spool.as_uri()}?mode=ro", uri=True, isolation_level=None)
    try:
        src.execute("PRAGMA busy_timeout=10000")
        if method == "vacuum":
            src.execute("VACUUM INTO ?", (str(partial),))
            return
        dst = sqlite3.connect(partial, isolation_level=None)
        try:
            src.backup(dst)  # in one step: one read snapshot, never restarted by a write
            dst.execute("PRAGMA journal_mode=DELETE")  # a single file, as VACUUM INTO's
        finally:
            dst.close()
    except sqlite3.Error as exc:
        raise Refused(f"cannot copy spool {spool} to {partial}: {exc}") from None
    finally:
        src.close()


def check(path: Path) -> Contents:
    """The whole check of a backup (or spool) file, read-only: SQLite's quick_check, a schema
    this relayd can run (it upgrades older ones at start) and the spool's secrets."""
    if not path.is_file():
        raise Refused(f"no backup file at {path}")
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise Refused(f"{path}: cannot open: {exc}") from None
    try:
        problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)") if r[0] != "ok"]
        if problems:
            raise Refused(f"{path} is damaged: {'; '.join(problems)}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if not 2 <= version <= SCHEMA_VERSION:
            raise Refused(
                f"{path} has spool schema version {version}; this relayd runs 2 to"
                f" {SCHEMA_VERSION}" + (" (a newer relayd wrote it)" if version > 2 else "")
            )
        if (
            version >= 4
            and not conn.execute("SELECT 1 FROM secrets WHERE name = 'tokens'").fetchone()
        ):
            raise Refused(f"{path} has no 'tokens' secret: not a whole spool")
        newest = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
        messages = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        queued = conn.execute("SELECT count(*) FROM recipients WHERE state IN (0,1,4,5)")
        return Contents(
            str(path), path.stat().st_size, version, newest, messages, queued.fetchone()[0]
        )
    except sqlite3.DatabaseError as exc:
        raise Refused(f"{path} is not a readable spool: {exc}") from None
    finally:
        conn.close()


def holder(spool: Path) -> int | None:
    """The pid of a process that has the spool open (relayd, or a relayctl reading it), or
    None: SQLite's lock on the -shm file, asked with F_GETLK (a killed process holds none)."""
    try:
        fd = os.open(f"{spool}-shm", os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, _SHM_DMS, 1, 0)
        kind, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, probe))
        return None if kind == fcntl.F_UNLCK else pid
    finally:
        os.close(fd)


def restore(backup: Path, spool: Path, now: float, force: bool = False) -> Contents:
    """Put a checked backup in the spool's place, atomically. Refused while a process has the
    spool open, or when a spool is there and ``force`` is not given."""
    contents = check(backup)
    pid = holder(spool)
    if pid is not None:
        raise Refused(f"spool {spool} is open by process {pid} (relayd running?): stop it first")
    if spool.exists() and not force:
        raise Refused(f"spool {spool} exists (use --force to replace it and the mail in it)")
    spool.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _writable(spool.parent)
    with _replacing(spool) as partial:
        shutil.copyfile(backup, partial)
        _mark_restored(partial, backup, contents.newest_event, now)
        # a WAL left by the replaced spool must never be applied to the restored one
        for suffix in ("-wal", "-shm", "-journal"):
            Path(f"{spool}{suffix}").unlink(missing_ok=True)
    return Contents(**(contents.as_json() | {"path": str(spool)}))


def _mark_restored(path: Path, backup: Path, newest: int, now: float) -> None:
    """An ``operator`` event at ``newest + EVENT_ID_JUMP``: the events written after the backup
    are lost with the old spool, but webhook receivers have seen their ids; the restored
    relayd's events continue above the jump, so no id means two different events."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        data = {"action": "restore", "backup": str(backup), "newest_event": newest}
        conn.execute(
            "INSERT INTO events (id, at, type, queue_id, rcpt, data) VALUES (?,?,?,'',NULL,?)",
            (newest + EVENT_ID_JUMP, now, Type.OPERATOR.value, json.dumps(data)),
        )
    finally:
        conn.close()


def scheduled(spool: Path, directory: Path, keep: int, now: float) -> tuple[Contents, list[Path]]:
    """One scheduled backup into ``directory``, then the oldest beyond ``keep`` removed."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in directory.glob(f"{SCHEDULED}*.sqlite{PARTIAL}"):  # a killed relayd's
        stale.unlink(missing_ok=True)
    name = f"{SCHEDULED}{time.strftime(_STAMP, time.gmtime(now))}.sqlite"
    contents = take(spool, directory / name, force=True)
    removed = existing(directory)[:-keep]
    for path in removed:
        path.unlink(missing_ok=True)
    return contents, removed


def existing(directory: Path) -> list[Path]:
    """The scheduled backups in ``directory``, oldest first (their names sort by time)."""
    return sorted(directory.glob(f"{SCHEDULED}*.sqlite"))


def last_taken(directory: Path) -> float | None:
    """When the newest scheduled backup was taken, from its name; None when there is none."""
    for path in reversed(existing(directory)):
        stamp = path.name.removeprefix(SCHEDULED).removesuffix(".sqlite")
        with contextlib.suppress(ValueError):
            return calendar.timegm(time.strptime(stamp, _STAMP))
    return None


def _writable(directory: Path) -> None:
    if not directory.is_dir():
        raise Refused(f"{directory}: no such directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise Refused(f"{directory}: not writable")


def _fsync(path: Path) -> None:
    """The file's (or a directory's entries') bytes on disk before the next step."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
