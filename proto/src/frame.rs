//! Framing of control messages on a QUIC stream.
//!
//! A frame is `[u32 big-endian length][u8 version][postcard-encoded ControlMessage]`, where the
//! length counts the version byte and the body. Frames longer than [`MAX_FRAME_LEN`] are refused
//! before any of their body is buffered.

use crate::control::ControlMessage;

/// The control protocol version this crate speaks (2: `ServiceDef` gained `names`, for name
/// services; 3: `ServiceDef` gained `address6`, services' IPv6 addresses). Peers of older
/// versions are refused as `UnsupportedVersion`.
pub const PROTOCOL_VERSION: u8 = 3;
/// Largest frame accepted, version byte and body together.
pub const MAX_FRAME_LEN: usize = 64 * 1024;
const HEADER_LEN: usize = 4;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix announced more than [`MAX_FRAME_LEN`] bytes.
    #[error("control frame of {0} bytes exceeds the limit of {MAX_FRAME_LEN}")]
    Oversized(usize),
    /// The length prefix was zero, so there is not even a version byte.
    #[error("empty control frame")]
    Empty,
    /// The frame carried a protocol version other than [`PROTOCOL_VERSION`].
    #[error("unsupported control protocol version {0} (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u8),
    /// The body did not decode as a control message.
    #[error("malformed control message: {0}")]
    Malformed(String),
}

/// Encodes `msg` as one frame.
pub fn encode(msg: &ControlMessage) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; HEADER_LEN];
    out.push(PROTOCOL_VERSION);
    let mut out =
        postcard::to_extend(msg, out).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = out.len() - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::Oversized(len));
    }
    let prefix = u32::try_from(len).map_err(|_| FrameError::Oversized(len))?;
    out[..HEADER_LEN].copy_from_slice(&prefix.to_be_bytes());
    Ok(out)
}

/// Decodes the body of one frame (the bytes after the length prefix).
pub fn decode_body(body: &[u8]) -> Result<ControlMessage, FrameError> {
    let (&version, rest) = body.split_first().ok_or(FrameError::Empty)?;
    if version != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion(version));
    }
    let (msg, trailing) = postcard::take_from_bytes::<ControlMessage>(rest)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !trailing.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after the message",
            trailing.len()
        )));
    }
    Ok(msg)
}

/// Reads the length prefix of a frame.
pub fn decode_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME_LEN {
        return Err(FrameError::Oversized(len));
    }
    Ok(len)
}

/// Incremental decoder: feed it bytes as they arrive, take complete messages out.
///
/// It buffers at most one frame (so at most [`MAX_FRAME_LEN`] + 4 bytes) plus what is fed in
/// one call. After an error it stays failed: a control stream that sent garbage is closed.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    failed: Option<FrameError>,
}

impl FrameDecoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Takes the next complete message, `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<ControlMessage>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = self.try_next();
        if let Err(e) = &result {
            self.failed = Some(e.clone());
            self.buf = Vec::new();
        }
        result
    }

    fn try_next(&mut self) -> Result<Option<ControlMessage>, FrameError> {
        let Some(header) = self.buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let len = decode_len(*header)?;
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let msg = decode_body(&self.buf[HEADER_LEN..HEADER_LEN + len])?;
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some(msg))
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use proptest::prelude::*;

    use super::*;
    use crate::control::{ErrorCode, Hello, Role, Welcome};
    use crate::service::{PortRange, ServiceDef};

    fn sample() -> Vec<ControlMessage> {
        let svc = ServiceDef {
            name: "echo".into(),
            address: Ipv4Addr::new(10, 100, 0, 1),
            address6: None,
            udp: vec![PortRange::single(7)],
            tcp: vec![PortRange {
                first: 80,
                last: 81,
            }],
            icmp: true,
            connector: "c1".into(),
            names: None,
        };
        vec![
            ControlMessage::Hello(Hello {
                role: Role::Connector,
                services: vec![svc.clone()],
                want: vec![],
                software: "ztna 0.1".into(),
                tunnel_ip: None,
            }),
            ControlMessage::Welcome(Welcome {
                identity: "alice".into(),
                observed_addr: SocketAddr::from(([192, 0, 2, 1], 5000)),
                tunnel_ip: Some(Ipv4Addr::new(100, 64, 0, 7)),
                services: vec![svc],
                rejected: vec![],
            }),
            ControlMessage::OpenChannel {
                request_id: 9,
                connector: "c1".into(),
            },
            ControlMessage::Error {
                code: ErrorCode::Unauthorized,
                request_id: None,
                message: "no".into(),
            },
        ]
    }

    #[test]
    fn round_trip_in_pieces() {
        let mut wire = Vec::new();
        for m in sample() {
            wire.extend(encode(&m).unwrap());
        }
        let mut dec = FrameDecoder::new();
        let mut out = Vec::new();
        for chunk in wire.chunks(3) {
            dec.feed(chunk);
            while let Some(m) = dec.next_message().unwrap() {
                out.push(m);
            }
        }
        assert_eq!(out, sample());
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn oversized_is_refused_before_buffering() {
        let mut dec = FrameDecoder::new();
        dec.feed(&((MAX_FRAME_LEN as u32) + 1).to_be_bytes());
        assert_eq!(
            dec.next_message(),
            Err(FrameError::Oversized(MAX_FRAME_LEN + 1))
        );
        dec.feed(&[0; 100]);
        assert_eq!(dec.buffered(), 0);
        assert!(dec.next_message().is_err());
    }

    #[test]
    fn wrong_version_and_garbage() {
        // Another version (1: before name services), refused as such.
        for other in [1, PROTOCOL_VERSION + 1] {
            let mut f = encode(&sample()[2]).unwrap();
            f[4] = other;
            let mut dec = FrameDecoder::new();
            dec.feed(&f);
            assert_eq!(
                dec.next_message(),
                Err(FrameError::UnsupportedVersion(other))
            );
        }

        let mut dec = FrameDecoder::new();
        dec.feed(&[0, 0, 0, 3, PROTOCOL_VERSION, 0xff, 0xff]);
        assert!(matches!(dec.next_message(), Err(FrameError::Malformed(_))));
        let mut dec = FrameDecoder::new();
        dec.feed(&[0, 0, 0, 0]);
        assert_eq!(dec.next_message(), Err(FrameError::Empty));
    }

    proptest! {
        #[test]
        fn decoder_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..32)) {
            let mut dec = FrameDecoder::new();
            for c in &chunks {
                dec.feed(c);
                for _ in 0..4 {
                    match dec.next_message() {
                        Ok(Some(m)) => {
                            // Whatever decodes must re-encode to a decodable frame.
                            let again = encode(&m).unwrap();
                            prop_assert_eq!(decode_body(&again[4..]).unwrap(), m);
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
                prop_assert!(dec.buffered() <= MAX_FRAME_LEN + 4 + 64);
            }
        }

        #[test]
        fn open_channel_round_trips(id in any::<u32>(), name in "[a-z0-9.-]{1,40}") {
            let m = ControlMessage::OpenChannel { request_id: id, connector: name };
            let f = encode(&m).unwrap();
            prop_assert_eq!(decode_body(&f[4..]).unwrap(), m);
        }
    }
}
