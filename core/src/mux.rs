//! The path-multiplexing socket: one UDP socket under one quinn endpoint.
//!
//! quinn sees two kinds of peer address:
//! - real addresses (the relay), whose packets go out and come in as plain UDP;
//! - **virtual peer addresses**, one per agent–connector channel, taken from a range that is
//!   never routed (`240.0.0.0/4` on an IPv4 socket, `fd00:7a74:6e61::/48` on IPv6, in the
//!   socket's own family as quinn requires). Packets to a virtual address travel as channel data
//!   (`[0x01][channel id][packet]`, [`ztna_proto::datagram`]) in plain UDP from this socket to
//!   the relay's port, outside the outer connection; channel data that arrives from that relay
//!   address on a known channel is handed to quinn, header stripped, as if it came from the
//!   virtual address.
//!
//! The inner connection is bound to the virtual address, so the path under it can change without
//! quinn noticing and without a reconnect: a virtual address may also have a **direct route**
//! (set by [`crate::direct`] once probes confirmed a path), and then its packets go out as plain
//! UDP to the peer's real address, and packets from the peer's confirmed addresses come back to
//! quinn as if from the virtual address. Probe packets ([`ztna_proto::probe`]) are taken out of
//! the UDP stream before quinn sees them and handed to the driver registered for their tag. No
//! connection's lock is taken on the packet path: a route holds the relay's address itself.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;
use tokio::sync::mpsc;
use ztna_proto::observe::{self, Nonce};
use ztna_proto::probe::{self, Tag};
use ztna_proto::{datagram, ChannelId};

/// Packets received on relay channels that wait for quinn to read them.
const INBOUND_QUEUE: usize = 4096;
/// Socket buffer sizes asked of the kernel.
const SOCKET_BUFFER: usize = 8 << 20;
/// Probes waiting for their connection's driver.
pub const PROBE_QUEUE: usize = 256;

/// Counters of the socket, for status and metrics.
#[derive(Debug, Default)]
pub struct MuxStats {
    /// Packets sent into relay channels.
    pub relay_tx_packets: AtomicU64,
    /// Bytes sent into relay channels.
    pub relay_tx_bytes: AtomicU64,
    /// Packets received from relay channels.
    pub relay_rx_packets: AtomicU64,
    /// Bytes received from relay channels.
    pub relay_rx_bytes: AtomicU64,
    /// Packets that could not be sent into a relay channel (the socket's send buffer was full).
    pub relay_tx_dropped: AtomicU64,
    /// Packets for a virtual address with no route (its channel closed).
    pub unroutable: AtomicU64,
    /// Packets from a direct path's extra socket dropped because quinn was not reading fast
    /// enough.
    pub inbound_dropped: AtomicU64,
    /// Real UDP datagrams dropped because their source claimed a virtual peer address.
    pub spoofed_dropped: AtomicU64,
    /// Inner packets sent straight to a peer (direct path).
    pub direct_tx_packets: AtomicU64,
    /// Bytes of those.
    pub direct_tx_bytes: AtomicU64,
    /// Inner packets received straight from a peer.
    pub direct_rx_packets: AtomicU64,
    /// Bytes of those.
    pub direct_rx_bytes: AtomicU64,
    /// Probes received and handed to their connection's driver.
    pub probes_received: AtomicU64,
    /// Address answers (the relay's second observation port) dropped: malformed, or a nonce
    /// no driver waits for.
    pub observe_dropped: AtomicU64,
    /// Probes dropped: malformed, unknown tag, failed authentication, or unexpected pongs.
    pub probes_rejected: AtomicU64,
    /// Authenticated probes refused as replays (sequence number seen or too old).
    pub probes_replayed: AtomicU64,
    /// Authenticated probes refused as stale (sent too long ago).
    pub probes_stale: AtomicU64,
    /// Authenticated probes refused as reflected (this end's own direction).
    pub probes_reflected: AtomicU64,
    /// Probe targets refused: inside a refused network (service addresses, backend networks).
    pub probe_targets_refused: AtomicU64,
    /// Pongs not sent (per-source budget) and new peer-reflexive targets not taken (too fast).
    pub probes_limited: AtomicU64,
}

/// Packet counters of one virtual peer address, by path.
#[derive(Debug, Default)]
pub struct RouteCounters {
    /// Packets sent through the relay channel.
    pub relay_tx: AtomicU64,
    /// Packets received from the relay channel.
    pub relay_rx: AtomicU64,
    /// Packets sent on the direct path.
    pub direct_tx: AtomicU64,
    /// Packets received on the direct path.
    pub direct_rx: AtomicU64,
}

/// A relay channel: the relay's address, the outer connection the channel was opened on (its
/// `stable_id`), and the channel's number.
#[derive(Clone, Copy)]
struct RelayPath {
    channel: ChannelId,
    relay: SocketAddr,
    session: usize,
}

impl RelayPath {
    fn of(conn: &quinn::Connection, channel: ChannelId) -> Self {
        Self {
            channel,
            relay: conn.remote_address(),
            session: conn.stable_id(),
        }
    }
}

#[derive(Clone)]
struct Route {
    /// The relay channel, while there is one. A route without one (its relay session is gone,
    /// the next one not yet attached) keeps its direct path and counters; packets with no path
    /// at all are dropped and counted as unroutable.
    relay: Option<RelayPath>,
    /// The peer's real address while a direct path is active.
    direct: Option<SocketAddr>,
    /// The socket the direct path uses when it is not this one: the extra socket whose NAT
    /// mapping a port-prediction attempt found ([`crate::birthday`]).
    direct_sock: Option<(SocketAddr, Arc<tokio::net::UdpSocket>)>,
    counters: Arc<RouteCounters>,
    /// Path changes that strand packets: the relay channel re-pointed, a direct path given up.
    changes: crate::congestion::PathChanges,
}

#[derive(Default)]
struct Routes {
    by_addr: HashMap<SocketAddr, Route>,
    /// (relay address, channel) → virtual address.
    by_channel: HashMap<(SocketAddr, ChannelId), SocketAddr>,
    /// Confirmed direct addresses of peers → their virtual address.
    direct_in: HashMap<SocketAddr, SocketAddr>,
}

impl Routes {
    fn remove(&mut self, addr: SocketAddr) {
        if let Some(r) = self.by_addr.remove(&addr) {
            if let Some(p) = r.relay {
                self.by_channel.remove(&(p.relay, p.channel));
            }
        }
        self.direct_in.retain(|_, v| *v != addr);
    }

    /// Points `addr` at `relay` (creating the route if needed), dropping its old channel.
    fn set_relay(&mut self, addr: SocketAddr, relay: Option<RelayPath>) {
        let route = self.by_addr.entry(addr).or_insert_with(|| Route {
            relay: None,
            direct: None,
            direct_sock: None,
            counters: Arc::default(),
            changes: Default::default(),
        });
        let old = std::mem::replace(&mut route.relay, relay);
        let moved = match (old, relay) {
            (Some(o), Some(n)) => {
                (o.relay, o.channel, o.session) != (n.relay, n.channel, n.session)
            }
            (None, Some(_)) => true,
            _ => false,
        };
        // Packets sent into the old channel are lost unless a direct path carried them.
        if moved && route.direct.is_none() {
            route.changes.bump();
        }
        if let Some(p) = old {
            if self.by_channel.get(&(p.relay, p.channel)) == Some(&addr) {
                self.by_channel.remove(&(p.relay, p.channel));
            }
        }
        if let Some(p) = relay {
            let key = (p.relay, p.channel);
            if let Some(prev) = self.by_channel.insert(key, addr) {
                // The channel number was another address's: that one loses its relay path.
                if prev != addr {
                    if let Some(r) = self.by_addr.get_mut(&prev) {
                        r.relay = None;
                    }
                }
            }
        }
    }
}

/// The socket. Create with [`MuxSocket::bind`], give it to [`quinn::Endpoint::new_with_abstract_socket`].
pub struct MuxSocket {
    udp: UdpIo,
    v4: bool,
    next_virtual: AtomicU32,
    routes: RwLock<Routes>,
    probes: RwLock<HashMap<Tag, mpsc::Sender<(SocketAddr, Bytes)>>>,
    /// Drivers waiting for an address answer: nonce → (answer's source, observed address).
    observers: RwLock<HashMap<Nonce, mpsc::Sender<(SocketAddr, SocketAddr)>>>,
    inbound_tx: mpsc::Sender<(SocketAddr, Bytes)>,
    inbound_rx: Mutex<mpsc::Receiver<(SocketAddr, Bytes)>>,
    channel_first: AtomicBool,
    /// GRO batches received and not yet handed to quinn (`None` where the socket has no GRO:
    /// quinn's buffers are then received into directly).
    gro: Option<Mutex<GroRx>>,
    stats: MuxStats,
}

impl fmt::Debug for MuxSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MuxSocket")
            .field("local", &self.udp.io.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl MuxSocket {
    /// Binds the UDP socket. Must be called inside a tokio runtime.
    pub fn bind(addr: SocketAddr) -> io::Result<Arc<Self>> {
        let std_sock = crate::daemon::bind_udp(addr, SOCKET_BUFFER)?;
        let udp = UdpIo::new(std_sock)?;
        let gro = (udp.state.gro_segments() > 1).then(|| Mutex::new(GroRx::default()));
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
        Ok(Arc::new(Self {
            udp,
            v4: addr.is_ipv4(),
            next_virtual: AtomicU32::new(1),
            routes: RwLock::default(),
            probes: RwLock::default(),
            observers: RwLock::default(),
            inbound_tx,
            inbound_rx: Mutex::new(inbound_rx),
            channel_first: AtomicBool::new(false),
            gro,
            stats: MuxStats::default(),
        }))
    }

    /// Sets `SO_MARK` on the socket (needs CAP_NET_ADMIN): a policy rule can then send the
    /// outer traffic (relay and direct paths) around the tunnel's own routes, so that no
    /// catalog entry can capture it.
    #[cfg(target_os = "linux")]
    pub fn set_mark(&self, mark: u32) -> io::Result<()> {
        nix::sys::socket::setsockopt(&self.udp.io, nix::sys::socket::sockopt::Mark, &mark)
            .map_err(io::Error::from)
    }

    /// `SO_MARK` exists on Linux only.
    #[cfg(not(target_os = "linux"))]
    pub fn set_mark(&self, _mark: u32) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "SO_MARK is Linux only",
        ))
    }

    /// Binds an extra UDP socket beside this one (same address family and local address, any
    /// port, this socket's `SO_MARK`), sending with `ttl`: one of the many NAT mappings of a
    /// port-prediction attempt ([`crate::birthday`]). Must be called inside a tokio runtime.
    pub fn bind_extra(&self, ttl: u8) -> io::Result<tokio::net::UdpSocket> {
        let local = self.udp.io.local_addr()?;
        let sock = crate::daemon::bind_udp(SocketAddr::new(local.ip(), 0), 1 << 16)?;
        let s2 = socket2::SockRef::from(&sock);
        if self.v4 {
            s2.set_ttl(u32::from(ttl))?;
        } else {
            s2.set_unicast_hops_v6(u32::from(ttl))?;
        }
        #[cfg(target_os = "linux")]
        {
            use nix::sys::socket::{getsockopt, setsockopt, sockopt::Mark};
            if let Ok(mark) = getsockopt(&self.udp.io, Mark) {
                if mark != 0 {
                    setsockopt(&sock, Mark, &mark).map_err(io::Error::from)?;
                }
            }
        }
        tokio::net::UdpSocket::from_std(sock)
    }

    /// Whether the socket is IPv4 (relays and peers must be in its family).
    pub fn is_v4(&self) -> bool {
        self.v4
    }

    /// The socket's counters.
    pub fn stats(&self) -> &MuxStats {
        &self.stats
    }

    /// Whether `addr` is in the virtual peer range.
    pub fn is_virtual(addr: &SocketAddr) -> bool {
        match addr.ip() {
            IpAddr::V4(ip) => ip.octets()[0] >= 240 && ip != Ipv4Addr::BROADCAST,
            IpAddr::V6(ip) => ip.segments()[..3] == ztna_proto::service::MUX_VIRTUAL_V6,
        }
    }

    fn allocate_virtual(&self) -> SocketAddr {
        let n = self.next_virtual.fetch_add(1, Ordering::Relaxed);
        // 2^28 addresses times 16 ports before a value repeats; a process never gets near that.
        let port = 1 + (n >> 28) as u16;
        if self.v4 {
            SocketAddr::new(Ipv4Addr::from(0xF000_0000 | (n & 0x0FFF_FFFF)).into(), port)
        } else {
            let [p0, p1, p2] = ztna_proto::service::MUX_VIRTUAL_V6;
            let [a, b] = [(n >> 16) as u16, n as u16];
            SocketAddr::new(Ipv6Addr::new(p0, p1, p2, 0, 0, 0, a, b).into(), port)
        }
    }

    /// Routes a new virtual peer address through `channel` on the outer connection `conn`.
    pub fn add_relay_route(&self, conn: &quinn::Connection, channel: ChannelId) -> SocketAddr {
        let addr = self.allocate_virtual();
        self.set_relay_route(addr, conn, channel);
        addr
    }

    /// Re-points virtual address `addr` (new or existing) at `channel` on the outer connection
    /// `conn`. An inner connection bound to `addr` continues over the new channel without
    /// noticing: this is how it outlives a relay session.
    pub fn set_relay_route(&self, addr: SocketAddr, conn: &quinn::Connection, channel: ChannelId) {
        self.routes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .set_relay(addr, Some(RelayPath::of(conn, channel)));
    }

    /// Takes the relay channel away from `addr` but keeps its route (direct path, counters):
    /// packets that would go through the relay are dropped until a new channel is attached.
    pub fn clear_relay_route(&self, addr: SocketAddr) {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        if routes.by_addr.contains_key(&addr) {
            routes.set_relay(addr, None);
        }
    }

    /// Removes a virtual address's route; later packets to it are dropped and counted.
    pub fn remove_route(&self, addr: SocketAddr) {
        self.routes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(addr);
    }

    /// Takes every relay channel over the outer connection with `stable_id` away from its
    /// virtual address (the session is gone); the addresses and their direct paths stay, so
    /// the inner connections on them can continue over a later session's channels.
    pub fn clear_relay_routes_of(&self, stable_id: usize) {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let gone: Vec<SocketAddr> = routes
            .by_addr
            .iter()
            .filter(|(_, r)| r.relay.is_some_and(|p| p.session == stable_id))
            .map(|(a, _)| *a)
            .collect();
        for a in gone {
            routes.set_relay(a, None);
        }
    }

    /// Whether virtual address `addr` has a route.
    pub fn has_route(&self, addr: SocketAddr) -> bool {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_addr
            .contains_key(&addr)
    }

    /// Sets the direct path of virtual address `vaddr`: packets to it go to `send_to` (or the
    /// relay channel if None), and packets from any address in `accept_from` are taken as the
    /// peer's. Returns false if `vaddr` has no route.
    pub fn set_direct(
        &self,
        vaddr: SocketAddr,
        send_to: Option<SocketAddr>,
        accept_from: &[SocketAddr],
    ) -> bool {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let Some(r) = routes.by_addr.get_mut(&vaddr) else {
            return false;
        };
        if r.direct.is_some() && send_to.is_none() {
            // The direct path failed: what was in flight on it is gone.
            r.changes.bump();
        }
        r.direct = send_to;
        routes.direct_in.retain(|_, v| *v != vaddr);
        for a in accept_from {
            if !Self::is_virtual(a) {
                routes.direct_in.insert(*a, vaddr);
            }
        }
        true
    }

    /// The path-change count of virtual address `vaddr`, for the congestion controller of the
    /// inner connection bound to it ([`crate::congestion::Carriage`]).
    pub fn path_changes(&self, vaddr: SocketAddr) -> Option<crate::congestion::PathChanges> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        routes.by_addr.get(&vaddr).map(|r| r.changes.clone())
    }

    /// The packet counters of virtual address `vaddr`.
    pub fn route_counters(&self, vaddr: SocketAddr) -> Option<Arc<RouteCounters>> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        routes.by_addr.get(&vaddr).map(|r| r.counters.clone())
    }

    /// The relay's address under virtual address `vaddr` (the remote of its outer connection);
    /// `None` while the route has no relay channel.
    pub fn relay_of(&self, vaddr: SocketAddr) -> Option<SocketAddr> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        routes
            .by_addr
            .get(&vaddr)
            .and_then(|r| r.relay.as_ref())
            .map(|p| p.relay)
    }

    /// Delivers probes carrying `tag` to `tx` from now on (replacing an earlier registration).
    pub fn register_probes(&self, tag: Tag, tx: mpsc::Sender<(SocketAddr, Bytes)>) {
        self.probes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tag, tx);
    }

    /// Stops delivering probes carrying `tag`.
    pub fn unregister_probes(&self, tag: &Tag) {
        self.probes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tag);
    }

    /// Sets the socket the direct path of `vaddr` sends on when it goes to the peer address
    /// given with it (None: this one). Returns false if `vaddr` has no route.
    pub fn set_direct_socket(
        &self,
        vaddr: SocketAddr,
        sock: Option<(SocketAddr, Arc<tokio::net::UdpSocket>)>,
    ) -> bool {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let Some(r) = routes.by_addr.get_mut(&vaddr) else {
            return false;
        };
        r.direct_sock = sock;
        true
    }

    /// Hands quinn a packet that the direct path of `vaddr` received on its own socket (see
    /// [`MuxSocket::set_direct_socket`]). Returns false if it was dropped.
    pub fn deliver_direct(&self, vaddr: SocketAddr, pkt: Bytes) -> bool {
        let counters = {
            let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
            routes.by_addr.get(&vaddr).map(|r| r.counters.clone())
        };
        let Some(counters) = counters else {
            self.stats.unroutable.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        let len = pkt.len() as u64;
        if self.inbound_tx.try_send((vaddr, pkt)).is_err() {
            self.stats.inbound_dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        counters.direct_rx.fetch_add(1, Ordering::Relaxed);
        self.stats.direct_rx_packets.fetch_add(1, Ordering::Relaxed);
        self.stats.direct_rx_bytes.fetch_add(len, Ordering::Relaxed);
        true
    }

    /// Delivers the address answer carrying `nonce` to `tx` (until [`MuxSocket::unwatch_observed`]).
    pub fn watch_observed(&self, nonce: Nonce, tx: mpsc::Sender<(SocketAddr, SocketAddr)>) {
        self.observers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(nonce, tx);
    }

    /// Stops waiting for the answer carrying `nonce`.
    pub fn unwatch_observed(&self, nonce: &Nonce) {
        self.observers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(nonce);
    }

    fn dispatch_observed(&self, from: SocketAddr, pkt: &[u8]) {
        let delivered = observe::decode_answer(pkt)
            .ok()
            .is_some_and(|(nonce, seen)| {
                let tx = self
                    .observers
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&nonce)
                    .cloned();
                tx.is_some_and(|tx| tx.try_send((from, seen)).is_ok())
            });
        if !delivered {
            self.stats.observe_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends a probe as plain UDP. A full socket buffer drops it (probes are retried).
    pub fn send_probe(&self, to: SocketAddr, pkt: &[u8]) -> io::Result<()> {
        self.udp.io.try_send_to(pkt, to).map(|_| ())
    }

    /// Sends a probe as plain UDP, with `ttl` (the IPv6 hop limit on an IPv6 socket) instead of
    /// the socket's default when given: an opening probe that must leave this end's NAT but
    /// not reach the peer's router. The TTL rides on this one datagram (a control message), so
    /// packets that quinn sends at the same time keep the default.
    pub fn send_probe_with_ttl(
        &self,
        to: SocketAddr,
        pkt: &[u8],
        ttl: Option<u8>,
    ) -> io::Result<()> {
        let Some(ttl) = ttl else {
            return self.send_probe(to, pkt);
        };
        self.udp.io.try_io(Interest::WRITABLE, || {
            send_with_ttl(&self.udp.io, self.v4, to, pkt, ttl)
        })
    }

    /// Hands one received probe to its driver, or counts it as rejected.
    fn dispatch_probe(&self, from: SocketAddr, pkt: &[u8]) {
        let tx = probe::peek_tag(pkt).ok().and_then(|tag| {
            self.probes
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&tag)
                .cloned()
        });
        match tx.map(|tx| tx.try_send((from, Bytes::copy_from_slice(pkt)))) {
            Some(Ok(())) => {
                self.stats.probes_received.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                self.stats.probes_rejected.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(%from, len = pkt.len(), "probe dropped: malformed, unknown connection or queue full");
            }
        }
    }

    /// Sends a transmit into a relay channel: each segment behind the channel-data header, all
    /// in one send (GSO) to the relay. A full socket buffer loses them, counted, as on a wire.
    fn send_relay(&self, route: &Route, relay: RelayPath, transmit: &Transmit<'_>) {
        let seg = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        let segments = transmit.contents.len().div_ceil(seg);
        let header = datagram::header(relay.channel);
        RELAY_SCRATCH.with_borrow_mut(|buf| {
            buf.clear();
            for chunk in transmit.contents.chunks(seg) {
                buf.extend_from_slice(&header);
                buf.extend_from_slice(chunk);
            }
            let out = Transmit {
                destination: relay.relay,
                ecn: None,
                contents: buf,
                segment_size: (segments > 1).then_some(seg + datagram::HEADER_LEN),
                src_ip: None,
            };
            // Straight to the kernel (see `send_now`): a relay channel never waits.
            match self.udp.send_now(&out) {
                Ok(()) => {
                    let n = segments as u64;
                    route.counters.relay_tx.fetch_add(n, Ordering::Relaxed);
                    self.stats.relay_tx_packets.fetch_add(n, Ordering::Relaxed);
                    self.stats
                        .relay_tx_bytes
                        .fetch_add(transmit.contents.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    self.stats
                        .relay_tx_dropped
                        .fetch_add(segments as u64, Ordering::Relaxed);
                    tracing::trace!(error = %e, "relay channel send failed");
                }
            }
        });
    }

    fn poll_channel(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<usize> {
        let mut rx = self.inbound_rx.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let item = if n == 0 {
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(item)) => item,
                    _ => return Poll::Pending,
                }
            } else {
                match rx.try_recv() {
                    Ok(item) => item,
                    Err(_) => break,
                }
            };
            let (addr, pkt) = item;
            if pkt.len() > bufs[n].len() {
                self.stats.inbound_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            bufs[n][..pkt.len()].copy_from_slice(&pkt);
            meta[n] = RecvMeta {
                addr,
                len: pkt.len(),
                stride: pkt.len(),
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        if n == 0 {
            Poll::Pending
        } else {
            Poll::Ready(n)
        }
    }

    fn poll_udp(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let n = match &self.gro {
            None => ready!(self.udp.poll_recv(cx, bufs, meta))?,
            Some(_) if bufs.is_empty() || meta.is_empty() => 0,
            Some(gro) => {
                let mut rx = gro.lock().unwrap_or_else(|p| p.into_inner());
                // Ends: each turn hands over a datagram, uses up a batch or runs out of budget.
                loop {
                    if rx.is_empty() {
                        ready!(rx.receive(cx, &self.udp))?;
                    }
                    let n = rx.split_into(bufs, meta, || take_budget_unit(cx));
                    if n > 0 {
                        break n;
                    }
                    if !rx.is_empty() {
                        return Poll::Pending; // out of budget
                    }
                }
            }
        };
        self.classify_udp(&mut bufs[..n], &mut meta[..n]);
        Poll::Ready(Ok(n))
    }
}

/// Takes a unit of the reading task's cooperative budget, or says it is used up (the task is
/// then woken once it has yielded); see [`GroRx::split_into`].
fn take_budget_unit(cx: &mut Context<'_>) -> bool {
    match tokio::task::coop::poll_proceed(cx) {
        Poll::Ready(unit) => {
            unit.made_progress();
            true
        }
        Poll::Pending => false,
    }
}

/// Batches received at once on the socket with GRO: the kernel hands over up to this many
/// coalesced batches per `recvmmsg`.
const GRO_BATCHES: usize = 16;
/// Room for one coalesced batch (GRO coalesces at most 64 KiB of UDP payload).
const GRO_BATCH_BYTES: usize = 64 * 1024;

/// The socket's GRO batches, split into single datagrams before quinn sees them.
///
/// With GRO the kernel passes a batch of segments from one sender (up to 64 KiB, sent with GSO)
/// through the stack as one buffer and hands it over in one message: on a veth or loopback
/// path, the segments are never split into packets of their own on the way in, nor received
/// one by one. quinn copies each received buffer into one allocation, which every packet
/// decrypted from it keeps alive while it waits in quinn's queues (which have no bound): a UDP
/// flood through a direct path took the connector's RSS to 125-160 MiB when quinn saw the
/// batches (2026-11). So the batches land here, in buffers of a fixed size, and quinn is given
/// one datagram per buffer, as without GRO (one copy per datagram; quinn's own copy is then the
/// datagram's size).
#[derive(Default)]
struct GroRx {
    /// `GRO_BATCHES` buffers of `GRO_BATCH_BYTES`, allocated at the first receive.
    buf: Vec<u8>,
    meta: [RecvMeta; GRO_BATCHES],
    /// Batches in `buf` from the last receive.
    filled: usize,
    /// The batch being split, and the offset of its next segment.
    next: usize,
    offset: usize,
}

impl GroRx {
    fn is_empty(&self) -> bool {
        self.next >= self.filled
    }

    /// Receives the next batches (call when empty).
    fn receive(&mut self, cx: &mut Context<'_>, udp: &UdpIo) -> Poll<io::Result<()>> {
        if self.buf.is_empty() {
            self.buf = vec![0; GRO_BATCHES * GRO_BATCH_BYTES];
        }
        let mut iovs: [IoSliceMut<'_>; GRO_BATCHES] = {
            let mut chunks = self.buf.chunks_mut(GRO_BATCH_BYTES).map(IoSliceMut::new);
            std::array::from_fn(|_| chunks.next().expect("GRO_BATCHES chunks"))
        };
        let n = ready!(udp.poll_recv(cx, &mut iovs, &mut self.meta))?;
        self.filled = n;
        self.next = 0;
        self.offset = 0;
        Poll::Ready(Ok(()))
    }

    /// Copies the next segments into `bufs`, one each, and returns how many. A segment larger
    /// than its buffer (impossible with quinn's buffers of 64 KiB) is skipped.
    ///
    /// Each datagram takes a unit of the task's cooperative budget (`proceed` says whether one
    /// is left; tokio gives a task 128 per turn): quinn's endpoint driver hands each datagram
    /// to its connection's driver through a queue without a bound, and that driver takes at
    /// most 128 from it per turn. Without the budget, reading a batch of 64 small datagrams
    /// costs the endpoint one unit, so under a flood it outran the connection and the queue
    /// grew (the agent's peak RSS reached 61 MiB under a flood of 64-byte datagrams, against
    /// 19 without GRO).
    fn split_into(
        &mut self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
        mut proceed: impl FnMut() -> bool,
    ) -> usize {
        let mut n = 0;
        while n < bufs.len().min(meta.len()) && !self.is_empty() && proceed() {
            let m = self.meta[self.next];
            let len = m.len.min(GRO_BATCH_BYTES);
            let stride = if m.stride == 0 { len } else { m.stride };
            let start = self.next * GRO_BATCH_BYTES + self.offset;
            let seg = stride.min(len - self.offset);
            self.offset += seg;
            if self.offset >= len {
                self.next += 1;
                self.offset = 0;
            }
            if seg == 0 || seg > bufs[n].len() {
                continue;
            }
            bufs[n][..seg].copy_from_slice(&self.buf[start..start + seg]);
            meta[n] = RecvMeta {
                len: seg,
                stride: seg,
                ..m
            };
            n += 1;
        }
        n
    }
}

impl MuxSocket {
    /// Sorts received UDP datagrams before quinn sees them (quinn skips zero-length ones):
    /// probes go to their drivers; packets from a peer's confirmed direct address are relabelled
    /// with its virtual address; a datagram claiming a virtual source address is spoofed
    /// (those are reachable only through relay channels). One datagram per buffer: quinn-udp
    /// receives one per buffer without GRO, and [`GroRx`] splits the batches with it.
    fn classify_udp(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        for (buf, m) in bufs.iter_mut().zip(meta.iter_mut()) {
            let len = m.len.min(buf.len());
            if datagram::is_channel_data(&buf[..len]) {
                let vaddr = datagram::decode(&buf[..len])
                    .ok()
                    .and_then(|(ch, _)| routes.by_channel.get(&(m.addr, ch)))
                    .and_then(|v| routes.by_addr.get(v).map(|r| (*v, r)));
                match vaddr {
                    Some((vaddr, route)) => {
                        buf.copy_within(datagram::HEADER_LEN..len, 0);
                        m.len = len - datagram::HEADER_LEN;
                        m.stride = m.len;
                        m.addr = vaddr;
                        route.counters.relay_rx.fetch_add(1, Ordering::Relaxed);
                        self.stats.relay_rx_packets.fetch_add(1, Ordering::Relaxed);
                        self.stats
                            .relay_rx_bytes
                            .fetch_add(m.len as u64, Ordering::Relaxed);
                    }
                    None => {
                        // Not from a relay we hold this channel with: unroutable.
                        m.len = 0;
                        self.stats.unroutable.fetch_add(1, Ordering::Relaxed);
                    }
                }
                continue;
            }
            let data = &buf[..len];
            if probe::is_probe(data) {
                self.dispatch_probe(m.addr, data);
                m.len = 0;
            } else if observe::is_observe(data) {
                self.dispatch_observed(m.addr, data);
                m.len = 0;
            } else if let Some(vaddr) = routes.direct_in.get(&m.addr) {
                self.stats.direct_rx_packets.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .direct_rx_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                if let Some(r) = routes.by_addr.get(vaddr) {
                    r.counters.direct_rx.fetch_add(1, Ordering::Relaxed);
                }
                m.addr = *vaddr;
            } else if Self::is_virtual(&m.addr) {
                m.len = 0;
                self.stats.spoofed_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Sends on a direct path's own socket, segment by segment (that socket has no GSO); a
    /// segment that does not go out is lost, as on the wire.
    fn send_direct_via(
        &self,
        route: &Route,
        sock: &tokio::net::UdpSocket,
        to: SocketAddr,
        transmit: &Transmit<'_>,
    ) {
        let seg = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        for chunk in transmit.contents.chunks(seg) {
            if send_now(sock, chunk, to).is_ok() {
                route.counters.direct_tx.fetch_add(1, Ordering::Relaxed);
                self.stats.direct_tx_packets.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .direct_tx_bytes
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }
    }

    fn send_direct(
        &self,
        route: &Route,
        to: SocketAddr,
        transmit: &Transmit<'_>,
    ) -> io::Result<()> {
        let direct = Transmit {
            destination: to,
            ecn: transmit.ecn,
            contents: transmit.contents,
            segment_size: transmit.segment_size,
            src_ip: None,
        };
        let res = self.udp.io.try_io(Interest::WRITABLE, || {
            self.udp.state.send((&self.udp.io).into(), &direct)
        });
        if res.is_ok() {
            let seg = transmit
                .segment_size
                .unwrap_or(transmit.contents.len())
                .max(1);
            let n = transmit.contents.len().div_ceil(seg) as u64;
            route.counters.direct_tx.fetch_add(n, Ordering::Relaxed);
            self.stats.direct_tx_packets.fetch_add(n, Ordering::Relaxed);
            self.stats
                .direct_tx_bytes
                .fetch_add(transmit.contents.len() as u64, Ordering::Relaxed);
        }
        res
    }
}

thread_local! {
    /// Where [`MuxSocket::send_relay`] puts headers and segments together (no allocation per
    /// packet once it has grown to a batch's size).
    static RELAY_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Sends one datagram on a non-blocking socket straight away, without waiting for tokio to
/// have seen the socket writable (a fresh socket is not, until the reactor polled it; a UDP
/// send practically never blocks, and one that would is dropped like a lost packet).
pub fn send_now(sock: &tokio::net::UdpSocket, pkt: &[u8], to: SocketAddr) -> io::Result<usize> {
    socket2::SockRef::from(sock).send_to(pkt, &to.into())
}

/// One datagram to `to` with its own TTL / hop limit (IP_TTL or IPV6_HOPLIMIT in a control
/// message of `sendmsg`).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_with_ttl(
    sock: &tokio::net::UdpSocket,
    v4: bool,
    to: SocketAddr,
    pkt: &[u8],
    ttl: u8,
) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let hops = libc::c_int::from(ttl);
    let cmsg = if v4 {
        ControlMessage::Ipv4Ttl(&hops)
    } else {
        ControlMessage::Ipv6HopLimit(&hops)
    };
    let dest = SockaddrStorage::from(to);
    sendmsg(
        sock.as_raw_fd(),
        &[io::IoSlice::new(pkt)],
        &[cmsg],
        MsgFlags::MSG_DONTWAIT,
        Some(&dest),
    )
    .map(|_| ())
    .map_err(io::Error::from)
}

/// Elsewhere, a per-packet TTL is not offered: the probe goes out with the default TTL.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn send_with_ttl(
    sock: &tokio::net::UdpSocket,
    _v4: bool,
    to: SocketAddr,
    pkt: &[u8],
    _ttl: u8,
) -> io::Result<()> {
    sock.try_send_to(pkt, to).map(|_| ())
}

impl AsyncUdpSocket for MuxSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller::new(self))
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        if Self::is_virtual(&transmit.destination) {
            let route = {
                let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
                routes.by_addr.get(&transmit.destination).cloned()
            };
            match route {
                Some(route) => match (route.direct, &route.relay) {
                    // A direct send error (e.g. a full buffer) is quinn's to see, as on any socket.
                    (Some(to), _) => match &route.direct_sock {
                        Some((peer, sock)) if *peer == to => {
                            self.send_direct_via(&route, sock, to, transmit);
                            return Ok(());
                        }
                        _ => return self.send_direct(&route, to, transmit),
                    },
                    (None, Some(relay)) => self.send_relay(&route, *relay, transmit),
                    (None, None) => {
                        self.stats.unroutable.fetch_add(1, Ordering::Relaxed);
                    }
                },
                None => {
                    self.stats.unroutable.fetch_add(1, Ordering::Relaxed);
                }
            }
            // Like a UDP socket whose packet was lost on the way: the sender's loss recovery copes.
            return Ok(());
        }
        self.udp.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        // Alternate which source goes first so neither can starve the other.
        let channel_first = !self.channel_first.fetch_xor(true, Ordering::Relaxed);
        if channel_first {
            if let Poll::Ready(n) = self.poll_channel(cx, bufs, meta) {
                return Poll::Ready(Ok(n));
            }
            self.poll_udp(cx, bufs, meta)
        } else {
            if let Poll::Ready(r) = self.poll_udp(cx, bufs, meta) {
                return Poll::Ready(r);
            }
            self.poll_channel(cx, bufs, meta).map(Ok)
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.io.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.udp.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        // quinn gets one datagram per buffer (see `GroRx`).
        1
    }

    fn may_fragment(&self) -> bool {
        self.udp.state.may_fragment()
    }
}

type WritableFut = Pin<Box<dyn std::future::Future<Output = io::Result<()>> + Send + Sync>>;

/// A socket that quinn waits on to become writable (the [`UdpPoller`] of an [`AsyncUdpSocket`]
/// built on a tokio UDP socket).
pub trait WritableSocket: Send + Sync + 'static {
    /// The tokio socket underneath.
    fn udp(&self) -> &tokio::net::UdpSocket;
}

impl WritableSocket for MuxSocket {
    fn udp(&self) -> &tokio::net::UdpSocket {
        &self.udp.io
    }
}

/// A tokio UDP socket with quinn-udp's state: the plumbing that ztna's [`AsyncUdpSocket`]s
/// ([`MuxSocket`], and the [`FilteredSocket`]s of the relay and of [`crate::tap`]) share.
#[derive(Debug)]
pub struct UdpIo {
    /// The socket.
    pub io: tokio::net::UdpSocket,
    /// quinn-udp's per-socket state (GSO, GRO, ECN, control messages).
    pub state: UdpSocketState,
}

impl UdpIo {
    /// Wraps a bound socket (made non-blocking). Must be called inside a tokio runtime.
    pub fn new(sock: std::net::UdpSocket) -> io::Result<Self> {
        let state = UdpSocketState::new((&sock).into())?;
        sock.set_nonblocking(true)?;
        Ok(Self {
            io: tokio::net::UdpSocket::from_std(sock)?,
            state,
        })
    }

    /// quinn's send: through tokio's readiness, so that quinn waits when the socket is full.
    pub fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        self.io.try_io(Interest::WRITABLE, || {
            self.state.send((&self.io).into(), transmit)
        })
    }

    /// A send straight to the kernel, not through tokio's readiness flag (see [`send_now`]):
    /// one that would block is an error, which callers count as a drop.
    pub fn send_now(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        self.state.send((&self.io).into(), transmit)
    }

    /// Receives a batch (recvmmsg, GRO where on).
    pub fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.io.poll_recv_ready(cx))?;
            // An error other than "would block" (an ICMP error reported on the socket, say)
            // is not the endpoint's end: read on.
            if let Ok(n) = self.io.try_io(Interest::READABLE, || {
                self.state.recv((&self.io).into(), bufs, meta)
            }) {
                return Poll::Ready(Ok(n));
            }
        }
    }
}

/// The [`UdpPoller`] of a [`WritableSocket`].
pub struct Poller<S> {
    sock: Arc<S>,
    fut: Option<WritableFut>,
}

impl<S: WritableSocket> Poller<S> {
    /// A poller of `sock`.
    pub fn new(sock: Arc<S>) -> Self {
        Self { sock, fut: None }
    }
}

impl<S> fmt::Debug for Poller<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Poller").finish_non_exhaustive()
    }
}

impl<S: WritableSocket> UdpPoller for Poller<S> {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let fut = this.fut.get_or_insert_with(|| {
            let sock = this.sock.clone();
            Box::pin(async move { sock.udp().writable().await })
        });
        let res = fut.as_mut().poll(cx);
        if res.is_ready() {
            this.fut = None;
        }
        res
    }
}

/// What a [`FilteredSocket`] does with each received batch before quinn sees it.
pub trait RecvFilter: fmt::Debug + Send + Sync + 'static {
    /// Takes what is not quinn's out of a received batch (sets its length to 0, which quinn
    /// skips); `udp` is the socket, for sending on.
    fn filter(&self, udp: &UdpIo, bufs: &[IoSliceMut<'_>], meta: &mut [RecvMeta]);
}

/// An [`AsyncUdpSocket`] on a [`UdpIo`] whose received batches pass a [`RecvFilter`] first
/// (GRO on, quinn's defaults otherwise). Dereferences to the filter.
#[derive(Debug)]
pub struct FilteredSocket<F> {
    udp: UdpIo,
    filter: F,
}

impl<F: RecvFilter> FilteredSocket<F> {
    /// A socket on `udp` whose batches pass `filter`.
    pub fn new(udp: UdpIo, filter: F) -> Arc<Self> {
        Arc::new(Self { udp, filter })
    }

    /// The socket underneath.
    pub fn udp_io(&self) -> &UdpIo {
        &self.udp
    }
}

impl<F> std::ops::Deref for FilteredSocket<F> {
    type Target = F;

    fn deref(&self) -> &F {
        &self.filter
    }
}

impl<F: RecvFilter> WritableSocket for FilteredSocket<F> {
    fn udp(&self) -> &tokio::net::UdpSocket {
        &self.udp.io
    }
}

impl<F: RecvFilter> AsyncUdpSocket for FilteredSocket<F> {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller::new(self))
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        self.udp.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(self.udp.poll_recv(cx, bufs, meta))?;
        self.filter.filter(&self.udp, &bufs[..n], &mut meta[..n]);
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.io.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.udp.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.udp.state.gro_segments()
    }

    fn may_fragment(&self) -> bool {
        self.udp.state.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_ranges() {
        assert!(MuxSocket::is_virtual(&"240.0.0.1:1".parse().unwrap()));
        assert!(MuxSocket::is_virtual(&"255.0.0.1:1".parse().unwrap()));
        assert!(!MuxSocket::is_virtual(
            &"255.255.255.255:1".parse().unwrap()
        ));
        assert!(!MuxSocket::is_virtual(&"10.0.0.1:1".parse().unwrap()));
        assert!(MuxSocket::is_virtual(
            &"[fd00:7a74:6e61::5]:1".parse().unwrap()
        ));
        assert!(!MuxSocket::is_virtual(&"[fd00::5]:1".parse().unwrap()));
    }

    /// An opening probe leaves with its own TTL; the next datagram, like quinn's packets, with
    /// the socket's default.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_probe_carries_its_own_ttl_and_the_socket_keeps_the_default() {
        use nix::sys::socket::{
            recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrStorage,
        };
        use std::os::fd::AsRawFd;
        let s = MuxSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        setsockopt(&rx, sockopt::Ipv4RecvTtl, &true).unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let to = rx.local_addr().unwrap();
        // A fresh socket is not known to be writable until the reactor has seen it.
        s.udp.io.writable().await.unwrap();
        s.send_probe_with_ttl(to, b"opening", Some(3)).unwrap();
        s.send_probe_with_ttl(to, b"default", None).unwrap();
        s.send_probe_with_ttl(to, b"opening", Some(2)).unwrap();
        let mut ttls = Vec::new();
        for _ in 0..3 {
            let mut buf = [0u8; 16];
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut cmsg = nix::cmsg_space!(libc::c_int);
            let msg = recvmsg::<SockaddrStorage>(
                rx.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::empty(),
            )
            .unwrap();
            ttls.push(msg.cmsgs().unwrap().find_map(|c| match c {
                ControlMessageOwned::Ipv4Ttl(t) => Some(t),
                _ => None,
            }));
        }
        let default: i32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_default_ttl")
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(64);
        assert_eq!(ttls, vec![Some(3), Some(default), Some(2)]);
    }

    /// Port prediction's plumbing: an extra socket sends with its own TTL and, once it carries
    /// a direct path, the path's packets leave from it (only toward its peer); packets it
    /// receives reach quinn as the virtual address's; an address answer reaches only the
    /// driver that waits for its nonce (a forged one with another nonce is dropped, counted).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_direct_path_on_an_extra_socket_and_address_answers() {
        let s = MuxSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let extra = Arc::new(s.bind_extra(2).unwrap());
        assert_eq!(socket2::SockRef::from(&*extra).ttl().unwrap(), 2);
        let peer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let other = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let vaddr = s.allocate_virtual();
        s.routes.write().unwrap().set_relay(vaddr, None);
        let to = peer.local_addr().unwrap();
        assert!(s.set_direct(vaddr, Some(to), &[to]));
        assert!(s.set_direct_socket(vaddr, Some((to, extra.clone()))));
        let send = |dest: SocketAddr| {
            s.try_send(&Transmit {
                destination: dest,
                ecn: None,
                contents: b"inner",
                segment_size: None,
                src_ip: None,
            })
        };
        send(vaddr).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) =
            tokio::time::timeout(std::time::Duration::from_secs(2), peer.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(
            (&buf[..n], from),
            (&b"inner"[..], extra.local_addr().unwrap())
        );
        // Another active address goes out of the main socket, as before.
        let elsewhere = other.local_addr().unwrap();
        assert!(s.set_direct(vaddr, Some(elsewhere), &[elsewhere]));
        send(vaddr).unwrap();
        let (_, from) =
            tokio::time::timeout(std::time::Duration::from_secs(2), other.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(from, s.udp.io.local_addr().unwrap());
        // Received on the extra socket, handed to quinn as the virtual address's.
        assert!(s.deliver_direct(vaddr, Bytes::from_static(b"back")));
        let got = s.inbound_rx.lock().unwrap().try_recv().unwrap();
        assert_eq!(got, (vaddr, Bytes::from_static(b"back")));
        assert!(!s.deliver_direct(s.allocate_virtual(), Bytes::from_static(b"x")));
        // Address answers.
        let (tx, mut rx) = mpsc::channel(4);
        s.watch_observed([3; 16], tx);
        let relay: SocketAddr = "127.0.0.9:4434".parse().unwrap();
        let seen: SocketAddr = "198.51.100.1:5000".parse().unwrap();
        for nonce in [[4u8; 16], [3; 16]] {
            let mut pkt = observe::encode_answer(&nonce, seen).to_vec();
            let mut bufs = [IoSliceMut::new(&mut pkt)];
            let mut meta = [RecvMeta {
                addr: relay,
                len: observe::RESPONSE_LEN,
                stride: observe::RESPONSE_LEN,
                ..RecvMeta::default()
            }];
            s.classify_udp(&mut bufs, &mut meta);
            assert_eq!(meta[0].len, 0, "never handed to quinn");
        }
        assert_eq!(rx.try_recv().unwrap(), (relay, seen));
        assert!(rx.try_recv().is_err());
        assert_eq!(s.stats().observe_dropped.load(Ordering::Relaxed), 1);
    }

    /// A route counts the path changes that strand packets: a relay channel re-pointed (not
    /// while a direct path carries the traffic) and a direct path given up; a direct path
    /// found, or the same channel set again, is not one.
    #[tokio::test]
    async fn path_changes_count_what_strands_packets() {
        let s = MuxSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let path = |channel: u32, session| {
            Some(RelayPath {
                channel: ChannelId::new(channel).unwrap(),
                relay: "192.0.2.1:4433".parse().unwrap(),
                session,
            })
        };
        let v = s.allocate_virtual();
        let set = |p| s.routes.write().unwrap().set_relay(v, p);
        set(path(1, 1));
        let changes = s.path_changes(v).expect("a route");
        let n0 = changes.get();
        set(path(1, 1));
        assert_eq!(changes.get(), n0, "the same channel again");
        set(None);
        assert_eq!(changes.get(), n0, "a detach alone");
        set(path(2, 2));
        assert_eq!(changes.get(), n0 + 1, "a failover's new channel");
        let peer: SocketAddr = "192.0.2.9:4434".parse().unwrap();
        assert!(s.set_direct(v, Some(peer), &[peer]));
        assert_eq!(changes.get(), n0 + 1, "a direct path found");
        set(path(3, 3));
        assert_eq!(changes.get(), n0 + 1, "traffic was on the direct path");
        assert!(s.set_direct(v, None, &[]));
        assert_eq!(changes.get(), n0 + 2, "the direct path lost");
        assert!(s.path_changes(s.allocate_virtual()).is_none());
    }

    /// Channel data reaches quinn, header stripped and as from the channel's virtual address,
    /// only from the relay the channel was opened with and only on that channel; anything else
    /// that looks like channel data is dropped and counted.
    #[tokio::test]
    async fn channel_data_only_from_its_relay_on_its_channel() {
        let s = MuxSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let relay: SocketAddr = "192.0.2.1:4433".parse().unwrap();
        let ch = ChannelId::new(7).unwrap();
        let vaddr = s.allocate_virtual();
        s.routes.write().unwrap().set_relay(
            vaddr,
            Some(RelayPath {
                channel: ch,
                relay,
                session: 1,
            }),
        );
        let classify = |from: SocketAddr, pkt: Vec<u8>| {
            let mut pkt = pkt;
            let len = pkt.len();
            let mut bufs = [IoSliceMut::new(&mut pkt)];
            let mut meta = [RecvMeta {
                addr: from,
                len,
                stride: len,
                ..RecvMeta::default()
            }];
            s.classify_udp(&mut bufs, &mut meta);
            let m = meta[0];
            (m.addr, bufs[0][..m.len].to_vec())
        };
        assert_eq!(
            classify(relay, datagram::encode(ch, b"inner packet")),
            (vaddr, b"inner packet".to_vec())
        );
        let other = ChannelId::new(8).unwrap();
        let stranger: SocketAddr = "192.0.2.9:4433".parse().unwrap();
        assert_eq!(classify(relay, datagram::encode(other, b"x")).1, b"");
        assert_eq!(classify(stranger, datagram::encode(ch, b"x")).1, b"");
        assert_eq!(classify(relay, vec![datagram::TYPE, 0]).1, b"");
        assert_eq!(s.stats().unroutable.load(Ordering::Relaxed), 3);
        assert_eq!(s.stats().relay_rx_packets.load(Ordering::Relaxed), 1);
        // Once the session is gone, its channel's data is unroutable too.
        s.clear_relay_routes_of(1);
        assert_eq!(classify(relay, datagram::encode(ch, b"x")).1, b"");
        assert!(
            s.has_route(vaddr),
            "the address stays for the next session's channel"
        );
    }

    #[tokio::test]
    async fn allocated_addresses_are_virtual_and_distinct() {
        let s = MuxSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let a = s.allocate_virtual();
        let b = s.allocate_virtual();
        assert!(MuxSocket::is_virtual(&a) && MuxSocket::is_virtual(&b));
        assert_ne!(a, b);
        let s6 = MuxSocket::bind("[::1]:0".parse().unwrap());
        if let Ok(s6) = s6 {
            assert!(MuxSocket::is_virtual(&s6.allocate_virtual()));
        }
    }

    /// Split batches reach quinn one datagram per buffer, in order, with each batch's address;
    /// a call takes no more than quinn's buffers hold and the next call goes on where it left.
    #[test]
    fn gro_batches_are_split_one_datagram_per_buffer() {
        let a: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:2".parse().unwrap();
        let mut rx = GroRx {
            buf: vec![0; GRO_BATCHES * GRO_BATCH_BYTES],
            ..GroRx::default()
        };
        // Batch 0: segments of 4 bytes, the last one of 2; batch 1: one datagram of 5.
        rx.buf[..10].copy_from_slice(b"aaaabbbbcc");
        rx.buf[GRO_BATCH_BYTES..GRO_BATCH_BYTES + 5].copy_from_slice(b"ddddd");
        let meta = |addr, len, stride| RecvMeta {
            addr,
            len,
            stride,
            ecn: None,
            dst_ip: None,
        };
        rx.meta[0] = meta(a, 10, 4);
        rx.meta[1] = meta(b, 5, 5);
        rx.filled = 2;
        let mut got = Vec::new();
        for _ in 0..4 {
            let mut store = [[0u8; 8]; 2];
            let [s0, s1] = &mut store;
            let mut bufs = [IoSliceMut::new(s0), IoSliceMut::new(s1)];
            let mut metas = [RecvMeta::default(); 2];
            let n = rx.split_into(&mut bufs, &mut metas, || true);
            for (m, buf) in metas.iter().zip(&bufs).take(n) {
                assert_eq!(m.stride, m.len);
                got.push((m.addr, buf[..m.len].to_vec()));
            }
        }
        assert_eq!(
            got,
            vec![
                (a, b"aaaa".to_vec()),
                (a, b"bbbb".to_vec()),
                (a, b"cc".to_vec()),
                (b, b"ddddd".to_vec()),
            ]
        );
        assert!(rx.is_empty());
    }

    /// Sends each of `batches` to `to` in one GSO send of `segment`-byte segments.
    #[cfg(target_os = "linux")]
    async fn send_gso(to: SocketAddr, batches: &[&[u8]], segment: usize) {
        let tx = UdpIo::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        tx.io.writable().await.unwrap();
        for contents in batches {
            tx.send_now(&Transmit {
                destination: to,
                ecn: None,
                contents,
                segment_size: Some(segment),
                src_ip: None,
            })
            .unwrap();
        }
    }

    /// A batch sent with GSO arrives coalesced (GRO) and reaches quinn as its datagrams, in
    /// order, each in a buffer of its own.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_gso_batch_reaches_quinn_as_single_datagrams() {
        let s = MuxSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(s.gro.is_some(), "this kernel has UDP GRO");
        let to = s.local_addr().unwrap();
        // Bytes with QUIC's fixed bit, as quinn's packets have (no probe or channel data).
        let segments: Vec<Vec<u8>> = (0..10u8).map(|i| vec![0x40 + i; 1200]).collect();
        let mut contents = segments.concat();
        contents.extend_from_slice(&[0x4a; 700]); // a shorter last segment
        send_gso(to, &[&contents], 1200).await;
        let mut got: Vec<Vec<u8>> = Vec::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut largest_batch = 0;
        while got.len() < 11 && tokio::time::Instant::now() < deadline {
            let mut store = vec![[0u8; 2048]; 4];
            let mut bufs: Vec<IoSliceMut<'_>> =
                store.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let mut meta = [RecvMeta::default(); 4];
            let n = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                std::future::poll_fn(|cx| s.poll_recv(cx, &mut bufs, &mut meta)),
            )
            .await
            .expect("a datagram in time")
            .unwrap();
            assert!(n <= 4);
            {
                let rx = s.gro.as_ref().unwrap().lock().unwrap();
                largest_batch = largest_batch.max(
                    rx.meta[..rx.filled]
                        .iter()
                        .map(|m| m.len)
                        .max()
                        .unwrap_or(0),
                );
            }
            for (m, buf) in meta.iter().zip(&bufs).take(n) {
                assert_eq!(m.stride, m.len);
                got.push(buf[..m.len].to_vec());
            }
        }
        let mut want = segments;
        want.push(vec![0x4a; 700]);
        assert_eq!(got, want);
        assert!(
            largest_batch > 1200,
            "the kernel coalesced the batch (largest received: {largest_batch} bytes)"
        );
    }

    /// A flood of coalesced datagrams does not outrun quinn's connection: one turn of the
    /// reading task hands quinn no more datagrams than tokio's budget for a turn (128), and the
    /// rest follows in the next turns.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_flood_of_batches_is_handed_over_within_the_task_budget() {
        let s = MuxSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let to = s.local_addr().unwrap();
        let contents = vec![0x40u8; 64 * 100];
        send_gso(to, &[contents.as_slice(); 4], 100).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut store = vec![[0u8; 2048]; 32];
        let mut bufs: Vec<IoSliceMut<'_>> = store.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let mut meta = [RecvMeta::default(); 32];
        let mut turns = Vec::new();
        let mut total = 0;
        while total < 256 && turns.len() < 20 {
            // One turn of this task: read until the socket says "not now".
            let got = std::future::poll_fn(|cx| {
                let mut got = 0;
                while let Poll::Ready(r) = s.poll_recv(cx, &mut bufs, &mut meta) {
                    got += r.unwrap();
                }
                Poll::Ready(got)
            })
            .await;
            total += got;
            turns.push(got);
            tokio::task::yield_now().await;
        }
        assert_eq!(total, 256, "every datagram arrives ({turns:?})");
        assert!(turns.iter().all(|&t| t <= 128), "{turns:?}");
    }
}
