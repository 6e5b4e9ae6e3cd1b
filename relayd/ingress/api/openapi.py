"""The API's OpenAPI 3.1 document, built from the same msgspec types that decode the requests
(so that the document cannot drift from what the server accepts). ``python -m
relayd.ingress.api.openapi`` writes it; docs/openapi.json is that output, kept in the repo and
checked against it by the tests."""

from __future__ import annotations

import json
import sys
from typing import Any

import msgspec

from relayd.campaigns.spec import CampaignAdd
from relayd.events.records import Type
from relayd.ingress.api import contacts_schema
from relayd.ingress.api.schema import (
    Conversion,
    KumoInject,
    Send,
    SuppressionAdd,
    WebhookAdd,
    WebhookEnable,
    WebhookRotate,
)

_PROBLEM = {
    "type": "object",
    "description": "RFC 9457 problem details; `field` names the request field at fault.",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "field": {"type": "string"},
    },
    "required": ["title", "status", "detail"],
}
_RESULT = {
    "type": "object",
    "properties": {
        "email": {"type": "string"},
        "message_id": {"type": ["string", "null"], "description": "the queue id"},
        "status": {"enum": ["queued", "rejected", "suppressed"]},
        "error": {"type": ["string", "null"]},
    },
}


_STATUS = {
    "enum": ["pass", "warn", "fail", "error"],
    "description": "error: not checked, a DNS lookup failed (timeout, SERVFAIL)",
}
_DOMAIN_CHECK = {
    "type": "object",
    "description": "relayctl check-domain --json: one item per thing checked, in order",
    "properties": {
        "domain": {"type": "string"},
        "return_path_domain": {"type": "string", "description": "where SPF was checked"},
        "status": {**_STATUS, "description": "the worst item's"},
        "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "check": {
                        "enum": [
                            "sources",
                            "spf",
                            "dkim",
                            "dmarc",
                            "alignment",
                            "ptr",
                            "mta-sts",
                            "tls-rpt",
                            "bulk-sender",
                        ]
                    },
                    "subject": {"type": "string", "description": "an address, a DNS name"},
                    "status": _STATUS,
                    "detail": {"type": "string"},
                    "fix": {
                        "type": ["string", "null"],
                        "description": "the DNS record to publish (zone-file line), or the"
                        " command or config change",
                    },
                },
                "required": ["check", "subject", "status", "detail", "fix"],
            },
        },
    },
    "required": ["domain", "return_path_domain", "status", "counts", "items"],
}


def _problems(*codes: int) -> dict[str, Any]:
    ref = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    texts = {
        400: "malformed request",
        401: "missing or unknown API key",
        403: "the key lacks the scope, sender or network",
        404: "no such resource",
        409: "a name already taken, or in use; a campaign's state that does not allow it",
        413: "body too large",
        415: "not JSON",
        422: "a field is invalid (named in `field`)",
        429: "the key's rate is spent (see Retry-After)",
        503: "the spool is short of room (see Retry-After)",
    }
    return {str(c): {"description": texts[c], "content": ref} for c in codes}


def document() -> dict[str, Any]:
    (send, kumo, hook, rotate, enable, suppress, campaign), components = (
        msgspec.json.schema_components(
            [Send, KumoInject, WebhookAdd, WebhookRotate, WebhookEnable, SuppressionAdd,
             CampaignAdd],
            ref_template="#/components/schemas/{name}",
        )
    )  # fmt: skip
    ident = [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}]
    endpoint = {"description": "the endpoint with its health (state, backlog, failures, dropped)"}
    components.update(Problem=_PROBLEM, Result=_RESULT, DomainCheck=_DOMAIN_CHECK)
    from relayd.ingress.api import templates  # it builds on the service, which imports this

    template_paths, template_schemas = templates.openapi(_problems)
    components.update(template_schemas)
    bearer = [{"apiKey": []}]
    json_body = lambda schema: {  # noqa: E731
        "required": True,
        "content": {"application/json": {"schema": schema}},
    }
    contact_paths, contact_components = contacts_schema.paths(_problems, json_body)
    components.update(contact_components)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "relayd sending API",
            "version": "1",
            "description": "Send mail through relayd and learn what became of each recipient."
            " Every answer that is not 2xx is an RFC 9457 problem document.",
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
        "security": bearer,
        "paths": {
            **template_paths,
            "/v1/messages": {
                "post": {
                    "summary": "Queue one message, or one template per recipient",
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "schema": {"type": "string", "maxLength": 255},
                            "description": "the same key and body within 24 h returns the"
                            " first answer again and queues nothing",
                        }
                    ],
                    "requestBody": json_body(send),
                    "responses": {
                        "202": {
                            "description": "committed to the spool; one result per recipient",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {
                                            "results": {
                                                "type": "array",
                                                "items": {"$ref": "#/components/schemas/Result"},
                                            },
                                            "queued": {"type": "integer"},
                                            "rejected": {"type": "integer"},
                                            "suppressed": {"type": "integer"},
                                        },
                                    }
                                }
                            },
                        },
                        **_problems(400, 401, 403, 413, 415, 422, 429, 503),
                    },
                }
            },
            "/api/inject/v1": {
                "post": {
                    "summary": "KumoMTA's inject/v1, accepted as it is",
                    "requestBody": json_body(kumo),
                    "responses": {
                        "200": {"description": "success_count, fail_count, failed_recipients"},
                        **_problems(400, 401, 403, 413, 415, 422, 429, 503),
                    },
                }
            },
            "/v1/messages/{id}": {
                "get": {
                    "summary": "A message: envelope, recipients' states, attempts, events",
                    "parameters": [
                        {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
                    ],
                    "responses": {
                        "200": {"description": "the message's status"},
                        **_problems(401, 403, 404),
                    },
                }
            },
            "/v1/events": {
                "get": {
                    "summary": "The event log, paged by a stable cursor",
                    "parameters": [
                        {"name": n, "in": "query", "schema": s}
                        for n, s in (
                            ("after", {"type": "integer", "minimum": 0}),
                            ("type", {"type": "string", "description": _TYPES}),
                            ("recipient", {"type": "string"}),
                            ("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
                        )
                    ],
                    "responses": {
                        "200": {"description": "events, and `next`: the cursor to ask after"},
                        **_problems(401, 403, 422),
                    },
                }
            },
            "/v1/webhooks": {
                "get": {
                    "summary": "The webhook endpoints and their health (scope webhooks)",
                    "responses": {
                        "200": {"description": "webhooks: a list"},
                        **_problems(401, 403),
                    },
                },
                "post": {
                    "summary": "Add an endpoint; its whsec_ secret is in this answer only",
                    "requestBody": json_body(hook),
                    "responses": {"201": endpoint, **_problems(400, 401, 403, 422)},
                },
            },
            "/v1/webhooks/{id}": {
                "parameters": ident,
                "get": {"summary": "One endpoint", "responses": {"200": endpoint}},
                "delete": {"summary": "Remove an endpoint", "responses": {"200": endpoint}},
            },
            "/v1/webhooks/{id}/rotate": {
                "parameters": ident,
                "post": {
                    "summary": "A new secret; the old one also signs for `overlap` seconds",
                    "requestBody": json_body(rotate),
                    "responses": {"200": endpoint, **_problems(401, 403, 404, 422)},
                },
            },
            "/v1/webhooks/{id}/enable": {
                "parameters": ident,
                "post": {
                    "summary": "Back on: from its cursor, or from now",
                    "requestBody": json_body(enable),
                    "responses": {"200": endpoint, **_problems(401, 403, 404)},
                },
            },
            "/v1/webhooks/{id}/disable": {
                "parameters": ident,
                "post": {"summary": "Stop posting", "responses": {"200": endpoint}},
            },
            "/v1/suppressions": {
                "get": {
                    "summary": "Suppressed addresses in force (scope suppressions): a key sees"
                    " the global entries, its own (key:NAME) and its sender domains'",
                    "parameters": [
                        {"name": n, "in": "query", "schema": s}
                        for n, s in (
                            ("scope", {"type": "string", "description": "global, domain:D, key:N"}),
                            ("reason", {"enum": ["bounce", "complaint", "unsubscribe", "manual"]}),
                            ("email", {"type": "string"}),
                            ("after", {"type": "string", "description": "`next` of a page"}),
                            ("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
                        )
                    ],
                    "responses": {
                        "200": {"description": "suppressions: a page; next: cursor or null"},
                        **_problems(401, 403, 422),
                    },
                },
                "post": {
                    "summary": "Suppress addresses (scope default: the key's own); global"
                    " entries need the admin scope",
                    "requestBody": json_body(suppress),
                    "responses": {
                        "201": {"description": "added: how many entries were new or renewed"},
                        **_problems(400, 401, 403, 422),
                    },
                },
            },
            "/v1/suppressions/{email}": {
                "delete": {
                    "summary": "Mail an address again, in one scope (default: the key's own)",
                    "parameters": [
                        {
                            "name": "email",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        {"name": "scope", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": {"description": "removed"},
                        **_problems(401, 403, 404, 422),
                    },
                }
            },
            "/v1/domains/{domain}/check": {
                "get": {
                    "summary": "SPF, DKIM, DMARC, PTR, MTA-STS and TLS-RPT of a sending domain,"
                    " and the bulk-sender checklist (scope read; a domain the key may send as)",
                    "parameters": [
                        {
                            "name": "domain",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "return_path_domain",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "the envelope sender's domain, when not `domain`",
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "the report; `status` fail or error: not ready",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/DomainCheck"}
                                }
                            },
                        },
                        **_problems(401, 403, 422),
                    },
                }
            },
            **contact_paths,
            **_campaigns(json_body(campaign), ident),
            "/unsubscribe/{token}": _unsubscribe(),
            **_reports(components),
            "/t/o/{token}.gif": _tracking("open"),
            "/t/c/{token}": _tracking("click"),
            "/v1/openapi.json": {
                "get": {"summary": "This document", "security": [], "responses": {"200": {}}}
            },
        },
    }


def _reports(components: dict[str, Any]) -> dict[str, Any]:
    """Campaign reports (relayd.ingress.api.reports): the JSON report, conversions, the page."""
    (conversion,), more = msgspec.json.schema_components(
        [Conversion], ref_template="#/components/schemas/{name}"
    )
    components.update(more)
    ident = [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}]
    html = {"text/html": {"schema": {"type": "string"}}}
    return {
        "/v1/campaigns/{id}/report": {
            "get": {
                "summary": "A campaign's report: per variant sent, delivered, deferred, bounced"
                " (by class), suppressed, opened, clicked, converted, unsubscribed, complained"
                " with their rates; the A/B comparison by the campaign's criterion (z, p,"
                " significant, winner); the series per minute. Scope campaigns or read",
                "parameters": ident,
                "responses": {
                    "200": {"description": "the report (relayctl report ID --json prints it)"},
                    **_problems(401, 403, 404),
                },
            }
        },
        "/v1/campaigns/{id}/conversions": {
            "post": {
                "summary": "Report that a campaign's contact converted (the criterion"
                " conversion counts each contact once): a `converted` event with the message's"
                " meta. Scope campaigns",
                "parameters": ident,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": conversion}},
                },
                "responses": {
                    "201": {"description": "recorded: campaign, variant, rcpt, message_id"},
                    **_problems(400, 401, 403, 404, 422),
                },
            }
        },
        "/ui/campaigns/{id}": {
            "get": {
                "summary": "The report page: the figures, a bar chart of each variant's rates"
                " and a line chart over time (inline SVG). An API key (scope campaigns or read)"
                " or the cookie a login link sets",
                "parameters": ident,
                "responses": {
                    "200": {"description": "the page", "content": html},
                    "401": {"description": "a page saying how to log in", "content": html},
                },
            }
        },
        "/ui/login/{token}": {
            "get": {
                "summary": "A login link (relayctl report ID --url): sets an HttpOnly,"
                " SameSite=Strict cookie for the campaign's page and redirects there",
                "security": [],
                "parameters": [
                    {"name": "token", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "303": {"description": "to /ui/campaigns/{id}, with the cookie"},
                    "401": {"description": "a forged, altered or expired link", "content": html},
                },
            }
        },
    }


def _campaigns(body: dict[str, Any], ident: list[dict[str, Any]]) -> dict[str, Any]:
    """Scope campaigns; a key sees and controls its own campaigns, an admin key everyone's."""
    one = {"description": "the campaign: state, phase, winner, variants, times"}
    shown = {"description": "the campaign with `progress`: total, queued, suppressed, failed,"
             " remaining, and `delivery`: its mail in the spool by state, and sent"}  # fmt: skip
    paths: dict[str, Any] = {
        "/v1/campaigns": {
            "get": {
                "summary": "The campaigns with their states",
                "responses": {"200": {"description": "campaigns: a list"}, **_problems(401, 403)},
            },
            "post": {
                "summary": "Make a campaign to a list or segment, now or at send_at; its"
                " templates are compiled first (a template error is a 422 with `line` and"
                " `column`) and nothing is stored when anything is wrong",
                "requestBody": body,
                "responses": {"201": one, **_problems(400, 401, 403, 415, 422)},
            },
        },
        "/v1/campaigns/{id}": {
            "parameters": ident,
            "get": {
                "summary": "A campaign and its live progress",
                "responses": {"200": shown, **_problems(401, 403, 404)},
            },
        },
    }
    for action, text in (
        ("pause", "No new batches; its queued, undelivered mail is held"),
        ("resume", "Its held mail released; sending goes on"),
        ("cancel", "Stopped for good; its undelivered mail removed, without DSNs"),
    ):
        paths[f"/v1/campaigns/{{id}}/{action}"] = {
            "parameters": ident,
            "post": {"summary": text, "responses": {"200": one, **_problems(401, 403, 404, 409)}},
        }
    return paths


_TYPES = "comma list of event types: " + ", ".join(t.value for t in Type)


def _tracking(kind: str) -> dict[str, Any]:
    """The open pixel and the click links of [tracking]: no API key (the signed token is the
    credential)."""
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    if kind == "open":
        summary = "The open pixel: an `opened` event; the token may end in .gif"
        ok = {"200": {"description": "a 1x1 GIF, never cached", "content": {"image/gif": {}}}}
    else:
        summary = "A tracked link: a `clicked` event and a redirect to its target"
        ok = {"302": {"description": "to the link's target (Location)"}}
    get = {
        "summary": summary,
        "security": [],
        "responses": {
            **ok,
            "404": {"description": "a forged, altered or truncated token", "content": problem},
            "405": {"description": "neither GET nor HEAD", "content": problem},
        },
    }
    return {
        "description": "Tracking links ([tracking]) in HTML mail: the path is that of"
        " [tracking] base_url (here its example's, /t), then /o/ (opens) or /c/ (clicks) and"
        " the token. Mail clients and recipients follow them, without an API key; HEAD too.",
        "parameters": [
            {"name": "token", "in": "path", "required": True, "schema": {"type": "string"}}
        ],
        "get": get,
    }


# The bodies RFC 8058's POST comes in: a form, URL-encoded, or multipart as some clients send it.
FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")


def _unsubscribe() -> dict[str, Any]:
    """The links of bulk mail: no API key (the signed token is the credential)."""
    html = {"text/html": {"schema": {"type": "string"}}}
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    form = {
        "type": "object",
        "properties": {"List-Unsubscribe": {"const": "One-Click"}},
        "required": ["List-Unsubscribe"],
    }
    return {
        "description": "One-click unsubscribe (RFC 8058), where List-Unsubscribe leads: the"
        " path is that of [unsubscribe] url (here its example, /unsubscribe/), followed by the"
        " token. Mail clients and recipients call it, without an API key.",
        "parameters": [
            {"name": "token", "in": "path", "required": True, "schema": {"type": "string"}}
        ],
        "get": {
            "summary": "A page saying which address would be unsubscribed from whom, with the"
            " button that posts; changes nothing (HEAD too)",
            "security": [],
            "responses": {
                "200": {"description": "the page", "content": html},
                "400": {"description": "the link is forged, altered or expired", "content": html},
            },
        },
        "post": {
            "summary": "Unsubscribe: an `unsubscribed` event and a suppression entry in the"
            " token's scope that never lapses; again: 200, nothing more",
            "security": [],
            "requestBody": {
                "required": True,
                "content": {kind: {"schema": form} for kind in FORMS},
            },
            "responses": {
                "200": {"description": "unsubscribed (a page saying so)", "content": html},
                "400": {
                    "description": "a forged, altered or expired token (`field` token), or"
                    " another body (`field` List-Unsubscribe)",
                    "content": problem,
                },
                "405": {"description": "neither GET, HEAD nor POST", "content": problem},
                "415": {"description": "not a form", "content": problem},
            },
        },
    }


if __name__ == "__main__":
    json.dump(document(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
