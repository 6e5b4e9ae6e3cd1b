"""Webhooks without sockets: the retry and disable policy on an injected clock, the payload and
its signatures (verified by the standardwebhooks package, not our code), the endpoint
statements, the retention's dropped counter, and the dispatcher's rounds against a fake sender."""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from relayd import config as configuration
from relayd.events.records import Event
from relayd.receipts import endpoints, payload, policy
from relayd.receipts.dispatcher import Dispatcher, Reply
from relayd.spool import schema, store, webhooks

SETTINGS = configuration.load(Path(__file__).parent.parent / "conf" / "relayd.toml").webhooks
RETRY = policy.Retry.of(SETTINGS)  # 5 s doubling to 1 h, +-20 %, 3 days


# -- the policy -----------------------------------------------------------------------------


def test_delays_double_from_the_first_up_to_the_cap_within_the_jitter():
    exact = replace(RETRY, jitter=0.0)
    assert [policy.delay(n, exact) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert policy.delay(11, exact) == 3600 and policy.delay(10_000, exact) == 3600
    assert policy.delay(1, RETRY, lambda: 0.0) == pytest.approx(4.0)
    assert policy.delay(1, RETRY, lambda: 1.0) == pytest.approx(6.0)


def test_a_dead_endpoint_is_tried_for_three_days_then_disabled():
    """The whole schedule on a simulated clock: waits grow to the cap, the last try falls on
    the end of retry_for, and its failure disables the endpoint with the reason."""
    now, failures, since = 1_000_000.0, 0, None
    tries = [now]
    while True:
        f = policy.after_failure(failures, since, now, 503, None, RETRY, lambda: 0.5)
        if f.disabled:
            break
        assert f.next_try > now
        failures, since, now = f.failures, f.since, f.next_try
        tries.append(now)
    waits = [b - a for a, b in itertools.pairwise(tries)]
    assert waits[:3] == [5, 10, 20] and max(waits) == 3600
    assert tries[-1] - tries[0] == RETRY.span == 3 * 86400
    assert 75 <= len(tries) <= 90  # ~10 quick ones, then hourly
    assert f.disabled.startswith("failing since 1970-01-12T13:46:40Z (")


def test_410_disables_at_once_and_retry_after_lengthens_a_wait_up_to_the_cap():
    gone = policy.after_failure(0, None, 50.0, 410, None, RETRY)
    assert gone.disabled.startswith("410 Gone") and gone.failures == 1
    slow = policy.after_failure(0, None, 50.0, 429, 120.0, RETRY, lambda: 0.5)
    assert slow.next_try == 170.0 and not slow.disabled
    capped = policy.after_failure(0, None, 50.0, 503, 1e9, RETRY, lambda: 0.5)
    assert capped.next_try == 50.0 + RETRY.max_interval


# -- the payload ------------------------------------------------------------------------------

ROWS: list[payload.Row] = [
    (7, 1_700_000_000.25, "delivered", "Q1", {"rcpt": "a@x.test", "code": 250, "mx": "mx.x"}),
    (9, 1_700_000_001.5, "bounced", "Q2", {"rcpt": "b@y.test", "code": 550, "response": "ü"}),
]


def _headers(secrets: list[str], msg_id: str, content: bytes, now: float) -> dict[str, str]:
    return payload.headers(secrets, msg_id, now, content)


def test_one_event_is_a_standard_webhooks_payload_that_the_package_verifies():
    import time

    secret = payload.new_secret()
    content = payload.body(ROWS[:1], batched=False)
    msg_id = payload.message_id(3, ROWS[:1], batched=False)
    headers = _headers([secret], msg_id, content, time.time())
    assert msg_id == "evt_7" and headers["webhook-signature"].startswith("v1,")
    data = Webhook(secret).verify(content, headers)
    assert data == {
        "id": "evt_7",
        "type": "message.delivered",
        "timestamp": "2023-11-14T22:13:20.250Z",
        "data": {"queue_id": "Q1", "rcpt": "a@x.test", "code": 250, "mx": "mx.x"},
    }
    with pytest.raises(WebhookVerificationError):
        Webhook(payload.new_secret()).verify(content, headers)
    with pytest.raises(WebhookVerificationError):  # a changed byte
        Webhook(secret).verify(content.replace(b"250", b"251"), headers)


def test_a_batch_carries_its_events_in_order_and_both_rotation_secrets_verify():
    import time

    new, old = payload.new_secret(), payload.new_secret()
    content = payload.body(ROWS, batched=True)
    assert content == payload.body(ROWS, batched=True)  # the same bytes when sent again
    msg_id = payload.message_id(3, ROWS, batched=True)
    headers = _headers([new, old], msg_id, content, time.time())
    assert msg_id == "batch_3_7_9" and len(headers["webhook-signature"].split(" ")) == 2
    for secret in (new, old):
        data = Webhook(secret).verify(content, headers)
        assert data["type"] == "batch"
        assert [e["id"] for e in data["data"]["events"]] == ["evt_7", "evt_9"]
        assert data["data"]["events"][1]["data"]["response"] == "ü"
    # a stale timestamp is refused by receivers: each try is signed afresh
    with pytest.raises(WebhookVerificationError):
        Webhook(new).verify(content, _headers([new], msg_id, content, time.time() - 600))


# -- the endpoint statements ------------------------------------------------------------------


def _events(conn: sqlite3.Connection, n: int, kind: str = "delivered", at: float = 100.0) -> None:
    store.append_events(
        conn, [Event(kind, f"Q{i % 5}", at + i, {"rcpt": f"r{i}@x.test"}) for i in range(n)]
    )


def test_add_list_rotate_enable_and_refusals(spool_conn: sqlite3.Connection):
    conn = spool_conn
    _events(conn, 3)  # before the endpoint: not owed to it
    ep = endpoints.add(conn, SETTINGS, "https://hooks.test/a", "delivered, bounced", 10.0, 5)
    assert ep["secret"].startswith("whsec_") and ep["events"] == ["delivered", "bounced"]
    assert (ep["batch"], ep["timeout_s"], ep["backlog"], ep["state"]) == (5, 10.0, 0, "enabled")
    _events(conn, 4)
    _events(conn, 2, "accepted")
    (listed,) = endpoints.listing(conn, 11.0)
    assert listed["backlog"] == 4 and "secret" not in listed and listed["signing_secrets"] == 1

    rotated = endpoints.rotate(conn, ep["id"], 3600, 20.0)
    found = webhooks.get(conn, ep["id"])
    assert found is not None and found.signing(20.0) == [rotated["secret"], ep["secret"]]
    assert found.signing(3620.0) == [rotated["secret"]]  # the overlap is over

    for field, kwargs in (
        ("url", {"url": "ftp://hooks.test/"}),
        ("url", {"url": "https:///nohost"}),
        ("url", {"url": "https://hooks.test/a"}),  # exists
        ("events", {"events": "delivered,sent"}),
        ("events", {"events": ""}),
        ("batch", {"batch": 0}),
        ("batch", {"batch": SETTINGS.max_batch + 1}),
        ("concurrency", {"concurrency": True}),
        ("timeout", {"timeout": float("nan")}),
    ):
        args = {"url": "https://hooks.test/b", "events": "*"} | kwargs
        with pytest.raises(endpoints.EndpointError) as info:
            endpoints.add(conn, SETTINGS, now=1.0, **args)  # type: ignore[arg-type]
        assert info.value.field == field
    assert len(endpoints.listing(conn, 30.0)) == 1

    endpoints.disable(conn, "https://hooks.test/a", 40.0)
    assert endpoints.show(conn, ep["id"], 40.0)["state"] == "disabled"
    again = endpoints.enable(conn, ep["id"], 50.0, from_now=True)
    assert (again["state"], again["backlog"]) == ("enabled", 0)
    with pytest.raises(endpoints.NotFound):
        endpoints.remove(conn, 99)
    assert endpoints.remove(conn, ep["id"])["removed"]


def test_pruning_counts_what_enabled_endpoints_had_not_received_and_keeps_the_newest(
    spool_conn: sqlite3.Connection,
):
    conn = spool_conn
    subscribed = endpoints.add(conn, SETTINGS, "http://a.test/", "delivered", 0.0)["id"]
    everything = endpoints.add(conn, SETTINGS, "http://b.test/", "*", 0.0)["id"]
    off = endpoints.add(conn, SETTINGS, "http://c.test/", "*", 0.0)["id"]
    endpoints.disable(conn, off, 0.0)
    _events(conn, 6, "delivered")  # ids 1-6
    _events(conn, 4, "deferred")  # ids 7-10
    conn.execute("UPDATE webhooks SET cursor = 2 WHERE id = ?", (subscribed,))
    assert store.prune_events(conn, before=1e9) == 9  # all old, but the newest stays
    assert [r[0] for r in conn.execute("SELECT id FROM events")] == [10]
    dropped = dict(conn.execute("SELECT id, dropped FROM webhooks"))
    assert dropped == {subscribed: 4, everything: 9, off: 0}
    _events(conn, 1)
    assert conn.execute("SELECT max(id) FROM events").fetchone()[0] == 11  # ids go on


# -- the dispatcher, against a fake sender ------------------------------------------------------


class FakeSender:
    """Answers from a script: a function of (url, parsed body) to a status."""

    def __init__(self, answer: Any = None) -> None:
        self.answer = answer or (lambda url, data: 200)
        self.posts: list[tuple[str, dict[str, str], Any]] = []
        self.acked: list[tuple[str, Any]] = []  # the posts answered 2xx

    async def post(self, url: str, body: bytes, headers: dict[str, str], timeout: float) -> Reply:
        data = json.loads(body)
        self.posts.append((url, headers, data))
        status = self.answer(url, data)
        if 200 <= status < 300:
            self.acked.append((url, data))
        return Reply(status, str(status), None)

    async def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _dispatch(path: Path, sender: FakeSender, clock: Clock, steps: list[float]) -> None:
    """One dispatcher, each endpoint stepped once per item of ``steps`` after the clock moved
    by it (sleeps take 1 ms); the writer is a plain connection."""
    writer = schema.connect(path)

    async def submit(fn: Any) -> Any:
        return fn(writer)

    async def run() -> None:
        settings = replace(SETTINGS, poll_interval=0.001)
        d = Dispatcher(path, submit, settings, clock, sender, rng=lambda: 0.5)
        from relayd.receipts.dispatcher import Runner

        runners = {ep.id: Runner(d, ep) for ep in await d.read(webhooks.endpoints)}
        for advance in steps:
            clock.now += advance
            for r in runners.values():
                await r.step()
        await d.stop()

    asyncio.run(run())
    writer.close()


def _sent_ids(sender: FakeSender, url: str = "") -> list[int]:
    out = []
    for u, data in sender.acked:
        if url and u != url:
            continue
        events = data["data"]["events"] if data["type"] == "batch" else [data]
        out += [int(e["id"].removeprefix("evt_")) for e in events]
    return out


def test_lanes_keep_each_messages_order_and_a_failure_holds_the_cursor(
    tmp_path: Path, spool_conn: sqlite3.Connection
):
    """Concurrency 3, batch 2: one lane fails once; events of a message never overtake each
    other, the cursor stops before the failed ones, the retry waits for its time."""
    conn, path, clock = spool_conn, tmp_path / "spool.sqlite", Clock()
    ep = endpoints.add(conn, SETTINGS, "http://h.test/", "*", 0.0, batch=2, concurrency=3)
    _events(conn, 20)  # queue ids Q0..Q4, ids 1..20
    sender = FakeSender(_fail_once_at("Q1"))
    _dispatch(path, sender, clock, [0, 0, 0])
    row = webhooks.get(conn, ep["id"])
    assert row is not None and row.failures == 1 and row.last_status == "500"
    assert row.next_try == clock.now + 5.0 and row.cursor < 20
    assert sender.acked and len(sender.posts) > len(sender.acked)  # the other lanes went on

    before = _sent_ids(sender)
    assert _in_order(before) and 0 < len(before) < 20
    del sender.acked[:]
    _dispatch(path, sender, clock, [6, 0])  # due: like a restart, from the stored cursor
    row = webhooks.get(conn, ep["id"])
    assert row is not None and (row.cursor, row.failures) == (20, 0)
    after = _sent_ids(sender)
    assert set(before + after) == set(range(1, 21)) and _in_order(after)
    assert len(before) + len(after) > 20  # what other lanes had acknowledged came again


def _fail_once_at(queue_id: str) -> Callable[[str, Any], int]:
    """An endpoint that answers 500 to the first batch starting with ``queue_id``'s event,
    2xx to everything else."""
    failed: list[int] = []

    def answer(url: str, data: Any) -> int:
        if not failed and data["data"]["events"][0]["data"]["queue_id"] == queue_id:
            failed.append(1)
            return 500
        return 200

    return answer


def _in_order(ids: list[int]) -> bool:
    """The events of each message (queue id Q{(id - 1) % 5}) in id order."""
    by_message: dict[int, list[int]] = {}
    for i in ids:
        by_message.setdefault((i - 1) % 5, []).append(i)
    return all(v == sorted(v) for v in by_message.values())


def test_a_retry_in_the_same_process_sends_only_what_was_not_acknowledged(
    tmp_path: Path, spool_conn: sqlite3.Connection
):
    conn, path, clock = spool_conn, tmp_path / "spool.sqlite", Clock()
    ep = endpoints.add(conn, SETTINGS, "http://h.test/", "*", 0.0, batch=2, concurrency=3)
    _events(conn, 20)
    sender = FakeSender(_fail_once_at("Q1"))
    _dispatch(path, sender, clock, [0, 0, 1, 5, 0, 0])  # the retry comes due at +5 s
    row = webhooks.get(conn, ep["id"])
    assert row is not None and (row.cursor, row.failures, row.sent) == (20, 0, 20)
    ids = _sent_ids(sender)
    assert sorted(ids) == list(range(1, 21))  # each once: the retry skipped what was acked
    assert _in_order(ids)


def test_410_disables_and_a_filter_skips_what_it_does_not_match(
    tmp_path: Path, spool_conn: sqlite3.Connection
):
    conn, path, clock = spool_conn, tmp_path / "spool.sqlite", Clock()
    gone = endpoints.add(conn, SETTINGS, "http://gone.test/", "*", 0.0)["id"]
    picky = endpoints.add(conn, SETTINGS, "http://picky.test/", "bounced", 0.0)["id"]
    _events(conn, 5, "delivered")
    _events(conn, 2, "bounced")
    sender = FakeSender(lambda url, data: 410 if "gone" in url else 204)
    _dispatch(path, sender, clock, [0, 0, 0, 0])
    g, p = webhooks.get(conn, gone), webhooks.get(conn, picky)
    assert g is not None and g.disabled.startswith("410 Gone") and g.sent == 0
    assert len([u for u, _, _ in sender.posts if "gone" in u]) == 1  # not tried again
    assert p is not None and p.sent == 2 and p.cursor == 7 and p.last_status == "204"
    assert _sent_ids(sender, "http://picky.test/") == [6, 7]
