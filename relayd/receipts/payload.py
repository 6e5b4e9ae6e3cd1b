"""What a webhook POST carries and how it is signed (Standard Webhooks, standardwebhooks.com).

One event (an endpoint with batch 1) is the Standard Webhooks payload itself::

    {"id": "evt_42", "type": "message.delivered", "timestamp": "2026-01-02T03:04:05.678Z",
     "data": {"queue_id": "...", "sender": "...", "rcpt": "...", "mx": "...", "code": 250, ...}}

An endpoint with batch N > 1 gets up to N events per POST in the same envelope: type
``batch``, ``timestamp`` its newest event's, and ``data.events`` the list of event objects as
above, oldest first. Receivers that deduplicate use each event's ``id`` (the event log's
id: at least once means a repeat is possible after a failure or a crash); ``webhook-id`` names
the POST's content and is the same each time that content is sent again.

Signatures are HMAC-SHA256 over ``{webhook-id}.{webhook-timestamp}.{body}`` with the secret's
bytes (base64 after ``whsec_``), one ``v1,<base64>`` per signing secret in
``webhook-signature``, space-separated: two during a rotation's overlap. The timestamp is the
attempt's (receivers refuse one older than five minutes), so a retry is signed again. Written
here rather than through the standardwebhooks package, which the tests use to verify it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from datetime import UTC, datetime
from typing import Any

from relayd.events.records import Type

PREFIX = "whsec_"
SECRET_BYTES = 32
CONTENT_TYPE = "application/json"
USER_AGENT = "relayd-webhooks/1"

Row = tuple[int, float, str, str, dict[str, Any]]  # id, at, type, queue_id, data


def new_secret() -> str:
    return PREFIX + base64.b64encode(os.urandom(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(PREFIX))


def event_type(kind: str) -> str:
    """The payload's type: ``message.<event>``, ``queue.operator`` for relayctl's actions and
    ``relayd.alert`` for the built-in alerts."""
    return _TYPES.get(kind, f"message.{kind}")


_TYPES = {Type.OPERATOR: "queue.operator", Type.ALERT: "relayd.alert"}


def iso(ts: float) -> str:
    """RFC 3339, UTC, milliseconds."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def event(row: Row) -> dict[str, Any]:
    event_id, at, kind, queue_id, data = row
    return {
        "id": f"evt_{event_id}",
        "type": event_type(kind),
        "timestamp": iso(at),
        "data": {"queue_id": queue_id, **data},
    }


def message_id(endpoint_id: int, rows: list[Row], batched: bool) -> str:
    """One event: its own id, as in the payload. A batch: the endpoint and its first and last
    event, which fix its content (an endpoint's events never change)."""
    if not batched:
        return f"evt_{rows[0][0]}"
    return f"batch_{endpoint_id}_{rows[0][0]}_{rows[-1][0]}"


def body(rows: list[Row], batched: bool) -> bytes:
    """The same bytes each time the same events are sent again (a batch's timestamp is its
    newest event's)."""
    if batched:
        events = list(map(event, rows))
        last = events[-1]["timestamp"]
        payload = {"type": "batch", "timestamp": last, "data": {"events": events}}
    else:
        payload = event(rows[0])
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def signature(secrets: list[str], msg_id: str, timestamp: int, content: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + content
    return " ".join(
        "v1," + base64.b64encode(hmac.digest(secret_key(s), signed, hashlib.sha256)).decode()
        for s in secrets
    )


def headers(secrets: list[str], msg_id: str, now: float, content: bytes) -> dict[str, str]:
    timestamp = int(now)
    return {
        "content-type": CONTENT_TYPE,
        "user-agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secrets, msg_id, timestamp, content),
    }
