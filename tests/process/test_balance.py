"""Connection balancing between worker processes: the decision and the shared table."""

import os
import socket

from twisted.internet import protocol
from twisted.internet.testing import MemoryReactor

from mta.process.balance import Balancer, LoadTable, choose_target


def test_choose_target_only_hands_over_with_a_gap_of_two():
    assert choose_target([0, 0], 0) is None
    assert choose_target([1, 0], 0) is None
    assert choose_target([2, 0], 0) == 1
    assert choose_target([5, 3, 9], 2) == 1
    assert choose_target([5, 5, 5], 1) is None


def test_load_table_is_shared_between_mappings(tmp_path):
    path = str(tmp_path / "load")
    a, b = LoadTable(path, 3, 0), LoadTable(path, 3, 2)
    a.set(7)
    b.set(4)
    assert a.loads() == [7, 0, 4] == b.loads()


class _Recorder(protocol.Protocol):
    def __init__(self, sink):
        self.sink = sink

    def connectionMade(self):
        self.sink.append(self.transport.getPeer())


def test_a_connection_travels_to_the_less_loaded_worker(tmp_path):
    """Two Balancers in one process: worker 0 hands a real TCP connection to worker 1,
    which adopts it with its own factory."""
    from twisted.internet import reactor

    kept, adopted = [], []
    busy = Balancer(str(tmp_path), 2, 0, reactor)
    idle = Balancer(str(tmp_path), 2, 1, MemoryReactor())
    busy.register(protocol.Factory.forProtocol(lambda: _Recorder(kept)), socket.AF_INET)

    class AdoptingReactor(MemoryReactor):
        def adoptStreamConnection(self, fd, family, factory):
            adopted.append((os.fstat(fd).st_ino, family, factory))

    idle.reactor = AdoptingReactor()
    idle.register(protocol.Factory.forProtocol(lambda: _Recorder(adopted)), socket.AF_INET)
    busy.set_load(5)
    idle.set_load(1)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname())
    conn, _ = server.accept()

    class FakeTransport:
        aborted = False

        def fileno(self):
            return conn.fileno()

        def abortConnection(self):
            self.aborted = True

    transport = FakeTransport()
    assert busy.hand_over(transport, 0) is True
    idle._adopt()
    [(ino, family, _)] = adopted
    assert ino == os.fstat(conn.fileno()).st_ino and family == socket.AF_INET
    assert busy.handed_over == 1 and idle.adopted == 1
    for s in (client, conn, server):
        s.close()
    busy.close()
    idle.close()
