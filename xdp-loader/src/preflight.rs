//! Checks, before native XDP is attached, that the interface's settings allow it, so that the
//! connector says what to change instead of relaying the driver's bare `EINVAL`.
//!
//! [`native_problems`] is pure (the driver's known limits against the interface's facts);
//! [`Facts::read`] reads the facts: the driver from sysfs, the MTU, and the channel counts with
//! the `ETHTOOL_GCHANNELS` ioctl (unprivileged).

/// What native XDP depends on, as read from the interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// The interface.
    pub interface: String,
    /// Kernel driver name (`ena`, `virtio_net`, ...), if the interface has a device.
    pub driver: Option<String>,
    /// Current MTU.
    pub mtu: u32,
    /// Combined channels: (current, maximum), if the driver reports them.
    pub combined: Option<(u32, u32)>,
}

/// Largest MTU the ENA driver runs native XDP with (4 KiB pages: a frame, its headroom and
/// `skb_shared_info` in one page).
pub const ENA_XDP_MAX_MTU: u32 = 3498;

/// What keeps native XDP from attaching on this interface, each with the command that fixes
/// it; empty when nothing known does. Drivers without known limits pass.
pub fn native_problems(f: &Facts) -> Vec<String> {
    let mut out = Vec::new();
    let half_queues = |out: &mut Vec<String>| {
        // XDP_TX and redirect use TX queues of their own, taken from the unused half.
        if let Some((cur, max)) = f.combined {
            if max < 2 {
                out.push(format!(
                    "{} has a single queue; native XDP needs a spare one for its TX ring (use an instance type with more queues, or xdp = \"generic\")",
                    f.interface
                ));
            } else if cur > max / 2 {
                out.push(format!(
                    "{} uses {cur} of {max} combined queues; native XDP needs at most half: ethtool -L {} combined {}",
                    f.interface,
                    f.interface,
                    max / 2
                ));
            }
        }
    };
    match f.driver.as_deref() {
        Some("ena") => {
            if f.mtu > ENA_XDP_MAX_MTU {
                out.push(format!(
                    "{} has MTU {}; the ENA driver runs native XDP only up to {ENA_XDP_MAX_MTU}: ip link set dev {} mtu {ENA_XDP_MAX_MTU}",
                    f.interface, f.mtu, f.interface
                ));
            }
            half_queues(&mut out);
        }
        Some("virtio_net") => half_queues(&mut out),
        _ => {}
    }
    out
}

impl Facts {
    /// Reads the facts of `interface`; what can't be read is left out (and not checked).
    pub fn read(interface: &str) -> Self {
        let sys = format!("/sys/class/net/{interface}");
        let driver = std::fs::read_link(format!("{sys}/device/driver"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        let mtu = std::fs::read_to_string(format!("{sys}/mtu"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Self {
            interface: interface.to_owned(),
            driver,
            mtu,
            combined: combined_channels(interface),
        }
    }
}

/// `struct ethtool_channels` of linux/ethtool.h.
#[repr(C)]
#[derive(Default)]
struct EthtoolChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

const ETHTOOL_GCHANNELS: u32 = 0x3c;
const SIOCETHTOOL: libc::c_ulong = 0x8946;

/// (current, maximum) combined channels, or `None` if the driver does not report them.
fn combined_channels(interface: &str) -> Option<(u32, u32)> {
    let name = interface.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return None;
    }
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).ok()?;
    let mut ch = EthtoolChannels {
        cmd: ETHTOOL_GCHANNELS,
        ..EthtoolChannels::default()
    };
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(name) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&mut ch as *mut EthtoolChannels).cast();
    use std::os::fd::AsRawFd;
    // SAFETY: SIOCETHTOOL with a valid ifreq whose data points at a live ethtool_channels of
    // the size the kernel writes for ETHTOOL_GCHANNELS.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut ifr) };
    (rc == 0 && ch.max_combined > 0).then_some((ch.combined_count, ch.max_combined))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ena(mtu: u32, combined: Option<(u32, u32)>) -> Facts {
        Facts {
            interface: "ens5".into(),
            driver: Some("ena".into()),
            mtu,
            combined,
        }
    }

    #[test]
    fn ena_limits() {
        // EC2's defaults: jumbo MTU and every queue in use. Both are reported, with the fix.
        let p = native_problems(&ena(9001, Some((8, 8))));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("ip link set dev ens5 mtu 3498"), "{p:?}");
        assert!(p[1].contains("ethtool -L ens5 combined 4"), "{p:?}");
        // What deploy/aws's ztna-xdp-prep sets: nothing left.
        assert!(native_problems(&ena(3498, Some((4, 8)))).is_empty());
        assert_eq!(native_problems(&ena(3499, Some((4, 8)))).len(), 1);
        assert_eq!(native_problems(&ena(1500, Some((5, 8)))).len(), 1);
        // A single-queue device can't; unknown channel counts are not checked.
        let p = native_problems(&ena(1500, Some((1, 1))));
        assert!(p.len() == 1 && p[0].contains("single queue"), "{p:?}");
        assert!(native_problems(&ena(1500, None)).is_empty());
    }

    #[test]
    fn other_drivers() {
        let veth = Facts {
            interface: "back0".into(),
            driver: None,
            mtu: 65535,
            combined: None,
        };
        assert!(native_problems(&veth).is_empty());
        let virtio = Facts {
            driver: Some("virtio_net".into()),
            combined: Some((2, 2)),
            ..veth
        };
        assert_eq!(native_problems(&virtio).len(), 1);
    }

    #[test]
    fn reads_loopback() {
        let f = Facts::read("lo");
        assert_eq!((f.driver, f.mtu > 0), (None, true));
        assert!(native_problems(&Facts::read("no-such-if0")).is_empty());
    }
}
