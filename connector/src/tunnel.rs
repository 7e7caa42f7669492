//! The connector's tunnel side: its relay session (registering services, taking incoming
//! channels) and the inner connections agents open over those channels.
//!
//! An inner connection is accepted only from the virtual address of a channel the relay
//! announced, and only if the agent's certificate names the identity the relay gave for that
//! channel. Its packets then go to the data plane, which enforces the agent's tunnel IP as the
//! only source and registered services as the only destinations.
//!
//! One inner connection per agent identity: a second handshake from the same identity replaces
//! (closes) the first, so the data plane's per-connection limits are per-identity limits.
//!
//! **A fleet of relays:** the connector keeps one session with every relay in its list (names
//! resolved again every minute), registers its services with each, and serves channels from
//! any of them; a relay that goes away is reconnected with backoff. Channels are per relay: a
//! session that ends takes only its own relay's channels along.
//!
//! Inner connections outlive the relay session: when it ends, the connections stay (their
//! virtual addresses lose only their relay channel, direct paths keep working), and an
//! `IncomingChannel` of the next session (through the same relay or another one) from the same
//! agent identity with the same tunnel IP re-points that agent's live connection at the new
//! channel instead of waiting for a new handshake. The relay names the identity of every
//! channel and the connection's TLS already proved it, so the connection is still the agent's.
//! For the same reason a channel the relay closes because the agent's session with it ended
//! (`PeerGone`: the agent moved to another relay, or went away) leaves a live connection to
//! be resumed or to time out; a close for policy (`PolicyChanged`, `Unauthorized`) closes it.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use ztna_core::backoff::{jitter_seed, Backoff};
use ztna_core::daemon::AbortOnDrop;
use ztna_core::direct::{DirectContext, DirectOptions, DirectPath};
use ztna_core::fleet::RelaySpec;
use ztna_core::mux::MuxSocket;
use ztna_core::session::{ControlSender, Node, RelaySession, RelayTarget, SessionError};
use ztna_core::tcp_carriage::HEADER_LEN;
use ztna_core::tls::PeerIdentity;
use ztna_core::transport;
use ztna_proto::control::{ControlMessage, ErrorCode, Hello, Role};
use ztna_proto::{Candidate, ChannelId, ServiceDef, ALPN_TUNNEL};

use crate::dataplane::fragment::fragment;
use crate::dataplane::{Dataplane, TcpClass, ToAgent};
use crate::metrics::{gauge_dec, gauge_inc, Metrics};

/// What the relay told us to expect on a channel.
#[derive(Debug, Clone)]
struct Expected {
    /// The relay channel now under it, and the relay (none between relay sessions).
    channel: Option<(SocketAddr, ChannelId)>,
    agent: String,
    tunnel_ip: Ipv4Addr,
    /// Service addresses policy lets this agent reach (from the relay; a resumed channel brings
    /// the current list).
    allowed: Arc<RwLock<Vec<Ipv4Addr>>>,
    /// The accepted inner connection, once there is one.
    conn: Option<quinn::Connection>,
}

/// Channels by virtual peer address.
type Channels = Arc<Mutex<HashMap<SocketAddr, Expected>>>;

fn lock<T>(c: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

/// Direct paths of the agents' tunnels.
#[derive(Default)]
struct DirectState {
    /// Per relay: the session that carries candidates, and this connector's address as that
    /// relay sees it.
    relays: HashMap<SocketAddr, (ControlSender, Option<SocketAddr>)>,
    /// Full probe size (the inner UDP payload size).
    full_probe_len: usize,
    /// One driver per agent tunnel, by virtual address.
    paths: HashMap<SocketAddr, DirectPath>,
    /// Candidates that arrived before their tunnel was up, by virtual address.
    pending: HashMap<SocketAddr, Vec<Candidate>>,
}

impl DirectState {
    /// Stops the driver of the tunnel at `vaddr` (back onto the relay) and forgets its
    /// candidates.
    fn forget(&mut self, vaddr: &SocketAddr) {
        self.paths.remove(vaddr);
        self.pending.remove(vaddr);
    }
}

type Direct = Arc<Mutex<DirectState>>;

/// Packets to one agent, over its inner connection: datagrams, and the connector's TCP segments
/// on the TCP carriage streams ([`ztna_core::tcp_carriage`]) through [`carry_tcp`].
struct InnerSink {
    conn: quinn::Connection,
    metrics: Arc<Metrics>,
    /// Towards the carriage streams' writer.
    tcp: tokio::sync::mpsc::Sender<Segment>,
    /// What the sink and the writer share.
    carriage: Arc<CarriageShared>,
}

/// One TCP segment for the carriage writer.
struct Segment {
    packet: Bytes,
    /// Of a sparse flow ([`ToAgent::send_tcp`]): on the sparse stream once it is open.
    sparse: bool,
}

/// What an [`InnerSink`] and its carriage writer ([`carry_tcp`]) share.
struct CarriageShared {
    /// Set when the streams can't be used (the agent allows no stream, or one broke): TCP
    /// segments then go as datagrams.
    on_datagrams: AtomicBool,
    /// Bytes of framed segments handed to the writer and not yet written into a stream, and
    /// how many the connector's bulk TCP flows may have there ([`ToAgent::tcp_room`]): a
    /// quarter of the streams' send window, between [`TCP_QUEUE_MIN_BYTES`] and
    /// [`TCP_QUEUE_PACKETS`] full segments. Twice the limit is the hard bound at which the TCP
    /// stack sends nothing ([`ToAgent::has_room`]); sparse flows' segments and what a bulk flow
    /// sends beyond its room (a retransmission, a flow that just turned bulk) use the margin.
    queued: AtomicUsize,
    limit: AtomicUsize,
}

/// See [`CarriageShared::queued`]: full segments (about 190 KiB) the connector's TCP flows to
/// one agent may have waiting for the writer, fewer by [`CarriageShared::limit`]; also the
/// bound of the writer's channel, which the writer keeps empty.
const TCP_QUEUE_PACKETS: usize = 150;

/// See [`CarriageShared::limit`]: 32 KiB, 5 ms at 50 Mbit/s.
const TCP_QUEUE_MIN_BYTES: usize = 32 << 10;

/// Most bytes of datagrams the connector's TCP stack leaves waiting in an inner connection's
/// send buffer when TCP goes as datagrams (the buffer holds `DATAGRAM_SEND_BUFFER`, and drops
/// the oldest beyond): about 20 ms at 50 Mbit/s, 1 ms at 1 Gbit/s.
const TCP_QUEUE_BYTES: usize = 128 << 10;

/// How often the carriage streams' send window follows the controller
/// ([`ztna_core::congestion::Estimator::stream_window`]).
const TCP_SEND_WINDOW_EVERY: std::time::Duration = std::time::Duration::from_millis(5);

/// How long the connector waits for the agent to allow the bulk carriage stream.
const TCP_STREAM_OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// quinn's priority of the sparse stream: its data goes out before the bulk stream's.
const SPARSE_PRIORITY: i32 = 1;

impl InnerSink {
    /// A sink for `conn` and the task that writes its TCP carriage streams (which ends when the
    /// sink is dropped or the connection closes).
    fn new(conn: quinn::Connection, metrics: Arc<Metrics>) -> (Self, AbortOnDrop<()>) {
        let (tcp, rx) = tokio::sync::mpsc::channel(TCP_QUEUE_PACKETS);
        let carriage = Arc::new(CarriageShared {
            on_datagrams: AtomicBool::new(false),
            queued: AtomicUsize::new(0),
            limit: AtomicUsize::new(TCP_QUEUE_PACKETS * usize::from(transport::DEFAULT_TUN_MTU)),
        });
        let writer = tokio::spawn(carry_tcp(
            conn.clone(),
            rx,
            carriage.clone(),
            metrics.clone(),
        ));
        (
            Self {
                conn,
                metrics,
                tcp,
                carriage,
            },
            AbortOnDrop(writer),
        )
    }

    /// Bytes the datagram send buffer takes before TCP as datagrams would wait past
    /// [`TCP_QUEUE_BYTES`].
    fn datagram_room(&self) -> usize {
        self.conn.datagram_send_buffer_space().saturating_sub(
            ztna_core::transport::DATAGRAM_SEND_BUFFER.saturating_sub(TCP_QUEUE_BYTES),
        )
    }
}

/// Frame headers of packets up to 4095 bytes, so that framing a segment allocates nothing.
static FRAME_HEADERS: [u8; 2 * 4096] = {
    let mut t = [0u8; 2 * 4096];
    let mut i = 0;
    while i < 4096 {
        t[2 * i] = (i >> 8) as u8;
        t[2 * i + 1] = (i & 0xff) as u8;
        i += 1;
    }
    t
};

/// The two carriage streams' queues in the writer: frames (a header chunk, then the packet)
/// not yet written into the stream.
#[derive(Default)]
struct Frames {
    chunks: Vec<Bytes>,
}

impl Frames {
    /// Queues `packet` behind its frame header; `false` if it can't be framed.
    fn push(&mut self, packet: Bytes) -> bool {
        let Some(h) = ztna_core::tcp_carriage::frame_header(&packet) else {
            return false;
        };
        let header = match FRAME_HEADERS.get(2 * packet.len()..2 * packet.len() + HEADER_LEN) {
            Some(h) => Bytes::from_static(h),
            None => Bytes::copy_from_slice(&h),
        };
        self.chunks.push(header);
        self.chunks.push(packet);
        true
    }

    /// Writes what the stream takes now; `Pending` until it takes something. Cancel safe
    /// (quinn's `write_chunks` writes only in the poll that returns).
    async fn write(&mut self, stream: &mut quinn::SendStream) -> Result<usize, quinn::WriteError> {
        let written = stream.write_chunks(&mut self.chunks).await?;
        self.chunks.drain(..written.chunks);
        Ok(written.bytes)
    }

    fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Frames still queued (half the chunks, a partly written frame counted whole).
    fn frames(&self) -> usize {
        self.chunks.len().div_ceil(2)
    }
}

/// Writes the TCP segments queued on `rx` to the inner connection's carriage streams, framed:
/// sparse flows' segments on a stream of their own that quinn sends first, bulk flows' on the
/// other, so that a request does not wait behind the unsent part of a download. Both share the
/// connection's send window ([`SendWindow`]); when an acknowledgement frees some, the sparse
/// stream is written first. Falls back to datagrams (sets `on_datagrams`) if the agent does not
/// allow the bulk stream or a stream breaks while the connection lives. An agent that allows
/// one stream only (from before the sparse stream) gets everything on the bulk stream.
async fn carry_tcp(
    conn: quinn::Connection,
    mut rx: tokio::sync::mpsc::Receiver<Segment>,
    shared: Arc<CarriageShared>,
    metrics: Arc<Metrics>,
) {
    let on_datagrams = &shared.on_datagrams;
    // Nothing to open before the first segment.
    let Some(first) = rx.recv().await else { return };
    let mut bulk = match tokio::time::timeout(TCP_STREAM_OPEN_TIMEOUT, conn.open_uni()).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => return, // the connection is gone
        Err(_) => {
            tracing::warn!(
                "the agent allows no TCP carriage stream (an older agent?); TCP goes as datagrams"
            );
            on_datagrams.store(true, Ordering::Relaxed);
            drain_as_datagrams(&conn, first, rx, &metrics).await;
            return;
        }
    };
    let opening = conn.open_uni();
    tokio::pin!(opening);
    let mut sparse: Option<quinn::SendStream> = None;
    let mut sparse_frames = Frames::default();
    let mut bulk_frames = Frames::default();
    let mut window = SendWindow::new();
    let mut next = Some(first);
    let broke = loop {
        // Everything waiting goes into the queues (the channel stays empty, so a sparse
        // segment never waits behind bulk ones there).
        while let Some(s) = next.take().or_else(|| rx.try_recv().ok()) {
            let frames = if s.sparse && sparse.is_some() {
                &mut sparse_frames
            } else {
                &mut bulk_frames
            };
            let len = s.packet.len();
            if !frames.push(s.packet) {
                shared.queued.fetch_sub(len + HEADER_LEN, Ordering::Relaxed);
                metrics.dropped_to_agent.fetch_add(1, Ordering::Relaxed);
            }
        }
        window.follow(&conn, &shared);
        let sparse_ready = sparse.is_some() && !sparse_frames.is_empty();
        tokio::select! {
            biased;
            r = async {
                match sparse.as_mut() {
                    Some(stream) => sparse_frames.write(stream).await,
                    None => std::future::pending().await,
                }
            }, if sparse_ready => match r {
                Ok(n) => {
                    shared.queued.fetch_sub(n, Ordering::Relaxed);
                }
                Err(e) => break Some(e),
            },
            r = bulk_frames.write(&mut bulk), if !bulk_frames.is_empty() => match r {
                Ok(n) => {
                    shared.queued.fetch_sub(n, Ordering::Relaxed);
                }
                Err(e) => break Some(e),
            },
            // Until it is open (never, for an agent that allows one stream).
            r = &mut opening, if sparse.is_none() => {
                match r {
                    Ok(s) => {
                        let _ = s.set_priority(SPARSE_PRIORITY);
                        sparse = Some(s);
                    }
                    Err(_) => return, // the connection is gone
                }
            },
            s = rx.recv() => match s {
                Some(s) => next = Some(s),
                None => break None,
            },
        }
    };
    match broke {
        None => {
            let _ = bulk.finish();
            if let Some(mut s) = sparse {
                let _ = s.finish();
            }
        }
        Some(e) => {
            tracing::debug!(error = %e, "TCP carriage stream broke; TCP goes as datagrams");
            on_datagrams.store(true, Ordering::Relaxed);
            let lost = sparse_frames.frames() + bulk_frames.frames();
            metrics
                .dropped_to_agent
                .fetch_add(lost as u64, Ordering::Relaxed);
            let Some(s) = rx.recv().await else { return };
            drain_as_datagrams(&conn, s, rx, &metrics).await;
        }
    }
}

/// The carriage stream's send window, kept at what the controller calls for: about a round
/// trip and a half of what the path delivers, not the full 4 MiB the agent would accept
/// ([`ztna_core::congestion::Estimator::stream_window`]), so that a segment written now does
/// not wait behind seconds of a download.
struct SendWindow {
    set: u64,
    at: Option<tokio::time::Instant>,
}

impl SendWindow {
    fn new() -> Self {
        Self {
            set: u64::from(ztna_core::transport::TCP_CARRIAGE_WINDOW),
            at: None,
        }
    }

    /// Reads the controller's stream window and moves the send window to it (within the
    /// agent's receive window), and the writer's queue limit with it, at most every
    /// [`TCP_SEND_WINDOW_EVERY`].
    fn follow(&mut self, conn: &quinn::Connection, shared: &CarriageShared) {
        let now = tokio::time::Instant::now();
        if self
            .at
            .is_some_and(|at| now.duration_since(at) < TCP_SEND_WINDOW_EVERY)
        {
            return;
        }
        self.at = Some(now);
        let max = u64::from(ztna_core::transport::TCP_CARRIAGE_WINDOW);
        let w = ztna_core::congestion::stream_window(conn).map_or(max, |w| w.min(max));
        if w != self.set {
            if tracing::enabled!(tracing::Level::TRACE) {
                let c = ztna_core::congestion::CarriageStatus::of(conn);
                tracing::trace!(
                    stream_window = w,
                    window = c.window_bytes,
                    bandwidth_mbit = c.bandwidth_mbit,
                    min_rtt_ms = c.min_rtt_ms,
                    rtt_ms = conn.rtt().as_secs_f64() * 1e3,
                    lost = c.lost_packets,
                    congestion_events = c.congestion_events,
                    "carriage stream window"
                );
            }
            conn.set_send_window(w);
            self.set = w;
            let limit = usize::try_from(w / 4).unwrap_or(usize::MAX).clamp(
                TCP_QUEUE_MIN_BYTES,
                TCP_QUEUE_PACKETS * usize::from(transport::DEFAULT_TUN_MTU),
            );
            shared.limit.store(limit, Ordering::Relaxed);
        }
    }
}

/// Sends what is still queued for the streams, which can't be used, as datagrams (`queued` no
/// longer counts: with `on_datagrams` set, room is the datagram buffer's).
async fn drain_as_datagrams(
    conn: &quinn::Connection,
    first: Segment,
    mut rx: tokio::sync::mpsc::Receiver<Segment>,
    metrics: &Metrics,
) {
    let mut next = Some(first);
    while let Some(s) = next.take() {
        send_datagram_to_agent(conn, metrics, s.packet);
        next = rx.recv().await;
    }
}

impl ToAgent for InnerSink {
    fn has_room(&self) -> bool {
        let c = &self.carriage;
        if c.on_datagrams.load(Ordering::Relaxed) {
            self.datagram_room() > 0
        } else {
            self.tcp.capacity() > 0
                && c.queued.load(Ordering::Relaxed) < 2 * c.limit.load(Ordering::Relaxed)
        }
    }

    fn tcp_room(&self) -> usize {
        let c = &self.carriage;
        if c.on_datagrams.load(Ordering::Relaxed) {
            self.datagram_room()
        } else {
            c.limit
                .load(Ordering::Relaxed)
                .saturating_sub(c.queued.load(Ordering::Relaxed))
        }
    }

    fn send_tcp(&self, packet: Bytes, class: TcpClass) {
        // Pure ACKs go as datagrams (but one that reopens a closed window, see `TcpClass`): on
        // the ordered stream one loss would hold every later ACK back for an RTT and stall the
        // agent's upload.
        if self.carriage.on_datagrams.load(Ordering::Relaxed) || !class.reliable {
            return self.send(packet);
        }
        let sparse = class.sparse;
        // Counted before the writer can take it off the queue (it subtracts what it writes).
        let len = packet.len() + HEADER_LEN;
        let queued = &self.carriage.queued;
        queued.fetch_add(len, Ordering::Relaxed);
        match self.tcp.try_send(Segment { packet, sparse }) {
            Ok(()) => {}
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                queued.fetch_sub(len, Ordering::Relaxed);
                // has_room() said there was room; a segment the stack built without asking
                // (an immediate reply) found none: lost, the TCP ends recover it.
                self.metrics
                    .dropped_to_agent
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(s)) => {
                queued.fetch_sub(len, Ordering::Relaxed);
                self.send(s.packet)
            }
        }
    }

    fn send(&self, packet: Bytes) {
        send_datagram_to_agent(&self.conn, &self.metrics, packet);
    }
}

/// Identification of the IPv6 fragments the connector sends (one per fragmented IPv6 packet).
static NEXT_FRAGMENT_ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// Sends one IPv4 or IPv6 packet to the agent as a datagram of its inner connection,
/// fragmenting it (IPv4 as a router would, IPv6 as the source the connector is for the packets
/// it builds) if it is larger than the tunnel carries; what can't be sent is counted.
fn send_datagram_to_agent(conn: &quinn::Connection, metrics: &Metrics, packet: Bytes) {
    let max = conn.max_datagram_size().unwrap_or(0);
    if packet.len() <= max {
        if conn.send_datagram(packet).is_err() {
            metrics.dropped_to_agent.fetch_add(1, Ordering::Relaxed);
        }
        return;
    }
    let ident = || NEXT_FRAGMENT_ID.fetch_add(1, Ordering::Relaxed);
    match fragment(&packet, max, ident) {
        Ok(frags) => {
            metrics.fragmented_to_agents.fetch_add(1, Ordering::Relaxed);
            for f in frags {
                if conn.send_datagram(Bytes::from(f)).is_err() {
                    metrics.dropped_to_agent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Err(e) => {
            tracing::debug!(len = packet.len(), max, error = %e, "packet to agent dropped: too large for the tunnel");
            metrics.dropped_to_agent.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The connector's tunnel: relay session plus inner connections.
pub(crate) struct Tunnel {
    node: Node,
    relays: Vec<RelaySpec>,
    relay_name: String,
    services: Vec<ServiceDef>,
    dataplane: Arc<Dataplane>,
    metrics: Arc<Metrics>,
    channels: Channels,
    direct: Direct,
    direct_opts: DirectOptions,
}

impl Tunnel {
    /// A tunnel over `node`, offering `services`.
    pub(crate) fn new(
        node: Node,
        (relays, relay_name): (Vec<RelaySpec>, String),
        services: Vec<ServiceDef>,
        dataplane: Arc<Dataplane>,
        metrics: Arc<Metrics>,
        direct_opts: DirectOptions,
    ) -> Self {
        Self {
            node,
            relays,
            relay_name,
            services,
            dataplane,
            metrics,
            channels: Arc::default(),
            direct: Arc::default(),
            direct_opts,
        }
    }

    /// Runs forever: keeps a session with every relay of the list (reconnecting each with
    /// backoff, following the names' DNS) and accepts inner connections.
    pub(crate) async fn run(self) {
        let me = Arc::new(self);
        let _accept = AbortOnDrop(tokio::spawn(accept_loop(
            me.node.clone(),
            me.channels.clone(),
            me.dataplane.clone(),
            me.metrics.clone(),
            me.direct.clone(),
            me.direct_opts.clone(),
        )));
        let _revocation = AbortOnDrop(tokio::spawn(close_revoked(
            me.node.credentials().revocation().clone(),
            me.channels.clone(),
            me.metrics.clone(),
        )));
        let mut resolver =
            ztna_core::fleet::Resolver::new(me.relays.clone(), me.node.mux().is_v4());
        let mut loops: HashMap<SocketAddr, AbortOnDrop<()>> = HashMap::new();
        loop {
            let addrs = resolver.next().await;
            let gone: Vec<SocketAddr> = loops
                .keys()
                .filter(|a| !addrs.contains(a))
                .copied()
                .collect();
            for relay in gone {
                tracing::info!(%relay, "relay no longer listed; leaving it");
                loops.remove(&relay);
                me.drop_channels_of(relay, "relay left the list");
            }
            for relay in &addrs {
                if !loops.contains_key(relay) {
                    tracing::info!(%relay, "relay listed; connecting");
                    loops.insert(
                        *relay,
                        AbortOnDrop(tokio::spawn(me.clone().relay_loop(*relay))),
                    );
                }
            }
            me.metrics
                .relays_known
                .store(loops.len() as u64, Ordering::Relaxed);
        }
    }

    /// Keeps a session with one relay up, reconnecting with backoff.
    async fn relay_loop(self: Arc<Self>, relay: SocketAddr) {
        let target = RelayTarget {
            addr: relay,
            server_name: self.relay_name.clone(),
        };
        let mut backoff = Backoff::default();
        let mut seed = jitter_seed();
        let hello = Hello {
            role: Role::Connector,
            services: self.services.clone(),
            want: vec![],
            software: format!("ztna-connector/{}", env!("CARGO_PKG_VERSION")),
            tunnel_ip: None,
        };
        loop {
            match self.node.connect_relay(&target, hello.clone()).await {
                Ok(session) => {
                    backoff.reset();
                    self.metrics.relay_connects.fetch_add(1, Ordering::Relaxed);
                    let err = {
                        let _connected = Connected::new(&self.metrics);
                        self.run_session(relay, session).await
                    };
                    tracing::warn!(%relay, error = %err, "relay session ended; reconnecting");
                }
                Err(e) => {
                    tracing::error!(%relay, error = %e, attempt = backoff.attempts() + 1, "could not connect to the relay")
                }
            }
            self.drop_channels_of(relay, "relay session lost");
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            tokio::time::sleep(backoff.next_delay(seed >> 33)).await;
        }
    }

    /// `relay`'s session ended: its channels without a live inner connection are forgotten;
    /// live inner connections stay (with their direct paths) for a channel through any relay
    /// to resume.
    fn drop_channels_of(&self, relay: SocketAddr, why: &str) {
        let gone: Vec<SocketAddr> = {
            let mut ch = lock(&self.channels);
            let mut gone = Vec::new();
            for (a, e) in ch.iter_mut() {
                if e.channel.is_none_or(|(r, _)| r != relay) {
                    continue;
                }
                e.channel = None;
                if !e.conn.as_ref().is_some_and(alive) {
                    if let Some(c) = e.conn.take() {
                        c.close(0u32.into(), why.as_bytes());
                    }
                    gone.push(*a);
                }
            }
            for a in &gone {
                ch.remove(a);
            }
            gone
        };
        let mut d = lock(&self.direct);
        for a in &gone {
            d.forget(a);
            self.node.mux().remove_route(*a);
        }
        d.relays.remove(&relay);
    }

    async fn run_session(&self, relay: SocketAddr, mut session: RelaySession) -> SessionError {
        let welcome = session.welcome().clone();
        let inner_mtu = transport::INNER_MTU;
        match self.node.credentials().server_config(ALPN_TUNNEL) {
            Ok(crypto) => {
                let mut server = quinn::ServerConfig::with_crypto(crypto.clone());
                server.transport_config(transport::inner(inner_mtu, self.node.timing(), None));
                // The path under an inner connection is the socket's business (virtual peer
                // addresses); letting quinn migrate would let a peer move a connection that
                // was admitted through a relay channel onto a path the relay never vetted.
                server.migration(false);
                self.node.endpoint().set_server_config(Some(server));
            }
            Err(e) => return SessionError::Tls(e),
        }
        {
            let mut d = lock(&self.direct);
            d.relays.insert(
                relay,
                (session.control_sender(), Some(welcome.observed_addr)),
            );
            d.full_probe_len = usize::from(inner_mtu);
        }
        let names: Vec<&str> = welcome.services.iter().map(|s| s.name.as_str()).collect();
        tracing::info!(%relay, identity = %welcome.identity, observed = %welcome.observed_addr, services = ?names, inner_mtu, "connected to the relay");
        for r in &welcome.rejected {
            // The detail may name addresses: DEBUG only.
            tracing::error!(service = %r.name, code = %r.code, "relay refused to register service");
            tracing::debug!(service = %r.name, detail = %r.message, "relay's refusal detail");
        }
        loop {
            let msg = match session.recv().await {
                Ok(m) => m,
                Err(e) => return e,
            };
            match msg {
                ControlMessage::IncomingChannel {
                    channel_id,
                    agent,
                    agent_tunnel_ip,
                    services,
                } => {
                    let Some(channel) = ChannelId::new(channel_id) else {
                        return SessionError::Protocol(format!(
                            "channel id {channel_id} out of range"
                        ));
                    };
                    if let Some((vaddr, conn)) =
                        self.resume(&session, channel, &agent, agent_tunnel_ip, &services)
                    {
                        tracing::info!(%agent, %relay, channel = channel_id, "incoming channel resumes the agent's inner connection");
                        tracing::debug!(%agent, tunnel_ip = %agent_tunnel_ip, %vaddr, "channel details");
                        if self.direct_opts.enabled {
                            let rebound = {
                                let d = lock(&self.direct);
                                let observed = d.relays.get(&relay).and_then(|(_, o)| *o);
                                d.paths
                                    .get(&vaddr)
                                    .map(|p| p.rebind(channel, session.control_sender(), observed))
                                    .is_some()
                            };
                            // A live direct path keeps going; otherwise start looking for one.
                            let expected = lock(&self.channels).get(&vaddr).cloned();
                            if let (false, Some(e)) = (rebound, expected) {
                                start_direct(
                                    &self.direct,
                                    &self.direct_opts,
                                    &conn,
                                    self.node.mux(),
                                    vaddr,
                                    &e,
                                );
                            }
                        }
                    } else {
                        let vaddr = session.attach_channel(channel);
                        tracing::info!(%agent, %relay, channel = channel_id, "incoming channel");
                        tracing::debug!(%agent, tunnel_ip = %agent_tunnel_ip, %vaddr, "channel details");
                        lock(&self.channels).insert(
                            vaddr,
                            Expected {
                                channel: Some((relay, channel)),
                                agent,
                                tunnel_ip: agent_tunnel_ip,
                                allowed: Arc::new(RwLock::new(services)),
                                conn: None,
                            },
                        );
                    }
                    if let Err(e) = session.send(ControlMessage::ChannelAccepted { channel_id }) {
                        return e;
                    }
                }
                ControlMessage::ChannelClosed { channel_id, code } => {
                    let on_channel = |e: &Expected| {
                        e.channel
                            .is_some_and(|(r, c)| r == relay && c.get() == channel_id)
                    };
                    // The agent's session with this relay ended (it moved to another relay, or
                    // went away): a live inner connection waits for a channel to resume it, or
                    // times out. A close for any other reason (policy) ends the connection.
                    let detached = code == ErrorCode::PeerGone
                        && {
                            let mut ch = lock(&self.channels);
                            match ch
                                .iter_mut()
                                .find(|(_, e)| on_channel(e) && e.conn.as_ref().is_some_and(alive))
                            {
                                Some((addr, e)) => {
                                    e.channel = None;
                                    self.node.mux().clear_relay_route(*addr);
                                    tracing::info!(agent = %e.agent, %relay, channel = channel_id, "channel closed; the inner connection waits to be resumed");
                                    true
                                }
                                None => false,
                            }
                        };
                    let gone = if detached {
                        None
                    } else {
                        let mut ch = lock(&self.channels);
                        let addr = ch.iter().find(|(_, e)| on_channel(e)).map(|(a, _)| *a);
                        addr.and_then(|a| ch.remove(&a).map(|e| (a, e)))
                    };
                    if let Some((addr, e)) = gone {
                        tracing::info!(agent = %e.agent, channel = channel_id, %code, "channel closed");
                        lock(&self.direct).forget(&addr);
                        session.detach(addr);
                        if let Some(c) = e.conn {
                            c.close(0u32.into(), b"channel closed");
                        }
                    }
                }
                ControlMessage::ObservedAddress(a) => {
                    tracing::info!(%relay, "relay observed a new address for this connector");
                    tracing::debug!(observed = %a, "new observed address");
                    let on_this: Vec<SocketAddr> = lock(&self.channels)
                        .iter()
                        .filter(|(_, e)| e.channel.is_some_and(|(r, _)| r == relay))
                        .map(|(v, _)| *v)
                        .collect();
                    let mut d = lock(&self.direct);
                    if let Some(r) = d.relays.get_mut(&relay) {
                        r.1 = Some(a);
                    }
                    for v in on_this {
                        if let Some(p) = d.paths.get(&v) {
                            p.set_observed(a);
                        }
                    }
                }
                ControlMessage::Candidates {
                    channel_id,
                    candidates,
                } => {
                    let vaddr = lock(&self.channels)
                        .iter()
                        .find(|(_, e)| {
                            e.channel
                                .is_some_and(|(r, c)| r == relay && c.get() == channel_id)
                        })
                        .map(|(a, _)| *a);
                    let mut d = lock(&self.direct);
                    match vaddr {
                        Some(v) if d.paths.contains_key(&v) => {
                            if let Some(p) = d.paths.get(&v) {
                                p.set_peer_candidates(candidates);
                            }
                        }
                        Some(v) => {
                            d.pending.insert(v, candidates);
                        }
                        None => tracing::debug!(
                            channel = channel_id,
                            "candidates for an unknown channel; ignored"
                        ),
                    }
                }
                ControlMessage::Error { code, message, .. } => {
                    // The message may name addresses: DEBUG only.
                    tracing::error!(%code, "relay reported an error");
                    tracing::debug!(%code, %message, "relay's error detail");
                }
                other => tracing::warn!(
                    kind = other.kind(),
                    "unexpected control message from the relay; ignored"
                ),
            }
        }
    }
}

impl Tunnel {
    /// Re-points the live inner connection of `agent` (same tunnel IP) at `channel` of the new
    /// session. Returns its virtual address and connection, or `None` when there is none to
    /// resume (the agent will handshake).
    fn resume(
        &self,
        session: &RelaySession,
        channel: ChannelId,
        agent: &str,
        tunnel_ip: Ipv4Addr,
        services: &[Ipv4Addr],
    ) -> Option<(SocketAddr, quinn::Connection)> {
        let mut ch = lock(&self.channels);
        let (vaddr, e) = ch.iter_mut().find(|(_, e)| {
            e.agent == agent && e.tunnel_ip == tunnel_ip && e.conn.as_ref().is_some_and(alive)
        })?;
        let conn = e.conn.clone()?;
        session.reattach_channel(*vaddr, channel);
        e.channel = Some((session.connection().remote_address(), channel));
        *e.allowed.write().unwrap_or_else(|p| p.into_inner()) = services.to_vec();
        Some((*vaddr, conn))
    }
}

/// Counts a live relay session in `relay_connected` while it lives (a session task aborted
/// when its relay leaves the list counts down too).
struct Connected(Arc<Metrics>);

impl Connected {
    fn new(m: &Arc<Metrics>) -> Self {
        gauge_inc(&m.relay_connected);
        Self(m.clone())
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        gauge_dec(&self.0.relay_connected);
    }
}

/// Whether an inner connection is still open.
fn alive(c: &quinn::Connection) -> bool {
    c.close_reason().is_none()
}

static NEXT_AGENT: AtomicU64 = AtomicU64::new(1);

async fn accept_loop(
    node: Node,
    channels: Channels,
    dataplane: Arc<Dataplane>,
    metrics: Arc<Metrics>,
    direct: Direct,
    direct_opts: DirectOptions,
) {
    // The TLS side is the same for every handshake (the verifier reads the shared deny list
    // and CRLs); only the transport is per connection.
    let crypto = match node.credentials().server_config(ALPN_TUNNEL) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "no TLS server configuration; inner handshakes are refused");
            return;
        }
    };
    while let Some(incoming) = node.endpoint().accept().await {
        let remote = incoming.remote_address();
        if !lock(&channels).contains_key(&remote) {
            // Not the virtual address of a channel the relay announced: nobody may handshake
            // with the connector directly.
            metrics
                .inner_handshakes_rejected
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%remote, "refusing an inner handshake from outside any channel");
            incoming.refuse();
            continue;
        }
        // This connection's own transport: its congestion controller follows the path changes
        // of its virtual address (a new relay channel after a failover, a direct path lost).
        let mut server = quinn::ServerConfig::with_crypto(crypto.clone());
        server.transport_config(transport::inner(
            transport::INNER_MTU,
            node.timing(),
            node.mux().path_changes(remote),
        ));
        // See run_session: the path is the socket's business.
        server.migration(false);
        tokio::spawn(serve_agent(
            incoming,
            remote,
            node.mux().clone(),
            channels.clone(),
            dataplane.clone(),
            metrics.clone(),
            (direct.clone(), direct_opts.clone(), Arc::new(server)),
        ));
    }
}

/// The destination of an IPv4 packet (the data plane classifies anything else).
fn ipv4_destination(packet: &[u8]) -> Option<Ipv4Addr> {
    match packet {
        [v, _, _, _, _, _, _, _, _, _, _, _, _, _, _, _, a, b, c, d, ..] if v >> 4 == 4 => {
            Some(Ipv4Addr::new(*a, *b, *c, *d))
        }
        _ => None,
    }
}

/// The IPv4 address policy speaks of for a packet's destination: an IPv4 packet's destination,
/// or for an IPv6 packet the IPv4 address of the service (or name-service pool address) its
/// destination stands for. `None` for anything else (the data plane drops it, counted).
/// `v4_of` maps a service's IPv6 address to its IPv4 one ([`Dataplane::v4_equivalent`]).
fn policy_destination(
    packet: &[u8],
    v4_of: impl FnOnce(std::net::Ipv6Addr) -> Option<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    match packet.first()? >> 4 {
        4 => ipv4_destination(packet),
        6 => {
            let dst: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            v4_of(std::net::Ipv6Addr::from(dst))
        }
        _ => None,
    }
}

async fn serve_agent(
    incoming: quinn::Incoming,
    vaddr: SocketAddr,
    mux: Arc<MuxSocket>,
    channels: Channels,
    dataplane: Arc<Dataplane>,
    metrics: Arc<Metrics>,
    (direct, direct_opts, server): (Direct, DirectOptions, Arc<quinn::ServerConfig>),
) {
    let accepted = match incoming.accept_with(server) {
        Ok(c) => c.await,
        Err(e) => Err(e),
    };
    let conn = match accepted {
        Ok(c) => c,
        Err(e) => {
            metrics
                .inner_handshakes_rejected
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "inner handshake failed");
            return;
        }
    };
    let peer = PeerIdentity::from_connection(&conn);
    let expected = lock(&channels).get(&vaddr).cloned();
    let (expected, peer) = match (expected, peer) {
        (Some(e), Ok(p)) if p.role == Role::Agent && p.name == e.agent => (e, p),
        (e, p) => {
            metrics
                .inner_handshakes_rejected
                .fetch_add(1, Ordering::Relaxed);
            let expected = e
                .map(|e| e.agent)
                .unwrap_or_else(|| "<channel gone>".into());
            let got = p.map(|p| p.to_string()).unwrap_or_else(|e| e.to_string());
            tracing::warn!(%expected, %got, "inner handshake rejected: the certificate is not the agent the relay named");
            conn.close(
                ztna_proto::ErrorCode::Unauthorized.to_quic().into(),
                b"identity does not match the channel",
            );
            return;
        }
    };
    let replaced = {
        let mut ch = lock(&channels);
        match ch.get_mut(&vaddr) {
            Some(e) => {
                if let Some(old) = e.conn.replace(conn.clone()) {
                    old.close(0u32.into(), b"replaced");
                }
            }
            None => return,
        }
        // One inner connection per agent identity: older ones (on other channels) go.
        let mut replaced = 0;
        for (a, e) in ch.iter_mut() {
            if *a != vaddr && e.agent == peer.name {
                if let Some(old) = e.conn.take() {
                    old.close(
                        ztna_proto::ErrorCode::Replaced.to_quic().into(),
                        b"replaced by a newer inner connection of the same agent",
                    );
                    replaced += 1;
                }
            }
        }
        replaced
    };
    if replaced > 0 {
        tracing::info!(agent = %peer.name, replaced, "a new inner connection replaced the agent's older one");
    }
    if direct_opts.enabled {
        start_direct(&direct, &direct_opts, &conn, &mux, vaddr, &expected);
    }
    let id = NEXT_AGENT.fetch_add(1, Ordering::Relaxed);
    tracing::info!(agent = %peer.name, channel = ?expected.channel.map(|(_, c)| c.get()), "agent tunnel up");
    gauge_inc(&metrics.agents_connected);
    let (sink, _tcp_writer) = InnerSink::new(conn.clone(), metrics.clone());
    let agent = dataplane.add_agent(id, peer.name.clone(), expected.tunnel_ip, Arc::new(sink));
    let _names = dataplane.agent_names(id).map(|names| {
        AbortOnDrop(tokio::spawn(serve_names(
            conn.clone(),
            names,
            expected.allowed.clone(),
            dataplane.clone(),
            metrics.clone(),
            peer.name.clone(),
        )))
    });
    let reason = loop {
        match conn.read_datagram().await {
            Ok(pkt) => match policy_destination(&pkt, |a| dataplane.v4_equivalent(a)) {
                Some(dst)
                    if !allowed_destination(
                        &expected.allowed.read().unwrap_or_else(|p| p.into_inner()),
                        dataplane.name_services(),
                        dst,
                    ) =>
                {
                    metrics.dropped_not_allowed.fetch_add(1, Ordering::Relaxed);
                    tracing::trace!(agent = %peer.name, "packet to a service policy does not allow; dropped");
                }
                _ => dataplane.handle_packet(&agent, &pkt),
            },
            Err(e) => break e,
        }
    };
    dataplane.remove_agent(id);
    // Forget the channel: the agent opens a new one for its next tunnel.
    let gone = {
        let mut ch = lock(&channels);
        // Ours, or taken away by a newer connection of the same agent (then nothing uses
        // this channel any more).
        let ours = ch.get(&vaddr).is_some_and(|e| {
            e.conn
                .as_ref()
                .is_none_or(|c| c.stable_id() == conn.stable_id())
        });
        if ours {
            ch.remove(&vaddr);
        }
        ours
    };
    if gone {
        lock(&direct).forget(&vaddr);
        mux.remove_route(vaddr);
    }
    gauge_dec(&metrics.agents_connected);
    tracing::info!(agent = %peer.name, reason = %reason, "agent tunnel down");
}

/// Whether policy lets the agent reach `dst`: one of the `allowed` service addresses, or an
/// address in the pool of a name service whose (pool) address is allowed.
fn allowed_destination(allowed: &[Ipv4Addr], name_services: &[ServiceDef], dst: Ipv4Addr) -> bool {
    allowed.contains(&dst)
        || name_services
            .iter()
            .any(|s| s.covers(dst) && allowed.contains(&s.address))
}

/// How long an agent may take to write one name mapping.
const NAME_STREAM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves the agent's name streams: one mapping each, checked against policy
/// ([`crate::names::check_mapping`]), resolved before the answer so that the agent's first
/// packet finds the name's address. At most `transport::NAME_STREAMS` at once (quinn's limit).
async fn serve_names(
    conn: quinn::Connection,
    names: Arc<crate::names::AgentNames>,
    allowed: Arc<RwLock<Vec<Ipv4Addr>>>,
    dataplane: Arc<Dataplane>,
    metrics: Arc<Metrics>,
    agent: String,
) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(serve_name_stream(
            send,
            recv,
            names.clone(),
            allowed.clone(),
            dataplane.clone(),
            metrics.clone(),
            agent.clone(),
        ));
    }
}

async fn serve_name_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    names: Arc<crate::names::AgentNames>,
    allowed: Arc<RwLock<Vec<Ipv4Addr>>>,
    dataplane: Arc<Dataplane>,
    metrics: Arc<Metrics>,
    agent: String,
) {
    use ztna_proto::names::{decode_mapping, MappingVerdict, MAX_MAPPING_LEN};
    let bytes = tokio::time::timeout(NAME_STREAM_TIMEOUT, recv.read_to_end(MAX_MAPPING_LEN)).await;
    let verdict = match bytes.ok().and_then(Result::ok).map(|b| decode_mapping(&b)) {
        Some(Ok(m)) => {
            let allowed = allowed.read().unwrap_or_else(|p| p.into_inner()).clone();
            match crate::names::check_mapping(&m, dataplane.name_services(), &allowed) {
                Ok(svc) => {
                    if names.insert(m.address, m.name.clone()) {
                        tracing::debug!(%agent, service = %svc.name, name = %m.name, address = %m.address, "name mapped");
                        if let Some(r) = dataplane.resolver() {
                            // Resolve now: the agent answers its client only after this, so
                            // the first packet finds the address (a failure is retried then).
                            let _ = r.resolve(&m.name).await;
                        }
                        MappingVerdict::Accepted
                    } else {
                        tracing::debug!(%agent, "name mapping refused: the agent's table is full");
                        MappingVerdict::Full
                    }
                }
                Err(why) => {
                    tracing::warn!(%agent, ?why, "refused a name mapping outside what policy lets this agent reach");
                    tracing::debug!(%agent, name = %m.name, address = %m.address, "refused mapping");
                    MappingVerdict::Refused
                }
            }
        }
        _ => MappingVerdict::Malformed,
    };
    let counter = if verdict == MappingVerdict::Accepted {
        &metrics.names_mappings_accepted
    } else {
        &metrics.names_mappings_refused
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let _ = send.write_all(&[verdict.to_byte()]).await;
    let _ = send.finish();
}

/// Closes the live inner connections of agents that a deny-list or CRL reload refuses: the
/// reload applies to new handshakes in the certificate verifier, and here to what is already
/// up (a denied agent must not keep using its tunnel, on the relay path or a direct one).
async fn close_revoked(
    revocation: Arc<ztna_core::tls::Revocation>,
    channels: Channels,
    metrics: Arc<Metrics>,
) {
    let mut updates = revocation.subscribe();
    while updates.changed().await.is_ok() {
        let ch = lock(&channels);
        for e in ch.values() {
            let Some(conn) = &e.conn else { continue };
            if let Some(why) = revocation.denied_connection(conn) {
                metrics
                    .inner_connections_revoked
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(agent = %e.agent, reason = %why, "closing a live inner connection the reloaded deny list refuses");
                conn.close(why.error_code().to_quic().into(), b"revoked");
            }
        }
    }
}

/// Starts looking for a direct path to the agent of a new tunnel.
fn start_direct(
    direct: &Direct,
    opts: &DirectOptions,
    conn: &quinn::Connection,
    mux: &Arc<MuxSocket>,
    vaddr: SocketAddr,
    expected: &Expected,
) {
    let mut d = lock(direct);
    let Some((relay, channel)) = expected.channel else {
        return;
    };
    let Some((control, observed)) = d.relays.get(&relay).cloned() else {
        return;
    };
    let ctx = DirectContext {
        mux: mux.clone(),
        vaddr,
        channel,
        control,
        observed,
        full_probe_len: d.full_probe_len,
        peer: expected.agent.clone(),
    };
    match DirectPath::start(conn, ctx, opts) {
        Ok(p) => {
            if let Some(c) = d.pending.remove(&vaddr) {
                p.set_peer_candidates(c);
            }
            d.paths.insert(vaddr, p);
        }
        Err(e) => {
            tracing::warn!(agent = %expected.agent, error = %e, "no direct path for this tunnel")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations() {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[16..20].copy_from_slice(&[10, 100, 0, 3]);
        assert_eq!(ipv4_destination(&p), Some(Ipv4Addr::new(10, 100, 0, 3)));
        p[0] = 0x60;
        assert_eq!(ipv4_destination(&p), None);
        assert_eq!(ipv4_destination(&p[..19]), None);
    }

    #[test]
    fn ipv6_packets_meet_policy_as_their_ipv4_service() {
        let svc6: std::net::Ipv6Addr = "fd00:100::1".parse().expect("v6");
        let svc4 = Ipv4Addr::new(10, 100, 0, 3);
        let map = |a: std::net::Ipv6Addr| (a == svc6).then_some(svc4);
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[24..40].copy_from_slice(&svc6.octets());
        assert_eq!(policy_destination(&p, map), Some(svc4));
        // The policy check, given the IPv6 packet's mapped destination as serve_agent gives
        // it, refuses it where the IPv4 service is not allowed and lets it through where it is.
        let dst = policy_destination(&p, map).expect("the IPv6 service address maps");
        assert!(!allowed_destination(
            &[Ipv4Addr::new(10, 100, 0, 4)],
            &[],
            dst
        ));
        assert!(allowed_destination(&[svc4], &[], dst));
        p[39] ^= 1;
        assert_eq!(policy_destination(&p, map), None);
        assert_eq!(policy_destination(&p[..39], map), None);
        let mut v4 = vec![0u8; 20];
        v4[0] = 0x45;
        v4[16..20].copy_from_slice(&svc4.octets());
        assert_eq!(policy_destination(&v4, map), Some(svc4));
    }
}
