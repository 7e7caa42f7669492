//! The TUN device (`IFF_TUN | IFF_NO_PI`: bare IP packets) and the two packet loops between it
//! and the tunnel core.
//!
//! I/O: `/dev/net/tun` through tun-rs's tokio device. The device's MTU, state, address and
//! routes are set over netlink (see [`crate::netlink`]); this module only creates it and moves
//! packets. Per-packet events are logged at TRACE only.

use std::io;
use std::sync::Arc;

use anyhow::{anyhow, Context as _};
use bytes::Bytes;
use tokio::sync::mpsc;
use tun_rs::{AsyncDevice, DeviceBuilder, Layer};
use ztna_core::agent::Agent;

/// Largest packet read from the device. The device never hands over more than its MTU (no
/// offloads are enabled), but the MTU can be raised under our feet with `ip link set mtu`.
const READ_BUF: usize = 65536;

/// A created TUN device.
pub(crate) struct Tun {
    /// The device, shared by the two packet loops.
    pub(crate) dev: Arc<AsyncDevice>,
    /// Its name, as the kernel has it.
    pub(crate) name: String,
    /// Its interface index.
    pub(crate) index: u32,
}

/// Creates the TUN device `name` (down; bring it up over netlink). The device is not
/// persistent: it disappears when the process exits, however it exits.
pub(crate) fn create(name: &str) -> anyhow::Result<Tun> {
    let dev = DeviceBuilder::new()
        .name(name)
        .layer(Layer::L3)
        .with(|b| {
            b.packet_information(false).multi_queue(false);
        })
        .enable(false)
        .build_async()
        .map_err(|e| {
            let hint = if e.kind() == io::ErrorKind::PermissionDenied {
                " (ztna-agent up needs root or CAP_NET_ADMIN)"
            } else if e.raw_os_error() == Some(libc::EBUSY) {
                " (a device of that name is in use by another process)"
            } else if e.kind() == io::ErrorKind::NotFound {
                " (is the tun kernel module loaded? /dev/net/tun is missing)"
            } else {
                ""
            };
            anyhow!("creating TUN device {name}: {e}{hint}")
        })?;
    let real = dev.name().context("reading the TUN device's name")?;
    let index = dev
        .if_index()
        .with_context(|| format!("reading the interface index of {real}"))?;
    Ok(Tun {
        dev: Arc::new(dev),
        name: real,
        index,
    })
}

/// Turns IPv6 off on the device (the tunnel carries IPv4 only), so the kernel sends no router
/// solicitations or MLD reports into it. Best effort: without IPv6 in the kernel there is
/// nothing to turn off.
pub(crate) fn disable_ipv6(name: &str) {
    let knob = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    match std::fs::write(&knob, "1") {
        Ok(()) => tracing::debug!(tun = name, "IPv6 disabled on the TUN device"),
        Err(e) => tracing::debug!(%knob, error = %e, "could not disable IPv6 on the TUN device"),
    }
}

/// Reads packets from the device into the tunnel until the device fails; stops reading while
/// the tunnel has no room ([`Agent::send_packet_wait`]).
pub(crate) async fn device_to_tunnel(
    dev: Arc<AsyncDevice>,
    agent: Arc<Agent>,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; READ_BUF];
    loop {
        let n = match dev.recv(&mut buf).await {
            Ok(0) => continue,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(anyhow!("reading from the TUN device: {e}")),
        };
        tracing::trace!(len = n, "packet from the TUN device");
        // Waits while the tunnel is full: the kernel's queue to the device then holds the
        // local TCP back (TCP small queues) instead of the tunnel dropping its packets.
        agent
            .send_packet_wait(Bytes::copy_from_slice(&buf[..n]))
            .await;
    }
}

/// Writes packets from the tunnel to the device until the tunnel stops. A packet the kernel
/// refuses is dropped (logged once at WARN, then at TRACE); the loop goes on.
pub(crate) async fn tunnel_to_device(
    dev: Arc<AsyncDevice>,
    mut from_tunnel: mpsc::Receiver<Bytes>,
) -> anyhow::Result<()> {
    let mut errors = 0u64;
    while let Some(pkt) = from_tunnel.recv().await {
        match dev.send(&pkt).await {
            Ok(_) => tracing::trace!(len = pkt.len(), "packet to the TUN device"),
            Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
                return Err(anyhow!(
                    "writing to the TUN device: {e} (the device is gone)"
                ));
            }
            Err(e) => {
                errors += 1;
                if errors == 1 {
                    tracing::warn!(error = %e, len = pkt.len(), "the TUN device refused a packet; dropping it (further drops are logged at TRACE)");
                } else {
                    tracing::trace!(error = %e, len = pkt.len(), errors, "the TUN device refused a packet");
                }
            }
        }
    }
    Ok(())
}
