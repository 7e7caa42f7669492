//! Arbitrary bytes as address requests and answers (the relay's second observation port and
//! the ends' mux): decoding never panics, a decoded request's answer is smaller than the
//! request, and a decoded answer re-encodes to the bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztna_proto::observe;

fuzz_target!(|data: &[u8]| {
    if let Ok(nonce) = observe::decode_request(data) {
        let ans = observe::encode_answer(&nonce, "192.0.2.1:9".parse().unwrap());
        assert!(ans.len() < data.len());
    }
    if let Ok((nonce, addr)) = observe::decode_answer(data) {
        let again = observe::encode_answer(&nonce, addr);
        assert_eq!(observe::decode_answer(&again), Ok((nonce, addr)));
    }
});
