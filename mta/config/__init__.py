"""TOML configuration -> a frozen, fully validated `Config`.

The whole file is validated before any service exists: an unknown key, a wrong type
or a bad value raises `ConfigError` naming the file and the dotted key, so an operator
never finds out about a typo from a half-started daemon.  Every mistake in the file is
reported at once: with several, one `ConfigError` lists them one per line (and keeps
each in `.errors`).  With no file at all the embedded defaults run a complete server
on 127.0.0.1 (DESIGN.md section 3).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs

from mta.config.checks import arc_seal, checks_section, dkim_section, host_port
from mta.config.database import database_section
from mta.config.encryption import queue_encryption, storage_encryption
from mta.config.model import (  # noqa: F401 (the sections are part of mta.config's API)
    _CHOICES,
    _NOT_YET,
    _OPTIONAL_NUMBERS,
    _RESERVED_KEYS,
    _RESERVED_SECTIONS,
    _SECTIONS,
    _STORAGE_SETTINGS,
    AUTH_MODES,
    DEFAULT_LISTENERS,
    TLS_MODES,
    AuthConfig,
    ChecksConfig,
    Config,
    DatabaseConfig,
    DKIMConfig,
    DNSConfig,
    HTTPConfig,
    LimitsConfig,
    ListenerConfig,
    LogConfig,
    ManholeConfig,
    QueueConfig,
    RelayConfig,
    S3Config,
    StorageConfig,
    TLSConfig,
)
from mta.config.proxy import proxy_limits
from mta.config.s3 import s3_settings
from mta.envelope import AddressError, parse_mailbox


class ConfigError(ValueError):
    """A configuration problem; str() names the file and the key.

    `errors` holds every problem found in the file (just this one, usually); when
    there are several, str() is a count line followed by one `<file>: <key>: <problem>`
    line each, and `key` is the first one's."""

    def __init__(self, message: str, *, key: str = "", path: str = "<defaults>"):
        self.key = key
        self.path = path
        self.errors: tuple[ConfigError, ...] = (self,)
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(where + message)

    @classmethod
    def combine(cls, errors: Sequence[ConfigError]) -> ConfigError:
        """One error standing for all of `errors` (itself when there is only one)."""
        if len(errors) == 1:
            return errors[0]
        first = errors[0]
        lines = "\n".join(str(e) for e in errors)
        combined = cls(f"{len(errors)} errors\n{lines}", path=first.path)
        combined.key = first.key
        combined.errors = tuple(errors)
        return combined


class _Errors:
    """Collects the ConfigErrors of one file so that all of them are reported."""

    def __init__(self, source: str):
        self.source = source
        self.found: list[ConfigError] = []

    def new(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, key=key, path=self.source)

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        """Record a ConfigError raised inside and carry on after the block."""
        try:
            yield
        except ConfigError as e:
            self.found.extend(e.errors)

    def raise_any(self) -> None:
        if self.found:
            raise ConfigError.combine(self.found)


def load_config(path: str | None = None, *, datadir: str | None = None) -> Config:
    """Read and validate `path` (or the embedded defaults when None)."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = path
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read: {e.strerror}", path=path) from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"invalid TOML: {e}", path=path) from None
    cfg = build_config(data, source=source)
    if datadir is not None:
        cfg = attrs.evolve(cfg, datadir=os.path.abspath(datadir))
    return cfg


def build_config(data: Mapping[str, Any], *, source: str = "<defaults>") -> Config:
    """Validate an already-parsed TOML mapping; every problem in one ConfigError."""
    errors = _Errors(source)
    err = errors.new
    collect = errors.collect

    top_keys = {
        "hostname",
        "datadir",
        "local_domains",
        "relay_networks",
        "postmaster",
        "listener",
        "workers",
    }
    for key in data:
        if key not in top_keys and key not in _SECTIONS and key not in _RESERVED_SECTIONS:
            errors.found.append(err(key, "unknown key"))

    hostname = None
    with collect():
        hostname = _string(data, "hostname", err)
    hostname = (hostname or default_hostname()).lower()

    datadir = None
    with collect():
        datadir = _string(data, "datadir", err)
    datadir = datadir or "./var"
    if source != "<defaults>" and not os.path.isabs(datadir):
        datadir = os.path.join(os.path.dirname(os.path.abspath(source)), datadir)
    datadir = os.path.abspath(datadir)

    local_domains: tuple[str, ...] | None = None
    with collect():
        domains = data.get("local_domains", ["localhost", hostname])
        if not isinstance(domains, list) or not all(isinstance(d, str) and d for d in domains):
            raise err("local_domains", "must be a list of domain names")
        local_domains = tuple(dict.fromkeys(d.lower().rstrip(".") for d in domains))

    relay_networks = []
    with collect():
        nets = data.get("relay_networks", [])
        if not isinstance(nets, list):
            raise err("relay_networks", "must be a list of CIDRs")
        for i, net in enumerate(nets):
            with collect():
                try:
                    relay_networks.append(ipaddress.ip_network(str(net), strict=False))
                except ValueError as e:
                    raise err(f"relay_networks[{i}]", str(e)) from None

    postmaster = "postmaster@localhost"
    with collect():
        postmaster = _string(data, "postmaster", err) or postmaster
        try:
            pm = parse_mailbox(postmaster)
        except AddressError as e:
            raise err("postmaster", f"not an address: {e}") from None
        postmaster = str(pm)
        # Checked only against valid local_domains (a broken list is its own error).
        if local_domains is not None and pm.domain not in local_domains:
            raise err("postmaster", f"domain {pm.domain!r} is not in local_domains")

    listeners = DEFAULT_LISTENERS
    with collect():
        listeners = _listeners(data.get("listener"), err, collect)

    workers = 1
    with collect():
        workers = data.get("workers", 1)
        if isinstance(workers, bool) or not isinstance(workers, int) or not 0 <= workers <= 64:
            raise err("workers", "must be an integer from 0 (one per CPU) to 64")
        if workers == 0:
            workers = os.cpu_count() or 1

    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        sections[name] = cls()
        with collect():
            sections[name] = _section(data.get(name, {}), name, cls, err, collect)
    for name in _RESERVED_SECTIONS:
        if "." not in name and name in data and not isinstance(data[name], dict):
            errors.found.append(err(name, "must be a table"))
    storage_domains: tuple = ()
    with collect():
        storage_domains = _storage_domains(data.get("storage", {}), local_domains, err, collect)
    with collect():
        sections["storage"] = storage_encryption(sections["storage"], storage_domains, datadir, err)
    storage_s3 = S3Config()
    with collect():
        storage_s3 = s3_settings(
            data.get("storage", {}),
            sections["storage"],
            storage_domains,
            datadir,
            err,
            collect,
            sections["queue"],
        )
    with collect():
        queue_encryption(sections["queue"], sections["storage"], err)
    with collect():
        sections["dkim"] = dkim_section(sections["dkim"], err, collect)
    with collect():
        arc_seal(sections["checks"], sections["dkim"], err)
        sections["database"] = database_section(sections["database"], err)
    sections["limits"] = proxy_limits(sections["limits"], listeners, err, collect)
    http_addr = sections["http"].address
    if http_addr:
        with collect():
            host_port(http_addr, "http.address", err)
    with collect():
        sections["manhole"] = _manhole(sections["manhole"], source, err)
    with collect():
        _queue_database(sections["queue"], sections["database"], err)

    errors.raise_any()
    return Config(
        hostname=hostname,
        datadir=datadir,
        local_domains=local_domains or (),
        relay_networks=tuple(relay_networks),
        postmaster=postmaster,
        listeners=listeners,
        workers=workers,
        source=source,
        storage_domains=storage_domains,
        storage_s3=storage_s3,
        **sections,
    )


def _queue_database(queue, database, err) -> None:
    """`[queue] backend = "postgresql"` needs `[database] dsn` naming PostgreSQL."""
    if queue.backend != "postgresql":
        return
    if queue.dsn and not queue.dsn.startswith(("postgresql://", "postgres://")):
        raise err("queue.dsn", 'must be "postgresql://user@host:port/dbname" (or empty)')
    if not (queue.dsn or database.dsn).startswith(("postgresql://", "postgres://")):
        raise err(
            "database.dsn",
            'must be "postgresql://user@host:port/dbname" when [queue] backend = "postgresql"',
        )
    if queue.lease < 5:
        raise err("queue.lease", "must be at least 5 seconds (leases are renewed every lease/3)")


# What a host name lookup gives when the machine has no real name for itself.
_NOT_A_HOST_NAME = frozenset(
    (
        "",
        "localhost",
        "localhost.localdomain",
        "localhost6",
        "localhost6.localdomain6",
        "ip6-localhost",
        "ip6-loopback",
    )
)


def default_hostname(
    getfqdn: Callable[[], str] | None = None,
    gethostname: Callable[[], str] | None = None,
) -> str:
    """Our name when the file gives none: the machine's fully qualified name, or its
    host name when the FQDN lookup gives nothing better.

    `socket.getfqdn()` answers `localhost` on many machines (an /etc/hosts line that
    lists the name after `localhost`, or no DNS); then the greeting would say
    localhost and mail to postmaster@<hostname> would be refused.  So the host name
    wins over a `localhost`-like or empty FQDN, and over a dotless one when the host
    name has a dot; `localhost` only when neither is anything else."""

    def ask(lookup: Callable[[], str]) -> str:
        try:
            name = lookup()
        except (OSError, UnicodeError):
            return ""
        return (name or "").strip().rstrip(".").lower() if isinstance(name, str) else ""

    fqdn = ask(getfqdn or socket.getfqdn)
    host = ask(gethostname or socket.gethostname)
    if host not in _NOT_A_HOST_NAME and (
        fqdn in _NOT_A_HOST_NAME or ("." not in fqdn and "." in host)
    ):
        return host
    return fqdn if fqdn not in _NOT_A_HOST_NAME else "localhost"


def _manhole(section: ManholeConfig, source: str, err) -> ManholeConfig:
    """Loopback only; `authorized_keys` required with an address (relative to the file)."""
    if not section.address:
        return ManholeConfig()
    host, _ = host_port(section.address, "manhole.address", err)
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise err("manhole.address", f"must be a loopback address, got {host!r}")
    keys = section.authorized_keys
    if not keys:
        raise err("manhole.authorized_keys", "required when manhole.address is set")
    if source != "<defaults>" and not os.path.isabs(keys):
        keys = os.path.join(os.path.dirname(os.path.abspath(source)), keys)
    if not os.path.isfile(keys):
        raise err("manhole.authorized_keys", f"no such file: {keys}")
    return ManholeConfig(section.address, os.path.abspath(keys))


def _string(data: Mapping[str, Any], key: str, err) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise err(key, "must be a string")
    return value


def _listeners(raw: Any, err, collect=contextlib.nullcontext) -> tuple[ListenerConfig, ...]:
    if raw is None:
        return DEFAULT_LISTENERS
    if not isinstance(raw, list):
        raise err("listener", "must be an array of tables ([[listener]])")
    out = []
    names = set()
    for i, item in enumerate(raw):
        key = f"listener[{i}]"
        if not isinstance(item, dict):
            with collect():
                raise err(key, "must be a table")
            continue
        for k in item:
            if k not in ("name", "address", "tls", "auth", "proxy_protocol"):
                with collect():
                    raise err(f"{key}.{k}", "unknown key")
        name = item.get("name")
        with collect():
            if not isinstance(name, str) or not name:
                name = ""
                raise err(f"{key}.name", "required string")
            if name in names:
                raise err(f"{key}.name", f"duplicate listener {name!r}")
            names.add(name)
        host, port = "", 0
        with collect():
            address = item.get("address")
            if not isinstance(address, str):
                raise err(f"{key}.address", "required host:port string")
            host, port = host_port(address, f"{key}.address", err)
        default_tls = {"smtps": "implicit", "submission": "required"}.get(name, "starttls")
        tls = item.get("tls", default_tls)
        with collect():
            if tls not in TLS_MODES:
                raise err(f"{key}.tls", f"must be one of {', '.join(TLS_MODES)}")
        default_auth = "required" if name in ("smtps", "submission") else "optional"
        auth = item.get("auth", default_auth)
        with collect():
            if auth not in AUTH_MODES:
                raise err(f"{key}.auth", f"must be one of {', '.join(AUTH_MODES)}")
        proxy = item.get("proxy_protocol", False)
        with collect():
            if not isinstance(proxy, bool):
                raise err(f"{key}.proxy_protocol", "must be true or false")
        out.append(ListenerConfig(name, host, port, tls, auth, proxy is True))
    return tuple(out)


def _storage_domains(raw: Any, local_domains, err, collect) -> tuple:
    """[storage."<domain>"] tables, as (domain, backend): one local domain's mail
    in another backend."""
    if not isinstance(raw, dict):
        return ()
    found = []
    for key, value in raw.items():
        dotted = f"storage.{key}"
        if not isinstance(value, dict) or dotted in _RESERVED_SECTIONS:
            continue
        if key in _STORAGE_SETTINGS:  # [storage.s3]: read by s3_settings
            continue
        domain = key.lower().rstrip(".")
        with collect():
            if local_domains is not None and domain not in local_domains:
                raise err(
                    dotted,
                    f"{domain!r} is not in local_domains"
                    ' (a domain with dots needs quotes: [storage."example.test"])',
                )
            for k in value:
                if k != "backend":
                    raise err(f"{dotted}.{k}", "unknown key")
            backend = value.get("backend")
            choices = _CHOICES["storage.backend"]
            if backend not in choices:
                raise err(f"{dotted}.backend", f"must be one of {', '.join(choices)}")
            if backend not in _NOT_YET["storage.backend"]:
                raise err(
                    f"{dotted}.backend",
                    f"{backend!r} is not available in this version"
                    f" (use {', '.join(_NOT_YET['storage.backend'])})",
                )
            found.append((domain, backend))
    return tuple(found)


def _section(raw: Any, name: str, cls: type, err, collect=contextlib.nullcontext) -> Any:
    if not isinstance(raw, dict):
        raise err(name, "must be a table")
    fields = {f.name: f for f in attrs.fields(cls)}
    values = {}
    for key, value in raw.items():
        dotted = f"{name}.{key}"
        if name == "storage" and isinstance(value, dict) and dotted not in _RESERVED_SECTIONS:
            continue  # [storage."<domain>"]: read by _storage_domains
        if key not in fields:
            if dotted in _RESERVED_SECTIONS and isinstance(value, dict):
                continue
            if dotted in _RESERVED_KEYS:
                continue
            with collect():
                raise err(dotted, "unknown key")
            continue
        with collect():
            default = 0.0 if dotted in _OPTIONAL_NUMBERS else fields[key].default
            values[key] = _coerce(value, default, dotted, err)
    section = cls(**values)
    for key, choices in _CHOICES.items():
        sec, _, field = key.partition(".")
        if sec != name:
            continue
        value = getattr(section, field)
        with collect():
            if value not in choices:
                raise err(key, f"must be one of {', '.join(choices)}")
            if key in _NOT_YET and value not in _NOT_YET[key]:
                raise err(
                    key,
                    f"{value!r} is not available in this version (use {', '.join(_NOT_YET[key])})",
                )
    if name == "checks":
        section = checks_section(section, err, collect)
    for field in fields:
        value = getattr(section, field)
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            with collect():
                raise err(f"{name}.{field}", "must not be negative")
    return section


def _coerce(value: Any, default: Any, key: str, err) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise err(key, "must be true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise err(key, "must be an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise err(key, "must be a number")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, list):
            raise err(key, "must be a list")
        if default and isinstance(default[0], float):
            if not all(
                isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in value
            ):
                raise err(key, "must be a list of positive numbers")
            return tuple(float(v) for v in value)
        if not all(isinstance(v, str) for v in value):
            raise err(key, "must be a list of strings")
        return tuple(value)
    if default is None or isinstance(default, str):
        if not isinstance(value, str):
            raise err(key, "must be a string")
        return value
    raise err(key, "unsupported value")
