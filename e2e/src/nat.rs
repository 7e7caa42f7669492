//! The NAT topologies of `deploy/netns/nat.sh` (see `deploy/netns/README.md`): NAT types, node
//! names, fixed addresses, and wrappers for the script's verbs.
//!
//! ```ignore
//! use ztna_e2e::nat::{self, NatType};
//! ztna_e2e::run_with("direct_full_sym", helper_bins!(),
//!     |name, h| nat::up(name, h, NatType::Full, NatType::Sym), |t| { /* ... */ Ok(()) });
//! ```

use std::ffi::OsStr;
use std::fmt;

use anyhow::{bail, Result};

use crate::{HelperBins, Node, Topology};

/// The script, relative to the workspace root.
pub const NAT_SH: &str = "deploy/netns/nat.sh";

/// The agent side's NAT router (`${P}-nata`; also the one router of `nat.sh lan`).
pub const NATA: Node = Node::Other("nata");
/// The connector side's NAT router (`${P}-natc`).
pub const NATC: Node = Node::Other("natc");
/// The carrier-grade NAT in front of `${P}-nata` in `nat.sh cgnat` (`${P}-cgna`).
pub const CGNA: Node = Node::Other("cgna");
/// A second public host on the WAN bridge (`${P}-pub2`, [`addr::PUB2`]).
pub const PUB2: Node = Node::Other("pub2");
/// The LAN bridge of `nat.sh lan` (`${P}-lan`, bridge `br0`).
pub const LAN: Node = Node::Other("lan");

/// Fixed addresses of the NAT topologies (the relay, backend and `none` sides keep those of
/// [`crate::addr`]).
pub mod addr {
    /// `${P}-nata` wan0: the agent side's public address.
    pub const NATA_WAN: &str = "10.10.0.11";
    /// `${P}-natc` wan0: the connector side's public address.
    pub const NATC_WAN: &str = "10.10.0.13";
    /// A free WAN address to move `${P}-nata` to (`nat.sh readdress PREFIX agent ...`).
    pub const NATA_WAN_ROAMED: &str = "10.10.0.21";
    /// `${P}-nata` lan0 (the agent's default gateway).
    pub const NATA_LAN: &str = "192.168.1.1";
    /// `${P}-natc` lan0 (the connector's default gateway).
    pub const NATC_LAN: &str = "192.168.2.1";
    /// The agent (eth0) behind `${P}-nata`, in `up` and `lan`.
    pub const AGENT_LAN: &str = "192.168.1.2";
    /// The connector (eth0) behind `${P}-natc` in `up`.
    pub const CONN_LAN: &str = "192.168.2.2";
    /// The connector (eth0) on the shared LAN of `lan`, next to the agent.
    pub const CONN_SHARED_LAN: &str = "192.168.1.3";
    /// `${P}-pub2` wan0: a second public host.
    pub const PUB2: &str = "10.10.0.5";
    /// `${P}-nata` wan0 behind the CGN in `nat.sh cgnat` (the CGN's lan0 is 100.64.0.1).
    pub const HOME_WAN: &str = "100.64.0.2";
}

/// A NAT behaviour of `nat.sh` (RFC 4787 terms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NatType {
    /// No NAT: the host sits on the WAN bridge itself.
    None,
    /// Endpoint-independent mapping and filtering (full cone).
    Full,
    /// Endpoint-independent mapping, address-dependent filtering (restricted cone).
    Addr,
    /// Endpoint-independent mapping, address-and-port-dependent filtering (port-restricted
    /// cone; plain Linux masquerade).
    Port,
    /// Endpoint-dependent mapping (a random external port per destination), address-and-port-
    /// dependent filtering (symmetric).
    Sym,
    /// [`NatType::Port`] on a bare router with no firewall: unsolicited UDP is answered with
    /// ICMP port unreachable and recorded, so a later outbound flow to that remote endpoint
    /// leaves from another port.
    Bare,
    /// A cloud NAT gateway: endpoint-independent mapping without port preservation, address-
    /// and-port-dependent filtering, no inbound at all.
    Cloud,
}

impl NatType {
    /// Every type, `None` first.
    pub const ALL: [NatType; 7] = [
        NatType::None,
        NatType::Full,
        NatType::Addr,
        NatType::Port,
        NatType::Sym,
        NatType::Bare,
        NatType::Cloud,
    ];

    /// The argument of `nat.sh`: `none`, `full`, `addr`, `port`, `sym`.
    pub fn as_arg(self) -> &'static str {
        match self {
            NatType::None => "none",
            NatType::Full => "full",
            NatType::Addr => "addr",
            NatType::Port => "port",
            NatType::Sym => "sym",
            NatType::Bare => "bare",
            NatType::Cloud => "cloud",
        }
    }

    /// Whether the same external port is used for every destination.
    pub fn endpoint_independent_mapping(self) -> bool {
        self != NatType::Sym
    }

    /// Whether an endpoint-independent mapping keeps the inside port.
    pub fn port_preserving(self) -> bool {
        !matches!(self, NatType::Sym | NatType::Cloud)
    }

    /// The agent's own address with this NAT on the agent side (`nat.sh up`).
    pub fn agent_addr(self) -> &'static str {
        match self {
            NatType::None => crate::addr::AGENT,
            _ => addr::AGENT_LAN,
        }
    }

    /// The address the agent's packets carry on the WAN (`nat.sh up`).
    pub fn agent_public_addr(self) -> &'static str {
        match self {
            NatType::None => crate::addr::AGENT,
            _ => addr::NATA_WAN,
        }
    }

    /// The connector's own WAN/LAN address with this NAT on the connector side (`nat.sh up`).
    pub fn conn_addr(self) -> &'static str {
        match self {
            NatType::None => crate::addr::CONN,
            _ => addr::CONN_LAN,
        }
    }

    /// The address the connector's packets carry on the WAN (`nat.sh up`).
    pub fn conn_public_addr(self) -> &'static str {
        match self {
            NatType::None => crate::addr::CONN,
            _ => addr::NATC_WAN,
        }
    }
}

impl fmt::Display for NatType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_arg())
    }
}

/// `nat.sh up PREFIX AGENT CONN` (requires the ztna binaries, like [`Topology::new`]).
pub fn up(test_name: &str, helpers: HelperBins, agent: NatType, conn: NatType) -> Result<Topology> {
    Topology::with_script(
        test_name,
        helpers,
        NAT_SH,
        &["up", agent.as_arg(), conn.as_arg()],
    )
}

/// [`up`] with options of `nat.sh` (`udp-timeout=SECONDS`, `wan-hops=N`).
pub fn up_with(
    test_name: &str,
    helpers: HelperBins,
    agent: NatType,
    conn: NatType,
    opts: &[&str],
) -> Result<Topology> {
    let mut args = vec!["up", agent.as_arg(), conn.as_arg()];
    args.extend_from_slice(opts);
    Topology::with_script(test_name, helpers, NAT_SH, &args)
}

/// `nat.sh cgnat PREFIX HOME CGN CONN`: the agent behind a home NAT behind a carrier-grade NAT
/// (requires the ztna binaries).
pub fn cgnat(
    test_name: &str,
    helpers: HelperBins,
    home: NatType,
    cgn: NatType,
    conn: NatType,
) -> Result<Topology> {
    let args = ["cgnat", home.as_arg(), cgn.as_arg(), conn.as_arg()];
    Topology::with_script(test_name, helpers, NAT_SH, &args)
}

/// `nat.sh hairpin PREFIX TYPE on|off`: agent and connector on two isolated LANs behind one NAT
/// (requires the ztna binaries).
pub fn hairpin(test_name: &str, helpers: HelperBins, nat: NatType, on: bool) -> Result<Topology> {
    let args = ["hairpin", nat.as_arg(), if on { "on" } else { "off" }];
    Topology::with_script(test_name, helpers, NAT_SH, &args)
}

/// The connector's side of [`v6`]'s topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V6Conn {
    /// IPv6 only, behind a stateful IPv6 firewall like the agent's (`2001:db8:2::2`).
    V6,
    /// IPv4 only, behind a `port` NAT (`192.168.2.2`).
    V4,
}

/// Addresses of [`v6`]'s topology.
pub mod v6addr {
    /// The relay's IPv6 address on the WAN (it keeps 10.10.0.1 as well).
    pub const RELAY: &str = "2001:db8:10::1";
    /// The agent (IPv6 only, behind its firewall `fwa`).
    pub const AGENT: &str = "2001:db8:1::2";
    /// The connector with [`super::V6Conn::V6`] (behind its firewall `fwc`).
    pub const CONN: &str = "2001:db8:2::2";
}

/// `nat.sh v6 PREFIX v4|v6`: an IPv6-only agent behind a stateful IPv6 firewall, a dual-stack
/// relay, and the connector behind the same kind of firewall or behind an IPv4 NAT (requires
/// the ztna binaries).
pub fn v6(test_name: &str, helpers: HelperBins, conn: V6Conn) -> Result<Topology> {
    let side = match conn {
        V6Conn::V6 => "v6",
        V6Conn::V4 => "v4",
    };
    Topology::with_script(test_name, helpers, NAT_SH, &["v6", side])
}

/// `nat.sh spent PREFIX`: UDP packets the NAT routers on the WAN let out to anyone but the relay
/// (probes and direct-path traffic) since the topology was built.
pub fn spent(t: &Topology) -> Result<u64> {
    let script = crate::workspace_root().join(NAT_SH);
    let out = t.host(
        10,
        [
            OsStr::new("bash"),
            script.as_os_str(),
            OsStr::new("spent"),
            OsStr::new(t.prefix()),
        ],
    )?;
    if !out.success() {
        bail!("{out}");
    }
    out.stdout
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("nat.sh spent printed {:?}: {e}", out.stdout))
}

/// `nat.sh lan PREFIX TYPE` (requires the ztna binaries). `TYPE` must not be `None`.
pub fn lan(test_name: &str, helpers: HelperBins, nat: NatType) -> Result<Topology> {
    Topology::with_script(test_name, helpers, NAT_SH, &["lan", nat.as_arg()])
}

/// Which NAT router [`readdress`] moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `${P}-nata`.
    Agent,
    /// `${P}-natc`.
    Conn,
}

fn nat_sh(t: &Topology, verb: &str, extra: &[&str]) -> Result<()> {
    let script = crate::workspace_root().join(NAT_SH);
    let mut args = vec![
        OsStr::new("bash"),
        script.as_os_str(),
        OsStr::new(verb),
        OsStr::new(t.prefix()),
    ];
    args.extend(extra.iter().map(OsStr::new));
    let out = t.host(20, args)?;
    if !out.success() {
        bail!("{out}");
    }
    t.step(&format!("nat.sh {verb} {}", extra.join(" ")));
    Ok(())
}

/// `nat.sh readdress PREFIX SIDE ADDR`: the router gets `addr` on wan0 instead of its old
/// address and forgets every mapping and flow, so new flows leave from `addr`.
pub fn readdress(t: &Topology, side: Side, addr: &str) -> Result<()> {
    let side = match side {
        Side::Agent => "agent",
        Side::Conn => "conn",
    };
    nat_sh(t, "readdress", &[side, addr])
}

/// `nat.sh block PREFIX`: drop every UDP datagram that is not to or from the relay on the
/// direct paths (both routers' forward chains, the agent's and connector's inbound).
pub fn block(t: &Topology) -> Result<()> {
    nat_sh(t, "block", &[])
}

/// `nat.sh unblock PREFIX`: undo [`block`].
pub fn unblock(t: &Topology) -> Result<()> {
    nat_sh(t, "unblock", &[])
}
