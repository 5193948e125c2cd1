#!/usr/bin/env bash
# Runs the shared etcdctl acceptance suite against Shoal: a single-member store, then a
# 3-member cluster through one of its followers (so forwarding, read index and lease
# forwarding are exercised). Servers use free loopback ports and are stopped afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${CARGO_TARGET_DIR:-target}/debug/shoal"
[ -x "$bin" ] || cargo build -p shoal --locked
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
suite() {
  ACC_PERF="${ACC_PERF:-0}" ETCD_ENDPOINTS="$1" bash ../shared/acceptance/etcdctl-acceptance.sh || {
    for l in "$dir"/*.log; do echo "--- $l" >&2; tail -30 "$l" >&2; done; exit 1; }
}

echo "== etcdctl acceptance: single member" >&2
p1=$(port); p2=$(port)
"$bin" server --name acc --data-dir "$dir/single" --etcd-addr "127.0.0.1:$p1" --peer-addr "127.0.0.1:$p2" \
  --metrics-addr "" --api-addr "" >"$dir/single.log" 2>&1 &
pids+=($!)
wait_port "$p1"
suite "127.0.0.1:$p1"

echo "== etcdctl acceptance: 3 members, through a follower" >&2
peers=(); clients=()
for i in 0 1 2; do peers+=("$(port)"); clients+=("$(port)"); done
ic="a0=127.0.0.1:${peers[0]},a1=127.0.0.1:${peers[1]},a2=127.0.0.1:${peers[2]}"
for i in 0 1 2; do
  "$bin" server --name "a$i" --data-dir "$dir/a$i" --etcd-addr "127.0.0.1:${clients[$i]}" \
    --peer-addr "127.0.0.1:${peers[$i]}" --metrics-addr "" --api-addr "" --initial-cluster "$ic" >"$dir/a$i.log" 2>&1 &
  pids+=($!)
done
for i in 0 1 2; do wait_port "${clients[$i]}"; done
follower=""
for _ in $(seq 1 100); do
  for i in 0 1 2; do
    st=$(ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:${clients[$i]}" endpoint status -w json 2>/dev/null || true)
    if python3 -c 'import json,sys; s=json.loads(sys.argv[1])[0]["Status"]; sys.exit(0 if s["leader"] and s["leader"]!=s["header"]["member_id"] else 1)' "$st" 2>/dev/null; then
      follower="127.0.0.1:${clients[$i]}"; break 2
    fi
  done
  sleep 0.1
done
[ -n "$follower" ] || { echo "no follower found in the 3-member cluster" >&2; exit 1; }
# Members publish their client URLs shortly after start (as etcd members do); wait for it.
for _ in $(seq 1 100); do
  ml=$(ETCDCTL_API=3 etcdctl --endpoints "$follower" member list -w json 2>/dev/null || true)
  python3 -c 'import json,sys; m=json.loads(sys.argv[1])["members"]; sys.exit(0 if len(m)==3 and all(x.get("clientURLs") for x in m) else 1)' "$ml" 2>/dev/null && break
  sleep 0.1
done
suite "$follower"
