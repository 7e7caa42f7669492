#!/usr/bin/env bash
# ztna test topology with simulated NAT routers (nftables), built on topo.sh.
#
#   nat.sh up PREFIX AGENT_NAT CONN_NAT   agent and connector each behind its own NAT
#                                         (type none|full|addr|port|sym|bare|cloud;
#                                         none = on the WAN)
#   nat.sh lan PREFIX TYPE                agent and connector on one LAN behind one NAT
#   nat.sh cgnat PREFIX HOME CGN CONN     agent behind a home NAT (HOME) behind a carrier-grade
#                                         NAT (CGN), connector behind CONN
#   nat.sh hairpin PREFIX TYPE on|off     agent and connector on two isolated LANs behind one
#                                         NAT (no route between them), which reflects packets
#                                         to its own public address back inside (on) or not
#   nat.sh v6 PREFIX CONN                 IPv6 underlay: an IPv6-only agent behind a stateful
#                                         IPv6 firewall (global addresses, no NAT66; inbound
#                                         filtered), a dual-stack relay; the connector behind the
#                                         same kind of firewall (CONN = v6) or behind an IPv4
#                                         `port` NAT (CONN = v4)
#   nat.sh readdress PREFIX SIDE ADDR     give NAT router SIDE (agent|conn) the WAN address
#                                         ADDR instead of its current one; drops its mappings
#   nat.sh spent PREFIX                   UDP packets the NAT routers let out to anyone but the
#                                         relay (probes and direct traffic), summed
#   nat.sh block PREFIX                   drop direct UDP (anything not to/from the relay)
#   nat.sh unblock PREFIX                 undo block
#   nat.sh down PREFIX                    tear down (same as topo.sh down)
#
# NAT types (UDP; TCP and ICMP go out through the same masquerade):
#   full  endpoint-independent mapping and filtering (full cone)
#   addr  endpoint-independent mapping, address-dependent filtering
#   port  endpoint-independent mapping (port preservation), address-and-port-dependent filtering
#   sym   endpoint-dependent mapping (a random external port per destination), APDF
#   bare  port, but a bare Linux router with no firewall: unsolicited UDP to its public address
#         is answered with ICMP port unreachable, and conntrack records that flow, so a later
#         outbound flow of an inside host to the same remote endpoint gets another port
#   cloud a cloud NAT gateway: endpoint-independent mapping without port preservation (the
#         external port is a hash of the inside address and port), APDF, no inbound at all
# The full/addr/port/sym types drop unsolicited packets silently (a router firewall).
#
# Environment (or, on the command line after the verb, udp-timeout=SECONDS and wan-hops=N):
#   NAT_UDP_TIMEOUT=SECONDS  UDP mapping lifetime after the last packet (a conntrack timeout
#                            policy, for replied and unreplied flows; some CGNATs and phones
#                            use 30 s). Unset: the kernel's defaults (30 s unreplied, 120 s+).
#   NAT_WAN_HOPS=N           (default 2) the emulated internet between a router's wan0 and any
#                            other router: a packet that arrives on wan0 with TTL <= N would
#                            have expired on the N routers between them and is dropped before
#                            conntrack sees it (low-TTL opening probes die there).
#
# Layout (see README.md next to this file): ${P}-wan bridge br0 10.10.0.0/24 with ${P}-relay
# 10.10.0.1 and ${P}-pub2 10.10.0.5 (a second public host for the tests); routers ${P}-nata
# (wan0 10.10.0.11, lan0 192.168.1.1/24) and ${P}-natc (wan0 10.10.0.13, lan0 192.168.2.1/24);
# ${P}-agent eth0 192.168.1.2, ${P}-conn eth0 192.168.2.2 (or wan0 10.10.0.2 / 10.10.0.3 for
# type none); in `lan` mode ${P}-lan holds bridge br0 for agent 192.168.1.2 and conn
# 192.168.1.3 behind ${P}-nata. ${P}-conn back0 10.10.3.1 <-> ${P}-backend eth0 10.10.3.2.
# `cgnat`: ${P}-cgna (wan0 10.10.0.11, lan0 100.64.0.1/24) in front of ${P}-nata (wan0
# 100.64.0.2/24, lan0 192.168.1.1/24); the agent's public address is the CGN's 10.10.0.11.
# `hairpin`: ${P}-nata lan0 192.168.1.1/24 (agent 192.168.1.2) and lan1 192.168.2.1/24 (conn
# 192.168.2.2); no forwarding between lan0 and lan1 except reflected (hairpinned) flows.

# `v6`: the WAN bridge also carries 2001:db8:10::/64, the relay has 2001:db8:10::1 besides
# 10.10.0.1; ${P}-fwa (wan0 2001:db8:10::11, lan0 2001:db8:1::1/64) in front of ${P}-agent
# (eth0 2001:db8:1::2/64, no IPv4 address at all); with CONN = v6 ${P}-fwc (wan0 2001:db8:10::13,
# lan0 2001:db8:2::1/64) in front of ${P}-conn (eth0 2001:db8:2::2/64, IPv6 only); CONN = v4
# is `up`'s `port` side. Every WAN host routes the two /64s via their firewalls.

# shellcheck source=deploy/netns/topo.sh
source "$(dirname "${BASH_SOURCE[0]}")/topo.sh"

# shellcheck disable=SC2034
NAT_PUB2_ADDR=10.10.0.5
NAT_A_WAN_ADDR=10.10.0.11
NAT_C_WAN_ADDR=10.10.0.13
NAT_A_LAN_ADDR=192.168.1.1
NAT_C_LAN_ADDR=192.168.2.1
NAT_AGENT_LAN_ADDR=192.168.1.2
NAT_CONN_LAN_ADDR=192.168.2.2
NAT_CONN_SHARED_LAN_ADDR=192.168.1.3
NAT_CGN_LAN_ADDR=100.64.0.1
NAT_HOME_WAN_ADDR=100.64.0.2
# Lifetime of a full/addr mapping entry after the last outbound packet: the kernel's UDP
# conntrack timeout for a flow that saw replies (nf_conntrack_udp_timeout_stream).
# (NAT_UDP_TIMEOUT, when set, replaces it.)
NAT_MAP_TIMEOUT=120s

_nat_err() { printf 'nat.sh: %s\n' "$*" >&2; }

_nat_check_type() {
    case $1 in
        none | full | addr | port | sym | bare | cloud) ;;
        *) _nat_err "bad NAT type '$1' (none|full|addr|port|sym|bare|cloud)"; return 2 ;;
    esac
}

# nat_rules TYPE [WAN_ADDR]: the nftables ruleset of a router (wan0 outside, lan0 and for
# `hairpin` lan1 inside) on stdout. WAN_ADDR (the wan0 address without length) is needed by
# cloud (its SNAT) and hairpin. Options (variables): NAT_RULES_HAIRPIN=on reflects inside
# packets to WAN_ADDR:PORT back to the inside host that owns the mapping PORT (=off or unset:
# no reflection); NAT_RULES_WAN_FACING=0 leaves out the NAT_WAN_HOPS rule (a home router
# behind a CGN is not on the WAN itself).
#
# Every type: masquerade on wan0 (so a new wan0 address is used for new mappings; cloud SNATs
# to WAN_ADDR with a hashed port instead), a forward chain that lets inside->WAN through and
# WAN->inside only for established flows (and, for full/addr, flows the prerouting DNAT
# accepted), and an input chain that silently drops everything unsolicited on wan0 (no ICMP
# port unreachable from the router), except for bare, which has no input filter at all.
#
# The named counter direct_out counts UDP packets from inside to the WAN that are not for the
# relay (the probes and packets of direct paths), for `nat.sh spent`.
#
# A filter chain after the NAT (postrouting, priority srcnat + 10) sees the translated source
# port and records external port -> inside address . port in the dynamic map @mapped
# (refreshed by every outbound packet, entries expire NAT_MAP_TIMEOUT after the last). addr
# also records (external port . remote address) in @peers. full/addr: new inbound UDP flows on
# wan0 are DNATed to the inside host through @mapped: full for any source, addr only when
# (port . source address) is in @peers. Hairpin uses @mapped the same way for inside sources.
nat_rules() {
    local type=$1 wan_addr=${2:-} masq="masquerade" pre="" peers="" input="" hops="" hp=""
    local fwd_hairpin="" post_hairpin="" timeout_obj="" timeout_set="" map_timeout=$NAT_MAP_TIMEOUT
    local wan_hops=${NAT_WAN_HOPS:-2}
    if [[ -n ${NAT_UDP_TIMEOUT:-} ]]; then
        [[ $NAT_UDP_TIMEOUT =~ ^[0-9]+$ ]] || { _nat_err "bad NAT_UDP_TIMEOUT"; return 2; }
        map_timeout=${NAT_UDP_TIMEOUT}s
    fi
    [[ $wan_hops =~ ^[0-9]+$ ]] || { _nat_err "bad NAT_WAN_HOPS"; return 2; }
    case $type in
        sym) masq="masquerade fully-random" ;;
        cloud)
            [[ -n $wan_addr ]] || { _nat_err "cloud needs the WAN address"; return 2; }
            # Endpoint-independent (the port depends only on the inside address and port) but
            # not port-preserving; other protocols masquerade.
            masq="meta l4proto udp snat ip to $wan_addr : jhash ip saddr . udp sport mod 28000 offset 32000
        oifname \"wan0\" masquerade"
            ;;
        full | addr)
            if [[ $type == addr ]]; then
                peers="oifname \"wan0\" update @peers { udp sport . ip daddr }"
            fi
            if [[ $type == full ]]; then
                pre="iifname \"wan0\" udp dport @mapped dnat ip to udp dport map @mapped"
            else
                pre="iifname \"wan0\" udp dport . ip saddr @peers dnat ip to udp dport map @mapped"
            fi
            ;;
    esac
    if [[ $type != bare ]]; then
        input="iifname \"wan0\" drop"
    fi
    if [[ ${NAT_RULES_WAN_FACING:-1} == 1 && $wan_hops -gt 0 ]]; then
        hops="
    chain wanhops {
        type filter hook prerouting priority raw + 10; policy accept;
        iifname \"wan0\" ip ttl <= $wan_hops drop
    }"
    fi
    if [[ ${NAT_RULES_HAIRPIN:-off} == on ]]; then
        [[ -n $wan_addr ]] || { _nat_err "hairpin needs the WAN address"; return 2; }
        hp="iifname != \"wan0\" ip daddr $wan_addr udp dport @mapped dnat ip to udp dport map @mapped"
        # The reflected packet leaves from the public address (the sender's mapping), so the
        # answer comes back through the router.
        post_hairpin="oifname != \"wan0\" ct status dnat ct original ip saddr 192.168.0.0/16 snat ip to $wan_addr"
        fwd_hairpin="iifname != \"wan0\" oifname != \"wan0\" ct status dnat accept"
    fi
    if [[ -n ${NAT_UDP_TIMEOUT:-} ]]; then
        timeout_obj="
    ct timeout udpmap {
        protocol udp;
        l3proto ip;
        policy = { unreplied : $NAT_UDP_TIMEOUT, replied : $NAT_UDP_TIMEOUT }
    }"
        timeout_set="
    chain timeouts {
        type filter hook prerouting priority filter; policy accept;
        meta l4proto udp ct state new ct timeout set \"udpmap\"
    }
    chain timeouts_out {
        type filter hook output priority filter; policy accept;
        meta l4proto udp ct state new ct timeout set \"udpmap\"
    }"
    fi
    cat <<EOF
table ip ztna_nat {$timeout_obj
    counter direct_out {
    }
    map mapped {
        type inet_service : ipv4_addr . inet_service
        flags dynamic,timeout
        timeout $map_timeout
    }
    set peers {
        type inet_service . ipv4_addr
        flags dynamic,timeout
        timeout $map_timeout
    }
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        $pre
        $hp
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" $masq
        $post_hairpin
    }
    chain track {
        type filter hook postrouting priority srcnat + 10; policy accept;
        oifname "wan0" ct direction original update @mapped { udp sport : ct original ip saddr . ct original proto-src }
        oifname "wan0" ct direction reply update @mapped { udp sport : ct reply ip saddr . ct reply proto-src }
        $peers
    }$hops$timeout_set
    chain forward {
        type filter hook forward priority filter; policy drop;
        iifname != "wan0" oifname "wan0" meta l4proto udp ip daddr != $TOPO_RELAY_ADDR counter name "direct_out"
        ct state established,related accept
        iifname != "wan0" oifname "wan0" accept
        iifname "wan0" ct status dnat accept
        $fwd_hairpin
    }
    chain input {
        type filter hook input priority filter; policy accept;
        iifname "wan0" ct state established,related accept
        $input
    }
}
EOF
    # The conntrack zone of every packet: `readdress` moves to a new zone, which forgets every
    # flow at once (also DNATed ones, which the kernel's masquerade flush does not remove).
    _nat_zone_rules 1
}

_nat_zone_rules() {
    cat <<EOF
table ip ztna_zone {
    chain prerouting {
        type filter hook prerouting priority raw; policy accept;
        ct zone set $1
    }
    chain output {
        type filter hook output priority raw; policy accept;
        ct zone set $1
    }
}
EOF
}

# nat_router P NODE WAN_ADDR/LEN TYPE [behind]: router namespace with wan0 on the WAN bridge
# (with `behind`: the namespace and its wan0, a link to an upstream router, exist already),
# forwarding on, rp_filter off, secondary addresses promoted, and the rules of TYPE. The caller
# adds lan0.
nat_router() {
    local p=$1 node=$2 wan=$3 type=$4 behind=${5:-}
    if [[ -z $behind ]]; then
        topo_node "$p" "$node" || return
        topo_wan_port "$p" "$node" wan0 "$wan" || return
    fi
    topo_sysctl "$p" "$node" net.ipv4.ip_forward=1 || return
    topo_sysctl "$p" "$node" net.ipv4.conf.all.rp_filter=0 || return
    topo_sysctl "$p" "$node" net.ipv4.conf.default.rp_filter=0 || return
    # Deleting the primary address of a subnet deletes its secondaries too unless they are
    # promoted: without this, `ip addr add NEW/24; ip addr del OLD/24` would leave no address.
    topo_sysctl "$p" "$node" net.ipv4.conf.all.promote_secondaries=1 || return
    topo_sysctl "$p" "$node" net.ipv4.conf.wan0.promote_secondaries=1 || return
    local rules
    rules=$(nat_rules "$type" "${wan%/*}") || return
    _topo ip netns exec "$(topo_ns "$p" "$node")" nft -f - <<<"$rules" || return
}

nat_pub2() {
    topo_node "$1" pub2 || return
    topo_wan_port "$1" pub2 wan0 "$NAT_PUB2_ADDR/24" || return
}

_nat_ping_group() {
    if [[ ${TOPO_NO_PING_GROUP:-0} != 1 ]]; then
        topo_sysctl "$1" conn 'net.ipv4.ping_group_range=0 2147483647' || return
    fi
}

# _nat_side P TYPE ROUTER WAN_ADDR LAN_ADDR HOST HOST_ADDR PLAIN: HOST behind ROUTER (LAN
# ROUTER lan0 LAN_ADDR/24 <-> HOST eth0 HOST_ADDR/24, default route via LAN_ADDR), or for type
# none the function PLAIN (topo_agent, topo_conn) puts HOST on the WAN bridge.
_nat_side() {
    local p=$1 type=$2 router=$3 wan=$4 lan=$5 host=$6 addr=$7 plain=$8
    if [[ $type == none ]]; then
        "$plain" "$p" || return
        return
    fi
    nat_router "$p" "$router" "$wan/24" "$type" || return
    topo_node "$p" "$host" || return
    topo_link "$p" "$router" lan0 "$lan/24" "$host" eth0 "$addr/24" || return
    topo_route "$p" "$host" default "$lan" || return
}

_nat_build_up() {
    local p=$1 ta=$2 tc=$3
    topo_wan "$p" && topo_relay "$p" && nat_pub2 "$p" || return
    _nat_side "$p" "$ta" nata "$NAT_A_WAN_ADDR" "$NAT_A_LAN_ADDR" agent "$NAT_AGENT_LAN_ADDR" \
        topo_agent || return
    _nat_side "$p" "$tc" natc "$NAT_C_WAN_ADDR" "$NAT_C_LAN_ADDR" conn "$NAT_CONN_LAN_ADDR" \
        topo_conn || return
    # topo_conn sets it for type none; a connector behind a NAT needs it too.
    if [[ $tc != none ]]; then _nat_ping_group "$p" || return; fi
    topo_backend "$p" || return
}

_nat_build_lan() {
    local p=$1 t=$2
    topo_wan "$p" && topo_relay "$p" && nat_pub2 "$p" || return
    nat_router "$p" nata "$NAT_A_WAN_ADDR/24" "$t" || return
    topo_bridge "$p" lan || return
    topo_bridge_port "$p" lan nata lan0 "$NAT_A_LAN_ADDR/24" || return
    topo_node "$p" agent || return
    topo_bridge_port "$p" lan agent eth0 "$NAT_AGENT_LAN_ADDR/24" || return
    topo_route "$p" agent default "$NAT_A_LAN_ADDR" || return
    topo_node "$p" conn || return
    topo_bridge_port "$p" lan conn eth0 "$NAT_CONN_SHARED_LAN_ADDR/24" || return
    topo_route "$p" conn default "$NAT_A_LAN_ADDR" || return
    _nat_ping_group "$p" || return
    topo_backend "$p" || return
}

_nat_build_cgnat() {
    local p=$1 home=$2 cgn=$3 tc=$4
    topo_wan "$p" && topo_relay "$p" && nat_pub2 "$p" || return
    # The CGN, on the WAN, with the home router's WAN link as its lan0.
    nat_router "$p" cgna "$NAT_A_WAN_ADDR/24" "$cgn" || return
    topo_node "$p" nata || return
    topo_link "$p" cgna lan0 "$NAT_CGN_LAN_ADDR/24" nata wan0 "$NAT_HOME_WAN_ADDR/24" || return
    NAT_RULES_WAN_FACING=0 nat_router "$p" nata "$NAT_HOME_WAN_ADDR/24" "$home" behind || return
    topo_route "$p" nata default "$NAT_CGN_LAN_ADDR" || return
    topo_node "$p" agent || return
    topo_link "$p" nata lan0 "$NAT_A_LAN_ADDR/24" agent eth0 "$NAT_AGENT_LAN_ADDR/24" || return
    topo_route "$p" agent default "$NAT_A_LAN_ADDR" || return
    _nat_side "$p" "$tc" natc "$NAT_C_WAN_ADDR" "$NAT_C_LAN_ADDR" conn "$NAT_CONN_LAN_ADDR" \
        topo_conn || return
    if [[ $tc != none ]]; then _nat_ping_group "$p" || return; fi
    topo_backend "$p" || return
}

_nat_build_hairpin() {
    local p=$1 t=$2 hp=$3
    topo_wan "$p" && topo_relay "$p" && nat_pub2 "$p" || return
    NAT_RULES_HAIRPIN=$hp nat_router "$p" nata "$NAT_A_WAN_ADDR/24" "$t" || return
    topo_node "$p" agent || return
    topo_link "$p" nata lan0 "$NAT_A_LAN_ADDR/24" agent eth0 "$NAT_AGENT_LAN_ADDR/24" || return
    topo_route "$p" agent default "$NAT_A_LAN_ADDR" || return
    topo_node "$p" conn || return
    topo_link "$p" nata lan1 "$NAT_C_LAN_ADDR/24" conn eth0 "$NAT_CONN_LAN_ADDR/24" || return
    topo_route "$p" conn default "$NAT_C_LAN_ADDR" || return
    _nat_ping_group "$p" || return
    topo_backend "$p" || return
}

V6_RELAY_ADDR=2001:db8:10::1
V6_FWA_WAN_ADDR=2001:db8:10::11
V6_FWC_WAN_ADDR=2001:db8:10::13
V6_AGENT_NET=2001:db8:1::/64
V6_CONN_NET=2001:db8:2::/64

# _v6_addr P NODE IFNAME ADDR/LEN: an IPv6 address without duplicate address detection (usable
# at once).
_v6_addr() {
    _topo ip -n "$(topo_ns "$1" "$2")" addr add "$4" dev "$3" nodad || return
}

# _v6_firewall P NODE WAN_ADDR LAN_ADDR HOST HOST_ADDR: a router NODE with wan0 on the WAN
# bridge and lan0 to HOST; IPv6 forwarding with a stateful firewall as home routers have
# (outbound and replies pass, unsolicited inbound is dropped, ICMPv6 errors of known flows
# pass as related), and the emulated WAN hops (a packet arriving on wan0 with a hop limit of
# NAT_WAN_HOPS or less is dropped, as low-TTL opening probes die on the way).
_v6_firewall() {
    local p=$1 node=$2 wan=$3 lan=$4 host=$5 addr=$6 ns hops=${NAT_WAN_HOPS:-2} hop_rule=""
    [[ $hops =~ ^[0-9]+$ ]] || { _nat_err "bad NAT_WAN_HOPS"; return 2; }
    topo_node "$p" "$node" || return
    ns=$(topo_ns "$p" "$node")
    _topo ip -n "$ns" link add wan0 type veth peer name "$node" netns "$(topo_ns "$p" wan)" || return
    _topo ip -n "$(topo_ns "$p" wan)" link set "$node" master br0 up || return
    _topo ip -n "$ns" link set wan0 up || return
    _v6_addr "$p" "$node" wan0 "$wan/64" || return
    topo_node "$p" "$host" || return
    topo_link "$p" "$node" lan0 "" "$host" eth0 "" || return
    _v6_addr "$p" "$node" lan0 "$lan/64" || return
    _v6_addr "$p" "$host" eth0 "$addr/64" || return
    _topo ip -n "$(topo_ns "$p" "$host")" -6 route replace default via "$lan" || return
    topo_sysctl "$p" "$node" net.ipv6.conf.all.forwarding=1 || return
    if [[ $hops -gt 0 ]]; then
        hop_rule="iifname \"wan0\" ip6 hoplimit <= $hops drop"
    fi
    _topo ip netns exec "$ns" nft -f - <<EOF6 || return
table inet fw {
    chain forward {
        type filter hook forward priority filter; policy drop;
        $hop_rule
        ct state established,related accept
        iifname "lan0" oifname "wan0" accept
        counter
    }
    chain input {
        type filter hook input priority filter; policy accept;
        iifname "wan0" ct state established,related accept
        iifname "wan0" icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert, echo-request } accept
        iifname "wan0" drop
    }
}
EOF6
}

_nat_build_v6() {
    local p=$1 conn=$2 h
    topo_wan "$p" && topo_relay "$p" || return
    _v6_addr "$p" relay wan0 "$V6_RELAY_ADDR/64" || return
    _v6_firewall "$p" fwa "$V6_FWA_WAN_ADDR" 2001:db8:1::1 agent 2001:db8:1::2 || return
    case $conn in
        v6) _v6_firewall "$p" fwc "$V6_FWC_WAN_ADDR" 2001:db8:2::1 conn 2001:db8:2::2 || return ;;
        v4) _nat_side "$p" port natc "$NAT_C_WAN_ADDR" "$NAT_C_LAN_ADDR" conn "$NAT_CONN_LAN_ADDR" \
                topo_conn || return ;;
        *) _nat_err "v6: the connector side is v4 or v6, not '$conn'"; return 2 ;;
    esac
    for h in relay fwa fwc; do
        [[ -e /run/netns/$(topo_ns "$p" "$h") ]] || continue
        if [[ $h != fwa ]]; then
            _topo ip -n "$(topo_ns "$p" "$h")" -6 route replace "$V6_AGENT_NET" via "$V6_FWA_WAN_ADDR" || return
        fi
        if [[ $h != fwc && $conn == v6 ]]; then
            _topo ip -n "$(topo_ns "$p" "$h")" -6 route replace "$V6_CONN_NET" via "$V6_FWC_WAN_ADDR" || return
        fi
    done
    _nat_ping_group "$p" || return
    topo_backend "$p" || return
    _v6_settle "$p"
}

# _v6_settle P: waits (at most 5 s) until no address in the topology is tentative: link-local
# addresses go through duplicate address detection, and a router answers neighbour
# solicitations only from a usable link-local address.
_v6_settle() {
    local p=$1 i ns busy
    for ((i = 0; i < 50; i++)); do
        busy=0
        for ns in $(ip netns list | awk -v p="$p-" 'index($1, p) == 1 {print $1}'); do
            if [[ -n $(ip -n "$ns" -6 addr show tentative 2>/dev/null) ]]; then busy=1; fi
        done
        [[ $busy == 0 ]] && return 0
        sleep 0.1
    done
    _nat_err "v6: addresses still tentative after 5 s"
}

nat_v6() {
    _topo_check_prefix "$1" || return
    topo_down "$1" || return
    if ! _nat_build_v6 "$@"; then
        _nat_err "building IPv6 topology '$1' (connector $2) failed; tearing down what was built"
        topo_down "$1"
        return 1
    fi
}

# nat_cgnat P HOME CGN CONN / nat_hairpin P TYPE on|off: build, tearing down an old one first
# and what was built on failure.
nat_cgnat() {
    _topo_check_prefix "$1" || return
    local t
    for t in "$2" "$3" "$4"; do _nat_check_type "$t" || return; done
    if [[ $2 == none || $3 == none ]]; then _nat_err "cgnat needs two NAT layers"; return 2; fi
    topo_down "$1" || return
    if ! _nat_build_cgnat "$@"; then
        _nat_err "building CGNAT topology '$1' ($2+$3/$4) failed; tearing down what was built"
        topo_down "$1"
        return 1
    fi
}

nat_hairpin() {
    _topo_check_prefix "$1" || return
    _nat_check_type "$2" || return
    if [[ $2 == none ]]; then _nat_err "hairpin needs a NAT type other than none"; return 2; fi
    case $3 in on | off) ;; *) _nat_err "hairpin: on or off, not '$3'"; return 2 ;; esac
    topo_down "$1" || return
    if ! _nat_build_hairpin "$@"; then
        _nat_err "building hairpin topology '$1' ($2, $3) failed; tearing down what was built"
        topo_down "$1"
        return 1
    fi
}

# nat_up P AGENT_TYPE CONN_TYPE / nat_lan P TYPE: build, tearing down an old one first and what
# was built on failure.
nat_up() {
    _topo_check_prefix "$1" || return
    _nat_check_type "$2" && _nat_check_type "$3" || return
    topo_down "$1" || return
    if ! _nat_build_up "$@"; then
        _nat_err "building NAT topology '$1' ($2/$3) failed; tearing down what was built"
        topo_down "$1"
        return 1
    fi
}

nat_lan() {
    _topo_check_prefix "$1" || return
    _nat_check_type "$2" || return
    if [[ $2 == none ]]; then _nat_err "lan needs a NAT type other than none"; return 2; fi
    topo_down "$1" || return
    if ! _nat_build_lan "$@"; then
        _nat_err "building NAT LAN topology '$1' ($2) failed; tearing down what was built"
        topo_down "$1"
        return 1
    fi
}

# nat_readdress P SIDE ADDR[/LEN] (not for cloud routers or hairpin topologies, whose rules name
# the old address): the router of SIDE (agent -> nata, conn -> natc) gets ADDR on
# wan0 (default /24) and loses its other IPv4 addresses there. Then it forgets every flow and
# mapping (new conntrack zone, @mapped and @peers flushed), as a NAT whose public address changed
# would: new flows from inside leave from ADDR.
nat_readdress() {
    local p=$1 side=$2 addr=$3 node ns old zone
    _topo_check_prefix "$p" || return
    case $side in
        agent) node=nata ;;
        conn) node=natc ;;
        *) _nat_err "bad SIDE '$side' (agent|conn)"; return 2 ;;
    esac
    [[ $addr == */* ]] || addr+=/24
    ns=$(topo_ns "$p" "$node")
    ip netns list | grep -qx "$ns\( .*\)\?" || { _nat_err "no router $ns"; return 1; }
    mapfile -t old < <(ip -n "$ns" -4 -o addr show dev wan0 | awk '{print $4}')
    _topo ip -n "$ns" addr replace "$addr" dev wan0 || return
    for a in "${old[@]}"; do
        [[ $a == "$addr" ]] || _topo ip -n "$ns" addr del "$a" dev wan0 || return
    done
    zone=$(ip netns exec "$ns" nft list chain ip ztna_zone prerouting |
        sed -n 's/.*ct zone set \([0-9]*\).*/\1/p')
    zone=$(((${zone:-1} % 65000) + 1))
    {
        printf 'flush table ip ztna_zone\n'
        _nat_zone_rules "$zone"
        printf 'flush map ip ztna_nat mapped\nflush set ip ztna_nat peers\n'
    } | _topo ip netns exec "$ns" nft -f - || return
}

# nat_spent P: the sum of the direct_out counters of the NAT routers on the WAN (UDP packets
# from inside to the WAN that were not for the relay), on stdout.
nat_spent() {
    local p=$1 node ns n total=0
    _topo_check_prefix "$p" || return
    for node in nata natc cgna; do
        ns=$(topo_ns "$p" "$node")
        ip netns list | grep -qx "$ns\( .*\)\?" || continue
        # Behind a CGN, the home router's packets are counted once, at the CGN.
        if [[ $node == nata ]] && ip netns list | grep -q "^$p-cgna\b"; then continue; fi
        n=$(ip netns exec "$ns" nft list counter ip ztna_nat direct_out |
            sed -n 's/.*packets \([0-9]*\).*/\1/p')
        total=$((total + ${n:-0}))
    done
    printf '%s\n' "$total"
}

# nat_block P: drop UDP that is neither to nor from the relay, wherever a direct path would run:
# in the forward chain of each NAT router (WAN side), and on the LAN/WAN interface (not back0)
# of the agent and the connector (inbound only, so sending still succeeds and the packets
# vanish, as on a broken path). Relay traffic (10.10.0.1) is untouched. Table ip ztna_block.
nat_block() {
    local p=$1 node ns rules
    _topo_check_prefix "$p" || return
    nat_unblock "$p" || return
    for node in nata natc agent conn; do
        ns=$(topo_ns "$p" "$node")
        ip netns list | grep -qx "$ns\( .*\)\?" || continue
        case $node in
            nat?) rules="chain forward {
        type filter hook forward priority filter - 10; policy accept;
        iifname \"wan0\" meta l4proto udp ip saddr != $TOPO_RELAY_ADDR drop
        oifname \"wan0\" meta l4proto udp ip daddr != $TOPO_RELAY_ADDR drop
    }" ;;
            *) rules="chain input {
        type filter hook input priority filter - 10; policy accept;
        iifname { \"wan0\", \"eth0\" } meta l4proto udp ip saddr != $TOPO_RELAY_ADDR drop
    }" ;;
        esac
        printf 'table ip ztna_block {\n    %s\n}\n' "$rules" |
            _topo ip netns exec "$ns" nft -f - || return
    done
}

nat_unblock() {
    local p=$1 node ns
    _topo_check_prefix "$p" || return
    for node in nata natc agent conn; do
        ns=$(topo_ns "$p" "$node")
        ip netns list | grep -qx "$ns\( .*\)\?" || continue
        if ip netns exec "$ns" nft list table ip ztna_block >/dev/null 2>&1; then
            _topo ip netns exec "$ns" nft delete table ip ztna_block || return
        fi
    done
}

_nat_usage() {
    sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
}

_nat_main() {
    set -euo pipefail
    # Options anywhere after the verb: udp-timeout=SECONDS, wan-hops=N (see Environment above).
    local a args=()
    for a in "$@"; do
        case $a in
            udp-timeout=*) export NAT_UDP_TIMEOUT=${a#*=} ;;
            wan-hops=*) export NAT_WAN_HOPS=${a#*=} ;;
            *) args+=("$a") ;;
        esac
    done
    set -- "${args[@]}"
    local cmd=${1:-}
    if [[ $(id -u) -ne 0 ]]; then
        _nat_err "must run as root (network namespaces)"
        exit 1
    fi
    case $cmd in
        up) [[ $# -eq 4 ]] || { _nat_usage; exit 2; }; nat_up "$2" "$3" "$4" ;;
        lan) [[ $# -eq 3 ]] || { _nat_usage; exit 2; }; nat_lan "$2" "$3" ;;
        cgnat) [[ $# -eq 5 ]] || { _nat_usage; exit 2; }; nat_cgnat "$2" "$3" "$4" "$5" ;;
        hairpin) [[ $# -eq 4 ]] || { _nat_usage; exit 2; }; nat_hairpin "$2" "$3" "$4" ;;
        v6) [[ $# -eq 3 ]] || { _nat_usage; exit 2; }; nat_v6 "$2" "$3" ;;
        readdress) [[ $# -eq 4 ]] || { _nat_usage; exit 2; }; nat_readdress "$2" "$3" "$4" ;;
        spent) [[ $# -eq 2 ]] || { _nat_usage; exit 2; }; nat_spent "$2" ;;
        block) [[ $# -eq 2 ]] || { _nat_usage; exit 2; }; nat_block "$2" ;;
        unblock) [[ $# -eq 2 ]] || { _nat_usage; exit 2; }; nat_unblock "$2" ;;
        down) [[ $# -eq 2 ]] || { _nat_usage; exit 2; }; topo_down "$2" ;;
        -h | --help | help) _nat_usage ;;
        *) _nat_usage; exit 2 ;;
    esac
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    _nat_main "$@"
fi
