//! AF_XDP receive path: one socket per RX queue of the fast-path interface (xdpilone), each
//! with its own UMEM, fill and RX rings, served by one thread that reads frames in batches and
//! passes each (already the tunnel-side IPv4 packet: the XDP program rewrote it and removed
//! its Ethernet header) to a callback.

use std::ffi::CString;
use std::num::NonZeroU32;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use anyhow::{anyhow, Context as _};
use xdpilone::{DeviceQueue, IfInfo, RingRx, Socket, SocketConfig, Umem, UmemConfig, User};

/// Frames per UMEM (and ring sizes).
const FRAMES: u32 = 2048;
/// Bytes per frame.
const FRAME_SIZE: u32 = 4096;
/// Frames read per batch.
const BATCH: u32 = 64;
/// How often a waiting thread checks whether it should stop.
const POLL_MS: libc::c_int = 100;

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
    rx: RingRx,
    device: DeviceQueue,
    _user: User,
    _socket: Socket,
    _umem: Umem,
    area: Area,
}

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
        let mut device = umem
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
        {
            let mut fill = device.fill(FRAMES);
            fill.insert((0..FRAMES).map(|i| u64::from(i) * u64::from(FRAME_SIZE)));
            fill.commit();
        }
        let fd = user.as_raw_fd();
        Ok((
            Self {
                rx,
                device,
                _user: user,
                _socket: socket,
                _umem: umem,
                area,
            },
            fd,
        ))
    }

    /// Reads up to a batch of frames, hands each to `f`, and gives the frames back to the
    /// kernel. Returns how many were read.
    fn drain(&mut self, f: &mut impl FnMut(&[u8])) -> u32 {
        let mut done: [u64; BATCH as usize] = [0; BATCH as usize];
        let mut n = 0usize;
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
                if n < done.len() {
                    done[n] = desc.addr - desc.addr % u64::from(FRAME_SIZE);
                    n += 1;
                }
            }
            reader.release();
        }
        if n > 0 {
            let mut fill = self.device.fill(n as u32);
            fill.insert(done[..n].iter().copied());
            fill.commit();
        }
        n as u32
    }

    fn wait(&self, fd: libc::c_int) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
    }
}

/// What a receive thread does with each packet.
pub(super) type OnPacket = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// The receive threads; stopped and joined on [`Receivers::stop`] or drop.
pub(super) struct Receivers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Receivers {
    /// Opens one socket per queue `0..queues` of `interface`, calls `register(queue, fd)` for
    /// each (to put it into the XSK map), and starts a thread per socket calling `on_packet`.
    pub(super) fn start(
        interface: &str,
        queues: u32,
        mut register: impl FnMut(u32, libc::c_int) -> anyhow::Result<()>,
        on_packet: OnPacket,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut me = Self {
            stop: stop.clone(),
            threads: Vec::new(),
        };
        for q in 0..queues {
            let (tx, rx) = mpsc::channel();
            let name = interface.to_owned();
            let stop = stop.clone();
            let on_packet = on_packet.clone();
            let thread = std::thread::Builder::new()
                .name(format!("xsk-{q}"))
                .spawn(move || {
                    // xdpilone's UMEM is not Send: the socket lives and dies on this thread.
                    let (mut queue, fd) = match Queue::open(&name, q) {
                        Ok(v) => v,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = tx.send(Ok(fd));
                    let mut f = |p: &[u8]| on_packet(p);
                    while !stop.load(Ordering::Relaxed) {
                        if queue.drain(&mut f) == 0 {
                            queue.wait(fd);
                        }
                    }
                })
                .context("spawning an AF_XDP thread")?;
            me.threads.push(thread);
            let fd = rx
                .recv()
                .map_err(|_| anyhow!("the AF_XDP thread of queue {q} ended"))??;
            register(q, fd)?;
        }
        Ok(me)
    }

    /// Stops and joins the threads (which closes the sockets).
    pub(super) fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Receivers {
    fn drop(&mut self) {
        self.stop();
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
