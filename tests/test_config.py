"""Config validation: every error names the file and the key."""

import pytest

from mta.config import ConfigError, build_config, load_config


def test_defaults_are_complete():
    cfg = load_config(None)
    names = [lst.name for lst in cfg.listeners]
    assert names == ["smtp", "submission", "smtps"]
    assert [lst.port for lst in cfg.listeners] == [2525, 2587, 2465]
    assert "localhost" in cfg.local_domains
    assert cfg.postmaster == "postmaster@localhost"
    assert cfg.http.address == "127.0.0.1:8081"


@pytest.mark.parametrize(
    "data,key",
    [
        ({"bogus": 1}, "bogus"),
        ({"limits": {"max_message_sise": 1}}, "limits.max_message_sise"),
        ({"limits": {"max_recipients": "ten"}}, "limits.max_recipients"),
        ({"limits": {"idle_timeout": -1}}, "limits.idle_timeout"),
        ({"relay_networks": ["10.0.0.0/33"]}, "relay_networks[0]"),
        ({"postmaster": "nobody@elsewhere.test"}, "postmaster"),
        ({"listener": [{"name": "smtp", "address": "127.0.0.1"}]}, "listener[0].address"),
        (
            {"listener": [{"name": "smtp", "address": "127.0.0.1:25", "tls": "maybe"}]},
            "listener[0].tls",
        ),
        ({"storage": {"backend": "floppy"}}, "storage.backend"),
        ({"queue": {"retry_schedule": [60, -1]}}, "queue.retry_schedule"),
        ({"checks": {"fail": "maybe"}}, "checks.fail"),
        ({"limits": {"bare_newlines": "keep"}}, "limits.bare_newlines"),
        ({"limits": {"min_data_rate": -1}}, "limits.min_data_rate"),
        ({"checks": {"timeout": 0}}, "checks.timeout"),
        ({"checks": {"timeout": "soon"}}, "checks.timeout"),
        ({"checks": {"spf_mode": "on"}}, "checks.spf_mode"),
        ({"checks": []}, "checks"),
    ],
)
def test_errors_name_the_key(data, key):
    with pytest.raises(ConfigError) as e:
        build_config(data, source="/etc/mta/mta.toml")
    assert e.value.key == key
    assert str(e.value).startswith(f"/etc/mta/mta.toml: {key}: ")


def test_file_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("hostname = \n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert str(p) in str(e.value)
    with pytest.raises(ConfigError):
        load_config(str(tmp_path / "missing.toml"))


def test_relative_datadir_resolves_against_the_file(tmp_path):
    p = tmp_path / "etc" / "mta.toml"
    p.parent.mkdir()
    p.write_text(
        'datadir = "../var"\nlocal_domains = ["example.test"]\npostmaster = "pm@example.test"\n'
    )
    cfg = load_config(str(p))
    assert cfg.datadir == str(tmp_path / "var")
    assert load_config(str(p), datadir=str(tmp_path / "x")).datadir == str(tmp_path / "x")


@pytest.mark.parametrize(
    "data,key",
    [
        ({"storage": {"backend": "s3"}}, "storage.backend"),
        ({"queue": {"backend": "postgresql"}}, "queue.backend"),
        ({"storage": {"encrypt": True}}, "storage.encrypt"),
    ],
)
def test_contract_values_this_version_cannot_serve_are_refused(data, key):
    with pytest.raises(ConfigError) as e:
        build_config(data, source="mta.toml")
    assert e.value.key == key and "not available in this version" in str(e.value)


def test_checks_section_defaults_and_reserved_contract_keys():
    cfg = build_config({})
    assert (cfg.checks.timeout, cfg.checks.fail) == (30.0, "closed")
    cfg = build_config(
        {"checks": {"timeout": 5, "fail": "open", "spf": "enforce", "spamd": "127.0.0.1:783"}}
    )
    assert (cfg.checks.timeout, cfg.checks.fail) == (5.0, "open")
