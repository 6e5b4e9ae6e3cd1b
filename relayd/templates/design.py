"""The once-per-version work on a template's HTML: MJML to responsive HTML (mjml-python, the
Rust MRML), CSS inlined (css-inline, keeping the @media rules that make it responsive), and a
text part made from the HTML when none is given (html2text). Jinja constructs are swapped for
plain tokens first and put back after, so that neither tool sees (or mangles) them."""

from __future__ import annotations

import re
import secrets

import css_inline
import html2text
import mjml

from relayd.templates import engine

# No <link> or @import is fetched: a template renders the same on a machine with no network.
_INLINER = css_inline.CSSInliner(keep_at_rules=True, load_remote_stylesheets=False)
_POSITION = re.compile(r"at position (\d+):(\d+)")


def _token() -> str:
    """A marker no template contains by chance: letters and digits only."""
    return f"Jz{secrets.token_hex(6)}N"


def html(kind: str, source: str) -> str:
    """The HTML source of a template, Jinja constructs intact: MJML rendered when ``kind`` is
    "mjml", then CSS inlined; raises engine.TemplateError for MJML the renderer refuses."""
    token = _token()
    plain, constructs = engine.protect(source, token)
    if kind == "mjml":
        try:
            plain = mjml.mjml2html(plain, fonts={}, include_loader=_no_include)
        except ValueError as exc:
            line, column = _where(plain, str(exc), token, constructs)
            raise engine.TemplateError("mjml", line, column, str(exc)) from None
    try:
        plain = _INLINER.inline(plain)
    except ValueError as exc:  # css_inline.InlineError: a stylesheet it cannot parse
        raise engine.TemplateError("html", 1, 1, f"CSS: {exc}") from None
    return engine.restore(plain, token, constructs)


def text(source_html: str) -> str:
    """A text part made from the (Jinja) HTML: its text, links as [text](url), no tables'
    drawing; Jinja constructs kept, so the text part is personalised as the HTML is."""
    token = _token()
    plain, constructs = engine.protect(source_html, token)
    converter = html2text.HTML2Text()
    converter.body_width = 0  # no re-wrapping: a long personalised line stays one line
    converter.ignore_images = True
    converter.ignore_emphasis = True
    converter.ignore_tables = True
    converter.unicode_snob = True
    lines = [line.rstrip() for line in converter.handle(plain).splitlines()]
    made = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"
    return engine.restore(made, token, constructs)


def _no_include(path: str) -> str:
    """mj-include would read files of the server: a template is one self-contained source."""
    raise ValueError(f"mj-include is not supported ({path}): put the content in the template")


def _where(plain: str, message: str, token: str, constructs: list[str]) -> tuple[int, int]:
    """The line and column in the template's source of MRML's "at position START:END" (an
    offset into the source it was given, with tokens), else the end (where "unexpected end of
    stream" is)."""
    m = _POSITION.search(message)
    offset = int(m.group(1)) if m else len(plain)
    before = engine.restore(plain[:offset], token, constructs)
    line = before.count("\n") + 1
    return line, offset - (before.rfind("\n") + 1) + 1
