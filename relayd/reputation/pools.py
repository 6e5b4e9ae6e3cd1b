"""Which source addresses the pools leave out for their listings: the daemon's watch decides it
and relayctl shows it, from the same config and spool (plain functions, cheap to import)."""

from __future__ import annotations

from relayd.config import Pools


def addresses(pools: Pools) -> dict[str, list[str]]:
    """Each source address of the pools -> the pools it is in."""
    found: dict[str, list[str]] = {}
    for name, members in sorted(pools.items()):
        for src in members:
            found.setdefault(src.address, []).append(name)
    return found


def exclusions(
    pools: Pools, listed: set[str]
) -> tuple[dict[str, frozenset[str]], dict[str, list[str]]]:
    """Per pool, its listed sources to leave out; and the pools all of whose sources are
    listed, which keep them all (a pool must not be left with nothing to send from)."""
    out: dict[str, frozenset[str]] = {}
    full: dict[str, list[str]] = {}
    for name, members in pools.items():
        own = [s.address for s in members]
        skip = frozenset(a for a in own if a in listed)
        if skip and len(skip) == len(set(own)):
            full[name] = own
        elif skip:
            out[name] = skip
    return out, full
