//! The connector's data plane for UDP, TCP and ICMP: checks every IPv4 and IPv6 packet an
//! agent sends through its tunnel, forwards UDP datagrams and ICMP echo requests to the
//! services' backends (of either family, whatever the family of the agent's packets),
//! terminates TCP in a userspace stack ([`tcp`]) piped to backend connections, and turns what
//! comes back into packets for the agent in the family it used.
//!
//! Layout: [`packet`] (pure: parse and check agent packets, build reply packets) and [`flows`]
//! (pure: the flow table with idle timeout and per-agent cap, time injected) hold the logic;
//! [`udp`] and [`icmp`] are thin tokio shells that own the backend sockets and one task per
//! flow; [`tcp`] runs one smoltcp stack and task per agent; this module glues them together
//! behind [`Dataplane`].
//!
//! Bounds: no queues at all (every send is a non-blocking syscall or the agent's non-blocking
//! sink, and drops when full), at most `max_flows_per_agent` flows (one socket and one task
//! each) per agent *identity* (all its tunnels together) and `max_flows_total` for the
//! connector ([`quota`]), and a fixed-size receive buffer per runtime thread. TCP has its own
//! bounds (a packet queue per agent, `max_tcp_per_agent` connections per identity and
//! `max_tcp_total` in all, with two buffers each, half-open ones closed after a timeout): see
//! [`tcp`].
//!
//! Refused packets: a TCP segment to a port a service doesn't serve is answered with RST, a UDP
//! datagram to such a port, or a protocol the service doesn't serve, with ICMP destination
//! unreachable, administratively prohibited (type 3 code 13), so the agent's application fails
//! at once instead of waiting for its timeout. At most [`ANSWERS_PER_SECOND`] such answers go
//! to one agent tunnel per second (`refused_answered`, `refused_answers_limited`).

mod flows;
pub(crate) mod fragment;
mod icmp;
mod packet;
mod quota;
pub(crate) mod reassembly;
mod tcp;
mod udp;
pub(crate) mod xdp;

use reassembly::Reassembly;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use tokio::task::AbortHandle;
use tracing::{debug, info, trace, warn};
use ztna_proto::ServiceDef;

use crate::metrics::{gauge_dec, gauge_inc, Metrics};
use flows::{Activity, FlowId, FlowKey, FlowTable, InsertError};
use packet::{AgentPacket, DropReason, EchoRequest, Quote, UdpDatagram};
use quota::{Bucket, Caps, Counts, Full, Kind, Limits, Permit};
use udp::BackendSocket;

/// Most answers (RST, ICMP administratively prohibited) to refused packets sent to one agent
/// tunnel per second; bursts of as many.
pub(crate) const ANSWERS_PER_SECOND: u32 = 50;

pub(crate) use tcp::TcpConfig;

/// A service as the connector serves it: its public definition and where its backend is.
#[derive(Debug, Clone)]
pub(crate) struct BackendService {
    /// The service as agents see it (address, ports, ICMP).
    pub(crate) def: ServiceDef,
    /// Address of the backend host that traffic to the service address goes to (either family,
    /// independent of the family of the agent's packets: every flow ends at its own socket).
    pub(crate) backend: IpAddr,
    /// Backend port for every UDP and TCP port of the service; `None` keeps the destination port.
    pub(crate) backend_port: Option<u16>,
}

/// How ICMP echo requests to services are answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum IcmpMode {
    /// Forward them to the backend through unprivileged ICMP sockets, so ping shows the backend's
    /// reachability. The data plane fails to start if such sockets are not allowed.
    Backend,
    /// Answer them in the connector.
    Local,
    /// `Backend` if unprivileged ICMP sockets are allowed, otherwise `Local` with a warning.
    Auto,
}

/// Settings of the data plane.
#[derive(Debug, Clone)]
pub(crate) struct DataplaneConfig {
    /// A flow with no traffic in either direction for this long is closed. Must be non-zero.
    pub(crate) udp_idle_timeout: Duration,
    /// Most flows (UDP and ICMP echo together) an agent may have open. When an agent is at the
    /// cap, packets that would open another flow are dropped (and counted in
    /// `dropped_flow_limit`) until one of its flows idles out; open flows are never evicted.
    /// Must be non-zero. Counted per agent identity: every tunnel of one certificate together.
    pub(crate) max_flows_per_agent: usize,
    /// Most flows (UDP and ICMP echo) of all agents together. Must be non-zero.
    pub(crate) max_flows_total: usize,
    /// How ICMP echo requests are answered.
    pub(crate) icmp: IcmpMode,
    /// TCP settings (connect and idle timeouts, per-agent cap, buffer sizes).
    pub(crate) tcp: TcpConfig,
}

/// Where packets for one agent go (implemented by main.rs over a quinn::Connection::send_datagram;
/// non-blocking, may drop).
///
/// The data plane counts every packet it hands over in `packets_to_agents`; an implementation
/// that drops one should count it in `dropped_to_agent`.
pub(crate) trait ToAgent: Send + Sync + 'static {
    /// Sends one IP packet (IPv4 or IPv6) to the agent, or drops it. Must not block.
    fn send(&self, packet: Bytes);

    /// Whether the way to the agent takes more packets without queueing past its hard bound:
    /// the connector's TCP stack sends nothing while it does not. Datagram traffic (UDP, ICMP)
    /// does not ask.
    fn has_room(&self) -> bool {
        true
    }

    /// Bytes of bulk TCP data the way to the agent takes before it is full: the connector's
    /// TCP stack takes only this much more from the backends of its bulk flows, so its senders
    /// go at the rate the tunnel carries instead of overflowing the tunnel's send buffer, and
    /// the segments of a sparse flow (a request, a keystroke) find [`ToAgent::has_room`]
    /// when a download does not.
    fn tcp_room(&self) -> usize {
        usize::MAX
    }

    /// Sends one of the connector's TCP segments to the agent: on the reliable carriage where
    /// the way to the agent has one and `class` asks for it, else as [`ToAgent::send`] does.
    fn send_tcp(&self, packet: Bytes, class: TcpClass) {
        let _ = class;
        self.send(packet);
    }
}

/// How one of the connector's TCP segments travels to the agent ([`ToAgent::send_tcp`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TcpClass {
    /// It belongs to a flow with little in flight, whose segments go ahead of bulk flows'
    /// where the carriage can keep them apart.
    pub(crate) sparse: bool,
    /// It needs the reliable carriage: anything but a pure ACK (which TCP can lose: the next
    /// one acknowledges as much), and a pure ACK that opens the window its connection had
    /// closed (lost, it would leave the agent's sender waiting for its persist timer).
    pub(crate) reliable: bool,
}

/// One connected agent.
pub(crate) struct Agent {
    /// The agent's id, as main.rs numbers them.
    pub(crate) id: u64,
    /// The agent's identity (from its certificate), for logs.
    identity: String,
    /// The tunnel address the agent was assigned; the only source address accepted from it
    /// (over IPv6: `tunnel_ipv6` of it).
    pub(crate) tunnel_ip: Ipv4Addr,
    /// Where its packets go.
    sink: Arc<dyn ToAgent>,
    /// Set (under its flow table's lock, before its flows are removed) when the agent is
    /// removed, so a packet being handled concurrently can't open a flow that outlives it.
    closed: AtomicBool,
    /// Its UDP and echo flows. One table per agent: a packet takes its own agent's lock only,
    /// never one that every agent's packets contend for.
    flows: Mutex<FlowTable<Flow>>,
    /// The agent's TCP stack and task, started by its first TCP packet; taken (which aborts
    /// the task and closes its connections) when the agent is removed.
    tcp: Mutex<Option<tcp::AgentTcp>>,
    /// Caps of the agent's identity and of the connector.
    limits: Limits,
    /// Answers to refused packets left this second.
    answers: Mutex<Bucket>,
    /// Its fragmented datagrams being reassembled.
    reassembly: Mutex<Reassembly>,
    /// What its name-service addresses stand for.
    pub(crate) names: Arc<crate::names::AgentNames>,
}

impl Agent {
    /// The agent's tunnel address of the family of `like`.
    pub(crate) fn tunnel_addr(&self, like: IpAddr) -> IpAddr {
        match like {
            IpAddr::V4(_) => self.tunnel_ip.into(),
            IpAddr::V6(_) => ztna_proto::service::tunnel_ipv6(self.tunnel_ip).into(),
        }
    }
}

/// Which kind of flow a [`Flow`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlowKind {
    Udp,
    Echo,
}

/// How a flow reaches its backend.
#[derive(Clone)]
enum Route {
    /// Its own connected socket (read by the flow's task).
    Socket(Arc<BackendSocket>),
    /// The XDP fast path: a local port and kernel map entries, no socket.
    Xdp(Arc<xdp::XdpFlow>),
}

/// A flow's I/O handle in the table: its route to the backend, the task reading its socket
/// (socket flows only), and (UDP) the quote of the agent's last datagram. Dropping it aborts
/// the task, which closes the socket, or releases the fast-path port and map entries.
pub(crate) struct Flow {
    kind: FlowKind,
    route: Route,
    quote: Quote,
    /// When its replies last went to the agent, recorded by its reply path without the table.
    activity: Activity,
    task: Option<AbortHandle>,
    metrics: Arc<Metrics>,
    /// The flow's slot in its identity's and the connector's caps (given back on drop).
    permit: Option<Permit>,
}

impl Flow {
    /// Spawns the flow's reply task on `runtime` and counts the flow as opened and active (the
    /// gauge goes down again when the flow is dropped).
    fn start(
        kind: FlowKind,
        (socket, activity): (Arc<BackendSocket>, Activity),
        quote: &[u8],
        task: impl std::future::Future<Output = ()> + Send + 'static,
        runtime: &tokio::runtime::Handle,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let task = runtime.spawn(task).abort_handle();
        let route = Route::Socket(socket);
        Self::counted(kind, route, activity, quote, Some(task), metrics)
    }

    /// A UDP flow on the XDP fast path (no task: replies arrive through AF_XDP), counted as
    /// opened and active.
    fn xdp(flow: xdp::XdpFlow, activity: Activity, quote: &[u8], metrics: &Arc<Metrics>) -> Self {
        Self::counted(
            FlowKind::Udp,
            Route::Xdp(Arc::new(flow)),
            activity,
            quote,
            None,
            metrics,
        )
    }

    fn counted(
        kind: FlowKind,
        route: Route,
        activity: Activity,
        quote: &[u8],
        task: Option<AbortHandle>,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let opened = match kind {
            FlowKind::Udp => &metrics.udp_flows_opened,
            FlowKind::Echo => &metrics.icmp_flows_opened,
        };
        opened.fetch_add(1, Ordering::Relaxed);
        gauge_inc(Self::active(kind, metrics));
        Flow {
            kind,
            route,
            activity,
            quote: Quote::new(quote),
            task,
            metrics: metrics.clone(),
            permit: None,
        }
    }

    fn active(kind: FlowKind, metrics: &Metrics) -> &AtomicU64 {
        match kind {
            FlowKind::Udp => &metrics.udp_flows_active,
            FlowKind::Echo => &metrics.icmp_flows_active,
        }
    }
}

impl flows::Handle for Flow {
    fn activity(&self) -> Option<&Activity> {
        Some(&self.activity)
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
        gauge_dec(Self::active(self.kind, &self.metrics));
    }
}

/// Why flows were closed.
#[derive(Debug, Clone, Copy)]
enum CloseReason {
    Idle,
    AgentRemoved,
    Failing,
}

/// Lets at most [`LogLimiter::PER_SECOND`] drop explanations through per second, so a flood of
/// bad packets can't flood the log (the counters still count every one).
struct LogLimiter {
    window_start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LogLimiter {
    const PER_SECOND: u32 = 20;

    fn new() -> Self {
        Self {
            window_start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether to log now; if so, how many messages were suppressed since the last one logged.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= Duration::from_secs(1));
        if fresh {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used < Self::PER_SECOND {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// The data plane: agents, services, the flow table and its sockets. See the module docs.
pub(crate) struct Dataplane {
    services: HashMap<Ipv4Addr, BackendService>,
    /// The IPv4 address (key of `services`) of each service's IPv6 address.
    services6: HashMap<Ipv6Addr, Ipv4Addr>,
    /// Backends by service address, shared with the agents' TCP tasks.
    tcp_backends: Arc<tcp::Backends>,
    tcp_cfg: TcpConfig,
    agents: RwLock<HashMap<u64, Arc<Agent>>>,
    /// The flow tables' idle timeout and per-agent cap (each agent has its own table).
    udp_idle_timeout: Duration,
    max_flows_per_agent: usize,
    metrics: Arc<Metrics>,
    /// Whether echo requests go to backends (else they are answered locally).
    icmp_backend: bool,
    runtime: tokio::runtime::Handle,
    me: Weak<Dataplane>,
    sweeper: AbortHandle,
    drop_log: Mutex<LogLimiter>,
    /// The XDP fast path for UDP flows, if it runs; set once, before the first agent.
    fast_path: OnceLock<Arc<xdp::FastPath>>,
    /// Flow and TCP caps.
    caps: Caps,
    /// The connector's flow and connection counts.
    global: Arc<Counts>,
    /// The connector's budget for full-size TCP buffers.
    tcp_buffers: Arc<quota::BufferBudget>,
    /// Each connected identity's counts, shared by its tunnels (entries die with the last one).
    identities: Mutex<HashMap<String, Weak<Counts>>>,
    /// Name services and their resolver, if the connector serves any; set once, before the
    /// first agent.
    names: OnceLock<NameRoutes>,
}

/// The IPv4 pool address paired with `a` in the IPv6 pool of one of the name `services`.
pub(crate) fn pool_v4(services: &[ServiceDef], a: Ipv6Addr) -> Option<Ipv4Addr> {
    services.iter().find_map(|s| s.to_v4(a))
}

/// The connector's name services and the resolver of their real names.
pub(crate) struct NameRoutes {
    /// This connector's name services (shared with every agent's TCP task).
    pub(crate) services: Arc<[ServiceDef]>,
    /// Resolves the names agents map.
    pub(crate) resolver: Arc<crate::names::Resolver>,
    /// Most mappings one agent tunnel may hold.
    pub(crate) max_per_agent: usize,
}

/// Mappings per agent tunnel when no name service is configured.
const DEFAULT_NAMES_PER_AGENT: usize = 1024;

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.sweeper.abort();
        // Close every agent's flows and abort its TCP task now: a flow's task holds its agent,
        // so the agent (and its table) would otherwise outlive this struct.
        let agents = std::mem::take(
            self.agents
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for agent in agents.values() {
            drop(self.detach_agent_flows(agent));
        }
    }
}

/// Locks a mutex, carrying on if a panicking thread poisoned it (the data stays consistent:
/// every critical section here is a handful of map operations).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Dataplane {
    /// Must be called inside a tokio runtime (current-thread or multi-thread); spawns an idle-flow sweeper task.
    ///
    /// Fails if the configuration or a service is invalid (zero timeout or cap, two services on
    /// one address, an invalid service definition, backend port 0), if there is no runtime, or
    /// if `icmp` is [`IcmpMode::Backend`], a service has ICMP enabled, and unprivileged ICMP
    /// sockets are not allowed. With [`IcmpMode::Auto`] the latter logs a warning explaining
    /// the sysctl to change and answers pings locally.
    pub(crate) fn new(
        services: Vec<BackendService>,
        cfg: DataplaneConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        let runtime = tokio::runtime::Handle::try_current()
            .context("the data plane must be created inside a tokio runtime")?;
        Activity::start_clock();
        if cfg.udp_idle_timeout.is_zero() {
            bail!("the UDP idle timeout must be greater than zero");
        }
        if cfg.max_flows_per_agent == 0 || cfg.max_flows_total == 0 {
            bail!("the maximum numbers of flows (per agent, total) must be greater than zero");
        }
        cfg.tcp.validate().map_err(|e| anyhow!(e))?;
        let mut by_address = HashMap::with_capacity(services.len());
        for svc in services {
            svc.def.validate().map_err(|e| anyhow!(e))?;
            if svc.backend_port == Some(0) {
                bail!("service {}: backend port 0", svc.def.name);
            }
            let b = svc.backend;
            if !crate::names::usable(&b) {
                bail!(
                    "service {}: backend {b} is not a unicast address",
                    svc.def.name
                );
            }
            let name = svc.def.name.clone();
            if let Some(other) = by_address.insert(svc.def.address, svc) {
                bail!(
                    "services {} and {name} have the same address {}",
                    other.def.name,
                    other.def.address
                );
            }
        }

        let mut services6 = HashMap::new();
        for svc in by_address.values() {
            if let Some(a6) = svc.def.address6 {
                if services6.insert(a6, svc.def.address).is_some() {
                    bail!("two services have the same IPv6 address {a6}");
                }
            }
        }
        let icmp_backend = resolve_icmp_mode(cfg.icmp, by_address.values().any(|s| s.def.icmp))?;
        let period =
            (cfg.udp_idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(5));
        info!(
            services = by_address.len(),
            idle_timeout_ms = cfg.udp_idle_timeout.as_millis() as u64,
            max_flows_per_agent = cfg.max_flows_per_agent,
            max_flows_total = cfg.max_flows_total,
            max_tcp_total = cfg.tcp.max_total,
            tcp_handshake_timeout_ms = cfg.tcp.handshake_timeout.as_millis() as u64,
            icmp = if icmp_backend { "backend" } else { "local" },
            tcp_connect_timeout_ms = cfg.tcp.connect_timeout.as_millis() as u64,
            tcp_idle_timeout_ms = cfg.tcp.idle_timeout.as_millis() as u64,
            max_tcp_per_agent = cfg.tcp.max_per_agent,
            tcp_buffer_bytes = cfg.tcp.buffer_bytes,
            "data plane ready"
        );
        // Each service's backend under its address and, if it has one, its IPv6 address.
        let tcp_backends = Arc::new(
            by_address
                .iter()
                .flat_map(|(addr, s)| {
                    let backend = (s.backend, s.backend_port);
                    let v6 = s.def.address6.map(|a6| (IpAddr::V6(a6), backend));
                    std::iter::once((IpAddr::V4(*addr), backend)).chain(v6)
                })
                .collect(),
        );
        let caps = Caps {
            flows_per_identity: cfg.max_flows_per_agent,
            flows_total: cfg.max_flows_total,
            tcp_per_identity: cfg.tcp.max_per_agent,
            tcp_total: cfg.tcp.max_total,
        };
        let tcp_buffers = quota::BufferBudget::new(cfg.tcp.buffer_budget);
        Ok(Arc::new_cyclic(|me: &Weak<Dataplane>| {
            let sweeper = runtime.spawn(sweep_loop(me.clone(), period)).abort_handle();
            Dataplane {
                services: by_address,
                services6,
                tcp_backends,
                tcp_cfg: cfg.tcp,
                agents: RwLock::new(HashMap::new()),
                udp_idle_timeout: cfg.udp_idle_timeout,
                max_flows_per_agent: cfg.max_flows_per_agent,
                metrics,
                icmp_backend,
                runtime,
                me: me.clone(),
                sweeper,
                drop_log: Mutex::new(LogLimiter::new()),
                fast_path: OnceLock::new(),
                caps,
                global: Arc::default(),
                tcp_buffers,
                identities: Mutex::default(),
                names: OnceLock::new(),
            }
        }))
    }

    /// Sets the name services (main.rs calls this once, before agents connect). Returns false
    /// if they were already set.
    pub(crate) fn set_names(&self, names: NameRoutes) -> bool {
        self.names.set(names).is_ok()
    }

    /// The connector's name services (empty if none).
    pub(crate) fn name_services(&self) -> &[ServiceDef] {
        self.names.get().map_or(&[], |n| &*n.services)
    }

    /// The resolver of name services, if any.
    pub(crate) fn resolver(&self) -> Option<&Arc<crate::names::Resolver>> {
        self.names.get().map(|n| &n.resolver)
    }

    /// The name mappings of agent `id`.
    pub(crate) fn agent_names(&self, id: u64) -> Option<Arc<crate::names::AgentNames>> {
        self.agents
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .map(|a| a.names.clone())
    }

    /// The name service whose pool holds `addr`, if the agent mapped `addr` to a name.
    fn mapped_name_service(&self, agent: &Agent, addr: Ipv4Addr) -> Option<&ServiceDef> {
        let svc = self.name_services().iter().find(|s| s.covers(addr))?;
        agent.names.is_mapped(addr).then_some(svc)
    }

    /// The IPv4 address standing for the same service (or name-service pool address) as the
    /// IPv6 address `addr`: a service's `address`, or the paired address of a name service's
    /// IPv4 pool. `None` if `addr` is no service's.
    pub(crate) fn v4_equivalent(&self, addr: Ipv6Addr) -> Option<Ipv4Addr> {
        if let Some(a) = self.services6.get(&addr) {
            return Some(*a);
        }
        pool_v4(self.name_services(), addr)
    }

    /// The IPv4 key of service address `addr` (itself, or its IPv4 equivalent).
    fn v4_key(&self, addr: IpAddr) -> Option<Ipv4Addr> {
        match addr {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(a) => self.v4_equivalent(a),
        }
    }

    /// The service that packets from `agent` to `addr` (either family) reach, if any.
    fn service_def(&self, agent: &Agent, addr: IpAddr) -> Option<&ServiceDef> {
        let a = self.v4_key(addr)?;
        self.services
            .get(&a)
            .map(|s| &s.def)
            .or_else(|| self.mapped_name_service(agent, a))
    }

    /// Where traffic from `agent` to service address `addr` goes now: the backend address, the
    /// port override, and the service name. For a name service, the current address of the
    /// mapped name (resolution starts, and the packet is dropped and counted, if it has none).
    fn target(&self, agent: &Agent, addr: IpAddr) -> Option<(IpAddr, Option<u16>, &str)> {
        let addr = self.v4_key(addr)?;
        if let Some(svc) = self.services.get(&addr) {
            return Some((svc.backend, svc.backend_port, svc.def.name.as_str()));
        }
        let svc = self.name_services().iter().find(|s| s.covers(addr))?;
        let name = agent.names.name_of(addr)?;
        match self.resolver().and_then(|r| r.cached(&name)) {
            Some(ip) => Some((ip, None, svc.name.as_str())),
            None => {
                self.metrics
                    .dropped_name_unresolved
                    .fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Puts UDP flows opened from now on onto the XDP fast path (main.rs calls this once,
    /// before agents connect). Returns false if a fast path was already set.
    pub(crate) fn set_fast_path(&self, fast_path: Arc<xdp::FastPath>) -> bool {
        self.fast_path.set(fast_path).is_ok()
    }

    /// Registers an agent whose tunnel address is `tunnel_ip`; its packets go to `to_agent`.
    /// Replaces (and closes the flows of) an agent already registered under `id`. Returns the
    /// agent, for [`Dataplane::handle_packet`].
    pub(crate) fn add_agent(
        &self,
        id: u64,
        identity: String,
        tunnel_ip: Ipv4Addr,
        to_agent: Arc<dyn ToAgent>,
    ) -> Arc<Agent> {
        debug!(agent = id, %identity, %tunnel_ip, "agent added to the data plane");
        let counts = {
            let mut ids = lock(&self.identities);
            ids.retain(|_, c| c.strong_count() > 0);
            match ids.get(&identity).and_then(Weak::upgrade) {
                Some(c) => c,
                None => {
                    let c = Arc::new(Counts::default());
                    ids.insert(identity.clone(), Arc::downgrade(&c));
                    c
                }
            }
        };
        let agent = Arc::new(Agent {
            id,
            identity,
            tunnel_ip,
            sink: to_agent,
            closed: AtomicBool::new(false),
            flows: Mutex::new(FlowTable::new(
                self.udp_idle_timeout,
                self.max_flows_per_agent,
            )),
            tcp: Mutex::new(None),
            limits: Limits {
                caps: self.caps,
                identity: counts,
                global: self.global.clone(),
            },
            answers: Mutex::new(Bucket::new(ANSWERS_PER_SECOND)),
            reassembly: Mutex::default(),
            names: Arc::new(crate::names::AgentNames::new(
                self.names
                    .get()
                    .map_or(DEFAULT_NAMES_PER_AGENT, |n| n.max_per_agent),
            )),
        });
        // Close the old registration's flows before anyone can look up the new one, so that
        // no flow of the new registration is caught by the cleanup.
        let closed = {
            let mut agents = self.agents.write().unwrap_or_else(PoisonError::into_inner);
            agents
                .insert(id, agent.clone())
                .map(|old| self.detach_agent_flows(&old))
        };
        if let Some(closed) = closed {
            debug!(
                agent = id,
                flows = closed.len(),
                "agent re-added; closed the previous registration's flows"
            );
            self.closed(closed, CloseReason::AgentRemoved);
        }
        agent
    }

    /// Removes an agent and closes all its flows.
    pub(crate) fn remove_agent(&self, id: u64) {
        // Detach under the agents' lock, like add_agent, so a concurrent re-add of `id` can't
        // lose its new flows to this cleanup.
        let removed = {
            let mut agents = self.agents.write().unwrap_or_else(PoisonError::into_inner);
            agents
                .remove(&id)
                .map(|agent| (self.detach_agent_flows(&agent), agent))
        };
        match removed {
            Some((closed, agent)) => {
                debug!(agent = id, identity = %agent.identity, flows = closed.len(), "agent removed; flows closed");
                self.closed(closed, CloseReason::AgentRemoved);
            }
            None => debug!(agent = id, "remove_agent: no such agent"),
        }
    }

    /// Marks an agent registration closed and takes its flows out of its table (for the caller
    /// to drop outside the locks). Under the table's lock, so a packet from this registration
    /// that is being handled concurrently can't open a flow afterwards.
    fn detach_agent_flows(&self, agent: &Agent) -> Vec<(FlowKey, Flow)> {
        let mut flows = lock(&agent.flows);
        agent.closed.store(true, Ordering::Relaxed);
        // Aborts the agent's TCP task: its connections close as the task is dropped.
        drop(lock(&agent.tcp).take());
        flows.remove_agent(agent.id)
    }

    /// The flows of every agent.
    #[cfg(test)]
    fn flow_count(&self) -> usize {
        let agents = self.agents.read().unwrap_or_else(PoisonError::into_inner);
        agents.values().map(|a| lock(&a.flows).len()).sum()
    }

    /// The agent registered under `id`, if any.
    pub(crate) fn agent(&self, id: u64) -> Option<Arc<Agent>> {
        self.agents
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned()
    }

    /// A packet from agent `id`'s tunnel, looked up by id ([`Dataplane::handle_packet`] takes
    /// the agent itself, without the agents' lock).
    #[cfg(test)]
    pub(crate) fn handle_from_agent(&self, id: u64, packet: &[u8]) {
        match self.agent(id) {
            Some(agent) => self.handle_packet(&agent, packet),
            None => {
                let m = &self.metrics;
                m.packets_from_agents.fetch_add(1, Ordering::Relaxed);
                m.bytes_from_agents
                    .fetch_add(packet.len() as u64, Ordering::Relaxed);
                m.dropped_unknown_agent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Called for every packet from `agent`'s tunnel (the tunnel keeps the agent that
    /// [`Dataplane::add_agent`] returned, so no shared lock is taken to find it). Synchronous
    /// and non-blocking (use try_send on sockets / spawn), never panics. A packet of an agent
    /// already removed opens nothing (`Agent::closed`).
    pub(crate) fn handle_packet(&self, agent: &Arc<Agent>, packet: &[u8]) {
        let m = &self.metrics;
        m.packets_from_agents.fetch_add(1, Ordering::Relaxed);
        m.bytes_from_agents
            .fetch_add(packet.len() as u64, Ordering::Relaxed);
        trace!(agent = agent.id, len = packet.len(), "packet from agent");
        if agent.closed.load(Ordering::Relaxed) {
            // Removed (or replaced) while this packet was on its way: like an unknown agent.
            m.dropped_unknown_agent.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // A fragment waits for the rest of its datagram; the whole one is checked as usual.
        let whole;
        let packet = if reassembly::is_fragment(packet) {
            match lock(&agent.reassembly).add(packet, Instant::now()) {
                Ok(None) => return,
                Ok(Some(p)) => {
                    m.fragments_reassembled.fetch_add(1, Ordering::Relaxed);
                    whole = p;
                    &whole[..]
                }
                Err(why) => {
                    m.dropped_fragments.fetch_add(1, Ordering::Relaxed);
                    if let Some(suppressed) = lock(&self.drop_log).allow(Instant::now()) {
                        debug!(agent = agent.id, identity = %agent.identity, ?why, suppressed, "dropped a fragment from agent");
                    }
                    return;
                }
            }
        } else {
            packet
        };
        let verdict = packet::inspect(packet, agent.tunnel_ip, |a| self.service_def(agent, a));
        match verdict {
            Ok(AgentPacket::Udp(d)) => self.udp_from_agent(agent, d),
            Ok(AgentPacket::Echo(e)) => self.echo_from_agent(agent, e),
            Ok(AgentPacket::Tcp { .. }) => self.tcp_from_agent(agent, packet),
            Err(reason) => self.dropped(agent, reason, packet),
        }
    }

    /// Counts a dropped packet and explains it at DEBUG (rate-limited); answers it if it went
    /// to a port or protocol a service doesn't serve (RST or ICMP administratively prohibited,
    /// within the agent's answer budget).
    fn dropped(&self, agent: &Agent, reason: DropReason, packet: &[u8]) {
        let m = &self.metrics;
        let counter = match reason {
            DropReason::Malformed(_) => &m.dropped_malformed,
            DropReason::SpoofedSource { .. } => &m.dropped_spoofed_source,
            DropReason::NoSuchService { .. }
            | DropReason::PortNotServed { .. }
            | DropReason::ProtocolNotServed { .. } => &m.dropped_not_service,
            DropReason::Unsupported(_) => &m.dropped_unsupported,
            DropReason::Ipv6Fragment => &m.dropped_ipv6_fragments,
            DropReason::Ipv6ExtensionHeaders { .. } => &m.dropped_ipv6_extension_headers,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = lock(&self.drop_log).allow(Instant::now()) {
            debug!(agent = agent.id, identity = %agent.identity, %reason, suppressed, "dropped packet from agent");
        }
        if matches!(
            reason,
            DropReason::PortNotServed { .. } | DropReason::ProtocolNotServed { .. }
        ) {
            if let Some(answer) = packet::unserved_answer(packet, &reason) {
                if lock(&agent.answers).take(Instant::now()) {
                    m.refused_answered.fetch_add(1, Ordering::Relaxed);
                    self.send_to_agent(agent, answer);
                } else {
                    m.refused_answers_limited.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Queues a checked TCP segment for the agent's TCP task, starting the task if needed.
    fn tcp_from_agent(&self, agent: &Agent, packet: &[u8]) {
        let mut slot = lock(&agent.tcp);
        if agent.closed.load(Ordering::Relaxed) {
            return; // removed while this packet was in flight
        }
        let engine = slot.get_or_insert_with(|| {
            let _entered = self.runtime.enter();
            debug!(agent = agent.id, identity = %agent.identity, "starting the agent's TCP stack");
            tcp::AgentTcp::spawn(tcp::AgentCtx {
                agent: agent.id,
                sink: agent.sink.clone(),
                metrics: self.metrics.clone(),
                backends: self.tcp_backends.clone(),
                names: self.names.get().map(|n| tcp::AgentNameCtx {
                    names: agent.names.clone(),
                    resolver: n.resolver.clone(),
                    services: n.services.clone(),
                }),
                cfg: self.tcp_cfg.clone(),
                limits: agent.limits.clone(),
                buffers: self.tcp_buffers.clone(),
            })
        });
        if !engine.push(packet) {
            self.metrics
                .tcp_dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = lock(&self.drop_log).allow(Instant::now()) {
                debug!(
                    agent = agent.id,
                    suppressed, "dropped TCP segment: the agent's TCP queue is full"
                );
            }
        }
    }

    /// What a flow's task needs to know about its flow.
    fn flow_ref(
        &self,
        agent: &Arc<Agent>,
        key: FlowKey,
        id: FlowId,
        activity: &Activity,
    ) -> udp::FlowRef {
        udp::FlowRef {
            key,
            id,
            activity: activity.clone(),
            agent: agent.clone(),
            dataplane: self.me.clone(),
        }
    }

    fn udp_from_agent(&self, agent: &Arc<Agent>, d: UdpDatagram<'_>) {
        let Some((backend_ip, backend_port, service)) = self.target(agent, d.dst.ip()) else {
            return; // inspect() only accepts service addresses; a name not resolved yet
        };
        let key = FlowKey::Udp {
            agent: agent.id,
            agent_port: d.src.port(),
            service: d.dst.ip(),
            port: d.dst.port(),
        };
        let backend = SocketAddr::new(backend_ip, backend_port.unwrap_or(d.dst.port()));
        let route = self.route(agent, key, d.quote, |id| {
            let activity = Activity::default();
            // The XDP fast path is IPv4 on both sides; other flows use sockets.
            if let (Some(fast), SocketAddr::V4(b4), SocketAddr::V4(dst4), SocketAddr::V4(src4)) =
                (self.fast_path.get(), backend, d.dst, d.src)
            {
                let flow = fast.open_flow(agent, &activity, key, id, (b4, dst4, src4))?;
                debug!(
                    agent = agent.id, identity = %agent.identity, service = %service,
                    agent_port = d.src.port(), port = d.dst.port(), %backend,
                    local_port = flow.port, "UDP flow opened on the XDP fast path"
                );
                return Ok(Flow::xdp(flow, activity, d.quote, &self.metrics));
            }
            let socket = Arc::new(udp::open(backend)?);
            let flow = self.flow_ref(agent, key, id, &activity);
            let task = udp::udp_replies(socket.clone(), flow, d.dst, d.src);
            debug!(
                agent = agent.id, identity = %agent.identity, service = %service,
                agent_port = d.src.port(), port = d.dst.port(), %backend, "UDP flow opened"
            );
            Ok(Flow::start(
                FlowKind::Udp,
                (socket, activity),
                d.quote,
                task,
                &self.runtime,
                &self.metrics,
            ))
        });
        let sent = match route {
            Some(Route::Socket(socket)) => socket.try_send(d.payload).map(drop),
            Some(Route::Xdp(flow)) => flow.send(d.payload),
            None => return,
        };
        match sent {
            Ok(()) => trace!(
                agent = agent.id,
                len = d.payload.len(),
                "UDP datagram to backend"
            ),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.metrics
                    .dropped_to_backend
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = lock(&self.drop_log).allow(Instant::now()) {
                    debug!(agent = agent.id, %backend, suppressed, "dropped UDP datagram: backend socket buffer full");
                }
            }
            // A refusal of an earlier datagram, reported on this send (which did not go out).
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                self.send_port_unreachable(agent, d.dst.ip(), d.quote);
            }
            Err(e) => self.backend_error(agent, &e),
        }
    }

    fn echo_from_agent(&self, agent: &Arc<Agent>, e: EchoRequest<'_>) {
        if !self.icmp_backend {
            match packet::build_echo_reply(e.dst, e.src, e.ident, e.seq, e.payload) {
                Ok(reply) => {
                    self.metrics.icmp_echo_local.fetch_add(1, Ordering::Relaxed);
                    trace!(
                        agent = agent.id,
                        seq = e.seq,
                        "answered echo request locally"
                    );
                    self.send_to_agent(agent, reply);
                }
                Err(err) => self.backend_error(agent, &err),
            }
            return;
        }
        let Some((backend, _, service)) = self.target(agent, e.dst) else {
            return; // inspect() only accepts service addresses; a name not resolved yet
        };
        let key = FlowKey::Echo {
            agent: agent.id,
            ident: e.ident,
            service: e.dst,
        };
        let socket = self.route(agent, key, &[], |id| {
            let socket = Arc::new(icmp::open(backend)?);
            let activity = Activity::default();
            let task = icmp::echo_replies(
                socket.clone(),
                self.flow_ref(agent, key, id, &activity),
                e.dst,
                e.ident,
                backend.is_ipv6(),
            );
            debug!(
                agent = agent.id, identity = %agent.identity, service = %service,
                ident = e.ident, %backend, "ICMP echo flow opened"
            );
            Ok(Flow::start(
                FlowKind::Echo,
                (socket, activity),
                &[],
                task,
                &self.runtime,
                &self.metrics,
            ))
        });
        let Some(Route::Socket(socket)) = socket else {
            return;
        };
        let message = packet::build_echo_request_message(e.seq, e.payload, backend.is_ipv6());
        match socket.try_send(&message) {
            Ok(_) => {
                self.metrics
                    .icmp_echo_backend
                    .fetch_add(1, Ordering::Relaxed);
                trace!(agent = agent.id, seq = e.seq, "echo request to backend");
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                self.metrics
                    .dropped_to_backend
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => self.backend_error(agent, &err),
        }
    }

    /// Finds the live flow for `key` (refreshing it and its quote) or opens one with `make`,
    /// and returns its socket; `None` when the packet must be dropped (counted here).
    fn route(
        &self,
        agent: &Arc<Agent>,
        key: FlowKey,
        quote: &[u8],
        make: impl FnOnce(FlowId) -> io::Result<Flow>,
    ) -> Option<Route> {
        let now = Instant::now();
        let mut expired = Vec::new();
        let outcome = {
            let mut flows = lock(&agent.flows);
            if let Some((_, flow)) = flows.get_mut(&key, now) {
                flow.quote.set(quote);
                Ok(Ok(flow.route.clone()))
            } else if agent.closed.load(Ordering::Relaxed) {
                Err(None) // removed while this packet was in flight
            } else {
                match agent.limits.acquire(Kind::Flow) {
                    Err(full) => Ok(Err(full)),
                    Ok(permit) => {
                        // Enter the runtime: registering a socket and spawning need it, and
                        // main.rs may call from outside.
                        let _entered = self.runtime.enter();
                        let make = |id| {
                            make(id).map(|mut f| {
                                f.permit = Some(permit);
                                f
                            })
                        };
                        match flows.insert_with(key, now, &mut expired, make) {
                            Ok(id) => flows
                                .peek(&key, id)
                                .map(|f| Ok(f.route.clone()))
                                .ok_or(None),
                            Err(e) => Err(Some(e)),
                        }
                    }
                }
            }
        };
        self.closed(expired, CloseReason::Idle);
        match outcome {
            Ok(Ok(socket)) => Some(socket),
            Ok(Err(full)) => {
                let counter = match full {
                    Full::Identity => &self.metrics.dropped_flow_limit,
                    Full::Global => &self.metrics.dropped_global_limit,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = lock(&self.drop_log).allow(now) {
                    debug!(agent = agent.id, identity = %agent.identity, ?key, ?full, suppressed, "dropped packet: at a flow limit");
                }
                None
            }
            Err(None) | Err(Some(InsertError::Exists)) => None,
            Err(Some(InsertError::AgentFull)) => {
                self.metrics
                    .dropped_flow_limit
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = lock(&self.drop_log).allow(now) {
                    debug!(agent = agent.id, identity = %agent.identity, ?key, suppressed, "dropped packet: agent is at its flow limit");
                }
                None
            }
            Err(Some(InsertError::Make(e))) => {
                self.backend_error(agent, &e);
                None
            }
        }
    }

    /// Closes flows the table handed back (dropping a [`Flow`] aborts its task and closes its
    /// socket), counting idle expiries.
    fn closed(&self, flows: Vec<(FlowKey, Flow)>, reason: CloseReason) {
        for (key, flow) in flows {
            if matches!(reason, CloseReason::Idle) {
                let counter = match flow.kind {
                    FlowKind::Udp => &self.metrics.udp_flows_expired,
                    FlowKind::Echo => &self.metrics.icmp_flows_expired,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            debug!(?key, ?reason, "flow closed");
            drop(flow);
        }
    }

    /// Removes idle flows; the sweeper task calls this periodically.
    fn sweep(&self, now: Instant) {
        let agents: Vec<Arc<Agent>> = self
            .agents
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let (mut expired, mut remaining) = (Vec::new(), 0);
        for agent in agents {
            let mut flows = lock(&agent.flows);
            expired.extend(flows.expire(now));
            remaining += flows.len();
        }
        if !expired.is_empty() {
            debug!(expired = expired.len(), remaining, "closing idle flows");
        }
        self.closed(expired, CloseReason::Idle);
    }

    /// Marks a flow active because of a reply from its backend.
    /// The quote of the agent's last datagram on a flow.
    fn flow_quote(&self, key: &FlowKey, id: FlowId) -> Option<Quote> {
        let agent = self.agent(key.agent())?;
        let quote = lock(&agent.flows).peek(key, id).map(|f| f.quote);
        quote
    }

    /// Closes one flow (its task gave up).
    fn close_flow(&self, key: &FlowKey, id: FlowId) {
        let removed = self
            .agent(key.agent())
            .and_then(|agent| lock(&agent.flows).remove(key, id));
        self.closed(
            removed.map(|f| (*key, f)).into_iter().collect(),
            CloseReason::Failing,
        );
    }

    /// Hands a packet to an agent's sink, counting it.
    fn send_to_agent(&self, agent: &Agent, packet: impl Into<Bytes>) {
        let packet = packet.into();
        self.metrics
            .packets_to_agents
            .fetch_add(1, Ordering::Relaxed);
        self.metrics
            .bytes_to_agents
            .fetch_add(packet.len() as u64, Ordering::Relaxed);
        agent.sink.send(packet);
    }

    /// Tells an agent that a service port refused its datagram (ICMP port unreachable from the
    /// service address, quoting the datagram).
    fn send_port_unreachable(&self, agent: &Agent, service: IpAddr, quote: &[u8]) {
        match packet::build_port_unreachable(service, agent.tunnel_addr(service), quote) {
            Ok(icmp) => {
                self.metrics
                    .icmp_unreachable_sent
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = lock(&self.drop_log).allow(Instant::now()) {
                    debug!(agent = agent.id, %service, suppressed, "backend refused a UDP datagram; sent port unreachable");
                }
                self.send_to_agent(agent, icmp);
            }
            Err(e) => self.backend_error(agent, &e),
        }
    }

    /// Counts and explains an error on the backend side.
    fn backend_error(&self, agent: &Agent, error: &dyn std::fmt::Display) {
        self.metrics.backend_errors.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = lock(&self.drop_log).allow(Instant::now()) {
            debug!(agent = agent.id, %error, suppressed, "backend error");
        }
    }
}

/// Decides whether echo requests go to backends, probing for unprivileged ICMP sockets when
/// it matters.
fn resolve_icmp_mode(mode: IcmpMode, any_icmp_service: bool) -> anyhow::Result<bool> {
    if !any_icmp_service || mode == IcmpMode::Local {
        return Ok(false);
    }
    match (icmp::probe(), mode) {
        (Ok(()), _) => Ok(true),
        (Err(e), IcmpMode::Backend) => Err(anyhow!(
            "icmp = \"backend\" is configured, but {}; or set icmp = \"local\" or \"auto\"",
            icmp::explain_probe_failure(&e)
        )),
        (Err(e), _) => {
            warn!(
                "answering ICMP echo to services locally, so ping shows that the connector is \
                 up but not whether the backend is: {}",
                icmp::explain_probe_failure(&e)
            );
            Ok(false)
        }
    }
}

/// Periodically removes idle flows until the data plane is dropped.
async fn sweep_loop(dataplane: Weak<Dataplane>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(dp) = dataplane.upgrade() else {
            return;
        };
        dp.sweep(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{
        Icmpv4Slice, Icmpv4Type, Ipv4HeaderSlice, PacketBuilder, SlicedPacket, TransportSlice,
        UdpHeader,
    };
    use std::sync::atomic::AtomicU64;
    use tokio::sync::mpsc;
    use ztna_proto::PortRange;

    const AGENT_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
    const SVC_IP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
    const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;
    const LIMIT: Duration = Duration::from_secs(10);

    /// A sink that collects packets into a bounded channel.
    struct Collect(mpsc::Sender<Bytes>);

    impl ToAgent for Collect {
        fn send(&self, packet: Bytes) {
            let _ = self.0.try_send(packet);
        }
    }

    fn service(udp: Vec<PortRange>, icmp: bool, backend_port: Option<u16>) -> BackendService {
        BackendService {
            def: ServiceDef {
                name: "svc".into(),
                address: SVC_IP,
                address6: None,
                udp,
                tcp: vec![PortRange::single(443)],
                icmp,
                connector: String::new(),
                names: None,
            },
            backend: LOCALHOST.into(),
            backend_port,
        }
    }

    fn config(icmp: IcmpMode) -> DataplaneConfig {
        DataplaneConfig {
            udp_idle_timeout: Duration::from_secs(30),
            max_flows_per_agent: 8,
            max_flows_total: 1 << 16,
            icmp,
            tcp: TcpConfig::default(),
        }
    }

    fn dataplane(
        services: Vec<BackendService>,
        cfg: DataplaneConfig,
    ) -> (Arc<Dataplane>, Arc<Metrics>, mpsc::Receiver<Bytes>) {
        let metrics = Arc::new(Metrics::default());
        let dp = Dataplane::new(services, cfg, metrics.clone()).expect("data plane");
        let (tx, rx) = mpsc::channel(64);
        dp.add_agent(
            1,
            "alice@example.org".into(),
            AGENT_IP,
            Arc::new(Collect(tx)),
        );
        (dp, metrics, rx)
    }

    fn agent_udp(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv4(AGENT_IP.octets(), SVC_IP.octets(), 64).udp(sport, dport);
        let mut v = Vec::new();
        b.write(&mut v, data).expect("build");
        v
    }

    /// A SYN from the agent to the service's `dport`, with sequence number `seq` and `window`.
    fn agent_syn(sport: u16, dport: u16, seq: u32, window: u16) -> Vec<u8> {
        let b = PacketBuilder::ipv4(AGENT_IP.octets(), SVC_IP.octets(), 64)
            .tcp(sport, dport, seq, window)
            .syn();
        let mut v = Vec::new();
        b.write(&mut v, &[]).expect("build");
        v
    }

    fn agent_echo(ident: u16, seq: u16, data: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv4(AGENT_IP.octets(), SVC_IP.octets(), 64)
            .icmpv4_echo_request(ident, seq);
        let mut v = Vec::new();
        b.write(&mut v, data).expect("build");
        v
    }

    async fn next(rx: &mut mpsc::Receiver<Bytes>) -> Bytes {
        tokio::time::timeout(LIMIT, rx.recv())
            .await
            .expect("no packet for the agent in time")
            .expect("channel open")
    }

    /// Checks addresses, TTL and IPv4 checksum of a packet to the agent; returns its header.
    fn check_ip(packet: &[u8]) -> etherparse::Ipv4Header {
        let h = Ipv4HeaderSlice::from_slice(packet)
            .expect("ipv4")
            .to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        assert_eq!(Ipv4Addr::from(h.source), SVC_IP);
        assert_eq!(Ipv4Addr::from(h.destination), AGENT_IP);
        assert_eq!(h.time_to_live, 64);
        assert_eq!(usize::from(h.total_len), packet.len());
        h
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Waits until `cond` holds, polling.
    async fn eventually(what: &str, cond: impl Fn() -> bool) {
        let wait = async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(LIMIT, wait)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }

    /// CPU time (user + system, in clock ticks) used so far by the calling thread.
    fn thread_cpu_ticks() -> u64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("stat");
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .expect("comm")
            .1
            .split_whitespace()
            .collect();
        // Fields 14 and 15 of stat(5), counting from the state (field 3) at index 0.
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
    }

    /// A UDP server on loopback that answers every datagram with "echo:" + the datagram.
    async fn udp_round_trip() {
        let (port, server) = echo_server_on(LOCALHOST.into()).await;
        // The service's port 7000 maps to the server's port.
        let (dp, m, mut rx) = dataplane(
            vec![service(vec![PortRange::single(7000)], false, Some(port))],
            config(IcmpMode::Local),
        );
        for (i, data) in [&b"hello"[..], b"again"].into_iter().enumerate() {
            dp.handle_from_agent(1, &agent_udp(40000, 7000, data));
            let reply = next(&mut rx).await;
            let ip = check_ip(&reply);
            let sliced = SlicedPacket::from_ip(&reply).expect("parse");
            let Some(TransportSlice::Udp(udp)) = sliced.transport else {
                panic!("not UDP")
            };
            assert_eq!((udp.source_port(), udp.destination_port()), (7000, 40000));
            let mut want = b"echo:".to_vec();
            want.extend_from_slice(data);
            assert_eq!(udp.payload(), &want[..]);
            let h = udp.to_header();
            assert_eq!(
                h.checksum,
                UdpHeader::calc_checksum_ipv4(&h, &ip, udp.payload()).expect("sum")
            );
            assert_eq!(get(&m.udp_flows_opened), 1, "round {i} reuses the flow");
        }
        assert_eq!(get(&m.udp_flows_active), 1);
        assert_eq!(get(&m.packets_from_agents), 2);
        assert_eq!(get(&m.packets_to_agents), 2);
        // A second source port is a second flow.
        dp.handle_from_agent(1, &agent_udp(40001, 7000, b"x"));
        next(&mut rx).await;
        assert_eq!(get(&m.udp_flows_active), 2);
        dp.remove_agent(1);
        assert_eq!(get(&m.udp_flows_active), 0);
        assert_eq!(dp.flow_count(), 0);
        server.abort();
    }

    #[tokio::test]
    async fn udp_round_trip_current_thread() {
        tokio::time::timeout(LIMIT, udp_round_trip())
            .await
            .expect("in time");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn udp_round_trip_multi_thread() {
        tokio::time::timeout(LIMIT, udp_round_trip())
            .await
            .expect("in time");
    }

    #[tokio::test]
    async fn refused_port_yields_icmp_port_unreachable() {
        let run = async {
            // A port nobody listens on: bind, note it, close.
            let closed = std::net::UdpSocket::bind((LOCALHOST, 0)).expect("bind");
            let port = closed.local_addr().expect("addr").port();
            drop(closed);
            let (dp, m, mut rx) = dataplane(
                vec![service(vec![PortRange::single(53)], false, Some(port))],
                config(IcmpMode::Local),
            );
            let original = agent_udp(40000, 53, b"is anyone there?");
            dp.handle_from_agent(1, &original);
            let icmp = next(&mut rx).await;
            let ip = check_ip(&icmp);
            let msg = Icmpv4Slice::from_slice(&icmp[ip.header_len()..]).expect("icmp");
            assert_eq!((msg.type_u8(), msg.code_u8()), (3, 3));
            assert_eq!(msg.payload(), &original[..28], "quotes header + 8 bytes");
            let want = etherparse::Icmpv4Header::with_checksum(msg.icmp_type(), msg.payload());
            assert_eq!(msg.checksum(), want.checksum);
            assert_eq!(get(&m.icmp_unreachable_sent), 1);
            assert_eq!(get(&m.backend_errors), 0);
            // The flow stays; another datagram is refused again.
            dp.handle_from_agent(1, &agent_udp(40000, 53, b"still?"));
            let again = next(&mut rx).await;
            let ip = check_ip(&again);
            let msg = Icmpv4Slice::from_slice(&again[ip.header_len()..]).expect("icmp");
            assert_eq!((msg.type_u8(), msg.code_u8()), (3, 3));
            assert_eq!(get(&m.icmp_unreachable_sent), 2);
            assert_eq!(get(&m.udp_flows_opened), 1);
            // The flow's task waits quietly after the error (a regression test: a task that
            // keeps seeing error readiness spins and starves this current-thread runtime).
            let before = thread_cpu_ticks();
            tokio::time::sleep(Duration::from_millis(300)).await;
            let used = thread_cpu_ticks() - before;
            assert!(used < 10, "busy while idle: {used} ticks of CPU in 300 ms");
        };
        tokio::time::timeout(LIMIT, run).await.expect("in time");
    }

    #[tokio::test]
    async fn local_echo_reply() {
        let run = async {
            let (dp, m, mut rx) =
                dataplane(vec![service(vec![], true, None)], config(IcmpMode::Local));
            dp.handle_from_agent(1, &agent_echo(0x4242, 3, b"ping data"));
            let reply = next(&mut rx).await;
            let ip = check_ip(&reply);
            let msg = Icmpv4Slice::from_slice(&reply[ip.header_len()..]).expect("icmp");
            let Icmpv4Type::EchoReply(echo) = msg.icmp_type() else {
                panic!("not an echo reply")
            };
            assert_eq!((echo.id, echo.seq), (0x4242, 3));
            assert_eq!(msg.payload(), b"ping data");
            let want = etherparse::Icmpv4Header::with_checksum(msg.icmp_type(), msg.payload());
            assert_eq!(msg.checksum(), want.checksum);
            assert_eq!(get(&m.icmp_echo_local), 1);
            assert_eq!(get(&m.icmp_flows_opened), 0);
        };
        tokio::time::timeout(LIMIT, run).await.expect("in time");
    }

    /// Needs unprivileged ICMP sockets (net.ipv4.ping_group_range); skipped where they are not
    /// allowed. Run it with: `unshare -n sh -c 'ip link set lo up;
    /// sysctl -w net.ipv4.ping_group_range="0 2147483647"; cargo test -p ztna-connector backend_echo'`.
    #[tokio::test]
    async fn backend_echo_reply() {
        let run = async {
            let metrics = Arc::new(Metrics::default());
            let dp = match Dataplane::new(
                vec![service(vec![], true, None)],
                config(IcmpMode::Backend),
                metrics.clone(),
            ) {
                Ok(dp) => dp,
                Err(e) => {
                    eprintln!("skipping backend_echo_reply: {e:#}");
                    return;
                }
            };
            let (tx, mut rx) = mpsc::channel(8);
            dp.add_agent(1, "alice".into(), AGENT_IP, Arc::new(Collect(tx)));
            for seq in 1..=2 {
                dp.handle_from_agent(1, &agent_echo(0x4242, seq, b"ping data"));
                let reply = next(&mut rx).await;
                let ip = check_ip(&reply);
                let msg = Icmpv4Slice::from_slice(&reply[ip.header_len()..]).expect("icmp");
                let Icmpv4Type::EchoReply(echo) = msg.icmp_type() else {
                    panic!("not an echo reply")
                };
                assert_eq!((echo.id, echo.seq), (0x4242, seq));
                assert_eq!(msg.payload(), b"ping data");
                let want = etherparse::Icmpv4Header::with_checksum(msg.icmp_type(), msg.payload());
                assert_eq!(msg.checksum(), want.checksum);
            }
            assert_eq!(get(&metrics.icmp_echo_backend), 2);
            assert_eq!(get(&metrics.icmp_flows_opened), 1);
            assert_eq!(get(&metrics.icmp_flows_active), 1);
            dp.remove_agent(1);
            assert_eq!(get(&metrics.icmp_flows_active), 0);
        };
        tokio::time::timeout(LIMIT, run).await.expect("in time");
    }

    // IPv6.

    const SVC_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);

    fn agent_ip6() -> Ipv6Addr {
        ztna_proto::service::tunnel_ipv6(AGENT_IP)
    }

    /// `service(...)` with the IPv6 address [`SVC_IP6`] and backend `backend`.
    fn service6(
        udp: Vec<PortRange>,
        icmp: bool,
        backend: IpAddr,
        backend_port: Option<u16>,
    ) -> BackendService {
        let mut s = service(udp, icmp, backend_port);
        s.def.address6 = Some(SVC_IP6);
        s.backend = backend;
        s
    }

    fn agent_udp6(src: Ipv6Addr, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv6(src.octets(), SVC_IP6.octets(), 64).udp(sport, dport);
        let mut v = Vec::new();
        b.write(&mut v, data).expect("build");
        v
    }

    /// Checks addresses, hop limit and length of an IPv6 packet to the agent, and its
    /// transport checksum.
    fn check_ip6(packet: &[u8]) {
        let h = etherparse::Ipv6HeaderSlice::from_slice(packet).expect("ipv6");
        assert_eq!(h.source_addr(), SVC_IP6);
        assert_eq!(h.destination_addr(), agent_ip6());
        assert_eq!(h.hop_limit(), 64);
        assert_eq!(usize::from(h.payload_length()) + 40, packet.len());
        let body = &packet[40..];
        let sum = etherparse::checksum::Sum16BitWords::new()
            .add_16bytes(h.source())
            .add_16bytes(h.destination())
            .add_4bytes((body.len() as u32).to_be_bytes())
            .add_4bytes([0, 0, 0, h.next_header().0])
            .add_slice(body);
        assert_eq!(sum.ones_complement(), 0, "transport checksum");
    }

    /// A UDP server on `ip` that answers every datagram with "echo:" + the datagram.
    async fn echo_server_on(ip: IpAddr) -> (u16, tokio::task::JoinHandle<()>) {
        let sock = tokio::net::UdpSocket::bind((ip, 0)).await.expect("bind");
        let port = sock.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
                let mut reply = b"echo:".to_vec();
                reply.extend_from_slice(&buf[..n]);
                let _ = sock.send_to(&reply, peer).await;
            }
        });
        (port, task)
    }

    /// An agent's IPv6 datagram to a service whose backend is `backend` (either family) comes
    /// back as an IPv6 reply from the service's IPv6 address, with valid checksums.
    async fn udp6_round_trip(backend: IpAddr) {
        let (port, server) = echo_server_on(backend).await;
        let (dp, m, mut rx) = dataplane(
            vec![service6(
                vec![PortRange::single(7000)],
                false,
                backend,
                Some(port),
            )],
            config(IcmpMode::Local),
        );
        for data in [&b"hello"[..], b"again"] {
            dp.handle_from_agent(1, &agent_udp6(agent_ip6(), 40000, 7000, data));
            let reply = next(&mut rx).await;
            check_ip6(&reply);
            let sliced = SlicedPacket::from_ip(&reply).expect("parse");
            let Some(TransportSlice::Udp(udp)) = sliced.transport else {
                panic!("not UDP")
            };
            assert_eq!((udp.source_port(), udp.destination_port()), (7000, 40000));
            let mut want = b"echo:".to_vec();
            want.extend_from_slice(data);
            assert_eq!(udp.payload(), &want[..]);
        }
        assert_eq!(get(&m.udp_flows_opened), 1);
        // The same port over IPv4 is another flow, answered over IPv4.
        dp.handle_from_agent(1, &agent_udp(40000, 7000, b"v4"));
        let reply = next(&mut rx).await;
        check_ip(&reply);
        assert!(reply.ends_with(b"echo:v4"));
        assert_eq!(get(&m.udp_flows_opened), 2);
        server.abort();
    }

    #[tokio::test]
    async fn udp6_to_ipv6_backend() {
        tokio::time::timeout(LIMIT, udp6_round_trip(Ipv6Addr::LOCALHOST.into()))
            .await
            .expect("in time");
    }

    #[tokio::test]
    async fn udp6_to_ipv4_backend() {
        tokio::time::timeout(LIMIT, udp6_round_trip(LOCALHOST.into()))
            .await
            .expect("in time");
    }

    /// A datagram larger than the agent's TUN MTU arrives as IPv6 fragments, is reassembled
    /// and checked whole; the reply too large for the tunnel leaves as IPv6 fragments (in
    /// tunnel.rs; here the sink takes it whole).
    #[tokio::test]
    async fn fragmented_udp6_is_reassembled() {
        let run = async {
            let (port, server) = echo_server_on(Ipv6Addr::LOCALHOST.into()).await;
            let (dp, m, mut rx) = dataplane(
                vec![service6(
                    vec![PortRange::single(7000)],
                    false,
                    Ipv6Addr::LOCALHOST.into(),
                    Some(port),
                )],
                config(IcmpMode::Local),
            );
            let data: Vec<u8> = (0..1800).map(|i| (i % 251) as u8).collect();
            let whole = agent_udp6(agent_ip6(), 40000, 7000, &data);
            let frags = fragment::fragment_ipv6(&whole, 1280, 9).expect("fragments");
            assert_eq!(frags.len(), 2);
            for f in frags.iter().rev() {
                dp.handle_from_agent(1, f);
            }
            let reply = next(&mut rx).await;
            check_ip6(&reply);
            assert!(reply.ends_with(&data));
            assert_eq!(get(&m.fragments_reassembled), 1);
            // A spoofed datagram in fragments is reassembled, then dropped as spoofed.
            let other = ztna_proto::service::tunnel_ipv6(Ipv4Addr::new(100, 64, 0, 9));
            let spoofed = agent_udp6(other, 40000, 7000, &data);
            for f in fragment::fragment_ipv6(&spoofed, 1280, 10).expect("fragments") {
                dp.handle_from_agent(1, &f);
            }
            assert_eq!(get(&m.dropped_spoofed_source), 1);
            server.abort();
        };
        tokio::time::timeout(LIMIT, run).await.expect("in time");
    }

    #[tokio::test]
    async fn udp4_to_ipv6_backend() {
        let run = async {
            let (port, server) = echo_server_on(Ipv6Addr::LOCALHOST.into()).await;
            let (dp, _m, mut rx) = dataplane(
                vec![service6(
                    vec![PortRange::single(7000)],
                    false,
                    Ipv6Addr::LOCALHOST.into(),
                    Some(port),
                )],
                config(IcmpMode::Local),
            );
            dp.handle_from_agent(1, &agent_udp(40000, 7000, b"hi"));
            let reply = next(&mut rx).await;
            check_ip(&reply);
            assert!(reply.ends_with(b"echo:hi"));
            server.abort();
        };
        tokio::time::timeout(LIMIT, run).await.expect("in time");
    }

    #[tokio::test]
    async fn refused_port_yields_icmpv6_port_unreachable() {
        let run = async {
            let closed = std::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).expect("bind");
            let port = closed.local_addr().expect("addr").port();
            drop(closed);
            let (dp, m, mut rx) = dataplane(
                vec![service6(
                    vec![PortRange::single(53)],
                    false,
                    Ipv6Addr::LOCALHOST.into(),
                    Some(port),
                )],
                config(IcmpMode::Local),
            );
            let original = agent_udp6(agent_ip6(), 40000, 53, b"is anyone there?");
            dp.handle_from_agent(1, &original);
            let icmp = next(&mut rx).await;
            check_ip6(&icmp);
            assert_eq!(icmp[6], 58, "ICMPv6");
            assert_eq!((icmp[40], icmp[41]), (1, 4), "port unreachable");
            assert_eq!(&icmp[48..], &original[..48]);
            assert_eq!(get(&m.icmp_unreachable_sent), 1);
        };
        tokio::time::timeout(LIMIT, run).await.expect("in time");
    }

    #[tokio::test]
    async fn local_echo6_reply() {
        let run = async {
            let (dp, m, mut rx) = dataplane(
                vec![service6(vec![], true, LOCALHOST.into(), None)],
                config(IcmpMode::Local),
            );
            let b = PacketBuilder::ipv6(agent_ip6().octets(), SVC_IP6.octets(), 64)
                .icmpv6_echo_request(0x4242, 3);
            let mut p = Vec::new();
            b.write(&mut p, b"ping data").expect("build");
            dp.handle_from_agent(1, &p);
            let reply = next(&mut rx).await;
            check_ip6(&reply);
            assert_eq!(&reply[40..42], &[129, 0], "echo reply");
            assert_eq!(&reply[44..48], &[0x42, 0x42, 0, 3]);
            assert_eq!(&reply[48..], b"ping data");
            assert_eq!(get(&m.icmp_echo_local), 1);
        };
        tokio::time::timeout(LIMIT, run).await.expect("in time");
    }

    /// Needs unprivileged ICMP sockets, like `backend_echo_reply`; skipped where they are not
    /// allowed. A ping over IPv6 to a service whose backend is IPv6 goes through an ICMPv6
    /// socket, to one whose backend is IPv4 through an ICMP one, and is answered over IPv6;
    /// a ping over IPv4 to an IPv6 backend is answered over IPv4.
    #[tokio::test]
    async fn backend_echo6_reply() {
        let run = async {
            for backend in [IpAddr::from(Ipv6Addr::LOCALHOST), LOCALHOST.into()] {
                let metrics = Arc::new(Metrics::default());
                let dp = match Dataplane::new(
                    vec![service6(vec![], true, backend, None)],
                    config(IcmpMode::Backend),
                    metrics.clone(),
                ) {
                    Ok(dp) => dp,
                    Err(e) => {
                        eprintln!("skipping backend_echo6_reply: {e:#}");
                        return;
                    }
                };
                let (tx, mut rx) = mpsc::channel(8);
                dp.add_agent(1, "alice".into(), AGENT_IP, Arc::new(Collect(tx)));
                for seq in 1..=2 {
                    let b = PacketBuilder::ipv6(agent_ip6().octets(), SVC_IP6.octets(), 64)
                        .icmpv6_echo_request(0x4242, seq);
                    let mut p = Vec::new();
                    b.write(&mut p, b"ping data").expect("build");
                    dp.handle_from_agent(1, &p);
                    let reply = next(&mut rx).await;
                    check_ip6(&reply);
                    assert_eq!(&reply[40..42], &[129, 0], "echo reply");
                    assert_eq!(&reply[44..46], &[0x42, 0x42]);
                    assert_eq!(u16::from_be_bytes([reply[46], reply[47]]), seq);
                    assert_eq!(&reply[48..], b"ping data");
                }
                assert_eq!(get(&metrics.icmp_echo_backend), 2);
                assert_eq!(get(&metrics.icmp_flows_opened), 1);
                if backend.is_ipv6() {
                    // IPv4 ping, IPv6 backend: an ICMPv6 socket, an ICMP reply.
                    dp.handle_from_agent(1, &agent_echo(0x4343, 1, b"v4"));
                    let reply = next(&mut rx).await;
                    let ip = check_ip(&reply);
                    let msg = Icmpv4Slice::from_slice(&reply[ip.header_len()..]).expect("icmp");
                    assert!(matches!(msg.icmp_type(), Icmpv4Type::EchoReply(_)));
                    assert_eq!(msg.payload(), b"v4");
                }
            }
        };
        tokio::time::timeout(LIMIT, run).await.expect("in time");
    }

    #[tokio::test]
    async fn ipv6_drops_are_counted() {
        let (port, server) = echo_server_on(LOCALHOST.into()).await;
        let (dp, m, mut rx) = dataplane(
            vec![service6(
                vec![PortRange::single(53)],
                false,
                LOCALHOST.into(),
                Some(port),
            )],
            config(IcmpMode::Local),
        );
        // Spoofed sources: another agent's IPv6 tunnel address, the IPv4-mapped form.
        let other = ztna_proto::service::tunnel_ipv6(Ipv4Addr::new(100, 64, 0, 9));
        dp.handle_from_agent(1, &agent_udp6(other, 1000, 53, b""));
        dp.handle_from_agent(1, &agent_udp6(AGENT_IP.to_ipv6_mapped(), 1000, 53, b""));
        assert_eq!(get(&m.dropped_spoofed_source), 2);
        // Not a service address.
        let b = PacketBuilder::ipv6(
            agent_ip6().octets(),
            Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 2).octets(),
            64,
        )
        .udp(1000, 53);
        let mut p = Vec::new();
        b.write(&mut p, b"").expect("build");
        dp.handle_from_agent(1, &p);
        // A port the service does not serve (answered: administratively prohibited).
        dp.handle_from_agent(1, &agent_udp6(agent_ip6(), 1000, 54, b""));
        assert_eq!(get(&m.dropped_not_service), 2);
        let answer = next(&mut rx).await;
        check_ip6(&answer);
        assert_eq!((answer[40], answer[41]), (1, 1));
        // A fragment header, a hop-by-hop header, a destination options header.
        let good = agent_udp6(agent_ip6(), 1000, 53, b"data");
        let with = |kind: u8, fields: [u8; 6]| {
            let mut p = good[..40].to_vec();
            p[6] = kind;
            let len = u16::from_be_bytes([p[4], p[5]]) + 8;
            p[4..6].copy_from_slice(&len.to_be_bytes());
            p.extend_from_slice(&[17, 0]);
            p.extend_from_slice(&fields);
            p.extend_from_slice(&good[40..]);
            p
        };
        dp.handle_from_agent(1, &with(44, [0, 0, 0, 0, 0, 1])); // an atomic fragment
        assert_eq!(get(&m.dropped_ipv6_fragments), 1);
        // A fragment header behind a hop-by-hop header: counted as extension headers.
        let mut behind = with(44, [0, 1, 0, 0, 0, 1]);
        behind[6] = 0;
        dp.handle_from_agent(1, &behind);
        assert_eq!(get(&m.dropped_ipv6_extension_headers), 1);
        dp.handle_from_agent(1, &with(0, [1, 4, 0, 0, 0, 0]));
        dp.handle_from_agent(1, &with(60, [1, 4, 0, 0, 0, 0]));
        assert_eq!(get(&m.dropped_ipv6_extension_headers), 3);
        // Garbage with version 6.
        dp.handle_from_agent(1, b"\x60garbage");
        assert_eq!(get(&m.dropped_malformed), 1);
        assert_eq!(get(&m.udp_flows_opened), 0);
        // And the plain datagram goes through.
        dp.handle_from_agent(1, &good);
        let reply = next(&mut rx).await;
        check_ip6(&reply);
        assert_eq!(get(&m.udp_flows_opened), 1);
        server.abort();
    }

    #[tokio::test]
    async fn ipv6_addresses_map_to_their_ipv4_service() {
        let (dp, _m, _rx) = dataplane(
            vec![service6(
                vec![PortRange::single(53)],
                false,
                LOCALHOST.into(),
                None,
            )],
            config(IcmpMode::Local),
        );
        assert_eq!(dp.v4_equivalent(SVC_IP6), Some(SVC_IP));
        assert_eq!(
            dp.v4_equivalent(Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 2)),
            None
        );
    }

    /// A name service over IPv6: the agent maps a name at an IPv4 pool address; a datagram to
    /// the paired IPv6 pool address goes to what the name resolves to, and the reply comes
    /// from that IPv6 address. An unmapped IPv6 pool address is no service.
    #[tokio::test]
    async fn name_service_over_ipv6() {
        let run = async {
            let (port, server) = echo_server_on(LOCALHOST.into()).await;
            let metrics = Arc::new(Metrics::default());
            let dp = Dataplane::new(vec![], config(IcmpMode::Local), metrics.clone())
                .expect("data plane");
            let pool6 = Ipv6Addr::new(0xfd00, 0x101, 0, 0, 0, 0, 0, 0);
            let names = ServiceDef {
                name: "wiki".into(),
                address: Ipv4Addr::new(10, 101, 0, 0),
                address6: Some(pool6),
                udp: vec![PortRange {
                    first: 1024,
                    last: 65535,
                }],
                tcp: vec![],
                icmp: false,
                connector: String::new(),
                names: Some(ztna_proto::NamePool {
                    patterns: vec!["localhost".into()],
                    prefix_len: 24,
                }),
            };
            let resolver =
                crate::names::Resolver::new(vec![], Duration::from_secs(60), 16, metrics.clone())
                    .expect("resolver");
            assert!(
                resolver.resolve("localhost").await.is_some(),
                "localhost resolves"
            );
            assert!(dp.set_names(NameRoutes {
                services: vec![names.clone()].into(),
                resolver,
                max_per_agent: 8,
            }));
            let (tx, mut rx) = mpsc::channel(8);
            dp.add_agent(1, "alice".into(), AGENT_IP, Arc::new(Collect(tx)));
            let mapped4 = Ipv4Addr::new(10, 101, 0, 7);
            let mapped6 = names.to_v6(mapped4).expect("paired");
            assert_eq!(mapped6, Ipv6Addr::new(0xfd00, 0x101, 0, 0, 0, 0, 0, 7));
            let agent_names = dp.agent_names(1).expect("names");
            assert!(agent_names.insert(mapped4, "localhost".into()));
            let datagram = |dst: Ipv6Addr| {
                let b =
                    PacketBuilder::ipv6(agent_ip6().octets(), dst.octets(), 64).udp(40000, port);
                let mut v = Vec::new();
                b.write(&mut v, b"by name").expect("build");
                v
            };
            dp.handle_from_agent(1, &datagram(mapped6));
            let reply = next(&mut rx).await;
            let h = etherparse::Ipv6HeaderSlice::from_slice(&reply).expect("ipv6");
            assert_eq!(h.source_addr(), mapped6);
            assert_eq!(h.destination_addr(), agent_ip6());
            assert!(reply.ends_with(b"echo:by name"));
            // Another address of the pool, not mapped: not a service.
            let unmapped = Ipv6Addr::new(0xfd00, 0x101, 0, 0, 0, 0, 0, 8);
            dp.handle_from_agent(1, &datagram(unmapped));
            assert_eq!(get(&metrics.dropped_not_service), 1);
            assert_eq!(dp.v4_equivalent(mapped6), Some(mapped4));
            server.abort();
        };
        tokio::time::timeout(LIMIT, run).await.expect("in time");
    }

    #[tokio::test]
    async fn auto_mode_starts_either_way() {
        let metrics = Arc::new(Metrics::default());
        let dp = Dataplane::new(
            vec![service(vec![], true, None)],
            config(IcmpMode::Auto),
            metrics,
        )
        .expect("auto never fails over ICMP");
        assert_eq!(dp.icmp_backend, icmp::probe().is_ok());
    }

    #[tokio::test]
    async fn flow_limit_refuses_new_flows() {
        let run = async {
            let (port, server) = echo_server_on(LOCALHOST.into()).await;
            let mut cfg = config(IcmpMode::Local);
            cfg.max_flows_per_agent = 2;
            let (dp, m, mut rx) = dataplane(
                vec![service(vec![PortRange::single(7000)], false, Some(port))],
                cfg,
            );
            for sport in [1000, 1001, 1002] {
                dp.handle_from_agent(1, &agent_udp(sport, 7000, b"x"));
            }
            next(&mut rx).await;
            next(&mut rx).await;
            assert_eq!(get(&m.dropped_flow_limit), 1);
            assert_eq!(get(&m.udp_flows_active), 2);
            // Existing flows still work.
            dp.handle_from_agent(1, &agent_udp(1000, 7000, b"y"));
            let reply = next(&mut rx).await;
            assert!(reply.ends_with(b"echo:y"));
            server.abort();
        };
        tokio::time::timeout(LIMIT, run).await.expect("in time");
    }

    #[tokio::test]
    async fn idle_flows_expire() {
        let run = async {
            let (port, server) = echo_server_on(LOCALHOST.into()).await;
            let mut cfg = config(IcmpMode::Local);
            cfg.udp_idle_timeout = Duration::from_millis(150);
            let (dp, m, mut rx) = dataplane(
                vec![service(vec![PortRange::single(7000)], false, Some(port))],
                cfg,
            );
            dp.handle_from_agent(1, &agent_udp(1000, 7000, b"x"));
            next(&mut rx).await;
            assert_eq!(get(&m.udp_flows_active), 1);
            eventually("the flow to expire", || get(&m.udp_flows_expired) == 1).await;
            assert_eq!(get(&m.udp_flows_active), 0);
            assert_eq!(dp.flow_count(), 0);
            dp.handle_from_agent(1, &agent_udp(1000, 7000, b"y"));
            next(&mut rx).await;
            assert_eq!(get(&m.udp_flows_opened), 2);
            server.abort();
        };
        tokio::time::timeout(LIMIT, run).await.expect("in time");
    }

    #[tokio::test]
    async fn drops_are_counted() {
        let (dp, m, mut rx) = dataplane(
            vec![service(vec![PortRange::single(53)], false, None)],
            config(IcmpMode::Local),
        );
        dp.handle_from_agent(1, b"\x45garbage");
        dp.handle_from_agent(1, &[]);
        let mut spoofed = agent_udp(1, 53, b"");
        spoofed[15] ^= 1; // source address
        let mut h = Ipv4HeaderSlice::from_slice(&spoofed)
            .expect("ip")
            .to_header();
        h.header_checksum = h.calc_header_checksum();
        spoofed[..20].copy_from_slice(&h.to_bytes());
        dp.handle_from_agent(1, &spoofed);
        dp.handle_from_agent(1, &agent_udp(1, 54, b""));
        dp.handle_from_agent(1, &agent_echo(1, 1, b"")); // icmp: false
        let tcp = {
            let b =
                PacketBuilder::ipv4(AGENT_IP.octets(), SVC_IP.octets(), 64).tcp(1000, 444, 1, 100);
            let mut v = Vec::new();
            b.write(&mut v, &[]).expect("build");
            v
        };
        dp.handle_from_agent(1, &tcp); // TCP to a port the service does not list
        dp.handle_from_agent(2, &agent_udp(1, 53, b"")); // unknown agent
        assert_eq!(get(&m.dropped_malformed), 2);
        assert_eq!(get(&m.dropped_spoofed_source), 1);
        assert_eq!(get(&m.dropped_not_service), 3);
        assert_eq!(get(&m.dropped_unsupported), 0);
        assert_eq!(get(&m.dropped_unknown_agent), 1);
        assert_eq!(get(&m.packets_from_agents), 7);
        assert_eq!(get(&m.udp_flows_opened), 0);
        // The unserved UDP port, ICMP and TCP port were answered; the rest was not.
        let mut answers = Vec::new();
        while let Ok(p) = rx.try_recv() {
            answers.push(answer_kind(&p));
        }
        assert_eq!(answers, vec!["icmp 3/13", "icmp 3/13", "tcp rst"]);
        assert_eq!(get(&m.refused_answered), 3);
    }

    /// "icmp T/C" or "tcp rst" for a packet the connector sent to the agent.
    fn answer_kind(p: &[u8]) -> String {
        let ip = check_ip(p);
        let body = &p[ip.header_len()..];
        match ip.protocol {
            etherparse::ip_number::ICMP => {
                let msg = Icmpv4Slice::from_slice(body).expect("icmp");
                let want = etherparse::Icmpv4Header::with_checksum(msg.icmp_type(), msg.payload());
                assert_eq!(msg.checksum(), want.checksum);
                format!("icmp {}/{}", msg.type_u8(), msg.code_u8())
            }
            etherparse::ip_number::TCP => {
                let tcp = etherparse::TcpHeaderSlice::from_slice(body).expect("tcp");
                assert!(tcp.rst());
                "tcp rst".into()
            }
            other => format!("protocol {}", other.0),
        }
    }

    #[tokio::test]
    async fn unserved_ports_are_answered_at_once_within_a_budget() {
        let (dp, m, mut rx) = dataplane(
            vec![service(vec![PortRange::single(53)], false, None)],
            config(IcmpMode::Local),
        );
        // `curl VIP:22`: a SYN to a TCP port the service does not serve gets RST+ACK.
        let syn = agent_syn(40000, 22, 777, 100);
        dp.handle_from_agent(1, &syn);
        let rst = rx.try_recv().expect("an answer at once");
        let ip = check_ip(&rst);
        let tcp = etherparse::TcpHeaderSlice::from_slice(&rst[ip.header_len()..]).expect("tcp");
        assert!(tcp.rst() && tcp.ack());
        assert_eq!(tcp.acknowledgment_number(), 778, "ACK = SYN's SEQ + 1");
        assert_eq!((tcp.source_port(), tcp.destination_port()), (22, 40000));
        // A UDP datagram to an unserved port: ICMP 3/13 quoting its header.
        let udp = agent_udp(40000, 161, b"snmp");
        dp.handle_from_agent(1, &udp);
        let icmp = rx.try_recv().expect("an answer at once");
        assert_eq!(answer_kind(&icmp), "icmp 3/13");
        assert_eq!(&icmp[20 + 8..], &udp[..28], "quotes header + 8 bytes");
        // A flood of them: at most a burst and the rate get answers; every one is counted.
        for i in 0..1000u16 {
            dp.handle_from_agent(1, &agent_udp(1000 + i, 161, b"x"));
        }
        let answered = get(&m.refused_answered);
        assert!(
            answered <= u64::from(ANSWERS_PER_SECOND) + 5,
            "{answered} answers in a burst"
        );
        assert_eq!(answered + get(&m.refused_answers_limited), 1002);
        assert_eq!(get(&m.dropped_not_service), 1002);
    }

    #[tokio::test]
    async fn flow_caps_count_per_identity_and_globally() {
        let run = async {
            let (port, server) = echo_server_on(LOCALHOST.into()).await;
            let mut cfg = config(IcmpMode::Local);
            cfg.max_flows_per_agent = 2;
            cfg.max_flows_total = 3;
            let (dp, m, mut rx) = dataplane(
                vec![service(vec![PortRange::single(7000)], false, Some(port))],
                cfg,
            );
            // A second tunnel of the same identity shares the cap.
            let (tx2, _rx2) = mpsc::channel(8);
            dp.add_agent(
                2,
                "alice@example.org".into(),
                AGENT_IP,
                Arc::new(Collect(tx2)),
            );
            let (tx3, _rx3) = mpsc::channel(8);
            let bob = Ipv4Addr::new(100, 64, 0, 9);
            dp.add_agent(3, "bob@example.org".into(), bob, Arc::new(Collect(tx3)));
            dp.handle_from_agent(1, &agent_udp(1000, 7000, b"x"));
            next(&mut rx).await;
            dp.handle_from_agent(2, &agent_udp(1001, 7000, b"x"));
            dp.handle_from_agent(2, &agent_udp(1002, 7000, b"x"));
            assert_eq!(get(&m.udp_flows_active), 2);
            assert_eq!(get(&m.dropped_flow_limit), 1, "alice's identity is full");
            let from_bob = |sport: u16| {
                let b = PacketBuilder::ipv4(bob.octets(), SVC_IP.octets(), 64).udp(sport, 7000);
                let mut v = Vec::new();
                b.write(&mut v, b"y").expect("build");
                v
            };
            dp.handle_from_agent(3, &from_bob(2000));
            dp.handle_from_agent(3, &from_bob(2001));
            assert_eq!(get(&m.udp_flows_active), 3);
            assert_eq!(get(&m.dropped_global_limit), 1, "the connector is full");
            // Removing a tunnel gives its slots back.
            dp.remove_agent(2);
            dp.handle_from_agent(3, &from_bob(2001));
            assert_eq!(get(&m.udp_flows_active), 3);
            assert_eq!(get(&m.dropped_global_limit), 1);
            server.abort();
        };
        tokio::time::timeout(LIMIT, run).await.expect("in time");
    }

    /// A tunnel task that still holds its agent after the agent was removed (a packet on its
    /// way during the teardown) opens nothing with it: no flow, no TCP stack.
    #[tokio::test]
    async fn a_removed_agent_opens_nothing() {
        let run = async {
            let (port, server) = echo_server_on(LOCALHOST.into()).await;
            let (dp, m, _rx) = dataplane(
                vec![service(vec![PortRange::single(7000)], false, Some(port))],
                config(IcmpMode::Local),
            );
            let agent = dp.agent(1).expect("agent 1");
            dp.remove_agent(1);
            dp.handle_packet(&agent, &agent_udp(1000, 7000, b"x"));
            dp.handle_packet(&agent, &agent_syn(40000, 443, 1, 64240));
            assert_eq!(get(&m.dropped_unknown_agent), 2);
            assert_eq!(get(&m.udp_flows_opened), 0);
            assert_eq!(lock(&agent.flows).len(), 0);
            assert!(
                lock(&agent.tcp).is_none(),
                "a TCP stack for a removed agent"
            );
            server.abort();
        };
        tokio::time::timeout(LIMIT, run).await.expect("in time");
    }

    #[tokio::test]
    async fn dropping_the_dataplane_closes_flows() {
        let run = async {
            let (port, server) = echo_server_on(LOCALHOST.into()).await;
            let (dp, m, mut rx) = dataplane(
                vec![service(vec![PortRange::single(7000)], false, Some(port))],
                config(IcmpMode::Local),
            );
            dp.handle_from_agent(1, &agent_udp(1000, 7000, b"x"));
            next(&mut rx).await;
            assert_eq!(get(&m.udp_flows_active), 1);
            drop(dp);
            assert_eq!(get(&m.udp_flows_active), 0);
            // The flow's task ends, dropping the agent's sink: the channel closes.
            assert!(tokio::time::timeout(LIMIT, rx.recv())
                .await
                .expect("in time")
                .is_none());
            server.abort();
        };
        tokio::time::timeout(LIMIT, run).await.expect("in time");
    }

    #[tokio::test]
    async fn re_adding_an_agent_closes_its_old_flows() {
        let run = async {
            let (port, server) = echo_server_on(LOCALHOST.into()).await;
            let (dp, m, mut rx) = dataplane(
                vec![service(vec![PortRange::single(7000)], false, Some(port))],
                config(IcmpMode::Local),
            );
            dp.handle_from_agent(1, &agent_udp(1000, 7000, b"x"));
            next(&mut rx).await;
            let (tx2, mut rx2) = mpsc::channel(8);
            dp.add_agent(1, "alice".into(), AGENT_IP, Arc::new(Collect(tx2)));
            assert_eq!(get(&m.udp_flows_active), 0);
            dp.handle_from_agent(1, &agent_udp(1000, 7000, b"y"));
            assert!(next(&mut rx2).await.ends_with(b"echo:y"));
            server.abort();
        };
        tokio::time::timeout(LIMIT, run).await.expect("in time");
    }

    #[test]
    fn new_needs_a_runtime_and_valid_config() {
        let metrics = Arc::new(Metrics::default());
        let svc = || vec![service(vec![PortRange::single(53)], false, None)];
        assert!(Dataplane::new(svc(), config(IcmpMode::Local), metrics.clone()).is_err());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _entered = rt.enter();
        let mut zero = config(IcmpMode::Local);
        zero.max_flows_per_agent = 0;
        assert!(Dataplane::new(svc(), zero, metrics.clone()).is_err());
        let mut zero = config(IcmpMode::Local);
        zero.udp_idle_timeout = Duration::ZERO;
        assert!(Dataplane::new(svc(), zero, metrics.clone()).is_err());
        let twice = [svc(), svc()].concat();
        assert!(Dataplane::new(twice, config(IcmpMode::Local), metrics.clone()).is_err());
        let mut zero = config(IcmpMode::Local);
        zero.tcp.max_per_agent = 0;
        assert!(Dataplane::new(svc(), zero, metrics.clone()).is_err());
        let mut small = config(IcmpMode::Local);
        small.tcp.buffer_bytes = 100;
        assert!(Dataplane::new(svc(), small, metrics.clone()).is_err());
        let port0 = vec![service(vec![PortRange::single(53)], false, Some(0))];
        assert!(Dataplane::new(port0, config(IcmpMode::Local), metrics.clone()).is_err());
        assert!(Dataplane::new(svc(), config(IcmpMode::Local), metrics).is_ok());
    }

    #[test]
    fn handle_from_agent_outside_the_runtime() {
        // main.rs may call from a thread that is not a runtime thread: flows still open.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let (port, server) = rt.block_on(echo_server_on(LOCALHOST.into()));
        let (dp, m, mut rx) = {
            let _entered = rt.enter();
            dataplane(
                vec![service(vec![PortRange::single(7000)], false, Some(port))],
                config(IcmpMode::Local),
            )
        };
        let dp2 = dp.clone();
        std::thread::spawn(move || dp2.handle_from_agent(1, &agent_udp(1000, 7000, b"x")))
            .join()
            .expect("no panic");
        let reply = rt.block_on(next(&mut rx));
        assert!(reply.ends_with(b"echo:x"));
        assert_eq!(get(&m.udp_flows_opened), 1);
        server.abort();
    }

    #[test]
    fn log_limiter_allows_a_burst_per_second() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new();
        for _ in 0..LogLimiter::PER_SECOND {
            assert_eq!(l.allow(t0), Some(0));
        }
        assert_eq!(l.allow(t0 + Duration::from_millis(999)), None);
        assert_eq!(l.allow(t0 + Duration::from_millis(999)), None);
        assert_eq!(l.allow(t0 + Duration::from_secs(1)), Some(2));
        assert_eq!(l.allow(t0 + Duration::from_secs(1)), Some(0));
    }
}
