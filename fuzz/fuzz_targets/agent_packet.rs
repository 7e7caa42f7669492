//! Arbitrary bytes as a packet the agent reads from its tunnel device or gets from a connector:
//! the agent's IPv6 outbound check (`classify6`), the answer to a refused packet (`refusal6`)
//! and the inbound check (IPv4 and IPv6) never panic, and a refusal is a well-formed IPv6
//! packet of at most 1280 bytes back to the sender.
//!
//! Both checks live in the core's `outbound.rs` and `inbound.rs`, which are pure (etherparse
//! and ztna-proto only), so they are compiled into this target as modules, with `tcp_flows.rs`
//! and `tcp_carriage.rs` (also pure), which build the TCP reset.
#![no_main]

#[path = "../../core/src/outbound.rs"]
#[allow(dead_code, unreachable_pub)]
mod outbound;

// The TCP reset `refusal6` answers with is built by the core's `tcp_flows.rs`, which reads
// segments with `tcp_carriage.rs`'s `tcp_body`.
#[path = "../../core/src/tcp_flows.rs"]
#[allow(dead_code, unreachable_pub)]
mod tcp_flows;

#[path = "../../core/src/tcp_carriage.rs"]
#[allow(dead_code, unreachable_pub)]
mod tcp_carriage;

#[path = "../../core/src/inbound.rs"]
#[allow(dead_code, unreachable_pub)]
mod inbound;

use std::net::{Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use ztna_proto::service::tunnel_ipv6;
use ztna_proto::{PortRange, ServiceDef};

const AGENT: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const SVC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 0, 0, 0, 0, 0, 1);

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let svc = ServiceDef {
        name: "svc".into(),
        address: Ipv4Addr::new(10, 100, 0, 1),
        address6: Some(SVC6),
        udp: vec![PortRange::single(53)],
        tcp: vec![PortRange::single(443)],
        icmp: mode & 1 == 1,
        connector: String::new(),
        names: None,
    };
    // Mostly IPv6 with the addresses the checks look for, so that they get past the first tests.
    let mut p = rest.to_vec();
    if mode & 2 == 2 && p.len() >= 40 {
        p[0] = 0x60 | (p[0] & 0x0f);
        let (src, dst) = if mode & 4 == 4 {
            (tunnel_ipv6(AGENT), SVC6)
        } else {
            (SVC6, tunnel_ipv6(AGENT))
        };
        p[8..24].copy_from_slice(&src.octets());
        p[24..40].copy_from_slice(&dst.octets());
        if mode & 8 == 8 {
            let len = u16::try_from(p.len() - 40).unwrap_or(u16::MAX);
            p[4..6].copy_from_slice(&len.to_be_bytes());
        }
    }
    let own = Some(tunnel_ipv6(AGENT));
    if let Ok(x) = outbound::classify6(&p, own) {
        assert_eq!(&p[8..24], &tunnel_ipv6(AGENT).octets());
        let _ = x.want.allowed_by(&svc);
    }
    if let Some(answer) = outbound::refusal6(&p) {
        assert!(answer.len() <= usize::from(outbound::IPV6_MIN_MTU));
        let h = etherparse::Ipv6HeaderSlice::from_slice(&answer).expect("an IPv6 header");
        assert_eq!(h.destination(), <[u8; 16]>::try_from(&p[8..24]).unwrap());
    }
    let _ = inbound::check(&p, std::slice::from_ref(&svc), Some(AGENT));
});
