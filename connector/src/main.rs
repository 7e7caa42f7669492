//! `ztna-connector`: terminates agents' end-to-end tunnels next to private services and forwards
//! their packets to the real backends.
//!
//! `config` reads the configuration; `tunnel` holds the relay session and the inner connections;
//! `dataplane` forwards UDP and ICMP (its `packet` and `flows` modules are pure); `metrics`
//! counts what happens.

mod config;
mod dataplane;
mod metrics;
mod names;
mod tunnel;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use ztna_core::session::Node;
use ztna_core::tls::Credentials;
use ztna_proto::Role;

use crate::config::{ConnectorConfig, Flags};
use crate::dataplane::xdp::{FastPath, XdpMode, XdpSettings};
use crate::dataplane::Dataplane;
use crate::metrics::Metrics;
use crate::tunnel::Tunnel;
use ztna_core::direct::DirectOptions;

#[derive(Parser)]
#[command(
    name = "ztna-connector",
    version,
    about = "ztna connector: forwards agents' tunnelled packets to private services"
)]
struct Cli {
    /// Config file (TOML, or JSON if it ends in .json).
    #[arg(long, short, env = "ZTNA_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: Flags,
}

async fn run(cfg: ConnectorConfig) -> anyhow::Result<()> {
    let files = cfg.tls_files()?;
    let creds = Credentials::load(&files).context("loading the connector's TLS files")?;
    anyhow::ensure!(
        creds.identity().role == Role::Connector,
        "certificate {} is for {}, not a connector",
        files.cert.display(),
        creds.identity()
    );
    creds
        .revocation()
        .update(cfg.revocation_list()?)
        .context("loading the CRLs")?;
    // Ends with the runtime.
    tokio::spawn(ztna_core::reload::watch_revocation(
        creds.revocation().clone(),
        cfg.deny_list.clone(),
        cfg.crls.clone(),
        Some(std::time::Duration::from_secs(2)),
    ));
    let relays = cfg.relay_list()?;
    let relay_names = relays
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let backends = cfg.backends()?;
    let name_services = cfg.name_services()?;
    anyhow::ensure!(
        !backends.is_empty() || !name_services.is_empty(),
        "no [[services]] configured"
    );
    let mut services: Vec<ztna_proto::ServiceDef> =
        backends.iter().map(|b| b.def.clone()).collect();
    services.extend(name_services.iter().cloned());
    let metrics = Arc::new(Metrics::default());
    // The XDP fast path is IPv4: it looks at the route to the first IPv4 backend.
    let first_backend = backends.iter().find_map(|b| match b.backend {
        std::net::IpAddr::V4(a) => Some(a),
        std::net::IpAddr::V6(_) => None,
    });
    let xdp = cfg.xdp_settings()?;
    let dataplane = Dataplane::new(backends, cfg.dataplane(), metrics.clone())?;
    if !name_services.is_empty() {
        let servers = cfg.resolver_servers()?;
        tracing::info!(
            name_services = name_services.len(),
            resolver = if servers.is_empty() {
                "system".to_owned()
            } else {
                format!("{servers:?}")
            },
            "name services"
        );
        let resolver = names::Resolver::new(
            servers,
            std::time::Duration::from_secs(cfg.resolver_ttl_secs.max(1)),
            cfg.max_resolved_names,
            metrics.clone(),
        )?;
        dataplane.set_names(dataplane::NameRoutes {
            services: name_services.into(),
            resolver,
            max_per_agent: cfg.max_names_per_agent,
        });
    }
    let fast_path = start_fast_path(&xdp, first_backend, &dataplane, &metrics)?;
    let node = Node::bind(cfg.bind, creds.clone(), cfg.timing())
        .with_context(|| format!("binding UDP {}", cfg.bind))?;
    let local = node.endpoint().local_addr()?;
    if local.ip().is_unspecified() {
        tracing::info!(addr = %local, direct_paths = cfg.direct_paths, "UDP socket on all interfaces (relay connection and direct paths); set `bind` to restrict");
    }
    tracing::info!(identity = %creds.identity().name, relays = %relay_names, "connector starting");
    let metrics_task = cfg.metrics.map(|addr| {
        let m = metrics.clone();
        let fp = fast_path.clone();
        let mux = node.mux().clone();
        tokio::spawn(async move {
            let connected = m.clone();
            let render = move || {
                if let Some(fp) = &fp {
                    fp.sync_metrics();
                }
                metrics::render(&m, mux.stats())
            };
            // Ready while registered with the relay: only then can agents reach its services.
            let ready = move || connected.relay_connected.load(Ordering::Relaxed) > 0;
            if let Err(e) =
                ztna_core::metrics_http::serve(addr, Arc::new(render), Arc::new(ready)).await
            {
                tracing::error!(%addr, error = %e, "metrics endpoint failed");
            }
        })
    });
    let endpoint = node.endpoint().clone();
    let uplink_to = match relays.iter().find_map(|r| r.literal()) {
        Some(a) => Some(a),
        None => ztna_core::fleet::resolve(&relays, local.is_ipv4())
            .await
            .0
            .first()
            .copied(),
    };
    let direct = direct_options(&cfg, &services, uplink_to);
    let tunnel = Tunnel::new(
        node,
        (relays, cfg.relay_name.clone()),
        services,
        dataplane,
        metrics.clone(),
        direct,
    );
    let status = status_loop(fast_path.clone(), metrics.clone());
    ztna_core::daemon::notify_ready(&format!(
        "UDP {local}; connecting to the relays {relay_names}"
    ));
    tokio::select! {
        () = tunnel.run() => {}
        () = status => {}
        () = ztna_core::daemon::watchdog() => {}
        () = ztna_core::daemon::shutdown_signal() => {
            ztna_core::daemon::notify_stopping();
            tracing::info!("connector shutting down")
        }
    }
    if let Some(fp) = &fast_path {
        fp.shutdown();
        log_xdp_status(fp, &metrics);
    }
    endpoint.close(0u32.into(), b"connector shutting down");
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
    if let Some(t) = metrics_task {
        t.abort();
    }
    Ok(())
}

/// Direct-path settings: the configured candidates, and the networks never to probe (service
/// addresses, backends and the backend side's networks).
fn direct_options(
    cfg: &ConnectorConfig,
    services: &[ztna_proto::ServiceDef],
    relay: Option<std::net::SocketAddr>,
) -> DirectOptions {
    let backends: Vec<std::net::IpAddr> = cfg
        .backends()
        .unwrap_or_default()
        .iter()
        .map(|b| b.backend)
        .collect();
    let addrs: Vec<std::net::IpAddr> = services
        .iter()
        .map(|s| s.address.into())
        .chain(services.iter().filter_map(|s| s.address6).map(Into::into))
        .collect();
    let refuse = ztna_core::direct::refused_networks(&addrs, &backends, relay);
    tracing::info!(
        refused_networks = refuse.len(),
        advertise = cfg.advertise.len(),
        "direct paths: candidates chosen, backend side refused as a probe target"
    );
    tracing::debug!(refused = ?refuse, advertise = ?cfg.advertise, "direct-path settings");
    DirectOptions {
        enabled: cfg.direct_paths,
        advertise: cfg.advertise.clone(),
        refuse,
        ..DirectOptions::default()
    }
}

/// Starts the UDP fast path as configured and attaches it to the data plane; `None` when the
/// data plane uses per-flow sockets (see `dataplane::xdp::start` for the mode rules).
fn start_fast_path(
    settings: &XdpSettings,
    first_backend: Option<std::net::Ipv4Addr>,
    dataplane: &Arc<Dataplane>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Option<Arc<FastPath>>> {
    let Some(fp) = dataplane::xdp::start(settings, first_backend, metrics.clone())? else {
        return Ok(None);
    };
    match fp.start_receivers(Arc::downgrade(dataplane)) {
        Ok(()) => {
            dataplane.set_fast_path(fp.clone());
            Ok(Some(fp))
        }
        Err(e) if settings.mode == XdpMode::Auto => {
            fp.shutdown();
            metrics.xdp_mode.store(0, Ordering::Relaxed);
            tracing::warn!("UDP data plane: per-flow sockets, because the AF_XDP sockets could not start: {e:#}");
            Ok(None)
        }
        Err(e) => {
            fp.shutdown();
            Err(e.context("starting the AF_XDP sockets of the XDP fast path"))
        }
    }
}

/// The fast path's status line (the connector has no status command: this line and the
/// metrics endpoint are its status).
fn log_xdp_status(fp: &FastPath, metrics: &Metrics) {
    fp.sync_metrics();
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    tracing::info!(
        mode = ?fp.attached(),
        handled = get(&metrics.xdp_handled),
        dropped = get(&metrics.xdp_dropped),
        dropped_unsolicited = get(&metrics.xdp_dropped_unsolicited),
        passed = get(&metrics.xdp_passed),
        to_agents = get(&metrics.xdp_to_agents),
        flows = get(&metrics.xdp_flow_ports_in_use),
        "XDP status"
    );
}

/// Logs the fast path's status every minute while it runs; never ends.
async fn status_loop(fast_path: Option<Arc<FastPath>>, metrics: Arc<Metrics>) {
    let Some(fp) = fast_path else {
        return std::future::pending().await;
    };
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    tick.tick().await;
    loop {
        tick.tick().await;
        log_xdp_status(&fp, &metrics);
    }
}

/// Allocations at least this large are served by mmap and returned to the system when freed.
///
/// Each TCP connection allocates two socket buffers (256 KiB by default). glibc's adaptive mmap
/// threshold rises after the first such buffer is freed, after which later buffers come from
/// the heap and their pages are never given back: 1000 connections left the connector 300 MiB
/// larger after they closed (e2e `tcp_no_leaks_after_1000_connections`). A fixed threshold keeps
/// buffers in their own mappings, zero-filled on demand and unmapped on free.
const MMAP_THRESHOLD: libc::c_int = 128 * 1024;

/// Tunes glibc's allocator, once, before any thread or large allocation exists:
/// - a fixed mmap threshold ([`MMAP_THRESHOLD`]);
/// - no fastbins (`M_MXFAST` 0). quinn copies every datagram it receives into an allocation of
///   its own, about 1.4 KiB, which glibc serves from its large bins after merging every freed
///   small chunk waiting in the fastbins (`malloc_consolidate`): 2.4-3.2 % of the connector's
///   time in a single-stream upload, gone without them (glibc's allocator took 5.2 % of it
///   then, against 7.3-8.1 %; `bench/README.md`, "The connector's per-segment costs"). Small
///   chunks still come from the per-thread cache.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    // SAFETY: mallopt only changes allocator tuning, and nothing else runs yet.
    let (threshold, fast) = unsafe {
        (
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            libc::mallopt(libc::M_MXFAST, 0),
        )
    };
    if threshold != 1 {
        eprintln!("ztna-connector: could not set the malloc mmap threshold; memory of closed TCP connections may not be returned");
    }
    if fast != 1 {
        eprintln!("ztna-connector: could not turn off malloc's fastbins");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

/// Raises the soft limit of open files to the hard limit: on the socket data plane every UDP
/// flow holds a socket (up to `max_flows_per_agent` per agent), and the common soft limit of
/// 1024 would refuse flows long before that.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() -> std::process::ExitCode {
    tune_malloc();
    raise_nofile_limit();
    ztna_core::daemon::exit_code("ztna-connector", start(Cli::parse()))
}

fn start(cli: Cli) -> anyhow::Result<()> {
    let cfg = ConnectorConfig::load(cli.config.as_deref(), &cli.flags)
        .map_err(|e| e.context(ztna_core::daemon::InvalidConfig))?;
    ztna_core::daemon::init_logging(cli.flags.log.as_deref(), cfg.log.as_deref());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cfg))
}
