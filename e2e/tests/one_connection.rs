//! Issue #10: one inner connection per agent–connector pair. A modified agent that opens two
//! channels to the same connector and completes an inner handshake over each must end up with
//! one connection at the connector (the newer replaces the older), so the connector's
//! per-connection limits are per-identity limits.

use std::time::Duration;

use anyhow::{ensure, Context};
use ztna_e2e::wait::wait_until;
use ztna_e2e::{addr, helper_bins, run, Node, Stack};

#[test]
fn one_inner_connection_per_agent_identity() {
    run(
        "one_inner_connection_per_agent_identity",
        helper_bins!(),
        |t| {
            let mut s = Stack::new(t)?;
            s.start_backends()?;
            s.start_relay()?;
            s.start_connector()?;
            let alice = s.pki.dir().join("alice");
            let relay = format!("{}:{}", addr::RELAY, addr::RELAY_PORT);
            let tool = t.spawn(
                Node::Agent,
                "two-tunnels",
                env!("CARGO_BIN_EXE_ztna-test-two-tunnels"),
                [
                    relay,
                    s.pki.ca().to_str().context("path")?.to_owned(),
                    format!("{}.pem", alice.display()),
                    format!("{}.key", alice.display()),
                    "conn1".to_owned(),
                    "--hold-secs".to_owned(),
                    "3".to_owned(),
                ],
            )?;
            wait_until(
                "both inner handshakes of the two-tunnel agent",
                Duration::from_secs(20),
                || !t.is_running(tool) || t.log(tool).contains("ready"),
            )?;
            ensure!(t.log(tool).contains("ready"), "{}", t.log(tool));
            // Give the connector a moment to tear down the replaced connection.
            std::thread::sleep(Duration::from_millis(500));
            let connected = s.conn_metrics()?.value("ztna_connector_agents_connected");
            let status = t.wait_exit(tool, Duration::from_secs(10))?;
            t.step(&format!(
            "RESULT one connection per identity: after two inner handshakes from alice the connector holds {connected} agent connection(s) (must be 1); tool: {}",
            t.log(tool).lines().filter(|l| l.starts_with("ready") || l.starts_with("done")).collect::<Vec<_>>().join(", ")
        ));
            ensure!(status.success(), "the tool failed: {}", t.log(tool));
            ensure!(
                connected == 1.0,
                "the connector holds {connected} inner connections of one agent"
            );
            Ok(())
        },
    );
}
