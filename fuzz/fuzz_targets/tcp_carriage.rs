//! Arbitrary bytes as the TCP carriage stream (the connector's TCP segments to the agent,
//! length-prefixed): the agent's frame reader never panics, holds at most one partial frame,
//! hands out only packets at least an IPv4 header long, and what it hands out re-frames to the
//! bytes it consumed, whatever the chunking.
//!
//! The reader lives in `core/src/tcp_carriage.rs`, which is pure (bytes and thiserror only), so
//! it is compiled into this target as a module.
#![no_main]

#[path = "../../core/src/tcp_carriage.rs"]
#[allow(dead_code, unreachable_pub)]
mod tcp_carriage;

use libfuzzer_sys::fuzz_target;
use tcp_carriage::{frame_header, FrameReader, HEADER_LEN, MIN_PACKET};

fuzz_target!(|data: &[u8]| {
    let Some((&step, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut r = FrameReader::new();
    let mut reframed = Vec::new();
    for chunk in stream.chunks(step) {
        r.push(chunk);
        while let Some(frame) = r.next_packet() {
            match frame {
                Ok(p) => {
                    assert!(p.len() >= MIN_PACKET);
                    reframed.extend_from_slice(&frame_header(&p).expect("frameable"));
                    reframed.extend_from_slice(&p);
                }
                Err(tcp_carriage::ShortFrame(n)) => {
                    assert!(n < MIN_PACKET);
                    reframed.extend_from_slice(&(n as u16).to_be_bytes());
                    reframed.extend_from_slice(&vec![0u8; n]);
                }
            }
        }
        assert!(r.buffered() <= HEADER_LEN + usize::from(u16::MAX) + step);
    }
    assert_eq!(reframed.len() + r.buffered(), stream.len());
});
