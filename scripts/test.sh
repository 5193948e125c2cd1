#!/usr/bin/env bash
# Runs every Shoal test: unit, property, integration (real etcdctl against a real
# server), fault and power-loss tests, and the shared etcdctl acceptance suite.
# Installs what it needs first (scripts/deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
export PATH="$HOME/.cargo/bin:$PATH"

echo "== build" >&2
cargo build --workspace --all-targets --locked

echo "== unit, property and integration tests" >&2
cargo test --workspace --locked -- --test-threads 2

acc="../shared/acceptance/etcdctl-acceptance.sh"
if [ -f "$acc" ]; then
  echo "== etcdctl acceptance suite (../shared/acceptance)" >&2
  bash scripts/acceptance-etcdctl.sh
else
  echo "== etcdctl acceptance suite skipped: $acc not found beside the project" >&2
fi
echo "== all tests passed" >&2
