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
        ({"checks": {"blocked_attachments": "exe"}}, "checks.blocked_attachments"),
        ({"checks": {"blocked_attachments": ["exe", "a b"]}}, "checks.blocked_attachments[1]"),
        ({"checks": {"attachment_action": "drop"}}, "checks.attachment_action"),
        ({"checks": {"dnsbl": ["zen.example", "no zone"]}}, "checks.dnsbl[1]"),
        ({"checks": {"dnswl": "wl.example"}}, "checks.dnswl"),
        ({"checks": {"dnsbl_action": "quarantine"}}, "checks.dnsbl_action"),
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


def test_contract_values_this_version_cannot_serve_are_refused(monkeypatch):
    """A value of the operator contract whose feature a build lacks is refused by
    name, not run as something else (every value of this build is served: the
    mechanism is shown on a build without the PostgreSQL queue)."""
    from mta.config import model

    monkeypatch.setitem(model._NOT_YET, "queue.backend", ("local",))
    with pytest.raises(ConfigError) as e:
        build_config(
            {"queue": {"backend": "postgresql"}, "database": {"dsn": "postgresql://h/d"}},
            source="mta.toml",
        )
    assert e.value.key == "queue.backend" and "not available in this version" in str(e.value)


def test_the_postgresql_queue_needs_a_postgresql_dsn_and_a_sane_lease():
    with pytest.raises(ConfigError) as e:
        build_config({"queue": {"backend": "postgresql"}}, source="mta.toml")
    assert e.value.key == "database.dsn" and "postgresql://" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_config(
            {
                "queue": {"backend": "postgresql", "lease": 1},
                "database": {"dsn": "postgresql://h/d"},
            },
            source="mta.toml",
        )
    assert e.value.key == "queue.lease"
    config = build_config(
        {"queue": {"backend": "postgresql", "lease": 30}, "database": {"dsn": "postgresql://h/d"}}
    )
    assert config.queue.lease == 30.0 and config.database.dsn == "postgresql://h/d"
    assert build_config({}).queue.backend == "local" and build_config({}).queue.lease == 60.0


# -- every error of the file at once (mta-admin check-config) ---------------------

THREE_MISTAKES = """\
hostname = 42
local_domains = ["example.test"]
postmaster = "pm@example.test"

[[listener]]
name = "smtp"
address = "127.0.0.1:2525"
tls = "maybe"

[limits]
max_recipients = "ten"
"""


def test_all_errors_of_a_file_are_reported_together(tmp_path):
    path = tmp_path / "three.toml"
    path.write_text(THREE_MISTAKES)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert [error.key for error in e.value.errors] == [
        "hostname",
        "listener[0].tls",
        "limits.max_recipients",
    ]
    first, *rest = str(e.value).splitlines()
    assert first == f"{path}: 3 errors"
    assert rest == [
        f"{path}: hostname: must be a string",
        f"{path}: listener[0].tls: must be one of none, starttls, required, implicit",
        f"{path}: limits.max_recipients: must be an integer",
    ]
    assert e.value.key == "hostname"


def test_one_error_is_reported_as_before():
    with pytest.raises(ConfigError) as e:
        build_config({"limits": {"max_recipients": "ten"}}, source="m.toml")
    assert str(e.value) == "m.toml: limits.max_recipients: must be an integer"
    assert e.value.errors == (e.value,)


def test_errors_in_every_part_are_collected():
    data = {
        "bogus": 1,
        "workers": -1,
        "relay_networks": ["10.0.0.0/33", "nope"],
        "listener": [{"name": "smtp", "address": "x", "auth": "maybe", "color": "red"}],
        "storage": {"backend": "floppy", "size": 1},
        "queue": {"max_age": -1},
        "dkim": {"selector": "-bad-", "domains": ["ok.test", "not a domain"]},
        "http": {"address": "nowhere"},
        "checks": 5,
    }
    with pytest.raises(ConfigError) as e:
        build_config(data, source="m.toml")
    assert sorted(error.key for error in e.value.errors) == sorted(
        [
            "bogus",
            "workers",
            "relay_networks[0]",
            "relay_networks[1]",
            "listener[0].color",
            "listener[0].address",
            "listener[0].auth",
            "storage.backend",
            "storage.size",
            "queue.max_age",
            "dkim.selector",
            "dkim.domains[1]",
            "http.address",
            "checks",
        ]
    )
    assert all(line.startswith("m.toml: ") for line in str(e.value).splitlines())


def test_a_broken_local_domains_does_not_also_blame_postmaster():
    with pytest.raises(ConfigError) as e:
        build_config({"local_domains": "example.test", "postmaster": "pm@example.test"})
    assert [error.key for error in e.value.errors] == ["local_domains"]


def test_check_config_prints_every_error(tmp_path, capsys):
    from mta.admin.cli import main

    path = tmp_path / "three.toml"
    path.write_text(THREE_MISTAKES)
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    for key in ("hostname", "listener[0].tls", "limits.max_recipients"):
        assert f"{path}: {key}: " in err
    assert len(err.splitlines()) == 4


# -- the default host name ------------------------------------------------------


@pytest.mark.parametrize(
    "fqdn, host, expected",
    [
        ("mx.example.test", "mx", "mx.example.test"),
        ("localhost", "box7", "box7"),
        ("localhost.localdomain", "box7.example.test", "box7.example.test"),
        ("ip6-localhost", "box7", "box7"),
        ("", "box7", "box7"),
        ("box7", "box7.example.test", "box7.example.test"),
        ("box7", "box7", "box7"),
        ("Box7.Example.Test.", "box7", "box7.example.test"),
        ("localhost", "localhost", "localhost"),
        ("", "", "localhost"),
    ],
)
def test_default_hostname(fqdn, host, expected):
    from mta.config import default_hostname

    assert default_hostname(lambda: fqdn, lambda: host) == expected


def test_default_hostname_survives_failing_lookups():
    from mta.config import default_hostname

    def broken() -> str:
        raise OSError("no name")

    assert default_hostname(broken, lambda: "box7") == "box7"
    assert default_hostname(broken, broken) == "localhost"


def test_a_machine_whose_fqdn_is_localhost_uses_its_host_name(monkeypatch):
    monkeypatch.setattr("socket.getfqdn", lambda name="": "localhost")
    monkeypatch.setattr("socket.gethostname", lambda: "box7")
    cfg = build_config({})
    assert cfg.hostname == "box7"
    assert cfg.local_domains == ("localhost", "box7")
    assert cfg.is_local_domain("box7")


def test_blocked_attachments_are_normalised():
    cfg = build_config(
        {"checks": {"blocked_attachments": [".EXE", "js", "exe", "Application/X-Msdownload"]}}
    )
    assert cfg.checks.blocked_attachments == ("exe", "js", "application/x-msdownload")
    assert cfg.checks.attachment_action == "reject"
    cfg = build_config({"checks": {"dnsbl": ["Zen.Example.", "zen.example"], "dnswl": ["wl.test"]}})
    assert (cfg.checks.dnsbl, cfg.checks.dnswl, cfg.checks.dnsbl_action) == (
        ("zen.example",),
        ("wl.test",),
        "tag",
    )


def test_checks_section_defaults_and_reserved_contract_keys():
    cfg = build_config({})
    assert (cfg.checks.timeout, cfg.checks.fail) == (30.0, "closed")
    cfg = build_config(
        {"checks": {"timeout": 5, "fail": "open", "spf": "enforce", "spamd": "127.0.0.1:783"}}
    )
    assert (cfg.checks.timeout, cfg.checks.fail) == (5.0, "open")
