//! Tests of the loader's pure helpers, and of the real XDP program against its twin
//! ([`rewrite`]) through `BPF_PROG_TEST_RUN` (needs root; skipped otherwise, or when the
//! connector was built without the program).

use super::rewrite::tests::{frame, lookup, value, BACKEND, CFG};
use super::rewrite::{classify, Verdict};
use super::*;
use aya::programs::{TestRun, TestRunOptions, Xdp, XdpMode as AyaMode};
use ztna_xdp_loader::{attach, if_index, is_busy, netlink, xdp_program};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

#[test]
fn reply_keys() {
    let Verdict::Redirect { packet, .. } = classify(&frame(7, 20001, 64, b"hi"), &CFG, lookup)
    else {
        panic!("not redirected")
    };
    assert_eq!(
        reply_key(&packet),
        Some((
            Ipv4Addr::new(100, 64, 0, 2),
            40000,
            Ipv4Addr::new(10, 100, 0, 1),
            7
        ))
    );
    assert_eq!(reply_key(&packet[..20]), None);
    assert_eq!(reply_key(&[]), None);
}

#[test]
fn port_unreachable_is_recognised() {
    let local = Ipv4Addr::new(10, 10, 3, 1);
    // The datagram the connector sent: 10.10.3.1:20001 -> 10.10.3.2:5999.
    let mut sent = Vec::new();
    etherparse::PacketBuilder::ipv4(local.octets(), BACKEND, 64)
        .udp(20001, 5999)
        .write(&mut sent, b"hello")
        .expect("build");
    let mut icmp = Vec::new();
    etherparse::PacketBuilder::ipv4(BACKEND, local.octets(), 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port,
        ))
        .write(&mut icmp, &sent[..28])
        .expect("build");
    assert_eq!(
        port_unreachable_about(&icmp, local),
        Some((20001, SocketAddrV4::new(Ipv4Addr::from(BACKEND), 5999)))
    );
    assert_eq!(
        port_unreachable_about(&icmp, Ipv4Addr::new(10, 10, 3, 9)),
        None
    );
    assert_eq!(port_unreachable_about(&icmp[..40], local), None);
    assert_eq!(port_unreachable_about(&sent, local), None);
    assert_eq!(port_unreachable_about(&[], local), None);
}

#[test]
fn udp_checksums_are_completed() {
    let Verdict::Redirect { packet, .. } =
        classify(&frame(7, 20001, 64, b"payload!"), &CFG, lookup)
    else {
        panic!("not redirected")
    };
    let mut p = packet.clone();
    assert!(!finish_udp_checksum(&mut p), "a valid checksum is kept");
    assert_eq!(p, packet);
    // A partial (pseudo-header only) checksum, as an offloading sender leaves it.
    p[26..28].copy_from_slice(&[0x12, 0x34]);
    assert!(finish_udp_checksum(&mut p));
    assert_eq!(p, packet);
    super::rewrite::tests::check(&p);
    let mut none = packet.clone();
    none[26..28].fill(0);
    assert!(!finish_udp_checksum(&mut none), "no checksum stays none");
    assert!(!finish_udp_checksum(&mut []));
    assert!(!finish_udp_checksum(&mut packet[..24].to_vec()));
}

proptest::proptest! {
    /// Any rewritten reply: a valid checksum is kept, a partial or wrong one is completed to
    /// the valid one, and the rest of the packet is never touched.
    #[test]
    fn udp_checksums_of_any_length_are_completed(
        payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1400),
        wrong in 1u16..,
    ) {
        let Verdict::Redirect { packet, .. } =
            classify(&frame(7, 20001, 64, &payload), &CFG, lookup)
        else {
            panic!("not redirected")
        };
        let mut p = packet.clone();
        proptest::prop_assert!(!finish_udp_checksum(&mut p));
        proptest::prop_assert_eq!(&p, &packet);
        if wrong.to_be_bytes() != [packet[26], packet[27]] {
            p[26..28].copy_from_slice(&wrong.to_be_bytes());
            proptest::prop_assert!(finish_udp_checksum(&mut p));
            proptest::prop_assert_eq!(&p, &packet);
        }
    }
}

#[test]
fn a_stale_netlink_program_is_replaced() {
    let Some(object) =
        ztna_xdp_loader::object_for_test(OBJECT, "a_stale_netlink_program_is_replaced")
    else {
        return;
    };
    // In a network namespace of this thread's own, on its loopback (generic XDP).
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread, which touches nothing else.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
        let index = if_index("lo").expect("lo");
        // A program attached through netlink by a process that then died.
        let mut stale = load(object).expect("load");
        let fd = {
            use std::os::fd::{AsFd, AsRawFd};
            let program = xdp_program(&mut stale, common::PROGRAM).expect("program");
            program.fd().expect("fd").as_fd().as_raw_fd()
        };
        netlink::set_xdp_fd(index, fd, netlink::XDP_FLAGS_SKB_MODE).expect("netlink attach");
        drop(stale); // the program stays attached: netlink holds it, not this process
        let mut fresh = load(object).expect("load");
        let err = xdp_program(&mut fresh, common::PROGRAM)
            .expect("program")
            .attach("lo", AyaMode::Skb)
            .expect_err("attaching over a netlink program fails");
        assert!(is_busy(&err), "{err}");
        attach(&mut fresh, common::PROGRAM, "lo", Attached::Generic)
            .expect("the stale program is replaced");
    })
    .join()
    .expect("no panic");
}

#[test]
fn kernel_rewrite_matches_the_twin() {
    let Some(object) = ztna_xdp_loader::object_for_test(OBJECT, "kernel_rewrite_matches_the_twin")
    else {
        return;
    };
    let mut ebpf = load(object).expect("the verifier accepts the program");
    let mut config: Array<MapData, common::Config> =
        take(&mut ebpf, common::MAP_CONFIG).expect("config");
    config.set(0, CFG, 0).expect("set config");
    let mut flows: BpfHashMap<MapData, common::FlowKey, common::FlowValue> =
        take(&mut ebpf, common::MAP_FLOWS).expect("flows");
    let key = common::FlowKey {
        backend_addr: BACKEND,
        backend_port: 7u16.to_be_bytes(),
        local_port: 20001u16.to_be_bytes(),
    };
    flows.insert(key, value(), 0).expect("insert flow");
    let counters: PerCpuArray<MapData, u64> =
        take(&mut ebpf, common::MAP_COUNTERS).expect("counters");
    let program: &Xdp = ebpf
        .program(common::PROGRAM)
        .expect("program")
        .try_into()
        .expect("xdp");

    let mut cases = vec![
        frame(7, 20001, 64, b"echo:hello"),
        frame(7, 20001, 1, &[0xab; 1400]),
        frame(7, 20001, 200, b""),
        frame(7, 20002, 64, b"unsolicited"),
        frame(7, 19999, 64, b"outside the range"),
    ];
    let mut zero_sum = frame(7, 20001, 64, b"no udp checksum");
    zero_sum[40..42].fill(0);
    cases.push(zero_sum);
    let mut fragment = frame(7, 20001, 64, b"first fragment");
    fragment[20] |= 0x20;
    cases.push(fragment);
    for (i, payload_len) in [0usize, 1, 2, 3, 17, 255, 1000].into_iter().enumerate() {
        let payload: Vec<u8> = (0..payload_len).map(|b| (b * 7 + i) as u8).collect();
        cases.push(frame(7, 20001, 64 + i as u8, &payload));
    }

    let sum = |i: u32| -> u64 { counters.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0) };
    for (n, input) in cases.iter().enumerate() {
        let want = classify(input, &CFG, |k| (*k == key).then(value));
        let before = (
            sum(common::COUNTER_DROPPED_NO_SOCKET),
            sum(common::COUNTER_DROPPED_UNSOLICITED),
            sum(common::COUNTER_PASSED),
        );
        let mut out = vec![0u8; input.len() + 256];
        let r = program
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("test run");
        let got = &out[..r.data_size_out as usize];
        match want {
            Verdict::Redirect { packet, .. } => {
                // No AF_XDP socket in the map: the rewritten frame is dropped and counted.
                assert_eq!(r.return_value, XDP_DROP, "case {n}");
                assert_eq!(got, &packet[..], "case {n}: kernel and twin differ");
                super::rewrite::tests::check(&packet);
                assert_eq!(sum(common::COUNTER_DROPPED_NO_SOCKET), before.0 + 1);
            }
            Verdict::DropUnsolicited => {
                assert_eq!(r.return_value, XDP_DROP, "case {n}");
                assert_eq!(sum(common::COUNTER_DROPPED_UNSOLICITED), before.1 + 1);
            }
            Verdict::DropMalformed => assert_eq!(r.return_value, XDP_DROP, "case {n}"),
            Verdict::Pass => {
                assert_eq!(r.return_value, XDP_PASS, "case {n}");
                assert_eq!(got, &input[..], "case {n}: a passed frame is unchanged");
                assert_eq!(sum(common::COUNTER_PASSED), before.2 + 1);
            }
        }
    }
}
