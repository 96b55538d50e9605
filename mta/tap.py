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


def makeService(options):
    from twisted.internet import reactor

    from mta.app import build_service

    return build_service(options["loaded_config"], reactor)
