//! Direct-path probes: small authenticated UDP packets that an agent and a connector send to each
//! other's candidate addresses to open NAT mappings (both at once) and to measure a path's RTT.
//!
//! ```text
//! 0      4    5     6        14       22          len-32      len
//! | magic | ver | kind | tag[8] | txid[8] | zero padding | mac[32] |
//! ```
//!
//! - `magic` is `00 7a 74 70` (`\0ztp`). Its first byte has the QUIC fixed bit (0x40) clear, and
//!   ztna's endpoints never grease that bit, so a probe can't be mistaken for a QUIC packet.
//! - `tag` names the end-to-end connection the probe belongs to; both ends derive it, and the
//!   MAC key, from that connection's TLS exporter, so the relay (which never sees those keys)
//!   can neither read nor forge probes.
//! - `txid` pairs a pong with its ping, which gives the RTT.
//! - `mac` is HMAC-SHA256 over everything before it. Padding lets a ping
//!   be as large as a full-size tunnel packet, so a path that answers it carries full-size packets.

use std::fmt;

use ring::hmac;

/// First four bytes of every probe.
pub const MAGIC: [u8; 4] = [0x00, b'z', b't', b'p'];
/// Probe format version.
pub const VERSION: u8 = 1;
/// Bytes before the padding.
pub const HEADER_LEN: usize = 22;
/// Bytes of the MAC (HMAC-SHA256).
pub const MAC_LEN: usize = 32;
/// The smallest probe.
pub const MIN_LEN: usize = HEADER_LEN + MAC_LEN;
/// The largest probe accepted or built (a full-size packet on a 1500-byte link).
pub const MAX_LEN: usize = 1472;

/// Identifies the end-to-end connection a probe belongs to.
pub type Tag = [u8; 8];

/// A ping asks for a pong; a pong answers a ping with the same `txid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    /// Please answer.
    Ping,
    /// The answer.
    Pong,
}

/// A decoded, authenticated probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Ping or pong.
    pub kind: ProbeKind,
    /// The connection it belongs to.
    pub tag: Tag,
    /// Transaction id.
    pub txid: u64,
}

/// Why bytes are not a valid probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// Shorter than [`MIN_LEN`].
    #[error("probe too short")]
    Truncated,
    /// Longer than [`MAX_LEN`].
    #[error("probe too long")]
    TooLong,
    /// Does not start with [`MAGIC`].
    #[error("not a probe")]
    BadMagic,
    /// Another format version.
    #[error("unsupported probe version {0}")]
    Version(u8),
    /// Unknown kind byte.
    #[error("unknown probe kind {0}")]
    Kind(u8),
    /// The MAC does not verify with the connection's key.
    #[error("probe authentication failed")]
    BadMac,
}

/// The MAC key of one end-to-end connection.
pub struct ProbeKey(hmac::Key);

impl ProbeKey {
    /// A key from 32 secret bytes (from the connection's TLS exporter).
    pub fn new(secret: &[u8; 32]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }
}

impl fmt::Debug for ProbeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProbeKey(..)")
    }
}

/// Whether `pkt` starts like a probe (it may still fail to decode).
pub fn is_probe(pkt: &[u8]) -> bool {
    pkt.len() >= MAGIC.len() && pkt[..MAGIC.len()] == MAGIC
}

/// Builds a probe of `len` bytes (clamped to [`MIN_LEN`]..=[`MAX_LEN`]).
pub fn encode(probe: &Probe, key: &ProbeKey, len: usize) -> Vec<u8> {
    let len = len.clamp(MIN_LEN, MAX_LEN);
    let mut out = vec![0u8; len];
    out[..4].copy_from_slice(&MAGIC);
    out[4] = VERSION;
    out[5] = match probe.kind {
        ProbeKind::Ping => 1,
        ProbeKind::Pong => 2,
    };
    out[6..14].copy_from_slice(&probe.tag);
    out[14..22].copy_from_slice(&probe.txid.to_be_bytes());
    let mac = hmac::sign(&key.0, &out[..len - MAC_LEN]);
    out[len - MAC_LEN..].copy_from_slice(mac.as_ref());
    out
}

/// Checks the framing and returns the tag, without authenticating (to find the key).
pub fn peek_tag(pkt: &[u8]) -> Result<Tag, ProbeError> {
    if !is_probe(pkt) {
        return Err(ProbeError::BadMagic);
    }
    if pkt.len() < MIN_LEN {
        return Err(ProbeError::Truncated);
    }
    if pkt.len() > MAX_LEN {
        return Err(ProbeError::TooLong);
    }
    if pkt[4] != VERSION {
        return Err(ProbeError::Version(pkt[4]));
    }
    let mut tag = [0u8; 8];
    tag.copy_from_slice(&pkt[6..14]);
    Ok(tag)
}

/// Decodes and authenticates a probe.
pub fn decode(pkt: &[u8], key: &ProbeKey) -> Result<Probe, ProbeError> {
    let tag = peek_tag(pkt)?;
    let kind = match pkt[5] {
        1 => ProbeKind::Ping,
        2 => ProbeKind::Pong,
        k => return Err(ProbeError::Kind(k)),
    };
    let (body, mac) = pkt.split_at(pkt.len() - MAC_LEN);
    hmac::verify(&key.0, body, mac).map_err(|_| ProbeError::BadMac)?;
    let mut txid = [0u8; 8];
    txid.copy_from_slice(&pkt[14..22]);
    Ok(Probe {
        kind,
        tag,
        txid: u64::from_be_bytes(txid),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(b: u8) -> ProbeKey {
        ProbeKey::new(&[b; 32])
    }

    const P: Probe = Probe {
        kind: ProbeKind::Ping,
        tag: *b"tag12345",
        txid: 0x0102_0304_0506_0708,
    };

    #[test]
    fn round_trip_and_sizes() {
        for len in [0, MIN_LEN, 100, 1358, MAX_LEN, 9000] {
            let b = encode(&P, &key(1), len);
            assert_eq!(b.len(), len.clamp(MIN_LEN, MAX_LEN));
            assert!(is_probe(&b));
            assert_eq!(decode(&b, &key(1)), Ok(P));
        }
        let pong = Probe {
            kind: ProbeKind::Pong,
            ..P
        };
        assert_eq!(decode(&encode(&pong, &key(1), 0), &key(1)), Ok(pong));
    }

    #[test]
    fn forgeries_fail() {
        let b = encode(&P, &key(1), 64);
        assert_eq!(decode(&b, &key(2)), Err(ProbeError::BadMac));
        for i in 5..b.len() {
            let mut f = b.clone();
            f[i] ^= 0x01;
            assert!(decode(&f, &key(1)).is_err(), "flipped byte {i} accepted");
        }
        assert_eq!(
            decode(&b[..MIN_LEN - 1], &key(1)),
            Err(ProbeError::Truncated)
        );
        assert_eq!(decode(&b[..b.len() - 1], &key(1)), Err(ProbeError::BadMac));
        let mut v = b.clone();
        v[4] = 9;
        assert_eq!(decode(&v, &key(1)), Err(ProbeError::Version(9)));
        assert_eq!(decode(&[0x40; 64], &key(1)), Err(ProbeError::BadMagic));
        assert_eq!(
            peek_tag(&vec![0; MAX_LEN + 1]),
            Err(ProbeError::BadMagic),
            "all-zero is not a probe"
        );
    }

    #[test]
    fn never_looks_like_quic() {
        // Every QUIC packet ztna sends has the fixed bit set.
        assert_eq!(MAGIC[0] & 0x40, 0);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1600)) {
            let _ = peek_tag(&bytes);
            let _ = decode(&bytes, &key(3));
        }

        #[test]
        fn decode_never_panics_with_magic(tail in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut b = MAGIC.to_vec();
            b.extend(tail);
            let _ = decode(&b, &key(3));
        }
    }
}
