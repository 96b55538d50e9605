"""`mta-admin cluster status`: the nodes sharing the PostgreSQL queue.

Each running node keeps a heartbeat row (`mta.queue.pgstore`, every lease/3
seconds); a node whose row is older than `--stale` seconds (default: three lease
periods) is shown as gone: it stopped without saying so (kill -9, power) and its
leases expire, so other nodes take over its work.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from mta.admin.common import CLIError, config_of, table


def add_commands(commands: Any, leaf: Any) -> None:
    cluster = commands.add_parser("cluster", help="nodes sharing the queue").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    status = leaf(cluster, "status", cmd_cluster_status, "live nodes, their leases and versions")
    status.add_argument(
        "--stale", type=float, metavar="S", help="heartbeat age that counts as gone (s)"
    )


def cmd_cluster_status(args: argparse.Namespace) -> int:
    config = config_of(args)
    if config.queue.backend != "postgresql":
        raise CLIError(
            'cluster status needs the shared queue: [queue] backend = "postgresql"'
            " (this node keeps a local file queue)"
        )
    from mta.queue import pgsql, queue_dsn
    from mta.queue.pgconn import Connections, QueueUnavailable

    now = time.time()
    connections = Connections(queue_dsn(config), size=1)
    try:
        nodes = connections.run(pgsql.nodes, now)
        depth = connections.run(pgsql.depth, now)
    except QueueUnavailable as e:
        raise CLIError(str(e)) from None
    except Exception as e:
        if type(e).__module__.startswith("psycopg"):
            raise CLIError(f"PostgreSQL queue at {connections.where}: {str(e).strip()}") from None
        raise
    finally:
        connections.close()
    stale = args.stale if args.stale is not None else 3 * config.queue.lease
    rows = []
    live = 0
    for node in nodes:
        age = now - node["last_seen"]
        alive = age <= stale
        live += alive
        rows.append(
            (
                node["hostname"],
                node["node_id"],
                node["version"],
                "live" if alive else "gone",
                f"{max(0, age):.0f}s ago",
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(node["started"])),
                str(node["leases"]),
            )
        )
    print(table(("HOSTNAME", "NODE", "VERSION", "STATE", "SEEN", "STARTED", "LEASES"), rows))
    print(f"{live} live node(s); queue: " + ", ".join(f"{k} {v}" for k, v in depth.items()))
    return 0
