//! Issue #5: direct paths. Hole punching through simulated NATs (`deploy/netns/nat.sh`), path
//! selection (LAN > WAN > relay), fallback to the relay and the way back, the relay leaving the
//! data path, forged probes, and roaming.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ztna_e2e::nat::{self, NatType, Side};
use ztna_e2e::wait::wait_until_every;
use ztna_e2e::{addr, helper_bins, run, run_with, Stack, Topology};

/// How long a direct path may take to come up where one is possible.
const DIRECT_BUDGET: Duration = Duration::from_secs(15);

/// Waits until `conn1`'s path satisfies `want`; returns how long that took.
fn wait_path(
    s: &Stack<'_>,
    what: &str,
    budget: Duration,
    want: impl Fn(&str) -> bool,
) -> Result<Duration> {
    let started = Instant::now();
    wait_until_every(what, budget, Duration::from_millis(100), || want(&s.path()))
        .with_context(|| format!("path is {}", s.path()))?;
    Ok(started.elapsed())
}

/// `count` pings from the agent to the echo service, 50 ms apart; every one must be answered.
fn quick_pings(t: &Topology, count: u32) -> Result<()> {
    let n = count.to_string();
    let out = t.run_ok(
        ztna_e2e::Node::Agent,
        10 + count / 10,
        ["ping", "-n", "-c", &n, "-i", "0.05", "-W", "2", addr::ECHO],
    )?;
    ensure!(
        out.stdout.contains(&format!("{count} received")),
        "pings lost: {out}"
    );
    Ok(())
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
            quick_pings(t, 20)?;
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

            // The host moves (its uplink address changes, as with a new lease): the agent's
            // netlink watch makes it offer the new address at once, not at the next periodic
            // refresh (5 s), and the tunnel carries on.
            t.step(
                "the agent's uplink address changes to 10.10.0.77: offered as a candidate at once",
            );
            let agent = s.agent.context("agent not started")?;
            let news = |log: &str| {
                log.lines()
                    .filter(|l| l.contains("network changed; gathering candidates again"))
                    .count()
            };
            let before = news(&t.log(agent));
            t.run_ok(
                ztna_e2e::Node::Agent,
                5,
                [
                    "sh",
                    "-c",
                    "ip addr del 10.10.0.2/24 dev wan0 && ip addr add 10.10.0.77/24 dev wan0",
                ],
            )?;
            let offered = |st: &ztna_e2e::AgentStatus| {
                st.connector("conn1").is_some_and(|c| {
                    c["direct"]["local_candidates"]
                        .to_string()
                        .contains("10.10.0.77")
                })
            };
            let took = ztna_e2e::wait_until(
                "the agent to offer 10.10.0.77",
                Duration::from_secs(3),
                || {
                    news(&t.log(agent)) > before
                        && s.status(&s.agent_cfg.status_socket)
                            .is_ok_and(|st| offered(&st))
                },
            )?;
            t.step(&format!(
                "RESULT new uplink address offered {:.2} s after the move",
                took.as_secs_f64()
            ));
            let back = wait_until_every(
                "pings through the tunnel after the move",
                Duration::from_secs(10),
                Duration::from_millis(200),
                || s.ping_once(addr::ECHO),
            )?;
            let path = wait_path(&s, "a direct path again", Duration::from_secs(10), |p| {
                p == "direct-lan"
            })?;
            t.step(&format!(
                "RESULT pings through the tunnel {:.2} s after the move; direct-lan again {:.2} s after that",
                (took + back).as_secs_f64(),
                path.as_secs_f64()
            ));
            Ok(())
        },
    );
}

/// The probe magic and version (`ztna_proto::probe`), to find and forge probes in raw bytes.
const PROBE_HEAD: [u8; 5] = [0x00, b'z', b't', b'p', 2];
/// Where a probe's tag starts (after magic, version, kind and direction).
const TAG_AT: usize = 7;

/// A probe of 80 bytes from the agent with `tag` and a MAC that can't be right (random bytes).
fn forged_probe(kind: u8, tag: &[u8]) -> Result<Vec<u8>> {
    let mut p = PROBE_HEAD.to_vec();
    p.push(kind);
    p.push(1); // agent → connector
    p.extend_from_slice(tag);
    let noise = hex(&ztna_e2e::random_hex(24 + 32)?)?;
    p.extend_from_slice(&noise[..24]); // txid, seq, time
    p.resize(80 - 32, 0);
    p.extend_from_slice(&noise[24..]);
    Ok(p)
}

fn hex(s: &str) -> Result<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("hex"))
        .collect()
}

#[test]
fn forged_probes_are_counted_and_change_nothing() {
    run(
        "forged_probes_are_counted_and_change_nothing",
        helper_bins!(),
        |t| {
            let mut s = Stack::new(t)?;
            s.agent_cfg.direct_paths = None;
            s.start_all()?;
            wait_path(&s, "a direct LAN path", DIRECT_BUDGET, |p| {
                p == "direct-lan"
            })?;

            t.step("capture the agent's probes on the connector's link to learn a real tag");
            let pcap = t.dir().join("probes.pcap");
            let filter = format!("udp and src host {} and udp[8:4] = 0x007a7470", addr::AGENT);
            t.run_ok(
                ztna_e2e::Node::Conn,
                10,
                [
                    "tcpdump",
                    "-i",
                    "wan0",
                    "-c",
                    "3",
                    "-w",
                    pcap.to_str().context("path")?,
                    &filter,
                ],
            )?;
            let bytes = std::fs::read(&pcap)?;
            let at = bytes
                .windows(PROBE_HEAD.len())
                .position(|w| w == PROBE_HEAD)
                .context("no probe in the capture")?;
            let tag = bytes[at + TAG_AT..at + TAG_AT + 8].to_vec();

            let before = s
                .conn_metrics()?
                .value("ztna_connector_probes_rejected_total");
            let forged = [
                (
                    "ping with the real tag and a wrong MAC",
                    forged_probe(1, &tag)?,
                ),
                (
                    "pong with the real tag and a wrong MAC",
                    forged_probe(2, &tag)?,
                ),
                (
                    "ping for an unknown connection",
                    forged_probe(1, b"\x01\x02\x03\x04\x05\x06\x07\x08")?,
                ),
                ("truncated probe", PROBE_HEAD.to_vec()),
            ];
            const EACH: usize = 5;
            for (what, bytes) in &forged {
                t.step(&format!("inject {EACH} × {what} from the relay's host"));
                let file = t.dir().join("forged.bin");
                std::fs::write(&file, bytes)?;
                for _ in 0..EACH {
                    t.run_ok(
                        ztna_e2e::Node::Relay,
                        5,
                        [
                            "socat".to_owned(),
                            "-u".to_owned(),
                            format!("OPEN:{}", file.display()),
                            format!("UDP-SENDTO:{}:4434", addr::CONN),
                        ],
                    )?;
                }
            }
            let want = (forged.len() * EACH) as f64;
            let took = wait_until_every(
                "the connector to count the forged probes",
                Duration::from_secs(5),
                Duration::from_millis(100),
                || {
                    s.conn_metrics()
                        .map(|m| m.value("ztna_connector_probes_rejected_total") - before >= want)
                        .unwrap_or(false)
                },
            )?;
            let rejected = s
                .conn_metrics()?
                .value("ztna_connector_probes_rejected_total")
                - before;
            t.step(&format!(
                "{rejected} probes rejected (after {:.2} s)",
                took.as_secs_f64()
            ));
            let st = s.status(&s.agent_cfg.status_socket)?;
            ensure!(s.path() == "direct-lan", "the path changed: {}", st.json);
            t.ping_all(ztna_e2e::Node::Agent, addr::ECHO, 3)?;
            Ok(())
        },
    );
}

/// Bytes counted by every `counter` of an nftables table in `node`.
fn nft_bytes(t: &Topology, node: ztna_e2e::Node, table: &str) -> Result<Vec<u64>> {
    let out = t.run_ok(node, 5, ["nft", "list", "table", "inet", table])?;
    Ok(out
        .stdout
        .split("bytes ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect())
}

#[test]
fn probes_cannot_be_aimed_at_third_parties() {
    run(
        "probes_cannot_be_aimed_at_third_parties",
        helper_bins!(),
        |t| {
            use ztna_e2e::Node;
            t.step("the agent also holds a backend-network address (a container bridge, say): 10.10.3.77 on lo");
            t.run_ok(
                Node::Agent,
                5,
                ["ip", "addr", "add", "10.10.3.77/32", "dev", "lo"],
            )?;
            t.step("count what the connector's UDP socket sends to its backend network, and to the relay's host other than the relay (its main and its second observation port)");
            let rules = format!(
            "table inet ztna_victims {{\n chain out {{\n type filter hook output priority 0; policy accept;\n ip daddr 10.10.3.0/24 udp sport 4434 counter\n ip daddr {} udp sport 4434 udp dport != {{ {}, {} }} counter\n }}\n}}\n",
            addr::RELAY,
            addr::RELAY_PORT,
            addr::RELAY_PORT + ztna_proto::observe::PORT_OFFSET
        );
            let file = t.write_file("victims.nft", &rules)?;
            t.run_ok(
                Node::Conn,
                10,
                ["nft", "-f", file.to_str().context("path")?],
            )?;

            let mut s = Stack::new(t)?;
            s.agent_cfg.direct_paths = None;
            s.start_all()?;
            wait_path(&s, "a direct LAN path", DIRECT_BUDGET, |p| {
                p == "direct-lan"
            })?;
            let st = s.status(&s.agent_cfg.status_socket)?;
            let json = st.json["connectors"].to_string();
            t.step(&format!("status: {json}"));
            ensure!(
                !json.contains("10.10.3."),
                "a backend-network address is a candidate or a target: {json}"
            );

            t.step("capture one of the agent's pings on the connector's link");
            let pcap = t.dir().join("ping.pcap");
            let filter = format!(
                "udp and src host {} and udp[8:4] = 0x007a7470 and udp[13] = 1",
                addr::AGENT
            );
            t.run_ok(
                Node::Conn,
                10,
                [
                    "tcpdump",
                    "-i",
                    "wan0",
                    "-c",
                    "1",
                    "-w",
                    pcap.to_str().context("path")?,
                    &filter,
                ],
            )?;
            let bytes = std::fs::read(&pcap)?;
            let at = bytes
                .windows(PROBE_HEAD.len())
                .position(|w| w == PROBE_HEAD)
                .context("no probe in the capture")?;
            let ping = bytes[at..].to_vec();
            let replay = t.dir().join("replay.bin");
            std::fs::write(&replay, &ping)?;
            t.step(&format!(
                "captured a {}-byte ping; replaying it 4 s later, 20 times, from the relay's host",
                ping.len()
            ));
            std::thread::sleep(Duration::from_secs(4));
            let m0 = s.conn_metrics()?;
            const REPLAYS: usize = 20;
            for _ in 0..REPLAYS {
                t.run_ok(
                    Node::Relay,
                    5,
                    [
                        "socat".to_owned(),
                        "-u".to_owned(),
                        format!("OPEN:{}", replay.display()),
                        format!("UDP-SENDTO:{}:4434", addr::CONN),
                    ],
                )?;
            }
            let counted = |m: &ztna_e2e::Metrics| {
                m.value("ztna_connector_probes_replayed_total")
                    + m.value("ztna_connector_probes_stale_total")
                    - m0.value("ztna_connector_probes_replayed_total")
                    - m0.value("ztna_connector_probes_stale_total")
            };
            wait_until_every(
                "the connector to refuse the replays",
                Duration::from_secs(5),
                Duration::from_millis(100),
                || {
                    s.conn_metrics()
                        .map(|m| counted(&m) >= REPLAYS as f64)
                        .unwrap_or(false)
                },
            )?;
            // Anything sent in answer would have gone out by now; wait a punch window to be sure.
            std::thread::sleep(Duration::from_secs(2));
            let victims = nft_bytes(t, Node::Conn, "ztna_victims")?;
            let m = s.conn_metrics()?;
            t.step(&format!(
            "RESULT bytes from the connector's UDP socket: to the backend network {}, to the replayer {}; replays refused {} (replayed +{}, stale +{}); status {}",
            victims.first().copied().unwrap_or(0),
            victims.get(1).copied().unwrap_or(0),
            counted(&m),
            m.value("ztna_connector_probes_replayed_total") - m0.value("ztna_connector_probes_replayed_total"),
            m.value("ztna_connector_probes_stale_total") - m0.value("ztna_connector_probes_stale_total"),
            s.path()
        ));
            ensure!(victims.len() == 2, "nft counters: {victims:?}");
            ensure!(
                victims.iter().all(|b| *b == 0),
                "the connector sent bytes to a non-candidate address: {victims:?}"
            );
            ensure!(s.path() == "direct-lan", "the path changed: {}", s.path());
            t.ping_all(Node::Agent, addr::ECHO, 3)?;
            Ok(())
        },
    );
}

/// Whether the design expects a direct path between an agent behind `a` and a connector behind
/// `c`: everything goes direct except symmetric against symmetric. Symmetric against
/// full-cone or address-restricted works through a peer-reflexive candidate: the symmetric
/// side's pings come from a new port, which the other side's filter lets in and answers;
/// symmetric against port-restricted by port prediction (`core::birthday`, within 10 s in
/// 99.7 % of attempts by its arithmetic; `nat_zoo.rs` measures it).
fn expect_direct(a: NatType, c: NatType) -> bool {
    !matches!((a, c), (NatType::Sym, NatType::Sym))
}

/// Runs `body` in a topology built by `build`, and returns its result; the topology prints its
/// logs on failure when dropped.
fn with_nat<T>(build: Result<Topology>, body: impl FnOnce(&Topology) -> Result<T>) -> Result<T> {
    let t = build?;
    let r = body(&t);
    if r.is_ok() {
        t.mark_passed();
    }
    r
}

/// Starts the demo stack with direct paths on; returns it and when the agent was started.
fn start_direct_stack(t: &Topology) -> Result<(Stack<'_>, Instant)> {
    let mut s = Stack::new(t)?;
    s.agent_cfg.direct_paths = None;
    s.enable_web();
    s.start_backends()?;
    s.start_relay()?;
    s.start_connector()?;
    let started = Instant::now();
    let agent = s.start_agent()?;
    let cfg = s.agent_cfg.clone();
    s.wait_ready(agent, &cfg)?;
    Ok((s, started))
}

/// Agent and connector each behind a port-restricted NAT (Linux masquerade).
fn behind_port_nats(name: &str, helpers: ztna_e2e::HelperBins) -> Result<Topology> {
    nat::up(name, helpers, NatType::Port, NatType::Port)
}

/// [`start_direct_stack`], then waits for the direct WAN path.
fn direct_wan_stack(t: &Topology) -> Result<Stack<'_>> {
    let (s, _) = start_direct_stack(t)?;
    wait_path(&s, "a direct WAN path", DIRECT_BUDGET, |p| {
        p == "direct-wan"
    })?;
    Ok(s)
}

/// The four NAT behaviours of the matrix.
const NATS: [NatType; 4] = [NatType::Full, NatType::Addr, NatType::Port, NatType::Sym];

#[test]
fn nat_matrix() {
    if std::env::var_os("ZTNA_E2E_SKIP").is_some_and(|v| v == "1") {
        return;
    }
    let mut cells = Vec::new();
    for a in NATS {
        for c in NATS {
            let direct = expect_direct(a, c);
            let name = format!("nat_matrix_{}_{}", a.as_arg(), c.as_arg());
            let result = with_nat(nat::up(&name, helper_bins!(), a, c), |t| {
                let (s, started) = start_direct_stack(t)?;
                let outcome = if direct {
                    wait_path(&s, "a direct WAN path", DIRECT_BUDGET, |p| {
                        p == "direct-wan"
                    })?;
                    format!("direct {:.1} s", started.elapsed().as_secs_f64())
                } else {
                    // Longer than a punch window: the path must stay on the relay throughout.
                    let until = Instant::now() + Duration::from_secs(6);
                    while Instant::now() < until {
                        let p = s.path();
                        ensure!(p == "relay", "expected the relay path, got {p}");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    "relay".to_owned()
                };
                quick_pings(t, 5)?;
                let errors = s.error_lines();
                ensure!(
                    errors.is_empty(),
                    "errors in the logs:\n{}",
                    errors.join("\n")
                );
                Ok(outcome)
            });
            let shown = match &result {
                Ok(o) => o.clone(),
                Err(e) => format!("FAILED: {e:#}"),
            };
            eprintln!("[nat_matrix] agent {a:<5} × connector {c:<5}: {shown}");
            cells.push((a, c, direct, result));
        }
    }
    let mut table = String::from("| agent \\ connector |");
    for c in NATS {
        table.push_str(&format!(" {c} |"));
    }
    table.push_str("\n|---|");
    for _ in NATS {
        table.push_str("---|");
    }
    for a in NATS {
        table.push_str(&format!("\n| **{a}** |"));
        for c in NATS {
            let (_, _, _, r) = cells
                .iter()
                .find(|x| x.0 == a && x.1 == c)
                .expect("every cell ran");
            match r {
                Ok(o) => table.push_str(&format!(" {o} |")),
                Err(_) => table.push_str(" **failed** |"),
            }
        }
    }
    eprintln!("\nNAT matrix (time from agent start to the direct path):\n{table}\n");
    let failed: Vec<String> = cells
        .iter()
        .filter_map(|(a, c, d, r)| {
            r.as_ref().err().map(|e| {
                let want = if *d { "direct" } else { "relay" };
                format!("{a} × {c} (want {want}): {e:#}")
            })
        })
        .collect();
    assert!(failed.is_empty(), "cells failed:\n{}", failed.join("\n"));
}

#[test]
fn lan_behind_one_nat_takes_the_direct_lan_path() {
    let name = "lan_behind_one_nat_takes_the_direct_lan_path";
    let lan = |n: &str, h| nat::lan(n, h, NatType::Port);
    run_with(name, helper_bins!(), lan, |t| {
        let (s, started) = start_direct_stack(t)?;
        wait_path(&s, "a direct LAN path", DIRECT_BUDGET, |p| {
            p == "direct-lan"
        })?;
        t.step(&format!(
            "direct-lan {:.2} s after the agent started",
            started.elapsed().as_secs_f64()
        ));
        let st = s.status(&s.agent_cfg.status_socket)?;
        let active = st.connector("conn1").map(|c| c["direct"]["addr"].clone());
        ensure!(
            active.as_ref().and_then(|a| a.as_str())
                == Some(format!("{}:4434", nat::addr::CONN_SHARED_LAN).as_str()),
            "the active path is not the connector's LAN address: {}",
            st.json
        );
        t.ping_all(ztna_e2e::Node::Agent, addr::ECHO, 3)?;
        Ok(())
    });
}

/// Blocks the direct path (`nat.sh block`), waits (at most 5 s) for the fallback to the relay,
/// lifts the block `hold` after it was set, and waits (at most `budget`) for the direct WAN path
/// to return.
fn block_and_lift(t: &Topology, s: &Stack<'_>, hold: Duration, budget: Duration) -> Result<()> {
    nat::block(t)?;
    let blocked = Instant::now();
    let to_relay = wait_path(
        s,
        "the fallback to the relay",
        Duration::from_secs(5),
        |p| p == "relay",
    )?;
    t.step(&format!(
        "on the relay {:.2} s after the block",
        to_relay.as_secs_f64()
    ));
    std::thread::sleep(hold.saturating_sub(blocked.elapsed()));
    nat::unblock(t)?;
    let back = wait_path(s, "the return to the direct path", budget, |p| {
        p == "direct-wan"
    })?;
    t.step(&format!(
        "direct again {:.2} s after the block was lifted",
        back.as_secs_f64()
    ));
    Ok(())
}

/// Parses `ping -D -O` output into the sequence numbers answered.
fn answered_seqs(out: &str) -> Vec<u64> {
    out.lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("icmp_seq="))
                .and_then(|n| n.parse().ok())
        })
        .collect()
}

/// The longest run of unanswered sequence numbers in `1..=sent`.
fn longest_gap(answered: &[u64], sent: u64) -> u64 {
    let mut got = vec![false; sent as usize + 1];
    for &s in answered {
        if let Some(g) = got.get_mut(s as usize) {
            *g = true;
        }
    }
    let (mut best, mut run) = (0, 0);
    for g in got.iter().skip(1) {
        run = if *g { 0 } else { run + 1 };
        best = best.max(run);
    }
    best
}

#[test]
fn fallback_to_the_relay_and_back() {
    run_with(
        "fallback_to_the_relay_and_back",
        helper_bins!(),
        behind_port_nats,
        |t| {
            let s = direct_wan_stack(t)?;

            t.step("relay stops carrying data once the path is direct");
            let before = relay_forwarded(&s)?;
            quick_pings(t, 20)?;
            let relayed = relay_forwarded(&s)? - before;
            ensure!(
                relayed == 0.0,
                "the relay forwarded {relayed} datagrams on a direct path"
            );

            t.step("ping every 100 ms; block the direct path after 3 s, lift the block after 8 s");
            let ping = t.spawn(
                ztna_e2e::Node::Agent,
                "ping",
                "ping",
                [
                    "-n",
                    "-D",
                    "-O",
                    "-i",
                    "0.1",
                    "-c",
                    "250",
                    "-W",
                    "1",
                    addr::ECHO,
                ],
            )?;
            std::thread::sleep(Duration::from_secs(3));
            block_and_lift(t, &s, Duration::from_secs(8), Duration::from_secs(30))?;
            t.wait_exit(ping, Duration::from_secs(40))?;
            let out = std::fs::read_to_string(t.log_path(ping).context("ping log")?)?;
            let answered = answered_seqs(&out);
            let gap = longest_gap(&answered, 250);
            t.step(&format!(
                "{} of 250 pings answered; longest gap {} pings ({} ms)",
                answered.len(),
                gap,
                gap * 100
            ));
            ensure!(
                gap * 100 < 2000,
                "traffic stopped for {} ms during the fallback",
                gap * 100
            );

            t.step("iperf3 TCP across a fallback and a return to the direct path");
            let srv = t.spawn(
                ztna_e2e::Node::Backend,
                "iperf3-server",
                "iperf3",
                ["-s", "-p", "5001", "-1", "--forceflush"],
            )?;
            std::thread::sleep(Duration::from_millis(300));
            let client = t.spawn(
                ztna_e2e::Node::Agent,
                "iperf3-client",
                "iperf3",
                [
                    "-c",
                    addr::WEB,
                    "-p",
                    "5001",
                    "-t",
                    "30",
                    "-i",
                    "5",
                    "--connect-timeout",
                    "5000",
                ],
            )?;
            std::thread::sleep(Duration::from_secs(3));
            block_and_lift(t, &s, Duration::from_secs(4), Duration::from_secs(22))?;
            let st = t.wait_exit(client, Duration::from_secs(45))?;
            let out = std::fs::read_to_string(t.log_path(client).context("iperf3 log")?)?;
            t.step(&format!("iperf3:\n{}", ztna_e2e::topology::tail(&out, 6)));
            ensure!(
                st.success() && out.contains("receiver"),
                "iperf3 did not complete: {st}\n{out}"
            );
            let _ = t.wait_exit(srv, Duration::from_secs(5));
            Ok(())
        },
    );
}

#[test]
fn roaming_agent_recovers_without_a_restart() {
    run_with(
        "roaming_agent_recovers_without_a_restart",
        helper_bins!(),
        behind_port_nats,
        |t| {
            let s = direct_wan_stack(t)?;
            let sessions = s.status(&s.agent_cfg.status_socket)?.json["relay_sessions"].clone();

            t.step("re-address the agent's NAT router: its mappings now leave from a new address");
            nat::readdress(t, Side::Agent, nat::addr::NATA_WAN_ROAMED)?;
            let moved = Instant::now();
            let took = wait_until_every(
                "pings through the tunnel after the move",
                Duration::from_secs(20),
                Duration::from_millis(200),
                || s.ping_once(addr::ECHO),
            )
            .map(|_| moved.elapsed())?;
            t.step(&format!(
                "tunnel carries pings {:.2} s after the move",
                took.as_secs_f64()
            ));
            ensure!(
                took <= Duration::from_secs(10),
                "recovery took {:.2} s",
                took.as_secs_f64()
            );
            let direct = wait_path(&s, "a direct path again", Duration::from_secs(30), |p| {
                p == "direct-wan"
            });
            let st = s.status(&s.agent_cfg.status_socket)?;
            t.step(&format!(
                "path {} ({}); observed address {}; relay sessions {} before, {} now",
                s.path(),
                match &direct {
                    Ok(d) => format!(
                        "direct {:.2} s after the move",
                        (d.as_secs_f64() + took.as_secs_f64())
                    ),
                    Err(_) => "no direct path within 30 s".into(),
                },
                st.json["observed_addr"],
                sessions,
                st.json["relay_sessions"]
            ));
            direct?;
            ensure!(
                st.json["observed_addr"]
                    .as_str()
                    .is_some_and(|a| a.starts_with(&format!("{}:", nat::addr::NATA_WAN_ROAMED))),
                "the relay did not see the new address: {}",
                st.json
            );
            Ok(())
        },
    );
}

#[test]
fn direct_paths_off_at_the_connector_keeps_the_relay() {
    run(
        "direct_paths_off_at_the_connector_keeps_the_relay",
        helper_bins!(),
        |t| {
            let mut s = Stack::new(t)?;
            s.agent_cfg.direct_paths = None;
            s.conn_cfg.direct_paths = Some(false);
            s.start_all()?;
            // Longer than a punch window: nothing may leave the relay.
            let until = Instant::now() + Duration::from_secs(6);
            while Instant::now() < until {
                let p = s.path();
                ensure!(p == "relay", "expected the relay path, got {p}");
                std::thread::sleep(Duration::from_millis(200));
            }
            let before = relay_forwarded(&s)?;
            t.ping_all(ztna_e2e::Node::Agent, addr::ECHO, 3)?;
            ensure!(
                relay_forwarded(&s)? > before,
                "pings did not cross the relay"
            );
            let direct = s
                .conn_metrics()?
                .value("ztna_connector_direct_tx_packets_total");
            ensure!(
                direct == 0.0,
                "the connector sent {direct} packets directly"
            );
            Ok(())
        },
    );
}
