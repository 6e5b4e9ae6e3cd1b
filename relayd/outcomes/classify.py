"""Bounce classes: what a failed attempt's reply means, as one of a few names
(``relayd.config.BOUNCE_CLASSES``, KumoMTA's set) that a sender can act on.

The rules come from the bounce classes files (``[bounces]``, checked when the config is loaded
and compiled here, at start-up and on each reload); the first rule whose patterns all match
gives the class. A reply no rule matches is
classed by its RFC 3463 enhanced status code (``5.1.1`` invalid recipient, ``5.2.2`` quota,
``5.7.x`` policy, ...), else it is ``uncategorized``. Pure and without I/O: it runs for each
recipient of each failed attempt, so what can be worked out once per (code, enhanced code) is:
the rules that can match such a reply, and its fallback class.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import re2

from relayd.config import Bounces, re2_options

# The enhanced code a reply text starts with, as relayd keeps it (the client strips "550-").
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?=\s|$)")

# RFC 3463 (and the IANA registry's later codes): subject.detail, then subject alone.
_BY_DETAIL = {
    "1.1": "invalid_recipient",  # bad destination mailbox address
    "1.3": "invalid_recipient",  # bad destination mailbox address syntax
    "1.4": "invalid_recipient",  # destination mailbox address ambiguous
    "1.2": "bad_domain",  # bad destination system address
    "1.10": "bad_domain",  # recipient address has null MX (RFC 7505)
    "1.6": "inactive_mailbox",  # destination mailbox has moved
    "1.7": "invalid_sender",  # bad sender's mailbox address syntax
    "1.8": "invalid_sender",  # bad sender's system address
    "2.1": "inactive_mailbox",  # mailbox disabled, not accepting messages
    "2.2": "quota",  # mailbox full
    "2.3": "too_large",  # message length exceeds administrative limit
    "3.1": "quota",  # mail system full
    "3.4": "too_large",  # message too big for system
    "4.1": "connection",  # no answer from host
    "4.2": "connection",  # bad connection
    "4.3": "dns_failure",  # directory server failure
    "4.4": "routing",  # unable to route
    "4.5": "transient",  # mail system congestion
    "4.6": "routing",  # routing loop detected
    "4.7": "expired",  # delivery time expired
    "7.13": "inactive_mailbox",  # user account disabled
    "7.17": "inactive_mailbox",  # mailbox owner has changed (RFC 7293)
    "7.18": "bad_domain",  # domain owner has changed (RFC 7293)
    **{f"7.{n}": "auth" for n in range(20, 27)},  # DKIM, SPF, reverse DNS (RFC 7372)
    "7.27": "invalid_sender",  # sender address has null MX (RFC 7505)
    "7.28": "reputation",  # mail flood detected
    "7.29": "auth",  # ARC validation failure
}
_BY_SUBJECT = {"3": "transient", "4": "routing", "5": "protocol", "6": "protocol", "7": "policy"}
_CACHE_MAX = 4096  # (code, enhanced code) pairs remembered; a flood of odd codes resets it

# The text patterns of the rules a (code, enhanced code) pair passes, by their index in the
# set, with each one's class; and the class when none of them matches.
Candidates = tuple[dict[int, str], str]


_CODES, _TEXTS = re2_options(True), re2_options(False)


def fallback(enhanced: str) -> str:
    """The class of an enhanced status code alone ("" when the reply had none)."""
    _, _, rest = enhanced.partition(".")
    return _BY_DETAIL.get(rest) or _BY_SUBJECT.get(rest.partition(".")[0], "uncategorized")


@dataclass(frozen=True)
class _Rule:
    cls: str
    code: Any  # an re2 pattern, or None
    enhanced: Any
    slot: int  # the index of its text pattern in the set, -1 without


class Classifier:
    """The compiled ``[bounces]`` rules and the classes that mean "do not mail again". The text
    patterns are one RE2 set: a reply's text is read once, whatever the number of rules."""

    def __init__(self, bounces: Bounces) -> None:
        self.hard = bounces.suppress_classes
        self._texts = re2.Set.SearchSet(_TEXTS)
        self._rules = [
            _Rule(
                rule.cls,
                None if rule.code is None else re2.compile(rule.code, _CODES),
                None if rule.enhanced is None else re2.compile(rule.enhanced, _CODES),
                -1 if rule.text is None else self._texts.Add(rule.text),
            )
            for rule in bounces.rules
        ]
        self._texts.Compile()
        self._candidates: dict[tuple[int, str], Candidates] = {}

    def classify(self, code: int, text: str) -> str:
        """The class of a reply: ``code`` and its text as relayd keeps it (the enhanced code
        first, the lines of a multi-line reply joined by newlines)."""
        m = _ENHANCED.match(text)
        enhanced = m.group(0) if m else ""
        texts, last = self._candidates.get((code, enhanced)) or self._candidates_for(code, enhanced)
        if texts:
            plain = text[m.end() :].lstrip() if m else text
            if "\n" in plain:  # each line after the first repeats the enhanced code
                prefix = f"{enhanced} " if enhanced else ""
                plain = " ".join(line.removeprefix(prefix).strip() for line in plain.split("\n"))
            hits = [i for i in self._texts.Match(plain) or () if i in texts]
            if hits:
                return texts[min(hits)]
        return last

    def is_hard(self, cls: str) -> bool:
        """Whether a bounce of this class means the address should be suppressed
        (``bounces.suppress_classes``)."""
        return cls in self.hard

    def _candidates_for(self, code: int, enhanced: str) -> Candidates:
        """The rules whose code and enhanced code patterns pass, up to the first of them
        without a text pattern (whose class is then the answer when no text matches)."""
        number = str(code)
        texts: dict[int, str] = {}
        last = fallback(enhanced)
        for rule in self._rules:
            if rule.code is not None and not rule.code.fullmatch(number):
                continue
            if rule.enhanced is not None and not (enhanced and rule.enhanced.fullmatch(enhanced)):
                continue
            if rule.slot < 0:
                last = rule.cls
                break
            texts[rule.slot] = rule.cls
        if len(self._candidates) >= _CACHE_MAX:
            self._candidates.clear()
        found = self._candidates[(code, enhanced)] = (texts, last)
        return found
