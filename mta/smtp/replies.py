"""The fixed replies of the SMTP server, each with its RFC 3463 enhanced code.

Client text echoed into a reply (the EHLO name, a parameter name) goes through
`printable` first: a reply never carries a control character or a byte the client
chose outside printable ASCII.
"""

import re

from mta.envelope import Reply

_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def printable(text: str, limit: int = 100) -> str:
    """`text` with every character outside printable ASCII replaced by '?', cut to
    `limit` characters: safe to echo into a reply."""
    return _UNPRINTABLE.sub("?", text[:limit])


EHLO_KEYWORDS = (
    "PIPELINING",
    "SIZE {max_size}",
    "8BITMIME",
    "SMTPUTF8",
    "ENHANCEDSTATUSCODES",
    "CHUNKING",
    "DSN",
)


def ehlo(hostname: str, client: str, max_size: int, *, starttls: bool, auth=()) -> Reply:
    """The EHLO reply: greeting line, then the extensions we offer."""
    lines = [f"{hostname} Hello {printable(client, 200)}"[:200]]
    lines += (k.format(max_size=max_size) for k in EHLO_KEYWORDS)
    if starttls:
        lines.append("STARTTLS")
    if auth:
        lines.append("AUTH " + " ".join(auth))
    return Reply(250, "", "\n".join(lines))


OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
BYE = Reply(221, "2.0.0", "Bye")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
START_TLS = Reply(220, "2.0.0", "Ready to start TLS")
HELP = Reply(
    214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT STARTTLS (RFC 5321)"
)
VRFY = Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")
VRFY_SYNTAX = Reply(501, "5.5.4", "Syntax: VRFY address")

UNKNOWN_COMMAND = Reply(500, "5.5.2", "Error: command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
BAD_UTF8 = Reply(500, "5.5.2", "Error: invalid UTF-8 in command")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(554, "5.5.1", "Error: no valid recipients")
MIXED_DATA_BDAT = Reply(503, "5.5.1", "Error: DATA and BDAT cannot be mixed in one transaction")
NO_ARGUMENTS = Reply(501, "5.5.4", "Syntax error: no arguments allowed")
EHLO_SYNTAX = Reply(501, "5.5.4", "Syntax: EHLO hostname")
HELO_SYNTAX = Reply(501, "5.5.4", "Syntax: HELO hostname")
BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]")
TLS_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_UNAVAILABLE = Reply(502, "5.5.1", "Error: authentication not enabled")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "Error: AUTH not allowed during a mail transaction")
PARAMS_NEED_EHLO = Reply(555, "5.5.4", "MAIL/RCPT parameters require EHLO")
NEED_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
BARE_LINE_ENDINGS = Reply(
    550, "5.6.11", "Message contains bare CR or LF line endings (SMTP smuggling protection)"
)
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops (mail loop?)")
INTERNAL_ERROR = Reply(451, "4.3.0", "Error: internal error, try again later")
QUEUE_WRITE_ERROR = Reply(451, "4.3.0", "Error: queue file write error")
NO_SPACE = Reply(452, "4.3.1", "Insufficient system storage")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Error: too many errors")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Error: too many connections")
TOO_MANY_FROM_IP = Reply(421, "4.7.0", "Error: too many connections from your address")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down")
HTTP_PROBE = Reply(421, "4.7.0", "This is an SMTP server, not an HTTP proxy")
