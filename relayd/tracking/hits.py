"""What a tracking link does when it is followed: ``GET {path}/o/TOKEN.gif`` (the open pixel)
answers a 1x1 GIF, ``GET {path}/c/TOKEN`` (a link) a 302 to its target. The signed token is
the credential (no API key); a forged, altered or truncated one counts nothing. Each hit is an
`opened` or `clicked` event, with the message's receipt keys (its metadata: a campaign's
campaign and variant), and counts in the engagement table, in one short write transaction.

Machines are told apart, flagged ``human: false`` with the reason in ``bot``, and not counted
unless [tracking] count_bots: Apple Mail Privacy Protection fetches every image at delivery
(its proxies, by address and User-Agent: "apple_mpp"), mail gateways follow every link before
the reader sees it (by User-Agent: "scanner"; by a HEAD request: "head"; by a click sooner
after delivery than click_window: "fast_click")."""

from __future__ import annotations

import base64
import ipaddress
import sqlite3
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import re2

from relayd.config import Network, Tracking, in_networks, re2_options
from relayd.events.records import Event, Type
from relayd.feedback.tokens import CLICK, OPEN, Tokens
from relayd.model.address import domain_of
from relayd.spool import engagement, store

# The smallest transparent GIF (43 bytes).
GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
# Every load reaches relayd (a cached pixel counts no open), and no proxy keeps a copy.
NO_CACHE = {
    "Cache-Control": "no-cache, no-store, must-revalidate, private, max-age=0",
    "Pragma": "no-cache",
    "Expires": "0",
}
_KINDS = {OPEN: Type.OPEN, CLICK: Type.CLICK}
# What a Location field may carry as it is; anything else (spaces, quotes, non-ASCII, CR, LF)
# is percent-encoded, so that no target can break the header.
_URL_SAFE = "!#$%&'()*+,-./:;=?@[]_~"
MAX_USER_AGENT = 512  # characters of it kept in the event


@dataclass(frozen=True)
class Hit:
    """A tracking link followed, its token checked: what it names and who followed it."""

    kind: Type  # Type.OPEN or Type.CLICK
    queue_id: str
    rcpt: str  # "" for a message tracked as a whole (several recipients)
    url: str  # a click's target; "" for an open
    at: float
    client: str  # the address that asked (behind a trusted proxy: the one it names)
    user_agent: str
    bot: str  # why it is a machine's, or "" (fast_click is decided by ``record``)


class Hits:
    """The routes of one config's [tracking], and the reading of a request to them."""

    def __init__(self, config: Tracking, tokens: Tokens) -> None:
        self.config, self.tokens = config, tokens
        prefix = config.path.rstrip("/")
        self.routes = ((f"{prefix}/o/", OPEN), (f"{prefix}/c/", CLICK)) if config.enabled else ()
        self.apple = _any(config.apple_user_agents, re2_options(True))
        self.scanner = _any(config.scanner_user_agents, re2_options(False))

    def match(self, path: str) -> tuple[bytes, str] | None:
        """(OPEN or CLICK, its token) when ``path`` is a tracking link's; None otherwise."""
        for start, kind in self.routes:
            if path.startswith(start):
                token = path[len(start) :]
                token = token.removesuffix(".gif") if kind == OPEN else token
                return (kind, token) if token and "/" not in token else None
        return None

    def hit(
        self, kind: bytes, token: str, method: str, headers: dict[str, str], peer: str, now: float
    ) -> Hit:
        """The hit a request makes; raises BadToken (nothing to count) for a bad token."""
        queue_id, rcpt, url = self.tokens.tracked(kind, token)
        client = client_of(peer, headers.get("x-forwarded-for", ""), self.config.trusted_proxies)
        agent = headers.get("user-agent", "")[:MAX_USER_AGENT]
        bot = self._bot(kind, method, client, agent)
        return Hit(_KINDS[kind], queue_id, rcpt, url, now, client, agent, bot)

    def _bot(self, kind: bytes, method: str, client: str, agent: str) -> str:
        cfg = self.config
        if kind == OPEN and (
            in_networks(client, cfg.apple_networks) or (self.apple and self.apple.search(agent))
        ):
            return "apple_mpp"
        if self.scanner and self.scanner.search(agent):
            return "scanner"
        if method == "HEAD" and cfg.head_is_bot:
            return "head"
        return ""

    def answer(self, hit: Hit) -> tuple[int, bytes, str, dict[str, str]]:
        """The reply: (status, body, content type, headers)."""
        if hit.kind == Type.OPEN:
            return 200, GIF, "image/gif", NO_CACHE
        location = quote(hit.url, safe=_URL_SAFE)
        return 302, b"", "text/plain", {"Location": location, "Cache-Control": "no-store"}


def record(conn: sqlite3.Connection, hit: Hit, count_bots: bool, click_window: float) -> Event:
    """A hit, in the caller's write transaction: counted in the engagement table (unless a
    bot's and count_bots is off) and its event appended; the event is returned for the caller
    to log once committed. ``unique``: the recipient's first counted open (click) of the
    message."""
    bot = hit.bot
    if not bot and hit.kind == Type.CLICK and click_window > 0:
        delivered = engagement.delivered_at(conn, hit.queue_id, hit.rcpt)
        if delivered is not None and hit.at - delivered < click_window:
            bot = "fast_click"
    counted = not bot or count_bots
    unique = counted and engagement.count(conn, hit.kind, hit.queue_id, hit.rcpt, hit.at) == 1
    data: dict[str, Any] = {"rcpt": hit.rcpt, "domain": domain_of(hit.rcpt)} if hit.rcpt else {}
    if hit.url:
        data["url"] = hit.url
    data.update(
        human=not bot,
        bot=bot or None,
        counted=counted,  # a bot's hit counts where [tracking] count_bots says so
        unique=unique,
        user_agent=hit.user_agent,
        client=hit.client,
        **engagement.receipt(conn, hit.queue_id),
    )
    event = Event(hit.kind, hit.queue_id, hit.at, data)
    store.append_events(conn, [event])
    return event


def client_of(peer: str, forwarded: str, proxies: tuple[Network, ...]) -> str:
    """Who asked: the peer, or behind trusted proxies the last address of X-Forwarded-For
    that is not one of them (each proxy appends the address it was asked from)."""
    if not proxies or not in_networks(peer, proxies):
        return peer
    client = peer
    for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break  # not an address: nothing before it can be believed
        client = hop
        if not in_networks(hop, proxies):
            break
    return client


def _any(patterns: tuple[str, ...], options: re2.Options) -> Any:
    """One RE2 expression matching any of the patterns; None for none."""
    if not patterns:
        return None
    return re2.compile("|".join(f"(?:{p})" for p in patterns), options)
