"""Submission credentials: who may log in, as whom they may send, and how fast.

Stored in one JSON file (``auth.users_file``, mode 0600) that relayctl rewrites atomically; the
daemon re-reads it when its modification time changes, so a new user or password works at the
next login without a restart. Passwords are kept as scrypt hashes (RFC 7914).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from relayd.config import Rate, parse_rate
from relayd.shaping import TokenBucket

_SCRYPT = {"n": 2**14, "r": 8, "p": 1}  # ~80 ms per check here: slow for guessing, fine per login


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    params = f"{_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}"
    return f"scrypt${params}${_b64(salt)}${_b64(digest)}"


def check_password(password: bytes, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(
            password,
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=32,
            maxmem=128 * 1024 * 1024,
        )
    except ValueError:
        return False
    return scheme == "scrypt" and hmac.compare_digest(got, expected)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# A hash to check against when the user does not exist, so that the reply takes as long.
_DUMMY_HASH = hash_password(secrets.token_hex(8))


@dataclass(frozen=True)
class User:
    name: str
    password: str  # scrypt hash
    senders: tuple[str, ...]  # "example.com" (any address there) or "bob@example.com"
    rate: str = ""  # e.g. "1000/hour"; "" = no limit
    max_recipients: int = 0  # 0 = the listener's limit

    def may_send_as(self, address: str) -> bool:
        address = address.lower()
        domain = address.rpartition("@")[2]
        return address in self.senders or domain in self.senders

    @property
    def rate_limit(self) -> Rate | None:
        return parse_rate(self.rate) if self.rate else None


def load_users(path: Path) -> dict[str, User]:
    """The users in ``path``; {} when the file does not exist yet."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return {
        name: User(
            name,
            entry["password"],
            tuple(s.lower() for s in entry.get("senders", [])),
            entry.get("rate", ""),
            entry.get("max_recipients", 0),
        )
        for name, entry in raw.get("users", {}).items()
    }


def save_users(path: Path, users: dict[str, User]) -> None:
    """Replace the file atomically (readers see the old or the new one), mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "users": {
            name: {k: v for k, v in asdict(u).items() if k != "name"}
            for name, u in sorted(users.items())
        }
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".users.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class Directory:
    """The daemon's view of the users file, re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, User] = {}
        self._buckets: dict[str, TokenBucket] = {}

    def get(self, name: str) -> User | None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._users = load_users(self.path) if stamp else {}
            self._stamp = stamp
            self._buckets.clear()
        return self._users.get(name)

    def verify(self, name: str, password: bytes) -> User | None:
        """The user if the password matches. Slow on purpose: run it off the event loop."""
        user = self.get(name)
        ok = check_password(password, user.password if user else _DUMMY_HASH)
        return user if ok and user else None

    def take(self, user: User, clock: Callable[[], float] = time.monotonic) -> bool:
        """Count one message against the user's rate; False when over it."""
        limit = user.rate_limit
        if limit is None:
            return True
        bucket = self._buckets.get(user.name)
        if bucket is None or bucket.rate != limit:
            bucket = self._buckets[user.name] = TokenBucket(limit, clock)
        return bucket.take()


class LoginGuard:
    """Failed logins per client IP: too many within the lockout time lock the IP out.

    Checks still in flight count too (begin/end): the hash is slow on purpose, and parallel
    connections from one IP would otherwise all be checked before the first failure counts,
    the lockout closing only behind them."""

    def __init__(self, max_failures: int, lockout: float, clock: Callable[[], float]) -> None:
        self.max_failures, self.lockout, self.clock = max_failures, lockout, clock
        self._failures: dict[str, list[float]] = {}
        self._checking: Counter[str] = Counter()

    def locked(self, ip: str) -> bool:
        """Asked for every connection: an address that never failed costs one lookup."""
        return ip in self._failures and len(self._recent(ip)) >= self.max_failures

    def begin(self, ip: str) -> bool:
        """May a password from ``ip`` be checked now? Not when its recent failures and the
        checks in flight reach max_failures; if so, the check counts until end()."""
        failures = len(self._recent(ip)) if ip in self._failures else 0
        if failures + self._checking[ip] >= self.max_failures:
            return False
        self._checking[ip] += 1
        return True

    def end(self, ip: str) -> None:
        """A check begun with begin() is over (its failure, if any, counted with failed())."""
        self._checking[ip] -= 1
        if self._checking[ip] <= 0:
            del self._checking[ip]

    def failed(self, ip: str) -> int:
        recent = self._recent(ip)
        recent.append(self.clock())
        self._failures[ip] = recent
        return len(recent)

    def _recent(self, ip: str) -> list[float]:
        horizon = self.clock() - self.lockout
        recent = [t for t in self._failures.get(ip, ()) if t > horizon]
        if recent:
            self._failures[ip] = recent
        else:
            self._failures.pop(ip, None)
        return recent
