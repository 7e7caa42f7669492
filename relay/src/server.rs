//! The relay server: accepts agents and connectors, runs their control streams against the
//! registry and policy, and forwards channel datagrams between them without decrypting.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use tokio::sync::mpsc;
use ztna_core::metrics_http::Sample;
use ztna_core::session::{ControlReader, ControlWriter, SessionError};
use ztna_core::tls::{Credentials, PeerIdentity, Revocation};
use ztna_core::transport;
use ztna_proto::control::{
    Candidate, CandidateKind, ControlMessage, ErrorCode, Hello, Role, Welcome, MAX_CANDIDATES,
};
use ztna_proto::service::{check_name, escape_for_log};
use ztna_proto::{datagram, ChannelId, ServiceDef, ALPN_RELAY};

use crate::config::RelayConfig;
use crate::policy::Policy;
use crate::registry::{Pool, Registry};

/// Time a new peer has to open its control stream and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Control messages queued towards one peer before it counts as stuck and is disconnected.
const CONTROL_QUEUE: usize = 256;
/// Least time between two candidate lists forwarded from one end of a channel.
pub const CANDIDATES_MIN_INTERVAL: Duration = Duration::from_millis(100);

/// How often the observed address of each peer is checked for changes.
const OBSERVE_INTERVAL: Duration = Duration::from_secs(1);
/// Socket buffer sizes asked of the kernel.
const SOCKET_BUFFER: usize = 16 << 20;

/// Refused services listed in a welcome (the rest are logged).
const MAX_REJECTED: usize = 64;
/// Bytes of a control frame a service list may fill, leaving room for the rest of a welcome
/// (identity, address, `MAX_REJECTED` refusals).
const CATALOG_BUDGET: usize = ztna_proto::MAX_FRAME_LEN - 24 * 1024;

/// Trims a service list to what one control frame carries. Without this, a catalog that does
/// not fit would end the agent's session on every reconnect; trimmed, the agent reaches most
/// services and the log says why it can't reach the rest.
fn fit_catalog(mut services: Vec<ServiceDef>, who: &PeerIdentity) -> Vec<ServiceDef> {
    let size = |v: &[ServiceDef]| {
        ztna_proto::frame::encode(&ControlMessage::Catalog(v.to_vec()))
            .map_or(usize::MAX, |f| f.len())
    };
    let total = services.len();
    if size(&services) <= CATALOG_BUDGET {
        return services;
    }
    // Bounded: each round drops at least one entry.
    while !services.is_empty() && size(&services) > CATALOG_BUDGET {
        let keep = (services.len() * 9 / 10).min(services.len() - 1);
        services.truncate(keep);
    }
    tracing::error!(peer = %who, total, kept = services.len(), "service list too large for one control message; trimmed");
    services
}

/// The relay's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Sessions up now.
    pub sessions_active: AtomicU64,
    /// Sessions established.
    pub sessions_total: AtomicU64,
    /// Peers refused after the handshake (bad hello, role mismatch, pool exhausted).
    pub sessions_rejected: AtomicU64,
    /// Handshakes that failed (TLS: unknown CA, no certificate, wrong ALPN, ...).
    pub handshakes_failed: AtomicU64,
    /// Datagrams forwarded between the ends of a channel.
    pub datagrams_forwarded: AtomicU64,
    /// Bytes forwarded.
    pub bytes_forwarded: AtomicU64,
    /// Datagrams dropped (malformed, unknown channel, not a member, send failed).
    pub datagrams_dropped: AtomicU64,
    /// Sessions closed for a malformed, oversized or out-of-place control message.
    pub control_errors: AtomicU64,
    /// Channels open now.
    pub channels_active: AtomicU64,
    /// Channels opened.
    pub channels_opened: AtomicU64,
    /// Channel requests refused.
    pub channels_refused: AtomicU64,
    /// Services registered now.
    pub services_registered: AtomicU64,
    /// Service announcements refused.
    pub services_rejected: AtomicU64,
    /// Policy reloads applied.
    pub policy_reloads: AtomicU64,
    /// Policy reloads refused (the old policy stayed in force).
    pub policy_reload_errors: AtomicU64,
    /// Live sessions closed because a reload denied or revoked their certificate.
    pub sessions_revoked: AtomicU64,
    /// Channels closed because a reload changed what they may reach.
    pub channels_closed_by_policy: AtomicU64,
    /// Direct-path candidate lists forwarded between the ends of a channel.
    pub candidates_forwarded: AtomicU64,
    /// Candidate lists dropped because one end sent them faster than one per
    /// [`CANDIDATES_MIN_INTERVAL`].
    pub candidates_dropped: AtomicU64,
}

impl Metrics {
    /// Prometheus text (OpenMetrics, through `prometheus-client`); names are prefixed
    /// `ztna_relay_`, counters end in `_total`.
    pub fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        #[rustfmt::skip]
        let samples = vec![
            Sample::gauge("sessions_active", "Sessions up now.", g(&self.sessions_active)),
            Sample::counter("sessions", "Sessions established.", g(&self.sessions_total)),
            Sample::counter("sessions_rejected", "Peers refused after the handshake.", g(&self.sessions_rejected)),
            Sample::counter("handshakes_failed", "QUIC/TLS handshakes that failed.", g(&self.handshakes_failed)),
            Sample::counter("datagrams_forwarded", "Channel datagrams forwarded.", g(&self.datagrams_forwarded)),
            Sample::counter("bytes_forwarded", "Channel bytes forwarded.", g(&self.bytes_forwarded)),
            Sample::counter("candidates_forwarded", "Direct-path candidate lists forwarded (hole punching brokered).", g(&self.candidates_forwarded)),
            Sample::counter("candidates_dropped", "Candidate lists dropped for coming faster than one per 100 ms from one end of a channel.", g(&self.candidates_dropped)),
            Sample::counter("datagrams_dropped", "Channel datagrams dropped.", g(&self.datagrams_dropped)),
            Sample::counter("control_errors", "Sessions closed for bad control messages.", g(&self.control_errors)),
            Sample::gauge("channels_active", "Channels open now.", g(&self.channels_active)),
            Sample::counter("channels_opened", "Channels opened.", g(&self.channels_opened)),
            Sample::counter("channels_refused", "Channel requests refused.", g(&self.channels_refused)),
            Sample::gauge("services_registered", "Services registered now.", g(&self.services_registered)),
            Sample::counter("services_rejected", "Service announcements refused.", g(&self.services_rejected)),
            Sample::counter("policy_reloads", "Policy reloads applied.", g(&self.policy_reloads)),
            Sample::counter("policy_reload_errors", "Policy reloads refused (the old policy stayed in force).", g(&self.policy_reload_errors)),
            Sample::counter("sessions_revoked", "Live sessions closed because a reload denied or revoked their certificate.", g(&self.sessions_revoked)),
            Sample::counter("channels_closed_by_policy", "Channels closed because a policy reload changed what they may reach.", g(&self.channels_closed_by_policy)),
        ];
        ztna_core::metrics_http::encode("ztna_relay", samples)
    }
}

struct Session {
    identity: PeerIdentity,
    /// Serial of the peer's certificate (checked against the deny list on reload).
    serial: Vec<u8>,
    conn: quinn::Connection,
    ctrl: mpsc::Sender<ControlMessage>,
    want: Vec<String>,
    catalog: Vec<ServiceDef>,
    channels: HashSet<u32>,
}

impl Session {
    /// Queues a control message. A peer that does not read its control stream fast enough to
    /// take it is disconnected: a lost message would leave the two sides out of step.
    fn send(&self, msg: ControlMessage) {
        if self.ctrl.try_send(msg).is_err() {
            tracing::warn!(peer = %self.identity, "control stream not read; closing the session");
            self.conn.close(
                ErrorCode::Limit.to_quic().into(),
                b"control stream not read",
            );
        }
    }
}

struct Channel {
    agent: u64,
    connector: u64,
    agent_conn: quinn::Connection,
    connector_conn: quinn::Connection,
    /// The agent's request, until the connector accepts the channel.
    pending_request: Option<u32>,
    connector_name: String,
    /// The service addresses the connector was told the agent may reach (sorted); a reload
    /// that changes them closes the channel.
    allowed: Vec<Ipv4Addr>,
    /// When each end (agent, connector) last had candidates forwarded.
    last_candidates: [Option<std::time::Instant>; 2],
}

struct State {
    policy: Arc<Policy>,
    next_session: u64,
    next_channel: u32,
    sessions: HashMap<u64, Session>,
    by_identity: HashMap<(Role, String), u64>,
    registry: Registry,
    pool: Pool,
    channels: HashMap<u32, Channel>,
}

/// The relay's shared state.
pub struct Relay {
    revocation: Arc<Revocation>,
    max_channels: usize,
    state: Mutex<State>,
    /// Counters.
    pub metrics: Metrics,
}

/// Why a peer is refused, as sent to it.
type Refusal = (ErrorCode, String);

/// What a policy reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Catalog entries in the new policy.
    pub services: usize,
    /// Registered services the new policy no longer allows.
    pub services_dropped: usize,
    /// Sessions closed (identity or certificate denied).
    pub sessions_closed: usize,
    /// Channels closed (what they may reach changed).
    pub channels_closed: usize,
}

impl Relay {
    /// A relay with no sessions, enforcing `policy` and the deny list and CRLs of
    /// `revocation` (the handle its TLS server config verifies client certificates with).
    pub fn new(cfg: &RelayConfig, policy: Policy, revocation: Arc<Revocation>) -> Self {
        Self {
            revocation,
            max_channels: cfg.max_channels_per_agent,
            state: Mutex::new(State {
                policy: Arc::new(policy),
                next_session: 1,
                next_channel: 1,
                sessions: HashMap::new(),
                by_identity: HashMap::new(),
                registry: Registry::default(),
                pool: Pool::new(cfg.tunnel_pool),
                channels: HashMap::new(),
            }),
            metrics: Metrics::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The deny list and CRLs that handshakes and [`Relay::apply_policy`] check.
    pub fn revocation(&self) -> &Arc<Revocation> {
        &self.revocation
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.lock().policy.clone()
    }

    /// Puts `policy` in force (after the deny list and CRLs were updated): closes the sessions
    /// of identities or certificates now denied, registers again what connectors announced
    /// (telling each connector what it may no longer serve), re-sends each agent its catalog if
    /// it changed, and closes channels whose reachable services changed (`Unauthorized` when
    /// the agent may reach nothing at that connector any more, else `PolicyChanged`; the agent
    /// opens a new one). Sessions still allowed are kept.
    pub fn apply_policy(&self, policy: Policy) -> ReloadSummary {
        let mut guard = self.lock();
        let st = &mut *guard;
        let policy = Arc::new(policy);
        st.policy = policy.clone();
        let mut summary = ReloadSummary {
            services: policy.services_len(),
            ..ReloadSummary::default()
        };
        // Denied or revoked identities lose their sessions.
        let denied: Vec<(u64, ztna_core::tls::Denied)> = st
            .sessions
            .iter()
            .filter_map(|(id, s)| {
                self.revocation
                    .denied(&s.identity.name, &s.serial)
                    .map(|d| (*id, d))
            })
            .collect();
        for (id, why) in denied {
            if let Some(s) = st.sessions.get(&id) {
                tracing::warn!(peer = %s.identity, reason = %why, "closing the session: certificate no longer accepted");
                s.conn.close(
                    why.error_code().to_quic().into(),
                    why.to_string().as_bytes(),
                );
            }
            self.metrics
                .sessions_revoked
                .fetch_add(1, Ordering::Relaxed);
            summary.sessions_closed += 1;
            self.end_session_locked(st, id);
        }
        // Registrations under the new policy.
        let dropped = st.registry.reapply(&policy);
        for d in dropped {
            tracing::warn!(connector = %d.connector, service = %d.rejected.name, code = %d.rejected.code, "service no longer registered after the policy reload");
            tracing::debug!(connector = %d.connector, service = %d.rejected.name, "reason: {}", d.rejected.message);
            summary.services_dropped += 1;
            let session = st
                .by_identity
                .get(&(Role::Connector, d.connector.clone()))
                .and_then(|id| st.sessions.get(id));
            if let Some(s) = session {
                s.send(ControlMessage::Error {
                    code: d.rejected.code,
                    request_id: None,
                    message: format!(
                        "service {} is no longer registered: {}",
                        d.rejected.name, d.rejected.message
                    ),
                });
            }
        }
        self.metrics
            .services_registered
            .store(st.registry.services_len() as u64, Ordering::Relaxed);
        // Channels whose reachable set changed.
        let mut changed = Vec::new();
        for (ch, c) in &st.channels {
            let Some(agent) = st.sessions.get(&c.agent) else {
                continue;
            };
            let mut now = st
                .registry
                .reachable_at(&agent.identity, &c.connector_name, &policy);
            now.sort();
            if now != c.allowed {
                let code = if now.is_empty() {
                    ErrorCode::Unauthorized
                } else {
                    ErrorCode::PolicyChanged
                };
                changed.push((*ch, code));
            }
        }
        for (ch, code) in changed {
            tracing::info!(channel = ch, %code, "closing a channel: the policy reload changed what it may reach");
            self.metrics
                .channels_closed_by_policy
                .fetch_add(1, Ordering::Relaxed);
            summary.channels_closed += 1;
            self.close_channel_locked(st, ch, code, None);
        }
        self.push_catalogs_locked(st);
        self.metrics.policy_reloads.fetch_add(1, Ordering::Relaxed);
        summary
    }

    /// Admits a peer that said hello: registers it and builds its welcome.
    fn admit(
        &self,
        peer: &PeerIdentity,
        conn: &quinn::Connection,
        hello: Hello,
        ctrl: mpsc::Sender<ControlMessage>,
    ) -> Result<(u64, Welcome), Refusal> {
        if hello.role != peer.role {
            return Err((
                ErrorCode::RoleMismatch,
                format!(
                    "certificate is for a {}, hello says {}",
                    peer.role, hello.role
                ),
            ));
        }
        let serial = conn
            .peer_identity()
            .and_then(|id| {
                id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|c| ztna_core::tls::cert_serial(c.first()?).ok())
            .unwrap_or_default();
        // The handshake already refused denied certificates; this catches a deny list updated
        // between the handshake and the hello.
        if let Some(why) = self.revocation.denied(&peer.name, &serial) {
            return Err((why.error_code(), why.to_string()));
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        let policy = st.policy.clone();
        let key = (peer.role, peer.name.clone());
        if let Some(old) = st.by_identity.get(&key).copied() {
            if let Some(s) = st.sessions.get(&old) {
                tracing::info!(peer = %peer, "a new session replaces the existing one");
                s.conn.close(
                    ErrorCode::Replaced.to_quic().into(),
                    b"replaced by a newer session",
                );
            }
            self.end_session_locked(st, old);
        }
        let (tunnel_ip, services, rejected) = match peer.role {
            Role::Agent => {
                let ip = st.pool.assign(&peer.name).ok_or((
                    ErrorCode::PoolExhausted,
                    "no tunnel address left in the pool".into(),
                ))?;
                let catalog =
                    fit_catalog(st.registry.catalog_for(peer, &hello.want, &policy), peer);
                let mut denied = policy.denied_wants(peer, &hello.want);
                denied.truncate(MAX_REJECTED);
                (Some(ip), catalog, denied)
            }
            Role::Connector => {
                let (ok, bad) = st.registry.register(&peer.name, hello.services, &policy);
                self.metrics
                    .services_rejected
                    .fetch_add(bad.len() as u64, Ordering::Relaxed);
                // Names are escaped; messages may hold service addresses, so DEBUG only.
                for r in &bad {
                    tracing::warn!(connector = %peer.name, service = %r.name, code = %r.code, "refused service");
                    tracing::debug!(connector = %peer.name, service = %r.name, "refused service: {}", r.message);
                }
                let mut bad = bad;
                bad.truncate(MAX_REJECTED);
                (None, fit_catalog(ok, peer), bad)
            }
            Role::Relay => {
                return Err((
                    ErrorCode::RoleMismatch,
                    "relays do not connect to relays".into(),
                ))
            }
        };
        let id = st.next_session;
        st.next_session += 1;
        st.by_identity.insert(key, id);
        st.sessions.insert(
            id,
            Session {
                identity: peer.clone(),
                serial,
                conn: conn.clone(),
                ctrl,
                want: hello.want,
                catalog: if peer.role == Role::Agent {
                    services.clone()
                } else {
                    Vec::new()
                },
                channels: HashSet::new(),
            },
        );
        if peer.role == Role::Connector {
            self.push_catalogs_locked(st);
        }
        self.metrics
            .services_registered
            .store(st.registry.services_len() as u64, Ordering::Relaxed);
        let welcome = Welcome {
            identity: peer.name.clone(),
            observed_addr: conn.remote_address(),
            tunnel_ip,
            services,
            rejected,
        };
        Ok((id, welcome))
    }

    /// Sends each agent its catalog if it changed.
    fn push_catalogs_locked(&self, st: &mut State) {
        let State {
            sessions,
            registry,
            policy,
            ..
        } = st;
        for s in sessions
            .values_mut()
            .filter(|s| s.identity.role == Role::Agent)
        {
            let catalog = fit_catalog(
                registry.catalog_for(&s.identity, &s.want, policy),
                &s.identity,
            );
            if catalog != s.catalog {
                s.catalog = catalog.clone();
                s.send(ControlMessage::Catalog(catalog));
            }
        }
    }

    /// Removes a session, its channels and its services.
    fn end_session_locked(&self, st: &mut State, id: u64) {
        let Some(s) = st.sessions.remove(&id) else {
            return;
        };
        let key = (s.identity.role, s.identity.name.clone());
        if st.by_identity.get(&key) == Some(&id) {
            st.by_identity.remove(&key);
        }
        for ch in s.channels {
            self.close_channel_locked(st, ch, ErrorCode::PeerGone, Some(id));
        }
        if s.identity.role == Role::Connector && st.registry.unregister(&s.identity.name) {
            self.push_catalogs_locked(st);
        }
        self.metrics
            .services_registered
            .store(st.registry.services_len() as u64, Ordering::Relaxed);
        self.metrics.sessions_active.fetch_sub(1, Ordering::Relaxed);
    }

    /// Closes a channel and tells the end that did not close it.
    fn close_channel_locked(
        &self,
        st: &mut State,
        ch: u32,
        code: ErrorCode,
        closed_by: Option<u64>,
    ) {
        let Some(c) = st.channels.remove(&ch) else {
            return;
        };
        self.metrics.channels_active.fetch_sub(1, Ordering::Relaxed);
        for end in [c.agent, c.connector] {
            if let Some(s) = st.sessions.get_mut(&end) {
                s.channels.remove(&ch);
                if Some(end) == closed_by {
                    continue;
                }
                // An agent still waiting for the channel knows it only by its request.
                let msg = match c.pending_request {
                    Some(request_id) if end == c.agent => ControlMessage::Error {
                        code,
                        request_id: Some(request_id),
                        message: format!("connector {} did not take the channel", c.connector_name),
                    },
                    _ => ControlMessage::ChannelClosed {
                        channel_id: ch,
                        code,
                    },
                };
                s.send(msg);
            }
        }
    }

    /// Handles one control message from session `id`. An error closes the session.
    fn on_message(&self, id: u64, msg: ControlMessage) -> Result<(), Refusal> {
        let mut st = self.lock();
        match msg {
            ControlMessage::OpenChannel {
                request_id,
                connector,
            } => {
                let reply = self.open_channel_locked(&mut st, id, request_id, &connector);
                if let Err((code, message)) = reply {
                    self.metrics
                        .channels_refused
                        .fetch_add(1, Ordering::Relaxed);
                    if let Some(s) = st.sessions.get(&id) {
                        tracing::info!(agent = %s.identity.name, connector = %escape_for_log(&connector), %code, "channel refused: {message}");
                        s.send(ControlMessage::Error {
                            code,
                            request_id: Some(request_id),
                            message,
                        });
                    }
                }
                Ok(())
            }
            ControlMessage::ChannelAccepted { channel_id } => {
                self.accept_channel_locked(&mut st, id, channel_id)
            }
            ControlMessage::ChannelClosed { channel_id, code } => {
                let member = st
                    .channels
                    .get(&channel_id)
                    .is_some_and(|c| c.agent == id || c.connector == id);
                if member {
                    self.close_channel_locked(&mut st, channel_id, code, Some(id));
                }
                Ok(())
            }
            ControlMessage::Candidates {
                channel_id,
                candidates,
            } => self.forward_candidates_locked(&mut st, id, channel_id, candidates),
            other => Err((
                ErrorCode::Malformed,
                format!("unexpected {} message from a client", other.kind()),
            )),
        }
    }

    fn open_channel_locked(
        &self,
        st: &mut State,
        id: u64,
        request_id: u32,
        connector: &str,
    ) -> Result<(), Refusal> {
        check_name("connector name", connector).map_err(|e| (ErrorCode::Malformed, e))?;
        let policy = st.policy.clone();
        let agent = st
            .sessions
            .get(&id)
            .ok_or((ErrorCode::Internal, "session gone".into()))?;
        if agent.identity.role != Role::Agent {
            return Err((ErrorCode::Unauthorized, "only agents open channels".into()));
        }
        if agent.channels.len() >= self.max_channels {
            return Err((
                ErrorCode::Limit,
                format!("at most {} channels per agent", self.max_channels),
            ));
        }
        if !st
            .registry
            .agent_may_use_connector(&agent.identity, connector, &policy)
        {
            let code = if st
                .by_identity
                .contains_key(&(Role::Connector, connector.to_owned()))
            {
                ErrorCode::Unauthorized
            } else {
                ErrorCode::ConnectorOffline
            };
            return Err((
                code,
                format!(
                    "no service of connector {connector} is available to {}",
                    agent.identity.name
                ),
            ));
        }
        let cid = *st
            .by_identity
            .get(&(Role::Connector, connector.to_owned()))
            .ok_or((
                ErrorCode::ConnectorOffline,
                format!("connector {connector} is not connected"),
            ))?;
        let tunnel_ip: Ipv4Addr = st
            .pool
            .assign(&agent.identity.name)
            .ok_or((ErrorCode::PoolExhausted, "no tunnel address".into()))?;
        let mut allowed = st
            .registry
            .reachable_at(&agent.identity, connector, &policy);
        allowed.sort();
        let agent_name = agent.identity.name.clone();
        let agent_conn = agent.conn.clone();
        let conn_session = st
            .sessions
            .get(&cid)
            .ok_or((ErrorCode::ConnectorOffline, "connector gone".into()))?;
        let connector_conn = conn_session.conn.clone();
        // Channel ids are unique among open channels; wrap within the varint range.
        let mut ch = st.next_channel;
        for _ in 0..=st.channels.len() {
            if !st.channels.contains_key(&ch) {
                break;
            }
            ch = if ch >= ChannelId::MAX { 1 } else { ch + 1 };
        }
        st.next_channel = if ch >= ChannelId::MAX { 1 } else { ch + 1 };
        if conn_session
            .ctrl
            .try_send(ControlMessage::IncomingChannel {
                channel_id: ch,
                agent: agent_name.clone(),
                agent_tunnel_ip: tunnel_ip,
                services: allowed.clone(),
            })
            .is_err()
        {
            conn_session.conn.close(
                ErrorCode::Limit.to_quic().into(),
                b"control stream not read",
            );
            return Err((
                ErrorCode::ConnectorOffline,
                "connector is not reading its control stream".into(),
            ));
        }
        st.channels.insert(
            ch,
            Channel {
                agent: id,
                connector: cid,
                agent_conn,
                connector_conn,
                pending_request: Some(request_id),
                connector_name: connector.to_owned(),
                allowed,
                last_candidates: [None, None],
            },
        );
        for end in [id, cid] {
            if let Some(s) = st.sessions.get_mut(&end) {
                s.channels.insert(ch);
            }
        }
        self.metrics.channels_opened.fetch_add(1, Ordering::Relaxed);
        self.metrics.channels_active.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(agent = %agent_name, %connector, channel = ch, "channel offered to the connector");
        Ok(())
    }

    /// The connector accepted channel `ch`: tell the agent it is open.
    fn accept_channel_locked(&self, st: &mut State, id: u64, ch: u32) -> Result<(), Refusal> {
        let Some(c) = st.channels.get_mut(&ch) else {
            // Closed in the meantime; the close already went to both ends.
            return Ok(());
        };
        if c.connector != id {
            return Err((
                ErrorCode::Malformed,
                format!("channel {ch} is not this connector's"),
            ));
        }
        let Some(request_id) = c.pending_request.take() else {
            return Err((ErrorCode::Malformed, format!("channel {ch} accepted twice")));
        };
        let (agent, connector) = (c.agent, c.connector_name.clone());
        if let Some(a) = st.sessions.get(&agent) {
            tracing::info!(agent = %a.identity.name, %connector, channel = ch, "channel open");
            a.send(ControlMessage::ChannelOpened {
                request_id,
                channel_id: ch,
                connector,
            });
        }
        Ok(())
    }

    /// Brokers hole punching: forwards one end's direct-path candidates to the other end of
    /// channel `ch`, adding the sender's observed address (its NAT mapping) if it is missing.
    fn forward_candidates_locked(
        &self,
        st: &mut State,
        id: u64,
        ch: u32,
        mut candidates: Vec<Candidate>,
    ) -> Result<(), Refusal> {
        if candidates.len() > MAX_CANDIDATES {
            return Err((
                ErrorCode::Malformed,
                format!("{} candidates (at most {MAX_CANDIDATES})", candidates.len()),
            ));
        }
        let Some(c) = st.channels.get_mut(&ch) else {
            // Closed in the meantime.
            return Ok(());
        };
        let (from, to, end) = if c.agent == id {
            (&c.agent_conn, c.connector, 0)
        } else if c.connector == id {
            (&c.connector_conn, c.agent, 1)
        } else {
            return Err((
                ErrorCode::Malformed,
                format!("channel {ch} is not this session's"),
            ));
        };
        if c.pending_request.is_some() {
            // Not open yet: nobody has an end-to-end connection to probe with.
            return Ok(());
        }
        // Candidates change rarely (a new address); a flood would fill the other end's control
        // queue, which disconnects it. Drop what comes too fast instead.
        let now = std::time::Instant::now();
        if c.last_candidates[end].is_some_and(|t| now.duration_since(t) < CANDIDATES_MIN_INTERVAL) {
            self.metrics
                .candidates_dropped
                .fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        c.last_candidates[end] = Some(now);
        let observed = from.remote_address();
        if !candidates.iter().any(|x| x.addr == observed) {
            candidates.insert(
                0,
                Candidate {
                    addr: observed,
                    kind: CandidateKind::Reflexive,
                },
            );
            candidates.truncate(MAX_CANDIDATES);
        }
        if let Some(peer) = st.sessions.get(&to) {
            tracing::debug!(
                channel = ch,
                count = candidates.len(),
                "forwarding direct-path candidates"
            );
            peer.send(ControlMessage::Candidates {
                channel_id: ch,
                candidates,
            });
            self.metrics
                .candidates_forwarded
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Where a datagram from session `id` on channel `ch` goes.
    fn forward_target(&self, id: u64, ch: ChannelId) -> Option<quinn::Connection> {
        let st = self.lock();
        let c = st.channels.get(&ch.get())?;
        if c.agent == id {
            Some(c.connector_conn.clone())
        } else if c.connector == id {
            Some(c.agent_conn.clone())
        } else {
            None
        }
    }

    fn forward(&self, id: u64, d: Bytes) {
        let target = datagram::decode(&d)
            .ok()
            .and_then(|(ch, _)| self.forward_target(id, ch));
        let len = d.len() as u64;
        match target.map(|t| t.send_datagram(d)) {
            Some(Ok(())) => {
                self.metrics
                    .datagrams_forwarded
                    .fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .bytes_forwarded
                    .fetch_add(len, Ordering::Relaxed);
            }
            _ => {
                self.metrics
                    .datagrams_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Derives a secret for `label` from the relay's private key.
fn derive(key: &[u8], label: &[u8]) -> ring::digest::Digest {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"ztna relay v1\0");
    ctx.update(label);
    ctx.update(b"\0");
    ctx.update(key);
    ctx.finish()
}

/// The endpoint config of a relay whose stateless-reset key and connection-ID key are derived
/// from its private key. A restarted relay then recognises its earlier connection IDs as its
/// own and answers packets of connections it no longer has with a valid stateless reset, so
/// clients reconnect at once instead of waiting out the idle timeout. (quinn's defaults key both
/// at random per process; with a random CID key, old CIDs fail validation and are dropped
/// silently.)
fn endpoint_config(key_file: &std::path::Path) -> anyhow::Result<quinn::EndpointConfig> {
    let key = std::fs::read(key_file).with_context(|| format!("reading {}", key_file.display()))?;
    let reset = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        derive(&key, b"stateless reset").as_ref(),
    );
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&derive(&key, b"connection id").as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut cfg = quinn::EndpointConfig::new(Arc::new(reset));
    cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    Ok(cfg)
}

/// A bound relay endpoint, ready to serve.
pub struct Server {
    endpoint: quinn::Endpoint,
    relay: Arc<Relay>,
    metrics_addr: Option<SocketAddr>,
}

impl Server {
    /// Loads credentials and binds. Must be called inside a tokio runtime.
    pub fn bind(cfg: &RelayConfig) -> anyhow::Result<Self> {
        let files = cfg.tls_files()?;
        let creds = Credentials::load(&files).context("loading the relay's TLS files")?;
        anyhow::ensure!(
            creds.identity().role == Role::Relay,
            "certificate {} is for {}, not a relay",
            files.cert.display(),
            creds.identity()
        );
        let policy = cfg.policy()?;
        creds
            .revocation()
            .update(cfg.revocation_list()?)
            .context("loading the CRLs")?;
        let mut server_cfg = quinn::ServerConfig::with_crypto(creds.server_config(ALPN_RELAY)?);
        server_cfg.transport_config(transport::relay_side(cfg.timing()));
        server_cfg.migration(true);
        let endpoint_cfg = endpoint_config(&files.key)?;
        let sock = ztna_core::daemon::bind_udp(cfg.bind, SOCKET_BUFFER)
            .with_context(|| format!("binding UDP {}", cfg.bind))?;
        let endpoint = quinn::Endpoint::new(
            endpoint_cfg,
            Some(server_cfg),
            sock,
            Arc::new(quinn::TokioRuntime),
        )?;
        let local = endpoint.local_addr()?;
        if local.ip().is_unspecified() {
            tracing::warn!(addr = %local, "relay listening on ALL interfaces (set `bind` to restrict)");
        } else {
            tracing::info!(addr = %local, "relay listening");
        }
        let list = creds.revocation().list();
        tracing::info!(identity = %creds.identity().name, services = policy.services_len(), access_rules = cfg.access.len(), connector_rules = cfg.connectors.len(), denied_identities = list.identities.len(), denied_serials = list.serials.len(), crls = list.crls.len(), pool = %cfg.tunnel_pool, "relay ready");
        Ok(Self {
            endpoint,
            relay: Arc::new(Relay::new(cfg, policy, creds.revocation().clone())),
            metrics_addr: cfg.metrics,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The shared state and counters.
    pub fn relay(&self) -> &Arc<Relay> {
        &self.relay
    }

    /// Serves until `shutdown` resolves, then closes every connection.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let metrics_task = self.metrics_addr.map(|addr| {
            let relay = self.relay.clone();
            tokio::spawn(async move {
                // The endpoint exists only once the UDP socket is bound: the relay is listening,
                // hence ready, for as long as it serves.
                let render = Arc::new(move || relay.metrics.render());
                if let Err(e) =
                    ztna_core::metrics_http::serve(addr, render, Arc::new(|| true)).await
                {
                    tracing::error!(%addr, error = %e, "metrics endpoint failed");
                }
            })
        });
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    tokio::spawn(serve_peer(self.relay.clone(), incoming));
                }
                () = &mut shutdown => break,
            }
        }
        tracing::info!("relay shutting down");
        self.endpoint.close(0u32.into(), b"relay shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        if let Some(t) = metrics_task {
            t.abort();
        }
        Ok(())
    }
}

fn refuse(relay: &Relay, conn: &quinn::Connection, who: &str, code: ErrorCode, message: &str) {
    relay
        .metrics
        .sessions_rejected
        .fetch_add(1, Ordering::Relaxed);
    tracing::warn!(peer = %who, %code, "refusing session: {message}");
    tracing::debug!(peer = %who, remote = %conn.remote_address(), "refused session's address");
    conn.close(code.to_quic().into(), message.as_bytes());
}

async fn serve_peer(relay: Arc<Relay>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            relay
                .metrics
                .handshakes_failed
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(error = %e, "handshake failed");
            tracing::debug!(%remote, "failed handshake's address");
            return;
        }
    };
    let peer = match PeerIdentity::from_connection(&conn) {
        Ok(p) => p,
        Err(e) => return refuse(&relay, &conn, "?", ErrorCode::Unauthorized, &e.to_string()),
    };
    let who = peer.to_string();
    let (send, recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return tracing::info!(peer = %who, error = %e, "connection ended before hello")
        }
        Err(_) => {
            return refuse(
                &relay,
                &conn,
                &who,
                ErrorCode::Malformed,
                "no control stream within 5 s",
            )
        }
    };
    let mut reader = ControlReader::new(recv);
    let mut writer = ControlWriter::new(send);
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, reader.next()).await {
        Ok(Ok(Some(ControlMessage::Hello(h)))) => h,
        Ok(Ok(Some(other))) => {
            return refuse(
                &relay,
                &conn,
                &who,
                ErrorCode::Malformed,
                &format!("expected hello, got {}", other.kind()),
            )
        }
        Ok(Ok(None)) => {
            return refuse(
                &relay,
                &conn,
                &who,
                ErrorCode::Malformed,
                "control stream closed before hello",
            )
        }
        Ok(Err(e)) => {
            relay.metrics.control_errors.fetch_add(1, Ordering::Relaxed);
            return refuse(&relay, &conn, &who, ErrorCode::Malformed, &e.to_string());
        }
        Err(_) => {
            return refuse(
                &relay,
                &conn,
                &who,
                ErrorCode::Malformed,
                "no hello within 5 s",
            )
        }
    };
    let (ctrl_tx, mut ctrl_rx) = mpsc::channel(CONTROL_QUEUE);
    let (id, welcome) = match relay.admit(&peer, &conn, hello, ctrl_tx) {
        Ok(x) => x,
        Err((code, message)) => {
            let _ = writer
                .send(&ControlMessage::Error {
                    code,
                    request_id: None,
                    message: message.clone(),
                })
                .await;
            return refuse(&relay, &conn, &who, code, &message);
        }
    };
    relay.metrics.sessions_total.fetch_add(1, Ordering::Relaxed);
    relay
        .metrics
        .sessions_active
        .fetch_add(1, Ordering::Relaxed);
    tracing::info!(peer = %who, session = id, services = welcome.services.len(), rejected = welcome.rejected.len(), "session up");
    tracing::debug!(peer = %who, session = id, remote = %conn.remote_address(), tunnel_ip = ?welcome.tunnel_ip, "session addresses");
    let end = session_loop(
        &relay,
        id,
        &conn,
        welcome,
        &mut reader,
        &mut writer,
        &mut ctrl_rx,
    )
    .await;
    match &end {
        Ok(()) => tracing::info!(peer = %who, session = id, "session closed"),
        Err(SessionEnd::Refused(code, message)) => {
            relay.metrics.control_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %who, session = id, %code, "closing session: {message}");
            conn.close(code.to_quic().into(), message.as_bytes());
        }
        Err(SessionEnd::Lost(e)) => {
            tracing::info!(peer = %who, session = id, reason = %e, "session ended")
        }
    }
    let mut st = relay.lock();
    relay.end_session_locked(&mut st, id);
}

enum SessionEnd {
    Refused(ErrorCode, String),
    Lost(String),
}

async fn session_loop(
    relay: &Arc<Relay>,
    id: u64,
    conn: &quinn::Connection,
    welcome: Welcome,
    reader: &mut ControlReader,
    writer: &mut ControlWriter,
    ctrl_rx: &mut mpsc::Receiver<ControlMessage>,
) -> Result<(), SessionEnd> {
    writer
        .send(&ControlMessage::Welcome(welcome))
        .await
        .map_err(|e| SessionEnd::Lost(e.to_string()))?;
    let dgram_relay = relay.clone();
    let dgram_conn = conn.clone();
    let forwarder = tokio::spawn(async move {
        while let Ok(d) = dgram_conn.read_datagram().await {
            dgram_relay.forward(id, d);
        }
    });
    let _abort = AbortOnDrop(forwarder);
    let mut observed = conn.remote_address();
    let mut tick = tokio::time::interval(OBSERVE_INTERVAL);
    loop {
        tokio::select! {
            msg = reader.next() => match msg {
                Ok(Some(m)) => relay.on_message(id, m).map_err(|(c, m)| SessionEnd::Refused(c, m))?,
                Ok(None) => return Ok(()),
                Err(SessionError::Connection(e)) => return Err(SessionEnd::Lost(e.to_string())),
                Err(e @ (SessionError::Frame(_) | SessionError::Protocol(_))) => return Err(SessionEnd::Refused(ErrorCode::Malformed, e.to_string())),
                Err(e) => return Err(SessionEnd::Lost(e.to_string())),
            },
            out = ctrl_rx.recv() => {
                let Some(out) = out else { return Ok(()) };
                writer.send(&out).await.map_err(|e| SessionEnd::Lost(e.to_string()))?;
            }
            _ = tick.tick() => {
                let now = conn.remote_address();
                if now != observed {
                    tracing::info!(session = id, "peer address changed");
                    tracing::debug!(session = id, old = %observed, new = %now, "peer addresses");
                    observed = now;
                    writer.send(&ControlMessage::ObservedAddress(now)).await.map_err(|e| SessionEnd::Lost(e.to_string()))?;
                }
            }
            e = conn.closed() => return Err(SessionEnd::Lost(e.to_string())),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use ztna_proto::PortRange;

    use super::*;

    #[test]
    fn oversized_catalogs_are_trimmed_to_one_frame() {
        let who = PeerIdentity {
            name: "alice".into(),
            role: Role::Agent,
            groups: vec![],
        };
        let svc = |i: u32| ServiceDef {
            name: format!("{i:0>200}"),
            address: std::net::Ipv4Addr::from(0x0a64_0000 + i),
            udp: vec![PortRange::single(7)],
            tcp: vec![],
            icmp: true,
            connector: "c".repeat(200),
        };
        let small: Vec<_> = (0..10).map(svc).collect();
        assert_eq!(fit_catalog(small.clone(), &who), small);
        let big: Vec<_> = (0..1024).map(svc).collect();
        let fitted = fit_catalog(big.clone(), &who);
        assert!(!fitted.is_empty() && fitted.len() < big.len());
        assert_eq!(fitted[..], big[..fitted.len()]);
        let frame = ztna_proto::frame::encode(&ControlMessage::Catalog(fitted)).unwrap();
        assert!(frame.len() <= CATALOG_BUDGET);
    }
}
