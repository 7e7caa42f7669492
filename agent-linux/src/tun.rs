//! The TUN device (`IFF_TUN | IFF_NO_PI`: bare IP packets) and the two packet loops between it
//! and the tunnel core.
//!
//! I/O: `/dev/net/tun` through tun-rs's tokio device, with the kernel's offloads on where it
//! has them (`IFF_VNET_HDR`, TSO and USO): a local TCP sender hands the device 64 KiB segments
//! that tun-rs splits into packets of the device's MTU, and packets toward the device are
//! written in batches that tun-rs coalesces (GRO) into fewer, larger ones. The device's MTU,
//! state, address and routes are set over netlink (see [`crate::netlink`]); this module only
//! creates it and moves packets. Per-packet events are logged at TRACE only.

use std::io;
use std::sync::Arc;

use anyhow::{anyhow, Context as _};
use bytes::Bytes;
use tokio::sync::mpsc;
use tun_rs::{AsyncDevice, DeviceBuilder, GROTable, Layer, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};
use ztna_core::agent::Agent;
use ztna_core::arena::PacketArena;
use ztna_core::outbound::IPV6_MIN_MTU;

/// Largest packet read from or written to the device: an offloaded TCP segment is at most
/// 64 KiB, and without offloads the device never hands over more than its MTU, which can be
/// raised under our feet with `ip link set mtu`.
const MAX_PACKET: usize = 65535;

/// Packets per batch in either direction: what one offloaded read splits into at most, and
/// what one batched write coalesces.
const BATCH: usize = IDEAL_BATCH_SIZE;

/// A created TUN device.
pub(crate) struct Tun {
    /// The device, shared by the two packet loops.
    pub(crate) dev: Arc<AsyncDevice>,
    /// Its name, as the kernel has it.
    pub(crate) name: String,
    /// Its interface index.
    pub(crate) index: u32,
    /// Whether the kernel's offloads are on (`IFF_VNET_HDR`, TSO): reads may be 64 KiB
    /// segments and writes are coalesced.
    pub(crate) offload: bool,
}

/// Creates the TUN device `name` (down; bring it up over netlink) with the kernel's offloads
/// on, or without them (said at WARN) when the kernel refuses them. The device is not
/// persistent: it disappears when the process exits, however it exits.
pub(crate) fn create(name: &str) -> anyhow::Result<Tun> {
    let (dev, offload) = match build(name, true) {
        Ok(dev) => (dev, true),
        // Refusals that have nothing to do with offloads fail the same way without them.
        Err(e) if refusal_hint(&e).is_some() => return Err(creation_error(name, &e)),
        Err(e) => {
            tracing::warn!(tun = name, error = %e, "the kernel refused the TUN device's offloads (IFF_VNET_HDR, TSO); reading and writing one packet at a time");
            (
                build(name, false).map_err(|e| creation_error(name, &e))?,
                false,
            )
        }
    };
    let real = dev.name().context("reading the TUN device's name")?;
    let index = dev
        .if_index()
        .with_context(|| format!("reading the interface index of {real}"))?;
    Ok(Tun {
        dev: Arc::new(dev),
        name: real,
        index,
        offload,
    })
}

/// Builds the device, with or without offloads.
fn build(name: &str, offload: bool) -> io::Result<AsyncDevice> {
    DeviceBuilder::new()
        .name(name)
        .layer(Layer::L3)
        .with(|b| {
            b.packet_information(false)
                .multi_queue(false)
                .offload(offload);
        })
        .enable(false)
        .build_async()
}

/// What to tell the user about a refusal to create the device that offloads don't explain.
fn refusal_hint(e: &io::Error) -> Option<&'static str> {
    if e.kind() == io::ErrorKind::PermissionDenied {
        Some(" (ztna-agent up needs root or CAP_NET_ADMIN)")
    } else if e.raw_os_error() == Some(libc::EBUSY) {
        Some(" (a device of that name is in use by another process)")
    } else if e.kind() == io::ErrorKind::NotFound {
        Some(" (is the tun kernel module loaded? /dev/net/tun is missing)")
    } else {
        None
    }
}

fn creation_error(name: &str, e: &io::Error) -> anyhow::Error {
    let hint = refusal_hint(e).unwrap_or("");
    anyhow!("creating TUN device {name}: {e}{hint}")
}

/// Where the kernel keeps the IPv6 settings of every device.
const IPV6_CONF: &str = "/proc/sys/net/ipv6/conf";

/// Whether and how IPv6 can run on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ipv6Plan {
    /// On: the device keeps IPv6, quietly.
    On,
    /// The host has no IPv6 (no `/proc/sys/net/ipv6`, or `all.disable_ipv6`).
    HostWithout,
    /// The device's MTU is below the IPv6 minimum.
    MtuTooSmall,
}

/// Decides whether IPv6 runs on the device, pure: `ipv6_sysctl` is whether the host has
/// `/proc/sys/net/ipv6`, `all_disabled` whether `net.ipv6.conf.all.disable_ipv6` is 1.
pub(crate) fn ipv6_plan(ipv6_sysctl: bool, all_disabled: bool, mtu: u16) -> Ipv6Plan {
    if !ipv6_sysctl || all_disabled {
        Ipv6Plan::HostWithout
    } else if mtu < IPV6_MIN_MTU {
        Ipv6Plan::MtuTooSmall
    } else {
        Ipv6Plan::On
    }
}

/// The device's IPv6 settings for a quiet IPv6 link: no automatic addresses (no link-local,
/// so no router solicitations or DAD probes), no router advertisements accepted, no
/// duplicate address detection, and IPv6 on. Written in this order, before the device is up.
pub(crate) const QUIET_IPV6: [(&str, &str); 4] = [
    ("addr_gen_mode", "1"),
    ("accept_ra", "0"),
    ("accept_dad", "0"),
    ("disable_ipv6", "0"),
];

/// Prepares IPv6 on the (still down) device: with IPv6 on the host and an MTU of at least
/// 1280, makes it quiet ([`QUIET_IPV6`]) and returns true; otherwise says why once, turns IPv6
/// off on the device (best effort; the tunnel carries IPv4 only) and returns false.
pub(crate) fn prepare_ipv6(name: &str, mtu: u16) -> bool {
    let root = std::path::Path::new(IPV6_CONF);
    let all_disabled =
        std::fs::read_to_string(root.join("all/disable_ipv6")).is_ok_and(|v| v.trim() == "1");
    let plan = ipv6_plan(root.exists(), all_disabled, mtu);
    let dev = root.join(name);
    match plan {
        Ipv6Plan::On => {
            for (knob, value) in QUIET_IPV6 {
                let path = dev.join(knob);
                if let Err(e) = std::fs::write(&path, value) {
                    // Older kernels lack addr_gen_mode: a link-local address then appears and
                    // the kernel's chatter is dropped (and counted) by the tunnel.
                    tracing::warn!(knob = %path.display(), error = %e, "could not set an IPv6 setting of the TUN device");
                }
            }
            tracing::debug!(
                tun = name,
                "IPv6 on the TUN device, without automatic addresses, router advertisements or DAD"
            );
            true
        }
        Ipv6Plan::HostWithout => {
            tracing::info!(
                tun = name,
                "IPv6 is disabled on this host; services are reached over IPv4 only"
            );
            false
        }
        Ipv6Plan::MtuTooSmall => {
            tracing::warn!(
                tun = name,
                mtu,
                "the TUN MTU is below the IPv6 minimum of {IPV6_MIN_MTU}; services are reached over IPv4 only"
            );
            let knob = dev.join("disable_ipv6");
            if let Err(e) = std::fs::write(&knob, "1") {
                tracing::debug!(knob = %knob.display(), error = %e, "could not disable IPv6 on the TUN device");
            }
            false
        }
    }
}

/// Buffers of the device reader: the raw read (virtio header and up to 64 KiB), the packets an
/// offloaded segment splits into, and an arena the packets handed to the tunnel are cut from.
pub(crate) struct Reader {
    raw: Vec<u8>,
    packets: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    arena: PacketArena,
}

impl Reader {
    pub(crate) fn new() -> Self {
        // Zeroed allocations stay untouched until written: a split segment writes one MTU
        // into each buffer, so the 8 MiB reserved here cost what the traffic uses.
        Reader {
            raw: vec![0; VIRTIO_NET_HDR_LEN + MAX_PACKET],
            packets: (0..BATCH).map(|_| vec![0; MAX_PACKET]).collect(),
            sizes: vec![0; BATCH],
            arena: PacketArena::new(),
        }
    }

    /// Reads the device once: the number of packets read (an offloaded segment splits into
    /// many), each available as [`Reader::packet`] until the next read.
    pub(crate) async fn read(&mut self, dev: &AsyncDevice) -> io::Result<usize> {
        dev.recv_multiple(&mut self.raw, &mut self.packets, &mut self.sizes, 0)
            .await
    }

    /// Packet `i` of the last read (tests look at packets without handing them on).
    #[cfg(test)]
    pub(crate) fn packet(&self, i: usize) -> &[u8] {
        &self.packets[i][..self.sizes[i]]
    }

    /// Packet `i` of the last read, as the tunnel takes it: copied into the arena, so a
    /// packet costs no allocation of its own.
    fn take(&mut self, i: usize) -> Bytes {
        self.arena.copy(&self.packets[i][..self.sizes[i]])
    }
}

/// Reads or writes of one kind that failed and were dropped: the first is logged at WARN, the
/// rest at TRACE, with how many there have been.
struct Drops {
    what: &'static str,
    count: u64,
}

impl Drops {
    fn new(what: &'static str) -> Self {
        Self { what, count: 0 }
    }

    /// Counts one failure, of `packets` packets, and logs it.
    fn count(&mut self, error: &io::Error, packets: usize) {
        self.count += 1;
        if self.count == 1 {
            tracing::warn!(%error, packets, "{}; dropping it (further drops are logged at TRACE)", self.what);
        } else {
            tracing::trace!(%error, packets, drops = self.count, "{}", self.what);
        }
    }
}

/// Whether an error from reading the device means the device is unusable. tun-rs also
/// returns errors for a read it could not split (a malformed offload header, a segment larger
/// than a buffer): those carry no OS error code and cost that one read.
fn device_failed(e: &io::Error) -> bool {
    e.raw_os_error().is_some()
}

/// Reads packets from the device into the tunnel until the device fails; stops reading while
/// the tunnel has no room ([`Agent::send_packet_wait`]).
pub(crate) async fn device_to_tunnel(
    dev: Arc<AsyncDevice>,
    agent: Arc<Agent>,
) -> anyhow::Result<()> {
    let mut r = Reader::new();
    let mut unsplit = Drops::new("could not split a read from the TUN device");
    loop {
        let n = match r.read(&dev).await {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if device_failed(&e) => return Err(anyhow!("reading from the TUN device: {e}")),
            Err(e) => {
                unsplit.count(&e, 1);
                continue;
            }
        };
        tracing::trace!(packets = n, "read from the TUN device");
        for i in 0..n {
            if r.sizes[i] == 0 {
                continue;
            }
            // Waits while the tunnel is full: the kernel's queue to the device then holds
            // the local TCP back (TCP small queues) instead of the tunnel dropping its
            // packets.
            agent.send_packet_wait(r.take(i)).await;
        }
    }
}

/// Writes packets from the tunnel to the device until the tunnel stops: up to [`BATCH`] of
/// those waiting at a time, coalesced by tun-rs where the device has offloads. A write the
/// kernel refuses is dropped ([`Drops`]); the loop goes on.
pub(crate) async fn tunnel_to_device(
    dev: Arc<AsyncDevice>,
    mut from_tunnel: mpsc::Receiver<Bytes>,
) -> anyhow::Result<()> {
    let mut gro = GROTable::default();
    // Each packet is copied behind room for a virtio header; with offloads tun-rs writes the
    // header there and may grow a buffer to append the packets it coalesces into it (to at
    // most 64 KiB: the buffers are kept, so they hold at most BATCH times that).
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::new()).collect();
    let mut batch = Vec::with_capacity(BATCH);
    let mut refused = Drops::new("the TUN device refused a write");
    loop {
        if from_tunnel.recv_many(&mut batch, BATCH).await == 0 {
            return Ok(());
        }
        let n = batch.len();
        for (buf, pkt) in bufs.iter_mut().zip(batch.drain(..)) {
            buf.clear();
            buf.resize(VIRTIO_NET_HDR_LEN, 0);
            buf.extend_from_slice(&pkt);
        }
        match dev
            .send_multiple(&mut gro, &mut bufs[..n], VIRTIO_NET_HDR_LEN)
            .await
        {
            Ok(_) => tracing::trace!(packets = n, "written to the TUN device"),
            Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
                return Err(anyhow!(
                    "writing to the TUN device: {e} (the device is gone)"
                ));
            }
            Err(e) => refused.count(&e, n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_taken_whole_and_one_after_another_in_one_buffer() {
        let mut r = Reader::new();
        r.packets[0][..1280].fill(1);
        r.sizes[0] = 1280;
        r.packets[1][..60].fill(2);
        r.sizes[1] = 60;
        let a = r.take(0);
        let b = r.take(1);
        assert_eq!((&a[..], &b[..]), (&[1; 1280][..], &[2; 60][..]));
        assert_eq!(b.as_ptr(), a.as_ptr().wrapping_add(1280));
        // The largest read the device can hand over arrives whole.
        r.packets[0].fill(5);
        r.sizes[0] = MAX_PACKET;
        let big = r.take(0);
        assert_eq!(big.len(), MAX_PACKET);
        assert!(big.iter().all(|&x| x == 5));
    }

    #[test]
    fn only_errors_with_an_os_code_end_the_reader() {
        assert!(device_failed(&io::Error::from_raw_os_error(libc::EBADFD)));
        assert!(!device_failed(&io::Error::other(
            "read len 9000 overflows bufs element len 1500"
        )));
        assert!(!device_failed(&io::Error::new(
            io::ErrorKind::InvalidInput,
            "virtioNetHdr.gsoSize must be non-zero"
        )));
    }

    #[test]
    fn ipv6_runs_only_with_host_support_and_a_large_enough_mtu() {
        assert_eq!(ipv6_plan(true, false, 1280), Ipv6Plan::On);
        assert_eq!(ipv6_plan(true, false, 9000), Ipv6Plan::On);
        assert_eq!(ipv6_plan(false, false, 1280), Ipv6Plan::HostWithout);
        assert_eq!(ipv6_plan(true, true, 1280), Ipv6Plan::HostWithout);
        assert_eq!(ipv6_plan(true, false, 1279), Ipv6Plan::MtuTooSmall);
        // IPv6 is switched on last, once the device can no longer make addresses of its own.
        assert_eq!(QUIET_IPV6[0].0, "addr_gen_mode");
        assert_eq!(QUIET_IPV6[3], ("disable_ipv6", "0"));
    }
}
