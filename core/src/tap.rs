//! A client socket for tools and tests that speak the relay protocol without inner connections
//! (the relay-scale bench, the relay's fairness test): quinn's packets pass through as on a
//! plain socket; channel data that arrives is counted and, if a queue was asked for, handed to
//! it (bounded: a full queue drops and counts).

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use quinn::udp::{RecvMeta, Transmit};
use tokio::sync::mpsc;
use ztna_proto::{datagram, ChannelId};

use crate::mux::{send_now, FilteredSocket, RecvFilter, UdpIo};

/// Channel data received: the channel and the packet behind the header.
pub type Received = (ChannelId, Bytes);

/// The socket. See the module documentation.
pub type TapSocket = FilteredSocket<Tap>;

/// The tap's side of a [`TapSocket`]: counters and the queue.
pub struct Tap {
    queue: Option<mpsc::Sender<Received>>,
    /// Which packets go to the queue (the others are only counted).
    keep: fn(&[u8]) -> bool,
    received: AtomicU64,
    dropped: AtomicU64,
}

impl fmt::Debug for Tap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tap").finish_non_exhaustive()
    }
}

impl TapSocket {
    /// Binds `addr`; with `queue > 0`, received channel data also goes to the returned
    /// receiver. Must be called inside a tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        queue: usize,
    ) -> io::Result<(Arc<Self>, Option<mpsc::Receiver<Received>>)> {
        Self::bind_filtered(addr, queue, |_| true)
    }

    /// As [`TapSocket::bind`], but only packets for which `keep` is true go to the queue: a test
    /// that floods can count the flood without queueing it in front of what it measures.
    pub fn bind_filtered(
        addr: SocketAddr,
        queue: usize,
        keep: fn(&[u8]) -> bool,
    ) -> io::Result<(Arc<Self>, Option<mpsc::Receiver<Received>>)> {
        let udp = UdpIo::new(crate::daemon::bind_udp(addr, 8 << 20)?)?;
        let (tx, rx) = if queue > 0 {
            let (tx, rx) = mpsc::channel(queue);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let tap = Tap {
            queue: tx,
            keep,
            received: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        };
        Ok((Self::new(udp, tap), rx))
    }

    /// A client endpoint on this socket (QUIC fixed bit never greased).
    pub fn endpoint(
        self: &Arc<Self>,
        config: quinn::EndpointConfig,
    ) -> io::Result<quinn::Endpoint> {
        let mut config = config;
        config.grease_quic_bit(false);
        quinn::Endpoint::new_with_abstract_socket(
            config,
            None,
            self.clone(),
            Arc::new(quinn::TokioRuntime),
        )
    }

    /// Sends `payload` as channel data on `channel` to `relay`, now (a full socket buffer is
    /// an error, like a lost packet).
    pub fn send_channel(
        &self,
        relay: SocketAddr,
        channel: ChannelId,
        payload: &[u8],
    ) -> io::Result<()> {
        send_now(
            &self.udp_io().io,
            &datagram::encode(channel, payload),
            relay,
        )
        .map(|_| ())
    }

    /// Sends `count` copies of `payload` as channel data on `channel` to `relay` in one GSO
    /// send (as an agent's socket sends a batch of its inner connection's packets). Falls back
    /// to one send each where the kernel has no GSO.
    pub fn send_channel_batch(
        &self,
        relay: SocketAddr,
        channel: ChannelId,
        payload: &[u8],
        count: usize,
    ) -> io::Result<()> {
        let one = datagram::encode(channel, payload);
        let count = count.clamp(1, self.udp_io().state.max_gso_segments().max(1));
        let buf = one.repeat(count);
        let transmit = Transmit {
            destination: relay,
            ecn: None,
            contents: &buf,
            segment_size: (count > 1).then_some(one.len()),
            src_ip: None,
        };
        self.udp_io().send_now(&transmit)
    }
}

impl Tap {
    /// Channel-data packets received.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Channel-data packets dropped because the queue was full (or malformed).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn take_channel_data(&self, bufs: &[IoSliceMut<'_>], meta: &mut [RecvMeta]) {
        for (buf, m) in bufs.iter().zip(meta.iter_mut()) {
            let data = &buf[..m.len.min(buf.len())];
            if !datagram::is_channel_data(data) {
                continue;
            }
            for seg in data.chunks(m.stride.max(1)) {
                match datagram::decode(seg) {
                    Ok((ch, off)) => {
                        self.received.fetch_add(1, Ordering::Relaxed);
                        let payload = &seg[off..];
                        if let Some(q) = self.queue.as_ref().filter(|_| (self.keep)(payload)) {
                            if q.try_send((ch, Bytes::copy_from_slice(payload))).is_err() {
                                self.dropped.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Err(_) => {
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            m.len = 0;
        }
    }
}

impl RecvFilter for Tap {
    fn filter(&self, _udp: &UdpIo, bufs: &[IoSliceMut<'_>], meta: &mut [RecvMeta]) {
        self.take_channel_data(bufs, meta);
    }
}
