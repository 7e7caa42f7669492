//! The JSON config handed to `ztna_create`: the same keys as the Linux agent's config file
//! (`agent-linux/src/config.rs`), so one config document describes an agent on either platform.
//!
//! Keys: `relay` (required), `relay_name`, `bind`, `ca`, `cert`, `key` (required), `tun`, `mtu`,
//! `services`, `status_socket`, `log`, `direct_paths`. Unknown keys are an error, as in the Linux
//! agent. Differences on Apple, all documented in `agent-apple/README.md`:
//! - `ca`, `cert` and `key` may hold the PEM text itself instead of a path (the app keeps the key
//!   in the Keychain and hands it over in memory; nothing is written to disk);
//! - `tun` and `status_socket` are accepted and ignored: the system names the `utun` device, and
//!   status is read through `ztna_status_json`.
//!
//! No I/O apart from reading the credential files a path names.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use anyhow::{bail, Context as _};
use serde::{Deserialize, Deserializer};
use ztna_core::tls::Credentials;
use ztna_core::transport::DEFAULT_TUN_MTU;
use ztna_proto::Role;

/// Smallest TUN MTU accepted (the Linux agent's minimum).
const MIN_MTU: u16 = 576;

/// The config as read, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    relay: Option<SocketAddr>,
    #[serde(default = "default_relay_name")]
    relay_name: String,
    #[serde(default = "default_bind")]
    bind: SocketAddr,
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    /// Accepted for compatibility with the Linux agent's file; the system names the device.
    #[serde(default)]
    #[allow(dead_code)]
    tun: Option<String>,
    #[serde(default = "default_mtu")]
    mtu: u16,
    #[serde(default, deserialize_with = "names")]
    services: Vec<String>,
    /// Accepted for compatibility; status goes through `ztna_status_json`.
    #[serde(default)]
    #[allow(dead_code)]
    status_socket: Option<String>,
    #[serde(default)]
    log: Option<String>,
    #[serde(default = "default_direct_paths")]
    direct_paths: bool,
}

fn default_relay_name() -> String {
    "relay".into()
}

fn default_bind() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

fn default_mtu() -> u16 {
    DEFAULT_TUN_MTU
}

fn default_direct_paths() -> bool {
    true
}

/// A list of names, given as a list or as one comma-separated string (as in the Linux agent).
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

/// The validated configuration of an Apple tunnel.
#[derive(Clone)]
pub(crate) struct Config {
    /// The relay's UDP address.
    pub(crate) relay: SocketAddr,
    /// The DNS name the relay's certificate must carry.
    pub(crate) relay_name: String,
    /// Local UDP address to bind.
    pub(crate) bind: SocketAddr,
    /// The agent's credentials, loaded and checked to be an agent's.
    pub(crate) credentials: Credentials,
    /// Tunnel MTU.
    pub(crate) mtu: u16,
    /// Services asked for; empty means all that policy allows.
    pub(crate) services: Vec<String>,
    /// Log filter (tracing `EnvFilter` syntax), default "info".
    pub(crate) log: String,
    /// Whether to look for direct paths to connectors.
    pub(crate) direct_paths: bool,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The credentials hold the private key: never printed.
        f.debug_struct("Config")
            .field("relay", &self.relay)
            .field("relay_name", &self.relay_name)
            .field("bind", &self.bind)
            .field("identity", &self.credentials.identity().name)
            .field("mtu", &self.mtu)
            .field("services", &self.services)
            .field("direct_paths", &self.direct_paths)
            .finish()
    }
}

/// PEM text given inline, or the contents of the file the value names.
fn pem(value: Option<String>, key: &str, what: &str) -> anyhow::Result<Vec<u8>> {
    let v = value.with_context(|| format!("missing `{key}`: {what} (PEM text or a path)"))?;
    if v.trim_start().starts_with("-----BEGIN") {
        return Ok(v.into_bytes());
    }
    std::fs::read(&v).with_context(|| format!("reading `{key}` from {v}"))
}

/// Parses and validates a JSON config document.
pub(crate) fn parse(json: &str) -> anyhow::Result<Config> {
    let raw: RawConfig = serde_json::from_str(json).context("parsing the JSON config")?;
    let relay = raw.relay.context(
        "missing `relay`: the relay's UDP address, e.g. \"relay\": \"203.0.113.10:4433\"",
    )?;
    if relay.ip().is_unspecified() || relay.port() == 0 {
        bail!("`relay` = {relay} is not an address one can connect to");
    }
    if relay.is_ipv4() != raw.bind.is_ipv4() {
        bail!(
            "`bind` = {} and `relay` = {relay} are in different address families",
            raw.bind
        );
    }
    if raw.relay_name.is_empty() {
        bail!("`relay_name` is empty: give the DNS name in the relay's certificate");
    }
    if raw.mtu < MIN_MTU {
        bail!("`mtu` = {} is below the minimum of {MIN_MTU}", raw.mtu);
    }
    let mut seen = BTreeSet::new();
    let mut services = Vec::new();
    for s in raw.services {
        if !ztna_proto::service::is_valid_name(&s) {
            bail!("`services`: {s:?} is not a valid service name");
        }
        if seen.insert(s.clone()) {
            services.push(s);
        }
    }
    let ca = pem(raw.ca, "ca", "the organisation CA certificate")?;
    let cert = pem(raw.cert, "cert", "this agent's certificate")?;
    let key = pem(raw.key, "key", "this agent's private key")?;
    let credentials =
        Credentials::from_pem(&ca, &cert, &key).map_err(|e| anyhow::anyhow!("credentials: {e}"))?;
    // The PEM parser accepts any base64 as a key; building the TLS config is what checks it.
    credentials
        .client_config(ztna_proto::ALPN_TUNNEL)
        .map_err(|e| anyhow::anyhow!("credentials: the private key is not usable: {e}"))?;
    let identity = credentials.identity();
    if identity.role != Role::Agent {
        bail!("the certificate belongs to {identity}; the agent needs an agent certificate");
    }
    Ok(Config {
        relay,
        relay_name: raw.relay_name,
        bind: raw.bind,
        credentials,
        mtu: raw.mtu,
        services,
        log: raw
            .log
            .filter(|l| !l.trim().is_empty())
            .unwrap_or_else(|| "info".into()),
        direct_paths: raw.direct_paths,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztna_core::pki::CertificateAuthority;

    pub(crate) struct Pems {
        pub(crate) ca: String,
        pub(crate) cert: String,
        pub(crate) key: String,
    }

    pub(crate) fn pems(role: Role, name: &str) -> Pems {
        let ca = CertificateAuthority::generate("Test Org").unwrap();
        let issued = ca.issue(role, name, &[], &[]).unwrap();
        Pems {
            ca: ca.cert_pem(),
            cert: issued.cert_pem,
            key: issued.key_pem,
        }
    }

    fn doc(p: &Pems, extra: &str) -> String {
        format!(
            r#"{{"relay": "192.0.2.1:4433", "ca": {}, "cert": {}, "key": {}{extra}}}"#,
            serde_json::to_string(&p.ca).unwrap(),
            serde_json::to_string(&p.cert).unwrap(),
            serde_json::to_string(&p.key).unwrap()
        )
    }

    #[test]
    fn inline_pem_and_defaults() {
        let p = pems(Role::Agent, "alice");
        let cfg = parse(&doc(&p, "")).unwrap();
        assert_eq!(cfg.relay, "192.0.2.1:4433".parse().unwrap());
        assert_eq!(cfg.relay_name, "relay");
        assert_eq!(cfg.bind, "0.0.0.0:0".parse().unwrap());
        assert_eq!(cfg.mtu, 1280);
        assert!(cfg.services.is_empty());
        assert_eq!(cfg.log, "info");
        assert!(cfg.direct_paths);
        assert_eq!(cfg.credentials.identity().name, "alice");
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("PRIVATE KEY"), "{dbg}");
    }

    /// Every key of the Linux agent's file is accepted, with the same meaning.
    #[test]
    fn the_linux_agents_keys_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let p = pems(Role::Agent, "alice");
        let write = |n: &str, t: &str| {
            let f = dir.path().join(n);
            std::fs::write(&f, t).unwrap();
            f.to_str().unwrap().to_owned()
        };
        let json = serde_json::json!({
            "relay": "10.10.0.1:4433", "relay_name": "relay.example", "bind": "0.0.0.0:0",
            "ca": write("ca.pem", &p.ca), "cert": write("a.pem", &p.cert),
            "key": write("a.key", &p.key), "tun": "ztna0", "mtu": 1300,
            "services": "web, db, web", "status_socket": "/run/ztna/agent.sock",
            "log": "debug", "direct_paths": false,
        });
        let cfg = parse(&json.to_string()).unwrap();
        assert_eq!(cfg.relay_name, "relay.example");
        assert_eq!(cfg.mtu, 1300);
        assert_eq!(cfg.services, ["web", "db"]);
        assert_eq!(cfg.log, "debug");
        assert!(!cfg.direct_paths);
    }

    #[test]
    fn clear_errors() {
        let p = pems(Role::Agent, "alice");
        let err = |text: &str| format!("{:#}", parse(text).unwrap_err());
        assert!(err("{not json").contains("parsing the JSON config"));
        assert!(err(&doc(&p, r#", "realy": 1"#)).contains("realy"));
        assert!(err(r#"{"ca": "x"}"#).contains("missing `relay`"));
        assert!(err(r#"{"relay": "192.0.2.1:4433"}"#).contains("missing `ca`"));
        assert!(err(&doc(&p, r#", "mtu": 500"#)).contains("below the minimum"));
        assert!(err(&doc(&p, r#", "bind": "[::]:0""#)).contains("address families"));
        assert!(err(&doc(&p, r#", "services": ["a b"]"#)).contains("not a valid service"));
        assert!(err(&doc(&p, r#", "relay_name": """#)).contains("`relay_name` is empty"));
        let missing =
            r#"{"relay": "192.0.2.1:4433", "ca": "/nonexistent/ca.pem", "cert": "x", "key": "y"}"#;
        assert!(err(missing).contains("reading `ca` from /nonexistent/ca.pem"));
        let relay = pems(Role::Relay, "relay");
        assert!(err(&doc(&relay, "")).contains("needs an agent certificate"));
    }
}
