//! The relay's configuration: figment layers built-in defaults < `/etc/ztna/relay.toml` <
//! `--config FILE` (TOML, or JSON for `.json`) < `ZTNA_*` environment variables.
//!
//! The policy (`[[services]]`, `[[access]]`, `[[connectors]]`, `reserved`) and the revocation
//! files (`deny_list`, `crls`) are re-read on SIGHUP and when a watched file changes
//! (`crate::reload`); the other keys take effect at the next start.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use ztna_core::tls::TlsFiles;
use ztna_core::transport::Timing;

use ztna_core::tls::RevocationList;
pub use ztna_xdp_loader::XdpMode;

use crate::policy::{AccessRule, ConnectorRule, Policy, PolicySource, Reserved, ServiceRule};

/// Default system-wide config file.
pub const SYSTEM_CONFIG: &str = "/etc/ztna/relay.toml";

/// Keys that `ZTNA_<KEY>` environment variables may set (`ZTNA_LOG` is read by the logger).
const ENV_KEYS: [&str; 13] = [
    "xdp",
    "xdp_interface",
    "deny_list",
    "reload_poll_secs",
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
    /// The service catalog: each service name's address (and optionally its ports).
    pub services: Vec<ServiceRule>,
    /// Agent access rules.
    pub access: Vec<AccessRule>,
    /// Connector rules.
    pub connectors: Vec<ConnectorRule>,
    /// Ranges no service address may fall in (the relay's public address behind NAT, the
    /// networks of its hosts, ...), besides the tunnel pool and the relay's own addresses.
    pub reserved: Vec<Ipv4Net>,
    /// Deny list file (TOML: `identities = [...]`, `serials = ["1f:2a:..."]`); off unless set.
    pub deny_list: Option<PathBuf>,
    /// CRL files (PEM or DER) of the organisation CA.
    pub crls: Vec<PathBuf>,
    /// How often the config, deny list and CRL files are checked for changes (seconds; 0: only
    /// on SIGHUP).
    pub reload_poll_secs: u64,
    /// Channel data forwarded in the kernel by the relay's XDP program: `auto` (native, else
    /// generic, else userspace with a warning), `native`, `generic` (a startup error if it
    /// can't attach), `off` (userspace only).
    pub xdp: XdpMode,
    /// The interface the XDP program is attached to; default: the interface of `bind`'s
    /// address, or of the default route when `bind` is unspecified.
    pub xdp_interface: Option<String>,
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
            services: Vec::new(),
            access: Vec::new(),
            connectors: Vec::new(),
            reserved: Vec::new(),
            deny_list: None,
            crls: Vec::new(),
            reload_poll_secs: 2,
            xdp: XdpMode::Off,
            xdp_interface: None,
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
        self.policy()?;
        Ok(())
    }

    /// The TLS files; all three are required.
    pub fn tls_files(&self) -> anyhow::Result<TlsFiles> {
        TlsFiles::from_config(self.ca.clone(), self.cert.clone(), self.key.clone())
    }

    /// The relay's own addresses: the bind address, or every interface address of the bound
    /// family when it binds all of them (both families for `[::]`, which is dual-stack).
    fn own_addresses(&self) -> Vec<IpAddr> {
        let bind = self.bind.ip();
        if !bind.is_unspecified() {
            return vec![bind.to_canonical()];
        }
        if_addrs::get_if_addrs()
            .unwrap_or_default()
            .into_iter()
            .map(|i| i.ip())
            .filter(|a| bind.is_ipv6() || a.is_ipv4())
            .collect()
    }

    /// The relay's own IPv4 addresses (see [`RelayConfig::own_addresses`]).
    pub fn relay_addresses(&self) -> Vec<Ipv4Addr> {
        self.own_addresses()
            .into_iter()
            .filter_map(|a| match a {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            })
            .collect()
    }

    /// The relay's own global or unique-local IPv6 addresses (see
    /// [`RelayConfig::own_addresses`]; none when it binds IPv4 only).
    pub fn relay_addresses6(&self) -> Vec<std::net::Ipv6Addr> {
        self.own_addresses()
            .into_iter()
            .filter_map(|a| match a {
                IpAddr::V6(a) if !a.is_loopback() && !a.is_unicast_link_local() => Some(a),
                _ => None,
            })
            .collect()
    }

    /// What service addresses must stay clear of.
    pub fn reserved(&self) -> Reserved {
        Reserved {
            tunnel_pool: Some(self.tunnel_pool),
            relay: self.relay_addresses(),
            relay6: self.relay_addresses6(),
            ranges: self.reserved.clone(),
        }
    }

    /// The policy, validated against [`RelayConfig::reserved`].
    pub fn policy(&self) -> anyhow::Result<Policy> {
        let src = PolicySource {
            access: self.access.clone(),
            connectors: self.connectors.clone(),
            services: self.services.clone(),
        };
        Ok(Policy::build(src, &self.reserved())?)
    }

    /// The deny list and CRLs.
    pub fn revocation_list(&self) -> anyhow::Result<RevocationList> {
        RevocationList::load(self.deny_list.as_deref(), &self.crls)
            .context("loading the deny list and CRLs")
    }

    /// Files whose change triggers a reload, besides the config file itself.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        self.deny_list.iter().chain(&self.crls).cloned().collect()
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
reserved = ["192.168.0.0/16"]
deny_list = "/etc/ztna/deny.toml"
[[services]]
name = "echo"
address = "10.100.0.1"
udp = ["7"]
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
        assert_eq!(cfg.services[0].udp, Some(vec!["7".to_owned()]));
        assert_eq!(cfg.relay_addresses(), vec![Ipv4Addr::new(127, 0, 0, 1)]);
        assert_eq!(
            cfg.watched_files(),
            vec![PathBuf::from("/etc/ztna/deny.toml")]
        );
        assert_eq!(cfg.reload_poll_secs, 2);
        // A catalog entry on the relay's own address, or in a reserved range, does not load.
        for (addr, why) in [("127.0.0.1", "unicast"), ("192.168.7.7", "reserved range")] {
            let bad = dir.path().join("clash.toml");
            std::fs::write(
                &bad,
                format!("bind = \"127.0.0.1:5000\"\nreserved = [\"192.168.0.0/16\"]\n[[services]]\nname = \"x\"\naddress = \"{addr}\"\n"),
            )
            .unwrap();
            let e = format!(
                "{:#}",
                RelayConfig::load(Some(&bad), &Flags::default()).unwrap_err()
            );
            assert!(e.contains(why), "{e}");
        }
        let own = dir.path().join("own.toml");
        std::fs::write(
            &own,
            "bind = \"10.9.8.7:5000\"\n[[services]]\nname = \"x\"\naddress = \"10.9.8.7\"\n",
        )
        .unwrap();
        let e = format!(
            "{:#}",
            RelayConfig::load(Some(&own), &Flags::default()).unwrap_err()
        );
        assert!(e.contains("relay itself"), "{e}");
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
        use ztna_core::daemon::{assert_documented, struct_fields};
        assert_documented(
            include_str!("../../docs/config.md"),
            &[
                ("Relay", struct_fields::<RelayConfig>()),
                ("Relay access rules", struct_fields::<AccessRule>()),
                ("Relay connector rules", struct_fields::<ConnectorRule>()),
                ("Relay services", struct_fields::<ServiceRule>()),
            ],
        );
    }
}
