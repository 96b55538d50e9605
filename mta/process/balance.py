"""Spreading connections evenly over the worker processes.

SO_REUSEPORT hashes each new connection to one of the workers' sockets.  Over many
short connections that evens out, but a handful of long-lived ones (a submission
client pool, a relay peer keeping 20 connections open) can land 13 to 7, and the
busier process then limits everybody.  So every worker publishes how many sessions
it holds in a small shared table, and a worker that holds two more than the least
loaded one hands a freshly accepted connection over: the socket travels as
SCM_RIGHTS over a Unix datagram socket, before anything was read from or written
to it, and the receiver adopts it as if it had accepted it itself.  Any failure on
the way (the peer is restarting, its queue is full) simply keeps the connection
where it is.
"""

from __future__ import annotations

import array
import hashlib
import mmap
import os
import socket
import struct

from twisted.internet import protocol

from mta.observe.logging import Logger

log = Logger()

_SLOT = struct.Struct("=q")


class LoadTable:
    """One signed 64-bit session count per worker, in a shared memory-mapped file."""

    def __init__(self, path: str, workers: int, index: int):
        self.workers = workers
        self.index = index
        size = _SLOT.size * workers
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def set(self, value: int) -> None:
        _SLOT.pack_into(self._map, self.index * _SLOT.size, value)

    def loads(self) -> list[int]:
        return [_SLOT.unpack_from(self._map, i * _SLOT.size)[0] for i in range(self.workers)]

    def close(self) -> None:
        self._map.close()


def choose_target(loads: list[int], me: int) -> int | None:
    """The worker to hand a new connection to, or None to keep it: only when this one
    holds at least two more sessions than the least loaded."""
    target = min(range(len(loads)), key=lambda i: (loads[i], i != me))
    if target != me and loads[me] >= loads[target] + 2:
        return target
    return None


def _address(datadir: str, index: int) -> str:
    # Linux abstract namespace: no file to clean up, no path-length limit.
    tag = hashlib.sha256(os.path.abspath(datadir).encode()).hexdigest()[:16]
    return f"\0mta-{tag}-w{index}"


class Balancer:
    """This worker's side: publishes its load, hands connections over, adopts
    connections handed to it."""

    def __init__(self, datadir: str, workers: int, index: int, reactor):
        self.datadir = datadir
        self.index = index
        self.reactor = reactor
        run = os.path.join(datadir, "run")
        os.makedirs(run, mode=0o700, exist_ok=True)
        self.table = LoadTable(os.path.join(run, "load"), workers, index)
        self.table.set(0)
        self.factories: list = []  # listener index -> the factory that serves it
        self.families: list[int] = []
        self.handed_over = 0
        self.adopted = 0
        self._out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._out.setblocking(False)
        self._in = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._in.setblocking(False)
        self._in.bind(_address(datadir, index))
        self._reader = _Receiver(self)

    def register(self, factory, family: int) -> int:
        self.factories.append(factory)
        self.families.append(family)
        return len(self.factories) - 1

    def set_load(self, sessions: int) -> None:
        self.table.set(sessions)

    def start(self) -> None:
        self.reactor.addReader(self._reader)

    def stop(self) -> None:
        self.reactor.removeReader(self._reader)

    def close(self) -> None:
        self.stop()
        self._in.close()
        self._out.close()
        self.table.close()

    def hand_over(self, transport, listener: int) -> bool:
        """Send the connection to a less loaded worker; True when it went."""
        target = choose_target(self.table.loads(), self.index)
        if target is None:
            return False
        fds = array.array("i", [transport.fileno()])
        try:
            self._out.sendmsg(
                [bytes([listener])],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)],
                0,
                _address(self.datadir, target),
            )
        except OSError as e:
            log.info("hand-over to worker {target} failed: {error}", target=target, error=str(e))
            return False
        self.handed_over += 1
        return True

    def _adopt(self) -> None:
        while True:
            try:
                data, ancdata, _, _ = self._in.recvmsg(16, socket.CMSG_SPACE(4 * 4))
            except (BlockingIOError, InterruptedError):
                return
            fds: list[int] = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
            for fd in fds:
                try:
                    listener = data[0] if data else -1
                    if not 0 <= listener < len(self.factories):
                        raise ValueError(f"unknown listener {listener}")
                    self.reactor.adoptStreamConnection(
                        fd, self.families[listener], self.factories[listener]
                    )
                    self.adopted += 1
                except Exception:
                    log.failure("could not adopt a handed-over connection")
                finally:
                    os.close(fd)  # adoptStreamConnection holds its own duplicate


class _Receiver:
    """The reactor reader for the incoming datagram socket."""

    def __init__(self, balancer: Balancer):
        self.balancer = balancer

    def fileno(self) -> int:
        return self.balancer._in.fileno()

    def doRead(self) -> None:
        self.balancer._adopt()

    def connectionLost(self, reason) -> None:
        pass

    def logPrefix(self) -> str:
        return "mta-balance"


class _HandOver(protocol.Protocol):
    """Built instead of a session when this worker is the busier: passes the socket
    on, or, if that fails, becomes the real session after all."""

    def __init__(self, factory: BalancingFactory, addr):
        self.factory = factory
        self.addr = addr

    def makeConnection(self, transport):
        f = self.factory
        if f.balancer.hand_over(transport, f.listener):
            # Close our descriptor only: no shutdown(), the socket lives on over there.
            transport.abortConnection()
            return
        real = f.wrapped.buildProtocol(self.addr)
        if real is None:
            transport.loseConnection()
            return
        transport.protocol = real
        real.makeConnection(transport)


class BalancingFactory(protocol.Factory):
    """Wraps a listener's factory: decides per accepted connection whether to keep it."""

    noisy = False

    def __init__(self, wrapped, balancer: Balancer, listener: int):
        self.wrapped = wrapped
        self.balancer = balancer
        self.listener = listener

    def doStart(self):
        self.wrapped.doStart()

    def doStop(self):
        self.wrapped.doStop()

    def buildProtocol(self, addr):
        if choose_target(self.balancer.table.loads(), self.balancer.index) is not None:
            return _HandOver(self, addr)
        return self.wrapped.buildProtocol(addr)
