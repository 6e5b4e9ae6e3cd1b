"""IP warm-up: a source in warm-up sends each provider its schedule's volume of the day and no
more. The arithmetic alone (day numbers on a given clock, volumes per provider, past the last
day); the scheduler alone (real spool writer, intake, SMTP client, fake MX, on a wall clock the
test moves) for the rotation to another source, mail waiting for the next day and counts that
survive a restart; relayd end to end; relayctl warmup as a real process."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from structlog.testing import capture_logs
from support.fakemx import FakeMX
from support.queue import Body, Clock, run_queue, until
from support.util import mx_zone, send, wait_until

from relayd.config import WarmupSchedule
from relayd.model.ids import new_queue_id
from relayd.model.message import NewMessage
from relayd.queue.intake import Intake
from relayd.queue.scheduler import Scheduler
from relayd.shaping.warmup import Plan, Warmup, day_number, next_day, utc_day
from relayd.spool import schema, warmup

DAY1 = date(2026, 12, 1)
START = datetime(2026, 12, 1, 10, 0, tzinfo=UTC).timestamp()  # 10:00 UTC on day 1
MIDNIGHT = datetime(2026, 12, 2, tzinfo=UTC).timestamp()  # day 2 begins
WARM, OTHER = "127.0.0.2", "127.0.0.3"


# -- the arithmetic --------------------------------------------------------------------------


def test_days_turn_at_utc_midnight_and_are_numbered_from_the_start_date():
    assert utc_day(MIDNIGHT - 1) == DAY1 and utc_day(MIDNIGHT) == DAY1 + timedelta(days=1)
    assert next_day(START) == MIDNIGHT and next_day(MIDNIGHT) == MIDNIGHT + 86400
    assert day_number(DAY1, DAY1) == 1
    assert day_number(DAY1, date(2026, 12, 10)) == 10
    assert day_number(DAY1, date(2026, 11, 30)) == 0  # not begun


def test_a_plan_gives_each_provider_its_volume_of_the_day_and_none_past_its_list():
    rule = WarmupSchedule((50, 100, 200), {"gmail.com": (20, 40, 80, 160)})
    plan = Plan(WARM, "default", rule, DAY1)
    assert [plan.volume("yahoo.com", n) for n in range(5)] == [0, 50, 100, 200, None]
    assert [plan.volume("gmail.com", n) for n in range(6)] == [0, 20, 40, 80, 160, None]
    assert plan.length == 4  # warm everywhere after the longest list
    assert plan.warm_key(DAY1) == "default@2026-12-01"


def test_the_counter_holds_back_until_loaded_counts_to_the_volume_and_starts_again_next_day():
    clock = Clock(START)
    plan = Plan(WARM, "s", WarmupSchedule((3, 5), {}), None)  # day 1: the day first seen
    state = Warmup({WARM: plan}, clock)
    assert not state.allows(WARM, "p") and not state.spent(WARM, "p")  # not loaded yet
    assert state.allows(OTHER, "p")  # not in warm-up: never held back
    state.load(DAY1, [(WARM, "p", 2)], {}, {})
    assert state.allowed(WARM, "p") == 3
    assert state.take(WARM, "p", 1) and state.spent(WARM, "p")
    assert not state.take(WARM, "p", 1)
    assert state.take(WARM, "q", 7) and state.spent(WARM, "q")  # a transaction may pass it
    assert state.changes() == [(WARM, "p", 3), (WARM, "q", 7)] and state.changes() == []
    clock.now = MIDNIGHT
    assert state.allowed(WARM, "p") == 5 and state.allows(WARM, "p")  # day 2, counts reset
    clock.now = MIDNIGHT + 86400  # day 3: past the list
    assert state.allowed(WARM, "p") is None and state.take(WARM, "p", 1000)
    assert state.changes() == []  # nothing counted without a quota
    assert state.finished() == [(plan, DAY1)]
    state.saved({WARM: DAY1}, {WARM: "s@2026-12-01"})
    assert state.finished() == []  # reported once


# -- the scheduler alone ---------------------------------------------------------------------


def run(tmp_path: Path, mx: FakeMX, toml: str, body: Body, clock: Clock) -> None:
    """The queue process's parts (support.queue) on ``toml``, the default shaping sending from
    pool ``p`` one message per connection (each message a fresh pick of the rotation); ``body``
    starts once the warm-up's counts are loaded from the spool (until then no source in
    warm-up sends)."""

    async def loaded(intake: Intake, scheduler: Scheduler, clock: Clock, spool: Path) -> None:
        await until(lambda: scheduler.warmup.loaded, "the warm-up counts loaded")
        await body(intake, scheduler, clock, spool)

    shaping = "[shaping.default]\npool = 'p'\nmax_messages_per_connection = 1\n"
    run_queue(tmp_path, mx, loaded, shaping + toml, clock)


def messages(n: int, clock: Clock, first: int = 0) -> list[NewMessage]:
    return [
        NewMessage(
            new_queue_id(),
            "a@s.test",
            [f"r{i}@dest.test"],
            b"Subject: warm-up\r\n\r\nbody\r\n",
            "127.0.0.1",
            "t",
            "t",
            False,
            clock.now,
        )
        for i in range(first, first + n)
    ]


SCHEDULE = "[warmup.schedules.new]\ndays = [3, 5]\n"
# the fake MX is provider "dest" (the sites' provider: what warm-up volumes are counted for)
PROVIDER = "[shaping.providers.dest]\nmx = ['127.0.0.10']\n"
ONE_SOURCE = (
    f"[pools.p]\nsources = [{{ address = '{WARM}', warmup = 'new', warmup_start = {DAY1} }}]\n"
)


def senders(mx: FakeMX) -> Counter:
    return Counter(m.peer_ip for m in mx.messages)


def stored_counts(spool: Path) -> list[tuple]:
    with sqlite3.connect(spool) as db:
        return db.execute("SELECT ip, provider, day, sent FROM warmup ORDER BY day").fetchall()


def waiting(spool: Path) -> list[tuple]:
    """(state, attempts, next_attempt) of the recipients still in the spool."""
    with sqlite3.connect(spool) as db:
        return db.execute("SELECT state, attempts, next_attempt FROM recipients").fetchall()


def test_a_source_sends_its_days_volume_then_the_other_source_of_the_pool_takes_the_rest(
    tmp_path,
):
    mx = FakeMX("127.0.0.10", 0).start()
    pool = (
        f"[pools.p]\nsources = [{{ address = '{WARM}', warmup = 'new', warmup_start = {DAY1} }},"
        f" {{ address = '{OTHER}' }}]\n"
    )
    try:

        async def body(intake: Intake, _: Scheduler, clock: Clock, spool: Path) -> None:
            await intake.submit(messages(10, clock))
            await until(lambda: len(mx.messages) == 10, "all ten messages")
            await until(lambda: stored_counts(spool), "the day's count saved")

        with capture_logs() as logged:
            run(tmp_path, mx, SCHEDULE + PROVIDER + pool, body, Clock(START))
        assert senders(mx) == {WARM: 3, OTHER: 7}
        assert stored_counts(tmp_path / "spool.sqlite") == [(WARM, "dest", "2026-12-01", 3)]
        [reached] = [line for line in logged if line["event"] == "warmup_quota_reached"]
        assert (reached["source_ip"], reached["provider"]) == (WARM, "dest")
        assert (reached["sent"], reached["allowed"]) == (3, 3)
    finally:
        mx.stop()


def test_with_one_source_the_mail_past_the_volume_waits_for_the_next_day_unattempted(tmp_path):
    mx = FakeMX("127.0.0.10", 0).start()
    try:

        async def body(intake: Intake, _: Scheduler, clock: Clock, spool: Path) -> None:
            await intake.submit(messages(4, clock))
            await until(lambda: len(mx.messages) == 3, "the day's three messages")
            # the fourth goes back to the spool, due at midnight, never tried
            await until(lambda: waiting(spool) == [(0, 0, MIDNIGHT)], "the fourth to wait")
            assert len(mx.messages) == 3
            clock.now = MIDNIGHT + 1
            await until(lambda: len(mx.messages) == 4, "the fourth, on day 2")
            await until(lambda: not waiting(spool), "the spool to empty")
            await until(lambda: len(stored_counts(spool)) == 1, "day 2's count")

        run(tmp_path, mx, SCHEDULE + PROVIDER + ONE_SOURCE, body, Clock(START))
        assert senders(mx) == {WARM: 4}
        # day 1's count is removed once day 2's is written
        assert stored_counts(tmp_path / "spool.sqlite") == [(WARM, "dest", "2026-12-02", 1)]
    finally:
        mx.stop()


def test_the_days_counts_survive_a_restart_of_the_scheduler_on_the_same_spool(tmp_path):
    mx = FakeMX("127.0.0.10", 0).start()
    toml = SCHEDULE + PROVIDER + ONE_SOURCE
    try:

        async def first(intake: Intake, _: Scheduler, clock: Clock, spool: Path) -> None:
            await intake.submit(messages(2, clock))
            await until(lambda: len(mx.messages) == 2, "two of the day's three")

        async def second(intake: Intake, _: Scheduler, clock: Clock, spool: Path) -> None:
            await intake.submit(messages(3, clock, first=2))
            await until(lambda: len(mx.messages) == 3, "the one left of the day's volume")
            # postponed in the scheduler's memory first, in the spool at the writer's next commit
            two = [(0, 0, MIDNIGHT)] * 2
            await until(lambda: waiting(spool) == two, "the other two to wait for midnight")

        run(tmp_path, mx, toml, first, Clock(START))
        spool = tmp_path / "spool.sqlite"
        assert stored_counts(spool) == [(WARM, "dest", "2026-12-01", 2)]  # saved at stop
        run(tmp_path, mx, toml, second, Clock(START + 3600))
        assert stored_counts(spool) == [(WARM, "dest", "2026-12-01", 3)]
    finally:
        mx.stop()


def test_a_provider_gets_its_own_volumes_from_the_day_relayd_first_sees_a_source(tmp_path):
    """No warmup_start: day 1 is the day the scheduler first sees the source, recorded in the
    spool (a later start keeps it). Provider dest has a list of its own: 1 on day 1, not the
    schedule's 3."""
    mx = FakeMX("127.0.0.10", 0).start()
    toml = (
        "[warmup.schedules.new]\ndays = [3, 5]\nper_provider = { dest = [1, 2] }\n"
        + PROVIDER
        + f"[pools.p]\nsources = [{{ address = '{WARM}', warmup = 'new' }}]\n"
    )
    try:

        async def body(intake: Intake, _: Scheduler, clock: Clock, spool: Path) -> None:
            await intake.submit(messages(3, clock))
            await until(lambda: len(waiting(spool)) == 2, "two of the three to wait")
            assert len(mx.messages) == 1

        run(tmp_path, mx, toml, body, Clock(START))
        assert stored_counts(tmp_path / "spool.sqlite") == [(WARM, "dest", "2026-12-01", 1)]
        with sqlite3.connect(tmp_path / "spool.sqlite") as db:
            assert db.execute("SELECT ip, first_seen FROM warmup_sources").fetchall() == [
                (WARM, "2026-12-01")
            ]
    finally:
        mx.stop()


def test_mail_waits_in_the_spool_for_the_first_source_free_again_suspended_or_spent(tmp_path):
    """One source suspended at the site by adaptive shaping (Yahoo's TSS04, 2 h), the other
    spent its day's volume: the rest goes back to the spool until the suspension ends (before
    midnight), unattempted."""
    mx = FakeMX("127.0.0.10", 0).start()
    tss04 = "4.7.0 [TSS04] Messages from 127.0.0.3 temporarily deferred due to user complaints"
    mx.data_replies.append(f"421 {tss04}")  # to the first message: from OTHER, listed first
    toml = (
        SCHEDULE
        + "[shaping.providers.yahoo]\nmx = ['127.0.0.10']\nmax_connections = 1\n"
        + f"[pools.p]\nsources = [{{ address = '{OTHER}' }}, {{ address = '{WARM}',"
        f" warmup = 'new', warmup_start = {DAY1} }}]\n"
    )
    try:

        async def body(intake: Intake, scheduler: Scheduler, clock: Clock, spool: Path) -> None:
            await intake.submit(messages(6, clock))
            await until(lambda: len(waiting(spool)) == 3 and len(mx.messages) == 3, "the rest")
            pending = [0, 0, 1]  # states: two back to waiting unattempted, one deferred
            await until(lambda: sorted(r[0] for r in waiting(spool)) == pending, "postponed")

        with capture_logs() as logged:
            run(tmp_path, mx, toml, body, Clock(START))
        assert senders(mx) == {WARM: 3}
        assert sorted(waiting(tmp_path / "spool.sqlite")) == [
            (0, 0, START + 7200),  # due when the suspension ends
            (0, 0, START + 7200),
            (1, 1, START + 3600),  # the one OTHER was refused: deferred, retry.first
        ]
        [postponed] = [line for line in logged if line["event"] == "shaping_postponed"]
        assert postponed["site"] == "yahoo" and postponed["warmup_spent"] == [WARM]
    finally:
        mx.stop()


def test_a_source_past_its_last_day_has_no_quota_and_its_warm_up_is_reported_once(tmp_path):
    mx = FakeMX("127.0.0.10", 0).start()
    past = DAY1 - timedelta(days=2)  # day 3 of a two-day schedule
    pool = (
        f"[pools.p]\nsources = [{{ address = '{WARM}', warmup = 'new', warmup_start = {past} }}]\n"
    )
    toml = SCHEDULE + PROVIDER + pool
    spool = tmp_path / "spool.sqlite"

    def warmed() -> list[dict]:
        with sqlite3.connect(spool) as db:
            rows = db.execute("SELECT data FROM events WHERE type = 'warmed'").fetchall()
        return [json.loads(r[0]) for r in rows]

    try:

        async def body(intake: Intake, _: Scheduler, clock: Clock, spool: Path) -> None:
            await intake.submit(messages(8, clock))
            await until(lambda: len(mx.messages) == 8, "all eight: no quota")
            await until(warmed, "the warmed event")

        run(tmp_path, mx, toml, body, Clock(START))
        run(tmp_path, mx, toml, lambda *_: asyncio.sleep(0), Clock(START))  # a restart
        assert warmed() == [
            {"source_ip": WARM, "schedule": "new", "warmup_start": "2026-11-29", "days": 2}
        ]
        assert stored_counts(spool) == []  # nothing to count once warm
    finally:
        mx.stop()


# -- relayd end to end, and relayctl ---------------------------------------------------------


def test_relayd_rotates_past_a_spent_source_and_relayctl_shows_its_day(relay, dns_server, fake_mx):
    mx_zone(dns_server, "example.test", (10, "mx1.example.test", "127.0.0.10"))
    mx = fake_mx("127.0.0.10")
    today = datetime.now(UTC).date()
    r = relay(
        {
            "warmup": {"schedules": {"new": {"days": [3, 6, 12]}}},
            "pools": {
                "p": {
                    "sources": [
                        {"address": WARM, "warmup": "new", "warmup_start": str(today)},
                        {"address": OTHER},
                    ]
                }
            },
            "shaping": {"default": {"pool": "p", "max_messages_per_connection": 1}},
            "reputation": {"zones": []},
        }
    )
    for i in range(8):
        send(r.port, [f"x{i}@example.test"])
    mx.wait_for_messages(8, timeout=30)
    assert senders(mx) == {WARM: 3, OTHER: 5}
    [reached] = r.wait_event("warmup_quota_reached", source_ip=WARM)
    provider = reached["provider"]  # the site: example.test's MX hosts
    assert provider.startswith("mx1.example.test:")

    def saved() -> list[dict]:  # the daemon saves its counts about every second
        sources = json.loads(r.ctl("warmup", "--json").stdout)["sources"]
        return sources if sources[0]["providers"] else []

    [row] = wait_until(saved, 15, "relayctl warmup to show the day's count")
    assert (row["ip"], row["schedule"], row["status"], row["day"], row["days"]) == (
        WARM,
        "new",
        "warming",
        1,
        3,
    )
    assert row["providers"] == [{"provider": provider, "sent": 3, "allowed": 3, "spent": True}]


def test_relayctl_warmup_shows_each_source_in_warm_up(relay):
    today = datetime.now(UTC).date()
    r = relay(
        {
            "warmup": {
                "schedules": {
                    "new": {"days": [50, 100, 200], "per_provider": {"gmail.com": [20, 40, 80]}},
                    "short": {"days": [10]},
                }
            },
            "pools": {
                "p": {
                    "sources": [
                        {
                            "address": WARM,
                            "warmup": "new",
                            "warmup_start": str(today - timedelta(1)),
                        },
                        {"address": OTHER, "warmup": "short", "warmup_start": "2020-01-01"},
                        {"address": "127.0.0.4", "warmup": "new"},
                        {"address": "127.0.0.5"},
                    ]
                }
            },
            "reputation": {"zones": []},
        },
        start=False,
    )
    schema.prepare(r.spool)
    with sqlite3.connect(r.spool) as db:
        counts = [(WARM, "gmail.com", 40), (WARM, "yahoo.com", 12)]
        warmup.save(db, today, {}, counts, [], 0.0)
    result = json.loads(r.ctl("warmup", "--json").stdout)
    by_ip = {row["ip"]: row for row in result["sources"]}
    assert set(by_ip) == {WARM, OTHER, "127.0.0.4"}  # 127.0.0.5 is not in warm-up
    warming = by_ip[WARM]
    assert warming["status"] == "warming" and (warming["day"], warming["days"]) == (2, 3)
    assert warming["allowed"] == 100 and warming["per_provider"] == {"gmail.com": 40}
    assert warming["providers"] == [
        {"provider": "gmail.com", "sent": 40, "allowed": 40, "spent": True},
        {"provider": "yahoo.com", "sent": 12, "allowed": 100, "spent": False},
    ]
    assert by_ip[OTHER]["status"] == "warmed" and by_ip[OTHER]["allowed"] is None
    unseen = by_ip["127.0.0.4"]
    assert unseen["status"] == "not started" and unseen["start"] is None
    text = r.ctl("warmup").stdout
    assert f"{WARM}  new  day 2 of 3" in text and "gmail.com" in text and "40 / 40" in text
    assert f"{OTHER}  short  warmed" in text
    assert "127.0.0.4  new  not started: day 1 is the day relayd first sees it" in text
