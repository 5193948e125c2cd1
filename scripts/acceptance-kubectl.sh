#!/usr/bin/env bash
# Runs the shared kubectl acceptance suite (kubectl 1.35) against `shoal server` (API,
# scheduler, controllers) with two hollow nodes joined (`loadgen hollow`: real
# agent-protocol clients on the simulated runtime, so nodes are Ready, pods Running and
# `kubectl top` answers; checks that need real containers, such as exec, fail until the
# runc agent lands) and fails when a check listed in
# scripts/kubectl-acceptance-expected.txt does not pass: the list grows as layers land,
# so a check that passed once can never silently regress. Checks that need nodes or
# controllers fail fast on such a server and are reported, not judged.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${CARGO_TARGET_DIR:-target}/debug/shoal"
lg="${CARGO_TARGET_DIR:-target}/debug/loadgen"
[ -x "$bin" ] || cargo build -p shoal --locked
[ -x "$lg" ] || cargo build -p shoal-loadgen --locked
dir=$(mktemp -d)
pid=""
hpid=""
cleanup() { [ -z "$hpid" ] || kill "$hpid" 2>/dev/null || true; [ -z "$pid" ] || kill "$pid" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
p1=$(port); p2=$(port); p3=$(port)
"$bin" server --name acc --data-dir "$dir/d" --etcd-addr "127.0.0.1:$p1" --peer-addr "127.0.0.1:$p2" \
  --metrics-addr "" --api-addr "127.0.0.1:$p3" --admin-addr "" >"$dir/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 200); do [ -s "$dir/d/kubeconfig" ] && curl -skf "https://127.0.0.1:$p3/readyz" >/dev/null && break; sleep 0.1; done
for _ in $(seq 1 100); do [ -s "$dir/d/pki/bootstrap-token" ] && break; sleep 0.1; done
"$lg" --out "$dir/hollow.json" hollow --kubeconfig "$dir/d/kubeconfig" --token "$(cat "$dir/d/pki/bootstrap-token")" \
  --nodes 2 --prefix acc-node- --duration-s 1800 >"$dir/hollow.log" 2>&1 &
hpid=$!
KUBECONFIG="$dir/d/kubeconfig" ACC_CHECK_TIMEOUT="${ACC_CHECK_TIMEOUT:-15}" \
  bash ../shared/acceptance/kubectl-acceptance.sh >"$dir/acc.log" 2>&1 || true
grep -E '^(PASS|FAIL|INFO)|passed' "$dir/acc.log" >&2
missing=0
while read -r check; do
  [ -z "$check" ] || [ "${check#\#}" != "$check" ] && continue
  if ! grep -q "^PASS $check\$" "$dir/acc.log"; then
    echo "acceptance-kubectl: expected check $check to pass" >&2
    missing=$((missing + 1))
  fi
done < scripts/kubectl-acceptance-expected.txt
if [ "$missing" -gt 0 ]; then
  echo "--- server log" >&2; tail -40 "$dir/server.log" >&2
  exit 1
fi
echo "acceptance-kubectl: every expected check passed" >&2
