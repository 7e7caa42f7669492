#!/usr/bin/env bash
# Regenerates the NAT zoo matrix of docs/nat.md: builds the release binaries, runs the ignored
# end-to-end test `nat_zoo_matrix` (e2e/tests/nat_zoo.rs; every cell of the zoo of
# deploy/netns/nat.sh, about 4 minutes on 2 cores) and rewrites the table between the markers
# in docs/nat.md; then runs port prediction (symmetric against port-restricted, both orders)
# 10 times each (about 2 minutes) and rewrites its list. As root (network namespaces).
#
#   sudo scripts/nat-matrix.sh
#
# CARGO_TARGET_DIR is honoured.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [[ $(id -u) -ne 0 ]]; then
    echo "nat-matrix.sh: run as root (network namespaces)" >&2
    exit 1
fi
# The same build as scripts/test.sh (same features and flags), so nothing is built twice.
export ZTNA_REQUIRE_EBPF=1
cargo build --release --locked --workspace --bins
export ZTNA_BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/release"
export ZTNA_NAT_MATRIX_OUT="$ROOT/docs/nat.md"
cargo test --release --locked -p ztna-e2e --test nat_zoo -- --ignored --nocapture nat_zoo_matrix
ZTNA_NAT_TRIES=10 cargo test --release --locked -p ztna-e2e --test nat_zoo -- --nocapture \
    symmetric_against_port_restricted_goes_direct_by_port_prediction
