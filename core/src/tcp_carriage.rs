//! The reliable carriage of the connector's TCP segments to the agent: two unidirectional QUIC
//! streams per inner connection, opened by the connector (one for sparse flows, sent first, one
//! for bulk flows; `docs/architecture.md`, "Sparse and bulk streams"), carrying IP packets each
//! behind a two-byte big-endian length.
//!
//! Why: the connector terminates the agents' TCP in its userspace stack (smoltcp), whose sender
//! recovers from loss poorly (one retransmission per three duplicate ACKs, no SACK scoreboard,
//! a 1 s minimum RTO). Every datagram lost between the connector and the agent (on the path, in
//! a relay lane, in a socket buffer) stalled a download for a second; 1 % loss cut a download
//! to about 2 Mbit/s where the same path carries 300. On the stream, quinn repairs every loss
//! within about one RTT, under the tunnel's controller (which does not back off on random
//! loss): the agent's TCP sees a delay instead of a loss, the connector's TCP sees neither.
//! Uploads stay on datagrams (the agent's kernel TCP recovers well, and the connector's stack
//! receives with SACK), and so do UDP and ICMP.
//!
//! Pure ACKs (no data, no SYN, FIN or RST) stay datagrams too ([`Segment::is_pure_ack`]): TCP
//! tolerates a lost ACK (the next one acknowledges as much), while on the ordered stream one lost
//! packet holds every later ACK back for an RTT, which stalls an upload's sender under random
//! loss in the direction of the ACKs. Except the pure ACK that opens a window its connection had
//! closed: lost, it would leave the agent's sender waiting for its persist timer, so the
//! connector sends it on the carriage (it keeps which connections advertised a closed window).
//!
//! This module is the pure framing ([`frame_header`], [`FrameReader`]); the connector writes,
//! the agent reads.

use std::net::IpAddr;

use bytes::{Buf, Bytes, BytesMut};

/// Length of the frame header.
pub const HEADER_LEN: usize = 2;

/// Shortest packet a frame may carry (an IPv4 header).
pub const MIN_PACKET: usize = 20;

/// The header in front of `packet`, or `None` if it cannot be framed (empty or over 65535
/// bytes).
pub fn frame_header(packet: &[u8]) -> Option<[u8; HEADER_LEN]> {
    let len = u16::try_from(packet.len()).ok().filter(|&l| l > 0)?;
    Some(len.to_be_bytes())
}

/// The TCP segment an IP packet carries: its source, its destination, and the TCP header with
/// its payload (cut to the IP length). `None` unless it is an unfragmented IPv4 TCP packet or
/// an IPv6 one whose fixed header is followed by TCP (no extension headers).
pub fn tcp_body(packet: &[u8]) -> Option<(IpAddr, IpAddr, &[u8])> {
    match packet.first()? >> 4 {
        4 => {
            let ip = etherparse::Ipv4HeaderSlice::from_slice(packet).ok()?;
            if ip.protocol() != etherparse::IpNumber::TCP || ip.is_fragmenting_payload() {
                return None;
            }
            let total = usize::from(ip.total_len()).min(packet.len());
            let body = packet.get(ip.slice().len()..total)?;
            Some((ip.source_addr().into(), ip.destination_addr().into(), body))
        }
        6 => {
            let ip = etherparse::Ipv6HeaderSlice::from_slice(packet).ok()?;
            if ip.next_header() != etherparse::IpNumber::TCP {
                return None;
            }
            let total = usize::from(ip.payload_length()) + ip.slice().len();
            let body = packet.get(ip.slice().len()..total.min(packet.len()))?;
            Some((ip.source_addr().into(), ip.destination_addr().into(), body))
        }
        _ => None,
    }
}

/// A TCP segment from the connector's stack as the carriage tells segments apart.
#[derive(Debug)]
pub struct Segment<'a> {
    /// Its source (the service's address).
    pub source: IpAddr,
    /// Its TCP header (ports, flags, the raw window: 0 is a closed window whatever the scale).
    pub tcp: etherparse::TcpHeaderSlice<'a>,
    /// Bytes of payload.
    pub payload_len: usize,
}

impl Segment<'_> {
    /// The segment of an unfragmented IPv4 TCP packet or of an IPv6 one without extension
    /// headers ([`tcp_body`]) with a valid TCP header.
    pub fn parse(packet: &[u8]) -> Option<Segment<'_>> {
        let (source, _, body) = tcp_body(packet)?;
        let tcp = etherparse::TcpHeaderSlice::from_slice(body).ok()?;
        let payload_len = body.len() - tcp.slice().len();
        Some(Segment {
            source,
            tcp,
            payload_len,
        })
    }

    /// Whether it is a pure ACK (ACK set, no SYN, FIN or RST, no payload), which goes as a
    /// datagram (see the module documentation); everything else, and anything that does not
    /// parse, needs the reliable carriage.
    pub fn is_pure_ack(&self) -> bool {
        let t = &self.tcp;
        self.payload_len == 0 && t.ack() && !t.syn() && !t.fin() && !t.rst()
    }
}

/// A frame that can't be a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a TCP carriage frame of {0} bytes is shorter than an IPv4 header")]
pub struct ShortFrame(pub usize);

/// Splits a stream's bytes, arriving in chunks of any size, into packets. Holds at most one
/// incomplete frame (at most 65 537 bytes) between chunks.
#[derive(Debug, Default)]
pub struct FrameReader {
    acc: BytesMut,
}

impl FrameReader {
    /// A reader with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a chunk read from the stream.
    pub fn push(&mut self, chunk: &[u8]) {
        self.acc.extend_from_slice(chunk);
    }

    /// The next complete packet, if one is buffered. A frame too short to be a packet is
    /// consumed and reported (the caller counts it and goes on).
    pub fn next_packet(&mut self) -> Option<Result<Bytes, ShortFrame>> {
        if self.acc.len() < HEADER_LEN {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([self.acc[0], self.acc[1]]));
        if self.acc.len() < HEADER_LEN + len {
            return None;
        }
        self.acc.advance(HEADER_LEN);
        let packet = self.acc.split_to(len).freeze();
        Some(if len < MIN_PACKET {
            Err(ShortFrame(len))
        } else {
            Ok(packet)
        })
    }

    /// Bytes buffered (an incomplete frame).
    pub fn buffered(&self) -> usize {
        self.acc.len()
    }
}

#[cfg(test)]
mod tests {
    /// Whether the connector sends `packet` on the carriage (anything but a pure ACK).
    fn needs_carriage(packet: &[u8]) -> bool {
        !Segment::parse(packet).is_some_and(|s| s.is_pure_ack())
    }

    #[test]
    fn only_pure_acks_skip_the_carriage() {
        let seg = |data: &[u8],
                   f: &dyn Fn(
            etherparse::PacketBuilderStep<etherparse::TcpHeader>,
        ) -> etherparse::PacketBuilderStep<etherparse::TcpHeader>| {
            let b = etherparse::PacketBuilder::ipv4([10, 100, 0, 4], [100, 64, 0, 2], 64)
                .tcp(80, 40000, 1, 1000);
            let b = f(b);
            let mut out = Vec::new();
            b.write(&mut out, data).unwrap();
            out
        };
        assert!(!needs_carriage(&seg(&[], &|b| b.ack(5))));
        assert!(needs_carriage(&seg(b"data", &|b| b.ack(5))));
        assert!(needs_carriage(&seg(&[], &|b| b.ack(5).fin())));
        assert!(needs_carriage(&seg(&[], &|b| b.syn().ack(5))));
        assert!(needs_carriage(&seg(&[], &|b| b.rst())));
        // Without ACK (not a pure ACK), truncated or not TCP: the carriage.
        assert!(needs_carriage(&seg(&[], &|b| b)));
        assert!(needs_carriage(&seg(&[], &|b| b.ack(5))[..30]));
        assert!(needs_carriage(&[0x45; 10]));
        // The window field, raw (the builder's window is 1000), and the source.
        let ack = seg(&[], &|b| b.ack(5));
        let parsed = Segment::parse(&ack).unwrap();
        assert_eq!(parsed.tcp.window_size(), 1000);
        assert_eq!(parsed.source, IpAddr::from([10, 100, 0, 4]));
        assert!(Segment::parse(&ack[..39]).is_none());
        let mut udp = Vec::new();
        etherparse::PacketBuilder::ipv4([1, 1, 1, 1], [2, 2, 2, 2], 64)
            .udp(1, 2)
            .write(&mut udp, &[])
            .unwrap();
        assert!(needs_carriage(&udp));
        // IPv6: the same, and an IPv6 segment is not read as IPv4.
        let seg6 = |data: &[u8], fin: bool| {
            let b = etherparse::PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64)
                .tcp(80, 40000, 1, 1000)
                .ack(5);
            let b = if fin { b.fin() } else { b };
            let mut out = Vec::new();
            b.write(&mut out, data).unwrap();
            out
        };
        assert!(!needs_carriage(&seg6(&[], false)));
        assert!(needs_carriage(&seg6(b"data", false)));
        assert!(needs_carriage(&seg6(&[], true)));
        assert!(needs_carriage(&seg6(&[], false)[..50]));
        assert!(needs_carriage(&[0x60; 10]));
    }

    use super::*;
    use proptest::prelude::*;

    fn framed(packets: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in packets {
            out.extend_from_slice(&frame_header(p).expect("frameable"));
            out.extend_from_slice(p);
        }
        out
    }

    #[test]
    fn headers_bound_the_length() {
        assert_eq!(frame_header(&[0u8; 1280]), Some([0x05, 0x00]));
        assert_eq!(frame_header(&[0u8; 65535]), Some([0xff, 0xff]));
        assert_eq!(frame_header(&[0u8; 65536]), None);
        assert_eq!(frame_header(&[]), None);
    }

    #[test]
    fn short_frames_are_reported_and_skipped() {
        let mut r = FrameReader::new();
        r.push(&framed(&[vec![1; 5], vec![2; 40]]));
        assert_eq!(r.next_packet(), Some(Err(ShortFrame(5))));
        assert_eq!(r.next_packet(), Some(Ok(Bytes::from(vec![2; 40]))));
        assert_eq!(r.next_packet(), None);
        assert_eq!(r.buffered(), 0);
    }

    proptest! {
        /// Whatever the chunking, the packets come out whole and in order, and nothing stays
        /// buffered after the last one.
        #[test]
        fn any_chunking_gives_back_the_packets(
            packets in prop::collection::vec(prop::collection::vec(any::<u8>(), 20..1500), 0..20),
            cuts in prop::collection::vec(1usize..3000, 0..40),
        ) {
            let bytes = framed(&packets);
            let mut r = FrameReader::new();
            let mut out = Vec::new();
            let mut at: usize = 0;
            for c in cuts.iter().chain(std::iter::once(&usize::MAX)) {
                let end = at.saturating_add(*c).min(bytes.len());
                r.push(&bytes[at..end]);
                at = end;
                while let Some(p) = r.next_packet() {
                    out.push(p.expect("no short frames").to_vec());
                }
                prop_assert!(r.buffered() <= HEADER_LEN + 65535);
                if at == bytes.len() {
                    break;
                }
            }
            prop_assert_eq!(out, packets);
            prop_assert_eq!(r.buffered(), 0);
        }
    }
}
