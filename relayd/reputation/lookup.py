"""One DNSBL question and what its answer means (the conventions of RFC 5782).

An address is looked up as its reversed octets (IPv4) or nibbles (IPv6) under the zone, type A.
NXDOMAIN (or no A record) is "not listed"; an answer in 127.0.0.0/8 is a listing, and the zone's
TXT record for the name says why. Not every answer is an answer, though: Spamhaus answers
127.255.255.x when it refuses a query (a public resolver, too many queries, a mistyped zone), and
anything outside 127.0.0.0/8 means the zone is not answering as a blacklist (a wildcard, a zone
that was shut down). Those, timeouts and SERVFAIL are errors: they say nothing about the address,
so they neither list it nor delist it.
"""

from __future__ import annotations

import ipaddress

import dns.rdatatype

from relayd.delivery.dns import LookupFailure, Resolver
from relayd.spool.listings import CLEAN, ERROR, LISTED, Check

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
REFUSALS = ipaddress.ip_network("127.255.255.0/24")
# What Spamhaus means by each refusal (https://www.spamhaus.org/faqs/dnsbl-usage/)
REFUSAL_REASONS = {
    "127.255.255.252": "the zone name is mistyped",
    "127.255.255.254": "the query came through a public or open resolver, which Spamhaus does"
    " not answer: ask through a resolver of your own ([dns] nameservers)",
    "127.255.255.255": "too many queries from this resolver (Spamhaus's free-use limit)",
}
MAX_REASON = 500  # characters of TXT kept


def query_name(ip: str, zone: str) -> str:
    """'192.0.2.1' on 'zen.example' -> '1.2.0.192.zen.example'; IPv6 by reversed nibbles."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    reversed_name = address.reverse_pointer.rsplit(".", 2)[0]  # without in-addr.arpa, ip6.arpa
    return f"{reversed_name}.{zone}"


def interpret(addresses: list[str]) -> tuple[str, str]:
    """The A records of an answer -> (LISTED, "") | (CLEAN, "") | (ERROR, why)."""
    if not addresses:
        return CLEAN, ""
    parsed = [ipaddress.ip_address(a) for a in addresses]
    outside = [str(a) for a in parsed if a not in LOOPBACK]
    if outside:
        return ERROR, (
            f"answer {', '.join(outside)} is outside 127.0.0.0/8: the zone does not answer as"
            " a blacklist (a wildcard, or a zone no longer run)"
        )
    refused = [str(a) for a in parsed if a in REFUSALS]
    if refused:
        why = REFUSAL_REASONS.get(refused[0], "the zone refused the query")
        return ERROR, f"answer {refused[0]}: query refused: {why}"
    return LISTED, ""


async def lookup(resolver: Resolver, ip: str, zone: str) -> Check:
    """Ask ``zone`` about ``ip``; never raises for an answer or its absence."""
    name = query_name(ip, zone)
    try:
        records = await resolver.records(name, dns.rdatatype.A)
    except LookupFailure as exc:
        if exc.permanent:  # NXDOMAIN: not listed
            return Check(ip, zone, CLEAN)
        return Check(ip, zone, ERROR, "", exc.reply.removeprefix("4.4.3 "))
    answer = sorted({rr.address for rr in records}, key=ipaddress.ip_address)
    status, problem = interpret(answer)
    if status != LISTED:
        return Check(ip, zone, status, ",".join(answer) if problem else "", problem)
    return Check(ip, zone, LISTED, ",".join(answer), await _reason(resolver, name))


async def _reason(resolver: Resolver, name: str) -> str:
    """The zone's TXT for a listing (usually a URL explaining it and how to be delisted)."""
    try:
        records = await resolver.records(name, dns.rdatatype.TXT)
    except LookupFailure:
        return ""
    texts = [b"".join(rr.strings).decode("utf-8", "replace") for rr in records]
    return "; ".join(texts)[:MAX_REASON]
