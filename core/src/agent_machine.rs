//! The agent's session logic as a pure state machine: sessions with a fleet of relays
//! (each (re)connected with its own backoff), permanent refusals, the choice of the relay new
//! channels go through (the nearest by RTT), the service catalog and the routes it asks for
//! (with a grace period before a withdrawn service leaves the routing table), and one relay
//! channel per connector.
//!
//! It never touches a socket or a clock: the I/O shell ([`crate::agent`]) feeds it
//! [`Input`]s with [`AgentMachine::handle`], calls [`AgentMachine::handle_timeout`] when
//! [`AgentMachine::poll_timeout`] is due, and carries out the [`Command`]s that
//! [`AgentMachine::poll_command`] yields, in order.
//!
//! **The fleet.** The agent keeps a session with every relay it knows ([`Input::Relays`]), so
//! that a relay to fail over to is always warm. One of the live sessions is the *primary*: new
//! channels are opened through it (unless it does not list that channel's connector, or just
//! refused it: then through the nearest live relay that lists it), and its welcome gives the
//! tunnel IP. The routes are what the live relays' catalogs list together (they share the
//! policy, not their connectors). The primary is the live relay with the lowest RTT; a live primary gives way only to
//! a relay that is clearly nearer ([`MachineConfig::switch_ratio`]), so that RTT noise does not
//! move it, and a channel stays on the relay it was opened on until that relay's session ends.
//! When it does, the channels it carried are opened again through the new primary and resume
//! their inner connections.
//!
//! Two rules make the agent **fail closed**:
//! - losing relay sessions changes no route: service routes stay pointed at the tunnel (where
//!   packets are dropped and counted) until the catalogs of the *live* relays all omit a
//!   service, and then only after [`MachineConfig::withdraw_grace`];
//! - the inner connection to a connector is not closed when a relay session or its channel
//!   goes: the next channel to that connector, through any relay, re-points it
//!   ([`Command::Attach`] with `handshake: false`), so TCP connections inside it survive a
//!   relay restart or a failover.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ztna_proto::{ChannelId, ServiceDef};

use crate::agent::TunnelState;
use crate::backoff::Backoff;

/// A relay, by the UDP address its session runs to.
pub type RelayAddr = SocketAddr;

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
    /// Consecutive permanent refusals (from every relay) after which the agent gives up
    /// ([`Command::Exit`]).
    pub max_refusals: u32,
    /// Delays between connection attempts to one relay.
    pub backoff: Backoff,
    /// A live primary gives way to another live relay only when that one's RTT is below this
    /// fraction of the primary's (and at least [`MachineConfig::switch_margin`] lower).
    pub switch_ratio: f64,
    /// See [`MachineConfig::switch_ratio`].
    pub switch_margin: Duration,
    /// How long a relay that could not open a channel to a connector (the connector is not
    /// attached to it yet, say) is passed over for that connector when another relay is up.
    pub refused_relay_avoid: Duration,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            withdraw_grace: Duration::from_secs(30),
            channel_request_timeout: Duration::from_secs(10),
            channel_retry: Duration::from_secs(1),
            max_refusals: 3,
            backoff: Backoff::default(),
            switch_ratio: 0.7,
            switch_margin: Duration::from_millis(5),
            refused_relay_avoid: Duration::from_secs(30),
        }
    }
}

/// What happened, as the shell saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The relays to keep sessions with (every address the configured names resolve to).
    /// Relays no longer listed are disconnected; new ones are connected at once.
    Relays(Vec<RelayAddr>),
    /// A relay session is up: the welcome's tunnel IP and catalog, and the handshake's RTT.
    Connected {
        /// Which relay.
        relay: RelayAddr,
        /// Tunnel IP the relay assigned.
        tunnel_ip: Option<Ipv4Addr>,
        /// Services policy allows that a connector serves now.
        services: Vec<ServiceDef>,
        /// RTT of the handshake.
        rtt: Duration,
    },
    /// A connection attempt failed or the session ended; `refusal` when the reason is
    /// permanent.
    Disconnected {
        /// Which relay.
        relay: RelayAddr,
        /// Set when retrying cannot help.
        refusal: Option<Refusal>,
    },
    /// A new catalog from a live session.
    Catalog {
        /// Which relay.
        relay: RelayAddr,
        /// The services.
        services: Vec<ServiceDef>,
    },
    /// A live session's current RTT (its keepalives keep it fresh).
    Rtt {
        /// Which relay.
        relay: RelayAddr,
        /// Smoothed RTT.
        rtt: Duration,
    },
    /// The relay opened the channel asked for with `request_id`.
    ChannelOpened {
        /// Which relay.
        relay: RelayAddr,
        /// The request it answers.
        request_id: u32,
        /// The channel.
        channel: ChannelId,
        /// The connector the relay says it leads to.
        connector: String,
    },
    /// The relay could not open the channel asked for with `request_id`.
    ChannelRefused {
        /// Which relay.
        relay: RelayAddr,
        /// The request.
        request_id: u32,
    },
    /// The relay closed a channel.
    ChannelClosed {
        /// Which relay.
        relay: RelayAddr,
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
    /// Start a connection attempt to `relay`; answer with [`Input::Connected`] or
    /// [`Input::Disconnected`].
    Connect {
        /// Which relay.
        relay: RelayAddr,
    },
    /// End the session with (or the attempt to reach) `relay`, which left the list. No
    /// [`Input::Disconnected`] is expected for it.
    Disconnect {
        /// Which relay.
        relay: RelayAddr,
    },
    /// Stop for good: the relays refuse this agent.
    Exit(Refusal),
    /// The tunnel address and the services to route changed.
    Publish(TunnelState),
    /// Ask `relay` for a channel to `connector`.
    OpenChannel {
        /// Through which relay.
        relay: RelayAddr,
        /// Connector identity.
        connector: String,
        /// Request id to send.
        request_id: u32,
    },
    /// Tell `relay` the agent no longer uses `channel`.
    CloseChannel {
        /// Which relay.
        relay: RelayAddr,
        /// The channel id.
        channel: ChannelId,
    },
    /// Route `connector`'s virtual peer address through `channel` of `relay`; start the inner
    /// handshake over it if `handshake`, otherwise the live inner connection continues over it.
    Attach {
        /// Connector identity.
        connector: String,
        /// Which relay.
        relay: RelayAddr,
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
}

/// One relay of the fleet.
#[derive(Debug, Clone)]
struct Slot {
    state: Relay,
    backoff: Backoff,
    /// Consecutive permanent refusals, and the last one.
    refusals: u32,
    refusal: Option<Refusal>,
    rtt: Duration,
    tunnel_ip: Option<Ipv4Addr>,
    catalog: Vec<ServiceDef>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    None,
    Handshaking,
    Up,
}

#[derive(Debug, Clone)]
struct Peer {
    /// A channel request in flight: the relay, the id, and when to give up on it.
    request: Option<(RelayAddr, u32, Instant)>,
    channel: Option<(RelayAddr, ChannelId)>,
    /// When to ask for a channel again.
    retry_at: Option<Instant>,
    inner: Inner,
    /// A relay that refused a channel to this connector, passed over until then.
    avoid: Option<(RelayAddr, Instant)>,
}

impl Peer {
    fn new() -> Self {
        Self {
            request: None,
            channel: None,
            retry_at: None,
            inner: Inner::None,
            avoid: None,
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
    relays: BTreeMap<RelayAddr, Slot>,
    primary: Option<RelayAddr>,
    exited: bool,
    random: u64,
    tunnel_ip: Option<Ipv4Addr>,
    /// Routed services by (name, address, connector), in a stable order.
    services: BTreeMap<(String, Ipv4Addr, String), Routed>,
    peers: HashMap<String, Peer>,
    next_request: u32,
    published: Option<TunnelState>,
    commands: VecDeque<Command>,
}

impl AgentMachine {
    /// A machine with no relay yet (give it [`Input::Relays`]). `random` seeds the backoff
    /// jitter.
    pub fn new(cfg: MachineConfig, random: u64) -> Self {
        Self {
            cfg,
            relays: BTreeMap::new(),
            primary: None,
            exited: false,
            random,
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
        self.relays.values().any(|s| s.state == Relay::Up)
    }

    /// The relay new channels go through, while one is up.
    pub fn primary(&self) -> Option<RelayAddr> {
        self.primary
    }

    /// The relay `connector`'s channel runs through, while it has one.
    pub fn channel_relay(&self, connector: &str) -> Option<RelayAddr> {
        self.peers
            .get(connector)
            .and_then(|p| p.channel)
            .map(|(r, _)| r)
    }

    /// Whether the machine gave up (a [`Command::Exit`] was issued).
    pub fn exited(&self) -> bool {
        self.exited
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
        if self.exited {
            return None;
        }
        let relays = self.relays.values().filter_map(|s| match s.state {
            Relay::Waiting(at) => Some(at),
            _ => None,
        });
        let grace = self.services.values().filter_map(|r| r.withdraw_at);
        let peers = self.peers.values().flat_map(|p| {
            [p.request.map(|(_, _, at)| at), p.retry_at]
                .into_iter()
                .flatten()
        });
        relays.chain(grace).chain(peers).min()
    }

    /// Runs what is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.exited {
            return;
        }
        for (addr, s) in self.relays.iter_mut() {
            if matches!(s.state, Relay::Waiting(at) if at <= now) {
                s.state = Relay::Connecting;
                self.commands.push_back(Command::Connect { relay: *addr });
            }
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
            if p.request.is_some_and(|(_, _, at)| at <= now) {
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
        if self.exited {
            return;
        }
        match input {
            Input::Relays(list) => self.set_relays(now, list),
            Input::Connected {
                relay,
                tunnel_ip,
                services,
                rtt,
            } => self.on_connected(now, relay, tunnel_ip, services, rtt),
            Input::Disconnected { relay, refusal } => self.on_disconnected(now, relay, refusal),
            Input::Catalog { relay, services } => {
                let Some(s) = self.relays.get_mut(&relay).filter(|s| s.state == Relay::Up) else {
                    return;
                };
                s.catalog = services;
                self.refresh_catalog(now);
            }
            Input::Rtt { relay, rtt } => {
                if let Some(s) = self.relays.get_mut(&relay).filter(|s| s.state == Relay::Up) {
                    s.rtt = rtt;
                    self.choose_primary(now);
                }
            }
            Input::ChannelOpened {
                relay,
                request_id,
                channel,
                connector,
            } => {
                let inner = match self.peers.get_mut(&connector) {
                    Some(p)
                        if p.request
                            .is_some_and(|(r, id, _)| (r, id) == (relay, request_id)) =>
                    {
                        p.request = None;
                        p.channel = Some((relay, channel));
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
                        relay,
                        channel,
                        handshake,
                    }),
                    // A late answer to a request that timed out or was superseded.
                    None => self
                        .commands
                        .push_back(Command::CloseChannel { relay, channel }),
                }
            }
            Input::ChannelRefused { relay, request_id } => {
                let retry = now + self.cfg.channel_retry;
                let avoid = now + self.cfg.refused_relay_avoid;
                if let Some(p) = self.peers.values_mut().find(|p| {
                    p.request
                        .is_some_and(|(r, id, _)| (r, id) == (relay, request_id))
                }) {
                    p.request = None;
                    p.retry_at = Some(retry);
                    // Relays are independent: the connector may be attached to the others (it
                    // has not found a restarted relay yet, or lost only this one).
                    p.avoid = Some((relay, avoid));
                }
            }
            Input::ChannelClosed { relay, channel } => {
                let retry = now + self.cfg.channel_retry;
                let found = self.peers.iter_mut().find(|(_, p)| {
                    p.channel
                        .is_some_and(|(r, c)| r == relay && c.get() == channel)
                });
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
                if let Some((relay, channel)) = p.channel.take() {
                    p.retry_at = Some(retry);
                    self.commands
                        .push_back(Command::CloseChannel { relay, channel });
                    self.commands.push_back(Command::Detach { connector });
                }
            }
        }
    }

    fn next_random(&mut self) -> u64 {
        self.random = self
            .random
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.random >> 33
    }

    fn set_relays(&mut self, now: Instant, list: Vec<RelayAddr>) {
        let gone: Vec<RelayAddr> = self
            .relays
            .keys()
            .filter(|a| !list.contains(a))
            .copied()
            .collect();
        for relay in gone {
            self.relays.remove(&relay);
            self.commands.push_back(Command::Disconnect { relay });
            self.relay_lost(now, relay);
            self.refresh_catalog(now);
        }
        for addr in list {
            self.relays.entry(addr).or_insert_with(|| Slot {
                state: Relay::Waiting(now),
                backoff: self.cfg.backoff.clone(),
                refusals: 0,
                refusal: None,
                rtt: Duration::ZERO,
                tunnel_ip: None,
                catalog: Vec::new(),
            });
        }
        self.choose_primary(now);
    }

    fn on_connected(
        &mut self,
        now: Instant,
        relay: RelayAddr,
        tunnel_ip: Option<Ipv4Addr>,
        services: Vec<ServiceDef>,
        rtt: Duration,
    ) {
        let Some(s) = self.relays.get_mut(&relay) else {
            // Left the list meanwhile.
            self.commands.push_back(Command::Disconnect { relay });
            return;
        };
        s.state = Relay::Up;
        s.refusals = 0;
        s.refusal = None;
        s.backoff.reset();
        s.rtt = rtt;
        s.tunnel_ip = tunnel_ip;
        s.catalog = services;
        self.choose_primary(now);
        self.refresh_catalog(now);
    }

    fn on_disconnected(&mut self, now: Instant, relay: RelayAddr, refusal: Option<Refusal>) {
        let random = self.next_random();
        let Some(s) = self.relays.get_mut(&relay) else {
            return;
        };
        match refusal {
            Some(r) => {
                s.refusals += 1;
                s.refusal = Some(r);
            }
            None => {
                s.refusals = 0;
                s.refusal = None;
            }
        }
        let delay = s.backoff.next_delay(random);
        s.state = Relay::Waiting(now + delay);
        s.catalog.clear();
        self.relay_lost(now, relay);
        self.refresh_catalog(now);
        // Every relay refuses this agent for good, and none is up: give up.
        let max = self.cfg.max_refusals;
        let refused = !self.relays.is_empty()
            && self
                .relays
                .values()
                .all(|s| s.state != Relay::Up && s.refusals >= max);
        if refused {
            if let Some(r) = refusal {
                self.exited = true;
                self.commands.push_back(Command::Exit(r));
            }
        }
    }

    /// `relay`'s session is gone: the channels it carried lose their relay path (routes and
    /// inner connections stay) and are asked for again through the primary, which changes if
    /// it was this one.
    fn relay_lost(&mut self, now: Instant, relay: RelayAddr) {
        let mut names: Vec<String> = self.peers.keys().cloned().collect();
        names.sort();
        for name in names {
            let Some(p) = self.peers.get_mut(&name) else {
                continue;
            };
            if p.request.is_some_and(|(r, _, _)| r == relay) {
                p.request = None;
                p.retry_at = Some(now);
            }
            if p.channel.is_some_and(|(r, _)| r == relay) {
                p.channel = None;
                p.retry_at = Some(now);
                self.commands.push_back(Command::Detach { connector: name });
            }
        }
        if self.primary == Some(relay) {
            self.primary = None;
        }
        self.choose_primary(now);
    }

    /// Picks the primary among the live relays (see the module docs) and, when it changes,
    /// adopts its tunnel IP and catalog and opens the channels that are missing through it.
    fn choose_primary(&mut self, now: Instant) {
        let live = || self.relays.iter().filter(|(_, s)| s.state == Relay::Up);
        let best = live()
            .min_by_key(|(a, s)| (s.rtt, **a))
            .map(|(a, s)| (*a, s.rtt));
        let current = self.primary.and_then(|p| {
            self.relays
                .get(&p)
                .filter(|s| s.state == Relay::Up)
                .map(|s| (p, s.rtt))
        });
        let next = match (current, best) {
            (None, best) => best.map(|(a, _)| a),
            (Some((p, _)), None) => Some(p),
            (Some((p, prtt)), Some((b, brtt))) => {
                let clearly = brtt.as_secs_f64() < prtt.as_secs_f64() * self.cfg.switch_ratio
                    && brtt + self.cfg.switch_margin <= prtt;
                Some(if clearly { b } else { p })
            }
        };
        if next == self.primary {
            return;
        }
        self.primary = next;
        let Some(p) = next else {
            return;
        };
        let tunnel_ip = self.relays[&p].tunnel_ip;
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
        self.refresh_catalog(now);
        let mut names: Vec<String> = self.peers.keys().cloned().collect();
        names.sort();
        for name in names {
            self.open_channel(&name, now);
        }
    }

    /// Routes what the live relays' catalogs list together: relays share the policy but not
    /// their connectors (a connector may not be attached to every relay, or not yet), so a
    /// service is reachable if any live relay lists it. With no live relay, nothing changes
    /// (fail closed: routes stay).
    fn refresh_catalog(&mut self, now: Instant) {
        if !self.connected() {
            return;
        }
        let union: Vec<ServiceDef> = self
            .relays
            .values()
            .filter(|s| s.state == Relay::Up)
            .flat_map(|s| s.catalog.iter().cloned())
            .collect();
        self.apply_catalog(now, union);
    }

    /// Installs a catalog: new services are routed at once, services it lacks start their
    /// grace period, services back in it stay.
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
                if let Some((relay, channel)) = p.channel {
                    self.commands
                        .push_back(Command::CloseChannel { relay, channel });
                }
                self.commands.push_back(Command::Forget { connector });
            }
        }
        for name in wanted {
            if !self.peers.contains_key(&name) {
                self.peers.insert(name.clone(), Peer::new());
                self.open_channel(&name, now);
            }
        }
    }

    /// Asks the primary for a channel to `connector`, unless it has one or a request is in
    /// flight; the nearest other live relay instead while the primary is avoided for this
    /// connector (it refused a channel to it recently). Without a primary, the next one asks
    /// ([`AgentMachine::choose_primary`]).
    fn open_channel(&mut self, connector: &str, now: Instant) {
        let Some(primary) = self.primary else {
            return;
        };
        let Some(p) = self.peers.get(connector) else {
            return;
        };
        if p.request.is_some() || p.channel.is_some() {
            return;
        }
        // Through the primary if it lists the connector (the connector is attached there) and
        // did not just refuse it; else the nearest live relay that does and did not; else the
        // primary (it may know the connector by now).
        let avoided = p.avoid.filter(|(_, until)| *until > now).map(|(r, _)| r);
        let fits = |addr: &RelayAddr, s: &Slot| {
            s.state == Relay::Up
                && Some(*addr) != avoided
                && s.catalog.iter().any(|d| d.connector == connector)
        };
        let relay = if self.relays.get(&primary).is_some_and(|s| fits(&primary, s)) {
            primary
        } else {
            self.relays
                .iter()
                .filter(|(a, s)| fits(a, s))
                .min_by_key(|(a, s)| (s.rtt, **a))
                .map_or(primary, |(a, _)| *a)
        };
        let Some(p) = self.peers.get_mut(connector) else {
            return;
        };
        let request_id = self.next_request;
        self.next_request = self.next_request.wrapping_add(1).max(1);
        p.request = Some((relay, request_id, now + self.cfg.channel_request_timeout));
        p.retry_at = None;
        self.commands.push_back(Command::OpenChannel {
            relay,
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
            address6: None,
            udp: vec![],
            tcp: vec![],
            icmp: true,
            connector: connector.into(),
            names: None,
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

    const R1: RelayAddr = RelayAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 4433);
    const R2: RelayAddr = RelayAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)), 4433);
    const R3: RelayAddr = RelayAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 3)), 4433);
    const RTT: Duration = Duration::from_millis(20);

    fn config() -> MachineConfig {
        MachineConfig {
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(10)),
            ..MachineConfig::default()
        }
    }

    fn machine(t0: Instant) -> AgentMachine {
        let mut m = AgentMachine::new(config(), 7);
        m.handle(t0, Input::Relays(vec![R1]));
        m
    }

    /// Connects with `services` and returns the request id sent for `connector`.
    fn connect(m: &mut AgentMachine, now: Instant, services: Vec<ServiceDef>) -> Vec<Command> {
        m.handle_timeout(now);
        m.handle(
            now,
            Input::Connected {
                relay: R1,
                rtt: RTT,
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
                ..
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
        assert_eq!(drain(&mut m), vec![Command::Connect { relay: R1 }]);
        m.handle(
            t0,
            Input::Connected {
                relay: R1,
                rtt: RTT,
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
                    relay: R1,
                    connector: "c1".into(),
                    request_id: 1
                },
                Command::OpenChannel {
                    relay: R1,
                    connector: "c2".into(),
                    request_id: 2
                },
            ]
        );
        m.handle(
            t0,
            Input::ChannelOpened {
                relay: R1,
                request_id: 1,
                channel: ch(5),
                connector: "c1".into(),
            },
        );
        assert_eq!(
            drain(&mut m),
            vec![Command::Attach {
                relay: R1,
                connector: "c1".into(),
                channel: ch(5),
                handshake: true
            }]
        );
        // A stale answer (wrong request id) is closed.
        m.handle(
            t0,
            Input::ChannelOpened {
                relay: R1,
                request_id: 9,
                channel: ch(6),
                connector: "c2".into(),
            },
        );
        assert_eq!(
            drain(&mut m),
            vec![Command::CloseChannel {
                relay: R1,
                channel: ch(6)
            }]
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
        m.handle(
            t1,
            Input::Disconnected {
                relay: R1,
                refusal: None,
            },
        );
        let cmds = drain(&mut m);
        assert!(
            !cmds.iter().any(|c| matches!(c, Command::Publish(_))),
            "{cmds:?}"
        );
        // Reconnects after the backoff (200 ms minus jitter).
        let cmds = advance(&mut m, t1 + Duration::from_millis(200));
        assert_eq!(cmds, vec![Command::Connect { relay: R1 }]);
        // The restarted relay does not know the connector yet: empty catalog.
        let t2 = t1 + Duration::from_secs(1);
        m.handle(
            t2,
            Input::Connected {
                relay: R1,
                rtt: RTT,
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
            Input::Catalog {
                relay: R1,
                services: vec![svc("echo", 1, "c1")],
            },
        );
        drain(&mut m);
        assert!(m.withdrawing().is_empty());
        advance(&mut m, t2 + Duration::from_secs(120));
        assert_eq!(routed(&m), ["echo"]);

        // A real withdrawal: gone after exactly the grace period, with its connector.
        let t3 = t2 + Duration::from_secs(200);
        m.handle(
            t3,
            Input::Catalog {
                relay: R1,
                services: vec![],
            },
        );
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
        m.handle(
            t0,
            Input::Disconnected {
                relay: R1,
                refusal: None,
            },
        );
        m.handle(
            t0,
            Input::Catalog {
                relay: R1,
                services: vec![],
            },
        );
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
                relay: R1,
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
        // Relay killed: nothing is closed, nothing is unrouted; the channel is gone.
        m.handle(
            t0,
            Input::Disconnected {
                relay: R1,
                refusal: None,
            },
        );
        assert_eq!(
            drain(&mut m),
            vec![Command::Detach {
                connector: "c1".into()
            }]
        );
        let t1 = t0 + Duration::from_secs(3);
        let cmds = connect(&mut m, t1, vec![svc("echo", 1, "c1")]);
        let id = request_of(&cmds, "c1").expect("a channel request after the restart");
        // The connector is not back yet.
        m.handle(
            t1,
            Input::ChannelRefused {
                relay: R1,
                request_id: id,
            },
        );
        assert!(drain(&mut m).is_empty());
        let cmds = advance(&mut m, t1 + Duration::from_secs(1));
        let id = request_of(&cmds, "c1").expect("asked again after a second");
        m.handle(
            t1 + Duration::from_secs(1),
            Input::ChannelOpened {
                relay: R1,
                request_id: id,
                channel: ch(7),
                connector: "c1".into(),
            },
        );
        assert_eq!(
            drain(&mut m),
            vec![Command::Attach {
                relay: R1,
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
                relay: R1,
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
        m.handle(
            t0,
            Input::Disconnected {
                relay: R1,
                refusal: None,
            },
        );
        drain(&mut m);
        advance(&mut m, t0 + Duration::from_secs(1));
        m.handle(
            t0 + Duration::from_secs(1),
            Input::Connected {
                relay: R1,
                rtt: RTT,
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
                relay: R1,
                request_id: id,
                channel: ch(2),
                connector: "c1".into(),
            },
        );
        assert_eq!(
            drain(&mut m),
            vec![Command::Attach {
                relay: R1,
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
                relay: R1,
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
                Command::CloseChannel {
                    relay: R1,
                    channel: ch(3)
                },
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
                relay: R1,
                request_id: first,
                channel: ch(4),
                connector: "c1".into(),
            },
        );
        assert_eq!(
            drain(&mut m),
            vec![Command::CloseChannel {
                relay: R1,
                channel: ch(4)
            }]
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
                relay: R1,
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
        m.handle(
            t0,
            Input::ChannelClosed {
                relay: R1,
                channel: 8,
            },
        );
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
                relay: R1,
                request_id: id,
                channel: ch(9),
                connector: "c1".into(),
            },
        );
        assert_eq!(
            drain(&mut m),
            vec![Command::Attach {
                relay: R1,
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
                if c == (Command::Connect { relay: R1 }) {
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
                    relay: R1,
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
            m.handle(now, Input::Disconnected { relay: R1, refusal });
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
            m.handle(
                now,
                Input::Disconnected {
                    relay: R1,
                    refusal: None,
                },
            );
            let at = m.poll_timeout().expect("a reconnect is scheduled");
            delays.push(at - now);
            now = at;
            m.handle_timeout(now);
            assert_eq!(drain(&mut m), vec![Command::Connect { relay: R1 }]);
        }
        assert!(delays[7] > delays[0] * 8, "{delays:?}");
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(10)));
        m.handle(
            now,
            Input::Connected {
                relay: R1,
                rtt: RTT,
                tunnel_ip: Some(TIP),
                services: vec![],
            },
        );
        m.handle(
            now,
            Input::Disconnected {
                relay: R1,
                refusal: None,
            },
        );
        let at = m.poll_timeout().expect("reconnect");
        assert!(at - now <= Duration::from_millis(200));
    }

    fn fleet(t0: Instant, relays: &[RelayAddr]) -> AgentMachine {
        let mut m = AgentMachine::new(config(), 7);
        m.handle(t0, Input::Relays(relays.to_vec()));
        m.handle_timeout(t0);
        let connects = drain(&mut m);
        assert_eq!(
            connects,
            relays
                .iter()
                .map(|r| Command::Connect { relay: *r })
                .collect::<Vec<_>>(),
            "every relay is connected at once"
        );
        m
    }

    fn up(m: &mut AgentMachine, now: Instant, relay: RelayAddr, rtt_ms: u64) -> Vec<Command> {
        m.handle(
            now,
            Input::Connected {
                relay,
                tunnel_ip: Some(TIP),
                services: vec![svc("echo", 1, "c1"), svc("db", 2, "c2")],
                rtt: Duration::from_millis(rtt_ms),
            },
        );
        drain(m)
    }

    fn opened_through(cmds: &[Command]) -> Vec<(RelayAddr, String)> {
        cmds.iter()
            .filter_map(|c| match c {
                Command::OpenChannel {
                    relay, connector, ..
                } => Some((*relay, connector.clone())),
                _ => None,
            })
            .collect()
    }

    /// The first relay up carries the first channels; a clearly nearer one takes new channels
    /// only; RTT noise moves nothing.
    #[test]
    fn new_channels_go_through_the_nearest_live_relay() {
        let t0 = Instant::now();
        let mut m = fleet(t0, &[R1, R2, R3]);
        let cmds = up(&mut m, t0, R2, 30);
        assert_eq!(m.primary(), Some(R2));
        assert_eq!(
            opened_through(&cmds),
            [(R2, "c1".to_owned()), (R2, "c2".to_owned())]
        );
        // R1 is up with a slightly lower RTT: not clearly nearer, nothing moves.
        assert!(opened_through(&up(&mut m, t0, R1, 25)).is_empty());
        assert_eq!(m.primary(), Some(R2));
        // R3 is far.
        up(&mut m, t0, R3, 150);
        assert_eq!(m.primary(), Some(R2));
        // R1's keepalive RTT drops clearly below R2's: it becomes the relay in use.
        m.handle(
            t0,
            Input::Rtt {
                relay: R1,
                rtt: Duration::from_millis(8),
            },
        );
        assert_eq!(m.primary(), Some(R1));
        // The requests already in flight through R2 stay there.
        assert!(opened_through(&drain(&mut m)).is_empty());
    }

    /// The relay in use dies: its channels are asked for at once through the next nearest
    /// live relay, and resume the inner connections there.
    #[test]
    fn a_dead_relay_fails_over_and_resumes_inner_connections() {
        let t0 = Instant::now();
        let mut m = fleet(t0, &[R1, R2, R3]);
        let cmds = up(&mut m, t0, R1, 5);
        up(&mut m, t0, R2, 20);
        up(&mut m, t0, R3, 60);
        for (i, c) in ["c1", "c2"].iter().enumerate() {
            let id = request_of(&cmds, c).unwrap();
            m.handle(
                t0,
                Input::ChannelOpened {
                    relay: R1,
                    request_id: id,
                    channel: ch(10 + i as u32),
                    connector: (*c).into(),
                },
            );
            m.handle(
                t0,
                Input::InnerUp {
                    connector: (*c).into(),
                },
            );
        }
        drain(&mut m);
        assert_eq!(m.channel_relay("c1"), Some(R1));
        let t1 = t0 + Duration::from_secs(5);
        m.handle(
            t1,
            Input::Disconnected {
                relay: R1,
                refusal: None,
            },
        );
        let cmds = drain(&mut m);
        assert_eq!(m.primary(), Some(R2));
        assert!(cmds.contains(&Command::Detach {
            connector: "c1".into()
        }));
        assert!(
            !cmds
                .iter()
                .any(|c| matches!(c, Command::CloseInner { .. } | Command::Publish(_))),
            "failover closes nothing and changes no route: {cmds:?}"
        );
        assert_eq!(
            opened_through(&cmds),
            [(R2, "c1".to_owned()), (R2, "c2".to_owned())]
        );
        let id = request_of(&cmds, "c1").unwrap();
        m.handle(
            t1,
            Input::ChannelOpened {
                relay: R2,
                request_id: id,
                channel: ch(3),
                connector: "c1".into(),
            },
        );
        assert_eq!(
            drain(&mut m),
            vec![Command::Attach {
                connector: "c1".into(),
                relay: R2,
                channel: ch(3),
                handshake: false
            }]
        );
        // A late answer from the dead relay's request id through another relay is closed.
        m.handle(
            t1,
            Input::ChannelOpened {
                relay: R3,
                request_id: request_of(&cmds, "c2").unwrap(),
                channel: ch(4),
                connector: "c2".into(),
            },
        );
        assert_eq!(
            drain(&mut m),
            vec![Command::CloseChannel {
                relay: R3,
                channel: ch(4)
            }]
        );
        // R1 comes back: it is nearer, so it takes new channels, but c1 stays on R2.
        let t2 = t1 + Duration::from_secs(1);
        advance(&mut m, t2);
        up(&mut m, t2, R1, 5);
        assert_eq!(m.primary(), Some(R1));
        assert_eq!(m.channel_relay("c1"), Some(R2));
        // Only R2's catalog (the relay in use before) ... now R1's: a catalog from R3 moves
        // no route.
        m.handle(
            t2,
            Input::Catalog {
                relay: R3,
                services: vec![],
            },
        );
        assert!(m.withdrawing().is_empty());
        // Routes are what the live relays list together: db leaves only when none lists it.
        m.handle(
            t2,
            Input::Catalog {
                relay: R1,
                services: vec![svc("echo", 1, "c1")],
            },
        );
        assert!(m.withdrawing().is_empty(), "R2 still lists db");
        m.handle(
            t2,
            Input::Catalog {
                relay: R2,
                services: vec![svc("echo", 1, "c1")],
            },
        );
        assert_eq!(m.withdrawing(), ["db"]);
    }

    /// A connector attached to some relays only: its services are routed from those relays'
    /// catalogs, and its channel goes through one of them even when the nearest relay (the
    /// primary) does not list it.
    #[test]
    fn a_connector_on_some_relays_is_reached_through_them() {
        let t0 = Instant::now();
        let mut m = fleet(t0, &[R1, R2]);
        m.handle(
            t0,
            Input::Connected {
                relay: R1,
                tunnel_ip: Some(TIP),
                services: vec![svc("echo", 1, "c1")],
                rtt: Duration::from_millis(2),
            },
        );
        let cmds = drain(&mut m);
        assert_eq!(opened_through(&cmds), [(R1, "c1".to_owned())]);
        let cmds = up(&mut m, t0, R2, 30);
        assert_eq!(m.primary(), Some(R1));
        assert_eq!(routed(&m), ["db", "echo"]);
        assert_eq!(opened_through(&cmds), [(R2, "c2".to_owned())]);
    }

    /// Losing every relay keeps the routes (fail closed); the first relay back takes all.
    #[test]
    fn losing_every_relay_keeps_routes_until_one_is_back() {
        let t0 = Instant::now();
        let mut m = fleet(t0, &[R1, R2]);
        up(&mut m, t0, R1, 5);
        up(&mut m, t0, R2, 9);
        m.handle(
            t0,
            Input::Disconnected {
                relay: R1,
                refusal: None,
            },
        );
        m.handle(
            t0,
            Input::Disconnected {
                relay: R2,
                refusal: None,
            },
        );
        let cmds = drain(&mut m);
        assert_eq!(m.primary(), None);
        assert!(!m.connected());
        assert!(!cmds.iter().any(|c| matches!(c, Command::Publish(_))));
        assert_eq!(routed(&m), ["db", "echo"]);
        let t1 = t0 + Duration::from_secs(1);
        let cmds = advance(&mut m, t1);
        assert!(cmds.contains(&Command::Connect { relay: R1 }), "{cmds:?}");
        assert!(cmds.contains(&Command::Connect { relay: R2 }));
        assert!(
            opened_through(&cmds).is_empty(),
            "no channel without a relay"
        );
        let cmds = up(&mut m, t1, R2, 9);
        assert_eq!(opened_through(&cmds).len(), 2);
    }

    /// One relay that refuses for good (another CA, a stale deny list) does not stop an agent
    /// that others accept; all of them refusing does.
    #[test]
    fn the_agent_gives_up_only_when_every_relay_refuses() {
        let t0 = Instant::now();
        let mut m = fleet(t0, &[R1, R2]);
        up(&mut m, t0, R2, 9);
        let mut now = t0;
        for _ in 0..10 {
            m.handle(
                now,
                Input::Disconnected {
                    relay: R1,
                    refusal: Some(Refusal::Denied),
                },
            );
            now += Duration::from_secs(30);
            advance(&mut m, now);
        }
        assert!(!m.exited());
        m.handle(
            now,
            Input::Disconnected {
                relay: R2,
                refusal: Some(Refusal::Denied),
            },
        );
        for _ in 0..10 {
            if m.exited() {
                break;
            }
            now += Duration::from_secs(30);
            advance(&mut m, now);
            m.handle(
                now,
                Input::Disconnected {
                    relay: R2,
                    refusal: Some(Refusal::Denied),
                },
            );
            m.handle(
                now,
                Input::Disconnected {
                    relay: R1,
                    refusal: Some(Refusal::Denied),
                },
            );
        }
        assert!(m.exited());
        assert!(drain(&mut m).contains(&Command::Exit(Refusal::Denied)));
    }

    /// A relay that leaves the list (DNS) is disconnected and its channels move.
    #[test]
    fn a_relay_leaving_the_list_is_disconnected_and_its_channels_move() {
        let t0 = Instant::now();
        let mut m = fleet(t0, &[R1, R2]);
        let cmds = up(&mut m, t0, R1, 5);
        up(&mut m, t0, R2, 9);
        let id = request_of(&cmds, "c1").unwrap();
        m.handle(
            t0,
            Input::ChannelOpened {
                relay: R1,
                request_id: id,
                channel: ch(1),
                connector: "c1".into(),
            },
        );
        drain(&mut m);
        m.handle(t0, Input::Relays(vec![R2, R3]));
        let cmds = drain(&mut m);
        assert_eq!(cmds[0], Command::Disconnect { relay: R1 });
        assert!(opened_through(&cmds).contains(&(R2, "c1".to_owned())));
        assert_eq!(m.primary(), Some(R2));
        // R3 is new: connected at once.
        assert_eq!(advance(&mut m, t0), vec![Command::Connect { relay: R3 }]);
        // A late welcome from R1 is turned away.
        m.handle(
            t0,
            Input::Connected {
                relay: R1,
                tunnel_ip: Some(TIP),
                services: vec![],
                rtt: RTT,
            },
        );
        assert_eq!(drain(&mut m), vec![Command::Disconnect { relay: R1 }]);
    }

    /// A relay that cannot open a channel to a connector (not attached there yet) is passed
    /// over for that connector while another relay is up; alone, it is asked again.
    #[test]
    fn a_relay_that_refuses_a_connector_is_passed_over_for_it() {
        let t0 = Instant::now();
        let mut m = fleet(t0, &[R1, R2]);
        let cmds = up(&mut m, t0, R1, 5);
        up(&mut m, t0, R2, 20);
        let id = request_of(&cmds, "c1").unwrap();
        m.handle(
            t0,
            Input::ChannelRefused {
                relay: R1,
                request_id: id,
            },
        );
        let t1 = t0 + Duration::from_secs(1);
        let cmds = advance(&mut m, t1);
        assert_eq!(opened_through(&cmds), [(R2, "c1".to_owned())]);
        // c2 is not affected.
        assert_eq!(m.primary(), Some(R1));
        // R2 refuses too and goes down: R1 is asked again rather than nobody.
        let id = request_of(&cmds, "c1").unwrap();
        m.handle(
            t1,
            Input::ChannelRefused {
                relay: R2,
                request_id: id,
            },
        );
        m.handle(
            t1,
            Input::Disconnected {
                relay: R2,
                refusal: None,
            },
        );
        drain(&mut m);
        let cmds = advance(&mut m, t1 + Duration::from_secs(1));
        assert_eq!(opened_through(&cmds), [(R1, "c1".to_owned())]);
    }
}
