#!/bin/sh
# The build stage of deploy/images/Containerfile.*: puts the release binary BIN in /out.
#
# When the build context holds prebuilt/BIN (deploy/images/build.sh copies the binaries the
# test suite already built there), that file is used as is; otherwise BIN is built from the
# source tree in the context with cargo (the production path, in a builder image with the
# toolchain of rust-toolchain.toml; see Containerfile.builder).
set -eu
bin=$1
mkdir -p /out
if [ -x "/src/prebuilt/$bin" ]; then
    cp "/src/prebuilt/$bin" "/out/$bin"
    echo "build-bins: using prebuilt/$bin"
    exit 0
fi
# The connector embeds its XDP program: the build must make it, not skip it.
ZTNA_REQUIRE_EBPF=1 cargo build --release --locked -p "$bin" --bin "$bin"
cp "target/release/$bin" "/out/$bin"
