"""A domain check's result, apart from the checks (and their libraries): the items, the
report, its JSON document (the API's answer, relayctl's --json) and relayctl's text made from
that document. Light to import, so relayctl's other commands do not load checkdmarc."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?$")


class Status(StrEnum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    ERROR = "error"  # not checked: a lookup failed


_RANK = {Status.PASS: 0, Status.WARN: 1, Status.FAIL: 2, Status.ERROR: 3}


def worst(statuses: list[Status]) -> Status:
    return max(statuses, key=_RANK.__getitem__, default=Status.PASS)


@dataclass(frozen=True)
class Item:
    check: str  # sources, spf, dkim, dmarc, alignment, ptr, mta-sts, tls-rpt, bulk-sender
    subject: str  # what was looked at: an address, a DNS name, a checklist line
    status: Status
    detail: str
    fix: str = ""  # the DNS record to publish, or the command or config change

    def as_json(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "subject": self.subject,
            "status": self.status.value,
            "detail": self.detail,
            "fix": self.fix or None,
        }


@dataclass(frozen=True)
class Report:
    domain: str
    return_path_domain: str
    items: tuple[Item, ...]

    @property
    def status(self) -> Status:
        return worst([i.status for i in self.items])

    @property
    def failed(self) -> bool:
        """Whether anything fails or could not be checked: relayctl then exits 1."""
        return self.status in (Status.FAIL, Status.ERROR)

    def as_json(self) -> dict[str, Any]:
        """The API's answer and relayctl's --json output (the text output is made from it)."""
        return {
            "domain": self.domain,
            "return_path_domain": self.return_path_domain,
            "status": self.status.value,
            "counts": {s.value: sum(i.status is s for i in self.items) for s in Status},
            "items": [i.as_json() for i in self.items],
        }


def domain_name(text: str) -> str:
    """The domain as DNS knows it (lower case, A-labels, no final dot); ValueError naming it
    otherwise. relayctl's argument and the API's path are read with it alike."""
    try:
        name = text.strip().rstrip(".").lower().encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"not a domain name: {text!r}") from None
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(map(_LABEL.match, labels)):
        raise ValueError(f"not a domain name: {text!r}")
    return name


def render(doc: dict[str, Any]) -> str:
    """relayctl's text output, from the JSON document (so that the two cannot drift)."""
    counts = ", ".join(f"{n} {s}" for s, n in doc["counts"].items() if n)
    lines = [
        f"{doc['domain']}: {doc['status']} ({counts}); return path {doc['return_path_domain']}",
        "",
    ]
    width = max(len(i["check"]) for i in doc["items"]) + 2
    pad = " " * (width + 6)
    for item in doc["items"]:
        lines.append(f"{item['check']:<{width}}{item['status'].upper():<6}{item['subject']}")
        lines.append(pad + item["detail"])
        if item["fix"]:
            lines.append(pad + "fix: " + item["fix"])
    return "\n".join(lines)
