//! The JSON config handed to `ztna_create`: the agent's config schema from
//! `ztna_core::agent_config`, the same keys, defaults and validation as the Linux agent's config
//! file, so one config document describes an agent on either platform. Unknown keys are an
//! error. Differences on Apple, all documented in `agent-apple/README.md`:
//! - `ca`, `cert` and `key` may hold the PEM text itself instead of a path (the app keeps the key
//!   in the Keychain and hands it over in memory; nothing is written to disk);
//! - `tun`, `status_socket` and `route_table` are validated as on Linux and ignored: the system
//!   names the `utun` device, status is read through `ztna_status_json`, and the extension's
//!   own socket is outside the tunnel without a routing table.
//!
//! No I/O apart from reading the credential files a path names.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use ztna_core::agent_config::{AgentFile, AgentSettings};
use ztna_core::tls::Credentials;
use ztna_proto::Role;

/// The validated configuration of an Apple tunnel.
#[derive(Clone)]
pub(crate) struct Config {
    /// The shared settings; their `tls` paths are emptied once read (they may hold PEM text).
    pub(crate) settings: AgentSettings,
    /// The agent's credentials, loaded and checked to be an agent's.
    pub(crate) credentials: Credentials,
    /// Log filter (tracing `EnvFilter` syntax), default "info".
    pub(crate) log: String,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The credentials hold the private key: never printed.
        f.debug_struct("Config")
            .field("settings", &self.settings)
            .field("identity", &self.credentials.identity().name)
            .finish()
    }
}

/// PEM text given inline, or the contents of the file the value names. Takes the value out.
fn pem(value: &mut PathBuf, key: &str) -> anyhow::Result<Vec<u8>> {
    let v = std::mem::take(value);
    match v.to_str() {
        Some(text) if text.trim_start().starts_with("-----BEGIN") => Ok(text.as_bytes().to_vec()),
        _ => std::fs::read(&v).with_context(|| format!("reading `{key}` from {}", v.display())),
    }
}

/// Parses and validates a JSON config document.
pub(crate) fn parse(json: &str) -> anyhow::Result<Config> {
    let raw: AgentFile = serde_json::from_str(json).context("parsing the JSON config")?;
    let mut settings = raw.validate()?;
    let ca = pem(&mut settings.tls.ca, "ca")?;
    let cert = pem(&mut settings.tls.cert, "cert")?;
    let key = pem(&mut settings.tls.key, "key")?;
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
    let log = settings.log.clone().unwrap_or_else(|| "info".into());
    Ok(Config {
        settings,
        credentials,
        log,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
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
        let s = &cfg.settings;
        assert_eq!(
            s.relays[0].literal(),
            Some("192.0.2.1:4433".parse().unwrap())
        );
        assert_eq!(s.relay_name, "relay");
        assert_eq!(s.bind, "0.0.0.0:0".parse().unwrap());
        assert_eq!(s.mtu, 1280);
        assert!(s.services.is_empty());
        assert_eq!(cfg.log, "info");
        assert!(s.direct_paths);
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
            "relays": ["10.10.0.1:4433"], "relay_name": "relay.example", "bind": "0.0.0.0:0",
            "ca": write("ca.pem", &p.ca), "cert": write("a.pem", &p.cert),
            "key": write("a.key", &p.key), "tun": "ztna0", "mtu": 1300,
            "services": "web, db, web", "status_socket": "/run/ztna/agent.sock",
            "log": "debug", "direct_paths": false, "withdraw_grace_secs": 5, "route_table": 100,
            "dns_domains": ["Corp.Example"], "dns_upstream": "10.0.0.53", "dns_port": 53,
            "dns_split": false,
        });
        // `relay` is the one-relay form of `relays` (never both): tested in clear_errors.
        let keys: BTreeSet<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .chain(["relay"])
            .collect();
        assert_eq!(
            keys,
            ztna_core::agent_config::AGENT_KEYS
                .iter()
                .copied()
                .collect()
        );
        let cfg = parse(&json.to_string()).unwrap();
        let s = &cfg.settings;
        assert_eq!(s.relay_name, "relay.example");
        assert_eq!(s.dns.domains, vec!["corp.example".to_owned()]);
        assert_eq!(s.dns.upstream, vec!["10.0.0.53:53".parse().unwrap()]);
        assert!(!s.dns.split);
        assert_eq!(s.mtu, 1300);
        assert_eq!(s.services, ["web", "db"]);
        assert_eq!(cfg.log, "debug");
        assert!(!s.direct_paths);
        assert_eq!(s.withdraw_grace, std::time::Duration::from_secs(5));
        assert!(
            s.tls.key.as_os_str().is_empty(),
            "credential values are not kept"
        );
    }

    #[test]
    fn clear_errors() {
        let p = pems(Role::Agent, "alice");
        let err = |text: &str| format!("{:#}", parse(text).unwrap_err());
        assert!(err("{not json").contains("parsing the JSON config"));
        assert!(err(&doc(&p, r#", "realy": 1"#)).contains("realy"));
        assert!(err(r#"{"ca": "x"}"#).contains("missing `relays`"));
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
