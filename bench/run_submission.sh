#!/usr/bin/env bash
# AUTH + TLS submission benchmark (issue #3): `twistd mta` and a private Postfix in one
# run, one table.  `make bench-submission` runs this.
#
#   bash bench/run_submission.sh                  # full size: 20 x 50 messages, 500 idle TLS conns
#   SCALE=0.1 bash bench/run_submission.sh        # smoke run (~1 min)
#   TARGETS=mta bash bench/run_submission.sh      # only mta (or TARGETS=postfix)
#
# Knobs: SCALE, TARGETS, SESSIONS (20), WORKERS (mta workers, 0 = one per core, like
# run_mta.sh), MTA_PORT (20040; +1 for its HTTP), PF_PORT (20045), DATADIR
# (/tmp/mta-subbench), MTA_VENV (<repo>/.venv), RESULTS (/tmp/benchresults).
# Only 127.0.0.1; writes under /tmp only; every server is stopped by its own pid / its own
# `postfix -c DIR stop`; each step has a timeout and the whole run a hard cap (TIMEOUT).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ -x /usr/sbin/postfix ] || { echo "run_submission.sh: postfix missing (see bench/README.md)" >&2; exit 1; }
command -v saslpasswd2 >/dev/null || echo "run_submission.sh: no saslpasswd2 (apt-get install sasl2-bin): Postfix runs TLS without AUTH" >&2
exec timeout -k 30 "${TIMEOUT:-1800}" python3 "$HERE/bench_submission.py"
