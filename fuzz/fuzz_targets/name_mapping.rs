//! Arbitrary bytes as an agent's name mapping (the connector reads them from any agent with a
//! valid certificate), and as a DNS name pattern: decoding never panics, an accepted mapping
//! carries a normalized name and survives re-encoding, and a parsed pattern prints back
//! to a pattern that parses to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztna_proto::names::{decode_mapping, encode_mapping, normalize_name, DomainPattern};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode_mapping(data) {
        assert_eq!(normalize_name(&m.name).as_deref(), Some(m.name.as_str()));
        assert_eq!(decode_mapping(&encode_mapping(&m)), Ok(m.clone()));
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(p) = DomainPattern::parse(s) {
            assert_eq!(DomainPattern::parse(&p.to_string()), Ok(p.clone()));
            assert!(!p.matches(p.domain()) || !p.is_wildcard());
        }
    }
});
