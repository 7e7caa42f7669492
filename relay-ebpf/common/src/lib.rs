//! The types the relay's XDP program (`relay-ebpf/xdp`) and its loader (`relay/src/xdp`)
//! share: map names, `#[repr(C)]` map keys and values, counter indices. `no_std`, no I/O.
//!
//! Addresses, ports and channel numbers are stored as network-order bytes, exactly as they
//! appear in packets, so neither side converts byte order and the kernel compares raw bytes.
#![no_std]

pub use ztna_connector_ebpf_common::{csum_replace, headers};

/// Name of the channel map: channel number (network order) → [`Ends`] (a `HashMap`, a mirror
/// of the relay's forwarding table kept by userspace).
pub const MAP_CHANNELS: &str = "CHANNELS";
/// Name of the learned next hops: [`EndKey`] → [`NextHop`] (an `LruHashMap` the program fills
/// from each end's own packets).
pub const MAP_NEXT_HOPS: &str = "NEXT_HOPS";
/// Name of the bound addresses: [`EndKey`] → `u8` (a `HashMap`, the addresses the relay's
/// sessions come from, kept by userspace): the program learns next hops from their QUIC too,
/// so an end that only receives channel data is reached in the kernel as well.
pub const MAP_BOUND: &str = "BOUND";
/// Name of the global counters: index `COUNTER_*` → `u64` (a `PerCpuArray`).
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Name of the configuration array: index 0 → [`Config`] (an `Array`).
pub const MAP_CONFIG: &str = "CONFIG";
/// Name of the XDP program in the object.
pub const PROGRAM: &str = "ztna_relay_xdp";

/// Capacity of the channel map. Channels beyond it are forwarded by userspace (and the
/// program then passes unknown channels up instead of dropping them: [`FLAG_PASS_UNKNOWN`]).
pub const MAX_CHANNELS: u32 = 65536;
/// Capacity of the next-hop map (least recently used entries are evicted; an end without one
/// is forwarded by userspace until its next packet teaches the program again).
pub const MAX_NEXT_HOPS: u32 = 2 * MAX_CHANNELS;

/// Capacity of the bound-address map (addresses beyond it are not learned from their QUIC).
pub const MAX_BOUND: u32 = MAX_NEXT_HOPS;

/// Channel data forwarded (`XDP_TX` or redirect).
pub const COUNTER_FORWARDED: u32 = 0;
/// Bytes of UDP payload forwarded (header included).
pub const COUNTER_FORWARDED_BYTES: u32 = 1;
/// Channel data too short for its header or with a channel number out of range: dropped.
pub const COUNTER_DROPPED_MALFORMED: u32 = 2;
/// Channel data for a channel that is not open: dropped.
pub const COUNTER_DROPPED_UNKNOWN: u32 = 3;
/// Channel data from an address bound to neither end of its channel: dropped.
pub const COUNTER_DROPPED_UNBOUND: u32 = 4;
/// Everything that is not channel data (QUIC, probes, other ports and protocols): passed.
pub const COUNTER_PASSED: u32 = 5;
/// Channel data the program leaves to userspace: the destination end's next hop is not
/// learned yet, an end is not IPv4, the datagram is an IP fragment.
pub const COUNTER_PASSED_CHANNEL: u32 = 6;
/// `bpf_redirect` to another interface failed: dropped.
pub const COUNTER_DROPPED_REDIRECT: u32 = 7;
/// Number of global counters.
pub const COUNTERS: u32 = 8;

/// The program passes channel data of channels it does not know to userspace instead of
/// dropping it (set when the channel map could not take a channel).
pub const FLAG_PASS_UNKNOWN: u8 = 1;

/// One end of a channel: its bound IPv4 address and UDP port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct EndKey {
    /// IPv4 address, network order.
    pub addr: [u8; 4],
    /// UDP port, network order.
    pub port: [u8; 2],
    /// Zero.
    pub pad: [u8; 2],
}

/// The two ends of an open channel. All zeros: forwarded by userspace (an end is IPv6).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ends {
    /// The agent's end.
    pub a: EndKey,
    /// The connector's end.
    pub b: EndKey,
}

impl Ends {
    /// Whether the program leaves this channel to userspace.
    pub fn userspace(&self) -> bool {
        self.a.port == [0, 0] || self.b.port == [0, 0]
    }
}

/// How to reach an end on the link, learned from the frames it sends.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NextHop {
    /// The interface its frames arrive on.
    pub ifindex: u32,
    /// The frames' source MAC: the end itself on the link, or its router.
    pub peer_mac: [u8; 6],
    /// The frames' destination MAC: the relay's own on that interface.
    pub own_mac: [u8; 6],
}

/// The program's settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// The relay's IPv4 address, network order; all zeros: any.
    pub addr: [u8; 4],
    /// The relay's UDP port, host order. `0` disables the program (everything passes).
    pub port: u16,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Zero.
    pub pad: u8,
}

/// The first byte of channel data (`ztna_proto::datagram`).
pub const CHANNEL_DATA: u8 = 0x01;
/// Bytes of the channel-data header: type and channel number.
pub const HEADER_LEN: usize = 5;
/// Largest channel number (`ztna_proto::ChannelId::MAX`).
pub const MAX_CHANNEL: u32 = (1 << 30) - 1;
/// TTL of forwarded packets, as the relay's socket sends them.
pub const FORWARD_TTL: u8 = 64;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] structs of integers and byte arrays, no padding, any bit
    // pattern valid.
    unsafe impl aya::Pod for super::EndKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Ends {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NextHop {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(core::mem::size_of::<EndKey>(), 8);
        assert_eq!(core::mem::size_of::<Ends>(), 16);
        assert_eq!(core::mem::size_of::<NextHop>(), 16);
        assert_eq!(core::mem::size_of::<Config>(), 8);
    }
}
