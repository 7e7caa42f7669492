//! The ztna relay: authenticates agents and connectors with mutual TLS, keeps the service
//! registry and the access policy, tells each peer its observed address, and forwards the
//! end-to-end encrypted datagrams of agent–connector channels without being able to read them.
//!
//! [`admission`] (handshakes), [`control`] (sessions, channels, rate limits), [`lanes`]
//! (per-channel fair queueing), [`policy`] and [`registry`] are pure; [`observe`] answers
//! address requests on a second port (detecting hard NATs);
//! [`server`] owns the UDP socket and the tokio tasks;
//! [`reload`] re-reads the policy, deny list and CRLs on SIGHUP or when their files change.

pub mod admission;
pub mod config;
pub mod control;
pub mod lanes;
pub mod observe;
pub mod policy;
pub mod registry;
pub mod reload;
pub mod server;
