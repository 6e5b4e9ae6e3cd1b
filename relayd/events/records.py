"""The one vocabulary of what happens to mail. A record is written to the ``events`` table in
the transaction of the change it reports (an outbox that receipts and webhooks read), and the
log line is rendered from the same record once that transaction is durable."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from relayd.model.message import TRANSACTIONAL


class Type(StrEnum):
    """Event types; the value is the log line's ``event`` key (stable)."""

    RECEPTION = "accepted"
    DELIVERY = "delivered"
    TRANSIENT_FAILURE = "deferred"
    BOUNCE = "bounced"
    EXPIRATION = "expired"
    DSN_QUEUED = "dsn_queued"
    DSN_SUPPRESSED = "dsn_suppressed"
    OPERATOR = "operator"
    REJECTION = "rejected"
    SUPPRESSION = "suppressed"  # a recipient not mailed: on the suppression list
    COMPLAINT = "complained"  # a feedback-loop report (RFC 5965) about a message
    UNSUBSCRIBE = "unsubscribed"  # a recipient's one-click or mailto unsubscribe
    LISTING = "blacklisted"  # a source IP appeared on a DNS blacklist
    DELISTING = "delisted"  # ... and left it
    SHAPING = "shaping"  # adaptive shaping holds a source at a site: suspended, or slowed
    SHAPING_ENDED = "shaping_ended"  # ... and lets it go: lapsed, or cleared by the operator
    WARMED = "warmed"  # a source IP came to the end of its warm-up schedule: no quota now
    OPEN = "opened"  # a message's tracking pixel was loaded
    CLICK = "clicked"  # a tracked link of a message was followed
    CAMPAIGN = "campaign"  # a campaign changed state: started, tested, winner, paused, ... done
    CONVERSION = "converted"  # an application reported a campaign message's conversion
    ALERT = "alert"  # a built-in alert fired or resolved (relayd.alerts)


@dataclass(slots=True)
class Event:
    type: str
    queue_id: str
    at: float
    data: dict[str, Any]  # the log line's other keys: sender, rcpt, domain, mx, code, ...
    id: int = 0  # the outbox row, once stored

    @property
    def rcpt(self) -> str | None:
        """The recipient it concerns, when it concerns one (an indexed column of the row)."""
        rcpt = self.data.get("rcpt")
        return rcpt if isinstance(rcpt, str) else None


def receipt_keys(envid: str | None, meta: str, stream: str = TRANSACTIONAL) -> dict[str, Any]:
    """What lets an application match an event to its message: ``envid`` (RFC 3461 ENVID)
    and ``meta`` (its metadata, decoded), each only when the message has it; ``stream`` only
    when "bulk" (most mail is transactional: its events stay as small as they were)."""
    keys: dict[str, Any] = {}
    if envid is not None:
        keys["envid"] = envid
    if meta:
        keys["meta"] = json.loads(meta)
    if stream != TRANSACTIONAL:
        keys["stream"] = stream
    return keys
