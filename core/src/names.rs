//! The agent's side of name services, pure: which names it answers (split DNS), the stable
//! virtual address each answered name gets from its service's pool, and the DNS replies.
//!
//! [`NameBook`] holds the name services of the catalog and the mappings handed out so far
//! (bounded: [`NameBook::new`]'s `max`, and each pool's size). [`NameBook::decide`] turns one
//! DNS query into a [`Decision`]: a reply, a reply that needs the mapping confirmed by the
//! connector first, or "forward to the normal resolver". No I/O and no clock here; the agent's
//! DNS server ([`crate::dns`]) is the shell around it.
//!
//! What the agent answers, for a query in one of its *match domains* (the domains of its name
//! services' patterns, plus configured ones):
//! - a name a reachable service answers to: `A` with its virtual address; `AAAA` with its
//!   virtual IPv6 address where the service has an IPv6 pool (the address at the same offset
//!   as the IPv4 one, [`ServiceDef::to_v6`]), else NOERROR with no records, as for any other
//!   type;
//! - any other name: NXDOMAIN, what a real resolver says for a name that does not exist (the
//!   identity learns nothing about services it may not reach).
//!
//! Queries outside the match domains are forwarded untouched (or REFUSED when no upstream is
//! configured).

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{rdata::A, rdata::AAAA, Name, RData, Record, RecordType};
use ipnet::{Ipv4Net, Ipv6Net};
use ztna_proto::names::{in_domain, normalize_name, DomainPattern, NameMapping};
use ztna_proto::ServiceDef;

/// TTL of the agent's answers. Addresses are stable for the agent's life, but a catalog change
/// can withdraw a name; a minute bounds how long a client keeps a withdrawn one.
pub const ANSWER_TTL: u32 = 60;

/// Default bound on the names the agent maps at once.
pub const DEFAULT_MAX_NAMES: usize = 4096;

/// A name service of the catalog.
#[derive(Debug, Clone)]
struct NameService {
    name: String,
    connector: String,
    pool: Ipv4Net,
    /// The IPv6 pool, as large as `pool`, if the service has one.
    pool6: Option<Ipv6Net>,
    patterns: Vec<DomainPattern>,
}

impl NameService {
    /// The IPv6 address at the offset of `v4` in the pool (the pools have the same size,
    /// [`ServiceDef::prefix6`]).
    fn to_v6(&self, v4: Ipv4Addr) -> Option<Ipv6Addr> {
        ztna_proto::service::pair(self.pool, self.pool6?, v4)
    }
}

/// One mapping: a name, its virtual address, and the service (and connector) it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// The real name.
    pub name: String,
    /// Its virtual address.
    pub address: Ipv4Addr,
    /// Its virtual IPv6 address (the same offset in the service's IPv6 pool), if the service
    /// has one.
    pub address6: Option<Ipv6Addr>,
    /// The name service.
    pub service: String,
    /// The connector serving it.
    pub connector: String,
    /// Whether the connector's current inner connection has confirmed it.
    pub confirmed: bool,
}

/// Where a name stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A reachable service answers to it, at this mapping.
    Mapped(Mapping),
    /// In a match domain, but no reachable service answers to it: NXDOMAIN.
    Denied,
    /// Outside every match domain: the normal resolver's business.
    Foreign,
    /// A reachable service answers to it, but its pool (or the agent's bound) is full.
    Full,
}

/// The names the agent answers and the addresses it handed out.
#[derive(Debug, Clone)]
pub struct NameBook {
    services: Vec<NameService>,
    extra_domains: Vec<String>,
    by_name: HashMap<String, Mapping>,
    by_addr: HashMap<Ipv4Addr, String>,
    max: usize,
}

/// FNV-1a: the same name starts at the same pool slot in every run.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl NameBook {
    /// An empty book that answers for `extra_domains` (besides the domains of the catalog's
    /// name services; invalid ones skipped) and keeps at most `max` mappings.
    pub fn new(extra_domains: &[String], max: usize) -> Self {
        Self {
            services: Vec::new(),
            extra_domains: extra_domains
                .iter()
                .filter_map(|d| normalize_name(d))
                .collect(),
            by_name: HashMap::new(),
            by_addr: HashMap::new(),
            max: max.max(1),
        }
    }

    /// Takes the catalog's name services (others are ignored). Mappings whose name the same
    /// service still serves at the same pool stay; the rest are forgotten.
    pub fn set_catalog(&mut self, catalog: &[ServiceDef]) {
        self.services = catalog
            .iter()
            .filter(|s| s.names.is_some())
            .map(|s| NameService {
                name: s.name.clone(),
                connector: s.connector.clone(),
                pool: s.prefix(),
                pool6: s.prefix6(),
                patterns: s.patterns(),
            })
            .collect();
        let keep: Vec<Mapping> = self
            .by_name
            .values()
            .filter(|m| {
                self.best(&m.name).is_some_and(|s| {
                    s.name == m.service && s.connector == m.connector && s.pool.contains(&m.address)
                })
            })
            .cloned()
            .collect();
        self.by_name.clear();
        self.by_addr.clear();
        for mut m in keep {
            // The IPv6 pool may have come, gone or moved: the IPv4 address decides.
            m.address6 = self.best(&m.name).and_then(|s| s.to_v6(m.address));
            self.by_addr.insert(m.address, m.name.clone());
            self.by_name.insert(m.name.clone(), m);
        }
    }

    /// The domains whose queries the agent answers (for split DNS), sorted.
    pub fn match_domains(&self) -> Vec<String> {
        let mut d: BTreeSet<String> = self.extra_domains.iter().cloned().collect();
        for s in &self.services {
            d.extend(s.patterns.iter().map(|p| p.domain().to_owned()));
        }
        d.into_iter().collect()
    }

    /// The pools of the name services, with their connectors (for routes).
    pub fn pools(&self) -> Vec<(Ipv4Net, String)> {
        self.services
            .iter()
            .map(|s| (s.pool, s.connector.clone()))
            .collect()
    }

    /// The most specific reachable service that answers to `name` (normalized).
    fn best(&self, name: &str) -> Option<&NameService> {
        self.services
            .iter()
            .filter_map(|s| {
                s.patterns
                    .iter()
                    .filter(|p| p.matches(name))
                    .map(DomainPattern::specificity)
                    .max()
                    .map(|spec| (spec, s))
            })
            .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.name.cmp(&a.1.name)))
            .map(|(_, s)| s)
    }

    fn in_match_domain(&self, name: &str) -> bool {
        self.match_domains().iter().any(|d| in_domain(name, d))
    }

    /// Where `name` stands, mapping it to a virtual address if a reachable service answers to
    /// it and it has none yet.
    pub fn lookup(&mut self, name: &str) -> Lookup {
        let Some(name) = normalize_name(name) else {
            return Lookup::Foreign;
        };
        if let Some(m) = self.by_name.get(&name) {
            return Lookup::Mapped(m.clone());
        }
        let Some(svc) = self.best(&name).cloned() else {
            return if self.in_match_domain(&name) {
                Lookup::Denied
            } else {
                Lookup::Foreign
            };
        };
        if self.by_name.len() >= self.max {
            return Lookup::Full;
        }
        // Host addresses of the pool: network and broadcast addresses excluded.
        let base = u32::from(svc.pool.network());
        let hosts = (1u64 << (32 - u32::from(svc.pool.prefix_len()))).saturating_sub(2);
        if hosts == 0 {
            return Lookup::Full;
        }
        let start = fnv1a(&name) % hosts;
        let free = (0..hosts)
            .map(|i| Ipv4Addr::from(base + 1 + ((start + i) % hosts) as u32))
            .find(|a| !self.by_addr.contains_key(a));
        let Some(address) = free else {
            return Lookup::Full;
        };
        let m = Mapping {
            name: name.clone(),
            address,
            address6: svc.to_v6(address),
            service: svc.name.clone(),
            connector: svc.connector.clone(),
            confirmed: false,
        };
        self.by_addr.insert(address, name.clone());
        self.by_name.insert(name, m.clone());
        Lookup::Mapped(m)
    }

    /// Marks `name` confirmed by its connector's current inner connection.
    pub fn confirm(&mut self, name: &str) {
        if let Some(m) = self.by_name.get_mut(name) {
            m.confirmed = true;
        }
    }

    /// Forgets the confirmations of `connector`'s mappings (its inner connection changed) and
    /// returns them, to be sent again.
    pub fn unconfirm(&mut self, connector: &str) -> Vec<NameMapping> {
        self.by_name
            .values_mut()
            .filter(|m| m.connector == connector)
            .map(|m| {
                m.confirmed = false;
                NameMapping {
                    address: m.address,
                    name: m.name.clone(),
                }
            })
            .collect()
    }

    /// Every mapping, sorted by name (for status).
    pub fn mappings(&self) -> Vec<Mapping> {
        let mut v: Vec<Mapping> = self.by_name.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The mapping of a virtual address.
    pub fn by_address(&self, addr: Ipv4Addr) -> Option<&Mapping> {
        self.by_addr.get(&addr).and_then(|n| self.by_name.get(n))
    }

    /// Number of names served (name services in the catalog).
    pub fn services_len(&self) -> usize {
        self.services.len()
    }

    /// Decides what to do with one DNS query from a client. `forward`: whether queries outside
    /// the match domains can go to an upstream resolver (else they are REFUSED).
    pub fn decide(&mut self, query: &[u8], forward: bool) -> Decision {
        let Ok(msg) = Message::from_vec(query) else {
            return Decision::Drop;
        };
        if msg.metadata.message_type != MessageType::Query {
            return Decision::Drop;
        }
        if msg.metadata.op_code != OpCode::Query || msg.queries.len() != 1 {
            let code = if msg.metadata.op_code == OpCode::Query {
                ResponseCode::FormErr
            } else {
                ResponseCode::NotImp
            };
            return reply(&msg, code, None, Outcome::Refused);
        }
        let q = &msg.queries[0];
        let name = q.name().to_ascii();
        let qtype = q.query_type();
        match self.lookup(&name) {
            Lookup::Foreign if forward => Decision::Forward,
            Lookup::Foreign => reply(&msg, ResponseCode::Refused, None, Outcome::Refused),
            Lookup::Denied => {
                let apex = normalize_name(&name).is_some_and(|n| self.match_domains().contains(&n));
                if apex {
                    reply(&msg, ResponseCode::NoError, None, Outcome::Answered)
                } else {
                    reply(&msg, ResponseCode::NXDomain, None, Outcome::Denied)
                }
            }
            Lookup::Full => reply(&msg, ResponseCode::ServFail, None, Outcome::Failed),
            Lookup::Mapped(m) => {
                let answer = match qtype {
                    RecordType::A => Some(IpAddr::V4(m.address)),
                    RecordType::AAAA => m.address6.map(IpAddr::V6),
                    _ => None,
                };
                let Decision::Reply { bytes, .. } =
                    reply(&msg, ResponseCode::NoError, answer, Outcome::Answered)
                else {
                    return Decision::Drop;
                };
                if m.confirmed {
                    return Decision::Reply {
                        bytes,
                        outcome: Outcome::Answered,
                    };
                }
                let Decision::Reply {
                    bytes: servfail, ..
                } = reply(&msg, ResponseCode::ServFail, None, Outcome::Failed)
                else {
                    return Decision::Drop;
                };
                Decision::Confirm {
                    reply: bytes,
                    servfail,
                    connector: m.connector.clone(),
                    mapping: NameMapping {
                        address: m.address,
                        name: m.name,
                    },
                }
            }
        }
    }
}

/// How a query was answered, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered from the book (an address, or no records of that type).
    Answered,
    /// NXDOMAIN for a name no reachable service answers to.
    Denied,
    /// REFUSED, FORMERR or NOTIMP.
    Refused,
    /// SERVFAIL: pool full, or the connector did not confirm the mapping.
    Failed,
}

/// What to do with one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send these bytes back.
    Reply {
        /// The reply.
        bytes: Vec<u8>,
        /// What it says.
        outcome: Outcome,
    },
    /// Tell `connector` about `mapping` first; once it accepts, send `reply`, else `servfail`.
    Confirm {
        /// The answer.
        reply: Vec<u8>,
        /// The reply if the connector refuses or does not answer.
        servfail: Vec<u8>,
        /// Who must confirm.
        connector: String,
        /// What.
        mapping: NameMapping,
    },
    /// Send the query to the upstream resolver as it is.
    Forward,
    /// Not a query: ignore.
    Drop,
}

fn reply(query: &Message, code: ResponseCode, a: Option<IpAddr>, outcome: Outcome) -> Decision {
    let mut m = Message::response(query.metadata.id, query.metadata.op_code);
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.authoritative = true;
    m.metadata.response_code = code;
    m.add_queries(query.queries.iter().cloned());
    if let (Some(addr), Some(q)) = (a, query.queries.first()) {
        let data = match addr {
            IpAddr::V4(a) => RData::A(A(a)),
            IpAddr::V6(a) => RData::AAAA(AAAA(a)),
        };
        m.add_answer(Record::from_rdata(q.name().clone(), ANSWER_TTL, data));
    }
    match m.to_vec() {
        Ok(bytes) => Decision::Reply { bytes, outcome },
        Err(_) => Decision::Drop,
    }
}

/// An address query for `name` with id `id` (the connector's resolver): `A`, or `AAAA` when
/// `v6`.
pub fn address_query(id: u16, name: &str, v6: bool) -> Option<Vec<u8>> {
    let name = Name::from_ascii(format!("{name}.")).ok()?;
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    let ty = if v6 { RecordType::AAAA } else { RecordType::A };
    m.add_query(Query::query(name, ty));
    m.to_vec().ok()
}

/// What a resolver answered to [`address_query`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressAnswer {
    /// Addresses (`A` and `AAAA` records alike), and the smallest TTL among them.
    Addresses(Vec<std::net::IpAddr>, u32),
    /// The name does not exist, or has no address records of the type asked.
    NoAddress,
    /// SERVFAIL, REFUSED and the like.
    Failed(String),
}

/// Reads the answer to the query with id `id`; `None` if `bytes` is not that answer.
pub fn parse_address_answer(id: u16, bytes: &[u8]) -> Option<AddressAnswer> {
    let m = Message::from_vec(bytes).ok()?;
    if m.metadata.id != id || m.metadata.message_type != MessageType::Response {
        return None;
    }
    Some(match m.metadata.response_code {
        ResponseCode::NoError => {
            let mut ttl = u32::MAX;
            let addrs: Vec<std::net::IpAddr> = m
                .answers
                .iter()
                .filter_map(|r| {
                    let a = match &r.data {
                        RData::A(a) => std::net::IpAddr::V4(a.0),
                        RData::AAAA(a) => std::net::IpAddr::V6(a.0),
                        _ => return None,
                    };
                    ttl = ttl.min(r.ttl);
                    Some(a)
                })
                .collect();
            if addrs.is_empty() {
                AddressAnswer::NoAddress
            } else {
                AddressAnswer::Addresses(addrs, ttl)
            }
        }
        ResponseCode::NXDomain => AddressAnswer::NoAddress,
        other => AddressAnswer::Failed(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztna_proto::{NamePool, PortRange};

    pub(crate) fn name_svc(name: &str, patterns: &[&str], pool: [u8; 4], len: u8) -> ServiceDef {
        ServiceDef {
            name: name.into(),
            address: Ipv4Addr::from(pool),
            address6: None,
            udp: vec![],
            tcp: vec![PortRange::single(80)],
            icmp: false,
            connector: "c1".into(),
            names: Some(NamePool {
                patterns: patterns.iter().map(|p| p.to_string()).collect(),
                prefix_len: len,
            }),
        }
    }

    fn book() -> NameBook {
        let mut b = NameBook::new(&["corp.example".into()], 100);
        b.set_catalog(&[
            name_svc("wiki", &["wiki.corp.example"], [10, 101, 0, 0], 24),
            name_svc("apps", &["*.apps.corp.example"], [10, 102, 0, 0], 24),
        ]);
        b
    }

    fn query(name: &str, qtype: RecordType) -> Vec<u8> {
        let mut m = Message::new(77, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        m.to_vec().unwrap()
    }

    fn parse(bytes: &[u8]) -> Message {
        Message::from_vec(bytes).unwrap()
    }

    #[test]
    fn lookups_are_stable_and_within_the_pool() {
        let mut b = book();
        let Lookup::Mapped(m) = b.lookup("WIKI.corp.example.") else {
            panic!()
        };
        assert_eq!(m.name, "wiki.corp.example");
        assert!("10.101.0.0/24"
            .parse::<Ipv4Net>()
            .unwrap()
            .contains(&m.address));
        assert_ne!(m.address, Ipv4Addr::new(10, 101, 0, 0));
        assert_eq!(b.lookup("wiki.corp.example"), Lookup::Mapped(m.clone()));
        // Another book (a restart) gives the same address.
        let mut again = book();
        assert_eq!(again.lookup("wiki.corp.example"), Lookup::Mapped(m.clone()));
        // Wildcards: most specific service; other names in the domain are denied.
        let Lookup::Mapped(a) = b.lookup("x.apps.corp.example") else {
            panic!()
        };
        assert_eq!(a.service, "apps");
        assert_eq!(b.lookup("db.corp.example"), Lookup::Denied);
        assert_eq!(b.lookup("apps.corp.example"), Lookup::Denied);
        assert_eq!(b.lookup("example.org"), Lookup::Foreign);
        assert_eq!(b.lookup("bad name"), Lookup::Foreign);
        assert_eq!(
            b.match_domains(),
            vec!["apps.corp.example", "corp.example", "wiki.corp.example"]
        );
        assert_eq!(
            b.by_address(m.address).map(|x| x.name.as_str()),
            Some("wiki.corp.example")
        );
    }

    #[test]
    fn pools_and_the_book_are_bounded() {
        let mut b = NameBook::new(&[], 1000);
        b.set_catalog(&[name_svc("apps", &["*.apps.example"], [10, 102, 0, 0], 30)]);
        let mut seen = BTreeSet::new();
        for i in 0..2 {
            let Lookup::Mapped(m) = b.lookup(&format!("h{i}.apps.example")) else {
                panic!()
            };
            assert!(seen.insert(m.address));
            assert!(m.address != Ipv4Addr::new(10, 102, 0, 0));
            assert!(m.address != Ipv4Addr::new(10, 102, 0, 3));
        }
        assert_eq!(b.lookup("h9.apps.example"), Lookup::Full);
        let mut small = NameBook::new(&[], 1);
        small.set_catalog(&[name_svc("apps", &["*.apps.example"], [10, 102, 0, 0], 24)]);
        assert!(matches!(small.lookup("a.apps.example"), Lookup::Mapped(_)));
        assert_eq!(small.lookup("b.apps.example"), Lookup::Full);
    }

    #[test]
    fn catalog_changes_keep_only_valid_mappings() {
        let mut b = book();
        let Lookup::Mapped(w) = b.lookup("wiki.corp.example") else {
            panic!()
        };
        let _ = b.lookup("x.apps.corp.example");
        b.confirm("wiki.corp.example");
        b.set_catalog(&[name_svc(
            "wiki",
            &["wiki.corp.example"],
            [10, 101, 0, 0],
            24,
        )]);
        assert_eq!(b.mappings().len(), 1);
        assert!(b.mappings()[0].confirmed);
        assert_eq!(b.lookup("x.apps.corp.example"), Lookup::Denied);
        assert_eq!(b.unconfirm("c1").len(), 1);
        assert!(!b.mappings()[0].confirmed);
        // The pool moved: the mapping goes.
        b.set_catalog(&[name_svc(
            "wiki",
            &["wiki.corp.example"],
            [10, 103, 0, 0],
            24,
        )]);
        let Lookup::Mapped(moved) = b.lookup("wiki.corp.example") else {
            panic!()
        };
        assert_ne!(moved.address, w.address);
    }

    #[test]
    fn dns_replies() {
        let mut b = book();
        let Decision::Confirm {
            reply,
            servfail,
            connector,
            mapping,
        } = b.decide(&query("wiki.corp.example.", RecordType::A), true)
        else {
            panic!()
        };
        assert_eq!(connector, "c1");
        let r = parse(&reply);
        assert_eq!(r.metadata.id, 77);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].data, RData::A(A(mapping.address)));
        assert_eq!(
            parse(&servfail).metadata.response_code,
            ResponseCode::ServFail
        );
        b.confirm(&mapping.name);
        let Decision::Reply { bytes, outcome } =
            b.decide(&query("wiki.corp.example.", RecordType::AAAA), true)
        else {
            panic!()
        };
        assert_eq!(outcome, Outcome::Answered);
        let r = parse(&bytes);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        let Decision::Reply { bytes, outcome } =
            b.decide(&query("db.corp.example.", RecordType::A), true)
        else {
            panic!()
        };
        assert_eq!(outcome, Outcome::Denied);
        assert_eq!(parse(&bytes).metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(
            b.decide(&query("example.org.", RecordType::A), true),
            Decision::Forward
        );
        let Decision::Reply { bytes, outcome } =
            b.decide(&query("example.org.", RecordType::A), false)
        else {
            panic!()
        };
        assert_eq!(outcome, Outcome::Refused);
        assert_eq!(parse(&bytes).metadata.response_code, ResponseCode::Refused);
        assert_eq!(b.decide(b"\x00\x01garbage", true), Decision::Drop);
        assert_eq!(b.decide(&[], true), Decision::Drop);
    }

    #[test]
    fn aaaa_answers_the_address_at_the_same_offset_of_the_ipv6_pool() {
        let mut wiki = name_svc("wiki", &["wiki.corp.example"], [10, 101, 0, 0], 24);
        wiki.address6 = Some("fd00:9::100".parse().unwrap());
        let mut b = NameBook::new(&[], 100);
        b.set_catalog(&[wiki.clone()]);
        let answer = |b: &mut NameBook, qtype| {
            let bytes = match b.decide(&query("wiki.corp.example.", qtype), true) {
                Decision::Reply { bytes, .. } => bytes,
                Decision::Confirm { reply, .. } => reply,
                other => panic!("{other:?}"),
            };
            let r = parse(&bytes);
            assert_eq!(r.metadata.response_code, ResponseCode::NoError);
            r.answers.iter().map(|a| a.data.clone()).collect::<Vec<_>>()
        };
        // AAAA first: the mapping is made by it, the connector is told the IPv4 address.
        let Decision::Confirm { mapping, .. } =
            b.decide(&query("wiki.corp.example.", RecordType::AAAA), true)
        else {
            panic!()
        };
        let v6 = wiki.to_v6(mapping.address).unwrap();
        assert!(wiki.covers6(v6));
        assert_eq!(
            answer(&mut b, RecordType::AAAA),
            vec![RData::AAAA(AAAA(v6))]
        );
        assert_eq!(
            answer(&mut b, RecordType::A),
            vec![RData::A(A(mapping.address))]
        );
        let Lookup::Mapped(m) = b.lookup("wiki.corp.example") else {
            panic!()
        };
        assert_eq!((m.address, m.address6), (mapping.address, Some(v6)));
        // Other types: no records.
        assert!(answer(&mut b, RecordType::MX).is_empty());
        // The IPv6 pool goes: AAAA gets no records, A stays the same address.
        let mut v4_only = wiki.clone();
        v4_only.address6 = None;
        b.set_catalog(&[v4_only]);
        assert!(answer(&mut b, RecordType::AAAA).is_empty());
        assert_eq!(
            answer(&mut b, RecordType::A),
            vec![RData::A(A(mapping.address))]
        );
        // And comes back, elsewhere.
        let mut moved = wiki;
        moved.address6 = Some("fd00:8::".parse().unwrap());
        b.set_catalog(&[moved.clone()]);
        assert_eq!(
            answer(&mut b, RecordType::AAAA),
            vec![RData::AAAA(AAAA(moved.to_v6(mapping.address).unwrap()))]
        );
    }

    #[test]
    fn resolver_messages() {
        let q = address_query(9, "wiki.corp.example", false).unwrap();
        let m = parse(&q);
        assert_eq!(m.queries[0].query_type(), RecordType::A);
        let mut r = Message::response(9, OpCode::Query);
        r.add_query(m.queries[0].clone());
        r.add_answer(Record::from_rdata(
            m.queries[0].name().clone(),
            30,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
        ));
        r.add_answer(Record::from_rdata(
            m.queries[0].name().clone(),
            10,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 2))),
        ));
        let bytes = r.to_vec().unwrap();
        assert_eq!(
            parse_address_answer(9, &bytes),
            Some(AddressAnswer::Addresses(
                vec![
                    Ipv4Addr::new(192, 0, 2, 1).into(),
                    Ipv4Addr::new(192, 0, 2, 2).into()
                ],
                10
            ))
        );
        assert_eq!(parse_address_answer(8, &bytes), None);
        r.metadata.response_code = ResponseCode::NXDomain;
        r.answers.clear();
        assert_eq!(
            parse_address_answer(9, &r.to_vec().unwrap()),
            Some(AddressAnswer::NoAddress)
        );
        assert_eq!(parse_address_answer(9, b"junk"), None);
        // AAAA: asked for with `v6`, and read like A records.
        let q = address_query(10, "v6only.corp.example", true).unwrap();
        let m = parse(&q);
        assert_eq!(m.queries[0].query_type(), RecordType::AAAA);
        let mut r = Message::response(10, OpCode::Query);
        r.add_query(m.queries[0].clone());
        let v6: std::net::Ipv6Addr = "2001:db8::7".parse().unwrap();
        r.add_answer(Record::from_rdata(
            m.queries[0].name().clone(),
            60,
            RData::AAAA(hickory_proto::rr::rdata::AAAA(v6)),
        ));
        assert_eq!(
            parse_address_answer(10, &r.to_vec().unwrap()),
            Some(AddressAnswer::Addresses(vec![v6.into()], 60))
        );
    }

    proptest::proptest! {
        #[test]
        fn decide_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let mut b = book();
            let _ = b.decide(&bytes, true);
        }

        #[test]
        fn distinct_names_get_distinct_addresses(names in proptest::collection::btree_set("[a-z]{1,8}", 1..60)) {
            let mut b = book();
            let mut seen = BTreeSet::new();
            for n in &names {
                match b.lookup(&format!("{n}.apps.corp.example")) {
                    Lookup::Mapped(m) => proptest::prop_assert!(seen.insert(m.address)),
                    other => proptest::prop_assert!(false, "{other:?}"),
                }
            }
        }
    }
}
