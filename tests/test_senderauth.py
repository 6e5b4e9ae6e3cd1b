"""relayctl check-domain and GET /v1/domains/{domain}/check against the loopback test DNS
server: a domain that passes, one that fails in each way (SPF missing an address, a DKIM p=
that is another key's, no DMARC, a PTR that is not the EHLO name, no MTA-STS), lookups that
fail, and refusals. relayctl runs as a real process on a real config; the API is asked over
HTTP on loopback."""

from __future__ import annotations

import http.client
import ipaddress
import json
from pathlib import Path
from typing import Any

import dns.rdataclass
import dns.rdatatype
import dns.zone
import pytest
from conftest import to_toml
from support.util import free_port, listening, wait_until

from relayd import config as configuration
from relayd.mime.dkim import keygen
from relayd.senderauth.check import check_domain
from relayd.senderauth.lookup import Dns
from relayd.senderauth.report import Status

MTA1, MTA1_V6, MTA2 = "192.0.2.10", "2001:db8::10", "192.0.2.11"


def publish(dns_server: Any, zone_line: str) -> None:
    """Publish a zone-file line (as keygen prints it) the way an operator pastes it."""
    zone = dns.zone.from_text(f"$TTL 60\n{zone_line}\n", origin=".", check_origin=False)
    for name, node in zone.nodes.items():
        rdataset = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.TXT)
        value = b"".join(rdataset[0].strings).decode()
        dns_server.add(name.to_text(), "TXT", value)


@pytest.fixture
def zones(dns_server: Any, tmp_path: Path) -> dict[str, Any]:
    """good.test: everything right. bad.test: its SPF lacks MTA2, its DKIM record is another
    key's, no DMARC, no MTA-STS nor TLS-RPT; MTA2's PTR is not its EHLO name. DKIM keys for
    both, written by relayctl's own keygen; the config entries to list them."""
    keys = tmp_path / "dkim"
    keys.mkdir()
    entries = []
    for domain, selector, algorithm in (
        ("good.test", "rsa1", "rsa"),
        ("good.test", "ed1", "ed25519"),
        ("bad.test", "s1", "rsa"),
    ):
        path, line = keygen(domain, selector, algorithm, keys)
        entries.append(
            {
                "domain": domain,
                "selector": selector,
                "algorithm": f"{algorithm}-sha256",
                "key_file": str(path),
            }
        )
        if domain == "good.test":
            publish(dns_server, line)
    _, other = keygen("bad.test", "other", "rsa", keys)  # published in s1's place
    publish(dns_server, other.replace("other._domainkey", "s1._domainkey"))

    dns_server.add("good.test", "TXT", f"v=spf1 ip4:{MTA1} include:_spf.good.test -all")
    dns_server.add("_spf.good.test", "TXT", f"v=spf1 ip6:{MTA1_V6} -all")
    dns_server.add("good.test", "TXT", "google-site-verification=abc")  # not SPF: ignored
    dns_server.add("_dmarc.good.test", "TXT", "v=DMARC1; p=reject; rua=mailto:d@good.test")
    dns_server.add("good.test", "MX", "10 mx.good.test")  # for the rua address
    dns_server.add("_mta-sts.good.test", "TXT", "v=STSv1; id=20260101T000000")
    dns_server.add("_smtp._tls.good.test", "TXT", "v=TLSRPTv1; rua=mailto:tls@good.test")
    dns_server.add("bad.test", "TXT", f"v=spf1 ip4:{MTA1} ip6:{MTA1_V6} ~all")
    for ip, host in ((MTA1, "mta1.good.test"), (MTA1_V6, "mta1.good.test"), (MTA2, "mta2.x.test")):
        dns_server.add_ptr(ip, host)
    dns_server.add("mta1.good.test", "A", MTA1)
    dns_server.add("mta1.good.test", "AAAA", MTA1_V6)
    dns_server.add("mta2.x.test", "A", MTA2)
    return {"dkim": {"keys": entries}}


def pools(*extra: dict[str, Any]) -> dict[str, Any]:
    """Pool "main" (MTA1, MTA1_V6, EHLO mta1.good.test) for every destination; more sources
    in pool "second", used for dest.test, when given."""
    main = [
        {"address": MTA1, "ehlo": "mta1.good.test"},
        {"address": MTA1_V6, "ehlo": "mta1.good.test"},
    ]
    shaping: dict[str, Any] = {"default": {"pool": "main"}}
    found: dict[str, Any] = {"pools": {"main": {"sources": main}}, "shaping": shaping}
    if extra:
        found["pools"]["second"] = {"sources": list(extra)}
        shaping["domains"] = {"dest.test": {"pool": "second"}}
    return found


def run_check(relay: Any, zones: dict[str, Any], *args: str, extra: Any = None) -> Any:
    """relayctl check-domain as a process on a config written for the test."""
    process = relay({**zones, **(extra or pools())}, start=False)
    return process.ctl("check-domain", *args, check=False)


def by_check(doc: dict[str, Any], check: str) -> list[dict[str, Any]]:
    return [i for i in doc["items"] if i["check"] == check]


def test_one_click_unsubscribe_passes_once_relayd_adds_the_fields(relay, zones):
    listeners = [
        {"address": f"127.0.0.1:{free_port()}", "kind": "relay"},
        {"address": f"127.0.0.1:{free_port()}", "kind": "http"},
    ]
    url = "https://mail.good.test/unsubscribe/"
    extra = {**pools(), "listeners": listeners, "unsubscribe": {"url": url}}
    out = run_check(relay, zones, "good.test", "--json", extra=extra)
    assert out.returncode == 0, out.stdout + out.stderr
    (item,) = [
        i for i in json.loads(out.stdout)["items"] if i["subject"] == "one-click unsubscribe"
    ]
    assert item["status"] == "pass" and url in item["detail"] and "stream bulk" in item["detail"]


def test_a_domain_with_every_record_right_passes_and_relayctl_exits_0(relay, zones):
    out = run_check(relay, zones, "good.test", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    doc = json.loads(out.stdout)
    assert doc["domain"] == "good.test" and doc["return_path_domain"] == "good.test"
    failing = [i for i in doc["items"] if i["status"] != "pass"]
    # [unsubscribe] is off by default: the one item that warns
    assert [(i["check"], i["subject"]) for i in failing] == [
        ("bulk-sender", "one-click unsubscribe")
    ]
    assert doc["status"] == "warn" and doc["counts"]["fail"] == 0
    assert {i["subject"] for i in by_check(doc, "sources")} == {MTA1, MTA1_V6}
    spf = by_check(doc, "spf")
    assert [i["subject"] for i in spf] == [
        "good.test",
        f"{MTA1} (pool main)",
        f"{MTA1_V6} (pool main)",  # authorised through the include
    ]
    assert "(1 of 10 DNS lookups)" in spf[0]["detail"]  # the include, counted by checkdmarc
    assert {i["subject"] for i in by_check(doc, "dkim")} == {
        "rsa1._domainkey.good.test",
        "ed1._domainkey.good.test",
    }
    assert "p=reject" in by_check(doc, "dmarc")[0]["detail"]
    assert "DKIM d=good.test passes and aligns (relaxed)" in by_check(doc, "alignment")[0]["detail"]
    assert len(by_check(doc, "ptr")) == 2
    assert [i["status"] for i in by_check(doc, "mta-sts") + by_check(doc, "tls-rpt")] == [
        "pass",
        "pass",
    ]
    assert all(i["fix"] is None for i in doc["items"] if i["status"] == "pass")


def test_a_failing_domain_gets_each_record_to_publish_and_relayctl_exits_1(relay, zones):
    extra = pools({"address": MTA2, "ehlo": "mta2.bad.test"})
    out = run_check(relay, zones, "bad.test", "--json", extra=extra)
    assert out.returncode == 1, out.stdout + out.stderr
    doc = json.loads(out.stdout)
    items = {(i["check"], i["subject"]): i for i in doc["items"]}

    missing = items[("spf", f"{MTA2} (pool second)")]
    assert missing["status"] == "fail" and "softfail" in missing["detail"]
    # merged with the record there, the new address first
    assert missing["fix"] == f'bad.test. IN TXT "v=spf1 ip4:{MTA2} ip4:{MTA1} ip6:{MTA1_V6} ~all"'
    assert items[("spf", f"{MTA1} (pool main)")]["status"] == "pass"

    dkim = items[("dkim", "s1._domainkey.bad.test")]
    assert dkim["status"] == "fail" and "p= is not the public key of" in dkim["detail"]
    key_file = next(e["key_file"] for e in zones["dkim"]["keys"] if e["domain"] == "bad.test")
    assert key_file in dkim["detail"]
    # the record keygen printed for that key file (its p=), not the one in DNS
    assert dkim["fix"].startswith('s1._domainkey.bad.test. IN TXT ( "v=DKIM1; k=rsa; p=')
    published = dns.zone.from_text(f"$TTL 60\n{dkim['fix']}\n", origin=".", check_origin=False)
    assert published  # the fix is a zone-file line dnspython reads

    dmarc = items[("dmarc", "_dmarc.bad.test")]
    assert dmarc["status"] == "fail" and "no DMARC record" in dmarc["detail"]
    assert dmarc["fix"] == (
        '_dmarc.bad.test. IN TXT "v=DMARC1; p=none; rua=mailto:dmarc-reports@bad.test"'
    )
    ptr = items[("ptr", f"{MTA2} (pool second)")]
    assert ptr["status"] == "warn"  # mta2.x.test resolves back, but is not the EHLO name
    assert "mta2.x.test" in ptr["detail"] and "mta2.bad.test" in ptr["detail"]
    assert 'ehlo = "mta2.x.test"' in ptr["fix"]

    sts = items[("mta-sts", "_mta-sts.bad.test")]
    assert sts["status"] == "warn" and sts["fix"].startswith(
        '_mta-sts.bad.test. IN TXT "v=STSv1; id='
    )
    assert items[("tls-rpt", "_smtp._tls.bad.test")]["fix"] == (
        '_smtp._tls.bad.test. IN TXT "v=TLSRPTv1; rua=mailto:tls-reports@bad.test"'
    )
    checklist = {i["subject"]: i["status"] for i in by_check(doc, "bulk-sender")}
    assert checklist == {
        "SPF and DKIM pass": "fail",
        "DMARC published and aligned": "fail",
        "one-click unsubscribe": "warn",
        "TLS to recipients": "pass",
        "PTR and FCrDNS": "warn",
    }


def test_the_text_output_is_aligned_and_names_each_fix(relay, zones):
    out = run_check(relay, zones, "bad.test")
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert lines[0].startswith("bad.test: fail (")
    rows = [line for line in lines[2:] if not line.startswith(" ")]
    # the status column starts at one place in every row
    starts = {line.index(word) for line in rows for word in line.split()[1:2]}
    assert len(starts) == 1
    assert any(line.strip() == "fix: " + _fix_of(relay, zones, "dmarc") for line in lines)


def _fix_of(relay: Any, zones: dict[str, Any], check: str) -> str:
    doc = json.loads(run_check(relay, zones, "bad.test", "--json").stdout)
    return by_check(doc, check)[0]["fix"]


def test_a_domain_without_a_dkim_key_fails_with_the_keygen_command_to_run(relay, zones):
    only_good = {"dkim": {"keys": [zones["dkim"]["keys"][0]]}}  # good.test's RSA key
    out = run_check(relay, only_good, "other.test", "--json")
    assert out.returncode == 1
    (item,) = by_check(json.loads(out.stdout), "dkim")
    assert item["status"] == "fail" and "leaves unsigned" in item["detail"]
    assert item["fix"].startswith("relayctl dkim keygen other.test s1 --out-dir ")


def test_a_subdomain_is_signed_by_its_parents_key_and_aligns_relaxed(relay, zones, dns_server):
    dns_server.add("news.good.test", "TXT", "v=spf1 include:good.test -all")
    doc = json.loads(run_check(relay, zones, "news.good.test", "--json").stdout)
    assert {i["subject"] for i in by_check(doc, "dkim")} == {
        "rsa1._domainkey.good.test",
        "ed1._domainkey.good.test",
    }
    # no _dmarc.news.good.test: the org domain's record applies, with its sp= (= p)
    (dmarc,) = by_check(doc, "dmarc")
    assert dmarc["subject"] == "_dmarc.good.test" and "sp=reject" in dmarc["detail"]
    (aligned,) = by_check(doc, "alignment")
    assert aligned["status"] == "pass" and "d=good.test passes and aligns" in aligned["detail"]


def test_failed_lookups_are_reported_as_failed_not_as_missing(relay, zones, dns_server):
    dns_server.set_servfail("_dmarc.good.test")
    dns_server.set_timeout("_mta-sts.good.test")
    extra = {**pools(), "dns": {"nameservers": [dns_server.address], "timeout": "1s"}}
    out = run_check(relay, zones, "good.test", "--json", extra=extra)
    assert out.returncode == 1  # not known to pass
    doc = json.loads(out.stdout)
    (dmarc,) = by_check(doc, "dmarc")
    assert dmarc["status"] == "error" and dmarc["fix"] is None
    assert dmarc["detail"] == "DNS lookup failed for TXT _dmarc.good.test: SERVFAIL"
    (sts,) = by_check(doc, "mta-sts")
    assert sts["status"] == "error" and "timed out after 1s" in sts["detail"]
    assert doc["status"] == "error"


def test_a_bad_domain_argument_is_a_usage_error_naming_it(relay, zones):
    out = run_check(relay, zones, "no..such")
    assert out.returncode == 2 and out.stdout == ""
    assert "argument DOMAIN: not a domain name: 'no..such'" in out.stderr
    out = run_check(relay, zones, "good.test", "--return-path-domain", "x-.test")
    assert out.returncode == 2 and "--return-path-domain" in out.stderr


# -- the checks in process: cases that need no relayctl around them -------------------------


def _config(tmp_path: Path, data: dict[str, Any]) -> configuration.Config:
    path = tmp_path / "check.toml"
    path.write_text(to_toml(data))
    return configuration.load(path)


def _dns(dns_server: Any) -> Dns:
    cfg = configuration.Dns((configuration.HostPort("127.0.0.1", dns_server.port),), 2.0)
    return Dns.from_config(cfg)


def test_without_a_pool_the_check_assumes_server_hostname_and_says_so(tmp_path, dns_server):
    dns_server.add("relay.good.test", "A", "192.0.2.20")
    dns_server.add("good.test", "TXT", "v=spf1 ip4:192.0.2.20 -all")
    dns_server.add_ptr("192.0.2.20", "relay.good.test")
    cfg = _config(tmp_path, {"server": {"hostname": "relay.good.test"}})
    report = check_domain(cfg, "good.test", _dns(dns_server))
    (source,) = [i for i in report.items if i.check == "sources"]
    assert source.subject == "192.0.2.20" and source.status is Status.WARN
    assert "relayd cannot know it" in source.detail and "[shaping.default]" in source.detail
    spf = [i for i in report.items if i.check == "spf"]
    assert spf[1].subject == "192.0.2.20 (server.hostname relay.good.test, assumed)"
    assert spf[1].status is Status.PASS
    ptr = [i for i in report.items if i.check == "ptr"]
    assert [i.status for i in ptr] == [Status.PASS]


@pytest.mark.parametrize("given", ["argument", "verp"])
def test_a_return_path_elsewhere_is_checked_for_spf_and_alignment(tmp_path, dns_server, given):
    """Given as the argument, or relayd's own VERP return paths (return_path.domain)."""
    dns_server.add("bounces.example.net", "TXT", "v=spf1 ip4:192.0.2.10 -all")
    dns_server.add("_dmarc.shop.test", "TXT", "v=DMARC1; p=quarantine; aspf=s")
    if given == "verp":
        cfg = _config(tmp_path, {**pools(), "return_path": {"domain": "bounces.example.net"}})
        report = check_domain(cfg, "shop.test", _dns(dns_server))
    else:
        cfg = _config(tmp_path, pools())
        report = check_domain(cfg, "shop.test", _dns(dns_server), "bounces.example.net")
    assert report.return_path_domain == "bounces.example.net"
    spf = [i for i in report.items if i.check == "spf"]
    assert spf[0].subject == "bounces.example.net"
    assert [i.status for i in spf[1:]] == [Status.PASS, Status.FAIL]  # MTA1_V6 is not listed
    assert spf[2].fix == (f'bounces.example.net. IN TXT "v=spf1 ip6:{MTA1_V6} ip4:192.0.2.10 -all"')
    (aligned,) = [i for i in report.items if i.check == "alignment"]
    assert aligned.status is Status.FAIL  # no DKIM key, and the return path is elsewhere
    assert "return path bounces.example.net" in aligned.detail
    assert report.failed


def test_two_spf_records_fail_and_an_include_that_servfails_is_an_error(tmp_path, dns_server):
    cfg = _config(tmp_path, pools())
    dns_server.add("two.test", "TXT", f"v=spf1 ip4:{MTA1} -all")
    dns_server.add("two.test", "TXT", f"v=spf1 ip6:{MTA1_V6} -all")
    dns_server.add("broken.test", "TXT", "v=spf1 include:_spf.broken.test -all")
    dns_server.set_servfail("_spf.broken.test")
    two = [i for i in check_domain(cfg, "two.test", _dns(dns_server)).items if i.check == "spf"]
    assert two[0].status is Status.FAIL and "multiple SPF" in two[0].detail  # checkdmarc's
    assert all(i.status is Status.FAIL for i in two[1:])  # permerror, for pyspf too
    broken = check_domain(cfg, "broken.test", _dns(dns_server))
    spf = [i for i in broken.items if i.check == "spf"]
    assert [i.status for i in spf[1:]] == [Status.ERROR, Status.ERROR]
    assert "SERVFAIL" in spf[1].detail and spf[1].fix == ""


def test_p_none_is_a_warning_and_a_policy_that_does_not_parse_a_failure(tmp_path, dns_server):
    cfg = _config(tmp_path, pools())
    dns_server.add("_dmarc.one.test", "TXT", "v=DMARC1; p=none")
    dns_server.add("_dmarc.two.test", "TXT", "v=DMARC1; p=sometimes")
    one = check_domain(cfg, "one.test", _dns(dns_server))
    (dmarc,) = [i for i in one.items if i.check == "dmarc"]
    assert dmarc.status is Status.WARN and "monitoring only" in dmarc.detail
    two = check_domain(cfg, "two.test", _dns(dns_server))
    (dmarc,) = [i for i in two.items if i.check == "dmarc"]
    assert dmarc.status is Status.FAIL and "does not parse" in dmarc.detail
    assert "sometimes" in dmarc.detail  # checkdmarc's own words


def test_a_ptr_that_does_not_resolve_back_fails_with_both_records(tmp_path, dns_server):
    dns_server.add_ptr(MTA1, "mta1.good.test")
    dns_server.add("mta1.good.test", "A", "192.0.2.99")
    cfg = _config(tmp_path, pools())
    report = check_domain(cfg, "good.test", _dns(dns_server))
    ptr = [i for i in report.items if i.check == "ptr"]
    assert ptr[0].status is Status.FAIL and "resolves to 192.0.2.99" in ptr[0].detail
    assert ptr[0].fix == f"mta1.good.test. IN A {MTA1}"
    assert ptr[1].status is Status.FAIL and ptr[1].detail == "no PTR record"  # MTA1_V6
    reverse = ipaddress.ip_address(MTA1_V6).reverse_pointer
    assert ptr[1].fix.startswith(f"{reverse}. IN PTR mta1.good.test. ")


def test_starttls_never_fails_the_tls_requirement(tmp_path, dns_server):
    cfg = _config(tmp_path, {**pools(), "delivery": {"starttls": "never"}})
    report = check_domain(cfg, "good.test", _dns(dns_server))
    (tls,) = [i for i in report.items if i.subject == "TLS to recipients"]
    assert tls.status is Status.FAIL and tls.fix == '[delivery] starttls = "may"'


# -- the API ------------------------------------------------------------------------------


class Api:
    def __init__(self, relay: Any, port: int) -> None:
        self.relay, self.port = relay, port

    def key(self, name: str, *options: str) -> str:
        out = self.relay.ctl("key", "add", name, *options).stdout
        return next(line for line in out.splitlines() if line.startswith("rk_"))

    def get(self, path: str, token: str | None) -> tuple[int, dict[str, str], Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(raw)


@pytest.fixture
def api(relay, zones) -> Api:
    port = free_port()
    config = {
        **zones,
        **pools({"address": MTA2, "ehlo": "mta2.bad.test"}),
        "listeners": [
            {"address": f"127.0.0.1:{free_port()}", "kind": "relay"},
            {"address": f"127.0.0.1:{port}", "kind": "http"},
        ],
        "auth": {"users_file": "users.json"},
    }
    r = relay(config)
    wait_until(lambda: listening(port), 10, "the API listener")
    return Api(r, port)


def test_the_api_answers_with_relayctls_document(api):
    token = api.key("ops", "--sender", "good.test", "--sender", "bad.test", "--scope", "read")
    code, headers, doc = api.get("/v1/domains/good.test/check", token)
    assert code == 200 and headers["content-type"].startswith("application/json")
    cli = json.loads(api.relay.ctl("check-domain", "good.test", "--json", check=False).stdout)
    assert doc == cli
    code, _, bad = api.get("/v1/domains/bad.test/check?return_path_domain=bad.test", token)
    assert code == 200 and bad["status"] == "fail"
    assert any(i["check"] == "dmarc" and i["status"] == "fail" for i in bad["items"])


def test_the_api_refuses_without_the_read_scope_for_another_domain_or_a_bad_name(api):
    send_only = api.key("app", "--sender", "good.test", "--scope", "send")
    code, _, problem = api.get("/v1/domains/good.test/check", send_only)
    assert code == 403 and problem["field"] == "scope"
    reader = api.key("reader", "--sender", "good.test", "--scope", "read")
    code, _, problem = api.get("/v1/domains/bad.test/check", reader)
    assert code == 403 and problem["field"] == "domain" and "bad.test" in problem["detail"]
    code, _, problem = api.get("/v1/domains/no..such/check", reader)
    assert code == 422 and problem["field"] == "domain"
    code, _, problem = api.get("/v1/domains/good.test/check?return_path_domain=x..y", reader)
    assert code == 422 and problem["field"] == "return_path_domain"
    code, headers, problem = api.get("/v1/domains/good.test/check", None)
    assert code == 401 and headers["content-type"] == "application/problem+json"
