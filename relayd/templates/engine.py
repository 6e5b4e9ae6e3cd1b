"""relayd's one Jinja2 environment (the immutable sandbox: no template can read Python's
internals or change the data it is given), and the checks that find a template's errors with
their line and column before anything is sent."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.meta import find_undeclared_variables
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

# The names a campaign's templates see (README, "Templates"): the contact (its attributes and
# email), the campaign's data, and the contact's own unsubscribe link.
NAMES = ("contact", "data", "unsubscribe_url")
HTML_FIELDS = frozenset({"html", "mjml"})  # autoescaped; subject, from name and text are not
# The methods that change a list, dict, set or deque (the immutable sandbox's own list): a call
# of one is refused when the template is compiled, not only when a contact's data reaches it.
_MUTATORS = frozenset(
    (
        *("add", "append", "appendleft", "clear", "difference_update", "discard", "extend"),
        *("extendleft", "insert", "intersection_update", "pop", "popitem", "popleft"),
        *("remove", "reverse", "rotate", "setdefault", "sort", "symmetric_difference_update"),
        "update",
    )
)
_CONSTRUCT = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.DOTALL)


class TemplateError(Exception):
    """A template refused: the field at fault (subject, from_name, html, mjml, text), where
    in it (1-based line and column), and the problem."""

    def __init__(self, field: str, line: int, column: int, problem: str) -> None:
        super().__init__(f"{field}:{line}:{column}: {problem}")
        self.field, self.line, self.column, self.problem = field, line, column, problem


class MissingValue(TemplateError):
    """A render failed on a value the contact lacks (``contact.name.upper()`` for a contact
    with no name): an error of that contact, not of the template."""


class Missing(jinja2.ChainableUndefined):
    """A missing name or attribute: renders empty, at any depth (``contact.a.b``), and gives
    way to ``| default(...)``."""

    __slots__ = ()


class _Sandbox(ImmutableSandboxedEnvironment):
    def getattr(self, obj: Any, attribute: str) -> Any:
        """``contact.city`` is the dict's item first (Jinja tries the attribute first, and
        pays for an AttributeError on every name): an item is data, always safe to read, and
        an attribute named ``items`` or ``update`` is the contact's, not the dict's method."""
        if type(obj) is dict:
            try:
                return obj[attribute]
            except KeyError:
                pass
        return super().getattr(obj, attribute)

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        """An unsafe attribute (``__class__``, ``list.append``) is an error at once, never an
        empty value that a missing attribute would be."""
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


ENV = _Sandbox(
    autoescape=lambda name: name in HTML_FIELDS,
    keep_trailing_newline=True,
    undefined=Missing,
    auto_reload=False,
)


def template(source: str, field: str) -> jinja2.Template:
    """``source`` compiled in the environment, autoescaped when ``field`` is an HTML part;
    raises jinja2.TemplateSyntaxError (with its line) for a syntax error or an unknown filter
    or test."""
    code = ENV.compile(source, name=field, filename=field)
    # A plain dict of the globals, not Jinja's ChainMap over them: each render copies them,
    # and a ChainMap's iteration is most of a small render's time. Nothing changes them.
    return ENV.template_class.from_code(ENV, code, dict(ENV.globals), None)


def check(source: str, field: str, known: set[str]) -> jinja2.Template:
    """The template of a field, after the checks that need no data: syntax, filters and tests
    that exist, names among ``known``, no private attribute (the sandbox refuses them at render
    time, but a branch not taken at preview must fail now too)."""
    try:
        tree = ENV.parse(source, name=field)
        compiled = template(source, field)
    except jinja2.TemplateSyntaxError as exc:
        line = exc.lineno or 1
        column = _column(source, line, field, exc)
        raise TemplateError(field, line, column, exc.message or "") from None
    for name in sorted(find_undeclared_variables(tree) - known):
        line = next((n.lineno for n in tree.find_all(nodes.Name) if n.name == name), 1)
        problem = f"unknown name {name!r}: a template sees {', '.join(sorted(known))}"
        raise TemplateError(field, line, _word_column(source, line, name), problem)
    for node, attr, problem in _unsafe(tree):
        raise TemplateError(field, node.lineno, _word_column(source, node.lineno, attr), problem)
    for node in tree.find_all((nodes.Filter, nodes.Test)):
        table = ENV.filters if isinstance(node, nodes.Filter) else ENV.tests
        if node.name not in table:  # in a branch Jinja defers the check to render time
            kind = "filter" if isinstance(node, nodes.Filter) else "test"
            problem = f"no {kind} named {node.name!r}"
            raise TemplateError(
                field, node.lineno, _word_column(source, node.lineno, node.name), problem
            )
    return compiled


def _unsafe(tree: nodes.Template) -> Iterator[tuple[nodes.Node, str, str]]:
    """Calls of the methods that would change the data, and private attributes."""
    for call in tree.find_all(nodes.Call):
        if isinstance(call.node, nodes.Getattr) and call.node.attr in _MUTATORS:
            attr = call.node.attr
            yield call.node, attr, f"{attr}() would change the data: templates may not"
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        if isinstance(node, nodes.Getattr):
            attr = node.attr
        elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            attr = node.arg.value
        else:
            continue
        if attr.startswith("_"):
            yield node, attr, f"access to attribute {attr!r} is unsafe"


def failed(exc: Exception, field: str, source: str) -> TemplateError:
    """A render's exception as a TemplateError at the template line it happened on (Jinja
    rewrites the traceback so that the template's frames carry its lines)."""
    line = 1
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == field:
            line = tb.tb_lineno
        tb = tb.tb_next
    problem = str(exc) if isinstance(exc, SecurityError) else f"{type(exc).__name__}: {exc}"
    kind = MissingValue if isinstance(exc, jinja2.UndefinedError) else TemplateError
    return kind(field, line, _construct_column(source, line), problem)


def has_jinja(source: str) -> bool:
    return _CONSTRUCT.search(source) is not None


def _column(source: str, line: int, field: str, exc: jinja2.TemplateSyntaxError) -> int:
    """Where on its line a syntax error is: the first construct ({{ }}, {% %}) there whose
    end, parsed with all that comes before, gives the same error; else the line's first."""
    starts = _line_starts(source)
    if line > len(starts):
        return 1
    begin = starts[line - 1]
    end = starts[line] if line < len(starts) else len(source)
    for m in _CONSTRUCT.finditer(source, begin, end):
        if m.start() >= end:
            break
        try:
            ENV.parse(source[: m.end()], name=field)
        except jinja2.TemplateSyntaxError as again:
            if again.lineno == line and again.message == exc.message:
                return m.start() - begin + 1
    return _construct_column(source, line)


def _construct_column(source: str, line: int) -> int:
    text = _line(source, line)
    m = re.search(r"\{[{%#]", text)
    return m.start() + 1 if m else 1


def _word_column(source: str, line: int, word: str) -> int:
    """The column of ``word`` inside a construct on the line (else of the first construct)."""
    text = _line(source, line)
    for m in _CONSTRUCT.finditer(text):
        w = re.search(rf"(?<![\w.]){re.escape(word)}\b|\.{re.escape(word)}\b", m.group())
        if w:
            return m.start() + w.start() + (1 if w.group().startswith(".") else 0) + 1
    return _construct_column(source, line)


def _line(source: str, line: int) -> str:
    lines = source.splitlines()
    return lines[line - 1] if 0 < line <= len(lines) else ""


def _line_starts(source: str) -> list[int]:
    starts = [0]
    starts += [m.end() for m in re.finditer(r"\r\n|\n|\r", source)]
    if starts[-1] == len(source) and len(starts) > 1:
        starts.pop()
    return starts


def protect(source: str, token: str) -> tuple[str, list[str]]:
    """The source with each Jinja construct replaced by ``token`` and its index (letters and
    digits that HTML tools leave alone), and the constructs in order, for ``restore``."""
    found: list[str] = []

    def swap(m: re.Match[str]) -> str:
        found.append(m.group())
        return f"{token}{len(found) - 1}Z"

    return _CONSTRUCT.sub(swap, source), found


def restore(text: str, token: str, constructs: list[str]) -> str:
    return re.sub(rf"{token}(\d+)Z", lambda m: constructs[int(m.group(1))], text)
