"""The validated configuration as frozen values: one attrs class per section, the
embedded defaults, and which values each key may take (`mta.config` loads them)."""

from __future__ import annotations

import ipaddress
import os

import attrs

TLS_MODES = ("none", "starttls", "required", "implicit")
AUTH_MODES = ("none", "optional", "required")


@attrs.frozen
class ListenerConfig:
    name: str
    host: str
    port: int
    tls: str = "none"
    auth: str = "none"
    # Connections open with a PROXY v1/v2 header (mta.smtp.proxy), accepted only
    # from [limits] proxy_networks.
    proxy_protocol: bool = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@attrs.frozen
class TLSConfig:
    certificate: str | None = None
    key: str | None = None


@attrs.frozen
class LimitsConfig:
    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 1000
    idle_timeout: float = 300.0
    max_connections: int = 2000
    max_connections_per_ip: int = 100
    messages_per_ip_per_minute: int = 0
    messages_per_user_per_minute: int = 0
    max_line_length: int = 512
    max_received_headers: int = 50
    min_data_rate: int = 500
    bare_newlines: str = "normalize"
    # Load balancers allowed to send a PROXY header on proxy_protocol listeners
    # (CIDRs, parsed by mta.config.proxy), and how long one may take to send it.
    proxy_networks: tuple = ()
    proxy_timeout: float = 10.0


@attrs.frozen
class AuthConfig:
    max_failures: int = 5
    failure_window: float = 900.0
    lockout_seconds: float = 900.0
    time_cost: int = 3
    memory_cost: int = 65536
    parallelism: int = 4
    threads: int = 2


@attrs.frozen
class StorageConfig:
    backend: str = "maildir"
    encrypt: bool = False
    # the current master key (32 raw bytes) or a passphrase file; relative: to datadir
    master_key_file: str = ""
    master_key_passphrase_file: str = ""


@attrs.frozen
class S3Config:
    """`[storage.s3]`: the bucket of `backend = "s3"` (`mta.storage.s3store`); checked
    by `mta.config.s3` (the secret file is read only when a backend uses s3)."""

    endpoint: str = ""  # http(s)://host[:port]; requests are path-style
    bucket: str = ""
    region: str = "us-east-1"
    prefix: str = ""  # object keys: <prefix>YYYY/MM/DD/<message-id>~<tag>.eml
    access_key_id: str = ""
    secret_access_key_file: str = ""  # relative: to datadir
    timeout: float = 30.0  # seconds per request
    retries: int = 4  # after a 5xx, a timeout or a connection error, with backoff


@attrs.frozen
class QueueConfig:
    backend: str = "local"
    dsn: str = ""
    retry_schedule: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
    max_age: float = 5 * 86400.0
    in_flow_limit: int = 2000
    in_flow_delay: float = 1.0
    delivery_concurrency: int = 20
    delay_warning: float = 4 * 3600.0
    io_lanes: int = 1
    # Seal queued messages on the disk (AES-256-GCM, mta.crypto.stream) with the
    # [storage] master key.
    encrypt: bool = False
    # backend = "postgresql": seconds a node holds a claimed entry (renewed while it
    # delivers); a node that dies loses its entries to the others when they expire.
    lease: float = 60.0


@attrs.frozen
class DatabaseConfig:
    """`[database]`: where users, aliases, lockouts, the audit log and the SQL mail
    store's messages live.  `dsn` "" is the SQLite file `<datadir>/mta.db`; a
    `postgresql://user@host:port/dbname` URI is PostgreSQL.  `migrate`: "auto"
    brings the schema up to date at start; "manual" refuses to start on a schema
    that is behind (`mta-admin db migrate` applies it)."""

    dsn: str = ""
    migrate: str = "auto"


@attrs.frozen
class RelayConfig:
    smarthost: str | None = None
    helo: str | None = None
    tls: str = "opportunistic"
    port: int = 25
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    destination_concurrency: int = 20
    idle_timeout: float = 5.0
    unreachable_for: float = 300.0


@attrs.frozen
class DNSConfig:
    nameservers: tuple[str, ...] = ()
    timeout: float = 5.0


@attrs.frozen
class DKIMConfig:
    """`[dkim]`: sign outbound mail From these domains with <datadir>/dkim/<domain>.<selector>.key."""

    selector: str = "mta"
    domains: tuple[str, ...] = ()


@attrs.frozen
class ChecksConfig:
    """`[checks]`: how the policy pipeline treats a check that fails or hangs.

    `timeout` bounds each asynchronous check (seconds); a check that times out or
    raises answers 451 with `fail = "closed"`, or is skipped (and logged) with
    `fail = "open"`.  The relay, sender and rate-limit rules and the virus scan are
    always closed.

    `spamd` (host:port or a unix socket path; None: no spam check) and what spam
    means: `spam_threshold` (None: spamd's own required score), `spam_action`, and
    `spam_max_size` (bytes; bigger messages are tagged as not scanned).  `clamd`
    (host:port or a socket path; None: no virus scan) and `virus_action`.

    `blocked_attachments`: file-name extensions (lower case, no dot) and MIME types
    (with a slash) refused at the end of DATA, also inside nested parts and zip
    archives; `attachment_action` says whether such a message is rejected (554) or
    quarantined.

    `spf`, `dkim`, `dmarc` (off | tag | enforce): sender authentication of mail from
    unauthenticated sessions outside `relay_networks`; `arc_seal`: ARC-seal mail we
    forward with the DKIM key.

    `dnsbl`: block-list zones asked at connect (`dnsbl_action`: tag adds an X-DNSBL
    header, reject refuses the greeting); `dnswl`: allow-list zones whose clients
    are not looked up in the block lists.
    """

    timeout: float = 30.0
    fail: str = "closed"
    spamd: str | None = None
    spam_threshold: float | None = None
    spam_action: str = "tag"
    spam_max_size: int = 512 * 1024
    clamd: str | None = None
    virus_action: str = "reject"
    blocked_attachments: tuple[str, ...] = ()
    attachment_action: str = "reject"
    dnsbl: tuple[str, ...] = ()
    dnsbl_action: str = "tag"
    dnswl: tuple[str, ...] = ()
    # Sender authentication of mail from outside (mta.policy.senderauth).
    spf: str = "off"
    dkim: str = "off"
    dmarc: str = "off"
    arc_seal: bool = False


@attrs.frozen
class HTTPConfig:
    address: str | None = "127.0.0.1:8081"


@attrs.frozen
class ManholeConfig:
    """The SSH console: off unless both are set; loopback only, public keys only."""

    address: str | None = None
    authorized_keys: str | None = None


@attrs.frozen
class LogConfig:
    format: str = "text"
    level: str = "info"


@attrs.frozen
class Config:
    hostname: str
    datadir: str
    local_domains: tuple[str, ...]
    relay_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    postmaster: str
    listeners: tuple[ListenerConfig, ...]
    workers: int = 1
    tls: TLSConfig = TLSConfig()
    limits: LimitsConfig = LimitsConfig()
    auth: AuthConfig = AuthConfig()
    storage: StorageConfig = StorageConfig()
    queue: QueueConfig = QueueConfig()
    database: DatabaseConfig = DatabaseConfig()
    relay: RelayConfig = RelayConfig()
    dns: DNSConfig = DNSConfig()
    dkim: DKIMConfig = DKIMConfig()
    checks: ChecksConfig = ChecksConfig()
    http: HTTPConfig = HTTPConfig()
    manhole: ManholeConfig = ManholeConfig()
    log: LogConfig = LogConfig()
    source: str = "<defaults>"
    # (domain, backend) from [storage."<domain>"] tables: a local domain kept elsewhere
    storage_domains: tuple[tuple[str, str], ...] = ()
    storage_s3: S3Config = S3Config()

    def path(self, *parts: str) -> str:
        """A path under the data directory."""
        return os.path.join(self.datadir, *parts)

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self.local_domains


DEFAULT_LISTENERS = (
    ListenerConfig("smtp", "127.0.0.1", 2525, "starttls", "optional"),
    ListenerConfig("submission", "127.0.0.1", 2587, "required", "required"),
    ListenerConfig("smtps", "127.0.0.1", 2465, "implicit", "required"),
)

# section name -> (attrs class, {key: coercer})
_SECTIONS: dict[str, type] = {
    "tls": TLSConfig,
    "limits": LimitsConfig,
    "auth": AuthConfig,
    "storage": StorageConfig,
    "queue": QueueConfig,
    "database": DatabaseConfig,
    "relay": RelayConfig,
    "dns": DNSConfig,
    "dkim": DKIMConfig,
    "checks": ChecksConfig,
    "http": HTTPConfig,
    "manhole": ManholeConfig,
    "log": LogConfig,
}
_CHOICES = {
    "storage.backend": ("maildir", "mbox", "sql", "sqlite", "timeseries", "s3"),
    "queue.backend": ("local", "postgresql"),
    "database.migrate": ("auto", "manual"),
    "relay.tls": ("opportunistic", "required", "none"),
    "checks.fail": ("open", "closed"),
    "checks.spam_action": ("tag", "quarantine", "reject"),
    "checks.virus_action": ("reject", "quarantine"),
    "checks.attachment_action": ("reject", "quarantine"),
    "checks.dnsbl_action": ("tag", "reject"),
    "checks.spf": ("off", "tag", "enforce"),
    "checks.dkim": ("off", "tag", "enforce"),
    "checks.dmarc": ("off", "tag", "enforce"),
    "limits.bare_newlines": ("normalize", "reject"),
    "log.format": ("json", "text"),
    "log.level": ("debug", "info", "warn", "error", "critical"),
}
# Keys whose default is None but whose value is a number (None: "not set").
_OPTIONAL_NUMBERS = frozenset(("checks.spam_threshold",))
# Values of the operator contract that this version validates but cannot serve yet:
# refusing them at start is better than silently running something else.
_NOT_YET = {
    "storage.backend": ("maildir", "mbox", "timeseries", "sql", "sqlite", "s3"),
    "queue.backend": ("local", "postgresql"),
}
# Sections of the operator contract implemented by later stages: accepted so that one
# config file serves every version, validated only as tables.  None at present.
_RESERVED_SECTIONS: tuple[str, ...] = ()
# Tables inside [storage] that hold a backend's settings (mta.config.s3), not a
# [storage."<domain>"] table.
_STORAGE_SETTINGS = ("s3",)
# Keys of the operator contract in implemented sections whose feature comes later:
# accepted (so one config file serves every version) but not used yet.
_RESERVED_KEYS: frozenset[str] = frozenset()
