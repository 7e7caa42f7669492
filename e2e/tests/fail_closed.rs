//! Issue #10, the agent's trust boundaries: it fails closed while the relay is away (service
//! routes stay, nothing to a service address leaves in the clear), its outer socket is exempt
//! from the tunnel's routes (a route to the relay through the tunnel captures nothing), and a
//! permanent refusal ends `ztna-agent up` with a distinct exit code.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ztna_e2e::config::AgentConfig;
use ztna_e2e::pki::{PkiDir, Role};
use ztna_e2e::topology::DaemonId;
use ztna_e2e::wait::{wait_until, wait_until_every};
use ztna_e2e::{addr, helper_bins, run, Node, Signal, Stack, Topology};

/// Starts `tcpdump -w FILE -i IFACE FILTER` in `node` and waits until it listens.
fn capture(
    t: &Topology,
    node: Node,
    name: &str,
    iface: &str,
    filter: &str,
) -> Result<(DaemonId, PathBuf)> {
    let file = t.dir().join(format!("{name}.pcap"));
    let mut args: Vec<String> = ["-U", "-n", "-i", iface, "-w"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    args.push(file.to_str().context("non-UTF-8 path")?.to_owned());
    args.extend(filter.split_whitespace().map(str::to_owned));
    let id = t.spawn(node, name, "tcpdump", args)?;
    wait_until("tcpdump to listen", Duration::from_secs(10), || {
        !t.is_running(id) || t.log(id).contains("listening on")
    })?;
    t.ensure_running(id)?;
    Ok((id, file))
}

/// Stops a capture and returns how many packets it holds.
fn packets_captured(t: &Topology, id: DaemonId, file: &Path) -> Result<usize> {
    std::thread::sleep(Duration::from_millis(300));
    t.signal(id, Signal::Int)?;
    t.wait_exit(id, Duration::from_secs(10))?;
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    Ok(ztna_e2e::pcap::packets(&bytes)?.len())
}

/// Sends SIGSTOP or SIGCONT to a daemon (the topology's signals are only INT, TERM and KILL).
fn stop_cont(t: &Topology, id: DaemonId, sig: &str) -> Result<()> {
    let pid = t.pid(id)?.to_string();
    let out = t.host(5, ["kill", sig, &pid])?;
    ensure!(out.success(), "{out}");
    Ok(())
}

/// The table the agent's route to `dst` is in (`main` when `ip route` names none).
fn agent_route_table(t: &Topology, dst: &str) -> Result<String> {
    let out = t.host(
        5,
        [
            "ip",
            "-n",
            &t.ns(Node::Agent),
            "-4",
            "route",
            "show",
            "table",
            "all",
            dst,
        ],
    )?;
    ensure!(out.success(), "{out}");
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("ztna0"))
        .with_context(|| format!("no route to {dst} via ztna0:\n{}", out.stdout))?;
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "table" {
            return Ok(words.next().unwrap_or("main").to_owned());
        }
    }
    Ok("main".to_owned())
}

/// Fail closed across a relay restart, with a default route in the agent's namespace: the
/// restarted relay first knows no connector (the connector is stopped for a while), so its
/// catalog is empty. The old agent removed its routes then, and pings to the service left
/// through the default route in the clear. Now routes stay (grace period), those pings are
/// dropped and counted, and nothing addressed to a service crosses the agent's uplink.
///
/// Then, on the same topology, the outer socket's exemption: a route to the relay's own address
/// through the tunnel, in the table of the service routes (what a catalog listing the relay's
/// address would install), must not capture the agent's traffic to the relay.
#[test]
fn fail_closed_and_outer_socket_exempt() {
    run("fail_closed_and_outer_socket_exempt", helper_bins!(), |t| {
        let mut s = Stack::new(t)?;
        s.start_all()?;
        let agent_ns = t.ns(Node::Agent);
        let out = t.host(
            5,
            [
                "ip",
                "-n",
                &agent_ns,
                "route",
                "replace",
                "default",
                "via",
                addr::RELAY,
            ],
        )?;
        ensure!(out.success(), "{out}");
        t.step("default route via the WAN in the agent's namespace");
        let (cap, pcap) = capture(
            t,
            Node::Agent,
            "tcpdump-uplink",
            "wan0",
            "net 10.100.0.0/16",
        )?;

        let relay = s.relay.context("relay not started")?;
        let conn = s.connector.context("connector not started")?;
        t.step("SIGKILL the relay; stop the connector so the new relay knows no service");
        t.kill(relay)?;
        stop_cont(t, conn, "-STOP")?;
        let sessions_before = s.status(&s.agent_cfg.status_socket)?.json["relay_sessions"]
            .as_u64()
            .unwrap_or(0);
        s.start_relay()?;
        wait_until_every(
            "the agent to reconnect to the restarted relay",
            Duration::from_secs(15),
            Duration::from_millis(100),
            || {
                s.status(&s.agent_cfg.status_socket).is_ok_and(|st| {
                    st.connected() && st.json["relay_sessions"].as_u64() > Some(sessions_before)
                })
            },
        )?;
        let st = s.status(&s.agent_cfg.status_socket)?;
        t.step(&format!(
            "reconnected with an empty catalog; withdrawing: {}",
            st.json["withdrawing"]
        ));
        // Both halves run to the end and report their numbers; the verdict comes last.
        let mut failures = Vec::new();
        let dev = s.agent_route_dev(addr::ECHO)?;
        if dev.as_deref() != Some("ztna0") {
            failures.push(format!(
                "the route to {} left the tunnel (now via {dev:?})",
                addr::ECHO
            ));
        }
        let out = t.run(
            Node::Agent,
            10,
            ["ping", "-n", "-c", "10", "-i", "0.2", "-W", "1", addr::ECHO],
        )?;
        t.step(&format!(
            "10 pings while the service is unreachable: {}",
            out.stdout.lines().rev().nth(1).unwrap_or("").trim()
        ));

        t.step("the connector comes back");
        stop_cont(t, conn, "-CONT")?;
        let back = Instant::now();
        wait_until_every(
            "a ping through the tunnel after the connector is back",
            Duration::from_secs(30),
            Duration::from_millis(200),
            || s.ping_once(addr::ECHO),
        )?;
        t.step(&format!(
            "tunnel back {:.2} s after the connector",
            back.elapsed().as_secs_f64()
        ));
        let plaintext = packets_captured(t, cap, &pcap)?;
        let st = s.status(&s.agent_cfg.status_socket)?;
        let dropped = st.json["dropped_tunnel_down"].as_u64().unwrap_or(0)
            + st.json["dropped_no_path"].as_u64().unwrap_or(0);
        t.step(&format!(
            "RESULT fail closed: {plaintext} packets to service addresses on the agent's uplink during the restart (must be 0); {dropped} dropped and counted by the agent"
        ));
        if plaintext != 0 {
            failures.push(format!(
                "{plaintext} packets to service addresses left the agent in the clear"
            ));
        }
        if dropped == 0 {
            failures.push(format!("no drops counted: {}", st.json));
        }

        t.step("a route to the relay's address through the tunnel, in the service routes' table");
        let table = agent_route_table(t, addr::ECHO)?;
        let relay32 = format!("{}/32", addr::RELAY);
        let out = t.host(
            5,
            [
                "ip", "-n", &agent_ns, "route", "add", &relay32, "dev", "ztna0", "table", &table,
            ],
        )?;
        ensure!(out.success(), "{out}");
        let dev = s.agent_route_dev(addr::RELAY)?;
        ensure!(
            dev.as_deref() == Some("ztna0"),
            "the planted route is not in effect for ordinary traffic (via {dev:?})"
        );
        let sessions = s.status(&s.agent_cfg.status_socket)?.json["relay_sessions"].as_u64();
        let out = t.run(
            Node::Agent,
            20,
            ["ping", "-n", "-c", "20", "-i", "0.1", "-W", "2", addr::ECHO],
        )?;
        let answered = out.stdout.contains("20 received");
        let st = s.status(&s.agent_cfg.status_socket)?;
        t.step(&format!(
            "RESULT outer socket exempt: 20 pings through the relay path with the relay's address routed into the tunnel (table {table}): {}; relay sessions {:?} -> {:?}",
            out.stdout.lines().rev().nth(1).unwrap_or("").trim(),
            sessions,
            st.json["relay_sessions"].as_u64()
        ));
        if !answered {
            failures.push(format!(
                "pings lost with the relay routed into the tunnel:\n{out}"
            ));
        }
        if !(st.connected() && st.json["relay_sessions"].as_u64() == sessions) {
            failures.push(format!("the relay session broke: {}", st.json));
        }
        ensure!(failures.is_empty(), "{}", failures.join("\n"));
        Ok(())
    });
}

/// Mints an agent certificate signed by the CA in `pki` that expired yesterday.
fn expired_agent_cert(pki: &Path, dir: &Path) -> Result<ztna_e2e::pki::CertPaths> {
    let read =
        |f: &str| std::fs::read_to_string(pki.join(f)).with_context(|| format!("reading {f}"));
    let ca_key = rcgen::KeyPair::from_pem(&read("ca.key")?)?;
    let ca = rcgen::CertificateParams::from_ca_cert_pem(&read("ca.pem")?)?.self_signed(&ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let mut p = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "alice");
    p.distinguished_name = dn;
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    p.subject_alt_names = vec![
        rcgen::SanType::URI("urn:ztna:role:agent".try_into()?),
        rcgen::SanType::URI("urn:ztna:group:eng".try_into()?),
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(10);
    p.not_after = now - time::Duration::days(1);
    let cert = p.signed_by(&key, &ca, &ca_key)?;
    let paths = ztna_e2e::pki::CertPaths {
        cert: dir.join("expired.pem"),
        key: dir.join("expired.key"),
    };
    std::fs::write(&paths.cert, cert.pem())?;
    std::fs::write(&paths.key, key.serialize_pem())?;
    Ok(paths)
}

/// An agent the relay refuses for good (another CA's certificate, an expired one), or that
/// cannot trust the relay (a wrong CA file), exits with the documented code within
/// [`REFUSAL_BUDGET`] instead of retrying forever.
const REFUSAL_BUDGET: Duration = Duration::from_secs(15);

#[test]
fn permanent_refusal_ends_the_agent() {
    run("permanent_refusal_ends_the_agent", helper_bins!(), |t| {
        let mut s = Stack::new(t)?;
        s.start_relay()?;
        let other = PkiDir::init(&t.dir().join("other-pki"), Some("elsewhere"))?;
        let stranger = other.issue(Role::Agent, "alice", &["eng"])?;
        let expired = expired_agent_cert(s.pki.dir(), t.dir())?;
        let alice = s.pki.issue(Role::Agent, "alice2", &["eng"])?;
        let cases: [(&str, PathBuf, ztna_e2e::pki::CertPaths, i32); 3] = [
            ("a certificate from another CA", s.pki.ca(), stranger, 3),
            ("an expired certificate", s.pki.ca(), expired, 3),
            ("a CA file that is not the relay's", other.ca(), alice, 4),
        ];
        for (i, (what, ca, cert, code)) in cases.into_iter().enumerate() {
            let mut cfg = AgentConfig::demo(&ca, &cert, &t.dir().join(format!("refused{i}.sock")));
            cfg.tun = format!("ztref{i}");
            cfg.direct_paths = Some(false);
            let started = Instant::now();
            let id = s.spawn_agent(&format!("agent-refused{i}"), &cfg)?;
            let status = t.wait_exit(id, REFUSAL_BUDGET).with_context(|| {
                format!("the agent with {what} still runs after {REFUSAL_BUDGET:?}")
            })?;
            let took = started.elapsed();
            let log = t.log(id);
            let errors = log.lines().filter(|l| l.contains("ERROR")).count();
            t.step(&format!(
                "RESULT refusal: agent with {what} exited with {:?} after {:.2} s ({errors} ERROR lines)",
                status.code(),
                took.as_secs_f64()
            ));
            if status.code() != Some(code) {
                bail!("agent with {what}: exit {status}, want code {code}\n{log}");
            }
            ensure!(
                log.contains("giving up"),
                "no clear message in the log:\n{log}"
            );
            let out = t.host(
                5,
                ["ip", "-n", &t.ns(Node::Agent), "link", "show", &cfg.tun],
            )?;
            ensure!(!out.success(), "{} left behind", cfg.tun);
        }
        Ok(())
    });
}
