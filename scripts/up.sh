#!/usr/bin/env bash
# Starts a whole Shoal cluster on this machine (as root): `shoal up` runs the server (the
# Kubernetes API on https://127.0.0.1:6443, admin kubeconfig in ./shoal-data/kubeconfig, a
# single-member store serving the etcd v3 API on 127.0.0.1:2379, scheduler, controllers)
# and a node agent (runc, pod network, eBPF service proxy), data in ./shoal-data. Ctrl-C
# stops it; running it again resumes the same cluster. Extra arguments go to `shoal up`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p shoal --locked
exec "${CARGO_TARGET_DIR:-target}/release/shoal" up --data-dir ./shoal-data "$@"
