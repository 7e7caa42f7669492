//! Arbitrary bytes as a packet an agent sent the connector (IPv4 or IPv6), or a backend reply: the connector's
//! packet parsers (`inspect`, the TCP segment parse, the XDP reply key) and the answers built
//! from what they refuse never panic, and what they build is well-formed.
//!
//! The parsers live in the connector binary's `dataplane/packet.rs`, which is pure (no I/O, no
//! crate-internal imports), so it is compiled into this target as a module, with the core's
//! packet arena (`core/src/arena.rs`, bytes only) that its reply builder cuts packets from.
#![no_main]

// `packet.rs` names the arena `ztna_core::arena::PacketArena`; this target is that crate here.
extern crate self as ztna_core;

#[path = "../../core/src/arena.rs"]
#[allow(dead_code, unreachable_pub)]
pub mod arena;

#[path = "../../connector/src/dataplane/packet.rs"]
#[allow(dead_code, unreachable_pub)]
mod packet;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use ztna_proto::{PortRange, ServiceDef};

const AGENT: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const SVC: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
const SVC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);

fuzz_target!(|data: &[u8]| {
    let svc = ServiceDef {
        name: "svc".into(),
        address: SVC,
        address6: Some(SVC6),
        udp: vec![PortRange::single(53)],
        tcp: vec![PortRange::single(443)],
        icmp: data.first().is_some_and(|b| b & 1 == 1),
        connector: String::new(),
        names: None,
    };
    let is_svc = |a: IpAddr| a == IpAddr::V4(SVC) || a == IpAddr::V6(SVC6);
    match packet::inspect(data, AGENT, |a| is_svc(a).then_some(&svc)) {
        Ok(_) => {}
        Err(reason) => {
            if let Some(answer) = packet::unserved_answer(data, &reason) {
                // An answer goes from the service to the agent, and is a TCP reset or an ICMP
                // error no larger than its header plus the longest quote (IPv4), or than the
                // IPv6 minimum MTU (IPv6).
                if answer[0] >> 4 == 6 {
                    assert!(answer.len() <= packet::MIN_MTU6);
                    assert_eq!(answer[8..24], SVC6.octets());
                    assert_eq!(
                        answer[24..40],
                        ztna_proto::service::tunnel_ipv6(AGENT).octets()
                    );
                } else {
                    assert!(answer.len() <= 20 + 8 + packet::MAX_QUOTE);
                    assert_eq!(answer[12..16], SVC.octets());
                    assert_eq!(answer[16..20], AGENT.octets());
                }
            }
        }
    }
    if let Some(seg) = packet::parse_tcp_segment(data) {
        if let Some(rst) = packet::build_tcp_reset(data) {
            assert!(!seg.rst, "an RST is never answered");
            let back = packet::parse_tcp_segment(&rst).expect("a reset parses");
            assert!(back.rst);
            assert_eq!(back.agent_port, seg.port);
        }
    }
    if let Some((dst, dport, src, sport)) = packet::reply_key(data) {
        assert_eq!(dst.octets(), data[16..20]);
        assert_eq!(src.octets(), data[12..16]);
        let _ = (dport, sport);
    }
    // The bytes as a backend's reply payload: the packet cut from the arena is well-formed, and
    // the XDP reply key reads back the addresses and ports it was built with.
    let mut arena = arena::PacketArena::with_chunk(2048);
    let src = std::net::SocketAddr::from((SVC, 53));
    let dst = std::net::SocketAddr::from((AGENT, 40000));
    let reply = packet::build_udp_in(&mut arena, src, dst, data).expect("fits one datagram");
    assert_eq!(reply.len(), 20 + 8 + data.len());
    assert_eq!(packet::reply_key(&reply), Some((AGENT, 40000, SVC, 53)));
});
