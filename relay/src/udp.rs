//! The relay's one UDP socket, under its quinn endpoint, with the channel-data forwarder in it.
//!
//! quinn's endpoint driver reads the socket in batches (recvmmsg, and GRO: up to 64 datagrams of
//! one flow in one buffer). Before quinn sees a batch, every datagram that starts like channel
//! data ([`ztna_proto::datagram`]) is looked up in the [`ForwardTable`] and sent on from the
//! buffer it arrived in (a GRO buffer whose segments all go to one address leaves in one GSO
//! send), then hidden from quinn (length 0, which quinn skips). So forwarding costs one table
//! lookup per packet and no task wake, queue or copy; the control plane's QUIC packets reach
//! quinn as before. Counters count what the kernel took, and each drop where it happens.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::task::{ready, Context, Poll};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;
use ztna_core::mux::{Poller, WritableSocket};
use ztna_proto::datagram;

use crate::forward::{Drop, ForwardTable, Verdict};
use crate::server::Metrics;

/// The socket. Give it to [`quinn::Endpoint::new_with_abstract_socket`].
pub struct RelaySocket {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
    table: Arc<RwLock<ForwardTable>>,
    metrics: Arc<Metrics>,
}

impl fmt::Debug for RelaySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelaySocket")
            .field("local", &self.io.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl RelaySocket {
    /// Wraps a bound UDP socket. Must be called inside a tokio runtime.
    pub fn new(
        sock: std::net::UdpSocket,
        table: Arc<RwLock<ForwardTable>>,
        metrics: Arc<Metrics>,
    ) -> io::Result<Arc<Self>> {
        let state = UdpSocketState::new((&sock).into())?;
        sock.set_nonblocking(true)?;
        Ok(Arc::new(Self {
            io: tokio::net::UdpSocket::from_std(sock)?,
            state,
            table,
            metrics,
        }))
    }

    /// Forwards the channel data in a received batch and hides it from quinn.
    fn forward(&self, bufs: &[IoSliceMut<'_>], meta: &mut [RecvMeta]) {
        let mut table = None;
        for (buf, m) in bufs.iter().zip(meta.iter_mut()) {
            let data = &buf[..m.len.min(buf.len())];
            if !datagram::is_channel_data(data) {
                continue;
            }
            let table =
                table.get_or_insert_with(|| self.table.read().unwrap_or_else(|p| p.into_inner()));
            let stride = m.stride.max(1);
            // Runs of segments (GRO) that go to one address leave in one send.
            let mut run: Option<(SocketAddr, usize, usize)> = None;
            let mut start = 0;
            while start < data.len() {
                let end = (start + stride).min(data.len());
                match table.route(m.addr, &data[start..end]) {
                    Verdict::Forward(to) => match &mut run {
                        Some((dest, _, run_end)) if *dest == to => *run_end = end,
                        _ => {
                            if let Some((dest, s, e)) = run.take() {
                                self.send(dest, &data[s..e], stride);
                            }
                            run = Some((to, start, end));
                        }
                    },
                    Verdict::Drop(why) => {
                        if let Some((dest, s, e)) = run.take() {
                            self.send(dest, &data[s..e], stride);
                        }
                        self.count_drop(why);
                    }
                }
                start = end;
            }
            if let Some((dest, s, e)) = run {
                self.send(dest, &data[s..e], stride);
            }
            m.len = 0;
        }
    }

    fn count_drop(&self, why: Drop) {
        let m = &self.metrics;
        let c = match why {
            Drop::Malformed => &m.channel_dropped_malformed,
            Drop::UnknownChannel => &m.channel_dropped_unknown,
            Drop::UnboundSource => &m.channel_dropped_unbound,
        };
        c.fetch_add(1, Ordering::Relaxed);
        m.datagrams_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Sends `contents` (segments of `stride` bytes, the last maybe shorter) to `to` in one
    /// call. A full socket buffer drops them, counted, like a queue at a router.
    fn send(&self, to: SocketAddr, contents: &[u8], stride: usize) {
        let segments = contents.len().div_ceil(stride) as u64;
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: (segments > 1).then_some(stride),
            src_ip: None,
        };
        // Straight to the kernel: tokio's readiness flag is quinn's business, and a UDP send
        // that would block is a drop here, not a wait.
        match self.state.send((&self.io).into(), &transmit) {
            Ok(()) => {
                self.metrics
                    .datagrams_forwarded
                    .fetch_add(segments, Ordering::Relaxed);
                self.metrics
                    .bytes_forwarded
                    .fetch_add(contents.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                self.metrics
                    .channel_send_failed
                    .fetch_add(segments, Ordering::Relaxed);
                self.metrics
                    .datagrams_dropped
                    .fetch_add(segments, Ordering::Relaxed);
                tracing::trace!(error = %e, "channel data not sent");
            }
        }
    }
}

impl AsyncUdpSocket for RelaySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller::new(self))
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
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
        loop {
            ready!(self.io.poll_recv_ready(cx))?;
            match self.io.try_io(Interest::READABLE, || {
                self.state.recv((&self.io).into(), bufs, meta)
            }) {
                Ok(n) => {
                    self.forward(&bufs[..n], &mut meta[..n]);
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // An ICMP error reported on the socket, or the like: the next read goes on.
                Err(e) => tracing::trace!(error = %e, "relay socket read error"),
            }
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

impl WritableSocket for RelaySocket {
    fn udp(&self) -> &tokio::net::UdpSocket {
        &self.io
    }
}
