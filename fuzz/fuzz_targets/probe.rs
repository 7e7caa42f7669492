//! Arbitrary bytes as direct-path probes: framing and authentication never panic, a probe that
//! authenticates re-encodes to the same bytes, nothing authenticates under a wrong key, and the
//! receiver's replay guard admits no sequence number twice and never a reflected probe.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztna_proto::probe::{self, Direction, Probe, ProbeKey, ProbeKind, ReplayGuard};

fuzz_target!(|data: &[u8]| {
    let key = ProbeKey::new(&[7; 32]);
    let _ = probe::peek_tag(data);
    if let Ok(p) = probe::decode(data, &key) {
        assert_eq!(probe::encode(&p, &key, data.len()), data);
        assert!(probe::decode(data, &ProbeKey::new(&[8; 32])).is_err());
    }
    // The bytes as a series of (seq, time, now, direction) for the replay guard.
    let mut guard = ReplayGuard::new(Direction::ConnectorToAgent, probe::MAX_AGE_MS);
    let mut admitted = std::collections::HashSet::new();
    for c in data.chunks_exact(7) {
        let p = Probe {
            kind: ProbeKind::Ping,
            dir: if c[0] & 1 == 0 {
                Direction::AgentToConnector
            } else {
                Direction::ConnectorToAgent
            },
            tag: [0; 8],
            txid: 0,
            seq: u64::from(u16::from_be_bytes([c[1], c[2]])),
            time_ms: u64::from(u16::from_be_bytes([c[3], c[4]])),
        };
        let now = u64::from(u16::from_be_bytes([c[5], c[6]]));
        let r = if c[0] & 2 == 0 {
            guard.admit(&p, now)
        } else {
            guard.rebase(&p, now)
        };
        if r.is_ok() {
            assert_eq!(p.dir, Direction::AgentToConnector, "reflection admitted");
            assert!(admitted.insert(p.seq), "seq {} admitted twice", p.seq);
        }
    }
});
