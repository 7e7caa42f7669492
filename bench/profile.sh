#!/usr/bin/env bash
# Samples the ztna daemons with perf (cpu-clock, 1999 Hz, 6 s) during one test of one path
# (by default the single-stream TCP test), and prints each daemon's split between kernel and
# user space and its hottest symbols. Needs root, perf and a release build (scripts/test.sh or
# bench/run.sh builds one).
#
#   sudo bench/profile.sh [PATH] [OUT_PREFIX] [TEST]
#
# PATH: ztna-direct (default), ztna-direct-xdp or ztna-relay. TEST: tcp1 (default), tcp4,
# udp_down (backend -> agent UDP, 1200-byte payloads) or udp_small (the same, 64 bytes).
#
# ZTNA_BIN_DIR picks the binaries (default target/release), so two builds can be compared.
# The profiles are OUT_PREFIX.{agent,connector,relay}.perf (default /tmp/ztna-profile);
# `perf report -i FILE` reads them. perf slows the daemons: compare profiles with profiles.
set -euo pipefail
cd "$(dirname "$0")/.."
path=${1:-ztna-direct}
out=${2:-/tmp/ztna-profile}
test=${3:-tcp1}
case $test in tcp1 | tcp4 | udp_down | udp_small) ;; *) echo "unknown test $test" >&2; exit 2 ;; esac
bin=${ZTNA_BIN_DIR:-$PWD/target/release}
log=$out.bench.log
ZTNA_BIN_DIR=$bin timeout 600 "$bin/ztna-bench" --iterations 1 --secs 10 --paths "$path" \
  --no-relay-scale --no-relay-forward --no-fleet --out "$out.results" >"$log" 2>&1 &
bench=$!
for _ in $(seq 1 600); do
  grep -q "$test: load" "$log" && break
  sleep 0.2
done
pid() { grep -o "started $1 in [a-z]* (pid [0-9]*)" "$log" | grep -o "[0-9]*)" | tr -d ')' | tail -1; }
sleep 2 # into the test
for d in agent connector relay; do
  p=$(pid "$d")
  [ -n "$p" ] && perf record -F 1999 -p "$p" -o "$out.$d.perf" -- sleep 6 >/dev/null 2>&1 &
done
# The whole machine too, to see the time spent outside the daemons (iperf3, softirq).
perf record -a -F 999 -o "$out.all.perf" -- sleep 6 >/dev/null 2>&1 &
wait "$bench" || { echo "the bench failed: $log" >&2; exit 1; }
wait || true # the perf runs
set +o pipefail # `head` closes perf report's output early
grep "$test: [0-9]" "$log"
for d in agent connector relay; do
  [ -f "$out.$d.perf" ] || continue
  echo "== $d: $(perf script -i "$out.$d.perf" -F period 2>/dev/null | wc -l) samples"
  perf report -i "$out.$d.perf" --no-children --sort dso 2>/dev/null | grep -v '^#' | grep -v '^$' | head -3
  perf report -i "$out.$d.perf" --no-children --sort symbol 2>/dev/null | grep -v '^#' | grep -v '^$' | head -8 | cut -c1-100
done
if [ -f "$out.all.perf" ]; then
  echo "== whole machine, by command"
  perf report -i "$out.all.perf" --no-children --sort comm 2>/dev/null | grep -v '^#' | grep -v '^$' | head -8
fi
