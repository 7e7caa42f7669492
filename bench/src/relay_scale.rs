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
pub(crate) const CONNECT_CONCURRENCY: usize = 100;
/// Payload of every datagram (an inner packet's worth).
pub(crate) const PAYLOAD: usize = 1200;
/// Longest a single handshake, hello/welcome or channel opening may take.
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(20);

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

/// Where the relay runs and what the simulator binds.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Placement {
    /// The relay's network namespace; `None`: this one, on loopback, with free ports.
    pub(crate) relay_netns: Option<String>,
    /// The relay's address (its UDP port and its metrics endpoint).
    pub(crate) relay_ip: Ipv4Addr,
    /// The simulator's address (both of its sockets).
    pub(crate) sim_ip: Ipv4Addr,
    /// The relay's `xdp` setting; `None`: its default (off).
    pub(crate) xdp: Option<String>,
    /// A loaded copy of the relay's XDP program that is not the relay's (a pass-through one on
    /// the simulator's veth): left out of the program's run-time statistics.
    pub(crate) not_the_relays_program: Option<u32>,
}

impl Placement {
    /// Relay and simulator on this namespace's loopback.
    pub(crate) fn loopback() -> Self {
        Self {
            relay_netns: None,
            relay_ip: Ipv4Addr::LOCALHOST,
            sim_ip: Ipv4Addr::LOCALHOST,
            xdp: None,
            not_the_relays_program: None,
        }
    }
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
    /// The latency probe for 1 s before the forwarding phases (nothing else sending).
    pub(crate) probe_quiet: Option<Probe>,
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
    fn read(metrics: SocketAddr, relay_pid: u32, rcvbuf_before: u64) -> Self {
        let m = scrape(metrics).unwrap_or_default();
        Self::from_metrics(&m, rcvbuf_errors(relay_pid).saturating_sub(rcvbuf_before))
    }

    /// The counters in the relay's metrics `m`, with `udp_rcvbuf_errors` as given.
    pub(crate) fn from_metrics(m: &ztna_e2e::Metrics, udp_rcvbuf_errors: u64) -> Self {
        let v = |name: &str| m.value(&format!("ztna_relay_{name}_total")) as u64;
        Self {
            sessions: v("sessions"),
            retried: v("handshakes_retried"),
            refused: v("handshakes_refused"),
            failed: v("handshakes_failed"),
            timed_out: v("handshakes_timed_out"),
            rejected: v("sessions_rejected"),
            active: m.value("ztna_relay_handshakes_active") as u64,
            udp_rcvbuf_errors,
        }
    }
}

impl ScaleRun {
    /// The forwarding phases in the order they ran, with their names in the tables.
    pub(crate) fn named_phases(&self) -> [(&'static str, &Option<Phase>); 4] {
        [
            ("controlled", &self.controlled),
            ("controlled ×4, GSO batches of 8", &self.controlled_gso),
            ("saturation", &self.saturated),
            ("saturation, GSO batches of 8", &self.saturated_gso),
        ]
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
    /// Datagrams the relay's XDP program forwarded (part of `relay_forwarded`; in generic mode
    /// a GSO batch from a sender on this machine reaches it, and counts, as one).
    pub(crate) xdp_forwarded: u64,
    /// Softirq time of every CPU, % of one core: where XDP (and the kernel's packet receive
    /// and delivery on every hop) runs.
    pub(crate) softirq_percent: f64,
    /// The relay's XDP program's own run time per packet it saw, ns (the kernel's BPF run-time
    /// statistics, on while the bench holds them on); NaN without runs or statistics.
    pub(crate) xdp_ns_per_packet: f64,
    /// The latency probe on a channel of its own (not a sender's): probes sent, answered, and
    /// the median and 90th percentile round trip of those answered, ms (NaN without answers).
    pub(crate) probe: Probe,
}

/// Round trips of the latency probe in one phase.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Probe {
    pub(crate) sent: u64,
    pub(crate) answered: u64,
    pub(crate) median_ms: f64,
    pub(crate) p90_ms: f64,
}

impl Probe {
    /// "median / p90, answered/sent" for a table cell.
    pub(crate) fn cell(&self) -> String {
        if self.sent == 0 {
            return "—".into();
        }
        if self.answered == 0 {
            return format!("none answered, 0/{}", self.sent);
        }
        format!(
            "{:.2} / {:.2}, {}/{}",
            self.median_ms, self.p90_ms, self.answered, self.sent
        )
    }
}

/// First bytes of a latency probe (the connector echoes these, and only these).
const PROBE_MAGIC: &[u8] = b"ztna-bench-probe";
/// One probe every this often.
const PROBE_INTERVAL: Duration = Duration::from_millis(10);

/// Probes sent (send time, round trip once answered), in order.
type ProbeLog = Arc<std::sync::Mutex<Vec<(Instant, Option<Duration>)>>>;

fn is_probe(p: &[u8]) -> bool {
    p.starts_with(PROBE_MAGIC)
}

/// The probes sent in `[from, to)`, summarised.
fn probe_summary(log: &ProbeLog, from: Instant, to: Instant) -> Probe {
    let log = log.lock().unwrap_or_else(|p| p.into_inner());
    let mut rtts: Vec<f64> = Vec::new();
    let mut sent = 0u64;
    for (_, rtt) in log.iter().filter(|(at, _)| *at >= from && *at < to) {
        sent += 1;
        if let Some(r) = rtt {
            rtts.push(r.as_secs_f64() * 1e3);
        }
    }
    rtts.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        if rtts.is_empty() {
            f64::NAN
        } else {
            rtts[((rtts.len() - 1) as f64 * q).round() as usize]
        }
    };
    Probe {
        sent,
        answered: rtts.len() as u64,
        median_ms: pick(0.5),
        p90_ms: pick(0.9),
    }
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
    xdp_forwarded: u64,
    dropped: u64,
    rcvbuf: u64,
    received: u64,
    softirq: f64,
    /// The relay's XDP program: run time (ns) and runs so far.
    xdp_run: (u64, u64),
}

/// Run time (ns) and runs of every loaded program named like the relay's XDP program, except
/// `not`.
fn relay_program_stats(not: Option<u32>) -> (u64, u64) {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some("ztna_relay_xdp") && Some(p.id()) != not)
        .fold((0, 0), |(t, n), p| {
            (t + p.run_time().as_nanos() as u64, n + p.run_count())
        })
}

fn marks(relay_pid: u32, metrics: SocketAddr, connector: &TapSocket, not: Option<u32>) -> Marks {
    let m = scrape(metrics).unwrap_or_default();
    let rcvbuf = rcvbuf_errors(relay_pid);
    Marks {
        at: Instant::now(),
        cpu: cpu(relay_pid),
        forwarded: m.value("ztna_relay_datagrams_forwarded_total") as u64,
        xdp_forwarded: m.get("ztna_relay_xdp_forwarded_total").unwrap_or(0.0) as u64,
        dropped: m.value("ztna_relay_datagrams_dropped_total") as u64,
        rcvbuf,
        received: connector.received(),
        softirq: softirq_seconds(),
        xdp_run: relay_program_stats(not),
    }
}

/// UDP receive-buffer errors in the simulator's namespace (this thread's) and, when it is
/// elsewhere, the relay's.
pub(crate) fn rcvbuf_errors(relay_pid: u32) -> u64 {
    let mut n = udp_rcvbuf_errors("/proc/thread-self/net/snmp");
    let relay_snmp = format!("/proc/{relay_pid}/net/snmp");
    if !same_netns(&relay_snmp) {
        n += udp_rcvbuf_errors(&relay_snmp);
    }
    n
}

/// Whether `/proc/PID/net/...` is this thread's network namespace.
fn same_netns(proc_net_file: &str) -> bool {
    let ns_of = |p: &str| std::fs::read_link(p).ok();
    let pid_dir = proc_net_file.rsplit_once("/net/").map_or("", |(d, _)| d);
    ns_of(&format!("{pid_dir}/ns/net")) == ns_of("/proc/thread-self/ns/net")
}

/// Softirq time of every CPU so far, seconds (`/proc/stat`, USER_HZ = 100).
fn softirq_seconds() -> f64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("cpu "))
        .and_then(|l| l.split_whitespace().nth(7))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |ticks| ticks / 100.0)
}

impl Marks {
    fn phase(&self, end: &Marks, sent: u64, probes: &ProbeLog) -> Phase {
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
            xdp_forwarded: end.xdp_forwarded.saturating_sub(self.xdp_forwarded),
            softirq_percent: 100.0 * (end.softirq - self.softirq) / secs.max(1e-3),
            // Probes sent in the last 200 ms had no fair chance to come back.
            probe: probe_summary(
                probes,
                self.at,
                end.at
                    .checked_sub(Duration::from_millis(200))
                    .unwrap_or(end.at),
            ),
            xdp_ns_per_packet: {
                let runs = end.xdp_run.1.saturating_sub(self.xdp_run.1);
                if runs > 0 {
                    end.xdp_run.0.saturating_sub(self.xdp_run.0) as f64 / runs as f64
                } else {
                    f64::NAN
                }
            },
        }
    }
}

/// The relay's metrics, fetched with a plain HTTP/1.0 GET on loopback.
pub(crate) fn scrape(addr: SocketAddr) -> Result<ztna_e2e::Metrics> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: relay\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok(ztna_e2e::Metrics::parse(body))
}

/// `RcvbufErrors` of UDP in a `/proc/.../net/snmp` file's namespace (0 if it can't be read).
fn udp_rcvbuf_errors(snmp: &str) -> u64 {
    let text = std::fs::read_to_string(snmp).unwrap_or_default();
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
pub(crate) struct Pki {
    pub(crate) ca_pem: String,
    pub(crate) connector: (String, String),
    /// `agent0`, `agent1`, ... in group `eng`.
    pub(crate) agents: Vec<(String, String)>,
}

impl Pki {
    /// A CA, the relay's certificate (for 127.0.0.1, name `relay`; every relay of a fleet
    /// shares it, as in `deploy/k8s`), the connector's (`conn1`) and `agents` agents'. Writes
    /// the relay's files to `dir` and returns them as `[CA, certificate, key]`.
    pub(crate) fn mint(agents: usize, dir: &Path) -> Result<(Self, [std::path::PathBuf; 3])> {
        let ca = CertificateAuthority::generate("ztna bench").context("minting the CA")?;
        let relay = ca.issue(Role::Relay, "relay", &[], &[Ipv4Addr::LOCALHOST.into()])?;
        let connector = ca.issue(Role::Connector, "conn1", &[], &[])?;
        let eng = ["eng".to_owned()];
        let agents = (0..agents)
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
        let files = [
            write("ca.pem", &ca.cert_pem())?,
            write("relay.pem", &relay.cert_pem)?,
            write("relay.key", &relay.key_pem)?,
        ];
        let pki = Self {
            ca_pem: ca.cert_pem(),
            connector: (connector.cert_pem, connector.key_pem),
            agents,
        };
        Ok((pki, files))
    }
}

/// The service the simulated connector offers (the relay's policy names it `bench`).
pub(crate) fn bench_service() -> ServiceDef {
    ServiceDef {
        name: "bench".into(),
        address: Ipv4Addr::new(10, 100, 0, 9),
        address6: None,
        udp: vec![PortRange::single(9)],
        tcp: vec![],
        icmp: false,
        connector: String::new(),
        names: None,
    }
}

/// Runs every N of `plan` against a fresh relay each, on loopback; `dir` holds PKI, configs
/// and logs.
pub(crate) fn run(plan: &ScalePlan, dir: &Path) -> Result<RelayScale> {
    run_in(plan, dir, &Placement::loopback())
}

/// [`run`] with the relay and the simulator where `at` says. The calling thread must be in
/// the simulator's network namespace.
pub(crate) fn run_in(plan: &ScalePlan, dir: &Path, at: &Placement) -> Result<RelayScale> {
    let max = plan.agents.iter().copied().max().unwrap_or(0);
    eprintln!("==> relay scale: minting {max} agent certificates");
    let (pki, relay_files) = Pki::mint(max, dir)?;
    let mut runs = Vec::new();
    for &n in &plan.agents {
        eprintln!("==> relay scale: {n} agents");
        let (port, metrics_port) = if at.relay_netns.is_some() {
            // A namespace of the relay's own: nothing else binds there.
            (4433, 9433)
        } else {
            (free_udp_port()?, free_tcp_port()?)
        };
        let ip = at.relay_ip;
        let cfg = relay_config(
            SocketAddr::from((ip, port)),
            SocketAddr::from((ip, metrics_port)),
            relay_files.clone(),
            at.xdp.clone(),
        );
        let cfg_path = dir.join(format!("relay-{n}.toml"));
        std::fs::write(&cfg_path, cfg.to_toml())
            .with_context(|| format!("writing {}", cfg_path.display()))?;
        let log = dir.join(format!("relay-{n}.log"));
        let mut r = ScaleRun {
            agents: n,
            ..ScaleRun::default()
        };
        let relay = RelayProcess::start(&cfg_path, &[], &log, at.relay_netns.as_deref())?;
        let addr = SocketAddr::from((ip, port));
        let result = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the tokio runtime")?
            .block_on(simulate(
                &pki,
                (addr, SocketAddr::from((ip, metrics_port))),
                (at.sim_ip, at.not_the_relays_program),
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

/// The relay's configuration in the bench: its socket and metrics endpoint, its PKI files
/// (CA, certificate, key), one service `bench` that group `eng` may reach through connector
/// `conn1`, the tunnel pool of the deployment examples.
pub(crate) fn relay_config(
    bind: SocketAddr,
    metrics: SocketAddr,
    [ca, cert, key]: [std::path::PathBuf; 3],
    xdp: Option<String>,
) -> RelayConfig {
    RelayConfig {
        bind: bind.to_string(),
        ca,
        cert,
        key,
        tunnel_pool: "100.64.0.0/10".into(),
        metrics: Some(metrics.to_string()),
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
        xdp,
        extra: String::new(),
    }
}

/// A free TCP port on loopback (bound and released; the relay binds it right after).
pub(crate) fn free_tcp_port() -> Result<u16> {
    let s = std::net::TcpListener::bind("127.0.0.1:0").context("binding a probe socket")?;
    Ok(s.local_addr()?.port())
}

/// A free UDP port on loopback (bound and released; the relay binds it right after).
pub(crate) fn free_udp_port() -> Result<u16> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").context("binding a probe socket")?;
    Ok(s.local_addr()?.port())
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The relay child process, killed and reaped on drop.
pub(crate) struct RelayProcess {
    child: Child,
    pub(crate) pid: u32,
}

impl RelayProcess {
    /// Starts the relay with config `cfg` and the command-line flags `flags` (`--bind`,
    /// `--metrics`: several relays can share one config file), logging to `log`, in network
    /// namespace `netns` (`ip netns exec`, which execs the relay: the child's PID is the
    /// relay's).
    pub(crate) fn start(
        cfg: &Path,
        flags: &[String],
        log: &Path,
        netns: Option<&str>,
    ) -> Result<Self> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let relay = ztna_e2e::bin("ztna-relay")?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(relay);
                c
            }
            None => Command::new(relay),
        };
        cmd.arg("--config").arg(cfg).args(flags);
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
pub(crate) struct Session {
    pub(crate) conn: quinn::Connection,
    writer: ControlWriter,
    reader: ControlReader,
    pub(crate) welcome: Welcome,
}

pub(crate) async fn connect(
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

pub(crate) fn hello(role: Role, services: Vec<ServiceDef>) -> Hello {
    Hello {
        role,
        services,
        want: vec![],
        software: "ztna-bench relay-scale".into(),
        tunnel_ip: None,
    }
}

/// The simulated connector: accepts every incoming channel (its socket counts the channel data).
pub(crate) async fn run_connector(mut s: Session) {
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
pub(crate) async fn open_channel(s: &mut Session) -> Result<ChannelId> {
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
    (sim_ip, not_the_relays): (Ipv4Addr, Option<u32>),
    relay_pid: u32,
    n: usize,
    plan: &ScalePlan,
    r: &mut ScaleRun,
) -> Result<()> {
    // All agents share one socket (channel data from it is bound to each agent's session, which
    // all come from that address); the connector has its own, which counts channel data.
    let (tap, probe_rx) = TapSocket::bind_filtered(SocketAddr::from((sim_ip, 0)), 256, is_probe)
        .context("binding the simulation's socket")?;
    let endpoint = tap
        .endpoint(quinn::EndpointConfig::default())
        .context("binding the simulation's endpoint")?;
    let (conn_tap, echo_rx) =
        TapSocket::bind_filtered(SocketAddr::from((sim_ip, 0)), 256, is_probe)
            .context("binding the connector's socket")?;
    let conn_endpoint = conn_tap
        .endpoint(quinn::EndpointConfig::default())
        .context("binding the connector's endpoint")?;
    let service = bench_service();
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
    // The connector echoes latency probes (only those) on the channel they came on.
    if let Some(mut rx) = echo_rx {
        let conn_tap = conn_tap.clone();
        tokio::spawn(async move {
            while let Some((ch, payload)) = rx.recv().await {
                let _ = conn_tap.send_channel(relay, ch, &payload);
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.relay_rss_idle_kib = rss(relay_pid);

    // Setup: N handshakes, hello and welcome.
    let sem = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut set = JoinSet::new();
    let cpu0 = cpu(relay_pid);
    let rcvbuf0 = rcvbuf_errors(relay_pid);
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
    r.relay_handshakes = Handshakes::read(metrics, relay_pid, rcvbuf0);
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
    // The latency probe: an agent that is not a sender pings the connector every 10 ms through
    // the relay while the forwarding phases run.
    let probes: ProbeLog = Arc::default();
    let _probe = match (frames.get(plan.blast_agents).copied(), probe_rx) {
        (Some(ch), Some(mut rx)) => {
            let log = probes.clone();
            let answers = probes.clone();
            let tap = tap.clone();
            let t0 = Instant::now();
            let receiver = tokio::spawn(async move {
                while let Some((_, p)) = rx.recv().await {
                    let Some(seq) = p
                        .get(PROBE_MAGIC.len()..PROBE_MAGIC.len() + 8)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_be_bytes)
                    else {
                        continue;
                    };
                    let mut log = answers.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(entry) = log.get_mut(seq as usize) {
                        entry.1.get_or_insert(entry.0.elapsed());
                    }
                }
            });
            let sender = tokio::spawn(async move {
                let mut tick = tokio::time::interval(PROBE_INTERVAL);
                for seq in 0u64.. {
                    tick.tick().await;
                    let mut p = PROBE_MAGIC.to_vec();
                    p.extend_from_slice(&seq.to_be_bytes());
                    p.resize(100, 0);
                    log.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((Instant::now(), None));
                    let _ = tap.send_channel(relay, ch, &p);
                    if t0.elapsed() > Duration::from_secs(600) {
                        break;
                    }
                }
            });
            Some((AbortOnDrop(sender), AbortOnDrop(receiver)))
        }
        _ => None,
    };
    if _probe.is_some() {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let from = Instant::now();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        r.probe_quiet = Some(probe_summary(&probes, from, from + Duration::from_secs(1)));
    }
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
        let m0 = marks(relay_pid, metrics, &received, not_the_relays);
        tokio::time::sleep_until(deadline.into()).await;
        while set.join_next().await.is_some() {}
        tokio::time::sleep(Duration::from_millis(200)).await;
        let m1 = marks(relay_pid, metrics, &received, not_the_relays);
        phases.push(m0.phase(&m1, sent_total.load(Ordering::Relaxed), &probes));
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
            "\n| agents | phase | sent (pkt/s) | relay forwarded (pkt/s) | relay dropped | kernel receive-buffer errors | connector received | relay CPU (%) | relay CPU per forwarded datagram (µs) | probe RTT median / p90 (ms), answered |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        for r in &self.runs {
            for (name, p) in r.named_phases() {
                let Some(p) = p else {
                    let _ = writeln!(s, "| {} | {name} | missing | | | | | | | |", r.agents);
                    continue;
                };
                let us = if p.relay_us_per_forwarded.is_finite() {
                    format!("{:.2}", p.relay_us_per_forwarded)
                } else {
                    "missing".into()
                };
                let _ = writeln!(
                    s,
                    "| {} | {name} | {:.0} | {:.0} | {} | {} | {} | {:.0} | {us} | {} |",
                    r.agents,
                    p.sent as f64 / p.secs.max(1e-3),
                    p.forwarded_pps(),
                    p.relay_dropped,
                    p.udp_rcvbuf_errors,
                    p.received,
                    p.relay_cpu_percent,
                    p.probe.cell(),
                );
            }
        }
        s
    }
}
