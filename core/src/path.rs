//! Path selection for one end-to-end connection, as a pure state machine with injected time.
//!
//! The peer's candidates (host addresses and its relay-observed address, exchanged through the
//! relay) become *targets*. Each target is probed with authenticated pings ([`Action::Ping`]);
//! the caller sends them, feeds back pings and pongs it receives ([`PathSet::on_ping`],
//! [`PathSet::on_pong`]) and calls [`PathSet::poll`] at [`PathSet::next_deadline`].
//!
//! - **Probing:** a new target is pinged every `punch_interval` for `punch_window`. Both ends do
//!   this at once, so each end's NAT sees outbound traffic to the other before the other's
//!   pings arrive (simultaneous open). A target is *confirmed* by a pong to a full-size ping, so
//!   a confirmed path carries full-size tunnel packets.
//! - **Failed:** a target that never answered, or a confirmed one that stopped answering, is
//!   tried again after a delay that doubles from `retry_min` to `retry_max`.
//! - **Confirmed:** pinged with small keepalives (often on the active path, rarely on the
//!   others), which also hold NAT mappings open. No pong for `dead_after` fails it.
//! - **Selection:** direct LAN (the peer's host address) > direct WAN (reflexive or
//!   peer-reflexive) > the relay (no active target); by RTT within a class, switching only for
//!   a clearly better RTT so the path does not flap.
//! - **Peer-reflexive:** an authenticated ping from an address that is not a target (the peer's
//!   NAT gave it another mapping for us) becomes a target too, at most one new one per
//!   `PRFLX_INTERVAL`; one that fails is dropped, not retried.
//! - **Opening probes:** each punch window of a listed target starts with `open_phase` of pings
//!   sent with a low TTL ([`PathSet::open_ttl`]): enough hops to leave this end's own NAT(s) and
//!   open its mapping, too few to reach the peer's router. A router with no firewall answers an
//!   unsolicited packet with ICMP port unreachable and records that flow in conntrack; the
//!   inside host's own later packet to the same remote endpoint then finds the tuple taken and
//!   leaves from another port, and the punch fails. With opening probes first, each end's
//!   full-TTL pings arrive at the other's router after the other's opening probes went out, as
//!   answers to them. The TTL starts at [`OPEN_TTL_MIN`] (one NAT) and steps up to
//!   [`OPEN_TTL_MAX`] (then back) whenever a WAN target's window ends with no ping from the
//!   peer at all (our mapping may not have been opened: a carrier-grade NAT behind the home
//!   NAT needs one more hop); it stays where a path was confirmed. A ping from the peer on a
//!   target ends its opening phase at once (the peer's router has a mapping toward us).
//!
//! **Not a weapon.** Probes go only where they should, and never in bulk:
//! - Targets inside refused networks ([`PathSet::set_refused`]: service addresses, the
//!   connector's backend networks) are never probed, whether the peer listed them or a ping
//!   came from there; each refusal is counted ([`PathSet::refused`]).
//! - At most [`MAX_LISTED`] listed and [`MAX_PEER_REFLEXIVE`] peer-reflexive targets.
//! - A target that has never answered gets only small pings ([`ztna_proto::probe::MIN_LEN`]
//!   bytes); the full-size ping that confirms a path goes only to an address whose pong proved
//!   it is the peer. Pings of one connection are capped at [`PING_BUDGET`] per second.
//! - Pongs are rate-limited per source address ([`PathSet::pong_allowed`]).

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::bucket::{Rate, TokenBucket};
use ztna_proto::{Candidate, CandidateKind};

/// Most targets from the peer's candidate list (the rest of the list is ignored).
pub const MAX_LISTED: usize = 8;
/// Most peer-reflexive targets; the oldest unconfirmed one makes room for a new one.
pub const MAX_PEER_REFLEXIVE: usize = 4;
/// Least time between two new peer-reflexive targets of one connection.
pub const PRFLX_INTERVAL: Duration = Duration::from_secs(1);
/// Most pings one connection sends per second (all targets together); bursts up to as many.
pub const PING_BUDGET: u32 = 40;
/// Most pongs sent per second to one source address; bursts up to as many.
pub const PONG_BUDGET: u32 = 30;
/// Source addresses whose pong budget is remembered (the least recently used is forgotten).
const PONG_SOURCES: usize = 16;
/// Pings remembered per target while waiting for their pongs.
const MAX_PENDING: usize = 16;
/// The first TTL of opening probes: leaves one NAT (the host's own router), no further.
pub const OPEN_TTL_MIN: u8 = 2;
/// The highest TTL opening probes step up to (a home NAT behind a carrier-grade NAT and one
/// more router inside the carrier).
pub const OPEN_TTL_MAX: u8 = 4;
/// How long a ping with no budget left waits before it is tried again.
const BUDGET_RETRY: Duration = Duration::from_millis(25);

/// The timing of probing and selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathTiming {
    /// Ping interval while punching.
    pub punch_interval: Duration,
    /// How long a target is punched before it counts as failed.
    pub punch_window: Duration,
    /// First delay before a failed target is tried again.
    pub retry_min: Duration,
    /// Longest such delay.
    pub retry_max: Duration,
    /// Keepalive interval on the active path.
    pub keepalive_active: Duration,
    /// Keepalive interval on confirmed paths that are not active.
    pub keepalive_standby: Duration,
    /// Silence after which the active path is abandoned.
    pub dead_after: Duration,
    /// How long each punch window of a listed target starts with low-TTL opening probes
    /// (zero: none).
    pub open_phase: Duration,
}

impl Default for PathTiming {
    fn default() -> Self {
        Self {
            punch_interval: Duration::from_millis(200),
            punch_window: Duration::from_secs(5),
            retry_min: Duration::from_secs(4),
            retry_max: Duration::from_secs(16),
            keepalive_active: Duration::from_millis(200),
            keepalive_standby: Duration::from_secs(1),
            dead_after: Duration::from_millis(1000),
            open_phase: Duration::from_millis(300),
        }
    }
}

impl PathTiming {
    /// Silence after which a standby (confirmed, not active) path is abandoned.
    fn standby_dead_after(&self) -> Duration {
        self.keepalive_standby * 3 + self.dead_after
    }
}

/// A direct path's class; LAN ranks above WAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathClass {
    /// To one of the peer's own interface addresses.
    Lan,
    /// To the peer's NAT mapping.
    Wan,
}

impl fmt::Display for PathClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathClass::Lan => "lan",
            PathClass::Wan => "wan",
        })
    }
}

/// Where a target address came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// The peer's host candidate.
    Host,
    /// The peer's address as the relay saw it.
    Reflexive,
    /// An address an authenticated ping came from.
    PeerReflexive,
}

impl TargetKind {
    /// The class of a path to `addr` learnt this way: a host candidate is the peer's LAN
    /// address, unless it is a global IPv6 address (2000::/3), which is reached across the
    /// internet like a NAT mapping (IPv6 hosts have global addresses and no NAT).
    fn class(self, addr: &SocketAddr) -> PathClass {
        let global_v6 =
            matches!(addr.ip(), std::net::IpAddr::V6(v6) if v6.segments()[0] & 0xe000 == 0x2000);
        match self {
            TargetKind::Host if !global_v6 => PathClass::Lan,
            _ => PathClass::Wan,
        }
    }
}

impl fmt::Display for TargetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetKind::Host => "host",
            TargetKind::Reflexive => "reflexive",
            TargetKind::PeerReflexive => "peer-reflexive",
        })
    }
}

/// A target's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetState {
    /// Being punched.
    Probing,
    /// Answers full-size pings.
    Confirmed,
    /// Did not answer; tried again later.
    Failed,
}

impl fmt::Display for TargetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetState::Probing => "probing",
            TargetState::Confirmed => "confirmed",
            TargetState::Failed => "failed",
        })
    }
}

/// What the caller must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send a ping to `to`. `full`: pad it to a full-size tunnel packet.
    Ping {
        /// Destination.
        to: SocketAddr,
        /// Transaction id for the pong.
        txid: u64,
        /// Full-size (confirming) or small (keepalive).
        full: bool,
        /// An opening probe: send it with this TTL (hop limit) instead of the default.
        ttl: Option<u8>,
    },
}

/// The chosen direct path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selected {
    /// The peer's address on it.
    pub addr: SocketAddr,
    /// Its class.
    pub class: PathClass,
    /// Its smoothed RTT.
    pub rtt: Duration,
}

/// One target, for status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetStatus {
    /// The peer's address.
    pub addr: SocketAddr,
    /// Where it came from.
    pub kind: TargetKind,
    /// State.
    pub state: TargetState,
    /// Smoothed RTT, once measured.
    pub rtt_ms: Option<f64>,
}

#[derive(Debug, Clone)]
struct Target {
    addr: SocketAddr,
    kind: TargetKind,
    listed: bool,
    state: TargetState,
    /// A pong came from this address since it was last (re)started: it is the peer, and may
    /// get full-size pings.
    answered: bool,
    rtt: Option<Duration>,
    last_pong: Option<Instant>,
    window_start: Instant,
    next_ping: Instant,
    retry_delay: Duration,
    pending: VecDeque<(u64, Instant, bool)>,
    added: Instant,
    /// Until then, pings go out with the opening TTL.
    open_until: Option<Instant>,
    /// A ping from the peer arrived on this target during the current window.
    heard: bool,
}

impl Target {
    fn new(addr: SocketAddr, kind: TargetKind, listed: bool, now: Instant, t: &PathTiming) -> Self {
        Self {
            addr,
            kind,
            listed,
            state: TargetState::Probing,
            answered: false,
            rtt: None,
            last_pong: None,
            window_start: now,
            next_ping: now,
            retry_delay: t.retry_min,
            pending: VecDeque::new(),
            added: now,
            open_until: (kind != TargetKind::PeerReflexive && !t.open_phase.is_zero())
                .then_some(now + t.open_phase),
            heard: false,
        }
    }

    /// Starts a punch window; `open`: with an opening phase.
    fn restart_probing(&mut self, now: Instant, open: Option<Duration>) {
        self.state = TargetState::Probing;
        self.window_start = now;
        self.next_ping = now;
        self.heard = false;
        self.open_until = open
            .filter(|d| !d.is_zero() && self.kind != TargetKind::PeerReflexive)
            .map(|d| now + d);
    }

    fn fail(&mut self, now: Instant, t: &PathTiming) {
        self.state = TargetState::Failed;
        // The address may belong to someone else by the time it is retried.
        self.answered = false;
        self.next_ping = now + self.retry_delay;
        self.retry_delay = (self.retry_delay * 2).min(t.retry_max);
        self.pending.clear();
    }
}

/// Counters of what a [`PathSet`] refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refusals {
    /// Candidates or ping sources inside a refused network (never probed).
    pub refused_targets: u64,
    /// New peer-reflexive targets not taken because they came too fast.
    pub prflx_limited: u64,
    /// Pongs not sent because their source's budget was spent.
    pub pongs_limited: u64,
    /// Pings deferred because the connection's ping budget was spent.
    pub pings_deferred: u64,
}

/// What an authenticated ping from an address meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PingFrom {
    /// A target already.
    Known,
    /// Became a new (peer-reflexive) target.
    NewTarget,
    /// Not a target, and not taken (refused network, unusable, or too many too fast).
    Ignored,
}

/// The direct-path state of one end-to-end connection.
#[derive(Debug, Clone)]
pub struct PathSet {
    timing: PathTiming,
    targets: Vec<Target>,
    active: Option<SocketAddr>,
    next_txid: u64,
    open_ttl: u8,
    refused: Vec<ipnet::IpNet>,
    pings: TokenBucket,
    last_prflx: Option<Instant>,
    pongs: Vec<(SocketAddr, TokenBucket, Instant)>,
    counts: Refusals,
}

impl PathSet {
    /// No targets yet (the relay path). `txid_seed` should be unpredictable.
    pub fn new(timing: PathTiming, txid_seed: u64) -> Self {
        Self {
            timing,
            targets: Vec::new(),
            active: None,
            next_txid: txid_seed,
            open_ttl: OPEN_TTL_MIN,
            refused: Vec::new(),
            pings: TokenBucket::full(),
            last_prflx: None,
            pongs: Vec::new(),
            counts: Refusals::default(),
        }
    }

    /// Networks never to probe (service addresses, the connector's backend networks). Targets
    /// inside them are dropped at once.
    pub fn set_refused(&mut self, nets: Vec<ipnet::IpNet>, now: Instant) {
        self.refused = nets;
        let before = self.targets.len();
        let refused = &self.refused;
        self.targets.retain(|t| !is_refused(refused, &t.addr));
        self.counts.refused_targets += (before - self.targets.len()) as u64;
        self.reselect(now);
    }

    /// What this set refused so far.
    pub fn refused(&self) -> Refusals {
        self.counts
    }

    /// Whether a pong may be sent to `to` now (at most [`PONG_BUDGET`] per second per source);
    /// counts a refusal.
    pub fn pong_allowed(&mut self, to: SocketAddr, now: Instant) -> bool {
        let i = match self.pongs.iter().position(|p| p.0 == to) {
            Some(i) => i,
            None => {
                if self.pongs.len() >= PONG_SOURCES {
                    let lru = (0..self.pongs.len())
                        .min_by_key(|&i| self.pongs[i].2)
                        .unwrap_or(0);
                    self.pongs.swap_remove(lru);
                }
                self.pongs.push((to, TokenBucket::full(), now));
                self.pongs.len() - 1
            }
        };
        let entry = &mut self.pongs[i];
        entry.2 = now;
        let ok = entry.1.take(Rate::per_sec(PONG_BUDGET), now);
        if !ok {
            self.counts.pongs_limited += 1;
        }
        ok
    }

    /// Whether a pong from `from` with `txid` would answer a ping in flight (it proves the
    /// peer's probe is fresh even if its clock says otherwise).
    pub fn expects_pong(&self, from: SocketAddr, txid: u64) -> bool {
        self.targets
            .iter()
            .any(|t| t.addr == from && t.pending.iter().any(|p| p.0 == txid))
    }

    /// Whether `addr` lies in a refused network (never probed).
    pub fn refuses(&self, addr: &SocketAddr) -> bool {
        is_refused(&self.refused, addr)
    }

    /// The TTL of opening probes now.
    pub fn open_ttl(&self) -> u8 {
        self.open_ttl
    }

    /// Replaces the peer's candidate list. Known targets keep their state (failed ones are
    /// tried again at once: new information may make them work); targets the peer no longer
    /// lists are dropped, except peer-reflexive ones.
    pub fn set_candidates(&mut self, candidates: &[Candidate], now: Instant) {
        for t in &mut self.targets {
            t.listed = false;
        }
        let mut listed = 0;
        for c in candidates {
            if listed >= MAX_LISTED {
                break;
            }
            if !usable(&c.addr) {
                continue;
            }
            if is_refused(&self.refused, &c.addr) {
                self.counts.refused_targets += 1;
                continue;
            }
            listed += 1;
            let kind = match c.kind {
                CandidateKind::Host => TargetKind::Host,
                CandidateKind::Reflexive
                | CandidateKind::ReflexiveStable
                | CandidateKind::ReflexiveVarying => TargetKind::Reflexive,
            };
            match self.targets.iter_mut().find(|t| t.addr == c.addr) {
                Some(t) => {
                    t.listed = true;
                    // A host candidate outranks the same address learnt another way.
                    if kind == TargetKind::Host || t.kind == TargetKind::PeerReflexive {
                        t.kind = kind;
                    }
                    if t.state == TargetState::Failed {
                        t.retry_delay = self.timing.retry_min;
                        t.restart_probing(now, Some(self.timing.open_phase));
                    }
                }
                None => self
                    .targets
                    .push(Target::new(c.addr, kind, true, now, &self.timing)),
            }
        }
        self.targets
            .retain(|t| t.listed || t.kind == TargetKind::PeerReflexive);
        self.reselect(now);
    }

    /// An authenticated, fresh ping arrived from `from`: it may become a new (peer-reflexive)
    /// target.
    pub fn on_ping(&mut self, from: SocketAddr, now: Instant) -> PingFrom {
        if let Some(t) = self.targets.iter_mut().find(|t| t.addr == from) {
            match t.state {
                // The peer reaches us from there: answer its punch with ours now, at full TTL
                // (its router has a mapping toward us, so our ping is no longer unsolicited).
                TargetState::Probing => {
                    t.next_ping = t.next_ping.min(now);
                    t.open_until = None;
                }
                TargetState::Failed => {
                    t.retry_delay = self.timing.retry_min;
                    t.restart_probing(now, None);
                }
                TargetState::Confirmed => {}
            }
            t.heard = true;
            return PingFrom::Known;
        }
        if !usable(&from) {
            return PingFrom::Ignored;
        }
        if is_refused(&self.refused, &from) {
            self.counts.refused_targets += 1;
            return PingFrom::Ignored;
        }
        if self
            .last_prflx
            .is_some_and(|at| now.saturating_duration_since(at) < PRFLX_INTERVAL)
        {
            self.counts.prflx_limited += 1;
            return PingFrom::Ignored;
        }
        let prflx: Vec<usize> = (0..self.targets.len())
            .filter(|&i| self.targets[i].kind == TargetKind::PeerReflexive)
            .collect();
        if prflx.len() >= MAX_PEER_REFLEXIVE {
            let oldest = prflx
                .into_iter()
                .filter(|&i| self.targets[i].state != TargetState::Confirmed)
                .min_by_key(|&i| self.targets[i].added);
            match oldest {
                Some(i) => {
                    self.targets.remove(i);
                }
                None => return PingFrom::Ignored,
            }
        }
        self.last_prflx = Some(now);
        self.targets.push(Target::new(
            from,
            TargetKind::PeerReflexive,
            false,
            now,
            &self.timing,
        ));
        PingFrom::NewTarget
    }

    /// An authenticated pong arrived from `from`. Returns false if it answers no ping sent there
    /// (late, duplicated, or from elsewhere).
    pub fn on_pong(&mut self, from: SocketAddr, txid: u64, now: Instant) -> bool {
        let Some(t) = self.targets.iter_mut().find(|t| t.addr == from) else {
            return false;
        };
        let Some(i) = t.pending.iter().position(|p| p.0 == txid) else {
            return false;
        };
        let (_, sent, full) = t.pending.remove(i).unwrap_or((txid, now, false));
        let sample = now.saturating_duration_since(sent);
        t.rtt = Some(match t.rtt {
            Some(r) => (r * 7 + sample) / 8,
            None => sample,
        });
        t.last_pong = Some(now);
        if t.state != TargetState::Confirmed && full {
            t.state = TargetState::Confirmed;
            t.retry_delay = self.timing.retry_min;
            t.next_ping = now + self.timing.keepalive_standby;
        } else if t.state == TargetState::Probing && !t.answered {
            // It is the peer: confirm with a full-size ping at once.
            t.next_ping = now;
        }
        t.answered = true;
        self.reselect(now);
        true
    }

    /// Advances time: fails silent targets, retries failed ones, and returns the pings to send.
    pub fn poll(&mut self, now: Instant) -> Vec<Action> {
        let timing = self.timing;
        let mut actions = Vec::new();
        let heard_any = self.targets.iter().any(|t| t.heard);
        let mut unheard_wan_failure = false;
        // A peer-reflexive target that failed is forgotten: only a new ping brings it back.
        self.targets
            .retain(|t| !(t.kind == TargetKind::PeerReflexive && t.state == TargetState::Failed));
        for t in &mut self.targets {
            let is_active = self.active == Some(t.addr);
            match t.state {
                TargetState::Probing if now >= t.window_start + timing.punch_window => {
                    unheard_wan_failure |= t.kind == TargetKind::Reflexive && !heard_any;
                    t.fail(now, &timing)
                }
                TargetState::Failed if now >= t.next_ping => {
                    t.restart_probing(now, Some(timing.open_phase))
                }
                TargetState::Confirmed => {
                    let limit = if is_active {
                        timing.dead_after
                    } else {
                        timing.standby_dead_after()
                    };
                    if t.last_pong
                        .is_none_or(|p| now.saturating_duration_since(p) > limit)
                    {
                        t.fail(now, &timing);
                    }
                }
                _ => {}
            }
            if t.state != TargetState::Failed && now >= t.next_ping {
                if !self.pings.take(Rate::per_sec(PING_BUDGET), now) {
                    self.counts.pings_deferred += 1;
                    t.next_ping = now + BUDGET_RETRY;
                    continue;
                }
                // Full size only to an address that proved it is the peer.
                let full = t.state == TargetState::Probing && t.answered;
                // Opening probes (low TTL) until the window's opening phase ends or the peer
                // answered from there.
                let opening = t.state == TargetState::Probing
                    && !t.answered
                    && t.open_until.is_some_and(|u| now < u);
                let txid = self.next_txid;
                self.next_txid = self.next_txid.wrapping_add(1);
                if t.pending.len() >= MAX_PENDING {
                    t.pending.pop_front();
                }
                t.pending.push_back((txid, now, full));
                t.next_ping = now
                    + match (t.state, is_active) {
                        (TargetState::Probing, _) => timing.punch_interval,
                        (_, true) => timing.keepalive_active,
                        (_, false) => timing.keepalive_standby,
                    };
                if let Some(u) = t.open_until.filter(|_| opening) {
                    // The first full-TTL ping goes out right when the opening phase ends.
                    t.next_ping = t.next_ping.min(u);
                }
                actions.push(Action::Ping {
                    to: t.addr,
                    txid,
                    full,
                    ttl: opening.then_some(self.open_ttl),
                });
            }
        }
        if unheard_wan_failure && self.active.is_none() {
            self.open_ttl = if self.open_ttl >= OPEN_TTL_MAX {
                OPEN_TTL_MIN
            } else {
                self.open_ttl + 1
            };
        }
        self.reselect(now);
        actions
    }

    /// When [`PathSet::poll`] should run next (None: no targets).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.targets
            .iter()
            .map(|t| match t.state {
                TargetState::Probing => t.next_ping.min(t.window_start + self.timing.punch_window),
                TargetState::Failed => t.next_ping,
                TargetState::Confirmed => {
                    let limit = if self.active == Some(t.addr) {
                        self.timing.dead_after
                    } else {
                        self.timing.standby_dead_after()
                    };
                    let dead = t.last_pong.map_or(t.next_ping, |p| p + limit);
                    t.next_ping.min(dead)
                }
            })
            .min()
    }

    /// The active direct path, if any (otherwise traffic goes through the relay).
    pub fn selected(&self) -> Option<Selected> {
        let a = self.active?;
        let t = self.targets.iter().find(|t| t.addr == a)?;
        Some(Selected {
            addr: a,
            class: t.kind.class(&t.addr),
            rtt: t.rtt.unwrap_or_default(),
        })
    }

    /// Addresses that answered full-size pings: inner packets from them are the peer's.
    pub fn confirmed(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.targets
            .iter()
            .filter(|t| t.state == TargetState::Confirmed)
            .map(|t| t.addr)
    }

    /// Every target, for status.
    pub fn snapshot(&self) -> Vec<TargetStatus> {
        self.targets
            .iter()
            .map(|t| TargetStatus {
                addr: t.addr,
                kind: t.kind,
                state: t.state,
                rtt_ms: t.rtt.map(|r| r.as_secs_f64() * 1000.0),
            })
            .collect()
    }

    fn reselect(&mut self, now: Instant) {
        let rank = |t: &Target| (t.kind.class(&t.addr), t.rtt.unwrap_or(Duration::MAX));
        let best = self
            .targets
            .iter()
            .filter(|t| t.state == TargetState::Confirmed)
            .min_by_key(|t| rank(t));
        let current = self
            .active
            .and_then(|a| self.targets.iter().find(|t| t.addr == a))
            .filter(|t| t.state == TargetState::Confirmed);
        let next = match (current, best) {
            (_, None) => None,
            (None, Some(b)) => Some(b.addr),
            (Some(c), Some(b)) => {
                let (cc, cr) = rank(c);
                let (bc, br) = rank(b);
                // Switch for a better class, or for an RTT at least 30% and 2 ms better.
                let better =
                    bc < cc || (bc == cc && br * 10 < cr * 7 && br + Duration::from_millis(2) < cr);
                Some(if better { b.addr } else { c.addr })
            }
        };
        if next != self.active {
            self.active = next;
            // Keep the new active path's keepalive on the fast schedule from now on.
            if let Some(t) = self.targets.iter_mut().find(|t| Some(t.addr) == next) {
                t.next_ping = t.next_ping.min(now);
            }
        }
    }
}

/// Whether `addr` is inside one of `nets`.
fn is_refused(nets: &[ipnet::IpNet], addr: &SocketAddr) -> bool {
    let ip = match addr.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    };
    nets.iter().any(|n| n.contains(&ip))
}

/// Whether a candidate address can be probed at all.
fn usable(addr: &SocketAddr) -> bool {
    let ip = addr.ip();
    addr.port() != 0 && !ip.is_unspecified() && !ip.is_multicast() && !ip.is_loopback() && {
        match ip {
            std::net::IpAddr::V4(v4) => !v4.is_broadcast() && v4.octets()[0] < 240,
            std::net::IpAddr::V6(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn cand(s: &str, kind: CandidateKind) -> Candidate {
        Candidate {
            addr: s.parse().unwrap(),
            kind,
        }
    }

    fn pings(actions: &[Action]) -> Vec<(SocketAddr, u64, bool)> {
        actions
            .iter()
            .map(|a| match *a {
                Action::Ping { to, txid, full, .. } => (to, txid, full),
            })
            .collect()
    }

    /// Runs `poll` every 10 ms from `from` for `span`, answering every ping to an address in
    /// `answer` after `rtt`.
    fn run(
        p: &mut PathSet,
        from: Instant,
        span: Duration,
        answer: &[SocketAddr],
        rtt: Duration,
    ) -> Instant {
        let mut now = from;
        let mut inflight: Vec<(Instant, SocketAddr, u64)> = Vec::new();
        while now < from + span {
            for (to, txid, _) in pings(&p.poll(now)) {
                if answer.contains(&to) {
                    inflight.push((now + rtt, to, txid));
                }
            }
            inflight.retain(|&(at, to, txid)| {
                if at <= now {
                    p.on_pong(to, txid, now);
                    false
                } else {
                    true
                }
            });
            now += ms(10);
        }
        now
    }

    /// Answers the latest small ping in flight to `addr` after `rtt`, then the full-size ping
    /// that follows at once: the two steps that confirm a target. Returns the time after both.
    fn confirm(p: &mut PathSet, addr: SocketAddr, at: Instant, rtt: Duration) -> Instant {
        let mut now = at;
        p.poll(now);
        let t = p.targets.iter().find(|t| t.addr == addr).expect("target");
        let &(txid, _, full) = t.pending.back().expect("a ping in flight");
        assert!(!full, "the first pings are small");
        now += rtt;
        assert!(p.on_pong(addr, txid, now));
        let a = pings(&p.poll(now));
        let (_, txid, full) = *a.iter().find(|x| x.0 == addr).expect("a full ping at once");
        assert!(full, "an answered address gets a full-size ping");
        now += rtt;
        assert!(p.on_pong(addr, txid, now));
        now
    }

    #[test]
    fn punches_small_and_confirms_with_a_full_size_ping_once_answered() {
        let t0 = Instant::now();
        let mut p = PathSet::new(PathTiming::default(), 7);
        assert_eq!(p.next_deadline(), None);
        p.set_candidates(&[cand("203.0.113.5:4434", CandidateKind::Reflexive)], t0);
        let a = pings(&p.poll(t0));
        assert_eq!(a.len(), 1);
        assert!(!a[0].2, "punching pings to an unproven address are small");
        assert!(p.selected().is_none());
        assert!(p.on_pong(a[0].0, a[0].1, t0 + ms(20)));
        assert!(p.selected().is_none(), "a small pong confirms nothing");
        assert_eq!(
            p.next_deadline(),
            Some(t0 + ms(20)),
            "the full ping goes at once"
        );
        let b = pings(&p.poll(t0 + ms(20)));
        assert_eq!(b.len(), 1);
        assert!(b[0].2, "the answered address gets a full-size ping");
        assert!(p.on_pong(b[0].0, b[0].1, t0 + ms(40)));
        let s = p.selected().expect("confirmed");
        assert_eq!(s.class, PathClass::Wan);
        assert_eq!(s.rtt, ms(20));
        assert_eq!(p.confirmed().count(), 1);
        // A pong for an unknown txid or from elsewhere is refused.
        assert!(!p.on_pong(a[0].0, 999, t0 + ms(50)));
        assert!(!p.on_pong("198.51.100.1:1".parse().unwrap(), a[0].1, t0 + ms(50)));
        // Keepalives on the active path are small and frequent.
        let k = pings(&p.poll(t0 + ms(60)));
        assert_eq!(k.len(), 1);
        assert!(!k[0].2);
    }

    #[test]
    fn lan_beats_wan_and_rtt_decides_within_a_class() {
        let t0 = Instant::now();
        let mut p = PathSet::new(PathTiming::default(), 0);
        let lan: SocketAddr = "192.168.1.3:4434".parse().unwrap();
        let wan: SocketAddr = "203.0.113.5:4434".parse().unwrap();
        p.set_candidates(
            &[
                cand("203.0.113.5:4434", CandidateKind::Reflexive),
                cand("192.168.1.3:4434", CandidateKind::Host),
            ],
            t0,
        );
        // WAN answers first and faster: it is used until LAN answers.
        let at = confirm(&mut p, wan, t0, ms(1));
        assert_eq!(p.selected().unwrap().addr, wan);
        confirm(&mut p, lan, at, ms(5));
        assert_eq!(p.selected().unwrap().addr, lan);
        assert_eq!(p.selected().unwrap().class, PathClass::Lan);

        // A global IPv6 host candidate is reached across the internet: WAN, not LAN; a ULA
        // host candidate is on the LAN.
        let g: SocketAddr = "[2001:db8:2::2]:4434".parse().unwrap();
        let u: SocketAddr = "[fd12::2]:4434".parse().unwrap();
        assert_eq!(TargetKind::Host.class(&g), PathClass::Wan);
        assert_eq!(TargetKind::Host.class(&u), PathClass::Lan);
        assert_eq!(TargetKind::Reflexive.class(&u), PathClass::Wan);

        // Within a class: a clearly better RTT wins, a slightly better one does not.
        let mut q = PathSet::new(PathTiming::default(), 0);
        let r1: SocketAddr = "203.0.113.5:4434".parse().unwrap();
        let r2: SocketAddr = "198.51.100.9:5000".parse().unwrap();
        q.set_candidates(&[cand("203.0.113.5:4434", CandidateKind::Reflexive)], t0);
        let at = confirm(&mut q, r1, t0, ms(20));
        assert_eq!(
            q.on_ping(r2, at + ms(1)),
            PingFrom::NewTarget,
            "new peer-reflexive target"
        );
        confirm(&mut q, r2, at + ms(1), ms(18));
        assert_eq!(
            q.selected().unwrap().addr,
            r1,
            "18 ms is not clearly better than 20"
        );
        let mut r = q.clone();
        let mut r3 = PathSet::new(PathTiming::default(), 0);
        r3.set_candidates(&[cand("203.0.113.5:4434", CandidateKind::Reflexive)], t0);
        let at = confirm(&mut r3, r1, t0, ms(20));
        r3.on_ping(r2, at + ms(1));
        let at = confirm(&mut r3, r2, at + ms(1), ms(5));
        assert_eq!(
            r3.selected().unwrap().addr,
            r2,
            "5 ms is clearly better than 20"
        );
        r.set_candidates(&[], at + ms(50));
        assert_eq!(
            r.selected().unwrap().addr,
            r2,
            "unlisting drops listed targets but keeps peer-reflexive ones"
        );
    }

    #[test]
    fn unanswered_targets_fail_and_are_retried_with_backoff() {
        let t = PathTiming::default();
        let t0 = Instant::now();
        let mut p = PathSet::new(t, 0);
        p.set_candidates(&[cand("203.0.113.5:4434", CandidateKind::Reflexive)], t0);
        let end = run(&mut p, t0, t.punch_window + ms(20), &[], ms(1));
        let s = p.snapshot();
        assert_eq!(s[0].state, TargetState::Failed);
        // Pinged at the punch interval during the window, then quiet until the retry.
        assert!(pings(&p.poll(end)).is_empty());
        assert!(p.next_deadline().unwrap() >= end + t.retry_min - ms(30));
        let retry = p.next_deadline().unwrap();
        assert_eq!(pings(&p.poll(retry)).len(), 1, "retried");
        // The second failure waits twice as long.
        let end2 = run(&mut p, retry, t.punch_window + ms(20), &[], ms(1));
        assert!(p.next_deadline().unwrap() >= end2 + t.retry_min * 2 - ms(30));
    }

    #[test]
    fn silent_active_path_fails_within_dead_after_and_recovers() {
        let t = PathTiming::default();
        let t0 = Instant::now();
        let addr: SocketAddr = "203.0.113.5:4434".parse().unwrap();
        let mut p = PathSet::new(t, 0);
        p.set_candidates(&[cand("203.0.113.5:4434", CandidateKind::Reflexive)], t0);
        let now = run(&mut p, t0, ms(3000), &[addr], ms(2));
        assert!(p.selected().is_some());
        // The path goes silent: abandoned after dead_after (plus one poll step).
        let mut at = now;
        while p.selected().is_some() {
            run(&mut p, at, ms(10), &[], ms(2));
            at += ms(10);
            assert!(at - now <= t.dead_after + ms(50), "not abandoned in time");
        }
        assert!(at - now >= t.dead_after - ms(250));
        // It answers again: back within retry_min + a punch.
        let back = run(&mut p, at, t.retry_min + ms(500), &[addr], ms(2));
        assert_eq!(p.selected().map(|s| s.addr), Some(addr));
        assert!(back - at <= t.retry_min + ms(500));
    }

    #[test]
    fn a_ping_from_a_failed_target_retries_it_at_once() {
        let t = PathTiming::default();
        let t0 = Instant::now();
        let addr: SocketAddr = "203.0.113.5:4434".parse().unwrap();
        let mut p = PathSet::new(t, 0);
        p.set_candidates(&[cand("203.0.113.5:4434", CandidateKind::Reflexive)], t0);
        let end = run(&mut p, t0, t.punch_window + ms(20), &[], ms(1));
        assert_eq!(p.on_ping(addr, end), PingFrom::Known);
        assert_eq!(pings(&p.poll(end)).len(), 1);
    }

    #[test]
    fn peer_reflexive_targets_are_bounded_and_unusable_addresses_ignored() {
        let t0 = Instant::now();
        let mut p = PathSet::new(PathTiming::default(), 0);
        for i in 0..100u16 {
            p.on_ping(
                SocketAddr::from(([198, 51, 100, 1], 1000 + i)),
                t0 + PRFLX_INTERVAL * u32::from(i),
            );
        }
        assert_eq!(p.snapshot().len(), MAX_PEER_REFLEXIVE);
        let mut q = PathSet::new(PathTiming::default(), 0);
        let bad = [
            "0.0.0.0:1",
            "127.0.0.1:5",
            "224.0.0.1:5",
            "240.0.0.1:5",
            "255.255.255.255:5",
            "10.0.0.1:0",
        ];
        let cands: Vec<Candidate> = bad.iter().map(|a| cand(a, CandidateKind::Host)).collect();
        q.set_candidates(&cands, t0);
        assert!(q.snapshot().is_empty());
        let many: Vec<Candidate> = (0..100u16)
            .map(|i| Candidate {
                addr: SocketAddr::from(([10, 0, 0, 1], 1000 + i)),
                kind: CandidateKind::Host,
            })
            .collect();
        q.set_candidates(&many, t0);
        assert_eq!(q.snapshot().len(), MAX_LISTED);
    }

    fn ping_ttls(actions: &[Action]) -> Vec<(SocketAddr, Option<u8>)> {
        actions
            .iter()
            .map(|a| match *a {
                Action::Ping { to, ttl, .. } => (to, ttl),
            })
            .collect()
    }

    #[test]
    fn windows_start_with_low_ttl_opening_probes() {
        let t = PathTiming::default();
        let t0 = Instant::now();
        let wan: SocketAddr = "203.0.113.5:4434".parse().unwrap();
        let prflx: SocketAddr = "198.51.100.1:7000".parse().unwrap();
        let mut p = PathSet::new(t, 0);
        p.set_candidates(&[cand("203.0.113.5:4434", CandidateKind::Reflexive)], t0);
        assert_eq!(ping_ttls(&p.poll(t0)), vec![(wan, Some(OPEN_TTL_MIN))]);
        assert_eq!(p.next_deadline(), Some(t0 + t.punch_interval));
        assert_eq!(
            ping_ttls(&p.poll(t0 + t.punch_interval)),
            vec![(wan, Some(OPEN_TTL_MIN))]
        );
        // The first full-TTL ping goes out when the opening phase ends, not a whole interval on.
        assert_eq!(p.next_deadline(), Some(t0 + t.open_phase));
        assert_eq!(ping_ttls(&p.poll(t0 + t.open_phase)), vec![(wan, None)]);
        // A peer-reflexive target needs no opening: the peer already reached us from there.
        assert_eq!(p.on_ping(prflx, t0 + ms(310)), PingFrom::NewTarget);
        let a = ping_ttls(&p.poll(t0 + ms(310)));
        assert_eq!(a, vec![(prflx, None)]);
        // No opening phase at all when it is zero.
        let mut q = PathSet::new(
            PathTiming {
                open_phase: Duration::ZERO,
                ..t
            },
            0,
        );
        q.set_candidates(&[cand("203.0.113.5:4434", CandidateKind::Reflexive)], t0);
        assert_eq!(ping_ttls(&q.poll(t0)), vec![(wan, None)]);
    }

    #[test]
    fn a_ping_from_the_peer_ends_the_opening_phase_at_once() {
        let t0 = Instant::now();
        let wan: SocketAddr = "203.0.113.5:4434".parse().unwrap();
        let mut p = PathSet::new(PathTiming::default(), 0);
        p.set_candidates(&[cand("203.0.113.5:4434", CandidateKind::Reflexive)], t0);
        assert_eq!(ping_ttls(&p.poll(t0)), vec![(wan, Some(OPEN_TTL_MIN))]);
        assert_eq!(p.on_ping(wan, t0 + ms(50)), PingFrom::Known);
        assert_eq!(ping_ttls(&p.poll(t0 + ms(50))), vec![(wan, None)]);
    }

    #[test]
    fn opening_ttl_steps_up_only_when_the_peer_was_never_heard() {
        let t = PathTiming::default();
        let t0 = Instant::now();
        let wan: SocketAddr = "203.0.113.5:4434".parse().unwrap();
        let mut p = PathSet::new(t, 0);
        p.set_candidates(&[cand("203.0.113.5:4434", CandidateKind::Reflexive)], t0);
        let mut now = t0;
        let mut seen = Vec::new();
        for _ in 0..4 {
            run(&mut p, now, t.punch_window + ms(20), &[], ms(1));
            seen.push(p.open_ttl());
            now = p.next_deadline().unwrap();
        }
        assert_eq!(
            seen,
            vec![3, 4, OPEN_TTL_MIN, 3],
            "steps up per silent window, wraps"
        );
        // A window in which the peer's pings arrived (only ours are lost) keeps the TTL.
        let before = p.open_ttl();
        p.poll(now);
        p.on_ping(wan, now + ms(100));
        run(&mut p, now + ms(100), t.punch_window, &[], ms(1));
        assert_eq!(p.open_ttl(), before);
    }

    /// A NAT router of the zoo in miniature: endpoint-independent, port-preserving mapping,
    /// address-and-port-dependent filtering; `bare`: no firewall, so an unsolicited packet is
    /// answered and recorded, and a later outbound flow to that remote endpoint gets another
    /// port (as Linux masquerade does).
    struct Router {
        public: std::net::Ipv4Addr,
        bare: bool,
        /// (inside port, remote) -> external port.
        out: std::collections::HashMap<(u16, SocketAddr), u16>,
        /// (external port, remote) recorded from unsolicited inbound packets.
        poisoned: std::collections::HashSet<(u16, SocketAddr)>,
    }

    impl Router {
        fn new(public: [u8; 4], bare: bool) -> Self {
            Self {
                public: public.into(),
                bare,
                out: Default::default(),
                poisoned: Default::default(),
            }
        }

        /// Outbound from inside port `port` to `to`: the external source address.
        fn send(&mut self, port: u16, to: SocketAddr) -> SocketAddr {
            let poisoned = &self.poisoned;
            let ext = *self.out.entry((port, to)).or_insert_with(|| {
                if poisoned.contains(&(port, to)) {
                    port.wrapping_add(1000)
                } else {
                    port
                }
            });
            SocketAddr::from((self.public, ext))
        }

        /// Inbound from `from` to external `port`: the inside port, if it passes.
        fn recv(&mut self, from: SocketAddr, port: u16) -> Option<u16> {
            let inside = self
                .out
                .iter()
                .find(|((_, r), e)| *r == from && **e == port)
                .map(|((p, _), _)| *p);
            if inside.is_none() && self.bare {
                self.poisoned.insert((port, from));
            }
            inside
        }
    }

    /// Two ends behind two routers (`bare[i]`: end i's router answers unsolicited packets) two
    /// hops apart; end 1 starts `start_skew` after end 0 (so a long skew is an ordering: end 0
    /// goes first); pings are delivered after 5 ms, time advances in 5 ms steps. Returns when
    /// both ends have a direct path, if within `limit`.
    fn punch(
        timing: PathTiming,
        bare: [bool; 2],
        start_skew: Duration,
        limit: Duration,
    ) -> Option<Duration> {
        const PORT: u16 = 4434;
        const HOPS: u8 = 2;
        let t0 = Instant::now();
        let mut r = [
            Router::new([203, 0, 113, 1], bare[0]),
            Router::new([198, 51, 100, 1], bare[1]),
        ];
        let public = [
            SocketAddr::from(([203, 0, 113, 1], PORT)),
            SocketAddr::from(([198, 51, 100, 1], PORT)),
        ];
        let mut ends = [PathSet::new(timing, 1), PathSet::new(timing, 1 << 32)];
        let starts = [t0, t0 + start_skew];
        let mut started = [false, false];
        // (deliver at, to end, from, txid, ping?)
        let mut wire: Vec<(Instant, usize, SocketAddr, u64, bool)> = Vec::new();
        let mut now = t0;
        while now < t0 + limit {
            for i in 0..2 {
                if !started[i] && now >= starts[i] {
                    started[i] = true;
                    let c = cand(&public[1 - i].to_string(), CandidateKind::Reflexive);
                    ends[i].set_candidates(&[c], now);
                }
            }
            let mut due = Vec::new();
            wire.retain(|m| {
                if m.0 <= now {
                    due.push(*m);
                    false
                } else {
                    true
                }
            });
            let mut replies = Vec::new();
            for (_, to, from, txid, ping) in due {
                if ping {
                    ends[to].on_ping(from, now);
                    replies.push((to, from, txid));
                } else {
                    ends[to].on_pong(from, txid, now);
                }
            }
            for i in 0..2 {
                let mut out: Vec<(SocketAddr, u64, bool, Option<u8>)> = ends[i]
                    .poll(now)
                    .into_iter()
                    .map(|Action::Ping { to, txid, ttl, .. }| (to, txid, true, ttl))
                    .collect();
                out.extend(
                    replies
                        .iter()
                        .filter(|x| x.0 == i)
                        .map(|x| (x.1, x.2, false, None)),
                );
                for (to, txid, ping, ttl) in out {
                    if ttl.is_some_and(|ttl| ttl <= 1) {
                        continue; // expires in the own router, before its NAT
                    }
                    let src = r[i].send(PORT, to);
                    // The router takes one hop; the WAN between the routers HOPS more.
                    if ttl.is_some_and(|ttl| ttl.saturating_sub(1) <= HOPS) {
                        continue;
                    }
                    let j = 1 - i;
                    if to == public[j] && r[j].recv(src, PORT).is_some() {
                        wire.push((now + ms(5), j, src, txid, ping));
                    }
                }
            }
            if ends.iter().all(|e| e.selected().is_some()) {
                return Some(now - t0);
            }
            now += ms(5);
        }
        None
    }

    #[test]
    fn opening_probes_punch_through_routers_that_answer_unsolicited_packets() {
        let t = PathTiming::default();
        let none = PathTiming {
            open_phase: Duration::ZERO,
            ..t
        };
        for skew in [ms(0), ms(20), ms(150)] {
            // Routers that drop: direct either way.
            assert!(
                punch(none, [false; 2], skew, ms(2000)).is_some(),
                "{skew:?}"
            );
            let took = punch(t, [false; 2], skew, ms(2000)).expect("direct with opening probes");
            assert!(took <= t.open_phase + skew + ms(50), "{took:?}");
            // Routers that answer: without opening probes the first ping poisons the other
            // router and the pair never goes direct (within a minute here); with them it does.
            assert_eq!(punch(none, [true; 2], skew, ms(60_000)), None, "{skew:?}");
            let took = punch(t, [true; 2], skew, ms(2000)).expect("direct through bare routers");
            assert!(took <= t.open_phase + skew + ms(50), "{took:?}");
        }
    }

    #[test]
    fn an_ordering_alone_works_only_when_the_answering_side_goes_first() {
        let none = PathTiming {
            open_phase: Duration::ZERO,
            ..PathTiming::default()
        };
        // End 0 goes first (end 1 starts 1 s later), no opening probes.
        let first = ms(1000);
        let limit = ms(30_000);
        // End 0's router answers, end 1's drops: end 0's pings die at end 1's firewall without
        // a trace; end 1's first ping is an answer at end 0's router.
        assert!(punch(none, [true, false], first, limit).is_some());
        // The other way round, end 0's first ping poisons end 1's router.
        assert_eq!(punch(none, [false, true], first, limit), None);
        // Both answer: whoever goes first poisons the other; no ordering helps.
        assert_eq!(punch(none, [true, true], first, limit), None);
        // Opening probes need no ordering, as long as the ends start within the opening phase
        // of each other (each starts when the other's candidates arrive through the relay, so
        // the skew is about one relay transit); an end that starts later than that finds its
        // answering router already poisoned by the other's full-TTL pings.
        let t = PathTiming::default();
        for bare in [[true, false], [false, true], [true, true]] {
            assert!(punch(t, bare, ms(250), limit).is_some(), "{bare:?}");
        }
        assert_eq!(punch(t, [false, true], first, limit), None);
    }

    #[test]
    fn refused_networks_are_never_probed() {
        let t0 = Instant::now();
        let mut p = PathSet::new(PathTiming::default(), 0);
        p.set_refused(
            vec![
                "10.10.3.0/24".parse().unwrap(),
                "10.100.0.1/32".parse().unwrap(),
            ],
            t0,
        );
        p.set_candidates(
            &[
                cand("10.10.3.2:22", CandidateKind::Host),
                cand("10.100.0.1:5432", CandidateKind::Host),
                cand("[::ffff:10.10.3.9]:6379", CandidateKind::Host),
                cand("10.10.0.2:4434", CandidateKind::Host),
            ],
            t0,
        );
        assert_eq!(p.refused().refused_targets, 3);
        let to: Vec<SocketAddr> = pings(&p.poll(t0)).iter().map(|a| a.0).collect();
        assert_eq!(to, vec!["10.10.0.2:4434".parse().unwrap()]);
        // An authenticated ping from a refused address does not make it a target.
        assert_eq!(
            p.on_ping("10.10.3.2:161".parse().unwrap(), t0),
            PingFrom::Ignored
        );
        assert_eq!(p.refused().refused_targets, 4);
        assert_eq!(p.snapshot().len(), 1);
        // Refusing later drops a target that is already there.
        p.set_refused(vec!["10.10.0.0/24".parse().unwrap()], t0);
        assert!(p.snapshot().is_empty());
        assert!(pings(&p.poll(t0 + ms(500))).is_empty());
    }

    #[test]
    fn peer_reflexive_targets_come_slowly_and_are_not_retried() {
        let t = PathTiming::default();
        let t0 = Instant::now();
        let mut p = PathSet::new(t, 0);
        let a: SocketAddr = "198.51.100.1:1000".parse().unwrap();
        let b: SocketAddr = "198.51.100.1:1001".parse().unwrap();
        assert_eq!(p.on_ping(a, t0), PingFrom::NewTarget);
        assert_eq!(p.on_ping(b, t0 + ms(500)), PingFrom::Ignored);
        assert_eq!(p.refused().prflx_limited, 1);
        // `a` never answers: small pings for one window, then it is forgotten.
        let mut bytes = 0;
        let mut now = t0;
        while now < t0 + Duration::from_secs(60) {
            for (_, _, full) in pings(&p.poll(now)) {
                bytes += if full {
                    1358
                } else {
                    ztna_proto::probe::MIN_LEN
                };
            }
            now += ms(10);
        }
        assert!(p.snapshot().is_empty());
        let window = (t.punch_window.as_millis() / t.punch_interval.as_millis()) as usize + 1;
        assert!(
            bytes <= window * ztna_proto::probe::MIN_LEN,
            "{bytes} bytes to an address that never answered"
        );
        assert_eq!(p.on_ping(b, now), PingFrom::NewTarget);
    }

    #[test]
    fn pongs_and_pings_have_budgets() {
        let t0 = Instant::now();
        let mut p = PathSet::new(PathTiming::default(), 0);
        let victim: SocketAddr = "192.0.2.1:53".parse().unwrap();
        let other: SocketAddr = "192.0.2.2:53".parse().unwrap();
        // A burst of 1000 pings from one source in one second: PONG_BUDGET pongs.
        let sent = (0..1000)
            .filter(|i| p.pong_allowed(victim, t0 + ms(*i)))
            .count();
        assert!(sent <= 2 * PONG_BUDGET as usize, "{sent} pongs");
        assert!(sent >= PONG_BUDGET as usize, "{sent} pongs");
        assert!(
            p.pong_allowed(other, t0 + ms(999)),
            "budgets are per source"
        );
        assert_eq!(p.refused().pongs_limited, 1000 - sent as u64);
        // Sources are remembered in a bounded table.
        for i in 0..1000u16 {
            p.pong_allowed(SocketAddr::from(([192, 0, 2, 3], i)), t0);
        }
        assert!(p.pongs.len() <= PONG_SOURCES);

        // Many targets pinged fast (160 pings a second wanted): the connection sends at most
        // a burst of PING_BUDGET plus PING_BUDGET per second, and defers the rest.
        let fast = PathTiming {
            punch_interval: ms(50),
            ..PathTiming::default()
        };
        let mut q = PathSet::new(fast, 0);
        let many: Vec<Candidate> = (0..MAX_LISTED as u16)
            .map(|i| Candidate {
                addr: SocketAddr::from(([203, 0, 113, 1], 1000 + i)),
                kind: CandidateKind::Host,
            })
            .collect();
        q.set_candidates(&many, t0);
        let mut now = t0;
        let mut sent = 0u32;
        while now < t0 + Duration::from_secs(4) {
            sent += q.poll(now).len() as u32;
            let allowed = PING_BUDGET as f64 * (1.0 + (now - t0).as_secs_f64()) + 1.0;
            assert!(f64::from(sent) <= allowed, "{sent} pings by {:?}", now - t0);
            now += ms(5);
        }
        assert!(sent >= PING_BUDGET * 4, "the budget is used: {sent}");
        assert!(q.refused().pings_deferred > 0);
    }

    #[test]
    fn pings_stay_bounded_over_a_long_run() {
        let t0 = Instant::now();
        let mut p = PathSet::new(PathTiming::default(), 0);
        p.set_candidates(&[cand("203.0.113.5:4434", CandidateKind::Reflexive)], t0);
        let mut sent = 0;
        let mut now = t0;
        for _ in 0..60_000 {
            sent += p.poll(now).len();
            now += ms(10);
        }
        // 10 minutes of a target that never answers: punches of 25 pings every ~16 s at most.
        assert!(sent < 1200, "{sent} pings");
    }
}
