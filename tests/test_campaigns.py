"""Campaigns against a real relayd: contacts in the spool, a campaign made over the API (or
relayctl), every contact's personalised message at a fake MX exactly once, A/B tests that pick
the winner and send it to the rest, pause/resume/cancel, SIGKILL mid-campaign, bad input."""

from __future__ import annotations

import collections
import email
import email.policy
import http.client
import json
import re
import signal
import sqlite3
import time
import urllib.parse
from typing import Any

import pytest
from support.util import free_port, listening, mx_zone, wait_until

from relayd.campaigns import abtest
from relayd.config import ConfigError, load

OWNER = "key:mk"


class Client:
    """A relayd with an API listener and a key with the campaigns scope."""

    def __init__(self, relay: Any, port: int) -> None:
        self.relay, self.port = relay, port
        out = relay.ctl("key", "add", "mk", "--sender", "example.test", "--scope", "campaigns")
        self.token = next(line for line in out.stdout.splitlines() if line.startswith("rk_"))

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        conn.request(method, path, None if body is None else json.dumps(body).encode(), headers)
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        return resp.status, json.loads(raw) if raw else None

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        status, doc = self.call("POST", "/v1/campaigns", body)
        assert status == 201, doc
        return doc

    def show(self, campaign_id: int) -> dict[str, Any]:
        status, doc = self.call("GET", f"/v1/campaigns/{campaign_id}")
        assert status == 200, doc
        return doc

    def wait_state(self, campaign_id: int, state: str, timeout: float = 60) -> dict[str, Any]:
        return wait_until(
            lambda: (d := self.show(campaign_id))["state"] == state and d,
            timeout,
            f"campaign {campaign_id} {state}",
        )

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.relay.spool, timeout=10, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    def contacts(self, n: int, attrs: Any = None) -> tuple[int, list[int]]:
        """A list of n contacts c0@dest.test ... made over the contacts API: its id, and the
        contacts' ids in address order."""
        status, made = self.call("POST", "/v1/lists", {"name": f"list{time.time()}"})
        assert status == 201, made
        items = [
            {"email": f"c{i}@dest.test", "attributes": attrs(i) if attrs else {"first": f"F{i}"}}
            for i in range(n)
        ]
        if items:
            status, doc = self.call("POST", f"/v1/lists/{made['id']}/contacts", items)
            assert status == 200 and not doc.get("rejected"), doc
        conn = self.db()
        ids = dict(
            conn.execute(
                "SELECT c.address, c.id FROM list_members m JOIN contacts c ON c.id ="
                " m.contact_id WHERE m.list_id = ?",
                (made["id"],),
            ).fetchall()
        )
        conn.close()
        return made["id"], [ids[f"c{i}@dest.test"] for i in range(n)]

    def sends(self, campaign_id: int) -> dict[int, tuple[str, str]]:
        """contact id -> (variant, status)."""
        conn = self.db()
        rows = conn.execute(
            "SELECT contact_id, variant, status FROM campaign_sends WHERE campaign_id = ?",
            (campaign_id,),
        ).fetchall()
        conn.close()
        return {c: (v, s) for c, v, s in rows}


@pytest.fixture
def api(relay, dns_server):
    def make(extra: dict[str, Any] | None = None) -> Client:
        port = free_port()
        config = {
            "listeners": [
                {"address": f"127.0.0.1:{free_port()}", "kind": "relay"},
                {"address": f"127.0.0.1:{port}", "kind": "http"},
            ],
            "auth": {"users_file": "users.json"},
            "campaigns": {"batch": 25, "poll_interval": "0.1s", "min_wait": "1s"},
            "unsubscribe": {"url": f"http://127.0.0.1:{port}/unsubscribe/"},
            # clicks at once after delivery count (a test clicks before any scanner would)
            "tracking": {
                "enabled": True,
                "base_url": f"http://127.0.0.1:{port}/t",
                "click_window": "0s",
            },
            **(extra or {}),
        }
        r = relay(config)
        wait_until(lambda: listening(port), 10, "the API listener")
        return Client(r, port)

    mx_zone(dns_server, "dest.test", (10, "mx.dest.test", "127.0.0.10"))
    return make


def _parse(data: bytes) -> Any:
    return email.message_from_bytes(data.replace(b"\r\n", b"\n"), policy=email.policy.default)


def _by_rcpt(mx: Any) -> dict[str, list[Any]]:
    got = collections.defaultdict(list)
    for m in list(mx.messages):
        for r in m.rcpts:
            got[r].append(_parse(m.data))
    return got


BODY = {
    "name": "Spring",
    "from": "News <news@example.test>",
    "variants": [
        {
            "name": "A",
            "subject": "Hello {{ contact.first }}",
            "text": "Hi {{ contact.first }}, {{ data.offer }}\n"
            "Unsubscribe: {{ unsubscribe_url }}\n",
            "html": '<p>Hi {{ contact.first }} <a href="https://shop.test/{{ contact.first }}">'
            "shop</a></p>",
        }
    ],
    "data": {"offer": "20% off"},
}


def test_a_campaign_reaches_every_contact_once_personalised_in_the_bulk_stream(api, fake_mx):
    mx = fake_mx()
    c = api()
    list_id, ids = c.contacts(200, attrs=lambda i: {"first": f"F{i}", "n": 0 if i == 7 else 1})
    c.relay.ctl("suppression", "add", "c3@dest.test")
    body = json.loads(json.dumps(BODY))
    body["variants"][0]["html"] += "<p>{{ 10 // contact.n }}</p>"  # contact 7: a runtime error
    doc = c.create({**body, "list_id": list_id})
    assert doc["state"] == "scheduled" and doc["phase"] == "rest" and doc["winner"] == "A"
    done = c.wait_state(doc["id"], "done")
    assert done["progress"]["total"] == 200
    assert (done["progress"]["queued"], done["progress"]["suppressed"]) == (198, 1)
    assert done["progress"]["failed"] == 1 and done["progress"]["remaining"] == 0
    mx.wait_for_messages(198, timeout=60)
    got = _by_rcpt(mx)
    assert sorted(got) == sorted(f"c{i}@dest.test" for i in range(200) if i not in (3, 7))
    assert all(len(v) == 1 for v in got.values())  # once each
    first = got["c42@dest.test"][0]
    assert first["Subject"] == "Hello F42" and first["From"] == "News <news@example.test>"
    text = first.get_body(("plain",)).get_content()
    assert text.startswith("Hi F42, 20% off\nUnsubscribe: http://127.0.0.1:")
    assert first["List-Unsubscribe"].startswith(f"<http://127.0.0.1:{c.port}/unsubscribe/")
    html = first.get_body(("html",)).get_content()  # tracked: its link and the open pixel
    assert f'href="http://127.0.0.1:{c.port}/t/c/' in html and "/t/o/" in html
    assert "https://shop.test/F42" not in html
    sends = c.sends(doc["id"])
    assert sends[ids[3]] == ("A", "suppressed") and sends[ids[7]] == ("A", "failed")
    accepted = [e for e in c.relay.events("accepted") if e.get("meta", {}).get("campaign")]
    assert len(accepted) == 198
    assert all(e["stream"] == "bulk" and e["meta"] == {"campaign": doc["id"], "variant": "A"}
               for e in accepted)  # fmt: skip
    assert all(e["origin"] == OWNER for e in accepted)
    states = [e["state"] for e in c.relay.events("campaign") if "error" not in e]
    assert states == ["scheduled", "sending", "done"]
    (failure,) = [e for e in c.relay.events("campaign") if "error" in e]
    assert failure["rcpt"] == "c7@dest.test" and "ZeroDivisionError" in failure["error"]
    wait_until(lambda: c.show(doc["id"])["progress"]["delivery"]["sent"] == 198, 60, "sent")
    two, _ = c.contacts(2)  # a campaign with tracking off: its HTML as written
    plain = c.create({**BODY, "list_id": two, "tracking": {"opens": False, "clicks": False}})
    c.wait_state(plain["id"], "done")
    mx.wait_for_messages(200, timeout=60)
    html = _parse(mx.messages[-1].data).get_body(("html",)).get_content()
    assert 'href="https://shop.test/F' in html and "/t/o/" not in html


AB = {
    **BODY,
    "variants": [
        {
            "name": "A",
            "subject": "A for {{ contact.first }}",
            "text": "a\n",
            "html": '<p>A <a href="https://shop.test/a">shop</a></p>',
        },
        {
            "name": "B",
            "subject": "B for {{ contact.first }}",
            "text": "b\n",
            "weight": 1,
            "html": '<p>B <a href="https://shop.test/b">shop</a></p>',
        },
    ],
    "test_percent": 20,
    "criterion": "click",
    "wait": "2s",
}
_CLICK = re.compile(r'href="(http://127\.0\.0\.1:\d+/t/c/[^"]+)"')


def test_an_ab_test_sends_the_clicked_variant_to_everyone_not_in_the_test_group(api, fake_mx):
    """B's test group follows its tracked link; the statistics folded from those clicks make B
    the winner when the wait ends, and B goes to everyone else."""
    mx = fake_mx()
    c = api()
    list_id, ids = c.contacts(200)
    doc = c.create({**AB, "list_id": list_id, "wait": "10s"})
    cid, variants = doc["id"], doc["variants"]
    c.wait_state(cid, "testing")
    tested = {i for i in ids if abtest.in_test(cid, i, 20)}
    sends = c.sends(cid)
    assert set(sends) == tested  # the test group only, so far
    assert {i: v for i, (v, _) in sends.items()} == {
        i: abtest.variant_of(cid, i, variants) for i in tested
    }
    delivered = mx.wait_for_messages(len(tested), timeout=60)
    # paused while the clicks are made and folded, so that the wait cannot end before them
    # on a slow machine; resumed, the campaign picks its winner once the wait is over
    assert c.call("POST", f"/v1/campaigns/{cid}/pause")[0] == 200
    clicks = 0
    for m in delivered:
        html = _parse(m.data).get_body(("html",)).get_content()
        if "<p>B " in html:
            assert _follow(_CLICK.search(html)[1]) == "https://shop.test/b"
            clicks += 1
    assert clicks
    wait_until(lambda: _clicked(c, cid) == clicks, 30, "B's clicks folded")
    assert c.call("POST", f"/v1/campaigns/{cid}/resume")[0] == 200
    done = c.wait_state(cid, "done")
    assert done["winner"] == "B" and done["phase"] == "rest"
    mx.wait_for_messages(200, timeout=60)
    got = _by_rcpt(mx)
    assert len(got) == 200 and all(len(v) == 1 for v in got.values())
    subjects = {i: got[f"c{n}@dest.test"][0]["Subject"] for n, i in enumerate(ids)}
    for n, i in enumerate(ids):
        variant = abtest.variant_of(cid, i, variants) if i in tested else "B"
        assert subjects[i] == f"{variant} for F{n}"
    (picked,) = [e for e in c.relay.events("campaign") if e.get("winner")]
    assert picked["phase"] == "rest" and picked["criterion"] == "click"
    assert picked["rates"]["B"]["click_rate"] == 1.0 and picked["rates"]["A"]["click_rate"] == 0
    assert picked["p"] < 0.05 and picked["z"] > 0


def _follow(link: str) -> str:
    """A person's click on a tracked link: where its 302 sends them."""
    url = urllib.parse.urlsplit(link)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.request("GET", url.path, headers={"User-Agent": "Mozilla/5.0 (X11; Linux) Firefox/140"})
    resp = conn.getresponse()
    conn.close()
    assert resp.status == 302
    return resp.getheader("Location")


def _clicked(c: Client, cid: int) -> int:
    """Variant B's contacts who clicked, as the campaign's report counts them."""
    status, doc = c.call("GET", f"/v1/campaigns/{cid}/report")
    assert status == 200, doc
    return doc["variants"].get("B", {}).get("counts", {}).get("clicked", 0)


def test_assignment_is_a_pure_function_of_campaign_and_contact():
    variants = [{"name": "A", "weight": 1}, {"name": "B", "weight": 3}]
    first = [(abtest.in_test(5, i, 20), abtest.variant_of(5, i, variants)) for i in range(4000)]
    again = [(abtest.in_test(5, i, 20), abtest.variant_of(5, i, variants)) for i in range(4000)]
    assert first == again
    share = sum(t for t, _ in first) / 4000
    b = sum(v == "B" for _, v in first) / 4000
    assert 0.17 < share < 0.23 and 0.72 < b < 0.78
    assert [abtest.in_test(6, i, 20) for i in range(50)] != [t for t, _ in first[:50]]
    assert abtest.winner({}, "click", ["A", "B"])[0] == "A"  # a tie: the first variant


def _spool_states(c: Client, cid: int) -> dict[int, int]:
    conn = c.db()
    rows = conn.execute(
        "SELECT r.state, count(*) FROM campaign_sends s JOIN messages m ON m.queue_id ="
        " s.queue_id JOIN recipients r ON r.msg_id = m.id WHERE s.campaign_id = ?"
        " GROUP BY r.state",
        (cid,),
    ).fetchall()
    conn.close()
    return dict(rows)


def test_pause_holds_the_queued_mail_and_stops_the_rest_resume_sends_it_all(api, fake_mx):
    mx = fake_mx(rcpt_reply="451 4.3.0 try later")
    c = api()
    list_id, _ = c.contacts(100)
    cid = c.create({**AB, "list_id": list_id, "wait": "1s"})["id"]
    c.wait_state(cid, "testing")
    status, doc = c.call("POST", f"/v1/campaigns/{cid}/pause")
    assert status == 200 and doc["state"] == "paused"
    tested = len(c.sends(cid))
    wait_until(lambda: _spool_states(c, cid) == {4: tested}, 10, "the test mail held")
    assert c.call("POST", f"/v1/campaigns/{cid}/pause")[0] == 409
    assert c.show(cid)["state"] == "paused" and len(c.sends(cid)) == tested
    mx.rcpt_reply = "250 2.1.5 ok"
    status, doc = c.call("POST", f"/v1/campaigns/{cid}/resume")
    assert status == 200 and doc["state"] == "testing"
    c.wait_state(cid, "done")
    mx.wait_for_messages(100, timeout=60)
    got = _by_rcpt(mx)
    assert len(got) == 100 and all(len(v) == 1 for v in got.values())
    states = [e["state"] for e in c.relay.events("campaign")]
    assert states == ["scheduled", "sending", "testing", "paused", "testing", "sending", "done"]


def test_cancel_removes_the_undelivered_mail_without_dsns(api, fake_mx):
    mx = fake_mx(rcpt_reply="451 4.3.0 try later")
    c = api()
    list_id, _ = c.contacts(60)
    cid = c.create({**BODY, "list_id": list_id})["id"]
    c.wait_state(cid, "done")
    later = c.create({**BODY, "list_id": list_id, "send_at": time.time() + 3600})["id"]
    status, doc = c.call("POST", f"/v1/campaigns/{later}/cancel")
    assert status == 200 and doc["state"] == "cancelled"
    assert c.call("POST", f"/v1/campaigns/{later}/resume")[0] == 409
    ab = c.create({**AB, "list_id": list_id, "wait": "30s"})["id"]
    c.wait_state(ab, "testing")
    assert _spool_states(c, ab)
    status, doc = c.call("POST", f"/v1/campaigns/{ab}/cancel")
    assert status == 200 and doc["state"] == "cancelled" and doc["finished"]
    assert _spool_states(c, ab) == {}  # removed, no DSN owed
    assert c.show(ab)["progress"]["delivery"]["pending"] == 0
    (event,) = [e for e in c.relay.events("campaign") if e["campaign"] == ab and
                e["state"] == "cancelled"]  # fmt: skip
    assert event["action"] == "cancel" and event["recipients"] > 0
    c.relay.wait_event("operator", action="delete")
    assert not [e for e in c.relay.events("dsn_queued")]
    assert mx.messages == []


def test_sigkill_mid_campaign_then_restart_queues_every_member_exactly_once(api, fake_mx):
    mx = fake_mx(rcpt_reply="451 4.3.0 try later")  # nothing delivered before the kill
    c = api({"campaigns": {"batch": 10, "poll_interval": "0.1s", "min_wait": "1s"}})
    list_id, ids = c.contacts(1500)
    body = {**AB, "list_id": list_id, "test_percent": 100, "wait": "1s"}
    doc = c.create(body)
    cid = doc["id"]
    wait_until(lambda: len(c.sends(cid)) >= 100, 20, "a first part queued")
    c.relay.signal(signal.SIGKILL)
    c.relay.proc.wait(10)
    # its ingress process dies with it, its threads a moment later: then its sockets close
    closed = lambda: not listening(c.relay.port) and not listening(c.port)  # noqa: E731
    wait_until(closed, 10, "the killed relayd's listeners to close")
    before = len(c.sends(cid))
    assert before < 1500, "the campaign ended before the kill: make it larger"
    mx.rcpt_reply = "250 2.1.5 ok"
    c.relay.start()
    wait_until(lambda: listening(c.port), 10, "the API listener again")
    c.wait_state(cid, "testing", timeout=60)
    mx.wait_for_messages(1500, timeout=60)
    got = _by_rcpt(mx)
    assert len(got) == 1500 and all(len(v) == 1 for v in got.values())
    for n, i in enumerate(ids):  # the same variants after the restart
        assert got[f"c{n}@dest.test"][0]["Subject"].startswith(
            abtest.variant_of(cid, i, doc["variants"])
        )


def test_bad_campaigns_are_422s_naming_the_field_and_store_nothing(api, fake_mx):
    c = api()
    list_id, _ = c.contacts(5)
    empty, _ = c.contacts(0)
    conn = c.db()
    conn.execute(
        "INSERT INTO templates (owner, name, version, kind, subject, html, created)"
        " VALUES (?, 'news', 1, 'html', 'Hi {{ contact.first }}', '<p>x</p>', 0)",
        (OWNER,),
    )
    conn.close()
    ok = {**BODY, "list_id": list_id}
    bad_template = {"name": "A", "subject": "x", "html": "<p>\n{% if %}</p>"}
    cases = [
        ({**ok, "list_id": 999}, "list_id", "no list"),
        ({**ok, "list_id": empty}, "list_id", "no contacts"),
        ({**AB, "list_id": list_id, "test_percent": 101}, "test_percent", "at most 100"),
        ({**AB, "list_id": list_id, "test_percent": 0}, "test_percent", "more than 0"),
        ({**ok, "variants": [{**BODY["variants"][0], "weight": 0}]}, "variants[0].weight", ">"),
        ({**ok, "variants": [{"name": "A", "template": "nope"}]}, "variants[0].template", "no"),
        ({**ok, "variants": [{"name": "A", "template": "news", "version": 2}]},
         "variants[0].template", "version 2"),
        ({**ok, "variants": [bad_template]}, "variants[0].html", "line"),
        ({**AB, "list_id": list_id, "wait": "0.5s"}, "wait", "from 1s"),
        ({**ok, "variants": AB["variants"]}, "test_percent", "A/B test"),
        ({**ok, "send_at": "tomorrow"}, "send_at", "RFC 3339"),
        ({**ok, "color": "red"}, "color", "nknown"),
    ]  # fmt: skip
    for body, field, problem in cases:
        status, doc = c.call("POST", "/v1/campaigns", body)
        assert (status, doc["field"]) == (422, field), (body, doc)
        assert problem.replace(">", "more than 0") in doc["detail"], doc
    status, doc = c.call("POST", "/v1/campaigns", {**ok, "variants": [bad_template]})
    assert (doc["line"], doc["column"]) == (2, 1)
    status, doc = c.call("POST", "/v1/campaigns", {**ok, "from": "x@elsewhere.test"})
    assert (status, doc["field"]) == (403, "from")
    assert c.call("GET", "/v1/campaigns")[1] == {"campaigns": []}
    assert c.call("GET", "/v1/campaigns/1")[0] == 404
    good = c.create({**ok, "variants": [{"name": "A", "template": "news"}]})
    assert good["variants"] == [{"name": "A", "weight": 1.0, "template": "news", "version": 1}]


def test_relayctl_makes_shows_pauses_and_resumes_a_campaign(api, fake_mx):
    mx = fake_mx()
    c = api()
    csv = c.relay.workdir / "contacts.csv"  # the operator's own list and template
    csv.write_text("email,first\n" + "".join(f"c{i}@dest.test,F{i}\n" for i in range(30)))
    made = json.loads(c.relay.ctl("list", "add", "ops", "--json").stdout)
    c.relay.ctl("contacts", "import", "ops", str(csv))
    list_id = made["list"]["id"]
    conn = c.db()
    conn.execute(
        "INSERT INTO templates (owner, name, version, kind, subject, text, created)"
        " VALUES ('', 'news', 1, 'html', 'Hi {{ contact.first }}', 'x\n', 0)"
    )
    conn.close()
    common = ("--name", "ctl", "--from", "news@example.test", "--list", str(list_id))
    later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86400))
    out = c.relay.ctl("campaign", "add", *common, "--template", "news:1", "--at", later)
    assert "state: scheduled, phase rest, winner A" in out.stdout
    bad = c.relay.ctl("campaign", "add", *common, "--template", "news", "--test", "120",
                      "--variant", "A::1", "--variant", "B::1:Other", check=False)  # fmt: skip
    assert bad.returncode == 1 and "--test: must be more than 0 and at most 100" in bad.stderr
    assert c.relay.ctl("campaign", "pause", "1").stdout.startswith("campaign 1: ctl")
    listed = json.loads(c.relay.ctl("campaign", "ls", "--json").stdout)["campaigns"]
    assert [(x["id"], x["state"], x["owner"]) for x in listed] == [(1, "paused", "")]
    ab = c.relay.ctl("campaign", "add", *common, "--template", "news", "--test", "50",
                     "--variant", "A::1", "--variant", "B::1:Other {{ contact.first }}",
                     "--wait", "1s", "--json")  # fmt: skip
    cid = json.loads(ab.stdout)["id"]
    shown = c.relay.ctl("campaign", "show", str(cid), "--watch")  # returns once it is done
    assert "state: done, phase rest" in shown.stdout and "30/30 queued" in shown.stdout
    got = _by_rcpt(mx) if mx.wait_for_messages(30) else {}
    assert len(got) == 30 and {m[0]["Subject"][:2] for m in got.values()} <= {"Hi", "Ot"}
    assert c.relay.ctl("campaign", "cancel", "1").stdout.count("state: cancelled") == 1


def test_pause_mid_sending_stops_new_batches_and_holds_what_was_queued(api, fake_mx):
    mx = fake_mx(rcpt_reply="451 4.3.0 try later")
    c = api({"campaigns": {"batch": 10, "poll_interval": "0.1s", "min_wait": "1s"}})
    list_id, _ = c.contacts(1500)
    cid = c.create({**BODY, "list_id": list_id})["id"]
    wait_until(lambda: len(c.sends(cid)) >= 50, 20, "a first part queued")
    status, doc = c.call("POST", f"/v1/campaigns/{cid}/pause")
    assert status == 200 and doc["state"] == "paused"
    # the runner stops after the batch in flight at the pause, and holds that one too
    c.relay.wait_event("campaign_stopped", campaign=cid, state="paused")
    queued = len(c.sends(cid))
    assert _spool_states(c, cid) == {4: queued}
    assert queued < 1500 and c.show(cid)["progress"]["remaining"] == 1500 - queued
    assert c.show(cid)["progress"]["delivery"]["held"] == queued
    mx.rcpt_reply = "250 2.1.5 ok"
    assert c.call("POST", f"/v1/campaigns/{cid}/resume")[1]["state"] == "sending"
    c.wait_state(cid, "done", timeout=60)
    mx.wait_for_messages(1500, timeout=60)
    got = _by_rcpt(mx)
    assert len(got) == 1500 and all(len(v) == 1 for v in got.values())


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("batch = 0", "campaigns.batch", "from 1 to 10000"),
        ('poll_interval = "5m"', "campaigns.poll_interval", "from 0.05s to 1m"),
        ('min_wait = "0.5s"', "campaigns.min_wait", "from 1s to 1d"),
        ("colour = 1", "campaigns.colour", "unknown key"),
    ],
)
def test_the_campaigns_config_is_checked(tmp_path, text, key, problem):
    path = tmp_path / "relayd.toml"
    path.write_text(f"[campaigns]\n{text}\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == key and problem in info.value.problem


def test_a_campaign_to_a_segment_reaches_its_contacts_only(api, fake_mx):
    mx = fake_mx()
    c = api()
    list_id, _ = c.contacts(20, attrs=lambda i: {"first": f"F{i}", "n": i})
    other, _ = c.contacts(1)
    segment = {"name": "few", "list_id": list_id, "filter": {"attr": "n", "op": "lt", "value": 5}}
    status, seg = c.call("POST", "/v1/segments", segment)
    assert status == 201, seg
    status, doc = c.call(
        "POST", "/v1/campaigns", {**BODY, "list_id": other, "segment_id": seg["id"]}
    )
    assert (status, doc["field"]) == (422, "segment_id")
    cid = c.create({**BODY, "list_id": list_id, "segment_id": seg["id"]})["id"]
    assert c.wait_state(cid, "done")["progress"]["total"] == 5
    mx.wait_for_messages(5)
    assert sorted(_by_rcpt(mx)) == [f"c{i}@dest.test" for i in range(5)]
