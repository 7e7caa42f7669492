//! `ztna-bench --profiles`: single-stream TCP through each tunnel under impaired path
//! conditions (added RTT, random loss, reordering, a bottleneck), with CUBIC and BBR senders.
//!
//! This kernel has no netem, so every tunnel's agent side sends its UDP through the same
//! userspace forwarder, `ztna-test-impair`, in the agent namespace ([`paths::IMPAIR_LISTEN`] →
//! the tunnel's first UDP hop: the connector's WireGuard port, or the relay). The tunnel comes
//! up once per tunnel; the profiles then change the forwarder's impairment through its control
//! file, so one tunnel session sees every profile in turn. The bottleneck profile also measures
//! ping under load (ping every 100 ms while iperf3 runs), the tunnel's own send rate into the
//! bottleneck and the bottleneck's longest queue (from the forwarder's counters), and the same
//! with an unresponsive sender (a UDP flood at 4 × the bottleneck's rate). Beside the ping, a
//! TCP ping (`ztna-test-tcp rtt`: one byte echoed every 100 ms on its own connection) shows what
//! another TCP connection waits behind the load, uploads and downloads: on ztna the
//! connector's TCP segments to the agent share one ordered carriage stream, which ICMP bypasses.
//! When boringtun and ztna-relay are both measured with the bottleneck, a last topology brings
//! both up at once through one forwarder (one bottleneck) and runs a flow through each at the
//! same time: how they share it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use ztna_e2e::{Node, Topology};

use crate::measure::{self, IperfKind};
use crate::paths;

/// One set of path conditions, applied in both directions.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Profile {
    pub(crate) name: &'static str,
    /// Added round-trip time (half of it each way).
    pub(crate) rtt_ms: u64,
    /// Random loss in each direction.
    pub(crate) loss_pct: f64,
    /// Datagrams held back by an extra RTT in each direction.
    pub(crate) reorder_pct: f64,
    /// Bottleneck rate in each direction (0: none) and its queue.
    pub(crate) rate_mbit: f64,
    pub(crate) queue_kb: u64,
}

const fn p(name: &'static str, rtt_ms: u64, loss_pct: f64) -> Profile {
    Profile {
        name,
        rtt_ms,
        loss_pct,
        reorder_pct: 0.0,
        rate_mbit: 0.0,
        queue_kb: 0,
    }
}

/// The bottleneck profile: 50 Mbit/s with a 64 KiB (about 10 ms) queue, 20 ms RTT.
pub(crate) const BOTTLENECK: Profile = Profile {
    name: "50 Mbit/s bottleneck, 64 KiB queue, 20 ms",
    rtt_ms: 20,
    loss_pct: 0.0,
    reorder_pct: 0.0,
    rate_mbit: 50.0,
    queue_kb: 64,
};

/// The TCP ping's echo server in the backend namespace; port 9000 is among service `web`'s TCP
/// ports in the test configs.
const TCP_PROBE_PORT: u16 = 9000;

/// Every profile, in the order they run.
pub(crate) const PROFILES: &[Profile] = &[
    p("0 ms, no loss", 0, 0.0),
    p("20 ms, no loss", 20, 0.0),
    p("60 ms, no loss", 60, 0.0),
    p("150 ms, no loss", 150, 0.0),
    p("20 ms, 0.1 % loss", 20, 0.1),
    p("20 ms, 1 % loss", 20, 1.0),
    p("20 ms, 3 % loss", 20, 3.0),
    p("60 ms, 1 % loss", 60, 1.0),
    p("60 ms, 3 % loss", 60, 3.0),
    p("150 ms, 1 % loss", 150, 1.0),
    Profile {
        name: "20 ms, 1 % loss, 1 % reordering",
        rtt_ms: 20,
        loss_pct: 1.0,
        reorder_pct: 1.0,
        rate_mbit: 0.0,
        queue_kb: 0,
    },
    BOTTLENECK,
];

/// The senders: single-stream TCP from the agent with each congestion control, the same from
/// the backend to the agent (`-down`, `iperf3 -R`: a download; on ztna the connector's own TCP
/// sends over the tunnel, whatever the backend runs), and UDP at a fixed 100 Mbit/s (1200-byte
/// payloads), which shows what the tunnel itself delivers with no TCP reacting.
pub(crate) const CCS: &[&str] = &["cubic", "bbr", "cubic-down", "bbr-down", UDP_100];
const UDP_100: &str = "udp-100";

/// `cc`'s congestion control and whether it is a download (`-down`).
fn sender(cc: &'static str) -> (&'static str, bool) {
    match cc.strip_suffix("-down") {
        Some(cc) => (cc, true),
        None => (cc, false),
    }
}

/// Every tunnel `--profiles` can run: the default ones and `ztna-relay-256k` (the connector's
/// TCP buffers at 256 KiB instead of 4 MiB).
pub(crate) const TUNNELS_ALL: &[&str] = &[
    "boringtun",
    "wireguard-go",
    "ztna-relay",
    "ztna-direct",
    "ztna-relay-256k",
];

/// The tunnels measured by default.
pub(crate) const TUNNELS: &[&str] = &["boringtun", "wireguard-go", "ztna-relay", "ztna-direct"];

impl Profile {
    /// The forwarder's options for this profile.
    fn impair_args(&self) -> String {
        let mut a = format!(
            "--delay-ms {} --loss-pct {} --queue 65536",
            self.rtt_ms / 2,
            self.loss_pct
        );
        if self.reorder_pct > 0.0 {
            a += &format!(" --reorder-pct {}", self.reorder_pct);
        }
        if self.rate_mbit > 0.0 {
            a += &format!(
                " --rate-mbit {} --rate-queue-kb {}",
                self.rate_mbit, self.queue_kb
            );
        }
        a
    }
}

/// One tunnel, one profile, one sender congestion control.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Cell {
    pub(crate) tunnel: String,
    pub(crate) profile: String,
    pub(crate) cc: String,
    /// Received rate, Mbit/s.
    pub(crate) mbps: Option<f64>,
    pub(crate) retransmits: Option<u64>,
    pub(crate) error: Option<String>,
    /// 1-minute load average before the test.
    pub(crate) load: f64,
    /// ztna: the path of `conn1` after the test (`relay`, `direct-lan`, ...), and the inner
    /// connection's packets lost and losses counted as congestion during it.
    pub(crate) path: Option<String>,
    pub(crate) inner_lost: Option<u64>,
    pub(crate) inner_congestion_events: Option<u64>,
    /// Datagrams the kernel dropped on the impairment forwarder's own sockets during the cell
    /// (the instrument, not the path, lost them; [`ProfilesReport::markdown`] lists such cells).
    pub(crate) forwarder_drops: Option<u64>,
}

/// What a ztna cell reads from `ztna-agent status` before and after it.
#[derive(Debug, Clone, Copy, Default)]
struct InnerCounters {
    lost: u64,
    congestion_events: u64,
}

fn inner_counters(st: &ztna_e2e::AgentStatus) -> Option<InnerCounters> {
    let k = &st.connector("conn1")?["carriage"];
    Some(InnerCounters {
        lost: k["lost_packets"].as_u64()?,
        congestion_events: k["congestion_events"].as_u64()?,
    })
}

/// The bottleneck profile's extra measurements for one tunnel and one sender.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Loaded {
    pub(crate) tunnel: String,
    /// `cubic`, `bbr`, `cubic-down`, `bbr-down`, or `udp-flood`.
    pub(crate) sender: String,
    /// Idle ping through the tunnel, and ping while the test runs: mean and p99, ms.
    pub(crate) idle_ping_ms: Option<f64>,
    pub(crate) loaded_ping_avg_ms: Option<f64>,
    pub(crate) loaded_ping_p99_ms: Option<f64>,
    pub(crate) loaded_ping_lost: Option<u32>,
    /// The TCP ping under load: mean and p99 of its round trips, ms, and how it ended (`done`,
    /// or the error that cut it short).
    pub(crate) loaded_tcp_rtt_avg_ms: Option<f64>,
    pub(crate) loaded_tcp_rtt_p99_ms: Option<f64>,
    pub(crate) loaded_tcp_rtt_result: Option<String>,
    /// iperf3's received rate, Mbit/s.
    pub(crate) received_mbps: Option<f64>,
    /// What the tunnel sent into the bottleneck in the load's direction and what left it (UDP
    /// payload), Mbit/s.
    pub(crate) tunnel_sent_mbps: Option<f64>,
    pub(crate) bottleneck_out_mbps: Option<f64>,
    /// Datagrams the bottleneck's full queue dropped.
    pub(crate) bottleneck_drops: Option<u64>,
    /// The bottleneck queue's longest delay in the load's direction, ms.
    pub(crate) max_queue_ms: Option<f64>,
    pub(crate) error: Option<String>,
}

/// Everything one `--profiles` run measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ProfilesReport {
    pub(crate) started_utc: String,
    pub(crate) finished_utc: String,
    pub(crate) label: String,
    pub(crate) secs: u32,
    pub(crate) tunnels: Vec<String>,
    pub(crate) profiles: Vec<Profile>,
    pub(crate) cells: Vec<Cell>,
    pub(crate) loaded: Vec<Loaded>,
    pub(crate) competing: Vec<Competing>,
    /// Two flows through boringtun alone at once: the yardstick for [`Self::competing`].
    pub(crate) reference: Vec<ReferencePair>,
    pub(crate) machine: crate::report::Machine,
}

/// A ztna flow and a boringtun flow through the bottleneck at the same time.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Competing {
    /// The ztna tunnel (`ztna-relay`).
    pub(crate) tunnel: String,
    pub(crate) sender: String,
    /// How long both flows ran.
    pub(crate) secs: u32,
    /// Each flow's received rate, Mbit/s.
    pub(crate) ztna_mbps: Option<f64>,
    pub(crate) boringtun_mbps: Option<f64>,
    /// Datagrams the bottleneck dropped, and the kernel on the forwarder's own sockets.
    pub(crate) bottleneck_drops: Option<u64>,
    pub(crate) forwarder_drops: Option<u64>,
    pub(crate) error: Option<String>,
}

/// Two flows through boringtun alone, started together through the same bottleneck: what the
/// kernel's own TCP gets beside another flow there, the yardstick for ztna's shares. A ztna
/// download crosses the bottleneck paced by the tunnel's controller, not by the backend's TCP
/// (that ends at the connector), so its rows compare with a CUBIC flow beside a BBR one.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct ReferencePair {
    /// The two flows' senders, as in [`CCS`] (`-down`: the backend sends).
    pub(crate) first: String,
    pub(crate) second: String,
    pub(crate) secs: u32,
    pub(crate) first_mbps: Option<f64>,
    pub(crate) second_mbps: Option<f64>,
    pub(crate) bottleneck_drops: Option<u64>,
    pub(crate) forwarder_drops: Option<u64>,
    pub(crate) error: Option<String>,
}

/// The reference pairs, uploads and downloads: a loss-based flow beside BBR (the yardstick for
/// a ztna download beside either), and BBR beside BBR (for a BBR upload through ztna).
const REFERENCE_PAIRS: &[(&str, &str)] = &[
    ("cubic", "bbr"),
    ("bbr", "bbr"),
    ("cubic-down", "bbr-down"),
    ("bbr-down", "bbr-down"),
];

/// The first flow's share of what both flows received (missing if either is).
fn share((a, b): (Option<f64>, Option<f64>)) -> Option<f64> {
    let (a, b) = (a?, b?);
    (a + b > 0.0).then(|| a / (a + b))
}

/// Jain's fairness index of two rates: 1 when equal, 0.5 when one gets everything.
fn jain((a, b): (Option<f64>, Option<f64>)) -> Option<f64> {
    let (a, b) = (a?, b?);
    let sq = a * a + b * b;
    (sq > 0.0).then(|| (a + b) * (a + b) / (2.0 * sq))
}

/// A table row of two flows at once: their names, rates, the first's share, Jain's index and
/// the bottleneck's drops; the first line of an error beside the second name.
fn pair_row(
    names: (&str, &str),
    mbps: (Option<f64>, Option<f64>),
    drops: Option<u64>,
    error: Option<&str>,
) -> String {
    let err = error
        .map(|e| format!(" ({})", e.lines().next().unwrap_or_default()))
        .unwrap_or_default();
    format!(
        "| {} | {}{err} | {} | {} | {} | {} | {} |\n",
        names.0,
        names.1,
        f1(mbps.0),
        f1(mbps.1),
        share(mbps).map_or("—".into(), |v| format!("{v:.2}")),
        jain(mbps).map_or("—".into(), |v| format!("{v:.3}")),
        drops.map_or("—".into(), |d| d.to_string()),
    )
}

/// The `--only` entries in `raw`: each value split at commas not followed by a space (profile
/// names have ", " in them: "60 ms, 3 % loss").
pub(crate) fn selectors(raw: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for value in raw {
        let mut rest = value.as_str();
        while let Some(i) = rest
            .char_indices()
            .find(|&(i, c)| c == ',' && !rest[i + 1..].starts_with(' '))
            .map(|(i, _)| i)
        {
            out.push(rest[..i].to_owned());
            rest = &rest[i + 1..];
        }
        out.push(rest.to_owned());
    }
    out.retain(|o| !o.is_empty());
    out
}

/// Whether `--only` entry `o` selects profile `name`: a substring, or a prefix after `^`.
fn selects(o: &str, name: &str) -> bool {
    match o.strip_prefix('^') {
        Some(prefix) => name.starts_with(prefix),
        None => name.contains(o),
    }
}

/// Runs every profile through every tunnel.
pub(crate) fn run(tunnels: &[String], secs: u32, label: &str, only: &[String]) -> ProfilesReport {
    let profiles: Vec<Profile> = PROFILES
        .iter()
        .filter(|p| only.is_empty() || only.iter().any(|o| selects(o, p.name)))
        .copied()
        .collect();
    let started_utc = crate::report::now_utc();
    let mut cells = Vec::new();
    let mut loaded = Vec::new();
    for tunnel in tunnels {
        eprintln!("==> profiles through {tunnel}");
        if let Err(e) = run_tunnel(tunnel, &profiles, secs, &mut cells, &mut loaded) {
            eprintln!("==> {tunnel} failed: {e:#}");
            cells.push(Cell {
                tunnel: tunnel.clone(),
                profile: "setup".into(),
                cc: String::new(),
                mbps: None,
                retransmits: None,
                error: Some(format!("{e:#}")),
                load: 0.0,
                path: None,
                inner_lost: None,
                inner_congestion_events: None,
                forwarder_drops: None,
            });
        }
    }
    let mut competing = Vec::new();
    let mut reference = Vec::new();
    let has = |name: &str| tunnels.iter().any(|t| t == name);
    if has(paths::REFERENCE) && has("ztna-relay") && profiles.iter().any(|p| p.rate_mbit > 0.0) {
        eprintln!("==> a ztna-relay flow and a boringtun flow through one bottleneck");
        if let Err(e) = run_competing(secs, &mut competing, &mut reference) {
            eprintln!("==> competing flows failed: {e:#}");
            competing.push(Competing {
                tunnel: "ztna-relay".into(),
                sender: "setup".into(),
                error: Some(format!("{e:#}")),
                ..Competing::default()
            });
        }
    }
    ProfilesReport {
        started_utc,
        finished_utc: crate::report::now_utc(),
        label: label.to_owned(),
        secs,
        tunnels: tunnels.to_vec(),
        profiles,
        cells,
        loaded,
        competing,
        reference,
        machine: crate::report::Machine::read(),
    }
}

fn run_tunnel(
    tunnel: &str,
    profiles: &[Profile],
    secs: u32,
    cells: &mut Vec<Cell>,
    loaded: &mut Vec<Loaded>,
) -> Result<()> {
    let t = Topology::new(&format!("prof-{tunnel}"), crate::runner::helpers())?;
    let result = measure_tunnel(&t, tunnel, profiles, secs, cells, loaded);
    if result.is_ok() {
        t.mark_passed();
    }
    let prefix = t.prefix().to_owned();
    drop(t);
    for ifname in paths::wg_ifnames(&prefix) {
        let _ = std::fs::remove_file(paths::wg_socket(&ifname));
    }
    result
}

/// One topology with ztna-relay and boringtun up at once through one forwarder, and for each
/// sender a flow through each at the same time, through [`BOTTLENECK`]; then the
/// [`REFERENCE_PAIRS`] through boringtun alone.
fn run_competing(
    secs: u32,
    out: &mut Vec<Competing>,
    reference: &mut Vec<ReferencePair>,
) -> Result<()> {
    let t = Topology::new("prof-compete", crate::runner::helpers())?;
    let result = measure_competing(&t, secs, out, reference);
    if result.is_ok() {
        t.mark_passed();
    }
    let prefix = t.prefix().to_owned();
    drop(t);
    for ifname in paths::wg_ifnames(&prefix) {
        let _ = std::fs::remove_file(paths::wg_socket(&ifname));
    }
    result
}

/// The iperf3 kind of a sender of [`CCS`].
fn tcp_kind(cc: &'static str) -> IperfKind {
    match sender(cc) {
        (algo, true) => IperfKind::TcpCcDown { cc: algo },
        (algo, false) => IperfKind::TcpCc { cc: algo },
    }
}

/// One flow of a pair: its target address, the iperf3 server's port and the test.
type Flow<'a> = (&'a str, u16, IperfKind);

/// What one pair of flows at the bottleneck measured.
struct PairRun {
    /// Each flow's received rate, Mbit/s (missing if it failed).
    mbps: (Option<f64>, Option<f64>),
    /// What failed, each flow's error named by `names` of [`pair_at_bottleneck`].
    error: Option<String>,
    bottleneck_drops: Option<u64>,
    forwarder_drops: Option<u64>,
}

/// One pair of flows through [`BOTTLENECK`] (`what` names the step): once the machine is quiet,
/// sets the bottleneck, runs `first` in the foreground and `second` in the background (its JSON
/// to a file named by `tag`), started together, for `secs`, and reads the forwarder's counters
/// of the pair.
fn pair_at_bottleneck(
    t: &Topology,
    fwd: &Forwarder,
    what: &str,
    (first, second): (Flow, Flow),
    names: (&str, &str),
    secs: u32,
    tag: &str,
) -> Result<PairRun> {
    measure::wait_quiet(0.25, Duration::from_secs(3))?;
    t.step(what);
    fwd.set(&BOTTLENECK)?;
    let log = t.dir().join(format!("iperf3-{tag}.json"));
    let mut args = measure::iperf_args(second.0, second.1, second.2, secs);
    args.extend(["--logfile".into(), log.to_string_lossy().into_owned()]);
    let bg = t.spawn(Node::Agent, &format!("iperf3-{tag}"), &args[0], &args[1..])?;
    let a = measure::iperf_on(t, first.0, first.1, first.2, secs).map(|r| r.mbps);
    wait_exit(t, bg, Duration::from_secs(u64::from(secs) + 20));
    let json = std::fs::read_to_string(&log).unwrap_or_default();
    let b = measure::iperf_result(&args, &json, second.2).map(|r| r.mbps);
    let s = fwd.stats();
    Ok(PairRun {
        error: pair_error(&a, &b, names),
        mbps: (a.ok(), b.ok()),
        bottleneck_drops: s.get("rate_dropped").copied(),
        forwarder_drops: s.get("socket_drops").copied(),
    })
}

/// Both errors of a pair, if any, in one line.
fn pair_error(a: &Result<f64>, b: &Result<f64>, names: (&str, &str)) -> Option<String> {
    let errs: Vec<String> = [(a, names.0), (b, names.1)]
        .into_iter()
        .filter_map(|(r, n)| r.as_ref().err().map(|e| format!("{n}: {e:#}")))
        .collect();
    (!errs.is_empty()).then(|| errs.join("; "))
}

fn measure_competing(
    t: &Topology,
    secs: u32,
    out: &mut Vec<Competing>,
    reference: &mut Vec<ReferencePair>,
) -> Result<()> {
    // Twice a cell's time: two flows take a while to settle on their shares.
    let secs = 2 * secs;
    crate::runner::start_iperf_server_on(t, measure::IPERF_PORT)?;
    crate::runner::start_iperf_server_on(t, measure::IPERF_PORT_2)?;
    let (fwd, impair) = Forwarder::spawn(
        t,
        &[
            (paths::IMPAIR_LISTEN, paths::impair_target("ztna-relay")),
            (
                paths::IMPAIR_LISTEN_2,
                paths::impair_target(paths::REFERENCE),
            ),
        ],
    )?;
    let (ztna, boringtun) = paths::compete(t)?;
    for (i, cc) in CCS.iter().filter(|cc| **cc != UDP_100).enumerate() {
        let kind = tcp_kind(cc);
        let p = pair_at_bottleneck(
            t,
            &fwd,
            &format!("ztna-relay and boringtun at once: {cc}"),
            (
                (ztna.target, measure::IPERF_PORT_2, kind),
                (boringtun.target, measure::IPERF_PORT, kind),
            ),
            ("ztna", "boringtun"),
            secs,
            &format!("boringtun-{i}"),
        )?;
        let c = Competing {
            tunnel: "ztna-relay".into(),
            sender: (*cc).to_owned(),
            secs,
            ztna_mbps: p.mbps.0,
            boringtun_mbps: p.mbps.1,
            bottleneck_drops: p.bottleneck_drops,
            forwarder_drops: p.forwarder_drops,
            error: p.error,
        };
        eprintln!("    competing | {cc}: {c:?}");
        out.push(c);
    }
    for (i, (first, second)) in REFERENCE_PAIRS.iter().enumerate() {
        let p = pair_at_bottleneck(
            t,
            &fwd,
            &format!("two boringtun flows at once: {first} and {second}"),
            (
                (boringtun.target, measure::IPERF_PORT_2, tcp_kind(first)),
                (boringtun.target, measure::IPERF_PORT, tcp_kind(second)),
            ),
            ("first", "second"),
            secs,
            &format!("reference-{i}"),
        )?;
        let r = ReferencePair {
            first: (*first).to_owned(),
            second: (*second).to_owned(),
            secs,
            first_mbps: p.mbps.0,
            second_mbps: p.mbps.1,
            bottleneck_drops: p.bottleneck_drops,
            forwarder_drops: p.forwarder_drops,
            error: p.error,
        };
        eprintln!("    reference | {first} and {second}: {r:?}");
        reference.push(r);
    }
    t.ensure_running(impair)?;
    Ok(())
}

/// The impairments the forwarder applied so far, by its stats file (0 before it wrote one).
fn applied(stats: &BTreeMap<String, u64>) -> u64 {
    stats.get("applied").copied().unwrap_or(0)
}

/// The forwarder's control and stats files.
struct Forwarder {
    control: PathBuf,
    stats: PathBuf,
}

impl Forwarder {
    /// Starts the forwarder in the agent namespace with these (listen, target) pairs.
    fn spawn(t: &Topology, pairs: &[(&str, String)]) -> Result<(Self, ztna_e2e::DaemonId)> {
        let fwd = Forwarder {
            control: t.dir().join("impair.ctl"),
            stats: t.dir().join("impair.stats"),
        };
        std::fs::write(&fwd.control, "")?;
        let mut args: Vec<String> = Vec::new();
        for (listen, target) in pairs {
            args.extend(["--listen".into(), (*listen).to_owned()]);
            args.extend(["--target".into(), target.clone()]);
        }
        args.extend([
            "--control-file".into(),
            fwd.control.to_string_lossy().into(),
        ]);
        args.extend(["--stats-file".into(), fwd.stats.to_string_lossy().into()]);
        args.extend(["--exit-after".into(), "3600".into()]);
        let impair = t.spawn(Node::Agent, "impair", &t.helpers().impair, &args)?;
        // Up once it has applied the empty control file: a later `set` then counts from there.
        if fwd
            .poll(Duration::from_secs(3), |m| applied(m) >= 1)
            .is_none()
        {
            t.ensure_running(impair)?;
            anyhow::bail!("the impairment forwarder wrote no stats within 3 s");
        }
        Ok((fwd, impair))
    }

    /// Applies `profile` (and so resets the counters), and waits until the forwarder has read
    /// it: its stats file counts the impairments it applied. A change it did not take (the
    /// control file unreadable, or its thread held up) is an error, which ends the caller's run
    /// instead of measuring the previous profile.
    fn set(&self, profile: &Profile) -> Result<()> {
        let before = applied(&self.read());
        std::fs::write(&self.control, profile.impair_args())
            .with_context(|| format!("writing {}", self.control.display()))?;
        if self
            .poll(Duration::from_secs(3), |m| applied(m) > before)
            .is_none()
        {
            anyhow::bail!(
                "the impairment forwarder did not apply `{}` within 3 s",
                profile.impair_args()
            );
        }
        Ok(())
    }

    /// The forwarder's `socket_drops` now (since the last [`Self::set`]).
    fn socket_drops(&self) -> Option<u64> {
        self.stats().get("socket_drops").copied()
    }

    /// The forwarder's counters since the last [`Self::set`], from a stats file written after
    /// this call (every 100 ms); empty, so every figure from it is missing, when none comes
    /// within a second.
    fn stats(&self) -> BTreeMap<String, u64> {
        let Some(before) = self.read().get("written").copied() else {
            return BTreeMap::new();
        };
        self.poll(Duration::from_secs(1), |m| {
            m.get("written").is_some_and(|w| *w > before)
        })
        .unwrap_or_default()
    }

    /// The stats file once `ready` holds for it, read every 50 ms for at most `limit`.
    fn poll(
        &self,
        limit: Duration,
        ready: impl Fn(&BTreeMap<String, u64>) -> bool,
    ) -> Option<BTreeMap<String, u64>> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let now = self.read();
            if ready(&now) {
                return Some(now);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The stats file as it is.
    fn read(&self) -> BTreeMap<String, u64> {
        std::fs::read_to_string(&self.stats)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once('='))
            .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
            .collect()
    }
}

fn measure_tunnel(
    t: &Topology,
    tunnel: &str,
    profiles: &[Profile],
    secs: u32,
    cells: &mut Vec<Cell>,
    loaded: &mut Vec<Loaded>,
) -> Result<()> {
    crate::runner::start_iperf_server(t)?;
    let probe_addr = format!("{}:{TCP_PROBE_PORT}", ztna_e2e::addr::BACKEND);
    let probe_server = t.spawn(
        Node::Backend,
        "tcp-echo",
        &t.helpers().tcp,
        ["listen", &probe_addr, "--echo", "--exit-after", "3600"],
    )?;
    let (fwd, impair) =
        Forwarder::spawn(t, &[(paths::IMPAIR_LISTEN, paths::impair_target(tunnel))])?;
    t.ensure_running(probe_server)?;
    let up = paths::impaired(t, tunnel)?;
    for profile in profiles {
        fwd.set(profile)?;
        for cc in CCS {
            let load = measure::wait_quiet(0.25, Duration::from_secs(3))?;
            t.step(&format!("{tunnel}: {} with {cc}", profile.name));
            let mut cell = Cell {
                tunnel: tunnel.to_owned(),
                profile: profile.name.to_owned(),
                cc: (*cc).to_owned(),
                mbps: None,
                retransmits: None,
                error: None,
                load: load.loadavg_1m,
                path: None,
                inner_lost: None,
                inner_congestion_events: None,
                forwarder_drops: None,
            };
            let (algo, down) = sender(cc);
            if profile.rate_mbit > 0.0 && *cc == UDP_100 {
                continue;
            }
            let status = || {
                up.status_socket
                    .as_deref()
                    .and_then(|s| ztna_e2e::stack::agent_status(t, s).ok())
            };
            let before = status().as_ref().and_then(inner_counters);
            let drops_before = fwd.socket_drops();
            if profile.rate_mbit > 0.0 {
                let idle = measure::ping(t, up.target, 20).ok().map(|p| p.avg_ms);
                fwd.set(profile)?;
                let kind = if down {
                    IperfKind::TcpCcDown { cc: algo }
                } else {
                    IperfKind::TcpCc { cc }
                };
                let mut l = under_load(t, &fwd, up.target, kind, secs);
                l.tunnel = tunnel.to_owned();
                l.sender = (*cc).to_owned();
                l.idle_ping_ms = idle;
                cell.mbps = l.received_mbps;
                cell.error = l.error.clone();
                loaded.push(l);
            } else {
                let kind = if *cc == UDP_100 {
                    IperfKind::Udp { mbps: 100.0 }
                } else if down {
                    IperfKind::TcpCcDown { cc: algo }
                } else {
                    IperfKind::TcpCc { cc }
                };
                match measure::iperf(t, up.target, kind, secs) {
                    Ok(r) => {
                        cell.mbps = Some(r.mbps);
                        cell.retransmits = r.retransmits;
                    }
                    Err(e) => cell.error = Some(format!("{e:#}")),
                }
            }
            // Under load the forwarder's counters were reset (fwd.set) after `drops_before`.
            let base = if profile.rate_mbit > 0.0 {
                Some(0)
            } else {
                drops_before
            };
            cell.forwarder_drops = fwd
                .socket_drops()
                .zip(base)
                .map(|(a, b)| a.saturating_sub(b));
            if let Some(after) = status() {
                cell.path = after.connector_path("conn1").map(str::to_owned);
                if let (Some(b), Some(a)) = (before, inner_counters(&after)) {
                    cell.inner_lost = Some(a.lost.saturating_sub(b.lost));
                    cell.inner_congestion_events =
                        Some(a.congestion_events.saturating_sub(b.congestion_events));
                }
            }
            eprintln!(
                "    {tunnel} | {} | {cc}: {:?} Mbit/s{}",
                profile.name,
                cell.mbps.map(|m| (m * 10.0).round() / 10.0),
                cell.error
                    .as_deref()
                    .map(|e| format!(" (error: {e})"))
                    .unwrap_or_default()
            );
            cells.push(cell);
        }
        if profile.rate_mbit > 0.0 {
            // An unresponsive sender: a UDP flood at 4 × the bottleneck's rate.
            fwd.set(profile)?;
            let flood = IperfKind::Udp {
                mbps: 4.0 * profile.rate_mbit,
            };
            let mut l = under_load(t, &fwd, up.target, flood, secs);
            l.tunnel = tunnel.to_owned();
            l.sender = "udp-flood".into();
            eprintln!("    {tunnel} | udp flood: {l:?}");
            loaded.push(l);
        }
    }
    t.ensure_running(impair)?;
    Ok(())
}

/// Runs `kind` for `secs` with ping and the TCP ping every 100 ms alongside, and reads the
/// forwarder's counters (reset by the caller just before) for the load's direction.
fn under_load(t: &Topology, fwd: &Forwarder, target: &str, kind: IperfKind, secs: u32) -> Loaded {
    let mut l = Loaded::default();
    let count = (secs * 10).saturating_sub(5).max(1).to_string();
    let ping = t.spawn(
        Node::Agent,
        "ping-under-load",
        "ping",
        ["-n", "-i", "0.1", "-W", "2", "-c", &count, target],
    );
    let probe = t.spawn(
        Node::Agent,
        "tcp-ping-under-load",
        &t.helpers().tcp,
        [
            "rtt",
            &format!("{target}:{TCP_PROBE_PORT}"),
            "--count",
            &count,
            "--interval-ms",
            "100",
            "--timeout-ms",
            "3000",
        ],
    );
    let started = std::time::Instant::now();
    let down = matches!(kind, IperfKind::TcpCcDown { .. });
    match measure::iperf(t, target, kind, secs) {
        Ok(r) => l.received_mbps = Some(r.mbps),
        Err(e) => l.error = Some(format!("{e:#}")),
    }
    let elapsed = started.elapsed().as_secs_f64().max(f64::from(secs));
    let s = fwd.stats();
    let dir = if down { "down" } else { "up" };
    let mbit = |k: &str| s.get(k).map(|b| *b as f64 * 8.0 / 1e6 / elapsed);
    l.tunnel_sent_mbps = mbit(&format!("{dir}_in_bytes"));
    l.bottleneck_out_mbps = mbit(&format!("{dir}_out_bytes"));
    l.bottleneck_drops = s.get("rate_dropped").copied();
    l.max_queue_ms = s
        .get(&format!("{dir}_max_backlog_us"))
        .map(|u| *u as f64 / 1000.0);
    if let Ok(id) = probe {
        wait_exit(t, id, PROBE_EXIT);
        let log = t.log(id);
        let mut rtts: Vec<f64> = log
            .lines()
            .filter_map(|l| l.strip_prefix("rtt_ms=")?.trim().parse().ok())
            .collect();
        rtts.sort_by(f64::total_cmp);
        if !rtts.is_empty() {
            l.loaded_tcp_rtt_avg_ms = Some(rtts.iter().sum::<f64>() / rtts.len() as f64);
            l.loaded_tcp_rtt_p99_ms = Some(measure::percentile(&rtts, 0.99));
        }
        l.loaded_tcp_rtt_result = Some(
            log.lines()
                .find_map(|l| l.strip_prefix("result="))
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or("no result")
                .to_owned(),
        );
    }
    if let Ok(id) = ping {
        wait_exit(t, id, PROBE_EXIT);
        let mut rtts = measure::parse_ping(&t.log(id));
        rtts.sort_by(f64::total_cmp);
        if !rtts.is_empty() {
            l.loaded_ping_avg_ms = Some(rtts.iter().sum::<f64>() / rtts.len() as f64);
            l.loaded_ping_p99_ms = Some(measure::percentile(&rtts, 0.99));
        }
        let sent: u32 = count.parse().unwrap_or(0);
        l.loaded_ping_lost = Some(sent.saturating_sub(rtts.len() as u32));
    }
    l
}

/// How long a probe started beside the load may take to end after it.
const PROBE_EXIT: Duration = Duration::from_secs(5);

/// Waits up to `limit` for a process started beside the load to end, then stops it.
fn wait_exit(t: &Topology, id: ztna_e2e::DaemonId, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    while t.is_running(id) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if t.is_running(id) {
        let _ = t.kill(id);
    }
}

fn f1(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{v:.1}"))
}

fn ratio(v: Option<f64>, reference: Option<f64>) -> String {
    match (v, reference) {
        (Some(v), Some(r)) if r > 0.0 => format!("{:.2}×", v / r),
        _ => "—".into(),
    }
}

impl ProfilesReport {
    /// The tables in markdown.
    pub(crate) fn markdown(&self) -> String {
        let mut md = format!(
            "Profiles run `{}` from {} to {}; {} s per cell; machine: {} CPUs, Linux {}.\n\n",
            self.label,
            self.started_utc,
            self.finished_utc,
            self.secs,
            self.machine.nproc,
            self.machine.kernel
        );
        let get = |tunnel: &str, profile: &str, cc: &str| {
            self.cells
                .iter()
                .find(|c| c.tunnel == tunnel && c.profile == profile && c.cc == cc)
                .and_then(|c| c.mbps)
        };
        for cc in CCS {
            md += &if *cc == UDP_100 {
                "#### UDP at 100 Mbit/s, 1200-byte payloads (Mbit/s received; ratio to boringtun)\n\n"
                    .to_owned()
            } else if let (algo, true) = sender(cc) {
                format!(
                    "#### Single-stream TCP download (backend to agent), {algo} sender at the backend (Mbit/s received; ratio to boringtun)\n\n"
                )
            } else {
                format!(
                    "#### Single-stream TCP, {cc} sender (Mbit/s received; ratio to boringtun)\n\n"
                )
            };
            md += "| profile |";
            for tunnel in &self.tunnels {
                md += &format!(" {tunnel} |");
                if tunnel != paths::REFERENCE {
                    md += " × boringtun |";
                }
            }
            md += "\n|---|";
            for tunnel in &self.tunnels {
                md += "---:|";
                if tunnel != paths::REFERENCE {
                    md += "---:|";
                }
            }
            md += "\n";
            for profile in &self.profiles {
                md += &format!("| {} |", profile.name);
                let reference = get(paths::REFERENCE, profile.name, cc);
                for tunnel in &self.tunnels {
                    let v = get(tunnel, profile.name, cc);
                    md += &format!(" {} |", f1(v));
                    if tunnel != paths::REFERENCE {
                        md += &format!(" {} |", ratio(v, reference));
                    }
                }
                md += "\n";
            }
            md += "\n";
        }
        md += &format!(
            "#### Under load at the bottleneck ({})\n\n",
            BOTTLENECK.name
        );
        md += "The load's direction: from the agent, or to it for `-down` (a download). \
               TCP ping: one byte echoed every 100 ms on a TCP connection of its own.\n\n\
               | tunnel | sender | received (Mbit/s) | tunnel sent into the bottleneck (Mbit/s) | \
               bottleneck drops | longest queue (ms) | idle ping (ms) | ping under load: mean / p99 (ms) | pings lost | \
               TCP ping under load: mean / p99 (ms) |\n\
               |---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n";
        for l in &self.loaded {
            let tcp = match l.loaded_tcp_rtt_result.as_deref() {
                Some("done") | None => String::new(),
                Some(r) => format!(" ({r})"),
            };
            md += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} / {}{tcp} |\n",
                l.tunnel,
                l.sender,
                f1(l.received_mbps),
                f1(l.tunnel_sent_mbps),
                l.bottleneck_drops.map_or("—".into(), |d| d.to_string()),
                f1(l.max_queue_ms),
                f1(l.idle_ping_ms),
                f1(l.loaded_ping_avg_ms),
                f1(l.loaded_ping_p99_ms),
                l.loaded_ping_lost.map_or("—".into(), |d| d.to_string()),
                f1(l.loaded_tcp_rtt_avg_ms),
                f1(l.loaded_tcp_rtt_p99_ms),
            );
        }
        let errors: Vec<_> = self
            .cells
            .iter()
            .filter_map(|c| Some((c, c.error.as_deref()?)))
            .collect();
        md += &self.competing_markdown();
        md += &self.reference_markdown();
        md += &self.inner_markdown();
        let mut spoilt: Vec<(String, u64)> = self
            .cells
            .iter()
            .filter_map(|c| {
                let d = c.forwarder_drops.filter(|d| *d > 0)?;
                Some((format!("{} / {} / {}", c.tunnel, c.profile, c.cc), d))
            })
            .collect();
        spoilt.extend(self.competing.iter().filter_map(|c| {
            let d = c.forwarder_drops.filter(|d| *d > 0)?;
            Some((
                format!("{} and boringtun at once / {}", c.tunnel, c.sender),
                d,
            ))
        }));
        spoilt.extend(self.reference.iter().filter_map(|r| {
            let d = r.forwarder_drops.filter(|d| *d > 0)?;
            Some((
                format!("two boringtun flows / {} and {}", r.first, r.second),
                d,
            ))
        }));
        md += "\n#### The impairment forwarder's own drops\n\n";
        if spoilt.is_empty() {
            md += "None: the kernel dropped nothing on the forwarder's sockets in any cell.\n";
        } else {
            md += "Cells in which the kernel dropped datagrams on the forwarder's own sockets \
                   (loss the profile did not ask for):\n\n";
            for (what, drops) in spoilt {
                md += &format!("- {what}: {drops}\n");
            }
        }
        if !errors.is_empty() {
            md += "\n#### Failed cells\n\n";
            for (c, e) in errors {
                let first = e.lines().next().unwrap_or_default();
                md += &format!("- {} / {} / {}: {first}\n", c.tunnel, c.profile, c.cc);
            }
        }
        md
    }

    /// The competing flows, if they ran.
    fn competing_markdown(&self) -> String {
        if self.competing.is_empty() {
            return String::new();
        }
        let mut md = format!(
            "\n#### Sharing the bottleneck: a ztna flow and a boringtun flow at once ({})\n\n\
             Both tunnels up in one topology, their UDP through one forwarder and so one \
             bottleneck; one iperf3 flow through each, started together, {} s. Fair: a share \
             of 0.5, Jain's index 1 (0.5 when one flow gets everything). The senders: the \
             agent's TCP for uploads; for downloads (`-down`) the backend's, which for ztna \
             ends at the connector (its TCP stack carries the flow on from there).\n\n\
             | ztna tunnel | sender | ztna (Mbit/s) | boringtun (Mbit/s) | ztna's share | \
             Jain's index | bottleneck drops |\n|---|---|---:|---:|---:|---:|---:|\n",
            BOTTLENECK.name,
            self.competing.first().map_or(0, |c| c.secs)
        );
        for c in &self.competing {
            md += &pair_row(
                (&c.tunnel, &c.sender),
                (c.ztna_mbps, c.boringtun_mbps),
                c.bottleneck_drops,
                c.error.as_deref(),
            );
        }
        md
    }

    /// The reference pairs, if they ran.
    fn reference_markdown(&self) -> String {
        if self.reference.is_empty() {
            return String::new();
        }
        let mut md = format!(
            "\n#### For reference: two flows through boringtun at once ({})\n\n\
             The same topology and bottleneck, both iperf3 flows through boringtun, started \
             together, {} s: what the kernel's own TCP gets beside another flow here. A ztna \
             download crosses the bottleneck paced by the tunnel's controller, not by the \
             backend's TCP, so compare its rows above with a CUBIC flow beside a BBR one; a BBR \
             upload through ztna with a BBR flow beside another.\n\n\
             | first flow | second flow | first (Mbit/s) | second (Mbit/s) | first's share | \
             Jain's index | bottleneck drops |\n|---|---|---:|---:|---:|---:|---:|\n",
            BOTTLENECK.name,
            self.reference.first().map_or(0, |r| r.secs)
        );
        for r in &self.reference {
            md += &pair_row(
                (&r.first, &r.second),
                (r.first_mbps, r.second_mbps),
                r.bottleneck_drops,
                r.error.as_deref(),
            );
        }
        md
    }

    /// ztna's inner connection per profile (all senders together): the path it was on after
    /// each cell, its packets lost and the losses its controller counted as congestion.
    fn inner_markdown(&self) -> String {
        let ztna: Vec<&String> = self
            .tunnels
            .iter()
            .filter(|t| {
                self.cells
                    .iter()
                    .any(|c| &c.tunnel == *t && c.path.is_some())
            })
            .collect();
        if ztna.is_empty() {
            return String::new();
        }
        let mut md = String::from(
            "\n#### ztna's inner connection (all senders of a profile together)\n\n\
             | tunnel | profile | path after each cell | inner packets lost | of them counted as congestion |\n\
             |---|---|---|---:|---:|\n",
        );
        for tunnel in ztna {
            for profile in &self.profiles {
                let cells: Vec<&Cell> = self
                    .cells
                    .iter()
                    .filter(|c| &c.tunnel == tunnel && c.profile == profile.name)
                    .collect();
                let mut paths: Vec<&str> = cells.iter().filter_map(|c| c.path.as_deref()).collect();
                paths.dedup();
                let sum = |f: fn(&Cell) -> Option<u64>| -> String {
                    let v: Vec<u64> = cells.iter().filter_map(|c| f(c)).collect();
                    if v.is_empty() {
                        "—".into()
                    } else {
                        v.iter().sum::<u64>().to_string()
                    }
                };
                md += &format!(
                    "| {tunnel} | {} | {} | {} | {} |\n",
                    profile.name,
                    if paths.is_empty() {
                        "—".into()
                    } else {
                        paths.join(", ")
                    },
                    sum(|c| c.inner_lost),
                    sum(|c| c.inner_congestion_events),
                );
            }
        }
        md
    }

    /// Writes `profiles-<label>-<time>.json` and `profiles-<label>.md` into `dir`.
    pub(crate) fn write(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let stamp: String = self
            .started_utc
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let json = dir.join(format!("profiles-{}-{stamp}.json", self.label));
        std::fs::write(&json, serde_json::to_string_pretty(self)?)?;
        std::fs::write(
            dir.join(format!("profiles-{}.md", self.label)),
            self.markdown(),
        )?;
        Ok(json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_flows_share_and_fairness() {
        let even = (Some(22.5), Some(22.5));
        assert_eq!(share(even), Some(0.5));
        assert_eq!(jain(even), Some(1.0));
        let hog = (Some(45.0), Some(0.0));
        assert_eq!(share(hog), Some(1.0));
        assert_eq!(jain(hog), Some(0.5));
        assert_eq!(share((Some(10.0), Some(30.0))), Some(0.25));
        assert!((jain((Some(30.0), Some(15.0))).unwrap() - 0.9).abs() < 1e-9);
        // A failed flow is missing, not 0.
        assert_eq!(share((Some(30.0), None)), None);
        assert_eq!(jain((Some(0.0), Some(0.0))), None);
        assert_eq!(
            pair_row(
                ("cubic", "bbr"),
                (Some(10.0), None),
                Some(7),
                Some("second: timed out\nmore")
            ),
            "| cubic | bbr (second: timed out) | 10.0 | — | — | — | 7 |\n"
        );
    }

    #[test]
    fn reference_pairs_are_tcp_senders_in_one_direction_with_their_errors_named() {
        for (a, b) in REFERENCE_PAIRS {
            for cc in [a, b] {
                assert!(CCS.contains(cc) && *cc != UDP_100, "{cc}");
            }
            assert_eq!(sender(a).1, sender(b).1, "{a} and {b}");
        }
        let ok: Result<f64> = Ok(1.0);
        assert_eq!(pair_error(&ok, &Ok(2.0), ("a", "b")), None);
        let e = pair_error(&ok, &Err(anyhow::anyhow!("timed out")), ("a", "b"));
        assert_eq!(e.as_deref(), Some("b: timed out"));
    }

    #[test]
    fn only_selects_by_substring_or_prefix() {
        let names = |o: &str| -> Vec<&str> {
            PROFILES
                .iter()
                .filter(|p| selects(o, p.name))
                .map(|p| p.name)
                .collect()
        };
        assert_eq!(names("^0 ms"), ["0 ms, no loss"]);
        assert_eq!(names("^60 ms, 3 % loss"), ["60 ms, 3 % loss"]);
        let raw = |s: &str| selectors(&[s.to_owned()]);
        assert_eq!(raw("bottleneck,150 ms"), ["bottleneck", "150 ms"]);
        assert_eq!(raw("^60 ms, 3 % loss"), ["^60 ms, 3 % loss"]);
        assert_eq!(
            raw("^60 ms, 3 % loss,bottleneck,"),
            ["^60 ms, 3 % loss", "bottleneck"]
        );
        assert_eq!(selectors(&["a".into(), "b,c".into()]), ["a", "b", "c"]);
        assert_eq!(names("bottleneck"), [BOTTLENECK.name]);
        assert_eq!(names("150 ms").len(), 2);
        assert!(names("0 ms").len() > 5);
    }

    #[test]
    fn profile_arguments_parse_as_the_forwarder_expects() {
        assert_eq!(
            PROFILES[5].impair_args(),
            "--delay-ms 10 --loss-pct 1 --queue 65536"
        );
        assert_eq!(
            BOTTLENECK.impair_args(),
            "--delay-ms 10 --loss-pct 0 --queue 65536 --rate-mbit 50 --rate-queue-kb 64"
        );
        let mut names: Vec<_> = PROFILES.iter().map(|p| p.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), PROFILES.len());
    }
}
