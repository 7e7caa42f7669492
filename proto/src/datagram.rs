//! Channel data: `[0x01][channel id, 4 bytes big-endian][inner QUIC packet]`, sent as plain UDP
//! from an agent's or connector's one socket to the relay's one port, outside the outer QUIC
//! connection.
//!
//! The first byte tells channel data apart from everything else that reaches those sockets:
//! QUIC packets have the fixed bit (0x40) set (no endpoint of ztna greases it), and direct-path
//! probes and address answers start with 0x00 ([`crate::probe`], [`crate::observe`]). The relay
//! reads only the header: the packet behind it is the end-to-end inner connection's, already
//! authenticated and encrypted. Both ends of a channel use the channel's one number; the relay
//! tells them apart by the source address bound to each end.

use std::fmt;

/// Identifies one agent–connector channel on the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(u32);

/// Why a packet is not channel data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DatagramError {
    /// The first byte is not [`TYPE`].
    #[error("not channel data")]
    NotChannelData,
    /// The packet ended inside the header.
    #[error("channel data too short for its header")]
    Truncated,
    /// The channel id exceeded [`ChannelId::MAX`].
    #[error("channel id out of range")]
    OutOfRange,
}

impl ChannelId {
    /// Largest channel id.
    pub const MAX: u32 = (1 << 30) - 1;

    /// A channel id, if `v` is at most [`ChannelId::MAX`].
    pub fn new(v: u32) -> Option<Self> {
        (v <= Self::MAX).then_some(Self(v))
    }

    /// The numeric value.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// First byte of channel data: QUIC's fixed bit (0x40) and long-header bit (0x80) clear, and not
/// the 0x00 that probes and address answers start with.
pub const TYPE: u8 = 0x01;
/// Bytes of the header in front of the inner packet.
pub const HEADER_LEN: usize = 5;

/// Whether `pkt` starts like channel data (it may still be malformed).
pub fn is_channel_data(pkt: &[u8]) -> bool {
    pkt.first() == Some(&TYPE)
}

/// The header of channel `channel`.
pub fn header(channel: ChannelId) -> [u8; HEADER_LEN] {
    let v = channel.0.to_be_bytes();
    [TYPE, v[0], v[1], v[2], v[3]]
}

/// Builds `[header][payload]`.
pub fn encode(channel: ChannelId, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header(channel));
    out.extend_from_slice(payload);
    out
}

/// The channel of a channel-data packet and the offset at which its inner packet starts
/// (always [`HEADER_LEN`]).
pub fn decode(pkt: &[u8]) -> Result<(ChannelId, usize), DatagramError> {
    match pkt.first() {
        None => return Err(DatagramError::Truncated),
        Some(&TYPE) => {}
        Some(_) => return Err(DatagramError::NotChannelData),
    }
    let h = pkt.get(1..HEADER_LEN).ok_or(DatagramError::Truncated)?;
    let v = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    Ok((
        ChannelId::new(v).ok_or(DatagramError::OutOfRange)?,
        HEADER_LEN,
    ))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn boundaries() {
        for v in [0, 1, 63, 64, 16384, ChannelId::MAX] {
            let id = ChannelId::new(v).unwrap();
            let d = encode(id, b"xyz");
            assert_eq!(d.len(), HEADER_LEN + 3);
            assert_eq!(decode(&d), Ok((id, HEADER_LEN)));
            assert!(is_channel_data(&d));
        }
        assert_eq!(ChannelId::new(ChannelId::MAX + 1), None);
        assert_eq!(decode(&[]), Err(DatagramError::Truncated));
        assert_eq!(decode(&[TYPE, 0, 0]), Err(DatagramError::Truncated));
        assert_eq!(
            decode(&[TYPE, 0x40, 0, 0, 0]),
            Err(DatagramError::OutOfRange)
        );
        // A QUIC short-header packet (fixed bit set) and a probe are not channel data.
        assert_eq!(
            decode(&[0x43, 1, 2, 3, 4]),
            Err(DatagramError::NotChannelData)
        );
        assert!(!is_channel_data(&crate::probe::MAGIC));
        assert!(!is_channel_data(&crate::observe::MAGIC));
        assert_eq!(TYPE & 0xc0, 0, "fixed bit and long-header bit clear");
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
