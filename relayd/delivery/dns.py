"""Where mail for a domain goes: static routes, else MX records (RFC 5321 section 5.1).

Answers are cached for their TTL. A domain's failures are classified here once: null MX and
NXDOMAIN are permanent (bounce without retry), SERVFAIL and timeouts temporary (retry later).
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from relayd.config import HostPort

R = TypeVar("R", bound=dns.resolver.BaseResolver)
NEGATIVE_TTL = 300.0  # NXDOMAIN/NODATA cached this long at most
TEMPFAIL_TTL = 5.0  # SERVFAIL/timeouts: short, so the next attempt asks again


def address_literal(domain: str) -> str | None:
    """The IP address of an address literal (RFC 5321 4.1.3): "[192.0.2.1]" or
    "[IPv6:2001:db8::1]", the tag in any case since domains are lower-cased before routing;
    None when ``domain`` is not a valid one. Ingress and routing both ask here, so that an
    address accepted at RCPT is one that can be delivered."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    text = domain[1:-1]
    tag, colon, rest = text.partition(":")
    try:
        if colon and tag.lower() == "ipv6" and "%" not in rest:  # no zone ids (RFC 6874)
            return str(ipaddress.IPv6Address(rest))
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        return None


class LookupFailure(Exception):
    """A destination that cannot be resolved; ``code`` and ``reply`` go into the log and DSN."""

    def __init__(self, code: int, reply: str) -> None:
        super().__init__(f"{code} {reply}")
        self.code, self.reply = code, reply

    @property
    def permanent(self) -> bool:
        return self.code >= 500


@dataclass(frozen=True)
class Route:
    """Hosts in tiers of equal preference, and the site: the key shaping limits are shared on."""

    tiers: tuple[tuple[HostPort, ...], ...]
    site: str

    def hosts(self) -> list[HostPort]:
        """The order to try for one connection: tier by tier, random within a tier."""
        order: list[HostPort] = []
        for tier in self.tiers:
            order += random.sample(tier, len(tier))
        return order


def make_resolver(nameservers: tuple[HostPort, ...], timeout: float, kind: type[R]) -> R:
    """A dnspython resolver (``kind``: the async one for delivery, the blocking one for
    relayctl check-domain) asking [dns] nameservers, or the system's when there are none."""
    if nameservers:
        resolver = kind(configure=False)
        resolver.port = nameservers[0].port  # before nameservers: they copy it
        resolver.nameservers = [ns.host for ns in nameservers]
    else:
        resolver = kind()
    resolver.lifetime = timeout
    resolver.timeout = timeout
    return resolver


class Resolver:
    def __init__(
        self,
        nameservers: tuple[HostPort, ...],
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolver = make_resolver(nameservers, timeout, dns.asyncresolver.Resolver)
        self._clock = clock
        self._cache: dict[tuple[str, int], tuple[float, list | LookupFailure]] = {}
        self._routes: dict[tuple[str, int, HostPort | None], tuple[float, Route]] = {}

    def cached_route(self, domain: str, port: int, static: HostPort | None) -> Route | None:
        """The route if known and fresh: the common case, answered without a coroutine."""
        hit = self._routes.get((domain, port, static))
        return hit[1] if hit and hit[0] > self._clock() else None

    async def route(self, domain: str, port: int, static: HostPort | None) -> Route:
        """The hosts for ``domain``: the static route if one applies, else its MX hosts."""
        route = await self._route(domain, port, static)
        mx_entry = self._cache.get((domain.lower(), dns.rdatatype.MX))
        expires = mx_entry[0] if static is None and mx_entry else self._clock() + NEGATIVE_TTL
        self._routes[(domain, port, static)] = (expires, route)
        return route

    async def _route(self, domain: str, port: int, static: HostPort | None) -> Route:
        if static is not None:
            return Route(((static,),), f"route:{static}")
        if domain.startswith("["):
            literal = address_literal(domain)
            if literal is None:  # ingress lets no such address through
                raise LookupFailure(553, f"5.1.3 bad address literal {domain}")
            return Route(((HostPort(literal, port),),), f"literal:{literal}")
        mx = await self._query(domain, dns.rdatatype.MX)
        if not mx:  # NODATA: the domain itself is its mail host (RFC 5321 5.1)
            if not await self.addresses(domain):
                raise LookupFailure(550, f"5.1.2 no MX, A or AAAA record for {domain}")
            return Route(((HostPort(domain, port),),), f"{domain}:{port}")
        if len(mx) == 1 and str(mx[0].exchange) == ".":
            raise LookupFailure(556, f"5.1.10 {domain} does not accept mail (null MX)")
        by_pref: dict[int, list[HostPort]] = {}
        for rr in mx:
            host = HostPort(str(rr.exchange).rstrip(".").lower(), port)
            by_pref.setdefault(rr.preference, []).append(host)
        tiers = tuple(tuple(by_pref[pref]) for pref in sorted(by_pref))
        names = sorted(h.host for tier in tiers for h in tier)
        return Route(tiers, ",".join(names) + f":{port}")

    async def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of ``host``; [] when it has none."""
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        found: list[str] = []
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                found += (rr.address for rr in await self._query(host, rdtype))
            except LookupFailure as exc:
                if not exc.permanent:
                    raise
        return found

    async def records(self, name: str, rdtype: int) -> list:
        """The records of ``name``, as routing gets them: [] for NODATA, LookupFailure for
        NXDOMAIN (permanent) and for a timeout or SERVFAIL (temporary). For lookups of other
        kinds through the configured nameservers (the blacklist watch's)."""
        return await self._query(name, rdtype)

    async def _query(self, name: str, rdtype: int) -> list:
        key = (name.lower(), rdtype)
        hit = self._cache.get(key)
        now = self._clock()
        if hit and hit[0] > now:
            if isinstance(hit[1], LookupFailure):
                raise hit[1]
            return hit[1]
        what = f"{dns.rdatatype.to_text(rdtype)} {name}"
        try:
            answer = await self._resolver.resolve(name, rdtype, search=False)
            value: list | LookupFailure = list(answer)
            ttl = float(answer.rrset.ttl) if answer.rrset is not None else NEGATIVE_TTL
        except dns.resolver.NoAnswer:
            value, ttl = [], NEGATIVE_TTL
        except dns.resolver.NXDOMAIN:
            value, ttl = LookupFailure(550, f"5.1.2 domain {name} does not exist"), NEGATIVE_TTL
        except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.LifetimeTimeout):
            value, ttl = LookupFailure(451, f"4.4.3 DNS lookup failed for {what}"), TEMPFAIL_TTL
        except dns.exception.DNSException as exc:
            value, ttl = LookupFailure(451, f"4.4.3 DNS error for {what}: {exc}"), TEMPFAIL_TTL
        self._cache[key] = (now + max(ttl, 1.0), value)
        if len(self._cache) > 100_000:
            self._prune(now)
        if isinstance(value, LookupFailure):
            raise value
        return value

    def _prune(self, now: float) -> None:
        for key in [k for k, (exp, _) in self._cache.items() if exp <= now]:
            del self._cache[key]
        for rkey in [k for k, (exp, _) in self._routes.items() if exp <= now]:
            del self._routes[rkey]
