"""mta.observe.logging: JSON and text lines from twisted.logger events."""

from __future__ import annotations

import contextlib
import datetime
import enum
import io
import ipaddress
import json
import logging

import attrs
import pytest
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from mta.observe.logging import format_json, format_text, make_observer

T0 = 1795000000.25  # a fixed instant with milliseconds


def capture(format: str = "json", level: str = "debug", namespace: str = "mta.queue.runner"):
    """A Logger whose events go only to a fresh observer writing into a StringIO."""
    stream = io.StringIO()
    observer = make_observer(format, level, stream)
    log = Logger(namespace=namespace, observer=observer)
    return log, stream


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def event(**fields):
    base = {
        "log_time": T0,
        "log_level": LogLevel.info,
        "log_namespace": "mta.smtp.server",
        "log_source": None,
        "log_logger": None,
        "log_format": None,
    }
    base.update(fields)
    return base


class Color(enum.Enum):
    RED = "red"


@attrs.frozen
class Opaque:
    x: int = 1


def test_observer_provides_ilogobserver():
    assert verifyObject(ILogObserver, make_observer("json", "info", io.StringIO()))
    assert verifyObject(ILogObserver, make_observer("text", "info", io.StringIO()))


def test_json_line_has_core_fields_and_named_fields():
    log, stream = capture()
    log.info(
        "queued {qid} from {sender}",
        event="queued",
        qid="Q123",
        sender="alice@example.test",
        recipients=["bob@example.test"],
        size=4096,
        duration=0.012,
        client="127.0.0.1",
    )
    [line] = lines(stream)
    assert list(line)[:4] == ["timestamp", "level", "component", "event"]
    assert line["level"] == "info"
    assert line["component"] == "queue"
    assert line["event"] == "queued"
    assert line["message"] == "queued Q123 from alice@example.test"
    assert line["qid"] == "Q123"
    assert line["recipients"] == ["bob@example.test"]
    assert line["size"] == 4096
    assert line["duration"] == 0.012
    assert line["client"] == "127.0.0.1"
    assert not [k for k in line if k.startswith("log_")]
    stamp = datetime.datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
    assert stamp.utcoffset() == datetime.timedelta(0)
    assert line["timestamp"].endswith("Z")


def test_timestamp_is_utc_iso8601():
    line = json.loads(format_json(event(event="x")))
    expected = datetime.datetime.fromtimestamp(T0, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    assert line["timestamp"] == expected + ".250Z"


def test_event_falls_back_to_formatted_message():
    line = json.loads(format_json(event(log_format="connection from {client}", client="10.0.0.1")))
    assert line["event"] == "connection from 10.0.0.1"
    assert "message" not in line
    assert line["client"] == "10.0.0.1"


@pytest.mark.parametrize(
    "namespace, component",
    [
        ("mta.smtp.server", "smtp"),
        ("mta.queue", "queue"),
        ("mta", "mta"),
        ("twisted.mail.smtp", "twisted.mail.smtp"),
        ("mtafoo.bar", "mtafoo.bar"),
    ],
)
def test_component_from_namespace(namespace, component):
    line = json.loads(format_json(event(event="e", log_namespace=namespace)))
    assert line["component"] == component


@pytest.mark.parametrize(
    "name",
    [
        "password",
        "auth_string",
        "AUTH",
        "body",
        "message_body",
        "password_hash",
        "api_token",
        "secret",
    ],
)
def test_sensitive_fields_never_written(name):
    for fmt in (format_json, format_text):
        out = fmt(event(event="login", **{name: "hunter2-SENSITIVE"}))
        assert "hunter2-SENSITIVE" not in out
        assert name not in out


def test_sensitive_keys_inside_dicts_are_dropped():
    line = json.loads(format_json(event(event="e", params={"user": "a", "password": "pw"})))
    assert line["params"] == {"user": "a"}


def test_unserialisable_fields_are_dropped_and_known_types_converted():
    line = json.loads(
        format_json(
            event(
                event="e",
                obj=Opaque(),
                raw=b"bytes might be a body",
                color=Color.RED,
                peer=ipaddress.ip_address("::1"),
                tags={"b", "a"},
                when=datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC),
                nan=float("nan"),
            )
        )
    )
    assert "obj" not in line
    assert "raw" not in line
    assert line["color"] == "red"
    assert line["peer"] == "::1"
    assert line["tags"] == ["a", "b"]
    assert line["when"] == "2026-01-02T00:00:00+00:00"
    assert line["nan"] == "nan"


def test_mta_value_types_use_their_str():
    from mta.envelope import parse_mailbox

    line = json.loads(format_json(event(event="e", sender=parse_mailbox("a@example.test"))))
    assert line["sender"] == "a@example.test"


def test_failure_is_logged_with_traceback():
    log, stream = capture()
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        log.failure("unexpected error in session", Failure(), event="session_error", qid="Q1")
    [line] = lines(stream)
    assert line["level"] == "critical"
    assert line["event"] == "session_error"
    assert line["error_type"] == "ZeroDivisionError"
    assert "ZeroDivisionError" in line["traceback"]
    assert line["qid"] == "Q1"


def test_level_filter():
    log, stream = capture(level="warn")
    log.debug("d", event="d")
    log.info("i", event="i")
    log.warn("w", event="w")
    log.error("e", event="e")
    assert [line["event"] for line in lines(stream)] == ["w", "e"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="format"):
        make_observer("xml", "info", io.StringIO())
    with pytest.raises(ValueError, match="level"):
        make_observer("json", "loud", io.StringIO())


def test_one_line_per_event_even_with_newlines():
    log, stream = capture()
    log.info("two\nlines {x}", x="a\nb", event="multi")
    assert len(stream.getvalue().splitlines()) == 1
    assert lines(stream)[0]["x"] == "a\nb"


def test_text_format():
    log, stream = capture("text", namespace="mta.smtp.session")
    log.info("accepted {qid}", event="accepted", qid="Q9", size=10, client="1.2.3.4 x")
    out = stream.getvalue()
    assert out.count("\n") == 1
    assert out.startswith("20")
    assert " info " in out
    assert "[smtp] accepted Q9 " in out
    assert "size=10" in out
    assert 'client="1.2.3.4 x"' in out
    assert "qid=" not in out  # already in the message


def test_text_format_escapes_newlines_and_indents_traceback():
    log, stream = capture("text")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.failure("oops\ninjected", event="crash")
    first, *rest = stream.getvalue().splitlines()
    assert "oops\\ninjected" in first
    assert "event=crash" in first
    assert rest and all(line.startswith("    ") for line in rest)
    assert "RuntimeError" in rest[-1]


def test_text_event_without_format():
    out = format_text(event(event="started", listener="smtp"))
    assert "[smtp] started listener=smtp" in out


def test_non_ascii_stream_does_not_lose_events():
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii", write_through=True)
    observer = make_observer("text", "info", stream)
    observer(event(event="rcpt", rcpt="jörg@example.test"))
    assert b"rcpt=j" in raw.getvalue()


def test_our_logger_emits_what_twisteds_does():
    import twisted.logger

    from mta.observe.logging import Logger as FastLogger

    seen = []

    class Source:
        log = FastLogger()

    fast = Source().log
    fast.observer = seen.append
    plain = twisted.logger.Logger(namespace=fast.namespace, source=fast.source)
    plain.observer = seen.append
    fast.info("hello {who}", who="world", event="greet")
    plain.info("hello {who}", who="world", event="greet")
    mine, theirs = seen
    assert set(mine) == set(theirs)
    for key in set(mine) - {"log_logger", "log_time"}:
        assert mine[key] == theirs[key], key
    assert isinstance(mine["log_source"], Source) and mine["log_namespace"].endswith("Source")


def test_our_logger_still_reports_an_unknown_level():
    from mta.observe.logging import Logger as FastLogger

    seen = []
    log = FastLogger(namespace="test", observer=seen.append)
    log.emit("not-a-level", "x")
    [report] = seen
    assert report["log_level"] is LogLevel.critical
    assert "invalid log level" in report["log_format"].lower()


# --------------------------------------------------------------------------- legacy events
# Twisted's own factories, ports and Deferreds still log through twisted.python.log;
# these go through the real global publishers, exactly as under twistd.


@contextlib.contextmanager
def global_capture(format: str, level: str = "debug"):
    """Our observer on twisted.logger's global publisher, for the duration."""
    stream = io.StringIO()
    observer = make_observer(format, level, stream)
    globalLogPublisher.addObserver(observer)
    try:
        yield stream
    finally:
        globalLogPublisher.removeObserver(observer)


def emit_legacy_and_new_events() -> None:
    legacy_log.msg("SMTPFactory starting on 2525")
    legacy_log.msg("Starting factory <twisted.mail.smtp.SMTPSenderFactory object at 0x7f00>")
    legacy_log.msg(
        format="Unable to write to plugin cache %(path)s: error number %(errno)d",
        path="/x/dropin.cache",
        errno=13,
    )
    legacy_log.msg("multi", "part", system="ESMTP,3,127.0.0.1")
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        legacy_log.err(None, "Unhandled error in Deferred:")
    Logger(namespace="mta.smtp.server").info("accepted {qid}", qid="Q1", event="accepted")


LEGACY_BOOKKEEPING = ("isError", "system=-", "time=", "format=", "why=", "message", "failure")


def test_legacy_and_new_events_as_text():
    with global_capture("text") as stream:
        emit_legacy_and_new_events()
    out = stream.getvalue()
    assert "unformattable" not in out
    heads = [line.split(" ", 1)[1] for line in out.splitlines() if not line.startswith("    ")]
    assert heads == [
        "info     [twisted] SMTPFactory starting on 2525",
        "debug    [twisted] Starting factory <twisted.mail.smtp.SMTPSenderFactory object at 0x7f00>",
        "info     [twisted] Unable to write to plugin cache /x/dropin.cache: error number 13 path=/x/dropin.cache errno=13",
        "info     [twisted] multi part system=ESMTP,3,127.0.0.1",
        'critical [twisted] Unhandled error in Deferred: error_type=ZeroDivisionError error="division by zero"',
        "info     [smtp] accepted Q1 event=accepted",
    ]
    traceback = [line for line in out.splitlines() if line.startswith("    ")]
    assert traceback[0] == "    Traceback (most recent call last):"
    assert traceback[-1].endswith("ZeroDivisionError: division by zero")
    for word in LEGACY_BOOKKEEPING:
        assert word not in "\n".join(heads), word


def test_legacy_and_new_events_as_json():
    with global_capture("json") as stream:
        emit_legacy_and_new_events()
    records = lines(stream)
    for record in records:
        record.pop("timestamp")
    started, factory, cache, multi, error, accepted = records
    assert started == {
        "level": "info",
        "component": "twisted",
        "event": "SMTPFactory starting on 2525",
    }
    assert factory["level"] == "debug" and factory["event"].startswith("Starting factory <")
    assert cache == {
        "level": "info",
        "component": "twisted",
        "event": "Unable to write to plugin cache /x/dropin.cache: error number 13",
        "path": "/x/dropin.cache",
        "errno": 13,
    }
    assert multi == {
        "level": "info",
        "component": "twisted",
        "event": "multi part",
        "system": "ESMTP,3,127.0.0.1",
    }
    assert error["level"] == "critical"
    assert error["event"] == "Unhandled error in Deferred:"
    assert error["error_type"] == "ZeroDivisionError"
    assert error["traceback"].rstrip().endswith("ZeroDivisionError: division by zero")
    assert set(error) == {"level", "component", "event", "error_type", "error", "traceback"}
    assert accepted == {
        "level": "info",
        "component": "smtp",
        "event": "accepted",
        "message": "accepted Q1",
        "qid": "Q1",
    }


@pytest.mark.parametrize("format", ["json", "text"])
def test_factory_start_and_stop_are_debug(format):
    with global_capture(format, level="info") as stream:
        legacy_log.msg("Starting factory <twisted.mail.smtp.SMTPSenderFactory object at 0x7f00>")
        legacy_log.msg("Stopping factory <mta.delivery.relay.OneShotFactory object at 0x7f01>")
        legacy_log.msg("SMTPFactory starting on 2525")
        legacy_log.msg("a warning from an old library", logLevel=logging.WARNING)
    out = stream.getvalue()
    assert "factory <" not in out
    assert "SMTPFactory starting on 2525" in out
    assert "a warning from an old library" in out
    assert len(out.splitlines()) == 2


def test_a_field_named_message_cannot_break_the_text_line():
    out = format_text(event(log_format="odd {x}", x=1, message=["a", "list"]))
    assert "odd 1" in out and "unformattable" not in out
