"""`[checks]` keys of the spamd and clamd checks, and how the composition root builds
the checks from them."""

from __future__ import annotations

import pytest
from twisted.internet import task

from mta.config import ConfigError, build_config
from mta.policy.clamd import VirusCheck
from mta.policy.compose import policy_pipeline
from mta.policy.spamd import SpamCheck
from mta.policy.verdict import Phase
from mta.testing import FakeDirectory, FakeSenderPolicy


def test_defaults():
    checks = build_config({}).checks
    assert checks.spamd is None and checks.clamd is None
    assert checks.spam_threshold is None
    assert (checks.spam_action, checks.spam_max_size, checks.virus_action) == (
        "tag",
        512 * 1024,
        "reject",
    )


def test_values():
    checks = build_config(
        {
            "checks": {
                "spamd": "127.0.0.1:783",
                "spam_threshold": 6,
                "spam_action": "reject",
                "spam_max_size": 1000,
                "clamd": "/run/clamav/clamd.ctl",
                "virus_action": "reject",
            }
        }
    ).checks
    assert checks.spamd == "127.0.0.1:783" and checks.clamd == "/run/clamav/clamd.ctl"
    assert checks.spam_threshold == 6.0 and isinstance(checks.spam_threshold, float)
    assert (checks.spam_action, checks.virus_action) == ("reject", "reject")
    assert build_config({"checks": {"spamd": "", "clamd": ""}}).checks.spamd is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("spamd", "localhost"),
        ("spamd", ":783"),
        ("spamd", 783),
        ("clamd", "relative/clamd.sock"),
        ("clamd", "127.0.0.1:99999"),
        ("spam_threshold", "high"),
        ("spam_action", "drop"),
        ("virus_action", "tag"),
        ("spam_max_size", 0),
        ("spam_max_size", 1.5),
    ],
)
def test_errors_name_the_key(key, value):
    with pytest.raises(ConfigError) as e:
        build_config({"checks": {key: value}}, source="m.toml")
    assert e.value.key == f"checks.{key}"
    assert f"m.toml: checks.{key}: " in str(e.value)


def pipeline(checks: dict):
    config = build_config({"checks": checks})
    return policy_pipeline(config, task.Clock(), FakeDirectory({}), FakeSenderPolicy({}))


def test_pipeline_without_scanners_has_only_the_quota_check_at_data():
    assert [c.name for c in pipeline({}).checks_for(Phase.DATA)] == ["quota"]


def test_pipeline_builds_clamd_then_spamd_and_clamd_fails_closed():
    p = pipeline(
        {
            "spamd": "127.0.0.1:783",
            "clamd": "127.0.0.1:3310",
            "fail": "open",
            "spam_action": "reject",
            "spam_threshold": 4.5,
            "spam_max_size": 2048,
        }
    )
    _quota, virus, spam = p.checks_for(Phase.DATA)
    assert isinstance(virus, VirusCheck) and virus.action == "reject"
    assert isinstance(spam, SpamCheck)
    assert (spam.action, spam.threshold, spam.max_size) == ("reject", 4.5, 2048)
    assert p._fail_open["clamd"] is False and p._fail_open["spamd"] is True


def test_quarantine_is_an_action_now_that_delivery_holds_messages_back():
    config = build_config({"checks": {"virus_action": "quarantine", "spam_action": "quarantine"}})
    assert (config.checks.virus_action, config.checks.spam_action) == ("quarantine", "quarantine")
