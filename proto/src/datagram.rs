//! Framing of QUIC DATAGRAM frames on the outer connection: `[channel id][inner packet]`.
//!
//! The channel id is a QUIC variable-length integer (RFC 9000, section 16) limited to
//! [`ChannelId::MAX`], so it costs 1 to 4 bytes. The relay reads only the id and forwards the rest.

use std::fmt;

/// Identifies one agent–connector channel on the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(u32);

/// Why a datagram could not be framed or unframed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DatagramError {
    /// The datagram ended inside the channel id.
    #[error("datagram too short for its channel id")]
    Truncated,
    /// The channel id used the 8-byte varint form or exceeded [`ChannelId::MAX`].
    #[error("channel id out of range")]
    OutOfRange,
}

impl ChannelId {
    /// Largest channel id (fits a 4-byte varint).
    pub const MAX: u32 = (1 << 30) - 1;
    /// Longest encoded channel id in bytes.
    pub const MAX_LEN: usize = 4;

    /// A channel id, if `v` is at most [`ChannelId::MAX`].
    pub fn new(v: u32) -> Option<Self> {
        (v <= Self::MAX).then_some(Self(v))
    }

    /// The numeric value.
    pub fn get(self) -> u32 {
        self.0
    }

    /// Bytes the id takes on the wire.
    pub fn encoded_len(self) -> usize {
        match self.0 {
            0..=63 => 1,
            64..=16383 => 2,
            _ => 4,
        }
    }

    /// Appends the varint encoding to `out`.
    pub fn encode(self, out: &mut Vec<u8>) {
        let v = self.0;
        match self.encoded_len() {
            1 => out.push(v as u8),
            2 => out.extend_from_slice(&((v as u16) | 0x4000).to_be_bytes()),
            _ => out.extend_from_slice(&(v | 0x8000_0000).to_be_bytes()),
        }
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Builds `[channel id][payload]`.
pub fn encode(channel: ChannelId, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(channel.encoded_len() + payload.len());
    channel.encode(&mut out);
    out.extend_from_slice(payload);
    out
}

/// Splits a datagram into its channel id and the offset at which the payload starts.
pub fn decode(datagram: &[u8]) -> Result<(ChannelId, usize), DatagramError> {
    let first = *datagram.first().ok_or(DatagramError::Truncated)?;
    let len = 1usize << (first >> 6);
    if len > ChannelId::MAX_LEN {
        return Err(DatagramError::OutOfRange);
    }
    let bytes = datagram.get(..len).ok_or(DatagramError::Truncated)?;
    let mut v = u32::from(first & 0x3f);
    for &b in &bytes[1..] {
        v = (v << 8) | u32::from(b);
    }
    Ok((ChannelId::new(v).ok_or(DatagramError::OutOfRange)?, len))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn boundaries() {
        for (v, len) in [
            (0, 1),
            (63, 1),
            (64, 2),
            (16383, 2),
            (16384, 4),
            (ChannelId::MAX, 4),
        ] {
            let id = ChannelId::new(v).unwrap();
            let d = encode(id, b"xyz");
            assert_eq!(d.len(), len + 3);
            assert_eq!(decode(&d), Ok((id, len)));
        }
        assert_eq!(ChannelId::new(ChannelId::MAX + 1), None);
        assert_eq!(decode(&[]), Err(DatagramError::Truncated));
        assert_eq!(decode(&[0x40]), Err(DatagramError::Truncated));
        assert_eq!(
            decode(&[0xc0, 0, 0, 0, 0, 0, 0, 0]),
            Err(DatagramError::OutOfRange)
        );
    }

    proptest! {
        #[test]
        fn round_trip(v in 0..=ChannelId::MAX, payload in proptest::collection::vec(any::<u8>(), 0..100)) {
            let id = ChannelId::new(v).unwrap();
            let d = encode(id, &payload);
            let (got, off) = decode(&d).unwrap();
            prop_assert_eq!(got, id);
            prop_assert_eq!(&d[off..], &payload[..]);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
            if let Ok((_, off)) = decode(&bytes) {
                prop_assert!(off <= bytes.len());
            }
        }
    }
}
