//! The types the connector's XDP program (`connector-ebpf/xdp`) and its loader (`connector`)
//! share: map names, `#[repr(C)]` map keys and values, counter indices; and what both XDP
//! programs (this one and the relay's) share: [`headers`], [`csum_replace`]. `no_std`, no I/O.
//!
//! Addresses and ports are stored as network-order bytes, exactly as they appear in packets, so
//! neither side converts byte order and the kernel compares raw header bytes.
#![no_std]

/// Name of the flow map: [`FlowKey`] → [`FlowValue`] (a `HashMap`, filled by userspace).
pub const MAP_FLOWS: &str = "FLOWS";
/// Name of the per-flow counters: [`FlowKey`] → [`FlowStats`] (a `PerCpuHashMap`; userspace
/// inserts a zeroed entry with each flow and removes it with the flow).
pub const MAP_FLOW_STATS: &str = "FLOW_STATS";
/// Name of the global counters: index `COUNTER_*` → `u64` (a `PerCpuArray`).
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Name of the AF_XDP socket map: RX queue index → socket (an `XskMap`).
pub const MAP_XSKS: &str = "XSKS";
/// Name of the configuration array: index 0 → [`Config`] (an `Array`).
pub const MAP_CONFIG: &str = "CONFIG";
/// Name of the XDP program in the object.
pub const PROGRAM: &str = "ztna_xdp";

/// Capacity of the flow map and of the per-flow counters.
pub const MAX_FLOWS: u32 = 65536;
/// Capacity of the socket map (RX queues).
pub const MAX_QUEUES: u32 = 64;

/// Replies to flows rewritten and redirected to an AF_XDP socket.
pub const COUNTER_HANDLED: u32 = 0;
/// UDP to the flow port range that matched no flow: dropped.
pub const COUNTER_DROPPED_UNSOLICITED: u32 = 1;
/// Everything else: passed to the kernel's stack.
pub const COUNTER_PASSED: u32 = 2;
/// Replies to flows that arrived on a queue without an AF_XDP socket: dropped.
pub const COUNTER_DROPPED_NO_SOCKET: u32 = 3;
/// Malformed or fragmented IPv4/UDP to the flow port range: dropped.
pub const COUNTER_DROPPED_MALFORMED: u32 = 4;
/// Number of global counters.
pub const COUNTERS: u32 = 5;

/// Identifies a flow from the backend side: the reply's source address and port and the
/// destination (local) port, which is unique per flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Backend IPv4 address, network order.
    pub backend_addr: [u8; 4],
    /// Backend UDP port, network order.
    pub backend_port: [u8; 2],
    /// The connector's local UDP port of the flow, network order.
    pub local_port: [u8; 2],
}

/// What a reply to a flow is rewritten into: the tunnel-side packet from the service to the
/// agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowValue {
    /// Service (virtual) address: the new source address, network order.
    pub service_addr: [u8; 4],
    /// The agent's tunnel address: the new destination address, network order.
    pub agent_addr: [u8; 4],
    /// Service port: the new source port, network order.
    pub service_port: [u8; 2],
    /// The agent's source port: the new destination port, network order.
    pub agent_port: [u8; 2],
}

/// Per-flow, per-CPU counters of replies the program handled.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowStats {
    /// Packets.
    pub packets: u64,
    /// Bytes of IPv4 packets (after the rewrite).
    pub bytes: u64,
}

/// The program's settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// First port of the flow port range, host order.
    pub first_port: u16,
    /// Last port of the flow port range (inclusive), host order. `0` disables the program
    /// (everything passes).
    pub last_port: u16,
}

/// The packet headers both XDP programs (this connector's and the relay's) parse, as
/// `#[repr(C)]` structs of byte arrays (alignment 1; the verifier rejects etherparse).
pub mod headers {
    /// Bytes of an Ethernet header.
    pub const ETH_LEN: usize = 14;
    /// EtherType of IPv4, as on the wire.
    pub const ETH_P_IPV4: [u8; 2] = [0x08, 0x00];
    /// IP protocol number of UDP.
    pub const IPPROTO_UDP: u8 = 17;

    /// Ethernet header.
    #[repr(C)]
    pub struct EthHdr {
        pub dst: [u8; 6],
        pub src: [u8; 6],
        pub ether_type: [u8; 2],
    }

    /// IPv4 header without options.
    #[repr(C)]
    pub struct Ipv4Hdr {
        pub version_ihl: u8,
        pub tos: u8,
        pub total_len: [u8; 2],
        pub id: [u8; 2],
        pub flags_offset: [u8; 2],
        pub ttl: u8,
        pub protocol: u8,
        pub check: [u8; 2],
        pub src: [u8; 4],
        pub dst: [u8; 4],
    }

    /// UDP header.
    #[repr(C)]
    pub struct UdpHdr {
        pub src: [u8; 2],
        pub dst: [u8; 2],
        pub len: [u8; 2],
        pub check: [u8; 2],
    }
}

/// TTL of the rewritten packet, as the socket path builds it.
pub const REWRITE_TTL: u8 = 64;

/// Updates a one's complement checksum for one 16-bit word changing from `old` to `new`
/// (RFC 1624, equation 3), as both the XDP program and tests compute it.
#[inline(always)]
pub fn csum_replace(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] structs of integers and byte arrays, no padding, any bit
    // pattern valid.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(core::mem::size_of::<FlowKey>(), 8);
        assert_eq!(core::mem::size_of::<FlowValue>(), 12);
        assert_eq!(core::mem::size_of::<FlowStats>(), 16);
        assert_eq!(core::mem::size_of::<Config>(), 4);
        assert_eq!(core::mem::size_of::<headers::EthHdr>(), headers::ETH_LEN);
        assert_eq!(core::mem::size_of::<headers::Ipv4Hdr>(), 20);
        assert_eq!(core::mem::size_of::<headers::UdpHdr>(), 8);
    }
}
