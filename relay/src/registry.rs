//! The service registry and the tunnel address pool, pure.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use ztna_core::tls::PeerIdentity;
use ztna_proto::control::{ErrorCode, Rejected};
use ztna_proto::ServiceDef;

use crate::policy::Policy;

/// Services connectors have registered, by name, and what each connector announced (so a
/// policy reload can register again what the new policy allows).
#[derive(Debug, Default)]
pub struct Registry {
    services: BTreeMap<String, ServiceDef>,
    announced: BTreeMap<String, Vec<ServiceDef>>,
}

/// Most services one connector may announce.
pub const MAX_SERVICES_PER_CONNECTOR: usize = 1024;

/// A service refused at registration, and the connector that announced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The connector.
    pub connector: String,
    /// The refusal (name escaped for logs).
    pub rejected: Rejected,
}

impl Registry {
    /// Registers what `connector` announces: each service must be valid, in the policy's
    /// catalog, allowed for that connector, match the policy's entry (address, ports) and not
    /// be served by another connector already. Replaces whatever the connector had registered
    /// before.
    pub fn register(
        &mut self,
        connector: &str,
        announced: Vec<ServiceDef>,
        policy: &Policy,
    ) -> (Vec<ServiceDef>, Vec<Rejected>) {
        self.unregister(connector);
        if announced.len() > MAX_SERVICES_PER_CONNECTOR {
            let rejected = vec![Rejected {
                name: "*".into(),
                code: ErrorCode::Limit,
                message: format!("more than {MAX_SERVICES_PER_CONNECTOR} services announced"),
            }];
            return (Vec::new(), rejected);
        }
        let (accepted, rejected) = self.try_register(connector, &announced, policy);
        self.announced.insert(connector.to_owned(), announced);
        (accepted, rejected)
    }

    fn try_register(
        &mut self,
        connector: &str,
        announced: &[ServiceDef],
        policy: &Policy,
    ) -> (Vec<ServiceDef>, Vec<Rejected>) {
        let mut accepted = Vec::new();
        let mut rejected = Vec::new();
        for def in announced {
            if self
                .services
                .get(&def.name)
                .is_some_and(|s| s.connector == connector)
            {
                continue; // kept across a reload
            }
            match policy.check_announcement(connector, def.clone()) {
                Err(r) => rejected.push(r),
                Ok(def) => {
                    if let Some(other) = self.services.get(&def.name) {
                        rejected.push(Rejected {
                            name: def.name.clone(),
                            code: ErrorCode::Conflict,
                            message: format!(
                                "service {} is already served by {}",
                                def.name, other.connector
                            ),
                        });
                    } else if let Some(other) =
                        self.services.values().find(|s| s.address == def.address)
                    {
                        // Policy gives each address to one name; this only guards that.
                        rejected.push(Rejected {
                            name: def.name.clone(),
                            code: ErrorCode::Conflict,
                            message: format!(
                                "address {} is already used by service {}",
                                def.address, other.name
                            ),
                        });
                    } else {
                        self.services.insert(def.name.clone(), def.clone());
                        accepted.push(def);
                    }
                }
            }
        }
        (accepted, rejected)
    }

    /// Applies a new policy: keeps each registered service the new policy still allows its
    /// connector (unchanged), drops the rest, then registers what connectors announced and the
    /// new policy now allows. Returns the services that were registered and are not any more.
    pub fn reapply(&mut self, policy: &Policy) -> Vec<Refused> {
        let before = std::mem::take(&mut self.services);
        let mut dropped = Vec::new();
        for (name, def) in &before {
            let mut announced = def.clone();
            announced.connector.clear();
            match policy.check_announcement(&def.connector, announced) {
                Ok(now) if now == *def => {
                    self.services.insert(name.clone(), def.clone());
                }
                Ok(_) => {}
                Err(rejected) => dropped.push(Refused {
                    connector: def.connector.clone(),
                    rejected,
                }),
            }
        }
        let announced = std::mem::take(&mut self.announced);
        for (connector, defs) in &announced {
            let _ = self.try_register(connector, defs, policy);
        }
        self.announced = announced;
        dropped
    }

    /// Removes every service of `connector`. Returns whether anything was removed.
    pub fn unregister(&mut self, connector: &str) -> bool {
        self.announced.remove(connector);
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

    /// The services `connector` has registered now.
    pub fn served_by(&self, connector: &str) -> Vec<ServiceDef> {
        self.services
            .values()
            .filter(|s| s.connector == connector)
            .cloned()
            .collect()
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

/// Assigns tunnel IPs from a pool, stable per identity: an identity starts probing at a hash of
/// its name, so it gets the same address across relay restarts unless another identity took it.
#[derive(Debug, Clone)]
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

    /// The address of `identity`: the one it has on this relay; else `preferred` (the address
    /// another relay of the fleet gave it, which the agent names in its hello) if that is a
    /// host address of the pool that nobody here holds; else one assigned as by
    /// [`Pool::assign`]. Relays assign independently and first come, first served, so two
    /// identities whose hash starts collide can get each other's address on relays that saw
    /// them in another order; honouring the agent's current address keeps it across a failover
    /// in all but the rare case that another identity holds it on the new relay.
    pub fn assign_preferring(
        &mut self,
        identity: &str,
        preferred: Option<Ipv4Addr>,
    ) -> Option<Ipv4Addr> {
        if let Some(ip) = self.by_identity.get(identity) {
            return Some(*ip);
        }
        if let Some(ip) = preferred.filter(|ip| self.is_host(*ip) && !self.taken.contains(ip)) {
            self.taken.insert(ip);
            self.by_identity.insert(identity.to_owned(), ip);
            return Some(ip);
        }
        self.assign(identity)
    }

    /// Whether `ip` is one of the addresses [`Pool::assign`] may hand out.
    fn is_host(&self, ip: Ipv4Addr) -> bool {
        if !self.net.contains(&ip) {
            return false;
        }
        if self.net.prefix_len() >= 31 {
            return true;
        }
        let last = ip.octets()[3];
        ip != self.net.network()
            && ip != self.net.broadcast()
            && !(self.host_count() > 512 && (last == 0 || last == 255))
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
    use ztna_proto::PortRange;

    use super::*;
    use crate::policy::tests::{agent, reserved, rule};
    use crate::policy::{AccessRule, ConnectorRule, PolicySource, ServiceRule};

    fn svc(name: &str, last: u8) -> ServiceDef {
        ServiceDef {
            name: name.into(),
            address: Ipv4Addr::new(10, 100, 0, last),
            address6: None,
            udp: vec![PortRange::single(7)],
            tcp: vec![],
            icmp: true,
            connector: String::new(),
            names: None,
        }
    }

    fn source() -> PolicySource {
        PolicySource {
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
            services: vec![rule("echo", 1), rule("dns", 2), rule("secret", 3)],
        }
    }

    fn policy() -> Policy {
        Policy::build(source(), &reserved()).unwrap()
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
        let (ok, bad) = r.register("c2", vec![svc("echo", 1), svc("dns", 2)], &p);
        assert!(ok.is_empty());
        assert_eq!(
            bad.iter().map(|b| b.code).collect::<Vec<_>>(),
            vec![ErrorCode::Conflict, ErrorCode::NotAllowedToServe]
        );
        let alice = agent("alice", &["eng"]);
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

    /// The round-1 hole: a connector allowed one service could announce it at any address
    /// (another service's, the relay's own) and take over another connector's address while
    /// that one restarted. Policy now fixes each name's address.
    #[test]
    fn a_connector_cannot_choose_or_move_an_address() {
        let p = policy();
        let mut r = Registry::default();
        // c1 (allowed "*") restarts: while it is gone, c2 (allowed echo) announces echo at
        // dns's address, and a name of its own at the relay's address.
        let mut relay_addr = svc("echo", 0);
        relay_addr.address = Ipv4Addr::new(10, 10, 0, 1);
        let (ok, bad) = r.register("c2", vec![svc("echo", 2), relay_addr], &p);
        assert!(ok.is_empty());
        assert_eq!(bad[0].code, ErrorCode::PolicyMismatch);
        assert_eq!(bad[1].code, ErrorCode::PolicyMismatch);
        let (ok, bad) = r.register("c2", vec![svc("grab", 2)], &p);
        assert!(ok.is_empty());
        assert_eq!(bad[0].code, ErrorCode::UnknownService);
        let (ok, _) = r.register("c1", vec![svc("dns", 2)], &p);
        assert_eq!(ok.len(), 1);
        assert_eq!(r.served_by("c1")[0].address, Ipv4Addr::new(10, 100, 0, 2));
    }

    #[test]
    fn invalid_services_are_refused() {
        let p = policy();
        let mut r = Registry::default();
        let mut empty = svc("dns", 2);
        empty.udp.clear();
        empty.icmp = false;
        let (_, bad) = r.register("c1", vec![empty], &p);
        assert_eq!(bad[0].code, ErrorCode::Malformed);
        let many: Vec<_> = (0..=MAX_SERVICES_PER_CONNECTOR)
            .map(|_| svc("echo", 1))
            .collect();
        let (ok, bad) = r.register("c1", many, &p);
        assert!(ok.is_empty());
        assert_eq!(bad[0].code, ErrorCode::Limit);
    }

    #[test]
    fn reapply_keeps_what_is_still_allowed_and_adds_what_now_is() {
        let mut r = Registry::default();
        let (ok, bad) = r.register("c2", vec![svc("echo", 1), svc("dns", 2)], &policy());
        assert_eq!((ok.len(), bad.len()), (1, 1));
        // New policy: c2 may serve dns too, but no longer echo; echo moves to another address.
        let mut src = source();
        src.connectors[1].services = vec!["dns".into()];
        let p2 = Policy::build(src.clone(), &reserved()).unwrap();
        let dropped = r.reapply(&p2);
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].connector, "c2");
        assert_eq!(dropped[0].rejected.code, ErrorCode::NotAllowedToServe);
        let names: Vec<_> = r.served_by("c2").into_iter().map(|s| s.name).collect();
        assert_eq!(names, vec!["dns"]);
        // echo back for c2, but at a new address: the old announcement no longer matches.
        src.connectors[1].services = vec!["*".into()];
        src.services[0] = ServiceRule {
            address: Ipv4Addr::new(10, 100, 0, 9),
            ..rule("echo", 1)
        };
        let p3 = Policy::build(src, &reserved()).unwrap();
        assert!(r.reapply(&p3).is_empty());
        let names: Vec<_> = r.served_by("c2").into_iter().map(|s| s.name).collect();
        assert_eq!(names, vec!["dns"]);
        // The same policy again changes nothing.
        assert!(r.reapply(&p3).is_empty());
        assert_eq!(r.services_len(), 1);
    }

    /// Two identities whose hash starts collide get each other's address on relays that saw
    /// them in another order, unless the agent names its address from the other relay.
    #[test]
    fn a_preferred_address_keeps_an_agent_on_its_address_across_relays() {
        let net: Ipv4Net = "100.64.0.0/10".parse().unwrap();
        // Find two identities that start at the same address.
        let start = |n: &str| fnv1a(n) % Pool::new(net).host_count();
        let mut seen = HashMap::new();
        let (a, b) = (0..100_000)
            .map(|i| format!("agent{i}"))
            .find_map(|n| {
                let s = start(&n);
                seen.insert(s, n.clone()).map(|other| (other, n))
            })
            .expect("a collision among 100,000 names in a /10");
        let (mut r1, mut r2) = (Pool::new(net), Pool::new(net));
        let a1 = r1.assign(&a).unwrap();
        let b1 = r1.assign(&b).unwrap();
        // The other relay sees b first: without a preference they swap.
        assert_eq!(r2.clone().assign(&b), Some(a1));
        let b2 = r2.assign_preferring(&b, Some(b1)).unwrap();
        let a2 = r2.assign_preferring(&a, Some(a1)).unwrap();
        assert_eq!((a2, b2), (a1, b1));
        // A preference outside the pool, on a network address, or held by another identity is
        // not honoured.
        let mut r3 = Pool::new(net);
        assert_ne!(
            r3.assign_preferring("x", Some(Ipv4Addr::new(10, 0, 0, 1))),
            Some(Ipv4Addr::new(10, 0, 0, 1))
        );
        assert_ne!(
            r3.assign_preferring("y", Some(Ipv4Addr::new(100, 64, 0, 0))),
            Some(Ipv4Addr::new(100, 64, 0, 0))
        );
        let x = r3.assign("x").unwrap();
        assert_ne!(r3.assign_preferring("z", Some(x)), Some(x));
        assert_eq!(
            r3.assign_preferring("x", Some(Ipv4Addr::new(100, 64, 9, 9))),
            Some(x),
            "an identity keeps what it has here"
        );
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
