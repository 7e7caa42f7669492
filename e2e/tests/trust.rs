//! Issue #2: trust. Certificates from another CA are refused, policy limits what an agent gets,
//! and the relay limits what a connector may serve. Issue #10: the relay's policy owns the
//! catalog, reloads without a restart, and revokes at the relay and the connector.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use ztna_e2e::{
    addr, helper_bins, log_has_line, run, wait_until, Metrics, Node, PkiDir, Role, Signal, Stack,
};

/// Sessions the relay refused: after the handshake (`sessions_rejected`) or in it (a certificate
/// from another CA fails the TLS handshake: `handshakes_failed`, where the relay counts that).
fn refusals(m: &Metrics) -> f64 {
    m.value("ztna_relay_sessions_rejected_total") + m.value("ztna_relay_handshakes_failed_total")
}

#[test]
fn trust_other_ca() {
    run("trust_other_ca", helper_bins!(), |t| {
        let mut s = Stack::new(t)?;
        s.start_all()?;
        let relay = s
            .relay
            .ok_or_else(|| anyhow::anyhow!("relay not started"))?;

        t.step("a second CA issues an agent certificate for mallory");
        let other = PkiDir::init(&t.dir().join("pki-other"), Some("someone else"))?;
        let mallory = other.issue(Role::Agent, "mallory", &["eng"])?;
        // mallory trusts the real CA (so it accepts the relay) but presents a foreign
        // certificate: the relay must refuse it.
        let mut cfg = s.agent_cfg.clone();
        cfg.cert = mallory.cert;
        cfg.key = mallory.key;
        cfg.tun = "ztna1".to_owned();
        cfg.status_socket = t.dir().join("mallory.sock");

        let rejected_before = refusals(&s.relay_metrics()?);
        let log_before = t.log(relay).len();
        let bad = s.spawn_agent("agent-mallory", &cfg)?;

        let seen = wait_until(
            "the relay to reject mallory's session (metrics or log)",
            Duration::from_secs(15),
            || {
                let metric = s.relay_metrics().map(|m| refusals(&m)).unwrap_or(0.0);
                let log = t.log(relay);
                let new = log.get(log_before..).unwrap_or("");
                metric > rejected_before
                    || [
                        "reject",
                        "refus",
                        "handshake failed",
                        "unknown issuer",
                        "unknownissuer",
                        "bad certificate",
                        "badcertificate",
                    ]
                    .iter()
                    .any(|w| new.to_lowercase().contains(w))
            },
        )?;
        t.step(&format!(
            "relay rejected mallory after {:.2} s",
            seen.as_secs_f64()
        ));

        t.step("for 5 s, mallory gets no tunnel IP, no address on ztna1 and no route");
        let ns = t.ns(Node::Agent);
        let until = Instant::now() + Duration::from_secs(5);
        for _ in 0..50 {
            if Instant::now() >= until {
                break;
            }
            if let Ok(st) = s.status(&cfg.status_socket) {
                ensure!(
                    st.tunnel_ip().is_none() && !st.connected(),
                    "mallory's agent says it got in: {}",
                    st.json
                );
            }
            let routes = t.host(
                5,
                [
                    "ip", "-n", &ns, "-4", "route", "show", "table", "all", "dev", "ztna1",
                ],
            )?;
            ensure!(
                routes.stdout.trim().is_empty(),
                "mallory's agent installed routes:\n{routes}"
            );
            let addrs = t.host(5, ["ip", "-n", &ns, "-4", "addr", "show", "dev", "ztna1"])?;
            ensure!(
                !addrs.stdout.contains("inet "),
                "mallory's ztna1 has an address:\n{addrs}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        for dst in [addr::ECHO, addr::DNS] {
            ensure!(
                s.agent_route_dev(dst)?.as_deref() == Some("ztna0"),
                "{dst} should still route via alice's ztna0"
            );
        }
        t.step(&format!(
            "mallory's agent is {}",
            if t.is_running(bad) {
                "still retrying"
            } else {
                "gone"
            }
        ));

        t.step("alice still gets through");
        t.ping_all(Node::Agent, addr::ECHO, 3)
            .context("alice's pings were lost")?;
        Ok(())
    });
}

#[test]
fn trust_policy() {
    run("trust_policy", helper_bins!(), |t| {
        let mut s = Stack::new(t)?;
        s.agent_cfg.services = vec!["echo".to_owned(), "secret".to_owned()];
        let st = s.start_all()?;

        t.step("status lists `secret` as rejected");
        let rejected = st.rejected_names();
        ensure!(
            rejected.iter().any(|n| n == "secret"),
            "status.rejected is {rejected:?}, expected it to list secret: {}",
            st.json
        );
        ensure!(
            !rejected.iter().any(|n| n == "echo"),
            "echo is allowed but listed as rejected: {}",
            st.json
        );

        t.step("routes: 10.100.0.1 via ztna0, nothing to 10.100.0.3 (nor to dns, which was not wanted)");
        let routes = s.agent_routes()?;
        t.step(&format!("agent routes:\n{routes}"));
        ensure!(
            s.agent_route_dev(addr::ECHO)?.as_deref() == Some("ztna0"),
            "no route to {} via ztna0:\n{routes}",
            addr::ECHO
        );
        ensure!(
            s.agent_route_dev(addr::SECRET)?.as_deref() != Some("ztna0"),
            "{} is routed into the tunnel:\n{routes}",
            addr::SECRET
        );
        ensure!(
            !routes.contains(addr::SECRET),
            "a route mentions {}:\n{routes}",
            addr::SECRET
        );
        ensure!(
            s.agent_route_dev(addr::DNS)?.as_deref() != Some("ztna0"),
            "{} (not wanted) is routed:\n{routes}",
            addr::DNS
        );

        t.ping_all(Node::Agent, addr::ECHO, 3)
            .context("pings to echo were lost")?;
        let out = t.run(
            Node::Agent,
            10,
            ["ping", "-n", "-c", "2", "-W", "1", addr::SECRET],
        )?;
        ensure!(!out.success(), "secret answered a ping:\n{out}");
        Ok(())
    });
}

#[test]
fn trust_connector_not_allowed() {
    run("trust_connector_not_allowed", helper_bins!(), |t| {
        let mut s = Stack::new(t)?;
        s.relay_cfg.connectors[0].services = vec!["echo".to_owned()];
        s.conn_cfg
            .services
            .retain(|svc| svc.name == "echo" || svc.name == "dns");
        let st = s.start_all()?;
        let connector = s
            .connector
            .ok_or_else(|| anyhow::anyhow!("connector not started"))?;

        t.step("dns is in neither the agent's status nor its routes");
        ensure!(
            !st.mentions_service("dns", addr::DNS),
            "the agent was offered dns: {}",
            st.json
        );
        let routes = s.agent_routes()?;
        ensure!(
            s.agent_route_dev(addr::DNS)?.as_deref() != Some("ztna0"),
            "{} is routed into the tunnel:\n{routes}",
            addr::DNS
        );
        ensure!(
            s.agent_route_dev(addr::ECHO)?.as_deref() == Some("ztna0"),
            "echo is not routed:\n{routes}"
        );

        t.step("the connector's log says dns was refused");
        let refusal = [
            "refus",
            "reject",
            "denied",
            "not allowed",
            "unauthori",
            "forbidden",
            "not permitted",
        ];
        let found = wait_until(
            "the connector to log that dns was refused",
            Duration::from_secs(5),
            || log_has_line(&t.log(connector), "dns", &refusal),
        );
        if found.is_err() {
            bail!(
                "the connector log has no line naming dns together with any of {refusal:?}:\n{}",
                ztna_e2e::topology::tail(&t.log(connector), 30)
            );
        }

        t.ping_all(Node::Agent, addr::ECHO, 3)
            .context("pings to echo were lost")?;
        let server = format!("@{}", addr::DNS);
        let out = t.run(
            Node::Agent,
            10,
            [
                "dig",
                "+short",
                "+time=1",
                "+tries=1",
                &server,
                "backend.ztna.test",
            ],
        )?;
        ensure!(
            out.stdout.trim() != addr::BACKEND,
            "dns answered through the tunnel:\n{out}"
        );
        Ok(())
    });
}

/// SIGHUP to a daemon (its reload signal).
fn hup(t: &ztna_e2e::Topology, id: ztna_e2e::DaemonId) -> anyhow::Result<()> {
    let pid = t.pid(id)?.to_string();
    let out = t.host(5, ["kill", "-HUP", pid.as_str()])?;
    ensure!(out.success(), "kill -HUP {pid}: {out}");
    Ok(())
}

/// How many lines of `log` contain `needle`.
fn count_lines(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// Issue #10: the relay's policy owns the service catalog, reloads without a restart, and
/// revocation works at the relay and the connector. One topology:
/// 1. conn1 announces `web` at the relay's own address (10.10.0.1): refused (before: the agent
///    routed the relay's address into its tunnel);
/// 2. the connector's deny list names alice (SIGHUP): her live inner connection is closed at
///    once (before: it kept working until it ended by itself) and her next inner handshake is
///    refused; back off the list, she gets in again;
/// 3. a policy reload (SIGHUP) takes echo from group eng: pings to echo stop;
/// 4. a policy that does not validate is refused, and the relay keeps running;
/// 5. the relay's deny list names alice (SIGHUP): her live session is closed.
#[test]
fn trust_catalog_reload_and_revocation() {
    run("trust_catalog_reload_and_revocation", helper_bins!(), |t| {
        let mut s = Stack::new(t)?;
        for svc in s.conn_cfg.services.iter_mut().filter(|x| x.name == "web") {
            svc.address = addr::RELAY.to_owned();
        }
        // SIGHUP only, so each reload below has one known trigger.
        s.relay_cfg.reload_poll_secs = Some(0);
        let conn_deny = t.write_file("conn-deny.toml", "identities = []\n")?;
        s.conn_cfg.deny_list = Some(conn_deny.clone());
        let relay_deny = t.write_file("relay-deny.toml", "identities = []\n")?;
        s.relay_cfg.deny_list = Some(relay_deny.clone());
        s.start_all()?;
        let relay = s.relay.context("relay not started")?;
        let conn = s.connector.context("connector not started")?;

        t.step("1. web announced at the relay's address is refused; nothing routes 10.10.0.1 into the tunnel");
        let rejected = s
            .relay_metrics()?
            .value("ztna_relay_services_rejected_total");
        ensure!(rejected >= 1.0, "services_rejected is {rejected}");
        ensure!(
            s.agent_route_dev(addr::RELAY)?.as_deref() != Some("ztna0"),
            "the relay's address is routed into the tunnel:\n{}",
            s.agent_routes()?
        );
        wait_until(
            "the connector to log that web was refused",
            Duration::from_secs(5),
            || log_has_line(&t.log(conn), "web", &["differs from policy", "refused"]),
        )?;
        t.ping_all(Node::Agent, addr::ECHO, 3)
            .context("echo stopped answering")?;

        t.step("2. the connector's deny list names alice: her live tunnel is closed and her next inner handshake refused");
        let reloads = |log: &str| count_lines(log, "deny list reloaded");
        let before = reloads(&t.log(conn));
        std::fs::write(&conn_deny, "identities = [\"alice\"]\n")?;
        hup(t, conn)?;
        wait_until(
            "the connector to reload its deny list",
            Duration::from_secs(5),
            || reloads(&t.log(conn)) > before,
        )?;
        let took = wait_until(
            "the connector to close alice's live inner connection",
            Duration::from_secs(5),
            || {
                s.conn_metrics()
                    .map(|m| m.value("ztna_connector_inner_connections_revoked_total"))
                    .unwrap_or(0.0)
                    >= 1.0
            },
        )?;
        ensure!(
            !s.ping_once(addr::ECHO),
            "echo answered alice's live tunnel after the connector denied her"
        );
        t.step(&format!(
            "RESULT live inner connection closed {:.2} s after the reload was logged; pings stop",
            took.as_secs_f64()
        ));
        let rejected_before = s
            .conn_metrics()?
            .value("ztna_connector_inner_handshakes_rejected_total");
        let agent = s.agent.context("agent not started")?;
        t.signal(agent, Signal::Term)?;
        t.wait_exit(agent, Duration::from_secs(10))?;
        s.start_agent()?;
        let took = wait_until(
            "the connector to refuse alice's inner handshake",
            Duration::from_secs(20),
            || {
                s.conn_metrics()
                    .map(|m| m.value("ztna_connector_inner_handshakes_rejected_total"))
                    .unwrap_or(0.0)
                    > rejected_before
            },
        )?;
        t.step(&format!(
            "inner handshake refused {:.2} s after the agent restarted",
            took.as_secs_f64()
        ));
        ensure!(!s.ping_once(addr::ECHO), "echo answered a denied agent");
        let before = reloads(&t.log(conn));
        std::fs::write(&conn_deny, "identities = []\n")?;
        hup(t, conn)?;
        wait_until(
            "the connector to reload its deny list",
            Duration::from_secs(5),
            || reloads(&t.log(conn)) > before,
        )?;
        let agent = s.agent.context("agent not started")?;
        t.signal(agent, Signal::Term)?;
        t.wait_exit(agent, Duration::from_secs(10))?;
        let agent = s.start_agent()?;
        let cfg = s.agent_cfg.clone();
        s.wait_ready(agent, &cfg)
            .context("alice did not get back in after leaving the deny list")?;

        t.step("3. policy reload by SIGHUP: group eng loses echo; pings to echo stop");
        s.relay_cfg.access[0].services.retain(|x| x != "echo");
        t.write_file("relay.toml", &s.relay_cfg.to_toml())?;
        hup(t, relay)?;
        let took = wait_until("pings to echo to stop", Duration::from_secs(15), || {
            !s.ping_once(addr::ECHO)
        })?;
        let m = s.relay_metrics()?;
        t.step(&format!(
            "echo unreachable {:.2} s after SIGHUP; reloads {}, channels closed by policy {}",
            took.as_secs_f64(),
            m.value("ztna_relay_policy_reloads_total"),
            m.value("ztna_relay_channels_closed_by_policy_total")
        ));
        ensure!(m.value("ztna_relay_policy_reloads_total") == 1.0);
        ensure!(m.value("ztna_relay_channels_closed_by_policy_total") >= 1.0);
        for _ in 0..3 {
            ensure!(!s.ping_once(addr::ECHO), "echo answered after the reload");
        }

        t.step("4. a policy with overlapping services is refused; the relay keeps the old one");
        let mut bad = s.relay_cfg.clone();
        bad.services[1].address = addr::ECHO.to_owned();
        t.write_file("relay.toml", &bad.to_toml())?;
        hup(t, relay)?;
        wait_until(
            "the relay to refuse the policy",
            Duration::from_secs(5),
            || {
                s.relay_metrics()
                    .map(|m| m.value("ztna_relay_policy_reload_errors_total") >= 1.0)
                    .unwrap_or(false)
            },
        )?;
        t.ensure_running(relay)?;
        ensure!(
            log_has_line(
                &t.log(relay),
                "policy reload failed",
                &["also used by service"]
            ),
            "the relay's log does not say why:\n{}",
            ztna_e2e::topology::tail(&t.log(relay), 10)
        );
        ensure!(s.relay_metrics()?.value("ztna_relay_policy_reloads_total") == 1.0);
        t.write_file("relay.toml", &s.relay_cfg.to_toml())?;

        t.step("5. the relay's deny list names alice: her live session is closed");
        std::fs::write(&relay_deny, "identities = [\"alice\"]\n")?;
        hup(t, relay)?;
        let took = wait_until(
            "the relay to close alice's session",
            Duration::from_secs(5),
            || {
                s.relay_metrics()
                    .map(|m| m.value("ztna_relay_sessions_revoked_total") >= 1.0)
                    .unwrap_or(false)
            },
        )?;
        t.step(&format!(
            "session closed {:.2} s after SIGHUP",
            took.as_secs_f64()
        ));
        wait_until(
            "alice's agent to be disconnected",
            Duration::from_secs(10),
            || {
                !t.is_running(agent)
                    || s.status(&cfg.status_socket)
                        .map(|st| !st.connected())
                        .unwrap_or(true)
            },
        )?;
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            if let Ok(st) = s.status(&cfg.status_socket) {
                ensure!(!st.connected(), "alice got back in: {}", st.json);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let m = s.relay_metrics()?;
        t.step(&format!(
            "alice stays out; handshakes refused so far: {}",
            m.value("ztna_relay_handshakes_failed_total")
        ));
        Ok(())
    });
}
