"""SASL PLAIN (RFC 4616) and LOGIN for SMTP AUTH (RFC 4954), as pure state machines.

No I/O and no checking of passwords here: the session starts an exchange with
`start(mechanism, initial_response)` and gets either `Credentials` (done) or a
`Challenge` whose `reply` (334 + base64) it sends; the client's next line goes to
`challenge.step(line)`, which again returns `Credentials` or a `Challenge`.  Every
error is a `SASLError` carrying the reply to send; the exchange is then over and
the session goes back to reading commands.

- malformed base64, or a PLAIN message that is not `[authzid] NUL authcid NUL
  passwd` -> 501 5.5.2; `*` -> 501 5.7.0 (RFC 4954 section 4);
- an unknown mechanism -> 504 5.5.4;
- a PLAIN authorization identity other than empty or the authcid -> 535 5.7.8
  (we never let one user act as another).

The initial response `=` means an empty one (RFC 4954 section 4).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

import attrs

from mta.envelope import Reply

MECHANISMS = ("PLAIN", "LOGIN")

ABORTED = Reply(501, "5.7.0", "Authentication aborted")
BAD_BASE64 = Reply(501, "5.5.2", "Invalid base64 data in AUTH exchange")
BAD_PLAIN = Reply(501, "5.5.2", "Invalid PLAIN message: expected [authzid] NUL authcid NUL passwd")
BAD_UTF8 = Reply(501, "5.5.2", "Authentication identity is not valid UTF-8")
EMPTY_CREDENTIALS = Reply(501, "5.5.2", "Empty authentication identity or password")
UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
AUTHZID_REFUSED = Reply(535, "5.7.8", "Authorization identity must be empty or the login name")

# RFC 4954 section 4: 12288 octets for an AUTH line or a response line.
MAX_LINE = 12288


class SASLError(Exception):
    """The exchange failed; `reply` is what the session sends."""

    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply


@attrs.frozen(repr=False)
class Credentials:
    """What the client sent; never logged (repr hides the password)."""

    mechanism: str
    authcid: str
    password: bytes

    def __repr__(self) -> str:
        return f"Credentials(mechanism={self.mechanism!r}, authcid={self.authcid!r})"


@attrs.frozen(repr=False)
class Challenge:
    """Send `reply`; feed the client's answer to `step`."""

    mechanism: str
    reply: Reply
    _next: Callable[[bytes], Credentials | Challenge]

    def step(self, line: bytes | str) -> Credentials | Challenge:
        return self._next(_decode_response(line))

    def __repr__(self) -> str:
        return f"Challenge(mechanism={self.mechanism!r}, reply={self.reply!r})"


def parse_auth_argument(arg: str) -> tuple[str, str | None]:
    """`AUTH` arguments -> (mechanism upper-cased, initial response or None)."""
    parts = arg.split()
    if not parts or len(parts) > 2:
        raise SASLError(AUTH_SYNTAX)
    return parts[0].upper(), parts[1] if len(parts) == 2 else None


def start(mechanism: str, initial_response: bytes | str | None) -> Credentials | Challenge:
    """Begin an exchange; raises `SASLError`."""
    name = mechanism.upper()
    if name == "PLAIN":
        if initial_response is None:
            return _challenge("PLAIN", b"", _plain)
        return _plain(_decode_response(initial_response, initial=True))
    if name == "LOGIN":
        if initial_response is None:
            return _challenge("LOGIN", b"Username:", _login_username)
        return _login_username(_decode_response(initial_response, initial=True))
    raise SASLError(UNKNOWN_MECHANISM)


def _challenge(
    mechanism: str, data: bytes, then: Callable[[bytes], Credentials | Challenge]
) -> Challenge:
    text = base64.b64encode(data).decode("ascii")
    return Challenge(mechanism, Reply(334, "", text), then)


def _decode_response(line: bytes | str, *, initial: bool = False) -> bytes:
    if isinstance(line, bytes):
        try:
            line = line.decode("ascii")
        except UnicodeDecodeError:
            raise SASLError(BAD_BASE64) from None
    text = line.strip()
    if text == "*":
        raise SASLError(ABORTED)
    if initial and text == "=":
        return b""
    if len(text) > MAX_LINE:
        raise SASLError(BAD_BASE64)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SASLError(BAD_BASE64) from None


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError(BAD_UTF8) from None


def _plain(message: bytes) -> Credentials:
    parts = message.split(b"\x00")
    if len(parts) != 3:
        raise SASLError(BAD_PLAIN)
    authzid, authcid, password = parts
    if not authcid or not password:
        raise SASLError(EMPTY_CREDENTIALS)
    authcid_text = _utf8(authcid)
    if authzid and _utf8(authzid).strip().lower() != authcid_text.strip().lower():
        raise SASLError(AUTHZID_REFUSED)
    return Credentials("PLAIN", authcid_text, password)


def _login_username(data: bytes) -> Challenge:
    if not data:
        raise SASLError(EMPTY_CREDENTIALS)
    username = _utf8(data)
    return _challenge("LOGIN", b"Password:", lambda pw: _login_password(username, pw))


def _login_password(username: str, password: bytes) -> Credentials:
    if not password:
        raise SASLError(EMPTY_CREDENTIALS)
    return Credentials("LOGIN", username, password)
