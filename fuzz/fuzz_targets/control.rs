//! Feeds arbitrary bytes, split at arbitrary points, to the control-stream decoder: it must never
//! panic, never buffer past its cap, and whatever it decodes must re-encode and decode the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztna_proto::frame::{self, FrameDecoder, MAX_FRAME_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let mut dec = FrameDecoder::new();
    for chunk in rest.chunks(usize::from(split).max(1)) {
        dec.feed(chunk);
        loop {
            match dec.next_message() {
                Ok(Some(msg)) => {
                    let again = frame::encode(&msg).expect("a decoded message re-encodes");
                    assert_eq!(frame::decode_body(&again[4..]).expect("re-decodes"), msg);
                }
                Ok(None) | Err(_) => break,
            }
        }
        assert!(dec.buffered() <= MAX_FRAME_LEN + 4 + chunk.len());
    }
    let _ = frame::decode_body(rest);
});
