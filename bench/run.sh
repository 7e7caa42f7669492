#!/usr/bin/env bash
# The ztna benchmarks in one command, as root (see bench/README.md):
#   sudo bench/run.sh             install what is missing (scripts/setup.sh), build the release
#                                 binaries, run every path 3 times and the relay-scale runs, write
#                                 bench/results/{<timestamp>.json,latest.json,latest.md,latest.png}
#   sudo bench/run.sh --smoke     one short iteration of everything (CI); results go to
#                                 ${CARGO_TARGET_DIR:-target}/bench-smoke, not bench/results
#   --no-build                    skip setup and build (scripts/test.sh has done both)
# Other arguments go to ztna-bench (`--iterations N`, `--paths raw,ztna-relay`, `--agents 100`,
# `--no-relay-scale`, `--no-fleet`, `--fleet-spread nearest,round-robin`, `--out DIR`;
# `ztna-bench --help`).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if [[ $(id -u) -ne 0 ]]; then
    echo "bench/run.sh: run as root (sudo bench/run.sh): it builds network namespaces" >&2
    exit 1
fi

build=1 smoke=0 out=""
args=()
while (($#)); do
    case $1 in
        --no-build) build=0 ;;
        --smoke) smoke=1; args+=("$1") ;;
        --out) out=${2:?--out needs a directory}; shift ;;
        *) args+=("$1") ;;
    esac
    shift
done

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [[ -z $out ]]; then
    if ((smoke)); then out=$TARGET/bench-smoke; else out=$ROOT/bench/results; fi
fi

if ((build)); then
    bash scripts/setup.sh
    cargo build --release --workspace --bins --locked
fi
export ZTNA_BIN_DIR=${ZTNA_BIN_DIR:-$TARGET/release}
# cargo installs boringtun-cli into ~/.cargo/bin.
export PATH=$PATH:${CARGO_HOME:-$HOME/.cargo}/bin

rc=0
"$ZTNA_BIN_DIR/ztna-bench" --out "$out" "${args[@]}" || rc=$?
if [[ -f $out/latest.json ]]; then
    # Debian's python3 has python3-matplotlib; a python3 earlier on PATH may not.
    py=/usr/bin/python3
    [[ -x $py ]] || py=python3
    "$py" bench/chart.py "$out/latest.json" "$out/latest.png"
    echo "bench/run.sh: wrote $out/latest.md, $out/latest.json and $out/latest.png"
fi
exit "$rc"
