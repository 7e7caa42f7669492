//! Arbitrary bytes as a direct-path probe: framing and authentication never panic, a probe that
//! authenticates re-encodes to the same bytes, and nothing authenticates under a wrong key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztna_proto::probe::{self, ProbeKey};

fuzz_target!(|data: &[u8]| {
    let key = ProbeKey::new(&[7; 32]);
    let _ = probe::peek_tag(data);
    if let Ok(p) = probe::decode(data, &key) {
        assert_eq!(probe::encode(&p, &key, data.len()), data);
        assert!(probe::decode(data, &ProbeKey::new(&[8; 32])).is_err());
    }
});
