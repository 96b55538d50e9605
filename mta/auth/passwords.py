"""Password hashing: the one Argon2id definition the AUTH checker and mta-admin share.

`mta.smtp.auth.Argon2idChecker` verifies (and re-hashes on login) with
`password_hasher`; `mta-admin user add|passwd` stores `hash_password`.  Both take
the `[auth]` cost parameters, so a stored hash is exactly what the checker treats
as current (no re-hash on first login).  Plain blocking functions: the daemon calls
them only on its auth thread pool; nothing here imports the reactor.
"""

from __future__ import annotations

from typing import Any

import argon2


class PasswordHashError(ValueError):
    """The `[auth]` parameters cannot hash (e.g. a memory cost argon2 refuses)."""


def password_hasher(*, time_cost: int, memory_cost: int, parallelism: int) -> argon2.PasswordHasher:
    """An Argon2id hasher with these costs (`memory_cost` in KiB)."""
    return argon2.PasswordHasher(
        time_cost=time_cost,
        memory_cost=memory_cost,
        parallelism=parallelism,
        type=argon2.Type.ID,
    )


def hash_password(auth: Any, password: str | bytes) -> str:
    """The Argon2id hash of `password` with the costs of `auth` (a config's `[auth]`).

    Raises `PasswordHashError` when argon2 refuses the parameters.  Slow (~200 ms)
    by design: never call it on the reactor thread.
    """
    hasher = password_hasher(
        time_cost=auth.time_cost, memory_cost=auth.memory_cost, parallelism=auth.parallelism
    )
    try:
        return hasher.hash(password)
    except argon2.exceptions.HashingError as e:
        raise PasswordHashError(
            f"cannot hash password with the [auth] argon2 settings: {e}"
        ) from None
