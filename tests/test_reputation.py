"""The blacklist watch: the DNSBL question and what its answers mean, the rounds on a clock the
test moves (real spool writer, real DNS over loopback), and relayd itself leaving a listed
source out of its pool until the zone stops listing it, as relayctl ip shows."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from support.dnsserver import TestDNSServer
from support.util import mx_zone, send

from relayd.config import HostPort, Reputation, Source
from relayd.delivery.dns import Resolver
from relayd.events import log as events
from relayd.reputation.lookup import interpret, lookup, query_name
from relayd.reputation.watch import Watch
from relayd.spool import listings, schema, store
from relayd.spool.listings import CLEAN, ERROR, LISTED
from relayd.spool.writer import Writer

ZONE = "bl.test"
START = 1_800_000_000.0
REASON = "Listed: see https://bl.test/lookup?ip=127.0.0.2"
POOL = {"p": (Source("127.0.0.2", "relay.test", 1), Source("127.0.0.3", "relay.test", 1))}


def list_address(dns: TestDNSServer, ip: str, answer: str = "127.0.0.2", reason: str = REASON):
    """Make the test zone list ``ip`` (TTL 0: a later answer is never hidden by a cache)."""
    name = query_name(ip, ZONE)
    dns.remove(name)
    dns.add(name, "A", answer, ttl=0)
    if reason:
        dns.add(name, "TXT", reason, ttl=0)


@pytest.fixture(autouse=True)
def _flush_log():
    """The in-process rounds log through relayd's logger: its lines go out at each test's end."""
    yield
    events.flush()


def resolver(dns: TestDNSServer, timeout: float = 2.0) -> Resolver:
    return Resolver((HostPort(dns.host, dns.port),), timeout)


# -- the question and its answers ----------------------------------------------------------


def test_the_query_name_is_the_reversed_address_under_the_zone():
    assert query_name("192.0.2.1", "zen.spamhaus.org") == "1.2.0.192.zen.spamhaus.org"
    # RFC 5782 section 2.4's example: nibbles, least significant first
    nibbles = "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2"
    assert query_name("2001:db8:1:2:3:4:567:89ab", "bl.test") == f"{nibbles}.bl.test"
    assert query_name("::ffff:192.0.2.1", "bl.test") == "1.2.0.192.bl.test"  # as its IPv4


def test_answers_in_127_8_are_listings_but_refusals_and_strays_are_errors():
    assert interpret([]) == (CLEAN, "")
    assert interpret(["127.0.0.2"]) == (LISTED, "")
    assert interpret(["127.0.0.4", "127.0.0.10"]) == (LISTED, "")
    status, why = interpret(["127.255.255.254"])
    assert status == ERROR and "public or open resolver" in why and "127.255.255.254" in why
    status, why = interpret(["127.255.255.255"])
    assert status == ERROR and "too many queries" in why
    status, why = interpret(["127.255.255.1"])
    assert status == ERROR and "refused" in why
    status, why = interpret(["127.0.0.2", "127.255.255.254"])  # one refusal spoils the answer
    assert status == ERROR
    status, why = interpret(["203.0.113.7"])  # a wildcard, or a zone shut down
    assert status == ERROR and "outside 127.0.0.0/8" in why


def test_lookups_over_dns_ipv4_ipv6_nxdomain_refusal_servfail_and_timeout(dns_server):
    list_address(dns_server, "127.0.0.2")
    list_address(dns_server, "2001:db8::25", answer="127.0.0.4", reason="")
    list_address(dns_server, "127.0.0.4", answer="127.255.255.254", reason="")
    dns_server.set_servfail(query_name("127.0.0.5", ZONE))
    dns_server.set_timeout(query_name("127.0.0.6", ZONE))

    async def main() -> list:
        ask = resolver(dns_server, timeout=0.3)
        ips = ["127.0.0.2", "2001:db8::25", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"]
        return await asyncio.gather(*(lookup(ask, ip, ZONE) for ip in ips))

    listed, v6, clean, refused, servfail, timeout = asyncio.run(main())
    assert (listed.status, listed.answer, listed.reason) == (LISTED, "127.0.0.2", REASON)
    assert (v6.status, v6.answer, v6.reason) == (LISTED, "127.0.0.4", "")
    assert (clean.status, clean.answer, clean.reason) == (CLEAN, "", "")  # NXDOMAIN
    assert refused.status == ERROR and refused.answer == "127.255.255.254"
    assert "public or open resolver" in refused.reason
    assert servfail.status == ERROR and "DNS lookup failed" in servfail.reason
    assert timeout.status == ERROR and "DNS lookup failed" in timeout.reason
    assert (query_name("127.0.0.3", ZONE), "TXT") not in dns_server.queries  # only when listed


# -- rounds on a given clock, in one event loop ----------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


Body = Callable[[Watch, Clock, sqlite3.Connection], Awaitable[None]]


def run_watch(
    tmp_path: Path, dns: TestDNSServer, body: Body, on_listing: str = "remove", pools=POOL
) -> None:
    spool = tmp_path / "spool.sqlite"
    schema.prepare(spool)
    settings = Reputation(True, (ZONE,), 3600.0, on_listing)
    clock = Clock()

    async def main() -> None:
        writer = Writer(spool, asyncio.get_running_loop())
        watch = Watch(settings, pools, writer, lambda: resolver(dns, timeout=0.3), clock)
        db = sqlite3.connect(spool)
        try:
            await body(watch, clock, db)
        finally:
            db.close()
            writer.close()

    asyncio.run(main())


def stored_events(db: sqlite3.Connection, kind: str) -> list[dict]:
    rows = db.execute("SELECT data FROM events WHERE type = ? ORDER BY id", (kind,)).fetchall()
    return [json.loads(r[0]) for r in rows]


def test_a_listing_is_recorded_with_its_event_and_leaves_the_source_out(tmp_path, dns_server):
    list_address(dns_server, "127.0.0.2")

    async def body(watch: Watch, clock: Clock, db: sqlite3.Connection) -> None:
        assert watch.usable("p", "127.0.0.2")  # nothing known yet
        done = await watch.step()
        assert done is not None and [e.type for e in done.events] == ["blacklisted"]
        assert stored_events(db, "blacklisted") == [
            {
                "source_ip": "127.0.0.2",
                "zone": ZONE,
                "answer": "127.0.0.2",
                "reason": REASON,
                "pools": ["p"],
                "on_listing": "remove",
            }
        ]
        assert db.execute("SELECT ip, zone, listed_at, delisted_at FROM listings").fetchall() == [
            ("127.0.0.2", ZONE, START, None)
        ]
        assert not watch.usable("p", "127.0.0.2")
        assert watch.usable("p", "127.0.0.3")
        assert watch.usable("other", "127.0.0.2")  # only its own pools leave it out

    run_watch(tmp_path, dns_server, body)


def test_rounds_come_at_the_interval_of_the_given_clock_and_delisting_restores(
    tmp_path, dns_server
):
    list_address(dns_server, "127.0.0.2")

    async def body(watch: Watch, clock: Clock, db: sqlite3.Connection) -> None:
        assert await watch.step() is not None  # the round at start
        asked = len(dns_server.queries)
        clock.now += 3599
        assert await watch.step() is None  # not due: nothing asked
        assert len(dns_server.queries) == asked
        dns_server.remove(query_name("127.0.0.2", ZONE))
        clock.now += 1
        done = await watch.step()
        assert done is not None and [e.type for e in done.events] == ["delisted"]
        [delisted] = stored_events(db, "delisted")
        assert delisted["source_ip"] == "127.0.0.2" and delisted["zone"] == ZONE
        assert delisted["answer"] == "127.0.0.2" and delisted["reason"] == REASON
        assert delisted["listed_s"] == 3600
        assert db.execute("SELECT delisted_at FROM listings").fetchall() == [(START + 3600,)]
        assert watch.usable("p", "127.0.0.2")
        assert await watch.step() is None  # the next round is an interval later again

    run_watch(tmp_path, dns_server, body)


def test_query_errors_are_counted_and_change_no_listing(tmp_path, dns_server):
    list_address(dns_server, "127.0.0.2")

    async def body(watch: Watch, clock: Clock, db: sqlite3.Connection) -> None:
        await watch.step()
        list_address(dns_server, "127.0.0.2", answer="127.255.255.254", reason="")
        clock.now += 3600
        done = await watch.step()
        assert done is not None and done.events == [] and done.errors == {("127.0.0.2", ZONE): 1}
        dns_server.set_timeout(query_name("127.0.0.2", ZONE))
        clock.now += 3600
        done = await watch.step()
        assert done is not None and done.errors == {("127.0.0.2", ZONE): 2}
        assert stored_events(db, "delisted") == []
        assert db.execute("SELECT delisted_at FROM listings").fetchall() == [(None,)]
        status, errors, error = db.execute(
            "SELECT status, errors, error FROM listing_checks WHERE ip = '127.0.0.2'"
        ).fetchone()
        assert (status, errors) == ("listed", 2) and "DNS lookup failed" in error
        assert not watch.usable("p", "127.0.0.2")  # still out: an error is no delisting

    run_watch(tmp_path, dns_server, body)


def test_a_pool_whose_sources_are_all_listed_keeps_them_and_says_so(tmp_path, dns_server):
    list_address(dns_server, "127.0.0.2")
    list_address(dns_server, "127.0.0.3")

    async def body(watch: Watch, clock: Clock, db: sqlite3.Connection) -> None:
        done = await watch.step()
        assert done is not None and len(done.events) == 2
        assert watch.usable("p", "127.0.0.2") and watch.usable("p", "127.0.0.3")

    with capture_logs() as logged:
        run_watch(tmp_path, dns_server, body)
    [warning] = [line for line in logged if line["event"] == "pool_all_listed"]
    assert warning["pool"] == "p" and warning["sources"] == ["127.0.0.2", "127.0.0.3"]
    assert warning["log_level"] == "warning"


def test_report_only_keeps_a_listed_source_in_use(tmp_path, dns_server):
    list_address(dns_server, "127.0.0.2")

    async def body(watch: Watch, clock: Clock, db: sqlite3.Connection) -> None:
        done = await watch.step()
        assert done is not None and [e.type for e in done.events] == ["blacklisted"]
        assert stored_events(db, "blacklisted")[0]["on_listing"] == "report"
        assert watch.usable("p", "127.0.0.2")

    run_watch(tmp_path, dns_server, body, on_listing="report")


def test_a_reload_to_remove_applies_the_known_listings_at_once(tmp_path, dns_server):
    list_address(dns_server, "127.0.0.2")

    async def body(watch: Watch, clock: Clock, db: sqlite3.Connection) -> None:
        await watch.step()
        assert watch.usable("p", "127.0.0.2")  # report
        dns_server.queries.clear()
        watch.reload(Reputation(True, (ZONE,), 3600.0, "remove"), POOL)
        assert not watch.usable("p", "127.0.0.2") and dns_server.queries == []
        watch.reload(Reputation(False, (ZONE,), 3600.0, "remove"), POOL)
        assert watch.usable("p", "127.0.0.2")  # the watch off: nothing left out

    run_watch(tmp_path, dns_server, body, on_listing="report")


def test_listings_of_an_earlier_run_apply_before_the_first_round(tmp_path, dns_server):
    list_address(dns_server, "127.0.0.2")

    async def first(watch: Watch, clock: Clock, db: sqlite3.Connection) -> None:
        await watch.step()

    async def restarted(watch: Watch, clock: Clock, db: sqlite3.Connection) -> None:
        await watch.load()
        assert not watch.usable("p", "127.0.0.2")
        assert stored_events(db, "blacklisted")[0]["source_ip"] == "127.0.0.2"

    run_watch(tmp_path, dns_server, first)
    dns_server.set_timeout(query_name("127.0.0.2", ZONE))  # no answer could have told it
    run_watch(tmp_path, dns_server, restarted)


def test_a_relayctl_request_checks_the_named_address_before_its_round(tmp_path, dns_server):
    async def body(watch: Watch, clock: Clock, db: sqlite3.Connection) -> None:
        await watch.step()
        list_address(dns_server, "127.0.0.3")
        db.execute("BEGIN IMMEDIATE")
        listings.request_check(db, ["127.0.0.3"], clock.now)
        db.execute("COMMIT")
        watch.request(store.operator_events(db, after=0))
        dns_server.queries.clear()
        done = await watch.step()  # an hour early: only what was asked
        assert done is not None and [e.data["source_ip"] for e in done.events] == ["127.0.0.3"]
        assert {name for name, _ in dns_server.queries} == {query_name("127.0.0.3", ZONE)}
        assert await watch.step() is None

    run_watch(tmp_path, dns_server, body)


# -- relayd end to end ---------------------------------------------------------------------


def senders(mx, since: int = 0) -> Counter:
    """The source address of each message the fake MX received (its peer), from ``since``."""
    return Counter(m.peer_ip for m in mx.messages[since:])


def test_relayd_leaves_a_listed_source_out_until_the_zone_delists_it(relay, dns_server, fake_mx):
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10")
    list_address(dns_server, "127.0.0.2")
    r = relay(
        {
            "pools": {"p": {"sources": [{"address": "127.0.0.2"}, {"address": "127.0.0.3"}]}},
            "shaping": {"default": {"pool": "p", "max_messages_per_connection": 1}},
            "reputation": {"zones": [ZONE], "on_listing": "remove"},
        }
    )
    [listed] = r.wait_event("blacklisted", source_ip="127.0.0.2", zone=ZONE)
    assert (listed["answer"], listed["reason"], listed["pools"]) == ("127.0.0.2", REASON, ["p"])

    for i in range(6):
        send(r.port, [f"x{i}@example.test"])
    mx.wait_for_messages(6, timeout=30)
    assert senders(mx) == {"127.0.0.3": 6}  # the listed source took none of them

    shown = json.loads(r.ctl("ip", "list", "--json").stdout)
    assert shown["watch"] == {
        "enabled": True,
        "zones": [ZONE],
        "interval_s": 3600.0,
        "on_listing": "remove",
    }
    by_ip = {row["ip"]: row for row in shown["ips"]}
    assert by_ip["127.0.0.2"]["status"] == "listed"
    assert by_ip["127.0.0.2"]["left_out_of"] == ["p"]
    assert by_ip["127.0.0.2"]["zones"][ZONE]["reason"] == REASON
    assert by_ip["127.0.0.3"]["status"] == "clean" and by_ip["127.0.0.3"]["left_out_of"] == []
    assert by_ip["127.0.0.3"]["last_checked"] is not None
    text = r.ctl("ip", "list").stdout
    assert "127.0.0.2  p      bl.test  listed" in text and "left out of p" in text

    dns_server.remove(query_name("127.0.0.2", ZONE))  # the zone lets it go
    assert "check 2 address(es)" in r.ctl("ip", "check").stdout
    [delisted] = r.wait_event("delisted", source_ip="127.0.0.2", zone=ZONE)
    assert delisted["answer"] == "127.0.0.2"
    for i in range(4):
        send(r.port, [f"y{i}@example.test"])
    mx.wait_for_messages(10, timeout=30)
    assert set(senders(mx, 6)) == {"127.0.0.2", "127.0.0.3"}  # back in the rotation

    history = json.loads(r.ctl("ip", "show", "127.0.0.2", "--json").stdout)
    assert history["status"] == "clean" and history["pools"] == ["p"]
    [episode] = history["listings"]
    assert episode["zone"] == ZONE and episode["answer"] == "127.0.0.2"
    assert episode["reason"] == REASON and episode["delisted_at"] is not None
    text = r.ctl("ip", "show", "127.0.0.2").stdout
    assert text.startswith("127.0.0.2: clean (pools: p)") and "listings:" in text


def test_relayctl_ip_refuses_what_it_cannot_answer(relay):
    r = relay(
        {"pools": {"p": {"sources": [{"address": "127.0.0.2"}]}}, "reputation": {"zones": []}},
        start=False,
    )
    schema.prepare(r.spool)
    cases = [
        (("ip", "show", "nonsense"), "ip show: 'nonsense' is not an IP address"),
        (("ip", "show", "192.0.2.9"), "ip show: 192.0.2.9 is no source address of a pool in"),
        (("ip", "check"), "ip check: the blacklist watch is off in"),
    ]
    for args, problem in cases:
        result = r.ctl(*args, check=False)
        assert result.returncode == 1 and problem in result.stderr, result.stderr
    shown = json.loads(r.ctl("ip", "list", "--json").stdout)
    assert shown["watch"]["enabled"] is False
    assert [(row["ip"], row["status"]) for row in shown["ips"]] == [("127.0.0.2", "unknown")]
    watched = r.config_path.read_text().replace('"zones" = []', '"zones" = ["a.test"]')
    r.config_path.write_text(watched)
    result = r.ctl("ip", "check", "192.0.2.9", check=False)
    assert result.returncode == 1 and "192.0.2.9 is no source address of a pool" in result.stderr
    with sqlite3.connect(r.spool) as db:  # nothing was asked of the daemon
        assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 0
