//! Reassembly of IPv4 and IPv6 fragments from one agent, pure.
//!
//! An agent's kernel fragments a datagram larger than the tunnel's MTU (a 4000-byte UDP
//! datagram leaves as three fragments), and only the whole datagram can be checked against
//! policy and forwarded to a backend socket. So fragments are collected per agent (etherparse's
//! `IpDefragPool` places them: it refuses lengths past 64 KiB and ends that conflict, but merges
//! overlapping fragments, the later bytes overwriting the earlier), and the whole packet is
//! rebuilt with a fresh IPv4 header.
//!
//! IPv6: a fragment is a packet whose fragment header comes right after the fixed header (what
//! an agent's kernel sends for a datagram larger than its TUN's MTU) and that really fragments
//! (offset or M set). The whole packet gets a fresh IPv6 header without extension headers.
//! The fragment header is read here, not by etherparse: 0.16 decodes its offset and M flag
//! from the wrong bits (etherparse issue #150, fixed in 0.20); only its reassembly buffer
//! (`IpDefragBuf`: 64 KiB at most, consistent ends, overlaps merged as for IPv4) is used for
//! IPv6. Anything else with a fragment header is no fragment here and meets `inspect`, which
//! drops it: an atomic fragment as `dropped_ipv6_fragments`, a fragment header behind another
//! extension header as `dropped_ipv6_extension_headers` (`inspect` looks only at the header
//! after the fixed one).
//!
//! Memory is bounded: at most [`MAX_PENDING`] datagrams in reassembly per agent (each at most
//! 64 KiB, so 512 KiB per agent at worst, less than one agent's TCP buffers may hold), each
//! given [`TIMEOUT`] from its latest fragment; a fragment past the cap, one that
//! does not fit its datagram, or one of a datagram that timed out is dropped and counted by the
//! caller. Nothing here trusts the fragments: since overlaps are merged, not refused, the
//! rebuilt datagram may hold bytes of any fragment, so it is checked whole and goes through
//! the same checks (source, service, port, checksum) as any other packet.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use etherparse::defrag::{IpDefragBuf, IpDefragPool};
use etherparse::{
    ip_number, IpFragOffset, IpNumber, Ipv4Header, Ipv6Header, Ipv6HeaderSlice, SlicedPacket,
};

/// Datagrams in reassembly at once, per agent.
pub(crate) const MAX_PENDING: usize = 8;

/// How long a datagram may wait for its next fragment.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(5);

/// Why a fragment was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FragmentDrop {
    /// Not a parsable IPv4 or IPv6 fragment.
    Malformed,
    /// [`MAX_PENDING`] datagrams of this agent are already in reassembly.
    TooMany,
    /// It extends past 64 KiB or past the end another fragment set, sets a different end, or
    /// is not the last yet its length is no multiple of 8. (Overlaps are merged, not refused.)
    Inconsistent,
}

/// One datagram being reassembled: source, destination, identification, protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    src: IpAddr,
    dst: IpAddr,
    id: u32,
    protocol: u8,
}

/// The datagrams in reassembly from one agent.
#[derive(Debug)]
pub(crate) struct Reassembly {
    pool: IpDefragPool<Instant>,
    /// The IPv6 datagrams in reassembly.
    bufs6: HashMap<Key, IpDefragBuf>,
    /// Each datagram in the pool or `bufs6` and its latest fragment's time (the pool has no
    /// count).
    pending: HashMap<Key, Instant>,
}

impl Default for Reassembly {
    fn default() -> Self {
        Self {
            pool: IpDefragPool::new(),
            bufs6: HashMap::new(),
            pending: HashMap::new(),
        }
    }
}

/// Whether a packet is a fragment: IPv4 with more fragments set or a non-zero offset; IPv6
/// with a fragment header right after the fixed header, with M set or a non-zero offset.
pub(crate) fn is_fragment(packet: &[u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            packet.len() >= 20
                && (packet[6] & 0x20 != 0 || u16::from_be_bytes([packet[6] & 0x1f, packet[7]]) != 0)
        }
        Some(6) => {
            packet.len() >= 48
                && packet[6] == ip_number::IPV6_FRAG.0
                && u16::from_be_bytes([packet[42], packet[43]]) & 0xfff9 != 0
        }
        _ => false,
    }
}

impl Reassembly {
    /// Takes one fragment; returns the whole packet once its last missing fragment arrived.
    pub(crate) fn add(
        &mut self,
        fragment: &[u8],
        now: Instant,
    ) -> Result<Option<Vec<u8>>, FragmentDrop> {
        self.expire(now);
        if !is_fragment(fragment) {
            return Err(FragmentDrop::Malformed);
        }
        if fragment[0] >> 4 == 6 {
            return self.add6(fragment, now);
        }
        let sliced = SlicedPacket::from_ip(fragment).map_err(|_| FragmentDrop::Malformed)?;
        let Some(etherparse::NetSlice::Ipv4(ip)) = &sliced.net else {
            return Err(FragmentDrop::Malformed);
        };
        let h = ip.header();
        let key = Key {
            src: h.source_addr().into(),
            dst: h.destination_addr().into(),
            id: u32::from(h.identification()),
            protocol: h.protocol().0,
        };
        let ttl = h.ttl();
        if !self.pending.contains_key(&key) && self.pending.len() >= MAX_PENDING {
            return Err(FragmentDrop::TooMany);
        }
        self.pending.insert(key, now);
        match self.pool.process_sliced_packet(&sliced, now, ()) {
            Ok(None) => Ok(None),
            Ok(Some(whole)) => {
                self.pending.remove(&key);
                let packet = rebuild(&key, ttl, &whole.payload);
                self.pool.return_buf(whole);
                packet.map(Some)
            }
            Err(_) => Err(FragmentDrop::Inconsistent),
        }
    }

    /// [`Self::add`] for an IPv6 fragment (`is_fragment` holds: the fragment header follows
    /// the fixed header).
    fn add6(&mut self, fragment: &[u8], now: Instant) -> Result<Option<Vec<u8>>, FragmentDrop> {
        let ip = Ipv6HeaderSlice::from_slice(fragment).map_err(|_| FragmentDrop::Malformed)?;
        let Some(frag) = fragment.get(Ipv6Header::LEN..Ipv6Header::LEN + 8) else {
            return Err(FragmentDrop::Malformed);
        };
        let total = Ipv6Header::LEN + usize::from(ip.payload_length());
        let Some(payload) = fragment.get(Ipv6Header::LEN + 8..total) else {
            return Err(FragmentDrop::Malformed);
        };
        // RFC 8200 4.5: offset in the 13 high bits (8-octet units), M in the lowest bit.
        let off_flags = u16::from_be_bytes([frag[2], frag[3]]);
        let offset = IpFragOffset::try_new(off_flags >> 3).map_err(|_| FragmentDrop::Malformed)?;
        let more = off_flags & 1 == 1;
        let key = Key {
            src: ip.source_addr().into(),
            dst: ip.destination_addr().into(),
            id: u32::from_be_bytes([frag[4], frag[5], frag[6], frag[7]]),
            protocol: frag[0],
        };
        if !self.pending.contains_key(&key) && self.pending.len() >= MAX_PENDING {
            return Err(FragmentDrop::TooMany);
        }
        self.pending.insert(key, now);
        let mut buf = match self.bufs6.entry(key) {
            Entry::Occupied(e) => e,
            Entry::Vacant(e) => e.insert_entry(IpDefragBuf::new(
                IpNumber(key.protocol),
                Vec::new(),
                Vec::new(),
            )),
        };
        if buf.get_mut().add(offset, more, payload).is_err() {
            return Err(FragmentDrop::Inconsistent);
        }
        if !buf.get().is_complete() {
            return Ok(None);
        }
        self.pending.remove(&key);
        let (whole, _) = buf.remove().take_bufs();
        rebuild(&key, ip.hop_limit(), &whole).map(Some)
    }

    /// Forgets datagrams whose latest fragment is older than [`TIMEOUT`].
    fn expire(&mut self, now: Instant) {
        let fresh = |t: &Instant| now.saturating_duration_since(*t) < TIMEOUT;
        if self.pending.values().all(fresh) {
            return;
        }
        self.pending.retain(|_, t| fresh(t));
        self.pool.retain(fresh);
        let pending = &self.pending;
        self.bufs6.retain(|k, _| pending.contains_key(k));
    }

    /// Datagrams in reassembly now.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// The whole packet: a fresh IPv4 header (no options, not a fragment) or IPv6 header (no
/// extension headers), and the payload.
fn rebuild(key: &Key, ttl: u8, payload: &[u8]) -> Result<Vec<u8>, FragmentDrop> {
    let len = u16::try_from(payload.len()).map_err(|_| FragmentDrop::Inconsistent)?;
    let (src, dst) = match (key.src, key.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (s, d),
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let header = Ipv6Header {
                traffic_class: 0,
                flow_label: Default::default(),
                payload_length: len,
                next_header: IpNumber(key.protocol),
                hop_limit: ttl,
                source: s.octets(),
                destination: d.octets(),
            };
            let mut out = Vec::with_capacity(Ipv6Header::LEN + payload.len());
            header
                .write(&mut out)
                .map_err(|_| FragmentDrop::Inconsistent)?;
            out.extend_from_slice(payload);
            return Ok(out);
        }
        _ => return Err(FragmentDrop::Inconsistent),
    };
    let mut header = Ipv4Header::new(len, ttl, IpNumber(key.protocol), src.octets(), dst.octets())
        .map_err(|_| FragmentDrop::Inconsistent)?;
    // Keys of IPv4 fragments hold a 16-bit identification.
    header.identification = key.id as u16;
    // It was fragmented, so it may be again on the way to the backend.
    header.dont_fragment = false;
    header.header_checksum = header.calc_header_checksum();
    let mut out = Vec::with_capacity(header.header_len() + payload.len());
    header
        .write(&mut out)
        .map_err(|_| FragmentDrop::Inconsistent)?;
    out.extend_from_slice(payload);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use etherparse::PacketBuilder;
    use proptest::prelude::*;

    use super::super::fragment::fragment_ipv4;
    use super::*;

    use std::net::Ipv4Addr;

    const AGENT: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
    const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);

    fn udp(len: usize, id: u16) -> Vec<u8> {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut p = Vec::new();
        PacketBuilder::ipv4(AGENT.octets(), SERVICE.octets(), 64)
            .udp(40000, 7)
            .write(&mut p, &data)
            .unwrap();
        // An identification, as the agent's kernel gives every datagram it may fragment
        // (DF clear).
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[6] &= !0x40;
        p[10] = 0;
        p[11] = 0;
        let sum = Ipv4Header::from_slice(&p).unwrap().0.calc_header_checksum();
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p
    }

    #[test]
    fn a_4000_byte_datagram_comes_back_whole_in_any_order() {
        let t0 = Instant::now();
        let whole = udp(4000, 7);
        let frags = fragment_ipv4(&whole, 1280).unwrap();
        assert_eq!(frags.len(), 4);
        assert!(frags.iter().all(|f| is_fragment(f)));
        assert!(!is_fragment(&whole));
        for order in [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]] {
            let mut r = Reassembly::default();
            let mut out = None;
            for (n, i) in order.iter().enumerate() {
                let got = r.add(&frags[*i], t0).unwrap();
                if n + 1 < order.len() {
                    assert_eq!(got, None);
                } else {
                    out = got;
                }
            }
            let out = out.expect("whole after the last fragment");
            assert_eq!(out, whole, "order {order:?}");
            assert_eq!(r.pending(), 0);
        }
    }

    #[test]
    fn memory_is_bounded_and_stale_datagrams_expire() {
        let t0 = Instant::now();
        let mut r = Reassembly::default();
        // First fragments of MAX_PENDING datagrams that never complete.
        for id in 0..MAX_PENDING as u16 {
            let f = fragment_ipv4(&udp(3000, id), 1280).unwrap();
            assert_eq!(r.add(&f[0], t0), Ok(None));
        }
        let next = fragment_ipv4(&udp(3000, 999), 1280).unwrap();
        assert_eq!(r.add(&next[0], t0), Err(FragmentDrop::TooMany));
        assert_eq!(r.pending(), MAX_PENDING);
        // After the timeout they are gone and a new datagram fits again, whole.
        let later = t0 + TIMEOUT;
        for f in &next {
            let _ = r.add(f, later);
        }
        assert_eq!(r.pending(), 0);
        // A late fragment of an expired datagram starts a new one that times out too.
        let stale = fragment_ipv4(&udp(3000, 0), 1280).unwrap();
        assert_eq!(r.add(&stale[1], later), Ok(None));
        assert_eq!(r.pending(), 1);
    }

    fn udp6(len: usize) -> Vec<u8> {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut p = Vec::new();
        PacketBuilder::ipv6(
            ztna_proto::service::tunnel_ipv6(AGENT).octets(),
            [0xfd, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            64,
        )
        .udp(40000, 7)
        .write(&mut p, &data)
        .unwrap();
        p
    }

    #[test]
    fn an_ipv6_datagram_comes_back_whole_in_any_order() {
        use super::super::fragment::fragment_ipv6;
        let t0 = Instant::now();
        let whole = udp6(4000);
        let frags = fragment_ipv6(&whole, 1280, 42).unwrap();
        assert_eq!(frags.len(), 4);
        assert!(frags.iter().all(|f| is_fragment(f)));
        assert!(!is_fragment(&whole));
        for order in [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]] {
            let mut r = Reassembly::default();
            let mut out = None;
            for i in order {
                out = r.add(&frags[i], t0).unwrap();
            }
            assert_eq!(out.expect("whole"), whole, "order {order:?}");
            assert_eq!(r.pending(), 0);
        }
        // An atomic fragment (offset 0, M clear) is not one to reassemble (inspect drops it).
        let mut atomic = frags[0].clone();
        atomic[43] &= !1;
        assert!(!is_fragment(&atomic));
        // Nor is a fragment header behind another extension header.
        let mut behind = frags[1].clone();
        behind[6] = 0;
        assert!(!is_fragment(&behind));
        assert_eq!(
            Reassembly::default().add(&behind, t0),
            Err(FragmentDrop::Malformed)
        );
        // IPv6 datagrams count against the same cap.
        let mut r = Reassembly::default();
        for id in 0..MAX_PENDING as u32 {
            let f = fragment_ipv6(&udp6(3000), 1280, id).unwrap();
            assert_eq!(r.add(&f[0], t0), Ok(None));
        }
        let f = fragment_ipv6(&udp6(3000), 1280, 999).unwrap();
        assert_eq!(r.add(&f[0], t0), Err(FragmentDrop::TooMany));
    }

    /// `p` with its IPv4 total length and checksum set right after an edit.
    fn fix(mut p: Vec<u8>) -> Vec<u8> {
        let len = p.len() as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        p[10] = 0;
        p[11] = 0;
        let sum = Ipv4Header::from_slice(&p).unwrap().0.calc_header_checksum();
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p
    }

    #[test]
    fn conflicting_ends_and_garbage_are_refused() {
        let t0 = Instant::now();
        let mut r = Reassembly::default();
        let frags = fragment_ipv4(&udp(3000, 5), 1280).unwrap();
        let last = frags.last().unwrap().clone();
        assert_eq!(r.add(&last, t0), Ok(None));
        // Another "last" fragment of the same datagram, 8 bytes shorter: a different end.
        let shorter = fix(last[..last.len() - 8].to_vec());
        assert_eq!(r.add(&shorter, t0), Err(FragmentDrop::Inconsistent));
        // Not fragments, or not IPv4 at all.
        assert_eq!(r.add(&[0x45; 10], t0), Err(FragmentDrop::Malformed));
        assert_eq!(r.add(&udp(100, 1), t0), Err(FragmentDrop::Malformed));
        // The datagram still completes from its real fragments.
        let mut whole = None;
        for f in &frags[..frags.len() - 1] {
            whole = r.add(f, t0).unwrap();
        }
        assert_eq!(whole, Some(udp(3000, 5)));
    }

    proptest! {
        #[test]
        fn any_ipv6_input_is_safe_and_bounded(packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 48..200), 0..100)) {
            let t0 = Instant::now();
            let mut r = Reassembly::default();
            for mut p in packets {
                p[0] = 0x60;
                p[6] = 44;
                p[43] |= 1;
                let len = (p.len() - 40) as u16;
                p[4..6].copy_from_slice(&len.to_be_bytes());
                let _ = r.add(&p, t0);
                prop_assert!(r.pending() <= MAX_PENDING);
            }
        }

        #[test]
        fn any_input_is_safe_and_bounded(packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..300)) {
            let t0 = Instant::now();
            let mut r = Reassembly::default();
            for (i, mut p) in packets.into_iter().enumerate() {
                if p.len() >= 20 && i % 2 == 0 {
                    p[0] = 0x45;
                    p[6] |= 0x20;
                    let len = p.len() as u16;
                    p[2..4].copy_from_slice(&len.to_be_bytes());
                    p[10] = 0;
                    p[11] = 0;
                    if let Ok((h, _)) = Ipv4Header::from_slice(&p) {
                        let sum = h.calc_header_checksum();
                        p[10..12].copy_from_slice(&sum.to_be_bytes());
                    }
                }
                let _ = r.add(&p, t0 + Duration::from_millis(i as u64 * 50));
                prop_assert!(r.pending() <= MAX_PENDING);
            }
        }
    }
}
