#!/usr/bin/env bash
# Builds the ztna-apple static library for the macOS targets on Linux and checks that the
# exported `ztna_*` symbols of each Mach-O archive are exactly the functions of include/ztna.h.
#
# A static library is an archive of object files: no Apple linker and no SDK libraries are
# needed. The only C in the dependency tree is ring's. ring supports building without a libc
# sysroot (`-nostdlibinc -DRING_CORE_NOSTDLIBINC=1`, what its build.rs does for wasm32 and
# musl cross builds) except for one SDK header on Apple, <TargetConditionals.h> (it reads
# TARGET_OS_OSX/TARGET_OS_IPHONE to tell macOS from iOS). So Debian's clang cross-compiles it
# (`--target=arm64-apple-macosx`) with those flags against a stand-in SDK root holding only that
# header, with the macOS values the real SDK defines. What stays Mac-only is linking an executable (the app, the extension, a test binary)
# against the real SDK: see agent-apple/README.md.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
TARGETS=(${ZTNA_APPLE_TARGETS:-aarch64-apple-darwin x86_64-apple-darwin})
CLANG=$(command -v clang-14 || command -v clang) || { echo "check-apple-targets: clang is missing (scripts/setup.sh installs clang-14)" >&2; exit 1; }
AR=$(command -v llvm-ar-14 || command -v llvm-ar) || { echo "check-apple-targets: llvm-ar is missing" >&2; exit 1; }
NM=$(command -v llvm-nm-14 || command -v llvm-nm) || { echo "check-apple-targets: llvm-nm is missing" >&2; exit 1; }
SDK=$(mktemp -d)
trap 'rm -rf "$SDK"' EXIT
mkdir -p "$SDK/usr/include"
cat >"$SDK/usr/include/TargetConditionals.h" <<'HEADER'
/* Stand-in for the macOS SDK's TargetConditionals.h: the macOS values only. */
#pragma once
#define TARGET_OS_MAC 1
#define TARGET_OS_OSX 1
#define TARGET_OS_IPHONE 0
#define TARGET_OS_IOS 0
#define TARGET_OS_TV 0
#define TARGET_OS_WATCH 0
#define TARGET_OS_SIMULATOR 0
HEADER
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

want=$(grep -oE '\bztna_[a-z_]+\(' agent-apple/include/ztna.h | tr -d '(' | sort -u)
for t in "${TARGETS[@]}"; do
    installed=$(rustup target list --installed 2>/dev/null || true)
    grep -qx "$t" <<<"$installed" || { echo "check-apple-targets: rustup target $t is not installed (scripts/setup.sh adds it)" >&2; exit 1; }
    var=${t//-/_}
    extra=""
    # x86_64: ring's ADX code includes <immintrin.h>, whose hosted part pulls in <stdlib.h>
    # (for _mm_malloc, which ring does not use); -ffreestanding leaves that part out.
    [[ $t == x86_64-* ]] && extra="-ffreestanding"
    echo "check-apple-targets: cargo build --release -p ztna-apple --lib --target $t"
    env "CC_$var=$CLANG" "AR_$var=$AR" "CFLAGS_$var=-isysroot $SDK -nostdlibinc -isystem $SDK/usr/include -DRING_CORE_NOSTDLIBINC=1 $extra" SDKROOT="$SDK" \
        cargo build --release --locked --quiet -p ztna-apple --lib --target "$t"
    lib=$TARGET_DIR/$t/release/libztna_apple.a
    # llvm-nm exits non-zero on the archive's non-object member (lib.rmeta): keep its output.
    symbols=$("$NM" --defined-only --extern-only "$lib" 2>/dev/null || true)
    have=$(awk '$2 == "T" && $3 ~ /^_ztna_/ {print substr($3, 2)}' <<<"$symbols" | sort -u)
    if ! grep -q 'T _ztna_' <<<"$symbols"; then
        echo "check-apple-targets: $t: no ztna_* symbols in $lib" >&2
        exit 1
    fi
    if [[ "$have" != "$want" ]]; then
        echo "check-apple-targets: $t: exported ztna_* symbols differ from the header" >&2
        diff <(echo "$want") <(echo "$have") >&2 || true
        exit 1
    fi
    echo "check-apple-targets: $t: $(wc -l <<<"$have") ztna_* symbols match the header ($(du -h "$lib" | cut -f1) archive)"
done
