"""Message text is held where it is needed, once: waiting jobs hold none, the hand-off and the
DATA reader do not copy it, delivery streams large texts from the spool. Functional checks of
behaviour only (no timing, no RSS): benchmarks/suite.sh rows 11 and 12 measure memory."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from relayd.delivery import client as delivery
from relayd.ingress.smtp import RelaySMTP
from relayd.mime import headers
from relayd.model.message import NewMessage
from relayd.queue.scheduler import Budget
from relayd.spool import schema, store


def _unstuffed(wire: bytes) -> bytes:
    """The reference: RFC 5321 4.5.2 on the whole text at once."""
    text = ("\r\n" + wire.decode("latin-1")).replace("\r\n.", "\r\n")[2:]
    return text.encode("latin-1")


def _text(rng: random.Random, size: int) -> bytes:
    lines, total = [], 0
    while total < size:
        lines.append(rng.choice([b".", b"..", b"...x", b"a.b", b"", b"x" * rng.randint(1, 90)]))
        total += len(lines[-1]) + 2
    return b"\r\n".join(lines) + b"\r\n"


def _stuffed_reference(text: bytes) -> bytes:
    stuffed = ("\r\n" + text.decode("latin-1")).replace("\r\n.", "\r\n..")[2:].encode("latin-1")
    return stuffed + (b".\r\n" if stuffed.endswith(b"\r\n") else b"\r\n.\r\n")


@pytest.mark.parametrize("limit", [7, 64, 1000])
def test_data_is_unstuffed_across_block_boundaries(limit: int) -> None:
    rng = random.Random(limit)
    text = _text(rng, 20_000)
    wire = _stuffed_reference(text)

    async def read() -> bytearray | None:
        reader = asyncio.StreamReader(limit=limit)
        reader.feed_data(wire)
        reader.feed_eof()
        session = RelaySMTP.__new__(RelaySMTP)
        session.data_size_limit = 0
        return await session._read_data(reader)

    got = asyncio.run(read())
    assert got is not None
    assert bytes(got) == _unstuffed(wire[:-3]) == text


def test_data_over_the_size_limit_is_dropped_not_kept() -> None:
    async def read() -> bytearray | None:
        reader = asyncio.StreamReader(limit=64)
        reader.feed_data(b"y" * 5000 + b"\r\n.\r\n")
        reader.feed_eof()
        session = RelaySMTP.__new__(RelaySMTP)
        session.data_size_limit = 1000
        return await session._read_data(reader)

    assert asyncio.run(read()) is None


def _spool(tmp_path: Path) -> sqlite3.Connection:
    path = tmp_path / "spool.sqlite"
    schema.prepare(path)
    return schema.connect(path)


@pytest.mark.parametrize("size", [1000, 300_000, 3_000_000])
def test_loaded_jobs_hold_no_text_and_the_spool_gives_it_back(tmp_path: Path, size: int) -> None:
    conn = _spool(tmp_path)
    text = _text(random.Random(size), size)
    msg = NewMessage("Q", "a@x.test", ["b@y.test", "c@z.test"], text, "c", "h", "o", False)
    store.insert_message(conn, msg, 0.0)
    jobs, _ = store.load_due(conn, 1.0, 10, 10)
    assert len(jobs) == 2
    assert all(job.body is None and job.size == len(text) for job in jobs)
    reader = schema.reader(tmp_path / "spool.sqlite")
    assert store.text_of(reader, msg.msg_id) == text
    blob = store.open_body(reader, msg.msg_id)
    assert blob is not None and blob.read() == text
    blob.close()
    assert store.open_body(reader, msg.msg_id + 1) is None
    assert store.text_of(reader, msg.msg_id + 1) is None


class _Capture:
    """Stands in for the client protocol: records what DATA would put on the wire."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.drains = 0

    def write(self, data: bytes) -> None:
        self.out.append(bytes(data))

    def writelines(self, data: list[bytes]) -> None:
        self.out.extend(bytes(d) for d in data)

    async def drain(self, timeout: float) -> None:
        self.drains += 1


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b".starts with a dot\r\n",
        b"no final line end",
        b"a\r\n.dot\r\n..two\r\n",
        None,  # a large random text: many pieces, dots at their edges
    ],
)
def test_streamed_text_is_the_text_dot_stuffed(text: bytes | None) -> None:
    if text is None:
        text = _text(random.Random(5), 3 * delivery.PIECE + 12345)
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, body BLOB)")
    db.execute("INSERT INTO messages VALUES (1, ?)", (text,))
    capture = _Capture()
    conn = delivery.Connection(capture, set(), "mx", "", 5.0)  # type: ignore[arg-type]
    with db.blobopen("messages", "body", 1, readonly=True) as blob:
        asyncio.run(conn._stream(blob))
    wire = b"".join(capture.out)
    whole = delivery._stuffed(text)
    assert wire == whole + delivery._end(whole) == _stuffed_reference(text)
    if len(text) > delivery.PIECE:
        assert capture.drains >= 3  # written piece by piece, waiting for the transport


def test_budget_bounds_bytes_in_flight_first_come_first_served() -> None:
    async def run() -> list[str]:
        budget = Budget(100)
        order: list[str] = []

        async def take(name: str, size: int, hold: float) -> None:
            got = await budget.acquire(size)
            order.append(name)
            assert budget.free >= 0
            await asyncio.sleep(hold)
            budget.release(got)

        await asyncio.gather(
            take("a", 60, 0.02), take("b", 60, 0), take("c", 10, 0), take("huge", 10**9, 0)
        )
        assert budget.free == 100
        return order

    assert asyncio.run(run()) == ["a", "b", "c", "huge"]


def test_line_length_check_matches_splitting_into_lines() -> None:
    from relayd.mime import headers

    rng = random.Random(3)
    for _ in range(300):
        lines = [b"y" * rng.choice([0, 1, 5, 9, 10, 11, 12, 30]) for _ in range(rng.randint(1, 8))]
        text = b"\r\n".join(lines) + rng.choice([b"", b"\r\n"])
        limit = rng.choice([1, 5, 10, 11])
        expect = max(map(len, text.split(b"\r\n"))) > limit
        assert headers.longest_line_over(text, limit) is expect, (text, limit)
        assert headers.longest_line_over(bytearray(text), limit) is expect


def test_the_line_end_scans_agree_with_their_definitions() -> None:
    """has_bare_newlines, stuff_dots and unstuff_dots (one pass each over every message)
    against their definitions, on short random texts of CR, LF, dots and letters."""
    rng = random.Random(7)
    for _ in range(5000):
        text = bytes(rng.choice(b"\r\n.a") for _ in range(rng.randint(0, 12)))
        pairs = text.count(b"\r\n")
        bare = text.count(b"\r") != pairs or text.count(b"\n") != pairs
        assert headers.has_bare_newlines(text) is bare, text
        assert headers.has_bare_newlines(bytearray(text)) is bare, text
        assert headers.stuff_dots(text) == text.replace(b"\r\n.", b"\r\n.."), text
        assert headers.unstuff_dots(text) == text.replace(b"\r\n.", b"\r\n"), text
        if b"\r\n." not in text:
            assert headers.stuff_dots(text) is text  # not copied


@pytest.mark.parametrize(
    "command", [["-m", "relayd"], ["-c", "from relayd.__main__ import main; main()"]]
)
def test_the_daemon_does_not_load_rich_or_pygments(command: list[str]) -> None:
    """structlog loads them whenever rich is installed (relayctl top needs it); the daemon keeps
    them out, by both of its entry points (``python -m relayd`` and the ``relayd`` script)."""
    config = Path(__file__).resolve().parents[1] / "conf" / "relayd.toml"
    args = [sys.executable, "-X", "importtime", *command, "--check", "--config", str(config)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "structlog.dev" in done.stderr  # the import that would bring them in ran
    loaded = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()]
    assert not [m for m in loaded if m.startswith(("rich.", "pygments"))]
