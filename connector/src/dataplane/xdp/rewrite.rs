//! Userspace twin of the XDP program's decision and rewrite (`connector-ebpf/xdp`), pure.
//!
//! Given an Ethernet frame, the program's configuration and the flow map, [`classify`] returns
//! what the kernel does with the frame and, for a reply to a flow, the IPv4 packet it hands to
//! the AF_XDP socket. The kernel updates checksums incrementally; this twin recomputes them
//! from scratch, so comparing the two (`kernel_rewrite_matches_the_twin` in `tests.rs`) checks the
//! kernel's arithmetic. Frames are classified by the same raw-byte rules as in the kernel.

use ztna_connector_ebpf_common::{Config, FlowKey, FlowValue, REWRITE_TTL};
use ztna_xdp_loader::checksum::refresh_ipv4_udp;

/// What the XDP program does with a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Not for the fast path: the kernel's stack gets it.
    Pass,
    /// UDP to the flow port range that matches no flow: dropped.
    DropUnsolicited,
    /// Fragmented UDP to the flow port range: dropped.
    DropMalformed,
    /// A reply to `key`: the rewritten IPv4 packet (the frame without its Ethernet header,
    /// trailing padding included) goes to the AF_XDP socket.
    Redirect {
        /// The flow the reply belongs to.
        key: FlowKey,
        /// The tunnel-side packet.
        packet: Vec<u8>,
    },
}

const ETH_LEN: usize = 14;
const IP_MF: u16 = 0x2000;
const IP_DF: u16 = 0x4000;
const IP_OFFSET: u16 = 0x1fff;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Classifies `frame` as the XDP program does and builds the rewritten packet.
pub(crate) fn classify(
    frame: &[u8],
    cfg: &Config,
    flows: impl Fn(&FlowKey) -> Option<FlowValue>,
) -> Verdict {
    if frame.len() < ETH_LEN + 20 || frame[12..14] != [0x08, 0x00] {
        return Verdict::Pass;
    }
    let ip = ETH_LEN;
    if frame[ip] >> 4 != 4 || frame[ip + 9] != 17 || cfg.last_port == 0 {
        return Verdict::Pass;
    }
    let frag = be16(frame, ip + 6);
    let ihl = usize::from(frame[ip] & 0x0f) * 4;
    if frag & IP_OFFSET != 0 || ihl < 20 || frame.len() < ip + ihl + 8 {
        return Verdict::Pass;
    }
    let udp = ip + ihl;
    let dport = be16(frame, udp + 2);
    if dport < cfg.first_port || dport > cfg.last_port {
        return Verdict::Pass;
    }
    if frag & IP_MF != 0 {
        return Verdict::DropMalformed;
    }
    let key = FlowKey {
        backend_addr: [
            frame[ip + 12],
            frame[ip + 13],
            frame[ip + 14],
            frame[ip + 15],
        ],
        backend_port: [frame[udp], frame[udp + 1]],
        local_port: [frame[udp + 2], frame[udp + 3]],
    };
    let Some(v) = flows(&key) else {
        return Verdict::DropUnsolicited;
    };
    let mut p = frame[ETH_LEN..].to_vec();
    let udp = ihl;
    p[12..16].copy_from_slice(&v.service_addr);
    p[16..20].copy_from_slice(&v.agent_addr);
    p[8] = REWRITE_TTL;
    p[6..8].copy_from_slice(&(frag & !IP_DF).to_be_bytes());
    p[udp..udp + 2].copy_from_slice(&v.service_port);
    p[udp + 2..udp + 4].copy_from_slice(&v.agent_port);
    refresh_ipv4_udp(&mut p);
    Verdict::Redirect { key, packet: p }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
    use proptest::prelude::*;

    pub(crate) const BACKEND: [u8; 4] = [10, 10, 3, 2];
    pub(crate) const LOCAL: [u8; 4] = [10, 10, 3, 1];
    pub(crate) const CFG: Config = Config {
        first_port: 20000,
        last_port: 29999,
    };

    pub(crate) fn value() -> FlowValue {
        FlowValue {
            service_addr: [10, 100, 0, 1],
            agent_addr: [100, 64, 0, 2],
            service_port: 7u16.to_be_bytes(),
            agent_port: 40000u16.to_be_bytes(),
        }
    }

    /// An Ethernet frame with an IPv4/UDP packet from the backend to the connector.
    pub(crate) fn frame(sport: u16, dport: u16, ttl: u8, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
            .ipv4(BACKEND, LOCAL, ttl)
            .udp(sport, dport);
        let mut out = Vec::new();
        b.write(&mut out, payload).expect("build");
        out
    }

    pub(crate) fn lookup(k: &FlowKey) -> Option<FlowValue> {
        (k.backend_addr == BACKEND
            && k.backend_port == 7u16.to_be_bytes()
            && k.local_port == 20001u16.to_be_bytes())
        .then(value)
    }

    /// Checks the packet's IPv4 and UDP checksums with etherparse and returns (src, sport,
    /// dst, dport, ttl, payload).
    pub(crate) fn check(packet: &[u8]) -> ([u8; 4], u16, [u8; 4], u16, u8, Vec<u8>) {
        let s = SlicedPacket::from_ip(packet).expect("parses");
        let Some(etherparse::NetSlice::Ipv4(ip)) = s.net else {
            panic!("not ipv4")
        };
        let h = ip.header().to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum(), "IPv4 checksum");
        assert!(!h.dont_fragment);
        let Some(TransportSlice::Udp(udp)) = s.transport else {
            panic!("not udp")
        };
        let want = udp
            .to_header()
            .calc_checksum_ipv4(&h, udp.payload())
            .expect("checksum");
        if udp.checksum() != 0 {
            // 0: the sender computed none, which IPv4 allows.
            assert_eq!(udp.checksum(), want, "UDP checksum");
        }
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
    fn reply_is_rewritten_for_the_agent() {
        let f = frame(7, 20001, 63, b"echo:hello");
        let Verdict::Redirect { key, packet } = classify(&f, &CFG, lookup) else {
            panic!("not redirected")
        };
        assert_eq!(key.local_port, 20001u16.to_be_bytes());
        let (src, sport, dst, dport, ttl, payload) = check(&packet);
        assert_eq!(
            (src, sport, dst, dport, ttl),
            ([10, 100, 0, 1], 7, [100, 64, 0, 2], 40000, 64)
        );
        assert_eq!(payload, b"echo:hello");
    }

    #[test]
    fn verdicts() {
        assert_eq!(
            classify(&frame(7, 20002, 64, b"x"), &CFG, lookup),
            Verdict::DropUnsolicited
        );
        assert_eq!(
            classify(&frame(8, 20001, 64, b"x"), &CFG, lookup),
            Verdict::DropUnsolicited
        );
        assert_eq!(
            classify(&frame(7, 19999, 64, b"x"), &CFG, lookup),
            Verdict::Pass
        );
        assert_eq!(
            classify(&frame(7, 30000, 64, b"x"), &CFG, lookup),
            Verdict::Pass
        );
        let off = Config {
            first_port: 0,
            last_port: 0,
        };
        assert_eq!(
            classify(&frame(7, 20001, 64, b"x"), &off, lookup),
            Verdict::Pass
        );
        // More fragments: dropped; a later fragment: passed.
        let mut mf = frame(7, 20001, 64, b"x");
        mf[20] |= 0x20;
        assert_eq!(classify(&mf, &CFG, lookup), Verdict::DropMalformed);
        let mut later = frame(7, 20001, 64, b"x");
        later[21] = 1;
        assert_eq!(classify(&later, &CFG, lookup), Verdict::Pass);
        // Not UDP, not IPv4, truncated.
        let mut tcp = frame(7, 20001, 64, b"x");
        tcp[23] = 6;
        assert_eq!(classify(&tcp, &CFG, lookup), Verdict::Pass);
        let mut arp = frame(7, 20001, 64, b"x");
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(classify(&arp, &CFG, lookup), Verdict::Pass);
        assert_eq!(
            classify(&frame(7, 20001, 64, b"x")[..40], &CFG, lookup),
            Verdict::Pass
        );
        assert_eq!(classify(&[], &CFG, lookup), Verdict::Pass);
    }

    #[test]
    fn zero_udp_checksum_stays_zero() {
        let mut f = frame(7, 20001, 64, b"abc");
        f[40..42].fill(0);
        let Verdict::Redirect { packet, .. } = classify(&f, &CFG, lookup) else {
            panic!("not redirected")
        };
        assert_eq!(&packet[26..28], &[0, 0]);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let _ = classify(&bytes, &CFG, |_| Some(value()));
        }

        #[test]
        fn rewritten_checksums_are_valid(
            ttl in 1..=255u8,
            payload in proptest::collection::vec(any::<u8>(), 0..1400),
            sport in any::<u16>(),
            aport in any::<u16>(),
            svc in any::<[u8; 4]>(),
            agent in any::<[u8; 4]>(),
        ) {
            let v = FlowValue {
                service_addr: svc,
                agent_addr: agent,
                service_port: sport.to_be_bytes(),
                agent_port: aport.to_be_bytes(),
            };
            let f = frame(53, 25000, ttl, &payload);
            let Verdict::Redirect { packet, .. } = classify(&f, &CFG, |_| Some(v)) else {
                panic!("not redirected")
            };
            let got = check(&packet);
            prop_assert_eq!(got, (svc, sport, agent, aport, 64, payload));
        }
    }
}
