"""The contact API's request bodies (msgspec types) and its part of the OpenAPI document,
built from the same types (relayd.ingress.api.contacts serves it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec


class ListAdd(msgspec.Struct, forbid_unknown_fields=True):
    name: str


class ContactIn(msgspec.Struct, forbid_unknown_fields=True):
    """One contact of an import: a known address gets its attributes merged (these win)."""

    email: str
    attributes: dict[str, Any] = {}


class ContactPatch(msgspec.Struct, forbid_unknown_fields=True):
    """Attributes merged into the contact (RFC 7396: null removes one)."""

    attributes: dict[str, Any]


class SegmentAdd(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    list_id: int
    filter: dict[str, Any]  # relayd.contacts.segments: all/any/not of {attr, op, value}


def paths(
    problems: Callable[..., dict[str, Any]], json_body: Callable[[Any], dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The paths and the component schemas they refer to (scope campaigns)."""
    (list_add, contact_in, patch, segment_add), components = msgspec.json.schema_components(
        [ListAdd, ContactIn, ContactPatch, SegmentAdd], ref_template="#/components/schemas/{name}"
    )
    ident = [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}]
    email = [{"name": "email", "in": "path", "required": True, "schema": {"type": "string"}}]
    rejected = {
        "type": "array",
        "description": "the first 1000 bad rows: line (CSV) or index (JSON), field, problem",
        "items": {
            "type": "object",
            "properties": {
                "line": {"type": "integer"},
                "index": {"type": "integer"},
                "field": {"type": "string"},
                "problem": {"type": "string"},
            },
        },
    }
    imported = {
        "type": "object",
        "properties": {
            "imported": {"type": "integer", "description": "new contacts"},
            "updated": {"type": "integer", "description": "known ones, attributes merged"},
            "rejected": rejected,
            "rejected_count": {"type": "integer"},
        },
    }
    found = {
        "get": {
            "summary": "Contact lists of the key (an admin key: every owner's) with their sizes",
            "responses": {"200": {"description": "lists"}, **problems(401, 403)},
        },
        "post": {
            "summary": "Add a contact list",
            "requestBody": json_body(list_add),
            "responses": {"201": {"description": "the list"}, **problems(400, 401, 403, 409, 422)},
        },
    }
    doc = {
        "/v1/lists": found,
        "/v1/lists/{id}": {
            "parameters": ident,
            "get": {
                "summary": "A list: size and the attribute names its contacts have had",
                "responses": {"200": {"description": "the list"}, **problems(401, 403, 404)},
            },
            "delete": {
                "summary": "Delete a list and its segments (the contacts stay)",
                "responses": {
                    "200": {"description": "the deleted list"},
                    **problems(401, 403, 404, 409),
                },
            },
        },
        "/v1/lists/{id}/contacts": {
            "parameters": ident,
            "post": {
                "summary": "Import contacts: a JSON array of {email, attributes}, or text/csv"
                " (header row = attribute names, one column email). Bad rows are rejected by"
                " line or index; the good ones are imported",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"type": "array", "items": contact_in}},
                        "text/csv": {"schema": {"type": "string"}},
                    },
                },
                "responses": {
                    "200": {
                        "description": "what was imported",
                        "content": {"application/json": {"schema": imported}},
                    },
                    **problems(400, 401, 403, 404, 413, 415, 422),
                },
            },
            "get": {
                "summary": "A page of the list's contacts (with status: active, unsubscribed,"
                " bounced, complained), in id order",
                "parameters": [
                    {"name": "after", "in": "query", "schema": {"type": "integer"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "maximum": 1000},
                    },
                ],
                "responses": {
                    "200": {"description": "contacts; next: the `after` of the next page, or null"},
                    **problems(401, 403, 404, 422),
                },
            },
        },
        "/v1/contacts/{email}": {
            "parameters": email,
            "get": {
                "summary": "A contact: attributes, lists, status (from the suppression list)",
                "responses": {"200": {"description": "the contact"}, **problems(401, 403, 404)},
            },
            "patch": {
                "summary": "Merge attributes (null removes one)",
                "requestBody": json_body(patch),
                "responses": {
                    "200": {"description": "the contact"},
                    **problems(400, 401, 403, 404, 422),
                },
            },
            "delete": {
                "summary": "Unsubscribe: a suppression entry (reason unsubscribe) in the key's"
                " scope; the contact stays, with status unsubscribed",
                "responses": {"200": {"description": "unsubscribed"}, **problems(401, 403, 404)},
            },
        },
        "/v1/segments": {
            "get": {
                "summary": "Segments with their sizes",
                "responses": {"200": {"description": "segments"}, **problems(401, 403)},
            },
            "post": {
                "summary": "Add a segment: a list narrowed by a filter over attributes (all, any,"
                " not; ops eq ne lt le gt ge in contains exists). An attribute no contact of the"
                " list has is a 422 naming its path, e.g. filter.all[1].attr",
                "requestBody": json_body(segment_add),
                "responses": {
                    "201": {"description": "the segment with its size"},
                    **problems(400, 401, 403, 409, 422),
                },
            },
        },
        "/v1/segments/{id}": {
            "parameters": ident,
            "get": {
                "summary": "A segment with its size",
                "responses": {"200": {"description": "the segment"}, **problems(401, 403, 404)},
            },
        },
    }
    return doc, components
