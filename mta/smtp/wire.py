"""Putting replies on the wire without a reactor turn per reply.

Twisted's `FileDescriptor.write` never writes: it queues the bytes, registers the
socket for writability (``epoll_ctl``), and sends on the next reactor turn, after
which it unregisters it again (``epoll_ctl``).  An SMTP session without pipelining
sends one small reply per client round trip, four per message, so that is eight
``epoll_ctl`` calls and four extra reactor turns per message for bytes the kernel
would have taken at once.  `send` offers them to the socket directly when nothing
is queued ahead of them and hands whatever the kernel did not take to the
transport's normal buffer, so ordering, flow control and error handling stay
Twisted's.  Anything that is not a plain TCP connection (TLS, test transports,
wrappers) just gets ``transport.write``.
"""

from __future__ import annotations

from twisted.internet import tcp


def send(transport, data: bytes) -> None:
    """Write `data` to `transport`, straight to its socket when that is safe."""
    if not data:
        return
    if (
        type(transport) is tcp.Server
        and not transport.TLS
        and transport.connected
        and not transport._writeDisconnected
        and not transport._tempDataBuffer
        and transport.offset == len(transport.dataBuffer)
    ):
        try:
            sent = transport.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # Let the transport meet the same error in doWrite and close cleanly.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
