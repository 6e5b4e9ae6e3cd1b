"""The templates API (scope "campaigns"): versioned templates added, listed, shown and
deleted; a preview rendered for a sample contact; a test message sent through the sending
API's own path (compose, store: a 202 means committed, as for any message). A template error
is a 422 naming the field, line and column, and nothing is stored."""

from __future__ import annotations

import asyncio
import functools
import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from relayd.events.log import log
from relayd.ingress.api.schema import Address
from relayd.ingress.api.service import Refused, Reply, Request, _allow, _decode
from relayd.ingress.credentials import Credential
from relayd.spool import templates as stored
from relayd.templates import SAMPLE, Compiled, TemplateError, compile_template, contact

if TYPE_CHECKING:
    from relayd.ingress.api.service import Api

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_PATH = re.compile(r"^/v1/templates/([^/]+)(?:/(preview|test))?$")


class TemplateAdd(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/templates``: a new template, or a new version of one (same name)."""

    name: str
    kind: Literal["html", "mjml"] = "html"
    subject: str
    from_name: str = ""
    html: str | None = None  # the source when kind is html
    mjml: str | None = None  # the source when kind is mjml
    text: str = ""  # "": made from the HTML
    defaults: dict[str, Any] = {}  # what contact.X and data.X fall back to


class Contact(msgspec.Struct, forbid_unknown_fields=True):
    email: str = "sample@example.com"
    attributes: dict[str, Any] = {}


class TemplatePreview(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/templates/{name}/preview``: the template rendered for this contact."""

    contact: Contact = msgspec.field(default_factory=Contact)
    data: dict[str, Any] = {}
    unsubscribe_url: str = SAMPLE["unsubscribe_url"]
    version: int | None = None  # None: the latest


class TemplateTest(TemplatePreview, kw_only=True):
    """``POST /v1/templates/{name}/test``: one message of the template to ``to``."""

    to: Address | str
    sender: Address | str = msgspec.field(name="from")


def owner(cred: Credential) -> str:
    """What the key's templates belong to: the key as its messages' origin names it."""
    return f"key:{cred.name}"


async def handle(api: Api, req: Request, cred: Credential) -> Reply:
    """/v1/templates and /v1/templates/{name}[/preview|/test]."""
    mine = owner(cred)
    if req.path == "/v1/templates":
        if req.method == "GET":
            found = await api.reader.run(stored.listing, mine)
            return Reply(200, json.dumps({"templates": found}).encode())
        _allow(req.method, "POST")
        return await _add(api, _decode(req.body, TemplateAdd), mine, cred)
    m = _PATH.match(req.path)
    if m is None or not _NAME.match(m.group(1)):
        raise Refused(404, "Not found", f"no resource {req.path}")
    name, action = m.group(1), m.group(2)
    if action is None and req.method == "DELETE":
        if not await api.reader.write(stored.delete, mine, name):
            raise Refused(404, "Not found", f"no template {name}")
        log.info("template_deleted", key=cred.name, template=name)
        return Reply(200, json.dumps({"deleted": name}).encode())
    if action is None:
        _allow(req.method, "GET")
        version = _version(req.query.get("version"))
        return Reply(200, json.dumps((await _get(api, mine, name, version)).as_json()).encode())
    _allow(req.method, "POST")
    ask = _decode(req.body, TemplateTest if action == "test" else TemplatePreview)
    found = await _get(api, mine, name, ask.version)
    loop = asyncio.get_running_loop()
    rendered = await loop.run_in_executor(api.compose_pool, _render, found, ask)
    if action == "preview":
        return Reply(200, json.dumps({"version": found.version, **rendered}).encode())
    return await _test(api, req, cred, found, ask, rendered)


async def _add(api: Api, add: TemplateAdd, mine: str, cred: Credential) -> Reply:
    if not _NAME.match(add.name):
        problem = "1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit"
        raise Refused(422, "Invalid request", problem, "name")
    source = add.mjml if add.kind == "mjml" else add.html
    other = add.html if add.kind == "mjml" else add.mjml
    if source is None or other is not None:
        raise Refused(
            422, "Invalid request", f"give the source as {add.kind} (kind {add.kind})", add.kind
        )
    loop = asyncio.get_running_loop()
    args = (add.kind, add.subject, add.from_name, source, add.text, _json(add.defaults))
    await loop.run_in_executor(api.compose_pool, _compiled_or_refused, *args)
    version = await api.reader.write(
        stored.add,
        mine,
        add.name,
        add.kind,
        add.subject,
        add.from_name,
        source,
        add.text,
        add.defaults,
        api.clock(),
    )
    log.info("template_added", key=cred.name, template=add.name, version=version)
    return Reply(201, json.dumps({"name": add.name, "version": version}).encode())


async def _get(api: Api, mine: str, name: str, version: int | None) -> stored.Template:
    found = await api.reader.run(stored.get, mine, name, version)
    if found is None:
        which = f" version {version}" if version is not None else ""
        raise Refused(404, "Not found", f"no template {name}{which}")
    return found


def _render(found: stored.Template, ask: TemplatePreview) -> dict[str, str]:
    compiled = _compiled_or_refused(
        found.kind, found.subject, found.from_name, found.html, found.text, _json(found.defaults)
    )
    context = {
        "contact": contact(ask.contact.email, ask.contact.attributes),
        "data": ask.data,
        "unsubscribe_url": ask.unsubscribe_url,
    }
    try:
        out = compiled.render(context)
    except TemplateError as exc:
        raise _refused(exc) from None
    return {"subject": out.subject, "from": out.from_name, "text": out.text, "html": out.html}


async def _test(
    api: Api,
    req: Request,
    cred: Credential,
    found: stored.Template,
    ask: TemplateTest,
    rendered: dict[str, str],
) -> Reply:
    """The rendered template as a ``POST /v1/messages`` of the same key, through the sending
    API itself: the same checks (sender, rate, suppression, space), MIME and store."""
    sender = ask.sender if isinstance(ask.sender, Address) else Address(ask.sender)
    send = {
        "from": {"email": sender.email, "name": sender.name or rendered["from"]},
        "to": [ask.to],
        "subject": rendered["subject"],
        "text": rendered["text"] or None,
        "html": rendered["html"] or None,
        "tags": ["template-test"],
        "metadata": {"template": found.name, "version": found.version},
    }
    body = msgspec.json.encode(send)
    inner = Request(
        "POST", "/v1/messages", {}, {"content-type": "application/json"}, body, req.client
    )
    answer = await api._send(inner, cred, kumo=False)  # its problems name the same fields
    result = json.loads(answer.body)["results"][0]
    if result["status"] != "queued":
        raise Refused(
            422,
            "Invalid request",
            f"not sent: {result['error'] or result['status']}",
            "to",
            results=[result],
        )
    log.info(
        "template_test_sent", key=cred.name, template=found.name, queue_id=result["message_id"]
    )
    doc = {"queue_id": result["message_id"], "to": result["email"], "version": found.version}
    return Reply(202, json.dumps(doc).encode(), headers=answer.headers)


def _json(defaults: dict[str, Any]) -> str:
    return json.dumps(defaults, sort_keys=True)


def _compiled_or_refused(
    kind: str, subject: str, from_name: str, html: str, text: str, defaults: str
) -> Compiled:
    try:
        return _compiled(kind, subject, from_name, html, text, defaults)
    except TemplateError as exc:
        raise _refused(exc) from None


@functools.lru_cache(maxsize=32)
def _compiled(
    kind: str, subject: str, from_name: str, html: str, text: str, defaults: str
) -> Compiled:
    """A version compiled once (MJML and CSS take tens of milliseconds) for its previews and
    tests; keyed by its text, so a new version is a new entry."""
    return compile_template(kind, subject, from_name, html, text, json.loads(defaults))


def _refused(exc: TemplateError) -> Refused:
    return Refused(
        422,
        "Invalid template",
        f"{exc.field}:{exc.line}:{exc.column}: {exc.problem}",
        exc.field,
        line=exc.line,
        column=exc.column,
        problem=exc.problem,
    )


def _version(raw: str | None) -> int | None:
    if raw is None:
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= 2**62:
        raise Refused(422, "Invalid request", f"a version is a number from 1: {raw!r}", "version")
    return int(raw)


def openapi(problems: Callable[..., dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The OpenAPI paths of this module and the schemas they refer to (openapi.py merges
    them into the document)."""
    (add, ask, test), schemas = msgspec.json.schema_components(
        [TemplateAdd, TemplatePreview, TemplateTest], ref_template="#/components/schemas/{name}"
    )
    body = lambda schema: {  # noqa: E731
        "required": True,
        "content": {"application/json": {"schema": schema}},
    }
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    version = {"name": "version", "in": "query", "schema": {"type": "integer", "minimum": 1}}
    invalid = {
        "description": "a template error: `field` (subject, from_name, html, mjml, text),"
        " `line` and `column` (1-based) and `problem`; nothing stored or sent",
        "content": {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        },
    }
    rendered = "subject, from, text, html: the template rendered for the contact"
    paths = {
        "/v1/templates": {
            "get": {
                "summary": "The key's templates (scope campaigns): each name's latest version",
                "responses": {"200": {"description": "templates"}, **problems(401, 403)},
            },
            "post": {
                "summary": "Add a template, or a new version of one (same name): checked and"
                " compiled first (MJML, CSS inlined, a trial render)",
                "requestBody": body(add),
                "responses": {
                    "201": {"description": "name and version"},
                    **problems(400, 401, 403),
                    "422": invalid,
                },
            },
        },
        "/v1/templates/{name}": {
            "parameters": [name],
            "get": {
                "summary": "A version's source (default: the latest)",
                "parameters": [version],
                "responses": {"200": {"description": "the template"}, **problems(401, 403, 404)},
            },
            "delete": {
                "summary": "Delete the template, every version",
                "responses": {"200": {"description": "deleted"}, **problems(401, 403, 404)},
            },
        },
        "/v1/templates/{name}/preview": {
            "parameters": [name],
            "post": {
                "summary": "Render for a sample contact (email, attributes) and data",
                "requestBody": body(ask),
                "responses": {
                    "200": {"description": rendered},
                    **problems(400, 401, 403, 404),
                    "422": invalid,
                },
            },
        },
        "/v1/templates/{name}/test": {
            "parameters": [name],
            "post": {
                "summary": "Send one message of the template to `to`, as POST /v1/messages"
                " would (same checks, same answer codes)",
                "requestBody": body(test),
                "responses": {
                    "202": {"description": "queue_id: the message, committed to the spool"},
                    **problems(400, 401, 403, 404, 429, 503),
                    "422": invalid,
                },
            },
        },
    }
    return paths, schemas
