//! The relay's control plane as a pure state machine with injected time: sessions, channels,
//! per-identity rate limits and caps, and each session's bounded outbox. No sockets, no tasks,
//! no clock: [`crate::server`] is the I/O shell that feeds it events and carries out what it
//! asks.
//!
//! - **Events in:** [`ControlPlane::add_session`], [`ControlPlane::handle_message`],
//!   [`ControlPlane::remove_session`], [`ControlPlane::handle_timeout`] (at
//!   [`ControlPlane::poll_timeout`]), [`ControlPlane::reapply`] (a policy reload changed what
//!   agents may reach) and [`ControlPlane::close_session`] (a certificate was revoked).
//! - **Out:** [`ControlPlane::poll_transmit`] gives the next message to write on a session's
//!   control stream, [`ControlPlane::poll_command`] what the shell must do (wake a session's
//!   writer, close a session, add or remove a forwarding route), and
//!   [`ControlPlane::read_ready_at`] when the shell may read a session's next message.
//!
//! **No peer can starve or knock out another.** Every message an agent can make the relay
//! send to someone else is limited at its source:
//! - `OpenChannel` costs a token from a per-identity bucket (it survives reconnects), and an
//!   agent holds at most [`Limits::max_pending_per_agent`] channels the connector has not yet
//!   accepted, [`Limits::max_channels_per_agent`] in all, and one accepted channel per
//!   connector (a second `OpenChannel` to the same connector *replaces* the first once the
//!   connector accepts it; a second pending request replaces the first pending one).
//! - A `ChannelClosed` for a channel the connector has not accepted is never forwarded: the
//!   `IncomingChannel` is taken back out of the connector's outbox if it is still there;
//!   otherwise the connector's later `ChannelAccepted` is answered with `ChannelClosed`.
//! - Candidates are forwarded at most once per [`Limits::candidates_interval`] per channel end
//!   and dropped (counted) when the receiver's outbox is full.
//! - Every session's reads are paced by a per-identity token bucket, so a flood of any kind
//!   costs the relay bounded CPU: the shell stops reading (QUIC flow control pushes back on the
//!   sender) until a token is free.
//!
//! When an outbox is full, the *sender* of the request is refused or closed, never the
//! receiver: an `OpenChannel` towards a connector whose outbox is full is refused; a reply to a
//! session's own request that does not fit closes that session (it is not reading the answers to
//! its own requests). Channel closes are always queued (a lost close would leave the two ends out
//! of step); their number is bounded by the channels the session was an end of, which the caps
//! above bound, with [`HARD_OUTBOX`] as a backstop.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ztna_core::bucket::TokenBucket;
use ztna_core::tls::PeerIdentity;
use ztna_proto::control::{
    Candidate, CandidateKind, ControlMessage, ErrorCode, Role, MAX_CANDIDATES,
};
use ztna_proto::service::check_name;
use ztna_proto::{ChannelId, ServiceDef};

use crate::server::Metrics;

/// A session's number, unique for the life of the process.
pub type SessionId = u64;

/// Why a request or a peer is refused, as sent to it.
pub type Refusal = (ErrorCode, String);

/// Messages queued towards one session (replies, offers, candidates) before the sender of the
/// next one is refused or closed. Channel closes do not count (see the module docs).
pub const OUTBOX: usize = 256;
/// Backstop: a session with this many messages waiting, channel closes included, has not read
/// its control stream for a long time and is closed.
pub const HARD_OUTBOX: usize = 16 * 1024;

pub use ztna_core::bucket::Rate;

/// The relay's limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Sessions in all.
    pub max_sessions: usize,
    /// Channels in all.
    pub max_channels: usize,
    /// Channels (pending and accepted) one agent may hold.
    pub max_channels_per_agent: usize,
    /// Channels one agent may hold that the connector has not accepted yet.
    pub max_pending_per_agent: usize,
    /// How long a connector has to accept a channel.
    pub pending_timeout: Duration,
    /// `OpenChannel` requests per agent identity.
    pub open_rate: Rate,
    /// Control messages read from an agent.
    pub agent_read_rate: Rate,
    /// Control messages read from a connector (it answers every channel of every agent).
    pub connector_read_rate: Rate,
    /// Least time between two candidate lists forwarded from one end of a channel.
    pub candidates_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_sessions: 100_000,
            max_channels: 200_000,
            max_channels_per_agent: 64,
            max_pending_per_agent: 8,
            pending_timeout: Duration::from_secs(8),
            // An agent opens one channel per connector at start and one a second per failing
            // connector after that.
            open_rate: Rate {
                per_sec: 16.0,
                burst: 64.0,
            },
            agent_read_rate: Rate {
                per_sec: 64.0,
                burst: 256.0,
            },
            connector_read_rate: Rate {
                per_sec: 4096.0,
                burst: 8192.0,
            },
            candidates_interval: Duration::from_millis(100),
        }
    }
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// The session has messages in its outbox: wake its writer.
    Transmit(SessionId),
    /// Close the session's connection with this code and reason.
    Close {
        /// The session.
        session: SessionId,
        /// QUIC application close code.
        code: ErrorCode,
        /// Sent to the peer.
        reason: String,
    },
    /// Channel `channel` is open between these sessions: forward its datagrams.
    Route {
        /// The channel.
        channel: u32,
        /// The agent's session.
        agent: SessionId,
        /// The connector's session.
        connector: SessionId,
    },
    /// Stop forwarding channel `channel`.
    Unroute(u32),
}

/// What the control plane asks of the registry and policy.
pub trait Directory {
    /// Addresses of `connector`'s services that `agent` may reach; empty when none.
    fn reachable(&self, agent: &PeerIdentity, connector: &str) -> Vec<Ipv4Addr>;
}

/// Rate limits of one identity; kept after its session ends until they are full again, so
/// reconnecting does not refill them.
#[derive(Debug, Clone, Copy)]
struct Buckets {
    opens: TokenBucket,
    reads: TokenBucket,
}

#[derive(Debug, Default)]
struct Outbox {
    queue: VecDeque<ControlMessage>,
    /// Entries that count against [`OUTBOX`] (everything but channel closes).
    bounded: usize,
}

impl Outbox {
    fn is_bounded(msg: &ControlMessage) -> bool {
        !matches!(msg, ControlMessage::ChannelClosed { .. })
    }

    fn pop(&mut self) -> Option<ControlMessage> {
        let m = self.queue.pop_front()?;
        if Self::is_bounded(&m) {
            self.bounded -= 1;
        }
        self.release_if_empty();
        Some(m)
    }

    /// An idle session's outbox holds no memory: a drained queue gives its buffer back (four
    /// messages' worth, some 450 bytes a session; control messages are rare, so allocating
    /// again for the next one costs nothing that matters).
    fn release_if_empty(&mut self) {
        if self.queue.is_empty() {
            self.queue = VecDeque::new();
        }
    }

    /// Takes an unsent `IncomingChannel` for `ch` back out. Whether it was still there.
    fn withdraw_offer(&mut self, ch: u32) -> bool {
        let at = self.queue.iter().position(
            |m| matches!(m, ControlMessage::IncomingChannel { channel_id, .. } if *channel_id == ch),
        );
        match at.and_then(|i| self.queue.remove(i)) {
            Some(_) => {
                self.bounded -= 1;
                self.release_if_empty();
                true
            }
            None => false,
        }
    }
}

/// A peer to admit: see [`ControlPlane::add_session`].
#[derive(Debug, Clone)]
pub struct NewSession {
    /// From its certificate.
    pub identity: PeerIdentity,
    /// Its address as the relay sees it.
    pub observed: SocketAddr,
    /// An agent's tunnel IP.
    pub tunnel_ip: Option<Ipv4Addr>,
    /// The service names an agent asked for.
    pub want: Vec<String>,
    /// The catalog its welcome carries.
    pub catalog: Vec<ServiceDef>,
}

struct Session {
    identity: PeerIdentity,
    observed: SocketAddr,
    tunnel_ip: Option<Ipv4Addr>,
    want: Vec<String>,
    catalog: Vec<ServiceDef>,
    /// A catalog not yet written; a newer one replaces it.
    catalog_update: Option<Vec<ServiceDef>>,
    channels: HashSet<u32>,
    outbox: Outbox,
    /// Asked to be closed; nothing more is queued for it.
    closing: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChannelState {
    /// Offered to the connector; the agent waits with this request id.
    Pending { request_id: u32, deadline: Instant },
    /// Accepted by the connector.
    Open,
}

struct Channel {
    agent: SessionId,
    connector: SessionId,
    connector_name: String,
    /// The service addresses the connector was told the agent may reach (sorted); a policy
    /// reload that changes them closes the channel ([`ControlPlane::reapply`]).
    allowed: Vec<Ipv4Addr>,
    state: ChannelState,
    /// When each end (agent, connector) last had candidates forwarded.
    last_candidates: [Option<Instant>; 2],
}

/// The relay's sessions and channels.
pub struct ControlPlane {
    limits: Limits,
    metrics: Arc<Metrics>,
    next_session: SessionId,
    next_channel: u32,
    sessions: HashMap<SessionId, Session>,
    by_identity: HashMap<(Role, String), SessionId>,
    buckets: HashMap<(Role, String), Buckets>,
    channels: HashMap<u32, Channel>,
    /// Pending channels by deadline.
    deadlines: BTreeSet<(Instant, u32)>,
    commands: VecDeque<Command>,
}

impl ControlPlane {
    /// No sessions yet.
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Self {
        Self {
            limits,
            metrics,
            next_session: 1,
            next_channel: 1,
            sessions: HashMap::new(),
            by_identity: HashMap::new(),
            buckets: HashMap::new(),
            channels: HashMap::new(),
            deadlines: BTreeSet::new(),
            commands: VecDeque::new(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn count(&self, f: impl Fn(&Metrics) -> &std::sync::atomic::AtomicU64) {
        f(&self.metrics).fetch_add(1, Ordering::Relaxed);
    }

    /// Admits an authenticated peer that said hello. A session of the same identity is closed
    /// (`Replaced`) and removed first. Agents bring their tunnel IP and first catalog.
    pub fn add_session(&mut self, _now: Instant, new: NewSession) -> Result<SessionId, Refusal> {
        let NewSession {
            identity,
            observed,
            tunnel_ip,
            want,
            catalog,
        } = new;
        let key = (identity.role, identity.name.clone());
        if let Some(old) = self.by_identity.get(&key).copied() {
            tracing::info!(peer = %identity, "a new session replaces the existing one");
            self.close(old, ErrorCode::Replaced, "replaced by a newer session");
            self.remove_session(old);
        }
        if self.sessions.len() >= self.limits.max_sessions {
            return Err((
                ErrorCode::Limit,
                format!(
                    "the relay serves at most {} sessions",
                    self.limits.max_sessions
                ),
            ));
        }
        let id = self.next_session;
        self.next_session += 1;
        self.buckets.entry(key.clone()).or_insert(Buckets {
            opens: TokenBucket::full(),
            reads: TokenBucket::full(),
        });
        self.by_identity.insert(key, id);
        self.sessions.insert(
            id,
            Session {
                identity,
                observed,
                tunnel_ip,
                want,
                catalog,
                catalog_update: None,
                channels: HashSet::new(),
                outbox: Outbox::default(),
                closing: false,
            },
        );
        Ok(id)
    }

    fn read_rate(&self, role: Role) -> Rate {
        match role {
            Role::Connector => self.limits.connector_read_rate,
            _ => self.limits.agent_read_rate,
        }
    }

    /// Removes a session and its channels: the other end of each open channel hears
    /// `ChannelClosed`; an agent waiting for a channel of a departed connector hears an error.
    /// Returns the identity it had.
    pub fn remove_session(&mut self, id: SessionId) -> Option<PeerIdentity> {
        let s = self.sessions.remove(&id)?;
        let key = (s.identity.role, s.identity.name.clone());
        if self.by_identity.get(&key) == Some(&id) {
            self.by_identity.remove(&key);
        }
        for ch in s.channels {
            self.close_channel(ch, ErrorCode::PeerGone, Some(id));
        }
        Some(s.identity)
    }

    /// The session of an identity, if it is connected.
    pub fn session_of(&self, role: Role, name: &str) -> Option<SessionId> {
        self.by_identity.get(&(role, name.to_owned())).copied()
    }

    /// The identity of a session.
    pub fn identity(&self, id: SessionId) -> Option<&PeerIdentity> {
        self.sessions.get(&id).map(|s| &s.identity)
    }

    /// Sessions up now.
    pub fn sessions_len(&self) -> usize {
        self.sessions.len()
    }

    /// Channels (pending and open) now.
    pub fn channels_len(&self) -> usize {
        self.channels.len()
    }

    /// Agents with what they asked for, for recomputing catalogs.
    pub fn agents(&self) -> Vec<(SessionId, PeerIdentity, Vec<String>)> {
        self.sessions
            .iter()
            .filter(|(_, s)| s.identity.role == Role::Agent)
            .map(|(id, s)| (*id, s.identity.clone(), s.want.clone()))
            .collect()
    }

    /// Gives agent `id` a new catalog, if it differs from the last one. Coalesced: a catalog not
    /// yet written is replaced, so catalogs never pile up in an outbox.
    pub fn set_catalog(&mut self, id: SessionId, catalog: Vec<ServiceDef>) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        if s.catalog == catalog || s.closing {
            return;
        }
        s.catalog = catalog.clone();
        s.catalog_update = Some(catalog);
        self.commands.push_back(Command::Transmit(id));
    }

    /// Session `id`'s peer moved (the shell noticed a new remote address).
    pub fn set_observed(&mut self, id: SessionId, addr: SocketAddr) {
        if let Some(s) = self.sessions.get_mut(&id) {
            s.observed = addr;
        }
    }

    /// The next message to write on session `id`'s control stream.
    pub fn poll_transmit(&mut self, id: SessionId) -> Option<ControlMessage> {
        let s = self.sessions.get_mut(&id)?;
        if let Some(c) = s.catalog_update.take() {
            return Some(ControlMessage::Catalog(c));
        }
        s.outbox.pop()
    }

    /// Whether session `id` has messages waiting.
    pub fn has_transmit(&self, id: SessionId) -> bool {
        self.sessions
            .get(&id)
            .is_some_and(|s| s.catalog_update.is_some() || !s.outbox.queue.is_empty())
    }

    /// The next thing the shell must do.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// When the shell may read session `id`'s next control message (`None`: now).
    pub fn read_ready_at(&self, id: SessionId, now: Instant) -> Option<Instant> {
        let s = self.sessions.get(&id)?;
        let key = (s.identity.role, s.identity.name.clone());
        let rate = self.read_rate(s.identity.role);
        self.buckets.get(&key)?.reads.ready_at(rate, now)
    }

    /// The next time [`ControlPlane::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// Expires pending channels whose connector did not accept them in time, and forgets rate
    /// limits that are full again.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(t, ch)) = self.deadlines.first() {
            if t > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(c) = self.channels.get(&ch) else {
                continue;
            };
            if matches!(c.state, ChannelState::Pending { .. }) {
                tracing::debug!(channel = ch, connector = %c.connector_name, "connector did not accept the channel in time");
                self.close_channel(ch, ErrorCode::ConnectorOffline, None);
            }
        }
        let (opens, limits) = (self.limits.open_rate, &self.limits);
        let by_identity = &self.by_identity;
        self.buckets.retain(|key, b| {
            let reads = match key.0 {
                Role::Connector => limits.connector_read_rate,
                _ => limits.agent_read_rate,
            };
            by_identity.contains_key(key)
                || b.opens.full_at(opens).is_some_and(|t| t > now)
                || b.reads.full_at(reads).is_some_and(|t| t > now)
        });
    }

    /// Asks the shell to close session `id` (policy no longer allows it, say); its channels go
    /// when the shell reports it gone with [`ControlPlane::remove_session`].
    pub fn close_session(&mut self, id: SessionId, code: ErrorCode, reason: &str) {
        self.close(id, code, reason);
    }

    /// Tells session `id` something went wrong outside any request of its own (a service it
    /// may no longer serve after a policy reload, say). Dropped, and `false`, when its outbox is
    /// full: such notices are advisory and must not close a peer.
    pub fn notify_error(&mut self, id: SessionId, code: ErrorCode, message: String) -> bool {
        self.try_queue(
            id,
            ControlMessage::Error {
                code,
                request_id: None,
                message,
            },
        )
    }

    /// A policy reload changed what agents may reach: closes each channel (pending or open)
    /// whose reachable service addresses are no longer the ones the connector was told, with
    /// `Unauthorized` when the agent may reach nothing at that connector any more, else
    /// `PolicyChanged` (the agent opens a new channel and the connector hears the new set).
    /// Channels whose set is unchanged are untouched. Returns how many were closed.
    pub fn reapply(&mut self, dir: &impl Directory) -> usize {
        let mut changed: Vec<(u32, ErrorCode)> = Vec::new();
        for (ch, c) in &self.channels {
            let Some(agent) = self.sessions.get(&c.agent) else {
                continue;
            };
            let mut now = dir.reachable(&agent.identity, &c.connector_name);
            now.sort_unstable();
            if now != c.allowed {
                let code = if now.is_empty() {
                    ErrorCode::Unauthorized
                } else {
                    ErrorCode::PolicyChanged
                };
                changed.push((*ch, code));
            }
        }
        changed.sort_unstable_by_key(|(ch, _)| *ch);
        for &(ch, code) in &changed {
            tracing::info!(channel = ch, %code, "closing a channel: the policy reload changed what it may reach");
            self.count(|m| &m.channels_closed_by_policy);
            self.close_channel(ch, code, None);
        }
        changed.len()
    }

    /// Asks the shell to close session `id`; nothing more is queued for it.
    fn close(&mut self, id: SessionId, code: ErrorCode, reason: &str) {
        if let Some(s) = self.sessions.get_mut(&id) {
            if !s.closing {
                s.closing = true;
                s.outbox = Outbox::default();
                s.catalog_update = None;
                self.commands.push_back(Command::Close {
                    session: id,
                    code,
                    reason: reason.to_owned(),
                });
            }
        }
    }

    /// Queues a message that counts against the receiver's outbox. `false` when it is full.
    fn try_queue(&mut self, to: SessionId, msg: ControlMessage) -> bool {
        let Some(s) = self.sessions.get_mut(&to) else {
            return true;
        };
        if s.closing {
            return true;
        }
        if s.outbox.bounded >= OUTBOX {
            return false;
        }
        s.outbox.bounded += 1;
        s.outbox.queue.push_back(msg);
        self.commands.push_back(Command::Transmit(to));
        true
    }

    /// Queues a reply to session `to`'s own request; a session that does not read the answers
    /// to its own requests is closed.
    fn reply(&mut self, to: SessionId, msg: ControlMessage) {
        if !self.try_queue(to, msg) {
            tracing::warn!(session = to, "control stream not read; closing the session");
            self.count(|m| &m.sessions_closed_slow);
            self.close(to, ErrorCode::Limit, "control stream not read");
        }
    }

    /// Queues a channel close; never dropped (see the module docs).
    fn queue_close(&mut self, to: SessionId, ch: u32, code: ErrorCode) {
        let Some(s) = self.sessions.get_mut(&to) else {
            return;
        };
        if s.closing {
            return;
        }
        s.outbox.queue.push_back(ControlMessage::ChannelClosed {
            channel_id: ch,
            code,
        });
        if s.outbox.queue.len() >= HARD_OUTBOX {
            self.count(|m| &m.sessions_closed_slow);
            self.close(to, ErrorCode::Limit, "control stream not read");
        } else {
            self.commands.push_back(Command::Transmit(to));
        }
    }

    /// Handles one control message from session `id`. An error closes that session.
    pub fn handle_message(
        &mut self,
        now: Instant,
        id: SessionId,
        msg: ControlMessage,
        dir: &impl Directory,
    ) -> Result<(), Refusal> {
        let Some(s) = self.sessions.get(&id) else {
            return Ok(());
        };
        if s.closing {
            return Ok(());
        }
        let key = (s.identity.role, s.identity.name.clone());
        let rate = self.read_rate(s.identity.role);
        if let Some(b) = self.buckets.get_mut(&key) {
            // The shell waits for a token before reading; one read past it is paid later.
            if !b.reads.take_on_credit(rate, now) {
                self.count(|m| &m.control_limited);
            }
        }
        match msg {
            ControlMessage::OpenChannel {
                request_id,
                connector,
            } => {
                if let Err((code, message)) =
                    self.open_channel(now, id, request_id, &connector, dir)
                {
                    self.count(|m| &m.channels_refused);
                    // A flood of requests must not become a flood of log lines: refusals for a
                    // limit are logged at DEBUG (and counted). `?` escapes a hostile name.
                    if let Some(s) = self.sessions.get(&id) {
                        if code == ErrorCode::Limit {
                            tracing::debug!(agent = %s.identity.name, ?connector, "channel refused: {message}");
                        } else {
                            tracing::info!(agent = %s.identity.name, ?connector, %code, "channel refused: {message}");
                        }
                    }
                    self.reply(
                        id,
                        ControlMessage::Error {
                            code,
                            request_id: Some(request_id),
                            message,
                        },
                    );
                }
                Ok(())
            }
            ControlMessage::ChannelAccepted { channel_id } => self.accept_channel(id, channel_id),
            ControlMessage::ChannelClosed { channel_id, code } => {
                let member = self
                    .channels
                    .get(&channel_id)
                    .is_some_and(|c| c.agent == id || c.connector == id);
                if member {
                    self.close_channel(channel_id, code, Some(id));
                }
                Ok(())
            }
            ControlMessage::Candidates {
                channel_id,
                candidates,
            } => self.forward_candidates(now, id, channel_id, candidates),
            ControlMessage::Ping(n) => {
                self.reply(id, ControlMessage::Pong(n));
                Ok(())
            }
            other => Err((
                ErrorCode::Malformed,
                format!("unexpected {} message from a client", other.kind()),
            )),
        }
    }

    fn open_channel(
        &mut self,
        now: Instant,
        id: SessionId,
        request_id: u32,
        connector: &str,
        dir: &impl Directory,
    ) -> Result<(), Refusal> {
        check_name("connector name", connector).map_err(|e| (ErrorCode::Malformed, e))?;
        let agent = self
            .sessions
            .get(&id)
            .ok_or((ErrorCode::Internal, "session gone".to_owned()))?;
        if agent.identity.role != Role::Agent {
            return Err((ErrorCode::Unauthorized, "only agents open channels".into()));
        }
        let key = (Role::Agent, agent.identity.name.clone());
        let opens = self.limits.open_rate;
        if let Some(b) = self.buckets.get_mut(&key) {
            if !b.opens.take(opens, now) {
                self.metrics.control_limited.fetch_add(1, Ordering::Relaxed);
                return Err((
                    ErrorCode::Limit,
                    format!(
                        "more than {} channel requests a second",
                        self.limits.open_rate.per_sec
                    ),
                ));
            }
        }
        let cid = self.session_of(Role::Connector, connector);
        let mut allowed = dir.reachable(&agent.identity, connector);
        allowed.sort_unstable();
        if allowed.is_empty() {
            let code = if cid.is_some() {
                ErrorCode::Unauthorized
            } else {
                ErrorCode::ConnectorOffline
            };
            return Err((
                code,
                format!(
                    "no service of connector {connector:?} is available to {}",
                    agent.identity.name
                ),
            ));
        }
        let cid = cid.ok_or((
            ErrorCode::ConnectorOffline,
            format!("connector {connector:?} is not connected"),
        ))?;
        let tunnel_ip = agent.tunnel_ip.ok_or((
            ErrorCode::Internal,
            "agent has no tunnel address".to_owned(),
        ))?;
        // One channel per agent-connector pair: a newer request replaces a pending one now, and
        // an open one once the connector accepts the newer one.
        let mut pending_same = None;
        let mut open_same = false;
        let mut pending = 0;
        for ch in &agent.channels {
            let Some(c) = self.channels.get(ch) else {
                continue;
            };
            let pend = matches!(c.state, ChannelState::Pending { .. });
            pending += usize::from(pend);
            if c.connector_name == connector {
                if pend {
                    pending_same = Some(*ch);
                } else {
                    open_same = true;
                }
            }
        }
        let total = agent.channels.len() - usize::from(pending_same.is_some());
        let pending = pending - usize::from(pending_same.is_some());
        if !open_same && total >= self.limits.max_channels_per_agent {
            return Err((
                ErrorCode::Limit,
                format!(
                    "at most {} channels per agent",
                    self.limits.max_channels_per_agent
                ),
            ));
        }
        if pending >= self.limits.max_pending_per_agent {
            return Err((
                ErrorCode::Limit,
                format!(
                    "at most {} channels waiting for their connectors",
                    self.limits.max_pending_per_agent
                ),
            ));
        }
        if self.channels.len() - usize::from(pending_same.is_some()) >= self.limits.max_channels {
            return Err((ErrorCode::Limit, "the relay's channel table is full".into()));
        }
        let agent_name = agent.identity.name.clone();
        if let Some(old) = pending_same {
            tracing::debug!(agent = %agent_name, ?connector, channel = old, "a newer request replaces a pending channel");
            self.count(|m| &m.channels_replaced);
            self.cancel_pending(old);
        }
        if self
            .sessions
            .get(&cid)
            .is_none_or(|c| c.outbox.bounded >= OUTBOX)
        {
            return Err((
                ErrorCode::Limit,
                format!("connector {connector:?} is busy; try again"),
            ));
        }
        let ch = self.allocate_channel();
        let deadline = now + self.limits.pending_timeout;
        self.try_queue(
            cid,
            ControlMessage::IncomingChannel {
                channel_id: ch,
                agent: agent_name.clone(),
                agent_tunnel_ip: tunnel_ip,
                services: allowed.clone(),
            },
        );
        self.channels.insert(
            ch,
            Channel {
                agent: id,
                connector: cid,
                connector_name: connector.to_owned(),
                allowed,
                state: ChannelState::Pending {
                    request_id,
                    deadline,
                },
                last_candidates: [None, None],
            },
        );
        self.deadlines.insert((deadline, ch));
        for end in [id, cid] {
            if let Some(s) = self.sessions.get_mut(&end) {
                s.channels.insert(ch);
            }
        }
        self.count(|m| &m.channels_opened);
        self.metrics
            .channels_active
            .store(self.channels.len() as u64, Ordering::Relaxed);
        tracing::debug!(agent = %agent_name, ?connector, channel = ch, "channel offered to the connector");
        Ok(())
    }

    /// Channel ids are unique among open channels; they wrap within the varint range.
    fn allocate_channel(&mut self) -> u32 {
        let mut ch = self.next_channel;
        for _ in 0..=self.channels.len() {
            if !self.channels.contains_key(&ch) {
                break;
            }
            ch = if ch >= ChannelId::MAX { 1 } else { ch + 1 };
        }
        self.next_channel = if ch >= ChannelId::MAX { 1 } else { ch + 1 };
        ch
    }

    /// Drops a channel the connector has not accepted, without telling anyone: its offer is taken
    /// back out of the connector's outbox if unsent; if it was sent, the connector's acceptance
    /// is answered with `ChannelClosed`.
    fn cancel_pending(&mut self, ch: u32) {
        let Some(c) = self.channels.remove(&ch) else {
            return;
        };
        if let ChannelState::Pending { deadline, .. } = c.state {
            self.deadlines.remove(&(deadline, ch));
        }
        for end in [c.agent, c.connector] {
            if let Some(s) = self.sessions.get_mut(&end) {
                s.channels.remove(&ch);
            }
        }
        if let Some(s) = self.sessions.get_mut(&c.connector) {
            if s.outbox.withdraw_offer(ch) {
                self.metrics
                    .channel_offers_withdrawn
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        self.metrics
            .channels_active
            .store(self.channels.len() as u64, Ordering::Relaxed);
    }

    /// Closes channel `ch` for `code`, telling the ends that did not close it (`closed_by`).
    fn close_channel(&mut self, ch: u32, code: ErrorCode, closed_by: Option<SessionId>) {
        let Some(c) = self.channels.get(&ch) else {
            return;
        };
        let (agent, connector) = (c.agent, c.connector);
        match c.state {
            ChannelState::Pending { request_id, .. } => {
                let name = c.connector_name.clone();
                self.cancel_pending(ch);
                // The agent knows the channel only by its request; the connector hears nothing
                // of a channel it never accepted.
                if closed_by != Some(agent) {
                    self.reply(
                        agent,
                        ControlMessage::Error {
                            code,
                            request_id: Some(request_id),
                            message: format!("connector {name} did not take the channel"),
                        },
                    );
                }
            }
            ChannelState::Open => {
                self.channels.remove(&ch);
                self.commands.push_back(Command::Unroute(ch));
                for end in [agent, connector] {
                    if let Some(s) = self.sessions.get_mut(&end) {
                        s.channels.remove(&ch);
                    }
                    if Some(end) != closed_by {
                        self.queue_close(end, ch, code);
                    }
                }
                self.metrics
                    .channels_active
                    .store(self.channels.len() as u64, Ordering::Relaxed);
            }
        }
    }

    /// The connector accepted channel `ch`: tell the agent it is open, and close the channel it
    /// replaces, if any.
    fn accept_channel(&mut self, id: SessionId, ch: u32) -> Result<(), Refusal> {
        let Some(c) = self.channels.get_mut(&ch) else {
            // Closed or withdrawn in the meantime: this connector may hold it, so tell it.
            self.count(|m| &m.channels_refused);
            let is_connector = self
                .sessions
                .get(&id)
                .is_some_and(|s| s.identity.role == Role::Connector);
            if is_connector {
                self.reply(
                    id,
                    ControlMessage::ChannelClosed {
                        channel_id: ch,
                        code: ErrorCode::PeerGone,
                    },
                );
            }
            return Ok(());
        };
        if c.connector != id {
            return Err((
                ErrorCode::Malformed,
                format!("channel {ch} is not this connector's"),
            ));
        }
        let ChannelState::Pending {
            request_id,
            deadline,
        } = c.state
        else {
            return Err((ErrorCode::Malformed, format!("channel {ch} accepted twice")));
        };
        c.state = ChannelState::Open;
        let (agent, connector, name) = (c.agent, c.connector, c.connector_name.clone());
        self.deadlines.remove(&(deadline, ch));
        self.commands.push_back(Command::Route {
            channel: ch,
            agent,
            connector,
        });
        if let Some(a) = self.sessions.get(&agent) {
            tracing::info!(agent = %a.identity.name, connector = %name, channel = ch, "channel open");
        }
        self.reply(
            agent,
            ControlMessage::ChannelOpened {
                request_id,
                channel_id: ch,
                connector: name.clone(),
            },
        );
        // The channel this one replaces.
        let old: Vec<u32> = self
            .sessions
            .get(&agent)
            .map(|a| {
                a.channels
                    .iter()
                    .copied()
                    .filter(|o| *o != ch)
                    .filter(|o| {
                        self.channels.get(o).is_some_and(|oc| {
                            oc.connector_name == name && oc.state == ChannelState::Open
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        for o in old {
            self.count(|m| &m.channels_replaced);
            self.close_channel(o, ErrorCode::Replaced, None);
        }
        Ok(())
    }

    /// Brokers hole punching: forwards one end's direct-path candidates to the other end of
    /// channel `ch`, adding the sender's observed address (its NAT mapping) if it is missing.
    fn forward_candidates(
        &mut self,
        now: Instant,
        id: SessionId,
        ch: u32,
        mut candidates: Vec<Candidate>,
    ) -> Result<(), Refusal> {
        if candidates.len() > MAX_CANDIDATES {
            return Err((
                ErrorCode::Malformed,
                format!("{} candidates (at most {MAX_CANDIDATES})", candidates.len()),
            ));
        }
        let interval = self.limits.candidates_interval;
        let Some(c) = self.channels.get_mut(&ch) else {
            // Closed in the meantime.
            return Ok(());
        };
        let (to, end) = if c.agent == id {
            (c.connector, 0)
        } else if c.connector == id {
            (c.agent, 1)
        } else {
            return Err((
                ErrorCode::Malformed,
                format!("channel {ch} is not this session's"),
            ));
        };
        if c.state != ChannelState::Open {
            // Not open yet: nobody has an end-to-end connection to probe with.
            return Ok(());
        }
        // Candidates change rarely (a new address); drop what comes too fast.
        if c.last_candidates[end].is_some_and(|t| now.saturating_duration_since(t) < interval) {
            self.count(|m| &m.candidates_dropped);
            return Ok(());
        }
        c.last_candidates[end] = Some(now);
        if let Some(observed) = self.sessions.get(&id).map(|s| s.observed) {
            candidates = with_reflexive(candidates, observed);
        }
        let msg = ControlMessage::Candidates {
            channel_id: ch,
            candidates,
        };
        if self.try_queue(to, msg) {
            tracing::debug!(channel = ch, "forwarding direct-path candidates");
            self.count(|m| &m.candidates_forwarded);
        } else {
            self.count(|m| &m.candidates_dropped);
        }
        Ok(())
    }
}

/// Adds the sender's observed address as a reflexive candidate if the list lacks it.
pub fn with_reflexive(mut candidates: Vec<Candidate>, observed: SocketAddr) -> Vec<Candidate> {
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
    candidates
}

#[cfg(test)]
mod tests {
    use super::*;

    struct AllowAll;

    impl Directory for AllowAll {
        fn reachable(&self, _: &PeerIdentity, _: &str) -> Vec<Ipv4Addr> {
            vec![Ipv4Addr::new(10, 100, 0, 1)]
        }
    }

    struct Sim {
        cp: ControlPlane,
        now: Instant,
        t0: Instant,
    }

    impl Sim {
        fn new(limits: Limits) -> Self {
            let now = Instant::now();
            Self {
                cp: ControlPlane::new(limits, Arc::new(Metrics::default())),
                now,
                t0: now,
            }
        }

        fn add(&mut self, role: Role, name: &str) -> SessionId {
            let identity = PeerIdentity {
                name: name.into(),
                role,
                groups: vec![],
            };
            self.cp
                .add_session(
                    self.now,
                    NewSession {
                        identity,
                        observed: "192.0.2.1:4000".parse().unwrap(),
                        tunnel_ip: (role == Role::Agent).then(|| Ipv4Addr::new(100, 64, 0, 9)),
                        want: vec![],
                        catalog: vec![],
                    },
                )
                .unwrap()
        }

        fn send(&mut self, id: SessionId, msg: ControlMessage) -> Result<(), Refusal> {
            self.cp.handle_message(self.now, id, msg, &AllowAll)
        }

        fn open(&mut self, agent: SessionId, request_id: u32, connector: &str) {
            self.send(
                agent,
                ControlMessage::OpenChannel {
                    request_id,
                    connector: connector.into(),
                },
            )
            .unwrap();
        }

        fn drain(&mut self, id: SessionId) -> Vec<ControlMessage> {
            std::iter::from_fn(|| self.cp.poll_transmit(id)).collect()
        }

        fn commands(&mut self) -> Vec<Command> {
            std::iter::from_fn(|| self.cp.poll_command()).collect()
        }

        fn advance(&mut self, d: Duration) {
            self.now += d;
            self.cp.handle_timeout(self.now);
        }

        fn offered(&mut self, connector: SessionId) -> u32 {
            match self.drain(connector).as_slice() {
                [ControlMessage::IncomingChannel { channel_id, .. }] => *channel_id,
                other => panic!("expected one offer, got {other:?}"),
            }
        }

        fn closes_of(cmds: &[Command], id: SessionId) -> usize {
            cmds.iter()
                .filter(|c| matches!(c, Command::Close { session, .. } if *session == id))
                .count()
        }
    }

    #[test]
    fn open_accept_forward_close() {
        let mut s = Sim::new(Limits::default());
        let a = s.add(Role::Agent, "alice");
        let c = s.add(Role::Connector, "c1");
        s.open(a, 7, "c1");
        let ch = s.offered(c);
        assert!(
            s.drain(a).is_empty(),
            "no answer before the connector accepts"
        );
        s.send(c, ControlMessage::ChannelAccepted { channel_id: ch })
            .unwrap();
        assert!(s.commands().contains(&Command::Route {
            channel: ch,
            agent: a,
            connector: c
        }));
        assert_eq!(
            s.drain(a),
            vec![ControlMessage::ChannelOpened {
                request_id: 7,
                channel_id: ch,
                connector: "c1".into()
            }]
        );
        // Candidates get the sender's observed address, and are paced.
        let cand = || ControlMessage::Candidates {
            channel_id: ch,
            candidates: vec![],
        };
        s.send(a, cand()).unwrap();
        s.send(a, cand()).unwrap();
        match s.drain(c).as_slice() {
            [ControlMessage::Candidates { candidates, .. }] => {
                assert_eq!(candidates[0].kind, CandidateKind::Reflexive)
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.cp.metrics.candidates_dropped.load(Ordering::Relaxed), 1);
        s.now += Duration::from_millis(100);
        s.send(a, cand()).unwrap();
        assert_eq!(s.drain(c).len(), 1);
        // Accepting twice, or someone else's channel, is a protocol error.
        assert!(s
            .send(c, ControlMessage::ChannelAccepted { channel_id: ch })
            .is_err());
        s.send(
            a,
            ControlMessage::ChannelClosed {
                channel_id: ch,
                code: ErrorCode::PeerGone,
            },
        )
        .unwrap();
        assert!(s.commands().contains(&Command::Unroute(ch)));
        assert_eq!(
            s.drain(c),
            vec![ControlMessage::ChannelClosed {
                channel_id: ch,
                code: ErrorCode::PeerGone
            }]
        );
        assert_eq!(s.cp.channels_len(), 0);
    }

    /// An idle session's outbox holds no buffer: once its messages are written (or an unsent
    /// offer is withdrawn), the queue's memory goes back (relay-scale memory per session).
    /// A ping is answered to its sender only, with the same number, and counts against the
    /// sender's control read rate like any message.
    #[test]
    fn pings_are_answered_to_the_sender() {
        let mut s = Sim::new(Limits::default());
        let a = s.add(Role::Agent, "alice");
        let c = s.add(Role::Connector, "c1");
        s.send(a, ControlMessage::Ping(42)).unwrap();
        assert_eq!(s.drain(a), vec![ControlMessage::Pong(42)]);
        assert!(s.drain(c).is_empty());
        // A client may not send the answer.
        assert!(s.send(a, ControlMessage::Pong(1)).is_err());
    }

    #[test]
    fn drained_outboxes_hold_no_memory() {
        let mut s = Sim::new(Limits::default());
        let a = s.add(Role::Agent, "alice");
        let c = s.add(Role::Connector, "c1");
        let cap = |s: &Sim, id| s.cp.sessions[&id].outbox.queue.capacity();
        s.open(a, 1, "c1");
        assert!(cap(&s, c) > 0, "the offer is queued");
        let ch = s.offered(c);
        assert_eq!(cap(&s, c), 0);
        s.send(c, ControlMessage::ChannelAccepted { channel_id: ch })
            .unwrap();
        assert!(cap(&s, a) > 0, "the answer is queued");
        assert_eq!(s.drain(a).len(), 1);
        assert_eq!(cap(&s, a), 0);
        // A replacing request withdraws the unsent offer of the first one.
        s.open(a, 2, "c1");
        s.open(a, 3, "c1");
        assert_eq!(s.drain(c).len(), 1, "one offer left, the other withdrawn");
        assert_eq!(cap(&s, c), 0);
    }

    /// Addresses per connector, as a policy reload would change them.
    struct Table(HashMap<&'static str, Vec<Ipv4Addr>>);

    impl Directory for Table {
        fn reachable(&self, _: &PeerIdentity, connector: &str) -> Vec<Ipv4Addr> {
            self.0.get(connector).cloned().unwrap_or_default()
        }
    }

    /// A policy reload closes exactly the channels (open or pending) whose reachable addresses
    /// changed: `Unauthorized` when nothing is reachable any more, else `PolicyChanged`; a
    /// pending one is answered to the agent's request and its offer withdrawn; an unchanged set
    /// (in another order) keeps its channel. Unknown connector names are refused as malformed.
    #[test]
    fn reload_closes_channels_whose_reachable_set_changed() {
        let ip = |d| Ipv4Addr::new(10, 100, 0, d);
        let mut s = Sim::new(Limits::default());
        let a = s.add(Role::Agent, "alice");
        let cs: Vec<SessionId> = ["c1", "c2", "c3", "c4"]
            .iter()
            .map(|n| s.add(Role::Connector, n))
            .collect();
        let before = Table(HashMap::from([
            ("c1", vec![ip(2), ip(1)]),
            ("c2", vec![ip(3)]),
            ("c3", vec![ip(4)]),
            ("c4", vec![ip(6)]),
        ]));
        let open = |s: &mut Sim, req: u32, name: &str, conn: SessionId, accept: bool| {
            let msg = ControlMessage::OpenChannel {
                request_id: req,
                connector: name.into(),
            };
            s.cp.handle_message(s.now, a, msg, &before).unwrap();
            let ch = match s.drain(conn).as_slice() {
                [ControlMessage::IncomingChannel {
                    channel_id,
                    services,
                    ..
                }] => {
                    assert!(services.windows(2).all(|w| w[0] <= w[1]), "sorted");
                    *channel_id
                }
                other => panic!("{other:?}"),
            };
            if accept {
                s.send(conn, ControlMessage::ChannelAccepted { channel_id: ch })
                    .unwrap();
            }
            ch
        };
        let ch1 = open(&mut s, 1, "c1", cs[0], true);
        let ch2 = open(&mut s, 2, "c2", cs[1], true);
        let _ch3 = open(&mut s, 3, "c3", cs[2], false);
        let ch4 = open(&mut s, 4, "c4", cs[3], true);
        s.drain(a);
        s.commands();
        assert_eq!(s.cp.reapply(&before), 0, "same policy: nothing closes");
        let after = Table(HashMap::from([
            ("c1", vec![ip(1), ip(2)]),
            ("c3", vec![ip(5)]),
            ("c4", vec![ip(6), ip(7)]),
        ]));
        assert_eq!(s.cp.reapply(&after), 3);
        let cmds = s.commands();
        assert!(cmds.contains(&Command::Unroute(ch2)) && cmds.contains(&Command::Unroute(ch4)));
        assert!(!cmds.contains(&Command::Unroute(ch1)));
        let to_agent = s.drain(a);
        assert!(to_agent.contains(&ControlMessage::ChannelClosed {
            channel_id: ch2,
            code: ErrorCode::Unauthorized
        }));
        assert!(to_agent.contains(&ControlMessage::ChannelClosed {
            channel_id: ch4,
            code: ErrorCode::PolicyChanged
        }));
        assert!(to_agent.iter().any(|m| matches!(
            m,
            ControlMessage::Error {
                code: ErrorCode::PolicyChanged,
                request_id: Some(3),
                ..
            }
        )));
        assert_eq!(to_agent.len(), 3, "{to_agent:?}");
        assert_eq!(
            s.drain(cs[1]),
            vec![ControlMessage::ChannelClosed {
                channel_id: ch2,
                code: ErrorCode::Unauthorized
            }]
        );
        assert!(s.drain(cs[0]).is_empty() && s.drain(cs[2]).is_empty());
        assert_eq!(s.cp.channels_len(), 1);
        assert_eq!(
            s.cp.metrics
                .channels_closed_by_policy
                .load(Ordering::Relaxed),
            3
        );
        assert_eq!(s.cp.reapply(&after), 0, "applied twice: nothing more");
        // A connector name that is not a name is refused, not looked up.
        let bad = ControlMessage::OpenChannel {
            request_id: 9,
            connector: "c1\u{1b}[2J".into(),
        };
        s.cp.handle_message(s.now, a, bad, &after).unwrap();
        assert!(matches!(
            s.drain(a).as_slice(),
            [ControlMessage::Error {
                code: ErrorCode::Malformed,
                request_id: Some(9),
                ..
            }]
        ));
    }

    /// The attack of issue 10: OpenChannel/ChannelClosed pairs as fast as the agent can write
    /// them. The connector hears of at most the burst plus the rate, never a close of a channel
    /// it did not accept, and is never closed.
    #[test]
    fn open_close_flood_does_not_reach_the_connector() {
        let mut s = Sim::new(Limits::default());
        let mallory = s.add(Role::Agent, "mallory");
        let c = s.add(Role::Connector, "c1");
        let mut to_connector = Vec::new();
        let mut closes = 0;
        for i in 0..2000u32 {
            s.open(mallory, i, "c1");
            // The attacker guesses the channel id (ids are sequential).
            let _ = s.send(
                mallory,
                ControlMessage::ChannelClosed {
                    channel_id: i + 1,
                    code: ErrorCode::PeerGone,
                },
            );
            // The connector reads every 10 pairs, half the time.
            if i % 20 == 0 {
                to_connector.extend(s.drain(c));
            }
            s.drain(mallory);
            closes += Sim::closes_of(&s.commands(), c);
            s.now += Duration::from_micros(500); // 2000 pairs in one second
        }
        to_connector.extend(s.drain(c));
        assert_eq!(closes, 0, "the connector is never closed");
        assert!(
            !to_connector
                .iter()
                .any(|m| matches!(m, ControlMessage::ChannelClosed { .. })),
            "no close of a channel the connector never accepted"
        );
        let limit =
            (Limits::default().open_rate.burst + Limits::default().open_rate.per_sec) as usize;
        assert!(
            to_connector.len() <= limit,
            "{} messages reached the connector",
            to_connector.len()
        );
        // The connector later accepts an offer it read: it hears the channel is gone.
        if let Some(ControlMessage::IncomingChannel { channel_id, .. }) = to_connector.first() {
            s.send(
                c,
                ControlMessage::ChannelAccepted {
                    channel_id: *channel_id,
                },
            )
            .unwrap();
            assert!(matches!(
                s.drain(c).as_slice(),
                [ControlMessage::ChannelClosed { .. }]
            ));
        }
        // Another agent still gets a channel.
        let bob = s.add(Role::Agent, "bob");
        s.open(bob, 1, "c1");
        let ch = s.offered(c);
        s.send(c, ControlMessage::ChannelAccepted { channel_id: ch })
            .unwrap();
        assert!(matches!(
            s.drain(bob).as_slice(),
            [ControlMessage::ChannelOpened { .. }]
        ));
    }

    #[test]
    fn one_channel_per_pair_with_one_replacement() {
        let mut s = Sim::new(Limits::default());
        let a = s.add(Role::Agent, "alice");
        let c = s.add(Role::Connector, "c1");
        s.open(a, 1, "c1");
        let first = s.offered(c);
        s.send(c, ControlMessage::ChannelAccepted { channel_id: first })
            .unwrap();
        s.drain(a);
        // A second request is the replacement: the first stays open meanwhile.
        s.open(a, 2, "c1");
        let second = s.offered(c);
        // A third request replaces the pending second; its unsent offer... was sent, so the
        // connector's acceptance is answered with a close.
        s.open(a, 3, "c1");
        let third = s.offered(c);
        assert_eq!(s.cp.channels_len(), 2, "one open plus one replacement");
        s.send(c, ControlMessage::ChannelAccepted { channel_id: second })
            .unwrap();
        assert_eq!(
            s.drain(c),
            vec![ControlMessage::ChannelClosed {
                channel_id: second,
                code: ErrorCode::PeerGone
            }]
        );
        // The replacement is accepted: the first channel closes at both ends.
        s.send(c, ControlMessage::ChannelAccepted { channel_id: third })
            .unwrap();
        let to_agent = s.drain(a);
        assert_eq!(
            to_agent,
            vec![
                ControlMessage::ChannelOpened {
                    request_id: 3,
                    channel_id: third,
                    connector: "c1".into()
                },
                ControlMessage::ChannelClosed {
                    channel_id: first,
                    code: ErrorCode::Replaced
                }
            ]
        );
        assert_eq!(
            s.drain(c),
            vec![ControlMessage::ChannelClosed {
                channel_id: first,
                code: ErrorCode::Replaced
            }]
        );
        assert_eq!(s.cp.channels_len(), 1);
        // A replaced request whose offer is still unsent is taken back.
        s.open(a, 4, "c1");
        s.open(a, 5, "c1");
        assert!(matches!(
            s.drain(c).as_slice(),
            [ControlMessage::IncomingChannel { .. }]
        ));
        assert_eq!(
            s.cp.metrics
                .channel_offers_withdrawn
                .load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn pending_channels_expire_and_are_capped() {
        let limits = Limits {
            max_pending_per_agent: 2,
            max_channels_per_agent: 3,
            ..Limits::default()
        };
        let mut s = Sim::new(limits);
        let a = s.add(Role::Agent, "alice");
        let cs: Vec<_> = (0..4)
            .map(|i| s.add(Role::Connector, &format!("c{i}")))
            .collect();
        s.open(a, 0, "c0");
        s.open(a, 1, "c1");
        s.open(a, 2, "c2");
        match s.drain(a).as_slice() {
            [ControlMessage::Error {
                code: ErrorCode::Limit,
                request_id: Some(2),
                ..
            }] => {}
            other => panic!("pending cap: {other:?}"),
        }
        for (i, c) in cs.iter().take(2).enumerate() {
            let ch = s.offered(*c);
            if i == 0 {
                s.send(*c, ControlMessage::ChannelAccepted { channel_id: ch })
                    .unwrap();
            }
        }
        s.drain(a);
        s.open(a, 3, "c2");
        s.open(a, 4, "c3");
        assert!(
            matches!(
                s.drain(a).as_slice(),
                [ControlMessage::Error {
                    code: ErrorCode::Limit,
                    request_id: Some(4),
                    ..
                }]
            ),
            "channel cap"
        );
        // c1 never accepts: after the timeout the agent hears it, the deadline is gone.
        assert_eq!(
            s.cp.poll_timeout(),
            Some(s.t0 + Limits::default().pending_timeout)
        );
        s.advance(Limits::default().pending_timeout);
        let errs = s.drain(a);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs.iter().all(|m| matches!(
            m,
            ControlMessage::Error {
                code: ErrorCode::ConnectorOffline,
                ..
            }
        )));
        assert_eq!(s.cp.channels_len(), 1);
        assert_eq!(s.cp.poll_timeout(), None);
    }

    #[test]
    fn full_outbox_refuses_or_closes_the_sender_never_the_receiver() {
        let mut s = Sim::new(Limits::default());
        let c = s.add(Role::Connector, "c1");
        // The connector reads nothing while many agents ask for channels.
        let mut refused = 0;
        for i in 0..(OUTBOX + 50) {
            let a = s.add(Role::Agent, &format!("agent{i}"));
            s.open(a, 1, "c1");
            refused += s
                .drain(a)
                .iter()
                .filter(|m| {
                    matches!(
                        m,
                        ControlMessage::Error {
                            code: ErrorCode::Limit,
                            ..
                        }
                    )
                })
                .count();
        }
        assert_eq!(refused, 50);
        assert_eq!(Sim::closes_of(&s.commands(), c), 0);
        // An agent that floods requests and reads none of the answers is closed itself.
        let m = s.add(Role::Agent, "mallory");
        for i in 0..2000 {
            s.open(m, i, "nobody");
        }
        let cmds = s.commands();
        assert_eq!(Sim::closes_of(&cmds, m), 1);
        assert_eq!(Sim::closes_of(&cmds, c), 0);
    }

    #[test]
    fn reads_are_paced_and_limits_survive_reconnects() {
        let mut s = Sim::new(Limits::default());
        let a = s.add(Role::Agent, "alice");
        let burst = Limits::default().agent_read_rate.burst as usize;
        for _ in 0..burst {
            assert_eq!(s.cp.read_ready_at(a, s.now), None);
            s.send(
                a,
                ControlMessage::ChannelClosed {
                    channel_id: 99,
                    code: ErrorCode::PeerGone,
                },
            )
            .unwrap();
        }
        let at = s.cp.read_ready_at(a, s.now).expect("paused");
        assert!(at > s.now && at <= s.now + Duration::from_millis(20));
        // Reconnecting does not refill the buckets.
        s.cp.remove_session(a);
        s.advance(Duration::from_millis(1));
        let a2 = s.add(Role::Agent, "alice");
        assert!(s.cp.read_ready_at(a2, s.now).is_some());
        // Full buckets of departed identities are forgotten.
        s.cp.remove_session(a2);
        s.advance(Duration::from_secs(60));
        assert!(s.cp.buckets.is_empty());
    }

    #[test]
    fn replaced_session_loses_its_channels() {
        let mut s = Sim::new(Limits::default());
        let a = s.add(Role::Agent, "alice");
        let c = s.add(Role::Connector, "c1");
        s.open(a, 1, "c1");
        let ch = s.offered(c);
        s.send(c, ControlMessage::ChannelAccepted { channel_id: ch })
            .unwrap();
        s.commands();
        let a2 = s.add(Role::Agent, "alice");
        assert_ne!(a, a2);
        let cmds = s.commands();
        assert!(cmds.contains(&Command::Close {
            session: a,
            code: ErrorCode::Replaced,
            reason: "replaced by a newer session".into()
        }));
        assert!(cmds.contains(&Command::Unroute(ch)));
        assert_eq!(
            s.drain(c),
            vec![ControlMessage::ChannelClosed {
                channel_id: ch,
                code: ErrorCode::PeerGone
            }]
        );
        assert_eq!(s.cp.sessions_len(), 2);
        assert_eq!(s.cp.remove_session(a), None, "already gone");
    }
    #[derive(Debug, Clone)]
    enum Op {
        Open { agent: usize, connector: usize },
        Close { from: usize, ch: u32 },
        Accept { connector: usize, ch: u32 },
        Candidates { from: usize, ch: u32 },
        Drain(usize),
        Reconnect(usize),
        Advance(u64),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0..3usize, 0..2usize).prop_map(|(agent, connector)| Op::Open { agent, connector }),
            2 => (0..5usize, 1..30u32).prop_map(|(from, ch)| Op::Close { from, ch }),
            3 => (0..2usize, 1..30u32).prop_map(|(connector, ch)| Op::Accept { connector, ch }),
            1 => (0..5usize, 1..30u32).prop_map(|(from, ch)| Op::Candidates { from, ch }),
            2 => (0..5usize).prop_map(Op::Drain),
            1 => (0..5usize).prop_map(Op::Reconnect),
            1 => (0..3000u64).prop_map(Op::Advance),
        ]
    }

    proptest::proptest! {
        /// Whatever agents and connectors send, in any order: a connector is closed only for what
        /// it sent itself, an agent holds at most one open channel and one pending replacement
        /// per connector, outboxes stay bounded, and both ends agree on every channel.
        #[test]
        fn invariants_hold_under_any_sequence(ops in proptest::collection::vec(op(), 1..300)) {
            let limits = Limits {
                open_rate: Rate { per_sec: 50.0, burst: 20.0 },
                ..Limits::default()
            };
            let mut s = Sim::new(limits);
            // Sessions 0..3 are agents, 3..5 connectors.
            let names = ["a0", "a1", "a2", "c0", "c1"];
            let role = |i: usize| if i < 3 { Role::Agent } else { Role::Connector };
            let mut ids: Vec<SessionId> = (0..5).map(|i| s.add(role(i), names[i])).collect();
            s.commands();
            for op in ops {
                let sender = match &op {
                    Op::Open { agent, .. } => Some(*agent),
                    Op::Close { from, .. } | Op::Candidates { from, .. } => Some(*from),
                    Op::Accept { connector, .. } => Some(3 + connector),
                    _ => None,
                };
                let _ = match op {
                    Op::Open { agent, connector } => s.send(
                        ids[agent],
                        ControlMessage::OpenChannel { request_id: 1, connector: names[3 + connector].into() },
                    ),
                    Op::Close { from, ch } => s.send(
                        ids[from],
                        ControlMessage::ChannelClosed { channel_id: ch, code: ErrorCode::PeerGone },
                    ),
                    Op::Accept { connector, ch } => s.send(
                        ids[3 + connector],
                        ControlMessage::ChannelAccepted { channel_id: ch },
                    ),
                    Op::Candidates { from, ch } => s.send(
                        ids[from],
                        ControlMessage::Candidates { channel_id: ch, candidates: vec![] },
                    ),
                    Op::Drain(i) => {
                        s.drain(ids[i]);
                        Ok(())
                    }
                    Op::Reconnect(i) => {
                        ids[i] = s.add(role(i), names[i]);
                        Ok(())
                    }
                    Op::Advance(ms) => {
                        s.advance(Duration::from_millis(ms));
                        Ok(())
                    }
                };
                for cmd in s.commands() {
                    if let Command::Close { session, code, .. } = cmd {
                        let i = ids.iter().position(|x| *x == session);
                        let replaced = code == ErrorCode::Replaced;
                        let connector = i.is_none_or(|i| i >= 3);
                        proptest::prop_assert!(
                            replaced || !connector || i == sender,
                            "connector {i:?} closed ({code}) by a message of {sender:?}"
                        );
                    }
                }
                for (id, sess) in &s.cp.sessions {
                    proptest::prop_assert!(sess.outbox.bounded <= OUTBOX);
                    proptest::prop_assert!(sess.outbox.queue.len() < HARD_OUTBOX);
                    for ch in &sess.channels {
                        let c = &s.cp.channels[ch];
                        proptest::prop_assert!(c.agent == *id || c.connector == *id);
                    }
                    if sess.identity.role == Role::Agent {
                        for name in ["c0", "c1"] {
                            let of = |pending: bool| sess.channels.iter().filter(|ch| {
                                let c = &s.cp.channels[*ch];
                                c.connector_name == name
                                    && matches!(c.state, ChannelState::Pending { .. }) == pending
                            }).count();
                            proptest::prop_assert!(of(true) <= 1 && of(false) <= 1);
                        }
                    }
                }
                for (ch, c) in &s.cp.channels {
                    for end in [c.agent, c.connector] {
                        proptest::prop_assert!(s.cp.sessions[&end].channels.contains(ch));
                    }
                }
            }
        }
    }
}
