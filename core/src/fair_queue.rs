//! Per-flow fair queueing of the packets an agent sends into a full inner connection.
//!
//! quinn's datagram send buffer is one FIFO that drops its oldest datagram when full, whatever
//! flow it belongs to: under a UDP flood a ping queued behind the flood was the packet dropped
//! (27 of 45 pings lost under a flood at 4 × a 50 Mbit/s bottleneck, `docs/architecture.md`).
//! While an inner connection's buffer is full the agent puts packets here instead, and one task
//! per connector feeds them to quinn as room frees, in deficit round robin over flows with
//! sparse flows first (fq_codel's scheme, RFC 8290 without CoDel): a flow that sends little (a
//! ping, a DNS query, a TCP ACK stream) goes out ahead of the flood, and each busy flow gets an
//! equal share of the bytes. The queue is bounded in bytes and packets; when it is over either
//! bound it drops from the head of the flow holding the most bytes, so the flood loses its own
//! oldest packets and nobody else's.
//!
//! Pure: no I/O, no clock. Packets are anything that is `AsRef<[u8]>` (an IP packet).

use std::collections::VecDeque;
use std::hash::BuildHasher;

/// The flows a queue tells apart: packets whose 5-tuples hash to the same bucket share it.
pub const BUCKETS: usize = 256;
/// Bytes a flow may send per round (one full-size tunnel packet).
pub const QUANTUM: usize = 1500;

/// What became of a pushed packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pushed {
    /// Packets dropped to get back under the bounds (the pushed one may be among them).
    pub dropped: usize,
    /// The pushed packet's flow, for [`FairQueue::flow_bytes`].
    pub flow: usize,
}

/// A bounded per-flow fair queue (see the module docs).
#[derive(Debug)]
pub struct FairQueue<P, S = std::hash::RandomState> {
    buckets: Vec<Bucket<P>>,
    /// Buckets that became busy and have not yet used one quantum: served first.
    new: VecDeque<usize>,
    /// Busy buckets served in turn.
    old: VecDeque<usize>,
    bytes: usize,
    packets: usize,
    max_bytes: usize,
    max_packets: usize,
    hasher: S,
}

#[derive(Debug)]
struct Bucket<P> {
    packets: VecDeque<P>,
    bytes: usize,
    deficit: isize,
    listed: bool,
}

impl<P> Default for Bucket<P> {
    fn default() -> Self {
        Bucket {
            packets: VecDeque::new(),
            bytes: 0,
            deficit: 0,
            listed: false,
        }
    }
}

impl<P: AsRef<[u8]>> FairQueue<P> {
    /// A queue holding at most `max_bytes` and `max_packets` (each at least one packet), with
    /// a random flow hash.
    pub fn new(max_bytes: usize, max_packets: usize) -> Self {
        Self::with_hasher(max_bytes, max_packets, std::hash::RandomState::new())
    }
}

impl<P: AsRef<[u8]>, S: BuildHasher> FairQueue<P, S> {
    /// [`FairQueue::new`] with a given flow hash (tests).
    pub fn with_hasher(max_bytes: usize, max_packets: usize, hasher: S) -> Self {
        FairQueue {
            buckets: (0..BUCKETS).map(|_| Bucket::default()).collect(),
            new: VecDeque::new(),
            old: VecDeque::new(),
            bytes: 0,
            packets: 0,
            max_bytes: max_bytes.max(1),
            max_packets: max_packets.max(1),
            hasher,
        }
    }

    /// Bytes queued.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Packets queued.
    pub fn len(&self) -> usize {
        self.packets
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.packets == 0
    }

    /// The flow `packet` would be queued in.
    pub fn flow(&self, packet: &[u8]) -> usize {
        self.bucket_of(packet)
    }

    /// Bytes queued in `flow` (a [`Pushed::flow`]; flows that share a bucket count together).
    pub fn flow_bytes(&self, flow: usize) -> usize {
        self.buckets.get(flow).map_or(0, |b| b.bytes)
    }

    /// Queues `packet` behind the earlier packets of its flow, then drops from the head of the
    /// fattest flow while the queue is over a bound.
    pub fn push(&mut self, packet: P) -> Pushed {
        let b = self.bucket_of(packet.as_ref());
        let len = packet.as_ref().len();
        let bucket = &mut self.buckets[b];
        bucket.packets.push_back(packet);
        bucket.bytes += len;
        if !bucket.listed {
            bucket.listed = true;
            bucket.deficit = QUANTUM as isize;
            self.new.push_back(b);
        }
        self.bytes += len;
        self.packets += 1;
        let mut dropped = 0;
        while self.bytes > self.max_bytes || self.packets > self.max_packets {
            let fattest = (0..BUCKETS)
                .max_by_key(|&i| self.buckets[i].bytes)
                .expect("BUCKETS > 0");
            let Some(p) = self.buckets[fattest].packets.pop_front() else {
                break;
            };
            let len = p.as_ref().len();
            self.buckets[fattest].bytes -= len;
            self.bytes -= len;
            self.packets -= 1;
            dropped += 1;
        }
        Pushed { dropped, flow: b }
    }

    /// The next packet to send: sparse flows first, then the busy ones in turn, a quantum of
    /// bytes each per round.
    pub fn pop(&mut self) -> Option<P> {
        loop {
            let (b, from_new) = match self.new.front() {
                Some(&b) => (b, true),
                None => (*self.old.front()?, false),
            };
            let bucket = &mut self.buckets[b];
            if bucket.deficit <= 0 {
                // Used its quantum this round: to the back of the busy flows with a new one.
                bucket.deficit += QUANTUM as isize;
                self.list(from_new).pop_front();
                self.old.push_back(b);
                continue;
            }
            let Some(p) = bucket.packets.pop_front() else {
                // Emptied (or its packets were dropped for a fatter flow). A new flow that
                // empties waits one round among the busy ones before it counts as new again,
                // so a flow cannot stay ahead by sending in short bursts (RFC 8290, 4.2).
                self.list(from_new).pop_front();
                if from_new && !self.old.is_empty() {
                    self.old.push_back(b);
                } else {
                    self.buckets[b].listed = false;
                }
                continue;
            };
            let len = p.as_ref().len();
            bucket.bytes -= len;
            bucket.deficit -= len as isize;
            self.bytes -= len;
            self.packets -= 1;
            return Some(p);
        }
    }

    /// Drops every queued packet; how many there were.
    pub fn clear(&mut self) -> usize {
        let n = self.packets;
        for b in &mut self.buckets {
            b.packets.clear();
            b.bytes = 0;
            b.listed = false;
        }
        self.new.clear();
        self.old.clear();
        self.bytes = 0;
        self.packets = 0;
        n
    }

    fn list(&mut self, new: bool) -> &mut VecDeque<usize> {
        if new {
            &mut self.new
        } else {
            &mut self.old
        }
    }

    fn bucket_of(&self, packet: &[u8]) -> usize {
        (self.hasher.hash_one(flow_of(packet)) % BUCKETS as u64) as usize
    }
}

/// The bytes that name a packet's flow: protocol, addresses, and the ports of an unfragmented
/// TCP or UDP packet (ICMP's identifier for echo). Whatever does not parse is one flow of its
/// own per first byte.
fn flow_of(p: &[u8]) -> (u8, &[u8], &[u8]) {
    const TCP: u8 = 6;
    const UDP: u8 = 17;
    const ICMP: u8 = 1;
    const ICMPV6: u8 = 58;
    match p.first().map(|b| b >> 4) {
        Some(4) if p.len() >= 20 => {
            let proto = p[9];
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let fragment = u16::from_be_bytes([p[6], p[7]]) & 0x1fff != 0;
            let ports: &[u8] = match proto {
                TCP | UDP if !fragment => p.get(ihl..ihl + 4).unwrap_or(&[]),
                ICMP if !fragment => p.get(ihl + 4..ihl + 6).unwrap_or(&[]),
                _ => &[],
            };
            (proto, &p[12..20], ports)
        }
        Some(6) if p.len() >= 40 => {
            let next = p[6];
            let ports: &[u8] = match next {
                TCP | UDP => p.get(40..44).unwrap_or(&[]),
                ICMPV6 => p.get(44..46).unwrap_or(&[]),
                _ => &[],
            };
            (next, &p[8..40], ports)
        }
        _ => (p.first().copied().unwrap_or(0), &[], &[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::hash::BuildHasherDefault;

    type Fixed = BuildHasherDefault<std::hash::DefaultHasher>;

    fn queue(max_bytes: usize, max_packets: usize) -> FairQueue<Vec<u8>, Fixed> {
        FairQueue::with_hasher(max_bytes, max_packets, Fixed::default())
    }

    /// An IPv4 UDP packet of `len` bytes from source port `sport`, `tag` in its payload.
    fn udp(sport: u16, len: usize, tag: u8) -> Vec<u8> {
        let mut p = vec![0u8; len.max(29)];
        p[0] = 0x45;
        p[9] = 17;
        p[12..16].copy_from_slice(&[100, 64, 0, 2]);
        p[16..20].copy_from_slice(&[10, 100, 0, 1]);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&7u16.to_be_bytes());
        p[28] = tag;
        p
    }

    fn ping(seq: u8) -> Vec<u8> {
        let mut p = vec![0u8; 84];
        p[0] = 0x45;
        p[9] = 1;
        p[12..16].copy_from_slice(&[100, 64, 0, 2]);
        p[16..20].copy_from_slice(&[10, 100, 0, 1]);
        p[20] = 8;
        p[24..26].copy_from_slice(&[0x12, 0x34]);
        p[27] = seq;
        p
    }

    fn is_ping(p: &[u8]) -> bool {
        p[9] == 1
    }

    #[test]
    fn a_ping_goes_out_ahead_of_a_queued_flood() {
        let mut q = queue(1 << 20, 10_000);
        for i in 0..200 {
            q.push(udp(5000, 1228, i as u8));
        }
        // The flood has been served for a while (its first quantum used up).
        for _ in 0..3 {
            assert!(!is_ping(&q.pop().unwrap()));
        }
        let pushed = q.push(ping(1));
        assert_eq!(pushed.flow, q.flow(&ping(2)));
        assert_eq!(q.flow_bytes(pushed.flow), 84);
        let next = q.pop().unwrap();
        assert!(
            is_ping(&next),
            "the ping waits behind at most one flood packet"
        );
        assert_eq!(
            q.flow_bytes(pushed.flow),
            0,
            "the ping's flow is empty again"
        );
        assert_eq!(q.len(), 197);
    }

    #[test]
    fn a_full_queue_drops_the_floods_oldest_packets_not_the_ping() {
        let mut q = queue(64 * 1024, 10_000);
        q.push(ping(1));
        let mut dropped = 0;
        for i in 0..1000 {
            dropped += q.push(udp(5000, 1228, i as u8)).dropped;
        }
        assert!(q.bytes() <= 64 * 1024);
        assert_eq!(dropped, 1000 + 1 - q.len());
        assert!(is_ping(&q.pop().unwrap()), "the ping survived the flood");
        // What is left of the flood is its newest packets, in order.
        let rest: Vec<u8> = std::iter::from_fn(|| q.pop()).map(|p| p[28]).collect();
        let newest = (1000 - rest.len()..1000)
            .map(|i| i as u8)
            .collect::<Vec<_>>();
        assert_eq!(rest, newest);
    }

    #[test]
    fn two_busy_flows_share_bytes_equally_whatever_their_packet_sizes() {
        let mut q = queue(10 << 20, 100_000);
        for i in 0..2000 {
            q.push(udp(1, 1200, i as u8));
        }
        for i in 0..8000 {
            q.push(udp(2, 300, i as u8));
        }
        let mut bytes = [0usize; 2];
        let mut taken = 0;
        while taken < 600_000 {
            let p = q.pop().unwrap();
            taken += p.len();
            bytes[usize::from(p[21] == 2)] += p.len();
        }
        let ratio = bytes[0] as f64 / bytes[1] as f64;
        assert!((0.95..1.05).contains(&ratio), "{bytes:?}");
    }

    #[test]
    fn a_flow_that_empties_and_returns_does_not_jump_the_queue_forever() {
        // A flow sending bursts of one quantum, emptying each time, alternates with the busy
        // flow instead of taking every turn.
        let mut q = queue(10 << 20, 100_000);
        for i in 0..100 {
            q.push(udp(1, 1400, i as u8));
        }
        let mut busy = 0;
        for _ in 0..50 {
            q.push(udp(2, 1400, 0));
            let a = q.pop().unwrap();
            let b = q.pop().unwrap();
            busy += [&a, &b].iter().filter(|p| p[21] == 1).count();
        }
        assert!(busy >= 45, "the busy flow got {busy} of 100 turns");
    }

    #[test]
    fn the_packet_bound_holds_for_tiny_packets_and_clear_empties() {
        let mut q = queue(1 << 20, 64);
        for i in 0..1000u16 {
            q.push(udp(i, 29, 0));
        }
        assert_eq!(q.len(), 64);
        assert_eq!(q.clear(), 64);
        assert!(q.is_empty() && q.bytes() == 0 && q.pop().is_none());
        q.push(ping(2));
        assert!(is_ping(&q.pop().unwrap()));
    }

    #[test]
    fn garbage_and_truncated_packets_are_queued_and_returned() {
        let mut q = queue(1 << 20, 100);
        for p in [
            vec![],
            vec![0x45],
            vec![0x60; 39],
            vec![0xff; 3],
            ping(3)[..22].to_vec(),
        ] {
            q.push(p);
        }
        assert_eq!(std::iter::from_fn(|| q.pop()).count(), 5);
    }

    proptest! {
        /// Whatever is pushed and popped: the bounds hold after every push, nothing is lost or
        /// made up (popped + dropped + queued = pushed), each flow's packets leave in order.
        #[test]
        fn bounds_accounting_and_per_flow_order_hold(
            ops in proptest::collection::vec((any::<bool>(), 0u16..6, 20usize..1500), 1..600),
            max_bytes in 1usize..20_000,
            max_packets in 1usize..40,
        ) {
            let mut q = queue(max_bytes, max_packets);
            let (mut pushed, mut popped, mut dropped) = (0usize, 0usize, 0usize);
            let mut last_seq = std::collections::HashMap::<u16, u16>::new();
            let mut seq = 0u16;
            for (push, flow, len) in ops {
                if push {
                    seq = seq.wrapping_add(1);
                    let mut p = udp(flow, len, 0);
                    p[26..28].copy_from_slice(&seq.to_be_bytes());
                    let r = q.push(p);
                    dropped += r.dropped;
                    pushed += 1;
                    prop_assert!(q.len() <= max_packets);
                    prop_assert!(q.bytes() <= max_bytes);
                    prop_assert!(q.flow_bytes(r.flow) <= q.bytes());
                } else if let Some(p) = q.pop() {
                    popped += 1;
                    let flow = u16::from_be_bytes([p[20], p[21]]);
                    let s = u16::from_be_bytes([p[26], p[27]]);
                    if let Some(&prev) = last_seq.get(&flow) {
                        prop_assert!(s > prev, "flow {} out of order", flow);
                    }
                    last_seq.insert(flow, s);
                }
            }
            prop_assert_eq!(popped + dropped + q.len(), pushed);
            // Each flow's count adds up to the queue's.
            prop_assert_eq!((0..BUCKETS).map(|f| q.flow_bytes(f)).sum::<usize>(), q.bytes());
            let rest = std::iter::from_fn(|| q.pop()).count();
            prop_assert_eq!(rest + popped + dropped, pushed);
            prop_assert!(q.is_empty() && q.bytes() == 0);
        }
    }
}
