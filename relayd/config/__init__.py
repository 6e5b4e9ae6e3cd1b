"""The one TOML config file: parsed and validated at start-up and on SIGHUP.

Every problem is reported as ``ConfigError`` naming the file, the key and what is wrong, so an
operator can fix a typo without reading code. Unknown keys are errors too: a misspelt limit that
silently falls back to a default is how reputations get burnt.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import re2

from relayd.alerts.rules import RULES, Kind, Rule

EX_CONFIG = 78  # sysexits.h: configuration error
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "conf" / "relayd.toml"  # the bundled example

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE = re.compile(r"^\s*(\d+)\s*(k|kb|m|mb|g|gb|t|tb)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3}
_SIZE_UNITS |= {"gb": 1024**3, "t": 1024**4, "tb": 1024**4}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*$")
_RATE_PERIODS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60}
_RATE_PERIODS |= {"h": 3600, "hour": 3600, "d": 86400, "day": 86400}
# Upper bounds, so that a typo (or nan, inf, 1e300) is refused at load instead of leaving mail
# waiting forever or a port number silently wrapped: conf/relayd.toml documents them.
MAX_DURATION = 365 * 86400.0  # seconds
MAX_COUNT = 1_000_000  # any limit counted in connections, recipients, messages, ...
MAX_SIZE = 512 * 1024**2  # bytes: a message is one SQLite value and is held in memory
MAX_DISK = 1024**5  # bytes: a free-space minimum (a petabyte)
MAX_RATE = 1_000_000.0  # messages per second
MAX_MULTIPLIER = 10.0  # retry.multiplier
# RFC 5322 ftext (printable US-ASCII but ":"), optionally ending in "*" (a prefix)
_FIELD_NAME = re.compile(r"^[\x21-\x29\x2b-\x39\x3b-\x7e]+\*?$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.?)+$")


class ConfigError(Exception):
    """A config problem, phrased for the operator: file, key, problem."""

    def __init__(self, path: str | Path, key: str, problem: str) -> None:
        self.path, self.key, self.problem = str(path), key, problem
        super().__init__(f"{path}: {key}: {problem}" if key else f"{path}: {problem}")


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Rate:
    """A message rate: ``count`` per ``period`` seconds."""

    count: float
    period: float

    @property
    def interval(self) -> float:
        return self.period / self.count


@dataclass(frozen=True)
class Listener:
    address: HostPort
    kind: str


@dataclass(frozen=True)
class Tls:
    cert_file: Path | None
    key_file: Path | None
    min_version: str  # "1.2" or "1.3"


@dataclass(frozen=True)
class Auth:
    users_file: Path
    failure_delay: float
    max_failures: int
    lockout: float


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    algorithm: str  # "rsa-sha256" or "ed25519-sha256"
    key_file: Path
    key: str  # where it is configured, for error messages: "dkim.keys[0]"


@dataclass(frozen=True)
class Dkim:
    keys: tuple[DkimKey, ...]
    default_domain: str
    parent_fallback: bool
    headers: tuple[str, ...]


DKIM_HEADERS = (
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Id",
    "Sender",
    "Feedback-ID",
)
LISTENER_KINDS = ("relay", "submission", "smtps", "http", "https", "bounce")
HTTP_KINDS = ("http", "https")  # the sending API; the others speak SMTP


@dataclass(frozen=True)
class Source:
    address: str
    ehlo: str
    weight: int
    warmup: str = ""  # the [warmup.schedules] table it follows; "": none (it is warm)
    warmup_start: date | None = None  # day 1 of it; None: the day relayd first sees it


@dataclass(frozen=True)
class Shaping:
    max_connections: int
    max_connections_per_source: int
    max_rate: Rate | None
    max_rate_per_source: Rate | None
    max_messages_per_connection: int
    pool: str
    # Connections to the site that bulk mail never takes: bulk may hold at most
    # max_connections minus this, and always at least one (see queue.scheduler).
    transactional_connections: int = 2

    @property
    def bulk_connections(self) -> int:
        return max(1, self.max_connections - self.transactional_connections)


@dataclass(frozen=True)
class Retry:
    first: float
    multiplier: float
    max_interval: float
    jitter: float
    max_age: float
    delay_warning: float


@dataclass(frozen=True)
class Server:
    hostname: str
    spool_path: Path
    min_free_space: int
    max_spool_size: int
    log_level: str
    shutdown_timeout: float


@dataclass(frozen=True)
class Ingress:
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    max_message_size: int
    max_recipients: int
    max_errors: int
    session_timeout: float
    max_session_time: float
    max_connections: int
    max_connections_per_ip: int
    max_line_length: int
    bare_newlines: str
    # header fields that carry the sender's metadata (relayd.ingress.metadata); "X-Foo-*": a prefix
    metadata_headers: tuple[str, ...] = ("X-Relayd-Meta",)
    keep_metadata_headers: bool = False  # deliver them too

    def is_trusted(self, ip: str) -> bool:
        return in_networks(ip, self.trusted_networks)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def in_networks(ip: str, networks: Iterable[Network]) -> bool:
    """Whether a client address (an IPv4-mapped IPv6 one as its IPv4) is in any of them."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


@dataclass(frozen=True)
class Dns:
    nameservers: tuple[HostPort, ...]
    timeout: float


@dataclass(frozen=True)
class Delivery:
    port: int
    connect_timeout: float
    command_timeout: float
    idle_connection_time: float
    starttls: str
    max_active: int


@dataclass(frozen=True)
class Routes:
    """[routes]: a domain (or "*") to the host that takes its mail instead of its MX."""

    hosts: dict[str, HostPort]

    def for_domain(self, domain: str) -> HostPort | None:
        return self.hosts.get(domain) or self.hosts.get("*")


PROVIDER_LANE = "provider:"  # a lane of the scheduler's: a provider's site, "provider:NAME"


@dataclass(frozen=True)
class Provider:
    """[shaping.providers.NAME]: every domain one of whose MX hosts matches ``mx`` (shell-style
    patterns, lower case) is in the provider's one site, under these limits."""

    name: str
    mx: tuple[str, ...]
    shaping: Shaping
    match: re.Pattern[str]  # the patterns as one regular expression over a host name


@dataclass(frozen=True)
class AdaptiveRule:
    """One rule of a shaping rules file: a reply from a site of ``provider`` ("*": any site)
    that all its patterns match (as a bounce rule's: ``code`` and ``enhanced`` whole, ``text``
    searched for, case-insensitively; RE2) holds the source that got it: ``suspend`` (no
    connection from it to the site) or ``rate`` (its rate to the site times ``factor``, its
    connections at most ``connections``), for ``duration`` seconds."""

    name: str
    provider: str
    code: str | None
    enhanced: str | None
    text: str | None
    action: str  # "suspend" or "rate"
    duration: float
    factor: float = 1.0
    connections: int | None = None


@dataclass(frozen=True)
class ShapingRules:
    """[shaping]: the default limits, the domains and the providers with limits of their own,
    and the rules of adaptive shaping (the local file's first: the first match wins)."""

    default: Shaping
    domains: dict[str, Shaping]
    providers: dict[str, Provider] = field(default_factory=dict)
    rules: tuple[AdaptiveRule, ...] = ()
    adaptive: bool = True  # false: replies are not matched against the rules
    rules_file: Path | None = None
    local_rules_file: Path | None = None

    def for_lane(self, lane: str) -> Shaping:
        """The limits of a lane: a domain of [shaping.domains], a provider of
        [shaping.providers] ("provider:NAME"), or "" for the default."""
        if lane.startswith(PROVIDER_LANE):
            provider = self.providers.get(lane[len(PROVIDER_LANE) :])
            return provider.shaping if provider else self.default
        return self.domains.get(lane, self.default) if lane else self.default

    def provider_of(self, hosts: Iterable[str]) -> str:
        """The first provider (in the file's order) with a pattern matching one of ``hosts``
        (MX host names, lower case); "" for none."""
        names = list(hosts)
        for name, provider in self.providers.items():
            if any(provider.match.fullmatch(host) for host in names):
                return name
        return ""


@dataclass(frozen=True)
class Events:
    retention: float


@dataclass(frozen=True)
class Api:
    max_recipients: int
    max_body_size: int


@dataclass(frozen=True)
class Campaigns:
    """[campaigns]: the campaign runner (relayd.campaigns.runner)."""

    batch: int  # contacts rendered and queued per transaction
    poll_interval: float  # seconds between looks for campaigns due
    min_wait: float  # the shortest A/B test wait a campaign may ask for


MAX_CAMPAIGN_WAIT = 30 * 86400.0


@dataclass(frozen=True)
class Webhooks:
    """[webhooks]: how events are posted to the endpoints added with ``relayctl webhook``.
    The endpoints themselves live in the spool, so adding one needs no reload."""

    poll_interval: float  # how often the dispatcher looks for new events
    timeout: float  # an endpoint's timeout when it was added without one
    max_batch: int  # the largest --batch an endpoint may ask for
    max_concurrency: int  # the largest --concurrency
    retry_first: float  # the delay after the first failure; doubling from there
    retry_max_interval: float
    retry_jitter: float  # a fraction: each delay is spread by plus or minus this much
    retry_for: float  # an endpoint failing this long is disabled
    rotation_overlap: float  # how long a rotated-out secret still signs


@dataclass(frozen=True)
class Suppression:
    """[suppression]: what becomes of mail to a suppressed address, and what a hard bounce
    adds to the list. The entries live in the spool (relayctl suppression, the API)."""

    smtp: str  # "refuse": RCPT gets 550 5.7.1; "drop": accepted, not sent, a suppressed event
    bounce_ttl: float  # how long a hard bounce's entry lasts; 0: hard bounces add none
    bounce_scope: str  # "global", "sender_domain" or "key": whose mail a hard bounce stops
    complaint_scope: str = "sender_domain"  # the same, for a feedback-loop complaint


SUPPRESSION_SCOPES = ("global", "sender_domain", "key")

# Bounce classes (KumoMTA's set, in snake_case): what a failed attempt's reply means for the
# sender. conf/bounce_classes.toml documents each; rules name one, suppress_classes lists some.
BOUNCE_CLASSES = (
    "invalid_recipient",
    "bad_domain",
    "inactive_mailbox",
    "invalid_sender",
    "quota",
    "too_large",
    "spam_content",
    "virus",
    "reputation",
    "rate_limited",
    "auth",
    "policy",
    "protocol",
    "routing",
    "dns_failure",
    "connection",
    "transient",
    "expired",
    "uncategorized",
)
HARD_CLASSES = ("invalid_recipient", "bad_domain", "inactive_mailbox")  # suppressed by default
DEFAULT_BOUNCE_CLASSES = DEFAULT_PATH.parent / "bounce_classes.toml"  # the shipped rules


def re2_options(case_sensitive: bool) -> re2.Options:
    """How rules files' patterns are compiled (bounce classes, adaptive shaping): errors are
    raised, not also written to stderr by RE2."""
    options = re2.Options()
    options.case_sensitive = case_sensitive
    options.log_errors = False
    return options


_RE2_CHECK = re2_options(True)  # the error is the ConfigError's, not a line on stderr


@dataclass(frozen=True)
class BounceRule:
    """One rule of a bounce classes file: a reply that all its patterns match is of ``cls``.
    ``code`` and ``enhanced`` must match the whole reply code and enhanced status code; ``text``
    is searched for in the reply text, case-insensitively. The patterns are RE2 regular
    expressions (the syntax of KumoMTA's rules), checked here and compiled by the classifier."""

    cls: str
    code: str | None
    enhanced: str | None
    text: str | None


@dataclass(frozen=True)
class Bounces:
    """[bounces]: the rules of its files, checked (the local file's first: the first match
    wins), and the classes whose bounces mean the address should not be mailed again."""

    classes_file: Path
    local_classes_file: Path | None
    rules: tuple[BounceRule, ...]
    suppress_classes: frozenset[str]


@dataclass(frozen=True)
class ReturnPath:
    """[return_path]: the per-message return path (VERP) of asynchronous bounces, the
    addresses of the bounce listener, and the Feedback-ID field of outgoing mail."""

    domain: str  # "" = off: mail keeps its sender as MAIL FROM
    local: str  # bounces+TOKEN@domain
    complaints: tuple[str, ...]  # local parts at domain that take feedback (ARF) reports
    max_report_size: int  # the bounce listener's message size limit
    feedback_id: str  # a template of FEEDBACK_FIELD fields and text; "" = no Feedback-ID


# a field of return_path.feedback_id: {sender_domain}, {account}, {stream} or {meta.KEY}
FEEDBACK_FIELD = re.compile(r"\{(sender_domain|account|stream|meta\.[A-Za-z0-9_.-]{1,64})\}")
_FEEDBACK_TEXT = re.compile(r"^[\x21-\x7a\x7c\x7e]*$")  # printable, no space, '{' or '}'
_LOCAL_PART = re.compile(r"^[A-Za-z0-9!#$%&'*/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*/=?^_`{|}~-]+)*$")


WEBHOOK_TIMEOUT_MAX = 300.0  # seconds: an endpoint's timeout, from the config or relayctl
WEBHOOK_BATCH_MAX = 10_000  # events in one POST (webhooks.max_batch)
WEBHOOK_CONCURRENCY_MAX = 256  # POSTs in flight to one endpoint (webhooks.max_concurrency)


Pools = dict[str, tuple[Source, ...]]


@dataclass(frozen=True)
class WarmupSchedule:
    """[warmup.schedules.NAME]: a source's volume per provider per day, day 1 first; after
    the last day of a provider's list the source has no quota there."""

    days: tuple[int, ...]
    per_provider: dict[str, tuple[int, ...]]  # provider -> its own list instead of days


WarmupSchedules = dict[str, WarmupSchedule]
WARMUP_MAX_DAYS = 365  # entries of one schedule's list


@dataclass(frozen=True)
class Reputation:
    """[reputation]: the pools' source addresses watched on DNS blacklists."""

    enabled: bool
    zones: tuple[str, ...]  # DNSBL zones, lower case, no trailing dot
    interval: float  # seconds between two rounds of lookups
    on_listing: str  # "report": an event only; "remove": also out of its pools until delisted

    @property
    def active(self) -> bool:
        return self.enabled and bool(self.zones)


REPUTATION_ZONES = ("zen.spamhaus.org", "bl.spamcop.net", "b.barracudacentral.org")
REPUTATION_ACTIONS = ("report", "remove")


@dataclass(frozen=True)
class Unsubscribe:
    """[unsubscribe]: one-click unsubscribe (RFC 8058). The links that bulk mail carries, and
    the route on relayd's HTTP listeners that they lead to (relayd.feedback.unsubscribe)."""

    url: str  # the public base URL, ending in "/": the token follows; "" = off
    mailto: str  # an address for unsubscribe mail, "" = none
    scope: str  # "sender_domain", "global" or "key": whose mail an unsubscribe stops
    max_age: float  # seconds a link works
    streams: tuple[str, ...]  # the streams whose mail gets the headers

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    @property
    def path(self) -> str:
        """The URL's path, as relayd's HTTP listener sees it (a reverse proxy keeps it)."""
        return urlsplit(self.url).path


# An unsubscribe URL's path: the characters that reach the route as written (the HTTP server
# decodes %XX), ending in "/", outside the API's own routes.
_URL_PATH = re.compile(r"^/(?:[A-Za-z0-9._~-]+/)*$")
_API_PATHS = ("/v1/", "/api/")
_LOOPBACK_NAMES = ("localhost",)
_MAILTO_LOCAL = re.compile(r"^[A-Za-z0-9._+-]+$")  # nothing a mailto: URI would have to escape
# At most this long, so that a List-Unsubscribe line stays within RFC 5322's 998 characters
# with the longest token (a 256-character recipient and a 253-character sender domain).
URL_MAX, MAILTO_MAX = 200, 128


@dataclass(frozen=True)
class Reports:
    """[reports]: the campaign report pages on relayd's HTTP listener (relayd.ingress.api.
    reports) and the login links relayctl report --url prints for them."""

    url: str = ""  # the listener's base URL as the operator's browser reaches it; "" = derived
    login_max_age: float = 900.0  # seconds a login link works
    session_max_age: float = 8 * 3600.0  # seconds the cookie it sets works

    def base_url(self, listeners: Iterable[Listener]) -> str:
        """Where the pages are: ``url``, or the first http/https listener's own address (a
        wildcard address as loopback), without a trailing "/"."""
        if self.url:
            return self.url.rstrip("/")
        for lsn in listeners:
            if lsn.kind in HTTP_KINDS:
                wild = {"0.0.0.0": "127.0.0.1", "::": "::1"}
                where = HostPort(wild.get(lsn.address.host, lsn.address.host), lsn.address.port)
                return f"{'https' if lsn.kind == 'https' else 'http'}://{where}"
        return ""


@dataclass(frozen=True)
class Tracking:
    """[tracking]: the open pixel and rewritten links of HTML mail, served by relayd's HTTP
    listener under ``base_url`` (relayd.tracking), and how hits by machines are told apart."""

    enabled: bool
    base_url: str  # the tracking host's public URL, no trailing "/"; "" when off
    opens: bool
    clicks: bool
    count_bots: bool  # bots' hits counted (engagement, unique) as people's; always flagged
    trusted_proxies: tuple[Network, ...]  # whose X-Forwarded-For names the client
    apple_networks: tuple[Network, ...]  # Apple Mail Privacy Protection's proxies
    apple_user_agents: tuple[str, ...]  # RE2 patterns of their User-Agent
    scanner_user_agents: tuple[str, ...]  # RE2 patterns (case-insensitive) of link scanners'
    head_is_bot: bool  # a HEAD request is a scanner's (people's browsers GET)
    click_window: float  # a click this soon after delivery is a scanner's; 0: no such rule
    untracked: tuple[str, ...]  # URL prefixes never rewritten ([unsubscribe] url among them)

    @property
    def path(self) -> str:
        """The base URL's path, as relayd's HTTP listener sees it: "" or "/t"."""
        return urlsplit(self.base_url).path


# Apple's egress range (its Mail Privacy Protection proxies fetch every image at delivery) and
# the bare User-Agent they send; link scanners of mail gateways, by their User-Agent.
APPLE_NETWORKS = ("17.0.0.0/8",)
APPLE_USER_AGENTS = (r"^Mozilla/5\.0$",)
SCANNER_USER_AGENTS = (
    "barracuda",
    "mimecast",
    "proofpoint",
    "bingpreview",
    "safelinks",
    "microsoft office",
    "forcepoint",
    "symantec",
    "trend ?micro",
    "cisco",
    "sophos",
    "fireeye",
)
TRACKING_URL_MAX = 200


@dataclass(frozen=True)
class Backup:
    """[backup]: scheduled backups of the spool, taken by the queue process (relayd.spool.
    backup, as relayctl backup); dir None: none."""

    dir: Path | None = None
    interval: float = 6 * 3600.0
    keep: int = 7


@dataclass(frozen=True)
class Alerts:
    """[alerts]: built-in alerting (relayd.alerts), the shipped Prometheus rules' conditions."""

    enabled: bool = True
    interval: float = 30.0  # seconds between evaluations
    resolve_for: float = 300.0  # a firing alert resolves after this long below its level
    resolve_ratio: float = 0.8  # ... that level: threshold * resolve_ratio
    mail_to: str = ""  # "" = events only
    mail_from: str = ""  # "" = relayd@<server.hostname>
    rules: tuple[Rule, ...] = RULES


@dataclass(frozen=True)
class Monitoring:
    """[monitoring]: the queue process's operations listener (relayd.metrics): /metrics,
    /healthz, /readyz."""

    address: HostPort | None = HostPort("127.0.0.1", 9465)  # None: no listener
    max_sites: int = 50  # sites named in per-site metrics, by activity; the rest are "other"
    refresh: float = 5.0  # the spool-backed gauges are read at most this often
    ready_timeout: float = 2.0  # /readyz and the watchdog: how long a loop may take to answer


@dataclass(frozen=True)
class Config:
    """The whole file, a dataclass per TOML table; each component is given its own tables."""

    path: Path
    server: Server
    listeners: tuple[Listener, ...]
    tls: Tls
    auth: Auth
    dkim: Dkim
    ingress: Ingress
    dns: Dns
    delivery: Delivery
    routes: Routes
    shaping: ShapingRules
    retry: Retry
    pools: Pools
    events: Events
    api: Api
    campaigns: Campaigns
    webhooks: Webhooks
    suppression: Suppression
    bounces: Bounces
    reputation: Reputation
    unsubscribe: Unsubscribe
    return_path: ReturnPath
    warmup: WarmupSchedules
    tracking: Tracking
    monitoring: Monitoring = Monitoring()
    reports: Reports = Reports()
    backup: Backup = Backup()
    alerts: Alerts = Alerts()


class _Section:
    """Reads keys of one TOML table, remembering which were used to flag unknown ones."""

    def __init__(self, path: Path, prefix: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(path, prefix, "must be a table")
        self.path, self.prefix, self.data, self.used = path, prefix, data, set[str]()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def get(self, name: str, default: Any, kind: type | tuple[type, ...]) -> Any:
        self.used.add(name)
        value = self.data.get(name, default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            names = (
                kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            )
            raise ConfigError(self.path, self.key(name), f"must be a {names}, got {value!r}")
        return value

    def positive_int(
        self, name: str, default: int, minimum: int = 1, maximum: int = MAX_COUNT
    ) -> int:
        value = self.get(name, default, int)
        if not minimum <= value <= maximum:
            raise ConfigError(
                self.path, self.key(name), f"must be from {minimum} to {maximum}, got {value}"
            )
        return value

    def port(self, name: str, default: int) -> int:
        """A TCP port: anything else would be wrapped modulo 65536 by the socket layer."""
        value = self.get(name, default, int)
        if not 0 < value < 65536:
            raise ConfigError(self.path, self.key(name), f"must be a port 1-65535, got {value}")
        return value

    def duration(self, name: str, default: str | int, allow_zero: bool = False) -> float:
        """Seconds, finite and at most MAX_DURATION: a nan delay never comes due."""
        raw = self.get(name, default, (str, int, float))
        seconds = parse_duration(raw)
        if seconds is None or math.isnan(seconds):
            raise ConfigError(
                self.path, self.key(name), f"must be a duration like '30s', '5m', '2h', got {raw!r}"
            )
        if seconds < 0 or (seconds == 0 and not allow_zero):
            least = "of 0 or more" if allow_zero else "more than 0"
            raise ConfigError(self.path, self.key(name), f"must be a duration {least}, got {raw!r}")
        if seconds > MAX_DURATION:
            raise ConfigError(
                self.path, self.key(name), f"must be a duration of at most 365d, got {raw!r}"
            )
        return seconds

    def factor(
        self, name: str, default: float, low: float, high: float, high_included: bool = True
    ) -> float:
        """A finite number in [low, high] (or [low, high) when not ``high_included``)."""
        value = self.get(name, default, float)
        below_high = value <= high if high_included else value < high
        if not (math.isfinite(value) and low <= value and below_high):
            span = f"[{low:g}, {high:g}{']' if high_included else ')'}"
            raise ConfigError(self.path, self.key(name), f"must be in {span}, got {value!r}")
        return value

    def size(
        self, name: str, default: str, maximum: int = MAX_SIZE, allow_zero: bool = False
    ) -> int:
        raw = self.get(name, default, (str, int))
        m = _SIZE.match(str(raw))
        if not m or (int(m.group(1)) <= 0 and not allow_zero):
            raise ConfigError(self.path, self.key(name), f"must be a size like '25MB', got {raw!r}")
        size = int(m.group(1)) * _SIZE_UNITS[m.group(2).lower() if m.group(2) else None]
        if size > maximum:
            limit = f"{maximum // 1024**2}MB"
            raise ConfigError(self.path, self.key(name), f"must be at most {limit}, got {raw!r}")
        return size

    def rate(self, name: str) -> Rate | None:
        raw = self.get(name, "", str)
        if not raw:
            return None
        try:
            return parse_rate(raw)
        except ValueError as exc:
            raise ConfigError(self.path, self.key(name), f"{exc} or ''") from None

    def table(self, name: str) -> _Section:
        self.used.add(name)
        return _Section(self.path, self.key(name), self.data.get(name, {}))

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(self.path, self.key(unknown[0]), "unknown key")


def parse_rate(raw: str) -> Rate:
    """'100/min' -> Rate(100, 60); ValueError naming the expected form otherwise."""
    m = _RATE.match(raw)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"must be a rate like '100/min', got {raw!r}")
    rate = Rate(float(m.group(1)), _RATE_PERIODS[m.group(2)])
    if not rate.count / rate.period <= MAX_RATE:  # inf too: a long string of digits
        raise ValueError(f"must be at most 1000000/s, got {raw!r}")
    return rate


def parse_duration(raw: str | int | float) -> float | None:
    if isinstance(raw, int | float):
        return float(raw)
    m = _DURATION.match(raw)
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)] if m else None


def parse_hostport(raw: str, default_port: int | None) -> HostPort:
    """Parse ``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address."""
    m = re.match(r"^\[([^\]]+)\](?::(\d+))?$", raw)
    if m:
        host, port = m.group(1), m.group(2)
    elif raw.count(":") == 1:
        host, port = raw.split(":")
    else:
        host, port = raw, None
    if not host or (port is None and default_port is None):
        raise ValueError(f"expected host:port, got {raw!r}")
    number = int(port) if port is not None and port.isdigit() else default_port
    if (port is not None and not port.isdigit()) or number is None or not 0 < number < 65536:
        raise ValueError(f"bad port in {raw!r}")
    return HostPort(host, number)


def _same_socket(a: HostPort, b: HostPort) -> bool:
    """Whether two listen addresses contend for one port: the same address, or a wildcard
    (0.0.0.0, ::) and an address of its family (IPv6 sockets are bound V6ONLY, so :: and
    0.0.0.0 do not). Host names are compared as written: they are resolved only at bind."""
    if a.port != b.port:
        return False
    try:
        ip_a, ip_b = ipaddress.ip_address(a.host), ipaddress.ip_address(b.host)
    except ValueError:
        return a.host.lower().rstrip(".") == b.host.lower().rstrip(".")
    if ip_a.version != ip_b.version:
        return False
    return ip_a == ip_b or ip_a.is_unspecified or ip_b.is_unspecified


def _hostport(section: _Section, name: str, raw: Any, default_port: int | None) -> HostPort:
    if not isinstance(raw, str):
        raise ConfigError(section.path, section.key(name), f"must be a string, got {raw!r}")
    try:
        return parse_hostport(raw, default_port)
    except ValueError as exc:
        raise ConfigError(section.path, section.key(name), str(exc)) from None


def _file(section: _Section, name: str) -> Path | None:
    """A readable file's path, relative to the config file; None when the key is empty."""
    raw = section.get(name, "", str)
    if not raw:
        return None
    path = (section.path.parent / raw).resolve()
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ConfigError(section.path, section.key(name), f"cannot read file {path}")
    return path


def _shaping(section: _Section, base: Shaping | None, pools: dict[str, Any]) -> Shaping:
    d = base or Shaping(20, 10, None, None, 100, "")

    def pick(name: str, value: Any) -> Any:
        return value if name in section.data else getattr(d, name)

    shaping = Shaping(
        max_connections=section.positive_int("max_connections", d.max_connections),
        max_connections_per_source=section.positive_int(
            "max_connections_per_source", d.max_connections_per_source
        ),
        max_rate=pick("max_rate", section.rate("max_rate")),
        max_rate_per_source=pick("max_rate_per_source", section.rate("max_rate_per_source")),
        max_messages_per_connection=section.positive_int(
            "max_messages_per_connection", d.max_messages_per_connection
        ),
        pool=section.get("pool", d.pool, str),
        transactional_connections=section.positive_int(
            "transactional_connections", d.transactional_connections, minimum=0, maximum=1000
        ),
    )
    if shaping.pool and shaping.pool not in pools:
        raise ConfigError(section.path, section.key("pool"), f"no pool named {shaping.pool!r}")
    section.finish()
    return shaping


def load(path: str | Path) -> Config:
    """Read and validate ``path``; raises ConfigError."""
    path = Path(path)
    return _build(path, _read_toml(path))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "not UTF-8 text") from None


def _build(path: Path, raw: dict[str, Any]) -> Config:
    top = _Section(path, "", raw)

    server = top.table("server")
    hostname = server.get("hostname", "localhost", str)
    if not _HOSTNAME.match(hostname):
        raise ConfigError(path, "server.hostname", f"not a valid host name: {hostname!r}")
    spool_raw = server.get("spool_path", "spool/relayd.sqlite", str)
    spool_path = (path.parent / spool_raw).resolve()
    log_level = server.get("log_level", "info", str).lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(path, "server.log_level", "must be debug, info, warning or error")
    shutdown_timeout = server.duration("shutdown_timeout", "30s")
    min_free_space = server.size("min_free_space", "100MB", MAX_DISK, allow_zero=True)
    max_spool_size = server.size("max_spool_size", "0", MAX_DISK, allow_zero=True)
    server.finish()

    top.used.add("listeners")
    listeners_raw = raw.get("listeners", [{"address": "127.0.0.1:25", "kind": "relay"}])
    if not isinstance(listeners_raw, list) or not listeners_raw:
        raise ConfigError(path, "listeners", "must be a non-empty array of tables")
    listeners = []
    for i, item in enumerate(listeners_raw):
        sec = _Section(path, f"listeners[{i}]", item)
        address = _hostport(sec, "address", sec.get("address", "", str), None)
        kind = sec.get("kind", "relay", str)
        if kind not in LISTENER_KINDS:
            raise ConfigError(
                path, sec.key("kind"), f"unknown kind {kind!r}: {', '.join(LISTENER_KINDS)}"
            )
        sec.finish()
        for j, other in enumerate(listeners):
            if _same_socket(other.address, address):
                raise ConfigError(
                    path,
                    sec.key("address"),
                    f"{address} overlaps listeners[{j}].address ({other.address}):"
                    " only one of them could listen",
                )
        listeners.append(Listener(address, kind))

    tls_sec = top.table("tls")
    cert_file = _file(tls_sec, "cert_file")
    key_file = _file(tls_sec, "key_file")
    if bool(cert_file) != bool(key_file):
        raise ConfigError(path, "tls", "cert_file and key_file go together")
    tls = Tls(cert_file, key_file, tls_sec.get("min_version", "1.2", str))
    if tls.min_version not in ("1.2", "1.3"):
        raise ConfigError(path, "tls.min_version", "must be '1.2' or '1.3'")
    tls_sec.finish()
    for i, listener in enumerate(listeners):
        if listener.kind not in ("relay", "http", "bounce") and tls.cert_file is None:
            raise ConfigError(
                path, f"listeners[{i}].kind", f"a {listener.kind} listener needs tls.cert_file"
            )

    auth_sec = top.table("auth")
    auth = Auth(
        users_file=(path.parent / auth_sec.get("users_file", "users.json", str)).resolve(),
        failure_delay=auth_sec.duration("failure_delay", "1s", allow_zero=True),
        max_failures=auth_sec.positive_int("max_failures", 5),
        lockout=auth_sec.duration("lockout", "15m"),
    )
    auth_sec.finish()

    dkim_sec = top.table("dkim")
    dkim_keys = []
    for i, item in enumerate(dkim_sec.get("keys", [], list)):
        k = _Section(path, f"dkim.keys[{i}]", item)
        domain = k.get("domain", "", str).lower().rstrip(".")
        if not _HOSTNAME.match(domain):
            raise ConfigError(path, k.key("domain"), f"not a domain: {domain!r}")
        selector = k.get("selector", "", str)
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", selector):
            raise ConfigError(path, k.key("selector"), f"not a selector: {selector!r}")
        algorithm = k.get("algorithm", "rsa-sha256", str)
        if algorithm not in ("rsa-sha256", "ed25519-sha256"):
            raise ConfigError(path, k.key("algorithm"), "must be rsa-sha256 or ed25519-sha256")
        key_path = _file(k, "key_file")
        if key_path is None:
            raise ConfigError(path, k.key("key_file"), "required")
        k.finish()
        dkim_keys.append(DkimKey(domain, selector, algorithm, key_path, k.prefix))
    headers = dkim_sec.get("headers", list(DKIM_HEADERS), list)
    if "from" not in {str(h).lower() for h in headers}:
        raise ConfigError(path, "dkim.headers", "must include From (RFC 6376 5.4)")
    dkim = Dkim(
        keys=tuple(dkim_keys),
        default_domain=dkim_sec.get("default_domain", "", str).lower(),
        parent_fallback=dkim_sec.get("parent_fallback", True, bool),
        headers=tuple(str(h) for h in headers),
    )
    if dkim.default_domain and dkim.default_domain not in {k.domain for k in dkim_keys}:
        raise ConfigError(path, "dkim.default_domain", "no key configured for that domain")
    dkim_sec.finish()

    ingress = top.table("ingress")
    nets = []
    for i, net in enumerate(ingress.get("trusted_networks", ["127.0.0.1/32", "::1/128"], list)):
        try:
            nets.append(ipaddress.ip_network(net, strict=False))
        except (ValueError, TypeError):
            raise ConfigError(
                path, f"ingress.trusted_networks[{i}]", f"not a CIDR: {net!r}"
            ) from None
    max_message_size = ingress.size("max_message_size", "25MB")
    max_recipients = ingress.positive_int("max_recipients", 1000)
    max_errors = ingress.positive_int("max_errors", 10)
    session_timeout = ingress.duration("session_timeout", "300s")
    max_session_time = ingress.duration("max_session_time", "30m")
    max_connections = ingress.positive_int("max_connections", 1000)
    max_connections_per_ip = ingress.positive_int("max_connections_per_ip", 50)
    max_line_length = ingress.positive_int("max_line_length", 998, minimum=78)
    bare_newlines = ingress.get("bare_newlines", "normalize", str)
    if bare_newlines not in ("normalize", "reject"):
        raise ConfigError(path, "ingress.bare_newlines", "must be 'normalize' or 'reject'")
    metadata_headers = []
    for i, name in enumerate(ingress.get("metadata_headers", ["X-Relayd-Meta"], list)):
        if not isinstance(name, str) or not _FIELD_NAME.match(name):
            raise ConfigError(
                path,
                f"ingress.metadata_headers[{i}]",
                f"not a header field name (or a prefix ending in '*'): {name!r}",
            )
        metadata_headers.append(name)
    keep_metadata_headers = ingress.get("keep_metadata_headers", False, bool)
    ingress.finish()

    dns = top.table("dns")
    nameservers = tuple(
        _hostport(dns, f"nameservers[{i}]", ns, 53)
        for i, ns in enumerate(dns.get("nameservers", [], list))
    )
    dns_timeout = dns.duration("timeout", "5s")
    dns.finish()

    schedules = _warmup_schedules(top.table("warmup"))
    warming: dict[str, tuple[str, str, date | None]] = {}  # address -> (pool, schedule, start)
    pools_sec = top.table("pools")
    pools: Pools = {}
    for name in pools_sec.data:
        pool = pools_sec.table(name)
        sources = []
        for i, src in enumerate(pool.get("sources", [], list)):
            s = _Section(path, f"{pool.key('sources')}[{i}]", src)
            address = s.get("address", "", str)
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ConfigError(
                    path, s.key("address"), f"not an IP address: {address!r}"
                ) from None
            ehlo = s.get("ehlo", hostname, str)
            if not _HOSTNAME.match(ehlo):
                raise ConfigError(path, s.key("ehlo"), f"not a valid host name: {ehlo!r}")
            weight = s.positive_int("weight", 1)
            warmup, warmup_start = _source_warmup(s, address, name, schedules, warming)
            s.finish()
            sources.append(Source(address, ehlo, weight, warmup, warmup_start))
        if not sources:
            raise ConfigError(path, pool.key("sources"), "a pool needs at least one source")
        pool.finish()
        pools[name] = tuple(sources)
    pools_sec.finish()

    delivery = top.table("delivery")
    delivery_port = delivery.port("port", 25)
    connect_timeout = delivery.duration("connect_timeout", "30s")
    command_timeout = delivery.duration("command_timeout", "300s")
    idle_connection_time = delivery.duration("idle_connection_time", "2s")
    starttls = delivery.get("starttls", "may", str)
    if starttls not in ("may", "never"):
        raise ConfigError(path, "delivery.starttls", "must be 'may' or 'never'")
    max_active = delivery.positive_int("max_active", 2000, minimum=10)
    delivery.finish()

    routes_sec = top.table("routes")
    routes = {
        dom.lower(): _hostport(routes_sec, dom, target, 25)
        for dom, target in routes_sec.data.items()
    }
    routes_sec.used.update(routes_sec.data)

    shaping_sec = top.table("shaping")
    default = _shaping(shaping_sec.table("default"), None, pools)
    domains_sec = shaping_sec.table("domains")
    domains = {
        dom.lower(): _shaping(domains_sec.table(dom), default, pools) for dom in domains_sec.data
    }
    domains_sec.finish()
    shaping_rules = _adaptive(shaping_sec, default, domains, pools)
    shaping_sec.finish()

    retry_sec = top.table("retry")
    retry = Retry(
        first=retry_sec.duration("first", "5m"),
        multiplier=retry_sec.factor("multiplier", 2.0, 1.0, MAX_MULTIPLIER),
        max_interval=retry_sec.duration("max_interval", "1h"),
        jitter=retry_sec.factor("jitter", 0.1, 0.0, 1.0, high_included=False),
        max_age=retry_sec.duration("max_age", "5d"),
        delay_warning=retry_sec.duration("delay_warning", 0, allow_zero=True),
    )
    retry_sec.finish()

    events_sec = top.table("events")
    events_retention = events_sec.duration("retention", "7d")
    events_sec.finish()

    api_sec = top.table("api")
    api = Api(
        max_recipients=api_sec.positive_int("max_recipients", 1000, maximum=10_000),
        max_body_size=api_sec.size("max_body_size", "50MB", maximum=2 * MAX_SIZE),
    )
    api_sec.finish()

    camp_sec = top.table("campaigns")
    campaigns = Campaigns(
        batch=camp_sec.positive_int("batch", 500, maximum=10_000),
        poll_interval=camp_sec.duration("poll_interval", "1s"),
        min_wait=camp_sec.duration("min_wait", "10m"),
    )
    if not 0.05 <= campaigns.poll_interval <= 60:
        raise ConfigError(path, "campaigns.poll_interval", "must be from 0.05s to 1m")
    if not 1 <= campaigns.min_wait <= 86400:
        raise ConfigError(path, "campaigns.min_wait", "must be from 1s to 1d")
    camp_sec.finish()

    webhooks = _webhooks(top.table("webhooks"))

    sup_sec = top.table("suppression")
    suppression = Suppression(
        smtp=_choice(sup_sec, "smtp", "refuse", ("refuse", "drop")),
        bounce_ttl=sup_sec.duration("bounce_ttl", "30d", allow_zero=True),
        bounce_scope=_choice(sup_sec, "bounce_scope", "global", SUPPRESSION_SCOPES),
        complaint_scope=_choice(sup_sec, "complaint_scope", "sender_domain", SUPPRESSION_SCOPES),
    )
    sup_sec.finish()
    bounces = _bounces(top.table("bounces"))
    reputation = _reputation(top.table("reputation"))
    unsubscribe = _unsubscribe(top.table("unsubscribe"), listeners)
    return_path = _return_path(top.table("return_path"))
    reports = _reports(top.table("reports"))
    monitoring = _monitoring(top.table("monitoring"))
    tracking = _tracking(top.table("tracking"), listeners, unsubscribe)
    backup = _backup(top.table("backup"), spool_path)
    for i, listener in enumerate(listeners):
        if listener.kind == "bounce" and not return_path.domain:
            raise ConfigError(
                path, f"listeners[{i}].kind", "a bounce listener needs return_path.domain"
            )
    alerts = _alerts(top.table("alerts"), hostname)
    top.finish()

    return Config(
        path=path,
        server=Server(
            hostname, spool_path, min_free_space, max_spool_size, log_level, shutdown_timeout
        ),
        listeners=tuple(listeners),
        tls=tls,
        auth=auth,
        dkim=dkim,
        ingress=Ingress(
            trusted_networks=tuple(nets),
            max_message_size=max_message_size,
            max_recipients=max_recipients,
            max_errors=max_errors,
            session_timeout=session_timeout,
            max_session_time=max_session_time,
            max_connections=max_connections,
            max_connections_per_ip=max_connections_per_ip,
            max_line_length=max_line_length,
            bare_newlines=bare_newlines,
            metadata_headers=tuple(metadata_headers),
            keep_metadata_headers=keep_metadata_headers,
        ),
        dns=Dns(nameservers, dns_timeout),
        delivery=Delivery(
            port=delivery_port,
            connect_timeout=connect_timeout,
            command_timeout=command_timeout,
            idle_connection_time=idle_connection_time,
            starttls=starttls,
            max_active=max_active,
        ),
        routes=Routes(routes),
        shaping=shaping_rules,
        retry=retry,
        pools=pools,
        events=Events(events_retention),
        api=api,
        campaigns=campaigns,
        webhooks=webhooks,
        monitoring=monitoring,
        suppression=suppression,
        bounces=bounces,
        reputation=reputation,
        unsubscribe=unsubscribe,
        return_path=return_path,
        warmup=schedules,
        reports=reports,
        tracking=tracking,
        backup=backup,
        alerts=alerts,
    )


def _backup(sec: _Section, spool_path: Path) -> Backup:
    raw = sec.get("dir", "", str)
    directory = (sec.path.parent / raw).resolve() if raw else None
    if directory is not None and directory == spool_path.parent:
        problem = "must not be the spool's own directory (a backup must outlive its loss)"
        raise ConfigError(sec.path, sec.key("dir"), problem)
    interval = sec.duration("interval", "6h")
    if interval < 1:
        raise ConfigError(sec.path, sec.key("interval"), f"must be at least 1s, got {interval:g}s")
    backup = Backup(directory, interval, sec.positive_int("keep", 7, maximum=1000))
    sec.finish()
    return backup


def _reports(sec: _Section) -> Reports:
    url = sec.get("url", "", str)
    if url:  # the login link's token rides in it, and its cookie: https:// unless loopback
        problem = _public_url_problem(url, "https://relay.example.com:8025")
        if not problem and urlsplit(url).path.strip("/"):
            problem = "must be the listener's base URL, with no path"
        if problem:
            raise ConfigError(sec.path, sec.key("url"), f"{problem}, got {url!r}")
    login = sec.duration("login_max_age", "15m")
    session = sec.duration("session_max_age", "8h")
    for name, value, low, high in (
        ("login_max_age", login, 60, 86400),
        ("session_max_age", session, 60, 7 * 86400),
    ):
        if not low <= value <= high:
            problem = f"must be from {_human(low)} to {_human(high)}, got {_human(value)}"
            raise ConfigError(sec.path, sec.key(name), problem)
    sec.finish()
    return Reports(url, login, session)


def _return_path(sec: _Section) -> ReturnPath:
    domain = sec.get("domain", "", str).lower().rstrip(".")
    if domain and not _HOSTNAME.match(domain):
        raise ConfigError(sec.path, sec.key("domain"), f"not a domain: {domain!r}")
    local = sec.get("local", "bounces", str)
    # the token takes 30 of the 64 octets of a local part (RFC 5321 4.5.3.1.1): "+" and 29
    if not _LOCAL_PART.match(local) or len(local) > 34:
        raise ConfigError(
            sec.path,
            sec.key("local"),
            f"must be a local part of 1 to 34 characters without '+', got {local!r}",
        )
    complaints: list[str] = []
    for i, name in enumerate(sec.get("complaints", ["fbl"], list)):
        key = f"{sec.key('complaints')}[{i}]"
        if not isinstance(name, str) or not _LOCAL_PART.match(name) or len(name) > 64:
            raise ConfigError(sec.path, key, f"must be a local part without '+', got {name!r}")
        if name.lower() == local.lower() or name.lower() in complaints:
            raise ConfigError(sec.path, key, f"{name!r} is named twice (or is return_path.local)")
        complaints.append(name.lower())
    template = sec.get("feedback_id", "", str)
    text = FEEDBACK_FIELD.sub("", template)
    if len(template) > 200 or not _FEEDBACK_TEXT.match(text):
        raise ConfigError(
            sec.path,
            sec.key("feedback_id"),
            "must be at most 200 printable characters: text, ':' and the fields {sender_domain},"
            f" {{account}}, {{stream}} and {{meta.KEY}}, got {template!r}",
        )
    paths = ReturnPath(
        domain=domain,
        local=local,
        complaints=tuple(complaints),
        max_report_size=sec.size("max_report_size", "10MB"),
        feedback_id=template,
    )
    sec.finish()
    return paths


def _choice(sec: _Section, name: str, default: str, choices: tuple[str, ...]) -> str:
    value = sec.get(name, default, str)
    if value not in choices:
        raise ConfigError(
            sec.path, sec.key(name), f"must be one of {', '.join(choices)}, got {value!r}"
        )
    return value


def _human(seconds: float) -> str:
    """A duration as the config would write it: '10ms', '60s', '30d'."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s" if seconds >= 1 else f"{seconds * 1000:g}ms"


def _webhooks(sec: _Section) -> Webhooks:
    def within(name: str, default: str, low: float, high: float, allow_zero: bool = False) -> float:
        value = sec.duration(name, default, allow_zero=allow_zero)
        if not low <= value <= high:
            span = f"from {_human(low)} to {_human(high)}"
            raise ConfigError(sec.path, sec.key(name), f"must be {span}, got {_human(value)}")
        return value

    hooks = Webhooks(
        poll_interval=within("poll_interval", "500ms", 0.01, 60),
        timeout=within("timeout", "10s", 0.1, WEBHOOK_TIMEOUT_MAX),
        max_batch=sec.positive_int("max_batch", 1000, maximum=WEBHOOK_BATCH_MAX),
        max_concurrency=sec.positive_int("max_concurrency", 16, maximum=WEBHOOK_CONCURRENCY_MAX),
        retry_first=within("retry_first", "5s", 0.01, 86400),
        retry_max_interval=within("retry_max_interval", "1h", 0.01, 7 * 86400),
        retry_jitter=sec.factor("retry_jitter", 0.2, 0.0, 1.0, high_included=False),
        retry_for=within("retry_for", "3d", 0.01, 30 * 86400),
        rotation_overlap=within("rotation_overlap", "24h", 0, 30 * 86400, allow_zero=True),
    )
    if hooks.retry_max_interval < hooks.retry_first:
        raise ConfigError(sec.path, sec.key("retry_max_interval"), "must be at least retry_first")
    sec.finish()
    return hooks


def _bounces(sec: _Section) -> Bounces:
    shipped = _file(sec, "classes_file") or DEFAULT_BOUNCE_CLASSES
    local = _file(sec, "local_classes_file")
    suppress = []
    for i, name in enumerate(sec.get("suppress_classes", list(HARD_CLASSES), list)):
        if name not in BOUNCE_CLASSES:
            raise ConfigError(sec.path, f"{sec.key('suppress_classes')}[{i}]", _unknown(name))
        suppress.append(name)
    sec.finish()
    rules = (*(_bounce_rules(local) if local else ()), *_bounce_rules(shipped))
    return Bounces(shipped, local, rules, frozenset(suppress))


def _bounce_rules(path: Path) -> list[BounceRule]:
    """The rules of one bounce classes file, in order; a mistake names the file and the rule."""
    top = _Section(path, "", _read_toml(path))
    rules = []
    for i, item in enumerate(top.get("rules", [], list)):
        sec = _Section(path, f"rules[{i}]", item)
        cls = sec.get("class", "", str)
        if cls not in BOUNCE_CLASSES:
            raise ConfigError(path, sec.key("class"), _unknown(cls))
        patterns = _pattern(sec, "code"), _pattern(sec, "enhanced"), _pattern(sec, "text")
        sec.finish()
        if all(p is None for p in patterns):
            raise ConfigError(path, sec.prefix, "needs at least one of code, enhanced and text")
        rules.append(BounceRule(cls, *patterns))
    top.finish()
    return rules


def _unknown(name: object) -> str:
    return f"unknown class {name!r}, not one of {', '.join(BOUNCE_CLASSES)}"


def _pattern(sec: _Section, name: str) -> str | None:
    """A rule's regular expression (``code`` may be a number), None when not given."""
    if name not in sec.data:
        return None
    raw = sec.get(name, "", (str, int) if name == "code" else str)
    if isinstance(raw, int):
        if not 400 <= raw <= 599:
            raise ConfigError(sec.path, sec.key(name), f"must be from 400 to 599, got {raw}")
        raw = str(raw)
    try:
        re2.compile(raw, _RE2_CHECK)
    except re2.error as exc:
        problem = exc.args[0].decode() if isinstance(exc.args[0], bytes) else str(exc)
        raise ConfigError(sec.path, sec.key(name), f"not a regular expression: {problem}") from None
    return raw


def _reputation(sec: _Section) -> Reputation:
    zones: list[str] = []
    for i, raw in enumerate(sec.get("zones", list(REPUTATION_ZONES), list)):
        key = f"{sec.key('zones')}[{i}]"
        zone = raw.lower().rstrip(".") if isinstance(raw, str) else ""
        if not _HOSTNAME.match(zone) or "." not in zone:
            raise ConfigError(sec.path, key, f"not a DNS zone like 'zen.spamhaus.org': {raw!r}")
        if zone in zones:
            raise ConfigError(sec.path, key, f"{zone!r} is listed twice")
        zones.append(zone)
    interval = sec.duration("interval", "1h")
    if not 60 <= interval <= 7 * 86400:
        raise ConfigError(
            sec.path, sec.key("interval"), f"must be from 1m to 7d, got {_human(interval)}"
        )
    on_listing = sec.get("on_listing", "report", str)
    if on_listing not in REPUTATION_ACTIONS:
        raise ConfigError(
            sec.path, sec.key("on_listing"), f"must be 'report' or 'remove', got {on_listing!r}"
        )
    reputation = Reputation(sec.get("enabled", True, bool), tuple(zones), interval, on_listing)
    sec.finish()
    return reputation


# The providers in force when the file has no [shaping.providers] table: the large mailbox
# providers, each one receiving system whatever domain's MX names it (conf/relayd.toml).
DEFAULT_PROVIDERS = {
    "google": ("*.google.com", "*.googlemail.com"),
    "microsoft": ("*.mail.protection.outlook.com", "*.olc.protection.outlook.com"),
    "yahoo": ("*.yahoodns.net", "*.yahoo.com"),
    "apple": ("*.mail.icloud.com",),
}
DEFAULT_SHAPING_RULES = DEFAULT_PATH.parent / "shaping_rules.toml"  # the shipped rules
ADAPTIVE_ACTIONS = ("suspend", "rate")
HOLD_MAX = 7 * 86400.0  # the longest hold a rule may ask for (seconds)
_PROVIDER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_MX_PATTERN = re.compile(r"^[a-z0-9*?\[\]!._-]+$")


def _adaptive(
    sec: _Section, default: Shaping, domains: dict[str, Shaping], pools: dict[str, Any]
) -> ShapingRules:
    """The rest of [shaping]: the providers, and the adaptive rules that name them."""
    providers: dict[str, Provider] = {}
    if "providers" in sec.data:
        prov_sec = sec.table("providers")
        for name in prov_sec.data:
            providers[name] = _provider(prov_sec, name, default, pools)
        prov_sec.finish()
    else:
        for name, mx in DEFAULT_PROVIDERS.items():
            providers[name] = Provider(name, mx, default, _host_match(mx))
    adaptive = sec.get("adaptive", True, bool)
    shipped = _file(sec, "rules_file") or DEFAULT_SHAPING_RULES
    local = _file(sec, "local_rules_file")
    rules = [
        *(_adaptive_rules(local, providers, True) if local else ()),
        *_adaptive_rules(shipped, providers, False),
    ]
    seen: dict[str, str] = {}
    for path, key, rule in rules:
        if rule.name in seen:
            raise ConfigError(path, key, f"{rule.name!r} is the name of {seen[rule.name]} too")
        seen[rule.name] = f"{path}: {key.removesuffix('.name')}"
    return ShapingRules(
        default,
        domains,
        providers,
        tuple(rule for _, _, rule in rules),
        adaptive,
        shipped,
        local,
    )


def _provider(sec: _Section, name: str, default: Shaping, pools: dict[str, Any]) -> Provider:
    if not _PROVIDER_NAME.match(name):
        raise ConfigError(
            sec.path, sec.key(name), "a provider's name is lower-case letters, digits, - and _"
        )
    table = sec.table(name)
    mx: list[str] = []
    for i, raw in enumerate(table.get("mx", [], list)):
        pattern = raw.lower().rstrip(".") if isinstance(raw, str) else ""
        if not _MX_PATTERN.match(pattern) or not re.search(r"[a-z0-9]", pattern):
            raise ConfigError(
                sec.path,
                f"{table.key('mx')}[{i}]",
                f"not a host name pattern like '*.google.com': {raw!r}",
            )
        mx.append(pattern)
    if not mx:
        raise ConfigError(
            sec.path, table.key("mx"), "needs at least one pattern, like '*.google.com'"
        )
    return Provider(name, tuple(mx), _shaping(table, default, pools), _host_match(mx))


def _host_match(patterns: Iterable[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


def _adaptive_rules(
    path: Path, providers: dict[str, Provider], local: bool
) -> list[tuple[Path, str, AdaptiveRule]]:
    """The rules of one shaping rules file, in order; a mistake names the file and the rule. A
    rule of the shipped file for a provider the config does not have is left out (the operator
    may have removed it); in the operator's own file that is a mistake."""
    top = _Section(path, "", _read_toml(path))
    rules = []
    for i, item in enumerate(top.get("rules", [], list)):
        sec = _Section(path, f"rules[{i}]", item)
        name = sec.get("name", "", str)
        if not name.strip():
            raise ConfigError(path, sec.key("name"), "needs a name (it is in the events)")
        provider = sec.get("provider", "", str)
        known = provider == "*" or provider in providers
        if not known and (local or not provider):
            have = ", ".join(providers) or "none"
            raise ConfigError(
                path,
                sec.key("provider"),
                f"must be '*' or a provider of [shaping.providers] ({have}), got {provider!r}",
            )
        patterns = _pattern(sec, "code"), _pattern(sec, "enhanced"), _pattern(sec, "text")
        if all(p is None for p in patterns):
            raise ConfigError(path, sec.prefix, "needs at least one of code, enhanced and text")
        action = _choice(sec, "action", "", ADAPTIVE_ACTIONS)
        if "duration" not in sec.data:
            raise ConfigError(path, sec.key("duration"), "needs a duration, like '30m'")
        duration = sec.duration("duration", 0)
        if duration > HOLD_MAX:
            raise ConfigError(path, sec.key("duration"), "must be at most 7d")
        factor, connections = 1.0, None
        if action == "rate":
            factor = sec.factor("factor", 1.0, 0.0, 1.0)
            if "connections" in sec.data:
                connections = sec.positive_int("connections", 1, maximum=1000)
            if factor == 0.0 or (factor == 1.0 and connections is None):
                raise ConfigError(
                    path, sec.key("factor"), "needs a factor above 0 and below 1, or connections"
                )
        else:
            extra = [k for k in ("factor", "connections") if k in sec.data]
            if extra:
                raise ConfigError(path, sec.key(extra[0]), "only for action = 'rate'")
        sec.finish()
        if known:
            rule = AdaptiveRule(name, provider, *patterns, action, duration, factor, connections)
            rules.append((path, sec.key("name"), rule))
    top.finish()
    return rules


def _unsubscribe(sec: _Section, listeners: list[Listener]) -> Unsubscribe:
    url = sec.get("url", "", str)
    if url:
        problem = _unsubscribe_url_problem(url)
        if problem:
            raise ConfigError(sec.path, sec.key("url"), f"{problem}, got {url!r}")
        if not any(lsn.kind in HTTP_KINDS for lsn in listeners):
            raise ConfigError(
                sec.path,
                sec.key("url"),
                'needs an http or https listener ([[listeners]] kind = "https"), where the'
                " links lead",
            )
    mailto = sec.get("mailto", "", str)
    if mailto:
        local, _, domain = mailto.rpartition("@")
        if not _MAILTO_LOCAL.match(local) or not _HOSTNAME.match(domain):
            raise ConfigError(sec.path, sec.key("mailto"), f"not an address: {mailto!r}")
        if len(mailto) > MAILTO_MAX:
            raise ConfigError(sec.path, sec.key("mailto"), f"at most {MAILTO_MAX} characters")
        if not url:
            raise ConfigError(
                sec.path, sec.key("mailto"), "needs unsubscribe.url: the one-click link comes first"
            )
    scope = _choice(sec, "scope", "sender_domain", SUPPRESSION_SCOPES)
    max_age = sec.duration("max_age", "365d")
    if max_age < 86400:
        raise ConfigError(
            sec.path, sec.key("max_age"), f"must be from 1d to 365d, got {_human(max_age)}"
        )
    streams: list[str] = []
    for i, name in enumerate(sec.get("streams", ["bulk"], list)):
        key = f"{sec.key('streams')}[{i}]"
        if name not in ("transactional", "bulk"):
            raise ConfigError(sec.path, key, f"must be 'transactional' or 'bulk', got {name!r}")
        if name in streams:
            raise ConfigError(sec.path, key, f"{name!r} is listed twice")
        streams.append(name)
    sec.finish()
    return Unsubscribe(url, mailto, scope, max_age, tuple(streams))


def _tracking(sec: _Section, listeners: list[Listener], links: Unsubscribe) -> Tracking:
    enabled = sec.get("enabled", False, bool)
    base = sec.get("base_url", "", str).rstrip("/")
    if enabled and not base:
        raise ConfigError(sec.path, sec.key("base_url"), "required when tracking is enabled")
    if base:
        problem = _public_url_problem(base, "https://t.example.com") or _path_problem(base + "/")
        if not problem and len(base) > TRACKING_URL_MAX:
            problem = f"must be at most {TRACKING_URL_MAX} characters"
        if problem:
            raise ConfigError(sec.path, sec.key("base_url"), f"{problem}, got {base!r}")
    if enabled and not any(lsn.kind in HTTP_KINDS for lsn in listeners):
        raise ConfigError(
            sec.path,
            sec.key("enabled"),
            'needs an http or https listener ([[listeners]] kind = "https"), where the links lead',
        )
    untracked = [links.url] if links.enabled else []
    for i, raw in enumerate(sec.get("untracked", [], list)):
        if not isinstance(raw, str) or not raw.startswith(("http://", "https://")):
            problem = f"must be an http(s) URL prefix, got {raw!r}"
            raise ConfigError(sec.path, f"{sec.key('untracked')}[{i}]", problem)
        untracked.append(raw)
    tracking = Tracking(
        enabled=enabled,
        base_url=base,
        opens=sec.get("opens", True, bool),
        clicks=sec.get("clicks", True, bool),
        count_bots=sec.get("count_bots", False, bool),
        trusted_proxies=_networks(sec, "trusted_proxies", ()),
        apple_networks=_networks(sec, "apple_networks", APPLE_NETWORKS),
        apple_user_agents=_patterns(sec, "apple_user_agents", APPLE_USER_AGENTS),
        scanner_user_agents=_patterns(sec, "scanner_user_agents", SCANNER_USER_AGENTS),
        head_is_bot=sec.get("head_is_bot", True, bool),
        click_window=sec.duration("click_window", "10s", allow_zero=True),
        untracked=tuple(untracked),
    )
    sec.finish()
    return tracking


def _networks(sec: _Section, name: str, default: tuple[str, ...]) -> tuple[Network, ...]:
    nets = []
    for i, raw in enumerate(sec.get(name, list(default), list)):
        try:
            nets.append(ipaddress.ip_network(raw, strict=False))
        except (ValueError, TypeError):
            raise ConfigError(sec.path, f"{sec.key(name)}[{i}]", f"not a CIDR: {raw!r}") from None
    return tuple(nets)


def _patterns(sec: _Section, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """A list of RE2 regular expressions, each checked."""
    found = []
    for i, raw in enumerate(sec.get(name, list(default), list)):
        key = f"{sec.key(name)}[{i}]"
        if not isinstance(raw, str) or not raw:
            raise ConfigError(sec.path, key, f"must be a regular expression, got {raw!r}")
        try:
            re2.compile(raw, _RE2_CHECK)
        except re2.error as exc:
            problem = exc.args[0].decode() if isinstance(exc.args[0], bytes) else str(exc)
            raise ConfigError(sec.path, key, f"not a regular expression: {problem}") from None
        found.append(raw)
    return tuple(found)


def _unsubscribe_url_problem(url: str) -> str:
    """What is wrong with an unsubscribe base URL, or ""."""
    problem = _public_url_problem(url, "https://mail.example.com/unsubscribe/")
    if problem:
        return problem
    if not _URL_PATH.match(urlsplit(url).path):
        return "its path must end in '/' (the token follows) and use only A-Z a-z 0-9 . _ ~ -"
    problem = _path_problem(url)
    if not problem and len(url) > URL_MAX:
        return f"must be at most {URL_MAX} characters"
    return problem


def _public_url_problem(url: str, example: str) -> str:
    """What is wrong with the public URL of a route on relayd's HTTP listener (unsubscribe
    and tracking links), or "": https:// with a host (http:// only for a loopback host), no
    query or fragment (the token is appended to it)."""
    try:
        parts = urlsplit(url)
        port = parts.port  # a port that is no number raises here
    except ValueError:
        return "not a URL"
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not host or parts.username is not None or port == 0:
        return f"must be an https:// URL with a host, like {example!r}"
    if parts.scheme == "http" and not _loopback(host):
        return "must be https:// (http:// only for a loopback host, as tests use)"
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        return "must have no query or fragment: the token is appended to it"
    return ""


def _path_problem(url: str) -> str:
    """A route's path (ending in "/"): only characters that reach it as written, outside the
    API's own routes."""
    path = urlsplit(url).path
    if not _URL_PATH.match(path):
        return "its path may use only A-Z a-z 0-9 . _ ~ - between its slashes"
    if path.startswith(_API_PATHS):
        return "its path must not be under /v1/ or /api/, the API's own routes"
    return ""


def _loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _warmup_schedules(sec: _Section) -> WarmupSchedules:
    schedules_sec = sec.table("schedules")
    schedules = {}
    for name in schedules_sec.data:
        table = schedules_sec.table(name)
        if "days" not in table.data:
            problem = "missing: the daily volumes, day 1 first"
            raise ConfigError(sec.path, table.key("days"), problem)
        days = _volumes(table, "days", table.get("days", [], list))
        overrides = table.table("per_provider")
        per_provider = {
            provider.lower(): _volumes(overrides, provider, overrides.get(provider, None, list))
            for provider in overrides.data
        }
        table.finish()
        schedules[name] = WarmupSchedule(days, per_provider)
    schedules_sec.finish()
    sec.finish()
    return schedules


def _volumes(sec: _Section, name: str, raw: list[Any]) -> tuple[int, ...]:
    """A list of daily volumes: whole numbers from 1 to MAX_COUNT, 1 to WARMUP_MAX_DAYS of
    them (rising or not: a schedule may hold a volume for some days)."""
    if not 1 <= len(raw) <= WARMUP_MAX_DAYS:
        problem = f"must list from 1 to {WARMUP_MAX_DAYS} daily volumes, got {len(raw)}"
        raise ConfigError(sec.path, sec.key(name), problem)
    for i, volume in enumerate(raw):
        if isinstance(volume, bool) or not isinstance(volume, int) or not 1 <= volume <= MAX_COUNT:
            raise ConfigError(
                sec.path, f"{sec.key(name)}[{i}]", f"must be from 1 to {MAX_COUNT}, got {volume!r}"
            )
    return tuple(raw)


def _source_warmup(
    s: _Section,
    address: str,
    pool: str,
    schedules: WarmupSchedules,
    warming: dict[str, tuple[str, str, date | None]],
) -> tuple[str, date | None]:
    """A pool source's warm-up: its schedule and first day. An address in several pools has
    one warm-up (its counts are per address), so every entry of it must say the same."""
    name = s.get("warmup", "", str)
    if name and name not in schedules:
        known = ", ".join(sorted(schedules)) or "none"
        problem = f"unknown schedule {name!r} (schedules in [warmup.schedules]: {known})"
        raise ConfigError(s.path, s.key("warmup"), problem)
    raw = s.get("warmup_start", "", (str, date))
    start: date | None = None
    if raw != "":
        if not name:
            raise ConfigError(s.path, s.key("warmup_start"), "needs warmup (a schedule name)")
        try:
            if isinstance(raw, datetime):
                raise ValueError
            start = raw if isinstance(raw, date) else date.fromisoformat(raw)
        except ValueError:
            problem = f"must be a date like 2026-12-01, got {str(raw)!r}"
            raise ConfigError(s.path, s.key("warmup_start"), problem) from None
    earlier = warming.setdefault(address, (pool, name, start))
    if earlier[1:] != (name, start):
        problem = (
            f"{address} is also in pool {earlier[0]!r} with another warm-up: an address has one"
            " warm-up, give each of its entries the same warmup and warmup_start"
        )
        raise ConfigError(s.path, s.key("warmup"), problem)
    return name, start


def _alerts(sec: _Section, hostname: str) -> Alerts:
    """[alerts] and one [alerts.rules.NAME] table per rule, over the rules' defaults."""

    def within(s: _Section, name: str, default: float, low: float, high: float) -> float:
        value = s.duration(name, _human(default) if default else "0s", allow_zero=low == 0)
        if not low <= value <= high:
            span = f"from {_human(low) if low else '0s'} to {_human(high)}"
            raise ConfigError(s.path, s.key(name), f"must be {span}, got {_human(value)}")
        return value

    addresses = {}
    for name, default in (("mail_to", ""), ("mail_from", f"relayd@{hostname}")):
        address = sec.get(name, "", str) or default
        local, _, domain = address.rpartition("@")
        if address and (not _MAILTO_LOCAL.match(local) or not _HOSTNAME.match(domain)):
            raise ConfigError(sec.path, sec.key(name), f"not an address: {address!r}")
        addresses[name] = address
    table = sec.table("rules")
    known = {rule.name: rule for rule in RULES}
    rules = []
    for name, rule in known.items():
        r = table.table(name)
        high = {Kind.RATIO: 1.0, Kind.FLOOR: 100.0}.get(rule.kind, float(MAX_DISK))
        changes: dict[str, Any] = {
            "enabled": r.get("enabled", True, bool),
            "threshold": r.factor("threshold", rule.threshold, 0.0, high),
            "for_": within(r, "for", rule.for_, 0, 86400),
        }
        if rule.window:
            changes["window"] = within(r, "window", rule.window, 1, 30 * 86400)
        if rule.minimum:
            changes["minimum"] = float(r.positive_int("minimum", int(rule.minimum)))
        r.finish()
        rules.append(replace(rule, **changes))
    unknown = sorted(set(table.data) - set(known))
    if unknown:
        raise ConfigError(
            sec.path, table.key(unknown[0]), f"no such rule, not one of {', '.join(known)}"
        )
    alerts = Alerts(
        enabled=sec.get("enabled", True, bool),
        interval=within(sec, "interval", 30, 0.1, 3600),
        resolve_for=within(sec, "resolve_for", 300, 0, 86400),
        resolve_ratio=sec.factor("resolve_ratio", 0.8, 0.01, 1.0),
        mail_to=addresses["mail_to"],
        mail_from=addresses["mail_from"],
        rules=tuple(rules),
    )
    sec.finish()
    return alerts


def _monitoring(sec: _Section) -> Monitoring:
    raw = sec.get("address", "127.0.0.1:9465", str)
    address = _hostport(sec, "address", raw, None) if raw else None
    monitoring = Monitoring(
        address=address,
        max_sites=sec.positive_int("max_sites", 50, maximum=10_000),
        refresh=sec.duration("refresh", "5s"),
        ready_timeout=sec.duration("ready_timeout", "2s"),
    )
    for name, low, high in (("refresh", 0.1, 3600.0), ("ready_timeout", 0.1, 60.0)):
        if not low <= getattr(monitoring, name) <= high:
            raise ConfigError(sec.path, sec.key(name), f"must be from {low:g}s to {high:g}s")
    sec.finish()
    return monitoring
