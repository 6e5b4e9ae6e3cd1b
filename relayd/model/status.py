"""SMTP reply codes and RFC 3463 enhanced status codes."""

from __future__ import annotations

import re
from dataclasses import dataclass

from relayd.model.message import State

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


def state_of(code: int) -> State:
    """What a reply means for a recipient: 2xx delivered, 5xx bounced, anything else waits."""
    if 200 <= code < 300:
        return State.DELIVERED
    return State.BOUNCED if code >= 500 else State.DEFERRED


def status_of(code: int, reply: str) -> str:
    """The RFC 3463 status of a reply: its own enhanced code, else one derived from the code."""
    m = _ENHANCED.match(reply)
    if m:
        return m.group(0)
    return f"{code // 100}.0.0" if code // 100 in (4, 5) else "5.0.0"


@dataclass(frozen=True)
class Reply:
    """A remote server's (or relayd's own) answer for one recipient."""

    code: int
    text: str

    @property
    def state(self) -> State:
        return state_of(self.code)
