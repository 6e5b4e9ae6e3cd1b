"""What a report changes, decided and written in the one transaction the bounce listener
commits before its 250: a `bounced` event (or `deferred`, for a delay notice) for the message
and recipient a delivery report names, a `complained` event for a feedback report, and the
suppression entries they call for.

The message may have left the spool long ago (delivered, then the report came days later): its
`accepted` event, kept ``events.retention``, still says who sent it, as whom and to whom.
A report names its message by our return path (the address it came to, an ARF report's
Original-Mail-From, the returned message's Return-Path: signed, so believed even when relayd
has no record left of the message), else by the queue id in the Received field relayd wrote
(for a message relayd knows: anyone can write a Received field). A report that names none is
accepted and changes nothing.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from relayd.config import Suppression
from relayd.events.records import Event, Type, receipt_keys
from relayd.feedback.reports import (
    Complaint,
    DeliveryReport,
    Headers,
    Recipient,
    address,
    addresses,
)
from relayd.feedback.reports import header as fields_named
from relayd.feedback.tokens import BadToken, ReturnPaths
from relayd.model.address import domain_of
from relayd.outcomes.classify import Classifier
from relayd.outcomes.decide import hard_bounces
from relayd.spool import api, store, suppression
from relayd.spool.suppression import Entry

# feedback types that are a recipient's complaint (RFC 5965 3.1; unknown ones count as
# "other"); "not-spam" (RFC 6430) is recorded but suppresses nothing, "auth-failure" (RFC
# 6591, a DMARC failure report) is no complaint at all
NOT_COMPLAINTS = ("not-spam", "auth-failure")
_DETAIL_MAX = 1000  # characters of a report kept with its suppression entry


@dataclass(frozen=True)
class Policy:
    """What a report is recorded under: the bounce classes, [suppression], server.hostname."""

    classifier: Classifier  # a bounce's class, and whether it is hard
    suppression: Suppression  # bounce_ttl, bounce_scope, complaint_scope
    hostname: str  # relayd's Received fields say "by HOSTNAME (relayd)"


@dataclass(frozen=True)
class Original:
    """What relayd knows of the message a report is about."""

    queue_id: str
    sender: str
    origin: str  # "key:NAME", "auth:NAME", "trusted:IP", ...
    recipients: tuple[str, ...]
    receipt: dict[str, Any]  # envid, meta and stream (receipt_keys), into the report's events


@dataclass
class Outcome:
    events: list[Event] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # why parts of a report did nothing


def original(conn: sqlite3.Connection, queue_id: str) -> Original | None:
    """From the message's `accepted` event, or (that pruned) its spool row."""
    status = api.message_status(conn, queue_id)
    if status is None:
        return None
    for e in status["events"]:
        if e["type"] == Type.RECEPTION:
            rcpts = e.get("rcpt") or []
            receipt = {k: e[k] for k in ("envid", "meta", "stream") if k in e}
            return Original(
                queue_id, e.get("sender", ""), e.get("origin", ""), tuple(rcpts), receipt
            )
    if status["message"] is None:
        return None
    _, sender, _, _, origin, meta = status["message"]
    return Original(queue_id, sender, origin, tuple(status["spooled"]), receipt_keys(None, meta))


def apply(
    conn: sqlite3.Connection,
    report: DeliveryReport | Complaint,
    to_queue_id: str | None,
    paths: ReturnPaths,
    policy: Policy,
    now: float,
) -> Outcome:
    """Record a report (``to_queue_id``: the message whose return path it came to, if it did)
    in the caller's transaction: its events and suppression entries, or why it has none."""
    if isinstance(report, Complaint):
        out = complaint(conn, report, to_queue_id, paths, policy, now)
    else:
        queue_id, _, found = _message_of(
            conn, report.returned, to_queue_id, "", paths, policy.hostname
        )
        if queue_id is None:
            out = Outcome(unmatched=["names no message relayd sent"])
        else:
            out = delivery_report(report, queue_id, found, policy, now)
            if not report.recipients:
                out.unmatched.append(f"{queue_id}: reports no failed or delayed recipient")
    _write(conn, out)
    return out


def delivery_report(
    report: DeliveryReport,
    queue_id: str,
    found: Original | None,
    policy: Policy,
    now: float,
) -> Outcome:
    """The events and entries of a DSN about ``queue_id`` (``found``: what relayd knows of
    it): a hard bounce's entry as an attempt's would be (decide.hard_bounces), for a
    recipient the message had."""
    out = Outcome()
    if found is None:
        out.unmatched.append(f"{queue_id}: no record of the message (past events.retention?)")
    ours_only = []  # the events that may suppress
    for r in report.recipients:
        rcpt, ours = _recipient_of(r, found)
        data: dict[str, Any] = {
            "sender": found.sender if found else "",
            "rcpt": rcpt,
            "domain": domain_of(rcpt),
            "mx": r.remote_mta,
            "code": r.code,
            "status": r.status,
            "response": r.diagnostic,
            "async": True,
            "class": policy.classifier.classify(r.code, r.diagnostic),
            "format": report.format,
        }
        if rcpt != r.rcpt:
            data["final_rcpt"] = r.rcpt  # forwarded: the address that failed
        kind = Type.BOUNCE if r.action == "failed" else Type.TRANSIENT_FAILURE
        event = Event(kind, queue_id, now, data | (found.receipt if found else {}))
        out.events.append(event)
        if ours:
            ours_only.append(event)
        else:
            out.unmatched.append(f"{rcpt}: not a recipient of {queue_id}: not suppressed")
    origin = found.origin if found else ""
    out.entries = hard_bounces(
        ours_only, policy.classifier, policy.suppression, lambda: origin, now
    )
    scopes = {e.address: e.scope for e in out.entries}
    for event in ours_only:
        if event.data["rcpt"] in scopes:
            event.data["suppressed"] = scopes[event.data["rcpt"]]
    return out


def complaint(
    conn: sqlite3.Connection,
    report: Complaint,
    to_queue_id: str | None,
    paths: ReturnPaths,
    policy: Policy,
    now: float,
) -> Outcome:
    """The event and entry of a feedback report; nothing when it names no message relayd
    sent."""
    out = Outcome()
    queue_id, how, found = _message_of(
        conn, report.returned, to_queue_id, report.original_mail_from, paths, policy.hostname
    )
    if queue_id is None:
        out.unmatched.append("names no message relayd sent (no return path, no relayd Received)")
        return out
    if report.feedback_type == "auth-failure":
        out.unmatched.append(f"{queue_id}: an authentication failure report, not a complaint")
        return out
    rcpt = _complainant(report, found)
    if not rcpt:
        out.unmatched.append(f"{queue_id}: no Original-Rcpt-To, and no one recipient to blame")
        return out
    sender = found.sender if found else ""
    data: dict[str, Any] = {
        "sender": sender,
        "rcpt": rcpt,
        "domain": domain_of(rcpt),
        "feedback_type": report.feedback_type or "other",
        "user_agent": report.user_agent,
        "source_ip": report.source_ip,
        "arrival_date": report.arrival_date,
        "reporting_mta": report.reporting_mta,
        "found_by": how,
    }
    if report.feedback_type not in NOT_COMPLAINTS:
        # relayd no longer knowing the message, its From field tells the sender's domain
        header_from = addresses(fields_named(report.returned, "from"))
        by = found.sender if found else next(iter(header_from), "")
        scope = _complaint_scope(policy.suppression.complaint_scope, found, by)
        if scope is None:
            out.unmatched.append(f"{rcpt}: sender of {queue_id} unknown: not suppressed")
        else:
            agent = report.user_agent or report.reporting_mta or "unknown reporter"
            detail = f"{data['feedback_type']} report by {agent}"[:_DETAIL_MAX]
            out.entries.append(
                Entry(rcpt.lower(), scope, "complaint", now, None, "", detail, queue_id)
            )
            data["suppressed"] = scope
    receipt = found.receipt if found else {}
    out.events.append(Event(Type.COMPLAINT, queue_id, now, data | receipt))
    return out


def _write(conn: sqlite3.Connection, out: Outcome) -> None:
    store.append_events(conn, out.events)
    suppression.add(conn, out.entries)


def _recipient_of(r: Recipient, found: Original | None) -> tuple[str, bool]:
    """The recipient of ours a failure is about, and whether it is one: the Original- or the
    Final-Recipient as the message had it; a message to one recipient forwarded elsewhere,
    that one; without a record of the message, what the report says."""
    named = [a for a in (r.original, r.rcpt) if a]
    if found is None:
        return named[0], True
    ours = {a.lower(): a for a in found.recipients}
    for a in named:
        if a.lower() in ours:
            return ours[a.lower()], True
    if len(found.recipients) == 1:
        return found.recipients[0], True
    return r.rcpt, False


def _complaint_scope(setting: str, found: Original | None, sender: str) -> str | None:
    """[suppression] complaint_scope as a scope: the whole list, the key or login that sent the
    mail, or (for mail that none sent, and by default) the sender's domain; None when that is
    not known."""
    if setting == "global":
        return suppression.GLOBAL
    if setting == "key" and found is not None and found.origin.startswith(("key:", "auth:")):
        return found.origin
    return f"domain:{domain_of(sender)}" if sender else None


_RELAYD_RECEIVED = re.compile(r"\bby (\S+) \(relayd\) with \S+ id ([0-9A-F]{16})\b")


def _message_of(
    conn: sqlite3.Connection,
    returned: Headers,
    to_queue_id: str | None,
    mail_from: str,
    paths: ReturnPaths,
    hostname: str,
) -> tuple[str | None, str, Original | None]:
    """(queue id, how it was found, what relayd knows of it) of the message a report is
    about: the return path it came to, the report's Original-Mail-From, the returned
    Return-Path; else the id in relayd's Received field, for a message relayd knows."""
    candidates = [("rcpt_to", to_queue_id)]
    for how, value in (
        ("original_mail_from", mail_from),
        *(("return_path", address(v)) for v in fields_named(returned, "return-path")),
    ):
        try:
            candidates.append((how, paths.queue_id_of(value) if value else None))
        except BadToken:
            continue  # looks like ours, is not: forged or damaged
    for how, queue_id in candidates:
        if queue_id is not None:
            return queue_id, how, original(conn, queue_id)
    for value in fields_named(returned, "received"):
        m = _RELAYD_RECEIVED.search(value)
        if m and m.group(1).lower() == hostname.lower():
            found = original(conn, m.group(2))
            if found is not None:  # an id anyone could write: only one relayd knows counts
                return m.group(2), "received", found
    return None, "", None


def _complainant(report: Complaint, found: Original | None) -> str:
    """Who complained: Original-Rcpt-To (many reporters redact it), else the message's one
    recipient, else the returned To field's one address."""
    if report.original_rcpt_to:
        return report.original_rcpt_to[0]
    if found is not None and len(found.recipients) == 1:
        return found.recipients[0]
    to = addresses(fields_named(report.returned, "to"))
    return to[0] if len(to) == 1 else ""
