"""The campaigns API (scope "campaigns"): make a campaign (checked whole, its templates
compiled, before anything is stored), list and show them with live progress, pause, resume
and cancel. A key sees and controls its own campaigns; an admin key everyone's."""

from __future__ import annotations

import json
import re
from typing import Any

from relayd.campaigns import spec
from relayd.events.log import emit, log
from relayd.ingress.api import compose, service
from relayd.ingress.api.schema import TrackingOptions
from relayd.ingress.api.service import Api, Refused, Reply, Request
from relayd.ingress.credentials import Credential
from relayd.spool import campaigns as sql

_ONE = re.compile(r"^/v1/campaigns/(\d{1,18})(?:/(pause|resume|cancel))?$")


async def handle(api: Api, req: Request, cred: Credential) -> Reply:
    owner = cred.account
    sees = None if "admin" in cred.scopes else owner  # whose campaigns it sees
    if req.path == "/v1/campaigns":
        if req.method == "GET":
            found = await api.reader.run(sql.listing, sees)
            return _json(200, {"campaigns": [spec.describe(c) for c in found]})
        service._allow(req.method, "POST")
        return await _create(api, req, cred)
    m = _ONE.match(req.path)
    if m is None:
        raise Refused(404, "Not found", f"no resource {req.path}")
    campaign_id, action = int(m.group(1)), m.group(2)
    if action is None:
        service._allow(req.method, "GET")
        found, progress = await api.reader.run(_show, sees, campaign_id)
        if found is None:
            raise Refused(404, "Not found", f"no campaign {campaign_id}")
        return _json(200, spec.describe(found, progress))
    service._allow(req.method, "POST")
    try:
        found, events = await api.reader.write(sql.control, sees, campaign_id, action, api.clock())
    except sql.NotFound:
        raise Refused(404, "Not found", f"no campaign {campaign_id}") from None
    except sql.Conflict as exc:
        raise Refused(409, "Conflict", str(exc), "state", state=exc.state) from None
    emit(events)
    log.info("campaign_changed", key=cred.name, campaign=campaign_id, action=action)
    if action == "resume":
        api.campaigns_changed()
    return _json(200, spec.describe(found))


async def _create(api: Api, req: Request, cred: Credential) -> Reply:
    ctype = req.headers.get("content-type", "application/json").split(";")[0].strip()
    if ctype != "application/json":
        raise Refused(415, "Unsupported media type", "send application/json", "content-type")
    given = service._decode(req.body, spec.CampaignAdd)
    try:
        address = compose.address_of(given.sender, "from").email
    except compose.Invalid as exc:
        raise Refused(422, "Invalid request", exc.problem, exc.field) from None
    if "admin" not in cred.scopes and not cred.may_send_as(address):
        raise Refused(403, "Forbidden", f"{address} is not a sender of key {cred.name}", "from")
    if not cred.tracking:  # a key without tracking: none for its campaigns either
        given.tracking = TrackingOptions(opens=False, clicks=False)
    min_wait = api.settings.config.campaigns.min_wait
    try:
        found, event = await api.reader.write(spec.add, given, cred.account, api.clock(), min_wait)
    except spec.SpecError as exc:
        if exc.line is None:
            raise Refused(422, "Invalid request", exc.problem, exc.field) from None
        detail = f"template error at line {exc.line}, column {exc.column}: {exc.problem}"
        raise Refused(
            422, "Invalid request", detail, exc.field, line=exc.line, column=exc.column
        ) from None
    emit([event])
    log.info("campaign_added", key=cred.name, campaign=found["id"], name=found["name"])
    api.campaigns_changed()
    return _json(201, spec.describe(found))


def _show(conn: Any, owner: str | None, campaign_id: int) -> tuple[Any, Any]:
    found = sql.get(conn, owner, campaign_id)
    return found, None if found is None else sql.progress(conn, campaign_id)


def _json(status: int, doc: Any) -> Reply:
    return Reply(status, json.dumps(doc).encode())
