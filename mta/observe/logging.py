"""Log output: twisted.logger events -> one JSON object (or one text line) per event.

Every line carries `timestamp` (ISO-8601, UTC), `level`, `component` and `event`,
followed by the event's own named fields (`qid`, `sender`, `recipients`, `size`,
`duration`, `client` ...).  Twisted's `log_*` bookkeeping never appears, and neither
does any field whose name looks like a secret or a message body (`password`, `auth`,
`body`, `token`, `hash` ...): STYLE.md rule 9 holds even when a caller slips.

Legacy events (`twisted.python.log.msg` / `log.err`, which Twisted's own factories,
ports and Deferreds still use) are written like the others: their text is the message,
component `twisted`, a failure's traceback goes where a new-style failure's does, and
their bookkeeping (`message`, `isError`, `system`, `time`, `format`, `why` ...) is not
repeated as fields.  A legacy event without a level is info, except Twisted's
`Starting factory <...>` / `Stopping factory <...>` noise (one pair per outbound
connection), which is debug.

`make_observer("json", "info", sys.stdout)` is what the application installs;
`twistd --logger=mta.observe.logging.json_observer` uses it without any config.
"""

from __future__ import annotations

import datetime
import enum
import ipaddress
import json
import string
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

import twisted.logger
from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

__all__ = [
    "LEVELS",
    "Logger",
    "SENSITIVE",
    "event_fields",
    "event_level",
    "format_json",
    "format_text",
    "json_observer",
    "make_observer",
    "text_observer",
]

LEVELS: dict[str, LogLevel] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}

# A field whose lower-cased name contains one of these is never written.
SENSITIVE = (
    "password",
    "passwd",
    "secret",
    "auth",
    "body",
    "token",
    "hash",
    "credential",
    "cookie",
    "private",
)

_IP_TYPES = (
    ipaddress.IPv4Address,
    ipaddress.IPv6Address,
    ipaddress.IPv4Network,
    ipaddress.IPv6Network,
)
_CORE = ("timestamp", "level", "component", "event")
# Keys this module writes itself: an event's own field of that name is not copied.
_RESERVED = frozenset((*_CORE, "message"))
_MAX_DEPTH = 4

# What twisted.python.log puts into every event besides the caller's own fields, and
# what twisted.logger adds when it hands such an event to a new-style observer.
_LEGACY_KEYS = frozenset(
    ("message", "isError", "time", "system", "format", "why", "failure", "logLevel", "printed")
)
# Legacy messages without a level that are debug, not info.
_LEGACY_DEBUG_PREFIXES = ("Starting factory ", "Stopping factory ")


def _is_legacy(event: Mapping[str, Any]) -> bool:
    """Did `event` come from twisted.python.log (msg/err), not a twisted.logger Logger?"""
    return "isError" in event and isinstance(event.get("message"), tuple | list)


def _legacy_level(event: Mapping[str, Any]) -> Any:
    """The level of a legacy event: twisted.logger's, but factory start/stop is debug."""
    level = event.get("log_level")
    if level is LogLevel.info and not event.get("isError") and "logLevel" not in event:
        text = event.get("log_text")
        if not isinstance(text, str):
            text = " ".join(str(part) for part in event.get("message") or ())
        if text.startswith(_LEGACY_DEBUG_PREFIXES):
            return LogLevel.debug
    return level


def event_level(event: Mapping[str, Any]) -> Any:
    """The `LogLevel` an event is filtered and written at."""
    if _is_legacy(event):
        return _legacy_level(event)
    return event.get("log_level")


def _timestamp(event: Mapping[str, Any]) -> str:
    t = event.get("log_time")
    if not isinstance(t, int | float):
        t = datetime.datetime.now(datetime.UTC).timestamp()
    stamp = datetime.datetime.fromtimestamp(t, datetime.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _level(event: Mapping[str, Any]) -> str:
    name = getattr(event_level(event), "name", None)
    return name if isinstance(name, str) else "info"


def _component(event: Mapping[str, Any], legacy: bool = False) -> str:
    namespace = str(event.get("log_namespace") or "")
    if legacy and namespace in ("", "log_legacy"):
        return "twisted"
    parts = namespace.split(".")
    if parts[0] == "mta":
        return parts[1] if len(parts) > 1 else "mta"
    return namespace or "-"


def _message(event: Mapping[str, Any]) -> str | None:
    if event.get("log_format") is None and "log_failure" not in event:
        return None
    text = formatEvent(dict(event))
    return text or None


def _legacy_message(event: Mapping[str, Any], failure: Any) -> str | None:
    """A legacy event's text; for log.err, its `why` (the traceback is written apart)."""
    if failure is not None:
        why = event.get("why")
        return why if isinstance(why, str) and why else "Unhandled Error"
    text = event.get("log_text")
    if isinstance(text, str):
        return text or None
    if event.get("log_format") is not None:
        return _message(event)
    return " ".join(str(part) for part in event.get("message") or ()) or None


def _is_sensitive(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SENSITIVE)


def _public(name: Any) -> bool:
    return isinstance(name, str) and not name.startswith(("log_", "_")) and not _is_sensitive(name)


class _Unserialisable(Exception):
    pass


def _plain(value: Any, depth: int = 0) -> Any:
    """`value` as JSON-ready data, or raise `_Unserialisable`."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return (
            value if value == value and value not in (float("inf"), float("-inf")) else str(value)
        )
    if depth >= _MAX_DEPTH:
        raise _Unserialisable()
    if isinstance(value, enum.Enum):
        try:
            return _plain(value.value, depth + 1)
        except _Unserialisable:
            return value.name
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, _IP_TYPES):
        return str(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _Unserialisable()
            if _public(k):
                out[k] = _plain(v, depth + 1)
        return out
    if isinstance(value, list | tuple | set | frozenset):
        items = [_plain(v, depth + 1) for v in value]
        return sorted(items, key=repr) if isinstance(value, set | frozenset) else items
    # Our own value types (Address, Reply ...) define a str() that is their wire form.
    cls = type(value)
    if cls.__module__.startswith("mta.") and cls.__str__ is not object.__str__:
        return str(value)
    raise _Unserialisable()


def event_fields(event: Mapping[str, Any]) -> dict[str, Any]:
    """The ordered, filtered fields of one log line (shared by both formats)."""
    legacy = _is_legacy(event)
    out: dict[str, Any] = {
        "timestamp": _timestamp(event),
        "level": _level(event),
        "component": _component(event, legacy),
    }
    failure = event.get("log_failure")
    if legacy:
        if failure is None:
            failure = event.get("failure")
        message = _legacy_message(event, failure)
    else:
        message = _message(event)
    name = event.get("event")
    if isinstance(name, str) and name:
        out["event"] = name
        if message and message != name:
            out["message"] = message
    else:
        out["event"] = message or ""
    if legacy:
        system = event.get("system")
        if isinstance(system, str) and system not in ("", "-"):
            out["system"] = system
    for key, value in event.items():
        if key in out or key in _RESERVED or not _public(key):
            continue
        if legacy and key in _LEGACY_KEYS:
            continue
        try:
            out[key] = _plain(value)
        except _Unserialisable:
            continue
    if failure is not None:
        try:
            out["error_type"] = failure.type.__name__
            out["error"] = failure.getErrorMessage()
            out["traceback"] = failure.getTraceback()
        except Exception:  # a broken failure must not break logging
            out["error"] = repr(failure)
    return out


def format_json(event: Mapping[str, Any]) -> str:
    """One JSON object, no newline inside, ending in a newline."""
    return json.dumps(event_fields(event), separators=(",", ":")) + "\n"


def _format_fields(fmt: Any) -> set[str]:
    if not isinstance(fmt, str):
        return set()
    try:
        return {
            name.split(".")[0].split("[")[0]
            for _, name, _, _ in string.Formatter().parse(fmt)
            if name
        }
    except ValueError:
        return set()


def _text_value(value: Any) -> str:
    if (
        isinstance(value, str)
        and value
        and value.isprintable()
        and " " not in value
        and '"' not in value
    ):
        return value
    return json.dumps(value)


def format_text(event: Mapping[str, Any]) -> str:
    """`<timestamp> <level> [<component>] <message> key=value ...`, traceback indented below."""
    fields = event_fields(event)
    traceback = fields.pop("traceback", None)
    shown = _format_fields(event.get("log_format"))
    head = fields.pop("message", None) or fields["event"]
    if not isinstance(head, str):
        head = _text_value(head)
    head = head.replace("\r", "\\r").replace("\n", "\\n")
    parts = [
        fields.pop("timestamp"),
        f"{fields.pop('level'):<8}",
        f"[{fields.pop('component')}]",
        head,
    ]
    event_name = fields.pop("event")
    if event_name != head:
        parts.append(f"event={_text_value(event_name)}")
    for key, value in fields.items():
        if key not in shown:
            parts.append(f"{key}={_text_value(value)}")
    line = " ".join(parts) + "\n"
    if traceback:
        line += "".join("    " + tb_line + "\n" for tb_line in traceback.rstrip("\n").split("\n"))
    return line


@implementer(ILogObserver)
class _LineObserver:
    """Writes `formatter(event)` to `stream` and flushes, one line per event."""

    def __init__(self, formatter, stream: IO[str]):
        self._formatter = formatter
        self._stream = stream

    def __call__(self, event: Mapping[str, Any]) -> None:
        try:
            line = self._formatter(event)
        except Exception as e:  # never lose the event entirely
            line = (
                json.dumps(
                    {"level": "error", "component": "log", "event": f"unformattable event: {e!r}"}
                )
                + "\n"
            )
        try:
            self._stream.write(line)
        except UnicodeEncodeError:
            self._stream.write(line.encode("ascii", "backslashreplace").decode("ascii"))
        self._stream.flush()


def make_observer(
    format: str = "json", level: str = "info", stream: IO[str] | None = None
) -> ILogObserver:
    """An observer writing `format` ("json" or "text") lines at `level` and above."""
    if format not in ("json", "text"):
        raise ValueError(f"log format must be json or text, not {format!r}")
    try:
        min_level = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}") from None
    out = sys.stdout if stream is None else stream
    inner = _LineObserver(format_json if format == "json" else format_text, out)
    return _AtLeast(inner, min_level)


_ORDER = (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical)
_KNOWN_LEVELS = frozenset(_ORDER)


@implementer(ILogObserver)
class _AtLeast:
    """Passes events of `level` or above on to `observer`.  One set lookup per
    event; FilteringLogObserver with LogLevelFilterPredicate (per-namespace levels,
    which we do not use) walks the event's namespace every time."""

    def __init__(self, observer: ILogObserver, level: LogLevel):
        self._levels = frozenset(_ORDER[_ORDER.index(level) :])
        self._observer = observer

    def __call__(self, event: Mapping[str, Any]) -> None:
        level = event.get("log_level")
        if "isError" in event:  # a legacy twisted.python.log event
            level = event_level(event)
        if level in self._levels:
            self._observer(event)


class Logger(twisted.logger.Logger):
    """`twisted.logger.Logger` with a cheaper `emit`.

    Twisted's emit validates the level with ``level not in LogLevel.iterconstants()``,
    which builds and sorts the list of levels on every event; at four events per
    message that was over 1% of the reactor's time.  This one checks a frozenset and
    otherwise does exactly what Twisted's does (an unknown level still goes to
    Twisted's emit, which reports it)."""

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        if level not in _KNOWN_LEVELS:
            super().emit(level, format, **kwargs)
            return
        kwargs.update(
            log_logger=self,
            log_level=level,
            log_namespace=self.namespace,
            log_source=self.source,
            log_format=format,
            log_time=time.time(),
        )
        if "log_trace" in kwargs:
            kwargs["log_trace"].append((self, self.observer))  # type: ignore[attr-defined]
        self.observer(kwargs)


def json_observer() -> ILogObserver:
    """For `twistd --logger=mta.observe.logging.json_observer`: JSON lines on stdout."""
    return make_observer("json", "info", sys.stdout)


def text_observer() -> ILogObserver:
    """For `twistd --logger=mta.observe.logging.text_observer`."""
    return make_observer("text", "info", sys.stdout)
