"""Delivery status notifications (RFC 3464): what the sender gets back when mail fails or waits,
and when it is delivered if the sender asked (NOTIFY=SUCCESS, RFC 3461).

One multipart/report per message and event, listing every recipient concerned with its status
and the remote reply; sent with a null envelope sender so it can never be bounced again.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid

from relayd.mime import headers
from relayd.model.message import Report
from relayd.model.status import status_of

# RET=FULL returns the whole original up to this size; a larger one only its header section
# (as Postfix's bounce_size_limit does): the DSN is built and signed inside the transaction
# of the attempt that owes it, on the spool's one writer thread.
FULL_RETURN_MAX = 1024 * 1024

_SUBJECT = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "delivered": "Successful Mail Delivery Report",
}


def build(report: Report, reporting_mta: str, now: float) -> bytes:
    """The DSN message, CRLF line endings, ready to spool. The original goes back whole
    (message/rfc822) only in a failure DSN whose sender asked for it (RET=FULL, RFC 3461 4.3);
    every other DSN carries its header section (text/rfc822-headers)."""
    boundary = f"{report.queue_id}/{reporting_mta}"
    kind = report.kind
    date = datetime.fromtimestamp(now, UTC)
    arrival = format_datetime(datetime.fromtimestamp(report.received_at, UTC))
    full = kind == "failed" and report.ret == "FULL"
    too_large = full and len(report.body) > FULL_RETURN_MAX
    full = full and not too_large
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{report.sender}>",
        f"Subject: {_SUBJECT[kind]}",
        f"Date: {format_datetime(date)}",
        f"Message-ID: {make_msgid(domain=reporting_mta)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"This is the mail system at host {reporting_mta}.",
        "",
    ]
    if kind == "failed":
        lines.append("Your message could not be delivered to one or more recipients.")
    elif kind == "delayed":
        lines.append("Your message has not been delivered yet to one or more recipients;")
        lines.append("delivery is still being attempted, you need not resend it.")
    else:
        lines.append("Your message was delivered to the following recipients, as you asked")
        lines.append("to be told: their mail servers accepted it.")
    if full:
        lines.append("It is attached below, whole.")
    elif too_large:
        lines.append(
            f"It is larger than {FULL_RETURN_MAX} bytes, so only its header section is"
            " attached below."
        )
    else:
        lines.append("Its header section is attached below.")
    lines.append("")
    lines.append("The remote replies were:")
    lines.append("")
    for rcpt, code, reply, mx in report.recipients:
        lines.append(f"<{rcpt}>: host {mx or 'none'} said: {code} {_one_line(reply)}")
    lines += ["", f"--{boundary}", "Content-Type: message/delivery-status", ""]
    # per-message fields in RFC 3464's order; extension fields (X-) last
    if report.envid is not None:
        lines.append(f"Original-Envelope-Id: {report.envid}")
    lines += [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"Arrival-Date: {arrival}",
        f"X-Relayd-Queue-ID: {report.queue_id}",
    ]
    orcpts = report.orcpt or [None] * len(report.recipients)
    for (rcpt, code, reply, mx), orcpt in zip(report.recipients, orcpts, strict=True):
        lines.append("")
        if orcpt is not None:
            lines.append(f"Original-Recipient: {orcpt}")
        lines += [
            f"Final-Recipient: rfc822; {rcpt}",
            f"Action: {kind}",
            f"Status: {_status(kind, code, reply)}",
        ]
        if mx:
            lines.append(f"Remote-MTA: dns; {mx}")
        if code:
            lines.append(f"Diagnostic-Code: smtp; {code} {_one_line(reply)}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/rfc822" if full else "Content-Type: text/rfc822-headers",
        "",
    ]
    if full:
        original = headers.to_crlf(bytes(report.body)).removesuffix(b"\r\n")
    else:
        original = headers.to_crlf(headers.split(report.body)[0])
    text = "\r\n".join(lines).encode() + b"\r\n" + original
    return text + f"\r\n\r\n--{boundary}--\r\n".encode()


def _status(kind: str, code: int, reply: str) -> str:
    if kind == "failed":
        return status_of(code, reply)
    return "4.0.0" if kind == "delayed" else "2.0.0"


def _one_line(reply: str) -> str:
    return " ".join(reply.split())
