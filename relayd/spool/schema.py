"""The spool's schema, its upgrades, and the checks before anything is served."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

SCHEMA_VERSION = 6

# A bounce whose DSN is not yet queued (BOUNCED, without REPORTED_FAILED): written as the
# partial index recipients_owed says it, so that SQLite uses the index for it.
OWED = "state = 3 AND reported & 1 = 0"

# Every table and index, as the newest relayd creates them.
_TABLES = """
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    queue_id TEXT NOT NULL UNIQUE,
    sender TEXT NOT NULL,
    received_at REAL NOT NULL,
    size INTEGER NOT NULL,
    client TEXT NOT NULL,
    helo TEXT NOT NULL,
    origin TEXT NOT NULL,
    smtputf8 INTEGER NOT NULL DEFAULT 0,
    body BLOB NOT NULL
);
CREATE TABLE recipients (
    id INTEGER PRIMARY KEY,
    msg_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    rcpt TEXT NOT NULL,
    domain TEXT NOT NULL,
    state INTEGER NOT NULL,
    next_attempt REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_code INTEGER,
    last_reply TEXT,
    last_mx TEXT,
    last_attempt REAL,
    reported INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX recipients_msg ON recipients(msg_id);
CREATE INDEX recipients_domain ON recipients(domain);
CREATE INDEX recipients_fresh ON recipients(next_attempt) WHERE state = 0;
CREATE INDEX recipients_deferred ON recipients(next_attempt) WHERE state = 1;
CREATE INDEX recipients_active ON recipients(msg_id) WHERE state = 5;
"""

# Version 2: the event outbox (which also carries relayctl's actions to the daemon, replacing
# the control table), and an index on the bounces whose DSN is still owed.
_V2 = f"""
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    type TEXT NOT NULL,
    queue_id TEXT NOT NULL,
    rcpt TEXT,
    data TEXT NOT NULL
);
CREATE INDEX events_operator ON events(id) WHERE type = 'operator';
CREATE INDEX recipients_owed ON recipients(msg_id) WHERE {OWED};
"""
_V1_TO_V2 = "DROP TABLE IF EXISTS control;" + _V2

# Version 3: delivery receipts. The DSN extension's parameters (RFC 3461: ENVID and RET per
# message, NOTIFY and ORCPT per recipient), a message's metadata and its earliest delivery
# (the API's send_at: a PENDING recipient's next_attempt), the API's idempotency records, and
# the webhook endpoints with their place in the event log. An endpoint's events are '*' or a
# comma list of event types; its secrets a JSON list of [secret, until] pairs, newest first
# (until: null, or when a rotated-out secret stops signing); cursor the last event id it has
# acknowledged (or skipped as not matching); sent the events acknowledged; failures and
# failing_since the current run of failures; disabled '' or why; dropped the events pruned by
# the retention before it received them. Ids are never reused (AUTOINCREMENT): the API and
# relayctl name endpoints by them.
_V3 = """
ALTER TABLE messages ADD COLUMN envid TEXT;
ALTER TABLE messages ADD COLUMN ret TEXT NOT NULL DEFAULT '';
ALTER TABLE messages ADD COLUMN meta TEXT NOT NULL DEFAULT '';
ALTER TABLE recipients ADD COLUMN notify INTEGER NOT NULL DEFAULT 0;
ALTER TABLE recipients ADD COLUMN orcpt TEXT;
CREATE INDEX events_queue ON events(queue_id);
CREATE TABLE idempotency (
    credential TEXT NOT NULL,
    key TEXT NOT NULL,
    digest TEXT NOT NULL,
    response TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (credential, key)
) WITHOUT ROWID;
CREATE INDEX idempotency_at ON idempotency(at);
CREATE TABLE webhooks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    url TEXT NOT NULL UNIQUE,
    events TEXT NOT NULL,
    secrets TEXT NOT NULL,
    batch INTEGER NOT NULL DEFAULT 1,
    concurrency INTEGER NOT NULL DEFAULT 1,
    timeout REAL NOT NULL DEFAULT 10,
    created REAL NOT NULL,
    cursor INTEGER NOT NULL DEFAULT 0,
    sent INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    failing_since REAL,
    next_try REAL NOT NULL DEFAULT 0,
    last_status TEXT NOT NULL DEFAULT '',
    last_try REAL,
    last_success REAL,
    disabled TEXT NOT NULL DEFAULT '',
    dropped INTEGER NOT NULL DEFAULT 0
);
"""

# Version 4: deliverability. A message's stream, its lane in the scheduler: 'transactional'
# (never waits behind bulk mail) or 'bulk'. The suppression list: an address (lower case) is
# not mailed in a scope: '*' for all senders, 'domain:D' for mail from sender domain D,
# 'key:NAME' or 'auth:NAME' for one API key or login; reason 'bounce', 'complaint', 'unsubscribe' or
# 'manual', the bounce class and the reply or report that caused it, the message it came from,
# and when it lapses (NULL: never; bounce entries lapse, complaints and unsubscribes do not).
# The blacklist watch: one row per listing of a source IP on a DNS blacklist zone, from the
# first answer that lists it to the first that does not (delisted_at NULL: still listed); and
# the last look at each (ip, zone): status 'listed' or 'clean' from the last answer ('' before
# any), when it was answered and last asked, the query errors since that answer and the last.
# The spool's secrets, made with it: "tokens" signs return paths and unsubscribe links, so a
# restored backup still knows the links it sent. A recipient's ``bulk`` is its message's
# stream again (1: bulk), in the due indexes, so that the loader takes transactional mail first
# without reading past a bulk backlog.
# Adaptive shaping's holds: a source address held at a site (a provider's name, or a domain's MX
# hosts) by a rule of the shaping rules, from since to until; action 'suspend' or 'rate' (factor,
# the slowed rate as rate_count per rate_period seconds, connections at most); the reply that
# caused it; ended_at and ended ('lapsed', 'cleared') once over (NULL: in force). Ids are never
# reused (relayctl shaping clear names them). hold_domains: the domains whose mail a hold
# postponed in the spool, so that clearing it makes that mail due at once.
# IP warm-up (relayd.spool.warmup): ``warmup`` the recipients each source address sent to each
# provider on a UTC day (YYYY-MM-DD; only the current day is kept), ``warmup_sources`` the day
# each address was first seen in warm-up and the warm-up ("schedule@start") whose `warmed`
# event was written.
_V4 = """
ALTER TABLE messages ADD COLUMN stream TEXT NOT NULL DEFAULT 'transactional';
CREATE TABLE suppressions (
    address TEXT NOT NULL,
    scope TEXT NOT NULL,
    reason TEXT NOT NULL,
    class TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '',
    queue_id TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    expires REAL,
    PRIMARY KEY (address, scope)
) WITHOUT ROWID;
CREATE INDEX suppressions_expires ON suppressions(expires) WHERE expires IS NOT NULL;
CREATE TABLE listings (
    id INTEGER PRIMARY KEY,
    ip TEXT NOT NULL,
    zone TEXT NOT NULL,
    answer TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    listed_at REAL NOT NULL,
    checked_at REAL NOT NULL,
    delisted_at REAL
);
CREATE INDEX listings_ip ON listings(ip, listed_at);
CREATE TABLE secrets (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    created REAL NOT NULL
) WITHOUT ROWID;
INSERT INTO secrets VALUES ('tokens', randomblob(32), (julianday('now') - 2440587.5) * 86400);
CREATE TABLE listing_checks (
    ip TEXT NOT NULL,
    zone TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT '',
    answered_at REAL,
    checked_at REAL NOT NULL,
    errors INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (ip, zone)
) WITHOUT ROWID;
ALTER TABLE recipients ADD COLUMN bulk INTEGER NOT NULL DEFAULT 0;
DROP INDEX recipients_fresh;
DROP INDEX recipients_deferred;
CREATE INDEX recipients_fresh ON recipients(bulk, next_attempt) WHERE state = 0;
CREATE INDEX recipients_deferred ON recipients(bulk, next_attempt) WHERE state = 1;
CREATE TABLE holds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    site TEXT NOT NULL,
    source_ip TEXT NOT NULL,
    action TEXT NOT NULL,
    rule TEXT NOT NULL,
    code INTEGER NOT NULL,
    reply TEXT NOT NULL,
    factor REAL NOT NULL DEFAULT 1,
    rate_count REAL,
    rate_period REAL,
    connections INTEGER,
    since REAL NOT NULL,
    until REAL NOT NULL,
    ended_at REAL,
    ended TEXT NOT NULL DEFAULT ''
);
CREATE INDEX holds_open ON holds(site) WHERE ended_at IS NULL;
CREATE TABLE hold_domains (
    hold_id INTEGER NOT NULL REFERENCES holds(id) ON DELETE CASCADE,
    domain TEXT NOT NULL,
    PRIMARY KEY (hold_id, domain)
) WITHOUT ROWID;
CREATE TABLE warmup (
    ip TEXT NOT NULL,
    provider TEXT NOT NULL,
    day TEXT NOT NULL,
    sent INTEGER NOT NULL,
    PRIMARY KEY (ip, provider, day)
) WITHOUT ROWID;
CREATE TABLE warmup_sources (
    ip TEXT PRIMARY KEY,
    first_seen TEXT NOT NULL,
    warmed TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
"""

# Version 5: campaigns. Every object belongs to an owner (the credential that made it, as in a
# message's origin: "key:NAME" or "auth:NAME"; "" for the operator's, made with relayctl); an
# owner sees and uses its own, an admin key all. Contacts: an address (lower case) with JSON
# attributes, unique per owner; lists of contacts (attrs: the attribute names its contacts
# have had, a JSON array, for checking segment filters); segments: a list narrowed by a JSON
# filter over the attributes (relayd.contacts.segments). A contact's unsubscribe state is the
# suppression list's: no column here. Templates: versioned (a new version per change, never
# rewritten), kind 'html' or 'mjml' (the source in ``html``), subject and from name, an
# optional text source, defaults (JSON) for the substitutions. Campaigns: to a list (or a
# segment of it) from ``sender``, per ``spec`` (JSON: variants with their weights, templates
# and overrides; the test group, criterion and wait; data; tracking); state 'scheduled',
# 'sending', 'testing' (the test group is queued, the wait runs), 'paused', 'cancelled',
# 'done' or 'failed' (``error`` says why); phase 'test' or 'rest' (the remaining contacts,
# after the winner is picked; a campaign without a test has one pass, phase 'rest').
# campaign_sends: one row per contact queued, suppressed or failed (its message could not be
# made: a `campaign` event says why), in the transaction of its message, so that a restart
# resumes after the last committed contact and never queues one twice. campaign_stats: the
# figures of the report per variant and minute, folded from the event log (``cursors`` holds
# the last event each reader of the log has folded, by name). engagement: opens and clicks
# per message and recipient, for unique counts (the events carry each one).
_V5 = """
CREATE TABLE contacts (
    id INTEGER PRIMARY KEY,
    owner TEXT NOT NULL DEFAULT '',
    address TEXT NOT NULL,
    attrs TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    UNIQUE (owner, address)
);
CREATE TABLE lists (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL DEFAULT '',
    name TEXT NOT NULL,
    attrs TEXT NOT NULL DEFAULT '[]',
    created REAL NOT NULL,
    UNIQUE (owner, name)
);
CREATE TABLE list_members (
    list_id INTEGER NOT NULL REFERENCES lists(id) ON DELETE CASCADE,
    contact_id INTEGER NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
    added REAL NOT NULL,
    PRIMARY KEY (list_id, contact_id)
) WITHOUT ROWID;
CREATE INDEX list_members_contact ON list_members(contact_id);
CREATE TABLE segments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL DEFAULT '',
    name TEXT NOT NULL,
    list_id INTEGER NOT NULL REFERENCES lists(id) ON DELETE CASCADE,
    filter TEXT NOT NULL,
    created REAL NOT NULL,
    UNIQUE (owner, name)
);
CREATE TABLE templates (
    owner TEXT NOT NULL DEFAULT '',
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    from_name TEXT NOT NULL DEFAULT '',
    html TEXT NOT NULL DEFAULT '',
    text TEXT NOT NULL DEFAULT '',
    defaults TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    PRIMARY KEY (owner, name, version)
) WITHOUT ROWID;
CREATE TABLE campaigns (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL DEFAULT '',
    name TEXT NOT NULL,
    sender TEXT NOT NULL,
    list_id INTEGER NOT NULL REFERENCES lists(id),
    segment_id INTEGER REFERENCES segments(id),
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    phase TEXT NOT NULL DEFAULT 'test',
    winner TEXT NOT NULL DEFAULT '',
    send_at REAL NOT NULL,
    created REAL NOT NULL,
    started REAL,
    tested REAL,
    finished REAL,
    total INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX campaigns_state ON campaigns(state, send_at);
CREATE TABLE campaign_sends (
    campaign_id INTEGER NOT NULL REFERENCES campaigns(id) ON DELETE CASCADE,
    contact_id INTEGER NOT NULL,
    variant TEXT NOT NULL,
    queue_id TEXT NOT NULL,
    status TEXT NOT NULL,
    flags INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (campaign_id, contact_id)
) WITHOUT ROWID;
CREATE INDEX campaign_sends_queue ON campaign_sends(queue_id);
CREATE TABLE campaign_stats (
    campaign_id INTEGER NOT NULL REFERENCES campaigns(id) ON DELETE CASCADE,
    variant TEXT NOT NULL,
    metric TEXT NOT NULL,
    minute INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (campaign_id, variant, metric, minute)
) WITHOUT ROWID;
CREATE TABLE cursors (
    name TEXT PRIMARY KEY,
    event_id INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE engagement (
    queue_id TEXT NOT NULL,
    rcpt TEXT NOT NULL,
    opens INTEGER NOT NULL DEFAULT 0,
    clicks INTEGER NOT NULL DEFAULT 0,
    first_open REAL,
    first_click REAL,
    PRIMARY KEY (queue_id, rcpt)
) WITHOUT ROWID;
"""


# Version 6: a message's text is the last column of its row. The columns added by versions 3
# and 4 came after it, and SQLite materialises a zeroblob that is not last: a text written in
# pieces (over store.BLOB_PIECES) cost twice its size in memory at insertion (50 MB for a
# 25 MB message) instead of a page or two. The table is rebuilt as SQLite's ALTER TABLE
# procedure says (foreign keys off around it, see migrate): a one-time copy of the spool.
_V6 = """
CREATE TABLE messages_v6 (
    id INTEGER PRIMARY KEY,
    queue_id TEXT NOT NULL UNIQUE,
    sender TEXT NOT NULL,
    received_at REAL NOT NULL,
    size INTEGER NOT NULL,
    client TEXT NOT NULL,
    helo TEXT NOT NULL,
    origin TEXT NOT NULL,
    smtputf8 INTEGER NOT NULL DEFAULT 0,
    envid TEXT,
    ret TEXT NOT NULL DEFAULT '',
    meta TEXT NOT NULL DEFAULT '',
    stream TEXT NOT NULL DEFAULT 'transactional',
    body BLOB NOT NULL
);
INSERT INTO messages_v6 (id, queue_id, sender, received_at, size, client, helo, origin,
        smtputf8, envid, ret, meta, stream, body)
    SELECT id, queue_id, sender, received_at, size, client, helo, origin,
        smtputf8, envid, ret, meta, stream, body FROM messages;
DROP TABLE messages;
ALTER TABLE messages_v6 RENAME TO messages;
"""


class SpoolDamaged(Exception):
    """The spool file cannot be trusted: relayd must not start on it."""


def connect(path: Path) -> sqlite3.Connection:
    """Open (or create) the spool for the daemon: WAL, fsync at every commit, private files."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    old = os.umask(0o077)  # the database, its WAL and its shm: owner only, whatever the umask
    try:
        conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        os.umask(old)
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=10000")
    # Debian builds SQLite with secure_delete on: each delivered text would be zeroed, i.e.
    # written again to the WAL and the file (a 5 MB message stalled the writer for seconds).
    # FAST zeroes only what is written anyway; the file is private (0600), as Postfix's
    # unlinked queue files are.
    conn.execute("PRAGMA secure_delete=FAST")
    return conn


def reader(path: Path) -> sqlite3.Connection:
    """A second connection, for reading message texts when delivery needs them (never writes:
    the writer thread's connection stays the only one that does)."""
    conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA query_only=1")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def protect(path: Path) -> None:
    """Queued mail is private: the folder 0700, the files 0600 (also when made earlier by a
    relayd running under another umask)."""
    os.chmod(path.parent, 0o700)
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", 0o600)


# A spool up to this size is checked whole before relayd starts (SQLite's quick_check reads
# every page: about 20 ms per MB from a cold disk here, 29 s for a spool of a million messages).
# A larger one is checked as far as opening it needs, and whole in the background after start.
FULL_CHECK_MAX = 64 * 1024 * 1024


def prepare(path: Path, full_check_max: int = FULL_CHECK_MAX) -> None:
    """Create, check and upgrade the spool before anything is served (and before the fork)."""
    try:
        conn = connect(path)
    except sqlite3.DatabaseError as exc:
        raise SpoolDamaged(_damaged(path, str(exc))) from None
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # header and schema
        if path.stat().st_size <= full_check_max:
            problems = _quick_check(conn)
            if problems:
                raise SpoolDamaged(_damaged(path, "; ".join(problems)))
        migrate(conn)
    except sqlite3.DatabaseError as exc:
        raise SpoolDamaged(_damaged(path, str(exc))) from None
    finally:
        conn.close()
    protect(path)


def secret(conn: sqlite3.Connection, name: str) -> bytes:
    """One of the spool's secrets (see _V4)."""
    row = conn.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise SpoolDamaged(f"the spool has no {name!r} secret: restore a backup")
    return bytes(row[0])


def needs_background_check(path: Path, full_check_max: int = FULL_CHECK_MAX) -> bool:
    return path.stat().st_size > full_check_max


def verify(path: Path) -> str:
    """The whole check of a running spool, on a read-only connection: "" or what is wrong
    and what to do."""
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        problems = _quick_check(conn)
    except sqlite3.DatabaseError as exc:
        problems = [str(exc)]
    finally:
        conn.close()
    return _damaged(path, "; ".join(problems)) if problems else ""


def _quick_check(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("PRAGMA quick_check(20)") if r[0] != "ok"][:5]


def _damaged(path: Path, detail: str) -> str:
    return (
        f"spool {path} is damaged ({detail}). relayd does not start on it. Stop relayd, keep a"
        f" copy of the file (and its -wal), then recover what SQLite can read into a new spool:"
        f" sqlite3 {path} .recover | sqlite3 {path}.recovered, check it, and move it in place"
    )


def migrate(conn: sqlite3.Connection) -> None:
    """Create or upgrade the schema; refuse a spool written by a newer relayd."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise SpoolDamaged(
            f"the spool has schema version {version}, written by a newer relayd; this one knows"
            f" version {SCHEMA_VERSION}: run the newer relayd, or restore a backup"
        )
    if version == SCHEMA_VERSION:
        return
    steps = [_V1_TO_V2, _V3, _V4, _V5, _V6]  # from version 1 to 2, 2 to 3, ...
    script = _TABLES + _V2 + "".join(steps[1:]) if version == 0 else "".join(steps[version - 1 :])
    # off outside the transaction (a no-op inside one): _V6's DROP TABLE messages must not
    # delete every recipient through ON DELETE CASCADE
    conn.execute("PRAGMA foreign_keys=OFF")
    try:
        conn.executescript(f"BEGIN; {script} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
    finally:
        conn.execute("PRAGMA foreign_keys=ON")
