#!/usr/bin/env bash
# Builds the ztna-apple static library for the macOS targets on Linux and checks that the
# exported `ztna_*` symbols of each Mach-O archive are exactly the functions of include/ztna.h.
#
# A static library is an archive of object files: no Apple linker and no SDK libraries are
# needed. The only C in the dependency tree is ring's, and ring's C needs only the compiler's
# freestanding headers, so Debian's clang cross-compiles it (`--target=arm64-apple-macosx`) with
# an empty SDK root. What stays Mac-only is linking an executable (the app, the extension, a
# test binary) against the SDK: see agent-apple/README.md.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
TARGETS=(${ZTNA_APPLE_TARGETS:-aarch64-apple-darwin x86_64-apple-darwin})
CLANG=$(command -v clang-14 || command -v clang) || { echo "check-apple-targets: clang is missing (scripts/setup.sh installs clang-14)" >&2; exit 1; }
AR=$(command -v llvm-ar-14 || command -v llvm-ar) || { echo "check-apple-targets: llvm-ar is missing" >&2; exit 1; }
NM=$(command -v llvm-nm-14 || command -v llvm-nm) || { echo "check-apple-targets: llvm-nm is missing" >&2; exit 1; }
SDK=$(mktemp -d)
trap 'rm -rf "$SDK"' EXIT
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

want=$(grep -oE '\bztna_[a-z_]+\(' agent-apple/include/ztna.h | tr -d '(' | sort -u)
for t in "${TARGETS[@]}"; do
    installed=$(rustup target list --installed 2>/dev/null || true)
    grep -qx "$t" <<<"$installed" || { echo "check-apple-targets: rustup target $t is not installed (scripts/setup.sh adds it)" >&2; exit 1; }
    var=${t//-/_}
    echo "check-apple-targets: cargo build --release -p ztna-apple --lib --target $t"
    env "CC_$var=$CLANG" "AR_$var=$AR" "CFLAGS_$var=-isysroot $SDK" SDKROOT="$SDK" \
        cargo build --release --locked --quiet -p ztna-apple --lib --target "$t"
    lib=$TARGET_DIR/$t/release/libztna_apple.a
    file_kind=$("$NM" --format=just-symbols --defined-only --extern-only "$lib" 2>/dev/null | grep -c . || true)
    have=$("$NM" --defined-only --extern-only "$lib" 2>/dev/null | awk '$2 == "T" && $3 ~ /^_ztna_/ {print substr($3, 2)}' | sort -u)
    if [[ "$have" != "$want" ]]; then
        echo "check-apple-targets: $t: exported ztna_* symbols differ from the header" >&2
        diff <(echo "$want") <(echo "$have") >&2 || true
        exit 1
    fi
    echo "check-apple-targets: $t: $(wc -l <<<"$have") ztna_* symbols match the header ($file_kind external symbols, $(du -h "$lib" | cut -f1))"
done
