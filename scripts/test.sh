#!/usr/bin/env bash
# Runs every Shoal test: unit, property, integration (real etcdctl against a real
# server; kubectl 1.35/1.20 and the Python client against the API server), fault and
# power-loss tests, and the shared etcdctl and kubectl acceptance suites.
# Installs what it needs first (scripts/deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
export PATH="$HOME/.cargo/bin:$PATH"

echo "== build" >&2
cargo build --workspace --all-targets --locked

acc_dir="../shared/acceptance"
if [ -d "$acc_dir" ]; then
  echo "== fetching kubectl 1.35 and 1.20 (cached)" >&2
  KUBECTL_135="$(bash "$acc_dir/get-kubectl.sh")"
  KUBECTL_120="$(bash "$acc_dir/get-kubectl-old.sh")"
  export KUBECTL_135 KUBECTL_120
fi

echo "== unit, property and integration tests" >&2
cargo test --workspace --locked -- --test-threads 2

acc="../shared/acceptance/etcdctl-acceptance.sh"
if [ -f "$acc" ]; then
  echo "== etcdctl acceptance suite (../shared/acceptance)" >&2
  bash scripts/acceptance-etcdctl.sh
  echo "== kubectl acceptance suite (../shared/acceptance), with a real runc node" >&2
  bash scripts/acceptance-kubectl.sh
else
  echo "== acceptance suites skipped: $acc not found beside the project" >&2
fi
echo "== all tests passed" >&2
