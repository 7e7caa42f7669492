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
//! The sequence number is learnt from the server's segments, which is not always the number the
//! client's kernel expects: a segment observed here may still have been lost on the way to the
//! kernel (a full queue to the tunnel device) or dropped by it (beyond a zero receive window).
//! A reset whose number is not exactly the expected one is answered with a challenge ACK when it
//! is inside the window (RFC 5961) and silently dropped when it is not. So each reset goes out
//! with a probe, a bare ACK a gigabyte behind the window, which the kernel always answers with
//! an ACK carrying the number it expects; and for [`RESET_MEMORY`] after the resets the agent
//! answers every segment the client sends on such a connection (that ACK, a window update,
//! data) with a reset numbered from the segment's acknowledgement number, which is exact
//! (RFC 9293 3.10.7.1), instead of sending it on. No connector has to be up for it.
//!
//! The table is bounded: past `capacity` connections, idle entries are pruned and, if none is,
//! the new connection is not tracked and counted (it still gets the connector's reset on its
//! next segment).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use etherparse::PacketBuilder;
use ztna_proto::service::tunnel_ipv6;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// How long the agent answers a reset connection's segments itself.
pub const RESET_MEMORY: Duration = Duration::from_secs(10);

/// How far behind the expected sequence number the probe sent with a reset lies: outside any
/// receive window (at most 1 GiB), so the client's kernel answers it with an ACK.
const PROBE_BEHIND: u32 = 1 << 30;

/// A TCP connection as seen from the server: service address and port, the client's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    server: IpAddr,
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
    /// Connections reset by [`TcpFlows::take_resets`], and until when the agent answers their
    /// segments itself (bounded by `capacity`).
    reset: HashMap<FlowKey, Instant>,
    /// The latest of those times: past it, all of them are forgotten at once.
    reset_until: Option<Instant>,
}

/// What to do with a segment the client sends.
#[derive(Debug, PartialEq, Eq)]
pub enum Outbound {
    /// Not a connection the agent reset: send it on.
    Pass,
    /// A reset connection: drop it, and hand the platform this reset.
    Reset(Vec<u8>),
    /// A reset connection's own reset: drop it.
    Drop,
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
            reset: HashMap::new(),
            reset_until: None,
        }
    }

    /// Notes one packet from the connector (already through the inbound check). Anything but
    /// a well-formed, unfragmented IPv4 TCP segment, or an IPv6 one without extension headers,
    /// is ignored.
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
        self.reset.clear();
    }

    /// Forgets every connection and returns, per connection, a reset from the server to the
    /// client at `client` (the agent's tunnel IP, or for an IPv6 connection its IPv6 tunnel
    /// address) and the probe that makes the client's kernel
    /// say which number it expects, to hand to the platform's tunnel device; remembers the
    /// connections for [`RESET_MEMORY`] so that [`TcpFlows::outbound`] can answer them.
    pub fn take_resets(&mut self, client: Ipv4Addr, now: Instant) -> Vec<Vec<u8>> {
        let until = now + RESET_MEMORY;
        self.reset.retain(|_, u| *u > now);
        self.reset_until = Some(until);
        let mut out = Vec::with_capacity(self.flows.len() * 2);
        let client6 = IpAddr::V6(tunnel_ipv6(client));
        for (k, f) in self.flows.drain() {
            if self.reset.len() < self.capacity || self.reset.contains_key(&k) {
                self.reset.insert(k, until);
            }
            let (src, sport, dport) = (k.server, k.server_port, k.client_port);
            let client = match src {
                IpAddr::V4(_) => IpAddr::V4(client),
                IpAddr::V6(_) => client6,
            };
            out.extend(segment(src, sport, client, dport, f.next_seq, RST, 0));
            let behind = f.next_seq.wrapping_sub(PROBE_BEHIND);
            out.extend(segment(src, sport, client, dport, behind, ACK, 0));
        }
        out
    }

    /// Whether some connection was reset less than [`RESET_MEMORY`] ago (a cheap check before
    /// [`TcpFlows::outbound`]; may say yes for entries that have just expired).
    pub fn resetting(&self) -> bool {
        !self.reset.is_empty()
    }

    /// Looks at a packet the client sends towards the connector: a segment of a connection the
    /// agent reset is answered here, with a reset numbered from its acknowledgement number.
    /// A new connection (SYN) on the same ports ends the memory of the old one.
    pub fn outbound(&mut self, packet: &[u8], now: Instant) -> Outbound {
        if self.reset.is_empty() {
            return Outbound::Pass;
        }
        if self.reset_until.is_some_and(|u| u <= now) {
            self.reset.clear();
            return Outbound::Pass;
        }
        let Some(seg) = Segment::parse(packet) else {
            return Outbound::Pass;
        };
        let key = FlowKey {
            server: seg.dst,
            server_port: seg.dst_port,
            client_port: seg.src_port,
        };
        match self.reset.get(&key) {
            None => return Outbound::Pass,
            Some(until) if *until <= now => {
                self.reset.remove(&key);
                return Outbound::Pass;
            }
            Some(_) => {}
        }
        if seg.flags & SYN != 0 {
            self.reset.remove(&key);
            return Outbound::Pass;
        }
        if seg.flags & RST != 0 {
            return Outbound::Drop;
        }
        let answer = reset_answer(&seg);
        answer.map_or(Outbound::Drop, Outbound::Reset)
    }
}

/// The reset that answers `seg` (RFC 9293 3.10.7.1), from its destination to its source: to a
/// segment with ACK, `<SEQ=SEG.ACK><CTL=RST>`; without, `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`,
/// where SEG.LEN counts SYN and FIN. `None` for a reset (never answered) and for a segment whose
/// addresses are of two families.
pub(crate) fn reset_answer(seg: &Segment) -> Option<Vec<u8>> {
    if seg.flags & RST != 0 {
        return None;
    }
    let (seq, flags, ack) = if seg.flags & ACK != 0 {
        (seg.ack, RST, 0)
    } else {
        let len = seg
            .payload
            .wrapping_add(u32::from(seg.flags & SYN != 0))
            .wrapping_add(u32::from(seg.flags & FIN != 0));
        (0, RST | ACK, seg.seq.wrapping_add(len))
    };
    segment(
        seg.dst,
        seg.dst_port,
        seg.src,
        seg.src_port,
        seq,
        flags,
        ack,
    )
}

/// The fields of a TCP segment the table needs.
pub(crate) struct Segment {
    src: IpAddr,
    dst: IpAddr,
    src_port: u16,
    dst_port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: u32,
}

impl Segment {
    fn parse(packet: &[u8]) -> Option<Segment> {
        let (src, dst, body) = crate::tcp_carriage::tcp_body(packet)?;
        Segment::of(src, dst, body)
    }

    /// The segment `body` (a TCP header and its payload) from `src` to `dst`.
    pub(crate) fn of(src: IpAddr, dst: IpAddr, body: &[u8]) -> Option<Segment> {
        let tcp = etherparse::TcpHeaderSlice::from_slice(body).ok()?;
        let flags = body[13];
        Some(Segment {
            src,
            dst,
            src_port: tcp.source_port(),
            dst_port: tcp.destination_port(),
            seq: tcp.sequence_number(),
            ack: tcp.acknowledgment_number(),
            flags,
            payload: u32::try_from(body.len() - tcp.slice().len()).ok()?,
        })
    }
}

/// An empty segment from `src:sport` to `dst:dport` with sequence number `seq` and `flags`
/// (RST and/or ACK; `ack` is used with ACK). `None` if the addresses are of two families.
fn segment(
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    seq: u32,
    flags: u8,
    ack: u32,
) -> Option<Vec<u8>> {
    let ip = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
        _ => return None,
    };
    // Window 0: nothing in it invites the client to send more.
    let builder = ip.tcp(sport, dport, seq, 0);
    let builder = if flags & RST != 0 {
        builder.rst()
    } else {
        builder
    };
    let builder = if flags & ACK != 0 {
        builder.ack(ack)
    } else {
        builder
    };
    let mut out = Vec::with_capacity(builder.size(0));
    builder.write(&mut out, &[]).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::outbound::TCP;

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

    /// The resets among what `take_resets` returns (the rest are probes).
    fn resets_only(f: &mut TcpFlows, now: Instant) -> Vec<Vec<u8>> {
        let all = f.take_resets(CLIENT, now);
        let (resets, probes): (Vec<_>, Vec<_>) = all.into_iter().partition(|p| parse_reset(p).5);
        assert_eq!(resets.len(), probes.len(), "one probe per reset");
        resets
    }

    /// A segment from the client to the server.
    fn client_segment(sport: u16, dport: u16, seq: u32, flags: u8, ack: u32) -> Vec<u8> {
        let b =
            PacketBuilder::ipv4(CLIENT.octets(), SERVER.octets(), 64).tcp(sport, dport, seq, 1000);
        let b = if flags & SYN != 0 { b.syn() } else { b };
        let b = if flags & RST != 0 { b.rst() } else { b };
        let b = if flags & ACK != 0 { b.ack(ack) } else { b };
        let mut out = Vec::new();
        b.write(&mut out, &[]).unwrap();
        out
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
        let mut resets: Vec<_> = resets_only(&mut f, t0)
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
        assert!(f.take_resets(CLIENT, t0).is_empty());
    }

    #[test]
    fn sequence_numbers_wrap() {
        let t0 = Instant::now();
        let mut f = TcpFlows::new(16, Duration::from_secs(60));
        f.observe(&segment(80, 40000, u32::MAX - 99, 0, 100), t0);
        f.observe(&segment(80, 40000, 0, 0, 50), t0);
        f.observe(&segment(80, 40000, u32::MAX - 99, 0, 100), t0);
        let r = resets_only(&mut f, t0);
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
        let mut ports: Vec<u16> = resets_only(&mut f, t0 + Duration::from_secs(61))
            .iter()
            .map(|p| parse_reset(p).3)
            .collect();
        ports.sort();
        assert_eq!(ports, vec![2, 4]);
    }

    #[test]
    fn each_reset_has_a_probe_behind_the_window_that_makes_the_client_say_its_number() {
        let t0 = Instant::now();
        let mut f = TcpFlows::new(16, Duration::from_secs(60));
        f.observe(&segment(80, 40000, 5000, 0, 100), t0);
        let all = f.take_resets(CLIENT, t0);
        let probe = all.iter().map(|p| parse_reset(p)).find(|p| !p.5).unwrap();
        assert_eq!(
            probe,
            (
                SERVER,
                80,
                CLIENT,
                40000,
                5100u32.wrapping_sub(1 << 30),
                false,
                true
            )
        );
    }

    #[test]
    fn the_clients_segments_on_a_reset_connection_get_an_exact_reset_for_ten_seconds() {
        let t0 = Instant::now();
        let mut f = TcpFlows::new(16, Duration::from_secs(60));
        // Before any reset, nothing is intercepted.
        assert_eq!(
            f.outbound(&client_segment(40000, 80, 1, ACK, 77), t0),
            Outbound::Pass
        );
        f.observe(&segment(80, 40000, 5000, 0, 100), t0);
        f.observe(&segment(443, 40001, 9, 0, 1), t0);
        let _ = f.take_resets(CLIENT, t0);
        assert!(f.resetting());
        // The kernel expected 5050 (the last 50 bytes never reached it): its ACK says so,
        // and the answer is a reset with exactly that number.
        let t1 = t0 + Duration::from_secs(1);
        let Outbound::Reset(r) = f.outbound(&client_segment(40000, 80, 1, ACK, 5050), t1) else {
            panic!("not answered")
        };
        assert_eq!(
            parse_reset(&r),
            (SERVER, 80, CLIENT, 40000, 5050, true, false)
        );
        // Without ACK: RST+ACK acknowledging the segment.
        let Outbound::Reset(r) = f.outbound(&client_segment(40000, 80, 100, 0, 0), t1) else {
            panic!("not answered")
        };
        assert_eq!(parse_reset(&r), (SERVER, 80, CLIENT, 40000, 0, true, true));
        // The client's own reset is dropped; other connections and other packets pass.
        assert_eq!(
            f.outbound(&client_segment(40000, 80, 1, RST, 0), t1),
            Outbound::Drop
        );
        assert_eq!(
            f.outbound(&client_segment(40002, 80, 1, ACK, 1), t1),
            Outbound::Pass
        );
        assert_eq!(f.outbound(&segment(80, 40000, 1, 0, 0), t1), Outbound::Pass);
        assert_eq!(f.outbound(&[0x45; 10], t1), Outbound::Pass);
        // A new connection on the same ports is not the old one.
        assert_eq!(
            f.outbound(&client_segment(40001, 443, 1, SYN, 0), t1),
            Outbound::Pass
        );
        assert_eq!(
            f.outbound(&client_segment(40001, 443, 2, ACK, 3), t1),
            Outbound::Pass
        );
        // Ten seconds later the agent has forgotten.
        let t2 = t0 + RESET_MEMORY;
        assert_eq!(
            f.outbound(&client_segment(40000, 80, 1, ACK, 5050), t2),
            Outbound::Pass
        );
        assert!(!f.resetting());
    }

    #[test]
    fn ipv6_connections_are_reset_to_the_agents_ipv6_address() {
        use std::net::Ipv6Addr;
        let server: Ipv6Addr = "fd00:9::1".parse().unwrap();
        let client = tunnel_ipv6(CLIENT);
        let seg6 = |src: Ipv6Addr,
                    dst: Ipv6Addr,
                    sport: u16,
                    dport: u16,
                    seq: u32,
                    ack: u32,
                    payload: usize| {
            let mut out = Vec::new();
            PacketBuilder::ipv6(src.octets(), dst.octets(), 64)
                .tcp(sport, dport, seq, 1000)
                .ack(ack)
                .write(&mut out, &vec![0xab; payload])
                .unwrap();
            out
        };
        let t0 = Instant::now();
        let mut f = TcpFlows::new(16, Duration::from_secs(60));
        f.observe(&seg6(server, client, 80, 40000, 9000, 1, 100), t0);
        // An IPv6 segment is not mistaken for IPv4, nor IPv4 for IPv6: one connection each.
        f.observe(&segment(80, 40000, 5000, 0, 10), t0);
        assert_eq!(f.len(), 2);
        let all = f.take_resets(CLIENT, t0);
        assert_eq!(all.len(), 4);
        let v6: Vec<_> = all.iter().filter(|p| p[0] >> 4 == 6).collect();
        assert_eq!(v6.len(), 2);
        let s = etherparse::SlicedPacket::from_ip(v6[0]).unwrap();
        let Some(etherparse::NetSlice::Ipv6(ip)) = s.net else {
            panic!("not IPv6")
        };
        let Some(etherparse::TransportSlice::Tcp(t)) = s.transport else {
            panic!("not TCP")
        };
        assert_eq!(ip.header().source_addr(), server);
        assert_eq!(ip.header().destination_addr(), client);
        assert_eq!((t.source_port(), t.destination_port()), (80, 40000));
        assert!(t.rst());
        assert_eq!(t.sequence_number(), 9100);
        let h = t.to_header();
        assert_eq!(
            h.calc_checksum_ipv6(&ip.header().to_header(), t.payload())
                .unwrap(),
            h.checksum
        );
        // The client's next segment on it is answered with an exact IPv6 reset.
        let Outbound::Reset(r) = f.outbound(&seg6(client, server, 40000, 80, 1, 9050, 0), t0)
        else {
            panic!("not answered")
        };
        assert_eq!(r[0] >> 4, 6);
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
            let t1 = t0 + Duration::from_secs(30);
            let n = f.len();
            prop_assert_eq!(f.take_resets(CLIENT, t1).len(), 2 * n);
            prop_assert!(f.reset.len() <= 8);
            let mut p = client_segment(1, 2, 3, ACK, 4);
            p.truncate(30);
            let _ = f.outbound(&p, t1);
        }
    }
}
