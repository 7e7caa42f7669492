//! The ztna tunnel core, shared by the agents and the connector.
//!
//! - [`tls`] and [`pki`]: certificates, identities and mutual-TLS configurations.
//! - [`transport`]: the QUIC transport settings of the outer (relay) and inner (end-to-end)
//!   connections, with pinned MTUs.
//! - [`mux`]: the path-multiplexing UDP socket under one quinn endpoint: real UDP to the relay,
//!   and virtual peer addresses whose packets travel as outer datagrams through relay channels.
//! - [`session`]: a relay session: the outer connection, its control stream, and datagram
//!   dispatch into the socket.
//! - [`path`]: direct-path selection for one end-to-end connection (candidates, probing,
//!   selection, fallback) as a pure state machine with injected time.
//! - [`direct`]: the driver that runs [`path`] over the socket: probes, candidate exchange,
//!   and switching the socket's route between the relay channel and the direct path.
//! - [`fleet`]: the relay list (addresses, DNS names) and the liveness check that finds a dead
//!   relay within about a second (pure).
//! - [`agent`]: the platform-neutral agent tunnel: packets in and out through a channel, never a
//!   TUN device directly; the I/O shell over [`agent_machine`].
//! - [`agent_config`]: the agent's config keys, defaults and validation, one schema for the
//!   Linux agent and the Apple library.
//! - [`agent_machine`]: the agent's session logic (relay reconnects and refusals, catalog and
//!   routes with a withdrawal grace period, channels, resuming inner connections) as a pure
//!   state machine with injected time.
//! - [`inbound`]: the agent's check of packets from a connector (source, port, destination).
//! - [`backoff`]: reconnect delays.
//! - [`bucket`]: the token bucket behind every rate limit (pure).
//! - [`daemon`]: layered configuration, logging, signals and sockets of the daemons.
//! - [`metrics_http`]: the opt-in Prometheus endpoint of the relay and the connector.
//! - [`reload`]: reload triggers (SIGHUP, a poll of watched files) for policy and deny lists.
//!
//! I/O: [`mux`], [`session`], [`direct`] and [`agent`] own UDP sockets and tokio tasks; the rest is pure.

pub mod agent;
pub mod agent_config;
pub mod agent_machine;
pub mod arena;
pub mod backoff;
pub mod birthday;
pub mod bucket;
pub mod congestion;
pub mod daemon;
pub mod direct;
pub mod dns;
pub mod fair_queue;
pub mod fleet;
pub mod inbound;
pub mod metrics_http;
pub mod mux;
pub mod names;
pub mod outbound;
pub mod path;
pub mod pki;
pub mod reload;
pub mod session;
pub mod tap;
pub mod tcp_carriage;
pub mod tcp_flows;
pub mod tls;
pub mod transport;
