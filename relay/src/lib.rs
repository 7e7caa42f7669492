//! The ztna relay: authenticates agents and connectors with mutual TLS, keeps the service
//! registry and the access policy, tells each peer its observed address, and forwards the
//! end-to-end encrypted channel data of agent–connector channels without being able to read it.
//!
//! [`admission`] (handshakes), [`control`] (sessions, channels, rate limits), [`forward`] (the
//! channel-data forwarding table), [`policy`] and [`registry`] are pure; [`observe`] answers
//! address requests on a second port (detecting hard NATs); [`udp`] is the relay's socket, which
//! forwards channel data before quinn sees it; [`server`] owns the endpoint and the tokio tasks;
//! [`reload`] re-reads the policy, deny list and CRLs on SIGHUP or when their files change.

pub mod admission;
pub mod config;
pub mod control;
pub mod forward;
pub mod observe;
pub mod policy;
pub mod registry;
pub mod reload;
pub mod server;
pub mod udp;
pub mod xdp;
