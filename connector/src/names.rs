//! Name services on the connector: checking what an agent says a virtual address stands for,
//! each agent's mappings, and resolving the real names with the connector's own resolver.
//!
//! The trust boundary: an agent (even one with a valid certificate that lies) can only make the
//! connector resolve and forward names that (1) a name service *of this connector* answers to,
//! (2) policy lets *this agent* reach (the relay lists the service's pool address among the
//! channel's allowed services), with (3) the virtual address inside *that* service's pool.
//! [`check_mapping`] is that rule; anything else is refused and counted
//! (`names_mappings_refused`), and the tunnel's per-packet check already drops packets to a
//! pool address the agent has not mapped (`dropped_name_unmapped`).
//!
//! Pure parts: [`check_mapping`], [`AgentNames`] (bounded), [`NameCache`] (bounded, TTLs with
//! injected time). [`Resolver`] is the shell: the system resolver (getaddrinfo, which gives no
//! TTL: `resolver_ttl_secs` stands in) or configured DNS servers (queried over UDP with
//! hickory-proto's wire format; their TTLs count). A name is resolved when its mapping arrives
//! and when a new flow finds its entry expired: a TCP connection (whose connect is async anyway)
//! waits for the new answer, a UDP or ICMP flow (opened synchronously) goes to the last address
//! while the refresh runs. Open flows keep the backend they were opened to.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use ztna_core::names::{address_query, parse_address_answer, AddressAnswer};
use ztna_proto::names::NameMapping;
use ztna_proto::ServiceDef;

use crate::metrics::Metrics;

/// Shortest and longest TTL the cache honours.
pub(crate) const MIN_TTL: Duration = Duration::from_secs(5);
pub(crate) const MAX_TTL: Duration = Duration::from_secs(3600);
/// How long a failed or empty resolution is remembered.
pub(crate) const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// How long one resolution may take.
pub(crate) const RESOLVE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Why a mapping was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MappingRefusal {
    /// The address is in no pool of this connector's name services.
    NotInPool,
    /// The service whose pool holds the address is not one policy lets this agent reach.
    NotAllowed,
    /// The service does not answer to that name.
    NameNotServed,
}

/// Checks a mapping from an agent against this connector's name services and the service
/// addresses policy lets that agent reach. Returns the service on success.
pub(crate) fn check_mapping<'a>(
    m: &NameMapping,
    services: &'a [ServiceDef],
    allowed: &[Ipv4Addr],
) -> Result<&'a ServiceDef, MappingRefusal> {
    let svc = services
        .iter()
        .filter(|s| s.names.is_some())
        .find(|s| s.covers(m.address))
        .ok_or(MappingRefusal::NotInPool)?;
    let net = svc.prefix();
    if m.address == net.network() || m.address == net.broadcast() {
        return Err(MappingRefusal::NotInPool);
    }
    if !allowed.contains(&svc.address) {
        return Err(MappingRefusal::NotAllowed);
    }
    if !svc.patterns().iter().any(|p| p.matches(&m.name)) {
        return Err(MappingRefusal::NameNotServed);
    }
    Ok(svc)
}

/// One agent's mappings: virtual address → real name. Bounded.
#[derive(Debug)]
pub(crate) struct AgentNames {
    map: Mutex<HashMap<Ipv4Addr, String>>,
    max: usize,
}

impl AgentNames {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            max: max.max(1),
        }
    }

    /// Maps `address` to `name` (replacing what it stood for). False when the agent has as many
    /// mappings as allowed and `address` is not one of them.
    pub(crate) fn insert(&self, address: Ipv4Addr, name: String) -> bool {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= self.max && !map.contains_key(&address) {
            return false;
        }
        map.insert(address, name);
        true
    }

    /// Whether `address` is mapped to a name (the per-packet check; no copy of the name).
    pub(crate) fn is_mapped(&self, address: Ipv4Addr) -> bool {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&address)
    }

    /// The name `address` stands for.
    pub(crate) fn name_of(&self, address: Ipv4Addr) -> Option<String> {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&address)
            .cloned()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[derive(Debug, Clone)]
struct CacheEntry {
    addrs: Vec<IpAddr>,
    expires: Instant,
    refreshing: bool,
    used: Instant,
}

/// What the cache knows of a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cached {
    /// An address within its TTL.
    Fresh(IpAddr),
    /// An address past its TTL; `refresh` is true for the one caller that should resolve again.
    Stale(IpAddr, bool),
    /// Known not to resolve (within the negative TTL).
    NoAddress,
    /// Unknown (or an expired negative entry); `resolve` is true for the one caller that should
    /// resolve it.
    Missing(bool),
}

/// Most names being resolved at once for the first time.
pub(crate) const MAX_PENDING: usize = 64;

/// Resolved names, bounded: the least recently used entry goes when a new one needs room. Names
/// not resolved yet are resolved by one caller each, at most [`MAX_PENDING`] at once.
#[derive(Debug)]
pub(crate) struct NameCache {
    entries: HashMap<String, CacheEntry>,
    pending: std::collections::HashSet<String>,
    max: usize,
}

impl NameCache {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            entries: HashMap::new(),
            pending: std::collections::HashSet::new(),
            max: max.max(1),
        }
    }

    /// Looks `name` up at `now`, marking it as being refreshed when the caller is to resolve it.
    pub(crate) fn get(&mut self, name: &str, now: Instant) -> Cached {
        let Some(e) = self.entries.get_mut(name) else {
            let first = !self.pending.contains(name) && self.pending.len() < MAX_PENDING;
            if first {
                self.pending.insert(name.to_owned());
            }
            return Cached::Missing(first);
        };
        e.used = now;
        let expired = now >= e.expires;
        let refresh = expired && !e.refreshing;
        if refresh {
            e.refreshing = true;
        }
        match (e.addrs.first().copied(), expired) {
            (Some(a), false) => Cached::Fresh(a),
            (Some(a), true) => Cached::Stale(a, refresh),
            (None, false) => Cached::NoAddress,
            (None, true) => Cached::Missing(refresh),
        }
    }

    /// Stores a resolution: addresses and their TTL (clamped to [`MIN_TTL`]..[`MAX_TTL`]), or
    /// `None` for a failure (remembered for [`NEGATIVE_TTL`]; a stale address is kept for use
    /// until the next try). Returns how many entries were evicted to make room.
    pub(crate) fn put(
        &mut self,
        name: &str,
        now: Instant,
        result: Option<(Vec<IpAddr>, Duration)>,
    ) -> usize {
        let mut evicted = 0;
        self.pending.remove(name);
        if !self.entries.contains_key(name) && self.entries.len() >= self.max {
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone())
            {
                self.entries.remove(&oldest);
                evicted = 1;
            }
        }
        let previous = self.entries.get(name).map(|e| e.addrs.clone());
        let entry = match result {
            Some((addrs, ttl)) if !addrs.is_empty() => CacheEntry {
                addrs,
                expires: now + ttl.clamp(MIN_TTL, MAX_TTL),
                refreshing: false,
                used: now,
            },
            _ => CacheEntry {
                // Keep serving the last address while the resolver fails; it is retried
                // after NEGATIVE_TTL.
                addrs: previous.unwrap_or_default(),
                expires: now + NEGATIVE_TTL,
                refreshing: false,
                used: now,
            },
        };
        self.entries.insert(name.to_owned(), entry);
        evicted
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Whether an address may be a backend (a resolved one, or a configured one): not
/// unspecified, broadcast or multicast.
pub(crate) fn usable(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
    }
}

/// The connector's resolver for name services, with its cache.
pub(crate) struct Resolver {
    /// DNS servers to ask; empty: the system resolver.
    servers: Vec<SocketAddr>,
    /// TTL given to the system resolver's answers.
    system_ttl: Duration,
    cache: Mutex<NameCache>,
    metrics: Arc<Metrics>,
    runtime: tokio::runtime::Handle,
}

impl Resolver {
    /// Must be called inside a tokio runtime.
    pub(crate) fn new(
        servers: Vec<SocketAddr>,
        system_ttl: Duration,
        max_names: usize,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            servers,
            system_ttl,
            cache: Mutex::new(NameCache::new(max_names)),
            metrics,
            runtime: tokio::runtime::Handle::try_current()?,
        }))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, NameCache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The address of `name` now, without waiting: a fresh or stale cached one (a stale one is
    /// refreshed in the background). `None` if unknown (resolution starts) or not resolvable.
    pub(crate) fn cached(self: &Arc<Self>, name: &str) -> Option<IpAddr> {
        match self.cache().get(name, Instant::now()) {
            Cached::Fresh(a) => Some(a),
            Cached::Stale(a, refresh) => {
                if refresh {
                    self.spawn_resolve(name);
                }
                Some(a)
            }
            Cached::NoAddress => None,
            Cached::Missing(resolve) => {
                if resolve {
                    self.spawn_resolve(name);
                }
                None
            }
        }
    }

    /// The address of `name`, resolving it if the cache has none, or again if its TTL ran out
    /// (falling back to the last address if that fails; callers that find a refresh already
    /// running take the last address).
    pub(crate) async fn resolve(self: &Arc<Self>, name: &str) -> Option<IpAddr> {
        // The cache's lock is released before any await.
        let cached = self.cache().get(name, Instant::now());
        match cached {
            Cached::Fresh(a) => return Some(a),
            Cached::Stale(a, refresh) => {
                if refresh {
                    return self.refresh(name).await.or(Some(a));
                }
                return Some(a);
            }
            Cached::NoAddress => return None,
            Cached::Missing(_) => {}
        }
        self.refresh(name).await
    }

    fn spawn_resolve(self: &Arc<Self>, name: &str) {
        let (me, name) = (self.clone(), name.to_owned());
        self.runtime.spawn(async move {
            me.refresh(&name).await;
        });
    }

    /// Resolves `name` and stores the result.
    async fn refresh(&self, name: &str) -> Option<IpAddr> {
        let result = tokio::time::timeout(RESOLVE_TIMEOUT, self.lookup(name))
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
        let m = &self.metrics;
        let stored = match result {
            Ok((addrs, ttl)) => {
                let addrs: Vec<IpAddr> = addrs.into_iter().filter(usable).collect();
                if addrs.is_empty() {
                    m.names_resolve_failures.fetch_add(1, Ordering::Relaxed);
                    None
                } else {
                    m.names_resolved.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%name, addresses = ?addrs, ttl_s = ttl.as_secs(), "name resolved");
                    Some((addrs, ttl))
                }
            }
            Err(e) => {
                m.names_resolve_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%name, error = %e, "name did not resolve");
                None
            }
        };
        let mut cache = self.cache();
        let evicted = cache.put(name, Instant::now(), stored);
        m.names_cache_evicted
            .fetch_add(evicted as u64, Ordering::Relaxed);
        m.names_cached.store(cache.len() as u64, Ordering::Relaxed);
        match cache.get(name, Instant::now()) {
            Cached::Fresh(a) | Cached::Stale(a, _) => Some(a),
            _ => None,
        }
    }

    /// The addresses of `name`: from the system resolver (IPv4 ones first), or from the
    /// configured servers (`A`, and `AAAA` when a name has no `A` records).
    async fn lookup(&self, name: &str) -> Result<(Vec<IpAddr>, Duration), String> {
        if self.servers.is_empty() {
            let (mut v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = tokio::net::lookup_host((name, 0))
                .await
                .map_err(|e| e.to_string())?
                .map(|sa| sa.ip())
                .partition(IpAddr::is_ipv4);
            v4.extend(v6);
            return Ok((v4, self.system_ttl));
        }
        let mut last = String::from("no server answered");
        for server in &self.servers {
            let mut answer = ask(*server, name, false).await;
            if matches!(answer, Ok(AddressAnswer::NoAddress)) {
                answer = ask(*server, name, true).await;
            }
            match answer {
                Ok(AddressAnswer::Addresses(a, ttl)) => {
                    return Ok((a, Duration::from_secs(u64::from(ttl))))
                }
                Ok(AddressAnswer::NoAddress) => return Ok((Vec::new(), NEGATIVE_TTL)),
                Ok(AddressAnswer::Failed(e)) => last = e,
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// One `A` (or, with `v6`, `AAAA`) query to `server`.
async fn ask(server: SocketAddr, name: &str, v6: bool) -> Result<AddressAnswer, String> {
    let id: u16 = rand_id();
    let query = address_query(id, name, v6).ok_or("not a DNS name")?;
    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    sock.connect(server).await.map_err(|e| e.to_string())?;
    sock.send(&query).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = sock.recv(&mut buf).await.map_err(|e| e.to_string())?;
        if let Some(a) = parse_address_answer(id, &buf[..n]) {
            return Ok(a);
        }
    }
}

/// A query id nobody off the path can guess cheaply.
fn rand_id() -> u16 {
    let mut b = [0u8; 2];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        return 0x5a5a;
    }
    u16::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztna_proto::{NamePool, PortRange};

    /// A name with no `A` records but an `AAAA` one resolves to its IPv6 address through the
    /// configured server (a DNS server on loopback that answers `A` with no records).
    #[tokio::test]
    async fn a_name_with_only_aaaa_records_resolves_to_ipv6() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let v6: std::net::Ipv6Addr = "2001:db8::7".parse().unwrap();
        let answering = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let mut types = Vec::new();
            for _ in 0..2 {
                let (n, from) = server.recv_from(&mut buf).await.unwrap();
                let q = &buf[..n];
                let qtype = u16::from_be_bytes([q[n - 4], q[n - 3]]);
                types.push(qtype);
                let mut r = q.to_vec();
                r[2] = 0x81; // response, recursion desired
                r[3] = 0x80; // recursion available, NOERROR
                if qtype == 28 {
                    r[7] = 1; // one answer
                    r.extend_from_slice(&[0xc0, 0x0c, 0, 28, 0, 1, 0, 0, 0, 60, 0, 16]);
                    r.extend_from_slice(&v6.octets());
                }
                server.send_to(&r, from).await.unwrap();
            }
            types
        });
        let r = Resolver::new(
            vec![addr],
            Duration::from_secs(30),
            8,
            Arc::new(Metrics::default()),
        )
        .unwrap();
        assert_eq!(r.resolve("v6only.corp.example").await, Some(IpAddr::V6(v6)));
        assert_eq!(
            answering.await.unwrap(),
            [1, 28],
            "A asked first, then AAAA"
        );
    }

    fn svc(name: &str, patterns: &[&str], pool: [u8; 4]) -> ServiceDef {
        ServiceDef {
            name: name.into(),
            address: Ipv4Addr::from(pool),
            address6: None,
            udp: vec![],
            tcp: vec![PortRange::single(80)],
            icmp: false,
            connector: String::new(),
            names: Some(NamePool {
                patterns: patterns.iter().map(|p| p.to_string()).collect(),
                prefix_len: 24,
            }),
        }
    }

    fn mapping(a: [u8; 4], name: &str) -> NameMapping {
        NameMapping {
            address: Ipv4Addr::from(a),
            name: name.into(),
        }
    }

    /// A compromised agent (valid certificate) tries to make the connector resolve names it may
    /// not reach, or to use addresses outside the pool: every attempt is refused.
    #[test]
    fn a_lying_agent_cannot_map_names_outside_its_policy() {
        let services = vec![
            svc("wiki", &["wiki.corp.example"], [10, 101, 0, 0]),
            svc("secret", &["*.secret.corp.example"], [10, 102, 0, 0]),
        ];
        // Policy lets this agent reach wiki only.
        let allowed = vec![Ipv4Addr::new(10, 101, 0, 0)];
        let ok = check_mapping(
            &mapping([10, 101, 0, 7], "wiki.corp.example"),
            &services,
            &allowed,
        );
        assert_eq!(ok.map(|s| s.name.as_str()), Ok("wiki"));
        for (m, why) in [
            // A name of a service it may not reach, at that service's pool.
            (
                mapping([10, 102, 0, 7], "db.secret.corp.example"),
                MappingRefusal::NotAllowed,
            ),
            // The same name smuggled into the pool it may use.
            (
                mapping([10, 101, 0, 8], "db.secret.corp.example"),
                MappingRefusal::NameNotServed,
            ),
            // Any other name (an internal host, the metadata service) into its pool.
            (
                mapping([10, 101, 0, 9], "metadata.google.internal"),
                MappingRefusal::NameNotServed,
            ),
            // Addresses outside every pool, or the pool's network and broadcast addresses.
            (
                mapping([10, 100, 0, 1], "wiki.corp.example"),
                MappingRefusal::NotInPool,
            ),
            (
                mapping([127, 0, 0, 1], "wiki.corp.example"),
                MappingRefusal::NotInPool,
            ),
            (
                mapping([10, 101, 0, 0], "wiki.corp.example"),
                MappingRefusal::NotInPool,
            ),
            (
                mapping([10, 101, 0, 255], "wiki.corp.example"),
                MappingRefusal::NotInPool,
            ),
        ] {
            assert_eq!(
                check_mapping(&m, &services, &allowed).map(|_| ()),
                Err(why),
                "{m:?}"
            );
        }
        // An address service is never a pool.
        let mut plain = svc("plain", &["x.example.org"], [10, 103, 0, 0]);
        plain.names = None;
        assert_eq!(
            check_mapping(
                &mapping([10, 103, 0, 0], "x.example.org"),
                &[plain],
                &[Ipv4Addr::new(10, 103, 0, 0)]
            )
            .map(|_| ()),
            Err(MappingRefusal::NotInPool)
        );
    }

    #[test]
    fn agent_mappings_are_bounded() {
        let n = AgentNames::new(2);
        assert!(n.insert(Ipv4Addr::new(10, 0, 0, 1), "a.example.org".into()));
        assert!(n.insert(Ipv4Addr::new(10, 0, 0, 2), "b.example.org".into()));
        assert!(!n.insert(Ipv4Addr::new(10, 0, 0, 3), "c.example.org".into()));
        assert!(n.insert(Ipv4Addr::new(10, 0, 0, 1), "d.example.org".into()));
        assert_eq!(
            n.name_of(Ipv4Addr::new(10, 0, 0, 1)).as_deref(),
            Some("d.example.org")
        );
        assert_eq!(n.len(), 2);
    }

    #[test]
    fn cache_follows_ttls_and_refreshes_once() {
        let t0 = Instant::now();
        let a1 = IpAddr::from([192, 0, 2, 1]);
        let a2 = IpAddr::from([192, 0, 2, 2]);
        let mut c = NameCache::new(10);
        assert_eq!(c.get("w", t0), Cached::Missing(true));
        // One resolution at a time for a new name.
        assert_eq!(c.get("w", t0), Cached::Missing(false));
        c.put("w", t0, Some((vec![a1], Duration::from_secs(30))));
        assert_eq!(c.get("w", t0 + Duration::from_secs(29)), Cached::Fresh(a1));
        // Expired: one caller refreshes, the others keep using the old address.
        let t1 = t0 + Duration::from_secs(31);
        assert_eq!(c.get("w", t1), Cached::Stale(a1, true));
        assert_eq!(c.get("w", t1), Cached::Stale(a1, false));
        c.put("w", t1, Some((vec![a2], Duration::from_secs(1))));
        // TTLs are clamped to at least MIN_TTL.
        assert_eq!(c.get("w", t1 + Duration::from_secs(4)), Cached::Fresh(a2));
        assert_eq!(c.get("w", t1 + MIN_TTL), Cached::Stale(a2, true));
        // A failed refresh keeps the last address for NEGATIVE_TTL, then retries.
        let t2 = t1 + MIN_TTL;
        c.put("w", t2, None);
        assert_eq!(c.get("w", t2), Cached::Fresh(a2));
        assert_eq!(c.get("w", t2 + NEGATIVE_TTL), Cached::Stale(a2, true));
        // Names that never resolved are negative for NEGATIVE_TTL.
        c.put("x", t2, None);
        assert_eq!(c.get("x", t2), Cached::NoAddress);
        assert_eq!(c.get("x", t2 + NEGATIVE_TTL), Cached::Missing(true));
        assert_eq!(c.get("x", t2 + NEGATIVE_TTL), Cached::Missing(false));
        // Huge TTLs are clamped to MAX_TTL.
        c.put("y", t0, Some((vec![a1], Duration::from_secs(1 << 30))));
        assert_eq!(c.get("y", t0 + MAX_TTL), Cached::Stale(a1, true));
    }

    #[test]
    fn cache_is_bounded_lru() {
        let t0 = Instant::now();
        let a = IpAddr::from([192, 0, 2, 1]);
        let mut c = NameCache::new(2);
        // At most MAX_PENDING first resolutions at once.
        for i in 0..MAX_PENDING {
            assert_eq!(c.get(&format!("n{i}"), t0), Cached::Missing(true));
        }
        assert_eq!(c.get("one-more", t0), Cached::Missing(false));
        c.put("n0", t0, None);
        assert_eq!(c.get("one-more", t0), Cached::Missing(true));
        let mut c = NameCache::new(2);
        c.put("a", t0, Some((vec![a], Duration::from_secs(60))));
        c.put(
            "b",
            t0 + Duration::from_secs(1),
            Some((vec![a], Duration::from_secs(60))),
        );
        let _ = c.get("a", t0 + Duration::from_secs(2));
        assert_eq!(
            c.put(
                "c",
                t0 + Duration::from_secs(3),
                Some((vec![a], Duration::from_secs(60)))
            ),
            1
        );
        assert_eq!(c.len(), 2);
        assert_eq!(
            c.get("b", t0 + Duration::from_secs(4)),
            Cached::Missing(true)
        );
        assert_eq!(c.get("a", t0 + Duration::from_secs(4)), Cached::Fresh(a));
    }

    proptest::proptest! {
        /// Whatever an agent sends, an accepted mapping is in the pool of an allowed service
        /// that answers to the name.
        #[test]
        fn accepted_mappings_respect_policy(a in proptest::num::u32::ANY, name in "[a-z]{1,6}(\\.[a-z]{1,6}){0,3}", allow_secret in proptest::bool::ANY) {
            let services = vec![
                svc("wiki", &["wiki.corp.example", "*.w.corp.example"], [10, 101, 0, 0]),
                svc("secret", &["*.secret.corp.example"], [10, 102, 0, 0]),
            ];
            let mut allowed = vec![Ipv4Addr::new(10, 101, 0, 0)];
            if allow_secret {
                allowed.push(Ipv4Addr::new(10, 102, 0, 0));
            }
            let m = NameMapping { address: Ipv4Addr::from(a), name };
            if let Ok(s) = check_mapping(&m, &services, &allowed) {
                proptest::prop_assert!(allowed.contains(&s.address));
                proptest::prop_assert!(s.covers(m.address));
                proptest::prop_assert!(s.patterns().iter().any(|p| p.matches(&m.name)));
            }
        }
    }
}
