"""What receivers will make of a sending domain: SPF for every source address relayd sends
from, each DKIM key's record against its key file, DMARC and alignment, reverse DNS, MTA-STS,
TLS-RPT, and Gmail's and Yahoo's bulk-sender checklist. Each item passes, warns or fails and,
when it does not pass, carries the DNS record (or the command, or the config line) that fixes
it. ``error`` is an item that could not be checked because a lookup failed (a timeout,
SERVFAIL): unknown, never taken for "missing".

The checks read relayd's config and ask DNS through the ``Dns`` they are given; parsing and
SPF evaluation are checkdmarc's and pyspf's, never this module's.
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass, field
from typing import Any

import checkdmarc.dmarc
import checkdmarc.mta_sts
import checkdmarc.smtp_tls_reporting
import checkdmarc.spf
import checkdmarc.utils
import dkim.util
import dns.reversename

from relayd import config as configuration
from relayd.mime import dkim as relayd_dkim
from relayd.senderauth.lookup import Dns, LookupFailed
from relayd.senderauth.report import Item, Report, Status, worst


@dataclass(frozen=True)
class Source:
    """An address relayd's mail leaves from, the EHLO name it gives, and where that is said."""

    address: str
    ehlo: str
    via: str


def _org(domain: str) -> str:
    """The organizational domain (RFC 7489 3.2, by the public suffix list)."""
    return checkdmarc.utils.get_base_domain(domain)


def _aligned(a: str, b: str, mode: str) -> bool:
    """DMARC identifier alignment: strict is the same name, relaxed the same org domain."""
    return a == b if mode == "s" else _org(a) == _org(b)


def _txt(name: str, value: str) -> str:
    """A zone-file line publishing ``value``, in strings of at most 255 characters."""
    strings = [value[i : i + 255] for i in range(0, len(value), 255)] or [""]
    return f"{name}. IN TXT " + " ".join(f'"{s}"' for s in strings)


@dataclass
class _Run:
    cfg: configuration.Config
    domain: str
    return_path: str
    dns: Dns
    now: float
    items: list[Item] = field(default_factory=list)

    def add(self, check: str, subject: str, status: Status, detail: str, fix: str = "") -> Item:
        item = Item(check, subject, status, detail, fix)
        self.items.append(item)
        return item


def check_domain(
    cfg: configuration.Config,
    domain: str,
    lookup: Dns,
    return_path_domain: str = "",
    now: float | None = None,
) -> Report:
    """Every check for mail From ``domain`` with a return path (envelope sender) at
    ``return_path_domain`` (default: return_path.domain when relayd sends with VERP return
    paths, else the same domain, which is what relayd sends with unless the client gave
    another)."""
    run = _Run(
        cfg,
        domain,
        return_path_domain or cfg.return_path.domain or domain,
        lookup,
        time.time() if now is None else now,
    )
    # checkdmarc keeps a process-wide cache of answers by name alone: a check asks afresh
    checkdmarc.utils.DNS_CACHE.clear()
    sources = _sources(run)
    spf_items = _spf(run, sources)
    dkim_items, signing = _dkim(run)
    dmarc_items = _dmarc(run, signing, spf_items)
    ptr_items = _ptr(run, sources)
    _policy_record(run, "mta-sts", f"_mta-sts.{domain}", "v=STSv1", _mta_sts_example(run))
    _policy_record(
        run,
        "tls-rpt",
        f"_smtp._tls.{domain}",
        "v=TLSRPTv1",
        f"v=TLSRPTv1; rua=mailto:tls-reports@{domain}",
    )
    _bulk_sender(run, spf_items + dkim_items, dmarc_items, ptr_items)
    return Report(domain, run.return_path, tuple(run.items))


# -- where the mail comes from ----------------------------------------------------------------


def _sources(run: _Run) -> list[Source]:
    """The addresses of the pools that the shaping lanes send from; a lane without a pool
    leaves from whatever address the system picks, which only server.hostname may tell."""
    shaping = run.cfg.shaping
    lanes = {"[shaping.default]": shaping.default.pool}
    lanes |= {f'[shaping.domains."{d}"]': s.pool for d, s in shaping.domains.items()}
    found: dict[str, Source] = {}
    for pool in dict.fromkeys(p for p in lanes.values() if p):
        for src in run.cfg.pools[pool]:
            address = str(ipaddress.ip_address(src.address))
            old = found.get(address)
            via = f"{old.via}, {pool}" if old else f"pool {pool}"
            found[address] = Source(address, old.ehlo if old else src.ehlo, via)
    for address, src in found.items():
        run.add("sources", address, Status.PASS, f"{src.via}, EHLO {src.ehlo}")
    unpooled = [lane for lane, pool in lanes.items() if not pool]
    if unpooled:
        hostname = run.cfg.server.hostname
        where = ", ".join(unpooled)
        unknown = (
            f"mail of {where} leaves from the address the system picks (no pool): relayd"
            " cannot know it"
        )
        fix = f'name a pool in {unpooled[0]}: pool = "NAME", with [pools.NAME] sources'
        try:
            guessed = [a for a in run.dns.addresses(hostname) if a not in found]
        except LookupFailed as exc:
            run.add("sources", "system-chosen address", Status.WARN, f"{unknown}; {exc}", fix)
            return list(found.values())
        if not guessed:
            detail = f"{unknown}, and server.hostname {hostname} has no address to assume"
            run.add("sources", "system-chosen address", Status.WARN, detail, fix)
        for address in guessed:
            detail = f"{unknown}; assumed from server.hostname {hostname} (EHLO {hostname})"
            run.add("sources", address, Status.WARN, detail, fix)
            found[address] = Source(address, hostname, f"server.hostname {hostname}, assumed")
    return list(found.values())


# -- SPF ----------------------------------------------------------------------------------


def _spf(run: _Run, sources: list[Source]) -> list[Item]:
    """The return path domain's SPF record: there, parsed by checkdmarc, and, by pyspf's
    evaluation, authorising each source address."""
    domain = run.return_path
    try:
        records = [t for t in run.dns.txt(domain) if t.lower().split(" ", 1)[0] == "v=spf1"]
    except LookupFailed as exc:
        return [run.add("spf", domain, Status.ERROR, str(exc))]
    if not records:
        fix = _txt(domain, _spf_record(None, [s.address for s in sources]))
        return [run.add("spf", domain, Status.FAIL, f"{domain} publishes no SPF record", fix)]
    items = []
    result = checkdmarc.spf.check_spf(domain, resolver=run.dns.resolver, timeout=run.dns.timeout)
    record = result.get("record") or records[0]
    if not result["valid"]:
        detail = f"{record!r} is not valid: {result['error']}"
        items.append(run.add("spf", domain, Status.FAIL, detail))
    else:
        lookups = result.get("dns_lookups")
        notes = "; ".join(result.get("warnings", []))
        detail = f"{record!r} parses ({lookups} of 10 DNS lookups)" + (
            f"; {notes}" if notes else ""
        )
        items.append(run.add("spf", domain, Status.PASS, detail))
    verdicts = [(src, *run.dns.spf(src.address, domain, src.ehlo)) for src in sources]
    missing = [src.address for src, verdict, _ in verdicts if verdict not in ("pass", "temperror")]
    fix = _txt(domain, _spf_record(record, missing)) if missing else ""
    for src, verdict, explanation in verdicts:
        subject = f"{src.address} ({src.via})"
        if verdict == "pass":
            items.append(run.add("spf", subject, Status.PASS, f"SPF of {domain}: pass"))
        elif verdict == "temperror":
            items.append(run.add("spf", subject, Status.ERROR, f"SPF of {domain}: {explanation}"))
        else:
            detail = f"SPF of {domain} gives {verdict} for {src.address}: {explanation}"
            items.append(run.add("spf", subject, Status.FAIL, detail, fix))
    return items


def _spf_record(record: str | None, addresses: list[str]) -> str:
    """``record`` with ip4:/ip6: terms for ``addresses`` first (before any term that could
    refuse them); a new record ending in ~all when there is none."""
    terms = [f"ip{ipaddress.ip_address(a).version}:{a}" for a in addresses] or ["ip4:ADDRESS"]
    if record is None:
        return " ".join(["v=spf1", *terms, "~all"])
    version, _, rest = record.partition(" ")
    return " ".join([version, *terms, *rest.split()])


# -- DKIM ---------------------------------------------------------------------------------


def _dkim(run: _Run) -> tuple[list[Item], list[str]]:
    """Each key that signs mail from the domain: its record published, its p= that of the key
    file. Returns the items and the d= domains whose records all match."""
    keys = run.cfg.dkim.keys
    signer = relayd_dkim.signing_domain(
        run.domain,
        {k.domain for k in keys},
        run.cfg.dkim.parent_fallback,
        run.cfg.dkim.default_domain,
    )
    if signer is None:
        folder = str(keys[0].key_file.parent) if keys else "/etc/relayd/dkim"
        fix = (
            f"relayctl dkim keygen {run.domain} s1 --out-dir {folder}, publish the record it"
            f' prints, then add [[dkim.keys]] domain = "{run.domain}", selector = "s1",'
            f' key_file = "{folder}/{run.domain}.s1.key"'
        )
        detail = f"no [[dkim.keys]] key signs mail from {run.domain}: it leaves unsigned"
        return [run.add("dkim", run.domain, Status.FAIL, detail, fix)], []
    items = []
    for key in (k for k in keys if k.domain == signer):
        name = f"{key.selector}._domainkey.{signer}"
        try:
            private = relayd_dkim.load_key(
                key.key_file, key.algorithm, run.cfg.path, f"{key.key}.key_file"
            )
        except configuration.ConfigError as exc:
            items.append(run.add("dkim", name, Status.FAIL, str(exc)))
            continue
        line = relayd_dkim.zone_line(signer, key.selector, private)
        try:
            published = [t for t in run.dns.txt(name) if "p=" in t]
        except LookupFailed as exc:
            items.append(run.add("dkim", name, Status.ERROR, str(exc)))
            continue
        status, detail = _dkim_match(published, private, key)
        items.append(run.add("dkim", name, status, detail, "" if status is Status.PASS else line))
    ok = [signer] if items and all(i.status is Status.PASS for i in items) else []
    return items, ok


def _dkim_match(
    published: list[str], private: relayd_dkim.PrivateKey, key: configuration.DkimKey
) -> tuple[Status, str]:
    """Whether one of the records (parsed by dkimpy) publishes the key file's public key."""
    if not published:
        return Status.FAIL, f"no key record published for {key.key_file}"
    wanted, kind = relayd_dkim.public_value(private), relayd_dkim.key_type(private)
    problems = []
    for text in published:
        try:
            tags = dkim.util.parse_tag_value(text.encode())
        except dkim.util.InvalidTagValueList as exc:
            problems.append(f"{text[:40]!r}... does not parse: {exc}")
            continue
        p = re.sub(rb"\s+", b"", tags.get(b"p", b"")).decode("ascii", "replace")
        k = tags.get(b"k", b"rsa").decode("ascii", "replace").strip()
        if not p:
            problems.append("p= is empty: the key is revoked (RFC 6376 3.6.1)")
        elif k != kind:
            problems.append(f"k={k}, but {key.key_file} holds an {kind} key")
        elif p != wanted:
            problems.append(f"p= is not the public key of {key.key_file}")
        else:
            return Status.PASS, f"published; p= matches {key.key_file} ({key.algorithm})"
    return Status.FAIL, "; ".join(problems)


# -- DMARC --------------------------------------------------------------------------------


def _dmarc(run: _Run, signing: list[str], spf_items: list[Item]) -> list[Item]:
    """The DMARC record that applies to the domain (its own, else its org domain's, RFC 7489
    6.6.3) parsed by checkdmarc, its policy, and whether DKIM or SPF align with From."""
    domain, org = run.domain, _org(run.domain)
    name = f"_dmarc.{domain}"
    example = f"v=DMARC1; p=none; rua=mailto:dmarc-reports@{org}"
    items: list[Item] = []
    tags: dict[str, Any] = {}
    try:
        records, applies = _dmarc_records(run, domain), name
        if not records and org != domain:
            records, applies = _dmarc_records(run, org), f"_dmarc.{org}"
    except LookupFailed as exc:
        items.append(run.add("dmarc", name, Status.ERROR, str(exc)))
    else:
        if not records:
            detail = f"no DMARC record at {name}" + (f" or _dmarc.{org}" if org != domain else "")
            items.append(run.add("dmarc", name, Status.FAIL, detail, _txt(name, example)))
        elif len(records) > 1:
            detail = f"{len(records)} DMARC records at {applies}: receivers then apply none"
            items.append(run.add("dmarc", applies, Status.FAIL, detail))
        else:
            items.append(_dmarc_policy(run, records[0], applies, tags))
    items.append(_alignment(run, tags, signing, spf_items))
    return items


def _dmarc_records(run: _Run, domain: str) -> list[str]:
    return [t for t in run.dns.txt(f"_dmarc.{domain}") if t.lower().startswith("v=dmarc1")]


def _dmarc_policy(run: _Run, record: str, applies: str, tags: dict[str, Any]) -> Item:
    """One record: its syntax (checkdmarc) and policy (p=, or sp= from the org domain's)."""
    owner = applies.removeprefix("_dmarc.")
    try:
        parsed = checkdmarc.dmarc.parse_dmarc_record(
            record, owner, resolver=run.dns.resolver, timeout=run.dns.timeout
        )
    except checkdmarc.dmarc.DMARCError as exc:
        return run.add("dmarc", applies, Status.FAIL, f"{record!r} does not parse: {exc}")
    tags.update({k: v["value"] for k, v in parsed["tags"].items()})
    policy = tags["sp"] if owner != run.domain else tags["p"]
    which = "sp" if owner != run.domain else "p"
    base = f"{record!r}: {which}={policy}"
    if policy == "none":
        detail = (
            f"{base}: monitoring only. Gmail and Yahoo accept p=none from bulk senders, but"
            " move to p=quarantine once the reports show your mail aligned"
        )
        return run.add("dmarc", applies, Status.WARN, detail)
    return run.add("dmarc", applies, Status.PASS, base)


def _alignment(run: _Run, tags: dict[str, Any], signing: list[str], spf: list[Item]) -> Item:
    """DMARC passes when DKIM or SPF passes for a domain aligned with From (relaxed unless the
    record says adkim=s / aspf=s); both make it survive forwarding and a key rotation."""
    adkim, aspf = tags.get("adkim", "r"), tags.get("aspf", "r")
    mode = {"r": "relaxed", "s": "strict"}
    spf_pass = bool(spf) and all(i.status is Status.PASS for i in spf)
    dkim_ok = [d for d in signing if _aligned(d, run.domain, adkim)]
    spf_ok = spf_pass and _aligned(run.return_path, run.domain, aspf)
    if dkim_ok:
        dkim_text = f"DKIM d={dkim_ok[0]} passes and aligns ({mode[adkim]})"
    elif signing:
        dkim_text = f"DKIM d={signing[0]} does not align with {run.domain} ({mode[adkim]})"
    else:
        dkim_text = "no passing DKIM key"
    if spf_ok:
        spf_text = f"SPF of return path {run.return_path} passes and aligns ({mode[aspf]})"
    elif not spf_pass:
        spf_text = f"SPF of return path {run.return_path} does not pass for every source"
    else:
        spf_text = f"return path {run.return_path} does not align ({mode[aspf]})"
    detail = f"{dkim_text}; {spf_text}"
    status = (
        Status.PASS if dkim_ok and spf_ok else Status.WARN if dkim_ok or spf_ok else Status.FAIL
    )
    return run.add("alignment", f"From {run.domain}", status, detail)


# -- reverse DNS --------------------------------------------------------------------------


def _ptr(run: _Run, sources: list[Source]) -> list[Item]:
    """Each source address's PTR name: its EHLO name, resolving back to it (FCrDNS)."""
    items = []
    for src in sources:
        reverse = dns.reversename.from_address(src.address).to_text()
        subject = f"{src.address} ({src.via})"
        try:
            names = run.dns.ptr(src.address)
        except LookupFailed as exc:
            items.append(run.add("ptr", subject, Status.ERROR, str(exc)))
            continue
        ehlo = src.ehlo.lower().rstrip(".")
        if not names:
            fix = f"{reverse} IN PTR {ehlo}. (set by the address's owner: ask the provider)"
            items.append(run.add("ptr", subject, Status.FAIL, "no PTR record", fix))
            continue
        name = ehlo if ehlo in names else names[0]
        try:
            back = run.dns.addresses(name)
        except LookupFailed as exc:
            items.append(run.add("ptr", subject, Status.ERROR, str(exc)))
            continue
        forward = src.address in back
        resolves = f"{name} resolves to {', '.join(back) or 'nothing'}"
        kind = "A" if ipaddress.ip_address(src.address).version == 4 else "AAAA"
        if name == ehlo and forward:
            items.append(run.add("ptr", subject, Status.PASS, f"PTR {name} = EHLO, resolves back"))
        elif name == ehlo:
            detail = f"PTR {name} = EHLO, but {resolves}, not {src.address}"
            items.append(
                run.add("ptr", subject, Status.FAIL, detail, f"{name}. IN {kind} {src.address}")
            )
        elif forward:
            detail = f"PTR {name} resolves back, but the EHLO name is {ehlo}"
            fix = f'ehlo = "{name}" for {src.address} in [pools] (or a PTR of {ehlo})'
            items.append(run.add("ptr", subject, Status.WARN, detail, fix))
        else:
            detail = f"PTR {name} is not the EHLO name {ehlo}, and {resolves}, not {src.address}"
            fix = f"{reverse} IN PTR {ehlo}. and {ehlo}. IN {kind} {src.address}"
            items.append(run.add("ptr", subject, Status.FAIL, detail, fix))
    return items


# -- MTA-STS and TLS-RPT ------------------------------------------------------------------

_PARSERS = {
    "mta-sts": (checkdmarc.mta_sts.parse_mta_sts_record, checkdmarc.mta_sts.MTASTSError),
    "tls-rpt": (
        checkdmarc.smtp_tls_reporting.parse_smtp_tls_reporting_record,
        checkdmarc.smtp_tls_reporting.SMTPTLSReportingError,
    ),
}


def _mta_sts_example(run: _Run) -> str:
    return "v=STSv1; id=" + time.strftime("%Y%m%d%H%M%S", time.gmtime(run.now))


def _policy_record(run: _Run, check: str, name: str, version: str, example: str) -> Item:
    """MTA-STS (RFC 8461) and TLS-RPT (RFC 8460) records, parsed by checkdmarc: they ask
    receivers to insist on TLS to the domain and to report failures; missing is a warning."""
    parse, error = _PARSERS[check]
    try:
        records = [t for t in run.dns.txt(name) if t.startswith(version)]
    except LookupFailed as exc:
        return run.add(check, name, Status.ERROR, str(exc))
    if not records:
        fix = _txt(name, example)
        if check == "mta-sts":
            fix += (
                f" (and serve the policy at https://mta-sts.{run.domain}/.well-known/mta-sts.txt)"
            )
        return run.add(check, name, Status.WARN, f"no {version} record", fix)
    if len(records) > 1:
        return run.add(check, name, Status.FAIL, f"{len(records)} {version} records: one only")
    try:
        parse(records[0])
    except error as exc:
        return run.add(check, name, Status.FAIL, f"{records[0]!r} does not parse: {exc}")
    return run.add(check, name, Status.PASS, f"{records[0]!r}")


# -- Gmail's and Yahoo's bulk-sender requirements ---------------------------------------------


def _bulk_sender(run: _Run, auth: list[Item], dmarc: list[Item], ptr: list[Item]) -> None:
    """The rules both published for senders of 5000 a day and more (February 2024), from the
    items above and from the config."""

    def summary(subject: str, items: list[Item], good: str) -> None:
        status = worst([i.status for i in items]) if items else Status.FAIL
        bad = [f"{i.check} {i.subject}: {i.status}" for i in items if i.status is not Status.PASS]
        detail = good if status is Status.PASS else "; ".join(bad) or "nothing to check"
        run.add("bulk-sender", subject, status, detail)

    summary("SPF and DKIM pass", auth, "every source passes SPF; every DKIM key is published")
    summary("DMARC published and aligned", dmarc, "DMARC record and alignment pass")
    # [unsubscribe]: relayd adds RFC 8058's List-Unsubscribe and List-Unsubscribe-Post
    unsubscribe = run.cfg.unsubscribe
    if unsubscribe.enabled and unsubscribe.streams:
        detail = (
            f"[unsubscribe] url = {unsubscribe.url!r}: relayd adds the fields to one-recipient"
            f" mail of stream {' and '.join(unsubscribe.streams)}"
        )
        run.add("bulk-sender", "one-click unsubscribe", Status.PASS, detail)
    else:
        detail = (
            "[unsubscribe] url is not set: relayd adds no List-Unsubscribe /"
            " List-Unsubscribe-Post (RFC 8058); bulk mail must carry them, from the application"
        )
        fix = '[unsubscribe] url = "https://HOST/unsubscribe/" (an http or https listener)'
        run.add("bulk-sender", "one-click unsubscribe", Status.WARN, detail, fix)
    if run.cfg.delivery.starttls == "may":
        detail = "delivery.starttls = may: TLS whenever the receiver offers it"
        run.add("bulk-sender", "TLS to recipients", Status.PASS, detail)
    else:
        detail = "delivery.starttls = never: Gmail marks mail sent without TLS"
        run.add(
            "bulk-sender", "TLS to recipients", Status.FAIL, detail, '[delivery] starttls = "may"'
        )
    summary("PTR and FCrDNS", ptr, "every source's PTR is its EHLO name and resolves back")
