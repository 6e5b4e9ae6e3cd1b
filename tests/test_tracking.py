"""Open and click tracking: HTML sent through the API of a real relayd, read at a fake MX, its
pixel and links followed over real HTTP; the events in GET /v1/events and at a real webhook
receiver; forged tokens, bots and opting out; rewrite() and the hit rules on their own."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import http.client
import ipaddress
import json
import re
import sqlite3
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from support.receiver import Receiver
from support.util import free_port, listening, mx_zone, wait_until
from test_api import Client

from relayd.config import ConfigError, load
from relayd.events.records import Event, Type
from relayd.feedback.tokens import CLICK, OPEN, BadToken, Tokens
from relayd.ingress.api.compose import Limits, compose
from relayd.ingress.api.schema import Send
from relayd.ingress.credentials import Credential
from relayd.spool import engagement, store
from relayd.tracking import Tracker, hits

ROOT = Path(__file__).resolve().parent.parent
QUEUE_ID = "0123456789ABCDEF"
TOKENS = Tokens(b"k" * 32)
BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
HTML = (
    "<html><body><p>Hello {{ name }},</p>"
    '<p><a href="https://shop.test/sale?a=1&amp;b=%22x%22" class="button">Shop</a></p>'
    "<p><a href='https://shop.test/q?say=\"hi\"'>Quote</a></p>"
    '<p><a href="mailto:help@example.test">Mail us</a></p>'
    '<p><a class="small notrack" href="https://example.test/privacy">Privacy</a></p>'
    "</body></html>"
)


def _config(base: str = "https://t.example.test", **over: Any) -> Any:
    path = ROOT / "conf" / "relayd.toml"
    cfg = load(path).tracking
    return dataclasses.replace(cfg, base_url=base, **over)


def _links(html: str) -> list[str]:
    return re.findall(r"""href=["']?([^"'\s>]+)""", html)


# -- rewrite() ------------------------------------------------------------------------------


def test_rewrite_tracks_web_links_and_adds_the_pixel_and_leaves_the_rest():
    unsubscribe = "https://mail.example.test/unsubscribe/TOKEN"
    tracker = Tracker(_config(untracked=("https://mail.example.test/unsubscribe/",)), TOKENS)
    page = HTML.replace("</body>", f'<a href="{unsubscribe}">Unsubscribe</a></body>')
    page += '<a data-notrack href="https://x.test/">kept</a><a href=https://bare.test/p>bare</a>'
    out = tracker.rewrite(page, QUEUE_ID, "ann@dest.test")
    links = _links(out)
    tracked = [u for u in links if u.startswith("https://t.example.test/c/")]
    assert len(tracked) == 3  # the two shop links and the bare one
    targets = [TOKENS.tracked(CLICK, u.rsplit("/", 1)[1]) for u in tracked]
    assert targets == [
        (QUEUE_ID, "ann@dest.test", "https://shop.test/sale?a=1&b=%22x%22"),  # &amp; decoded
        (QUEUE_ID, "ann@dest.test", 'https://shop.test/q?say="hi"'),  # quotes kept
        (QUEUE_ID, "ann@dest.test", "https://bare.test/p"),
    ]
    for kept in ("mailto:help@example.test", "https://example.test/privacy", unsubscribe):
        assert kept in links
    assert 'data-notrack href="https://x.test/"' in out and 'class="button"' in out
    (pixel,) = re.findall(r'<img src="https://t\.example\.test/o/([\w-]+)\.gif"', out)
    assert TOKENS.tracked(OPEN, pixel) == (QUEUE_ID, "ann@dest.test", "")
    assert out.index("/o/") < out.index("</body>")  # before </body>, inside the document


def test_rewrite_honours_the_callers_and_the_configs_choices():
    tracker = Tracker(_config(), TOKENS)
    assert tracker.rewrite(HTML, QUEUE_ID, "a@b.test", opens=False, clicks=False) == HTML
    no_pixel = tracker.rewrite(HTML, QUEUE_ID, "a@b.test", opens=False)
    assert "/o/" not in no_pixel and "/c/" in no_pixel
    no_links = tracker.rewrite(HTML, QUEUE_ID, "a@b.test", clicks=False)
    assert "/c/" not in no_links and no_links.count("/o/") == 1
    assert Tracker(_config(clicks=False), TOKENS).rewrite(HTML, QUEUE_ID, "a@b.test") == no_links
    assert Tracker(_config(enabled=False), TOKENS).rewrite(HTML, QUEUE_ID, "a@b.test") == HTML
    fragment = tracker.rewrite("<p>no body</p>", QUEUE_ID, "a@b.test")  # the pixel at its end
    assert fragment.startswith("<p>no body</p><img src=")
    again = tracker.rewrite(no_pixel, QUEUE_ID, "a@b.test", opens=False)  # tracked links stay
    assert again == no_pixel


def test_rewrite_of_a_20kb_newsletter_takes_well_under_a_millisecond():
    tracker = Tracker(_config(), TOKENS)
    block = (
        '<tr><td style="padding:12px;font-family:Arial,sans-serif"><h2>Story {i}</h2>'
        "<p>" + "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 6 + "</p>"
        '<a href="https://news.example.test/story/{i}?utm_source=mail&amp;utm_medium=email"'
        ' style="color:#06c">Read more</a></td></tr>'
    )
    page = "<html><body><table>" + "".join(block.format(i=i) for i in range(40))
    page += "</table></body></html>"
    assert 19_000 < len(page) < 23_000
    rounds = 200
    start = time.perf_counter()
    for _ in range(rounds):
        out = tracker.rewrite(page, QUEUE_ID, "ann@dest.test")
    per = (time.perf_counter() - start) / rounds
    print(f"rewrite of a {len(page)} byte newsletter with 40 links: {per * 1e6:.0f} us")
    assert out.count("/c/") == 40 and per < 0.002


# -- tokens, clients, the hit rules -----------------------------------------------------------


def test_a_forged_altered_truncated_or_misused_token_is_refused():
    token = TOKENS.track(CLICK, QUEUE_ID, "ann@dest.test", "https://shop.test/")
    assert TOKENS.tracked(CLICK, token)[2] == "https://shop.test/"
    flipped = token[:12] + ("A" if token[12] != "A" else "B") + token[13:]
    forged = Tokens(b"x" * 32).track(CLICK, QUEUE_ID, "ann@dest.test", "https://evil.test/")
    for bad in (flipped, token[:-3], forged, "", "!!!", token + "AA"):
        with pytest.raises(BadToken):
            TOKENS.tracked(CLICK, bad)
    with pytest.raises(BadToken):  # a click token is no pixel, nor the other way
        TOKENS.tracked(OPEN, token)


def test_the_client_is_the_peer_unless_a_trusted_proxy_names_another():
    proxies = (ipaddress.ip_network("10.0.0.0/8"),)
    assert hits.client_of("192.0.2.9", "17.1.2.3", proxies) == "192.0.2.9"  # not a proxy
    assert hits.client_of("10.0.0.2", "17.1.2.3", ()) == "10.0.0.2"  # no proxies trusted
    assert hits.client_of("10.0.0.2", "6.6.6.6, 17.1.2.3, 10.0.0.7", proxies) == "17.1.2.3"
    assert hits.client_of("10.0.0.2", "", proxies) == "10.0.0.2"
    assert hits.client_of("10.0.0.2", "junk, 17.1.2.3", proxies) == "17.1.2.3"
    assert hits.client_of("10.0.0.2", "17.1.2.3, junk", proxies) == "10.0.0.2"


def test_a_click_just_after_delivery_is_a_scanners_and_counts_nothing(spool_conn):
    routes = hits.Hits(_config(enabled=True), TOKENS)
    token = TOKENS.track(CLICK, QUEUE_ID, "ann@dest.test", "https://shop.test/")
    delivered = Event(Type.DELIVERY, QUEUE_ID, 1000.0, {"rcpt": "ann@dest.test"})
    store.append_events(spool_conn, [delivered])

    def click(at: float, agent: str = BROWSER, method: str = "GET") -> dict[str, Any]:
        hit = routes.hit(CLICK, token, method, {"user-agent": agent}, "192.0.2.1", at)
        return hits.record(spool_conn, hit, False, 10.0).data

    assert (click(1004.0)["bot"], click(1004.0)["human"]) == ("fast_click", False)
    assert click(1020.0, "Mozilla/5.0 (compatible; BingPreview/1.0b)")["bot"] == "scanner"
    assert click(1020.0, method="HEAD")["bot"] == "head"
    assert engagement.counts(spool_conn, QUEUE_ID, "ann@dest.test") is None  # none counted
    first, second = click(1020.0), click(1030.0)
    assert (first["human"], first["unique"], second["unique"]) == (True, True, False)
    assert engagement.counts(spool_conn, QUEUE_ID, "ann@dest.test") == (0, 2)
    pixel = TOKENS.track(OPEN, QUEUE_ID, "ann@dest.test")
    hit = routes.hit(OPEN, pixel, "GET", {"user-agent": "Mozilla/5.0"}, "192.0.2.1", 1040.0)
    assert hit.bot == "apple_mpp"  # Apple's bare User-Agent
    counted = hits.record(spool_conn, hit, True, 10.0).data  # count_bots: counted, flagged
    assert (counted["human"], counted["bot"], counted["unique"]) == (False, "apple_mpp", True)
    assert engagement.counts(spool_conn, QUEUE_ID, "ann@dest.test") == (1, 2)


# -- config -----------------------------------------------------------------------------------

_HTTP = '[[listeners]]\naddress = "127.0.0.1:8025"\nkind = "http"\n'


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[tracking]\nenabled = true\n", "tracking.base_url", "required when tracking"),
        ('[tracking]\nbase_url = "http://t.example.test"\n', "tracking.base_url", "https://"),
        ('[tracking]\nbase_url = "https://t.test/v1/t"\n', "tracking.base_url", "/v1/"),
        ('[tracking]\nbase_url = "https://t.test/t?x=1"\n', "tracking.base_url", "no query"),
        ('[tracking]\ntrusted_proxies = ["10.0.0/33"]\n', "tracking.trusted_proxies[0]", "CIDR"),
        ('[tracking]\nscanner_user_agents = ["(a"]\n', "tracking.scanner_user_agents[0]", "regu"),
        ('[tracking]\nclick_window = "-1s"\n', "tracking.click_window", "duration"),
        ('[tracking]\nuntracked = ["ftp://x"]\n', "tracking.untracked[0]", "http(s) URL prefix"),
        ("[tracking]\ncount = true\n", "tracking.count", "unknown key"),
    ],
)
def test_tracking_mistakes_are_refused(tmp_path, text, key, problem):
    path = tmp_path / "relayd.toml"
    path.write_text(_HTTP + text)
    with pytest.raises(ConfigError, match=re.escape(key)) as info:
        load(path)
    assert problem in str(info.value)


def test_tracking_is_off_by_default_and_the_example_documents_every_key(tmp_path):
    path = tmp_path / "relayd.toml"
    path.write_text("")
    default = load(path).tracking
    assert not default.enabled and default.click_window == 10 and not default.count_bots
    example = load(ROOT / "conf" / "relayd.toml").tracking
    assert example.enabled and example.base_url == "http://127.0.0.1:8025/t"
    assert example.untracked == ("http://127.0.0.1:8025/unsubscribe/",)  # its own links
    assert dataclasses.replace(example, enabled=False, base_url="", untracked=()) == default
    section = (ROOT / "conf" / "relayd.toml").read_text().split("\n[tracking]", 1)[1]
    for name in default.__dataclass_fields__:
        assert f"\n{name} = " in section, name
    path.write_text(f'{_HTTP}[unsubscribe]\nurl = "https://m.test/u/"\n[tracking]\n')
    assert load(path).tracking.untracked == ("https://m.test/u/",)  # never a tracked link


# -- end to end -------------------------------------------------------------------------------


@pytest.fixture
def tracked(relay, dns_server, fake_mx):
    """A relayd with an API listener and tracking on it (behind a "proxy" on 127.0.0.1)."""

    def make(**tracking: Any) -> Client:
        port = free_port()
        config = {
            "listeners": [
                {"address": f"127.0.0.1:{free_port()}", "kind": "relay"},
                {"address": f"127.0.0.1:{port}", "kind": "http"},
            ],
            "auth": {"users_file": "users.json"},
            "tracking": {
                "enabled": True,
                "base_url": f"http://127.0.0.1:{port}/t",
                "trusted_proxies": ["127.0.0.1/32"],
                "click_window": "0s",
                **tracking,
            },
        }
        r = relay(config)
        wait_until(lambda: listening(port), 10, "the API listener")
        return Client(r, port)

    mx_zone(dns_server, "dest.test", (10, "mx.dest.test", "127.0.0.10"))
    return make


def _html_of(data: bytes) -> str:
    msg = email.message_from_bytes(data.replace(b"\r\n", b"\n"), policy=email.policy.default)
    return msg.get_body(preferencelist=("html",)).get_content()


def _get(url: str, method: str = "GET", **headers: str) -> tuple[int, dict[str, str], bytes]:
    """One request, redirects not followed."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request(method, parts.path, headers={"User-Agent": BROWSER, **headers})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def _events(c: Client, types: str) -> list[dict[str, Any]]:
    code, _, page = c.call("GET", f"/v1/events?type={types}")
    assert code == 200
    return page["events"]


def test_opens_and_clicks_are_served_counted_and_reach_the_events_and_a_webhook(tracked, fake_mx):
    mx = fake_mx()
    c = tracked()
    hooks = c.key("hooks", "--sender", "example.test", "--scope", "webhooks")
    receiver = Receiver().start()
    try:
        code, _, added = c.call(
            "POST", "/v1/webhooks", {"url": receiver.url, "events": ["opened", "clicked"]}, hooks
        )
        assert code == 201
        receiver.secrets = [added["secret"]]
        code, _, sent = c.send(
            {
                "from": "news@example.test",
                "recipients": [{"email": "ann@dest.test", "substitutions": {"name": "Ann"}}],
                "subject": "Sale",
                "html": HTML,
                "text": "Hello\n",
                "metadata": {"campaign": "spring", "variant": "A"},
            }
        )
        assert code == 202
        queue_id = sent["results"][0]["message_id"]
        (got,) = mx.wait_for_messages(1)
        html = _html_of(got.data)
        assert "Hello Ann," in html and "mailto:help@example.test" in html
        assert 'href="https://example.test/privacy"' in html  # notrack
        base = f"http://127.0.0.1:{c.port}/t"
        pixel = re.search(rf'src="({re.escape(base)}/o/[\w-]+\.gif)"', html).group(1)
        shop, quote = re.findall(rf'href="({re.escape(base)}/c/[\w-]+)"', html)

        with urllib.request.urlopen(pixel, timeout=10) as resp:  # as a mail client loads it
            assert resp.status == 200 and resp.headers["Content-Type"] == "image/gif"
            assert "no-store" in resp.headers["Cache-Control"]
            assert resp.read().startswith(b"GIF89a")
        assert _get(pixel)[0] == 200
        code, headers, _ = _get(shop)
        assert code == 302 and headers["location"] == "https://shop.test/sale?a=1&b=%22x%22"
        assert _get(shop)[0] == 302
        code, headers, _ = _get(quote)
        assert code == 302 and headers["location"] == "https://shop.test/q?say=%22hi%22"

        opened, clicked = _events(c, "opened"), _events(c, "clicked")
        assert [e["unique"] for e in opened] == [True, False]
        assert [e["unique"] for e in clicked] == [True, False, False]
        first = clicked[0]
        assert first["queue_id"] == queue_id and first["rcpt"] == "ann@dest.test"
        assert first["url"] == "https://shop.test/sale?a=1&b=%22x%22"
        assert (first["human"], first["bot"], first["client"]) == (True, None, "127.0.0.1")
        assert first["user_agent"] == BROWSER
        assert first["meta"] == {"campaign": "spring", "variant": "A"}
        assert all(e["human"] for e in opened + clicked)

        # a forged, altered or truncated token: 404, and nothing counted
        token = shop.rsplit("/", 1)[1]
        flipped = token[:20] + ("A" if token[20] != "A" else "B") + token[21:]
        forged = Tokens(b"f" * 32).track(CLICK, queue_id, "ann@dest.test", "https://evil.test/")
        for bad in (flipped, token[:-4], forged):
            code, headers, _ = _get(f"{base}/c/{bad}")
            assert code == 404 and "location" not in headers
        assert _get(pixel.replace("/o/", "/c/"))[0] == 404  # a pixel's token is no link
        assert _get(f"{base}/o/")[0] == 404
        assert c.call("POST", urlsplit(pixel).path)[0] == 405

        # machines: Apple's proxy (named by the trusted proxy), a scanner, a HEAD
        _get(pixel, **{"X-Forwarded-For": "17.58.63.1"})
        _get(shop, **{"User-Agent": "Mozilla/5.0 (compatible; BingPreview/1.0b)"})
        assert _get(shop, "HEAD")[0] == 302
        opened, clicked = _events(c, "opened"), _events(c, "clicked")
        assert len(opened) == 3 and len(clicked) == 5  # the bad tokens made none
        apple, scanner, head = opened[2], clicked[3], clicked[4]
        assert (apple["human"], apple["bot"], apple["client"]) == (False, "apple_mpp", "17.58.63.1")
        assert (scanner["human"], scanner["bot"], scanner["unique"]) == (False, "scanner", False)
        assert (head["human"], head["bot"]) == (False, "head")
        with sqlite3.connect(c.relay.spool) as db:
            row = db.execute(
                "SELECT opens, clicks, first_open <= first_click FROM engagement"
                " WHERE queue_id = ?",
                (queue_id,),
            ).fetchone()
        assert row == (2, 3, 1)  # people's hits only

        def hooked() -> list[dict[str, Any]]:
            events = receiver.events()
            return events if len(events) >= 8 else []

        events = receiver.wait(hooked, 15, "8 tracking events at the webhook")
        assert not receiver.bad
        kinds = [e["type"] for e in events]
        assert kinds.count("message.opened") == 3 and kinds.count("message.clicked") == 5
        hook = next(e for e in events if e["type"] == "message.clicked")["data"]
        assert hook["url"] == "https://shop.test/sale?a=1&b=%22x%22" and hook["unique"] is True
        assert hook["meta"]["campaign"] == "spring" and hook["queue_id"] == queue_id
    finally:
        receiver.stop()
    assert len(c.relay.events("opened")) == 3  # and the log lines, once committed


def test_a_key_with_tracking_off_or_a_request_opting_out_gets_its_html_untouched(tracked, fake_mx):
    mx = fake_mx()
    c = tracked()
    quiet = c.key("quiet", "--sender", "example.test", "--no-tracking")
    keys = json.loads(c.relay.ctl("--json", "key", "list").stdout)["keys"]
    assert {k["name"]: k["tracking"] for k in keys} == {"app": True, "quiet": False}
    message = {"from": "news@example.test", "to": ["ann@dest.test"], "html": HTML}
    assert c.send(message, token=quiet)[0] == 202
    assert c.send({**message, "tracking": {"opens": False, "clicks": False}})[0] == 202
    assert c.send({**message, "tracking": {"opens": False}})[0] == 202
    code, _, bad = c.send({**message, "tracking": {"pixel": False}})
    assert code == 422 and bad["field"] == "tracking" and "pixel" in bad["detail"]
    htmls = [_html_of(m.data) for m in mx.wait_for_messages(3)]  # in any order
    untouched = [h.strip() for h in htmls if "/t/c/" not in h]
    (links_only,) = [h for h in htmls if "/t/c/" in h]
    assert untouched == [HTML, HTML]  # the key's and the opted-out request's
    assert "/o/" not in links_only and links_only.count(f"127.0.0.1:{c.port}/t/c/") == 2
    c.relay.ctl("key", "set", "quiet", "--tracking")
    keys = json.loads(c.relay.ctl("--json", "key", "list").stdout)["keys"]
    assert all(k["tracking"] for k in keys)


def test_compose_tracks_a_message_to_several_recipients_as_a_whole():
    tracker = Tracker(_config(), TOKENS)
    key = Credential("app", "", ("example.test",), kind="key")
    request = Send(sender="news@example.test", to=["a@dest.test", "b@dest.test"], html=HTML)
    limits = Limits(10, 10**6, "relay.test")
    (msg,), _ = compose(request, key, "127.0.0.1", limits, 0.0, lambda *_: {}, tracker)
    (pixel,) = re.findall(rb"/o/([\w-]+)\.gif", msg.body)
    assert TOKENS.tracked(OPEN, pixel.decode()) == (msg.queue_id, "", "")  # no one recipient
    quiet = dataclasses.replace(key, tracking=False)
    (msg,), _ = compose(request, quiet, "127.0.0.1", limits, 0.0, lambda *_: {}, tracker)
    assert b"t.example.test" not in msg.body
