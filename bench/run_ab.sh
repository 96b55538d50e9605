#!/usr/bin/env bash
# A/B: benchmark two builds of mta in ONE run, alternating shape by shape and run by
# run, so the machine's drift falls on both alike; one table with the ratio B/A.
#
#   A_VENV=/path/to/old/.venv B_VENV=.venv RUNS=3 SHAPES=src_s20_4k,src_s100_100k,lat_c20,idle1000 \
#     bash bench/run_ab.sh
#
# A_NAME/B_NAME label the columns (default base/new).  Each build gets its own data
# dir and port (A: 20030, B: 20050) and the same config as run_mta.sh (workers = 0).
#
# Keep RUNS even: whichever build runs second in a pair inherits the file system's
# work of deleting the first one's ~5000 Maildir files (ext4 scans recently deleted
# inodes on allocation), which costs it 10-25% here; the order flips every run, so an
# even count gives both builds the same share of that penalty.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$HERE/mta_config.sh"
: "${A_VENV:?A_VENV: virtualenv of the first build}"
: "${B_VENV:?B_VENV: virtualenv of the second build}"
A_NAME=${A_NAME:-base}
B_NAME=${B_NAME:-new}
RESULTS=${RESULTS:-/tmp/benchresults-ab}
OUT=$RESULTS/ab-$(date +%Y%m%d-%H%M%S).jsonl
mkdir -p "$RESULTS"

setup() {  # name venv port -> prints the start command; writes config and mailbox
  local name=$1 venv=$2 port=$3 datadir=/tmp/mta-bench-$1
  rm -rf "$datadir"
  mkdir -p "$datadir"
  mta_bench_config "$datadir" "$port" "${WORKERS:-0}" >"$datadir.toml"
  head -c 24 /dev/urandom | base64 | "$venv/bin/mta-admin" --config "$datadir.toml" \
    user add --password-stdin to@bench.test >/dev/null
}

setup "$A_NAME" "$A_VENV" 20030
setup "$B_NAME" "$B_VENV" 20050
IFS=, read -r -a shapes <<<"${SHAPES:-src_s20_4k,src_s100_100k,lat_c20,idle1000}"
for run in $(seq 1 "${RUNS:-4}"); do
  for shape in "${shapes[@]}"; do
    # Alternate which build goes first, so neither always gets the warmer machine.
    if (( run % 2 )); then order="A B"; else order="B A"; fi
    for side in $order; do
      if [ "$side" = A ]; then name=$A_NAME venv=$A_VENV port=20030; else name=$B_NAME venv=$B_VENV port=20050; fi
      timeout -k 30 1800 python3 "$HERE/bench_target.py" --name "$name" \
        --addr "127.0.0.1:$port" \
        --start "exec $venv/bin/twistd -n --pidfile= mta --config /tmp/mta-bench-$name.toml" \
        --maildir "/tmp/mta-bench-$name/mail/bench.test/to" \
        --shapes "$shape" --scale "${SCALE:-1}" --out "$OUT" --logdir "$RESULTS/logs" \
        --run "$run" || echo "run_ab.sh: $name $shape run $run exited $?" >&2
    done
  done
done
python3 "$HERE/report.py" "$OUT" --baseline "$A_NAME"
echo "run_ab.sh: results in $OUT" >&2
