#!/usr/bin/env bash
# Short fuzzing run of every decoder of untrusted bytes (proto's control-stream, datagram,
# probe and address-request decoders, the agent's name mappings, the connector's packet parsers,
# the TCP carriage's frame reader, the agent's packet checks and tun-rs's GRO on packets from
# connectors). CI runs it briefly so the targets can't rot; run longer by hand with
# FUZZ_SECONDS=600 scripts/fuzz-smoke.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-20}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi
# cargo-fuzz passes nightly-only flags (-Zsanitizer); the stable toolchain accepts them with
# RUSTC_BOOTSTRAP. The decoders are safe Rust, so no sanitizer is needed to find panics.
export RUSTC_BOOTSTRAP=1
for target in control datagram probe observe connector_packet tcp_carriage name_mapping agent_packet tun_gro; do
  echo "== fuzzing $target for ${seconds}s"
  cargo fuzz run --sanitizer none "$target" -- -max_total_time="$seconds" -rss_limit_mb=1024 -print_final_stats=0 2>&1 | tail -n 3
done
