//! The daemons' configuration files, written as TOML (the format `deploy/config/*.toml` show).
//! The `demo` constructors give the values of the demo topology; tests change fields before
//! writing.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::addr;
use crate::pki::CertPaths;

/// A TOML basic string.
fn q(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn qp(p: &Path) -> String {
    q(&p.to_string_lossy())
}

fn list(items: &[String]) -> String {
    format!(
        "[{}]",
        items.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ")
    )
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// `a,b` as a TOML list of strings.
fn relay_list(relays: &str) -> String {
    let items: Vec<String> = relays
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(q)
        .collect();
    format!("[{}]", items.join(", "))
}

/// One `[[access]]` rule of the relay: these groups or identities may reach these services.
#[derive(Debug, Clone)]
pub struct Access {
    /// Service names.
    pub services: Vec<String>,
    /// Agent certificate groups.
    pub groups: Vec<String>,
    /// Agent identities.
    pub identities: Vec<String>,
}

/// One `[[connectors]]` entry of the relay: which services a connector identity may serve.
#[derive(Debug, Clone)]
pub struct ConnectorGrant {
    /// The connector's certificate name.
    pub identity: String,
    /// Service names it may serve.
    pub services: Vec<String>,
}

/// One `[[services]]` entry of the relay's policy: the address a service name has, and
/// optionally the ports and protocols a connector may serve it on (`None`: not restricted).
#[derive(Debug, Clone)]
pub struct PolicyService {
    /// Service name.
    pub name: String,
    /// Its virtual IP.
    pub address: String,
    /// Its virtual IPv6 address (written only when set).
    pub address6: Option<String>,
    /// UDP ports or ranges a connector may serve (written only when set).
    pub udp: Option<Vec<String>>,
    /// TCP ports or ranges a connector may serve (written only when set).
    pub tcp: Option<Vec<String>>,
    /// Whether ICMP may be served (written only when set).
    pub icmp: Option<bool>,
}

impl PolicyService {
    /// `name` at `address`, ports not restricted by policy.
    pub fn new(name: &str, address: &str) -> Self {
        Self {
            name: name.to_owned(),
            address: address.to_owned(),
            address6: None,
            udp: None,
            tcp: None,
            icmp: None,
        }
    }
}

/// `ztna-relay` configuration.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// QUIC listen address.
    pub bind: String,
    /// Organisation CA.
    pub ca: PathBuf,
    /// The relay's certificate.
    pub cert: PathBuf,
    /// The relay's key.
    pub key: PathBuf,
    /// Pool of agent tunnel addresses.
    pub tunnel_pool: String,
    /// Prometheus listen address, if any.
    pub metrics: Option<String>,
    /// Keepalive interval.
    pub keepalive_secs: u64,
    /// Idle timeout of outer connections.
    pub idle_timeout_secs: u64,
    /// Who may reach what.
    pub access: Vec<Access>,
    /// Which connector may serve what.
    pub connectors: Vec<ConnectorGrant>,
    /// The service catalog: each name's address.
    pub services: Vec<PolicyService>,
    /// Ranges no service address may use (written only when non-empty).
    pub reserved: Vec<String>,
    /// Deny-list file (written only when set).
    pub deny_list: Option<PathBuf>,
    /// CRL files (written only when non-empty).
    pub crls: Vec<PathBuf>,
    /// How often the relay polls its files for changes (written only when set; default 2 s).
    pub reload_poll_secs: Option<u64>,
    /// `xdp` (the relay's kernel forwarding of channel data); written only when set.
    pub xdp: Option<String>,
    /// Raw TOML appended to the file (tables, e.g. name services' `[[services]]`).
    pub extra: String,
}

impl RelayConfig {
    /// Adds `name` at `address` to the catalog (replacing an entry of that name), ports not
    /// restricted by policy. A test that gives the connector a new service calls this too.
    pub fn add_service(&mut self, name: &str, address: &str) {
        self.services.retain(|s| s.name != name);
        self.services.push(PolicyService::new(name, address));
    }

    /// The demo relay: the catalog has `echo` (10.100.0.1), `dns` (10.100.0.2, UDP 53 only),
    /// `secret` (10.100.0.3, UDP 9 and ICMP only) and `web` (10.100.0.4); `reserved` holds the
    /// demo's underlay 10.10.0.0/16; group `eng` may reach `echo`, `dns` and `web`; `conn1` may
    /// serve `echo`, `dns`, `secret` and `web`; metrics on 127.0.0.1:9433.
    pub fn demo(ca: &Path, relay: &CertPaths) -> Self {
        Self {
            bind: format!("{}:{}", addr::RELAY, addr::RELAY_PORT),
            ca: ca.to_path_buf(),
            cert: relay.cert.clone(),
            key: relay.key.clone(),
            tunnel_pool: "100.64.0.0/10".to_owned(),
            metrics: Some(addr::RELAY_METRICS.to_owned()),
            keepalive_secs: 5,
            idle_timeout_secs: 20,
            access: vec![Access {
                services: strings(&["echo", "dns", "web"]),
                groups: strings(&["eng"]),
                identities: vec![],
            }],
            connectors: vec![ConnectorGrant {
                identity: "conn1".to_owned(),
                services: strings(&["echo", "dns", "secret", "web"]),
            }],
            services: vec![
                PolicyService::new("echo", addr::ECHO),
                PolicyService {
                    udp: Some(strings(&["53"])),
                    tcp: Some(vec![]),
                    icmp: Some(false),
                    ..PolicyService::new("dns", addr::DNS)
                },
                PolicyService {
                    udp: Some(strings(&["9"])),
                    tcp: Some(vec![]),
                    icmp: Some(true),
                    ..PolicyService::new("secret", addr::SECRET)
                },
                PolicyService::new("web", addr::WEB),
            ],
            reserved: strings(&["10.10.0.0/16"]),
            deny_list: None,
            crls: vec![],
            reload_poll_secs: None,
            xdp: None,
            extra: String::new(),
        }
    }

    /// The TOML text.
    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "bind = {}", q(&self.bind));
        let _ = writeln!(s, "ca = {}", qp(&self.ca));
        let _ = writeln!(s, "cert = {}", qp(&self.cert));
        let _ = writeln!(s, "key = {}", qp(&self.key));
        let _ = writeln!(s, "tunnel_pool = {}", q(&self.tunnel_pool));
        if let Some(m) = &self.metrics {
            let _ = writeln!(s, "metrics = {}", q(m));
        }
        let _ = writeln!(s, "keepalive_secs = {}", self.keepalive_secs);
        let _ = writeln!(s, "idle_timeout_secs = {}", self.idle_timeout_secs);
        if !self.reserved.is_empty() {
            let _ = writeln!(s, "reserved = {}", list(&self.reserved));
        }
        if let Some(d) = &self.deny_list {
            let _ = writeln!(s, "deny_list = {}", qp(d));
        }
        if !self.crls.is_empty() {
            let crls: Vec<String> = self
                .crls
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let _ = writeln!(s, "crls = {}", list(&crls));
        }
        if let Some(p) = self.reload_poll_secs {
            let _ = writeln!(s, "reload_poll_secs = {p}");
        }
        if let Some(x) = &self.xdp {
            let _ = writeln!(s, "xdp = {}", q(x));
        }
        for svc in &self.services {
            let _ = writeln!(s, "\n[[services]]");
            let _ = writeln!(s, "name = {}", q(&svc.name));
            let _ = writeln!(s, "address = {}", q(&svc.address));
            if let Some(a6) = &svc.address6 {
                let _ = writeln!(s, "address6 = {}", q(a6));
            }
            if let Some(u) = &svc.udp {
                let _ = writeln!(s, "udp = {}", list(u));
            }
            if let Some(t) = &svc.tcp {
                let _ = writeln!(s, "tcp = {}", list(t));
            }
            if let Some(i) = svc.icmp {
                let _ = writeln!(s, "icmp = {i}");
            }
        }
        for a in &self.access {
            let _ = writeln!(s, "\n[[access]]");
            let _ = writeln!(s, "services = {}", list(&a.services));
            let _ = writeln!(s, "groups = {}", list(&a.groups));
            let _ = writeln!(s, "identities = {}", list(&a.identities));
        }
        for c in &self.connectors {
            let _ = writeln!(s, "\n[[connectors]]");
            let _ = writeln!(s, "identity = {}", q(&c.identity));
            let _ = writeln!(s, "services = {}", list(&c.services));
        }
        s.push_str(&self.extra);
        s
    }
}

/// One `[[services]]` entry of the connector.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Name, as policy refers to it.
    pub name: String,
    /// Virtual IP agents use.
    pub address: String,
    /// Virtual IPv6 address agents use (written only when set; must match the relay's policy).
    pub address6: Option<String>,
    /// Real IP (or IP:PORT).
    pub backend: String,
    /// UDP ports or `first-last` ranges (written only when non-empty).
    pub udp: Vec<String>,
    /// TCP ports or `first-last` ranges (written only when non-empty).
    pub tcp: Vec<String>,
    /// Whether ICMP echo is allowed.
    pub icmp: bool,
}

impl ServiceConfig {
    /// Service `web` (10.100.0.4): TCP 80 (nginx), 5432 (PostgreSQL), 5001 (nothing listens:
    /// refused) and 9000 (whatever a test runs) on the backend 10.10.3.2, plus ICMP.
    pub fn web() -> Self {
        Self {
            name: "web".to_owned(),
            address: addr::WEB.to_owned(),
            address6: None,
            backend: addr::BACKEND.to_owned(),
            udp: vec![],
            tcp: strings(&["80", "5432", "5001", "9000"]),
            icmp: true,
        }
    }
}

/// `ztna-connector` configuration.
#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    /// The relay's address, or the relays' separated by commas (written as `relays`).
    pub relay: String,
    /// DNS name in the relay's certificate.
    pub relay_name: String,
    /// Local UDP address.
    pub bind: String,
    /// Organisation CA.
    pub ca: PathBuf,
    /// The connector's certificate.
    pub cert: PathBuf,
    /// The connector's key.
    pub key: PathBuf,
    /// `backend`, `local` or `auto`.
    pub icmp: String,
    /// Idle timeout of UDP flows.
    pub udp_idle_timeout_secs: u64,
    /// Cap on flows per agent.
    pub max_flows_per_agent: u64,
    /// Prometheus listen address, if any.
    pub metrics: Option<String>,
    /// How long the connector waits for a backend TCP connect (`tcp_connect_timeout_secs`);
    /// written only when set.
    pub tcp_connect_timeout_secs: Option<u64>,
    /// Idle timeout of proxied TCP connections (`tcp_idle_timeout_secs`); written only when set.
    pub tcp_idle_timeout_secs: Option<u64>,
    /// Cap on TCP connections per agent (`max_tcp_per_agent`); written only when set.
    pub max_tcp_per_agent: Option<u64>,
    /// Each TCP connection's buffer each way (`tcp_buffer_bytes`); written only when set.
    pub tcp_buffer_bytes: Option<u64>,
    /// `direct_paths`; written only when set (the connector's default is true).
    pub direct_paths: Option<bool>,
    /// UDP data plane: `auto`, `native`, `generic` (XDP fast path) or `off` (per-flow sockets).
    pub xdp: String,
    /// Interface the XDP program attaches to (`xdp_interface`); written only when set.
    pub xdp_interface: Option<String>,
    /// Local ports of fast-path flows (`xdp_port_range`, "FIRST-LAST"); written only when set.
    pub xdp_port_range: Option<String>,
    /// Deny-list file (`deny_list`); written only when set.
    pub deny_list: Option<PathBuf>,
    /// Services announced to the relay.
    pub services: Vec<ServiceConfig>,
    /// Raw TOML keys written before the services (e.g. `resolver`).
    pub extra_keys: String,
    /// Raw TOML appended to the file (tables, e.g. name services' `[[services]]`).
    pub extra: String,
}

impl ConnectorConfig {
    /// The demo connector `conn1`: services `echo` (10.100.0.1: UDP 7, ICMP), `dns`
    /// (10.100.0.2: UDP 53), `secret` (10.100.0.3: UDP 9, ICMP) and `web` (10.100.0.4: TCP 80,
    /// 5432, 5001, 9000, ICMP), all on the backend 10.10.3.2; metrics on 127.0.0.1:9434.
    pub fn demo(ca: &Path, conn: &CertPaths) -> Self {
        let svc = |name: &str, address: &str, udp: &str, icmp: bool| ServiceConfig {
            name: name.to_owned(),
            address: address.to_owned(),
            address6: None,
            backend: addr::BACKEND.to_owned(),
            udp: vec![udp.to_owned()],
            tcp: vec![],
            icmp,
        };
        Self {
            relay: format!("{}:{}", addr::RELAY, addr::RELAY_PORT),
            relay_name: "relay".to_owned(),
            bind: "0.0.0.0:4434".to_owned(),
            ca: ca.to_path_buf(),
            cert: conn.cert.clone(),
            key: conn.key.clone(),
            icmp: "auto".to_owned(),
            udp_idle_timeout_secs: 60,
            max_flows_per_agent: 4096,
            metrics: Some(addr::CONN_METRICS.to_owned()),
            tcp_connect_timeout_secs: None,
            tcp_idle_timeout_secs: None,
            max_tcp_per_agent: None,
            tcp_buffer_bytes: None,
            direct_paths: None,
            xdp: "off".to_owned(),
            xdp_interface: None,
            xdp_port_range: None,
            deny_list: None,
            services: vec![
                svc("echo", addr::ECHO, "7", true),
                svc("dns", addr::DNS, "53", false),
                svc("secret", addr::SECRET, "9", true),
                ServiceConfig::web(),
            ],
            extra_keys: String::new(),
            extra: String::new(),
        }
    }

    /// The TOML text.
    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "relays = {}", relay_list(&self.relay));
        let _ = writeln!(s, "relay_name = {}", q(&self.relay_name));
        let _ = writeln!(s, "bind = {}", q(&self.bind));
        let _ = writeln!(s, "ca = {}", qp(&self.ca));
        let _ = writeln!(s, "cert = {}", qp(&self.cert));
        let _ = writeln!(s, "key = {}", qp(&self.key));
        let _ = writeln!(s, "icmp = {}", q(&self.icmp));
        let _ = writeln!(s, "udp_idle_timeout_secs = {}", self.udp_idle_timeout_secs);
        let _ = writeln!(s, "max_flows_per_agent = {}", self.max_flows_per_agent);
        if let Some(m) = &self.metrics {
            let _ = writeln!(s, "metrics = {}", q(m));
        }
        let optional = [
            ("tcp_connect_timeout_secs", self.tcp_connect_timeout_secs),
            ("tcp_idle_timeout_secs", self.tcp_idle_timeout_secs),
            ("max_tcp_per_agent", self.max_tcp_per_agent),
            ("tcp_buffer_bytes", self.tcp_buffer_bytes),
        ];
        for (key, value) in optional {
            if let Some(v) = value {
                let _ = writeln!(s, "{key} = {v}");
            }
        }
        if let Some(d) = self.direct_paths {
            let _ = writeln!(s, "direct_paths = {d}");
        }
        let _ = writeln!(s, "xdp = {}", q(&self.xdp));
        let optional = [
            ("xdp_interface", &self.xdp_interface),
            ("xdp_port_range", &self.xdp_port_range),
        ];
        for (key, value) in optional {
            if let Some(v) = value {
                let _ = writeln!(s, "{key} = {}", q(v));
            }
        }
        if let Some(d) = &self.deny_list {
            let _ = writeln!(s, "deny_list = {}", qp(d));
        }
        s.push_str(&self.extra_keys);
        for svc in &self.services {
            let _ = writeln!(s, "\n[[services]]");
            let _ = writeln!(s, "name = {}", q(&svc.name));
            let _ = writeln!(s, "address = {}", q(&svc.address));
            if let Some(a6) = &svc.address6 {
                let _ = writeln!(s, "address6 = {}", q(a6));
            }
            let _ = writeln!(s, "backend = {}", q(&svc.backend));
            if !svc.udp.is_empty() {
                let _ = writeln!(s, "udp = {}", list(&svc.udp));
            }
            if !svc.tcp.is_empty() {
                let _ = writeln!(s, "tcp = {}", list(&svc.tcp));
            }
            let _ = writeln!(s, "icmp = {}", svc.icmp);
        }
        s.push_str(&self.extra);
        s
    }
}

/// `ztna-agent up` configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The relay's address, or the relays' separated by commas (written as `relays`).
    pub relay: String,
    /// DNS name in the relay's certificate.
    pub relay_name: String,
    /// Organisation CA (the one the relay's certificate must chain to).
    pub ca: PathBuf,
    /// The agent's certificate.
    pub cert: PathBuf,
    /// The agent's key.
    pub key: PathBuf,
    /// TUN device name.
    pub tun: String,
    /// TUN MTU.
    pub mtu: u32,
    /// Wanted services (empty: all that policy allows).
    pub services: Vec<String>,
    /// The status socket.
    pub status_socket: PathBuf,
    /// `direct_paths` (written only when set; the agent's default is true).
    pub direct_paths: Option<bool>,
    /// `withdraw_grace_secs` (written only when set; the agent's default is 30): how long a
    /// service the catalog withdrew keeps its route. Tests that expect a withdrawn service to
    /// leave the routing table promptly set it low.
    pub withdraw_grace_secs: Option<u64>,
    /// Raw TOML keys appended to the file (e.g. `dns_upstream`).
    pub extra: String,
}

impl AgentConfig {
    /// The demo agent: TUN `ztna0`, MTU 1280, every allowed service, status socket `socket`.
    pub fn demo(ca: &Path, agent: &CertPaths, socket: &Path) -> Self {
        Self {
            relay: format!("{}:{}", addr::RELAY, addr::RELAY_PORT),
            relay_name: "relay".to_owned(),
            ca: ca.to_path_buf(),
            cert: agent.cert.clone(),
            key: agent.key.clone(),
            tun: "ztna0".to_owned(),
            mtu: 1280,
            services: vec![],
            status_socket: socket.to_path_buf(),
            direct_paths: None,
            withdraw_grace_secs: None,
            extra: String::new(),
        }
    }

    /// The TOML text.
    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "relays = {}", relay_list(&self.relay));
        let _ = writeln!(s, "relay_name = {}", q(&self.relay_name));
        let _ = writeln!(s, "ca = {}", qp(&self.ca));
        let _ = writeln!(s, "cert = {}", qp(&self.cert));
        let _ = writeln!(s, "key = {}", qp(&self.key));
        let _ = writeln!(s, "tun = {}", q(&self.tun));
        let _ = writeln!(s, "mtu = {}", self.mtu);
        let _ = writeln!(s, "services = {}", list(&self.services));
        let _ = writeln!(s, "status_socket = {}", qp(&self.status_socket));
        if let Some(d) = self.direct_paths {
            let _ = writeln!(s, "direct_paths = {d}");
        }
        if let Some(g) = self.withdraw_grace_secs {
            let _ = writeln!(s, "withdraw_grace_secs = {g}");
        }
        s.push_str(&self.extra);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_toml_strings() {
        assert_eq!(q(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(list(&strings(&["echo", "dns"])), r#"["echo", "dns"]"#);
    }

    fn pki(name: &str) -> CertPaths {
        CertPaths {
            cert: format!("/etc/ztna/pki/{name}.pem").into(),
            key: format!("/etc/ztna/pki/{name}.key").into(),
        }
    }

    fn parse(text: &str, what: &str) -> toml::Value {
        match text.parse::<toml::Value>() {
            Ok(v) => v,
            Err(e) => panic!("{what} is not valid TOML: {e}\n{text}"),
        }
    }

    /// `deploy/config/*.toml` (used by scripts/demo.sh) and the configs the tests write hold the
    /// same keys and values, so the demo and the tests exercise the same configuration.
    #[test]
    fn deploy_configs_match_the_harness() {
        let dir = crate::workspace_root().join("deploy/config");
        let ca = Path::new("/etc/ztna/pki/ca.pem");
        let cases = [
            ("relay.toml", RelayConfig::demo(ca, &pki("relay")).to_toml()),
            (
                "connector.toml",
                ConnectorConfig::demo(ca, &pki("conn1")).to_toml(),
            ),
            (
                "agent.toml",
                AgentConfig::demo(ca, &pki("alice"), Path::new("/run/ztna/agent.sock")).to_toml(),
            ),
        ];
        for (file, generated) in cases {
            let path = dir.join(file);
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            assert_eq!(
                parse(&text, file),
                parse(&generated, "generated"),
                "{file} differs from what the e2e harness writes:\n{generated}"
            );
        }
    }

    #[test]
    fn tcp_keys_are_written_only_when_set() {
        let certs = CertPaths {
            cert: "/p/conn1.pem".into(),
            key: "/p/conn1.key".into(),
        };
        let mut c = ConnectorConfig::demo(Path::new("/p/ca.pem"), &certs);
        let t = c.to_toml();
        assert!(!t.contains("tcp_"), "{t}");
        assert_eq!(
            t.matches("tcp = ").count(),
            1,
            "only web has TCP ports:\n{t}"
        );
        c.tcp_connect_timeout_secs = Some(2);
        c.max_tcp_per_agent = Some(2000);
        let v = parse(&c.to_toml(), "generated");
        assert_eq!(v["tcp_connect_timeout_secs"].as_integer(), Some(2));
        assert_eq!(v["max_tcp_per_agent"].as_integer(), Some(2000));
        assert!(v.get("tcp_idle_timeout_secs").is_none());
        let web = &v["services"][3];
        assert_eq!(web["address"].as_str(), Some("10.100.0.4"));
        assert_eq!(web["tcp"].as_array().map(Vec::len), Some(4));
    }

    #[test]
    fn demo_relay_config_has_policy_tables() {
        let certs = CertPaths {
            cert: "/p/relay.pem".into(),
            key: "/p/relay.key".into(),
        };
        let t = RelayConfig::demo(Path::new("/p/ca.pem"), &certs).to_toml();
        assert!(t.contains("bind = \"10.10.0.1:4433\""));
        assert!(
            t.contains("[[access]]\nservices = [\"echo\", \"dns\", \"web\"]\ngroups = [\"eng\"]")
        );
        assert!(t.contains("[[connectors]]\nidentity = \"conn1\""));
        assert!(
            t.contains("[[services]]\nname = \"dns\"\naddress = \"10.100.0.2\"\nudp = [\"53\"]")
        );
    }
}
