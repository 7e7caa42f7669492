//! The demo deployment on a [`Topology`]: PKI, backends (UDP echo, dnsmasq), relay, connector
//! `conn1` and agent `alice` (group `eng`), with readiness checks and accessors for status,
//! metrics and routes. Tests change the public config fields before starting a daemon.

use std::cell::RefCell;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::config::{AgentConfig, ConnectorConfig, RelayConfig, ServiceConfig};
use crate::metrics::Metrics;
use crate::pki::{path_str, PkiDir, Role};
use crate::status::AgentStatus;
use crate::topology::{DaemonId, Node, Topology};
use crate::wait::wait_until;
use crate::{addr, bin};

/// How long an agent may take to be connected with a tunnel IP and `conn1` on the relay path.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the first ping through a ready tunnel may take to succeed.
pub const FIRST_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// The demo deployment. See the module docs.
pub struct Stack<'t> {
    t: &'t Topology,
    /// The organisation PKI (`<dir>/pki`), with `relay`, `conn1` and `alice` issued.
    pub pki: PkiDir,
    /// Relay config used by [`Stack::start_relay`].
    pub relay_cfg: RelayConfig,
    /// Connector config used by [`Stack::start_connector`].
    pub conn_cfg: ConnectorConfig,
    /// Agent config used by [`Stack::start_agent`].
    pub agent_cfg: AgentConfig,
    /// Extra environment of the connector process (e.g. `MALLOC_ARENA_MAX` in an experiment).
    pub conn_env: Vec<(String, String)>,
    /// A command the connector is started through, e.g. `setpriv --bounding-set=-bpf ...`
    /// (empty: started directly).
    pub conn_wrapper: Vec<String>,
    /// The running relay.
    pub relay: Option<DaemonId>,
    /// The running connector.
    pub connector: Option<DaemonId>,
    /// The running agent.
    pub agent: Option<DaemonId>,
}

impl<'t> Stack<'t> {
    /// Mints the PKI and prepares the demo configs; starts nothing.
    pub fn new(t: &'t Topology) -> Result<Self> {
        t.step("minting the PKI (ztna-relay pki init/issue)");
        let pki = PkiDir::init(&t.dir().join("pki"), Some("ztna e2e"))?;
        let relay = pki.issue(Role::Relay, "relay", &[])?;
        let conn = pki.issue(Role::Connector, "conn1", &[])?;
        let alice = pki.issue(Role::Agent, "alice", &["eng"])?;
        let ca = pki.ca();
        let mut agent_cfg = AgentConfig::demo(&ca, &alice, &t.dir().join("agent.sock"));
        // Agent and connector share a LAN in the test topology, so with direct paths on the
        // tunnel would leave the relay at once. Most tests are about the relay path (its
        // blindness, impairment on the agent→relay link, restarts); tests of direct paths turn
        // them back on (`agent_cfg.direct_paths = None`).
        agent_cfg.direct_paths = Some(false);
        Ok(Self {
            t,
            relay_cfg: RelayConfig::demo(&ca, &relay),
            conn_cfg: ConnectorConfig::demo(&ca, &conn),
            agent_cfg,
            conn_env: vec![],
            conn_wrapper: vec![],
            pki,
            relay: None,
            connector: None,
            agent: None,
        })
    }

    /// Makes sure the TCP service `web` ([`ServiceConfig::web`], 10.100.0.4 → 10.10.3.2, TCP 80,
    /// 5432, 5001, 9000) is among the connector's services, what `conn1` may serve and what group
    /// `eng` may reach (the demo configs have it; a test that changed them gets it back). Call
    /// before starting the relay and the connector.
    pub fn enable_web(&mut self) {
        if !self.conn_cfg.services.iter().any(|s| s.name == "web") {
            self.conn_cfg.services.push(ServiceConfig::web());
        }
        let add = |list: &mut Vec<String>| {
            if !list.iter().any(|s| s == "web") {
                list.push("web".to_owned());
            }
        };
        for a in self.relay_cfg.access.iter_mut() {
            if a.groups.iter().any(|g| g == "eng") {
                add(&mut a.services);
            }
        }
        for c in self.relay_cfg.connectors.iter_mut() {
            if c.identity == "conn1" {
                add(&mut c.services);
            }
        }
    }

    /// The path of connector `conn1` in the main agent's status (`relay`, `direct-lan`,
    /// `direct-wan`, ...), or `(no status)`.
    pub fn path(&self) -> String {
        self.status(&self.agent_cfg.status_socket)
            .ok()
            .and_then(|st| st.connector_path("conn1").map(str::to_owned))
            .unwrap_or_else(|| "(no status)".into())
    }

    /// `ERROR` lines in the relay's, connector's and agent's logs.
    pub fn error_lines(&self) -> Vec<String> {
        [self.relay, self.connector, self.agent]
            .into_iter()
            .flatten()
            .flat_map(|id| {
                self.t
                    .log(id)
                    .lines()
                    .filter(|l| l.contains(" ERROR "))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The topology.
    pub fn topology(&self) -> &'t Topology {
        self.t
    }

    /// Starts the backends in the backend namespace and checks them from the connector's:
    /// a UDP echo server on 10.10.3.2:7 and :9, and dnsmasq on 10.10.3.2:53 answering
    /// `backend.ztna.test` with 10.10.3.2.
    pub fn start_backends(&mut self) -> Result<()> {
        let t = self.t;
        let echo = t.spawn(
            Node::Backend,
            "udp-echo",
            &t.helpers().udp_echo,
            [
                format!("{}:7", addr::BACKEND),
                format!("{}:9", addr::BACKEND),
                "--exit-after".into(),
                "900".into(),
            ],
        )?;
        let pid_file = path_str(&t.dir().join("dnsmasq.pid"))?;
        let dns = t.spawn(
            Node::Backend,
            "dnsmasq",
            "dnsmasq",
            [
                "--keep-in-foreground".to_owned(),
                "--log-facility=-".to_owned(),
                "--no-resolv".to_owned(),
                "--no-hosts".to_owned(),
                format!("--listen-address={}", addr::BACKEND),
                "--bind-interfaces".to_owned(),
                format!("--address=/backend.ztna.test/{}", addr::BACKEND),
                "--port=53".to_owned(),
                format!("--pid-file={pid_file}"),
            ],
        )?;
        let echo_target = format!("{}:7", addr::BACKEND);
        let check = t.helpers().udp_check.clone();
        wait_until(
            "the UDP echo server to answer from the connector namespace",
            Duration::from_secs(5),
            || {
                !t.is_running(echo)
                    || t.run(
                        Node::Conn,
                        5,
                        [
                            check.as_os_str(),
                            echo_target.as_ref(),
                            "--count".as_ref(),
                            "3".as_ref(),
                            "--timeout-ms".as_ref(),
                            "300".as_ref(),
                            "--quiet".as_ref(),
                        ],
                    )
                    .is_ok_and(|o| o.success())
            },
        )?;
        t.ensure_running(echo)?;
        let server = format!("@{}", addr::BACKEND);
        wait_until(
            "dnsmasq to answer from the connector namespace",
            Duration::from_secs(5),
            || {
                !t.is_running(dns)
                    || t.run(
                        Node::Conn,
                        5,
                        [
                            "dig",
                            "+short",
                            "+time=1",
                            "+tries=1",
                            &server,
                            "backend.ztna.test",
                        ],
                    )
                    .is_ok_and(|o| o.stdout.trim() == addr::BACKEND)
            },
        )?;
        t.ensure_running(dns)?;
        t.step("backends up: UDP echo on 10.10.3.2:7 and :9, dnsmasq on 10.10.3.2:53");
        Ok(())
    }

    /// Waits until a daemon serves its metrics endpoint, or (without one) that it is still
    /// running shortly after its start.
    fn wait_started(
        &self,
        node: Node,
        id: DaemonId,
        metrics: Option<String>,
        what: &str,
    ) -> Result<()> {
        match metrics {
            Some(m) => self.wait_metrics(node, id, &m, what),
            None => {
                std::thread::sleep(Duration::from_millis(300));
                self.t.ensure_running(id)
            }
        }
    }

    /// Writes `relay.toml` from [`Stack::relay_cfg`] and starts the relay (again, if it ran
    /// before); waits for its metrics endpoint when one is configured.
    pub fn start_relay(&mut self) -> Result<DaemonId> {
        let t = self.t;
        let cfg = t.write_file("relay.toml", &self.relay_cfg.to_toml())?;
        let id = t.spawn(
            Node::Relay,
            "relay",
            bin("ztna-relay")?,
            ["--config".as_ref(), cfg.as_os_str()],
        )?;
        self.relay = Some(id);
        self.wait_started(Node::Relay, id, self.relay_cfg.metrics.clone(), "relay")?;
        Ok(id)
    }

    /// Starts one relay of a fleet in the relay namespace: every relay reads the same
    /// `relay.toml` (from [`Stack::relay_cfg`], so the same policy), with its own port and
    /// metrics address given through the environment (`ZTNA_BIND`, `ZTNA_METRICS`) plus
    /// `env`. Waits for its metrics endpoint.
    pub fn spawn_fleet_relay(
        &self,
        name: &str,
        port: u16,
        metrics: &str,
        env: &[(&str, &str)],
    ) -> Result<DaemonId> {
        let t = self.t;
        let cfg = t.write_file("relay.toml", &self.relay_cfg.to_toml())?;
        let bind = format!("{}:{port}", addr::RELAY);
        let mut all: Vec<(&str, &str)> = vec![("ZTNA_BIND", &bind), ("ZTNA_METRICS", metrics)];
        all.extend_from_slice(env);
        let argv = ["--config".into(), cfg.into_os_string()];
        let id = t.spawn_with_env(Node::Relay, name, &bin("ztna-relay")?, &argv, &all)?;
        self.wait_started(Node::Relay, id, Some(metrics.to_owned()), name)?;
        Ok(id)
    }

    /// The metrics of the relay serving them at `address` (in the relay namespace).
    pub fn relay_metrics_at(&self, address: &str) -> Result<Metrics> {
        self.metrics(Node::Relay, address)
    }

    /// Writes `connector.toml` from [`Stack::conn_cfg`] and starts the connector; waits for its
    /// metrics endpoint when one is configured.
    pub fn start_connector(&mut self) -> Result<DaemonId> {
        let t = self.t;
        let cfg = t.write_file("connector.toml", &self.conn_cfg.to_toml())?;
        let env: Vec<(&str, &str)> = self
            .conn_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let connector = bin("ztna-connector")?;
        let mut argv: Vec<std::ffi::OsString> = self.conn_wrapper.iter().map(Into::into).collect();
        argv.extend([
            connector.into_os_string(),
            "--config".into(),
            cfg.into_os_string(),
        ]);
        let id = t.spawn_with_env(Node::Conn, "connector", &argv[0], &argv[1..], &env)?;
        self.connector = Some(id);
        self.wait_started(Node::Conn, id, self.conn_cfg.metrics.clone(), "connector")?;
        Ok(id)
    }

    /// Starts the main agent from [`Stack::agent_cfg`] (config `agent.toml`, log `agent.log`).
    pub fn start_agent(&mut self) -> Result<DaemonId> {
        let cfg = self.agent_cfg.clone();
        let id = self.spawn_agent("agent", &cfg)?;
        self.agent = Some(id);
        Ok(id)
    }

    /// Writes `<name>.toml` and starts `ztna-agent up --config` with it in the agent namespace.
    pub fn spawn_agent(&self, name: &str, cfg: &AgentConfig) -> Result<DaemonId> {
        let t = self.t;
        let file = t.write_file(&format!("{name}.toml"), &cfg.to_toml())?;
        t.spawn(
            Node::Agent,
            name,
            bin("ztna-agent")?,
            ["up".as_ref(), "--config".as_ref(), file.as_os_str()],
        )
    }

    /// Backends, relay, connector and agent, then [`Stack::wait_ready`].
    pub fn start_all(&mut self) -> Result<AgentStatus> {
        self.start_backends()?;
        self.start_relay()?;
        self.start_connector()?;
        let agent = self.start_agent()?;
        let cfg = self.agent_cfg.clone();
        self.wait_ready(agent, &cfg)
    }

    /// Waits until the agent's status says connected, with a tunnel IP in 100.64.0.0/10 and
    /// `conn1`'s tunnel up (relay or direct path) (at most [`READY_TIMEOUT`]), and then until a first
    /// `ping -c 1 -W 1 10.100.0.1` succeeds (at most [`FIRST_PING_TIMEOUT`]).
    pub fn wait_ready(&self, agent: DaemonId, cfg: &AgentConfig) -> Result<AgentStatus> {
        let t = self.t;
        let last = RefCell::new(String::from("(no answer yet)"));
        let took = wait_until(
            "the agent to be connected with conn1's tunnel up",
            READY_TIMEOUT,
            || {
                if !t.is_running(agent) {
                    return true;
                }
                match self.status(&cfg.status_socket) {
                    Ok(st) => {
                        *last.borrow_mut() = st.json.to_string();
                        st.is_ready("conn1")
                    }
                    Err(e) => {
                        *last.borrow_mut() = format!("{e:#}");
                        false
                    }
                }
            },
        )
        .with_context(|| format!("last status: {}", last.borrow()))?;
        t.ensure_running(agent)?;
        t.step(&format!(
            "agent ready after {:.2} s: {}",
            took.as_secs_f64(),
            last.borrow()
        ));
        let took = wait_until(
            "a first ping through the tunnel to 10.100.0.1",
            FIRST_PING_TIMEOUT,
            || !t.is_running(agent) || self.ping_once(addr::ECHO),
        )?;
        t.ensure_running(agent)?;
        t.step(&format!(
            "first ping answered after {:.2} s",
            took.as_secs_f64()
        ));
        self.status(&cfg.status_socket)
    }

    /// `ztna-agent status --socket SOCKET --json`, parsed.
    pub fn status(&self, socket: &Path) -> Result<AgentStatus> {
        agent_status(self.t, socket)
    }

    /// One `ping -c 1 -W 1 TARGET` from the agent namespace; whether it got an answer.
    pub fn ping_once(&self, target: &str) -> bool {
        self.t
            .run(Node::Agent, 3, ["ping", "-n", "-c", "1", "-W", "1", target])
            .is_ok_and(|o| o.success())
    }

    /// The relay's metrics.
    pub fn relay_metrics(&self) -> Result<Metrics> {
        let m = self
            .relay_cfg
            .metrics
            .as_deref()
            .context("the relay config has no metrics address")?;
        self.metrics(Node::Relay, m)
    }

    /// The connector's metrics.
    pub fn conn_metrics(&self) -> Result<Metrics> {
        let m = self
            .conn_cfg
            .metrics
            .as_deref()
            .context("the connector config has no metrics address")?;
        self.metrics(Node::Conn, m)
    }

    /// The device the agent namespace routes `dst` through (`ip route get`), or `None` when it
    /// has no route.
    pub fn agent_route_dev(&self, dst: &str) -> Result<Option<String>> {
        let out = self.t.host(
            5,
            [
                "ip",
                "-n",
                &self.t.ns(Node::Agent),
                "-4",
                "route",
                "get",
                dst,
            ],
        )?;
        if !out.success() {
            return Ok(None);
        }
        let mut words = out.stdout.split_whitespace();
        while let Some(w) = words.next() {
            if w == "dev" {
                return Ok(words.next().map(str::to_owned));
            }
        }
        Ok(None)
    }

    /// `ip -4 route show table all` in the agent namespace, without the kernel's local and
    /// broadcast entries.
    pub fn agent_routes(&self) -> Result<String> {
        let out = self.t.host(
            5,
            [
                "ip",
                "-n",
                &self.t.ns(Node::Agent),
                "-4",
                "route",
                "show",
                "table",
                "all",
            ],
        )?;
        if !out.success() {
            bail!("{out}");
        }
        Ok(out
            .stdout
            .lines()
            .filter(|l| !l.starts_with("local ") && !l.starts_with("broadcast "))
            .collect::<Vec<_>>()
            .join("\n"))
    }

    fn metrics(&self, node: Node, address: &str) -> Result<Metrics> {
        let url = format!("http://{address}/metrics");
        let out = self
            .t
            .run(node, 5, ["curl", "-sS", "-f", "-m", "3", &url])?;
        if !out.success() {
            bail!("{out}");
        }
        Ok(Metrics::parse(&out.stdout))
    }

    fn wait_metrics(&self, node: Node, id: DaemonId, address: &str, what: &str) -> Result<()> {
        let t = self.t;
        wait_until(
            &format!("the {what} to serve metrics at {address}"),
            Duration::from_secs(10),
            || !t.is_running(id) || self.metrics(node, address).is_ok(),
        )?;
        t.ensure_running(id)
    }
}

/// `ztna-agent status --socket SOCKET --json` in the agent namespace of `t`, parsed.
pub fn agent_status(t: &Topology, socket: &Path) -> Result<AgentStatus> {
    let out = t.run(
        Node::Agent,
        5,
        [
            bin("ztna-agent")?.as_os_str(),
            "status".as_ref(),
            "--socket".as_ref(),
            socket.as_os_str(),
            "--json".as_ref(),
        ],
    )?;
    if !out.success() {
        bail!("{out}");
    }
    AgentStatus::parse(&out.stdout)
}
