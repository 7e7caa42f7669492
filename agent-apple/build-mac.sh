#!/usr/bin/env bash
# One command on a Mac (Xcode 15+, Rust 1.95 via rustup, XcodeGen via `brew install xcodegen`):
#   agent-apple/build-mac.sh [--ios] [--team TEAMID]
# builds the Rust static library for macOS arm64 + x86_64 (and iOS arm64 with --ios), wraps it
# with include/ztna.h in apple/ZtnaKit/ZtnaCore.xcframework (SwiftPM wants it inside the package), generates the Xcode project from
# apple/project.yml and builds the app with its packet tunnel extension (Release). Signing needs
# a team with the Network Extension capability: --team or ZTNA_TEAM_ID.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BUILD=$HERE/build
IOS=0
TEAM=${ZTNA_TEAM_ID:-}
while (($#)); do
    case $1 in
        --ios) IOS=1 ;;
        --team) TEAM=$2; shift ;;
        *) echo "usage: $0 [--ios] [--team TEAMID]" >&2; exit 2 ;;
    esac
    shift
done
[[ $(uname) == Darwin ]] || { echo "build-mac.sh: run this on macOS (it needs Xcode)" >&2; exit 1; }
for tool in cargo rustup xcodebuild lipo xcodegen; do
    command -v "$tool" >/dev/null || { echo "build-mac.sh: $tool is missing" >&2; exit 1; }
done

targets=(aarch64-apple-darwin x86_64-apple-darwin)
((IOS)) && targets+=(aarch64-apple-ios)
rustup target add "${targets[@]}"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
for t in "${targets[@]}"; do
    echo "==> cargo build --release -p ztna-apple --target $t"
    (cd "$ROOT" && cargo build --release --locked -p ztna-apple --lib --target "$t")
done

echo "==> XCFramework"
rm -rf "$BUILD"
mkdir -p "$BUILD/macos" "$BUILD/headers"
cp "$HERE/include/ztna.h" "$HERE/apple/ZtnaKit/modulemap/module.modulemap" "$BUILD/headers/"
lipo -create \
    "$CARGO_TARGET_DIR/aarch64-apple-darwin/release/libztna_apple.a" \
    "$CARGO_TARGET_DIR/x86_64-apple-darwin/release/libztna_apple.a" \
    -output "$BUILD/macos/libztna_apple.a"
args=(-library "$BUILD/macos/libztna_apple.a" -headers "$BUILD/headers")
if ((IOS)); then
    args+=(-library "$CARGO_TARGET_DIR/aarch64-apple-ios/release/libztna_apple.a" -headers "$BUILD/headers")
fi
XCF=$HERE/apple/ZtnaKit/ZtnaCore.xcframework
rm -rf "$XCF"
xcodebuild -create-xcframework "${args[@]}" -output "$XCF"

echo "==> Xcode project (XcodeGen) and app"
export ZTNA_TEAM_ID=$TEAM
xcodegen generate --spec "$HERE/apple/project.yml" --project "$HERE/apple"
sign=()
[[ -n $TEAM ]] || sign=(CODE_SIGNING_ALLOWED=NO)
xcodebuild -project "$HERE/apple/ZtnaAgent.xcodeproj" -scheme ZtnaAgent -configuration Release \
    -derivedDataPath "$BUILD/DerivedData" build "${sign[@]}"
echo "==> $BUILD/DerivedData/Build/Products/Release/ZtnaAgent.app"
