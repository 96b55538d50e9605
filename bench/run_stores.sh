#!/usr/bin/env bash
# Mail stores side by side in ONE run (issue #13): the L1 and S3 shapes against
# `twistd mta` with each [storage] backend, encryption at rest off and on, and the
# sealed spool ([queue] encrypt), interleaved run by run like run_ab.sh.
#
#   RUNS=2 bash bench/run_stores.sh                       # every variant (~15 min)
#   VARIANTS=maildir,sql SHAPES=lat_c20 RUNS=2 bash bench/run_stores.sh
#   SCALE=0.1 RUNS=1 bash bench/run_stores.sh             # smoke test
#
# Variants: maildir, maildir-enc ([storage] encrypt), mbox, sql, timeseries,
# timeseries-enc, queue-enc (maildir with [queue] encrypt), pgqueue (maildir with the
# queue in PostgreSQL: [queue] backend = "postgresql", a fresh database on
# PG_ADMIN_DSN, default postgresql://postgres@127.0.0.1:5432/postgres; not in the
# default list), and s3 when S3_ENDPOINT,
# S3_BUCKET, S3_KEY_ID and S3_SECRET_FILE name a reachable S3 server (not in the
# default list). Delivery is counted from each server's /metrics (bench_stores.py),
# so every backend is timed the same way. One worker process (WORKERS=1): with more,
# only the first process serves /metrics and its count covers that process alone.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$HERE/mta_config.sh"
REPO=$(dirname "$HERE")
VENV=${MTA_VENV:-$REPO/.venv}
RESULTS=${RESULTS:-/tmp/benchresults-stores}
OUT=$RESULTS/stores-$(date +%Y%m%d-%H%M%S).jsonl
mkdir -p "$RESULTS"
IFS=, read -r -a variants <<<"${VARIANTS:-maildir,maildir-enc,mbox,sql,timeseries,timeseries-enc,queue-enc}"
IFS=, read -r -a shapes <<<"${SHAPES:-lat_c20,src_s100_100k}"

storage_toml() {  # variant -> the [storage]/[queue] tables
  case $1 in
    maildir) printf '[storage]\nbackend = "maildir"\n' ;;
    maildir-enc) printf '[storage]\nbackend = "maildir"\nencrypt = true\nmaster_key_file = "keys/master.key"\n' ;;
    mbox) printf '[storage]\nbackend = "mbox"\n' ;;
    sql) printf '[storage]\nbackend = "sql"\n' ;;
    timeseries) printf '[storage]\nbackend = "timeseries"\n' ;;
    timeseries-enc) printf '[storage]\nbackend = "timeseries"\nencrypt = true\nmaster_key_file = "keys/master.key"\n' ;;
    queue-enc) printf '[storage]\nbackend = "maildir"\nmaster_key_file = "keys/master.key"\n[queue]\nencrypt = true\n' ;;
    pgqueue)
      local admin=${PG_ADMIN_DSN:-postgresql://postgres@127.0.0.1:5432/postgres}
      psql "$admin" -qc "DROP DATABASE IF EXISTS mta_bench_queue" -qc "CREATE DATABASE mta_bench_queue" >&2
      printf '[storage]\nbackend = "maildir"\n[queue]\nbackend = "postgresql"\ndsn = "%s"\n' \
        "${admin%/*}/mta_bench_queue" ;;
    s3)
      : "${S3_ENDPOINT:?s3 needs S3_ENDPOINT, S3_BUCKET, S3_KEY_ID, S3_SECRET_FILE}"
      printf '[storage]\nbackend = "s3"\n[storage.s3]\nendpoint = "%s"\nbucket = "%s"\nregion = "%s"\naccess_key_id = "%s"\nsecret_access_key_file = "%s"\n' \
        "$S3_ENDPOINT" "$S3_BUCKET" "${S3_REGION:-us-east-1}" "$S3_KEY_ID" "$S3_SECRET_FILE" ;;
    *) echo "run_stores.sh: unknown variant $1" >&2; exit 2 ;;
  esac
}

setup() {  # variant port
  local name=$1 port=$2 datadir=/tmp/mta-bench-store-$1
  rm -rf "$datadir" "$datadir.toml"
  mkdir -p "$datadir"
  { mta_bench_config "$datadir" "$port" "${WORKERS:-1}"; echo; storage_toml "$name"; } >"$datadir.toml"
  if grep -q master_key_file "$datadir.toml"; then
    "$VENV/bin/mta-admin" --config "$datadir.toml" key init >/dev/null
  fi
  head -c 24 /dev/urandom | base64 | "$VENV/bin/mta-admin" --config "$datadir.toml" \
    user add --password-stdin to@bench.test >/dev/null
}

i=0
declare -A port_of
for v in "${variants[@]}"; do
  port_of[$v]=$((20100 + 2 * i))
  setup "$v" "${port_of[$v]}"
  i=$((i + 1))
done

for run in $(seq 1 "${RUNS:-2}"); do
  for shape in "${shapes[@]}"; do
    order=("${variants[@]}")
    if (( run % 2 == 0 )); then  # reverse the order every other run
      order=(); for (( k=${#variants[@]}-1; k>=0; k-- )); do order+=("${variants[k]}"); done
    fi
    for v in "${order[@]}"; do
      port=${port_of[$v]}
      timeout -k 30 1800 python3 "$HERE/bench_stores.py" --name "$v" \
        --addr "127.0.0.1:$port" \
        --start "exec $VENV/bin/twistd -n --pidfile= mta --config /tmp/mta-bench-store-$v.toml" \
        --maildir "http://127.0.0.1:$((port + 1))/metrics" \
        --shapes "$shape" --scale "${SCALE:-1}" --out "$OUT" --logdir "$RESULTS/logs" \
        --run "$run" || echo "run_stores.sh: $v $shape run $run exited $?" >&2
    done
  done
done
python3 "$HERE/report.py" "$OUT" --baseline "${variants[0]}"
echo "run_stores.sh: results in $OUT" >&2
