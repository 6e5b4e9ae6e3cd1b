"""Contacts for campaigns: the checks every way in shares (a CSV file, the API's JSON), and the
batches an import is written in (the SQL is in relayd.spool.contacts)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import msgspec

from relayd.ingress.smtp import valid_address

_encode = msgspec.json.Encoder().encode
BATCH = 10_000  # rows per write transaction: ~0.1 s of the write lock (benchmarks/RESULTS.md)
MAX_REJECTED = 1000  # bad rows reported one by one; the rest are counted
MAX_ATTRIBUTES = 100  # per contact
MAX_ATTRS_SIZE = 16 * 1024  # a contact's attributes, as JSON
# An attribute name: what a CSV header or the API may call one (and a JSON path can quote).
_NAME = re.compile(r"\w[\w .-]{0,63}")


class Invalid(ValueError):
    """Input that cannot be taken: ``field`` (a path into the request) and what is wrong."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


def address(text: str) -> str:
    """A contact's address as stored (lower case, as the suppression list keeps it)."""
    text = text.strip()
    if "," in text or "\n" in text or "\r" in text or not valid_address(text, True):
        raise Invalid("email", f"not an address: {text[:100]!r}")
    return text.lower()


def attribute_name(name: str, where: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise Invalid(
            where,
            f"{name!r} is not an attribute name (a letter, digit or _ first, then up to 63 of"
            " those, space, '.' or '-')",
        )
    return name


def attributes(attrs: Any, where: str) -> dict[str, Any]:
    """Checked attributes from the API: a JSON object of named values (null: remove it, as
    in a JSON merge patch)."""
    if not isinstance(attrs, dict):
        raise Invalid(where, "must be an object")
    if len(attrs) > MAX_ATTRIBUTES:
        raise Invalid(where, f"at most {MAX_ATTRIBUTES} attributes")
    for name in attrs:
        attribute_name(name, f"{where}.{name}" if isinstance(name, str) else where)
    if len(_encode(attrs)) > MAX_ATTRS_SIZE:
        raise Invalid(where, f"at most {MAX_ATTRS_SIZE} bytes as JSON")
    return attrs


@dataclass
class Batch:
    """Checked rows for one transaction: (address, attributes as JSON), and the attribute
    names they have (recorded on the list, for segment filters)."""

    rows: list[tuple[str, str]] = field(default_factory=list)
    names: set[str] = field(default_factory=set)


class Collector:
    """Checks rows as they come and gathers the good ones into batches; a bad row (an invalid
    address, a duplicate of an earlier row) is reported by where it was (``line`` in a file,
    ``index`` in a JSON array) and skipped, so the rest still import."""

    def __init__(self, where: str = "line", size: int = BATCH) -> None:
        self.where, self.size = where, size
        self.seen: dict[str, int] = {}  # address -> where it first came
        self.batch = Batch()
        self.rejected: list[dict[str, Any]] = []
        self.rejected_count = 0
        self.read = 0  # rows seen, good or bad

    def add(self, at: int, raw: str, attrs: dict[str, Any]) -> Batch | None:
        """Take one row; returns a full batch to write, or None."""
        self.read += 1
        try:
            addr = address(raw)
        except Invalid as exc:
            self._note(at, exc.field, exc.problem)
            return None
        first = self.seen.setdefault(addr, at)
        if first != at:
            self._note(at, "email", f"duplicate of {addr} ({self.where} {first})")
            return None
        self.batch.rows.append((addr, _encode(attrs).decode()))
        self.batch.names.update(attrs)
        return self.flush() if len(self.batch.rows) >= self.size else None

    def skip(self, at: int, field: str, problem: str) -> None:
        """A row found bad before it came to ``add`` (its shape, its encoding)."""
        self.read += 1
        self._note(at, field, problem)

    def _note(self, at: int, field: str, problem: str) -> None:
        self.rejected_count += 1
        if len(self.rejected) < MAX_REJECTED:
            self.rejected.append({self.where: at, "field": field, "problem": problem})

    def flush(self) -> Batch | None:
        """The rows gathered so far (None when there are none)."""
        batch, self.batch = self.batch, Batch()
        return batch if batch.rows else None


def from_items(items: Any, collector: Collector) -> list[Batch]:
    """The API's JSON body: an array of {"email", "attributes"}; bad items are rejected by
    index, the good ones batched."""
    if not isinstance(items, list):
        raise Invalid("body", "a JSON array of {email, attributes}, or text/csv")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("email"), str):
            collector.skip(i, "email", "each item is an object with an email string")
            continue
        unknown = sorted(set(item) - {"email", "attributes"})
        try:
            if unknown:
                raise Invalid(unknown[0], "unknown field")
            attrs = attributes(item.get("attributes", {}), "attributes")
            attrs = {k: v for k, v in attrs.items() if v is not None}
        except Invalid as exc:
            collector.skip(i, exc.field, exc.problem)
            continue
        if batch := collector.add(i, item["email"], attrs):
            out.append(batch)
    if batch := collector.flush():
        out.append(batch)
    return out
