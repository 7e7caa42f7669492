//! The UDP fast path (XDP): the loader of the XDP program in `connector-ebpf/xdp`, the flow map
//! it reads, one raw socket for datagrams to backends, and the AF_XDP sockets replies arrive on.
//!
//! With the fast path, a UDP flow has no socket of its own: it gets a local port from the
//! configured range ([`ports`]) and entries in the kernel's flow map. Datagrams to the backend
//! leave through one `IPPROTO_RAW` socket from the interface's address and that port. The XDP
//! program on the interface rewrites each reply into the tunnel-side packet (the same as the
//! socket path builds; `rewrite.rs` is its userspace twin) and redirects it to the AF_XDP socket
//! of its RX queue ([`afxdp`]), whose thread hands it to the agent. UDP to the range that is
//! no flow's is dropped in the kernel and counted.
//!
//! [`start`] picks the attach mode: `auto` tries native (driver) XDP, then generic (SKB), and
//! falls back to sockets with a warning; `native`/`generic` fail startup instead.

mod afxdp;
pub(crate) mod ports;
#[cfg(test)]
pub(crate) mod rewrite;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use anyhow::{bail, Context as _};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, XskMap};
use aya::Ebpf;
use etherparse::checksum::Sum16BitWords;
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, info, warn};
use ztna_connector_ebpf_common as common;
pub(crate) use ztna_xdp_loader::XdpMode;
use ztna_xdp_loader::{route_interface, take, Attached};

use super::flows::{Activity, FlowId, FlowKey as TableKey};
use super::packet::reply_key;
use super::{lock, Agent, Dataplane};
use crate::metrics::Metrics;
use ports::PortPool;
use ztna_core::arena::PacketArena;

/// The XDP program, built from source by `build.rs`.
#[cfg(ztna_xdp_object)]
static OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/ztna-xdp.o"
)));
/// Built without the XDP program (no `bpf-linker` or `rust-src` at build time).
#[cfg(not(ztna_xdp_object))]
static OBJECT: Option<&[u8]> = None;

/// Settings of the fast path.
#[derive(Clone, Debug)]
pub(crate) struct XdpSettings {
    /// Mode.
    pub(crate) mode: XdpMode,
    /// Backend-facing interface; `None`: the interface of the route to the first backend.
    pub(crate) interface: Option<String>,
    /// Local UDP ports of flows (inclusive).
    pub(crate) ports: (u16, u16),
}

/// Where a rewritten reply goes: (agent tunnel address, agent port, service address, service
/// port), exactly the reply's destination and source.
type ReplyKey = (Ipv4Addr, u16, Ipv4Addr, u16);

/// The data-plane flow a reply belongs to.
struct Target {
    agent: Arc<Agent>,
    activity: Activity,
    key: TableKey,
    id: FlowId,
    backend: SocketAddrV4,
}

/// Userspace flow state, under one lock.
struct State {
    ports: PortPool,
    flows: BpfHashMap<MapData, common::FlowKey, common::FlowValue>,
    stats: PerCpuHashMap<MapData, common::FlowKey, common::FlowStats>,
    replies: HashMap<ReplyKey, Target>,
    /// Local port → the flow's reply key, for ICMP errors quoting a datagram of the flow.
    by_port: HashMap<u16, ReplyKey>,
}

/// The fast path: program, maps, raw socket and AF_XDP receivers. See the module docs.
pub(crate) struct FastPath {
    attached: Attached,
    interface: String,
    local: Ipv4Addr,
    raw: Socket,
    state: Mutex<State>,
    counters: PerCpuArray<MapData, u64>,
    /// The program and its link; `None` once detached.
    program: Mutex<Option<(Ebpf, aya::programs::xdp::XdpLinkId)>>,
    xsks: Mutex<XskMap<MapData>>,
    receivers: Mutex<Option<afxdp::Receivers>>,
    /// The thread reading ICMP errors about flows, and its stop flag.
    icmp: Mutex<Option<std::thread::JoinHandle<()>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    metrics: Arc<Metrics>,
}

/// A flow's lease on the fast path: its port and map entries, released on drop.
pub(crate) struct XdpFlow {
    fast: Arc<FastPath>,
    map_key: common::FlowKey,
    reply: ReplyKey,
    /// Local port of the flow.
    pub(crate) port: u16,
    /// The backend.
    pub(crate) backend: SocketAddrV4,
}

impl XdpFlow {
    /// Sends one datagram to the backend through the fast path's raw socket, without waiting.
    pub(crate) fn send(&self, payload: &[u8]) -> std::io::Result<()> {
        self.fast.send(self, payload)
    }
}

impl Drop for XdpFlow {
    fn drop(&mut self) {
        let stats = self.fast.flow_stats(self);
        debug!(
            local_port = self.port,
            packets = stats.packets,
            bytes = stats.bytes,
            "XDP flow closed"
        );
        let mut st = lock(&self.fast.state);
        let _ = st.flows.remove(&self.map_key);
        let _ = st.stats.remove(&self.map_key);
        st.replies.remove(&self.reply);
        st.by_port.remove(&self.port);
        st.ports.free(self.port);
    }
}

/// Starts the fast path as `settings` say: `Ok(None)` means sockets (mode `off`, or `auto`
/// when XDP is unavailable, with a warning saying why).
pub(crate) fn start(
    settings: &XdpSettings,
    first_backend: Option<Ipv4Addr>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Option<Arc<FastPath>>> {
    if settings.mode == XdpMode::Off {
        info!("UDP data plane: per-flow sockets (xdp = \"off\")");
        return Ok(None);
    }
    let modes = settings.mode.attempts();
    match try_start(settings, first_backend, modes, metrics) {
        Ok(fp) => {
            info!(
                mode = fp.attached.name(),
                interface = %fp.interface,
                local = %fp.local,
                ports = %format!("{}-{}", settings.ports.0, settings.ports.1),
                "UDP data plane: XDP fast path"
            );
            Ok(Some(fp))
        }
        Err(e) if settings.mode == XdpMode::Auto => {
            warn!(
                "UDP data plane: per-flow sockets, because the XDP fast path is unavailable: {e:#}"
            );
            Ok(None)
        }
        Err(e) => Err(e.context(format!(
            "xdp = \"{}\" is configured but the XDP fast path could not start (set xdp = \"auto\" to fall back to sockets)",
            settings.mode.name()
        ))),
    }
}

fn try_start(
    settings: &XdpSettings,
    first_backend: Option<Ipv4Addr>,
    modes: &[Attached],
    metrics: Arc<Metrics>,
) -> anyhow::Result<Arc<FastPath>> {
    let object = OBJECT.context(
        "this connector was built without its XDP program (bpf-linker or rust-src were missing at build time)",
    )?;
    let (first, last) = settings.ports;
    if first == 0 || first > last {
        bail!("xdp_port_range {first}-{last} is empty or starts at 0");
    }
    let backend = first_backend.context("no backend to route towards")?;
    let interface = match &settings.interface {
        Some(i) => i.clone(),
        None => route_interface(backend)?
            .with_context(|| format!("no route to the backend {backend}; set xdp_interface"))?,
    };
    let local = local_addr_towards(backend)?;
    warn_if_ephemeral(first, last);

    let mut ebpf = load(object)?;
    let mut config: Array<MapData, common::Config> = take(&mut ebpf, common::MAP_CONFIG)?;
    config
        .set(
            0,
            common::Config {
                first_port: first,
                last_port: last,
            },
            0,
        )
        .context("writing the program's configuration")?;
    let flows = take(&mut ebpf, common::MAP_FLOWS)?;
    let stats = take(&mut ebpf, common::MAP_FLOW_STATS)?;
    let counters = take(&mut ebpf, common::MAP_COUNTERS)?;
    let xsks: XskMap<MapData> = take(&mut ebpf, common::MAP_XSKS)?;

    let (mode, link) =
        ztna_xdp_loader::attach_first(&mut ebpf, common::PROGRAM, &interface, modes)?;
    let raw = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )
    .context("opening the raw socket for datagrams to backends")?;
    raw.set_nonblocking(true)?;
    let fp = Arc::new(FastPath {
        attached: mode,
        interface,
        local,
        raw,
        state: Mutex::new(State {
            ports: PortPool::new(first, last),
            flows,
            stats,
            replies: HashMap::new(),
            by_port: HashMap::new(),
        }),
        counters,
        program: Mutex::new(Some((ebpf, link))),
        xsks: Mutex::new(xsks),
        receivers: Mutex::new(None),
        icmp: Mutex::new(None),
        stop: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        metrics: metrics.clone(),
    });
    metrics.xdp_mode.store(mode.gauge(), Ordering::Relaxed);
    Ok(fp)
}

/// Loads the object and its program (the verifier runs here).
fn load(object: &[u8]) -> anyhow::Result<Ebpf> {
    ztna_xdp_loader::load(object, common::PROGRAM)
}

impl FastPath {
    /// Opens the AF_XDP sockets and starts their threads; replies go to `dataplane`.
    pub(crate) fn start_receivers(
        self: &Arc<Self>,
        dataplane: Weak<Dataplane>,
    ) -> anyhow::Result<()> {
        let dataplane_for_icmp = dataplane.clone();
        let queues = afxdp::rx_queues(&self.interface);
        let me = Arc::downgrade(self);
        let receivers = afxdp::Receivers::start(
            &self.interface,
            queues,
            |q, fd| {
                lock(&self.xsks)
                    .set(q, fd, 0)
                    .with_context(|| format!("registering the AF_XDP socket of queue {q}"))
            },
            |_| ReplyPump {
                metrics: self.metrics.clone(),
                fast: me.clone(),
                dataplane: dataplane.clone(),
                arena: PacketArena::with_chunk(PUMP_ARENA),
                batch: None,
            },
        )?;
        info!(queues, interface = %self.interface, "AF_XDP sockets ready");
        *lock(&self.receivers) = Some(receivers);
        self.start_icmp(dataplane_for_icmp)?;
        Ok(())
    }

    /// Starts the thread that turns a backend's ICMP port unreachable about a flow's datagram
    /// into one for the agent, as the socket path does: XDP passes ICMP to the kernel, which
    /// has no socket for the flow's port, so a raw ICMP socket reads a copy.
    fn start_icmp(self: &Arc<Self>, dataplane: Weak<Dataplane>) -> anyhow::Result<()> {
        let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
            .context("opening the raw ICMP socket for port unreachable messages")?;
        socket.set_read_timeout(Some(std::time::Duration::from_millis(100)))?;
        let me = Arc::downgrade(self);
        let stop = self.stop.clone();
        let thread = std::thread::Builder::new()
            .name("xdp-icmp".into())
            .spawn(move || {
                let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(n) = socket.recv(&mut buf) else {
                        continue;
                    };
                    // SAFETY: recv initialised the first n bytes.
                    let bytes: &[u8] =
                        unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
                    if let (Some(fp), Some(dp)) = (me.upgrade(), dataplane.upgrade()) {
                        fp.icmp_error(&dp, bytes);
                    }
                }
            })
            .context("spawning the ICMP thread")?;
        *lock(&self.icmp) = Some(thread);
        Ok(())
    }

    /// Handles one ICMP message (with its IPv4 header) read by the ICMP thread.
    fn icmp_error(&self, dp: &Dataplane, packet: &[u8]) {
        let Some((local_port, backend)) = port_unreachable_about(packet, self.local) else {
            return;
        };
        let target = {
            let st = lock(&self.state);
            st.by_port
                .get(&local_port)
                .and_then(|k| st.replies.get(k).map(|t| (k.2, t)))
                .filter(|(_, t)| t.backend == backend)
                .map(|(service, t)| (service, t.agent.clone(), t.key, t.id))
        };
        if let Some((service, agent, key, id)) = target {
            if let Some(quote) = dp.flow_quote(&key, id) {
                dp.send_port_unreachable(&agent, service.into(), quote.as_slice());
            }
        }
    }

    /// Which attachment the program got.
    pub(crate) fn attached(&self) -> Attached {
        self.attached
    }

    /// Opens the fast-path side of a UDP flow: a local port and the map entries that make the
    /// kernel rewrite `backend`'s replies into packets from `service` to `agent_addr`.
    /// `addrs`: (backend, service, agent address). Replies record the flow's activity in
    /// `activity`.
    pub(crate) fn open_flow(
        self: &Arc<Self>,
        agent: &Arc<Agent>,
        activity: &Activity,
        key: TableKey,
        id: FlowId,
        (backend, service, agent_addr): (SocketAddrV4, SocketAddrV4, SocketAddrV4),
    ) -> std::io::Result<XdpFlow> {
        let mut st = lock(&self.state);
        let port = st.ports.alloc().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "the XDP flow port range is exhausted",
            )
        })?;
        let map_key = common::FlowKey {
            backend_addr: backend.ip().octets(),
            backend_port: backend.port().to_be_bytes(),
            local_port: port.to_be_bytes(),
        };
        let value = common::FlowValue {
            service_addr: service.ip().octets(),
            agent_addr: agent_addr.ip().octets(),
            service_port: service.port().to_be_bytes(),
            agent_port: agent_addr.port().to_be_bytes(),
        };
        let zero = aya::maps::PerCpuValues::try_from(vec![
            common::FlowStats::default();
            aya::util::nr_cpus()
                .map_err(|(_, e)| e)?
        ])
        .map_err(std::io::Error::other)?;
        let inserted = st
            .stats
            .insert(map_key, zero, 0)
            .and_then(|()| st.flows.insert(map_key, value, 0));
        if let Err(e) = inserted {
            let _ = st.stats.remove(&map_key);
            st.ports.free(port);
            return Err(std::io::Error::other(format!("XDP flow map: {e}")));
        }
        let reply = (
            *agent_addr.ip(),
            agent_addr.port(),
            *service.ip(),
            service.port(),
        );
        st.replies.insert(
            reply,
            Target {
                agent: agent.clone(),
                activity: activity.clone(),
                key,
                id,
                backend,
            },
        );
        st.by_port.insert(port, reply);
        Ok(XdpFlow {
            fast: self.clone(),
            map_key,
            reply,
            port,
            backend,
        })
    }

    /// Sends one datagram to the flow's backend through the raw socket, without waiting.
    pub(crate) fn send(&self, flow: &XdpFlow, payload: &[u8]) -> std::io::Result<()> {
        let builder = etherparse::PacketBuilder::ipv4(
            self.local.octets(),
            flow.backend.ip().octets(),
            super::packet::TTL,
        )
        .udp(flow.port, flow.backend.port());
        let mut packet = Vec::with_capacity(builder.size(payload.len()));
        builder
            .write(&mut packet, payload)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let to = SocketAddrV4::new(*flow.backend.ip(), 0);
        self.raw.send_to(&packet, &to.into())?;
        Ok(())
    }

    /// The kernel's global counters, summed over CPUs, by `COUNTER_*` index.
    pub(crate) fn counters(&self) -> [u64; common::COUNTERS as usize] {
        let mut out = [0u64; common::COUNTERS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(v) = self.counters.get(&(i as u32), 0) {
                *slot = v.iter().sum();
            }
        }
        out
    }

    /// A flow's replies (packets and bytes) the kernel handled, summed over CPUs.
    fn flow_stats(&self, flow: &XdpFlow) -> common::FlowStats {
        let st = lock(&self.state);
        st.stats.get(&flow.map_key, 0).map_or_else(
            |_| common::FlowStats::default(),
            |v| common::FlowStats {
                packets: v.iter().map(|s| s.packets).sum(),
                bytes: v.iter().map(|s| s.bytes).sum(),
            },
        )
    }

    /// Copies the kernel's counters into the metrics.
    pub(crate) fn sync_metrics(&self) {
        let c = self.counters();
        let m = &self.metrics;
        let dropped = c[common::COUNTER_DROPPED_UNSOLICITED as usize]
            + c[common::COUNTER_DROPPED_NO_SOCKET as usize]
            + c[common::COUNTER_DROPPED_MALFORMED as usize];
        m.xdp_handled
            .store(c[common::COUNTER_HANDLED as usize], Ordering::Relaxed);
        m.xdp_passed
            .store(c[common::COUNTER_PASSED as usize], Ordering::Relaxed);
        m.xdp_dropped.store(dropped, Ordering::Relaxed);
        m.xdp_dropped_unsolicited.store(
            c[common::COUNTER_DROPPED_UNSOLICITED as usize],
            Ordering::Relaxed,
        );
        m.xdp_dropped_no_socket.store(
            c[common::COUNTER_DROPPED_NO_SOCKET as usize],
            Ordering::Relaxed,
        );
        m.xdp_dropped_malformed.store(
            c[common::COUNTER_DROPPED_MALFORMED as usize],
            Ordering::Relaxed,
        );
        m.xdp_flow_ports_in_use
            .store(lock(&self.state).ports.in_use() as u64, Ordering::Relaxed);
    }

    /// Stops the AF_XDP threads and detaches the program from the interface. Idempotent; also
    /// done on drop.
    pub(crate) fn shutdown(&self) {
        if let Some(mut r) = lock(&self.receivers).take() {
            r.stop();
        }
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = lock(&self.icmp).take() {
            let _ = t.join();
        }
        if let Some((mut ebpf, link)) = lock(&self.program).take() {
            self.sync_metrics();
            let detached = ztna_xdp_loader::xdp_program(&mut ebpf, common::PROGRAM)
                .and_then(|p| p.detach(link).map_err(anyhow::Error::from));
            match detached {
                Ok(()) => info!(interface = %self.interface, "XDP program detached"),
                Err(e) => warn!(interface = %self.interface, "detaching the XDP program: {e:#}"),
            }
        }
    }
}

impl Drop for FastPath {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Bytes of each buffer a receive task cuts the replies it hands on from (about 600 of 100
/// bytes, or 50 full-size).
const PUMP_ARENA: usize = 64 * 1024;

/// A receive task's handler: turns each rewritten reply into a datagram to its agent.
struct ReplyPump {
    metrics: Arc<Metrics>,
    fast: Weak<FastPath>,
    dataplane: Weak<Dataplane>,
    arena: PacketArena,
    /// Kept for the batch being read; `None` between batches.
    batch: Option<Batch>,
}

/// What a batch of replies needs: the fast path and the data plane (upgraded once), and the
/// flow of the last reply, whose activity is recorded once per run of its replies.
struct Batch {
    fast: Arc<FastPath>,
    dataplane: Arc<Dataplane>,
    last: Option<(ReplyKey, Arc<Agent>, Activity)>,
}

impl afxdp::Handler for ReplyPump {
    fn packet(&mut self, frame: &[u8]) {
        if self.batch.is_none() {
            let (Some(fast), Some(dataplane)) = (self.fast.upgrade(), self.dataplane.upgrade())
            else {
                return;
            };
            self.batch = Some(Batch {
                fast,
                dataplane,
                last: None,
            });
        }
        let Some(Batch {
            fast,
            dataplane,
            last,
        }) = self.batch.as_mut()
        else {
            return;
        };
        let metrics = &fast.metrics;
        let Some(key) = reply_key(frame) else {
            metrics.xdp_rx_unmatched.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if last.as_ref().is_none_or(|l| l.0 != key) {
            if let Some((_, _, activity)) = last.take() {
                activity.touch(Instant::now());
            }
            *last = lock(&fast.state)
                .replies
                .get(&key)
                .map(|t| (key, t.agent.clone(), t.activity.clone()));
        }
        let Some((_, agent, _)) = last.as_ref() else {
            metrics.xdp_rx_unmatched.fetch_add(1, Ordering::Relaxed);
            return;
        };
        // reply_key checked that the IPv4 total length is within the frame.
        let total = usize::from(u16::from_be_bytes([frame[2], frame[3]]));
        let (packet, completed) = self.arena.copy_with(&frame[..total], finish_udp_checksum);
        if completed {
            metrics
                .xdp_checksums_completed
                .fetch_add(1, Ordering::Relaxed);
        }
        metrics.xdp_to_agents.fetch_add(1, Ordering::Relaxed);
        dataplane.send_to_agent(agent, packet);
    }

    fn ring_drops(&mut self, new: u64) {
        self.metrics
            .xdp_rx_ring_dropped
            .fetch_add(new, Ordering::Relaxed);
    }

    fn batch_done(&mut self) {
        if let Some(Batch {
            last: Some((_, _, activity)),
            ..
        }) = self.batch.take()
        {
            activity.touch(Instant::now());
        }
    }
}

/// Makes the UDP checksum of a rewritten reply (IPv4 packet, UDP length within it) valid and
/// returns whether it had to change it.
///
/// The XDP program updates the checksum field incrementally, which is right when the sender
/// filled it in. A sender on the same host or a veth peer that leaves the checksum to "hardware"
/// (CHECKSUM_PARTIAL) puts only the pseudo-header sum there, and XDP can't tell the two apart;
/// such a reply reaches userspace with an invalid checksum, and the agent's kernel would drop
/// it. A zero checksum (none) is left alone.
fn finish_udp_checksum(p: &mut [u8]) -> bool {
    let ihl = usize::from(p.first().map_or(0, |b| b & 0x0f)) * 4;
    if ihl < 20 || p.len() < ihl + 8 {
        return false;
    }
    let udp_len = u16::from_be_bytes([p[ihl + 4], p[ihl + 5]]);
    let end = ihl + usize::from(udp_len);
    let field = [p[ihl + 6], p[ihl + 7]];
    if field == [0, 0] || udp_len < 8 || end > p.len() {
        return false;
    }
    // One pass: the checksum over the pseudo-header and the datagram without its checksum
    // field (the field sits at an even offset, so skipping it keeps the 16-bit words aligned).
    let check = Sum16BitWords::new()
        .add_4bytes([p[12], p[13], p[14], p[15]])
        .add_4bytes([p[16], p[17], p[18], p[19]])
        .add_2bytes([0, 17])
        .add_2bytes(udp_len.to_be_bytes())
        .add_slice(&p[ihl..ihl + 6])
        .add_slice(&p[ihl + 8..end])
        .to_ones_complement_with_no_zero()
        // etherparse sums native-endian words, so its result is in native byte order.
        .to_ne_bytes();
    if check == field {
        return false; // valid
    }
    p[ihl + 6..ihl + 8].copy_from_slice(&check);
    true
}

/// If `p` (an IPv4 packet) is an ICMP port unreachable quoting a UDP datagram from `local`,
/// the datagram's source port and destination.
fn port_unreachable_about(p: &[u8], local: Ipv4Addr) -> Option<(u16, SocketAddrV4)> {
    let ihl = usize::from(*p.first()? & 0x0f) * 4;
    let icmp = p.get(ihl..)?;
    if ihl < 20
        || p.len() < 20
        || p[9] != 1
        || icmp.len() < 8 + 20 + 8
        || icmp[0] != 3
        || icmp[1] != 3
    {
        return None;
    }
    let quoted = &icmp[8..];
    let qihl = usize::from(quoted[0] & 0x0f) * 4;
    if qihl < 20 || quoted[9] != 17 || quoted.len() < qihl + 4 {
        return None;
    }
    let src = Ipv4Addr::new(quoted[12], quoted[13], quoted[14], quoted[15]);
    if src != local {
        return None;
    }
    let dst = Ipv4Addr::new(quoted[16], quoted[17], quoted[18], quoted[19]);
    let port = |at: usize| u16::from_be_bytes([quoted[at], quoted[at + 1]]);
    Some((port(qihl), SocketAddrV4::new(dst, port(qihl + 2))))
}

/// The source address the kernel picks towards `dst`.
fn local_addr_towards(dst: Ipv4Addr) -> anyhow::Result<Ipv4Addr> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("probing the local address")?;
    s.connect((dst, 9))
        .with_context(|| format!("no route to the backend {dst}"))?;
    match s.local_addr()? {
        std::net::SocketAddr::V4(a) => Ok(*a.ip()),
        std::net::SocketAddr::V6(_) => bail!("no IPv4 address towards {dst}"),
    }
}

/// Warns if the flow range overlaps the kernel's ephemeral ports, where other sockets' replies
/// would be dropped as unsolicited.
fn warn_if_ephemeral(first: u16, last: u16) {
    let Ok(text) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return;
    };
    let mut it = text
        .split_whitespace()
        .filter_map(|s| s.parse::<u16>().ok());
    if let (Some(lo), Some(hi)) = (it.next(), it.next()) {
        if first <= hi && lo <= last {
            warn!(
                "xdp_port_range {first}-{last} overlaps the kernel's ephemeral ports {lo}-{hi} \
                 (net.ipv4.ip_local_port_range): UDP replies to other sockets on those ports \
                 will be dropped as unsolicited; pick a range outside it"
            );
        }
    }
}

#[cfg(test)]
mod tests;
