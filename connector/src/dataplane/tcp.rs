//! TCP from agents, terminated in userspace by smoltcp and piped to backend `TcpStream`s.
//!
//! One [`AgentTcp`] per agent (spawned on its first TCP packet) owns one task, which owns a
//! smoltcp [`Interface`] whose [`TunnelDevice`] reads a bounded queue of the agent's packets and
//! writes to the agent's [`ToAgent`] sink. The interface accepts any destination address
//! (`any_ip`); `packet::inspect` has already checked the source (the agent's tunnel address) and
//! the destination (a service address and one of its TCP ports) before a packet gets here.
//!
//! Connections: a SYN for a new (agent port, service address, port) starts a connect to the
//! backend and is held. When the connect succeeds, a smoltcp socket is created listening on
//! exactly that endpoint and the SYN is fed to it, so no listener exists in advance and the
//! agent's handshake completes only when the backend is there. When the connect fails (refused,
//! unreachable, or not done within `connect_timeout`), the agent gets an RST for its SYN, which
//! its applications report as "connection refused".
//!
//! Data: bytes move between the smoltcp socket and the backend stream with backpressure both
//! ways: the backend is read only while the socket's transmit buffer has room, and the socket's
//! receive buffer is drained only while the backend stream takes bytes (a full receive buffer
//! closes the window on the agent). FIN and half-close go both ways (agent FIN →
//! `shutdown(Write)` on the backend; backend EOF → `close()` of the socket, which still
//! receives). A reset on either side resets the other; so does the idle timeout.
//!
//! A segment for no connection the stack has (not a SYN: a connection from before a connector
//! restart, say) is answered with RST, as a real host would, so the agent's application fails at
//! once instead of retransmitting into silence (`tcp_reset_unknown`).
//!
//! Bounds: the inbound queue holds [`QUEUE_PACKETS`] packets (more are dropped and counted:
//! TCP retransmits); connections (connecting ones included) are capped per agent *identity*,
//! across all its inner connections, and for the whole connector ([`super::quota`]; SYNs
//! beyond are dropped and counted); a connection whose handshake the agent never completes (no
//! ACK for the SYN-ACK) is reset, and its backend connection closed, after `handshake_timeout`
//! (`tcp_handshake_timeouts`); each connection has two buffers of `buffer_bytes` (default 4 MiB,
//! enough for a window that covers a long fast path) while the connector-wide `buffer_budget`
//! lasts, and two of [`SMALL_BUFFER`] after (`tcp_small_buffers`); buffers are allocated zeroed,
//! so untouched pages cost no memory.

use std::collections::hash_map::{Entry, RandomState};
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{
    HardwareAddress, IpAddress, IpCidr, IpListenEndpoint, Ipv4Address, Ipv6Address,
};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tracing::{debug, trace};
use ztna_core::arena::PacketArena;

use super::packet::{build_tcp_reset, parse_tcp_segment, TcpSegment};
use super::quota::{BufferBudget, BufferGrant, Full, Kind, Limits, Permit};
use super::{TcpClass, ToAgent};
use crate::metrics::{gauge_dec, gauge_inc, Metrics};

/// Packets from one agent waiting for its TCP task; more are dropped.
pub(crate) const QUEUE_PACKETS: usize = 2048;

/// Largest IP packet (IPv4 or IPv6) the connector's TCP sends to an agent (the tunnel's default
/// inner MTU); smoltcp advertises an MSS of this minus the IP and TCP headers (40 bytes over
/// IPv4, 60 over IPv6) and never sends more than the agent's MSS.
const MTU: usize = 1280;

/// How soon the stack is polled again after the tunnel to the agent was full.
const BLOCKED_RETRY: Duration = Duration::from_millis(1);

/// Most packets taken from the queue per wake-up before the task polls the stack.
const BATCH: usize = 256;

/// Bytes a connection may have in its transmit buffer (sent and unacknowledged, or not yet
/// sent) as a sparse flow: its segments go ahead of bulk flows' on the way to the agent
/// ([`ToAgent::send_tcp`]), and it may fill this much from its backend even when the tunnel
/// has no room for bulk data ([`ToAgent::tcp_room`]). At this much the connection becomes a
/// bulk flow until everything it sent was acknowledged and its backend had nothing more: a
/// request, a response of a few segments or a keystroke stays sparse, a download turns bulk
/// within its first window. 16 KiB is 2.6 ms at 50 Mbit/s.
const SPARSE_BYTES: usize = 16 << 10;

/// Address the interface owns for routing only (RFC 7600's dummy address): the default route
/// points at it, so replies to the agent's address are routed without an address of its own.
const PLACEHOLDER: Ipv4Address = Ipv4Address::new(192, 0, 0, 8);

/// The IPv6 counterpart of [`PLACEHOLDER`]: the tunnel prefix's address for it, which no agent
/// is assigned (192.0.0.8 is not in any tunnel pool).
const PLACEHOLDER6: Ipv6Address =
    Ipv6Address::new(0xfd7a, 0x7a74, 0x6e61, 0x7475, 0, 0, 0xc000, 0x0008);

/// Settings of the TCP part of the data plane.
#[derive(Debug, Clone)]
pub(crate) struct TcpConfig {
    /// How long a backend connect may take before the agent's SYN is answered with RST.
    pub(crate) connect_timeout: Duration,
    /// A connection with no bytes or packets either way for this long is reset.
    pub(crate) idle_timeout: Duration,
    /// A connection whose handshake the agent has not completed this long after the backend
    /// connected (no ACK for the SYN-ACK) is reset and its backend connection closed.
    pub(crate) handshake_timeout: Duration,
    /// Most connections (connecting or open) one agent identity may have, over all its tunnels.
    pub(crate) max_per_agent: usize,
    /// Most connections (connecting or open) of all agents together.
    pub(crate) max_total: usize,
    /// Size of each smoltcp socket buffer (receive and transmit, each) while the budget lasts.
    pub(crate) buffer_bytes: usize,
    /// Most bytes of full-size buffers (both directions, all connections) at once; connections
    /// beyond get [`SMALL_BUFFER`] each way.
    pub(crate) buffer_budget: usize,
}

/// Each buffer of a connection opened while the buffer budget is spent (at most
/// `buffer_bytes`): enough for about 100 Mbit/s at 20 ms.
pub(crate) const SMALL_BUFFER: usize = 256 * 1024;

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
            handshake_timeout: Duration::from_secs(5),
            max_per_agent: 1024,
            max_total: 16384,
            buffer_bytes: 4 << 20,
            buffer_budget: 64 << 20,
        }
    }
}

impl TcpConfig {
    /// Smallest and largest accepted `buffer_bytes`.
    pub(crate) const BUFFER_RANGE: std::ops::RangeInclusive<usize> = 4096..=(64 << 20);

    /// Checks the settings.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.connect_timeout.is_zero() {
            return Err("the TCP connect timeout must be greater than zero".into());
        }
        if self.idle_timeout.is_zero() {
            return Err("the TCP idle timeout must be greater than zero".into());
        }
        if self.handshake_timeout.is_zero() {
            return Err("the TCP handshake timeout must be greater than zero".into());
        }
        if self.max_per_agent == 0 || self.max_total == 0 {
            return Err(
                "the maximum numbers of TCP connections (per agent, total) must be at least 1"
                    .into(),
            );
        }
        if !Self::BUFFER_RANGE.contains(&self.buffer_bytes) {
            return Err(format!(
                "the TCP buffer size must be between {} and {} bytes",
                Self::BUFFER_RANGE.start(),
                Self::BUFFER_RANGE.end()
            ));
        }
        if self.buffer_budget > (16 << 30) {
            return Err("the TCP buffer budget must be at most 16 GiB".into());
        }
        Ok(())
    }

    /// The size of each buffer of a new connection and the budget it holds (none when the
    /// connection gets small buffers, or when `buffer_bytes` is small anyway).
    fn buffers(&self, budget: &Arc<BufferBudget>) -> (usize, Option<BufferGrant>) {
        if self.buffer_bytes <= SMALL_BUFFER {
            return (self.buffer_bytes, None);
        }
        match budget.take(2 * self.buffer_bytes) {
            Some(grant) => (self.buffer_bytes, Some(grant)),
            None => (SMALL_BUFFER, None),
        }
    }
}

/// Where a service's TCP goes: the backend address and an optional port override.
/// IPv6 service addresses are keys too; a backend's family is independent of the key's.
pub(crate) type Backends = HashMap<IpAddr, (IpAddr, Option<u16>)>;

/// Where a SYN's connection goes.
enum Target {
    /// A configured backend.
    Address(SocketAddr),
    /// A name service's mapped name, resolved at connect time, and the port.
    Name(Arc<crate::names::Resolver>, String, u16),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Address(a) => write!(f, "{a}"),
            Target::Name(_, name, port) => write!(f, "{name}:{port}"),
        }
    }
}

/// Everything an agent's TCP task needs.
pub(crate) struct AgentCtx {
    /// The agent's id, for logs.
    pub(crate) agent: u64,
    /// Where the agent's packets go.
    pub(crate) sink: Arc<dyn ToAgent>,
    /// Counters.
    pub(crate) metrics: Arc<Metrics>,
    /// Backends by service address.
    pub(crate) backends: Arc<Backends>,
    /// The agent's name mappings, the resolver and the name services, when the connector has
    /// name services: a SYN to a mapped address connects to what its name resolves to now.
    pub(crate) names: Option<AgentNameCtx>,
    /// Settings.
    pub(crate) cfg: TcpConfig,
    /// Connection caps of the agent's identity and of the connector.
    pub(crate) limits: Limits,
    /// The connector's budget for full-size TCP buffers.
    pub(crate) buffers: Arc<BufferBudget>,
}

/// What an agent's TCP task needs for name services.
pub(crate) struct AgentNameCtx {
    /// The agent's name mappings (by IPv4 pool address).
    pub(crate) names: Arc<crate::names::AgentNames>,
    /// The connector's resolver.
    pub(crate) resolver: Arc<crate::names::Resolver>,
    /// The name services, to map an IPv6 pool address to its IPv4 pair.
    pub(crate) services: Arc<[ztna_proto::ServiceDef]>,
}

impl AgentNameCtx {
    /// The name mapped at `addr` (an IPv4 pool address, or the IPv6 one paired with it).
    fn name_of(&self, addr: IpAddr) -> Option<String> {
        let v4 = match addr {
            IpAddr::V4(a) => a,
            IpAddr::V6(a) => super::pool_v4(&self.services, a)?,
        };
        self.names.name_of(v4)
    }
}

/// An agent's TCP engine: the queue into its task. Dropping it aborts the task, which closes
/// every connection of the agent (backend streams are dropped, agents see nothing more).
pub(crate) struct AgentTcp {
    queue: mpsc::Sender<Bytes>,
    task: AbortHandle,
}

impl Drop for AgentTcp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AgentTcp {
    /// Spawns the agent's TCP task. Must be called inside a tokio runtime.
    pub(crate) fn spawn(ctx: AgentCtx) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE_PACKETS);
        let engine = Engine::new(ctx);
        let task = tokio::spawn(engine.run(rx)).abort_handle();
        Self { queue, task }
    }

    /// Queues one packet (already checked by `packet::inspect`) for the task; `false` if the
    /// queue is full or the task is gone (the packet is dropped).
    pub(crate) fn push(&self, packet: &[u8]) -> bool {
        self.queue.try_send(Bytes::copy_from_slice(packet)).is_ok()
    }
}

/// A connection as the agent sees it (the agent's address is implied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    agent_port: u16,
    service: IpAddr,
    port: u16,
}

/// Bytes of one buffer that an agent's TCP segments to it are built in: about 50 segments.
const SEGMENT_ARENA: usize = 64 * 1024;

/// The smoltcp device: packets in from the agent's queue, packets out to its sink.
struct TunnelDevice {
    rx: VecDeque<Bytes>,
    sink: Arc<dyn ToAgent>,
    metrics: Arc<Metrics>,
    /// Set when a transmit found the tunnel full ([`ToAgent::has_room`]); cleared by the run
    /// loop.
    blocked: bool,
    /// The connections that are bulk flows ([`SPARSE_BYTES`]); the pump keeps it.
    bulk: HashSet<Key>,
    /// The connections whose last segment to the agent advertised a closed window: the pure
    /// ACK that opens it goes on the reliable carriage ([`TcpClass::reliable`]). Kept by the
    /// transmit path; the pump removes finished connections.
    closed: HashSet<Key>,
    /// Where segments to the agent are built: no allocation per segment. One per agent with
    /// TCP, so in [`SEGMENT_ARENA`] chunks (small next to one connection's buffers).
    arena: PacketArena,
}

struct RxTok(Bytes);

impl phy::RxToken for RxTok {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.0)
    }
}

struct TxTok<'a> {
    sink: &'a dyn ToAgent,
    metrics: &'a Metrics,
    arena: &'a mut PacketArena,
    bulk: &'a HashSet<Key>,
    closed: &'a mut HashSet<Key>,
}

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let (segment, r) = self.arena.build(len, f);
        self.metrics
            .packets_to_agents
            .fetch_add(1, Ordering::Relaxed);
        self.metrics
            .bytes_to_agents
            .fetch_add(len as u64, Ordering::Relaxed);
        trace!(len, "TCP segment to agent");
        let class = classify(&segment, self.bulk, self.closed);
        self.sink.send_tcp(segment, class);
        r
    }
}

/// How a segment the stack sends to the agent travels ([`TcpClass`]): sparse unless its
/// connection is in `bulk`; reliable unless it is a pure ACK, or when it opens the window its
/// connection had closed (the raw window field 0, kept in `closed`; not for a reset, whose
/// window is 0 and whose connection is gone, so `closed` holds only open connections, which the
/// pump removes when they finish). Whatever does not parse goes reliably, as a sparse flow's.
fn classify(packet: &[u8], bulk: &HashSet<Key>, closed: &mut HashSet<Key>) -> TcpClass {
    let Some(seg) = ztna_core::tcp_carriage::Segment::parse(packet) else {
        return TcpClass {
            sparse: true,
            reliable: true,
        };
    };
    let key = Key {
        agent_port: seg.tcp.destination_port(),
        service: seg.source,
        port: seg.tcp.source_port(),
    };
    let mut reliable = !seg.is_pure_ack();
    if seg.tcp.rst() {
        closed.remove(&key);
    } else if seg.tcp.window_size() == 0 {
        closed.insert(key);
    } else if !closed.is_empty() && closed.remove(&key) {
        reliable = true;
    }
    TcpClass {
        sparse: bulk.is_empty() || !bulk.contains(&key),
        reliable,
    }
}

impl TunnelDevice {
    /// A token that sends one segment to the agent.
    fn tx(&mut self) -> TxTok<'_> {
        TxTok {
            sink: &*self.sink,
            metrics: &self.metrics,
            arena: &mut self.arena,
            bulk: &self.bulk,
            closed: &mut self.closed,
        }
    }
}

impl Device for TunnelDevice {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok<'a>;

    fn receive(
        &mut self,
        _timestamp: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((RxTok(packet), self.tx()))
    }

    fn transmit(&mut self, _timestamp: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        if !self.sink.has_room() {
            // Segments wait in their sockets until the tunnel drains (the run loop retries in
            // `BLOCKED_RETRY`); smoltcp sends them then, in order.
            self.blocked = true;
            return None;
        }
        Some(self.tx())
    }

    fn capabilities(&self) -> DeviceCapabilities {
        device_capabilities()
    }
}

/// The stack's device: IP packets of the tunnel's MTU. Checksums are computed on what the stack
/// sends and not verified on what it receives: `packet::inspect` already checked each IPv4
/// header's, and every segment came through the agent's inner QUIC connection, whose AEAD
/// proved it is what the agent sent, so a TCP checksum could only catch the agent's own
/// mistake, which reaches nothing but that agent's connection. Verifying took about 1 % of the
/// connector's time in a single-stream upload (`bench/README.md`, "The connector's per-segment
/// costs").
fn device_capabilities() -> DeviceCapabilities {
    let mut caps = DeviceCapabilities::default();
    caps.medium = Medium::Ip;
    caps.max_transmission_unit = MTU;
    caps.checksum.ipv4 = phy::Checksum::Tx;
    caps.checksum.tcp = phy::Checksum::Tx;
    caps
}

/// One open connection: its smoltcp socket and the backend stream.
struct Conn {
    handle: SocketHandle,
    /// `None` once the connection was reset (the socket is removed after its RST went out).
    stream: Option<TcpStream>,
    /// The backend sent EOF (and the socket was closed).
    backend_eof: bool,
    /// The agent sent FIN (seen in the socket's state).
    agent_fin: bool,
    /// The backend stream's write half was shut down.
    shut_wr: bool,
    /// Waiting for the backend to become readable / writable.
    want_read: bool,
    want_write: bool,
    /// A bulk flow ([`SPARSE_BYTES`]).
    bulk: bool,
    last_active: Instant,
    /// When the backend connected and the agent's SYN was taken.
    opened: Instant,
    metrics: Arc<Metrics>,
    /// The connection's slot in the identity's and the connector's caps.
    _permit: Permit,
    /// Its share of the buffer budget, if it has full-size buffers.
    _buffers: Option<BufferGrant>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        gauge_dec(&self.metrics.tcp_flows_active);
    }
}

/// A connection's slot in the table.
enum Slot {
    /// Connecting to the backend; the agent's SYN waits here.
    Connecting {
        syn: Bytes,
        permit: Permit,
    },
    Open(Box<Conn>),
}

/// What a connection's pump decided.
enum Verdict {
    Keep,
    Remove,
}

/// Result of one backend connect.
type Connected = (Key, io::Result<TcpStream>);

/// What woke the task.
enum Wake {
    Packet(Option<Bytes>),
    Connected(Option<Result<(tokio::task::Id, Connected), tokio::task::JoinError>>),
    Ready,
    Timer,
}

/// One agent's TCP stack and connections. Runs in its own task (see [`Engine::run`]).
struct Engine {
    ctx: AgentCtx,
    iface: Interface,
    device: TunnelDevice,
    sockets: SocketSet<'static>,
    conns: HashMap<Key, Slot>,
    connecting: JoinSet<Connected>,
    /// Which connection each connect task is for (to clean up if one panicked).
    connect_tasks: HashMap<tokio::task::Id, Key>,
    epoch: Instant,
}

impl Engine {
    fn new(ctx: AgentCtx) -> Self {
        let mut device = TunnelDevice {
            rx: VecDeque::new(),
            sink: ctx.sink.clone(),
            metrics: ctx.metrics.clone(),
            blocked: false,
            bulk: HashSet::new(),
            closed: HashSet::new(),
            arena: PacketArena::with_chunk(SEGMENT_ARENA),
        };
        let mut config = IfaceConfig::new(HardwareAddress::Ip);
        config.random_seed = RandomState::new().build_hasher().finish();
        let epoch = Instant::now();
        let mut iface = Interface::new(config, &mut device, smoltcp::time::Instant::ZERO);
        iface.set_any_ip(true);
        iface.update_ip_addrs(|addrs| {
            // Capacity is two addresses (smoltcp's default IFACE_MAX_ADDR_COUNT), one of each
            // family; nothing else is added.
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(PLACEHOLDER), 32));
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv6(PLACEHOLDER6), 128));
        });
        // Fail only when the route table is full; it is empty here.
        let _ = iface.routes_mut().add_default_ipv4_route(PLACEHOLDER);
        let _ = iface.routes_mut().add_default_ipv6_route(PLACEHOLDER6);
        Self {
            ctx,
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            conns: HashMap::new(),
            connecting: JoinSet::new(),
            connect_tasks: HashMap::new(),
            epoch,
        }
    }

    fn stamp(&self, now: Instant) -> smoltcp::time::Instant {
        let micros = now.saturating_duration_since(self.epoch).as_micros();
        smoltcp::time::Instant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    /// The task: ingest packets, poll the stack, move bytes, wait for the next event.
    async fn run(mut self, mut rx: mpsc::Receiver<Bytes>) {
        let sweep_period = (self.ctx.cfg.idle_timeout / 4)
            .min(self.ctx.cfg.handshake_timeout / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(5));
        let mut sweep_at = Instant::now() + sweep_period;
        loop {
            let now = Instant::now();
            for _ in 0..BATCH {
                match rx.try_recv() {
                    Ok(p) => self.ingest(p, now),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                }
            }
            self.poll(now);
            let starved = self.pump(now);
            self.poll(now);
            if now >= sweep_at {
                self.sweep(now);
                self.poll(now);
                sweep_at = now + sweep_period;
            }
            let stamp = self.stamp(now);
            let mut deadline = match self.iface.poll_delay(stamp, &self.sockets) {
                Some(d) => (now + Duration::from_micros(d.total_micros())).min(sweep_at),
                None => sweep_at,
            };
            if starved {
                // A bulk flow left bytes at its backend for want of room: look again when the
                // writer may have made some.
                deadline = deadline.min(now + BLOCKED_RETRY);
                self.ctx
                    .metrics
                    .tcp_tunnel_full
                    .fetch_add(1, Ordering::Relaxed);
            }
            if std::mem::take(&mut self.device.blocked) {
                // The stack has segments the tunnel can't take yet: look again shortly rather
                // than spin (smoltcp asks to be polled at once while it has something to send).
                deadline = deadline.max(now + BLOCKED_RETRY);
                self.ctx
                    .metrics
                    .tcp_tunnel_full
                    .fetch_add(1, Ordering::Relaxed);
            }
            let wake = {
                let conns = &self.conns;
                let connecting = &mut self.connecting;
                tokio::select! {
                    p = rx.recv() => Wake::Packet(p),
                    c = connecting.join_next_with_id(), if !connecting.is_empty() => Wake::Connected(c),
                    () = std::future::poll_fn(|cx| backends_ready(conns, cx)) => Wake::Ready,
                    () = tokio::time::sleep_until(deadline) => Wake::Timer,
                }
            };
            match wake {
                Wake::Packet(Some(p)) => self.ingest(p, Instant::now()),
                Wake::Packet(None) => return,
                Wake::Connected(Some(Ok((id, (key, result))))) => {
                    self.connect_tasks.remove(&id);
                    self.connected(key, result);
                }
                Wake::Connected(Some(Err(e))) => {
                    // Cannot happen (the task neither panics nor is aborted while we run).
                    if let Some(key) = self.connect_tasks.remove(&e.id()) {
                        self.conns.remove(&key);
                    }
                }
                Wake::Connected(None) | Wake::Ready | Wake::Timer => {}
            }
        }
    }

    /// Polls the stack: feeds it the queued packets and sends what it has to send.
    fn poll(&mut self, now: Instant) {
        let stamp = self.stamp(now);
        self.iface.poll(stamp, &mut self.device, &mut self.sockets);
    }

    /// Takes one packet from the agent.
    fn ingest(&mut self, packet: Bytes, now: Instant) {
        let Some(seg) = parse_tcp_segment(&packet) else {
            return; // inspect() already checked it
        };
        match self.conns.get_mut(&key_of(&seg)) {
            Some(Slot::Connecting { .. }) => {
                trace!(
                    agent = self.ctx.agent,
                    "segment while connecting to the backend"
                );
            }
            Some(Slot::Open(conn)) => {
                conn.last_active = now;
                self.device.rx.push_back(packet);
            }
            None if seg.syn && !seg.ack && !seg.rst => self.open(key_of(&seg), packet),
            None if seg.rst => {}
            // Not a connection we have (from before a restart, or closed): RST, as a host would.
            None => {
                if let Some(rst) = build_tcp_reset(&packet) {
                    let m = &self.ctx.metrics;
                    m.tcp_reset_unknown.fetch_add(1, Ordering::Relaxed);
                    m.packets_to_agents.fetch_add(1, Ordering::Relaxed);
                    m.bytes_to_agents
                        .fetch_add(rst.len() as u64, Ordering::Relaxed);
                    trace!(
                        agent = self.ctx.agent,
                        "segment for no connection; sent RST"
                    );
                    self.ctx.sink.send(Bytes::from(rst));
                }
            }
        }
    }

    /// A SYN for a new connection: connect to the backend (within the per-agent cap).
    fn open(&mut self, key: Key, syn: Bytes) {
        let m = &self.ctx.metrics;
        let permit = match self.ctx.limits.acquire(Kind::Tcp) {
            Ok(p) => p,
            Err(full) => {
                match full {
                    Full::Identity => m.dropped_flow_limit.fetch_add(1, Ordering::Relaxed),
                    Full::Global => m.dropped_global_limit.fetch_add(1, Ordering::Relaxed),
                };
                trace!(
                    agent = self.ctx.agent,
                    ?full,
                    "SYN dropped: at a TCP connection limit"
                );
                return;
            }
        };
        let target = match self.ctx.backends.get(&key.service) {
            Some(&(backend, backend_port)) => {
                Target::Address(SocketAddr::new(backend, backend_port.unwrap_or(key.port)))
            }
            None => {
                // inspect() only accepts service addresses and mapped name-service addresses.
                let Some(names) = &self.ctx.names else {
                    return;
                };
                let Some(name) = names.name_of(key.service) else {
                    return;
                };
                Target::Name(names.resolver.clone(), name, key.port)
            }
        };
        let addr = target.to_string();
        let timeout = self.ctx.cfg.connect_timeout;
        let metrics = self.ctx.metrics.clone();
        let task = self.connecting.spawn(async move {
            let addr = match target {
                Target::Address(a) => Some(a),
                // Resolved when the first packet (the SYN) arrives; a name whose address
                // expired is resolved again, and open connections keep theirs.
                Target::Name(resolver, name, port) => resolver
                    .resolve(&name)
                    .await
                    .map(|ip| SocketAddr::new(ip, port)),
            };
            let Some(addr) = addr else {
                metrics
                    .dropped_name_unresolved
                    .fetch_add(1, Ordering::Relaxed);
                return (
                    key,
                    Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        "the service's name does not resolve",
                    )),
                );
            };
            let result = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "backend connect timed out",
                )),
            };
            (key, result)
        });
        self.connect_tasks.insert(task.id(), key);
        debug!(agent = self.ctx.agent, %addr, port = key.port, "TCP connect to backend");
        self.conns.insert(key, Slot::Connecting { syn, permit });
    }

    /// A backend connect finished: accept the held SYN, or refuse it with RST.
    fn connected(&mut self, key: Key, result: io::Result<TcpStream>) {
        let now = Instant::now();
        let Entry::Occupied(entry) = self.conns.entry(key) else {
            return;
        };
        if !matches!(entry.get(), Slot::Connecting { .. }) {
            return;
        }
        let Slot::Connecting { syn, permit } = entry.remove() else {
            return;
        };
        let m = self.ctx.metrics.clone();
        let stream = match result {
            Ok(stream) => stream,
            Err(e) => {
                m.tcp_refused.fetch_add(1, Ordering::Relaxed);
                if e.kind() == io::ErrorKind::TimedOut {
                    m.tcp_connect_timeouts.fetch_add(1, Ordering::Relaxed);
                }
                debug!(agent = self.ctx.agent, port = key.port, error = %e, "backend connect failed; refusing with RST");
                if let Some(rst) = build_tcp_reset(&syn) {
                    m.packets_to_agents.fetch_add(1, Ordering::Relaxed);
                    m.bytes_to_agents
                        .fetch_add(rst.len() as u64, Ordering::Relaxed);
                    self.ctx.sink.send(Bytes::from(rst));
                }
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let (size, buffers) = self.ctx.cfg.buffers(&self.ctx.buffers);
        if size < self.ctx.cfg.buffer_bytes {
            m.tcp_small_buffers.fetch_add(1, Ordering::Relaxed);
        }
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; size]),
            tcp::SocketBuffer::new(vec![0u8; size]),
        );
        socket.set_nagle_enabled(false);
        // No congestion control of smoltcp's own: its segments cross the path on the reliable
        // carriage stream, paced and bounded by the inner connection's controller
        // (`core::congestion`), and wait here while the tunnel has no room
        // (`ToAgent::has_room`), so smoltcp sees neither loss nor a queue to react to. Its
        // slow start grew the window by one MSS per ACK, and the agent's kernel acknowledges
        // a GRO-coalesced write of up to 45 segments with one ACK: a download through 150 ms
        // took most of a 5-s test to open its window (docs/architecture.md, "Long paths").
        socket.set_congestion_control(tcp::CongestionControl::None);
        let endpoint = IpListenEndpoint {
            addr: Some(IpAddress::from(key.service)),
            port: key.port,
        };
        if socket.listen(endpoint).is_err() {
            return; // port 0: inspect() never lets one through
        }
        // Drain anything queued first, so the SYN meets this listener and no other.
        self.poll(now);
        let handle = self.sockets.add(socket);
        self.device.rx.push_back(syn);
        self.poll(now);
        let socket = self.sockets.get::<tcp::Socket>(handle);
        if socket.state() == tcp::State::Listen {
            // smoltcp did not take the SYN (one it cannot parse): forget it; the agent retries.
            self.sockets.remove(handle);
            return;
        }
        m.tcp_flows_opened.fetch_add(1, Ordering::Relaxed);
        gauge_inc(&m.tcp_flows_active);
        debug!(
            agent = self.ctx.agent,
            port = key.port,
            "TCP connection accepted"
        );
        self.conns.insert(
            key,
            Slot::Open(Box::new(Conn {
                handle,
                stream: Some(stream),
                backend_eof: false,
                agent_fin: false,
                shut_wr: false,
                want_read: false,
                want_write: false,
                bulk: false,
                last_active: now,
                opened: now,
                metrics: m,
                _permit: permit,
                _buffers: buffers,
            })),
        );
    }

    /// Moves bytes for every open connection, within the tunnel's room for bulk data, and
    /// removes finished ones; whether a connection left bytes at its backend for want of room.
    fn pump(&mut self, now: Instant) -> bool {
        let mut finished = Vec::new();
        let mut room = self.ctx.sink.tcp_room();
        let mut starved = false;
        for (key, slot) in &mut self.conns {
            let Slot::Open(conn) = slot else { continue };
            let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            let was_bulk = conn.bulk;
            let verdict = pump_one(conn, socket, now, &mut room, &mut starved);
            if conn.bulk != was_bulk {
                if conn.bulk {
                    self.device.bulk.insert(*key);
                } else {
                    self.device.bulk.remove(key);
                }
            }
            if let Verdict::Remove = verdict {
                finished.push(*key);
            }
        }
        for key in finished {
            self.device.bulk.remove(&key);
            self.device.closed.remove(&key);
            if let Some(Slot::Open(conn)) = self.conns.remove(&key) {
                self.sockets.remove(conn.handle);
                debug!(
                    agent = self.ctx.agent,
                    port = key.port,
                    "TCP connection closed"
                );
            }
        }
        starved
    }

    /// Resets connections idle for longer than the idle timeout, and those whose handshake
    /// the agent did not complete within the handshake timeout.
    fn sweep(&mut self, now: Instant) {
        let idle = self.ctx.cfg.idle_timeout;
        let handshake = self.ctx.cfg.handshake_timeout;
        for slot in self.conns.values_mut() {
            let Slot::Open(conn) = slot else { continue };
            if conn.stream.is_none() {
                continue;
            }
            let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            // Listen: the agent reset the half-open connection, and smoltcp went back to
            // listening on its endpoint; SynReceived: no ACK for the SYN-ACK yet.
            let half_open = matches!(socket.state(), tcp::State::Listen | tcp::State::SynReceived);
            if half_open && now.saturating_duration_since(conn.opened) >= handshake {
                conn.metrics
                    .tcp_handshake_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                debug!(
                    agent = self.ctx.agent,
                    port = conn_port(socket),
                    "TCP handshake not completed in time; backend connection closed"
                );
                reset(conn, socket);
            } else if now.saturating_duration_since(conn.last_active) >= idle {
                conn.metrics
                    .tcp_flows_expired
                    .fetch_add(1, Ordering::Relaxed);
                reset(conn, socket);
            }
        }
    }
}

/// A connection's key from a segment's headers.
fn key_of(seg: &TcpSegment) -> Key {
    Key {
        agent_port: seg.agent_port,
        service: seg.service,
        port: seg.port,
    }
}

/// The service port of a socket, for logs.
fn conn_port(socket: &tcp::Socket<'_>) -> u16 {
    socket.local_endpoint().map_or(0, |e| e.port)
}

/// Resets a connection on both sides: RST to the agent (sent by the next poll, after which the
/// socket is removed) and to the backend (linger 0, then close).
fn reset(conn: &mut Conn, socket: &mut tcp::Socket<'_>) {
    socket.abort();
    if let Some(stream) = conn.stream.take() {
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    }
    conn.metrics.tcp_reset.fetch_add(1, Ordering::Relaxed);
}

/// What a non-blocking read or write in a socket buffer callback did.
enum Io {
    Moved(usize),
    Eof,
    /// The buffer had no room (send) or nothing (recv).
    Nothing,
    Err(io::Error),
}

/// Moves bytes between one socket and its backend stream (see the module docs), taking from
/// the backend at most `room` bytes (less what it takes) for a bulk flow, and up to
/// [`SPARSE_BYTES`] in the transmit buffer for a sparse one; then classifies the connection.
/// Sets `starved` if it left bytes at the backend for want of room.
fn pump_one(
    conn: &mut Conn,
    socket: &mut tcp::Socket<'_>,
    now: Instant,
    room: &mut usize,
    starved: &mut bool,
) -> Verdict {
    conn.want_read = false;
    conn.want_write = false;
    let mut held = false;
    let Some(stream) = conn.stream.as_ref() else {
        // Reset earlier; its RST has gone out with the last poll.
        return Verdict::Remove;
    };
    let mut moved = 0usize;
    let mut failed = None;

    // Agent → backend, while the backend takes bytes.
    while socket.can_recv() {
        let r = socket.recv(|buf| match stream.try_write(buf) {
            Ok(n) => (n, Io::Moved(n)),
            Err(e) => (0, Io::Err(e)),
        });
        match r {
            Ok(Io::Moved(n)) if n > 0 => {
                moved += n;
                conn.metrics
                    .tcp_bytes_to_backends
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            Ok(Io::Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                conn.want_write = true;
                break;
            }
            Ok(Io::Err(e)) => {
                failed = Some(e);
                break;
            }
            _ => break,
        }
    }

    use tcp::State::*;
    let state = socket.state();
    if matches!(state, CloseWait | LastAck | Closing | TimeWait) {
        conn.agent_fin = true;
    }
    // Agent FIN → backend half-close, once everything before it was written.
    if failed.is_none() && conn.agent_fin && !conn.shut_wr && !socket.can_recv() {
        conn.shut_wr = true;
        if let Err(e) = shutdown_write(stream) {
            failed = Some(e);
        }
    }

    // Backend → agent, while the socket's transmit buffer and the tunnel have room.
    while failed.is_none() && !conn.backend_eof && socket.may_send() {
        if socket.send_queue() >= socket.send_capacity() {
            break; // full: the backend waits (backpressure)
        }
        let allowed = if conn.bulk {
            *room
        } else {
            (*room).max(SPARSE_BYTES.saturating_sub(socket.send_queue()))
        };
        if allowed == 0 {
            held = true; // looked at again shortly (`BLOCKED_RETRY`)
            break;
        }
        let r = socket.send(|buf| {
            let len = buf.len().min(allowed);
            let buf = &mut buf[..len];
            if buf.is_empty() {
                return (0, Io::Nothing);
            }
            match stream.try_read(buf) {
                Ok(0) => (0, Io::Eof),
                Ok(n) => (n, Io::Moved(n)),
                Err(e) => (0, Io::Err(e)),
            }
        });
        match r {
            Ok(Io::Moved(n)) => {
                moved += n;
                *room = room.saturating_sub(n);
                conn.metrics
                    .tcp_bytes_from_backends
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            Ok(Io::Eof) => {
                conn.backend_eof = true;
                socket.close();
            }
            Ok(Io::Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                conn.want_read = true;
                break;
            }
            Ok(Io::Err(e)) => failed = Some(e),
            _ => break,
        }
    }
    if moved > 0 {
        conn.last_active = now;
    }
    // Bulk from a full allowance on; sparse again once everything was acknowledged and the
    // backend had no more (a download held back for room stays bulk).
    match socket.send_queue() {
        0 if !held => conn.bulk = false,
        q if q >= SPARSE_BYTES => conn.bulk = true,
        _ => {}
    }
    *starved |= held;

    if let Some(e) = failed {
        trace!(error = %e, "backend stream failed; resetting the connection");
        reset(conn, socket);
        return Verdict::Keep; // removed on the next pump, after the RST went out
    }
    match socket.state() {
        Closed | TimeWait => {
            let graceful = conn.agent_fin && conn.backend_eof;
            if !graceful {
                // The agent reset the connection: reset the backend too.
                reset(conn, socket);
                Verdict::Remove
            } else if socket.can_recv() {
                Verdict::Keep // still writing the agent's last bytes to the backend
            } else {
                Verdict::Remove
            }
        }
        _ => Verdict::Keep,
    }
}

/// Shuts down the write half of a backend stream (tokio's `shutdown` needs `&mut` and an await).
fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    socket2::SockRef::from(stream).shutdown(Shutdown::Write)
}

/// Ready when a backend stream the engine waits on became readable or writable.
fn backends_ready(conns: &HashMap<Key, Slot>, cx: &mut Context<'_>) -> Poll<()> {
    let mut ready = false;
    for slot in conns.values() {
        let Slot::Open(conn) = slot else { continue };
        let Some(stream) = conn.stream.as_ref() else {
            continue;
        };
        if conn.want_read && stream.poll_read_ready(cx).is_ready() {
            ready = true;
        }
        if conn.want_write && stream.poll_write_ready(cx).is_ready() {
            ready = true;
        }
    }
    if ready {
        Poll::Ready(())
    } else {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::super::{BackendService, Dataplane, DataplaneConfig, IcmpMode};
    use super::*;
    use etherparse::{Ipv4HeaderSlice, PacketBuilder, TcpHeaderSlice};
    use std::net::{Ipv4Addr, Ipv6Addr};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use ztna_proto::{PortRange, ServiceDef};

    const AGENT_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
    const SVC_IP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
    const SVC_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);

    fn agent_ip6() -> Ipv6Addr {
        ztna_proto::service::tunnel_ipv6(AGENT_IP)
    }
    const LIMIT: Duration = Duration::from_secs(20);

    /// The agent's tunnel: packets for the agent go into an unbounded channel; it has room
    /// while the flag says so, and room for bulk data as the second counter says. It records
    /// each data segment's agent port, length and class (sparse), and each pure ACK's window
    /// field and class (reliable).
    struct Feed(
        mpsc::UnboundedSender<Bytes>,
        Arc<std::sync::atomic::AtomicBool>,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<std::sync::Mutex<Vec<(u16, usize, bool)>>>,
        Arc<std::sync::Mutex<Vec<(u16, bool)>>>,
    );

    impl Feed {
        fn new(tx: mpsc::UnboundedSender<Bytes>) -> Self {
            Self(
                tx,
                Arc::new(std::sync::atomic::AtomicBool::new(true)),
                Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX)),
                Arc::default(),
                Arc::default(),
            )
        }
    }

    impl ToAgent for Feed {
        fn send(&self, packet: Bytes) {
            let _ = self.0.send(packet);
        }

        fn has_room(&self) -> bool {
            self.1.load(Ordering::Relaxed)
        }

        fn tcp_room(&self) -> usize {
            self.2.load(Ordering::Relaxed)
        }

        fn send_tcp(&self, packet: Bytes, class: TcpClass) {
            if let Some(seg) = ztna_core::tcp_carriage::Segment::parse(&packet) {
                let data = seg.payload_len;
                if data > 0 {
                    assert!(class.reliable, "a data segment goes on the carriage");
                    let port = seg.tcp.destination_port();
                    let mut segs = self.3.lock().unwrap_or_else(|p| p.into_inner());
                    segs.push((port, data, class.sparse));
                } else if seg.is_pure_ack() {
                    let mut acks = self.4.lock().unwrap_or_else(|p| p.into_inner());
                    acks.push((seg.tcp.window_size(), class.reliable));
                }
            }
            self.send(packet);
        }
    }

    /// The client's smoltcp device: what the client sends is collected for the data plane.
    #[derive(Default)]
    struct ClientDevice {
        rx: VecDeque<Bytes>,
        tx: Vec<Vec<u8>>,
    }

    struct ClientTx<'a>(&'a mut Vec<Vec<u8>>);

    impl phy::TxToken for ClientTx<'_> {
        fn consume<R, F>(self, len: usize, f: F) -> R
        where
            F: FnOnce(&mut [u8]) -> R,
        {
            let mut buf = vec![0u8; len];
            let r = f(&mut buf);
            self.0.push(buf);
            r
        }
    }

    impl Device for ClientDevice {
        type RxToken<'a> = RxTok;
        type TxToken<'a> = ClientTx<'a>;

        fn receive(
            &mut self,
            _: smoltcp::time::Instant,
        ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
            let p = self.rx.pop_front()?;
            Some((RxTok(p), ClientTx(&mut self.tx)))
        }

        fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
            Some(ClientTx(&mut self.tx))
        }

        fn capabilities(&self) -> DeviceCapabilities {
            let mut caps = DeviceCapabilities::default();
            caps.medium = Medium::Ip;
            caps.max_transmission_unit = MTU;
            caps
        }
    }

    /// The agent's side: a smoltcp stack wired to the data plane.
    struct Client {
        iface: Interface,
        dev: ClientDevice,
        sockets: SocketSet<'static>,
        dp: Arc<Dataplane>,
        metrics: Arc<Metrics>,
        /// Whether the tunnel to the client has room (the data plane's TCP sends only then).
        room: Arc<std::sync::atomic::AtomicBool>,
        /// The tunnel's room for bulk data ([`ToAgent::tcp_room`]).
        bulk_room: Arc<std::sync::atomic::AtomicUsize>,
        /// The data segments sent to the client: agent port, bytes, sparse.
        segments: Arc<std::sync::Mutex<Vec<(u16, usize, bool)>>>,
        /// The pure ACKs sent to the client: window field, reliable.
        acks: Arc<std::sync::Mutex<Vec<(u16, bool)>>>,
        from_dp: mpsc::UnboundedReceiver<Bytes>,
        epoch: Instant,
        next_port: u16,
    }

    impl Client {
        fn new(backend_port: u16, tcp: TcpConfig) -> Self {
            Self::with_backend(Ipv4Addr::LOCALHOST.into(), Some(backend_port), tcp)
        }

        fn with_backend(backend: IpAddr, backend_port: Option<u16>, tcp: TcpConfig) -> Self {
            let metrics = Arc::new(Metrics::default());
            let service = BackendService {
                def: ServiceDef {
                    name: "web".into(),
                    address: SVC_IP,
                    address6: Some(SVC_IP6),
                    udp: vec![],
                    tcp: vec![PortRange::single(80), PortRange::single(443)],
                    icmp: false,
                    connector: String::new(),
                    names: None,
                },
                backend,
                backend_port,
            };
            let cfg = DataplaneConfig {
                udp_idle_timeout: Duration::from_secs(30),
                max_flows_per_agent: 8,
                max_flows_total: 1 << 16,
                icmp: IcmpMode::Local,
                tcp,
            };
            let dp = Dataplane::new(vec![service], cfg, metrics.clone()).expect("data plane");
            let (tx, from_dp) = mpsc::unbounded_channel();
            let feed = Feed::new(tx);
            let room = feed.1.clone();
            let bulk_room = feed.2.clone();
            let segments = feed.3.clone();
            let acks = feed.4.clone();
            dp.add_agent(1, "alice".into(), AGENT_IP, Arc::new(feed));
            let mut dev = ClientDevice::default();
            let mut iface = Interface::new(
                IfaceConfig::new(HardwareAddress::Ip),
                &mut dev,
                smoltcp::time::Instant::ZERO,
            );
            iface.update_ip_addrs(|a| {
                a.push(IpCidr::new(IpAddress::Ipv4(AGENT_IP), 32))
                    .expect("address");
                a.push(IpCidr::new(IpAddress::Ipv6(agent_ip6()), 128))
                    .expect("address");
            });
            iface
                .routes_mut()
                .add_default_ipv4_route(AGENT_IP)
                .expect("route");
            iface
                .routes_mut()
                .add_default_ipv6_route(agent_ip6())
                .expect("route");
            Self {
                iface,
                dev,
                sockets: SocketSet::new(Vec::new()),
                dp,
                metrics,
                room,
                bulk_room,
                segments,
                acks,
                from_dp,
                epoch: Instant::now(),
                next_port: 40000,
            }
        }

        fn stamp(&self) -> smoltcp::time::Instant {
            smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
        }

        fn connect(&mut self, port: u16, buffer: usize) -> SocketHandle {
            self.connect_to(IpAddress::Ipv4(SVC_IP), port, buffer)
        }

        fn connect_to(&mut self, service: IpAddress, port: u16, buffer: usize) -> SocketHandle {
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0u8; buffer]),
                tcp::SocketBuffer::new(vec![0u8; buffer]),
            );
            self.next_port += 1;
            s.connect(self.iface.context(), (service, port), self.next_port)
                .expect("connect");
            self.sockets.add(s)
        }

        fn sock(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
            self.sockets.get_mut::<tcp::Socket>(h)
        }

        /// Polls the client stack and hands what it sent to the data plane.
        fn poll(&mut self) {
            let stamp = self.stamp();
            self.iface.poll(stamp, &mut self.dev, &mut self.sockets);
            for p in self.dev.tx.drain(..) {
                self.dp.handle_from_agent(1, &p);
            }
        }

        /// Polls, then waits for a packet from the data plane or the client's next timer.
        async fn step(&mut self) {
            self.poll();
            let stamp = self.stamp();
            let delay = self
                .iface
                .poll_delay(stamp, &self.sockets)
                .map_or(Duration::from_millis(20), |d| {
                    Duration::from_micros(d.total_micros())
                })
                .min(Duration::from_millis(20));
            tokio::select! {
                p = self.from_dp.recv() => {
                    if let Some(p) = p {
                        self.dev.rx.push_back(p);
                    }
                    while let Ok(p) = self.from_dp.try_recv() {
                        self.dev.rx.push_back(p);
                    }
                }
                () = tokio::time::sleep(delay) => {}
            }
            self.poll();
        }

        /// Steps until `cond` holds.
        async fn until(&mut self, what: &str, mut cond: impl FnMut(&mut Self) -> bool) {
            let deadline = Instant::now() + LIMIT;
            while !cond(self) {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                self.step().await;
            }
        }

        /// Reads what the socket has into `out`.
        fn read(&mut self, h: SocketHandle, out: &mut Vec<u8>) {
            let s = self.sock(h);
            while s.can_recv() {
                let _ = s.recv(|b| {
                    out.extend_from_slice(b);
                    (b.len(), ())
                });
            }
        }
    }

    fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// A backend listener on loopback and its port.
    async fn listener() -> (TcpListener, u16) {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        (l, port)
    }

    /// A backend on loopback that echoes everything and closes after the client's EOF.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    async fn in_time<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(LIMIT + Duration::from_secs(5), f)
            .await
            .expect("test in time")
    }

    /// A SYN to a name service's IPv6 pool address finds the name mapped at the paired IPv4
    /// address; an address of no pool, or an unmapped one, finds none.
    #[tokio::test]
    async fn name_of_an_ipv6_pool_address() {
        let metrics = Arc::new(Metrics::default());
        let svc = ServiceDef {
            name: "wiki".into(),
            address: Ipv4Addr::new(10, 101, 0, 0),
            address6: Some(Ipv6Addr::new(0xfd00, 0x101, 0, 0, 0, 0, 0, 0)),
            udp: vec![],
            tcp: vec![PortRange::single(80)],
            icmp: false,
            connector: String::new(),
            names: Some(ztna_proto::NamePool {
                patterns: vec!["wiki.corp.example".into()],
                prefix_len: 24,
            }),
        };
        let names = Arc::new(crate::names::AgentNames::new(8));
        assert!(names.insert(Ipv4Addr::new(10, 101, 0, 7), "wiki.corp.example".into()));
        let ctx = AgentNameCtx {
            names,
            resolver: crate::names::Resolver::new(vec![], Duration::from_secs(60), 8, metrics)
                .expect("resolver"),
            services: vec![svc].into(),
        };
        let at = |last: u16| IpAddr::V6(Ipv6Addr::new(0xfd00, 0x101, 0, 0, 0, 0, 0, last));
        assert_eq!(ctx.name_of(at(7)).as_deref(), Some("wiki.corp.example"));
        assert_eq!(
            ctx.name_of(Ipv4Addr::new(10, 101, 0, 7).into()).as_deref(),
            Some("wiki.corp.example")
        );
        assert_eq!(ctx.name_of(at(8)), None);
        assert_eq!(ctx.name_of(SVC_IP6.into()), None);
    }

    /// An echoing backend on `ip` (closes after the client's EOF).
    async fn echo_backend_on(ip: IpAddr) -> (u16, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind((ip, 0)).await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        (port, task)
    }

    /// Handshake, data both ways and close over IPv6 to the service's IPv6 address, with a
    /// backend of family `backend`.
    async fn ipv6_round_trip(backend: IpAddr) {
        let (port, server) = echo_backend_on(backend).await;
        let mut c = Client::with_backend(backend, Some(port), TcpConfig::default());
        let h = c.connect_to(IpAddress::Ipv6(SVC_IP6), 80, 65536);
        c.until("established", |c| c.sock(h).may_send()).await;
        assert_eq!(get(&c.metrics.tcp_flows_opened), 1);
        let data = pattern(100_000);
        let mut sent = 0;
        let mut got = Vec::new();
        c.until("the echo", |c| {
            if sent < data.len() {
                sent += c.sock(h).send_slice(&data[sent..]).unwrap_or(0);
            }
            c.read(h, &mut got);
            got.len() >= data.len()
        })
        .await;
        assert_eq!(got, data);
        c.sock(h).close();
        c.until("the connection to close", |c| {
            get(&c.metrics.tcp_flows_active) == 0
        })
        .await;
        assert_eq!(get(&c.metrics.tcp_reset), 0);
        assert_eq!(get(&c.metrics.dropped_spoofed_source), 0);
        server.abort();
    }

    #[tokio::test]
    async fn ipv6_to_an_ipv6_backend() {
        in_time(ipv6_round_trip(Ipv6Addr::LOCALHOST.into())).await;
    }

    #[tokio::test]
    async fn ipv6_to_an_ipv4_backend() {
        in_time(ipv6_round_trip(Ipv4Addr::LOCALHOST.into())).await;
    }

    #[tokio::test]
    async fn ipv4_to_an_ipv6_backend() {
        in_time(async {
            let (port, server) = echo_backend_on(Ipv6Addr::LOCALHOST.into()).await;
            let mut c =
                Client::with_backend(Ipv6Addr::LOCALHOST.into(), Some(port), TcpConfig::default());
            let h = c.connect(80, 65536);
            c.until("established", |c| c.sock(h).may_send()).await;
            c.sock(h).send_slice(b"over v4").expect("send");
            let mut got = Vec::new();
            c.until("the echo", |c| {
                c.read(h, &mut got);
                got.len() >= 7
            })
            .await;
            assert_eq!(got, b"over v4");
            server.abort();
        })
        .await;
    }

    #[tokio::test]
    async fn ipv6_refused_backend_resets() {
        in_time(async {
            let closed = std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).expect("bind");
            let port = closed.local_addr().expect("addr").port();
            drop(closed);
            let mut c =
                Client::with_backend(Ipv6Addr::LOCALHOST.into(), Some(port), TcpConfig::default());
            let h = c.connect_to(IpAddress::Ipv6(SVC_IP6), 80, 4096);
            c.until("the reset", |c| c.sock(h).state() == tcp::State::Closed)
                .await;
            assert_eq!(get(&c.metrics.tcp_refused), 1);
        })
        .await;
    }

    #[tokio::test]
    async fn request_response_and_half_close() {
        in_time(async {
            let (port, server) = echo_backend_on(Ipv4Addr::LOCALHOST.into()).await;
            let mut c = Client::new(port, TcpConfig::default());
            let h = c.connect(80, 65536);
            c.until("established", |c| c.sock(h).may_send()).await;
            assert_eq!(get(&c.metrics.tcp_flows_opened), 1);
            assert_eq!(get(&c.metrics.tcp_flows_active), 1);
            // Request, response, on an open connection.
            c.sock(h)
                .send_slice(b"GET / HTTP/1.0\r\n\r\n")
                .expect("send");
            let mut got = Vec::new();
            c.until("the response", |c| {
                c.read(h, &mut got);
                got.len() >= 18
            })
            .await;
            assert_eq!(got, b"GET / HTTP/1.0\r\n\r\n");
            // Half-close: the client shuts its write side and still reads everything.
            c.sock(h).send_slice(b"last words").expect("send");
            c.sock(h).close();
            let mut rest = Vec::new();
            c.until("the backend's FIN", |c| {
                c.read(h, &mut rest);
                !c.sock(h).may_recv()
            })
            .await;
            assert_eq!(rest, b"last words");
            c.until("the connection to close", |c| {
                get(&c.metrics.tcp_flows_active) == 0
            })
            .await;
            assert_eq!(get(&c.metrics.tcp_reset), 0);
            assert_eq!(get(&c.metrics.tcp_bytes_to_backends), 28);
            assert_eq!(get(&c.metrics.dropped_unsupported), 0);
            server.abort();
        })
        .await;
    }

    #[tokio::test]
    async fn half_closed_client_still_reads_a_large_response() {
        in_time(async {
            // Like an HTTP/1.0 or psql exchange: the backend answers only after the client's
            // FIN, then closes.
            let (l, port) = listener().await;
            let server = tokio::spawn(async move {
                let (mut s, _) = l.accept().await.expect("accept");
                let mut request = Vec::new();
                s.read_to_end(&mut request).await.expect("read");
                s.write_all(&pattern(1 << 20)).await.expect("write");
                request
            });
            let mut c = Client::new(port, TcpConfig::default());
            let h = c.connect(80, 64 * 1024);
            c.until("established", |c| c.sock(h).may_send()).await;
            c.sock(h).send_slice(b"SELECT 1;").expect("send");
            c.sock(h).close();
            let mut got = Vec::new();
            c.until("the whole response and FIN", |c| {
                c.read(h, &mut got);
                !c.sock(h).may_recv()
            })
            .await;
            assert_eq!(server.await.expect("server"), b"SELECT 1;");
            assert!(got == pattern(1 << 20), "content differs");
            c.until("the connection to close", |c| {
                get(&c.metrics.tcp_flows_active) == 0
            })
            .await;
            assert_eq!(get(&c.metrics.tcp_reset), 0);
        })
        .await;
    }

    #[tokio::test]
    async fn backend_close_reaches_the_client_as_fin() {
        in_time(async {
            let (l, port) = listener().await;
            let server = tokio::spawn(async move {
                let (mut s, _) = l.accept().await.expect("accept");
                s.write_all(b"hello\n").await.expect("write");
                s.shutdown().await.expect("shutdown");
                // The client can still talk to us after our FIN.
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await.expect("read");
                buf
            });
            let mut c = Client::new(port, TcpConfig::default());
            let h = c.connect(443, 65536);
            let mut got = Vec::new();
            c.until("the backend's FIN", |c| {
                c.read(h, &mut got);
                c.sock(h).state() == tcp::State::CloseWait
            })
            .await;
            assert_eq!(got, b"hello\n");
            c.sock(h).send_slice(b"bye").expect("send");
            c.sock(h).close();
            c.until("the connection to close", |c| {
                get(&c.metrics.tcp_flows_active) == 0 && !c.sock(h).is_open()
            })
            .await;
            assert_eq!(server.await.expect("server"), b"bye");
            assert_eq!(get(&c.metrics.tcp_reset), 0);
        })
        .await;
    }

    #[tokio::test]
    async fn refused_backend_resets_at_once() {
        in_time(async {
            let closed = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
            let port = closed.local_addr().expect("addr").port();
            drop(closed);
            let mut c = Client::new(port, TcpConfig::default());
            let h = c.connect(80, 4096);
            let start = Instant::now();
            c.until("the RST", |c| c.sock(h).state() == tcp::State::Closed)
                .await;
            assert!(
                start.elapsed() < Duration::from_millis(900),
                "{:?}",
                start.elapsed()
            );
            assert_eq!(get(&c.metrics.tcp_refused), 1);
            assert_eq!(get(&c.metrics.tcp_flows_opened), 0);
            assert_eq!(get(&c.metrics.tcp_flows_active), 0);
        })
        .await;
    }

    #[tokio::test]
    async fn unreachable_backend_resets_after_the_timeout() {
        in_time(async {
            // TEST-NET-1 (192.0.2.1) is not on loopback: the connect either fails at once (no
            // route) or times out; either way the client sees an RST within the bound.
            let cfg = TcpConfig {
                connect_timeout: Duration::from_millis(300),
                ..TcpConfig::default()
            };
            let mut c = Client::with_backend(Ipv4Addr::new(192, 0, 2, 1).into(), None, cfg);
            let h = c.connect(80, 4096);
            let start = Instant::now();
            c.until("the RST", |c| c.sock(h).state() == tcp::State::Closed)
                .await;
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "{:?}",
                start.elapsed()
            );
            assert_eq!(get(&c.metrics.tcp_refused), 1);
            assert_eq!(get(&c.metrics.tcp_flows_opened), 0);
        })
        .await;
    }

    async fn transfer(len: usize) {
        let (port, server) = echo_backend_on(Ipv4Addr::LOCALHOST.into()).await;
        let mut c = Client::new(port, TcpConfig::default());
        let h = c.connect(80, 256 * 1024);
        c.until("established", |c| c.sock(h).may_send()).await;
        let data = pattern(len);
        let mut sent = 0;
        let mut got = Vec::with_capacity(len);
        let start = Instant::now();
        c.until("the echo of everything", |c| {
            if sent < len {
                sent += c.sock(h).send_slice(&data[sent..]).expect("send");
                if sent == len {
                    c.sock(h).close();
                }
            }
            c.read(h, &mut got);
            !c.sock(h).may_recv()
        })
        .await;
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "echoed {} MiB in {secs:.2} s: {:.0} Mbit/s each way",
            len >> 20,
            len as f64 * 8.0 / secs / 1e6
        );
        assert_eq!(got.len(), len);
        assert!(got == data, "content differs");
        assert_eq!(get(&c.metrics.tcp_bytes_to_backends), len as u64);
        assert_eq!(get(&c.metrics.tcp_bytes_from_backends), len as u64);
        c.until("the connection to close", |c| {
            get(&c.metrics.tcp_flows_active) == 0
        })
        .await;
        assert_eq!(get(&c.metrics.tcp_reset), 0);
        server.abort();
    }

    #[tokio::test]
    async fn transfer_of_mebibytes_current_thread() {
        in_time(transfer(4 << 20)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transfer_of_mebibytes_multi_thread() {
        in_time(transfer(4 << 20)).await;
    }

    #[tokio::test]
    async fn a_full_tunnel_holds_segments_back_until_it_drains() {
        in_time(async {
            let (l, port) = listener().await;
            let len = 256 << 10;
            let (go, wait) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(async move {
                let (mut s, _) = l.accept().await.expect("accept");
                let _ = wait.await;
                let _ = s.write_all(&pattern(len)).await;
                let _ = s.shutdown().await;
            });
            let mut c = Client::new(port, TcpConfig::default());
            let h = c.connect(80, 1 << 20);
            c.until("established", |c| c.sock(h).may_send()).await;
            // The tunnel is full: the backend's bytes are read, but no segment goes out.
            c.room.store(false, Ordering::Relaxed);
            let before = get(&c.metrics.packets_to_agents);
            go.send(()).expect("server waits");
            c.until("the backend's bytes in the connector", |c| {
                get(&c.metrics.tcp_bytes_from_backends) == len as u64
            })
            .await;
            let until = Instant::now() + Duration::from_millis(300);
            while Instant::now() < until {
                c.step().await;
            }
            assert_eq!(
                get(&c.metrics.packets_to_agents),
                before,
                "sent into a full tunnel"
            );
            assert!(get(&c.metrics.tcp_tunnel_full) > 0);
            let mut got = Vec::new();
            c.read(h, &mut got);
            assert!(got.is_empty());
            // It drains: everything arrives, in order, with no reset.
            c.room.store(true, Ordering::Relaxed);
            c.until("everything", |c| {
                c.read(h, &mut got);
                !c.sock(h).may_recv()
            })
            .await;
            assert!(got == pattern(len), "content differs");
            assert_eq!(get(&c.metrics.tcp_reset), 0);
            server.await.expect("server");
        })
        .await;
    }

    /// A download with no room in the tunnel takes no more from its backend than a sparse flow
    /// may, while a request and its response on another connection go through, marked sparse
    /// (so they go ahead of the download on the carriage); the download's segments beyond the
    /// first are bulk, and it completes once there is room.
    #[tokio::test]
    async fn a_request_goes_through_while_a_download_has_no_room() {
        in_time(async {
            let (l, port) = listener().await;
            let len = 1 << 20;
            let server = tokio::spawn(async move {
                let (mut s, _) = l.accept().await.expect("accept");
                let download = tokio::spawn(async move {
                    let _ = s.write_all(&pattern(len)).await;
                    let _ = s.shutdown().await;
                });
                let (mut e, _) = l.accept().await.expect("accept");
                let (mut r, mut w) = e.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                download.await.expect("download");
            });
            let mut c = Client::new(port, TcpConfig::default());
            c.bulk_room.store(0, Ordering::Relaxed);
            let d = c.connect(80, 2 << 20);
            c.until("the download's connection", |c| c.sock(d).may_send())
                .await;
            c.until("the download's first bytes", |c| {
                get(&c.metrics.tcp_bytes_from_backends) > 0
            })
            .await;
            let until = Instant::now() + Duration::from_millis(200);
            while Instant::now() < until {
                c.step().await;
            }
            let taken = get(&c.metrics.tcp_bytes_from_backends);
            assert!(
                taken <= 2 * SPARSE_BYTES as u64,
                "took {taken} bytes with no room"
            );
            let e = c.connect(80, 64 << 10);
            c.until("the request's connection", |c| c.sock(e).may_send())
                .await;
            c.sock(e).send_slice(b"GET /\r\n").expect("send");
            let mut echo = Vec::new();
            c.until("the response", |c| {
                c.read(e, &mut echo);
                echo.len() == 7
            })
            .await;
            assert_eq!(echo, b"GET /\r\n");
            let request_port = c.sock(e).local_endpoint().expect("bound").port;
            let download_port = c.sock(d).local_endpoint().expect("bound").port;
            c.bulk_room.store(usize::MAX, Ordering::Relaxed);
            let mut got = Vec::new();
            c.until("the download", |c| {
                c.read(d, &mut got);
                !c.sock(d).may_recv()
            })
            .await;
            assert!(got == pattern(len), "content differs");
            let segs = c.segments.lock().expect("segments").clone();
            let request: Vec<_> = segs.iter().filter(|s| s.0 == request_port).collect();
            assert!(
                !request.is_empty() && request.iter().all(|s| s.2),
                "{request:?}"
            );
            let download: Vec<_> = segs.iter().filter(|s| s.0 == download_port).collect();
            let sparse: usize = download.iter().filter(|s| s.2).map(|s| s.1).sum();
            assert!(
                sparse <= 2 * SPARSE_BYTES,
                "{sparse} bytes of the download sparse"
            );
            assert!(download.iter().filter(|s| !s.2).map(|s| s.1).sum::<usize>() >= len / 2);
            drop(c);
            server.abort();
        })
        .await;
    }

    #[tokio::test]
    async fn backend_is_not_read_faster_than_the_agent_reads() {
        in_time(async {
            let (l, port) = listener().await;
            let len = 8 << 20;
            let server = tokio::spawn(async move {
                let (mut s, _) = l.accept().await.expect("accept");
                let _ = s.write_all(&pattern(len)).await;
                let _ = s.shutdown().await;
            });
            let cfg = TcpConfig {
                buffer_bytes: 16 * 1024,
                ..TcpConfig::default()
            };
            let mut c = Client::new(port, cfg);
            let h = c.connect(80, 16 * 1024);
            c.until("established", |c| c.sock(h).may_send()).await;
            // The client reads nothing for a while: the connector stops reading the backend
            // once its buffer and the client's window are full.
            let until = Instant::now() + Duration::from_millis(500);
            while Instant::now() < until {
                c.step().await;
            }
            let read = get(&c.metrics.tcp_bytes_from_backends);
            assert!(read <= 64 * 1024, "read {read} bytes from the backend");
            let mut got = Vec::new();
            c.until("everything", |c| {
                c.read(h, &mut got);
                !c.sock(h).may_recv()
            })
            .await;
            assert!(got == pattern(len), "content differs");
            server.await.expect("server");
        })
        .await;
    }

    /// An upload of `len` bytes from a client with 64 KiB buffers, through a connector with
    /// 16 KiB ones, into a backend that reads nothing until `go`.
    struct StalledUpload {
        c: Client,
        h: SocketHandle,
        go: tokio::sync::oneshot::Sender<()>,
        server: tokio::task::JoinHandle<Vec<u8>>,
        data: Vec<u8>,
        sent: usize,
    }

    impl StalledUpload {
        async fn new(len: usize) -> Self {
            let (l, port) = listener().await;
            let (go, wait) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(async move {
                let (mut s, _) = l.accept().await.expect("accept");
                let _ = wait.await;
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.expect("read");
                got
            });
            let cfg = TcpConfig {
                buffer_bytes: 16 * 1024,
                ..TcpConfig::default()
            };
            let mut c = Client::new(port, cfg);
            let h = c.connect(80, 64 * 1024);
            c.until("established", |c| c.sock(h).may_send()).await;
            Self {
                c,
                h,
                go,
                server,
                data: pattern(len),
                sent: 0,
            }
        }

        /// Hands the client's socket what it takes.
        fn send_more(&mut self) {
            let Self {
                c, h, data, sent, ..
            } = self;
            *sent += c.sock(*h).send_slice(&data[*sent..]).expect("send");
        }

        /// Lets the backend read, sends the rest and closes; the backend got every byte.
        async fn finish(self) -> Client {
            let Self {
                mut c,
                h,
                go,
                server,
                data,
                mut sent,
            } = self;
            let _ = go.send(());
            c.until("everything sent", |c| {
                if sent < data.len() {
                    sent += c.sock(h).send_slice(&data[sent..]).expect("send");
                    if sent == data.len() {
                        c.sock(h).close();
                    }
                }
                sent == data.len() && c.sock(h).send_queue() == 0
            })
            .await;
            let got = server.await.expect("server");
            assert!(got == data, "content differs");
            c
        }
    }

    #[tokio::test]
    async fn agent_is_stopped_while_the_backend_does_not_read() {
        in_time(async {
            let mut u = StalledUpload::new(64 << 20).await;
            // The backend reads nothing: once the kernel's buffers and the connector's receive
            // buffer are full, the window closes and the client cannot send more.
            let until = Instant::now() + Duration::from_millis(500);
            while Instant::now() < until {
                u.send_more();
                u.c.step().await;
            }
            let sent = u.sent;
            eprintln!("stalled backend: the client got {sent} bytes out before the window closed");
            assert!(
                sent < 32 << 20,
                "the client sent {sent} bytes into a stalled backend"
            );
            u.finish().await;
        })
        .await;
    }

    /// The classification alone: which segments need the carriage, which connections count
    /// as having closed their window, and that a reset or a finished connection leaves nothing
    /// behind (the set is bounded by the open connections).
    #[test]
    fn classify_reopening_acks_resets_and_bulk_flows() {
        use etherparse::{PacketBuilderStep, TcpHeader};
        type Step = PacketBuilderStep<TcpHeader>;
        let seg = |port: u16, window: u16, data: &[u8], f: fn(Step) -> Step| {
            let b = PacketBuilder::ipv4(SVC_IP.octets(), AGENT_IP.octets(), 64)
                .tcp(80, port, 1, window)
                .ack(5);
            let mut v = Vec::new();
            f(b).write(&mut v, data).expect("build");
            v
        };
        let plain = |b: Step| b;
        let (mut bulk, mut closed) = (HashSet::new(), HashSet::new());
        let mut class = |p: &[u8], bulk: &HashSet<Key>| classify(p, bulk, &mut closed);
        let c = |sparse, reliable| TcpClass { sparse, reliable };
        assert_eq!(class(&seg(1, 1000, &[], plain), &bulk), c(true, false));
        assert_eq!(
            class(&seg(1, 0, &[], plain), &bulk),
            c(true, false),
            "closing"
        );
        assert_eq!(
            class(&seg(1, 1000, &[], plain), &bulk),
            c(true, true),
            "reopening"
        );
        assert_eq!(class(&seg(1, 1000, &[], plain), &bulk), c(true, false));
        // Another connection's open window does not count for this one.
        assert_eq!(
            class(&seg(1, 0, b"data", plain), &bulk),
            c(true, true),
            "data"
        );
        assert_eq!(class(&seg(2, 1000, &[], plain), &bulk), c(true, false));
        assert_eq!(
            class(&seg(1, 0, &[], |b| b.rst()), &bulk),
            c(true, true),
            "reset"
        );
        assert_eq!(
            class(&seg(1, 1000, &[], plain), &bulk),
            c(true, false),
            "gone"
        );
        bulk.insert(Key {
            agent_port: 3,
            service: SVC_IP.into(),
            port: 80,
        });
        assert_eq!(class(&seg(3, 1000, b"data", plain), &bulk), c(false, true));
        assert_eq!(class(&seg(4, 1000, b"data", plain), &bulk), c(true, true));
        assert_eq!(class(&[0x45; 12], &bulk), c(true, true), "garbage");
        assert!(closed.is_empty());
    }

    /// Pure ACKs go as datagrams, which the path may lose: harmless for TCP (the next one
    /// acknowledges as much) except for the one that opens a window the connection had closed.
    /// Lost, it left the agent's sender waiting for its persist timer (200 ms or more, backing
    /// off) before it probed and learnt of the window. That ACK goes on the carriage.
    #[tokio::test]
    async fn the_ack_that_reopens_a_closed_window_goes_reliably() {
        in_time(async {
            let mut u = StalledUpload::new(16 << 20).await;
            // The backend reads nothing until the connector's window has closed.
            let acks = u.c.acks.clone();
            let closed = || acks.lock().unwrap().iter().any(|&(w, _)| w == 0);
            let deadline = Instant::now() + LIMIT;
            while !closed() {
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting for the window to close"
                );
                u.send_more();
                u.c.step().await;
            }
            u.finish().await;
            let acks = acks.lock().unwrap().clone();
            let reopened: Vec<bool> = acks
                .windows(2)
                .filter(|w| w[0].0 == 0 && w[1].0 > 0)
                .map(|w| w[1].1)
                .collect();
            assert!(
                !reopened.is_empty(),
                "the window reopened with a pure ACK: {acks:?}"
            );
            assert!(
                reopened.iter().all(|&r| r),
                "a reopening ACK went as a datagram"
            );
            let (plain, reliable) =
                acks.windows(2)
                    .filter(|w| w[0].0 > 0 && w[1].0 > 0)
                    .fold(
                        (0, 0),
                        |(p, r), w| if w[1].1 { (p, r + 1) } else { (p + 1, r) },
                    );
            assert!(
                plain > 0 && reliable == 0,
                "other ACKs go as datagrams: {plain} {reliable}"
            );
            assert!(
                acks.iter().filter(|a| a.0 == 0).all(|a| !a.1),
                "a closing ACK is plain"
            );
        })
        .await;
    }

    /// CPU time (user + system, in clock ticks) used so far by the calling thread.
    fn thread_cpu_ticks() -> u64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("stat");
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .expect("comm")
            .1
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
    }

    #[tokio::test]
    async fn concurrent_connections_to_one_port_keep_their_own_bytes() {
        in_time(async {
            let (port, server) = echo_backend_on(Ipv4Addr::LOCALHOST.into()).await;
            let mut c = Client::new(port, TcpConfig::default());
            // All SYNs go out in one poll, so their backend connects finish together.
            let handles: Vec<_> = (0..8).map(|_| c.connect(80, 8192)).collect();
            c.until("all established", |c| {
                handles.iter().all(|&h| c.sock(h).may_send())
            })
            .await;
            for (i, &h) in handles.iter().enumerate() {
                let msg = format!("connection {i}");
                c.sock(h).send_slice(msg.as_bytes()).expect("send");
                c.sock(h).close();
            }
            let mut got = vec![Vec::new(); handles.len()];
            c.until("every echo", |c| {
                for (i, &h) in handles.iter().enumerate() {
                    c.read(h, &mut got[i]);
                }
                handles.iter().all(|&h| !c.sock(h).may_recv())
            })
            .await;
            for (i, g) in got.iter().enumerate() {
                assert_eq!(g, format!("connection {i}").as_bytes());
            }
            assert_eq!(get(&c.metrics.tcp_flows_opened), 8);
            server.abort();
        })
        .await;
    }

    #[tokio::test]
    async fn idle_connections_cost_no_cpu() {
        in_time(async {
            let (port, server) = echo_backend_on(Ipv4Addr::LOCALHOST.into()).await;
            let mut c = Client::new(port, TcpConfig::default());
            let h = c.connect(80, 8192);
            c.until("established", |c| c.sock(h).may_send()).await;
            c.sock(h).send_slice(b"x").expect("send");
            let mut got = Vec::new();
            c.until("the echo", |c| {
                c.read(h, &mut got);
                !got.is_empty()
            })
            .await;
            // Let delayed ACKs go, then measure an idle stretch (no busy loop in the engine).
            for _ in 0..5 {
                c.step().await;
            }
            let before = thread_cpu_ticks();
            tokio::time::sleep(Duration::from_millis(300)).await;
            let used = thread_cpu_ticks() - before;
            assert!(used < 10, "busy while idle: {used} ticks of CPU in 300 ms");
            server.abort();
        })
        .await;
    }

    #[tokio::test]
    async fn per_agent_cap() {
        in_time(async {
            let (port, server) = echo_backend_on(Ipv4Addr::LOCALHOST.into()).await;
            let cfg = TcpConfig {
                max_per_agent: 2,
                ..TcpConfig::default()
            };
            let mut c = Client::new(port, cfg);
            let a = c.connect(80, 4096);
            let b = c.connect(80, 4096);
            c.until("two connections", |c| {
                c.sock(a).may_send() && c.sock(b).may_send()
            })
            .await;
            let third = c.connect(443, 4096);
            c.until("the third SYN to be dropped", |c| {
                get(&c.metrics.dropped_flow_limit) >= 1
            })
            .await;
            assert_eq!(c.sock(third).state(), tcp::State::SynSent);
            assert_eq!(get(&c.metrics.tcp_flows_active), 2);
            // Closing one makes room: the third's retransmitted SYN gets through.
            c.sock(a).close();
            c.until("the third connection", |c| c.sock(third).may_send())
                .await;
            assert_eq!(get(&c.metrics.tcp_flows_opened), 3);
            server.abort();
        })
        .await;
    }

    #[tokio::test]
    async fn idle_connections_are_reset_and_agent_resets_reach_the_backend() {
        in_time(async {
            let (l, port) = listener().await;
            let server = tokio::spawn(async move {
                let mut results = Vec::new();
                for _ in 0..2 {
                    let (mut s, _) = l.accept().await.expect("accept");
                    let mut buf = [0u8; 16];
                    results.push(s.read(&mut buf).await.map_err(|e| e.kind()));
                }
                results
            });
            let cfg = TcpConfig {
                idle_timeout: Duration::from_millis(300),
                ..TcpConfig::default()
            };
            let mut c = Client::new(port, cfg);
            let h = c.connect(80, 4096);
            c.until("established", |c| c.sock(h).may_send()).await;
            c.until("the idle reset", |c| {
                c.sock(h).state() == tcp::State::Closed
            })
            .await;
            assert_eq!(get(&c.metrics.tcp_flows_expired), 1);
            // The client resets the next one: the backend sees a reset too.
            let h = c.connect(80, 4096);
            c.until("established", |c| c.sock(h).may_send()).await;
            c.sock(h).abort();
            c.until("the connection to go", |c| {
                get(&c.metrics.tcp_flows_active) == 0
            })
            .await;
            assert_eq!(get(&c.metrics.tcp_reset), 2);
            let results = server.await.expect("server");
            assert_eq!(
                results,
                vec![
                    Err(io::ErrorKind::ConnectionReset),
                    Err(io::ErrorKind::ConnectionReset)
                ]
            );
        })
        .await;
    }

    #[tokio::test]
    async fn stray_segments_get_rst_and_agent_removal_closes_connections() {
        in_time(async {
            let (port, server) = echo_backend_on(Ipv4Addr::LOCALHOST.into()).await;
            let mut c = Client::new(port, TcpConfig::default());
            // An ACK for no connection (one from before a connector restart): RST at once.
            let stray = {
                let b = PacketBuilder::ipv4(AGENT_IP.octets(), SVC_IP.octets(), 64)
                    .tcp(1000, 80, 1, 100)
                    .ack(5);
                let mut v = Vec::new();
                b.write(&mut v, &[]).expect("build");
                v
            };
            c.dp.handle_from_agent(1, &stray);
            let rst = tokio::time::timeout(LIMIT, c.from_dp.recv())
                .await
                .expect("in time")
                .expect("open");
            let ip = Ipv4HeaderSlice::from_slice(&rst).expect("ip");
            let tcp = TcpHeaderSlice::from_slice(&rst[ip.slice().len()..]).expect("tcp");
            assert!(tcp.rst());
            assert_eq!((tcp.source_port(), tcp.destination_port()), (80, 1000));
            assert_eq!(tcp.sequence_number(), 5, "SEQ = the segment's ACK");
            assert_eq!(get(&c.metrics.tcp_reset_unknown), 1);
            // An RST for no connection is not answered.
            let mut rst_in = stray.clone();
            rst_in[20 + 13] = 0x04; // flags: RST only
            let mut h = Ipv4HeaderSlice::from_slice(&rst_in)
                .expect("ip")
                .to_header();
            h.header_checksum = h.calc_header_checksum();
            rst_in[..20].copy_from_slice(&h.to_bytes());
            c.dp.handle_from_agent(1, &rst_in);
            let h = c.connect(80, 4096);
            c.until("established", |c| c.sock(h).may_send()).await;
            c.dp.remove_agent(1);
            c.until("the connection to close", |c| {
                get(&c.metrics.tcp_flows_active) == 0
            })
            .await;
            server.abort();
        })
        .await;
    }

    /// A SYN from `src`:`sport` to the service's port 80, as an agent that will never ACK.
    fn raw_syn(src: Ipv4Addr, sport: u16) -> Vec<u8> {
        let b = PacketBuilder::ipv4(src.octets(), SVC_IP.octets(), 64)
            .tcp(sport, 80, 1000, 64240)
            .syn();
        let mut v = Vec::new();
        b.write(&mut v, &[]).expect("build");
        v
    }

    /// Accepts connections on a fresh loopback port and reports, per connection, when the
    /// connector closed it (EOF or reset).
    async fn counting_backend() -> (u16, mpsc::UnboundedReceiver<bool>) {
        let (l, port) = listener().await;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let tx = tx.clone();
                let _ = tx.send(true);
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                    let _ = tx.send(false);
                });
            }
        });
        (port, rx)
    }

    #[tokio::test]
    async fn a_handshake_never_completed_closes_the_backend_connection() {
        in_time(async {
            let (port, mut events) = counting_backend().await;
            let cfg = TcpConfig {
                handshake_timeout: Duration::from_millis(400),
                ..TcpConfig::default()
            };
            let mut c = Client::new(port, cfg);
            let start = Instant::now();
            for sport in 0..20u16 {
                c.dp.handle_from_agent(1, &raw_syn(AGENT_IP, 30000 + sport));
            }
            let (mut opened, mut closed) = (0, 0);
            while closed < 20 {
                let ev = tokio::time::timeout(LIMIT, events.recv())
                    .await
                    .expect("in time")
                    .expect("backend");
                if ev {
                    opened += 1;
                } else {
                    closed += 1;
                }
            }
            let took = start.elapsed();
            assert_eq!(opened, 20);
            assert!(
                took >= Duration::from_millis(400) && took < Duration::from_secs(3),
                "{took:?}"
            );
            assert_eq!(get(&c.metrics.tcp_handshake_timeouts), 20);
            let deadline = Instant::now() + LIMIT;
            while get(&c.metrics.tcp_flows_active) > 0 {
                assert!(Instant::now() < deadline, "slots not given back");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // The agent got a SYN-ACK and then an RST for each (nobody read them meanwhile).
            let mut rst = 0;
            while let Ok(p) = c.from_dp.try_recv() {
                let ip = Ipv4HeaderSlice::from_slice(&p).expect("ip");
                let tcp = TcpHeaderSlice::from_slice(&p[ip.slice().len()..]).expect("tcp");
                rst += usize::from(tcp.rst());
            }
            assert_eq!(rst, 20);
            eprintln!("20 half-open connections closed after {took:?}");
        })
        .await;
    }

    #[tokio::test]
    async fn tcp_caps_count_per_identity_not_per_tunnel() {
        in_time(async {
            let (port, mut events) = counting_backend().await;
            let cfg = TcpConfig {
                max_per_agent: 3,
                ..TcpConfig::default()
            };
            let c = Client::new(port, cfg);
            // A second tunnel of the same identity (alice), and another identity (bob).
            let alice2 = Ipv4Addr::new(100, 64, 0, 3);
            let bob = Ipv4Addr::new(100, 64, 0, 4);
            let (tx, _rx2) = mpsc::unbounded_channel();
            c.dp.add_agent(2, "alice".into(), alice2, Arc::new(Feed::new(tx.clone())));
            c.dp.add_agent(3, "bob".into(), bob, Arc::new(Feed::new(tx)));
            for sport in 0..3u16 {
                c.dp.handle_from_agent(1, &raw_syn(AGENT_IP, 30000 + sport));
            }
            for _ in 0..3 {
                events.recv().await.expect("backend");
            }
            for sport in 0..3u16 {
                c.dp.handle_from_agent(2, &raw_syn(alice2, 30000 + sport));
            }
            c.dp.handle_from_agent(3, &raw_syn(bob, 30000));
            assert!(events.recv().await.expect("backend"), "bob's connection");
            let deadline = Instant::now() + LIMIT;
            while get(&c.metrics.dropped_flow_limit) < 3 || get(&c.metrics.tcp_flows_active) < 4 {
                assert!(
                    Instant::now() < deadline,
                    "alice's second tunnel's SYNs not dropped"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(get(&c.metrics.dropped_flow_limit), 3);
            assert_eq!(
                get(&c.metrics.tcp_flows_active),
                4,
                "3 of alice's and bob's"
            );
            assert!(
                tokio::time::timeout(Duration::from_millis(300), events.recv())
                    .await
                    .is_err(),
                "no more backend connections"
            );
        })
        .await;
    }

    /// Linux's own TCP as the agent, through a TUN device: run as root in a fresh network
    /// namespace, e.g. `cargo test -p ztna-connector --no-run` and then
    /// `unshare -n sh -c 'ip link set lo up; TEST_BINARY linux_kernel_client --ignored'`.
    #[test]
    #[ignore = "needs root and a network namespace (creates a TUN device)"]
    fn linux_kernel_client() {
        use std::io::{Read, Write};
        use std::os::fd::{AsRawFd, FromRawFd};
        use std::process::Command;

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("open /dev/net/tun");
        // struct ifreq: name[16], flags: i16, padding.
        let mut ifr = [0u8; 40];
        ifr[..8].copy_from_slice(b"ztnatcp0");
        let flags: i16 = 0x0001 | 0x1000; // IFF_TUN | IFF_NO_PI
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `ifr` is big enough for.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), 0x400454ca, ifr.as_mut_ptr()) };
        assert_eq!(rc, 0, "TUNSETIFF: {}", io::Error::last_os_error());
        for args in [
            "link set ztnatcp0 mtu 1280 up",
            "addr add 100.64.0.2/32 dev ztnatcp0",
            "route add 10.100.0.0/24 dev ztnatcp0",
        ] {
            let ok = Command::new("ip")
                .args(args.split(' '))
                .status()
                .expect("ip");
            assert!(ok.success(), "ip {args}");
        }
        let backend = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = backend.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            while let Ok((mut s, _)) = backend.accept() {
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let (dp, metrics) = {
            let _e = rt.enter();
            let metrics = Arc::new(Metrics::default());
            let service = BackendService {
                def: ServiceDef {
                    name: "web".into(),
                    address6: None,
                    address: SVC_IP,
                    udp: vec![],
                    tcp: vec![PortRange::single(80)],
                    icmp: false,
                    connector: String::new(),
                    names: None,
                },
                backend: Ipv4Addr::LOCALHOST.into(),
                backend_port: Some(port),
            };
            let cfg = DataplaneConfig {
                udp_idle_timeout: Duration::from_secs(30),
                max_flows_per_agent: 8,
                max_flows_total: 1 << 16,
                icmp: IcmpMode::Local,
                tcp: TcpConfig::default(),
            };
            let closed = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
            let closed_port = closed.local_addr().expect("addr").port();
            drop(closed);
            let refusing = BackendService {
                def: ServiceDef {
                    name: "closed".into(),
                    address6: None,
                    address: Ipv4Addr::new(10, 100, 0, 2),
                    udp: vec![],
                    tcp: vec![PortRange::single(80)],
                    icmp: false,
                    connector: String::new(),
                    names: None,
                },
                backend: Ipv4Addr::LOCALHOST.into(),
                backend_port: Some(closed_port),
            };
            let dp = Dataplane::new(vec![service, refusing], cfg, metrics.clone()).expect("dp");
            (dp, metrics)
        };
        // TUN → data plane (a thread feeding the runtime), data plane → TUN (the sink writes).
        struct TunSink(std::sync::Mutex<std::fs::File>);
        impl ToAgent for TunSink {
            fn send(&self, packet: Bytes) {
                let _ = self
                    .0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .write(&packet);
            }
        }
        // SAFETY: dup() returns a new descriptor that the File then owns.
        let writer = unsafe { std::fs::File::from_raw_fd(libc::dup(tun.as_raw_fd())) };
        dp.add_agent(
            1,
            "kernel".into(),
            AGENT_IP,
            Arc::new(TunSink(std::sync::Mutex::new(writer))),
        );
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let mut reader = tun;
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = reader.read(&mut buf) {
                if tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let dp2 = dp.clone();
        rt.spawn(async move {
            while let Some(p) = rx.recv().await {
                dp2.handle_from_agent(1, &p);
            }
        });
        let client = std::thread::spawn(move || {
            let len = 32 << 20;
            let mut s = std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from((SVC_IP, 80)),
                Duration::from_secs(5),
            )
            .expect("connect through the tunnel");
            let mut r = s.try_clone().expect("clone");
            let start = std::time::Instant::now();
            let reader = std::thread::spawn(move || {
                let mut got = Vec::with_capacity(len);
                r.read_to_end(&mut got).expect("read");
                got
            });
            s.write_all(&pattern(len)).expect("write");
            s.shutdown(std::net::Shutdown::Write).expect("shutdown");
            let got = reader.join().expect("reader");
            let secs = start.elapsed().as_secs_f64();
            eprintln!(
                "kernel client: echoed {} MiB in {secs:.2} s: {:.0} Mbit/s each way",
                len >> 20,
                len as f64 * 8.0 / secs / 1e6
            );
            assert!(got == pattern(len), "content differs");
            let start = std::time::Instant::now();
            let refused = std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from(([10, 100, 0, 2], 80)),
                Duration::from_secs(5),
            )
            .expect_err("a closed backend port");
            eprintln!("kernel client: {refused} after {:?}", start.elapsed());
            assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        });
        rt.block_on(async {
            while !client.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        client.join().expect("client");
        eprintln!(
            "opened {} reset {} active {}",
            get(&metrics.tcp_flows_opened),
            get(&metrics.tcp_reset),
            get(&metrics.tcp_flows_active)
        );
    }
}
