//! The agent tunnel, platform neutral: packets come in through [`Agent::send_packet`] and go out
//! through the receiver [`Agent::start`] returns; the platform (a Linux TUN device, the macOS
//! packet flow) only moves them and applies [`TunnelState`] (address and routes).
//!
//! This is the I/O shell over [`AgentMachine`], which holds the session logic (relay reconnects
//! with backoff, permanent refusals, the catalog and the routes it asks for, one relay channel
//! per connector, resuming inner connections): one task feeds it what the relay session, the
//! inner connections and the clock say, and carries out its commands. The inner connection to a
//! connector (ALPN `ztna-tunnel/1`, mutual TLS, IP packets as datagrams) runs over that
//! connector's virtual peer address, which stays the same for the connector's whole life in the
//! catalog: a new channel (after a relay restart) re-points it, and the connection continues.
//!
//! Fail closed: routes stay while the relay is away (packets to services are dropped and counted
//! here, never handed back to the platform's other routes), and packets from a connector reach
//! the platform only if [`crate::inbound::check`] passes.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use ztna_proto::control::{ControlMessage, ErrorCode, Hello, Role};
use ztna_proto::service::tunnel_ipv6;
use ztna_proto::{Candidate, ChannelId, ServiceDef, ALPN_TUNNEL};

pub use crate::agent_machine::Refusal;
use crate::agent_machine::{AgentMachine, Command, Input, MachineConfig, RelayAddr};
use crate::backoff::jitter_seed;
use crate::direct::{DirectContext, DirectOptions, DirectPath, DirectStatus};
use crate::fair_queue::{self, FairQueue};
use crate::fleet::{Liveness, RelaySpec, Verdict};
use crate::outbound::{OutboundDrop, TCP};
use crate::session::{Node, RelaySession, RelayTarget, SessionError};
use crate::tcp_flows::TcpFlows;
use crate::tls::{Credentials, PeerIdentity};
use crate::transport::{self, Timing};

/// Packets queued towards the platform before new ones are dropped.
const TO_PLATFORM_QUEUE: usize = 4096;
/// Events from the inner connections' tasks waiting for the session task.
const EVENT_QUEUE: usize = 256;
/// How long an inner handshake may take.
const INNER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Fail-closed and refusal settings of the agent (defaults suit most deployments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentOptions {
    /// How long a service that a live catalog no longer lists keeps its route (default 30 s).
    pub withdraw_grace: Duration,
    /// Consecutive permanent refusals (certificate rejected, relay untrusted, identity denied)
    /// after which the agent stops (default 3).
    pub max_refusals: u32,
    /// Linux: the `SO_MARK` of the agent's UDP socket, so that the platform can exempt the
    /// outer traffic from the tunnel's routes (a policy rule). `None` sets no mark.
    pub fwmark: Option<u32>,
    /// Whether the platform's device carries IPv6 (default true). Off, the agent acts as if
    /// no service had an IPv6 address: no IPv6 routes, and no AAAA answers that the host would
    /// send elsewhere than into the tunnel.
    pub ipv6: bool,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            withdraw_grace: Duration::from_secs(30),
            max_refusals: 3,
            fwmark: None,
            ipv6: true,
        }
    }
}

/// What the agent needs to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The relays: addresses, or DNS names that resolve to one relay per address.
    pub relays: Vec<RelaySpec>,
    /// The DNS name every relay's certificate carries.
    pub relay_name: String,
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
    /// Fail-closed and refusal settings.
    pub options: AgentOptions,
    /// The DNS server of name services.
    pub dns: DnsOptions,
}

/// The agent's DNS server for name services (see [`crate::names`] and [`crate::dns`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsOptions {
    /// Domains the agent answers for besides those of its name services (names below them that
    /// no reachable service answers to get NXDOMAIN).
    pub domains: Vec<String>,
    /// Where queries outside the match domains go, when a client sends them to the agent
    /// anyway (no split DNS on the host). Empty: they are REFUSED.
    pub upstream: Vec<SocketAddr>,
    /// Port of the DNS server on the tunnel IP.
    pub port: u16,
    /// Linux: register the server and match domains with systemd-resolved for the TUN link.
    pub split: bool,
    /// Most names mapped at once.
    pub max_names: usize,
}

impl Default for DnsOptions {
    fn default() -> Self {
        Self {
            domains: Vec::new(),
            upstream: Vec::new(),
            port: 53,
            split: true,
            max_names: crate::names::DEFAULT_MAX_NAMES,
        }
    }
}

/// Counters of the agent's DNS server.
#[derive(Debug, Default)]
pub struct DnsCounters {
    /// Queries answered from the name book (an address or no records).
    pub answered: AtomicU64,
    /// Queries forwarded to the upstream resolver.
    pub forwarded: AtomicU64,
    /// NXDOMAIN answers for names no reachable service answers to.
    pub denied: AtomicU64,
    /// REFUSED, FORMERR or NOTIMP answers.
    pub refused: AtomicU64,
    /// SERVFAIL answers (pool full, connector refused or did not confirm the mapping).
    pub failed: AtomicU64,
    /// Datagrams that were not queries, and queries dropped because too many were pending.
    pub dropped: AtomicU64,
    /// Mappings a connector refused.
    pub mappings_refused: AtomicU64,
}

/// Counters of IPv6 packets from the platform dropped for a reason that IPv4 packets don't
/// have (packets with no route count with IPv4's `dropped_no_route`).
#[derive(Debug, Default)]
pub struct OutboundCounters {
    /// [`OutboundDrop::Local`].
    pub local: AtomicU64,
    /// [`OutboundDrop::Source`].
    pub source: AtomicU64,
    /// [`OutboundDrop::ExtensionHeader`].
    pub extension_header: AtomicU64,
    /// [`OutboundDrop::Fragment`].
    pub fragment: AtomicU64,
    /// [`OutboundDrop::PortOrProtocol`].
    pub port_or_protocol: AtomicU64,
}

impl OutboundCounters {
    /// Counts a drop; `no_route` counts [`OutboundDrop::NoRoute`] and
    /// [`OutboundDrop::Malformed`].
    pub fn count(&self, why: OutboundDrop, no_route: &AtomicU64) {
        let c = match why {
            OutboundDrop::Malformed | OutboundDrop::NoRoute => no_route,
            OutboundDrop::Local => &self.local,
            OutboundDrop::Source => &self.source,
            OutboundDrop::ExtensionHeader => &self.extension_header,
            OutboundDrop::Fragment => &self.fragment,
            OutboundDrop::PortOrProtocol => &self.port_or_protocol,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A snapshot for status.
    pub fn snapshot(&self) -> Ipv6Drops {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Ipv6Drops {
            local: get(&self.local),
            source: get(&self.source),
            extension_header: get(&self.extension_header),
            fragment: get(&self.fragment),
            port_or_protocol: get(&self.port_or_protocol),
        }
    }
}

/// IPv6 packets from the platform dropped, by reason, as status shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv6Drops {
    /// The kernel's own link traffic (neighbour discovery, MLD, router solicitations).
    pub local: u64,
    /// A source other than the agent's IPv6 tunnel address.
    pub source: u64,
    /// Extension headers.
    pub extension_header: u64,
    /// Fragments.
    pub fragment: u64,
    /// A protocol or port the service does not offer.
    pub port_or_protocol: u64,
}

/// The name services and DNS counters, as `ztna-agent status` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamesStatus {
    /// Address the DNS server listens on, once up.
    pub server: Option<SocketAddr>,
    /// Domains it answers for.
    pub domains: Vec<String>,
    /// Name services of the catalog.
    pub services: usize,
    /// Current mappings: `name -> address (service, connector[, unconfirmed])`.
    pub mappings: Vec<NameMappingStatus>,
    /// `[answered, forwarded, denied (NXDOMAIN), refused, failed, dropped]`.
    pub queries: [u64; 6],
    /// Mappings a connector refused.
    pub mappings_refused: u64,
}

/// One mapping in [`NamesStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameMappingStatus {
    /// The real name.
    pub name: String,
    /// Its virtual address.
    pub address: Ipv4Addr,
    /// Its virtual IPv6 address, where the service has an IPv6 pool.
    #[serde(default)]
    pub address6: Option<Ipv6Addr>,
    /// The name service.
    pub service: String,
    /// The connector.
    pub connector: String,
    /// Whether the connector confirmed it on its current inner connection.
    pub confirmed: bool,
}

/// What the platform must configure: the tunnel address and one route per service address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelState {
    /// The tunnel IP the relay assigned, once known. The IPv6 tunnel address is derived from
    /// it ([`TunnelState::tunnel_ipv6`]).
    pub tunnel_ip: Option<Ipv4Addr>,
    /// Services reachable now.
    pub services: Vec<ServiceDef>,
}

impl TunnelState {
    /// The agent's IPv6 tunnel address ([`ztna_proto::service::tunnel_ipv6`] of the IPv4 one),
    /// once known.
    pub fn tunnel_ipv6(&self) -> Option<Ipv6Addr> {
        self.tunnel_ip.map(tunnel_ipv6)
    }
}

/// A service's addresses, as status shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAddresses {
    /// Service name.
    pub name: String,
    /// Its IPv4 address, or a name service's IPv4 pool.
    pub address: ipnet::Ipv4Net,
    /// Its IPv6 address, or a name service's IPv6 pool, if it has one.
    pub address6: Option<ipnet::Ipv6Net>,
    /// The connector serving it.
    pub connector: String,
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
    /// the relay channel), `resuming` (inner connection up, waiting for a new relay channel),
    /// `connecting`, or `down`.
    pub path: String,
    /// Relay channel id, when one is open.
    pub channel_id: Option<u32>,
    /// The relay the channel runs through.
    #[serde(default)]
    pub relay: Option<String>,
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
    /// TCP resets the agent handed the platform for connections that ended with an inner
    /// connection to this connector (the connector keeps TCP state per inner connection).
    #[serde(default)]
    pub tcp_resets: u64,
    /// The inner connection's packet carriage: window, rate estimate, losses.
    #[serde(default)]
    pub carriage: Option<crate::congestion::CarriageStatus>,
}

/// One relay of the fleet as the agent sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayStatus {
    /// The relay's address.
    pub addr: String,
    /// `up`, `connecting` or `down`.
    pub state: String,
    /// Whether new channels go through it (the nearest live relay).
    pub in_use: bool,
    /// Smoothed RTT of its session (handshake, then keepalives).
    pub rtt_ms: Option<f64>,
    /// Channels to connectors that run through it now.
    pub channels: usize,
    /// Sessions established with it since start.
    pub sessions: u64,
    /// Why its last session or attempt ended.
    pub last_error: Option<String>,
}

/// A snapshot for `ztna-agent status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The relay in use (new channels go through it), or the first one known.
    pub relay: String,
    /// Whether a relay session is up.
    pub connected: bool,
    /// Every relay of the fleet.
    #[serde(default)]
    pub relays: Vec<RelayStatus>,
    /// Identity from the agent's certificate.
    pub identity: String,
    /// Tunnel IP.
    pub tunnel_ip: Option<Ipv4Addr>,
    /// The IPv6 tunnel address (derived from the tunnel IP).
    #[serde(default)]
    pub tunnel_ipv6: Option<Ipv6Addr>,
    /// The services of the catalog with their addresses.
    #[serde(default)]
    pub services: Vec<ServiceAddresses>,
    /// This agent's address as the relay in use sees it.
    pub observed_addr: Option<SocketAddr>,
    /// Smoothed RTT to the relay in use.
    pub relay_rtt_ms: Option<f64>,
    /// The packet carriage of the session with the relay in use.
    #[serde(default)]
    pub relay_carriage: Option<crate::congestion::CarriageStatus>,
    /// TUN MTU.
    pub mtu: u16,
    /// Wanted services that policy denied.
    pub rejected: Vec<RejectedService>,
    /// Connectors.
    pub connectors: Vec<ConnectorStatus>,
    /// Packets from the platform with no service route (or neither IPv4 nor IPv6).
    pub dropped_no_route: u64,
    /// IPv6 packets from the platform dropped for other reasons: a source other than the
    /// agent's IPv6 tunnel address, a port or protocol the service does not offer, extension
    /// headers, fragments, and the kernel's own link traffic (neighbour discovery, MLD).
    #[serde(default)]
    pub dropped_ipv6: Ipv6Drops,
    /// Packets to a routed service whose connector tunnel is not up (yet): dropped, never sent
    /// in the clear (fail closed).
    pub dropped_tunnel_down: u64,
    /// Packets dropped after waiting for room in their connector's inner connection, which
    /// stayed full (Linux; a platform that does not wait lets quinn drop the oldest instead).
    #[serde(default)]
    pub dropped_tunnel_full: u64,
    /// Packets dropped from a connector's fair queue (packets waiting while its inner
    /// connection was full) to keep it within its bounds: the oldest of the busiest flow.
    #[serde(default)]
    pub dropped_queue_full: u64,
    /// Inner packets dropped because their connector had neither a relay channel nor a direct
    /// path at that moment (the relay session was down).
    #[serde(default)]
    pub dropped_no_path: u64,
    /// Tunnel packets the UDP socket's send buffer refused on the way into a relay channel.
    #[serde(default)]
    pub dropped_relay_send: u64,
    /// Tunnel packets from a direct path's own socket dropped because quinn was not reading
    /// fast enough.
    #[serde(default)]
    pub dropped_direct_receive: u64,
    /// UDP datagrams dropped because their source claimed a connector's virtual address.
    #[serde(default)]
    pub dropped_spoofed: u64,
    /// Packets from a connector dropped by the inbound check: a source that is not one of that
    /// connector's services (or a port or protocol it does not serve), or a destination that is
    /// not the tunnel IP.
    #[serde(default)]
    pub dropped_inbound: u64,
    /// Services the catalog withdrew that keep their route until their grace period ends.
    #[serde(default)]
    pub withdrawing: Vec<String>,
    /// Why the agent gave up, if it did (a permanent refusal).
    #[serde(default)]
    pub refused: Option<String>,
    /// Name services and the DNS server.
    #[serde(default)]
    pub names: NamesStatus,
    /// Packets towards the platform dropped because it was not reading.
    pub dropped_to_platform: u64,
    /// Relay sessions established since start (all relays).
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
    tcp_resets: AtomicU64,
}

/// The agent's path to one connector.
struct Link {
    name: String,
    conn: RwLock<Option<quinn::Connection>>,
    /// The catalog's services of this connector, for the inbound check.
    services: RwLock<Vec<ServiceDef>>,
    counters: LinkCounters,
    /// The TCP connections answered through the current inner connection (locked by its
    /// reader per TCP packet, and when the connection ends).
    tcp_flows: Mutex<TcpFlows>,
    /// Whether `tcp_flows` answers the client's segments of connections it reset (checked
    /// per packet from the platform before taking the lock).
    resetting: AtomicBool,
    /// Until when (milliseconds on `Shared::clock`) packets go to this connector without
    /// waiting for room, after its inner connection stayed full for [`SEND_WAIT`].
    stalled_until_ms: AtomicU64,
    /// The agent's time base (`Shared::clock`) and drop counters.
    clock: Instant,
    drops: Arc<SendDrops>,
    /// Packets waiting for room in the inner connection's datagram buffer.
    queue: Arc<SendQueue>,
    /// The task that feeds `queue` to the inner connection (none in unit tests that build
    /// links outside a runtime).
    _pump: Option<crate::daemon::AbortOnDrop<()>>,
}

/// The packets a link holds while its inner connection's datagram buffer is full, fairly
/// queued per flow ([`crate::fair_queue`]): quinn's buffer drops its oldest datagram whatever
/// its flow, so under a UDP flood a ping behind it was lost; here the flood loses its own
/// oldest packets, and a sparse flow goes out ahead of it.
struct SendQueue {
    fq: Mutex<FairQueue<Bytes>>,
    /// Whether packets go through `fq`: set by the first packet that found the buffer full,
    /// cleared (under `fq`'s lock) by the pump when `fq` is empty again and every packet of it
    /// is in quinn's buffer, so a flow's packets stay in order.
    active: AtomicBool,
    wake: tokio::sync::Notify,
    /// Whether a TCP packet waits for its flow to leave `fq` ([`Link::send_wait`]); the pump
    /// then tells it of each packet it takes off (`popped`).
    waiting: AtomicBool,
    popped: tokio::sync::Notify,
}

/// Bounds of a link's [`SendQueue`]: about 40 ms at 50 Mbit/s in full-size packets.
const SEND_QUEUE_BYTES: usize = 256 * 1024;
const SEND_QUEUE_PACKETS: usize = 1024;

impl SendQueue {
    fn new() -> Self {
        SendQueue {
            fq: Mutex::new(FairQueue::new(SEND_QUEUE_BYTES, SEND_QUEUE_PACKETS)),
            active: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
            waiting: AtomicBool::new(false),
            popped: tokio::sync::Notify::new(),
        }
    }

    /// Queues a packet; how many queued packets the bounds dropped, and the packet's flow.
    fn push(&self, packet: Bytes) -> fair_queue::Pushed {
        let pushed = lock(&self.fq).push(packet);
        if !self.active.swap(true, Ordering::AcqRel) {
            self.wake.notify_one();
        }
        pushed
    }

    /// The next packet to hand on; when there is none, packets stop going through the queue.
    fn pop(&self) -> Option<Bytes> {
        let mut fq = lock(&self.fq);
        let p = fq.pop();
        if p.is_none() {
            self.active.store(false, Ordering::Release);
        }
        drop(fq);
        // After the lock: a waiter that saw its flow still queued had set `waiting` before.
        if self.waiting.load(Ordering::Acquire) {
            self.popped.notify_waiters();
        }
        p
    }

    /// Waits (at most `SEND_WAIT`) until nothing of `flow` is queued: a TCP sender is held
    /// back while its packet waits here, as it is while quinn's buffer is full.
    async fn wait_flow_sent(&self, flow: usize) {
        self.waiting.store(true, Ordering::Release);
        let _ = tokio::time::timeout(SEND_WAIT, async {
            loop {
                let popped = self.popped.notified();
                let mut popped = std::pin::pin!(popped);
                popped.as_mut().enable();
                if lock(&self.fq).flow_bytes(flow) == 0 {
                    return;
                }
                popped.await;
            }
        })
        .await;
        self.waiting.store(false, Ordering::Release);
    }

    /// Drops everything queued and stops queueing; how many packets there were.
    fn clear(&self) -> usize {
        let mut fq = lock(&self.fq);
        self.active.store(false, Ordering::Release);
        let n = fq.clear();
        drop(fq);
        self.popped.notify_waiters();
        n
    }
}

/// Packets dropped on their way from the platform into the inner connections.
#[derive(Default)]
struct SendDrops {
    /// The connector's inner connection was down.
    tunnel_down: AtomicU64,
    /// The inner connection stayed full for [`SEND_WAIT`].
    tunnel_full: AtomicU64,
    /// A link's fair queue was over its bounds.
    queue_full: AtomicU64,
}

/// Feeds a link's [`SendQueue`] to its current inner connection as quinn's buffer makes room.
/// A connection that stays full for [`SEND_WAIT`] gets the queue dropped and counted
/// (`dropped_tunnel_full`) and the link goes without waiting for [`STALL_HOLDOFF`], as
/// [`Agent::send_packet_wait`] does. Ends with the link.
async fn pump(link: std::sync::Weak<Link>, queue: Arc<SendQueue>) {
    loop {
        queue.wake.notified().await;
        while let Some(packet) = queue.pop() {
            let Some(link) = link.upgrade() else {
                return;
            };
            let Some(conn) = read(&link.conn).clone() else {
                let n = 1 + queue.clear();
                link.drops
                    .tunnel_down
                    .fetch_add(n as u64, Ordering::Relaxed);
                continue;
            };
            let len = packet.len() as u64;
            match tokio::time::timeout(SEND_WAIT, conn.send_datagram_wait(packet)).await {
                Ok(sent) => link.count_send(len, sent),
                Err(_) => {
                    let n = 1 + queue.clear();
                    link.drops
                        .tunnel_full
                        .fetch_add(n as u64, Ordering::Relaxed);
                    link.stall();
                }
            }
        }
    }
}

/// Hands `packet` to quinn if its datagram buffer has room for it now (one poll of
/// `send_datagram_wait`, which never drops a queued datagram); `None` when it is full.
fn try_send(
    conn: &quinn::Connection,
    packet: Bytes,
) -> Option<Result<(), quinn::SendDatagramError>> {
    let fut = std::pin::pin!(conn.send_datagram_wait(packet));
    match std::future::Future::poll(
        fut,
        &mut std::task::Context::from_waker(std::task::Waker::noop()),
    ) {
        std::task::Poll::Ready(sent) => Some(sent),
        std::task::Poll::Pending => None,
    }
}

/// How long [`Agent::send_packet_wait`] waits for room in an inner connection's datagram
/// buffer before it drops the packet.
pub const SEND_WAIT: Duration = Duration::from_millis(50);
/// How long after such a drop the connector's packets go without waiting.
pub const STALL_HOLDOFF: Duration = Duration::from_millis(500);

/// TCP connections remembered per connector, and how long an idle one may hold its place
/// when the table is full.
const TCP_FLOWS_PER_LINK: usize = 4096;
const TCP_FLOW_IDLE: Duration = Duration::from_secs(600);

impl Link {
    /// A link to connector `name`, with its send queue's pump running on the current runtime
    /// (holding the link weakly: it ends with the link).
    fn new(name: &str, clock: Instant, drops: Arc<SendDrops>) -> Arc<Link> {
        Arc::new_cyclic(|me| {
            let queue = Arc::new(SendQueue::new());
            let task = tokio::spawn(pump(me.clone(), queue.clone()));
            Link {
                name: name.to_owned(),
                conn: RwLock::new(None),
                services: RwLock::default(),
                counters: LinkCounters::default(),
                tcp_flows: Mutex::new(TcpFlows::new(TCP_FLOWS_PER_LINK, TCP_FLOW_IDLE)),
                resetting: AtomicBool::new(false),
                stalled_until_ms: AtomicU64::new(0),
                clock,
                drops,
                queue,
                _pump: Some(crate::daemon::AbortOnDrop(task)),
            }
        })
    }

    /// Whether the link's packets go without waiting for room now (after a stall).
    fn stalled(&self) -> bool {
        let until = self.stalled_until_ms.load(Ordering::Relaxed);
        until != 0 && until > self.clock.elapsed().as_millis() as u64
    }

    /// The inner connection stayed full: for [`STALL_HOLDOFF`] the link's packets go without
    /// waiting (quinn drops the oldest), so one stuck connector does not hold up the others.
    fn stall(&self) {
        let until = self.clock.elapsed() + STALL_HOLDOFF;
        self.stalled_until_ms
            .store(until.as_millis() as u64, Ordering::Relaxed);
        tracing::debug!(connector = %self.name, "the inner connection stayed full; dropping instead of waiting for a while");
    }

    /// Hands `packet` to `conn` (this link's inner connection) while it has room and nothing
    /// is queued, else to the link's fair queue; after a stall without either.
    fn send_fair(&self, conn: &quinn::Connection, packet: Bytes) {
        let len = packet.len() as u64;
        if self.stalled() {
            return self.count_send(len, conn.send_datagram(packet));
        }
        if !self.queue.active.load(Ordering::Acquire) {
            if let Some(sent) = try_send(conn, packet.clone()) {
                return self.count_send(len, sent);
            }
        }
        self.queue_packet(packet);
    }

    /// Puts `packet` into the fair queue, counting what its bounds dropped; its flow.
    fn queue_packet(&self, packet: Bytes) -> usize {
        let pushed = self.queue.push(packet);
        if pushed.dropped > 0 {
            self.drops
                .queue_full
                .fetch_add(pushed.dropped as u64, Ordering::Relaxed);
        }
        pushed.flow
    }

    /// Hands a TCP packet to `conn`, waiting for room (see [`Agent::send_packet_wait`]). While
    /// the fair queue is busy the packet joins it instead, and the wait is for it to leave:
    /// waiting for room in quinn's buffer would race the queue's pump for every slot that frees,
    /// and lose until the queue drained (a TCP ping under a UDP flood: 45-55 ms late, 256 KiB
    /// at 50 Mbit/s); in the queue the packet's flow gets its turn, first if it is sparse.
    async fn send_wait(&self, conn: &quinn::Connection, packet: Bytes) {
        let len = packet.len() as u64;
        if self.stalled() {
            return self.count_send(len, conn.send_datagram(packet));
        }
        if self.queue.active.load(Ordering::Acquire) {
            let flow = self.queue_packet(packet);
            return self.queue.wait_flow_sent(flow).await;
        }
        match tokio::time::timeout(SEND_WAIT, conn.send_datagram_wait(packet)).await {
            Ok(sent) => self.count_send(len, sent),
            Err(_) => {
                self.drops.tunnel_full.fetch_add(1, Ordering::Relaxed);
                self.stall();
            }
        }
    }

    /// Counts a packet handed to the inner connection.
    fn count_send(&self, len: u64, sent: Result<(), quinn::SendDatagramError>) {
        match sent {
            Ok(()) => {
                self.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
                self.counters.tx_bytes.fetch_add(len, Ordering::Relaxed);
            }
            Err(e) => tracing::trace!(connector = %self.name, error = %e, "inner send failed"),
        }
    }

    /// Hands the platform a reset for every TCP connection the inner connection carried: it is
    /// gone (or replaced), and the connector's TCP state went with it.
    fn reset_tcp(&self, sh: &Shared) {
        let client = match sh.tunnel_ip.load(Ordering::Relaxed) {
            0 => None,
            ip => Some(Ipv4Addr::from(ip)),
        };
        let mut flows = lock(&self.tcp_flows);
        let Some(client) = client else {
            // No tunnel address any more: nothing could deliver the resets.
            flows.clear();
            return;
        };
        let connections = flows.len();
        let resets = flows.take_resets(client, Instant::now());
        drop(flows);
        if resets.is_empty() {
            return;
        }
        self.resetting.store(true, Ordering::Relaxed);
        tracing::info!(connector = %self.name, connections, "the inner connection ended: resetting the TCP connections it carried");
        self.counters
            .tcp_resets
            .fetch_add(connections as u64, Ordering::Relaxed);
        for r in resets {
            if sh.to_platform.try_send(Bytes::from(r)).is_err() {
                sh.dropped_to_platform.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// What the session task keeps about one connector.
#[derive(Default)]
struct LinkControl {
    /// The channel request in flight (for status).
    request_id: Option<u32>,
    /// The relay channel, and the relay it runs through.
    channel: Option<(RelayAddr, ChannelId)>,
    /// The connector's virtual peer address, kept across channels.
    vaddr: Option<SocketAddr>,
    last_error: Option<String>,
    reader: Option<JoinHandle<()>>,
    handshake: Option<JoinHandle<()>>,
    direct: Option<DirectPath>,
    /// Candidates that arrived before the inner connection was up.
    pending_candidates: Option<Vec<Candidate>>,
}

impl LinkControl {
    /// Forgets everything about the inner connection (it is gone or going).
    fn stop_inner(&mut self) {
        if let Some(r) = self.reader.take() {
            r.abort();
        }
        if let Some(h) = self.handshake.take() {
            h.abort();
        }
        self.direct = None;
        self.pending_candidates = None;
    }
}

/// Where packets from the platform go (read per packet without a lock: `Shared::routes`).
#[derive(Default)]
struct RouteTable {
    /// Services at one IPv4 address.
    exact: HashMap<Ipv4Addr, Arc<Link>>,
    /// The pools of name services, routed like service addresses.
    pools: Vec<(ipnet::Ipv4Net, Arc<Link>)>,
    /// Services with IPv6 addresses (one address, or a name service's pool).
    v6: Vec<Route6>,
    /// The agent's IPv6 tunnel address, the only source IPv6 packets may have; none before
    /// the relay assigned a tunnel address.
    own6: Option<Ipv6Addr>,
}

/// An IPv6 route: a service's IPv6 addresses, its connector, and the service for the
/// protocol and port check.
struct Route6 {
    net: ipnet::Ipv6Net,
    link: Arc<Link>,
    service: ServiceDef,
}

impl RouteTable {
    /// The link a packet from the platform goes to. IPv4: by destination alone (the connector
    /// checks the rest). IPv6: the checks of [`crate::outbound`], with [`RouteTable::own6`] the
    /// agent's IPv6 tunnel address.
    fn pick(&self, packet: &[u8]) -> Result<&Arc<Link>, OutboundDrop> {
        if packet.first().is_some_and(|b| b >> 4 == 6) {
            let p = crate::outbound::classify6(packet, self.own6)?;
            let mut covered = false;
            for r in self.v6.iter().filter(|r| r.net.contains(&p.dst)) {
                if p.want.allowed_by(&r.service) {
                    return Ok(&r.link);
                }
                covered = true;
            }
            return Err(if covered {
                OutboundDrop::PortOrProtocol
            } else {
                OutboundDrop::NoRoute
            });
        }
        let dst = ipv4_destination(packet).ok_or(OutboundDrop::NoRoute)?;
        self.exact
            .get(&dst)
            .or_else(|| {
                self.pools
                    .iter()
                    .find(|(net, _)| net.contains(&dst))
                    .map(|(_, l)| l)
            })
            .ok_or(OutboundDrop::NoRoute)
    }
}

struct Shared {
    cfg: AgentConfig,
    /// Read per packet from the platform (a lock-free load); replaced whole when a tunnel
    /// state is published.
    routes: ArcSwap<RouteTable>,
    /// Name services: the names answered and the addresses handed out.
    names: Mutex<crate::names::NameBook>,
    /// The DNS server's address, once it listens.
    dns_server: Mutex<Option<SocketAddr>>,
    dns: DnsCounters,
    links: RwLock<HashMap<String, Arc<Link>>>,
    control: Mutex<HashMap<String, LinkControl>>,
    info: Mutex<Info>,
    /// The tunnel IP as a number, 0 while there is none (read per inbound packet).
    tunnel_ip: AtomicU32,
    dropped_no_route: AtomicU64,
    /// IPv6 packets from the platform dropped for reasons of their own.
    dropped_ipv6: OutboundCounters,
    /// Packets dropped on their way into the inner connections (shared with every link).
    send_drops: Arc<SendDrops>,
    /// The time base of per-link stamps.
    clock: Instant,
    dropped_to_platform: AtomicU64,
    dropped_inbound: AtomicU64,
    to_platform: mpsc::Sender<Bytes>,
    state_tx: watch::Sender<TunnelState>,
    refused_tx: watch::Sender<Option<Refusal>>,
}

/// What the status shows of one relay.
#[derive(Default)]
struct RelayInfo {
    /// The session's connection while it is up.
    conn: Option<quinn::Connection>,
    connecting: bool,
    observed: Option<SocketAddr>,
    sessions: u64,
    last_error: Option<String>,
}

#[derive(Default)]
struct Info {
    relays: BTreeMap<RelayAddr, RelayInfo>,
    /// The relay new channels go through.
    primary: Option<RelayAddr>,
    tunnel_ip: Option<Ipv4Addr>,
    rejected: Vec<RejectedService>,
    withdrawing: Vec<String>,
    relay_sessions: u64,
    last_error: Option<String>,
    refused: Option<Refusal>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

/// The IPv6 tunnel address status shows: the one derived from the tunnel IP, but none while
/// IPv6 is off (the platform then configures no IPv6 address).
fn shown_tunnel_ipv6(tunnel_ip: Option<Ipv4Addr>, ipv6: bool) -> Option<Ipv6Addr> {
    tunnel_ip.filter(|_| ipv6).map(tunnel_ipv6)
}

/// What the platform gets back for a packet dropped for `why`: a refusal for an IPv6 packet to
/// a port or protocol its service does not offer ([`crate::outbound::refusal6`]), else
/// nothing (a spoofed source or a packet to a service the agent was not given is never
/// answered).
fn answer_drop(why: OutboundDrop, packet: &[u8]) -> Option<Vec<u8>> {
    match why {
        OutboundDrop::PortOrProtocol => crate::outbound::refusal6(packet),
        _ => None,
    }
}

/// The protocol of an IPv4 packet, or the next header after an IPv6 packet's fixed header.
fn ip_protocol(packet: &[u8]) -> Option<u8> {
    match packet.first()? >> 4 {
        4 => packet.get(9).copied(),
        6 => packet.get(6).copied(),
        _ => None,
    }
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
    /// Resolves relay names, when the list has any.
    _resolver: Option<crate::daemon::AbortOnDrop<()>>,
}

/// A handle on the agent's name services, for its DNS server.
#[derive(Clone)]
pub struct Names {
    sh: Arc<Shared>,
}

impl Names {
    /// The DNS settings.
    pub fn options(&self) -> &DnsOptions {
        &self.sh.cfg.dns
    }

    /// The DNS counters.
    pub fn counters(&self) -> &DnsCounters {
        &self.sh.dns
    }

    /// Records where the DNS server listens (for status).
    pub fn set_server(&self, addr: Option<SocketAddr>) {
        *lock(&self.sh.dns_server) = addr;
    }

    /// The domains the agent answers for now.
    pub fn match_domains(&self) -> Vec<String> {
        lock(&self.sh.names).match_domains()
    }

    /// Decides one query ([`crate::names::NameBook::decide`]).
    pub fn decide(&self, query: &[u8], forward: bool) -> crate::names::Decision {
        lock(&self.sh.names).decide(query, forward)
    }

    /// Tells `connector` (on its current inner connection) that `mapping` stands; true once it
    /// accepted. False if the tunnel is down, or the connector refused or did not answer.
    pub async fn confirm(&self, connector: &str, mapping: ztna_proto::names::NameMapping) -> bool {
        let conn = read(&self.sh.links)
            .get(connector)
            .and_then(|l| read(&l.conn).clone());
        let Some(conn) = conn else {
            return false;
        };
        self.confirm_on(&conn, connector, &mapping).await
    }

    pub(crate) async fn confirm_on(
        &self,
        conn: &quinn::Connection,
        connector: &str,
        mapping: &ztna_proto::names::NameMapping,
    ) -> bool {
        use ztna_proto::names::MappingVerdict;
        match crate::dns::send_mapping(conn, mapping).await {
            Some(MappingVerdict::Accepted) => {
                lock(&self.sh.names).confirm(&mapping.name);
                true
            }
            verdict => {
                self.sh.dns.mappings_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%connector, ?verdict, "the connector did not accept a name mapping");
                tracing::debug!(%connector, name = %mapping.name, address = %mapping.address, "mapping not accepted");
                false
            }
        }
    }

    /// A snapshot for status.
    pub fn status(&self) -> NamesStatus {
        let book = lock(&self.sh.names);
        let c = &self.sh.dns;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NamesStatus {
            server: *lock(&self.sh.dns_server),
            domains: book.match_domains(),
            services: book.services_len(),
            mappings: book
                .mappings()
                .into_iter()
                .map(|m| NameMappingStatus {
                    name: m.name,
                    address: m.address,
                    address6: m.address6,
                    service: m.service,
                    connector: m.connector,
                    confirmed: m.confirmed,
                })
                .collect(),
            queries: [
                get(&c.answered),
                get(&c.forwarded),
                get(&c.denied),
                get(&c.refused),
                get(&c.failed),
                get(&c.dropped),
            ],
            mappings_refused: get(&c.mappings_refused),
        }
    }
}

impl Agent {
    /// Binds the socket and starts the tunnel in the current tokio runtime. Returns the agent
    /// and the receiver of packets for the platform's tunnel device.
    pub fn start(cfg: AgentConfig) -> std::io::Result<(Agent, mpsc::Receiver<Bytes>)> {
        let node = Node::bind(cfg.bind, cfg.credentials.clone(), cfg.timing)?;
        if let Some(mark) = cfg.options.fwmark {
            node.mux().set_mark(mark)?;
        }
        let (to_platform, rx) = mpsc::channel(TO_PLATFORM_QUEUE);
        let (state_tx, _) = watch::channel(TunnelState::default());
        let (refused_tx, _) = watch::channel(None);
        let machine_cfg = MachineConfig {
            withdraw_grace: cfg.options.withdraw_grace,
            max_refusals: cfg.options.max_refusals.max(1),
            ..MachineConfig::default()
        };
        let names = crate::names::NameBook::new(&cfg.dns.domains, cfg.dns.max_names);
        let shared = Arc::new(Shared {
            cfg,
            routes: ArcSwap::default(),
            names: Mutex::new(names),
            dns_server: Mutex::new(None),
            dns: DnsCounters::default(),
            links: RwLock::default(),
            control: Mutex::default(),
            info: Mutex::default(),
            tunnel_ip: AtomicU32::new(0),
            dropped_no_route: AtomicU64::new(0),
            dropped_ipv6: OutboundCounters::default(),
            send_drops: Arc::default(),
            clock: Instant::now(),
            dropped_to_platform: AtomicU64::new(0),
            dropped_inbound: AtomicU64::new(0),
            to_platform,
            state_tx,
            refused_tx,
        });
        let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
        let mut machine = AgentMachine::new(machine_cfg, jitter_seed());
        let mut resolver =
            crate::fleet::Resolver::new(shared.cfg.relays.clone(), shared.cfg.bind.is_ipv4());
        let resolver = match resolver.literals() {
            // Addresses only: nothing to resolve, ever.
            Some(literals) => {
                lock(&shared.info).relays = literals
                    .iter()
                    .map(|a| (*a, RelayInfo::default()))
                    .collect();
                machine.handle(Instant::now(), Input::Relays(literals));
                None
            }
            None => {
                let ev_tx = ev_tx.clone();
                Some(crate::daemon::AbortOnDrop(tokio::spawn(async move {
                    loop {
                        let addrs = resolver.next().await;
                        if ev_tx.send(Event::Resolved(addrs)).await.is_err() {
                            return;
                        }
                    }
                })))
            }
        };
        let driver = Driver {
            sh: shared.clone(),
            node: node.clone(),
            machine,
            sessions: HashMap::new(),
            connecting: HashMap::new(),
            liveness: HashMap::new(),
            inner_mtu: transport::INNER_MTU,
            ev_tx,
            ticks: 0,
        };
        let task = tokio::spawn(driver.run(ev_rx));
        Ok((
            Agent {
                shared,
                node,
                task,
                _resolver: resolver,
            },
            rx,
        ))
    }

    /// The platform saw the network change (an interface or address came or went, Wi-Fi to
    /// cellular): every direct-path driver gathers its host candidates again and sends them at
    /// once, so both ends probe the new addresses now rather than at the next refresh. The
    /// relay session needs nothing: its connection migrates by itself on its next packet (a
    /// keepalive at the latest), and the relay then re-sends the observed address, which the
    /// drivers offer too.
    pub fn network_changed(&self) {
        let control = lock(&self.shared.control);
        let drivers = control.values().filter_map(|c| c.direct.as_ref());
        let n = drivers.inspect(|d| d.network_changed()).count();
        tracing::info!(
            direct_paths = n,
            "network changed; gathering candidates again"
        );
    }

    /// The machine woke after sleeping `slept` (wall-clock time: monotonic clocks may stop
    /// during sleep). Does what [`Agent::network_changed`] does, and when the relay must have
    /// timed the session out meanwhile ([`reconnect_after_sleep`]), closes it so that the
    /// agent reconnects now instead of when its own idle timer, which did not run during the
    /// sleep, notices. Inner connections resume over the new session's channels.
    pub fn wake(&self, slept: Duration) {
        self.network_changed();
        if !reconnect_after_sleep(slept, &self.shared.cfg.timing) {
            return;
        }
        let conns: Vec<quinn::Connection> = lock(&self.shared.info)
            .relays
            .values()
            .filter_map(|r| r.conn.clone())
            .filter(|c| c.close_reason().is_none())
            .collect();
        if !conns.is_empty() {
            tracing::info!(
                slept_s = slept.as_secs(),
                "woke after a long sleep; reconnecting to the relays"
            );
        }
        for conn in conns {
            conn.close(0u32.into(), b"woke from sleep");
        }
    }

    /// Sends one IP packet from the platform into the tunnel. Never blocks; packets with no
    /// route, or whose connector tunnel is down, are dropped and counted. While the inner
    /// connection's datagram buffer is full, packets wait in the link's per-flow fair queue
    /// (bounded; over its bounds the flow holding the most loses its oldest packets, counted
    /// as `dropped_queue_full`). Platforms that can stop reading their device use
    /// [`Agent::send_packet_wait`] instead.
    pub fn send_packet(&self, packet: Bytes) {
        let Some((link, conn)) = self.route(&packet) else {
            return;
        };
        link.send_fair(&conn, packet);
    }

    /// Sends one IP packet from the platform into the tunnel, waiting while the inner
    /// connection's datagram buffer is full: the platform's reader stops reading its device,
    /// the kernel's queue to the device fills, and the local TCP is held back by its own small
    /// queues (TSQ) instead of losing packets in the tunnel. A connection that stays full for
    /// [`SEND_WAIT`] (a path that stopped carrying) gets the packet dropped and counted
    /// (`dropped_tunnel_full`), and for [`STALL_HOLDOFF`] after that its packets go without
    /// waiting (quinn drops the oldest), so one stuck connector does not hold up the others.
    ///
    /// Only TCP waits: a TCP sender slows down when its packets stay in the kernel's queue, a
    /// UDP or ICMP sender does not, and holding the reader for it would only put every other
    /// packet (a ping) behind it in that queue; those go as with [`Agent::send_packet`], into
    /// the fair queue while the connection is full. While that queue is busy a TCP packet
    /// joins it too, and the wait is for its flow to have left the queue (see
    /// `Link::send_wait`). One reader calls this.
    pub async fn send_packet_wait(&self, packet: Bytes) {
        if ip_protocol(&packet) != Some(TCP) {
            return self.send_packet(packet);
        }
        let Some((link, conn)) = self.route(&packet) else {
            return;
        };
        link.send_wait(&conn, packet).await;
    }

    /// The link and inner connection a packet from the platform goes to; counts the packet
    /// when there is none (no route, tunnel down) and answers it when it belongs to a TCP
    /// connection the agent reset.
    fn route(&self, packet: &[u8]) -> Option<(Arc<Link>, quinn::Connection)> {
        let sh = &self.shared;
        let picked = sh.routes.load().pick(packet).cloned();
        let link = match picked {
            Ok(link) => link,
            Err(why) => {
                sh.dropped_ipv6.count(why, &sh.dropped_no_route);
                tracing::trace!(?why, "packet from the platform dropped");
                if let Some(answer) = answer_drop(why, packet) {
                    if sh.to_platform.try_send(Bytes::from(answer)).is_err() {
                        sh.dropped_to_platform.fetch_add(1, Ordering::Relaxed);
                    }
                }
                return None;
            }
        };
        if link.resetting.load(Ordering::Relaxed) && self.answer_reset(&link, packet) {
            return None;
        }
        let Some(conn) = read(&link.conn).clone() else {
            self.shared
                .send_drops
                .tunnel_down
                .fetch_add(1, Ordering::Relaxed);
            return None;
        };
        Some((link, conn))
    }

    /// A segment of a TCP connection the agent reset after its inner connection ended is
    /// answered here with an exact reset instead of going on (see [`crate::tcp_flows`]);
    /// whether the packet was taken.
    fn answer_reset(&self, link: &Link, packet: &[u8]) -> bool {
        let mut flows = lock(&link.tcp_flows);
        let out = flows.outbound(packet, Instant::now());
        if !flows.resetting() {
            link.resetting.store(false, Ordering::Relaxed);
        }
        drop(flows);
        match out {
            crate::tcp_flows::Outbound::Pass => false,
            crate::tcp_flows::Outbound::Drop => true,
            crate::tcp_flows::Outbound::Reset(r) => {
                tracing::debug!(connector = %link.name, "answered a reset connection's segment with a reset");
                link.counters.tcp_resets.fetch_add(1, Ordering::Relaxed);
                if self.shared.to_platform.try_send(Bytes::from(r)).is_err() {
                    self.shared
                        .dropped_to_platform
                        .fetch_add(1, Ordering::Relaxed);
                }
                true
            }
        }
    }

    /// The name services: the DNS server's view of the agent ([`crate::dns::run`]).
    pub fn names(&self) -> Names {
        Names {
            sh: self.shared.clone(),
        }
    }

    /// Watches what the platform must configure.
    pub fn state(&self) -> watch::Receiver<TunnelState> {
        self.shared.state_tx.subscribe()
    }

    /// Watches for a permanent refusal: once it is `Some`, the tunnel has stopped for good and
    /// the platform should tear down and report it (`ztna-agent up` exits with
    /// [`Refusal::exit_code`]).
    pub fn refused(&self) -> watch::Receiver<Option<Refusal>> {
        self.shared.refused_tx.subscribe()
    }

    /// The relays of the fleet as resolved now, the one in use first (the Apple extension's
    /// `tunnelRemoteAddress`; every one is kept out of the tunnel).
    pub fn relay_addresses(&self) -> Vec<SocketAddr> {
        let info = lock(&self.shared.info);
        let mut out: Vec<SocketAddr> = info.primary.into_iter().collect();
        out.extend(info.relays.keys().filter(|a| Some(**a) != info.primary));
        out
    }

    /// A status snapshot.
    pub fn status(&self) -> AgentStatus {
        let sh = &self.shared;
        // Lock order everywhere: links, control, info.
        let links = read(&sh.links);
        let control = lock(&sh.control);
        let info = lock(&sh.info);
        let mux = self.node.mux().stats();
        let mut connectors: Vec<ConnectorStatus> = links
            .values()
            .map(|l| {
                let conn = read(&l.conn).clone();
                let ctl = control.get(&l.name);
                let direct = ctl.and_then(|c| c.direct.as_ref()).map(|d| d.status());
                let channel = ctl.and_then(|c| c.channel);
                let pending = ctl.and_then(|c| c.request_id).is_some() || channel.is_some();
                let path = match (&conn, direct.as_ref().and_then(|d| d.class)) {
                    (Some(_), Some(crate::path::PathClass::Lan)) => "direct-lan",
                    (Some(_), Some(crate::path::PathClass::Wan)) => "direct-wan",
                    (Some(_), None) if channel.is_some() => "relay",
                    (Some(_), None) => "resuming",
                    (None, _) if pending => "connecting",
                    (None, _) => "down",
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
                    channel_id: channel.map(|(_, c)| c.get()),
                    relay: channel.map(|(r, _)| r.to_string()),
                    rtt_ms: conn.as_ref().map(|c| c.rtt().as_secs_f64() * 1000.0),
                    tx_bytes: l.counters.tx_bytes.load(Ordering::Relaxed),
                    rx_bytes: l.counters.rx_bytes.load(Ordering::Relaxed),
                    tx_packets: l.counters.tx_packets.load(Ordering::Relaxed),
                    rx_packets: l.counters.rx_packets.load(Ordering::Relaxed),
                    tcp_resets: l.counters.tcp_resets.load(Ordering::Relaxed),
                    services: read(&l.services).iter().map(|s| s.name.clone()).collect(),
                    last_error: ctl.and_then(|c| c.last_error.clone()),
                    relay_packets: [get(|c| &c.relay_tx), get(|c| &c.relay_rx)],
                    direct_packets: [get(|c| &c.direct_tx), get(|c| &c.direct_rx)],
                    direct,
                    carriage: conn.as_ref().map(crate::congestion::CarriageStatus::of),
                }
            })
            .collect();
        connectors.sort_by(|a, b| a.name.cmp(&b.name));
        let mut services: Vec<ServiceAddresses> = links
            .values()
            .flat_map(|l| {
                read(&l.services)
                    .iter()
                    .map(|s| ServiceAddresses {
                        name: s.name.clone(),
                        address: s.prefix(),
                        address6: s.prefix6(),
                        connector: s.connector.clone(),
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        let relays: Vec<RelayStatus> = info
            .relays
            .iter()
            .map(|(addr, r)| RelayStatus {
                addr: addr.to_string(),
                state: match (&r.conn, r.connecting) {
                    (Some(_), _) => "up",
                    (None, true) => "connecting",
                    (None, false) => "down",
                }
                .into(),
                in_use: info.primary == Some(*addr),
                rtt_ms: r.conn.as_ref().map(|c| c.rtt().as_secs_f64() * 1000.0),
                channels: control
                    .values()
                    .filter(|c| c.channel.is_some_and(|(a, _)| a == *addr))
                    .count(),
                sessions: r.sessions,
                last_error: r.last_error.clone(),
            })
            .collect();
        let in_use = info.primary.and_then(|p| info.relays.get(&p));
        let in_use_conn = in_use.and_then(|r| r.conn.as_ref());
        AgentStatus {
            relay: info
                .primary
                .or_else(|| info.relays.keys().next().copied())
                .map(|a| a.to_string())
                .unwrap_or_else(|| {
                    sh.cfg
                        .relays
                        .iter()
                        .map(|r| r.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                }),
            connected: info.relays.values().any(|r| r.conn.is_some()),
            relays,
            identity: sh.cfg.credentials.identity().name.clone(),
            tunnel_ip: info.tunnel_ip,
            tunnel_ipv6: shown_tunnel_ipv6(info.tunnel_ip, sh.cfg.options.ipv6),
            services,
            observed_addr: in_use.and_then(|r| r.observed),
            relay_rtt_ms: in_use_conn.map(|c| c.rtt().as_secs_f64() * 1000.0),
            relay_carriage: in_use_conn.map(crate::congestion::CarriageStatus::of),
            mtu: sh.cfg.tun_mtu,
            rejected: info.rejected.clone(),
            connectors,
            dropped_no_route: sh.dropped_no_route.load(Ordering::Relaxed),
            dropped_ipv6: sh.dropped_ipv6.snapshot(),
            dropped_tunnel_down: sh.send_drops.tunnel_down.load(Ordering::Relaxed),
            dropped_tunnel_full: sh.send_drops.tunnel_full.load(Ordering::Relaxed),
            dropped_queue_full: sh.send_drops.queue_full.load(Ordering::Relaxed),
            dropped_no_path: mux.unroutable.load(Ordering::Relaxed),
            dropped_relay_send: mux.relay_tx_dropped.load(Ordering::Relaxed),
            dropped_direct_receive: mux.inbound_dropped.load(Ordering::Relaxed),
            dropped_spoofed: mux.spoofed_dropped.load(Ordering::Relaxed),
            dropped_inbound: sh.dropped_inbound.load(Ordering::Relaxed),
            dropped_to_platform: sh.dropped_to_platform.load(Ordering::Relaxed),
            withdrawing: info.withdrawing.clone(),
            refused: info.refused.map(|r| r.to_string()),
            names: self.names().status(),
            relay_sessions: info.relay_sessions,
            last_error: info.last_error.clone(),
        }
    }

    /// Stops the tunnel: closes the inner connections and the relay session, and waits (briefly)
    /// for the close to go out.
    pub async fn shutdown(self) {
        self.task.abort();
        let _ = self.task.await;
        close_all_inner(&self.shared, "agent shutting down");
        self.node
            .endpoint()
            .close(0u32.into(), b"agent shutting down");
        let _ =
            tokio::time::timeout(Duration::from_secs(1), self.node.endpoint().wait_idle()).await;
    }
}

fn close_all_inner(sh: &Shared, why: &str) {
    let links: Vec<Arc<Link>> = read(&sh.links).values().cloned().collect();
    for l in links {
        if let Some(c) = write(&l.conn).take() {
            c.close(0u32.into(), why.as_bytes());
        }
    }
    for c in lock(&sh.control).values_mut() {
        c.stop_inner();
    }
}

/// Whether the relay has surely dropped a session that was silent for `slept`: its idle timer
/// ran out, counting the keepalive interval the session may have been quiet before. Pure.
pub fn reconnect_after_sleep(slept: Duration, timing: &Timing) -> bool {
    slept.saturating_add(timing.keepalive) >= timing.idle_timeout
}

/// What the inner connections' tasks, the relay connection attempts and the resolver report.
enum Event {
    InnerUp {
        connector: String,
        conn: quinn::Connection,
    },
    InnerDown {
        connector: String,
        /// The connection that ended; `None` for a failed handshake.
        stable_id: Option<usize>,
        error: String,
    },
    /// A connection attempt to `relay` ended.
    Session {
        relay: RelayAddr,
        result: Result<RelaySession, SessionError>,
    },
    /// The relay list resolved to these addresses.
    Resolved(Vec<RelayAddr>),
}

/// How often the liveness of relay sessions that carry channels is checked.
const LIVENESS_TICK: Duration = Duration::from_millis(50);
/// How often the sessions' RTTs are fed to the relay choice (every second).
const RTT_EVERY_TICKS: u32 = 20;

/// The session task: feeds the machine and carries out its commands.
struct Driver {
    sh: Arc<Shared>,
    node: Node,
    machine: AgentMachine,
    sessions: HashMap<RelayAddr, RelaySession>,
    connecting: HashMap<RelayAddr, JoinHandle<()>>,
    liveness: HashMap<RelayAddr, Liveness>,
    /// The inner UDP payload size the sessions carry.
    inner_mtu: u16,
    ev_tx: mpsc::Sender<Event>,
    ticks: u32,
}

/// The next control message of any session, with the relay it came from.
async fn next_message(
    sessions: &mut HashMap<RelayAddr, RelaySession>,
) -> (RelayAddr, Result<ControlMessage, SessionError>) {
    if sessions.is_empty() {
        return std::future::pending().await;
    }
    let next = sessions.iter_mut().map(|(addr, s)| {
        let addr = *addr;
        Box::pin(async move { (addr, s.recv().await) })
    });
    futures::future::select_all(next).await.0
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

fn software() -> String {
    format!("ztna-agent/{}", env!("CARGO_PKG_VERSION"))
}

impl Driver {
    async fn run(mut self, mut events: mpsc::Receiver<Event>) {
        let mut tick = tokio::time::interval(LIVENESS_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.execute();
            if self.machine.exited() {
                return;
            }
            let deadline = self.machine.poll_timeout();
            let watching = !self.sessions.is_empty();
            tokio::select! {
                (relay, m) = next_message(&mut self.sessions) => self.on_message(relay, m),
                Some(ev) = events.recv() => self.on_event(ev),
                _ = sleep_until(deadline) => self.machine.handle_timeout(Instant::now()),
                _ = tick.tick(), if watching => self.on_tick(),
            }
        }
    }

    /// Checks that every relay session still answers, and (every second) feeds the
    /// sessions' RTTs to the relay choice.
    fn on_tick(&mut self) {
        let now = Instant::now();
        self.ticks = self.ticks.wrapping_add(1);
        if self.ticks.is_multiple_of(RTT_EVERY_TICKS) {
            let rtts: Vec<(RelayAddr, Duration)> = self
                .sessions
                .iter()
                .map(|(a, s)| (*a, s.connection().rtt()))
                .collect();
            for (relay, rtt) in rtts {
                self.machine.handle(now, Input::Rtt { relay, rtt });
            }
        }
        // Channel traffic per relay: [sent, received].
        let mut traffic: HashMap<RelayAddr, [u64; 2]> = HashMap::new();
        for ctl in lock(&self.sh.control).values() {
            let (Some((relay, _)), Some(v)) = (ctl.channel, ctl.vaddr) else {
                continue;
            };
            if let Some(c) = self.node.mux().route_counters(v) {
                let t = traffic.entry(relay).or_default();
                t[0] += c.relay_tx.load(Ordering::Relaxed);
                t[1] += c.relay_rx.load(Ordering::Relaxed);
            }
        }
        let mut dead = Vec::new();
        for (relay, session) in &self.sessions {
            // The session's own datagrams count too: its keepalives find a dead relay within
            // a keepalive interval even when no channel runs through it (an idle agent, or
            // traffic on a direct path, which must keep a live relay to fall back to).
            let [ctx, crx] = traffic.get(relay).copied().unwrap_or_default();
            let stats = session.connection().stats();
            let (tx, rx) = (ctx + stats.udp_tx.datagrams, crx + stats.udp_rx.datagrams);
            let l = self
                .liveness
                .entry(*relay)
                .or_insert_with(|| Liveness::new(tx, rx, jitter_seed()));
            let rtt = session.connection().rtt();
            match l.observe(now, tx, rx, rtt) {
                Verdict::Fine => {}
                Verdict::Ping(n) => {
                    tracing::debug!(%relay, "no traffic back through the relay; asking it");
                    let _ = session.send(ControlMessage::Ping(n));
                }
                Verdict::Dead => dead.push((*relay, rtt)),
            }
        }
        for (relay, rtt) in dead {
            let waited = Liveness::suspect_after(rtt) + Liveness::confirm_within(rtt);
            tracing::warn!(%relay, waited_ms = waited.as_millis() as u64, "the relay stopped answering; failing over");
            self.session_failed(
                relay,
                &SessionError::Unresponsive(waited),
                "relay session ended",
            );
        }
    }

    /// Carries out every pending command of the machine.
    fn execute(&mut self) {
        while let Some(cmd) = self.machine.poll_command() {
            match cmd {
                Command::Connect { relay } => {
                    tracing::debug!(%relay, "connecting to the relay");
                    let node = self.node.clone();
                    let target = RelayTarget {
                        addr: relay,
                        server_name: self.sh.cfg.relay_name.clone(),
                    };
                    let hello = Hello {
                        role: Role::Agent,
                        services: vec![],
                        want: self.sh.cfg.want.clone(),
                        software: software(),
                        // The address the fleet gave this agent so far: the relay keeps it if
                        // it can, so that connections survive a move between relays.
                        tunnel_ip: match self.sh.tunnel_ip.load(Ordering::Relaxed) {
                            0 => None,
                            ip => Some(Ipv4Addr::from(ip)),
                        },
                    };
                    let ev_tx = self.ev_tx.clone();
                    lock(&self.sh.info)
                        .relays
                        .entry(relay)
                        .or_default()
                        .connecting = true;
                    let task = tokio::spawn(async move {
                        let result = node.connect_relay(&target, hello).await;
                        let _ = ev_tx.send(Event::Session { relay, result }).await;
                    });
                    if let Some(old) = self.connecting.insert(relay, task) {
                        old.abort();
                    }
                }
                Command::Disconnect { relay } => {
                    tracing::info!(%relay, "relay no longer listed; leaving it");
                    if let Some(t) = self.connecting.remove(&relay) {
                        t.abort();
                    }
                    self.sessions.remove(&relay);
                    self.liveness.remove(&relay);
                    lock(&self.sh.info).relays.remove(&relay);
                }
                Command::Exit(r) => {
                    tracing::error!(refusal = %r, exit_code = r.exit_code(), "giving up: {r}");
                    lock(&self.sh.info).refused = Some(r);
                    close_all_inner(&self.sh, "agent refused");
                    self.sh.refused_tx.send_replace(Some(r));
                }
                Command::Publish(state) => self.publish(state),
                Command::OpenChannel {
                    relay,
                    connector,
                    request_id,
                } => {
                    lock(&self.sh.control)
                        .entry(connector.clone())
                        .or_default()
                        .request_id = Some(request_id);
                    tracing::debug!(%connector, %relay, request_id, "asking the relay for a channel");
                    if let Some(s) = self.sessions.get(&relay) {
                        if let Err(e) = s.send(ControlMessage::OpenChannel {
                            request_id,
                            connector: connector.clone(),
                        }) {
                            tracing::warn!(%connector, error = %e, "could not ask for a channel");
                        }
                    }
                }
                Command::CloseChannel { relay, channel } => {
                    if let Some(s) = self.sessions.get(&relay) {
                        let _ = s.send(ControlMessage::ChannelClosed {
                            channel_id: channel.get(),
                            code: ErrorCode::PeerGone,
                        });
                    }
                }
                Command::Attach {
                    connector,
                    relay,
                    channel,
                    handshake,
                } => self.attach(connector, relay, channel, handshake),
                Command::Detach { connector } => {
                    if let Some(ctl) = lock(&self.sh.control).get_mut(&connector) {
                        ctl.channel = None;
                        ctl.request_id = None;
                        if let Some(v) = ctl.vaddr {
                            self.node.mux().clear_relay_route(v);
                        }
                    }
                }
                Command::CloseInner { connector } => self.close_inner(&connector, "tunnel reset"),
                Command::Forget { connector } => {
                    self.close_inner(&connector, "connector left the catalog");
                    if let Some(ctl) = lock(&self.sh.control).remove(&connector) {
                        if let Some(v) = ctl.vaddr {
                            self.node.mux().remove_route(v);
                        }
                    }
                }
            }
        }
        let mut info = lock(&self.sh.info);
        info.withdrawing = self.machine.withdrawing();
        info.primary = self.machine.primary();
    }

    /// Applies a new tunnel state: links, routes and the inbound check's services, then tells
    /// the platform.
    fn publish(&self, mut state: TunnelState) {
        if !self.sh.cfg.options.ipv6 {
            for s in &mut state.services {
                s.address6 = None;
            }
        }
        {
            let mut links = write(&self.sh.links);
            let mut by_connector: HashMap<&str, Vec<ServiceDef>> = HashMap::new();
            for s in &state.services {
                by_connector
                    .entry(s.connector.as_str())
                    .or_default()
                    .push(s.clone());
            }
            links.retain(|name, _| by_connector.contains_key(name.as_str()));
            for (name, services) in by_connector {
                let link = links
                    .entry(name.to_owned())
                    .or_insert_with(|| Link::new(name, self.sh.clock, self.sh.send_drops.clone()));
                *write(&link.services) = services;
            }
            let mut table = RouteTable {
                own6: state.tunnel_ipv6(),
                ..RouteTable::default()
            };
            for s in &state.services {
                if let Some(l) = links.get(&s.connector) {
                    if s.names.is_some() {
                        table.pools.push((s.prefix(), l.clone()));
                    } else {
                        table.exact.insert(s.address, l.clone());
                    }
                    if let Some(net) = s.prefix6() {
                        table.v6.push(Route6 {
                            net,
                            link: l.clone(),
                            service: s.clone(),
                        });
                    }
                }
            }
            self.sh.routes.store(Arc::new(table));
        }
        lock(&self.sh.names).set_catalog(&state.services);
        self.sh
            .tunnel_ip
            .store(state.tunnel_ip.map_or(0, u32::from), Ordering::Relaxed);
        lock(&self.sh.info).tunnel_ip = state.tunnel_ip;
        tracing::debug!(services = state.services.len(), "routes published");
        self.sh.state_tx.send_replace(state);
    }

    fn attach(&self, connector: String, relay: RelayAddr, channel: ChannelId, handshake: bool) {
        let Some(session) = self.sessions.get(&relay) else {
            return;
        };
        // Lock order: links before control.
        let conn = read(&self.sh.links)
            .get(&connector)
            .and_then(|l| read(&l.conn).clone());
        let mut control = lock(&self.sh.control);
        let ctl = control.entry(connector.clone()).or_default();
        ctl.request_id = None;
        ctl.channel = Some((relay, channel));
        let vaddr = match ctl.vaddr {
            Some(v) => {
                session.reattach_channel(v, channel);
                v
            }
            None => {
                let v = session.attach_channel(channel);
                ctl.vaddr = Some(v);
                v
            }
        };
        if handshake {
            tracing::debug!(%connector, %channel, "channel open; starting the inner connection");
            if let Some(h) = ctl.handshake.take() {
                h.abort();
            }
            ctl.handshake = Some(tokio::spawn(connect_inner(
                self.node.clone(),
                connector,
                vaddr,
                self.inner_mtu,
                self.sh.cfg.tun_mtu,
                self.ev_tx.clone(),
            )));
            return;
        }
        tracing::info!(%connector, %relay, %channel, "inner connection resumed over a new relay channel");
        // The direct-path driver keeps its path (traffic on it never stops) and sends its
        // candidates through the new channel from now on.
        let observed = lock(&self.sh.info)
            .relays
            .get(&relay)
            .and_then(|r| r.observed);
        match &ctl.direct {
            Some(d) => d.rebind(channel, session.control_sender(), observed),
            None => {
                if let Some(conn) = conn {
                    self.start_direct(ctl, &connector, &conn, relay, channel, vaddr);
                }
            }
        }
    }

    fn start_direct(
        &self,
        ctl: &mut LinkControl,
        connector: &str,
        conn: &quinn::Connection,
        relay: RelayAddr,
        channel: ChannelId,
        vaddr: SocketAddr,
    ) {
        let (true, Some(session)) = (self.sh.cfg.direct.enabled, self.sessions.get(&relay)) else {
            return;
        };
        let (observed, tunnel_ip) = {
            let info = lock(&self.sh.info);
            (
                info.relays.get(&relay).and_then(|r| r.observed),
                info.tunnel_ip,
            )
        };
        let mut opts = self.sh.cfg.direct.clone();
        opts.exclude.extend(tunnel_ip.map(std::net::IpAddr::V4));
        opts.exclude
            .extend(tunnel_ip.map(|ip| std::net::IpAddr::V6(tunnel_ipv6(ip))));
        // Service addresses are never probe targets, whatever a connector lists (the catalog
        // as it is when the driver starts; it restarts with each new inner connection).
        opts.refuse
            .extend(read(&self.sh.links).values().flat_map(|l| {
                read(&l.services)
                    .iter()
                    .flat_map(|s| {
                        let v4 = ipnet::IpNet::from(std::net::IpAddr::V4(s.address));
                        std::iter::once(v4).chain(s.prefix6().map(ipnet::IpNet::V6))
                    })
                    .collect::<Vec<_>>()
            }));
        let ctx = DirectContext {
            mux: self.node.mux().clone(),
            vaddr,
            channel,
            control: session.control_sender(),
            observed,
            full_probe_len: usize::from(self.inner_mtu),
            peer: connector.to_owned(),
        };
        match DirectPath::start(conn, ctx, &opts) {
            Ok(d) => {
                if let Some(c) = ctl.pending_candidates.take() {
                    d.set_peer_candidates(c);
                }
                ctl.direct = Some(d);
            }
            Err(e) => {
                tracing::warn!(%connector, error = %e, "no direct path for this tunnel")
            }
        }
    }

    fn close_inner(&self, connector: &str, why: &str) {
        let link = read(&self.sh.links).get(connector).cloned();
        if let Some(link) = &link {
            if let Some(c) = write(&link.conn).take() {
                c.close(0u32.into(), why.as_bytes());
            }
        }
        if let Some(ctl) = lock(&self.sh.control).get_mut(connector) {
            ctl.stop_inner();
        }
        if let Some(link) = link {
            link.reset_tcp(&self.sh);
        }
    }

    fn on_connect(&mut self, relay: RelayAddr, result: Result<RelaySession, SessionError>) {
        let now = Instant::now();
        self.connecting.remove(&relay);
        let session = match result {
            Ok(s) => s,
            Err(e) => {
                self.session_failed(relay, &e, "could not connect to the relay");
                return;
            }
        };
        let welcome = session.welcome().clone();
        let inner_mtu = transport::INNER_MTU;
        self.inner_mtu = inner_mtu;
        let rtt = session.connection().rtt();
        {
            let mut info = lock(&self.sh.info);
            info.relay_sessions += 1;
            let r = info.relays.entry(relay).or_default();
            r.conn = Some(session.connection().clone());
            r.connecting = false;
            r.sessions += 1;
            r.observed = Some(welcome.observed_addr);
            r.last_error = None;
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
            %relay,
            identity = %welcome.identity,
            tunnel_ip = ?welcome.tunnel_ip,
            observed = %welcome.observed_addr,
            services = welcome.services.len(),
            rtt_ms = rtt.as_secs_f64() * 1000.0,
            inner_mtu,
            "connected to the relay"
        );
        for r in &welcome.rejected {
            tracing::error!(service = %r.name, code = %r.code, "relay refused service: {}", r.message);
        }
        self.sessions.insert(relay, session);
        self.liveness.remove(&relay);
        self.machine.handle(
            now,
            Input::Connected {
                relay,
                tunnel_ip: welcome.tunnel_ip,
                services: welcome.services,
                rtt,
            },
        );
    }

    /// A connection attempt to `relay` failed or its session ended.
    fn session_failed(&mut self, relay: RelayAddr, e: &SessionError, what: &str) {
        self.sessions.remove(&relay);
        self.liveness.remove(&relay);
        let refusal = e.refusal();
        {
            let mut info = lock(&self.sh.info);
            if let Some(r) = info.relays.get_mut(&relay) {
                r.conn = None;
                r.connecting = false;
                r.last_error = Some(e.to_string());
            }
            info.last_error = Some(format!("{relay}: {e}"));
        }
        for ctl in lock(&self.sh.control).values_mut() {
            if ctl.channel.is_some_and(|(r, _)| r == relay) {
                ctl.channel = None;
                ctl.request_id = None;
            }
        }
        match refusal {
            Some(r) => {
                tracing::error!(%relay, error = %e, refusal = %r, "{what}: refused")
            }
            None if self.sessions.is_empty() => {
                tracing::warn!(%relay, error = %e, "{what}; retrying (routes stay, packets to services are dropped meanwhile)")
            }
            None => {
                tracing::warn!(%relay, error = %e, "{what}; retrying, its channels move to another relay")
            }
        }
        self.machine
            .handle(Instant::now(), Input::Disconnected { relay, refusal });
    }

    fn on_message(&mut self, relay: RelayAddr, msg: Result<ControlMessage, SessionError>) {
        let now = Instant::now();
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                self.session_failed(relay, &e, "relay session ended");
                return;
            }
        };
        let on_channel = |c: &LinkControl, id: u32| {
            c.channel
                .is_some_and(|(r, ch)| r == relay && ch.get() == id)
        };
        match msg {
            ControlMessage::Catalog(services) => {
                tracing::info!(%relay, services = services.len(), "service catalog updated");
                self.machine.handle(now, Input::Catalog { relay, services });
            }
            ControlMessage::ObservedAddress(a) => {
                tracing::info!(%relay, "relay observed a new address for this agent");
                tracing::debug!(observed = %a, "new observed address");
                lock(&self.sh.info)
                    .relays
                    .entry(relay)
                    .or_default()
                    .observed = Some(a);
                for d in lock(&self.sh.control)
                    .values()
                    .filter(|c| c.channel.is_some_and(|(r, _)| r == relay))
                    .filter_map(|c| c.direct.as_ref())
                {
                    d.set_observed(a);
                }
            }
            ControlMessage::Candidates {
                channel_id,
                candidates,
            } => {
                let mut control = lock(&self.sh.control);
                match control.values_mut().find(|c| on_channel(c, channel_id)) {
                    Some(ctl) => match &ctl.direct {
                        Some(d) => d.set_peer_candidates(candidates),
                        None => ctl.pending_candidates = Some(candidates),
                    },
                    None => {
                        tracing::debug!(channel_id, "candidates for an unknown channel; ignored")
                    }
                }
            }
            ControlMessage::ChannelOpened {
                request_id,
                channel_id,
                connector,
            } => {
                let Some(channel) = ChannelId::new(channel_id) else {
                    let e = SessionError::Protocol(format!("channel id {channel_id} out of range"));
                    self.session_failed(relay, &e, "relay session ended");
                    return;
                };
                self.machine.handle(
                    now,
                    Input::ChannelOpened {
                        relay,
                        request_id,
                        channel,
                        connector,
                    },
                );
            }
            ControlMessage::ChannelClosed { channel_id, code } => {
                let connector = lock(&self.sh.control)
                    .iter()
                    .find(|(_, c)| on_channel(c, channel_id))
                    .map(|(n, _)| n.clone());
                if let Some(connector) = connector {
                    tracing::warn!(%connector, %relay, channel_id, %code, "relay closed the channel");
                    if let Some(ctl) = lock(&self.sh.control).get_mut(&connector) {
                        ctl.last_error = Some(format!("channel closed: {code}"));
                    }
                }
                self.machine.handle(
                    now,
                    Input::ChannelClosed {
                        relay,
                        channel: channel_id,
                    },
                );
            }
            ControlMessage::Error {
                code,
                request_id,
                message,
            } => {
                let connector = request_id.and_then(|id| {
                    lock(&self.sh.control)
                        .iter_mut()
                        .find(|(_, c)| c.request_id == Some(id))
                        .map(|(n, c)| {
                            c.request_id = None;
                            c.last_error = Some(format!("{code}: {message}"));
                            n.clone()
                        })
                });
                match (connector, request_id) {
                    (Some(connector), Some(request_id)) => {
                        tracing::warn!(%connector, %relay, %code, "relay could not open a channel: {message}");
                        self.machine
                            .handle(now, Input::ChannelRefused { relay, request_id });
                    }
                    _ => tracing::error!(%relay, %code, "relay reported an error: {message}"),
                }
            }
            ControlMessage::Pong(n) => {
                if let Some(l) = self.liveness.get_mut(&relay) {
                    l.pong(n);
                }
            }
            other => tracing::warn!(
                kind = other.kind(),
                "unexpected control message from the relay; ignored"
            ),
        }
    }

    fn on_event(&mut self, ev: Event) {
        let now = Instant::now();
        match ev {
            Event::Session { relay, result } => self.on_connect(relay, result),
            Event::Resolved(addrs) => {
                let known: Vec<RelayAddr> = lock(&self.sh.info).relays.keys().copied().collect();
                if addrs.iter().any(|a| !known.contains(a))
                    || known.iter().any(|a| !addrs.contains(a))
                {
                    tracing::info!(relays = ?addrs, "relay list");
                }
                {
                    let mut info = lock(&self.sh.info);
                    info.relays.retain(|a, _| addrs.contains(a));
                    for a in &addrs {
                        info.relays.entry(*a).or_default();
                    }
                }
                self.machine.handle(now, Input::Relays(addrs));
            }
            Event::InnerUp { connector, conn } => {
                let link = read(&self.sh.links).get(&connector).cloned();
                let mut control = lock(&self.sh.control);
                let ctl = control
                    .get_mut(&connector)
                    .filter(|c| c.vaddr == Some(conn.remote_address()));
                let (Some(ctl), Some(link)) = (ctl, link) else {
                    conn.close(0u32.into(), b"connector gone");
                    return;
                };
                tracing::info!(%connector, rtt_ms = conn.rtt().as_millis() as u64, "tunnel to connector up");
                ctl.handshake = None;
                ctl.last_error = None;
                if let Some(old) = write(&link.conn).replace(conn.clone()) {
                    old.close(0u32.into(), b"replaced");
                }
                if let Some(old) = ctl.reader.take() {
                    old.abort();
                }
                // A new inner connection: the connector has no TCP state for the connections
                // the previous one carried (it restarted, or dropped it).
                link.reset_tcp(&self.sh);
                // Nor the name mappings: tell it again.
                let mappings = lock(&self.sh.names).unconfirm(&connector);
                if !mappings.is_empty() {
                    tokio::spawn(crate::dns::resend_mappings(
                        Names {
                            sh: self.sh.clone(),
                        },
                        connector.clone(),
                        conn.clone(),
                        mappings,
                    ));
                }
                let reader = tokio::spawn(read_inner(
                    self.sh.clone(),
                    link,
                    conn.clone(),
                    self.ev_tx.clone(),
                ));
                if let Some(old) = ctl.reader.replace(reader) {
                    old.abort();
                }
                ctl.direct = None;
                if let (Some((relay, channel)), Some(vaddr)) = (ctl.channel, ctl.vaddr) {
                    self.start_direct(ctl, &connector, &conn, relay, channel, vaddr);
                }
                drop(control);
                self.machine.handle(now, Input::InnerUp { connector });
            }
            Event::InnerDown {
                connector,
                stable_id,
                error,
            } => {
                let link = read(&self.sh.links).get(&connector).cloned();
                let current = link.as_ref().is_some_and(|l| {
                    let conn = read(&l.conn);
                    match (stable_id, conn.as_ref()) {
                        (Some(id), Some(c)) => c.stable_id() == id,
                        (None, None) => true,
                        _ => false,
                    }
                });
                if !current {
                    return;
                }
                tracing::warn!(%connector, %error, "tunnel to connector down");
                if let Some(c) = link.and_then(|l| write(&l.conn).take()) {
                    c.close(0u32.into(), b"down");
                }
                if let Some(ctl) = lock(&self.sh.control).get_mut(&connector) {
                    ctl.stop_inner();
                    ctl.last_error = Some(error);
                }
                if let Some(link) = read(&self.sh.links).get(&connector) {
                    link.reset_tcp(&self.sh);
                }
                self.machine.handle(now, Input::InnerDown { connector });
            }
        }
    }
}

async fn connect_inner(
    node: Node,
    connector: String,
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
        cfg.transport_config(transport::inner_agent(
            inner_mtu,
            node.timing(),
            node.mux().path_changes(vaddr),
        ));
        let connecting = node
            .endpoint()
            .connect_with(cfg, vaddr, &connector)
            .map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(INNER_HANDSHAKE_TIMEOUT, connecting)
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
        Ok(conn) => Event::InnerUp { connector, conn },
        Err(error) => Event::InnerDown {
            connector,
            stable_id: None,
            error,
        },
    };
    let _ = ev_tx.send(ev).await;
}

/// Counts a packet from the connector and applies the inbound check; whether it may go to the
/// platform.
fn admit(sh: &Shared, link: &Link, pkt: &[u8]) -> bool {
    link.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
    link.counters
        .rx_bytes
        .fetch_add(pkt.len() as u64, Ordering::Relaxed);
    let tunnel_ip = match sh.tunnel_ip.load(Ordering::Relaxed) {
        0 => None,
        ip => Some(Ipv4Addr::from(ip)),
    };
    if let Err(why) = crate::inbound::check(pkt, &read(&link.services), tunnel_ip) {
        sh.dropped_inbound.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(connector = %link.name, ?why, "packet from the connector dropped by the inbound check");
        return false;
    }
    if ip_protocol(pkt) == Some(TCP) {
        lock(&link.tcp_flows).observe(pkt, Instant::now());
    }
    true
}

async fn read_inner(
    sh: Arc<Shared>,
    link: Arc<Link>,
    conn: quinn::Connection,
    ev_tx: mpsc::Sender<Event>,
) {
    let started = Instant::now();
    let _tcp = crate::daemon::AbortOnDrop(tokio::spawn(read_tcp_carriage(
        sh.clone(),
        link.clone(),
        conn.clone(),
    )));
    let error = loop {
        match conn.read_datagram().await {
            Ok(pkt) => {
                if admit(&sh, &link, &pkt) && sh.to_platform.try_send(pkt).is_err() {
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
            stable_id: Some(conn.stable_id()),
            error: error.to_string(),
        })
        .await;
}

/// Reads the connector's TCP segments from the inner connection's carriage streams
/// ([`crate::tcp_carriage`]; at most [`crate::transport::CARRIAGE_STREAMS`] at once, each read
/// by a task of its own so that the sparse stream is not read behind the bulk one) and hands
/// them to the platform like datagrams, except that a full platform queue makes a reader wait
/// (the stream's flow control then holds the connector back) instead of dropping: a segment on
/// a stream is never lost. Ends with the connection (the datagram reader aborts it, and with it
/// the stream readers).
async fn read_tcp_carriage(sh: Arc<Shared>, link: Arc<Link>, conn: quinn::Connection) {
    let mut readers = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            stream = conn.accept_uni() => match stream {
                Ok(stream) => {
                    readers.spawn(read_carriage_stream(sh.clone(), link.clone(), stream));
                }
                Err(_) => return,
            },
            Some(done) = readers.join_next(), if !readers.is_empty() => {
                if matches!(done, Ok(false)) {
                    return; // the platform side is gone
                }
            }
        }
    }
}

/// Reads one carriage stream to its end; `false` if the platform side is gone.
async fn read_carriage_stream(
    sh: Arc<Shared>,
    link: Arc<Link>,
    mut stream: quinn::RecvStream,
) -> bool {
    use crate::tcp_carriage::FrameReader;
    let mut frames = FrameReader::new();
    loop {
        let chunk = match stream.read_chunk(usize::MAX, true).await {
            Ok(Some(c)) => c,
            Ok(None) => return true,
            Err(e) => {
                tracing::debug!(connector = %link.name, error = %e, "TCP carriage stream ended");
                return true;
            }
        };
        frames.push(&chunk.bytes);
        while let Some(frame) = frames.next_packet() {
            let Ok(pkt) = frame else {
                sh.dropped_inbound.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if admit(&sh, &link, &pkt) && sh.to_platform.send(pkt).await.is_err() {
                return false;
            }
        }
    }
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

    fn link(name: &str) -> Arc<Link> {
        Arc::new(Link {
            name: name.into(),
            conn: RwLock::new(None),
            services: RwLock::default(),
            counters: LinkCounters::default(),
            tcp_flows: Mutex::new(TcpFlows::new(4, TCP_FLOW_IDLE)),
            resetting: AtomicBool::new(false),
            stalled_until_ms: AtomicU64::new(0),
            clock: Instant::now(),
            drops: Arc::default(),
            queue: Arc::new(SendQueue::new()),
            _pump: None,
        })
    }

    /// A QUIC connection over loopback whose client side has a datagram send buffer of
    /// `send_buffer` bytes: (client, server, the endpoints to keep).
    async fn quinn_pair(
        send_buffer: usize,
    ) -> (quinn::Connection, quinn::Connection, [quinn::Endpoint; 2]) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let der = cert.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
        let server_cfg = quinn::ServerConfig::with_single_cert(vec![der.clone()], key).unwrap();
        let server = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let mut client_cfg = quinn::ClientConfig::with_root_certificates(Arc::new(roots)).unwrap();
        let mut t = quinn::TransportConfig::default();
        t.datagram_send_buffer_size(send_buffer);
        client_cfg.transport_config(Arc::new(t));
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(client_cfg);
        let to = server.local_addr().unwrap();
        let (c, s) = tokio::join!(
            async { client.connect(to, "localhost").unwrap().await.unwrap() },
            async { server.accept().await.unwrap().await.unwrap() }
        );
        (c, s, [client, server])
    }

    /// A link whose inner connection (client side) has the agent's 32 KiB datagram buffer, its
    /// drop counters, both ends of the connection and their endpoints.
    async fn link_to_a_connection() -> (
        Arc<Link>,
        Arc<SendDrops>,
        quinn::Connection,
        quinn::Connection,
        [quinn::Endpoint; 2],
    ) {
        let (client, server, endpoints) = quinn_pair(32 * 1024).await;
        let drops = Arc::new(SendDrops::default());
        let link = Link::new("c1", Instant::now(), drops.clone());
        *write(&link.conn) = Some(client.clone());
        (link, drops, client, server, endpoints)
    }

    /// An IPv4 packet of protocol `proto` and `len` bytes, `ports` after the header.
    fn ip_packet(proto: u8, ports: [u8; 4], len: usize) -> Bytes {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[9] = proto;
        p[12..16].copy_from_slice(&[100, 64, 0, 2]);
        p[16..20].copy_from_slice(&[10, 100, 0, 1]);
        p[20..24].copy_from_slice(&ports);
        Bytes::from(p)
    }

    /// The attack: a local UDP flood fills the inner connection's datagram buffer, and a ping
    /// queued in the middle of it used to be the packet quinn dropped (its buffer drops the
    /// oldest, whatever the flow: 27 of 45 pings lost in the bottleneck profile). Through the
    /// link's fair queue the ping arrives, the flood loses its own oldest packets (counted), and
    /// what waits stays within the queue's bounds.
    #[tokio::test(flavor = "current_thread")]
    async fn a_ping_in_a_udp_flood_into_a_full_inner_connection_gets_through() {
        let (link, drops, client, server, _endpoints) = link_to_a_connection().await;
        let flood = || ip_packet(17, [0x13, 0x88, 0, 7], 1000);
        let ping = ip_packet(1, [8, 0, 0, 0], 84);
        // No await in between: quinn's driver can't send meanwhile, so its buffer fills.
        for _ in 0..100 {
            link.send_fair(&client, flood());
        }
        link.send_fair(&client, ping.clone());
        for _ in 0..400 {
            link.send_fair(&client, flood());
        }
        let queued = lock(&link.queue.fq).len();
        assert!(lock(&link.queue.fq).bytes() <= SEND_QUEUE_BYTES);
        // Everything that was not dropped arrives; read until the sender has been quiet a while.
        let (mut got, mut pings) = (0, 0);
        while let Ok(d) =
            tokio::time::timeout(Duration::from_millis(500), server.read_datagram()).await
        {
            got += 1;
            pings += usize::from(d.unwrap()[9] == 1);
        }
        assert_eq!(pings, 1, "the ping got through");
        let dropped = drops.queue_full.load(Ordering::Relaxed) as usize;
        assert!(dropped > 0, "the flood was over the queue's bound");
        assert_eq!(got + dropped, 501, "every packet arrived or was counted");
        assert!(queued > 0 && !link.queue.active.load(Ordering::Relaxed));
        assert_eq!(drops.tunnel_full.load(Ordering::Relaxed), 0);
    }

    /// The attack from the bench's bottleneck profile: under a local UDP flood the link's fair
    /// queue is busy, and a TCP segment (a request, a TCP ping) waited for room in quinn's
    /// buffer itself, racing the queue's pump for every slot that freed. The pump won until
    /// its queue had drained (the reader, held by the segment, read no more of the flood):
    /// 256 KiB at 50 Mbit/s, and a TCP ping under the flood took 67-79 ms where an ICMP ping
    /// took 33 (boringtun: 30). Now a TCP segment that finds the queue busy joins it as a flow
    /// of its own and goes out ahead of the flood.
    #[tokio::test(flavor = "current_thread")]
    async fn a_tcp_segment_in_a_udp_flood_goes_ahead_of_it() {
        const FLOOD: usize = 800;
        const FLOOD_LEN: usize = 500;
        let (link, drops, client, server, _endpoints) = link_to_a_connection().await;
        let flood = || ip_packet(17, [0x13, 0x88, 0, 7], FLOOD_LEN);
        // Larger than a flood packet: it never fits the room the pump leaves in quinn's buffer.
        // From a port whose flow does not share the flood's bucket (one in 256 would).
        let segment = (0x3039u16..)
            .map(|port| {
                let [a, b] = port.to_be_bytes();
                ip_packet(6, [a, b, 0, 80], 2 * FLOOD_LEN)
            })
            .find(|s| {
                let fq = lock(&link.queue.fq);
                fq.flow(s) != fq.flow(&flood())
            })
            .unwrap();
        // No await in between: quinn's driver can't send meanwhile, so its buffer fills and
        // the rest of the flood waits in the fair queue.
        for _ in 0..FLOOD {
            link.send_fair(&client, flood());
        }
        assert!(link.queue.active.load(Ordering::Relaxed));
        // The pump waits for room first, as it does under a flood that keeps its queue full.
        tokio::task::yield_now().await;
        tokio::time::timeout(SEND_WAIT / 2, link.send_wait(&client, segment))
            .await
            .expect("a sparse TCP flow does not wait for the flood");
        let (mut got, mut at) = (0, None);
        while let Ok(d) =
            tokio::time::timeout(Duration::from_millis(500), server.read_datagram()).await
        {
            if d.unwrap()[9] == 6 {
                at = Some(got);
            }
            got += 1;
        }
        let at = at.expect("the segment arrived");
        // quinn's buffer held 32 KiB of the flood before the segment could be anywhere; the
        // fair queue holds 256 KiB more.
        // (Through quinn's buffer it went out last, as packet 585 of 586.)
        let in_quinn = 32 * 1024 / FLOOD_LEN;
        assert!(
            at <= 2 * in_quinn,
            "the segment went out as packet {at} of {got}"
        );
        assert_eq!(drops.tunnel_full.load(Ordering::Relaxed), 0);
        assert!(!link.stalled());
        let dropped = drops.queue_full.load(Ordering::Relaxed) as usize;
        assert!(dropped > 0, "the flood was over the queue's bound");
        assert_eq!(
            got + dropped,
            FLOOD + 1,
            "every packet arrived or was counted"
        );
    }

    fn service6(name: &str, v4: [u8; 4], v6: &str, tcp: u16, udp: u16, icmp: bool) -> ServiceDef {
        ServiceDef {
            name: name.into(),
            address: v4.into(),
            address6: Some(v6.parse().unwrap()),
            udp: vec![ztna_proto::PortRange::single(udp)],
            tcp: vec![ztna_proto::PortRange::single(tcp)],
            icmp,
            connector: "c1".into(),
            names: None,
        }
    }

    /// A table with an IPv6 service `web` (TCP 443, UDP 53, ICMP) at fd00:9::1 on c1 and one
    /// without ICMP at fd00:9::2 on c2.
    fn table6() -> RouteTable {
        let (c1, c2) = (link("c1"), link("c2"));
        let web = service6("web", [10, 100, 0, 1], "fd00:9::1", 443, 53, true);
        let db = service6("db", [10, 100, 0, 2], "fd00:9::2", 5432, 5353, false);
        let mut t = RouteTable {
            own6: Some(crate::outbound::tests::OWN),
            ..RouteTable::default()
        };
        t.exact.insert(web.address, c1.clone());
        t.exact.insert(db.address, c2.clone());
        t.v6.push(Route6 {
            net: web.prefix6().unwrap(),
            link: c1,
            service: web,
        });
        t.v6.push(Route6 {
            net: db.prefix6().unwrap(),
            link: c2,
            service: db,
        });
        t
    }

    #[test]
    fn ipv6_packets_go_to_the_connector_of_an_allowed_service() {
        use crate::outbound::tests::{icmp6, tcp6, udp6, OWN};
        let t = table6();
        let web: Ipv6Addr = "fd00:9::1".parse().unwrap();
        let db: Ipv6Addr = "fd00:9::2".parse().unwrap();
        let name = |p: &[u8]| t.pick(p).map(|l| l.name.clone());
        assert_eq!(name(&udp6(OWN, web, 53)), Ok("c1".into()));
        assert_eq!(name(&tcp6(OWN, web, 443)), Ok("c1".into()));
        assert_eq!(name(&icmp6(OWN, web, 128)), Ok("c1".into()));
        assert_eq!(name(&tcp6(OWN, db, 5432)), Ok("c2".into()));
        // IPv4 still by destination.
        let mut v4 = vec![0u8; 20];
        v4[0] = 0x45;
        v4[16..20].copy_from_slice(&[10, 100, 0, 2]);
        assert_eq!(name(&v4), Ok("c2".into()));
    }

    #[test]
    fn ipv6_packets_outside_what_policy_gave_are_dropped_and_counted() {
        use crate::outbound::tests::{icmp6, tcp6, udp6, with_extension, OWN};
        let t = table6();
        let web: Ipv6Addr = "fd00:9::1".parse().unwrap();
        let db: Ipv6Addr = "fd00:9::2".parse().unwrap();
        let spoofed: Ipv6Addr = "fd7a:7a74:6e61:7475::6440:99".parse().unwrap();
        let not_given: Ipv6Addr = "fd00:9::3".parse().unwrap();
        let counters = OutboundCounters::default();
        let no_route = AtomicU64::new(0);
        let pick = |p: &[u8]| {
            let r = t.pick(p).map(|l| l.name.clone());
            if let Err(why) = r {
                counters.count(why, &no_route);
            }
            r
        };
        assert_eq!(pick(&udp6(spoofed, web, 53)), Err(OutboundDrop::Source));
        assert_eq!(pick(&udp6(OWN, not_given, 53)), Err(OutboundDrop::NoRoute));
        assert_eq!(pick(&tcp6(OWN, web, 22)), Err(OutboundDrop::PortOrProtocol));
        assert_eq!(pick(&udp6(OWN, db, 53)), Err(OutboundDrop::PortOrProtocol));
        assert_eq!(
            pick(&icmp6(OWN, db, 128)),
            Err(OutboundDrop::PortOrProtocol)
        );
        // Fragments: a first one on a port the service offers goes, on another port it is
        // refused; a later one goes where the service offers its protocol; one cut before its
        // ports is dropped.
        assert!(pick(&with_extension(44, OWN, web, 53)).is_ok());
        assert_eq!(
            pick(&with_extension(44, OWN, web, 54)),
            Err(OutboundDrop::PortOrProtocol)
        );
        let mut later = with_extension(44, OWN, db, 53);
        later[crate::outbound::IPV6_HEADER + 3] |= 0x08;
        assert_eq!(pick(&later), Ok("c2".into()), "db offers UDP ports");
        later[crate::outbound::IPV6_HEADER] = crate::outbound::ICMPV6;
        assert_eq!(
            pick(&later),
            Err(OutboundDrop::PortOrProtocol),
            "db does not answer ICMP"
        );
        let mut cut = with_extension(44, OWN, web, 53);
        cut.truncate(crate::outbound::IPV6_HEADER + 10);
        cut[4..6].copy_from_slice(&10u16.to_be_bytes());
        assert_eq!(pick(&cut), Err(OutboundDrop::Fragment));
        assert_eq!(
            pick(&with_extension(0, OWN, web, 53)),
            Err(OutboundDrop::ExtensionHeader)
        );
        assert_eq!(
            pick(&icmp6(OWN, "ff02::2".parse().unwrap(), 133)),
            Err(OutboundDrop::Local)
        );
        assert_eq!(
            counters.snapshot(),
            Ipv6Drops {
                local: 1,
                source: 1,
                extension_header: 1,
                fragment: 1,
                port_or_protocol: 5,
            }
        );
        assert_eq!(no_route.load(Ordering::Relaxed), 1);
        // Without a tunnel address, nothing goes.
        let t = RouteTable { own6: None, ..t };
        assert_eq!(
            t.pick(&udp6(OWN, web, 53)).map(|_| ()),
            Err(OutboundDrop::Source)
        );
    }

    #[test]
    fn only_refused_ports_are_answered() {
        use crate::outbound::tests::{tcp6, udp6, OWN};
        let t = table6();
        let web: Ipv6Addr = "fd00:9::1".parse().unwrap();
        let spoofed: Ipv6Addr = "fd7a:7a74:6e61:7475::6440:99".parse().unwrap();
        let answer = |p: &[u8]| t.pick(p).err().and_then(|w| answer_drop(w, p));
        assert!(answer(&tcp6(OWN, web, 22)).is_some());
        assert!(answer(&udp6(OWN, web, 54)).is_some());
        assert!(
            answer(&tcp6(OWN, web, 443)).is_none(),
            "routed, not dropped"
        );
        assert!(answer(&tcp6(spoofed, web, 22)).is_none());
        assert!(answer(&tcp6(OWN, "fd00:9::3".parse().unwrap(), 22)).is_none());
    }

    #[test]
    fn drops_are_counted_by_reason() {
        let c = OutboundCounters::default();
        let no_route = AtomicU64::new(0);
        for why in [
            OutboundDrop::Source,
            OutboundDrop::Source,
            OutboundDrop::Fragment,
            OutboundDrop::ExtensionHeader,
            OutboundDrop::Local,
            OutboundDrop::PortOrProtocol,
            OutboundDrop::NoRoute,
            OutboundDrop::Malformed,
        ] {
            c.count(why, &no_route);
        }
        assert_eq!(
            c.snapshot(),
            Ipv6Drops {
                local: 1,
                source: 2,
                extension_header: 1,
                fragment: 1,
                port_or_protocol: 1
            }
        );
        assert_eq!(no_route.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn status_shows_no_ipv6_tunnel_address_while_ipv6_is_off() {
        let ip = Some(Ipv4Addr::new(100, 64, 0, 2));
        assert_eq!(shown_tunnel_ipv6(ip, false), None);
        assert_eq!(
            shown_tunnel_ipv6(ip, true),
            Some("fd7a:7a74:6e61:7475::6440:2".parse().unwrap())
        );
        assert_eq!(shown_tunnel_ipv6(None, true), None);
    }

    #[test]
    fn the_protocol_is_read_per_ip_version() {
        use crate::outbound::tests::{tcp6, udp6, OWN, SVC};
        assert_eq!(ip_protocol(&tcp6(OWN, SVC, 80)), Some(TCP));
        // An IPv6 UDP packet whose source has a 6 where IPv4 keeps its protocol is not TCP.
        let mut p = udp6(OWN, SVC, 53);
        p[9] = TCP;
        assert_eq!(ip_protocol(&p), Some(17));
        assert_eq!(ip_protocol(&[0x45; 20]), Some(0x45));
        assert_eq!(ip_protocol(&[]), None);
    }

    #[test]
    fn a_wake_reconnects_only_after_the_relay_timed_the_session_out() {
        let t = Timing {
            keepalive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(20),
        };
        let s = Duration::from_secs;
        assert!(!reconnect_after_sleep(s(0), &t), "a path change alone");
        assert!(
            !reconnect_after_sleep(s(14), &t),
            "the session may still be alive"
        );
        assert!(reconnect_after_sleep(s(15), &t));
        assert!(reconnect_after_sleep(s(8 * 3600), &t), "a night");
        assert!(reconnect_after_sleep(Duration::MAX, &t), "no overflow");
    }
}
