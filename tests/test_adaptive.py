"""Sites by provider and adaptive shaping. The scheduler alone (real spool writer, intake, SMTP
client, fake MX hosts behind the test DNS server, on a wall clock the test moves) for the
provider's shared site, suspensions and slowed rates; the config and rules files' errors; and a
real relayd for a Yahoo TSS04 reply end to end: the event, relayctl shaping list, a restart that
keeps the hold, relayctl shaping clear and the mail that then flows."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from support.dnsserver import TestDNSServer
from support.fakemx import FakeMX
from support.queue import START, Clock, until
from support.util import mx_zone, send, wait_until

from relayd import config as configuration
from relayd.config import ConfigError, Rate, load
from relayd.delivery.dns import Resolver
from relayd.mime.dkim import Signer
from relayd.model.ids import new_queue_id
from relayd.model.message import NewMessage
from relayd.outcomes.classify import Classifier
from relayd.queue.intake import Intake
from relayd.queue.scheduler import Scheduler, Settings
from relayd.shaping.adaptive import RATE, SUSPEND, Holds, Meter, Rules
from relayd.spool import schema
from relayd.spool.space import FreeSpace
from relayd.spool.writer import Writer

ROOT = Path(__file__).resolve().parent.parent

# Real replies, as relayd keeps them (the client drops "421-" and joins lines with newlines).
TSS04 = (
    "4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred due to unexpected volume or"
    " user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes"
)
GMAIL_UNUSUAL = (
    "4.7.28 [127.0.0.1      15] Our system has detected an unusual rate of\n"
    "4.7.28 unsolicited mail originating from your IP address. To protect our\n"
    "4.7.28 users from spam, mail sent from your IP address has been temporarily\n"
    "4.7.28 rate limited. Please visit\n"
    "4.7.28  https://support.google.com/mail/?p=UnsolicitedRateLimitError to\n"
    "4.7.28 review our Bulk Email Senders Guidelines. a1si123456 - gsmtp"
)
GMAIL_RECEIVING = (
    "4.2.1 The user you are trying to contact is receiving mail at a rate that\n"
    "4.2.1 prevents additional messages from being delivered. Please resend your\n"
    "4.2.1 message at a later time. If the user is able to receive mail at that\n"
    "4.2.1 time, your message will be delivered. For more information, please\n"
    "4.2.1 visit https://support.google.com/mail/?p=ReceivingRate a1si123456 - gsmtp"
)
GMAIL_TRY_LATER = (
    "4.7.0 Try again later, closing connection. (EHLO)\n"
    "4.7.0 For more information, go to\n"
    "4.7.0  https://support.google.com/a/answer/3221692 a1si123456 - gsmtp"
)
OUTLOOK_REPUTATION = (
    "4.7.650 The mail server [127.0.0.1] has been temporarily rate limited due to IP"
    " reputation. For e-mail delivery information, see https://postmaster.live.com (S775)"
    " [AM0PR01MB1234.eurprd01.prod.exchangelabs.com]"
)


def wire(code: int, text: str) -> str:
    """A reply as the server sends it: "421-" on each line but the last's "421 "."""
    lines = text.split("\n")
    return "\n".join([*(f"{code}-{line}" for line in lines[:-1]), f"{code} {lines[-1]}"])


Body = Callable[[Intake, Scheduler, Clock, Path], Awaitable[None]]


def run_queue(tmp_path: Path, dns: TestDNSServer, port: int, toml: str, body: Body) -> None:
    """The queue process's parts in one loop, on ``toml`` (added to a config that resolves MX
    hosts through ``dns`` and delivers on ``port``)."""
    path = tmp_path / "relayd.toml"
    path.write_text(
        "[server]\nspool_path = 'spool.sqlite'\nmin_free_space = '0'\n"
        f"[dns]\nnameservers = ['{dns.address}']\ntimeout = '2s'\n"
        f"[delivery]\nport = {port}\nidle_connection_time = '0.3s'\n"
        "[retry]\nfirst = '1h'\nmax_interval = '1h'\njitter = 0.0\nmax_age = '5d'\n" + toml
    )
    config = configuration.load(path)
    spool = config.server.spool_path
    schema.prepare(spool)
    clock = Clock()
    settings = Settings(
        "relay.test",
        config.delivery,
        config.routes,
        config.shaping,
        config.retry,
        config.pools,
        Classifier(config.bounces),
        config.suppression,
    )

    async def main() -> None:
        writer = Writer(spool, asyncio.get_running_loop())
        resolver = Resolver(config.dns.nameservers, config.dns.timeout)
        scheduler = Scheduler(settings, writer, resolver, clock)
        intake = Intake(
            writer, scheduler, Signer(config.dkim, path), "relay.test", FreeSpace(spool, 0), clock
        )
        await scheduler.load_holds()
        scheduler.start(intake.dsn)
        try:
            await body(intake, scheduler, clock, spool)
        finally:
            await scheduler.stop(5)
            intake.close()
            writer.close()

    asyncio.run(main())


def message(rcpt: str, received_at: float) -> NewMessage:
    body = b"Subject: adaptive\r\n\r\nbody\r\n"
    return NewMessage(
        new_queue_id(), "a@s.test", [rcpt], body, "127.0.0.1", "t", "t", False, received_at
    )


def rows(spool: Path, sql: str, *args: Any) -> list[tuple]:
    with sqlite3.connect(spool) as db:
        return db.execute(sql, args).fetchall()


def events(spool: Path, kind: str) -> list[dict[str, Any]]:
    return [json.loads(r[0]) for r in rows(spool, "SELECT data FROM events WHERE type = ?", kind)]


POOL = "[pools.main]\nsources = [{ address = '127.0.0.1', ehlo = 'relay.test' }]\n"


# -- sites by provider ------------------------------------------------------------------------


@pytest.mark.parametrize("providers", [True, False])
def test_domains_with_different_mx_hosts_of_one_provider_share_its_max_connections(
    tmp_path, dns_server, mx_port, providers
):
    """a.test's MX is mx.a.google.test, b.test's aspmx.google.test (both served by one fake
    MX that holds each message a while): under the provider *.google.test with
    max_connections = 1 they get one connection at a time between them; without providers,
    each MX host set is a site of its own, and both connect at once."""
    mx = FakeMX("127.0.0.21", mx_port, accept_delay=0.3).start()
    mx_zone(dns_server, "a.test", (10, "mx.a.google.test", "127.0.0.21"))
    mx_zone(dns_server, "b.test", (10, "aspmx.google.test", "127.0.0.21"))
    toml = "[shaping.default]\nmax_connections = 1\n"
    if providers:
        toml += "[shaping.providers.gtest]\nmx = ['*.google.test']\n"
    else:
        toml += "[shaping.providers]\n"
    try:

        async def body(intake: Intake, scheduler: Scheduler, clock: Clock, _: Path) -> None:
            msgs = [message(f"u{i}@{d}.test", clock.now) for i in range(3) for d in "ab"]
            await intake.submit(msgs)
            await until(lambda: len(mx.messages) == 6, "six deliveries")

        run_queue(tmp_path, dns_server, mx_port, toml, body)
        assert mx.max_concurrent_connections == (1 if providers else 2)
    finally:
        mx.stop()


def test_a_provider_table_sets_the_limits_of_its_site_and_inherits_the_rest(tmp_path):
    path = tmp_path / "relayd.toml"
    path.write_text(
        "[shaping.default]\nmax_connections = 7\nmax_rate = '10/s'\n"
        "[shaping.providers.google]\nmx = ['*.Google.com.', '*.googlemail.com']\n"
        "max_connections = 3\n"
    )
    shaping = load(path).shaping
    assert list(shaping.providers) == ["google"]  # written out: only those listed
    google = shaping.for_lane("provider:google")
    assert (google.max_connections, google.max_rate) == (3, Rate(10, 1))
    assert shaping.providers["google"].mx == ("*.google.com", "*.googlemail.com")
    assert shaping.provider_of(["alt1.aspmx.l.google.com", "mx.example.test"]) == "google"
    assert shaping.provider_of(["google.com.evil.test"]) == ""
    shipped = load(ROOT / "conf" / "relayd.toml").shaping  # no table: the large providers
    assert set(shipped.providers) == {"google", "microsoft", "yahoo", "apple"}
    for host, provider in (
        ("gmail-smtp-in.l.google.com", "google"),
        ("outlook-com.olc.protection.outlook.com", "microsoft"),
        ("contoso-com.mail.protection.outlook.com", "microsoft"),
        ("mta5.am0.yahoodns.net", "yahoo"),
        ("mx01.mail.icloud.com", "apple"),
    ):
        assert shipped.provider_of([host]) == provider
        assert shipped.for_lane(f"provider:{provider}") == shipped.default


# -- config and rules errors ------------------------------------------------------------------


def _refused(path: Path, key: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(path)
    assert (info.value.path, info.value.key) == (str(path), key), str(info.value)
    return info.value.problem


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[shaping.providers.Big]\nmx = ['*.big.test']\n", "shaping.providers.Big", "lower-case"),
        ("[shaping.providers.big]\nmax_connections = 3\n", "shaping.providers.big.mx", "needs"),
        ("[shaping.providers.big]\nmx = ['*']\n", "shaping.providers.big.mx[0]", "pattern"),
        ("[shaping.providers.big]\nmx = ['a b']\n", "shaping.providers.big.mx[0]", "pattern"),
        (
            "[shaping.providers.big]\nmx = ['*.b.test']\nmx_hosts = 1\n",
            "shaping.providers.big.mx_hosts",
            "unknown key",
        ),
        (
            "[shaping.providers.big]\nmx = ['*.b.test']\nmax_connections = 0\n",
            "shaping.providers.big.max_connections",
            "from 1",
        ),
        ("[shaping]\nadaptive = 'yes'\n", "shaping.adaptive", "must be a bool"),
        ("[shaping]\nlocal_rules_file = 'none.toml'\n", "shaping.local_rules_file", "cannot read"),
    ],
)
def test_provider_and_adaptive_keys_are_checked(tmp_path, text, key, problem):
    path = tmp_path / "relayd.toml"
    path.write_text(text)
    assert problem in _refused(path, key)


RULE = "name = 'r'\nprovider = 'yahoo'\ncode = 421\naction = 'suspend'\nduration = '2h'\n"


@pytest.mark.parametrize(
    ("rules", "key", "problem"),
    [
        ("[[rules]]\n" + RULE.replace("name = 'r'\n", ""), "rules[0].name", "needs a name"),
        ("[[rules]]\n" + RULE.replace("'yahoo'", "'yahooo'"), "rules[0].provider", "yahooo"),
        ("[[rules]]\n" + RULE.replace("code = 421\n", ""), "rules[0]", "at least one of"),
        ("[[rules]]\n" + RULE.replace("421", "'4[2'"), "rules[0].code", "not a regular expr"),
        ("[[rules]]\n" + RULE.replace("'suspend'", "'pause'"), "rules[0].action", "suspend"),
        ("[[rules]]\n" + RULE.replace("duration = '2h'\n", ""), "rules[0].duration", "needs"),
        ("[[rules]]\n" + RULE.replace("'2h'", "'8d'"), "rules[0].duration", "at most 7d"),
        ("[[rules]]\n" + RULE + "factor = 0.5\n", "rules[0].factor", "only for action"),
        ("[[rules]]\n" + RULE.replace("suspend", "rate"), "rules[0].factor", "below 1"),
        (
            "[[rules]]\n" + RULE.replace("suspend", "rate") + "factor = 1.5\n",
            "rules[0].factor",
            "in [0, 1]",
        ),
        ("[[rules]]\n" + RULE + "[[rules]]\n" + RULE, "rules[1].name", "is the name of"),
        ("[[rules]]\n" + RULE + "colour = 1\n", "rules[0].colour", "unknown key"),
    ],
)
def test_a_mistake_in_a_rules_file_names_the_file_and_the_rule(tmp_path, rules, key, problem):
    local = tmp_path / "mine.toml"
    local.write_text(rules)
    path = tmp_path / "relayd.toml"
    path.write_text("[shaping]\nlocal_rules_file = 'mine.toml'\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert (info.value.path, info.value.key) == (str(local), key), str(info.value)
    assert problem in info.value.problem


def test_shipped_rules_for_a_provider_the_config_lacks_are_left_out(tmp_path):
    path = tmp_path / "relayd.toml"
    path.write_text("[shaping.providers.google]\nmx = ['*.google.com']\n")
    names = [r.name for r in load(path).shaping.rules]
    assert names and all(n.startswith("gmail-") for n in names)
    path.write_text("[shaping.providers]\n")
    assert load(path).shaping.rules == ()


# -- the rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "code", "text", "rule"),
    [
        ("yahoo", 421, TSS04, "yahoo-tss04"),
        ("google", 421, GMAIL_UNUSUAL, "gmail-unusual-rate"),
        ("google", 450, GMAIL_RECEIVING, "gmail-receiving-rate"),
        ("google", 421, GMAIL_TRY_LATER, "gmail-try-again-later"),
        ("microsoft", 451, OUTLOOK_REPUTATION, "outlook-ip-reputation"),
        ("google", 421, TSS04, None),  # Yahoo's words from Google's hosts: no rule
        ("", 421, TSS04, None),  # nor from a site of no provider
        ("yahoo", 550, "5.1.1 <x@yahoo.com>: user unknown", None),
    ],
)
def test_the_shipped_rules_match_the_providers_real_replies(provider, code, text, rule):
    rules = Rules(load(ROOT / "conf" / "relayd.toml").shaping.rules)
    found = rules.match(provider, code, text)
    assert (found.name if found else None) == rule


def test_holds_renew_without_compounding_and_lapse_at_their_end():
    (rule,) = [
        r
        for r in load(ROOT / "conf" / "relayd.toml").shaping.rules
        if r.name == "gmail-unusual-rate"
    ]
    held = Holds()
    hold, new = held.apply(rule, "google", "192.0.2.1", 421, GMAIL_UNUSUAL, START, Rate(600, 60))
    assert new and hold.rate == Rate(300, 60) and hold.until == START + 1800
    again = held.apply(rule, "google", "192.0.2.1", 421, GMAIL_UNUSUAL, START + 60, Rate(300, 60))
    assert again == (hold, False) and hold.until == START + 1860 and hold.rate == Rate(300, 60)
    assert (
        held.apply(rule, "google", "192.0.2.1", 421, GMAIL_UNUSUAL, START + 60, Rate(1, 1)) is None
    )
    assert (
        held.find("google", "192.0.2.1", RATE) is hold and held.find("google", None, RATE) is hold
    )
    assert held.find("google", "192.0.2.2", RATE) is None and held.find("yahoo", None, RATE) is None
    assert held.lapse(START + 1859, 0) == [] and held.lapse(START + 1860, 0) == [hold]
    assert held.find("google", "192.0.2.1", RATE) is None


def test_the_meter_measures_a_sources_rate_over_the_last_minute():
    meter = Meter(0.0)
    for i in range(120):
        meter.tick(i * 0.5)  # 2/s for a minute
    assert meter.rate(60.0).count == pytest.approx(120, abs=2)
    assert meter.rate(90.0).count == pytest.approx(60, abs=2)  # half of it in the last minute
    assert meter.rate(500.0) == Rate(1.0, 60.0)  # quiet: one per minute, the floor


# -- adaptive shaping with the scheduler alone ------------------------------------------------


def test_a_tss04_reply_suspends_the_source_at_the_site_until_the_hold_ends(
    tmp_path, dns_server, mx_port
):
    """Yahoo answers DATA with TSS04: the source is suspended at the provider's site for 2 h
    (the shaping event); mail for another Yahoo-hosted domain then opens no connection and is
    put back in the spool, due at the hold's end; on the given clock's 2 h the hold lapses
    (shaping_ended) and both messages are delivered."""
    mx = FakeMX("127.0.0.22", mx_port).start()
    mx.data_replies.append(f"421 {TSS04}")
    mx_zone(dns_server, "yahoo.test", (1, "mta5.am0.yahoodns.test", "127.0.0.22"))
    mx_zone(dns_server, "aol.test", (1, "mx-aol.mail.gm0.yahoodns.test", "127.0.0.22"))
    toml = POOL + "[shaping.default]\npool = 'main'\n"
    toml += "[shaping.providers.yahoo]\nmx = ['*.yahoodns.test']\n"
    try:

        async def body(intake: Intake, scheduler: Scheduler, clock: Clock, spool: Path) -> None:
            await intake.submit([message("ann@yahoo.test", clock.now)])
            await until(lambda: events(spool, "shaping"), "the shaping event")
            (event,) = events(spool, "shaping")
            assert event["action"] == SUSPEND and event["site"] == "yahoo"
            assert event["source_ip"] == "127.0.0.1" and event["rule"] == "yahoo-tss04"
            assert event["code"] == 421 and "[TSS04]" in event["response"]
            assert event["duration_s"] == 7200.0
            await intake.submit([message("bob@aol.test", clock.now)])
            due = "SELECT next_attempt FROM recipients WHERE rcpt = 'bob@aol.test' AND state = 0"
            await until(lambda: rows(spool, due) == [(START + 7200,)], "bob's postponement")
            assert len(mx.connections) == 1 and mx.messages == []
            clock.now += 7200
            await until(lambda: events(spool, "shaping_ended"), "the hold's end")
            assert events(spool, "shaping_ended")[0]["ended"] == "lapsed"
            await until(lambda: len(mx.messages) == 2, "both messages, after the hold")
            assert scheduler.held.find("yahoo", None, SUSPEND) is None

        run_queue(tmp_path, dns_server, mx_port, toml, body)
    finally:
        mx.stop()


def test_a_suspension_holds_one_source_and_the_other_sources_carry_the_mail(
    tmp_path, dns_server, mx_port
):
    """Two sources; the greeting to the first connection is Yahoo's TSS04 refusal: that source
    is suspended at the site, and the other source carries the mail."""
    mx = FakeMX("127.0.0.23", mx_port).start()
    mx.connect_replies.append(f"421 {TSS04}")
    mx_zone(dns_server, "yahoo.test", (1, "mta5.am0.yahoodns.test", "127.0.0.23"))
    toml = (
        "[pools.main]\nsources = [{ address = '127.0.0.1' }, { address = '127.0.0.2' }]\n"
        "[shaping.default]\npool = 'main'\nmax_connections = 1\n"
        "[shaping.providers.yahoo]\nmx = ['*.yahoodns.test']\n"
    )
    try:

        async def body(intake: Intake, scheduler: Scheduler, clock: Clock, spool: Path) -> None:
            await intake.submit([message(f"u{i}@yahoo.test", clock.now) for i in range(3)])
            await until(lambda: events(spool, "shaping"), "the shaping event")
            (event,) = events(spool, "shaping")
            first = event["source_ip"]
            clock.now += 3600  # retry.first: the refused message is due again
            await until(lambda: len(mx.messages) == 3, "the mail, from the other source")
            assert {m.peer_ip for m in mx.messages} == {"127.0.0.1", "127.0.0.2"} - {first}
            assert scheduler.held.find("yahoo", first, SUSPEND) is not None

        run_queue(tmp_path, dns_server, mx_port, toml, body)
    finally:
        mx.stop()


def test_a_gmail_rate_reply_halves_the_sources_rate_at_the_site(tmp_path, dns_server, mx_port):
    """max_rate_per_source 600/min; Gmail's 4.7.28 to a RCPT: the source's rate at the google
    site is 300/min for 30 min (the hold's throttle), and the following mail goes through it."""
    mx = FakeMX("127.0.0.24", mx_port).start()
    mx.rcpt_replies["ann@gmail.test"] = wire(421, GMAIL_UNUSUAL)
    mx_zone(dns_server, "gmail.test", (5, "gmail-smtp-in.l.google.test", "127.0.0.24"))
    toml = POOL + "[shaping.default]\npool = 'main'\nmax_rate_per_source = '600/min'\n"
    toml += "[shaping.providers.google]\nmx = ['*.google.test']\n"
    try:

        async def body(intake: Intake, scheduler: Scheduler, clock: Clock, spool: Path) -> None:
            await intake.submit([message("ann@gmail.test", clock.now)])
            await until(lambda: events(spool, "shaping"), "the shaping event")
            (event,) = events(spool, "shaping")
            assert (event["action"], event["factor"], event["rule"]) == (
                RATE,
                0.5,
                "gmail-unusual-rate",
            )
            assert event["rate_per_min"] == 300.0 and event["site"] == "google"
            hold = scheduler.held.find("google", "127.0.0.1", RATE)
            assert hold is not None and hold.rate == Rate(300, 60)
            assert hold.until == START + 1800
            await intake.submit([message(f"u{i}@gmail.test", clock.now) for i in range(3)])
            await until(lambda: len(mx.messages) == 3, "the mail after the reply")
            assert hold.limiter is not None and hold.limiter.rate == Rate(300, 60)
            clock.now += 1800
            await until(lambda: events(spool, "shaping_ended"), "the hold's end")
            assert scheduler.held.find("google", "127.0.0.1", RATE) is None

        run_queue(tmp_path, dns_server, mx_port, toml, body)
    finally:
        mx.stop()


# -- end to end ---------------------------------------------------------------------------------


def test_a_suspension_end_to_end_logged_listed_kept_across_a_restart_and_cleared(
    relay, fake_mx, dns_server
):
    mx = fake_mx("127.0.0.25")
    mx.data_replies.append(f"421 {TSS04}")
    mx_zone(dns_server, "yahoo.test", (1, "mta5.am0.yahoodns.test", "127.0.0.25"))
    r = relay(
        {
            "pools": {"main": {"sources": [{"address": "127.0.0.1", "ehlo": "relay.test"}]}},
            "shaping": {
                "default": {"pool": "main"},
                "providers": {"yahoo": {"mx": ["*.yahoodns.test"]}},
            },
        }
    )
    send(r.port, ["ann@yahoo.test"])
    (event,) = r.wait_event("shaping")
    assert event["action"] == "suspend" and event["site"] == "yahoo"
    assert event["source_ip"] == "127.0.0.1" and event["rule"] == "yahoo-tss04"
    assert event["code"] == 421 and event["response"] == TSS04
    r.wait_event("deferred", rcpt="ann@yahoo.test")

    listed = json.loads(r.ctl("shaping", "list", "--json").stdout)
    (hold,) = listed["holds"]
    assert (hold["hold"], hold["site"], hold["action"]) == (event["hold"], "yahoo", "suspend")
    assert hold["until"] == event["until"] and hold["rule"] == "yahoo-tss04"
    text = r.ctl("shaping", "list").stdout
    assert "yahoo-tss04" in text and "[TSS04]" in text and "suspend" in text

    def postponed(rcpt: str) -> bool:
        with sqlite3.connect(r.spool) as db:
            row = db.execute(
                "SELECT next_attempt FROM recipients WHERE rcpt = ? AND state = 0", (rcpt,)
            ).fetchone()
        return row is not None and row[0] > time.time() + 3600  # due at the hold's end

    send(r.port, ["bob@yahoo.test"])
    wait_until(lambda: postponed("bob@yahoo.test"), 15, "bob's mail put back in the spool")
    r.wait_event("shaping_postponed", site="yahoo")
    assert len(mx.connections) == 1

    assert r.stop() == 0
    r.start()  # the hold is in the spool: in force again before the first connection
    send(r.port, ["cy@yahoo.test"])
    wait_until(lambda: postponed("cy@yahoo.test"), 15, "cy's mail put back in the spool")
    assert len(mx.connections) == 1 and mx.messages == []

    cleared = r.ctl("shaping", "clear", str(hold["hold"])).stdout
    assert f"cleared 1 hold(s): {hold['hold']}" in cleared
    r.wait_event("operator", action="shaping_clear")
    mx.wait_for_messages(3, timeout=20)
    assert sorted(m.rcpts[0] for m in mx.messages) == [
        "ann@yahoo.test",
        "bob@yahoo.test",
        "cy@yahoo.test",
    ]
    assert json.loads(r.ctl("shaping", "list", "--json").stdout)["holds"] == []
    with sqlite3.connect(r.spool) as db:
        (data,) = db.execute("SELECT data FROM events WHERE type = 'shaping_ended'").fetchone()
    assert json.loads(data)["ended"] == "cleared"


def test_shaping_clear_refuses_what_names_no_hold(relay):
    r = relay(start=False)
    schema.prepare(r.spool)
    for args, problem in (
        (("clear",), "one of the arguments ID --site --all is required"),
        (("clear", "x1"), "'x1' is not a hold id"),
        (("clear", "7"), "no hold in force 7"),
        (("clear", "--site", "yahoo"), "no hold in force at 'yahoo'"),
    ):
        result = r.ctl("shaping", *args, check=False)
        assert result.returncode != 0 and problem in result.stderr, result.stderr


def test_local_rules_are_reloaded_on_sighup_and_a_bad_one_is_refused(relay, fake_mx, dns_server):
    """A rule of one's own for every site ("*"), added on SIGHUP, holds a source at a site of
    no provider (its MX hosts); a broken file is refused naming the file and the rule, and the
    rules in use stay."""
    mx = fake_mx("127.0.0.26", rcpt_reply="451 4.7.1 Too many connections from your host")
    mx_zone(dns_server, "plain.test", (10, "mx.plain.test", "127.0.0.26"))
    r = relay({"shaping": {"local_rules_file": "mine.toml"}}, start=False)
    local = r.workdir / "mine.toml"
    local.write_text("")
    r.start()
    local.write_text("[[rules]]\nname = 'busy'\nprovider = '*'\ntext = 'too many ('\n")
    r.signal(signal.SIGHUP)
    (refused,) = r.wait_event("reload_refused")
    assert f"{local}: rules[0].text: not a regular expression" in refused["error"]
    local.write_text(
        "[[rules]]\nname = 'busy'\nprovider = '*'\ncode = 451\ntext = 'too many connections'\n"
        "action = 'rate'\nconnections = 1\nduration = '10m'\n"
    )
    r.signal(signal.SIGHUP)
    r.wait_event("reloaded")
    send(r.port, ["ann@plain.test"])
    (event,) = r.wait_event("shaping")
    assert (event["rule"], event["action"], event["connections"]) == ("busy", "rate", 1)
    assert event["site"] == f"mx.plain.test:{mx.port}"
