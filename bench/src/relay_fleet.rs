//! Relay fleet: three real `ztna-relay` processes on loopback, each on its own port and
//! metrics endpoint but from one config file (the same policy and the same certificate, as the
//! relays of `deploy/k8s` share theirs), one simulated connector with a session with every
//! relay (as `ztna-connector` keeps one), and N simulated agents, each of which keeps a session
//! with every relay (as `ztna-agent` keeps every relay of its list warm) and opens its channel
//! through one of them.
//!
//! The simulated clients are those of the relay-scale run ([`relay_scale`]): real quinn
//! connections, real certificates, the real control protocol (hello → welcome, open-channel →
//! channel-opened through the connector), channel data as raw UDP. All agents share one socket
//! and the connector has its own, as in relay scale.
//!
//! Per N and per way of choosing the channel's relay ([`Spread`]): the connector connects to the
//! three relays; the agents connect (at most [`CONNECT_CONCURRENCY`] agents at a time, each with
//! its three handshakes at once); each agent opens one channel through the relay its spread
//! picks; then every agent sends one 1200-byte datagram a second on its channel for the steady
//! phase. Measured per relay: its agent sessions and channels (the simulator's count and the
//! relay's own gauges), its RSS with only the connector and then with the agents (KiB per
//! session), its CPU, what it forwarded in the steady phase; and for the fleet: the time and
//! rate of the whole setup, how long each agent waited for its first and for all three
//! sessions, and whether the relays gave an agent the same tunnel IP.
//!
//! A measurement that failed is `None` (JSON `null`, "missing" in the tables), never 0.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use ztna_core::agent_machine::MachineConfig;
use ztna_core::tap::TapSocket;
use ztna_proto::control::Role;
use ztna_proto::ChannelId;

use crate::measure::{wait_quiet, Load};
use crate::relay_scale::{
    self, bench_service, connect, hello, open_channel, relay_config, run_connector, scrape,
    Handshakes, Pki, RelayProcess, Session, CONNECT_CONCURRENCY, PAYLOAD,
};

/// Relays in the fleet.
pub(crate) const RELAYS: usize = 3;

/// How each agent picks the relay its channel goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Spread {
    /// As `ztna-agent` does ([`ztna_core::agent_machine`]): the first relay whose session
    /// comes up, unless a later one is clearly nearer (its RTT below `switch_ratio` of the
    /// first's and `switch_margin` lower), with each session's RTT as quinn measured it when
    /// its welcome came. On loopback the RTTs are all alike, so this is the first relay to
    /// answer.
    Nearest,
    /// Agent i through relay i mod 3 (the next live one if that one's session failed).
    RoundRobin,
}

impl Spread {
    fn name(self) -> &'static str {
        match self {
            Spread::Nearest => "nearest",
            Spread::RoundRobin => "round-robin",
        }
    }
}

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FleetPlan {
    /// Numbers of agents, one fleet run each (per spread).
    pub(crate) agents: Vec<usize>,
    /// Ways to pick the channel's relay, one fleet run each (per number of agents).
    pub(crate) spread: Vec<Spread>,
    /// Seconds of the steady phase (one datagram per agent per second).
    pub(crate) steady_secs: u64,
    /// Longest wait for a quiet machine before each run, seconds.
    pub(crate) quiet_max_wait_s: u64,
}

/// The results of every run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RelayFleet {
    pub(crate) plan: FleetPlan,
    pub(crate) relays: usize,
    pub(crate) runs: Vec<FleetRun>,
}

/// One fleet run: N agents, one spread.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FleetRun {
    pub(crate) agents: usize,
    pub(crate) spread: Spread,
    pub(crate) error: Option<String>,
    /// The machine's load before the run (after waiting for it to be quiet).
    pub(crate) load: Option<Load>,
    /// Agents with a session with every relay.
    pub(crate) agents_all_relays: usize,
    /// Agents with a session with some relays but not all.
    pub(crate) agents_some_relays: usize,
    /// Agents with no session.
    pub(crate) agents_no_relay: usize,
    /// Agent sessions (welcomes) over all relays.
    pub(crate) sessions: usize,
    /// Failed handshakes, hellos and channels: error message → how many.
    pub(crate) errors: BTreeMap<String, usize>,
    /// Seconds from the first agent's first handshake until every agent's handshakes ended
    /// (as in relay scale: a handshake that times out counts until it does).
    pub(crate) setup_s: Option<f64>,
    /// Agent sessions per second over `setup_s`.
    pub(crate) sessions_per_s: Option<f64>,
    /// Agents with every session up, per second over `setup_s`.
    pub(crate) agents_per_s: Option<f64>,
    /// Per agent, from its first handshake: until its first welcome (when a real agent opens
    /// its channels) and until its last one, ms.
    pub(crate) first_session_ms: Option<Quantiles>,
    pub(crate) all_sessions_ms: Option<Quantiles>,
    /// Channels opened (one per agent with a session).
    pub(crate) channels: usize,
    /// Channels per second (open-channel → channel-opened through the connector).
    pub(crate) channels_per_s: Option<f64>,
    /// Agents whose channel went through another relay than the first to answer (`nearest`:
    /// those that found a clearly nearer one).
    pub(crate) not_first_relay: usize,
    /// Agents whose relays gave them different tunnel IPs (with two sessions or more).
    pub(crate) tunnel_ip_disagreements: usize,
    /// The first few of them: `agentN: ip (relay k), ...`.
    pub(crate) tunnel_ip_examples: Vec<String>,
    /// Datagrams the agents sent / the connector received in the steady phase.
    pub(crate) steady_sent: u64,
    pub(crate) steady_received: Option<u64>,
    /// Kernel UDP receive-buffer errors on loopback over the setup (all relays and the
    /// simulator share the namespace).
    pub(crate) udp_rcvbuf_errors: Option<u64>,
    pub(crate) relays: Vec<FleetRelay>,
}

impl FleetRun {
    fn new(agents: usize, spread: Spread) -> Self {
        Self {
            agents,
            spread,
            error: None,
            load: None,
            agents_all_relays: 0,
            agents_some_relays: 0,
            agents_no_relay: 0,
            sessions: 0,
            errors: BTreeMap::new(),
            setup_s: None,
            sessions_per_s: None,
            agents_per_s: None,
            first_session_ms: None,
            all_sessions_ms: None,
            channels: 0,
            channels_per_s: None,
            not_first_relay: 0,
            tunnel_ip_disagreements: 0,
            tunnel_ip_examples: Vec::new(),
            steady_sent: 0,
            steady_received: None,
            udp_rcvbuf_errors: None,
            relays: Vec::new(),
        }
    }
}

/// One relay of a fleet run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FleetRelay {
    /// Its UDP address.
    pub(crate) addr: String,
    /// Agent sessions it welcomed (the simulator's count).
    pub(crate) sessions: usize,
    /// Channels opened through it (the simulator's count).
    pub(crate) channels: usize,
    /// Its own gauges after the channels opened: `sessions_active` (the connector's session
    /// included) and `channels_active`.
    pub(crate) relay_sessions_active: Option<u64>,
    pub(crate) relay_channels_active: Option<u64>,
    /// Its handshake counters after the setup (`udp_rcvbuf_errors` is not its own: see
    /// [`FleetRun::udp_rcvbuf_errors`]).
    pub(crate) handshakes: Option<Handshakes>,
    /// RSS with only the connector's session, KiB.
    pub(crate) rss_idle_kib: Option<u64>,
    /// RSS with every agent session and channel, after the steady phase, KiB.
    pub(crate) rss_loaded_kib: Option<u64>,
    /// (loaded − idle) / `sessions`, KiB.
    pub(crate) kib_per_session: Option<f64>,
    /// Peak RSS (VmHWM) at the end, KiB.
    pub(crate) peak_rss_kib: Option<u64>,
    /// CPU while the agents connected, and in the steady phase, % of one core.
    pub(crate) cpu_setup_percent: Option<f64>,
    pub(crate) cpu_steady_percent: Option<f64>,
    /// Datagrams it forwarded in the steady phase (its `datagrams_forwarded` counter).
    pub(crate) steady_forwarded: Option<u64>,
    /// Datagrams the agents sent to it in the steady phase.
    pub(crate) steady_sent: u64,
}

/// Median, 90th percentile and maximum of a sample (nearest rank).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Quantiles {
    pub(crate) n: usize,
    pub(crate) median: f64,
    pub(crate) p90: f64,
    pub(crate) max: f64,
}

impl Quantiles {
    fn of(mut v: Vec<f64>) -> Option<Self> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let pick = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Some(Self {
            n: v.len(),
            median: pick(0.5),
            p90: pick(0.9),
            max: v[v.len() - 1],
        })
    }

    fn cell(q: &Option<Self>) -> String {
        match q {
            Some(q) => format!("{:.0} / {:.0}", q.median, q.p90),
            None => "missing".into(),
        }
    }
}

/// One relay process and where it listens.
struct Relay {
    addr: SocketAddr,
    metrics: SocketAddr,
    process: RelayProcess,
    log: std::path::PathBuf,
}

/// Runs every N × spread of `plan` against a fresh fleet each, on loopback; `dir` holds PKI,
/// the config file and the relays' logs.
pub(crate) fn run(plan: &FleetPlan, dir: &Path) -> Result<RelayFleet> {
    let max = plan.agents.iter().copied().max().unwrap_or(0);
    eprintln!("==> relay fleet: minting {max} agent certificates");
    let (pki, relay_files) = Pki::mint(max, dir)?;
    let mut runs = Vec::new();
    for &n in &plan.agents {
        for &spread in &plan.spread {
            let name = format!("fleet-{n}-{}", spread.name());
            eprintln!(
                "==> relay fleet: {n} agents, {RELAYS} relays, channels {}",
                spread.name()
            );
            let mut r = FleetRun::new(n, spread);
            r.load = wait_quiet(0.25, Duration::from_secs(plan.quiet_max_wait_s)).ok();
            let result = start_fleet(dir, &name, &relay_files).and_then(|relays| {
                let result = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .context("starting the tokio runtime")?
                    .block_on(simulate(&pki, &relays, n, plan.steady_secs, spread, &mut r));
                if result.is_err() || r.agents_all_relays < n || r.channels < n {
                    for (k, relay) in relays.iter().enumerate() {
                        let tail = std::fs::read_to_string(&relay.log).unwrap_or_default();
                        eprintln!(
                            "==> relay {k}'s log ({}):\n{}",
                            relay.addr,
                            ztna_e2e::topology::tail(&tail, 20)
                        );
                    }
                }
                // The relays are killed and reaped here.
                drop(relays);
                result
            });
            if let Err(e) = result {
                eprintln!("==> relay fleet with {n} agents failed: {e:#}");
                r.error = Some(format!("{e:#}"));
            }
            eprintln!(
                "==> fleet, {n} agents ({}): {}/{} agents on all relays, {} sessions/s, channels per relay {:?}, KiB/session {:?}",
                spread.name(),
                r.agents_all_relays,
                n,
                opt(r.sessions_per_s, 0),
                r.relays.iter().map(|x| x.channels).collect::<Vec<_>>(),
                r.relays
                    .iter()
                    .map(|x| opt(x.kib_per_session, 1))
                    .collect::<Vec<_>>()
            );
            runs.push(r);
        }
    }
    Ok(RelayFleet {
        plan: plan.clone(),
        relays: RELAYS,
        runs,
    })
}

/// Writes one config file and starts [`RELAYS`] relays from it, each with its own `--bind` and
/// `--metrics` on loopback.
fn start_fleet(dir: &Path, name: &str, files: &[std::path::PathBuf; 3]) -> Result<Vec<Relay>> {
    // Hold every probe socket until all ports are picked, so that no two relays get the same.
    let udp: Vec<std::net::UdpSocket> = (0..RELAYS)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()
        .context("binding probe sockets")?;
    let tcp: Vec<std::net::TcpListener> = (0..RELAYS)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()
        .context("binding probe sockets")?;
    let addrs: Vec<(SocketAddr, SocketAddr)> = udp
        .iter()
        .zip(&tcp)
        .map(|(u, t)| Ok((u.local_addr()?, t.local_addr()?)))
        .collect::<std::io::Result<_>>()?;
    drop((udp, tcp));
    let cfg = relay_config(addrs[0].0, addrs[0].1, files.clone(), None);
    let cfg_path = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg_path, cfg.to_toml())
        .with_context(|| format!("writing {}", cfg_path.display()))?;
    addrs
        .into_iter()
        .enumerate()
        .map(|(k, (addr, metrics))| {
            let log = dir.join(format!("{name}-relay{k}.log"));
            let flags = [
                "--bind".to_owned(),
                addr.to_string(),
                "--metrics".to_owned(),
                metrics.to_string(),
            ];
            let process = RelayProcess::start(&cfg_path, &flags, &log, None)?;
            Ok(Relay {
                addr,
                metrics,
                process,
                log,
            })
        })
        .collect()
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "missing".into(), |v| format!("{v:.digits$}"))
}

fn cpu(pid: u32) -> Option<f64> {
    ztna_e2e::cpu_seconds(pid).ok()
}

fn rss(pid: u32) -> Option<u64> {
    ztna_e2e::rss_kib(pid).ok()
}

/// % of one core between two CPU readings over `secs`.
fn cpu_percent(before: Option<f64>, after: Option<f64>, secs: f64) -> Option<f64> {
    Some(100.0 * (after? - before?) / secs.max(1e-3))
}

/// A counter or gauge of the relay's metrics; `None` when they can't be read or lack it.
fn metric(m: &Option<ztna_e2e::Metrics>, name: &str) -> Option<u64> {
    m.as_ref()?.get(name).map(|v| v as u64)
}

/// The relay a real agent's channel would go through (`ztna_core::agent_machine`'s choice of
/// the primary): `ups` are the agent's live sessions in the order they came up, as (relay,
/// address, RTT then). The first becomes the primary; each later one, when the nearest of the
/// live ones (lowest RTT, then lowest address), replaces it only when clearly nearer.
fn nearest(ups: &[(usize, SocketAddr, Duration)], cfg: &MachineConfig) -> Option<usize> {
    let mut primary: Option<(usize, Duration)> = None;
    for k in 0..ups.len() {
        let best = ups[..=k]
            .iter()
            .min_by_key(|(_, a, rtt)| (*rtt, *a))
            .map(|(r, _, rtt)| (*r, *rtt));
        primary = match (primary, best) {
            (None, b) => b,
            (Some(p), None) => Some(p),
            (Some((p, prtt)), Some((b, brtt))) => {
                let clearly = brtt.as_secs_f64() < prtt.as_secs_f64() * cfg.switch_ratio
                    && brtt + cfg.switch_margin <= prtt;
                Some(if clearly { (b, brtt) } else { (p, prtt) })
            }
        };
    }
    primary.map(|(r, _)| r)
}

/// One agent's sessions.
struct AgentUp {
    index: usize,
    /// (relay, session, time from the agent's first handshake, RTT at the welcome), in the
    /// order they came up.
    ups: Vec<(usize, Session, Duration, Duration)>,
    errors: Vec<String>,
}

async fn simulate(
    pki: &Pki,
    relays: &[Relay],
    n: usize,
    steady_secs: u64,
    spread: Spread,
    r: &mut FleetRun,
) -> Result<()> {
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let (tap, _) = TapSocket::bind(local, 0).context("binding the agents' socket")?;
    let endpoint = tap
        .endpoint(quinn::EndpointConfig::default())
        .context("binding the agents' endpoint")?;
    let (conn_tap, _) = TapSocket::bind(local, 0).context("binding the connector's socket")?;
    let conn_endpoint = conn_tap
        .endpoint(quinn::EndpointConfig::default())
        .context("binding the connector's endpoint")?;
    let pids: Vec<u32> = relays.iter().map(|x| x.process.pid).collect();
    r.relays = relays
        .iter()
        .map(|x| FleetRelay {
            addr: x.addr.to_string(),
            sessions: 0,
            channels: 0,
            relay_sessions_active: None,
            relay_channels_active: None,
            handshakes: None,
            rss_idle_kib: None,
            rss_loaded_kib: None,
            kib_per_session: None,
            peak_rss_kib: None,
            cpu_setup_percent: None,
            cpu_steady_percent: None,
            steady_forwarded: None,
            steady_sent: 0,
        })
        .collect();

    // The connector: one session with every relay (the relays may still be starting).
    let service = bench_service();
    let mut connector_sessions = Vec::new();
    for (k, relay) in relays.iter().enumerate() {
        let start = Instant::now();
        let s = loop {
            match connect(
                &conn_endpoint,
                relay.addr,
                &pki.connector,
                &pki.ca_pem,
                hello(Role::Connector, vec![service.clone()]),
            )
            .await
            {
                Ok(s) => break s,
                Err(e) if start.elapsed() > Duration::from_secs(10) => {
                    return Err(e.context(format!(
                        "the simulated connector could not connect to relay {k} ({})",
                        relay.addr
                    )))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        if s.welcome.services.is_empty() {
            bail!(
                "relay {k} did not accept the connector's service: {:?}",
                s.welcome.rejected
            );
        }
        connector_sessions.push(s.conn.clone());
        tokio::spawn(run_connector(s));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (x, pid) in r.relays.iter_mut().zip(&pids) {
        x.rss_idle_kib = rss(*pid);
    }

    // Setup: every agent connects to every relay at once.
    let relay_addrs: Vec<SocketAddr> = relays.iter().map(|x| x.addr).collect();
    let sem = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let cpu0: Vec<Option<f64>> = pids.iter().map(|p| cpu(*p)).collect();
    let rcvbuf0 = relay_scale::rcvbuf_errors(pids[0]);
    let mut set = JoinSet::new();
    let t0 = Instant::now();
    for i in 0..n {
        let sem = sem.clone();
        let endpoint = endpoint.clone();
        let creds = Arc::new(pki.agents[i].clone());
        let ca = Arc::new(pki.ca_pem.clone());
        let relay_addrs = relay_addrs.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let began = Instant::now();
            let mut tries = JoinSet::new();
            for (k, addr) in relay_addrs.into_iter().enumerate() {
                let (endpoint, creds, ca) = (endpoint.clone(), creds.clone(), ca.clone());
                tries.spawn(async move {
                    let s = connect(&endpoint, addr, &creds, &ca, hello(Role::Agent, vec![])).await;
                    (k, s)
                });
            }
            let mut up = AgentUp {
                index: i,
                ups: Vec::new(),
                errors: Vec::new(),
            };
            while let Some(res) = tries.join_next().await {
                match res {
                    Ok((k, Ok(s))) => {
                        let rtt = s.conn.rtt();
                        up.ups.push((k, s, began.elapsed(), rtt));
                    }
                    Ok((k, Err(e))) => up.errors.push(format!("connect to relay {k}: {e:#}")),
                    Err(e) => up.errors.push(format!("connect task: {e}")),
                }
            }
            up
        });
    }
    let mut agents: Vec<AgentUp> = Vec::with_capacity(n);
    while let Some(res) = set.join_next().await {
        agents.push(res.context("agent task panicked")?);
    }
    let setup = t0.elapsed().as_secs_f64();
    r.udp_rcvbuf_errors = Some(relay_scale::rcvbuf_errors(pids[0]).saturating_sub(rcvbuf0));
    for ((x, pid), c0) in r.relays.iter_mut().zip(&pids).zip(&cpu0) {
        x.cpu_setup_percent = cpu_percent(*c0, cpu(*pid), setup);
    }
    for (x, relay) in r.relays.iter_mut().zip(relays) {
        x.handshakes = scrape(relay.metrics)
            .ok()
            .map(|m| Handshakes::from_metrics(&m, r.udp_rcvbuf_errors.unwrap_or_default()));
    }
    agents.sort_by_key(|a| a.index);
    let mut first = Vec::new();
    let mut all = Vec::new();
    for a in &agents {
        for e in &a.errors {
            *r.errors.entry(e.clone()).or_default() += 1;
        }
        for (k, ..) in &a.ups {
            r.relays[*k].sessions += 1;
        }
        r.sessions += a.ups.len();
        match a.ups.len() {
            0 => r.agents_no_relay += 1,
            m if m == RELAYS => {
                r.agents_all_relays += 1;
                all.push(a.ups[RELAYS - 1].2.as_secs_f64() * 1e3);
            }
            _ => r.agents_some_relays += 1,
        }
        if let Some(u) = a.ups.first() {
            first.push(u.2.as_secs_f64() * 1e3);
        }
        let mut ips: Vec<(usize, Option<Ipv4Addr>)> = a
            .ups
            .iter()
            .map(|(k, s, ..)| (*k, s.welcome.tunnel_ip))
            .collect();
        ips.sort();
        if ips.windows(2).any(|w| w[0].1 != w[1].1) {
            r.tunnel_ip_disagreements += 1;
            if r.tunnel_ip_examples.len() < 10 {
                let list: Vec<String> = ips
                    .iter()
                    .map(|(k, ip)| match ip {
                        Some(ip) => format!("{ip} (relay {k})"),
                        None => format!("none (relay {k})"),
                    })
                    .collect();
                r.tunnel_ip_examples
                    .push(format!("agent{}: {}", a.index, list.join(", ")));
            }
        }
    }
    r.setup_s = Some(setup);
    r.sessions_per_s = Some(r.sessions as f64 / setup.max(1e-3));
    r.agents_per_s = Some(r.agents_all_relays as f64 / setup.max(1e-3));
    r.first_session_ms = Quantiles::of(first);
    r.all_sessions_ms = Quantiles::of(all);
    if r.agents_some_relays + r.agents_no_relay > 0 {
        eprintln!(
            "==> {} of {n} agents lack a session with some relay ({} with none); errors: {:?}",
            r.agents_some_relays + r.agents_no_relay,
            r.agents_no_relay,
            r.errors
        );
    }

    // Channels: one per agent, through the relay of its spread.
    let machine = MachineConfig::default();
    let t1 = Instant::now();
    let mut set = JoinSet::new();
    for a in agents {
        if a.ups.is_empty() {
            continue;
        }
        let chosen = match spread {
            Spread::Nearest => {
                let order: Vec<(usize, SocketAddr, Duration)> = a
                    .ups
                    .iter()
                    .map(|(k, _, _, rtt)| (*k, relay_addrs[*k], *rtt))
                    .collect();
                nearest(&order, &machine)
            }
            Spread::RoundRobin => (0..RELAYS)
                .map(|d| (a.index + d) % RELAYS)
                .find(|k| a.ups.iter().any(|u| u.0 == *k)),
        };
        let Some(k) = chosen else { continue };
        if a.ups[0].0 != k {
            r.not_first_relay += 1;
        }
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let mut a = a;
            let ch = match a.ups.iter_mut().find(|u| u.0 == k) {
                Some((_, s, ..)) => open_channel(s).await,
                None => Err(anyhow::anyhow!("no session with the chosen relay")),
            };
            (a, k, ch)
        });
    }
    let mut live: Vec<AgentUp> = Vec::with_capacity(n);
    let mut channels: Vec<(usize, ChannelId)> = Vec::with_capacity(n);
    while let Some(res) = set.join_next().await {
        let (a, k, ch) = res.context("agent task panicked")?;
        match ch {
            Ok(ch) => {
                r.relays[k].channels += 1;
                channels.push((k, ch));
            }
            Err(e) => {
                *r.errors
                    .entry(format!("channel through relay {k}: {e:#}"))
                    .or_default() += 1;
            }
        }
        live.push(a);
    }
    r.channels = channels.len();
    r.channels_per_s = Some(channels.len() as f64 / t1.elapsed().as_secs_f64().max(1e-3));
    if channels.is_empty() {
        bail!("no agent opened a channel; errors: {:?}", r.errors);
    }
    for (x, relay) in r.relays.iter_mut().zip(relays) {
        let m = scrape(relay.metrics).ok();
        x.relay_sessions_active = metric(&m, "ztna_relay_sessions_active");
        x.relay_channels_active = metric(&m, "ztna_relay_channels_active");
    }

    // Steady phase: one datagram per agent per second, through its channel's relay.
    let payload = [0x5a; PAYLOAD];
    let forwarded = |relay: &Relay| {
        let m = scrape(relay.metrics).ok();
        metric(&m, "ztna_relay_datagrams_forwarded_total")
    };
    let fwd0: Vec<Option<u64>> = relays.iter().map(forwarded).collect();
    let cpu0: Vec<Option<f64>> = pids.iter().map(|p| cpu(*p)).collect();
    let rx0 = conn_tap.received();
    let t2 = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for step in 0..steady_secs * 100 {
        tick.tick().await;
        for (i, (k, ch)) in channels.iter().enumerate() {
            if i as u64 % 100 == step % 100
                && tap.send_channel(relay_addrs[*k], *ch, &payload).is_ok()
            {
                r.steady_sent += 1;
                r.relays[*k].steady_sent += 1;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let steady = t2.elapsed().as_secs_f64();
    r.steady_received = Some(conn_tap.received() - rx0);
    for (k, (x, relay)) in r.relays.iter_mut().zip(relays).enumerate() {
        x.cpu_steady_percent = cpu_percent(cpu0[k], cpu(pids[k]), steady);
        x.steady_forwarded = match (fwd0[k], forwarded(relay)) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        x.rss_loaded_kib = rss(pids[k]);
        x.kib_per_session = match (x.rss_idle_kib, x.rss_loaded_kib) {
            (Some(idle), Some(loaded)) if x.sessions > 0 => {
                Some((loaded as f64 - idle as f64) / x.sessions as f64)
            }
            _ => None,
        };
        x.peak_rss_kib = ztna_e2e::peak_rss_kib(pids[k]).ok();
    }

    for a in &live {
        for (_, s, ..) in &a.ups {
            s.conn.close(0u32.into(), b"bench done");
        }
    }
    for c in &connector_sessions {
        c.close(0u32.into(), b"bench done");
    }
    endpoint.close(0u32.into(), b"bench done");
    conn_endpoint.close(0u32.into(), b"bench done");
    Ok(())
}

impl RelayFleet {
    /// The markdown section of `latest.md`.
    pub(crate) fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "## Relay fleet\n\n{} `ztna-relay` processes on loopback from one config file (each its own `--bind` and \
             `--metrics`); one simulated connector with a session with every relay, and N simulated agents, each \
             with a session with every relay (as `ztna-agent` keeps its whole relay list warm; at most {CONNECT_CONCURRENCY} \
             agents connect at a time, each to all relays at once) and one channel through one relay: `nearest` \
             is the agent's own choice (the first relay to answer unless a later one is clearly nearer), \
             `round-robin` is agent i through relay i mod {}. Steady phase: {} s, one {PAYLOAD}-byte datagram per \
             agent per second through its channel. KiB per session: the relay's RSS with the agents' sessions and \
             channels minus its RSS with only the connector's, over its agent sessions. Per agent: from its first \
             handshake to its first and to its last welcome (median / p90). \"missing\": the measurement failed.\n",
            self.relays, self.relays, self.plan.steady_secs
        );
        let _ = writeln!(
            s,
            "| agents | channels via | agents on all relays | agent sessions | setup (s) | sessions/s | agents/s | per agent: first session, median / p90 (ms) | per agent: all sessions, median / p90 (ms) | channels | channels/s | channel not via the first relay to answer | tunnel IPs differ between relays | steady recv/sent | before: CPU busy (%), load avg |"
        );
        let _ = writeln!(
            s,
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for r in &self.runs {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{} | {} |{}",
                r.agents,
                r.spread.name(),
                r.agents_all_relays,
                r.sessions,
                opt(r.setup_s, 1),
                opt(r.sessions_per_s, 0),
                opt(r.agents_per_s, 0),
                Quantiles::cell(&r.first_session_ms),
                Quantiles::cell(&r.all_sessions_ms),
                r.channels,
                opt(r.channels_per_s, 0),
                if r.spread == Spread::Nearest {
                    r.not_first_relay.to_string()
                } else {
                    "—".into()
                },
                r.tunnel_ip_disagreements,
                r.steady_received
                    .map_or_else(|| "missing".into(), |v| v.to_string()),
                r.steady_sent,
                r.load.as_ref().map_or_else(
                    || "missing".into(),
                    |l| format!("{:.0}, {:.2}", l.busy * 100.0, l.loadavg_1m)
                ),
                r.error
                    .as_deref()
                    .map(|e| format!(" error: {}", e.lines().next().unwrap_or_default()))
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(
            s,
            "\n| agents | channels via | relay | agent sessions | channels | relay's gauges: sessions (with the connector's) / channels | RSS idle → loaded (MiB) | per session (KiB) | peak RSS (MiB) | CPU, setup (%) | CPU, steady (%) | steady forwarded/sent |\n|---:|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|"
        );
        let mib = |v: Option<u64>| opt(v.map(|v| v as f64 / 1024.0), 1);
        let gauge = |v: Option<u64>| v.map_or_else(|| "missing".into(), |v| v.to_string());
        for r in &self.runs {
            for (k, x) in r.relays.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "| {} | {} | {k} ({}) | {} | {} | {} / {} | {} → {} | {} | {} | {} | {} | {}/{} |",
                    r.agents,
                    r.spread.name(),
                    x.addr,
                    x.sessions,
                    x.channels,
                    gauge(x.relay_sessions_active),
                    gauge(x.relay_channels_active),
                    mib(x.rss_idle_kib),
                    mib(x.rss_loaded_kib),
                    opt(x.kib_per_session, 1),
                    mib(x.peak_rss_kib),
                    opt(x.cpu_setup_percent, 0),
                    opt(x.cpu_steady_percent, 1),
                    gauge(x.steady_forwarded),
                    x.steady_sent,
                );
            }
        }
        let examples: Vec<&String> = self
            .runs
            .iter()
            .flat_map(|r| &r.tunnel_ip_examples)
            .collect();
        if !examples.is_empty() {
            let _ = writeln!(s, "\nAgents whose relays gave them different tunnel IPs:\n");
            for e in examples {
                let _ = writeln!(s, "- {e}");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    #[test]
    fn nearest_keeps_the_first_relay_unless_another_is_clearly_nearer() {
        let cfg = MachineConfig::default();
        let ms = Duration::from_millis;
        // Alike RTTs: the first to come up.
        let ups = [(2, at(3), ms(10)), (0, at(1), ms(9)), (1, at(2), ms(8))];
        assert_eq!(nearest(&ups, &cfg), Some(2));
        // One clearly nearer (below 0.7× and 5 ms less) that came up later.
        let ups = [(2, at(3), ms(30)), (0, at(1), ms(12)), (1, at(2), ms(25))];
        assert_eq!(nearest(&ups, &cfg), Some(0));
        // 0.7× but less than 5 ms apart: stays.
        let ups = [(1, at(2), ms(6)), (0, at(1), ms(2))];
        assert_eq!(nearest(&ups, &cfg), Some(1));
        assert_eq!(nearest(&[], &cfg), None);
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let q = Quantiles::of((1..=10).map(f64::from).collect()).expect("some");
        assert_eq!((q.n, q.median, q.p90, q.max), (10, 6.0, 9.0, 10.0));
        assert!(Quantiles::of(vec![]).is_none());
    }
}
