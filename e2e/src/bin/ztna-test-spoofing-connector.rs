//! `ztna-test-spoofing-connector`: a connector that speaks the protocol through the tunnel core
//! but sends agents packets a real connector never would, to attack the agent's inbound check.
//! It registers one service (`echo`, UDP 7 and ICMP, at the given address), accepts every
//! channel and inner handshake, and then sends each agent, every 100 ms for `--secs` seconds:
//! - `spoof`: UDP from `SPOOF_SRC:7` (another connector's service address) to the tunnel IP;
//! - `lan`: UDP from its own service address to `LAN_DST` (the agent's LAN address);
//! - `good`: UDP from its own service address, port 7, to the tunnel IP (the control);
//!
//! and the same three again on the TCP carriage stream (`ztna_core::tcp_carriage`, where a real
//! connector sends its TCP segments), with the payloads `carrF`, `carrL` and `carrG`, after a
//! frame too short to be a packet.
//!
//! Usage: `ztna-test-spoofing-connector RELAY_ADDR CA CERT KEY SERVICE_ADDR SPOOF_SRC LAN_DST
//! [--secs N]`

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use ztna_core::session::{Node, RelayTarget};
use ztna_core::tls::{Credentials, TlsFiles};
use ztna_core::transport::{self, Timing};
use ztna_proto::control::{ControlMessage, Hello, Role};
use ztna_proto::{ChannelId, PortRange, ServiceDef, ALPN_TUNNEL};

struct Args {
    relay: SocketAddr,
    files: TlsFiles,
    service: Ipv4Addr,
    spoof: Ipv4Addr,
    lan: Ipv4Addr,
    secs: u64,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [relay, ca, cert, key, service, spoof, lan, rest @ ..] = args.as_slice() else {
        bail!("usage: ztna-test-spoofing-connector RELAY_ADDR CA CERT KEY SERVICE_ADDR SPOOF_SRC LAN_DST [--secs N]");
    };
    let secs = match rest {
        [flag, n] if flag == "--secs" => n.parse().context("--secs")?,
        [] => 10,
        _ => bail!("unexpected arguments {rest:?}"),
    };
    let args = Args {
        relay: relay.parse().context("relay address")?,
        files: TlsFiles {
            ca: ca.into(),
            cert: cert.into(),
            key: key.into(),
        },
        service: service.parse().context("service address")?,
        spoof: spoof.parse().context("spoofed source")?,
        lan: lan.parse().context("LAN destination")?,
        secs,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

/// An IPv4/UDP packet (checksums left zero: the agent's check does not look at them, and
/// tcpdump on the TUN shows the packet either way).
fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Bytes {
    let total = 20 + 8 + payload.len();
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    Bytes::from(p)
}

async fn run(a: Args) -> anyhow::Result<()> {
    let creds = Credentials::load(&a.files).map_err(|e| anyhow::anyhow!("{e}"))?;
    let node = Node::bind(
        SocketAddr::from(([0, 0, 0, 0], 0)),
        creds,
        Timing::default(),
    )?;
    let hello = Hello {
        role: Role::Connector,
        services: vec![ServiceDef {
            name: "echo".into(),
            address: a.service,
            address6: None,
            udp: vec![PortRange::single(7)],
            tcp: vec![],
            icmp: true,
            connector: String::new(),
            names: None,
        }],
        want: vec![],
        software: "ztna-test-spoofing-connector".into(),
        tunnel_ip: None,
    };
    let target = RelayTarget {
        addr: a.relay,
        server_name: "relay".into(),
    };
    let mut session = node.connect_relay(&target, hello).await?;
    let inner_mtu = transport::INNER_MTU;
    let mut server =
        quinn::ServerConfig::with_crypto(node.credentials().server_config(ALPN_TUNNEL)?);
    server.transport_config(transport::inner(inner_mtu, node.timing(), None));
    node.endpoint().set_server_config(Some(server));
    println!("registered");
    let deadline = Instant::now() + Duration::from_secs(a.secs);
    let mut sent = 0u64;
    let mut conns: Vec<(quinn::Connection, Ipv4Addr, Option<quinn::SendStream>)> = Vec::new();
    let mut tunnel_ips: Vec<Ipv4Addr> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while Instant::now() < deadline {
        tokio::select! {
            msg = session.recv() => {
                if let ControlMessage::IncomingChannel { channel_id, agent_tunnel_ip, .. } = msg? {
                    let channel = ChannelId::new(channel_id).context("channel id")?;
                    session.attach_channel(channel);
                    tunnel_ips.push(agent_tunnel_ip);
                    session.send(ControlMessage::ChannelAccepted { channel_id })?;
                }
            }
            incoming = node.endpoint().accept() => {
                let Some(incoming) = incoming else { bail!("endpoint closed") };
                let conn = incoming.await?;
                let tip = tunnel_ips.last().copied().context("a handshake without a channel")?;
                let stream = conn.open_uni().await.ok();
                println!("agent connected (carriage stream: {})", stream.is_some());
                conns.push((conn, tip, stream));
            }
            _ = tick.tick() => {
                for (c, tip, stream) in &mut conns {
                    for p in [
                        udp(a.spoof, *tip, 7, 40000, b"spoof"),
                        udp(a.service, a.lan, 7, 40000, b"lan"),
                        udp(a.service, *tip, 7, 40000, b"good"),
                    ] {
                        if c.send_datagram(p).is_ok() {
                            sent += 1;
                        }
                    }
                    let Some(st) = stream else { continue };
                    let mut frames = vec![0u8, 5, 1, 2, 3, 4, 5];
                    for p in [
                        udp(a.spoof, *tip, 7, 40000, b"carrF"),
                        udp(a.service, a.lan, 7, 40000, b"carrL"),
                        udp(a.service, *tip, 7, 40000, b"carrG"),
                    ] {
                        frames.extend_from_slice(
                            &ztna_core::tcp_carriage::frame_header(&p).context("frame")?,
                        );
                        frames.extend_from_slice(&p);
                    }
                    if st.write_all(&frames).await.is_ok() {
                        sent += 3;
                    }
                }
            }
        }
    }
    println!("done sent={sent}");
    Ok(())
}
