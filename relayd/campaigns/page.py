"""The report page: the report's figures as a table and as charts drawn here, in inline SVG (a
bar chart of each variant's rates, a line chart of delivered, opened and clicked over time),
so that the page needs no script, font or file from anywhere. Each bar and line carries its
figures in data- attributes, the same numbers it is drawn from. Jinja2 with autoescape: the
campaign's name and variants come from its owner."""

from __future__ import annotations

from itertools import accumulate
from typing import Any

from jinja2 import DictLoader, Environment

from relayd.campaigns.report import iso

# (rate, label, colour) of the bars; delivered, opened and clicked keep their colours in the
# line chart
BARS = (
    ("delivery_rate", "delivered", "#1f77b4"),
    ("open_rate", "opened", "#ff7f0e"),
    ("click_rate", "clicked", "#2ca02c"),
    ("conversion_rate", "converted", "#9467bd"),
    ("bounce_rate", "bounced", "#d62728"),
    ("unsubscribe_rate", "unsubs", "#7f7f7f"),
    ("complaint_rate", "complaints", "#8c564b"),
)
LINES = (("delivered", "#1f77b4"), ("opened", "#ff7f0e"), ("clicked", "#2ca02c"))
BAR_HEIGHT, BAR_WIDTH, BAR_GAP = 200, 40, 26  # px: a rate of 1 is BAR_HEIGHT tall
LINE_WIDTH, LINE_HEIGHT = 720, 220

_BASE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; background: #fff; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.charts { display: flex; flex-wrap: wrap; gap: 2em; }
figure { margin: 0; }
svg text { font-size: 11px; fill: #333; }
</style>
</head>
<body>
{% block main %}{% endblock %}
</body>
</html>
"""
_REPORT = """{% extends "base" %}{% block main %}
<h1>{{ c.name }}</h1>
<p>Campaign {{ c.id }}: {{ c.state }}, phase {{ c.phase }}{% if c.winner %}, winner
<strong>{{ c.winner }}</strong>{% endif %}; criterion {{ c.criterion }};
{{ c.contacts }} contacts.</p>
{% if cmp %}<p id="comparison" data-z="{{ cmp.z }}" data-p="{{ cmp.p }}"
 data-significant="{{ 'yes' if cmp.significant else 'no' }}">{{ cmp.leader }} against
{{ cmp.against }} by {{ cmp.rate }}: z = {{ '%.3f'|format(cmp.z) }}, p = {{ '%.4f'|format(cmp.p) }},
{% if cmp.significant %}significant: <strong>{{ cmp.winner }}</strong> wins{% else %}not significant
(yet){% endif %}.</p>{% endif %}
<table id="figures">
<tr><th>variant</th>{% for k in columns %}<th>{{ k }}</th>{% endfor %}</tr>
{% for name, v in rows %}<tr data-variant="{{ name }}"><td>{{ name }}</td>
{% for k in columns %}<td data-metric="{{ k }}">{{ v.counts[k] }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% if classes %}<p id="classes">Bounced by class:
{% for k, n in classes %}{{ k }} {{ n }}{{ ", " if not loop.last }}{% endfor %}.</p>{% endif %}
<h2>Rates per variant</h2>
<div class="charts">
{% for chart in bars %}<figure>
<svg class="rates" data-variant="{{ chart.variant }}"
 width="{{ chart.width }}" height="{{ chart.height }}"
 viewBox="0 0 {{ chart.width }} {{ chart.height }}" role="img"
 aria-label="rates of variant {{ chart.variant }}">
<line x1="0" y1="{{ chart.base }}" x2="{{ chart.width }}" y2="{{ chart.base }}" stroke="#999"/>
{% for b in chart.bars %}<rect class="bar" data-metric="{{ b.metric }}" data-value="{{ b.value }}"
 x="{{ b.x }}" y="{{ b.y }}" width="{{ b.w }}" height="{{ b.h }}" fill="{{ b.colour }}"/>
<text x="{{ b.x + b.w / 2 }}" y="{{ b.y - 4 }}" text-anchor="middle">{{ b.label }}</text>
<text x="{{ b.x + b.w / 2 }}" y="{{ chart.base + 14 }}" text-anchor="middle">{{ b.name }}</text>
{% endfor %}</svg>
<figcaption>Variant {{ chart.variant }}</figcaption>
</figure>
{% endfor %}</div>
<h2>Over time</h2>
{% if line %}<svg class="series" width="{{ line.width }}" height="{{ line.height }}"
 viewBox="0 0 {{ line.width }} {{ line.height }}" role="img"
 aria-label="delivered, opened, clicked over time"
 data-step="{{ line.step }}" data-start="{{ line.start }}">
<line x1="0" y1="{{ line.base }}" x2="{{ line.width }}" y2="{{ line.base }}" stroke="#999"/>
{% for s in line.lines %}<polyline class="line" data-metric="{{ s.metric }}"
 data-values="{{ s.figures }}" data-max="{{ line.max }}" points="{{ s.points }}"
 fill="none" stroke="{{ s.colour }}" stroke-width="3"/>
<text x="10" y="{{ 20 + loop.index0 * 16 }}"
 fill="{{ s.colour }}">{{ s.metric }} {{ s.last }}</text>
{% endfor %}</svg>
<p>Cumulative, from {{ line.start }} in steps of {{ line.step }} s.</p>
{% else %}<p>Nothing has happened yet.</p>{% endif %}
{% endblock %}"""
_LOGIN = """{% extends "base" %}{% block main %}
<h1>Log in to see this report</h1>
<p>{{ problem }}</p>
<p>On the relayd host, run <code>relayctl report {{ campaign }} --url</code> and open the link it
prints (it works for a short while and sets a cookie for this page), or send an API key with
the campaigns or read scope: <code>Authorization: Bearer KEY</code>.</p>
{% endblock %}"""

_env = Environment(
    loader=DictLoader({"base": _BASE, "report": _REPORT, "login": _LOGIN}), autoescape=True
)
COLUMNS = ("sent", "delivered", "deferred", "bounced", "suppressed", "opened", "clicked")
COLUMNS += ("converted", "unsubscribed", "complained")
HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}


def render(doc: dict[str, Any]) -> bytes:
    """The page of a report document (relayd.campaigns.report.report)."""
    variants = doc["variants"]
    classes = sorted(doc["total"]["bounced_by_class"].items())
    return (
        _env.get_template("report")
        .render(
            title=f"Report: {doc['campaign']['name']}",
            c=doc["campaign"],
            cmp=doc["comparison"],
            columns=COLUMNS,
            rows=[*variants.items(), ("all", doc["total"])],
            classes=classes,
            bars=[bar_chart(name, v["rates"]) for name, v in variants.items()],
            line=line_chart(doc["series"]),
        )
        .encode()
    )


def login(campaign: str, problem: str) -> bytes:
    """The 401 page: why not, and how to get in."""
    return (
        _env.get_template("login")
        .render(title="Log in", campaign=campaign, problem=problem)
        .encode()
    )


def bar_chart(variant: str, rates: dict[str, float]) -> dict[str, Any]:
    """Geometry of a variant's bars: a rate r is r * BAR_HEIGHT pixels tall."""
    base = 20 + BAR_HEIGHT  # 20 px above the tallest bar for its label
    bars = []
    for i, (metric, name, colour) in enumerate(BARS):
        value = rates[metric]
        h = round(value * BAR_HEIGHT, 2)
        x = BAR_GAP + i * (BAR_WIDTH + BAR_GAP)
        label = f"{value * 100:.1f}%"
        bars.append(
            {"metric": metric, "name": name, "value": value, "colour": colour, "label": label}
            | {"x": x, "y": round(base - h, 2), "w": BAR_WIDTH, "h": h}
        )
    width = BAR_GAP + len(BARS) * (BAR_WIDTH + BAR_GAP)
    return {"variant": variant, "bars": bars, "width": width, "height": base + 24, "base": base}


def line_chart(series: dict[str, Any]) -> dict[str, Any] | None:
    """Cumulative lines from 0 before the first step: a value v of the largest m is drawn at
    (1 - v / m) * LINE_HEIGHT from the top."""
    total = series["total"]
    if not series["at"]:
        return None
    top, base = 10, 10 + LINE_HEIGHT
    sums = {m: [0, *accumulate(total[m])] for m, _ in LINES}
    peak = max(1, *(xs[-1] for xs in sums.values()))
    n = len(series["at"])
    lines = []
    for metric, colour in LINES:
        xs = sums[metric]
        points = " ".join(
            f"{round(i * LINE_WIDTH / n, 2)},{round(base - v * LINE_HEIGHT / peak, 2)}"
            for i, v in enumerate(xs)
        )
        values = ",".join(map(str, xs))
        lines.append(
            {
                "metric": metric,
                "colour": colour,
                "points": points,
                "figures": values,
                "last": xs[-1],
            }
        )
    return {
        "lines": lines,
        "max": peak,
        "width": LINE_WIDTH,
        "height": base + top,
        "base": base,
        "step": series["step_s"],
        "start": iso(series["at"][0] - series["step_s"]),
    }
