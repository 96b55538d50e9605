"""The exceptions of `mta.db`: operator mistakes, and a file this mta cannot use."""

from __future__ import annotations


class DirectoryError(Exception):
    """A mistake an operator can make (unknown user, duplicate, bad address).

    str() is a one-line message fit to print as is; the CLI never shows a traceback
    for these.
    """


class InvalidAddress(DirectoryError):
    pass


class UserExists(DirectoryError):
    pass


class NoSuchUser(DirectoryError):
    pass


class AliasExists(DirectoryError):
    pass


class NoSuchAlias(DirectoryError):
    pass


class SchemaError(Exception):
    """The database file cannot be used by this version of mta."""
