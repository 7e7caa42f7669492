//! Issue #2: the tunnel comes back after the relay restarts (and after the connector restarts),
//! and the agent cleans up its TUN device and routes on SIGINT.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use ztna_e2e::wait::wait_until_every;
use ztna_e2e::{addr, helper_bins, run, Node, Signal, Stack};

/// The tunnel must carry pings again at most this long after the relay is restarted.
const RECOVERY_BUDGET: Duration = Duration::from_secs(10);

#[test]
fn recovery_after_relay_restart() {
    run("recovery_after_relay_restart", helper_bins!(), |t| {
        let mut s = Stack::new(t)?;
        s.start_all()?;
        let relay = s.relay.context("relay not started")?;

        t.step("SIGKILL the relay");
        t.kill(relay)?;
        ensure!(
            !s.ping_once(addr::ECHO),
            "a ping got through with the relay dead"
        );

        t.step("start the relay again with the same config");
        let restarted = Instant::now();
        let relay = s.start_relay()?;
        let took = wait_until_every(
            "a ping through the tunnel after the relay restart",
            RECOVERY_BUDGET + Duration::from_secs(20),
            Duration::from_millis(100),
            || s.ping_once(addr::ECHO),
        )
        .map(|_| restarted.elapsed())?;
        t.step(&format!(
            "tunnel back {:.2} s after the restart",
            took.as_secs_f64()
        ));
        t.ensure_running(relay)?;
        ensure!(
            took <= RECOVERY_BUDGET,
            "the tunnel came back only {:.2} s after the relay restart (budget {} s)",
            took.as_secs_f64(),
            RECOVERY_BUDGET.as_secs()
        );
        let st = s.status(&s.agent_cfg.status_socket)?;
        ensure!(st.is_ready("conn1"), "status after recovery: {}", st.json);

        // The connector's side: its inner connections die with it, so the relay closes the
        // channel and the agent must start a new handshake (not resume).
        t.step("SIGKILL the connector and start it again");
        t.kill(s.connector.context("connector not started")?)?;
        let restarted = Instant::now();
        s.start_connector()?;
        let took = wait_until_every(
            "a ping through the tunnel after the connector restart",
            RECOVERY_BUDGET + Duration::from_secs(20),
            Duration::from_millis(100),
            || s.ping_once(addr::ECHO),
        )
        .map(|_| restarted.elapsed())?;
        t.step(&format!(
            "tunnel back {:.2} s after the connector restart",
            took.as_secs_f64()
        ));
        ensure!(
            took <= RECOVERY_BUDGET,
            "the tunnel came back only {:.2} s after the connector restart (budget {} s)",
            took.as_secs_f64(),
            RECOVERY_BUDGET.as_secs()
        );
        Ok(())
    });
}

#[test]
fn teardown_on_sigint() {
    run("teardown_on_sigint", helper_bins!(), |t| {
        let mut s = Stack::new(t)?;
        s.start_all()?;
        let agent = s.agent.context("agent not started")?;
        let ns = t.ns(Node::Agent);

        t.step("SIGINT the agent");
        t.signal(agent, Signal::Int)?;
        let status = t.wait_exit(agent, Duration::from_secs(10))?;
        ensure!(
            status.code().is_some(),
            "the agent died of the signal ({status}) instead of handling it"
        );

        let out = t.host(5, ["ip", "-n", &ns, "link", "show", "ztna0"])?;
        ensure!(!out.success(), "ztna0 still exists after SIGINT:\n{out}");
        let routes = s.agent_routes()?;
        ensure!(
            !routes.contains("ztna0"),
            "routes via ztna0 remain:\n{routes}"
        );
        for dst in [addr::ECHO, addr::DNS, addr::SECRET] {
            ensure!(!routes.contains(dst), "a route to {dst} remains:\n{routes}");
        }

        t.step("a new agent starts cleanly afterwards");
        let cfg = s.agent_cfg.clone();
        let again = s.spawn_agent("agent-again", &cfg)?;
        s.wait_ready(again, &cfg)?;
        t.ping_all(Node::Agent, addr::ECHO, 3)
            .context("pings after restarting the agent were lost")?;
        Ok(())
    });
}
