"""The sending API's behaviour, apart from the HTTP stack that carries it: authentication by
API key (scopes, senders, networks), the shared rate policy, idempotency, back pressure, and
RFC 9457 problem answers naming the field at fault. A message is acknowledged (202) only after
the queue process has committed it, as with SMTP's 250."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import hashlib
import json
import math
import re
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import msgspec

from relayd.config import Config, Webhooks
from relayd.events.log import emit, log
from relayd.events.records import Type
from relayd.feedback import page, unsubscribe
from relayd.feedback.tokens import BadToken, Tokens
from relayd.ingress import suppression as suppressions
from relayd.ingress.api import openapi
from relayd.ingress.api.compose import Invalid, Limits, Outcome, compose
from relayd.ingress.api.schema import (
    KumoInject,
    Send,
    SuppressionAdd,
    WebhookAdd,
    WebhookEnable,
    WebhookRotate,
    from_kumo,
)
from relayd.ingress.credentials import Credential, Directory
from relayd.ingress.suppression import Lookup
from relayd.model.message import Answer, Guard, NewMessage
from relayd.receipts import endpoints
from relayd.senderauth.report import domain_name
from relayd.spool import admin, schema, suppression
from relayd.spool import api as queries
from relayd.spool.space import FreeSpace, is_full
from relayd.tracking import Tracker, hits

Store = Callable[[list[NewMessage], Guard | None], Awaitable[Answer | None]]
PROBLEM = "application/problem+json"
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
_MESSAGE = re.compile(r"^/v1/messages/([0-9A-Fa-f]{1,32})$")
_WEBHOOK = re.compile(r"^/v1/webhooks/(\d{1,18})(?:/(rotate|enable|disable))?$")
_DOMAIN_CHECK = re.compile(r"^/v1/domains/([^/]{1,253})/check$")
_SUPPRESSION = re.compile(r"^/v1/suppressions/([^/]{1,254})$")
MAX_SUPPRESSIONS = 10_000  # entries one POST may add
_EVENT_TYPES = {t.value for t in Type}
MAX_PAGE = 1000


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case
    body: bytes
    client: str


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class Refused(Exception):
    """A request answered with a problem document (RFC 9457)."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.field = status, title, detail, field
        self.headers, self.extra = headers or {}, extra

    def reply(self, path: str) -> Reply:
        doc: dict[str, Any] = {
            "type": "about:blank",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": path,
        }
        if self.field is not None:
            doc["field"] = self.field
        doc.update(self.extra)
        return Reply(self.status, json.dumps(doc).encode(), PROBLEM, self.headers)


@dataclass(frozen=True)
class Settings:
    hostname: str
    max_recipients: int
    max_message_size: int
    max_body_size: int
    webhooks: Webhooks
    config: Config  # what a domain check reads: pools, shaping lanes, DKIM keys, [dns]


class Api:
    """Routes and answers requests; the HTTP server hands each one to ``handle``."""

    def __init__(
        self,
        settings: Settings,
        directory: Directory,
        store: Store,
        space: FreeSpace,
        spool: Path,
        tokens: Tokens,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings, self.directory, self.store, self.space = settings, directory, store, space
        self.tokens, self.clock = tokens, clock
        self.reader = Reader(spool)
        self.suppressions = Lookup(spool, clock)  # asked in the compose thread
        self.compose_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="api-compose")
        # domain checks block on DNS for seconds (checkdmarc and pyspf are blocking libraries)
        self.check_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="api-check")
        self.document = json.dumps(openapi.document()).encode()
        self.campaigns_changed: Callable[[], None] = lambda: None  # wakes the campaign runner
        self._tracking(settings)

    def reload(self, settings: Settings, directory: Directory, space: FreeSpace) -> None:
        self.settings, self.directory, self.space = settings, directory, space
        self._tracking(settings)

    def _tracking(self, settings: Settings) -> None:
        """[tracking]: the rewriting of composed HTML (None: off) and the routes of its links."""
        cfg = settings.config.tracking
        self.tracker = Tracker(cfg, self.tokens) if cfg.enabled else None
        self.hits = hits.Hits(cfg, self.tokens)

    def close(self) -> None:
        self.compose_pool.shutdown()
        self.check_pool.shutdown(cancel_futures=True)
        self.reader.close()
        self.suppressions.close()

    async def handle(self, req: Request) -> Reply:
        try:
            return await self._route(req)
        except Refused as exc:
            return exc.reply(req.path)
        except Exception as exc:  # a bug: logged, answered, never a hung client
            log.error("api_error", path=req.path, error=repr(exc))
            return Refused(500, "Internal error", "the request could not be handled").reply(
                req.path
            )

    async def _route(self, req: Request) -> Reply:
        path, method = req.path, req.method
        links = self.settings.config.unsubscribe
        token = path.removeprefix(links.path) if links.enabled else ""
        if token and "/" not in token:  # a link's last segment (the path's own): no API key
            return await self._unsubscribe(req, token)
        if tracked := self.hits.match(path):  # a tracking link: no API key either
            return await self._track(req, *tracked)
        if path == "/v1/openapi.json":
            _allow(method, "GET")
            return Reply(200, self.document)
        from relayd.ingress.api import reports  # campaign reports, their page and its login

        if (answer := await reports.route(self, req)) is not None:
            return answer
        if path in ("/v1/messages", "/api/inject/v1"):
            _allow(method, "POST")
            return await self._send(req, self._key(req, "send"), kumo=path == "/api/inject/v1")
        if m := _MESSAGE.match(path):
            _allow(method, "GET")
            self._key(req, "read")
            return await self._status(m.group(1).upper())
        if path == "/v1/events":
            _allow(method, "GET")
            self._key(req, "read")
            return await self._events(req)
        if path == "/v1/webhooks" or _WEBHOOK.match(path):
            return await self._webhooks(req, self._key(req, "webhooks"))
        if path == "/v1/suppressions" or _SUPPRESSION.match(path):
            return await self._suppressions(req, self._key(req, "suppressions"))
        if path == "/v1/campaigns" or path.startswith("/v1/campaigns/"):
            from relayd.ingress.api import campaigns  # it imports this module's helpers

            return await campaigns.handle(self, req, self._key(req, "campaigns"))
        if path == "/v1/templates" or path.startswith("/v1/templates/"):
            from relayd.ingress.api import templates  # it builds on this module

            return await templates.handle(self, req, self._key(req, "campaigns"))
        if m := _DOMAIN_CHECK.match(path):
            _allow(method, "GET")
            return await self._check_domain(req, self._key(req, "read"), m.group(1))
        from relayd.ingress.api import contacts  # which imports this module

        if contacts.handles(path):
            return await contacts.route(self, req, self._key(req, "campaigns"))
        raise Refused(404, "Not found", f"no resource {path}")

    # -- authentication -------------------------------------------------------------------

    def _key(self, req: Request, scope: str) -> Credential:
        """The key the request's bearer token proves, allowed ``scope`` from its address."""
        auth = req.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="relayd"'}
        if scheme.lower() != "bearer" or not token.strip():
            raise Refused(
                401,
                "Unauthorized",
                "an API key is needed: Authorization: Bearer KEY",
                "authorization",
                challenge,
            )
        cred = self.directory.key(token.strip())
        if cred is None:
            raise Refused(
                401, "Unauthorized", "unknown or revoked API key", "authorization", challenge
            )
        if scope not in cred.scopes and "admin" not in cred.scopes:
            raise Refused(403, "Forbidden", f"key {cred.name} lacks the {scope} scope", "scope")
        if not cred.may_use_from(req.client):
            raise Refused(403, "Forbidden", f"key {cred.name} may not be used from {req.client}")
        return cred

    # -- sending --------------------------------------------------------------------------

    async def _send(self, req: Request, cred: Credential, kumo: bool) -> Reply:
        if self.space.low():
            raise Refused(
                503,
                "Service unavailable",
                "the spool is short of free space; retry",
                headers={"Retry-After": "60"},
            )
        if len(req.body) > self.settings.max_body_size:
            raise Refused(
                413,
                "Content too large",
                f"the body is over {self.settings.max_body_size} bytes",
                "body",
            )
        ctype = req.headers.get("content-type", "application/json").split(";")[0].strip()
        if ctype != "application/json":
            raise Refused(415, "Unsupported media type", "send application/json", "content-type")
        send = _decode(req.body, KumoInject if kumo else Send)
        if kumo:
            send = from_kumo(send)  # type: ignore[arg-type]
        key = req.headers.get("idempotency-key")
        digest = ""
        if key is not None:
            if not _IDEMPOTENCY_KEY.match(key):
                raise Refused(
                    400, "Bad request", "1 to 255 printable characters", "idempotency-key"
                )
            digest = hashlib.sha256(req.path.encode() + b"\0" + req.body).hexdigest()
            earlier = await self.reader.run(
                queries.earlier, cred.account, key, digest, self.clock()
            )
            if earlier is not None:
                return _again(earlier, key)
        now = self.clock()
        settings = self.settings
        limits = Limits(settings.max_recipients, settings.max_message_size, settings.hostname)
        loop = asyncio.get_running_loop()
        try:
            msgs, outcomes = await loop.run_in_executor(
                self.compose_pool,
                compose,
                send,
                cred,
                req.client,
                limits,
                now,
                self.suppressions.find,
                self.tracker,
            )
        except Invalid as exc:
            title = "Forbidden" if exc.status == 403 else "Invalid request"
            raise Refused(exc.status, title, exc.problem, exc.field) from None
        headers = self._rate(cred, sum(bool(m.recipients) for m in msgs))
        answer = _answer(outcomes, kumo)
        if not msgs:
            raise Refused(
                422,
                "Invalid request",
                "no recipient could be queued",
                "recipients",
                headers,
                results=[o.as_json() for o in outcomes],
            )
        for msg in msgs:
            msg.received_at = now
        body = json.dumps(answer).encode()
        guard = (cred.account, key, digest, body.decode()) if key is not None else None
        try:
            found = await self.store(msgs, guard)
        except Exception as exc:
            log.error("api_store_failed", error=repr(exc), key=cred.name)
            reason = "the spool is short of free space" if is_full(exc) else "a local error"
            raise Refused(
                503,
                "Service unavailable",
                f"not queued: {reason}; retry",
                headers={"Retry-After": "30" if is_full(exc) else "5"},
            ) from None
        if found is not None:
            return _again(found, key or "")
        log.info(
            "api_accepted",
            key=cred.name,
            client=req.client,
            messages=len(msgs),
            recipients=sum(o.status == "queued" for o in outcomes),
        )
        return Reply(200 if kumo else 202, body, headers=headers)

    def _rate(self, cred: Credential, count: int) -> dict[str, str]:
        """RateLimit-* headers of the key's allowance (the one its SMTP login would spend);
        429 when the request's messages do not fit in it now."""
        bucket = self.directory.bucket(cred)
        if bucket is None:
            return {}
        limit = bucket.rate
        if not bucket.take(count):
            wait = bucket.wait(count)
            retry = "3600" if math.isinf(wait) else str(max(1, math.ceil(wait)))
            headers = _rate_headers(limit.count, bucket.remaining(), retry)
            headers["Retry-After"] = retry
            raise Refused(
                429,
                "Too many requests",
                f"key {cred.name} may send {cred.rate}; this request has {count}",
                headers=headers,
            )
        reset = str(math.ceil(bucket.wait(int(limit.count))))  # seconds until full again
        return _rate_headers(limit.count, bucket.remaining(), reset)

    # -- reading --------------------------------------------------------------------------

    async def _status(self, queue_id: str) -> Reply:
        found = await self.reader.run(queries.message_status, queue_id)
        if found is None:
            raise Refused(404, "Not found", f"no message {queue_id} (or its events expired)")
        return Reply(200, json.dumps(_status_document(found)).encode())

    async def _events(self, req: Request) -> Reply:
        q = req.query
        after = _int_param(q, "after", 0, 0, 2**62)
        limit = _int_param(q, "limit", 100, 1, MAX_PAGE)
        types = [t for t in q.get("type", "").split(",") if t]
        unknown = sorted(set(types) - _EVENT_TYPES)
        if unknown:
            raise Refused(422, "Invalid request", f"unknown event type {unknown[0]!r}", "type")
        rcpt = q.get("recipient")
        events = await self.reader.run(queries.events_after, after, types, rcpt, limit)
        for e in events:
            e["at"] = _iso(e["at"])
        cursor = str(events[-1]["id"]) if events else str(after)
        return Reply(200, json.dumps({"events": events, "next": cursor}).encode())

    # -- webhook endpoints ----------------------------------------------------------------

    async def _webhooks(self, req: Request, cred: Credential) -> Reply:
        """The endpoints, as ``relayctl webhook`` manages them (receipts.endpoints does the
        checks for both); changes are short write transactions the dispatcher sees at once."""
        now, settings = self.clock(), self.settings.webhooks
        m = _WEBHOOK.match(req.path)
        ref, action = (int(m.group(1)), m.group(2)) if m else (None, None)
        try:
            if ref is None and req.method == "GET":
                found = {"webhooks": await self.reader.run(endpoints.listing, now)}
            elif ref is None:
                _allow(req.method, "POST")
                add = _decode(req.body, WebhookAdd)
                found = await self.reader.write(
                    endpoints.add,
                    settings,
                    add.url,
                    add.events,
                    now,
                    add.batch,
                    add.concurrency,
                    add.timeout,
                )
                log.info("webhook_added", key=cred.name, url=add.url, id=found["id"])
                return Reply(201, json.dumps(found).encode())
            elif action is None and req.method == "GET":
                found = await self.reader.run(endpoints.show, ref, now)
            elif action is None:
                _allow(req.method, "DELETE")
                found = await self.reader.write(endpoints.remove, ref)
            else:
                _allow(req.method, "POST")
                body = req.body or b"{}"
                if action == "rotate":
                    overlap = _decode(body, WebhookRotate).overlap
                    overlap = settings.rotation_overlap if overlap is None else overlap
                    if not 0 <= overlap <= 30 * 86400:
                        raise Refused(422, "Invalid request", "from 0 to 30 days", "overlap")
                    found = await self.reader.write(endpoints.rotate, ref, overlap, now)
                elif action == "enable":
                    from_now = _decode(body, WebhookEnable).from_now
                    found = await self.reader.write(endpoints.enable, ref, now, from_now)
                else:
                    found = await self.reader.write(endpoints.disable, ref, now, "by API")
        except endpoints.EndpointError as exc:
            raise Refused(422, "Invalid request", exc.problem, exc.field) from None
        except endpoints.NotFound:
            raise Refused(404, "Not found", f"no webhook endpoint {ref}") from None
        return Reply(200, json.dumps(found).encode())

    # -- the suppression list -------------------------------------------------------------

    async def _suppressions(self, req: Request, cred: Credential) -> Reply:
        """The list as ``relayctl suppression`` manages it. A key manages its own scope
        (key:NAME) and its sender domains' (domain:D); global entries need the admin scope.
        It sees those and the global ones."""
        now, admin_key = self.clock(), "admin" in cred.scopes
        mine = [cred.account, *(f"domain:{d}" for d in cred.senders if "@" not in d)]
        m = _SUPPRESSION.match(req.path)
        if m is None and req.method == "GET":
            q = req.query
            limit = _int_param(q, "limit", 100, 1, MAX_PAGE)
            scopes = None if admin_key else [suppression.GLOBAL, *mine]
            if "scope" in q:
                scope = _scope(q["scope"], "scope")
                if scopes is not None and scope not in scopes:
                    raise Refused(403, "Forbidden", f"key {cred.name} may not see {scope}", "scope")
                scopes = [scope]
            found = await self.reader.run(
                suppression.listing,
                now,
                scopes,
                q.get("reason"),
                q.get("email"),
                _page_after(q.get("after")),
                limit,
            )
            page = [e.as_json() for e in found]
            after = _page_cursor(found[-1]) if len(found) == limit else None
            return Reply(200, json.dumps({"suppressions": page, "next": after}).encode())
        if m is None:
            _allow(req.method, "POST")
            add = _decode(req.body, SuppressionAdd)
            if not 1 <= len(add.suppressions) <= MAX_SUPPRESSIONS:
                problem = f"from 1 to {MAX_SUPPRESSIONS} entries"
                raise Refused(422, "Invalid request", problem, "suppressions")
            entries = []
            for i, item in enumerate(add.suppressions):
                where = f"suppressions[{i}]"
                try:
                    e = suppressions.entry(
                        item.email, item.scope or cred.account, item.reason, now, item.detail
                    )
                except suppressions.Invalid as exc:
                    field = "email" if exc.field == "address" else exc.field
                    raise Refused(422, "Invalid request", exc.problem, f"{where}.{field}") from None
                self._may_manage(cred, e.scope, mine, f"{where}.scope")
                entries.append(e)
            added = await self.reader.write(suppression.add, entries)
            log.info("suppressions_added", key=cred.name, count=len(entries))
            return Reply(201, json.dumps({"added": added}).encode())
        _allow(req.method, "DELETE")
        address = m.group(1)  # the server gives the path decoded
        scope = _scope(req.query.get("scope") or cred.account, "scope")
        self._may_manage(cred, scope, mine, "scope")
        if not await self.reader.write(suppression.remove, address, scope):
            raise Refused(404, "Not found", f"{address} is not suppressed in {scope}")
        log.info("suppression_removed", key=cred.name, rcpt=address, scope=scope)
        return Reply(200, json.dumps({"removed": 1, "email": address, "scope": scope}).encode())

    # -- one-click unsubscribe (RFC 8058) ---------------------------------------------------

    async def _unsubscribe(self, req: Request, token: str) -> Reply:
        """The links of bulk mail ([unsubscribe]), taken without an API key: the signed token
        is the credential. POST unsubscribes (in one short write transaction, idempotent);
        GET and HEAD show what a POST would do, and never change anything."""
        if req.method not in ("GET", "HEAD", "POST"):
            raise Refused(
                405,
                "Method not allowed",
                "POST List-Unsubscribe=One-Click to unsubscribe (RFC 8058); GET shows the page",
                headers={"Allow": "GET, HEAD, POST"},
            )
        now, max_age = self.clock(), self.settings.config.unsubscribe.max_age
        try:
            queue_id, rcpt, scope = self.tokens.unsubscribed(token, now, max_age)
        except BadToken as exc:
            log.info("unsubscribe_refused", client=req.client, error=str(exc))
            if req.method == "POST":
                raise Refused(400, "Bad request", str(exc), "token") from None
            return Reply(400, page.invalid(str(exc)), "text/html", page.HEADERS)
        hostname = self.settings.hostname
        if req.method != "POST":
            found, done = await self.reader.run(_unsubscribe_state, queue_id, rcpt, scope)
            whom = page.whom(scope, found.sender, hostname)
            return Reply(200, page.confirm(rcpt, whom, done), "text/html", page.HEADERS)
        _one_click(req)
        event = None  # a click again (clients and scanners repeat): no write lock taken
        if not await self.reader.run(unsubscribe.unsubscribed, rcpt, scope):
            event = await self.reader.write(
                unsubscribe.record, self.tokens, token, now, max_age, "one-click"
            )
        if event is not None:  # committed: its log line (None: it was done before)
            emit([event])
        sender = event.data.get("sender") if event is not None else None
        whom = page.whom(scope, sender, hostname)
        return Reply(200, page.done(rcpt, whom), "text/html", page.HEADERS)

    # -- open and click tracking ([tracking]) -----------------------------------------------

    async def _track(self, req: Request, kind: bytes, token: str) -> Reply:
        """The open pixel and the click links, taken without an API key: the signed token is
        the credential. A forged, altered or truncated one is a 404 and counts nothing."""
        if req.method not in ("GET", "HEAD"):
            raise Refused(405, "Method not allowed", "use GET", headers={"Allow": "GET, HEAD"})
        try:
            hit = self.hits.hit(kind, token, req.method, req.headers, req.client, self.clock())
        except BadToken as exc:
            log.info("tracking_refused", client=req.client, path=req.path, error=str(exc))
            raise Refused(404, "Not found", f"no resource {req.path}") from None
        cfg = self.settings.config.tracking
        event = await self.reader.write(hits.record, hit, cfg.count_bots, cfg.click_window)
        emit([event])  # committed: its log line
        return Reply(*self.hits.answer(hit))

    @staticmethod
    def _may_manage(cred: Credential, scope: str, mine: list[str], field: str) -> None:
        if "admin" not in cred.scopes and scope not in mine:
            raise Refused(403, "Forbidden", f"key {cred.name} may not change {scope}", field)

    # -- sender authentication ------------------------------------------------------------

    async def _check_domain(self, req: Request, cred: Credential, raw: str) -> Reply:
        """``relayctl check-domain``'s report, for a domain the key may send as (or any, with
        the admin scope): it shows the pools' addresses and the DKIM selectors."""
        domain = _domain_param(raw, "domain")
        given = req.query.get("return_path_domain")
        return_path = _domain_param(given, "return_path_domain") if given is not None else ""
        if "admin" not in cred.scopes and not cred.may_send_as(f"postmaster@{domain}"):
            raise Refused(403, "Forbidden", f"key {cred.name} may not send as {domain}", "domain")
        # checkdmarc and pyspf cost the ingress process memory: loaded on the first check
        from relayd.senderauth import check, lookup

        cfg = self.settings.config
        lookups = lookup.Dns.from_config(cfg.dns)
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(
            self.check_pool, check.check_domain, cfg, domain, lookups, return_path
        )
        log.info("domain_checked", key=cred.name, domain=domain, status=found.status.value)
        return Reply(200, json.dumps(found.as_json()).encode())


def _unsubscribe_state(
    conn: Any, queue_id: str, rcpt: str, scope: str
) -> tuple[unsubscribe.Original, bool]:
    """For the page: the original message (its sender), and whether it is done already."""
    return unsubscribe.original(conn, queue_id), unsubscribe.unsubscribed(conn, rcpt, scope)


def _one_click(req: Request) -> None:
    """RFC 8058's body, List-Unsubscribe=One-Click, as a form: URL-encoded, or multipart as
    some clients send it."""
    ctype = req.headers.get("content-type", "")
    kind = ctype.partition(";")[0].strip().lower()
    if kind not in openapi.FORMS:
        raise Refused(
            415,
            "Unsupported media type",
            "send List-Unsubscribe=One-Click as application/x-www-form-urlencoded"
            " (or multipart/form-data), as RFC 8058 says",
            "content-type",
            headers={"Accept-Post": ", ".join(openapi.FORMS)},
        )
    if kind == openapi.FORMS[0]:
        values = parse_qs(req.body.decode("latin-1"), keep_blank_values=True)
        given = values.get("List-Unsubscribe", [])
    else:
        given = _multipart_values(ctype, req.body, "List-Unsubscribe")
    if given != ["One-Click"]:
        raise Refused(
            400,
            "Bad request",
            f"the body must be List-Unsubscribe=One-Click (RFC 8058), got {given or 'none'}",
            "List-Unsubscribe",
        )


def _multipart_values(ctype: str, body: bytes, name: str) -> list[str]:
    """The values of a multipart/form-data field (RFC 7578), read by the email package."""
    head = f"Content-Type: {ctype}\r\n\r\n".encode("latin-1", "replace")
    form = email.message_from_bytes(head + body, _class=EmailMessage, policy=email.policy.HTTP)
    values = []
    for part in form.iter_parts() if form.is_multipart() else ():
        if part.get_param("name", header="content-disposition") == name:
            try:
                values.append(str(part.get_content()))
            except (LookupError, ValueError):  # an unknown charset, a broken encoding
                values.append("?")
    return values


def _scope(text: str, field: str) -> str:
    try:
        return suppressions.parse_scope(text)
    except suppressions.Invalid as exc:
        raise Refused(422, "Invalid request", exc.problem, field) from None


def _page_cursor(entry: suppression.Entry) -> str:
    """Where the next page starts: after this entry (opaque to the client)."""
    return base64.urlsafe_b64encode(f"{entry.address}\n{entry.scope}".encode()).decode()


def _page_after(cursor: str | None) -> tuple[str, str] | None:
    if cursor is None:
        return None
    try:
        address, _, scope = base64.urlsafe_b64decode(cursor).decode().partition("\n")
    except (ValueError, UnicodeDecodeError):
        raise Refused(422, "Invalid request", "not a cursor this API gave", "after") from None
    return address, scope


class Reader:
    """Spool reads on a thread of their own with a read-only connection, opened on first use:
    the event loop never waits for SQLite."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="api-read")
        self.conn: Any = None
        self.writer: Any = None  # for the rare changes (webhook endpoints), as relayctl's

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._call, fn, args)

    async def write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn`` in a short write transaction of its own, beside the daemon's writer (as
        relayctl's changes): nothing here holds the lock for longer than one statement."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._change, fn, args)

    def _call(self, fn: Callable[..., Any], args: tuple) -> Any:
        if self.conn is None:
            self.conn = schema.reader(self.path)
        return fn(self.conn, *args)

    def _change(self, fn: Callable[..., Any], args: tuple) -> Any:
        if self.writer is None:
            self.writer = admin.open_spool(self.path, write=True)
        with admin.transaction(self.writer, True):
            return fn(self.writer, *args)

    def close(self) -> None:
        """On the thread that opened them (SQLite refuses another), after the work queued."""
        self.pool.submit(self._close)
        self.pool.shutdown()

    def _close(self) -> None:
        for conn in (self.conn, self.writer):
            if conn is not None:
                conn.close()


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise Refused(405, "Method not allowed", f"use {allowed}", headers={"Allow": allowed})


def _decode(body: bytes, kind: type) -> Any:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        where = text.rpartition(" - at `$")[2].rstrip("`") if " - at `$" in text else ""
        problem = text.partition(" - at `")[0]
        if not where and "unknown field" in text:
            where = text.partition("`")[2].partition("`")[0]
        raise Refused(422, "Invalid request", problem, where.lstrip(".") or "body") from None
    except msgspec.DecodeError as exc:
        raise Refused(400, "Bad request", f"not JSON: {exc}", "body") from None


def _answer(outcomes: list[Outcome], kumo: bool) -> dict[str, Any]:
    if kumo:  # KumoMTA's inject/v1 answer, as its clients read it
        failed = [o for o in outcomes if o.status != "queued"]
        return {
            "success_count": len(outcomes) - len(failed),
            "fail_count": len(failed),
            "failed_recipients": [o.email for o in failed],
            "errors": [f"{o.email}: {o.error}" for o in failed],
        }
    return {
        "results": [o.as_json() for o in outcomes],
        "queued": sum(o.status == "queued" for o in outcomes),
        "rejected": sum(o.status == "rejected" for o in outcomes),
        "suppressed": sum(o.status == "suppressed" for o in outcomes),
    }


def _again(found: Answer, key: str) -> Reply:
    """An idempotency key seen before: the first answer again, or 422 for another request."""
    kind, body = found
    if kind == "replay":
        return Reply(202, body.encode(), headers={"Idempotent-Replayed": "true"})
    raise Refused(
        422,
        "Idempotency key reused",
        f"key {key!r} was used within 24 h for another request",
        "idempotency-key",
    )


def _rate_headers(limit: float, remaining: int, reset: str) -> dict[str, str]:
    return {
        "RateLimit-Limit": str(int(limit)),
        "RateLimit-Remaining": str(max(remaining, 0)),
        "RateLimit-Reset": reset,
    }


def _int_param(query: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise Refused(422, "Invalid request", f"not a number: {raw!r}", name) from None
    if not low <= value <= high:
        raise Refused(422, "Invalid request", f"must be from {low} to {high}", name)
    return value


def _domain_param(raw: str, name: str) -> str:
    try:
        return domain_name(raw)
    except ValueError as exc:
        raise Refused(422, "Invalid request", str(exc), name) from None


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


_FINAL = {
    "delivered": "delivered",
    "bounced": "bounced",
    "expired": "bounced",
    "suppressed": "suppressed",
}
_ATTEMPTS = ("delivered", "deferred", "bounced", "expired")


def _status_document(found: dict[str, Any]) -> dict[str, Any]:
    """A message's envelope, each recipient's state, every attempt, and its events."""
    events, msg, spooled = found["events"], found["message"], found["spooled"]
    reception = next((e for e in events if e["type"] == "accepted"), None)
    doc: dict[str, Any] = {"id": found["queue_id"]}
    if reception is not None:
        doc.update(
            sender=reception.get("sender"),
            received_at=_iso(reception["at"]),
            size=reception.get("size"),
            origin=reception.get("origin"),
        )
        rcpts = list(reception.get("rcpt") or [])
    else:
        rcpts = []
    if msg is not None:
        _, sender, received_at, size, origin, meta = msg
        doc.update(sender=sender, received_at=_iso(received_at), size=size, origin=origin)
        if meta:
            doc["meta"] = json.loads(meta)
    stopped = [e["rcpt"] for e in events if e["type"] == "suppressed"]
    for rcpt in [*spooled, *stopped]:
        if rcpt not in rcpts:
            rcpts.append(rcpt)
    attempts = [
        {
            "at": _iso(e["at"]),
            "rcpt": e.get("rcpt"),
            "result": e["type"],
            "mx": e.get("mx"),
            "source_ip": e.get("source_ip"),
            "code": e.get("code"),
            "response": e.get("response"),
        }
        for e in events
        if e["type"] in _ATTEMPTS
    ]
    recipients = []
    for rcpt in rcpts:
        state = spooled.get(rcpt)
        if state is None:
            final = [e["type"] for e in events if e.get("rcpt") == rcpt and e["type"] in _FINAL]
            state = {"state": _FINAL[final[-1]] if final else "unknown"}
        tried = [a for a in attempts if a["rcpt"] == rcpt]
        recipients.append({"email": rcpt, "attempts": len(tried), **state})
    doc["recipients"] = recipients
    doc["attempts"] = attempts
    for e in events:
        e["at"] = _iso(e["at"])
    doc["events"] = events
    return doc
