//! What the connector's and the relay's XDP loaders share: the configured mode
//! ([`XdpMode`]), loading an object and attaching its program in the first mode that works
//! ([`attach_first`]: native-XDP preflight, a stale netlink program replaced), map access by
//! name ([`take`]), and the interface of the route to an address ([`route_interface`]).
//!
//! The programs themselves and their maps are each daemon's own (`connector-ebpf/`,
//! `relay-ebpf/`); `ebpf_build.rs` beside this crate is the build-script helper both daemons'
//! `build.rs` include to compile them.

pub mod netlink;
pub mod preflight;

/// The Internet checksum computed from scratch, for the programs' userspace twins (which check
/// the programs' incremental updates against it).
pub mod checksum {
    /// One's complement sum of 16-bit words (an odd last byte is padded with zero), not folded.
    pub fn sum_words(data: &[u8]) -> u32 {
        data.chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
            .sum()
    }

    /// Folds a sum to 16 bits and complements it: the checksum field's value.
    pub fn fold(mut sum: u32) -> u16 {
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// Recomputes the header checksum of the IPv4 packet `p` and, unless it is 0 (none), the
    /// checksum of the UDP datagram it carries (over the UDP length, bounded by what `p`
    /// holds). `p` must hold the IPv4 header and the UDP header.
    pub fn refresh_ipv4_udp(p: &mut [u8]) {
        let be16 = |p: &[u8], at: usize| u16::from_be_bytes([p[at], p[at + 1]]);
        let ihl = usize::from(p[0] & 0x0f) * 4;
        p[10..12].fill(0);
        let ip_sum = fold(sum_words(&p[..ihl]));
        p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        let udp = ihl;
        if be16(p, udp + 6) != 0 {
            let udp_len = usize::from(be16(p, udp + 4));
            let end = (udp + udp_len.max(8)).min(p.len());
            p[udp + 6..udp + 8].fill(0);
            let pseudo = sum_words(&p[12..20]) + 17 + u32::from(be16(p, udp + 4));
            let sum = fold(pseudo + sum_words(&p[udp..end]));
            let sum = if sum == 0 { 0xffff } else { sum };
            p[udp + 6..udp + 8].copy_from_slice(&sum.to_be_bytes());
        }
    }
}

use anyhow::{bail, Context as _};
use aya::programs::{Xdp, XdpMode as AyaMode};
use aya::Ebpf;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

/// How a daemon runs its XDP fast path (config key `xdp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native XDP, else generic XDP, else userspace sockets (logged).
    Auto,
    /// Native (driver) XDP or a startup error.
    Native,
    /// Generic (SKB) XDP or a startup error.
    Generic,
    /// Userspace sockets only.
    Off,
}

impl XdpMode {
    /// The attachments to try, in order; empty for `off`.
    pub fn attempts(self) -> &'static [Attached] {
        match self {
            XdpMode::Off => &[],
            XdpMode::Auto => &[Attached::Native, Attached::Generic],
            XdpMode::Native => &[Attached::Native],
            XdpMode::Generic => &[Attached::Generic],
        }
    }

    /// The config value.
    pub fn name(self) -> &'static str {
        match self {
            XdpMode::Auto => "auto",
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
            XdpMode::Off => "off",
        }
    }
}

/// Which attachment a program got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// Driver mode.
    Native,
    /// SKB mode.
    Generic,
}

impl Attached {
    fn aya(self) -> AyaMode {
        match self {
            Attached::Native => AyaMode::Driver,
            Attached::Generic => AyaMode::Skb,
        }
    }

    /// `native` or `generic`.
    pub fn name(self) -> &'static str {
        match self {
            Attached::Native => "native",
            Attached::Generic => "generic",
        }
    }

    /// The value of a daemon's `xdp_mode` gauge: 2 native, 1 generic (0 is off).
    pub fn gauge(self) -> u64 {
        match self {
            Attached::Native => 2,
            Attached::Generic => 1,
        }
    }
}

/// For a test of a daemon's XDP program: `object` where this process can load it (root, and
/// the program built in). Otherwise `None` after saying why, so the test skips, unless
/// `ZTNA_REQUIRE_EBPF=1` (as in scripts/test.sh), where it fails.
pub fn object_for_test(object: Option<&'static [u8]>, test: &str) -> Option<&'static [u8]> {
    let required = std::env::var("ZTNA_REQUIRE_EBPF").is_ok_and(|v| v == "1");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let why = match (object, root) {
        (Some(o), true) => return Some(o),
        (None, _) => "built without the XDP program",
        (Some(_), false) => "needs root (CAP_BPF, CAP_NET_ADMIN)",
    };
    assert!(!required, "{test}: {why}, and ZTNA_REQUIRE_EBPF=1");
    eprintln!("skipping {test}: {why}");
    None
}

/// Loads `object` (creating its maps) and its XDP program `program` (the verifier runs here).
pub fn load(object: &[u8], program: &str) -> anyhow::Result<Ebpf> {
    let mut ebpf = Ebpf::load(object).context(
        "loading the XDP object (creating its maps needs CAP_BPF and CAP_NET_ADMIN, or root)",
    )?;
    xdp_program(&mut ebpf, program)?.load().context(
        "loading the XDP program into the kernel (verifier, or missing CAP_BPF/CAP_NET_ADMIN)",
    )?;
    Ok(ebpf)
}

/// The object's XDP program `name`.
pub fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .with_context(|| format!("the object has no program {name}"))?
        .try_into()
        .context("the program is not XDP")
}

/// Attaches program `program` to `interface` in `mode`. A program already attached through
/// netlink (left by a crashed process on a kernel without XDP links, or by `ip link set ...
/// xdp`) makes the attach fail with EBUSY: it is removed, with a warning, and the attach tried
/// once more.
pub fn attach(
    ebpf: &mut Ebpf,
    program: &str,
    interface: &str,
    mode: Attached,
) -> anyhow::Result<aya::programs::xdp::XdpLinkId> {
    let program = xdp_program(ebpf, program)?;
    match program.attach(interface, mode.aya()) {
        Ok(link) => Ok(link),
        Err(e) if is_busy(&e) => {
            warn!(
                %interface,
                "another XDP program is attached to the interface (left by a crashed process, or \
                 attached with `ip link`); replacing it"
            );
            let index = if_index(interface)?;
            for flags in [netlink::XDP_FLAGS_DRV_MODE, netlink::XDP_FLAGS_SKB_MODE] {
                if let Err(e) = netlink::set_xdp_fd(index, -1, flags) {
                    debug!(%interface, flags, error = %e, "removing an XDP program");
                }
            }
            program
                .attach(interface, mode.aya())
                .context("attaching after removing the program that was there")
        }
        Err(e) => Err(e.into()),
    }
}

/// Attaches program `program` to `interface` in the first of `modes` that works. Native XDP
/// is skipped, with a warning saying what to change, where the interface's settings can't
/// have it ([`preflight`]).
pub fn attach_first(
    ebpf: &mut Ebpf,
    program: &str,
    interface: &str,
    modes: &[Attached],
) -> anyhow::Result<(Attached, aya::programs::xdp::XdpLinkId)> {
    let mut errors = Vec::new();
    let problems = if modes.contains(&Attached::Native) {
        preflight::native_problems(&preflight::Facts::read(interface))
    } else {
        Vec::new()
    };
    for &mode in modes {
        if mode == Attached::Native && !problems.is_empty() {
            warn!(%interface, "native XDP is not possible: {}", problems.join("; "));
            errors.push(format!("native on {interface}: {}", problems.join("; ")));
            continue;
        }
        match attach(ebpf, program, interface, mode) {
            Ok(link) => return Ok((mode, link)),
            Err(e) => {
                debug!(mode = mode.name(), %interface, error = %format!("{e:#}"), "XDP attach failed");
                errors.push(format!("{} on {interface}: {e:#}", mode.name()));
            }
        }
    }
    bail!("attaching the XDP program failed: {}", errors.join("; "))
}

/// Whether an attach failed because another program holds the interface.
pub fn is_busy(e: &aya::programs::ProgramError) -> bool {
    matches!(
        e,
        aya::programs::ProgramError::SyscallError(s)
            if matches!(s.io_error.raw_os_error(), Some(libc::EBUSY | libc::EEXIST))
    )
}

/// The index of `interface`.
pub fn if_index(interface: &str) -> anyhow::Result<u32> {
    let name = std::ffi::CString::new(interface).context("interface name")?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    anyhow::ensure!(index != 0, "no interface {interface}");
    Ok(index)
}

/// Takes map `name` out of `ebpf` as a `T`.
pub fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> anyhow::Result<T> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("the XDP object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// The interface of the longest-prefix IPv4 route to `dst` (from `/proc/net/route`).
pub fn route_interface(dst: std::net::Ipv4Addr) -> anyhow::Result<Option<String>> {
    let table = std::fs::read_to_string("/proc/net/route").context("reading /proc/net/route")?;
    Ok(best_route(&table, dst))
}

/// Parses `/proc/net/route` text (addresses in host-order hex of the network-order bytes).
pub fn best_route(table: &str, dst: std::net::Ipv4Addr) -> Option<String> {
    let dst = u32::from_ne_bytes(dst.octets());
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            (dst & mask == dest).then(|| (mask.count_ones(), f[0].to_owned()))
        })
        .max_by_key(|(bits, _)| *bits)
        .map(|(_, name)| name)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn best_route_is_the_longest_prefix() {
        let table =
            "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
                 wan0\t00000000\t01000A0A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                 back0\t00030A0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(
            best_route(table, Ipv4Addr::new(10, 10, 3, 2)).as_deref(),
            Some("back0")
        );
        assert_eq!(
            best_route(table, Ipv4Addr::new(8, 8, 8, 8)).as_deref(),
            Some("wan0")
        );
        assert_eq!(best_route("Iface\n", Ipv4Addr::new(8, 8, 8, 8)), None);
    }

    #[test]
    fn modes_try_in_order() {
        assert_eq!(
            XdpMode::Auto.attempts(),
            &[Attached::Native, Attached::Generic]
        );
        assert!(XdpMode::Off.attempts().is_empty());
        assert_eq!(XdpMode::Generic.attempts(), &[Attached::Generic]);
    }
}
