//! Per-channel fair queueing of forwarded datagrams towards one peer, pure.
//!
//! Every channel towards a peer has its own short queue (a *lane*); the peer's sender takes
//! one datagram from each non-empty lane in turn. One agent flooding its channel fills only its
//! own lane (and loses its own datagrams, drop-tail), so another agent's packets to the same
//! connector wait behind at most one datagram per busy channel, not behind the flood. quinn's
//! own datagram buffer under the lanes is kept small (`core::transport::relay_side`).

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

/// Datagrams one lane holds: a burst of a fast inner connection (32 cost the relay path
/// 330 -> 842 Mbit/s up and 64 -> 584 Mbit/s down in `tcp_bulk_200mib_each_way`).
pub const LANE_PACKETS: usize = 192;
/// Datagrams all lanes towards one peer hold.
pub const PEER_PACKETS: usize = 4096;

/// The lanes towards one peer.
#[derive(Debug, Default)]
pub struct Lanes {
    queues: HashMap<u32, VecDeque<Bytes>>,
    /// Channels with datagrams, in turn order.
    ring: VecDeque<u32>,
    len: usize,
}

impl Lanes {
    /// Queues `d` on channel `ch`'s lane. `false`: dropped (the lane or the peer is full).
    pub fn push(&mut self, ch: u32, d: Bytes) -> bool {
        if self.len >= PEER_PACKETS {
            return false;
        }
        let q = self.queues.entry(ch).or_default();
        if q.len() >= LANE_PACKETS {
            return false;
        }
        if q.is_empty() {
            self.ring.push_back(ch);
        }
        q.push_back(d);
        self.len += 1;
        true
    }

    /// The next datagram, one lane at a time.
    pub fn pop(&mut self) -> Option<Bytes> {
        while let Some(ch) = self.ring.pop_front() {
            let Some(q) = self.queues.get_mut(&ch) else {
                continue;
            };
            let Some(d) = q.pop_front() else {
                continue;
            };
            self.len -= 1;
            if q.is_empty() {
                self.queues.remove(&ch);
            } else {
                self.ring.push_back(ch);
            }
            return Some(d);
        }
        None
    }

    /// Datagrams queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_waits_its_turn() {
        let mut l = Lanes::default();
        let mut dropped = 0;
        for i in 0..LANE_PACKETS + 50 {
            if !l.push(1, Bytes::from(vec![i as u8])) {
                dropped += 1;
            }
        }
        assert_eq!(dropped, 50, "the flood loses its own datagrams");
        assert!(l.push(2, Bytes::from_static(b"ping")));
        // The ping goes out second, not after the flood's whole lane.
        assert_eq!(l.pop().as_deref(), Some(&[0u8][..]));
        assert_eq!(l.pop().as_deref(), Some(&b"ping"[..]));
        let mut n = 0;
        while l.pop().is_some() {
            n += 1;
        }
        assert_eq!(n, LANE_PACKETS - 1);
        assert!(l.is_empty() && l.queues.is_empty() && l.ring.is_empty());
    }

    #[test]
    fn the_peer_total_is_capped() {
        let mut l = Lanes::default();
        let mut ok = 0;
        for ch in 0..(PEER_PACKETS / LANE_PACKETS + 2) as u32 {
            for _ in 0..LANE_PACKETS {
                ok += usize::from(l.push(ch, Bytes::from_static(b"x")));
            }
        }
        assert_eq!(ok, PEER_PACKETS);
        assert_eq!(l.len(), PEER_PACKETS);
    }
}
