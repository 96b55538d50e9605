#!/usr/bin/env bash
# Outbound relay benchmark (issue #4): `twistd mta` and a private Postfix relay the same
# 5,000 queued messages to the same local smtp-sink, in one run, one table.
# `make bench-outbound` runs this.
#
#   bash bench/run_outbound.sh                    # full size: 5,000 messages of 4 KB
#   SCALE=0.1 bash bench/run_outbound.sh          # smoke run (500 messages, ~1 min)
#   TARGETS=mta bash bench/run_outbound.sh        # only mta (or TARGETS=postfix)
#
# Knobs: SCALE, TARGETS, WORKERS (mta workers, 0 = one per core, like run_mta.sh),
# MTA_PORT (20050; +1 for its HTTP), PF_PORT (20055), SINK_PORT (20059), DATADIR
# (/tmp/mta-outbench), DELIVER_TIMEOUT (600 s per target), MTA_VENV, RESULTS.
# Only 127.0.0.1; writes under /tmp only; every process is stopped by its own pid / its own
# `postfix -c DIR stop`; the whole run has a hard cap (TIMEOUT).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ -x /usr/sbin/postfix ] || { echo "run_outbound.sh: postfix missing (see bench/README.md)" >&2; exit 1; }
exec timeout -k 30 "${TIMEOUT:-1800}" python3 "$HERE/bench_outbound.py"
