"""Metadata an application gives a message over SMTP, in header fields that ingress takes out.

Two forms, named in ``[ingress] metadata_headers``: a field name (``X-Relayd-Meta``, the
default; like Mailgun's ``X-Mailgun-Variables``) whose value is a JSON object, and a name ending
in ``*`` (``X-PM-Metadata-*``, Postmark's form) whose fields each give one key (the rest of the
name) and its value as a string. The keys of all of them make one JSON object, which travels
with the message into its events (and so its webhooks) and is not delivered: the fields are
removed from the text unless ``keep_metadata_headers``. Bad metadata refuses the message.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from relayd.mime import headers
from relayd.model.message import META_MAX, STREAMS

# The header field that names a message's stream (see model.message), taken out like metadata.
STREAM_HEADER = "X-Relayd-Stream"


class MetadataError(ValueError):
    """Metadata a client got wrong; ``reply`` is the SMTP reply to DATA that says so."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def extract(
    content: bytes | bytearray, names: Sequence[str], keep: bool
) -> tuple[str, bytes | bytearray]:
    """The metadata of a CRLF message (compact JSON object text, "" for none) and the text to
    spool (the metadata fields taken out unless ``keep``). The text is copied only when it
    has metadata fields to take out."""
    if not names or content.startswith(b"\r\n"):
        return "", content
    end = _head_end(content)
    head = bytes(content[:end])
    lowered = head.lower()
    wanted = [(n[:-1] if n.endswith("*") else n).lower().encode() for n in names]
    if not any(w in lowered for w in wanted):  # the common case: no such field at all
        return "", content
    exact = {n.lower().encode(): n for n in names if not n.endswith("*")}
    prefixes = [(n[:-1].lower().encode(), n) for n in names if n.endswith("*")]
    meta: dict[str, Any] = {}
    kept: list[bytes] = []
    all_fields = headers.fields(head)
    for field in all_fields:
        colon = field.find(b":")
        name = field[:colon].rstrip(b" \t").lower() if colon > 0 else b""
        value = field[colon + 1 :].replace(b"\r\n", b"").strip(b" \t")
        if name in exact:
            _merge(meta, _json_object(value, exact[name]), exact[name])
        elif prefix := next(((p, n) for p, n in prefixes if name.startswith(p)), None):
            key = field[len(prefix[0]) : colon].rstrip(b" \t")
            if not key:
                raise MetadataError(f"550 5.6.0 Bad {prefix[1]} header: no key after the prefix")
            _merge(meta, {_text(key, prefix[1]): _text(value, prefix[1])}, prefix[1])
        else:
            kept.append(field)
            continue
        if keep:
            kept.append(field)
    if len(kept) == len(all_fields):  # none taken out: kept, or only named in other fields
        return _compact(meta), content
    if not kept:  # every field was metadata: the text starts with the blank line's CRLF
        return _compact(meta), bytes(content[end + 2 :])
    return _compact(meta), b"\r\n".join(kept) + content[end:]


def extract_stream(content: bytes | bytearray) -> tuple[str | None, bytes | bytearray]:
    """The stream an ``X-Relayd-Stream`` field names ("bulk" or "transactional", any case;
    None when there is no such field) and the text without that field: it chooses the
    message's lane in relayd and is not delivered. The text is copied only when it has one."""
    if content.startswith(b"\r\n"):
        return None, content
    end = _head_end(content)
    head = bytes(content[:end])
    name = STREAM_HEADER.lower().encode()
    if name not in head.lower():  # the common case: no such field at all
        return None, content
    kept, found = [], []
    for field in headers.fields(head):
        colon = field.find(b":")
        if colon > 0 and field[:colon].rstrip(b" \t").lower() == name:
            found.append(field[colon + 1 :].replace(b"\r\n", b"").strip(b" \t"))
        else:
            kept.append(field)
    if not found:  # named only inside another field
        return None, content
    if len(found) > 1:
        raise MetadataError(f"550 5.6.0 Bad {STREAM_HEADER} header: given twice")
    stream = _text(found[0], STREAM_HEADER).lower()
    if stream not in STREAMS:
        raise MetadataError(
            f"550 5.6.0 Bad {STREAM_HEADER} header: {_text(found[0], STREAM_HEADER)!r}"
            f" is not one of {', '.join(STREAMS)}"
        )
    if not kept:  # the only field: the text starts with the blank line's CRLF
        return stream, bytes(content[end + 2 :])
    return stream, b"\r\n".join(kept) + content[end:]


def _head_end(content: bytes | bytearray) -> int:
    """Where a CRLF message's header section ends (before the CRLF CRLF that closes it)."""
    end = content.find(b"\r\n\r\n")
    if end < 0:
        end = len(content) - 2 if content.endswith(b"\r\n") else len(content)
    return end


def _compact(meta: dict[str, Any]) -> str:
    """The metadata as stored: compact JSON within META_MAX, "" for none."""
    if not meta:
        return ""
    text = json.dumps(meta, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode()) > META_MAX:
        raise MetadataError(f"552 5.3.4 Metadata too large (over {META_MAX} bytes as JSON)")
    return text


def _text(raw: bytes, header: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MetadataError(f"550 5.6.0 Bad {header} header: not UTF-8") from None


def _json_object(raw: bytes, header: str) -> dict[str, Any]:
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise MetadataError(f"550 5.6.0 Bad {header} header: key {key!r} given twice")
            out[key] = value
        return out

    if len(raw) > 4 * META_MAX:  # refused below anyway: do not parse a huge value first
        raise MetadataError(f"552 5.3.4 Metadata too large (over {META_MAX} bytes as JSON)")
    try:
        value = json.loads(_text(raw, header), object_pairs_hook=unique)
    except ValueError as exc:
        if isinstance(exc, MetadataError):
            raise
        raise MetadataError(f"550 5.6.0 Bad {header} header: not JSON") from None
    if not isinstance(value, dict):
        raise MetadataError(f"550 5.6.0 Bad {header} header: not a JSON object")
    return value


def _merge(meta: dict[str, Any], more: dict[str, Any], header: str) -> None:
    for key, value in more.items():
        if key in meta:
            raise MetadataError(f"550 5.6.0 Bad {header} header: key {key!r} given twice")
        meta[key] = value
