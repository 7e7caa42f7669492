//! The agent's session logic as a pure state machine: relay (re)connection with backoff,
//! permanent refusals, the service catalog and the routes it asks for (with a grace period
//! before a withdrawn service leaves the routing table), and one relay channel per connector.
//!
//! It never touches a socket or a clock: the I/O shell ([`crate::agent`]) feeds it
//! [`Input`]s with [`AgentMachine::handle`], calls [`AgentMachine::handle_timeout`] when
//! [`AgentMachine::poll_timeout`] is due, and carries out the [`Command`]s that
//! [`AgentMachine::poll_command`] yields, in order.
//!
//! Two rules make the agent **fail closed**:
//! - losing the relay session changes no route: service routes stay pointed at the tunnel
//!   (where packets are dropped and counted) until a *live* session's catalog omits a service,
//!   and then only after [`MachineConfig::withdraw_grace`];
//! - the inner connection to a connector is not closed when the relay session or its channel
//!   goes: the next channel to that connector re-points it ([`Command::Attach`] with
//!   `handshake: false`), so TCP connections inside it survive a relay restart.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ztna_proto::{ChannelId, ServiceDef};

use crate::agent::TunnelState;
use crate::backoff::Backoff;

/// Why the relay refuses this agent for good: retrying will not help until someone changes a
/// certificate, the CA or policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum Refusal {
    /// The relay rejected this agent's certificate (unknown CA, expired, not yet valid,
    /// revoked, malformed).
    CertificateRejected,
    /// This agent does not trust the relay's certificate (another CA, expired, wrong name, not
    /// a relay).
    RelayUntrusted,
    /// The relay accepted the certificate but policy denies this identity (deny list, role).
    Denied,
}

impl Refusal {
    /// The process exit code `ztna-agent up` ends with (documented in the README).
    pub fn exit_code(self) -> u8 {
        match self {
            Refusal::CertificateRejected => 3,
            Refusal::RelayUntrusted => 4,
            Refusal::Denied => 5,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::CertificateRejected => {
                "the relay rejected this agent's certificate (unknown CA, expired, not yet valid or revoked)"
            }
            Refusal::RelayUntrusted => {
                "this agent does not trust the relay's certificate (another CA, expired, or not a relay)"
            }
            Refusal::Denied => "the relay's policy denies this identity",
        })
    }
}

/// Timing and limits of the machine.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// How long a service that a live catalog no longer lists keeps its route.
    pub withdraw_grace: Duration,
    /// How long the relay may take to answer a channel request before the agent asks again.
    pub channel_request_timeout: Duration,
    /// Wait before asking again for a channel the relay could not open or closed.
    pub channel_retry: Duration,
    /// Consecutive permanent refusals after which the agent gives up ([`Command::Exit`]).
    pub max_refusals: u32,
    /// Delays between relay connection attempts.
    pub backoff: Backoff,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            withdraw_grace: Duration::from_secs(30),
            channel_request_timeout: Duration::from_secs(10),
            channel_retry: Duration::from_secs(1),
            max_refusals: 3,
            backoff: Backoff::default(),
        }
    }
}

/// What happened, as the shell saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A relay session is up: the welcome's tunnel IP and catalog.
    Connected {
        /// Tunnel IP the relay assigned.
        tunnel_ip: Option<Ipv4Addr>,
        /// Services policy allows that a connector serves now.
        services: Vec<ServiceDef>,
    },
    /// A connection attempt failed or the session ended; `refusal` when the reason is
    /// permanent.
    Disconnected {
        /// Set when retrying cannot help.
        refusal: Option<Refusal>,
    },
    /// A new catalog from the live session.
    Catalog(Vec<ServiceDef>),
    /// The relay opened the channel asked for with `request_id`.
    ChannelOpened {
        /// The request it answers.
        request_id: u32,
        /// The channel.
        channel: ChannelId,
        /// The connector the relay says it leads to.
        connector: String,
    },
    /// The relay could not open the channel asked for with `request_id`.
    ChannelRefused {
        /// The request.
        request_id: u32,
    },
    /// The relay closed a channel.
    ChannelClosed {
        /// The channel id.
        channel: u32,
    },
    /// The inner connection to `connector` completed its handshake.
    InnerUp {
        /// Connector identity.
        connector: String,
    },
    /// The inner connection to `connector` (or its handshake) ended.
    InnerDown {
        /// Connector identity.
        connector: String,
    },
}

/// What the shell must do, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Start a connection attempt to the relay; answer with [`Input::Connected`] or
    /// [`Input::Disconnected`].
    Connect,
    /// Stop for good: the relay refuses this agent.
    Exit(Refusal),
    /// The tunnel address and the services to route changed.
    Publish(TunnelState),
    /// Ask the relay for a channel to `connector`.
    OpenChannel {
        /// Connector identity.
        connector: String,
        /// Request id to send.
        request_id: u32,
    },
    /// Tell the relay the agent no longer uses `channel`.
    CloseChannel {
        /// The channel id.
        channel: ChannelId,
    },
    /// Route `connector`'s virtual peer address through `channel`; start the inner handshake
    /// over it if `handshake`, otherwise the live inner connection continues over it.
    Attach {
        /// Connector identity.
        connector: String,
        /// The channel.
        channel: ChannelId,
        /// Whether a new inner connection is needed.
        handshake: bool,
    },
    /// `connector`'s channel is gone: its virtual address has no relay path until the next
    /// [`Command::Attach`] (a direct path, if any, keeps working).
    Detach {
        /// Connector identity.
        connector: String,
    },
    /// Close the inner connection to `connector` (its state is reset; a later channel starts a
    /// new handshake).
    CloseInner {
        /// Connector identity.
        connector: String,
    },
    /// `connector` left the catalog: drop everything about it.
    Forget {
        /// Connector identity.
        connector: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Relay {
    /// Waiting to connect (backoff) until then.
    Waiting(Instant),
    /// A connection attempt is under way.
    Connecting,
    /// The session is up.
    Up,
    /// Gave up.
    Exited,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    None,
    Handshaking,
    Up,
}

#[derive(Debug, Clone)]
struct Peer {
    /// A channel request in flight and when to give up on it.
    request: Option<(u32, Instant)>,
    channel: Option<ChannelId>,
    /// When to ask for a channel again.
    retry_at: Option<Instant>,
    inner: Inner,
}

impl Peer {
    fn new() -> Self {
        Self {
            request: None,
            channel: None,
            retry_at: None,
            inner: Inner::None,
        }
    }
}

/// A routed service, and when it leaves the routing table if the catalog withdrew it.
#[derive(Debug, Clone)]
struct Routed {
    def: ServiceDef,
    withdraw_at: Option<Instant>,
}

/// The state machine. See the module docs.
#[derive(Debug)]
pub struct AgentMachine {
    cfg: MachineConfig,
    relay: Relay,
    random: u64,
    refusals: u32,
    tunnel_ip: Option<Ipv4Addr>,
    /// Routed services by (name, address, connector), in a stable order.
    services: BTreeMap<(String, Ipv4Addr, String), Routed>,
    peers: HashMap<String, Peer>,
    next_request: u32,
    published: Option<TunnelState>,
    commands: VecDeque<Command>,
}

impl AgentMachine {
    /// A machine that connects at once. `random` seeds the backoff jitter.
    pub fn new(cfg: MachineConfig, now: Instant, random: u64) -> Self {
        Self {
            cfg,
            relay: Relay::Waiting(now),
            random,
            refusals: 0,
            tunnel_ip: None,
            services: BTreeMap::new(),
            peers: HashMap::new(),
            next_request: 1,
            published: None,
            commands: VecDeque::new(),
        }
    }

    /// Whether a relay session is up.
    pub fn connected(&self) -> bool {
        self.relay == Relay::Up
    }

    /// Whether the machine gave up (a [`Command::Exit`] was issued).
    pub fn exited(&self) -> bool {
        self.relay == Relay::Exited
    }

    /// Names of routed services that the catalog withdrew and that leave when their grace
    /// period ends.
    pub fn withdrawing(&self) -> Vec<String> {
        self.services
            .values()
            .filter(|r| r.withdraw_at.is_some())
            .map(|r| r.def.name.clone())
            .collect()
    }

    /// The next command to carry out.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// When [`AgentMachine::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let relay = match self.relay {
            Relay::Waiting(at) => Some(at),
            _ => None,
        };
        let grace = self.services.values().filter_map(|r| r.withdraw_at);
        let peers = self.peers.values().flat_map(|p| {
            [p.request.map(|(_, at)| at), p.retry_at]
                .into_iter()
                .flatten()
        });
        relay.into_iter().chain(grace).chain(peers).min()
    }

    /// Runs what is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.relay == Relay::Exited {
            return;
        }
        if matches!(self.relay, Relay::Waiting(at) if at <= now) {
            self.relay = Relay::Connecting;
            self.commands.push_back(Command::Connect);
        }
        let expired: Vec<_> = self
            .services
            .iter()
            .filter(|(_, r)| r.withdraw_at.is_some_and(|at| at <= now))
            .map(|(k, _)| k.clone())
            .collect();
        if !expired.is_empty() {
            for k in &expired {
                self.services.remove(k);
            }
            self.sync_peers(now);
            self.publish();
        }
        let mut names: Vec<String> = self.peers.keys().cloned().collect();
        names.sort();
        for name in names {
            let Some(p) = self.peers.get_mut(&name) else {
                continue;
            };
            if p.request.is_some_and(|(_, at)| at <= now) {
                p.request = None;
                p.retry_at = Some(now);
            }
            if p.retry_at.is_some_and(|at| at <= now) {
                p.retry_at = None;
                self.open_channel(&name, now);
            }
        }
    }

    /// Feeds one input.
    pub fn handle(&mut self, now: Instant, input: Input) {
        if self.relay == Relay::Exited {
            return;
        }
        match input {
            Input::Connected {
                tunnel_ip,
                services,
            } => self.on_connected(now, tunnel_ip, services),
            Input::Disconnected { refusal } => self.on_disconnected(now, refusal),
            Input::Catalog(services) => {
                if self.relay == Relay::Up {
                    self.apply_catalog(now, services);
                }
            }
            Input::ChannelOpened {
                request_id,
                channel,
                connector,
            } => {
                let inner = match self.peers.get_mut(&connector) {
                    Some(p) if p.request.is_some_and(|(id, _)| id == request_id) => {
                        p.request = None;
                        p.channel = Some(channel);
                        let handshake = p.inner == Inner::None;
                        if handshake {
                            p.inner = Inner::Handshaking;
                        }
                        Some(handshake)
                    }
                    _ => None,
                };
                match inner {
                    Some(handshake) => self.commands.push_back(Command::Attach {
                        connector,
                        channel,
                        handshake,
                    }),
                    // A late answer to a request that timed out or was superseded.
                    None => self.commands.push_back(Command::CloseChannel { channel }),
                }
            }
            Input::ChannelRefused { request_id } => {
                let retry = now + self.cfg.channel_retry;
                if let Some(p) = self
                    .peers
                    .values_mut()
                    .find(|p| p.request.is_some_and(|(id, _)| id == request_id))
                {
                    p.request = None;
                    p.retry_at = Some(retry);
                }
            }
            Input::ChannelClosed { channel } => {
                let retry = now + self.cfg.channel_retry;
                let found = self
                    .peers
                    .iter_mut()
                    .find(|(_, p)| p.channel.is_some_and(|c| c.get() == channel));
                // The relay closes a channel when its other end went away (the connector
                // restarted or left): the inner connection cannot continue, start afresh.
                if let Some((name, p)) = found {
                    p.channel = None;
                    p.retry_at = Some(retry);
                    let connector = name.clone();
                    self.commands.push_back(Command::Detach {
                        connector: connector.clone(),
                    });
                    if p.inner != Inner::None {
                        p.inner = Inner::None;
                        self.commands.push_back(Command::CloseInner { connector });
                    }
                }
            }
            Input::InnerUp { connector } => {
                if let Some(p) = self.peers.get_mut(&connector) {
                    p.inner = Inner::Up;
                }
            }
            Input::InnerDown { connector } => {
                let retry = now + self.cfg.channel_retry;
                let Some(p) = self.peers.get_mut(&connector) else {
                    return;
                };
                p.inner = Inner::None;
                // The connector forgets a channel whose inner connection ended: ask for a new
                // one and handshake over it.
                if let Some(channel) = p.channel.take() {
                    p.retry_at = Some(retry);
                    self.commands.push_back(Command::CloseChannel { channel });
                    self.commands.push_back(Command::Detach { connector });
                }
            }
        }
    }

    fn on_connected(
        &mut self,
        now: Instant,
        tunnel_ip: Option<Ipv4Addr>,
        services: Vec<ServiceDef>,
    ) {
        self.relay = Relay::Up;
        self.refusals = 0;
        self.cfg.backoff.reset();
        // The old session's channels went with it.
        for p in self.peers.values_mut() {
            p.request = None;
            p.channel = None;
            p.retry_at = None;
        }
        if self.tunnel_ip.is_some() && tunnel_ip != self.tunnel_ip {
            // Connections inside the tunnel were bound to the old address; the connector would
            // not take them over either.
            let mut names: Vec<String> = self.peers.keys().cloned().collect();
            names.sort();
            for connector in names {
                if let Some(p) = self.peers.get_mut(&connector) {
                    if p.inner != Inner::None {
                        p.inner = Inner::None;
                        self.commands.push_back(Command::CloseInner { connector });
                    }
                }
            }
        }
        self.tunnel_ip = tunnel_ip;
        self.apply_catalog(now, services);
        let mut names: Vec<String> = self.peers.keys().cloned().collect();
        names.sort();
        for name in names {
            self.open_channel(&name, now);
        }
    }

    fn on_disconnected(&mut self, now: Instant, refusal: Option<Refusal>) {
        // Routes stay as they are: fail closed.
        for p in self.peers.values_mut() {
            p.request = None;
            p.channel = None;
            p.retry_at = None;
        }
        match refusal {
            Some(r) => {
                self.refusals += 1;
                if self.refusals >= self.cfg.max_refusals {
                    self.relay = Relay::Exited;
                    self.commands.push_back(Command::Exit(r));
                    return;
                }
            }
            None => self.refusals = 0,
        }
        self.random = self
            .random
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = self.cfg.backoff.next_delay(self.random >> 33);
        self.relay = Relay::Waiting(now + delay);
    }

    /// Installs a catalog from a live session: new services are routed at once, services it
    /// lacks start their grace period, services back in it stay.
    fn apply_catalog(&mut self, now: Instant, services: Vec<ServiceDef>) {
        let grace = now + self.cfg.withdraw_grace;
        let mut fresh: BTreeMap<_, _> = BTreeMap::new();
        for s in services {
            fresh.insert((s.name.clone(), s.address, s.connector.clone()), s);
        }
        for (k, r) in self.services.iter_mut() {
            if fresh.contains_key(k) {
                r.withdraw_at = None;
            } else if r.withdraw_at.is_none() {
                r.withdraw_at = Some(grace);
            }
        }
        for (k, def) in fresh {
            self.services
                .entry(k)
                .and_modify(|r| r.def = def.clone())
                .or_insert(Routed {
                    def,
                    withdraw_at: None,
                });
        }
        // Routes first, then the channels to their connectors.
        self.publish();
        self.sync_peers(now);
    }

    /// Makes the peers match the connectors of routed services.
    fn sync_peers(&mut self, now: Instant) {
        let wanted: std::collections::BTreeSet<String> = self
            .services
            .values()
            .map(|r| r.def.connector.clone())
            .collect();
        let mut gone: Vec<String> = self
            .peers
            .keys()
            .filter(|n| !wanted.contains(*n))
            .cloned()
            .collect();
        gone.sort();
        for connector in gone {
            if let Some(p) = self.peers.remove(&connector) {
                if let Some(channel) = p.channel {
                    self.commands.push_back(Command::CloseChannel { channel });
                }
                self.commands.push_back(Command::Forget { connector });
            }
        }
        for name in wanted {
            if !self.peers.contains_key(&name) {
                self.peers.insert(name.clone(), Peer::new());
                if self.relay == Relay::Up {
                    self.open_channel(&name, now);
                }
            }
        }
    }

    fn open_channel(&mut self, connector: &str, now: Instant) {
        if self.relay != Relay::Up {
            return;
        }
        let Some(p) = self.peers.get_mut(connector) else {
            return;
        };
        if p.request.is_some() || p.channel.is_some() {
            return;
        }
        let request_id = self.next_request;
        self.next_request = self.next_request.wrapping_add(1).max(1);
        p.request = Some((request_id, now + self.cfg.channel_request_timeout));
        p.retry_at = None;
        self.commands.push_back(Command::OpenChannel {
            connector: connector.to_owned(),
            request_id,
        });
    }

    fn publish(&mut self) {
        let state = TunnelState {
            tunnel_ip: self.tunnel_ip,
            services: self.services.values().map(|r| r.def.clone()).collect(),
        };
        if self.published.as_ref() != Some(&state) {
            self.published = Some(state.clone());
            self.commands.push_back(Command::Publish(state));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, last: u8, connector: &str) -> ServiceDef {
        ServiceDef {
            name: name.into(),
            address: Ipv4Addr::new(10, 100, 0, last),
            udp: vec![],
            tcp: vec![],
            icmp: true,
            connector: connector.into(),
        }
    }

    const TIP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

    fn drain(m: &mut AgentMachine) -> Vec<Command> {
        std::iter::from_fn(|| m.poll_command()).collect()
    }

    fn routed(m: &AgentMachine) -> Vec<String> {
        m.published
            .as_ref()
            .map(|s| s.services.iter().map(|s| s.name.clone()).collect())
            .unwrap_or_default()
    }

    /// Runs every timeout up to `until`, in order, and returns the commands.
    fn advance(m: &mut AgentMachine, until: Instant) -> Vec<Command> {
        let mut out = Vec::new();
        for _ in 0..1000 {
            match m.poll_timeout() {
                Some(at) if at <= until => {
                    m.handle_timeout(at);
                    out.extend(drain(m));
                }
                _ => break,
            }
        }
        out
    }

    fn machine(t0: Instant) -> AgentMachine {
        let cfg = MachineConfig {
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(10)),
            ..MachineConfig::default()
        };
        AgentMachine::new(cfg, t0, 7)
    }

    /// Connects with `services` and returns the request id sent for `connector`.
    fn connect(m: &mut AgentMachine, now: Instant, services: Vec<ServiceDef>) -> Vec<Command> {
        m.handle_timeout(now);
        m.handle(
            now,
            Input::Connected {
                tunnel_ip: Some(TIP),
                services,
            },
        );
        drain(m)
    }

    fn request_of(cmds: &[Command], who: &str) -> Option<u32> {
        cmds.iter().find_map(|c| match c {
            Command::OpenChannel {
                connector,
                request_id,
            } if connector == who => Some(*request_id),
            _ => None,
        })
    }

    fn ch(n: u32) -> ChannelId {
        ChannelId::new(n).expect("valid channel id")
    }

    #[test]
    fn connects_at_once_routes_and_opens_one_channel_per_connector() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        assert_eq!(m.poll_timeout(), Some(t0));
        m.handle_timeout(t0);
        assert_eq!(drain(&mut m), vec![Command::Connect]);
        m.handle(
            t0,
            Input::Connected {
                tunnel_ip: Some(TIP),
                services: vec![
                    svc("echo", 1, "c1"),
                    svc("dns", 2, "c1"),
                    svc("db", 3, "c2"),
                ],
            },
        );
        let cmds = drain(&mut m);
        assert!(
            matches!(&cmds[0], Command::Publish(s) if s.services.len() == 3 && s.tunnel_ip == Some(TIP))
        );
        assert_eq!(
            cmds[1..],
            [
                Command::OpenChannel {
                    connector: "c1".into(),
                    request_id: 1
                },
                Command::OpenChannel {
                    connector: "c2".into(),
                    request_id: 2
                },
            ]
        );
        m.handle(
            t0,
            Input::ChannelOpened {
                request_id: 1,
                channel: ch(5),
                connector: "c1".into(),
            },
        );
        assert_eq!(
            drain(&mut m),
            vec![Command::Attach {
                connector: "c1".into(),
                channel: ch(5),
                handshake: true
            }]
        );
        // A stale answer (wrong request id) is closed.
        m.handle(
            t0,
            Input::ChannelOpened {
                request_id: 9,
                channel: ch(6),
                connector: "c2".into(),
            },
        );
        assert_eq!(
            drain(&mut m),
            vec![Command::CloseChannel { channel: ch(6) }]
        );
    }

    /// Fail closed: a lost session and a reconnect whose catalog is briefly empty change no
    /// route; a service leaves only after the grace period of a live withdrawal.
    #[test]
    fn routes_survive_a_relay_restart_and_leave_only_after_the_grace_period() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        connect(&mut m, t0, vec![svc("echo", 1, "c1")]);
        assert_eq!(routed(&m), ["echo"]);

        let t1 = t0 + Duration::from_secs(60);
        m.handle(t1, Input::Disconnected { refusal: None });
        let cmds = drain(&mut m);
        assert!(
            !cmds.iter().any(|c| matches!(c, Command::Publish(_))),
            "{cmds:?}"
        );
        // Reconnects after the backoff (200 ms minus jitter).
        let cmds = advance(&mut m, t1 + Duration::from_millis(200));
        assert_eq!(cmds, vec![Command::Connect]);
        // The restarted relay does not know the connector yet: empty catalog.
        let t2 = t1 + Duration::from_secs(1);
        m.handle(
            t2,
            Input::Connected {
                tunnel_ip: Some(TIP),
                services: vec![],
            },
        );
        drain(&mut m);
        assert_eq!(
            routed(&m),
            ["echo"],
            "routes must stay during the grace period"
        );
        assert_eq!(m.withdrawing(), ["echo"]);
        // Still there just before the grace period ends.
        advance(&mut m, t2 + Duration::from_secs(29));
        assert_eq!(routed(&m), ["echo"]);
        // The connector comes back: the withdrawal is cancelled.
        m.handle(
            t2 + Duration::from_secs(29),
            Input::Catalog(vec![svc("echo", 1, "c1")]),
        );
        drain(&mut m);
        assert!(m.withdrawing().is_empty());
        advance(&mut m, t2 + Duration::from_secs(120));
        assert_eq!(routed(&m), ["echo"]);

        // A real withdrawal: gone after exactly the grace period, with its connector.
        let t3 = t2 + Duration::from_secs(200);
        m.handle(t3, Input::Catalog(vec![]));
        drain(&mut m);
        advance(&mut m, t3 + Duration::from_millis(29_999));
        assert_eq!(routed(&m), ["echo"]);
        let cmds = advance(&mut m, t3 + Duration::from_secs(30));
        assert_eq!(routed(&m), Vec::<String>::new());
        assert!(cmds.contains(&Command::Forget {
            connector: "c1".into()
        }));
    }

    #[test]
    fn a_catalog_while_disconnected_is_ignored() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        connect(&mut m, t0, vec![svc("echo", 1, "c1")]);
        m.handle(t0, Input::Disconnected { refusal: None });
        m.handle(t0, Input::Catalog(vec![]));
        assert!(m.withdrawing().is_empty());
    }

    /// The inner connection outlives the session: the next channel re-points it.
    #[test]
    fn a_new_channel_resumes_the_live_inner_connection() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        let cmds = connect(&mut m, t0, vec![svc("echo", 1, "c1")]);
        let id = request_of(&cmds, "c1").expect("a channel request");
        m.handle(
            t0,
            Input::ChannelOpened {
                request_id: id,
                channel: ch(1),
                connector: "c1".into(),
            },
        );
        m.handle(
            t0,
            Input::InnerUp {
                connector: "c1".into(),
            },
        );
        drain(&mut m);
        // Relay killed: nothing is closed, nothing is unrouted.
        m.handle(t0, Input::Disconnected { refusal: None });
        assert!(drain(&mut m).is_empty());
        let t1 = t0 + Duration::from_secs(3);
        let cmds = connect(&mut m, t1, vec![svc("echo", 1, "c1")]);
        let id = request_of(&cmds, "c1").expect("a channel request after the restart");
        // The connector is not back yet.
        m.handle(t1, Input::ChannelRefused { request_id: id });
        assert!(drain(&mut m).is_empty());
        let cmds = advance(&mut m, t1 + Duration::from_secs(1));
        let id = request_of(&cmds, "c1").expect("asked again after a second");
        m.handle(
            t1 + Duration::from_secs(1),
            Input::ChannelOpened {
                request_id: id,
                channel: ch(7),
                connector: "c1".into(),
            },
        );
        assert_eq!(
            drain(&mut m),
            vec![Command::Attach {
                connector: "c1".into(),
                channel: ch(7),
                handshake: false
            }]
        );
    }

    #[test]
    fn a_new_tunnel_ip_closes_inner_connections() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        let cmds = connect(&mut m, t0, vec![svc("echo", 1, "c1")]);
        let id = request_of(&cmds, "c1").expect("request");
        m.handle(
            t0,
            Input::ChannelOpened {
                request_id: id,
                channel: ch(1),
                connector: "c1".into(),
            },
        );
        m.handle(
            t0,
            Input::InnerUp {
                connector: "c1".into(),
            },
        );
        m.handle(t0, Input::Disconnected { refusal: None });
        drain(&mut m);
        advance(&mut m, t0 + Duration::from_secs(1));
        m.handle(
            t0 + Duration::from_secs(1),
            Input::Connected {
                tunnel_ip: Some(Ipv4Addr::new(100, 64, 0, 9)),
                services: vec![svc("echo", 1, "c1")],
            },
        );
        let cmds = drain(&mut m);
        assert_eq!(
            cmds[0],
            Command::CloseInner {
                connector: "c1".into()
            }
        );
        let id = request_of(&cmds, "c1").expect("request");
        m.handle(
            t0 + Duration::from_secs(1),
            Input::ChannelOpened {
                request_id: id,
                channel: ch(2),
                connector: "c1".into(),
            },
        );
        assert_eq!(
            drain(&mut m),
            vec![Command::Attach {
                connector: "c1".into(),
                channel: ch(2),
                handshake: true
            }]
        );
    }

    #[test]
    fn inner_down_closes_the_channel_and_asks_again() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        let cmds = connect(&mut m, t0, vec![svc("echo", 1, "c1")]);
        let id = request_of(&cmds, "c1").expect("request");
        m.handle(
            t0,
            Input::ChannelOpened {
                request_id: id,
                channel: ch(3),
                connector: "c1".into(),
            },
        );
        drain(&mut m);
        m.handle(
            t0,
            Input::InnerDown {
                connector: "c1".into(),
            },
        );
        assert_eq!(
            drain(&mut m),
            vec![
                Command::CloseChannel { channel: ch(3) },
                Command::Detach {
                    connector: "c1".into()
                }
            ]
        );
        let cmds = advance(&mut m, t0 + Duration::from_secs(1));
        assert!(request_of(&cmds, "c1").is_some(), "{cmds:?}");
    }

    #[test]
    fn unanswered_channel_requests_are_asked_again() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        let cmds = connect(&mut m, t0, vec![svc("echo", 1, "c1")]);
        let first = request_of(&cmds, "c1").expect("request");
        assert!(advance(&mut m, t0 + Duration::from_millis(9_999)).is_empty());
        let cmds = advance(&mut m, t0 + Duration::from_secs(10));
        let second = request_of(&cmds, "c1").expect("asked again");
        assert_ne!(first, second);
        // The late answer to the first request is closed.
        m.handle(
            t0 + Duration::from_secs(11),
            Input::ChannelOpened {
                request_id: first,
                channel: ch(4),
                connector: "c1".into(),
            },
        );
        assert_eq!(
            drain(&mut m),
            vec![Command::CloseChannel { channel: ch(4) }]
        );
    }

    #[test]
    fn relay_closing_a_channel_detaches_and_reopens() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        let cmds = connect(&mut m, t0, vec![svc("echo", 1, "c1")]);
        let id = request_of(&cmds, "c1").expect("request");
        m.handle(
            t0,
            Input::ChannelOpened {
                request_id: id,
                channel: ch(8),
                connector: "c1".into(),
            },
        );
        m.handle(
            t0,
            Input::InnerUp {
                connector: "c1".into(),
            },
        );
        drain(&mut m);
        m.handle(t0, Input::ChannelClosed { channel: 8 });
        assert_eq!(
            drain(&mut m),
            vec![
                Command::Detach {
                    connector: "c1".into()
                },
                Command::CloseInner {
                    connector: "c1".into()
                }
            ]
        );
        let cmds = advance(&mut m, t0 + Duration::from_secs(1));
        let id = request_of(&cmds, "c1").expect("asked again");
        m.handle(
            t0 + Duration::from_secs(1),
            Input::ChannelOpened {
                request_id: id,
                channel: ch(9),
                connector: "c1".into(),
            },
        );
        assert_eq!(
            drain(&mut m),
            vec![Command::Attach {
                connector: "c1".into(),
                channel: ch(9),
                handshake: true
            }]
        );
    }

    /// Permanent refusals end the agent after `max_refusals` consecutive attempts; transient
    /// failures back off and retry forever.
    #[test]
    fn permanent_refusal_exits_after_bounded_attempts() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        let mut now = t0;
        let mut connects = 0;
        for _ in 0..10 {
            for c in advance(&mut m, now + Duration::from_secs(60)) {
                if c == Command::Connect {
                    connects += 1;
                }
            }
            now += Duration::from_secs(60);
            if m.exited() {
                break;
            }
            m.handle(
                now,
                Input::Disconnected {
                    refusal: Some(Refusal::CertificateRejected),
                },
            );
            let cmds = drain(&mut m);
            if let Some(Command::Exit(r)) = cmds.last() {
                assert_eq!(*r, Refusal::CertificateRejected);
                break;
            }
        }
        assert!(m.exited());
        assert_eq!(connects, 3);
        assert_eq!(m.poll_timeout(), None);

        // Transient errors never exit, and reset the refusal count.
        let mut m = machine(t0);
        let mut now = t0;
        for i in 0..50 {
            advance(&mut m, now + Duration::from_secs(60));
            now += Duration::from_secs(60);
            let refusal = (i % 3 != 2).then_some(Refusal::Denied);
            m.handle(now, Input::Disconnected { refusal });
            assert!(!m.exited(), "exited after attempt {i}");
        }
    }

    #[test]
    fn backoff_grows_and_resets_after_a_session() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        m.handle_timeout(t0);
        drain(&mut m);
        let mut now = t0;
        let mut delays = vec![];
        for _ in 0..8 {
            m.handle(now, Input::Disconnected { refusal: None });
            let at = m.poll_timeout().expect("a reconnect is scheduled");
            delays.push(at - now);
            now = at;
            m.handle_timeout(now);
            assert_eq!(drain(&mut m), vec![Command::Connect]);
        }
        assert!(delays[7] > delays[0] * 8, "{delays:?}");
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(10)));
        m.handle(
            now,
            Input::Connected {
                tunnel_ip: Some(TIP),
                services: vec![],
            },
        );
        m.handle(now, Input::Disconnected { refusal: None });
        let at = m.poll_timeout().expect("reconnect");
        assert!(at - now <= Duration::from_millis(200));
    }
}
