"""Template renders per second on one core: the shipped example newsletter
(conf/templates/newsletter.mjml), compiled once as a campaign compiles it, rendered for one
contact after another (subject, from name, text part and HTML: all four parts a message needs).

    .venv/bin/python benchmarks/render_bench.py [--seconds 1] [--rounds 10] [--cpu 0]

One process, one thread, CPU time (so that other processes on a shared machine count less).
Contacts are realistic and all different (a name, a city, three more attributes, per-campaign
data, their own unsubscribe link), so nothing is cached between renders. Prints the best and
median rounds; exits 1 when the median is under the target of 20,000 renders/s.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from relayd.templates import compile_template

ROOT = Path(__file__).resolve().parent.parent
TARGET = 20_000
CITIES = ["Lyon", "Porto", "Leeds", "Graz", "Turku", "Ghent", "Bilbao", "Brno"]
PLANS = ["free", "pro", "team"]


def contacts(n: int) -> list[dict]:
    """``n`` contexts as a campaign gives them: contact (attributes and email), data, link."""
    return [
        {
            "contact": {
                "email": f"reader{i}@example{i % 97}.org",
                "first_name": f"Reader{i}",
                "city": CITIES[i % len(CITIES)],
                "plan": PLANS[i % len(PLANS)],
                "company": f"Company {i % 500}",
                "signup_year": 2015 + i % 10,
            },
            "data": {"issue": 42, "month": "December"},
            "unsubscribe_url": f"https://relay.example.com/u/{i:08d}.0123456789abcdef",
        }
        for i in range(n)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cpu", type=int, help="CPU to pin to (Linux; default: not pinned)")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    source = (ROOT / "conf/templates/newsletter.mjml").read_text()
    started = time.perf_counter()
    compiled = compile_template(
        "mjml",
        "{{ contact.first_name | default('Hello') }}, the Relay Letter of {{ data.month }}",
        "The Relay Letter",
        source,
        "",
        {"first_name": "reader"},
    )
    compile_ms = (time.perf_counter() - started) * 1000
    people = contacts(10_000)
    sample = compiled.render(people[0])
    size = len(sample.html) + len(sample.text)
    rates = []
    for _ in range(args.rounds):
        count, cpu = 0, time.process_time()
        deadline = time.perf_counter() + args.seconds
        while time.perf_counter() < deadline:
            for context in people[:1000]:
                compiled.render(context)
            count += 1000
            people.append(people.pop(0))  # the next thousand start one contact later
        rates.append(count / (time.process_time() - cpu))
    best, median = max(rates), statistics.median(rates)
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"compile (MJML, CSS inlining, text part, Jinja): {compile_ms:.1f} ms, once per version")
    print(f"one render: {size:,} characters (HTML and text)")
    print(f"renders per CPU second: best {best:,.0f}, median {median:,.0f} (target {TARGET:,})")
    print(f"CPU µs per render: {1e6 / median:.1f}")
    return 0 if median >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
