"""Credentials: SMTP logins and API keys, one model. Each says as whom it may send, how fast,
from where and (keys) for what, so the same sender and rate policy holds for SMTP and HTTP.

Stored in one JSON file (``auth.users_file``, mode 0600) that relayctl rewrites atomically; the
daemon re-reads it when its modification time changes, so a new login or key, a revocation or a
rotation works at the next use without a restart. Passwords are kept as scrypt hashes (RFC 7914:
slow on purpose, people choose them); API keys as SHA-256 digests (a key is 256 random bits: no
guessing to slow down, and a request must not cost 80 ms of hashing).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from relayd.config import Rate, in_networks, parse_rate
from relayd.model.message import TRANSACTIONAL
from relayd.shaping import TokenBucket

_SCRYPT = {"n": 2**14, "r": 8, "p": 1}  # ~80 ms per check here: slow for guessing, fine per login
SCOPES = ("send", "read", "suppressions", "webhooks", "campaigns", "admin")
KEY_PREFIX = "rk_"  # an API key: rk_<id>_<secret>; the id finds the entry, the secret proves it


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
class Credential:
    """A login (``kind`` "login": name and password) or an API key (``kind`` "key")."""

    name: str
    secret: str  # a login's scrypt hash; a key's SHA-256 hex digest
    senders: tuple[str, ...]  # "example.com" (any address there) or "bob@example.com"
    rate: str = ""  # e.g. "1000/hour"; "" = no limit
    max_recipients: int = 0  # 0 = the listener's limit
    kind: str = "login"
    scopes: tuple[str, ...] = ("send",)  # what a key may do (a login only sends)
    networks: tuple[str, ...] = ()  # CIDRs it may be used from; () = anywhere
    key_id: str = ""  # a key's public id, the middle of rk_<id>_<secret>
    created: float = 0.0
    stream: str = TRANSACTIONAL  # its mail's stream when the message does not name one
    tracking: bool = True  # a key's HTML mail may get [tracking]'s pixel and links

    def may_send_as(self, address: str) -> bool:
        address = address.lower()
        domain = address.rpartition("@")[2]
        return address in self.senders or domain in self.senders

    def may_use_from(self, ip: str) -> bool:
        if not self.networks:
            return True
        return in_networks(ip, (ipaddress.ip_network(n, strict=False) for n in self.networks))

    @property
    def rate_limit(self) -> Rate | None:
        return parse_rate(self.rate) if self.rate else None

    @property
    def account(self) -> str:
        """How its mail's origin names it: "auth:NAME" for a login, "key:NAME" for a key."""
        return f"{'auth' if self.kind == 'login' else 'key'}:{self.name}"


def new_key(old: Credential) -> tuple[Credential, str]:
    """``old`` (its name and policy) with a fresh key id and secret, and the token to show
    once: only the digest is kept. Adding a key and rotating one are the same step."""
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    cred = replace(old, secret=_digest(secret), kind="key", key_id=key_id, created=time.time())
    return cred, f"{KEY_PREFIX}{key_id}_{secret}"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def load_credentials(path: Path) -> dict[str, Credential]:
    """Logins and keys in ``path``, keyed "login:NAME" and "key:NAME"; {} when there is no
    file yet."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    found = {}
    for kind, section in (("login", "users"), ("key", "keys")):
        for name, entry in raw.get(section, {}).items():
            found[f"{kind}:{name}"] = Credential(
                name,
                entry.get("secret") or entry["password"],  # "password": files before keys
                tuple(s.lower() for s in entry.get("senders", [])),
                entry.get("rate", ""),
                entry.get("max_recipients", 0),
                kind,
                tuple(entry.get("scopes", ["send"])),
                tuple(entry.get("networks", [])),
                entry.get("key_id", ""),
                entry.get("created", 0.0),
                entry.get("stream", TRANSACTIONAL),
                entry.get("tracking", True),
            )
    return found


def save_credentials(path: Path, credentials: dict[str, Credential]) -> None:
    """Replace the file atomically (readers see the old or the new one), mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, dict] = {"users": {}, "keys": {}}
    for cred in sorted(credentials.values(), key=lambda c: (c.kind, c.name)):
        entry = {k: v for k, v in asdict(cred).items() if k not in ("name", "kind")}
        if cred.kind == "login":
            for k in ("scopes", "key_id", "tracking"):
                entry.pop(k)
        data["users" if cred.kind == "login" else "keys"][cred.name] = entry
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
    """The daemon's view of the credentials file, re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._logins: dict[str, Credential] = {}
        self._keys: dict[str, Credential] = {}  # by key id
        self._buckets: dict[str, TokenBucket] = {}

    def _fresh(self) -> None:
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            found = load_credentials(self.path) if stamp else {}
            self._logins = {c.name: c for c in found.values() if c.kind == "login"}
            self._keys = {c.key_id: c for c in found.values() if c.kind == "key"}
            self._stamp = stamp
            self._buckets.clear()

    def get(self, name: str) -> Credential | None:
        self._fresh()
        return self._logins.get(name)

    def verify(self, name: str, password: bytes) -> Credential | None:
        """The login if the password matches. Slow on purpose: run it off the event loop."""
        user = self.get(name)
        ok = check_password(password, user.secret if user else _DUMMY_HASH)
        return user if ok and user else None

    def key(self, token: str) -> Credential | None:
        """The API key a bearer token proves, or None (unknown, revoked, rotated away)."""
        self._fresh()
        key_id, _, secret = token.removeprefix(KEY_PREFIX).partition("_")
        cred = self._keys.get(key_id) if token.startswith(KEY_PREFIX) else None
        if cred is None or not hmac.compare_digest(cred.secret, _digest(secret)):
            return None
        return cred

    def take(self, cred: Credential, clock: Callable[[], float] = time.monotonic) -> bool:
        """Count one message against the credential's rate; False when over it."""
        bucket = self.bucket(cred, clock)
        return bucket is None or bucket.take()

    def bucket(
        self, cred: Credential, clock: Callable[[], float] = time.monotonic
    ) -> TokenBucket | None:
        """The credential's rate bucket (None: no limit), shared by SMTP and HTTP."""
        limit = cred.rate_limit
        if limit is None:
            return None
        bucket = self._buckets.get(cred.account)
        if bucket is None or bucket.rate != limit:
            bucket = self._buckets[cred.account] = TokenBucket(limit, clock)
        return bucket


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
