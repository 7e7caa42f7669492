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
    /// A connector's announcement differs from the relay's policy for that service name (its
    /// address, or ports and protocols beyond what policy lists). Policy owns the catalog.
    PolicyMismatch,
    /// The relay's policy changed and this channel no longer matches it; open a new channel
    /// (the catalog that came with the change says what is still reachable).
    PolicyChanged,
    /// The certificate was revoked (its serial is on the deny list or a CRL). Permanent.
    Revoked,
    /// The identity is on the deny list. Permanent.
    IdentityDenied,
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
            ErrorCode::PolicyMismatch => 14,
            ErrorCode::PolicyChanged => 15,
            ErrorCode::Revoked => 16,
            ErrorCode::IdentityDenied => 17,
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
            14 => ErrorCode::PolicyMismatch,
            15 => ErrorCode::PolicyChanged,
            16 => ErrorCode::Revoked,
            17 => ErrorCode::IdentityDenied,
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
            ErrorCode::PolicyMismatch => "announcement differs from policy",
            ErrorCode::PolicyChanged => "policy changed",
            ErrorCode::Revoked => "certificate revoked",
            ErrorCode::IdentityDenied => "identity denied",
        };
        f.write_str(s)
    }
}

/// Why the relay (or a connector) refuses a certificate for good: retrying with the same
/// certificate cannot succeed. Clients classify a closed connection with
/// [`Refusal::from_tls_alert`] (refusals in the TLS handshake) and [`Refusal::from_app_code`]
/// (refusals of a live session, as QUIC application close codes).
///
/// What a client can learn: in the handshake the server can only send one TLS alert, so
/// "unknown CA" (`unknown_ca`, 48; also a CRL the server can't match), "expired or not yet
/// valid" (`certificate_expired`, 45), "revoked" (`certificate_revoked`, 44: serial on the deny
/// list or a CRL) and "identity denied" (`access_denied`, 49: identity on the deny list, or a
/// certificate without a valid ztna identity) are distinct, but the alert carries no text. A
/// session closed after a reload carries [`ErrorCode::Revoked`] or
/// [`ErrorCode::IdentityDenied`] as its application close code, with a short reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// The certificate does not chain to the organisation CA (or names another issuer).
    UnknownCa,
    /// The certificate is expired or not yet valid.
    Expired,
    /// The certificate is revoked (deny list by serial, or a CRL).
    Revoked,
    /// The identity is denied (deny list by name), or the certificate carries no valid
    /// ztna identity.
    IdentityDenied,
    /// Some other certificate problem (malformed, wrong key usage, bad signature).
    BadCertificate,
}

impl Refusal {
    /// TLS alert `certificate_revoked`.
    pub const ALERT_REVOKED: u8 = 44;
    /// TLS alert `certificate_expired`.
    pub const ALERT_EXPIRED: u8 = 45;
    /// TLS alert `unknown_ca`.
    pub const ALERT_UNKNOWN_CA: u8 = 48;
    /// TLS alert `access_denied`.
    pub const ALERT_ACCESS_DENIED: u8 = 49;

    /// The refusal a TLS alert (the low byte of a QUIC `CRYPTO_ERROR`, 0x100 + alert) stands
    /// for; `None` for alerts that are not about the client's certificate.
    pub fn from_tls_alert(alert: u8) -> Option<Self> {
        Some(match alert {
            Self::ALERT_REVOKED => Refusal::Revoked,
            Self::ALERT_EXPIRED => Refusal::Expired,
            Self::ALERT_UNKNOWN_CA => Refusal::UnknownCa,
            Self::ALERT_ACCESS_DENIED => Refusal::IdentityDenied,
            // bad_certificate, unsupported_certificate, certificate_unknown
            42 | 43 | 46 => Refusal::BadCertificate,
            _ => return None,
        })
    }

    /// The refusal a QUIC transport error code stands for, if it is a `CRYPTO_ERROR`
    /// (0x100..=0x1ff) carrying a certificate alert.
    pub fn from_quic_transport_code(code: u64) -> Option<Self> {
        if (0x100..=0x1ff).contains(&code) {
            Self::from_tls_alert((code - 0x100) as u8)
        } else {
            None
        }
    }

    /// The refusal a QUIC application close code stands for (a live session closed by the
    /// relay after a deny-list or CRL reload).
    pub fn from_app_code(code: u64) -> Option<Self> {
        match ErrorCode::from_quic(code)? {
            ErrorCode::Revoked => Some(Refusal::Revoked),
            ErrorCode::IdentityDenied => Some(Refusal::IdentityDenied),
            _ => None,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::UnknownCa => "certificate not issued by the organisation CA",
            Refusal::Expired => "certificate expired or not yet valid",
            Refusal::Revoked => "certificate revoked",
            Refusal::IdentityDenied => "identity denied",
            Refusal::BadCertificate => "certificate refused",
        })
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
    /// An agent's tunnel IP from its previous session with any relay of the fleet: the relay
    /// gives it that address again if it is in the pool and free there, so that the agent keeps
    /// its address (and its connections) when it moves between relays. `None` otherwise.
    pub tunnel_ip: Option<Ipv4Addr>,
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
    /// As [`CandidateKind::Reflexive`], and a second observation through the relay's second
    /// port ([`crate::observe`]) saw the same port: endpoint-independent mapping (an easy NAT,
    /// or none).
    ReflexiveStable,
    /// As [`CandidateKind::Reflexive`], but the second observation saw another port:
    /// endpoint-dependent mapping (a hard NAT). Only the address is worth probing, on guessed
    /// ports (port prediction).
    ReflexiveVarying,
}

impl CandidateKind {
    /// Whether the relay observed this address (any reflexive kind).
    pub fn is_reflexive(self) -> bool {
        !matches!(self, CandidateKind::Host)
    }
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
    /// Client → relay: are you there? The relay answers with [`ControlMessage::Pong`] carrying
    /// the same number. An agent sends it when traffic through the relay stops coming back,
    /// to tell a dead relay (fail over at once) from a quiet peer.
    Ping(u64),
    /// Relay → client: the answer to [`ControlMessage::Ping`].
    Pong(u64),
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
            ControlMessage::Ping(_) => "ping",
            ControlMessage::Pong(_) => "pong",
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
        let all = (0..64u64).filter_map(ErrorCode::from_quic).count();
        assert_eq!(all, 17, "every code has a distinct QUIC number");
    }

    #[test]
    fn refusals_are_distinct() {
        use Refusal::*;
        let got: Vec<_> = [44u8, 45, 48, 49]
            .iter()
            .map(|a| Refusal::from_tls_alert(*a))
            .collect();
        assert_eq!(
            got,
            vec![
                Some(Revoked),
                Some(Expired),
                Some(UnknownCa),
                Some(IdentityDenied)
            ]
        );
        assert_eq!(Refusal::from_tls_alert(40), None); // handshake_failure: not a cert verdict
        assert_eq!(
            Refusal::from_quic_transport_code(0x100 + 48),
            Some(UnknownCa)
        );
        assert_eq!(Refusal::from_quic_transport_code(0x0a), None);
        assert_eq!(
            Refusal::from_app_code(ErrorCode::Revoked.to_quic().into()),
            Some(Revoked)
        );
        assert_eq!(
            Refusal::from_app_code(ErrorCode::IdentityDenied.to_quic().into()),
            Some(IdentityDenied)
        );
        assert_eq!(
            Refusal::from_app_code(ErrorCode::Replaced.to_quic().into()),
            None
        );
    }
}
