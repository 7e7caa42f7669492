//! Channel data forwarded in the kernel: the loader of the XDP program in `relay-ebpf/xdp`,
//! the channel map it reads (kept equal to the [`ForwardTable`](crate::forward::ForwardTable)
//! through [`ChannelMap`], a [`Mirror`]), and its counters.
//!
//! The program forwards channel data between the bound ends of open channels with `XDP_TX`
//! (or a redirect), and drops what the userspace forwarder drops; everything else, and channel
//! data it can't forward itself (an end not yet heard from, an IPv6 end, fragments), passes to
//! the relay's socket, where [`crate::udp`] handles it as without XDP. `rewrite.rs` is its
//! userspace twin, tested against the real program with `BPF_PROG_TEST_RUN`.
//!
//! [`start`] picks the attach mode: `auto` tries native (driver) XDP, then generic (SKB), and
//! falls back to userspace with a warning; `native`/`generic` fail startup instead.

#[cfg(test)]
pub(crate) mod rewrite;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{bail, Context as _};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::Ebpf;
use tracing::{debug, info, warn};
use ztna_relay_ebpf_common as common;
use ztna_xdp_loader::{take, Attached, XdpMode};

use crate::forward::Mirror;

/// The XDP program, built from source by `build.rs`.
#[cfg(ztna_relay_xdp_object)]
pub(crate) static OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/ztna-relay-xdp.o"
)));
/// Built without the XDP program (no `bpf-linker` or `rust-src` at build time).
#[cfg(not(ztna_relay_xdp_object))]
pub(crate) static OBJECT: Option<&[u8]> = None;

/// The program attached to an interface; detached when dropped.
pub struct Attachment {
    mode: Attached,
    interface: String,
    program: Option<(Ebpf, aya::programs::xdp::XdpLinkId)>,
}

impl Attachment {
    /// The attach mode it got.
    pub fn mode(&self) -> Attached {
        self.mode
    }

    /// The kernel's id of the attached program (`bpftool prog show id N`).
    pub fn program_id(&self) -> Option<u32> {
        let (ebpf, _) = self.program.as_ref()?;
        let p: &aya::programs::Xdp = ebpf.program(common::PROGRAM)?.try_into().ok()?;
        p.info().ok().map(|i| i.id())
    }
}

impl fmt::Debug for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attachment")
            .field("mode", &self.mode.name())
            .field("interface", &self.interface)
            .finish()
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if let Some((mut ebpf, link)) = self.program.take() {
            let detached = ztna_xdp_loader::xdp_program(&mut ebpf, common::PROGRAM)
                .and_then(|p| p.detach(link).map_err(anyhow::Error::from));
            match detached {
                Ok(()) => info!(interface = %self.interface, "relay XDP program detached"),
                Err(e) => {
                    warn!(interface = %self.interface, "detaching the relay XDP program: {e:#}")
                }
            }
        }
    }
}

/// The program's counters (per CPU in the kernel, summed here).
pub struct Counters {
    map: PerCpuArray<MapData, u64>,
}

impl fmt::Debug for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Counters").finish_non_exhaustive()
    }
}

/// A reading of the program's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reading {
    /// Channel data forwarded in the kernel.
    pub forwarded: u64,
    /// Its bytes (UDP payload).
    pub bytes_forwarded: u64,
    /// Dropped: malformed.
    pub dropped_malformed: u64,
    /// Dropped: the channel is not open.
    pub dropped_unknown: u64,
    /// Dropped: the source is bound to neither end.
    pub dropped_unbound: u64,
    /// Dropped: a redirect to another interface failed.
    pub dropped_redirect: u64,
    /// Channel data left to userspace.
    pub passed_channel: u64,
}

impl Counters {
    /// Sums every CPU's counters.
    pub fn read(&self) -> Reading {
        let sum = |i: u32| -> u64 {
            self.map
                .get(&i, 0)
                .map(|v| v.iter().copied().fold(0u64, u64::wrapping_add))
                .unwrap_or(0)
        };
        Reading {
            forwarded: sum(common::COUNTER_FORWARDED),
            bytes_forwarded: sum(common::COUNTER_FORWARDED_BYTES),
            dropped_malformed: sum(common::COUNTER_DROPPED_MALFORMED),
            dropped_unknown: sum(common::COUNTER_DROPPED_UNKNOWN),
            dropped_unbound: sum(common::COUNTER_DROPPED_UNBOUND),
            dropped_redirect: sum(common::COUNTER_DROPPED_REDIRECT),
            passed_channel: sum(common::COUNTER_PASSED_CHANNEL),
        }
    }
}

/// The program's channel and bound-address maps, kept equal to the forwarding table (a
/// [`Mirror`]).
pub struct ChannelMap {
    channels: BpfHashMap<MapData, [u8; 4], common::Ends>,
    bound: BpfHashMap<MapData, common::EndKey, u8>,
    config: Array<MapData, common::Config>,
    settings: common::Config,
    /// Channel-map writes that failed (the map is full): the program then passes unknown
    /// channels to userspace instead of dropping them.
    failed: u64,
}

impl fmt::Debug for ChannelMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelMap")
            .field("settings", &self.settings)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// An end as the program sees it: an IPv4 (or IPv4-mapped) address and port.
pub(crate) fn end_key(addr: SocketAddr) -> Option<common::EndKey> {
    let ip = match addr.ip() {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => a.to_ipv4_mapped()?,
    };
    Some(common::EndKey {
        addr: ip.octets(),
        port: addr.port().to_be_bytes(),
        pad: [0; 2],
    })
}

/// The map value of a channel between `agent` and `connector`: all zeros (userspace forwards
/// it) when an end is IPv6.
pub(crate) fn ends(agent: SocketAddr, connector: SocketAddr) -> common::Ends {
    match (end_key(agent), end_key(connector)) {
        (Some(a), Some(b)) => common::Ends { a, b },
        _ => common::Ends::default(),
    }
}

impl Mirror for ChannelMap {
    fn set(&mut self, ch: u32, agent: SocketAddr, connector: SocketAddr) {
        if let Err(e) = self
            .channels
            .insert(ch.to_be_bytes(), ends(agent, connector), 0)
        {
            self.failed += 1;
            if self.settings.flags & common::FLAG_PASS_UNKNOWN == 0 {
                warn!(
                    channel = ch,
                    capacity = common::MAX_CHANNELS,
                    "the XDP channel map took no more channels ({e}); channels it lacks are \
                     forwarded by userspace from now on"
                );
                self.settings.flags |= common::FLAG_PASS_UNKNOWN;
                if let Err(e) = self.config.set(0, self.settings, 0) {
                    // The program would drop this channel's data as unknown: stop it.
                    self.settings.port = 0;
                    let _ = self.config.set(0, self.settings, 0);
                    warn!("updating the XDP program's settings failed ({e}); it passes everything now");
                }
            }
        }
    }

    fn remove(&mut self, ch: u32) {
        if let Err(e) = self.channels.remove(&ch.to_be_bytes()) {
            debug!(channel = ch, error = %e, "channel not in the XDP map");
        }
    }

    fn bind(&mut self, addr: SocketAddr) {
        // Full: that end's next hop is learned from its channel data only.
        if let Some(k) = end_key(addr) {
            if let Err(e) = self.bound.insert(k, 1, 0) {
                debug!(error = %e, "the XDP bound-address map took no more addresses");
            }
        }
    }

    fn unbind(&mut self, addr: SocketAddr) {
        if let Some(k) = end_key(addr) {
            let _ = self.bound.remove(&k);
        }
    }
}

/// The XDP fast path, once started: the attachment, the channel map (for the forwarding
/// table) and the counters (for the metrics).
pub struct Started {
    /// Detaches the program when dropped.
    pub attachment: Attachment,
    /// Give to [`ForwardTable::set_mirror`](crate::forward::ForwardTable::set_mirror).
    pub channels: ChannelMap,
    /// The program's counters.
    pub counters: Counters,
}

/// Starts the fast path as `mode` says, for the relay bound at `bound` (its socket's local
/// address): `Ok(None)` means userspace only (`off`, or `auto` when XDP is unavailable, with a
/// warning saying why).
pub fn start(
    mode: XdpMode,
    interface: Option<&str>,
    bound: SocketAddr,
) -> anyhow::Result<Option<Started>> {
    if mode == XdpMode::Off {
        info!("channel data forwarded in userspace (xdp = \"off\")");
        return Ok(None);
    }
    match try_start(mode.attempts(), interface, bound) {
        Ok(s) => {
            info!(
                mode = s.attachment.mode.name(),
                interface = %s.attachment.interface,
                "channel data forwarded in the kernel (XDP)"
            );
            Ok(Some(s))
        }
        Err(e) if mode == XdpMode::Auto => {
            warn!("channel data forwarded in userspace, because XDP is unavailable: {e:#}");
            Ok(None)
        }
        Err(e) => Err(e.context(format!(
            "xdp = \"{}\" is configured but the relay's XDP program could not start (set xdp = \"auto\" to fall back to userspace)",
            mode.name()
        ))),
    }
}

/// Attaches the program to `interface` with forwarding off (it passes every frame), in
/// `mode`: the XDP receive path a veth needs before it takes frames its peer sends with
/// native `XDP_TX` (without one the kernel queues them and never delivers them; GRO on the
/// peer is not enough). For the host side of a relay that runs in a container on a veth, and
/// for the bench's and tests' veths. Detached when the attachment is dropped.
pub fn attach_pass_through(interface: &str, mode: Attached) -> anyhow::Result<Attachment> {
    let object = OBJECT.context("this relay was built without its XDP program")?;
    let mut ebpf = ztna_xdp_loader::load(object, common::PROGRAM)?;
    // The settings array starts zeroed: port 0, which passes everything.
    let (mode, link) =
        ztna_xdp_loader::attach_first(&mut ebpf, common::PROGRAM, interface, &[mode])?;
    Ok(Attachment {
        mode,
        interface: interface.to_owned(),
        program: Some((ebpf, link)),
    })
}

/// The interface to attach to: `configured`, or the one holding `bound`'s address, or the
/// default route's when `bound` is unspecified.
fn pick_interface(configured: Option<&str>, bound: SocketAddr) -> anyhow::Result<String> {
    let name = match (configured, bound.ip()) {
        (Some(i), _) => i.to_owned(),
        (None, ip) if ip.is_unspecified() => {
            ztna_xdp_loader::route_interface(Ipv4Addr::UNSPECIFIED)?
                .context("no default route to attach to; set xdp_interface")?
        }
        (None, IpAddr::V4(a)) => if_addrs::get_if_addrs()
            .context("listing interfaces")?
            .into_iter()
            .find(|i| i.ip() == IpAddr::V4(a))
            .map(|i| i.name)
            .with_context(|| {
                format!("no interface has the relay's address {a}; set xdp_interface")
            })?,
        (None, IpAddr::V6(_)) => {
            bail!("the relay is bound to an IPv6 address; XDP forwards IPv4 channel data only")
        }
    };
    if name == "lo" {
        bail!("XDP on loopback forwards nothing (bind the relay to a real interface's address)");
    }
    Ok(name)
}

fn try_start(
    modes: &[Attached],
    interface: Option<&str>,
    bound: SocketAddr,
) -> anyhow::Result<Started> {
    let object = OBJECT.context(
        "this relay was built without its XDP program (bpf-linker or rust-src were missing at build time)",
    )?;
    let interface = pick_interface(interface, bound)?;
    let mut ebpf = ztna_xdp_loader::load(object, common::PROGRAM)?;
    let mut config: Array<MapData, common::Config> = take(&mut ebpf, common::MAP_CONFIG)?;
    let settings = common::Config {
        addr: match bound.ip() {
            IpAddr::V4(a) => a.octets(),
            IpAddr::V6(_) => [0; 4],
        },
        port: bound.port(),
        flags: 0,
        pad: 0,
    };
    config
        .set(0, settings, 0)
        .context("writing the program's settings")?;
    let channels = take(&mut ebpf, common::MAP_CHANNELS)?;
    let bound = take(&mut ebpf, common::MAP_BOUND)?;
    let counters = take(&mut ebpf, common::MAP_COUNTERS)?;
    let (mode, link) =
        ztna_xdp_loader::attach_first(&mut ebpf, common::PROGRAM, &interface, modes)?;
    Ok(Started {
        attachment: Attachment {
            mode,
            interface,
            program: Some((ebpf, link)),
        },
        channels: ChannelMap {
            channels,
            bound,
            config,
            settings,
            failed: 0,
        },
        counters: Counters { map: counters },
    })
}
