//! The second observation of an end's address: a tiny UDP request to the relay's *second* port
//! and its answer, the address the relay saw it come from.
//!
//! An end sends the request from its one socket to the relay's main port + [`PORT_OFFSET`]
//! (+ 2: 4435 beside the default 4433, since + 1 is the connector's default 4434, and a relay
//! and a connector on one host must not take each other's port). The answer is
//! compared with the address the relay observes on its main port (the outer connection's): two
//! different ports on one address mean the end's NAT maps each destination to a new port
//! (endpoint-dependent mapping, a "hard" NAT; see `core::birthday`).
//!
//! **Not an amplifier.** A request is [`REQUEST_LEN`] bytes and an answer [`RESPONSE_LEN`],
//! fewer, so a spoofed request gets a smaller packet sent to its victim, telling it only its
//! own address; the relay also limits answers per source ([`crate`] has no I/O: the relay
//! does). **Not forgeable off-path.** The answer echoes the request's 16 random bytes, and the
//! end takes only an answer with the nonce it sent, from the address it sent to. No MAC: the
//! relay tells anyone only their own address, which they already know, and an on-path
//! attacker who could forge an answer could as well rewrite the packets it observes.
//!
//! `[00 'z' 't' 'o'][version 1][kind: 1 request, 2 answer][nonce 16]` then, in a request,
//! zeros to [`REQUEST_LEN`]; in an answer, `[family 4|6][port 2][address 16, IPv4 in the
//! first 4]`. The first byte is 0 like a probe's (QUIC's fixed bit is 1, so neither is
//! mistaken for QUIC); the fourth tells the two apart.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The first bytes of every request and answer.
pub const MAGIC: [u8; 4] = [0x00, b'z', b't', b'o'];
/// The second port's distance from the relay's main port.
pub const PORT_OFFSET: u16 = 2;
/// The version this code speaks.
pub const VERSION: u8 = 1;
/// The size of a request (padding included; shorter ones are not answered).
pub const REQUEST_LEN: usize = 64;
/// The size of an answer.
pub const RESPONSE_LEN: usize = 41;
/// Random bytes a request carries and its answer echoes.
pub type Nonce = [u8; 16];

const KIND_REQUEST: u8 = 1;
const KIND_ANSWER: u8 = 2;
const HEADER: usize = 4 + 1 + 1 + 16;

/// Why bytes are not a request or an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ObserveError {
    /// Too short, or not starting with [`MAGIC`].
    #[error("not an address request or answer")]
    NotObserve,
    /// Another version.
    #[error("unsupported version {0}")]
    Version(u8),
    /// A request where an answer was expected, or the other way round.
    #[error("wrong kind {0}")]
    Kind(u8),
    /// An answer with an unknown address family.
    #[error("bad address family {0}")]
    Family(u8),
}

/// Whether `pkt` starts like a request or an answer (cheap; for sorting received datagrams).
pub fn is_observe(pkt: &[u8]) -> bool {
    pkt.len() >= MAGIC.len() && pkt[..MAGIC.len()] == MAGIC
}

fn header(pkt: &[u8], kind: u8) -> Result<Nonce, ObserveError> {
    if pkt.len() < HEADER || !is_observe(pkt) {
        return Err(ObserveError::NotObserve);
    }
    if pkt[4] != VERSION {
        return Err(ObserveError::Version(pkt[4]));
    }
    if pkt[5] != kind {
        return Err(ObserveError::Kind(pkt[5]));
    }
    let mut nonce = [0u8; 16];
    nonce.copy_from_slice(&pkt[6..HEADER]);
    Ok(nonce)
}

/// A request carrying `nonce`, padded to [`REQUEST_LEN`].
pub fn encode_request(nonce: &Nonce) -> [u8; REQUEST_LEN] {
    let mut out = [0u8; REQUEST_LEN];
    out[..4].copy_from_slice(&MAGIC);
    out[4] = VERSION;
    out[5] = KIND_REQUEST;
    out[6..HEADER].copy_from_slice(nonce);
    out
}

/// The nonce of a request, if `pkt` is a whole one (at least [`REQUEST_LEN`] bytes: a shorter
/// one would make the answer an amplifier).
pub fn decode_request(pkt: &[u8]) -> Result<Nonce, ObserveError> {
    if pkt.len() < REQUEST_LEN {
        return Err(ObserveError::NotObserve);
    }
    header(pkt, KIND_REQUEST)
}

/// A peer's address as the peer and its peers know it: on a dual-stack socket (`[::]:PORT`)
/// an IPv4 peer arrives as `::ffff:a.b.c.d`, which is the IPv4 address it maps.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The answer to a request with `nonce` that came from `observed`.
pub fn encode_answer(nonce: &Nonce, observed: SocketAddr) -> [u8; RESPONSE_LEN] {
    let mut out = [0u8; RESPONSE_LEN];
    out[..4].copy_from_slice(&MAGIC);
    out[4] = VERSION;
    out[5] = KIND_ANSWER;
    out[6..HEADER].copy_from_slice(nonce);
    match canonical(observed).ip() {
        IpAddr::V4(v4) => {
            out[HEADER] = 4;
            out[HEADER + 3..HEADER + 7].copy_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out[HEADER] = 6;
            out[HEADER + 3..HEADER + 19].copy_from_slice(&v6.octets());
        }
    }
    out[HEADER + 1..HEADER + 3].copy_from_slice(&observed.port().to_be_bytes());
    out
}

/// The nonce and observed address of an answer.
pub fn decode_answer(pkt: &[u8]) -> Result<(Nonce, SocketAddr), ObserveError> {
    if pkt.len() < RESPONSE_LEN {
        return Err(ObserveError::NotObserve);
    }
    let nonce = header(pkt, KIND_ANSWER)?;
    let port = u16::from_be_bytes([pkt[HEADER + 1], pkt[HEADER + 2]]);
    let a = &pkt[HEADER + 3..HEADER + 19];
    let ip = match pkt[HEADER] {
        4 => IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
        6 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(a);
            // A v4-mapped address is the IPv4 address it maps, as `encode_answer` writes it
            // (found by the `observe` fuzz target: it did not round-trip).
            IpAddr::V6(Ipv6Addr::from(o)).to_canonical()
        }
        f => return Err(ObserveError::Family(f)),
    };
    Ok((nonce, SocketAddr::new(ip, port)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_v4_mapped_answer_decodes_as_ipv4_and_round_trips() {
        let mut ans = encode_answer(&[1; 16], "[2001:db8::1]:9".parse().unwrap());
        // family 6, address ::ffff:198.51.100.7
        ans[HEADER + 3..HEADER + 19]
            .copy_from_slice(&"::ffff:198.51.100.7".parse::<Ipv6Addr>().unwrap().octets());
        let (nonce, addr) = decode_answer(&ans).unwrap();
        assert_eq!(addr, "198.51.100.7:9".parse().unwrap());
        assert_eq!(
            decode_answer(&encode_answer(&nonce, addr)),
            Ok((nonce, addr))
        );
    }

    #[test]
    fn an_answer_round_trips_and_is_smaller_than_its_request() {
        let nonce = [7u8; 16];
        let req = encode_request(&nonce);
        assert!(is_observe(&req));
        assert!(!crate::probe::is_probe(&req));
        assert_eq!(decode_request(&req), Ok(nonce));
        for a in [
            "198.51.100.4:61000",
            "[2001:db8::5]:443",
            "[::ffff:10.0.0.1]:9",
        ] {
            let observed: SocketAddr = a.parse().unwrap();
            let ans = encode_answer(&nonce, observed);
            assert!(ans.len() < req.len(), "never an amplifier");
            let (n, got) = decode_answer(&ans).unwrap();
            assert_eq!(n, nonce);
            assert_eq!(got.port(), observed.port());
            if a.contains("ffff") {
                assert_eq!(got, "10.0.0.1:9".parse().unwrap());
            } else {
                assert_eq!(got, observed);
            }
            assert_eq!(decode_request(&ans), Err(ObserveError::NotObserve));
        }
    }

    #[test]
    fn short_wrong_kind_and_wrong_version_requests_are_refused() {
        let req = encode_request(&[1; 16]);
        assert_eq!(
            decode_request(&req[..REQUEST_LEN - 1]),
            Err(ObserveError::NotObserve),
            "a short request would make the answer an amplifier"
        );
        let mut v = req;
        v[4] = 2;
        assert_eq!(decode_request(&v), Err(ObserveError::Version(2)));
        let ans = encode_answer(&[1; 16], "1.2.3.4:5".parse().unwrap());
        let mut padded = [0u8; REQUEST_LEN];
        padded[..ans.len()].copy_from_slice(&ans);
        assert_eq!(
            decode_request(&padded),
            Err(ObserveError::Kind(KIND_ANSWER))
        );
        let mut f = ans;
        f[HEADER] = 5;
        assert_eq!(decode_answer(&f), Err(ObserveError::Family(5)));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = decode_request(&bytes);
            let _ = decode_answer(&bytes);
        }
    }
}
