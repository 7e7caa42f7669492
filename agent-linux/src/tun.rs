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
use ztna_core::outbound::IPV6_MIN_MTU;

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

#[cfg(test)]
mod tests {
    use super::*;

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
