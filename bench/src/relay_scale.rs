//! Relay scale: one real `ztna-relay` on loopback, one simulated connector and N simulated
//! agents in this process, all speaking the real control protocol over real quinn connections
//! with their own certificates (the relay replaces a session of the same identity, so each agent
//! needs its own).
//!
//! For each N: the connector connects and accepts every incoming channel; the agents connect
//! (at most [`CONNECT_CONCURRENCY`] handshakes at a time) and each opens a channel to the
//! connector; then every agent sends one 1200-byte channel datagram a second for the steady
//! phase (the agents' quinn keepalives every 5 s on top); then a few agents send 1200-byte
//! channel datagrams at a controlled rate (below saturation), then as fast as their socket
//! takes them (saturation). In each forwarding phase the relay's own counters (forwarded,
//! dropped; read from its metrics endpoint on loopback) and the kernel's UDP receive-buffer
//! errors (`/proc/net/snmp`) are read before and after, and the relay's CPU per datagram is its
//! CPU time over what it really forwarded. The relay's CPU comes from `/proc/PID/stat`, its
//! memory from `/proc/PID/status`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use ztna_core::pki::CertificateAuthority;
use ztna_core::session::{open_control, ControlReader, ControlWriter};
use ztna_core::tap::TapSocket;
use ztna_core::tls::Credentials;
use ztna_core::transport::{self, Timing};
use ztna_e2e::{Access, ConnectorGrant, PolicyService, RelayConfig};
use ztna_proto::control::{ControlMessage, Hello, Role, Welcome};
use ztna_proto::{ChannelId, PortRange, ServiceDef, ALPN_RELAY};

/// Datagrams per GSO send in the batched saturation phase.
const GSO_BATCH: usize = 8;

/// Handshakes in flight at once while the agents connect.
const CONNECT_CONCURRENCY: usize = 100;
/// Payload of every datagram (an inner packet's worth).
const PAYLOAD: usize = 1200;
/// Longest a single handshake, hello/welcome or channel opening may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ScalePlan {
    /// Numbers of agents, one relay run each.
    pub(crate) agents: Vec<usize>,
    /// Seconds of the steady phase (one datagram per agent per second).
    pub(crate) steady_secs: u64,
    /// Seconds of the forwarding phase.
    pub(crate) blast_secs: u64,
    /// Agents that send as fast as they can in the forwarding phase.
    pub(crate) blast_agents: usize,
    /// Datagrams a second, all agents together, in the controlled-rate phase.
    pub(crate) rate_pps: u64,
}

/// The results of every N.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RelayScale {
    pub(crate) plan: ScalePlan,
    pub(crate) runs: Vec<ScaleRun>,
}

/// The results of one N.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct ScaleRun {
    pub(crate) agents: usize,
    pub(crate) error: Option<String>,
    /// Agents that got a welcome.
    pub(crate) connected: usize,
    /// Agents whose handshake, hello or channel failed.
    pub(crate) failed: usize,
    /// How they failed: error message → agents.
    pub(crate) errors: std::collections::BTreeMap<String, usize>,
    /// Seconds from the first connect to the last welcome.
    pub(crate) setup_s: f64,
    /// Connections per second to welcome.
    pub(crate) setup_per_s: f64,
    /// Channels per second (open-channel → channel-opened, through the connector).
    pub(crate) channels_per_s: f64,
    /// Relay CPU while the agents connected, % of one core.
    pub(crate) relay_cpu_setup_percent: f64,
    /// The relay's handshake counters after the setup (its metrics): why agents failed, seen
    /// from the relay's side.
    pub(crate) relay_handshakes: Handshakes,
    /// Relay RSS with only the connector connected, KiB.
    pub(crate) relay_rss_idle_kib: u64,
    /// Relay RSS with every agent connected and a channel open, after the steady phase, KiB.
    pub(crate) relay_rss_loaded_kib: u64,
    /// (loaded − idle) / connected, KiB.
    pub(crate) rss_per_session_kib: f64,
    /// Relay peak RSS (VmHWM) at the end, KiB.
    pub(crate) relay_peak_rss_kib: u64,
    /// Relay CPU in the steady phase, % of one core.
    pub(crate) relay_cpu_steady_percent: f64,
    /// Datagrams the agents sent / the connector received in the steady phase.
    pub(crate) steady_sent: u64,
    pub(crate) steady_received: u64,
    /// Forwarding phase: agents blasting, datagrams sent and received, rates at the connector.
    pub(crate) blast_agents: usize,
    pub(crate) blast_sent: u64,
    pub(crate) blast_received: u64,
    pub(crate) forward_pps: f64,
    pub(crate) forward_mbps: f64,
    /// Relay CPU in the forwarding phase, % of one core.
    pub(crate) relay_cpu_forward_percent: f64,
    /// Relay CPU time per forwarded datagram in the forwarding phase, µs.
    pub(crate) relay_us_per_packet: f64,
    /// The saturation phase as the relay counted it (single datagrams).
    pub(crate) saturated: Option<Phase>,
    /// Saturation with each agent sending batches of [`GSO_BATCH`] datagrams in one GSO send
    /// (as an agent's socket sends its inner connection's bulk traffic).
    pub(crate) saturated_gso: Option<Phase>,
    /// The controlled-rate phase (single datagrams).
    pub(crate) controlled: Option<Phase>,
    /// The controlled-rate phase at four times the rate, in GSO batches.
    pub(crate) controlled_gso: Option<Phase>,
}

/// The relay's handshake counters (`ztna_relay_handshakes_*`, `sessions`), and the kernel's
/// UDP receive-buffer errors over the setup.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Handshakes {
    pub(crate) sessions: u64,
    pub(crate) retried: u64,
    pub(crate) refused: u64,
    pub(crate) failed: u64,
    pub(crate) timed_out: u64,
    /// Sessions refused after the handshake (no hello in time, ...).
    pub(crate) rejected: u64,
    /// Handshakes the relay still had in progress.
    pub(crate) active: u64,
    pub(crate) udp_rcvbuf_errors: u64,
}

impl Handshakes {
    fn read(metrics: SocketAddr, rcvbuf_before: u64) -> Self {
        let m = scrape(metrics).unwrap_or_default();
        let v = |name: &str| m.value(&format!("ztna_relay_{name}_total")) as u64;
        Self {
            sessions: v("sessions"),
            retried: v("handshakes_retried"),
            refused: v("handshakes_refused"),
            failed: v("handshakes_failed"),
            timed_out: v("handshakes_timed_out"),
            rejected: v("sessions_rejected"),
            active: m.value("ztna_relay_handshakes_active") as u64,
            udp_rcvbuf_errors: udp_rcvbuf_errors().saturating_sub(rcvbuf_before),
        }
    }
}

/// One forwarding phase, from the relay's own counters and the kernel's.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Phase {
    /// Datagrams the agents' sockets took.
    pub(crate) sent: u64,
    /// Datagrams the relay forwarded (its `datagrams_forwarded` counter).
    pub(crate) relay_forwarded: u64,
    /// Datagrams the relay dropped (all reasons, its `datagrams_dropped`).
    pub(crate) relay_dropped: u64,
    /// UDP datagrams the kernel dropped for full receive buffers (`RcvbufErrors`, this
    /// namespace: the relay's socket and the simulated connector's).
    pub(crate) udp_rcvbuf_errors: u64,
    /// Datagrams the connector received.
    pub(crate) received: u64,
    /// Seconds measured.
    pub(crate) secs: f64,
    /// Relay CPU, % of one core.
    pub(crate) relay_cpu_percent: f64,
    /// Relay CPU time per datagram it forwarded, µs.
    pub(crate) relay_us_per_forwarded: f64,
}

impl Phase {
    fn forwarded_pps(&self) -> f64 {
        self.relay_forwarded as f64 / self.secs.max(1e-3)
    }
}

/// Counters read at the start of a phase.
struct Marks {
    at: Instant,
    cpu: f64,
    forwarded: u64,
    dropped: u64,
    rcvbuf: u64,
    received: u64,
}

fn marks(relay_pid: u32, metrics: SocketAddr, connector: &TapSocket) -> Marks {
    let m = scrape(metrics).unwrap_or_default();
    Marks {
        at: Instant::now(),
        cpu: cpu(relay_pid),
        forwarded: m.value("ztna_relay_datagrams_forwarded_total") as u64,
        dropped: m.value("ztna_relay_datagrams_dropped_total") as u64,
        rcvbuf: udp_rcvbuf_errors(),
        received: connector.received(),
    }
}

impl Marks {
    fn phase(&self, end: &Marks, sent: u64) -> Phase {
        let secs = end.at.duration_since(self.at).as_secs_f64();
        let cpu = end.cpu - self.cpu;
        let forwarded = end.forwarded.saturating_sub(self.forwarded);
        Phase {
            sent,
            relay_forwarded: forwarded,
            relay_dropped: end.dropped.saturating_sub(self.dropped),
            udp_rcvbuf_errors: end.rcvbuf.saturating_sub(self.rcvbuf),
            received: end.received.saturating_sub(self.received),
            secs,
            relay_cpu_percent: 100.0 * cpu / secs.max(1e-3),
            relay_us_per_forwarded: if forwarded > 0 {
                1e6 * cpu / forwarded as f64
            } else {
                f64::NAN
            },
        }
    }
}

/// The relay's metrics, fetched with a plain HTTP/1.0 GET on loopback.
fn scrape(addr: SocketAddr) -> Result<ztna_e2e::Metrics> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: relay\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok(ztna_e2e::Metrics::parse(body))
}

/// `RcvbufErrors` of UDP in this network namespace (0 if it can't be read).
fn udp_rcvbuf_errors() -> u64 {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = text.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// The PKI of the simulation: CA, relay, connector and agent certificates as PEM.
struct Pki {
    ca_pem: String,
    connector: (String, String),
    agents: Vec<(String, String)>,
}

/// Runs every N of `plan` against a fresh relay each; `dir` holds PKI, configs and logs.
pub(crate) fn run(plan: &ScalePlan, dir: &Path) -> Result<RelayScale> {
    let max = plan.agents.iter().copied().max().unwrap_or(0);
    eprintln!("==> relay scale: minting {max} agent certificates");
    let ca = CertificateAuthority::generate("ztna bench").context("minting the CA")?;
    let relay = ca.issue(Role::Relay, "relay", &[], &[Ipv4Addr::LOCALHOST.into()])?;
    let connector = ca.issue(Role::Connector, "conn1", &[], &[])?;
    let eng = ["eng".to_owned()];
    let agents = (0..max)
        .map(|i| {
            ca.issue(Role::Agent, &format!("agent{i}"), &eng, &[])
                .map(|c| (c.cert_pem, c.key_pem))
        })
        .collect::<Result<Vec<_>, _>>()
        .context("minting agent certificates")?;
    let write = |name: &str, text: &str| -> Result<std::path::PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    };
    let ca_path = write("ca.pem", &ca.cert_pem())?;
    let relay_cert = write("relay.pem", &relay.cert_pem)?;
    let relay_key = write("relay.key", &relay.key_pem)?;
    let pki = Pki {
        ca_pem: ca.cert_pem(),
        connector: (connector.cert_pem, connector.key_pem),
        agents,
    };
    let mut runs = Vec::new();
    for &n in &plan.agents {
        eprintln!("==> relay scale: {n} agents");
        let port = free_udp_port()?;
        let metrics_port = free_tcp_port()?;
        let cfg = RelayConfig {
            bind: format!("127.0.0.1:{port}"),
            ca: ca_path.clone(),
            cert: relay_cert.clone(),
            key: relay_key.clone(),
            tunnel_pool: "100.64.0.0/10".into(),
            metrics: Some(format!("127.0.0.1:{metrics_port}")),
            keepalive_secs: 5,
            idle_timeout_secs: 20,
            access: vec![Access {
                services: vec!["bench".into()],
                groups: vec!["eng".into()],
                identities: vec![],
            }],
            connectors: vec![ConnectorGrant {
                identity: "conn1".into(),
                services: vec!["bench".into()],
            }],
            services: vec![PolicyService::new("bench", "10.100.0.9")],
            reserved: vec![],
            deny_list: None,
            crls: vec![],
            reload_poll_secs: None,
        };
        let cfg_path = write(&format!("relay-{n}.toml"), &cfg.to_toml())?;
        let log = dir.join(format!("relay-{n}.log"));
        let mut r = ScaleRun {
            agents: n,
            ..ScaleRun::default()
        };
        let relay = RelayProcess::start(&cfg_path, &log)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let result = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the tokio runtime")?
            .block_on(simulate(
                &pki,
                (addr, SocketAddr::from(([127, 0, 0, 1], metrics_port))),
                relay.pid,
                n,
                plan,
                &mut r,
            ));
        if let Err(e) = result {
            eprintln!("==> relay scale with {n} agents failed: {e:#}");
            r.error = Some(format!("{e:#}"));
        }
        if r.error.is_some() || r.failed > 0 {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            eprintln!(
                "==> the relay's log:\n{}",
                ztna_e2e::topology::tail(&tail, 20)
            );
        }
        drop(relay);
        eprintln!(
            "==> {n} agents: {:.0} conn/s, {:.1} KiB/session, {:.0} pkt/s ({:.0} Mbit/s) forwarded",
            r.setup_per_s, r.rss_per_session_kib, r.forward_pps, r.forward_mbps
        );
        runs.push(r);
    }
    Ok(RelayScale {
        plan: plan.clone(),
        runs,
    })
}

/// A free TCP port on loopback (bound and released; the relay binds it right after).
fn free_tcp_port() -> Result<u16> {
    let s = std::net::TcpListener::bind("127.0.0.1:0").context("binding a probe socket")?;
    Ok(s.local_addr()?.port())
}

/// A free UDP port on loopback (bound and released; the relay binds it right after).
fn free_udp_port() -> Result<u16> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").context("binding a probe socket")?;
    Ok(s.local_addr()?.port())
}

/// The relay child process, killed and reaped on drop.
struct RelayProcess {
    child: Child,
    pid: u32,
}

impl RelayProcess {
    fn start(cfg: &Path, log: &Path) -> Result<Self> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(ztna_e2e::bin("ztna-relay")?);
        cmd.arg("--config").arg(cfg);
        for (k, _) in std::env::vars_os() {
            if k.to_str()
                .is_some_and(|k| k.starts_with("ZTNA_") || k == "RUST_LOG")
            {
                cmd.env_remove(&k);
            }
        }
        let child = cmd
            .env("ZTNA_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("starting ztna-relay")?;
        let pid = child.id();
        Ok(Self { child, pid })
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A simulated client's session: connection and control stream.
struct Session {
    conn: quinn::Connection,
    writer: ControlWriter,
    reader: ControlReader,
    welcome: Welcome,
}

async fn connect(
    endpoint: &quinn::Endpoint,
    relay: SocketAddr,
    (cert, key): &(String, String),
    ca_pem: &str,
    hello: Hello,
) -> Result<Session> {
    let creds = Credentials::from_pem(ca_pem.as_bytes(), cert.as_bytes(), key.as_bytes())?;
    let mut cfg = quinn::ClientConfig::new(creds.client_config(ALPN_RELAY)?);
    cfg.transport_config(transport::outer(Timing::default()));
    let conn = tokio::time::timeout(STEP_TIMEOUT, endpoint.connect_with(cfg, relay, "relay")?)
        .await
        .context("QUIC handshake timed out")??;
    let (reader, writer, welcome) =
        match tokio::time::timeout(STEP_TIMEOUT, open_control(&conn, hello)).await {
            Ok(r) => r?,
            Err(_) => {
                let s = conn.stats();
                bail!(
                    "hello → welcome timed out (rtt {:?}, lost packets {}, sent {}, received {})",
                    s.path.rtt,
                    s.path.lost_packets,
                    s.path.sent_packets,
                    s.frame_rx.acks + s.frame_rx.stream
                )
            }
        };
    Ok(Session {
        conn,
        writer,
        reader,
        welcome,
    })
}

fn hello(role: Role, services: Vec<ServiceDef>) -> Hello {
    Hello {
        role,
        services,
        want: vec![],
        software: "ztna-bench relay-scale".into(),
    }
}

/// The simulated connector: accepts every incoming channel (its socket counts the channel data).
async fn run_connector(mut s: Session) {
    while let Ok(Some(msg)) = s.reader.next().await {
        if let ControlMessage::IncomingChannel { channel_id, .. } = msg {
            if s.writer
                .send(&ControlMessage::ChannelAccepted { channel_id })
                .await
                .is_err()
            {
                break;
            }
        }
    }
}

/// Opens a channel to `conn1` and returns its id.
async fn open_channel(s: &mut Session) -> Result<ChannelId> {
    s.writer
        .send(&ControlMessage::OpenChannel {
            request_id: 1,
            connector: "conn1".into(),
        })
        .await?;
    let fut = async {
        loop {
            match s.reader.next().await? {
                Some(ControlMessage::ChannelOpened { channel_id, .. }) => {
                    return ChannelId::new(channel_id).context("channel id out of range")
                }
                Some(ControlMessage::Error { code, message, .. }) => {
                    bail!("relay refused the channel: {code}: {message}")
                }
                Some(_) => {}
                None => bail!("the relay closed the control stream"),
            }
        }
    };
    tokio::time::timeout(STEP_TIMEOUT, fut)
        .await
        .context("opening the channel timed out")?
}

fn cpu(pid: u32) -> f64 {
    ztna_e2e::cpu_seconds(pid).unwrap_or(0.0)
}

fn rss(pid: u32) -> u64 {
    ztna_e2e::rss_kib(pid).unwrap_or(0)
}

async fn simulate(
    pki: &Pki,
    (relay, metrics): (SocketAddr, SocketAddr),
    relay_pid: u32,
    n: usize,
    plan: &ScalePlan,
    r: &mut ScaleRun,
) -> Result<()> {
    // All agents share one socket (channel data from it is bound to each agent's session, which
    // all come from that address); the connector has its own, which counts channel data.
    let (tap, _) = TapSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)), 0)
        .context("binding the simulation's socket")?;
    let endpoint = tap
        .endpoint(quinn::EndpointConfig::default())
        .context("binding the simulation's endpoint")?;
    let (conn_tap, _) = TapSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)), 0)
        .context("binding the connector's socket")?;
    let conn_endpoint = conn_tap
        .endpoint(quinn::EndpointConfig::default())
        .context("binding the connector's endpoint")?;
    let service = ServiceDef {
        name: "bench".into(),
        address: Ipv4Addr::new(10, 100, 0, 9),
        udp: vec![PortRange::single(9)],
        tcp: vec![],
        icmp: false,
        connector: String::new(),
    };
    // The relay may still be starting: retry the connector for a few seconds.
    let start = Instant::now();
    let connector = loop {
        match connect(
            &conn_endpoint,
            relay,
            &pki.connector,
            &pki.ca_pem,
            hello(Role::Connector, vec![service.clone()]),
        )
        .await
        {
            Ok(s) => break s,
            Err(e) if start.elapsed() > Duration::from_secs(10) => {
                return Err(e.context("the simulated connector could not connect"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    if connector.welcome.services.is_empty() {
        bail!(
            "the relay did not accept the connector's service: {:?}",
            connector.welcome.rejected
        );
    }
    tokio::spawn(run_connector(connector));
    let received = conn_tap.clone();
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.relay_rss_idle_kib = rss(relay_pid);

    // Setup: N handshakes, hello and welcome.
    let sem = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut set = JoinSet::new();
    let cpu0 = cpu(relay_pid);
    let rcvbuf0 = udp_rcvbuf_errors();
    let t0 = Instant::now();
    for i in 0..n {
        let sem = sem.clone();
        let endpoint = endpoint.clone();
        let creds = pki.agents[i].clone();
        let ca = pki.ca_pem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            connect(&endpoint, relay, &creds, &ca, hello(Role::Agent, vec![])).await
        });
    }
    let mut sessions = Vec::with_capacity(n);
    let mut first_error = None;
    while let Some(res) = set.join_next().await {
        match res.context("agent task panicked")? {
            Ok(s) => sessions.push(s),
            Err(e) => {
                r.failed += 1;
                *r.errors.entry(format!("connect: {e:#}")).or_default() += 1;
                first_error.get_or_insert(format!("{e:#}"));
            }
        }
    }
    let setup = t0.elapsed().as_secs_f64();
    r.relay_cpu_setup_percent = 100.0 * (cpu(relay_pid) - cpu0) / setup.max(1e-3);
    r.connected = sessions.len();
    r.setup_s = setup;
    r.setup_per_s = sessions.len() as f64 / setup.max(1e-3);
    r.relay_handshakes = Handshakes::read(metrics, rcvbuf0);
    if let Some(e) = &first_error {
        eprintln!(
            "==> {} of {n} agents failed to connect; first: {e}; errors: {:?}; the relay's counters: {:?}",
            r.failed, r.errors, r.relay_handshakes
        );
    }

    // Channels.
    let t1 = Instant::now();
    let mut set = JoinSet::new();
    for mut s in sessions {
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let ch = open_channel(&mut s).await;
            (s, ch)
        });
    }
    let mut agents = Vec::with_capacity(n);
    while let Some(res) = set.join_next().await {
        let (s, ch) = res.context("agent task panicked")?;
        match ch {
            Ok(ch) => agents.push((s, ch)),
            Err(e) => {
                r.failed += 1;
                *r.errors.entry(format!("channel: {e:#}")).or_default() += 1;
                first_error.get_or_insert(format!("{e:#}"));
            }
        }
    }
    r.channels_per_s = agents.len() as f64 / t1.elapsed().as_secs_f64().max(1e-3);
    if agents.is_empty() {
        bail!(
            "no agent opened a channel; first error: {}",
            first_error.unwrap_or_default()
        );
    }
    let payload = [0x5a; PAYLOAD];
    let frames: Vec<ChannelId> = agents.iter().map(|(_, ch)| *ch).collect();

    // Steady phase: one datagram per agent per second, spread over 100 ticks a second.
    let rx0 = received.received();
    let cpu0 = cpu(relay_pid);
    let t2 = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for k in 0..plan.steady_secs * 100 {
        tick.tick().await;
        for (i, ch) in frames.iter().enumerate() {
            if i as u64 % 100 == k % 100 && tap.send_channel(relay, *ch, &payload).is_ok() {
                sent += 1;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    r.relay_cpu_steady_percent =
        100.0 * (cpu(relay_pid) - cpu0) / t2.elapsed().as_secs_f64().max(1e-3);
    r.steady_sent = sent;
    r.steady_received = received.received() - rx0;
    r.relay_rss_loaded_kib = rss(relay_pid);
    r.rss_per_session_kib =
        (r.relay_rss_loaded_kib as f64 - r.relay_rss_idle_kib as f64) / agents.len() as f64;

    // Forwarding phases: a few agents send at a controlled rate, then as fast as their socket
    // takes datagrams.
    let blasters: Vec<ChannelId> = frames.iter().take(plan.blast_agents).copied().collect();
    r.blast_agents = blasters.len();
    let window = Duration::from_secs(plan.blast_secs);
    let mut phases = Vec::new();
    let gso_rate = plan.rate_pps * 4;
    for (rate, batch) in [
        (Some(plan.rate_pps), 1),
        (Some(gso_rate), GSO_BATCH),
        (None, 1),
        (None, GSO_BATCH),
    ] {
        let sent_total = Arc::new(AtomicU64::new(0));
        // 500 ms of warm-up, the measured window, and 200 ms for the last packets to land.
        let start = Instant::now() + Duration::from_millis(500);
        let deadline = start + window;
        let mut set = JoinSet::new();
        for ch in &blasters {
            let (ch, tap) = (*ch, tap.clone());
            let sent_total = sent_total.clone();
            let per_agent = rate.map(|r| r.div_ceil(blasters.len() as u64).max(1));
            set.spawn(async move {
                let began = Instant::now();
                let mut tries = 0u64;
                let mut counted = 0u64;
                while Instant::now() < deadline {
                    if let Some(pps) = per_agent {
                        let due = began.elapsed().as_micros() as u64 * pps / 1_000_000;
                        if tries * batch as u64 >= due {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            continue;
                        }
                    }
                    let ok = if batch > 1 {
                        tap.send_channel_batch(relay, ch, &payload, batch).is_ok()
                    } else {
                        tap.send_channel(relay, ch, &payload).is_ok()
                    };
                    tries += 1;
                    if ok && Instant::now() >= start {
                        counted += batch as u64;
                    }
                    if rate.is_none() && tries.is_multiple_of(64) {
                        // Raw UDP never waits: let the connection drivers and the other
                        // senders run.
                        tokio::task::yield_now().await;
                    }
                }
                sent_total.fetch_add(counted, Ordering::Relaxed);
            });
        }
        tokio::time::sleep_until(start.into()).await;
        let m0 = marks(relay_pid, metrics, &received);
        tokio::time::sleep_until(deadline.into()).await;
        while set.join_next().await.is_some() {}
        tokio::time::sleep(Duration::from_millis(200)).await;
        let m1 = marks(relay_pid, metrics, &received);
        phases.push(m0.phase(&m1, sent_total.load(Ordering::Relaxed)));
    }
    r.saturated_gso = phases.pop();
    let saturated = phases.pop();
    r.controlled_gso = phases.pop();
    r.controlled = phases.pop();
    if let Some(p) = &saturated {
        r.relay_cpu_forward_percent = p.relay_cpu_percent;
        r.relay_us_per_packet = p.relay_us_per_forwarded;
        r.blast_sent = p.sent;
        r.blast_received = p.received;
        r.forward_pps = p.forwarded_pps();
        r.forward_mbps = r.forward_pps * (PAYLOAD * 8) as f64 / 1e6;
    }
    r.saturated = saturated;
    r.relay_peak_rss_kib = ztna_e2e::peak_rss_kib(relay_pid).unwrap_or(0);

    for (s, _) in &agents {
        s.conn.close(0u32.into(), b"bench done");
    }
    endpoint.close(0u32.into(), b"bench done");
    conn_endpoint.close(0u32.into(), b"bench done");
    Ok(())
}

impl RelayScale {
    /// The markdown section of `latest.md`.
    pub(crate) fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "## Relay scale\n\nOne `ztna-relay` on loopback; one simulated connector and N simulated agents in \
             one process (real quinn connections, real certificates, the real control protocol; channel data as \
             raw UDP, as agents send it). Steady phase: {} s, one {PAYLOAD}-byte datagram per agent per second plus \
             the agents' quinn keepalives. Forwarding phases: {} agents send {PAYLOAD}-byte datagrams for {} s, \
             at {} datagrams/s together (controlled) and four times that in GSO sends of 8 datagrams (as an agent's \
             socket sends bulk traffic; the relay reads them with GRO and forwards each batch in one GSO send), then \
             both as fast as the agents' socket takes them (saturation); \
             forwarded and dropped are the relay's own counters, receive-buffer errors the kernel's \
             (`RcvbufErrors`, the relay's and the connector's sockets), and CPU per datagram is the relay's CPU \
             time over what it forwarded. The simulator shares the two cores with the relay.\n",
            self.plan.steady_secs, self.plan.blast_agents, self.plan.blast_secs, self.plan.rate_pps
        );
        let _ = writeln!(
            s,
            "| agents | connected | setup (conn/s) | channels/s | relay CPU, setup (%) | relay RSS idle → loaded (MiB) | per session (KiB) | relay CPU, steady (%) | steady recv/sent | forwarded (pkt/s) | forwarded (Mbit/s) | relay CPU, forwarding (%) | relay CPU per forwarded packet (µs) |"
        );
        let _ = writeln!(
            s,
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for r in &self.runs {
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.1} → {:.1} | {:.1} | {:.1} | {}/{} | {:.0} | {:.0} | {:.0} | {:.1} |{}",
                r.agents,
                r.connected,
                r.setup_per_s,
                r.channels_per_s,
                r.relay_cpu_setup_percent,
                r.relay_rss_idle_kib as f64 / 1024.0,
                r.relay_rss_loaded_kib as f64 / 1024.0,
                r.rss_per_session_kib,
                r.relay_cpu_steady_percent,
                r.steady_received,
                r.steady_sent,
                r.forward_pps,
                r.forward_mbps,
                r.relay_cpu_forward_percent,
                r.relay_us_per_packet,
                r.error
                    .as_deref()
                    .map(|e| format!(" error: {}", e.lines().next().unwrap_or_default()))
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(
            s,
            "\n| agents | phase | sent (pkt/s) | relay forwarded (pkt/s) | relay dropped | kernel receive-buffer errors | connector received | relay CPU (%) | relay CPU per forwarded datagram (µs) |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|"
        );
        for r in &self.runs {
            for (name, p) in [
                ("controlled", &r.controlled),
                ("controlled ×4, GSO batches of 8", &r.controlled_gso),
                ("saturation", &r.saturated),
                ("saturation, GSO batches of 8", &r.saturated_gso),
            ] {
                let Some(p) = p else {
                    let _ = writeln!(s, "| {} | {name} | missing | | | | | | |", r.agents);
                    continue;
                };
                let us = if p.relay_us_per_forwarded.is_finite() {
                    format!("{:.2}", p.relay_us_per_forwarded)
                } else {
                    "missing".into()
                };
                let _ = writeln!(
                    s,
                    "| {} | {name} | {:.0} | {:.0} | {} | {} | {} | {:.0} | {us} |",
                    r.agents,
                    p.sent as f64 / p.secs.max(1e-3),
                    p.forwarded_pps(),
                    p.relay_dropped,
                    p.udp_rcvbuf_errors,
                    p.received,
                    p.relay_cpu_percent,
                );
            }
        }
        s
    }
}
