"""Mail addresses as the envelope carries them."""

from __future__ import annotations


def domain_of(address: str) -> str:
    """The domain part, lower case: what routing and per-domain limits are keyed on."""
    return address.rpartition("@")[2].lower()
