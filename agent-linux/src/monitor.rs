//! Watches the host's network over rtnetlink and tells the tunnel core when it changed.
//!
//! An address that comes or goes on another interface, a link that goes up or down, or a
//! change of the main table's default route (Wi-Fi to Ethernet, a new DHCP lease, a VPN of
//! someone else's) makes every direct-path driver gather its host candidates again and send
//! them at once ([`Agent::network_changed`]), instead of at the next periodic refresh. Changes
//! the agent makes itself (its TUN device, its routes in its own table, its policy rule) are
//! not news. Bursts (one change often brings several messages) are coalesced over
//! [`SETTLE`].
//!
//! Which messages matter is pure ([`relevant`]); [`watch`] is the I/O. A failure to subscribe
//! is logged and leaves the periodic refresh to do the job: it never stops the agent.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::route::RouteMessage;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::AsyncSocket as _;
use rtnetlink::constants::{
    RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE, RTMGRP_LINK,
};
use ztna_core::agent::Agent;
use ztna_core::daemon::AbortOnDrop;

use crate::netlink::RTPROT_ZTNA;

/// How long a burst of changes may take before the core hears of it (once).
pub(crate) const SETTLE: Duration = Duration::from_millis(300);

/// The kernel's main routing table.
const RT_TABLE_MAIN: u8 = 254;

/// Whether `msg` is a change of the host's network that the tunnel should react to. `tun_index`
/// is the agent's own device.
pub(crate) fn relevant(msg: &RouteNetlinkMessage, tun_index: u32) -> bool {
    match msg {
        RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a) => {
            a.header.index != tun_index
        }
        RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l) => {
            l.header.index != tun_index
        }
        RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => default_route(r),
        _ => false,
    }
}

/// A default route of the main table that someone else manages.
fn default_route(r: &RouteMessage) -> bool {
    r.header.destination_prefix_length == 0
        && r.header.table == RT_TABLE_MAIN
        && u8::from(r.header.protocol) != RTPROT_ZTNA
}

/// Runs until the agent is dropped; never returns an error (see the module docs).
pub(crate) async fn watch(agent: Arc<Agent>, tun_index: u32) -> anyhow::Result<()> {
    let groups = RTMGRP_LINK
        | RTMGRP_IPV4_IFADDR
        | RTMGRP_IPV6_IFADDR
        | RTMGRP_IPV4_ROUTE
        | RTMGRP_IPV6_ROUTE;
    let subscribed = rtnetlink::new_connection().and_then(|(mut conn, handle, messages)| {
        conn.socket_mut()
            .socket_mut()
            .bind(&netlink_sys::SocketAddr::new(0, groups))?;
        Ok((conn, handle, messages))
    });
    let (conn, _handle, mut messages) = match subscribed {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the network over netlink; host candidates are refreshed periodically only");
            return std::future::pending().await;
        }
    };
    let _conn = AbortOnDrop(tokio::spawn(conn));
    tracing::debug!("watching the network for changes");
    let is_news = |m: &netlink_packet_core::NetlinkMessage<RouteNetlinkMessage>| matches!(&m.payload, NetlinkPayload::InnerMessage(msg) if relevant(msg, tun_index));
    // The messages arrive on an unbounded channel (rtnetlink's); this loop drains it at once,
    // so it holds at most what the kernel sent since the last wake.
    while let Some((msg, _)) = messages.next().await {
        if !is_news(&msg) {
            continue;
        }
        let settle = tokio::time::sleep(SETTLE);
        tokio::pin!(settle);
        let mut more = 0u32;
        loop {
            tokio::select! {
                () = &mut settle => break,
                m = messages.next() => match m {
                    Some((m, _)) => more += u32::from(is_news(&m)),
                    None => break,
                },
            }
        }
        tracing::debug!(changes = more + 1, "host network changed");
        agent.network_changed();
    }
    tracing::warn!("the netlink watch ended; host candidates are refreshed periodically only");
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::address::AddressMessage;
    use netlink_packet_route::link::LinkMessage;
    use netlink_packet_route::route::RouteProtocol;
    use netlink_packet_route::rule::RuleMessage;

    use super::*;

    const TUN: u32 = 7;

    fn addr(index: u32) -> AddressMessage {
        let mut a = AddressMessage::default();
        a.header.index = index;
        a
    }

    fn link(index: u32) -> LinkMessage {
        let mut l = LinkMessage::default();
        l.header.index = index;
        l
    }

    fn route(prefix: u8, table: u8, protocol: RouteProtocol) -> RouteMessage {
        let mut r = RouteMessage::default();
        r.header.destination_prefix_length = prefix;
        r.header.table = table;
        r.header.protocol = protocol;
        r
    }

    #[test]
    fn other_interfaces_and_default_routes_are_news() {
        use RouteNetlinkMessage as M;
        assert!(relevant(&M::NewAddress(addr(2)), TUN));
        assert!(relevant(&M::DelAddress(addr(2)), TUN));
        assert!(relevant(&M::NewLink(link(2)), TUN));
        assert!(relevant(&M::DelLink(link(3)), TUN));
        assert!(relevant(
            &M::NewRoute(route(0, RT_TABLE_MAIN, RouteProtocol::Dhcp)),
            TUN
        ));
        assert!(relevant(
            &M::DelRoute(route(0, RT_TABLE_MAIN, RouteProtocol::Boot)),
            TUN
        ));
    }

    #[test]
    fn the_agents_own_changes_are_not() {
        use RouteNetlinkMessage as M;
        // Its device's address and link state.
        assert!(!relevant(&M::NewAddress(addr(TUN)), TUN));
        assert!(!relevant(&M::NewLink(link(TUN)), TUN));
        assert!(!relevant(&M::DelLink(link(TUN)), TUN));
        // Its service routes (own table, own protocol), and even a default route it owned.
        assert!(!relevant(
            &M::NewRoute(route(32, 0, RouteProtocol::Other(RTPROT_ZTNA))),
            TUN
        ));
        assert!(!relevant(
            &M::NewRoute(route(0, RT_TABLE_MAIN, RouteProtocol::Other(RTPROT_ZTNA))),
            TUN
        ));
        // Its policy rule, and routes that are not the default.
        assert!(!relevant(&M::NewRule(RuleMessage::default()), TUN));
        assert!(!relevant(
            &M::NewRoute(route(24, RT_TABLE_MAIN, RouteProtocol::Kernel)),
            TUN
        ));
        assert!(!relevant(
            &M::NewRoute(route(0, 255, RouteProtocol::Kernel)),
            TUN
        ));
    }
}
