//! Messages of the control stream.
//!
//! Agents and connectors open one bidirectional stream on their outer connection and send
//! [`ControlMessage::Hello`] first; the relay answers [`ControlMessage::Welcome`] or
//! [`ControlMessage::Error`] and closes. Every later message may come at any time.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::service::ServiceDef;

/// What a peer of the relay is. The certificate is authoritative; `Hello` must agree with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// A person's device.
    Agent,
    /// A gateway in front of private services.
    Connector,
    /// The relay itself (only ever in certificates).
    Relay,
}

impl Role {
    /// The lowercase name used in certificates and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Connector => "connector",
            Role::Relay => "relay",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "agent" => Some(Role::Agent),
            "connector" => Some(Role::Connector),
            "relay" => Some(Role::Relay),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error codes carried in [`ControlMessage::Error`] and [`ControlMessage::ChannelClosed`], and as
/// QUIC application close codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Policy does not allow this identity to do that.
    Unauthorized,
    /// No such service or connector is known.
    UnknownService,
    /// The connector serving the service is not connected.
    ConnectorOffline,
    /// A connector announced a service that policy does not let it serve.
    NotAllowedToServe,
    /// Another connector already serves a service of that name or address.
    Conflict,
    /// A message could not be decoded, or was out of place.
    Malformed,
    /// The peer speaks a protocol version the relay does not.
    UnsupportedVersion,
    /// The certificate's role does not match what the peer asked to be.
    RoleMismatch,
    /// A newer session of the same identity replaced this one.
    Replaced,
    /// The tunnel address pool has no address left.
    PoolExhausted,
    /// The other end of a channel went away.
    PeerGone,
    /// Too many channels or requests.
    Limit,
    /// Something failed inside the relay.
    Internal,
}

impl ErrorCode {
    /// The QUIC application error code used when a connection is closed for this reason.
    pub fn to_quic(self) -> u32 {
        match self {
            ErrorCode::Unauthorized => 1,
            ErrorCode::UnknownService => 2,
            ErrorCode::ConnectorOffline => 3,
            ErrorCode::NotAllowedToServe => 4,
            ErrorCode::Conflict => 5,
            ErrorCode::Malformed => 6,
            ErrorCode::UnsupportedVersion => 7,
            ErrorCode::RoleMismatch => 8,
            ErrorCode::Replaced => 9,
            ErrorCode::PoolExhausted => 10,
            ErrorCode::PeerGone => 11,
            ErrorCode::Limit => 12,
            ErrorCode::Internal => 13,
        }
    }

    /// The inverse of [`ErrorCode::to_quic`].
    pub fn from_quic(code: u64) -> Option<Self> {
        Some(match code {
            1 => ErrorCode::Unauthorized,
            2 => ErrorCode::UnknownService,
            3 => ErrorCode::ConnectorOffline,
            4 => ErrorCode::NotAllowedToServe,
            5 => ErrorCode::Conflict,
            6 => ErrorCode::Malformed,
            7 => ErrorCode::UnsupportedVersion,
            8 => ErrorCode::RoleMismatch,
            9 => ErrorCode::Replaced,
            10 => ErrorCode::PoolExhausted,
            11 => ErrorCode::PeerGone,
            12 => ErrorCode::Limit,
            13 => ErrorCode::Internal,
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::UnknownService => "unknown service",
            ErrorCode::ConnectorOffline => "connector offline",
            ErrorCode::NotAllowedToServe => "not allowed to serve",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Malformed => "malformed message",
            ErrorCode::UnsupportedVersion => "unsupported version",
            ErrorCode::RoleMismatch => "role mismatch",
            ErrorCode::Replaced => "replaced by a newer session",
            ErrorCode::PoolExhausted => "tunnel address pool exhausted",
            ErrorCode::PeerGone => "peer gone",
            ErrorCode::Limit => "limit reached",
            ErrorCode::Internal => "internal error",
        };
        f.write_str(s)
    }
}

/// First message on the control stream, from an agent or connector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The role the sender claims; must match its certificate.
    pub role: Role,
    /// Services a connector offers (empty for agents).
    pub services: Vec<ServiceDef>,
    /// Names of services an agent asks for (empty: every service policy allows). Names that
    /// policy does not allow come back in [`Welcome::rejected`].
    pub want: Vec<String>,
    /// Free-form software name and version, for logs.
    pub software: String,
}

/// The relay's answer to a successful [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The identity the relay read from the peer's certificate.
    pub identity: String,
    /// The peer's address as the relay sees it (QUIC address discovery).
    pub observed_addr: SocketAddr,
    /// The agent's tunnel IP (agents only).
    pub tunnel_ip: Option<Ipv4Addr>,
    /// For agents: the services policy allows that a connector serves now.
    /// For connectors: the services the relay accepted.
    pub services: Vec<ServiceDef>,
    /// Services the relay refused, with the reason: for connectors, announced services it would
    /// not register; for agents, wanted services that policy does not allow.
    pub rejected: Vec<Rejected>,
}

/// A service the relay refused to register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// Name of the refused service.
    pub name: String,
    /// Why.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

/// Most candidates one [`ControlMessage::Candidates`] may carry; the relay refuses more.
pub const MAX_CANDIDATES: usize = 16;

/// Where a candidate address comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CandidateKind {
    /// An address of one of the sender's own interfaces (reachable on its LAN).
    Host,
    /// The sender's address as the relay observes it (its NAT's mapping).
    Reflexive,
}

/// An address at which the sender may be reachable directly, over its one UDP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Candidate {
    /// The address.
    pub addr: SocketAddr,
    /// Where it comes from.
    pub kind: CandidateKind,
}

/// Every message of the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlMessage {
    /// Client → relay, first message.
    Hello(Hello),
    /// Relay → client, answer to `Hello`.
    Welcome(Welcome),
    /// Relay → agent: the full list of reachable services changed.
    Catalog(Vec<ServiceDef>),
    /// Relay → client: the client's observed address changed.
    ObservedAddress(SocketAddr),
    /// Agent → relay: open a channel to a connector.
    OpenChannel {
        /// Echoed in the answer.
        request_id: u32,
        /// Identity of the connector.
        connector: String,
    },
    /// Relay → agent: the channel asked for with `request_id` is open.
    ChannelOpened {
        /// The request this answers.
        request_id: u32,
        /// Channel id to prefix datagrams with.
        channel_id: u32,
        /// Identity of the connector at the other end; the agent verifies the connector's
        /// certificate against it.
        connector: String,
    },
    /// Relay → connector: an agent opened a channel to it.
    IncomingChannel {
        /// Channel id to prefix datagrams with.
        channel_id: u32,
        /// The agent's identity; the connector requires the inner handshake to present it.
        agent: String,
        /// The agent's tunnel IP; the only source address accepted from that agent.
        agent_tunnel_ip: Ipv4Addr,
        /// Addresses of this connector's services that policy lets the agent reach; the
        /// connector drops the agent's packets to any other address.
        services: Vec<Ipv4Addr>,
    },
    /// Connector → relay: the connector is ready for datagrams on the channel. Only then does
    /// the relay answer the agent's request with `ChannelOpened`, so the agent's first inner
    /// packet never arrives before the connector knows the channel.
    ChannelAccepted {
        /// The channel from `IncomingChannel`.
        channel_id: u32,
    },
    /// Either direction: a channel is closed.
    ChannelClosed {
        /// The channel.
        channel_id: u32,
        /// Why.
        code: ErrorCode,
    },
    /// Either direction: the sender's direct-path candidates for a channel. The relay checks
    /// that the sender is an end of the channel, adds the sender's observed address as a
    /// reflexive candidate if it is missing, and forwards the list to the other end.
    Candidates {
        /// The channel.
        channel_id: u32,
        /// At most [`MAX_CANDIDATES`].
        candidates: Vec<Candidate>,
    },
    /// Relay → client: a request failed, or the session is being closed.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// The request it answers, if any.
        request_id: Option<u32>,
        /// Human-readable detail.
        message: String,
    },
}

impl ControlMessage {
    /// Short name of the message kind, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ControlMessage::Hello(_) => "hello",
            ControlMessage::Welcome(_) => "welcome",
            ControlMessage::Catalog(_) => "catalog",
            ControlMessage::ObservedAddress(_) => "observed-address",
            ControlMessage::OpenChannel { .. } => "open-channel",
            ControlMessage::ChannelOpened { .. } => "channel-opened",
            ControlMessage::IncomingChannel { .. } => "incoming-channel",
            ControlMessage::ChannelAccepted { .. } => "channel-accepted",
            ControlMessage::ChannelClosed { .. } => "channel-closed",
            ControlMessage::Candidates { .. } => "candidates",
            ControlMessage::Error { .. } => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quic_codes_round_trip() {
        for code in 0..32u64 {
            if let Some(c) = ErrorCode::from_quic(code) {
                assert_eq!(u64::from(c.to_quic()), code);
            }
        }
        assert_eq!(ErrorCode::from_quic(0), None);
    }
}
