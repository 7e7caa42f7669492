//! The direct-path driver of one end-to-end connection: it runs [`crate::path::PathSet`] over
//! the process's one UDP socket ([`MuxSocket`]).
//!
//! Both ends start one when their inner connection is up. Each sends its candidates (host
//! addresses of the socket, plus the address the relay observed) to the relay, which forwards
//! them to the other end; each then probes the other's candidates at once, with probes keyed
//! from the inner connection's TLS exporter, so only the two ends can make or check them. When
//! a path is confirmed the socket sends the connection's packets straight to the peer; when it
//! goes quiet the socket falls back to the relay channel, which stays open throughout.
//!
//! **Candidates.** An end offers the addresses in [`DirectOptions::advertise`] if any; else the
//! address its socket is bound to; else the source address the kernel picks for the route to
//! the relay (its uplink), never every interface's address (a connector's backend networks, an
//! agent's container bridges). **Probes** carry their direction and the sender's counter and
//! clock under the MAC; the driver refuses reflected, replayed and stale ones
//! ([`ztna_proto::probe::ReplayGuard`]) and the targets [`crate::path::PathSet`] refuses
//! ([`DirectOptions::refuse`]).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use ztna_proto::control::{ControlMessage, MAX_CANDIDATES};
use ztna_proto::observe;
use ztna_proto::probe::{
    self, Direction, Probe, ProbeError, ProbeKey, ProbeKind, ReplayGuard, Tag,
};
use ztna_proto::{Candidate, CandidateKind, ChannelId};

use crate::birthday::{self, AttemptState, EasyProber, HardOpener, Mapping, Plan};
use crate::mux::{MuxSocket, PROBE_QUEUE};
use crate::path::{Action, PathClass, PathSet, PathTiming, PingFrom, Refusals, TargetStatus};
use crate::session::ControlSender;

/// TLS exporter label of the probe tag and key.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-ztna-direct-path-probe";
/// How often host addresses are looked at again (they change when a laptop roams).
const HOST_REFRESH: Duration = Duration::from_secs(5);
/// Size of a keepalive probe (and of every ping to an address that has not answered yet).
const SMALL_PROBE: usize = probe::MIN_LEN;
/// Least time between two candidate lists sent (the relay drops lists that come faster than
/// one per 100 ms from one end of a channel).
const CANDIDATES_INTERVAL: Duration = Duration::from_millis(250);
/// Address requests sent to the relay's second port per observed address, this far apart.
const OBSERVE_TRIES: u32 = 3;
const OBSERVE_INTERVAL: Duration = Duration::from_millis(300);
/// Datagrams from the extra sockets of a port-prediction attempt waiting for the driver.
const EXTRA_QUEUE: usize = 256;
/// Most hard-side attempts (each with [`birthday::HARD_SOCKETS`] extra sockets) in progress in
/// one process at once: a connector behind a hard NAT that many agents reach at the same time
/// must not run out of file descriptors. Further connections try again later.
const MAX_HARD_ATTEMPTS: usize = 4;
/// Hard-side attempts in progress in this process.
static HARD_ATTEMPTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Settings of direct paths.
#[derive(Debug, Clone)]
pub struct DirectOptions {
    /// Whether to look for direct paths at all (off: everything goes through the relay).
    pub enabled: bool,
    /// Probing and selection timing.
    pub timing: PathTiming,
    /// Addresses never offered as host candidates (e.g. the agent's own tunnel IP).
    pub exclude: Vec<IpAddr>,
    /// The only host candidates to offer (with the socket's port); empty: the socket's bound
    /// address, or else the source address of the route to the relay.
    pub advertise: Vec<IpAddr>,
    /// Networks never probed, whatever the peer says (service addresses, backend networks).
    pub refuse: Vec<ipnet::IpNet>,
}

impl Default for DirectOptions {
    fn default() -> Self {
        Self {
            enabled: true,
            timing: PathTiming::default(),
            exclude: Vec::new(),
            advertise: Vec::new(),
            refuse: Vec::new(),
        }
    }
}

/// A connection's direct-path state, for status output.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DirectStatus {
    /// The active direct path: the peer's address.
    pub addr: Option<SocketAddr>,
    /// Its class.
    pub class: Option<PathClass>,
    /// Its probe RTT.
    pub rtt_ms: Option<f64>,
    /// Candidates this end sent.
    pub local_candidates: Vec<Candidate>,
    /// The peer's addresses being probed, with their state.
    pub targets: Vec<TargetStatus>,
    /// Times the connection moved onto a direct path.
    pub upgrades: u64,
    /// Times it fell back to the relay.
    pub fallbacks: u64,
}

/// Why a driver could not start.
#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    /// The inner connection has no TLS exporter (it closed).
    #[error("could not derive the probe key: {0:?}")]
    Exporter(quinn::crypto::ExportKeyingMaterialError),
}

/// What a driver needs from its owner.
#[derive(Debug, Clone)]
pub struct DirectContext {
    /// The process's socket.
    pub mux: Arc<MuxSocket>,
    /// The connection's virtual peer address.
    pub vaddr: SocketAddr,
    /// The relay channel under it.
    pub channel: ChannelId,
    /// The relay session that carries candidates.
    pub control: ControlSender,
    /// This end's address as the relay observes it.
    pub observed: Option<SocketAddr>,
    /// Size of a full probe: the inner connection's UDP payload size.
    pub full_probe_len: usize,
    /// The peer, for logs.
    pub peer: String,
}

struct Shared {
    status: Mutex<DirectStatus>,
    /// The relay channel candidates go through, and the session that carries them; replaced
    /// by [`DirectPath::rebind`] when the inner connection moves to another relay channel.
    relay: Mutex<(ChannelId, ControlSender)>,
    /// The platform says the network changed: gather and send candidates at once.
    regather: tokio::sync::Notify,
    peer_candidates: watch::Sender<Option<Vec<Candidate>>>,
    observed: watch::Sender<Option<SocketAddr>>,
}

/// A running driver. Dropping it stops probing and puts the connection back on the relay.
pub struct DirectPath {
    shared: Arc<Shared>,
    mux: Arc<MuxSocket>,
    vaddr: SocketAddr,
    tag: Tag,
    task: JoinHandle<()>,
}

impl DirectPath {
    /// Starts looking for a direct path under the inner connection `conn`. Must be called
    /// inside a tokio runtime.
    pub fn start(
        conn: &quinn::Connection,
        ctx: DirectContext,
        opts: &DirectOptions,
    ) -> Result<Self, DirectError> {
        let mut secret = [0u8; 40];
        conn.export_keying_material(&mut secret, EXPORTER_LABEL, b"")
            .map_err(DirectError::Exporter)?;
        let mut tag: Tag = [0; 8];
        tag.copy_from_slice(&secret[..8]);
        let mut key_bytes = [0u8; 32];
        key_bytes.copy_from_slice(&secret[8..]);
        let key = ProbeKey::new(&key_bytes);
        let (peer_candidates, peer_rx) = watch::channel(None);
        let (observed, observed_rx) = watch::channel(ctx.observed);
        let shared = Arc::new(Shared {
            status: Mutex::default(),
            relay: Mutex::new((ctx.channel, ctx.control.clone())),
            regather: tokio::sync::Notify::new(),
            peer_candidates,
            observed,
        });
        let (probe_tx, probe_rx) = mpsc::channel(PROBE_QUEUE);
        let (extra_tx, extra_rx) = mpsc::channel(EXTRA_QUEUE);
        let (observe_tx, observe_rx) = mpsc::channel(4);
        ctx.mux.register_probes(tag, probe_tx);
        let (mux, vaddr) = (ctx.mux.clone(), ctx.vaddr);
        let own = direction_of(conn.side());
        let epoch = Instant::now();
        let mut paths = PathSet::new(opts.timing, seed());
        paths.set_refused(opts.refuse.clone(), epoch.into_std());
        let driver = Driver {
            observe_tx,
            shared: shared.clone(),
            ctx,
            opts: opts.clone(),
            key,
            tag,
            conn: conn.clone(),
            own,
            guard: ReplayGuard::new(own, probe::MAX_AGE_MS),
            epoch,
            seq: 0,
            counted: paths.refused(),
            paths,
            applied: (None, Vec::new()),
            sent: Vec::new(),
            sent_at: None,
            send_due: None,
            force: false,
            mapping: Mapping::Unknown,
            observing: None,
            peer_reflexive: None,
            hard: None,
            easy: None,
            via: None,
            last_attempt: None,
            peer_since: None,
            extra_tx,
        };
        let task = tokio::spawn(driver.run(peer_rx, observed_rx, probe_rx, extra_rx, observe_rx));
        Ok(Self {
            shared,
            mux,
            vaddr,
            tag,
            task,
        })
    }

    /// The peer's candidates arrived (or changed).
    pub fn set_peer_candidates(&self, candidates: Vec<Candidate>) {
        self.shared.peer_candidates.send_replace(Some(candidates));
    }

    /// The inner connection moved to `channel` of another relay session (a relay restart or
    /// a failover): candidates go through it from now on, and are sent again at once. The
    /// active direct path, if any, is not touched, so traffic on it never stops.
    pub fn rebind(&self, channel: ChannelId, control: ControlSender, observed: Option<SocketAddr>) {
        *self.shared.relay.lock().unwrap_or_else(|p| p.into_inner()) = (channel, control);
        if let Some(o) = observed {
            self.shared.observed.send_if_modified(|cur| {
                let changed = *cur != Some(o);
                *cur = Some(o);
                changed
            });
        }
        self.shared.regather.notify_one();
    }

    /// The relay observed a new address for this end.
    pub fn set_observed(&self, addr: SocketAddr) {
        self.shared.observed.send_replace(Some(addr));
    }

    /// The network changed (an interface, an address, a wake from sleep): gather the host
    /// candidates again and send them now, even if they look the same (the peer then probes
    /// them again), instead of at the next periodic refresh.
    pub fn network_changed(&self) {
        self.shared.regather.notify_one();
    }

    /// A status snapshot.
    pub fn status(&self) -> DirectStatus {
        self.shared
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for DirectPath {
    fn drop(&mut self) {
        self.task.abort();
        self.mux.unregister_probes(&self.tag);
        self.mux.set_direct(self.vaddr, None, &[]);
        self.mux.set_direct_socket(self.vaddr, None);
    }
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    if getrandom(&mut b) {
        u64::from_ne_bytes(b)
    } else {
        crate::backoff::jitter_seed()
    }
}

fn getrandom(buf: &mut [u8]) -> bool {
    use ring::rand::SecureRandom;
    ring::rand::SystemRandom::new().fill(buf).is_ok()
}

struct Driver {
    shared: Arc<Shared>,
    ctx: DirectContext,
    opts: DirectOptions,
    key: ProbeKey,
    tag: Tag,
    conn: quinn::Connection,
    /// The direction of the probes this end sends.
    own: Direction,
    /// Replay, reflection and freshness checks of the peer's probes.
    guard: ReplayGuard,
    /// Zero of this end's probe clock.
    epoch: Instant,
    /// Probes sent so far (the last sequence number used).
    seq: u64,
    /// The path set's refusals already added to the socket's counters.
    counted: Refusals,
    paths: PathSet,
    /// What the socket was last told: the active address and the accepted ones.
    applied: (Option<SocketAddr>, Vec<SocketAddr>),
    /// The candidates last sent, and when.
    sent: Vec<Candidate>,
    sent_at: Option<Instant>,
    /// A changed list waits until then, so lists are never sent faster than the relay takes them.
    send_due: Option<Instant>,
    /// Send the next list even if it equals the last one (the network changed).
    force: bool,
    /// This end's NAT mapping behaviour, from the relay's two observations.
    mapping: Mapping,
    /// The address request in flight: nonce, the observed address it checks, the relay's
    /// second port, tries sent, and when the next one is due.
    observing: Option<Observing>,
    observe_tx: mpsc::Sender<(SocketAddr, SocketAddr)>,
    /// The peer's relay-observed candidate (its kind tells its mapping).
    peer_reflexive: Option<Candidate>,
    /// This end's port-prediction attempt as the hard side: the extra sockets.
    hard: Option<HardAttempt>,
    /// ... or as the easy side: the guessed ports.
    easy: Option<EasyProber>,
    /// The extra socket that won an attempt: probes and packets to its peer go through it.
    via: Option<Via>,
    /// When the last attempt started.
    last_attempt: Option<Instant>,
    /// When the peer's candidates first arrived.
    peer_since: Option<Instant>,
    extra_tx: mpsc::Sender<(usize, SocketAddr, Bytes)>,
}

/// An address request to the relay's second port.
struct Observing {
    nonce: observe::Nonce,
    observed: SocketAddr,
    to: SocketAddr,
    tries: u32,
    next: Instant,
}

/// The hard side's attempt: extra sockets, each with a reader task.
struct HardAttempt {
    opener: HardOpener,
    /// The easy side's advertised address, the only destination.
    peer: SocketAddr,
    socks: Vec<Arc<tokio::net::UdpSocket>>,
    readers: Vec<JoinHandle<()>>,
    /// The opening probes sent so far.
    sent: u32,
}

impl Drop for HardAttempt {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
        HARD_ATTEMPTS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A direct path on its own socket.
struct Via {
    peer: SocketAddr,
    sock: Arc<tokio::net::UdpSocket>,
    reader: JoinHandle<()>,
}

impl Drop for Via {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Reads one extra socket: datagrams go to the driver, tagged with the socket's index; once it
/// carries the direct path (`deliver` set), packets from `peer` other than probes go straight to
/// quinn as the virtual address's.
async fn read_extra(
    index: usize,
    sock: Arc<tokio::net::UdpSocket>,
    tx: mpsc::Sender<(usize, SocketAddr, Bytes)>,
    deliver: Option<(Arc<MuxSocket>, SocketAddr, SocketAddr)>,
) {
    // Datagrams here are probes and single inner packets (no GRO on this socket).
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // E.g. an ICMP error surfacing on the socket; never spin on one.
                tracing::trace!(error = %e, "extra socket receive error");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let pkt = &buf[..n];
        match &deliver {
            Some((mux, peer, vaddr)) if from == *peer && !probe::is_probe(pkt) => {
                mux.deliver_direct(*vaddr, Bytes::copy_from_slice(pkt));
            }
            _ if probe::is_probe(pkt) => {
                // A full queue drops it (probes are retried).
                let _ = tx.try_send((index, from, Bytes::copy_from_slice(pkt)));
            }
            _ => {}
        }
    }
}

/// What to do with a freshly gathered candidate list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendCandidates {
    /// Nothing new to say.
    Skip,
    /// Send it now.
    Now,
    /// Send it then: the last list went out less than [`CANDIDATES_INTERVAL`] ago.
    At(Instant),
}

/// Whether a candidate list goes out: when it differs from the last one sent, or when `force`d
/// (the network changed), never faster than one list per [`CANDIDATES_INTERVAL`]. Pure.
fn send_candidates_when(
    list: &[Candidate],
    sent: &[Candidate],
    sent_at: Option<Instant>,
    force: bool,
    now: Instant,
) -> SendCandidates {
    if list == sent && !force {
        return SendCandidates::Skip;
    }
    match sent_at.map(|at| at + CANDIDATES_INTERVAL) {
        Some(due) if now < due => SendCandidates::At(due),
        _ => SendCandidates::Now,
    }
}

impl Driver {
    async fn run(
        mut self,
        mut peer_rx: watch::Receiver<Option<Vec<Candidate>>>,
        mut observed_rx: watch::Receiver<Option<SocketAddr>>,
        mut probe_rx: mpsc::Receiver<(SocketAddr, Bytes)>,
        mut extra_rx: mpsc::Receiver<(usize, SocketAddr, Bytes)>,
        mut observe_rx: mpsc::Receiver<(SocketAddr, SocketAddr)>,
    ) {
        let conn = self.conn.clone();
        let closed = conn.closed();
        tokio::pin!(closed);
        let mut refresh = tokio::time::interval(HOST_REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shared = self.shared.clone();
        loop {
            let deadline = self
                .paths
                .next_deadline()
                .map(Instant::from_std)
                .into_iter()
                .chain(self.send_due)
                .chain(self.observing.as_ref().map(|o| o.next))
                .chain(
                    self.hard
                        .as_ref()
                        .and_then(|h| h.opener.next_deadline())
                        .map(Instant::from_std),
                )
                .chain(
                    self.easy
                        .as_ref()
                        .and_then(|e| e.next_deadline())
                        .map(Instant::from_std),
                )
                .min()
                .unwrap_or_else(|| Instant::now() + HOST_REFRESH);
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    if self.send_due.is_some_and(|d| d <= Instant::now()) {
                        self.send_candidates(*observed_rx.borrow());
                    }
                }
                Some((from, pkt)) = probe_rx.recv() => self.on_probe(from, &pkt),
                Some((index, from, pkt)) = extra_rx.recv() => self.on_extra(index, from, &pkt),
                Some((src, seen)) = observe_rx.recv() => self.on_observed(src, seen),
                r = peer_rx.changed() => {
                    if r.is_err() { return; }
                    let list = peer_rx.borrow_and_update().clone().unwrap_or_default();
                    tracing::debug!(peer = %self.ctx.peer, candidates = ?list, "peer candidates");
                    let list = same_family(list, self.ctx.mux.is_v4());
                    self.paths.set_candidates(&list, Instant::now().into_std());
                    self.peer_reflexive = list.iter().find(|c| c.kind.is_reflexive()).copied();
                    self.peer_since.get_or_insert_with(Instant::now);
                }
                r = observed_rx.changed() => {
                    if r.is_err() { return; }
                    // A new mapping: its behaviour is not known until observed twice.
                    self.mapping = Mapping::Unknown;
                    self.observing = None;
                    self.send_candidates(*observed_rx.borrow_and_update());
                }
                _ = refresh.tick() => self.send_candidates(*observed_rx.borrow()),
                () = shared.regather.notified() => {
                    tracing::debug!(peer = %self.ctx.peer, "network changed; gathering candidates again");
                    self.force = true;
                    self.send_candidates(*observed_rx.borrow());
                }
                _ = &mut closed => return,
            }
            let now = Instant::now().into_std();
            for Action::Ping {
                to,
                txid,
                full,
                ttl,
            } in self.paths.poll(now)
            {
                let len = if full {
                    self.ctx.full_probe_len
                } else {
                    SMALL_PROBE
                };
                self.send(to, ProbeKind::Ping, txid, len, ttl);
            }
            self.observe(*observed_rx.borrow());
            self.birthday();
            self.count_refusals();
            self.apply();
        }
    }

    /// Asks the relay's second port for this end's address (once per observed address, a few
    /// tries), unless the answer is in.
    fn observe(&mut self, observed: Option<SocketAddr>) {
        let Some(observed) = observed else { return };
        if self.mapping != Mapping::Unknown {
            return;
        }
        let now = Instant::now();
        if self
            .observing
            .as_ref()
            .is_some_and(|o| o.observed != observed)
        {
            self.observing = None;
        }
        if self.observing.is_none() {
            let Some(relay) = self.ctx.mux.relay_of(self.ctx.vaddr) else {
                return;
            };
            let Some(port) = relay.port().checked_add(observe::PORT_OFFSET) else {
                return;
            };
            let mut nonce = [0u8; 16];
            if !getrandom(&mut nonce) {
                return;
            }
            self.ctx.mux.watch_observed(nonce, self.observe_tx.clone());
            self.observing = Some(Observing {
                nonce,
                observed,
                to: SocketAddr::new(relay.ip(), port),
                tries: 0,
                next: now,
            });
        }
        let Some(o) = self.observing.as_mut() else {
            return;
        };
        if o.tries >= OBSERVE_TRIES || o.next > now {
            if o.tries >= OBSERVE_TRIES && o.next <= now {
                // No answer: a relay without the second port. The mapping stays unknown.
                self.ctx.mux.unwatch_observed(&o.nonce);
                o.next = now + HOST_REFRESH * 12;
            }
            return;
        }
        o.tries += 1;
        o.next = now + OBSERVE_INTERVAL;
        if let Err(e) = self
            .ctx
            .mux
            .send_probe(o.to, &observe::encode_request(&o.nonce))
        {
            tracing::trace!(error = %e, "address request not sent");
        }
    }

    /// The relay's second port answered: compare with its main port's observation.
    fn on_observed(&mut self, src: SocketAddr, seen: SocketAddr) {
        let Some(o) = self.observing.as_ref() else {
            return;
        };
        if src != o.to {
            return;
        }
        let (mapping, main) = (birthday::classify(o.observed, seen), o.observed);
        self.ctx.mux.unwatch_observed(&o.nonce);
        self.observing = None;
        tracing::debug!(peer = %self.ctx.peer, ?mapping, "NAT mapping observed");
        tracing::trace!(%main, second = %seen, "the two observations");
        self.mapping = mapping;
        self.force = true;
        let observed = *self.shared.observed.borrow();
        self.send_candidates(observed);
    }

    /// Starts, runs and ends port-prediction attempts.
    fn birthday(&mut self) {
        let now = Instant::now();
        let std_now = now.into_std();
        let peer_mapping = match self.peer_reflexive.map(|c| c.kind) {
            Some(CandidateKind::ReflexiveStable) => Mapping::Independent,
            Some(CandidateKind::ReflexiveVarying) => Mapping::Dependent,
            _ => Mapping::Unknown,
        };
        if self.paths.selected().is_some() && self.via.is_none() {
            // Plain punching found a path (the peer's NAT filters by address only): no need.
            if self.hard.take().is_some() | self.easy.take().is_some() {
                tracing::info!(peer = %self.ctx.peer, "a direct path came up without port prediction; attempt stopped");
            }
        }
        let decided = self.peer_reflexive.and_then(|peer| {
            birthday::attempt(AttemptState {
                own: self.mapping,
                peer: peer_mapping,
                direct_up: self.paths.selected().is_some(),
                busy: self.hard.is_some() || self.easy.is_some() || self.via.is_some(),
                peer_known_for: self.peer_since.map(|at| now.duration_since(at)),
                since_last: self.last_attempt.map(|at| now.duration_since(at)),
                refused: self.paths.refuses(&peer.addr),
            })
            .map(|plan| (plan, peer))
        });
        if let Some((plan, peer)) = decided {
            match plan {
                Plan::OpenMappings => {
                    self.last_attempt = Some(now);
                    self.start_hard(peer.addr, std_now);
                }
                Plan::GuessPorts => {
                    self.last_attempt = Some(now);
                    tracing::info!(peer = %self.ctx.peer, "peer behind a hard NAT: guessing its port");
                    self.easy = Some(EasyProber::new(peer.addr, std_now, seed()));
                }
                Plan::Relay => {
                    self.last_attempt = Some(now);
                    tracing::info!(peer = %self.ctx.peer, "both ends behind hard NATs: staying on the relay");
                }
                Plan::Punch => {}
            }
        }
        let ttl = None;
        if let Some(e) = self.easy.as_mut() {
            let guesses = e.poll(std_now);
            let done = e.finished(std_now);
            for to in guesses {
                let txid = self.seq ^ 0x6269_7274_6864_6179;
                self.send(to, ProbeKind::Ping, txid, SMALL_PROBE, ttl);
            }
            if done {
                let e = self.easy.take();
                tracing::info!(peer = %self.ctx.peer, hit = e.as_ref().is_some_and(|e| e.hit().is_some()), probes = e.as_ref().map_or(0, |e| e.sent()), "port guessing ended");
            }
        }
        let Some(h) = self.hard.as_mut() else { return };
        let opens = h.opener.poll(std_now);
        let finished = h.opener.finished(std_now);
        let winner = h.opener.winner();
        let peer = h.peer;
        let socks: Vec<Arc<tokio::net::UdpSocket>> = opens
            .iter()
            .filter_map(|&i| h.socks.get(i).cloned())
            .collect();
        h.sent += u32::try_from(socks.len()).unwrap_or(0);
        for sock in socks {
            let txid = self.seq ^ 0x6f70_656e_696e_6721;
            let pkt = self.encode(ProbeKind::Ping, txid, SMALL_PROBE);
            if let Err(e) = crate::mux::send_now(&sock, &pkt, peer) {
                tracing::trace!(error = %e, "opening probe not sent");
            }
        }
        if finished {
            let h = self.hard.take();
            let sent = h.as_ref().map_or(0, |h| h.sent);
            match winner.and_then(|w| h.as_ref().and_then(|h| h.socks.get(w).cloned())) {
                Some(sock) => {
                    tracing::info!(peer = %self.ctx.peer, opening_probes = sent, "a mapping of the port-prediction attempt was found");
                    self.use_via(peer, sock);
                }
                None => {
                    tracing::info!(peer = %self.ctx.peer, opening_probes = sent, "port-prediction attempt ended without a hit; staying on the relay")
                }
            }
            // Dropping the attempt closes every other extra socket and its reader.
            drop(h);
        }
    }

    /// Opens the extra sockets of a hard-side attempt toward `peer`.
    fn start_hard(&mut self, peer: SocketAddr, now: std::time::Instant) {
        let running = HARD_ATTEMPTS.fetch_add(1, Ordering::Relaxed);
        if running >= MAX_HARD_ATTEMPTS {
            HARD_ATTEMPTS.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(peer = %self.ctx.peer, running, "too many port-prediction attempts at once; later");
            return;
        }
        let ttl = self.paths.open_ttl();
        let mut socks = Vec::with_capacity(birthday::HARD_SOCKETS);
        let mut readers = Vec::with_capacity(birthday::HARD_SOCKETS);
        for i in 0..birthday::HARD_SOCKETS {
            match self.ctx.mux.bind_extra(ttl) {
                Ok(s) => {
                    let s = Arc::new(s);
                    readers.push(tokio::spawn(read_extra(
                        i,
                        s.clone(),
                        self.extra_tx.clone(),
                        None,
                    )));
                    socks.push(s);
                }
                Err(e) => {
                    tracing::debug!(error = %e, opened = i, "no more extra sockets");
                    break;
                }
            }
        }
        tracing::info!(peer = %self.ctx.peer, sockets = socks.len(), "behind a hard NAT: opening many mappings toward the peer");
        self.hard = Some(HardAttempt {
            opener: HardOpener::new(socks.len(), now),
            peer,
            socks,
            readers,
            sent: 0,
        });
    }

    /// Makes `sock` the direct path's socket toward `peer`.
    fn use_via(&mut self, peer: SocketAddr, sock: Arc<tokio::net::UdpSocket>) {
        let s2 = socket2::SockRef::from(&*sock);
        // Full TTL from now on: it carries the path.
        let _ = if peer.is_ipv4() {
            s2.set_ttl(64)
        } else {
            s2.set_unicast_hops_v6(64)
        };
        let reader = tokio::spawn(read_extra(
            usize::MAX,
            sock.clone(),
            self.extra_tx.clone(),
            Some((self.ctx.mux.clone(), peer, self.ctx.vaddr)),
        ));
        self.ctx
            .mux
            .set_direct_socket(self.ctx.vaddr, Some((peer, sock.clone())));
        self.via = Some(Via { peer, sock, reader });
    }

    /// A probe arrived on an extra socket.
    fn on_extra(&mut self, index: usize, from: SocketAddr, pkt: &[u8]) {
        let now = Instant::now().into_std();
        if index != usize::MAX {
            let Some(h) = self.hard.as_mut() else { return };
            // Only the peer's authenticated pings pick a winner.
            if from != h.peer || probe::decode(pkt, &self.key).is_err() {
                return;
            }
            if h.opener.on_ping(index, now) == Some(index) {
                if let Some(sock) = h.socks.get(index).cloned() {
                    self.hard = None;
                    tracing::info!(peer = %self.ctx.peer, "the peer reached one of our mappings");
                    self.use_via(from, sock);
                }
            }
        }
        if self.via.as_ref().is_some_and(|v| v.peer == from) {
            self.on_probe(from, pkt);
        }
    }

    /// Builds and sends one probe of this end's direction, with the next sequence number.
    /// Sends one probe; `ttl` overrides the socket's default for this datagram (opening probes).
    fn send(&mut self, to: SocketAddr, kind: ProbeKind, txid: u64, len: usize, ttl: Option<u8>) {
        let pkt = self.encode(kind, txid, len);
        let res = match &self.via {
            // The path to that address lives on its own socket (a port-prediction hit).
            Some(v) if v.peer == to => crate::mux::send_now(&v.sock, &pkt, to).map(|_| ()),
            _ => self.ctx.mux.send_probe_with_ttl(to, &pkt, ttl),
        };
        if let Err(e) = res {
            tracing::trace!(%to, ?ttl, error = %e, "probe not sent");
        }
    }

    /// One probe of this end's direction, with the next sequence number.
    fn encode(&mut self, kind: ProbeKind, txid: u64, len: usize) -> Vec<u8> {
        self.seq += 1;
        let p = Probe {
            kind,
            dir: self.own,
            tag: self.tag,
            txid,
            seq: self.seq,
            time_ms: self.clock_ms(),
        };
        probe::encode(&p, &self.key, len)
    }

    /// This end's probe clock: milliseconds since the driver started.
    fn clock_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn on_probe(&mut self, from: SocketAddr, pkt: &[u8]) {
        let now = Instant::now().into_std();
        let stats = self.ctx.mux.stats();
        let now_ms = self.clock_ms();
        let admitted = probe::decode(pkt, &self.key).and_then(|p| {
            match self.guard.admit(&p, now_ms) {
                // A pong to a ping in flight is fresh whatever the peer's clock says (it slept).
                Err(ProbeError::Stale)
                    if p.kind == ProbeKind::Pong && self.paths.expects_pong(from, p.txid) =>
                {
                    self.guard.rebase(&p, now_ms)
                }
                r => r,
            }
            .map(|()| p)
        });
        match admitted {
            Ok(p) if p.kind == ProbeKind::Ping => {
                if self.paths.pong_allowed(from, now) {
                    // As large as the ping: the path carries that size both ways.
                    self.send(from, ProbeKind::Pong, p.txid, pkt.len(), None);
                }
                if self.paths.on_ping(from, now) == PingFrom::NewTarget {
                    tracing::debug!(peer = %self.ctx.peer, %from, "peer-reflexive candidate");
                }
            }
            Ok(p) => {
                if self.easy.as_mut().is_some_and(|e| e.on_pong(from, now)) {
                    // A guessed port answered: it is the hard side's mapping toward us.
                    tracing::info!(peer = %self.ctx.peer, probes = self.easy.as_ref().map_or(0, |e| e.sent()), "guessed the peer's port");
                    self.easy = None;
                    self.paths.on_ping(from, now);
                } else if !self.paths.on_pong(from, p.txid, now) {
                    stats.probes_rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::trace!(%from, "unexpected pong");
                }
            }
            Err(e) => {
                let counter = match e {
                    ProbeError::Replayed => &stats.probes_replayed,
                    ProbeError::Stale => &stats.probes_stale,
                    ProbeError::Reflected => &stats.probes_reflected,
                    _ => &stats.probes_rejected,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %self.ctx.peer, %from, error = %e, "probe rejected");
            }
        }
        self.count_refusals();
    }

    /// Adds what the path set refused since the last call to the socket's counters.
    fn count_refusals(&mut self) {
        let now = self.paths.refused();
        let was = std::mem::replace(&mut self.counted, now);
        let stats = self.ctx.mux.stats();
        stats.probe_targets_refused.fetch_add(
            now.refused_targets.saturating_sub(was.refused_targets),
            Ordering::Relaxed,
        );
        stats.probes_limited.fetch_add(
            (now.pongs_limited + now.prflx_limited)
                .saturating_sub(was.pongs_limited + was.prflx_limited),
            Ordering::Relaxed,
        );
    }

    /// Sends this end's candidates if they changed since the last time.
    fn send_candidates(&mut self, observed: Option<SocketAddr>) {
        let local = quinn::AsyncUdpSocket::local_addr(&*self.ctx.mux).ok();
        let port = local.map_or(0, |a| a.port());
        let bound = local.map(|a| a.ip());
        let uplink = self.ctx.mux.relay_of(self.ctx.vaddr).and_then(route_source);
        let mut list = host_candidates(
            &self.opts.advertise,
            bound,
            uplink,
            port,
            &self.opts.exclude,
        );
        if let Some(o) = observed {
            if !list.iter().any(|c| c.addr == o) {
                list.insert(
                    0,
                    Candidate {
                        addr: o,
                        kind: match self.mapping {
                            Mapping::Independent => CandidateKind::ReflexiveStable,
                            Mapping::Dependent => CandidateKind::ReflexiveVarying,
                            Mapping::Unknown => CandidateKind::Reflexive,
                        },
                    },
                );
            }
        }
        list.truncate(MAX_CANDIDATES);
        let now = Instant::now();
        match send_candidates_when(&list, &self.sent, self.sent_at, self.force, now) {
            SendCandidates::Skip => {
                self.send_due = None;
                return;
            }
            SendCandidates::At(due) => {
                self.send_due = Some(due);
                return;
            }
            SendCandidates::Now => {}
        }
        tracing::debug!(peer = %self.ctx.peer, candidates = ?list, "sending candidates");
        let (channel, control) = self
            .shared
            .relay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let msg = ControlMessage::Candidates {
            channel_id: channel.get(),
            candidates: list.clone(),
        };
        match control.send(msg) {
            Ok(()) => {
                self.status().local_candidates = list.clone();
                self.sent = list;
                self.sent_at = Some(now);
                self.send_due = None;
                self.force = false;
            }
            Err(e) => tracing::debug!(error = %e, "candidates not sent"),
        }
    }

    fn status(&self) -> std::sync::MutexGuard<'_, DirectStatus> {
        self.shared.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the socket about a change of path, and logs it.
    fn apply(&mut self) {
        let selected = self.paths.selected();
        let active = selected.map(|s| s.addr);
        let mut accept: Vec<SocketAddr> = self.paths.confirmed().collect();
        accept.sort();
        let changed = (active, accept.clone()) != self.applied;
        if changed {
            self.ctx.mux.set_direct(self.ctx.vaddr, active, &accept);
        }
        let before = self.applied.0;
        self.applied = (active, accept);
        let mut st = self.status();
        match (before, selected) {
            (None, Some(s)) => {
                st.upgrades += 1;
                tracing::info!(peer = %self.ctx.peer, class = %s.class, rtt_ms = s.rtt.as_secs_f64() * 1000.0, "direct path up");
                tracing::debug!(peer = %self.ctx.peer, addr = %s.addr, "direct path address");
            }
            (Some(_), None) => {
                st.fallbacks += 1;
                tracing::warn!(peer = %self.ctx.peer, "direct path lost; traffic back on the relay");
            }
            (Some(a), Some(s)) if a != s.addr => {
                tracing::info!(peer = %self.ctx.peer, class = %s.class, rtt_ms = s.rtt.as_secs_f64() * 1000.0, "switched to a better direct path");
            }
            _ => {}
        }
        st.addr = active;
        st.class = selected.map(|s| s.class);
        st.rtt_ms = selected.map(|s| s.rtt.as_secs_f64() * 1000.0);
        st.targets = self.paths.snapshot();
    }
}

/// The direction of the probes an end sends: the agent is the inner connection's client.
fn direction_of(side: quinn::Side) -> Direction {
    match side {
        quinn::Side::Client => Direction::AgentToConnector,
        quinn::Side::Server => Direction::ConnectorToAgent,
    }
}

/// Host candidates, in order of preference: the `advertise` list if it is not empty; else the
/// socket's own address if it is bound to one; else `uplink` (the source address of the route to
/// the relay). Loopback, link-local, unspecified and excluded addresses are never offered.
pub fn host_candidates(
    advertise: &[IpAddr],
    bound: Option<IpAddr>,
    uplink: Option<IpAddr>,
    port: u16,
    exclude: &[IpAddr],
) -> Vec<Candidate> {
    let chosen: Vec<IpAddr> = if !advertise.is_empty() {
        advertise.to_vec()
    } else if let Some(ip) = bound.filter(|ip| !ip.is_unspecified()) {
        vec![ip]
    } else {
        uplink.into_iter().collect()
    };
    let mut out: Vec<Candidate> = chosen
        .into_iter()
        .filter(|ip| offerable(ip) && !exclude.contains(ip))
        .map(|ip| Candidate {
            addr: SocketAddr::new(ip, port),
            kind: CandidateKind::Host,
        })
        .collect();
    out.sort_by_key(|c| c.addr);
    out.dedup();
    out.truncate(MAX_CANDIDATES - 1);
    out
}

fn offerable(ip: &IpAddr) -> bool {
    !ip.is_loopback()
        && !ip.is_unspecified()
        && !ip.is_multicast()
        && match ip {
            IpAddr::V4(v4) => !v4.is_link_local() && !v4.is_broadcast(),
            IpAddr::V6(v6) => !v6.is_unicast_link_local(),
        }
}

/// The source address the kernel picks for a packet to `to` (from a throwaway UDP socket that
/// is connected, never used).
pub fn route_source(to: SocketAddr) -> Option<IpAddr> {
    let any: SocketAddr = if to.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(any).ok()?;
    s.connect(to).ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// The networks a connector never probes: every service address, every backend address, and
/// the network of each interface that reaches a backend, unless the relay is reached through
/// the same address (a single-homed connector: then only the addresses).
pub fn refused_networks(
    services: &[IpAddr],
    backends: &[IpAddr],
    relay: Option<SocketAddr>,
) -> Vec<ipnet::IpNet> {
    let interfaces: Vec<ipnet::IpNet> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|i| interface_network(&i.addr))
        .collect();
    let routes: Vec<(IpAddr, Option<IpAddr>)> = backends
        .iter()
        .map(|b| (*b, route_source(SocketAddr::new(*b, 9))))
        .collect();
    refused_networks_from(services, &routes, &interfaces, relay.and_then(route_source))
}

/// [`refused_networks`] without I/O: `backends` pairs each backend with the local address of
/// its route, `interfaces` are the machine's networks, `uplink` the local address of the route
/// to the relay.
pub fn refused_networks_from(
    services: &[IpAddr],
    backends: &[(IpAddr, Option<IpAddr>)],
    interfaces: &[ipnet::IpNet],
    uplink: Option<IpAddr>,
) -> Vec<ipnet::IpNet> {
    let mut out: Vec<ipnet::IpNet> = services
        .iter()
        .chain(backends.iter().map(|(b, _)| b))
        .map(|ip| ipnet::IpNet::from(*ip))
        .collect();
    for (_, local) in backends {
        let Some(local) = local.filter(|l| Some(*l) != uplink && !l.is_loopback()) else {
            continue;
        };
        out.extend(
            interfaces
                .iter()
                .filter(|n| n.contains(&local))
                .map(|n| n.trunc()),
        );
    }
    out.sort();
    out.dedup();
    out
}

fn interface_network(addr: &if_addrs::IfAddr) -> Option<ipnet::IpNet> {
    match addr {
        if_addrs::IfAddr::V4(a) => {
            let prefix = u32::from(a.netmask).leading_ones() as u8;
            ipnet::Ipv4Net::new(a.ip, prefix).ok().map(ipnet::IpNet::V4)
        }
        if_addrs::IfAddr::V6(a) => {
            let prefix = u128::from(a.netmask).leading_ones() as u8;
            ipnet::Ipv6Net::new(a.ip, prefix).ok().map(ipnet::IpNet::V6)
        }
    }
}

/// The peer's candidates this end's socket can send to: IPv4 ones on an IPv4 socket, IPv6 ones
/// on an IPv6 socket (as the relay list is resolved). An IPv4-mapped IPv6 address counts as the
/// IPv4 address it maps.
fn same_family(list: Vec<Candidate>, v4: bool) -> Vec<Candidate> {
    list.into_iter()
        .map(|mut c| {
            c.addr = ztna_proto::observe::canonical(c.addr);
            c
        })
        .filter(|c| c.addr.is_ipv4() == v4)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_candidates_of_the_sockets_family_are_probed() {
        let c = |a: &str| Candidate {
            addr: a.parse().unwrap(),
            kind: CandidateKind::Host,
        };
        let list = vec![
            c("192.168.2.2:4434"),
            c("[::ffff:10.10.0.13]:4434"),
            c("[2001:db8:2::2]:4434"),
        ];
        let v4: Vec<String> = same_family(list.clone(), true)
            .iter()
            .map(|c| c.addr.to_string())
            .collect();
        assert_eq!(v4, ["192.168.2.2:4434", "10.10.0.13:4434"]);
        let v6: Vec<String> = same_family(list, false)
            .iter()
            .map(|c| c.addr.to_string())
            .collect();
        assert_eq!(v6, ["[2001:db8:2::2]:4434"]);
    }

    #[test]
    fn host_candidates_are_chosen_never_every_interface() {
        let c = |s: &str| Candidate {
            addr: s.parse().unwrap(),
            kind: CandidateKind::Host,
        };
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let any = Some(ip("0.0.0.0"));
        let uplink = Some(ip("10.10.0.3"));
        // Bound to all interfaces: the uplink only (not 10.10.3.1, a backend network).
        assert_eq!(
            host_candidates(&[], any, uplink, 4434, &[]),
            vec![c("10.10.0.3:4434")]
        );
        // An explicit list wins; unusable and excluded addresses are dropped from it.
        assert_eq!(
            host_candidates(
                &[
                    ip("192.0.2.7"),
                    ip("127.0.0.1"),
                    ip("169.254.1.1"),
                    ip("198.51.100.2")
                ],
                any,
                uplink,
                5,
                &[ip("198.51.100.2")]
            ),
            vec![c("192.0.2.7:5")]
        );
        // Bound to one address: that one.
        assert_eq!(
            host_candidates(&[], Some(ip("192.0.2.9")), uplink, 7, &[]),
            vec![c("192.0.2.9:7")]
        );
        // No route to the relay, or one through the tunnel's own address: nothing.
        assert!(host_candidates(&[], any, None, 7, &[]).is_empty());
        assert!(
            host_candidates(&[], any, Some(ip("100.64.0.2")), 7, &[ip("100.64.0.2")]).is_empty()
        );
        assert!(host_candidates(&[], any, Some(ip("127.0.0.1")), 7, &[]).is_empty());
    }

    #[test]
    fn each_end_admits_the_other_ends_probes_only() {
        // The driver's guard is built for its own direction: the connector (server) admits the
        // agent's probes and refuses its own reflected back.
        let probe = |dir| Probe {
            kind: ProbeKind::Ping,
            dir,
            tag: [0; 8],
            txid: 1,
            seq: 1,
            time_ms: 0,
        };
        for (side, peer) in [
            (quinn::Side::Server, Direction::AgentToConnector),
            (quinn::Side::Client, Direction::ConnectorToAgent),
        ] {
            let own = direction_of(side);
            assert_eq!(own, peer.reverse());
            let mut g = ReplayGuard::new(own, probe::MAX_AGE_MS);
            assert_eq!(g.admit(&probe(own), 0), Err(ProbeError::Reflected));
            assert_eq!(g.admit(&probe(peer), 0), Ok(()));
        }
    }

    #[test]
    fn route_source_is_the_local_end_of_a_route() {
        // Loopback always routes from loopback.
        assert_eq!(
            route_source("127.0.0.1:9".parse().unwrap()),
            Some(ip4(127, 0, 0, 1))
        );
    }

    #[test]
    fn refused_networks_cover_services_backends_and_backend_side_networks() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let net = |s: &str| -> ipnet::IpNet { s.parse().unwrap() };
        let interfaces = [net("10.10.0.3/24"), net("10.10.3.1/24"), net("127.0.0.1/8")];
        // Two-legged connector: the backend side's network is refused, the uplink's is not.
        let r = refused_networks_from(
            &[ip("10.100.0.1")],
            &[(ip("10.10.3.2"), Some(ip("10.10.3.1")))],
            &interfaces,
            Some(ip("10.10.0.3")),
        );
        assert_eq!(
            r,
            vec![
                net("10.10.3.0/24"),
                net("10.10.3.2/32"),
                net("10.100.0.1/32")
            ]
        );
        // Single-homed (backends reached from the uplink address), or a loopback backend: only
        // the addresses.
        let r = refused_networks_from(
            &[ip("10.100.0.1")],
            &[
                (ip("10.10.0.9"), Some(ip("10.10.0.3"))),
                (ip("127.0.0.1"), Some(ip("127.0.0.1"))),
            ],
            &interfaces,
            Some(ip("10.10.0.3")),
        );
        assert_eq!(
            r,
            vec![
                net("10.10.0.9/32"),
                net("10.100.0.1/32"),
                net("127.0.0.1/32")
            ]
        );
    }

    #[test]
    fn a_network_change_sends_candidates_at_once_even_if_unchanged() {
        let c = |s: &str| Candidate {
            addr: s.parse().unwrap(),
            kind: CandidateKind::Host,
        };
        let (a, b) = (vec![c("192.0.2.1:5000")], vec![c("198.51.100.7:5000")]);
        let t0 = Instant::now();
        let long_ago = Some(t0 - Duration::from_secs(10));
        let just_now = Some(t0 - Duration::from_millis(100));
        let when = |list: &[Candidate], at, force| send_candidates_when(list, &a, at, force, t0);
        // The periodic refresh: the same list is not sent again, a new one is.
        assert_eq!(when(&a, long_ago, false), SendCandidates::Skip);
        assert_eq!(when(&b, long_ago, false), SendCandidates::Now);
        // The platform's trigger: sent even though the list looks the same.
        assert_eq!(when(&a, long_ago, true), SendCandidates::Now);
        assert_eq!(when(&a, None, true), SendCandidates::Now);
        // Never faster than the relay takes lists, forced or not.
        let due = t0 - Duration::from_millis(100) + CANDIDATES_INTERVAL;
        assert_eq!(when(&a, just_now, true), SendCandidates::At(due));
        assert_eq!(when(&b, just_now, false), SendCandidates::At(due));
    }

    fn ip4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d))
    }
}
