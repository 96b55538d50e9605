"""`mta-admin key init|rotate|retire|list`: the master keys of encryption at rest.

The key files are the ones ``[storage] master_key_file`` or
``master_key_passphrase_file`` name (`mta.storage.crypto.FileKeyring` reads them):

- `init` creates the first key: 32 random bytes in ``master_key_file`` (mode 0600),
  or a salt file ``<master_key_passphrase_file>.salt`` for the passphrase the
  operator wrote; it never overwrites one.
- `rotate` keeps the current key beside it as ``<id>.key`` (``<id>.salt``), then
  puts a new one in its place: new mail uses it (a running server re-reads the key
  files), old mail stays readable.
- `retire ID` re-wraps every stored message's data key under the current key (only
  the wrapped key changes, in place, with a write-to-temp and rename; message ids,
  file modes and times stay), then deletes key ID.  It walks ``<datadir>/mail`` and
  ``<datadir>/archive``, where the stores that can be encrypted (maildir,
  timeseries) keep their files, the quarantine, and the queue's entries on hold
  and dead letters; it refuses (and keeps the key) while messages in the active
  queue are still sealed under it (``[queue] encrypt``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
from typing import Any

from mta.admin.common import CLIError, config_of
from mta.crypto import stream
from mta.fileio import fsync_dir
from mta.queue import rekey_queue
from mta.storage import crypto, open_keyring


def add_commands(commands: Any, leaf: Any) -> None:
    """`key init|rotate|retire|list`."""
    key = commands.add_parser("key", help="master keys of encryption at rest").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    leaf(key, "init", cmd_key_init, "create the first master key (never overwrites one)")
    leaf(key, "rotate", cmd_key_rotate, "make a new current key; old ones stay for reading")
    retire = leaf(
        key, "retire", cmd_key_retire, "re-wrap every message under the current key, delete ID"
    )
    retire.add_argument("key_id", metavar="ID")
    leaf(key, "list", cmd_key_list, "list the key ids (the current one marked)")


def _sources(args: argparse.Namespace) -> tuple[Any, str, str]:
    config = config_of(args)
    key_file = config.storage.master_key_file
    passphrase_file = config.storage.master_key_passphrase_file
    if not (key_file or passphrase_file):
        raise CLIError(
            f"{config.source}: set [storage] master_key_file or master_key_passphrase_file first"
        )
    return config, key_file, passphrase_file


def _keyring(config) -> crypto.FileKeyring:
    try:
        return open_keyring(config)
    except crypto.KeyringError as e:
        raise CLIError(str(e)) from None


def _write_new(path: str, data: bytes) -> None:
    """Create `path` (mode 0600) holding `data`, durably; FileExistsError if it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(path))


def _replace(path: str, data: bytes) -> None:
    """Put `data` at `path` atomically (write a temp file, rename it over)."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.new")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    _write_new(tmp, data)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def _salt_bytes(salt: dict) -> bytes:
    return json.dumps(salt, indent=1).encode() + b"\n"


def cmd_key_init(args: argparse.Namespace) -> int:
    _, key_file, passphrase_file = _sources(args)
    path = key_file or passphrase_file + ".salt"
    if os.path.exists(path):
        raise CLIError(f"{path}: a master key is there already (rotate with mta-admin key rotate)")
    if passphrase_file and not os.path.isfile(passphrase_file):
        raise CLIError(f"{passphrase_file}: write the passphrase there first (mode 0600)")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    if key_file:
        master = secrets.token_bytes(crypto.KEY_SIZE)
        data = master
    else:
        salt = crypto.new_salt()
        with open(passphrase_file, "rb") as f:
            passphrase = f.read()
        if not passphrase.strip():
            raise CLIError(f"{passphrase_file}: the passphrase is empty")
        master = crypto.passphrase_key(passphrase, salt)
        data = _salt_bytes(salt)
    try:
        _write_new(path, data)
    except FileExistsError:
        raise CLIError(f"{path}: a master key is there already") from None
    print(f"created master key {crypto.key_id_of(master)} in {path}")
    return 0


def cmd_key_rotate(args: argparse.Namespace) -> int:
    config, key_file, passphrase_file = _sources(args)
    ring = _keyring(config)
    old = ring.current
    keep = os.path.join(ring.directory, old + (".key" if key_file else ".salt"))
    with open(ring.current_file, "rb") as f:
        current = f.read()
    if not os.path.exists(keep):
        _write_new(keep, current)
    if key_file:
        new = secrets.token_bytes(crypto.KEY_SIZE)
        _replace(key_file, new)
    else:
        salt = crypto.new_salt()
        with open(passphrase_file, "rb") as f:
            new = crypto.passphrase_key(f.read(), salt)
        _replace(ring.current_file, _salt_bytes(salt))
    print(f"new current key {crypto.key_id_of(new)}; key {old} kept in {keep} for reading")
    print(f"(mta-admin key retire {old} re-wraps its messages and deletes it)")
    return 0


def cmd_key_list(args: argparse.Namespace) -> int:
    config, _, _ = _sources(args)
    ring = _keyring(config)
    for key_id in sorted(ring.keys):
        print(f"{key_id}{'  current' if key_id == ring.current else ''}")
    return 0


def cmd_key_retire(args: argparse.Namespace) -> int:
    config, key_file, _ = _sources(args)
    ring = _keyring(config)
    key_id = args.key_id.lower()
    if key_id == ring.current:
        raise CLIError(f"key {key_id} is the current key: rotate first (mta-admin key rotate)")
    if key_id not in ring.keys:
        raise CLIError(f"no key {key_id} (keys: {', '.join(sorted(ring.keys))})")
    _, active = rekey_queue(config, ring, key_id, dry_run=True)
    if active:
        raise CLIError(
            f"{active} queued message(s) in the active queue are sealed under key {key_id}:"
            " retire it once the queue has delivered them (mta-admin queue list); key kept"
        )
    count = 0
    for root in (config.path("mail"), config.path("archive")):
        count += rewrap_tree(root, ring, key_id)
    queued, _ = rekey_queue(config, ring, key_id)
    count += queued
    count += _rewrap_quarantine(config.path("quarantine"), ring, key_id)
    os.unlink(os.path.join(ring.directory, key_id + (".key" if key_file else ".salt")))
    fsync_dir(ring.directory)
    print(f"re-wrapped {count} message(s) under key {ring.current}; deleted key {key_id}")
    return 0


def _rewrap_quarantine(directory: str, ring, key_id: str) -> int:
    """Re-wrap the sealed quarantined messages (``<qid>.eml``) under `key_id`."""
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".eml"))
    except FileNotFoundError:
        return 0
    count = 0
    for name in names:
        try:
            count += stream.rewrap_file(ring, os.path.join(directory, name), key_id)
        except FileNotFoundError:
            continue
        except crypto.DecryptionError as e:
            raise CLIError(f"{e}; key {key_id} kept") from None
    return count


def rewrap_tree(root: str, ring: crypto.Keyring, key_id: str) -> int:
    """Re-wrap, under `ring`'s current key, every blob under `root` wrapped under
    `key_id`; how many.  Dot files and Maildir ``tmp`` directories are skipped."""
    head = crypto.MAGIC + bytes([crypto.VERSION]) + bytes.fromhex(key_id)
    count = 0
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and d != "tmp"]
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                if f.read(len(head)) != head:
                    continue
                blob = head + f.read()
            try:
                new = crypto.rewrap(ring, blob)
            except crypto.DecryptionError as e:
                raise CLIError(f"{path}: {e}; key {key_id} kept") from None
            tmp = os.path.join(directory, f".{name}.rewrap")
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            _write_new(tmp, new)
            st = os.stat(path)  # the same mode and times: listings stay in order
            os.chmod(tmp, st.st_mode & 0o7777)
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.replace(tmp, path)
            fsync_dir(directory)
            count += 1
    return count
