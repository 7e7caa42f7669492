//! Issue #3: TCP through the tunnel. The connector terminates the agent's TCP in a userspace stack
//! and pipes each connection to the backend; real clients (curl, socat, psql) and servers (nginx,
//! socat, PostgreSQL) run in the agent and backend namespaces. Each test builds its own topology
//! with the service `web` (10.100.0.4 → 10.10.3.2, TCP 80, 5432, 5001, 9000) and prints what it
//! measures.
//!
//! Run: `cargo build --release --bins && cargo test --release -p ztna-e2e --test tcp -- --nocapture`
//! (as root; nginx, socat, curl, psql and the PostgreSQL server come from `scripts/setup.sh`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ztna_e2e::nginx::{random_file, sha256, web_root};
use ztna_e2e::{
    addr, fd_count, helper_bins, rss_kib, run, wait_until, DaemonId, Node, Signal, Stack, Topology,
};

const MIB: u64 = 1024 * 1024;

/// A stack with the `web` service, after `tweak` changed its configs, started and ready.
fn web_stack<'t>(t: &'t Topology, tweak: impl FnOnce(&mut Stack<'t>)) -> Result<Stack<'t>> {
    let mut s = Stack::new(t)?;
    s.enable_web();
    tweak(&mut s);
    s.start_all()?;
    Ok(s)
}

/// `web:PORT` as the agent dials it.
fn web(port: u16) -> String {
    format!("{}:{port}", addr::WEB)
}

/// `backend:PORT` as servers bind it.
fn backend(port: u16) -> String {
    format!("{}:{port}", addr::BACKEND)
}

fn path(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("non-UTF-8 path {}", p.display()))
}

/// Waits until something listens on TCP `port` in `node` (`ss -Hltn`), without connecting.
fn wait_listening(t: &Topology, node: Node, port: u16, server: DaemonId) -> Result<()> {
    let filter = format!("sport = :{port}");
    wait_until(
        &format!("a TCP listener on port {port} in {node}"),
        Duration::from_secs(15),
        || {
            !t.is_running(server)
                || t.run(node, 5, ["ss", "-Hltn", &filter])
                    .is_ok_and(|o| o.success() && !o.stdout.trim().is_empty())
        },
    )?;
    t.ensure_running(server)
}

/// `key=value` from a helper's `result=... ms=...` line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn field_u64(line: &str, key: &str) -> Result<u64> {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key}= in {line:?}"))
}

/// nginx in the backend namespace on 10.10.3.2:80, serving `root`.
fn start_nginx(t: &Topology, root: &Path) -> Result<DaemonId> {
    ztna_e2e::nginx::start(t, Node::Backend, &format!("{}:80", addr::BACKEND), root)
}

/// `curl` arguments fetching `n` URLs of `/index.html` with `Connection: close` (a connection
/// each), printing each status code on a line.
fn curl_many(n: usize, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["curl", "-sS", "-m", "120", "-H", "Connection: close"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args.extend(["-w".to_owned(), "%{http_code}\\n".to_owned()]);
    for i in 0..n {
        args.push("-o".to_owned());
        args.push("/dev/null".to_owned());
        args.push(format!("http://{}/index.html?i={i}", addr::WEB));
    }
    args
}

fn count_200(stdout: &str) -> usize {
    stdout.lines().filter(|l| l.trim() == "200").count()
}

#[test]
fn tcp_http_nginx() {
    run("tcp_http_nginx", helper_bins!(), |t| {
        let (root, body) = web_root(t, None)?;
        let _nginx = start_nginx(t, &root)?;
        let s = web_stack(t, |_| {})?;
        let conn = s.connector.context("no connector")?;

        t.step("curl http://10.100.0.4/: 200 and the right body");
        let url = format!("http://{}/", addr::WEB);
        let start = Instant::now();
        let out = t.run_ok(
            Node::Agent,
            20,
            ["curl", "-sS", "-m", "10", "-w", "\n%{http_code}", &url],
        )?;
        ensure!(
            out.stdout == format!("{body}\n200"),
            "unexpected answer (want the body then 200):\n{out}"
        );
        t.step(&format!(
            "first request answered in {} ms",
            start.elapsed().as_millis()
        ));

        t.step("100 sequential requests, a connection each");
        let start = Instant::now();
        let out = t.run(Node::Agent, 150, curl_many(100, &[]))?;
        let ok = count_200(&out.stdout);
        let took = start.elapsed();
        ensure!(ok == 100, "{ok} of 100 sequential requests got 200:\n{out}");
        t.step(&format!(
            "RESULT http sequential: 100/100 in {:.2} s ({:.1} ms per request)",
            took.as_secs_f64(),
            took.as_secs_f64() * 10.0
        ));

        t.step("100 concurrent requests (curl --parallel --parallel-max 100)");
        let start = Instant::now();
        let out = t.run(
            Node::Agent,
            150,
            curl_many(
                100,
                &[
                    "--parallel",
                    "--parallel-immediate",
                    "--parallel-max",
                    "100",
                ],
            ),
        )?;
        let ok = count_200(&out.stdout);
        let took = start.elapsed();
        ensure!(ok == 100, "{ok} of 100 concurrent requests got 200:\n{out}");
        t.step(&format!(
            "RESULT http concurrent: 100/100 in {:.2} s",
            took.as_secs_f64()
        ));
        t.ensure_running(conn)?;
        Ok(())
    });
}

/// Sends `file` from the agent to a socat sink on the backend (port 9000) and checks the copy.
/// Returns the seconds it took.
fn upload(t: &Topology, file: &Path, limit_secs: u32) -> Result<f64> {
    let recv = t.dir().join("received.bin");
    let sink = t.spawn(
        Node::Backend,
        "socat-sink",
        "socat",
        [
            "-u".to_owned(),
            format!("TCP-LISTEN:9000,bind={},reuseaddr", addr::BACKEND),
            format!("CREATE:{}", path(&recv)?),
        ],
    )?;
    wait_listening(t, Node::Backend, 9000, sink)?;
    let start = Instant::now();
    let out = t.run(
        Node::Agent,
        limit_secs,
        [
            "socat".to_owned(),
            "-u".to_owned(),
            format!("OPEN:{}", path(file)?),
            format!("TCP:{},connect-timeout=10", web(9000)),
        ],
    )?;
    ensure!(out.success(), "upload client failed: {out}");
    let left = Duration::from_secs(limit_secs.into()).saturating_sub(start.elapsed());
    t.wait_exit(sink, left.max(Duration::from_secs(5)))
        .context("the backend sink did not see the end of the upload")?;
    let took = start.elapsed().as_secs_f64();
    let (want, got) = (sha256(t, file)?, sha256(t, &recv)?);
    let size = std::fs::metadata(&recv).map(|m| m.len()).unwrap_or(0);
    ensure!(
        want == got,
        "upload corrupted: sent sha256 {want}, received {got} ({size} bytes)"
    );
    let _ = std::fs::remove_file(&recv);
    Ok(took)
}

/// Fetches `file` from a socat source on the backend (port 9000) to the agent and checks the
/// copy. Returns the seconds it took.
fn download(t: &Topology, file: &Path, limit_secs: u32) -> Result<f64> {
    let got = t.dir().join("downloaded.bin");
    let source = t.spawn(
        Node::Backend,
        "socat-source",
        "socat",
        [
            "-u".to_owned(),
            format!("OPEN:{}", path(file)?),
            format!("TCP-LISTEN:9000,bind={},reuseaddr", addr::BACKEND),
        ],
    )?;
    wait_listening(t, Node::Backend, 9000, source)?;
    let start = Instant::now();
    let out = t.run(
        Node::Agent,
        limit_secs,
        [
            "socat".to_owned(),
            "-u".to_owned(),
            format!("TCP:{},connect-timeout=10", web(9000)),
            format!("CREATE:{}", path(&got)?),
        ],
    )?;
    let took = start.elapsed().as_secs_f64();
    ensure!(out.success(), "download client failed: {out}");
    let (want, have) = (sha256(t, file)?, sha256(t, &got)?);
    let size = std::fs::metadata(&got).map(|m| m.len()).unwrap_or(0);
    ensure!(
        want == have,
        "download corrupted: sent sha256 {want}, received {have} ({size} bytes)"
    );
    let _ = std::fs::remove_file(&got);
    if t.is_running(source) {
        t.kill(source)?;
    }
    Ok(took)
}

#[test]
fn tcp_bulk_200mib_each_way() {
    run("tcp_bulk_200mib_each_way", helper_bins!(), |t| {
        let s = web_stack(t, |_| {})?;
        let conn = s.connector.context("no connector")?;
        let file = t.dir().join("bulk.bin");
        random_file(&file, 200 * MIB)?;

        t.step("200 MiB agent → backend (socat), sha256 checked");
        let up = upload(t, &file, 180)?;
        t.step(&format!(
            "RESULT bulk upload: 200 MiB in {up:.1} s = {:.1} Mbit/s",
            200.0 * 8.388_608 / up
        ));

        t.step("200 MiB backend → agent (socat), sha256 checked");
        let down = download(t, &file, 180)?;
        t.step(&format!(
            "RESULT bulk download: 200 MiB in {down:.1} s = {:.1} Mbit/s",
            200.0 * 8.388_608 / down
        ));
        t.ensure_running(conn)?;
        Ok(())
    });
}

/// Size of each transfer of the bad-path test.
const BAD_PATH_MIB: u64 = 50;

#[test]
fn tcp_bad_path_loss_delay_reorder() {
    run("tcp_bad_path_loss_delay_reorder", helper_bins!(), |t| {
        let mut s = Stack::new(t)?;
        s.enable_web();
        s.start_backends()?;
        s.start_relay()?;
        s.start_connector()?;

        t.step("impairment forwarder in the agent namespace: 127.0.0.1:14433 → relay, 10 ms ± 2 ms, 2% reordered");
        let relay = format!("{}:{}", addr::RELAY, addr::RELAY_PORT);
        let impair = t.spawn(
            Node::Agent,
            "impair",
            &t.helpers().impair,
            [
                "--listen",
                "127.0.0.1:14433",
                "--target",
                &relay,
                "--delay-ms",
                "10",
                "--jitter-ms",
                "2",
                "--reorder-pct",
                "2",
                "--reorder-extra-ms",
                "15",
                "--queue",
                "8192",
                "--exit-after",
                "900",
            ],
        )?;
        std::thread::sleep(Duration::from_millis(200));
        t.ensure_running(impair)?;

        t.step("nftables in the agent namespace: 3% of outgoing UDP dropped, no direct path to the connector");
        let rules = format!(
            "table inet ztna_impair {{\n\
               chain out {{\n type filter hook output priority 0; policy accept;\n\
                 ip daddr {conn} meta l4proto udp drop\n\
                 oifname \"wan0\" meta l4proto udp numgen random mod 100 < 3 counter drop\n\
               }}\n\
               chain in {{\n type filter hook input priority 0; policy accept;\n\
                 ip saddr {conn} meta l4proto udp drop\n\
               }}\n\
             }}\n",
            conn = addr::CONN
        );
        let rules_file = t.write_file("impair.nft", &rules)?;
        t.run_ok(Node::Agent, 10, ["nft", "-f", path(&rules_file)?])?;

        s.agent_cfg.relay = "127.0.0.1:14433".to_owned();
        let agent = s.start_agent()?;
        let cfg = s.agent_cfg.clone();
        s.wait_ready(agent, &cfg)?;

        // 50 MiB each way, as when this test took 345 s (download 154 s, upload 189 s): the
        // tunnel no longer backs off on the path's loss (then 173 s: 147 s, 23 s), and the
        // connector's TCP segments to the agent ride the reliable carriage stream, so no loss
        // reaches the connector's smoltcp sender (whose recovery made the download 3 Mbit/s).
        // What bounds the upload is the agent kernel's own reaction to 3 % loss.
        let file = t.dir().join("lossy.bin");
        random_file(&file, BAD_PATH_MIB * MIB)?;
        t.step(&format!(
            "{BAD_PATH_MIB} MiB backend → agent over the impaired path, sha256 checked"
        ));
        let down = download(t, &file, 240)?;
        let counters = t.run(
            Node::Agent,
            10,
            ["nft", "list", "chain", "inet", "ztna_impair", "out"],
        )?;
        let dropped = counters
            .stdout
            .lines()
            .find(|l| l.contains("numgen"))
            .unwrap_or("")
            .trim()
            .to_owned();
        t.step(&format!(
            "RESULT bad path (3% loss, 10 ms ± 2 ms, 2% reordered): {BAD_PATH_MIB} MiB in {down:.1} s = {:.1} Mbit/s; {dropped}",
            BAD_PATH_MIB as f64 * 8.388_608 / down
        ));
        t.step(&format!(
            "{BAD_PATH_MIB} MiB agent → backend over the impaired path (3% of the data lost), sha256 checked"
        ));
        let up = upload(t, &file, 240)?;
        t.step(&format!(
            "RESULT bad path upload: {BAD_PATH_MIB} MiB in {up:.1} s = {:.1} Mbit/s",
            BAD_PATH_MIB as f64 * 8.388_608 / up
        ));
        t.ensure_running(impair)?;
        if let Some(line) = t
            .log(impair)
            .lines()
            .rev()
            .find(|l| l.contains("forwarded="))
        {
            t.step(&format!("RESULT impairment forwarder: {}", line.trim()));
        }
        Ok(())
    });
}

#[test]
fn tcp_half_close() {
    run("tcp_half_close", helper_bins!(), |t| {
        let s = web_stack(t, |_| {})?;
        let conn = s.connector.context("no connector")?;
        let hasher = t.spawn(
            Node::Backend,
            "socat-sha256",
            "socat",
            [
                format!("TCP-LISTEN:9000,bind={},reuseaddr,fork", addr::BACKEND),
                "EXEC:sha256sum".to_owned(),
            ],
        )?;
        wait_listening(t, Node::Backend, 9000, hasher)?;
        for (name, bytes) in [("small", 1000u64), ("large", 4 * MIB)] {
            let file = t.dir().join(format!("half-{name}.bin"));
            random_file(&file, bytes)?;
            let want = sha256(t, &file)?;
            t.step(&format!(
                "{bytes} bytes, then shutdown(Write), then the backend's sha256 until EOF"
            ));
            let target = web(9000);
            let out = t.run(
                Node::Agent,
                60,
                [
                    t.helpers().tcp.as_os_str(),
                    "send".as_ref(),
                    target.as_ref(),
                    "--file".as_ref(),
                    file.as_os_str(),
                    "--timeout-secs".as_ref(),
                    "45".as_ref(),
                ],
            )?;
            ensure!(out.success(), "half-closed exchange failed: {out}");
            let got = out.stdout.split_whitespace().next().unwrap_or("");
            ensure!(
                got == want,
                "the answer after half-close is {got:?}, want the sha256 {want}:\n{out}"
            );
            t.step(&format!("RESULT half-close {name}: {}", out.stderr.trim()));
        }
        t.ensure_running(conn)?;
        Ok(())
    });
}

#[test]
fn tcp_close_refused_unreachable() {
    run("tcp_close_refused_unreachable", helper_bins!(), |t| {
        let s = web_stack(t, |s| s.conn_cfg.tcp_connect_timeout_secs = Some(2))?;
        let conn = s.connector.context("no connector")?;
        let tcp = t.helpers().tcp.clone();
        let client = |args: &[&str], secs: u32| -> Result<String> {
            let mut full = vec![path(&tcp)?];
            full.extend_from_slice(args);
            let out = t.run(Node::Agent, secs, full)?;
            ensure!(out.success(), "{out}");
            Ok(out.stdout.trim().to_owned())
        };

        t.step("the backend closes: the agent reads the data, then EOF");
        let hello = t.spawn(
            Node::Backend,
            "socat-hello",
            "socat",
            [
                format!("TCP-LISTEN:9000,bind={},reuseaddr,fork", addr::BACKEND),
                "SYSTEM:echo hello-from-backend".to_owned(),
            ],
        )?;
        wait_listening(t, Node::Backend, 9000, hello)?;
        let target = web(9000);
        let line = client(&["read", &target, "--timeout-secs", "10"], 20)?;
        ensure!(
            field(&line, "result") == Some("eof")
                && field_u64(&line, "bytes")? == "hello-from-backend\n".len() as u64,
            "want the 19 bytes then EOF, got: {line}"
        );
        t.step(&format!("RESULT backend close → FIN: {line}"));
        t.kill(hello)?;

        t.step("a listed port nothing listens on (5001): connection refused within 1 s");
        let target = web(5001);
        let line = client(&["connect", &target, "--timeout-ms", "5000"], 20)?;
        let ms = field_u64(&line, "ms")?;
        ensure!(
            field(&line, "result") == Some("refused") && ms <= 1000,
            "want connection refused within 1000 ms, got: {line}"
        );
        t.step(&format!("RESULT refused port: {line}"));

        t.step("an unreachable backend (the backend drops TCP to 9000; tcp_connect_timeout_secs = 2): an error within 4 s");
        let rules = "table inet ztna_blackhole {\n chain in {\n type filter hook input priority 0; policy accept;\n tcp dport 9000 drop\n }\n}\n";
        let rules_file = t.write_file("blackhole.nft", rules)?;
        t.run_ok(Node::Backend, 10, ["nft", "-f", path(&rules_file)?])?;
        let target = web(9000);
        let line = client(&["connect", &target, "--timeout-ms", "10000"], 20)?;
        let ms = field_u64(&line, "ms")?;
        let result = field(&line, "result").unwrap_or("");
        ensure!(
            matches!(result, "refused" | "reset") && ms <= 4000,
            "want a connection error (refused or reset) within 4000 ms, got: {line}"
        );
        t.step(&format!("RESULT unreachable backend: {line}"));

        t.step("a port the service does not serve (22): an immediate RST, refused within 1 s");
        let before = s
            .conn_metrics()?
            .value("ztna_connector_refused_answered_total");
        let line = client(&["connect", &web(22), "--timeout-ms", "5000"], 20)?;
        let ms = field_u64(&line, "ms")?;
        ensure!(
            field(&line, "result") == Some("refused") && ms <= 1000,
            "want connection refused within 1000 ms, got: {line}"
        );
        t.step(&format!("RESULT unserved port: {line}"));
        t.step("ICMP to a service without ICMP (dns): administratively prohibited at once");
        let out = t.run(
            Node::Agent,
            10,
            ["ping", "-n", "-c", "1", "-W", "3", addr::DNS],
        )?;
        ensure!(
            out.stdout.contains("Packet filtered"),
            "want an ICMP 3/13 answer (ping: Packet filtered), got: {out}"
        );
        let answered = s
            .conn_metrics()?
            .value("ztna_connector_refused_answered_total")
            - before;
        ensure!(answered >= 2.0, "refused_answered grew by {answered}");
        t.step(&format!(
            "RESULT ping to dns: Packet filtered; {answered} answers counted"
        ));

        syn_flood(t, &s, &tcp)?;
        t.ensure_running(conn)?;
        Ok(())
    });
}

/// Connections whose handshake the agent never completes: the agent's kernel never sees the
/// SYN-ACKs (dropped by nftables), so `FLOOD` connects stay half-open at the connector, each
/// holding a backend connection. Each must be closed after the connector's handshake timeout
/// (5 s by default), and counted.
fn syn_flood(t: &Topology, s: &Stack<'_>, tcp: &Path) -> Result<()> {
    const FLOOD: usize = 40;
    t.step(&format!(
        "{FLOOD} SYNs whose SYN-ACK the agent never acknowledges (nftables drops the SYN-ACKs)"
    ));
    let hold = t.spawn(
        Node::Backend,
        "socat-hold",
        "socat",
        [
            format!("TCP-LISTEN:5432,bind={},reuseaddr,fork", addr::BACKEND),
            "SYSTEM:sleep 60".to_owned(),
        ],
    )?;
    wait_listening(t, Node::Backend, 5432, hold)?;
    let rules = format!(
        "table inet ztna_synack {{\n chain in {{\n type filter hook input priority 0; policy accept;\n ip saddr {} tcp flags & (syn | ack) == syn | ack drop\n }}\n}}\n",
        addr::WEB
    );
    let rules_file = t.write_file("synack.nft", &rules)?;
    t.run_ok(Node::Agent, 10, ["nft", "-f", path(&rules_file)?])?;
    let before = s
        .conn_metrics()?
        .value("ztna_connector_tcp_handshake_timeouts_total");
    let script = format!(
        "for i in $(seq {FLOOD}); do {} connect {} --timeout-ms 20000 & done; wait",
        path(tcp)?,
        web(5432)
    );
    let flood = t.spawn(Node::Agent, "syn-flood", "sh", ["-c", &script])?;
    let established = || -> usize {
        t.run(
            Node::Backend,
            5,
            ["ss", "-Htn", "state", "established", "( sport = :5432 )"],
        )
        .map(|o| o.stdout.lines().count())
        .unwrap_or(usize::MAX)
    };
    let handshake_timeouts = || {
        s.conn_metrics()
            .map(|m| m.value("ztna_connector_tcp_handshake_timeouts_total") - before)
            .unwrap_or(0.0)
    };
    // Watch until every connect was timed out and no backend connection is left; note when the
    // backend's count last rose (the last half-open connection opened).
    let start = Instant::now();
    let (mut peak, mut last) = (0, 0);
    let mut last_rise = start;
    let mut emptied = None;
    while start.elapsed() < Duration::from_secs(40) {
        let n = established();
        if n != usize::MAX {
            if n > last {
                last_rise = Instant::now();
            }
            peak = peak.max(n);
            last = n;
        }
        if n == 0 && handshake_timeouts() >= FLOOD as f64 {
            emptied = Some(Instant::now());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let timeouts = handshake_timeouts();
    let closed_after = emptied.map(|e| e.duration_since(last_rise));
    t.step(&format!(
        "RESULT SYN flood: {timeouts} handshake timeouts counted; up to {peak} half-open backend connections at once; the last closed {} after the last one opened (handshake timeout 5 s)",
        closed_after.map_or("never".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()))
    ));
    ensure!(
        timeouts >= FLOOD as f64,
        "{timeouts} of {FLOOD} handshake timeouts counted"
    );
    let closed_after = closed_after.context("backend connections were left open")?;
    ensure!(
        closed_after <= Duration::from_secs(9),
        "the last backend connection closed {:.1} s after the last one opened",
        closed_after.as_secs_f64()
    );
    let _ = t.kill(flood);
    t.run_ok(
        Node::Agent,
        10,
        ["nft", "delete", "table", "inet", "ztna_synack"],
    )?;
    t.kill(hold)?;
    Ok(())
}

#[test]
fn tcp_backpressure_bounded_memory() {
    run("tcp_backpressure_bounded_memory", helper_bins!(), |t| {
        let (root, _) = web_root(t, Some(200 * MIB))?;
        let _nginx = start_nginx(t, &root)?;
        let s = web_stack(t, |_| {})?;
        let conn = s.connector.context("no connector")?;
        let pid = t.pid(conn)?;
        std::thread::sleep(Duration::from_secs(1));
        let idle = rss_kib(pid)?;
        t.step(&format!("connector idle RSS {idle} KiB"));

        let url = format!("http://{}/big.bin", addr::WEB);
        let curl = t.spawn(
            Node::Agent,
            "curl-slow",
            "curl",
            [
                "-sS",
                "--limit-rate",
                "100k",
                "-m",
                "60",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download}\n",
                &url,
            ],
        )?;
        let mut peak = idle;
        let start = Instant::now();
        let mut samples = 0u32;
        while start.elapsed() < Duration::from_secs(10) && samples < 100 {
            std::thread::sleep(Duration::from_millis(250));
            peak = peak.max(rss_kib(pid)?);
            samples += 1;
        }
        let still_running = t.is_running(curl);
        let _ = t.signal(curl, Signal::Term);
        let _ = t.wait_exit(curl, Duration::from_secs(5));
        t.step(&format!(
            "RESULT backpressure: connector RSS idle {idle} KiB, peak {peak} KiB over 10 s \
             (+{} KiB) while curl read at 100 kB/s (curl still running: {still_running})",
            peak.saturating_sub(idle)
        ));
        ensure!(
            still_running,
            "curl --limit-rate 100k ended within 10 s: {}",
            t.log(curl)
        );
        ensure!(
            peak.saturating_sub(idle) <= 64 * 1024,
            "the connector grew by {} KiB (> 64 MiB) behind a slow reader: it buffers instead of \
             pushing back",
            peak.saturating_sub(idle)
        );
        t.ensure_running(conn)?;
        Ok(())
    });
}

/// What the leak test found on the first connector with TCP, printed with its failures.
const ALLOC_HINT: &str = "measured: with MALLOC_MMAP_THRESHOLD_=131072 in the connector's \
environment 1000 idle connections cost about 9 MiB and all of it comes back, without it about \
300 MiB that stays: glibc raises its mmap threshold after the first large free, so later \
zeroed per-connection buffers come from the heap, are memset (touched) and are kept";

/// How far above its baseline the connector's RSS may stay after connections closed.
const RSS_SLACK_KIB: u64 = 32 * 1024;

/// One cycle of the leak test: `n` connections held, then closed. Returns (fds, RSS KiB) while
/// held, and once the connector's fds are back to `fds0`.
fn hold_and_close(
    t: &Topology,
    pid: u32,
    target: &str,
    n: usize,
    (fds0, rss0): (usize, u64),
    round: u32,
) -> Result<((usize, u64), (usize, u64))> {
    let tcp = t.helpers().tcp.clone();
    let count = n.to_string();
    let holder = t.spawn(
        Node::Agent,
        &format!("tcp-hold-{round}"),
        &tcp,
        ["hold", target, "--count", &count, "--hold-secs", "300"],
    )?;
    let want = format!("held {n}");
    let took = wait_until(
        &format!("{n} connections to be held"),
        Duration::from_secs(180),
        || !t.is_running(holder) || t.log(holder).contains(&want),
    )?;
    ensure!(
        t.log(holder).contains(&want),
        "the holder failed: {}",
        t.log(holder)
    );
    let held = (fd_count(pid)?, rss_kib(pid)?);
    t.step(&format!(
        "RESULT round {round}: {n} held after {:.1} s: connector {} fds, RSS {} KiB",
        took.as_secs_f64(),
        held.0,
        held.1
    ));
    t.signal(holder, Signal::Term)?;
    t.wait_exit(holder, Duration::from_secs(10))?;
    let mut fds = held.0;
    let took = wait_until(
        "the connector's fds to return to the baseline",
        Duration::from_secs(60),
        || {
            fds = fd_count(pid).unwrap_or(usize::MAX);
            fds <= fds0 + 5
        },
    )
    .with_context(|| format!("round {round}: {fds} fds left open (baseline {fds0})"))?;
    // Deferred frees (closing states, timers) get up to 30 s to bring the RSS back.
    let target_rss = rss0 + RSS_SLACK_KIB;
    let _ = wait_until(
        "the connector's RSS to return near the baseline",
        Duration::from_secs(30),
        || rss_kib(pid).is_ok_and(|r| r <= target_rss),
    );
    let after = (fd_count(pid)?, rss_kib(pid)?);
    t.step(&format!(
        "RESULT round {round}: closed; fds back to {} in {:.1} s, RSS {} KiB",
        after.0,
        took.as_secs_f64(),
        after.1
    ));
    Ok((held, after))
}

#[test]
fn tcp_no_leaks_after_1000_connections() {
    run("tcp_no_leaks_after_1000_connections", helper_bins!(), |t| {
        let s = web_stack(t, |s| {
            s.conn_cfg.max_tcp_per_agent = Some(2000);
        })?;
        let conn = s.connector.context("no connector")?;
        let pid = t.pid(conn)?;
        let tcp = t.helpers().tcp.clone();
        let listen = backend(9000);
        let server = t.spawn(
            Node::Backend,
            "tcp-echo",
            &tcp,
            ["listen", &listen, "--echo", "--exit-after", "900"],
        )?;
        wait_listening(t, Node::Backend, 9000, server)?;
        let target = web(9000);

        t.step("warm-up: 10 connections opened and closed");
        t.run_ok(
            Node::Agent,
            30,
            [
                path(&tcp)?,
                "hold",
                &target,
                "--count",
                "10",
                "--hold-secs",
                "0",
            ],
        )?;
        std::thread::sleep(Duration::from_secs(2));
        let (fds0, rss0) = (fd_count(pid)?, rss_kib(pid)?);
        t.step(&format!("baseline: {fds0} fds, RSS {rss0} KiB"));

        t.step("two rounds of 1000 concurrent idle connections (each checked with a one-byte echo), then closed");
        let tcp_metrics = || -> String {
            s.conn_metrics()
                .map(|m| {
                    m.raw()
                        .lines()
                        .filter(|l| l.starts_with("ztna_connector_tcp"))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_else(|e| format!("(no metrics: {e:#})"))
        };
        let (held1, after1) = hold_and_close(t, pid, &target, 1000, (fds0, rss0), 1)?;
        t.step(&format!(
            "connector TCP metrics after round 1: {}",
            tcp_metrics()
        ));
        let (held2, after2) = hold_and_close(t, pid, &target, 1000, (fds0, rss0), 2)?;
        t.step(&format!(
            "connector TCP metrics after round 2: {}",
            tcp_metrics()
        ));
        t.step(&format!(
            "RESULT leaks: baseline {fds0} fds / {rss0} KiB; held {} / {} KiB then {} / {} KiB; \
             after close {} / {} KiB then {} / {} KiB",
            held1.0, held1.1, held2.0, held2.1, after1.0, after1.1, after2.0, after2.1
        ));
        let slack = RSS_SLACK_KIB;
        ensure!(
            after2.1 <= after1.1 + slack,
            "the connector's RSS grew by {} KiB from one round of 1000 connections to the next \
             ({} → {} KiB): memory is leaked or not reused per connection ({ALLOC_HINT})",
            after2.1.saturating_sub(after1.1),
            after1.1,
            after2.1
        );
        ensure!(
            after2.1 <= rss0 + slack,
            "the connector's RSS stays at {} KiB after 1000 connections closed (baseline {rss0} \
             KiB, allowed +{slack} KiB; {} KiB after the first round; {ALLOC_HINT})",
            after2.1,
            after1.1
        );
        t.ensure_running(conn)?;
        Ok(())
    });
}

#[test]
fn tcp_psql_postgres() {
    run("tcp_psql_postgres", helper_bins!(), |t| {
        t.step("a throwaway PostgreSQL cluster on the backend");
        let (_server, _pg) = ztna_e2e::postgres::start(t)?;

        let s = web_stack(t, |_| {})?;
        let conn = s.connector.context("no connector")?;
        let dsn = format!(
            "host={} port=5432 user=postgres dbname=postgres connect_timeout=5",
            addr::WEB
        );
        t.step("psql through the tunnel: SELECT 1");
        let start = Instant::now();
        let out = t.run_ok(Node::Agent, 20, ["psql", "-X", &dsn, "-tAc", "SELECT 1"])?;
        ensure!(out.stdout.trim() == "1", "SELECT 1 returned:\n{out}");
        let first = start.elapsed();
        t.step("psql: a 4 MiB result and a table round trip");
        let out = t.run_ok(
            Node::Agent,
            60,
            [
                "psql",
                "-X",
                &dsn,
                "-tAc",
                "SELECT length(string_agg(md5(g::text), '')) FROM generate_series(1, 131072) g",
            ],
        )?;
        ensure!(out.stdout.trim() == "4194304", "aggregate returned:\n{out}");
        let out = t.run_ok(
            Node::Agent,
            60,
            [
                "psql",
                "-X",
                &dsn,
                "-tA",
                "-c",
                "SELECT repeat('z', 4194304)",
            ],
        )?;
        ensure!(
            out.stdout.trim().len() == 4_194_304,
            "a 4 MiB value came back with {} bytes",
            out.stdout.trim().len()
        );
        let out = t.run_ok(
            Node::Agent,
            60,
            [
                "psql",
                "-X",
                &dsn,
                "-v",
                "ON_ERROR_STOP=1",
                "-tA",
                "-c",
                "CREATE TABLE t (id int, v text)",
                "-c",
                "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 10000) g",
                "-c",
                "SELECT count(*) FROM t",
            ],
        )?;
        ensure!(
            out.stdout.lines().any(|l| l.trim() == "10000"),
            "the table round trip returned:\n{out}"
        );
        t.step(&format!(
            "RESULT psql: SELECT 1 in {} ms, 4 MiB value and 10000-row table ok",
            first.as_millis()
        ));
        t.ensure_running(conn)?;
        Ok(())
    });
}
