"""The campaign templates' engine as the runner uses it: compile once (errors with field, line
and column before anything is stored), render per contact. Jinja2's immutable sandbox; a
stand-in with the interface of relayd.templates, which replaces it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

_PLAIN = ImmutableSandboxedEnvironment(autoescape=False, keep_trailing_newline=True)
_HTML = ImmutableSandboxedEnvironment(autoescape=True, keep_trailing_newline=True)


class TemplateError(Exception):
    """A template that does not compile: which field, where, and what is wrong."""

    def __init__(self, field: str, line: int, column: int, problem: str) -> None:
        super().__init__(f"{field}: line {line}, column {column}: {problem}")
        self.field, self.line, self.column, self.problem = field, line, column, problem


@dataclass(frozen=True)
class Rendered:
    subject: str
    from_name: str
    text: str | None
    html: str | None


@dataclass(frozen=True)
class Compiled:
    parts: dict[str, jinja2.Template]
    defaults: dict[str, Any]

    def render(self, context: dict[str, Any]) -> Rendered:
        """One contact's message; raises what the template raises (a runtime error)."""
        ctx = {**self.defaults, **context}
        out = {k: t.render(ctx) for k, t in self.parts.items()}
        return Rendered(out["subject"], out.get("from_name", ""), out.get("text"), out.get("html"))


def compile_template(
    kind: str, subject: str, from_name: str, html: str, text: str, defaults: dict[str, Any]
) -> Compiled:
    sources = {"subject": subject, "from_name": from_name, "html": html, "text": text}
    parts = {}
    for field, source in sources.items():
        if not source and field in ("html", "text"):
            continue
        env = _HTML if field == "html" else _PLAIN
        try:
            parts[field] = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(field, exc.lineno, 1, exc.message or "syntax error") from None
    return Compiled(parts, defaults)
