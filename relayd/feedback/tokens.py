"""Signed tokens that come back to relayd: the per-message return path of asynchronous bounces
(VERP), the one-click unsubscribe links, and the open pixel and click links of tracking. Each
carries what it names and an HMAC-SHA256 tag (truncated) under the spool's own secret, so none
can be forged or altered; unsubscribe tokens also carry their issue time, so that they can be
refused once too old; a click token carries its target URL, so that no table is needed."""

from __future__ import annotations

import base64
import hmac
import struct

_TAG = 10  # bytes of HMAC-SHA256 kept: 80 bits, beyond any guessing over SMTP or HTTP
RETURN = b"r"
UNSUBSCRIBE = b"u"
LOGIN = b"l"  # a report page's login link (relayctl report --url)
SESSION = b"s"  # the cookie that login sets
OPEN = b"o"
CLICK = b"c"


class BadToken(ValueError):
    """Not a token relayd made, altered, or (unsubscribe) too old."""


class Tokens:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the token secret must have at least 16 bytes")
        # keyed once and copied per tag, without a key set-up each time: tracking makes a
        # token per link of every message
        self._mac = hmac.new(secret, digestmod="sha256")

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
        body = self._body(UNSUBSCRIBE, token, 13, "an unsubscribe token")
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
        body = self._body(kind, token, 12, "a login token")
        if len(body) != 12:
            raise BadToken("not a login token relayd made")
        campaign_id, issued = struct.unpack(">QI", body)
        if not 0 <= now - issued <= max_age:
            raise BadToken("this login has expired: ask relayctl report ID --url for a new one")
        return campaign_id

    # -- tracking: the open pixel and click links (relayd.tracking) ---------------------------

    def track(self, kind: bytes, queue_id: str, rcpt: str, url: str = "") -> str:
        """A URL-safe token of kind OPEN (the pixel) or CLICK (a link, with its target URL)
        naming the message and the recipient: 8 bytes, the address, a newline, the URL."""
        body = bytes.fromhex(queue_id) + f"{rcpt}\n{url}".encode()
        return _b64(body + self._tag(kind, body))

    def tracked(self, kind: bytes, token: str) -> tuple[str, str, str]:
        """(queue id, recipient, URL) of a tracking token of that kind; raises BadToken when
        it is forged, altered or truncated."""
        body = self._body(kind, token, 9, "a tracking token")
        rcpt, newline, url = body[8:].decode().partition("\n")
        if not newline:
            raise BadToken("not a tracking token relayd made")
        return body[:8].hex().upper(), rcpt, url

    def _body(self, kind: bytes, token: str, least: int, what: str) -> bytes:
        """The signed content of a base64url token of ``kind``, of ``least`` bytes or more."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError):
            raise BadToken(f"not {what}") from None
        body, tag = raw[:-_TAG], raw[-_TAG:]
        if len(body) < least or not hmac.compare_digest(tag, self._tag(kind, body)):
            raise BadToken(f"not {what} relayd made")
        return body

    def _tag(self, kind: bytes, body: bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(kind + body)
        return mac.digest()[:_TAG]


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
