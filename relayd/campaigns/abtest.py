"""Who gets which variant, and which variant won. Assignment is a hash of the campaign and the
contact, so a restart (or a resumed campaign) changes nobody's group or variant: the first 8
bytes of BLAKE2b decide test group membership, the next 8 the weighted variant."""

from __future__ import annotations

import hashlib
import math
from typing import Any

_SCALE = float(1 << 64)
RATE_OF = {"click": "click_rate", "open": "open_rate", "conversion": "conversion_rate"}
COUNT_OF = {"click": "clicked", "open": "opened", "conversion": "conversions"}


def _draws(campaign_id: int, contact_id: int) -> tuple[float, float]:
    """Two independent uniform numbers in [0, 1) for this contact in this campaign."""
    digest = hashlib.blake2b(f"{campaign_id}:{contact_id}".encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8]) / _SCALE, int.from_bytes(digest[8:]) / _SCALE


def in_test(campaign_id: int, contact_id: int, percent: float | None) -> bool:
    """Whether the contact is in the test group (every contact is, with no test)."""
    return percent is None or _draws(campaign_id, contact_id)[0] * 100 < percent


def variant_of(campaign_id: int, contact_id: int, variants: list[dict[str, Any]]) -> str:
    """The test group's variant of a contact, by the variants' weights."""
    point = _draws(campaign_id, contact_id)[1] * sum(v["weight"] for v in variants)
    for v in variants:
        point -= v["weight"]
        if point < 0:
            return v["name"]
    return variants[-1]["name"]


def two_proportion(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """The two-proportion z-test (pooled): z and the two-sided p-value; (0, 1) without data."""
    if not n1 or not n2:
        return 0.0, 1.0
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (x1 / n1 - x2 / n2) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


def winner(
    rates: dict[str, dict[str, Any]], criterion: str, names: list[str]
) -> tuple[str, dict[str, Any]]:
    """The variant with the best rate by the criterion (ties: the first in the campaign's
    order), and what decided it: the rates, and z and p against the runner-up."""
    key = RATE_OF[criterion]
    score = {n: rates.get(n, {}).get(key, 0.0) for n in names}
    best = max(names, key=lambda n: (score[n], -names.index(n)))
    others = [n for n in names if n != best]
    second = max(others, key=lambda n: (score[n], -names.index(n)))
    count, got = COUNT_OF[criterion], lambda n, k: int(rates.get(n, {}).get(k, 0))
    z, p = two_proportion(
        got(best, count), got(best, "sent"), got(second, count), got(second, "sent")
    )
    return best, {"criterion": criterion, "rates": rates, "runner_up": second, "z": z, "p": p}
