#!/usr/bin/env bash
# Starts a bench cluster in the foreground, as ONE process group for bench_target.py's
# --start: every node (`twistd -n mta --config TOML`), waits until each answers 200 on
# its /readyz, then HAProxy (`haproxy -db`), all children of this shell, so the
# harness's process tree covers them and its SIGTERM to the group stops them all.
# When any of them exits, the others are stopped too and this script exits 1.
#
#   cluster_nodes.sh VENV HAPROXY_CFG NODE1.toml:HTTPPORT1 [NODE2.toml:HTTPPORT2 ...]
set -euo pipefail
venv=$1 cfg=$2
shift 2
stop_all() { kill $(jobs -p) 2>/dev/null || true; }
trap 'stop_all; exit 143' TERM INT
ports=()
for node in "$@"; do
  ports+=("${node##*:}")
  "$venv/bin/twistd" -n --pidfile= mta --config "${node%:*}" &
done
deadline=$((SECONDS + 60))
for port in "${ports[@]}"; do
  until python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/readyz', timeout=2)" 2>/dev/null; do
    if (( SECONDS > deadline )); then
      echo "cluster_nodes.sh: the node with /readyz on $port is not ready after 60 s" >&2
      stop_all
      exit 1
    fi
    sleep 0.2
  done
done
haproxy -db -f "$cfg" &
wait -n || true
echo "cluster_nodes.sh: a node or haproxy exited; stopping the others" >&2
stop_all
exit 1
