//! The relay's one UDP socket, under its quinn endpoint, with the channel-data forwarder in it.
//!
//! quinn's endpoint driver reads the socket in batches (recvmmsg, and GRO: up to 64 datagrams of
//! one flow in one buffer). Before quinn sees a batch, every datagram that starts like channel
//! data ([`ztna_proto::datagram`]) is looked up in the [`ForwardTable`] and sent on from the
//! buffer it arrived in, then hidden from quinn (length 0, which quinn skips): the single
//! datagrams of a batch leave together in one `sendmmsg` (one per run of them between GRO
//! buffers), and a GRO buffer whose segments go to one address in one GSO `sendmsg`, all in the
//! order they arrived. So forwarding costs one table lookup per packet, a share of two or three
//! system calls per batch, and no task wake, queue, copy or allocation; the control plane's QUIC
//! packets reach quinn as before. Counters count what the kernel took, and each drop where it
//! happens.

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

/// Single datagrams of a batch waiting to leave together, each with where it goes.
type Singles<'a> = SmallVec<[(SocketAddr, &'a [u8]); MMSG_BATCH]>;

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
        // Single datagrams, sent together before the next GRO buffer or at the end.
        let mut singles: Singles<'_> = SmallVec::new();
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
                            self.send_singles(udp, &mut singles);
                        }
                        singles.push((to, data));
                    }
                    Verdict::Drop(why) => self.count_drop(why),
                }
                continue;
            }
            // The single datagrams before this buffer leave first: a peer's packets keep their
            // order. Sent after the batch's GRO buffers, a lone datagram (a short packet among
            // full-size ones) fell up to a batch of buffers behind, thousands of packets; quinn
            // at the far end discards a packet that far behind as a possible duplicate, or
            // fails to decode its packet number, and the inner TCP saw a loss (2,671-8,287
            // retransmits in 10 s of a single stream through the relay, none on a direct path).
            self.send_singles(udp, &mut singles);
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
        self.send_singles(udp, &mut singles);
    }

    /// Sends the single datagrams collected so far ([`Self::send_many`]), if any, and empties
    /// the list.
    fn send_singles(&self, udp: &UdpIo, singles: &mut Singles<'_>) {
        if !singles.is_empty() {
            self.send_many(udp, singles);
            singles.clear();
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ztna_proto::ChannelId;

    use super::*;

    /// Channel data of channel 7 carrying `tag`, padded to `len` bytes.
    fn pkt(tag: u8, len: usize) -> Vec<u8> {
        let mut p = datagram::encode(ChannelId::new(7).expect("channel"), &[tag]);
        p.resize(len, tag);
        p
    }

    /// A batch of a single datagram, a GRO buffer of two full-size segments and another single
    /// datagram, all from the agent: the connector gets them in that order. Before, the singles
    /// left after every GRO buffer of the batch, `b1 b2 a c`.
    #[tokio::test]
    async fn a_batch_leaves_in_the_order_it_arrived() {
        let relay = UdpIo::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let connector = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        connector
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let agent: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut table = ForwardTable::default();
        table.bind_session(1, agent);
        table.bind_session(2, connector.local_addr().unwrap());
        assert!(table.open(7, 1, 2));
        let metrics = Arc::new(Metrics::default());
        let fwd = Forwarder {
            table: Arc::new(RwLock::new(table)),
            metrics: metrics.clone(),
            moved: Arc::default(),
        };

        const FULL: usize = 1200;
        let a = pkt(b'a', 300);
        let gro = [pkt(b'1', FULL), pkt(b'2', FULL)].concat();
        let c = pkt(b'c', 300);
        let mut bufs = [a.clone(), gro, c.clone()];
        let mut meta: Vec<RecvMeta> = bufs
            .iter()
            .map(|b| RecvMeta {
                addr: agent,
                len: b.len(),
                stride: if b.len() > FULL { FULL } else { b.len() },
                ecn: None,
                dst_ip: None,
            })
            .collect();
        let slices: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        fwd.filter(&relay, &slices, &mut meta);

        // Hidden from quinn, and forwarded.
        assert!(meta.iter().all(|m| m.len == 0));
        assert_eq!(metrics.datagrams_forwarded.load(Ordering::Relaxed), 4);
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        for _ in 0..4 {
            let n = connector.recv(&mut buf).expect("a forwarded datagram");
            got.push(buf[..n].to_vec());
        }
        let order: Vec<char> = got
            .iter()
            .map(|p| char::from(p[datagram::HEADER_LEN]))
            .collect();
        assert_eq!(order, ['a', '1', '2', 'c']);
        assert_eq!(got, [a, pkt(b'1', FULL), pkt(b'2', FULL), c]);
    }
}
