//! Issue #14, a fleet of relays: three relays (one process each, one shared policy file), the
//! connector attached to all of them, the agent on the nearest (one relay is 50 ms further
//! away, through the impairment forwarder, and the agent avoids it), and the relay carrying
//! the agent's channel SIGKILLed five times while a 200 MiB download and an iperf3 run go
//! through the tunnel. The downloads must finish with the right bytes and no TCP connection may be reset; the gap in
//! traffic at each kill is measured with a 20 ms ping through the tunnel (median and worst
//! reported). Each killed relay is started again and the connector must re-attach to it before
//! the next kill. Once on the relay path, once with the direct path up (where a kill must not
//! interrupt traffic at all).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use ztna_e2e::nginx::{sha256, web_root};
use ztna_e2e::wait::wait_until_every;
use ztna_e2e::{addr, helper_bins, run, DaemonId, Node, Signal, Stack, Topology};

const MIB: u64 = 1024 * 1024;
/// The download's size.
const SIZE: u64 = 200 * MIB;
/// The relays: QUIC port and metrics address (in the relay namespace).
const RELAYS: [(u16, &str); 3] = [
    (4433, "127.0.0.1:9433"),
    (4443, "127.0.0.1:9443"),
    (4453, "127.0.0.1:9453"),
];
/// Where the agent reaches relay 0: the impairment forwarder, 25 ms each way.
const FAR_PORT: u16 = 5433;
const FAR_DELAY_MS: &str = "25";
/// Kills of the relay in use.
const KILLS: usize = 5;
/// How long a killed relay stays dead.
const DEAD_FOR: Duration = Duration::from_millis(2500);
/// The ping through the tunnel that measures the gaps: one every 20 ms.
const PING_INTERVAL: &str = "0.02";
/// iperf3's port (a port of the `web` service).
const IPERF_PORT: &str = "5001";

fn relay_at(port: u16) -> String {
    format!("{}:{port}", addr::RELAY)
}

/// The relay index behind an address as the agent lists it.
fn index_of(agent_view: &str) -> Option<usize> {
    let port: u16 = agent_view.rsplit(':').next()?.parse().ok()?;
    // Relay i through the impairment forwarder listens on FAR_PORT + i.
    if (FAR_PORT..FAR_PORT + RELAYS.len() as u16).contains(&port) {
        return Some(usize::from(port - FAR_PORT));
    }
    RELAYS.iter().position(|(p, _)| *p == port)
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The relay the agent uses now (its index), with the whole `relays` list.
fn in_use(s: &Stack<'_>) -> Result<(usize, serde_json::Value)> {
    let st = s.status(&s.agent_cfg.status_socket)?;
    let relays = st.json["relays"].clone();
    let addr = relays
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["in_use"].as_bool() == Some(true))
        .and_then(|r| r["addr"].as_str())
        .with_context(|| format!("no relay in use: {relays}"))?;
    Ok((index_of(addr).context("unknown relay address")?, relays))
}

/// The relay conn1's channel runs through now (its index), if it has one.
fn channel_relay(s: &Stack<'_>) -> Option<usize> {
    let st = s.status(&s.agent_cfg.status_socket).ok()?;
    st.connector("conn1")?["relay"].as_str().and_then(index_of)
}

fn relays_up(s: &Stack<'_>) -> usize {
    s.status(&s.agent_cfg.status_socket)
        .ok()
        .and_then(|st| {
            st.json["relays"]
                .as_array()
                .map(|a| a.iter().filter(|r| r["state"] == "up").count())
        })
        .unwrap_or(0)
}

/// Starts relay `i` of [`RELAYS`] (log `relay<i>`), with `env` added.
fn start_relay(s: &Stack<'_>, i: usize, env: &[(&str, &str)]) -> Result<DaemonId> {
    let (port, metrics) = RELAYS[i];
    s.spawn_fleet_relay(&format!("relay{i}"), port, metrics, env)
}

/// Where the agent reaches relay `i` when it is 50 ms further away.
fn far_at(i: usize) -> String {
    relay_at(FAR_PORT + i as u16)
}

/// The impairment forwarder that puts relay `i` 50 ms further away ([`far_at`]).
fn start_far_relay(t: &Topology, i: usize) -> Result<DaemonId> {
    t.spawn(
        Node::Relay,
        &format!("impair-relay{i}"),
        &t.helpers().impair,
        [
            "--listen",
            &far_at(i),
            "--target",
            &relay_at(RELAYS[i].0),
            "--delay-ms",
            FAR_DELAY_MS,
            "--exit-after",
            "900",
        ],
    )
}

/// Whether relay `i` has the connector registered (its own gauge of registered services).
fn connector_on(s: &Stack<'_>, i: usize) -> bool {
    s.relay_metrics_at(RELAYS[i].1)
        .is_ok_and(|m| m.value("ztna_relay_services_registered") >= 1.0)
}

/// Waits until the agent has a session with every relay.
fn wait_agent_on_all(s: &Stack<'_>, what: &str, within: Duration) -> Result<Duration> {
    wait_until_every(what, within, Duration::from_millis(100), || {
        relays_up(s) == 3
    })
}

fn connector_relays(s: &Stack<'_>) -> f64 {
    s.conn_metrics()
        .map(|m| m.value("ztna_connector_relay_connected"))
        .unwrap_or(-1.0)
}

/// Reply times of `ping -D` output (seconds since the epoch).
fn reply_times(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect()
}

/// The longest time without a reply around `at`: the largest interval between consecutive
/// replies that ends after `at` and starts before `until`. `None` when no reply came after
/// `at` (traffic never resumed).
fn gap_at(replies: &[f64], at: f64, until: f64) -> Option<f64> {
    let mut worst: Option<f64> = None;
    for w in replies.windows(2) {
        if w[1] > at && w[0] < until {
            worst = Some(worst.map_or(w[1] - w[0], |g: f64| g.max(w[1] - w[0])));
        }
    }
    worst
}

fn failover(t: &Topology, direct: bool) -> Result<()> {
    let mut s = Stack::new(t)?;
    s.enable_web();
    let ports: Vec<String> = RELAYS.iter().map(|(p, _)| relay_at(*p)).collect();
    s.conn_cfg.relay = ports.join(",");
    s.agent_cfg.relay = [far_at(0), ports[1].clone(), ports[2].clone()].join(",");
    if direct {
        s.agent_cfg.direct_paths = None;
    }
    let (root, _) = web_root(t, Some(SIZE))?;
    let file = root.join("big.bin");
    let _nginx = ztna_e2e::nginx::start(t, Node::Backend, &format!("{}:80", addr::BACKEND), &root)?;
    let iperf_srv = t.spawn(
        Node::Backend,
        "iperf3-server",
        "iperf3",
        ["-s", "-p", IPERF_PORT, &format!("--bind={}", addr::BACKEND)],
    )?;
    s.start_backends()?;
    t.step("relay 0 is 50 ms further away: the agent reaches it through ztna-test-impair");
    let far = start_far_relay(t, 0)?;
    let mut relays = (0..RELAYS.len())
        .map(|i| start_relay(&s, i, &[]))
        .collect::<Result<Vec<_>>>()?;
    s.start_connector()?;
    wait_until_every(
        "the connector attached to all three relays",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || connector_relays(&s) == 3.0,
    )?;
    let agent = s.start_agent()?;
    let cfg = s.agent_cfg.clone();
    s.wait_ready(agent, &cfg)?;
    wait_agent_on_all(
        &s,
        "the agent's sessions with all three relays",
        Duration::from_secs(20),
    )?;
    if direct {
        wait_until_every(
            "a direct LAN path",
            Duration::from_secs(15),
            Duration::from_millis(100),
            || {
                s.status(&cfg.status_socket)
                    .ok()
                    .and_then(|st| st.connector_path("conn1").map(str::to_owned))
                    .is_some_and(|p| p == "direct-lan")
            },
        )?;
    }
    let (first, list) = in_use(&s)?;
    let text = t.run_ok(
        Node::Agent,
        10,
        [
            ztna_e2e::bin("ztna-agent")?.as_os_str(),
            "status".as_ref(),
            "--socket".as_ref(),
            cfg.status_socket.as_os_str(),
        ],
    )?;
    t.step(&format!(
        "RESULT agent status with three relays:\n{}",
        text.stdout
    ));
    ensure!(
        first != 0,
        "the agent uses the relay 50 ms further away: {list}"
    );

    let ping = t.spawn(
        Node::Agent,
        "ping",
        "ping",
        [
            "-n",
            "-D",
            "-i",
            PING_INTERVAL,
            "-W",
            "1",
            "-w",
            "150",
            addr::ECHO,
        ],
    )?;
    let got = t.dir().join("downloaded.bin");
    let url = format!("http://{}/big.bin", addr::WEB);
    let curl = t.spawn(
        Node::Agent,
        "curl",
        "curl",
        [
            "-sS",
            "-f",
            "--limit-rate",
            "5M",
            "-m",
            "150",
            "-o",
            got.to_str().context("path")?,
            &url,
        ],
    )?;
    let iperf_json = t.dir().join("iperf3.json");
    let iperf = t.spawn(
        Node::Agent,
        "iperf3",
        "sh",
        [
            "-c",
            &format!(
                "exec iperf3 -c {} -p {IPERF_PORT} -t 45 -b 20M -J > {}",
                addr::WEB,
                iperf_json.display()
            ),
        ],
    )?;
    let quiet_from = now_secs();
    std::thread::sleep(Duration::from_secs(3));
    let mut kills = Vec::new();
    for k in 0..KILLS {
        t.ensure_running(curl)?;
        t.ensure_running(iperf)?;
        // The relay that carries the channel (usually the one in use, unless a nearer relay
        // became the primary after the channel was opened).
        let victim = channel_relay(&s).context("conn1 has no relay channel")?;
        let at = now_secs();
        t.step(&format!(
            "kill {}: SIGKILL relay {victim}, the one carrying the channel",
            k + 1
        ));
        t.kill(relays[victim])?;
        kills.push(at);
        // On the relay path the agent notices at once (traffic stops coming back); on a direct
        // path only the session's keepalive does (every 5 s), and traffic never waited.
        let moved = wait_until_every(
            "the agent to leave the dead relay",
            Duration::from_secs(15),
            Duration::from_millis(50),
            || channel_relay(&s).is_some_and(|r| r != victim),
        )?;
        let now_on = channel_relay(&s).context("conn1 has no relay channel")?;
        t.step(&format!(
            "the agent moved to relay {now_on} {:.2} s after the kill",
            moved.as_secs_f64()
        ));
        std::thread::sleep(DEAD_FOR.saturating_sub(moved));
        relays[victim] = start_relay(&s, victim, &[])?;
        // The connector's session with the dead relay looks alive until its next keepalive
        // meets the restarted relay's stateless reset: the relay's own count of registered
        // services says when the connector is back.
        let took = wait_until_every(
            "the connector re-attached to the restarted relay",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || connector_on(&s, victim),
        )?;
        wait_agent_on_all(
            &s,
            "the agent's session with the restarted relay",
            Duration::from_secs(30),
        )?;
        t.step(&format!(
            "relay {victim} back; traffic on relay {now_on}; connector re-attached {:.1} s after the restart",
            took.as_secs_f64()
        ));
        std::thread::sleep(Duration::from_millis(1500));
    }
    let status = t.wait_exit(curl, Duration::from_secs(150))?;
    ensure!(
        status.success(),
        "curl failed across the kills ({status}):\n{}",
        t.log(curl)
    );
    let status = t.wait_exit(iperf, Duration::from_secs(90))?;
    let report = std::fs::read_to_string(&iperf_json).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&report).context("iperf3 -J output")?;
    ensure!(
        status.success() && v.get("error").is_none(),
        "iperf3 failed across the kills ({status}): {}",
        v.get("error").unwrap_or(&serde_json::Value::Null)
    );
    let mbit = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e6;
    t.signal(ping, Signal::Int)?;
    t.wait_exit(ping, Duration::from_secs(10))?;
    let replies = reply_times(&t.log(ping));
    let mut gaps = Vec::new();
    for (i, at) in kills.iter().enumerate() {
        let until = kills.get(i + 1).copied().unwrap_or(at + 10.0);
        let g = gap_at(&replies, *at, until)
            .context("no ping answer after a kill: traffic never resumed")?;
        gaps.push(g * 1000.0);
    }
    // The same measure over the 3 s before the first kill, for comparison.
    let baseline = replies
        .windows(2)
        .filter(|w| w[0] >= quiet_from + 0.5 && w[1] <= kills[0])
        .map(|w| (w[1] - w[0]) * 1000.0)
        .fold(f64::NAN, f64::max);
    let mut sorted = gaps.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let worst = sorted[sorted.len() - 1];
    let (want, have) = (sha256(t, &file)?, sha256(t, &got)?);
    let st = s.status(&cfg.status_socket)?;
    let resets = st.connector_counter("conn1", "tcp_resets");
    t.step(&format!(
        "RESULT failover ({} path), {KILLS} kills of the relay carrying the channel: gap median {median:.0} ms, worst {worst:.0} ms (each: {}; without a kill: {baseline:.0} ms); 200 MiB sha256 {}; iperf3 {mbit:.1} Mbit/s; TCP resets {resets}; relay sessions {}; conn1 path {:?}",
        if direct { "direct" } else { "relay" },
        gaps.iter().map(|g| format!("{g:.0}")).collect::<Vec<_>>().join(", "),
        if want == have { "matches" } else { "DIFFERS" },
        st.json["relay_sessions"],
        st.connector_path("conn1"),
    ));
    ensure!(
        want == have,
        "download corrupted: sha256 {want} sent, {have} received"
    );
    ensure!(resets == 0, "TCP connections were reset: {}", st.json);
    ensure!(
        st.json["dropped_inbound"].as_u64() == Some(0),
        "inbound drops: {}",
        st.json
    );
    t.ensure_running(iperf_srv)?;
    t.ensure_running(far)?;
    // The goal is 2 s on the relay path and no interruption on the direct path; the bounds
    // here leave room for a loaded CI machine, the numbers above are the measurement.
    let bound = if direct { 1000.0 } else { 5000.0 };
    ensure!(
        worst <= bound,
        "a failover took {worst:.0} ms (bound {bound} ms)"
    );
    if direct {
        ensure!(
            st.connector_path("conn1") == Some("direct-lan"),
            "the direct path did not survive: {}",
            st.json
        );
    }
    Ok(())
}

#[test]
fn fleet_failover_keeps_tcp_on_the_relay_path() {
    run(
        "fleet_failover_keeps_tcp_on_the_relay_path",
        helper_bins!(),
        |t| failover(t, false),
    );
}

#[test]
fn fleet_failover_does_not_interrupt_the_direct_path() {
    run(
        "fleet_failover_does_not_interrupt_the_direct_path",
        helper_bins!(),
        |t| failover(t, true),
    );
}

#[test]
fn gaps_are_measured_between_replies_around_the_kill() {
    let replies = [1.0, 1.02, 1.04, 1.9, 1.92, 5.0, 5.02];
    assert_eq!(
        gap_at(&replies, 1.05, 11.0).map(|g| (g * 100.0).round()),
        Some(308.0)
    );
    assert_eq!(
        gap_at(&replies, 1.05, 1.5).map(|g| (g * 100.0).round()),
        Some(86.0)
    );
    assert_eq!(gap_at(&replies, 6.0, 16.0), None);
    assert_eq!(index_of("10.10.0.1:5433"), Some(0));
    assert_eq!(index_of("10.10.0.1:4453"), Some(2));
    assert_eq!(index_of("10.10.0.1:5435"), Some(2));
    assert_eq!(
        reply_times(
            "[1764650000.250000] 64 bytes from 10.100.0.1: icmp_seq=1 ttl=63 time=0.4 ms\nno\n"
        ),
        vec![1764650000.25]
    );
}

/// Relays share no state, only the policy file; each reloads it on its own. While they
/// disagree, each enforces the policy it has loaded: a relay that has not reloaded yet (relay 0
/// here, whose file poll is an hour) still grants what the others, reloaded, refuse; after its
/// reload (SIGHUP) it refuses the same. Checked with an agent pinned to one relay at a time.
#[test]
fn fleet_relays_apply_the_shared_policy_each_on_its_own_reload() {
    run(
        "fleet_relays_apply_the_shared_policy_each_on_its_own_reload",
        helper_bins!(),
        |t| {
            let mut s = Stack::new(t)?;
            s.enable_web();
            s.relay_cfg.reload_poll_secs = Some(1);
            let ports: Vec<String> = RELAYS.iter().map(|(p, _)| relay_at(*p)).collect();
            s.conn_cfg.relay = ports.join(",");
            s.agent_cfg.withdraw_grace_secs = Some(1);
            s.start_backends()?;
            let mut relays = Vec::new();
            for i in 0..RELAYS.len() {
                let stale: &[(&str, &str)] = if i == 0 {
                    &[("ZTNA_RELOAD_POLL_SECS", "3600")]
                } else {
                    &[]
                };
                relays.push(start_relay(&s, i, stale)?);
            }
            s.start_connector()?;
            wait_until_every(
                "the connector registered with all three relays",
                Duration::from_secs(20),
                Duration::from_millis(100),
                || (0..RELAYS.len()).all(|i| connector_on(&s, i)),
            )?;
            // An agent on one relay only: whether that relay lets alice reach `web`.
            let grants_web = |s: &Stack<'_>, relay: usize, name: &str| -> Result<bool> {
                let mut cfg = s.agent_cfg.clone();
                cfg.relay = ports[relay].clone();
                let agent = s.spawn_agent(name, &cfg)?;
                s.wait_ready(agent, &cfg)?;
                let st = s.status(&cfg.status_socket)?;
                let web = st.connector_services("conn1").iter().any(|n| n == "web");
                t.signal(agent, Signal::Term)?;
                t.wait_exit(agent, Duration::from_secs(15))?;
                Ok(web)
            };
            ensure!(
                grants_web(&s, 1, "agent-before")?,
                "relay 1 refuses web before any change"
            );

            t.step("policy file changed: group eng may no longer reach web");
            for a in s.relay_cfg.access.iter_mut() {
                a.services.retain(|n| n != "web");
            }
            t.write_file("relay.toml", &s.relay_cfg.to_toml())?;
            std::thread::sleep(Duration::from_secs(3));
            let r1 = grants_web(&s, 1, "agent-r1")?;
            let r2 = grants_web(&s, 2, "agent-r2")?;
            let stale = grants_web(&s, 0, "agent-r0-stale")?;
            t.step(&format!(
                "RESULT while the relays disagree: relay 1 grants web {r1}, relay 2 {r2}, relay 0 (not reloaded yet) {stale}"
            ));
            ensure!(!r1 && !r2, "a reloaded relay still grants web");
            ensure!(stale, "relay 0 reloaded by itself (its poll is an hour)");

            t.signal(relays[0], Signal::Hup)?;
            wait_until_every(
                "relay 0 to log its reload",
                Duration::from_secs(10),
                Duration::from_millis(100),
                || t.log(relays[0]).contains("policy reloaded"),
            )?;
            let after = grants_web(&s, 0, "agent-r0-reloaded")?;
            t.step(&format!(
                "RESULT after relay 0's reload (SIGHUP): relay 0 grants web {after}"
            ));
            ensure!(!after, "relay 0 grants web after its reload");
            Ok(())
        },
    );
}

/// Any relay can introduce any agent to any connector only if the connector is attached to
/// it: a relay the connector has not found (yet) refuses the channel, and the agent asks
/// another relay instead of retrying the same one. Here the connector lists relays 1 and 2
/// only, and relay 0 is the agent's nearest (the others are 50 ms further away).
#[test]
fn fleet_agents_reach_a_connector_through_another_relay() {
    run(
        "fleet_agents_reach_a_connector_through_another_relay",
        helper_bins!(),
        |t| {
            let mut s = Stack::new(t)?;
            let ports: Vec<String> = RELAYS.iter().map(|(p, _)| relay_at(*p)).collect();
            s.conn_cfg.relay = ports[1..].join(",");
            s.agent_cfg.relay = [ports[0].clone(), far_at(1), far_at(2)].join(",");
            s.start_backends()?;
            let forwarders = [start_far_relay(t, 1)?, start_far_relay(t, 2)?];
            for i in 0..RELAYS.len() {
                start_relay(&s, i, &[])?;
            }
            s.start_connector()?;
            let agent = s.start_agent()?;
            let cfg = s.agent_cfg.clone();
            // The agent's relay 0 answers first and lists no connector: conn1's services come
            // from the others' catalogs, so wait for the fleet.
            wait_agent_on_all(
                &s,
                "the agent's sessions with all three relays",
                Duration::from_secs(20),
            )?;
            let st = s.wait_ready(agent, &cfg)?;
            let on = st
                .connector("conn1")
                .and_then(|c| c["relay"].as_str())
                .and_then(index_of)
                .with_context(|| format!("conn1 has no relay channel: {}", st.json))?;
            let (primary, list) = in_use(&s)?;
            t.step(&format!(
                "RESULT the connector is on relays 1 and 2 only; the agent's nearest is relay {primary}; its channel to conn1 runs through relay {on}: {list}"
            ));
            ensure!(on != 0, "a channel through a relay the connector is not on");
            for f in forwarders {
                t.ensure_running(f)?;
            }
            Ok(())
        },
    );
}
