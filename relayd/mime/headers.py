"""The header section of a CRLF message: splitting, reading From, adding trace headers, line
ends. Written once here; ingress, DKIM, DSNs and relayctl all read messages through it."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from email.utils import format_datetime, getaddresses, make_msgid

_FIELD_SPLIT = re.compile(rb"\r\n(?![ \t])")  # header field boundaries, not folds
_LINE_END = re.compile(rb"\r\n|\r|\n")
_LONE_CR = re.compile(rb"\r(?!\n)")
_LONE_LF = re.compile(rb"\n(?<!\r\n)")  # an LF without its CR
_DOT_LINE = re.compile(rb"\r\n\.")


def split(message: bytes) -> tuple[bytes, bytes]:
    """Header section (without the blank line that ends it) and body."""
    if message.startswith(b"\r\n"):
        return b"", message[2:]
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message.removesuffix(b"\r\n"), b""
    return message[:end], message[end + 4 :]


def fields(head: bytes) -> list[bytes]:
    """The header fields of a header section, folds kept."""
    return _FIELD_SPLIT.split(head) if head else []


def values(head_fields: list[bytes], name: bytes) -> list[str]:
    """Unfolded values of the fields called ``name`` (lower case), in order."""
    found = []
    for field in head_fields:
        colon = field.find(b":")
        if colon > 0 and field[:colon].rstrip(b" \t").lower() == name:
            found.append(field[colon + 1 :].replace(b"\r\n", b"").decode("utf-8", "replace"))
    return found


def from_addresses(message: bytes) -> list[str]:
    """The addresses in the From field(s), lower case; [] when there is none or none parses."""
    head_fields = fields(split(message)[0])
    return [a.lower() for _, a in getaddresses(values(head_fields, b"from")) if "@" in a]


def has_bare_newlines(data: bytes | bytearray) -> bool:
    """A CR or LF that is not part of a CRLF pair. Two regex searches, each led by the literal
    search for its one byte: 67 us on 100 KB, where two one-byte counts and the lone-CR search
    took 97, counting the CRLF pairs 120, and one regex with both alternatives 460 (it has no
    literal to search for)."""
    return _LONE_CR.search(data) is not None or _LONE_LF.search(data) is not None


def stuff_dots(data: bytes) -> bytes:
    """Every line after the first that starts with a dot gets a second one (SMTP's DATA, RFC
    5321 4.5.2). The regex does it in a quarter of ``bytes.replace``'s time (6 vs 23 us on a
    20 KB newsletter; that pattern of three bytes takes replace's slow search), and returns
    ``data`` itself, uncopied, when no line starts with a dot."""
    return _DOT_LINE.sub(b"\r\n..", data)


def unstuff_dots(data: bytes) -> bytes:
    """The inverse of stuff_dots, on what a client sent in DATA."""
    return _DOT_LINE.sub(b"\r\n", data)


def longest_line_over(data: bytes | bytearray, limit: int) -> bool:
    """A line longer than ``limit`` in CRLF text (no bare CR or LF). Jumps from each line start
    to the last LF within ``limit`` + 2 bytes: about len/limit finds, no list of lines (a
    25 MB text split into lines is as many objects again)."""
    pos, size = 0, len(data)
    while size - pos > limit:
        end = data.rfind(b"\n", pos, pos + limit + 2)
        if end < 0:
            return True
        pos = end + 1
    return False


def to_crlf(data: bytes) -> bytes:
    """Every line end as CRLF (bare CR and bare LF each count as one). Text without a CR (what
    templates and JSON give) takes one bytes.replace: a sixth of the regex's time on 16 KB."""
    if b"\r" not in data:
        return data.replace(b"\n", b"\r\n")
    return _LINE_END.sub(b"\r\n", data) if has_bare_newlines(data) else data


_date = (0, "")


def date_header() -> str:
    """The current time as RFC 5322 wants it, formatted once per second."""
    global _date
    second = int(time.time())
    if _date[0] != second:
        _date = (second, format_datetime(datetime.fromtimestamp(second, UTC)))
    return _date[1]


def add_headers(
    content: bytes, hostname: str, client: str, helo: str, utf8: bool, queue_id: str
) -> bytes:
    """Prepend Received; add Message-ID and Date when the client left them out."""
    return trace_headers(content, hostname, client, helo, utf8, queue_id) + content


def trace_headers(
    content: bytes | bytearray,
    hostname: str,
    client: str,
    helo: str,
    utf8: bool,
    queue_id: str,
    protocol: str = "",
) -> bytes:
    """The fields a relay puts before the message: Received, and Message-ID and Date when the
    client left them out. Returned apart, so that the text is not copied to prepend them."""
    end = content.find(b"\r\n\r\n")
    head = (b"\r\n" + (content if end < 0 else content[: end + 2])).lower()
    now = date_header()
    extra = [
        f"Received: from {helo or 'unknown'} ([{client}])\r\n\tby {hostname} (relayd) with "
        f"{protocol or ('UTF8SMTP' if utf8 else 'ESMTP')} id {queue_id};\r\n\t{now}\r\n"
    ]
    if b"\r\nmessage-id:" not in head:
        extra.append(f"Message-ID: {make_msgid(domain=hostname)}\r\n")
    if b"\r\ndate:" not in head:
        extra.append(f"Date: {now}\r\n")
    return "".join(extra).encode()
