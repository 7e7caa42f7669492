//! The connector's XDP program (UDP fast path), loaded by `connector/src/dataplane/xdp`.
//!
//! On the backend-facing interface it looks at every frame: IPv4/UDP to the configured flow
//! port range is a reply to a flow or unsolicited. A reply whose (source address, source port,
//! destination port) is in the flow map is rewritten in place into the tunnel-side packet
//! (service address and port to the agent's tunnel address and port, TTL 64, DF cleared,
//! checksums updated incrementally), its Ethernet header is removed, and it is redirected to
//! the AF_XDP socket of its RX queue. Unsolicited or malformed UDP to the range is dropped.
//! Everything else passes to the kernel. Every verdict is counted in a per-CPU array, and each
//! flow's packets and bytes in a per-CPU hash map.
//!
//! Headers are parsed with this file's own `#[repr(C)]` structs (the verifier rejects
//! etherparse), every access bounds-checked against `data_end`.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::helpers::bpf_xdp_adjust_head;
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, XskMap};
use aya_ebpf::programs::XdpContext;
use ztna_connector_ebpf_common::headers::{
    EthHdr, Ipv4Hdr, UdpHdr, ETH_LEN, ETH_P_IPV4, IPPROTO_UDP,
};
use ztna_connector_ebpf_common::{
    csum_replace, Config, FlowKey, FlowStats, FlowValue, COUNTERS as NUM_COUNTERS,
    COUNTER_DROPPED_MALFORMED, COUNTER_DROPPED_NO_SOCKET, COUNTER_DROPPED_UNSOLICITED,
    COUNTER_HANDLED, COUNTER_PASSED, MAX_FLOWS, MAX_QUEUES, REWRITE_TTL,
};

#[map]
static FLOWS: HashMap<FlowKey, FlowValue> = HashMap::with_max_entries(MAX_FLOWS, 0);
#[map]
static FLOW_STATS: PerCpuHashMap<FlowKey, FlowStats> =
    PerCpuHashMap::with_max_entries(MAX_FLOWS, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);
#[map]
static XSKS: XskMap = XskMap::with_max_entries(MAX_QUEUES, 0);
#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// More-fragments flag and fragment offset in the IPv4 flags/offset word.
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
const IP_DF: u16 = 0x4000;

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
fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

/// What to do with a frame, before counting.
enum Verdict {
    Pass,
    Drop(u32),
    Redirect,
}

#[xdp]
pub fn ztna_xdp(ctx: XdpContext) -> u32 {
    match classify(&ctx) {
        Verdict::Pass => {
            count(COUNTER_PASSED);
            xdp_action::XDP_PASS
        }
        Verdict::Drop(counter) => {
            count(counter);
            xdp_action::XDP_DROP
        }
        Verdict::Redirect => match XSKS.redirect(ctx.rx_queue_index(), 0) {
            Ok(action) => {
                count(COUNTER_HANDLED);
                action
            }
            Err(_) => {
                count(COUNTER_DROPPED_NO_SOCKET);
                xdp_action::XDP_DROP
            }
        },
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
    if unsafe { (*eth).ether_type } != ETH_P_IPV4 {
        return Verdict::Pass;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else {
        return Verdict::Pass;
    };
    // SAFETY: as above.
    let ip = unsafe { &mut *ip };
    if ip.protocol != IPPROTO_UDP || ip.version_ihl >> 4 != 4 {
        return Verdict::Pass;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return Verdict::Pass;
    };
    let (first, last) = (cfg.first_port, cfg.last_port);
    if last == 0 {
        return Verdict::Pass;
    }
    let frag = be16(ip.flags_offset);
    if frag & IP_OFFSET != 0 {
        // A later fragment carries no UDP header: the kernel's stack decides.
        return Verdict::Pass;
    }
    let ihl = usize::from(ip.version_ihl & 0x0f);
    if ihl < 5 {
        return Verdict::Pass;
    }
    let Some(udp) = ptr_at::<UdpHdr>(ctx, ETH_LEN + ihl * 4) else {
        return Verdict::Pass;
    };
    // SAFETY: as above.
    let udp = unsafe { &mut *udp };
    let dport = be16(udp.dst);
    if dport < first || dport > last {
        return Verdict::Pass;
    }
    if frag & IP_MF != 0 {
        return Verdict::Drop(COUNTER_DROPPED_MALFORMED);
    }
    let key = FlowKey {
        backend_addr: ip.src,
        backend_port: udp.src,
        local_port: udp.dst,
    };
    // SAFETY: the value is copied out at once; userspace replaces entries whole.
    let Some(value) = (unsafe { FLOWS.get(&key) }).copied() else {
        return Verdict::Drop(COUNTER_DROPPED_UNSOLICITED);
    };
    let total_len = usize::from(be16(ip.total_len));

    // IPv4 header: addresses, TTL (same word as the protocol), DF.
    let mut ip_check = be16(ip.check);
    let mut udp_check = be16(udp.check);
    let old_src = ip.src;
    let old_dst = ip.dst;
    for i in 0..2 {
        let o = i * 2;
        let old_s = be16([old_src[o], old_src[o + 1]]);
        let new_s = be16([value.service_addr[o], value.service_addr[o + 1]]);
        let old_d = be16([old_dst[o], old_dst[o + 1]]);
        let new_d = be16([value.agent_addr[o], value.agent_addr[o + 1]]);
        ip_check = csum_replace(csum_replace(ip_check, old_s, new_s), old_d, new_d);
        udp_check = csum_replace(csum_replace(udp_check, old_s, new_s), old_d, new_d);
    }
    let old_ttl_proto = be16([ip.ttl, ip.protocol]);
    let new_ttl_proto = be16([REWRITE_TTL, ip.protocol]);
    ip_check = csum_replace(ip_check, old_ttl_proto, new_ttl_proto);
    let new_frag = frag & !IP_DF;
    ip_check = csum_replace(ip_check, frag, new_frag);
    udp_check = csum_replace(
        csum_replace(udp_check, be16(udp.src), be16(value.service_port)),
        be16(udp.dst),
        be16(value.agent_port),
    );

    ip.src = value.service_addr;
    ip.dst = value.agent_addr;
    ip.ttl = REWRITE_TTL;
    ip.flags_offset = new_frag.to_be_bytes();
    ip.check = ip_check.to_be_bytes();
    if be16(udp.check) != 0 {
        // 0 means "no checksum"; a computed 0 is sent as all ones.
        let c = if udp_check == 0 { 0xffff } else { udp_check };
        udp.check = c.to_be_bytes();
    }
    udp.src = value.service_port;
    udp.dst = value.agent_port;

    if let Some(stats) = FLOW_STATS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += total_len as u64;
        }
    }
    // Hand userspace the IPv4 packet alone.
    // SAFETY: the helper checks the new head against the frame itself.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, ETH_LEN as i32) } != 0 {
        return Verdict::Drop(COUNTER_DROPPED_MALFORMED);
    }
    Verdict::Redirect
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
