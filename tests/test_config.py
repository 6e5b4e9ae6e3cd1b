"""Config validation: load() on files written per test, and `relayd --check` as operators run it.

Every refusal must name the file, the key and the problem, so these tests check all three.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from relayd.config import ConfigError, load

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relayd.toml"
    path.write_text(text)
    return path


def _refused(tmp_path: Path, text: str, key: str) -> str:
    """Load ``text``, expect a ConfigError on ``key`` in the file/key/problem form; the problem."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    exc = info.value
    assert (exc.path, exc.key) == (str(path), key), str(exc)
    assert str(exc) == f"{path}: {key}: {exc.problem}"
    return exc.problem


_HUGE_DIGITS = "9" * 400  # float() of it is inf


@pytest.mark.parametrize(
    ("table", "name", "value", "problem"),
    [
        ("retry", "first", "nan", "duration"),
        ("retry", "first", "inf", "at most 365d"),
        ("retry", "max_age", "1e300", "at most 365d"),
        ("retry", "max_interval", '"366d"', "at most 365d"),
        ("delivery", "connect_timeout", f'"{_HUGE_DIGITS}s"', "at most 365d"),
        ("server", "shutdown_timeout", "-inf", "more than 0"),
        ("dns", "timeout", "0", "more than 0"),
        ("auth", "failure_delay", "-1", "0 or more"),
        ("retry", "delay_warning", "-5", "0 or more"),
        ("retry", "delay_warning", "nan", "duration"),
        ("events", "retention", "nan", "duration"),
        ("retry", "multiplier", "nan", "[1, 10]"),
        ("retry", "multiplier", "inf", "[1, 10]"),
        ("retry", "multiplier", "1e300", "[1, 10]"),
        ("retry", "multiplier", "0.5", "[1, 10]"),
        ("retry", "jitter", "nan", "[0, 1)"),
        ("retry", "jitter", "1.0", "[0, 1)"),
        ("delivery", "port", "70000", "1-65535"),
        ("delivery", "port", "0", "1-65535"),
        ("delivery", "max_active", "1000000000000", "from 10 to 1000000"),
        ("ingress", "max_recipients", "1000001", "from 1 to 1000000"),
        ("ingress", "max_line_length", "77", "from 78 to 1000000"),
        ("ingress", "max_message_size", '"2GB"', "at most 512MB"),
        ("auth", "max_failures", "0", "from 1 to 1000000"),
        ("shaping.default", "max_connections", "9223372036854775807", "from 1 to 1000000"),
        ("shaping.default", "max_rate", f'"{_HUGE_DIGITS}/s"', "at most 1000000/s"),
        ("shaping.default", "max_rate_per_source", '"2000000/s"', "at most 1000000/s"),
        ("webhooks", "poll_interval", '"1ms"', "from 10ms to 1m, got 1ms"),
        ("webhooks", "timeout", '"10m"', "from 100ms to 5m, got 10m"),
        ("webhooks", "retry_for", '"31d"', "from 10ms to 30d, got 31d"),
        ("webhooks", "retry_jitter", "1", "[0, 1)"),
        ("webhooks", "rotation_overlap", "-1", "0 or more"),
        ("webhooks", "max_batch", "10001", "from 1 to 10000"),
        ("webhooks", "max_concurrency", "0", "from 1 to 256"),
        ("reputation", "interval", '"30s"', "from 1m to 7d, got 30s"),
        ("reputation", "interval", '"8d"', "from 1m to 7d, got 8d"),
        ("reputation", "interval", "nan", "duration"),
    ],
)
def test_numbers_out_of_range_are_refused(tmp_path, table, name, value, problem):
    text = f"[{table}]\n{name} = {value}\n"
    assert problem in _refused(tmp_path, text, f"{table}.{name}")


def test_webhook_retries_cap_at_least_their_first_delay(tmp_path):
    text = '[webhooks]\nretry_first = "2h"\nretry_max_interval = "1h"\n'
    assert "at least retry_first" in _refused(tmp_path, text, "webhooks.retry_max_interval")


def test_the_example_config_documents_every_webhooks_key():
    config = load(ROOT / "conf" / "relayd.toml")
    hooks = config.webhooks
    assert (hooks.retry_for, hooks.rotation_overlap, hooks.timeout) == (3 * 86400, 86400, 10)
    text = (ROOT / "conf" / "relayd.toml").read_text()
    section = text.split("[webhooks]", 1)[1]
    for name in hooks.__dataclass_fields__:
        assert f"\n{name} = " in section, name


def test_pool_source_weight_is_bounded(tmp_path):
    text = '[pools.main]\nsources = [{ address = "127.0.0.1", weight = 10000000 }]\n'
    assert "from 1 to 1000000" in _refused(tmp_path, text, "pools.main.sources[0].weight")


def test_the_limits_themselves_are_accepted(tmp_path):
    config = load(
        _write(
            tmp_path,
            '[delivery]\nport = 65535\nconnect_timeout = "365d"\n'
            '[ingress]\nmax_recipients = 1000000\nmax_message_size = "512MB"\n'
            '[shaping.default]\nmax_rate = "1000000/s"\n'
            '[retry]\nmultiplier = 10.0\njitter = 0\nmax_age = 31536000\ndelay_warning = "0"\n'
            '[auth]\nfailure_delay = "0s"\n',
        )
    )
    assert config.delivery.port == 65535 and config.delivery.connect_timeout == 365 * 86400
    assert config.retry.multiplier == 10.0 and config.retry.max_age == 365 * 86400
    assert config.ingress.max_message_size == 512 * 1024**2 and config.auth.failure_delay == 0


def test_check_exits_78_naming_file_key_and_problem(tmp_path):
    path = _write(tmp_path, "[retry]\nfirst = nan\n")
    result = subprocess.run(
        [sys.executable, "-m", "relayd", "--check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode == 78, result.stdout + result.stderr
    assert f"{path}: retry.first: must be a duration" in result.stderr
    assert "nan" in result.stderr


def _listeners(*addresses: str) -> str:
    return "".join(f'[[listeners]]\naddress = "{a}"\nkind = "relay"\n' for a in addresses)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("127.0.0.1:2525", "127.0.0.1:2525"),
        ("0.0.0.0:2525", "127.0.0.1:2525"),
        ("127.0.0.2:2525", "0.0.0.0:2525"),
        ("[::]:2525", "[::1]:2525"),
        ("[::1]:2525", "[0:0::1]:2525"),
        ("localhost:2525", "LOCALHOST:2525"),
    ],
)
def test_listeners_on_one_socket_are_refused(tmp_path, first, second):
    text = _listeners("127.0.0.1:2600", first, second)
    problem = _refused(tmp_path, text, "listeners[2].address")
    assert "listeners[1].address" in problem


@pytest.mark.parametrize(
    "addresses",
    [
        ("0.0.0.0:2525", "[::]:2525"),  # IPv6 listeners are V6ONLY: two sockets, both listen
        ("127.0.0.1:2525", "127.0.0.2:2525"),
        ("0.0.0.0:2525", "127.0.0.1:587"),
        ("[::]:2525", "127.0.0.1:2525"),
    ],
)
def test_listeners_on_distinct_sockets_are_accepted(tmp_path, addresses):
    config = load(_write(tmp_path, _listeners(*addresses)))
    assert len(config.listeners) == len(addresses)


def test_metadata_headers_are_field_names_or_prefixes(tmp_path):
    config = load(_write(tmp_path, '[ingress]\nmetadata_headers = ["X-Meta", "X-PM-Metadata-*"]\n'))
    assert config.ingress.metadata_headers == ("X-Meta", "X-PM-Metadata-*")
    assert not config.ingress.keep_metadata_headers
    assert load(_write(tmp_path, "")).ingress.metadata_headers == ("X-Relayd-Meta",)
    for bad in ('"X Meta"', '"X-Meta:"', '""', '"X-*-Meta"', "3"):
        text = f"[ingress]\nmetadata_headers = [{bad}]\n"
        problem = _refused(tmp_path, text, "ingress.metadata_headers[0]")
        assert "not a header field name" in problem
    problem = _refused(
        tmp_path, "[ingress]\nkeep_metadata_headers = 1\n", "ingress.keep_metadata_headers"
    )
    assert "must be a bool" in problem


def test_the_default_config_path_is_the_bundled_example():
    from relayd.config import DEFAULT_PATH

    assert Path(__file__).resolve().parent.parent / "conf" / "relayd.toml" == DEFAULT_PATH
    load(DEFAULT_PATH)  # and it is valid


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("classes_file = 'nowhere.toml'", "bounces.classes_file", "cannot read file"),
        ("local_classes_file = 'nowhere.toml'", "bounces.local_classes_file", "cannot read file"),
        ("suppress_classes = ['quota', 'bounced']", "bounces.suppress_classes[1]", "unknown class"),
        ("suppress_classes = 'quota'", "bounces.suppress_classes", "must be a list"),
        ("suppres_classes = []", "bounces.suppres_classes", "unknown key"),
    ],
)
def test_bounces_keys_are_checked(tmp_path, text, key, problem):
    assert problem in _refused(tmp_path, f"[bounces]\n{text}\n", key)


def test_the_blacklist_watch_defaults_to_reporting_on_three_zones(tmp_path):
    rep = load(_write(tmp_path, "")).reputation
    assert rep.zones == ("zen.spamhaus.org", "bl.spamcop.net", "b.barracudacentral.org")
    assert (rep.enabled, rep.active, rep.interval, rep.on_listing) == (True, True, 3600, "report")
    text = '[reputation]\nzones = ["BL.Example.test."]\ninterval = "1m"\non_listing = "remove"\n'
    rep = load(_write(tmp_path, text)).reputation
    assert (rep.zones, rep.interval, rep.on_listing) == (("bl.example.test",), 60, "remove")
    assert not load(_write(tmp_path, "[reputation]\nzones = []\n")).reputation.active
    assert not load(_write(tmp_path, "[reputation]\nenabled = false\n")).reputation.active


@pytest.mark.parametrize(
    ("line", "key", "problem"),
    [
        ('on_listing = "drop"', "reputation.on_listing", "must be 'report' or 'remove'"),
        ("enabled = 1", "reputation.enabled", "must be a bool"),
        ('zones = "zen.spamhaus.org"', "reputation.zones", "must be a list"),
        ('zones = ["zen spamhaus org"]', "reputation.zones[0]", "not a DNS zone"),
        ("zones = [3]", "reputation.zones[0]", "not a DNS zone"),
        ('zones = ["localhost"]', "reputation.zones[0]", "not a DNS zone"),
        ('zones = ["a.test", "A.test."]', "reputation.zones[1]", "'a.test' is listed twice"),
        ('zone = ["a.test"]', "reputation.zone", "unknown key"),
    ],
)
def test_blacklist_watch_mistakes_are_refused(tmp_path, line, key, problem):
    assert problem in _refused(tmp_path, f"[reputation]\n{line}\n", key)


def test_the_example_config_documents_every_reputation_key_at_its_default(tmp_path):
    config = load(ROOT / "conf" / "relayd.toml")
    assert config.reputation == load(_write(tmp_path, "")).reputation
    text = (ROOT / "conf" / "relayd.toml").read_text()
    section = text.split("[reputation]", 1)[1]
    for name in config.reputation.__dataclass_fields__:
        assert f"\n{name} = " in section, name


def test_transactional_connections_is_a_count_kept_from_bulk_mail(tmp_path):
    for value, problem in (("-1", "from 0 to 1000, got -1"), ("1001", "from 0 to 1000, got 1001")):
        text = f"[shaping.default]\ntransactional_connections = {value}\n"
        assert problem in _refused(tmp_path, text, "shaping.default.transactional_connections")
    text = '[shaping.domains."a.test"]\ntransactional_connections = "2"\n'
    problem = _refused(tmp_path, text, "shaping.domains.a.test.transactional_connections")
    assert "must be a int" in problem
    config = load(
        _write(
            tmp_path,
            "[shaping.default]\ntransactional_connections = 5\n"
            '[shaping.domains."a.test"]\nmax_connections = 3\n'
            '[shaping.domains."b.test"]\ntransactional_connections = 0\n',
        )
    )
    shaping = config.shaping
    assert (shaping.default.transactional_connections, shaping.default.bulk_connections) == (5, 15)
    assert shaping.domains["a.test"].bulk_connections == 1  # inherited 5 of 3: bulk keeps one
    assert shaping.domains["b.test"].bulk_connections == 20
    assert load(ROOT / "conf" / "relayd.toml").shaping.default.transactional_connections == 2


_HTTP = '[[listeners]]\naddress = "127.0.0.1:8025"\nkind = "http"\n'


def test_unsubscribe_is_off_by_default_and_documented_at_its_defaults(tmp_path):
    default = load(_write(tmp_path, "")).unsubscribe
    assert not default.enabled
    assert (default.scope, default.max_age, default.streams) == (
        "sender_domain",
        365 * 86400,
        ("bulk",),
    )
    config = load(ROOT / "conf" / "relayd.toml")  # on, on its loopback listener, else default
    assert config.unsubscribe.url == "http://127.0.0.1:8025/unsubscribe/"
    assert dataclasses.replace(config.unsubscribe, url="") == default
    section = (ROOT / "conf" / "relayd.toml").read_text().split("[unsubscribe]", 1)[1]
    for name in default.__dataclass_fields__:
        assert f"\n{name} = " in section, name
    text = (
        f'{_HTTP}[unsubscribe]\nurl = "https://mail.example.com/u/"\n'
        'mailto = "u@bounces.example.com"\nscope = "key"\nmax_age = "30d"\n'
        'streams = ["bulk", "transactional"]\n'
    )
    on = load(_write(tmp_path, text)).unsubscribe
    assert on.enabled and on.path == "/u/" and on.mailto == "u@bounces.example.com"
    assert (on.scope, on.max_age, on.streams) == ("key", 30 * 86400, ("bulk", "transactional"))
    for url in ("http://127.0.0.1:8025/unsubscribe/", "http://[::1]/u/", "http://localhost/"):
        assert load(_write(tmp_path, f'{_HTTP}[unsubscribe]\nurl = "{url}"\n')).unsubscribe.enabled


@pytest.mark.parametrize(
    ("line", "key", "problem"),
    [
        ('url = "http://mail.example.com/u/"', "unsubscribe.url", "must be https://"),
        ('url = "mailto:u@example.com"', "unsubscribe.url", "must be an https:// URL with a host"),
        ('url = "https:///u/"', "unsubscribe.url", "with a host"),
        ('url = "https://a@mail.example.com/u/"', "unsubscribe.url", "with a host"),
        ('url = "https://mail.example.com:x/u/"', "unsubscribe.url", "not a URL"),
        ('url = "https://mail.example.com/u/?list=1"', "unsubscribe.url", "no query or fragment"),
        ('url = "https://mail.example.com/u/#"', "unsubscribe.url", "no query or fragment"),
        ('url = "https://mail.example.com/u"', "unsubscribe.url", "must end in '/'"),
        ('url = "https://mail.example.com"', "unsubscribe.url", "must end in '/'"),
        ('url = "https://mail.example.com/a%20b/"', "unsubscribe.url", "use only"),
        ('url = "https://mail.example.com/v1/u/"', "unsubscribe.url", "not be under /v1/"),
        ('url = "https://mail.example.com/api/"', "unsubscribe.url", "not be under /v1/"),
        (f'url = "https://mail.example.com/{"u" * 200}/"', "unsubscribe.url", "at most 200"),
        ("url = 1", "unsubscribe.url", "must be a str"),
        ('mailto = "unsubscribe"', "unsubscribe.mailto", "not an address"),
        ('mailto = "un subscribe@b.example.com"', "unsubscribe.mailto", "not an address"),
        ('mailto = "u?x=1@b.example.com"', "unsubscribe.mailto", "not an address"),
        ('mailto = "u@b example.com"', "unsubscribe.mailto", "not an address"),
        (f'mailto = "{"u" * 120}@b.example.com"', "unsubscribe.mailto", "at most 128"),
        ('scope = "sender"', "unsubscribe.scope", "global, sender_domain, key"),
        ('max_age = "12h"', "unsubscribe.max_age", "from 1d to 365d, got 12h"),
        ('max_age = "366d"', "unsubscribe.max_age", "at most 365d"),
        ('streams = "bulk"', "unsubscribe.streams", "must be a list"),
        ('streams = ["news"]', "unsubscribe.streams[0]", "'transactional' or 'bulk'"),
        ('streams = ["bulk", "bulk"]', "unsubscribe.streams[1]", "listed twice"),
        ('ttl = "1d"', "unsubscribe.ttl", "unknown key"),
    ],
)
def test_unsubscribe_mistakes_are_refused(tmp_path, line, key, problem):
    base = 'url = "https://mail.example.com/u/"\n' if not line.startswith("url") else ""
    text = f"{_HTTP}[unsubscribe]\n{base}{line}\n"
    assert problem in _refused(tmp_path, text, key)


def test_unsubscribe_needs_a_listener_for_its_links_and_a_url_for_its_mailto(tmp_path):
    text = '[unsubscribe]\nurl = "https://mail.example.com/u/"\n'
    assert "needs an http or https listener" in _refused(tmp_path, text, "unsubscribe.url")
    text = f'{_HTTP}[unsubscribe]\nmailto = "u@bounces.example.com"\n'
    assert "needs unsubscribe.url" in _refused(tmp_path, text, "unsubscribe.mailto")


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('[return_path]\ndomain = "bad domain"\n', "return_path.domain", "not a domain"),
        ('[return_path]\nlocal = "a+b"\n', "return_path.local", "without '+'"),
        ('[return_path]\nlocal = ""\n', "return_path.local", "1 to 34 characters"),
        (f'[return_path]\nlocal = "{"b" * 35}"\n', "return_path.local", "1 to 34 characters"),
        ('[return_path]\ncomplaints = ["fbl+x"]\n', "return_path.complaints[0]", "without '+'"),
        ('[return_path]\ncomplaints = ["fbl", "FBL"]\n', "return_path.complaints[1]", "twice"),
        ('[return_path]\ncomplaints = ["bounces"]\n', "return_path.complaints[0]", "twice"),
        ("[return_path]\ncomplaints = [1]\n", "return_path.complaints[0]", "local part"),
        ('[return_path]\nmax_report_size = "1TB"\n', "return_path.max_report_size", "at most"),
        ('[return_path]\nfeedback_id = "{campaign}"\n', "return_path.feedback_id", "{meta.KEY}"),
        ('[return_path]\nfeedback_id = "a b"\n', "return_path.feedback_id", "printable"),
        ('[return_path]\nfeedback_id = "{meta.}"\n', "return_path.feedback_id", "fields"),
        (f'[return_path]\nfeedback_id = "{"x" * 201}"\n', "return_path.feedback_id", "200"),
        ("[return_path]\nverp = true\n", "return_path.verp", "unknown key"),
        ('[suppression]\ncomplaint_scope = "world"\n', "suppression.complaint_scope", "one of"),
        (
            '[[listeners]]\naddress = "127.0.0.1:2525"\nkind = "bounce"\n',
            "listeners[0].kind",
            "needs return_path.domain",
        ),
    ],
)
def test_the_return_path_table_is_checked(tmp_path, text, key, problem):
    assert problem in _refused(tmp_path, text, key)


def test_a_bounce_listener_with_its_domain_loads(tmp_path):
    config = load(
        _write(
            tmp_path,
            '[[listeners]]\naddress = "0.0.0.0:25"\nkind = "bounce"\n'
            '[return_path]\ndomain = "Bounce.Example.COM."\ncomplaints = ["FBL", "abuse"]\n'
            'feedback_id = "{meta.campaign}:{account}:{sender_domain}:relayd"\n',
        )
    )
    assert config.listeners[0].kind == "bounce"  # no [tls] needed: STARTTLS only when given
    paths = config.return_path
    assert (paths.domain, paths.local, paths.complaints) == (
        "bounce.example.com",
        "bounces",
        ("fbl", "abuse"),
    )
    assert paths.max_report_size == 10 * 1024**2
    assert config.suppression.complaint_scope == "sender_domain"
    assert load(_write(tmp_path, "")).return_path.domain == ""  # off by default


_SCHEDULE = (
    '[warmup.schedules.new]\ndays = [50, 100, 200]\nper_provider = { "gmail.com" = [20, 40] }\n'
)


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (
            '[pools.main]\nsources = [{ address = "127.0.0.2", warmup = "nope" }]\n',
            "pools.main.sources[0].warmup",
            "unknown schedule 'nope' (schedules in [warmup.schedules]: new)",
        ),
        (
            '[pools.main]\nsources = [{ address = "127.0.0.2", warmup_start = 2026-12-01 }]\n',
            "pools.main.sources[0].warmup_start",
            "needs warmup (a schedule name)",
        ),
        (
            '[pools.main]\nsources = [{ address = "127.0.0.2", warmup = "new",'
            ' warmup_start = "2026-13-01" }]\n',
            "pools.main.sources[0].warmup_start",
            "must be a date like 2026-12-01, got '2026-13-01'",
        ),
        (
            '[pools.main]\nsources = [{ address = "127.0.0.2", warmup = "new",'
            " warmup_start = 2026-12-01T10:00:00 }]\n",
            "pools.main.sources[0].warmup_start",
            "must be a date like 2026-12-01, got '2026-12-01 10:00:00'",
        ),
        (
            '[pools.a]\nsources = [{ address = "127.0.0.2", warmup = "new" }]\n'
            '[pools.b]\nsources = [{ address = "127.0.0.2" }]\n',
            "pools.b.sources[0].warmup",
            "127.0.0.2 is also in pool 'a' with another warm-up",
        ),
        ("[warmup.schedules.other]\nper_provider = {}\n", "warmup.schedules.other.days", "missing"),
        (
            "[warmup.schedules.other]\ndays = []\n",
            "warmup.schedules.other.days",
            "must list from 1 to 365 daily volumes, got 0",
        ),
        (
            "[warmup.schedules.other]\ndays = [50, 0]\n",
            "warmup.schedules.other.days[1]",
            "must be from 1 to 1000000, got 0",
        ),
        (
            '[warmup.schedules.other]\ndays = [50, "100"]\n',
            "warmup.schedules.other.days[1]",
            "must be from 1 to 1000000, got '100'",
        ),
        (
            '[warmup.schedules.other]\ndays = [50]\nper_provider = { "gmail.com" = [-5] }\n',
            "warmup.schedules.other.per_provider.gmail.com[0]",
            "must be from 1 to 1000000, got -5",
        ),
        (
            '[warmup.schedules.other]\ndays = [50]\nper_provider = { "gmail.com" = 5 }\n',
            "warmup.schedules.other.per_provider.gmail.com",
            "must be a list, got 5",
        ),
        (
            "[warmup.schedules.other]\ndays = [50]\nramp = 2\n",
            "warmup.schedules.other.ramp",
            "unknown key",
        ),
        ("[warmup]\nschedule = {}\n", "warmup.schedule", "unknown key"),
    ],
)
def test_warm_up_schedules_and_sources_are_checked(tmp_path, text, key, problem):
    assert problem in _refused(tmp_path, _SCHEDULE + text, key)


def test_a_warm_up_schedule_need_not_rise_and_a_source_names_it(tmp_path):
    text = (
        "[warmup.schedules.flat]\ndays = [100, 100, 50]\n"
        '[warmup.schedules.flat.per_provider]\n"GMail.com" = [10]\n'
        '[pools.a]\nsources = [{ address = "127.0.0.2", warmup = "flat",'
        " warmup_start = 2026-12-01 },"
        ' { address = "127.0.0.3", warmup = "flat" }, { address = "127.0.0.4" }]\n'
        '[pools.b]\nsources = [{ address = "127.0.0.2", warmup = "flat",'
        ' warmup_start = "2026-12-01" }]\n'
    )
    config = load(_write(tmp_path, text))
    flat = config.warmup["flat"]
    assert flat.days == (100, 100, 50) and flat.per_provider == {"gmail.com": (10,)}
    warm, unseen, plain = config.pools["a"]
    assert (warm.warmup, warm.warmup_start) == ("flat", date(2026, 12, 1))
    assert (unseen.warmup, unseen.warmup_start) == ("flat", None)
    assert (plain.warmup, plain.warmup_start) == ("", None)
    assert config.pools["b"][0] == warm  # the same address, the same warm-up
    assert load(_write(tmp_path, "")).warmup == {}


def test_the_example_config_ships_a_warm_up_schedule(tmp_path):
    schedules = load(ROOT / "conf" / "relayd.toml").warmup
    assert schedules["default"].days[:3] == (50, 100, 200)
    assert all(not src.warmup for pool in load(ROOT / "conf" / "relayd.toml").pools.values()
               for src in pool)  # fmt: skip


@pytest.mark.parametrize(
    ("line", "key", "problem"),
    [
        ("keep = 0", "backup.keep", "must be from 1 to 1000, got 0"),
        ("keep = 1001", "backup.keep", "must be from 1 to 1000, got 1001"),
        ('interval = "500ms"', "backup.interval", "must be at least 1s, got 0.5s"),
        ('dir = "spool"', "backup.dir", "must not be the spool's own directory"),
    ],
)
def test_backup_mistakes_are_refused(tmp_path, line, key, problem):
    text = f'[server]\nspool_path = "spool/s.sqlite"\n[backup]\n{line}\n'
    assert problem in _refused(tmp_path, text, key)


def test_backups_are_off_by_default_and_documented_at_their_defaults(tmp_path):
    assert load(_write(tmp_path, "")).backup == load(ROOT / "conf" / "relayd.toml").backup
    assert load(_write(tmp_path, "")).backup.dir is None
    cfg = load(_write(tmp_path, '[backup]\ndir = "backups"\ninterval = "1h"\nkeep = 3\n'))
    assert (cfg.backup.dir, cfg.backup.interval, cfg.backup.keep) == (tmp_path / "backups", 3600, 3)
