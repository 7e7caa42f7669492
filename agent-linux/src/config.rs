//! The agent's configuration: figment layering of the schema in `ztna_core::agent_config`.
//!
//! Sources, lowest first: built-in defaults, `/etc/ztna/agent.toml` (or `/etc/ztna/agent.json`)
//! if it exists, the `--config` file (TOML, or JSON when its name ends in `.json`), `ZTNA_*`
//! environment variables (only the agent's keys; other `ZTNA_*` variables belong to other
//! programs), and finally command-line flags. Unknown keys in a file are an error. The keys,
//! defaults and validation are core's ([`AgentFile`]), shared with the Apple library. No I/O
//! here apart from reading the config files and the credentials.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use figment::Figment;
use serde::{Deserialize, Serialize};
use ztna_core::agent_config::{default_status_socket, AgentFile, AgentSettings, AGENT_KEYS};
use ztna_core::tls::Credentials;
use ztna_proto::Role;

/// The validated configuration of `ztna-agent up`.
pub(crate) type Config = AgentSettings;

/// The system-wide config file, read when it exists.
pub(crate) const SYSTEM_CONFIG: &str = "/etc/ztna/agent.toml";
/// The JSON alternative to [`SYSTEM_CONFIG`], read when the TOML file does not exist.
pub(crate) const SYSTEM_CONFIG_JSON: &str = "/etc/ztna/agent.json";
/// Prefix of the environment variables that set config keys.
pub(crate) const ENV_PREFIX: &str = "ZTNA_";

/// Command-line flags that override config keys (each also read from `ZTNA_<KEY>`).
#[derive(Debug, Default, Clone, clap::Args, Serialize)]
pub(crate) struct Overrides {
    /// One relay: its UDP address or DNS name with port (key `relay`).
    #[arg(
        long,
        env = "ZTNA_RELAY",
        value_name = "HOST:PORT",
        conflicts_with = "relays"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) relay: Option<String>,
    /// The relay fleet, comma separated: addresses or DNS names with ports; a name that
    /// resolves to several addresses is several relays (key `relays`).
    #[arg(
        long,
        env = "ZTNA_RELAYS",
        value_delimiter = ',',
        value_name = "HOST:PORT,..."
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) relays: Option<Vec<String>>,
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
            env_keys: AGENT_KEYS,
        }
        .figment(self.overrides)
    }

    /// Loads and validates the configuration.
    pub(crate) fn load(&self) -> anyhow::Result<Config> {
        let raw: AgentFile = ztna_core::daemon::extract(&self.figment()?)?;
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

/// Loads the CA, certificate and key, and checks that the certificate is an agent's.
pub(crate) fn credentials(cfg: &Config) -> anyhow::Result<Credentials> {
    // TlsError's message already names its cause; format it once instead of chaining it.
    let credentials = Credentials::load(&cfg.tls)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| {
            format!(
                "loading credentials (ca {}, cert {}, key {})",
                cfg.tls.ca.display(),
                cfg.tls.cert.display(),
                cfg.tls.key.display()
            )
        })?;
    let identity = credentials.identity();
    if identity.role != Role::Agent {
        bail!(
            "certificate {} belongs to {identity}; the agent needs an agent certificate",
            cfg.tls.cert.display()
        );
    }
    Ok(credentials)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztna_core::tls::TlsFiles;

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
        assert_eq!(
            cfg.relays[0].literal(),
            Some("[2001:db8::1]:4433".parse().unwrap())
        );
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
        check(
            "ca = \"a\"\ncert = \"b\"\nkey = \"c\"\n",
            "missing `relays`",
        );
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
        check("relay = \"nope\"\n", "expected host:port");
        check(
            &format!("{MINIMAL}\nrelays = [\"192.0.2.2:4433\"]\n"),
            "not both",
        );
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
            credentials(&cfg)
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
        let err = format!("{:#}", credentials(&missing).unwrap_err());
        assert!(err.starts_with("loading credentials (ca "), "{err}");
        assert!(err.contains("nope.pem"), "{err}");
    }

    fn example() -> Config {
        Config {
            relays: ztna_core::fleet::parse_list(&["192.0.2.1:4433".into()]).unwrap(),
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
            route_table: ztna_core::agent_config::DEFAULT_ROUTE_TABLE,
            dns: Default::default(),
        }
    }

    #[test]
    fn status_socket_needs_no_other_keys() {
        let dir = tempfile::tempdir().unwrap();
        let o = Overrides::default();
        assert_eq!(
            sources(None, &o).status_socket().unwrap(),
            default_status_socket()
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
        use ztna_core::daemon::{assert_documented, struct_fields};
        let fields = struct_fields::<AgentFile>();
        assert_documented(include_str!("../../docs/config.md"), &[("Agent", fields)]);
        let code: BTreeSet<String> = fields.iter().map(|f| f.to_string()).collect();
        // Every key may come from the environment too.
        assert_eq!(
            AGENT_KEYS
                .iter()
                .map(|k| k.to_string())
                .collect::<BTreeSet<_>>(),
            code
        );
    }
}
