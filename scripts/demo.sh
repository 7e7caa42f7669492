#!/usr/bin/env bash
# The ztna demo, on one machine, in network namespaces (run as root):
#
#   agent (alice) --> relay <-- connector (conn1) --> backend (UDP echo, DNS)
#
# It installs what it needs (scripts/setup.sh), builds the release binaries, mints a PKI,
# builds the topology of deploy/netns/ (prefix "demo"), starts a UDP echo server and dnsmasq
# on the backend and the relay, connector and agent with deploy/config/*.toml, waits for the
# tunnel, shows ping, a UDP echo, DNS and `ztna-agent status` through it, and tears everything
# down again on exit (also on failure or Ctrl-C).
#
# Environment: DEMO_PREFIX (default "demo"), DEMO_KEEP=1 keeps the work directory (PKI,
# configs, logs), ZTNA_LOG sets the daemons' log filter (default info).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PREFIX=${DEMO_PREFIX:-demo}
TOPO="$ROOT/deploy/netns/topo.sh"

if [[ -t 1 ]]; then B=$'\e[1m' G=$'\e[32m' R=$'\e[31m' N=$'\e[0m'; else B='' G='' R='' N=''; fi
say() { printf '\n%s==> %s%s\n' "$B" "$*" "$N"; }
show() { printf '%s$ %s%s\n' "$G" "$*" "$N"; }
die() { printf '%sdemo: %s%s\n' "$R" "$*" "$N" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root: sudo $0 (network namespaces and a TUN device)"

say "Installing dependencies (scripts/setup.sh)"
bash scripts/setup.sh

say "Building (cargo build --release --bins)"
cargo build --release --bins
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
for b in ztna-relay ztna-connector ztna-agent ztna-test-udp-echo; do
    [[ -x $BIN/$b ]] || die "$BIN/$b is missing after the build"
done

WORK=$(mktemp -d /tmp/ztna-demo.XXXXXX)
PIDS=()
NAMES=()

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if ((rc != 0)); then
        printf '\n%sdemo failed (exit %d); last lines of each log:%s\n' "$R" "$rc" "$N"
        for f in "$WORK"/*.log; do
            [[ -f $f ]] || continue
            printf -- '----- %s -----\n' "$f"
            tail -n 25 "$f"
        done
    fi
    say "Tearing down"
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for _ in $(seq 30); do
        local alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    wait 2>/dev/null
    bash "$TOPO" down "$PREFIX"
    if [[ ${DEMO_KEEP:-0} == 1 || $rc -ne 0 ]]; then
        echo "kept $WORK (PKI, configs, logs)"
    else
        rm -rf "$WORK"
    fi
    echo "done."
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NODE NAME CMD...: run CMD in ${PREFIX}-NODE in the background, logging to $WORK/NAME.log.
start() {
    local node=$1 name=$2
    shift 2
    show "ip netns exec $PREFIX-$node $* > $WORK/$name.log 2>&1 &"
    ip netns exec "$PREFIX-$node" "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    NAMES+=("$name")
}

# run_in NODE CMD...: run CMD in ${PREFIX}-NODE, showing it first.
run_in() {
    local node=$1
    shift
    show "ip netns exec $PREFIX-$node $*"
    ip netns exec "$PREFIX-$node" "$@"
}

ensure_alive() {
    local i
    for i in "${!PIDS[@]}"; do
        kill -0 "${PIDS[$i]}" 2>/dev/null || die "${NAMES[$i]} exited; see $WORK/${NAMES[$i]}.log"
    done
}

say "Minting the organisation PKI in $WORK/pki (ztna-relay pki)"
PKI="$WORK/pki"
show "ztna-relay pki init --dir $PKI --org 'ztna demo'"
"$BIN/ztna-relay" pki init --dir "$PKI" --org "ztna demo"
show "ztna-relay pki issue --dir $PKI --role relay --name relay"
"$BIN/ztna-relay" pki issue --dir "$PKI" --role relay --name relay
show "ztna-relay pki issue --dir $PKI --role connector --name conn1"
"$BIN/ztna-relay" pki issue --dir "$PKI" --role connector --name conn1
show "ztna-relay pki issue --dir $PKI --role agent --name alice --group eng"
"$BIN/ztna-relay" pki issue --dir "$PKI" --role agent --name alice --group eng

say "Writing configs from deploy/config/ (PKI paths and status socket pointed at $WORK)"
SOCK="$WORK/agent.sock"
for c in relay connector agent; do
    sed -e "s#/etc/ztna/pki/#$PKI/#g" -e "s#/run/ztna/agent.sock#$SOCK#g" \
        "deploy/config/$c.toml" >"$WORK/$c.toml"
    echo "  $WORK/$c.toml"
done

say "Building the topology (deploy/netns/topo.sh up $PREFIX)"
bash "$TOPO" up "$PREFIX"
ip netns list | grep "^$PREFIX-" | sed 's/^/  /'
cat <<'EOT'
  relay 10.10.0.1, agent 10.10.0.2, connector 10.10.0.3 on bridge br0 (the "WAN");
  connector 10.10.3.1 <-> backend 10.10.3.2 on their own link.
EOT

export ZTNA_LOG=${ZTNA_LOG:-info}
export NO_COLOR=1 # plain log files

say "Starting the backend services (in $PREFIX-backend, 10.10.3.2)"
start backend udp-echo "$BIN/ztna-test-udp-echo" 10.10.3.2:7 10.10.3.2:9 --exit-after 900
start backend dnsmasq dnsmasq --keep-in-foreground --log-facility=- --no-resolv --no-hosts \
    --listen-address=10.10.3.2 --bind-interfaces --address=/backend.ztna.test/10.10.3.2 \
    --port=53 --pid-file="$WORK/dnsmasq.pid"

say "Starting the relay, the connector and the agent"
start relay relay "$BIN/ztna-relay" --config "$WORK/relay.toml"
sleep 0.5
start conn connector "$BIN/ztna-connector" --config "$WORK/connector.toml"
start agent agent "$BIN/ztna-agent" up --config "$WORK/agent.toml"

say "Waiting (at most 30 s) for the tunnel"
ready=0
for _ in $(seq 60); do
    ensure_alive
    if ip netns exec "$PREFIX-agent" "$BIN/ztna-agent" status --socket "$SOCK" --json 2>/dev/null |
        jq -e '.connected and .tunnel_ip != null and any(.connectors[]?; .name == "conn1" and (.path == "relay" or (.path | startswith("direct-"))))' \
            >/dev/null 2>&1; then
        ready=1
        break
    fi
    sleep 0.5
done
((ready)) || die "the agent did not connect within 30 s"
echo "  the agent is connected; waiting (at most 10 s) for a first ping to answer"
answered=0
for _ in $(seq 10); do
    if ip netns exec "$PREFIX-agent" ping -n -c 1 -W 1 10.100.0.1 >/dev/null 2>&1; then
        answered=1
        break
    fi
done
((answered)) || die "the tunnel is up but 10.100.0.1 did not answer a ping within 10 s"
echo "  tunnel up."

say "ICMP through the tunnel: the agent pings the echo service's virtual IP"
run_in agent ping -n -c 3 10.100.0.1

say "UDP through the tunnel: a datagram to the echo service (port 7) comes back"
show "ip netns exec $PREFIX-agent sh -c 'echo hello | nc -u -w1 10.100.0.1 7'"
reply=$(ip netns exec "$PREFIX-agent" sh -c 'echo hello | nc -u -w1 10.100.0.1 7' || true)
echo "$reply"
[[ $reply == hello ]] || die "expected the echo 'hello', got '$reply'"

say "DNS through the tunnel: dnsmasq on the backend, reached as 10.100.0.2"
run_in agent dig +short +time=2 +tries=2 @10.100.0.2 backend.ztna.test

say "The agent's routes: one /32 per allowed service through ztna0"
run_in agent ip -4 route show dev ztna0

say "ztna-agent status (agent and connector share a LAN here, so the tunnel runs on the direct LAN path; the relay stays the fallback)"
run_in agent "$BIN/ztna-agent" status --socket "$SOCK"

say "Demo complete"
