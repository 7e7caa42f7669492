//! The relay's configuration: figment layers built-in defaults < `/etc/ztna/relay.toml` <
//! `--config FILE` (TOML, or JSON for `.json`) < `ZTNA_*` environment variables.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use ztna_core::tls::TlsFiles;
use ztna_core::transport::Timing;

use crate::policy::{AccessRule, ConnectorRule, Policy};

/// Default system-wide config file.
pub const SYSTEM_CONFIG: &str = "/etc/ztna/relay.toml";

/// Keys that `ZTNA_<KEY>` environment variables may set (`ZTNA_LOG` is read by the logger).
const ENV_KEYS: [&str; 9] = [
    "bind",
    "ca",
    "cert",
    "key",
    "tunnel_pool",
    "metrics",
    "keepalive_secs",
    "idle_timeout_secs",
    "max_channels_per_agent",
];

/// Keys given as command-line flags: the top layer. `None` leaves the lower layers' value.
#[derive(Debug, Default, Clone, Serialize, clap::Args)]
pub struct Flags {
    /// UDP address to listen on (default 0.0.0.0:4433).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<SocketAddr>,
    /// Serve Prometheus metrics on this address.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
    /// Log filter (`info`, `ztna_relay=debug`, ...).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
}

/// Everything the relay reads from configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// UDP address to listen on. The default listens on all IPv4 interfaces, as a public relay
    /// must; the relay logs that it does.
    pub bind: SocketAddr,
    /// Organisation CA certificate.
    pub ca: Option<PathBuf>,
    /// The relay's certificate.
    pub cert: Option<PathBuf>,
    /// The relay's private key.
    pub key: Option<PathBuf>,
    /// Pool of agent tunnel IPs.
    pub tunnel_pool: Ipv4Net,
    /// Prometheus endpoint (off unless set).
    pub metrics: Option<SocketAddr>,
    /// Keepalive interval of the relay's side of each connection.
    pub keepalive_secs: u64,
    /// Idle timeout of each connection.
    pub idle_timeout_secs: u64,
    /// Channels one agent may hold open.
    pub max_channels_per_agent: usize,
    /// Log filter (`info`, `ztna_relay=debug`, ...).
    pub log: Option<String>,
    /// Agent access rules.
    pub access: Vec<AccessRule>,
    /// Connector rules.
    pub connectors: Vec<ConnectorRule>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        let timing = Timing::default();
        Self {
            bind: SocketAddr::from(([0, 0, 0, 0], 4433)),
            ca: None,
            cert: None,
            key: None,
            tunnel_pool: Ipv4Net::new(std::net::Ipv4Addr::new(100, 64, 0, 0), 10)
                .unwrap_or_default(),
            metrics: None,
            keepalive_secs: timing.keepalive.as_secs(),
            idle_timeout_secs: timing.idle_timeout.as_secs(),
            max_channels_per_agent: 64,
            log: None,
            access: Vec::new(),
            connectors: Vec::new(),
        }
    }
}

impl RelayConfig {
    /// Loads the layers; `file` is `--config`, `flags` the other command-line flags.
    pub fn load(file: Option<&Path>, flags: &Flags) -> anyhow::Result<Self> {
        let system: [&Path; 1] = [Path::new(SYSTEM_CONFIG)];
        let sources = ztna_core::daemon::ConfigSources {
            system: &system,
            file,
            env_prefix: "ZTNA_",
            env_keys: &ENV_KEYS,
        };
        let cfg: RelayConfig =
            ztna_core::daemon::layered_config(&RelayConfig::default(), &sources, flags)
                .context("loading the relay configuration")?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.keepalive_secs >= 1,
            "keepalive_secs must be at least 1"
        );
        anyhow::ensure!(
            self.idle_timeout_secs > self.keepalive_secs,
            "idle_timeout_secs must exceed keepalive_secs"
        );
        anyhow::ensure!(
            self.tunnel_pool.prefix_len() <= 30,
            "tunnel_pool {} is too small",
            self.tunnel_pool
        );
        anyhow::ensure!(
            self.max_channels_per_agent >= 1,
            "max_channels_per_agent must be at least 1"
        );
        Ok(())
    }

    /// The TLS files; all three are required.
    pub fn tls_files(&self) -> anyhow::Result<TlsFiles> {
        TlsFiles::from_config(self.ca.clone(), self.cert.clone(), self.key.clone())
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        Policy {
            access: self.access.clone(),
            connectors: self.connectors.clone(),
        }
    }

    /// Keepalive and idle timing.
    pub fn timing(&self) -> Timing {
        Timing {
            keepalive: Duration::from_secs(self.keepalive_secs),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature
    fn toml_and_json_load_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("relay.toml");
        std::fs::write(
            &toml,
            r#"
bind = "127.0.0.1:5000"
ca = "/ca.pem"
cert = "/r.pem"
key = "/r.key"
[[access]]
services = ["echo"]
groups = ["eng"]
[[connectors]]
identity = "c1"
services = ["*"]
"#,
        )
        .unwrap();
        let cfg = RelayConfig::load(Some(&toml), &Flags::default()).unwrap();
        assert_eq!(cfg.bind, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(cfg.access.len(), 1);
        assert_eq!(cfg.tunnel_pool.to_string(), "100.64.0.0/10");
        let json = dir.path().join("relay.json");
        std::fs::write(
            &json,
            r#"{"bind": "127.0.0.1:6000", "metrics": "127.0.0.1:9433"}"#,
        )
        .unwrap();
        let cfg = RelayConfig::load(Some(&json), &Flags::default()).unwrap();
        assert_eq!(cfg.metrics, Some("127.0.0.1:9433".parse().unwrap()));
        assert!(cfg.tls_files().is_err());
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "bnd = \"1.2.3.4:5\"\n").unwrap();
        assert!(RelayConfig::load(Some(&bad), &Flags::default()).is_err());
        // Another program's variables do not break the relay.
        figment::Jail::expect_with(|jail| {
            jail.set_env("ZTNA_CONFIG", "/elsewhere.toml");
            jail.set_env("ZTNA_RELAY", "10.0.0.1:4433");
            jail.set_env("ZTNA_METRICS", "127.0.0.1:9999");
            let cfg =
                RelayConfig::load(Some(&json), &Flags::default()).map_err(|e| e.to_string())?;
            assert_eq!(cfg.metrics, Some("127.0.0.1:9999".parse().unwrap()));
            // Flags beat the environment and the file.
            let flags = Flags {
                bind: Some("127.0.0.2:7000".parse().unwrap()),
                ..Flags::default()
            };
            let cfg = RelayConfig::load(Some(&json), &flags).map_err(|e| e.to_string())?;
            assert_eq!(cfg.bind, "127.0.0.2:7000".parse().unwrap());
            assert_eq!(cfg.metrics, Some("127.0.0.1:9999".parse().unwrap()));
            Ok(())
        });
    }

    /// `docs/config.md` lists exactly the keys of the code, section by section.
    #[test]
    fn docs_config_md_lists_every_key() {
        use std::collections::BTreeSet;
        use ztna_core::daemon::{documented_keys, struct_fields};
        let md = include_str!("../../docs/config.md");
        for (section, fields) in [
            ("Relay", struct_fields::<RelayConfig>()),
            ("Relay access rules", struct_fields::<AccessRule>()),
            ("Relay connector rules", struct_fields::<ConnectorRule>()),
        ] {
            let documented: BTreeSet<String> = documented_keys(md, section).into_iter().collect();
            let code: BTreeSet<String> = fields.iter().map(|f| f.to_string()).collect();
            assert!(!code.is_empty(), "{section}: no fields");
            assert_eq!(
                documented, code,
                "docs/config.md, section \"{section}\", must list exactly the keys of the code"
            );
        }
    }
}
