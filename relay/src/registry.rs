//! The service registry and the tunnel address pool, pure.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use ztna_core::tls::PeerIdentity;
use ztna_proto::control::{ErrorCode, Rejected};
use ztna_proto::ServiceDef;

use crate::policy::Policy;

/// Services connectors have registered, by name.
#[derive(Debug, Default)]
pub struct Registry {
    services: BTreeMap<String, ServiceDef>,
}

/// Most services one connector may announce.
pub const MAX_SERVICES_PER_CONNECTOR: usize = 1024;

impl Registry {
    /// Registers what `connector` announces: each service must be valid, allowed by policy, and
    /// not clash (by name or address) with another connector's service. Replaces whatever the
    /// connector had registered before.
    pub fn register(
        &mut self,
        connector: &str,
        announced: Vec<ServiceDef>,
        policy: &Policy,
    ) -> (Vec<ServiceDef>, Vec<Rejected>) {
        self.unregister(connector);
        let mut accepted = Vec::new();
        let mut rejected = Vec::new();
        let reject = |name: &str, code, message: String| Rejected {
            name: name.to_owned(),
            code,
            message,
        };
        if announced.len() > MAX_SERVICES_PER_CONNECTOR {
            rejected.push(reject(
                "*",
                ErrorCode::Limit,
                format!("more than {MAX_SERVICES_PER_CONNECTOR} services announced"),
            ));
            return (accepted, rejected);
        }
        for mut def in announced {
            def.connector = connector.to_owned();
            if let Err(e) = def.validate() {
                rejected.push(reject(&def.name, ErrorCode::Malformed, e));
            } else if !policy.connector_may_serve(connector, &def.name) {
                rejected.push(reject(
                    &def.name,
                    ErrorCode::NotAllowedToServe,
                    format!(
                        "policy does not let connector {connector} serve {}",
                        def.name
                    ),
                ));
            } else if let Some(other) = self.services.get(&def.name) {
                rejected.push(reject(
                    &def.name,
                    ErrorCode::Conflict,
                    format!(
                        "service {} is already served by {}",
                        def.name, other.connector
                    ),
                ));
            } else if let Some(other) = self.services.values().find(|s| s.address == def.address) {
                rejected.push(reject(
                    &def.name,
                    ErrorCode::Conflict,
                    format!(
                        "address {} is already used by service {}",
                        def.address, other.name
                    ),
                ));
            } else {
                self.services.insert(def.name.clone(), def.clone());
                accepted.push(def);
            }
        }
        (accepted, rejected)
    }

    /// Removes every service of `connector`. Returns whether anything was removed.
    pub fn unregister(&mut self, connector: &str) -> bool {
        let before = self.services.len();
        self.services.retain(|_, s| s.connector != connector);
        before != self.services.len()
    }

    /// The services `agent` may reach now, restricted to `want` unless it is empty.
    pub fn catalog_for(
        &self,
        agent: &PeerIdentity,
        want: &[String],
        policy: &Policy,
    ) -> Vec<ServiceDef> {
        self.services
            .values()
            .filter(|s| want.is_empty() || want.contains(&s.name))
            .filter(|s| policy.agent_may_reach(agent, &s.name))
            .cloned()
            .collect()
    }

    /// Number of registered services.
    pub fn services_len(&self) -> usize {
        self.services.len()
    }

    /// Addresses of `connector`'s services that `agent` may reach (the connector enforces them).
    pub fn reachable_at(
        &self,
        agent: &PeerIdentity,
        connector: &str,
        policy: &Policy,
    ) -> Vec<std::net::Ipv4Addr> {
        self.services
            .values()
            .filter(|s| s.connector == connector && policy.agent_may_reach(agent, &s.name))
            .map(|s| s.address)
            .collect()
    }

    /// Whether `agent` may reach at least one service of `connector`.
    pub fn agent_may_use_connector(
        &self,
        agent: &PeerIdentity,
        connector: &str,
        policy: &Policy,
    ) -> bool {
        self.services
            .values()
            .any(|s| s.connector == connector && policy.agent_may_reach(agent, &s.name))
    }
}

/// Wanted service names that policy denies the agent.
pub fn denied_wants(agent: &PeerIdentity, want: &[String], policy: &Policy) -> Vec<Rejected> {
    let mut seen = HashSet::new();
    want.iter()
        .filter(|w| seen.insert(w.as_str()))
        .filter(|w| !policy.agent_may_reach(agent, w))
        .map(|w| Rejected {
            name: w.clone(),
            code: ErrorCode::Unauthorized,
            message: format!("policy does not allow {} to reach {w}", agent.name),
        })
        .collect()
}

/// Assigns tunnel IPs from a pool, stable per identity: an identity starts probing at a hash of
/// its name, so it gets the same address across relay restarts unless another identity took it.
#[derive(Debug)]
pub struct Pool {
    net: Ipv4Net,
    by_identity: HashMap<String, Ipv4Addr>,
    taken: HashSet<Ipv4Addr>,
}

/// FNV-1a: stable across processes and versions, unlike `std`'s hasher.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Pool {
    /// A pool over `net`'s host addresses (network and broadcast addresses excluded).
    pub fn new(net: Ipv4Net) -> Self {
        Self {
            net: net.trunc(),
            by_identity: HashMap::new(),
            taken: HashSet::new(),
        }
    }

    fn host_count(&self) -> u64 {
        let size = 1u64 << (32 - u32::from(self.net.prefix_len()));
        size.saturating_sub(2).max(1)
    }

    /// The address of `identity`, assigning one if it has none. `None` when the pool is full.
    pub fn assign(&mut self, identity: &str) -> Option<Ipv4Addr> {
        if let Some(ip) = self.by_identity.get(identity) {
            return Some(*ip);
        }
        let hosts = self.host_count();
        let base = u32::from(self.net.network()) as u64;
        let offset_of = |i: u64| {
            if self.net.prefix_len() >= 31 {
                i
            } else {
                1 + i
            }
        };
        let start = fnv1a(identity) % hosts;
        // Bounded: at most one pass over the pool.
        for i in 0..hosts {
            let ip = Ipv4Addr::from((base + offset_of((start + i) % hosts)) as u32);
            // x.y.z.0 and x.y.z.255 are valid hosts in a large pool, but some software takes
            // them for network or broadcast addresses; skip them while the pool is large enough.
            let last = ip.octets()[3];
            if hosts > 512 && (last == 0 || last == 255) {
                continue;
            }
            if !self.taken.contains(&ip) {
                self.taken.insert(ip);
                self.by_identity.insert(identity.to_owned(), ip);
                return Some(ip);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use ztna_proto::{PortRange, Role};

    use super::*;
    use crate::policy::{AccessRule, ConnectorRule};

    fn svc(name: &str, last: u8) -> ServiceDef {
        ServiceDef {
            name: name.into(),
            address: Ipv4Addr::new(10, 100, 0, last),
            udp: vec![PortRange::single(7)],
            tcp: vec![],
            icmp: true,
            connector: String::new(),
        }
    }

    fn policy() -> Policy {
        Policy {
            access: vec![AccessRule {
                services: vec!["echo".into(), "dns".into()],
                groups: vec!["eng".into()],
                identities: vec![],
            }],
            connectors: vec![
                ConnectorRule {
                    identity: "c1".into(),
                    services: vec!["*".into()],
                },
                ConnectorRule {
                    identity: "c2".into(),
                    services: vec!["echo".into()],
                },
            ],
        }
    }

    #[test]
    fn registration_and_catalog() {
        let p = policy();
        let mut r = Registry::default();
        let (ok, bad) = r.register(
            "c1",
            vec![svc("echo", 1), svc("dns", 2), svc("secret", 3)],
            &p,
        );
        assert_eq!(ok.len(), 3);
        assert!(bad.is_empty());
        let (ok, bad) = r.register("c2", vec![svc("echo", 9), svc("dns", 8)], &p);
        assert!(ok.is_empty());
        assert_eq!(
            bad.iter().map(|b| b.code).collect::<Vec<_>>(),
            vec![ErrorCode::Conflict, ErrorCode::NotAllowedToServe]
        );
        let alice = PeerIdentity {
            name: "alice".into(),
            role: Role::Agent,
            groups: vec!["eng".into()],
        };
        let names: Vec<_> = r
            .catalog_for(&alice, &[], &p)
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, vec!["dns", "echo"]);
        let names: Vec<_> = r
            .catalog_for(&alice, &["echo".into(), "secret".into()], &p)
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, vec!["echo"]);
        assert_eq!(
            denied_wants(&alice, &["echo".into(), "secret".into()], &p).len(),
            1
        );
        assert!(r.agent_may_use_connector(&alice, "c1", &p));
        // secret (10.100.0.3) is served by c1 but not allowed to alice.
        let mut reach = r.reachable_at(&alice, "c1", &p);
        reach.sort();
        assert_eq!(
            reach,
            vec![Ipv4Addr::new(10, 100, 0, 1), Ipv4Addr::new(10, 100, 0, 2)]
        );
        assert!(r.unregister("c1"));
        assert!(r.catalog_for(&alice, &[], &p).is_empty());
    }

    #[test]
    fn address_conflicts_and_invalid_services() {
        let p = policy();
        let mut r = Registry::default();
        r.register("c1", vec![svc("echo", 1)], &p);
        let mut dup = svc("dns", 1);
        dup.connector = "ignored".into();
        let (_, bad) = r.register("c1", vec![svc("echo", 1), dup], &p);
        assert_eq!(bad[0].code, ErrorCode::Conflict);
        let mut empty = svc("dns", 5);
        empty.udp.clear();
        empty.icmp = false;
        let (_, bad) = r.register("c1", vec![empty], &p);
        assert_eq!(bad[0].code, ErrorCode::Malformed);
    }

    #[test]
    fn pool_is_stable_and_exhausts() {
        let mut a = Pool::new("100.64.0.0/10".parse().unwrap());
        let mut b = Pool::new("100.64.0.0/10".parse().unwrap());
        let ip = a.assign("alice").unwrap();
        assert_eq!(b.assign("alice"), Some(ip));
        for n in 0..2000 {
            let last = a.assign(&format!("agent{n}")).unwrap().octets()[3];
            assert!(last != 0 && last != 255);
        }
        assert_eq!(a.assign("alice"), Some(ip));
        let mut small = Pool::new("10.0.0.0/30".parse().unwrap());
        let x = small.assign("a").unwrap();
        let y = small.assign("b").unwrap();
        assert_ne!(x, y);
        for ip in [x, y] {
            assert!(ip == Ipv4Addr::new(10, 0, 0, 1) || ip == Ipv4Addr::new(10, 0, 0, 2));
        }
        assert_eq!(small.assign("c"), None);
    }

    proptest! {
        #[test]
        fn pool_addresses_unique_and_inside(names in proptest::collection::hash_set("[a-z]{1,8}", 1..60)) {
            let net: Ipv4Net = "100.64.0.0/26".parse().unwrap();
            let mut pool = Pool::new(net);
            let mut seen = HashSet::new();
            for n in &names {
                let ip = pool.assign(n).unwrap();
                prop_assert!(net.contains(&ip) && ip != net.network() && ip != net.broadcast());
                prop_assert!(seen.insert(ip));
            }
        }
    }
}
