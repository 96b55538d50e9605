"""Entry point of a worker process (`python -m mta.process.child`), spawned by
`mta.process.workers.WorkerSupervisor`: builds the same service tree as the first process
around the listening sockets it inherited, and stops when its parent goes away
(its stdin reaches EOF), so a `kill -9` of the parent never leaves orphans holding
the ports.  Kept apart from the supervisor so that `mta.app` (which builds the
supervisor) and this module (which calls `mta.app`) form no import cycle.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from twisted.internet import protocol

from mta.observe.logging import Logger

log = Logger()


class _ParentWatch(protocol.Protocol):
    """Stops the worker when the parent's end of stdin closes (the parent died)."""

    def __init__(self, reactor):
        self.reactor = reactor

    def connectionLost(self, reason=None):
        if self.reactor.running:
            log.info("parent process went away; worker stopping")
            self.reactor.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mta.process.child")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--config")
    parser.add_argument("--datadir")
    parser.add_argument(
        "--fd", action="append", default=[], help="LISTENER=FD of an inherited socket"
    )
    args = parser.parse_args(argv)

    from twisted.internet import reactor, stdio
    from twisted.logger import globalLogBeginner

    from mta.app import build_service
    from mta.config import load_config
    from mta.observe.logging import make_observer

    config = load_config(args.config, datadir=args.datadir)
    inherited = {}
    for item in args.fd:
        name, _, fd = item.partition("=")
        inherited[name] = int(fd)
    globalLogBeginner.beginLoggingTo(
        [make_observer(config.log.format, config.log.level, sys.stdout)], redirectStandardIO=False
    )
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the service installs its handler
    root = build_service(config, reactor, worker_index=args.index, inherited=inherited)
    stdio.StandardIO(_ParentWatch(reactor), stdin=0, stdout=os.open(os.devnull, os.O_WRONLY))
    exit_code = []

    def start():
        try:
            root.startService()
        except Exception:
            log.failure("worker {index} failed to start", index=args.index)
            exit_code.append(1)
            reactor.stop()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: root.running and root.stopService())
    reactor.run()
    return exit_code[0] if exit_code else 0


if __name__ == "__main__":
    sys.exit(main())
