//! The status socket: a Unix socket on which the running agent answers every connection with
//! the JSON of [`AgentStatus`] and closes it; the `ztna-agent status` client; and the
//! human-readable rendering of a status.
//!
//! I/O: the socket file and its parent directory. [`render`] is pure.

use std::fmt::Write as _;
use std::io::{self, Read as _};
use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::AsyncWriteExt as _;
use tokio::net::UnixListener;
use ztna_core::agent::{AgentStatus, ConnectorStatus};
use ztna_core::congestion::CarriageStatus;
use ztna_proto::CandidateKind;

/// How long a client may take to be served.
const SERVE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the client waits for the agent.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest status document the client accepts.
const MAX_STATUS: u64 = 16 << 20;

/// Makes `path` free for a new socket: fails if an agent answers there, removes a stale socket
/// left by a crash, and refuses to remove anything that is not a socket.
pub(crate) fn clear_stale(path: &Path) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    };
    if !meta.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; refusing to replace it (set `status_socket` elsewhere)",
            path.display()
        );
    }
    if StdUnixStream::connect(path).is_ok() {
        bail!(
            "another ztna-agent is running (its status socket {} answers); stop it first",
            path.display()
        );
    }
    tracing::info!(socket = %path.display(), "removing a stale status socket");
    std::fs::remove_file(path)
        .with_context(|| format!("removing stale status socket {}", path.display()))
}

/// Binds the status socket at `path`: creates the parent directory (0755) if needed and makes
/// the socket 0660, owned by the user running the agent (root).
pub(crate) fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .with_context(|| format!("creating directory {}", parent.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding status socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting permissions of {}", path.display()))?;
    Ok(listener)
}

/// Answers every connection with `snapshot()` as one line of JSON, forever.
pub(crate) async fn serve(listener: UnixListener, snapshot: impl Fn() -> AgentStatus) {
    loop {
        let mut stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "status socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut body = match serde_json::to_vec(&snapshot()) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "could not serialise the status");
                continue;
            }
        };
        body.push(b'\n');
        let write = async {
            stream.write_all(&body).await?;
            stream.shutdown().await
        };
        match tokio::time::timeout(SERVE_TIMEOUT, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "status client went away"),
            Err(_) => tracing::debug!("status client too slow; dropped"),
        }
    }
}

/// Reads the JSON status document from the agent's socket at `path`.
pub(crate) fn fetch(path: &Path) -> anyhow::Result<String> {
    let stream = match StdUnixStream::connect(path) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!(
                "ztna-agent is not running (no status socket at {})",
                path.display()
            )
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            bail!(
                "ztna-agent is not running (stale status socket at {})",
                path.display()
            )
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            bail!(
                "permission denied connecting to {} (run as root, or as a member of the socket's group)",
                path.display()
            )
        }
        Err(e) => {
            return Err(e).with_context(|| format!("connecting to {}", path.display()));
        }
    };
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .context("setting a read timeout")?;
    let mut text = String::new();
    stream
        .take(MAX_STATUS)
        .read_to_string(&mut text)
        .with_context(|| format!("reading the status from {}", path.display()))?;
    if text.trim().is_empty() {
        bail!("the agent at {} sent an empty status", path.display());
    }
    Ok(text)
}

/// Parses a status document.
pub(crate) fn parse(text: &str) -> anyhow::Result<AgentStatus> {
    serde_json::from_str(text)
        .context("the agent sent a status this version of ztna-agent does not understand")
}

/// Bytes with a binary unit.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn rtt(ms: Option<f64>) -> String {
    ms.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// Formats rows as left-aligned columns separated by two spaces, the last column unpadded.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::from("  ");
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The paths of one connector: packets per path, the active direct path, this end's candidates
/// and the peer's probed addresses.
fn render_paths(out: &mut String, c: &ConnectorStatus) {
    let [rtx, rrx] = c.relay_packets;
    let [dtx, drx] = c.direct_packets;
    let _ = writeln!(
        out,
        "\n{} paths: relay {rtx} pkts out / {rrx} in, direct {dtx} out / {drx} in",
        c.name
    );
    if let Some(k) = &c.carriage {
        let _ = writeln!(out, "  carriage:   {}", carriage(k));
    }
    let Some(d) = &c.direct else {
        return;
    };
    match (d.addr, d.class) {
        (Some(a), Some(class)) => {
            let _ = writeln!(
                out,
                "  active:     direct {class} {a}, probe rtt {} ms",
                rtt(d.rtt_ms)
            );
        }
        _ => {
            let _ = writeln!(out, "  active:     relay");
        }
    }
    let _ = writeln!(
        out,
        "  switches:   {} to direct, {} back to the relay",
        d.upgrades, d.fallbacks
    );
    let local: Vec<String> = d
        .local_candidates
        .iter()
        .map(|c| format!("{} ({})", c.addr, kind_name(c.kind)))
        .collect();
    let _ = writeln!(
        out,
        "  candidates: {}",
        if local.is_empty() {
            "-".into()
        } else {
            local.join(", ")
        }
    );
    for t in &d.targets {
        let _ = writeln!(
            out,
            "  peer:       {} {} {}, rtt {} ms",
            t.addr,
            t.kind,
            t.state,
            rtt(t.rtt_ms)
        );
    }
}

/// One line on a connection's packet carriage.
fn carriage(k: &CarriageStatus) -> String {
    format!(
        "window {}, rate {:.1} Mbit/s, min rtt {} ms, {} of {} packets lost, {} counted as congestion",
        human_bytes(k.window_bytes),
        k.bandwidth_mbit,
        rtt(k.min_rtt_ms),
        k.lost_packets,
        k.sent_packets,
        k.congestion_events
    )
}

fn kind_name(k: CandidateKind) -> &'static str {
    match k {
        CandidateKind::Host => "host",
        CandidateKind::Reflexive => "reflexive",
        CandidateKind::ReflexiveStable => "reflexive (easy NAT)",
        CandidateKind::ReflexiveVarying => "reflexive (hard NAT)",
    }
}

/// A human-readable summary of a status.
pub(crate) fn render(s: &AgentStatus) -> String {
    let mut out = String::new();
    let state = if s.connected {
        "connected"
    } else {
        "not connected"
    };
    let _ = writeln!(out, "relay:        {} ({state})", s.relay);
    if s.connected {
        let _ = writeln!(out, "relay rtt:    {} ms", rtt(s.relay_rtt_ms));
        if let Some(k) = &s.relay_carriage {
            let _ = writeln!(out, "carriage:     {}", carriage(k));
        }
    }
    if s.relays.len() > 1 {
        let _ = writeln!(out, "relays:");
        let mut rows = vec![[
            "ADDRESS",
            "STATE",
            "IN USE",
            "RTT ms",
            "CHANNELS",
            "SESSIONS",
            "LAST ERROR",
        ]
        .map(String::from)
        .to_vec()];
        for r in &s.relays {
            rows.push(vec![
                r.addr.clone(),
                r.state.clone(),
                if r.in_use { "yes" } else { "-" }.into(),
                rtt(r.rtt_ms),
                r.channels.to_string(),
                r.sessions.to_string(),
                r.last_error.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        out.push_str(&table(&rows));
    }
    let _ = writeln!(out, "observed as:  {}", or_dash(s.observed_addr));
    let _ = writeln!(out, "identity:     {}", s.identity);
    let _ = writeln!(out, "tunnel ip:    {}", or_dash(s.tunnel_ip));
    if let Some(v6) = s.tunnel_ipv6 {
        let _ = writeln!(out, "tunnel ipv6:  {v6}");
    }
    let _ = writeln!(out, "mtu:          {}", s.mtu);
    let _ = writeln!(out, "sessions:     {}", s.relay_sessions);
    if let Some(e) = &s.last_error {
        let _ = writeln!(out, "last error:   {e}");
    }
    if !s.rejected.is_empty() {
        let _ = writeln!(out, "\nrejected services:");
        let rows: Vec<Vec<String>> = s
            .rejected
            .iter()
            .map(|r| vec![r.name.clone(), r.code.clone(), r.message.clone()])
            .collect();
        out.push_str(&table(&rows));
    }
    if !s.services.is_empty() {
        let _ = writeln!(out, "\nservices:");
        let mut rows = vec![["NAME", "ADDRESS", "IPV6 ADDRESS", "CONNECTOR"]
            .map(String::from)
            .to_vec()];
        for v in &s.services {
            rows.push(vec![
                v.name.clone(),
                host_or_net(v.address.into()),
                v.address6
                    .map_or_else(|| "-".into(), |n| host_or_net(n.into())),
                v.connector.clone(),
            ]);
        }
        out.push_str(&table(&rows));
    }
    if s.connectors.is_empty() {
        let _ = writeln!(out, "\nconnectors:   none");
    } else {
        let _ = writeln!(out, "\nconnectors:");
        let mut rows = vec![[
            "NAME",
            "PATH",
            "RTT ms",
            "TX",
            "TX pkts",
            "RX",
            "RX pkts",
            "SERVICES",
            "LAST ERROR",
        ]
        .map(String::from)
        .to_vec()];
        for c in &s.connectors {
            rows.push(vec![
                c.name.clone(),
                c.path.clone(),
                rtt(c.rtt_ms),
                human_bytes(c.tx_bytes),
                c.tx_packets.to_string(),
                human_bytes(c.rx_bytes),
                c.rx_packets.to_string(),
                if c.services.is_empty() {
                    "-".into()
                } else {
                    c.services.join(",")
                },
                c.last_error.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        out.push_str(&table(&rows));
        for c in &s.connectors {
            render_paths(&mut out, c);
        }
    }
    if !s.withdrawing.is_empty() {
        let _ = writeln!(
            out,
            "withdrawing:  {} (routes kept until the grace period ends)",
            s.withdrawing.join(",")
        );
    }
    if let Some(r) = &s.refused {
        let _ = writeln!(out, "refused:      {r}");
    }
    render_names(&mut out, &s.names);
    let _ = writeln!(
        out,
        "\ndropped:      {} outbound with no service route, {} outbound while the tunnel was not up, {} outbound after waiting on a full tunnel, {} outbound from a full fair queue (the busiest flow's oldest), {} tunnel packets with no path (relay away), {} inbound failing the source check, {} inbound (TUN device not reading)",
        s.dropped_no_route, s.dropped_tunnel_down, s.dropped_tunnel_full, s.dropped_queue_full, s.dropped_no_path, s.dropped_inbound, s.dropped_to_platform
    );
    if [
        s.dropped_relay_send,
        s.dropped_direct_receive,
        s.dropped_spoofed,
    ]
    .iter()
    .any(|&n| n > 0)
    {
        let _ = writeln!(
            out,
            "dropped udp:  {} tunnel packets the socket's send buffer refused (relay channel), {} from a direct path's socket (not read in time), {} with a source claiming a connector's virtual address",
            s.dropped_relay_send, s.dropped_direct_receive, s.dropped_spoofed
        );
    }
    let d = &s.dropped_ipv6;
    if *d != Default::default() {
        let _ = writeln!(
            out,
            "dropped ipv6: {} outbound from another source, {} to a port or protocol not offered, {} with extension headers, {} fragments, {} link-local (neighbour discovery, MLD)",
            d.source, d.port_or_protocol, d.extension_header, d.fragment, d.local
        );
    }
    out
}

/// A network as its address alone when it is one host, else `address/len`.
fn host_or_net(net: ipnet::IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

/// Name services: the DNS server, its domains and counters, and the current mappings.
fn render_names(out: &mut String, n: &ztna_core::agent::NamesStatus) {
    if n.services == 0 && n.mappings.is_empty() && n.domains.is_empty() {
        return;
    }
    let [answered, forwarded, denied, refused, failed, dropped] = n.queries;
    let _ = writeln!(
        out,
        "\nnames:        {} name services, DNS server {}, domains {}",
        n.services,
        or_dash(n.server),
        if n.domains.is_empty() {
            "-".to_owned()
        } else {
            n.domains.join(",")
        }
    );
    let _ = writeln!(
        out,
        "  queries:    {answered} answered, {forwarded} forwarded, {denied} NXDOMAIN, {refused} refused, {failed} failed, {dropped} dropped; {} mappings refused by connectors",
        n.mappings_refused
    );
    if !n.mappings.is_empty() {
        let v6 = n.mappings.iter().any(|m| m.address6.is_some());
        let mut header = vec!["NAME".to_owned(), "ADDRESS".to_owned()];
        if v6 {
            header.push("IPV6 ADDRESS".to_owned());
        }
        header.extend(["SERVICE", "CONNECTOR", "CONFIRMED"].map(String::from));
        let mut rows = vec![header];
        rows.extend(n.mappings.iter().map(|m| {
            let mut row = vec![m.name.clone(), m.address.to_string()];
            if v6 {
                row.push(or_dash(m.address6));
            }
            row.extend([
                m.service.clone(),
                m.connector.clone(),
                if m.confirmed { "yes" } else { "no" }.to_owned(),
            ]);
            row
        }));
        out.push_str(&table(&rows));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztna_core::agent::RejectedService;
    use ztna_core::direct::DirectStatus;
    use ztna_core::path::{PathClass, TargetKind, TargetState, TargetStatus};
    use ztna_proto::Candidate;

    fn down() -> AgentStatus {
        AgentStatus {
            relay: "10.99.0.1:4433".into(),
            connected: false,
            relays: vec![],
            identity: "alice".into(),
            tunnel_ip: None,
            tunnel_ipv6: None,
            services: vec![],
            observed_addr: None,
            relay_rtt_ms: None,
            relay_carriage: None,
            mtu: 1280,
            rejected: vec![],
            connectors: vec![],
            dropped_no_route: 3,
            dropped_ipv6: Default::default(),
            dropped_tunnel_down: 0,
            dropped_tunnel_full: 0,
            dropped_queue_full: 0,
            dropped_no_path: 0,
            dropped_relay_send: 0,
            dropped_direct_receive: 0,
            dropped_spoofed: 0,
            dropped_inbound: 0,
            dropped_to_platform: 0,
            withdrawing: vec![],
            refused: None,
            names: Default::default(),
            relay_sessions: 0,
            last_error: Some("the relay did not answer within 5s".into()),
        }
    }

    fn up() -> AgentStatus {
        AgentStatus {
            connected: true,
            tunnel_ip: Some([100, 64, 0, 2].into()),
            observed_addr: Some("198.51.100.7:53211".parse().unwrap()),
            relay_rtt_ms: Some(12.345),
            relay_carriage: Some(CarriageStatus {
                window_bytes: 3 << 20,
                bandwidth_mbit: 96.04,
                min_rtt_ms: Some(11.9),
                sent_packets: 1000,
                lost_packets: 10,
                congestion_events: 1,
                path_longer: 0,
                drain_probes: 0,
            }),
            rejected: vec![RejectedService {
                name: "payroll".into(),
                code: "not-authorised".into(),
                message: "alice may not reach payroll".into(),
            }],
            connectors: vec![
                ConnectorStatus {
                    name: "dc1".into(),
                    path: "relay".into(),
                    channel_id: Some(4),
                    relay: Some("10.99.0.1:4433".into()),
                    rtt_ms: Some(20.04),
                    tx_bytes: 1536,
                    rx_bytes: 3 * 1024 * 1024,
                    tx_packets: 12,
                    rx_packets: 2400,
                    tcp_resets: 0,
                    services: vec!["web".into(), "db".into()],
                    last_error: None,
                    relay_packets: [3, 4],
                    direct_packets: [9, 2396],
                    direct: Some(DirectStatus {
                        addr: Some("192.0.2.9:4434".parse().unwrap()),
                        class: Some(PathClass::Wan),
                        rtt_ms: Some(1.25),
                        local_candidates: vec![Candidate {
                            addr: "198.51.100.7:53211".parse().unwrap(),
                            kind: CandidateKind::Reflexive,
                        }],
                        targets: vec![TargetStatus {
                            addr: "192.0.2.9:4434".parse().unwrap(),
                            kind: TargetKind::Reflexive,
                            state: TargetState::Confirmed,
                            rtt_ms: Some(1.25),
                        }],
                        upgrades: 1,
                        fallbacks: 0,
                    }),
                    carriage: Some(CarriageStatus {
                        window_bytes: 512 << 10,
                        bandwidth_mbit: 20.0,
                        min_rtt_ms: Some(1.25),
                        sent_packets: 2412,
                        lost_packets: 24,
                        congestion_events: 0,
                        path_longer: 0,
                        drain_probes: 0,
                    }),
                },
                ConnectorStatus {
                    name: "lab".into(),
                    path: "connecting".into(),
                    channel_id: None,
                    relay: None,
                    rtt_ms: None,
                    tx_bytes: 0,
                    rx_bytes: 0,
                    tx_packets: 0,
                    rx_packets: 0,
                    tcp_resets: 0,
                    services: vec!["ssh".into()],
                    last_error: Some("inner handshake timed out".into()),
                    relay_packets: [0, 0],
                    direct_packets: [0, 0],
                    direct: None,
                    carriage: None,
                },
            ],
            relay_sessions: 2,
            last_error: None,
            ..down()
        }
    }

    #[test]
    fn renders_the_relay_fleet_with_the_one_in_use() {
        let relay = |addr: &str, state: &str, in_use: bool, rtt: Option<f64>, channels| {
            ztna_core::agent::RelayStatus {
                addr: addr.into(),
                state: state.into(),
                in_use,
                rtt_ms: rtt,
                channels,
                sessions: 1,
                last_error: None,
            }
        };
        let mut s = up();
        s.relays = vec![
            relay("10.99.0.1:4433", "up", true, Some(2.5), 2),
            relay("10.99.0.2:4433", "up", false, Some(41.0), 0),
            ztna_core::agent::RelayStatus {
                last_error: Some("the relay stopped answering".into()),
                sessions: 3,
                ..relay("10.99.0.3:4433", "connecting", false, None, 0)
            },
        ];
        let text = render(&s);
        let lines: Vec<&str> = text.lines().collect();
        let at = lines.iter().position(|l| *l == "relays:").expect(&text);
        assert!(lines[at + 1].trim_start().starts_with("ADDRESS"), "{text}");
        let first: Vec<&str> = lines[at + 2].split_whitespace().collect();
        assert_eq!(first[..4], ["10.99.0.1:4433", "up", "yes", "2.5"], "{text}");
        assert!(lines[at + 3].contains("41.0"), "{text}");
        assert!(
            lines[at + 4].contains("connecting") && lines[at + 4].contains("stopped answering"),
            "{text}"
        );
        // One relay: no table.
        s.relays.truncate(1);
        assert!(!render(&s).contains("relays:"));
    }

    #[test]
    fn renders_service_and_mapping_ipv6_addresses() {
        use ztna_core::agent::{NameMappingStatus, NamesStatus, ServiceAddresses};
        let mut s = up();
        s.tunnel_ipv6 = Some("fd7a:7a74:6e61:7475::6440:2".parse().unwrap());
        s.services = vec![
            ServiceAddresses {
                name: "web".into(),
                address: "10.100.0.1/32".parse().unwrap(),
                address6: Some("fd00:9::1/128".parse().unwrap()),
                connector: "dc1".into(),
            },
            ServiceAddresses {
                name: "wiki".into(),
                address: "10.101.0.0/24".parse().unwrap(),
                address6: Some("fd00:9::100/120".parse().unwrap()),
                connector: "dc1".into(),
            },
            ServiceAddresses {
                name: "ssh".into(),
                address: "10.100.0.9/32".parse().unwrap(),
                address6: None,
                connector: "lab".into(),
            },
        ];
        s.names = NamesStatus {
            services: 1,
            mappings: vec![NameMappingStatus {
                name: "wiki.corp.example".into(),
                address: [10, 101, 0, 7].into(),
                address6: Some("fd00:9::107".parse().unwrap()),
                service: "wiki".into(),
                connector: "dc1".into(),
                confirmed: true,
            }],
            ..Default::default()
        };
        s.dropped_ipv6.fragment = 2;
        let text = render(&s);
        assert!(
            text.contains("tunnel ipv6:  fd7a:7a74:6e61:7475::6440:2\n"),
            "{text}"
        );
        let lines: Vec<&str> = text.lines().collect();
        let at = lines.iter().position(|l| *l == "services:").expect(&text);
        let row = |i: usize| lines[at + i].split_whitespace().collect::<Vec<_>>();
        assert_eq!(row(1), ["NAME", "ADDRESS", "IPV6", "ADDRESS", "CONNECTOR"]);
        assert_eq!(row(2), ["web", "10.100.0.1", "fd00:9::1", "dc1"]);
        assert_eq!(row(3), ["wiki", "10.101.0.0/24", "fd00:9::100/120", "dc1"]);
        assert_eq!(row(4), ["ssh", "10.100.0.9", "-", "lab"]);
        let m = lines
            .iter()
            .find(|l| l.contains("wiki.corp.example"))
            .expect(&text);
        assert_eq!(
            m.split_whitespace().collect::<Vec<_>>(),
            [
                "wiki.corp.example",
                "10.101.0.7",
                "fd00:9::107",
                "wiki",
                "dc1",
                "yes"
            ]
        );
        assert!(text.contains("2 fragments"), "{text}");
    }

    #[test]
    fn renders_a_disconnected_agent() {
        let text = render(&down());
        assert_eq!(
            text,
            "relay:        10.99.0.1:4433 (not connected)\n\
             observed as:  -\n\
             identity:     alice\n\
             tunnel ip:    -\n\
             mtu:          1280\n\
             sessions:     0\n\
             last error:   the relay did not answer within 5s\n\
             \n\
             connectors:   none\n\
             \n\
             dropped:      3 outbound with no service route, 0 outbound while the tunnel was not up, 0 outbound after waiting on a full tunnel, 0 outbound from a full fair queue (the busiest flow's oldest), 0 tunnel packets with no path (relay away), 0 inbound failing the source check, 0 inbound (TUN device not reading)\n"
        );
    }

    #[test]
    fn renders_connectors_as_a_table() {
        let text = render(&up());
        assert!(text.starts_with(
            "relay:        10.99.0.1:4433 (connected)\nrelay rtt:    12.3 ms\n\
             carriage:     window 3.0 MiB, rate 96.0 Mbit/s, min rtt 11.9 ms, 10 of 1000 packets lost, 1 counted as congestion\n\
             observed as:  198.51.100.7:53211\n"
        ), "{text}");
        assert!(text.contains("tunnel ip:    100.64.0.2\n"), "{text}");
        assert!(
            text.contains(
                "rejected services:\n  payroll  not-authorised  alice may not reach payroll\n"
            ),
            "{text}"
        );
        let lines: Vec<&str> = text.lines().collect();
        let head = lines.iter().position(|l| l.contains("NAME")).unwrap();
        assert_eq!(
            lines[head],
            "  NAME  PATH        RTT ms  TX       TX pkts  RX       RX pkts  SERVICES  LAST ERROR"
        );
        assert_eq!(
            lines[head + 1],
            "  dc1   relay       20.0    1.5 KiB  12       3.0 MiB  2400     web,db    -"
        );
        assert_eq!(
            lines[head + 2],
            "  lab   connecting  -       0 B      0        0 B      0        ssh       inner handshake timed out"
        );
        assert!(
            text.contains(
                "dc1 paths: relay 3 pkts out / 4 in, direct 9 out / 2396 in\n  \
                 carriage:   window 512.0 KiB, rate 20.0 Mbit/s, min rtt 1.2 ms, 24 of 2412 packets lost, 0 counted as congestion\n  \
                 active:     direct wan 192.0.2.9:4434, probe rtt 1.2 ms\n  \
                 switches:   1 to direct, 0 back to the relay\n  \
                 candidates: 198.51.100.7:53211 (reflexive)\n  \
                 peer:       192.0.2.9:4434 reflexive confirmed, rtt 1.2 ms\n"
            ),
            "{text}"
        );
        assert!(text.contains("lab paths: relay 0 pkts out / 0 in, direct 0 out / 0 in\n"));
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
    }

    #[tokio::test]
    async fn socket_round_trip_and_stale_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/agent.sock");
        let err = fetch(&path).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "ztna-agent is not running (no status socket at {})",
                path.display()
            )
        );

        clear_stale(&path).unwrap();
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let server = tokio::spawn(serve(listener, up));
        let text = tokio::task::spawn_blocking({
            let path = path.clone();
            move || fetch(&path)
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(parse(&text).unwrap(), up());
        assert!(clear_stale(&path)
            .unwrap_err()
            .to_string()
            .contains("another ztna-agent is running"));

        // A crash leaves the socket file behind: it is refused, then cleared.
        server.abort();
        let _ = server.await;
        assert!(path.exists());
        // A child that a parallel test forks holds a copy of the listener until it execs, so
        // the socket may accept for a moment after the server is gone; ask again, a bounded
        // number of times.
        let mut err = String::new();
        for _ in 0..40 {
            err = tokio::task::spawn_blocking({
                let path = path.clone();
                move || fetch(&path)
            })
            .await
            .unwrap()
            .map_or_else(|e| e.to_string(), |ok| format!("answered: {ok}"));
            if err.contains("stale status socket") {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(err.contains("stale status socket"), "{err}");
        clear_stale(&path).unwrap();
        assert!(!path.exists());

        std::fs::write(&path, "not a socket").unwrap();
        assert!(clear_stale(&path)
            .unwrap_err()
            .to_string()
            .contains("is not a socket"));
    }
}
