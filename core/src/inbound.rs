//! The agent's check of packets that arrive from a connector, pure.
//!
//! A connector may only answer for its own services: a packet reaches the platform's tunnel
//! device only when its source is one of *that connector's* service addresses, with a port and
//! protocol the service offers, and its destination is the agent's tunnel IP. Everything else
//! (a name service's whole pool counts as its addresses: the connector answers from the
//! virtual address the agent mapped). Everything else (another connector's address, the agent's LAN address as destination, a port the service
//! does not serve) is dropped and counted, except the connector's answers to refused packets
//! (a TCP reset from any port of the service's address, ICMP destination unreachable). Later
//! IPv4 fragments carry no ports; they are
//! accepted on their addresses and protocol alone (the connector fragments large replies).
//!
//! IPv6 packets get the same checks against the services' IPv6 addresses
//! ([`ServiceDef::covers6`]) and the agent's IPv6 tunnel address
//! ([`ztna_proto::service::tunnel_ipv6`] of its IPv4 one): TCP and UDP from a port the
//! service offers (a reset from any port), ICMPv6 echo replies where it answers ICMP, and
//! ICMPv6 destination unreachable, packet too big and time exceeded from any service. Of the
//! extension headers only a fragment header directly after the fixed header is accepted (a
//! first fragment is checked on its ports, a later one on its addresses and protocol alone);
//! any other is dropped as [`InboundDrop::PortOrProtocol`].

use std::net::{Ipv4Addr, Ipv6Addr};

use ztna_proto::service::tunnel_ipv6;
use ztna_proto::ServiceDef;

use crate::outbound::{fixed6, fragment6, FRAGMENT, ICMP, ICMPV6, TCP, UDP};

/// Why a packet from a connector was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundDrop {
    /// Not a well-formed IPv4 or IPv6 packet.
    Malformed,
    /// The destination is not the agent's tunnel IP (or the agent has none yet).
    Destination,
    /// The source is not an address this connector serves.
    Source,
    /// The source is the connector's, but not with a port or protocol its service offers.
    PortOrProtocol,
}

/// Checks one packet from the connector serving `services` (only that connector's entries of
/// the catalog) to the agent with tunnel IP `tunnel_ip`.
pub fn check(
    packet: &[u8],
    services: &[ServiceDef],
    tunnel_ip: Option<Ipv4Addr>,
) -> Result<(), InboundDrop> {
    if packet.first().is_some_and(|b| b >> 4 == 6) {
        return check6(packet, services, tunnel_ip.map(tunnel_ipv6));
    }
    let [vihl, _, _, _, _, _, f0, f1, _, proto, _, _, s0, s1, s2, s3, d0, d1, d2, d3, ..] = *packet
    else {
        return Err(InboundDrop::Malformed);
    };
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < 20 || packet.len() < ihl {
        return Err(InboundDrop::Malformed);
    }
    let dst = Ipv4Addr::new(d0, d1, d2, d3);
    if tunnel_ip != Some(dst) {
        return Err(InboundDrop::Destination);
    }
    let src = Ipv4Addr::new(s0, s1, s2, s3);
    let mut ours = services.iter().filter(|s| s.covers(src)).peekable();
    if ours.peek().is_none() {
        return Err(InboundDrop::Source);
    }
    let later_fragment = u16::from_be_bytes([f0 & 0x1f, f1]) != 0;
    let l4 = &packet[ihl..];
    let src_port = match l4 {
        [a, b, ..] => Some(u16::from_be_bytes([*a, *b])),
        _ => None,
    };
    let allowed = |s: &ServiceDef| match proto {
        TCP if later_fragment => !s.tcp.is_empty(),
        UDP if later_fragment => !s.udp.is_empty(),
        // A reset from any port of a service: the connector's answer to a SYN for a port the
        // service does not serve (it can only end a connection to that same address and port).
        TCP => src_port.is_some_and(|p| s.allows_tcp(p)) || is_reset(l4),
        UDP => src_port.is_some_and(|p| s.allows_udp(p)),
        // Echo replies where the service answers ICMP; destination unreachable and time
        // exceeded from any service (the connector reports a refused port or backend that way).
        ICMP => match l4.first() {
            Some(0) => s.icmp,
            Some(3) | Some(11) => true,
            _ => later_fragment && s.icmp,
        },
        _ => false,
    };
    if ours.any(allowed) {
        Ok(())
    } else {
        Err(InboundDrop::PortOrProtocol)
    }
}

/// [`check`] for an IPv6 packet; `own` is the agent's IPv6 tunnel address.
fn check6(
    packet: &[u8],
    services: &[ServiceDef],
    own: Option<Ipv6Addr>,
) -> Result<(), InboundDrop> {
    let (src, dst, next, payload) = fixed6(packet).ok_or(InboundDrop::Malformed)?;
    if own != Some(dst) {
        return Err(InboundDrop::Destination);
    }
    let mut ours = services.iter().filter(|s| s.covers6(src)).peekable();
    if ours.peek().is_none() {
        return Err(InboundDrop::Source);
    }
    let (proto, later_fragment, l4) = match next {
        FRAGMENT => fragment6(payload).ok_or(InboundDrop::Malformed)?,
        next => (next, false, payload),
    };
    let src_port = match l4 {
        [a, b, ..] => Some(u16::from_be_bytes([*a, *b])),
        _ => None,
    };
    let allowed = |s: &ServiceDef| match proto {
        TCP if later_fragment => !s.tcp.is_empty(),
        UDP if later_fragment => !s.udp.is_empty(),
        TCP => src_port.is_some_and(|p| s.allows_tcp(p)) || is_reset(l4),
        UDP => src_port.is_some_and(|p| s.allows_udp(p)),
        ICMPV6 if later_fragment => s.icmp,
        // Echo reply where the service answers ICMP; destination unreachable, packet too big
        // and time exceeded from any service.
        ICMPV6 => match l4.first() {
            Some(129) => s.icmp,
            Some(1..=3) => true,
            _ => false,
        },
        _ => false,
    };
    if ours.any(allowed) {
        Ok(())
    } else {
        Err(InboundDrop::PortOrProtocol)
    }
}

/// Whether a TCP header has the RST flag.
fn is_reset(tcp: &[u8]) -> bool {
    tcp.get(13).is_some_and(|flags| flags & 0x04 != 0)
}

#[cfg(test)]
mod tests {
    use ztna_proto::service::PortRange;

    use super::*;

    const TIP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

    fn svc(last: u8, tcp: &[u16], udp: &[u16], icmp: bool) -> ServiceDef {
        ServiceDef {
            name: format!("s{last}"),
            address: Ipv4Addr::new(10, 100, 0, last),
            address6: None,
            udp: udp.iter().map(|p| PortRange::single(*p)).collect(),
            tcp: tcp.iter().map(|p| PortRange::single(*p)).collect(),
            icmp,
            connector: "c1".into(),
            names: None,
        }
    }

    fn packet(proto: u8, src: [u8; 4], dst: Ipv4Addr, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(l4);
        p
    }

    fn ports(src: u16, dst: u16) -> Vec<u8> {
        let mut v = src.to_be_bytes().to_vec();
        v.extend_from_slice(&dst.to_be_bytes());
        v.extend_from_slice(&[0; 16]);
        v
    }

    #[test]
    fn answers_from_own_services_pass() {
        let mine = [svc(1, &[80], &[53], true), svc(2, &[], &[7], false)];
        let ok = |p: &[u8]| check(p, &mine, Some(TIP));
        assert_eq!(
            ok(&packet(TCP, [10, 100, 0, 1], TIP, &ports(80, 40000))),
            Ok(())
        );
        assert_eq!(
            ok(&packet(UDP, [10, 100, 0, 1], TIP, &ports(53, 40000))),
            Ok(())
        );
        assert_eq!(
            ok(&packet(UDP, [10, 100, 0, 2], TIP, &ports(7, 40000))),
            Ok(())
        );
        assert_eq!(
            ok(&packet(ICMP, [10, 100, 0, 1], TIP, &[0, 0, 0, 0])),
            Ok(())
        );
        // The connector's answer to a SYN for a port the service does not serve: RST+ACK from
        // that port, on a service that serves TCP and on one that serves none.
        let mut rst = ports(22, 40000);
        rst[13] = 0x14;
        assert_eq!(ok(&packet(TCP, [10, 100, 0, 1], TIP, &rst)), Ok(()));
        assert_eq!(ok(&packet(TCP, [10, 100, 0, 2], TIP, &rst)), Ok(()));
        // Port unreachable from a service without ICMP echo.
        assert_eq!(
            ok(&packet(ICMP, [10, 100, 0, 2], TIP, &[3, 3, 0, 0])),
            Ok(())
        );
        // A later fragment of a UDP reply.
        let mut frag = packet(UDP, [10, 100, 0, 2], TIP, &[1, 2, 3, 4]);
        frag[6] = 0x00;
        frag[7] = 0xb9;
        assert_eq!(ok(&frag), Ok(()));
    }

    #[test]
    fn spoofed_or_misdirected_packets_are_dropped() {
        let mine = [svc(1, &[80], &[53], true), svc(2, &[], &[7], false)];
        let check = |p: &[u8]| check(p, &mine, Some(TIP));
        // Another connector's service address as source.
        assert_eq!(
            check(&packet(TCP, [10, 100, 0, 9], TIP, &ports(80, 40000))),
            Err(InboundDrop::Source)
        );
        // A reset passes only from this connector's own service addresses.
        let mut rst = ports(22, 40000);
        rst[13] = 0x04;
        assert_eq!(
            check(&packet(TCP, [10, 100, 0, 9], TIP, &rst)),
            Err(InboundDrop::Source)
        );
        // To the agent's LAN address instead of its tunnel IP.
        assert_eq!(
            check(&packet(
                TCP,
                [10, 100, 0, 1],
                Ipv4Addr::new(10, 10, 0, 2),
                &ports(80, 1)
            )),
            Err(InboundDrop::Destination)
        );
        // A port or protocol the service does not offer.
        assert_eq!(
            check(&packet(TCP, [10, 100, 0, 1], TIP, &ports(22, 40000))),
            Err(InboundDrop::PortOrProtocol)
        );
        assert_eq!(
            check(&packet(TCP, [10, 100, 0, 2], TIP, &ports(7, 40000))),
            Err(InboundDrop::PortOrProtocol)
        );
        assert_eq!(
            check(&packet(ICMP, [10, 100, 0, 2], TIP, &[0, 0, 0, 0])),
            Err(InboundDrop::PortOrProtocol)
        );
        assert_eq!(
            check(&packet(ICMP, [10, 100, 0, 1], TIP, &[8, 0, 0, 0])),
            Err(InboundDrop::PortOrProtocol)
        );
        assert_eq!(
            check(&packet(47, [10, 100, 0, 1], TIP, &[0; 8])),
            Err(InboundDrop::PortOrProtocol)
        );
        // Garbage.
        assert_eq!(check(&[0x45; 10]), Err(InboundDrop::Malformed));
        assert_eq!(check(&[0x60; 39]), Err(InboundDrop::Malformed));
        assert_eq!(check(&[0x60; 40]), Err(InboundDrop::Malformed));
        let mut bad_ihl = packet(TCP, [10, 100, 0, 1], TIP, &[]);
        bad_ihl[0] = 0x4f;
        assert_eq!(check(&bad_ihl), Err(InboundDrop::Malformed));
        // No tunnel IP yet: nothing passes.
        assert_eq!(
            super::check(
                &packet(TCP, [10, 100, 0, 1], TIP, &ports(80, 1)),
                &mine,
                None
            ),
            Err(InboundDrop::Destination)
        );
    }

    const SVC6: &str = "fd00:9::1";

    fn svc6(last: u8, tcp: &[u16], udp: &[u16], icmp: bool) -> ServiceDef {
        let mut s = svc(last, tcp, udp, icmp);
        s.address6 = Some(format!("fd00:9::{last}").parse().unwrap());
        s
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn reply6(
        src: &str,
        dst: Ipv6Addr,
        f: impl FnOnce(etherparse::PacketBuilderStep<etherparse::IpHeaders>) -> Vec<u8>,
    ) -> Vec<u8> {
        f(etherparse::PacketBuilder::ipv6(
            v6(src).octets(),
            dst.octets(),
            64,
        ))
    }

    fn udp_reply6(src: &str, dst: Ipv6Addr, sport: u16) -> Vec<u8> {
        reply6(src, dst, |b| {
            let mut out = Vec::new();
            b.udp(sport, 40000).write(&mut out, b"answer").unwrap();
            out
        })
    }

    #[test]
    fn ipv6_answers_from_own_services_pass_and_others_are_dropped() {
        let mine = [svc6(1, &[80], &[53], true), svc6(2, &[], &[7], false)];
        let own = tunnel_ipv6(TIP);
        let check = |p: &[u8]| check(p, &mine, Some(TIP));
        assert_eq!(check(&udp_reply6(SVC6, own, 53)), Ok(()));
        assert_eq!(check(&udp_reply6("fd00:9::2", own, 7)), Ok(()));
        let tcp = |src: &str, sport: u16, rst: bool| {
            reply6(src, own, |b| {
                let b = b.tcp(sport, 40000, 1, 1000).ack(1);
                let b = if rst { b.rst() } else { b };
                let mut out = Vec::new();
                b.write(&mut out, &[]).unwrap();
                out
            })
        };
        assert_eq!(check(&tcp(SVC6, 80, false)), Ok(()));
        assert_eq!(check(&tcp("fd00:9::2", 22, true)), Ok(()), "a refusal");
        let icmp = |src: &str, ty: u8| {
            reply6(src, own, |b| {
                let mut out = Vec::new();
                match ty {
                    129 => b.icmpv6_echo_reply(1, 1).write(&mut out, b"ping"),
                    t => b.icmpv6_raw(t, 4, [0; 4]).write(&mut out, &[0; 48]),
                }
                .unwrap();
                out
            })
        };
        assert_eq!(check(&icmp(SVC6, 129)), Ok(()));
        assert_eq!(check(&icmp("fd00:9::2", 1)), Ok(()), "port unreachable");
        // Attacks: another connector's address, the IPv4 address's service without IPv6, the
        // agent's other addresses, a port or ICMPv6 type the service does not offer.
        assert_eq!(
            check(&udp_reply6("fd00:9::9", own, 53)),
            Err(InboundDrop::Source)
        );
        assert_eq!(
            super::check(
                &udp_reply6(SVC6, own, 53),
                &[svc(1, &[], &[53], false)],
                Some(TIP)
            ),
            Err(InboundDrop::Source)
        );
        assert_eq!(
            check(&udp_reply6(SVC6, v6("fd7a:7a74:6e61:7475::6440:3"), 53)),
            Err(InboundDrop::Destination)
        );
        assert_eq!(
            check(&udp_reply6(SVC6, v6("fe80::1"), 53)),
            Err(InboundDrop::Destination)
        );
        assert_eq!(
            super::check(&udp_reply6(SVC6, own, 53), &mine, None),
            Err(InboundDrop::Destination)
        );
        assert_eq!(
            check(&udp_reply6(SVC6, own, 54)),
            Err(InboundDrop::PortOrProtocol)
        );
        assert_eq!(
            check(&tcp("fd00:9::2", 7, false)),
            Err(InboundDrop::PortOrProtocol)
        );
        assert_eq!(
            check(&icmp("fd00:9::2", 129)),
            Err(InboundDrop::PortOrProtocol)
        );
        assert_eq!(
            check(&icmp(SVC6, 134)),
            Err(InboundDrop::PortOrProtocol),
            "a router advertisement"
        );
        // Fragments: the first on its ports, later ones on addresses and protocol.
        let frag = |offset: u16, sport: u16| {
            let mut p = udp_reply6(SVC6, own, sport);
            p[6] = FRAGMENT;
            let h = [
                UDP,
                0,
                (offset << 3).to_be_bytes()[0],
                (offset << 3).to_be_bytes()[1] | 1,
                0,
                0,
                0,
                9,
            ];
            p.splice(40..40, h);
            let len = u16::try_from(p.len() - 40).unwrap();
            p[4..6].copy_from_slice(&len.to_be_bytes());
            p
        };
        assert_eq!(check(&frag(0, 53)), Ok(()));
        assert_eq!(check(&frag(0, 54)), Err(InboundDrop::PortOrProtocol));
        assert_eq!(check(&frag(100, 1)), Ok(()));
        // Another extension header (hop-by-hop options): dropped.
        let mut hbh = udp_reply6(SVC6, own, 53);
        hbh[6] = 0;
        hbh.splice(40..40, [UDP, 0, 1, 4, 0, 0, 0, 0]);
        let len = u16::try_from(hbh.len() - 40).unwrap();
        hbh[4..6].copy_from_slice(&len.to_be_bytes());
        assert_eq!(check(&hbh), Err(InboundDrop::PortOrProtocol));
        // A payload length beyond the packet.
        let mut long = udp_reply6(SVC6, own, 53);
        long[4] = 0xff;
        assert_eq!(check(&long), Err(InboundDrop::Malformed));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)) {
            let mine = [svc(1, &[80], &[53], true)];
            let _ = check(&bytes, &mine, Some(TIP));
        }

        #[test]
        fn version_6_never_panics(mut bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120), len in 0u16..90, next in proptest::prelude::any::<u8>()) {
            let mine = [svc6(1, &[80], &[53], true)];
            if let Some(b) = bytes.first_mut() {
                *b = 0x60;
            }
            if bytes.len() >= 40 {
                bytes[4..6].copy_from_slice(&len.to_be_bytes());
                bytes[6] = next;
                bytes[8..24].copy_from_slice(&v6(SVC6).octets());
                bytes[24..40].copy_from_slice(&tunnel_ipv6(TIP).octets());
            }
            let _ = check(&bytes, &mine, Some(TIP));
        }
    }
}
