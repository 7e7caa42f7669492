//! Issue #15, the IPv6 underlay: an agent on an IPv6-only network behind a stateful firewall
//! (global addresses, no NAT66, unsolicited inbound dropped), a dual-stack relay, and a
//! connector either on IPv4 behind a NAT (the relay path joins the two families) or on IPv6
//! behind the same kind of firewall (a direct path over IPv6, opened by hole punching).

use std::time::Duration;

use anyhow::{ensure, Result};
use ztna_e2e::nat::{self, v6addr, V6Conn};
use ztna_e2e::wait::wait_until_every;
use ztna_e2e::{addr, helper_bins, run_with, Node, Stack, Topology};

/// The stack on `nat.sh v6`: the relay on `[::]:4433` (both families), the agent's socket on
/// IPv6 and the relay given by its IPv6 address; the connector on the family of its network.
fn start(t: &Topology, conn: V6Conn) -> Result<Stack<'_>> {
    let mut s = Stack::new(t)?;
    s.relay_cfg.bind = format!("[::]:{}", addr::RELAY_PORT);
    let relay6 = format!("[{}]:{}", v6addr::RELAY, addr::RELAY_PORT);
    s.agent_cfg.relay = relay6.clone();
    s.agent_cfg.extra.push_str("bind = \"[::]:0\"\n");
    s.agent_cfg.direct_paths = None;
    if conn == V6Conn::V6 {
        s.conn_cfg.relay = relay6;
        s.conn_cfg.bind = "[::]:4434".to_owned();
    }
    s.start_all()?;
    Ok(s)
}

/// Pings, UDP echo and DNS through the tunnel, with nothing lost.
fn traffic(t: &Topology) -> Result<()> {
    let out = t.run_ok(
        Node::Agent,
        20,
        [
            "ping",
            "-n",
            "-c",
            "20",
            "-i",
            "0.05",
            "-W",
            "2",
            addr::ECHO,
        ],
    )?;
    ensure!(out.stdout.contains("20 received"), "pings lost: {out}");
    let summary = ztna_e2e::udp_echo_check(t, 200, 1232)?;
    t.step(&summary);
    ztna_e2e::dig_backend(t, 2)?;
    Ok(())
}

#[test]
fn ipv6_only_agent_reaches_an_ipv4_connector_through_a_dual_stack_relay() {
    run_with(
        "ipv6_only_agent_reaches_an_ipv4_connector_through_a_dual_stack_relay",
        helper_bins!(),
        |name, helpers| nat::v6(name, helpers, V6Conn::V4),
        |t| {
            t.step("the agent's eth0 has no IPv4 address: its only way out is IPv6");
            let out = t.run_ok(
                Node::Agent,
                5,
                ["ip", "-4", "-o", "addr", "show", "dev", "eth0"],
            )?;
            ensure!(out.stdout.trim().is_empty(), "eth0 has IPv4: {out}");
            let s = start(t, V6Conn::V4)?;
            traffic(t)?;
            t.step("the connector is on IPv4, so no direct path: the tunnel stays on the relay");
            std::thread::sleep(Duration::from_secs(3));
            ensure!(s.path() == "relay", "path {}", s.path());
            let st = s.status(&s.agent_cfg.status_socket)?;
            let observed = st.json["observed_addr"].as_str().unwrap_or_default();
            ensure!(
                observed.starts_with(&format!("[{}]:", v6addr::AGENT)),
                "the relay should see the agent at its IPv6 address, not {observed}"
            );
            let targets = &st.json["connectors"][0]["direct"]["targets"];
            ensure!(
                targets.as_array().is_some_and(Vec::is_empty),
                "the agent's IPv6 socket probes IPv4 candidates: {targets}"
            );
            let m = s.relay_metrics()?;
            ensure!(
                m.value("ztna_relay_datagrams_forwarded_total") > 0.0,
                "the relay forwarded nothing"
            );
            let e = s.error_lines();
            ensure!(e.is_empty(), "errors in the logs:\n{}", e.join("\n"));
            Ok(())
        },
    );
}

#[test]
fn ipv6_only_agent_and_connector_punch_a_direct_path_through_their_firewalls() {
    run_with(
        "ipv6_only_agent_and_connector_punch_a_direct_path_through_their_firewalls",
        helper_bins!(),
        |name, helpers| nat::v6(name, helpers, V6Conn::V6),
        |t| {
            t.step("both firewalls drop unsolicited inbound: the agent cannot reach the connector first");
            let out = t.run(
                Node::Agent,
                5,
                ["ping", "-6", "-n", "-c", "1", "-W", "1", v6addr::CONN],
            )?;
            ensure!(
                !out.status.success(),
                "the connector's firewall let a ping in: {out}"
            );
            let s = start(t, V6Conn::V6)?;
            let started = std::time::Instant::now();
            wait_until_every(
                "a direct path over IPv6 (WAN: global addresses)",
                Duration::from_secs(15),
                Duration::from_millis(100),
                || s.path() == "direct-wan",
            )
            .map_err(|e| anyhow::anyhow!("{e:#}; path {}", s.path()))?;
            t.step(&format!(
                "path {} after {:.1} s",
                s.path(),
                started.elapsed().as_secs_f64()
            ));
            let st = s.status(&s.agent_cfg.status_socket)?;
            t.step(&format!("status: {}", st.json["connectors"]));
            let before = s
                .relay_metrics()?
                .value("ztna_relay_datagrams_forwarded_total");
            traffic(t)?;
            let after = s
                .relay_metrics()?
                .value("ztna_relay_datagrams_forwarded_total");
            ensure!(
                after == before,
                "the relay forwarded {} datagrams while the path was direct",
                after - before
            );
            let e = s.error_lines();
            ensure!(e.is_empty(), "errors in the logs:\n{}", e.join("\n"));
            Ok(())
        },
    );
}

/// The services' virtual IPv6 addresses in the overlay test.
mod v6svc {
    /// `echo` (its backend stays IPv4: the connector turns IPv6 into IPv4 at its sockets).
    pub(crate) const ECHO: &str = "fd00:100::1";
    /// `secret`, which the test agent may not reach.
    pub(crate) const SECRET: &str = "fd00:100::3";
    /// `web`, whose backend is the IPv6 address [`BACKEND`].
    pub(crate) const WEB: &str = "fd00:100::4";
    /// The backend's IPv6 address on the connector's back link (`fd00:b::/64`).
    pub(crate) const BACKEND: &str = "fd00:b::2";
}

/// The overlay in IPv6, on the IPv4 underlay of the standard topology: services with virtual
/// IPv6 addresses, reached by `ping -6`, UDP and TCP (curl) from the agent, one of them at an
/// IPv6 backend; a service the agent may not reach stays unreachable over IPv6 too.
#[test]
fn ipv6_services_answer_ping_udp_and_tcp_through_the_tunnel() {
    ztna_e2e::run(
        "ipv6_services_answer_ping_udp_and_tcp_through_the_tunnel",
        helper_bins!(),
        |t| {
            t.step("the back link gets IPv6: connector fd00:b::1, backend fd00:b::2");
            for (node, dev, a) in [
                (Node::Conn, "back0", "fd00:b::1/64"),
                (Node::Backend, "eth0", "fd00:b::2/64"),
            ] {
                t.run_ok(node, 5, ["ip", "addr", "add", a, "dev", dev, "nodad"])?;
            }
            let mut s = Stack::new(t)?;
            s.enable_web();
            for (name, a6) in [
                ("echo", v6svc::ECHO),
                ("secret", v6svc::SECRET),
                ("web", v6svc::WEB),
            ] {
                if let Some(p) = s.relay_cfg.services.iter_mut().find(|p| p.name == name) {
                    p.address6 = Some(a6.to_owned());
                }
                if let Some(c) = s.conn_cfg.services.iter_mut().find(|c| c.name == name) {
                    c.address6 = Some(a6.to_owned());
                    if name == "web" {
                        c.backend = v6svc::BACKEND.to_owned();
                    }
                }
            }
            let (root, body) = ztna_e2e::nginx::web_root(t, None)?;
            let listen = format!("[{}]:80", v6svc::BACKEND);
            ztna_e2e::nginx::start(t, Node::Backend, &listen, &root)?;
            s.start_all()?;

            t.step("the agent's TUN has its IPv6 tunnel address and routes to the services' IPv6 addresses");
            let out = t.run_ok(
                Node::Agent,
                5,
                ["ip", "-6", "route", "show", "table", "all", "dev", "ztna0"],
            )?;
            for a in [v6svc::ECHO, v6svc::WEB] {
                ensure!(out.stdout.contains(a), "no route to {a}: {out}");
            }
            ensure!(
                !out.stdout.contains(v6svc::SECRET),
                "a route to secret: {out}"
            );

            t.step("ping -6 fd00:100::1 (ICMPv6 echo, answered by the IPv4 backend)");
            let out = t.run_ok(
                Node::Agent,
                20,
                [
                    "ping",
                    "-6",
                    "-n",
                    "-c",
                    "10",
                    "-i",
                    "0.05",
                    "-W",
                    "2",
                    v6svc::ECHO,
                ],
            )?;
            ensure!(
                out.stdout.contains("10 received"),
                "ping -6 lost packets: {out}"
            );

            t.step("UDP over IPv6 to fd00:100::1:7, echoed byte for byte");
            let target = format!("[{}]:7", v6svc::ECHO);
            let summary = ztna_e2e::udp_echo_check_to(t, &target, Some("[::]:0"), 300, 1200)?;
            t.step(&summary);

            t.step("UDP over IPv6 up to 4000 bytes (the first is 4000): fragmented by the agent's kernel, reassembled by the connector, echoed whole, fragmented back");
            let before = s
                .conn_metrics()?
                .value("ztna_connector_fragments_reassembled_total");
            let summary = ztna_e2e::udp_echo_check_to(t, &target, Some("[::]:0"), 20, 4000)?;
            let after = s
                .conn_metrics()?
                .value("ztna_connector_fragments_reassembled_total");
            ensure!(
                after > before,
                "4000-byte UDP over IPv6: reassembled {before} -> {after}"
            );
            t.step(&format!(
                "RESULT {summary}; reassembled at the connector: {}",
                after - before
            ));

            t.step("curl http://[fd00:100::4]/ (TCP over IPv6 to an IPv6 backend)");
            let url = format!("http://[{}]/", v6svc::WEB);
            let out = t.run_ok(Node::Agent, 20, ["curl", "-sS", "-m", "10", &url])?;
            ensure!(out.stdout == body, "curl over IPv6 got {:?}", out.stdout);

            t.step("the agent may not reach secret: ping -6 fd00:100::3 gets nothing back, even with a route forced into the tunnel (the agent's own check drops it)");
            let route = format!("{}/128", v6svc::SECRET);
            t.run_ok(
                Node::Agent,
                5,
                ["ip", "-6", "route", "add", &route, "dev", "ztna0"],
            )?;
            let no_route = |s: &Stack<'_>| -> Result<u64> {
                let st = s.status(&s.agent_cfg.status_socket)?;
                Ok(st.json["dropped_no_route"].as_u64().unwrap_or(0))
            };
            let dropped = no_route(&s)?;
            let before = s.conn_metrics()?;
            let out = t.run(
                Node::Agent,
                10,
                ["ping", "-6", "-n", "-c", "2", "-W", "1", v6svc::SECRET],
            )?;
            ensure!(!out.status.success(), "secret answered over IPv6: {out}");
            let after = s.conn_metrics()?;
            ensure!(
                after.value("ztna_connector_icmp_echo_backend_total")
                    == before.value("ztna_connector_icmp_echo_backend_total"),
                "the connector forwarded echo requests to secret"
            );
            ensure!(
                no_route(&s)? > dropped,
                "the agent did not count the pings to secret as having no route"
            );
            Ok(())
        },
    );
}
