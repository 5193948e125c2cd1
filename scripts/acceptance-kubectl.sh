#!/usr/bin/env bash
# Runs the shared kubectl acceptance suite (kubectl 1.35) against an API-server-only
# Shoal (no agent, no controllers yet) and fails when a check listed in
# scripts/kubectl-acceptance-expected.txt does not pass: the list grows as layers land,
# so a check that passed once can never silently regress. Checks that need nodes or
# controllers fail fast on such a server and are reported, not judged.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${CARGO_TARGET_DIR:-target}/debug/shoal"
[ -x "$bin" ] || cargo build -p shoal --locked
dir=$(mktemp -d)
pid=""
cleanup() { [ -z "$pid" ] || kill "$pid" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
p1=$(port); p2=$(port); p3=$(port)
"$bin" server --name acc --data-dir "$dir/d" --etcd-addr "127.0.0.1:$p1" --peer-addr "127.0.0.1:$p2" \
  --metrics-addr "" --api-addr "127.0.0.1:$p3" --admin-addr "" >"$dir/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 200); do [ -s "$dir/d/kubeconfig" ] && curl -skf "https://127.0.0.1:$p3/readyz" >/dev/null && break; sleep 0.1; done
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
