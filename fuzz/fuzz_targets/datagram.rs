//! Arbitrary bytes as an outer datagram: decoding never panics, always points inside the
//! datagram, and the canonical re-encoding decodes to the same channel and payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztna_proto::datagram;

fuzz_target!(|data: &[u8]| {
    if let Ok((id, off)) = datagram::decode(data) {
        assert!(off <= data.len());
        let again = datagram::encode(id, &data[off..]);
        assert_eq!(datagram::decode(&again), Ok((id, id.encoded_len())));
        assert_eq!(&again[id.encoded_len()..], &data[off..]);
    }
});
