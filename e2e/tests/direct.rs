//! Issue #5: direct paths. Hole punching through simulated NATs (`deploy/netns/nat.sh`), path
//! selection (LAN > WAN > relay), fallback to the relay and the way back, the relay leaving the
//! data path, forged probes, and roaming.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ztna_e2e::wait::wait_until_every;
use ztna_e2e::{addr, helper_bins, run, Stack};

/// How long a direct path may take to come up where one is possible.
const DIRECT_BUDGET: Duration = Duration::from_secs(15);

/// The path of `conn1` in the agent's status.
fn path(s: &Stack<'_>) -> String {
    s.status(&s.agent_cfg.status_socket)
        .ok()
        .and_then(|st| st.connector_path("conn1").map(str::to_owned))
        .unwrap_or_else(|| "(no status)".into())
}

/// Waits until `conn1`'s path satisfies `want`; returns how long that took.
fn wait_path(
    s: &Stack<'_>,
    what: &str,
    budget: Duration,
    want: impl Fn(&str) -> bool,
) -> Result<Duration> {
    let started = Instant::now();
    wait_until_every(what, budget, Duration::from_millis(100), || want(&path(s)))
        .with_context(|| format!("path is {}", path(s)))?;
    Ok(started.elapsed())
}

/// The relay's count of forwarded channel datagrams.
fn relay_forwarded(s: &Stack<'_>) -> Result<f64> {
    Ok(s.relay_metrics()?
        .value("ztna_relay_datagrams_forwarded_total"))
}

#[test]
fn direct_lan_path_and_the_relay_leaves_the_data_path() {
    run(
        "direct_lan_path_and_the_relay_leaves_the_data_path",
        helper_bins!(),
        |t| {
            let mut s = Stack::new(t)?;
            s.agent_cfg.direct_paths = None;
            s.start_all()?;
            let took = wait_path(&s, "a direct LAN path", DIRECT_BUDGET, |p| {
                p == "direct-lan"
            })?;
            t.step(&format!("direct-lan after {:.2} s", took.as_secs_f64()));
            let st = s.status(&s.agent_cfg.status_socket)?;
            t.step(&format!("status: {}", st.json["connectors"]));

            let before = relay_forwarded(&s)?;
            t.ping_all(ztna_e2e::Node::Agent, addr::ECHO, 20)?;
            let after = relay_forwarded(&s)?;
            ensure!(
                after == before,
                "the relay forwarded {} datagrams while the path was direct",
                after - before
            );
            let conn = s.conn_metrics()?;
            ensure!(
                conn.value("ztna_connector_direct_rx_packets_total") >= 20.0,
                "connector direct counters: {}",
                conn.raw()
            );
            Ok(())
        },
    );
}
