"""The rules evaluated over samples of the metrics, with hysteresis.

Each evaluation is fed the samples of the contract's metrics at that moment (name -> list of
(labels, value), as a Prometheus scrape would see them). Windowed rules need the past: the
evaluator keeps a ring of (time, sums) as long as the longest window, and a window's increase
is the sum now minus the sum at the newest sample at least that old (or the oldest there is:
a young relayd looks at what it has, as Prometheus's increase() does). A counter that went
down (a restart) counts from zero.

Hysteresis, so that a value wandering about the threshold does not flap: an alert fires once
its condition has held for the rule's ``for``; it resolves once its value has stayed at or
below ``threshold * resolve_ratio`` (above ``threshold / resolve_ratio`` for DiskNearlyFull,
whose condition is a value below) for ``resolve_for``. A rule with too little traffic to apply
(under its ``minimum`` attempts), or a series that went away, counts as below."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from relayd.alerts.rules import Kind, Rule
from relayd.config import _human as human

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs: hashable
Samples = Mapping[str, Iterable[tuple[Mapping[str, str], float]]]
QUANTILE = 0.99


@dataclass(frozen=True)
class Change:
    """An alert fired or resolved: what the event and the mail say."""

    alert: str
    state: str  # "firing" | "resolved"
    value: float | None  # None: the rule no longer applies (no traffic, the series is gone)
    threshold: float  # the rule's effective threshold (for DiskNearlyFull: in bytes)
    labels: dict[str, str]
    summary: str
    at: float


@dataclass
class _State:
    firing: bool = False
    since: float | None = None  # when the condition began to differ from ``firing``
    threshold: float = 0.0  # the last one: what a resolution says when the series is gone


@dataclass
class _Point:
    at: float
    sums: dict[str, float] = field(default_factory=dict)


class Evaluator:
    def __init__(
        self,
        rules: Iterable[Rule],
        resolve_for: float,
        resolve_ratio: float,
        clock: Callable[[], float],
    ) -> None:
        self.clock = clock
        self.states: dict[tuple[str, Labels], _State] = {}
        self.history: deque[_Point] = deque()
        self._bases: dict[float, _Point] = {}
        self.configure(rules, resolve_for, resolve_ratio)

    def configure(self, rules: Iterable[Rule], resolve_for: float, resolve_ratio: float) -> None:
        """Rules and hysteresis (at start and on reload); a rule turned off loses its state."""
        self.rules = [rule for rule in rules if rule.enabled]
        self.resolve_for, self.resolve_ratio = resolve_for, resolve_ratio
        names = {rule.name for rule in self.rules}
        self.states = {key: s for key, s in self.states.items() if key[0] in names}

    def restore(self, firing: Iterable[tuple[str, dict[str, str]]]) -> None:
        """Alerts that were firing when relayd stopped (their last event): they do not fire
        again at start, and resolve as any other once their condition is gone."""
        for name, labels in firing:
            self.states[(name, _key(labels))] = _State(firing=True)

    def observe(self, samples: Samples) -> list[Change]:
        """One evaluation: the samples of now, the alerts that changed."""
        now = self.clock()
        series = {
            name: [(dict(labels), float(v)) for labels, v in rows] for name, rows in samples.items()
        }
        self._remember(now, series)
        changes: list[Change] = []
        for rule in self.rules:
            seen: set[Labels] = set()
            for labels, value, threshold in self._values(rule, series):
                seen.add(labels)
                changes.extend(self._step(rule, labels, value, threshold, now))
            for name, labels in list(self.states):
                if name == rule.name and labels not in seen:
                    changes.extend(
                        self._step(rule, labels, None, self.states[(name, labels)].threshold, now)
                    )
        return changes

    # -- the values --------------------------------------------------------------------------

    def _remember(self, now: float, series: dict[str, list[tuple[dict[str, str], float]]]) -> None:
        point = _Point(now)
        for name, rows in series.items():
            point.sums[name] = sum(v for _, v in rows)
            for labels, v in rows:
                if name.endswith("_bucket") and "le" in labels:
                    point.sums[f"{name}|{labels['le']}"] = (
                        point.sums.get(f"{name}|{labels['le']}", 0.0) + v
                    )
        self.history.append(point)
        self._bases: dict[float, _Point] = {}
        longest = max((rule.window for rule in self.rules), default=0.0)
        # keep the newest point at least ``longest`` old: it is the base of that window
        while len(self.history) > 2 and self.history[1].at <= now - longest:
            self.history.popleft()

    def _base(self, window: float) -> _Point:
        """The newest point at least ``window`` old, or the oldest there is (looked up once
        per window and evaluation: a 24 h ring at 30 s holds 2,880 points)."""
        if window in self._bases:
            return self._bases[window]
        now, base = self.history[-1], self.history[0]
        for point in self.history:
            if point.at > now.at - window:
                break
            base = point
        self._bases[window] = base
        return base

    def _increase(self, key: str, window: float) -> float:
        current, before = self.history[-1].sums.get(key, 0.0), self._base(window).sums.get(key, 0.0)
        return current if current < before else current - before

    def _values(
        self, rule: Rule, series: dict[str, list[tuple[dict[str, str], float]]]
    ) -> list[tuple[Labels, float | None, float]]:
        """(labels, value or None when the rule does not apply, effective threshold)."""
        if rule.kind is Kind.GAUGE:
            rows = series.get(rule.metrics[0], [])
            return [
                (((rule.by, labels.get(rule.by, "")),), v, rule.threshold) for labels, v in rows
            ]
        if rule.kind is Kind.FLOOR:
            free, least = (sum(v for _, v in series.get(m, [])) for m in rule.metrics)
            present = rule.metrics[0] in series and least > 0  # no minimum: relayd never refuses
            return [((), free if present else None, rule.threshold * least)]
        if rule.kind is Kind.GROWTH:
            if not all(m in series for m in rule.metrics):
                return [((), None, rule.threshold)]
            # a gauge: its drop is a drop, not a counter reset
            base = self._base(rule.window)
            now = self.history[-1].sums
            value = sum(now[m] - base.sums.get(m, now[m]) for m in rule.metrics)
            return [((), value, rule.threshold)]
        if rule.kind is Kind.RATIO:
            part = sum(self._increase(m, rule.window) for m in rule.metrics)
            whole = sum(self._increase(m, rule.window) for m in rule.per)
            ok = whole >= max(rule.minimum, 1)
            return [((), part / whole if ok else None, rule.threshold)]
        return [((), self._quantile(rule.metrics[0], rule.window), rule.threshold)]

    def _quantile(self, histogram: str, window: float) -> float | None:
        """histogram_quantile(0.99, increase(NAME_bucket[window])): linear within a bucket; the
        +Inf bucket answers the highest finite bound, as Prometheus does."""
        prefix = f"{histogram}_bucket|"
        bounds = sorted(
            (float(key[len(prefix) :]), key)
            for key in self.history[-1].sums
            if key.startswith(prefix)
        )
        counts = [(le, self._increase(key, window)) for le, key in bounds]
        if not counts or counts[-1][1] <= 0:
            return None
        rank = QUANTILE * counts[-1][1]
        lower, below = 0.0, 0.0
        for le, count in counts:
            if count >= rank:
                if math.isinf(le):
                    return lower
                return lower + (le - lower) * (rank - below) / max(count - below, 1e-12)
            lower, below = le, count
        return lower

    # -- the hysteresis ----------------------------------------------------------------------

    def _step(
        self, rule: Rule, labels: Labels, value: float | None, threshold: float, now: float
    ) -> list[Change]:
        key = (rule.name, labels)
        state = self.states.get(key)
        if state is None:
            if value is None:
                return []
            state = self.states[key] = _State()
        state.threshold = threshold
        if state.firing:
            level = (
                threshold / self.resolve_ratio
                if rule.kind is Kind.FLOOR
                else threshold * self.resolve_ratio
            )
            bad = value is not None and (
                value < level if rule.kind is Kind.FLOOR else value > level
            )
            wait = self.resolve_for
        else:
            bad = value is not None and (
                value < threshold if rule.kind is Kind.FLOOR else value > threshold
            )
            wait = rule.for_
        if bad == state.firing:
            state.since = None
            if not state.firing and value is None:
                del self.states[key]
            return []
        if state.since is None:
            state.since = now
        if now - state.since < wait:
            return []
        state.firing, state.since = not state.firing, None
        change = Change(
            rule.name,
            "firing" if state.firing else "resolved",
            value,
            threshold,
            dict(labels),
            _summary(rule, value, threshold, labels),
            now,
        )
        if not state.firing:
            del self.states[key]
        return [change]


def _key(labels: Mapping[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def _summary(rule: Rule, value: float | None, threshold: float, labels: Labels) -> str:
    if value is None:
        return f"{rule.name}: no longer applies (too little traffic, or the series is gone)"
    window = human(rule.window)
    return f"{rule.name}: " + rule.summary.format(
        value=value, threshold=threshold, window=window, **dict(labels)
    )
