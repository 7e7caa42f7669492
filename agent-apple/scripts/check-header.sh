#!/usr/bin/env bash
# Fails when agent-apple/include/ztna.h differs from what cbindgen generates from the code now.
# `cbindgen --verify` would overwrite the file, so this generates to a temporary file and diffs.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
CARGO_BIN=${CARGO_HOME:-$HOME/.cargo}/bin
CBINDGEN=$(PATH=$PATH:$CARGO_BIN command -v cbindgen) || {
    echo "check-header: cbindgen is not installed (scripts/setup.sh installs it)" >&2
    exit 1
}
tmp=$(mktemp --suffix=.h)
trap 'rm -f "$tmp"' EXIT
"$CBINDGEN" --quiet --config agent-apple/cbindgen.toml --crate ztna-apple --output "$tmp" agent-apple
if ! diff -u agent-apple/include/ztna.h "$tmp"; then
    echo "check-header: agent-apple/include/ztna.h is stale; regenerate it with" >&2
    echo "  cbindgen --config agent-apple/cbindgen.toml --crate ztna-apple --output agent-apple/include/ztna.h agent-apple" >&2
    exit 1
fi
echo "check-header: agent-apple/include/ztna.h matches the code ($(grep -c '^[a-z].*ztna_[a-z_]*(' agent-apple/include/ztna.h) functions)"
