"""The shapes of the API's request bodies, decoded and type-checked by msgspec (fast, with the
path of the field at fault in every error). Two dialects become one request: relayd's own
``POST /v1/messages`` and KumoMTA's ``POST /api/inject/v1`` as it is, so that its users can
switch without changing their code."""

from __future__ import annotations

import base64
from typing import Any, Literal

import msgspec


class Address(msgspec.Struct, forbid_unknown_fields=True):
    email: str
    name: str = ""


class Recipient(msgspec.Struct, forbid_unknown_fields=True):
    """A recipient of a personalised send: a message of its own, with its own data."""

    email: str
    name: str = ""
    substitutions: dict[str, Any] = {}
    metadata: dict[str, Any] = {}


class Attachment(msgspec.Struct, forbid_unknown_fields=True):
    content: str  # base64
    filename: str = ""
    content_type: str = "application/octet-stream"
    content_id: str = ""  # set: an inline part the HTML refers to as cid:...


class TrackingOptions(msgspec.Struct, forbid_unknown_fields=True):
    """What a message's HTML may get of [tracking]: false turns either off for it."""

    opens: bool = True
    clicks: bool = True


class Send(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/messages``: one message to ``to``/``cc``/``bcc``, or one template sent to
    each of ``recipients`` personalised; composed from parts, or ``raw`` RFC 5322 text."""

    sender: Address | str = msgspec.field(name="from")
    envelope_sender: str = ""
    to: list[Address | str] = []
    cc: list[Address | str] = []
    bcc: list[Address | str] = []
    recipients: list[Recipient] = []
    reply_to: Address | str | None = None
    subject: str = ""
    text: str | None = None
    html: str | None = None
    headers: dict[str, str] = {}
    attachments: list[Attachment] = []
    tags: list[str] = []
    metadata: dict[str, Any] = {}
    substitutions: dict[str, Any] = {}
    send_at: str | float | None = None
    raw: str | None = None
    stream: Literal["transactional", "bulk"] | None = None  # None: the key's (Credential.stream)
    tracking: TrackingOptions | None = None  # None: as [tracking] and the key allow


# -- KumoMTA's inject/v1 (https://docs.kumomta.com/reference/http/api_inject_v1/) -----------


class KumoAddress(msgspec.Struct):
    email: str
    name: str | None = None


class KumoRecipient(msgspec.Struct):
    email: str
    name: str | None = None
    substitutions: dict[str, Any] = {}


class KumoAttachment(msgspec.Struct):
    data: str
    content_type: str = "application/octet-stream"
    base64: bool = False
    file_name: str | None = None
    content_id: str | None = None


class KumoContent(msgspec.Struct):
    sender: KumoAddress = msgspec.field(name="from")
    subject: str | None = None
    text_body: str | None = None
    html_body: str | None = None
    reply_to: KumoAddress | None = None
    headers: dict[str, str] = {}
    attachments: list[KumoAttachment] = []


class KumoInject(msgspec.Struct):
    envelope_sender: str
    recipients: list[KumoRecipient]
    content: str | KumoContent
    substitutions: dict[str, Any] = {}
    template_dialect: str = "Jinja"


def from_kumo(req: KumoInject) -> Send:
    """Kumo's request as relayd's: every recipient gets a message of its own (as in Kumo);
    string content is the raw message, templated like the parts."""
    recipients = [Recipient(r.email, r.name or "", r.substitutions) for r in req.recipients]
    content = req.content
    if isinstance(content, str):
        return Send(
            sender=req.envelope_sender,
            envelope_sender=req.envelope_sender,
            recipients=recipients,
            substitutions=req.substitutions,
            raw=content,
        )
    attachments = [
        Attachment(
            a.data if a.base64 else _b64(a.data),
            a.file_name or "",
            a.content_type,
            a.content_id or "",
        )
        for a in content.attachments
    ]
    return Send(
        sender=Address(content.sender.email, content.sender.name or ""),
        envelope_sender=req.envelope_sender,
        recipients=recipients,
        reply_to=Address(content.reply_to.email, content.reply_to.name or "")
        if content.reply_to
        else None,
        subject=content.subject or "",
        text=content.text_body,
        html=content.html_body,
        headers=content.headers,
        attachments=attachments,
        substitutions=req.substitutions,
    )


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- webhook endpoints (the same checks as relayctl webhook, in receipts.endpoints) ---------


class WebhookAdd(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    events: list[str] | str
    batch: int = 1
    concurrency: int = 1
    timeout: float | None = None


class WebhookRotate(msgspec.Struct, forbid_unknown_fields=True):
    overlap: float | None = None  # seconds the old secret still signs (webhooks.rotation_overlap)


class WebhookEnable(msgspec.Struct, forbid_unknown_fields=True):
    from_now: bool = False


# -- the suppression list (the same checks as relayctl suppression, in ingress.suppression) --


class SuppressionIn(msgspec.Struct, forbid_unknown_fields=True):
    email: str
    scope: str | None = None  # default: the key's own (key:NAME)
    reason: str = "manual"
    detail: str = ""


class SuppressionAdd(msgspec.Struct, forbid_unknown_fields=True):
    suppressions: list[SuppressionIn]


class Conversion(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /v1/campaigns/{id}/conversions``: a campaign's contact converted; name the
    contact's address or the message (its queue id), one of them."""

    email: str | None = None
    message_id: str | None = None
