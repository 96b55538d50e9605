"""mta.auth.passwords: the Argon2id hashing shared by mta-admin and the AUTH checker."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import argon2
import pytest

from mta.auth.passwords import PasswordHashError, hash_password, password_hasher
from mta.smtp.auth import Argon2idChecker

AUTH = SimpleNamespace(time_cost=1, memory_cost=8, parallelism=1, threads=1)


def test_hash_is_argon2id_with_the_auth_costs():
    stored = hash_password(AUTH, "s3cret")
    assert stored.startswith("$argon2id$v=19$m=8,t=1,p=1$")
    assert argon2.PasswordHasher().verify(stored, "s3cret")


def test_the_checker_uses_the_same_hasher():
    checker = Argon2idChecker.from_config(AUTH, lambda: None, None)
    stored = hash_password(AUTH, "s3cret")
    assert checker.hasher.verify(stored, "s3cret")
    assert not checker.hasher.check_needs_rehash(stored)  # current: no rehash on login
    same = password_hasher(time_cost=1, memory_cost=8, parallelism=1)
    for name in ("time_cost", "memory_cost", "parallelism", "hash_len", "salt_len", "type"):
        assert getattr(checker.hasher, name) == getattr(same, name)


def test_parameters_argon2_refuses_are_a_clear_error():
    with pytest.raises(PasswordHashError, match=r"\[auth\] argon2 settings"):
        hash_password(SimpleNamespace(time_cost=1, memory_cost=1, parallelism=1), "x")


def test_importing_it_does_not_import_the_reactor():
    code = (
        "import sys, mta.auth.passwords, mta.admin.cli, mta.admin.users;"
        "assert 'twisted.internet.reactor' not in sys.modules, 'reactor imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
