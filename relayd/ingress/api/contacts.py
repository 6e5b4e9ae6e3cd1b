"""The contact API (scope campaigns): lists, their contacts (imported as JSON or CSV), single
contacts and segments, as relayctl manages them (relayd.ctl.contacts); the SQL is in
relayd.spool.contacts. A key sees and changes its own objects (owner "key:NAME"), an admin key
every owner's lists and segments. Imports are written a batch per short transaction."""

from __future__ import annotations

import asyncio
import io
import json
import re
import sqlite3
from typing import Any

import msgspec

from relayd.contacts import Collector, Invalid, address, attributes, csvimport, from_items
from relayd.events.log import log
from relayd.ingress.api.contacts_schema import ContactPatch, ListAdd, SegmentAdd
from relayd.ingress.api.service import (
    MAX_PAGE,
    Api,
    Refused,
    Reply,
    Request,
    _allow,
    _decode,
    _int_param,
)
from relayd.ingress.credentials import Credential
from relayd.spool import contacts as store

_LIST = re.compile(r"^/v1/lists/(\d{1,18})(/contacts)?$")
_CONTACT = re.compile(r"^/v1/contacts/([^/]{1,254})$")
_SEGMENT = re.compile(r"^/v1/segments/(\d{1,18})$")
MAX_NAME = 200


def handles(path: str) -> bool:
    return path in ("/v1/lists", "/v1/segments") or any(
        p.match(path) for p in (_LIST, _CONTACT, _SEGMENT)
    )


async def route(api: Api, req: Request, cred: Credential) -> Reply:
    owner = cred.account
    seen = None if "admin" in cred.scopes else owner  # whose lists and segments it sees
    try:
        if req.path == "/v1/lists":
            return await _lists(api, req, owner, seen)
        if m := _LIST.match(req.path):
            list_id = int(m.group(1))
            if m.group(2):
                return await _list_contacts(api, req, cred, list_id, seen)
            if req.method == "GET":
                return _ok(await api.reader.run(store.get_list, list_id, seen))
            _allow(req.method, "DELETE")
            try:
                found = await api.reader.write(store.delete_list, list_id, seen)
            except sqlite3.IntegrityError:
                raise Refused(
                    409, "Conflict", f"a campaign sends to list {list_id}: it stays", "id"
                ) from None
            log.info("contact_list_deleted", key=cred.name, list_id=list_id)
            return _ok(found)
        if m := _CONTACT.match(req.path):
            return await _contact(api, req, cred, m.group(1))
        if req.path == "/v1/segments":
            return await _segments(api, req, cred, owner, seen)
        m = _SEGMENT.match(req.path)
        assert m is not None  # handles() said so
        _allow(req.method, "GET")
        return _ok(await api.reader.run(store.get_segment, int(m.group(1)), seen))
    except store.NotFound as exc:
        raise Refused(404, "Not found", str(exc)) from None
    except store.Conflict as exc:
        raise Refused(409, "Conflict", exc.problem, exc.field) from None


def _ok(doc: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(doc).encode())


def _name(text: str) -> str:
    text = text.strip()
    if not 1 <= len(text) <= MAX_NAME or any(c < " " for c in text):
        raise Refused(422, "Invalid request", f"1 to {MAX_NAME} printable characters", "name")
    return text


async def _lists(api: Api, req: Request, owner: str, seen: str | None) -> Reply:
    if req.method == "GET":
        return _ok({"lists": await api.reader.run(store.lists, seen)})
    _allow(req.method, "POST")
    name = _name(_decode(req.body, ListAdd).name)
    found = await api.reader.write(store.add_list, owner, name, api.clock())
    log.info("contact_list_added", owner=owner, list_id=found["id"], name=name)
    return _ok(found, 201)


def _scopes(cred: Credential, owner: str) -> list[str]:
    """The suppression scopes of a contact of ``owner`` (with the key's sender domains when
    they are its own)."""
    return store.scopes(owner, cred.senders if owner == cred.account else ())


async def _list_contacts(
    api: Api, req: Request, cred: Credential, list_id: int, seen: str | None
) -> Reply:
    target = await api.reader.run(store.get_list, list_id, seen)
    if req.method == "GET":
        after = _int_param(req.query, "after", 0, 0, 2**62)
        limit = _int_param(req.query, "limit", 100, 1, MAX_PAGE)
        scopes = _scopes(cred, target["owner"])
        found = await api.reader.run(store.page, list_id, after, limit, scopes, api.clock())
        cursor = found[-1]["id"] if len(found) == limit else None
        return _ok({"contacts": found, "next": cursor})
    _allow(req.method, "POST")
    if len(req.body) > api.settings.max_body_size:
        raise Refused(
            413, "Content too large", f"the body is over {api.settings.max_body_size} bytes", "body"
        )
    kind = req.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind not in ("application/json", "text/csv"):
        raise Refused(
            415, "Unsupported media type", "send application/json or text/csv", "content-type"
        )
    loop = asyncio.get_running_loop()
    collector = Collector("line" if kind == "text/csv" else "index")
    try:
        batches = await loop.run_in_executor(None, _parse, kind, req.body, collector)
    except Invalid as exc:
        where = exc.field if exc.field.startswith("line") else ""
        detail = f"{where}: {exc.problem}" if where else exc.problem
        raise Refused(422, "Invalid request", detail, "body" if where else exc.field) from None
    imported = updated = 0
    for batch in batches:  # each its own short transaction: the daemon's writer goes between
        new, known = await api.reader.write(
            store.add_batch, target["owner"], list_id, batch.rows, batch.names, api.clock()
        )
        imported, updated = imported + new, updated + known
    log.info(
        "contacts_imported",
        key=cred.name,
        list_id=list_id,
        imported=imported,
        updated=updated,
        rejected=collector.rejected_count,
    )
    return _ok(
        {
            "imported": imported,
            "updated": updated,
            "rejected": collector.rejected,
            "rejected_count": collector.rejected_count,
        }
    )


def _parse(kind: str, body: bytes, collector: Collector) -> list:
    if kind == "text/csv":
        text = io.StringIO(body.decode("utf-8-sig", "surrogateescape"), newline="")
        return list(csvimport.batches(text, collector))
    try:
        items = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise Refused(400, "Bad request", f"not JSON: {exc}", "body") from None
    return from_items(items, collector)


async def _contact(api: Api, req: Request, cred: Credential, raw: str) -> Reply:
    try:
        addr = address(raw)
    except Invalid as exc:
        raise Refused(422, "Invalid request", exc.problem, "email") from None
    owner, now = cred.account, api.clock()
    scopes = _scopes(cred, owner)
    if req.method == "GET":
        return _ok(await api.reader.run(store.contact, owner, addr, scopes, now))
    if req.method == "PATCH":
        attrs = _decode(req.body, ContactPatch).attributes
        try:
            attributes(attrs, "attributes")
        except Invalid as exc:
            raise Refused(422, "Invalid request", exc.problem, exc.field) from None
        found = await api.reader.write(store.patch, owner, addr, attrs, scopes, now)
        return _ok(found)
    _allow(req.method, "DELETE")
    done = await api.reader.write(store.unsubscribe, owner, addr, now, True)
    log.info("contact_unsubscribed", key=cred.name, rcpt=addr, scope=done["scope"])
    return _ok(done)


async def _segments(
    api: Api, req: Request, cred: Credential, owner: str, seen: str | None
) -> Reply:
    if req.method == "GET":
        return _ok({"segments": await api.reader.run(store.segments_of, seen)})
    _allow(req.method, "POST")
    add = _decode(req.body, SegmentAdd)
    name = _name(add.name)
    try:
        found = await api.reader.write(
            store.add_segment, owner, name, add.list_id, add.filter, api.clock()
        )
    except Invalid as exc:  # raised inside the transaction: rolled back, nothing stored
        raise Refused(422, "Invalid request", exc.problem, exc.field) from None
    except store.NotFound as exc:
        raise Refused(422, "Invalid request", str(exc), "list_id") from None
    log.info("segment_added", key=cred.name, segment_id=found["id"], list_id=add.list_id)
    return _ok(found, 201)
