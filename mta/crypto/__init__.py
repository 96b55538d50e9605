"""Encryption at rest, shared by the stages that write mail to the disk.

`keys`: master keys and the keyring (`[storage] master_key_file` or a passphrase);
`stream`: the segmented AES-256-GCM format of queued messages (`[queue] encrypt`).
The mail stores' per-message blob format is `mta.storage.crypto`.
"""
