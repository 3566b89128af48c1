"""The store's schema: its migrations, the tables `db copy` moves, and the running totals behind /metrics.

MIGRATIONS[n] takes version n to n+1 ({float}, {id} and {blob} are the backend's column types).
"""

from __future__ import annotations

MIGRATIONS = [
    """
    CREATE TABLE machines (
        mac        TEXT PRIMARY KEY,
        state      TEXT NOT NULL,
        first_seen {float} NOT NULL,
        last_seen  {float} NOT NULL,
        facts      TEXT NOT NULL DEFAULT '{{}}'
    );
    CREATE TABLE events (
        id     {id},
        mac    TEXT NOT NULL REFERENCES machines(mac),
        time   {float} NOT NULL,
        kind   TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '{{}}'
    );
    CREATE INDEX events_by_mac ON events(mac, id);
    """,
    # Phone-home: one-time tokens (only their hashes), and what a node told us when it called.
    """
    CREATE TABLE tokens (
        id      TEXT PRIMARY KEY,
        hash    TEXT NOT NULL,
        mac     TEXT NOT NULL REFERENCES machines(mac),
        issued  {float} NOT NULL,
        expires {float} NOT NULL,
        used    {float}
    );
    CREATE INDEX tokens_by_mac ON tokens(mac);
    ALTER TABLE machines ADD COLUMN host_key TEXT;
    ALTER TABLE machines ADD COLUMN ip TEXT;
    ALTER TABLE machines ADD COLUMN reprovision INTEGER NOT NULL DEFAULT 0;
    """,
    # DHCP leases of full mode: one row per address; mac NULL for an address a client declined.
    """
    CREATE TABLE leases (
        ip      TEXT PRIMARY KEY,
        mac     TEXT UNIQUE,
        state   TEXT NOT NULL,
        expires {float} NOT NULL
    );
    """,
    # The address that fetched the boot script a token rides on: a phone-home from elsewhere is refused.
    # NULL for tokens issued before this column existed (they expire within token_minutes anyway).
    """
    ALTER TABLE tokens ADD COLUMN ip TEXT;
    """,
    # Replicas: which server recorded each event; provisioning jobs that any replica may claim, held by
    # a lease its owner renews; secrets every replica shares (encrypted before they get here). The live
    # tokens index keeps issuing a token cheap for a machine that has booted a thousand times.
    """
    ALTER TABLE events ADD COLUMN replica TEXT;
    CREATE TABLE jobs (
        mac         TEXT PRIMARY KEY REFERENCES machines(mac),
        state       TEXT NOT NULL,
        owner       TEXT,
        lease_until {float},
        attempt     INTEGER NOT NULL DEFAULT 0,
        created     {float} NOT NULL,
        updated     {float} NOT NULL
    );
    CREATE INDEX jobs_by_state ON jobs(state, created);
    CREATE TABLE secrets (
        name  TEXT PRIMARY KEY,
        value {blob} NOT NULL
    );
    CREATE INDEX tokens_live ON tokens(mac) WHERE used IS NULL;
    """,
    # Tokens are deleted some days after they expire (prune_tokens): every boot script issues one.
    """
    CREATE INDEX tokens_by_expiry ON tokens(expires);
    """,
    # Running totals behind /metrics (bytes served by protocol, provisioning steps), kept as events are
    # recorded: a scrape reads a few rows instead of summing every event ever recorded (0.4 s at 10^6).
    # Older stores get theirs summed from their events once (TOTALS_VERSION).
    """
    CREATE TABLE totals (
        name  TEXT PRIMARY KEY,
        count INTEGER NOT NULL,
        value {float} NOT NULL
    );
    """,
    # Trust on the boot network: a machine's provisioning window (enroll = "approve"), claims held while two
    # addresses claim one MAC, and the SMBIOS UUID its firmware reported with the script a token rides on.
    """
    ALTER TABLE machines ADD COLUMN window_until {float};
    ALTER TABLE machines ADD COLUMN held TEXT;
    ALTER TABLE tokens ADD COLUMN uuid TEXT
    """,
    # An installed OS: the SSH host key the server made for it (pinned before it first boots), and tokens
    # by purpose: "boot" rides on an agent's boot script, "report" on the installed OS's disk.
    """
    ALTER TABLE machines ADD COLUMN os_host_key TEXT;
    ALTER TABLE tokens ADD COLUMN purpose TEXT NOT NULL DEFAULT 'boot'
    """,
]
TOTALS_VERSION = 7  # the schema version that added totals
# The running totals, by the event kind that adds to them: (name prefix, detail key that names the total,
# detail key of the amount). One row per name, e.g. "bytes:http", "step:disk".
TOTALS = {"file-served": ("bytes:", "protocol", "bytes"), "step-done": ("step:", "step", "seconds"),
          "claim-conflict": ("conflicts:", "transport", "")}  # counted only


# What `copy_into` moves, parents before children (foreign keys).
TABLES = {
    "machines": ("mac", "state", "first_seen", "last_seen", "facts", "host_key", "ip", "reprovision", "window_until",
                 "held", "os_host_key"),
    "events": ("id", "mac", "time", "kind", "detail", "replica"),
    "tokens": ("id", "hash", "mac", "issued", "expires", "used", "ip", "uuid", "purpose"),
    "leases": ("ip", "mac", "state", "expires"),
    "jobs": ("mac", "state", "owner", "lease_until", "attempt", "created", "updated"),
    "secrets": ("name", "value"),
    "totals": ("name", "count", "value"),
}
