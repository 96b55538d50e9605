"""mta: a mail transfer agent on the Twisted reactor."""

__version__ = "0.1.0"
