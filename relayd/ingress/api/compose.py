"""What a send request becomes: the messages it asks for, each as CRLF RFC 5322 text ready for
intake, with one result per recipient in request order; or the precise reason it is refused,
naming the field. Everything is checked before anything is queued."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.header import Header
from email.utils import formataddr
from typing import Any

import jinja2

from relayd.ingress import metadata
from relayd.ingress.api.schema import Address, Recipient, Send
from relayd.ingress.credentials import Credential
from relayd.ingress.smtp import valid_address
from relayd.mime import headers
from relayd.model.ids import new_queue_id
from relayd.model.message import META_MAX, TRANSACTIONAL, NewMessage
from relayd.spool.suppression import Entry
from relayd.templates import template
from relayd.tracking import Tracker

MAX_SEND_AHEAD = 30 * 86400.0  # send_at at most this far ahead
MAX_TAGS, MAX_TAG = 10, 100
_FIELD_NAME = re.compile(r"^[!-9;-~]{1,76}$")  # RFC 5322 ftext, and a sane length
# Set by relayd for every message: a request may not name them among its extra headers.
_OWN_HEADERS = {"from", "to", "cc", "bcc", "reply-to", "subject", "date", "message-id"}
_OWN_HEADERS |= {"mime-version", "content-type", "content-transfer-encoding", "received"}
_OWN_HEADERS.add(metadata.STREAM_HEADER.lower())  # the request's field "stream" says it


class Invalid(Exception):
    """The request is refused as a whole: ``field`` (a JSON path) and what is wrong with it."""

    def __init__(self, field: str, problem: str, status: int = 422) -> None:
        super().__init__(f"{field}: {problem}")
        self.field, self.problem, self.status = field, problem, status


@dataclass
class Outcome:
    """One recipient's line in the answer, in request order."""

    email: str
    status: str  # "queued", "rejected" or "suppressed" (on the suppression list: not sent)
    message_id: str | None = None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "email": self.email,
            "message_id": self.message_id,
            "status": self.status,
            "error": self.error,
        }


@dataclass(frozen=True)
class Limits:
    max_recipients: int
    max_message_size: int
    hostname: str


# The suppression list's answer for (envelope sender, its key's account, recipients).
Suppressed = Callable[[str, str | None, list[str]], dict[str, Entry]]


def compose(
    req: Send,
    cred: Credential,
    client: str,
    limits: Limits,
    now: float,
    lookup: Suppressed,
    tracker: Tracker | None = None,
) -> tuple[list[NewMessage], list[Outcome]]:
    """The messages of a request and each recipient's outcome (a suppressed recipient's
    message carries only its event); raises Invalid. With a ``tracker`` ([tracking] on), the
    HTML of each message is rewritten for it, as the key and the request allow."""
    sender = address_of(req.sender, "from")
    envelope = req.envelope_sender or sender.email
    if not valid_address(envelope, True) or _has_newline(envelope):
        raise Invalid("envelope_sender", f"not an address: {envelope!r}")
    for field, address in (("from", sender.email), ("envelope_sender", envelope)):
        if not cred.may_send_as(address):
            raise Invalid(field, f"{address} is not a sender of key {cred.name}", 403)
    personal = bool(req.recipients)
    if personal and (req.to or req.cc or req.bcc):
        raise Invalid("recipients", "give either recipients (one message each) or to/cc/bcc")
    listed = [("recipients", i, r) for i, r in enumerate(req.recipients)] + [
        (field, i, r) for field in ("to", "cc", "bcc") for i, r in enumerate(getattr(req, field))
    ]
    if not listed:
        raise Invalid("to", "no recipient: give to, cc, bcc or recipients")
    limit = min(limits.max_recipients, cred.max_recipients or limits.max_recipients)
    if len(listed) > limit:
        raise Invalid("recipients", f"{len(listed)} recipients, at most {limit} per request")
    if (req.raw is None) == (req.text is None and req.html is None):
        raise Invalid("raw", "give either raw (a whole message) or text and/or html")
    send_at = _send_at(req.send_at, now)
    reply_to = address_of(req.reply_to, "reply_to") if req.reply_to is not None else None
    extra = _extra_headers(req.headers)
    parts = _attachments(req.attachments)
    templates = _templates(req) if personal else {}
    meta_base = _meta_base(req)
    if _has_newline(req.subject):
        raise Invalid("subject", "contains CR or LF (header injection)")

    outcomes: list[Outcome] = []
    # each recipient that parsed: its field, its place in the answer, its address, as given
    ok: list[tuple[str, int, Address, Address | Recipient | str]] = []
    for field, i, r in listed:
        email = r.email if isinstance(r, Address | Recipient) else r
        try:
            address = address_of(r, f"{field}[{i}]")
        except Invalid as exc:
            outcomes.append(Outcome(email, "rejected", error=exc.problem))
            continue
        outcomes.append(Outcome(address.email, "queued"))
        ok.append((field, len(outcomes) - 1, address, r))
    if not ok:
        return [], outcomes
    stopped = lookup(envelope, cred.account, [a.email for _, _, a, _ in ok])
    for _, index, address, _ in ok:
        if address.email in stopped:
            outcomes[index].status = "suppressed"
            outcomes[index].error = stopped[address.email].why()

    build = Builder(
        sender, reply_to, extra, parts, limits, client, cred.account, req.stream, cred.stream
    )
    if tracker is not None and cred.tracking:
        asked = req.tracking
        build.tracking(tracker, *((asked.opens, asked.clicks) if asked else (True, True)))
    msgs: list[NewMessage] = []
    if personal:
        for _, index, address, r in ok:
            assert isinstance(r, Recipient)
            context = {**req.substitutions, **r.substitutions}
            context.setdefault("email", address.email)
            context.setdefault("name", address.name)
            try:
                meta = _meta(meta_base, r.metadata, f"recipients[{index}].metadata")
                if address.email in stopped:  # no text: only its `suppressed` event is stored
                    msg = build.carrier(envelope, [_stopped(address.email, stopped)], meta)
                    outcomes[index].message_id = msg.queue_id
                    msgs.append(msg)
                    continue
                rendered = {k: t.render(context) for k, t in templates.items()}
            except (jinja2.TemplateError, ValueError, TypeError, Invalid) as exc:
                outcomes[index].status, outcomes[index].error = "rejected", _why(exc)
                continue
            if _has_newline(rendered.get("subject", "")):
                outcomes[index].status = "rejected"
                outcomes[index].error = "subject: contains CR or LF after substitution"
                continue
            msg = build.message(envelope, [address], [address], [], rendered, meta, send_at)
            _settle(msg, [outcomes[index]], limits)
            if msg.queue_id:
                msgs.append(msg)
    else:
        rcpts = [outcomes[index] for _, index, _, _ in ok]
        by_field: dict[str, list[Address]] = {"to": [], "cc": [], "bcc": []}
        for field, _, address, _ in ok:
            by_field[field].append(address)
        rendered = {"subject": req.subject, "text": req.text, "html": req.html, "raw": req.raw}
        everyone = by_field["to"] + by_field["cc"] + by_field["bcc"]
        sent = [a for a in everyone if a.email not in stopped]
        meta = _meta(meta_base, {}, "metadata")
        if sent:
            to, cc = by_field["to"], by_field["cc"]
            msg = build.message(envelope, sent, to, cc, rendered, meta, send_at)
        else:
            msg = build.carrier(envelope, [], meta)
        msg.suppressed = [_stopped(a.email, stopped) for a in everyone if a.email in stopped]
        _settle(msg, rcpts, limits)
        if msg.queue_id:
            msgs.append(msg)
    return msgs, outcomes


def _stopped(email: str, stopped: dict[str, Entry]) -> tuple[str, str, str, str]:
    """A suppressed recipient as the message records it (NewMessage.suppressed)."""
    entry = stopped[email]
    return (email, entry.scope, entry.reason, entry.bounce_class)


def _settle(msg: NewMessage, outcomes: list[Outcome], limits: Limits) -> None:
    """Give the recipients their message id, or refuse them all when it came out too large."""
    if len(msg.body) > limits.max_message_size:
        msg.queue_id = ""
        for o in outcomes:
            o.status = "rejected"
            o.error = f"message of {len(msg.body)} bytes, over the {limits.max_message_size} limit"
        return
    for o in outcomes:
        o.message_id = msg.queue_id


class Builder:
    """Builds one message from checked parts: compose() for the API's requests, the campaign
    runner for each contact."""

    def __init__(
        self,
        sender: Address,
        reply_to: Address | None,
        extra: list[tuple[str, str]],
        parts: list[tuple[bytes, str, str, str]],
        limits: Limits,
        client: str,
        origin: str,
        stream: str | None,
        default_stream: str = TRANSACTIONAL,  # when neither ``stream`` nor a raw text names one
    ) -> None:
        self.sender, self.reply_to, self.extra, self.parts = sender, reply_to, extra, parts
        self.limits, self.client, self.origin = limits, client, origin
        self.stream, self.default_stream = stream, default_stream
        self.tracker: Tracker | None = None

    def tracking(self, tracker: Tracker, opens: bool, clicks: bool) -> None:
        """Rewrite the HTML for ``tracker``: its open pixel and/or its links, as asked."""
        self.opens, self.clicks = opens, clicks
        if opens or clicks:
            self.tracker = tracker

    def message(
        self,
        envelope: str,
        rcpts: list[Address],
        to: list[Address],
        cc: list[Address],
        rendered: dict[str, str | None],
        meta: str,
        send_at: float,
        queue_id: str = "",
    ) -> NewMessage:
        queue_id = queue_id or new_queue_id()
        utf8 = not (envelope.isascii() and all(r.email.isascii() for r in rcpts))
        hostname = self.limits.hostname
        if rendered.get("raw") is not None:
            text = headers.to_crlf(str(rendered["raw"]).encode("utf-8"))
            if not text.endswith(b"\r\n"):
                text += b"\r\n"
            try:  # a raw message may name its stream as an SMTP client would
                named, text = metadata.extract_stream(text)
            except metadata.MetadataError as exc:
                raise Invalid("raw", exc.reply.split(" ", 2)[2]) from None  # without the codes
        else:
            html = rendered.get("html")
            if html is not None and self.tracker is not None:
                # after substitution (the links are the recipient's), before MIME: each
                # token names the message and its one recipient ("" when it has several)
                rcpt = rcpts[0].email if len(rcpts) == 1 else ""
                html = self.tracker.rewrite(html, queue_id, rcpt, self.opens, self.clicks)
                rendered = {**rendered, "html": html}
            text, named = self._mime(queue_id, to, cc, rendered), None
        head = headers.trace_headers(text, hostname, self.client, "", utf8, queue_id, "HTTP")
        return NewMessage(
            queue_id,
            envelope,
            [r.email for r in rcpts],
            text,
            self.client,
            "",
            self.origin,
            utf8,
            head=head,
            meta=meta,
            send_at=send_at,
            stream=self.stream or named or self.default_stream,
        )

    def carrier(
        self, envelope: str, suppressed: list[tuple[str, str, str, str]], meta: str
    ) -> NewMessage:
        """A message with no text and no one to send to: what carries the `suppressed` events
        of recipients whose message was not made."""
        return NewMessage(
            new_queue_id(),
            envelope,
            [],
            b"",
            self.client,
            "",
            self.origin,
            False,
            meta=meta,
            suppressed=suppressed,
        )

    def _mime(
        self,
        queue_id: str,
        to: list[Address],
        cc: list[Address],
        rendered: dict[str, str | None],
    ) -> bytes:
        """The message text, written directly (the email package's builder and generator cost
        ~2.5 ms a message here, this ~30 µs): the encoders are the standard library's."""
        lines = [f"From: {mailbox(self.sender)}"]
        if to:
            lines.append(_folded("To", [mailbox(a) for a in to]))
        if cc:
            lines.append(_folded("Cc", [mailbox(a) for a in cc]))
        if self.reply_to is not None:
            lines.append(f"Reply-To: {mailbox(self.reply_to)}")
        lines.append(f"Subject: {_unstructured(rendered.get('subject') or '')}")
        lines.append(f"Message-ID: <{queue_id}@{self.limits.hostname}>")
        lines += [f"{name}: {_unstructured(value)}" for name, value in self.extra]
        lines.append("MIME-Version: 1.0")
        text, html = rendered.get("text"), rendered.get("html")
        body = _text_part("plain", text) if text is not None else None
        if html is not None:
            html_part = _text_part("html", html)
            inline = [p for p in self.parts if p[3]]
            if inline:
                html_part = _multipart("related", queue_id, [html_part, *inline_parts(inline)])
            body = (
                html_part
                if body is None
                else _multipart("alternative", queue_id, [body, html_part])
            )
        assert body is not None
        attached = [p for p in self.parts if not p[3]]
        if attached:
            body = _multipart("mixed", queue_id, [body, *attachment_parts(attached)])
        return ("\r\n".join(lines) + "\r\n").encode() + body


def _text_part(subtype: str, content: str) -> bytes:
    """A text part: 7bit when it is ASCII in short lines, else quoted-printable UTF-8."""
    raw = headers.to_crlf(content.encode("utf-8"))
    if not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    if raw.isascii() and not headers.longest_line_over(raw, 998):
        cte = "7bit"
    else:
        cte, raw = "quoted-printable", _qp(raw)
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n'
    ).encode() + raw


def _qp(raw: bytes) -> bytes:
    """Quoted-printable (RFC 2045 6.7) of CRLF text ending in CRLF: binascii keeps its line
    ends and breaks long lines with CRLF soft breaks (one call: a third faster than line by
    line on a 16 KB newsletter)."""
    return binascii.b2a_qp(raw, quotetabs=False, istext=True)


def inline_parts(parts: list[tuple[bytes, str, str, str]]) -> list[bytes]:
    return [_binary_part(p, f"Content-ID: <{p[3]}>\r\nContent-Disposition: inline") for p in parts]


def attachment_parts(parts: list[tuple[bytes, str, str, str]]) -> list[bytes]:
    return [_binary_part(p, "Content-Disposition: attachment") for p in parts]


def _binary_part(part: tuple[bytes, str, str, str], disposition: str) -> bytes:
    data, ctype, filename, _ = part
    if filename:
        disposition += f'; filename="{_unstructured(filename)}"'
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    head = f"Content-Type: {ctype}\r\nContent-Transfer-Encoding: base64\r\n{disposition}\r\n"
    return head.encode() + b"\r\n" + encoded


def _multipart(subtype: str, queue_id: str, parts: list[bytes]) -> bytes:
    """A multipart of the given parts; the boundary holds the queue id and the subtype, and
    cannot occur in a part (base64, quoted-printable and our 7bit text lines never start
    with "--=_")."""
    boundary = f"=_{subtype}_{queue_id}"
    out = [f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n'.encode()]
    # each delimiter's leading CRLF belongs to it (RFC 2046 5.1.1), so a part keeps its own
    for i, part in enumerate(parts):
        out += [b"\r\n" if i else b"", f"--{boundary}\r\n".encode(), part]
    out.append(f"\r\n--{boundary}--\r\n".encode())
    return b"".join(out)


def mailbox(a: Address) -> str:
    """An address for a header field, its display name RFC 2047-encoded when not ASCII."""
    if not a.name:
        return a.email
    return formataddr((a.name, a.email), charset="utf-8")


def _folded(name: str, items: list[str]) -> str:
    """A list field folded between items, so that no line exceeds 78 characters for long
    recipient lists."""
    out, line = [], f"{name}:"
    for i, item in enumerate(items):
        piece = f" {item}{',' if i < len(items) - 1 else ''}"
        if len(line) + len(piece) > 78 and line != f"{name}:":
            out.append(line)
            line = ""
        line += piece
    out.append(line)
    return "\r\n".join(out)


def _unstructured(value: str) -> str:
    """An unstructured header value: as it is when ASCII, else RFC 2047 encoded words."""
    if value.isascii():
        return value
    return Header(value, "utf-8").encode()


def address_of(value: Address | Recipient | str, field: str) -> Address:
    """An address as given (an object with email and name, or "Name <email>" or "email")."""
    if isinstance(value, str):
        name, email = _parse_address(value)
        sub = field
    else:
        name, email, sub = value.name, value.email, f"{field}.email"
    if _has_newline(email) or not valid_address(email, True):
        raise Invalid(sub, f"not an address: {email!r}")
    if _has_newline(name):
        raise Invalid(f"{field}.name" if sub != field else field, "contains CR or LF")
    return Address(email, name)


def _parse_address(value: str) -> tuple[str, str]:
    value = value.strip()
    if value.endswith(">") and "<" in value:
        name, _, email = value[:-1].rpartition("<")
        return name.strip().strip('"'), email.strip()
    return "", value


def _has_newline(value: str) -> bool:
    return "\r" in value or "\n" in value


def instant(value: str | float, field: str) -> float:
    """An RFC 3339 time with its zone, or a Unix time: seconds since the epoch."""
    if isinstance(value, str):
        try:
            at = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise Invalid(field, f"not an RFC 3339 time: {value!r}") from None
        if at.tzinfo is None:
            raise Invalid(field, "give a time zone (Z or an offset)")
        when = at.timestamp()
    else:
        when = float(value)
    if not math.isfinite(when):
        raise Invalid(field, f"not a time: {value!r}")
    return when


def _send_at(value: str | float | None, now: float) -> float:
    if value is None:
        return 0.0
    when = instant(value, "send_at")
    if when > now + MAX_SEND_AHEAD:
        raise Invalid("send_at", f"more than {MAX_SEND_AHEAD / 86400:.0f} days ahead")
    return when if when > now else 0.0


def _extra_headers(given: dict[str, str]) -> list[tuple[str, str]]:
    extra = []
    for name, value in given.items():
        if not _FIELD_NAME.match(name):
            raise Invalid(f"headers.{name}", "not a header field name")
        if name.lower() in _OWN_HEADERS:
            raise Invalid(f"headers.{name}", "set by relayd from the request's own fields")
        if _has_newline(value):
            raise Invalid(f"headers.{name}", "contains CR or LF (header injection)")
        extra.append((name, value))
    return extra


def _attachments(given: list[Any]) -> list[tuple[bytes, str, str, str]]:
    parts = []
    for i, a in enumerate(given):
        try:
            data = base64.b64decode(a.content, validate=True)
        except (binascii.Error, ValueError):
            raise Invalid(f"attachments[{i}].content", "not base64") from None
        maintype, slash, subtype = a.content_type.partition("/")
        if not slash or not _FIELD_NAME.match(maintype) or not _FIELD_NAME.match(subtype):
            raise Invalid(f"attachments[{i}].content_type", "not a type/subtype")
        for field in ("filename", "content_id"):
            if _has_newline(getattr(a, field)) or '"' in getattr(a, field):
                raise Invalid(f"attachments[{i}].{field}", "contains CR, LF or a quote")
        parts.append((data, a.content_type, a.filename, a.content_id))
    return parts


def _templates(req: Send) -> dict[str, jinja2.Template]:
    """The request's texts compiled once for all its recipients, in relayd's one template
    environment (the immutable sandbox, the HTML part autoescaped); a syntax error names the
    field, line and problem before anything is queued."""
    sources = {"subject": req.subject, "text": req.text, "html": req.html, "raw": req.raw}
    compiled = {}
    for field, source in sources.items():
        if source is None:
            continue
        try:
            compiled[field] = template(source, field)
        except jinja2.TemplateSyntaxError as exc:
            raise Invalid(field, f"template error at line {exc.lineno}: {exc.message}") from None
    return compiled


def _meta_base(req: Send) -> dict[str, Any]:
    """The request's metadata, its tags under the key "tags": one flat object, as SMTP's
    metadata headers give it, so that events and webhooks read both alike."""
    if len(req.tags) > MAX_TAGS:
        raise Invalid("tags", f"at most {MAX_TAGS} tags")
    for i, tag in enumerate(req.tags):
        if not tag or len(tag) > MAX_TAG:
            raise Invalid(f"tags[{i}]", f"a tag is 1 to {MAX_TAG} characters")
    for field, given in [("metadata", req.metadata)] + [
        (f"recipients[{i}].metadata", r.metadata) for i, r in enumerate(req.recipients)
    ]:
        if "tags" in given:
            raise Invalid(f"{field}.tags", "reserved for the request's tags")
    base = {**req.metadata, **({"tags": req.tags} if req.tags else {})}
    _meta(base, {}, "metadata")
    return base


def _meta(base: dict[str, Any], own: dict[str, Any], field: str) -> str:
    """The message's metadata as stored (into its events, never into the mail)."""
    merged = {**base, **own}
    if not merged:
        return ""
    text = json.dumps(merged, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode()) > META_MAX:
        raise Invalid(field, f"metadata and tags over {META_MAX} bytes as JSON")
    return text


def _why(exc: Exception) -> str:
    if isinstance(exc, Invalid):
        return str(exc)
    return f"substitution failed: {exc}"
