"""What comes back to relayd's return path, read: RFC 3464 delivery status notifications, the
common non-standard bounces (flufl.bounce finds their recipients; the SMTP reply they quote is
taken from the text) and RFC 5965 feedback (ARF) reports. Pure: bytes in, records out; what a
report changes is relayd.feedback.record's."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser, HeaderParser
from email.policy import compat32
from email.utils import getaddresses, parseaddr

from flufl.bounce import all_failures

# header fields as (lower-case name, unfolded value), in order
Headers = tuple[tuple[str, str], ...]

_STATUS = re.compile(r"(?<![\w.])([245])\.(\d{1,3})\.(\d{1,3})(?![\w.])")  # RFC 3463
_REPLY = re.compile(r"(?<![\w.#])([245][0-5]\d)(?=[ -]|$)")  # an SMTP reply code
_BLANK_LINE = re.compile(r"\r?\n[ \t]*\r?\n")
_RETURNED = ("message/rfc822", "text/rfc822-headers", "message/rfc822-headers")
_QUOTED_LINES = 12  # lines after a failed address searched for the reply it got


@dataclass(frozen=True)
class Recipient:
    """One recipient of a delivery report: failed (a bounce) or delayed (the remote MTA keeps
    trying). Recipients delivered, relayed or expanded are not reported."""

    rcpt: str  # Final-Recipient: the address the reporting MTA tried
    original: str  # Original-Recipient, "" when not given
    action: str  # "failed" or "delayed"
    status: str  # the enhanced status code (RFC 3463): "5.1.1"
    code: int  # the SMTP reply code of the diagnostic, else the one the status implies
    # the Diagnostic-Code (or the line a non-standard bounce quotes) as relayd keeps a reply's
    # text: without the reply code, an enhanced status code first (the status's if it has none)
    diagnostic: str
    remote_mta: str  # Remote-MTA, else the Reporting-MTA; "" when neither is given


@dataclass(frozen=True)
class DeliveryReport:
    format: str  # "rfc3464", or "other": a non-standard bounce read by flufl.bounce
    recipients: tuple[Recipient, ...]
    returned: Headers  # the original's header fields, when the report returns them


@dataclass(frozen=True)
class Complaint:
    """An RFC 5965 feedback report: a recipient's complaint about a message."""

    feedback_type: str  # abuse, fraud, virus, other, not-spam, auth-failure, ... (lower case)
    user_agent: str
    original_mail_from: str
    original_rcpt_to: tuple[str, ...]
    arrival_date: str
    source_ip: str
    reporting_mta: str
    returned: Headers  # the header fields of the message complained about


@dataclass(frozen=True)
class Unrecognised:
    why: str


Report = DeliveryReport | Complaint | Unrecognised


def parse(raw: bytes) -> Report:
    """A feedback report, a delivery report (standard, else non-standard), or why neither."""
    msg = BytesParser(policy=compat32).parsebytes(raw)
    parts = list(_parts(msg))
    for part in parts:
        if part.get_content_type() == "message/feedback-report":
            return _complaint(_fields(part), parts)
    statuses = [p for p in parts if p.get_content_type() == "message/delivery-status"]
    if statuses:
        return _rfc3464(statuses, parts)
    try:
        temporary, permanent = all_failures(msg)
    except Exception as exc:  # a heuristic over hostile text: its failure means "not read"
        return Unrecognised(f"flufl.bounce could not read it: {exc!r}")
    if not temporary and not permanent:
        return Unrecognised("neither a delivery status notification nor a feedback report")
    return _other(msg, parts, temporary, permanent)


def header(fields: Headers, name: str) -> list[str]:
    """The values of the fields called ``name`` (lower case)."""
    return [value for n, value in fields if n == name]


def address(value: str) -> str:
    """The address of "rfc822; a@b", "<a@b>", "Name <a@b>" or "a@b"; "" when there is none."""
    _, _, rest = value.rpartition(";")
    found = parseaddr(rest.strip())[1] or rest.strip().strip("<>")
    return found if "@" in found else ""


def addresses(values: list[str]) -> list[str]:
    """The addresses in address-list field values (To, Cc)."""
    return [a for _, a in getaddresses(values) if "@" in a]


# -- RFC 3464 ---------------------------------------------------------------------------------


def _rfc3464(statuses: list[Message], parts: list[Message]) -> DeliveryReport:
    found = []
    for status in statuses:
        blocks = _blocks(status)
        reporting = next((_host(b["reporting-mta"]) for b in blocks if b["reporting-mta"]), "")
        for block in blocks:
            if block["final-recipient"] is None:
                continue  # the per-message fields
            status_code = _status(_unfold(block["status"] or ""))
            code, diagnostic = _one_reply(_typed(block["diagnostic-code"] or ""))
            status_code = status_code or _status(diagnostic)
            action = _unfold(block["action"] or "").lower().split(" ")[0]
            if not action and status_code[:1] in ("4", "5"):
                action = "failed" if status_code[0] == "5" else "delayed"
            if action not in ("failed", "delayed"):
                continue
            status_code = status_code or ("5.0.0" if action == "failed" else "4.0.0")
            found.append(
                Recipient(
                    rcpt=address(_unfold(block["final-recipient"])),
                    original=address(_unfold(block["original-recipient"] or "")),
                    action=action,
                    status=status_code,
                    code=code or _code(status_code),
                    diagnostic=_kept(diagnostic, status_code),
                    remote_mta=_host(block["remote-mta"] or "") or reporting,
                )
            )
    return DeliveryReport("rfc3464", tuple(r for r in found if r.rcpt), _returned(parts))


def _blocks(part: Message) -> list[Message]:
    """The field blocks of a message/delivery-status part: as the email package parsed them,
    or parsed here from its text (a part it left as text)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [b for b in payload if isinstance(b, Message)]
    text = _text(part)
    return [HeaderParser(policy=compat32).parsestr(b.strip()) for b in _BLANK_LINE.split(text)]


def _status(text: str) -> str:
    m = _STATUS.search(text)
    return ".".join(m.groups()) if m else ""


def _code(status: str) -> int:
    """The reply code a status's class usually comes with (550, 450)."""
    return {"2": 250, "4": 450, "5": 550}.get(status[:1], 0)


def _one_reply(text: str) -> tuple[int, str]:
    """The code and text of a reply quoted on one line, a multi-line one ("550-5.1.1 a
    550-5.1.1 b 550 5.1.1 c") made one ((550, "5.1.1 a b c")); (0, text) without a code."""
    m = re.match(r"([245]\d\d)(?:[ -]+|$)(?:([245]\.\d{1,3}\.\d{1,3})(?: +|$))?", text)
    if not m:
        return 0, text
    code, status = m.groups()
    again = re.compile(rf" {code}[ -](?:{re.escape(status)} +)?" if status else rf" {code}[ -]")
    rest = again.sub(" ", text[m.end() :])
    return int(code), f"{status} {rest}".strip() if status else rest


def _kept(text: str, status: str) -> str:
    """A reply text as relayd keeps one (and its classifier reads it): the enhanced code first."""
    return text if _STATUS.match(text) or not status else f"{status} {text}".rstrip()


def _host(value: str) -> str:
    """The host of an MTA field ("dns; mx.example.com. (comment)")."""
    words = _typed(value).split()
    return words[0].rstrip(".") if words else ""


def _typed(value: str) -> str:
    """The text of a typed field ("smtp; 550 ...", "dns; mx.example.com"), unfolded."""
    kind, semi, rest = value.partition(";")
    return _unfold(rest if semi else kind)


# -- non-standard bounces -------------------------------------------------------------------


def _other(
    msg: Message, parts: list[Message], temporary: frozenset[bytes], permanent: frozenset[bytes]
) -> DeliveryReport:
    text = "\n".join(_text(p) for p in parts if p.get_content_maintype() == "text")
    found = []
    for action, addresses in (("failed", permanent), ("delayed", temporary - permanent)):
        for raw in sorted(addresses):
            rcpt = raw.decode("ascii")
            code, status, line = _quoted(text, rcpt)
            status = status or ("5.0.0" if action == "failed" else "4.0.0")
            kept = _kept(line, status)
            found.append(Recipient(rcpt, "", action, status, code or _code(status), kept, ""))
    return DeliveryReport("other", tuple(found), _returned(parts))


def _quoted(text: str, rcpt: str) -> tuple[int, str, str]:
    """(code, status, text) of the first SMTP reply quoted in the lines after the address (as
    Exim, qmail and most others do: the address, then what its server said); the text is the
    reply's when the line starts with its code, else the whole line."""
    at = text.lower().find(rcpt.lower())
    if at < 0:
        return 0, "", ""
    for line in text[at + len(rcpt) :].splitlines()[:_QUOTED_LINES]:
        status, reply = _STATUS.search(line), _REPLY.search(line)
        if status or reply:
            line = " ".join(line.split())[:500]
            code, rest = _one_reply(line)
            return code or (int(reply.group(1)) if reply else 0), _status(line), rest
    return 0, "", ""


# -- RFC 5965 ---------------------------------------------------------------------------------


def _complaint(report: Message, parts: list[Message]) -> Complaint:
    def one(name: str) -> str:
        return _unfold(report[name] or "")

    return Complaint(
        feedback_type=one("feedback-type").lower(),
        user_agent=one("user-agent"),
        original_mail_from=address(one("original-mail-from")),
        original_rcpt_to=tuple(
            a for v in report.get_all("original-rcpt-to", []) if (a := address(_unfold(v)))
        ),
        arrival_date=one("arrival-date"),
        source_ip=one("source-ip"),
        reporting_mta=_host(one("reporting-mta")),
        returned=_returned(parts),
    )


def _fields(part: Message) -> Message:
    """The fields of a message/feedback-report part (parsed by the email package as the header
    of an enclosed message, or here from its decoded text)."""
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        return payload[0]
    return HeaderParser(policy=compat32).parsestr(_text(part))


# -- common -------------------------------------------------------------------------------------


def _parts(msg: Message) -> Iterator[Message]:
    """The message and its parts, not descending into an enclosed message (the original a
    report returns may itself hold anything)."""
    yield msg
    if msg.get_content_maintype() == "multipart" and isinstance(msg.get_payload(), list):
        for part in msg.get_payload():
            yield from _parts(part)


def _returned(parts: list[Message]) -> Headers:
    """The header fields of the original message the report returns (whole or headers only)."""
    for part in parts:
        kind = part.get_content_type()
        if kind not in _RETURNED:
            continue
        payload = part.get_payload()
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            original = payload[0]
        else:
            original = HeaderParser(policy=compat32).parsestr(_text(part))
        return tuple((name.lower(), _unfold(str(value))) for name, value in original.items())
    return ()


def _text(part: Message) -> str:
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        payload = part.get_payload()
        return payload if isinstance(payload, str) else ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, "replace")
    except LookupError:  # a charset Python does not know
        return data.decode("utf-8", "replace")


def _unfold(value: str) -> str:
    return " ".join(str(value).split())
