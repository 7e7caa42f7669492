#!/usr/bin/env bash
# ztna test topology built from network namespaces.
#
# As a command:
#   topo.sh up PREFIX                 build the topology (runs `down PREFIX` first)
#   topo.sh down PREFIX               tear it down (idempotent; kills processes left inside)
#   topo.sh exec PREFIX NODE CMD...   run CMD inside ${PREFIX}-${NODE}
#   topo.sh list PREFIX               print the namespaces of PREFIX that exist
#
# As a library (`source deploy/netns/topo.sh`): the functions below, one per node and per link,
# so a later topology can put NAT routers between the agent and the WAN by calling topo_node,
# topo_link and topo_wan_port with other names. Every function returns non-zero on failure and
# leaves the caller's shell options alone.
#
# Layout (see README.md next to this file):
#   ${P}-wan      bridge br0: the "public" segment 10.10.0.0/24
#   ${P}-relay    wan0 10.10.0.1/24
#   ${P}-agent    wan0 10.10.0.2/24
#   ${P}-conn     wan0 10.10.0.3/24, back0 10.10.3.1/24
#   ${P}-backend  eth0 10.10.3.2/24
#
# Interfaces are always created with `ip -n NS link add ... peer ... netns OTHER`, so no
# interface of the topology ever exists in the root namespace, and interface names never carry
# the prefix (they live in their own namespaces). Node names are [a-z0-9]+, so `down demo`
# never touches a topology whose prefix is `demo-x`.
#
# Environment: TOPO_NO_PING_GROUP=1 leaves net.ipv4.ping_group_range alone in ${P}-conn
# (the connector then can't open unprivileged ICMP sockets).

# Fixed addresses: tests and deploy/config/*.toml rely on these (also for scripts that source
# this file).
# shellcheck disable=SC2034
TOPO_WAN_NET=10.10.0.0/24
TOPO_RELAY_ADDR=10.10.0.1
TOPO_AGENT_ADDR=10.10.0.2
TOPO_CONN_ADDR=10.10.0.3
TOPO_CONN_BACK_ADDR=10.10.3.1
TOPO_BACKEND_ADDR=10.10.3.2

_topo_err() { printf 'topo.sh: %s\n' "$*" >&2; }

# Run a command; on failure say which one failed.
_topo() {
    "$@" || { local rc=$?; _topo_err "failed ($rc): $*"; return "$rc"; }
}

_topo_check_prefix() {
    local p=${1:-}
    if [[ -z $p ]]; then _topo_err "missing PREFIX"; return 2; fi
    if [[ ! $p =~ ^[A-Za-z0-9][A-Za-z0-9_-]{0,30}$ ]]; then
        _topo_err "bad PREFIX '$p' (letters, digits, _ and -, at most 31 characters)"
        return 2
    fi
}

# topo_ns PREFIX NODE -> prints the namespace name.
topo_ns() { printf '%s-%s\n' "$1" "$2"; }

# topo_node PREFIX NODE: create the namespace ${PREFIX}-${NODE} with lo up.
topo_node() {
    local ns
    [[ $2 =~ ^[a-z0-9]+$ ]] || { _topo_err "bad node name '$2' (use [a-z0-9]+)"; return 2; }
    ns=$(topo_ns "$1" "$2")
    _topo ip netns add "$ns" || return
    _topo ip -n "$ns" link set lo up || return
}

# topo_bridge PREFIX NODE: namespace ${PREFIX}-${NODE} with bridge br0 (STP off, so ports
# forward at once).
topo_bridge() {
    local ns
    ns=$(topo_ns "$1" "$2")
    topo_node "$1" "$2" || return
    _topo ip -n "$ns" link add br0 type bridge stp_state 0 || return
    _topo ip -n "$ns" link set br0 up || return
}

# topo_wan PREFIX: the WAN namespace with bridge br0.
topo_wan() {
    topo_bridge "$1" wan || return
}

# topo_bridge_port PREFIX BRIDGE_NODE NODE IFNAME ADDR/LEN: a veth from NODE (named IFNAME there)
# to a port of br0 in ${PREFIX}-${BRIDGE_NODE} (named NODE there), with ADDR/LEN on the NODE side.
topo_bridge_port() {
    local p=$1 br=$2 node=$3 ifname=$4 addr=$5 ns brns
    ns=$(topo_ns "$p" "$node")
    brns=$(topo_ns "$p" "$br")
    _topo ip -n "$ns" link add "$ifname" type veth peer name "$node" netns "$brns" || return
    _topo ip -n "$brns" link set "$node" master br0 || return
    _topo ip -n "$brns" link set "$node" up || return
    _topo ip -n "$ns" addr add "$addr" dev "$ifname" || return
    _topo ip -n "$ns" link set "$ifname" up || return
}

# topo_wan_port PREFIX NODE IFNAME ADDR/LEN: topo_bridge_port on the WAN bridge ${PREFIX}-wan.
topo_wan_port() {
    topo_bridge_port "$1" wan "$2" "$3" "$4" || return
}

# topo_link PREFIX NODE_A IF_A ADDR_A/LEN NODE_B IF_B ADDR_B/LEN: a point-to-point veth.
# An empty address leaves that side unaddressed.
topo_link() {
    local p=$1 a=$2 ifa=$3 addra=$4 b=$5 ifb=$6 addrb=$7 nsa nsb
    nsa=$(topo_ns "$p" "$a")
    nsb=$(topo_ns "$p" "$b")
    _topo ip -n "$nsa" link add "$ifa" type veth peer name "$ifb" netns "$nsb" || return
    if [[ -n $addra ]]; then _topo ip -n "$nsa" addr add "$addra" dev "$ifa" || return; fi
    if [[ -n $addrb ]]; then _topo ip -n "$nsb" addr add "$addrb" dev "$ifb" || return; fi
    _topo ip -n "$nsa" link set "$ifa" up || return
    _topo ip -n "$nsb" link set "$ifb" up || return
}

# topo_route PREFIX NODE DEST VIA: e.g. topo_route p agent default 192.168.1.1
topo_route() {
    _topo ip -n "$(topo_ns "$1" "$2")" route replace "$3" via "$4" || return
}

# topo_sysctl PREFIX NODE KEY=VALUE
topo_sysctl() {
    _topo ip netns exec "$(topo_ns "$1" "$2")" sysctl -q -w "$3" || return
}

topo_relay() {
    topo_node "$1" relay || return
    topo_wan_port "$1" relay wan0 "$TOPO_RELAY_ADDR/24" || return
}

topo_agent() {
    topo_node "$1" agent || return
    topo_wan_port "$1" agent wan0 "$TOPO_AGENT_ADDR/24" || return
}

topo_conn() {
    topo_node "$1" conn || return
    topo_wan_port "$1" conn wan0 "$TOPO_CONN_ADDR/24" || return
    if [[ ${TOPO_NO_PING_GROUP:-0} != 1 ]]; then
        # Unprivileged ICMP echo sockets for every group: the connector pings backends with them.
        topo_sysctl "$1" conn 'net.ipv4.ping_group_range=0 2147483647' || return
    fi
}

# The backend needs no default route: it answers the connector's own address 10.10.3.1.
topo_backend() {
    topo_node "$1" backend || return
    topo_link "$1" conn back0 "$TOPO_CONN_BACK_ADDR/24" backend eth0 "$TOPO_BACKEND_ADDR/24" || return
}

# topo_up PREFIX: the whole demo/test topology. Tears down an existing one with that prefix.
topo_up() {
    local p=$1
    _topo_check_prefix "$p" || return
    topo_down "$p" || return
    if ! {
        topo_wan "$p" &&
            topo_relay "$p" &&
            topo_agent "$p" &&
            topo_conn "$p" &&
            topo_backend "$p"
    }; then
        _topo_err "building topology '$p' failed; tearing down what was built"
        topo_down "$p"
        return 1
    fi
}

# topo_list PREFIX: namespaces of PREFIX that exist (exactly ${PREFIX}-[a-z0-9]+).
topo_list() {
    local p=$1 ns
    ip netns list 2>/dev/null | while read -r ns _; do
        if [[ $ns == "$p"-* && ${ns#"$p"-} =~ ^[a-z0-9]+$ ]]; then
            printf '%s\n' "$ns"
        fi
    done
}

# topo_down PREFIX: kill every process in the prefix's namespaces (TERM, then KILL after ~2 s),
# then delete the namespaces, which destroys their veths and the bridge. Idempotent.
topo_down() {
    local p=$1 nss ns i pids rc=0
    _topo_check_prefix "$p" || return
    mapfile -t nss < <(topo_list "$p")
    ((${#nss[@]})) || return 0
    # A process may exit between `ip netns pids` and the kill: kill then fails, xargs exits
    # 123, and under `set -eo pipefail` the namespaces were left behind. Nothing here may stop
    # the deletion below.
    for ns in "${nss[@]}"; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -TERM 2>/dev/null || true
    done
    for ((i = 0; i < 20; i++)); do
        pids=""
        for ns in "${nss[@]}"; do pids+=$(ip netns pids "$ns" 2>/dev/null); done
        [[ -z $pids ]] && break
        sleep 0.1
    done
    for ns in "${nss[@]}"; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
    done
    for ns in "${nss[@]}"; do
        ip netns del "$ns" 2>/dev/null || { _topo_err "could not delete namespace $ns"; rc=1; }
    done
    return "$rc"
}

# topo_exec PREFIX NODE CMD...
topo_exec() {
    local p=$1 node=$2
    shift 2
    exec ip netns exec "$(topo_ns "$p" "$node")" "$@"
}

_topo_usage() {
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
}

_topo_main() {
    set -euo pipefail
    local cmd=${1:-}
    if [[ $cmd != exec && $cmd != list && $(id -u) -ne 0 ]]; then
        _topo_err "must run as root (network namespaces)"
        exit 1
    fi
    case $cmd in
        up) [[ $# -eq 2 ]] || { _topo_usage; exit 2; }; topo_up "$2" ;;
        down) [[ $# -eq 2 ]] || { _topo_usage; exit 2; }; topo_down "$2" ;;
        exec) [[ $# -ge 4 ]] || { _topo_usage; exit 2; }; _topo_check_prefix "$2"; topo_exec "${@:2}" ;;
        list) [[ $# -eq 2 ]] || { _topo_usage; exit 2; }; topo_list "$2" ;;
        -h | --help | help) _topo_usage ;;
        *) _topo_usage; exit 2 ;;
    esac
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    _topo_main "$@"
fi
