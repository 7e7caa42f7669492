//! What `NEPacketTunnelNetworkSettings` needs, derived from the core's [`TunnelState`]: pure, no
//! I/O. The tunnel thread serialises a [`NetworkSettings`] to JSON for the settings callback
//! whenever it changes (new tunnel IP, new catalog, a direct-path peer appears or goes).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};
use ztna_core::agent::TunnelState;
use ztna_core::outbound::IPV6_MIN_MTU;

/// One route: `address/prefix` (`subnet_mask` spelled out for IPv4, as `NEIPv4Route` takes it;
/// `None` for IPv6, which `NEIPv6Route` takes as `networkPrefixLength`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Route {
    /// Destination address.
    pub address: IpAddr,
    /// Prefix length.
    pub prefix: u8,
    /// Dotted subnet mask (IPv4 only).
    pub subnet_mask: Option<Ipv4Addr>,
}

impl Route {
    /// A host route (/32 or /128).
    pub fn host(address: IpAddr) -> Self {
        match address {
            IpAddr::V4(_) => Self {
                address,
                prefix: 32,
                subnet_mask: Some(Ipv4Addr::BROADCAST),
            },
            IpAddr::V6(_) => Self {
                address,
                prefix: 128,
                subnet_mask: None,
            },
        }
    }
}

/// DNS settings (`NEDNSSettings`): resolvers and the match domains they answer for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsSettings {
    /// Resolver addresses inside the tunnel.
    pub servers: Vec<IpAddr>,
    /// Only names under these domains go to them (split DNS).
    pub match_domains: Vec<String>,
}

/// Everything the extension applies with `setTunnelNetworkSettings`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSettings {
    /// `tunnelRemoteAddress`: the relay's IP.
    pub tunnel_remote_address: IpAddr,
    /// The tunnel IP the relay assigned (`NEIPv4Settings` address, mask 255.255.255.255).
    pub ipv4_address: Ipv4Addr,
    /// The IPv6 tunnel address derived from it (`NEIPv6Settings` address, prefix length 128);
    /// `None` when the MTU is below 1280 (the tunnel then carries IPv4 only).
    pub ipv6_address: Option<Ipv6Addr>,
    /// The tunnel MTU.
    pub mtu: u16,
    /// One route per allowed service address (a name service: its pool), IPv4 ones with a
    /// `subnet_mask`, and with IPv6 on, one per service IPv6 address (or pool) without.
    pub included_routes: Vec<Route>,
    /// Addresses that must never enter the tunnel: the relay and the direct-path peers.
    pub excluded_routes: Vec<Route>,
    /// DNS settings: the agent's DNS server on the tunnel IP and the match domains of its name
    /// services; `None` when there are none.
    pub dns: Option<DnsSettings>,
}

/// The settings for `state`, or `None` while the tunnel has no IP yet (the extension cannot
/// configure an interface without an address). IPv6 (address and routes) only with an `mtu`
/// of at least [`IPV6_MIN_MTU`]. Routes are sorted and deduplicated so that equal
/// inputs give equal settings and the callback fires only on a real change.
pub fn network_settings(
    state: &TunnelState,
    relays: &[SocketAddr],
    mtu: u16,
    direct_peers: &[IpAddr],
    dns_domains: &[String],
) -> Option<NetworkSettings> {
    let ip = state.tunnel_ip?;
    let relay = relays.first()?;
    let ip6 = state.tunnel_ipv6().filter(|_| mtu >= IPV6_MIN_MTU);
    let v6_routes = state
        .services
        .iter()
        .filter(|_| ip6.is_some())
        .filter_map(|s| s.prefix6())
        .filter(|net| !ip6.is_some_and(|own| net.contains(&own)))
        .map(|net| Route {
            address: IpAddr::V6(net.network()),
            prefix: net.prefix_len(),
            subnet_mask: None,
        });
    let mut included: Vec<Route> = state
        .services
        .iter()
        .map(|s| {
            // A name service routes its whole pool of virtual addresses.
            let net = s.prefix();
            Route {
                address: IpAddr::V4(net.network()),
                prefix: net.prefix_len(),
                subnet_mask: Some(net.netmask()),
            }
        })
        .chain(v6_routes)
        .collect();
    included.sort();
    included.dedup();
    let mut excluded: Vec<Route> = relays
        .iter()
        .map(|r| r.ip())
        .chain(direct_peers.iter().copied())
        .map(Route::host)
        .collect();
    excluded.sort();
    excluded.dedup();
    // A service address that is also the relay or a peer would capture the outer traffic: the
    // exclusion wins (the more specific or equal route is the excluded one on Apple too).
    included.retain(|r| !excluded.contains(r));
    Some(NetworkSettings {
        tunnel_remote_address: relay.ip(),
        ipv4_address: ip,
        ipv6_address: ip6,
        mtu,
        included_routes: included,
        excluded_routes: excluded,
        dns: (!dns_domains.is_empty()).then(|| DnsSettings {
            servers: vec![IpAddr::V4(ip)],
            match_domains: dns_domains.to_vec(),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztna_proto::ServiceDef;

    fn svc(name: &str, addr: [u8; 4]) -> ServiceDef {
        ServiceDef {
            name: name.into(),
            address: Ipv4Addr::from(addr),
            address6: None,
            udp: vec![],
            tcp: vec![],
            icmp: true,
            connector: "conn1".into(),
            names: None,
        }
    }

    const RELAY: &str = "10.10.0.1:4433";

    #[test]
    fn nothing_before_the_tunnel_ip() {
        let st = TunnelState {
            tunnel_ip: None,
            services: vec![svc("echo", [10, 100, 0, 1])],
        };
        assert_eq!(
            network_settings(&st, &[RELAY.parse().unwrap()], 1280, &[], &[]),
            None
        );
    }

    #[test]
    fn one_route_per_service_relay_and_peers_excluded() {
        let st = TunnelState {
            tunnel_ip: Some(Ipv4Addr::new(100, 64, 0, 2)),
            services: vec![
                svc("web", [10, 100, 0, 4]),
                svc("echo", [10, 100, 0, 1]),
                svc("echo-again", [10, 100, 0, 1]),
            ],
        };
        let peer: IpAddr = "10.10.0.3".parse().unwrap();
        let s = network_settings(&st, &[RELAY.parse().unwrap()], 1280, &[peer, peer], &[]).unwrap();
        assert_eq!(s.ipv4_address, Ipv4Addr::new(100, 64, 0, 2));
        assert_eq!(
            s.tunnel_remote_address,
            "10.10.0.1".parse::<IpAddr>().unwrap()
        );
        let inc: Vec<String> = s
            .included_routes
            .iter()
            .map(|r| r.address.to_string())
            .collect();
        assert_eq!(inc, ["10.100.0.1", "10.100.0.4"]);
        let exc: Vec<String> = s
            .excluded_routes
            .iter()
            .map(|r| r.address.to_string())
            .collect();
        assert_eq!(exc, ["10.10.0.1", "10.10.0.3"]);
        assert!(s
            .included_routes
            .iter()
            .all(|r| r.prefix == 32 && r.subnet_mask == Some(Ipv4Addr::BROADCAST)));
        assert_eq!(s.dns, None);
    }

    /// A catalog can never capture the relay's or a peer's address.
    #[test]
    fn a_service_on_the_relay_address_is_not_routed() {
        let st = TunnelState {
            tunnel_ip: Some(Ipv4Addr::new(100, 64, 0, 2)),
            services: vec![svc("evil", [10, 10, 0, 1]), svc("peer", [10, 10, 0, 3])],
        };
        let s = network_settings(
            &st,
            &[RELAY.parse().unwrap()],
            1280,
            &["10.10.0.3".parse().unwrap()],
            &[],
        )
        .unwrap();
        assert!(s.included_routes.is_empty(), "{s:?}");
    }

    /// Name services: the pool is routed, and the agent's DNS server on the tunnel IP gets the
    /// match domains (NEDNSSettings `matchDomains`).
    #[test]
    fn name_services_route_their_pool_and_set_dns() {
        let mut names = svc("wiki", [10, 101, 0, 0]);
        names.names = Some(ztna_proto::NamePool {
            patterns: vec!["*.corp.example".into()],
            prefix_len: 24,
        });
        let st = TunnelState {
            tunnel_ip: Some(Ipv4Addr::new(100, 64, 0, 2)),
            services: vec![names],
        };
        let s = network_settings(
            &st,
            &[RELAY.parse().unwrap()],
            1280,
            &[],
            &["corp.example".into()],
        )
        .unwrap();
        assert_eq!(
            s.included_routes,
            vec![Route {
                address: "10.101.0.0".parse().unwrap(),
                prefix: 24,
                subnet_mask: Some(Ipv4Addr::new(255, 255, 255, 0)),
            }]
        );
        assert_eq!(
            s.dns,
            Some(DnsSettings {
                servers: vec!["100.64.0.2".parse().unwrap()],
                match_domains: vec!["corp.example".into()],
            })
        );
    }

    #[test]
    fn ipv6_address_and_routes_with_an_mtu_of_at_least_1280() {
        let mut web = svc("web", [10, 100, 0, 4]);
        web.address6 = Some("fd00:9::4".parse().unwrap());
        let mut wiki = svc("wiki", [10, 101, 0, 0]);
        wiki.names = Some(ztna_proto::NamePool {
            patterns: vec!["*.corp.example".into()],
            prefix_len: 24,
        });
        wiki.address6 = Some("fd00:9::100".parse().unwrap());
        let st = TunnelState {
            tunnel_ip: Some(Ipv4Addr::new(100, 64, 0, 2)),
            services: vec![web, wiki, svc("v4-only", [10, 100, 0, 5])],
        };
        let relay = ["[2001:db8::1]:4433".parse().unwrap()];
        let s = network_settings(&st, &relay, 1280, &[], &[]).unwrap();
        assert_eq!(
            s.ipv6_address,
            Some("fd7a:7a74:6e61:7475::6440:2".parse().unwrap())
        );
        let v6: Vec<(String, u8, Option<Ipv4Addr>)> = s
            .included_routes
            .iter()
            .filter(|r| r.address.is_ipv6())
            .map(|r| (r.address.to_string(), r.prefix, r.subnet_mask))
            .collect();
        assert_eq!(
            v6,
            [
                ("fd00:9::4".to_owned(), 128, None),
                ("fd00:9::100".to_owned(), 120, None)
            ]
        );
        assert_eq!(s.included_routes.len(), 5);
        // The JSON the callback gets.
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["ipv6_address"], "fd7a:7a74:6e61:7475::6440:2");
        // A service IPv6 address on the relay is not routed either.
        let mut evil = svc("evil", [10, 100, 0, 9]);
        evil.address6 = Some("2001:db8::1".parse().unwrap());
        let st2 = TunnelState {
            services: vec![evil],
            ..st.clone()
        };
        let s2 = network_settings(&st2, &relay, 1280, &[], &[]).unwrap();
        assert!(
            s2.included_routes.iter().all(|r| r.address.is_ipv4()),
            "{s2:?}"
        );
        // Below 1280: IPv4 only.
        let small = network_settings(&st, &relay, 1279, &[], &[]).unwrap();
        assert_eq!(small.ipv6_address, None);
        assert!(small.included_routes.iter().all(|r| r.address.is_ipv4()));
    }

    #[test]
    fn ipv6_relay_is_excluded_as_a_host_route() {
        let st = TunnelState {
            tunnel_ip: Some(Ipv4Addr::new(100, 64, 0, 2)),
            services: vec![],
        };
        let s = network_settings(
            &st,
            &["[2001:db8::1]:4433".parse().unwrap()],
            1280,
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(s.excluded_routes[0].prefix, 128);
        assert_eq!(s.excluded_routes[0].subnet_mask, None);
    }
}
