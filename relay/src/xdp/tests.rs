//! Tests of the loader's helpers, and of the real XDP program against its twin ([`rewrite`])
//! through `BPF_PROG_TEST_RUN` (needs root; skipped otherwise, or when the relay was built
//! without the program, unless `ZTNA_REQUIRE_EBPF=1`).

use std::collections::HashMap;

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::{TestRun, TestRunOptions, Xdp};

use super::rewrite::tests::{
    channel_data, end, ends, frame, lookup, AGENT, CFG, CHANNEL, CONNECTOR,
};
use super::rewrite::{classify, Maps, Verdict};
use super::*;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

#[test]
fn ends_of_ipv4_and_mapped_addresses_only() {
    let v4: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let mapped: SocketAddr = "[::ffff:203.0.113.9]:50000".parse().unwrap();
    let v6: SocketAddr = "[2001:db8::1]:50000".parse().unwrap();
    assert_eq!(
        super::ends(v4, mapped),
        common::Ends {
            a: end(AGENT, 40000),
            b: end(CONNECTOR, 50000)
        }
    );
    assert!(super::ends(v4, v6).userspace());
    assert!(super::ends(v6, v4).userspace());
}

#[test]
fn loopback_and_ipv6_binds_are_refused() {
    let e = pick_interface(None, "127.0.0.1:4433".parse().unwrap()).unwrap_err();
    assert!(format!("{e:#}").contains("loopback"), "{e:#}");
    let e = pick_interface(Some("lo"), "0.0.0.0:4433".parse().unwrap()).unwrap_err();
    assert!(format!("{e:#}").contains("loopback"), "{e:#}");
    let e = pick_interface(None, "[2001:db8::1]:4433".parse().unwrap()).unwrap_err();
    assert!(format!("{e:#}").contains("IPv4"), "{e:#}");
    assert_eq!(
        pick_interface(Some("eth7"), "0.0.0.0:4433".parse().unwrap()).unwrap(),
        "eth7"
    );
}

#[test]
fn kernel_matches_the_twin() {
    let Some(object) = ztna_xdp_loader::object_for_test(OBJECT, "kernel_matches_the_twin") else {
        return;
    };
    let mut ebpf = ztna_xdp_loader::load(object, common::PROGRAM).expect("the verifier accepts");
    let mut config: Array<MapData, common::Config> =
        take(&mut ebpf, common::MAP_CONFIG).expect("config");
    config.set(0, CFG, 0).expect("set config");
    let mut channels: BpfHashMap<MapData, [u8; 4], common::Ends> =
        take(&mut ebpf, common::MAP_CHANNELS).expect("channels");
    channels
        .insert(CHANNEL.to_be_bytes(), ends(), 0)
        .expect("insert channel");
    // A channel whose connector end is reached through another interface (a redirect).
    let far = common::Ends {
        a: end(AGENT, 40000),
        b: end([203, 0, 113, 77], 50000),
    };
    channels
        .insert(9u32.to_be_bytes(), far, 0)
        .expect("insert channel");
    let mut next_hops: BpfHashMap<MapData, common::EndKey, common::NextHop> =
        take(&mut ebpf, common::MAP_NEXT_HOPS).expect("next hops");
    let far_hop = common::NextHop {
        ifindex: 999,
        peer_mac: [2, 0, 0, 0, 0, 0x77],
        own_mac: [2, 0, 0, 0, 0, 0x78],
    };
    next_hops.insert(far.b, far_hop, 0).expect("insert hop");
    // The connector's session address: its QUIC teaches the program its next hop.
    let mut bound_map: BpfHashMap<MapData, common::EndKey, u8> =
        take(&mut ebpf, common::MAP_BOUND).expect("bound");
    let conn_end = end(CONNECTOR, 50000);
    bound_map.insert(conn_end, 1, 0).expect("insert bound");
    let bound = std::collections::HashSet::from([conn_end]);
    let counters: PerCpuArray<MapData, u64> =
        take(&mut ebpf, common::MAP_COUNTERS).expect("counters");
    let program: &Xdp = ebpf
        .program(common::PROGRAM)
        .expect("program")
        .try_into()
        .expect("xdp");

    let data = channel_data(CHANNEL, b"inner quic packet");
    let big = channel_data(CHANNEL, &[0x5a; 1358]);
    let mut zero_sum = frame(CONNECTOR, 50000, 64, &data);
    zero_sum[40..42].fill(0);
    let mut fragment = frame(AGENT, 40000, 64, &data);
    fragment[20] |= 0x20;
    let cases = vec![
        // Before the connector was heard from: userspace forwards.
        frame(AGENT, 40000, 64, &data),
        // A stranger's QUIC teaches nothing; the connector's QUIC teaches its next hop.
        frame(AGENT, 40009, 64, &[0x40, 0, 0, 0, 1]),
        frame(CONNECTOR, 50000, 64, &[0x40, 0, 0, 0, 1]),
        frame(AGENT, 40000, 64, &data),
        frame(CONNECTOR, 50000, 64, &data),
        frame(AGENT, 40000, 3, &big),
        frame(CONNECTOR, 50000, 255, &big),
        zero_sum,
        fragment,
        frame(AGENT, 40000, 64, &channel_data(9, b"to another interface")),
        frame(AGENT, 40000, 64, &channel_data(8, b"unknown")),
        frame(AGENT, 40001, 64, &data),
        frame([192, 0, 2, 200], 40000, 64, &data),
        frame(AGENT, 40000, 64, &[common::CHANNEL_DATA, 0, 0]),
        frame(
            AGENT,
            40000,
            64,
            &channel_data(common::MAX_CHANNEL + 1, b""),
        ),
        frame(AGENT, 40000, 64, &[0xc3, 0, 0, 0, 1]),
        frame(AGENT, 40000, 64, &[0x41, 0, 0, 0, 1]),
        frame(AGENT, 40000, 64, b""),
    ];
    let cases: Vec<Vec<u8>> = cases
        .into_iter()
        .chain((0..8).map(|i| {
            let inner: Vec<u8> = (0..(i * 37 % 200)).map(|b| (b * 13 + i) as u8).collect();
            frame(
                if i % 2 == 0 { AGENT } else { CONNECTOR },
                if i % 2 == 0 { 40000 } else { 50000 },
                (i * 31 + 1) as u8,
                &channel_data(CHANNEL, &inner),
            )
        }))
        .collect();

    let sum = |i: u32| -> u64 { counters.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0) };
    let mut hops: HashMap<common::EndKey, common::NextHop> = HashMap::from([(far.b, far_hop)]);
    let lo = ztna_xdp_loader::if_index("lo").expect("lo");
    let (mut tx, mut redirected, mut dropped, mut passed) = (0, 0, 0, 0);
    for (n, input) in cases.iter().enumerate() {
        let want = classify(
            input,
            lo,
            &CFG,
            Maps {
                channels: |ch| {
                    if ch == 9u32.to_be_bytes() {
                        Some(far)
                    } else {
                        lookup(ch)
                    }
                },
                bound: &bound,
                hops: &mut hops,
            },
        );
        let before: Vec<u64> = (0..common::COUNTERS).map(sum).collect();
        let mut out = vec![0u8; input.len() + 256];
        let r = program
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("test run");
        let got = &out[..r.data_size_out as usize];
        let after: Vec<u64> = (0..common::COUNTERS).map(sum).collect();
        let bumped: Vec<u32> = (0..common::COUNTERS)
            .filter(|&i| after[i as usize] != before[i as usize])
            .collect();
        match &want {
            Verdict::Forward { ifindex, frame } => {
                let action = if *ifindex == lo {
                    tx += 1;
                    XDP_TX
                } else {
                    redirected += 1;
                    XDP_REDIRECT
                };
                assert_eq!(r.return_value, action, "case {n}: {want:?}");
                assert_eq!(got, &frame[..], "case {n}: kernel and twin differ");
                super::rewrite::tests::check(frame);
                assert_eq!(
                    bumped,
                    vec![common::COUNTER_FORWARDED, common::COUNTER_FORWARDED_BYTES],
                    "case {n}"
                );
            }
            Verdict::Drop(counter) => {
                dropped += 1;
                assert_eq!(r.return_value, XDP_DROP, "case {n}: {want:?}");
                assert_eq!(bumped, vec![*counter], "case {n}");
            }
            Verdict::Pass | Verdict::PassChannel => {
                passed += 1;
                assert_eq!(r.return_value, XDP_PASS, "case {n}: {want:?}");
                assert_eq!(got, &input[..], "case {n}: a passed frame is unchanged");
                let counter = if want == Verdict::Pass {
                    common::COUNTER_PASSED
                } else {
                    common::COUNTER_PASSED_CHANNEL
                };
                assert_eq!(bumped, vec![counter], "case {n}");
            }
        }
    }
    // Every kind of verdict was exercised: the first frame (the connector not heard from
    // yet), two QUIC packets, the fragment and three kinds of QUIC or empty passed; four
    // drops; the rest sent.
    assert_eq!((tx, redirected, dropped, passed), (13, 1, 5, 7));
    // The kernel learned the same next hops.
    let learned: HashMap<common::EndKey, common::NextHop> = next_hops
        .iter()
        .map(|kv| kv.expect("read next hop"))
        .collect();
    assert_eq!(learned, hops);
}

#[test]
fn a_full_channel_map_makes_the_program_pass_unknown_channels() {
    let Some(object) = ztna_xdp_loader::object_for_test(
        OBJECT,
        "a_full_channel_map_makes_the_program_pass_unknown_channels",
    ) else {
        return;
    };
    let mut ebpf = ztna_xdp_loader::load(object, common::PROGRAM).expect("load");
    let mut config: Array<MapData, common::Config> =
        take(&mut ebpf, common::MAP_CONFIG).expect("config");
    config.set(0, CFG, 0).expect("set config");
    let mut map = ChannelMap {
        channels: take(&mut ebpf, common::MAP_CHANNELS).expect("channels"),
        bound: take(&mut ebpf, common::MAP_BOUND).expect("bound"),
        config,
        settings: CFG,
        failed: 0,
    };
    let a: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let b: SocketAddr = "203.0.113.9:50000".parse().unwrap();
    for ch in 0..common::MAX_CHANNELS {
        map.set(ch, a, b);
    }
    assert_eq!(map.failed, 0);
    map.set(common::MAX_CHANNELS, a, b);
    assert_eq!(map.failed, 1);
    assert_eq!(
        map.config.get(&0, 0).expect("read config").flags,
        common::FLAG_PASS_UNKNOWN
    );
    map.remove(3);
    let program: &Xdp = ebpf
        .program(common::PROGRAM)
        .expect("program")
        .try_into()
        .expect("xdp");
    let input = frame(AGENT, 40000, 64, &channel_data(common::MAX_CHANNELS, b"x"));
    let r = program
        .test_run(TestRunOptions {
            data_in: Some(&input),
            ..Default::default()
        })
        .expect("test run");
    assert_eq!(
        r.return_value, XDP_PASS,
        "userspace forwards what the map lacks"
    );
}
