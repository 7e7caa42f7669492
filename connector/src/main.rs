//! `ztna-connector`: terminates agents' end-to-end tunnels next to private services and forwards
//! their packets to the real backends.
//!
//! `config` reads the configuration; `tunnel` holds the relay session and the inner connections;
//! `dataplane` forwards UDP and ICMP (its `packet` and `flows` modules are pure); `metrics`
//! counts what happens.

mod config;
mod dataplane;
mod metrics;
mod tunnel;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use ztna_core::session::Node;
use ztna_core::tls::Credentials;
use ztna_proto::Role;

use crate::config::{ConnectorConfig, Flags};
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
    let relay = cfg.relay_target()?;
    let backends = cfg.backends()?;
    anyhow::ensure!(!backends.is_empty(), "no [[services]] configured");
    let services = backends.iter().map(|b| b.def.clone()).collect();
    let metrics = Arc::new(Metrics::default());
    let dataplane = Dataplane::new(backends, cfg.dataplane(), metrics.clone())?;
    let node = Node::bind(cfg.bind, creds.clone(), cfg.timing())
        .with_context(|| format!("binding UDP {}", cfg.bind))?;
    let local = node.endpoint().local_addr()?;
    if local.ip().is_unspecified() {
        tracing::info!(addr = %local, direct_paths = cfg.direct_paths, "UDP socket on all interfaces (relay connection and direct paths); set `bind` to restrict");
    }
    tracing::info!(identity = %creds.identity().name, relay = %relay.addr, "connector starting");
    let metrics_task = cfg.metrics.map(|addr| {
        let m = metrics.clone();
        let mux = node.mux().clone();
        let render = move || m.render() + &metrics::render_paths(mux.stats());
        tokio::spawn(async move {
            if let Err(e) = ztna_core::metrics_http::serve(addr, Arc::new(render)).await {
                tracing::error!(%addr, error = %e, "metrics endpoint failed");
            }
        })
    });
    let endpoint = node.endpoint().clone();
    let direct = DirectOptions {
        enabled: cfg.direct_paths,
        ..DirectOptions::default()
    };
    let tunnel = Tunnel::new(node, relay, services, dataplane, metrics, direct);
    tokio::select! {
        () = tunnel.run() => {}
        () = ztna_core::daemon::shutdown_signal() => tracing::info!("connector shutting down"),
    }
    endpoint.close(0u32.into(), b"connector shutting down");
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
    if let Some(t) = metrics_task {
        t.abort();
    }
    Ok(())
}

/// Allocations at least this large are served by mmap and returned to the system when freed.
///
/// Each TCP connection allocates two socket buffers (256 KiB by default). glibc's adaptive mmap
/// threshold rises after the first such buffer is freed, after which later buffers come from
/// the heap and their pages are never given back: 1000 connections left the connector 300 MiB
/// larger after they closed (e2e `tcp_no_leaks_after_1000_connections`). A fixed threshold keeps
/// buffers in their own mappings, zero-filled on demand and unmapped on free.
const MMAP_THRESHOLD: libc::c_int = 128 * 1024;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn pin_mmap_threshold() {
    // SAFETY: mallopt only changes allocator tuning; it is called once, before any thread or
    // large allocation exists.
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
    if ok != 1 {
        eprintln!("ztna-connector: could not set the malloc mmap threshold; memory of closed TCP connections may not be returned");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn pin_mmap_threshold() {}

fn main() -> anyhow::Result<()> {
    pin_mmap_threshold();
    let cli = Cli::parse();
    let cfg = ConnectorConfig::load(cli.config.as_deref(), &cli.flags)?;
    ztna_core::daemon::init_logging(cli.flags.log.as_deref(), cfg.log.as_deref());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cfg))
}
