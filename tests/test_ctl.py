"""relayctl against a running relayd: what it shows of deferred mail, and that hold, release,
retry and delete change what the daemon does next, not just rows in the spool."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import RelayProcess
from support.fakemx import FakeMX
from support.util import mx_zone, send, wait_until

DEFER = "451 4.3.0 try later"
ACCEPT = "250 2.1.5 ok"
SLOW_RETRY = {"retry": {"first": "1h", "max_interval": "1h"}}  # deferred mail stays put


def submit(relay: RelayProcess, *rcpts: str, subject: str = "hello") -> str:
    """Send one message from alice@sender.test; returns its queue id."""
    return send(relay.port, list(rcpts), "alice@sender.test", subject).rsplit(" ", 1)[1]


def ctl_json(relay: RelayProcess, *args: str) -> Any:
    return json.loads(relay.ctl("--json", *args).stdout)


def queued(relay: RelayProcess, *filters: str) -> list[str]:
    return [m["queue_id"] for m in ctl_json(relay, "list", *filters)]


def states(relay: RelayProcess, queue_id: str) -> dict[str, str]:
    return {r["rcpt"]: r["state"] for r in ctl_json(relay, "show", queue_id)["recipients"]}


def deferrals(relay: RelayProcess, queue_id: str) -> int:
    return len([e for e in relay.events("deferred") if e["queue_id"] == queue_id])


@pytest.fixture
def mxs(dns_server, fake_mx) -> dict[str, FakeMX]:
    """example.test and other.test, each with an MX that defers every recipient."""
    servers = {}
    for domain, ip in (("example.test", "127.0.0.10"), ("other.test", "127.0.0.11")):
        mx_zone(dns_server, domain, (10, f"mx.{domain}", ip))
        servers[domain] = fake_mx(ip, rcpt_reply=DEFER)
    return servers


def test_queue_list_and_show_describe_deferred_mail(relay, mxs):
    proc = relay(SLOW_RETRY)
    qid = submit(proc, "a@example.test", "b@example.test", subject="status report")
    other = submit(proc, "x@other.test")
    proc.wait_event("deferred", n=2, queue_id=qid)
    proc.wait_event("deferred", queue_id=other)

    text = proc.ctl("queue").stdout.splitlines()
    assert " ".join(text[0].split()) == "T 5m 10m 20m 40m 80m 160m 320m 640m 1280m 1280m+"
    assert text[1].split()[:3] == ["TOTAL", "3", "3"]
    assert text[2].split()[:3] == ["example.test", "2", "2"]
    assert text[3].split()[:3] == ["other.test", "1", "1"]
    shape = ctl_json(proc, "queue", "--top", "1", "--state", "deferred")
    assert [(r["domain"], r["total"], r["5m"]) for r in shape] == [
        ("TOTAL", 3, 3),
        ("example.test", 2, 2),
    ]

    (entry,) = ctl_json(proc, "list", "--domain", "example.test")
    assert (entry["queue_id"], entry["sender"]) == (qid, "alice@sender.test")
    assert entry["recipients"] == 2
    assert entry["states"] == {"deferred": 2}
    assert queued(proc, "--domain", "OTHER.test") == [other]
    assert queued(proc, "--sender", "ALICE", "--state", "deferred") == [qid, other]
    assert qid in proc.ctl("list").stdout

    shown = json.loads(proc.ctl("show", qid, "--json").stdout)
    assert shown["sender"] == "alice@sender.test"
    assert (shown["client"], shown["helo"]) == ("127.0.0.1", "client.test")
    assert shown["origin"] == "trusted:127.0.0.1"
    for r in shown["recipients"]:
        assert (r["state"], r["attempts"], r["last_code"]) == ("deferred", 1, 451)
        assert r["last_reply"] == "4.3.0 try later"
        assert r["last_mx"].startswith("mx.example.test[127.0.0.10]")
        assert r["next_attempt"]
    assert shown["headers"].startswith("Received: from client.test ([127.0.0.1])")
    assert "\nSubject: status report\n" in shown["headers"]
    assert "body" not in shown
    text = proc.ctl("show", qid).stdout
    assert "deferred" in text and "451 4.3.0 try later" in text
    assert "Received: " in text and "Subject: status report" in text and "hello" not in text
    assert proc.ctl("show", qid, "--body").stdout.rstrip().endswith("\nhello")


def test_hold_keeps_mail_from_the_daemon_until_release(relay, mxs):
    proc, mx = relay(), mxs["example.test"]
    held, other, clock = (submit(proc, f"{name}@example.test") for name in ("a", "b", "c"))
    for qid in (held, other, clock):
        proc.wait_event("deferred", queue_id=qid)

    assert ctl_json(proc, "hold", held) == {"action": "hold", "recipients": 1, "messages": [held]}
    proc.wait_event("operator", action="hold")  # the daemon has dropped it from memory
    assert states(proc, held) == {"a@example.test": "held"}
    assert queued(proc, "--state", "held") == [held]
    attempts = ctl_json(proc, "show", held)["recipients"][0]["attempts"]

    # From now on an attempt for a would deliver it; b is delivered at its next retry (its
    # own, 1 s later: relayctl retry is tested with slow retries below, where it cannot race
    # the daemon's); c keeps being deferred, as a clock.
    mx.rcpt_replies["c@example.test"] = DEFER
    mx.rcpt_reply = ACCEPT
    assert [m.rcpts for m in mx.wait_for_messages(1)] == [["b@example.test"]]
    wait_until(lambda: other not in queued(proc), what="b to leave the spool")
    # Two more retries of c span more than a's longest retry interval (retry.max_interval).
    proc.wait_event("deferred", n=deferrals(proc, clock) + 2, queue_id=clock)
    assert len(mx.messages) == 1
    assert states(proc, held) == {"a@example.test": "held"}
    assert ctl_json(proc, "show", held)["recipients"][0]["attempts"] == attempts

    assert ctl_json(proc, "release", held)["recipients"] == 1
    assert [m.rcpts for m in mx.wait_for_messages(2)][1] == ["a@example.test"]
    proc.wait_event("delivered", queue_id=held)
    wait_until(lambda: held not in queued(proc), what="a to leave the spool")
    assert queued(proc) == [clock]


def test_retry_makes_deferred_mail_due_now(relay, mxs):
    proc, mx = relay(SLOW_RETRY), mxs["example.test"]
    qid, held = submit(proc, "a@example.test"), submit(proc, "h@example.test")
    for q in (qid, held):
        (event,) = proc.wait_event("deferred", queue_id=q)
        assert event["next_attempt_in_s"] > 3000
    assert ctl_json(proc, "hold", held)["recipients"] == 1
    mx.rcpt_reply = ACCEPT

    assert ctl_json(proc, "retry", qid, held) == {
        "action": "retry",
        "recipients": 1,  # the held one stays held
        "messages": [qid],
    }
    assert [m.rcpts for m in mx.wait_for_messages(1)] == [["a@example.test"]]
    wait_until(lambda: queued(proc) == [held], what="only the held message left")
    assert ctl_json(proc, "retry", "--domain", "example.test")["recipients"] == 0

    assert "released 1 recipient(s) of 1 message(s)" in proc.ctl("release", held).stdout
    assert [m.rcpts for m in mx.wait_for_messages(2)][1] == ["h@example.test"]
    wait_until(lambda: queued(proc) == [], what="an empty spool")


def test_delete_by_id_and_by_domain(relay, mxs):
    proc, mx = relay(SLOW_RETRY), mxs["example.test"]
    single = submit(proc, "a@example.test")
    both = submit(proc, "b@example.test", "x@other.test")
    proc.wait_event("deferred", queue_id=single)
    proc.wait_event("deferred", n=2, queue_id=both)

    assert ctl_json(proc, "delete", single) == {
        "action": "delete",
        "recipients": 1,
        "messages": [single],
        "removed": [single],
    }
    assert queued(proc) == [both]
    result = ctl_json(proc, "delete", "--domain", "other.test")
    assert (result["recipients"], result["messages"], result["removed"]) == (1, [both], [])
    assert states(proc, both) == {"b@example.test": "deferred"}
    assert queued(proc, "--domain", "other.test") == []

    # The daemon still delivers what is left, and nothing of what was deleted.
    mx.rcpt_reply = ACCEPT
    assert ctl_json(proc, "retry", "--domain", "example.test")["messages"] == [both]
    assert [m.rcpts for m in mx.wait_for_messages(1)] == [["b@example.test"]]
    wait_until(lambda: queued(proc) == [], what="an empty spool")
    assert len(mx.messages) == 1 and mxs["other.test"].messages == []
    assert "removed 0 message(s)" in proc.ctl("delete", "--domain", "example.test").stdout


def test_unknown_queue_id_changes_nothing(relay, mxs):
    proc = relay(SLOW_RETRY)
    qid = submit(proc, "a@example.test")
    proc.wait_event("deferred", queue_id=qid)
    for command in ("show", "delete"):  # hold, release and retry resolve ids as delete does
        result = proc.ctl(command, "NOSUCHID", check=False)
        assert result.returncode == 1, command
        assert "NOSUCHID" in result.stderr and result.stdout == ""
    result = proc.ctl("hold", qid, "NOSUCHID", check=False)
    assert result.returncode == 1
    assert states(proc, qid) == {"a@example.test": "deferred"}


def test_config_and_spool_errors(relay):
    proc = relay(start=False)
    result = proc.ctl("queue", check=False)
    assert result.returncode == 1
    assert "no spool" in result.stderr and str(proc.spool) in result.stderr
    assert proc.ctl("hold", "--domain", "example.test", check=False).returncode == 1
    assert not proc.spool.exists()

    proc.config_path.write_text(proc.config_path.read_text().replace('"1s"', '"soon"'))
    result = proc.ctl("list", check=False)
    assert result.returncode == 78
    assert str(proc.config_path) in result.stderr and "retry.first" in result.stderr
    proc.config_path.write_text('[server]\nspool_path = "spool.sqlite"\nbogus = 1\n')
    result = proc.ctl("--json", "queue", check=False)
    assert result.returncode == 78
    assert "server.bogus" in result.stderr and result.stdout == ""


def test_hold_by_domain_leaves_other_domains_of_a_message_alone(relay, mxs):
    proc = relay({"shaping": {"domains": {"example.test": {"max_connections": 1}}}})
    mx = mxs["example.test"]
    mx.rcpt_reply, mx.accept_delay = ACCEPT, 4.0  # the one connection is busy 4 s per message
    first = submit(proc, "a@example.test")
    mx.wait_for_connections(1)
    both = submit(proc, "b@example.test", "x@other.test")  # its example.test job waits in memory
    assert ctl_json(proc, "hold", "--domain", "other.test")["messages"] == [both]
    proc.wait_event("delivered", queue_id=first)
    wait_until(
        lambda: states(proc, both) == {"b@example.test": "delivered", "x@other.test": "held"},
        10,
        "b delivered, x still held",
    )
