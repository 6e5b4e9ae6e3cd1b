"""What a campaign asks for, checked whole before anything is stored: its variants (each a
stored template, at a version, or inline texts, with overrides), the A/B test (test group
percentage, criterion, wait), per-campaign data and tracking. Every template is compiled here,
so that a template error is a precise refusal, never a half-sent campaign."""

from __future__ import annotations

import math
import re
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

from relayd.config import MAX_CAMPAIGN_WAIT, parse_duration
from relayd.ingress.api import compose
from relayd.ingress.api.schema import Address, TrackingOptions
from relayd.spool import campaigns as sql
from relayd.spool import contacts, templates
from relayd.templates import TemplateError, compile_template

CRITERIA = ("click", "open", "conversion")
MAX_VARIANTS = 26
MAX_AHEAD = 365 * 86400.0  # send_at at most a year ahead
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class SpecError(Exception):
    """A campaign refused as a whole: the field (a JSON path), what is wrong, and for a
    template error its line and column."""

    def __init__(
        self, field: str, problem: str, line: int | None = None, column: int | None = None
    ) -> None:
        super().__init__(f"{field}: {problem}")
        self.field, self.problem, self.line, self.column = field, problem, line, column


class Variant(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    weight: float = 1.0
    template: str = ""  # a stored template's name; "" = inline (subject and html or text)
    version: int | None = None  # None: its latest, fixed when the campaign is made
    subject: str | None = None  # overrides of the template's parts
    from_name: str | None = None
    html: str | None = None
    text: str | None = None


class CampaignAdd(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/campaigns`` (and ``relayctl campaign add``)."""

    name: str
    sender: Address | str = msgspec.field(name="from")
    list_id: int
    segment_id: int | None = None
    send_at: str | float | None = None  # RFC 3339 or a Unix time; None: now
    variants: list[Variant]
    test_percent: float | None = None  # None: no test, one variant sent to everyone
    criterion: Literal["click", "open", "conversion"] = "click"
    wait: str | float = "4h"
    data: dict[str, Any] = {}
    tracking: TrackingOptions | None = None  # None: as [tracking] and the key allow
    stream: Literal["bulk"] = "bulk"


@dataclass
class Checked:
    """A campaign ready to be stored (sql.create)."""

    owner: str
    name: str
    sender: str  # "Name <address>" or the address, as the From field shows it
    address: str  # the envelope sender
    list_id: int
    segment_id: int | None
    send_at: float
    spec: dict[str, Any]
    phase: str
    winner: str


def check(
    conn: sqlite3.Connection, add: CampaignAdd, owner: str, now: float, min_wait: float
) -> Checked:
    """Everything checked against the spool (its lists, segments and templates, the owner's
    own); raises SpecError naming the field."""
    if not 1 <= len(add.name) <= 200 or _newline(add.name):
        raise SpecError("name", "1 to 200 characters, one line")
    try:
        sender = compose.address_of(add.sender, "from")
    except compose.Invalid as exc:
        raise SpecError(exc.field, exc.problem) from None
    try:
        contacts.get_list(conn, add.list_id, owner)
    except contacts.NotFound as exc:
        raise SpecError("list_id", str(exc)) from None
    if add.segment_id is not None:
        try:
            segment = contacts.get_segment(conn, add.segment_id, owner, count=False)
        except contacts.NotFound as exc:
            raise SpecError("segment_id", str(exc)) from None
        if segment["list_id"] != add.list_id:
            raise SpecError("segment_id", f"segment {add.segment_id} is not of list {add.list_id}")
    if contacts.count_members(conn, add.list_id, add.segment_id) == 0:
        field = "list_id" if add.segment_id is None else "segment_id"
        raise SpecError(field, "has no contacts: nothing to send")
    variants = _variants(conn, add, owner)
    test = add.test_percent
    if test is None and len(variants) != 1:
        raise SpecError("test_percent", "several variants need an A/B test: give test_percent")
    if test is not None:
        if not (math.isfinite(test) and 0 < test <= 100):
            raise SpecError("test_percent", f"must be more than 0 and at most 100, got {test}")
        if len(variants) < 2:
            raise SpecError("variants", "an A/B test needs at least two variants")
    wait = parse_duration(add.wait)
    if wait is None or not (min_wait <= wait <= MAX_CAMPAIGN_WAIT):
        raise SpecError("wait", f"a duration from {min_wait:g}s to 30d, got {add.wait!r}")
    spec = {
        "variants": variants,
        "test_percent": test,
        "criterion": add.criterion,
        "wait": wait,
        "data": add.data,
        "tracking": msgspec.to_builtins(add.tracking or TrackingOptions()),
        "stream": add.stream,
    }
    shown = compose.mailbox(sender)
    phase = "test" if test is not None else "rest"
    winner = "" if test is not None else variants[0]["name"]
    return Checked(
        owner, add.name, shown, sender.email, add.list_id, add.segment_id,
        _send_at(add.send_at, now), spec, phase, winner,
    )  # fmt: skip


def _variants(conn: sqlite3.Connection, add: CampaignAdd, owner: str) -> list[dict[str, Any]]:
    if not 1 <= len(add.variants) <= MAX_VARIANTS:
        raise SpecError("variants", f"from 1 to {MAX_VARIANTS} variants")
    out: list[dict[str, Any]] = []
    for i, v in enumerate(add.variants):
        where = f"variants[{i}]"
        if not _NAME.match(v.name):
            raise SpecError(f"{where}.name", "1 to 32 letters, digits, _ or -")
        if any(o["name"] == v.name for o in out):
            raise SpecError(f"{where}.name", f"variant {v.name!r} given twice")
        if not (math.isfinite(v.weight) and v.weight > 0):
            raise SpecError(f"{where}.weight", f"must be more than 0, got {v.weight}")
        base = {"kind": "html", "subject": "", "from_name": "", "html": "", "text": ""}
        version = None
        defaults: dict[str, Any] = {}
        if v.template:
            found = templates.get(conn, owner, v.template, v.version)
            if found is None:
                at = f" version {v.version}" if v.version is not None else ""
                raise SpecError(f"{where}.template", f"no template {v.template!r}{at}")
            version, defaults = found.version, found.defaults
            base = {k: getattr(found, k) for k in base}
        for part in ("subject", "from_name", "html", "text"):
            given = getattr(v, part)
            if given is not None:
                base[part] = given
        if not base["subject"]:
            raise SpecError(f"{where}.subject", "a subject is needed (or a template with one)")
        if not (base["html"] or base["text"]):
            raise SpecError(f"{where}.html", "html or text is needed (or a template)")
        try:
            compile_template(
                base["kind"], base["subject"], base["from_name"], base["html"], base["text"],
                defaults,
            )  # fmt: skip
        except TemplateError as exc:
            raise SpecError(f"{where}.{exc.field}", exc.problem, exc.line, exc.column) from None
        out.append(
            {"name": v.name, "weight": v.weight, "template": v.template, "version": version,
             "defaults": defaults, **base}
        )  # fmt: skip
    return out


def _send_at(value: str | float | None, now: float) -> float:
    if value is None:
        return now
    try:
        when = compose.instant(value, "send_at")  # the API's own reading of a time
    except compose.Invalid as exc:
        raise SpecError(exc.field, exc.problem) from None
    if when > now + MAX_AHEAD:
        raise SpecError("send_at", "a time within a year")
    return max(when, now)


def _newline(text: str) -> bool:
    return "\r" in text or "\n" in text


def add(
    conn: sqlite3.Connection, given: CampaignAdd, owner: str, now: float, min_wait: float
) -> tuple[dict[str, Any], Any]:
    """Check and store a campaign in the caller's write transaction: (the campaign, its
    `campaign` event to log once committed); raises SpecError, storing nothing."""
    return sql.create(conn, check(conn, given, owner, now, min_wait), now)


def describe(c: dict[str, Any], progress: dict[str, Any] | None = None) -> dict[str, Any]:
    """A campaign as the API and relayctl show it."""
    spec = c["spec"]
    doc = {
        "id": c["id"],
        "name": c["name"],
        "owner": c["owner"],
        "from": c["sender"],
        "list_id": c["list_id"],
        "segment_id": c["segment_id"],
        "state": c["state"],
        "phase": c["phase"],
        "winner": c["winner"] or None,
        "error": c["error"] or None,
        "total": c["total"],
        "variants": [
            {k: v[k] for k in ("name", "weight", "template", "version")} for v in spec["variants"]
        ],
        "test_percent": spec["test_percent"],
        "criterion": spec["criterion"],
        "wait": spec["wait"],
        "tracking": spec["tracking"],
    }
    for key in ("send_at", "created", "started", "tested", "finished"):
        doc[key] = None if c[key] is None else iso(c[key])
    if progress is not None:
        doc["progress"] = progress
    return doc


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
