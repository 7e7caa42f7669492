//! The agent's configuration: figment layering and validation.
//!
//! Sources, lowest first: built-in defaults, `/etc/ztna/agent.toml` (or `/etc/ztna/agent.json`)
//! if it exists, the `--config` file (TOML, or JSON when its name ends in `.json`), `ZTNA_*`
//! environment variables (only the keys below; other `ZTNA_*` variables belong to other
//! programs), and finally command-line flags. Unknown keys in a file are an error.
//!
//! Keys: `relay` (required), `relay_name`, `bind`, `ca`, `cert`, `key` (required), `tun`, `mtu`,
//! `services`, `status_socket`, `log`, `direct_paths`, `withdraw_grace_secs`, `route_table`. No I/O here apart from reading the config files.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize};
use ztna_core::tls::{Credentials, TlsFiles};
use ztna_core::transport::DEFAULT_TUN_MTU;
use ztna_proto::Role;

/// The system-wide config file, read when it exists.
pub(crate) const SYSTEM_CONFIG: &str = "/etc/ztna/agent.toml";
/// The JSON alternative to [`SYSTEM_CONFIG`], read when the TOML file does not exist.
pub(crate) const SYSTEM_CONFIG_JSON: &str = "/etc/ztna/agent.json";
/// Prefix of the environment variables that set config keys.
pub(crate) const ENV_PREFIX: &str = "ZTNA_";
/// Default path of the status socket.
pub(crate) const DEFAULT_STATUS_SOCKET: &str = "/run/ztna/agent.sock";
/// Default name of the TUN device.
pub(crate) const DEFAULT_TUN: &str = "ztna0";
/// Smallest TUN MTU accepted (the IPv4 minimum reassembly size the core insists on).
pub(crate) const MIN_MTU: u16 = 576;

/// Every config key; the only ones read from the environment.
const KEYS: &[&str] = &[
    "relay",
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
];

/// Default routing table of the service routes, also the `SO_MARK` of the agent's socket.
pub(crate) const DEFAULT_ROUTE_TABLE: u32 = 0x7a7a;

/// Command-line flags that override config keys (each also read from `ZTNA_<KEY>`).
#[derive(Debug, Default, Clone, clap::Args, Serialize)]
pub(crate) struct Overrides {
    /// Relay UDP address (key `relay`).
    #[arg(long, env = "ZTNA_RELAY", value_name = "ADDR:PORT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) relay: Option<SocketAddr>,
    /// DNS name in the relay's certificate (key `relay_name`, default "relay").
    #[arg(long, env = "ZTNA_RELAY_NAME", value_name = "NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) relay_name: Option<String>,
    /// Local UDP address to bind (key `bind`, default 0.0.0.0:0).
    #[arg(long, env = "ZTNA_BIND", value_name = "ADDR:PORT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) bind: Option<SocketAddr>,
    /// Organisation CA certificate, PEM (key `ca`).
    #[arg(long, env = "ZTNA_CA", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ca: Option<PathBuf>,
    /// This agent's certificate, PEM (key `cert`).
    #[arg(long, env = "ZTNA_CERT", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cert: Option<PathBuf>,
    /// This agent's private key, PEM (key `key`).
    #[arg(long, env = "ZTNA_KEY", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) key: Option<PathBuf>,
    /// TUN device name (key `tun`, default "ztna0").
    #[arg(long, env = "ZTNA_TUN", value_name = "NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) tun: Option<String>,
    /// TUN MTU (key `mtu`, default 1280).
    #[arg(long, env = "ZTNA_MTU")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) mtu: Option<u16>,
    /// Services to ask for, comma separated (key `services`; default: all that policy allows).
    #[arg(
        long,
        env = "ZTNA_SERVICES",
        value_delimiter = ',',
        value_name = "NAME,..."
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) services: Option<Vec<String>>,
    /// Path of the status socket (key `status_socket`, default /run/ztna/agent.sock).
    #[arg(long, env = "ZTNA_STATUS_SOCKET", value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) status_socket: Option<PathBuf>,
    /// Look for direct paths to connectors (key `direct_paths`, default true); false sends
    /// everything through the relay.
    #[arg(long, env = "ZTNA_DIRECT_PATHS", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) direct_paths: Option<bool>,
    /// Log filter, tracing `EnvFilter` syntax (key `log`; else RUST_LOG; else "info").
    #[arg(long, env = "ZTNA_LOG", value_name = "FILTER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) log: Option<String>,
}

/// The config as read, before validation. Defaults are the built-in layer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    relay: Option<SocketAddr>,
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
    #[serde(default = "default_direct_paths")]
    direct_paths: bool,
    #[serde(default = "default_withdraw_grace_secs")]
    withdraw_grace_secs: u64,
    #[serde(default = "default_route_table")]
    route_table: u32,
}

fn default_withdraw_grace_secs() -> u64 {
    30
}

fn default_route_table() -> u32 {
    DEFAULT_ROUTE_TABLE
}

fn default_direct_paths() -> bool {
    true
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

fn default_status_socket() -> PathBuf {
    PathBuf::from(DEFAULT_STATUS_SOCKET)
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

/// The validated configuration of `ztna-agent up`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Config {
    /// The relay's UDP address.
    pub(crate) relay: SocketAddr,
    /// The DNS name the relay's certificate must carry.
    pub(crate) relay_name: String,
    /// Local UDP address to bind.
    pub(crate) bind: SocketAddr,
    /// CA, certificate and key files.
    pub(crate) tls: TlsFiles,
    /// TUN device name.
    pub(crate) tun: String,
    /// TUN MTU.
    pub(crate) mtu: u16,
    /// Services asked for; empty means all that policy allows.
    pub(crate) services: Vec<String>,
    /// Path of the status socket.
    pub(crate) status_socket: PathBuf,
    /// Log filter, if configured.
    pub(crate) log: Option<String>,
    /// Whether to look for direct paths to connectors (false: everything via the relay).
    pub(crate) direct_paths: bool,
    /// How long a service the relay's catalog withdrew keeps its route.
    pub(crate) withdraw_grace: std::time::Duration,
    /// Routing table of the service routes; also the fwmark of the agent's socket, which a
    /// policy rule exempts from that table.
    pub(crate) route_table: u32,
}

/// Where configuration comes from; [`Sources::standard`] in production, other values in tests.
#[derive(Debug, Clone)]
pub(crate) struct Sources<'a> {
    /// System config files, the first that exists is read.
    pub(crate) system: Vec<PathBuf>,
    /// The `--config` file, which must exist.
    pub(crate) file: Option<&'a Path>,
    /// Environment variable prefix.
    pub(crate) env_prefix: &'a str,
    /// Command-line flags.
    pub(crate) overrides: &'a Overrides,
}

impl<'a> Sources<'a> {
    /// The production sources: `/etc/ztna/agent.toml`, `--config`, `ZTNA_*`, flags.
    pub(crate) fn standard(file: Option<&'a Path>, overrides: &'a Overrides) -> Self {
        Self {
            system: vec![SYSTEM_CONFIG.into(), SYSTEM_CONFIG_JSON.into()],
            file,
            env_prefix: ENV_PREFIX,
            overrides,
        }
    }

    /// The layered figment (`ztna_core::daemon`'s loader, shared with the relay and the
    /// connector). Fails if the `--config` file does not exist.
    fn figment(&self) -> anyhow::Result<Figment> {
        let system: Vec<&Path> = self.system.iter().map(PathBuf::as_path).collect();
        ztna_core::daemon::ConfigSources {
            system: &system,
            file: self.file,
            env_prefix: self.env_prefix,
            env_keys: KEYS,
        }
        .figment(self.overrides)
    }

    /// Loads and validates the configuration.
    pub(crate) fn load(&self) -> anyhow::Result<Config> {
        let raw: RawConfig = ztna_core::daemon::extract(&self.figment()?)?;
        raw.validate()
    }

    /// Only the status socket path, for `ztna-agent status`: other keys may be missing or
    /// invalid, since the client needs none of them.
    pub(crate) fn status_socket(&self) -> anyhow::Result<PathBuf> {
        #[derive(Deserialize)]
        struct StatusOnly {
            #[serde(default = "default_status_socket")]
            status_socket: PathBuf,
        }
        let s: StatusOnly = ztna_core::daemon::extract(&self.figment()?)?;
        Ok(s.status_socket)
    }
}

impl RawConfig {
    fn validate(self) -> anyhow::Result<Config> {
        let relay = self.relay.context(
            "missing `relay`: the relay's UDP address, e.g. relay = \"203.0.113.10:4433\" (or --relay, ZTNA_RELAY)",
        )?;
        if relay.ip().is_unspecified() || relay.port() == 0 {
            bail!("`relay` = {relay} is not an address one can connect to");
        }
        if relay.is_ipv4() != self.bind.is_ipv4() {
            bail!(
                "`bind` = {} and `relay` = {relay} are in different address families",
                self.bind
            );
        }
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
        Ok(Config {
            relay,
            relay_name: self.relay_name,
            bind: self.bind,
            tls,
            tun: self.tun,
            mtu: self.mtu,
            services,
            status_socket: self.status_socket,
            log: self.log.filter(|l| !l.trim().is_empty()),
            direct_paths: self.direct_paths,
            withdraw_grace: std::time::Duration::from_secs(self.withdraw_grace_secs),
            route_table: self.route_table,
        })
    }
}

/// Checks a Linux interface name: 1 to 15 bytes, no '/', ':' or whitespace, not "." or "..".
fn validate_ifname(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if !ok {
        bail!(
            "`tun` = {name:?} is not a valid interface name (1 to {} characters, no '/', ':' or spaces)",
            libc::IFNAMSIZ - 1
        );
    }
    Ok(())
}

impl Config {
    /// Loads the CA, certificate and key, and checks that the certificate is an agent's.
    pub(crate) fn credentials(&self) -> anyhow::Result<Credentials> {
        // TlsError's message already names its cause; format it once instead of chaining it.
        let credentials = Credentials::load(&self.tls)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| {
                format!(
                    "loading credentials (ca {}, cert {}, key {})",
                    self.tls.ca.display(),
                    self.tls.cert.display(),
                    self.tls.key.display()
                )
            })?;
        let identity = credentials.identity();
        if identity.role != Role::Agent {
            bail!(
                "certificate {} belongs to {identity}; the agent needs an agent certificate",
                self.tls.cert.display()
            );
        }
        Ok(credentials)
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "relay {} ({}), tun {} mtu {}, services {}",
            self.relay,
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

    const MINIMAL: &str = r#"
relay = "192.0.2.1:4433"
ca = "/etc/ztna/ca.pem"
cert = "/etc/ztna/agent.pem"
key = "/etc/ztna/agent.key"
"#;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn sources<'a>(file: Option<&'a Path>, overrides: &'a Overrides) -> Sources<'a> {
        Sources {
            system: vec![],
            file,
            // A prefix nothing sets, so the tests do not see the caller's environment.
            env_prefix: "ZTNA_TEST_UNSET_PREFIX_",
            overrides,
        }
    }

    #[test]
    fn defaults_fill_everything_optional() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "agent.toml", MINIMAL);
        let o = Overrides::default();
        let cfg = sources(Some(&f), &o).load().unwrap();
        assert_eq!(cfg, example());
    }

    #[test]
    fn layers_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let system = write(
            dir.path(),
            "system.toml",
            &format!("{MINIMAL}\ntun = \"sys0\"\nmtu = 1300\nrelay_name = \"sys\"\n"),
        );
        let file = write(dir.path(), "agent.toml", "mtu = 1320\nlog = \"debug\"\n");
        let prefix = "ZTNA_TEST_LAYERS_";
        std::env::set_var(format!("{prefix}MTU"), "1340");
        std::env::set_var(format!("{prefix}SERVICES"), "web, db");
        std::env::set_var(format!("{prefix}UNRELATED_THING"), "ignored");
        let overrides = Overrides {
            relay_name: Some("flag".into()),
            ..Overrides::default()
        };
        let s = Sources {
            system: vec![dir.path().join("missing.toml"), system],
            file: Some(&file),
            env_prefix: prefix,
            overrides: &overrides,
        };
        let cfg = s.load().unwrap();
        assert_eq!(cfg.tun, "sys0", "system file");
        assert_eq!(cfg.log.as_deref(), Some("debug"), "--config file");
        assert_eq!(cfg.mtu, 1340, "environment beats files");
        assert_eq!(cfg.services, ["web", "db"], "comma-separated list from env");
        assert_eq!(cfg.relay_name, "flag", "flags beat everything");

        let overrides = Overrides {
            mtu: Some(1360),
            services: Some(vec!["ssh".into()]),
            ..Overrides::default()
        };
        let cfg = Sources {
            overrides: &overrides,
            ..s
        }
        .load()
        .unwrap();
        assert_eq!(cfg.mtu, 1360);
        assert_eq!(cfg.services, ["ssh"]);
    }

    #[test]
    fn direct_paths_can_be_switched_off_by_file_env_or_flag() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "a.toml",
            &format!("{MINIMAL}\ndirect_paths = false\n"),
        );
        let o = Overrides::default();
        assert!(!sources(Some(&f), &o).load().unwrap().direct_paths);
        let prefix = "ZTNA_TEST_DIRECT_";
        std::env::set_var(format!("{prefix}DIRECT_PATHS"), "true");
        let s = Sources {
            system: vec![],
            file: Some(&f),
            env_prefix: prefix,
            overrides: &o,
        };
        assert!(s.load().unwrap().direct_paths, "environment beats the file");
        let off = Overrides {
            direct_paths: Some(false),
            ..Overrides::default()
        };
        let s = Sources {
            overrides: &off,
            ..s
        };
        assert!(
            !s.load().unwrap().direct_paths,
            "the flag beats the environment"
        );
    }

    #[test]
    fn unknown_key_is_rejected_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "agent.toml", &format!("{MINIMAL}\nrealy = 1\n"));
        let o = Overrides::default();
        let err = format!("{:#}", sources(Some(&f), &o).load().unwrap_err());
        assert!(err.contains("realy"), "{err}");
        assert!(
            err.contains(&format!("loading config from {}", f.display())),
            "{err}"
        );
    }

    #[test]
    fn json_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "agent.json",
            r#"{"relay": "[2001:db8::1]:4433", "bind": "[::]:0", "ca": "ca.pem",
                "cert": "a.pem", "key": "a.key", "services": ["web", "web", "db"], "mtu": 1300}"#,
        );
        let o = Overrides::default();
        let cfg = sources(Some(&f), &o).load().unwrap();
        assert_eq!(cfg.relay, "[2001:db8::1]:4433".parse().unwrap());
        assert_eq!(cfg.mtu, 1300);
        assert_eq!(cfg.services, ["web", "db"], "duplicates dropped");
    }

    #[test]
    fn clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let o = Overrides::default();
        let check = |text: &str, want: &str| {
            let f = write(dir.path(), "x.toml", text);
            let err = format!("{:#}", sources(Some(&f), &o).load().unwrap_err());
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        };
        check("ca = \"a\"\ncert = \"b\"\nkey = \"c\"\n", "missing `relay`");
        check("relay = \"192.0.2.1:4433\"\n", "missing `ca`");
        check(&format!("{MINIMAL}\nmtu = 500\n"), "below the minimum");
        check(
            &format!("{MINIMAL}\ntun = \"a/b\"\n"),
            "not a valid interface name",
        );
        check(
            &format!("{MINIMAL}\ntun = \"sixteen-chars-xx\"\n"),
            "not a valid interface name",
        );
        check(
            &format!("{MINIMAL}\nbind = \"[::]:0\"\n"),
            "address families",
        );
        check(
            &format!("{MINIMAL}\nservices = [\"a b\"]\n"),
            "not a valid service",
        );
        check("relay = \"nope\"\n", "loading config from");
        let missing = dir.path().join("nope.toml");
        let err = format!("{:#}", sources(Some(&missing), &o).load().unwrap_err());
        assert!(err.contains("does not exist"), "{err}");
    }

    #[test]
    fn credentials_must_be_an_agents() {
        use ztna_core::pki::CertificateAuthority;
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("Test Org").unwrap();
        let ca_pem = write(dir.path(), "ca.pem", &ca.cert_pem());
        let load = |role: Role, name: &str| {
            let issued = ca.issue(role, name, &[], &[]).unwrap();
            let cfg = Config {
                tls: TlsFiles {
                    ca: ca_pem.clone(),
                    cert: write(dir.path(), &format!("{name}.pem"), &issued.cert_pem),
                    key: write(dir.path(), &format!("{name}.key"), &issued.key_pem),
                },
                ..example()
            };
            cfg.credentials()
        };
        let creds = load(Role::Agent, "alice").unwrap();
        assert_eq!(creds.identity().name, "alice");
        let err = format!("{:#}", load(Role::Relay, "relay").unwrap_err());
        assert!(err.contains("needs an agent certificate"), "{err}");

        let missing = Config {
            tls: TlsFiles {
                ca: dir.path().join("nope.pem"),
                ..example().tls
            },
            ..example()
        };
        let err = format!("{:#}", missing.credentials().unwrap_err());
        assert!(err.starts_with("loading credentials (ca "), "{err}");
        assert!(err.contains("nope.pem"), "{err}");
    }

    fn example() -> Config {
        Config {
            relay: "192.0.2.1:4433".parse().unwrap(),
            relay_name: "relay".into(),
            bind: "0.0.0.0:0".parse().unwrap(),
            tls: TlsFiles {
                ca: "/etc/ztna/ca.pem".into(),
                cert: "/etc/ztna/agent.pem".into(),
                key: "/etc/ztna/agent.key".into(),
            },
            tun: "ztna0".into(),
            mtu: 1280,
            services: vec![],
            status_socket: "/run/ztna/agent.sock".into(),
            log: None,
            direct_paths: true,
            withdraw_grace: std::time::Duration::from_secs(30),
            route_table: DEFAULT_ROUTE_TABLE,
        }
    }

    #[test]
    fn status_socket_needs_no_other_keys() {
        let dir = tempfile::tempdir().unwrap();
        let o = Overrides::default();
        assert_eq!(
            sources(None, &o).status_socket().unwrap(),
            PathBuf::from(DEFAULT_STATUS_SOCKET)
        );
        let f = write(dir.path(), "a.toml", "status_socket = \"/tmp/x.sock\"\n");
        assert_eq!(
            sources(Some(&f), &o).status_socket().unwrap(),
            PathBuf::from("/tmp/x.sock")
        );
        let o = Overrides {
            status_socket: Some("/tmp/y.sock".into()),
            ..Overrides::default()
        };
        assert_eq!(
            sources(Some(&f), &o).status_socket().unwrap(),
            PathBuf::from("/tmp/y.sock")
        );
    }

    /// `docs/config.md` lists exactly the keys of the code.
    #[test]
    fn docs_config_md_lists_every_key() {
        use std::collections::BTreeSet;
        use ztna_core::daemon::{documented_keys, struct_fields};
        let md = include_str!("../../docs/config.md");
        let documented: BTreeSet<String> = documented_keys(md, "Agent").into_iter().collect();
        let code: BTreeSet<String> = struct_fields::<RawConfig>()
            .iter()
            .map(|f| f.to_string())
            .collect();
        assert!(!code.is_empty());
        assert_eq!(
            documented, code,
            "docs/config.md, section \"Agent\", must list exactly the keys of the code"
        );
        // Every key may come from the environment too.
        assert_eq!(
            KEYS.iter().map(|k| k.to_string()).collect::<BTreeSet<_>>(),
            code
        );
    }
}
