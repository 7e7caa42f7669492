//! `ztna-agent up`: the lifecycle of a running agent.
//!
//! Start: load the credentials, clear what a crashed run may have left (a live agent on the
//! status socket stops us; a stale socket file, a leftover TUN device and leftover ztna routes
//! are removed), create the TUN device, set its MTU and bring it up, install the policy rule
//! that keeps the agent's own (marked) socket out of the service routes' table, bind the status
//! socket and start the tunnel core. Run: two packet loops, the address and route reconciler,
//! the network monitor (the core gathers direct-path candidates again when the host's addresses
//! or default route change) and the status server, until SIGINT or SIGTERM, a fatal device
//! error, or a permanent refusal by the relay ([`Refused`], which `main` turns into its exit
//! code). Stop: remove the routes
//! and the rule, delete the device over netlink and close it, remove the status socket, shut
//! the tunnel down.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinSet;
use ztna_core::agent::{Agent, TunnelState};
use ztna_core::agent_machine::Refusal;
use ztna_core::tls::Credentials;

use crate::config::Config;
use crate::netlink::{Netlink, RuleKey, RULE_PRIORITY};
use crate::status;
use crate::tun::{self, Tun};

/// Wait before retrying an address or route change that failed.
const RECONCILE_RETRY: Duration = Duration::from_secs(2);

/// The relay refused this agent for good; `main` exits with [`Refusal::exit_code`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Refused(pub(crate) Refusal);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}; giving up (exit code {})",
            self.0,
            self.0.exit_code()
        )
    }
}

impl std::error::Error for Refused {}

/// What has been set up and must be taken down.
#[derive(Default)]
struct Running {
    tasks: JoinSet<anyhow::Result<()>>,
    agent: Option<Arc<Agent>>,
    socket_bound: bool,
}

/// The policy rule that sends everything but the agent's own (marked) socket to the service
/// routes' table. Agents with the same table share it. One per address family.
fn rule_key(cfg: &Config, ipv6: bool) -> RuleKey {
    RuleKey {
        ipv6,
        table: cfg.route_table,
        mark: cfg.route_table,
        priority: RULE_PRIORITY,
    }
}

/// The policy rules of the families in use.
fn rules(cfg: &Config, nl: &Netlink) -> Vec<RuleKey> {
    let mut v = vec![rule_key(cfg, false)];
    if nl.ipv6() {
        v.push(rule_key(cfg, true));
    }
    v
}

/// Runs the agent until a signal or a fatal error, then cleans up. Returns the fatal error, if
/// any; a signal is a clean exit.
pub(crate) async fn run(cfg: Config) -> anyhow::Result<()> {
    let credentials = crate::config::credentials(&cfg)?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;

    status::clear_stale(&cfg.status_socket)?;
    let nl = Netlink::connect(cfg.route_table)?;
    nl.remove_stale_link(&cfg.tun).await?;
    let tun = tun::create(&cfg.tun)?;
    tracing::info!(tun = %tun.name, index = tun.index, offload = tun.offload, "TUN device created");
    // Before the device is up: IPv6 on but quiet, or off.
    let nl = nl.with_ipv6(tun::prepare_ipv6(&tun.name, cfg.mtu));

    let mut running = Running::default();
    let outcome = serve(
        &cfg,
        credentials,
        &nl,
        &tun,
        &mut running,
        &mut sigint,
        &mut sigterm,
    )
    .await;

    // Take everything down, whatever happened; report problems but carry on.
    running.tasks.shutdown().await;
    if cfg.dns.split {
        crate::resolved::revert(&tun.name);
    }
    match nl.sync_routes(tun.index, &BTreeSet::new()).await {
        Ok(c) => tracing::debug!(removed = c.removed, "routes removed"),
        Err(e) => tracing::warn!(error = %format!("{e:#}"), "could not remove all routes"),
    }
    for rule in rules(&cfg, &nl) {
        match nl.remove_rule_if_unused(rule).await {
            Ok(removed) => tracing::debug!(removed, ipv6 = rule.ipv6, "policy rule checked"),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "could not remove the policy rule"),
        }
    }
    if let Err(e) = nl.delete_link(tun.index, &tun.name).await {
        tracing::warn!(error = %format!("{e:#}"), "could not delete the TUN device");
    }
    let tun_name = tun.name.clone();
    drop(tun);
    if running.socket_bound {
        if let Err(e) = std::fs::remove_file(&cfg.status_socket) {
            tracing::warn!(socket = %cfg.status_socket.display(), error = %e, "could not remove the status socket");
        }
    }
    if let Some(agent) = running.agent.take() {
        match Arc::try_unwrap(agent) {
            Ok(agent) => agent.shutdown().await,
            Err(_) => tracing::warn!("the tunnel is still in use; not waiting for it to close"),
        }
    }
    match &outcome {
        Ok(()) => {
            tracing::info!(tun = %tun_name, "ztna-agent stopped; routes, device and status socket removed")
        }
        Err(e) => tracing::error!(error = %format!("{e:#}"), "ztna-agent stopped after an error"),
    }
    outcome
}

/// Sets the device up, starts the tunnel and its tasks, and waits for a signal or a failure.
async fn serve(
    cfg: &Config,
    credentials: Credentials,
    nl: &Netlink,
    tun: &Tun,
    running: &mut Running,
    sigint: &mut Signal,
    sigterm: &mut Signal,
) -> anyhow::Result<()> {
    let stale = nl.sync_routes(tun.index, &BTreeSet::new()).await?;
    if stale.removed > 0 {
        tracing::warn!(
            removed = stale.removed,
            "removed leftover ztna routes from an earlier run"
        );
    }
    nl.set_mtu_up(tun.index, &tun.name, cfg.mtu).await?;
    // Service routes live in their own table; the agent's socket is marked and skips it.
    for rule in rules(cfg, nl) {
        if nl.ensure_rule(rule).await? {
            tracing::debug!(
                table = cfg.route_table,
                ipv6 = rule.ipv6,
                "policy rule added"
            );
        }
    }

    let listener = status::bind(&cfg.status_socket)?;
    running.socket_bound = true;

    let mut agent_cfg = cfg.agent_config(credentials, Some(cfg.route_table));
    agent_cfg.options.ipv6 = nl.ipv6();
    let (agent, from_tunnel) = Agent::start(agent_cfg)
        .with_context(|| format!("starting the tunnel on UDP {}", cfg.bind))?;
    let agent = Arc::new(agent);
    running.agent = Some(agent.clone());
    let mut refused = agent.refused();

    running
        .tasks
        .spawn(tun::device_to_tunnel(tun.dev.clone(), agent.clone()));
    running
        .tasks
        .spawn(tun::tunnel_to_device(tun.dev.clone(), from_tunnel));
    running.tasks.spawn(reconcile(
        nl.clone(),
        agent.state(),
        tun.index,
        rules(cfg, nl),
    ));
    running
        .tasks
        .spawn(crate::monitor::watch(agent.clone(), tun.index));
    // The DNS server of name services on the tunnel IP, and split DNS for the link.
    let split: Option<Box<dyn ztna_core::dns::SplitDns>> = if cfg.dns.split {
        Some(Box::new(crate::resolved::Resolved::new(&tun.name)))
    } else {
        None
    };
    let (names, names_state) = (agent.names(), agent.state());
    running.tasks.spawn(async move {
        ztna_core::dns::run(names, names_state, split).await;
        Ok(())
    });
    let status_agent = agent.clone();
    running.tasks.spawn(async move {
        status::serve(listener, move || status_agent.status()).await;
        Ok(())
    });
    tracing::info!(
        relays = %cfg
            .relays
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(","),
        identity = %agent.status().identity,
        tun = %tun.name,
        mtu = cfg.mtu,
        socket = %cfg.status_socket.display(),
        "ztna-agent up"
    );
    ztna_core::daemon::notify_ready(&format!("{} up; {}", tun.name, cfg));
    drop(agent);

    tokio::select! {
        _ = sigint.recv() => {
            tracing::info!("SIGINT received; shutting down");
            Ok(())
        }
        _ = sigterm.recv() => {
            tracing::info!("SIGTERM received; shutting down");
            Ok(())
        }
        r = refused.wait_for(Option::is_some) => match r.ok().and_then(|r| *r) {
            Some(r) => Err(Refused(r).into()),
            None => Err(anyhow!("the tunnel stopped unexpectedly")),
        },
        Some(done) = running.tasks.join_next() => match done {
            Ok(Ok(())) => Err(anyhow!("the tunnel stopped unexpectedly")),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(anyhow!("an agent task failed: {e}")),
        },
    }
}

/// Applies every tunnel state the core publishes (tunnel address, service routes), retrying
/// after a failure. Ends only when the tunnel is dropped. Makes sure the policy rule is there
/// each time (another agent sharing the table may have removed it when it stopped).
async fn reconcile(
    nl: Netlink,
    mut state: watch::Receiver<TunnelState>,
    ifindex: u32,
    rules: Vec<RuleKey>,
) -> anyhow::Result<()> {
    loop {
        let st = state.borrow_and_update().clone();
        let applied = match async {
            for rule in &rules {
                nl.ensure_rule(*rule).await?;
            }
            nl.apply(&st, ifindex).await
        }
        .await
        {
            Ok(c) => {
                if c.added + c.removed > 0 {
                    tracing::info!(
                        services = st.services.len(),
                        routes = c.routes,
                        added = c.added,
                        removed = c.removed,
                        "service routes updated"
                    );
                }
                true
            }
            Err(e) => {
                tracing::warn!(
                    error = %format!("{e:#}"),
                    routes = nl.desired_routes(&st, ifindex).len(),
                    "could not apply the tunnel address and routes; retrying"
                );
                false
            }
        };
        let changed = if applied {
            state.changed().await
        } else {
            tokio::select! {
                r = state.changed() => r,
                _ = tokio::time::sleep(RECONCILE_RETRY) => Ok(()),
            }
        };
        if changed.is_err() {
            return Ok(());
        }
    }
}
