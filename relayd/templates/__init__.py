"""Templates for campaigns (and the sending API's substitutions): one Jinja2 immutable
sandbox (engine.ENV), MJML and CSS work done once per template version (design), and per
contact only Jinja. ``compile_template`` finds every error it can, with line and column,
before anything is sent; ``Compiled.render`` is what a campaign runs for each contact."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import jinja2

from relayd.templates import engine
from relayd.templates.engine import ENV, NAMES, MissingValue, TemplateError, template

__all__ = [
    "ENV",
    "NAMES",
    "SAMPLE",
    "Compiled",
    "MissingValue",
    "Rendered",
    "TemplateError",
    "compile_template",
    "contact",
    "template",
]
KINDS = ("html", "mjml")
# What a template is tried with before it is accepted: a contact with no attributes.
SAMPLE: dict[str, Any] = {
    "contact": {"email": "sample@example.com"},
    "data": {},
    "unsubscribe_url": "https://relayd.invalid/unsubscribe",
}


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    from_name: str
    text: str
    html: str


def contact(email: str, attributes: dict[str, Any]) -> dict[str, Any]:
    """The ``contact`` a template sees: its attributes and its address as ``email``."""
    return {**attributes, "email": email}


class Compiled:
    """A template version ready to render: each part a compiled Jinja template, or its text
    when it has no Jinja at all (nothing to do per contact)."""

    def __init__(
        self,
        parts: dict[str, jinja2.Template | str],
        sources: dict[str, tuple[str, str]],
        defaults: dict[str, Any],
    ) -> None:
        self.parts, self.sources, self.defaults = parts, sources, defaults

    def render(self, context: dict[str, Any]) -> Rendered:
        """The four parts for one contact. ``context`` holds ``contact`` (its attributes and
        email), ``data`` and ``unsubscribe_url``; contact and data fall back to the template's
        defaults. Raises TemplateError (an attribute of a contact the template cannot use,
        as ``{{ contact.n + 1 }}`` with n a word)."""
        d = self.defaults
        given = context.get("contact") or {}
        data = context.get("data") or {}
        names = {**context, "contact": {**d, **given}, "data": {**d, **data}} if d else context
        out = []
        for field, part in self.parts.items():
            if isinstance(part, str):
                out.append(part)
                continue
            try:
                out.append(part.render(names))
            except Exception as exc:
                raise self._failed(field, exc, names) from None
        subject, from_name, text, html = out
        return Rendered(_one_line(subject), _one_line(from_name), text, html)

    def _failed(self, field: str, exc: Exception, names: dict[str, Any]) -> TemplateError:
        """The error at its line in the source as written (the MJML, not the HTML made of
        it): the source is rendered again with the same names to find it."""
        name, source = self.sources[field]
        try:
            template(source, name).render(names)
        except Exception as again:
            return engine.failed(again, name, source)
        return engine.failed(exc, name, source)


def _one_line(value: str) -> str:
    """A header's value: a line break from a contact's data would inject header fields."""
    if "\n" in value or "\r" in value:
        return " ".join(value.split())
    return value


def compile_template(
    kind: str, subject: str, from_name: str, html: str, text: str, defaults: dict[str, Any]
) -> Compiled:
    """A template version compiled, or TemplateError(field, line, column, problem): syntax,
    unknown names, filters and tests, unsafe attributes, MJML the renderer refuses, and any
    error of a trial render with a sample contact (SAMPLE, with the defaults)."""
    from relayd.templates import design  # MJML, css-inline, html2text: 5 MB, loaded when used

    if kind not in KINDS:
        raise TemplateError("kind", 1, 1, f"kind is html or mjml, not {kind!r}")
    html_field = "mjml" if kind == "mjml" else "html"
    written = {"subject": subject, "from_name": from_name, html_field: html, "text": text}
    known = set(NAMES)
    checked = {f: engine.check(source, f, known) for f, source in written.items()}
    sample = Compiled(
        dict(zip(("subject", "from_name", "html", "text"), checked.values(), strict=True)),
        {f: (f, s) for f, s in written.items()},
        defaults,
    )
    _try(sample)
    page = design.html(kind, html) if html else ""
    parts_source = {
        "subject": subject,
        "from_name": from_name,
        "text": text or (design.text(page) if page else ""),
        "html": page,
    }
    parts: dict[str, jinja2.Template | str] = {}
    for field, source in parts_source.items():
        if engine.has_jinja(source):
            parts[field] = template(source, field)
        else:
            parts[field] = source
    sources = {
        "subject": ("subject", subject),
        "from_name": ("from_name", from_name),
        "text": ("text", text) if text else (html_field, html),
        "html": (html_field, html),
    }
    compiled = Compiled(parts, sources, defaults)
    _try(compiled)
    return compiled


def _try(compiled: Compiled) -> None:
    """Render with the sample contact: an error there is the template's (a missing attribute
    is not: the sample has none, real contacts do)."""
    with contextlib.suppress(engine.MissingValue):
        compiled.render(SAMPLE)
