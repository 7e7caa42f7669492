//! `ztna-test-two-tunnels`: an agent that speaks the protocol the way a modified agent could,
//! to attack the connector's per-identity limits: one relay session, two channels to the same
//! connector, and a complete inner handshake over each. Prints `ready connections=N` once both
//! handshakes are done (N: how many of its inner connections are still open), then holds them
//! for `--hold-secs` and prints `done open=N`.
//!
//! Usage: `ztna-test-two-tunnels RELAY_ADDR CA CERT KEY CONNECTOR [--hold-secs N]`

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context as _};
use ztna_core::session::{Node, RelayTarget};
use ztna_core::tls::{Credentials, TlsFiles};
use ztna_core::transport::{self, Timing};
use ztna_proto::control::{ControlMessage, Hello, Role};
use ztna_proto::{ChannelId, ALPN_TUNNEL};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [relay, ca, cert, key, connector, rest @ ..] = args.as_slice() else {
        bail!("usage: ztna-test-two-tunnels RELAY_ADDR CA CERT KEY CONNECTOR [--hold-secs N]");
    };
    let hold = match rest {
        [flag, n] if flag == "--hold-secs" => n.parse().context("--hold-secs")?,
        [] => 5,
        _ => bail!("unexpected arguments {rest:?}"),
    };
    let relay: SocketAddr = relay.parse().context("relay address")?;
    let files = TlsFiles {
        ca: ca.into(),
        cert: cert.into(),
        key: key.into(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(relay, files, connector, Duration::from_secs(hold)))
}

async fn run(
    relay: SocketAddr,
    files: TlsFiles,
    connector: &str,
    hold: Duration,
) -> anyhow::Result<()> {
    let creds = Credentials::load(&files).map_err(|e| anyhow::anyhow!("{e}"))?;
    let node = Node::bind(
        SocketAddr::from(([0, 0, 0, 0], 0)),
        creds,
        Timing::default(),
    )?;
    let hello = Hello {
        role: Role::Agent,
        services: vec![],
        want: vec![],
        software: "ztna-test-two-tunnels".into(),
        tunnel_ip: None,
    };
    let target = RelayTarget {
        addr: relay,
        server_name: "relay".into(),
    };
    let mut session = node.connect_relay(&target, hello).await?;
    let inner_mtu = transport::INNER_MTU;
    let mut conns = Vec::new();
    for request_id in 1..=2u32 {
        session.send(ControlMessage::OpenChannel {
            request_id,
            connector: connector.to_owned(),
        })?;
        let channel = loop {
            match tokio::time::timeout(Duration::from_secs(10), session.recv()).await?? {
                ControlMessage::ChannelOpened {
                    request_id: id,
                    channel_id,
                    ..
                } if id == request_id => {
                    break ChannelId::new(channel_id).context("channel id out of range")?
                }
                ControlMessage::Error { code, message, .. } => {
                    bail!("channel {request_id} refused: {code}: {message}")
                }
                _ => continue,
            }
        };
        let vaddr = session.attach_channel(channel);
        let mut cfg = quinn::ClientConfig::new(node.credentials().client_config(ALPN_TUNNEL)?);
        cfg.transport_config(transport::inner_agent(inner_mtu, node.timing(), None));
        let conn = tokio::time::timeout(
            Duration::from_secs(10),
            node.endpoint().connect_with(cfg, vaddr, connector)?,
        )
        .await
        .context("inner handshake timed out")??;
        eprintln!("inner connection {request_id} up over channel {channel}");
        conns.push(conn);
    }
    let open = |c: &[quinn::Connection]| c.iter().filter(|c| c.close_reason().is_none()).count();
    println!("ready connections={}", open(&conns));
    tokio::time::sleep(hold).await;
    println!("done open={}", open(&conns));
    Ok(())
}
