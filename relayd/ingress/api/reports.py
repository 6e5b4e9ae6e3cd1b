"""Campaign reports over HTTP: GET /v1/campaigns/{id}/report (the report as JSON), POST
/v1/campaigns/{id}/conversions (an application reports a conversion, for the "conversion"
criterion), and the report page GET /ui/campaigns/{id} with its login GET /ui/login/{token}.
The page takes an API key (scope campaigns or read, the campaign's owner or an admin) or the
cookie a login link sets: relayctl report ID --url signs the link with the spool's secret,
for one campaign and a short while; the cookie it is exchanged for (HttpOnly, SameSite=Strict,
for that page's path only) is signed too, and lasts reports.session_max_age."""

from __future__ import annotations

import json
import re
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING

from relayd.campaigns import page, report, stats
from relayd.events.log import emit, log
from relayd.feedback.tokens import SESSION, BadToken
from relayd.ingress.api.schema import Conversion
from relayd.ingress.api.service import Refused, Reply, Request, _allow, _decode
from relayd.ingress.credentials import Credential
from relayd.ingress.smtp import valid_address

if TYPE_CHECKING:
    from relayd.ingress.api.service import Api

_API = re.compile(r"^/v1/campaigns/(\d{1,18})/(report|conversions)$")
_PAGE = re.compile(r"^/ui/campaigns/(\d{1,18})$")
_LOGIN = re.compile(r"^/ui/login/([A-Za-z0-9_-]{1,64})$")
COOKIE = "relayd_report"
_QUEUE_ID = re.compile(r"^[0-9A-Fa-f]{1,32}$")


async def route(api: Api, req: Request) -> Reply | None:
    """The answer to a request on one of these paths; None for any other path."""
    if m := _API.match(req.path):
        campaign = int(m.group(1))
        if m.group(2) == "report":
            _allow(req.method, "GET")
            return await _report(api, req, campaign)
        _allow(req.method, "POST")
        return await _conversion(api, req, api._key(req, "campaigns"), campaign)
    if m := _PAGE.match(req.path):
        _allow(req.method, "GET")
        return await _page(api, req, int(m.group(1)))
    if m := _LOGIN.match(req.path):
        _allow(req.method, "GET")
        return _login(api, req, m.group(1))
    return None


def _reader_key(api: Api, req: Request) -> Credential:
    """A key with the campaigns scope, or the read scope."""
    try:
        return api._key(req, "campaigns")
    except Refused as exc:
        if exc.status != 403 or exc.field != "scope":
            raise
        return api._key(req, "read")


async def _found(api: Api, cred: Credential | None, campaign: int) -> dict:
    """The campaign's report, for its owner or an admin (a login names its one campaign)."""
    doc = await api.reader.run(report.report, campaign)
    if doc is None or not (
        cred is None or "admin" in cred.scopes or doc["campaign"]["owner"] == cred.account
    ):  # another owner's: as if there were none
        raise Refused(404, "Not found", f"no campaign {campaign}", "id")
    return doc


async def _report(api: Api, req: Request, campaign: int) -> Reply:
    doc = await _found(api, _reader_key(api, req), campaign)
    return Reply(200, json.dumps(doc).encode())


async def _conversion(api: Api, req: Request, cred: Credential, campaign: int) -> Reply:
    given = _decode(req.body, Conversion)
    if (given.email is None) == (given.message_id is None):
        raise Refused(422, "Invalid request", "give email or message_id (one of them)", "email")
    email, message_id = "", ""
    if given.message_id is not None:
        if not _QUEUE_ID.match(given.message_id):
            raise Refused(422, "Invalid request", "not a message id", "message_id")
        message_id = given.message_id
    else:
        email = (given.email or "").strip().lower()
        if not valid_address(email, True):
            raise Refused(422, "Invalid request", f"not an address: {given.email!r}", "email")
    await _found(api, cred, campaign)
    event = await api.reader.write(stats.conversion, campaign, api.clock(), email, message_id)
    if event is None:
        whom = f"message {message_id}" if message_id else email
        raise Refused(404, "Not found", f"campaign {campaign} sent nothing to {whom}", "email")
    emit([event])
    answer = {"campaign": campaign, "message_id": event.queue_id, **event.data}
    answer.pop("meta", None)
    return Reply(201, json.dumps(answer).encode())


async def _page(api: Api, req: Request, campaign: int) -> Reply:
    if "authorization" in req.headers:
        cred: Credential | None = _reader_key(api, req)
    else:
        problem = _session(api, req, campaign)
        if problem:
            return Reply(401, page.login(str(campaign), problem), "text/html", page.HEADERS)
        cred = None
    doc = await _found(api, cred, campaign)
    return Reply(200, page.render(doc), "text/html", page.HEADERS)


def _session(api: Api, req: Request, campaign: int) -> str:
    """Why the request's cookie does not let it see the campaign's page ("": it does)."""
    try:
        jar = SimpleCookie(req.headers.get("cookie", ""))
    except CookieError:
        jar = SimpleCookie()
    morsel = jar.get(COOKIE)
    if morsel is None:
        return "You are not logged in."
    cfg = api.settings.config.reports
    try:
        allowed = api.tokens.logged_in(morsel.value, api.clock(), cfg.session_max_age, SESSION)
    except BadToken as exc:
        return f"Your login does not work: {exc}."
    return "" if allowed == campaign else "Your login is for another campaign."


def _login(api: Api, req: Request, token: str) -> Reply:
    """A login link: the cookie for its campaign's page, and a redirect there."""
    cfg, now = api.settings.config.reports, api.clock()
    try:
        campaign = api.tokens.logged_in(token, now, cfg.login_max_age)
    except BadToken as exc:
        log.info("report_login_refused", client=req.client, error=str(exc))
        problem = f"This login link does not work: {exc}."
        return Reply(401, page.login("ID", problem), "text/html", page.HEADERS)
    where = f"/ui/campaigns/{campaign}"
    cookie = SimpleCookie()
    cookie[COOKIE] = api.tokens.login(campaign, now, SESSION)
    morsel = cookie[COOKIE]
    morsel.update({"path": where, "httponly": True, "samesite": "Strict"})
    morsel["max-age"] = str(int(cfg.session_max_age))
    morsel["secure"] = cfg.base_url(api.settings.config.listeners).startswith("https:")
    log.info("report_login", client=req.client, campaign=campaign)
    headers = {**page.HEADERS, "Location": where, "Set-Cookie": morsel.OutputString()}
    return Reply(303, b"", "text/html", headers)
