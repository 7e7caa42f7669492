//! The agent's config schema, one for every platform: the keys of the config document, their
//! defaults, their validation, and the conversion into [`AgentConfig`]. The Linux agent layers
//! [`AgentFile`] with figment (files, environment, flags); the Apple library reads it from JSON.
//!
//! Keys: `relays` (or `relay` for one; required), `relay_name`, `bind`, `ca`, `cert`, `key` (required), `tun`, `mtu`,
//! `services`, `status_socket`, `log`, `direct_paths`, `withdraw_grace_secs`, `route_table`,
//! `dns_domains`, `dns_upstream`, `dns_port`, `dns_split`.
//! Unknown keys are an error. `tun`, `status_socket` and `route_table` act only on Linux; other
//! platforms validate them the same way and ignore them. Pure: no I/O.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use serde::{Deserialize, Deserializer};

use crate::agent::{AgentConfig, AgentOptions};
use crate::direct::DirectOptions;
use crate::fleet::RelaySpec;
use crate::tls::{Credentials, TlsFiles};
use crate::transport::{Timing, DEFAULT_TUN_MTU};

/// Every key of the agent's config document.
pub const AGENT_KEYS: &[&str] = &[
    "relay",
    "relays",
    "relay_name",
    "bind",
    "ca",
    "cert",
    "key",
    "tun",
    "mtu",
    "services",
    "status_socket",
    "log",
    "direct_paths",
    "withdraw_grace_secs",
    "route_table",
    "dns_domains",
    "dns_upstream",
    "dns_port",
    "dns_split",
];
/// Default path of the status socket (Linux).
pub const DEFAULT_STATUS_SOCKET: &str = "/run/ztna/agent.sock";
/// Default name of the TUN device (Linux).
pub const DEFAULT_TUN: &str = "ztna0";
/// Smallest TUN MTU accepted (the IPv4 minimum reassembly size).
pub const MIN_MTU: u16 = 576;
/// Default routing table of the service routes, also the `SO_MARK` of the agent's socket (Linux).
pub const DEFAULT_ROUTE_TABLE: u32 = 0x7a7a;
/// Longest interface name (`IFNAMSIZ` less the NUL), the same on Linux and Apple.
const MAX_IFNAME: usize = 15;

/// The config document as read, before validation. Defaults are the built-in layer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    #[serde(default)]
    relay: Option<String>,
    #[serde(default, deserialize_with = "crate::fleet::deserialize_list")]
    relays: Option<Vec<String>>,
    #[serde(default = "default_relay_name")]
    relay_name: String,
    #[serde(default = "default_bind")]
    bind: SocketAddr,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    #[serde(default = "default_tun")]
    tun: String,
    #[serde(default = "default_mtu")]
    mtu: u16,
    #[serde(default, deserialize_with = "names")]
    services: Vec<String>,
    #[serde(default = "default_status_socket")]
    status_socket: PathBuf,
    #[serde(default)]
    log: Option<String>,
    #[serde(default = "yes")]
    direct_paths: bool,
    #[serde(default = "default_withdraw_grace_secs")]
    withdraw_grace_secs: u64,
    #[serde(default = "default_route_table")]
    route_table: u32,
    #[serde(default, deserialize_with = "names")]
    dns_domains: Vec<String>,
    #[serde(default, deserialize_with = "names")]
    dns_upstream: Vec<String>,
    #[serde(default = "default_dns_port")]
    dns_port: u16,
    #[serde(default = "yes")]
    dns_split: bool,
}

fn default_dns_port() -> u16 {
    53
}

fn default_relay_name() -> String {
    "relay".into()
}
fn default_bind() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}
fn default_tun() -> String {
    DEFAULT_TUN.into()
}
fn default_mtu() -> u16 {
    DEFAULT_TUN_MTU
}
/// Default of `status_socket`; public for readers that want only that key.
pub fn default_status_socket() -> PathBuf {
    PathBuf::from(DEFAULT_STATUS_SOCKET)
}
fn yes() -> bool {
    true
}
fn default_withdraw_grace_secs() -> u64 {
    30
}
fn default_route_table() -> u32 {
    DEFAULT_ROUTE_TABLE
}

/// A list of names, given as a list or as one comma-separated string (as environment variables
/// give it).
fn names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Names {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Names::deserialize(d)? {
        Names::List(v) => v,
        Names::Text(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

/// The validated configuration of an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSettings {
    /// The relays (addresses, or names that resolve to one relay per address).
    pub relays: Vec<RelaySpec>,
    /// The DNS name every relay's certificate must carry.
    pub relay_name: String,
    /// Local UDP address to bind.
    pub bind: SocketAddr,
    /// The `ca`, `cert` and `key` values (paths; a platform may accept more, see its docs).
    pub tls: TlsFiles,
    /// TUN device name (Linux).
    pub tun: String,
    /// TUN MTU.
    pub mtu: u16,
    /// Services asked for, without duplicates; empty means all that policy allows.
    pub services: Vec<String>,
    /// Path of the status socket (Linux).
    pub status_socket: PathBuf,
    /// Log filter (tracing `EnvFilter` syntax), if configured.
    pub log: Option<String>,
    /// Whether to look for direct paths to connectors (false: everything via the relay).
    pub direct_paths: bool,
    /// How long a service the relay's catalog withdrew keeps its route.
    pub withdraw_grace: Duration,
    /// Routing table of the service routes and fwmark of the agent's socket (Linux).
    pub route_table: u32,
    /// The agent's DNS server for name services.
    pub dns: crate::agent::DnsOptions,
}

impl AgentFile {
    /// Checks every key; the error names the key and what is wrong with it.
    pub fn validate(self) -> anyhow::Result<AgentSettings> {
        let relays = crate::fleet::relay_list(self.relay, self.relays, self.bind)?;
        if self.relay_name.is_empty() {
            bail!("`relay_name` is empty: give the DNS name in the relay's certificate");
        }
        let tls = TlsFiles::from_config(self.ca, self.cert, self.key)?;
        validate_ifname(&self.tun)?;
        if self.mtu < MIN_MTU {
            bail!("`mtu` = {} is below the minimum of {MIN_MTU}", self.mtu);
        }
        let mut seen = BTreeSet::new();
        let mut services = Vec::new();
        for s in self.services {
            if !ztna_proto::service::is_valid_name(&s) {
                bail!("`services`: {s:?} is not a valid service name");
            }
            if seen.insert(s.clone()) {
                services.push(s);
            }
        }
        if self.status_socket.as_os_str().is_empty() {
            bail!("`status_socket` is empty");
        }
        if self.withdraw_grace_secs > 86_400 {
            bail!(
                "`withdraw_grace_secs` = {} is more than a day",
                self.withdraw_grace_secs
            );
        }
        // 0 is unspec; 253 to 255 are the kernel's default, main and local tables.
        if self.route_table == 0 || (253..=255).contains(&self.route_table) {
            bail!(
                "`route_table` = {} is reserved; choose another table number (default {DEFAULT_ROUTE_TABLE})",
                self.route_table
            );
        }
        let mut domains = Vec::new();
        for d in self.dns_domains {
            match ztna_proto::names::normalize_name(&d) {
                Some(n) if n.contains('.') => domains.push(n),
                _ => bail!("`dns_domains`: {d:?} is not a DNS domain with at least two labels"),
            }
        }
        let mut upstream = Vec::new();
        for u in self.dns_upstream {
            let addr = u.parse::<SocketAddr>().or_else(|_| {
                u.parse::<std::net::IpAddr>()
                    .map(|ip| SocketAddr::new(ip, 53))
            });
            match addr {
                Ok(a) => upstream.push(a),
                Err(_) => bail!("`dns_upstream`: {u:?} is not an IP address or IP:PORT"),
            }
        }
        if self.dns_port == 0 {
            bail!("`dns_port` = 0; give the port of the agent's DNS server (default 53)");
        }
        Ok(AgentSettings {
            dns: crate::agent::DnsOptions {
                domains,
                upstream,
                port: self.dns_port,
                split: self.dns_split,
                max_names: crate::names::DEFAULT_MAX_NAMES,
            },
            relays,
            relay_name: self.relay_name,
            bind: self.bind,
            tls,
            tun: self.tun,
            mtu: self.mtu,
            services,
            status_socket: self.status_socket,
            log: self.log.filter(|l| !l.trim().is_empty()),
            direct_paths: self.direct_paths,
            withdraw_grace: Duration::from_secs(self.withdraw_grace_secs),
            route_table: self.route_table,
        })
    }
}

/// Checks an interface name: 1 to 15 bytes, no '/', ':' or whitespace, not "." or "..".
fn validate_ifname(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if !ok {
        bail!("`tun` = {name:?} is not a valid interface name (1 to {MAX_IFNAME} characters, no '/', ':' or spaces)");
    }
    Ok(())
}

impl AgentSettings {
    /// What the core needs to run this agent. `fwmark`: the `SO_MARK` of the socket (Linux's
    /// policy rule), `None` where the platform keeps its own socket out of the tunnel.
    pub fn agent_config(&self, credentials: Credentials, fwmark: Option<u32>) -> AgentConfig {
        AgentConfig {
            relays: self.relays.clone(),
            relay_name: self.relay_name.clone(),
            bind: self.bind,
            credentials,
            timing: Timing::default(),
            tun_mtu: self.mtu,
            want: self.services.clone(),
            direct: DirectOptions {
                enabled: self.direct_paths,
                ..DirectOptions::default()
            },
            dns: self.dns.clone(),
            options: AgentOptions {
                withdraw_grace: self.withdraw_grace,
                fwmark,
                ..AgentOptions::default()
            },
        }
    }
}

impl fmt::Display for AgentSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "relays {} ({}), tun {} mtu {}, services {}",
            self.relays
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(","),
            self.relay_name,
            self.tun,
            self.mtu,
            if self.services.is_empty() {
                "all allowed".to_owned()
            } else {
                self.services.join(",")
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> anyhow::Result<AgentSettings> {
        serde_json::from_str::<AgentFile>(json)?.validate()
    }

    #[test]
    fn linux_only_keys_are_validated_everywhere() {
        let base = r#""relay": "192.0.2.1:4433", "ca": "c", "cert": "a", "key": "k""#;
        let err =
            |extra: &str| format!("{:#}", parse(&format!("{{{base}, {extra}}}")).unwrap_err());
        assert!(err(r#""tun": "sixteen-chars-xx""#).contains("not a valid interface name"));
        assert!(err(r#""route_table": 254"#).contains("reserved"));
        assert!(err(r#""status_socket": """#).contains("`status_socket` is empty"));
        assert!(err(r#""withdraw_grace_secs": 86401"#).contains("more than a day"));
        let ok = parse(&format!(
            r#"{{{base}, "tun": "utun-any", "route_table": 7}}"#
        ))
        .unwrap();
        assert_eq!((ok.tun.as_str(), ok.route_table), ("utun-any", 7));
    }

    #[test]
    fn conversion_carries_every_tunnel_setting() {
        let s = parse(
            r#"{"relay": "192.0.2.1:4433", "relay_name": "r.example", "ca": "c", "cert": "a",
                "key": "k", "mtu": 1300, "services": "web, db, web", "direct_paths": false,
                "withdraw_grace_secs": 5}"#,
        )
        .unwrap();
        let ca = crate::pki::CertificateAuthority::generate("Test Org").unwrap();
        let issued = ca
            .issue(ztna_proto::Role::Agent, "alice", &[], &[])
            .unwrap();
        let creds = Credentials::from_pem(
            ca.cert_pem().as_bytes(),
            issued.cert_pem.as_bytes(),
            issued.key_pem.as_bytes(),
        )
        .unwrap();
        let c = s.agent_config(creds, Some(9));
        assert_eq!(c.relays, s.relays);
        assert_eq!(
            c.relays[0].literal(),
            Some("192.0.2.1:4433".parse().unwrap())
        );
        assert_eq!(c.relay_name, "r.example");
        assert_eq!(c.tun_mtu, 1300);
        assert_eq!(c.want, ["web", "db"]);
        assert!(!c.direct.enabled);
        assert_eq!(c.options.withdraw_grace, Duration::from_secs(5));
        assert_eq!(c.options.fwmark, Some(9));
    }

    #[test]
    fn one_relay_or_a_list_never_both() {
        let tls = r#""ca": "c", "cert": "a", "key": "k""#;
        let s = parse(&format!(
            r#"{{"relays": ["192.0.2.1:4433", "relays.example.com:4433"], {tls}}}"#
        ))
        .unwrap();
        assert_eq!(s.relays.len(), 2);
        let s = parse(&format!(
            r#"{{"relays": "192.0.2.1:4433,192.0.2.2:4433", {tls}}}"#
        ))
        .unwrap();
        assert_eq!(s.relays.len(), 2);
        let err = |j: String| format!("{:#}", parse(&j).unwrap_err());
        assert!(err(format!(
            r#"{{"relay": "192.0.2.1:4433", "relays": ["192.0.2.2:4433"], {tls}}}"#
        ))
        .contains("not both"));
        assert!(err(format!("{{{tls}}}")).contains("missing `relays`"));
        assert!(err(format!(r#"{{"relays": [], {tls}}}"#)).contains("empty"));
        assert!(
            err(format!(r#"{{"relays": ["[2001:db8::1]:4433"], {tls}}}"#))
                .contains("address families")
        );
        assert!(err(format!(r#"{{"relay": "0.0.0.0:4433", {tls}}}"#)).contains("not an address"));
    }
}
