"""CSV import: the header row names the attributes, one column (``email`` or ``address``) the
contact's address. The file is read as a stream, a batch at a time, so a million rows never
sit in memory; a bad row (invalid address, wrong number of fields, an address seen earlier in
the file, text that is not UTF-8) is reported by its line number and skipped, the good rows
are imported."""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from relayd.contacts import MAX_ATTRIBUTES, Batch, Collector, Invalid, attribute_name

ADDRESS_COLUMNS = ("email", "address")
# A cell that reads as a number is stored as one (so that a segment can compare it: age ge 18);
# one with a leading zero (a postcode, a phone number) stays text, as does everything else.
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]{0,14})(?:\.[0-9]{1,15})?")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape made of undecodable bytes


_DIGITS = frozenset("-0123456789")


def _value(text: str) -> Any:
    if text[0] in _DIGITS and _NUMBER.fullmatch(text):
        return float(text) if "." in text else int(text)
    return text


def header(row: list[str] | None) -> tuple[int, list[str]]:
    """The address column and the attribute names; raises Invalid (line 1) when the header
    cannot be used, and then nothing is imported."""
    if not row:
        raise Invalid(
            "line 1", "a header row naming the columns is needed (email, then attributes)"
        )
    names = [c.strip().lstrip("\ufeff") for c in row]
    lower = [n.lower() for n in names]
    found = [i for i, n in enumerate(lower) if n in ADDRESS_COLUMNS]
    if len(found) != 1:
        raise Invalid("line 1", "exactly one column must be named email (or address)")
    if len(names) - 1 > MAX_ATTRIBUTES:
        raise Invalid("line 1", f"at most {MAX_ATTRIBUTES} attribute columns")
    for i, name in enumerate(names):
        if i != found[0]:
            attribute_name(name, f"line 1, column {i + 1}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise Invalid("line 1", f"column {dupes[0]!r} is named twice")
    return found[0], names


def batches(
    lines: Iterable[str],
    collector: Collector,
    progress: Callable[[Collector], None] | None = None,
) -> Iterator[Batch]:
    """Checked batches of the file's good rows; ``collector`` gathers the bad ones (by line)
    and counts; ``progress`` is called after each batch has been taken (written, when the
    caller writes each before asking for the next), and once at the end."""
    reader = csv.reader(lines, strict=True)
    try:
        col, names = header(next(reader, None))
    except csv.Error as exc:
        raise Invalid("line 1", f"not CSV: {exc}") from None
    width = len(names)
    cells = [(i, n) for i, n in enumerate(names) if i != col]
    last = reader.line_num
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:  # a broken quote: the rest of the file cannot be trusted
            collector.skip(last + 1, "row", f"not CSV: {exc}; the rest of the file is skipped")
            break
        at, last = last + 1, reader.line_num
        if not row:
            continue  # a blank line
        if len(row) != width:
            collector.skip(at, "row", f"{len(row)} fields, the header has {width}")
            continue
        if _NOT_UTF8.search("".join(row)):
            collector.skip(at, "row", "not UTF-8 text")
            continue
        attrs = {n: _value(row[i]) for i, n in cells if row[i] != ""}
        if batch := collector.add(at, row[col], attrs):
            yield batch
            if progress is not None:
                progress(collector)
    if batch := collector.flush():
        yield batch
    if progress is not None:
        progress(collector)
