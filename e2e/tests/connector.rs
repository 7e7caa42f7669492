//! Issue #2: the connector checks every packet (source = the agent's tunnel IP; destination =
//! a registered service address, port and protocol), drops the rest and counts it.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ztna_e2e::{addr, helper_bins, run, wait_until, Metrics, Node, Stack};

const SPOOFED: &str = "ztna_connector_dropped_spoofed_source_total";
const NOT_SERVICE: &str = "ztna_connector_dropped_not_service_total";
const UNSUPPORTED: &str = "ztna_connector_dropped_unsupported_total";
const FROM_AGENTS: &str = "ztna_connector_packets_from_agents_total";

fn delta(after: &Metrics, before: &Metrics, name: &str) -> f64 {
    after.value(name) - before.value(name)
}

#[test]
fn connector_drops_counted() {
    run("connector_drops_counted", helper_bins!(), |t| {
        let mut s = Stack::new(t)?;
        s.start_all()?;

        // Whatever else reaches the connector on its own (none expected) shows in a quiet window;
        // the deltas below are exact only when it is 0.
        let q0 = s.conn_metrics()?;
        std::thread::sleep(Duration::from_secs(2));
        let q1 = s.conn_metrics()?;
        let noise: Vec<(&str, f64)> = [SPOOFED, NOT_SERVICE, UNSUPPORTED]
            .iter()
            .map(|n| (*n, delta(&q1, &q0, n)))
            .collect();
        t.step(&format!("drop counters in a 2 s quiet window: {noise:?}"));
        let exact = noise.iter().all(|(_, d)| *d == 0.0);
        let check = |what: &str, got: f64, want: f64| -> Result<()> {
            if exact {
                ensure!(
                    got == want,
                    "{what}: rose by {got}, expected exactly {want}"
                );
            } else {
                ensure!(
                    got >= want,
                    "{what}: rose by {got}, expected at least {want}"
                );
            }
            Ok(())
        };

        t.step("(a) spoofed source: ping -I 100.64.250.250 through the tunnel");
        let ns = t.ns(Node::Agent);
        t.host(
            5,
            [
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                "100.64.250.250/32",
                "dev",
                "lo",
            ],
        )
        .and_then(|o| {
            ensure!(o.success(), "{o}");
            Ok(())
        })?;
        let before = s.conn_metrics()?;
        let out = t.run(
            Node::Agent,
            15,
            [
                "ping",
                "-n",
                "-c",
                "3",
                "-W",
                "1",
                "-I",
                "100.64.250.250",
                addr::ECHO,
            ],
        )?;
        ensure!(
            !out.success() && out.stdout.contains(" 0 received"),
            "a ping from a spoofed source got answers:\n{out}"
        );
        let _ = wait_until(
            "dropped_spoofed_source_total to rise by 3",
            Duration::from_secs(5),
            || {
                s.conn_metrics()
                    .is_ok_and(|m| delta(&m, &before, SPOOFED) >= 3.0)
            },
        );
        std::thread::sleep(Duration::from_millis(500));
        let after = s.conn_metrics()?;
        check(
            "dropped_spoofed_source_total",
            delta(&after, &before, SPOOFED),
            3.0,
        )?;
        check(
            "dropped_not_service_total during (a)",
            delta(&after, &before, NOT_SERVICE),
            0.0,
        )?;
        ensure!(
            delta(&after, &before, FROM_AGENTS) >= 3.0,
            "packets_from_agents_total did not count the spoofed pings"
        );

        t.step("(b) not a service: 3 UDP datagrams to 10.100.0.1:9999, no reply expected");
        let before = s.conn_metrics()?;
        let target = format!("{}:9999", addr::ECHO);
        let out = t.run(
            Node::Agent,
            15,
            [
                t.helpers().udp_check.as_os_str(),
                target.as_ref(),
                "--count".as_ref(),
                "3".as_ref(),
                "--retries".as_ref(),
                "0".as_ref(),
                "--timeout-ms".as_ref(),
                "500".as_ref(),
                "--expect-silence".as_ref(),
            ],
        )?;
        ensure!(
            out.success(),
            "UDP to an unregistered port got a reply:\n{out}"
        );
        let _ = wait_until(
            "dropped_not_service_total to rise by 3",
            Duration::from_secs(5),
            || {
                s.conn_metrics()
                    .is_ok_and(|m| delta(&m, &before, NOT_SERVICE) >= 3.0)
            },
        );
        std::thread::sleep(Duration::from_millis(500));
        let after = s.conn_metrics()?;
        check(
            "dropped_not_service_total",
            delta(&after, &before, NOT_SERVICE),
            3.0,
        )?;
        check(
            "dropped_spoofed_source_total during (b)",
            delta(&after, &before, SPOOFED),
            0.0,
        )?;

        t.step("(b) TCP to a port the echo service does not serve: nc -z -w1 10.100.0.1 80");
        let before = s.conn_metrics()?;
        let out = t.run(Node::Agent, 10, ["nc", "-z", "-w1", addr::ECHO, "80"])?;
        ensure!(
            !out.success(),
            "a TCP connection to 10.100.0.1:80 succeeded:\n{out}"
        );
        let counted = |m: &Metrics| delta(m, &before, NOT_SERVICE);
        wait_until(
            "dropped_not_service_total to rise",
            Duration::from_secs(5),
            || s.conn_metrics().is_ok_and(|m| counted(&m) >= 1.0),
        )?;
        let after = s.conn_metrics()?;
        t.step(&format!(
            "TCP SYNs dropped: unsupported +{}, not_service +{}",
            delta(&after, &before, UNSUPPORTED),
            delta(&after, &before, NOT_SERVICE)
        ));
        check(
            "dropped_spoofed_source_total during TCP",
            delta(&after, &before, SPOOFED),
            0.0,
        )?;

        t.step("the tunnel still works");
        t.ping_all(Node::Agent, addr::ECHO, 3)
            .context("pings to echo were lost")?;
        Ok(())
    });
}
