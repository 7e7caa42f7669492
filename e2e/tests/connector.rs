//! Issue #2: the connector checks every packet (source = the agent's tunnel IP; destination =
//! a registered service address, port and protocol), drops the rest and counts it.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ztna_e2e::{addr, helper_bins, run, wait_until, Metrics, Node, Stack};

const SPOOFED: &str = "ztna_connector_dropped_spoofed_source_total";
const NOT_SERVICE: &str = "ztna_connector_dropped_not_service_total";
const UNSUPPORTED: &str = "ztna_connector_dropped_unsupported_total";
const FROM_AGENTS: &str = "ztna_connector_packets_from_agents_total";
const ANSWERED: &str = "ztna_connector_refused_answered_total";

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

        t.step("(b) not a service: UDP datagrams to 10.100.0.1:9999 get ICMP administratively prohibited");
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
        // ICMP type 3 code 13 reaches a connected UDP socket as EHOSTUNREACH: the first
        // datagram fails at once, with no echo.
        ensure!(
            !out.success() && out.stderr.contains("No route to host"),
            "UDP to an unregistered port: want an immediate ICMP administratively prohibited \
             (EHOSTUNREACH), got:\n{out}"
        );
        let _ = wait_until(
            "dropped_not_service_total to rise",
            Duration::from_secs(5),
            || {
                s.conn_metrics()
                    .is_ok_and(|m| delta(&m, &before, NOT_SERVICE) >= 1.0)
            },
        );
        std::thread::sleep(Duration::from_millis(500));
        let after = s.conn_metrics()?;
        ensure!(
            delta(&after, &before, NOT_SERVICE) >= 1.0 && delta(&after, &before, ANSWERED) >= 1.0,
            "not_service +{}, refused_answered +{}",
            delta(&after, &before, NOT_SERVICE),
            delta(&after, &before, ANSWERED)
        );
        check(
            "dropped_spoofed_source_total during (b)",
            delta(&after, &before, SPOOFED),
            0.0,
        )?;

        t.step("(b) TCP to a port the echo service does not serve: nc -z -w5 10.100.0.1 80 is refused at once");
        let before = s.conn_metrics()?;
        let started = std::time::Instant::now();
        let out = t.run(Node::Agent, 10, ["nc", "-z", "-w5", addr::ECHO, "80"])?;
        let took = started.elapsed();
        ensure!(
            !out.success(),
            "a TCP connection to 10.100.0.1:80 succeeded:\n{out}"
        );
        ensure!(
            took < Duration::from_secs(2),
            "nc took {took:?}: no immediate RST"
        );
        t.step(&format!(
            "RESULT nc to an unserved TCP port failed after {took:?}"
        ));
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

/// Issue #10: a connector restart makes in-flight TCP fail fast. A slow download runs through
/// the tunnel (curl reads 20 KB/s, so its receive window is full and its reads send window
/// updates) beside an idle connection (nc, which sends nothing); the connector is killed
/// (SIGKILL) and started again. The connector keeps TCP state per inner connection, so when the
/// agent's new inner connection comes up it hands its kernel a reset for each TCP connection
/// the old one carried (`core::tcp_flows`); a segment that reaches the new connector for a
/// connection it never saw gets its RST too, as a real host would. Both connections are reset
/// within 2 s of the connector being back (curl fails once it has read what its kernel held)
/// instead of hanging until their own timeouts.
#[test]
fn connector_restart_resets_old_tcp_connections_at_once() {
    run(
        "connector_restart_resets_old_tcp_connections_at_once",
        helper_bins!(),
        |t| {
            let root = t.dir().join("www");
            std::fs::create_dir_all(&root)?;
            let big = std::fs::File::create(root.join("big.bin"))?;
            big.set_len(256 << 20)?;
            drop(big);
            ztna_e2e::nginx::start(t, Node::Backend, &format!("{}:80", addr::BACKEND), &root)?;
            let mut s = Stack::new(t)?;
            s.enable_web();
            s.start_all()?;
            let conn = s.connector.context("no connector")?;

            t.step("a slow download (curl --limit-rate 20K of 256 MiB, -m 60)");
            let done = t.dir().join("curl.exit");
            let script = format!(
                "curl -sS -m 60 --limit-rate 20K -o /dev/null http://{}/big.bin; echo $? > {}",
                addr::WEB,
                done.display()
            );
            t.spawn(Node::Agent, "curl-slow", "sh", ["-c", &script])?;
            t.spawn(
                Node::Agent,
                "nc-idle",
                "sh",
                ["-c", &format!("sleep 90 | nc {} 80", addr::WEB)],
            )?;
            wait_until("the download to run", Duration::from_secs(15), || {
                s.conn_metrics()
                    .is_ok_and(|m| m.value("ztna_connector_tcp_bytes_from_backends_total") > 1e5)
            })?;
            // Let curl's receive window fill.
            std::thread::sleep(Duration::from_secs(1));
            let open = t.run(
                Node::Agent,
                5,
                ["ss", "-Htn", "state", "established", "dst", addr::WEB],
            )?;
            ensure!(
                open.stdout.lines().count() == 2,
                "want the download and the idle connection established:\n{open}"
            );

            t.step("SIGKILL the connector, start it again 0.3 s later");
            t.signal(conn, ztna_e2e::Signal::Kill)?;
            t.wait_exit(conn, Duration::from_secs(5))?;
            std::thread::sleep(Duration::from_millis(300));
            let restarted = std::time::Instant::now();
            s.start_connector()?;
            let back = restarted.elapsed();
            // The connections' resets reach the agent's kernel (they leave ESTABLISHED)...
            let reset = wait_until(
                "the agent's connections to be reset",
                Duration::from_secs(45),
                || {
                    t.run(
                        Node::Agent,
                        5,
                        ["ss", "-Htn", "state", "established", "dst", addr::WEB],
                    )
                    .is_ok_and(|o| o.success() && o.stdout.trim().is_empty())
                },
            );
            // ...and curl fails once it has read the bytes its kernel already held.
            let exited = wait_until("curl to exit", Duration::from_secs(45), || done.exists())
                .map(|d| d + reset.as_ref().map_or(Duration::ZERO, |r| *r));
            std::thread::sleep(Duration::from_millis(50));
            let code = std::fs::read_to_string(&done).unwrap_or_default();
            let secs = |d: &Result<Duration>| d.as_ref().map_or(f64::NAN, |d| d.as_secs_f64());
            let m = s.conn_metrics()?;
            let st = s.status(&s.agent_cfg.status_socket)?;
            t.step(&format!(
                "RESULT connector back {:.2} s after its restart; the agent's connections reset {:.2} s after that; curl exited with {} {:.2} s after that; resets from the agent {}, from the connector (tcp_reset_unknown) {}",
                back.as_secs_f64(),
                secs(&reset),
                code.trim(),
                secs(&exited),
                st.connector_counter("conn1", "tcp_resets"),
                m.value("ztna_connector_tcp_reset_unknown_total")
            ));
            let reset = reset.context("the connections were never reset")?;
            exited.context("curl did not exit")?;
            ensure!(
                code.trim() != "0" && !code.trim().is_empty(),
                "curl succeeded ({code:?}) although the connector lost the connection"
            );
            ensure!(
                reset <= Duration::from_secs(2),
                "the connections were reset {:.2} s after the connector was back (want within 2 s)",
                reset.as_secs_f64()
            );
            Ok(())
        },
    );
}
