//! The agent's check of IPv6 packets from the platform, pure.
//!
//! An IPv6 packet read from the tunnel device goes to a connector only if its source is the
//! agent's own IPv6 tunnel address ([`ztna_proto::service::tunnel_ipv6`] of its IPv4 one), its
//! destination is an IPv6 address of a service policy gave the agent
//! ([`ztna_proto::ServiceDef::covers6`]), and its protocol and port are ones that service
//! offers (a TCP or UDP port, or an ICMPv6 echo request where it answers ICMP). Everything else
//! is dropped, by reason ([`OutboundDrop`], which the agent counts):
//! - what the kernel says to the link itself (neighbour discovery, router solicitations, MLD
//!   reports, anything to a multicast or link-local address): [`OutboundDrop::Local`], quietly;
//! - any extension header other than one fragment header ([`OutboundDrop::ExtensionHeader`]);
//! - fragments (a UDP datagram or echo request larger than the MTU, split by the sender) go to
//!   the connector, which reassembles them and checks the whole packet: a first fragment is
//!   checked on its protocol and port here, a later one (no transport header) on its protocol
//!   only ([`Want::Later`]: the service offers some port of it); a first fragment too short
//!   to hold the ports is dropped ([`OutboundDrop::Fragment`]).
//!
//! A packet refused for its port or protocol (the client reached a service it was given, on a
//! port it does not offer) is answered at once, as the connector answers refused IPv4 packets
//! ([`refusal6`]): a TCP reset, or ICMPv6 "administratively prohibited", so the client's
//! connection fails now instead of timing out.
//!
//! Only the fixed header and the first bytes of the transport header are read; nothing is
//! allocated (except for a refusal's answer).

use std::net::Ipv6Addr;

use ztna_proto::ServiceDef;

/// Length of the IPv6 fixed header.
pub const IPV6_HEADER: usize = 40;

/// The IPv6 minimum link MTU (RFC 8200 5): below it a tunnel carries IPv4 only; an ICMPv6
/// error fits in it (RFC 4443 2.4).
pub const IPV6_MIN_MTU: u16 = 1280;

/// The IP protocol (IPv6 next-header) number of TCP.
pub(crate) const TCP: u8 = 6;
/// That of UDP.
pub(crate) const UDP: u8 = 17;
/// That of ICMP (IPv4).
pub(crate) const ICMP: u8 = 1;
/// The IPv6 next-header number of ICMPv6.
pub const ICMPV6: u8 = 58;
/// The IPv6 next-header number of a fragment header.
pub(crate) const FRAGMENT: u8 = 44;
/// The IPv6 next-header number "No Next Header" (RFC 8200 4.7).
const NO_NEXT_HEADER: u8 = 59;

/// Whether next-header value `n` is an extension header (RFC 8200 4, RFC 7045: etherparse's
/// list, which includes the fragment header and the experimental 253 and 254) or No Next
/// Header.
fn extension_header(n: u8) -> bool {
    n == NO_NEXT_HEADER || etherparse::IpNumber(n).is_ipv6_ext_header_value()
}

const ECHO_REQUEST: u8 = 128;

/// Why an IPv6 packet from the platform was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundDrop {
    /// Too short, not version 6, or a payload length beyond the packet.
    Malformed,
    /// The kernel talking to the link (neighbour discovery, router solicitation, MLD, any
    /// multicast or link-local address): not for a service, dropped quietly.
    Local,
    /// The source is not the agent's IPv6 tunnel address (or the agent has none yet).
    Source,
    /// An extension header other than a fragment header.
    ExtensionHeader,
    /// A first fragment too short to hold the transport ports.
    Fragment,
    /// The destination is no service's IPv6 address.
    NoRoute,
    /// The service does not offer that protocol or port.
    PortOrProtocol,
}

/// What an IPv6 packet asks of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// A TCP segment to this port.
    Tcp(u16),
    /// A UDP datagram to this port.
    Udp(u16),
    /// An ICMPv6 echo request.
    Echo,
    /// A later fragment of a packet of this protocol (TCP, UDP or ICMPv6), whose ports are in
    /// the first fragment; the connector checks the reassembled packet.
    Later(u8),
}

impl Want {
    /// Whether `svc` offers it.
    pub fn allowed_by(self, svc: &ServiceDef) -> bool {
        match self {
            Want::Tcp(p) => svc.allows_tcp(p),
            Want::Udp(p) => svc.allows_udp(p),
            Want::Echo => svc.icmp,
            Want::Later(TCP) => !svc.tcp.is_empty(),
            Want::Later(UDP) => !svc.udp.is_empty(),
            Want::Later(ICMPV6) => svc.icmp,
            Want::Later(_) => false,
        }
    }
}

/// An IPv6 packet that passed the checks that need no catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet6 {
    /// Its destination.
    pub dst: Ipv6Addr,
    /// Its protocol and port.
    pub want: Want,
}

/// The IPv6 fixed header of `p`: source, destination, next header and the payload (as long as
/// the payload length says). `None` if `p` is shorter than the header, is not version 6, or
/// is shorter than its payload length.
pub(crate) fn fixed6(p: &[u8]) -> Option<(Ipv6Addr, Ipv6Addr, u8, &[u8])> {
    let header: &[u8; IPV6_HEADER] = p.first_chunk()?;
    if header[0] >> 4 != 6 {
        return None;
    }
    let payload_len = usize::from(u16::from_be_bytes([header[4], header[5]]));
    let payload = p.get(IPV6_HEADER..IPV6_HEADER + payload_len)?;
    let addr = |at: usize| {
        let mut a = [0u8; 16];
        a.copy_from_slice(&header[at..at + 16]);
        Ipv6Addr::from(a)
    };
    Some((addr(8), addr(24), header[6], payload))
}

/// A fragment header at the start of `payload` (written by hand: etherparse 0.16 reads the
/// offset and the M flag from the wrong bits): the next header, whether this is a later
/// fragment (offset not 0), and what follows the fragment header. `None` if it is cut short.
pub(crate) fn fragment6(payload: &[u8]) -> Option<(u8, bool, &[u8])> {
    let [next, _, hi, lo, _, _, _, _, ref body @ ..] = *payload else {
        return None;
    };
    Some((next, u16::from_be_bytes([hi, lo]) >> 3 != 0, body))
}

/// Whether `a` is link-scoped: link-local unicast, or multicast.
fn link_scoped(a: Ipv6Addr) -> bool {
    a.is_multicast() || a.is_unicast_link_local()
}

/// Checks an IPv6 packet from the platform as far as it can without the catalog: well formed,
/// not the kernel's link chatter, from `own` (the agent's IPv6 tunnel address), no extension
/// header or fragment, and a protocol a service can offer.
pub fn classify6(packet: &[u8], own: Option<Ipv6Addr>) -> Result<Packet6, OutboundDrop> {
    let (src, dst, next, payload) = fixed6(packet).ok_or(OutboundDrop::Malformed)?;
    if link_scoped(dst) || link_scoped(src) || src.is_unspecified() {
        return Err(OutboundDrop::Local);
    }
    if own != Some(src) {
        return Err(OutboundDrop::Source);
    }
    let mut l4 = payload;
    let mut next = next;
    let mut short = OutboundDrop::Malformed;
    if next == FRAGMENT {
        let (inner, later, body) = fragment6(l4).ok_or(OutboundDrop::Malformed)?;
        if extension_header(inner) {
            return Err(OutboundDrop::ExtensionHeader);
        }
        if later {
            return match inner {
                TCP | UDP | ICMPV6 => Ok(Packet6 {
                    dst,
                    want: Want::Later(inner),
                }),
                _ => Err(OutboundDrop::PortOrProtocol),
            };
        }
        (l4, next, short) = (body, inner, OutboundDrop::Fragment);
    }
    let port = || match l4 {
        [_, _, a, b, ..] => Ok(u16::from_be_bytes([*a, *b])),
        _ => Err(short),
    };
    let want = match next {
        TCP => Want::Tcp(port()?),
        UDP => Want::Udp(port()?),
        ICMPV6 => match l4.first() {
            Some(&ECHO_REQUEST) => Want::Echo,
            // Router and neighbour discovery, MLD (unicast ones too): the link's business.
            Some(130..=137) | Some(143) => return Err(OutboundDrop::Local),
            Some(_) => return Err(OutboundDrop::PortOrProtocol),
            None => return Err(short),
        },
        // Not a fragment header: that was taken above, and one behind it is refused there.
        n if extension_header(n) => return Err(OutboundDrop::ExtensionHeader),
        _ => return Err(OutboundDrop::PortOrProtocol),
    };
    Ok(Packet6 { dst, want })
}

/// The answer to a packet [`classify6`] passed but the service refused for its port or
/// protocol (it is from the agent's own address, and well formed): to a TCP segment other than
/// a reset, a reset (RFC 9293 3.10.7.1); to a UDP datagram or an ICMPv6 echo request, ICMPv6
/// destination unreachable, administratively prohibited, carrying as much of the packet as
/// fits in 1280 bytes (RFC 4443 3.1). `None` for anything else.
pub fn refusal6(packet: &[u8]) -> Option<Vec<u8>> {
    let (src, dst, next, l4) = fixed6(packet)?;
    match next {
        TCP => {
            let seg = crate::tcp_flows::Segment::of(src.into(), dst.into(), l4)?;
            crate::tcp_flows::reset_answer(&seg)
        }
        UDP | ICMPV6 if next == UDP || l4.first() == Some(&ECHO_REQUEST) => {
            let room = usize::from(IPV6_MIN_MTU) - IPV6_HEADER - 8;
            let quoted = &packet[..packet.len().min(room)];
            let mut out = Vec::new();
            etherparse::PacketBuilder::ipv6(dst.octets(), src.octets(), 64)
                .icmpv6_raw(1, 1, [0; 4])
                .write(&mut out, quoted)
                .ok()?;
            Some(out)
        }
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use etherparse::PacketBuilder;

    use super::*;

    pub(crate) const OWN: Ipv6Addr = Ipv6Addr::new(0xfd7a, 0x7a74, 0x6e61, 0x7475, 0, 0, 0x6440, 2);
    pub(crate) const SVC: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 0, 0, 0, 0, 0, 1);

    pub(crate) fn udp6(src: Ipv6Addr, dst: Ipv6Addr, dport: u16) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv6(src.octets(), dst.octets(), 64)
            .udp(40000, dport)
            .write(&mut out, b"hello")
            .unwrap();
        out
    }

    pub(crate) fn tcp6(src: Ipv6Addr, dst: Ipv6Addr, dport: u16) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv6(src.octets(), dst.octets(), 64)
            .tcp(40000, dport, 1, 1000)
            .syn()
            .write(&mut out, &[])
            .unwrap();
        out
    }

    pub(crate) fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, ty: u8) -> Vec<u8> {
        let mut out = Vec::new();
        let b = PacketBuilder::ipv6(src.octets(), dst.octets(), 64);
        match ty {
            128 => b.icmpv6_echo_request(1, 1).write(&mut out, b"ping"),
            t => b.icmpv6_raw(t, 0, [0; 4]).write(&mut out, &[0; 16]),
        }
        .unwrap();
        out
    }

    /// `udp6` with its next header turned into an extension header `ext` of 8 bytes in front
    /// of the UDP header.
    pub(crate) fn with_extension(ext: u8, src: Ipv6Addr, dst: Ipv6Addr, dport: u16) -> Vec<u8> {
        let mut p = udp6(src, dst, dport);
        let ext_header: [u8; 8] = if ext == FRAGMENT {
            // Written by hand: etherparse 0.16 puts the offset and the M flag in the wrong bits.
            // Offset 0, more fragments, identification 7.
            [UDP, 0, 0x00, 0x01, 0, 0, 0, 7]
        } else {
            [UDP, 0, 1, 4, 0, 0, 0, 0] // next header, length 0 (8 bytes), PadN
        };
        p[6] = ext;
        p.splice(IPV6_HEADER..IPV6_HEADER, ext_header);
        let len = u16::try_from(p.len() - IPV6_HEADER).unwrap();
        p[4..6].copy_from_slice(&len.to_be_bytes());
        p
    }

    #[test]
    fn service_packets_from_the_own_address_pass() {
        assert_eq!(
            classify6(&udp6(OWN, SVC, 53), Some(OWN)),
            Ok(Packet6 {
                dst: SVC,
                want: Want::Udp(53)
            })
        );
        assert_eq!(
            classify6(&tcp6(OWN, SVC, 443), Some(OWN)).map(|p| p.want),
            Ok(Want::Tcp(443))
        );
        assert_eq!(
            classify6(&icmp6(OWN, SVC, 128), Some(OWN)).map(|p| p.want),
            Ok(Want::Echo)
        );
    }

    #[test]
    fn spoofed_local_and_odd_packets_are_dropped_by_reason() {
        let other: Ipv6Addr = "fd7a:7a74:6e61:7475::6440:3".parse().unwrap();
        assert_eq!(
            classify6(&udp6(other, SVC, 53), Some(OWN)),
            Err(OutboundDrop::Source)
        );
        assert_eq!(
            classify6(&udp6(OWN, SVC, 53), None),
            Err(OutboundDrop::Source),
            "no tunnel address yet"
        );
        // The kernel's link chatter: router solicitation, neighbour solicitation, MLDv2.
        let all_routers: Ipv6Addr = "ff02::2".parse().unwrap();
        let ll: Ipv6Addr = "fe80::1".parse().unwrap();
        assert_eq!(
            classify6(&icmp6(ll, all_routers, 133), Some(OWN)),
            Err(OutboundDrop::Local)
        );
        assert_eq!(
            classify6(&icmp6(Ipv6Addr::UNSPECIFIED, SVC, 135), Some(OWN)),
            Err(OutboundDrop::Local)
        );
        assert_eq!(
            classify6(&icmp6(OWN, "ff02::16".parse().unwrap(), 143), Some(OWN)),
            Err(OutboundDrop::Local)
        );
        assert_eq!(
            classify6(&icmp6(OWN, SVC, 135), Some(OWN)),
            Err(OutboundDrop::Local)
        );
        // ICMPv6 other than echo (an error, an echo reply) is no service's.
        assert_eq!(
            classify6(&icmp6(OWN, SVC, 129), Some(OWN)),
            Err(OutboundDrop::PortOrProtocol)
        );
        assert_eq!(
            classify6(&icmp6(OWN, SVC, 1), Some(OWN)),
            Err(OutboundDrop::PortOrProtocol)
        );
        // Extension headers and fragments.
        for ext in [0u8, 43, 60] {
            assert_eq!(
                classify6(&with_extension(ext, OWN, SVC, 53), Some(OWN)),
                Err(OutboundDrop::ExtensionHeader),
                "{ext}"
            );
        }
        // A first fragment is checked on its port; a later one on its protocol; a first
        // fragment cut before the ports is dropped as a fragment.
        assert_eq!(
            classify6(&with_extension(FRAGMENT, OWN, SVC, 53), Some(OWN)),
            Ok(Packet6 {
                dst: SVC,
                want: Want::Udp(53)
            })
        );
        let mut later = with_extension(FRAGMENT, OWN, SVC, 53);
        later[IPV6_HEADER + 3] |= 0x08; // offset 1 (8 bytes)
        assert_eq!(
            classify6(&later, Some(OWN)),
            Ok(Packet6 {
                dst: SVC,
                want: Want::Later(UDP)
            })
        );
        let mut cut = with_extension(FRAGMENT, OWN, SVC, 53);
        cut.truncate(IPV6_HEADER + 8 + 2);
        cut[4..6].copy_from_slice(&10u16.to_be_bytes());
        assert_eq!(classify6(&cut, Some(OWN)), Err(OutboundDrop::Fragment));
        let mut nested = with_extension(FRAGMENT, OWN, SVC, 53);
        nested[IPV6_HEADER] = 0; // a hop-by-hop header after the fragment header
        assert_eq!(
            classify6(&nested, Some(OWN)),
            Err(OutboundDrop::ExtensionHeader)
        );
        // Another protocol (GRE), truncated, a lying payload length, IPv4.
        let mut gre = udp6(OWN, SVC, 53);
        gre[6] = 47;
        assert_eq!(
            classify6(&gre, Some(OWN)),
            Err(OutboundDrop::PortOrProtocol)
        );
        let p = udp6(OWN, SVC, 53);
        assert_eq!(classify6(&p[..39], Some(OWN)), Err(OutboundDrop::Malformed));
        assert_eq!(classify6(&p[..42], Some(OWN)), Err(OutboundDrop::Malformed));
        let mut short = p[..42].to_vec();
        short[4..6].copy_from_slice(&2u16.to_be_bytes());
        assert_eq!(
            classify6(&short, Some(OWN)),
            Err(OutboundDrop::Malformed),
            "no room for the ports"
        );
        let mut v4 = p.clone();
        v4[0] = 0x45;
        assert_eq!(classify6(&v4, Some(OWN)), Err(OutboundDrop::Malformed));
    }

    #[test]
    fn refused_ports_are_answered_at_once() {
        // A SYN to a port the service does not offer: RST+ACK acknowledging it.
        let syn = tcp6(OWN, SVC, 22);
        let r = refusal6(&syn).unwrap();
        let s = etherparse::SlicedPacket::from_ip(&r).unwrap();
        let Some(etherparse::NetSlice::Ipv6(ip)) = &s.net else {
            panic!("not IPv6")
        };
        assert_eq!(ip.header().source_addr(), SVC);
        assert_eq!(ip.header().destination_addr(), OWN);
        let Some(etherparse::TransportSlice::Tcp(t)) = &s.transport else {
            panic!("not TCP")
        };
        assert!(t.rst() && t.ack());
        assert_eq!((t.source_port(), t.destination_port()), (22, 40000));
        assert_eq!(
            t.acknowledgment_number(),
            2,
            "the SYN's sequence number + 1"
        );
        let h = t.to_header();
        assert_eq!(
            h.calc_checksum_ipv6(&ip.header().to_header(), t.payload())
                .unwrap(),
            h.checksum
        );
        // A UDP datagram: ICMPv6 administratively prohibited, quoting it.
        let udp = udp6(OWN, SVC, 54);
        let r = refusal6(&udp).unwrap();
        let s = etherparse::SlicedPacket::from_ip(&r).unwrap();
        let Some(etherparse::TransportSlice::Icmpv6(icmp)) = &s.transport else {
            panic!("not ICMPv6")
        };
        assert_eq!((icmp.type_u8(), icmp.code_u8()), (1, 1));
        assert_eq!(icmp.payload(), &udp[..]);
        let Some(etherparse::NetSlice::Ipv6(ip)) = &s.net else {
            panic!("not IPv6")
        };
        let h = icmp.header();
        assert_eq!(
            h.icmp_type
                .calc_checksum(
                    ip.header().source(),
                    ip.header().destination(),
                    icmp.payload()
                )
                .unwrap(),
            h.checksum
        );
        // The quote is cut to fit 1280 bytes.
        let mut big = Vec::new();
        PacketBuilder::ipv6(OWN.octets(), SVC.octets(), 64)
            .udp(40000, 54)
            .write(&mut big, &[7; 1400])
            .unwrap();
        assert_eq!(refusal6(&big).unwrap().len(), 1280);
        // An echo request where the service has no ICMP.
        assert!(refusal6(&icmp6(OWN, SVC, 128)).is_some());
        // Never to a reset, an ICMPv6 error, another protocol, or garbage.
        let mut rst = Vec::new();
        PacketBuilder::ipv6(OWN.octets(), SVC.octets(), 64)
            .tcp(40000, 22, 1, 1000)
            .rst()
            .write(&mut rst, &[])
            .unwrap();
        assert_eq!(refusal6(&rst), None);
        assert_eq!(refusal6(&icmp6(OWN, SVC, 1)), None);
        let mut gre = udp6(OWN, SVC, 53);
        gre[6] = 47;
        assert_eq!(refusal6(&gre), None);
        assert_eq!(refusal6(&[0x60; 20]), None);
        assert_eq!(refusal6(&syn[..50]), None);
    }

    proptest::proptest! {
        #[test]
        fn any_version_6_bytes_are_safe(mut bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120), next in proptest::prelude::any::<u8>(), len in 0u16..100) {
            if let Some(b) = bytes.first_mut() {
                *b = 0x60 | (*b & 0x0f);
            }
            if bytes.len() >= IPV6_HEADER {
                bytes[4..6].copy_from_slice(&len.to_be_bytes());
                bytes[6] = next;
                bytes[8..24].copy_from_slice(&OWN.octets());
            }
            let _ = classify6(&bytes, Some(OWN));
            let _ = classify6(&bytes, None);
            let _ = refusal6(&bytes);
        }
    }
}
