#!/usr/bin/env bash
# Builds the three images, ztna-relay, ztna-connector and ztna-agent, with one command.
#
#   deploy/images/build.sh                 # from the release binaries in
#                                          # ${CARGO_TARGET_DIR:-target}/release, on a base made
#                                          # locally from Debian packages (base.sh): no registry
#   deploy/images/build.sh --from-source --base docker.io/library/debian:bookworm-slim \
#       --builder localhost/ztna-builder   # production: cargo builds in the build stage
#
# Options: --bin-dir DIR (prebuilt binaries), --base IMAGE, --builder IMAGE, --tag TAG
# (default "dev"), --from-source. Always --pull=never: every image named must already exist
# locally (podman pull it first where a registry is reachable). Prints the images built.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN_DIR=${CARGO_TARGET_DIR:-$ROOT/target}/release
BASE=""
BUILDER=""
TAG=dev
FROM_SOURCE=0
while (($#)); do
    case $1 in
        --bin-dir) BIN_DIR=$2; shift 2 ;;
        --base) BASE=$2; shift 2 ;;
        --builder) BUILDER=$2; shift 2 ;;
        --tag) TAG=$2; shift 2 ;;
        --from-source) FROM_SOURCE=1; shift ;;
        -h | --help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

[[ -n $BASE ]] || BASE=$(bash "$ROOT/deploy/images/base.sh" runtime)

if ((FROM_SOURCE)); then
    [[ -n $BUILDER ]] || { echo "build.sh: --from-source needs --builder IMAGE" >&2; exit 2; }
    CONTEXT=$ROOT
    cleanup() { :; }
else
    # A small context: the build stage script and the binaries, not the whole target dir. The
    # build stage then needs only a shell and cp: the runtime base serves as BUILDER.
    [[ -n $BUILDER ]] || BUILDER=$BASE
    CONTEXT=$(mktemp -d /tmp/ztna-images.XXXXXX)
    cleanup() { rm -rf "$CONTEXT"; }
    mkdir -p "$CONTEXT/deploy/images" "$CONTEXT/prebuilt"
    cp "$ROOT/deploy/images/build-bins.sh" "$CONTEXT/deploy/images/"
    for b in ztna-relay ztna-connector ztna-agent; do
        [[ -x $BIN_DIR/$b ]] || { echo "build.sh: $BIN_DIR/$b is missing (cargo build --release --workspace --bins)" >&2; exit 1; }
        cp "$BIN_DIR/$b" "$CONTEXT/prebuilt/"
    done
fi
trap cleanup EXIT

for d in relay connector agent; do
    podman build --quiet --pull=never --layers=false \
        --build-arg "BASE=$BASE" --build-arg "BUILDER=$BUILDER" \
        -f "$ROOT/deploy/images/Containerfile.$d" -t "localhost/ztna-$d:$TAG" "$CONTEXT" >/dev/null
    echo "localhost/ztna-$d:$TAG"
done
