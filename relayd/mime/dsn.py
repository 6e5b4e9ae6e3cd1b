"""Delivery status notifications (RFC 3464): what the sender gets back when mail fails or waits.

One multipart/report per message and event, listing every recipient concerned with its status
and the remote reply; sent with a null envelope sender so it can never be bounced again.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid

from relayd.mime import headers
from relayd.model.message import Report
from relayd.model.status import status_of


def build(report: Report, reporting_mta: str, now: float) -> bytes:
    """The DSN message, CRLF line endings, ready to spool."""
    boundary = f"{report.queue_id}/{reporting_mta}"
    failed = report.kind == "failed"
    date = datetime.fromtimestamp(now, UTC)
    arrival = format_datetime(datetime.fromtimestamp(report.received_at, UTC))
    subject = (
        "Undelivered Mail Returned to Sender" if failed else "Delayed Mail (still being retried)"
    )
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{report.sender}>",
        f"Subject: {subject}",
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
    if failed:
        lines.append("Your message could not be delivered to one or more recipients.")
        lines.append("Its header section is attached below. The remote replies were:")
    else:
        lines.append("Your message has not been delivered yet to one or more recipients;")
        lines.append("delivery is still being attempted, you need not resend it.")
    lines.append("")
    for rcpt, code, reply, mx in report.recipients:
        lines.append(f"<{rcpt}>: host {mx or 'none'} said: {code} {_one_line(reply)}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Relayd-Queue-ID: {report.queue_id}",
        f"Arrival-Date: {arrival}",
    ]
    for rcpt, code, reply, mx in report.recipients:
        lines += [
            "",
            f"Final-Recipient: rfc822; {rcpt}",
            f"Action: {'failed' if failed else 'delayed'}",
            f"Status: {status_of(code, reply) if failed else '4.0.0'}",
        ]
        if mx:
            lines.append(f"Remote-MTA: dns; {mx}")
        if code:
            lines.append(f"Diagnostic-Code: smtp; {code} {_one_line(reply)}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    head = headers.to_crlf(headers.split(report.body)[0])
    text = "\r\n".join(lines).encode() + b"\r\n" + head
    return text + f"\r\n\r\n--{boundary}--\r\n".encode()


def _one_line(reply: str) -> str:
    return " ".join(reply.split())
