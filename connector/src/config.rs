//! The connector's configuration: figment layers built-in defaults < `/etc/ztna/connector.toml`
//! < `--config FILE` (TOML, or JSON for `.json`) < `ZTNA_*` environment variables.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use ztna_core::tls::TlsFiles;
use ztna_core::transport::Timing;
use ztna_proto::{PortRange, ServiceDef};

use crate::dataplane::xdp::{XdpMode, XdpSettings};
use crate::dataplane::{BackendService, DataplaneConfig, IcmpMode, TcpConfig};

/// Default system-wide config file.
pub(crate) const SYSTEM_CONFIG: &str = "/etc/ztna/connector.toml";

/// One service as configured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServiceConfig {
    /// Name policy refers to.
    pub(crate) name: String,
    /// Virtual IPv4 address agents use (absent for a name service).
    #[serde(default = "unspecified")]
    pub(crate) address: Ipv4Addr,
    /// Virtual IPv6 address of the service, as in the relay's policy (a name service: the first
    /// address of its IPv6 pool). Absent: the service has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) address6: Option<std::net::Ipv6Addr>,
    /// Real backend, IPv4 or IPv6: `IP` (same ports) or `IP:PORT` (every port maps to PORT),
    /// IPv6 also as `[IPv6]` and `[IPv6]:PORT`. Absent for a name service, whose backend is what each name resolves to.
    #[serde(default)]
    pub(crate) backend: String,
    /// A name service's DNS names (`wiki.corp.example`, `*.corp.example`), as in the relay's
    /// policy; needs `pool` instead of `address` and `backend`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) names: Option<Vec<String>>,
    /// A name service's pool of virtual addresses, as in the relay's policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) pool: Option<ipnet::Ipv4Net>,
    /// UDP ports: `53`, `"53"` or `"5000-5010"`.
    #[serde(default, deserialize_with = "ztna_core::daemon::port_list")]
    pub(crate) udp: Vec<String>,
    /// TCP ports: `80`, `"80"` or `"8000-8010"`; terminated by the connector's userspace TCP
    /// stack.
    #[serde(default, deserialize_with = "ztna_core::daemon::port_list")]
    pub(crate) tcp: Vec<String>,
    /// Answer ICMP echo to the address.
    #[serde(default = "yes")]
    pub(crate) icmp: bool,
}

fn yes() -> bool {
    true
}

fn unspecified() -> Ipv4Addr {
    Ipv4Addr::UNSPECIFIED
}

/// Keys that `ZTNA_<KEY>` environment variables may set (`ZTNA_LOG` is read by the logger).
const ENV_KEYS: [&str; 27] = [
    "deny_list",
    "relay",
    "relays",
    "relay_name",
    "bind",
    "ca",
    "cert",
    "key",
    "icmp",
    "udp_idle_timeout_secs",
    "max_flows_per_agent",
    "tcp_connect_timeout_secs",
    "tcp_idle_timeout_secs",
    "max_tcp_per_agent",
    "tcp_buffer_bytes",
    "tcp_buffer_budget_bytes",
    "max_flows_total",
    "max_tcp_total",
    "tcp_handshake_timeout_secs",
    "advertise",
    "metrics",
    "keepalive_secs",
    "idle_timeout_secs",
    "direct_paths",
    "xdp",
    "xdp_interface",
    "xdp_port_range",
];

/// Keys given as command-line flags: the top layer. `None` leaves the lower layers' value.
#[derive(Debug, Default, Clone, Serialize, clap::Args)]
pub(crate) struct Flags {
    /// One relay: its UDP address or DNS name with port.
    #[arg(long, conflicts_with = "relays")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) relay: Option<String>,
    /// The relay fleet, comma separated: addresses or DNS names with ports (a name that
    /// resolves to several addresses is several relays).
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) relays: Option<Vec<String>>,
    /// DNS name in the relay's certificate (default "relay").
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) relay_name: Option<String>,
    /// Local UDP address (default 0.0.0.0:4434).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) bind: Option<SocketAddr>,
    /// Serve Prometheus metrics on this address.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) metrics: Option<SocketAddr>,
    /// Log filter (`info`, `ztna_connector=debug`, ...).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) log: Option<String>,
}

/// Everything the connector reads from configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConnectorConfig {
    /// One relay (`host:port`); `relays` for several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) relay: Option<String>,
    /// The relays: addresses or DNS names with ports.
    #[serde(
        default,
        deserialize_with = "ztna_core::fleet::deserialize_list",
        skip_serializing_if = "Option::is_none"
    )]
    pub(crate) relays: Option<Vec<String>>,
    /// DNS name in every relay's certificate.
    pub(crate) relay_name: String,
    /// Local UDP address: one socket carries the relay connection and (later) direct paths.
    pub(crate) bind: SocketAddr,
    /// Organisation CA certificate.
    pub(crate) ca: Option<PathBuf>,
    /// The connector's certificate.
    pub(crate) cert: Option<PathBuf>,
    /// The connector's private key.
    pub(crate) key: Option<PathBuf>,
    /// How ICMP echo is answered.
    pub(crate) icmp: IcmpMode,
    /// Idle timeout of UDP and ICMP flows.
    pub(crate) udp_idle_timeout_secs: u64,
    /// Flows (UDP and ICMP echo) one agent identity may hold, over all its tunnels.
    pub(crate) max_flows_per_agent: usize,
    /// Flows (UDP and ICMP echo) all agents together may hold.
    pub(crate) max_flows_total: usize,
    /// How long a backend TCP connect may take before the agent's SYN is answered with RST.
    pub(crate) tcp_connect_timeout_secs: u64,
    /// Idle timeout of TCP connections (reset after this long without traffic).
    pub(crate) tcp_idle_timeout_secs: u64,
    /// TCP connections one agent identity may hold (connecting or open, over all its tunnels);
    /// more SYNs are dropped.
    pub(crate) max_tcp_per_agent: usize,
    /// TCP connections all agents together may hold.
    pub(crate) max_tcp_total: usize,
    /// A TCP connection whose handshake the agent does not complete (no ACK for the SYN-ACK)
    /// within this many seconds is reset and its backend connection closed.
    pub(crate) tcp_handshake_timeout_secs: u64,
    /// Size of each TCP connection's receive and transmit buffer in the connector's stack
    /// while the budget lasts.
    pub(crate) tcp_buffer_bytes: usize,
    /// Most bytes of such buffers (both directions, all connections) at once; connections
    /// beyond get 256 KiB buffers.
    pub(crate) tcp_buffer_budget_bytes: usize,
    /// Prometheus endpoint (off unless set).
    pub(crate) metrics: Option<SocketAddr>,
    /// Keepalive of the relay and inner connections.
    pub(crate) keepalive_secs: u64,
    /// Idle timeout of the relay and inner connections.
    pub(crate) idle_timeout_secs: u64,
    /// Log filter.
    pub(crate) log: Option<String>,
    /// Whether agents may reach this connector over direct paths (hole punching); false keeps
    /// every agent's traffic on the relay.
    pub(crate) direct_paths: bool,
    /// The addresses offered to agents as this connector's direct-path (host) candidates.
    /// Empty: the address `bind` names, or else the source address of the route to the relay;
    /// never the backend side's addresses.
    pub(crate) advertise: Vec<IpAddr>,
    /// UDP data plane: `auto`, `native`, `generic` (XDP fast path) or `off` (per-flow sockets).
    pub(crate) xdp: XdpMode,
    /// Backend-facing interface the XDP program attaches to; default: the interface of the
    /// route to the first service's backend.
    pub(crate) xdp_interface: Option<String>,
    /// Local UDP ports of fast-path flows, `"FIRST-LAST"`; UDP to them that is no flow's is
    /// dropped on `xdp_interface`.
    pub(crate) xdp_port_range: String,
    /// Deny list file (TOML: `identities = [...]`, `serials = ["1f:2a:..."]`): agents refused in
    /// the inner handshake. Reloaded on SIGHUP and when it changes.
    pub(crate) deny_list: Option<PathBuf>,
    /// CRL files (PEM or DER) of the organisation CA, checked in the inner handshake.
    pub(crate) crls: Vec<PathBuf>,
    /// Services offered. The relay's policy owns each name's address: an announcement whose
    /// address (or ports) differs from it is refused.
    pub(crate) services: Vec<ServiceConfig>,
    /// DNS servers (`IP` or `IP:PORT`) that resolve name services' names; empty: the system
    /// resolver (getaddrinfo: `/etc/hosts`, `/etc/resolv.conf`).
    pub(crate) resolver: Vec<String>,
    /// How long an address from the system resolver (which reports no TTL) is used before the
    /// name is resolved again.
    pub(crate) resolver_ttl_secs: u64,
    /// Names one agent tunnel may have mapped at once.
    pub(crate) max_names_per_agent: usize,
    /// Resolved names the connector keeps (least recently used go first).
    pub(crate) max_resolved_names: usize,
}

impl Default for ConnectorConfig {
    fn default() -> Self {
        let t = Timing::default();
        let tcp = TcpConfig::default();
        Self {
            relay: None,
            relays: None,
            relay_name: "relay".into(),
            bind: SocketAddr::from(([0, 0, 0, 0], 4434)),
            ca: None,
            cert: None,
            key: None,
            icmp: IcmpMode::Auto,
            udp_idle_timeout_secs: 60,
            max_flows_per_agent: 4096,
            max_flows_total: 65536,
            tcp_connect_timeout_secs: tcp.connect_timeout.as_secs(),
            tcp_idle_timeout_secs: tcp.idle_timeout.as_secs(),
            max_tcp_per_agent: tcp.max_per_agent,
            max_tcp_total: tcp.max_total,
            tcp_handshake_timeout_secs: tcp.handshake_timeout.as_secs(),
            tcp_buffer_bytes: tcp.buffer_bytes,
            tcp_buffer_budget_bytes: tcp.buffer_budget,
            metrics: None,
            keepalive_secs: t.keepalive.as_secs(),
            idle_timeout_secs: t.idle_timeout.as_secs(),
            log: None,
            direct_paths: true,
            advertise: Vec::new(),
            xdp: XdpMode::Off,
            xdp_interface: None,
            xdp_port_range: "20000-29999".into(),
            deny_list: None,
            crls: Vec::new(),
            services: Vec::new(),
            resolver: Vec::new(),
            resolver_ttl_secs: 30,
            max_names_per_agent: 1024,
            max_resolved_names: 4096,
        }
    }
}

fn parse_ports(service: &str, proto: &str, list: &[String]) -> anyhow::Result<Vec<PortRange>> {
    list.iter()
        .map(|p| {
            p.parse::<PortRange>()
                .with_context(|| format!("service {service}: {proto} ports"))
        })
        .collect()
}

impl ConnectorConfig {
    /// Loads the layers; `file` is `--config`.
    pub(crate) fn load(file: Option<&Path>, flags: &Flags) -> anyhow::Result<Self> {
        let system: [&Path; 1] = [Path::new(SYSTEM_CONFIG)];
        let sources = ztna_core::daemon::ConfigSources {
            system: &system,
            file,
            env_prefix: "ZTNA_",
            env_keys: &ENV_KEYS,
        };
        let cfg: ConnectorConfig =
            ztna_core::daemon::layered_config(&ConnectorConfig::default(), &sources, flags)
                .context("invalid connector configuration")?;
        // Checked here, not first when the tunnel starts: a bad relay list is a configuration
        // error (exit 78, not restarted), like every other bad value.
        cfg.relay_list()?;
        cfg.backends()?;
        anyhow::ensure!(
            cfg.idle_timeout_secs > cfg.keepalive_secs && cfg.keepalive_secs >= 1,
            "idle_timeout_secs must exceed keepalive_secs (>= 1)"
        );
        anyhow::ensure!(
            cfg.max_flows_per_agent >= 1 && cfg.max_flows_total >= 1,
            "max_flows_per_agent and max_flows_total must be at least 1"
        );
        cfg.xdp_settings()?;
        cfg.dataplane()
            .tcp
            .validate()
            .map_err(anyhow::Error::msg)
            .context("invalid TCP settings (tcp_connect_timeout_secs, tcp_idle_timeout_secs, tcp_handshake_timeout_secs, max_tcp_per_agent, max_tcp_total, tcp_buffer_bytes, tcp_buffer_budget_bytes)")?;
        Ok(cfg)
    }

    /// The relays to keep sessions with.
    pub(crate) fn relay_list(&self) -> anyhow::Result<Vec<ztna_core::fleet::RelaySpec>> {
        anyhow::ensure!(
            !self.relay_name.is_empty(),
            "`relay_name` is empty: give the DNS name in the relays' certificate"
        );
        ztna_core::fleet::relay_list(self.relay.clone(), self.relays.clone(), self.bind)
    }

    /// The deny list and CRLs.
    pub(crate) fn revocation_list(&self) -> anyhow::Result<ztna_core::tls::RevocationList> {
        ztna_core::tls::RevocationList::load(self.deny_list.as_deref(), &self.crls)
            .context("loading the deny list and CRLs")
    }

    /// The TLS files; all three are required.
    pub(crate) fn tls_files(&self) -> anyhow::Result<TlsFiles> {
        TlsFiles::from_config(self.ca.clone(), self.cert.clone(), self.key.clone())
    }

    /// Keepalive and idle timing.
    pub(crate) fn timing(&self) -> Timing {
        Timing {
            keepalive: Duration::from_secs(self.keepalive_secs),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
        }
    }

    /// Data plane settings.
    pub(crate) fn dataplane(&self) -> DataplaneConfig {
        DataplaneConfig {
            udp_idle_timeout: Duration::from_secs(self.udp_idle_timeout_secs),
            max_flows_per_agent: self.max_flows_per_agent,
            max_flows_total: self.max_flows_total,
            icmp: self.icmp,
            tcp: TcpConfig {
                connect_timeout: Duration::from_secs(self.tcp_connect_timeout_secs),
                idle_timeout: Duration::from_secs(self.tcp_idle_timeout_secs),
                handshake_timeout: Duration::from_secs(self.tcp_handshake_timeout_secs),
                max_per_agent: self.max_tcp_per_agent,
                max_total: self.max_tcp_total,
                buffer_bytes: self.tcp_buffer_bytes,
                buffer_budget: self.tcp_buffer_budget_bytes,
            },
        }
    }

    /// Settings of the UDP fast path.
    pub(crate) fn xdp_settings(&self) -> anyhow::Result<XdpSettings> {
        let range: PortRange = self
            .xdp_port_range
            .parse()
            .context("xdp_port_range (\"FIRST-LAST\")")?;
        anyhow::ensure!(
            range.first >= 1024,
            "xdp_port_range must start at 1024 or above"
        );
        Ok(XdpSettings {
            mode: self.xdp,
            interface: self.xdp_interface.clone(),
            ports: (range.first, range.last),
        })
    }

    /// The name services, validated.
    pub(crate) fn name_services(&self) -> anyhow::Result<Vec<ServiceDef>> {
        let mut out: Vec<ServiceDef> = Vec::new();
        for s in &self.services {
            let (Some(names), Some(pool)) = (&s.names, s.pool) else {
                anyhow::ensure!(
                    s.names.is_none() && s.pool.is_none(),
                    "service {}: a name service needs both `names` and `pool`",
                    s.name
                );
                continue;
            };
            anyhow::ensure!(
                s.address.is_unspecified() && s.backend.is_empty(),
                "service {}: a name service has `names` and `pool`, no `address` or `backend`",
                s.name
            );
            let mut patterns = Vec::new();
            for n in names {
                let p = ztna_proto::names::DomainPattern::parse(n)
                    .map_err(|e| anyhow::anyhow!("service {}: {e}", s.name))?;
                patterns.push(p.to_string());
            }
            let def = ServiceDef {
                name: s.name.clone(),
                address: pool.network(),
                address6: s.address6,
                udp: parse_ports(&s.name, "udp", &s.udp)?,
                tcp: parse_ports(&s.name, "tcp", &s.tcp)?,
                icmp: s.icmp,
                connector: String::new(),
                names: Some(ztna_proto::NamePool {
                    patterns,
                    prefix_len: pool.prefix_len(),
                }),
            };
            def.validate().map_err(anyhow::Error::msg)?;
            out.push(def);
        }
        Ok(out)
    }

    /// The DNS servers of the name services' resolver (empty: the system resolver).
    pub(crate) fn resolver_servers(&self) -> anyhow::Result<Vec<SocketAddr>> {
        self.resolver
            .iter()
            .map(|r| {
                r.parse::<SocketAddr>()
                    .or_else(|_| r.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .with_context(|| format!("resolver: {r:?} is not IP or IP:PORT"))
            })
            .collect()
    }

    /// The services with their backends, validated.
    pub(crate) fn backends(&self) -> anyhow::Result<Vec<BackendService>> {
        let mut out: Vec<BackendService> = Vec::new();
        for s in self.services.iter().filter(|s| s.names.is_none()) {
            let (backend, backend_port) = parse_backend(&s.backend).with_context(|| {
                format!(
                    "service {}: backend {:?} is not IP, IP:PORT, [IPv6] or [IPv6]:PORT",
                    s.name, s.backend
                )
            })?;
            let def = ServiceDef {
                name: s.name.clone(),
                address: s.address,
                address6: s.address6,
                udp: parse_ports(&s.name, "udp", &s.udp)?,
                tcp: parse_ports(&s.name, "tcp", &s.tcp)?,
                icmp: s.icmp,
                connector: String::new(),
                names: None,
            };
            def.validate().map_err(anyhow::Error::msg)?;
            anyhow::ensure!(
                !out.iter().any(|o| o.def.name == def.name),
                "service {} is defined twice",
                def.name
            );
            anyhow::ensure!(
                !out.iter().any(|o| o.def.address == def.address),
                "address {} is used by two services",
                def.address
            );
            if let Some(a6) = def.address6 {
                anyhow::ensure!(
                    !out.iter().any(|o| o.def.address6 == Some(a6)),
                    "IPv6 address {a6} is used by two services"
                );
            }
            out.push(BackendService {
                def,
                backend,
                backend_port,
            });
        }
        Ok(out)
    }
}

/// Parses a backend: `IP`, `IP:PORT`, `[IPv6]` or `[IPv6]:PORT` (either family).
fn parse_backend(s: &str) -> anyhow::Result<(IpAddr, Option<u16>)> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((sa.ip(), Some(sa.port())));
    }
    let ip = match s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        Some(inner) => IpAddr::V6(inner.parse()?),
        None => s.parse()?,
    };
    Ok((ip, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads `text` as the `--config` file; configs that name no relay (the tests not about
    /// the relay list) get one from the flags.
    fn load(text: &str, ext: &str) -> anyhow::Result<ConnectorConfig> {
        let flags = if text.contains("relay") {
            Flags::default()
        } else {
            Flags {
                relays: Some(vec!["10.0.0.1:4433".into()]),
                ..Flags::default()
            }
        };
        let dir = std::env::temp_dir().join(format!(
            "ztna-conn-cfg-{}-{}",
            std::process::id(),
            text.len()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join(format!("c.{ext}"));
        std::fs::write(&f, text).unwrap();
        let r = ConnectorConfig::load(Some(&f), &flags);
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    /// A bad relay list fails the load (exit 78, `InvalidConfig`), not the start of the tunnel.
    #[test]
    fn relay_lists_are_checked_at_load() {
        let svc = "[[services]]\nname = \"x\"\naddress = \"10.100.0.1\"\nbackend = \"10.0.0.1\"\nudp = 7\n";
        let ok = |relays: &str| load(&format!("{relays}\n{svc}"), "toml");
        let count = |relays: &str| ok(relays).unwrap().relay_list().unwrap().len();
        assert_eq!(count("relay = \"10.0.0.1:4433\""), 1);
        assert_eq!(
            count("relays = [\"10.0.0.1:4433\", \"relays.example.com:4433\"]"),
            2
        );
        assert_eq!(count("relays = \"10.0.0.1:4433,10.0.0.2:4433\""), 2);
        for bad in [
            "relay = \"10.0.0.1:4433\"\nrelays = [\"10.0.0.2:4433\"]",
            "relays = []",
            "relays = [\"10.0.0.1:4433\", \"10.0.0.1:4433\"]",
            "relays = [\"0.0.0.0:4433\"]",
            "relay = \"relay-without-port\"",
            "relay_name = \"\"\nrelay = \"10.0.0.1:4433\"",
            "# no relay at all",
        ] {
            assert!(ok(bad).is_err(), "{bad:?} should not load");
        }
    }

    #[test]
    fn services_parse_and_validate() {
        let cfg = load(
            r#"
relay = "10.10.0.1:4433"
ca = "/ca"
cert = "/c"
key = "/k"
[[services]]
name = "echo"
address = "10.100.0.1"
backend = "10.10.3.2"
udp = ["7", "9000-9010"]
[[services]]
name = "dns"
address = "10.100.0.2"
backend = "10.10.3.2:5353"
udp = ["53"]
icmp = false
[[services]]
name = "web"
address = "10.100.0.3"
backend = "10.10.3.3"
tcp = ["80", "5432", "8000-8010"]
"#,
            "toml",
        )
        .unwrap();
        let b = cfg.backends().unwrap();
        assert_eq!(b.len(), 3);
        assert!(b[2].def.allows_tcp(80) && b[2].def.allows_tcp(5432) && b[2].def.allows_tcp(8005));
        assert!(!b[2].def.allows_tcp(81) && !b[2].def.allows_udp(80));
        let dp = cfg.dataplane();
        assert_eq!(dp.tcp.connect_timeout, Duration::from_secs(5));
        assert_eq!(dp.tcp.idle_timeout, Duration::from_secs(300));
        assert_eq!(dp.tcp.max_per_agent, 1024);
        assert_eq!(dp.tcp.buffer_bytes, 4 << 20);
        assert_eq!(dp.tcp.buffer_budget, 64 << 20);
        assert_eq!(b[0].backend_port, None);
        assert_eq!(b[1].backend_port, Some(5353));
        assert!(b[0].def.allows_udp(9005) && !b[0].def.allows_udp(8));
        assert_eq!(cfg.bind.port(), 4434);
        assert_eq!(cfg.icmp, IcmpMode::Auto);
        let x = cfg.xdp_settings().unwrap();
        assert_eq!(
            (x.mode, x.interface, x.ports),
            (XdpMode::Off, None, (20000, 29999))
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(load("relay = \"1.2.3.4:1\"\nbogus = 1\n", "toml").is_err());
        let svc = |extra: &str| {
            format!("[[services]]\nname = \"x\"\naddress = \"10.100.0.1\"\nbackend = \"10.0.0.1\"\n{extra}\n")
        };
        assert!(load(&svc("udp = [\"0\"]"), "toml").is_err());
        assert!(load(&svc("tcp = [\"80\"]"), "toml").is_ok());
        assert!(load(&svc("tcp = [\"0\"]"), "toml").is_err());
        assert!(load("max_tcp_per_agent = 0\n", "toml").is_err());
        assert!(load("tcp_connect_timeout_secs = 0\n", "toml").is_err());
        assert!(load("tcp_buffer_bytes = 100\n", "toml").is_err());
        assert!(load(
            "tcp_idle_timeout_secs = 60\ntcp_buffer_bytes = 1048576\n",
            "toml"
        )
        .is_ok());
        assert!(load(&svc("udp = [\"7\"]\nbackend2 = 1"), "toml").is_err());
        assert!(load(
            &format!("{}{}", svc("udp = [\"7\"]"), svc("udp = [\"8\"]")),
            "toml"
        )
        .is_err());
        assert!(load(r#"{"relay": "10.0.0.1:4433", "icmp": "local"}"#, "json").is_ok());
        assert!(load("xdp = \"fast\"\n", "toml").is_err());
        assert!(load("xdp_port_range = \"100-200\"\n", "toml").is_err());
        assert!(load("xdp_port_range = \"30000-20000\"\n", "toml").is_err());
        let c = load(
            "xdp = \"native\"\nxdp_interface = \"back0\"\nxdp_port_range = \"40000-40010\"\n",
            "toml",
        )
        .unwrap();
        let x = c.xdp_settings().unwrap();
        assert_eq!(
            (x.mode, x.interface.as_deref(), x.ports),
            (XdpMode::Native, Some("back0"), (40000, 40010))
        );
    }

    #[test]
    fn backends_of_either_family() {
        let v6: IpAddr = "fd00::5".parse().unwrap();
        let v4: IpAddr = "10.0.0.5".parse().unwrap();
        for (text, want) in [
            ("10.0.0.5", Some((v4, None))),
            ("10.0.0.5:8080", Some((v4, Some(8080)))),
            ("fd00::5", Some((v6, None))),
            ("[fd00::5]", Some((v6, None))),
            ("[fd00::5]:8080", Some((v6, Some(8080)))),
            ("[10.0.0.5]", None),
            ("[fd00::5", None),
            ("fd00::5]", None),
            ("[fd00::5]:", None),
            ("[fd00::5]:70000", None),
            ("backend.example", None),
            ("", None),
        ] {
            assert_eq!(parse_backend(text).ok(), want, "{text:?}");
        }
        let cfg = load(
            "[[services]]\nname = \"x\"\naddress = \"10.100.0.1\"\n\
             address6 = \"fd00:100::1\"\nbackend = \"[fd00::5]:53\"\nudp = 53\n",
            "toml",
        )
        .unwrap();
        let b = cfg.backends().unwrap();
        assert_eq!((b[0].backend, b[0].backend_port), (v6, Some(53)));
        assert_eq!(b[0].def.address6, Some("fd00:100::1".parse().unwrap()));
    }

    /// `docs/config.md` lists exactly the keys of the code, section by section.
    #[test]
    fn docs_config_md_lists_every_key() {
        use ztna_core::daemon::{assert_documented, struct_fields};
        assert_documented(
            include_str!("../../docs/config.md"),
            &[
                ("Connector", struct_fields::<ConnectorConfig>()),
                ("Connector services", struct_fields::<ServiceConfig>()),
            ],
        );
    }

    /// Ports may be integers or strings, alone or in lists (a templated manifest or an
    /// environment variable gives `53`, a hand-written file `"53"`).
    #[test]
    fn ports_as_integers_or_strings() {
        let cfg = load(
            "[[services]]\nname = \"x\"\naddress = \"10.100.0.1\"\nbackend = \"10.0.0.1\"\n\
             udp = [53, \"9000-9010\"]\ntcp = 80\n",
            "toml",
        )
        .unwrap();
        let b = cfg.backends().unwrap();
        assert!(b[0].def.allows_udp(53) && b[0].def.allows_udp(9005) && b[0].def.allows_tcp(80));
        let json = load(
            r#"{"services": [{"name": "x", "address": "10.100.0.1", "backend": "10.0.0.1", "udp": [7, "9"], "tcp": "80,443"}]}"#,
            "json",
        )
        .unwrap();
        let b = json.backends().unwrap();
        assert!(b[0].def.allows_udp(7) && b[0].def.allows_udp(9) && b[0].def.allows_tcp(443));
        assert!(load("[[services]]\nname = \"x\"\naddress = \"10.100.0.1\"\nbackend = \"10.0.0.1\"\nudp = [70000]\n", "toml").is_err());
    }
}
