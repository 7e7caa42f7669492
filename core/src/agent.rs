//! The agent tunnel, platform neutral: packets come in through [`Agent::send_packet`] and go out
//! through the receiver [`Agent::start`] returns; the platform (a Linux TUN device, the macOS
//! packet flow) only moves them and applies [`TunnelState`] (address and routes).
//!
//! The agent holds one relay session at a time (reconnecting with backoff), opens one channel
//! per connector in its catalog, and runs one inner QUIC connection (ALPN `ztna-tunnel/1`,
//! mutual TLS, IP packets as datagrams) over each channel's virtual peer address.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use ztna_proto::control::{ControlMessage, ErrorCode, Hello, Role};
use ztna_proto::{Candidate, ChannelId, ServiceDef, ALPN_TUNNEL};

use crate::backoff::{jitter_seed, Backoff};
use crate::direct::{DirectContext, DirectOptions, DirectPath, DirectStatus};
use crate::session::{Node, RelaySession, RelayTarget, SessionError};
use crate::tls::{Credentials, PeerIdentity};
use crate::transport::{self, Timing};

/// Packets queued towards the platform before new ones are dropped.
const TO_PLATFORM_QUEUE: usize = 4096;
/// How long the relay may take to answer a channel request before the agent asks again.
const CHANNEL_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Wait before asking again for a channel the relay could not open.
const CHANNEL_RETRY: Duration = Duration::from_secs(1);

/// What the agent needs to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The relay.
    pub relay: RelayTarget,
    /// Local UDP address to bind (port 0 for any).
    pub bind: SocketAddr,
    /// The agent's certificate, key and CA.
    pub credentials: Credentials,
    /// Keepalive and idle timing of both connection layers.
    pub timing: Timing,
    /// MTU of the platform's tunnel device.
    pub tun_mtu: u16,
    /// Service names asked for (empty: all that policy allows).
    pub want: Vec<String>,
    /// Direct paths to connectors (hole punching); off sends everything through the relay.
    pub direct: DirectOptions,
}

/// What the platform must configure: the tunnel address and one route per service address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelState {
    /// The tunnel IP the relay assigned, once known.
    pub tunnel_ip: Option<Ipv4Addr>,
    /// Services reachable now.
    pub services: Vec<ServiceDef>,
}

/// A service the relay refused to give this agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedService {
    /// Service name.
    pub name: String,
    /// Error code, as text.
    pub code: String,
    /// The relay's explanation.
    pub message: String,
}

/// One connector as the agent sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectorStatus {
    /// Connector identity.
    pub name: String,
    /// `direct-lan` or `direct-wan` (inner connection up over a direct path), `relay` (up over
    /// the relay channel), `connecting`, or `down`.
    pub path: String,
    /// Relay channel id, when one is open.
    pub channel_id: Option<u32>,
    /// Smoothed RTT of the inner connection.
    pub rtt_ms: Option<f64>,
    /// Bytes sent to this connector.
    pub tx_bytes: u64,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Names of the services it serves to this agent.
    pub services: Vec<String>,
    /// Last error on this connector's path.
    pub last_error: Option<String>,
    /// Packets sent and received through the relay channel: `[tx, rx]`.
    pub relay_packets: [u64; 2],
    /// Packets sent and received on direct paths: `[tx, rx]`.
    pub direct_packets: [u64; 2],
    /// Direct-path state: candidates, probed addresses, the active one and its RTT.
    pub direct: Option<DirectStatus>,
}

/// A snapshot for `ztna-agent status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Relay address.
    pub relay: String,
    /// Whether a relay session is up.
    pub connected: bool,
    /// Identity from the agent's certificate.
    pub identity: String,
    /// Tunnel IP.
    pub tunnel_ip: Option<Ipv4Addr>,
    /// This agent's address as the relay sees it.
    pub observed_addr: Option<SocketAddr>,
    /// Smoothed RTT to the relay.
    pub relay_rtt_ms: Option<f64>,
    /// TUN MTU.
    pub mtu: u16,
    /// Wanted services that policy denied.
    pub rejected: Vec<RejectedService>,
    /// Connectors.
    pub connectors: Vec<ConnectorStatus>,
    /// Packets from the platform with no service route (or not IPv4).
    pub dropped_no_route: u64,
    /// Packets to a routed service whose connector tunnel is not up (yet).
    pub dropped_tunnel_down: u64,
    /// Packets towards the platform dropped because it was not reading.
    pub dropped_to_platform: u64,
    /// Relay sessions established since start.
    pub relay_sessions: u64,
    /// Last relay error.
    pub last_error: Option<String>,
}

#[derive(Default)]
struct LinkCounters {
    tx_bytes: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    rx_packets: AtomicU64,
}

/// The agent's path to one connector.
struct Link {
    name: String,
    conn: RwLock<Option<quinn::Connection>>,
    counters: LinkCounters,
}

#[derive(Default)]
struct LinkControl {
    request_id: Option<u32>,
    channel: Option<ChannelId>,
    vaddr: Option<SocketAddr>,
    last_error: Option<String>,
    reader: Option<JoinHandle<()>>,
    direct: Option<DirectPath>,
    /// Candidates that arrived before the inner connection was up.
    pending_candidates: Option<Vec<Candidate>>,
}

impl LinkControl {
    /// Forgets the channel's path state (the channel is gone or going).
    fn clear_path(&mut self) {
        if let Some(r) = self.reader.take() {
            r.abort();
        }
        self.direct = None;
        self.pending_candidates = None;
    }
}

struct Shared {
    cfg: AgentConfig,
    routes: RwLock<HashMap<Ipv4Addr, Arc<Link>>>,
    links: RwLock<HashMap<String, Arc<Link>>>,
    control: Mutex<HashMap<String, LinkControl>>,
    info: Mutex<Info>,
    dropped_no_route: AtomicU64,
    dropped_tunnel_down: AtomicU64,
    dropped_to_platform: AtomicU64,
    to_platform: mpsc::Sender<Bytes>,
    state_tx: watch::Sender<TunnelState>,
}

#[derive(Default)]
struct Info {
    connected: bool,
    session_conn: Option<quinn::Connection>,
    observed_addr: Option<SocketAddr>,
    tunnel_ip: Option<Ipv4Addr>,
    rejected: Vec<RejectedService>,
    services: Vec<ServiceDef>,
    relay_sessions: u64,
    last_error: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The destination of an IPv4 packet, if it is one.
fn ipv4_destination(packet: &[u8]) -> Option<Ipv4Addr> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    Some(Ipv4Addr::new(
        packet[16], packet[17], packet[18], packet[19],
    ))
}

/// A running agent tunnel.
pub struct Agent {
    shared: Arc<Shared>,
    node: Node,
    task: JoinHandle<()>,
}

impl Agent {
    /// Binds the socket and starts the tunnel in the current tokio runtime. Returns the agent
    /// and the receiver of packets for the platform's tunnel device.
    pub fn start(cfg: AgentConfig) -> std::io::Result<(Agent, mpsc::Receiver<Bytes>)> {
        let node = Node::bind(cfg.bind, cfg.credentials.clone(), cfg.timing)?;
        let (to_platform, rx) = mpsc::channel(TO_PLATFORM_QUEUE);
        let (state_tx, _) = watch::channel(TunnelState::default());
        let shared = Arc::new(Shared {
            cfg,
            routes: RwLock::default(),
            links: RwLock::default(),
            control: Mutex::default(),
            info: Mutex::default(),
            dropped_no_route: AtomicU64::new(0),
            dropped_tunnel_down: AtomicU64::new(0),
            dropped_to_platform: AtomicU64::new(0),
            to_platform,
            state_tx,
        });
        let task = tokio::spawn(supervise(shared.clone(), node.clone()));
        Ok((Agent { shared, node, task }, rx))
    }

    /// Sends one IP packet from the platform into the tunnel. Never blocks; packets with no
    /// route are dropped and counted.
    pub fn send_packet(&self, packet: Bytes) {
        let link = ipv4_destination(&packet).and_then(|dst| {
            let routes = self.shared.routes.read().unwrap_or_else(|p| p.into_inner());
            routes.get(&dst).cloned()
        });
        let Some(link) = link else {
            self.shared.dropped_no_route.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let conn = link.conn.read().unwrap_or_else(|p| p.into_inner()).clone();
        let len = packet.len() as u64;
        match conn.map(|c| c.send_datagram(packet)) {
            Some(Ok(())) => {
                link.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
                link.counters.tx_bytes.fetch_add(len, Ordering::Relaxed);
            }
            Some(Err(e)) => {
                tracing::trace!(connector = %link.name, error = %e, "inner send failed")
            }
            None => {
                self.shared
                    .dropped_tunnel_down
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Watches what the platform must configure.
    pub fn state(&self) -> watch::Receiver<TunnelState> {
        self.shared.state_tx.subscribe()
    }

    /// A status snapshot.
    pub fn status(&self) -> AgentStatus {
        let sh = &self.shared;
        // Lock order everywhere: links, routes, control, info.
        let links = sh.links.read().unwrap_or_else(|p| p.into_inner());
        let control = lock(&sh.control);
        let info = lock(&sh.info);
        let mut connectors: Vec<ConnectorStatus> = links
            .values()
            .map(|l| {
                let conn = l.conn.read().unwrap_or_else(|p| p.into_inner()).clone();
                let ctl = control.get(&l.name);
                let direct = ctl.and_then(|c| c.direct.as_ref()).map(|d| d.status());
                let path = match (
                    &conn,
                    ctl.and_then(|c| c.request_id.or(c.channel.map(|c| c.get()))),
                ) {
                    (Some(_), _) => match direct.as_ref().and_then(|d| d.class) {
                        Some(crate::path::PathClass::Lan) => "direct-lan",
                        Some(crate::path::PathClass::Wan) => "direct-wan",
                        None => "relay",
                    },
                    (None, Some(_)) => "connecting",
                    (None, None) => "down",
                };
                let counters = ctl
                    .and_then(|c| c.vaddr)
                    .and_then(|v| self.node.mux().route_counters(v));
                let get = |f: fn(&crate::mux::RouteCounters) -> &AtomicU64| {
                    counters
                        .as_ref()
                        .map_or(0, |c| f(c).load(Ordering::Relaxed))
                };
                ConnectorStatus {
                    name: l.name.clone(),
                    path: path.into(),
                    channel_id: ctl.and_then(|c| c.channel).map(|c| c.get()),
                    rtt_ms: conn.as_ref().map(|c| c.rtt().as_secs_f64() * 1000.0),
                    tx_bytes: l.counters.tx_bytes.load(Ordering::Relaxed),
                    rx_bytes: l.counters.rx_bytes.load(Ordering::Relaxed),
                    tx_packets: l.counters.tx_packets.load(Ordering::Relaxed),
                    rx_packets: l.counters.rx_packets.load(Ordering::Relaxed),
                    services: info
                        .services
                        .iter()
                        .filter(|s| s.connector == l.name)
                        .map(|s| s.name.clone())
                        .collect(),
                    last_error: ctl.and_then(|c| c.last_error.clone()),
                    relay_packets: [get(|c| &c.relay_tx), get(|c| &c.relay_rx)],
                    direct_packets: [get(|c| &c.direct_tx), get(|c| &c.direct_rx)],
                    direct,
                }
            })
            .collect();
        connectors.sort_by(|a, b| a.name.cmp(&b.name));
        AgentStatus {
            relay: sh.cfg.relay.addr.to_string(),
            connected: info.connected,
            identity: sh.cfg.credentials.identity().name.clone(),
            tunnel_ip: info.tunnel_ip,
            observed_addr: info.observed_addr,
            relay_rtt_ms: info
                .session_conn
                .as_ref()
                .filter(|_| info.connected)
                .map(|c| c.rtt().as_secs_f64() * 1000.0),
            mtu: sh.cfg.tun_mtu,
            rejected: info.rejected.clone(),
            connectors,
            dropped_no_route: sh.dropped_no_route.load(Ordering::Relaxed),
            dropped_tunnel_down: sh.dropped_tunnel_down.load(Ordering::Relaxed),
            dropped_to_platform: sh.dropped_to_platform.load(Ordering::Relaxed),
            relay_sessions: info.relay_sessions,
            last_error: info.last_error.clone(),
        }
    }

    /// Stops the tunnel: closes the inner connections and the relay session, and waits (briefly)
    /// for the close to go out.
    pub async fn shutdown(self) {
        self.task.abort();
        let _ = self.task.await;
        close_all_links(&self.shared, "agent shutting down");
        self.node
            .endpoint()
            .close(0u32.into(), b"agent shutting down");
        let _ =
            tokio::time::timeout(Duration::from_secs(1), self.node.endpoint().wait_idle()).await;
    }
}

enum Event {
    InnerUp {
        connector: String,
        channel: ChannelId,
        conn: quinn::Connection,
    },
    InnerDown {
        connector: String,
        channel: ChannelId,
        error: String,
    },
    Retry {
        connector: String,
    },
    RequestTimeout {
        connector: String,
        request_id: u32,
    },
}

async fn supervise(sh: Arc<Shared>, node: Node) {
    let mut backoff = Backoff::default();
    let mut seed = jitter_seed();
    let hello = Hello {
        role: Role::Agent,
        services: vec![],
        want: sh.cfg.want.clone(),
        software: software(),
    };
    loop {
        tracing::debug!(relay = %sh.cfg.relay.addr, "connecting to the relay");
        match node.connect_relay(&sh.cfg.relay, hello.clone()).await {
            Ok(session) => {
                backoff.reset();
                let err = run_session(&sh, &node, session).await;
                tracing::warn!(error = %err, "relay session ended; reconnecting");
                lock(&sh.info).last_error = Some(err.to_string());
            }
            Err(e) => {
                tracing::error!(relay = %sh.cfg.relay.addr, error = %e, attempt = backoff.attempts() + 1, "could not connect to the relay");
                lock(&sh.info).last_error = Some(e.to_string());
            }
        }
        {
            let mut info = lock(&sh.info);
            info.connected = false;
        }
        close_all_links(&sh, "relay session lost");
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        tokio::time::sleep(backoff.next_delay(seed >> 33)).await;
    }
}

fn software() -> String {
    format!("ztna-agent/{}", env!("CARGO_PKG_VERSION"))
}

fn close_all_links(sh: &Shared, why: &str) {
    let links: Vec<Arc<Link>> = sh
        .links
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .cloned()
        .collect();
    for l in links {
        if let Some(c) = l.conn.write().unwrap_or_else(|p| p.into_inner()).take() {
            c.close(0u32.into(), why.as_bytes());
        }
    }
    let mut control = lock(&sh.control);
    for (_, c) in control.iter_mut() {
        c.clear_path();
        c.request_id = None;
        c.channel = None;
        c.vaddr = None;
    }
}

async fn run_session(sh: &Arc<Shared>, node: &Node, mut session: RelaySession) -> SessionError {
    let welcome = session.welcome().clone();
    let outer_max = session.max_datagram_size();
    let inner_mtu = transport::inner_mtu(outer_max.unwrap_or(0));
    if let Err(e) = transport::check_outer(outer_max, inner_mtu) {
        tracing::error!(error = %e, "the relay path cannot carry the tunnel");
        return SessionError::Protocol(e.to_string());
    }
    {
        let mut info = lock(&sh.info);
        info.connected = true;
        info.relay_sessions += 1;
        info.session_conn = Some(session.connection().clone());
        info.observed_addr = Some(welcome.observed_addr);
        info.tunnel_ip = welcome.tunnel_ip;
        info.last_error = None;
        info.rejected = welcome
            .rejected
            .iter()
            .map(|r| RejectedService {
                name: r.name.clone(),
                code: r.code.to_string(),
                message: r.message.clone(),
            })
            .collect();
    }
    tracing::info!(
        identity = %welcome.identity,
        tunnel_ip = ?welcome.tunnel_ip,
        observed = %welcome.observed_addr,
        services = welcome.services.len(),
        inner_mtu,
        "connected to the relay"
    );
    for r in &welcome.rejected {
        tracing::error!(service = %r.name, code = %r.code, "relay refused service: {}", r.message);
    }
    let (ev_tx, mut ev_rx) = mpsc::channel::<Event>(256);
    let mut next_request = 1u32;
    apply_catalog(
        sh,
        &session,
        welcome.services.clone(),
        &mut next_request,
        &ev_tx,
    );
    loop {
        tokio::select! {
            msg = session.recv() => {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => return e,
                };
                match msg {
                    ControlMessage::Catalog(services) => {
                        tracing::info!(services = services.len(), "service catalog updated");
                        apply_catalog(sh, &session, services, &mut next_request, &ev_tx);
                    }
                    ControlMessage::ObservedAddress(a) => {
                        tracing::info!("relay observed a new address for this agent");
                        tracing::debug!(observed = %a, "new observed address");
                        lock(&sh.info).observed_addr = Some(a);
                        for d in lock(&sh.control).values().filter_map(|c| c.direct.as_ref()) {
                            d.set_observed(a);
                        }
                    }
                    ControlMessage::Candidates { channel_id, candidates } => {
                        let mut control = lock(&sh.control);
                        match control.values_mut().find(|c| c.channel.map(|c| c.get()) == Some(channel_id)) {
                            Some(ctl) => match &ctl.direct {
                                Some(d) => d.set_peer_candidates(candidates),
                                None => ctl.pending_candidates = Some(candidates),
                            },
                            None => tracing::debug!(channel_id, "candidates for an unknown channel; ignored"),
                        }
                    }
                    ControlMessage::ChannelOpened { request_id, channel_id, connector } => {
                        let Some(channel) = ChannelId::new(channel_id) else {
                            return SessionError::Protocol(format!("channel id {channel_id} out of range"));
                        };
                        let mut control = lock(&sh.control);
                        let Some(ctl) = control.get_mut(&connector).filter(|c| c.request_id == Some(request_id)) else {
                            tracing::debug!(%connector, request_id, "stale channel answer; closing it");
                            let _ = session.send(ControlMessage::ChannelClosed { channel_id, code: ErrorCode::PeerGone });
                            continue;
                        };
                        let vaddr = session.attach_channel(channel);
                        ctl.request_id = None;
                        ctl.channel = Some(channel);
                        ctl.vaddr = Some(vaddr);
                        drop(control);
                        tracing::debug!(%connector, %channel, "channel open; starting the inner connection");
                        tokio::spawn(connect_inner(node.clone(), connector, channel, vaddr, inner_mtu, sh.cfg.tun_mtu, ev_tx.clone()));
                    }
                    ControlMessage::ChannelClosed { channel_id, code } => {
                        let connector = {
                            let control = lock(&sh.control);
                            control.iter().find(|(_, c)| c.channel.map(|c| c.get()) == Some(channel_id)).map(|(n, _)| n.clone())
                        };
                        if let Some(connector) = connector {
                            tracing::warn!(%connector, channel_id, %code, "relay closed the channel");
                            link_down(sh, &session, &connector, format!("channel closed: {code}"), &ev_tx);
                        }
                    }
                    ControlMessage::Error { code, request_id, message } => {
                        let connector = request_id.and_then(|id| {
                            let control = lock(&sh.control);
                            control.iter().find(|(_, c)| c.request_id == Some(id)).map(|(n, _)| n.clone())
                        });
                        match connector {
                            Some(connector) => {
                                tracing::warn!(%connector, %code, "relay could not open a channel: {message}");
                                link_down(sh, &session, &connector, format!("{code}: {message}"), &ev_tx);
                            }
                            None => tracing::error!(%code, "relay reported an error: {message}"),
                        }
                    }
                    other => tracing::warn!(kind = other.kind(), "unexpected control message from the relay; ignored"),
                }
            }
            Some(ev) = ev_rx.recv() => match ev {
                Event::InnerUp { connector, channel, conn } => {
                    let current = lock(&sh.control).get(&connector).and_then(|c| c.channel) == Some(channel);
                    let link = sh.links.read().unwrap_or_else(|p| p.into_inner()).get(&connector).cloned();
                    match (current, link) {
                        (true, Some(link)) => {
                            tracing::info!(%connector, %channel, rtt_ms = conn.rtt().as_millis() as u64, "tunnel to connector up (relay path)");
                            *link.conn.write().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
                            let reader = tokio::spawn(read_inner(sh.clone(), link, conn.clone(), channel, ev_tx.clone()));
                            let (observed, tunnel_ip) = {
                                let info = lock(&sh.info);
                                (info.observed_addr, info.tunnel_ip)
                            };
                            if let Some(ctl) = lock(&sh.control).get_mut(&connector) {
                                ctl.last_error = None;
                                if let Some(old) = ctl.reader.replace(reader) {
                                    old.abort();
                                }
                                ctl.direct = None;
                                if let (true, Some(vaddr)) = (sh.cfg.direct.enabled, ctl.vaddr) {
                                    let mut opts = sh.cfg.direct.clone();
                                    opts.exclude.extend(tunnel_ip.map(std::net::IpAddr::V4));
                                    let ctx = DirectContext {
                                        mux: node.mux().clone(),
                                        vaddr,
                                        channel,
                                        control: session.control_sender(),
                                        observed,
                                        full_probe_len: usize::from(inner_mtu),
                                        peer: connector.clone(),
                                    };
                                    match DirectPath::start(&conn, ctx, &opts) {
                                        Ok(d) => {
                                            if let Some(c) = ctl.pending_candidates.take() {
                                                d.set_peer_candidates(c);
                                            }
                                            ctl.direct = Some(d);
                                        }
                                        Err(e) => tracing::warn!(%connector, error = %e, "no direct path for this tunnel"),
                                    }
                                }
                            }
                        }
                        _ => conn.close(0u32.into(), b"channel gone"),
                    }
                }
                Event::InnerDown { connector, channel, error } => {
                    let current = lock(&sh.control).get(&connector).and_then(|c| c.channel) == Some(channel);
                    if current {
                        tracing::warn!(%connector, %channel, %error, "tunnel to connector down");
                        link_down(sh, &session, &connector, error, &ev_tx);
                    }
                }
                Event::Retry { connector } => {
                    let wanted = sh.links.read().unwrap_or_else(|p| p.into_inner()).contains_key(&connector);
                    let idle = lock(&sh.control).get(&connector).is_some_and(|c| c.request_id.is_none() && c.channel.is_none());
                    if wanted && idle {
                        open_channel(sh, &session, &connector, &mut next_request, &ev_tx);
                    }
                }
                Event::RequestTimeout { connector, request_id } => {
                    let pending = lock(&sh.control).get(&connector).is_some_and(|c| c.request_id == Some(request_id));
                    if pending {
                        tracing::warn!(%connector, request_id, "the relay did not answer a channel request; asking again");
                        link_down(sh, &session, &connector, "channel request timed out".into(), &ev_tx);
                    }
                }
            }
        }
    }
}

/// Tears a connector's path down and schedules a new channel request.
fn link_down(
    sh: &Arc<Shared>,
    session: &RelaySession,
    connector: &str,
    error: String,
    ev_tx: &mpsc::Sender<Event>,
) {
    if let Some(link) = sh
        .links
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(connector)
    {
        if let Some(c) = link.conn.write().unwrap_or_else(|p| p.into_inner()).take() {
            c.close(0u32.into(), b"path down");
        }
    }
    let mut control = lock(&sh.control);
    if let Some(ctl) = control.get_mut(connector) {
        if let Some(ch) = ctl.channel.take() {
            let _ = session.send(ControlMessage::ChannelClosed {
                channel_id: ch.get(),
                code: ErrorCode::PeerGone,
            });
        }
        ctl.clear_path();
        if let Some(v) = ctl.vaddr.take() {
            session.detach(v);
        }
        ctl.request_id = None;
        ctl.last_error = Some(error);
    }
    let tx = ev_tx.clone();
    let connector = connector.to_owned();
    tokio::spawn(async move {
        tokio::time::sleep(CHANNEL_RETRY).await;
        let _ = tx.send(Event::Retry { connector }).await;
    });
}

fn open_channel(
    sh: &Shared,
    session: &RelaySession,
    connector: &str,
    next_request: &mut u32,
    ev_tx: &mpsc::Sender<Event>,
) {
    let request_id = *next_request;
    *next_request = next_request.wrapping_add(1);
    lock(&sh.control)
        .entry(connector.to_owned())
        .or_default()
        .request_id = Some(request_id);
    tracing::debug!(%connector, request_id, "asking the relay for a channel");
    if let Err(e) = session.send(ControlMessage::OpenChannel {
        request_id,
        connector: connector.to_owned(),
    }) {
        tracing::warn!(%connector, error = %e, "could not ask for a channel");
    }
    // A request the relay never answers must not leave the connector unreachable for good.
    let tx = ev_tx.clone();
    let connector = connector.to_owned();
    tokio::spawn(async move {
        tokio::time::sleep(CHANNEL_REQUEST_TIMEOUT).await;
        let _ = tx
            .send(Event::RequestTimeout {
                connector,
                request_id,
            })
            .await;
    });
}

/// Installs a new catalog: routes, links, channels.
fn apply_catalog(
    sh: &Shared,
    session: &RelaySession,
    services: Vec<ServiceDef>,
    next_request: &mut u32,
    ev_tx: &mpsc::Sender<Event>,
) {
    let mut new_links = Vec::new();
    {
        let mut links = sh.links.write().unwrap_or_else(|p| p.into_inner());
        let wanted: std::collections::HashSet<&str> =
            services.iter().map(|s| s.connector.as_str()).collect();
        links.retain(|name, link| {
            let keep = wanted.contains(name.as_str());
            if !keep {
                if let Some(c) = link.conn.write().unwrap_or_else(|p| p.into_inner()).take() {
                    c.close(0u32.into(), b"connector left the catalog");
                }
            }
            keep
        });
        for name in wanted {
            if !links.contains_key(name) {
                links.insert(
                    name.to_owned(),
                    Arc::new(Link {
                        name: name.to_owned(),
                        conn: RwLock::new(None),
                        counters: LinkCounters::default(),
                    }),
                );
            }
        }
        let mut routes = sh.routes.write().unwrap_or_else(|p| p.into_inner());
        routes.clear();
        for s in &services {
            if let Some(l) = links.get(&s.connector) {
                routes.insert(s.address, l.clone());
            }
        }
        let mut control = lock(&sh.control);
        control.retain(|name, c| {
            let keep = links.contains_key(name);
            if !keep {
                if let Some(v) = c.vaddr.take() {
                    session.detach(v);
                }
                if let Some(ch) = c.channel.take() {
                    let _ = session.send(ControlMessage::ChannelClosed {
                        channel_id: ch.get(),
                        code: ErrorCode::PeerGone,
                    });
                }
                c.clear_path();
            }
            keep
        });
        for name in links.keys() {
            let ctl = control.entry(name.clone()).or_default();
            if ctl.request_id.is_none() && ctl.channel.is_none() {
                new_links.push(name.clone());
            }
        }
    }
    for name in new_links {
        open_channel(sh, session, &name, next_request, ev_tx);
    }
    let tunnel_ip = {
        let mut info = lock(&sh.info);
        info.services = services.clone();
        info.tunnel_ip
    };
    sh.state_tx.send_replace(TunnelState {
        tunnel_ip,
        services,
    });
}

async fn connect_inner(
    node: Node,
    connector: String,
    channel: ChannelId,
    vaddr: SocketAddr,
    inner_mtu: u16,
    tun_mtu: u16,
    ev_tx: mpsc::Sender<Event>,
) {
    let result = async {
        let crypto = node
            .credentials()
            .client_config(ALPN_TUNNEL)
            .map_err(|e| e.to_string())?;
        let mut cfg = quinn::ClientConfig::new(crypto);
        cfg.transport_config(transport::inner(inner_mtu, node.timing()));
        let connecting = node
            .endpoint()
            .connect_with(cfg, vaddr, &connector)
            .map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(Duration::from_secs(10), connecting)
            .await
            .map_err(|_| "inner handshake timed out".to_owned())?
            .map_err(|e| format!("inner handshake: {e}"))?;
        let peer = PeerIdentity::from_connection(&conn).map_err(|e| e.to_string())?;
        if peer.role != Role::Connector || peer.name != connector {
            conn.close(ErrorCode::RoleMismatch.to_quic().into(), b"unexpected peer");
            return Err(format!(
                "expected connector {connector}, the peer is {peer}"
            ));
        }
        if let Err(e) = transport::check_tun(tun_mtu, conn.max_datagram_size()) {
            tracing::error!(%connector, error = %e, "full-size packets cannot cross this path");
            conn.close(0u32.into(), b"mtu");
            return Err(e.to_string());
        }
        Ok(conn)
    }
    .await;
    let ev = match result {
        Ok(conn) => Event::InnerUp {
            connector,
            channel,
            conn,
        },
        Err(error) => Event::InnerDown {
            connector,
            channel,
            error,
        },
    };
    let _ = ev_tx.send(ev).await;
}

async fn read_inner(
    sh: Arc<Shared>,
    link: Arc<Link>,
    conn: quinn::Connection,
    channel: ChannelId,
    ev_tx: mpsc::Sender<Event>,
) {
    let started = Instant::now();
    let error = loop {
        match conn.read_datagram().await {
            Ok(pkt) => {
                link.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
                link.counters
                    .rx_bytes
                    .fetch_add(pkt.len() as u64, Ordering::Relaxed);
                if sh.to_platform.try_send(pkt).is_err() {
                    sh.dropped_to_platform.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => break e,
        }
    };
    tracing::debug!(connector = %link.name, up_secs = started.elapsed().as_secs(), "inner connection ended");
    let _ = ev_tx
        .send(Event::InnerDown {
            connector: link.name.clone(),
            channel,
            error: error.to_string(),
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_parsing() {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[16..20].copy_from_slice(&[10, 100, 0, 1]);
        assert_eq!(ipv4_destination(&p), Some(Ipv4Addr::new(10, 100, 0, 1)));
        p[0] = 0x60;
        assert_eq!(ipv4_destination(&p), None);
        assert_eq!(ipv4_destination(&[0x45; 10]), None);
    }
}
