//! Issue #2: trust. Certificates from another CA are refused, policy limits what an agent gets,
//! and the relay limits what a connector may serve.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use ztna_e2e::{
    addr, helper_bins, log_has_line, run, wait_until, Metrics, Node, PkiDir, Role, Stack,
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
