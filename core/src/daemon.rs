//! What every ztna daemon does the same way: layered configuration, logging, shutdown signals,
//! and UDP sockets with large buffers.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use figment::providers::{Env, Format, Json, Serialized, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Loads configuration in layers, lowest first: `defaults`, the system file `system` if it
/// exists, `file` (`--config`; TOML, or JSON if it ends in `.json`), `ZTNA_<KEY>` environment
/// variables for `env_keys` only (other programs' variables may share the environment), and
/// command-line `flags` (whose `None` fields must be skipped when serialized).
pub fn layered_config<T: Serialize + DeserializeOwned>(
    defaults: &T,
    system: &Path,
    file: Option<&Path>,
    env_keys: &[&str],
    flags: &impl Serialize,
) -> anyhow::Result<T> {
    let mut fig = Figment::from(Serialized::defaults(defaults));
    if system.exists() {
        fig = fig.merge(Toml::file_exact(system));
    }
    if let Some(f) = file {
        anyhow::ensure!(f.exists(), "config file {} does not exist", f.display());
        fig = if f.extension().is_some_and(|e| e == "json") {
            fig.merge(Json::file_exact(f))
        } else {
            fig.merge(Toml::file_exact(f))
        };
    }
    fig = fig
        .merge(Env::prefixed("ZTNA_").only(env_keys).lowercase(true))
        .merge(Serialized::defaults(flags));
    fig.extract().context("invalid configuration")
}

/// Logs to stderr. The filter is the first of: `flag` (`--log`), `ZTNA_LOG`, `RUST_LOG`,
/// `configured` (the config file's `log`), `info`.
pub fn init_logging(flag: Option<&str>, configured: Option<&str>) {
    let filter = flag
        .map(str::to_owned)
        .or_else(|| std::env::var("ZTNA_LOG").ok())
        .or_else(|| std::env::var("RUST_LOG").ok())
        .or_else(|| configured.map(str::to_owned))
        .unwrap_or_else(|| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("invalid log filter {filter:?} ({e}); using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops this process");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// A non-blocking UDP socket bound to `addr`, with send and receive buffers of `buffer` bytes
/// asked for (the kernel caps them at `net.core.{r,w}mem_max`).
pub fn bind_udp(addr: SocketAddr, buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    let _ = sock.set_recv_buffer_size(buffer);
    let _ = sock.set_send_buffer_size(buffer);
    sock.bind(&addr.into())?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}
