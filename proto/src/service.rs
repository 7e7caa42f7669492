//! Service definitions as the relay, the connector and the agent see them.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An inclusive range of ports, `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortRange {
    /// First port in the range.
    pub first: u16,
    /// Last port in the range (inclusive).
    pub last: u16,
}

impl PortRange {
    /// A range holding one port.
    pub fn single(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }

    /// Whether the range is well formed (`first <= last`, and port 0 is not in it).
    pub fn is_valid(&self) -> bool {
        self.first != 0 && self.first <= self.last
    }
}

/// Why a port range did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid port range {0:?}: expected PORT or FIRST-LAST with 1 <= FIRST <= LAST <= 65535")]
pub struct PortRangeError(pub String);

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PortRangeError(s.to_owned());
        let s = s.trim();
        let range = match s.split_once('-') {
            Some((a, b)) => PortRange {
                first: a.trim().parse().map_err(|_| err())?,
                last: b.trim().parse().map_err(|_| err())?,
            },
            None => PortRange::single(s.parse().map_err(|_| err())?),
        };
        if range.is_valid() {
            Ok(range)
        } else {
            Err(err())
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// A service: one virtual address and the ports and protocols reachable on it.
///
/// Connectors announce these to the relay (without their backend addresses, which stay private
/// to the connector), and the relay hands the ones policy allows to agents, with the name of the
/// connector that serves each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDef {
    /// Unique name of the service, which policy refers to.
    pub name: String,
    /// Virtual IPv4 address that agents route into the tunnel.
    pub address: Ipv4Addr,
    /// Virtual IPv6 address of the same service, if it has one (a name service: the first
    /// address of its IPv6 pool, as large as its IPv4 pool; the address at offset `i` of one
    /// pool stands for the same name as the address at offset `i` of the other). What family
    /// the backend has is the connector's business: it ends every flow at a socket of its own.
    pub address6: Option<Ipv6Addr>,
    /// UDP ports served.
    pub udp: Vec<PortRange>,
    /// TCP ports served.
    pub tcp: Vec<PortRange>,
    /// Whether ICMP echo to the address is answered.
    pub icmp: bool,
    /// Identity of the connector serving it. Empty in a connector's own announcement; the relay
    /// fills it in from the connector's certificate.
    pub connector: String,
    /// For a name service: the names it answers to and its pool of virtual addresses, which
    /// starts at `address`. `None` for a service at one address.
    pub names: Option<NamePool>,
}

/// What makes a [`ServiceDef`] a name service: DNS name patterns (`wiki.corp.example`,
/// `*.corp.example`, see [`crate::names::DomainPattern`]) and the length of the prefix of its
/// virtual address pool (`address/prefix_len`). The agent answers DNS queries for matching
/// names with addresses from the pool; the connector resolves the real name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamePool {
    /// Name patterns, normalized.
    pub patterns: Vec<String>,
    /// Prefix length of the pool (16 to 30).
    pub prefix_len: u8,
}

/// Shortest and longest prefix a name service's pool may have.
pub const NAME_POOL_PREFIX: std::ops::RangeInclusive<u8> = 16..=30;
/// Most patterns one name service may have.
pub const MAX_NAME_PATTERNS: usize = 64;

/// Longest service or identity name accepted anywhere in the protocol.
pub const MAX_NAME_LEN: usize = 253;

impl ServiceDef {
    /// Whether a UDP datagram to `port` is allowed.
    pub fn allows_udp(&self, port: u16) -> bool {
        self.udp.iter().any(|r| r.contains(port))
    }

    /// Whether a TCP segment to `port` is allowed.
    pub fn allows_tcp(&self, port: u16) -> bool {
        self.tcp.iter().any(|r| r.contains(port))
    }

    /// The addresses of the service: its pool for a name service, else its one address.
    pub fn prefix(&self) -> ipnet::Ipv4Net {
        let len = self.names.as_ref().map_or(32, |n| n.prefix_len);
        ipnet::Ipv4Net::new(self.address, len)
            .unwrap_or_else(|_| ipnet::Ipv4Net::from(self.address))
            .trunc()
    }

    /// The IPv6 addresses of the service, if it has any: its IPv6 pool for a name service (as
    /// many addresses as its IPv4 pool), else its one IPv6 address.
    pub fn prefix6(&self) -> Option<ipnet::Ipv6Net> {
        Some(pool6(self.address6?, self.prefix().prefix_len()))
    }

    /// Whether `addr` is an IPv6 address of the service.
    pub fn covers6(&self, addr: Ipv6Addr) -> bool {
        self.prefix6().is_some_and(|n| n.contains(&addr))
    }

    /// The IPv6 address standing for the same thing as `v4` (the same offset in the pools).
    pub fn to_v6(&self, v4: Ipv4Addr) -> Option<Ipv6Addr> {
        pair(self.prefix(), self.prefix6()?, v4)
    }

    /// The IPv4 address standing for the same thing as `v6` (the same offset in the pools).
    pub fn to_v4(&self, v6: Ipv6Addr) -> Option<Ipv4Addr> {
        let net = self.prefix6()?;
        if !net.contains(&v6) {
            return None;
        }
        let offset = u32::try_from(u128::from(v6) - u128::from(net.network())).ok()?;
        Some(Ipv4Addr::from(
            u32::from(self.prefix().network()).checked_add(offset)?,
        ))
    }

    /// Whether `addr` is an address of the service (its address, or in its pool).
    pub fn covers(&self, addr: Ipv4Addr) -> bool {
        match &self.names {
            None => addr == self.address,
            Some(_) => self.prefix().contains(&addr),
        }
    }

    /// The name patterns of a name service, parsed (invalid ones skipped: [`Self::validate`]
    /// refuses them).
    pub fn patterns(&self) -> Vec<crate::names::DomainPattern> {
        self.names
            .iter()
            .flat_map(|n| &n.patterns)
            .filter_map(|p| crate::names::DomainPattern::parse(p).ok())
            .collect()
    }

    /// Checks the fields that a peer could get wrong: a usable name, valid port ranges, and a
    /// unicast address; for a name service, valid patterns and a pool that starts at `address`.
    pub fn validate(&self) -> Result<(), String> {
        check_name("service name", &self.name)?;
        if let Some(n) = &self.names {
            if !NAME_POOL_PREFIX.contains(&n.prefix_len) {
                return Err(format!(
                    "service {}: pool prefix /{} outside /{}../{}",
                    self.name,
                    n.prefix_len,
                    NAME_POOL_PREFIX.start(),
                    NAME_POOL_PREFIX.end()
                ));
            }
            if self.prefix().network() != self.address {
                return Err(format!(
                    "service {}: pool {}/{} does not start at its network address",
                    self.name, self.address, n.prefix_len
                ));
            }
            if n.patterns.is_empty() || n.patterns.len() > MAX_NAME_PATTERNS {
                return Err(format!(
                    "service {}: 1 to {MAX_NAME_PATTERNS} name patterns needed",
                    self.name
                ));
            }
            for p in &n.patterns {
                let parsed = crate::names::DomainPattern::parse(p)
                    .map_err(|e| format!("service {}: {e}", self.name))?;
                if parsed.to_string() != *p {
                    return Err(format!(
                        "service {}: pattern {} is not normalized",
                        self.name,
                        escape_for_log(p)
                    ));
                }
            }
        }
        let a = self.address;
        if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
            return Err(format!(
                "service {}: address {a} is not a unicast address",
                self.name
            ));
        }
        if let Some(a6) = self.address6 {
            check_address6(&self.name, a6, self.prefix().prefix_len())?;
        }
        if let Some(r) = self.udp.iter().chain(&self.tcp).find(|r| !r.is_valid()) {
            return Err(format!("service {}: invalid port range {r:?}", self.name));
        }
        if self.udp.is_empty() && self.tcp.is_empty() && !self.icmp {
            return Err(format!("service {}: no ports and no ICMP", self.name));
        }
        Ok(())
    }
}

/// The agents' IPv6 tunnel addresses: an agent whose IPv4 tunnel address is `a.b.c.d` has
/// `fd7a:7a74:6e61:7475::a.b.c.d` as well (this /96 with the IPv4 address in its low 32 bits),
/// so the relay assigns one address and every end derives the other.
pub const TUNNEL_V6_PREFIX: Ipv6Addr = Ipv6Addr::new(0xfd7a, 0x7a74, 0x6e61, 0x7475, 0, 0, 0, 0);

/// The IPv6 tunnel address of the agent whose IPv4 tunnel address is `v4`.
pub fn tunnel_ipv6(v4: Ipv4Addr) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(TUNNEL_V6_PREFIX) | u128::from(u32::from(v4)))
}

/// The address at the offset of `v4` in `pool` in the IPv6 pool `pool6` (as large as `pool`,
/// [`pool6`]), or `None` if `v4` is not in `pool`.
pub fn pair(pool: ipnet::Ipv4Net, pool6: ipnet::Ipv6Net, v4: Ipv4Addr) -> Option<Ipv6Addr> {
    if !pool.contains(&v4) {
        return None;
    }
    let offset = u32::from(v4) - u32::from(pool.network());
    Some(Ipv6Addr::from(
        u128::from(pool6.network()) + u128::from(offset),
    ))
}

/// The IPv4 tunnel address inside `v6`, if `v6` is an IPv6 tunnel address.
pub fn tunnel_ipv4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let x = u128::from(v6);
    (x >> 32 == u128::from(TUNNEL_V6_PREFIX) >> 32).then(|| Ipv4Addr::from(x as u32))
}

/// The IPv6 addresses that start at `address6` and pair with an IPv4 pool of prefix
/// `v4_prefix_len` (as many addresses: a /24 pool pairs with a /120): a service's one IPv6
/// address, or a name service's IPv6 pool.
pub fn pool6(address6: Ipv6Addr, v4_prefix_len: u8) -> ipnet::Ipv6Net {
    ipnet::Ipv6Net::new(address6, 96 + v4_prefix_len.min(32)).map_or(address6.into(), |n| n.trunc())
}

/// Checks `address6` as the IPv6 address (or IPv6 pool start) of a service whose IPv4 pool has
/// prefix `v4_prefix_len`: [`check_service_v6`], and the pool starts at a network address of
/// its size. Returns the pool.
pub fn check_address6(
    service: &str,
    address6: Ipv6Addr,
    v4_prefix_len: u8,
) -> Result<ipnet::Ipv6Net, String> {
    check_service_v6(service, address6)?;
    let pool = pool6(address6, v4_prefix_len);
    if pool.network() != address6 {
        return Err(format!(
            "service {service}: IPv6 pool at {address6} does not start at a network address of \
             its size (/{})",
            pool.prefix_len()
        ));
    }
    Ok(pool)
}

/// The /48 (`fd00:7a74:6e61::/48`) the path multiplexer takes its IPv6 virtual peer addresses
/// from (`ztna_core::mux`), as its first three segments.
pub const MUX_VIRTUAL_V6: [u16; 3] = [0xfd00, 0x7a74, 0x6e61];

/// Checks that `a` can be a service's virtual IPv6 address: global or unique-local unicast, not
/// IPv4-mapped, outside the tunnel addresses and the range the path multiplexer uses for its
/// own virtual addresses (`fd00:7a74:6e61::/48`).
pub fn check_service_v6(service: &str, a: Ipv6Addr) -> Result<(), String> {
    let s = a.segments();
    let bad = a.is_unspecified()
        || a.is_loopback()
        || a.is_multicast()
        || a.is_unicast_link_local()
        || a.to_ipv4_mapped().is_some()
        || tunnel_ipv4(a).is_some()
        || s[..3] == MUX_VIRTUAL_V6;
    if bad {
        return Err(format!(
            "service {service}: {a} cannot be a service's IPv6 address (unicast, not \
             link-local, not IPv4-mapped, outside {TUNNEL_V6_PREFIX}/96 and fd00:7a74:6e61::/48)"
        ));
    }
    Ok(())
}

/// Whether `name` is acceptable as a name that crosses the network: a service name, an
/// identity (certificate common name), a group or a connector name.
///
/// The one rule, used by the relay, the connector, the agent and `pki issue`: 1 to
/// [`MAX_NAME_LEN`] bytes, the first a lowercase ASCII letter or digit, the rest lowercase ASCII
/// letters, digits, `.`, `-`, `_` or `@` (`[a-z0-9][a-z0-9._@-]{0,252}`). Lowercase only, so two
/// identities can't differ by case alone; no spaces, control characters or escapes, so a name
/// that passes is safe to log as is. A name that fails is logged only through
/// [`escape_for_log`].
pub fn is_valid_name(name: &str) -> bool {
    let lower_alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match name.as_bytes() {
        [] => false,
        [first, rest @ ..] => {
            name.len() <= MAX_NAME_LEN
                && lower_alnum(*first)
                && rest
                    .iter()
                    .all(|&b| lower_alnum(b) || matches!(b, b'.' | b'-' | b'_' | b'@'))
        }
    }
}

/// Most characters of an untrusted string that [`escape_for_log`] keeps.
pub const LOG_ESCAPE_MAX: usize = 64;

/// An untrusted string made safe for a log line or an error message: at most
/// [`LOG_ESCAPE_MAX`] characters, with every control character, quote and backslash escaped
/// (Rust `escape_debug`), and `...` when cut. Nothing of it can start a new line or a terminal
/// escape sequence.
pub fn escape_for_log(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(LOG_ESCAPE_MAX)
        .flat_map(char::escape_debug)
        .collect();
    if s.chars().nth(LOG_ESCAPE_MAX).is_some() {
        out.push_str("...");
    }
    out
}

/// Checks a name from the network with [`is_valid_name`]; the error carries the name escaped
/// with [`escape_for_log`].
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(format!(
            "invalid {what} \"{}\" (names are [a-z0-9][a-z0-9._@-]*, at most {MAX_NAME_LEN} bytes)",
            escape_for_log(name)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse() {
        assert_eq!("53".parse::<PortRange>(), Ok(PortRange::single(53)));
        assert_eq!(
            "8000-8010".parse::<PortRange>(),
            Ok(PortRange {
                first: 8000,
                last: 8010
            })
        );
        assert!("0".parse::<PortRange>().is_err());
        assert!("10-5".parse::<PortRange>().is_err());
        assert!("70000".parse::<PortRange>().is_err());
        assert!("a-b".parse::<PortRange>().is_err());
        assert_eq!(PortRange { first: 1, last: 9 }.to_string(), "1-9");
    }

    #[test]
    fn tunnel_addresses_map_both_ways() {
        let v4 = Ipv4Addr::new(100, 64, 3, 9);
        let v6 = tunnel_ipv6(v4);
        assert_eq!(
            v6,
            "fd7a:7a74:6e61:7475::6440:309".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(tunnel_ipv4(v6), Some(v4));
        assert_eq!(tunnel_ipv4("fd7a:7a74:6e61:7476::1".parse().unwrap()), None);
        assert!(check_service_v6("s", v6).is_err());
        assert!(check_service_v6("s", "fd00:1::1".parse().unwrap()).is_ok());
        assert!(check_service_v6("s", "2001:db8::1".parse().unwrap()).is_ok());
        for bad in [
            "::",
            "::1",
            "ff02::1",
            "fe80::1",
            "::ffff:1.2.3.4",
            "fd00:7a74:6e61::1",
        ] {
            assert!(
                check_service_v6("s", bad.parse().unwrap()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn name_pools_pair_their_ipv4_and_ipv6_addresses_by_offset() {
        let mut svc = ServiceDef {
            name: "wiki".into(),
            address: Ipv4Addr::new(10, 101, 0, 0),
            address6: Some("fd00:9::100".parse().unwrap()),
            udp: vec![],
            tcp: vec![PortRange::single(80)],
            icmp: false,
            connector: String::new(),
            names: Some(NamePool {
                patterns: vec!["*.corp.example".into()],
                prefix_len: 24,
            }),
        };
        svc.validate().unwrap();
        assert_eq!(svc.prefix6().unwrap().to_string(), "fd00:9::100/120");
        let v4 = Ipv4Addr::new(10, 101, 0, 7);
        let v6: Ipv6Addr = "fd00:9::107".parse().unwrap();
        assert_eq!(svc.to_v6(v4), Some(v6));
        assert_eq!(svc.to_v4(v6), Some(v4));
        assert!(svc.covers6(v6) && !svc.covers6("fd00:9::200".parse().unwrap()));
        assert_eq!(svc.to_v6(Ipv4Addr::new(10, 101, 1, 0)), None);
        assert_eq!(svc.to_v4("fd00:9::200".parse().unwrap()), None);
        svc.address6 = Some("fd00:9::180".parse().unwrap());
        assert!(svc.validate().is_err(), "an IPv6 pool must be aligned");
        svc.names = None;
        svc.address = v4;
        svc.validate().unwrap();
        assert_eq!(svc.to_v6(v4), svc.address6);
        assert_eq!(svc.to_v6(Ipv4Addr::new(10, 101, 0, 8)), None);
    }

    #[test]
    fn names() {
        assert!(is_valid_name("alice@example.org"));
        assert!(is_valid_name("conn1.example.org"));
        assert!(is_valid_name("0day_svc-1"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("a b"));
        assert!(!is_valid_name("Alice"));
        assert!(!is_valid_name(".hidden"));
        assert!(!is_valid_name("-x"));
        assert!(!is_valid_name("x\u{1b}[31m"));
        assert!(!is_valid_name("x\ny"));
        assert!(!is_valid_name("caf\u{e9}"));
        assert!(is_valid_name(&"x".repeat(253)));
        assert!(!is_valid_name(&"x".repeat(254)));
    }

    #[test]
    fn escaping_for_logs() {
        assert_eq!(escape_for_log("plain"), "plain");
        let evil = "\u{1b}[2J\nINFO fake line\r\"quoted\"";
        let e = escape_for_log(evil);
        assert!(!e.chars().any(char::is_control), "{e}");
        assert!(e.contains("\\u{1b}") && e.contains("\\n"));
        let long = escape_for_log(&"a".repeat(1000));
        assert_eq!(long.len(), LOG_ESCAPE_MAX + 3);
        let err = check_name("service name", evil).unwrap_err();
        assert!(!err.chars().any(char::is_control), "{err}");
        assert!(check_name("service name", "ok").is_ok());
    }

    proptest::proptest! {
        #[test]
        fn escaped_strings_have_no_control_characters(s in "\\PC*|[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}]*") {
            let e = escape_for_log(&s);
            proptest::prop_assert!(!e.chars().any(char::is_control));
            proptest::prop_assert!(e.chars().count() <= LOG_ESCAPE_MAX * 10 + 3);
        }

        #[test]
        fn valid_names_are_printable_ascii(s in "\\PC{0,80}") {
            if is_valid_name(&s) {
                proptest::prop_assert!(s.bytes().all(|b| b.is_ascii_graphic()));
            }
        }
    }
}
