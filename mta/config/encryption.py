"""`[storage] encrypt`, `[queue] encrypt` and their key source: the checks `mta.config`
runs on them."""

from __future__ import annotations

import os

import attrs

# Stores that cannot hold encrypted blobs: mbox is a text format (a blob may hold a
# "From " line or bare CRs), and the SQL store's full-text index would index ciphertext.
_NOT_ENCRYPTABLE = {
    "mbox": "mbox is a text format and cannot hold encrypted blobs",
    "sql": "its full-text search index would see only ciphertext",
    "sqlite": "its full-text search index would see only ciphertext",
}


def storage_encryption(storage, storage_domains, datadir: str, err):
    """`storage` with its key paths made absolute (relative ones are under `datadir`);
    raises `err(...)` for encrypt without exactly one key source, or with a backend
    (the default or a ``[storage."<domain>"]`` one) that cannot be encrypted."""
    key_file = storage.master_key_file
    passphrase_file = storage.master_key_passphrase_file
    if key_file and passphrase_file:
        raise err(
            "storage.master_key_file",
            "give master_key_file or master_key_passphrase_file, not both",
        )
    if storage.encrypt:
        if not (key_file or passphrase_file):
            raise err(
                "storage.encrypt",
                "needs a key: set master_key_file or master_key_passphrase_file"
                " (mta-admin key init creates it)",
            )
        if storage.backend in _NOT_ENCRYPTABLE:
            raise err(
                "storage.encrypt",
                f"not available with backend = {storage.backend!r}:"
                f" {_NOT_ENCRYPTABLE[storage.backend]} (use maildir or timeseries)",
            )
        for domain, backend in storage_domains or ():
            if backend in _NOT_ENCRYPTABLE:
                raise err(
                    f'storage."{domain}".backend',
                    f"{backend!r} cannot be encrypted (storage.encrypt = true):"
                    f" {_NOT_ENCRYPTABLE[backend]}",
                )
    return attrs.evolve(
        storage,
        master_key_file=key_file and os.path.join(datadir, key_file),
        master_key_passphrase_file=passphrase_file and os.path.join(datadir, passphrase_file),
    )


def queue_encryption(queue, storage, err) -> None:
    """Raises `err(...)` for ``[queue] encrypt`` without a ``[storage]`` key source
    (the spool seals with the stores' master key)."""
    if queue.encrypt and not (storage.master_key_file or storage.master_key_passphrase_file):
        raise err(
            "queue.encrypt",
            "needs a key: set [storage] master_key_file or master_key_passphrase_file"
            " (mta-admin key init creates it)",
        )
