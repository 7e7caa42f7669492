//! The direct-path driver of one end-to-end connection: it runs [`crate::path::PathSet`] over
//! the process's one UDP socket ([`MuxSocket`]).
//!
//! Both ends start one when their inner connection is up. Each sends its candidates (host
//! addresses of the socket, plus the address the relay observed) to the relay, which forwards
//! them to the other end; each then probes the other's candidates at once, with probes keyed
//! from the inner connection's TLS exporter, so only the two ends can make or check them. When
//! a path is confirmed the socket sends the connection's packets straight to the peer; when it
//! goes quiet the socket falls back to the relay channel, which stays open throughout.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use ztna_proto::control::{ControlMessage, MAX_CANDIDATES};
use ztna_proto::probe::{self, Probe, ProbeKey, ProbeKind, Tag};
use ztna_proto::{Candidate, CandidateKind, ChannelId};

use crate::mux::{MuxSocket, PROBE_QUEUE};
use crate::path::{Action, PathClass, PathSet, PathTiming, TargetStatus};
use crate::session::ControlSender;

/// TLS exporter label of the probe tag and key.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-ztna-direct-path-probe";
/// How often host addresses are looked at again (they change when a laptop roams).
const HOST_REFRESH: Duration = Duration::from_secs(5);
/// Size of a keepalive probe.
const SMALL_PROBE: usize = 64;
/// Least time between two candidate lists sent (the relay drops lists that come faster than
/// one per 100 ms from one end of a channel).
const CANDIDATES_INTERVAL: Duration = Duration::from_millis(250);

/// Settings of direct paths.
#[derive(Debug, Clone)]
pub struct DirectOptions {
    /// Whether to look for direct paths at all (off: everything goes through the relay).
    pub enabled: bool,
    /// Probing and selection timing.
    pub timing: PathTiming,
    /// Addresses never offered as host candidates (e.g. the agent's own tunnel IP).
    pub exclude: Vec<IpAddr>,
}

impl Default for DirectOptions {
    fn default() -> Self {
        Self {
            enabled: true,
            timing: PathTiming::default(),
            exclude: Vec::new(),
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
            peer_candidates,
            observed,
        });
        let (probe_tx, probe_rx) = mpsc::channel(PROBE_QUEUE);
        ctx.mux.register_probes(tag, probe_tx);
        let (mux, vaddr) = (ctx.mux.clone(), ctx.vaddr);
        let driver = Driver {
            shared: shared.clone(),
            ctx,
            opts: opts.clone(),
            key,
            tag,
            conn: conn.clone(),
            paths: PathSet::new(opts.timing, seed()),
            applied: (None, Vec::new()),
            sent: Vec::new(),
            sent_at: None,
            send_due: None,
        };
        let task = tokio::spawn(driver.run(peer_rx, observed_rx, probe_rx));
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

    /// The relay observed a new address for this end.
    pub fn set_observed(&self, addr: SocketAddr) {
        self.shared.observed.send_replace(Some(addr));
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
    paths: PathSet,
    /// What the socket was last told: the active address and the accepted ones.
    applied: (Option<SocketAddr>, Vec<SocketAddr>),
    /// The candidates last sent, and when.
    sent: Vec<Candidate>,
    sent_at: Option<Instant>,
    /// A changed list waits until then, so lists are never sent faster than the relay takes them.
    send_due: Option<Instant>,
}

impl Driver {
    async fn run(
        mut self,
        mut peer_rx: watch::Receiver<Option<Vec<Candidate>>>,
        mut observed_rx: watch::Receiver<Option<SocketAddr>>,
        mut probe_rx: mpsc::Receiver<(SocketAddr, Bytes)>,
    ) {
        let conn = self.conn.clone();
        let closed = conn.closed();
        tokio::pin!(closed);
        let mut refresh = tokio::time::interval(HOST_REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self
                .paths
                .next_deadline()
                .map(Instant::from_std)
                .into_iter()
                .chain(self.send_due)
                .min()
                .unwrap_or_else(|| Instant::now() + HOST_REFRESH);
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    if self.send_due.is_some_and(|d| d <= Instant::now()) {
                        self.send_candidates(*observed_rx.borrow());
                    }
                }
                Some((from, pkt)) = probe_rx.recv() => self.on_probe(from, &pkt),
                r = peer_rx.changed() => {
                    if r.is_err() { return; }
                    let list = peer_rx.borrow_and_update().clone().unwrap_or_default();
                    tracing::debug!(peer = %self.ctx.peer, candidates = ?list, "peer candidates");
                    self.paths.set_candidates(&list, Instant::now().into_std());
                }
                r = observed_rx.changed() => {
                    if r.is_err() { return; }
                    self.send_candidates(*observed_rx.borrow_and_update());
                }
                _ = refresh.tick() => self.send_candidates(*observed_rx.borrow()),
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
                let ping = Probe {
                    kind: ProbeKind::Ping,
                    tag: self.tag,
                    txid,
                };
                let pkt = probe::encode(&ping, &self.key, len);
                if let Err(e) = self.ctx.mux.send_probe_with_ttl(to, &pkt, ttl) {
                    tracing::trace!(%to, ?ttl, error = %e, "probe not sent");
                }
            }
            self.apply();
        }
    }

    fn send(&self, to: SocketAddr, pkt: &[u8]) {
        if let Err(e) = self.ctx.mux.send_probe(to, pkt) {
            tracing::trace!(%to, error = %e, "probe not sent");
        }
    }

    fn on_probe(&mut self, from: SocketAddr, pkt: &[u8]) {
        let now = Instant::now().into_std();
        let stats = self.ctx.mux.stats();
        match probe::decode(pkt, &self.key) {
            Ok(p) if p.kind == ProbeKind::Ping => {
                let pong = Probe {
                    kind: ProbeKind::Pong,
                    ..p
                };
                // As large as the ping: the path carries that size both ways.
                self.send(from, &probe::encode(&pong, &self.key, pkt.len()));
                if self.paths.on_ping(from, now) {
                    tracing::debug!(peer = %self.ctx.peer, %from, "peer-reflexive candidate");
                }
            }
            Ok(p) => {
                if !self.paths.on_pong(from, p.txid, now) {
                    stats.probes_rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::trace!(%from, "unexpected pong");
                }
            }
            Err(e) => {
                stats.probes_rejected.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %self.ctx.peer, %from, error = %e, "probe rejected");
            }
        }
    }

    /// Sends this end's candidates if they changed since the last time.
    fn send_candidates(&mut self, observed: Option<SocketAddr>) {
        let local = quinn::AsyncUdpSocket::local_addr(&*self.ctx.mux).ok();
        let port = local.map_or(0, |a| a.port());
        let bound = local.map(|a| a.ip());
        let mut list = host_candidates(bound, port, &self.opts.exclude);
        if let Some(o) = observed {
            if !list.iter().any(|c| c.addr == o) {
                list.insert(
                    0,
                    Candidate {
                        addr: o,
                        kind: CandidateKind::Reflexive,
                    },
                );
            }
        }
        list.truncate(MAX_CANDIDATES);
        if list == self.sent {
            self.send_due = None;
            return;
        }
        let now = Instant::now();
        if let Some(at) = self.sent_at.filter(|at| now < *at + CANDIDATES_INTERVAL) {
            self.send_due = Some(at + CANDIDATES_INTERVAL);
            return;
        }
        tracing::debug!(peer = %self.ctx.peer, candidates = ?list, "sending candidates");
        let msg = ControlMessage::Candidates {
            channel_id: self.ctx.channel.get(),
            candidates: list.clone(),
        };
        match self.ctx.control.send(msg) {
            Ok(()) => {
                self.status().local_candidates = list.clone();
                self.sent = list;
                self.sent_at = Some(now);
                self.send_due = None;
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
                tracing::info!(peer = %self.ctx.peer, channel = %self.ctx.channel, class = %s.class, rtt_ms = s.rtt.as_secs_f64() * 1000.0, "direct path up");
                tracing::debug!(peer = %self.ctx.peer, addr = %s.addr, "direct path address");
            }
            (Some(_), None) => {
                st.fallbacks += 1;
                tracing::warn!(peer = %self.ctx.peer, channel = %self.ctx.channel, "direct path lost; traffic back on the relay");
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

/// Host candidates: the socket's own address if it is bound to one, else every usable IPv4
/// address of the machine's interfaces (not loopback, not link-local, not excluded).
pub fn host_candidates(bound: Option<IpAddr>, port: u16, exclude: &[IpAddr]) -> Vec<Candidate> {
    let host = |ip: IpAddr| Candidate {
        addr: SocketAddr::new(ip, port),
        kind: CandidateKind::Host,
    };
    if let Some(ip) = bound.filter(|ip| !ip.is_unspecified()) {
        return vec![host(ip)];
    }
    let v6 = bound.is_some_and(|ip| ip.is_ipv6());
    let mut out: Vec<Candidate> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.ip())
        .filter(|ip| ip.is_ipv6() == v6 && !ip.is_loopback() && !exclude.contains(ip))
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_link_local(),
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
        })
        .map(host)
        .collect();
    out.sort_by_key(|c| c.addr);
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_candidates_respect_binding_and_exclusions() {
        let bound: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(
            host_candidates(Some(bound), 4434, &[]),
            vec![Candidate {
                addr: "192.0.2.7:4434".parse().unwrap(),
                kind: CandidateKind::Host
            }]
        );
        let any: IpAddr = "0.0.0.0".parse().unwrap();
        let all = host_candidates(Some(any), 5, &[]);
        assert!(all
            .iter()
            .all(|c| c.addr.is_ipv4() && !c.addr.ip().is_loopback() && c.addr.port() == 5));
        if let Some(first) = all.first() {
            let fewer = host_candidates(Some(any), 5, &[first.addr.ip()]);
            assert!(!fewer.contains(first));
        }
    }
}
