"""Contacts, lists and segments: CSV and JSON imports into a real spool, through relayctl (a
real process, beside a running relayd) and the API (real HTTP with keys); segment filters
compiled to SQL and checked against the same contacts in Python."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import sqlite3
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT
from test_api import Client
from test_api import api as api_server  # noqa: F401 (its fixture, by this name)

from relayd.contacts import Collector, Invalid, from_items, segments
from relayd.spool import contacts as store

NOW = 1_800_000_000.0

BAD_CSV = (
    "email,first_name,country,age\n"  # line 1
    "ann@example.net,Ann,DE,34\n"  # 2
    "not-an-address,Bob,FR,20\n"  # 3: invalid address
    "carl@example.net,Carl,DE\n"  # 4: wrong column count
    "dora@example.net,Dora,NL,17\n"  # 5
    "\n"  # 6: blank, skipped
    "ANN@example.net,Ann again,DE,35\n"  # 7: duplicate of line 2
    '"eve@example.net","Eve, Jr.",DE,0042\n'  # 8: quoted comma; 0042 stays text
)


@pytest.fixture
def campaigns(api_server) -> Client:  # noqa: F811 (the fixture imported above)
    """A running relayd with an API listener (test_api's), and two keys with the campaigns
    scope."""
    c = api_server()
    c.news = c.key("news", "--sender", "example.test", "--scope", "campaigns")
    c.other = c.key("other", "--sender", "other.test", "--scope", "campaigns")
    return c


def test_relayctl_imports_the_good_rows_of_a_bad_csv_and_reports_the_bad_ones_by_line(
    campaigns: Client, tmp_path: Path
):
    r = campaigns.relay
    assert "list 1 'news' added" in r.ctl("list", "add", "news").stdout
    path = tmp_path / "contacts.csv"
    path.write_text(BAD_CSV)
    done = r.ctl("contacts", "import", "news", str(path), check=False)
    assert done.returncode == 1  # rows were rejected; the good ones are in
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{path}: imported 3, updated 0, rejected 3 into list 'news'")
    assert lines[1:] == [
        f"{path}: line 3: email: not an address: 'not-an-address'",
        f"{path}: line 4: row: 3 fields, the header has 4",
        f"{path}: line 7: email: duplicate of ann@example.net (line 2)",
    ]
    shown = json.loads(r.ctl("--json", "contacts", "show", "eve@example.net").stdout)["contact"]
    assert shown["attributes"] == {"first_name": "Eve, Jr.", "country": "DE", "age": "0042"}
    assert shown["status"] == "active" and shown["lists"] == [1]
    # the same file again: known addresses are updated, the attributes merged (new ones win)
    path.write_text("email,age,plan\nann@example.net,35,pro\n")
    again = json.loads(r.ctl("--json", "contacts", "import", "news", str(path)).stdout)
    assert (again["imported"], again["updated"], again["rejected_count"]) == (0, 1, 0)
    ann = json.loads(r.ctl("--json", "contacts", "show", "ann@example.net").stdout)["contact"]
    assert ann["attributes"] == {"first_name": "Ann", "country": "DE", "age": 35, "plan": "pro"}
    (listed,) = json.loads(r.ctl("--json", "list", "ls").stdout)["lists"]
    assert listed["contacts"] == 3
    assert listed["attributes"] == ["age", "country", "first_name", "plan"]
    # a header without an email column imports nothing, and says where
    path.write_text("name,country\nx,DE\n")
    bad = r.ctl("contacts", "import", "news", str(path), check=False)
    assert bad.returncode == 1 and not bad.stdout
    assert f"{path}: line 1: exactly one column must be named email" in bad.stderr
    assert "queue is empty" in r.ctl("list").stdout  # `list` alone still shows the queue


def test_the_api_imports_csv_and_json_and_reports_rejects_by_line_or_index(campaigns: Client):
    c = campaigns
    code, _, made = c.call("POST", "/v1/lists", {"name": "news"}, token=c.news)
    assert code == 201 and made["contacts"] == 0 and made["owner"] == "key:news"
    path = f"/v1/lists/{made['id']}/contacts"
    code, _, got = c.call(
        "POST", path, BAD_CSV.encode(), token=c.news, headers={"Content-Type": "text/csv"}
    )
    assert code == 200, got
    assert (got["imported"], got["updated"], got["rejected_count"]) == (3, 0, 3)
    assert [(b["line"], b["field"]) for b in got["rejected"]] == [
        (3, "email"),
        (4, "row"),
        (7, "email"),
    ]
    items = [
        {"email": "fred@example.net", "attributes": {"country": "FR", "tags": ["a", "b"]}},
        {"email": "nope"},
        {"email": "dora@example.net", "attributes": {"age": 18}},
        {"email": "gina@example.net", "attributes": {"bad name!": 1}},
    ]
    code, _, got = c.call("POST", path, items, token=c.news)
    assert code == 200 and (got["imported"], got["updated"]) == (1, 1)
    assert [(b["index"], b["field"]) for b in got["rejected"]] == [
        (1, "email"),
        (3, "attributes.bad name!"),
    ]
    code, _, page = c.call("GET", f"{path}?limit=2", token=c.news)
    assert code == 200 and [p["email"] for p in page["contacts"]] == [
        "ann@example.net",
        "dora@example.net",
    ]
    assert page["contacts"][1]["attributes"]["age"] == 18  # updated by the JSON import
    code, _, rest = c.call("GET", f"{path}?after={page['next']}", token=c.news)
    assert [p["email"] for p in rest["contacts"]] == ["eve@example.net", "fred@example.net"]
    assert rest["next"] is None
    code, _, bad = c.call(
        "POST", path, b"name\nx\n", token=c.news, headers={"Content-Type": "text/csv"}
    )
    assert code == 422 and bad["field"] == "body" and bad["detail"].startswith("line 1: ")
    patch = {"attributes": {"age": None, "vip": True}}  # RFC 7396: null removes
    code, _, ann = c.call("PATCH", "/v1/contacts/Ann@Example.net", patch, token=c.news)
    assert code == 200 and ann["attributes"] == {"first_name": "Ann", "country": "DE", "vip": True}
    code, _, listed = c.call("GET", f"/v1/lists/{made['id']}", token=c.news)
    assert "vip" in listed["attributes"] and listed["contacts"] == 4
    code, _, bad = c.call("PATCH", "/v1/contacts/ann@example.net", {"attributes": {"a b!": 1}},
                          token=c.news)  # fmt: skip
    assert code == 422 and bad["field"] == "attributes.a b!"


def test_a_segment_with_an_unknown_attribute_is_a_422_naming_the_field_and_stores_nothing(
    campaigns: Client,
):
    c = campaigns
    _, _, made = c.call("POST", "/v1/lists", {"name": "news"}, token=c.news)
    items = [
        {"email": f"u{i}@example.net", "attributes": {"country": ["DE", "FR"][i % 2], "age": i}}
        for i in range(30)
    ]
    c.call("POST", f"/v1/lists/{made['id']}/contacts", items, token=c.news)
    spec = {"all": [{"attr": "country", "op": "eq", "value": "DE"}, {"attr": "agee", "op": "ge"}]}
    body = {"name": "adults", "list_id": made["id"], "filter": spec}
    code, headers, problem = c.call("POST", "/v1/segments", body, token=c.news)
    assert code == 422 and headers["content-type"].startswith("application/problem+json")
    assert problem["field"] == "filter.all[1].attr" and "'agee'" in problem["detail"]
    spec["all"][1] = {"attr": "age", "op": "older", "value": 18}
    code, _, problem = c.call("POST", "/v1/segments", body, token=c.news)
    assert code == 422 and problem["field"] == "filter.all[1].op"
    assert c.call("GET", "/v1/segments", token=c.news)[2] == {"segments": []}
    spec["all"][1] = {"attr": "age", "op": "ge", "value": 18}
    code, _, segment = c.call("POST", "/v1/segments", body, token=c.news)
    assert code == 201 and segment["contacts"] == 6  # even ages 18..28 are DE
    code, _, again = c.call("GET", f"/v1/segments/{segment['id']}", token=c.news)
    assert code == 200 and again["contacts"] == 6 and again["filter"] == spec
    out = c.relay.ctl("segment", "add", "x", "--list", "news", "--filter", "{}", check=False)
    assert out.returncode == 1 and "no list 'news'" in out.stderr  # the operator has none


def test_a_suppressed_address_shows_as_unsubscribed(campaigns: Client):
    c, r = campaigns, campaigns.relay
    _, _, made = c.call("POST", "/v1/lists", {"name": "news"}, token=c.news)
    items = [{"email": f"{n}@example.net"} for n in ("ann", "bob", "cy", "dee")]
    c.call("POST", f"/v1/lists/{made['id']}/contacts", items, token=c.news)
    r.ctl("suppression", "add", "ann@example.net")  # the operator's, for all senders
    r.ctl("suppression", "add", "bob@example.net", "--scope", "domain:example.test",
          "--reason", "complaint")  # fmt: skip
    code, _, gone = c.call("DELETE", "/v1/contacts/cy@example.net", token=c.news)
    assert code == 200 and gone == {
        "email": "cy@example.net",
        "scope": "key:news",
        "status": "unsubscribed",
    }
    _, _, page = c.call("GET", f"/v1/lists/{made['id']}/contacts", token=c.news)
    assert {p["email"]: p["status"] for p in page["contacts"]} == {
        "ann@example.net": "unsubscribed",
        "bob@example.net": "complained",
        "cy@example.net": "unsubscribed",
        "dee@example.net": "active",
    }
    listed = json.loads(r.ctl("--json", "suppression", "list", "--scope", "key:news").stdout)
    (entry,) = listed["suppressions"]
    assert (entry["address"], entry["reason"]) == ("cy@example.net", "unsubscribe")
    # relayctl: the operator's contact, unsubscribed for all senders
    r.ctl("list", "add", "ops")
    path = Path(r.config_path).parent / "ops.csv"
    path.write_text("email\ndee@example.net\n")
    r.ctl("contacts", "import", "ops", str(path))
    assert "status:     active" in r.ctl("contacts", "show", "dee@example.net").stdout
    r.ctl("contacts", "unsubscribe", "dee@example.net")
    assert "status:     unsubscribed" in r.ctl("contacts", "show", "dee@example.net").stdout
    code, _, dee = c.call("GET", "/v1/contacts/dee@example.net", token=c.news)
    assert code == 200 and dee["status"] == "unsubscribed"  # a global entry: for the key too
    assert c.call("DELETE", "/v1/contacts/zed@example.net", token=c.news)[0] == 404


def test_an_owner_cannot_see_or_use_another_keys_list(campaigns: Client):
    c = campaigns
    _, _, made = c.call("POST", "/v1/lists", {"name": "news"}, token=c.news)
    c.call("POST", f"/v1/lists/{made['id']}/contacts", [{"email": "a@example.net"}], token=c.news)
    lid = made["id"]
    assert c.call("GET", "/v1/lists", token=c.other)[2] == {"lists": []}
    for method, path, body in (
        ("GET", f"/v1/lists/{lid}", None),
        ("GET", f"/v1/lists/{lid}/contacts", None),
        ("POST", f"/v1/lists/{lid}/contacts", [{"email": "x@other.test"}]),
        ("DELETE", f"/v1/lists/{lid}", None),
        ("GET", "/v1/contacts/a@example.net", None),
    ):
        code, _, problem = c.call(method, path, body, token=c.other)
        assert code == 404, (method, path, problem)
    body = {"name": "s", "list_id": lid, "filter": {"attr": "x", "op": "exists"}}
    code, _, problem = c.call("POST", "/v1/segments", body, token=c.other)
    assert code == 422 and problem["field"] == "list_id"
    code, _, problem = c.call("GET", "/v1/lists")  # the "app" key: no campaigns scope
    assert code == 403 and problem["field"] == "scope"
    # the same list name for another owner is fine; for the same owner, a 409
    assert c.call("POST", "/v1/lists", {"name": "news"}, token=c.other)[0] == 201
    code, _, problem = c.call("POST", "/v1/lists", {"name": "news"}, token=c.news)
    assert code == 409 and problem["field"] == "name"
    (mine,) = c.call("GET", "/v1/lists", token=c.news)[2]["lists"]
    assert mine["id"] == lid and mine["contacts"] == 1
    boss = c.key("boss", "--sender", "example.test", "--scope", "admin")
    seen = c.call("GET", "/v1/lists", token=boss)[2]["lists"]
    assert [(li["owner"], li["name"]) for li in seen] == [
        ("key:news", "news"),
        ("key:other", "news"),
    ]
    assert c.call("GET", f"/v1/lists/{lid}/contacts", token=boss)[0] == 200


# -- segments against the spool, without a daemon --------------------------------------------

PEOPLE: list[dict[str, Any]] = [
    {"country": "DE", "age": 34, "plan": "pro", "tags": ["vip", "beta"], "city": "Berlin"},
    {"country": "FR", "age": 17, "plan": "free"},
    {"country": "DE", "age": 18, "city": "Bremen"},
    {"country": "NL", "age": 70, "plan": "team", "tags": ["beta"]},
    {"country": "DE", "age": "40"},  # a text age: never compared with numbers
    {"age": 25, "plan": "pro", "city": "Dresden"},
    {"country": "DE", "age": 17.5, "plan": "free", "tags": []},
]


def _load(conn: sqlite3.Connection) -> int:
    conn.execute("BEGIN")
    made = store.add_list(conn, "key:news", "all", NOW)
    items = [{"email": f"p{i}@example.net", "attributes": a} for i, a in enumerate(PEOPLE)]
    collector = Collector("index", size=3)  # several batches
    for batch in from_items(items, collector):
        store.add_batch(conn, "key:news", made["id"], batch.rows, batch.names, NOW)
    conn.execute("COMMIT")
    return made["id"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"attr": "country", "op": "eq", "value": "DE"}, [0, 2, 4, 6]),
        ({"attr": "country", "op": "ne", "value": "DE"}, [1, 3, 5]),  # missing included
        ({"attr": "age", "op": "ge", "value": 18}, [0, 2, 3, 5]),  # the text "40" is not a number
        ({"attr": "age", "op": "lt", "value": 18}, [1, 6]),
        ({"attr": "plan", "op": "in", "value": ["pro", "team"]}, [0, 3, 5]),
        ({"attr": "tags", "op": "contains", "value": "beta"}, [0, 3]),
        ({"attr": "city", "op": "contains", "value": "re"}, [2, 5]),  # Bremen, Dresden
        ({"attr": "tags", "op": "exists"}, [0, 3, 6]),
        ({"attr": "plan", "op": "exists", "value": False}, [2, 4]),
        (
            {
                "all": [
                    {"attr": "country", "op": "eq", "value": "DE"},
                    {
                        "any": [
                            {"attr": "age", "op": "ge", "value": 18},
                            {"attr": "plan", "op": "eq", "value": "free"},
                        ]
                    },
                    {"not": {"attr": "city", "op": "eq", "value": "Bremen"}},
                ]
            },
            [0, 6],
        ),
    ],
)
def test_members_of_a_segment_are_exactly_the_matching_contacts_in_id_order(
    spool_conn: sqlite3.Connection, spec: dict[str, Any], expected: list[int]
):
    list_id = _load(spool_conn)
    segment = store.add_segment(spool_conn, "key:news", "s", list_id, spec, NOW)
    want = [f"p{i}@example.net" for i in expected]
    assert segment["contacts"] == len(want)
    assert store.count_members(spool_conn, list_id, segment["id"]) == len(want)
    got, after = [], 0
    while page := store.members(spool_conn, list_id, segment["id"], after, 2):  # pages of 2
        got += page
        after = page[-1][0]
    assert [a for _, a, _ in got] == want
    assert [i for i, _, _ in got] == sorted(i for i, _, _ in got)
    assert all(attrs == PEOPLE[int(a[1:].split("@")[0])] for _, a, attrs in got)
    everyone = store.members(spool_conn, list_id, None, 0, 100)
    assert len(everyone) == store.count_members(spool_conn, list_id, None) == len(PEOPLE)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"attr": "age", "op": "ge", "value": True}, "filter.value"),
        ({"attr": "age", "op": "in", "value": []}, "filter.value"),
        ({"attr": "age", "op": "in", "value": [1, {"x": 1}]}, "filter.value[1]"),
        ({"all": []}, "filter.all"),
        ({"any": [{"attr": "age", "op": "eq", "value": 1}, "x"]}, "filter.any[1]"),
        ({"not": {"attr": "age"}}, "filter.not.op"),
        ({"all": [{"attr": "age", "op": "eq", "value": 1}], "x": 1}, "filter.x"),
        ({"attr": "age", "op": "eq", "value": 1, "extra": 2}, "filter.extra"),
        ({"attr": "zip", "op": "exists"}, "filter.attr"),
        ({"attr": "age", "op": "exists", "value": "yes"}, "filter.value"),
    ],
)
def test_a_bad_filter_names_its_path(spec: dict[str, Any], field: str):
    with pytest.raises(Invalid) as caught:
        segments.compile_filter(spec, ["age"])
    assert caught.value.field == field


def test_filter_values_are_bound_never_pasted():
    hostile = "DE') OR 1=1 --"
    sql, params = segments.compile_filter(
        {"attr": "country", "op": "eq", "value": hostile}, ["country"]
    )
    assert hostile not in sql and hostile in params and "country" not in sql


def test_the_import_shows_a_progress_bar_on_a_terminal_and_nothing_in_a_pipe(relay, tmp_path: Path):
    r = relay()
    r.ctl("list", "add", "news")
    path = tmp_path / "contacts.csv"
    path.write_text("email,n\n" + "".join(f"u{i}@example.net,{i}\n" for i in range(3000)))
    command = [sys.executable, "-m", "relayd.ctl", "--config", str(r.config_path)]
    command += ["contacts", "import", "news", str(path), "--batch", "1000"]
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 120 wide
    shown = bytearray()

    def read() -> None:  # while it runs: the terminal's buffer is small
        with contextlib.suppress(OSError):  # EIO: the other end closed
            while chunk := os.read(main, 65536):
                shown.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    done = subprocess.run(
        command, stdout=subprocess.PIPE, stderr=terminal, cwd=ROOT, timeout=60, text=True
    )
    os.close(terminal)
    reader.join(10)
    os.close(main)
    assert done.returncode == 0 and "imported 3000, updated 0, rejected 0" in done.stdout
    assert b"\rcontacts.csv:   0%|" in shown and b"| 0.00/66.8k" in shown  # the bar, in bytes
    piped = r.ctl("contacts", "import", "news", str(path))
    assert piped.stderr == "" and "imported 0, updated 3000, rejected 0" in piped.stdout
