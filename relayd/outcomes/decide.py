"""The policy after an attempt, as pure functions of the results, the config and the time they
are given: testable without sockets, a spool or a clock."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from relayd.config import Retry, Suppression
from relayd.events.records import Event, Type, receipt_keys
from relayd.model.address import domain_of
from relayd.model.message import (
    REPORTED_DELAYED,
    REPORTED_DELIVERED,
    REPORTED_FAILED,
    Job,
    Notify,
    Result,
    State,
)
from relayd.model.status import Reply
from relayd.outcomes.classify import Classifier
from relayd.spool import suppression
from relayd.spool.suppression import Entry

_EVENT = {
    State.DELIVERED: Type.DELIVERY,
    State.DEFERRED: Type.TRANSIENT_FAILURE,
    State.BOUNCED: Type.BOUNCE,
}


def retry_delay(attempts: int, retry: Retry, rng: random.Random) -> float:
    """Backoff after the ``attempts``-th failed attempt: first, doubling, jittered, and never
    longer than ``max_interval`` (the documented longest delay), jitter included."""
    try:
        grown = retry.first * retry.multiplier ** max(attempts - 1, 0)
    except OverflowError:  # after a thousand attempts or so
        grown = retry.max_interval
    base = min(grown, retry.max_interval)
    return min(base * (1 + rng.uniform(-retry.jitter, retry.jitter)), retry.max_interval)


def decide(
    job: Job,
    replies: Sequence[tuple[int, Reply]],
    mx: str,
    source_ip: str,
    now: float,
    retry: Retry,
    classifier: Classifier,
    rng: random.Random,
) -> tuple[list[Result], list[Event]]:
    """Each recipient's new state (a deferral past the message's lifetime expires it as a
    bounce, 4.4.7) and the event that reports it, with the reply's class when it failed (an
    expiry's is ``expired``)."""
    by_id = {r.id: r for r in job.recipients}
    results, events = [], []
    receipt = receipt_keys(job.envid, job.meta, job.stream)
    expires = job.received_at + retry.max_age
    for rid, reply in replies:
        r = by_id[rid]
        state, text, next_attempt, kind = reply.state, reply.text, 0.0, _EVENT[reply.state]
        cls = "" if state is State.DELIVERED else classifier.classify(reply.code, text)
        if state is State.DEFERRED:
            if now >= expires:
                state, kind, cls = State.BOUNCED, Type.EXPIRATION, "expired"
                text = f"4.4.7 message expired after {retry.max_age:.0f}s; last reply: {text}"
            else:
                next_attempt = min(now + retry_delay(r.attempts + 1, retry, rng), expires)
        results.append(Result(rid, state, reply.code, text, mx, next_attempt))
        data = {
            "sender": job.sender,
            "rcpt": r.rcpt,
            "domain": job.domain,
            "mx": mx,
            "source_ip": source_ip,
            "code": reply.code,
            "response": text,
            "attempt": r.attempts + 1,
            "delay_s": round(now - job.received_at, 3),
        }
        if cls:
            data["class"] = cls
        if next_attempt:
            data["next_attempt_in_s"] = round(next_attempt - now, 1)
        if r.orcpt is not None:
            data["orcpt"] = r.orcpt
        data.update(receipt)
        events.append(Event(kind, job.queue_id, now, data))
    return results, events


def wants(notify: int, flag: int) -> bool:
    """Whether a recipient's NOTIFY asks for the DSN ``flag`` names: not given (0) means
    failures and delays (RFC 3461 4.1), as relayd always did; NEVER means none."""
    if not notify:
        return flag in (Notify.FAILURE, Notify.DELAY)
    return bool(notify & flag) and not notify & Notify.NEVER


@dataclass
class Owed:
    """The indexes of the recipients each kind of report must cover now."""

    failed: list[int] = field(default_factory=list)  # a failure DSN
    delayed: list[int] = field(default_factory=list)  # a delay warning
    delivered: list[int] = field(default_factory=list)  # a success DSN (NOTIFY=SUCCESS)
    unwanted: list[int] = field(default_factory=list)  # bounces NOTIFY asks no DSN for
    finished: bool = False  # every recipient final: the message may leave the spool


def owed(
    states: Sequence[tuple[State, int, int]],
    received_at: float,
    now: float,
    delay_warning: float,
) -> Owed:
    """Given each recipient's (state, reported flags, NOTIFY flags): what must be reported now,
    and whether the message is finished. Nothing is reported while a recipient is still in
    memory or never tried: one DSN per event, with every recipient it concerns. A bounce whose
    NOTIFY asks for no failure DSN is ``unwanted``: recorded as suppressed, never owed again."""
    kinds = {s for s, _, _ in states}
    out = Owed(finished=kinds <= {State.DELIVERED, State.BOUNCED})
    if State.ACTIVE in kinds or State.PENDING in kinds:
        out.finished = False
        return out
    warn = bool(delay_warning) and now - received_at >= delay_warning
    for i, (s, rep, notify) in enumerate(states):
        if s is State.BOUNCED and not rep & REPORTED_FAILED:
            (out.failed if wants(notify, Notify.FAILURE) else out.unwanted).append(i)
        elif s is State.DEFERRED and warn and not rep & REPORTED_DELAYED:
            if wants(notify, Notify.DELAY):
                out.delayed.append(i)
        elif (
            s is State.DELIVERED and not rep & REPORTED_DELIVERED and wants(notify, Notify.SUCCESS)
        ):
            out.delivered.append(i)
    return out


def hard_bounces(
    events: Sequence[Event],
    classifier: Classifier,
    policy: Suppression,
    origin: Callable[[], str],
    now: float,
) -> list[Entry]:
    """The suppression entries an attempt's hard bounces make (``bounces.suppress_classes``;
    none when ``suppression.bounce_ttl`` is 0), scoped as ``suppression.bounce_scope`` says.
    ``origin`` gives the message's "key:NAME"/"auth:NAME" when the scope needs it; mail from a
    trusted network has none, and its entries are global."""
    hard = [e for e in events if e.type == Type.BOUNCE and classifier.is_hard(e.data["class"])]
    if not hard or not policy.bounce_ttl:
        return []
    scope = suppression.GLOBAL
    if policy.bounce_scope == "sender_domain":
        domain = domain_of(hard[0].data["sender"])
        scope = f"domain:{domain}" if domain else suppression.GLOBAL
    elif policy.bounce_scope == "key" and origin().startswith(("key:", "auth:")):
        scope = origin()
    return [
        Entry(
            e.data["rcpt"],
            scope,
            "bounce",
            now,
            now + policy.bounce_ttl,
            e.data["class"],
            f"{e.data['code']} {e.data['response']}"[:1000],
            e.queue_id,
        )
        for e in hard
    ]
