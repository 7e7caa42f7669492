#!/usr/bin/env bash
# Makes a local base image from Debian's packages, for machines that reach no container
# registry: mmdebstrap writes a root filesystem tarball, `podman import` turns it into an image.
#
#   deploy/images/base.sh runtime   -> localhost/ztna-base:bookworm     (essential + libgcc)
#   deploy/images/base.sh systemd   -> localhost/ztna-systemd:bookworm  (systemd as PID 1, for
#                                      running deploy/systemd/ units in a container)
#
# The tarball is cached in $ZTNA_IMAGE_CACHE (default: $CARGO_TARGET_DIR/deploy, else
# target/deploy) and reused until it is a week old; the image is re-imported only when missing.
# Prints the image name. Root only (podman as root).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${ZTNA_IMAGE_CACHE:-${CARGO_TARGET_DIR:-$ROOT/target}/deploy}
SUITE=bookworm
MIRROR=${ZTNA_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${ZTNA_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}

kind=${1:-runtime}
case $kind in
    runtime)
        image=localhost/ztna-base:$SUITE
        args=(--variant=essential --include=libgcc-s1)
        ;;
    systemd)
        image=localhost/ztna-systemd:$SUITE
        args=(--variant=minbase --include=systemd,systemd-sysv,dbus,iproute2,procps,curl,iputils-ping)
        ;;
    *)
        echo "usage: $0 runtime|systemd" >&2
        exit 2
        ;;
esac

mkdir -p "$CACHE"
tarball=$CACHE/$kind-$SUITE.tar
if [[ ! -s $tarball || -n $(find "$tarball" -mtime +7 2>/dev/null) ]]; then
    echo "base.sh: mmdebstrap $SUITE ($kind) -> $tarball" >&2
    mmdebstrap --quiet --mode=root --format=tar "${args[@]}" \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        "$SUITE" "$tarball.tmp" \
        "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" \
        "deb $SECURITY $SUITE-security main" >&2
    mv "$tarball.tmp" "$tarball"
    podman rmi -f "$image" >/dev/null 2>&1 || true
fi
if ! podman image exists "$image"; then
    echo "base.sh: podman import $tarball $image" >&2
    podman import --quiet "$tarball" "$image" >/dev/null
fi
echo "$image"
