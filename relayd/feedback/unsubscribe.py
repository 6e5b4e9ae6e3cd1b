"""One-click unsubscribe (RFC 8058): the List-Unsubscribe fields that bulk mail gets at intake,
and what an unsubscribe does when it comes back, by a POST to the link (relayd's HTTP listener)
or by mail to the mailto address (the bounce listener): one function records both."""

from __future__ import annotations

import email
import email.policy
import json
import re
import sqlite3
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from relayd.config import Unsubscribe
from relayd.events.log import log
from relayd.events.records import Event, Type
from relayd.feedback.tokens import Tokens
from relayd.model.address import domain_of
from relayd.model.message import NewMessage
from relayd.spool import store, suppression

# A List-Unsubscribe field of the sender's own, in the lowered header section after a "\n"
# (RFC 5322's obsolete syntax allows blanks before the colon). A literal first: sre's fast
# prefix search, ten times an IGNORECASE pattern's speed.
_FIELD = re.compile(rb"\nlist-unsubscribe[ \t]*:")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,}")  # what Tokens.unsubscribe makes: unpadded base64url
_ASKED = re.compile(rf"^\s*(?:unsubscribe\s+)?({_TOKEN.pattern})\s*$", re.IGNORECASE)
ACCOUNTS = ("key:", "auth:")  # the origins that name a credential's account


class Links:
    """The List-Unsubscribe and List-Unsubscribe-Post fields of the config's streams.

    Added at intake, before signing, so that the DKIM signature covers them. Only a message to
    exactly one recipient gets them: the link names its recipient, and every copy of a message
    carries the same bytes."""

    def __init__(self, config: Unsubscribe, tokens: Tokens) -> None:
        self.url, self.scope = config.url, config.scope
        # folded before the mailto URI: the line stays short, and no URI is broken (RFC 2369)
        mailto = config.mailto
        self.mailto = f",\r\n <mailto:{mailto}?subject=unsubscribe%20" if mailto else ""
        self.streams = frozenset(config.streams) if config.enabled else frozenset()
        self.tokens = tokens

    def add(self, msg: NewMessage, now: float) -> None:
        """The fields at the end of the header section (after the trace fields), unless the
        message has a List-Unsubscribe of its own. A few microseconds: one HMAC, one search of
        the header section, one copy of the text (see the README's measurement)."""
        if msg.stream not in self.streams or len(msg.recipients) != 1:
            return
        text = msg.body
        if text.startswith(b"\r\n"):  # no header field at all
            head = at = 0
        else:
            end = text.find(b"\r\n\r\n")  # no boundary: all header; the fields go first
            head, at = (end + 2, end + 2) if end >= 0 else (len(text), 0)
        if _FIELD.search(b"\n" + text[:head].lower()):
            log.debug("list_unsubscribe_kept", queue_id=msg.queue_id, sender=msg.sender)
            return
        link = self.link(msg.queue_id, msg.recipients[0], self.scope_of(msg), now)
        mailto = f"{self.mailto}{link.removeprefix(self.url)}>" if self.mailto else ""
        fields = (
            f"List-Unsubscribe: <{link}>{mailto}\r\n"
            "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        ).encode()
        view = memoryview(text)
        msg.body = b"".join((view[:at], fields, view[at:]))

    def link(self, queue_id: str, rcpt: str, scope: str, now: float) -> str:
        """The one-click URL of a message's recipient: the List-Unsubscribe field's, and the
        one a campaign's template shows (its ``unsubscribe_url``)."""
        return f"{self.url}{self.tokens.unsubscribe(queue_id, rcpt, scope, now)}"

    def scope_of(self, msg: NewMessage) -> str:
        """The suppression scope an unsubscribe from this message applies to."""
        return self.scope_for(msg.sender, msg.origin)

    def scope_for(self, sender: str, origin: str) -> str:
        if self.scope == "sender_domain" and sender:
            return f"domain:{domain_of(sender)}"
        if self.scope == "key" and origin.startswith(ACCOUNTS):
            return origin
        return suppression.GLOBAL


def token_of_mail(text: bytes) -> str | None:
    """The token an unsubscribe mail carries: in its Subject ("unsubscribe TOKEN", as the
    mailto link writes it; a reply's "Re:" is allowed), else alone or after "unsubscribe" on
    the first non-blank line of its text; None when it has none."""
    msg = email.message_from_bytes(text, _class=EmailMessage, policy=email.policy.default)
    subject = str(msg.get("subject", ""))
    if m := _ASKED.match(re.sub(r"^\s*(?:re|aw|fwd?)\s*:\s*", "", subject, flags=re.I)):
        return m.group(1)
    part = msg.get_body(preferencelist=("plain",))
    if part is None:
        return None
    try:
        content = part.get_content()
    except (LookupError, ValueError):  # an unknown charset, a broken transfer encoding
        return None
    first = next((line for line in str(content).splitlines() if line.strip()), "")
    return m.group(1) if (m := _ASKED.match(first)) else None


@dataclass(frozen=True)
class Original:
    """What the events still know of the message an unsubscribe link came in."""

    sender: str | None
    origin: str | None
    receipt: dict[str, Any]  # its envid, meta and stream, as its events carry them


def original(conn: sqlite3.Connection, queue_id: str) -> Original:
    """From its `accepted` event, while the events table keeps it ([events] retention)."""
    row = conn.execute(
        "SELECT data FROM events WHERE queue_id = ? AND type = ? LIMIT 1",
        (queue_id, Type.RECEPTION.value),
    ).fetchone()
    if row is None:
        return Original(None, None, {})
    data = json.loads(row[0])
    receipt = {k: data[k] for k in ("envid", "meta", "stream") if k in data}
    return Original(data.get("sender"), data.get("origin"), receipt)


def unsubscribed(conn: sqlite3.Connection, rcpt: str, scope: str) -> bool:
    """Whether the address already has a lasting entry in the scope: then an unsubscribe has
    nothing left to do (an unsubscribe, a complaint or an entry made by hand)."""
    row = conn.execute(
        "SELECT 1 FROM suppressions WHERE address = ? AND scope = ? AND expires IS NULL",
        (rcpt.lower(), scope),
    ).fetchone()
    return row is not None


def record(
    conn: sqlite3.Connection, tokens: Tokens, token: str, now: float, max_age: float, method: str
) -> Event | None:
    """An unsubscribe, in the caller's write transaction: a suppression entry in the token's
    scope that never lapses, and an `unsubscribed` event (``method`` "one-click" or "mail"),
    returned for the caller to log once committed. Idempotent: None, and nothing written, when
    the address is already suppressed for good in that scope. Raises BadToken (nothing
    written) for a forged, altered or expired token."""
    queue_id, rcpt, scope = tokens.unsubscribed(token, now, max_age)
    if unsubscribed(conn, rcpt, scope):
        return None
    found = original(conn, queue_id)
    entry = suppression.Entry(
        rcpt.lower(), scope, "unsubscribe", now, detail=f"{method} unsubscribe", queue_id=queue_id
    )
    suppression.add(conn, [entry])
    data: dict[str, Any] = {"rcpt": rcpt, "domain": domain_of(rcpt)}
    if found.sender is not None:
        data.update(sender=found.sender, origin=found.origin)
    data.update(scope=scope, method=method, **found.receipt)
    event = Event(Type.UNSUBSCRIBE, queue_id, now, data)
    store.append_events(conn, [event])
    return event
