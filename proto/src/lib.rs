//! ztna wire formats, with no I/O.
//!
//! - [`control`]: the messages of the control stream between agents or connectors and the relay.
//! - [`frame`]: how control messages are framed on the stream: a length prefix, a version byte,
//!   and a hard size cap, with an incremental decoder that never allocates beyond the cap.
//! - [`datagram`]: channel data, `[0x01][channel id][inner packet]` as plain UDP to the relay's
//!   port, outside the outer QUIC connection; the relay forwards it without decrypting.
//! - [`probe`]: the authenticated UDP probes that open and test direct agent–connector paths.
//! - [`observe`]: the request to the relay's second port that observes an end's address a
//!   second time (a hard NAT shows another port).
//! - [`service`]: service definitions and port ranges, shared by the relay, connector and agent.
//! - [`names`]: DNS name patterns of name services, and the agent → connector name mapping.
//!
//! Every decoder here takes untrusted bytes and returns an error instead of panicking; the
//! property tests and the fuzz target in `fuzz/` hold them to that.

pub mod control;
pub mod datagram;
pub mod frame;
pub mod names;
pub mod observe;
pub mod probe;
pub mod service;

pub use control::{
    Candidate, CandidateKind, ControlMessage, ErrorCode, Hello, Refusal, Role, Welcome,
};
pub use datagram::{ChannelId, DatagramError};
pub use frame::{FrameDecoder, FrameError, MAX_FRAME_LEN, PROTOCOL_VERSION};
pub use service::{NamePool, PortRange, ServiceDef};

/// ALPN of the outer connection between an agent or connector and the relay.
pub const ALPN_RELAY: &[u8] = b"ztna-relay/1";
/// ALPN of the inner, end-to-end connection between an agent and a connector.
pub const ALPN_TUNNEL: &[u8] = b"ztna-tunnel/1";
