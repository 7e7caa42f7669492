//! The relay's XDP program: channel data forwarded in the kernel, loaded by `relay/src/xdp`.
//!
//! On the relay's interface it looks at every frame. IPv4/UDP to the relay's port whose
//! payload starts with the channel-data type byte is channel data (`ztna_proto::datagram`):
//! its channel is looked up in the channel map (a mirror of the relay's forwarding table), and
//! it is forwarded only when its source address and port are those bound to one end of the
//! channel: the IP and UDP headers are rewritten (source: the relay's address and port it was
//! sent to; destination: the other end; TTL 64; the IP checksum updated incrementally, the UDP
//! checksum cleared, see below), the Ethernet
//! header set to the other end's learned next hop, and the frame sent back out with `XDP_TX`,
//! or redirected when that end is reached through another interface. The channel number is not
//! rewritten: both ends use the channel's one relay-wide number.
//!
//! Next hops are learned, not looked up: each end's frames (its channel data, and the QUIC of
//! its outer connection when its address is in the bound-address map) teach the program the
//! interface, the peer MAC (the end itself or its router) and the relay's own MAC. `bpf_fib_lookup` would
//! need IPv4 forwarding switched on for the interface (the kernel returns
//! `BPF_FIB_LKUP_RET_FWD_DISABLED` otherwise), which a relay host must not need. Until an end
//! has sent a frame, channel data for it passes to userspace, which forwards it.
//!
//! Channel data of an unknown channel, from a source bound to neither end, or malformed is
//! dropped, as the userspace forwarder drops it. Everything else passes to the kernel. Every
//! verdict is counted in a per-CPU array. Headers are parsed with this file's own `#[repr(C)]`
//! structs, every access bounds-checked against `data_end`.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::helpers::bpf_redirect;
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray};
use aya_ebpf::programs::XdpContext;
use ztna_relay_ebpf_common::headers::{
    EthHdr, Ipv4Hdr, UdpHdr, ETH_LEN, ETH_P_IPV4, IPPROTO_UDP,
};
use ztna_relay_ebpf_common::{
    csum_replace, Config, EndKey, Ends, NextHop, CHANNEL_DATA, COUNTERS as NUM_COUNTERS, MAX_BOUND,
    COUNTER_DROPPED_MALFORMED, COUNTER_DROPPED_REDIRECT, COUNTER_DROPPED_UNBOUND,
    COUNTER_DROPPED_UNKNOWN, COUNTER_FORWARDED, COUNTER_FORWARDED_BYTES, COUNTER_PASSED,
    COUNTER_PASSED_CHANNEL, FLAG_PASS_UNKNOWN, FORWARD_TTL, HEADER_LEN, MAX_CHANNEL,
    MAX_CHANNELS, MAX_NEXT_HOPS,
};

#[map]
static CHANNELS: HashMap<[u8; 4], Ends> = HashMap::with_max_entries(MAX_CHANNELS, 0);
#[map]
static NEXT_HOPS: LruHashMap<EndKey, NextHop> = LruHashMap::with_max_entries(MAX_NEXT_HOPS, 0);
#[map]
static BOUND: HashMap<EndKey, u8> = HashMap::with_max_entries(MAX_BOUND, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);
#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// More-fragments flag and fragment offset in the IPv4 flags/offset word.
const IP_MF_OFFSET: u16 = 0x3fff;

/// The channel-data header.
#[repr(C)]
struct ChannelHdr {
    kind: u8,
    channel: [u8; 4],
}

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
fn count(index: u32, n: u64) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += n };
    }
}

/// What to do with a frame, before counting.
enum Verdict {
    /// Not channel data.
    Pass,
    /// Channel data left to userspace.
    PassChannel,
    Drop(u32),
    /// Rewritten; send out of this interface (`XDP_TX` when it is the one it came in on).
    Forward { ifindex: u32, bytes: u64 },
}

#[xdp]
pub fn ztna_relay_xdp(ctx: XdpContext) -> u32 {
    match classify(&ctx) {
        Verdict::Pass => {
            count(COUNTER_PASSED, 1);
            xdp_action::XDP_PASS
        }
        Verdict::PassChannel => {
            count(COUNTER_PASSED_CHANNEL, 1);
            xdp_action::XDP_PASS
        }
        Verdict::Drop(counter) => {
            count(counter, 1);
            xdp_action::XDP_DROP
        }
        Verdict::Forward { ifindex, bytes } => {
            let action = if ifindex as usize == ctx.ingress_ifindex() {
                xdp_action::XDP_TX
            } else {
                // SAFETY: a helper call with plain integer arguments.
                unsafe { bpf_redirect(ifindex, 0) as u32 }
            };
            if action == xdp_action::XDP_TX || action == xdp_action::XDP_REDIRECT {
                count(COUNTER_FORWARDED, 1);
                count(COUNTER_FORWARDED_BYTES, bytes);
                action
            } else {
                count(COUNTER_DROPPED_REDIRECT, 1);
                xdp_action::XDP_DROP
            }
        }
    }
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> Verdict {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Verdict::Pass;
    };
    // SAFETY: bounds checked by ptr_at; all fields are byte arrays (alignment 1).
    let eth = unsafe { &mut *eth };
    if eth.ether_type != ETH_P_IPV4 {
        return Verdict::Pass;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else {
        return Verdict::Pass;
    };
    // SAFETY: as above.
    let ip = unsafe { &mut *ip };
    if ip.protocol != IPPROTO_UDP || ip.version_ihl != 0x45 {
        // Options are rare enough to leave to the kernel (and keep the parse fixed-offset).
        return Verdict::Pass;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return Verdict::Pass;
    };
    if cfg.port == 0 || (cfg.addr != [0; 4] && ip.dst != cfg.addr) {
        return Verdict::Pass;
    }
    let Some(udp) = ptr_at::<UdpHdr>(ctx, ETH_LEN + 20) else {
        return Verdict::Pass;
    };
    // SAFETY: as above.
    let udp = unsafe { &mut *udp };
    if be16(udp.dst) != cfg.port {
        return Verdict::Pass;
    }
    let payload = ETH_LEN + 20 + 8;
    let src = EndKey {
        addr: ip.src,
        port: udp.src,
        pad: [0; 2],
    };
    let Some(kind) = ptr_at::<u8>(ctx, payload) else {
        return Verdict::Pass;
    };
    // SAFETY: as above.
    if unsafe { *kind } != CHANNEL_DATA {
        // QUIC (or a probe): a session's own address teaches the program its next hop.
        // SAFETY: a presence check; the value is not read.
        if unsafe { BOUND.get(&src) }.is_some() {
            learn(ctx, eth, &src);
        }
        return Verdict::Pass;
    }
    if be16(ip.flags_offset) & IP_MF_OFFSET != 0 {
        // A fragment: the kernel reassembles it and the userspace forwarder decides.
        return Verdict::PassChannel;
    }
    let Some(hdr) = ptr_at::<ChannelHdr>(ctx, payload) else {
        return Verdict::Drop(COUNTER_DROPPED_MALFORMED);
    };
    // SAFETY: as above.
    let channel = unsafe { (*hdr).channel };
    let udp_len = usize::from(be16(udp.len));
    if udp_len < 8 + HEADER_LEN || u32::from_be_bytes(channel) > MAX_CHANNEL {
        return Verdict::Drop(COUNTER_DROPPED_MALFORMED);
    }
    // SAFETY: the value is copied out at once; userspace replaces entries whole.
    let Some(ends) = (unsafe { CHANNELS.get(&channel) }).copied() else {
        if cfg.flags & FLAG_PASS_UNKNOWN != 0 {
            return Verdict::PassChannel;
        }
        return Verdict::Drop(COUNTER_DROPPED_UNKNOWN);
    };
    if ends.userspace() {
        return Verdict::PassChannel;
    }
    // Both ends behind one address and port could only be one socket talking to itself.
    if ends.a == ends.b {
        return Verdict::Drop(COUNTER_DROPPED_UNBOUND);
    }
    let to = if src == ends.a {
        ends.b
    } else if src == ends.b {
        ends.a
    } else {
        return Verdict::Drop(COUNTER_DROPPED_UNBOUND);
    };

    learn(ctx, eth, &src);
    // SAFETY: copied out at once.
    let Some(hop) = (unsafe { NEXT_HOPS.get(&to) }).copied() else {
        return Verdict::PassChannel;
    };

    // IPv4: source (the relay's address it was sent to), destination, TTL (same word as the
    // protocol).
    let mut ip_check = be16(ip.check);
    let old_src = ip.src;
    let new_src = ip.dst;
    let old_dst = ip.dst;
    let new_dst = to.addr;
    for i in 0..2 {
        let o = i * 2;
        let os = be16([old_src[o], old_src[o + 1]]);
        let ns = be16([new_src[o], new_src[o + 1]]);
        let od = be16([old_dst[o], old_dst[o + 1]]);
        let nd = be16([new_dst[o], new_dst[o + 1]]);
        ip_check = csum_replace(csum_replace(ip_check, os, ns), od, nd);
    }
    ip_check = csum_replace(
        ip_check,
        be16([ip.ttl, ip.protocol]),
        be16([FORWARD_TTL, ip.protocol]),
    );
    // UDP ports: source (the client's) becomes the relay's, destination (the relay's) the
    // other end's.
    let relay_port = udp.dst;

    ip.src = new_src;
    ip.dst = new_dst;
    ip.ttl = FORWARD_TTL;
    ip.check = ip_check.to_be_bytes();
    // No UDP checksum (0, which IPv4 allows): the inner QUIC packet is authenticated end to
    // end, so a checksum adds nothing, and the one that came in may be a local sender's
    // partial checksum (the pseudo-header sum a veth carries for offload), which the program
    // can't tell from a full one and which is wrong once the frame leaves as an XDP frame.
    udp.check = [0, 0];
    udp.src = relay_port;
    udp.dst = to.port;
    eth.src = hop.own_mac;
    eth.dst = hop.peer_mac;
    Verdict::Forward {
        ifindex: hop.ifindex,
        bytes: udp_len as u64 - 8,
    }
}

/// Learns (or refreshes) how to reach `src` from its frame; writes only when it changed.
#[inline(always)]
fn learn(ctx: &XdpContext, eth: &EthHdr, src: &EndKey) {
    let seen = NextHop {
        ifindex: ctx.ingress_ifindex() as u32,
        peer_mac: eth.src,
        own_mac: eth.dst,
    };
    // SAFETY: copied out at once.
    let known = unsafe { NEXT_HOPS.get(src) }.copied();
    if known != Some(seen) {
        let _ = NEXT_HOPS.insert(src, &seen, 0);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
