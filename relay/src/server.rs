//! The relay server, the I/O shell around [`crate::control`]: accepts agents and connectors
//! (with handshake admission control), runs their control streams against the control plane, the
//! registry and policy, and keeps the [`ForwardTable`] that the socket ([`crate::udp`]) forwards
//! channel data by, without decrypting.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::Notify;
use ztna_core::daemon::AbortOnDrop;
use ztna_core::metrics_http::Sample;
use ztna_core::session::{ControlReader, ControlWriter, SessionError};
use ztna_core::tls::{Credentials, PeerIdentity, Revocation};
use ztna_core::transport;
use ztna_proto::control::{ControlMessage, ErrorCode, Hello, Role, Welcome};
use ztna_proto::observe::canonical;
use ztna_proto::{ServiceDef, ALPN_RELAY};

use crate::admission::{Admission, AdmissionLimits, Decision};
use crate::config::RelayConfig;
use crate::control::{Command, ControlPlane, Directory, Limits, NewSession, Refusal, SessionId};
use crate::forward::ForwardTable;
use crate::policy::Policy;
use crate::registry::{Pool, Registry};

/// Time a new peer has to open its control stream and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest sleep of the control plane's timer task.
const TIMER_MAX: Duration = Duration::from_secs(1);
/// Control messages written to one session per wake-up before the others get a turn.
const WRITE_BATCH: usize = 64;

/// After the socket saw a QUIC packet of an established connection from an unbound address,
/// how long the sweep waits for quinn to have taken the connection over to it.
const MOVED_SETTLE: Duration = Duration::from_millis(50);
/// Shortest time between two sweeps of every session's address (bounds what a stream of
/// packets from new addresses can cost).
const MOVED_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
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
    /// Channel data too short for its header or with a channel id out of range.
    pub channel_dropped_malformed: AtomicU64,
    /// Channel data for a channel that is not open (never was, or closed).
    pub channel_dropped_unknown: AtomicU64,
    /// Channel data from an address bound to neither end of its channel.
    pub channel_dropped_unbound: AtomicU64,
    /// Channel data the kernel did not take (send buffer full, or a send error).
    pub channel_send_failed: AtomicU64,
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
    /// [`Limits::candidates_interval`], or the other end's outbox was full.
    pub candidates_dropped: AtomicU64,
    /// Requests refused and reads delayed by a rate limit.
    pub control_limited: AtomicU64,
    /// Sessions closed for not reading their control stream.
    pub sessions_closed_slow: AtomicU64,
    /// Channels closed or dropped because a newer request of the same agent for the same
    /// connector replaced them.
    pub channels_replaced: AtomicU64,
    /// Channel offers taken back out of a connector's outbox before it read them (the agent gave
    /// up, or replaced the request).
    pub channel_offers_withdrawn: AtomicU64,
    /// Handshakes in progress now.
    pub handshakes_active: AtomicU64,
    /// Connection attempts answered with a Retry (address validation).
    pub handshakes_retried: AtomicU64,
    /// Connection attempts refused or ignored (too many in progress, or from one address).
    pub handshakes_refused: AtomicU64,
    /// Handshakes that did not finish in time.
    pub handshakes_timed_out: AtomicU64,
    /// Address requests answered on the second observation port.
    pub observe_answered: AtomicU64,
    /// Address requests not answered for the per-source or total rate limit.
    pub observe_limited: AtomicU64,
    /// Datagrams on the second observation port that were no (whole) address request.
    pub observe_dropped: AtomicU64,
    /// The XDP program's attach mode: 0 off (userspace), 1 generic, 2 native.
    pub xdp_mode: AtomicU64,
    /// The XDP program's counters, once it is attached.
    pub xdp: std::sync::OnceLock<crate::xdp::Counters>,
}

impl Metrics {
    /// Channel data dropped in userspace, for any reason: the sum of the per-reason counters.
    pub fn datagrams_dropped(&self) -> u64 {
        [
            &self.channel_dropped_malformed,
            &self.channel_dropped_unknown,
            &self.channel_dropped_unbound,
            &self.channel_send_failed,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }

    /// The XDP program's counters now (zeros without it).
    pub fn xdp_reading(&self) -> crate::xdp::Reading {
        self.xdp.get().map(|c| c.read()).unwrap_or_default()
    }

    /// Prometheus text (OpenMetrics, through `prometheus-client`); names are prefixed
    /// `ztna_relay_`, counters end in `_total`.
    pub fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        // Channel-data totals count both forwarders: the XDP program's and the socket's.
        let x = self.xdp_reading();
        #[rustfmt::skip]
        let samples = vec![
            Sample::gauge("sessions_active", "Sessions up now.", g(&self.sessions_active)),
            Sample::counter("sessions", "Sessions established.", g(&self.sessions_total)),
            Sample::counter("sessions_rejected", "Peers refused after the handshake.", g(&self.sessions_rejected)),
            Sample::counter("handshakes_failed", "QUIC/TLS handshakes that failed.", g(&self.handshakes_failed)),
            Sample::counter("datagrams_forwarded", "Channel datagrams forwarded (in XDP and in userspace).", g(&self.datagrams_forwarded) + x.forwarded),
            Sample::counter("bytes_forwarded", "Channel bytes forwarded (in XDP and in userspace).", g(&self.bytes_forwarded) + x.bytes_forwarded),
            Sample::counter("candidates_forwarded", "Direct-path candidate lists forwarded (hole punching brokered).", g(&self.candidates_forwarded)),
            Sample::counter("candidates_dropped", "Candidate lists dropped for coming faster than one per 100 ms from one end of a channel.", g(&self.candidates_dropped)),
            Sample::counter("datagrams_dropped", "Channel datagrams dropped (all reasons, in XDP and in userspace).", self.datagrams_dropped() + x.dropped_malformed + x.dropped_unknown + x.dropped_unbound + x.dropped_redirect),
            Sample::counter("channel_dropped_malformed", "Channel data dropped: too short, or a channel id out of range.", g(&self.channel_dropped_malformed) + x.dropped_malformed),
            Sample::counter("channel_dropped_unknown", "Channel data dropped: the channel is not open.", g(&self.channel_dropped_unknown) + x.dropped_unknown),
            Sample::counter("channel_dropped_unbound", "Channel data dropped: the source is bound to neither end of the channel.", g(&self.channel_dropped_unbound) + x.dropped_unbound),
            Sample::gauge("xdp_mode", "The XDP program's attach mode: 0 off (userspace forwarding), 1 generic, 2 native.", g(&self.xdp_mode)),
            Sample::counter("xdp_forwarded", "Channel datagrams forwarded by the XDP program.", x.forwarded),
            Sample::counter("xdp_dropped", "Channel datagrams dropped by the XDP program (malformed, unknown channel, unbound source, failed redirect).", x.dropped_malformed + x.dropped_unknown + x.dropped_unbound + x.dropped_redirect),
            Sample::counter("xdp_passed_channel", "Channel datagrams the XDP program left to userspace (an end not heard from yet, IPv6, fragments).", x.passed_channel),
            Sample::counter("channel_send_failed", "Channel data the kernel did not take (send buffer full).", g(&self.channel_send_failed)),
            Sample::counter("control_errors", "Sessions closed for bad control messages.", g(&self.control_errors)),
            Sample::gauge("channels_active", "Channels open now.", g(&self.channels_active)),
            Sample::counter("channels_opened", "Channels opened.", g(&self.channels_opened)),
            Sample::counter("channels_refused", "Channel requests refused.", g(&self.channels_refused)),
            Sample::counter("control_limited", "Control requests refused and reads delayed by a per-identity rate limit.", g(&self.control_limited)),
            Sample::counter("sessions_closed_slow", "Sessions closed for not reading their control stream.", g(&self.sessions_closed_slow)),
            Sample::counter("channels_replaced", "Channels replaced by a newer request for the same agent-connector pair.", g(&self.channels_replaced)),
            Sample::counter("channel_offers_withdrawn", "Channel offers withdrawn from a connector's outbox before it read them.", g(&self.channel_offers_withdrawn)),
            Sample::gauge("handshakes_active", "Handshakes in progress now.", g(&self.handshakes_active)),
            Sample::counter("handshakes_retried", "Connection attempts answered with a Retry (address validation).", g(&self.handshakes_retried)),
            Sample::counter("handshakes_refused", "Connection attempts refused or ignored (too many handshakes in progress).", g(&self.handshakes_refused)),
            Sample::counter("handshakes_timed_out", "Handshakes that did not finish in time.", g(&self.handshakes_timed_out)),
            Sample::counter("observe_answered", "Address requests answered on the second observation port (hard-NAT detection).", g(&self.observe_answered)),
            Sample::counter("observe_limited", "Address requests not answered for a rate limit.", g(&self.observe_limited)),
            Sample::counter("observe_dropped", "Datagrams on the second observation port that were no address request.", g(&self.observe_dropped)),
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

/// The I/O side of a session: its connection and the wake-up of its control-stream writer.
struct Handle {
    conn: quinn::Connection,
    /// Serial of the peer's certificate (checked against the deny list on reload).
    serial: Vec<u8>,
    wake: Arc<Notify>,
    /// Woken when the connection's remote address differs from the one channel data is
    /// forwarded by (see [`Relay::sweep_moved`]).
    moved: Arc<Notify>,
}

struct State {
    policy: Arc<Policy>,
    control: ControlPlane,
    registry: Registry,
    pool: Pool,
    handles: HashMap<SessionId, Handle>,
}

/// The registry and policy, as the control plane asks them.
struct Dir<'a> {
    registry: &'a Registry,
    policy: &'a Policy,
}

impl Directory for Dir<'_> {
    fn reachable(&self, agent: &PeerIdentity, connector: &str) -> Vec<Ipv4Addr> {
        self.registry.reachable_at(agent, connector, self.policy)
    }
}

/// The relay's shared state.
pub struct Relay {
    revocation: Arc<Revocation>,
    state: Mutex<State>,
    /// Open channels and their ends' addresses, read per packet by the socket (written when a
    /// channel opens or closes and when a session's address changes).
    table: Arc<RwLock<ForwardTable>>,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

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
        let metrics = Arc::new(Metrics::default());
        let limits = Limits {
            max_channels_per_agent: cfg.max_channels_per_agent,
            ..Limits::default()
        };
        Self {
            revocation,
            state: Mutex::new(State {
                policy: Arc::new(policy),
                control: ControlPlane::new(limits, metrics.clone()),
                registry: Registry::default(),
                pool: Pool::new(cfg.tunnel_pool),
                handles: HashMap::new(),
            }),
            table: Arc::default(),
            metrics,
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
    /// opens a new one; see [`ControlPlane::reapply`]). Sessions still allowed are kept.
    pub fn apply_policy(&self, policy: Policy) -> ReloadSummary {
        let mut guard = self.lock();
        let st = &mut *guard;
        let policy = Arc::new(policy);
        st.policy = policy.clone();
        let mut summary = ReloadSummary {
            services: policy.services_len(),
            ..ReloadSummary::default()
        };
        // Denied or revoked identities lose their sessions: closed now, removed (with their
        // channels and services) when their task sees the connection end.
        let mut denied: Vec<(SessionId, ztna_core::tls::Denied)> = st
            .handles
            .iter()
            .filter_map(|(id, h)| {
                let name = &st.control.identity(*id)?.name;
                self.revocation.denied(name, &h.serial).map(|d| (*id, d))
            })
            .collect();
        denied.sort_unstable_by_key(|(id, _)| *id);
        for (id, why) in denied {
            if let Some(peer) = st.control.identity(id) {
                tracing::warn!(%peer, reason = %why, "closing the session: certificate no longer accepted");
            }
            self.metrics
                .sessions_revoked
                .fetch_add(1, Ordering::Relaxed);
            summary.sessions_closed += 1;
            // Its channels and services go when its task sees the connection closed
            // ([`Relay::end_session`]): the other ends hear `PeerGone`, agents a new catalog.
            st.control
                .close_session(id, why.error_code(), &why.to_string());
        }
        // Registrations under the new policy.
        let dropped = st.registry.reapply(&policy);
        for d in dropped {
            tracing::warn!(connector = %d.connector, service = %d.rejected.name, code = %d.rejected.code, "service no longer registered after the policy reload");
            tracing::debug!(connector = %d.connector, service = %d.rejected.name, "reason: {}", d.rejected.message);
            summary.services_dropped += 1;
            if let Some(id) = st.control.session_of(Role::Connector, &d.connector) {
                st.control.notify_error(
                    id,
                    d.rejected.code,
                    format!(
                        "service {} is no longer registered: {}",
                        d.rejected.name, d.rejected.message
                    ),
                );
            }
        }
        self.metrics
            .services_registered
            .store(st.registry.services_len() as u64, Ordering::Relaxed);
        // Channels whose reachable set changed.
        let State {
            control, registry, ..
        } = &mut *st;
        let dir = Dir {
            registry,
            policy: &policy,
        };
        summary.channels_closed = control.reapply(&dir);
        self.push_catalogs_locked(st);
        self.metrics.policy_reloads.fetch_add(1, Ordering::Relaxed);
        self.dispatch(st);
        summary
    }

    /// Carries out what the control plane asks for.
    fn dispatch(&self, st: &mut State) {
        while let Some(cmd) = st.control.poll_command() {
            match cmd {
                Command::Transmit(id) => {
                    if let Some(h) = st.handles.get(&id) {
                        h.wake.notify_one();
                    }
                }
                Command::Close {
                    session,
                    code,
                    reason,
                } => {
                    if let Some(h) = st.handles.get(&session) {
                        h.conn.close(code.to_quic().into(), reason.as_bytes());
                    }
                }
                Command::Route {
                    channel,
                    agent,
                    connector,
                } => {
                    self.table().open(channel, agent, connector);
                }
                Command::Unroute(channel) => self.table().close(channel),
            }
        }
        self.metrics
            .sessions_active
            .store(st.control.sessions_len() as u64, Ordering::Relaxed);
    }

    /// Admits a peer that said hello: registers it and builds its welcome.
    fn admit(
        &self,
        peer: &PeerIdentity,
        conn: &quinn::Connection,
        hello: Hello,
    ) -> Result<(u64, Welcome, Arc<Notify>, Arc<Notify>), Refusal> {
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
        let mut st = self.lock();
        let policy = st.policy.clone();
        let (tunnel_ip, services, rejected) = match peer.role {
            Role::Agent => {
                let ip = st
                    .pool
                    .assign_preferring(&peer.name, hello.tunnel_ip)
                    .ok_or((
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
        let added = st.control.add_session(
            Instant::now(),
            NewSession {
                identity: peer.clone(),
                // Reported as the peer knows it (an IPv4 peer of a dual-stack socket as IPv4); the
                // channel table keeps the socket's form to match datagram sources.
                observed: canonical(conn.remote_address()),
                tunnel_ip,
                want: hello.want,
                catalog: if peer.role == Role::Agent {
                    services.clone()
                } else {
                    Vec::new()
                },
            },
        );
        let id = match added {
            Ok(id) => id,
            Err(e) => {
                if peer.role == Role::Connector && st.registry.unregister(&peer.name) {
                    self.push_catalogs_locked(&mut st);
                }
                self.dispatch(&mut st);
                return Err(e);
            }
        };
        let wake = Arc::new(Notify::new());
        let moved = Arc::new(Notify::new());
        self.table().bind_session(id, conn.remote_address());
        st.handles.insert(
            id,
            Handle {
                conn: conn.clone(),
                serial,
                wake: wake.clone(),
                moved: moved.clone(),
            },
        );
        if peer.role == Role::Connector {
            self.push_catalogs_locked(&mut st);
        }
        self.metrics
            .services_registered
            .store(st.registry.services_len() as u64, Ordering::Relaxed);
        self.dispatch(&mut st);
        let welcome = Welcome {
            identity: peer.name.clone(),
            observed_addr: canonical(conn.remote_address()),
            tunnel_ip,
            services,
            rejected,
        };
        Ok((id, welcome, wake, moved))
    }

    /// Sends each agent its catalog if it changed.
    fn push_catalogs_locked(&self, st: &mut State) {
        let State {
            control,
            registry,
            policy,
            ..
        } = st;
        for (id, identity, want) in control.agents() {
            let catalog = fit_catalog(registry.catalog_for(&identity, &want, policy), &identity);
            control.set_catalog(id, catalog);
        }
    }

    /// Removes a session, its channels and its services.
    fn end_session(&self, id: SessionId) {
        let mut st = self.lock();
        st.handles.remove(&id);
        self.table().remove_session(id);
        if let Some(identity) = st.control.remove_session(id) {
            if identity.role == Role::Connector && st.registry.unregister(&identity.name) {
                self.push_catalogs_locked(&mut st);
            }
        }
        self.metrics
            .services_registered
            .store(st.registry.services_len() as u64, Ordering::Relaxed);
        self.dispatch(&mut st);
    }

    /// Handles one control message from session `id`. An error closes the session.
    fn on_message(&self, id: SessionId, msg: ControlMessage) -> Result<(), Refusal> {
        let mut st = self.lock();
        let State {
            control,
            registry,
            policy,
            ..
        } = &mut *st;
        let dir = Dir { registry, policy };
        let r = control.handle_message(Instant::now(), id, msg, &dir);
        self.dispatch(&mut st);
        r
    }

    /// The next message for session `id`'s control stream.
    fn poll_transmit(&self, id: SessionId) -> Option<ControlMessage> {
        self.lock().control.poll_transmit(id)
    }

    /// Whether session `id` has messages waiting.
    fn has_transmit(&self, id: SessionId) -> bool {
        self.lock().control.has_transmit(id)
    }

    /// When session `id`'s next control message may be read (`None`: now).
    fn read_ready_at(&self, id: SessionId) -> Option<Instant> {
        self.lock().control.read_ready_at(id, Instant::now())
    }

    fn set_observed(&self, id: SessionId, addr: SocketAddr) {
        let mut st = self.lock();
        // Channel data is forwarded from the new address, and no longer from the old one.
        self.table().bind_session(id, addr);
        st.control.set_observed(id, addr);
    }

    /// Wakes every session whose connection's remote address is no longer the one its channel
    /// data is forwarded by; each then re-binds itself and tells its peer.
    fn sweep_moved(&self) {
        let st = self.lock();
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        for (id, h) in &st.handles {
            if table.session_addr(*id) != Some(h.conn.remote_address()) {
                h.moved.notify_one();
            }
        }
    }

    fn table(&self) -> std::sync::RwLockWriteGuard<'_, ForwardTable> {
        self.table.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Channels in the forwarding table (tests, metrics).
    pub fn forwarding_channels(&self) -> usize {
        self.table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .channels_len()
    }

    /// Runs the control plane's timers until the relay is dropped.
    async fn timers(self: Arc<Self>) {
        loop {
            let next = {
                let mut st = self.lock();
                st.control.handle_timeout(Instant::now());
                self.dispatch(&mut st);
                st.control.poll_timeout()
            };
            let cap = Instant::now() + TIMER_MAX;
            let at = next.map_or(cap, |t| t.min(cap));
            tokio::time::sleep_until(at.into()).await;
        }
    }
}

/// A bound relay endpoint, ready to serve.
pub struct Server {
    endpoint: quinn::Endpoint,
    /// The second observation port (main port + 2), when it could be bound.
    observe: Option<tokio::net::UdpSocket>,
    relay: Arc<Relay>,
    /// Woken by the socket when a session may have moved (see [`Relay::sweep_moved`]).
    moved: Arc<Notify>,
    metrics_addr: Option<SocketAddr>,
    admission: AdmissionLimits,
    /// The XDP program, when it forwards channel data; detached when the server is dropped.
    xdp: Option<crate::xdp::Attachment>,
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
        transport::relay_server_limits(&mut server_cfg);
        let mut endpoint_cfg = creds.relay_endpoint_config();
        // Never invite peers to grease the QUIC fixed bit: a clear fixed bit is how channel
        // data is told apart from QUIC on the relay's one port.
        endpoint_cfg.grease_quic_bit(false);
        let relay = Arc::new(Relay::new(cfg, policy, creds.revocation().clone()));
        let sock = ztna_core::daemon::bind_udp(cfg.bind, SOCKET_BUFFER)
            .with_context(|| format!("binding UDP {}", cfg.bind))?;
        let moved = Arc::new(Notify::new());
        let sock = crate::udp::socket(
            sock,
            relay.table.clone(),
            relay.metrics.clone(),
            moved.clone(),
        )?;
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
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
        let xdp = crate::xdp::start(cfg.xdp, cfg.xdp_interface.as_deref(), local)?.map(|x| {
            relay.table().set_mirror(Box::new(x.channels));
            relay
                .metrics
                .xdp_mode
                .store(x.attachment.mode().gauge(), Ordering::Relaxed);
            let _ = relay.metrics.xdp.set(x.counters);
            x.attachment
        });
        let observe = bind_observe(local, cfg.bind.port() != 0);
        let list = creds.revocation().list();
        let policy = relay.policy();
        tracing::info!(identity = %creds.identity().name, services = policy.services_len(), access_rules = cfg.access.len(), connector_rules = cfg.connectors.len(), denied_identities = list.identities.len(), denied_serials = list.serials.len(), crls = list.crls.len(), pool = %cfg.tunnel_pool, "relay ready");
        Ok(Self {
            endpoint,
            observe,
            relay,
            moved,
            metrics_addr: cfg.metrics,
            admission: AdmissionLimits::default(),
            xdp,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The second observation port's address, if it is bound.
    pub fn observe_addr(&self) -> Option<SocketAddr> {
        self.observe.as_ref().and_then(|s| s.local_addr().ok())
    }

    /// Replaces the handshake limits (tests, tools).
    pub fn set_admission_limits(&mut self, limits: AdmissionLimits) {
        self.admission = limits;
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
        let timers = AbortOnDrop(tokio::spawn(self.relay.clone().timers()));
        let sweeper = {
            let (relay, moved) = (self.relay.clone(), self.moved.clone());
            AbortOnDrop(tokio::spawn(async move {
                loop {
                    moved.notified().await;
                    tokio::time::sleep(MOVED_SETTLE).await;
                    relay.sweep_moved();
                    tokio::time::sleep(MOVED_SWEEP_INTERVAL - MOVED_SETTLE).await;
                }
            }))
        };
        let observe = self.observe.map(|sock| {
            AbortOnDrop(tokio::spawn(crate::observe::serve(
                sock,
                self.relay.metrics.clone(),
            )))
        });
        let admission = Arc::new(Mutex::new(Admission::new(self.admission)));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    admit_handshake(&self.relay, &admission, incoming);
                }
                () = &mut shutdown => break,
            }
        }
        drop(timers);
        drop(sweeper);
        drop(observe);
        tracing::info!("relay shutting down");
        // Channel data goes to the socket again (and is dropped there) from here on.
        drop(self.xdp);
        drop(self.relay.table().take_mirror());
        self.endpoint.close(0u32.into(), b"relay shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        if let Some(t) = metrics_task {
            t.abort();
        }
        Ok(())
    }
}

/// Binds the second observation port: the main port + [`ztna_proto::observe::PORT_OFFSET`] on the same
/// address. A relay without
/// it still works; ends behind it just can't tell a hard NAT (no port prediction).
fn bind_observe(main: SocketAddr, configured: bool) -> Option<tokio::net::UdpSocket> {
    let port = main.port().checked_add(ztna_proto::observe::PORT_OFFSET)?;
    let addr = SocketAddr::new(main.ip(), port);
    match ztna_core::daemon::bind_udp(addr, 1 << 20).and_then(tokio::net::UdpSocket::from_std) {
        Ok(s) => {
            tracing::info!(%addr, "second observation port listening");
            Some(s)
        }
        Err(e) if configured => {
            tracing::warn!(%addr, error = %e, "second observation port unavailable; hard NATs go undetected");
            None
        }
        Err(e) => {
            tracing::debug!(%addr, error = %e, "second observation port unavailable");
            None
        }
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

/// Decides what a connection attempt costs the relay (see [`crate::admission`]).
fn admit_handshake(
    relay: &Arc<Relay>,
    admission: &Arc<Mutex<Admission>>,
    incoming: quinn::Incoming,
) {
    let remote = incoming.remote_address();
    let ip = remote.ip();
    let (decision, timeout) = {
        let mut a = admission.lock().unwrap_or_else(|p| p.into_inner());
        let d = a.decide(
            ip,
            incoming.remote_address_validated(),
            incoming.may_retry(),
        );
        relay
            .metrics
            .handshakes_active
            .store(a.active() as u64, Ordering::Relaxed);
        (d, a.limits().handshake_timeout)
    };
    match decision {
        Decision::Accept => {
            let slot = HandshakeSlot {
                admission: admission.clone(),
                relay: relay.clone(),
                ip,
            };
            tokio::spawn(serve_peer(relay.clone(), incoming, slot, timeout));
        }
        Decision::Retry => {
            relay
                .metrics
                .handshakes_retried
                .fetch_add(1, Ordering::Relaxed);
            if let Err(e) = incoming.retry() {
                e.into_incoming().ignore();
            }
        }
        Decision::Refuse | Decision::Ignore => {
            relay
                .metrics
                .handshakes_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%remote, ?decision, "too many handshakes in progress");
            if decision == Decision::Refuse {
                incoming.refuse();
            } else {
                incoming.ignore();
            }
        }
    }
}

/// An accepted handshake's place in [`Admission`], given back when dropped.
struct HandshakeSlot {
    admission: Arc<Mutex<Admission>>,
    relay: Arc<Relay>,
    ip: std::net::IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut a = self.admission.lock().unwrap_or_else(|p| p.into_inner());
        a.finished(self.ip);
        self.relay
            .metrics
            .handshakes_active
            .store(a.active() as u64, Ordering::Relaxed);
    }
}

async fn serve_peer(
    relay: Arc<Relay>,
    incoming: quinn::Incoming,
    slot: HandshakeSlot,
    timeout: Duration,
) {
    // The session runs in a task of its own: this one, with the space of quinn's `Incoming`,
    // the handshake's timeouts and the hello, ends here and is freed, so what stays for as
    // long as the session lasts is only what the session needs (`session_task_stays_small`).
    if let Some(s) = open_session(&relay, incoming, slot, timeout).await {
        tokio::spawn(run_session(relay, s));
    }
}

/// Serves an admitted session's control stream until it ends, then removes the session.
// A block, not an `async fn`: its state holds `s` once, where an `async fn`'s holds the
// argument and a copy of it (176 bytes more a session).
#[allow(clippy::manual_async_fn)]
fn run_session(relay: Arc<Relay>, mut s: Opened) -> impl std::future::Future<Output = ()> {
    async move {
        let end = session_loop(&relay, &mut s).await;
        let (who, id) = (&s.who, s.id);
        match &end {
            Ok(()) => tracing::info!(peer = %who, session = id, "session closed"),
            Err(SessionEnd::Refused(code, message)) => {
                relay.metrics.control_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %who, session = id, %code, "closing session: {message}");
                s.conn.close(code.to_quic().into(), message.as_bytes());
            }
            Err(SessionEnd::Lost(e)) => {
                tracing::info!(peer = %who, session = id, reason = %e, "session ended")
            }
        }
        relay.end_session(id);
    }
}

/// A peer that finished its handshake, said hello, was admitted and sent its welcome.
struct Opened {
    conn: quinn::Connection,
    /// The peer, for the log.
    who: String,
    id: SessionId,
    reader: ControlReader,
    writer: ControlWriter,
    wake: Arc<Notify>,
    moved: Arc<Notify>,
}

/// Runs a peer's handshake and hello and admits it; `None` if it failed or was refused (the
/// reason is counted and logged here).
async fn open_session(
    relay: &Arc<Relay>,
    incoming: quinn::Incoming,
    slot: HandshakeSlot,
    timeout: Duration,
) -> Option<Opened> {
    let remote = incoming.remote_address();
    // Dropping a handshake that stalls closes it.
    let conn = match tokio::time::timeout(timeout, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            relay
                .metrics
                .handshakes_failed
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(error = %e, "handshake failed");
            tracing::debug!(%remote, "failed handshake's address");
            return None;
        }
        Err(_) => {
            relay
                .metrics
                .handshakes_timed_out
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%remote, "handshake timed out");
            return None;
        }
    };
    drop(slot);
    let peer = match PeerIdentity::from_connection(&conn) {
        Ok(p) => p,
        Err(e) => {
            refuse(relay, &conn, "?", ErrorCode::Unauthorized, &e.to_string());
            return None;
        }
    };
    let who = peer.to_string();
    let refused = |code, message: &str| {
        refuse(relay, &conn, &who, code, message);
        None
    };
    let (send, recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(peer = %who, error = %e, "connection ended before hello");
            return None;
        }
        Err(_) => return refused(ErrorCode::Malformed, "no control stream within 5 s"),
    };
    let mut reader = ControlReader::new(recv);
    let mut writer = ControlWriter::new(send);
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, reader.next()).await {
        Ok(Ok(Some(ControlMessage::Hello(h)))) => h,
        Ok(Ok(Some(other))) => {
            return refused(
                ErrorCode::Malformed,
                &format!("expected hello, got {}", other.kind()),
            )
        }
        Ok(Ok(None)) => return refused(ErrorCode::Malformed, "control stream closed before hello"),
        Ok(Err(e)) => {
            relay.metrics.control_errors.fetch_add(1, Ordering::Relaxed);
            return refused(ErrorCode::Malformed, &e.to_string());
        }
        Err(_) => return refused(ErrorCode::Malformed, "no hello within 5 s"),
    };
    let (id, welcome, wake, moved) = match relay.admit(&peer, &conn, hello) {
        Ok(x) => x,
        Err((code, message)) => {
            let _ = writer
                .send(&ControlMessage::Error {
                    code,
                    request_id: None,
                    message: message.clone(),
                })
                .await;
            return refused(code, &message);
        }
    };
    relay.metrics.sessions_total.fetch_add(1, Ordering::Relaxed);
    tracing::info!(peer = %who, session = id, services = welcome.services.len(), rejected = welcome.rejected.len(), "session up");
    tracing::debug!(peer = %who, session = id, remote = %conn.remote_address(), tunnel_ip = ?welcome.tunnel_ip, "session addresses");
    if let Err(e) = writer.send(&ControlMessage::Welcome(welcome)).await {
        tracing::info!(peer = %who, session = id, reason = %e, "session ended");
        relay.end_session(id);
        return None;
    }
    Some(Opened {
        conn,
        who,
        id,
        reader,
        writer,
        wake,
        moved,
    })
}

enum SessionEnd {
    Refused(ErrorCode, String),
    Lost(String),
}

async fn session_loop(relay: &Relay, s: &mut Opened) -> Result<(), SessionEnd> {
    let Opened {
        conn,
        id,
        reader,
        writer,
        wake,
        moved,
        ..
    } = s;
    let id = *id;
    let lost = |e: SessionError| SessionEnd::Lost(e.to_string());
    let mut observed = conn.remote_address();
    loop {
        // A sender over its rate limit is not read until it has a token again: QUIC flow
        // control then pushes back on it, and nobody else waits.
        let paused = relay.read_ready_at(id);
        tokio::select! {
            msg = reader.next(), if paused.is_none() => match msg {
                Ok(Some(m)) => relay.on_message(id, m).map_err(|(c, m)| SessionEnd::Refused(c, m))?,
                Ok(None) => return Ok(()),
                Err(SessionError::Connection(e)) => return Err(SessionEnd::Lost(e.to_string())),
                Err(e @ (SessionError::Frame(_) | SessionError::Protocol(_))) => return Err(SessionEnd::Refused(ErrorCode::Malformed, e.to_string())),
                Err(e) => return Err(SessionEnd::Lost(e.to_string())),
            },
            () = sleep_until_opt(paused), if paused.is_some() => {}
            () = wake.notified() => {
                for _ in 0..WRITE_BATCH {
                    let Some(out) = relay.poll_transmit(id) else { break };
                    writer.send(&out).await.map_err(lost)?;
                }
                // More left: come back after the others had a turn.
                if relay.has_transmit(id) {
                    wake.notify_one();
                }
            }
            () = moved.notified() => {
                let now = conn.remote_address();
                if now != observed {
                    tracing::info!(session = id, "peer address changed");
                    tracing::debug!(session = id, old = %observed, new = %now, "new peer address");
                    observed = now;
                    let reported = canonical(now);
                    relay.set_observed(id, reported);
                    writer.send(&ControlMessage::ObservedAddress(reported)).await.map_err(lost)?;
                }
            }
            e = conn.closed() => return Err(SessionEnd::Lost(e.to_string())),
        }
    }
}

/// Sleeps until `at`, if any. The timer is boxed: only a session that is paused pays for one,
/// not every session's task.
async fn sleep_until_opt(at: Option<Instant>) {
    if let Some(at) = at {
        Box::pin(tokio::time::sleep_until(at.into())).await;
    }
}

#[cfg(test)]
mod tests {
    use ztna_proto::PortRange;

    use super::*;

    /// What a session's task costs for as long as the session lasts (the relay holds one per
    /// agent and connector): the handshake's and the hello's futures are not part of it. It was
    /// 2.2 KiB with them, 760 bytes without (Rust 1.95, tokio 1.54, quinn 0.11).
    #[test]
    fn session_task_stays_small() {
        fn future_size<A, B, F: std::future::Future>(_: impl FnOnce(A, B) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let session = future_size(run_session);
        assert!(session <= 1024, "a session's task holds {session} bytes");
    }

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
            address6: None,
            udp: vec![PortRange::single(7)],
            tcp: vec![],
            icmp: true,
            connector: "c".repeat(200),
            names: None,
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
