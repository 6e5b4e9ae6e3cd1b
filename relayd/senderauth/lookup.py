"""The DNS a domain check asks: one blocking dnspython resolver, built as delivery builds its
own ([dns] nameservers and timeout), and handed to checkdmarc and pyspf as well, so that every
answer in a report comes from the same servers (in the tests: the loopback test DNS server).

Blocking, not asyncio: checkdmarc and pyspf are blocking libraries; the API runs a check on a
thread of its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
from collections.abc import Iterator
from typing import Any

import dns.exception
import dns.rdatatype
import dns.resolver
import dns.reversename
import spf

from relayd import config as configuration
from relayd.delivery.dns import make_resolver


class LookupFailed(Exception):
    """No answer (a timeout, SERVFAIL, a refusal): unknown, which is not the same as absent."""

    def __init__(self, rdtype: str, name: str, reason: str) -> None:
        super().__init__(f"DNS lookup failed for {rdtype} {name}: {reason}")


class Dns:
    """Lookups that tell a missing record ([] for NXDOMAIN and NODATA) from a failed lookup
    (LookupFailed). No cache: an operator who just published a record wants it seen."""

    def __init__(self, resolver: dns.resolver.Resolver) -> None:
        self.resolver = resolver

    @classmethod
    def from_config(cls, cfg: configuration.Dns) -> Dns:
        return cls(make_resolver(cfg.nameservers, cfg.timeout, dns.resolver.Resolver))

    @property
    def timeout(self) -> float:
        return float(self.resolver.lifetime)

    def query(self, name: str, rdtype: str) -> list[Any]:
        try:
            answer = self.resolver.resolve(name, rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.resolver.NoNameservers as exc:  # every server answered SERVFAIL or refused
            # each error is (server, tcp, port, rcode text or exception, response)
            reasons = sorted({str(err[3]) for err in exc.kwargs.get("errors", [])})
            raise LookupFailed(rdtype, name, "; ".join(reasons) or "no server answered") from None
        except dns.exception.Timeout:
            raise LookupFailed(rdtype, name, f"timed out after {self.timeout:g}s") from None
        except dns.exception.DNSException as exc:
            raise LookupFailed(rdtype, name, str(exc) or type(exc).__name__) from None
        return list(answer)

    def txt(self, name: str) -> list[str]:
        """Each TXT record's strings joined, as SPF, DKIM and DMARC read them (RFC 7208 3.3)."""
        return [b"".join(rr.strings).decode("utf-8", "replace") for rr in self.query(name, "TXT")]

    def ptr(self, ip: str) -> list[str]:
        name = dns.reversename.from_address(ip).to_text()
        return [rr.target.to_text().rstrip(".").lower() for rr in self.query(name, "PTR")]

    def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of ``host``, in their compressed text form."""
        return [
            str(ipaddress.ip_address(rr.address))
            for rdtype in ("A", "AAAA")
            for rr in self.query(host, rdtype)
        ]

    def spf(self, ip: str, domain: str, helo: str) -> tuple[str, str]:
        """pyspf's verdict (pass, fail, softfail, neutral, none, permerror, temperror) and its
        explanation for mail from ``ip`` with a return path at ``domain``."""
        with _answering(self):
            result, _, explanation = spf.query(i=ip, s=f"postmaster@{domain}", h=helo).check()
        return result, explanation


# pyspf does its DNS through the module function spf.DNSLookup (it picks its own at import);
# the hook below answers from the Dns of the check running on this thread, and leaves any
# other use of pyspf in the process to pyspf's own lookup.
_CURRENT: contextvars.ContextVar[Dns | None] = contextvars.ContextVar("spf_dns", default=None)
_PYSPF_LOOKUP = spf.DNSLookup


@contextlib.contextmanager
def _answering(lookup: Dns) -> Iterator[None]:
    token = _CURRENT.set(lookup)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def _spf_lookup(name: str, qtype: str, strict: bool = True, timeout: float = 30) -> list[Any]:
    """spf.DNSLookup's contract: ((name, qtype), value) pairs; TempError when DNS fails."""
    lookup = _CURRENT.get()
    if lookup is None:
        return _PYSPF_LOOKUP(name, qtype, strict, timeout)
    try:
        rrs = lookup.query(name, qtype)
    except LookupFailed as exc:
        raise spf.TempError(str(exc)) from None
    values = {
        "A": lambda rr: rr.address,
        "AAAA": lambda rr: rr.address,
        "MX": lambda rr: (rr.preference, rr.exchange),
        "PTR": lambda rr: rr.target.to_text(True),
        "TXT": lambda rr: rr.strings,
        "SPF": lambda rr: rr.strings,
    }
    value = values.get(qtype)
    return [((name, qtype), value(rr)) for rr in rrs] if value else []


spf.DNSLookup = _spf_lookup
