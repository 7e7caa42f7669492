//! Reassembly of IPv4 fragments from one agent, pure.
//!
//! An agent's kernel fragments a datagram larger than the tunnel's MTU (a 4000-byte UDP
//! datagram leaves as three fragments), and only the whole datagram can be checked against
//! policy and forwarded to a backend socket. So fragments are collected per agent (etherparse's
//! `IpDefragPool` places them, and refuses overlaps and lengths past 64 KiB), and the whole
//! packet is rebuilt with a fresh IPv4 header.
//!
//! Memory is bounded: at most [`MAX_PENDING`] datagrams in reassembly per agent (each at most
//! 64 KiB, so 512 KiB per agent at worst, less than one agent's TCP buffers may hold), each
//! given [`TIMEOUT`] from its latest fragment; a fragment past the cap, one that
//! does not fit its datagram, or one of a datagram that timed out is dropped and counted by the
//! caller. Nothing here trusts the fragments: the rebuilt packet goes through the same checks
//! (source, service, port) as any other.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use etherparse::defrag::IpDefragPool;
use etherparse::{IpNumber, Ipv4Header, SlicedPacket};

/// Datagrams in reassembly at once, per agent.
pub(crate) const MAX_PENDING: usize = 8;

/// How long a datagram may wait for its next fragment.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(5);

/// Why a fragment was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FragmentDrop {
    /// Not a parsable IPv4 fragment.
    Malformed,
    /// [`MAX_PENDING`] datagrams of this agent are already in reassembly.
    TooMany,
    /// It overlaps, or extends past 64 KiB or past the end another fragment set.
    Inconsistent,
}

/// One datagram being reassembled: source, destination, identification, protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    protocol: u8,
}

/// The datagrams in reassembly from one agent.
#[derive(Debug)]
pub(crate) struct Reassembly {
    pool: IpDefragPool<Instant>,
    /// Each datagram in the pool and its latest fragment's time (the pool has no count).
    pending: HashMap<Key, Instant>,
}

impl Default for Reassembly {
    fn default() -> Self {
        Self {
            pool: IpDefragPool::new(),
            pending: HashMap::new(),
        }
    }
}

/// Whether an IPv4 packet is a fragment (more fragments set, or a non-zero offset).
pub(crate) fn is_fragment(packet: &[u8]) -> bool {
    packet.len() >= 20
        && packet[0] >> 4 == 4
        && (packet[6] & 0x20 != 0 || u16::from_be_bytes([packet[6] & 0x1f, packet[7]]) != 0)
}

impl Reassembly {
    /// Takes one fragment; returns the whole packet once its last missing fragment arrived.
    pub(crate) fn add(
        &mut self,
        fragment: &[u8],
        now: Instant,
    ) -> Result<Option<Vec<u8>>, FragmentDrop> {
        self.expire(now);
        let sliced = SlicedPacket::from_ip(fragment).map_err(|_| FragmentDrop::Malformed)?;
        let Some(etherparse::NetSlice::Ipv4(ip)) = &sliced.net else {
            return Err(FragmentDrop::Malformed);
        };
        let h = ip.header();
        if !h.is_fragmenting_payload() {
            return Err(FragmentDrop::Malformed);
        }
        let key = Key {
            src: h.source_addr(),
            dst: h.destination_addr(),
            id: h.identification(),
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

    /// Forgets datagrams whose latest fragment is older than [`TIMEOUT`].
    fn expire(&mut self, now: Instant) {
        let fresh = |t: &Instant| now.saturating_duration_since(*t) < TIMEOUT;
        if self.pending.values().all(fresh) {
            return;
        }
        self.pending.retain(|_, t| fresh(t));
        self.pool.retain(fresh);
    }

    /// Datagrams in reassembly now.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// The whole packet: a fresh IPv4 header (no options, not a fragment) and the payload.
fn rebuild(key: &Key, ttl: u8, payload: &[u8]) -> Result<Vec<u8>, FragmentDrop> {
    let len = u16::try_from(payload.len()).map_err(|_| FragmentDrop::Inconsistent)?;
    let mut header = Ipv4Header::new(
        len,
        ttl,
        IpNumber(key.protocol),
        key.src.octets(),
        key.dst.octets(),
    )
    .map_err(|_| FragmentDrop::Inconsistent)?;
    header.identification = key.id;
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
