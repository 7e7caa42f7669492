//! The relay's one UDP socket, under its quinn endpoint, with the channel-data forwarder in it.
//!
//! quinn's endpoint driver reads the socket in batches (recvmmsg, and GRO: up to 64 datagrams of
//! one flow in one buffer). Before quinn sees a batch, every datagram that starts like channel
//! data ([`ztna_proto::datagram`]) is looked up in the [`ForwardTable`] and sent on from the
//! buffer it arrived in, then hidden from quinn (length 0, which quinn skips): the single
//! datagrams of a batch leave together in one `sendmmsg`, and a GRO buffer whose segments go to
//! one address in one GSO `sendmsg`. So forwarding costs one table lookup per packet, a share of
//! two system calls per batch, and no task wake, queue, copy or allocation; the control plane's
//! QUIC packets reach quinn as before. Counters count what the kernel took, and each drop where
//! it happens.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage};
use quinn::udp::{RecvMeta, Transmit};
use smallvec::SmallVec;
use ztna_core::mux::{FilteredSocket, RecvFilter, UdpIo};
use ztna_proto::datagram;

use crate::forward::{Drop, ForwardTable, Verdict};
use crate::server::Metrics;

/// The socket. Give it to [`quinn::Endpoint::new_with_abstract_socket`].
pub type RelaySocket = FilteredSocket<Forwarder>;

/// The relay's side of its socket: the forwarding table it reads, and where it counts.
pub struct Forwarder {
    table: Arc<RwLock<ForwardTable>>,
    metrics: Arc<Metrics>,
    /// Woken when a QUIC packet of an established connection comes from an address no session
    /// is bound to: a peer's outer connection may have migrated (NAT rebinding, roaming).
    moved: Arc<tokio::sync::Notify>,
}

thread_local! {
    /// `sendmmsg`'s headers, kept between batches (they hold raw pointers, so they are not
    /// `Send`: one set per thread that runs quinn's endpoint driver).
    static MMSG: std::cell::RefCell<MultiHeaders<SockaddrStorage>> =
        std::cell::RefCell::new(MultiHeaders::preallocate(MMSG_BATCH, None));
}

/// Datagrams one `sendmmsg` takes: quinn reads at most this many per batch.
const MMSG_BATCH: usize = quinn::udp::BATCH_SIZE;

impl fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forwarder").finish_non_exhaustive()
    }
}

/// Wraps a bound UDP socket. Must be called inside a tokio runtime.
pub fn socket(
    sock: std::net::UdpSocket,
    table: Arc<RwLock<ForwardTable>>,
    metrics: Arc<Metrics>,
    moved: Arc<tokio::sync::Notify>,
) -> io::Result<Arc<RelaySocket>> {
    Ok(FilteredSocket::new(
        UdpIo::new(sock)?,
        Forwarder {
            table,
            metrics,
            moved,
        },
    ))
}

impl RecvFilter for Forwarder {
    fn filter(&self, udp: &UdpIo, bufs: &[IoSliceMut<'_>], meta: &mut [RecvMeta]) {
        self.forward(udp, bufs, meta);
    }
}

impl Forwarder {
    /// Forwards the channel data in a received batch and hides it from quinn.
    fn forward(&self, udp: &UdpIo, bufs: &[IoSliceMut<'_>], meta: &mut [RecvMeta]) {
        let mut table = None;
        // Single datagrams, sent together at the end.
        let mut singles: SmallVec<[(SocketAddr, &[u8]); MMSG_BATCH]> = SmallVec::new();
        for (buf, m) in bufs.iter().zip(meta.iter_mut()) {
            let data = &buf[..m.len.min(buf.len())];
            let table =
                table.get_or_insert_with(|| self.table.read().unwrap_or_else(|p| p.into_inner()));
            if !datagram::is_channel_data(data) {
                // A short-header QUIC packet (an established connection) from an address no
                // session is bound to.
                if data.first().is_some_and(|b| b & 0xc0 == 0x40) && !table.is_bound(m.addr) {
                    self.moved.notify_one();
                }
                continue;
            }
            m.len = 0;
            let stride = m.stride.max(1);
            if data.len() <= stride {
                match table.route(m.addr, data) {
                    Verdict::Forward(to) => {
                        if singles.len() == MMSG_BATCH {
                            self.send_many(udp, &singles);
                            singles.clear();
                        }
                        singles.push((to, data));
                    }
                    Verdict::Drop(why) => self.count_drop(why),
                }
                continue;
            }
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
                                self.send(udp, dest, &data[s..e], stride);
                            }
                            run = Some((to, start, end));
                        }
                    },
                    Verdict::Drop(why) => {
                        if let Some((dest, s, e)) = run.take() {
                            self.send(udp, dest, &data[s..e], stride);
                        }
                        self.count_drop(why);
                    }
                }
                start = end;
            }
            if let Some((dest, s, e)) = run {
                self.send(udp, dest, &data[s..e], stride);
            }
        }
        if !singles.is_empty() {
            self.send_many(udp, &singles);
        }
    }

    /// Sends single datagrams, each to its own address, in one `sendmmsg`. What the kernel did
    /// not take (a full send buffer) is dropped and counted.
    fn send_many(&self, udp: &UdpIo, out: &[(SocketAddr, &[u8])]) {
        use std::os::fd::AsRawFd;
        let sent = MMSG.with_borrow_mut(|hdrs| {
            // Plain arrays (no destructor): sendmmsg ties the slices' lifetime to its borrow.
            let mut slices = [[io::IoSlice::new(&[])]; MMSG_BATCH];
            let mut addrs: [Option<SockaddrStorage>; MMSG_BATCH] = [None; MMSG_BATCH];
            let n = out.len().min(MMSG_BATCH);
            for (i, (to, d)) in out[..n].iter().enumerate() {
                slices[i] = [io::IoSlice::new(d)];
                addrs[i] = Some(SockaddrStorage::from(*to));
            }
            nix::sys::socket::sendmmsg(
                udp.io.as_raw_fd(),
                &mut *hdrs,
                &slices[..n],
                &addrs[..n],
                [],
                MsgFlags::MSG_DONTWAIT,
            )
            .map(|r| r.count())
            .unwrap_or(0)
        });
        let bytes: usize = out[..sent].iter().map(|(_, d)| d.len()).sum();
        self.count_sent(sent as u64, bytes as u64);
        let failed = (out.len() - sent) as u64;
        if failed > 0 {
            self.metrics
                .channel_send_failed
                .fetch_add(failed, Ordering::Relaxed);
        }
    }

    fn count_sent(&self, packets: u64, bytes: u64) {
        self.metrics
            .datagrams_forwarded
            .fetch_add(packets, Ordering::Relaxed);
        self.metrics
            .bytes_forwarded
            .fetch_add(bytes, Ordering::Relaxed);
    }

    fn count_drop(&self, why: Drop) {
        let m = &self.metrics;
        let c = match why {
            Drop::Malformed => &m.channel_dropped_malformed,
            Drop::UnknownChannel => &m.channel_dropped_unknown,
            Drop::UnboundSource => &m.channel_dropped_unbound,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Sends `contents` (segments of `stride` bytes, the last maybe shorter) to `to` in one
    /// call. A full socket buffer drops them, counted, like a queue at a router.
    fn send(&self, udp: &UdpIo, to: SocketAddr, contents: &[u8], stride: usize) {
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
        match udp.send_now(&transmit) {
            Ok(()) => self.count_sent(segments, contents.len() as u64),
            Err(e) => {
                self.metrics
                    .channel_send_failed
                    .fetch_add(segments, Ordering::Relaxed);
                tracing::trace!(error = %e, "channel data not sent");
            }
        }
    }
}
