#!/usr/bin/env bash
# Starts a single-member Shoal store on free loopback ports, runs the shared etcdctl
# acceptance suite against it, and stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${CARGO_TARGET_DIR:-target}/debug/shoal"
[ -x "$bin" ] || cargo build -p shoal --locked
dir=$(mktemp -d)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
p1=$(port); p2=$(port); p3=$(port)
"$bin" server --name acc --data-dir "$dir/data" --etcd-addr "127.0.0.1:$p1" --peer-addr "127.0.0.1:$p2" \
  --metrics-addr "127.0.0.1:$p3" >"$dir/log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do
  (exec 3<>/dev/tcp/127.0.0.1/$p1) 2>/dev/null && break
  sleep 0.1
done
ACC_PERF="${ACC_PERF:-0}" ETCD_ENDPOINTS="127.0.0.1:$p1" bash ../shared/acceptance/etcdctl-acceptance.sh || {
  echo "--- server log" >&2; tail -50 "$dir/log" >&2; exit 1; }
