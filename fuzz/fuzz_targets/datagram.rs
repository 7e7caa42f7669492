//! Arbitrary bytes as channel data, from a bound end or a stranger: decoding never panics and
//! always points inside the packet, the canonical re-encoding decodes to the same channel and
//! payload, and the relay's forwarding table forwards only between the bound ends of an open
//! channel.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use ztna_proto::datagram;

#[allow(dead_code)]
#[path = "../../relay/src/forward.rs"]
mod forward;

fuzz_target!(|data: &[u8]| {
    if let Ok((id, off)) = datagram::decode(data) {
        assert!(off <= data.len());
        let again = datagram::encode(id, &data[off..]);
        assert_eq!(datagram::decode(&again), Ok((id, datagram::HEADER_LEN)));
        assert_eq!(&again[datagram::HEADER_LEN..], &data[off..]);
    }
    let agent: SocketAddr = ([198, 51, 100, 1], 4000).into();
    let connector: SocketAddr = ([203, 0, 113, 2], 5000).into();
    let stranger: SocketAddr = ([192, 0, 2, 9], 4000).into();
    let mut t = forward::ForwardTable::default();
    t.bind_session(1, agent);
    t.bind_session(2, connector);
    assert!(t.open(7, 1, 2));
    let open = matches!(datagram::decode(data), Ok((id, _)) if id.get() == 7);
    for (src, other) in [(agent, connector), (connector, agent)] {
        match t.route(src, data) {
            forward::Verdict::Forward(to) => assert!(open && to == other),
            forward::Verdict::Drop(_) => assert!(!open),
        }
    }
    assert!(!matches!(
        t.route(stranger, data),
        forward::Verdict::Forward(_)
    ));
});
