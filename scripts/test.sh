#!/usr/bin/env bash
# The full ztna test suite on a fresh Debian 12 machine, as root (CI runs it through .ci/run):
#   setup -> rustfmt -> clippy -> release build -> unit + end-to-end tests -> deploy checks
#   -> fuzz smoke -> bench smoke.
# Exits non-zero on the first failing step. The end-to-end tests (e2e/) need root: they build
# network namespaces and TUN devices, and run the release binaries built here.
#
# Environment: CARGO_TARGET_DIR is honoured; ZTNA_E2E_LOG sets the daemons' log filter in the
# end-to-end tests; extra arguments are passed to `cargo test` (e.g. `-- tunnel_basics`).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

STEP_START=$SECONDS
step() {
    printf '\n==> [%4ds] %s\n' "$((SECONDS - STEP_START))" "$*"
}
on_exit() {
    local rc=$?
    if ((rc != 0)); then
        printf '\n==> FAILED (exit %d) after %d s\n' "$rc" "$((SECONDS - STEP_START))" >&2
    fi
}
trap on_exit EXIT

if [[ $(id -u) -ne 0 ]]; then
    echo "test.sh: run as root (sudo scripts/test.sh): it installs packages and the end-to-end tests need network namespaces" >&2
    exit 1
fi

step "setup (scripts/setup.sh)"
bash scripts/setup.sh

# The connector's build.rs must build the XDP program here, not warn and skip it.
export ZTNA_REQUIRE_EBPF=1

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets --locked -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

# The release binaries the end-to-end tests run. `cargo test --release` below compiles the test
# targets against the same release dependencies, so nothing is built twice.
step "cargo build --release --workspace --bins --locked"
cargo build --release --workspace --bins --locked
export ZTNA_BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/release"

# agent-apple: the static library the C harness links (e2e/tests/apple_harness.rs), the header
# drift check, the macOS targets (static libraries and their ztna_* symbols) and the Swift parse.
step "agent-apple: static library, header drift, Apple targets, Swift sources"
cargo build --release --locked -p ztna-apple --lib
bash agent-apple/scripts/check-header.sh
bash agent-apple/scripts/check-apple-targets.sh
/opt/ztna-venv/swift/bin/python agent-apple/scripts/check-swift.py

step "cargo test --release --workspace --locked (unit and end-to-end tests)"
cargo test --release --workspace --locked --no-fail-fast "$@"

# Deployment artefacts (deploy/): systemd units, Kubernetes overlays, EC2 Terraform and
# cloud-init validated offline; the images built from the release binaries above and run under
# podman with traffic through them; the units run under systemd in a container.
step "deploy checks (deploy/check.sh)"
bash deploy/check.sh

# ---------------------------------------------------------------------------------------------
# FUZZ SMOKE: a short replay/run of the fuzz targets in fuzz/. The script belongs to the fuzz
# work; until it exists this step says so and passes.
# ---------------------------------------------------------------------------------------------
if [[ -f scripts/fuzz-smoke.sh ]]; then
    step "fuzz smoke (scripts/fuzz-smoke.sh)"
    bash scripts/fuzz-smoke.sh
else
    step "fuzz smoke: scripts/fuzz-smoke.sh does not exist yet, skipped"
fi

# One short iteration of every benchmark path, a small relay-scale run and a 30-agent relay fleet
# (three relays, about 4 s), on the binaries built above, so the harness can't rot. It reports
# numbers but asserts none; its results stay in the target directory.
step "bench smoke (bench/run.sh --smoke --no-build)"
bash bench/run.sh --smoke --no-build

step "all steps passed"
