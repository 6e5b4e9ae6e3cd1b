"""A message and its recipients as they move through relayd."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar

# A message's stream: its lane in the scheduler. Transactional mail (a password reset, a receipt)
# never waits behind bulk mail (a newsletter) to the same destination; see queue.scheduler.
TRANSACTIONAL, BULK = "transactional", "bulk"
STREAMS = (TRANSACTIONAL, BULK)


class State(IntEnum):
    PENDING = 0  # accepted, never tried
    DEFERRED = 1  # tried, waiting for next_attempt
    DELIVERED = 2
    BOUNCED = 3
    HELD = 4  # set aside by the operator
    ACTIVE = 5  # loaded into the daemon's memory; reset to PENDING/DEFERRED at start-up


FINAL = (State.DELIVERED, State.BOUNCED)

# Flags of a recipient's ``reported``: the DSNs already queued for it.
REPORTED_FAILED = 1  # a failure DSN was queued, or suppressed (null sender, NOTIFY)
REPORTED_DELAYED = 2
REPORTED_DELIVERED = 4  # a success DSN was queued (NOTIFY=SUCCESS)
UNFINISHED = (State.PENDING, State.DEFERRED, State.HELD, State.ACTIVE)


@dataclass
class Recipient:
    id: int
    rcpt: str
    attempts: int
    notify: int = 0  # Notify flags (RFC 3461 NOTIFY), 0 = not given
    orcpt: str | None = None  # RFC 3461 ORCPT, "rfc822;addr", when given


@dataclass
class Job:
    """One message to the recipients it has at one domain: what one SMTP transaction carries."""

    msg_id: int
    queue_id: str
    sender: str
    domain: str
    received_at: float
    smtputf8: bool
    # The text, for a fresh small message admitted straight from intake; None otherwise: a
    # waiting job pins no text, the connection that takes it reads it from the spool.
    body: bytes | None
    recipients: list[Recipient]
    size: int = 0  # bytes of the spooled text
    envid: str | None = None  # RFC 3461 ENVID, into every event it reports
    meta: str = ""  # the sender's metadata (JSON object text), into every event it reports
    stream: str = TRANSACTIONAL  # its lane: TRANSACTIONAL or BULK

    @property
    def bulk(self) -> bool:
        return self.stream == BULK

    @property
    def is_retry(self) -> bool:
        return any(r.attempts for r in self.recipients)


@dataclass
class Result:
    """An attempt's outcome for one recipient, as stored."""

    rcpt_id: int
    state: State  # DELIVERED, DEFERRED or BOUNCED
    code: int
    reply: str
    mx: str
    next_attempt: float = 0.0


@dataclass
class NewMessage:
    """A message on its way into the spool: from ingress, from a DSN, from any later source."""

    queue_id: str
    sender: str
    recipients: list[str]
    # CRLF line ends throughout, no bare CR or LF: every door makes it so (ingress normalises or
    # refuses, the DSN builder writes CRLF), and delivery sends the spooled text as it is.
    body: bytes | bytearray
    client: str
    helo: str
    # who vouched for it: "auth:NAME", "trusted:IP", "postmaster:IP" (an untrusted client's mail
    # to <postmaster>, the one recipient it may name) or "dsn:QUEUEID"
    origin: str
    smtputf8: bool
    received_at: float = 0.0  # set when it is stored
    signed: bool = False  # a DKIM signature was added
    active: bool = False  # the scheduler took it straight into memory
    ids: list[int] = field(default_factory=list)  # recipient row ids, set on insert
    msg_id: int = 0
    # Text that goes before ``body`` (ingress's trace headers): carried apart so that adding
    # them does not copy the whole message; the hand-off joins the two in the queue process.
    head: bytes = b""
    # The DSN extension (RFC 3461): ENVID, RET ("FULL", "HDRS" or "" when not given), and per
    # recipient (in the order of ``recipients``; empty when none was given) NOTIFY as Notify
    # flags and ORCPT as given ("rfc822;addr").
    envid: str | None = None
    ret: str = ""
    notify: list[int] = field(default_factory=list)
    orcpt: list[str | None] = field(default_factory=list)
    # The sender's metadata and tags (a JSON object, "" for none): into its events, not the mail.
    meta: str = ""
    send_at: float = 0.0  # nothing is delivered before this time (0: at once)
    # Recipients ingress found on the suppression list and did not queue: (address, scope,
    # reason, bounce class) each, recorded as `suppressed` events with the message (which may
    # then have no recipient left: only those events are stored).
    suppressed: list[tuple[str, str, str, str]] = field(default_factory=list)
    stream: str = TRANSACTIONAL  # TRANSACTIONAL or BULK: its lane in the scheduler
    # A campaign's message: (campaign id, contact id, variant). Its campaign_sends row goes
    # into the message's own transaction, so that a campaign resumes after the last contact
    # committed and never queues one twice (a second row for a contact fails the batch).
    campaign: tuple[int, int, str] | None = None


# The largest metadata a message may carry (its JSON text, in bytes): it goes into every event.
META_MAX = 4096


class Notify:
    """NOTIFY flags of a recipient (RFC 3461 4.1); 0 = not given: failures and delays."""

    SUCCESS = 1
    FAILURE = 2
    DELAY = 4
    NEVER = 8
    NAMES: ClassVar[dict[str, int]] = {
        "SUCCESS": SUCCESS,
        "FAILURE": FAILURE,
        "DELAY": DELAY,
        "NEVER": NEVER,
    }

    @staticmethod
    def words(flags: int) -> str:
        """The parameter's value as it was given (``SUCCESS,FAILURE``); "" when not given."""
        return ",".join(name for name, bit in Notify.NAMES.items() if flags & bit)


@dataclass
class Report:
    """A message that needs a DSN: the failed (delayed, delivered) recipients and the original."""

    kind: str  # "failed", "delayed" or "delivered"
    queue_id: str
    sender: str
    received_at: float
    body: bytes
    recipients: list[tuple[str, int, str, str]]  # rcpt, code, reply, mx
    envid: str | None = None  # the original's ENVID (RFC 3461), for Original-Envelope-Id
    ret: str = ""  # the original's RET: "FULL", "HDRS" or "" (not given)
    orcpt: list[str | None] = field(default_factory=list)  # per recipient, when any was given


# An idempotent request's record, stored in the transaction of its messages (credential,
# key, digest of the request, the answer to give again): see spool.api.idempotent.
Guard = tuple[str, str, str, str]
# What the guard found instead of storing: ("replay", the earlier answer) for the same request,
# ("conflict", "") for the same key with another request.
Answer = tuple[str, str]
