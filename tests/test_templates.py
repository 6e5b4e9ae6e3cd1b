"""Templates: the sandbox, errors with line and column found before anything is sent, MJML
and CSS done once with the Jinja intact, personalisation with defaults, versions over the API
and relayctl, a test message delivered to a fake MX, and the example newsletter responsive in
headless Chromium (one column at 375 px, three side by side at 1200 px)."""

from __future__ import annotations

import email
import email.policy
import json
from pathlib import Path

import pytest
from support import browser
from support.util import free_port, listening, mx_zone, wait_until
from test_api import Client

from relayd.templates import TemplateError, compile_template

ROOT = Path(__file__).resolve().parent.parent
NEWSLETTER = (ROOT / "conf/templates/newsletter.mjml").read_text()
COLUMNS = {(0xF4, 0xA2, 0x61): "sand", (0x2A, 0x9D, 0x8F): "teal", (0x8E, 0x5F, 0xA8): "plum"}
ANN = {
    "contact": {"email": "ann@dest.test", "first_name": "Ann", "city": "Lyon", "plan": "pro"},
    "data": {"issue": 7},
    "unsubscribe_url": "https://relay.test/unsubscribe/tok?a=1&b=2",
}


def newsletter(**defaults: str):
    return compile_template(
        "mjml", "{{ contact.first_name }}'s letter", "News", NEWSLETTER, "", defaults
    )


def test_jinja_survives_mjml_and_css_and_renders_per_contact_with_defaults():
    out = newsletter(city="your town").render(ANN)
    assert out.subject == "Ann's letter" and out.from_name == "News"
    assert "Hello Ann!" in out.html and "Events in Lyon" in out.html and "Pro tips" in out.html
    assert "{{" not in out.html and "{%" not in out.html
    assert 'href="https://relay.test/unsubscribe/tok?a=1&amp;b=2"' in out.html  # escaped once
    assert "@media" in out.html and 'style="' in out.html  # responsive rules kept, CSS inlined
    # the text part was made from the HTML, personalised the same way, links kept
    assert "Hello Ann!" in out.text and "ann@dest.test" in out.text and "<" not in out.text
    assert "(https://relay.test/unsubscribe/tok?a=1&b=2)" in out.text
    bob = newsletter(city="your town").render({"contact": {"email": "bob@dest.test"}})
    assert "Hello there!" in bob.html  # `| default(...)` in the template
    assert "Events in your town" in bob.html  # the template's defaults
    assert bob.subject == "'s letter"  # a missing attribute renders empty


def test_loops_conditions_and_comparisons_survive_the_mjml_renderer():
    source = """<mjml><mj-body><mj-section>
      {% for a in data.articles %}<mj-column><mj-text>{{ a.title }}{# a comment #}
        {{ "short" if a.words < 300 else "long" }}</mj-text>
        <mj-button href="{{ a.url }}?u={{ contact.email | urlencode }}">Read</mj-button>
      </mj-column>{% endfor %}
    </mj-section></mj-body></mjml>"""
    t = compile_template("mjml", "s", "", source, "", {})
    articles = [
        {"title": "One", "words": 100, "url": "https://a.test/1"},
        {"title": "Two", "words": 900, "url": "https://a.test/2"},
    ]
    out = t.render({"contact": {"email": "a+b@dest.test"}, "data": {"articles": articles}})
    # MJML sized the one column it saw: each of the loop's columns is full width (README)
    assert out.html.count('class="mj-outlook-group-fix mj-column-per-100"') == 2
    assert "One" in out.html and "short" in out.html and "Two" in out.html and "long" in out.html
    assert 'href="https://a.test/2?u=a%2Bb%40dest.test"' in out.html and "comment" not in out.html


def test_html_is_escaped_and_subject_text_are_not_and_headers_stay_one_line():
    t = compile_template(
        "html",
        "Hi {{ contact.name }}",
        "{{ data.brand }}",
        "<p>{{ contact.name }}</p>",
        "Hi {{ contact.name }}",
        {"brand": "Co"},
    )
    out = t.render({"contact": {"name": "<b>Ann & co</b>\r\nBcc: x@y"}, "data": {}})
    body = "<p>&lt;b&gt;Ann &amp; co&lt;/b&gt;\r\nBcc: x@y</p>"
    assert out.html == f"<html><head></head><body>{body}</body></html>"
    assert out.text == "Hi <b>Ann & co</b>\r\nBcc: x@y"
    assert out.subject == "Hi <b>Ann & co</b> Bcc: x@y" and out.from_name == "Co"


@pytest.mark.parametrize(
    ("kind", "parts", "field", "line", "column", "problem"),
    [
        ("html", {"subject": "Hi {{ contact.name | nofilter }}"}, "subject", 1, 4, "filter"),
        ("html", {"html": "<p>\n  {{ contact. }}</p>"}, "html", 2, 3, "expected name"),
        ("html", {"html": "a\n{% for x in data.items %}\n{{ x }}"}, "html", 3, 1, "endfor"),
        ("html", {"html": "<p>{{ contct.name }}</p>"}, "html", 1, 7, "unknown name 'contct'"),
        ("html", {"text": "x\n\n {{ 1 // 0 }}"}, "text", 3, 2, "ZeroDivisionError"),
        (
            "html",
            {"html": "{% if contact.vip %}\n{{ contact.x | bogus }}{% endif %}"},
            "html",
            2,
            16,
            "no filter named 'bogus'",
        ),
        (
            "mjml",
            {"html": "<mjml><mj-body>\n<mj-section><mj-column><mj-text>hi</mj-column>"},
            "mjml",
            2,
            1,
            "",
        ),
        (
            "mjml",
            {"html": "<mjml><mj-body>\n  <mj-include path='/etc/hostname' /></mj-body></mjml>"},
            "mjml",
            2,
            3,
            "include",
        ),
    ],
)
def test_errors_name_the_field_line_and_column(kind, parts, field, line, column, problem):
    given = {"subject": "s", "from_name": "", "html": "<p>x</p>", "text": "", **parts}
    with pytest.raises(TemplateError) as caught:
        compile_template(
            kind, given["subject"], given["from_name"], given["html"], given["text"], {}
        )
    exc = caught.value
    assert (exc.field, exc.line) == (field, line), exc
    if kind == "html":
        assert exc.column == column, exc
    assert problem in exc.problem


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ contact.__class__ }}",
        "{{ contact['__class__'] }}",
        "{% if contact.vip %}{{ data.seen.append(1) }}{% endif %}",  # a branch not taken
        "{{ data.update({'x': 1}) }}",
        "{{ cycler.__init__.__globals__ }}",
    ],
)
def test_sandbox_escapes_and_mutations_are_refused_when_compiled(source):
    with pytest.raises(TemplateError) as caught:
        compile_template("html", "s", "", source, "", {})
    assert "unsafe" in caught.value.problem or "change the data" in caught.value.problem
    assert caught.value.field == "html" and caught.value.line == 1


def test_an_unsafe_attribute_reached_only_by_a_contact_fails_that_render_and_changes_nothing():
    t = compile_template("html", "s", "", "{{ contact.tags.pop }}", "", {})
    tags = [1, 2]
    with pytest.raises(TemplateError) as caught:
        t.render({"contact": {"tags": tags}})
    assert "unsafe" in caught.value.problem and caught.value.line == 1 and tags == [1, 2]


def test_the_newsletter_is_one_column_on_a_phone_and_three_on_a_desktop(tmp_path):
    if browser.chromium() is None:
        pytest.fail("chromium is not installed: scripts/bootstrap --test installs it")
    page = newsletter().render(ANN).html
    seen = {}
    for width in (375, 1200):
        pixels = browser.screenshot(page, width, 2400, tmp_path / f"newsletter-{width}.png")
        assert len(pixels) == 2400 and len(pixels[0]) == width
        rows = [{COLUMNS[p] for p in row if p in COLUMNS} for row in pixels]
        seen[width] = (max(len(r) for r in rows), set().union(*rows))
    assert seen[375] == (1, set(COLUMNS.values()))  # all three there, never two on a row
    assert seen[1200] == (3, set(COLUMNS.values()))  # some row crosses all three


@pytest.fixture
def client(relay, dns_server):
    """relayd with an API listener, and a key with the campaigns scope (Client.token is one
    without it)."""
    mx_zone(dns_server, "dest.test", (10, "mx.dest.test", "127.0.0.10"))
    port = free_port()
    listeners = [
        {"address": f"127.0.0.1:{free_port()}", "kind": "relay"},
        {"address": f"127.0.0.1:{port}", "kind": "http"},
    ]
    r = relay({"listeners": listeners, "auth": {"users_file": "users.json"}})
    wait_until(lambda: listening(port), 10, "the API listener")
    return Client(r, port)


def _template(c: Client, body: dict, token: str) -> tuple[int, dict]:
    code, _, doc = c.call("POST", "/v1/templates", body, token=token)
    return code, doc


def test_templates_over_the_api_version_preview_and_send_a_test_to_a_fake_mx(client, fake_mx):
    mx = fake_mx()
    c = client
    token = c.key("marketing", "--sender", "example.test", "--scope", "campaigns")
    body = {
        "name": "letter",
        "kind": "mjml",
        "subject": "Hi {{ contact.first_name }}",
        "from_name": "The Letter",
        "mjml": NEWSLETTER,
        "defaults": {"city": "your town"},
    }
    assert _template(c, body, token) == (201, {"name": "letter", "version": 1})
    assert (
        _template(c, {**body, "subject": "Hello {{ contact.first_name }}"}, token)[1]["version"]
        == 2
    )
    # an error: 422 with field, line and column, and no version 3
    bad = {**body, "mjml": NEWSLETTER.replace("{{ contact.email }}", "{{ contact.email | x }}")}
    code, doc = _template(c, bad, token)
    line = NEWSLETTER[: NEWSLETTER.index("{{ contact.email }}")].count("\n") + 1
    assert code == 422 and doc["field"] == "mjml" and doc["line"] == line, doc
    assert doc["column"] > 1 and "no filter named 'x'" in doc["detail"].lower()
    code, _, listed = c.call("GET", "/v1/templates", token=token)
    assert code == 200 and [
        (t["name"], t["version"], t["versions"]) for t in listed["templates"]
    ] == [("letter", 2, 2)]
    code, _, first = c.call("GET", "/v1/templates/letter?version=1", token=token)
    assert code == 200 and first["subject"] == "Hi {{ contact.first_name }}"
    assert first["mjml"] == NEWSLETTER
    assert c.call("GET", "/v1/templates/letter?version=9", token=token)[0] == 404
    assert c.call("GET", "/v1/templates", token=c.token)[0] == 403  # no campaigns scope
    # preview: the contact's attributes, the defaults for what it lacks
    ask = {"contact": {"email": "ann@dest.test", "attributes": {"first_name": "Ann"}}}
    code, _, shown = c.call("POST", "/v1/templates/letter/preview", ask, token=token)
    assert code == 200 and shown["subject"] == "Hello Ann" and shown["version"] == 2
    assert shown["from"] == "The Letter" and "Events in your town" in shown["html"]
    assert "ann@dest.test" in shown["text"]
    # a test message, through the sending API's own path, to the fake MX
    ask = {**ask, "to": "ann@dest.test", "from": "news@example.test", "data": {"issue": 3}}
    code, _, sent = c.call("POST", "/v1/templates/letter/test", ask, token=token)
    assert code == 202 and sent["queue_id"] and sent["to"] == "ann@dest.test"
    data = mx.wait_for_messages(1)[0].data.replace(b"\r\n", b"\n")
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg["Subject"] == "Hello Ann" and msg["From"] == "The Letter <news@example.test>"
    assert msg.get_content_type() == "multipart/alternative"
    html = msg.get_body(("html",)).get_content()
    assert "Issue 3" in html and "Hello Ann!" in html
    assert "Hello Ann!" in msg.get_body(("plain",)).get_content()
    ask["from"] = "news@elsewhere.test"  # not a sender of the key: refused, as for /v1/messages
    code, _, doc = c.call("POST", "/v1/templates/letter/test", ask, token=token)
    assert code == 403 and doc["field"] == "from"
    assert c.call("DELETE", "/v1/templates/letter", token=token)[0] == 200
    assert c.call("GET", "/v1/templates/letter", token=token)[0] == 404


def test_relayctl_adds_lists_shows_and_previews_and_prints_file_line_column(client, tmp_path):
    c = client
    source = tmp_path / "letter.mjml"
    source.write_text(NEWSLETTER.replace("{{ contact.email }}", "{{ contact.email | nope }}"))
    failed = c.relay.ctl("template", "add", "letter", str(source), "--subject", "Hi", check=False)
    line = NEWSLETTER[: NEWSLETTER.index("{{ contact.email }}")].count("\n") + 1
    assert failed.returncode == 1
    assert (
        f"{source}:{line}:" in failed.stderr and "no filter named 'nope'" in failed.stderr.lower()
    )
    source.write_text(NEWSLETTER)
    out = c.relay.ctl(
        "template",
        "add",
        "letter",
        str(source),
        "--subject",
        "Hi {{ contact.first_name }}",
        "--defaults",
        '{"city": "your town"}',
    )
    assert out.stdout.strip() == "letter: version 1 (mjml)"
    bad = c.relay.ctl("template", "add", "letter", str(source), "--subject", "{{ x", check=False)
    assert bad.returncode == 1 and "--subject:1:1:" in bad.stderr
    listed = json.loads(c.relay.ctl("template", "ls", "--json").stdout)
    assert [(t["name"], t["version"]) for t in listed] == [("letter", 1)]
    shown = c.relay.ctl("template", "show", "letter").stdout
    assert "subject: Hi {{ contact.first_name }}" in shown and NEWSLETTER.strip() in shown
    ann = json.dumps({"email": "ann@dest.test", "attributes": {"first_name": "Ann"}})
    preview = json.loads(
        c.relay.ctl("template", "preview", "letter", "--contact", ann, "--json").stdout
    )
    assert preview["subject"] == "Hi Ann" and "Events in your town" in preview["html"]
