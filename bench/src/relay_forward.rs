//! Relay forwarding on a veth, XDP against userspace: the relay-scale simulation's forwarding
//! phases ([`relay_scale`]) with the relay in a network namespace of its own, reached over a
//! veth pair from the simulator's namespace, once per `xdp` mode (`off`, `generic`, `native`).
//!
//! ```text
//!   ztnab-fwd-sim-PID                 ztnab-fwd-relay-PID
//!   simulator (this process)   veth   ztna-relay
//!   fs0 10.78.0.2/24  ─────────────── fr0 10.78.0.1/24 (XDP program here)
//! ```
//!
//! Channel data goes from the agents' socket to the relay and back out of the same veth to the
//! connector's socket, so XDP forwards it with `XDP_TX`. For native mode the simulator's end
//! gets an XDP program of its own that passes everything
//! ([`ztna_relay::xdp::attach_pass_through`]): a veth delivers frames its peer sends with native
//! `XDP_TX` only then (with GRO on instead, the kernel queues them and never delivers them).
//!
//! XDP runs in softirq context, not in the relay process, so each phase reports the softirq
//! time of every CPU beside the relay's own CPU time; on a veth both include the senders' and
//! the receiver's kernel work, the same in every mode.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::relay_scale::{self, Phase, Placement, ScalePlan, ScaleRun};

const SIM_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
const RELAY_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);

/// The results of every mode.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RelayForward {
    pub(crate) plan: ScalePlan,
    pub(crate) modes: Vec<ModeRun>,
}

/// One mode's run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ModeRun {
    /// `off`, `generic` or `native`.
    pub(crate) mode: String,
    /// Why it was not measured or failed.
    pub(crate) error: Option<String>,
    pub(crate) run: Option<ScaleRun>,
}

/// Two namespaces joined by a veth; deleted on drop (with everything in them).
struct Netns {
    sim: String,
    relay: String,
}

impl Netns {
    fn create() -> Result<Self> {
        let pid = std::process::id();
        let ns = Self {
            sim: format!("ztnab-fwd-sim-{pid}"),
            relay: format!("ztnab-fwd-relay-{pid}"),
        };
        for n in [&ns.sim, &ns.relay] {
            ip(&["netns", "add", n])?;
            ip(&["-n", n, "link", "set", "lo", "up"])?;
        }
        ip(&[
            "-n", &ns.sim, "link", "add", "fs0", "type", "veth", "peer", "name", "fr0", "netns",
            &ns.relay,
        ])?;
        ip(&["-n", &ns.sim, "addr", "add", "10.78.0.2/24", "dev", "fs0"])?;
        ip(&["-n", &ns.relay, "addr", "add", "10.78.0.1/24", "dev", "fr0"])?;
        ip(&["-n", &ns.sim, "link", "set", "fs0", "up"])?;
        ip(&["-n", &ns.relay, "link", "set", "fr0", "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in [&self.sim, &self.relay] {
            let _ = ip(&["netns", "del", n]);
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs the forwarding phases once per mode; `dir` holds PKI, configs and logs.
pub(crate) fn run(plan: &ScalePlan, dir: &Path) -> Result<RelayForward> {
    let ns = Netns::create()?;
    // The kernel's BPF run-time statistics, on while this is held (two clock reads per program
    // run, for every program on the machine).
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| eprintln!("==> BPF run-time statistics unavailable: {e}"))
        .ok();
    let mut modes = Vec::new();
    for mode in ["off", "generic", "native"] {
        eprintln!("==> relay forwarding on a veth, xdp = {mode}");
        let mut m = ModeRun {
            mode: mode.into(),
            error: None,
            run: None,
        };
        if mode == "native" {
            let gro = Command::new("ip")
                .args([
                    "netns", "exec", &ns.sim, "ethtool", "-K", "fs0", "gro", "on",
                ])
                .output();
            match gro {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    m.error = Some(format!(
                        "ethtool -K fs0 gro on failed: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    ));
                }
                Err(e) => m.error = Some(format!("ethtool is missing: {e}")),
            }
        }
        if m.error.is_none() {
            let mut at = Placement {
                relay_netns: Some(ns.relay.clone()),
                relay_ip: RELAY_IP,
                sim_ip: SIM_IP,
                xdp: Some(mode.into()),
                not_the_relays_program: None,
            };
            let sub = dir.join(mode);
            std::fs::create_dir_all(&sub)?;
            let sim = ns.sim.clone();
            let result = std::thread::scope(|s| {
                s.spawn(|| -> Result<relay_scale::RelayScale> {
                    ztna_e2e::enter_netns(&sim)?;
                    let _peer = if mode == "native" {
                        let peer = ztna_relay::xdp::attach_pass_through(
                            "fs0",
                            ztna_xdp_loader::Attached::Native,
                        )
                        .context("attaching a pass-through XDP program to fs0")?;
                        at.not_the_relays_program = peer.program_id();
                        Some(peer)
                    } else {
                        None
                    };
                    relay_scale::run_in(plan, &sub, &at)
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the simulator thread panicked"))?
            });
            match result {
                Ok(mut r) => {
                    let run = r.runs.pop();
                    m.error = run.as_ref().and_then(|r| r.error.clone());
                    m.run = run;
                }
                Err(e) => m.error = Some(format!("{e:#}")),
            }
        }
        if let Some(e) = &m.error {
            eprintln!("==> xdp = {mode}: {e}");
        }
        modes.push(m);
    }
    Ok(RelayForward {
        plan: plan.clone(),
        modes,
    })
}

impl RelayForward {
    /// The markdown section of `latest.md`.
    pub(crate) fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "## Relay forwarding on a veth: XDP against userspace\n\n\
             The relay in a network namespace of its own, the simulator ({} agents sending 1200-byte channel \
             datagrams to one connector, and one more agent whose 100-byte probe the connector echoes every 10 ms: \
             the latency another channel sees) in another, one veth between them; the relay's forwarding phases \
             as above, once per `xdp` mode. Received is what the connector's socket got. XDP runs in softirq, \
             so softirq (every CPU, % of one core; it includes the senders' and the receiver's kernel work on \
             the veth, the same in every mode) is shown beside the relay process's CPU; cost per datagram is \
             (relay CPU + softirq) over datagrams received. In generic mode a GSO batch from a sender on this \
             machine reaches the program as one packet (the XDP column counts those).\n",
            self.plan.blast_agents
        );
        let _ = writeln!(
            s,
            "| xdp | phase | sent (pkt/s) | received (pkt/s) | relay forwarded (pkt/s) | of which XDP | dropped | receive-buffer errors | relay CPU (%) | softirq (%) | (relay + softirq) per received datagram (µs) | XDP program per packet (ns) | probe RTT median / p90 (ms), answered |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        for m in &self.modes {
            let Some(r) = &m.run else {
                let _ = writeln!(
                    s,
                    "| {} | missing: {} | | | | | | | | | | | |",
                    m.mode,
                    m.error.as_deref().unwrap_or("no result")
                );
                continue;
            };
            if let Some(q) = &r.probe_quiet {
                let _ = writeln!(
                    s,
                    "| {} | quiet (probe only) | | | | | | | | | | | {} |",
                    m.mode,
                    q.cell()
                );
            }
            for (name, p) in r.named_phases() {
                let Some(p) = p else {
                    let _ = writeln!(s, "| {} | {name} | missing | | | | | | | | | | |", m.mode);
                    continue;
                };
                let secs = p.secs.max(1e-3);
                let _ = writeln!(
                    s,
                    "| {} | {name} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {:.0} | {:.0} | {} | {} | {} |",
                    m.mode,
                    p.sent as f64 / secs,
                    p.received as f64 / secs,
                    p.relay_forwarded as f64 / secs,
                    p.xdp_forwarded as f64 / secs,
                    p.relay_dropped,
                    p.udp_rcvbuf_errors,
                    p.relay_cpu_percent,
                    p.softirq_percent,
                    cost_per_received(p),
                    if p.xdp_ns_per_packet.is_finite() {
                        format!("{:.0}", p.xdp_ns_per_packet)
                    } else {
                        "—".into()
                    },
                    p.probe.cell(),
                );
            }
        }
        s
    }
}

/// (relay CPU + softirq) µs per datagram received, or "missing".
fn cost_per_received(p: &Phase) -> String {
    if p.received == 0 {
        return "missing".into();
    }
    let cpu_s = (p.relay_cpu_percent + p.softirq_percent) / 100.0 * p.secs;
    format!("{:.2}", 1e6 * cpu_s / p.received as f64)
}
