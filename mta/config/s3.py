"""`[storage.s3]`: the checks `mta.config` runs on the S3 store's settings.

The table is read whatever the backend (its keys and types are checked, so a typo
is found before it matters); what S3 needs to work (an endpoint, a bucket name S3
accepts, credentials, a readable secret file) is required only when `[storage]
backend` or a ``[storage."<domain>"]`` table says ``"s3"``.  The secret itself is
not kept in the config (which may be printed): the store reads the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs

from mta.config.model import S3Config

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_MAX_PREFIX = 512


def s3_settings(
    raw_storage: Any, storage, storage_domains, datadir: str, err, collect, queue=None
) -> S3Config:
    """The `S3Config` of ``[storage.s3]`` (paths made absolute under `datadir`).
    With ``[queue] backend = "postgresql"`` an endpoint means the queue keeps its
    bodies there (`mta.queue.s3body`), so the table must then be complete too."""
    raw = raw_storage.get("s3", {}) if isinstance(raw_storage, Mapping) else {}
    if not isinstance(raw, Mapping):
        raise err("storage.s3", "must be a table")
    fields = {f.name: f for f in attrs.fields(S3Config)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"storage.s3.{key}"
        with collect():
            if key not in fields:
                raise err(dotted, "unknown key")
            values[key] = _typed(value, fields[key].default, dotted, err)
    s3 = S3Config(**values)
    with collect():
        if s3.timeout <= 0:
            raise err("storage.s3.timeout", "must be a positive number of seconds")
    with collect():
        if not 0 <= s3.retries <= 20:
            raise err("storage.s3.retries", "must be from 0 to 20")
    with collect():
        _check_prefix(s3.prefix, err)
    secret = s3.secret_access_key_file
    if secret:
        s3 = attrs.evolve(s3, secret_access_key_file=os.path.join(datadir, secret))
    used = storage.backend == "s3" or any(b == "s3" for _, b in storage_domains or ())
    if queue is not None and queue.backend == "postgresql" and s3.endpoint:
        used = True
    if used:
        _check_needed(s3, err, collect)
    return s3


def _typed(value: Any, default: Any, key: str, err) -> Any:
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise err(key, "must be a number")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise err(key, "must be an integer")
        return value
    if not isinstance(value, str):
        raise err(key, "must be a string")
    return value


def _check_prefix(prefix: str, err) -> None:
    if not prefix:
        return
    if len(prefix.encode()) > _MAX_PREFIX or _CONTROL_RE.search(prefix):
        raise err("storage.s3.prefix", f"must be at most {_MAX_PREFIX} bytes of printable text")
    if prefix.startswith("/"):
        raise err("storage.s3.prefix", "must not start with '/' (keys are relative to the bucket)")
    segments = prefix.split("/")[:-1] if prefix.endswith("/") else prefix.split("/")
    if any(s in ("", ".", "..") for s in segments):
        raise err("storage.s3.prefix", "must not contain empty, '.' or '..' path segments")


def _check_needed(s3: S3Config, err, collect) -> None:
    with collect():
        if not s3.endpoint:
            raise err("storage.s3.endpoint", 'required with backend = "s3" (http(s)://host[:port])')
        parts = urlsplit(s3.endpoint)
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
            or parts.username
        ):
            raise err(
                "storage.s3.endpoint",
                f"expected http(s)://host[:port] with no path (the bucket is its own key),"
                f" got {s3.endpoint!r}",
            )
        try:
            parts.port  # noqa: B018 (raises for a bad port)
        except ValueError:
            raise err("storage.s3.endpoint", f"bad port in {s3.endpoint!r}") from None
    with collect():
        if not _BUCKET_RE.match(s3.bucket) or ".." in s3.bucket:
            raise err(
                "storage.s3.bucket",
                f"{s3.bucket!r} is not an S3 bucket name (3 to 63 lower-case letters,"
                " digits, '.' and '-')"
                if s3.bucket
                else 'required with backend = "s3"',
            )
    with collect():
        if not s3.region:
            raise err("storage.s3.region", 'required with backend = "s3" (e.g. "us-east-1")')
    with collect():
        if not s3.access_key_id:
            raise err("storage.s3.access_key_id", 'required with backend = "s3"')
    with collect():
        read_secret(s3.secret_access_key_file, err)


def read_secret(path: str, err=None) -> str:
    """The secret access key in `path` (its first line, white space stripped);
    raises `err(...)` (or ValueError) saying why it cannot be had."""

    def fail(message: str):
        if err is None:
            return ValueError(f"storage.s3.secret_access_key_file: {message}")
        return err("storage.s3.secret_access_key_file", message)

    if not path:
        raise fail('required with backend = "s3" (a file holding the secret access key)')
    try:
        with open(path, "rb") as f:
            data = f.read(4096)
    except OSError as e:
        raise fail(f"cannot read {path}: {e.strerror}") from None
    lines = data.decode("utf-8", "replace").strip().splitlines()
    if not lines or not lines[0].strip():
        raise fail(f"{path} is empty (it must hold the secret access key)")
    return lines[0].strip()
