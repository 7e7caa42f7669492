//! Issue #15, name services over IPv4: real clients in the agent namespace resolve names through
//! glibc (`/etc/netns/<ns>/resolv.conf` points at the agent's DNS server on its tunnel IP),
//! reach backends by name through the tunnel, and the connector resolves the real names with its
//! own resolver (a dnsmasq only the connector's namespace reaches).
//!
//! The agent namespace has no systemd-resolved, so its resolv.conf sends every query to the
//! agent, and the agent forwards the ones outside its domains unchanged to `dns_upstream` (the
//! "normal resolver": a dnsmasq in the relay namespace). On a host with systemd-resolved only
//! the match domains reach the agent (split DNS, `agent-linux/src/resolved.rs`).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ztna_e2e::{addr, bin, helper_bins, run, wait_until, Node, Stack, Topology};

/// The pool of the name service agents may reach, and of the one they may not.
const WEB_POOL: &str = "10.101.0.0/24";
/// The IPv6 pool of `corp-web`, as large as its IPv4 pool and paired with it by offset.
const WEB_POOL6: &str = "fd00:101::";
const SECRET_POOL: &str = "10.102.0.0/24";
/// The backend DNS server: only the connector's namespace reaches it.
const BACKEND_DNS_PORT: &str = "5353";

/// `/etc/netns/<ns>/resolv.conf` for the test's agent namespace, removed on drop.
struct NetnsResolvConf {
    dir: PathBuf,
}

impl NetnsResolvConf {
    fn create(ns: &str, nameserver: Ipv4Addr) -> Result<Self> {
        let dir = Path::new("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {nameserver}\noptions timeout:2 attempts:2\n"),
        )
        .context("writing the namespace's resolv.conf")?;
        Ok(Self { dir })
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        // Leave /etc/netns as it was when nothing else uses it.
        let _ = std::fs::remove_dir("/etc/netns");
    }
}

/// The address of `corp-web`'s IPv6 pool paired with `v4` of its IPv4 pool (the same offset).
fn pair6(v4: &str) -> Result<String> {
    let v4: Ipv4Addr = v4.parse().context("not an IPv4 address")?;
    let base: Ipv4Addr = WEB_POOL.split('/').next().unwrap_or_default().parse()?;
    let base6: std::net::Ipv6Addr = WEB_POOL6.parse()?;
    let offset = u32::from(v4) - u32::from(base);
    Ok(std::net::Ipv6Addr::from(u128::from(base6) + u128::from(offset)).to_string())
}

/// Whether `ip` is in `net` (`a.b.c.d/len`).
fn in_net(ip: &str, net: &str) -> bool {
    let Some((base, len)) = net.split_once('/') else {
        return false;
    };
    let (Ok(ip), Ok(base), Ok(len)) = (
        ip.parse::<Ipv4Addr>(),
        base.parse::<Ipv4Addr>(),
        len.parse::<u32>(),
    ) else {
        return false;
    };
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    u32::from(ip) & mask == u32::from(base) & mask
}

/// dnsmasq in `node` on `listen`:`port` answering `records` (`name/address`).
fn dnsmasq(
    t: &Topology,
    node: Node,
    what: &str,
    listen: &str,
    port: &str,
    records: &[(&str, &str)],
) -> Result<ztna_e2e::DaemonId> {
    let pid = t.dir().join(format!("{what}.pid"));
    let mut args = vec![
        "--keep-in-foreground".to_owned(),
        "--log-facility=-".to_owned(),
        "--log-queries".to_owned(),
        "--no-resolv".to_owned(),
        "--no-hosts".to_owned(),
        format!("--listen-address={listen}"),
        "--bind-interfaces".to_owned(),
        format!("--port={port}"),
        "--local-ttl=5".to_owned(),
        format!("--pid-file={}", pid.display()),
    ];
    args.extend(
        records
            .iter()
            .map(|(name, a)| format!("--address=/{name}/{a}")),
    );
    let id = t.spawn(node, what, "dnsmasq", args)?;
    let server = format!("@{listen}");
    let port_arg = format!("-p{port}");
    let (probe, want) = records[0];
    wait_until(&format!("{what} to answer"), Duration::from_secs(5), || {
        !t.is_running(id)
            || t.run(
                node,
                5,
                [
                    "dig", "+short", "+time=1", "+tries=1", &server, &port_arg, probe,
                ],
            )
            .is_ok_and(|o| o.stdout.trim() == want)
    })?;
    t.ensure_running(id)?;
    Ok(id)
}

/// The deployment of these tests, started up to the connector: the demo services plus two name
/// services, `corp-web` (`wiki.corp.example`, `db.corp.example`, `*.apps.corp.example`; TCP 80
/// and 5432; group `eng`, so alice) and `corp-secret` (`*.secret.corp.example`; identity `bob`
/// only), both served by `conn1`, whose resolver is the backend DNS server; the agent answers for
/// `corp.example` and forwards other names to the "normal resolver" in the relay namespace.
fn name_stack(t: &Topology) -> Result<(Stack<'_>, ztna_e2e::DaemonId)> {
    let mut s = Stack::new(t)?;
    s.start_backends()?;
    // The backend's DNS server: the real names, reachable only from the connector.
    let backend_dns = dnsmasq(
        t,
        Node::Backend,
        "backend-dns",
        addr::BACKEND,
        BACKEND_DNS_PORT,
        &[
            ("wiki.corp.example", addr::BACKEND),
            ("db.corp.example", addr::BACKEND),
            ("app1.apps.corp.example", addr::BACKEND),
            ("swap.apps.corp.example", addr::BACKEND),
            ("vault.secret.corp.example", addr::BACKEND),
        ],
    )?;
    // The "normal resolver" of the agent's host, for every other name.
    dnsmasq(
        t,
        Node::Relay,
        "normal-dns",
        addr::RELAY,
        "53",
        &[("www.example.org", addr::RELAY)],
    )?;
    let backend_server = format!("@{}", addr::BACKEND);
    let out = t.run(
        Node::Agent,
        5,
        [
            "dig",
            "+time=1",
            "+tries=1",
            &backend_server,
            "-p5353",
            "wiki.corp.example",
        ],
    )?;
    ensure!(
        !out.stdout.contains("status: NOERROR"),
        "the agent namespace must not reach the backend DNS server:\n{out}"
    );

    let web = format!(
        "\n[[services]]\nname = \"corp-web\"\nnames = [\"wiki.corp.example\", \"db.corp.example\", \"*.apps.corp.example\"]\npool = \"{WEB_POOL}\"\naddress6 = \"{WEB_POOL6}\"\ntcp = [\"80\", \"5432\"]\n"
    );
    let secret = format!(
        "\n[[services]]\nname = \"corp-secret\"\nnames = [\"*.secret.corp.example\"]\npool = \"{SECRET_POOL}\"\ntcp = [\"80\"]\n"
    );
    s.relay_cfg.extra = format!(
        "{web}{secret}\n[[access]]\nservices = [\"corp-web\"]\ngroups = [\"eng\"]\nidentities = []\n\n[[access]]\nservices = [\"corp-secret\"]\ngroups = []\nidentities = [\"bob\"]\n\n[[connectors]]\nidentity = \"conn1\"\nservices = [\"corp-web\", \"corp-secret\"]\n"
    );
    s.conn_cfg.extra_keys = format!("resolver = [\"{}:{BACKEND_DNS_PORT}\"]\n", addr::BACKEND);
    s.conn_cfg.extra = format!("{web}icmp = false\n{secret}icmp = false\n");
    s.agent_cfg.extra = format!(
        "dns_domains = [\"corp.example\"]\ndns_upstream = [\"{}:53\"]\ndns_split = false\n",
        addr::RELAY
    );
    s.start_relay()?;
    s.start_connector()?;
    Ok((s, backend_dns))
}

/// Starts the agent, waits until it is ready and its DNS server listens, and points the agent
/// namespace's resolv.conf at it.
fn start_agent_with_dns(t: &Topology, s: &mut Stack<'_>) -> Result<NetnsResolvConf> {
    let agent = s.start_agent()?;
    let cfg = s.agent_cfg.clone();
    let st = s.wait_ready(agent, &cfg)?;
    let tunnel_ip = st.tunnel_ip().context("no tunnel IP")?;
    let resolv = NetnsResolvConf::create(&t.ns(Node::Agent), tunnel_ip)?;
    wait_until(
        "the agent's DNS server to listen",
        Duration::from_secs(10),
        || {
            s.status(&cfg.status_socket)
                .is_ok_and(|st| !st.json["names"]["server"].is_null())
        },
    )?;
    Ok(resolv)
}

/// The agent's DNS query counters: answered, forwarded, NXDOMAIN, refused, failed, dropped.
fn query_counts(s: &Stack<'_>) -> Result<Vec<u64>> {
    let st = s.status(&s.agent_cfg.status_socket)?;
    Ok(st.json["names"]["queries"]
        .as_array()
        .context("no names.queries in the status")?
        .iter()
        .map(|v| v.as_u64().unwrap_or(0))
        .collect())
}

/// Split DNS with a real systemd-resolved: the agent registers its DNS server and
/// `~corp.example` for its TUN link (`resolvectl`), glibc asks resolved's stub, which sends only
/// `corp.example` names to the agent and everything else to the host's normal DNS server; the
/// agent's exit removes the registration.
#[test]
fn split_dns_with_systemd_resolved() {
    run("split_dns_with_systemd_resolved", helper_bins!(), |t| {
        let (root, body) = ztna_e2e::nginx::web_root(t, None)?;
        let _nginx =
            ztna_e2e::nginx::start(t, Node::Backend, &format!("{}:80", addr::BACKEND), &root)?;
        let (mut s, _) = name_stack(t)?;
        // No upstream: the agent answers only its domains; resolved must send it nothing else.
        s.agent_cfg.extra = "dns_domains = [\"corp.example\"]\ndns_split = true\n".to_owned();
        let resolved = ztna_e2e::resolved::Resolved::start(t, addr::RELAY)?;
        let cfg = s.agent_cfg.clone();
        let file = t.write_file("agent.toml", &cfg.to_toml())?;
        let agent = resolved.spawn(
            t,
            "agent",
            bin("ztna-agent")?,
            ["up".as_ref(), "--config".as_ref(), file.as_os_str()],
            &[],
        )?;
        s.agent = Some(agent);
        let st = s.wait_ready(agent, &cfg)?;
        let tunnel_ip = st.tunnel_ip().context("no tunnel IP")?.to_string();

        t.step("resolvectl status ztna0: the agent's DNS server and ~corp.example, not a default route");
        let mut link = String::new();
        wait_until(
            "the agent to register with systemd-resolved",
            Duration::from_secs(10),
            || {
                link = resolved
                    .run(t, 5, ["resolvectl", "status", "ztna0"])
                    .map(|o| o.stdout)
                    .unwrap_or_default();
                link.contains(&tunnel_ip) && link.contains("~corp.example")
            },
        )
        .with_context(|| format!("resolvectl status ztna0:\n{link}"))?;
        ensure!(
            link.contains("-DefaultRoute") || link.contains("Default Route: no"),
            "ztna0 must not be a default DNS route:\n{link}"
        );
        let before = query_counts(&s)?;

        t.step(
            "getent ahostsv4 wiki.corp.example through glibc and resolved's stub: a pool address",
        );
        let out = resolved.run(t, 15, ["getent", "ahostsv4", "wiki.corp.example"])?;
        let wiki = out
            .stdout
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        ensure!(in_net(&wiki, WEB_POOL), "wiki.corp.example: {out}");

        t.step("curl http://wiki.corp.example/ by name, resolved by systemd-resolved");
        let out = resolved.run(
            t,
            30,
            ["curl", "-sS", "-m", "20", "http://wiki.corp.example/"],
        )?;
        ensure!(out.success() && out.stdout == body, "curl by name: {out}");

        t.step("getent hosts www.example.org: resolved's own DNS server answers, the agent never sees it");
        let out = resolved.run(t, 15, ["getent", "hosts", "www.example.org"])?;
        ensure!(
            out.stdout.split_whitespace().next() == Some(addr::RELAY),
            "www.example.org did not come from the normal resolver: {out}"
        );
        t.step("a name the identity may not reach: NXDOMAIN through resolved too");
        let out = resolved.run(t, 15, ["getent", "hosts", "vault.secret.corp.example"])?;
        ensure!(
            out.status.code() == Some(2),
            "vault.secret.corp.example: {out}"
        );
        let after = query_counts(&s)?;
        ensure!(
            after.get(1) == before.get(1) && after.get(3) == before.get(3),
            "the agent forwarded or refused queries (before {before:?}, after {after:?}): \
             resolved sent it a name outside corp.example"
        );
        ensure!(
            after.first() > before.first() && after.get(2) > before.get(2),
            "the agent answered nothing (before {before:?}, after {after:?})"
        );

        t.step("the agent stops: resolved forgets ztna0, and corp.example names no longer resolve");
        t.signal(agent, ztna_e2e::Signal::Term)?;
        t.wait_exit(agent, Duration::from_secs(10))?;
        let out = resolved.run(t, 5, ["resolvectl", "status"])?;
        ensure!(
            !out.stdout.contains("ztna0"),
            "resolved still lists ztna0:\n{out}"
        );
        let out = resolved.run(t, 15, ["getent", "hosts", "wiki.corp.example"])?;
        ensure!(!out.success(), "wiki.corp.example still resolves: {out}");
        Ok(())
    });
}

#[test]
fn names_through_glibc() {
    run("names_through_glibc", helper_bins!(), |t| {
        let (root, body) = ztna_e2e::nginx::web_root(t, None)?;
        let _nginx =
            ztna_e2e::nginx::start(t, Node::Backend, &format!("{}:80", addr::BACKEND), &root)?;
        let (_pg, _pg_dir) = ztna_e2e::postgres::start(t)?;
        let (mut s, _) = name_stack(t)?;
        let _resolv = start_agent_with_dns(t, &mut s)?;
        let cfg = s.agent_cfg.clone();

        t.step("getent ahostsv4 wiki.corp.example: a virtual address from the pool");
        let out = t.run_ok(Node::Agent, 15, ["getent", "ahostsv4", "wiki.corp.example"])?;
        let wiki = out
            .stdout
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        ensure!(
            in_net(&wiki, WEB_POOL),
            "wiki.corp.example is not in {WEB_POOL}:\n{out}"
        );
        let again = t.run_ok(Node::Agent, 15, ["getent", "ahostsv4", "WIKI.corp.example"])?;
        ensure!(
            again.stdout.split_whitespace().next() == Some(wiki.as_str()),
            "the address is not stable:\n{again}"
        );

        t.step("curl http://wiki.corp.example/: nginx on the backend, by name");
        let out = t.run_ok(
            Node::Agent,
            30,
            ["curl", "-sS", "-m", "20", "http://wiki.corp.example/"],
        )?;
        ensure!(
            out.stdout == body,
            "curl by name returned another body:\n{out}"
        );

        t.step("curl -4 http://app1.apps.corp.example/: a wildcard name, over IPv4");
        let out = t.run_ok(
            Node::Agent,
            30,
            [
                "curl",
                "-4",
                "-sS",
                "-m",
                "20",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{remote_ip}",
                "http://app1.apps.corp.example/",
            ],
        )?;
        let mut parts = out.stdout.split_whitespace();
        let (code, ip) = (parts.next(), parts.next().unwrap_or_default());
        ensure!(
            code == Some("200") && in_net(ip, WEB_POOL) && ip != wiki,
            "wildcard name: {out}"
        );

        t.step("psql -h db.corp.example: SELECT 1");
        let out = t.run_ok(
            Node::Agent,
            30,
            [
                "psql",
                "-X",
                "host=db.corp.example port=5432 user=postgres dbname=postgres connect_timeout=10",
                "-tAc",
                "SELECT 1",
            ],
        )?;
        ensure!(out.stdout.trim() == "1", "psql by name:\n{out}");

        t.step("getent hosts www.example.org: outside the domains, the normal resolver answers");
        let out = t.run_ok(Node::Agent, 15, ["getent", "hosts", "www.example.org"])?;
        ensure!(
            out.stdout.split_whitespace().next() == Some(addr::RELAY),
            "www.example.org did not come from the normal resolver:\n{out}"
        );

        t.step("names the identity may not reach: NXDOMAIN, as for a name that does not exist");
        for name in ["vault.secret.corp.example", "nope.corp.example"] {
            let out = t.run(Node::Agent, 15, ["getent", "hosts", name])?;
            ensure!(
                out.status.code() == Some(2),
                "getent hosts {name} should fail (exit 2):\n{out}"
            );
            let out = t.run_ok(Node::Agent, 15, ["dig", "+time=2", "+tries=1", name])?;
            ensure!(
                out.stdout.contains("status: NXDOMAIN"),
                "dig {name} should say NXDOMAIN:\n{out}"
            );
        }
        t.step("AAAA wiki.corp.example: the IPv6 pool address paired with its IPv4 one");
        let wiki6 = pair6(&wiki)?;
        let out = t.run_ok(
            Node::Agent,
            15,
            [
                "dig",
                "+short",
                "+time=2",
                "+tries=1",
                "AAAA",
                "wiki.corp.example",
            ],
        )?;
        ensure!(
            out.stdout.trim() == wiki6,
            "AAAA wiki.corp.example, want {wiki6}:\n{out}"
        );

        t.step("the same clients by name over IPv6: glibc told to prefer the ULA pool (gai.conf)");
        std::fs::write(
            Path::new("/etc/netns")
                .join(t.ns(Node::Agent))
                .join("gai.conf"),
            "precedence ::1/128 50\nprecedence fc00::/7 45\nprecedence ::/0 40\n\
             precedence ::ffff:0:0/96 35\nprecedence 2002::/16 30\nprecedence ::/96 1\n",
        )
        .context("writing the namespace's gai.conf")?;
        let out = t.run_ok(Node::Agent, 15, ["getent", "ahosts", "wiki.corp.example"])?;
        ensure!(
            out.stdout.split_whitespace().next() == Some(wiki6.as_str()),
            "getent ahosts wiki.corp.example should give {wiki6} first:\n{out}"
        );
        let out = t.run_ok(
            Node::Agent,
            30,
            [
                "curl",
                "-sS",
                "-m",
                "20",
                "-w",
                "\n%{remote_ip}",
                "http://wiki.corp.example/",
            ],
        )?;
        let (got, ip) = out.stdout.rsplit_once('\n').unwrap_or_default();
        ensure!(
            got.trim_end() == body.trim_end() && ip == wiki6,
            "curl by name over IPv6 (want {wiki6}):\n{out}"
        );
        let out = t.run_ok(
            Node::Agent,
            30,
            [
                "psql",
                "-X",
                "host=db.corp.example port=5432 user=postgres dbname=postgres connect_timeout=10",
                "-c",
                "\\conninfo",
                "-tAc",
                "SELECT 1",
            ],
        )?;
        ensure!(
            out.stdout.contains("address \"fd00:101::") && out.stdout.trim_end().ends_with('1'),
            "psql by name over IPv6:\n{out}"
        );
        t.step(&format!(
            "RESULT by name over IPv6: wiki.corp.example = {wiki6}, curl and psql ({})",
            out.stdout.lines().next().unwrap_or_default()
        ));

        t.step("ztna-agent status lists the name services and mappings");
        let status = t.run_ok(
            Node::Agent,
            10,
            [
                bin("ztna-agent")?.as_os_str(),
                "status".as_ref(),
                "--socket".as_ref(),
                cfg.status_socket.as_os_str(),
            ],
        )?;
        for want in [
            "names:",
            "wiki.corp.example",
            "app1.apps.corp.example",
            "db.corp.example",
            wiki.as_str(),
        ] {
            ensure!(
                status.stdout.contains(want),
                "status lacks {want}:\n{status}"
            );
        }
        let st = s.status(&cfg.status_socket)?;
        let q = &st.json["names"]["queries"];
        let (answered, forwarded, denied) = (
            q[0].as_u64().unwrap_or(0),
            q[1].as_u64().unwrap_or(0),
            q[2].as_u64().unwrap_or(0),
        );
        ensure!(
            answered >= 3 && forwarded >= 1 && denied >= 2,
            "DNS counters (answered, forwarded, NXDOMAIN) = ({answered}, {forwarded}, {denied}): {q}"
        );
        ensure!(
            st.json["names"]["mappings_refused"].as_u64() == Some(0),
            "{}",
            st.json["names"]
        );

        t.step("the connector resolved the names itself and refused nothing");
        let m = s.conn_metrics()?;
        let accepted = m.value("ztna_connector_names_mappings_accepted_total");
        let refused = m.value("ztna_connector_names_mappings_refused_total");
        let resolved = m.value("ztna_connector_names_resolved_total");
        ensure!(
            accepted >= 3.0 && refused == 0.0 && resolved >= 3.0,
            "connector: {accepted} mappings accepted, {refused} refused, {resolved} names resolved"
        );
        let conn_log = t.log(s.connector.context("no connector")?);
        ensure!(
            !conn_log.contains("wiki.corp.example"),
            "customer names must not be logged above DEBUG"
        );
        Ok(())
    });
}

/// The trust boundary: alice's certificate is valid, but a modified agent tells the connector
/// that addresses stand for names policy does not let alice reach, or uses addresses outside the
/// pool. The connector refuses every such mapping, counts it, and never resolves the name.
#[test]
fn names_lying_agent_is_refused() {
    run("names_lying_agent_is_refused", helper_bins!(), |t| {
        let (s, _) = name_stack(t)?;
        let relay = format!("{}:{}", addr::RELAY, addr::RELAY_PORT);
        let a = &s.agent_cfg;
        let attacks = [
            // A name of the service alice may not reach, in that service's pool.
            "vault.secret.corp.example@10.102.0.5",
            // The same name smuggled into the pool alice may use.
            "vault.secret.corp.example@10.101.0.5",
            // A name no service answers to.
            "metadata.internal@10.101.0.6",
            // A served name at addresses outside the pool: another service's, the pool's
            // network address, loopback.
            "wiki.corp.example@10.100.0.1",
            "wiki.corp.example@10.101.0.0",
            "wiki.corp.example@127.0.0.1",
        ];
        let mut args: Vec<String> = vec![
            relay,
            a.ca.display().to_string(),
            a.cert.display().to_string(),
            a.key.display().to_string(),
            "conn1".into(),
        ];
        args.extend(attacks.iter().map(|m| (*m).to_owned()));
        // The control: a mapping a real agent sends.
        args.push("wiki.corp.example@10.101.0.9".into());
        t.step("a lying agent sends 6 forged mappings and 1 real one");
        let mut cmd = vec![env!("CARGO_BIN_EXE_ztna-test-lying-agent").to_owned()];
        cmd.extend(args);
        let out = t.run_ok(Node::Agent, 40, &cmd)?;
        let verdicts: Vec<&str> = out
            .stdout
            .lines()
            .filter(|l| l.starts_with("mapping "))
            .collect();
        ensure!(verdicts.len() == 7, "expected 7 verdicts:\n{out}");
        for v in &verdicts[..6] {
            ensure!(
                v.ends_with("accepted=false"),
                "a forged mapping was accepted: {v}\n{out}"
            );
        }
        ensure!(
            verdicts[6].ends_with("accepted=true"),
            "the real mapping was refused: {}\n{out}",
            verdicts[6]
        );
        let m = s.conn_metrics()?;
        let refused = m.value("ztna_connector_names_mappings_refused_total");
        let accepted = m.value("ztna_connector_names_mappings_accepted_total");
        ensure!(
            refused == 6.0 && accepted == 1.0,
            "connector counted {refused} refused and {accepted} accepted mappings"
        );
        let dns_log = std::fs::read_to_string(t.dir().join("backend-dns.log")).unwrap_or_default();
        ensure!(
            dns_log.contains("query[A] wiki.corp.example")
                && !dns_log.contains("secret.corp.example")
                && !dns_log.contains("metadata"),
            "the connector must resolve only the accepted name:\n{dns_log}"
        );
        Ok(())
    });
}

/// The connector re-resolves a name when its TTL runs out: a new connection goes to the name's
/// new address, while a connection opened before keeps its backend and finishes; the agent's
/// virtual address for the name stays the same.
#[test]
fn names_follow_dns_changes() {
    run("names_follow_dns_changes", helper_bins!(), |t| {
        const SECOND: &str = "10.10.3.3";
        let (root, body) = ztna_e2e::nginx::web_root(t, Some(600 * 1024))?;
        let _nginx =
            ztna_e2e::nginx::start(t, Node::Backend, &format!("{}:80", addr::BACKEND), &root)?;
        // A second backend host on the backend LAN, with another page.
        t.run_ok(
            Node::Backend,
            5,
            [
                "sh",
                "-c",
                &format!(
                    "ip addr add {SECOND}/24 dev $(ip -o -4 addr show | awk '/{}\\// {{print $2}}')",
                    addr::BACKEND
                ),
            ],
        )?;
        let root2 = t.dir().join("www2");
        std::fs::create_dir_all(&root2)?;
        let body2 = format!("second backend {}\n", ztna_e2e::random_hex(8)?);
        std::fs::write(root2.join("index.html"), &body2)?;
        let _nginx2 = ztna_e2e::nginx::start(t, Node::Backend, &format!("{SECOND}:80"), &root2)?;
        let (mut s, backend_dns) = name_stack(t)?;
        let _resolv = start_agent_with_dns(t, &mut s)?;

        t.step("curl http://swap.apps.corp.example/: the first backend");
        let out = t.run_ok(
            Node::Agent,
            30,
            ["curl", "-sS", "-m", "20", "http://swap.apps.corp.example/"],
        )?;
        ensure!(out.stdout == body, "first answer:\n{out}");
        let before = t.run_ok(
            Node::Agent,
            15,
            ["getent", "hosts", "swap.apps.corp.example"],
        )?;

        t.step("a slow download (600 KiB at 60 KB/s) from the first backend, left running");
        let slow = t.spawn(
            Node::Agent,
            "slow-curl",
            "curl",
            [
                "-sS",
                "-m",
                "60",
                "--limit-rate",
                "60k",
                "-o",
                "/dev/null",
                "-w",
                "code=%{http_code} size=%{size_download} ip=%{remote_ip}\n",
                "http://swap.apps.corp.example/big.bin",
            ],
        )?;
        std::thread::sleep(Duration::from_millis(500));

        t.step("the backend DNS now says swap.apps.corp.example is the second host");
        t.kill(backend_dns)?;
        dnsmasq(
            t,
            Node::Backend,
            "backend-dns2",
            addr::BACKEND,
            BACKEND_DNS_PORT,
            &[("swap.apps.corp.example", SECOND)],
        )?;
        // The connector's entry (TTL 5 s) runs out.
        std::thread::sleep(Duration::from_secs(6));
        t.step("curl again: a new connection goes to the second host");
        let out = t.run_ok(
            Node::Agent,
            30,
            ["curl", "-sS", "-m", "20", "http://swap.apps.corp.example/"],
        )?;
        ensure!(out.stdout == body2, "after the DNS change:\n{out}");
        let after = t.run_ok(
            Node::Agent,
            15,
            ["getent", "hosts", "swap.apps.corp.example"],
        )?;
        ensure!(
            before.stdout.split_whitespace().next() == after.stdout.split_whitespace().next(),
            "the agent's virtual address changed:\n{before}\n{after}"
        );

        t.step("the download opened before the change finishes whole");
        let status = t.wait_exit(slow, Duration::from_secs(40))?;
        let log = t.log(slow);
        ensure!(
            status.success() && log.contains("code=200") && log.contains("size=614400"),
            "the open download broke: {status:?}\n{log}"
        );
        Ok(())
    });
}
