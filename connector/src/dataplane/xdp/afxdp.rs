//! AF_XDP receive path: one socket per RX queue of the fast-path interface (xdpilone), each
//! with its own UMEM, fill and RX rings, served by one task on the connector's runtime that reads
//! frames in batches and passes each (already the tunnel-side IPv4 packet: the XDP program
//! rewrote it and removed its Ethernet header) to a [`Handler`].
//!
//! The task runs to completion on the runtime thread that also drives the agents' QUIC
//! connections: a batch of replies is queued as datagrams without any lock being contended, and
//! the connection's driver, which runs when the task yields, packs them into as few QUIC packets
//! as fit. (An earlier design read the sockets on threads of their own; each datagram then
//! waited for the connection's mutex, which the driver holds while it polls, and the two threads
//! spent most of their time switching: 0.36x the packet rate of per-flow sockets.)

use std::ffi::CString;
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use tokio::io::unix::AsyncFd;
use tracing::warn;
use xdpilone::{DeviceQueue, IfInfo, RingRx, Socket, SocketConfig, Umem, UmemConfig, User};

/// Frames per UMEM (and ring sizes).
const FRAMES: u32 = 2048;
/// Bytes per frame.
const FRAME_SIZE: u32 = 4096;
/// Frames read per batch.
const BATCH: u32 = 64;
/// Batches read before the task yields, so the connections' drivers send what was queued.
const BATCHES_PER_TURN: u32 = 4;
/// How often a busy task reads its socket's drop counters.
const STATS_EVERY: Duration = Duration::from_millis(250);

/// An anonymous, page-aligned mapping, unmapped on drop.
struct Area {
    ptr: NonNull<u8>,
    len: usize,
}

impl Area {
    fn new(len: usize) -> anyhow::Result<Self> {
        // SAFETY: an anonymous private mapping; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of the UMEM area");
        }
        let ptr = NonNull::new(p.cast::<u8>()).context("mmap returned null")?;
        Ok(Self { ptr, len })
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// One queue's socket and rings. Field order is drop order: rings and sockets before the UMEM,
/// the UMEM before its memory.
struct Queue {
    /// Frames read and not yet given back to the kernel (the fill ring was short of room).
    spare: Vec<u64>,
    rx: RingRx,
    device: DeviceQueue,
    _user: User,
    _socket: Socket,
    _umem: Umem,
    area: Area,
}

// SAFETY: xdpilone's `Umem` is not `Send` only because it holds a raw pointer to the UMEM
// area, and `Area` holds the same pointer. That memory is a private anonymous mapping of this
// process, valid from any thread; the queue owns it (and its rings, which xdpilone declares
// `Send`) exclusively, and is used by one task at a time. Moving it to another thread moves no
// shared state.
unsafe impl Send for Queue {}

impl Queue {
    fn open(interface: &str, queue: u32) -> anyhow::Result<(Self, libc::c_int)> {
        let area = Area::new((FRAMES * FRAME_SIZE) as usize)?;
        let slice = NonNull::slice_from_raw_parts(area.ptr, area.len);
        let cfg = UmemConfig {
            fill_size: FRAMES,
            complete_size: FRAMES,
            frame_size: FRAME_SIZE,
            headroom: 0,
            flags: 0,
        };
        // SAFETY: the area is page-aligned, FRAMES * FRAME_SIZE long, and outlives the UMEM
        // (it is dropped after it, see `Queue`).
        let umem =
            unsafe { Umem::new(cfg, slice) }.map_err(|e| anyhow!("creating the UMEM: {e:?}"))?;
        let mut info = IfInfo::invalid();
        let name = CString::new(interface).context("interface name")?;
        info.from_name(&name)
            .map_err(|e| anyhow!("interface {interface}: {e:?}"))?;
        info.set_queue(queue);
        let socket = Socket::with_shared(&info, &umem)
            .map_err(|e| anyhow!("AF_XDP socket on {interface} queue {queue}: {e:?}"))?;
        let device = umem
            .fq_cq(&socket)
            .map_err(|e| anyhow!("fill/completion rings: {e:?}"))?;
        let user = umem
            .rx_tx(
                &socket,
                &SocketConfig {
                    rx_size: NonZeroU32::new(FRAMES),
                    tx_size: None,
                    bind_flags: 0,
                },
            )
            .map_err(|e| anyhow!("RX ring: {e:?}"))?;
        let rx = user
            .map_rx()
            .map_err(|e| anyhow!("mapping the RX ring: {e:?}"))?;
        umem.bind(&user).map_err(|e| {
            anyhow!("binding the AF_XDP socket to {interface} queue {queue}: {e:?}")
        })?;
        let fd = user.as_raw_fd();
        let mut me = Self {
            spare: (0..FRAMES)
                .map(|i| u64::from(i) * u64::from(FRAME_SIZE))
                .collect(),
            rx,
            device,
            _user: user,
            _socket: socket,
            _umem: umem,
            area,
        };
        me.refill();
        Ok((me, fd))
    }

    /// Gives the spare frames to the kernel, as many as the fill ring takes.
    ///
    /// xdpilone reserves fill slots from a cached view of the ring, which can offer fewer
    /// slots than asked for while more are free; asking again refreshes it. Frames that found
    /// no slot stay spare for the next call: a frame is never lost (each one lost would shrink
    /// the socket's share of frames, and with none left every reply is dropped).
    fn refill(&mut self) {
        while !self.spare.is_empty() {
            let mut fill = self.device.fill(self.spare.len() as u32);
            let n = fill.insert(self.spare.iter().rev().copied()) as usize;
            fill.commit();
            if n == 0 {
                break;
            }
            self.spare.truncate(self.spare.len() - n);
        }
    }

    /// Reads up to a batch of frames, hands each to `f`, and gives the frames back to the
    /// kernel. Returns how many were read.
    fn drain(&mut self, f: &mut impl FnMut(&[u8])) -> u32 {
        let mut n = 0u32;
        {
            let mut reader = self.rx.receive(BATCH);
            while let Some(desc) = reader.read() {
                let start = desc.addr as usize;
                let end = start.saturating_add(desc.len as usize);
                if end <= self.area.len {
                    // SAFETY: the kernel owns no frame between RX and the next fill; the range
                    // is inside the area (checked above).
                    let frame = unsafe {
                        std::slice::from_raw_parts(self.area.ptr.as_ptr().add(start), end - start)
                    };
                    f(frame);
                }
                self.spare
                    .push(desc.addr - desc.addr % u64::from(FRAME_SIZE));
                n += 1;
            }
            reader.release();
        }
        if n > 0 {
            self.refill();
        }
        n
    }
}

/// What a receive task does with the frames it reads.
pub(super) trait Handler: Send + 'static {
    /// One frame: the rewritten reply, an IPv4 packet (possibly followed by padding).
    fn packet(&mut self, frame: &[u8]);
    /// The end of a batch of frames: flush whatever was kept for the batch.
    fn batch_done(&mut self);
    /// Frames the kernel dropped at this socket since the last call (its RX ring was full, or
    /// the fill ring empty).
    fn ring_drops(&mut self, new: u64);
}

/// The AF_XDP socket's descriptor, for the reactor. The socket itself is owned by [`Queue`].
struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The receive tasks; aborted (which closes their sockets) on [`Receivers::stop`] or drop.
pub(super) struct Receivers {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Receivers {
    /// Opens one socket per queue `0..queues` of `interface`, calls `register(queue, fd)` for
    /// each (to put it into the XSK map), and spawns a task per socket on the current runtime
    /// that hands its frames to the handler `make(queue)` returns. Must run inside the runtime.
    pub(super) fn start<H: Handler>(
        interface: &str,
        queues: u32,
        mut register: impl FnMut(u32, libc::c_int) -> anyhow::Result<()>,
        mut make: impl FnMut(u32) -> H,
    ) -> anyhow::Result<Self> {
        let mut me = Self { tasks: Vec::new() };
        for q in 0..queues {
            let (queue, fd) = Queue::open(interface, q)?;
            // SAFETY: `fd` is the queue's socket, open until the queue is dropped, which is
            // after this registration (`Served`'s field order).
            let ready =
                unsafe { AsyncFd::register_with_interest(Fd(fd), tokio::io::Interest::READABLE) }
                    .map_err(std::io::Error::from)
                    .with_context(|| format!("registering the AF_XDP socket of queue {q}"))?;
            register(q, fd)?;
            let socket = Served { ready, queue };
            me.tasks.push(tokio::spawn(serve(socket, make(q), q)));
        }
        Ok(me)
    }

    /// Stops the tasks (their sockets close as the runtime drops them).
    pub(super) fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for Receivers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A queue and its registration with the reactor. Field order is drop order: the descriptor
/// leaves the reactor before the queue closes it.
struct Served {
    ready: AsyncFd<Fd>,
    queue: Queue,
}

/// One queue's task: waits until its RX ring has frames, then reads them in batches, yielding
/// after [`BATCHES_PER_TURN`] so that the datagrams queued go out before more are read. Reads
/// the socket's drop counters every [`STATS_EVERY`], also while no frame arrives, so drops at
/// the end of a burst are counted within that time and not at the next frame.
async fn serve(mut socket: Served, mut handler: impl Handler, q: u32) {
    let mut dropped = 0u64;
    let mut stats_at = Instant::now();
    loop {
        let Served { ready, queue } = &mut socket;
        match tokio::time::timeout(STATS_EVERY, ready.readable()).await {
            Err(_idle) => {}
            Ok(Err(e)) => {
                warn!(
                    queue = q,
                    "AF_XDP socket failed; its replies are no longer read: {e}"
                );
                return;
            }
            Ok(Ok(mut guard)) => {
                for _ in 0..BATCHES_PER_TURN {
                    let n = queue.drain(&mut |f| handler.packet(f));
                    if n > 0 {
                        handler.batch_done();
                    }
                    if n < BATCH {
                        // The ring was empty at the end of this read. A frame added since then
                        // raises a new event, which clear_ready keeps.
                        guard.clear_ready();
                        break;
                    }
                }
            }
        }
        if stats_at.elapsed() >= STATS_EVERY {
            stats_at = Instant::now();
            if let Ok(s) = queue.device.statistics_v2() {
                let total = s.rx_dropped.saturating_add(s.rx_ring_full);
                if total > dropped {
                    handler.ring_drops(total - dropped);
                    dropped = total;
                }
            }
        }
        tokio::task::yield_now().await;
    }
}

/// Number of RX queues of `interface` (from sysfs; 1 if unknown).
pub(super) fn rx_queues(interface: &str) -> u32 {
    std::fs::read_dir(format!("/sys/class/net/{interface}/queues"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                .count() as u32
        })
        .unwrap_or(1)
        .max(1)
}
