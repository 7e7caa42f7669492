//! `ztna-test-lying-agent`: an agent with a valid certificate that runs the real tunnel core but
//! sends its connector name mappings a real agent never would, to attack the connector's check
//! of name mappings (`connector/src/names.rs` `check_mapping`). It connects like `ztna-agent`
//! (no TUN device), waits until the inner connection to `CONNECTOR` is up, then sends each
//! `NAME@ADDRESS` mapping on its own name stream and prints one line per mapping:
//! `mapping NAME ADDRESS accepted=true|false`.
//!
//! Usage: `ztna-test-lying-agent RELAY_ADDR CA CERT KEY CONNECTOR NAME@ADDRESS...`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use ztna_core::agent::{Agent, AgentConfig, AgentOptions, DnsOptions};
use ztna_core::direct::DirectOptions;
use ztna_core::tls::{Credentials, TlsFiles};
use ztna_core::transport::Timing;
use ztna_proto::names::NameMapping;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [relay, ca, cert, key, connector, mappings @ ..] = args.as_slice() else {
        bail!("usage: ztna-test-lying-agent RELAY_ADDR CA CERT KEY CONNECTOR NAME@ADDRESS...");
    };
    let mappings: Vec<NameMapping> = mappings
        .iter()
        .map(|m| {
            let (name, address) = m.split_once('@').context("NAME@ADDRESS")?;
            Ok(NameMapping {
                name: name.to_owned(),
                address: address.parse().context("address")?,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let relay: SocketAddr = relay.parse().context("relay address")?;
    let files = TlsFiles {
        ca: ca.into(),
        cert: cert.into(),
        key: key.into(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let credentials = Credentials::load(&files).map_err(|e| anyhow::anyhow!("{e}"))?;
        let cfg = AgentConfig {
            relays: ztna_core::fleet::parse_list(&[relay.to_string()])
                .map_err(anyhow::Error::msg)?,
            relay_name: "relay".into(),
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            credentials,
            timing: Timing::default(),
            tun_mtu: 1280,
            want: vec![],
            direct: DirectOptions {
                enabled: false,
                ..DirectOptions::default()
            },
            options: AgentOptions::default(),
            dns: DnsOptions::default(),
        };
        let (agent, mut from_tunnel) = Agent::start(cfg)?;
        tokio::spawn(async move { while from_tunnel.recv().await.is_some() {} });
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let st = agent.status();
            if st
                .connectors
                .iter()
                .any(|c| &c.name == connector && c.path == "relay")
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("the tunnel to {connector} did not come up");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let names = agent.names();
        for m in mappings {
            let (name, address) = (m.name.clone(), m.address);
            let accepted = names.confirm(connector, m).await;
            println!("mapping {name} {address} accepted={accepted}");
        }
        agent.shutdown().await;
        Ok(())
    })
}
