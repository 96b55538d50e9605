"""`twistd mta`: command-line options and the service factory.

The configuration is loaded and fully validated while the options are parsed, so a
bad file stops twistd with one clear line (file and key) before anything listens.
"""

from __future__ import annotations

from twisted.python import usage

from mta.config import ConfigError, load_config


class Options(usage.Options):
    synopsis = "[--config PATH] [--datadir DIR]"
    longdesc = "Run the mta mail transfer agent. Without --config it runs on embedded defaults (data in ./var, listeners on 127.0.0.1)."
    optParameters = [
        ["config", "c", None, "Path to the TOML configuration file (default: embedded defaults)."],
        ["datadir", "d", None, "Data directory; overrides `datadir` from the configuration."],
    ]

    def postOptions(self):
        try:
            self["loaded_config"] = load_config(self["config"], datadir=self["datadir"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        config = self["loaded_config"]
        if config.storage.encrypt or config.queue.encrypt:  # the keys, before anything listens
            from mta.crypto.keys import KeyringError, open_keyring

            section = "[storage] encrypt" if config.storage.encrypt else "[queue] encrypt"
            try:
                open_keyring(config)
            except KeyringError as e:
                raise usage.UsageError(f"{section}: {e}") from None
        _prepare_database(self["loaded_config"])


def _prepare_database(config) -> None:
    """Before anything listens: PostgreSQL reachable and migrated (`[database]
    migrate = "auto"`, one node at a time), or, with "manual", a schema that is not
    behind.  SQLite with "auto" is migrated when first opened, as before."""
    if not config.database.dsn and config.database.migrate == "auto":
        return
    from mta.db import Database, SchemaError, auto_migrate, database_errors, database_location

    try:
        Database(database_location(config), migrate=auto_migrate(config)).close()
    except (SchemaError, *database_errors()) as e:
        raise usage.UsageError(f"[database]: {e}") from None


def makeService(options):
    from twisted.internet import reactor

    from mta.app import build_service

    return build_service(options["loaded_config"], reactor)
