//! The path-multiplexing socket: one UDP socket under one quinn endpoint.
//!
//! quinn sees two kinds of peer address:
//! - real addresses (the relay), whose packets go out and come in as plain UDP;
//! - **virtual peer addresses**, one per agent–connector channel, taken from a range that is
//!   never routed (`240.0.0.0/4` on an IPv4 socket, `fd00:7a74:6e61::/48` on IPv6, in the
//!   socket's own family as quinn requires). Packets to a virtual address travel as
//!   `[channel id][packet]` DATAGRAM frames on the outer relay connection; datagrams that arrive
//!   on a channel are handed to quinn as if they came from that virtual address.
//!
//! The inner connection is bound to the virtual address, so the path under it can change (relay
//! channel now, a direct UDP path later) without quinn noticing and without a reconnect. Lock
//! order: an inner connection's send holds its own lock and takes the outer connection's lock in
//! `send_datagram`; the outer connection never calls back into an inner one.

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
use ztna_proto::{datagram, ChannelId};

/// Packets received on relay channels that wait for quinn to read them.
const INBOUND_QUEUE: usize = 4096;
/// Socket buffer sizes asked of the kernel.
const SOCKET_BUFFER: usize = 8 << 20;

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
    /// Packets that could not be sent into a relay channel (too large, or the relay is gone).
    pub relay_tx_dropped: AtomicU64,
    /// Packets for a virtual address with no route (its channel closed).
    pub unroutable: AtomicU64,
    /// Channel packets dropped because quinn was not reading fast enough.
    pub inbound_dropped: AtomicU64,
    /// Real UDP datagrams dropped because their source claimed a virtual peer address.
    pub spoofed_dropped: AtomicU64,
}

#[derive(Clone)]
struct RelayRoute {
    channel: ChannelId,
    conn: quinn::Connection,
}

#[derive(Default)]
struct Routes {
    by_addr: HashMap<SocketAddr, RelayRoute>,
    by_channel: HashMap<(usize, ChannelId), SocketAddr>,
}

/// The socket. Create with [`MuxSocket::bind`], give it to [`quinn::Endpoint::new_with_abstract_socket`].
pub struct MuxSocket {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
    v4: bool,
    next_virtual: AtomicU32,
    routes: RwLock<Routes>,
    inbound_tx: mpsc::Sender<(SocketAddr, Bytes)>,
    inbound_rx: Mutex<mpsc::Receiver<(SocketAddr, Bytes)>>,
    channel_first: AtomicBool,
    stats: MuxStats,
}

impl fmt::Debug for MuxSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MuxSocket")
            .field("local", &self.io.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl MuxSocket {
    /// Binds the UDP socket. Must be called inside a tokio runtime.
    pub fn bind(addr: SocketAddr) -> io::Result<Arc<Self>> {
        let std_sock = crate::daemon::bind_udp(addr, SOCKET_BUFFER)?;
        let state = UdpSocketState::new((&std_sock).into())?;
        let io = tokio::net::UdpSocket::from_std(std_sock)?;
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
        Ok(Arc::new(Self {
            io,
            state,
            v4: addr.is_ipv4(),
            next_virtual: AtomicU32::new(1),
            routes: RwLock::default(),
            inbound_tx,
            inbound_rx: Mutex::new(inbound_rx),
            channel_first: AtomicBool::new(false),
            stats: MuxStats::default(),
        }))
    }

    /// The socket's counters.
    pub fn stats(&self) -> &MuxStats {
        &self.stats
    }

    /// Whether `addr` is in the virtual peer range.
    pub fn is_virtual(addr: &SocketAddr) -> bool {
        match addr.ip() {
            IpAddr::V4(ip) => ip.octets()[0] >= 240 && ip != Ipv4Addr::BROADCAST,
            IpAddr::V6(ip) => ip.segments()[..3] == [0xfd00, 0x7a74, 0x6e61],
        }
    }

    fn allocate_virtual(&self) -> SocketAddr {
        let n = self.next_virtual.fetch_add(1, Ordering::Relaxed);
        // 2^28 addresses times 16 ports before a value repeats; a process never gets near that.
        let port = 1 + (n >> 28) as u16;
        if self.v4 {
            SocketAddr::new(Ipv4Addr::from(0xF000_0000 | (n & 0x0FFF_FFFF)).into(), port)
        } else {
            let [a, b] = [(n >> 16) as u16, n as u16];
            SocketAddr::new(
                Ipv6Addr::new(0xfd00, 0x7a74, 0x6e61, 0, 0, 0, a, b).into(),
                port,
            )
        }
    }

    /// Routes a new virtual peer address through `channel` on the outer connection `conn`.
    pub fn add_relay_route(&self, conn: &quinn::Connection, channel: ChannelId) -> SocketAddr {
        let addr = self.allocate_virtual();
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = routes.by_channel.insert((conn.stable_id(), channel), addr) {
            routes.by_addr.remove(&old);
        }
        routes.by_addr.insert(
            addr,
            RelayRoute {
                channel,
                conn: conn.clone(),
            },
        );
        addr
    }

    /// Removes a virtual address's route; later packets to it are dropped and counted.
    pub fn remove_route(&self, addr: SocketAddr) {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = routes.by_addr.remove(&addr) {
            routes.by_channel.remove(&(r.conn.stable_id(), r.channel));
        }
    }

    /// Removes every route over the outer connection with `stable_id`.
    pub fn remove_routes_of(&self, stable_id: usize) {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        routes
            .by_addr
            .retain(|_, r| r.conn.stable_id() != stable_id);
        routes.by_channel.retain(|(id, _), _| *id != stable_id);
    }

    /// Hands a datagram received on the outer connection `stable_id` to quinn. Returns false if
    /// it was dropped (malformed, unknown channel, or quinn not keeping up).
    pub fn deliver_from_relay(&self, stable_id: usize, dgram: Bytes) -> bool {
        let Ok((channel, offset)) = datagram::decode(&dgram) else {
            self.stats.unroutable.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        let addr = {
            let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
            routes.by_channel.get(&(stable_id, channel)).copied()
        };
        let Some(addr) = addr else {
            self.stats.unroutable.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(%channel, "datagram for an unknown channel");
            return false;
        };
        let len = (dgram.len() - offset) as u64;
        match self.inbound_tx.try_send((addr, dgram.slice(offset..))) {
            Ok(()) => {
                self.stats.relay_rx_packets.fetch_add(1, Ordering::Relaxed);
                self.stats.relay_rx_bytes.fetch_add(len, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.stats.inbound_dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    fn send_relay(&self, route: &RelayRoute, transmit: &Transmit<'_>) {
        let seg = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        for chunk in transmit.contents.chunks(seg) {
            let dgram = Bytes::from(datagram::encode(route.channel, chunk));
            match route.conn.send_datagram(dgram) {
                Ok(()) => {
                    self.stats.relay_tx_packets.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .relay_tx_bytes
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    self.stats.relay_tx_dropped.fetch_add(1, Ordering::Relaxed);
                    if let quinn::SendDatagramError::TooLarge = e {
                        tracing::warn!(len = chunk.len(), max = ?route.conn.max_datagram_size(), "inner packet does not fit the relay connection; dropped");
                    } else {
                        tracing::trace!(error = %e, "relay channel send failed");
                    }
                }
            }
        }
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
        loop {
            ready!(self.io.poll_recv_ready(cx))?;
            if let Ok(n) = self.io.try_io(Interest::READABLE, || {
                self.state.recv((&self.io).into(), bufs, meta)
            }) {
                // Virtual peer addresses are reachable only through relay channels; a real
                // datagram claiming one as its source is spoofed. quinn skips empty datagrams.
                for m in meta
                    .iter_mut()
                    .take(n)
                    .filter(|m| Self::is_virtual(&m.addr))
                {
                    m.len = 0;
                    self.stats.spoofed_dropped.fetch_add(1, Ordering::Relaxed);
                }
                return Poll::Ready(Ok(n));
            }
        }
    }
}

impl AsyncUdpSocket for MuxSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller {
            sock: self,
            fut: None,
        })
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        if Self::is_virtual(&transmit.destination) {
            let route = {
                let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
                routes.by_addr.get(&transmit.destination).cloned()
            };
            match route {
                Some(route) => self.send_relay(&route, transmit),
                None => {
                    self.stats.unroutable.fetch_add(1, Ordering::Relaxed);
                }
            }
            // Like a UDP socket whose packet was lost on the way: the sender's loss recovery copes.
            return Ok(());
        }
        self.io.try_io(Interest::WRITABLE, || {
            self.state.send((&self.io).into(), transmit)
        })
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
        self.io.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }
}

type WritableFut = Pin<Box<dyn std::future::Future<Output = io::Result<()>> + Send + Sync>>;

struct Poller {
    sock: Arc<MuxSocket>,
    fut: Option<WritableFut>,
}

impl fmt::Debug for Poller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Poller").finish_non_exhaustive()
    }
}

impl UdpPoller for Poller {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let fut = this.fut.get_or_insert_with(|| {
            let sock = this.sock.clone();
            Box::pin(async move { sock.io.writable().await })
        });
        let res = fut.as_mut().poll(cx);
        if res.is_ready() {
            this.fut = None;
        }
        res
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
}
