//! The measurements themselves: iperf3 and ping run in the agent namespace and parsed, the
//! machine's background load, and the CPU and memory of the tunnel daemons from `/proc`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use ztna_e2e::{Node, Topology};

/// The iperf3 server's port (in the backend namespace).
pub(crate) const IPERF_PORT: u16 = 5201;
/// A second iperf3 server's port on the backend, for two flows at once.
pub(crate) const IPERF_PORT_2: u16 = 5202;
/// UDP payload of the UDP tests: a 1228-byte IP packet fits the 1280-byte tunnel MTU.
pub(crate) const UDP_PAYLOAD: u32 = 1200;
/// UDP payload of the small-packet test (packet rate rather than bytes).
pub(crate) const SMALL_PAYLOAD: u32 = 64;
/// Loss below which a UDP rate counts as carried.
pub(crate) const UDP_LOSS_OK_PERCENT: f64 = 1.0;

/// The machine's load when a test started.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Load {
    /// 1-minute load average from `/proc/loadavg`.
    pub(crate) loadavg_1m: f64,
    /// Fraction of all CPUs busy over the last second before the test (0..1).
    pub(crate) busy: f64,
    /// How long we waited for the machine to be quiet, in seconds.
    pub(crate) waited_s: f64,
    /// Whether it became quieter than the threshold before the wait ran out.
    pub(crate) quiet: bool,
}

/// (busy, total) jiffies of all CPUs from the first line of `/proc/stat`.
fn cpu_jiffies() -> Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_cpu_line(text.lines().next().unwrap_or_default()).context("no cpu line in /proc/stat")
}

fn parse_cpu_line(line: &str) -> Option<(u64, u64)> {
    let mut words = line.split_whitespace();
    if words.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = words.filter_map(|w| w.parse().ok()).collect();
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal ...; idle and iowait are not busy.
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    Some((total - idle, total))
}

fn loadavg_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|w| w.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// The busy fraction of all CPUs over `window`.
fn busy_over(window: Duration) -> Result<f64> {
    let (b0, t0) = cpu_jiffies()?;
    std::thread::sleep(window);
    let (b1, t1) = cpu_jiffies()?;
    let dt = t1.saturating_sub(t0);
    Ok(if dt == 0 {
        0.0
    } else {
        b1.saturating_sub(b0) as f64 / dt as f64
    })
}

/// Waits (at most `max_wait`) until the CPUs were less than `threshold` busy over one second,
/// and returns the load it saw last, whether or not it got quiet.
pub(crate) fn wait_quiet(threshold: f64, max_wait: Duration) -> Result<Load> {
    let start = Instant::now();
    loop {
        let busy = busy_over(Duration::from_secs(1))?;
        let quiet = busy < threshold;
        if quiet || start.elapsed() >= max_wait {
            return Ok(Load {
                loadavg_1m: loadavg_1m(),
                busy,
                waited_s: start.elapsed().as_secs_f64(),
                quiet,
            });
        }
    }
}

/// One iperf3 run.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Iperf {
    /// Received rate, Mbit/s.
    pub(crate) mbps: f64,
    /// TCP retransmits (sender side).
    pub(crate) retransmits: Option<u64>,
    /// UDP loss, percent.
    pub(crate) loss_percent: Option<f64>,
    /// UDP rate asked for, Mbit/s (0: unlimited).
    pub(crate) target_mbps: Option<f64>,
}

/// What kind of iperf3 test to run.
#[derive(Debug, Clone, Copy)]
pub(crate) enum IperfKind {
    /// TCP with this many parallel streams.
    Tcp { streams: u32 },
    /// One TCP stream with this sender congestion control (`iperf3 -C`: `cubic`, `bbr`).
    TcpCc { cc: &'static str },
    /// The same from the backend to the agent (`-R`): the backend's TCP sends with `cc`.
    TcpCcDown { cc: &'static str },
    /// UDP with 1200-byte payloads at this rate in Mbit/s (0: as fast as iperf3 can send).
    Udp { mbps: f64 },
    /// UDP from the backend to the agent (`-R`) with `len`-byte payloads at this rate in Mbit/s
    /// (0: as fast as iperf3 can send): the direction of backend replies, which the
    /// connector's XDP fast path carries.
    UdpDown { len: u32, mbps: f64 },
}

/// Runs iperf3 from the agent namespace to `target` for `secs` seconds and parses its JSON.
pub(crate) fn iperf(t: &Topology, target: &str, kind: IperfKind, secs: u32) -> Result<Iperf> {
    iperf_on(t, target, IPERF_PORT, kind, secs)
}

/// [`iperf`] against the server on `port`.
pub(crate) fn iperf_on(
    t: &Topology,
    target: &str,
    port: u16,
    kind: IperfKind,
    secs: u32,
) -> Result<Iperf> {
    let args = iperf_args(target, port, kind, secs);
    let out = t.run(Node::Agent, secs + 20, &args)?;
    if !out.success() {
        bail!("{out}");
    }
    iperf_result(&args, &out.stdout, kind).with_context(|| format!("parsing the output of {out}"))
}

/// The iperf3 client's command line for `kind` against the server at `target`:`port`.
pub(crate) fn iperf_args(target: &str, port: u16, kind: IperfKind, secs: u32) -> Vec<String> {
    let mut args: Vec<String> = [
        "iperf3",
        "-c",
        target,
        "-p",
        &port.to_string(),
        "-t",
        &secs.to_string(),
        "-J",
        "--connect-timeout",
        "5000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    match kind {
        IperfKind::Tcp { streams } => args.extend(["-P".into(), streams.to_string()]),
        IperfKind::TcpCc { cc } => args.extend(["-C".into(), cc.into()]),
        IperfKind::TcpCcDown { cc } => args.extend(["-C".into(), cc.into(), "-R".into()]),
        IperfKind::Udp { mbps } => args.extend([
            "-u".into(),
            "-l".into(),
            UDP_PAYLOAD.to_string(),
            "-b".into(),
            format!("{}", (mbps * 1e6) as u64),
        ]),
        IperfKind::UdpDown { len, mbps } => args.extend([
            "-u".into(),
            "-R".into(),
            "-l".into(),
            len.to_string(),
            "-b".into(),
            format!("{}", (mbps * 1e6) as u64),
        ]),
    }
    args
}

/// Parses the JSON that the client run with `args` (from [`iperf_args`]) printed.
pub(crate) fn iperf_result(args: &[String], json: &str, kind: IperfKind) -> Result<Iperf> {
    dump_iperf(args, json);
    let mut r = parse_iperf(json)?;
    if let IperfKind::Udp { mbps } = kind {
        r.target_mbps = Some(mbps);
    }
    Ok(r)
}

/// With `ZTNA_BENCH_IPERF_DUMP=DIR`, keeps each iperf3 run's JSON (its per-second intervals
/// show how a flow ramps) as `DIR/<unix ms>.json`, with the command line in `cmd`.
fn dump_iperf(args: &[String], json: &str) {
    let Some(dir) = std::env::var_os("ZTNA_BENCH_IPERF_DUMP") else {
        return;
    };
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let path = std::path::Path::new(&dir).join(format!("{ms}.json"));
    let doc = serde_json::json!({ "cmd": args.join(" "), "iperf": serde_json::from_str::<serde_json::Value>(json).ok() });
    if let Err(e) = std::fs::write(&path, doc.to_string()) {
        eprintln!("could not keep iperf3's output in {}: {e}", path.display());
    }
}

fn parse_iperf(json: &str) -> Result<Iperf> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 printed no JSON")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {e}");
    }
    let end = v.get("end").context("no `end` in iperf3's JSON")?;
    let received = end
        .get("sum_received")
        .context("no `end.sum_received` in iperf3's JSON")?;
    let mbps = received
        .get("bits_per_second")
        .and_then(|b| b.as_f64())
        .context("no received bits_per_second")?
        / 1e6;
    let retransmits = end
        .get("sum_sent")
        .and_then(|s| s.get("retransmits"))
        .and_then(|r| r.as_u64());
    let loss_percent = received.get("lost_percent").and_then(|l| l.as_f64());
    Ok(Iperf {
        mbps,
        retransmits,
        loss_percent,
        target_mbps: None,
    })
}

/// The UDP results of one run: unlimited rate, and the highest rate carried with < 1 % loss.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct UdpResult {
    /// At `-b 0`: what arrived, and the loss.
    pub(crate) unlimited: Iperf,
    /// The highest swept rate that lost less than [`UDP_LOSS_OK_PERCENT`] (its received rate).
    pub(crate) max_ok: Option<Iperf>,
    /// Every step of the sweep.
    pub(crate) sweep: Vec<Iperf>,
}

/// UDP agent → backend: one run at unlimited rate, then a bisection between 0 and 1.1 × what
/// arrived there for the highest rate with less than 1 % loss, `steps` short runs of
/// `step_secs` each.
pub(crate) fn udp(
    t: &Topology,
    target: &str,
    secs: u32,
    steps: u32,
    step_secs: u32,
) -> Result<UdpResult> {
    let unlimited = iperf(t, target, IperfKind::Udp { mbps: 0.0 }, secs)?;
    Ok(sweep(t, target, unlimited, steps, step_secs, |mbps| {
        IperfKind::Udp { mbps }
    }))
}

/// The bisection of [`udp`] after its unlimited run, with the tests `kind` makes for a rate.
/// A step that loses 1 % or more (or fails) is run a second time, and counts as carried if
/// that run stays under the limit. A step whose second run fails (iperf3 lost its control connection under the load, say)
/// counts as one that did not stay under the limit, and is left out of the sweep.
pub(crate) fn sweep(
    t: &Topology,
    target: &str,
    unlimited: Iperf,
    steps: u32,
    step_secs: u32,
    kind: impl Fn(f64) -> IperfKind,
) -> UdpResult {
    let (mut lo, mut hi) = (0.0f64, (unlimited.mbps * 1.1).max(1.0));
    let mut best: Option<Iperf> = None;
    let mut sweep = Vec::new();
    for _ in 0..steps {
        let mid = (lo + hi) / 2.0;
        // A step that loses too much (or fails) is run once more, and the second run decides:
        // one burst of loss on this shared machine should not halve the rest of the search.
        let run = || iperf(t, target, kind(mid), step_secs);
        let result = match run() {
            Ok(r) if r.loss_percent.unwrap_or(100.0) < UDP_LOSS_OK_PERCENT => Ok(r),
            Ok(r) => {
                sweep.push(r);
                run()
            }
            Err(_) => run(),
        };
        match result {
            Ok(r) if r.loss_percent.unwrap_or(100.0) < UDP_LOSS_OK_PERCENT => {
                lo = mid;
                if best.as_ref().is_none_or(|b| r.mbps > b.mbps) {
                    best = Some(r.clone());
                }
                sweep.push(r);
            }
            Ok(r) => {
                hi = mid;
                sweep.push(r);
            }
            Err(e) => {
                t.step(&format!("UDP at {mid:.0} Mbit/s failed: {e:#}"));
                hi = mid;
            }
        }
    }
    UdpResult {
        unlimited,
        max_ok: best,
        sweep,
    }
}

/// Ping round-trip times.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Ping {
    /// Pings sent.
    pub(crate) sent: u32,
    /// Answers received.
    pub(crate) received: u32,
    /// Mean RTT, ms.
    pub(crate) avg_ms: f64,
    /// 99th percentile RTT (nearest rank), ms.
    pub(crate) p99_ms: f64,
}

/// `count` pings 50 ms apart from the agent namespace to `target`.
pub(crate) fn ping(t: &Topology, target: &str, count: u32) -> Result<Ping> {
    let n = count.to_string();
    let out = t.run(
        Node::Agent,
        20 + count / 10,
        ["ping", "-n", "-c", &n, "-i", "0.05", "-W", "2", target],
    )?;
    let mut rtts = parse_ping(&out.stdout);
    if rtts.is_empty() {
        bail!("no ping was answered: {out}");
    }
    rtts.sort_by(f64::total_cmp);
    Ok(Ping {
        sent: count,
        received: rtts.len() as u32,
        avg_ms: rtts.iter().sum::<f64>() / rtts.len() as f64,
        p99_ms: percentile(&rtts, 0.99),
    })
}

/// The RTTs (`time=0.123 ms`) of every answered ping in ping's output.
pub(crate) fn parse_ping(stdout: &str) -> Vec<f64> {
    stdout
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// Nearest-rank percentile of sorted values (`q` in 0..=1).
pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A tunnel daemon whose CPU and memory are measured.
#[derive(Debug, Clone)]
pub(crate) struct Daemon {
    /// What it is (`relay`, `agent-side boringtun`, ...).
    pub(crate) name: String,
    /// Its process id.
    pub(crate) pid: u32,
}

/// CPU seconds of each daemon now (0 for one that is gone).
pub(crate) fn cpu_snapshot(daemons: &[Daemon]) -> Vec<f64> {
    daemons
        .iter()
        .map(|d| ztna_e2e::cpu_seconds(d.pid).unwrap_or(0.0))
        .collect()
}

/// Runs `f` and returns its result with the CPU each daemon used meanwhile, in percent of one
/// core over the wall time of `f`.
pub(crate) fn with_cpu<T>(
    daemons: &[Daemon],
    f: impl FnOnce() -> Result<T>,
) -> Result<(T, Vec<f64>)> {
    let before = cpu_snapshot(daemons);
    let start = Instant::now();
    let r = f()?;
    let wall = start.elapsed().as_secs_f64().max(1e-3);
    let after = cpu_snapshot(daemons);
    let pct = before
        .iter()
        .zip(&after)
        .map(|(b, a)| 100.0 * (a - b).max(0.0) / wall)
        .collect();
    Ok((r, pct))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_line_counts_idle_and_iowait_as_not_busy() {
        let (busy, total) = parse_cpu_line("cpu  10 0 10 70 10 0 0 0 0 0").expect("parses");
        assert_eq!((busy, total), (20, 100));
        assert!(parse_cpu_line("intr 1 2 3").is_none());
    }

    #[test]
    fn ping_rtts_and_percentiles() {
        let out = "PING 10.0.0.1 (10.0.0.1) 56(84) bytes of data.\n\
                   64 bytes from 10.0.0.1: icmp_seq=1 ttl=64 time=0.250 ms\n\
                   64 bytes from 10.0.0.1: icmp_seq=2 ttl=64 time=1.50 ms\n\
                   --- 10.0.0.1 ping statistics ---\n\
                   rtt min/avg/max/mdev = 0.250/0.875/1.500/0.625 ms\n";
        assert_eq!(parse_ping(out), vec![0.25, 1.5]);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[3.0], 0.99), 3.0);
    }

    #[test]
    fn iperf_json_received_rate_retransmits_and_loss() {
        let tcp = r#"{"end":{"sum_sent":{"bits_per_second":2e9,"retransmits":7},
                      "sum_received":{"bits_per_second":1.5e9}}}"#;
        let r = parse_iperf(tcp).expect("parses");
        assert_eq!((r.mbps, r.retransmits), (1500.0, Some(7)));
        let udp = r#"{"end":{"sum_sent":{"bits_per_second":5e9},
                      "sum_received":{"bits_per_second":1e9,"lost_percent":80.0}}}"#;
        let r = parse_iperf(udp).expect("parses");
        assert_eq!((r.mbps, r.loss_percent), (1000.0, Some(80.0)));
        assert!(parse_iperf(r#"{"error":"unable to connect"}"#).is_err());
    }
}
