//! Issue #11: the macOS agent's C ABI, driven on Linux by `agent-apple/harness/harness.c` (C,
//! only `include/ztna.h` and `libztna_apple.a`) over a real TUN device, end to end through the
//! real relay and connector: ping, UDP echo, DNS, a 50 MiB download with its sha256, one
//! iperf3 TCP stream next to the Linux agent's in the same topology, status JSON, a relay
//! restart, then stop and free. The full run uses an AddressSanitizer/LeakSanitizer build of the
//! harness; a shorter run (ping, relay restart, stop) goes under valgrind.
//!
//! Needs the release static library: `cargo build --release -p ztna-apple` (in
//! `$ZTNA_BIN_DIR`, like the binaries), and `make` and `cc`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ztna_e2e::wait::wait_until_every;
use ztna_e2e::{
    addr, bin_dir, helper_bins, run, AgentStatus, DaemonId, Node, Signal, Stack, Topology,
};

const TUN: &str = "zapple0";
const IPERF_PORT: &str = "5001";
const IPERF_SECONDS: &str = "4";
const DOWNLOAD_BYTES: u64 = 50 * 1024 * 1024;

/// Builds `ztna-harness` and `ztna-harness-asan` into the test directory.
fn build_harness(t: &Topology) -> Result<(PathBuf, PathBuf)> {
    let lib = bin_dir().join("libztna_apple.a");
    ensure!(
        lib.exists(),
        "{} is missing: run `cargo build --release -p ztna-apple` first",
        lib.display()
    );
    let makefile_dir = ztna_e2e::workspace_root().join("agent-apple/harness");
    let out_dir = t.dir().to_str().context("non-UTF-8 test dir")?.to_owned();
    let out = t.host(
        180,
        [
            "make".as_ref(),
            "-s".as_ref(),
            "-C".as_ref(),
            makefile_dir.as_os_str(),
            format!("OUT={out_dir}").as_ref(),
            format!("LIB={}", lib.display()).as_ref(),
        ],
    )?;
    ensure!(out.success(), "building the C harness: {out}");
    t.step("C harness built against include/ztna.h and libztna_apple.a (plain and ASan)");
    Ok((
        t.dir().join("ztna-harness"),
        t.dir().join("ztna-harness-asan"),
    ))
}

/// The JSON config: the Linux agent's keys (paths to the PEM files, as its file has them).
fn write_config(t: &Topology, s: &Stack) -> Result<PathBuf> {
    let a = &s.agent_cfg;
    let json = serde_json::json!({
        "relay": a.relay, "relay_name": a.relay_name,
        "ca": a.ca, "cert": a.cert, "key": a.key,
        "tun": TUN, "mtu": a.mtu, "services": a.services,
        "status_socket": "/nonexistent/ignored-on-apple.sock",
        "direct_paths": false, "log": "info",
    });
    t.write_file("apple.json", &json.to_string())
}

fn read_status(path: &Path) -> Option<AgentStatus> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| AgentStatus::parse(&t).ok())
}

/// Waits until the harness's status says ready and a ping crosses its TUN.
fn wait_ready(
    t: &Topology,
    s: &Stack,
    h: DaemonId,
    status: &Path,
    budget: Duration,
) -> Result<f64> {
    let started = Instant::now();
    wait_until_every(
        "the harness to be connected with conn1 up",
        budget,
        Duration::from_millis(200),
        || !t.is_running(h) || read_status(status).is_some_and(|st| st.is_ready("conn1")),
    )
    .with_context(|| format!("last status: {:?}", read_status(status).map(|s| s.json)))?;
    t.ensure_running(h)?;
    wait_until_every(
        "a ping through the harness's TUN",
        budget,
        Duration::from_millis(200),
        || !t.is_running(h) || s.ping_once(addr::ECHO),
    )?;
    t.ensure_running(h)?;
    Ok(started.elapsed().as_secs_f64())
}

/// Stops the harness with SIGTERM and checks it stopped and freed cleanly.
fn stop_harness(t: &Topology, h: DaemonId, timeout: Duration) -> Result<String> {
    t.signal(h, Signal::Term)?;
    let status = t.wait_exit(h, timeout)?;
    let log = t.log(h);
    ensure!(
        status.success() && log.contains("harness: stopped cleanly"),
        "the harness exited with {status}; its log ends:\n{}",
        ztna_e2e::topology::tail(&log, 60)
    );
    Ok(log)
}

/// `min/avg/max` of ping's summary, the average in ms.
fn ping_avg_ms(out: &str) -> Option<f64> {
    let stats = out.lines().find(|l| l.contains("min/avg/max"))?;
    stats
        .split('=')
        .nth(1)?
        .trim()
        .split('/')
        .nth(1)?
        .parse()
        .ok()
}

/// One iperf3 TCP stream agent → backend through the tunnel, in Mbit/s (receiver side).
fn iperf(t: &Topology) -> Result<f64> {
    let out = t.run_ok(
        Node::Agent,
        60,
        [
            "iperf3",
            "-c",
            addr::WEB,
            "-p",
            IPERF_PORT,
            "-t",
            IPERF_SECONDS,
            "-J",
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout).context("iperf3 -J output")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no end.sum_received in {}", out.stdout))?;
    Ok(bps / 1e6)
}

fn sha256(t: &Topology, p: &Path) -> Result<String> {
    let out = t.host(120, ["sha256sum".as_ref(), p.as_os_str()])?;
    ensure!(out.success(), "{out}");
    out.stdout
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .context("no sha256")
}

fn restart_relay(t: &Topology, s: &mut Stack) -> Result<()> {
    let relay = s.relay.context("relay not started")?;
    t.step("SIGKILL the relay, then start it again");
    t.kill(relay)?;
    std::thread::sleep(Duration::from_millis(500));
    s.start_relay()?;
    Ok(())
}

fn sessions(status: &Path) -> u64 {
    read_status(status)
        .and_then(|s| s.json["relay_sessions"].as_u64())
        .unwrap_or(0)
}

#[test]
fn apple_harness_end_to_end_asan() {
    run("apple_harness_end_to_end_asan", helper_bins!(), |t| {
        let (_, asan) = build_harness(t)?;
        let mut s = Stack::new(t)?;
        s.enable_web();
        s.start_backends()?;
        let root = t.dir().join("www");
        std::fs::create_dir_all(&root)?;
        let big = root.join("big.bin");
        let out = t.host(
            60,
            [
                "sh",
                "-c",
                &format!("head -c {DOWNLOAD_BYTES} /dev/urandom > {}", big.display()),
            ],
        )?;
        ensure!(out.success(), "{out}");
        ztna_e2e::nginx::start(t, Node::Backend, &format!("{}:80", addr::BACKEND), &root)?;
        let listen = format!("--bind={}", addr::BACKEND);
        let iperf_srv = t.spawn(
            Node::Backend,
            "iperf3-server",
            "iperf3",
            ["-s", "-p", IPERF_PORT, &listen],
        )?;
        s.start_relay()?;
        s.start_connector()?;

        t.step("the Linux agent first: one iperf3 TCP stream through ztna0");
        let agent = s.start_agent()?;
        let cfg = s.agent_cfg.clone();
        s.wait_ready(agent, &cfg)?;
        t.ensure_running(iperf_srv)?;
        let linux_mbps = iperf(t)?;
        t.step(&format!(
            "RESULT linux agent iperf3 1 stream: {linux_mbps:.0} Mbit/s"
        ));
        t.signal(agent, Signal::Term)?;
        t.wait_exit(agent, Duration::from_secs(15))?;

        t.step("the C harness (ASan/LSan) over the ztna-apple ABI");
        let config = write_config(t, &s)?;
        let status = t.dir().join("apple-status.json");
        let h = t.spawn_with_env(
            Node::Agent,
            "harness-asan",
            &asan,
            [
                "--config".as_ref(),
                config.as_os_str(),
                "--tun".as_ref(),
                TUN.as_ref(),
                "--status".as_ref(),
                status.as_os_str(),
            ],
            &[(
                "ASAN_OPTIONS",
                "detect_leaks=1:abort_on_error=0:exitcode=66:detect_stack_use_after_return=0",
            )],
        )?;
        let took = wait_ready(t, &s, h, &status, Duration::from_secs(30))?;
        t.step(&format!("harness ready and pinging after {took:.2} s"));
        ensure!(
            s.agent_route_dev(addr::ECHO)?.as_deref() == Some(TUN),
            "10.100.0.1 is not routed into {TUN} by the settings callback: {}",
            s.agent_routes()?
        );

        let out = t.run_ok(
            Node::Agent,
            30,
            ["ping", "-n", "-c", "20", "-i", "0.2", addr::ECHO],
        )?;
        ensure!(
            out.stdout.contains(" 0% packet loss"),
            "ping lost packets:\n{out}"
        );
        let rtt = ping_avg_ms(&out.stdout).unwrap_or(f64::NAN);
        t.step(&format!("RESULT harness ping: 20/20, avg {rtt:.2} ms"));

        let summary = ztna_e2e::udp_echo_check(t, 300, 1232)?;
        t.step(&format!("UDP echo: {summary}"));

        ztna_e2e::dig_backend(t, 2)?;
        t.step("DNS through the harness: backend.ztna.test -> 10.10.3.2");

        let got = t.dir().join("big.got");
        let url = format!("http://{}/big.bin", addr::WEB);
        let started = Instant::now();
        let got_s = got.to_str().context("path")?;
        t.run_ok(
            Node::Agent,
            120,
            ["curl", "-sS", "-f", "-m", "110", "-o", got_s, &url],
        )?;
        let secs = started.elapsed().as_secs_f64();
        let (want, have) = (sha256(t, &big)?, sha256(t, &got)?);
        ensure!(
            want == have,
            "50 MiB download corrupted: sha256 {have}, want {want}"
        );
        t.step(&format!(
            "RESULT harness curl 50 MiB: sha256 match ({}), {secs:.2} s = {:.0} Mbit/s",
            &want[..16],
            DOWNLOAD_BYTES as f64 * 8.0 / secs / 1e6
        ));

        let apple_mbps = iperf(t)?;

        let st = read_status(&status).context("no status JSON")?;
        ensure!(
            st.connected() && st.identity() == Some("alice"),
            "status: {}",
            st.json
        );
        ensure!(
            st.connector_path("conn1") == Some("relay"),
            "status: {}",
            st.json
        );
        ensure!(
            st.connector_counter("conn1", "rx_bytes") > DOWNLOAD_BYTES,
            "conn1 rx_bytes {} after a 50 MiB download: {}",
            st.connector_counter("conn1", "rx_bytes"),
            st.json
        );

        let before = sessions(&status);
        restart_relay(t, &mut s)?;
        let restarted = Instant::now();
        wait_until_every(
            "a new relay session and a ping after the relay restart",
            Duration::from_secs(40),
            Duration::from_millis(200),
            || !t.is_running(h) || (sessions(&status) > before && s.ping_once(addr::ECHO)),
        )?;
        t.ensure_running(h)?;
        t.step(&format!(
            "tunnel back {:.2} s after the relay restart",
            restarted.elapsed().as_secs_f64()
        ));

        let log = stop_harness(t, h, Duration::from_secs(20))?;
        ensure!(
            !log.contains("AddressSanitizer") && !log.contains("LeakSanitizer"),
            "sanitizer report:\n{}",
            ztna_e2e::topology::tail(&log, 80)
        );
        let last = log
            .lines()
            .rev()
            .find(|l| l.starts_with("harness: stopped"))
            .unwrap_or("");
        t.step(&format!("RESULT ASan/LSan: exit 0, no report; {last}"));
        let out = t.host(5, ["ip", "-n", &t.ns(Node::Agent), "link", "show", TUN])?;
        ensure!(
            !out.success(),
            "{TUN} still exists after the harness exited"
        );

        t.step("the Linux agent again, so the comparison brackets the harness run");
        let agent = s.spawn_agent("agent-after", &cfg)?;
        s.wait_ready(agent, &cfg)?;
        let linux_after = iperf(t)?;
        t.step(&format!(
            "RESULT iperf3 1 TCP stream: linux agent {linux_mbps:.0} (before) and {linux_after:.0} (after) Mbit/s, \
             C harness over the ABI {apple_mbps:.0} Mbit/s"
        ));
        Ok(())
    });
}

#[test]
fn apple_harness_valgrind() {
    run("apple_harness_valgrind", helper_bins!(), |t| {
        if std::process::Command::new("valgrind")
            .arg("--version")
            .output()
            .is_err()
        {
            bail!("valgrind is not installed (scripts/setup.sh installs it)");
        }
        let (plain, _) = build_harness(t)?;
        let supp = ztna_e2e::workspace_root().join("agent-apple/harness/valgrind.supp");
        let supp = format!("--suppressions={}", supp.display());
        let mut s = Stack::new(t)?;
        s.start_backends()?;
        s.start_relay()?;
        s.start_connector()?;
        let config = write_config(t, &s)?;
        let status = t.dir().join("apple-status.json");
        let h = t.spawn(
            Node::Agent,
            "harness-valgrind",
            "valgrind",
            [
                "--error-exitcode=99".as_ref(),
                "--leak-check=full".as_ref(),
                "--show-leak-kinds=definite,indirect".as_ref(),
                "--errors-for-leak-kinds=definite,indirect".as_ref(),
                "--fair-sched=yes".as_ref(),
                "--track-origins=yes".as_ref(),
                supp.as_ref(),
                plain.as_os_str(),
                "--config".as_ref(),
                config.as_os_str(),
                "--tun".as_ref(),
                TUN.as_ref(),
                "--status".as_ref(),
                status.as_os_str(),
            ],
        )?;
        let took = wait_ready(t, &s, h, &status, Duration::from_secs(90))?;
        t.step(&format!("harness under valgrind ready after {took:.2} s"));
        let out = t.run_ok(
            Node::Agent,
            30,
            ["ping", "-n", "-c", "5", "-i", "0.2", "-W", "2", addr::ECHO],
        )?;
        ensure!(
            out.stdout.contains(" 0% packet loss"),
            "ping under valgrind lost packets:\n{out}"
        );

        let before = sessions(&status);
        restart_relay(t, &mut s)?;
        wait_until_every(
            "a new relay session and a ping after the relay restart",
            Duration::from_secs(60),
            Duration::from_millis(300),
            || !t.is_running(h) || (sessions(&status) > before && s.ping_once(addr::ECHO)),
        )?;
        t.ensure_running(h)?;
        t.step("tunnel back after the relay restart, under valgrind");

        let log = stop_harness(t, h, Duration::from_secs(60))?;
        let summary = log
            .lines()
            .rev()
            .find(|l| l.contains("ERROR SUMMARY"))
            .unwrap_or("(no summary)");
        ensure!(
            summary.contains("ERROR SUMMARY: 0 errors"),
            "valgrind: {summary}\n{}",
            ztna_e2e::topology::tail(&log, 80)
        );
        let leaks: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("definitely lost:")
                    || l.contains("indirectly lost:")
                    || l.contains("possibly lost:")
                    || l.contains("still reachable:")
            })
            .collect();
        t.step(&format!(
            "RESULT valgrind: {} | {}",
            summary.trim(),
            leaks.join(" | ")
        ));
        Ok(())
    });
}
