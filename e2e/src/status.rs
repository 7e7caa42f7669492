//! `ztna-agent status --json`, read leniently (missing fields read as absent, not as errors), so
//! a test failure names the field that was wrong rather than a parse error.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use serde_json::Value;

/// Whether `ip` is in the tunnel pool 100.64.0.0/10.
pub fn in_tunnel_pool(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    o[0] == 100 && (o[1] & 0xc0) == 64
}

/// The agent's status as JSON.
#[derive(Debug, Clone)]
pub struct AgentStatus {
    /// The whole document.
    pub json: Value,
}

impl AgentStatus {
    /// Parses the output of `ztna-agent status --json`.
    pub fn parse(text: &str) -> Result<Self> {
        let json = serde_json::from_str(text.trim())
            .with_context(|| format!("`ztna-agent status --json` printed no JSON: {text:?}"))?;
        Ok(Self { json })
    }

    /// `connected`.
    pub fn connected(&self) -> bool {
        self.json["connected"].as_bool().unwrap_or(false)
    }

    /// `identity`.
    pub fn identity(&self) -> Option<&str> {
        self.json["identity"].as_str()
    }

    /// `tunnel_ip`, if set and an IPv4 address.
    pub fn tunnel_ip(&self) -> Option<Ipv4Addr> {
        self.json["tunnel_ip"].as_str().and_then(|s| s.parse().ok())
    }

    /// `mtu`.
    pub fn mtu(&self) -> Option<u64> {
        self.json["mtu"].as_u64()
    }

    /// `dropped_no_route`.
    pub fn dropped_no_route(&self) -> Option<u64> {
        self.json["dropped_no_route"].as_u64()
    }

    /// The entry of `connectors` named `name`.
    pub fn connector(&self, name: &str) -> Option<&Value> {
        self.json["connectors"]
            .as_array()?
            .iter()
            .find(|c| c["name"].as_str() == Some(name))
    }

    /// The `path` of connector `name` (`relay`, `connecting`, `down`).
    pub fn connector_path(&self, name: &str) -> Option<&str> {
        self.connector(name)?["path"].as_str()
    }

    /// A numeric field of connector `name` (e.g. `tx_bytes`), 0 if absent.
    pub fn connector_counter(&self, name: &str, field: &str) -> u64 {
        self.connector(name)
            .and_then(|c| c[field].as_u64())
            .unwrap_or(0)
    }

    /// The service names of connector `name` (entries may be names or objects with a `name`).
    pub fn connector_services(&self, name: &str) -> Vec<String> {
        self.connector(name)
            .map(|c| service_names(&c["services"]))
            .unwrap_or_default()
    }

    /// Every service name of every connector, plus any top-level `services` list.
    pub fn all_services(&self) -> Vec<String> {
        let mut all = service_names(&self.json["services"]);
        for c in self.json["connectors"].as_array().into_iter().flatten() {
            all.extend(service_names(&c["services"]));
        }
        all
    }

    /// Whether service `name`, or a service with virtual address `address`, shows anywhere in
    /// the status (the address form covers service entries that are objects).
    pub fn mentions_service(&self, name: &str, address: &str) -> bool {
        self.all_services().iter().any(|s| s == name)
            || self.json["connectors"]
                .to_string()
                .contains(&format!("\"{address}\""))
    }

    /// The `name`s in `rejected`.
    pub fn rejected_names(&self) -> Vec<String> {
        self.json["rejected"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["name"].as_str().map(str::to_owned))
            .collect()
    }

    /// Ready for traffic: connected, a tunnel IP in 100.64.0.0/10, and `connector`'s tunnel up
    /// (on the relay or a direct path).
    pub fn is_ready(&self, connector: &str) -> bool {
        self.connected()
            && self.tunnel_ip().is_some_and(in_tunnel_pool)
            && self
                .connector_path(connector)
                .is_some_and(|p| p == "relay" || p.starts_with("direct-"))
    }
}

fn service_names(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().or_else(|| s["name"].as_str()).map(str::to_owned))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_documented_shape() {
        let s = AgentStatus::parse(
            r#"{"relay":"10.10.0.1:4433","connected":true,"identity":"alice","tunnel_ip":"100.64.0.2",
            "observed_addr":"10.10.0.2:40000","mtu":1280,
            "rejected":[{"name":"secret","code":"forbidden","message":"no"}],
            "connectors":[{"name":"conn1","path":"relay","rtt_ms":0.4,"tx_bytes":10,"rx_bytes":20,
              "tx_packets":1,"rx_packets":2,"services":["echo",{"name":"dns"}]}],
            "dropped_no_route":0}"#,
        )
        .expect("valid");
        assert!(s.is_ready("conn1"));
        assert_eq!(s.tunnel_ip(), Some(Ipv4Addr::new(100, 64, 0, 2)));
        assert_eq!(s.rejected_names(), vec!["secret"]);
        assert_eq!(s.connector_services("conn1"), vec!["echo", "dns"]);
        assert_eq!(s.connector_counter("conn1", "rx_bytes"), 20);
        assert!(s.mentions_service("dns", "10.100.0.2"));
        assert!(!s.mentions_service("secret", "10.100.0.3"));
        assert!(in_tunnel_pool(Ipv4Addr::new(100, 127, 255, 255)));
        assert!(!in_tunnel_pool(Ipv4Addr::new(100, 128, 0, 1)));
        let down = AgentStatus::parse(r#"{"connected":false,"tunnel_ip":null,"connectors":[]}"#)
            .expect("valid");
        assert!(!down.is_ready("conn1"));
        assert!(AgentStatus::parse("not json").is_err());
    }
}
