"""Signed tokens that come back to relayd: the per-message return path of asynchronous bounces
(VERP) and the one-click unsubscribe links. Each carries what it names and an HMAC-SHA256 tag
(truncated) under the spool's own secret, so none can be forged or altered; unsubscribe tokens
also carry their issue time, so that they can be refused once too old."""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct

_TAG = 10  # bytes of HMAC-SHA256 kept: 80 bits, beyond any guessing over SMTP or HTTP
RETURN = b"r"
UNSUBSCRIBE = b"u"
LOGIN = b"l"  # a report page's login link (relayctl report --url)
SESSION = b"s"  # the cookie that login sets


class BadToken(ValueError):
    """Not a token relayd made, altered, or (unsubscribe) too old."""


class Tokens:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the token secret must have at least 16 bytes")
        self._secret = secret

    # -- return paths: bounces+TOKEN@domain -------------------------------------------------

    def return_path(self, queue_id: str, local: str, domain: str) -> str:
        """``local+TOKEN@domain`` for a message: 29 characters of token, so the local part
        stays far below RFC 5321's 64 octets. Lower case: some servers fold the case of local
        parts."""
        raw = bytes.fromhex(queue_id)
        token = _b32(raw + self._tag(RETURN, raw))
        return f"{local}+{token}@{domain}"

    def message_of(self, token: str) -> str:
        """The queue id a return-path token names; raises BadToken."""
        raw = _unb32(token)
        body, tag = raw[:-_TAG], raw[-_TAG:]
        if not body or not hmac.compare_digest(tag, self._tag(RETURN, body)):
            raise BadToken("not a return path relayd made")
        return body.hex().upper()

    # -- unsubscribe links -----------------------------------------------------------------

    def unsubscribe(self, queue_id: str, rcpt: str, scope: str, issued: float) -> str:
        """A URL-safe token naming the message, the recipient and the suppression scope an
        unsubscribe applies to."""
        body = (
            bytes.fromhex(queue_id) + struct.pack(">I", int(issued)) + f"{rcpt}\n{scope}".encode()
        )
        return _b64(body + self._tag(UNSUBSCRIBE, body))

    def unsubscribed(self, token: str, now: float, max_age: float) -> tuple[str, str, str]:
        """(queue id, recipient, scope) of an unsubscribe token; raises BadToken when it is
        forged, altered, or older than ``max_age`` seconds."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError):
            raise BadToken("not an unsubscribe token") from None
        body, tag = raw[:-_TAG], raw[-_TAG:]
        if len(body) < 13 or not hmac.compare_digest(tag, self._tag(UNSUBSCRIBE, body)):
            raise BadToken("not an unsubscribe token relayd made")
        (issued,) = struct.unpack(">I", body[8:12])
        if now - issued > max_age:
            raise BadToken("this unsubscribe link has expired")
        rcpt, _, scope = body[12:].decode().partition("\n")
        return body[:8].hex().upper(), rcpt, scope

    # -- report page logins --------------------------------------------------------------

    def login(self, campaign_id: int, issued: float, kind: bytes = LOGIN) -> str:
        """A URL-safe token that lets its bearer see one campaign's report page: a login
        link's (LOGIN) or the cookie's it is exchanged for (SESSION)."""
        body = struct.pack(">QI", campaign_id, int(issued))
        return _b64(body + self._tag(kind, body))

    def logged_in(self, token: str, now: float, max_age: float, kind: bytes = LOGIN) -> int:
        """The campaign id of a login token of ``kind``; raises BadToken when it is forged,
        altered, of another kind, or older than ``max_age`` seconds."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError):
            raise BadToken("not a login token") from None
        body, tag = raw[:-_TAG], raw[-_TAG:]
        if len(body) != 12 or not hmac.compare_digest(tag, self._tag(kind, body)):
            raise BadToken("not a login token relayd made")
        campaign_id, issued = struct.unpack(">QI", body)
        if not 0 <= now - issued <= max_age:
            raise BadToken("this login has expired: ask relayctl report ID --url for a new one")
        return campaign_id

    def _tag(self, kind: bytes, body: bytes) -> bytes:
        return hmac.new(self._secret, kind + body, hashlib.sha256).digest()[:_TAG]


class ReturnPaths:
    """The return path relayd gives the mail it delivers, and the reading of one that comes
    back to the bounce listener (return_path.domain, return_path.local)."""

    def __init__(self, tokens: Tokens, local: str, domain: str) -> None:
        self.tokens, self.local, self.domain = tokens, local, domain

    def mail_from(self, queue_id: str, sender: str) -> str:
        """A message's MAIL FROM: its own return path; the sender itself when VERP is off,
        and the null sender for DSNs (nothing may answer a bounce)."""
        if not sender or not self.domain:
            return sender
        return self.tokens.return_path(queue_id, self.local, self.domain)

    def queue_id_of(self, address: str) -> str | None:
        """The queue id a return path of ours names; None when the address does not have
        that form (local+TOKEN@domain); raises BadToken when it has, but with a bad token."""
        local, _, domain = address.rpartition("@")
        base, plus, token = local.partition("+")
        if not self.domain or domain.lower().rstrip(".") != self.domain or not plus:
            return None
        if base.lower() != self.local.lower():
            return None
        return self.tokens.message_of(token)


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=").lower()


def _unb32(token: str) -> bytes:
    try:
        return base64.b32decode(token.upper() + "=" * (-len(token) % 8))
    except (ValueError, TypeError):
        raise BadToken("not a return path relayd made") from None


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")
