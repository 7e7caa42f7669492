//! Policy reload without a restart: on SIGHUP, and when the config file, the deny list or a CRL
//! changes (a metadata poll every `reload_poll_secs`), the relay re-reads its configuration and
//! puts the new policy, deny list and CRLs in force ([`Relay::apply_policy`]). A configuration
//! that does not load or validate changes nothing: the old policy stays, and the log says why.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ztna_core::reload::Reloader;

use crate::config::RelayConfig;
use crate::server::{Relay, ReloadSummary};

/// Validates `cfg`'s policy and revocation files and puts them in force. On error nothing
/// changed.
pub fn reload_once(relay: &Relay, cfg: &RelayConfig) -> anyhow::Result<ReloadSummary> {
    let policy = cfg.policy()?;
    let list = cfg.revocation_list()?;
    relay
        .revocation()
        .update(list)
        .context("loading the CRLs")?;
    Ok(relay.apply_policy(policy))
}

/// Returns a future that reloads on every trigger until it is dropped. `config_files` are the
/// configuration files to watch (the `--config` file and `/etc/ztna/relay.toml` when present);
/// `load` reads the whole configuration again. The SIGHUP handler is installed before this
/// returns (SIGHUP's default action would end the relay), so call it inside the runtime before
/// serving.
pub fn run<F>(
    relay: Arc<Relay>,
    config_files: Vec<PathBuf>,
    initial: &RelayConfig,
    load: F,
) -> impl std::future::Future<Output = ()>
where
    F: Fn() -> anyhow::Result<RelayConfig>,
{
    let watched = move |cfg: &RelayConfig| -> Vec<PathBuf> {
        config_files
            .iter()
            .cloned()
            .chain(cfg.watched_files())
            .collect()
    };
    let poll = Some(Duration::from_secs(initial.reload_poll_secs)).filter(|p| !p.is_zero());
    let reloader = Reloader::new(watched(initial), poll);
    watch(relay, reloader, watched, load)
}

async fn watch<F, W>(relay: Arc<Relay>, mut reloader: Reloader, watched: W, load: F)
where
    F: Fn() -> anyhow::Result<RelayConfig>,
    W: Fn(&RelayConfig) -> Vec<PathBuf>,
{
    loop {
        let trigger = reloader.next().await;
        let result = load().and_then(|cfg| {
            let summary = reload_once(&relay, &cfg)?;
            Ok((cfg, summary))
        });
        match result {
            Ok((cfg, s)) => {
                tracing::info!(
                    ?trigger,
                    services = s.services,
                    services_dropped = s.services_dropped,
                    sessions_closed = s.sessions_closed,
                    channels_closed = s.channels_closed,
                    "policy reloaded"
                );
                reloader.set_paths(watched(&cfg));
            }
            Err(e) => {
                relay
                    .metrics
                    .policy_reload_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    ?trigger,
                    "policy reload failed; the old policy stays in force: {e:#}"
                );
            }
        }
    }
}
