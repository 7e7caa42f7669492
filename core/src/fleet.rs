//! The relay fleet as agents and connectors see it: the configured relay list (addresses, or
//! DNS names that resolve to one relay per address) and the liveness check that tells a dead
//! relay from a quiet one fast enough to fail over within about a second (pure, injected time).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer};

/// How often relay names are resolved again (relays added to or removed from a DNS name are
/// picked up this often, and at once while no relay is known).
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(60);
/// How soon to resolve again while a name gives no usable address.
pub const RESOLVE_RETRY: Duration = Duration::from_secs(2);
/// Most relays taken from the list (after resolving): each costs a session.
pub const MAX_RELAYS: usize = 16;

/// One entry of the relay list: `host:port`, where `host` is an IP address (IPv6 in brackets)
/// or a DNS name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RelaySpec {
    host: String,
    port: u16,
}

impl RelaySpec {
    /// Parses `host:port`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(a) = s.parse::<SocketAddr>() {
            if a.ip().is_unspecified() || a.port() == 0 {
                return Err(format!("relay {s:?} is not an address one can connect to"));
            }
            return Ok(Self {
                host: a.ip().to_string(),
                port: a.port(),
            });
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("relay {s:?}: expected host:port"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("relay {s:?}: bad port"))?;
        let valid = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !valid {
            return Err(format!(
                "relay {s:?}: {host:?} is neither an IP address nor a DNS name"
            ));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }

    /// The address, when the host is an IP address.
    pub fn literal(&self) -> Option<SocketAddr> {
        let ip: std::net::IpAddr = self.host.parse().ok()?;
        Some(SocketAddr::new(ip, self.port))
    }
}

impl std::fmt::Display for RelaySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.literal() {
            Some(a) => write!(f, "{a}"),
            None => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

/// Deserializes a relay list from a list of strings or one string of comma- or space-separated
/// entries (the form an environment variable takes: `ZTNA_RELAYS="a:4433,b:4433"`).
pub fn deserialize_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        One(String),
        Many(Vec<String>),
    }
    Ok(Option::<Form>::deserialize(d)?.map(|f| match f {
        Form::One(s) => s
            .split([',', ' '])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        Form::Many(v) => v,
    }))
}

/// Parses and checks a relay list: at least one entry, no duplicates.
pub fn parse_list(entries: &[String]) -> Result<Vec<RelaySpec>, String> {
    let mut out: Vec<RelaySpec> = Vec::new();
    for e in entries {
        let spec = RelaySpec::parse(e)?;
        if out.contains(&spec) {
            return Err(format!("relay {e:?} is listed twice"));
        }
        out.push(spec);
    }
    if out.is_empty() {
        return Err("the relay list is empty".into());
    }
    Ok(out)
}

/// Resolves every entry to the addresses of `v4`'s family (the socket's), in list order,
/// without duplicates, at most [`MAX_RELAYS`]. Entries that fail to resolve are reported in the
/// second list (as `entry: error`) and skipped.
pub async fn resolve(specs: &[RelaySpec], v4: bool) -> (Vec<SocketAddr>, Vec<String>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for spec in specs {
        let found: Vec<SocketAddr> = match spec.literal() {
            Some(a) => vec![a],
            None => match tokio::net::lookup_host((spec.host.as_str(), spec.port)).await {
                Ok(it) => it.collect(),
                Err(e) => {
                    errors.push(format!("{spec}: {e}"));
                    continue;
                }
            },
        };
        let usable: Vec<SocketAddr> = found
            .into_iter()
            .filter(|a| a.is_ipv4() == v4 && !a.ip().is_unspecified())
            .collect();
        if usable.is_empty() {
            errors.push(format!(
                "{spec}: no {} address",
                if v4 { "IPv4" } else { "IPv6" }
            ));
        }
        for a in usable {
            if !out.contains(&a) && out.len() < MAX_RELAYS {
                out.push(a);
            }
        }
    }
    (out, errors)
}

/// The relay list as it resolves over time, for the agents and the connector alike.
#[derive(Debug)]
pub struct Resolver {
    specs: Vec<RelaySpec>,
    v4: bool,
    /// Waited before the next lookup (none before the first).
    wait: Option<Duration>,
    last_errors: Vec<String>,
    /// A list of addresses only was returned once: nothing can change.
    done: bool,
}

impl Resolver {
    /// A resolver of `specs` to addresses of `v4`'s family (the socket's).
    pub fn new(specs: Vec<RelaySpec>, v4: bool) -> Self {
        Self {
            specs,
            v4,
            wait: None,
            last_errors: Vec::new(),
            done: false,
        }
    }

    /// The addresses when every entry is one (nothing to resolve), else `None`.
    pub fn literals(&self) -> Option<Vec<SocketAddr>> {
        self.specs.iter().map(RelaySpec::literal).collect()
    }

    /// The relay addresses: at once on the first call, then each non-empty answer of a lookup
    /// every [`RESOLVE_INTERVAL`] (every [`RESOLVE_RETRY`] while nothing resolves). A failed
    /// name is logged when the set of failures changes. For a list of addresses only, the
    /// first answer is the last: later calls never return.
    pub async fn next(&mut self) -> Vec<SocketAddr> {
        loop {
            if self.done {
                return std::future::pending().await;
            }
            if let Some(d) = self.wait.take() {
                tokio::time::sleep(d).await;
            }
            let (addrs, errors) = resolve(&self.specs, self.v4).await;
            if errors != self.last_errors {
                for e in &errors {
                    tracing::warn!(error = %e, "a relay name did not resolve");
                }
                self.last_errors = errors;
            }
            if addrs.is_empty() {
                self.wait = Some(RESOLVE_RETRY);
                continue;
            }
            self.wait = Some(RESOLVE_INTERVAL);
            self.done = self.literals().is_some();
            return addrs;
        }
    }
}

/// The relay list from `relay` (one) or `relays` (several), checked against the socket's
/// address `bind` (its family). The config keys of the agents and the connector.
pub fn relay_list(
    relay: Option<String>,
    relays: Option<Vec<String>>,
    bind: SocketAddr,
) -> anyhow::Result<Vec<RelaySpec>> {
    let entries = match (relay, relays) {
        (Some(_), Some(_)) => {
            anyhow::bail!("give either `relay` (one relay) or `relays` (a list), not both")
        }
        (Some(one), None) => vec![one],
        (None, Some(list)) => list,
        (None, None) => anyhow::bail!(
            "missing `relays`: the relays' UDP addresses or DNS names with ports, e.g. relays = [\"203.0.113.10:4433\"] (or --relay, ZTNA_RELAYS)"
        ),
    };
    let specs = parse_list(&entries).map_err(|e| anyhow::anyhow!("`relays`: {e}"))?;
    for a in specs.iter().filter_map(RelaySpec::literal) {
        if a.is_ipv4() != bind.is_ipv4() {
            anyhow::bail!("`bind` = {bind} and relay {a} are in different address families");
        }
    }
    if specs.len() > MAX_RELAYS {
        anyhow::bail!("`relays`: at most {MAX_RELAYS} entries");
    }
    Ok(specs)
}

/// What [`Liveness::observe`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to do.
    Fine,
    /// Traffic through the relay stopped coming back: ask the relay if it is there (a control
    /// `Ping` with this number).
    Ping(u64),
    /// The relay did not answer the ping in time: treat its session as dead.
    Dead,
}

/// Watches the channels of one relay session: when packets go out through the relay and
/// nothing comes back for [`Liveness::suspect_after`], it asks for a ping; when the relay does
/// not answer that within [`Liveness::confirm_within`], the relay is dead. A quiet tunnel (no
/// packets out) is never suspected; the session's keepalives and idle timeout cover it.
#[derive(Debug, Clone)]
pub struct Liveness {
    tx: u64,
    rx: u64,
    /// When packets first went out after the last packet came in.
    waiting_since: Option<Instant>,
    ping: Option<(u64, Instant)>,
    next_nonce: u64,
}

impl Liveness {
    /// A watcher starting from the given counters.
    pub fn new(tx: u64, rx: u64, nonce_seed: u64) -> Self {
        Self {
            tx,
            rx,
            waiting_since: None,
            ping: None,
            next_nonce: nonce_seed,
        }
    }

    /// How long packets may go unanswered before the relay is asked: three RTTs plus the
    /// peer's ACK delay, at least 400 ms (so a busy peer is not suspected) and at most 1.5 s.
    pub fn suspect_after(rtt: Duration) -> Duration {
        (rtt * 3 + Duration::from_millis(200))
            .clamp(Duration::from_millis(400), Duration::from_millis(1500))
    }

    /// How long the relay has to answer the ping: two RTTs plus 200 ms, between 300 ms and 1 s.
    pub fn confirm_within(rtt: Duration) -> Duration {
        (rtt * 2 + Duration::from_millis(200))
            .clamp(Duration::from_millis(300), Duration::from_secs(1))
    }

    /// Feeds the channels' packet counters (sent through the relay, received from it) and the
    /// session's RTT at `now`.
    pub fn observe(&mut self, now: Instant, tx: u64, rx: u64, rtt: Duration) -> Verdict {
        if rx != self.rx {
            self.rx = rx;
            self.tx = tx;
            self.waiting_since = None;
            self.ping = None;
            return Verdict::Fine;
        }
        if tx != self.tx {
            self.tx = tx;
            self.waiting_since.get_or_insert(now);
        }
        if let Some((_, sent)) = self.ping {
            if now.saturating_duration_since(sent) >= Self::confirm_within(rtt) {
                return Verdict::Dead;
            }
            return Verdict::Fine;
        }
        match self.waiting_since {
            Some(since) if now.saturating_duration_since(since) >= Self::suspect_after(rtt) => {
                let n = self.next_nonce;
                self.next_nonce = self.next_nonce.wrapping_add(1);
                self.ping = Some((n, now));
                Verdict::Ping(n)
            }
            _ => Verdict::Fine,
        }
    }

    /// The relay answered ping `nonce`: it is alive (the silence is the peer's or the path
    /// beyond the relay); watch afresh.
    pub fn pong(&mut self, nonce: u64) {
        if self.ping.is_some_and(|(n, _)| n == nonce) {
            self.ping = None;
            self.waiting_since = None;
        }
    }

    /// Whether a ping is outstanding.
    pub fn pinging(&self) -> bool {
        self.ping.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn specs_parse_addresses_and_names() {
        let a = RelaySpec::parse("192.0.2.1:4433").unwrap();
        assert_eq!(a.literal(), Some("192.0.2.1:4433".parse().unwrap()));
        let v6 = RelaySpec::parse("[2001:db8::1]:4433").unwrap();
        assert_eq!(v6.literal(), Some("[2001:db8::1]:4433".parse().unwrap()));
        assert_eq!(v6.to_string(), "[2001:db8::1]:4433");
        let n = RelaySpec::parse(" relays.example.com:4433 ").unwrap();
        assert_eq!(n.literal(), None);
        assert_eq!(n.to_string(), "relays.example.com:4433");
        for bad in [
            "",
            "relay",
            "relay:0",
            "relay:99999",
            "0.0.0.0:4433",
            "a..b:1",
            "-a.example:1",
            "bad_name:1",
            "192.0.2.1:0",
        ] {
            assert!(RelaySpec::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_list(&[]).is_err());
        assert!(parse_list(&["a:1".into(), "a:1".into()]).is_err());
        assert_eq!(parse_list(&["a:1".into(), "b:1".into()]).unwrap().len(), 2);
    }

    #[test]
    fn lists_come_as_arrays_or_one_string() {
        #[derive(Deserialize)]
        struct C {
            #[serde(default, deserialize_with = "deserialize_list")]
            relays: Option<Vec<String>>,
        }
        let c: C = serde_json::from_str(r#"{"relays": "a:1, b:2 c:3"}"#).unwrap();
        assert_eq!(c.relays.unwrap(), ["a:1", "b:2", "c:3"]);
        let c: C = serde_json::from_str(r#"{"relays": ["a:1", "b:2"]}"#).unwrap();
        assert_eq!(c.relays.unwrap(), ["a:1", "b:2"]);
        let c: C = serde_json::from_str("{}").unwrap();
        assert!(c.relays.is_none());
    }

    #[tokio::test]
    async fn resolving_keeps_the_family_and_order_and_reports_failures() {
        let specs = parse_list(&[
            "192.0.2.2:4433".into(),
            "localhost:4433".into(),
            "192.0.2.2:4433".into(),
        ]);
        assert!(specs.is_err(), "duplicates refused");
        let specs = parse_list(&[
            "192.0.2.2:4433".into(),
            "[2001:db8::1]:4433".into(),
            "localhost:4434".into(),
            "no-such-name.invalid:4433".into(),
        ])
        .unwrap();
        let (addrs, errors) = resolve(&specs, true).await;
        assert_eq!(addrs[0], "192.0.2.2:4433".parse::<SocketAddr>().unwrap());
        assert!(
            addrs.contains(&"127.0.0.1:4434".parse().unwrap()),
            "{addrs:?}"
        );
        assert!(addrs.iter().all(|a| a.is_ipv4()));
        assert_eq!(errors.len(), 2, "{errors:?}");
    }

    #[tokio::test]
    async fn a_resolver_answers_at_once_and_a_list_of_addresses_only_once() {
        let literal = parse_list(&["192.0.2.2:4433".into()]).unwrap();
        let mut r = Resolver::new(literal, true);
        assert_eq!(r.literals(), Some(vec!["192.0.2.2:4433".parse().unwrap()]));
        assert_eq!(
            r.next().await,
            ["192.0.2.2:4433".parse::<SocketAddr>().unwrap()]
        );
        let again = tokio::time::timeout(Duration::from_millis(50), r.next()).await;
        assert!(again.is_err(), "nothing more to say about addresses");
        let named = parse_list(&["localhost:4434".into()]).unwrap();
        let mut r = Resolver::new(named, true);
        assert_eq!(r.literals(), None);
        assert!(r.next().await.contains(&"127.0.0.1:4434".parse().unwrap()));
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_dead_relay_is_found_within_a_second_at_lan_rtt() {
        let t0 = Instant::now();
        let rtt = MS;
        let mut l = Liveness::new(0, 0, 7);
        // Traffic both ways: fine.
        for i in 1..=10u64 {
            assert_eq!(
                l.observe(t0 + MS * (i as u32 * 100), i, i, rtt),
                Verdict::Fine
            );
        }
        // The relay dies at 1 s: packets keep going out, nothing comes back.
        let mut now = t0 + Duration::from_secs(1);
        let mut tx = 10;
        let mut pinged = None;
        let mut dead = None;
        for _ in 0..30 {
            now += MS * 100;
            tx += 1;
            match l.observe(now, tx, 10, rtt) {
                Verdict::Ping(_) => pinged = pinged.or(Some(now)),
                Verdict::Dead => {
                    dead = Some(now);
                    break;
                }
                Verdict::Fine => {}
            }
        }
        let pinged = pinged.expect("pinged");
        let dead = dead.expect("declared dead");
        let since = t0 + Duration::from_millis(1100);
        assert!(
            pinged - since >= Duration::from_millis(400),
            "{:?}",
            pinged - since
        );
        assert!(
            dead - since <= Duration::from_millis(900),
            "{:?}",
            dead - since
        );
    }

    #[test]
    fn a_pong_clears_suspicion_and_quiet_tunnels_are_never_suspected() {
        let t0 = Instant::now();
        let rtt = 20 * MS;
        let mut l = Liveness::new(5, 5, 1);
        // Nothing goes out: never suspected however long.
        for i in 1..100u32 {
            assert_eq!(l.observe(t0 + MS * (i * 100), 5, 5, rtt), Verdict::Fine);
        }
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(l.observe(t1, 6, 5, rtt), Verdict::Fine);
        let Verdict::Ping(n) = l.observe(t1 + Liveness::suspect_after(rtt), 7, 5, rtt) else {
            panic!("expected a ping");
        };
        assert!(l.pinging());
        l.pong(n + 1);
        assert!(l.pinging(), "a wrong nonce is ignored");
        l.pong(n);
        assert!(!l.pinging());
        let t2 = t1 + Liveness::suspect_after(rtt) + 10 * MS;
        assert_eq!(l.observe(t2, 7, 5, rtt), Verdict::Fine);
        // Incoming traffic also clears an outstanding ping.
        assert_eq!(l.observe(t2 + 10 * MS, 8, 5, rtt), Verdict::Fine);
        let t3 = t2 + 10 * MS + Liveness::suspect_after(rtt);
        assert!(matches!(l.observe(t3, 9, 5, rtt), Verdict::Ping(_)));
        assert_eq!(l.observe(t3 + MS, 9, 6, rtt), Verdict::Fine);
        assert!(!l.pinging());
    }

    proptest! {
        /// Whatever the counters do, a relay is declared dead only after a ping went unanswered
        /// for the confirm time, and never while packets keep coming in.
        #[test]
        fn dead_only_after_an_unanswered_ping(steps in proptest::collection::vec((0u64..3, 0u64..2, 1u64..300), 1..200), rtt_ms in 0u64..200) {
            let rtt = Duration::from_millis(rtt_ms);
            let t0 = Instant::now();
            let mut l = Liveness::new(0, 0, 0);
            let (mut tx, mut rx, mut now) = (0u64, 0u64, t0);
            let mut ping_at: Option<Instant> = None;
            for (dtx, drx, dt) in steps {
                now += Duration::from_millis(dt);
                tx += dtx;
                rx += drx;
                match l.observe(now, tx, rx, rtt) {
                    Verdict::Ping(_) => {
                        prop_assert!(ping_at.is_none());
                        ping_at = Some(now);
                    }
                    Verdict::Dead => {
                        prop_assert_eq!(drx, 0);
                        let at = ping_at.expect("a ping first");
                        prop_assert!(now - at >= Liveness::confirm_within(rtt));
                        return Ok(());
                    }
                    Verdict::Fine => {
                        if drx > 0 {
                            ping_at = None;
                        }
                    }
                }
            }
        }
    }
}
