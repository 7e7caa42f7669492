//! Userspace twin of the relay's XDP program (`relay-ebpf/xdp`), pure.
//!
//! Given an Ethernet frame, its ingress interface, the program's settings, the channel map and
//! the learned next hops, [`classify`] returns what the kernel does with the frame and, when it
//! forwards it, the frame it sends. The kernel updates the IPv4 checksum incrementally; this
//! twin recomputes it from scratch, so comparing the two (`kernel_matches_the_twin` in
//! `tests.rs`) checks the kernel's arithmetic as well as its decisions. Both clear the UDP
//! checksum.

use std::collections::HashMap;

use ztna_relay_ebpf_common::{
    Config, EndKey, Ends, NextHop, CHANNEL_DATA, COUNTER_DROPPED_MALFORMED,
    COUNTER_DROPPED_UNBOUND, COUNTER_DROPPED_UNKNOWN, FLAG_PASS_UNKNOWN, FORWARD_TTL, HEADER_LEN,
    MAX_CHANNEL,
};
use ztna_xdp_loader::checksum::refresh_ipv4_udp;

/// What the XDP program does with a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Not channel data: the kernel's stack gets it.
    Pass,
    /// Channel data left to the relay's socket.
    PassChannel,
    /// Dropped and counted in this counter.
    Drop(u32),
    /// Rewritten and sent out of interface `ifindex`.
    Forward {
        /// Out of this interface (`XDP_TX` when it is the ingress one).
        ifindex: u32,
        /// The frame sent.
        frame: Vec<u8>,
    },
}

const ETH_LEN: usize = 14;
const UDP_AT: usize = ETH_LEN + 20;
const PAYLOAD_AT: usize = UDP_AT + 8;

/// What the program looks up and learns: the channel map, the bound addresses, the next hops.
pub(crate) struct Maps<'a, C: Fn([u8; 4]) -> Option<Ends>> {
    pub(crate) channels: C,
    pub(crate) bound: &'a std::collections::HashSet<EndKey>,
    pub(crate) hops: &'a mut HashMap<EndKey, NextHop>,
}

/// Learns how to reach `src` from `frame`, as the program does.
fn learn(frame: &[u8], ingress: u32, src: EndKey, hops: &mut HashMap<EndKey, NextHop>) {
    let mut peer_mac = [0; 6];
    peer_mac.copy_from_slice(&frame[6..12]);
    let mut own_mac = [0; 6];
    own_mac.copy_from_slice(&frame[0..6]);
    hops.insert(
        src,
        NextHop {
            ifindex: ingress,
            peer_mac,
            own_mac,
        },
    );
}

/// Classifies `frame`, arrived on `ingress`, as the program does; learns next hops into
/// `maps.hops` as the program does.
pub(crate) fn classify<C: Fn([u8; 4]) -> Option<Ends>>(
    frame: &[u8],
    ingress: u32,
    cfg: &Config,
    maps: Maps<'_, C>,
) -> Verdict {
    if frame.len() < PAYLOAD_AT || frame[12..14] != [0x08, 0x00] {
        return Verdict::Pass;
    }
    let ip = &frame[ETH_LEN..];
    if ip[9] != 17 || ip[0] != 0x45 || cfg.port == 0 {
        return Verdict::Pass;
    }
    if cfg.addr != [0; 4] && ip[16..20] != cfg.addr {
        return Verdict::Pass;
    }
    let udp = &frame[UDP_AT..];
    if u16::from_be_bytes([udp[2], udp[3]]) != cfg.port {
        return Verdict::Pass;
    }
    let src = EndKey {
        addr: [ip[12], ip[13], ip[14], ip[15]],
        port: [udp[0], udp[1]],
        pad: [0; 2],
    };
    let Some(&kind) = frame.get(PAYLOAD_AT) else {
        return Verdict::Pass;
    };
    if kind != CHANNEL_DATA {
        if maps.bound.contains(&src) {
            learn(frame, ingress, src, maps.hops);
        }
        return Verdict::Pass;
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return Verdict::PassChannel;
    }
    let Some(hdr) = frame.get(PAYLOAD_AT..PAYLOAD_AT + HEADER_LEN) else {
        return Verdict::Drop(COUNTER_DROPPED_MALFORMED);
    };
    let channel = [hdr[1], hdr[2], hdr[3], hdr[4]];
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if udp_len < 8 + HEADER_LEN || u32::from_be_bytes(channel) > MAX_CHANNEL {
        return Verdict::Drop(COUNTER_DROPPED_MALFORMED);
    }
    let Some(ends) = (maps.channels)(channel) else {
        if cfg.flags & FLAG_PASS_UNKNOWN != 0 {
            return Verdict::PassChannel;
        }
        return Verdict::Drop(COUNTER_DROPPED_UNKNOWN);
    };
    if ends.userspace() {
        return Verdict::PassChannel;
    }
    if ends.a == ends.b {
        return Verdict::Drop(COUNTER_DROPPED_UNBOUND);
    }
    let to = if src == ends.a {
        ends.b
    } else if src == ends.b {
        ends.a
    } else {
        return Verdict::Drop(COUNTER_DROPPED_UNBOUND);
    };
    learn(frame, ingress, src, maps.hops);
    let Some(hop) = maps.hops.get(&to).copied() else {
        return Verdict::PassChannel;
    };
    let mut out = frame.to_vec();
    out[0..6].copy_from_slice(&hop.peer_mac);
    out[6..12].copy_from_slice(&hop.own_mac);
    let relay_addr = [ip[16], ip[17], ip[18], ip[19]];
    let relay_port = [udp[2], udp[3]];
    {
        let p = &mut out[ETH_LEN..];
        p[12..16].copy_from_slice(&relay_addr);
        p[16..20].copy_from_slice(&to.addr);
        p[8] = FORWARD_TTL;
        p[20..22].copy_from_slice(&relay_port);
        p[22..24].copy_from_slice(&to.port);
        // No UDP checksum: the program clears it (see there why).
        p[26..28].fill(0);
        refresh_ipv4_udp(p);
    }
    Verdict::Forward {
        ifindex: hop.ifindex,
        frame: out,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
    use proptest::prelude::*;

    pub(crate) const RELAY: [u8; 4] = [192, 0, 2, 1];
    pub(crate) const AGENT: [u8; 4] = [198, 51, 100, 7];
    pub(crate) const CONNECTOR: [u8; 4] = [203, 0, 113, 9];
    pub(crate) const RELAY_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    pub(crate) const ROUTER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xfe];
    pub(crate) const CFG: Config = Config {
        addr: RELAY,
        port: 4433,
        flags: 0,
        pad: 0,
    };
    pub(crate) const CHANNEL: u32 = 7;

    /// [`classify`] with no bound addresses.
    pub(crate) fn classify_with(
        frame: &[u8],
        ingress: u32,
        cfg: &Config,
        channels: impl Fn([u8; 4]) -> Option<Ends>,
        hops: &mut HashMap<EndKey, NextHop>,
    ) -> Verdict {
        let bound = std::collections::HashSet::new();
        classify(
            frame,
            ingress,
            cfg,
            Maps {
                channels,
                bound: &bound,
                hops,
            },
        )
    }

    pub(crate) fn end(addr: [u8; 4], port: u16) -> EndKey {
        EndKey {
            addr,
            port: port.to_be_bytes(),
            pad: [0; 2],
        }
    }

    pub(crate) fn ends() -> Ends {
        Ends {
            a: end(AGENT, 40000),
            b: end(CONNECTOR, 50000),
        }
    }

    pub(crate) fn lookup(ch: [u8; 4]) -> Option<Ends> {
        (ch == CHANNEL.to_be_bytes()).then(ends)
    }

    /// A frame from `src:sport` to the relay's port carrying `payload`.
    pub(crate) fn frame(src: [u8; 4], sport: u16, ttl: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(ROUTER_MAC, RELAY_MAC)
            .ipv4(src, RELAY, ttl)
            .udp(sport, 4433)
            .write(&mut out, payload)
            .expect("build");
        out
    }

    /// Channel data of `channel` with an inner packet of `inner` bytes.
    pub(crate) fn channel_data(channel: u32, inner: &[u8]) -> Vec<u8> {
        let mut p = vec![CHANNEL_DATA];
        p.extend_from_slice(&channel.to_be_bytes());
        p.extend_from_slice(inner);
        p
    }

    /// Checks the frame's IPv4 and UDP checksums and returns (src, sport, dst, dport, ttl,
    /// payload).
    pub(crate) fn check(frame: &[u8]) -> ([u8; 4], u16, [u8; 4], u16, u8, Vec<u8>) {
        let s = SlicedPacket::from_ethernet(frame).expect("parses");
        let Some(etherparse::NetSlice::Ipv4(ip)) = s.net else {
            panic!("not ipv4")
        };
        let h = ip.header().to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum(), "IPv4 checksum");
        let Some(TransportSlice::Udp(udp)) = s.transport else {
            panic!("not udp")
        };
        assert_eq!(
            udp.checksum(),
            0,
            "a forwarded datagram carries no UDP checksum"
        );
        (
            h.source,
            udp.source_port(),
            h.destination,
            udp.destination_port(),
            h.time_to_live,
            udp.payload().to_vec(),
        )
    }

    #[test]
    fn forwards_between_the_ends_once_both_are_heard_from() {
        let mut hops = HashMap::new();
        let data = channel_data(CHANNEL, b"inner quic");
        // The agent speaks first: the connector's next hop is unknown, userspace forwards.
        assert_eq!(
            classify_with(&frame(AGENT, 40000, 60, &data), 3, &CFG, lookup, &mut hops),
            Verdict::PassChannel
        );
        // The connector's packet goes to the agent, through the hop the agent's came from.
        let Verdict::Forward {
            ifindex,
            frame: out,
        } = classify_with(
            &frame(CONNECTOR, 50000, 61, &data),
            3,
            &CFG,
            lookup,
            &mut hops,
        )
        else {
            panic!("not forwarded")
        };
        assert_eq!(ifindex, 3);
        assert_eq!(&out[0..6], &ROUTER_MAC);
        assert_eq!(&out[6..12], &RELAY_MAC);
        assert_eq!(check(&out), (RELAY, 4433, AGENT, 40000, 64, data.clone()));
        // And now the agent's goes to the connector.
        let Verdict::Forward { frame: out, .. } =
            classify_with(&frame(AGENT, 40000, 9, &data), 3, &CFG, lookup, &mut hops)
        else {
            panic!("not forwarded")
        };
        assert_eq!(check(&out), (RELAY, 4433, CONNECTOR, 50000, 64, data));
    }

    #[test]
    fn a_bound_address_teaches_its_next_hop_with_its_quic() {
        let mut hops = HashMap::new();
        let bound = std::collections::HashSet::from([end(CONNECTOR, 50000)]);
        let quic = |src, sport| frame(src, sport, 64, &[0x40, 1, 2, 3]);
        // A stranger's QUIC teaches nothing; the connector's does.
        for (src, sport) in [(AGENT, 40001), (CONNECTOR, 50000)] {
            let v = classify(
                &quic(src, sport),
                2,
                &CFG,
                Maps {
                    channels: lookup,
                    bound: &bound,
                    hops: &mut hops,
                },
            );
            assert_eq!(v, Verdict::Pass);
        }
        assert_eq!(
            hops.keys().copied().collect::<Vec<_>>(),
            vec![end(CONNECTOR, 50000)]
        );
        // So the agent's first channel data is forwarded in the kernel, to a connector that
        // never sent any.
        let data = channel_data(CHANNEL, b"one way");
        let Verdict::Forward {
            ifindex,
            frame: out,
        } = classify_with(&frame(AGENT, 40000, 64, &data), 2, &CFG, lookup, &mut hops)
        else {
            panic!("not forwarded")
        };
        assert_eq!(ifindex, 2);
        assert_eq!(check(&out), (RELAY, 4433, CONNECTOR, 50000, 64, data));
    }

    #[test]
    fn verdicts() {
        let mut hops = HashMap::new();
        let mut v = |f: &[u8]| classify_with(f, 1, &CFG, lookup, &mut hops);
        let data = channel_data(CHANNEL, b"x");
        // Not channel data: QUIC (long and short header), a probe, another port.
        assert_eq!(v(&frame(AGENT, 40000, 64, &[0xc0, 1, 2])), Verdict::Pass);
        assert_eq!(v(&frame(AGENT, 40000, 64, &[0x40, 1, 2])), Verdict::Pass);
        assert_eq!(v(&frame(AGENT, 40000, 64, &[0x00, 1, 2])), Verdict::Pass);
        assert_eq!(v(&frame(AGENT, 40000, 64, b"")), Verdict::Pass);
        let mut other_port = frame(AGENT, 40000, 64, &data);
        other_port[UDP_AT + 3] ^= 1;
        assert_eq!(v(&other_port), Verdict::Pass);
        let mut other_addr = frame(AGENT, 40000, 64, &data);
        other_addr[ETH_LEN + 19] ^= 1;
        assert_eq!(v(&other_addr), Verdict::Pass);
        // Malformed, unknown, unbound.
        assert_eq!(
            v(&frame(AGENT, 40000, 64, &[CHANNEL_DATA, 0, 0])),
            Verdict::Drop(COUNTER_DROPPED_MALFORMED)
        );
        assert_eq!(
            v(&frame(
                AGENT,
                40000,
                64,
                &channel_data(MAX_CHANNEL + 1, b"")
            )),
            Verdict::Drop(COUNTER_DROPPED_MALFORMED)
        );
        assert_eq!(
            v(&frame(AGENT, 40000, 64, &channel_data(8, b"x"))),
            Verdict::Drop(COUNTER_DROPPED_UNKNOWN)
        );
        assert_eq!(
            v(&frame(AGENT, 40001, 64, &data)),
            Verdict::Drop(COUNTER_DROPPED_UNBOUND)
        );
        assert_eq!(
            v(&frame([198, 51, 100, 8], 40000, 64, &data)),
            Verdict::Drop(COUNTER_DROPPED_UNBOUND)
        );
        // A fragment is the kernel's to reassemble.
        let mut frag = frame(AGENT, 40000, 64, &data);
        frag[ETH_LEN + 6] |= 0x20;
        assert_eq!(v(&frag), Verdict::PassChannel);
    }

    #[test]
    fn unknown_channels_pass_when_the_map_is_incomplete() {
        let mut hops = HashMap::new();
        let cfg = Config {
            flags: FLAG_PASS_UNKNOWN,
            ..CFG
        };
        assert_eq!(
            classify_with(
                &frame(AGENT, 40000, 64, &channel_data(8, b"x")),
                1,
                &cfg,
                lookup,
                &mut hops
            ),
            Verdict::PassChannel
        );
        // An IPv6 end: userspace forwards.
        assert_eq!(
            classify_with(
                &frame(AGENT, 40000, 64, &channel_data(CHANNEL, b"x")),
                1,
                &CFG,
                |_| Some(Ends::default()),
                &mut hops
            ),
            Verdict::PassChannel
        );
    }

    #[test]
    fn a_partial_checksum_is_not_carried_on() {
        let mut hops = HashMap::new();
        let data = channel_data(CHANNEL, b"no checksum");
        classify_with(&frame(AGENT, 40000, 64, &data), 1, &CFG, lookup, &mut hops);
        // What a veth carries for a local sender's offloaded checksum: a seed, not a checksum.
        let mut f = frame(CONNECTOR, 50000, 64, &data);
        f[UDP_AT + 6..UDP_AT + 8].copy_from_slice(&[0x12, 0x34]);
        let Verdict::Forward { frame: out, .. } = classify_with(&f, 1, &CFG, lookup, &mut hops)
        else {
            panic!("not forwarded")
        };
        assert_eq!(&out[UDP_AT + 6..UDP_AT + 8], &[0, 0]);
        check(&out);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let mut hops = HashMap::new();
            let _ = classify_with(&bytes, 1, &CFG, lookup, &mut hops);
        }

        #[test]
        fn forwarded_ip_checksums_are_valid(
            inner in proptest::collection::vec(any::<u8>(), 0..300),
            ttl in 1u8..=255,
            sport in 1u16..,
        ) {
            let mut hops = HashMap::new();
            let data = channel_data(CHANNEL, &inner);
            let ends = Ends { a: end(AGENT, sport), b: end(CONNECTOR, 50000) };
            classify_with(&frame(CONNECTOR, 50000, 64, &data), 1, &CFG, |_| Some(ends), &mut hops);
            let Verdict::Forward { frame: out, .. } =
                classify_with(&frame(AGENT, sport, ttl, &data), 1, &CFG, |_| Some(ends), &mut hops)
            else {
                panic!("not forwarded")
            };
            let (src, sp, dst, dp, t, payload) = check(&out);
            prop_assert_eq!((src, sp, dst, dp, t), (RELAY, 4433, CONNECTOR, 50000, 64));
            prop_assert_eq!(payload, data);
        }
    }
}
