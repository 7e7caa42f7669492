//! Pure packet logic of the data plane: checks one IPv4 or IPv6 packet from an agent against
//! the agent's tunnel address and the service catalog and turns it into a typed [`AgentPacket`]
//! or a [`DropReason`], and builds the packets the connector sends back to agents (UDP replies,
//! ICMP / ICMPv6 echo replies, port unreachable, administratively prohibited, TCP resets), in
//! the family of the packet they answer. No I/O, no clock.
//!
//! Parsing uses etherparse's checked slices, so no input can make it panic (property-tested
//! below). Checksums of incoming IPv4 headers, UDP datagrams and ICMP / ICMPv6 messages are
//! verified; agents' kernels always fill them in, so a bad one means corruption or a forged
//! packet. (TCP segments' are not: the TCP stack takes them, `tcp::device_capabilities`.)
//!
//! IPv6: the version nibble decides. An IPv6 packet must come from the agent's IPv6 tunnel
//! address ([`ztna_proto::service::tunnel_ipv6`] of its IPv4 one) and carry UDP, TCP or ICMPv6
//! directly after the fixed header: extension headers are not walked but dropped and counted
//! ([`DropReason::Ipv6Fragment`] for a fragment header, [`DropReason::Ipv6ExtensionHeaders`]
//! for the others), so no chain of headers can cost work or memory. (Real fragments, with the
//! fragment header right after the fixed header, are reassembled before they get here:
//! `reassembly`.)

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use etherparse::checksum::Sum16BitWords;
use etherparse::icmpv4::DestUnreachableHeader;
use etherparse::icmpv6::DestUnreachableCode;
use etherparse::{
    ip_number, Icmpv4Slice, Icmpv4Type, Icmpv6Type, IpNumber, Ipv4HeaderSlice, Ipv6Header,
    Ipv6HeaderSlice, PacketBuilder, TcpHeaderSlice, UdpHeaderSlice,
};
use ztna_proto::service::tunnel_ipv6;
use ztna_proto::ServiceDef;

/// TTL (hop limit) of every packet the connector sends to an agent.
pub(crate) const TTL: u8 = 64;

/// Longest quote an ICMP error carries here: a maximal IPv4 header (60 bytes with options) plus
/// the first 8 bytes of its payload (an IPv6 header and 8 bytes, 48, fit too).
pub(crate) const MAX_QUOTE: usize = 60 + 8;

/// Longest ICMPv6 error the connector builds (RFC 4443 2.4(c): the quote is cut so that the
/// error fits into the IPv6 minimum MTU).
pub(crate) const MIN_MTU6: usize = 1280;

/// ICMP type of an echo request.
const ICMP_ECHO_REQUEST: u8 = 8;
/// ICMPv6 type of an echo request.
const ICMPV6_ECHO_REQUEST: u8 = 128;
/// ICMPv6 type of an echo reply.
const ICMPV6_ECHO_REPLY: u8 = 129;

/// Why a packet from an agent was dropped. Each variant maps to one drop counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DropReason {
    /// The bytes are not a well-formed, unfragmented IPv4 or IPv6 packet with a valid
    /// transport header.
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// The source address is not the agent's tunnel address (of the packet's family).
    #[error("source {claimed} is not the agent's tunnel address")]
    SpoofedSource {
        /// The source address the packet claimed.
        claimed: IpAddr,
    },
    /// The destination is not a registered service address.
    #[error("destination {destination} is not a service address")]
    NoSuchService {
        /// The destination address of the packet.
        destination: IpAddr,
    },
    /// The service does not list this protocol and port.
    #[error("service does not serve {protocol} port {port}")]
    PortNotServed {
        /// "UDP" or "TCP".
        protocol: &'static str,
        /// Destination port.
        port: u16,
    },
    /// The service does not serve this IP protocol at all (ICMP on a service without `icmp`,
    /// or a protocol other than UDP, TCP and ICMP / ICMPv6).
    #[error("service does not serve IP protocol {protocol}")]
    ProtocolNotServed {
        /// IP protocol number (IPv6: next header).
        protocol: u8,
    },
    /// Allowed by the service, but not handled by this data plane (ICMP other than echo).
    #[error("not handled by the connector: {0}")]
    Unsupported(&'static str),
    /// An IPv6 packet with a fragment header that reassembly did not take (an atomic fragment).
    #[error("IPv6 fragment")]
    Ipv6Fragment,
    /// An IPv6 packet with extension headers (other than a fragment header) before its
    /// transport header.
    #[error("IPv6 extension header {next_header}")]
    Ipv6ExtensionHeaders {
        /// The next-header value of the first extension header.
        next_header: u8,
    },
}

/// A packet from an agent that passed every check, ready to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AgentPacket<'a> {
    /// A UDP datagram to a served port.
    Udp(UdpDatagram<'a>),
    /// An ICMP (or ICMPv6) echo request to a service with ICMP enabled.
    Echo(EchoRequest<'a>),
    /// A TCP segment to a served port, for the TCP stack (its checksum is not checked: see
    /// `tcp::device_capabilities`).
    Tcp {
        /// Service address and destination port.
        dst: SocketAddr,
    },
}

/// A UDP datagram from an agent to a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UdpDatagram<'a> {
    /// Agent tunnel address and source port.
    pub(crate) src: SocketAddr,
    /// Service address and destination port.
    pub(crate) dst: SocketAddr,
    /// The datagram's payload.
    pub(crate) payload: &'a [u8],
    /// The IP header (IPv4 with options, or IPv6) and the UDP header: what an ICMP error about
    /// this datagram quotes.
    pub(crate) quote: &'a [u8],
}

/// An ICMP echo request from an agent to a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EchoRequest<'a> {
    /// Agent tunnel address.
    pub(crate) src: IpAddr,
    /// Service address.
    pub(crate) dst: IpAddr,
    /// Echo identifier chosen by the agent.
    pub(crate) ident: u16,
    /// Echo sequence number.
    pub(crate) seq: u16,
    /// Data after the 8-byte ICMP header.
    pub(crate) payload: &'a [u8],
}

/// Checks a packet from the agent whose tunnel address is `agent_ip` (its IPv6 tunnel address
/// is derived from it), looking destination addresses up with `service`.
///
/// Order of checks for IPv4: header (version, lengths, checksum, not a fragment), source
/// address, destination service, protocol and port, transport header and checksum. For IPv6:
/// header and payload length, source address, destination service, no extension headers, then
/// as for IPv4. Bytes past the IP total length are ignored.
pub(crate) fn inspect<'a, 's>(
    packet: &'a [u8],
    agent_ip: Ipv4Addr,
    service: impl FnOnce(IpAddr) -> Option<&'s ServiceDef>,
) -> Result<AgentPacket<'a>, DropReason> {
    use DropReason::*;
    match packet.first() {
        None => return Err(Malformed("empty")),
        Some(b) if b >> 4 == 6 => return inspect6(packet, tunnel_ipv6(agent_ip), service),
        Some(b) if b >> 4 != 4 => return Err(Malformed("not IPv4 or IPv6")),
        Some(_) => {}
    }
    let ip = Ipv4HeaderSlice::from_slice(packet).map_err(|_| Malformed("bad IPv4 header"))?;
    let header = ip.slice();
    let total = usize::from(ip.total_len());
    if total < header.len() || total > packet.len() {
        return Err(Malformed("IPv4 total length does not match"));
    }
    if !sum_is_valid(Sum16BitWords::new().add_slice(header)) {
        return Err(Malformed("bad IPv4 header checksum"));
    }
    if ip.more_fragments() || ip.fragments_offset().value() != 0 {
        return Err(Malformed("fragment"));
    }
    let src = ip.source_addr();
    if src != agent_ip {
        return Err(SpoofedSource {
            claimed: src.into(),
        });
    }
    let dst = ip.destination_addr();
    let svc = service(dst.into()).ok_or(NoSuchService {
        destination: dst.into(),
    })?;
    let body = &packet[header.len()..total];
    let pseudo = Sum16BitWords::new()
        .add_4bytes(ip.source())
        .add_4bytes(ip.destination());
    let quote_len = header.len() + 8;
    match ip.protocol() {
        ip_number::UDP => udp(packet, body, pseudo, quote_len, svc, src.into(), dst.into()),
        ip_number::ICMP => {
            if !svc.icmp {
                return Err(ProtocolNotServed { protocol: 1 });
            }
            let icmp = Icmpv4Slice::from_slice(body).map_err(|_| Malformed("short ICMP header"))?;
            if !sum_is_valid(Sum16BitWords::new().add_slice(body)) {
                return Err(Malformed("bad ICMP checksum"));
            }
            match icmp.icmp_type() {
                Icmpv4Type::EchoRequest(echo) => Ok(AgentPacket::Echo(EchoRequest {
                    src: src.into(),
                    dst: dst.into(),
                    ident: echo.id,
                    seq: echo.seq,
                    payload: icmp.payload(),
                })),
                _ => Err(Unsupported("ICMP other than echo request")),
            }
        }
        ip_number::TCP => tcp(body, svc, dst.into()),
        other => Err(ProtocolNotServed { protocol: other.0 }),
    }
}

/// [`inspect`] for a packet whose version nibble is 6; `agent_ip` is the agent's IPv6 tunnel
/// address.
fn inspect6<'a, 's>(
    packet: &'a [u8],
    agent_ip: Ipv6Addr,
    service: impl FnOnce(IpAddr) -> Option<&'s ServiceDef>,
) -> Result<AgentPacket<'a>, DropReason> {
    use DropReason::*;
    let ip = Ipv6HeaderSlice::from_slice(packet).map_err(|_| Malformed("bad IPv6 header"))?;
    // Payload length 0 is a jumbogram (which needs a hop-by-hop header) or an empty packet.
    let total = Ipv6Header::LEN + usize::from(ip.payload_length());
    if total > packet.len() {
        return Err(Malformed("IPv6 payload length does not match"));
    }
    let src = ip.source_addr();
    if src != agent_ip {
        return Err(SpoofedSource {
            claimed: src.into(),
        });
    }
    let dst = ip.destination_addr();
    let svc = service(dst.into()).ok_or(NoSuchService {
        destination: dst.into(),
    })?;
    let next = ip.next_header();
    if next == ip_number::IPV6_FRAG {
        return Err(Ipv6Fragment);
    }
    if next.is_ipv6_ext_header_value() {
        return Err(Ipv6ExtensionHeaders {
            next_header: next.0,
        });
    }
    let body = &packet[Ipv6Header::LEN..total];
    let mut pseudo = Sum16BitWords::new()
        .add_16bytes(ip.source())
        .add_16bytes(ip.destination());
    match next {
        ip_number::UDP => udp(
            packet,
            body,
            pseudo,
            Ipv6Header::LEN + 8,
            svc,
            src.into(),
            dst.into(),
        ),
        ip_number::IPV6_ICMP => {
            if !svc.icmp {
                return Err(ProtocolNotServed { protocol: 58 });
            }
            if body.len() < 8 {
                return Err(Malformed("short ICMPv6 header"));
            }
            let len = u32::try_from(body.len()).map_err(|_| Malformed("ICMPv6 length"))?;
            let sum = pseudo
                .add_4bytes(len.to_be_bytes())
                .add_4bytes([0, 0, 0, ip_number::IPV6_ICMP.0])
                .add_slice(body);
            if !sum_is_valid(sum) {
                return Err(Malformed("bad ICMPv6 checksum"));
            }
            if body[0] != ICMPV6_ECHO_REQUEST || body[1] != 0 {
                return Err(Unsupported("ICMPv6 other than echo request"));
            }
            Ok(AgentPacket::Echo(EchoRequest {
                src: src.into(),
                dst: dst.into(),
                ident: u16::from_be_bytes([body[4], body[5]]),
                seq: u16::from_be_bytes([body[6], body[7]]),
                payload: &body[8..],
            }))
        }
        ip_number::TCP => tcp(body, svc, dst.into()),
        other => Err(ProtocolNotServed { protocol: other.0 }),
    }
}

/// Checks a UDP datagram (`body`, the IP payload) to `svc`; `pseudo` holds the addresses of
/// the pseudo header, `quote_len` is the IP header length plus 8.
fn udp<'a>(
    packet: &'a [u8],
    body: &'a [u8],
    pseudo: Sum16BitWords,
    quote_len: usize,
    svc: &ServiceDef,
    src: IpAddr,
    dst: IpAddr,
) -> Result<AgentPacket<'a>, DropReason> {
    use DropReason::*;
    let udp = UdpHeaderSlice::from_slice(body).map_err(|_| Malformed("short UDP header"))?;
    if usize::from(udp.length()) != body.len() {
        return Err(Malformed("UDP length does not match the IP length"));
    }
    if udp.source_port() == 0 {
        return Err(Malformed("UDP source port 0"));
    }
    let port = udp.destination_port();
    if !svc.allows_udp(port) {
        return Err(PortNotServed {
            protocol: "UDP",
            port,
        });
    }
    if udp.checksum() == 0 && dst.is_ipv6() {
        // Mandatory over IPv6 (RFC 8200 8.1).
        return Err(Malformed("UDP checksum 0 over IPv6"));
    }
    if udp.checksum() != 0 {
        let sum = pseudo
            .add_2bytes([0, ip_number::UDP.0])
            .add_2bytes(udp.length().to_be_bytes())
            .add_slice(body);
        if !sum_is_valid(sum) {
            return Err(Malformed("bad UDP checksum"));
        }
    }
    Ok(AgentPacket::Udp(UdpDatagram {
        src: SocketAddr::new(src, udp.source_port()),
        dst: SocketAddr::new(dst, port),
        payload: &body[8..],
        quote: &packet[..quote_len],
    }))
}

/// Checks the TCP header (`body`, the IP payload) of a segment to `svc`.
fn tcp<'a>(body: &[u8], svc: &ServiceDef, dst: IpAddr) -> Result<AgentPacket<'a>, DropReason> {
    let tcp =
        TcpHeaderSlice::from_slice(body).map_err(|_| DropReason::Malformed("bad TCP header"))?;
    let port = tcp.destination_port();
    if svc.allows_tcp(port) {
        Ok(AgentPacket::Tcp {
            dst: SocketAddr::new(dst, port),
        })
    } else {
        Err(DropReason::PortNotServed {
            protocol: "TCP",
            port,
        })
    }
}

/// Whether a one's complement sum over data that includes its checksum field is all ones.
fn sum_is_valid(sum: Sum16BitWords) -> bool {
    sum.ones_complement() == 0
}

/// Why the connector could not build a packet for an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BuildError {
    /// The payload does not fit into one IP packet.
    #[error("a payload of {0} bytes does not fit into an IP packet")]
    TooLarge(usize),
    /// Source and destination are of different families.
    #[error("source and destination of different IP families")]
    MixedFamilies,
}

/// Serializes an etherparse packet builder step into a vector of exactly the right size.
fn finish(
    size: usize,
    payload_len: usize,
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), etherparse::err::packet::BuildWriteError>,
) -> Result<Vec<u8>, BuildError> {
    if size > usize::from(u16::MAX) {
        return Err(BuildError::TooLarge(payload_len));
    }
    let mut out = Vec::with_capacity(size);
    write(&mut out).map_err(|_| BuildError::TooLarge(payload_len))?;
    Ok(out)
}

/// The IP layer of a packet from `src` to `dst` with TTL (hop limit) 64: IPv4 without DF (so
/// a reply larger than the tunnel carries can be sent as fragments), or IPv6.
fn ip_builder(
    src: IpAddr,
    dst: IpAddr,
) -> Result<etherparse::PacketBuilderStep<etherparse::IpHeaders>, BuildError> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip =
                etherparse::Ipv4Header::new(0, TTL, ip_number::UDP, s.octets(), d.octets())
                    .map_err(|_| BuildError::TooLarge(0))?;
            ip.dont_fragment = false;
            Ok(PacketBuilder::ip(etherparse::IpHeaders::Ipv4(
                ip,
                Default::default(),
            )))
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => Ok(PacketBuilder::ipv6(s.octets(), d.octets(), TTL)),
        _ => Err(BuildError::MixedFamilies),
    }
}

/// [`build_udp_in`] in a `Vec` of its own (for tests).
#[cfg(test)]
pub(crate) fn build_udp(
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
) -> Result<Vec<u8>, BuildError> {
    let mut arena = ztna_core::arena::PacketArena::with_chunk(0);
    build_udp_in(&mut arena, src, dst, payload).map(|p| p.to_vec())
}

/// Builds the UDP packet carrying a backend's reply to an agent: from `src` (the service
/// address and port) to `dst` (the agent's tunnel address and port), both of one family, TTL
/// 64, with valid IPv4 header and UDP checksums. IPv4 has DF clear, so a reply larger than the
/// tunnel carries can be sent as fragments. The packet is cut from `arena` (no allocation per
/// packet).
pub(crate) fn build_udp_in(
    arena: &mut ztna_core::arena::PacketArena,
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
) -> Result<bytes::Bytes, BuildError> {
    let builder = ip_builder(src.ip(), dst.ip())?.udp(src.port(), dst.port());
    let size = builder.size(payload.len());
    if size > usize::from(u16::MAX) {
        return Err(BuildError::TooLarge(payload.len()));
    }
    let (packet, written) = arena.build(size, |mut out| builder.write(&mut out, payload));
    written.map_err(|_| BuildError::TooLarge(payload.len()))?;
    Ok(packet)
}

/// Builds an ICMP (ICMPv6) echo reply to an agent: from `src` (the service address) to `dst`
/// (the agent's tunnel address), with the agent's identifier, sequence number and data.
pub(crate) fn build_echo_reply(
    src: IpAddr,
    dst: IpAddr,
    ident: u16,
    seq: u16,
    payload: &[u8],
) -> Result<Vec<u8>, BuildError> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let builder =
                PacketBuilder::ipv4(s.octets(), d.octets(), TTL).icmpv4_echo_reply(ident, seq);
            finish(builder.size(payload.len()), payload.len(), |out| {
                builder.write(out, payload)
            })
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let builder =
                PacketBuilder::ipv6(s.octets(), d.octets(), TTL).icmpv6_echo_reply(ident, seq);
            finish(builder.size(payload.len()), payload.len(), |out| {
                builder.write(out, payload)
            })
        }
        _ => Err(BuildError::MixedFamilies),
    }
}

/// Builds an ICMP error from `src` (the service address) to `dst` (the agent's tunnel
/// address) quoting `quote`: IPv4 destination unreachable with `v4`, cut to [`MAX_QUOTE`], or
/// ICMPv6 `v6`, cut so that the message fits into [`MIN_MTU6`].
fn build_icmp_error(
    src: IpAddr,
    dst: IpAddr,
    v4: DestUnreachableHeader,
    v6: Icmpv6Type,
    quote: &[u8],
) -> Result<Vec<u8>, BuildError> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let quote = &quote[..quote.len().min(MAX_QUOTE)];
            let builder = PacketBuilder::ipv4(s.octets(), d.octets(), TTL)
                .icmpv4(Icmpv4Type::DestinationUnreachable(v4));
            finish(builder.size(quote.len()), quote.len(), |out| {
                builder.write(out, quote)
            })
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let quote = &quote[..quote.len().min(MIN_MTU6 - Ipv6Header::LEN - 8)];
            let builder = PacketBuilder::ipv6(s.octets(), d.octets(), TTL).icmpv6(v6);
            finish(builder.size(quote.len()), quote.len(), |out| {
                builder.write(out, quote)
            })
        }
        _ => Err(BuildError::MixedFamilies),
    }
}

/// Builds an ICMP destination unreachable, code 3 (port unreachable), or for IPv6 an ICMPv6
/// destination unreachable, code 4 (port unreachable), from `src` (the service address) to
/// `dst` (the agent's tunnel address), quoting `quote` (the IP header and first 8 payload
/// bytes of the agent's datagram).
pub(crate) fn build_port_unreachable(
    src: IpAddr,
    dst: IpAddr,
    quote: &[u8],
) -> Result<Vec<u8>, BuildError> {
    build_icmp_error(
        src,
        dst,
        DestUnreachableHeader::Port,
        Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port),
        quote,
    )
}

/// Builds an ICMP destination unreachable, code 13 (communication administratively
/// prohibited), or for IPv6 an ICMPv6 destination unreachable, code 1 (communication
/// administratively prohibited), from `src` (the service address) to `dst` (the agent's tunnel
/// address), quoting `quote`: the answer to a protocol or UDP port a service doesn't serve.
pub(crate) fn build_admin_prohibited(
    src: IpAddr,
    dst: IpAddr,
    quote: &[u8],
) -> Result<Vec<u8>, BuildError> {
    build_icmp_error(
        src,
        dst,
        DestUnreachableHeader::FilterProhibited,
        Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Prohibited),
        quote,
    )
}

/// The connection key and flags of a TCP segment from an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TcpSegment {
    /// The agent's port.
    pub(crate) agent_port: u16,
    /// The destination (service) address.
    pub(crate) service: IpAddr,
    /// The destination port.
    pub(crate) port: u16,
    /// SYN is set.
    pub(crate) syn: bool,
    /// ACK is set.
    pub(crate) ack: bool,
    /// RST is set.
    pub(crate) rst: bool,
}

/// Source, destination, protocol (IPv6: the next header after the fixed header), header
/// length and end (the IP length, at most the bytes there are) of an IPv4 or IPv6 packet.
fn ip_header(packet: &[u8]) -> Option<(IpAddr, IpAddr, IpNumber, usize, usize)> {
    match packet.first()? >> 4 {
        4 => {
            let ip = Ipv4HeaderSlice::from_slice(packet).ok()?;
            Some((
                ip.source_addr().into(),
                ip.destination_addr().into(),
                ip.protocol(),
                ip.slice().len(),
                usize::from(ip.total_len()).min(packet.len()),
            ))
        }
        6 => {
            let ip = Ipv6HeaderSlice::from_slice(packet).ok()?;
            Some((
                ip.source_addr().into(),
                ip.destination_addr().into(),
                ip.next_header(),
                Ipv6Header::LEN,
                (Ipv6Header::LEN + usize::from(ip.payload_length())).min(packet.len()),
            ))
        }
        _ => None,
    }
}

/// The addresses and the payload (up to the IP length) of an IPv4 or IPv6 packet whose
/// payload is `protocol` right after the fixed header (IPv6 without extension headers).
fn ip_parts(packet: &[u8], protocol: IpNumber) -> Option<(IpAddr, IpAddr, &[u8])> {
    let (src, dst, proto, header_len, end) = ip_header(packet)?;
    if proto != protocol {
        return None;
    }
    Some((src, dst, packet.get(header_len..end)?))
}

/// Reads the key and flags of an IPv4 or IPv6 TCP segment (no checksum check: `inspect` did
/// that for the packets that reach the TCP stack). `None` if it is not one.
pub(crate) fn parse_tcp_segment(packet: &[u8]) -> Option<TcpSegment> {
    let (_, dst, body) = ip_parts(packet, ip_number::TCP)?;
    let tcp = TcpHeaderSlice::from_slice(body).ok()?;
    Some(TcpSegment {
        agent_port: tcp.source_port(),
        service: dst,
        port: tcp.destination_port(),
        syn: tcp.syn(),
        ack: tcp.ack(),
        rst: tcp.rst(),
    })
}

/// Builds the reset a host sends for a TCP segment that belongs to no connection it has
/// (RFC 9293 3.10.7.1): to a segment with ACK, `<SEQ=SEG.ACK><CTL=RST>`; otherwise
/// `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>` (SYN and FIN count in SEG.LEN), in the family
/// of the segment. `None` for an RST (never answered) or bytes that are not a TCP segment.
pub(crate) fn build_tcp_reset(packet: &[u8]) -> Option<Vec<u8>> {
    let (src, dst, body) = ip_parts(packet, ip_number::TCP)?;
    let tcp = TcpHeaderSlice::from_slice(body).ok()?;
    if tcp.rst() {
        return None;
    }
    let builder = match (dst, src) {
        (IpAddr::V4(d), IpAddr::V4(s)) => PacketBuilder::ipv4(d.octets(), s.octets(), TTL),
        (IpAddr::V6(d), IpAddr::V6(s)) => PacketBuilder::ipv6(d.octets(), s.octets(), TTL),
        _ => return None,
    };
    let builder = if tcp.ack() {
        builder
            .tcp(
                tcp.destination_port(),
                tcp.source_port(),
                tcp.acknowledgment_number(),
                0,
            )
            .rst()
    } else {
        let payload = body.len().saturating_sub(tcp.slice().len());
        let len = u32::try_from(payload)
            .unwrap_or(u32::MAX)
            .wrapping_add(u32::from(tcp.syn()) + u32::from(tcp.fin()));
        builder
            .tcp(tcp.destination_port(), tcp.source_port(), 0, 0)
            .rst()
            .ack(tcp.sequence_number().wrapping_add(len))
    };
    let mut out = Vec::with_capacity(builder.size(0));
    builder.write(&mut out, &[]).ok()?;
    Some(out)
}

/// The answer to a packet refused for `reason`, if it gets one: a TCP reset for a TCP port a
/// service doesn't serve; ICMP (ICMPv6) administratively prohibited (quoting the packet) for a
/// UDP port, or a protocol, it doesn't serve. Nothing for other reasons, for an RST, or for
/// ICMP other than an echo request (never an ICMP error about an ICMP error).
pub(crate) fn unserved_answer(packet: &[u8], reason: &DropReason) -> Option<Vec<u8>> {
    let (src, dst, proto, header_len, end) = ip_header(packet)?;
    // IPv4 quotes the header and 8 bytes; IPv6 the packet (build_admin_prohibited cuts it).
    let (icmp, echo_request, end) = match src {
        IpAddr::V4(_) => (
            ip_number::ICMP,
            ICMP_ECHO_REQUEST,
            (header_len + 8).min(end),
        ),
        IpAddr::V6(_) => (ip_number::IPV6_ICMP, ICMPV6_ECHO_REQUEST, end),
    };
    if proto == icmp && packet.get(header_len).copied() != Some(echo_request) {
        return None;
    }
    let quote = packet.get(..end)?;
    match reason {
        DropReason::PortNotServed {
            protocol: "TCP", ..
        } => build_tcp_reset(packet),
        DropReason::PortNotServed { .. } | DropReason::ProtocolNotServed { .. } => {
            build_admin_prohibited(dst, src, quote).ok()
        }
        _ => None,
    }
}

/// (destination address, destination port, source address, source port) of an IPv4/UDP
/// packet: how a backend's reply finds its flow on the XDP fast path (IPv4 only).
pub(crate) fn reply_key(p: &[u8]) -> Option<(Ipv4Addr, u16, Ipv4Addr, u16)> {
    if p.len() < 28 || p[0] >> 4 != 4 || p[9] != 17 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    if ihl < 20 || total > p.len() || total < ihl + 8 {
        return None;
    }
    let port = |at: usize| u16::from_be_bytes([p[at], p[at + 1]]);
    Some((
        Ipv4Addr::new(p[16], p[17], p[18], p[19]),
        port(ihl + 2),
        Ipv4Addr::new(p[12], p[13], p[14], p[15]),
        port(ihl),
    ))
}

/// Builds the ICMP (with `v6`, ICMPv6) message (no IP header) to write to an unprivileged ICMP
/// socket for an echo request. The kernel replaces the identifier with the socket's own and
/// fills in the checksum.
pub(crate) fn build_echo_request_message(seq: u16, payload: &[u8], v6: bool) -> Vec<u8> {
    let kind = if v6 {
        ICMPV6_ECHO_REQUEST
    } else {
        ICMP_ECHO_REQUEST
    };
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&[kind, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Reads an ICMP (with `v6`, ICMPv6) message received on an unprivileged ICMP socket (no IP
/// header): if it is an echo reply, returns its sequence number and data. The kernel checked
/// the checksum.
pub(crate) fn parse_backend_echo_reply(message: &[u8], v6: bool) -> Option<(u16, &[u8])> {
    if v6 {
        return match message {
            [ICMPV6_ECHO_REPLY, 0, _, _, _, _, s0, s1, data @ ..] => {
                Some((u16::from_be_bytes([*s0, *s1]), data))
            }
            _ => None,
        };
    }
    let icmp = Icmpv4Slice::from_slice(message).ok()?;
    match icmp.icmp_type() {
        Icmpv4Type::EchoReply(echo) => Some((echo.seq, icmp.payload())),
        _ => None,
    }
}

/// A copy of the start of an agent's last datagram on a flow (IPv4 header with options and the
/// first 8 payload bytes), kept so an ICMP error can quote it. Fixed size, no allocation.
#[derive(Clone, Copy)]
pub(crate) struct Quote {
    buf: [u8; MAX_QUOTE],
    len: u8,
}

impl Quote {
    /// A quote of `bytes`, cut to [`MAX_QUOTE`].
    pub(crate) fn new(bytes: &[u8]) -> Self {
        let mut q = Self {
            buf: [0; MAX_QUOTE],
            len: 0,
        };
        q.set(bytes);
        q
    }

    /// Replaces the quote with `bytes`, cut to [`MAX_QUOTE`].
    pub(crate) fn set(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(MAX_QUOTE);
        self.buf[..n].copy_from_slice(&bytes[..n]);
        // n <= 68, so it fits in a u8.
        self.len = n as u8;
    }

    /// The quoted bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for Quote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Quote({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddrV4;

    /// An IPv4 socket address as a `SocketAddr`.
    fn sa4(ip: Ipv4Addr, port: u16) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(ip, port))
    }
    use etherparse::{Ipv4Header, NetSlice, SlicedPacket, TransportSlice, UdpHeader};
    use proptest::prelude::*;
    use ztna_proto::PortRange;

    const AGENT: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
    const SVC: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);

    fn service(icmp: bool) -> ServiceDef {
        ServiceDef {
            name: "dns".into(),
            address: SVC,
            address6: None,
            udp: vec![
                PortRange::single(53),
                PortRange {
                    first: 8000,
                    last: 8010,
                },
            ],
            tcp: vec![PortRange::single(443)],
            icmp,
            connector: String::new(),
            names: None,
        }
    }

    fn check(packet: &[u8], icmp: bool) -> Result<AgentPacket<'_>, DropReason> {
        let svc = service(icmp);
        inspect(packet, AGENT, |a| (a == SVC).then_some(&svc))
    }

    fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv4(src.octets(), dst.octets(), 64).udp(sport, dport);
        let mut v = Vec::new();
        b.write(&mut v, data).expect("build");
        v
    }

    fn tcp_packet(dport: u16) -> Vec<u8> {
        let b = PacketBuilder::ipv4(AGENT.octets(), SVC.octets(), 64).tcp(40000, dport, 1, 1000);
        let mut v = Vec::new();
        b.write(&mut v, b"x").expect("build");
        v
    }

    fn echo_request(ident: u16, seq: u16, data: &[u8]) -> Vec<u8> {
        let b =
            PacketBuilder::ipv4(AGENT.octets(), SVC.octets(), 64).icmpv4_echo_request(ident, seq);
        let mut v = Vec::new();
        b.write(&mut v, data).expect("build");
        v
    }

    /// Re-parses `packet` with etherparse and checks the IPv4 header checksum and TTL.
    fn parse_ok(packet: &[u8]) -> SlicedPacket<'_> {
        let sliced = SlicedPacket::from_ip(packet).expect("reparses");
        let Some(NetSlice::Ipv4(ip)) = &sliced.net else {
            panic!("not IPv4")
        };
        let h = ip.header().to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum(), "IPv4 checksum");
        assert_eq!(h.time_to_live, TTL);
        assert_eq!(usize::from(h.total_len), packet.len());
        sliced
    }

    fn ipv4_header(packet: &[u8]) -> Ipv4Header {
        Ipv4HeaderSlice::from_slice(packet)
            .expect("ipv4")
            .to_header()
    }

    fn assert_udp_checksum(packet: &[u8]) {
        let ip = ipv4_header(packet);
        let udp = UdpHeader::from_slice(&packet[ip.header_len()..])
            .expect("udp")
            .0;
        let payload = &packet[ip.header_len() + 8..];
        assert_ne!(udp.checksum, 0);
        assert_eq!(
            udp.checksum,
            udp.calc_checksum_ipv4(&ip, payload).expect("sum")
        );
    }

    fn assert_icmp_checksum(packet: &[u8]) {
        let ip = ipv4_header(packet);
        let icmp = Icmpv4Slice::from_slice(&packet[ip.header_len()..]).expect("icmp");
        let expected = etherparse::Icmpv4Header::with_checksum(icmp.icmp_type(), icmp.payload());
        assert_eq!(icmp.checksum(), expected.checksum, "ICMP checksum");
    }

    #[test]
    fn accepts_udp_to_served_port() {
        let p = udp_packet(AGENT, SVC, 40000, 53, b"query");
        let Ok(AgentPacket::Udp(d)) = check(&p, false) else {
            panic!("{:?}", check(&p, false))
        };
        assert_eq!(d.src, sa4(AGENT, 40000));
        assert_eq!(d.dst, sa4(SVC, 53));
        assert_eq!(d.payload, b"query");
        assert_eq!(d.quote, &p[..28]);
        // Port ranges, empty payloads, and no checksum are fine.
        let mut p = udp_packet(AGENT, SVC, 1, 8010, b"");
        p[26] = 0;
        p[27] = 0;
        assert!(matches!(check(&p, false), Ok(AgentPacket::Udp(_))));
    }

    #[test]
    fn quote_includes_ip_options() {
        let mut h =
            Ipv4Header::new(8 + 3, 64, ip_number::UDP, AGENT.octets(), SVC.octets()).expect("hdr");
        h.options = [1, 1, 1, 0].into(); // NOP NOP NOP EOL
        h.set_payload_len(8 + 3).expect("length");
        let udp = UdpHeader::with_ipv4_checksum(5000, 53, &h, b"abc").expect("udp");
        h.header_checksum = h.calc_header_checksum();
        let mut p = Vec::new();
        h.write(&mut p).expect("write");
        udp.write(&mut p).expect("write");
        p.extend_from_slice(b"abc");
        let Ok(AgentPacket::Udp(d)) = check(&p, false) else {
            panic!("{:?}", check(&p, false))
        };
        assert_eq!(d.quote.len(), 24 + 8);
        assert_eq!(d.payload, b"abc");
    }

    #[test]
    fn drops_with_reasons() {
        use DropReason::*;
        let good = udp_packet(AGENT, SVC, 40000, 53, b"q");
        assert_eq!(check(&[], false), Err(Malformed("empty")));
        assert_eq!(check(&good[..10], false), Err(Malformed("bad IPv4 header")));
        assert!(matches!(check(&good[..25], false), Err(Malformed(_))));
        let mut v6 = good.clone();
        v6[0] = 0x60;
        assert_eq!(check(&v6, false), Err(Malformed("bad IPv6 header")));
        v6[0] = 0x50;
        assert_eq!(check(&v6, false), Err(Malformed("not IPv4 or IPv6")));
        let mut bad_sum = good.clone();
        bad_sum[10] ^= 1;
        assert_eq!(
            check(&bad_sum, false),
            Err(Malformed("bad IPv4 header checksum"))
        );
        let mut bad_udp = good.clone();
        *bad_udp.last_mut().expect("byte") ^= 0xff;
        assert_eq!(check(&bad_udp, false), Err(Malformed("bad UDP checksum")));

        // Fragments: MF set, or a non-zero offset.
        for (mf, offset) in [(true, 0), (false, 8)] {
            let mut h = ipv4_header(&good);
            h.more_fragments = mf;
            h.fragment_offset = etherparse::IpFragOffset::try_new(offset).expect("offset");
            h.header_checksum = h.calc_header_checksum();
            let mut p = h.to_bytes().to_vec();
            p.extend_from_slice(&good[20..]);
            assert_eq!(check(&p, false), Err(Malformed("fragment")));
        }

        let other = Ipv4Addr::new(100, 64, 0, 3);
        assert_eq!(
            check(&udp_packet(other, SVC, 1, 53, b""), false),
            Err(SpoofedSource {
                claimed: other.into()
            })
        );
        let elsewhere = Ipv4Addr::new(10, 100, 0, 9);
        assert_eq!(
            check(&udp_packet(AGENT, elsewhere, 1, 53, b""), false),
            Err(NoSuchService {
                destination: elsewhere.into()
            })
        );
        assert_eq!(
            check(&udp_packet(AGENT, SVC, 1, 54, b""), false),
            Err(PortNotServed {
                protocol: "UDP",
                port: 54
            })
        );
        assert_eq!(
            check(&tcp_packet(443), false),
            Ok(AgentPacket::Tcp { dst: sa4(SVC, 443) })
        );
        assert_eq!(
            check(&tcp_packet(80), false),
            Err(PortNotServed {
                protocol: "TCP",
                port: 80
            })
        );
        assert_eq!(
            check(&echo_request(1, 1, b"x"), false),
            Err(ProtocolNotServed { protocol: 1 })
        );

        // Another ICMP type to an ICMP service.
        let b = PacketBuilder::ipv4(AGENT.octets(), SVC.octets(), 64).icmpv4(
            Icmpv4Type::TimestampRequest(etherparse::icmpv4::TimestampMessage {
                id: 1,
                seq: 1,
                originate_timestamp: 0,
                receive_timestamp: 0,
                transmit_timestamp: 0,
            }),
        );
        let mut ts = Vec::new();
        b.write(&mut ts, &[]).expect("build");
        assert_eq!(
            check(&ts, true),
            Err(Unsupported("ICMP other than echo request"))
        );
        let mut bad_icmp = echo_request(1, 1, b"ping");
        *bad_icmp.last_mut().expect("byte") ^= 1;
        assert_eq!(check(&bad_icmp, true), Err(Malformed("bad ICMP checksum")));

        // GRE to a service address.
        let mut gre = good.clone();
        let mut h = ipv4_header(&gre);
        h.protocol = ip_number::GRE;
        h.header_checksum = h.calc_header_checksum();
        gre[..20].copy_from_slice(&h.to_bytes());
        assert_eq!(check(&gre, false), Err(ProtocolNotServed { protocol: 47 }));
    }

    #[test]
    fn trailing_bytes_are_ignored() {
        let mut p = udp_packet(AGENT, SVC, 40000, 53, b"q");
        p.extend_from_slice(&[0xde, 0xad]);
        let Ok(AgentPacket::Udp(d)) = check(&p, false) else {
            panic!()
        };
        assert_eq!(d.payload, b"q");
    }

    #[test]
    fn accepts_echo_request() {
        let p = echo_request(0x1234, 7, b"abcdefgh");
        assert_eq!(
            check(&p, true),
            Ok(AgentPacket::Echo(EchoRequest {
                src: AGENT.into(),
                dst: SVC.into(),
                ident: 0x1234,
                seq: 7,
                payload: b"abcdefgh",
            }))
        );
    }

    #[test]
    fn udp_reply_is_valid() {
        let p = build_udp(sa4(SVC, 53), sa4(AGENT, 40000), b"answer").expect("build");
        let s = parse_ok(&p);
        let Some(TransportSlice::Udp(udp)) = &s.transport else {
            panic!()
        };
        assert_eq!((udp.source_port(), udp.destination_port()), (53, 40000));
        assert_eq!(udp.payload(), b"answer");
        assert_udp_checksum(&p);
        let h = ipv4_header(&p);
        assert_eq!(
            (Ipv4Addr::from(h.source), Ipv4Addr::from(h.destination)),
            (SVC, AGENT)
        );
    }

    #[test]
    fn oversized_reply_is_an_error() {
        let big = vec![0u8; 65536];
        assert_eq!(
            build_udp(sa4(SVC, 1), sa4(AGENT, 1), &big),
            Err(BuildError::TooLarge(65536))
        );
        let max = vec![0u8; 65535 - 28];
        let p = build_udp(sa4(SVC, 1), sa4(AGENT, 1), &max).expect("largest fits");
        assert_eq!(p.len(), 65535);
    }

    #[test]
    fn echo_reply_is_valid() {
        let p = build_echo_reply(SVC.into(), AGENT.into(), 0x1234, 9, b"payload").expect("build");
        let s = parse_ok(&p);
        let Some(TransportSlice::Icmpv4(icmp)) = &s.transport else {
            panic!()
        };
        let Icmpv4Type::EchoReply(echo) = icmp.icmp_type() else {
            panic!()
        };
        assert_eq!((echo.id, echo.seq), (0x1234, 9));
        assert_eq!(icmp.payload(), b"payload");
        assert_icmp_checksum(&p);
    }

    #[test]
    fn port_unreachable_quotes_the_datagram() {
        let original = udp_packet(AGENT, SVC, 40000, 53, b"query that was refused");
        let Ok(AgentPacket::Udp(d)) = check(&original, false) else {
            panic!()
        };
        let p = build_port_unreachable(SVC.into(), AGENT.into(), d.quote).expect("build");
        let s = parse_ok(&p);
        let Some(TransportSlice::Icmpv4(icmp)) = &s.transport else {
            panic!()
        };
        assert_eq!(
            icmp.icmp_type(),
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port)
        );
        assert_eq!((icmp.type_u8(), icmp.code_u8()), (3, 3));
        assert_eq!(icmp.payload(), &original[..28]);
        assert_icmp_checksum(&p);
        let h = ipv4_header(&p);
        assert_eq!(Ipv4Addr::from(h.source), SVC);
        assert_eq!(Ipv4Addr::from(h.destination), AGENT);
    }

    #[test]
    fn backend_echo_messages() {
        let m = build_echo_request_message(5, b"data", false);
        assert_eq!(&m[..8], &[8, 0, 0, 0, 0, 0, 0, 5]);
        // A reply as the kernel hands it over: type 0, kernel's identifier, valid checksum.
        let hdr = etherparse::Icmpv4Header::with_checksum(
            Icmpv4Type::EchoReply(etherparse::IcmpEchoHeader { id: 999, seq: 5 }),
            b"data",
        );
        let mut reply = hdr.to_bytes().to_vec();
        reply.extend_from_slice(b"data");
        assert_eq!(
            parse_backend_echo_reply(&reply, false),
            Some((5, &b"data"[..]))
        );
        assert_eq!(parse_backend_echo_reply(&m, false), None); // a request is not a reply
        assert_eq!(parse_backend_echo_reply(&reply[..7], false), None);
    }

    #[test]
    fn quote_keeps_at_most_68_bytes() {
        let q = Quote::new(&[7u8; 100]);
        assert_eq!(q.as_slice(), &[7u8; MAX_QUOTE][..]);
        let mut q = Quote::new(b"abc");
        assert_eq!(q.as_slice(), b"abc");
        q.set(b"");
        assert!(q.as_slice().is_empty());
    }

    fn arb_addr() -> impl Strategy<Value = Ipv4Addr> {
        any::<u32>().prop_map(Ipv4Addr::from)
    }

    fn tcp_with(flags: &str, seq: u32, ack: Option<u32>, payload: &[u8]) -> Vec<u8> {
        let mut b = PacketBuilder::ipv4(AGENT.octets(), SVC.octets(), 64).tcp(40000, 22, seq, 1000);
        for f in flags.chars() {
            b = match f {
                'S' => b.syn(),
                'F' => b.fin(),
                'R' => b.rst(),
                _ => b,
            };
        }
        if let Some(a) = ack {
            b = b.ack(a);
        }
        let mut v = Vec::new();
        b.write(&mut v, payload).expect("build");
        v
    }

    fn reset_of(p: &[u8]) -> Option<(u32, Option<u32>, u16, u16)> {
        let r = build_tcp_reset(p)?;
        let s = parse_ok(&r);
        let Some(TransportSlice::Tcp(t)) = &s.transport else {
            panic!("not TCP")
        };
        assert!(t.rst());
        let Some(NetSlice::Ipv4(ip)) = &s.net else {
            panic!("not IPv4")
        };
        assert_eq!(ip.header().source_addr(), SVC);
        assert_eq!(ip.header().destination_addr(), AGENT);
        let want = t
            .to_header()
            .calc_checksum_ipv4(&ip.header().to_header(), &[])
            .expect("checksum");
        assert_eq!(t.checksum(), want);
        Some((
            t.sequence_number(),
            t.ack().then(|| t.acknowledgment_number()),
            t.source_port(),
            t.destination_port(),
        ))
    }

    #[test]
    fn resets_follow_the_rfc() {
        // SYN: <SEQ=0><ACK=SEQ+1><CTL=RST,ACK>.
        assert_eq!(
            reset_of(&tcp_with("S", 100, None, b"")),
            Some((0, Some(101), 22, 40000))
        );
        // Data with ACK (a connection from before a restart): <SEQ=SEG.ACK><CTL=RST>.
        assert_eq!(
            reset_of(&tcp_with("", 100, Some(5000), b"hello")),
            Some((5000, None, 22, 40000))
        );
        // FIN and data without ACK: ACK covers both.
        assert_eq!(
            reset_of(&tcp_with("F", 100, None, b"abc")),
            Some((0, Some(104), 22, 40000))
        );
        // Never an RST for an RST, nor for something that is not TCP.
        assert_eq!(reset_of(&tcp_with("R", 100, Some(1), b"")), None);
        assert_eq!(build_tcp_reset(&udp_packet(AGENT, SVC, 1, 2, b"")), None);
        assert_eq!(build_tcp_reset(b"\x45"), None);
    }

    #[test]
    fn unserved_answers() {
        let tcp = tcp_with("S", 1, None, b"");
        let reason = check(&tcp, false).expect_err("port 22 is not served");
        assert!(matches!(
            unserved_answer(&tcp, &reason).map(|a| parse_ok(&a).transport.is_some()),
            Some(true)
        ));
        let udp = udp_packet(AGENT, SVC, 1000, 161, b"x");
        let reason = check(&udp, false).expect_err("port 161 is not served");
        let a = unserved_answer(&udp, &reason).expect("an answer");
        let s = parse_ok(&a);
        let Some(TransportSlice::Icmpv4(icmp)) = &s.transport else {
            panic!("not ICMP")
        };
        assert_eq!((icmp.type_u8(), icmp.code_u8()), (3, 13));
        assert_eq!(icmp.payload(), &udp[..28]);
        assert_icmp_checksum(&a);
        // An echo request to a service without ICMP: answered; an ICMP error: never.
        let echo = echo_request(1, 1, b"x");
        let reason = check(&echo, false).expect_err("no ICMP");
        assert!(unserved_answer(&echo, &reason).is_some());
        let error = build_port_unreachable(AGENT.into(), SVC.into(), &udp[..28]).expect("build");
        let reason = check(&error, false).expect_err("no ICMP");
        assert_eq!(unserved_answer(&error, &reason), None);
        // Other refusals are not answered.
        let spoofed = udp_packet(Ipv4Addr::new(1, 2, 3, 4), SVC, 1000, 161, b"x");
        let reason = check(&spoofed, false).expect_err("spoofed");
        assert_eq!(unserved_answer(&spoofed, &reason), None);
    }

    #[test]
    fn tcp_segments_parse() {
        let p = tcp_with("S", 1, None, b"");
        assert_eq!(
            parse_tcp_segment(&p),
            Some(TcpSegment {
                agent_port: 40000,
                service: SVC.into(),
                port: 22,
                syn: true,
                ack: false,
                rst: false,
            })
        );
        assert_eq!(parse_tcp_segment(&udp_packet(AGENT, SVC, 1, 2, b"")), None);
        assert_eq!(parse_tcp_segment(&p[..30]), None);
    }

    // IPv6.

    const SVC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);

    fn agent6() -> Ipv6Addr {
        tunnel_ipv6(AGENT)
    }

    fn service6(icmp: bool) -> ServiceDef {
        ServiceDef {
            address6: Some(SVC6),
            ..service(icmp)
        }
    }

    fn check6(packet: &[u8], icmp: bool) -> Result<AgentPacket<'_>, DropReason> {
        let svc = service6(icmp);
        inspect(packet, AGENT, |a| (a == IpAddr::V6(SVC6)).then_some(&svc))
    }

    fn udp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv6(src.octets(), dst.octets(), 64).udp(sport, dport);
        let mut v = Vec::new();
        b.write(&mut v, data).expect("build");
        v
    }

    fn tcp6(dport: u16) -> Vec<u8> {
        let b =
            PacketBuilder::ipv6(agent6().octets(), SVC6.octets(), 64).tcp(40000, dport, 1, 1000);
        let mut v = Vec::new();
        b.write(&mut v, b"x").expect("build");
        v
    }

    fn echo6(ident: u16, seq: u16, data: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv6(agent6().octets(), SVC6.octets(), 64)
            .icmpv6_echo_request(ident, seq);
        let mut v = Vec::new();
        b.write(&mut v, data).expect("build");
        v
    }

    /// `packet` (an IPv6 packet without extension headers) with an extension header of type
    /// `kind` (8 bytes: next header, length 0, six bytes of options or fragment fields)
    /// inserted after the fixed header.
    fn with_extension(packet: &[u8], kind: u8, fields: [u8; 6]) -> Vec<u8> {
        let mut p = packet[..40].to_vec();
        let inner = p[6];
        p[6] = kind;
        let len = u16::from_be_bytes([p[4], p[5]]) + 8;
        p[4..6].copy_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&[inner, 0]);
        p.extend_from_slice(&fields);
        p.extend_from_slice(&packet[40..]);
        p
    }

    /// Re-parses an IPv6 packet built for an agent: hop limit, addresses, length.
    fn parse6_ok(packet: &[u8], src: Ipv6Addr, dst: Ipv6Addr) -> SlicedPacket<'_> {
        let sliced = SlicedPacket::from_ip(packet).expect("reparses");
        let Some(NetSlice::Ipv6(ip)) = &sliced.net else {
            panic!("not IPv6")
        };
        let h = ip.header();
        assert_eq!(h.hop_limit(), TTL);
        assert_eq!((h.source_addr(), h.destination_addr()), (src, dst));
        assert_eq!(usize::from(h.payload_length()) + 40, packet.len());
        sliced
    }

    /// Checks the transport checksum of an IPv6 packet (UDP, TCP or ICMPv6) by summing the
    /// pseudo header and the payload: all ones when valid.
    fn assert_checksum6(packet: &[u8]) {
        let ip = Ipv6HeaderSlice::from_slice(packet).expect("ipv6");
        let body = &packet[40..];
        let sum = Sum16BitWords::new()
            .add_16bytes(ip.source())
            .add_16bytes(ip.destination())
            .add_4bytes((body.len() as u32).to_be_bytes())
            .add_4bytes([0, 0, 0, ip.next_header().0])
            .add_slice(body);
        assert!(sum_is_valid(sum), "IPv6 transport checksum");
    }

    #[test]
    fn accepts_ipv6_udp_tcp_and_echo() {
        let p = udp6(agent6(), SVC6, 40000, 53, b"query");
        let Ok(AgentPacket::Udp(d)) = check6(&p, false) else {
            panic!("{:?}", check6(&p, false))
        };
        assert_eq!(d.src, SocketAddr::new(agent6().into(), 40000));
        assert_eq!(d.dst, SocketAddr::new(SVC6.into(), 53));
        assert_eq!(d.payload, b"query");
        assert_eq!(d.quote, &p[..48]);
        assert_eq!(
            check6(&tcp6(443), false),
            Ok(AgentPacket::Tcp {
                dst: SocketAddr::new(SVC6.into(), 443)
            })
        );
        assert_eq!(
            check6(&echo6(7, 9, b"ping"), true),
            Ok(AgentPacket::Echo(EchoRequest {
                src: agent6().into(),
                dst: SVC6.into(),
                ident: 7,
                seq: 9,
                payload: b"ping",
            }))
        );
    }

    #[test]
    fn ipv6_drops_with_reasons() {
        use DropReason::*;
        // Spoofed: the agent's IPv4 address mapped, another tunnel address, a service's.
        for claimed in [
            Ipv4Addr::new(100, 64, 0, 2).to_ipv6_mapped(),
            tunnel_ipv6(Ipv4Addr::new(100, 64, 0, 3)),
            SVC6,
        ] {
            assert_eq!(
                check6(&udp6(claimed, SVC6, 40000, 53, b"q"), false),
                Err(SpoofedSource {
                    claimed: claimed.into()
                })
            );
        }
        let elsewhere = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 2);
        assert_eq!(
            check6(&udp6(agent6(), elsewhere, 40000, 53, b"q"), false),
            Err(NoSuchService {
                destination: elsewhere.into()
            })
        );
        // The IPv4 service address, written as IPv6, is not the service's IPv6 address.
        let mapped = SVC.to_ipv6_mapped();
        assert!(matches!(
            check6(&udp6(agent6(), mapped, 40000, 53, b"q"), false),
            Err(NoSuchService { .. })
        ));
        assert_eq!(
            check6(&udp6(agent6(), SVC6, 40000, 54, b"q"), false),
            Err(PortNotServed {
                protocol: "UDP",
                port: 54
            })
        );
        assert_eq!(
            check6(&tcp6(80), false),
            Err(PortNotServed {
                protocol: "TCP",
                port: 80
            })
        );
        assert_eq!(
            check6(&echo6(1, 1, b"x"), false),
            Err(ProtocolNotServed { protocol: 58 })
        );
        // Fragment header (a first fragment and a later one), and other extension headers.
        let good = udp6(agent6(), SVC6, 40000, 53, b"query");
        assert!(check6(&good, false).is_ok());
        for frag in [[0, 1, 0, 0, 0, 7], [0, 8, 0, 0, 0, 7], [0, 0, 0, 0, 0, 7]] {
            assert_eq!(
                check6(&with_extension(&good, 44, frag), false),
                Err(Ipv6Fragment)
            );
        }
        for kind in [0u8, 43, 60, 51, 135] {
            assert_eq!(
                check6(&with_extension(&good, kind, [1, 4, 0, 0, 0, 0]), false),
                Err(Ipv6ExtensionHeaders { next_header: kind })
            );
        }
        // Checksums: UDP (mandatory over IPv6), ICMPv6.
        let mut bad = good.clone();
        *bad.last_mut().expect("byte") ^= 1;
        assert_eq!(check6(&bad, false), Err(Malformed("bad UDP checksum")));
        let mut zero = good.clone();
        zero[46..48].copy_from_slice(&[0, 0]);
        assert_eq!(
            check6(&zero, false),
            Err(Malformed("UDP checksum 0 over IPv6"))
        );
        let mut bad_echo = echo6(1, 1, b"ping");
        *bad_echo.last_mut().expect("byte") ^= 1;
        assert_eq!(
            check6(&bad_echo, true),
            Err(Malformed("bad ICMPv6 checksum"))
        );
        // Lengths: payload length beyond the bytes; a truncated header.
        assert_eq!(
            check6(&good[..good.len() - 1], false),
            Err(Malformed("IPv6 payload length does not match"))
        );
        assert_eq!(
            check6(&good[..39], false),
            Err(Malformed("bad IPv6 header"))
        );
        // Another ICMPv6 type (a neighbor solicitation) to an ICMP service.
        let b =
            PacketBuilder::ipv6(agent6().octets(), SVC6.octets(), 255).icmpv6_raw(135, 0, [0; 4]);
        let mut ns = Vec::new();
        b.write(&mut ns, &[0; 16]).expect("build");
        assert_eq!(
            check6(&ns, true),
            Err(Unsupported("ICMPv6 other than echo request"))
        );
    }

    #[test]
    fn ipv6_packets_for_agents_are_valid() {
        let p = build_udp(
            SocketAddr::new(SVC6.into(), 53),
            SocketAddr::new(agent6().into(), 40000),
            b"answer",
        )
        .expect("build");
        let s = parse6_ok(&p, SVC6, agent6());
        let Some(TransportSlice::Udp(udp)) = &s.transport else {
            panic!()
        };
        assert_eq!((udp.source_port(), udp.destination_port()), (53, 40000));
        assert_eq!(udp.payload(), b"answer");
        assert_ne!(udp.checksum(), 0);
        assert_checksum6(&p);
        // Families don't mix.
        assert_eq!(
            build_udp(sa4(SVC, 53), SocketAddr::new(agent6().into(), 1), b""),
            Err(BuildError::MixedFamilies)
        );

        let r =
            build_echo_reply(SVC6.into(), agent6().into(), 0x1234, 9, b"payload").expect("build");
        let s = parse6_ok(&r, SVC6, agent6());
        let Some(TransportSlice::Icmpv6(icmp)) = &s.transport else {
            panic!()
        };
        assert_eq!(
            icmp.icmp_type(),
            Icmpv6Type::EchoReply(etherparse::IcmpEchoHeader { id: 0x1234, seq: 9 })
        );
        assert_eq!(icmp.payload(), b"payload");
        assert_checksum6(&r);

        // Port unreachable (type 1 code 4) quoting the datagram.
        let original = udp6(agent6(), SVC6, 40000, 53, b"refused");
        let Ok(AgentPacket::Udp(d)) = check6(&original, false) else {
            panic!()
        };
        let u = build_port_unreachable(SVC6.into(), agent6().into(), d.quote).expect("build");
        let s = parse6_ok(&u, SVC6, agent6());
        let Some(TransportSlice::Icmpv6(icmp)) = &s.transport else {
            panic!()
        };
        assert_eq!((icmp.type_u8(), icmp.code_u8()), (1, 4));
        assert_eq!(icmp.payload(), &original[..48]);
        assert_checksum6(&u);

        // Administratively prohibited (type 1 code 1) for an unserved port, quoting at most
        // what fits into 1280 bytes.
        let big = udp6(agent6(), SVC6, 40000, 161, &[0x55; 3000]);
        let reason = check6(&big, false).expect_err("port 161 is not served");
        let a = unserved_answer(&big, &reason).expect("an answer");
        assert_eq!(a.len(), MIN_MTU6);
        let s = parse6_ok(&a, SVC6, agent6());
        let Some(TransportSlice::Icmpv6(icmp)) = &s.transport else {
            panic!()
        };
        assert_eq!((icmp.type_u8(), icmp.code_u8()), (1, 1));
        assert_eq!(icmp.payload(), &big[..MIN_MTU6 - 48]);
        assert_checksum6(&a);
        // An unserved TCP port: an IPv6 RST.
        let syn = tcp6(80);
        let reason = check6(&syn, false).expect_err("port 80 is not served");
        let rst = unserved_answer(&syn, &reason).expect("RST");
        let s = parse6_ok(&rst, SVC6, agent6());
        let Some(TransportSlice::Tcp(t)) = &s.transport else {
            panic!()
        };
        assert!(t.rst());
        assert_checksum6(&rst);
        // Never an error about an ICMPv6 error.
        let reason = check6(&u, false).expect_err("no ICMP");
        assert_eq!(unserved_answer(&u, &reason), None);
        // TCP segments parse.
        assert_eq!(
            parse_tcp_segment(&syn).map(|s| (s.service, s.port, s.agent_port)),
            Some((IpAddr::V6(SVC6), 80, 40000))
        );
    }

    #[test]
    fn backend_echo_messages_v6() {
        let m = build_echo_request_message(5, b"data", true);
        assert_eq!(&m[..8], &[128, 0, 0, 0, 0, 0, 0, 5]);
        let reply = [129, 0, 0x12, 0x34, 0x03, 0xe7, 0, 5, b'd', b'a', b't', b'a'];
        assert_eq!(
            parse_backend_echo_reply(&reply, true),
            Some((5, &b"data"[..]))
        );
        assert_eq!(parse_backend_echo_reply(&m, true), None);
        assert_eq!(parse_backend_echo_reply(&reply[..7], true), None);
    }

    proptest! {
        #[test]
        fn inspect_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = check(&bytes, true);
            let _ = check(&bytes, false);
        }

        #[test]
        fn inspect_never_panics_on_mutated_packets(
            kind in 0..6u8,
            data in proptest::collection::vec(any::<u8>(), 0..64),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cut in any::<usize>(),
        ) {
            let mut p = match kind {
                0 => udp_packet(AGENT, SVC, 40000, 53, &data),
                1 => echo_request(1, 2, &data),
                2 => tcp_packet(443),
                3 => udp6(agent6(), SVC6, 40000, 53, &data),
                4 => echo6(1, 2, &data),
                _ => with_extension(&udp6(agent6(), SVC6, 40000, 53, &data), 44, [0, 1, 0, 0, 0, 1]),
            };
            for (i, b) in edits {
                let i = i % p.len();
                p[i] = b;
            }
            let cut = cut % (p.len() + 1);
            let _ = check(&p[..cut], true);
            let _ = check(&p, true);
            let _ = check6(&p[..cut], true);
            let _ = check6(&p, true);
            for reason in [
                DropReason::PortNotServed { protocol: "TCP", port: 1 },
                DropReason::PortNotServed { protocol: "UDP", port: 1 },
                DropReason::ProtocolNotServed { protocol: 58 },
            ] {
                let _ = unserved_answer(&p[..cut], &reason);
            }
        }

        #[test]
        fn valid_udp_is_accepted_exactly(
            sport in 1..=u16::MAX,
            dport in 8000..=8010u16,
            data in proptest::collection::vec(any::<u8>(), 0..1500),
        ) {
            let p = udp_packet(AGENT, SVC, sport, dport, &data);
            let verdict = check(&p, false);
            let Ok(AgentPacket::Udp(d)) = verdict else { panic!("{verdict:?}") };
            prop_assert_eq!(d.src, sa4(AGENT, sport));
            prop_assert_eq!(d.dst, sa4(SVC, dport));
            prop_assert_eq!(d.payload, &data[..]);
        }

        #[test]
        fn built_udp_reparses_with_valid_checksums(
            src in arb_addr(), dst in arb_addr(), sport in any::<u16>(), dport in any::<u16>(),
            data in proptest::collection::vec(any::<u8>(), 0..2000),
        ) {
            let p = build_udp(sa4(src, sport), sa4(dst, dport), &data)
                .expect("build");
            let s = parse_ok(&p);
            let Some(TransportSlice::Udp(udp)) = &s.transport else { panic!() };
            prop_assert_eq!(udp.payload(), &data[..]);
            prop_assert_eq!((udp.source_port(), udp.destination_port()), (sport, dport));
            assert_udp_checksum(&p);
            // And what we build, we accept (when it goes the other way).
            if dport != 0 && (8000..=8010).contains(&sport) {
                let back = build_udp(sa4(AGENT, dport), sa4(SVC, sport), &data)
                    .expect("build");
                prop_assert!(matches!(check(&back, false), Ok(AgentPacket::Udp(_))));
            }
        }

        #[test]
        fn built_icmp_reparses_with_valid_checksums(
            src in arb_addr(), dst in arb_addr(), ident in any::<u16>(), seq in any::<u16>(),
            data in proptest::collection::vec(any::<u8>(), 0..1500),
        ) {
            let p = build_echo_reply(src.into(), dst.into(), ident, seq, &data).expect("build");
            let s = parse_ok(&p);
            let Some(TransportSlice::Icmpv4(icmp)) = &s.transport else { panic!() };
            prop_assert_eq!(icmp.icmp_type(), Icmpv4Type::EchoReply(etherparse::IcmpEchoHeader { id: ident, seq }));
            prop_assert_eq!(icmp.payload(), &data[..]);
            assert_icmp_checksum(&p);

            let quote = &data[..data.len().min(100)];
            let u = build_port_unreachable(src.into(), dst.into(), quote).expect("build");
            let s = parse_ok(&u);
            let Some(TransportSlice::Icmpv4(icmp)) = &s.transport else { panic!() };
            prop_assert_eq!(icmp.payload(), &quote[..quote.len().min(MAX_QUOTE)]);
            assert_icmp_checksum(&u);
        }

        #[test]
        fn ipv6_inspect_never_panics(
            rest in proptest::collection::vec(any::<u8>(), 0..200),
            nibble in 0..16u8,
            next in prop_oneof![Just(6u8), Just(17), Just(58), Just(44), Just(0), Just(60), any::<u8>()],
            valid_src in any::<bool>(),
        ) {
            // Version 6, then anything; often the agent's source, the service's destination
            // and an interesting next header, so the later checks run too.
            let mut p = vec![0x60 | nibble];
            p.extend_from_slice(&rest);
            if p.len() >= 40 {
                p[6] = next;
                p[24..40].copy_from_slice(&SVC6.octets());
                if valid_src {
                    p[8..24].copy_from_slice(&agent6().octets());
                }
            }
            let _ = check6(&p, true);
            let _ = check6(&p, false);
            let _ = parse_tcp_segment(&p);
            let _ = build_tcp_reset(&p);
            for reason in [
                DropReason::PortNotServed { protocol: "TCP", port: 1 },
                DropReason::PortNotServed { protocol: "UDP", port: 1 },
                DropReason::ProtocolNotServed { protocol: 1 },
            ] {
                let _ = unserved_answer(&p, &reason);
            }
        }

        #[test]
        fn valid_udp6_is_accepted_and_replies_reparse(
            sport in 1..=u16::MAX,
            dport in 8000..=8010u16,
            data in proptest::collection::vec(any::<u8>(), 0..1500),
        ) {
            let p = udp6(agent6(), SVC6, sport, dport, &data);
            let verdict = check6(&p, false);
            let Ok(AgentPacket::Udp(d)) = verdict else { panic!("{verdict:?}") };
            prop_assert_eq!(d.payload, &data[..]);
            let r = build_udp(d.dst, d.src, &data).expect("build");
            assert_checksum6(&r);
            // What we build, we accept (when it goes the other way).
            let back = build_udp(d.src, d.dst, &data).expect("build");
            prop_assert!(matches!(check6(&back, false), Ok(AgentPacket::Udp(_))));
        }

        #[test]
        fn new_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_tcp_segment(&bytes);
            let _ = build_tcp_reset(&bytes);
            let _ = reply_key(&bytes);
            for reason in [
                DropReason::PortNotServed { protocol: "TCP", port: 1 },
                DropReason::PortNotServed { protocol: "UDP", port: 1 },
                DropReason::ProtocolNotServed { protocol: 1 },
            ] {
                let _ = unserved_answer(&bytes, &reason);
            }
        }

        #[test]
        fn echo_request_round_trips(
            ident in any::<u16>(), seq in any::<u16>(),
            data in proptest::collection::vec(any::<u8>(), 0..1500),
        ) {
            let p = echo_request(ident, seq, &data);
            let verdict = check(&p, true);
            let Ok(AgentPacket::Echo(e)) = verdict else { panic!("{verdict:?}") };
            prop_assert_eq!((e.ident, e.seq, e.payload), (ident, seq, &data[..]));
        }
    }
}
