//! Access policy and the service catalog, pure: which address (and ports) each service name
//! has, which agents may reach which services, and which connectors may serve which services.
//!
//! The policy owns the catalog. A connector announces the names it serves; the relay registers
//! an announcement only if policy lets that connector serve that name and the announcement
//! matches the policy's entry (same address; ports and protocols within what policy lists). A
//! policy is built with [`Policy::build`], which refuses a catalog whose entries overlap each
//! other, the tunnel pool, the relay's own addresses or a reserved range.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use ztna_core::tls::PeerIdentity;
use ztna_proto::control::{ErrorCode, Rejected};
use ztna_proto::names::DomainPattern;
use ztna_proto::service::NAME_POOL_PREFIX;
use ztna_proto::service::{check_name, escape_for_log, is_valid_name};
use ztna_proto::{NamePool, PortRange, ServiceDef};

/// Grants the agents matching `groups` or `identities` access to `services` (`"*"`: all).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// Service names, or `"*"`.
    pub services: Vec<String>,
    /// Agent certificate groups this rule applies to.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Agent identities this rule applies to.
    #[serde(default)]
    pub identities: Vec<String>,
}

/// Lets connector `identity` serve `services` (`"*"`: all).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorRule {
    /// The connector's certificate identity.
    pub identity: String,
    /// Service names, or `"*"`.
    pub services: Vec<String>,
}

fn unspecified() -> Ipv4Addr {
    Ipv4Addr::UNSPECIFIED
}

/// One `[[services]]` entry as configured: a service name and the address it has, or (a name
/// service) the DNS names it answers to and its pool of virtual addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRule {
    /// The service name connectors announce and access rules name.
    pub name: String,
    /// Its virtual IPv4 address. Only this address is ever registered for the name. Absent for
    /// a name service.
    #[serde(default = "unspecified")]
    pub address: Ipv4Addr,
    /// Its virtual IPv6 address, if it has one; for a name service, the first address of an
    /// IPv6 pool as large as `pool` (agents answer AAAA queries from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<Ipv6Addr>,
    /// A name service's DNS names: `wiki.corp.example` or `*.corp.example` (every name below
    /// the domain). Needs `pool` instead of `address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<Vec<String>>,
    /// A name service's pool of virtual addresses (`/16` to `/30`); agents answer each name with
    /// one address of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<Ipv4Net>,
    /// UDP ports (`"53"`, `"5000-5010"`) a connector may serve; absent: whatever it announces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<Vec<String>>,
    /// TCP ports a connector may serve; absent: whatever it announces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<Vec<String>>,
    /// Whether ICMP echo may be served; absent: whatever the connector announces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp: Option<bool>,
}

impl Default for ServiceRule {
    /// No name, the unspecified address (invalid until both are set), ports not restricted.
    fn default() -> Self {
        Self {
            name: String::new(),
            address: Ipv4Addr::UNSPECIFIED,
            address6: None,
            names: None,
            pool: None,
            udp: None,
            tcp: None,
            icmp: None,
        }
    }
}

/// A catalog entry, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    /// The service name.
    pub name: String,
    /// Its address (a name service: the first address of its pool).
    pub address: Ipv4Addr,
    /// Its IPv6 address, if any (a name service: the first address of its IPv6 pool).
    pub address6: Option<Ipv6Addr>,
    /// A name service's patterns and pool.
    pub names: Option<NamePool>,
    /// UDP ports a connector may serve (merged, sorted); `None`: not restricted.
    pub udp: Option<Vec<PortRange>>,
    /// TCP ports a connector may serve (merged, sorted); `None`: not restricted.
    pub tcp: Option<Vec<PortRange>>,
    /// Whether ICMP may be served; `None`: not restricted.
    pub icmp: Option<bool>,
}

/// What the policy's addresses must stay clear of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reserved {
    /// The agents' tunnel address pool.
    pub tunnel_pool: Option<Ipv4Net>,
    /// The relay's own addresses (its bind address, or every interface address when it binds
    /// all of them).
    pub relay: Vec<Ipv4Addr>,
    /// The relay's own IPv6 addresses (its bind address, or every interface address when it
    /// binds `[::]`): no service's IPv6 address may be one, or agents would route their way
    /// to the relay into the tunnel.
    pub relay6: Vec<Ipv6Addr>,
    /// Ranges the relay's config reserves (`reserved = [...]`).
    pub ranges: Vec<Ipv4Net>,
}

/// The policy as configured, before validation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySource {
    /// `[[access]]`.
    pub access: Vec<AccessRule>,
    /// `[[connectors]]`.
    pub connectors: Vec<ConnectorRule>,
    /// `[[services]]`: the catalog.
    pub services: Vec<ServiceRule>,
}

/// Why a policy was refused: every problem found, one per entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError(pub Vec<String>);

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid policy: {}", self.0.join("; "))
    }
}

/// The whole policy, validated. Nothing is allowed unless a rule allows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    access: Vec<AccessRule>,
    connectors: Vec<ConnectorRule>,
    services: BTreeMap<String, CatalogEntry>,
}

fn names(list: &[String], name: &str) -> bool {
    list.iter().any(|s| s == "*" || s == name)
}

/// Sorted, merged (overlapping or adjacent ranges joined) copy of `ranges`.
fn merge(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort_by_key(|r| (r.first, r.last));
    let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(l) if u32::from(r.first) <= u32::from(l.last) + 1 => l.last = l.last.max(r.last),
            _ => out.push(r),
        }
    }
    out
}

/// Whether every port of `announced` is in `allowed` (merged).
fn within(announced: &[PortRange], allowed: &[PortRange]) -> bool {
    announced.iter().all(|a| {
        allowed
            .iter()
            .any(|p| p.first <= a.first && a.last <= p.last)
    })
}

fn is_unicast(a: Ipv4Addr) -> bool {
    !(a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback())
}

impl Policy {
    /// Validates `src` against `reserved`: service names valid and unique; each address a
    /// unicast address used by one service only, outside the tunnel pool, not a relay address
    /// and outside every reserved range; port lists valid; every name an access or connector
    /// rule lists defined in the catalog (or `"*"`); identities and groups valid names.
    pub fn build(src: PolicySource, reserved: &Reserved) -> Result<Self, PolicyError> {
        let mut problems = Vec::new();
        let mut services: BTreeMap<String, CatalogEntry> = BTreeMap::new();
        let mut by_address: Vec<(Ipv4Net, String)> = Vec::new();
        let mut by_address6: Vec<(Ipv6Net, String)> = Vec::new();
        let mut patterns: BTreeMap<DomainPattern, String> = BTreeMap::new();
        for s in src.services {
            if let Err(e) = check_name("service name", &s.name) {
                problems.push(e);
                continue;
            }
            let (net, names) = match (&s.names, s.pool) {
                (None, None) => (Ipv4Net::from(s.address), None),
                (Some(list), Some(pool)) if s.address.is_unspecified() => {
                    let who = format!("service {} ({pool})", s.name);
                    if !NAME_POOL_PREFIX.contains(&pool.prefix_len()) || pool.trunc() != pool {
                        problems.push(format!(
                            "{who}: a pool is a network address with a prefix of /{} to /{}",
                            NAME_POOL_PREFIX.start(),
                            NAME_POOL_PREFIX.end()
                        ));
                    }
                    let mut parsed = Vec::new();
                    for n in list {
                        match DomainPattern::parse(n) {
                            Ok(p) => {
                                if let Some(other) = patterns.insert(p.clone(), s.name.clone()) {
                                    problems.push(format!(
                                        "{who}: name {p} also belongs to service {other}"
                                    ));
                                }
                                parsed.push(p.to_string());
                            }
                            Err(e) => problems.push(format!("{who}: {e}")),
                        }
                    }
                    if list.is_empty() {
                        problems.push(format!("{who}: `names` is empty"));
                    }
                    (
                        pool,
                        Some(NamePool {
                            patterns: parsed,
                            prefix_len: pool.prefix_len(),
                        }),
                    )
                }
                _ => {
                    problems.push(format!(
                        "service {}: give either `address`, or `names` and `pool`",
                        s.name
                    ));
                    continue;
                }
            };
            let who = format!("service {} ({net})", s.name);
            let a = net.network();
            if !is_unicast(a) || !is_unicast(net.broadcast()) {
                problems.push(format!("{who}: not a unicast address"));
            }
            if let Some((_, other)) = by_address
                .iter()
                .find(|(n, _)| n.contains(&net) || net.contains(n))
            {
                problems.push(format!("{who}: address also used by service {other}"));
            }
            if reserved
                .tunnel_pool
                .is_some_and(|p| p.contains(&net) || net.contains(&p))
            {
                problems.push(format!("{who}: inside the tunnel pool"));
            }
            if reserved.relay.iter().any(|r| net.contains(r)) {
                problems.push(format!("{who}: an address of the relay itself"));
            }
            if let Some(r) = reserved
                .ranges
                .iter()
                .find(|r| r.contains(&net) || net.contains(*r))
            {
                problems.push(format!("{who}: inside the reserved range {r}"));
            }
            let ports = |proto: &str, list: &Option<Vec<String>>, problems: &mut Vec<String>| {
                list.as_ref().map(|l| {
                    merge(
                        l.iter()
                            .filter_map(|p| match p.parse::<PortRange>() {
                                Ok(r) => Some(r),
                                Err(e) => {
                                    problems.push(format!("{who}: {proto} ports: {e}"));
                                    None
                                }
                            })
                            .collect(),
                    )
                })
            };
            let udp = ports("udp", &s.udp, &mut problems);
            let tcp = ports("tcp", &s.tcp, &mut problems);
            let serves_nothing = udp.as_ref().is_some_and(Vec::is_empty)
                && tcp.as_ref().is_some_and(Vec::is_empty)
                && s.icmp == Some(false);
            if serves_nothing {
                problems.push(format!("{who}: no ports and no ICMP"));
            }
            let net6 = s.address6.map(|a6| {
                let net6 = ztna_proto::service::check_address6(&s.name, a6, net.prefix_len())
                    .unwrap_or_else(|e| {
                        problems.push(e);
                        ztna_proto::service::pool6(a6, net.prefix_len())
                    });
                if let Some((_, other)) = by_address6
                    .iter()
                    .find(|(n, _)| n.contains(&net6) || net6.contains(n))
                {
                    problems.push(format!("{who}: IPv6 address also used by service {other}"));
                }
                if reserved.relay6.iter().any(|r| net6.contains(r)) {
                    problems.push(format!("{who}: an IPv6 address of the relay itself"));
                }
                net6
            });
            if services.contains_key(&s.name) {
                problems.push(format!("service {} is defined twice", s.name));
                continue;
            }
            by_address.push((net, s.name.clone()));
            if let Some(n6) = net6 {
                by_address6.push((n6, s.name.clone()));
            }
            services.insert(
                s.name.clone(),
                CatalogEntry {
                    name: s.name,
                    address: a,
                    address6: s.address6,
                    names,
                    udp,
                    tcp,
                    icmp: s.icmp,
                },
            );
        }
        let known = |what: &str, list: &[String], problems: &mut Vec<String>| {
            for n in list.iter().filter(|n| n.as_str() != "*") {
                if !services.contains_key(n) {
                    problems.push(format!(
                        "{what} names service \"{}\", which [[services]] does not define",
                        escape_for_log(n)
                    ));
                }
            }
        };
        for (i, r) in src.access.iter().enumerate() {
            let what = format!("access rule {}", i + 1);
            known(&what, &r.services, &mut problems);
            if r.groups.is_empty() && r.identities.is_empty() {
                problems.push(format!("{what} lists no groups and no identities"));
            }
            for n in r.groups.iter().chain(&r.identities) {
                if let Err(e) = check_name("group or identity", n) {
                    problems.push(format!("{what}: {e}"));
                }
            }
        }
        for r in &src.connectors {
            if let Err(e) = check_name("connector identity", &r.identity) {
                problems.push(e);
                continue;
            }
            known(
                &format!("connector rule {}", r.identity),
                &r.services,
                &mut problems,
            );
        }
        if problems.is_empty() {
            Ok(Self {
                access: src.access,
                connectors: src.connectors,
                services,
            })
        } else {
            Err(PolicyError(problems))
        }
    }

    /// The catalog entry of `service`.
    pub fn service(&self, service: &str) -> Option<&CatalogEntry> {
        self.services.get(service)
    }

    /// Number of catalog entries.
    pub fn services_len(&self) -> usize {
        self.services.len()
    }

    /// Whether `agent` may reach the service called `service`.
    pub fn agent_may_reach(&self, agent: &PeerIdentity, service: &str) -> bool {
        self.access.iter().any(|r| {
            names(&r.services, service)
                && (r.identities.iter().any(|i| i == &agent.name)
                    || r.groups.iter().any(|g| agent.groups.contains(g)))
        })
    }

    /// Whether connector `connector` may serve the service called `service`.
    pub fn connector_may_serve(&self, connector: &str, service: &str) -> bool {
        self.connectors
            .iter()
            .any(|r| r.identity == connector && names(&r.services, service))
    }

    /// Checks one service `connector` announces against the policy. On success, returns the
    /// definition to register: the announced ports and protocols (within policy's), at the
    /// policy's address, served by `connector`. The refusal's name is escaped for logs.
    pub fn check_announcement(
        &self,
        connector: &str,
        mut def: ServiceDef,
    ) -> Result<ServiceDef, Rejected> {
        let reject = |name: &str, code, message: String| Rejected {
            name: escape_for_log(name),
            code,
            message,
        };
        def.validate()
            .map_err(|e| reject(&def.name, ErrorCode::Malformed, e))?;
        let name = def.name.clone();
        let entry = self.services.get(&name).ok_or_else(|| {
            reject(
                &name,
                ErrorCode::UnknownService,
                format!("the relay's policy has no service {name}"),
            )
        })?;
        if !self.connector_may_serve(connector, &name) {
            return Err(reject(
                &name,
                ErrorCode::NotAllowedToServe,
                format!("policy does not let connector {connector} serve {name}"),
            ));
        }
        if def.names != entry.names {
            return Err(reject(
                &name,
                ErrorCode::PolicyMismatch,
                format!("service {name}: its names or pool differ from the relay's policy"),
            ));
        }
        if def.address != entry.address {
            return Err(reject(
                &name,
                ErrorCode::PolicyMismatch,
                format!(
                    "service {name} has address {} in the relay's policy, not {}",
                    entry.address, def.address
                ),
            ));
        }
        if def.address6 != entry.address6 {
            let show = |a: Option<Ipv6Addr>| a.map_or_else(|| "none".to_owned(), |a| a.to_string());
            return Err(reject(
                &name,
                ErrorCode::PolicyMismatch,
                format!(
                    "service {name} has IPv6 address {} in the relay's policy, not {}",
                    show(entry.address6),
                    show(def.address6)
                ),
            ));
        }
        for (proto, announced, allowed) in
            [("udp", &def.udp, &entry.udp), ("tcp", &def.tcp, &entry.tcp)]
        {
            if let Some(allowed) = allowed {
                if !within(announced, allowed) {
                    let list: Vec<String> = allowed.iter().map(ToString::to_string).collect();
                    return Err(reject(
                        &name,
                        ErrorCode::PolicyMismatch,
                        format!(
                            "service {name}: policy allows {proto} ports [{}] only",
                            list.join(", ")
                        ),
                    ));
                }
            }
        }
        if def.icmp && entry.icmp == Some(false) {
            return Err(reject(
                &name,
                ErrorCode::PolicyMismatch,
                format!("service {name}: policy does not allow ICMP"),
            ));
        }
        def.connector = connector.to_owned();
        Ok(def)
    }

    /// Wanted service names that the agent may not have: invalid names (`Malformed`) and names
    /// policy denies it (`Unauthorized`), each once.
    pub fn denied_wants(&self, agent: &PeerIdentity, want: &[String]) -> Vec<Rejected> {
        let mut seen = HashSet::new();
        want.iter()
            .filter(|w| seen.insert(w.as_str()))
            .filter_map(|w| {
                if !is_valid_name(w) {
                    Some(Rejected {
                        name: escape_for_log(w),
                        code: ErrorCode::Malformed,
                        message: check_name("service name", w).err().unwrap_or_default(),
                    })
                } else if !self.agent_may_reach(agent, w) {
                    Some(Rejected {
                        name: w.clone(),
                        code: ErrorCode::Unauthorized,
                        message: format!("policy does not allow {} to reach {w}", agent.name),
                    })
                } else {
                    None
                }
            })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use ztna_proto::Role;

    use super::*;

    pub(crate) fn agent(name: &str, groups: &[&str]) -> PeerIdentity {
        PeerIdentity {
            name: name.into(),
            role: Role::Agent,
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    pub(crate) fn rule(name: &str, last: u8) -> ServiceRule {
        ServiceRule {
            name: name.into(),
            address: Ipv4Addr::new(10, 100, 0, last),
            ..ServiceRule::default()
        }
    }

    pub(crate) fn reserved() -> Reserved {
        Reserved {
            tunnel_pool: Some("100.64.0.0/10".parse().unwrap()),
            relay: vec![Ipv4Addr::new(10, 10, 0, 1)],
            relay6: vec!["2001:db8:10::1".parse().unwrap()],
            ranges: vec!["192.168.0.0/16".parse().unwrap()],
        }
    }

    fn src() -> PolicySource {
        PolicySource {
            access: vec![
                AccessRule {
                    services: vec!["echo".into(), "dns".into()],
                    groups: vec!["eng".into()],
                    identities: vec![],
                },
                AccessRule {
                    services: vec!["*".into()],
                    groups: vec![],
                    identities: vec!["root".into()],
                },
            ],
            connectors: vec![ConnectorRule {
                identity: "c1".into(),
                services: vec!["echo".into()],
            }],
            services: vec![rule("echo", 1), rule("dns", 2), rule("secret", 3)],
        }
    }

    #[test]
    fn rules() {
        let p = Policy::build(src(), &reserved()).unwrap();
        assert!(p.agent_may_reach(&agent("alice", &["eng"]), "echo"));
        assert!(!p.agent_may_reach(&agent("alice", &["eng"]), "secret"));
        assert!(!p.agent_may_reach(&agent("bob", &["ops"]), "echo"));
        assert!(p.agent_may_reach(&agent("root", &[]), "secret"));
        assert!(p.connector_may_serve("c1", "echo"));
        assert!(!p.connector_may_serve("c1", "dns"));
        assert!(!p.connector_may_serve("c2", "echo"));
        assert!(!Policy::default().agent_may_reach(&agent("x", &["eng"]), "echo"));
        let denied = p.denied_wants(
            &agent("alice", &["eng"]),
            &[
                "echo".into(),
                "secret".into(),
                "secret".into(),
                "\u{1b}[31mx".into(),
            ],
        );
        let codes: Vec<_> = denied.iter().map(|r| r.code).collect();
        assert_eq!(codes, vec![ErrorCode::Unauthorized, ErrorCode::Malformed]);
        assert!(!denied[1].name.chars().any(char::is_control));
    }

    /// Every way a catalog can collide is refused at load, each named in the error.
    #[test]
    fn overlapping_catalogs_are_refused_at_load() {
        let bad = |services: Vec<ServiceRule>, needle: &str| {
            let mut s = src();
            s.services = services;
            s.access.clear();
            s.connectors.clear();
            let e = Policy::build(s, &reserved()).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} should mention {needle}");
        };
        bad(vec![rule("a", 1), rule("b", 1)], "also used by service a");
        bad(vec![rule("a", 1), rule("a", 2)], "defined twice");
        let mut pool = rule("a", 1);
        pool.address = Ipv4Addr::new(100, 64, 0, 7);
        bad(vec![pool], "tunnel pool");
        let mut relay = rule("a", 1);
        relay.address = Ipv4Addr::new(10, 10, 0, 1);
        bad(vec![relay], "relay itself");
        let mut lan = rule("a", 1);
        lan.address = Ipv4Addr::new(192, 168, 1, 1);
        bad(vec![lan], "reserved range 192.168.0.0/16");
        let mut lo = rule("a", 1);
        lo.address = Ipv4Addr::LOCALHOST;
        bad(vec![lo], "not a unicast");
        let mut ports = rule("a", 1);
        ports.udp = Some(vec!["0".into()]);
        bad(vec![ports], "udp ports");
        let mut nothing = rule("a", 1);
        nothing.udp = Some(vec![]);
        nothing.tcp = Some(vec![]);
        nothing.icmp = Some(false);
        bad(vec![nothing], "no ports and no ICMP");
        bad(vec![rule("Bad Name", 1)], "invalid service name");
        let v6 = |name: &str, last: u8, a6: &str| ServiceRule {
            address6: Some(a6.parse().unwrap()),
            ..rule(name, last)
        };
        bad(
            vec![v6("a", 1, "fd00:1::1"), v6("b", 2, "fd00:1::1")],
            "IPv6 address also used by service a",
        );
        bad(vec![v6("a", 1, "fe80::1")], "cannot be a service's IPv6");
        bad(
            vec![v6("a", 1, "2001:db8:10::1")],
            "an IPv6 address of the relay itself",
        );
        bad(vec![v6("a", 1, "fd7a:7a74:6e61:7475::5")], "cannot be");
        bad(vec![v6("a", 1, "::ffff:10.1.2.3")], "cannot be");
        let mut pool6 = ServiceRule {
            address: Ipv4Addr::UNSPECIFIED,
            names: Some(vec!["*.corp.example".into()]),
            pool: Some("10.101.0.0/24".parse().unwrap()),
            ..v6("a", 1, "fd00:2::80")
        };
        bad(vec![pool6.clone()], "does not start at a network address");
        pool6.address6 = Some("fd00:2::100".parse().unwrap());
        bad(
            vec![pool6, v6("b", 2, "fd00:2::1ff")],
            "IPv6 address also used by service a",
        );
        // Rules must name defined services and someone.
        let mut s = src();
        s.access[0].services.push("typo".into());
        s.access.push(AccessRule {
            services: vec!["echo".into()],
            ..AccessRule::default()
        });
        s.connectors[0].identity = "evil\nname".into();
        let e = Policy::build(s, &reserved()).unwrap_err();
        assert_eq!(e.0.len(), 3, "{e}");
        assert!(!e.to_string().contains('\n'));
    }

    /// A connector announcing a service without the IPv6 address policy gives it, or with
    /// another one, is refused; with the same one it is accepted.
    #[test]
    fn announced_ipv6_addresses_must_match_policy() {
        let mut s = src();
        s.services[0].address6 = Some("fd00:5::1".parse().unwrap());
        let p = Policy::build(s, &reserved()).unwrap();
        let def = |a6: Option<&str>| ServiceDef {
            name: "echo".into(),
            address: Ipv4Addr::new(10, 100, 0, 1),
            address6: a6.map(|a| a.parse().unwrap()),
            udp: vec![PortRange::single(7)],
            tcp: vec![],
            icmp: false,
            connector: String::new(),
            names: None,
        };
        assert!(p.check_announcement("c1", def(Some("fd00:5::1"))).is_ok());
        for wrong in [None, Some("fd00:5::2")] {
            let e = p.check_announcement("c1", def(wrong)).unwrap_err();
            assert_eq!(e.code, ErrorCode::PolicyMismatch);
            assert!(e.message.contains("IPv6 address"), "{}", e.message);
        }
    }

    #[test]
    fn announcements_must_match_policy() {
        let mut s = src();
        s.services[0].udp = Some(vec!["7".into(), "9000-9010".into(), "9011".into()]);
        s.services[0].icmp = Some(false);
        let p = Policy::build(s, &reserved()).unwrap();
        let def = |name: &str, last: u8, udp: Vec<PortRange>, icmp: bool| ServiceDef {
            name: name.into(),
            address: Ipv4Addr::new(10, 100, 0, last),
            address6: None,
            udp,
            tcp: vec![],
            icmp,
            connector: "ignored".into(),
            names: None,
        };
        let ok = p
            .check_announcement(
                "c1",
                def(
                    "echo",
                    1,
                    vec![
                        PortRange::single(7),
                        PortRange {
                            first: 9005,
                            last: 9011,
                        },
                    ],
                    false,
                ),
            )
            .unwrap();
        assert_eq!(ok.connector, "c1");
        let code = |r: Result<ServiceDef, Rejected>| r.unwrap_err().code;
        // Another service's address, or any address but its own.
        assert_eq!(
            code(p.check_announcement("c1", def("echo", 2, vec![PortRange::single(7)], false))),
            ErrorCode::PolicyMismatch
        );
        // Ports and ICMP beyond policy.
        assert_eq!(
            code(p.check_announcement("c1", def("echo", 1, vec![PortRange::single(22)], false))),
            ErrorCode::PolicyMismatch
        );
        assert_eq!(
            code(p.check_announcement("c1", def("echo", 1, vec![PortRange::single(7)], true))),
            ErrorCode::PolicyMismatch
        );
        assert_eq!(
            code(p.check_announcement("c1", def("dns", 2, vec![PortRange::single(53)], false))),
            ErrorCode::NotAllowedToServe
        );
        assert_eq!(
            code(p.check_announcement("c1", def("nope", 9, vec![PortRange::single(53)], false))),
            ErrorCode::UnknownService
        );
        let evil = p
            .check_announcement(
                "c1",
                def("\u{1b}]0;x\u{7}", 1, vec![PortRange::single(7)], false),
            )
            .unwrap_err();
        assert_eq!(evil.code, ErrorCode::Malformed);
        assert!(!evil.name.chars().any(char::is_control));
        assert!(!evil.message.chars().any(char::is_control));
    }

    pub(crate) fn name_rule(name: &str, names: &[&str], pool: &str) -> ServiceRule {
        ServiceRule {
            name: name.into(),
            names: Some(names.iter().map(|n| n.to_string()).collect()),
            pool: Some(pool.parse().unwrap()),
            tcp: Some(vec!["80".into()]),
            ..ServiceRule::default()
        }
    }

    #[test]
    fn name_services_load_and_must_not_collide() {
        let mut s = src();
        s.services.push(name_rule(
            "wiki",
            &["Wiki.Corp.Example", "*.wiki.corp.example"],
            "10.101.0.0/24",
        ));
        s.services
            .push(name_rule("corp", &["*.corp.example"], "10.102.0.0/24"));
        let p = Policy::build(s.clone(), &reserved()).unwrap();
        let wiki = p.service("wiki").unwrap();
        assert_eq!(wiki.address, Ipv4Addr::new(10, 101, 0, 0));
        assert_eq!(
            wiki.names,
            Some(NamePool {
                patterns: vec!["wiki.corp.example".into(), "*.wiki.corp.example".into()],
                prefix_len: 24,
            })
        );
        let bad = |extra: ServiceRule, needle: &str| {
            let mut s = s.clone();
            s.services.push(extra);
            let e = Policy::build(s, &reserved()).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} should mention {needle}");
        };
        bad(
            name_rule("x", &["x.example.org"], "10.101.0.128/25"),
            "also used by service wiki",
        );
        bad(
            name_rule("x", &["x.example.org"], "10.100.0.0/24"),
            "also used by service echo",
        );
        bad(
            name_rule("x", &["*.corp.example"], "10.103.0.0/24"),
            "also belongs to service corp",
        );
        bad(
            name_rule("x", &["x.example.org"], "10.103.0.1/24"),
            "network address",
        );
        bad(
            name_rule("x", &["x.example.org"], "10.0.0.0/8"),
            "/16 to /30",
        );
        bad(
            name_rule("x", &["x.example.org"], "192.168.4.0/24"),
            "reserved range",
        );
        bad(
            name_rule("x", &["x.example.org"], "100.64.0.0/16"),
            "tunnel pool",
        );
        bad(name_rule("x", &["*.org"], "10.103.0.0/24"), "top-level");
        bad(
            name_rule("x", &["bad name"], "10.103.0.0/24"),
            "invalid DNS name",
        );
        let mut both = name_rule("x", &["x.example.org"], "10.103.0.0/24");
        both.address = Ipv4Addr::new(10, 103, 0, 1);
        bad(both, "either `address`");
        // A connector must announce exactly the policy's names and pool.
        let mut s = s.clone();
        s.connectors[0].services.push("wiki".into());
        let p = Policy::build(s, &reserved()).unwrap();
        let announced = |patterns: &[&str], prefix_len: u8| ServiceDef {
            name: "wiki".into(),
            address6: None,
            address: Ipv4Addr::new(10, 101, 0, 0),
            udp: vec![],
            tcp: vec![PortRange::single(80)],
            icmp: false,
            connector: String::new(),
            names: Some(NamePool {
                patterns: patterns.iter().map(|p| p.to_string()).collect(),
                prefix_len,
            }),
        };
        let ok = p
            .check_announcement(
                "c1",
                announced(&["wiki.corp.example", "*.wiki.corp.example"], 24),
            )
            .unwrap();
        assert_eq!(ok.connector, "c1");
        for wrong in [
            announced(&["wiki.corp.example", "*.wiki.corp.example"], 23),
            announced(&["*.corp.example"], 24),
            ServiceDef {
                names: None,
                ..announced(&[], 24)
            },
        ] {
            let code = p.check_announcement("c1", wrong).unwrap_err().code;
            assert!(
                matches!(code, ErrorCode::PolicyMismatch | ErrorCode::Malformed),
                "{code:?}"
            );
        }
    }

    #[test]
    fn port_ranges_merge() {
        let r = |a, b| PortRange { first: a, last: b };
        assert_eq!(
            merge(vec![r(5, 9), r(1, 3), r(4, 4), r(20, 30)]),
            vec![r(1, 9), r(20, 30)]
        );
        assert!(within(&[r(2, 8)], &merge(vec![r(1, 3), r(4, 9)])));
        assert!(!within(&[r(2, 10)], &merge(vec![r(1, 3), r(4, 9)])));
        assert_eq!(merge(vec![r(65535, 65535), r(1, 65535)]), vec![r(1, 65535)]);
    }
}
