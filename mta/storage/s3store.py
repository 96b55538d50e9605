"""The S3 mail store (``[storage] backend = "s3"``): messages as objects in a bucket.

One object per message, however many local recipients it has: the items of a
batch that share one queued body (`StoreItem.body`) are uploaded once, at
``<prefix>YYYY/MM/DD/<message-id>~<tag>.eml`` (the UTC day of delivery, the
Message-ID header made safe for a key, and the message tag of the first recipient,
which makes the key unique: a queue id with a recipient index).  The same batch run
again after a crash writes the same key, so nothing is left behind.  Each recipient
gets a row in the index (`mta.storage.s3index`, the SQL store's ``messages``
table, in ``<datadir>/mta.db`` or, with ``[database] dsn``, in PostgreSQL, which
the nodes of a cluster share): its own Return-Path and Delivered-To lines, the
object key, and what listing and ``mta-admin search`` need.  `read_message` gives
back the row's lines followed by the object: byte for byte what was delivered.

The order is what makes it safe: the objects are written first (the single PUTs
of a batch several at a time, `mta.s3.upload.UploadWindow`; the rows are
parsed meanwhile), the rows are then committed (the durability point); an upload
that fails (S3 down, 5xx after the retries, 403) fails those items with `S3Error`,
an OSError, so local delivery defers them and the message stays queued.  Deleting the last row of an object
deletes the object first.

Encryption at rest (``[storage] encrypt = true``) is done here, not by
`EncryptingStore` (which seals one blob per recipient): the object is sealed once
(`mta.storage.crypto`), its authenticated data binding its object key (as the
blob's tag) and no mailbox, so an object moved to another key does not decrypt;
each row's own lines are sealed for (mailbox, message tag) like any blob, and hold
the object key, so a row pointed at another object is caught.  Sealing needs the
message in memory (bounded by ``[limits] max_message_size``); the index then keeps
no clear From/Subject/text (so search finds nothing in encrypted mail).

Every method blocks (called from a thread, never the reactor).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from mta.db.addresses import address_key, lookup_key
from mta.interfaces import IMailStore
from mta.s3.client import S3Client
from mta.s3.upload import PART_SIZE, UploadWindow, upload
from mta.storage import crypto
from mta.storage.items import StoredMessage, StoreItem, read_whole
from mta.storage.names import safe_component
from mta.storage.s3index import IndexRow, ObjectIndex
from mta.storage.sql import SearchHit, storage_error
from mta.storage.sqlparse import parse_message

__all__ = ["S3Store", "object_key"]

_log = Logger()
_TAG_RE = re.compile(r"[A-Za-z0-9_-]+\Z")
_UNSAFE_IN_KEY = re.compile(r"[^A-Za-z0-9._@-]+")
_MAX_ID_IN_KEY = 160


@attrs.frozen
class _Nobody:
    """The mailbox a shared object's blob is sealed for: none (its key binds it)."""

    local: str = ""
    domain: str = ""


_OBJECT_OWNER = _Nobody()


def object_key(prefix: str, now: float, message_id: str | None, tag: str) -> str:
    """``<prefix>YYYY/MM/DD/<message-id>~<tag>.eml``: the Message-ID without its
    angle brackets, every run of characters other than letters, digits and
    ``. _ @ -`` replaced by ``_``, at most 160 characters; just ``<tag>.eml`` when
    there is no usable Message-ID."""
    day = time.strftime("%Y/%m/%d", time.gmtime(now))
    safe = _UNSAFE_IN_KEY.sub("_", (message_id or "").strip().strip("<>"))
    safe = safe.strip("._")[:_MAX_ID_IN_KEY]
    name = f"{safe}~{tag}" if safe else tag
    return f"{prefix}{day}/{name}.eml"


# The first Message-ID field of a header section, with its continuation lines.
_MESSAGE_ID_FIELD = re.compile(rb"^message-id:[ \t]*([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)", re.I | re.M)


def _message_id(header_block: bytes) -> str | None:
    """The Message-ID field's value, as the email package would give it (a scan: the
    package's parser of the whole header section cost 46 us a message, for one
    field whose odd characters `object_key` replaces anyway)."""
    found = _MESSAGE_ID_FIELD.search(header_block)
    if found is None:
        return None
    value = found.group(1).rstrip(b"\r\n").decode("ascii", "surrogateescape")
    return value or None


@attrs.frozen
class _Uploaded:
    key: str
    first_part: bytes  # clear text: what the index parses (b"" when encrypted)


@implementer(IMailStore)
class S3Store:
    """Objects in `client`'s bucket under `prefix`, indexed in the database at
    `index_location` (an SQLite file or a `postgresql://` dsn, migrated on first use
    unless `migrate` is False); requests run on a reactor through `call` (a
    ReactorCaller)."""

    name = "s3"

    def __init__(
        self,
        client: S3Client,
        index_location: str,
        call: Callable,
        *,
        prefix: str = "",
        keyring: crypto.Keyring | None = None,
        clock: Callable[[], float] = time.time,
        part_size: int = PART_SIZE,
        on_close: Callable[[], None] | None = None,
        migrate: bool = True,
    ):
        self.client = client
        self.prefix = prefix
        self.index = ObjectIndex(index_location, clock=clock, migrate=migrate)
        self.call = call
        self.keyring = keyring
        self._clock = clock
        self.part_size = part_size
        self._on_close = on_close
        self._delete_lock = threading.Lock()

    def close(self) -> None:
        self.index.close()
        if self._on_close is not None:
            self._on_close()

    # -- delivery -------------------------------------------------------------------

    def deliver_batch(self, items: Sequence[StoreItem]) -> list:
        """Upload one object per distinct body, then commit every row at once; per
        item ``s3:<row id>`` or the exception that stopped it."""
        results: list = [None] * len(items)
        now = self._clock()
        if self.keyring is not None:
            self._refresh()
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            try:
                user = _user(item.mailbox)
                if not _TAG_RE.match(item.message_tag):
                    raise ValueError(f"bad message tag {item.message_tag!r}")
                if item.check_existing:
                    found = self.index.find(user, item.message_tag)
                    if found is not None:
                        results[i] = f"s3:{found}"
                        continue
                groups.setdefault(id(item.body), []).append(i)
            except Exception as e:  # noqa: BLE001 (one outcome per item, never raise)
                results[i] = _storage_error(e)
        rows, row_items = self._upload_groups(items, list(groups.values()), now, results)
        if rows:
            try:
                for i, row_id in zip(row_items, self.index.insert(rows)):
                    results[i] = f"s3:{row_id}"
            except Exception as e:  # the COMMIT: none of these rows exist
                for i in row_items:
                    results[i] = _storage_error(e)
        return results

    def _upload_groups(self, items, groups: list[list[int]], now: float, results: list):
        """Put each group's object (single PUTs several at a time); the index rows
        of the groups whose object is stored, and their items.  A failed group's
        items get their error in `results`."""
        errors: dict[int, Exception] = {}
        staged: dict[int, list] = {}
        window = UploadWindow(self.call)
        for g, indexes in enumerate(groups):

            def done(error, g=g):
                if error is not None:
                    errors[g] = error

            try:
                uploaded = self._upload(items[indexes[0]], now, window, done)
                staged[g] = [(i, self._row(items[i], uploaded, now)) for i in indexes]
            except Exception as e:  # noqa: BLE001
                errors[g] = e
        window.drain()
        rows, row_items = [], []
        for g, indexes in enumerate(groups):
            if g in errors:
                for i in indexes:
                    results[i] = _storage_error(errors[g])
                continue
            for i, row in staged[g]:
                rows.append(row)
                row_items.append(i)
        return rows, row_items

    def _upload(self, item: StoreItem, now: float, window=None, done=None) -> _Uploaded:
        body = item.body
        key = object_key(self.prefix, now, _message_id(body.header_block()), item.message_tag)
        if self.keyring is None:
            first = upload(
                self.call,
                self.client,
                key,
                body.chunks(1024 * 1024),
                body.size,
                part_size=self.part_size,
                window=window,
                done=done,
            )
            return _Uploaded(key, first)
        data = read_whole(body)
        blob = crypto.encrypt(self.keyring, _OBJECT_OWNER, key, data)
        del data
        upload(
            self.call,
            self.client,
            key,
            [blob],
            len(blob),
            part_size=self.part_size,
            window=window,
            done=done,
        )
        return _Uploaded(key, b"")

    def _row(self, item: StoreItem, uploaded: _Uploaded, now: float) -> IndexRow:
        user = _user(item.mailbox)
        size = len(item.prefix) + item.body.size
        if self.keyring is not None:
            own = crypto.encrypt(
                self.keyring,
                item.mailbox,
                item.message_tag,
                uploaded.key.encode() + b"\n" + item.prefix,
            )
            return IndexRow(user, item.message_tag, uploaded.key, own, size, now, now)
        fields = parse_message(item.prefix + uploaded.first_part, now)
        return IndexRow(
            user,
            item.message_tag,
            uploaded.key,
            item.prefix,
            size,
            now,
            fields.date,
            message_id=fields.message_id,
            from_addr=fields.from_addr,
            to_addrs=tuple(fields.to_addrs),
            to_text=fields.to_text,
            subject=fields.subject,
            headers=tuple(tuple(h) for h in fields.headers),
            text=fields.text,
        )

    def has_delivered(self, mailbox, message_tag: str) -> bool:
        return self.index.find(_user(mailbox), message_tag) is not None

    # -- mailboxes ------------------------------------------------------------------

    def create_mailbox(self, mailbox) -> None:
        """Nothing to make: a mailbox is the rows that name it."""
        _user(mailbox)
        return None

    def remove_mailbox(self, mailbox) -> bool:
        """Delete every message of `mailbox`: the objects no other mailbox shares,
        then the rows.  False when it had none."""
        user = _user(mailbox)
        with self._delete_lock:
            return self.index.delete_user(user, self._delete_object)

    def probe(self) -> str:
        """The index takes a write, and the bucket answers a signed listing now."""
        self.index.probe()
        self.call(self.client.check_bucket, 4.0)
        encrypted = f", encrypted (key {self.keyring.current})" if self.keyring else ""
        return f"bucket {self.client.where} reachable{encrypted}"

    # -- reading --------------------------------------------------------------------

    def list_messages(self, mailbox) -> list[StoredMessage]:
        return self.index.list(_user(mailbox))

    def read_message(self, mailbox, message_id: str) -> bytes:
        row = self.index.get(_user(mailbox), _row_id(message_id))
        if row is None:
            raise KeyError(message_id)
        if row.object_key is None:  # a row the SQL store wrote: the whole message
            return row.own
        data = self.call(self.client.get_object, row.object_key)
        if self.keyring is None:
            return row.own + data
        self._refresh()
        tag, own = crypto.decrypt(self.keyring, mailbox, row.own)
        key, _, prefix = own.partition(b"\n")
        if tag != row.tag or key.decode("utf-8", "replace") != row.object_key:
            raise crypto.DecryptionError(
                f"message was altered: row {message_id} holds the lines of another message"
            )
        key_in_blob, body = crypto.decrypt(self.keyring, _OBJECT_OWNER, data)
        if key_in_blob != row.object_key:
            raise crypto.DecryptionError(
                f"message was altered: object {row.object_key} holds {key_in_blob}"
            )
        return prefix + body

    def delete_message(self, mailbox, message_id: str) -> None:
        """Delete one row; its object too when no other row needs it (first, so a
        failure to delete it leaves the message as it was)."""
        user, row_id = _user(mailbox), _row_id(message_id)
        with self._delete_lock:
            if not self.index.delete(user, row_id, self._delete_object):
                raise KeyError(message_id)

    def _delete_object(self, key: str) -> None:
        self.call(self.client.delete_object, key)

    def search(
        self,
        query: str,
        *,
        user: str | None = None,
        since: float | None = None,
        limit: int = 50,
    ) -> list[SearchHit]:
        """``mta-admin search``: the SQL store's full-text search (`SQLStore.search`)
        over the index's rows, on either engine."""
        rows = self.index.search(
            query, user=None if user is None else lookup_key(user), since=since, limit=limit
        )
        return [
            SearchHit(str(i), u, folder, date, from_addr or "", subject or "")
            for i, u, folder, date, from_addr, subject in rows
        ]

    def rewrap(self, key_id: str) -> int:
        """`mta-admin key retire`: re-wrap, under the current key, every row's sealed
        lines and every object wrapped under `key_id` (an object is read back whole
        and written again at its key); how many blobs.  Raises DecryptionError."""
        count = 0
        for row_id, own in self.index.sealed_rows():
            if own.startswith(crypto.MAGIC) and crypto.blob_key_id(own) == key_id:
                self.index.replace_own(row_id, crypto.rewrap(self.keyring, own))
                count += 1
        head = crypto.MAGIC + bytes([crypto.VERSION]) + bytes.fromhex(key_id)
        for key in self.index.object_keys():
            if self.call(self.client.get_object, key, len(head)) != head:
                continue
            blob = crypto.rewrap(self.keyring, self.call(self.client.get_object, key))
            upload(self.call, self.client, key, [blob], len(blob), part_size=self.part_size)
            count += 1
        return count

    def _refresh(self) -> None:
        try:
            self.keyring.refresh()
        except crypto.KeyringError as e:
            _log.warn("cannot re-read the storage keys: {error}", error=str(e))


def _user(mailbox) -> str:
    """The index's name of `mailbox`, refusing what no other store accepts."""
    safe_component(mailbox.domain, "domain")
    safe_component(mailbox.local, "local part")
    return address_key(mailbox)


def _row_id(message_id: str) -> int:
    text = str(message_id).removeprefix("s3:")
    if not text.isascii() or not text.isdigit():
        raise KeyError(message_id)
    return int(text)


def _storage_error(error: Exception) -> Exception:
    return storage_error(error)


def open_s3_store(config, *, keyring=None, reactor=None) -> S3Store:
    """The `S3Store` of `config`'s ``[storage.s3]``, its index where `mta.db` keeps
    its tables (`mta.db.location.database_location`: ``[database] dsn``, else
    ``<datadir>/mta.db``), migrated as ``[database] migrate`` says.

    With `reactor` (the server's, running in the main thread) requests run there;
    without one (mta-admin) the store runs a reactor of its own in a thread,
    stopped by `S3Store.close` (or with the process)."""
    from mta.db.location import auto_migrate, database_location
    from mta.s3.settings import open_client

    s3 = config.storage_s3
    client, call, on_close = open_client(s3, reactor)
    return S3Store(
        client,
        database_location(config),
        call,
        prefix=s3.prefix,
        keyring=keyring,
        on_close=on_close,
        migrate=auto_migrate(config),
    )


def rewrap_s3(config, keyring, key_id: str) -> int:
    """Re-wrap what the S3 store of `config` keeps under `key_id` (0 when no
    backend is s3); for `mta-admin key retire`."""
    backends = {config.storage.backend, *(b for _, b in config.storage_domains)}
    if "s3" not in backends:
        return 0
    store = open_s3_store(config, keyring=keyring)
    try:
        return store.rewrap(key_id)
    finally:
        store.close()
