#!/usr/bin/env bash
# Starts Shoal on embedded defaults on this machine: the Kubernetes API on
# https://127.0.0.1:6443 (admin kubeconfig in ./shoal-data/kubeconfig) on a single-member
# store serving the etcd v3 API on 127.0.0.1:2379 (metrics on 127.0.0.1:2381), data in
# ./shoal-data. Ctrl-C stops it. Extra arguments go to `shoal server`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p shoal --locked
exec "${CARGO_TARGET_DIR:-target}/release/shoal" server --name default --data-dir ./shoal-data "$@"
