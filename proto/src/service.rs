//! Service definitions as the relay, the connector and the agent see them.

use std::fmt;
use std::net::Ipv4Addr;
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
    /// UDP ports served.
    pub udp: Vec<PortRange>,
    /// TCP ports served.
    pub tcp: Vec<PortRange>,
    /// Whether ICMP echo to the address is answered.
    pub icmp: bool,
    /// Identity of the connector serving it. Empty in a connector's own announcement; the relay
    /// fills it in from the connector's certificate.
    pub connector: String,
}

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

    /// Checks the fields that a peer could get wrong: a usable name, valid port ranges, and a
    /// unicast address.
    pub fn validate(&self) -> Result<(), String> {
        if !is_valid_name(&self.name) {
            return Err(format!("invalid service name {:?}", self.name));
        }
        let a = self.address;
        if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
            return Err(format!(
                "service {}: address {a} is not a unicast address",
                self.name
            ));
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

/// Whether `name` is acceptable as a service or identity name: 1 to 253 characters of ASCII
/// letters, digits, `.`, `-`, `_` and `@`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'@'))
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
    fn names() {
        assert!(is_valid_name("alice@example.org"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("a b"));
        assert!(!is_valid_name(&"x".repeat(254)));
    }
}
