# Sourced by the bench scripts: `mta_bench_config DATADIR PORT WORKERS` prints the
# configuration every bench instance of `twistd mta` shares — an smtp listener
# without TLS on 127.0.0.1:PORT, /metrics on PORT+1, local domain bench.test,
# relaying from loopback, and connection limits raised so that idle1000 (1000
# connections) and S3 (100 sessions) are not refused.  Append tables after it.
mta_bench_config() {
  local datadir=$1 port=$2 workers=$3
  cat <<TOML
hostname = "mta.bench.test"
datadir = "$datadir"
local_domains = ["bench.test"]
relay_networks = ["127.0.0.0/8"]
postmaster = "postmaster@bench.test"
# One process per core (SO_REUSEPORT) with 0; 1 measures a single process.
workers = $workers

[[listener]]
name = "smtp"
address = "127.0.0.1:$port"
tls = "none"
auth = "none"

[limits]
max_connections = 4000
max_connections_per_ip = 4000
idle_timeout = 600.0

[http]
address = "127.0.0.1:$((port + 1))"

[log]
format = "json"
level = "warn"
TOML
}
