"""The pages an unsubscribe link shows a person: what a click will do (with the button that does
it: a GET never unsubscribes, since scanners and prefetchers follow links), that it is done, or
that the link is no good. Jinja2 with autoescape: the address comes from the token, and so from
whoever wrote the link. Imported only in the ingress process with an HTTP listener."""

from __future__ import annotations

from jinja2 import DictLoader, Environment

from relayd.feedback.unsubscribe import ACCOUNTS
from relayd.spool.suppression import GLOBAL

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 34em; margin: 4em auto; padding: 0 1em;
       line-height: 1.5; color: #222; }
button { font-size: 1em; padding: .5em 1.5em; cursor: pointer; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
{% block main %}{% endblock %}
</body>
</html>
"""
_CONFIRM = """{% extends "page" %}{% block main %}
{% if done %}
<p><strong>{{ rcpt }}</strong> is already unsubscribed from {{ whom }}.</p>
{% else %}
<p><strong>{{ rcpt }}</strong> will no longer receive mail from {{ whom }}.</p>
<form method="post" action="">
<input type="hidden" name="List-Unsubscribe" value="One-Click">
<button type="submit">Unsubscribe</button>
</form>
{% endif %}
{% endblock %}"""
_DONE = """{% extends "page" %}{% block main %}
<p><strong>{{ rcpt }}</strong> will no longer receive mail from {{ whom }}.</p>
{% endblock %}"""
_INVALID = """{% extends "page" %}{% block main %}
<p>This unsubscribe link is invalid or has expired ({{ problem }}).</p>
<p>Use the unsubscribe link of a more recent message, or reply to the sender.</p>
{% endblock %}"""

_env = Environment(
    loader=DictLoader({"page": _PAGE, "confirm": _CONFIRM, "done": _DONE, "invalid": _INVALID}),
    autoescape=True,
)
# No page of these is cached or indexed, and none leaks its link (the token) as a Referer.
HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
    ),
}


def whom(scope: str, sender: str | None, hostname: str) -> str:
    """Whose mail the scope stops, in words for the recipient."""
    if scope.startswith("domain:"):
        return scope.removeprefix("domain:")
    if scope.startswith(ACCOUNTS):
        return f"this sender ({sender})" if sender else "the sender of this message"
    return f"any sender using {hostname}" if scope == GLOBAL else scope


def confirm(rcpt: str, whom: str, done: bool) -> bytes:
    title = "Unsubscribed" if done else "Unsubscribe"
    return _render("confirm", title=title, rcpt=rcpt, whom=whom, done=done)


def done(rcpt: str, whom: str) -> bytes:
    return _render("done", title="Unsubscribed", rcpt=rcpt, whom=whom)


def invalid(problem: str) -> bytes:
    return _render("invalid", title="This link does not work", problem=problem)


def _render(name: str, **values: object) -> bytes:
    return _env.get_template(name).render(**values).encode()
