//! `ztna-bench`: measures every path of [`paths::PATHS`] (raw veth, WireGuard implementations,
//! ztna) on the namespace topology of `deploy/netns/topo.sh`, then the relay-scale simulation
//! and the relay-fleet simulation (three relays), and writes JSON and markdown under `--out` (and the PNG chart, through `bench/chart.py`,
//! when `bench/run.sh` runs it). Needs root; `bench/run.sh` builds and installs what it needs.
//! See `bench/README.md`.

mod measure;
mod paths;
mod profiles;
mod relay_fleet;
mod relay_forward;
mod relay_scale;
mod report;
mod runner;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;

/// Benchmarks ztna against a raw veth, boringtun and wireguard-go, and the relay at scale.
#[derive(Debug, Parser)]
#[command(name = "ztna-bench")]
struct Args {
    /// One short iteration of every path, a small relay-scale run and a small relay fleet (what
    /// CI runs).
    #[arg(long)]
    smoke: bool,
    /// Runs of every path (default 3; 1 with --smoke).
    #[arg(long)]
    iterations: Option<u32>,
    /// Seconds of each TCP test and of the unlimited-rate UDP test (default 10; 2 with --smoke).
    #[arg(long)]
    secs: Option<u32>,
    /// Only these paths (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// Agent counts of the relay-scale benchmark (default 100,1000,5000; 50 with --smoke) and
    /// of the relay-fleet benchmark (default 1000; 30 with --smoke).
    #[arg(long, value_delimiter = ',')]
    agents: Vec<usize>,
    /// Skip the path benchmark.
    #[arg(long)]
    no_paths: bool,
    /// Skip the relay-scale benchmark.
    #[arg(long)]
    no_relay_scale: bool,
    /// Skip relay forwarding on a veth per `xdp` mode (off, generic, native).
    #[arg(long)]
    no_relay_forward: bool,
    /// Skip the relay-fleet benchmark (three relays; every agent with a session with each).
    #[arg(long)]
    no_fleet: bool,
    /// How the fleet's agents pick the relay of their channel: `nearest` (as the agent does:
    /// the first relay to answer unless another is clearly nearer), `round-robin`; several
    /// comma-separated run one after the other (default nearest).
    #[arg(long, value_delimiter = ',', value_enum)]
    fleet_spread: Vec<relay_fleet::Spread>,
    /// Instead of the usual tests: single-stream TCP (CUBIC and BBR senders) through each
    /// tunnel under impaired path conditions (`bench/src/profiles.rs`); `--paths` picks the
    /// tunnels (default boringtun,wireguard-go,ztna-relay), `--secs` the seconds per cell
    /// (default 5).
    #[arg(long)]
    profiles: bool,
    /// `--profiles`: only the profiles whose name contains one of these, or starts with it
    /// when it starts with `^` (`^0 ms`: the 0 ms profile alone). Separated by commas not
    /// followed by a space (`bottleneck,^60 ms, 3 % loss`: two), or by giving `--only` again.
    #[arg(long)]
    only: Vec<String>,
    /// Names the `--profiles` output files (`profiles-LABEL.md`).
    #[arg(long, default_value = "latest")]
    label: String,
    /// Where the results go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ztna_e2e::require_root()?;
    let smoke = args.smoke;
    let plan = runner::Plan {
        iterations: args.iterations.unwrap_or(if smoke { 1 } else { 3 }),
        secs: args.secs.unwrap_or(if smoke { 2 } else { 10 }),
        udp_steps: if smoke { 2 } else { 5 },
        udp_step_secs: if smoke { 1 } else { 3 },
        pings: if smoke { 10 } else { 100 },
        quiet_threshold: 0.25,
        quiet_max_wait_s: if smoke { 3 } else { 15 },
    };
    if args.profiles {
        let tunnels: Vec<String> = if args.paths.is_empty() {
            profiles::TUNNELS.iter().map(|s| s.to_string()).collect()
        } else {
            args.paths.clone()
        };
        if let Some(t) = tunnels
            .iter()
            .find(|t| !profiles::TUNNELS_ALL.contains(&t.as_str()))
        {
            bail!(
                "unknown tunnel {t:?} for --profiles; they are: {}",
                profiles::TUNNELS_ALL.join(", ")
            );
        }
        let report = profiles::run(
            &tunnels,
            args.secs.unwrap_or(5),
            &args.label,
            &profiles::selectors(&args.only),
        );
        let file = report.write(&args.out)?;
        println!("{}", report.markdown());
        eprintln!("==> wrote {}", file.display());
        return Ok(());
    }
    for p in &args.paths {
        if !paths::PATHS.iter().any(|s| s.name == p) {
            bail!(
                "unknown path {p:?}; the paths are: {}",
                paths::PATHS
                    .iter()
                    .map(|s| s.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let started_utc = report::now_utc();
    let mut skipped = Vec::new();
    let mut selected = Vec::new();
    if !args.no_paths {
        for spec in paths::PATHS {
            if !args.paths.is_empty() && !args.paths.iter().any(|p| p == spec.name) {
                continue;
            }
            match (spec.unavailable)() {
                Some(reason) => {
                    eprintln!("==> skipping {}: {reason}", spec.name);
                    skipped.push(report::Skipped {
                        path: spec.name.into(),
                        reason,
                    });
                }
                None => selected.push(spec),
            }
        }
    }
    let runs = runner::run_all(&selected, &plan);
    let names: Vec<&str> = selected.iter().map(|s| s.name).collect();
    let summary = report::summarise(&names, &runs);
    let ratios = report::ratios(&summary);

    let relay_forward = if args.no_relay_forward {
        None
    } else {
        let plan = relay_scale::ScalePlan {
            // Ten senders and one latency probe.
            agents: vec![11],
            steady_secs: 1,
            blast_secs: if smoke { 1 } else { 5 },
            blast_agents: 10,
            rate_pps: 50_000,
        };
        let dir = tempfile::Builder::new()
            .prefix("ztna-bench-forward-")
            .tempdir()
            .context("creating a temporary directory")?;
        Some(relay_forward::run(&plan, dir.path())?)
    };

    let relay_scale = if args.no_relay_scale {
        None
    } else {
        let plan = relay_scale::ScalePlan {
            agents: if !args.agents.is_empty() {
                args.agents.clone()
            } else if smoke {
                vec![50]
            } else {
                vec![100, 1000, 5000]
            },
            steady_secs: if smoke { 2 } else { 10 },
            blast_secs: if smoke { 1 } else { 5 },
            blast_agents: 10,
            rate_pps: 50_000,
        };
        let dir = tempfile::Builder::new()
            .prefix("ztna-bench-scale-")
            .tempdir()
            .context("creating a temporary directory")?;
        Some(relay_scale::run(&plan, dir.path())?)
    };

    let relay_fleet = if args.no_fleet {
        None
    } else {
        let plan = relay_fleet::FleetPlan {
            agents: if !args.agents.is_empty() {
                args.agents.clone()
            } else if smoke {
                vec![30]
            } else {
                vec![1000]
            },
            spread: if args.fleet_spread.is_empty() {
                vec![relay_fleet::Spread::Nearest]
            } else {
                args.fleet_spread.clone()
            },
            steady_secs: if smoke { 1 } else { 5 },
            quiet_max_wait_s: plan.quiet_max_wait_s,
        };
        let dir = tempfile::Builder::new()
            .prefix("ztna-bench-fleet-")
            .tempdir()
            .context("creating a temporary directory")?;
        Some(relay_fleet::run(&plan, dir.path())?)
    };

    let report = report::Report {
        started_utc,
        finished_utc: report::now_utc(),
        smoke,
        machine: report::Machine::read(),
        plan,
        reference: paths::REFERENCE,
        paths: selected
            .iter()
            .map(|s| report::PathInfo {
                name: s.name.into(),
                hops: s.hops.into(),
            })
            .collect(),
        skipped,
        runs,
        summary,
        ratios,
        relay_scale,
        relay_forward,
        relay_fleet,
    };
    let file = report.write(&args.out)?;
    println!("{}", report.markdown());
    eprintln!(
        "==> wrote {} and {}",
        file.display(),
        args.out.join("latest.md").display()
    );
    let failed = report.runs.iter().filter(|r| r.error.is_some()).count()
        + report
            .relay_scale
            .as_ref()
            .map_or(0, |r| r.runs.iter().filter(|r| r.error.is_some()).count())
        + report
            .relay_forward
            .as_ref()
            .map_or(0, |r| r.modes.iter().filter(|m| m.error.is_some()).count())
        + report
            .relay_fleet
            .as_ref()
            .map_or(0, |r| r.runs.iter().filter(|r| r.error.is_some()).count());
    if failed > 0 {
        bail!("{failed} run(s) failed; see the report");
    }
    Ok(())
}
