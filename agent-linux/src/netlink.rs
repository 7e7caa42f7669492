//! The TUN device's link, address and routes, over rtnetlink (never by running `ip`).
//!
//! The agent gives its device one address, the tunnel IP as a `/32`, and one `/32` route per
//! service address through the device, with the tunnel IP as preferred source. With IPv6 on
//! (see [`crate::tun::prepare_ipv6`]) it also gives it the IPv6 tunnel address as a `/128`
//! (without duplicate address detection, `IFA_F_NODAD`), and one route per service IPv6
//! address (a name service: its IPv6 pool) from that address. Every route it
//! installs carries the route protocol [`RTPROT_ZTNA`], so the routes it owns can be found again,
//! also after a crash, without touching anyone else's.
//!
//! The service routes live in their own table (`route_table`, default 0x7a7a = 31354), reached
//! through one policy rule, `not fwmark TABLE lookup TABLE` at priority [`RULE_PRIORITY`] (before
//! the main table). The agent's UDP socket carries that fwmark (`SO_MARK`), so the outer
//! traffic (to the relay and to direct-path peers) never consults the tunnel's table: a catalog
//! that lists the relay's address, or a peer's, cannot capture it. Everything else on the host
//! reaches service addresses through the tunnel. The rule carries protocol [`RTPROT_ZTNA`] too.
//! With IPv6 on there is the same rule for IPv6 (rules are per address family).
//!
//! The decisions are pure and tested ([`desired_routes`], [`diff_routes`], [`diff_addresses`]);
//! [`Netlink`] reads what the kernel has, applies the differences, and does I/O on a netlink
//! socket only.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{anyhow, Context as _};
use futures::TryStreamExt as _;
use netlink_packet_route::address::{AddressAttribute, AddressFlag, AddressHeaderFlag};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlag, RuleMessage};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, IpVersion};
use ztna_core::agent::TunnelState;

/// Route protocol number (`rtm_protocol`) of every route the agent installs: 0x7a (122, 'z').
/// Unassigned in `/etc/iproute2/rt_protos`; `ip route` shows it as `proto 122`, and
/// `ip route flush proto 122` removes ztna routes by hand.
pub(crate) const RTPROT_ZTNA: u8 = 0x7a;

/// Priority of the policy rule that sends unmarked traffic to the service routes' table: before
/// the main table (32766), after the local table (0).
pub(crate) const RULE_PRIORITY: u32 = 31354;

/// Prefix length of the IPv4 tunnel address.
const HOST_PREFIX: u8 = 32;
/// Prefix length of the IPv6 tunnel address.
const HOST_PREFIX6: u8 = 128;

/// The host prefix length of `a`'s family.
fn host_prefix(a: IpAddr) -> u8 {
    if a.is_ipv4() {
        HOST_PREFIX
    } else {
        HOST_PREFIX6
    }
}

const ESRCH: i32 = libc::ESRCH;
const EEXIST: i32 = libc::EEXIST;
const ENODEV: i32 = libc::ENODEV;
const EADDRNOTAVAIL: i32 = libc::EADDRNOTAVAIL;

/// A route as far as the agent cares: destination, output device, preferred source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct RouteKey {
    /// Destination network address.
    pub(crate) dst: IpAddr,
    /// Destination prefix length.
    pub(crate) prefix_len: u8,
    /// Output interface index.
    pub(crate) oif: Option<u32>,
    /// Preferred source address.
    pub(crate) src: Option<IpAddr>,
}

/// What to change to get from the installed routes to the desired ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RouteDiff {
    /// Routes to add, in order.
    pub(crate) add: Vec<RouteKey>,
    /// Indices into the installed list of routes to delete.
    pub(crate) remove: Vec<usize>,
}

/// What to change to get from the installed addresses of the device (of one family) to the
/// desired one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct AddrDiff {
    /// Address to add as a host address (`/32`, `/128`).
    pub(crate) add: Option<IpAddr>,
    /// Indices into the installed list of addresses to delete.
    pub(crate) remove: Vec<usize>,
}

/// Whether `a` can be a service address worth a route: a unicast address, not on this host.
fn routable(a: Ipv4Addr) -> bool {
    !(a.is_unspecified()
        || a.is_loopback()
        || a.is_multicast()
        || a.is_broadcast()
        || a.is_link_local())
}

/// Whether `a` can be a service IPv6 network worth a route.
fn routable6(a: Ipv6Addr) -> bool {
    !(a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_unicast_link_local())
}

/// The routes a tunnel state asks for: one `/32` per distinct service address through device
/// `oif`, from the tunnel IP, and with `ipv6`, one route per service IPv6 address (or pool)
/// from the IPv6 tunnel address. None until the tunnel IP is known, since packets sent before
/// then would leave with another source address and be dropped by the connector anyway.
pub(crate) fn desired_routes(state: &TunnelState, oif: u32, ipv6: bool) -> BTreeSet<RouteKey> {
    let Some(tunnel_ip) = state.tunnel_ip else {
        return BTreeSet::new();
    };
    // A name service routes its whole pool of virtual addresses.
    let v4 = state
        .services
        .iter()
        .map(|s| s.prefix())
        .filter(|n| !n.contains(&tunnel_ip) && routable(n.network()))
        .map(|net| RouteKey {
            dst: IpAddr::V4(net.network()),
            prefix_len: net.prefix_len(),
            oif: Some(oif),
            src: Some(IpAddr::V4(tunnel_ip)),
        });
    let tunnel_ip6 = state.tunnel_ipv6().filter(|_| ipv6);
    let v6 = tunnel_ip6.into_iter().flat_map(|own| {
        state
            .services
            .iter()
            .filter_map(|s| s.prefix6())
            .filter(move |n| !n.contains(&own) && routable6(n.network()))
            .map(move |net| RouteKey {
                dst: IpAddr::V6(net.network()),
                prefix_len: net.prefix_len(),
                oif: Some(oif),
                src: Some(IpAddr::V6(own)),
            })
    });
    v4.chain(v6).collect()
}

/// Which of our `installed` routes to delete and which `desired` ones to add. An installed route
/// that is not exactly desired (other device, other source, other prefix, or a duplicate) goes.
pub(crate) fn diff_routes(desired: &BTreeSet<RouteKey>, installed: &[RouteKey]) -> RouteDiff {
    let mut kept = BTreeSet::new();
    let mut remove = Vec::new();
    for (i, r) in installed.iter().enumerate() {
        if desired.contains(r) && kept.insert(*r) {
            continue;
        }
        remove.push(i);
    }
    let add = desired.difference(&kept).copied().collect();
    RouteDiff { add, remove }
}

/// Which installed addresses of the device (all of one family) to delete, and whether to add
/// the desired one (a host address of that family).
pub(crate) fn diff_addresses(desired: Option<IpAddr>, installed: &[(IpAddr, u8)]) -> AddrDiff {
    let want = desired.map(|a| (a, host_prefix(a)));
    let present = want.is_some_and(|w| installed.contains(&w));
    AddrDiff {
        add: if present { None } else { desired },
        remove: installed
            .iter()
            .enumerate()
            .filter(|(_, a)| Some(**a) != want)
            .map(|(i, _)| i)
            .collect(),
    }
}

/// The positive errno of a netlink error, if it is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| c.get().abs()),
        _ => None,
    }
}

/// Wraps a netlink error, pointing at the missing privilege when that is the cause.
fn nl_error(e: rtnetlink::Error, what: String) -> anyhow::Error {
    match errno(&e) {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            anyhow!("{what}: {e} (ztna-agent up needs root or CAP_NET_ADMIN)")
        }
        _ => anyhow::Error::new(e).context(what),
    }
}

/// What one reconciliation changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Changes {
    /// Routes added.
    pub(crate) added: usize,
    /// Routes removed.
    pub(crate) removed: usize,
    /// Routes wanted in all.
    pub(crate) routes: usize,
}

/// The policy rule as the agent wants it: `not fwmark MARK/0xffffffff lookup TABLE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RuleKey {
    /// An IPv6 rule (else IPv4).
    pub(crate) ipv6: bool,
    /// Table looked up by unmarked packets.
    pub(crate) table: u32,
    /// The mark that exempts a packet (the agent's socket's).
    pub(crate) mark: u32,
    /// Rule priority.
    pub(crate) priority: u32,
}

/// The key of a rule message if it is one of ours (protocol [`RTPROT_ZTNA`]).
fn rule_key(m: &RuleMessage) -> Option<RuleKey> {
    let ipv6 = match m.header.family {
        AddressFamily::Inet => false,
        AddressFamily::Inet6 => true,
        _ => return None,
    };
    if !m.attributes.iter().any(|a| {
        matches!(
            a,
            RuleAttribute::Protocol(RouteProtocol::Other(RTPROT_ZTNA))
        )
    }) {
        return None;
    }
    let mut key = RuleKey {
        ipv6,
        table: u32::from(m.header.table),
        mark: 0,
        priority: 0,
    };
    for a in &m.attributes {
        match a {
            RuleAttribute::Table(t) => key.table = *t,
            RuleAttribute::FwMark(v) => key.mark = *v,
            RuleAttribute::Priority(p) => key.priority = *p,
            _ => {}
        }
    }
    Some(key)
}

/// A netlink route socket, and the table the service routes go into.
#[derive(Clone)]
pub(crate) struct Netlink {
    handle: Handle,
    table: u32,
    /// Whether the agent uses IPv6 on its device (address, routes, rule). Without, IPv6
    /// addresses, routes and rules are never listed or touched.
    ipv6: bool,
}

fn ip_version(ipv6: bool) -> IpVersion {
    if ipv6 {
        IpVersion::V6
    } else {
        IpVersion::V4
    }
}

impl Netlink {
    /// Opens the socket and spawns its connection task on the current runtime. Service routes
    /// go into `table`.
    pub(crate) fn connect(table: u32) -> anyhow::Result<Self> {
        let (conn, handle, _) =
            rtnetlink::new_connection().context("opening a netlink route socket")?;
        tokio::spawn(conn);
        Ok(Self {
            handle,
            table,
            ipv6: false,
        })
    }

    /// The same socket, with IPv6 on or off.
    pub(crate) fn with_ipv6(self, ipv6: bool) -> Self {
        Self { ipv6, ..self }
    }

    /// Whether IPv6 is on.
    pub(crate) fn ipv6(&self) -> bool {
        self.ipv6
    }

    /// The address families in use.
    fn versions(&self) -> &'static [bool] {
        if self.ipv6 {
            &[false, true]
        } else {
            &[false]
        }
    }

    /// Our policy rules (protocol [`RTPROT_ZTNA`]) of one family, with their messages for
    /// deletion.
    async fn our_rules(&self, ipv6: bool) -> anyhow::Result<Vec<(RuleKey, RuleMessage)>> {
        let msgs: Vec<RuleMessage> = self
            .handle
            .rule()
            .get(ip_version(ipv6))
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_error(e, "listing policy rules".into()))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| rule_key(&m).map(|k| (k, m)))
            .collect())
    }

    /// Installs the rule `key` unless it is there already (another agent of the same table, or
    /// a crashed run, may have left it; it is the same rule). Returns whether it added one.
    pub(crate) async fn ensure_rule(&self, key: RuleKey) -> anyhow::Result<bool> {
        if self
            .our_rules(key.ipv6)
            .await?
            .iter()
            .any(|(k, _)| *k == key)
        {
            return Ok(false);
        }
        // Built without `.v4()`/`.v6()`, which only set the family (and a type for the
        // prefix setters, not used here).
        let mut req = self
            .handle
            .rule()
            .add()
            .table_id(key.table)
            .priority(key.priority)
            .fw_mark(key.mark)
            .action(RuleAction::ToTable);
        req.message_mut().header.family = if key.ipv6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        ours(req.message_mut());
        let result = req.execute().await;
        match result {
            Ok(()) => Ok(true),
            // Another agent added it at the same moment.
            Err(e) if errno(&e) == Some(EEXIST) => Ok(false),
            Err(e) => Err(nl_error(
                e,
                format!(
                    "adding {} policy rule `not fwmark {:#x} lookup {}`",
                    if key.ipv6 { "IPv6" } else { "IPv4" },
                    key.mark,
                    key.table
                ),
            )),
        }
    }

    /// Removes the rule `key` unless ztna routes of another device (another agent) are still in
    /// its table. Call after removing this agent's routes. Returns whether it removed one.
    pub(crate) async fn remove_rule_if_unused(&self, key: RuleKey) -> anyhow::Result<bool> {
        let in_use = self
            .handle
            .route()
            .get(ip_version(key.ipv6))
            .execute()
            .try_collect::<Vec<RouteMessage>>()
            .await
            .map_err(|e| nl_error(e, "listing routes".into()))?
            .iter()
            .any(|m| route_key(m, key.table).is_some());
        if in_use {
            return Ok(false);
        }
        let mut removed = false;
        for (k, msg) in self.our_rules(key.ipv6).await? {
            if k != key {
                continue;
            }
            match self.handle.rule().del(msg).execute().await {
                Ok(()) => removed = true,
                Err(e) if errno(&e) == Some(libc::ENOENT) => {}
                Err(e) => return Err(nl_error(e, "removing the policy rule".into())),
            }
        }
        Ok(removed)
    }

    /// The link named `name`, if there is one.
    pub(crate) async fn link_by_name(&self, name: &str) -> anyhow::Result<Option<LinkMessage>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
            Err(e) => Err(nl_error(e, format!("looking up link {name}"))),
        }
    }

    /// Deletes a leftover link named `name` (a persistent TUN device from an earlier run, or one
    /// made with `ip tuntap add`). Refuses to delete a link that is not a TUN device. Returns
    /// whether one was deleted.
    pub(crate) async fn remove_stale_link(&self, name: &str) -> anyhow::Result<bool> {
        let Some(link) = self.link_by_name(name).await? else {
            return Ok(false);
        };
        let is_tun = link.attributes.iter().any(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos
                .iter()
                .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Tun))),
            _ => false,
        });
        if !is_tun {
            anyhow::bail!(
                "a link named {name} exists and is not a TUN device; refusing to delete it (choose another `tun` name)"
            );
        }
        tracing::warn!(
            tun = name,
            index = link.header.index,
            "deleting a leftover TUN device"
        );
        self.delete_link(link.header.index, name).await?;
        Ok(true)
    }

    /// Deletes link `index` (named `name`, for messages). A link that is already gone is fine.
    pub(crate) async fn delete_link(&self, index: u32, name: &str) -> anyhow::Result<()> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(()),
            Err(e) => Err(nl_error(e, format!("deleting link {name}"))),
        }
    }

    /// Sets the MTU of link `index` and brings it up.
    pub(crate) async fn set_mtu_up(&self, index: u32, name: &str, mtu: u16) -> anyhow::Result<()> {
        self.handle
            .link()
            .set(index)
            .mtu(u32::from(mtu))
            .up()
            .execute()
            .await
            .map_err(|e| nl_error(e, format!("setting MTU {mtu} on {name} and bringing it up")))
    }

    /// Makes the device's addresses and the routes match `state`: first the addresses (the
    /// routes name them as their source), then the routes.
    pub(crate) async fn apply(&self, state: &TunnelState, ifindex: u32) -> anyhow::Result<Changes> {
        self.sync_address(ifindex, false, state.tunnel_ip.map(IpAddr::V4))
            .await?;
        if self.ipv6 {
            self.sync_address(ifindex, true, state.tunnel_ipv6().map(IpAddr::V6))
                .await?;
        }
        self.sync_routes(ifindex, &desired_routes(state, ifindex, self.ipv6))
            .await
    }

    /// The routes `state` asks for, with this socket's IPv6 setting.
    pub(crate) fn desired_routes(&self, state: &TunnelState, ifindex: u32) -> BTreeSet<RouteKey> {
        desired_routes(state, ifindex, self.ipv6)
    }

    /// The addresses of link `ifindex` of one family, with their prefix lengths.
    async fn addresses(&self, ifindex: u32, ipv6: bool) -> anyhow::Result<Vec<(IpAddr, u8)>> {
        let family = if ipv6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(ifindex)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_error(e, "listing addresses".into()))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.family == family)
            .filter_map(|m| {
                let local = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(v) => Some(*v),
                    _ => None,
                });
                let address = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(v) => Some(*v),
                    _ => None,
                });
                local.or(address).map(|a| (a, m.header.prefix_len))
            })
            .collect())
    }

    /// Gives link `ifindex` exactly the address `want` of one family (IPv6 with `ipv6`), or
    /// none of it: an IPv4 address as a `/32`, an IPv6 one as a `/128` without duplicate
    /// address detection.
    async fn sync_address(
        &self,
        ifindex: u32,
        ipv6: bool,
        want: Option<IpAddr>,
    ) -> anyhow::Result<()> {
        let installed = self.addresses(ifindex, ipv6).await?;
        let diff = diff_addresses(want, &installed);
        if let Some(ip) = diff.add {
            let prefix = host_prefix(ip);
            let mut req = self.handle.address().add(ifindex, ip, prefix);
            let msg = req.message_mut();
            if ipv6 {
                msg.header.flags.push(AddressHeaderFlag::Nodad);
                msg.attributes
                    .push(AddressAttribute::Flags(vec![AddressFlag::Nodad]));
            } else {
                // A /32 has no broadcast address; rtnetlink would set it to the address itself.
                msg.attributes
                    .retain(|a| !matches!(a, AddressAttribute::Broadcast(_)));
            }
            req.replace().execute().await.map_err(|e| {
                let what = if ipv6 {
                    "IPv6 tunnel address"
                } else {
                    "tunnel IP"
                };
                nl_error(e, format!("assigning {what} {ip}/{prefix}"))
            })?;
            if ipv6 {
                tracing::info!(tunnel_ipv6 = %ip, "IPv6 tunnel address assigned");
            } else {
                tracing::info!(tunnel_ip = %ip, "tunnel address assigned");
            }
        }
        for i in diff.remove {
            let (ip, prefix) = installed[i];
            self.delete_address(ifindex, ip, prefix).await?;
            let what = if ipv6 {
                "IPv6 address"
            } else {
                "tunnel address"
            };
            tracing::info!(address = %format!("{ip}/{prefix}"), "old {what} removed");
        }
        Ok(())
    }

    async fn delete_address(&self, ifindex: u32, ip: IpAddr, prefix: u8) -> anyhow::Result<()> {
        let mut msgs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(ifindex)
            .set_address_filter(ip)
            .set_prefix_length_filter(prefix)
            .execute();
        while let Some(msg) = msgs
            .try_next()
            .await
            .map_err(|e| nl_error(e, "listing addresses".into()))?
        {
            match self.handle.address().del(msg).execute().await {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(EADDRNOTAVAIL) => {}
                Err(e) => return Err(nl_error(e, format!("removing address {ip}/{prefix}"))),
            }
        }
        Ok(())
    }

    /// Our routes (protocol [`RTPROT_ZTNA`], IPv4 and with IPv6 on IPv6, our table, through
    /// device `ifindex`), with their messages for deletion. Routes through other devices belong
    /// to other agents (another organisation's, say) and are never touched; ours on a dead
    /// device went with the device.
    async fn our_routes(&self, ifindex: u32) -> anyhow::Result<Vec<(RouteKey, RouteMessage)>> {
        let mut msgs: Vec<RouteMessage> = Vec::new();
        for &v6 in self.versions() {
            let mut got: Vec<RouteMessage> = self
                .handle
                .route()
                .get(ip_version(v6))
                .execute()
                .try_collect()
                .await
                .map_err(|e| nl_error(e, "listing routes".into()))?;
            msgs.append(&mut got);
        }
        Ok(msgs
            .into_iter()
            .filter_map(|m| route_key(&m, self.table).map(|k| (k, m)))
            .filter(|(k, _)| k.oif == Some(ifindex))
            .collect())
    }

    /// Makes our routes exactly `desired`: deletes the others first (a stale route to the same
    /// destination would block the new one), then adds what is missing. Routes of other
    /// protocols are never touched; if one is in the way, adding ours fails and is reported.
    pub(crate) async fn sync_routes(
        &self,
        ifindex: u32,
        desired: &BTreeSet<RouteKey>,
    ) -> anyhow::Result<Changes> {
        let installed = self.our_routes(ifindex).await?;
        let keys: Vec<RouteKey> = installed.iter().map(|(k, _)| *k).collect();
        let diff = diff_routes(desired, &keys);
        let mut changes = Changes {
            routes: desired.len(),
            ..Changes::default()
        };
        let mut failed = None;
        for i in diff.remove {
            let (key, msg) = &installed[i];
            match self.handle.route().del(msg.clone()).execute().await {
                Ok(()) => {
                    tracing::debug!(dst = %key.dst, prefix = key.prefix_len, "route removed");
                    changes.removed += 1;
                }
                Err(e) if errno(&e) == Some(ESRCH) => {}
                Err(e) => {
                    let e = nl_error(
                        e,
                        format!("removing route to {}/{}", key.dst, key.prefix_len),
                    );
                    tracing::warn!(error = %format!("{e:#}"), "route not removed");
                    failed.get_or_insert(e);
                }
            }
        }
        for key in diff.add {
            match self.add_route(&key).await {
                Ok(()) => {
                    tracing::debug!(dst = %key.dst, "route added");
                    changes.added += 1;
                }
                Err(e) => {
                    let e = if errno(&e) == Some(EEXIST) {
                        anyhow!(
                            "adding route to {}/{}: another route to this address exists (not one of ztna's); remove it to reach the service through the tunnel",
                            key.dst, key.prefix_len
                        )
                    } else {
                        nl_error(e, format!("adding route to {}/{}", key.dst, key.prefix_len))
                    };
                    tracing::warn!(error = %format!("{e:#}"), "route not added");
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(changes),
        }
    }

    async fn add_route(&self, key: &RouteKey) -> Result<(), rtnetlink::Error> {
        let req = self
            .handle
            .route()
            .add()
            .table_id(self.table)
            .protocol(RouteProtocol::Other(RTPROT_ZTNA));
        let req = match key.oif {
            Some(oif) => req.output_interface(oif),
            None => req,
        };
        match key.dst {
            IpAddr::V4(dst) => {
                let mut req = req
                    .scope(RouteScope::Link)
                    .v4()
                    .destination_prefix(dst, key.prefix_len);
                if let Some(IpAddr::V4(src)) = key.src {
                    req = req.pref_source(src);
                }
                req.execute().await
            }
            IpAddr::V6(dst) => {
                let mut req = req.v6().destination_prefix(dst, key.prefix_len);
                if let Some(IpAddr::V6(src)) = key.src {
                    req = req.pref_source(src);
                }
                req.execute().await
            }
        }
    }
}

/// Marks a rule as ztna's: `not fwmark MARK/0xffffffff`, protocol [`RTPROT_ZTNA`].
fn ours(msg: &mut RuleMessage) {
    msg.header.flags.push(RuleFlag::Invert);
    msg.attributes.push(RuleAttribute::FwMask(u32::MAX));
    msg.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::Other(RTPROT_ZTNA)));
}

/// The key of a route message if it is one of ours (protocol [`RTPROT_ZTNA`], `table`).
fn route_key(m: &RouteMessage, table: u32) -> Option<RouteKey> {
    let route_table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table));
    let unspecified = match m.header.address_family {
        AddressFamily::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    if m.header.protocol != RouteProtocol::Other(RTPROT_ZTNA) || route_table != table {
        return None;
    }
    let mut key = RouteKey {
        dst: unspecified,
        prefix_len: m.header.destination_prefix_length,
        oif: None,
        src: None,
    };
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => key.dst = IpAddr::V4(*d),
            RouteAttribute::Destination(RouteAddress::Inet6(d)) => key.dst = IpAddr::V6(*d),
            RouteAttribute::Oif(i) => key.oif = Some(*i),
            RouteAttribute::PrefSource(RouteAddress::Inet(s)) => key.src = Some(IpAddr::V4(*s)),
            RouteAttribute::PrefSource(RouteAddress::Inet6(s)) => key.src = Some(IpAddr::V6(*s)),
            _ => {}
        }
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztna_proto::ServiceDef;

    fn svc(name: &str, address: [u8; 4]) -> ServiceDef {
        ServiceDef {
            name: name.into(),
            address: address.into(),
            address6: None,
            udp: vec![],
            tcp: vec![],
            icmp: true,
            connector: "c1".into(),
            names: None,
        }
    }

    fn route(dst: [u8; 4], oif: u32, src: [u8; 4]) -> RouteKey {
        RouteKey {
            dst: dst.into(),
            prefix_len: 32,
            oif: Some(oif),
            src: Some(src.into()),
        }
    }

    #[test]
    fn no_routes_before_the_tunnel_ip() {
        let st = TunnelState {
            tunnel_ip: None,
            services: vec![svc("web", [10, 100, 0, 1])],
        };
        assert!(desired_routes(&st, 7, true).is_empty());
    }

    #[test]
    fn one_route_per_distinct_sane_address() {
        let st = TunnelState {
            tunnel_ip: Some([100, 64, 0, 2].into()),
            services: vec![
                svc("web", [10, 100, 0, 1]),
                svc("web-alt", [10, 100, 0, 1]),
                svc("db", [10, 100, 0, 2]),
                svc("bad", [0, 0, 0, 0]),
                svc("lo", [127, 0, 0, 1]),
                svc("mc", [224, 0, 0, 1]),
                svc("self", [100, 64, 0, 2]),
            ],
        };
        let want: BTreeSet<_> = [
            route([10, 100, 0, 1], 7, [100, 64, 0, 2]),
            route([10, 100, 0, 2], 7, [100, 64, 0, 2]),
        ]
        .into();
        assert_eq!(desired_routes(&st, 7, true), want);
    }

    #[test]
    fn route_diff() {
        let a = route([10, 100, 0, 1], 7, [100, 64, 0, 2]);
        let b = route([10, 100, 0, 2], 7, [100, 64, 0, 2]);
        let c = route([10, 100, 0, 3], 7, [100, 64, 0, 2]);
        let desired: BTreeSet<_> = [a, b].into();

        // Nothing installed: add everything, in order.
        assert_eq!(
            diff_routes(&desired, &[]),
            RouteDiff {
                add: vec![a, b],
                remove: vec![]
            }
        );
        // Already right: nothing to do.
        assert_eq!(diff_routes(&desired, &[b, a]), RouteDiff::default());
        // A service left, one came: remove c, add b.
        assert_eq!(
            diff_routes(&desired, &[a, c]),
            RouteDiff {
                add: vec![b],
                remove: vec![1]
            }
        );
        // Stale routes from a crashed run (old device index, old source), and a duplicate.
        let stale_dev = route([10, 100, 0, 1], 3, [100, 64, 0, 2]);
        let stale_src = route([10, 100, 0, 2], 7, [100, 64, 0, 9]);
        assert_eq!(
            diff_routes(&desired, &[stale_dev, a, stale_src, a]),
            RouteDiff {
                add: vec![b],
                remove: vec![0, 2, 3]
            }
        );
        // Wrong prefix length is not ours to keep.
        let wide = RouteKey {
            prefix_len: 24,
            ..a
        };
        assert_eq!(
            diff_routes(&desired, &[wide, b]),
            RouteDiff {
                add: vec![a],
                remove: vec![0]
            }
        );
        // Shutdown: everything goes.
        assert_eq!(
            diff_routes(&BTreeSet::new(), &[a, b, c]),
            RouteDiff {
                add: vec![],
                remove: vec![0, 1, 2]
            }
        );
    }

    #[test]
    fn address_diff() {
        let ip1: IpAddr = [100, 64, 0, 2].into();
        let ip2: IpAddr = [100, 64, 0, 3].into();
        assert_eq!(diff_addresses(None, &[]), AddrDiff::default());
        assert_eq!(
            diff_addresses(Some(ip1), &[]),
            AddrDiff {
                add: Some(ip1),
                remove: vec![]
            }
        );
        assert_eq!(diff_addresses(Some(ip1), &[(ip1, 32)]), AddrDiff::default());
        // The relay assigned a new address: add it, drop the old one.
        assert_eq!(
            diff_addresses(Some(ip2), &[(ip1, 32)]),
            AddrDiff {
                add: Some(ip2),
                remove: vec![0]
            }
        );
        // Someone added a wider address to our device: it goes, ours stays.
        assert_eq!(
            diff_addresses(Some(ip1), &[(ip1, 24), (ip1, 32)]),
            AddrDiff {
                add: None,
                remove: vec![0]
            }
        );
        assert_eq!(
            diff_addresses(None, &[(ip1, 32)]),
            AddrDiff {
                add: None,
                remove: vec![0]
            }
        );
    }

    #[test]
    fn rule_messages_are_recognised_as_ours() {
        let mut m = RuleMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.flags.push(RuleFlag::Invert);
        m.attributes = vec![
            RuleAttribute::Table(0x7a7a),
            RuleAttribute::FwMark(0x7a7a),
            RuleAttribute::Priority(RULE_PRIORITY),
            RuleAttribute::Protocol(RouteProtocol::Other(RTPROT_ZTNA)),
        ];
        assert_eq!(
            rule_key(&m),
            Some(RuleKey {
                ipv6: false,
                table: 0x7a7a,
                mark: 0x7a7a,
                priority: RULE_PRIORITY
            })
        );
        let mut other = m.clone();
        other.attributes.pop();
        assert_eq!(rule_key(&other), None, "another program's rule");
    }

    #[test]
    fn route_messages_are_recognised_as_ours() {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.table = 254;
        m.header.protocol = RouteProtocol::Other(RTPROT_ZTNA);
        m.header.destination_prefix_length = 32;
        m.attributes = vec![
            RouteAttribute::Destination(RouteAddress::Inet([10, 100, 0, 1].into())),
            RouteAttribute::Oif(7),
            RouteAttribute::PrefSource(RouteAddress::Inet([100, 64, 0, 2].into())),
        ];
        assert_eq!(
            route_key(&m, 254),
            Some(route([10, 100, 0, 1], 7, [100, 64, 0, 2]))
        );
        let mut other = m.clone();
        other.header.protocol = RouteProtocol::Static;
        assert_eq!(route_key(&other, 254), None);
        let mut other = m.clone();
        other.header.table = 100;
        assert_eq!(route_key(&other, 254), None);
        let mut other = m;
        other.attributes.push(RouteAttribute::Table(0x7a7a));
        assert_eq!(route_key(&other, 254), None);
        assert!(route_key(&other, 0x7a7a).is_some());
    }

    fn svc6(name: &str, address: [u8; 4], v6: &str) -> ServiceDef {
        ServiceDef {
            address6: Some(v6.parse().unwrap()),
            ..svc(name, address)
        }
    }

    fn route6(dst: &str, prefix_len: u8, oif: u32, src: &str) -> RouteKey {
        RouteKey {
            dst: dst.parse().unwrap(),
            prefix_len,
            oif: Some(oif),
            src: Some(src.parse().unwrap()),
        }
    }

    #[test]
    fn ipv6_routes_from_the_ipv6_tunnel_address_alongside_ipv4_ones() {
        let own6 = "fd7a:7a74:6e61:7475::6440:2";
        let mut wiki = svc6("wiki", [10, 101, 0, 0], "fd00:9::100");
        wiki.names = Some(ztna_proto::NamePool {
            patterns: vec!["*.corp.example".into()],
            prefix_len: 24,
        });
        let st = TunnelState {
            tunnel_ip: Some([100, 64, 0, 2].into()),
            services: vec![
                svc6("web", [10, 100, 0, 1], "fd00:9::1"),
                svc6("web-alt", [10, 100, 0, 1], "fd00:9::1"),
                svc("v4-only", [10, 100, 0, 2]),
                wiki,
                svc6("lo", [10, 100, 0, 3], "::1"),
                svc6("ll", [10, 100, 0, 4], "fe80::1"),
                svc6("mc", [10, 100, 0, 5], "ff02::1"),
                svc6("self", [10, 100, 0, 6], own6),
            ],
        };
        let v4 = |last: u8, len: u8| RouteKey {
            prefix_len: len,
            ..route([10, 100, 0, last], 7, [100, 64, 0, 2])
        };
        let want: BTreeSet<_> = [
            v4(1, 32),
            v4(2, 32),
            RouteKey {
                prefix_len: 24,
                ..route([10, 101, 0, 0], 7, [100, 64, 0, 2])
            },
            v4(3, 32),
            v4(4, 32),
            v4(5, 32),
            v4(6, 32),
            route6("fd00:9::1", 128, 7, own6),
            route6("fd00:9::100", 120, 7, own6),
        ]
        .into();
        assert_eq!(desired_routes(&st, 7, true), want);
        // IPv6 off: the IPv4 routes alone.
        let v4_only: BTreeSet<_> = want.iter().filter(|r| r.dst.is_ipv4()).copied().collect();
        assert_eq!(desired_routes(&st, 7, false), v4_only);
        // The catalog drops the IPv6 address of web: its route goes, the IPv4 one stays.
        let mut fewer = st.clone();
        fewer.services[0].address6 = None;
        fewer.services[1].address6 = None;
        let installed: Vec<RouteKey> = want.iter().copied().collect();
        let diff = diff_routes(&desired_routes(&fewer, 7, true), &installed);
        assert!(diff.add.is_empty());
        assert_eq!(
            diff.remove
                .iter()
                .map(|&i| installed[i])
                .collect::<Vec<_>>(),
            vec![route6("fd00:9::1", 128, 7, own6)]
        );
        // Nothing before the tunnel IP.
        let early = TunnelState {
            tunnel_ip: None,
            ..st
        };
        assert!(desired_routes(&early, 7, true).is_empty());
    }

    #[test]
    fn ipv6_address_diff() {
        let own: IpAddr = "fd7a:7a74:6e61:7475::6440:2".parse().unwrap();
        let ll: IpAddr = "fe80::1".parse().unwrap();
        assert_eq!(
            diff_addresses(Some(own), &[]),
            AddrDiff {
                add: Some(own),
                remove: vec![]
            }
        );
        assert_eq!(
            diff_addresses(Some(own), &[(own, 128)]),
            AddrDiff::default()
        );
        // A link-local address the kernel made anyway, or a wider one: they go.
        assert_eq!(
            diff_addresses(Some(own), &[(ll, 64), (own, 64), (own, 128)]),
            AddrDiff {
                add: None,
                remove: vec![0, 1]
            }
        );
    }

    #[test]
    fn ipv6_route_and_rule_messages_are_recognised_as_ours() {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet6;
        m.header.table = 254;
        m.header.protocol = RouteProtocol::Other(RTPROT_ZTNA);
        m.header.destination_prefix_length = 120;
        m.attributes = vec![
            RouteAttribute::Destination(RouteAddress::Inet6("fd00:9::100".parse().unwrap())),
            RouteAttribute::Oif(7),
            RouteAttribute::PrefSource(RouteAddress::Inet6(
                "fd7a:7a74:6e61:7475::6440:2".parse().unwrap(),
            )),
        ];
        assert_eq!(
            route_key(&m, 254),
            Some(route6("fd00:9::100", 120, 7, "fd7a:7a74:6e61:7475::6440:2"))
        );
        let mut r = RuleMessage::default();
        r.header.family = AddressFamily::Inet6;
        r.attributes = vec![
            RuleAttribute::Table(0x7a7a),
            RuleAttribute::FwMark(0x7a7a),
            RuleAttribute::Priority(RULE_PRIORITY),
            RuleAttribute::Protocol(RouteProtocol::Other(RTPROT_ZTNA)),
        ];
        assert_eq!(
            rule_key(&r),
            Some(RuleKey {
                ipv6: true,
                table: 0x7a7a,
                mark: 0x7a7a,
                priority: RULE_PRIORITY
            })
        );
    }

    /// The whole IPv6 setup against the real kernel, in a network namespace of its own: the
    /// quiet sysctls, the /128 without DAD, the IPv6 rule and routes, and their removal. Needs
    /// root and a kernel with IPv6 (CI runs tests as root); without them it passes without
    /// checking anything, and says so. The namespace is the test thread's own (unshare), not a
    /// named one: it, the device, the rules and the routes go away when the thread and the
    /// commands it starts end.
    #[test]
    fn kernel_accepts_the_ipv6_setup() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("kernel_accepts_the_ipv6_setup: skipped, needs root (CAP_NET_ADMIN)");
            return;
        }
        if !std::path::Path::new("/proc/sys/net/ipv6").exists() {
            eprintln!("kernel_accepts_the_ipv6_setup: skipped, the kernel has no IPv6");
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: unshare affects only this thread, which owns everything below.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let tun = crate::tun::create("ztna6t").unwrap();
                assert!(tun.offload, "the kernel takes the TUN device's offloads");
                assert!(crate::tun::prepare_ipv6(&tun.name, 1280));
                let nl = Netlink::connect(0x7a7a).unwrap().with_ipv6(true);
                nl.set_mtu_up(tun.index, &tun.name, 1280).await.unwrap();
                for ipv6 in [false, true] {
                    let rule = RuleKey {
                        ipv6,
                        table: 0x7a7a,
                        mark: 0x7a7a,
                        priority: RULE_PRIORITY,
                    };
                    assert!(nl.ensure_rule(rule).await.unwrap());
                    assert!(!nl.ensure_rule(rule).await.unwrap(), "found again");
                }
                let mut wiki = svc6("wiki", [10, 101, 0, 0], "fd00:9::100");
                wiki.names = Some(ztna_proto::NamePool {
                    patterns: vec!["*.corp.example".into()],
                    prefix_len: 24,
                });
                let st = TunnelState {
                    tunnel_ip: Some([100, 64, 0, 2].into()),
                    services: vec![svc6("web", [10, 100, 0, 1], "fd00:9::1"), wiki],
                };
                let c = nl.apply(&st, tun.index).await.unwrap();
                assert_eq!((c.added, c.routes), (4, 4));
                assert_eq!(nl.apply(&st, tun.index).await.unwrap().added, 0);
                let v6 = nl.addresses(tun.index, true).await.unwrap();
                assert_eq!(
                    v6,
                    vec![("fd7a:7a74:6e61:7475::6440:2".parse().unwrap(), 128)],
                    "the tunnel address and no link-local one"
                );
                let routes = nl.our_routes(tun.index).await.unwrap();
                let keys: BTreeSet<RouteKey> = routes.iter().map(|(k, _)| *k).collect();
                assert_eq!(keys, desired_routes(&st, tun.index, true));
                // The kernel routes a service's IPv6 address into the device from the address.
                let out = std::process::Command::new("ip")
                    .args(["-6", "route", "get", "fd00:9::107"])
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(
                    text.contains("dev ztna6t") && text.contains("fd7a:7a74:6e61:7475::6440:2"),
                    "{text}"
                );
                let out = std::process::Command::new("ip")
                    .args(["-6", "addr", "show", "dev", "ztna6t"])
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(
                    !text.contains("tentative") && !text.contains("fe80"),
                    "{text}"
                );
                // What the kernel writes into the device: a ping to a service's IPv6 address
                // from the IPv6 tunnel address, which the core's check lets through, and
                // otherwise only link chatter, which it drops quietly.
                let ping = std::process::Command::new("ping")
                    .args(["-6", "-n", "-c", "1", "-W", "1", "fd00:9::1"])
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap();
                let own: Ipv6Addr = "fd7a:7a74:6e61:7475::6440:2".parse().unwrap();
                // Read as the agent reads: through the device's offload header.
                let mut reader = crate::tun::Reader::new();
                let (mut echo, mut chatter) = (0, Vec::<Vec<u8>>::new());
                let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
                while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, reader.read(&tun.dev)).await
                {
                    assert_eq!(n, 1, "one packet per read without TSO");
                    let p = reader.packet(0);
                    if p[0] >> 4 != 6 {
                        continue;
                    }
                    match ztna_core::outbound::classify6(p, Some(own)) {
                        Ok(x) => {
                            assert_eq!(x.dst, "fd00:9::1".parse::<Ipv6Addr>().unwrap());
                            assert_eq!(x.want, ztna_core::outbound::Want::Echo);
                            echo += 1;
                        }
                        Err(why) => {
                            assert_eq!(why, ztna_core::outbound::OutboundDrop::Local, "{p:02x?}");
                            chatter.push(p.to_vec());
                        }
                    }
                }
                let _ = ping.wait_with_output();
                assert_eq!(echo, 1);
                eprintln!("link chatter into the device: {chatter:02x?}");
                let c = nl.sync_routes(tun.index, &BTreeSet::new()).await.unwrap();
                assert_eq!(c.removed, 4);
                for ipv6 in [false, true] {
                    let rule = RuleKey {
                        ipv6,
                        table: 0x7a7a,
                        mark: 0x7a7a,
                        priority: RULE_PRIORITY,
                    };
                    assert!(nl.remove_rule_if_unused(rule).await.unwrap());
                }
            });
        })
        .join()
        .unwrap();
    }
}
