"""Time `mta-admin search` over 100,000 messages in the SQL store (issue #13).

    .venv/bin/python bench/search_bench.py [--messages 100000] [--keep DIR]
    .venv/bin/python bench/search_bench.py --dsn postgresql://postgres@127.0.0.1/bench

With ``--dsn`` the store is PostgreSQL (tsvector + GIN) in that database, which must
exist; messages are generated only when it holds none yet.

Generates the messages through `SQLStore.deliver_batch` (1,000 per transaction,
20 mailboxes, dates over the last year, words drawn from a Zipf-like vocabulary so
some queries match most messages and some a handful), then times each query of
QUERIES through `SQLStore.search` (the median of 20 runs, warm cache) and once
through `mta-admin search` in a fresh process (start-up included).
"""

from __future__ import annotations

import argparse
import email.utils
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

from mta.envelope import Address
from mta.storage import StoreItem
from mta.storage.sql import SQLStore
from mta.testing import MemoryBody

QUERIES = [
    # (query, user, since seconds ago)
    ("w0", None, None),  # the commonest word: in most messages
    ("w10 w20", None, None),
    ("w3000", None, None),  # rare
    ("invoice", None, None),
    ("w0", "user7@example.test", None),
    ("w5", None, 7 * 86400),
    ('"quoted AND (hostile*', None, None),
]


def vocabulary_word(rng: random.Random) -> str:
    return f"w{int(rng.paretovariate(0.8)) - 1}"


def make_message(rng: random.Random, n: int, now: float) -> bytes:
    words = " ".join(vocabulary_word(rng) for _ in range(rng.randint(40, 200)))
    subject = " ".join(vocabulary_word(rng) for _ in range(5))
    if n % 1000 == 0:
        subject += " invoice"
    date = email.utils.formatdate(now - rng.uniform(0, 365 * 86400))
    return (
        f"From: Sender {n % 997} <s{n % 997}@example.org>\r\n"
        f"To: user{n % 20}@example.test\r\nSubject: {subject}\r\nDate: {date}\r\n"
        f"Message-ID: <{n}@bench.example.org>\r\n\r\n{words}\r\n"
    ).encode()


def stored(path: str) -> int:
    """Messages already in the store at `path` (0 for a new SQLite file)."""
    if not path.startswith("postgresql://") and not os.path.exists(path):
        return 0
    from mta.db import Database

    with Database(path) as db, db._read() as conn:
        return conn.execute("SELECT count(*) FROM messages").fetchone()[0]


def size(path: str) -> float:
    if not path.startswith("postgresql://"):
        return os.path.getsize(path) / 1e6
    from mta.db import Database

    with Database(path) as db, db._read() as conn:
        conn.execute("VACUUM ANALYZE messages")
        return conn.execute("SELECT pg_database_size(current_database())").fetchone()[0] / 1e6


def generate(path: str, count: int) -> None:
    rng = random.Random(13)
    now = time.time()
    store = SQLStore(path)
    start = time.perf_counter()
    for base in range(0, count, 1000):
        items = [
            StoreItem(
                Address(f"user{n % 20}", "example.test"),
                f"bench-{n}",
                b"Delivered-To: bench\r\n",
                MemoryBody(make_message(rng, n, now)),
            )
            for n in range(base, min(count, base + 1000))
        ]
        for outcome in store.deliver_batch(items):
            if isinstance(outcome, BaseException):
                raise outcome
    store.close()
    elapsed = time.perf_counter() - start
    print(f"generated {count} messages in {elapsed:.1f} s ({count / elapsed:.0f}/s)")


def time_queries(path: str) -> None:
    store = SQLStore(path)
    for query, user, ago in QUERIES:
        since = None if ago is None else time.time() - ago
        hits = store.search(query, user=user, since=since)  # warm up
        runs = []
        for _ in range(20):
            start = time.perf_counter()
            store.search(query, user=user, since=since)
            runs.append(time.perf_counter() - start)
        label = query + (f" --user {user}" if user else "") + (" --since 7d" if ago else "")
        print(
            f"search {label!r:45} {len(hits):3} hits  "
            f"median {statistics.median(runs) * 1000:7.2f} ms  max {max(runs) * 1000:7.2f} ms"
        )
    store.close()


def time_cli(datadir: str, dsn: str | None) -> None:
    config = os.path.join(datadir, "mta.toml")
    with open(config, "w") as f:
        f.write(f'datadir = "{datadir}"\n[storage]\nbackend = "sql"\n')
        if dsn:
            f.write(f'[database]\ndsn = "{dsn}"\n')
    argv = [sys.executable, "-m", "mta.admin", "--config", config, "search", "w10 w20"]
    start = time.perf_counter()
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    elapsed = time.perf_counter() - start
    print(
        f"mta-admin search 'w10 w20' (a fresh process): {elapsed * 1000:.0f} ms, "
        f"{len(out.splitlines()) - 1} lines"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--keep", metavar="DIR", help="use (and keep) this data directory")
    parser.add_argument("--dsn", help="a postgresql:// database instead of SQLite")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="search-bench-") as tmp:
        datadir = os.path.abspath(args.keep or tmp)
        os.makedirs(datadir, exist_ok=True)
        path = args.dsn or os.path.join(datadir, "mta.db")
        if not stored(path):
            generate(path, args.messages)
        print(f"database ({'PostgreSQL' if args.dsn else 'SQLite'}): {size(path):.0f} MB")
        time_queries(path)
        time_cli(datadir, args.dsn)


if __name__ == "__main__":
    main()
