"""The SQL of the ``templates`` table: versioned templates, one row per version (a change is a
new version, never a rewrite, so that a campaign sent with version 3 can always be shown as it
was). An owner is a credential as messages name it ("key:NAME"), or "" for the operator's."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Template:
    owner: str
    name: str
    version: int
    kind: str  # "html" or "mjml" (the source is in ``html`` either way)
    subject: str
    from_name: str
    html: str
    text: str  # "" = made from the HTML
    defaults: dict[str, Any]
    created: float

    def as_json(self) -> dict[str, Any]:
        """The API's view: the source under the name of its kind (html or mjml)."""
        return {
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "subject": self.subject,
            "from_name": self.from_name,
            self.kind: self.html,
            "text": self.text,
            "defaults": self.defaults,
            "created": self.created,
        }


_COLUMNS = "owner, name, version, kind, subject, from_name, html, text, defaults, created"


def add(
    conn: sqlite3.Connection,
    owner: str,
    name: str,
    kind: str,
    subject: str,
    from_name: str,
    html: str,
    text: str,
    defaults: dict[str, Any],
    now: float,
) -> int:
    """A new version of the template (1 for a new name); returns its number. Run it in a
    write transaction: the version is read and written under one lock."""
    (version,) = conn.execute(
        "SELECT coalesce(max(version), 0) + 1 FROM templates WHERE owner = ? AND name = ?",
        (owner, name),
    ).fetchone()
    conn.execute(
        f"INSERT INTO templates ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (owner, name, version, kind, subject, from_name, html, text, json.dumps(defaults), now),
    )
    return int(version)


def get(
    conn: sqlite3.Connection, owner: str, name: str, version: int | None = None
) -> Template | None:
    """A version of the template, the latest when ``version`` is None."""
    if version is None:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM templates WHERE owner = ? AND name = ?"
            " ORDER BY version DESC LIMIT 1",
            (owner, name),
        ).fetchone()
    else:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM templates WHERE owner = ? AND name = ? AND version = ?",
            (owner, name, version),
        ).fetchone()
    return _template(row) if row is not None else None


def listing(conn: sqlite3.Connection, owner: str) -> list[dict[str, Any]]:
    """Each template of the owner, by name: its latest version, kind, subject, when that
    version was made, and how many versions are kept."""
    rows = conn.execute(
        "SELECT t.name, t.version, t.kind, t.subject, t.created, n.versions FROM templates t"
        " JOIN (SELECT name, max(version) AS latest, count(*) AS versions FROM templates"
        "       WHERE owner = ? GROUP BY name) n ON n.name = t.name AND n.latest = t.version"
        " WHERE t.owner = ? ORDER BY t.name",
        (owner, owner),
    ).fetchall()
    keys = ("name", "version", "kind", "subject", "created", "versions")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def delete(conn: sqlite3.Connection, owner: str, name: str) -> int:
    """Every version of the template; returns how many there were (0: no such template)."""
    cur = conn.execute("DELETE FROM templates WHERE owner = ? AND name = ?", (owner, name))
    return cur.rowcount


def _template(row: tuple[Any, ...]) -> Template:
    owner, name, version, kind, subject, from_name, html, text, defaults, created = row
    return Template(
        owner, name, version, kind, subject, from_name, html, text, json.loads(defaults), created
    )
