"""The DSN extension's parameters (RFC 3461), parsed and checked as a client sent them.

MAIL takes ``RET=FULL|HDRS`` and ``ENVID=xtext``; RCPT takes ``NOTIFY=NEVER`` or a comma list
of ``SUCCESS``, ``FAILURE`` and ``DELAY``, and ``ORCPT=addr-type;xtext``. Every problem is a
``ParamError`` whose reply names the parameter (``501 5.5.4``, RFC 3463 "invalid command
arguments"), so that a client learns what to fix and nothing of the transaction is kept.
Values are taken in the case the client sent them: ENVID and ORCPT come back in DSNs and events
exactly, and aiosmtpd upper-cases the parameters it hands on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from relayd.model.message import Notify

ENVID_MAX = 100  # RFC 3461 4.4: characters of the (encoded) ENVID value
ORCPT_MAX = 500  # RFC 3461 4.2: characters of the (encoded) ORCPT value
MAIL_KEYS = ("RET", "ENVID")
RCPT_KEYS = ("NOTIFY", "ORCPT")

# RFC 3461 4: xchar is "!" to "~" but "+" and "="; hexchar is "+" and two hex digits (upper
# case in the RFC; lower case is taken too, as Postfix does: it is not ambiguous)
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})+")
_HEXCHAR = re.compile(r"\+([0-9A-Fa-f]{2})")
_PRINTABLE = re.compile(r"[\x20-\x7e]+")  # "printable (graphic and white space) US-ASCII"
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")  # RFC 5322 atext, for addr-type
_NOTIFY = {word: flag for word, flag in Notify.NAMES.items() if flag != Notify.NEVER}


class ParamError(ValueError):
    """A DSN parameter the client got wrong; ``reply`` is the SMTP reply that says so."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def xtext_decode(value: str, name: str) -> str:
    """RFC 3461 xtext to its text; printable US-ASCII only (a decoded CR or LF would let the
    client write header fields into the DSN)."""
    if not _XTEXT.fullmatch(value):
        raise ParamError(f"501 5.5.4 Malformed {name} parameter: not xtext (RFC 3461 4)")
    text = _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), value)
    if not _PRINTABLE.fullmatch(text):
        raise ParamError(f"501 5.5.4 Malformed {name} parameter: not printable US-ASCII")
    return text


def _single(given: Mapping[str, Sequence[str]], name: str) -> str | None:
    """The one value of parameter ``name`` (None when not given)."""
    values = given.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise ParamError(f"501 5.5.4 Duplicate {name} parameter")
    if not values[0]:
        raise ParamError(f"501 5.5.4 Malformed {name} parameter: a value is required")
    return values[0]


def mail(given: Mapping[str, Sequence[str]]) -> tuple[str, str | None]:
    """RET ("FULL", "HDRS" or "" when not given) and the decoded ENVID (or None) of a MAIL
    command, from its parameters as sent (name upper case -> values)."""
    ret = _single(given, "RET")
    if ret is not None:
        ret = ret.upper()
        if ret not in ("FULL", "HDRS"):
            raise ParamError("501 5.5.4 Malformed RET parameter: must be FULL or HDRS")
    envid = _single(given, "ENVID")
    if envid is not None:
        if len(envid) > ENVID_MAX:
            raise ParamError(f"501 5.5.4 ENVID parameter too long (over {ENVID_MAX} characters)")
        envid = xtext_decode(envid, "ENVID")
    return ret or "", envid


def rcpt(given: Mapping[str, Sequence[str]]) -> tuple[int, str | None]:
    """NOTIFY as Notify flags (0 when not given) and ORCPT as "addr-type;address" (decoded,
    the type in lower case; None when not given) of a RCPT command."""
    flags = 0
    notify = _single(given, "NOTIFY")
    if notify is not None:
        words = notify.upper().split(",")
        if words == ["NEVER"]:
            flags = Notify.NEVER
        else:
            for word in words:
                if word == "NEVER":
                    raise ParamError(
                        "501 5.5.4 Malformed NOTIFY parameter: NEVER cannot be combined"
                    )
                flag = _NOTIFY.get(word)
                if flag is None:
                    raise ParamError(
                        "501 5.5.4 Malformed NOTIFY parameter: NEVER, or a list of SUCCESS,"
                        " FAILURE and DELAY"
                    )
                if flags & flag:
                    raise ParamError(f"501 5.5.4 Malformed NOTIFY parameter: {word} twice")
                flags |= flag
    orcpt = _single(given, "ORCPT")
    if orcpt is not None:
        if len(orcpt) > ORCPT_MAX:
            raise ParamError(f"501 5.5.4 ORCPT parameter too long (over {ORCPT_MAX} characters)")
        kind, semi, address = orcpt.partition(";")
        if not semi or not _ATOM.fullmatch(kind):
            raise ParamError("501 5.5.4 Malformed ORCPT parameter: must be addr-type;xtext")
        orcpt = f"{kind.lower()};{xtext_decode(address, 'ORCPT')}"
    return flags, orcpt


def given(raw: str, names: Sequence[str]) -> dict[str, list[str]]:
    """The values of the parameters ``names`` in a command's parameter text as sent."""
    found: dict[str, list[str]] = {}
    for token in raw.split():
        name, _, value = token.partition("=")
        name = name.upper()
        if name in names:
            found.setdefault(name, []).append(value)
    return found
