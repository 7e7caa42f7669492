//! One tunnel behind a handle: its life cycle (created, running, stopped) and the thread that
//! runs the core. The thread owns a current-thread tokio runtime (the design measured one thread
//! faster than a multi-thread runtime on small machines), starts [`Agent`], and is the only
//! place callbacks are invoked from: packet batches towards the platform, network settings when
//! they change, log lines. Stopping joins that thread, so no callback runs after stop returns.

use std::cell::Cell;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};
use ztna_core::agent::{Agent, AgentStatus};

use crate::config::Config;
use crate::settings::{network_settings, NetworkSettings};
use crate::{Callbacks, FfiError};

/// Most packets handed to the platform in one callback.
pub(crate) const MAX_BATCH: usize = crate::ZTNA_MAX_BATCH;
/// Platform events queued before more are dropped (they are hints; one is enough).
const EVENT_QUEUE: usize = 16;
/// How often the direct-path peers (excluded routes) are looked at.
const PEER_CHECK: Duration = Duration::from_secs(1);

/// An event the platform forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PlatformEvent {
    /// The network path changed (interface, address, Wi-Fi to cellular...).
    PathChanged,
    /// The machine goes to sleep.
    Sleep,
    /// The machine woke up.
    Wake,
}

thread_local! {
    /// Set on every tunnel thread: callbacks run there, and a life-cycle call from a callback
    /// would wait for the thread it runs on.
    static ON_TUNNEL_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Whether the caller runs inside a callback (on a tunnel thread).
pub(crate) fn on_tunnel_thread() -> bool {
    ON_TUNNEL_THREAD.with(Cell::get)
}

enum Phase {
    Created,
    Running {
        stop: oneshot::Sender<()>,
        events: mpsc::Sender<PlatformEvent>,
        thread: JoinHandle<()>,
    },
    Stopped,
}

/// A tunnel. See the module docs.
pub(crate) struct Tunnel {
    cfg: Config,
    cb: Callbacks,
    /// The running core; `None` before start and after stop. Read-locked per packet batch.
    agent: RwLock<Option<Agent>>,
    phase: Mutex<Phase>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tunnel {
    pub(crate) fn new(cfg: Config, cb: Callbacks) -> Self {
        Self {
            cfg,
            cb,
            agent: RwLock::new(None),
            phase: Mutex::new(Phase::Created),
        }
    }

    /// Starts the core on its own thread; returns once the socket is bound (or failed).
    pub(crate) fn start(self: &Arc<Self>) -> Result<(), FfiError> {
        let mut phase = lock(&self.phase);
        match &*phase {
            Phase::Created => {}
            Phase::Running { .. } => return Err(FfiError::state("the tunnel is already running")),
            Phase::Stopped => {
                return Err(FfiError::state(
                    "a stopped tunnel cannot start again: free it and create a new one",
                ))
            }
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
        let me = self.clone();
        let thread = std::thread::Builder::new()
            .name("ztna-tunnel".into())
            .spawn(move || me.thread_main(ready_tx, stop_rx, ev_rx))
            .map_err(|e| FfiError::io(format!("spawning the tunnel thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {
                *phase = Phase::Running {
                    stop: stop_tx,
                    events: ev_tx,
                    thread,
                };
                Ok(())
            }
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(FfiError::io("the tunnel thread ended before it started"))
            }
        }
    }

    /// Stops the core and joins its thread. Idempotent; a tunnel never started becomes stopped.
    /// The phase lock is held until the thread has ended, so a concurrent stop returns only
    /// after that too (nothing on the tunnel thread takes this lock).
    pub(crate) fn stop(&self) -> Result<(), FfiError> {
        let mut phase = lock(&self.phase);
        if let Phase::Running { stop, thread, .. } = std::mem::replace(&mut *phase, Phase::Stopped)
        {
            let _ = stop.send(());
            if thread.join().is_err() {
                return Err(FfiError::panic("the tunnel thread panicked"));
            }
        }
        Ok(())
    }

    /// Hands a platform event to the tunnel thread (dropped when its queue is full).
    pub(crate) fn event(&self, ev: PlatformEvent) -> Result<(), FfiError> {
        match &*lock(&self.phase) {
            Phase::Running { events, .. } => {
                let _ = events.try_send(ev);
                Ok(())
            }
            _ => Err(FfiError::state("the tunnel is not running")),
        }
    }

    /// Sends a batch of IP packets into the tunnel. One allocation for the whole batch: the
    /// packets are copied into one buffer and split into `Bytes` views of it.
    pub(crate) fn send_packets(&self, packets: &[&[u8]]) -> Result<(), FfiError> {
        let agent = self.agent.read().unwrap_or_else(|p| p.into_inner());
        let Some(agent) = agent.as_ref() else {
            return Err(FfiError::state("the tunnel is not running"));
        };
        let total = packets.iter().map(|p| p.len()).sum();
        let mut buf = BytesMut::with_capacity(total);
        for p in packets {
            buf.extend_from_slice(p);
        }
        let mut all = buf.freeze();
        for p in packets {
            // Empty and malformed packets too: the core drops and counts them.
            agent.send_packet(all.split_to(p.len()));
        }
        Ok(())
    }

    /// The status snapshot, as `ztna-agent status --json` prints it.
    pub(crate) fn status(&self) -> Result<AgentStatus, FfiError> {
        let agent = self.agent.read().unwrap_or_else(|p| p.into_inner());
        match agent.as_ref() {
            Some(a) => Ok(a.status()),
            None => Err(FfiError::state("the tunnel is not running")),
        }
    }

    fn thread_main(
        self: Arc<Self>,
        ready: std::sync::mpsc::SyncSender<Result<(), FfiError>>,
        stop: oneshot::Receiver<()>,
        events: mpsc::Receiver<PlatformEvent>,
    ) {
        ON_TUNNEL_THREAD.with(|t| t.set(true));
        let _log = crate::log::dispatch(&self.cb, &self.cfg.log)
            .map(|d| tracing::dispatcher::set_default(&d));
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready.send(Err(FfiError::io(format!("starting the runtime: {e}"))));
                return;
            }
        };
        rt.block_on(async {
            let mut agent_cfg = self
                .cfg
                .settings
                .agent_config(self.cfg.credentials.clone(), None);
            // Below the IPv6 minimum MTU the interface gets no IPv6 (crate::settings).
            agent_cfg.options.ipv6 = self.cfg.settings.mtu >= ztna_core::outbound::IPV6_MIN_MTU;
            let from_tunnel = match Agent::start(agent_cfg) {
                Ok((agent, rx)) => {
                    let state = agent.state();
                    // The DNS server of name services on the tunnel IP; the extension routes
                    // the match domains to it through NEDNSSettings (no SplitDns here).
                    tokio::spawn(ztna_core::dns::run(agent.names(), agent.state(), None));
                    *self.agent.write().unwrap_or_else(|p| p.into_inner()) = Some(agent);
                    (rx, state)
                }
                Err(e) => {
                    let _ = ready.send(Err(FfiError::io(format!(
                        "binding UDP {}: {e}",
                        self.cfg.settings.bind
                    ))));
                    return;
                }
            };
            tracing::info!(settings = %self.cfg.settings, mtu = self.cfg.settings.mtu, "ztna tunnel started");
            let _ = ready.send(Ok(()));
            self.pump(from_tunnel.0, from_tunnel.1, stop, events).await;
            let agent = self.agent.write().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(agent) = agent {
                agent.shutdown().await;
            }
            tracing::info!("ztna tunnel stopped");
        });
        // Dropping the runtime here ends every task the core spawned, before stop returns.
        drop(rt);
    }

    /// Moves packets and settings to the platform until stopped.
    async fn pump(
        &self,
        mut from_tunnel: mpsc::Receiver<Bytes>,
        mut state: tokio::sync::watch::Receiver<ztna_core::agent::TunnelState>,
        mut stop: oneshot::Receiver<()>,
        mut events: mpsc::Receiver<PlatformEvent>,
    ) {
        let mut batch: Vec<Bytes> = Vec::with_capacity(MAX_BATCH);
        let mut ptrs: Vec<*const u8> = Vec::with_capacity(MAX_BATCH);
        let mut lens: Vec<usize> = Vec::with_capacity(MAX_BATCH);
        let mut applied: Option<NetworkSettings> = None;
        let mut peers = tokio::time::interval(PEER_CHECK);
        peers.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut asleep_since = None;
        loop {
            tokio::select! {
                biased;
                _ = &mut stop => break,
                n = from_tunnel.recv_many(&mut batch, MAX_BATCH) => {
                    if n == 0 {
                        break;
                    }
                    ptrs.clear();
                    lens.clear();
                    for p in &batch {
                        ptrs.push(p.as_ptr());
                        lens.push(p.len());
                    }
                    self.cb.packets(&ptrs, &lens);
                    batch.clear();
                }
                changed = state.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.publish_settings(&mut applied);
                }
                _ = peers.tick() => self.publish_settings(&mut applied),
                Some(ev) = events.recv() => {
                    self.on_event(ev, &mut asleep_since);
                    self.publish_settings(&mut applied);
                }
            }
        }
    }

    /// Hands a platform event to the core: a path change re-gathers direct-path candidates; a
    /// wake does too and reconnects to the relay when the sleep outlasted the session. The sleep
    /// is measured in wall-clock time, since the monotonic clock stops while the Mac sleeps.
    fn on_event(&self, ev: PlatformEvent, asleep_since: &mut Option<SystemTime>) {
        let agent = self.agent.read().unwrap_or_else(|p| p.into_inner());
        let Some(agent) = agent.as_ref() else { return };
        match ev {
            PlatformEvent::PathChanged => agent.network_changed(),
            PlatformEvent::Sleep => {
                tracing::info!("system going to sleep");
                *asleep_since = Some(SystemTime::now());
            }
            PlatformEvent::Wake => {
                let slept = asleep_since
                    .take()
                    .and_then(|t| t.elapsed().ok())
                    .unwrap_or_default();
                tracing::info!(slept_s = slept.as_secs(), "system woke up");
                agent.wake(slept);
            }
        }
    }

    /// Calls the settings callback when the settings differ from the ones last applied.
    fn publish_settings(&self, applied: &mut Option<NetworkSettings>) {
        let (state, peers, relays, dns_domains) = {
            let agent = self.agent.read().unwrap_or_else(|p| p.into_inner());
            let Some(agent) = agent.as_ref() else { return };
            let state = agent.state().borrow().clone();
            let status = agent.status();
            // The relay in use first (the extension's tunnelRemoteAddress); every relay of the
            // fleet is excluded from the tunnel.
            let relays = agent.relay_addresses();
            let peers: Vec<IpAddr> = status
                .connectors
                .iter()
                .filter_map(|c| c.direct.as_ref().and_then(|d| d.addr))
                .map(|a| a.ip())
                .collect();
            // NEDNSSettings takes server addresses only: port 53.
            let dns_domains = if agent.names().options().port == 53 {
                agent.names().match_domains()
            } else {
                Vec::new()
            };
            (state, peers, relays, dns_domains)
        };
        let Some(settings) =
            network_settings(&state, &relays, self.cfg.settings.mtu, &peers, &dns_domains)
        else {
            return;
        };
        if applied.as_ref() == Some(&settings) {
            return;
        }
        match serde_json::to_string(&settings) {
            Ok(json) => {
                tracing::info!(
                    routes = settings.included_routes.len(),
                    excluded = settings.excluded_routes.len(),
                    "network settings changed"
                );
                if let Ok(c) = std::ffi::CString::new(json) {
                    self.cb.settings(&c);
                }
                *applied = Some(settings);
            }
            Err(e) => tracing::error!(error = %e, "could not encode the network settings"),
        }
    }
}
