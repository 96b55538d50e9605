#!/usr/bin/env bash
# Benchmark `twistd mta` side by side with the peers (smtp-sink, aiosmtpd, Postfix) in
# one table, with the durable spool and Maildir delivery on.  `make bench` runs this.
#
#   bash bench/run_mta.sh                          # peers + mta, RUNS=2, all shapes
#   SCALE=0.05 RUNS=1 bash bench/run_mta.sh        # smoke test, a couple of minutes
#   MTA_ONLY=1 SHAPES=src_s20_4k,lat_c20 bash bench/run_mta.sh   # just mta, no peers
#   TARGETS="postfix aiosmtpd-maildir" bash bench/run_mta.sh     # fewer peers
#
# Knobs (see bench/README.md of the reference harness, copied here from ../shared/bench):
# RUNS SCALE SHAPES TARGETS RATE BASELINE RESULTS, plus
#   MTA_VENV  virtualenv with mta installed (default: <repo>/.venv, made by `make run/test`)
#   VENV      virtualenv with aiosmtpd for the aiosmtpd peers (default /tmp/benchvenv;
#             created when missing)
#   PORT      mta's SMTP port (default 20030), DATADIR (default /tmp/mta-bench)
#
# Everything listens on 127.0.0.1 only and writes under /tmp.  The harness starts and
# stops mta itself (a fresh process per run and before idle1000), by its own pid.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$HERE/mta_config.sh"
REPO=$(cd "$HERE/.." && pwd)
MTA_VENV=${MTA_VENV:-$REPO/.venv}
export VENV=${VENV:-/tmp/benchvenv}
PORT=${PORT:-20030}
DATADIR=${DATADIR:-/tmp/mta-bench}
export RESULTS=${RESULTS:-/tmp/benchresults}
CFG=$DATADIR.toml
MAILDIR=$DATADIR/mail/bench.test/to

say() { echo "run_mta.sh: $*" >&2; }
die() { say "$*"; exit 1; }

[ -x "$MTA_VENV/bin/twistd" ] || die "no $MTA_VENV/bin/twistd: run 'make run' or 'make test' first (it builds .venv)"
[ -x "$MTA_VENV/bin/mta-admin" ] || die "no $MTA_VENV/bin/mta-admin in $MTA_VENV"
[ -x /usr/sbin/smtp-source ] || die "smtp-source missing: apt-get install postfix (choose 'No configuration')"
if [ -z "${MTA_ONLY:-}" ] && ! "$VENV/bin/python" -c 'import aiosmtpd' 2>/dev/null; then
  say "creating $VENV with aiosmtpd for the aiosmtpd peers"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet aiosmtpd
fi
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
  die "something already listens on 127.0.0.1:$PORT"
fi

# A fresh data dir and config for the bench instance.  Limits are raised so that the
# idle1000 shape (1000 connections from 127.0.0.1) and S3 (100 sessions) are not refused.
say "config $CFG, data in $DATADIR, Maildir $MAILDIR"
rm -rf "$DATADIR"
mkdir -p "$DATADIR"
mta_bench_config "$DATADIR" "$PORT" "${WORKERS:-0}" >"$CFG"

"$MTA_VENV/bin/mta-admin" --config "$CFG" check-config
# The target contract: mail for to@bench.test lands in ONE Maildir.
head -c 24 /dev/urandom | base64 | "$MTA_VENV/bin/mta-admin" --config "$CFG" user add --password-stdin to@bench.test

START="exec $MTA_VENV/bin/twistd -n --pidfile= mta --config $CFG"
say "mta: $START"

if [ -n "${MTA_ONLY:-}" ]; then
  STAMP=$(date +%Y%m%d-%H%M%S)
  OUT=$RESULTS/mta-$STAMP.jsonl
  mkdir -p "$RESULTS"
  for run in $(seq 1 "${RUNS:-1}"); do
    timeout -k 30 "${TARGET_TIMEOUT:-1800}" python3 "$HERE/bench_target.py" --name mta \
      --addr "127.0.0.1:$PORT" --start "$START" --maildir "$MAILDIR" \
      --shapes "${SHAPES:-all}" --scale "${SCALE:-1}" --rate "${RATE:-200}" \
      --out "$OUT" --logdir "$RESULTS/logs" --run "$run" || say "mta run $run exited $?"
  done
  python3 "$HERE/report.py" "$OUT" --baseline mta
else
  EXTRA_TARGET_NAME=mta EXTRA_TARGET_ADDR="127.0.0.1:$PORT" \
  EXTRA_TARGET_START="$START" EXTRA_TARGET_MAILDIR="$MAILDIR" \
    bash "$HERE/peers.sh"
fi
say "results and logs under $RESULTS (mta's log: $RESULTS/logs/mta.log)"
