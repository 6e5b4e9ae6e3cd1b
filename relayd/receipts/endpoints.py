"""Managing webhook endpoints: what ``relayctl webhook`` and the HTTP API both call.

Each function takes a connection to the spool, inside the caller's transaction (a write one
for the changes: relayctl's ``admin.transaction(conn, True)``), checks its input and answers
plain data (dicts, lists) ready for text or JSON. Bad input raises ``EndpointError`` naming the
field; an unknown endpoint ``NotFound``; nothing is changed then. The running daemon's
dispatcher sees every change at its next poll.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from relayd.config import WEBHOOK_TIMEOUT_MAX, Webhooks
from relayd.events.records import Type
from relayd.receipts.payload import new_secret
from relayd.spool import webhooks
from relayd.spool.webhooks import ALL, Endpoint

TYPES = tuple(t.value for t in Type)
MAX_URL = 2048

Row = dict[str, Any]


class EndpointError(ValueError):
    """Bad input: ``field`` (url, events, batch, concurrency, timeout) and what is wrong."""

    def __init__(self, field: str, problem: str) -> None:
        self.field, self.problem = field, problem
        super().__init__(f"{field}: {problem}")


class NotFound(LookupError):
    """No endpoint with that id or URL."""


def check_url(url: str) -> str:
    if len(url) > MAX_URL:
        raise EndpointError("url", f"longer than {MAX_URL} characters")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise EndpointError("url", f"{url!r} contains spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise EndpointError("url", f"{url!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise EndpointError("url", f"{url!r} must start with http:// or https://")
    if not parts.hostname:
        raise EndpointError("url", f"{url!r} has no host")
    if parts.fragment:
        raise EndpointError("url", f"{url!r} has a #fragment, which is never sent")
    return url


def check_events(events: str | Sequence[str]) -> str:
    """A comma list (or a list of comma lists) of event types, or '*': stored as '*' or the
    types in their canonical order."""
    items = [events] if isinstance(events, str) else list(events)
    names = [n.strip().lower() for item in items for n in item.split(",") if n.strip()]
    if not names:
        raise EndpointError("events", f"name at least one of {', '.join(TYPES)}, or '*'")
    if ALL in names:
        return ALL
    unknown = [n for n in names if n not in TYPES]
    if unknown:
        raise EndpointError("events", f"{unknown[0]!r} is not one of {', '.join(TYPES)}, or '*'")
    return ",".join(t for t in TYPES if t in names)


def _bounded(name: str, value: Any, low: float, high: float, whole: bool = True) -> None:
    kinds = int if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise EndpointError(name, f"must be a {'whole ' if whole else ''}number, got {value!r}")
    if not low <= value <= high:  # nan too
        raise EndpointError(name, f"must be from {low:g} to {high:g}, got {value!r}")


def add(
    conn: sqlite3.Connection,
    settings: Webhooks,
    url: str,
    events: str | Sequence[str],
    now: float,
    batch: int = 1,
    concurrency: int = 1,
    timeout: float | None = None,
) -> Row:
    """The new endpoint with its secret, which is shown only now (relayd keeps it to sign, but
    never shows it again: ``rotate`` makes a new one)."""
    url, kinds = check_url(url), check_events(events)
    _bounded("batch", batch, 1, settings.max_batch)
    _bounded("concurrency", concurrency, 1, settings.max_concurrency)
    timeout = settings.timeout if timeout is None else timeout
    _bounded("timeout", timeout, 0.1, WEBHOOK_TIMEOUT_MAX, whole=False)
    secret = new_secret()
    try:
        ep = webhooks.add(conn, url, kinds, secret, batch, concurrency, timeout, now)
    except webhooks.Exists:
        raise EndpointError("url", f"an endpoint for {url} exists already") from None
    return describe(conn, ep, now) | {"secret": secret}


def find(conn: sqlite3.Connection, ref: str | int) -> Endpoint:
    ep = webhooks.find(conn, str(ref))
    if ep is None:
        raise NotFound(f"no webhook endpoint {ref}")
    return ep


def listing(conn: sqlite3.Connection, now: float) -> list[Row]:
    return [describe(conn, ep, now) for ep in webhooks.endpoints(conn)]


def show(conn: sqlite3.Connection, ref: str | int, now: float) -> Row:
    return describe(conn, find(conn, ref), now)


def remove(conn: sqlite3.Connection, ref: str | int) -> Row:
    ep = find(conn, ref)
    webhooks.remove(conn, ep.id)
    return {"id": ep.id, "url": ep.url, "removed": True}


def rotate(conn: sqlite3.Connection, ref: str | int, overlap: float, now: float) -> Row:
    """A new secret signs first; the ones it replaces keep signing for ``overlap`` seconds at
    most (both signatures are sent), so receivers can switch without refusing a webhook. An
    overlap of 0 ends every older secret at once (one that leaked)."""
    ep = find(conn, ref)
    secret = new_secret()
    end = now + overlap
    kept = [(s, min(end, until or end)) for s, until in ep.secrets if until is None or until > now]
    kept = [(s, until) for s, until in kept if until > now]
    webhooks.set_secrets(conn, ep.id, [(secret, None), *kept])
    until = max((u for _, u in kept), default=None)
    result = describe(conn, find(conn, ep.id), now)
    return result | {"secret": secret, "old_secrets_until": _iso(until) if until else None}


def enable(conn: sqlite3.Connection, ref: str | int, now: float, from_now: bool = False) -> Row:
    """Back on with a clean failure record: from its cursor (the events still retained), or
    from the newest event when ``from_now``."""
    ep = find(conn, ref)
    webhooks.enable(conn, ep.id, from_now)
    return describe(conn, find(conn, ep.id), now)


def disable(conn: sqlite3.Connection, ref: str | int, now: float, reason: str = "") -> Row:
    ep = find(conn, ref)
    webhooks.disable(conn, ep.id, reason or f"by the operator at {_iso(now)}")
    return describe(conn, find(conn, ep.id), now)


def describe(conn: sqlite3.Connection, ep: Endpoint, now: float) -> Row:
    """The endpoint with its health: state (enabled, failing, disabled), why it is disabled,
    its backlog (the retained events it is owed), and its counters. Never its secrets."""
    state = "disabled" if ep.disabled else "failing" if ep.failures else "enabled"
    return {
        "id": ep.id,
        "url": ep.url,
        "events": ep.events.split(",") if ep.events != ALL else [ALL],
        "batch": ep.batch,
        "concurrency": ep.concurrency,
        "timeout_s": ep.timeout,
        "created": _iso(ep.created),
        "state": state,
        "disabled_reason": ep.disabled or None,
        "backlog": webhooks.backlog(conn, ep.id),
        "cursor": ep.cursor,
        "sent": ep.sent,
        "failures": ep.failures,
        "failing_since": _iso(ep.failing_since) if ep.failing_since else None,
        "next_try": _iso(ep.next_try) if ep.failures and not ep.disabled else None,
        "last_status": ep.last_status or None,
        "last_try": _iso(ep.last_try) if ep.last_try else None,
        "last_success": _iso(ep.last_success) if ep.last_success else None,
        "dropped": ep.dropped,
        "signing_secrets": len(ep.signing(now)),
    }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
