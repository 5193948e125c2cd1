#!/usr/bin/env bash
# Runs the shared kubectl acceptance suite (kubectl 1.35) against `shoal server` (API,
# scheduler, controllers) with one real node joined: `shoal agent` running pods with runc
# from a busybox image built from Debian's busybox-static and imported into the node
# (`shoal image import`). Everything runs inside a network namespace of its own, so pod
# networks never touch the machine's. Where that cannot be done (not root, no runc), two
# hollow nodes (`loadgen hollow`, the simulated runtime) stand in and the checks that need
# real containers (logs, exec) are not judged.
#
# Fails when a check listed in scripts/kubectl-acceptance-expected.txt does not pass: the
# list grows as layers land, so a check that passed once can never silently regress.
set -euo pipefail
cd "$(dirname "$0")/.."
real=0
if [ "$(id -u)" = 0 ] && command -v runc >/dev/null 2>&1 && command -v unshare >/dev/null 2>&1 && [ -x /bin/busybox ]; then
  real=1
  if [ -z "${SHOAL_ACC_NETNS:-}" ]; then
    # kubectl is fetched (when not cached) while the network is still reachable.
    export KUBECTL="${KUBECTL:-${KUBECTL_135:-$(bash ../shared/acceptance/get-kubectl.sh | tail -n 1)}}"
    exec env SHOAL_ACC_NETNS=1 unshare --net -- bash "$0" "$@"
  fi
  ip link set lo up
fi
bin="${CARGO_TARGET_DIR:-target}/debug/shoal"
lg="${CARGO_TARGET_DIR:-target}/debug/loadgen"
[ -x "$bin" ] || cargo build -p shoal --locked
[ -x "$lg" ] || cargo build -p shoal-loadgen --locked
dir=$(mktemp -d)
pid=""
hpid=""
apid=""
cleanup() {
  [ -z "$hpid" ] || kill "$hpid" 2>/dev/null || true
  [ -z "$apid" ] || kill -9 "$apid" 2>/dev/null || true
  [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
  wait 2>/dev/null || true
  if [ -d "$dir/node/run/state" ]; then
    for id in $(runc --root "$dir/node/run/state" list -q 2>/dev/null); do runc --root "$dir/node/run/state" delete --force "$id" >/dev/null 2>&1 || true; done
    for c in "$dir"/node/run/containers/*; do [ -d "$c" ] && umount -l "$c/rootfs" 2>/dev/null || true; done
    for s in "$dir"/node/run/sandboxes/*; do [ -d "$s" ] && ip netns del "shoal-$(basename "$s")" 2>/dev/null || true; done
    for v in "$dir"/node/pods/*/volumes/*; do mountpoint -q "$v" 2>/dev/null && umount -l "$v" || true; done
    for c in /sys/fs/cgroup/*/shoal/acc-node-$$; do rmdir "$c" 2>/dev/null || true; done
  fi
  rm -rf "$dir"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
p1=$(port); p2=$(port); p3=$(port)
"$bin" server --name acc --data-dir "$dir/d" --etcd-addr "127.0.0.1:$p1" --peer-addr "127.0.0.1:$p2" \
  --metrics-addr "" --api-addr "127.0.0.1:$p3" --admin-addr "" >"$dir/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 200); do [ -s "$dir/d/kubeconfig" ] && curl -skf "https://127.0.0.1:$p3/readyz" >/dev/null && break; sleep 0.1; done
for _ in $(seq 1 100); do [ -s "$dir/d/pki/bootstrap-token" ] && break; sleep 0.1; done
if [ "$real" = 1 ]; then
  python3 scripts/busybox-image.py "$dir/busybox.tar" --name busybox:acc
  "$bin" image --data-dir "$dir/node" import "$dir/busybox.tar" >&2
  "$bin" agent --server "https://127.0.0.1:$p3" --token "$(cat "$dir/d/pki/bootstrap-token")" \
    --ca-file "$dir/d/pki/ca.crt" --node-name "acc-node-$$" --data-dir "$dir/node" \
    --eviction-hard "memory.available<100Mi" >"$dir/agent.log" 2>&1 &
  apid=$!
  export ACC_IMAGE=busybox:acc
else
  "$lg" --out "$dir/hollow.json" hollow --kubeconfig "$dir/d/kubeconfig" --token "$(cat "$dir/d/pki/bootstrap-token")" \
    --nodes 2 --prefix acc-node- --duration-s 1800 >"$dir/hollow.log" 2>&1 &
  hpid=$!
fi
# The suite waits for nodes itself only in the checks that need them: wait for Ready here.
for _ in $(seq 1 100); do
  "${KUBECTL:-kubectl}" --kubeconfig "$dir/d/kubeconfig" get nodes 2>/dev/null | grep -q ' Ready ' && break
  sleep 0.2
done
KUBECONFIG="$dir/d/kubeconfig" ACC_CHECK_TIMEOUT="${ACC_CHECK_TIMEOUT:-15}" \
  bash ../shared/acceptance/kubectl-acceptance.sh >"$dir/acc.log" 2>&1 || true
grep -E '^(PASS|FAIL|INFO)|passed' "$dir/acc.log" >&2
missing=0
while read -r check; do
  [ -z "$check" ] || [ "${check#\#}" != "$check" ] && continue
  if [ "$real" = 0 ] && [[ "$check" =~ ^3[12]- ]]; then
    echo "acceptance-kubectl: $check not judged (no real node here)" >&2
    continue
  fi
  if ! grep -q "^PASS $check\$" "$dir/acc.log"; then
    echo "acceptance-kubectl: expected check $check to pass" >&2
    missing=$((missing + 1))
  fi
done < scripts/kubectl-acceptance-expected.txt
if [ "$missing" -gt 0 ]; then
  echo "--- server log" >&2; tail -40 "$dir/server.log" >&2
  [ ! -f "$dir/agent.log" ] || { echo "--- agent log" >&2; tail -40 "$dir/agent.log" >&2; }
  exit 1
fi
echo "acceptance-kubectl: every expected check passed" >&2
