//! Runs every path of [`crate::paths::PATHS`] `iterations` times, each time in a fresh
//! topology, and collects one [`Run`] per path and iteration. Iterations are the outer loop, so
//! a noisy minute spreads over every path instead of spoiling one.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use ztna_e2e::{addr, wait_until, HelperBins, Node, Topology};

use crate::measure::{self, Daemon, Iperf, IperfKind, Load, Ping, UdpResult};
use crate::paths::{PathSpec, PathUp};

/// How long and how often each test runs.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Plan {
    /// Runs of every path.
    pub(crate) iterations: u32,
    /// Seconds of each TCP test and of the unlimited-rate UDP test.
    pub(crate) secs: u32,
    /// Steps of the UDP rate bisection.
    pub(crate) udp_steps: u32,
    /// Seconds of each bisection step.
    pub(crate) udp_step_secs: u32,
    /// Pings per run.
    pub(crate) pings: u32,
    /// Busy fraction of all CPUs under which the machine counts as quiet.
    pub(crate) quiet_threshold: f64,
    /// Longest wait for quiet before each test, seconds.
    pub(crate) quiet_max_wait_s: u64,
}

/// The results of one path in one iteration. Whatever was measured before an error stays.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Run {
    /// Path name.
    pub(crate) path: String,
    /// 0-based iteration.
    pub(crate) iteration: u32,
    /// Why the run stopped early, if it did.
    pub(crate) error: Option<String>,
    /// Tests that failed twice without stopping the run (their metric is left out), by test.
    pub(crate) test_errors: BTreeMap<String, String>,
    /// Seconds from starting the agent side to the first echoed datagram.
    pub(crate) first_packet_s: Option<f64>,
    /// iperf3 TCP, one stream.
    pub(crate) tcp1: Option<Iperf>,
    /// iperf3 TCP, four streams.
    pub(crate) tcp4: Option<Iperf>,
    /// iperf3 UDP with 1200-byte payloads.
    pub(crate) udp: Option<UdpResult>,
    /// iperf3 UDP backend → agent (`-R`), 1200-byte payloads: at `-b 0`, and the highest rate
    /// with < 1 % loss.
    pub(crate) udp_down: Option<UdpResult>,
    /// The same with 64-byte payloads (the packet rate).
    pub(crate) udp_small: Option<UdpResult>,
    /// 100 pings.
    pub(crate) ping: Option<Ping>,
    /// Per test (`tcp1`, `tcp4`, `udp`): each daemon's CPU in percent of one core.
    pub(crate) cpu_percent: BTreeMap<String, BTreeMap<String, f64>>,
    /// Each daemon's peak RSS (VmHWM) at the end of the run, KiB.
    pub(crate) peak_rss_kib: BTreeMap<String, u64>,
    /// The machine's load before each test.
    pub(crate) load: BTreeMap<String, Load>,
}

/// The helper programs of `ztna-e2e`, next to the binaries under test.
pub(crate) fn helpers() -> HelperBins {
    HelperBins::in_dir(&ztna_e2e::bin_dir())
}

/// Every run of every available path.
pub(crate) fn run_all(paths: &[&PathSpec], plan: &Plan) -> Vec<Run> {
    let mut runs = Vec::new();
    for iteration in 0..plan.iterations {
        for spec in paths {
            eprintln!(
                "==> {} (iteration {}/{})",
                spec.name,
                iteration + 1,
                plan.iterations
            );
            let mut run = Run {
                path: spec.name.to_owned(),
                iteration,
                ..Run::default()
            };
            if let Err(e) = run_one(spec, plan, &mut run) {
                eprintln!("==> {} failed: {e:#}", spec.name);
                run.error = Some(format!("{e:#}"));
            }
            runs.push(run);
        }
    }
    runs
}

/// One path, one iteration, in its own topology (torn down when this returns, also on error).
fn run_one(spec: &PathSpec, plan: &Plan, run: &mut Run) -> Result<()> {
    let t = Topology::new(&format!("bench-{}", spec.name), helpers())?;
    let result = measure_path(&t, spec, plan, run);
    if result.is_ok() {
        t.mark_passed();
    }
    let prefix = t.prefix().to_owned();
    drop(t);
    // Userspace WireGuard leaves its UAPI socket behind when it is killed.
    for ifname in crate::paths::wg_ifnames(&prefix) {
        let _ = std::fs::remove_file(crate::paths::wg_socket(&ifname));
    }
    result
}

fn measure_path(t: &Topology, spec: &PathSpec, plan: &Plan, run: &mut Run) -> Result<()> {
    start_iperf_server(t)?;
    let PathUp {
        target,
        daemons,
        first_packet,
        keep: _keep,
        ..
    } = (spec.setup)(t)?;
    run.first_packet_s = first_packet.map(|d| d.as_secs_f64());
    let quiet = |run: &mut Run, test: &str| -> Result<()> {
        let load = measure::wait_quiet(
            plan.quiet_threshold,
            Duration::from_secs(plan.quiet_max_wait_s),
        )?;
        t.step(&format!(
            "{test}: load {:.2}, {:.0} % busy{}",
            load.loadavg_1m,
            load.busy * 100.0,
            if load.quiet { "" } else { " (not quiet)" }
        ));
        run.load.insert(test.to_owned(), load);
        Ok(())
    };
    let record_cpu = |run: &mut Run, test: &str, pct: Vec<f64>| {
        run.cpu_percent.insert(
            test.to_owned(),
            daemons
                .iter()
                .zip(pct)
                .map(|(d, p)| (d.name.clone(), p))
                .collect(),
        );
    };

    for (test, streams) in [("tcp1", 1), ("tcp4", 4)] {
        quiet(run, test)?;
        let (r, cpu) = measure::with_cpu(&daemons, || {
            measure::iperf(t, target, IperfKind::Tcp { streams }, plan.secs)
        })?;
        t.step(&format!("{test}: {:.0} Mbit/s", r.mbps));
        match streams {
            1 => run.tcp1 = Some(r),
            _ => run.tcp4 = Some(r),
        }
        record_cpu(run, test, cpu);
    }

    quiet(run, "udp")?;
    let (r, cpu) = measure::with_cpu(&daemons, || {
        measure::udp(t, target, plan.secs, plan.udp_steps, plan.udp_step_secs)
    })?;
    t.step(&format!(
        "udp: {:.0} Mbit/s received at -b 0 ({:.1} % loss), {:.0} Mbit/s with < 1 % loss",
        r.unlimited.mbps,
        r.unlimited.loss_percent.unwrap_or(f64::NAN),
        r.max_ok.as_ref().map_or(f64::NAN, |m| m.mbps)
    ));
    run.udp = Some(r);
    record_cpu(run, "udp", cpu);

    for (test, len) in [
        ("udp_down", measure::UDP_PAYLOAD),
        ("udp_small", measure::SMALL_PAYLOAD),
    ] {
        quiet(run, test)?;
        // A reverse flood at `-b 0` can starve iperf3's own control connection through a
        // tunnel ("unable to read from stream socket"); such a test is tried once more and
        // then recorded as failed without losing the rest of the run.
        let kind = |mbps| IperfKind::UdpDown { len, mbps };
        let attempt =
            || measure::with_cpu(&daemons, || measure::iperf(t, target, kind(0.0), plan.secs));
        let (r, cpu) = match attempt().or_else(|_| attempt()) {
            Ok(v) => v,
            Err(e) => {
                t.step(&format!("{test}: failed twice: {e:#}"));
                run.test_errors.insert(test.to_owned(), format!("{e:#}"));
                continue;
            }
        };
        let r = measure::sweep(t, target, r, plan.udp_steps, plan.udp_step_secs, kind);
        let kpps = |mbps: f64| mbps * 1e3 / f64::from(len * 8);
        let ok = r.max_ok.as_ref().map_or(f64::NAN, |m| m.mbps);
        t.step(&format!(
            "{test}: {:.0} Mbit/s ({:.0} kpkt/s) backend → agent at -b 0, {:.1} % loss; {:.0} Mbit/s ({:.0} kpkt/s) with < 1 % loss",
            r.unlimited.mbps,
            kpps(r.unlimited.mbps),
            r.unlimited.loss_percent.unwrap_or(f64::NAN),
            ok,
            kpps(ok)
        ));
        match len {
            measure::UDP_PAYLOAD => run.udp_down = Some(r),
            _ => run.udp_small = Some(r),
        }
        record_cpu(run, test, cpu);
    }

    quiet(run, "ping")?;
    let p = measure::ping(t, target, plan.pings)?;
    t.step(&format!(
        "ping: avg {:.3} ms, p99 {:.3} ms",
        p.avg_ms, p.p99_ms
    ));
    run.ping = Some(p);

    record_peak_rss(run, &daemons);
    Ok(())
}

fn record_peak_rss(run: &mut Run, daemons: &[Daemon]) {
    for d in daemons {
        if let Ok(kib) = ztna_e2e::peak_rss_kib(d.pid) {
            run.peak_rss_kib.insert(d.name.clone(), kib);
        }
    }
}

/// `iperf3 -s` on the backend (10.10.3.2:5201), waited for until it listens.
pub(crate) fn start_iperf_server(t: &Topology) -> Result<()> {
    start_iperf_server_on(t, measure::IPERF_PORT)
}

/// `iperf3 -s` on the backend's `port`, waited for until it listens (an iperf3 server runs
/// one test at a time: two flows at once need two).
pub(crate) fn start_iperf_server_on(t: &Topology, port: u16) -> Result<()> {
    let port = port.to_string();
    let id = t.spawn(
        Node::Backend,
        &format!("iperf3-server-{port}"),
        "iperf3",
        ["-s", "-B", addr::BACKEND, "-p", &port],
    )?;
    let filter = format!("sport = :{port}");
    wait_until(
        "iperf3 to listen in the backend namespace",
        Duration::from_secs(10),
        || {
            !t.is_running(id)
                || t.run(Node::Backend, 5, ["ss", "-Hltn", &filter])
                    .is_ok_and(|o| o.success() && !o.stdout.trim().is_empty())
        },
    )?;
    t.ensure_running(id)
}
