"""Campaign statistics and reports against a real relayd: a small two-variant campaign sent
through the API to a fake MX (one address refused 550 5.1.1), opened and clicked through the
tracking pixel and links of the delivered mail, a conversion reported through the API; then the
JSON report, relayctl report, and the report page in headless Chromium, checked against what
happened. Until the campaign runner is merged, the test makes the campaign row and its
campaign_sends rows itself (the runner writes those in each message's own transaction)."""

from __future__ import annotations

import http.client
import json
import re
import signal
import sqlite3
import time
from pathlib import Path
from statistics import NormalDist
from typing import Any
from urllib.parse import urlsplit

import pytest
from support import browser
from support.util import free_port, listening, mx_zone, wait_until

from relayd.campaigns import abtest, page, report, stats
from relayd.campaigns.page import BAR_HEIGHT, BARS, LINES
from relayd.config import ConfigError, load
from relayd.events.records import Event
from relayd.spool import admin, store

OWNER = "key:shop"
# contact -> variant; bad@ is refused with 550 5.1.1
CONTACTS = {f"a{i}@dest.test": "A" for i in range(1, 6)} | {"bad@dest.test": "A"}
CONTACTS |= {f"b{i}@dest.test": "B" for i in range(1, 6)}


class Http:
    """The API and the page, with a key made with relayctl."""

    def __init__(self, relay: Any, port: int) -> None:
        self.relay, self.port = relay, port
        self.key = self.make_key("shop", "send,read,campaigns")

    def make_key(self, name: str, scopes: str) -> str:
        out = self.relay.ctl("key", "add", name, "--sender", "example.test", "--scope", scopes)
        return next(line for line in out.stdout.splitlines() if line.startswith("rk_"))

    def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        sent = {"Authorization": f"Bearer {self.key}", **(headers or {})}
        sent = {k: v for k, v in sent.items() if v is not None}
        data = json.dumps(body).encode() if body is not None else None
        if data is not None:
            sent["Content-Type"] = "application/json"
        conn.request(method, path, data, sent)
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, raw

    def json(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        status, _, raw = self.call(method, path, body, **kw)
        return status, json.loads(raw) if raw else None


@pytest.fixture
def site(relay, dns_server, fake_mx):
    """relayd with an API listener, a fake MX for dest.test that refuses bad@."""
    mx_zone(dns_server, "dest.test", (10, "mx.dest.test", "127.0.0.10"))
    mx = fake_mx(rcpt_replies={"bad@dest.test": "550 5.1.1 no such user"})
    port = free_port()
    r = relay(
        {
            "listeners": [
                {"address": f"127.0.0.1:{free_port()}", "kind": "relay"},
                {"address": f"127.0.0.1:{port}", "kind": "http"},
            ],
            "auth": {"users_file": "users.json"},
            "tracking": {
                "enabled": True,
                "base_url": f"http://127.0.0.1:{port}/t",
                "click_window": "0s",  # the test clicks at once: no scanner rule for that
            },
        }
    )
    wait_until(lambda: listening(port), 10, "the API listener")
    return r, Http(r, port), mx


def _campaign(spool: Path, name: str = "spring sale") -> int:
    with sqlite3.connect(spool, timeout=10) as db:
        now = time.time()
        db.execute("INSERT INTO lists (owner, name, created) VALUES (?, ?, ?)", (OWNER, name, now))
        list_id = db.execute("SELECT max(id) FROM lists").fetchone()[0]
        spec = json.dumps({"criterion": "click", "variants": [{"name": "A"}, {"name": "B"}]})
        cur = db.execute(
            "INSERT INTO campaigns (owner, name, sender, list_id, spec, state, send_at, created,"
            " total) VALUES (?, ?, 'news@example.test', ?, ?, 'sending', ?, ?, ?)",
            (OWNER, name, list_id, spec, now, now, len(CONTACTS)),
        )
        return cur.lastrowid or 0


def _send(api: Http, spool: Path, campaign: int) -> dict[str, str]:
    """One message per contact with the campaign's meta; then the campaign_sends rows, and
    the fold rewound so that it reads these messages' events again, in one transaction (the
    runner writes each row in its message's transaction: no rewinding there)."""
    queue_ids = {}
    for address, variant in CONTACTS.items():
        status, doc = api.json(
            "POST",
            "/v1/messages",
            {
                "from": "news@example.test",
                "to": [address],
                "subject": f"Spring {variant}",
                "text": "Hello\n",
                "html": '<html><body><p>Hello</p><a href="https://shop.example/">Shop</a>'
                "</body></html>",
                "stream": "bulk",
                "metadata": {"campaign": campaign, "variant": variant},
            },
        )
        assert status == 202, doc
        queue_ids[address] = doc["results"][0]["message_id"]
    conn = admin.open_spool(spool, write=True)
    with admin.transaction(conn, True):
        for address, variant in CONTACTS.items():
            cur = conn.execute(
                "INSERT INTO contacts (owner, address, created, updated) VALUES (?, ?, 0, 0)",
                (OWNER, address),
            )
            conn.execute(
                "INSERT INTO campaign_sends (campaign_id, contact_id, variant, queue_id, status)"
                " VALUES (?, ?, ?, ?, 'queued')",
                (campaign, cur.lastrowid, variant, queue_ids[address]),
            )
        conn.execute("DELETE FROM cursors WHERE name = ?", (stats.CURSOR,))
    conn.close()
    return queue_ids


BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
APPLE = "Mozilla/5.0"  # Apple Mail Privacy Protection's proxy: an open by a machine


def _tracked(mx: Any) -> dict[str, tuple[str, str]]:
    """Each recipient's (pixel, link) in the mail the fake MX received."""
    out = {}
    for got in mx.messages:
        html = got.data.decode("utf-8", "replace").replace("=\r\n", "").replace("=3D", "=")
        pixel = re.search(r'src="(http://[^"]+/t/o/[\w-]+\.gif)"', html)
        link = re.search(r'href="(http://[^"]+/t/c/[\w-]+)"', html)
        if pixel and link:
            out[got.rcpts[0]] = (pixel[1], link[1])
    return out


def _hit(url: str, agent: str = BROWSER) -> int:
    """A mail client's load of the pixel or a click on the link (redirects not followed)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", parts.path, headers={"User-Agent": agent})
    status = conn.getresponse().status
    conn.close()
    return status


def _report(api: Http, campaign: int) -> dict[str, Any]:
    status, doc = api.json("GET", f"/v1/campaigns/{campaign}/report")
    assert status == 200, doc
    return doc


def _until(api: Http, campaign: int, check: Any, what: str) -> dict[str, Any]:
    return wait_until(lambda: (doc := _report(api, campaign)) and check(doc) and doc, 15, what)


def _counts(doc: dict[str, Any], variant: str) -> dict[str, int]:
    return doc["variants"][variant]["counts"]


@pytest.fixture
def campaign(site):
    """The campaign sent, every message delivered or bounced, engagement and a conversion
    recorded, and the report showing all of it."""
    r, api, mx = site
    cid = _campaign(r.spool)
    assert cid == 1
    queue_ids = _send(api, r.spool, cid)
    # another sender's message that claims the campaign in its meta: not one it sent
    intruder = api.make_key("intruder", "send")
    status, _ = api.json(
        "POST",
        "/v1/messages",
        {
            "from": "x@example.test",
            "to": ["b1@dest.test"],
            "subject": "not the campaign's",
            "text": "Hi\n",
            "metadata": {"campaign": cid, "variant": "B"},
        },
        headers={"Authorization": f"Bearer {intruder}"},
    )
    assert status == 202
    mx.wait_for_messages(11)
    r.wait_event("bounced", rcpt="bad@dest.test")
    links = _tracked(mx)
    assert len(links) == 10  # the bounced one never arrived; the intruder's has no HTML
    for rcpt in ("a1@dest.test", "a1@dest.test", "a2@dest.test", "a3@dest.test", "b1@dest.test"):
        assert _hit(links[rcpt][0]) == 200
    assert _hit(links["a4@dest.test"][0], APPLE) == 200
    for rcpt in ("a1@dest.test", "a2@dest.test", "a2@dest.test"):
        assert _hit(links[rcpt][1]) == 302
    q = queue_ids
    status, doc = api.json("POST", f"/v1/campaigns/{cid}/conversions", {"email": "A1@dest.test"})
    assert status == 201 and doc["variant"] == "A" and doc["rcpt"] == "a1@dest.test", doc
    status, doc = api.json(
        "POST", f"/v1/campaigns/{cid}/conversions", {"message_id": q["a1@dest.test"]}
    )
    assert status == 201, doc  # the same contact again: an event, but one conversion
    doc = _until(
        api,
        cid,
        lambda d: _counts(d, "A")["converted"] == 1 and _counts(d, "B")["opened"] == 1,
        "the report to show the conversion",
    )
    return r, api, cid, (queue_ids, links), doc


def test_the_report_counts_what_happened_to_each_variant(campaign):
    r, _, cid, _, doc = campaign
    a, b = _counts(doc, "A"), _counts(doc, "B")
    assert a["sent"] == 6 and a["delivered"] == 5 and a["bounced"] == 1 and a["deferred"] == 0
    assert b["sent"] == 5 and b["delivered"] == 5 and b["bounced"] == 0  # not the intruder's
    (bounce,) = [e for e in r.events("bounced") if e["rcpt"] == "bad@dest.test"]
    assert doc["variants"]["A"]["bounced_by_class"] == {bounce["class"]: 1}
    assert doc["total"]["bounced_by_class"] == {bounce["class"]: 1}
    # unique human opens and clicks; the bot's open is recorded apart
    assert (a["opened"], a["opens_total"], a["opens_bot"]) == (3, 4, 1)
    assert (a["clicked"], a["clicks_total"]) == (2, 3)
    assert (b["opened"], b["clicked"], a["converted"], b["converted"]) == (1, 0, 1, 0)
    rates = doc["variants"]["A"]["rates"]
    assert rates["open_rate"] == 0.6 and rates["click_rate"] == 0.4
    assert rates["delivery_rate"] == round(5 / 6, 6) and rates["conversion_rate"] == 0.2
    z, p = abtest.two_proportion(2, 5, 0, 5)
    cmp = doc["comparison"]
    assert (cmp["criterion"], cmp["leader"], cmp["against"]) == ("click", "A", "B")
    assert cmp["z"] == round(z, 4) and cmp["p"] == round(p, 6)
    assert cmp["significant"] is False and cmp["winner"] is None  # five each: too few
    total = doc["total"]["counts"]
    assert total["sent"] == 11 and total["delivered"] == 10 and total["clicked"] == 2
    series = doc["series"]["total"]
    assert sum(series["delivered"]) == 10 and sum(series["clicked"]) == 3
    assert sum(series["opened"]) == 5  # every human open, per minute
    # the interface the campaign runner picks its winner with
    with sqlite3.connect(r.spool) as db:
        got = stats.rates(db, cid)
        flags = dict(
            db.execute(
                "SELECT c.address, s.flags FROM campaign_sends s JOIN contacts c"
                " ON c.id = s.contact_id"
            ).fetchall()
        )
    assert got["A"]["clicked"] == 2 and got["A"]["conversions"] == 1 and got["B"]["opened"] == 1
    assert got["A"]["click_rate"] == 0.4 and got["B"]["click_rate"] == 0.0
    assert flags["a1@dest.test"] == stats.DELIVERED | stats.OPENED | stats.CLICKED | stats.CONVERTED
    assert flags["a4@dest.test"] == stats.DELIVERED  # the bot's open does not count
    assert flags["bad@dest.test"] == stats.BOUNCED
    # relayctl: the same document, and a table of it
    assert json.loads(r.ctl("report", str(cid), "--json").stdout) == doc
    text = r.ctl("report", str(cid)).stdout
    assert "campaign 1 'spring sale': sending" in text and "not significant" in text
    assert re.search(r"^A\s+6\s+5\s+0\s+1\s+0\s+3\s+2\s+1\s+0\s+0$", text, re.M), text
    assert re.search(r"^B\s+5\s+5\s+0\s+0\s+0\s+1\s+0\s+0\s+0\s+0$", text, re.M), text
    missing = r.ctl("report", "99", check=False)
    assert missing.returncode == 1 and "no campaign 99" in missing.stderr


def test_folding_again_or_after_a_restart_never_counts_twice(campaign):
    r, api, cid, (_, links), before = campaign
    with sqlite3.connect(r.spool) as db:
        stats_rows = db.execute("SELECT * FROM campaign_stats ORDER BY 1, 2, 3, 4").fetchall()
    conn = admin.open_spool(r.spool, write=True)
    # caught up: a pass beside relayd's adds nothing (it may read the events of other mail:
    # the DSN of the bounce, its own retries)
    assert stats.fold(conn)[1] == 0
    conn.close()
    # a click just before a stop: counted once, before or after the restart, never twice
    assert _hit(links["b1@dest.test"][1]) == 302
    r.stop()
    r.start()
    wait_until(lambda: listening(api.port), 10, "the API listener")
    after = _until(api, cid, lambda d: _counts(d, "B")["clicked"] == 1, "the click after restart")
    assert after["variants"]["A"] == before["variants"]["A"]
    assert _counts(after, "B") == {**_counts(before, "B"), "clicked": 1, "clicks_total": 1}
    with sqlite3.connect(r.spool) as db:
        now = db.execute("SELECT * FROM campaign_stats ORDER BY 1, 2, 3, 4").fetchall()
    assert len(now) - len(stats_rows) == 2  # B's clicked and clicked_unique, this minute
    assert set(stats_rows) <= set(now)  # the rest as it was
    # the events pruned by their retention: the figures stay
    with sqlite3.connect(r.spool) as db:
        db.execute("DELETE FROM events WHERE id < (SELECT max(id) FROM events)")
    r.signal(signal.SIGKILL)
    r.proc.wait(10)
    r.start()

    def answered() -> dict[str, Any] | None:
        try:  # the killed relayd's ingress process may still hold the listener a moment
            return _report(api, cid)
        except OSError:
            return None

    assert wait_until(answered, 10, "the new relayd's report")["variants"] == after["variants"]


def test_conversions_name_a_contact_or_message_of_the_campaign(campaign):
    _, api, cid, (q, _), _ = campaign
    for body, field in (
        ({}, "email"),
        ({"email": "a1@dest.test", "message_id": q["a1@dest.test"]}, "email"),
        ({"email": "not an address"}, "email"),
        ({"message_id": "xyz"}, "message_id"),
        ({"email": "a1@dest.test", "value": 3}, "value"),
    ):
        status, doc = api.json("POST", f"/v1/campaigns/{cid}/conversions", body)
        assert status == 422 and doc["field"] == field, (body, doc)
    status, doc = api.json("POST", f"/v1/campaigns/{cid}/conversions", {"email": "z@dest.test"})
    assert status == 404 and "sent nothing to z@dest.test" in doc["detail"]
    status, doc = api.json("POST", "/v1/campaigns/99/conversions", {"email": "a1@dest.test"})
    assert status == 404
    reader = api.make_key("auditor", "read")
    status, doc = api.json(
        "POST",
        f"/v1/campaigns/{cid}/conversions",
        {"email": "a1@dest.test"},
        headers={"Authorization": f"Bearer {reader}"},
    )
    assert status == 403 and doc["field"] == "scope"
    other = api.make_key("other", "campaigns")  # another owner: not its campaign
    status, _ = api.json(
        "GET", f"/v1/campaigns/{cid}/report", headers={"Authorization": f"Bearer {other}"}
    )
    assert status == 404


@pytest.mark.parametrize(
    ("x1", "n1", "x2", "n2", "z", "p"),
    [
        (45, 100, 30, 100, 2.19089, 0.028460),  # statsmodels' proportions_ztest gives these
        (10, 100, 10, 100, 0.0, 1.0),
        (200, 1000, 250, 1000, -2.67740, 0.0074196),  # z by hand, p from a normal table
        (0, 0, 5, 10, 0.0, 1.0),  # no trials: nothing shown
        (0, 50, 0, 50, 0.0, 1.0),  # all alike
    ],
)
def test_two_proportion_against_known_values(x1, n1, x2, n2, z, p):
    got_z, got_p = abtest.two_proportion(x1, n1, x2, n2)
    assert got_z == pytest.approx(z, abs=1e-4) and got_p == pytest.approx(p, abs=1e-5)
    if n1 and n2 and z:  # p is the normal distribution's two tails at z (another erf's)
        assert got_p == pytest.approx(2 * (1 - NormalDist().cdf(abs(got_z))), rel=1e-9)
    assert stats.significant(got_p) is (p < 0.05)


def _login_url(r: Any, cid: int) -> str:
    out = r.ctl("report", str(cid), "--url").stdout
    return out.splitlines()[0]


def test_the_page_needs_a_login_or_a_key(campaign):
    r, api, cid, _, _ = campaign
    status, headers, body = api.call("GET", f"/ui/campaigns/{cid}", headers={"Authorization": None})
    assert status == 401 and headers["content-type"].startswith("text/html")
    assert f"relayctl report {cid} --url" in body.decode() and "Bearer" in body.decode()
    status, _, body = api.call("GET", f"/ui/campaigns/{cid}")  # a key with the campaigns scope
    assert status == 200 and b"<svg" in body
    url = _login_url(r, cid)
    token = url.rsplit("/", 1)[1]
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    status, headers, body = api.call("GET", f"/ui/login/{forged}", headers={"Authorization": None})
    assert status == 401 and "set-cookie" not in headers and b"does not work" in body
    status, headers, _ = api.call("GET", f"/ui/login/{token}", headers={"Authorization": None})
    assert status == 303 and headers["location"] == f"/ui/campaigns/{cid}"
    cookie = headers["set-cookie"]
    assert (
        "HttpOnly" in cookie
        and "SameSite=Strict" in cookie
        and f"Path=/ui/campaigns/{cid}" in cookie
    )
    session = cookie.split(";")[0]
    status, _, body = api.call(
        "GET", f"/ui/campaigns/{cid}", headers={"Authorization": None, "Cookie": session}
    )
    assert status == 200 and b'class="rates"' in body
    name, _, value = session.partition("=")
    for bad in (f"{name}={value[:-3]}xyz", f"{name}={token}"):  # altered; a login is no session
        status, _, body = api.call(
            "GET", f"/ui/campaigns/{cid}", headers={"Authorization": None, "Cookie": bad}
        )
        assert status == 401 and b"does not work" in body
    status, _, _ = api.call(
        "GET", "/ui/campaigns/2", headers={"Authorization": None, "Cookie": session}
    )
    assert status == 401  # that login is for campaign 1 only


def _attrs(tag: str) -> dict[str, str]:
    return dict(re.findall(r'([\w-]+)="([^"]*)"', tag))


def test_the_page_in_chromium_draws_the_real_figures(campaign, tmp_path):
    if browser.chromium() is None:
        pytest.skip("chromium is not installed: scripts/bootstrap --test")
    r, _, cid, _, doc = campaign
    url = _login_url(r, cid)
    dom = browser.dump_dom(url, 1200)
    assert "spring sale" in dom and "not significant" in dom
    # each bar is its rate's height, and says so
    for variant, figures in doc["variants"].items():
        chart = re.search(rf'<svg class="rates" data-variant="{variant}".*?</svg>', dom, re.S)
        assert chart, dom[:2000]
        bars = {a["data-metric"]: a for a in map(_attrs, re.findall(r"<rect[^>]*>", chart[0]))}
        assert set(bars) == {m for m, _, _ in BARS}
        for metric, bar in bars.items():
            rate = figures["rates"][metric]
            assert float(bar["data-value"]) == rate
            assert float(bar["height"]) == pytest.approx(rate * BAR_HEIGHT, abs=0.01)
        if variant == "A":  # 3 of 5 delivered opened, 2 clicked: what happened, drawn
            assert float(bars["open_rate"]["height"]) == 0.6 * BAR_HEIGHT
            assert float(bars["click_rate"]["height"]) == 0.4 * BAR_HEIGHT
    # the lines: cumulative figures ending at the totals
    lines = {x["data-metric"]: x for x in map(_attrs, re.findall(r"<polyline[^>]*>", dom))}
    total = doc["total"]["counts"]
    for metric, key in (
        ("delivered", "delivered"),
        ("opened", "opens_total"),
        ("clicked", "clicks_total"),
    ):
        values = [int(v) for v in lines[metric]["data-values"].split(",")]
        assert values[0] == 0 and values[-1] == total[key], (metric, values)
    # drawn: each bar's colour stands as tall on the screen as the tallest of its bars should
    # (a rate r: r * BAR_HEIGHT pixels), and the lines are there
    pixels = browser.screenshot(url, 1200, 1400, tmp_path / "report.png")
    bottom = 0  # of the bars
    for metric, _, colour in BARS[:5]:  # the rates above zero (unsubscribes, complaints: none)
        tallest = max(v["rates"][metric] for v in doc["variants"].values()) * BAR_HEIGHT
        run, end = _longest_run(pixels, _rgb(colour))
        assert run == pytest.approx(tallest, abs=1), f"the {metric} bars"
        bottom = max(bottom, end)
    for _, colour in LINES:  # below the bars: the line chart
        count = sum(row.count(_rgb(colour)) for row in pixels[bottom + 1 :])
        assert count > 100, f"the {colour} line is not drawn"


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def _longest_run(
    pixels: list[list[tuple[int, int, int]]], rgb: tuple[int, int, int]
) -> tuple[int, int]:
    """The most pixels of that colour one above another in a column of the screenshot, and
    the row where that run ends."""
    best = (0, 0)
    for x in range(len(pixels[0])):
        run = 0
        for y, row in enumerate(pixels):
            run = run + 1 if row[x] == rgb else 0
            best = max(best, (run, y))
    return best


_HTTP = '[[listeners]]\naddress = "0.0.0.0:8025"\nkind = "http"\n'


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('[reports]\nurl = "ftp://relay.test"\n', "reports.url", "https://"),
        ('[reports]\nurl = "http://relay.test:8025"\n', "reports.url", "loopback"),
        ('[reports]\nurl = "https://relay.test/ui"\n', "reports.url", "no path"),
        ('[reports]\nlogin_max_age = "10s"\n', "reports.login_max_age", "from 1m to 1d"),
        ('[reports]\nsession_max_age = "30d"\n', "reports.session_max_age", "from 1m to 7d"),
        ("[reports]\nlogin = 1\n", "reports.login", "unknown key"),
    ],
)
def test_report_settings_are_checked(tmp_path, text, key, problem):
    path = tmp_path / "relayd.toml"
    path.write_text(_HTTP + text)
    with pytest.raises(ConfigError, match=re.escape(key)) as info:
        load(path)
    assert problem in str(info.value)


def test_the_page_is_found_at_the_listener_unless_a_url_is_given(tmp_path):
    path = tmp_path / "relayd.toml"
    path.write_text(_HTTP)
    cfg = load(path)
    assert cfg.reports.base_url(cfg.listeners) == "http://127.0.0.1:8025"  # wildcard: loopback
    path.write_text(_HTTP + '[reports]\nurl = "https://relay.example.com:8443/"\n')
    cfg = load(path)
    assert cfg.reports.base_url(cfg.listeners) == "https://relay.example.com:8443"


def _event(conn: sqlite3.Connection, at: float, kind: str, queue_id: str, **data: Any) -> None:
    store.append_events(conn, [Event(kind, queue_id, at, data)])


def test_each_kind_of_event_is_folded_into_its_metrics_once(spool_conn):
    """The fold alone, on a spool: what each event type adds, and what it does not."""
    db = spool_conn
    db.execute("INSERT INTO lists (owner, name, created) VALUES ('', 'l', 0)")
    db.execute(
        "INSERT INTO campaigns (owner, name, sender, list_id, spec, state, send_at, created)"
        " VALUES ('', 'c', 's@example.test', 1, '{}', 'sending', 0, 0)"
    )
    meta = {"campaign": 1, "variant": "A"}
    for contact, queue_id in ((1, "0A"), (2, "0B"), (3, "0C")):
        db.execute(
            "INSERT INTO campaign_sends VALUES (1, ?, 'A', ?, ?, 0)",
            (contact, queue_id, "suppressed" if contact == 3 else "queued"),
        )
    t = 1_800_000_000.0  # a minute's start
    for queue_id in ("0A", "0B"):
        _event(db, t, "accepted", queue_id, rcpt=["x@d.test"], meta=meta)
    _event(db, t, "suppressed", "0C", rcpt="z@d.test", meta=meta)
    _event(db, t + 1, "deferred", "0A", rcpt="x@d.test", meta=meta)
    _event(db, t + 2, "deferred", "0A", rcpt="x@d.test", meta=meta)
    _event(db, t + 61, "delivered", "0A", rcpt="x@d.test", meta=meta)
    _event(db, t + 62, "expired", "0B", rcpt="y@d.test", meta=meta)
    for _ in range(2):  # a second report of the same: counted once
        _event(db, t + 70, "unsubscribed", "0A", rcpt="x@d.test", meta=meta)
        _event(db, t + 71, "complained", "0A", rcpt="x@d.test", meta=meta)
    _event(db, t + 72, "opened", "0A", rcpt="x@d.test", human=False, bot="scanner", meta=meta)
    _event(db, t + 73, "opened", "0A", rcpt="x@d.test", human=False, counted=True, meta=meta)
    _event(db, t + 74, "delivered", "0A", rcpt="x@d.test", meta={"campaign": 2})  # another's
    _event(db, t + 75, "delivered", "0A", rcpt="x@d.test")  # no campaign meta at all
    _event(db, t + 76, "campaign", "", campaign=1, state="done")
    assert stats.fold(db, limit=4) == (4, 2 + 1 + 1)  # in passes of 4 events
    while stats.fold(db, limit=4)[0]:
        pass
    assert stats.fold(db) == (0, 0)
    rows = db.execute(
        "SELECT metric, minute, count FROM campaign_stats ORDER BY metric, minute"
    ).fetchall()
    m = int(t // 60)
    assert rows == [
        ("bounced", m + 1, 1),
        ("bounced:expired", m + 1, 1),
        ("complained", m + 1, 1),
        ("deferred", m, 2),
        ("delivered", m + 1, 1),
        ("opened", m + 1, 1),  # the bot whose event says it counts
        ("opened_bot", m + 1, 1),
        ("opened_unique", m + 1, 1),
        ("sent", m, 2),
        ("suppressed", m, 1),
        ("unsubscribed", m + 1, 1),
    ]
    flags = dict(db.execute("SELECT queue_id, flags FROM campaign_sends").fetchall())
    assert flags == {
        "0A": stats.DELIVERED | stats.UNSUBSCRIBED | stats.COMPLAINED | stats.OPENED,
        "0B": stats.BOUNCED,
        "0C": 0,
    }
    assert stats.cursor(db) == db.execute("SELECT max(id) FROM events").fetchone()[0]


def test_a_long_campaigns_series_is_in_steps_of_several_minutes(spool_conn):
    db = spool_conn
    db.execute("INSERT INTO lists (owner, name, created) VALUES ('', 'l', 0)")
    db.execute(
        "INSERT INTO campaigns (owner, name, sender, list_id, spec, state, send_at, created)"
        " VALUES ('', 'c', 's@example.test', 1, '{\"criterion\": \"open\"}', 'done', 0, 0)"
    )
    start = 29_000_000
    db.executemany(
        "INSERT INTO campaign_stats VALUES (1, 'A', 'delivered', ?, 1)",
        [(start + i,) for i in range(0, 2000, 7)],
    )
    doc = report.report(db, 1)
    series = doc["series"]
    assert series["step_s"] == 180 and len(series["at"]) == 666  # 1,996 minutes, 3 a step
    assert sum(series["total"]["delivered"]) == doc["total"]["counts"]["delivered"] == 286
    assert doc["campaign"]["criterion"] == "open" and doc["comparison"] is None  # one variant
    assert page.line_chart(series)["lines"][0]["last"] == 286


def test_a_campaign_the_runner_sends_is_counted_in_its_report(site):
    """The campaign runner's own messages (campaign_sends in each message's transaction)."""
    r, api, mx = site
    status, made = api.json("POST", "/v1/lists", {"name": "runner"})
    assert status == 201, made
    people = [{"email": f"r{i}@dest.test"} for i in range(4)] + [{"email": "bad@dest.test"}]
    status, doc = api.json("POST", f"/v1/lists/{made['id']}/contacts", people)
    assert status == 200 and not doc.get("rejected"), doc
    html = '<html><body><a href="https://shop.example/">Shop</a></body></html>'
    status, doc = api.json(
        "POST",
        "/v1/campaigns",
        {
            "name": "runner",
            "from": "news@example.test",
            "list_id": made["id"],
            "variants": [{"name": "A", "subject": "Hi", "text": "Hi\n", "html": html}],
        },
    )
    assert status == 201, doc
    cid = doc["id"]
    mx.wait_for_messages(4, timeout=60)
    _until(
        api,
        cid,
        lambda d: (
            d["variants"] and (_counts(d, "A")["delivered"], _counts(d, "A")["bounced"]) == (4, 1)
        ),
        "the runner's deliveries and bounce in the report",
    )
    assert _hit(_tracked(mx)["r0@dest.test"][1]) == 302
    doc = _until(api, cid, lambda d: _counts(d, "A")["clicked"] == 1, "the click")
    assert _counts(doc, "A")["sent"] == 5 and doc["campaign"]["name"] == "runner"
    with sqlite3.connect(r.spool) as db:
        assert stats.rates(db, cid)["A"]["click_rate"] == 0.25
