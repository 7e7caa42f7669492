//! The agent's memory of the TCP connections that run through one inner connection, pure.
//!
//! A connector keeps its TCP state per inner connection: when that connection ends (the
//! connector restarted, or the tunnel died), every TCP connection it carried is gone on the
//! connector's side. The user's kernel does not know; a client that is only reading, or idle,
//! would wait for its own timeout (minutes) because it sends nothing the new connector could
//! answer with a reset. So the agent remembers, for each TCP connection it has seen answered
//! through the link, the sequence number the client expects next (the server's last sequence
//! number plus what that segment used), and when the inner connection is replaced or lost it
//! hands the platform one RST per connection, as the server would have sent.
//!
//! The sequence number is learnt from the server's segments only (the agent's send path stays
//! untouched). When it is not exactly the client's next expected number (a segment was lost or
//! reordered), the client's kernel answers the reset with a challenge ACK (RFC 5961), which
//! reaches the new connector as a segment of an unknown connection and gets the connector's own
//! reset with the exact number.
//!
//! The table is bounded: past `capacity` connections, idle entries are pruned and, if none is,
//! the new connection is not tracked and counted (it still gets the connector's reset on its
//! next segment).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use etherparse::PacketBuilder;

const TCP: u8 = 6;
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;

/// A TCP connection as seen from the server: service address and port, the client's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    server: Ipv4Addr,
    server_port: u16,
    client_port: u16,
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    /// The sequence number the client expects next from the server.
    next_seq: u32,
    last_seen: Instant,
}

/// The TCP connections answered through one inner connection.
#[derive(Debug)]
pub struct TcpFlows {
    flows: HashMap<FlowKey, Flow>,
    capacity: usize,
    /// Entries idle this long may be pruned when the table is full.
    idle: Duration,
    /// When the table was last pruned (at most once per `PRUNE_EVERY`).
    pruned: Option<Instant>,
    untracked: u64,
}

/// How often a full table may be scanned for idle entries.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

impl TcpFlows {
    /// An empty table for at most `capacity` connections; entries idle for `idle` make room
    /// for new ones.
    pub fn new(capacity: usize, idle: Duration) -> Self {
        TcpFlows {
            flows: HashMap::new(),
            capacity,
            idle,
            pruned: None,
            untracked: 0,
        }
    }

    /// Notes one packet from the connector (already through the inbound check). Anything but
    /// a well-formed, unfragmented IPv4 TCP segment is ignored.
    pub fn observe(&mut self, packet: &[u8], now: Instant) {
        let Some(seg) = Segment::parse(packet) else {
            return;
        };
        let key = FlowKey {
            server: seg.src,
            server_port: seg.src_port,
            client_port: seg.dst_port,
        };
        if seg.flags & RST != 0 {
            self.flows.remove(&key);
            return;
        }
        let used = seg.payload + u32::from(seg.flags & SYN != 0) + u32::from(seg.flags & FIN != 0);
        let end = seg.seq.wrapping_add(used);
        if let Some(f) = self.flows.get_mut(&key) {
            // Keep the highest (in sequence space): a retransmitted older segment must not
            // move it back.
            if (end.wrapping_sub(f.next_seq) as i32) > 0 {
                f.next_seq = end;
            }
            f.last_seen = now;
            return;
        }
        if self.flows.len() >= self.capacity && !self.prune(now) {
            self.untracked += 1;
            return;
        }
        self.flows.insert(
            key,
            Flow {
                next_seq: end,
                last_seen: now,
            },
        );
    }

    /// Removes entries idle for the configured time; whether there is room now.
    fn prune(&mut self, now: Instant) -> bool {
        if self
            .pruned
            .is_some_and(|at| now.saturating_duration_since(at) < PRUNE_EVERY)
        {
            return false;
        }
        self.pruned = Some(now);
        let idle = self.idle;
        self.flows
            .retain(|_, f| now.saturating_duration_since(f.last_seen) < idle);
        self.flows.len() < self.capacity
    }

    /// The number of connections tracked.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether no connection is tracked.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// New connections that found the table full.
    pub fn untracked(&self) -> u64 {
        self.untracked
    }

    /// Forgets every connection.
    pub fn clear(&mut self) {
        self.flows.clear();
    }

    /// Forgets every connection and returns one reset per connection, from the server to the
    /// client at `client` (the agent's tunnel IP), to hand to the platform's tunnel device.
    pub fn take_resets(&mut self, client: Ipv4Addr) -> Vec<Vec<u8>> {
        self.flows
            .drain()
            .filter_map(|(k, f)| reset(k.server, k.server_port, client, k.client_port, f.next_seq))
            .collect()
    }
}

/// The fields of a server's TCP segment the table needs.
struct Segment {
    src: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
    seq: u32,
    flags: u8,
    payload: u32,
}

impl Segment {
    fn parse(packet: &[u8]) -> Option<Segment> {
        let ip = etherparse::Ipv4HeaderSlice::from_slice(packet).ok()?;
        if ip.protocol().0 != TCP || ip.is_fragmenting_payload() {
            return None;
        }
        let total = usize::from(ip.total_len()).min(packet.len());
        let body = packet.get(ip.slice().len()..total)?;
        let tcp = etherparse::TcpHeaderSlice::from_slice(body).ok()?;
        let flags = body[13];
        Some(Segment {
            src: ip.source_addr(),
            src_port: tcp.source_port(),
            dst_port: tcp.destination_port(),
            seq: tcp.sequence_number(),
            flags,
            payload: u32::try_from(body.len() - tcp.slice().len()).ok()?,
        })
    }
}

/// A bare RST (no ACK) from `src:sport` to `dst:dport` with sequence number `seq`.
fn reset(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, seq: u32) -> Option<Vec<u8>> {
    let builder = PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, seq, 0)
        .rst();
    let mut out = Vec::with_capacity(builder.size(0));
    builder.write(&mut out, &[]).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 4);
    const CLIENT: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

    fn segment(sport: u16, dport: u16, seq: u32, flags: u8, payload: usize) -> Vec<u8> {
        let b =
            PacketBuilder::ipv4(SERVER.octets(), CLIENT.octets(), 64).tcp(sport, dport, seq, 1000);
        let b = if flags & SYN != 0 { b.syn() } else { b };
        let b = if flags & FIN != 0 { b.fin() } else { b };
        let b = if flags & RST != 0 { b.rst() } else { b };
        let b = b.ack(1);
        let data = vec![0xab; payload];
        let mut out = Vec::new();
        b.write(&mut out, &data).unwrap();
        out
    }

    fn parse_reset(p: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16, u32, bool, bool) {
        let s = etherparse::SlicedPacket::from_ip(p).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = s.net else {
            panic!("not IPv4")
        };
        let Some(etherparse::TransportSlice::Tcp(t)) = s.transport else {
            panic!("not TCP")
        };
        // The checksum is right: the client's kernel would drop the reset otherwise.
        let h = t.to_header();
        let checksum = h
            .calc_checksum_ipv4(&ip.header().to_header(), t.payload())
            .unwrap();
        assert_eq!(checksum, h.checksum);
        (
            ip.header().source_addr(),
            t.source_port(),
            ip.header().destination_addr(),
            t.destination_port(),
            t.sequence_number(),
            t.rst(),
            t.ack(),
        )
    }

    #[test]
    fn a_reset_carries_the_sequence_number_the_client_expects() {
        let t0 = Instant::now();
        let mut f = TcpFlows::new(16, Duration::from_secs(60));
        f.observe(&segment(80, 40000, 1000, SYN, 0), t0); // SYN-ACK: ISN 1000
        f.observe(&segment(80, 40000, 1001, 0, 500), t0);
        f.observe(&segment(80, 40000, 1501, 0, 700), t0);
        // A retransmission of an older segment does not move it back.
        f.observe(&segment(80, 40000, 1001, 0, 500), t0);
        f.observe(&segment(443, 40001, 7, FIN, 3), t0);
        let mut resets: Vec<_> = f
            .take_resets(CLIENT)
            .iter()
            .map(|p| parse_reset(p))
            .collect();
        resets.sort_by_key(|r| r.1);
        assert_eq!(
            resets,
            vec![
                (SERVER, 80, CLIENT, 40000, 2201, true, false),
                (SERVER, 443, CLIENT, 40001, 11, true, false),
            ]
        );
        assert!(f.is_empty(), "taking the resets forgets the connections");
        assert!(f.take_resets(CLIENT).is_empty());
    }

    #[test]
    fn sequence_numbers_wrap() {
        let t0 = Instant::now();
        let mut f = TcpFlows::new(16, Duration::from_secs(60));
        f.observe(&segment(80, 40000, u32::MAX - 99, 0, 100), t0);
        f.observe(&segment(80, 40000, 0, 0, 50), t0);
        f.observe(&segment(80, 40000, u32::MAX - 99, 0, 100), t0);
        let r = f.take_resets(CLIENT);
        assert_eq!(parse_reset(&r[0]).4, 50);
    }

    #[test]
    fn a_server_reset_ends_tracking_and_other_packets_are_ignored() {
        let t0 = Instant::now();
        let mut f = TcpFlows::new(16, Duration::from_secs(60));
        f.observe(&segment(80, 40000, 1, 0, 10), t0);
        f.observe(&segment(80, 40000, 11, RST, 0), t0);
        assert!(f.is_empty());
        // Not TCP, truncated, garbage: ignored, never a panic.
        let mut udp = Vec::new();
        PacketBuilder::ipv4(SERVER.octets(), CLIENT.octets(), 64)
            .udp(53, 40000)
            .write(&mut udp, &[1, 2, 3])
            .unwrap();
        f.observe(&udp, t0);
        let seg = segment(80, 40000, 1, 0, 10);
        f.observe(&seg[..30], t0);
        f.observe(&[], t0);
        f.observe(&[0x45; 60], t0);
        assert!(f.is_empty());
    }

    #[test]
    fn a_full_table_prunes_idle_connections_and_counts_the_rest() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(60);
        let mut f = TcpFlows::new(2, idle);
        f.observe(&segment(80, 1, 1, 0, 1), t0);
        f.observe(&segment(80, 2, 1, 0, 1), t0 + Duration::from_secs(30));
        // Full, nothing idle yet: the third is not tracked.
        f.observe(&segment(80, 3, 1, 0, 1), t0 + Duration::from_secs(31));
        assert_eq!((f.len(), f.untracked()), (2, 1));
        // The first is idle 61 s later: pruned, the new one fits.
        f.observe(&segment(80, 4, 1, 0, 1), t0 + Duration::from_secs(61));
        assert_eq!((f.len(), f.untracked()), (2, 1));
        let mut ports: Vec<u16> = f
            .take_resets(CLIENT)
            .iter()
            .map(|p| parse_reset(p).3)
            .collect();
        ports.sort();
        assert_eq!(ports, vec![2, 4]);
    }

    proptest! {
        #[test]
        fn any_input_is_safe_and_bounded(packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 0..200)) {
            let t0 = Instant::now();
            let mut f = TcpFlows::new(8, Duration::from_secs(1));
            for (i, mut p) in packets.into_iter().enumerate() {
                // Make many of them parse as IPv4 TCP.
                if p.len() >= 20 && i % 2 == 0 {
                    p[0] = 0x45;
                    p[9] = TCP;
                    p[6] = 0;
                    p[7] = 0;
                    let len = p.len() as u16;
                    p[2..4].copy_from_slice(&len.to_be_bytes());
                }
                f.observe(&p, t0 + Duration::from_millis(i as u64 * 100));
                prop_assert!(f.len() <= 8);
            }
            for r in f.take_resets(CLIENT) {
                let _ = parse_reset(&r);
            }
        }
    }
}
